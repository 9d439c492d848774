"""Allow lists from plain data: what `policy check` refuses (one line each),
what the fake data plane lets through (the ruleset as the kernel gets it),
what a machine costs in set elements, and `policy explain` against the
policy's declarative meaning (Hypothesis)."""

from __future__ import annotations

import fnmatch
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.allocation import Allocation
from controller.core.desired import fqdn_of, label_of, machine_state
from controller.core.explain import ExplainError, explain
from controller.policy.load import PolicyError, parse_policy
from controller.policy.model import Policy

ROOT = Path(__file__).resolve().parents[2]
LAB = (ROOT / "tests" / "data" / "policies" / "allow-lab.toml").read_text()
UPLINK = """
[uplink]
endpoint = "198.51.100.3:51820"
public_key = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="
addresses = ["10.200.0.2/32"]
"""


def policy(text: str = LAB, uplink: bool = True) -> Policy:
    return parse_policy((text + (UPLINK if uplink else "")).encode(), "p.toml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        policy(text)
    return [str(p) for p in e.value.problems]


def one(text: str) -> str:
    got = problems(text)
    assert len(got) == 1, got
    return got[0]


LAN_ALLOW = '  { to = "dmz", ports = ["tcp/443"] },\n'


def lan_entry(entry: str) -> str:
    out = LAB.replace(LAN_ALLOW, LAN_ALLOW + f"  {entry},\n", 1)
    assert out != LAB
    return out


# ---- policy check ---------------------------------------------------------------------------


def test_the_lab_policy_is_valid_and_its_grants_are_in_order() -> None:
    p = policy()
    assert [g.where for g in p.grants] == [
        "domains.lan.allow[1]", "domains.lan.allow[2]", "domains.lan.allow[3]",
        "domains.dmz.allow[1]", "rules.admin.allow[1]", "rules.admin.allow[2]",
    ]  # fmt: skip
    admin = p.grants[4]
    assert (admin.rule, admin.kind, admin.to, admin.ports_text) == (
        "admin", "machines", "www*.dmz", "tcp/22, tcp/8080",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "path", "says"),
    [
        ('{ to = "nowhere" }', "domains.lan.allow[2].to", "unknown destination 'nowhere'"),
        ('{ to = "dmx", ports = ["tcp/1"] }', "domains.lan.allow[2].to", "did you mean 'dmz'"),
        ('{ to = "www1.dmx" }', "domains.lan.allow[2].to", "names domain 'dmx'"),
        ('{ to = "mail*.dmz" }', "domains.lan.allow[2].to", "matches no machine"),
        ('{ to = "10.40.0.0/25" }', "domains.lan.allow[2].to", "inside the site"),
        ('{ to = "10.99.0.7/32" }', "domains.lan.allow[2].to", "quarantine.pool"),
        ('{ to = "0.0.0.0/0" }', "domains.lan.allow[2].to", 'expected "internet"'),
        ('{ to = "198.51.100.1/24" }', "domains.lan.allow[2].to", "did you mean 198.51.100.0/24"),
        ('{ to = "dmz", ports = ["tcp/443"] }', "domains.lan.allow[2].to", "listed in domains.lan.allow[1] too"),
        ('{ to = "guest", ports = [] }', "domains.lan.allow[2].ports", "empty"),
        ('{ to = "guest", ports = ["gre"] }', "domains.lan.allow[2].ports[1]", "PROTOCOL one of tcp, udp, icmp"),
        ('{ to = "guest", ports = ["tpc/22"] }', "domains.lan.allow[2].ports[1]", "did you mean 'tcp'"),
        ('{ to = "guest", ports = ["tcp/0"] }', "domains.lan.allow[2].ports[1]", "from 1 to 65535"),
        ('{ to = "guest", ports = ["tcp/90-80"] }', "domains.lan.allow[2].ports[1]", "LOW <= HIGH"),
        ('{ to = "guest", ports = ["udp/70000"] }', "domains.lan.allow[2].ports[1]", "from 1 to 65535"),
        ('{ to = "guest", ports = ["icmp/8"] }', "domains.lan.allow[2].ports[1]", "icmp has no ports"),
        ('{ to = "guest", ports = ["tcp/80", "tcp/1-100"] }', "domains.lan.allow[2].ports[2]", "overlaps 'tcp/80'"),
        ('{ to = "guest", ports = ["tcp", "tcp/22"] }', "domains.lan.allow[2].ports[2]", "overlaps 'tcp'"),
        ('{ to = "guest", port = ["tcp/22"] }', "domains.lan.allow[2].port", "did you mean 'ports'"),
        ("42", "domains.lan.allow[2]", "expected { to"),
    ],
)  # fmt: skip
def test_a_bad_entry_is_one_line_naming_it(entry: str, path: str, says: str) -> None:
    line = one(lan_entry(entry))
    assert line.startswith(f"p.toml: {path}: "), line
    assert says in line, line


