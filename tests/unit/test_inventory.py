"""The pure inventory fold: plain examples, a kernel model, and a naive reference."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from controller.core.inventory import (
    EMPTY,
    Event,
    Fdb,
    FdbGone,
    FdbUp,
    Inventory,
    Link,
    LinkGone,
    LinkUp,
    PMap,
    Port,
    Snapshot,
    Tables,
    fold,
    fold_all,
    inventory,
    is_unicast,
)

BR = 2  # virbr0
BR1 = 3  # another bridge
VM1, VM2, VM3 = "52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03"


def link(index: int, name: str, *, kind: str | None = "veth", master: int | None = None,
         up: bool = True, mac: str | None = None) -> Link:  # fmt: skip
    return Link(
        index, name, kind, master, up, mac if mac is not None else f"fe:00:00:00:00:{index:02x}"
    )


def base_links() -> list[Link]:
    return [
        link(1, "lo", kind=None, mac="00:00:00:00:00:00"),
        link(BR, "virbr0", kind="bridge", mac="02:00:00:00:00:02"),
        link(BR1, "br1", kind="bridge", mac="02:00:00:00:00:03"),
        link(10, "vnet0", kind="tun", master=BR),
        link(11, "vnet1", kind="tun", master=BR),
        link(12, "x0", master=BR1),
        link(13, "lone"),
    ]


def start(*fdb: Fdb, links: Iterable[Link] | None = None) -> Tables:
    return fold(EMPTY, Snapshot(tuple(base_links() if links is None else links), fdb))


def sightings(t: Tables, bridge: str = "virbr0") -> dict[str, str]:
    return dict(inventory(t, bridge).sightings)


# ---------------------------------------------------------------------------
# Plain examples.


def test_snapshot_inventory() -> None:
    t = start(
        Fdb(VM1, 10, False, BR),
        Fdb(VM2, 11, False, BR),
        Fdb(VM3, 12, False, BR1),  # on the other bridge
        Fdb("fe:00:00:00:00:0a", 10, True, BR),  # the port's own local entry
    )
    inv = inventory(t, "virbr0")
    assert inv == Inventory(
        bridge="virbr0",
        bridge_index=BR,
        ports={"vnet0": Port("vnet0", 10, True), "vnet1": Port("vnet1", 11, True)},
        foreign_ports=frozenset({"x0"}),
        sightings={VM1: "vnet0", VM2: "vnet1"},
    )
    assert sightings(t, "br1") == {VM3: "x0"}
    assert inventory(t, "br1").foreign_ports == {"vnet0", "vnet1"}


def test_not_machines_permanent_multicast_local() -> None:
    t = start(
        Fdb(VM1, 10, True, BR),  # permanent (e.g. `bridge fdb add ... permanent`)
        Fdb("01:00:5e:00:00:01", 10, False, BR),  # multicast
        Fdb("ff:ff:ff:ff:ff:ff", 10, False, BR),  # broadcast
        Fdb("02:00:00:00:00:02", 11, False, BR),  # the bridge's own MAC, learned on a port
        Fdb("fe:00:00:00:00:0d", 11, False, BR),  # the MAC of link "lone" (not a port)
        Fdb(VM2, 11, False, BR),  # static/learned: a machine
    )
    assert sightings(t) == {VM2: "vnet1"}


def test_missing_bridge_and_non_bridge_name() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    inv = inventory(t, "nosuch")
    assert inv.bridge_index is None
    assert inv.ports == {}
    assert inv.sightings == {}
    assert inv.foreign_ports == {"vnet0", "vnet1", "x0"}
    # A link that merely carries the name is not the bridge.
    assert inventory(t, "lone").bridge_index is None


def test_bridge_appears_later() -> None:
    t = fold(EMPTY, Snapshot((), ()))
    assert inventory(t, "virbr0").bridge_index is None
    for ev in (
        LinkUp(link(BR, "virbr0", kind="bridge")),
        LinkUp(link(10, "vnet0", master=BR)),
        FdbUp(Fdb(VM1, 10, False, BR)),
    ):
        t = fold(t, ev)
    assert inventory(t, "virbr0").bridge_index == BR
    assert sightings(t) == {VM1: "vnet0"}


def test_port_rename_keeps_sightings() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    t = fold(t, LinkUp(replace(t.links[10], name="vm-web1")))
    inv = inventory(t, "virbr0")
    assert set(inv.ports) == {"vm-web1", "vnet1"}
    assert inv.ports["vm-web1"].index == 10
    assert dict(inv.sightings) == {VM1: "vm-web1"}


def test_bridge_rename() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    t = fold(t, LinkUp(replace(t.links[BR], name="lan")))
    assert inventory(t, "virbr0").bridge_index is None
    assert sightings(t, "lan") == {VM1: "vnet0"}


def test_link_removal_drops_its_fdb() -> None:
    t = start(Fdb(VM1, 10, False, BR), Fdb(VM2, 11, False, BR))
    t = fold(t, LinkGone(10))  # no FdbGone first
    assert (VM1, 10) not in t.fdb
    assert "vnet0" not in inventory(t, "virbr0").ports
    assert sightings(t) == {VM2: "vnet1"}
    # The same ifindex coming back does not resurrect anything.
    t = fold(t, LinkUp(link(10, "vnet0", master=BR)))
    assert sightings(t) == {VM2: "vnet1"}


def test_port_leaves_and_joins_other_bridge() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    t = fold(t, LinkUp(replace(t.links[10], master=None)))
    assert sightings(t) == {}
    assert "vnet0" not in inventory(t, "virbr0").ports
    t = fold(t, LinkUp(replace(t.links[10], master=BR1)))
    assert inventory(t, "virbr0").foreign_ports == {"vnet0", "x0"}
    # An entry the kernel reported for virbr0 is not a sighting on br1.
    assert sightings(t, "br1") == {}
    t = fold(t, FdbUp(Fdb(VM1, 10, False, BR1)))
    assert sightings(t, "br1") == {VM1: "vnet0"}


def test_non_bridge_master_is_not_foreign() -> None:
    links = [*base_links(), link(20, "bond0", kind="bond"), link(21, "eth1", master=20)]
    inv = inventory(start(links=links), "virbr0")
    assert inv.foreign_ports == {"x0"}


def test_station_move_evicts_old_port() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    # The kernel announces only the new port when a MAC moves.
    t = fold(t, FdbUp(Fdb(VM1, 11, False, BR)))
    assert sightings(t) == {VM1: "vnet1"}
    assert (VM1, 10) not in t.fdb
    # ...so when the new entry ages out, the old port must not come back.
    t = fold(t, FdbGone(VM1, 11))
    assert sightings(t) == {}


def test_replayed_event_does_not_evict_on_new_bridge() -> None:
    """An old FdbUp replayed after a Snapshot evicts within the bridge it names."""
    # Kernel history: VM1 on x0 (br1); later VM1 also on vnet0 (virbr0); then
    # vnet0 is flushed and moved to br1. The dump is taken after all that, but the
    # source subscribed before the second step, so it replays steps 2-3 on top.
    dump = start(Fdb(VM1, 12, False, BR1), links=[*base_links()[:3],
                 link(10, "vnet0", master=BR1), *base_links()[4:]])  # fmt: skip
    backlog: list[Event] = [
        FdbUp(Fdb(VM1, 10, False, BR)),
        FdbGone(VM1, 10),
        LinkUp(link(10, "vnet0", master=BR1)),
    ]
    t = fold_all(dump, backlog)
    assert sightings(t, "br1") == {VM1: "x0"}
    assert t == dump


def test_stale_event_evicts_in_the_bridge_it_names() -> None:
    # vnet0 has moved to br1 meanwhile; a replayed FdbUp still names virbr0, where
    # it evicts VM1's entry on vnet1 (the kernel moved VM1 to vnet0 back then).
    t = start(Fdb(VM1, 11, False, BR))
    t = fold(t, LinkUp(replace(t.links[10], master=BR1)))
    t = fold(t, FdbUp(Fdb(VM1, 10, False, BR)))
    assert (VM1, 11) not in t.fdb
    assert sightings(t) == {}
    assert sightings(t, "br1") == {}  # the entry is virbr0's, its port is br1's


def test_same_mac_on_two_bridges() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    t = fold(t, FdbUp(Fdb(VM1, 12, False, BR1)))
    assert sightings(t) == {VM1: "vnet0"}
    assert sightings(t, "br1") == {VM1: "x0"}


def test_duplicate_prefers_most_recent() -> None:
    # Entries without `master` whose ports are not known yet cannot evict each other.
    t = fold(EMPTY, Snapshot((), ()))
    t = fold_all(t, [FdbUp(Fdb(VM1, 10, False)), FdbUp(Fdb(VM1, 11, False))])
    t = fold_all(t, [LinkUp(link(BR, "virbr0", kind="bridge")),
                     LinkUp(link(11, "vnet1", master=BR)),
                     LinkUp(link(10, "vnet0", master=BR))])  # fmt: skip
    assert sightings(t) == {VM1: "vnet1"}  # seen last, though its port appeared first
    t = fold(t, FdbUp(Fdb(VM1, 10, False)))
    assert sightings(t) == {VM1: "vnet0"}


def test_snapshot_duplicate_goes_to_higher_ifindex() -> None:
    for order in ((10, 11), (11, 10)):
        t = start(*(Fdb(VM1, p, False, BR) for p in order))
        assert sightings(t) == {VM1: "vnet1"}


def test_local_mac_change() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    t = fold(t, LinkUp(replace(t.links[13], mac=VM1)))  # a local link takes the MAC
    assert sightings(t) == {}
    t = fold(t, LinkUp(replace(t.links[13], mac="fe:00:00:00:00:0d")))
    assert sightings(t) == {VM1: "vnet0"}
    t = fold(t, LinkUp(replace(t.links[13], mac=VM1)))
    t = fold(t, LinkGone(13))
    assert sightings(t) == {VM1: "vnet0"}


def test_port_up_is_reported_not_filtered() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    t = fold(t, LinkUp(replace(t.links[10], up=False)))
    assert inventory(t, "virbr0").ports["vnet0"] == Port("vnet0", 10, False)
    assert sightings(t) == {VM1: "vnet0"}  # the kernel flushes learned entries itself


def test_idempotent_and_gone_unknown() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    for ev in (
        LinkUp(link(14, "vnet2", master=BR)),
        FdbUp(Fdb(VM2, 14, False, BR)),
        FdbGone(VM1, 10),
        LinkGone(11),
    ):
        once = fold(t, ev)
        twice = fold(once, ev)
        assert once == twice
        assert inventory(once, "virbr0") == inventory(twice, "virbr0")
        t = once
    assert fold(t, FdbGone(VM3, 99)) == t
    assert fold(t, LinkGone(99)) == t


def test_tables_constructor_equals_snapshot() -> None:
    entries = (Fdb(VM1, 10, False, BR), Fdb(VM2, 11, True, BR))
    direct = Tables(
        links={lk.index: lk for lk in base_links()}, fdb={(e.mac, e.port): e for e in entries}
    )
    assert direct == start(*entries)
    assert inventory(direct, "virbr0") == inventory(start(*entries), "virbr0")
    assert Tables() == EMPTY


def test_snapshot_replaces_everything() -> None:
    t = start(Fdb(VM1, 10, False, BR))
    t = fold(t, Snapshot((link(BR, "virbr0", kind="bridge"),), ()))
    assert dict(t.links) == {BR: link(BR, "virbr0", kind="bridge")}
    assert dict(t.fdb) == {}


def test_not_an_event() -> None:
    with pytest.raises(TypeError):
        fold(EMPTY, "nope")  # type: ignore[arg-type]


def test_pmap_basics() -> None:
    m: PMap[str, int] = PMap({"a": 1})
    m2 = m.set("b", 2).set("a", 3)
    assert dict(m) == {"a": 1}
    assert dict(m2) == {"a": 3, "b": 2}
    assert m2.delete("a").delete("zz") == {"b": 2}
    assert m2 == {"a": 3, "b": 2}
    assert len(m2.delete("a").delete("b")) == 0
    assert m.set("a", 1) is m
    with pytest.raises(KeyError):
        m["b"]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers())))
def test_pmap_like_dict(ops: list[tuple[bool, int, int]]) -> None:
    m: PMap[int, int] = PMap()
    d: dict[int, int] = {}
    for put, k, v in ops:
        old = m
        frozen = dict(old)
        if put:
            m, d[k] = m.set(k, v), v
        else:
            m = m.delete(k)
            d.pop(k, None)
        assert dict(old) == frozen  # persistent: the old version is untouched
    assert dict(m) == d
    assert len(m) == len(d)
    assert m == PMap(d)
    assert all((k in m) == (k in d) for k in range(300))


# ---------------------------------------------------------------------------
# A kernel model: operations produce the notifications the kernel would send.

LEARNABLE = ["52:54:00:00:00:0" + str(i) for i in range(5)]
NOISE = ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff"]
LINK_MACS = [*LEARNABLE[:2], "fe:00:00:00:00:01", "fe:00:00:00:00:02"]


class Kernel:
    """Links plus one FDB per bridge, keyed (bridge, mac) like the kernel's hash."""

    def __init__(self, with_master: bool) -> None:
        self.links: dict[int, Link] = {}
        self.fdb: dict[tuple[int, str], tuple[int, bool]] = {}  # -> (port, permanent)
        self.with_master = with_master
        self.index = itertools.count(1)
        self.names = itertools.count()

    def entry(self, bridge: int, mac: str) -> Fdb:
        port, permanent = self.fdb[bridge, mac]
        return Fdb(mac, port, permanent, bridge if self.with_master else None)

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(self.links.values()), tuple(self.entry(*k) for k in self.fdb))

    def bridges(self) -> list[int]:
        return sorted(i for i, lk in self.links.items() if lk.kind == "bridge")

    def ports(self) -> list[int]:
        return sorted(i for i, lk in self.links.items() if lk.master is not None)

    def _flush(self, port: int, keep_permanent: bool = False) -> list[Event]:
        out: list[Event] = []
        for key, (p, permanent) in list(self.fdb.items()):
            if p == port and not (keep_permanent and permanent):
                del self.fdb[key]
                out.append(FdbGone(key[1], port))
        return out

    def _set(self, index: int, **changes: object) -> list[Event]:
        self.links[index] = replace(self.links[index], **changes)  # type: ignore[arg-type]
        return [LinkUp(self.links[index])]

    def step(self, data: st.DataObject) -> list[Event]:
        op = data.draw(st.sampled_from(
            ["add", "add", "enslave", "enslave", "rename", "updown", "mac", "delete",
             "learn", "learn", "learn", "static", "bridge_entry", "forget", "renotify"]
        ))  # fmt: skip
        links = sorted(self.links)
        if op == "add" or not links:
            i = next(self.index)
            kind = data.draw(st.sampled_from(["bridge", "veth", "tun"]))
            mac = data.draw(st.sampled_from([*LINK_MACS, None]))
            self.links[i] = Link(i, f"l{i}", kind, None, data.draw(st.booleans()), mac)
            return [LinkUp(self.links[i])]
        i = data.draw(st.sampled_from(links))
        lk = self.links[i]
        if op == "enslave" and lk.kind != "bridge":
            master = data.draw(st.sampled_from([None, *self.bridges()]))
            if master == lk.master:
                return []
            return self._flush(i) + self._set(i, master=master)  # the kernel flushes first
        if op == "rename":
            return self._set(i, name=f"r{next(self.names)}")
        if op == "updown":
            up = not lk.up
            return (self._flush(i, keep_permanent=True) if not up else []) + self._set(i, up=up)
        if op == "mac":
            return self._set(i, mac=data.draw(st.sampled_from([*LINK_MACS, None])))
        if op == "delete":
            out: list[Event] = []
            if lk.kind == "bridge":
                for child in self.ports():
                    if self.links[child].master == i:
                        out += self._flush(child) + self._set(child, master=None)
            gone = self._flush(i) + [
                FdbGone(mac, port) for (b, mac), (port, _) in list(self.fdb.items()) if b == i
            ]
            self.fdb = {k: v for k, v in self.fdb.items() if k[0] != i}
            # Whether the kernel's per-entry deletes arrive must not matter.
            out += [ev for ev in gone if data.draw(st.booleans())]
            del self.links[i]
            return [*out, LinkGone(i)]
        ports = self.ports()
        if op in ("learn", "static") and ports:
            port = data.draw(st.sampled_from(ports))
            b = self.links[port].master
            assert b is not None
            mac = data.draw(st.sampled_from(LEARNABLE + NOISE + LINK_MACS))
            permanent = op == "static" and data.draw(st.booleans())
            if op == "learn" and self.fdb.get((b, mac), (0, False))[1]:
                return []  # the kernel never overrides a local entry by learning
            if self.fdb.get((b, mac)) == (port, permanent):
                return []  # no change, no notification
            self.fdb[b, mac] = (port, permanent)
            return [FdbUp(self.entry(b, mac))]
        if op == "bridge_entry" and lk.kind == "bridge":
            mac = data.draw(st.sampled_from(LEARNABLE + LINK_MACS))
            self.fdb[i, mac] = (i, True)
            return [FdbUp(self.entry(i, mac))]
        if op == "forget" and self.fdb:
            b, mac = data.draw(st.sampled_from(sorted(self.fdb)))
            port, _ = self.fdb.pop((b, mac))
            return [FdbGone(mac, port)]
        if op == "renotify" and self.fdb:  # a duplicate notification
            return [FdbUp(self.entry(*data.draw(st.sampled_from(sorted(self.fdb)))))]
        return []

    def names_to_check(self) -> list[str]:
        return sorted({lk.name for lk in self.links.values()} | {"nosuch"})


