"""The controller in the lab: real namespaces, nftables, dnsmasq and DHCP
clients. Every test builds its own lab (unique names) and tears it down,
also on failure (the make_lab fixture checks that nothing is left).

These tests run the domains on the bridge itself (policies/lab-bridge.toml),
with the lab's uplink: egress leaves through dom0's WireGuard tunnel to the
lab's VPN provider. tests/lab/test_wireguard_lab.py covers hub domains.

A negative probe passes only on a clean block (controller/lab/expect.py:
dom0 drops silently, so a timeout), and each family of them has a control
here, the same probe answered once the protection is lifted: cross-domain
routed (`reach`), cross-domain on the bridge and spoofing (dom0's tables
deleted), a forged MAC (its own MAC back), quarantine (a rule for the MAC).
Nothing here waits a fixed time for the controller: a test waits for the
status generation to pass the one read before, or for the fact it expects."""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from controller.drivers.nft.ruleset import METERS as METER_SETS
from controller.lab import build, controllerproc, dhcpclient, netns, processes, topology, vm
from controller.lab.expect import assert_blocked, assert_reached
from controller.lab.probe import ProbeResult, ping
from controller.lab.rundir import Lab, LabError
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
BRIDGE_POLICY = ROOT / "policies" / "lab-bridge.toml"
ECHO_SEEN_AS = "198.51.100.3"  # through dom0's uplink, masqueraded by the VPN provider
ECHO = "203.0.113.10"  # the internet's echo service


@pytest.fixture
def make_lab(make_lab: Any) -> Any:
    """The lab with its domains on the bridge (the shared fixture's defaults otherwise)."""

    def factory(vms: int = 2, **kwargs: Any) -> Any:
        kwargs.setdefault("policy", BRIDGE_POLICY)
        return make_lab(vms, **kwargs)

    return factory


def leases(lab: Lab) -> dict[int, dhcpclient.Lease]:
    return {i: dhcpclient.read_lease(lab, i) for i in build.vm_indexes(lab)}  # type: ignore[misc]


def by_mac(lab: Lab) -> dict[str, dict[str, Any]]:
    return {m["mac"]: m for m in controllerproc.status(lab)}


def probe(lab: Lab, i: int, address: str, **kw: Any) -> ProbeResult:
    """vm i GETs the echo service of address (a VM's, or the internet's)."""
    return vm.probe(lab, i, vm.echo_url(address), timeout=kw.pop("timeout", 1.5), **kw)


def seen_as(lab: Lab, i: int, address: str, **kw: Any) -> str:
    """What the echo of address saw as vm i's source (the probe must be answered)."""
    return assert_reached(probe(lab, i, address, **kw)).body.strip()


def renewed(lab: Lab, i: int) -> str:
    """The address vm i holds after renewing its lease now."""
    lease = dhcpclient.renew(lab, i)
    assert lease is not None
    return lease.ip


def drop_dom0_tables(lab: Lab) -> None:
    """Controls: the controller stopped and dom0's bridge and inet tables
    deleted, so that only the protection they hold is gone (the kill switch
    and the uplink stay)."""
    controllerproc.stop(lab)
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "bridge", "dom0"])
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "inet", "dom0"])


def pin_neighbours(lab: Lab, i: int, neighbours: dict[str, str]) -> None:
    """Permanent ARP entries (address -> MAC) in vm i, as it learned them.
    A forged probe then tests the forged IP packets themselves: the VM's
    ARP requests would carry the forged sender too, dom0 drops those, and
    the probe would end in the VM's own "no route to host" instead."""
    for address, mac in neighbours.items():
        vm.run(
            lab, i,
            ["ip", "neigh", "replace", address, "lladdr", mac, "dev", "eth0", "nud", "permanent"],
        )  # fmt: skip


def with_reach(policy: str, domain: str, reach: str) -> str:
    head = f"[domains.{domain}]\n"
    assert head in policy
    return policy.replace(head, f'{head}reach = ["{reach}"]\n', 1)


METERS = {m.name for m in METER_SETS}


def ruleset(lab: Lab) -> str:
    """dom0's nftables ruleset without what traffic changes: counters and
    the meters' elements (the kernel's per-port and per-machine rates)."""
    out = netns.run(lab.dom0_ns, ["nft", "list", "ruleset"]).stdout
    out = re.sub(r"counter packets \d+ bytes \d+", "counter", out)
    return re.sub(
        r"(\tset (\w+) \{[^}]*?)\n\t\telements = \{[^}]*\}",
        lambda m: m[1] if m[2] in METERS else m[0],
        out,
    )


