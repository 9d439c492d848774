"""Containers on dom0's side, from plain data: the policy's `containers` and
`containers_pool`, the prefix each machine is delegated, what dom0 binds and
routes for it, the fake data plane's verdicts on containers' packets, and the
rows `dom0 status` shows from an agent's (hostile) report."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.api.status import with_containers
from controller.core.agentconfig import machine_config
from controller.core.allocation import Allocation
from controller.core.desired import BINDING_NET, REACH, machine_state, policy_state
from controller.core.plan import flatten
from controller.drivers.nft.fake import FakeDataPlane, Packet
from controller.drivers.nft.ruleset import chains
from controller.policy.load import PolicyError, parse_policy
from controller.policy.model import Policy

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = (ROOT / "policies" / "lab-bridge.toml").read_text()
HUB = (ROOT / "policies" / "lab.toml").read_text()
VM1 = Allocation("52:54:00:d0:00:01", "odd", 1, "x", "10.10.0.5", "vnet1")
VM3 = Allocation("52:54:00:d0:00:03", "odd", 2, "x", "10.10.0.6", "vnet3")
VM2 = Allocation("52:54:00:d0:00:02", "even", 1, "y", "10.20.0.5", "vnet2")
KEY = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="


def policy(text: str = BRIDGE) -> Policy:
    return parse_policy(text.encode(), "p.toml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        policy(text)
    return [str(p) for p in e.value.problems]


X = 'containers = 28\ncontainers_pool = "10.130.0.0/20"\n'


@pytest.mark.parametrize(
    ("new", "says"),
    [
        ("containers = 28\n", "domains.x.containers_pool: missing"),
        ('containers_pool = "10.130.0.0/20"\n', "domains.x.containers: missing"),
        ('containers = 28\ncontainers_pool = "10.30.0.0/21"\n',
         "holds 128 /28 prefixes, expected one per address of domains.x.pool 10.10.0.0/24 (256): "
         "a /20 or larger"),
        ('containers = 31\ncontainers_pool = "10.130.0.0/20"\n',
         "domains.x.containers: 31, expected an integer from 16 to 30"),
        ('containers = 16\ncontainers_pool = "10.130.0.0/20"\n', "/16 is larger than"),
        ('containers = 28\ncontainers_pool = "10.140.0.0/20"\n', "domains.y.containers_pool: 10.140.0.0/20 overlaps domains.x.containers_pool"),
        ('containers = 28\ncontainers_pool = "10.20.0.0/20"\n', "overlaps domains.y.pool"),
        ('containers = 28\ncontainers_pool = "10.30.0.1/20"\n', "is not an IPv4 network"),
    ],
)  # fmt: skip
def test_bad_containers_settings_are_one_line(new: str, says: str) -> None:
    out = problems(BRIDGE.replace(X, new, 1))
    assert len(out) == 1 and says in out[0], out
    assert out[0].startswith(("p.toml: domains.x.containers", "p.toml: domains.y.containers")), out


@given(st.sets(st.integers(1, 254), min_size=2, max_size=40))
def test_delegations_are_disjoint_and_inside_the_containers_pool(hosts: set[int]) -> None:
    d = policy().domains["x"]
    assert d.containers_pool is not None
    prefixes = [d.delegated(str(d.pool.network_address + h)) for h in sorted(hosts)]
    for p in prefixes:
        assert p is not None and p.prefixlen == 28 and p.subnet_of(d.containers_pool)
    for i, a in enumerate(prefixes):
        for b in prefixes[i + 1 :]:
            assert a is not None and b is not None and not a.overlaps(b)


def test_the_delegation_follows_the_address_only() -> None:
    d = policy().domains["x"]
    assert d.delegated("10.10.0.5") == IPv4Network("10.130.0.80/28")
    assert d.delegated("10.10.0.5") == policy().domains["x"].delegated("10.10.0.5")
    assert policy().domains["x"].delegated(None) is None
    plain = policy(BRIDGE.replace(X, "", 1)).domains["x"]
    assert plain.delegated("10.10.0.5") is None and plain.nets == (plain.pool,)


def test_a_bridge_machine_is_bound_and_routed_for_its_prefix() -> None:
    p = policy()
    m = machine_state(p, VM1)
    assert m.elements[BINDING_NET] == {("vnet1", VM1.mac, "10.130.0.80/28")}
    assert m.routes == {("10.130.0.80/28", "10.10.0.5", "virbr0")}
    c = machine_config(p, VM1, None)
    assert c is not None and c.containers == "10.130.0.80/28"
    # the domain's policy holds for its containers' pool as for its pool
    reach = policy_state(p, []).sets[REACH]
    assert ("10.130.0.0/20", "10.10.0.0/24") in reach and ("10.10.0.0/24", "10.130.0.0/20") in reach
    assert not any("10.140.0.0/20" in e and "10.10.0.0/24" in e for e in reach)


def test_a_hub_machine_has_its_prefix_in_its_peer_and_the_hub_a_route() -> None:
    p = policy(HUB)
    a = Allocation(VM1.mac, "odd", 1, "x", "10.10.0.9", "vnet1", None, "10.250.3.4")
    m = machine_state(p, a, KEY)
    assert m.peer is not None and m.peer.allowed_ips == ("10.10.0.9/32", "10.130.0.144/28")
    assert not m.routes and BINDING_NET not in m.elements
    assert ("10.130.0.0/20", "", "hub0") in policy_state(p, []).routes
    c = machine_config(p, a, KEY)
    assert c is not None and c.containers == "10.130.0.144/28"


def fake(p: Policy) -> FakeDataPlane:
    return FakeDataPlane.from_flat(
        flatten(policy_state(p, []), [machine_state(p, a) for a in (VM1, VM2, VM3)])
    )


def test_containers_packets_in_the_fake() -> None:
    """A container of vm1 (x) reaches vm3 (x) and vm3's containers through
    dom0, not vm2 (y); vm1 sending from vm3's prefix is dropped at its port.
    The controls: the same packets from vm1's own address or prefix pass."""
    p = policy()
    f = fake(p)
    own, other = "10.130.0.82", "10.130.0.98"  # in vm1's and in vm3's prefix

    def to(src: str, dst: str) -> frozenset[str]:
        return f.verdict(
            Packet("vnet1", VM1.mac, src=src, dst=dst, proto="tcp", dport=80)
        ).delivered

    assert to(own, "10.10.0.6") == {"vnet3"}
    assert to(own, other) == {"vnet3"}  # (routed through vm3)
    assert to(own, "10.20.0.5") == frozenset()
    assert to("10.10.0.5", "10.10.0.6") == {"vnet3"}  # control: vm1 itself
    forged = f.verdict(Packet("vnet1", VM1.mac, src=other, dst="10.10.0.6", proto="tcp", dport=80))
    assert not forged.delivered and forged.drops[0].chain == "police_source"
    opened = fake(policy(BRIDGE.replace("[domains.x]\n", '[domains.x]\nreach = ["y"]\n', 1)))
    got = opened.verdict(Packet("vnet1", VM1.mac, src=own, dst="10.20.0.5", proto="tcp", dport=80))
    assert got.delivered == {"vnet2"}  # control: x may reach y, its containers too


