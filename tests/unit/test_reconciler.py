"""The reconciler against in-memory drivers, as plain Python without root.

The property: whatever happens — ports come and go (and come back with a new
ifindex), MACs are learned, move and are forgotten, leases are seen, the
policy is reloaded, a driver refuses a change — once the controller has
caught up, what its drivers hold equals what a full sync from scratch (a new
controller, the same store, empty drivers) makes of the same world. The
incremental path can therefore never drift from the full one.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.core import inventory as inv
from controller.core.leases import Leases
from controller.drivers.dhcp import HostsDir
from controller.drivers.memory import InjectedFailure, MemoryAddresses, MemoryNft, MemoryTunnels
from controller.policy.load import parse_policy
from controller.reconcile import Reconciler

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = (ROOT / "policies" / "lab-bridge.toml").read_text()
HUB = (ROOT / "policies" / "lab.toml").read_text()
# a reload that moves vm1's MAC into y and stops x's members reaching each other
MOVED = BRIDGE.replace(
    '[[rules]]\nname = "odd"',
    '[[rules]]\nname = "special"\ndomain = "y"\nsubdomain = "special{n}"\n'
    'match.mac = "52:54:00:d0:00:01"\n\n[[rules]]\nname = "odd"',
    1,
).replace(
    'internet = true\nservices = ["dns", "icmp"]', "internet = true\nmembers_reach = false", 1
)
UPLINK = """
[uplink]
endpoint = "198.51.100.3:51820"
public_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
addresses = ["10.200.0.2/32"]
"""
POLICIES = {
    "bridge": [parse_policy(BRIDGE.encode(), "a"), parse_policy(MOVED.encode(), "b")],
    # (a reload that keeps the uplink: one that drops it removes the kill
    # switch but leaves wg0 as it was, which a sync from scratch would not make)
    "hub": [
        parse_policy((HUB + UPLINK).encode(), "h"),
        parse_policy(
            (HUB.replace("hub = true\n", 'hub = true\nreach = ["y"]\n', 1) + UPLINK).encode(), "h2"
        ),
    ],
}

BRIDGE_LINK = inv.Link(1, "virbr0", "bridge", None, True, "fe:54:00:d0:ff:fe")
MACS = [
    "52:54:00:d0:00:01",
    "52:54:00:d0:00:02",
    "52:54:00:d0:00:03",
    "52:54:00:d0:00:04",
    "52:54:00:d0:00:07",
    "00:16:3e:00:00:01",  # no rule: quarantine
]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A controller over memory drivers, fed events as the engine feeds it."""

    def __init__(self, state: Path, policy_set: str) -> None:
        self.policies = POLICIES[policy_set]
        self.clock = Clock()
        self.state = state
        self.nft = MemoryNft()
        self.addresses = MemoryAddresses()
        self.tunnels = MemoryTunnels()
        self.rec = self._controller(state, self.policies[0], self.nft, self.addresses, self.tunnels)
        self.ports: dict[int, int] = {}  # port number -> current ifindex
        self.next_index = 100
        self.rec.observe(inv.Snapshot((BRIDGE_LINK,), ()))
        self.catch_up()

    def _controller(self, state, policy, nft, addresses, tunnels) -> Reconciler:
        return Reconciler(
            policy,
            state,
            nft=nft,
            addresses=addresses,
            dnsmasq=None,
            tunnels=tunnels,
            clock=self.clock,
        )

    def catch_up(self) -> None:
        """Reconcile as the engine's loop does (a failure: counted, a rebuild next)."""
        for _ in range(5):
            if self.rec.needs_retry:  # the engine's retry timer
                self.rec.request_resync()
            if not self.rec.pending:
                return
            try:
                self.rec.reconcile()
            except (InjectedFailure, Exception) as e:  # the engine's catch-all
                self.rec.failed(str(e))
        assert not self.rec.pending, "the reconciler does not settle"

    # -- events -------------------------------------------------------------------
    def port_up(self, n: int) -> None:
        if n not in self.ports:
            self.ports[n] = self.next_index
            self.next_index += 1
        self.rec.observe(inv.LinkUp(inv.Link(self.ports[n], f"vnet{n}", "veth", 1, True, None)))

    def port_gone(self, n: int) -> None:
        index = self.ports.pop(n, None)
        if index is not None:
            self.rec.observe(inv.LinkGone(index))

    def learn(self, mac: str, n: int) -> None:
        if n in self.ports:
            self.rec.observe(inv.FdbUp(inv.Fdb(mac, self.ports[n], False, 1)))

    def forget(self, mac: str, n: int) -> None:
        if n in self.ports:
            self.rec.observe(inv.FdbGone(mac, self.ports[n]))

    def lease(self, mac: str) -> None:
        a = self.rec.ledger.get(mac)
        if a is not None and (a.underlay or a.address):
            leased = dict(self.rec.leased)
            leased[mac] = a.underlay or a.address  # type: ignore[assignment]
            self.rec.observe(Leases(leased))

    def reload(self, which: int) -> None:
        self.rec.set_policy(self.policies[which])

    def remap(self, mac: str) -> None:
        """`dom0 remap now --machine MAC`, as the engine runs it."""
        self.rec.remap(int(self.clock.now), force=[mac])

    def tick(self) -> None:
        """Time passes; the engine's remap timer ends the graces that are over."""
        self.clock.now += 600
        self.rec.remap(int(self.clock.now))

    # -- the comparison -----------------------------------------------------------
    def held(self, rec: Reconciler, nft: MemoryNft, addresses, tunnels) -> dict:
        return {
            "shape": nft.shape,
            "sets": {k: frozenset(v) for k, v in nft.sets.items() if v},
            "killswitch": nft.killswitch,
            "addresses": frozenset(addresses.held),
            "routes": frozenset(addresses.routes),
            "hosts": rec.hosts.read(),
            "peers": dict(tunnels.peers),
            "uplink": tunnels.uplink,
            "hub": tunnels.hub,
        }

    def from_scratch(self, scratch: Path) -> dict:
        """A new controller on a copy of the store and keys, empty drivers,
        the same world: one full sync."""
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        with sqlite3.connect(scratch / "state.sqlite") as copy:  # (WAL: copy, not cp)
            self.rec.store.db.backup(copy)
        if (self.state / "keys").exists():
            shutil.copytree(self.state / "keys", scratch / "keys")
        nft, addresses, tunnels = MemoryNft(), MemoryAddresses(), MemoryTunnels()
        fresh = self._controller(scratch, self.rec.policy, nft, addresses, tunnels)
        t = self.rec.tables
        fresh.observe(inv.Snapshot(tuple(t.links.values()), tuple(t.fdb.values())))
        fresh.observe(Leases(dict(self.rec.leased)))
        fresh.reconcile()
        assert fresh.ledger.by_mac == self.rec.ledger.by_mac, "a full sync decided otherwise"
        return self.held(fresh, nft, addresses, tunnels)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("port_up"), st.integers(1, 4)),
        st.tuples(st.just("port_gone"), st.integers(1, 4)),
        st.tuples(st.just("learn"), st.sampled_from(MACS), st.integers(1, 4)),
        st.tuples(st.just("forget"), st.sampled_from(MACS), st.integers(1, 4)),
        st.tuples(st.just("lease"), st.sampled_from(MACS)),
        st.tuples(st.just("reload"), st.integers(0, 1)),
        st.tuples(st.just("remap"), st.sampled_from(MACS)),
        st.tuples(st.sampled_from(["fail_nft", "fail_peers", "fail_addresses", "resync", "tick"])),
    ),
    max_size=40,
)


