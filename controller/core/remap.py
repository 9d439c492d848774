"""Scheduled remapping, make-before-break: when a machine's address moves,
and what its allocation looks like through the move.

A domain with `remap_every` gives each of its machines a new address once per
interval. The machines' remaps are spread over the interval, not done at once:
each slot has a phase (a stable hash of its rule and number), and its remaps
fall at the times congruent to that phase. At a remap the new address is
committed with the old one kept as `previous` until `previous_until` (now +
`remap_grace`): both are the machine's (bound, routed, named in reverse),
the new one is the one its agent prefers and DNS publishes. When the grace
is over, `previous` is dropped and the address goes back to the pool. A
machine is never remapped while it still holds a previous address, nor one
whose rule pins its address.

Pure: allocations and times in, allocations out. The reconciler chooses the
new addresses (its ledger) and commits.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from controller.core.allocation import Allocation
from controller.policy.model import QUARANTINE, Domain, Policy


def phase(a: Allocation, every: int) -> int:
    """Seconds into each interval at which this slot's remap falls."""
    digest = hashlib.sha256(f"{a.rule}/{a.slot}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % every


def next_remap(a: Allocation, domain: Domain) -> int | None:
    """When the machine's next remap falls (None: its domain never remaps,
    or it has not been scheduled yet)."""
    every, grace = domain.remap_every, domain.remap_grace
    if every is None or grace is None or a.remapped_at is None:
        return None
    last = a.remapped_at
    t = last + (phase(a, every) - last) % every
    if t - last < grace:  # (never before the last remap's grace is over)
        t += every
    return t


def remappable(policy: Policy, a: Allocation) -> Domain | None:
    """The machine's domain if it remaps this machine at all."""
    if a.rule == QUARANTINE or a.address is None or a.absent_since is not None:
        return None
    domain = policy.domains.get(a.domain)
    if domain is None or domain.remap_every is None:
        return None
    rule = policy.rule(a.rule)
    if rule is not None and rule.pins:
        return None  # (its rule fixes its addresses: a published port points at one)
    return domain


def unscheduled(policy: Policy, allocations: list[Allocation], now: int) -> list[Allocation]:
    """Machines of remapping domains that have no schedule yet: scheduled from now."""
    return [
        replace(a, remapped_at=now)
        for a in allocations
        if a.remapped_at is None and remappable(policy, a) is not None
    ]


def due(policy: Policy, allocations: list[Allocation], now: int) -> list[Allocation]:
    """Machines whose remap has come (and that hold no previous address)."""
    out = []
    for a in allocations:
        domain = remappable(policy, a)
        if domain is None or a.previous is not None:
            continue
        t = next_remap(a, domain)
        if t is not None and t <= now:
            out.append(a)
    return out


def moved(a: Allocation, new_address: str, now: int, grace: int) -> Allocation:
    """The allocation once remapped: the new address, the old one kept for the grace."""
    return replace(
        a, address=new_address, previous=a.address, previous_until=now + grace, remapped_at=now
    )


def expired(allocations: list[Allocation], now: int) -> list[Allocation]:
    """Allocations whose previous address's grace is over, without it."""
    return [
        replace(a, previous=None, previous_until=None)
        for a in allocations
        if a.previous is not None and (a.previous_until is None or a.previous_until <= now)
    ]


def next_event(policy: Policy, allocations: list[Allocation]) -> int | None:
    """The earliest time something is to be done: a remap or an expiry."""
    times = []
    for a in allocations:
        if a.previous is not None and a.previous_until is not None:
            times.append(a.previous_until)
        domain = remappable(policy, a)
        if domain is not None and a.previous is None:
            t = next_remap(a, domain)
            if t is not None:
                times.append(t)
    return min(times) if times else None