def test_contradictions_name_both_lines() -> None:
    # a port list for what `reach` already grants on every port
    text = LAB.replace("members_reach = false\n", 'members_reach = false\nreach = ["dmz"]\n', 1)
    lines = problems(text)
    assert any(
        line.startswith("p.toml: domains.lan.allow[1]: limits to tcp/443 what domains.lan.reach")
        for line in lines
    ), lines
    # ... and a rule's narrower grant under its domain's whole one
    assert any(line.startswith("p.toml: rules.admin.allow[1]: limits to") for line in lines), lines
    # members_reach = true grants members every port
    line = one(LAB.replace("members_reach = false\n", "", 1))
    assert "domains.lan.allow[2]: limits to tcp/22, icmp what domains.lan.members_reach" in line
    assert "set it to false" in line
    # internet = true, and an internet entry with ports
    line = one(
        LAB.replace(
            'pool = "10.50.0.0/24"\n',
            'pool = "10.50.0.0/24"\nallow = [{ to = "internet", ports = ["tcp/80"] }]\n',
        )
    )
    assert "domains.guest.allow[1]: limits to tcp/80 what domains.guest.internet" in line


def test_leaving_the_site_needs_a_wan() -> None:
    text = LAB.replace('[wan]\ninterface = "wan"\n', "").replace("internet = true\n", "")
    lines = problems(text.replace(UPLINK, ""))
    assert any("domains.lan.allow[3].to: the internet, but [wan]" in x for x in lines), lines
    assert any("domains.dmz.allow[1].to: '203.0.113.0/24' is outside the site" in x for x in lines)


def test_the_cli_refuses_with_exit_2_and_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(lan_entry('{ to = "guest", ports = ["tcp/99999"] }'))
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "policy", "check", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"{bad}: domains.lan.allow[2].ports[1]: 'tcp/99999', expected ports from 1 to 65535 "
        "(LOW-HIGH with LOW <= HIGH)"
    ]


# ---- the data plane (fake) and the cost of a machine ----------------------------------------

MACS = {
    "pc1": "52:54:00:a1:00:01", "pc2": "52:54:00:a1:00:02", "admin": "52:54:00:a2:00:01",
    "www1": "52:54:00:b1:00:01", "www2": "52:54:00:b1:00:02", "db1": "52:54:00:b2:00:01",
    "g1": "52:54:00:c1:00:01",
}  # fmt: skip