def run(world: World, sequence: list) -> None:
    for op, *args in sequence:
        if op == "fail_nft":
            world.nft.fail_next = 1
        elif op == "fail_peers":
            world.tunnels.fail_next = 1
        elif op == "fail_addresses":
            world.addresses.fail_next = 1
        elif op == "resync":
            world.rec.request_resync(repair=True)
        else:
            getattr(world, op)(*args)
        world.catch_up()


@pytest.mark.parametrize("policy_set", ["bridge", "hub"])
def test_incremental_ends_where_a_full_sync_from_scratch_does(
    tmp_path_factory: pytest.TempPathFactory, policy_set: str
) -> None:
    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(ops)
    def check(sequence: list) -> None:
        base = tmp_path_factory.mktemp("rec")
        world = World(base / "state", policy_set)
        run(world, sequence)
        got = world.held(world.rec, world.nft, world.addresses, world.tunnels)
        want = world.from_scratch(base / "scratch")
        assert got == want

    check()


def test_a_refused_transaction_is_followed_by_a_rebuild(tmp_path: Path) -> None:
    w = World(tmp_path / "s", "bridge")
    w.port_up(1)
    w.learn(MACS[0], 1)
    w.catch_up()
    rebuilds = w.nft.rebuilds
    w.nft.fail_next = 1
    w.port_up(2)
    w.learn(MACS[1], 2)
    w.rec.reconcile()  # refused: counted, and the next reconcile starts over
    assert w.rec.stats.errors == 1 and w.rec.pending
    w.catch_up()
    assert w.nft.rebuilds == rebuilds + 1
    assert ("vnet2", MACS[1]) in w.nft.sets[("bridge", "port_mac")]


