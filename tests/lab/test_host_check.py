"""`dom0 host check` in the lab: it runs in NAME-dom0 (the host's namespace)
and reports what competes with dom0 on virbr0. Each finding has its control:
the same lab, clean, exits 0 (and the rogue DHCP server really answers a VM
before the check is trusted to find it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common import processes as records
from controller.drivers.dhcp import record_path
from controller.lab import netns, processes
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ROGUE_ADDRESS = "10.251.0.1/24"  # on virbr0 next to dom0's: the rogue's DHCP subnet
LIBVIRT_XML = Path(__file__).resolve().parents[1] / "data" / "libvirt"
# libvirt's own `default` network (NAT and its DHCP on virbr0), and the bridge-mode
# network that dom0 manages (docs/host.md)
LIBVIRT_DEFAULT = (LIBVIRT_XML / "default.xml").read_text()
DOM0_NETWORK = (LIBVIRT_XML / "dom0.xml").read_text()
# What libvirt's iptables-nft rules look like for its default network.
LIBVIRT_NFT = """table ip nat {
  chain POSTROUTING { type nat hook postrouting priority srcnat; policy accept; jump LIBVIRT_PRT; }
  chain LIBVIRT_PRT { ip saddr 192.168.122.0/24 ip daddr != 192.168.122.0/24 masquerade; }
}
table ip filter {
  chain FORWARD { type filter hook forward priority filter; policy accept; jump LIBVIRT_FWO; }
  chain LIBVIRT_FWO { ip saddr 192.168.122.0/24 iifname "virbr0" accept; iifname "virbr0" reject; }
}
"""


def check(
    lab: Lab, policy: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    r = netns.run(
        lab.dom0_ns,
        [
            sys.executable, "-m", "controller.cli", "host", "check",
            "--policy", str(policy or lab.policy_path), "--json",
        ],
        check=False,
        env=processes.python_env(env),
    )  # fmt: skip
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def problems(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["severity"] == "problem"]


def start_rogue(lab: Lab, tmp: Path) -> tuple[processes.ProcId, Path]:
    """A second dnsmasq serving DHCP on virbr0, recorded in the lab (so that
    teardown stops it by PID even if the test fails)."""
    netns.run(lab.dom0_ns, ["ip", "addr", "add", ROGUE_ADDRESS, "dev", "virbr0"])
    log = tmp / "rogue.log"
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
        "--interface=virbr0", "--bind-interfaces", "--pid-file=", "--no-ping",
        "--dhcp-range=10.251.0.10,10.251.0.20,1h", f"--dhcp-leasefile={tmp / 'rogue.leases'}",
        f"--log-facility={log}", "--log-dhcp",
    ]  # fmt: skip
    full = netns.exec_argv(lab.dom0_ns, argv)
    _, proc = processes.spawn(full)
    lab.record_process("rogue-dnsmasq", proc, lab.dom0_ns, full)
    wait_for(
        lambda: log.exists() and "sockets bound exclusively to interface virbr0" in log.read_text(),
        10,
        "the rogue dnsmasq to bind its DHCP socket on virbr0",
    )
    return proc, log


def test_a_second_dhcp_server_on_the_bridge_is_reported_with_its_pid(
    make_lab: Any, tmp_path: Path
) -> None:
    lab = make_lab(1, controller=True)
    own = records.read_record(record_path(lab.state_dir))
    assert own is not None and records.is_running(own)

    # control: the lab as built is dom0's alone (dom0's own dnsmasq is not a finding)
    rc, report = check(lab)
    assert (rc, problems(report)) == (0, []), report

    rogue, log = start_rogue(lab, tmp_path)
    try:
        # it really serves: a VM's DISCOVER gets its offer
        script = tmp_path / "probe.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        mac = lab.vm(1)["mac"]
        subprocess.run(
            netns.exec_argv(
                lab.vm_ns(1),
                ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-T", "1",
                 "-s", str(script)],
            ),
            capture_output=True, timeout=20, check=False,
        )  # fmt: skip
        wait_for(
            lambda: "DHCPOFFER(virbr0) " in log.read_text() and mac in log.read_text(),
            10,
            "the rogue dnsmasq's offer to vm1",
        )

        rc, report = check(lab)
        assert rc == 1
        found = problems(report)
        assert [f["check"] for f in found] == ["listener"], found
        assert found[0]["details"]["pid"] == rogue.pid
        assert found[0]["details"]["interface"] == ["virbr0"]
        assert str(rogue.pid) in found[0]["summary"]
        assert all(f["details"].get("pid") != own.pid for f in report["findings"])
    finally:
        processes.stop([rogue])
        lab.forget_process("rogue-dnsmasq")

    # control: the rogue gone, the same lab is clean again
    rc, report = check(lab)
    assert (rc, problems(report)) == (0, []), report


def test_libvirt_style_nat_tables_networks_and_a_missing_bridge_are_reported(
    make_lab: Any, tmp_path: Path
) -> None:
    lab = make_lab(1, controller=True)
    netns.run(lab.dom0_ns, ["nft", "-f", "-"], input=LIBVIRT_NFT)
    rc, report = check(lab)
    assert rc == 1
    tables = {(f["details"]["family"], f["details"]["table"]) for f in problems(report)}
    assert tables == {("ip", "nat"), ("ip", "filter")}, report
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "ip", "nat"])
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "ip", "filter"])
    assert check(lab)[0] == 0  # control: dom0's own tables are no finding

    # libvirt's default network defined and autostarted on the same bridge
    root = tmp_path / "libvirt"
    networks = root / "etc/libvirt/qemu/networks"
    (networks / "autostart").mkdir(parents=True)
    (networks / "default.xml").write_text(LIBVIRT_DEFAULT)
    (networks / "autostart" / "default.xml").symlink_to("../default.xml")
    env = {"DOM0_LIBVIRT_ROOT": str(root)}
    rc, report = check(lab, env=env)
    assert rc == 1
    (found,) = problems(report)
    assert found["check"] == "libvirt" and found["details"]["name"] == "default"
    assert found["details"]["autostart"] is True
    assert "virsh net-destroy default" in found["fix"]
    # control: the network dom0 wants (bridge mode, no <ip>) instead
    (networks / "autostart" / "default.xml").unlink()
    (networks / "default.xml").unlink()
    (networks / "dom0.xml").write_text(DOM0_NETWORK)
    rc, report = check(lab, env=env)
    assert (rc, problems(report)) == (0, []), report

    # a policy naming a bridge that is not there
    other = tmp_path / "other.toml"
    text = lab.policy_path.read_text()
    assert 'name = "virbr0"' in text
    other.write_text(text.replace('name = "virbr0"', 'name = "virbr9"', 1))
    rc, report = check(lab, other)
    assert rc == 1 and [f["check"] for f in problems(report)] == ["bridge"]


def test_bad_policy_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[bridge]\nname = 3\n")
    for policy in (bad, tmp_path / "missing.toml"):
        r = subprocess.run(
            [sys.executable, "-m", "controller.cli", "host", "check", "--policy", str(policy)],
            capture_output=True, text=True, check=False, env=processes.python_env(),
        )  # fmt: skip
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert str(policy.name) in r.stderr
