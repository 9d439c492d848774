"""All egress through WireGuard, in the lab: the uplink to the lab's VPN
provider, the hub for the VMs, and the kill switch. The VMs of the default
lab policy live in hub domains and joined the hub with `dom0 wg export`.

Leaks are looked for on the "internet" side of dom0's WAN link: a capture
there (controller/lab/capture.py) sorts every packet dom0 sends by content.
WireGuard messages (types 1-4, each with its size) in UDP to the VPN
endpoint are the tunnel, ARP is the link's own; anything else is a leak,
whatever its port. An empty capture counts only because captures
demonstrably work: each sees its own canaries, and the controls here see the
same traffic leave once the protection is removed, including a datagram to
the endpoint's own port that is not WireGuard.

A negative probe passes only on a clean block (controller/lab/expect.py):
a timeout where dom0 drops; for dom0's own traffic its output chain's EPERM
or its uplink's unreachable route; for the VMs' egress with the tunnel gone,
that route's ICMP unreachable (or silence, when ICMP errors are rate-limited).
Each family has its control in this module: cross-domain in the tunnels
(`reach`), past the tunnel on the bridge and forged sources inside the
tunnels (dom0's tables, and for the latter the hub's allowed IPs, removed),
leaks (the kill switch removed). Reloads are waited for by their outcome and
the status generation, never for a fixed time."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6

from common.wireguard import keys, uapi
from common.wireguard.userspace import SOCKET_DIR
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
from controller.lab.capture import (
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    Capture,
    Packet,
    WanTraffic,
    classify_wan,
    udp_of,
    wan_verdict,
    wireguard_message,
)
from controller.lab.expect import OWN_OUTPUT, assert_blocked, assert_reached
from controller.lab.probe import ProbeResult, ping, probe_http
from controller.lab.rundir import Lab, LabError
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ENDPOINT = topology.VPN_WAN  # 198.51.100.3, also what the echo must see
TUNNEL = (ENDPOINT, uplink.SERVER_PORT)
PY = sys.executable
# The VMs' egress with dom0's tunnel gone: the uplink table's unreachable
# default answers with an ICMP unreachable (silence if dom0 rate-limits it).
NO_UPLINK = ("unreachable", "timeout")


@contextmanager
def wan(lab: Lab, tag: str) -> Iterator[WanTraffic]:
    """Everything on dom0's WAN link while the block runs, sorted on exit."""
    got = WanTraffic()
    cap = Capture(lab, lab.wan_ns, topology.WAN_PORT_DOM0, tag=tag).start()
    try:
        yield got
    finally:
        sorted_ = classify_wan(cap.stop(), TUNNEL)
        for f in dataclasses.fields(WanTraffic):
            setattr(got, f.name, getattr(sorted_, f.name))


def leaked_udp(seen: WanTraffic) -> set[tuple[str, int, bytes]]:
    return {u for p in seen.leaks if (u := udp_of(p)) is not None}


def leaked_from(seen: WanTraffic, source: str) -> set[str]:
    """Destinations of the leaked IP packets from source."""
    return {a[1] for p in seen.leaks if (a := p.addresses()) is not None and a[0] == source}


SEND_UDP = """
import json, socket, sys
out = []
for host, port, data in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(bytes.fromhex(data), (host, port))
        out.append("sent")
    except OSError as e:
        out.append(e.strerror)
print(json.dumps(out))
"""


def send_udp(lab: Lab, datagrams: list[tuple[str, int, bytes]]) -> list[str]:
    """Send each datagram from dom0 (an ordinary socket, no fwmark): "sent",
    or the error sendto raised. The sender itself must run."""
    arg = json.dumps([[h, p, d.hex()] for h, p, d in datagrams])
    return list(json.loads(netns.run(lab.dom0_ns, [PY, "-c", SEND_UDP, arg]).stdout))


def must_run(result: ProbeResult) -> ProbeResult:
    """A probe sent only to make traffic: whatever its answer, it must have run."""
    if result.kind == "error":
        raise LabError(f"probe could not run: {result.describe()}")
    return result