def test_a_periodic_resync_repairs_and_counts_drift(tmp_path: Path) -> None:
    w = World(tmp_path / "s", "bridge")
    w.port_up(1)
    w.learn(MACS[0], 1)
    w.catch_up()
    w.nft.sets[("bridge", "port_mac")].discard(("vnet1", MACS[0]))  # tampering
    w.nft.sets[("bridge", "port_mac")].add(("vnet9", "02:00:00:00:00:09"))
    (tmp_path / "s" / "dhcp" / "hosts" / MACS[0].replace(":", "-")).write_text("nonsense\n")
    w.addresses.held.clear()
    w.rec.request_resync(repair=True)
    w.catch_up()
    assert w.rec.stats.repairs >= 4, w.rec.stats.last_repair
    assert w.held(w.rec, w.nft, w.addresses, w.tunnels) == w.from_scratch(tmp_path / "x")


def test_hosts_dir_is_the_real_one(tmp_path: Path) -> None:
    """(the reservations the fakes are compared on are files, as in production)"""
    w = World(tmp_path / "s", "bridge")
    assert isinstance(w.rec.hosts, HostsDir)


def test_containers_prefixes_are_bound_and_routed_through_their_machine(tmp_path: Path) -> None:
    """A bridge domain with `containers`: the machine's port and MAC may send
    from its prefix, dom0 routes the prefix through its address, and both go
    when it does; the incremental path agrees with a full sync throughout."""
    w = World(tmp_path / "s", "bridge")
    w.port_up(1)
    w.learn(MACS[0], 1)
    w.catch_up()
    a = w.rec.ledger.get(MACS[0])
    assert a is not None and a.address is not None
    prefix = w.rec.policy.domains["x"].delegated(a.address)
    pool = w.rec.policy.domains["x"].containers_pool
    assert prefix is not None and pool is not None and prefix.subnet_of(pool)
    assert w.nft.sets[("bridge", "binding_net")] == {("vnet1", MACS[0], str(prefix))}
    assert w.addresses.routes == {(str(prefix), a.address, "virbr0")}
    assert w.held(w.rec, w.nft, w.addresses, w.tunnels) == w.from_scratch(tmp_path / "x")
    w.port_gone(1)
    w.catch_up()
    assert not w.nft.sets.get(("bridge", "binding_net")) and not w.addresses.routes


def test_machines_are_found_by_name_after_every_change(tmp_path: Path) -> None:
    w = World(tmp_path / "s", "bridge")
    w.port_up(1)
    w.learn(MACS[0], 1)
    w.catch_up()
    assert w.rec.find("web1.x.internal") == w.rec.ledger.get(MACS[0])
    w.port_up(3)
    w.learn(MACS[2], 3)
    w.catch_up()
    names = w.rec.named()
    assert names["web1.x.internal"] == MACS[0] and names["web2.x.internal"] == MACS[2]
    w.rec.ledger.remove(MACS[2])
    assert "web2.x.internal" not in w.rec.named()  # (the index follows the ledger)


