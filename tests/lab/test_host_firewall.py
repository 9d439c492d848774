"""dom0's own input, and the hand-over from the installer's boot baseline:
the controller deletes `inet dom0_baseline` in the transaction that loads its
own tables, whose host rules ([host] in the policy) keep open what the
baseline kept open, and nothing more.

A negative probe passes only on a clean block (controller/lab/expect.py): a
timeout where dom0 drops what comes in, and for dom0's own traffic its
output chain's drop. Each has its control here: the same probe answered
with dom0's tables removed, or before the kill switch is loaded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from controller.lab import build, controllerproc, dhcpclient, netns, processes, topology, vm
from controller.lab.expect import OWN_OUTPUT, assert_blocked, assert_reached
from controller.lab.probe import ProbeResult, probe_http
from controller.lab.rundir import Lab

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

BASELINE = """
table inet dom0_baseline {
    chain input { type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        tcp dport 22 accept
    }
    chain forward { type filter hook forward priority filter; policy drop; }
}
"""


def listen(lab: Lab, port: int) -> None:
    """An echo service on dom0's WAN address (stands in for sshd)."""
    argv = netns.exec_argv(
        lab.dom0_ns,
        [PY, "-m", "controller.lab.echo", "--bind", topology.DOM0_WAN, "--port", str(port)],
    )
    _, proc = processes.spawn(
        argv, log=lab.logs_dir / f"listen-{port}.log", env=processes.python_env()
    )
    lab.record_process(f"listen-{port}@dom0", proc, lab.dom0_ns, argv)


def from_wan(lab: Lab, port: int, source: str) -> ProbeResult:
    """GET the listener on dom0's WAN address and port, from the internet side."""
    return probe_http(lab.wan_ns, vm.echo_url(topology.DOM0_WAN, port), source=source, timeout=1.5)


def test_controller_takes_over_the_baseline_and_keeps_ssh(make_lab: Any, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        (ROOT / "policies" / "lab.toml").read_text()
        + '\n[host]\nssh_from = ["198.51.100.1/32"]\nssh_port = 2222\n'
    )
    lab = make_lab(2, controller=False, dhcp=False, policy=policy)
    netns.run(lab.dom0_ns, ["nft", "-f", "-"], input=BASELINE)
    listen(lab, 2222)
    listen(lab, 8080)
    netns.ip_batch(["addr add 198.51.100.9/24 dev inet0"], lab.wan_ns)  # a second WAN source
    controllerproc.start(lab)
    rules = netns.run(lab.dom0_ns, ["nft", "list", "tables"]).stdout
    assert "dom0_baseline" not in rules and "table inet dom0" in rules
    dhcpclient.start_many(lab, [1, 2])
    dhcpclient.wait_leases(lab, [1, 2], 20)
    build.join_hub(lab, [1, 2])
    # the VMs work: the baseline's forward drop is gone
    assert vm.whoami(lab, 1) == topology.VPN_WAN
    # SSH (port 2222 here) from the allowed source only; nothing else comes in
    assert assert_reached(from_wan(lab, 2222, topology.WAN_GATEWAY)).body.strip() == (
        topology.WAN_GATEWAY
    )
    assert_blocked(from_wan(lab, 2222, "198.51.100.9"), from_wan(lab, 8080, topology.WAN_GATEWAY))
    # a baseline loaded again behind the controller's back is taken over at the next sync
    netns.run(lab.dom0_ns, ["nft", "-f", "-"], input=BASELINE)
    controllerproc.restart(lab)
    assert "dom0_baseline" not in netns.run(lab.dom0_ns, ["nft", "list", "tables"]).stdout
    assert vm.whoami(lab, 2) == topology.VPN_WAN
    assert_blocked(from_wan(lab, 2222, "198.51.100.9"), from_wan(lab, 8080, topology.WAN_GATEWAY))
    # control: with the controller stopped and its tables deleted (kill switch
    # included) the same probes are answered, so it was dom0 that dropped them
    controllerproc.stop(lab)
    for table in ("dom0_wan", "dom0"):
        netns.run(lab.dom0_ns, ["nft", "delete", "table", "inet", table])
    assert assert_reached(from_wan(lab, 2222, "198.51.100.9")).body.strip() == "198.51.100.9"
    assert assert_reached(from_wan(lab, 8080, topology.WAN_GATEWAY)).body.strip() == (
        topology.WAN_GATEWAY
    )


def test_killswitch_command_loads_it_alone(make_lab: Any) -> None:
    """What the boot service runs before the network is up."""
    lab = make_lab(1, controller=False, dhcp=False, policy=build.DEFAULT_POLICY)
    cmd = [PY, "-m", "controller.cli", "killswitch", "--policy", str(lab.policy_path)]
    env = processes.python_env()
    check = netns.run(lab.dom0_ns, [*cmd, "--check"], check=False, env=env)
    assert check.returncode == 1
    # control: before it, dom0's own traffic leaves by the WAN (seen as its address)
    seen = assert_reached(probe_http(lab.dom0_ns, vm.echo_url(), timeout=1.5)).body.strip()
    assert seen == topology.DOM0_WAN
    out = netns.run(lab.dom0_ns, cmd, env=env).stdout
    assert out.startswith(
        "dom0 killswitch: loaded table inet dom0_wan: only UDP to 198.51.100.3:51820"
    )
    assert netns.run(lab.dom0_ns, [*cmd, "--check"], check=False, env=env).returncode == 0
    # dom0's own traffic cannot leave now, tunnel or not
    assert_blocked(probe_http(lab.dom0_ns, vm.echo_url(), timeout=1.5), allow=OWN_OUTPUT)
    bad = lab.root / "bad.toml"
    bad.write_text("[uplink]\nendpoint = 3\n")
    r = netns.run(
        lab.dom0_ns,
        [PY, "-m", "controller.cli", "killswitch", "--policy", str(bad)],
        check=False,
        env=env,
    )
    assert r.returncode == 2 and "uplink.endpoint" in r.stderr
