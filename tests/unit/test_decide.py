"""Port security: identity belongs to the port and the rule, not to a MAC the
guest picks. Plain data: an inventory folded from events, a ledger."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core import inventory as inv
from controller.core.allocation import Ledger
from controller.core.decide import decide, decide_many, presence
from controller.policy.load import parse_policy

POLICY_TEXT = """
[bridge]
name = "virbr0"
{bridge}
[domains.x]
pool = "10.10.0.0/24"
[domains.y]
pool = "10.20.0.0/24"
[[rules]]
name = "odd"
domain = "x"
subdomain = "web{{n}}"
match.mac_mask = "52:54:00:d0:00:01/ff:ff:ff:ff:00:01"
[[rules]]
name = "even"
domain = "y"
subdomain = "db{{n}}"
match.mac_mask = "52:54:00:d0:00:00/ff:ff:ff:ff:00:01"
[[rules]]
name = "other"
domain = "x"
subdomain = "o{{n}}"
match.mac = "52:54:01:*"
[quarantine]
pool = "10.99.0.0/24"
"""


def policy(bridge: str = ""):
    return parse_policy(POLICY_TEXT.format(bridge=bridge).encode(), "p.toml")


BRIDGE = inv.Link(1, "virbr0", "bridge", None, True, "fe:54:00:d0:ff:fe")


def port(n: int, index: int | None = None) -> inv.Link:
    return inv.Link(index or 10 + n, f"vnet{n}", "veth", 1, True, f"fe:00:00:00:00:{n:02x}")


class World:
    """The bridge as netlink would report it, and the controller's ledger."""

    def __init__(self, ports: int = 4, **kw: str) -> None:
        self.policy = policy(**kw)
        self.tables = inv.fold(
            inv.EMPTY, inv.Snapshot((BRIDGE, *map(port, range(1, ports + 1))), ())
        )
        self.ledger = Ledger()
        self.now = 1000

    def learn(self, mac: str, n: int) -> None:
        link = self.port_link(n)
        self.tables = inv.fold(self.tables, inv.FdbUp(inv.Fdb(mac, link.index, False, 1)))

    def forget(self, mac: str, n: int) -> None:
        self.tables = inv.fold(self.tables, inv.FdbGone(mac, self.port_link(n).index))

    def port_link(self, n: int) -> inv.Link:
        return next(x for x in self.tables.links.values() if x.name == f"vnet{n}")

    def recreate(self, n: int, index: int) -> None:
        self.tables = inv.fold(self.tables, inv.LinkGone(self.port_link(n).index))
        self.tables = inv.fold(self.tables, inv.LinkUp(port(n, index)))

    def decide(self, mac: str, leased: dict | None = None):
        self.now += 1
        i = inv.inventory(self.tables, "virbr0")
        return decide(self.policy, i, self.ledger, mac, self.now, leased=leased)

    def sync(self) -> None:
        """A full sync's decisions: the controller's one loop."""
        i = inv.inventory(self.tables, "virbr0")
        decide_many(
            self.policy,
            i,
            self.ledger,
            set(i.sightings) | set(self.ledger.by_mac),
            self.now,
            {},
            {},
        )


VM1 = "52:54:00:d0:00:01"  # odd -> x
VM3 = "52:54:00:d0:00:03"  # odd -> x
VM2 = "52:54:00:d0:00:02"  # even -> y
STRANGER = "00:16:3e:00:00:01"  # no rule -> quarantine


def test_a_second_mac_of_another_rule_on_a_port_is_refused_and_takes_nothing() -> None:
    w = World()
    w.learn(VM1, 1)
    assert w.decide(VM1).state is not None
    w.learn(VM2, 1)  # vm1 turns into a y MAC: another domain
    out = w.decide(VM2)
    assert out.refused and "one port, one domain" in out.refused and out.refused_port == "vnet1"
    assert out.state is None and not out.put
    assert w.ledger.get(VM2) is None
    w.learn(STRANGER, 1)  # nor may an unmatched MAC hide behind it in quarantine
    assert w.decide(STRANGER).refused
    assert set(w.ledger.by_mac) == {VM1}


def test_a_new_mac_of_the_same_rule_carries_the_identity_on() -> None:
    w = World()
    w.learn(VM1, 1)
    first = w.decide(VM1).put[0]
    w.learn(VM3, 1)  # the guest randomized its MAC within its rule
    out = w.decide(VM3)
    a = w.ledger.get(VM3)
    assert out.took_over is not None and out.took_over.mac == VM1
    assert a is not None and (a.rule, a.slot, a.address, a.port) == (
        first.rule,
        first.slot,
        first.address,
        "vnet1",
    )
    assert a.key_id == VM1  # the tunnel key follows the identity
    assert w.ledger.get(VM1) is None
    # the old MAC, still in the FDB, does not take it back (no flip-flop), in
    # whatever order a full sync decides
    assert w.decide(VM1).refused
    w.sync()
    assert set(w.ledger.by_mac) == {VM3} and w.ledger.get(VM3) == a
    # but when the old MAC comes later than the new one, it is the machine again
    w.forget(VM1, 1)
    w.learn(VM1, 1)
    assert w.decide(VM1).took_over is not None
    assert w.ledger.get(VM1).slot == first.slot  # type: ignore[union-attr]


