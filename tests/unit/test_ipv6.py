"""IPv6 from plain data: the policy's /64s, what `policy check` refuses, the
reservations dnsmasq reads (a file per machine beside its DHCPv4 one), its
arguments, and the bridge's guard in the fake data plane."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.core.allocation import Allocation
from controller.core.desired import BINDING6, ND_TARGET, machine_state, policy_state
from controller.core.plan import flatten
from controller.drivers.dhcp import HostsDir, dnsmasq_argv
from controller.drivers.nft.fake import FakeDataPlane, Packet
from controller.policy.load import PolicyError, parse_policy
from controller.policy.model import Policy

ROOT = Path(__file__).resolve().parents[2]
LAB = (ROOT / "tests" / "data" / "policies" / "ipv6-lab.toml").read_text()
VM1 = Allocation("52:54:00:d0:00:01", "odd", 1, "x", "10.10.0.5", "vnet1")
VM3 = Allocation("52:54:00:d0:00:03", "odd", 2, "x", "10.10.0.6", "vnet3")
VM2 = Allocation("52:54:00:d0:00:02", "even", 1, "y", "10.20.0.5", "vnet2")


def policy(text: str = LAB) -> Policy:
    return parse_policy(text.encode(), "p.toml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        policy(text)
    return [str(p) for p in e.value.problems]


def test_derived_prefixes_are_stable_distinct_ulas() -> None:
    a, b = policy(), policy()
    x, y = a.domains["x"].pool6, a.domains["y"].pool6
    assert x is not None and y is not None and x != y
    assert x == b.domains["x"].pool6 and x.prefixlen == 64 and str(x).startswith("fd")
    assert x.supernet(16) == y.supernet(16)  # one site /48
    assert a.domains["x"].address6("10.10.0.5") == str(x.network_address + 5)
    explicit = policy(LAB.replace("[site]\n", '[site]\nula = "fd12:3456:789a::/48"\n'))
    assert str(explicit.domains["x"].pool6).startswith("fd12:3456:789a:")


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ('ipv6 = true\n', 'pool6 = "fd00:1:2::/56"\n', "domains.x.pool6: 'fd00:1:2::/56', expected an IPv6 /64"),
        ('ipv6 = true\n', 'pool6 = "fd00:1:2:3::1/64"\n', "domains.x.pool6: 'fd00:1:2:3::1/64' is not an IPv6 network"),
        ('ipv6 = true\n', 'pool6 = "fe80::/64"\n', "not a unicast prefix"),
        ('ipv6 = true\n', 'ipv6 = false\npool6 = "fd00::/64"\n', "domains.x.ipv6: is false but pool6 is set"),
        ("[site]\n", '[site]\nula = "2001:db8::/48"\n', "site.ula: '2001:db8::/48', expected a ULA /48"),
        ("ipv6 = true\n[[rules]]", 'pool6 = "fd00:1:2:3::/64"\n[[rules]]', "overlap"),
    ],
)  # fmt: skip
def test_bad_ipv6_settings_are_one_line(old: str, new: str, says: str) -> None:
    text = LAB.replace(old, new, 1)
    if says == "overlap":
        text = text.replace("ipv6 = true\n", 'pool6 = "fd00:1:2:3::/64"\n', 1)
        says = "domains.y.pool6: fd00:1:2:3::/64 is domains.x's too"
    assert text != LAB
    got = problems(text)
    assert len(got) == 1 and says in got[0], got


def test_ipv6_in_a_hub_domain_is_refused_for_now() -> None:
    text = (
        LAB.replace("[domains.x]\n", "[domains.x]\nhub = true\n", 1)
        + '\n[hub]\npool = "10.250.0.0/16"\n'
    )
    got = problems(text)
    assert got == [
        "p.toml: domains.x.ipv6: IPv6 inside hub tunnels is not supported yet, expected it on bridge domains only"
    ]


def test_a_machine_gets_its_v6_binding_and_reservation() -> None:
    p = policy()
    m = machine_state(p, VM1)
    six = p.domains["x"].address6("10.10.0.5")
    assert m.elements[BINDING6] == {("vnet1", VM1.mac, six)}
    assert m.elements[ND_TARGET] == {("vnet1", six)}
    assert m.dhcp is not None and m.dhcp.address6 == six
    assert m.dhcp.line6() == f"{VM1.mac},set:x,[{six}],web1\n"
    argv = dnsmasq_argv(policy_state(p, []).dhcp, Path("/s"))
    assert "--enable-ra" in argv and "--ra-param=virbr0,0,0" in argv
    x6 = p.domains["x"].pool6
    assert x6 is not None
    assert f"--dhcp-range=set:x,{x6.network_address},static,off-link,64,600" in argv


def test_reservations_round_trip_and_dropping_v6_empties_its_file(tmp_path: Path) -> None:
    p = policy()
    host = machine_state(p, VM1).dhcp
    assert host is not None
    d = HostsDir(tmp_path)
    d.write({host.mac: host}, set())
    v6 = d.dir / "52-54-00-d0-00-01.v6"
    assert v6.read_text() == host.line6()
    assert HostsDir(tmp_path).read() == {host.mac: host}
    from dataclasses import replace

    d.write({host.mac: replace(host, address6=None)}, set())
    assert v6.read_text() == "" and d.stale  # (dnsmasq keeps what it read: restart it)
    assert HostsDir(tmp_path).read()[host.mac].address6 is None
    d.write({}, {host.mac})
    assert (d.dir / "52-54-00-d0-00-01").read_text() == f"{host.mac},ignore\n"
    assert d.sweep() == 2 and not v6.exists()


def fake(p: Policy) -> FakeDataPlane:
    flat = flatten(policy_state(p, []), [machine_state(p, a) for a in (VM1, VM2, VM3)])
    assert flat.shape is not None
    return FakeDataPlane(flat.shape, flat.sets, flat.addresses)


def v6(a: Allocation, p: Policy, **kw: object) -> Packet:
    kw.setdefault("src", p.domains[a.domain].address6(a.address))
    kw.setdefault("proto", "icmpv6")
    return Packet(a.port, a.mac, kw.pop("dst_mac", None), ether_type="ip6", **kw)  # type: ignore[arg-type]


def test_the_bridge_guard_in_the_fake() -> None:
    """What reaches the bridge's other ports or dom0 from a port (past the
    bridge table, the fake does not model IPv6: NotModelled there means
    "passed the bridge")."""
    from controller.drivers.nft.fake import NotModelled

    p = policy()
    f = fake(p)
    x3 = p.domains["x"].address6(VM3.address)
    # never port to port, even within a domain (dom0 routes all of it)
    direct = f.verdict(v6(VM1, p, dst=x3, dst_mac=VM3.mac, icmp_type="echo-request"))
    assert not direct.reaches(VM3.port)
    # a router advertisement or a DHCPv6 server message from a port: dropped at once
    ra = f.verdict(
        v6(
            VM1,
            p,
            src="fe80::1",
            dst="ff02::1",
            dst_mac="33:33:00:00:00:01",
            icmp_type="nd-router-advert",
        )
    )
    assert not ra.delivered and ra.drops
    server = f.verdict(
        v6(VM1, p, src="fe80::1", dst="ff02::1:2", proto="udp", sport=547, dport=546)
    )
    assert not server.delivered
    # a neighbour advertisement for another machine's address: dropped
    import ipaddress

    na = f.verdict(v6(VM1, p, src="fe80::1", dst="ff02::1", dst_mac="33:33:00:00:00:01",
                      icmp_type="nd-neighbor-advert", payload=ipaddress.IPv6Address(x3).packed))  # fmt: skip
    assert not na.delivered
    # a forged global source: dropped; its own: passes the bridge (to dom0)
    forged = f.verdict(
        v6(VM1, p, src=x3, dst=str(p.domains["x"].gateway6), icmp_type="echo-request")
    )
    assert not forged.delivered
    with pytest.raises(NotModelled):
        f.verdict(v6(VM1, p, dst=str(p.domains["x"].gateway6), icmp_type="echo-request"))


def test_allow_entries_apply_to_ipv6_where_both_ends_have_it() -> None:
    from controller.core.desired import AllowRule, twin6

    p = policy()
    x6, y6 = str(p.domains["x"].pool6), str(p.domains["y"].pool6)
    assert policy_state(p, []).shape.allow6 == (
        AllowRule("domains.x.allow[1]", x6, y6, False, "tcp", ((443, 443),), "ip6"),
    )
    # a rule's grant: its machines join the group's IPv6 twin as well
    text = LAB.replace('match.mac_mask = "52:54:00:d0:00:01/ff:ff:ff:ff:00:01"\n',
                       'match.mac_mask = "52:54:00:d0:00:01/ff:ff:ff:ff:00:01"\n'
                       'allow = [{ to = "db*.y", ports = ["tcp/22"] }]\n', 1)  # fmt: skip
    q = policy(text)
    state = policy_state(q, [])
    assert {"grp_r_odd", "grp6_r_odd", "grp_m1", "grp6_m1"} <= set(state.shape.groups)
    m = machine_state(q, VM1).elements
    assert m[("inet", twin6("grp_r_odd"))] == {(q.domains["x"].address6(VM1.address),)}
    assert ("inet", "grp6_m1") in machine_state(q, VM2).elements


def test_ipv6_egress_only_when_the_uplink_carries_it() -> None:
    from controller.core.desired import EGRESS6, NAT_OUT6

    uplink = (
        '\n[uplink]\nendpoint = "198.51.100.3:51820"\n'
        'public_key = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="\n'
        'addresses = ["10.200.0.2/32"{six}]\n'
    )
    v4only = policy_state(policy(LAB + uplink.format(six="")), [])
    assert not v4only.shape.egress6 and not v4only.sets[EGRESS6] and not v4only.dhcp.default_route6
    assert "--ra-param=virbr0,0,0" in dnsmasq_argv(v4only.dhcp, Path("/s"))
    p = policy(LAB + uplink.format(six=', "fd99:200::2/128"'))
    both = policy_state(p, [])
    x6 = str(p.domains["x"].pool6)
    assert both.shape.egress6 and both.sets[EGRESS6] == {(x6,)} and both.sets[NAT_OUT6] == {(x6,)}
    assert both.dhcp.default_route6
    assert "--ra-param=virbr0,0,0" not in dnsmasq_argv(both.dhcp, Path("/s"))


def test_nd_options_must_name_the_ports_machine() -> None:
    import ipaddress

    from controller.drivers.nft.fake import NotModelled

    p = policy()
    f = fake(p)
    gw = "fe80::fc54:ff:fed0:fffe"

    def ns(lladdr: str, option: int = 1) -> Packet:
        body = (
            ipaddress.IPv6Address(gw).packed
            + bytes([option, 1])
            + bytes.fromhex(lladdr.replace(":", ""))
        )
        return v6(VM1, p, src="fe80::1", dst=gw, icmp_type="nd-neighbor-solicit", payload=body)

    assert not f.verdict(ns(VM3.mac)).delivered  # another machine's MAC
    assert not f.verdict(ns(VM1.mac, option=14)).delivered  # a first option that is not its address
    with pytest.raises(NotModelled):  # its own: past the bridge, to dom0
        f.verdict(ns(VM1.mac))


def test_unchanged_v6_files_are_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resync reads a machine's MAC.v6 file again only when it changed."""
    p = policy()
    host = machine_state(p, VM1).dhcp
    assert host is not None
    d = HostsDir(tmp_path)
    d.write({host.mac: host}, set())
    assert d.read()[host.mac].address6 == host.address6
    reads: list[str] = []
    real = Path.read_text

    def counting(self: Path, *a: object, **kw: object) -> str:
        reads.append(self.name)
        return real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", counting)
    assert d.read()[host.mac].address6 == host.address6
    assert not [r for r in reads if r.endswith(".v6")], reads
    v6 = d.dir / "52-54-00-d0-00-01.v6"
    v6.write_text(host.line6().replace(str(host.address6), "fd00::99"))
    assert d.read()[host.mac].address6 == "fd00::99"
