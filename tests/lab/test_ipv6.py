"""IPv6 in a domain, against real packets (tests/data/policies/ipv6-lab.toml:
domains x (vm1, vm3) and y (vm2) on the bridge, each with a ULA /64).

Each VM runs dhcpcd -6 (controller/lab/dhcp6client.py): dom0's router
advertisement says "managed, not on-link", so its only global address is its
DHCPv6 reservation and all its IPv6 goes through dom0.

- vm1 reaches vm3 (same domain) over IPv6; vm1 does not reach vm2 (another
  domain): a clean block; the control: with `reach = ["y"]` it does;
- x's allow entry (y on tcp/443) holds for IPv6 too: tcp/443 passes, tcp/8443
  does not;
- a forged IPv6 source (vm1 as vm3) gets nothing through: dom0's answer to
  it never reaches anyone; the control: vm1 as itself is answered;
- a router advertisement from a VM reaches no other VM; the control: the
  same frame from dom0's side of the bridge does;
- the uplink carries IPv6: x (internet) reaches the lab internet's IPv6
  host through it, y (no internet) does not;
- nothing IPv6 leaves dom0's WAN outside the tunnel meanwhile (the lab's WAN
  capture; its controls, with the protection removed, are in
  test_wireguard_lab.py).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.lab import (
    controllerproc,
    dhcp6client,
    forge,
    ports,
    probe,
    topology,
    uplink,
    vm,
)
from controller.lab.capture import Capture, classify_wan
from controller.lab.forge import Sniffer
from controller.lab.rundir import Lab
from controller.policy.load import load_policy
from controller.store import Store

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "tests" / "data" / "policies" / "ipv6-lab.toml"
X1, Y1, X2 = 1, 2, 3  # vm1, vm3 in x; vm2 in y
ALL_NODES = "33:33:00:00:00:01"


@pytest.fixture(scope="module")
def v6lab() -> Any:
    from tests.lab.conftest import _need_root, unique_lab_name

    _need_root()
    from controller.lab import build, teardown

    name = unique_lab_name()
    servers: list[ports.Server] = []
    try:
        lab = build.create(name, 3, policy=POLICY)
        for i in (X1, Y1, X2):
            dhcp6client.start(lab, i)
        for i, address in addresses6(lab).items():
            dhcp6client.wait_address(lab, i, address)
        servers.append(ports.serve(lab.vm_ns(Y1), (443, 8443), bind="::"))
        yield lab
    finally:
        for s in servers:
            s.stop()
        teardown.down(name)
        assert not teardown.exists(name), f"lab {name} not fully torn down"


def addresses6(lab: Lab) -> dict[int, str]:
    """vm -> the IPv6 address its reservation names (from the controller's store)."""
    policy = load_policy(lab.policy_path)
    store = Store(lab.state_dir, readonly=True)
    try:
        by_mac = {a.mac: a for a in store.allocations()}
    finally:
        store.close()
    out = {}
    for i in (X1, Y1, X2):
        a = by_mac[vm.mac(lab, i)]
        address = policy.domains[a.domain].address6(a.address)
        assert address is not None
        out[i] = address
    return out


def gateway6(lab: Lab, domain: str) -> str:
    return str(load_policy(lab.policy_path).domains[domain].gateway6)


@contextlib.contextmanager
def sniffing(lab: Lab, marker: bytes, where: dict[str, str]) -> Iterator[dict[str, Any]]:
    running = {
        k: Sniffer(lab, ns, marker, f"{k}-{secrets.token_hex(2)}") for k, ns in where.items()
    }
    got: dict[str, Any] = {}
    try:
        for s in running.values():
            s.start()
        yield got
    finally:
        for k, s in running.items():
            got[k] = s.stop() if s.proc is not None else forge.Sniffed()


def echo(src_mac: str, src: str, dst: str, marker: bytes) -> bytes:
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=src_mac, dst=topology.BRIDGE_MAC)
        / IPv6(src=src, dst=dst)
        / ICMPv6EchoRequest(id=0x6D6D, seq=1, data=marker)
    )