def traffic(lab: Lab, vms: list[int]) -> dict[str, ProbeResult]:
    """A burst of everything that might try to leave: dom0's own traffic
    (TCP, ICMP, UDP; to the echo, the WAN gateway, the VPN provider) and the
    VMs' (through their tunnels). Returns the echo probes' results."""
    out = {"dom0 echo": must_run(probe_http(lab.dom0_ns, vm.echo_url(), timeout=1.5))}
    for target in (topology.ECHO_ADDRESS, topology.WAN_GATEWAY, ENDPOINT):
        must_run(ping(lab.dom0_ns, target))
    send_udp(lab, [(ENDPOINT, 9, b"leak?"), ("203.0.113.10", 53, b"leak?"), (*TUNNEL, b"leak?")])
    for i in vms:
        out[f"vm{i} echo"] = must_run(vm.probe(lab, i, vm.echo_url(), timeout=1.5))
    return out


def seen_by_echo(got: dict[str, ProbeResult]) -> dict[str, str]:
    """What the echo saw as each prober's address (every probe must be answered)."""
    return {k: assert_reached(r).body.strip() for k, r in got.items()}


def all_through_the_tunnel(got: dict[str, ProbeResult]) -> None:
    __tracebackhide__ = True
    assert seen_by_echo(got) == dict.fromkeys(got, ENDPOINT)


def nothing_reached_the_echo(got: dict[str, ProbeResult]) -> None:
    """With the tunnel gone: dom0's own probe stopped at routing by the
    uplink's unreachable default, the VMs' by the same route (forwarded)."""
    __tracebackhide__ = True
    assert_blocked(got["dom0 echo"], allow=("unreachable",))
    vms = [r for k, r in got.items() if k != "dom0 echo"]
    if vms:
        assert_blocked(*vms, allow=NO_UPLINK)