def test_a_machine_is_one_element_per_group_whatever_the_lists_say() -> None:
    """Adding entries to an allow list adds rules to a chain, never elements
    to a machine: the admin machine joins its rule's group, www1 the group of
    machines named www*.dmz, pc1 no group."""
    p = policy()

    def count(rule: str, slot: int, domain: str, address: str, pol: Policy = p) -> int:
        m = machine_state(pol, Allocation("52:54:00:00:00:09", rule, slot, domain, address, "v9"))
        return sum(len(v) for v in m.elements.values())

    plain = count("pc", 1, "lan", "10.30.0.9")
    assert count("admin", 1, "lan", "10.30.0.9") == plain + 1
    assert count("www", 1, "dmz", "10.40.0.9") == count("db", 1, "dmz", "10.40.0.9") + 1
    bigger = LAB.replace(
        '  { to = "guest", ports = ["udp/5353"] },\n',
        '  { to = "guest", ports = ["udp/5353", "udp/6000-6100", "tcp/1-1000"] },\n'
        '  { to = "203.0.113.0/24", ports = ["tcp/443", "tcp/8443"] },\n'
        '  { to = "internet", ports = ["udp/123"] },\n',
    )
    assert bigger != LAB
    big = policy(bigger)
    assert len(big.grants) == len(p.grants) + 2
    assert count("admin", 1, "lan", "10.30.0.9", big) == plain + 1


def sample(p: Policy) -> list[Allocation]:
    return [
        Allocation(MACS["pc1"], "pc", 1, "lan", "10.30.0.2", "vnet1"),
        Allocation(MACS["pc2"], "pc", 2, "lan", "10.30.0.3", "vnet2"),
        Allocation(MACS["admin"], "admin", 1, "lan", "10.30.0.4", "vnet3"),
        Allocation(MACS["www1"], "www", 1, "dmz", "10.40.0.2", "vnet4"),
        Allocation(MACS["www2"], "www", 2, "dmz", "10.40.0.3", "vnet5"),
        Allocation(MACS["db1"], "db", 1, "dmz", "10.40.0.4", "vnet6"),
        Allocation(MACS["g1"], "guest", 1, "guest", "10.50.0.2", "vnet7"),
    ]


def test_explain_names_the_deciding_line() -> None:
    p = policy()
    allocs = sample(p)
    cases = [
        ("pc1.lan", "www1.dmz", "tcp/443", True, "domains.lan.allow[1]"),
        ("pc1.lan", "www1.dmz", "tcp/80", False, ""),
        ("pc1.lan", "www1.dmz", "tcp/22", False, ""),
        ("admin.lan", "www2.dmz", "tcp/22", True, "rules.admin.allow[1]"),
        ("admin.lan", "db1.dmz", "tcp/22", False, ""),
        ("pc1.lan", "pc2.lan", "icmp", True, "domains.lan.allow[2]"),
        ("pc1.lan", "pc2.lan", "tcp/80", False, ""),
        ("lan", "internet", "udp/53", True, "domains.lan.allow[3]"),
        ("lan", "internet", "tcp/443", False, ""),
        ("www1.dmz", "203.0.113.5", "tcp/443", True, "domains.dmz.allow[1]"),
        ("www1.dmz", "db1.dmz", "tcp/5432", True, "domains.dmz.members_reach"),
        ("g1.guest", "internet", "tcp/22", True, "domains.guest.internet"),
        ("g1.guest", "pc1.lan", "tcp/22", False, ""),
        ("10.30.0.4", "10.50.0.2", "udp/5353", True, "rules.admin.allow[2]"),
    ]
    for src, dst, service, passes, line in cases:
        a = explain(p, src, dst, service, allocs)
        assert a.passes is passes, a.line()
        if passes:
            assert a.decided_by == line, a.line()
            assert a.rule.endswith("accept"), a.rule
        else:
            assert a.decided_by.startswith("no line of p.toml allows it"), a.line()
        assert src in ("lan",) or not (a.source.stand_in or a.destination.stand_in)


def test_explain_stand_ins_and_bad_names() -> None:
    p = policy()
    a = explain(p, "admin.lan", "www7.dmz", "tcp/8080")
    assert a.passes and a.source.stand_in and a.destination.stand_in
    for src, dst, service, says in [
        ("nobody.lan", "www1.dmz", "tcp/22", "no rule of domain lan gives the name 'nobody'"),
        ("pc1.lan", "www1.nowhere", "tcp/22", "expected a machine name"),
        ("pc1.lan", "www1.dmz", "tcp/0", "not a service"),
        ("pc1.lan", "www1.dmz", "sctp/9", "not a service"),
        ("internet", "www1.dmz", "tcp/22", "published ports"),
        ("203.0.113.5", "www1.dmz", "tcp/22", "outside the site"),
    ]:
        with pytest.raises(ExplainError, match=says):
            explain(p, src, dst, service)


