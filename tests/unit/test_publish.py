"""Published ports from plain data: what `policy check` refuses, and what
the fake data plane does with a connection to one (destination NAT to the
machine, only that port; hairpin from the site; on the WAN only when asked)."""

from __future__ import annotations

import pytest

from controller.core.allocation import Allocation
from controller.core.desired import machine_state, policy_state
from controller.core.plan import flatten
from controller.drivers.nft.fake import FakeDataPlane, Packet
from controller.policy.load import PolicyError, parse_policy
from controller.policy.model import Policy

POLICY = """
[wan]
interface = "wan"
[host]
ssh_from = ["10.0.0.0/8"]
[domains.lan]
pool = "10.30.0.0/24"
internet = true
[domains.dmz]
pool = "10.40.0.0/24"
[domains.closed]
pool = "10.60.0.0/24"
[[rules]]
name = "pc"
domain = "lan"
subdomain = "pc{n}"
match.mac_prefix = "52:54:00:a1:00:00/32"
[[rules]]
name = "www"
domain = "dmz"
subdomain = "www{n}"
match.mac_prefix = "52:54:00:b1:00:00/32"
pins = { www1 = "10.40.0.10" }
[[rules]]
name = "c"
domain = "closed"
subdomain = "c{n}"
match.mac_prefix = "52:54:00:c1:00:00/32"
[[publish]]
machine = "www1.dmz"
port = "tcp/443"
[[publish]]
machine = "www1.dmz"
port = "tcp/80"
listen = 8080
via = "wan"
[uplink]
endpoint = "198.51.100.3:51820"
public_key = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="
addresses = ["10.200.0.2/32"]
"""
TUNNEL = "10.200.0.2"
WAN = ("wan", "198.51.100.2/24")
PC = Allocation("52:54:00:a1:00:01", "pc", 1, "lan", "10.30.0.2", "vnet1")
WWW = Allocation("52:54:00:b1:00:01", "www", 1, "dmz", "10.40.0.10", "vnet2")
C1 = Allocation("52:54:00:c1:00:01", "c", 1, "closed", "10.60.0.2", "vnet3")


def policy(text: str = POLICY) -> Policy:
    return parse_policy(text.encode(), "p.toml")


def fake(p: Policy) -> FakeDataPlane:
    flat = flatten(policy_state(p, []), [machine_state(p, a) for a in (PC, WWW, C1)])
    assert flat.shape is not None
    return FakeDataPlane(flat.shape, flat.sets, [*flat.addresses, WAN], killswitch=flat.killswitch)


def test_the_policy_and_its_forwards() -> None:
    p = policy()
    assert [
        (x.where, x.machine, x.address, x.proto, x.port, x.listen, x.via) for x in p.publish
    ] == [
        ("publish[1]", "www1.dmz", "10.40.0.10", "tcp", 443, 443, "uplink"),
        ("publish[2]", "www1.dmz", "10.40.0.10", "tcp", 80, 8080, "wan"),
    ]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (('machine = "www1.dmz"\nport = "tcp/443"', 'machine = "www2.dmz"\nport = "tcp/443"'),
         "publish[1].machine: www2.dmz is not pinned"),
        (('machine = "www1.dmz"\nport = "tcp/443"', 'machine = "db1.dmz"\nport = "tcp/443"'),
         "publish[1].machine: 'db1.dmz': no rule of domain dmz gives the name 'db1'"),
        (('machine = "www1.dmz"\nport = "tcp/443"', 'machine = "www1.dnz"\nport = "tcp/443"'),
         "did you mean 'dmz'"),
        (('port = "tcp/443"', 'port = "tcp/443-445"'), "publish[1].port: 'tcp/443-445', expected one port"),
        (('port = "tcp/443"', 'port = "icmp"'), "publish[1].port"),
        (('port = "tcp/443"', 'port = "tcp/443"\nlisten = 22'), "publish[1].listen: 22 is dom0's own sshd"),
        (('port = "tcp/443"', 'port = "tcp/443"\nlisten = 0'), "publish[1].listen: 0, expected an integer"),
        (('via = "wan"', 'via = "wlan"'), "publish[2].via: 'wlan' (did you mean 'wan'?)"),
        (('listen = 8080\nvia = "wan"', 'listen = 443'), "publish[2].listen: tcp/443 on the uplink is published by publish[1] too"),
        (('port = "tcp/443"', 'port = "tcp/443"\nproto = "tcp"'), "publish[1].proto: unknown key"),
    ],
)  # fmt: skip
def test_a_bad_entry_is_one_line(change: tuple[str, str], says: str) -> None:
    text = POLICY.replace(*change, 1)
    assert text != POLICY
    with pytest.raises(PolicyError) as e:
        policy(text)
    lines = [str(x) for x in e.value.problems]
    assert len(lines) == 1 and says in lines[0], lines