def router_advert(src_mac: str, marker: bytes) -> bytes:
    from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6NDOptPrefixInfo, IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    ll = "fe80::" + src_mac.replace(":", "")[-4:]
    return bytes(
        Ether(src=src_mac, dst=ALL_NODES)
        / IPv6(src=ll, dst="ff02::1", hlim=255)
        / ICMPv6ND_RA(routerlifetime=1800, prf=1)
        / ICMPv6NDOptPrefixInfo(prefix="fd66:6:6:6::", prefixlen=64, L=1, A=1)
        / Raw(marker)
    )


def test_members_reach_each_other_over_ipv6_and_another_domain_does_not(v6lab: Lab) -> None:
    ip = addresses6(v6lab)
    same = probe.ping(v6lab.vm_ns(X1), ip[X2], timeout=2)
    other = probe.ping(v6lab.vm_ns(X1), ip[Y1], timeout=2)
    back = probe.ping(v6lab.vm_ns(Y1), ip[X1], timeout=2)
    assert same.ok, same.describe()
    for r in (other, back):
        assert not r.ok and r.kind == "timeout", r.describe()


def test_an_allow_entry_holds_for_ipv6(v6lab: Lab) -> None:
    ip = addresses6(v6lab)
    https, other = ports.probe(
        v6lab.vm_ns(X1), [f"[{ip[Y1]}]:tcp/443", f"[{ip[Y1]}]:tcp/8443"], timeout=2
    )
    assert https.ok, https.describe()
    assert not other.ok and other.kind == "timeout", other.describe()


def test_a_forged_ipv6_source_gets_nothing_through(v6lab: Lab) -> None:
    """vm1 pings dom0's gateway in x as vm3: dom0 never answers vm3 (nor
    vm1); control: as itself, vm1 is answered."""
    lab = v6lab
    ip = addresses6(lab)
    gw = gateway6(lab, "x")
    forged, own = forge.new_marker("v6forged"), forge.new_marker("v6own")
    # (not sniffed in dom0: a packet socket there sees the port's frames before the bridge)
    where = {"vm1": lab.vm_ns(X1), "vm3": lab.vm_ns(X2)}
    with sniffing(lab, forged, where) as got:
        forge.send(lab, lab.vm_ns(X1), [echo(vm.mac(lab, X1), ip[X2], gw, forged)] * 3, tag="v6f")
    assert got["vm3"].total == 0 and got["vm1"].total == 0, (
        got["vm3"].describe(),
        got["vm1"].describe(),
    )
    with sniffing(lab, own, {"vm1": lab.vm_ns(X1)}) as ctl:
        forge.send(lab, lab.vm_ns(X1), [echo(vm.mac(lab, X1), ip[X1], gw, own)] * 3, tag="v6o")
    # (the sniffer ignores vm1's own outgoing copies: what it saw is dom0's echo reply)
    assert ctl["vm1"].total > 0, "control: dom0 did not answer vm1's own ping"


def neighbour_solicitation(src_mac: str, src: str, lladdr: str, target: str) -> bytes:
    from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
    from scapy.layers.l2 import Ether

    return bytes(
        Ether(src=src_mac, dst=topology.BRIDGE_MAC)
        / IPv6(src=src, dst=target, hlim=255)
        / ICMPv6ND_NS(tgt=target)
        / ICMPv6NDOptSrcLLAddr(lladdr=lladdr)
    )


def neighbour(lab: Lab, address: str) -> str | None:
    """The MAC dom0's neighbour cache holds for address on the bridge, if any."""
    from controller.lab import netns

    out = netns.run(lab.dom0_ns, ["ip", "-6", "neigh", "show", address, "dev", topology.BRIDGE])
    words = out.stdout.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else None


