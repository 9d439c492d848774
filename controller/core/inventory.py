"""The observed network: the kernel's link table and bridge FDB, folded from events.

Pure and I/O-free. A source (`controller.sources.netlink`) turns netlink messages
into the events below; `fold` applies them to immutable `Tables`; `inventory`
answers "which machines (MACs) sit on which ports of the managed bridge".

Semantics worth knowing:

- **Snapshot replaces everything.** Events are level-style upserts/deletes keyed
  by ifindex or (MAC, port): folding an event twice, or folding events that
  happened *before* a Snapshot on top of it, converges to the kernel's state
  (what the source relies on when it dumps while events keep arriving).
- **Link.up** is what the source computes; the netlink source sets it to
  IFF_UP *and* IFF_RUNNING, i.e. administratively up and operationally up
  (operstate UP, or UNKNOWN for devices without carrier reporting). A bridge
  port whose peer is down (NO-CARRIER / LOWERLAYERDOWN) is therefore not up.
- **One MAC, one port per bridge.** The kernel's FDB holds at most one entry per
  (MAC, VLAN) per bridge; when a station moves, the kernel only announces the new
  port (RTM_NEWNEIGH), never a delete for the old one. So an `FdbUp` evicts any
  other entry of that MAC in the same bridge. "Same bridge" is the entry's own
  `Fdb.master` (NDA_MASTER, the bridge as of the event) when known, else the
  port's current master: using the event's bridge keeps a replayed old event
  from evicting an entry of the bridge its port has moved to since.
- **Duplicates.** If a MAC still has entries on two ports of the managed bridge
  (e.g. an entry was seen before the link owning it, or entries without
  `master`), the sighting is the entry seen **most recently** (a sequence number
  stored in Tables); ties (entries of one Snapshot) go to the higher port
  ifindex (the newer port).
- **Link removal** drops the link's FDB entries (the kernel normally sends
  RTM_DELNEIGH for each, but nothing relies on it).
- **Not machines:** permanent entries (NUD_PERMANENT, i.e. the bridge's and its
  ports' own local entries), multicast/broadcast MACs, and MACs that any link of
  this namespace carries itself. Static (NUD_NOARP) and learned entries are
  machines. Sightings do not depend on the port being up: the kernel flushes
  learned entries when a port goes down, and an operator's static entry stays.
- **Limitation:** entries are keyed (MAC, port) without the VLAN; on a
  VLAN-filtering bridge a MAC present in several VLANs collapses into one row.

Cost: `Tables` keeps incrementally maintained indexes (per-MAC, per-port, and a
ready-made sightings map per bridge) in persistent maps (`PMap`, copy-on-write
shards), so `fold` of one event is O(entries touched) and `inventory` is
O(ports), independent of the FDB size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# ---------------------------------------------------------------------------
# A small persistent map.

_SHARD_BITS = 6
_SHARDS = 1 << _SHARD_BITS
_MASK = _SHARDS - 1
# Shared by every empty shard; never mutated (all writes copy the shard first).
_EMPTY_SHARD: dict[Any, Any] = {}


class PMap(Mapping[K, V], Generic[K, V]):
    """Immutable hash map whose `set`/`delete` copy one of 64 shards, not the map.

    A plain dict copy of 10,000 entries costs ~35 us; a shard copy costs ~1 us.
    Read access is a dict lookup plus one hash; iteration order is by shard.
    """

    __slots__ = ("_len", "_shards")

    _shards: tuple[dict[K, V], ...]
    _len: int

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        shards: list[dict[K, V]] = [{} for _ in range(_SHARDS)]
        pairs = items.items() if isinstance(items, Mapping) else items
        for k, v in pairs:
            shards[hash(k) & _MASK][k] = v
        self._shards = tuple(s if s else _EMPTY_SHARD for s in shards)
        self._len = sum(len(s) for s in shards)

    @classmethod
    def _make(cls, shards: tuple[dict[K, V], ...], length: int) -> PMap[K, V]:
        new = object.__new__(cls)
        new._shards = shards
        new._len = length
        return new

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & _MASK][key]

    def get(self, key: K, default: Any = None) -> Any:
        return self._shards[hash(key) & _MASK].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & _MASK]

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._len

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PMap):
            return self._len == other._len and all(
                a == b for a, b in zip(self._shards, other._shards, strict=True)
            )
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PMap({dict(self.items())!r})"

    def set(self, key: K, value: V) -> PMap[K, V]:
        i = hash(key) & _MASK
        shard = self._shards[i]
        if key in shard:
            if shard[key] is value:
                return self
            length = self._len
        else:
            length = self._len + 1
        new_shard = shard.copy()
        new_shard[key] = value
        return PMap._make((*self._shards[:i], new_shard, *self._shards[i + 1 :]), length)

    def delete(self, key: K) -> PMap[K, V]:
        """Without `key`; the same map if it was absent."""
        i = hash(key) & _MASK
        shard = self._shards[i]
        if key not in shard:
            return self
        new_shard = shard.copy()
        del new_shard[key]
        return PMap._make(
            (*self._shards[:i], new_shard or _EMPTY_SHARD, *self._shards[i + 1 :]),
            self._len - 1,
        )


_EMPTY_PMAP: PMap[Any, Any] = PMap()


# ---------------------------------------------------------------------------
# Plain data: kernel rows and events.


@dataclass(frozen=True, slots=True)
class Link:
    """One row of the kernel's link table."""

    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND: "bridge", "veth", "tun", ... or None
    master: int | None  # IFLA_MASTER ifindex
    up: bool  # IFF_UP and IFF_RUNNING (admin and operationally up), see module doc
    mac: str | None  # lowercase "aa:bb:cc:dd:ee:ff"; None if not a 6-byte address