def test_via_uplink_needs_an_uplink() -> None:
    text = POLICY[: POLICY.index("[uplink]")]
    with pytest.raises(PolicyError) as e:
        policy(text)
    assert [str(x) for x in e.value.problems] == [
        'p.toml: publish[1].via: "uplink", but there is no [uplink] with an IPv4 tunnel '
        'address, expected one (or via = "wan")'
    ]


def inbound(dst: str, dport: int, iif: str = "wg0") -> Packet:
    return Packet(iif, src="203.0.113.77", dst=dst, proto="tcp", sport=40000, dport=dport)


def test_the_published_port_and_nothing_else() -> None:
    f = fake(policy())
    v = f.verdict(inbound(TUNNEL, 443))
    assert v.reaches(WWW.port), v
    assert any(n.startswith("dnat to 10.40.0.10:443") for n in v.outcome(WWW.port).notes)
    # the machine's other ports, at the tunnel address or at its own, through the uplink
    for dst, port in (
        (TUNNEL, 22),
        (TUNNEL, 80),
        (WWW.address or "", 22),
        (WWW.address or "", 443),
    ):
        assert not f.verdict(inbound(dst, port)).reaches(WWW.port), (dst, port)
    # the WAN publish: dom0's 8080 there, to 80
    wan = f.verdict(inbound("198.51.100.2", 8080, iif="wan"))
    assert wan.reaches(WWW.port), wan
    assert not f.verdict(inbound("198.51.100.2", 443, iif="wan")).reaches(WWW.port)
    assert not f.verdict(inbound(TUNNEL, 8080)).reaches(WWW.port)


def test_without_a_wan_publish_the_kill_switch_lets_nothing_in() -> None:
    text = POLICY.replace(
        '[[publish]]\nmachine = "www1.dmz"\nport = "tcp/80"\nlisten = 8080\nvia = "wan"\n', ""
    )
    assert text != POLICY
    f = fake(policy(text))
    assert not f.verdict(inbound("198.51.100.2", 8080, iif="wan")).reaches(WWW.port)
    assert f.verdict(inbound(TUNNEL, 443)).reaches(WWW.port)


def test_hairpin_from_a_domain_that_reaches_the_internet() -> None:
    f = fake(policy())
    pc = Packet(
        PC.port, PC.mac, None, src=PC.address or "", dst=TUNNEL, proto="tcp", sport=40000, dport=443
    )
    v = f.verdict(pc)
    assert v.reaches(WWW.port), v
    assert any("masqueraded" in n for n in v.outcome(WWW.port).notes)
    # a domain without the internet does not get at it that way
    c1 = Packet(
        C1.port, C1.mac, None, src=C1.address or "", dst=TUNNEL, proto="tcp", sport=40000, dport=443
    )
    assert not f.verdict(c1).reaches(WWW.port)
    # and the reply of the published connection goes back out
    reply = Packet(
        WWW.port,
        WWW.mac,
        None,
        src=WWW.address or "",
        dst="203.0.113.77",
        proto="tcp",
        sport=443,
        dport=40000,
        ct="established",
        ct_dir="reply",
        ct_status=("dnat",),
    )
    assert f.verdict(reply).reaches("wg0")


def test_hairpin_is_bridged_by_br_netfilter_and_routed_without_it() -> None:
    """After destination NAT to a machine on the same bridge, br_netfilter
    bridges the frame on (the kernel's br_nf_pre_routing_finish_bridge): the
    bridge table passes exactly that flow. Without br_netfilter dom0 routes
    it, and the bridge table has no such exception."""
    p = policy()
    pc = Packet(
        PC.port, PC.mac, None, src=PC.address or "", dst=TUNNEL, proto="tcp", sport=40000, dport=443
    )
    bridged = fake(p).verdict(pc)
    assert any("by br_netfilter" in n for n in bridged.outcome(WWW.port).notes), bridged
    flat = flatten(
        policy_state(p, [], bridge_netfilter=False), [machine_state(p, a) for a in (PC, WWW, C1)]
    )
    assert flat.shape is not None
    routed = FakeDataPlane(flat.shape, flat.sets, [*flat.addresses, WAN], br_netfilter=False)
    v = routed.verdict(pc)
    assert v.reaches(WWW.port) and not any(
        "by br_netfilter" in n for n in v.outcome(WWW.port).notes
    )
    # and without br_netfilter, www1's port is not open on the bridge to lan's machines directly
    direct = Packet(
        PC.port,
        PC.mac,
        WWW.mac,
        src=PC.address or "",
        dst=WWW.address or "",
        proto="tcp",
        sport=40000,
        dport=443,
    )
    assert not routed.verdict(direct).reaches(WWW.port)