def hub_peers(lab: Lab) -> dict[str, tuple[str, ...]]:
    """The hub device's peers, read with dom0's own driver inside NAME-dom0."""
    code = (
        "import json, sys, base64\n"
        "from pathlib import Path\n"
        "from common.wireguard.userspace import UserspaceWireGuard\n"
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


def drop_tables(lab: Lab, *tables: str) -> None:
    """Controls: the controller stopped (nothing repairs) and dom0's tables deleted."""
    controllerproc.stop(lab)
    for table in tables:
        netns.run(lab.dom0_ns, ["nft", "delete", "table", *table.split()])


DOM0_TABLES = ("bridge dom0", "inet dom0")
KILL_SWITCH = "inet dom0_wan"


def with_reach(policy: str, domain: str, reach: str) -> str:
    head = f"[domains.{domain}]\n"
    assert head in policy
    return policy.replace(head, f'{head}reach = ["{reach}"]\n', 1)


# ---- the classifier --------------------------------------------------------------------------


def _packet(layer: Any) -> Packet:
    proto = ETH_P_IPV6 if isinstance(layer, IPv6) else ETH_P_IP
    return Packet(False, proto, "02:00:00:00:00:01", bytes(layer))


def test_wan_verdicts_by_wireguard_message_type_not_by_port() -> None:
    """No lab: the classifier's rules on hand-made packets."""
    to_tunnel = IP(src=topology.DOM0_WAN, dst=ENDPOINT) / UDP(sport=40000, dport=TUNNEL[1])
    good = {
        1: b"\x01\0\0\0" + bytes(144),
        2: b"\x02\0\0\0" + bytes(88),
        3: b"\x03\0\0\0" + bytes(60),
        4: b"\x04\0\0\0" + bytes(28),  # a keepalive: header and tag only
    }
    for kind, payload in good.items():
        assert wireguard_message(payload) == kind
        assert wan_verdict(_packet(to_tunnel / payload), TUNNEL) == f"wireguard-{kind}"
    assert wan_verdict(_packet(to_tunnel / (b"\x04\0\0\0" + bytes(1404))), TUNNEL) == (
        "wireguard-4"
    )
    not_wireguard = [
        b"leak?",
        b"\x01\0\0\0" + bytes(145),  # initiation, one byte too many
        b"\x02\0\0\0" + bytes(60),  # response of a cookie's size
        b"\x04\0\0\0" + bytes(29),  # transport, not a multiple of 16
        b"\x04\0\0\0" + bytes(12),  # transport, shorter than header and tag
        b"\x04\x01\0\0" + bytes(28),  # reserved bytes not zero
        b"\x05\0\0\0" + bytes(28),
        b"",
    ]
    for payload in not_wireguard:
        assert wan_verdict(_packet(to_tunnel / payload), TUNNEL) == "leak", payload
    keepalive = good[4]
    elsewhere = [
        IP(dst=ENDPOINT) / UDP(dport=TUNNEL[1] + 1) / keepalive,  # another port
        IP(dst=topology.WAN_GATEWAY) / UDP(dport=TUNNEL[1]) / keepalive,  # another host
        IP(dst=ENDPOINT, flags="MF") / UDP(dport=TUNNEL[1]) / keepalive,  # a fragment
        IP(dst=ENDPOINT) / ICMP(type=3, code=3) / bytes(to_tunnel / keepalive),  # ICMP quoting it
        IPv6(dst="2001:db8::3") / UDP(dport=TUNNEL[1]) / keepalive,
    ]
    for layer in elsewhere:
        assert wan_verdict(_packet(layer), TUNNEL) == "leak", layer.summary()
    arp = Packet(False, ETH_P_ARP, "02:00:00:00:00:01", bytes(28))
    assert wan_verdict(arp, TUNNEL) == "arp"
    sorted_ = classify_wan(
        [_packet(to_tunnel / keepalive), _packet(to_tunnel / b"leak?"), arp,
         dataclasses.replace(_packet(to_tunnel / b"in"), outgoing=True)],
        TUNNEL,
    )  # fmt: skip
    assert (sorted_.wireguard[4], len(sorted_.leaks), sorted_.arp, sorted_.inbound) == (1, 1, 1, 1)


def test_control_a_datagram_to_the_tunnel_port_that_is_not_wireguard_is_a_leak(
    make_lab: Any,
) -> None:
    """dom0 sends UDP to the endpoint's own port, some of it not WireGuard by
    its form. With the kill switch none of it leaves (the socket carries no
    fwmark); with the kill switch table deleted (controller stopped) it all
    leaves, and the classifier counts exactly the non-WireGuard datagrams as
    leaks. One that has a WireGuard message's form is counted as tunnel: the
    classifier judges by form; what stops a forged one is the kill switch."""
    lab = make_lab(1, controller=True)
    odd = [
        b"leak?",
        b"\x01\0\0\0" + bytes(100),
        b"\x04\0\0\0" + bytes(29),
        b"\x04\x01\0\0" + bytes(28),
    ]
    shaped = b"\x04\0\0\0" + bytes(28)
    datagrams = [(*TUNNEL, d) for d in [*odd, shaped]]
    with wan(lab, "to-port") as seen:
        assert send_udp(lab, datagrams) == ["Operation not permitted"] * len(datagrams)
        assert vm.whoami(lab, 1) == ENDPOINT  # meanwhile the tunnel carries the VM
    assert not seen.leaks, seen.describe_leaks()
    assert seen.wireguard[4], "the capture saw no tunnel traffic"
    drop_tables(lab, KILL_SWITCH)
    with wan(lab, "to-port-control") as seen:
        assert send_udp(lab, datagrams) == ["sent"] * len(datagrams)
    assert leaked_udp(seen) == {(*TUNNEL, d) for d in odd}, seen.describe_leaks()
    assert (*TUNNEL, shaped) in [udp_of(p) for p in seen.tunnel]


# ---- egress only through the tunnel --------------------------------------------------------


def test_vms_and_dom0_leave_only_through_the_tunnel(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    with wan(lab, "normal") as seen:
        got = traffic(lab, [1, 2])
    all_through_the_tunnel(got)
    assert seen.wireguard[4], "the tunnel carried nothing: is the capture on the right link?"
    assert not seen.leaks, seen.describe_leaks()
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
    with wan(lab, "wg0-down") as seen:
        got = traffic(lab, [1, 2])
    assert not seen.leaks, seen.describe_leaks()
    nothing_reached_the_echo(got)
    # wireguard-go killed: the interface goes with it
    pid = wireguard_pid(lab, "wg0")
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_for(lambda: netns.run(lab.dom0_ns, ["ip", "link", "show", "wg0"], check=False).returncode,
             what="wg0 gone with its daemon")  # fmt: skip
    with wan(lab, "wg-killed") as seen:
        got = traffic(lab, [1, 2])
    assert not seen.leaks, seen.describe_leaks()
    nothing_reached_the_echo(got)
    # the controller comes back, restarts wireguard-go, and traffic flows again
    controllerproc.start(lab)
    wait_for(lambda: vm.probe(lab, 1, vm.echo_url(), timeout=1.5).ok, what="the tunnel back")
    all_through_the_tunnel(traffic(lab, [1]))
    # with the controller running, a killed daemon is repaired at once, leak-free
    with wan(lab, "wg-killed-live") as seen:
        subprocess.run(["kill", "-9", str(wireguard_pid(lab, "wg0"))], check=True)
        traffic(lab, [1, 2])  # (answered or not, while it is repaired: only leaks count)
        wait_for(
            lambda: vm.probe(lab, 2, vm.echo_url(), timeout=1.5).ok, what="the tunnel repaired"
        )
    assert not seen.leaks, seen.describe_leaks()
    assert seen.wireguard[4], "the capture saw no tunnel traffic"
    # control: without the kill switch and the uplink's rule, the same traffic
    # leaks and the capture sees it, so the empty captures above mean something.
    # (With the rule but wg0 down, the uplink table's unreachable default stops
    # dom0's own traffic at routing already: a second line of defence.)
    controllerproc.stop(lab)
    netns.run(lab.dom0_ns, ["ip", "link", "set", "wg0", "down"])
    assert_blocked(probe_http(lab.dom0_ns, vm.echo_url(), timeout=1.5), allow=("unreachable",))
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "inet", "dom0_wan"])
    netns.run(lab.dom0_ns, ["ip", "rule", "del", "priority", "32761"])
    with wan(lab, "control") as seen:
        got = traffic(lab, [1])
    assert seen_by_echo({"dom0": got["dom0 echo"]}) == {"dom0": topology.DOM0_WAN}
    assert leaked_from(seen, topology.DOM0_WAN) >= {
        topology.ECHO_ADDRESS, topology.WAN_GATEWAY, ENDPOINT
    }, seen.describe_leaks()  # fmt: skip
    assert (*TUNNEL, b"leak?") in leaked_udp(seen)  # not WireGuard, to the tunnel's port