@dataclass(frozen=True, slots=True)
class Fdb:
    """One forwarding-database entry of a bridge, on port ifindex `port`."""

    mac: str  # lowercase, normalized
    port: int  # ifindex of the port (or of the bridge itself for its own entries)
    permanent: bool  # NUD_PERMANENT / local entries (a port's own MAC): not machines
    # NDA_MASTER: the bridge whose FDB holds the entry. None = unknown, i.e. the
    # port's current master (plain test data); the netlink source always sets it.
    master: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    links: tuple[Link, ...]
    fdb: tuple[Fdb, ...]


@dataclass(frozen=True, slots=True)
class LinkUp:
    """A link appeared or changed (any attribute)."""

    link: Link


@dataclass(frozen=True, slots=True)
class LinkGone:
    index: int


@dataclass(frozen=True, slots=True)
class FdbUp:
    entry: Fdb


@dataclass(frozen=True, slots=True)
class FdbGone:
    mac: str
    port: int


Event = Snapshot | LinkUp | LinkGone | FdbUp | FdbGone


def is_unicast(mac: str) -> bool:
    """False for multicast and broadcast (I/G bit, the low bit of the first octet)."""
    return not int(mac[:2], 16) & 1


# ---------------------------------------------------------------------------
# Tables: the folded view, with private indexes.

# One FDB entry as the per-MAC index stores it: (port, stamp, candidate, master),
# where candidate = "could be a machine" (non-permanent and unicast) and master is
# Fdb.master.
_Seen = tuple[int, int, bool, int | None]


@dataclass(frozen=True, slots=True)
class _Index:
    names: PMap[str, frozenset[int]]  # link name -> ifindexes (normally one)
    children: PMap[int, frozenset[int]]  # master ifindex -> enslaved ifindexes
    local: PMap[str, int]  # MAC -> number of links carrying it
    by_mac: PMap[str, tuple[_Seen, ...]]  # MAC -> its entries, any port
    by_port: PMap[int, PMap[str, None]]  # port ifindex -> MACs with an entry there
    views: PMap[int, PMap[str, str]]  # master ifindex -> sightings (MAC -> port name)


_EMPTY_INDEX = _Index(*(_EMPTY_PMAP,) * 6)