def same_view(a: Tables, b: Tables, names: Iterable[str]) -> None:
    assert dict(a.links) == dict(b.links)
    assert dict(a.fdb) == dict(b.fdb)
    for name in names:
        assert inventory(a, name) == inventory(b, name), name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_events_fold_like_snapshot(data: st.DataObject, with_master: bool) -> None:
    """Any kernel history, folded event by event, gives what a dump of the end state gives."""
    kernel = Kernel(with_master)
    t = fold(EMPTY, kernel.snapshot())
    for _ in range(data.draw(st.integers(1, 60))):
        for ev in kernel.step(data):
            t = fold(t, ev)
        same_view(t, fold(EMPTY, kernel.snapshot()), kernel.names_to_check())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_replay_after_snapshot_converges(data: st.DataObject) -> None:
    """The source's dump race: events from before the dump, folded after its Snapshot."""
    kernel = Kernel(with_master=True)
    events: list[Event] = []
    states = [kernel.snapshot()]  # the kernel after each step...
    boundaries = [0]  # ...which is after this many events
    for _ in range(data.draw(st.integers(1, 50))):
        events += kernel.step(data)
        states.append(kernel.snapshot())
        boundaries.append(len(events))
    step = data.draw(st.integers(0, len(states) - 1))
    # Subscribed at event j, dumped at the state of `step`: events[j:] come after it.
    j = data.draw(st.integers(0, boundaries[step]))
    t = fold_all(fold(EMPTY, states[step]), events[j:])
    same_view(t, fold(EMPTY, kernel.snapshot()), kernel.names_to_check())