def row(report: object) -> dict:
    agents = {"web1.x.internal": {"name": "web1.x.internal", "report": report}}
    m = {"name": "web1.x.internal", "domain": "x", "address": "10.10.0.5"}
    return with_containers(m, policy(), agents)


def test_status_shows_only_what_the_prefix_and_the_names_allow() -> None:
    good = {"name": "app", "address": "10.130.0.82/28", "fqdn": "app.web1.x.internal"}
    out = row({"containers": [good]})
    assert out["containers_prefix"] == "10.130.0.80/28"
    assert out["containers"] == [{"name": "app", "address": "10.130.0.82",
                                  "fqdn": "app.web1.x.internal",
                                  "interface_fqdn": "eth0.app.web1.x.internal"}]  # fmt: skip
    hostile = [
        {**good, "address": "10.130.0.98/28"},  # another machine's prefix
        {**good, "fqdn": "app.db1.y.internal"},  # a name not under its machine
        {**good, "address": "nonsense"},
        {"name": 5, "address": "10.130.0.83/28"},
        "app",
    ]
    assert row({"containers": hostile})["containers"] == []
    assert row({"containers": "everything"})["containers"] == []
    assert row(None)["containers"] == []
    assert IPv4Address(out["containers"][0]["address"]) in IPv4Network(out["containers_prefix"])


def test_mdns_queries_reach_dom0_only_from_where_agents_enroll() -> None:
    """(Discovery, not containers: the same lab policies.) With `[agents]
    advertise = false`, nothing is let in."""
    assert policy(HUB).mdns_pools == ("10.250.0.0/16",)  # hub domains enroll on the underlay
    assert policy().mdns_pools == ("10.10.0.0/24", "10.20.0.0/24")
    no_y = BRIDGE.replace('services = ["dns", "icmp", "enroll"]', 'services = ["dns"]', 2)
    no_y = no_y.replace('services = ["dns"]', 'services = ["dns", "icmp", "enroll"]', 1)
    assert policy(no_y).mdns_pools == ("10.10.0.0/24",)
    quiet = BRIDGE.replace("[domains.x]\n", "[agents]\nadvertise = false\n\n[domains.x]\n", 1)
    assert policy(quiet).mdns_pools == ()

    # what the inet table lets in (the fake does not model multicast: the lab
    # test tests/lab/test_agent_lab.py has an agent find dom0 through it)
    assert policy_state(policy(), []).shape.mdns == ("10.10.0.0/24", "10.20.0.0/24")
    assert "224.0.0.251" not in str(
        chains(policy_state(policy(quiet), []).shape)["inet"]["to_host"]
    )
    assert "224.0.0.251" in str(chains(policy_state(policy(), []).shape)["inet"]["to_host"])