def test_a_remap_keeps_both_addresses_through_the_grace_then_frees_the_old(
    tmp_path: Path,
) -> None:
    """Make-before-break on dom0's side: the new address is the machine's at
    once and the old one stays its own (bound to its port and MAC, in self4,
    its containers' prefix routed) until the grace is over; then the old one
    is bound to nobody and free in the pool; the history keeps both."""
    w = World(tmp_path / "s", "bridge")
    w.port_up(1)
    w.learn(MACS[0], 1)
    w.catch_up()
    before = w.rec.ledger.get(MACS[0])
    assert before is not None and before.address is not None
    moved = w.rec.remap(int(w.clock.now), force=[MACS[0]], grace=300)
    w.catch_up()
    after = w.rec.ledger.get(MACS[0])
    assert after is not None and after.address is not None
    assert moved == [{"name": "web1.x.internal", "mac": MACS[0], "from": before.address,
                      "to": after.address, "until": int(w.clock.now) + 300}]  # fmt: skip
    assert (after.slot, after.previous) == (before.slot, before.address)  # the name stays
    binding = w.nft.sets[("bridge", "binding")]
    assert {("vnet1", MACS[0], before.address), ("vnet1", MACS[0], after.address)} <= binding
    assert {(x, x) for x in (before.address, after.address)} <= w.nft.sets[("inet", "self4")]
    assert w.rec.hosts.read()[MACS[0]].address == after.address  # DHCP: the new one
    x = w.rec.policy.domains["x"]
    assert {str(x.delegated(before.address)), str(x.delegated(after.address))} == {
        r[0] for r in w.addresses.routes}  # fmt: skip
    assert w.held(w.rec, w.nft, w.addresses, w.tunnels) == w.from_scratch(tmp_path / "x")
    # another remap waits for the grace to end
    assert w.rec.remap(int(w.clock.now), force=[MACS[0]]) == []
    w.clock.now += 300
    w.rec.remap(int(w.clock.now))
    w.catch_up()
    done = w.rec.ledger.get(MACS[0])
    assert done is not None and done.previous is None and done.address == after.address
    assert not any(e[2] == before.address for e in w.nft.sets[("bridge", "binding")])
    assert before.address not in w.rec.ledger.addresses["x"]  # free in the pool
    history = w.rec.store.address_history("odd", 1)
    assert [(h["address"], h["until"] is None) for h in history] == [
        (after.address, True), (before.address, False)]  # fmt: skip
    assert w.held(w.rec, w.nft, w.addresses, w.tunnels) == w.from_scratch(tmp_path / "y")


def test_a_hub_machine_keeps_both_addresses_in_its_peer_through_the_grace(
    tmp_path: Path,
) -> None:
    w = World(tmp_path / "s", "hub")
    w.port_up(1)
    w.learn(MACS[0], 1)
    w.catch_up()
    before = w.rec.ledger.get(MACS[0])
    assert before is not None
    w.rec.remap(int(w.clock.now), force=[MACS[0]], grace=300)
    w.catch_up()
    after = w.rec.ledger.get(MACS[0])
    assert after is not None and after.underlay == before.underlay
    (peer,) = w.tunnels.peers.values()
    assert {f"{before.address}/32", f"{after.address}/32"} <= set(peer.allowed_ips)
    w.clock.now += 300
    w.rec.remap(int(w.clock.now))
    w.catch_up()
    (peer,) = w.tunnels.peers.values()
    assert f"{before.address}/32" not in peer.allowed_ips


def test_a_machine_that_randomizes_its_mac_keeps_its_name_across_remaps(tmp_path: Path) -> None:
    """The slot carries the name, not the MAC: a guest that takes a new MAC of
    its rule on its port carries on as the same machine, through a remap's
    grace (both its addresses stay its own) and through the next remap."""
    w = World(tmp_path / "s", "bridge")
    w.port_up(1)
    w.learn(MACS[0], 1)
    w.catch_up()
    w.lease(MACS[0])  # (established: it held its lease)
    w.catch_up()
    first = w.rec.ledger.get(MACS[0])
    assert first is not None
    w.rec.remap(int(w.clock.now), force=[MACS[0]], grace=300)
    w.catch_up()
    remapped = w.rec.ledger.get(MACS[0])
    assert remapped is not None and remapped.previous == first.address
    random_mac = "52:54:00:d0:5a:17"  # (odd: rule "odd", as the old one)
    w.forget(MACS[0], 1)
    w.learn(random_mac, 1)
    w.catch_up()
    carried = w.rec.ledger.get(random_mac)
    assert carried is not None and w.rec.ledger.get(MACS[0]) is None
    assert (carried.rule, carried.slot, carried.address, carried.previous) == (
        remapped.rule, remapped.slot, remapped.address, remapped.previous)  # fmt: skip
    assert w.rec.find("web1.x.internal") == carried
    assert {("vnet1", random_mac, first.address), ("vnet1", random_mac, remapped.address)} <= (
        w.nft.sets[("bridge", "binding")])  # fmt: skip
    w.tick()  # the grace ends
    w.catch_up()
    w.rec.remap(int(w.clock.now), force=[random_mac], grace=300)
    w.catch_up()
    again = w.rec.ledger.get(random_mac)
    assert again is not None and again.previous == remapped.address
    assert w.rec.find("web1.x.internal") == again
    history = w.rec.store.address_history("odd", 1)
    assert [h["address"] for h in history] == [again.address, remapped.address, first.address]
    assert w.held(w.rec, w.nft, w.addresses, w.tunnels) == w.from_scratch(tmp_path / "x")
