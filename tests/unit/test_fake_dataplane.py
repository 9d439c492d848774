"""The fake data plane, from plain data: policy text -> desired state ->
`FakeDataPlane`, then behaviours asserted packet by packet. Where a test
names the rule that drops, it names it by what the rule says, never by its
position. tests/lab/test_fake_agrees.py checks these verdicts against the
kernel's."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.core.allocation import Allocation
from controller.core.desired import machine_state, policy_state
from controller.core.plan import Flat, flatten
from controller.drivers.nft import render, ruleset
from controller.drivers.nft.fake import (
    DOM0,
    Dhcp,
    Drop,
    FakeDataPlane,
    NotModelled,
    Packet,
    UnknownExpression,
)
from controller.policy.load import parse_policy
from controller.policy.model import Policy

BRIDGE_MAC = "fe:54:00:d0:ff:fe"
DOMAINS = """
[site]
tld = "internal"
[bridge]
name = "virbr0"
[wan]
interface = "wan"
[domains.x]
pool = "10.10.0.0/24"
internet = true
services = ["dns", "icmp"]
{hub}
[domains.y]
pool = "10.20.0.0/24"
internet = true
services = ["dns", "icmp"]
{hub}
[[rules]]
name = "odd"
domain = "x"
subdomain = "web{{n}}"
match.mac_mask = "52:54:00:d0:00:01/ff:ff:ff:ff:00:01"
[[rules]]
name = "even"
domain = "y"
subdomain = "db{{n}}"
match.mac_mask = "52:54:00:d0:00:00/ff:ff:ff:ff:00:01"
[quarantine]
pool = "10.99.0.0/24"
[uplink]
endpoint = "198.51.100.3:51820"
public_key = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="
addresses = ["10.200.0.2/32"]
"""
HUB = '\n[hub]\npool = "10.250.0.0/16"\n'
WAN = ("wan", "198.51.100.2/24")

# vm1, vm3: domain x; vm2, vm4: domain y; vm5: no rule (quarantined)
MAC = {i: f"52:54:00:d0:00:{i:02x}" for i in range(1, 5)} | {5: "00:16:3e:00:00:01"}
IP = {1: "10.10.0.2", 2: "10.20.0.2", 3: "10.10.0.3", 4: "10.20.0.3", 5: "10.99.0.2"}
PORT = {i: f"vnet{i}" for i in MAC}


def bridge_policy() -> Policy:
    return parse_policy(DOMAINS.format(hub="").encode(), "bridge.toml")


def allocations() -> list[Allocation]:
    rules = {1: ("odd", 1, "x"), 2: ("even", 1, "y"), 3: ("odd", 2, "x"), 4: ("even", 2, "y")}
    out = [Allocation(MAC[i], r, s, d, IP[i], PORT[i]) for i, (r, s, d) in rules.items()]
    out.append(Allocation(MAC[5], "quarantine", 1, "quarantine", IP[5], PORT[5]))
    return out


def flat_of(policy: Policy, allocs: list[Allocation]) -> Flat:
    return flatten(policy_state(policy, []), [machine_state(policy, a) for a in allocs])


@pytest.fixture(scope="module")
def fake() -> FakeDataPlane:
    flat = flat_of(bridge_policy(), allocations())
    return FakeDataPlane(
        flat.shape,  # type: ignore[arg-type]
        flat.sets,
        [*flat.addresses, WAN],
        killswitch=flat.killswitch,
        bridge_mac=BRIDGE_MAC,
    )


def rule_text(fake: FakeDataPlane, d: Drop | None) -> str:
    """The nft text of the rule that dropped (so that tests name rules by
    what they say, not by their position in a chain)."""
    assert d is not None and d.table is not None and d.rule is not None, d
    return render.rule(fake.tables[(d.family, d.table)][d.chain][1][d.rule])


def frame(i: int, dst_mac: str | None = None, **kw: object) -> Packet:
    """A frame vm i sends (to dom0's MAC unless dst_mac), from its own address."""
    kw.setdefault("src", IP[i])
    kw.setdefault("sport", 40000 + i)
    return Packet(PORT[i], MAC[i], dst_mac, **kw)  # type: ignore[arg-type]


def to_vm(i: int, j: int, **kw: object) -> Packet:
    """vm i to vm j straight on the bridge (j's MAC and address)."""
    kw.setdefault("dport", 7)
    return frame(i, MAC[j], dst=IP[j], **kw)


# -- isolation ---------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
def test_same_domain_passes_on_the_bridge(fake: FakeDataPlane, proto: str) -> None:
    for i, j in ((1, 3), (3, 1), (2, 4), (4, 2)):
        v = fake.verdict(to_vm(i, j, proto=proto))
        assert v.delivered == {PORT[j]}, v
        # bridged IPv4 crosses inet dom0 too (br_netfilter)
        assert "inet dom0 forward" in v.outcome(PORT[j]).path


def test_cross_domain_is_dropped_bridged_and_routed(fake: FakeDataPlane) -> None:
    for i, j in ((1, 2), (2, 3), (3, 4), (4, 1)):
        bridged = fake.verdict(to_vm(i, j))
        assert not bridged.passes, bridged
        assert bridged.drops[0].chain == "ports_forward"
        routed = fake.verdict(frame(i, dst=IP[j], dport=7))  # via dom0's MAC: its gateway
        assert not routed.passes, routed
        assert (routed.drops[0].table, routed.drops[0].chain) == ("dom0", "from_machines")


def test_a_forged_destination_mac_carries_nothing_into_another_domain(
    fake: FakeDataPlane,
) -> None:
    # vm3's address, vm2's MAC: the output port does not hold the address
    v = fake.verdict(frame(1, MAC[2], dst=IP[3], dport=7))
    assert v.delivered == frozenset() and v.outcomes[0].to == PORT[2]
    # vm2's address, vm3's MAC: not peers
    assert not fake.verdict(frame(1, MAC[3], dst=IP[2], dport=7)).passes
    # an unknown MAC is flooded, and dropped on every port
    v = fake.verdict(frame(1, "52:54:00:aa:bb:cc", dst=IP[3], dport=7))
    assert {o.to for o in v.outcomes} == {PORT[2], PORT[3], PORT[4], PORT[5]}
    assert not v.passes


def test_arp_reaches_only_the_port_holding_the_address(fake: FakeDataPlane) -> None:
    ask = {"ether_type": "arp", "sport": 0}
    v = fake.verdict(frame(1, "ff:ff:ff:ff:ff:ff", dst=IP[3], **ask))
    assert v.delivered == {DOM0, PORT[3]}
    v = fake.verdict(frame(1, "ff:ff:ff:ff:ff:ff", dst=IP[2], **ask))
    assert v.delivered == {DOM0}
    # a probe (from 0.0.0.0) only to dom0; a reply unicast to its peer
    probe = fake.verdict(frame(1, "ff:ff:ff:ff:ff:ff", dst=IP[3], **{**ask, "src": "0.0.0.0"}))
    assert probe.delivered == {DOM0}
    reply = fake.verdict(frame(1, MAC[3], dst=IP[3], arp_op=2, arp_tha=MAC[3], **ask))
    assert reply.delivered == {PORT[3]}


def test_broadcasts_reach_only_the_own_domain(fake: FakeDataPlane) -> None:
    v = fake.verdict(frame(1, "ff:ff:ff:ff:ff:ff", dst="255.255.255.255", dport=9999))
    assert v.delivered == frozenset()
    assert {o.to for o in v.outcomes} == {DOM0, PORT[2], PORT[3], PORT[4], PORT[5]}
    # the domain's own broadcast address: its ports only (dom0 routes it as a
    # broadcast, to its input, which has no service there)
    assert fake.route("10.10.0.255") == ("broadcast", "virbr0")
    v = fake.verdict(frame(1, "ff:ff:ff:ff:ff:ff", dst="10.10.0.255", dport=9999))
    assert v.delivered == {PORT[3]}
    assert v.outcome(DOM0).dropped is not None
    assert not fake.verdict(frame(2, "ff:ff:ff:ff:ff:ff", dst="10.10.0.255", dport=9)).passes


def test_ipv6_is_dropped_at_the_bridge(fake: FakeDataPlane) -> None:
    v = fake.verdict(
        Packet(PORT[1], MAC[1], MAC[3], ether_type="ip6", src="fe80::1", dst="fe80::3", dport=7)
    )
    assert not v.passes
    assert v.drops[0].chain == "police_source"


# -- spoofing ----------------------------------------------------------------------


def test_a_spoofed_source_address_is_dropped(fake: FakeDataPlane) -> None:
    for forged in (IP[3], "10.10.0.77", IP[2], "203.0.113.10"):
        for dst_mac, dst in ((MAC[3], IP[3]), (None, "203.0.113.10"), (None, "10.10.0.1")):
            v = fake.verdict(frame(1, dst_mac, src=forged, dst=dst, dport=53))
            assert not v.passes, (forged, dst, v)
            # (an address routed elsewhere fails inet's reverse path check first:
            # br_netfilter runs it in the bridge's prerouting, before forward/input)
            assert v.drops[0].chain == ("rpf" if forged == "203.0.113.10" else "police_source")


def test_a_spoofed_source_mac_is_dropped(fake: FakeDataPlane) -> None:
    for forged in (MAC[3], "02:00:00:00:00:99"):
        for dst_mac, dst in ((MAC[3], IP[3]), (None, "203.0.113.10"), (None, "10.10.0.1")):
            p = Packet(PORT[1], forged, dst_mac, src=IP[1], dst=dst, sport=1, dport=53)
            v = fake.verdict(p)
            assert not v.passes, (forged, dst, v)
    # ARP whose sender MAC or address is not the port's binding
    arp = {"ether_type": "arp", "dst": IP[3]}
    assert not fake.verdict(frame(1, "ff:ff:ff:ff:ff:ff", arp_sha=MAC[3], **arp)).passes
    assert not fake.verdict(frame(1, "ff:ff:ff:ff:ff:ff", **{**arp, "src": IP[3]})).passes


def test_meters_hold_under_the_limit_unless_the_packet_is_over(fake: FakeDataPlane) -> None:
    arp = frame(1, "ff:ff:ff:ff:ff:ff", ether_type="arp", dst=IP[3])
    assert fake.verdict(arp).passes
    flooded = fake.verdict(Packet(**{**_fields(arp), "over": frozenset({"flood_rate"})}))
    assert not flooded.passes
    assert flooded.drops[0].chain == "ingress"
    assert "@flood_rate" in rule_text(fake, flooded.drops[0])
    syn = frame(1, MAC[3], dst=IP[3], proto="tcp", dport=80)
    assert fake.verdict(syn).passes
    for meter in ("conns", "new_conns"):
        v = fake.verdict(Packet(**{**_fields(syn), "over": frozenset({meter})}))
        assert v.drops[0].chain == "machine_limits", meter


def _fields(p: Packet) -> dict:
    return {f: getattr(p, f) for f in Packet.__dataclass_fields__}


# -- quarantine and DHCP -------------------------------------------------------------


def dhcp(i: int, **kw: object) -> Packet:
    kw.setdefault("src", "0.0.0.0")
    kw.setdefault("dst", "255.255.255.255")
    return Packet(PORT[i], MAC[i], "ff:ff:ff:ff:ff:ff", sport=68, dport=67, **kw)  # type: ignore[arg-type]


def test_a_quarantined_machine_reaches_only_dhcp(fake: FakeDataPlane) -> None:
    assert fake.verdict(dhcp(5)).delivered == {DOM0}
    assert fake.verdict(dhcp(5, src=IP[5], dst="10.99.0.1")).delivered == {DOM0}
    for p in (
        frame(5, dst="203.0.113.10", proto="tcp", dport=80),
        frame(5, dst="10.99.0.1", dport=53),
        frame(5, dst="10.99.0.1", proto="tcp", dport=53),
        frame(5, dst="10.99.0.1", proto="icmp"),
        frame(5, dst="10.10.0.1", dport=53),
        frame(5, dst=IP[1], dport=7),
        to_vm(5, 1),
        frame(5, "ff:ff:ff:ff:ff:ff", ether_type="arp", dst=IP[1]),
    ):
        v = fake.verdict(p)
        assert v.delivered <= {DOM0} and not (v.delivered and p.ether_type == "ip"), (p, v)


def test_dhcp_about_another_mac_is_dropped(fake: FakeDataPlane) -> None:
    own = fake.verdict(dhcp(1))
    assert own.delivered == {DOM0}
    # no path but dnsmasq: the flooded copies are dropped on every port
    assert all(not o.passed for o in own.outcomes if o.to != DOM0)
    foreign = fake.verdict(dhcp(1, dhcp=Dhcp(chaddr=MAC[3])))
    assert not foreign.passes
    d = foreign.outcome(DOM0).dropped
    assert d is not None and d.chain == "dhcp_request"
    assert f"@th,{ruleset.CHADDR[0]},{ruleset.CHADDR[1]}" in rule_text(fake, d)  # chaddr
    jumped = d.trail[0]
    assert str(d) == (
        f"dropped by bridge dom0 dhcp_request rule {d.rule} (via ports_input rule {jumped[1]})"
    )
    # nor a relay, a server's message, another hardware type
    for bad, field in (
        (dhcp(1, dhcp=Dhcp(giaddr="10.10.0.9")), ruleset.GIADDR),
        (dhcp(1, dhcp=Dhcp(op=2, chaddr=MAC[1])), ruleset.OP),
        (dhcp(1, dhcp=Dhcp(htype=6)), ruleset.HTYPE_HLEN),
    ):
        d = fake.verdict(bad).outcome(DOM0).dropped
        assert d is not None and d.chain == "dhcp_request", bad
        assert f"@th,{field[0]},{field[1]}" in rule_text(fake, d), bad
    # and a client message to anyone but dom0's server is policed like any other
    assert not fake.verdict(dhcp(1, dst="10.10.0.77")).passes
    # and DHCP never goes port to port
    assert not fake.verdict(to_vm(1, 3, sport=68, dport=67)).passes


def test_dhcp_replies_go_only_to_the_machine_they_are_for(fake: FakeDataPlane) -> None:
    reply = Packet("", dst_mac="ff:ff:ff:ff:ff:ff", src="10.10.0.1", dst="255.255.255.255",
                   sport=67, dport=68, dhcp=Dhcp(op=2, chaddr=MAC[3]))  # fmt: skip
    assert fake.verdict(reply).delivered == {PORT[3]}


# -- dom0's services and the internet -------------------------------------------------


def test_services_only_on_the_own_gateway(fake: FakeDataPlane) -> None:
    for i, own, other in ((1, "10.10.0.1", "10.20.0.1"), (2, "10.20.0.1", "10.10.0.1")):
        # dns: DNS over TLS (tcp/853); plain DNS only where a domain says "plain"
        assert fake.verdict(frame(i, dst=own, proto="tcp", dport=853)).delivered == {DOM0}
        v = fake.verdict(frame(i, dst=other, proto="tcp", dport=853))
        assert not v.passes and v.drops[0].chain == "to_host"
        for proto in ("udp", "tcp"):
            v = fake.verdict(frame(i, dst=own, proto=proto, dport=53))
            assert not v.passes and v.drops[0].chain == "to_host"
            assert not fake.verdict(frame(i, dst=own, proto=proto, dport=22)).passes
        assert fake.verdict(frame(i, dst=own, proto="icmp")).delivered == {DOM0}
        assert not fake.verdict(frame(i, dst=other, proto="icmp")).passes
        # nor dom0's other addresses
        for elsewhere in ("198.51.100.2", "10.200.0.2", "10.99.0.1"):
            assert not fake.verdict(frame(i, dst=elsewhere, dport=53)).passes


def test_egress_only_through_the_uplink(fake: FakeDataPlane) -> None:
    v = fake.verdict(frame(1, dst="203.0.113.10", proto="tcp", dport=80))
    assert v.delivered == {"wg0"}
    assert any("masquerade" in n for n in v.outcome("wg0").notes)
    # the WAN's own subnet is routed out of the WAN: dropped
    for dst in ("198.51.100.1", "198.51.100.3"):
        v = fake.verdict(frame(1, dst=dst, dport=51820))
        assert not v.passes and v.outcomes[0].to == "wan"


def test_replies_and_related_errors(fake: FakeDataPlane) -> None:
    back = Packet("wg0", src="203.0.113.10", dst=IP[1], proto="tcp", sport=80, dport=40001,
                  ct="established", ct_dir="reply")  # fmt: skip
    assert fake.verdict(back).delivered == {PORT[1]}
    # a new connection from the internet goes nowhere
    assert not fake.verdict(Packet("wg0", src="203.0.113.10", dst=IP[1], dport=7)).passes
    # an ICMP error about vm1's flow to vm3: from vm3 (an endpoint) only
    quoted: dict[str, Any] = {"proto": "icmp", "icmp_type": "destination-unreachable", "icmp_code": 3,
              "ct": "related", "ct_original": (IP[1], IP[3])}  # fmt: skip
    assert fake.verdict(frame(3, MAC[1], dst=IP[1], **quoted)).delivered == {PORT[1]}
    forged = fake.verdict(frame(4, dst=IP[1], **quoted))  # y's vm4, routed
    assert not forged.passes and forged.drops[0].chain == "related_check"


def test_the_kill_switch_lets_only_the_tunnel_leave_the_wan(fake: FakeDataPlane) -> None:
    tunnel = Packet("", src="198.51.100.2", dst="198.51.100.3", sport=5, dport=51820, mark=51820)
    assert fake.verdict(tunnel).delivered == {"wan"}
    leak = Packet("", src="198.51.100.2", dst="198.51.100.3", sport=5, dport=51820)
    assert fake.route("198.51.100.3") == ("unicast", "wan")
    v = fake.verdict(leak)
    assert not v.passes and v.drops[0].table == "dom0_wan"


# -- the hub --------------------------------------------------------------------------


def test_hub_machines_talk_through_the_hub_only() -> None:
    policy = parse_policy((DOMAINS.format(hub="hub = true") + HUB).encode(), "hub.toml")
    allocs = [
        Allocation(MAC[1], "odd", 1, "x", "10.10.0.2", PORT[1], underlay="10.250.0.2"),
        Allocation(MAC[2], "even", 1, "y", "10.20.0.2", PORT[2], underlay="10.250.0.3"),
        Allocation(MAC[3], "odd", 2, "x", "10.10.0.3", PORT[3], underlay="10.250.0.4"),
    ]
    flat = flat_of(policy, allocs)
    fake = FakeDataPlane.from_flat(flat, bridge_mac=BRIDGE_MAC)
    under = {1: "10.250.0.2", 2: "10.250.0.3", 3: "10.250.0.4"}
    tunnel = Packet(PORT[1], MAC[1], src=under[1], dst="10.250.0.1", sport=1, dport=51821)
    assert fake.verdict(tunnel).delivered == {DOM0}
    for dst in ("10.10.0.1", "203.0.113.10"):
        assert not fake.verdict(Packet(PORT[1], MAC[1], src=under[1], dst=dst, dport=53)).passes
    bridged = Packet(PORT[1], MAC[1], MAC[3], src=under[1], dst=under[3], dport=7)
    assert not fake.verdict(bridged).passes
    # inside the tunnels: the same policy by domain address
    assert fake.verdict(Packet("hub0", src="10.10.0.2", dst="10.10.0.3", dport=7)).delivered == {
        "hub0"
    }
    assert not fake.verdict(Packet("hub0", src="10.10.0.2", dst="10.20.0.2", dport=7)).passes
    dot = Packet("hub0", src="10.10.0.2", dst="10.10.0.1", proto="tcp", dport=853)
    assert fake.verdict(dot).delivered == {DOM0}
    other = Packet("hub0", src="10.10.0.2", dst="10.20.0.1", proto="tcp", dport=853)
    assert not fake.verdict(other).passes
    # a source whose route is not the hub fails the reverse path check
    v = fake.verdict(Packet("hub0", src="10.250.0.2", dst="10.10.0.3", dport=7))
    assert not v.passes and v.drops[0].chain == "rpf"


# -- the interpreter ------------------------------------------------------------------


def _with_rule(fake: FakeDataPlane, rule: list[dict]) -> FakeDataPlane:
    tables = copy.deepcopy(fake.tables)
    base, rules = tables[("bridge", "dom0")]["ingress"]
    tables[("bridge", "dom0")]["ingress"] = (base, [rule, *rules])
    flat = flat_of(bridge_policy(), allocations())
    return FakeDataPlane(flat.shape, flat.sets, flat.addresses, bridge_mac=BRIDGE_MAC,  # type: ignore[arg-type]
                         tables=tables)  # fmt: skip


@pytest.mark.parametrize(
    "rule",
    [
        [ruleset.match(ruleset.meta("skuid"), 0), ruleset.DROP],
        [ruleset.match(ruleset.pl("ip", "dscp"), 0), ruleset.DROP],
        [{"log": {"prefix": "x"}}, ruleset.ACCEPT],
        [ruleset.match(ruleset.meta("iifname"), "@no_such_set"), ruleset.DROP],
        [ruleset.match(ruleset.pl("ether", "saddr"), "@port_mac"), ruleset.DROP],  # wrong type
        [ruleset.match(ruleset.meta("iifname"), PORT[1], "<"), ruleset.DROP],
        [ruleset.jump("no_such_chain")],
    ],
)
def test_an_unknown_expression_raises(fake: FakeDataPlane, rule: list[dict]) -> None:
    with pytest.raises(UnknownExpression, match="bridge dom0 ingress rule 0"):
        _with_rule(fake, rule)


def test_an_unknown_expression_raises_even_where_no_packet_gets(fake: FakeDataPlane) -> None:
    # checked when the fake is built: no earlier condition can hide it
    never = ruleset.match(ruleset.meta("iifname"), "nowhere0")
    with pytest.raises(UnknownExpression, match="meta skuid"):
        _with_rule(fake, [never, ruleset.match(ruleset.meta("skuid"), 0), ruleset.DROP])


def test_a_missing_header_ends_the_rule_unmatched(fake: FakeDataPlane) -> None:
    # `udp dport != 7` does not match an ARP frame (nor a TCP packet): no drop
    odd = _with_rule(fake, [ruleset.match(ruleset.pl("udp", "dport"), 7, "!="), ruleset.DROP])
    assert odd.verdict(frame(1, "ff:ff:ff:ff:ff:ff", ether_type="arp", dst=IP[3])).passes
    assert odd.verdict(to_vm(1, 3, proto="tcp", dport=80)).passes
    assert odd.verdict(to_vm(1, 3, dport=7)).passes
    assert not odd.verdict(to_vm(1, 3, dport=8)).passes


def test_every_rule_of_the_ruleset_is_known() -> None:
    """A sweep of packets reaches every chain of both tables (and the kill
    switch) without an unknown expression."""
    flat = flat_of(bridge_policy(), allocations())
    fake = FakeDataPlane.from_flat(flat, bridge_mac=BRIDGE_MAC)
    seen: set[str] = set()
    packets = [to_vm(1, 3, proto=p) for p in ("udp", "tcp", "icmp")] + [
        frame(1, dst="203.0.113.10", dport=80),
        frame(1, dst="10.10.0.1", proto="icmp"),
        dhcp(1),
        frame(1, "ff:ff:ff:ff:ff:ff", ether_type="arp", dst=IP[3]),
        Packet("wan", src="203.0.113.10", dst="198.51.100.2", dport=22),
        Packet("", src="10.10.0.1", dst=IP[1], sport=67, dport=68),
    ]
    for p in packets:
        for o in fake.verdict(p).outcomes:
            seen.update(o.path)
    hooked = {f"{f} {t} {n}" for (f, t), chains in fake.tables.items()
              for n, (base, _) in chains.items() if base}  # fmt: skip
    assert hooked <= seen | {"inet dom0_wan passing"}


def test_ipv6_past_the_bridge_is_not_modelled() -> None:
    policy = parse_policy(
        DOMAINS.format(hub="").replace('name = "virbr0"', 'name = "virbr0"\ntrusted_ports = ["up0"]')
        .encode(), "p.toml")  # fmt: skip
    flat = flatten(policy_state(policy, []), [])
    fake = FakeDataPlane.from_flat(flat, bridge_mac=BRIDGE_MAC)
    p = Packet("up0", "02:00:00:00:00:01", None, ether_type="ip6", src="fe80::1", dst="fe80::2")
    with pytest.raises(NotModelled):
        fake.verdict(p)


def test_the_frame_is_what_scapy_reads() -> None:
    scapy = pytest.importorskip("scapy.all")
    p = dhcp(1, dhcp=Dhcp(chaddr=MAC[3], xid=0x1234), payload=b"marker")
    raw = p.frame(BRIDGE_MAC)
    e = scapy.Ether(raw)
    assert (e.src, e.dst) == (MAC[1], "ff:ff:ff:ff:ff:ff")
    assert e["BOOTP"].chaddr[:6] == bytes.fromhex(MAC[3].replace(":", ""))
    assert (e["BOOTP"].op, e["BOOTP"].xid, e["BOOTP"].sname[:6]) == (1, 0x1234, b"marker")
    for q in (p, to_vm(1, 3, proto="tcp", payload=b"x"), to_vm(1, 3, proto="icmp")):
        raw = q.frame(BRIDGE_MAC)
        again = scapy.Ether(raw)
        for layer in ("IP", "UDP", "TCP", "ICMP"):
            if again.haslayer(layer):
                del again[layer].chksum
        assert bytes(scapy.Ether(bytes(again))) == raw  # checksums as scapy computes them