def test_moving_the_mac_into_another_domain_gets_nothing() -> None:
    w = World()
    w.learn(VM2, 2)
    a = w.decide(VM2).put[0]
    # vm2 (y) picks a MAC that matches odd (x): refused while its old MAC is
    # in the FDB, and once it has aged out too (vm2 held its lease)
    w.learn("52:54:00:d0:00:33", 2)
    assert w.decide("52:54:00:d0:00:33").refused
    w.decide(VM2, leased={VM2: a.address})
    w.forget(VM2, 2)
    out = w.decide("52:54:00:d0:00:33")
    assert out.refused and out.state is None
    assert all(a.domain == "y" for a in w.ledger.by_mac.values())
    # the same MAC on a port of its own is admitted to x
    w.forget("52:54:00:d0:00:33", 2)
    w.learn("52:54:00:d0:00:33", 3)
    assert w.decide("52:54:00:d0:00:33").state is not None
    assert w.ledger.get("52:54:00:d0:00:33").domain == "x"  # type: ignore[union-attr]


def test_a_mac_that_never_held_its_lease_is_released_when_the_bridge_forgets_it() -> None:
    w = World()
    w.learn(VM1, 1)
    w.learn(VM3, 2)
    w.decide(VM1)
    a3 = w.decide(VM3).put[0]
    # vm3 holds its lease: established
    out = w.decide(VM3, leased={VM3: a3.address})
    assert out.put and out.put[0].confirmed
    w.forget(VM1, 1)
    w.forget(VM3, 2)  # FDB ageing: both idle
    gone = w.decide(VM1)
    assert gone.released and w.ledger.get(VM1) is None  # released at once
    stays = w.decide(VM3)
    assert stays.state is not None  # an idle, established machine is still there
    assert presence(inv.inventory(w.tables, "virbr0"), w.ledger, VM3) == ("vnet2", None)


def test_a_recreated_port_with_the_same_name_is_another_port() -> None:
    w = World()
    w.learn(VM1, 1)
    a = w.decide(VM1).put[0]
    w.decide(VM1, leased={VM1: a.address})
    # libvirt reuses the name vnet1 for another VM, before the controller
    # heard of the first one's port going away
    w.recreate(1, index=99)
    w.learn(VM2, 1)
    out = w.decide(VM2)  # a y machine: not refused for the old x machine's sake
    assert out.state is not None
    assert w.decide(VM1).put[0].absent_since is not None


def test_max_machines_per_port_and_per_rule() -> None:
    w = World(bridge="max_machines_per_port = 2")
    macs = [f"52:54:01:00:00:0{i}" for i in range(1, 4)]
    for m in macs:
        w.learn(m, 1)
    outs = [w.decide(m) for m in macs]
    assert [o.state is not None for o in outs] == [True, True, False]
    assert "limit of 2" in (outs[2].refused or "")
    # the x machines of a port may not be joined by a y machine even below the limit
    w2 = World(bridge="max_machines_per_port = 4")
    w2.learn(VM1, 1)
    w2.learn(VM2, 1)
    w2.decide(VM1)
    assert w2.decide(VM2).refused


macs = st.sampled_from(
    [VM1, VM2, VM3, STRANGER, "52:54:00:d0:00:05", "52:54:00:d0:00:04", "52:54:01:00:00:07"]
)
events = st.lists(
    st.tuples(st.sampled_from(["learn", "forget", "lease", "sync"]), macs, st.integers(1, 3)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([1, 2]))
def test_no_port_ever_holds_more_than_its_limit_or_two_domains(evs: list, limit: int) -> None:
    w = World(ports=3, bridge=f"max_machines_per_port = {limit}")
    for op, mac, n in evs:
        if op == "learn":
            w.learn(mac, n)
            w.decide(mac)
        elif op == "forget":
            w.forget(mac, n)
            w.decide(mac)
        elif op == "lease" and (a := w.ledger.get(mac)) is not None and a.address:
            w.decide(mac, leased={mac: a.address})
        else:
            w.sync()
        i = inv.inventory(w.tables, "virbr0")
        present: dict[str, list] = {}
        for m, a in w.ledger.by_mac.items():
            if presence(i, w.ledger, m)[0] == a.port and a.absent_since is None:
                present.setdefault(a.port, []).append(a)
        for p, held in present.items():
            assert len(held) <= limit, (p, held)
            assert len({a.domain for a in held}) == 1, (p, held)
        slots = [(a.rule, a.slot) for a in w.ledger.by_mac.values()]
        assert len(slots) == len(set(slots))
    # once everything is decided, deciding again changes nothing (stable,
    # whatever the order)
    w.sync()
    before = dict(w.ledger.by_mac)
    w.sync()
    after = {m: replace(a) for m, a in w.ledger.by_mac.items()}
    assert after == before
