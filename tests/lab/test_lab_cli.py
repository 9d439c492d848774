"""`dom0 lab up | down | demo` fitted to an operator's own policy, through the CLI.

Real namespaces and the real controller (root only). The policy is the
operator's file in a temporary directory, never policies/lab.toml: `lab up
--policy FILE` runs the controller on FILE itself, so the test edits it as an
operator would (write a new file, rename it over the old) and waits for the
controller's status to show the edit, with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.lab import controllerproc, dhcpclient, netns, processes, teardown
from controller.lab.rundir import Lab

pytestmark = pytest.mark.lab

# Rule patterns that are not the lab default's (52:54:00:d0:...): a libvirt-like
# OUI of its own and locally administered "randomized" MACs, each in its domain.
POLICY = """
[bridge]
name = "virbr0"

[wan]
interface = "wan"

[dhcp]
lease_time = "10m"

[domains.office]
pool = "10.30.0.0/24"
internet = true
services = ["dns", "icmp"]

[domains.guests]
pool = "10.40.0.0/24"
internet = true
services = ["dns", "icmp"]

[[rules]]
name = "kvm"
domain = "office"
subdomain = "pc{n}"
match.mac = "52:54:01:*"

[[rules]]
name = "randomized"
domain = "guests"
subdomain = "guest{n}"
match.mac = "02:aa:*"

[quarantine]
pool = "10.99.0.0/24"
"""
UNMATCHED = "aa:00:00:00:00:01"


def cli(*argv: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return processes.run_dom0(*argv, timeout=timeout)


@pytest.fixture
def name(lab_name: str) -> Iterator[str]:
    """A unique lab name; the lab is torn down afterwards, also on failure."""
    if os.geteuid() != 0:
        pytest.skip("lab tests build network namespaces: run as root")
    yield lab_name
    teardown.down(lab_name)
    assert not teardown.exists(lab_name), f"lab {lab_name} not fully torn down"


def edit(path: Path, text: str) -> None:
    """As an editor saves: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    tmp.replace(path)


def by_mac(reply: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(m["mac"]).lower(): m for m in reply["machines"]}


def test_up_fits_vms_to_the_operators_rules_and_runs_on_the_file_live(
    name: str, tmp_path: Path
) -> None:
    policy = tmp_path / "home.toml"
    policy.write_text(POLICY)
    up = cli(
        "lab", "up", "--name", name, "--vms", "3", "--policy", str(policy),
        "--mac", f"vm3={UNMATCHED}", "--json",
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)  # stdout is the JSON alone; progress went to stderr
    warnings = [line for line in up.stderr.splitlines() if "warning:" in line]
    assert warnings == [
        f"dom0 lab up: warning: vm3: MAC {UNMATCHED} on port vnet3 matches no rule of "
        f"{policy}: it will be quarantined"
    ]
    assert info["policy"] == {"path": str(policy), "source": str(policy), "live": True}
    vms = {v["vm"]: v for v in info["vms"]}
    assert (vms["vm1"]["rule"], vms["vm1"]["domain"]) == ("kvm", "office")
    assert (vms["vm2"]["rule"], vms["vm2"]["domain"]) == ("randomized", "guests")
    assert vms["vm1"]["mac"].startswith("52:54:01:") and vms["vm2"]["mac"].startswith("02:aa:")
    assert (vms["vm3"]["mac"], vms["vm3"]["rule"]) == (UNMATCHED, None)
    assert [v["port"] for v in info["vms"]] == ["vnet1", "vnet2", "vnet3"]

    # The controller agrees: it runs on the operator's file and admitted the VMs
    # into those rules' domains; the unmatched one is quarantined.
    lab = Lab.named(name)
    assert lab.policy_path == policy and not lab.policy_copy.exists()
    reply = controllerproc.reply(lab)
    assert reply["policy"] == str(policy)
    seen = by_mac(reply)
    one, two, three = (seen[vms[f"vm{i}"]["mac"]] for i in (1, 2, 3))
    assert (one["state"], one["rule"], one["domain"]) == ("admitted", "kvm", "office")
    assert (two["state"], two["rule"], two["domain"]) == ("admitted", "randomized", "guests")
    assert three["state"] == "quarantined"
    lease1, lease2 = dhcpclient.read_lease(lab, 1), dhcpclient.read_lease(lab, 2)
    assert lease1 is not None and lease2 is not None
    assert ipaddress.ip_address(lease1.ip) in ipaddress.ip_network("10.30.0.0/24")
    assert ipaddress.ip_address(lease2.ip) in ipaddress.ip_network("10.40.0.0/24")
    assert info["vms"][0]["lease"]["ip"] == lease1.ip

    # An edit of the operator's own file reaches the running controller: the
    # kvm rule moves to the guests domain.
    before = controllerproc.generation(lab)
    edit(policy, POLICY.replace('domain = "office"', 'domain = "guests"', 1))
    mac1 = vms["vm1"]["mac"]
    moved = controllerproc.wait_generation(
        lab,
        before,
        lambda r: by_mac(r).get(mac1, {}).get("domain") == "guests",
        timeout=15.0,
        what=f"{mac1} to move to domain guests after the edit",
    )
    assert by_mac(moved)[mac1]["rule"] == "kvm" and moved["last_policy_error"] is None

    down = cli("lab", "down", "--name", name, "--json")
    assert down.returncode == 0, down.stderr
    report = json.loads(down.stdout)
    assert report["name"] == name and report["found"] and report["removed_rundir"]
    assert f"{name}-dom0" in report["namespaces"] and f"{name}-vm3" in report["namespaces"]
    assert report["stopped"]  # the controller, dnsmasq, the DHCP clients, ...
    assert not teardown.exists(name)
    # The operator's file is theirs: the lab neither copied over it nor removed it.
    assert policy.read_text() == POLICY.replace('domain = "office"', 'domain = "guests"', 1)

    again = cli("lab", "down", "--name", name, "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout) == {
        "name": name, "found": False, "stopped": [], "namespaces": [], "removed_rundir": False,
    }  # fmt: skip