@dataclass(frozen=True, slots=True)
class Tables:
    """The folded kernel view. Immutable; `fold` returns a new one.

    Equality compares the kernel rows (`links`, `fdb`) only. Constructing one
    directly from mappings is allowed (it is indexed like a Snapshot, keyed by
    the rows' own index/mac/port); `fold` is the normal way.
    """

    links: Mapping[int, Link] = field(default_factory=lambda: _EMPTY_PMAP)
    fdb: Mapping[tuple[str, int], Fdb] = field(default_factory=lambda: _EMPTY_PMAP)
    # Bumped by every FdbUp/Snapshot; the "most recently seen" order of entries.
    seq: int = field(default=0, compare=False)
    _ix: _Index = field(default=_EMPTY_INDEX, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        built = _from_snapshot(
            Snapshot(tuple(self.links.values()), tuple(self.fdb.values())), self.seq
        )
        object.__setattr__(self, "links", built.links)
        object.__setattr__(self, "fdb", built.fdb)
        object.__setattr__(self, "_ix", built._ix)


def _tables(
    links: PMap[int, Link], fdb: PMap[tuple[str, int], Fdb], seq: int, ix: _Index
) -> Tables:
    # Bypasses __post_init__ (which re-indexes from scratch): fold's fast path.
    t = object.__new__(Tables)
    object.__setattr__(t, "links", links)
    object.__setattr__(t, "fdb", fdb)
    object.__setattr__(t, "seq", seq)
    object.__setattr__(t, "_ix", ix)
    return t


EMPTY: Tables = _tables(_EMPTY_PMAP, _EMPTY_PMAP, 0, _EMPTY_INDEX)


def _winner(
    links: Mapping[int, Link],
    local: Mapping[str, int],
    seen: Iterable[_Seen],
    master: int,
    mac: str,
) -> str | None:
    """The port name where `mac` is sighted on bridge `master`, or None.

    Most recent entry wins; equal stamps (one Snapshot) go to the higher ifindex.
    """
    if local.get(mac):
        return None
    best: tuple[int, int] | None = None
    name: str | None = None
    for port, stamp, candidate, bridge in seen:
        if not candidate or (bridge is not None and bridge != master):
            continue
        link = links.get(port)
        if link is None or link.master != master:
            continue
        if best is None or (stamp, port) > best:
            best = (stamp, port)
            name = link.name
    return name


def _from_snapshot(snap: Snapshot, seq: int) -> Tables:
    links = {link.index: link for link in snap.links}
    fdb = {(e.mac, e.port): e for e in snap.fdb}
    names: dict[str, set[int]] = {}
    children: dict[int, set[int]] = {}
    local: dict[str, int] = {}
    for link in links.values():
        names.setdefault(link.name, set()).add(link.index)
        if link.master is not None:
            children.setdefault(link.master, set()).add(link.index)
        if link.mac is not None:
            local[link.mac] = local.get(link.mac, 0) + 1
    # Within one Snapshot nothing is "more recent": every entry gets the same stamp.
    by_mac: dict[str, list[_Seen]] = {}
    by_port: dict[int, dict[str, None]] = {}
    for mac, port in fdb:
        e = fdb[mac, port]
        candidate = not e.permanent and is_unicast(mac)
        by_mac.setdefault(mac, []).append((port, seq, candidate, e.master))
        by_port.setdefault(port, {})[mac] = None
    views: dict[int, dict[str, str]] = {}
    for mac, seen in by_mac.items():
        if local.get(mac):
            continue
        masters = {
            owner.master
            for port, _, candidate, _ in seen
            if candidate and (owner := links.get(port)) is not None and owner.master is not None
        }
        for m in masters:
            name = _winner(links, local, seen, m, mac)
            if name is not None:
                views.setdefault(m, {})[mac] = name
    ix = _Index(
        names=PMap((k, frozenset(v)) for k, v in names.items()),
        children=PMap((k, frozenset(v)) for k, v in children.items()),
        local=PMap(local),
        by_mac=PMap((k, tuple(v)) for k, v in by_mac.items()),
        by_port=PMap((k, PMap(v)) for k, v in by_port.items()),
        views=PMap((k, PMap(v)) for k, v in views.items()),
    )
    return _tables(PMap(links), PMap(fdb), seq, ix)


class _Edit:
    """The working copy of one fold step: rebinds persistent maps, never mutates them."""

    __slots__ = ("by_mac", "by_port", "children", "fdb", "links", "local", "names", "seq", "views")

    def __init__(self, t: Tables) -> None:
        ix = t._ix
        self.links: PMap[int, Link] = t.links  # type: ignore[assignment]
        self.fdb: PMap[tuple[str, int], Fdb] = t.fdb  # type: ignore[assignment]
        self.seq = t.seq
        self.names = ix.names
        self.children = ix.children
        self.local = ix.local
        self.by_mac = ix.by_mac
        self.by_port = ix.by_port
        self.views = ix.views

    def done(self) -> Tables:
        ix = _Index(self.names, self.children, self.local, self.by_mac, self.by_port, self.views)
        return _tables(self.links, self.fdb, self.seq, ix)

    # -- derived state -------------------------------------------------------

    def refresh(self, master: int | None, mac: str) -> None:
        """Recompute the sighting of `mac` on bridge `master` from the small per-MAC index."""
        if master is None:
            return
        name = _winner(self.links, self.local, self.by_mac.get(mac, ()), master, mac)
        view: PMap[str, str] = self.views.get(master, _EMPTY_PMAP)
        if view.get(mac) == name:
            return
        new = view.delete(mac) if name is None else view.set(mac, name)
        self.views = self.views.set(master, new) if new else self.views.delete(master)

    def refresh_everywhere(self, mac: str) -> None:
        """`mac` became (non-)local: recompute it on every bridge that has an entry for it."""
        masters = {
            link.master
            for port, *_ in self.by_mac.get(mac, ())
            if (link := self.links.get(port)) is not None
        }
        for m in masters:
            self.refresh(m, mac)

    def domain(self, port: int, master: int | None) -> int | None:
        """The bridge whose FDB an entry on `port` lives in (None if unknown)."""
        if master is not None:
            return master
        link = self.links.get(port)
        if link is None:
            return None
        if link.master is not None:
            return link.master
        return port if link.kind == "bridge" else None

    # -- FDB -----------------------------------------------------------------

    def _unindex_entry(self, mac: str, port: int) -> None:
        self.fdb = self.fdb.delete((mac, port))
        rest = tuple(s for s in self.by_mac.get(mac, ()) if s[0] != port)
        self.by_mac = self.by_mac.set(mac, rest) if rest else self.by_mac.delete(mac)
        macs: PMap[str, None] = self.by_port.get(port, _EMPTY_PMAP).delete(mac)
        self.by_port = self.by_port.set(port, macs) if macs else self.by_port.delete(port)

    def _port_master(self, port: int) -> int | None:
        link = self.links.get(port)
        return link.master if link is not None else None

    def fdb_up(self, e: Fdb) -> None:
        mac, port = e.mac, e.port
        self.seq += 1
        dom = self.domain(port, e.master)
        if dom is not None:
            # The kernel keeps one entry per MAC per bridge: a move re-announces
            # the MAC on the new port without deleting the old one.
            for q, _, _, master in self.by_mac.get(mac, ()):
                if q != port and self.domain(q, master) == dom:
                    self._unindex_entry(mac, q)
                    self.refresh(self._port_master(q), mac)
        self.fdb = self.fdb.set((mac, port), e)
        rest = tuple(s for s in self.by_mac.get(mac, ()) if s[0] != port)
        seen = (port, self.seq, not e.permanent and is_unicast(mac), e.master)
        self.by_mac = self.by_mac.set(mac, (*rest, seen))
        macs: PMap[str, None] = self.by_port.get(port, _EMPTY_PMAP)
        if mac not in macs:
            self.by_port = self.by_port.set(port, macs.set(mac, None))
        # A sighting needs the port to be enslaved to the bridge: only the port's
        # current master's view can change.
        self.refresh(self._port_master(port), mac)

    def fdb_gone(self, mac: str, port: int) -> None:
        if (mac, port) not in self.fdb:
            return
        self._unindex_entry(mac, port)
        self.refresh(self._port_master(port), mac)

    # -- links ---------------------------------------------------------------

    def _count_mac(self, mac: str | None, delta: int) -> bool:
        """Adjust the local-MAC count; True if `mac` switched between local and not."""
        if mac is None:
            return False
        before = self.local.get(mac, 0)
        after = before + delta
        self.local = self.local.set(mac, after) if after else self.local.delete(mac)
        return (before == 0) != (after == 0)

    def _rename_index(self, name: str, index: int, add: bool) -> None:
        have: frozenset[int] = self.names.get(name, frozenset())
        new = have | {index} if add else have - {index}
        self.names = self.names.set(name, new) if new else self.names.delete(name)

    def _child_index(self, master: int | None, index: int, add: bool) -> None:
        if master is None:
            return
        have: frozenset[int] = self.children.get(master, frozenset())
        new = have | {index} if add else have - {index}
        self.children = self.children.set(master, new) if new else self.children.delete(master)

    def link_up(self, link: Link) -> None:
        i = link.index
        old: Link | None = self.links.get(i)
        if old == link:
            return
        self.links = self.links.set(i, link)
        if old is None or old.name != link.name:
            if old is not None:
                self._rename_index(old.name, i, add=False)
            self._rename_index(link.name, i, add=True)
        old_master = old.master if old is not None else None
        if old is None or old_master != link.master:
            self._child_index(old_master, i, add=False)
            self._child_index(link.master, i, add=True)
        if old is None or old.mac != link.mac:
            flipped = [
                mac
                for mac, delta in ((old.mac if old else None, -1), (link.mac, +1))
                if self._count_mac(mac, delta)
            ]
            for mac in flipped:
                if mac is not None:
                    self.refresh_everywhere(mac)
        if old is None or old_master != link.master or old.name != link.name:
            # Sightings on this port move bridge and/or carry the new name.
            for mac in self.by_port.get(i, _EMPTY_PMAP):
                if old_master != link.master:
                    self.refresh(old_master, mac)
                self.refresh(link.master, mac)

    def link_gone(self, i: int) -> None:
        old: Link | None = self.links.get(i)
        macs: PMap[str, None] = self.by_port.get(i, _EMPTY_PMAP)
        for mac in macs:
            self._unindex_entry(mac, i)
            if old is not None:
                self.refresh(old.master, mac)
        if old is None:
            return
        self.links = self.links.delete(i)
        self._rename_index(old.name, i, add=False)
        self._child_index(old.master, i, add=False)
        if self._count_mac(old.mac, -1):
            self.refresh_everywhere(old.mac)  # type: ignore[arg-type]


def fold(tables: Tables, event: Event) -> Tables:
    """Apply one event. Snapshot replaces everything; the others are idempotent upserts."""
    if isinstance(event, Snapshot):
        return _from_snapshot(event, tables.seq + 1)
    edit = _Edit(tables)
    if isinstance(event, FdbUp):
        edit.fdb_up(event.entry)
    elif isinstance(event, FdbGone):
        edit.fdb_gone(event.mac, event.port)
    elif isinstance(event, LinkUp):
        edit.link_up(event.link)
    elif isinstance(event, LinkGone):
        edit.link_gone(event.index)
    else:
        raise TypeError(f"not an inventory event: {event!r}")
    return edit.done()


def fold_all(tables: Tables, events: Iterable[Event]) -> Tables:
    for event in events:
        tables = fold(tables, event)
    return tables


# ---------------------------------------------------------------------------
# The answer: the managed bridge's ports and the machines seen on them.


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    index: int
    up: bool


@dataclass(frozen=True, slots=True)
class Inventory:
    bridge: str  # the managed bridge's name
    bridge_index: int | None  # None if the bridge does not exist (yet)
    ports: Mapping[str, Port]  # ports enslaved to the managed bridge, by name
    foreign_ports: frozenset[str]  # ports enslaved to any OTHER bridge in the namespace
    # machine MAC -> port name: learned/static unicast entries on the managed
    # bridge's ports, minus MACs that links of this namespace carry themselves
    sightings: Mapping[str, str]
    # machine MAC -> when its sighting was learned (a sequence number: larger
    # is later; all entries of one snapshot are equal)
    learned: Mapping[str, int] = field(default_factory=dict, compare=False)


def bridge_index(tables: Tables, bridge: str) -> int | None:
    """The ifindex of the bridge called `bridge` (a link of kind "bridge"), or None."""
    found = [i for i in tables._ix.names.get(bridge, ()) if tables.links[i].kind == "bridge"]
    # Two links share a name only transiently (a rename half-applied); be deterministic.
    return max(found) if found else None


class _Ports(Mapping[str, Port]):
    """The managed bridge's ports by name, computed on access: a reconcile
    asks about a handful of ports, and there may be ten thousand."""

    __slots__ = ("_indexes", "_links", "_names")

    def __init__(
        self, links: Mapping[int, Link], names: PMap[str, frozenset[int]], indexes: frozenset[int]
    ) -> None:
        self._links = links
        self._names = names
        self._indexes = indexes

    def __getitem__(self, name: str) -> Port:
        # Two ports share a name only transiently (a rename half-applied): the
        # newer (higher ifindex) wins, as everywhere else here.
        found = [i for i in self._names.get(name, ()) if i in self._indexes]
        if not found:
            raise KeyError(name)
        link = self._links[max(found)]
        return Port(link.name, link.index, link.up)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return any(i in self._indexes for i in self._names.get(name, ()))

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(self._links[i].name for i in sorted(self._indexes)))

    def __len__(self) -> int:
        return len({self._links[i].name for i in self._indexes})


