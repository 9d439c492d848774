"""The plan is exactly desired minus applied; per-machine plans agree with
the whole-state plan."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from controller.core.allocation import Allocation
from controller.core.desired import BINDING, PORT_MAC, machine_state, policy_state
from controller.core.plan import EMPTY, Flat, flatten, plan, plan_machines
from controller.policy.load import parse_policy
from tests.unit.test_policy import BASE

POLICY = parse_policy(BASE.encode(), "p.toml")
PSTATE = policy_state(POLICY, [])

alloc = st.builds(
    lambda i, port, addr: Allocation(
        f"52:54:00:00:00:{i:02x}", "web", i + 1, "x", f"10.10.0.{addr}" if addr else None, port
    ),
    st.integers(0, 15),
    st.sampled_from(["vnet1", "vnet2"]),
    st.integers(0, 200).map(lambda a: a + 2 if a else 0),
)
machine_sets = st.lists(alloc, max_size=8, unique_by=lambda a: a.mac)


def flat_of(allocs: list[Allocation]) -> Flat:
    return flatten(PSTATE, [machine_state(POLICY, a) for a in allocs])


def apply(applied: Flat, p) -> Flat:
    sets = {k: set(v) for k, v in applied.sets.items()}
    if p.rebuild:
        sets = {}
    for k, v in p.delete.items():
        sets[k] -= v
    for k, v in p.add.items():
        sets.setdefault(k, set()).update(v)
    hosts = {m: h for m, h in applied.hosts.items() if m not in p.hosts_del}
    hosts.update(p.hosts_put)
    return Flat(
        applied.shape if not p.rebuild else PSTATE.shape,
        {k: frozenset(v) for k, v in sets.items() if v},
        (applied.addresses - p.addresses_del) | p.addresses_add,
        p.dhcp_config or applied.dhcp,
        hosts,
    )


def norm(f: Flat) -> tuple:
    return (f.shape, {k: v for k, v in f.sets.items() if v}, f.addresses, f.dhcp, dict(f.hosts))


@settings(max_examples=200, deadline=None)
@given(machine_sets, machine_sets)
def test_plan_takes_applied_to_desired(before: list, after: list) -> None:
    applied, desired = flat_of(before), flat_of(after)
    p = plan(desired, applied)
    assert norm(apply(applied, p)) == norm(desired)
    assert plan(desired, desired).empty


@settings(max_examples=200, deadline=None)
@given(machine_sets, machine_sets)
def test_machine_plan_equals_whole_plan(before: list, after: list) -> None:
    b = {a.mac: machine_state(POLICY, a) for a in before}
    a = {x.mac: machine_state(POLICY, x) for x in after}
    macs = set(a) | set(b)
    partial = plan_machines({m: a.get(m) for m in macs}, {m: b.get(m) for m in macs})
    whole = plan(flat_of(after), flat_of(before))
    assert {k: v for k, v in partial.add.items() if v} == {k: v for k, v in whole.add.items() if v}
    assert {k: v for k, v in partial.delete.items() if v} == {
        k: v for k, v in whole.delete.items() if v
    }
    assert dict(partial.hosts_put) == dict(whole.hosts_put)
    assert partial.hosts_del == whole.hosts_del


def test_first_plan_is_a_rebuild_and_reads_well() -> None:
    a = Allocation("52:54:00:00:00:01", "web", 1, "x", "10.10.0.9", "vnet1")
    p = plan(flat_of([a]), EMPTY)
    assert p.rebuild
    lines = p.lines()
    # a rebuild is one line (it rewrites every element); the elements are in the JSON
    assert any(x.startswith("nftables: rebuild dom0's tables with ") for x in lines), lines
    assert not any(x.startswith("nftables: add ") for x in lines)
    assert "address: add 10.10.0.1/24 to virbr0" in lines
    assert "dhcp: reserve 52:54:00:00:00:01 -> 10.10.0.9 web1.x" in lines
    assert p.to_json()["add"]["bridge/port_mac"] == [["vnet1", "52:54:00:00:00:01"]]


def test_machine_without_address_has_no_binding_or_reservation() -> None:
    m = machine_state(
        POLICY, Allocation("00:16:3e:00:00:01", "quarantine", 1, "quarantine", None, "vnet3")
    )
    assert m.elements[PORT_MAC] == {("vnet3", "00:16:3e:00:00:01")}
    assert not m.elements[BINDING]
    assert m.dhcp is None


def test_hub_machine_state_binds_its_hub_address_and_gets_a_peer() -> None:
    from controller.policy.load import load_policy
    from tests.unit.test_policy import ROOT

    policy = load_policy(ROOT / "policies" / "lab.toml")
    a = Allocation("52:54:00:d0:00:01", "odd", 1, "x", "10.10.0.9", "vnet1", None, "10.250.3.4")
    key = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="
    m = machine_state(policy, a, key)
    assert m.elements[BINDING] == {("vnet1", "52:54:00:d0:00:01", "10.250.3.4")}
    assert m.dhcp is not None and (m.dhcp.address, m.dhcp.tag) == ("10.250.3.4", "hub-x")
    # its containers' /28 (x: containers = 28 of 10.130.0.0/20, at offset 9) goes
    # through its tunnel too; no route per machine: the hub's covers the pool
    assert m.peer is not None and m.peer.allowed_ips == ("10.10.0.9/32", "10.130.0.144/28")
    assert not m.routes and not m.elements.get(("bridge", "binding_net"))
    ps = policy_state(policy, [])
    assert ("hub0", "10.10.0.1/24") in ps.addresses and ("virbr0", "10.250.0.1/16") in ps.addresses
    assert ("virbr0", "10.10.0.1/24") not in ps.addresses
    # hub domains talk directly on the bridge to nobody, but reach each other via the hub
    from controller.core.desired import PEERS, REACH

    assert ps.sets[PEERS] == frozenset()
    assert ("10.10.0.0/24", "10.10.0.0/24") in ps.sets[REACH]
    assert ("hub-x", "x.internal") in ps.dhcp.tag_domains
    p = plan(flatten(ps, [m]), EMPTY)
    assert f"hub: peer {key} allowed 10.10.0.9/32, 10.130.0.144/28" in p.lines()


@settings(max_examples=300, deadline=None)
@given(machine_sets, machine_sets, st.sets(st.integers(0, 15)))
def test_a_few_machines_plan_equals_whole_plan_with_port_mates(
    before: list, after: list, touched: set
) -> None:
    """Machines of one port share its elements (PORT_SETS): planning only the
    machines that changed, with their port's other machines as context, is
    the whole plan."""
    from controller.core.desired import port_of

    b = {a.mac: machine_state(POLICY, a) for a in before}
    # machines outside `touched` keep their applied state
    changed = {f"52:54:00:00:00:{i:02x}" for i in touched}
    a = {x.mac: machine_state(POLICY, x) for x in after if x.mac in changed}
    a.update({m: s for m, s in b.items() if m not in changed})
    # (allocation keeps addresses unique: so must the worlds compared here)
    for world in (a, b):
        addresses = [h.dhcp.address for h in world.values() if h.dhcp is not None]
        assume(len(addresses) == len(set(addresses)))
    macs = changed & (set(a) | set(b))
    ports = {port_of(s) for m in macs for s in (a.get(m), b.get(m)) if s is not None}
    context = [s for m, s in b.items() if m not in macs and port_of(s) in ports]
    partial = plan_machines({m: a.get(m) for m in macs}, {m: b.get(m) for m in macs}, context)
    whole = plan(
        flatten(PSTATE, a.values()),
        flatten(PSTATE, b.values()),
    )
    assert {k: v for k, v in partial.add.items() if v} == {k: v for k, v in whole.add.items() if v}
    assert {k: v for k, v in partial.delete.items() if v} == {
        k: v for k, v in whole.delete.items() if v
    }