def test_up_copies_the_default_policy_and_says_so(name: str) -> None:
    """Control for the live file: without --policy the controller runs on the
    lab's copy (default MACs, every VM under a rule, no warning)."""
    up = cli("lab", "up", "--name", name, "--vms", "2", "--no-controller", "--json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert "warning:" not in up.stderr
    lab = Lab.named(name)
    assert info["policy"]["path"] == str(lab.policy_copy) and not info["policy"]["live"]
    assert [(v["mac"], v["rule"]) for v in info["vms"]] == [
        ("52:54:00:d0:00:01", "odd"),
        ("52:54:00:d0:00:02", "even"),
    ]
    assert cli("lab", "down", "--name", name).returncode == 0


def test_up_with_other_port_names(name: str, tmp_path: Path) -> None:
    """--ports PREFIX names the bridge ports, which rules may match by interface."""
    policy = tmp_path / "ports.toml"
    policy.write_text(POLICY.replace('match.mac = "52:54:01:*"', 'match.interface = "tap*"'))
    up = cli(
        "lab", "up", "--name", name, "--vms", "1", "--policy", str(policy),
        "--ports", "tap", "--no-controller", "--json",
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert (info["vms"][0]["port"], info["vms"][0]["rule"]) == ("tap1", "kvm")
    lab = Lab.named(name)
    links = netns.run(lab.dom0_ns, ["ip", "-o", "link", "show", "master", "virbr0"]).stdout
    assert " tap1@" in links
    assert cli("lab", "down", "--name", name).returncode == 0


def test_demo_with_a_name_and_refusing_an_existing_lab(
    name: str, make_lab: Callable[..., Any]
) -> None:
    demo = cli("lab", "demo", "--name", name, "--vms", "2", "--json", timeout=120)
    assert demo.returncode == 0, demo.stderr
    result = json.loads(demo.stdout)
    assert result["lab"] == name and result["ok"]
    assert not teardown.exists(name)  # the demo removed its own lab

    existing = make_lab(1)
    refused = cli("lab", "demo", "--name", existing.name, "--vms", "1", "--json")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "already exists" in refused.stderr
    assert netns.exists(existing.vm_ns(1))  # someone else's lab is left alone