def test_a_solicitation_naming_another_machines_mac_teaches_dom0_nothing(v6lab: Lab) -> None:
    """vm1 solicits dom0 from a link-local address of its own but names vm3's
    MAC in its source link-layer option: dom0's neighbour cache must not
    learn it (it would send vm1's traffic to vm3); the control: naming its
    own MAC, it does learn that."""
    lab = v6lab
    gw = "fe80::fc54:ff:fed0:fffe"  # dom0's link-local on the bridge (EUI-64 of its MAC)
    mac1, mac3 = vm.mac(lab, X1), vm.mac(lab, X2)
    forged_src, own_src = "fe80::d0:bad:1", "fe80::d0:600d:1"
    forge.send(
        lab, lab.vm_ns(X1), [neighbour_solicitation(mac1, forged_src, mac3, gw)] * 3, tag="ns"
    )
    forge.send(lab, lab.vm_ns(X1), [neighbour_solicitation(mac1, own_src, mac1, gw)] * 3, tag="nso")
    from controller.lab.wait import wait_for

    wait_for(lambda: neighbour(lab, own_src) == mac1, 5, "dom0 to learn vm1's own solicitation")
    assert neighbour(lab, forged_src) is None


def test_a_router_advertisement_from_a_vm_reaches_no_one(v6lab: Lab) -> None:
    lab = v6lab
    marker, control = forge.new_marker("v6ra"), forge.new_marker("v6rac")
    where = {"vm2": lab.vm_ns(Y1), "vm3": lab.vm_ns(X2)}
    with sniffing(lab, marker, where) as got:
        forge.send(lab, lab.vm_ns(X1), [router_advert(vm.mac(lab, X1), marker)] * 3, tag="ra")
    assert got["vm2"].total == 0 and got["vm3"].total == 0, (
        got["vm2"].describe(),
        got["vm3"].describe(),
    )
    # control: the same advertisement from dom0's side of the bridge is delivered
    with sniffing(lab, control, where) as ctl:
        frame = router_advert(topology.BRIDGE_MAC, control)
        forge.send(lab, lab.dom0_ns, [frame] * 3, tag="rac", iface=topology.BRIDGE)
    assert ctl["vm2"].total > 0 and ctl["vm3"].total > 0, "control: dom0's RA was not seen"


def test_no_ipv6_leaves_the_wan(v6lab: Lab) -> None:
    """While the VMs renew, ping each other and try outside addresses over IPv6."""
    lab = v6lab
    ip = addresses6(lab)
    cap = Capture(lab, lab.wan_ns, topology.WAN_PORT_DOM0, tag="v6wan").start()
    try:
        for i in (X1, Y1, X2):
            dhcp6client.stop(lab, i)
            dhcp6client.start(lab, i)
        for i, address in ip.items():
            dhcp6client.wait_address(lab, i, address)
        for target in (ip[X2], ip[Y1], "fd99::1", gateway6(lab, "y")):
            probe.ping(lab.vm_ns(X1), target, timeout=1)
        out = probe.ping(lab.vm_ns(X1), topology.INTERNET6, timeout=2)
        closed = probe.ping(lab.vm_ns(Y1), topology.INTERNET6, timeout=2)
    finally:
        seen = classify_wan(cap.stop(), (topology.VPN_WAN, uplink.SERVER_PORT))
    assert not seen.leaks, seen.describe_leaks()
    # (x's ping to the internet crossed the WAN inside the tunnel: counted above as such)
    assert out.ok, out.describe()
    assert not closed.ok and closed.kind == "timeout", closed.describe()


def test_control_reach_opens_ipv6_to_the_other_domain(v6lab: Lab) -> None:
    """Last in the module: it changes the lab's policy."""
    lab = v6lab
    ip = addresses6(lab)
    text = lab.policy_path.read_text()
    opened = text.replace("[domains.x]\n", '[domains.x]\nreach = ["y"]\n', 1).replace(
        'allow = [{ to = "y", ports = ["tcp/443"] }]\n', ""
    )
    assert opened != text
    assert controllerproc.reload(lab, opened) == "applying"
    r = probe.ping(lab.vm_ns(X1), ip[Y1], timeout=2)
    assert r.ok, r.describe()