class _Learned(Mapping[str, int]):
    """When each sighting was learned, computed on access (a decision asks
    about a couple of MACs)."""

    __slots__ = ("_bridge", "_by_mac", "_links", "_sightings")

    def __init__(
        self,
        links: Mapping[int, Link],
        by_mac: Mapping[str, tuple[_Seen, ...]],
        bridge: int | None,
        sightings: Mapping[str, str],
    ) -> None:
        self._links = links
        self._by_mac = by_mac
        self._bridge = bridge
        self._sightings = sightings

    def __getitem__(self, mac: str) -> int:
        if mac not in self._sightings:
            raise KeyError(mac)
        stamps = [
            stamp
            for port, stamp, candidate, _ in self._by_mac.get(mac, ())
            if candidate
            and (link := self._links.get(port)) is not None
            and link.master == self._bridge
            and link.name == self._sightings[mac]
        ]
        if not stamps:
            raise KeyError(mac)
        return max(stamps)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sightings)

    def __len__(self) -> int:
        return len(self._sightings)


def inventory(tables: Tables, bridge: str) -> Inventory:
    """What is on `bridge`. O(ports of other bridges); the managed bridge's
    ports are looked up lazily and the sightings map is precomputed."""
    ix = tables._ix
    links = tables.links
    b = bridge_index(tables, bridge)
    children: frozenset[int] = ix.children.get(b, frozenset()) if b is not None else frozenset()
    foreign: set[str] = set()
    for m, kids in ix.children.items():
        master = links.get(m)
        if m != b and master is not None and master.kind == "bridge":
            foreign.update(links[i].name for i in kids)
    sightings: Mapping[str, str] = ix.views.get(b, _EMPTY_PMAP) if b is not None else _EMPTY_PMAP
    return Inventory(
        bridge=bridge,
        bridge_index=b,
        ports=_Ports(links, ix.names, children),
        foreign_ports=frozenset(foreign),
        sightings=sightings,
        learned=_Learned(links, ix.by_mac, b, sightings),
    )


def macs_on(tables: Tables, index: int) -> Iterable[str]:
    """MACs with an FDB entry on port `index` (any kind of entry)."""
    return tables._ix.by_port.get(index, _EMPTY_PMAP)