def test_each_vm_gets_the_address_and_name_the_controller_chose(make_lab: Any) -> None:
    lab = make_lab(4, controller=True)
    machines = by_mac(lab)
    got = leases(lab)
    for i, lease in got.items():
        m = machines[vm.mac(lab, i)]
        assert m["state"] == "admitted"
        assert m["rule"] == ("odd" if i % 2 else "even")
        assert m["domain"] == ("x" if i % 2 else "y")
        assert lease.ip == m["address"]
        assert lease.fqdn == m["name"]  # hostname and domain from DHCP
        pool = ipaddress.ip_network("10.10.0.0/24" if i % 2 else "10.20.0.0/24")
        assert ipaddress.ip_address(lease.ip) in pool
        assert lease.router == str(pool.network_address + 1)
    # names follow the rules' templates, one slot each
    names = sorted(m["name"] for m in machines.values())
    assert names == ["db1.y.internal", "db2.y.internal", "web1.x.internal", "web2.x.internal"]
    # dnsmasq never handed out any address but the reserved ones
    lease_file = (lab.state_dir / "dhcp" / "leases").read_text().split("\n")
    handed = {line.split()[2] for line in lease_file if line.strip()}
    assert handed == {m["address"] for m in machines.values()}


def test_same_domain_passes_cross_domain_is_dropped(make_lab: Any) -> None:
    lab = make_lab(4, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    # x = {1, 3}, y = {2, 4}
    assert seen_as(lab, 1, ip[3]) == ip[1]
    assert seen_as(lab, 4, ip[2]) == ip[4]
    assert_blocked(probe(lab, 1, ip[2]), probe(lab, 2, ip[3]))
    # everybody reaches the internet, masqueraded
    for i in ip:
        assert vm.whoami(lab, i) == ECHO_SEEN_AS
    # control: with reach = ["y"] for x the very same probe from x goes
    # through, so it was `reach` that stopped it; y still does not reach x
    policy = with_reach(lab.policy_path.read_text(), "x", "y")
    assert controllerproc.reload(lab, policy) == "applying"
    assert seen_as(lab, 1, ip[2]) == ip[1]
    assert_blocked(probe(lab, 2, ip[3]))


def test_isolation_holds_without_routing_on_the_same_bridge(make_lab: Any) -> None:
    """vm1 (x) tries to reach vm2 (y) directly on the bridge: an on-link
    route and a static neighbour entry, so no router is involved."""
    lab = make_lab(2, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    vm.run(lab, 1, ["ip", "route", "add", "10.20.0.0/24", "dev", "eth0"])
    vm.run(lab, 2, ["ip", "route", "add", "10.10.0.0/24", "dev", "eth0"])
    assert_blocked(probe(lab, 1, ip[2]))  # ARP across domains is dropped
    vm.run(lab, 1, ["ip", "neigh", "replace", ip[2], "lladdr", vm.mac(lab, 2), "dev", "eth0"])
    vm.run(lab, 2, ["ip", "neigh", "replace", ip[1], "lladdr", vm.mac(lab, 1), "dev", "eth0"])
    assert_blocked(probe(lab, 1, ip[2]))  # and so is IPv4 sent straight to its MAC
    assert_blocked(probe(lab, 2, ip[1]))
    # control: without dom0's tables the very same probes go through, so it
    # was the firewall that dropped them: with the static entries, then by ARP
    drop_dom0_tables(lab)
    assert seen_as(lab, 1, ip[2]) == ip[1]
    assert seen_as(lab, 2, ip[1]) == ip[2]
    for i, other in ((1, ip[2]), (2, ip[1])):
        vm.run(lab, i, ["ip", "neigh", "del", other, "dev", "eth0"])
    assert seen_as(lab, 1, ip[2]) == ip[1]


def test_forged_address_gets_nothing_through(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    spare = next(
        str(a) for a in ipaddress.ip_network("10.10.0.0/24").hosts()
        if str(a) not in ip.values() and not str(a).endswith(".1")
    )  # fmt: skip
    forgeries = (ip[3], spare, "10.20.0.77")
    pin_neighbours(lab, 1, {"10.10.0.1": topology.BRIDGE_MAC, ip[3]: vm.mac(lab, 3)})
    for forged in forgeries:
        vm.add_address(lab, 1, f"{forged}/32")
        assert_blocked(probe(lab, 1, ECHO, source=forged))
        if forged != ip[3]:  # (vm1 holding vm3's address would just talk to itself)
            assert_blocked(probe(lab, 1, ip[3], source=forged))
        vm.del_address(lab, 1, f"{forged}/32")
    # its own address still works, and the impersonated address from its owner
    assert vm.whoami(lab, 1) == ECHO_SEEN_AS
    assert vm.whoami(lab, 3) == ECHO_SEEN_AS
    # control: without dom0's tables the same forged probes to vm3 go through
    # (and are seen with the forged source), so it was dom0 that stopped them.
    # (The internet's echo cannot be the control: without dom0's NAT the VPN
    # provider drops what does not come from dom0's tunnel address.)
    drop_dom0_tables(lab)
    for forged in forgeries[1:]:
        vm.add_address(lab, 1, f"{forged}/32")
        assert seen_as(lab, 1, ip[3], source=forged) == forged
        vm.del_address(lab, 1, f"{forged}/32")


def test_forged_mac_gets_nothing_through(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    own, victim = vm.mac(lab, 1), vm.mac(lab, 3)
    pin_neighbours(lab, 1, {"10.10.0.1": topology.BRIDGE_MAC, ip[3]: victim})
    vm.set_mac(lab, 1, victim, restart_dhcp=False)
    assert_blocked(probe(lab, 1, ECHO))  # own address, victim's MAC
    assert_blocked(probe(lab, 1, ip[3]))
    vm.add_address(lab, 1, f"{ip[3]}/32")
    assert_blocked(probe(lab, 1, ECHO, source=ip[3]))
    # the victim keeps its binding and works; the controller did not move it
    assert vm.whoami(lab, 3) == ECHO_SEEN_AS
    assert by_mac(lab)[victim]["port"] == "vnet3"
    # control: with its own MAC back the same probes from vm1 go through, so it
    # was the forged MAC that was stopped
    vm.del_address(lab, 1, f"{ip[3]}/32")
    vm.set_mac(lab, 1, own, restart_dhcp=False)
    assert seen_as(lab, 1, ECHO) == ECHO_SEEN_AS
    assert seen_as(lab, 1, ip[3]) == ip[1]


def test_unmatched_mac_is_quarantined(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    q = build.add_vm(lab, mac="00:16:3e:00:00:01")
    lease = dhcpclient.wait_lease(lab, q, timeout=15)
    m = by_mac(lab)["00:16:3e:00:00:01"]
    assert m["state"] == "quarantined"
    assert m["rule"] is None
    assert lease.ip == m["address"]
    assert ipaddress.ip_address(lease.ip) in ipaddress.ip_network("10.99.0.0/24")
    assert lease.router is None
    assert lease.fqdn == m["name"] == "q1.quarantine.internal"
    # it stands out in the log; an admission reads as one
    log = lab.controller_log.read_text()
    assert re.search(r"WARNING .*00:16:3e:00:00:01 .*QUARANTINED, no rule matches", log), log
    assert "QUARANTINED" not in "".join(x for x in log.splitlines() if vm.mac(lab, 1) in x)
    assert re.search(rf"{vm.mac(lab, 1)} on vnet1: admitted by rule odd into x", log)
    # it reaches nothing: not the internet, not a VM, not dom0's gateway
    vm.run(lab, q, ["ip", "route", "replace", "default", "via", "10.99.0.1"])
    assert_blocked(probe(lab, q, ECHO), probe(lab, q, ip[1]), ping(lab.vm_ns(q), "10.99.0.1"))
    # while admitted machines can ping their gateway (service "icmp")
    assert_reached(ping(lab.vm_ns(1), "10.10.0.1"))
    # control: a rule for its MAC lifts the quarantine, and the same VM on the
    # same port, with the lease it renews, gets through to each of them
    rule = (
        '[[rules]]\nname = "guest"\ndomain = "x"\nsubdomain = "guest{n}"\n'
        'match.mac = "00:16:3e:00:00:01"\n\n'
    )
    text = lab.policy_path.read_text().replace("[[rules]]\n", rule + "[[rules]]\n", 1)
    assert controllerproc.reload(lab, text) == "applying"
    admitted = renewed(lab, q)
    assert ipaddress.ip_address(admitted) in ipaddress.ip_network("10.10.0.0/24")
    assert seen_as(lab, q, ECHO) == ECHO_SEEN_AS
    assert seen_as(lab, q, ip[1]) == admitted
    assert_reached(ping(lab.vm_ns(q), "10.10.0.1"))


def test_policy_change_moves_a_vm_and_the_firewall_follows(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    mac1 = vm.mac(lab, 1)
    assert_reached(probe(lab, 1, ip[3]))
    assert_blocked(probe(lab, 1, ip[2]))
    # a new first rule puts vm1 (and only vm1) into domain y
    current = lab.policy_path.read_text()
    moved = current.replace(
        '[[rules]]\nname = "odd"',
        '[[rules]]\nname = "special"\ndomain = "y"\nsubdomain = "special{n}"\n'
        f'match.mac = "{mac1}"\n\n[[rules]]\nname = "odd"',
        1,
    )
    assert moved != current
    # the controller notices the file change (no SIGHUP) and applies it
    assert controllerproc.reload(lab, moved, hup=False) == "applying"
    m = by_mac(lab)[mac1]
    assert m["domain"] == "y"
    assert m["name"] == "special1.y.internal"
    old = ip[1]
    t0 = time.time()
    dhcpclient.renew(lab, 1, wait=False)
    dhcpclient.wait_lease(lab, 1, timeout=20, newer_than=t0)

    def in_new_pool() -> dhcpclient.Lease | None:
        x = dhcpclient.read_lease(lab, 1)
        return x if x is not None and x.ip != old else None

    lease = wait_for(in_new_pool, timeout=20, what="a lease in the new pool")
    assert lease.ip == m["address"]
    assert ipaddress.ip_address(lease.ip) in ipaddress.ip_network("10.20.0.0/24")
    assert lease.fqdn == "special1.y.internal"
    # the firewall follows: y now, not x
    assert seen_as(lab, 1, ip[2]) == lease.ip
    assert_blocked(probe(lab, 1, ip[3]))
    # and the old address is no longer vm1's
    vm.add_address(lab, 1, f"{old}/32")
    assert_blocked(probe(lab, 1, ECHO, source=old))


def settled(lab: Lab) -> None:
    """The controller has seen every machine's lease (it marks them established)."""
    wait_for(lambda: all(m["confirmed"] for m in controllerproc.status(lab)), what="leases seen")


def test_invalid_policy_on_reload_changes_nothing(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    settled(lab)
    before_rules, before_machines = ruleset(lab), by_mac(lab)
    broken = lab.policy_path.read_text().replace('pool = "10.20.0.0/24"', 'pool = "10.10.0.128/25"')
    # refused when the controller's poll of the file sees it, and on SIGHUP
    assert controllerproc.reload(lab, broken, hup=False) == "refused"
    assert controllerproc.reload(lab) == "refused"
    controllerproc.check_running(lab)
    reply = _status_reply(lab)
    assert "overlaps domains.x.pool" in reply["last_policy_error"]
    assert ruleset(lab) == before_rules
    assert by_mac(lab) == before_machines
    assert_blocked(probe(lab, 1, ip[2]))
    assert vm.whoami(lab, 2) == ECHO_SEEN_AS
    log = lab.controller_log.read_text()
    assert "refused" in log and "keeping the last good policy" in log


def _status_reply(lab: Lab) -> dict:
    out = netns.run(
        lab.dom0_ns,
        [sys.executable, "-m", "controller.cli", "status", "--state", str(lab.state_dir), "--json"],
    )
    return json.loads(out.stdout)


# How long "no lease" is waited for: the lease comes well within it once the
# controller runs (udhcpc asks again every few seconds; dnsmasq answers a
# reserved host in ~0.2 s once the controller has written its reservation).
NO_LEASE_WITHIN = 10.0


def test_sigkill_keeps_isolation_and_restart_keeps_every_allocation(make_lab: Any) -> None:
    lab = make_lab(4, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    before = {m["mac"]: (m["name"], m["address"]) for m in controllerproc.status(lab)}
    rules_before = ruleset(lab)
    controllerproc.kill(lab)  # SIGKILL
    assert controllerproc.pid(lab) is None
    # the data plane stays: isolation, egress, DHCP
    assert ruleset(lab) == rules_before
    assert seen_as(lab, 1, ip[3]) == ip[1]
    assert_blocked(probe(lab, 1, ip[2]))
    assert vm.whoami(lab, 2) == ECHO_SEEN_AS
    assert renewed(lab, 2) == ip[2]
    # a machine that arrives while the controller is dead gets nothing: fail-closed.
    # A bounded wait for the lease that must not come (as long as the lease
    # takes at most with the controller up: the end of this test), while its
    # client asks all along.
    late = build.add_vm(lab)
    late_mac = vm.mac(lab, late)
    client_log = lab.logs_dir / f"dhcp-vm{late}.log"

    def discovers() -> int:
        return client_log.read_text(errors="replace").count("broadcasting discover")

    asked = discovers()
    with pytest.raises(LabError, match="no DHCP lease"):
        dhcpclient.wait_lease(lab, late, timeout=NO_LEASE_WITHIN)
    assert discovers() >= asked + 3, "the late VM's DHCP client was not asking"
    vm.add_address(lab, late, "10.10.0.200/24")
    assert_blocked(probe(lab, late, ip[1]))
    vm.del_address(lab, late, "10.10.0.200/24")
    # restart on the same state: every allocation kept, nothing rebuilt
    controllerproc.start(lab)
    after = {m["mac"]: (m["name"], m["address"]) for m in controllerproc.status(lab)}
    for mac, value in before.items():
        assert after[mac] == value
    reply = _status_reply(lab)
    assert reply["stats"]["rebuilds"] == 0  # converged without rewriting the tables
    # and the late machine is admitted now, within the time it waited in vain
    # above, and reaches the machine it could not reach then
    lease = dhcpclient.wait_lease(lab, late, timeout=NO_LEASE_WITHIN)
    assert by_mac(lab)[late_mac]["address"] == lease.ip
    assert seen_as(lab, late, ip[1]) == lease.ip


def test_plan_shows_what_would_change_and_changes_nothing(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    # (the controller has seen the leases: else `plan` would rightly show that
    # it would mark the machines established)
    settled(lab)
    controllerproc.stop(lab)  # SIGTERM: the data plane stays
    rules = ruleset(lab)

    def plan(policy: Path) -> dict:
        out = netns.run(
            lab.dom0_ns,
            [sys.executable, "-m", "controller.cli", "plan", "--policy", str(policy),
             "--state", str(lab.state_dir), "--json"],
        )  # fmt: skip
        return json.loads(out.stdout)

    same = plan(lab.policy_path)
    assert same["empty"], same
    changed = lab.root / "changed.toml"
    changed.write_text(
        lab.policy_path.read_text().replace("internet = true", 'internet = true\nreach = ["y"]', 1)
    )
    p = plan(changed)
    assert not p["empty"]
    # (x's containers' pool with it: the domain's policy holds for both)
    assert sorted(map(tuple, p["changes"]["add"]["inet/reach"])) == sorted(
        [
            ("10.10.0.0/24", "10.20.0.0/24"),
            ("10.10.0.0/24", "10.140.0.0/20"),
            ("10.130.0.0/20", "10.20.0.0/24"),
            ("10.130.0.0/20", "10.140.0.0/20"),
        ]
    )
    assert not p["changes"]["rebuild"]
    text = netns.run(
        lab.dom0_ns,
        [sys.executable, "-m", "controller.cli", "plan", "--policy", str(changed),
         "--state", str(lab.state_dir)],
    ).stdout  # fmt: skip
    assert "nftables: add inet dom0 reach { 10.10.0.0/24 . 10.20.0.0/24 }" in text
    assert ruleset(lab) == rules


def test_status_human_and_json(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    reply = _status_reply(lab)
    assert {m["state"] for m in reply["machines"]} == {"admitted"}
    out = netns.run(
        lab.dom0_ns,
        [sys.executable, "-m", "controller.cli", "status", "--state", str(lab.state_dir)],
    ).stdout
    assert "web1.x.internal" in out and "db1.y.internal" in out
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli", "status", "--state", str(lab.root / "nope")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 1 and "no controller is running" in r.stderr


def test_sigterm_stops_the_controller_and_leaves_the_data_plane(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)
    ip = {i: lease.ip for i, lease in leases(lab).items()}
    rules = ruleset(lab)
    proc = controllerproc.pid(lab)
    assert proc is not None
    processes.send_signal(proc, signal.SIGTERM)
    assert processes.wait_exit(proc, 5.0), "the controller did not stop on SIGTERM"
    assert "SIGTERM: stopping; the data plane stays in place" in lab.controller_log.read_text()
    assert not (lab.state_dir / "control.sock").exists()
    assert ruleset(lab) == rules
    assert seen_as(lab, 1, ip[3]) == ip[1]
    assert_blocked(probe(lab, 1, ip[2]))
    assert renewed(lab, 3) == ip[3]  # dnsmasq still serves
