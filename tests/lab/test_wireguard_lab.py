"""All egress through WireGuard, in the lab: the uplink to the lab's VPN
provider, the hub for the VMs, and the kill switch. The VMs of the default
lab policy live in hub domains and joined the hub with `dom0 wg export`.

Leaks are looked for with tcpdump on the "internet" side of dom0's WAN link:
every packet dom0 sends there that is not ARP and not the tunnel's UDP to the
VPN endpoint is a leak."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from controller.lab import (
    build,
    controllerproc,
    dhcpclient,
    netns,
    processes,
    topology,
    uplink,
    vm,
)
from controller.lab.capture import Capture
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ENDPOINT = topology.VPN_WAN  # 198.51.100.3, also what the echo must see
PY = sys.executable


def dom0_wan_mac(lab: Lab) -> str:
    return netns.run(
        lab.dom0_ns, ["cat", f"/sys/class/net/{topology.DOM0_WAN_IF}/address"]
    ).stdout.strip()


@contextmanager
def captured(lab: Lab, tag: str, what: str) -> Iterator[list[str]]:
    """Packets dom0 sends out of its WAN matching `what` (filled on exit)."""
    bpf = f"ether src {dom0_wan_mac(lab)} and {what}"
    seen: list[str] = []
    cap = Capture(lab, lab.wan_ns, topology.WAN_PORT_DOM0, bpf, tag).start()
    try:
        yield seen
    finally:
        seen.extend(cap.stop())


TUNNEL = f"udp and dst host {ENDPOINT} and dst port 51820"


def leaks(lab: Lab, tag: str) -> Any:
    """Everything leaving that is neither ARP nor the tunnel's UDP to the VPN endpoint."""
    return captured(lab, tag, f"not arp and not ({TUNNEL})")


def tunnel_packets(lab: Lab, tag: str) -> Any:
    return captured(lab, tag, TUNNEL)


def dom0_probe(lab: Lab, url: str, timeout: float = 1.5) -> subprocess.CompletedProcess[str]:
    return netns.run(
        lab.dom0_ns,
        [PY, "-m", "controller.lab.probe", "http", url, "--timeout", str(timeout)],
        check=False,
        env=processes.python_env(),
    )


def traffic(lab: Lab, vms: list[int]) -> dict[str, Any]:
    """A burst of everything that might try to leave: dom0's own traffic
    (TCP, ICMP, UDP; to the echo, the WAN gateway, the VPN provider) and the
    VMs' (through their tunnels, and past them on the bridge)."""
    out: dict[str, Any] = {}
    out["dom0 echo"] = dom0_probe(lab, vm.echo_url()).stdout.strip()
    for target in ("203.0.113.10", topology.WAN_GATEWAY, ENDPOINT):
        netns.run(lab.dom0_ns, ["busybox", "ping", "-c1", "-W1", target], check=False)
    udp = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for d in [('{ENDPOINT}', 9), ('203.0.113.10', 53), ('{ENDPOINT}', 51820)]:\n"
        "    s.sendto(b'leak?', d)\n"
    )
    netns.run(lab.dom0_ns, [PY, "-c", udp], check=False)
    for i in vms:
        r = vm.probe(lab, i, vm.echo_url(), timeout=1.5)
        out[f"vm{i} echo"] = r.body.strip() if r.ok else None
    return out


def hub_peers(lab: Lab) -> dict[str, tuple[str, ...]]:
    """The hub device's peers, read with dom0's own driver inside NAME-dom0."""
    code = (
        "import json, sys, base64\n"
        "from pathlib import Path\n"
        "from controller.drivers.wireguard.userspace import UserspaceWireGuard\n"
        "d = UserspaceWireGuard(Path(sys.argv[1])).get('hub0')\n"
        "print(json.dumps({base64.b64encode(k).decode(): list(s.peer.allowed_ips)"
        " for k, s in d.peers.items()}))\n"
    )
    out = netns.run(
        lab.dom0_ns, [PY, "-c", code, str(lab.state_dir / "wireguard")], env=processes.python_env()
    )
    return {k: tuple(v) for k, v in json.loads(out.stdout).items()}