# ---------------------------------------------------------------------------
# Arbitrary (also kernel-impossible) event streams against a naive reference.


class Naive:
    """The documented semantics, written the slow, obvious way."""

    def __init__(self) -> None:
        self.links: dict[int, Link] = {}
        self.fdb: dict[tuple[str, int], Fdb] = {}
        self.stamp: dict[tuple[str, int], int] = {}
        self.seq = 0

    def domain(self, port: int, master: int | None) -> int | None:
        if master is not None:
            return master
        lk = self.links.get(port)
        if lk is None:
            return None
        return lk.master if lk.master is not None else (port if lk.kind == "bridge" else None)

    def fold(self, ev: Event) -> None:
        if isinstance(ev, Snapshot):
            self.seq += 1
            self.links = {lk.index: lk for lk in ev.links}
            self.fdb = {(e.mac, e.port): e for e in ev.fdb}
            self.stamp = dict.fromkeys(self.fdb, self.seq)
        elif isinstance(ev, FdbUp):
            self.seq += 1
            e = ev.entry
            dom = self.domain(e.port, e.master)
            for (mac, q), other in list(self.fdb.items()):
                same_bridge = dom is not None and self.domain(q, other.master) == dom
                if mac == e.mac and q != e.port and same_bridge:
                    del self.fdb[mac, q]
            self.fdb[e.mac, e.port] = e
            self.stamp[e.mac, e.port] = self.seq
        elif isinstance(ev, FdbGone):
            self.fdb.pop((ev.mac, ev.port), None)
        elif isinstance(ev, LinkUp):
            self.links[ev.link.index] = ev.link
        elif isinstance(ev, LinkGone):
            self.links.pop(ev.index, None)
            self.fdb = {k: e for k, e in self.fdb.items() if k[1] != ev.index}

    def inventory(self, bridge: str) -> Inventory:
        found = [i for i, lk in self.links.items() if lk.name == bridge and lk.kind == "bridge"]
        b = max(found) if found else None
        ports = {}
        for i in sorted(self.links):
            if b is not None and self.links[i].master == b:
                ports[self.links[i].name] = Port(self.links[i].name, i, self.links[i].up)
        foreign = {
            lk.name
            for lk in self.links.values()
            if lk.master is not None
            and lk.master != b
            and lk.master in self.links
            and self.links[lk.master].kind == "bridge"
        }
        local = {lk.mac for lk in self.links.values() if lk.mac}
        best: dict[str, tuple[int, int]] = {}
        for (mac, port), e in self.fdb.items():
            lk = self.links.get(port)
            if (
                b is None
                or e.permanent
                or not is_unicast(mac)
                or mac in local
                or lk is None
                or lk.master != b
                or e.master not in (None, b)
            ):
                continue
            best[mac] = max(best.get(mac, (-1, -1)), (self.stamp[mac, port], port))
        return Inventory(
            bridge=bridge,
            bridge_index=b,
            ports=ports,
            foreign_ports=frozenset(foreign),
            sightings={mac: self.links[port].name for mac, (_, port) in best.items()},
        )