# ---- explain against the policy's declarative meaning ---------------------------------------


def meaning(
    p: Policy, a: Allocation, dst: Allocation | None, outside: str, proto: str, port: int | None
) -> bool:
    """What the policy says, read directly (an oracle independent of the ruleset)."""
    d = p.domains[a.domain]
    if dst is not None:
        if dst.domain == a.domain and d.members_reach:
            return True
        if dst.domain in d.reach:
            return True
    elif d.internet:
        return True
    rule = p.rule(a.rule)
    for g in (*d.allow, *(rule.allow if rule else ())):
        if not g.covers(proto, port):
            continue
        if dst is not None and g.kind == "domain" and g.to == dst.domain:
            return True
        if dst is not None and g.kind == "machines":
            glob, domain = g.to.split(".", 1)
            if domain == dst.domain and fnmatch.fnmatchcase(label_of(p, dst), glob):
                return True
        if dst is None and g.kind == "internet":
            return True
        if (
            dst is None
            and g.kind == "network"
            and ipaddress.ip_address(outside) in ipaddress.ip_network(g.to)
        ):
            return True
    return False


SERVICES = st.sampled_from(
    [
        "tcp/22",
        "tcp/80",
        "tcp/443",
        "tcp/8080",
        "tcp/9999",
        "udp/53",
        "udp/5353",
        "udp/6000",
        "icmp",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    src=st.integers(0, 6),
    dst=st.integers(0, 7),
    outside=st.sampled_from(["203.0.113.9", "198.18.5.5"]),
    service=SERVICES,
)
def test_explain_agrees_with_the_policy(src: int, dst: int, outside: str, service: str) -> None:
    p = policy()
    allocs = sample(p)
    a = allocs[src]
    b = allocs[dst] if dst < len(allocs) else None
    if b is a:
        return
    answer = explain(p, fqdn_of(p, a), fqdn_of(p, b) if b else outside, service, allocs)
    proto, _, port = service.partition("/")
    assert answer.passes is meaning(p, a, b, outside, proto, int(port) if port else None), (
        answer.line()
    )


def test_without_br_netfilter_port_limited_members_get_nothing() -> None:
    """lan's members may talk on tcp/22 and icmp only: the inet tables limit
    them, which bridged traffic meets only with br_netfilter. Without it
    they get no direct path at all (fail-closed), while dmz's members (every
    port, by members_reach) keep theirs."""
    from controller.core.desired import PEERS, limited_members, policy_state
    from controller.core.plan import flatten
    from controller.drivers.nft.fake import FakeDataPlane, Packet

    p = policy()
    assert limited_members(p) == ["lan"]
    lan, dmz = ("10.30.0.0/24",) * 2, ("10.40.0.0/24",) * 2
    assert {lan, dmz} <= policy_state(p, []).sets[PEERS]
    without = policy_state(p, [], bridge_netfilter=False)
    assert dmz in without.sets[PEERS] and lan not in without.sets[PEERS]
    allocs = sample(p)
    pc1, pc2 = allocs[0], allocs[1]
    for bnf in (True, False):
        flat = flatten(
            policy_state(p, [], bridge_netfilter=bnf), [machine_state(p, a) for a in allocs]
        )
        assert flat.shape is not None
        fake = FakeDataPlane(flat.shape, flat.sets, flat.addresses, br_netfilter=bnf)
        ssh = Packet(
            pc1.port, pc1.mac, pc2.mac, src="10.30.0.2", dst="10.30.0.3", proto="tcp", dport=22
        )
        web = Packet(
            pc1.port, pc1.mac, pc2.mac, src="10.30.0.2", dst="10.30.0.3", proto="tcp", dport=80
        )
        assert fake.verdict(ssh).reaches(pc2.port) is bnf
        assert not fake.verdict(web).reaches(pc2.port)