def wireguard_pid(lab: Lab, name: str) -> int:
    return int(json.loads((lab.state_dir / "wireguard" / f"{name}.json").read_text())["pid"])


def machines(lab: Lab) -> dict[str, dict]:
    return {m["mac"]: m for m in controllerproc.status(lab)}


def test_vms_and_dom0_leave_only_through_the_tunnel(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    with leaks(lab, "normal") as leaked, tunnel_packets(lab, "normal-tunnel") as tunnel:
        got = traffic(lab, [1, 2])
    assert got == {"dom0 echo": ENDPOINT, "vm1 echo": ENDPOINT, "vm2 echo": ENDPOINT}
    assert tunnel, "the tunnel carried nothing: is the capture looking at the right link?"
    assert leaked == []
    # on the bridge each VM holds its hub address, with its own name and no router
    for i in (1, 2):
        m = machines(lab)[vm.mac(lab, i)]
        lease = dhcpclient.read_lease(lab, i)
        assert lease is not None
        assert (lease.ip, lease.fqdn, lease.router) == (m["underlay"], m["name"], None)


def test_kill_switch_holds_when_the_tunnel_or_wireguard_fails(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    # wg0 down, nobody to repair it (the controller stopped: its rules stay)
    controllerproc.stop(lab)
    netns.run(lab.dom0_ns, ["ip", "link", "set", "wg0", "down"])
    with leaks(lab, "wg0-down") as leaked:
        got = traffic(lab, [1, 2])
    assert leaked == []
    assert set(got.values()) == {""} | {None}, got  # nothing reached the echo
    # wireguard-go killed: the interface goes with it
    pid = wireguard_pid(lab, "wg0")
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_for(lambda: netns.run(lab.dom0_ns, ["ip", "link", "show", "wg0"], check=False).returncode,
             what="wg0 gone with its daemon")  # fmt: skip
    with leaks(lab, "wg-killed") as leaked:
        got = traffic(lab, [1, 2])
    assert leaked == []
    assert set(got.values()) == {""} | {None}, got
    # the controller comes back, restarts wireguard-go, and traffic flows again
    controllerproc.start(lab)
    wait_for(lambda: traffic(lab, [1])["vm1 echo"] == ENDPOINT, what="the tunnel back")
    # with the controller running, a killed daemon is repaired at once, leak-free
    with leaks(lab, "wg-killed-live") as leaked:
        subprocess.run(["kill", "-9", str(wireguard_pid(lab, "wg0"))], check=True)
        traffic(lab, [1, 2])
        wait_for(lambda: traffic(lab, [2])["vm2 echo"] == ENDPOINT, what="the tunnel repaired")
    assert leaked == []
    # control: without the kill switch and the uplink's rule, the same traffic
    # leaks and the capture sees it, so the empty captures above mean something.
    # (With the rule but wg0 down, the uplink table's unreachable default stops
    # dom0's own traffic at routing already: a second line of defence.)
    controllerproc.stop(lab)
    netns.run(lab.dom0_ns, ["ip", "link", "set", "wg0", "down"])
    assert dom0_probe(lab, vm.echo_url()).returncode != 0
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "inet", "dom0_wan"])
    netns.run(lab.dom0_ns, ["ip", "rule", "del", "priority", "32761"])
    with leaks(lab, "control") as leaked:
        got = traffic(lab, [1])
    assert got["dom0 echo"] == topology.DOM0_WAN  # seen as dom0's own WAN address
    assert leaked, "the capture should have seen dom0's traffic leave unprotected"


