"""Per-machine decisions: where a machine is, what it gets.

Pure functions over the inventory and an in-memory ledger (which `decide`
updates: it is the controller's, or a throw-away copy for `dom0 plan`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from controller.core.allocation import Allocation, Ledger, PoolExhausted, assign, target_for
from controller.core.desired import MachineState, machine_state
from controller.core.inventory import Inventory
from controller.core.matching import match_rule
from controller.policy.model import Policy


@dataclass(frozen=True, slots=True)
class Outcome:
    put: tuple[Allocation, ...] = ()  # allocations to commit
    released: tuple[Allocation, ...] = ()  # allocations given up to make room
    state: MachineState | None = None  # what the data plane should hold for it
    refused: str | None = None  # why it gets nothing although present
    spoof: str | None = None  # the port a bound MAC was also seen on
    new: bool = False  # newly admitted or moved to another address


def presence(inventory: Inventory, ledger: Ledger, mac: str) -> tuple[str | None, str | None]:
    """(the port a machine is on or None if gone, a port it was spoofed on).

    Present while the bridge has learned its MAC, or while the port it is
    bound to still exists (an idle VM whose FDB entry aged out is still
    there). A MAC seen on another port while its bound port still exists is
    a spoof, not a move: the binding stays."""
    seen = inventory.sightings.get(mac)
    current = ledger.get(mac)
    bound = current.port if current and current.absent_since is None else None
    if bound is not None and bound in inventory.ports:
        return bound, (seen if seen is not None and seen != bound else None)
    return seen, None


def decide(
    policy: Policy,
    inventory: Inventory,
    ledger: Ledger,
    mac: str,
    now: int,
    public_key: Callable[[str], str | None] = lambda _mac: None,
) -> Outcome:
    """What `mac` gets now. `public_key(mac)` is its hub tunnel's key (only
    asked for machines of hub domains)."""
    port, spoof = presence(inventory, ledger, mac)
    current = ledger.get(mac)
    if port is None:
        if current is not None and current.absent_since is None:
            gone = replace(current, absent_since=now)
            ledger.put(gone)
            return Outcome(put=(gone,))
        return Outcome()
    rule = match_rule(policy, mac, policy.bridge, port)
    target = target_for(policy, rule.name if rule else None)
    try:
        d = assign(ledger, target, mac, port, now, policy.release_after)
    except PoolExhausted as e:
        return Outcome(refused=e.what)
    return Outcome(
        put=(d.allocation,) if d.changed else (),
        released=d.released,
        state=machine_state(
            policy,
            d.allocation,
            public_key(mac) if d.allocation.underlay is not None else None,
        ),
        spoof=spoof,
        new=current is None or current.address != d.allocation.address,
    )


def decide_order(ledger: Ledger, macs: set[str]) -> list[str]:
    """Machines that already hold an allocation first, so that a newcomer
    can never take the slot or address of a machine that is simply present."""
    return sorted(macs, key=lambda m: (ledger.get(m) is None, m))