_idx = st.integers(1, 7)
_name = st.sampled_from(["virbr0", "br1", "p1", "p2", "p3"])
_mac = st.sampled_from([*LEARNABLE[:3], NOISE[0], "fe:00:00:00:00:01"])
_links = st.builds(
    Link,
    index=_idx,
    name=_name,
    kind=st.sampled_from(["bridge", "veth", None]),
    master=st.none() | _idx,
    up=st.booleans(),
    mac=st.none() | _mac,
)
_fdbs = st.builds(Fdb, mac=_mac, port=_idx, permanent=st.booleans(), master=st.none() | _idx)
_events = st.one_of(
    st.builds(LinkUp, _links),
    st.builds(LinkGone, _idx),
    st.builds(FdbUp, _fdbs),
    st.builds(FdbUp, _fdbs),
    st.builds(FdbGone, _mac, _idx),
    st.builds(
        Snapshot,
        st.lists(_links, max_size=5).map(tuple),
        st.lists(_fdbs, max_size=6).map(tuple),
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_events, max_size=40))
def test_matches_naive_reference(events: list[Event]) -> None:
    t = EMPTY
    ref = Naive()
    for ev in events:
        t = fold(t, ev)
        ref.fold(ev)
        assert dict(t.links) == ref.links
        assert dict(t.fdb) == ref.fdb
        for name in ("virbr0", "br1", "p1"):
            assert inventory(t, name) == ref.inventory(name)


