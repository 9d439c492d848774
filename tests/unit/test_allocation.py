"""Slots and addresses: never colliding, stable, reproducible after a restart."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.allocation import Allocation, Ledger, PoolExhausted, Target, assign

POOL = ipaddress.IPv4Network("10.10.0.0/28")  # 13 usable addresses: exhaustion is reachable
GW = ipaddress.IPv4Address("10.10.0.1")
T = Target("web", "x", POOL, GW, 12)
T2 = Target("db", "x", POOL, GW, 5)  # shares the pool with "web"
Q = Target("quarantine", "quarantine", None, None, 1000)

macs = st.sampled_from([f"52:54:00:00:00:{i:02x}" for i in range(20)])
ops = st.lists(
    st.tuples(st.sampled_from(["come", "go", "wait"]), macs, st.sampled_from([T, T2, Q])),
    max_size=60,
)


def check_invariants(ledger: Ledger) -> None:
    slots = set()
    addrs = set()
    for a in ledger.by_mac.values():
        assert (a.rule, a.slot) not in slots
        slots.add((a.rule, a.slot))
        if a.address is not None:
            assert (a.domain, a.address) not in addrs
            addrs.add((a.domain, a.address))
            ip = ipaddress.IPv4Address(a.address)
            assert ip in POOL and ip not in (GW, POOL.network_address, POOL.broadcast_address)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_no_collisions_and_stable(ops: list) -> None:
    ledger = Ledger()
    now = 1000
    for op, mac, target in ops:
        if op == "wait":
            now += 50
            continue
        if op == "go":
            a = ledger.get(mac)
            if a is not None and a.absent_since is None:
                ledger.put(Allocation(**{**_d(a), "absent_since": now}))
            continue
        before = ledger.get(mac)
        try:
            d = assign(ledger, target, mac, "vnet1", now, release_after=100)
        except PoolExhausted:
            assert ledger.get(mac) == before  # untouched on failure
            continue
        if before is not None and before.rule == target.rule and before.domain == target.domain:
            # a returning or present machine keeps its slot and address
            assert (d.allocation.slot, d.allocation.address) == (before.slot, before.address)
        for r in d.released:
            assert r.absent_since is not None and now - r.absent_since >= 100
        check_invariants(ledger)
        # deciding again changes nothing
        again = assign(ledger, target, mac, "vnet1", now, release_after=100)
        assert again.allocation == d.allocation and not again.changed
    # a restarted controller (ledger rebuilt from stored rows) sees the same
    rebuilt = Ledger(list(ledger.by_mac.values()))
    assert rebuilt.by_mac == ledger.by_mac
    check_invariants(rebuilt)


def _d(a: Allocation) -> dict:
    return {k: getattr(a, k) for k in a.__slots__}


def test_lowest_free_slot_and_reuse_after_release() -> None:
    ledger = Ledger()
    got = [assign(ledger, T, f"52:54:00:00:00:{i:02x}", "p", 0, 100).allocation for i in range(3)]
    assert [a.slot for a in got] == [1, 2, 3]
    ledger.put(Allocation(**{**_d(got[1]), "absent_since": 0}))
    # absent but not yet released: a newcomer takes slot 4, not 2
    assert assign(ledger, T, "52:54:00:00:00:aa", "p", 50, 100).allocation.slot == 4
    # the machine comes back: same slot and address
    back = assign(ledger, T, got[1].mac, "p", 60, 100).allocation
    assert (back.slot, back.address) == (2, got[1].address)


def test_full_pool_reclaims_the_longest_gone_only_after_release() -> None:
    ledger = Ledger()
    small = Target("web", "x", ipaddress.IPv4Network("10.10.0.0/29"), GW, 100)  # 5 addresses
    allocs = [
        assign(ledger, small, f"52:54:00:00:01:{i:02x}", "p", 0, 100).allocation for i in range(5)
    ]
    try:
        assign(ledger, small, "52:54:00:00:02:00", "p", 0, 100)
        raise AssertionError("pool should be full")
    except PoolExhausted as e:
        assert "full" in e.what
    ledger.put(Allocation(**{**_d(allocs[3]), "absent_since": 10}))
    ledger.put(Allocation(**{**_d(allocs[1]), "absent_since": 5}))
    try:
        assign(ledger, small, "52:54:00:00:02:00", "p", 50, 100)  # not gone long enough
        raise AssertionError("must not reclaim early")
    except PoolExhausted:
        pass
    d = assign(ledger, small, "52:54:00:00:02:00", "p", 200, 100)
    assert [r.mac for r in d.released] == [allocs[1].mac]
    assert d.allocation.address == allocs[1].address


def test_addresses_look_arbitrary_but_are_reproducible() -> None:
    big = Target(
        "web", "x", ipaddress.IPv4Network("10.64.0.0/16"), ipaddress.IPv4Address("10.64.0.1"), 60000
    )
    a = [
        assign(Ledger(), big, f"52:54:00:00:00:{i:02x}", "p", 0, 1).allocation.address
        for i in range(5)
    ]
    b = [
        assign(Ledger(), big, f"52:54:00:00:00:{i:02x}", "p", 0, 1).allocation.address
        for i in range(5)
    ]
    assert a == b
    assert len(set(a)) == 5
    assert a != sorted(a, key=str)


def test_new_addresses_avoid_what_the_dhcp_server_has_read_while_the_pool_has_others() -> None:
    ledger = Ledger()
    first = assign(ledger, T, "52:54:00:00:00:01", "vnet1", 0, 60).allocation
    assert first.address is not None
    ledger.remove(first.mac)
    # the same machine again gets the same address: nothing to avoid
    again = assign(ledger, T, first.mac, "vnet1", 0, 60).allocation
    assert again.address == first.address
    ledger.remove(first.mac)
    ledger.avoid = {first.address}
    fresh = assign(ledger, T, first.mac, "vnet1", 0, 60).allocation
    assert fresh.address != first.address
    # once every free address is one to avoid, one of them is used all the same
    ledger.remove(first.mac)
    ledger.avoid = {str(ip) for ip in POOL.hosts()}
    last = assign(ledger, T, first.mac, "vnet1", 0, 60).allocation
    assert last.address is not None


def test_a_pinned_slot_gets_its_address_and_nobody_else_does() -> None:
    pinned = Target(
        "web", "x", POOL, GW, 12, pins=((1, "10.10.0.9"),), pinned=frozenset({"10.10.0.9"})
    )
    # a machine holding the address from before the pin gives it up
    ledger = Ledger()
    squatter = None
    for i in range(40):
        a = assign(ledger, T2, f"52:54:00:00:02:{i:02x}", "p", 0, 60).allocation
        if a.address == "10.10.0.9":
            squatter = a
            break
        ledger.remove(a.mac)
    assert squatter is not None
    d = assign(ledger, pinned, "52:54:00:00:00:01", "vnet1", 0, 60)
    assert d.allocation.address == "10.10.0.9" and d.allocation.slot == 1
    assert [r.mac for r in d.released] == [squatter.mac]
    # the rule's other slots, and other rules of the domain, never get it
    rest = [
        assign(ledger, pinned, f"52:54:00:00:03:{i:02x}", "p", 0, 60).allocation for i in range(9)
    ]
    t2 = Target("db", "x", POOL, GW, 5, pinned=frozenset({"10.10.0.9"}))
    rest += [assign(ledger, t2, f"52:54:00:00:04:{i:02x}", "p", 0, 60).allocation for i in range(1)]
    assert all(a.address != "10.10.0.9" for a in rest)