def test_kill_switch_holds_across_sigkill_reloads_and_restart(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    with leaks(lab, "lifecycle") as leaked:
        controllerproc.kill(lab)  # SIGKILL: the data plane, tunnels included, stays
        assert traffic(lab, [1, 2]) == {
            "dom0 echo": ENDPOINT, "vm1 echo": ENDPOINT, "vm2 echo": ENDPOINT
        }  # fmt: skip
        controllerproc.start(lab)
        assert (
            json.loads(
                netns.run(
                    lab.dom0_ns,
                    [PY, "-m", "controller.cli", "status", "--state", str(lab.state_dir), "--json"],
                    env=processes.python_env(),
                ).stdout
            )["stats"]["rebuilds"]
            == 0
        )
        base = lab.policy_path.read_text()
        for n in range(4):  # reloads: a changed lease time, a new domain, and back
            text = base.replace('lease_time = "10m"', f'lease_time = "{11 + n}m"')
            if n % 2:
                text += '\n[domains.z]\npool = "10.30.0.0/24"\ninternet = true\n'
            controllerproc.write_policy(lab, text)
            proc = controllerproc.pid(lab)
            assert proc is not None
            processes.send_signal(proc, signal.SIGHUP)
            got = traffic(lab, [1, 2])
            assert got["vm1 echo"] == ENDPOINT and got["vm2 echo"] == ENDPOINT, got
        controllerproc.restart(lab)
        assert traffic(lab, [1, 2])["vm2 echo"] == ENDPOINT
    assert leaked == []
    assert "policy reload" in lab.controller_log.read_text()


def test_ipv6_does_not_leak(make_lab: Any) -> None:
    lab = make_lab(1, controller=True)
    # give dom0 and the VM everything IPv6 would need to leave
    netns.ip_batch(["addr add 2001:db8:ff::2/64 dev wan nodad",
                    "route add ::/0 via 2001:db8:ff::1 dev wan"], lab.dom0_ns)  # fmt: skip
    netns.ip_batch(["addr add 2001:db8:ff::1/64 dev inet0 nodad"], lab.wan_ns)
    vm.run(lab, 1, ["ip", "-6", "addr", "add", "2001:db8:1::5/64", "dev", "eth0", "nodad"])
    vm.run(lab, 1, ["ip", "-6", "route", "add", "default", "dev", "eth0"])
    with leaks(lab, "ipv6") as leaked:
        for ns in (lab.dom0_ns, lab.vm_ns(1)):
            netns.run(ns, ["busybox", "ping", "-6", "-c1", "-W1", "2001:db8:ff::1"], check=False)
            netns.run(
                ns,
                [
                    PY,
                    "-m",
                    "controller.lab.probe",
                    "http",
                    "http://[2001:db8:ff::1]/",
                    "--timeout",
                    "1",
                ],
                check=False,
                env=processes.python_env(),
            )
    assert leaked == []
    # control: without the kill switch dom0's IPv6 does leave, and is seen
    controllerproc.stop(lab)
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "inet", "dom0_wan"])
    with leaks(lab, "ipv6-control") as leaked:
        netns.run(
            lab.dom0_ns, ["busybox", "ping", "-6", "-c1", "-W1", "2001:db8:ff::1"], check=False
        )
    assert any("IPv6" in line for line in leaked), leaked


def test_a_vm_reaches_nothing_outside_its_tunnel(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)  # x = {1, 3}, y = {2}
    m = {i: machines(lab)[vm.mac(lab, i)] for i in (1, 2, 3)}
    # through the tunnel: its own domain yes, the other domain and the VPN provider no
    assert vm.probe(lab, 1, vm.echo_url(m[3]["address"])).body.strip() == m[1]["address"]
    assert not vm.probe(lab, 1, vm.echo_url(m[2]["address"]), timeout=1.5).ok
    assert not vm.probe(lab, 1, vm.echo_url(ENDPOINT), timeout=1.5).ok
    # past the tunnel, on the bridge with its hub address: nothing at all
    under = m[1]["underlay"]
    hub_gw = "10.250.0.1"
    vm.run(lab, 1, ["ip", "route", "add", "198.51.100.0/24", "via", hub_gw, "dev", "eth0"])
    vm.run(lab, 1, ["ip", "route", "add", "203.0.113.0/24", "via", hub_gw, "dev", "eth0"])
    for target in (
        topology.WAN_GATEWAY,
        ENDPOINT,
        "203.0.113.10",
        m[2]["underlay"],
        m[3]["underlay"],
    ):
        assert not vm.probe(lab, 1, vm.echo_url(target), source=under, timeout=1.5).ok, target
    # another domain's VM straight on the bridge, no router involved
    vm.run(lab, 1, ["ip", "route", "add", f"{m[2]['address']}/32", "dev", "eth0"])
    vm.run(
        lab, 1, ["ip", "neigh", "replace", m[2]["address"], "lladdr", vm.mac(lab, 2), "dev", "eth0"]
    )
    assert not vm.probe(lab, 1, vm.echo_url(m[2]["address"]), source=under, timeout=1.5).ok


