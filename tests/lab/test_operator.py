"""What an operator does to a running host: move a machine to another domain,
renew one on demand, restart the controller the way its service does.

A move re-addresses a machine at once when its DHCP client watches the
carrier (dhcpcd here, as systemd-networkd and NetworkManager do): the
controller flaps the carrier of the machine's port, the client asks again,
dnsmasq NAKs the old address and hands out the new one. busybox udhcpc does
not watch the carrier: it keeps its old address (closed to it at once) until
it renews.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from common import processes as common_processes
from controller.lab import controllerproc, dhcpclient, netns, processes, topology, vm
from controller.lab.expect import assert_blocked, assert_reached
from controller.lab.probe import ProbeResult
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
BRIDGE_POLICY = ROOT / "policies" / "lab-bridge.toml"
MOVE_DEADLINE = 5.0  # seconds from the reload to the new domain's peers reached


def probe(lab: Lab, i: int, address: str, **kw: Any) -> ProbeResult:
    return vm.probe(lab, i, vm.echo_url(address), timeout=kw.pop("timeout", 1.0), **kw)


def use_dhcpcd(lab: Lab, i: int) -> dhcpclient.Lease:
    """vm i's client becomes dhcpcd, from a clean eth0; its first lease."""
    dhcpclient.stop(lab, i)
    vm.run(lab, i, ["ip", "-4", "addr", "flush", "dev", topology.VM_IF])
    t0 = time.time()
    dhcpclient.start(lab, i, client="dhcpcd")
    return dhcpclient.wait_lease(lab, i, timeout=15, newer_than=t0 - 1)


def special_rule(mac: str, domain: str) -> str:
    return (
        f'[[rules]]\nname = "special"\ndomain = "{domain}"\nsubdomain = "special{{n}}"\n'
        f'match.mac = "{mac}"\n\n'
    )


def with_rules(base: str, rules: str) -> str:
    moved = base.replace('[[rules]]\nname = "odd"', rules + '[[rules]]\nname = "odd"', 1)
    assert moved != base
    return moved