def test_kill_switch_holds_across_sigkill_reloads_and_restart(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    with wan(lab, "lifecycle") as seen:
        controllerproc.kill(lab)  # SIGKILL: the data plane, tunnels included, stays
        all_through_the_tunnel(traffic(lab, [1, 2]))
        controllerproc.start(lab)
        assert controllerproc.reply(lab)["stats"]["rebuilds"] == 0
        base = lab.policy_path.read_text()
        for n in range(4):  # reloads: a changed lease time, a new domain, and back
            text = base.replace('lease_time = "10m"', f'lease_time = "{11 + n}m"')
            if n % 2:
                text += '\n[domains.z]\npool = "10.30.0.0/24"\ninternet = true\n'
            assert controllerproc.reload(lab, text) == "applying"  # SIGHUP, applied
            all_through_the_tunnel(traffic(lab, [1, 2]))
        controllerproc.restart(lab)
        all_through_the_tunnel(traffic(lab, [2]))
    assert not seen.leaks, seen.describe_leaks()
    assert seen.wireguard[4], "the capture saw no tunnel traffic"


V6_OUT = "2001:db8:ff::1"  # the "internet" side of dom0's WAN, given IPv6 by this test
V6_VM = "2001:db8:1::5"


def test_ipv6_does_not_leak(make_lab: Any) -> None:
    lab = make_lab(1, controller=True)
    # give dom0 and the VM everything IPv6 would need to leave
    netns.ip_batch(["addr add 2001:db8:ff::2/64 dev wan nodad",
                    "route add ::/0 via 2001:db8:ff::1 dev wan"], lab.dom0_ns)  # fmt: skip
    netns.ip_batch([f"addr add {V6_OUT}/64 dev inet0 nodad"], lab.wan_ns)
    vm.run(lab, 1, ["ip", "-6", "addr", "add", f"{V6_VM}/64", "dev", "eth0", "nodad"])
    vm.run(lab, 1, ["ip", "-6", "route", "add", "default", "dev", "eth0"])
    # (a neighbour entry for it, so that the VM's packets themselves are sent
    # to dom0: else neighbour discovery, dropped at the bridge, fails first)
    vm.run(lab, 1, ["ip", "-6", "neigh", "replace", V6_OUT, "lladdr", topology.BRIDGE_MAC,
                    "dev", "eth0", "nud", "permanent"])  # fmt: skip
    url = f"http://[{V6_OUT}]/"
    with wan(lab, "ipv6") as seen:
        own = [ping(lab.dom0_ns, V6_OUT), probe_http(lab.dom0_ns, url, timeout=1)]
        vms = [ping(lab.vm_ns(1), V6_OUT), probe_http(lab.vm_ns(1), url, timeout=1)]
    assert not seen.leaks, seen.describe_leaks()
    assert_blocked(*own, allow=OWN_OUTPUT)  # the kill switch, at dom0's own output
    assert_blocked(*vms)  # dropped at dom0's bridge
    # control: without the kill switch dom0's IPv6 leaves (seen) and is answered
    controllerproc.stop(lab)
    netns.run(lab.dom0_ns, ["nft", "delete", "table", "inet", "dom0_wan"])
    with wan(lab, "ipv6-control") as seen:
        assert_reached(ping(lab.dom0_ns, V6_OUT))
    assert V6_OUT in leaked_from(seen, "2001:db8:ff::2"), seen.describe_leaks()
    # and the VM's, once dom0's tables are gone too, IPv6 forwarded and routed back
    drop_tables(lab, *DOM0_TABLES)
    netns.sysctl(lab.dom0_ns, {"net.ipv6.conf.all.forwarding": 1})
    netns.ip_batch(["route add 2001:db8:1::/64 dev virbr0"], lab.dom0_ns)
    netns.ip_batch(["route add 2001:db8:1::/64 via 2001:db8:ff::2 dev inet0"], lab.wan_ns)
    with wan(lab, "ipv6-vm-control") as seen:
        assert_reached(ping(lab.vm_ns(1), V6_OUT))
    assert V6_OUT in leaked_from(seen, V6_VM), seen.describe_leaks()


# ---- inside and past the tunnels -----------------------------------------------------------


def test_a_vm_reaches_nothing_outside_its_tunnel(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)  # x = {1, 3}, y = {2}
    m = {i: machines(lab)[vm.mac(lab, i)] for i in (1, 2, 3)}

    def probe(i: int, target: str, **kw: Any) -> ProbeResult:
        return vm.probe(lab, i, vm.echo_url(target), timeout=1.5, **kw)

    # through the tunnel: its own domain yes, the other domain and the VPN provider no
    assert assert_reached(probe(1, m[3]["address"])).body.strip() == m[1]["address"]
    assert_blocked(probe(1, m[2]["address"]), probe(1, ENDPOINT))
    # past the tunnel, on the bridge with its hub address: nothing at all
    under = m[1]["underlay"]
    hub_gw = "10.250.0.1"
    vm.run(lab, 1, ["ip", "route", "add", "198.51.100.0/24", "via", hub_gw, "dev", "eth0"])
    vm.run(lab, 1, ["ip", "route", "add", "203.0.113.0/24", "via", hub_gw, "dev", "eth0"])
    wan_targets = (topology.WAN_GATEWAY, ENDPOINT, topology.ECHO_ADDRESS)
    bridge_targets = (m[2]["underlay"], m[3]["underlay"])
    assert_blocked(*(probe(1, t, source=under) for t in (*wan_targets, *bridge_targets)))
    # another domain's VM straight on the bridge, no router involved
    direct = ["ip", "route", "add", f"{m[2]['address']}/32", "dev", "eth0"]
    vm.run(lab, 1, direct)
    vm.run(
        lab, 1, ["ip", "neigh", "replace", m[2]["address"], "lladdr", vm.mac(lab, 2), "dev", "eth0"]
    )
    assert_blocked(probe(1, m[2]["address"], source=under))
    # control, in the tunnels: with reach = ["y"] for x the same probe from
    # vm1 goes through (y still does not reach x)
    vm.run(lab, 1, ["ip", "route", "del", f"{m[2]['address']}/32"])
    policy = with_reach(lab.policy_path.read_text(), "x", "y")
    assert controllerproc.reload(lab, policy) == "applying"
    assert assert_reached(probe(1, m[2]["address"])).body.strip() == m[1]["address"]
    assert_blocked(probe(2, m[1]["address"]))
    # control, past the tunnels: with dom0's tables and the kill switch gone,
    # the same probes from the hub address reach the VMs on the bridge, and
    # those to the WAN leave it (unanswered: the lab's internet has no route
    # back to a private address, as the real one would not)
    drop_tables(lab, *DOM0_TABLES, KILL_SWITCH)
    for t in bridge_targets:
        assert assert_reached(probe(1, t, source=under)).body.strip() == under
    vm.run(lab, 1, direct)
    assert assert_reached(probe(1, m[2]["address"], source=under)).body.strip() == under
    # (the echo's address is not on the WAN's link: without dom0's tables the
    # uplink's routing takes it into wg0, where the VPN provider drops it)
    on_the_link = wan_targets[:2]
    with wan(lab, "past-the-tunnel") as seen:
        for t in on_the_link:
            assert_blocked(probe(1, t, source=under))
    assert leaked_from(seen, under) >= set(on_the_link), seen.describe_leaks()
    # and through the tunnel, to the VPN provider itself (the route past it gone)
    vm.run(lab, 1, ["ip", "route", "del", "198.51.100.0/24"])
    with wan(lab, "tunnel-to-endpoint") as seen:
        assert_blocked(probe(1, ENDPOINT))
    assert ENDPOINT in leaked_from(seen, m[1]["address"]), seen.describe_leaks()


def test_anti_spoofing_holds_inside_the_tunnels(make_lab: Any) -> None:
    lab = make_lab(3, controller=True)
    m = {i: machines(lab)[vm.mac(lab, i)] for i in (1, 3)}
    spare = "10.10.0.250"
    for forged in (m[3]["address"], spare):
        vm.run(lab, 1, ["ip", "addr", "add", f"{forged}/32", "dev", "wg0"])
        assert_blocked(vm.probe(lab, 1, vm.echo_url(), source=forged, timeout=1.5))
        if forged != m[3]["address"]:  # (vm1 holding vm3's address would talk to itself)
            target = vm.echo_url(m[3]["address"])
            assert_blocked(vm.probe(lab, 1, target, source=forged, timeout=1.5))
        vm.run(lab, 1, ["ip", "addr", "del", f"{forged}/32", "dev", "wg0"])
    # the owner of the forged address gets through, and so does vm1 as itself
    assert vm.whoami(lab, 1) == ENDPOINT
    assert vm.whoami(lab, 3) == ENDPOINT
    # control: with the hub's cryptokey routing widened (vm1's peer may send
    # from the spare address) and dom0's tables gone, the same forged probe to
    # vm3 goes through and is seen with the forged source
    key = keys.from_base64(uplink.export(lab, vm.mac(lab, 1))["public_key"])
    drop_tables(lab, *DOM0_TABLES)
    sock = f"/proc/{wireguard_pid(lab, 'hub0')}/root{SOCKET_DIR}/hub0.sock"
    request = f"set=1\npublic_key={key.hex()}\nupdate_only=true\nallowed_ip={spare}/32\n\n"
    uapi.check_errno(uapi.transact(sock, request.encode(), timeout=5), "widen vm1's allowed IPs")
    vm.run(lab, 1, ["ip", "addr", "add", f"{spare}/32", "dev", "wg0"])
    target = vm.echo_url(m[3]["address"])
    reached = assert_reached(vm.probe(lab, 1, target, source=spare, timeout=1.5))
    assert reached.body.strip() == spare


def peer_ips(lab: Lab, address: str) -> tuple[str, ...]:
    """A hub machine's allowed IPs: its address, and its containers' block."""
    from ipaddress import ip_address

    from controller.policy.load import load_policy

    for d in load_policy(lab.policy_path).domains.values():
        if ip_address(address) in d.pool:
            block = d.delegated(address)
            return (f"{address}/32",) + (() if block is None else (str(block),))
    raise AssertionError(f"{address} is in no domain's pool")


def test_hub_peers_follow_machines_and_wg_export(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)
    exported = {i: uplink.export(lab, vm.mac(lab, i)) for i in (1, 2)}
    assert hub_peers(lab) == {
        e["public_key"]: peer_ips(lab, e["address"]) for e in exported.values()
    }
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
    assert hub_peers(lab)[third["public_key"]] == peer_ips(lab, third["address"])
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