def test_anti_spoofing_holds_inside_the_tunnels(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)
    m = {i: machines(lab)[vm.mac(lab, i)] for i in (1, 3)}
    for forged in (m[3]["address"], "10.10.0.250"):
        vm.run(lab, 1, ["ip", "addr", "add", f"{forged}/32", "dev", "wg0"])
        assert not vm.probe(lab, 1, vm.echo_url(), source=forged, timeout=1.5).ok, forged
        vm.run(lab, 1, ["ip", "addr", "del", f"{forged}/32", "dev", "wg0"])
    assert vm.whoami(lab, 1) == ENDPOINT
    assert vm.whoami(lab, 3) == ENDPOINT


def test_hub_peers_follow_machines_and_wg_export(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    exported = {i: uplink.export(lab, vm.mac(lab, i)) for i in (1, 2)}
    assert hub_peers(lab) == {e["public_key"]: (f"{e['address']}/32",) for e in exported.values()}
    conf = exported[1]["config"]
    assert "[Interface]\nPrivateKey = " in conf and f"Address = {exported[1]['address']}/32" in conf
    assert "Endpoint = 10.250.0.1:51821" in conf and "AllowedIPs = 0.0.0.0/0" in conf
    key = lab.state_dir / "keys" / "machines" / (vm.mac(lab, 1).replace(":", "-") + ".key")
    assert key.stat().st_mode & 0o777 == 0o600
    assert "PrivateKey" not in lab.controller_log.read_text()  # never logged
    # a third VM comes: it gets a peer; it goes: its peer goes too
    i = build.add_vm(lab)
    mac = vm.mac(lab, i)
    wait_for(lambda: machines(lab).get(mac, {}).get("state") == "admitted", what="vm3 admitted")
    uplink.join_hub(lab, i, mac)
    assert vm.whoami(lab, i) == ENDPOINT
    third = uplink.export(lab, mac)
    assert hub_peers(lab)[third["public_key"]] == (f"{third['address']}/32",)
    build.remove_vm(lab, i)
    wait_for(lambda: third["public_key"] not in hub_peers(lab), what="vm3's peer removed")
    assert machines(lab)[mac]["state"] == "absent"
    # bad names: exit 2 with one line
    for name in ("nosuchvm", "q1.quarantine.internal"):
        r = netns.run(
            lab.dom0_ns,
            [PY, "-m", "controller.cli", "wg", "export", name, "--state", str(lab.state_dir)],
            check=False,
            env=processes.python_env(),
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_uplink_routing_is_policy_routing(make_lab: Any) -> None:
    """wg-quick's Table=auto: dom0's own rules and routes, recognisable."""
    lab = make_lab(1, controller=True)
    rules = netns.run(lab.dom0_ns, ["ip", "rule"]).stdout
    assert "lookup main suppress_prefixlength 0 proto 100" in rules
    assert "not from all fwmark 0xca6c lookup 51820 proto 100" in rules
    table = netns.run(lab.dom0_ns, ["ip", "route", "show", "table", "51820"]).stdout
    assert "default dev wg0 proto 100" in table
    assert "unreachable default proto 100 metric 4096" in table
    ks = netns.run(lab.dom0_ns, ["nft", "list", "table", "inet", "dom0_wan"]).stdout
    assert f"meta mark 0x0000ca6c ip daddr {ENDPOINT} udp dport 51820 accept" in ks
