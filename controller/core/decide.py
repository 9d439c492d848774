"""Per-machine decisions: where a machine is, what it gets.

Pure functions over the inventory and an in-memory ledger (which `decide`
updates: it is the controller's, or a throw-away copy for `dom0 plan`).

Identity belongs to the port and the rule, not to a MAC the guest picks
(port security, as switches do it):

- A port holds at most `policy.port_limit(rule)` machines (by default one: a
  libvirt NIC has one MAC), all of one domain. A MAC beyond that is refused
  and takes nothing: no slot, no address, no name.
- A new MAC on a full port that matches the rule of one of the port's
  machines *is* that machine: the slot, name, address and tunnel key follow
  it (guests that randomize their MAC keep their identity). On a port of one
  machine that holds as soon as the bridge learns the new MAC; on a port of
  several, once the bridge has forgotten the old one (a new MAC there may be
  another machine). One that matches another rule, or another domain, is
  refused: it never re-matches into another domain.
- A machine is present while the bridge has learned its MAC on its bound
  port, or, once it has held its DHCP lease (`confirmed`), while that port
  exists (an idle VM whose FDB entry aged out is still there). A machine
  that never confirmed is absent as soon as the FDB forgets it (the ageing
  time) and is released at once: a MAC that sent one frame holds nothing for
  long.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from controller.core.allocation import Allocation, Ledger, PoolExhausted, assign, target_for
from controller.core.desired import MachineState, machine_state
from controller.core.inventory import Inventory
from controller.core.matching import match_rule
from controller.policy.model import Policy


@dataclass(frozen=True, slots=True)
class Outcome:
    put: tuple[Allocation, ...] = ()  # allocations to commit
    released: tuple[Allocation, ...] = ()  # allocations given up (to make room, or gone)
    state: MachineState | None = None  # what the data plane should hold for it
    refused: str | None = None  # why it gets nothing although present
    refused_port: str | None = None  # the port it was refused on
    spoof: str | None = None  # the port a bound MAC was also seen on
    new: bool = False  # newly admitted or moved to another address
    took_over: Allocation | None = None  # the port's machine whose identity it now carries


def _on_bound_port(inventory: Inventory, a: Allocation) -> bool:
    port = inventory.ports.get(a.port)
    return port is not None and (a.port_index is None or port.index == a.port_index)


def presence(inventory: Inventory, ledger: Ledger, mac: str) -> tuple[str | None, str | None]:
    """(the port a machine is on or None if gone, a port it was spoofed on)."""
    seen = inventory.sightings.get(mac)
    current = ledger.get(mac)
    if current is not None and current.absent_since is None and _on_bound_port(inventory, current):
        bound = current.port
        if seen == bound:
            return bound, None
        if seen is not None:
            # seen on another port while its own port still exists: a spoof,
            # not a move; the binding stays
            return bound, seen
        return (bound, None) if current.confirmed else (None, None)
    return seen, None


def holders(inventory: Inventory, ledger: Ledger, port: str, but: str) -> list[Allocation]:
    """The machines present on `port` now, other than `but`."""
    out = []
    for mac in ledger.on_port(port):
        a = ledger.get(mac)
        if mac != but and a is not None and presence(inventory, ledger, mac)[0] == port:
            out.append(a)
    return sorted(out, key=lambda a: (a.rule, a.slot))


def decide(
    policy: Policy,
    inventory: Inventory,
    ledger: Ledger,
    mac: str,
    now: int,
    public_key: Callable[[str], str | None] = lambda _key: None,
    leased: Mapping[str, str] | None = None,
) -> Outcome:
    """What `mac` gets now. `public_key(key_id)` is a hub machine's tunnel
    key; `leased` maps MACs to the address their DHCP lease holds."""
    port, spoof = presence(inventory, ledger, mac)
    current = ledger.get(mac)
    if port is None:
        if current is None or current.absent_since is not None:
            return Outcome()
        if not current.confirmed:
            ledger.remove(mac)  # never established: nothing to keep
            return Outcome(released=(current,))
        gone = replace(current, absent_since=now)
        ledger.put(gone)
        return Outcome(put=(gone,))
    rule = match_rule(policy, mac, policy.bridge, port)
    target = target_for(policy, rule.name if rule else None)
    link = inventory.ports.get(port)
    index = link.index if link is not None else None
    arriving = current is None or current.absent_since is not None or current.port != port
    released: tuple[Allocation, ...] = ()
    took_over = None
    if arriving:
        others = holders(inventory, ledger, port, mac)
        foreign = [h for h in others if h.domain != target.domain]
        limit = policy.port_limit(rule)
        if foreign:
            return _refuse(
                ledger,
                current,
                now,
                port,
                f"port {port} belongs to domain {foreign[0].domain!r} and this MAC matches "
                f"{target.domain!r}: one port, one domain",
            )
        if len(others) >= limit:
            # The port's machine with a new MAC: one the bridge no longer
            # sees there, or, on a port of one machine, whose MAC the bridge
            # learned before this one (a guest's old MAC lingers in the FDB
            # for the ageing time). Stable whatever the order of decisions.
            mine = inventory.learned.get(mac)
            same = [
                h
                for h in others
                if h.rule == target.rule
                and (
                    inventory.sightings.get(h.mac) != port
                    or (
                        limit == 1
                        and mine is not None
                        and mine > inventory.learned.get(h.mac, mine)
                    )
                )
            ]
            if not same:
                return _refuse(
                    ledger,
                    current,
                    now,
                    port,
                    f"port {port} already holds its limit of {limit} machine(s) "
                    f"({', '.join(h.mac for h in others[:3])})",
                )
            victim = min(same, key=lambda h: (inventory.sightings.get(h.mac) == port, h.slot))
            ledger.remove(victim.mac)
            if current is not None:
                ledger.remove(mac)
            took_over = replace(
                victim,
                mac=mac,
                port=port,
                port_index=index,
                absent_since=None,
                origin=victim.key_id,
            )
            ledger.put(took_over)
            released = (victim,)
            current = None
    try:
        d = assign(ledger, target, mac, port, now, policy.release_after, index)
    except PoolExhausted as e:
        return Outcome(refused=e.what, refused_port=port)
    allocation = d.allocation
    changed = d.changed or took_over is not None
    bridge_address = allocation.underlay or allocation.address
    # Established once it holds a lease: dnsmasq leases only reservations
    # (static ranges) and only to their own MAC on its own port (DHCP
    # integrity), so any lease of this MAC is one dom0 gave it, perhaps for
    # the address it had before a move.
    if (
        not allocation.confirmed
        and leased is not None
        and bridge_address is not None
        and leased.get(mac) is not None
    ):
        allocation = replace(allocation, confirmed=True)
        ledger.put(allocation)
        changed = True
    return Outcome(
        put=(allocation,) if changed else (),
        released=released + d.released,
        state=machine_state(
            policy,
            allocation,
            public_key(allocation.key_id) if allocation.underlay is not None else None,
        ),
        spoof=spoof,
        new=current is None or current.address != allocation.address,
        took_over=released[0] if released else None,
    )


def _refuse(ledger: Ledger, current: Allocation | None, now: int, port: str, why: str) -> Outcome:
    """Refused on `port`. A machine that held an allocation elsewhere is not
    there any more (presence said so): it becomes absent, nothing else."""
    if current is not None and current.absent_since is None:
        gone = replace(current, absent_since=now)
        ledger.put(gone)
        return Outcome(put=(gone,), refused=why, refused_port=port)
    return Outcome(refused=why, refused_port=port)


def decide_order(ledger: Ledger, macs: set[str]) -> list[str]:
    """Machines that already hold an allocation first, so that a newcomer
    can never take the slot or address of a machine that is simply present."""
    return sorted(macs, key=lambda m: (ledger.get(m) is None, m))


@dataclass(frozen=True, slots=True)
class Decisions:
    """What deciding a set of machines produced (the ledger holds the rest)."""

    outcomes: dict[str, Outcome]  # by MAC, for every MAC decided
    states: dict[str, MachineState | None]  # desired data-plane state; None: nothing
    touched: tuple[str, ...]  # MACs whose allocation changed or went: commit these
    keys_needed: frozenset[str]  # hub machines whose tunnel key does not exist yet


def decide_many(
    policy: Policy,
    inventory: Inventory,
    ledger: Ledger,
    macs: set[str],
    now: int,
    keys: Mapping[str, str],
    leased: Mapping[str, str],
) -> Decisions:
    """Decide every MAC of `macs` (holders first, see `decide_order`); the one
    decision loop of the controller, of `dom0 plan` and of the tests. Pure:
    `keys` (key id -> public key) and `leased` are facts the drivers own."""
    outcomes: dict[str, Outcome] = {}
    states: dict[str, MachineState | None] = {}
    touched: dict[str, None] = {}
    needed: set[str] = set()
    order = decide_order(ledger, macs)
    decided: set[str] = set()
    while order:
        mac = order.pop(0)
        out = decide(policy, inventory, ledger, mac, now, keys.get, leased)
        decided.add(mac)
        outcomes[mac] = out
        states[mac] = out.state
        for a in out.put:
            touched[a.mac] = None
        for r in out.released:
            touched[r.mac] = None
            states[r.mac] = None  # released, possibly after it was decided
            if r.mac in decided and r.mac in macs and r.mac in inventory.sightings:
                # its identity went to another MAC after it was decided: it
                # is a newcomer now (elsewhere, say), decided again in this pass
                decided.discard(r.mac)
                order.append(r.mac)
        held = ledger.get(mac)
        if (
            out.state is not None
            and held is not None
            and held.underlay is not None
            and held.key_id not in keys
        ):
            needed.add(held.key_id)
    return Decisions(outcomes, states, tuple(touched), frozenset(needed))