@given(st.lists(_events, max_size=30))
def test_never_sighted(events: list[Event]) -> None:
    t = fold_all(EMPTY, events)
    # (the kernel's names are unique in a namespace; a generated snapshot's need not be)
    assume(len({lk.name for lk in t.links.values()}) == len(t.links))
    local = {lk.mac for lk in t.links.values()}
    for name in ("virbr0", "br1"):
        inv = inventory(t, name)
        for mac, port_name in inv.sightings.items():
            assert is_unicast(mac)
            assert mac not in local
            port = inv.ports[port_name]
            assert not t.fdb[mac, port.index].permanent


# ---------------------------------------------------------------------------
# Cost at 10,000 FDB entries (generous bounds; the measured numbers are in the docs).


def _big() -> tuple[Tables, list[Event]]:
    links = [link(1, "lo", kind=None), link(BR, "virbr0", kind="bridge")]
    links += [link(100 + p, f"vnet{p}", kind="tun", master=BR) for p in range(200)]
    fdb = [Fdb(f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}", 100 + i % 200, False, BR)
           for i in range(10_000)]  # fmt: skip
    t = fold(EMPTY, Snapshot(tuple(links), tuple(fdb)))
    events: list[Event] = []
    for i in range(1000):
        mac = f"52:54:00:01:{i >> 8:02x}:{i & 255:02x}"
        events += [FdbUp(Fdb(mac, 100 + i % 200, False, BR)), FdbGone(fdb[i].mac, fdb[i].port)]
    return t, events


def test_cost_at_10k_entries() -> None:
    t, events = _big()
    assert len(inventory(t, "virbr0").sightings) == 10_000
    t0 = time.perf_counter()
    for ev in events:
        t = fold(t, ev)
    fold_each = (time.perf_counter() - t0) / len(events)
    t0 = time.perf_counter()
    for _ in range(200):
        inv = inventory(t, "virbr0")
    inventory_each = (time.perf_counter() - t0) / 200
    assert len(inv.sightings) == 10_000
    assert fold_each < 1e-3, fold_each  # measured ~6 us
    assert inventory_each < 5e-3, inventory_each  # measured ~0.1 ms (200 ports)
