"""Rule slots and addresses: who holds which name and address.

A machine (a MAC) holds one slot of the rule it matches; the slot gives its
name (`web{n}` -> web3) and an address from its domain's pool. Slots and
addresses never collide, and once decided they are stored, so they are
stable across restarts. An absent machine keeps both until it has been gone
longer than the policy's `release_after`; only then may another take them.

`Ledger` is the in-memory index of every allocation, kept so that deciding
for one machine costs the same with ten machines present or ten thousand.
It does no I/O: the engine persists what `decide` returns.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network

from controller.policy.model import QUARANTINE, Policy

QUARANTINE_RULE = QUARANTINE


@dataclass(frozen=True, slots=True)
class Allocation:
    mac: str
    rule: str  # rule name, or "quarantine"
    slot: int  # 1-based, within the rule
    domain: str  # domain name, or "quarantine"
    address: str | None  # None: quarantined without a quarantine pool
    port: str  # the bridge port the MAC is bound to
    absent_since: int | None = None  # unix time the machine was last seen leaving
    underlay: str | None = None  # hub domains: its bridge address (tunnel UDP, DHCP)
    port_index: int | None = None  # the port's ifindex: a re-created port is another port
    confirmed: bool = False  # has held its DHCP lease: an established machine
    origin: str | None = None  # the MAC it was first allocated for (its tunnel key's name)
    # A remap (core/remap.py): the address it had before, still its own
    # (bound, routed, answered) until previous_until, when it goes back to the pool
    previous: str | None = None
    previous_until: int | None = None
    remapped_at: int | None = None  # unix time of its last remap (or when it was scheduled)

    @property
    def key_id(self) -> str:
        """Names the machine's tunnel key: its identity, which follows the
        slot when a guest changes its MAC within its rule."""
        return self.origin or self.mac

    def released(self, now: int, release_after: int) -> bool:
        return self.absent_since is not None and now - self.absent_since >= release_after


@dataclass(frozen=True, slots=True)
class Target:
    """What the policy says a machine should get (before slots/addresses)."""

    rule: str
    domain: str
    pool: IPv4Network | None
    gateway: IPv4Address | None
    max_slots: int
    underlay: IPv4Network | None = None  # hub domains: the hub's bridge pool
    underlay_gateway: IPv4Address | None = None
    pins: tuple[tuple[int, str], ...] = ()  # this rule's (slot, fixed address)
    pinned: frozenset[str] = frozenset()  # every fixed address of the domain

    def pin(self, slot: int) -> str | None:
        return next((a for s, a in self.pins if s == slot), None)


UNDERLAY = "@underlay"  # the address space of hub machines' bridge addresses


class PoolExhausted(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def target_for(policy: Policy, rule_name: str | None) -> Target:
    if rule_name is None:
        q = policy.quarantine
        size = _capacity(q.pool) if q.pool else 1 << 16
        return Target(QUARANTINE_RULE, QUARANTINE, q.pool, q.gateway, size)
    rule = policy.rule(rule_name)
    assert rule is not None, f"no rule {rule_name!r}"
    domain = policy.domains[rule.domain]
    hub = policy.hub if domain.hub else None
    return Target(
        rule.name,
        domain.name,
        domain.pool,
        domain.gateway,
        rule.max_slots,
        hub.pool if hub else None,
        hub.gateway if hub else None,
        rule.pins,
        policy.pinned.get(domain.name, frozenset()),
    )


def _capacity(pool: IPv4Network) -> int:
    return max(pool.num_addresses - 3, 1)


def _hosts_start(pool: IPv4Network, key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % pool.num_addresses


class Ledger:
    """Every allocation, indexed by MAC, by (rule, slot) and by (domain, address)."""

    def __init__(self, allocations: Iterable[Allocation] = ()) -> None:
        self.by_mac: dict[str, Allocation] = {}
        self.slots: dict[str, dict[int, str]] = {}  # rule -> slot -> mac
        self.addresses: dict[str, dict[str, str]] = {}  # domain -> address -> mac
        self._hint: dict[str, int] = {}  # rule -> every slot below it is held
        self.ports: dict[str, set[str]] = {}  # port -> macs bound to it
        # Addresses handed out last while the pool has others: those the
        # running DHCP server has read already (see drivers/dhcp.py, burnt).
        self.avoid: Set[str] = frozenset()
        self.version = 0  # counts changes: what indexes built elsewhere are keyed on
        for a in allocations:
            self.put(a)

    def __len__(self) -> int:
        return len(self.by_mac)

    def get(self, mac: str) -> Allocation | None:
        return self.by_mac.get(mac)

    def put(self, a: Allocation) -> None:
        old = self.by_mac.get(a.mac)
        if old is not None:
            self._unindex(old)
        holder = self.slots.setdefault(a.rule, {}).get(a.slot)
        if holder is not None and holder != a.mac:
            raise ValueError(f"slot {a.rule}/{a.slot} already held by {holder}")
        held = ((a.domain, a.address), (a.domain, a.previous), (UNDERLAY, a.underlay))
        for space, address in held:
            if address is None:
                continue
            holder = self.addresses.setdefault(space, {}).get(address)
            if holder is not None and holder != a.mac:
                raise ValueError(f"address {address} in {space} already held by {holder}")
        for space, address in held:
            if address is not None:
                self.addresses[space][address] = a.mac
        self.slots[a.rule][a.slot] = a.mac
        self.ports.setdefault(a.port, set()).add(a.mac)
        self.by_mac[a.mac] = a
        self.version += 1

    def remove(self, mac: str) -> Allocation | None:
        old = self.by_mac.pop(mac, None)
        if old is not None:
            self._unindex(old)
            self.version += 1
        return old

    def on_port(self, port: str) -> frozenset[str]:
        return frozenset(self.ports.get(port, ()))

    def _unindex(self, a: Allocation) -> None:
        self.slots.get(a.rule, {}).pop(a.slot, None)
        macs = self.ports.get(a.port)
        if macs is not None:
            macs.discard(a.mac)
            if not macs:
                del self.ports[a.port]
        if a.slot < self._hint.get(a.rule, 1):
            self._hint[a.rule] = a.slot
        for address in (a.address, a.previous):
            if address is not None:
                self.addresses.get(a.domain, {}).pop(address, None)
        if a.underlay is not None:
            self.addresses.get(UNDERLAY, {}).pop(a.underlay, None)

    # -- choosing ----------------------------------------------------------------
    def free_slot(self, t: Target) -> int | None:
        held = self.slots.get(t.rule, {})
        n = self._hint.get(t.rule, 1)
        while n in held:
            n += 1
        self._hint[t.rule] = n
        return n if n <= t.max_slots else None

    def free_address(self, t: Target, key: str) -> str | None:
        return self.free_in(t.domain, t.pool, t.gateway, key, t.pinned)

    def free_underlay(self, t: Target, key: str) -> str | None:
        return self.free_in(UNDERLAY, t.underlay, t.underlay_gateway, key)

    def free_in(
        self,
        space: str,
        pool: IPv4Network | None,
        gateway: IPv4Address | None,
        key: str,
        pinned: Set[str] = frozenset(),
    ) -> str | None:
        """An unused host address of the pool, starting from a point derived
        from `key` so that addresses look arbitrary but are reproducible."""
        if pool is None:
            return None
        used = self.addresses.get(space, {})
        size = pool.num_addresses
        base = int(pool.network_address)
        start = _hosts_start(pool, key)
        reserved = {base, base + size - 1}
        if gateway is not None:
            reserved.add(int(gateway))
        fallback: str | None = None
        for i in range(size):
            candidate = base + (start + i) % size
            if candidate in reserved:
                continue
            text = str(IPv4Address(candidate))
            if text not in used and text not in pinned:
                if text not in self.avoid:
                    return text
                if fallback is None:
                    fallback = text
        return fallback

    def reclaimable(self, rule: str, domain: str, now: int, release_after: int) -> list[Allocation]:
        """Released allocations that hold a slot of `rule` or an address of
        `domain`, longest gone first. Only scanned when a pool is full."""
        out = [
            a
            for a in self.by_mac.values()
            if (a.rule == rule or a.domain == domain or a.underlay is not None)
            and a.released(now, release_after)
        ]
        return sorted(out, key=lambda a: (a.absent_since or 0, a.mac))


@dataclass(frozen=True, slots=True)
class Decision:
    allocation: Allocation
    released: tuple[Allocation, ...] = ()  # allocations given up to make room
    changed: bool = True


@functools.lru_cache(maxsize=1 << 16)
def _address(text: str) -> IPv4Address:
    # (a full sync asks this of every machine; parsing 10,000 addresses each
    # time is a tenth of its cost)
    return IPv4Address(text)


def fits(current: Allocation, t: Target) -> bool:
    """Whether a machine may keep its allocation under (possibly new) target t."""
    if current.rule != t.rule or current.domain != t.domain or current.slot > t.max_slots:
        return False
    if t.pool is None or current.address is None:
        return t.pool is None and current.address is None
    pin = t.pin(current.slot)
    if pin is not None or current.address in t.pinned:
        return current.address == pin  # its own pin, and never another's
    address = _address(current.address)
    return (
        address in t.pool
        and address != t.gateway
        and address
        not in (
            t.pool.network_address,
            t.pool.broadcast_address,
        )
    )


def assign(
    ledger: Ledger,
    t: Target,
    mac: str,
    port: str,
    now: int,
    release_after: int,
    port_index: int | None = None,
) -> Decision:
    """Decide, and record in the ledger, the allocation `mac` holds under `t`.

    Keeps the current slot and address when they still fit; otherwise takes
    the lowest free slot and a free address, reclaiming released allocations
    (longest gone first) only when the rule or the pool is full. On
    PoolExhausted the ledger is left as it was."""
    current = ledger.get(mac)
    if current is not None and fits(current, t):
        if (current.port, current.port_index, current.absent_since) == (port, port_index, None):
            return Decision(current, changed=False)
        updated = replace(current, port=port, port_index=port_index, absent_since=None)
        ledger.put(updated)
        return Decision(updated)

    if current is not None:
        ledger.remove(mac)
    released: list[Allocation] = []
    key = f"{t.domain}|{t.rule}|{mac}"
    victims: Iterator[Allocation] | None = None
    while True:
        slot = ledger.free_slot(t)
        pin = t.pin(slot) if slot is not None else None
        if pin is not None:
            holder = ledger.addresses.get(t.domain, {}).get(pin)
            if holder is not None and holder != mac:
                # held from before the pin: that machine moves (decided again)
                evicted = ledger.remove(holder)
                if evicted is not None:
                    released.append(evicted)
        address = pin if pin is not None else ledger.free_address(t, key)
        underlay = ledger.free_underlay(t, key)
        if (
            slot is not None
            and (t.pool is None or address is not None)
            and (t.underlay is None or underlay is not None)
        ):
            break
        if victims is None:
            victims = iter(ledger.reclaimable(t.rule, t.domain, now, release_after))
        victim = next(victims, None)
        if victim is None:
            for a in released:
                ledger.put(a)
            if current is not None:
                ledger.put(current)
            if slot is None:
                raise PoolExhausted(f"rule {t.rule!r} has no free slot")
            raise PoolExhausted(f"pool {t.pool if address is None else t.underlay} is full")
        ledger.remove(victim.mac)
        released.append(victim)
    allocation = Allocation(
        mac,
        t.rule,
        slot,
        t.domain,
        address,
        port,
        None,
        underlay,
        port_index,
        confirmed=current.confirmed if current is not None else False,
        origin=current.origin if current is not None else None,
    )
    ledger.put(allocation)
    return Decision(allocation, tuple(released))