def cli(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return processes.run_dom0(*args, "--state", str(lab.state_dir), timeout=30)


def reaches(lab: Lab, i: int, address: str, source: str) -> bool:
    r = probe(lab, i, address)
    return r.ok and r.body.strip() == source


def test_a_move_readdresses_at_once_and_closes_the_old_domain(make_lab: Any) -> None:
    """vm1 (dhcpcd) and vm3 (udhcpc) move from x to y in one policy edit. Both
    are closed to x at once; vm1 reaches y's vm2 with its new address within
    5 s; vm3, whose client ignores the carrier, gets there once it renews.
    Then vm1 moves back to x: dnsmasq serves the x reservation again."""
    lab = make_lab(3, controller=True, policy=BRIDGE_POLICY)
    first = {i: dhcpclient.read_lease(lab, i) for i in (1, 2, 3)}
    ip = {i: lease.ip for i, lease in first.items() if lease is not None}
    old1 = use_dhcpcd(lab, 1).ip
    assert reaches(lab, 1, ip[3], old1)  # x to x
    assert_blocked(probe(lab, 1, ip[2]))  # x to y: closed
    dnsmasq_pid = controllerproc.reply(lab)["dnsmasq_pid"]
    base = lab.policy_path.read_text()
    mac1, mac3 = vm.mac(lab, 1), vm.mac(lab, 3)
    rules = special_rule(mac1, "y") + special_rule(mac3, "y").replace("special", "other")
    t0 = time.monotonic()
    assert controllerproc.reload(lab, with_rules(base, rules), hup=True) == "applying"
    # the old domain is closed to both at once: their leases still name x addresses
    assert_blocked(probe(lab, 3, ip[1], timeout=0.5), probe(lab, 3, ip[2], timeout=0.5))
    m1 = controllerproc.machine(lab, mac1)
    assert m1 is not None and m1["domain"] == "y"
    new1 = m1["address"]
    assert ipaddress.ip_address(new1) in ipaddress.ip_network("10.20.0.0/24")

    def vm1_in_y() -> bool:
        lease = dhcpclient.read_lease(lab, 1)
        return lease is not None and lease.ip == new1 and reaches(lab, 1, ip[2], new1)

    wait_for(vm1_in_y, timeout=MOVE_DEADLINE, what="vm1 re-addressed into y, reaching vm2")
    took = time.monotonic() - t0
    assert took < MOVE_DEADLINE + 1.0, took  # (wait_for's own slack)
    assert_blocked(probe(lab, 1, ip[3]))  # and no longer x
    assert controllerproc.reply(lab)["stats"]["renewals"] >= 2
    # vm3's udhcpc saw the same flap and kept its old lease: closed everywhere
    lease3 = dhcpclient.read_lease(lab, 3)
    assert lease3 is not None and lease3.ip == ip[3]
    assert_blocked(probe(lab, 3, ip[2], timeout=0.5))
    # control: once it renews, the same probe gets through with its new address
    m3 = controllerproc.machine(lab, mac3)
    assert m3 is not None and m3["domain"] == "y"
    renewed3 = dhcpclient.renew(lab, 3, timeout=10)
    assert renewed3 is not None and renewed3.ip == m3["address"]
    assert reaches(lab, 3, ip[2], m3["address"])

    # back to x: a reservation on a domain's pool dnsmasq has served before
    t1 = time.monotonic()
    assert controllerproc.reload(lab, base, hup=True) == "applying"
    m1 = controllerproc.machine(lab, mac1)
    assert m1 is not None and m1["domain"] == "x"
    back = m1["address"]

    def vm1_back() -> bool:
        lease = dhcpclient.read_lease(lab, 1)
        return lease is not None and lease.ip == back

    wait_for(vm1_back, timeout=MOVE_DEADLINE, what="vm1 re-addressed back into x")
    assert time.monotonic() - t1 < MOVE_DEADLINE + 1.0
    assert_blocked(probe(lab, 1, ip[2]))  # y is closed again
    assert controllerproc.reply(lab)["dnsmasq_pid"] == dnsmasq_pid  # no restart needed


def test_machine_renew_flaps_the_carrier_and_the_client_asks_again(make_lab: Any) -> None:
    lab = make_lab(2, controller=True, policy=BRIDGE_POLICY)
    lease = use_dhcpcd(lab, 1)
    assert lease.fqdn == "web1.x.internal"
    before = lease.written
    wait_for(lambda: (m := controllerproc.machine(lab, vm.mac(lab, 1))) and m["confirmed"],
             what="the controller to see vm1's lease")  # fmt: skip
    r = cli(lab, "machine", "renew", "web1.x.internal")
    assert r.returncode == 0, r.stderr
    assert "vnet1" in r.stdout and "web1.x.internal" in r.stdout
    # the carrier went down and came back: dhcpcd rebinds and rewrites its lease
    again = dhcpclient.wait_lease(lab, 1, timeout=5, newer_than=before)
    assert again.ip == lease.ip and again.event in ("rebind", "reboot", "bound")
    assert_reached(probe(lab, 1, "203.0.113.10"))
    j = cli(lab, "machine", "renew", "web1", "--json")
    assert j.returncode == 0 and json.loads(j.stdout)["port"] == "vnet1"
    # bad input: one line, exit 2; nothing flapped
    renewals = controllerproc.reply(lab)["stats"]["renewals"]
    bad = cli(lab, "machine", "renew", "nosuch.x.internal")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "no such machine" in bad.stderr
    assert controllerproc.reply(lab)["stats"]["renewals"] == renewals


def _wireguard_pids(lab: Lab) -> dict[str, int]:
    out = {}
    for rec in sorted((lab.state_dir / "wireguard").glob("*.json")):
        out[rec.stem] = json.loads(rec.read_text())["pid"]
    return out


def test_a_restart_like_the_service_keeps_dnsmasq_and_wireguard_go(make_lab: Any) -> None:
    """SIGTERM, then start again (systemd's restart with KillMode=process,
    supervise-daemon's restart): the daemons the controller started keep
    their PIDs and are adopted; the VMs keep their leases and their reach."""
    lab = make_lab(2, controller=True)  # the hub lab: uplink and hub through wireguard-go
    dnsmasq = controllerproc.reply(lab)["dnsmasq_pid"]
    wg = _wireguard_pids(lab)
    assert dnsmasq and len(wg) >= 2, wg  # wg0 (uplink) and the hub
    # a second controller on the same state is refused; the first runs on
    second = netns.run(
        lab.dom0_ns, controllerproc.run_argv(lab), env=processes.python_env(), check=False
    )
    assert second.returncode == 1 and "a controller already runs" in second.stderr
    assert second.stderr.count("\n") == 1, second.stderr
    controllerproc.check_running(lab)
    proc = controllerproc.pid(lab)
    assert proc is not None
    processes.send_signal(proc, signal.SIGTERM)
    assert processes.wait_exit(proc, 5.0)
    kept = common_processes.read_record(lab.state_dir / "dhcp" / "dnsmasq.json")
    assert kept is not None and kept.pid == dnsmasq and common_processes.is_running(kept)
    controllerproc.start(lab)
    reply = controllerproc.reply(lab)
    assert reply["dnsmasq_pid"] == dnsmasq
    assert _wireguard_pids(lab) == wg
    log = lab.controller_log.read_text()
    assert f"adopted running dnsmasq pid {dnsmasq}" in log
    assert reply["stats"]["errors"] == 0
    assert dhcpclient.renew(lab, 1, timeout=10) is not None


def test_a_pinned_machine_leases_its_pinned_address(make_lab: Any, tmp_path: Path) -> None:
    """`pins = { web1 = ... }` on rule odd: vm1 (web1) leases that address; vm3
    (web2) does not get it. Pinning web2 later moves vm3 to its pin."""
    base = BRIDGE_POLICY.read_text()
    pinned = base.replace(
        'subdomain = "web{n}"\n', 'subdomain = "web{n}"\npins = { web1 = "10.10.0.50" }\n', 1
    )
    assert pinned != base
    policy = tmp_path / "policy.toml"
    policy.write_text(pinned)
    lab = make_lab(3, controller=True, policy=policy)
    lease1, lease3 = dhcpclient.read_lease(lab, 1), dhcpclient.read_lease(lab, 3)
    assert lease1 is not None and lease1.ip == "10.10.0.50" and lease1.fqdn == "web1.x.internal"
    assert lease3 is not None and lease3.ip != "10.10.0.50"
    both = lab.policy_path.read_text().replace(
        'pins = { web1 = "10.10.0.50" }', 'pins = { web1 = "10.10.0.50", web2 = "10.10.0.60" }'
    )
    assert controllerproc.reload(lab, both) == "applying"
    m3 = controllerproc.machine(lab, vm.mac(lab, 3))
    assert m3 is not None and m3["address"] == "10.10.0.60" and m3["name"] == "web2.x.internal"
    renewed = dhcpclient.renew(lab, 3, timeout=10)
    assert renewed is not None and renewed.ip == "10.10.0.60"
    assert reaches(lab, 3, lease1.ip, "10.10.0.60")  # and it works there
