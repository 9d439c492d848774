"""A remap's old address kept deprecated: the schema's `deprecated`, and the Applier's pure
core (agents/apply.py) on plain data. Against the kernel: tests/lab/test_agent_apply.py."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.apply import (
    _Address,
    _address_changes,
    _AddressChanges,
    _Route,
    _route_changes,
    _wanted_addresses,
    _wanted_routes,
)
from common.agentconfig import (
    MAX_ADDRESSES,
    ConfigError,
    MachineConfig,
    Route,
    Tunnel,
    parse,
    to_wire,
)

MAC = "52:54:00:aa:00:01"
KEY = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
LINK, WG = 2, 3  # interface indexes
OLD, NEW = "10.10.0.5/24", "10.10.0.6/24"


def machine(**over: Any) -> MachineConfig:
    base: dict[str, Any] = {
        "name": "web1.x.internal",
        "hostname": "web1",
        "mac": MAC,
        "addresses": (NEW, "fd00:10::6/64"),
        "routes": (Route("0.0.0.0/0", "10.10.0.1"), Route("::/0", "fd00:10::1")),
        "deprecated": (OLD, "fd00:10::5/64"),
    }
    return MachineConfig(**{**base, **over})


def tunnel(address: str = "10.10.0.6/32") -> Tunnel:
    return Tunnel("wg0", address, KEY, "10.250.0.1:51820", ("0.0.0.0/0",), 1380, 25)


def hub(**over: Any) -> MachineConfig:
    base: dict[str, Any] = {
        "addresses": ("10.250.0.5/16",),
        "routes": (Route("0.0.0.0/0", None, "tunnel"), Route("10.250.0.0/16", None, "link")),
        "tunnel": tunnel(),
        "deprecated": ("10.10.0.5/32",),
    }
    return machine(**{**base, **over})


# ---- the schema ------------------------------------------------------------------------------


def test_deprecated_goes_over_the_wire_and_back() -> None:
    for config in (machine(), hub(), machine(deprecated=())):
        wire = to_wire(config)
        assert wire["deprecated"] == list(config.deprecated)
        assert parse(wire) == config


def test_a_config_kept_before_remaps_still_parses() -> None:
    """A last-known-good written before `deprecated` (and before `dns`) has neither key."""
    wire = to_wire(machine(deprecated=()))
    del wire["deprecated"], wire["dns"]
    assert parse(wire) == machine(deprecated=())


@pytest.mark.parametrize(
    ("deprecated", "error"),
    [
        (("10.10.0.5",), "config.deprecated[0]: '10.10.0.5', expected the canonical"),
        (("10.10.0.5/33",), "config.deprecated[0]: '10.10.0.5/33', expected an address with"),
        (("fd00:10:0::5/64",), "config.deprecated[0]: 'fd00:10:0::5/64', expected the canonical"),
        ((OLD, "nonsense"), "config.deprecated[1]: 'nonsense', expected an address with"),
        ((NEW,), f"config.deprecated[0]: '{NEW}', expected an address not in config.addresses"),
        # by IP: one address is not preferred and deprecated at once
        (("10.10.0.6/16",), "config.deprecated[0]: '10.10.0.6/16', expected an address not in"),
        ((OLD, OLD), f"config.deprecated[1]: '{OLD}', expected an address not earlier in"),
        ((OLD,) * (MAX_ADDRESSES + 1), "config.deprecated: '17 items', expected a list of at"),
    ],
)
def test_bad_deprecated_is_refused_naming_it(deprecated: tuple[str, ...], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        machine(deprecated=deprecated)
    assert str(e.value).startswith(error), e.value
    wire = to_wire(machine(deprecated=()))  # the agent's side refuses it the same way
    with pytest.raises(ConfigError) as e:
        parse({**wire, "deprecated": list(deprecated)})
    assert str(e.value).startswith(error), e.value


def test_deprecated_must_not_be_the_tunnel_address() -> None:
    with pytest.raises(ConfigError) as e:
        hub(tunnel=tunnel("10.10.0.5/32"))
    assert str(e.value) == (
        "config.deprecated[0]: '10.10.0.5/32', expected an address other than config.tunnel.address"
    )


def test_deprecated_on_the_wire_must_be_a_list() -> None:
    wire = to_wire(machine(deprecated=()))
    with pytest.raises(ConfigError, match=r"^config.deprecated: '10.10.0.5/24', expected a list"):
        parse({**wire, "deprecated": OLD})


# ---- the pure core: wanted addresses and their difference with what is there ------------------


def a(cidr: str, index: int = LINK, **kw: Any) -> _Address:
    return _Address(index, cidr, **kw)


def test_wanted_deprecated_beside_the_domain_address() -> None:
    """On the link in a bridge domain; on the tunnel for a hub machine (its link holds the
    underlay address, which a remap does not move)."""
    assert sorted(_wanted_addresses(machine(), LINK, None)) == [
        a(OLD, deprecated=True),
        a(NEW),
        a("fd00:10::5/64", deprecated=True),
        a("fd00:10::6/64"),
    ]
    wanted = _wanted_addresses(hub(), LINK, WG)
    assert {(w.index, w.cidr, w.deprecated) for w in wanted} == {
        (LINK, "10.250.0.5/16", False),
        (WG, "10.10.0.6/32", False),
        (WG, "10.10.0.5/32", True),
    }


def test_primary_to_deprecated_is_a_change_not_a_removal() -> None:
    """The remap: the old address stays, its lifetimes changed; the new one is added."""
    present = [a(OLD)]
    wanted = {a(NEW), a(OLD, deprecated=True)}
    assert _address_changes(wanted, present) == _AddressChanges(
        clear=[], add=[a(NEW)], change=[a(OLD, deprecated=True)], delete=[]
    )
    # and back (a rollback): the new one goes, after the old one is preferred again
    changes = _address_changes({a(OLD)}, [a(NEW), a(OLD, deprecated=True)])
    assert changes == _AddressChanges(clear=[], add=[], change=[a(OLD)], delete=[a(NEW)])
    assert not changes.change[0].deprecated


def test_deprecated_removed_when_it_leaves_the_config() -> None:
    present = [a(NEW), a(OLD, deprecated=True)]
    assert _address_changes({a(NEW)}, present) == _AddressChanges([], [], [], [a(OLD)])
    # in place as wanted: nothing to do
    assert _address_changes({a(NEW), a(OLD, deprecated=True)}, present) == _AddressChanges(
        [], [], [], []
    )


def test_lifetimes_that_run_out_are_set_again_but_not_somebody_elses() -> None:
    wanted = {a(NEW), a(OLD, deprecated=True)}
    mine = [a(NEW, expires=True), a(OLD, deprecated=True, expires=True)]
    assert _address_changes(wanted, mine).change == sorted(wanted)
    # a lease at a wanted address counts as there, as it is, and stays its owner's
    theirs = [
        a(NEW, owned=False, expires=True),
        a(OLD, owned=False),
        a("10.10.0.77/24", owned=False),
    ]
    assert _address_changes(wanted, theirs) == _AddressChanges([], [], [], [])


def test_only_an_old_ipv6_prefix_length_goes_first() -> None:
    """IPv6 refuses a second prefix length for one IP on an interface, IPv4 does not: only
    the IPv6 one is removed before the add (everything else after the routes)."""
    present = [a("fd00:10::6/48"), a("10.10.0.6/16"), a("fd00:10::7/64"), a("fd00:10::6/64", WG)]
    changes = _address_changes({a("fd00:10::6/64"), a("10.10.0.6/24")}, present)
    assert changes.clear == [a("fd00:10::6/48")]
    assert changes.add == [a("10.10.0.6/24"), a("fd00:10::6/64")]
    assert changes.delete == [a("10.10.0.6/16"), a("fd00:10::7/64"), a("fd00:10::6/64", WG)]


# ---- routes leave from the first address of their device --------------------------------------


def test_routes_leave_from_the_new_address() -> None:
    assert _wanted_routes(machine(), LINK, None) == [
        _Route("0.0.0.0/0", "10.10.0.1", LINK, src="10.10.0.6"),
        _Route("::/0", "fd00:10::1", LINK, src="fd00:10::6"),
    ]
    assert _wanted_routes(hub(), LINK, WG) == [
        _Route("0.0.0.0/0", None, WG, src="10.10.0.6"),
        _Route("10.250.0.0/16", None, LINK, src="10.250.0.5"),
    ]
    # no address of the family on the device: the kernel chooses
    v6_on_tunnel = hub(routes=(Route("::/0", None, "tunnel"),))
    assert _wanted_routes(v6_on_tunnel, LINK, WG) == [_Route("::/0", None, WG, src=None)]


def test_a_route_from_the_old_address_is_replaced_not_deleted() -> None:
    """No moment without a default route: the replace overwrites it."""
    owned = [
        _Route("0.0.0.0/0", "10.10.0.1", LINK, src="10.10.0.5"),
        _Route("10.20.0.0/16", "10.10.0.1", LINK, src="10.10.0.5"),
    ]
    wanted = [_Route("0.0.0.0/0", "10.10.0.1", LINK, src="10.10.0.6")]
    assert _route_changes(wanted, owned) == ([owned[1]], wanted)
    assert _route_changes(wanted, wanted) == ([], [])


# ---- a property: any config to any other -------------------------------------------------------

POOL = ("10.10.0.5", "10.10.0.6", "10.10.0.7", "fd00:10::5", "fd00:10::6")
ROUTES = (Route("0.0.0.0/0", "10.10.0.1"), Route("::/0", "fd00:10::1"))


@st.composite
def configs(draw: st.DrawFn) -> MachineConfig:
    """A machine over a small set of IPs: each is preferred, deprecated, the tunnel's, or
    absent; in any order (the first of a family is what routes leave from); with two
    prefix lengths each, whose change makes one IP another address."""
    ips = draw(st.permutations(POOL))
    roles = draw(st.lists(st.sampled_from("-apd"), min_size=len(POOL), max_size=len(POOL)))
    addresses, deprecated, tunnel_ip = [], [], None
    for ip, role in zip(ips, roles, strict=True):
        v4 = ipaddress.ip_address(ip).version == 4
        length = draw(st.sampled_from((24, 16) if v4 else (64, 48)))
        if role == "a":
            addresses.append(f"{ip}/{length}")
        elif role == "d":
            deprecated.append(f"{ip}/{length}")
        elif role == "p" and tunnel_ip is None and v4:
            tunnel_ip = ip
    routes = ROUTES + ((Route("0.0.0.0/1", None, "tunnel"),) if tunnel_ip else ())
    return machine(
        addresses=tuple(addresses),
        deprecated=tuple(deprecated),
        tunnel=tunnel(f"{tunnel_ip}/32") if tunnel_ip else None,
        routes=routes,
    )


def ip_of(x: _Address) -> str:
    return str(ipaddress.ip_interface(x.cidr).ip)


class Kernel:
    """The namespace's addresses and the agent's routes as the kernel keeps them, for what
    the pass relies on: IPv6 refuses a second address with one IP on an interface;
    removing an IPv4 address (its IP on no other) removes the routes leaving from it."""

    def __init__(self, addresses: set[_Address], routes: list[_Route]) -> None:
        self.addresses = {x: x for x in addresses}
        self.routes = {r.to: r for r in routes}
        self.removed: list[_Address] = []
        self.must_stay: set[str] = set()  # destinations never without a route

    def __iter__(self) -> Iterator[_Address]:
        return iter(list(self.addresses.values()))

    def add(self, x: _Address) -> None:
        assert x not in self.addresses, x
        if ":" in x.cidr:
            taken = any(y.index == x.index and ip_of(y) == ip_of(x) for y in self)
            assert not taken, f"{x.cidr}: address already assigned"
        self.addresses[x] = x

    def change(self, x: _Address) -> None:
        assert self.addresses[x].owned, x
        self.addresses[x] = x

    def remove(self, x: _Address) -> None:
        assert self.addresses.pop(x).owned, x
        self.removed.append(x)
        if ":" not in x.cidr and not any(ip_of(y) == ip_of(x) for y in self):
            self.routes = {to: r for to, r in self.routes.items() if r.src != ip_of(x)}
        self.check()

    def replace_routes(self, wanted: list[_Route]) -> None:
        delete, replace = _route_changes(wanted, list(self.routes.values()))
        for r in delete:
            del self.routes[r.to]
            self.check()
        for r in replace:
            assert r.src is None or self.prefers(r.index, r.src), f"{r}: its src is not there"
            self.routes[r.to] = r
            self.check()

    def prefers(self, index: int, ip: str) -> bool:
        return any(y.index == index and ip_of(y) == ip and not y.deprecated for y in self)

    def check(self) -> None:
        gone = self.must_stay - set(self.routes)
        assert not gone, f"a moment without a route to {gone}"

    def converge(self, wanted: set[_Address], routes: list[_Route]) -> None:
        """What Applier._network does, in its order."""
        self.must_stay = set(self.routes) & {r.to for r in routes}
        changes = _address_changes(wanted, self)
        for x in changes.clear:
            self.remove(x)
        for x in changes.add:
            self.add(x)
        for x in changes.change:
            self.change(x)
        self.replace_routes(routes)
        for x in changes.delete:
            self.remove(x)


def state(addresses: Iterable[_Address]) -> set[tuple[int, str, bool]]:
    return {(x.index, x.cidr, x.deprecated) for x in addresses}


@given(configs(), configs())
def test_any_config_to_any_other(old: MachineConfig, new: MachineConfig) -> None:
    """From old's state the plan reaches new's exactly (a second pass has nothing to do);
    an address in both is never removed (only its lifetimes change); routes leave from a
    preferred address that is there, and a destination routed before and after is never
    without its route; somebody else's address stays."""
    lease = _Address(LINK, "10.10.0.77/24", owned=False)
    wanted_old = _wanted_addresses(old, LINK, WG if old.tunnel else None)
    kernel = Kernel(wanted_old | {lease}, _wanted_routes(old, LINK, WG if old.tunnel else None))
    wanted = _wanted_addresses(new, LINK, WG if new.tunnel else None)
    routes = _wanted_routes(new, LINK, WG if new.tunnel else None)

    kernel.converge(wanted, routes)

    assert state(x for x in kernel if x.owned) == state(wanted)
    assert lease in kernel.addresses
    assert not set(kernel.removed) & wanted_old & wanted, kernel.removed
    assert _address_changes(wanted, kernel) == _AddressChanges([], [], [], [])
    assert _route_changes(routes, list(kernel.routes.values())) == ([], [])
