"""The uplink (`wg0`) and the hub: WireGuard devices and the routing around them.

The uplink is routed as wg-quick does with `Table=auto`: a default route in
its own table, a rule sending everything *not* carrying the tunnel's fwmark
to that table, and a rule letting more specific routes of the main table win
(`suppress_prefixlength 0`: the bridge's and the hub's subnets stay local).
The tunnel's own encrypted packets carry the fwmark and use the main table's
default route, out of the WAN. An `unreachable` default (metric 4096) in the
uplink's table makes a missing `wg0` fail at routing, before the kill switch
even sees a packet.

Rules and routes carry dom0's protocol number, so only dom0's are touched.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from common.wireguard import Device, Peer, WireGuard, WireGuardError, keys
from controller.core.desired import HubPeer, HubState, UplinkState
from controller.drivers.addresses import DOM0_PROTO

log = logging.getLogger(__name__)

FIB_RULE_INVERT = 0x2
SUPPRESS_PRIORITY = 32760
UPLINK_PRIORITY = 32761
MAIN_TABLE = 254


def key_path(state_dir: Path, name: str) -> Path:
    p = Path(name)
    return p if p.is_absolute() else state_dir / p


class Tunnels:
    def __init__(self, wg: Callable[[], WireGuard], ipr: IPRoute, state_dir: Path) -> None:
        self._wg = wg
        self.ipr = ipr
        self.state_dir = state_dir

    @property
    def wg(self) -> WireGuard:
        return self._wg()

    # -- the uplink --------------------------------------------------------------
    def ensure_uplink(self, u: UplinkState) -> None:
        private = keys.load_or_create(key_path(self.state_dir, u.private_key_file))
        self._device(u.interface, private, listen_port=None, fwmark=u.table)
        allowed = ("0.0.0.0/0", "::/0")
        self.wg.replace_peers(
            u.interface,
            [
                Peer(
                    public_key=base64.b64decode(u.peer_public_key),
                    allowed_ips=allowed,
                    endpoint=u.endpoint,
                    persistent_keepalive=u.persistent_keepalive or None,
                )
            ],
        )
        index = self._link(u.interface, u.mtu)
        self._routes(u, index)
        self._rules(u)

    def _device(
        self, name: str, private: keys.PrivateKey, *, listen_port: int | None, fwmark: int | None
    ) -> None:
        """Create or adopt the device; configure it only when it is new or
        differs (resending a port makes wireguard-go reopen its socket)."""
        new = self.wg.ensure(name)
        device = self.wg.get(name)
        if (
            new
            or device.public_key != private.public
            or device.fwmark != fwmark
            or (listen_port is not None and device.listen_port != listen_port)
        ):
            self.wg.configure(name, private_key=private, listen_port=listen_port, fwmark=fwmark)

    def _link(self, name: str, mtu: int) -> int:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise RuntimeError(f"WireGuard interface {name} did not appear")
        index = found[0]
        self.ipr.link("set", index=index, mtu=mtu, state="up")
        return index

    def _routes(self, u: UplinkState, index: int) -> None:
        v6 = any(":" in a for a in u.addresses)
        for dst, through in (("0.0.0.0/0", True), ("::/0", v6)):
            # IPv6 without a tunnel address still gets the unreachable default:
            # it fails at routing instead of looking for the WAN.
            specs: list[dict] = [{"type": "unreachable", "priority": 4096}]
            if through:
                specs.insert(0, {"oif": index})
            for spec in specs:
                try:
                    self.ipr.route("replace", dst=dst, table=u.table, proto=DOM0_PROTO, **spec)
                except NetlinkError as e:
                    raise RuntimeError(f"uplink route {dst} table {u.table}: {e}") from e

    def _rules(self, u: UplinkState) -> None:
        want = {
            (SUPPRESS_PRIORITY, MAIN_TABLE, 0, None, 0),
            (UPLINK_PRIORITY, u.table, FIB_RULE_INVERT, u.table, None),
        }
        for family in (2, 10):
            have = set()
            for r in self.ipr.get_rules(family=family):
                if r.get("FRA_PROTOCOL") != DOM0_PROTO:
                    continue
                key = (
                    r.get("FRA_PRIORITY"),
                    r.get("FRA_TABLE"),
                    r["flags"] & FIB_RULE_INVERT,
                    r.get("FRA_FWMARK"),
                    0 if r.get("FRA_SUPPRESS_PREFIXLEN") == 0 else None,
                )
                if key in want:
                    have.add(key)
                else:  # dom0's, but stale (another table or priority)
                    self.ipr.rule("del", family=family, priority=r.get("FRA_PRIORITY"))
            for prio, table, flags, mark, suppress in want - have:
                spec: dict = {
                    "family": family,
                    "table": table,
                    "priority": prio,
                    "protocol": DOM0_PROTO,
                }
                if mark is not None:
                    spec.update(fwmark=mark, flags=flags)
                if suppress is not None:
                    spec["suppress_prefixlen"] = suppress
                self.ipr.rule("add", **spec)

    # -- the hub -------------------------------------------------------------------
    def ensure_hub(self, h: HubState) -> None:
        private = keys.load_or_create(key_path(self.state_dir, h.private_key_file))
        self._device(h.interface, private, listen_port=h.listen_port, fwmark=None)
        self._link(h.interface, h.mtu)

    def hub_public_key(self, h: HubState) -> str:
        private = keys.load_or_create(key_path(self.state_dir, h.private_key_file))
        return base64.b64encode(keys.public_of(private)).decode()

    def hub_peers(self, h: HubState, put: dict[str, HubPeer], delete: frozenset[str]) -> None:
        self.wg.set_peers(
            h.interface,
            upsert=[Peer(base64.b64decode(k), p.allowed_ips) for k, p in put.items()],
            remove=[base64.b64decode(k) for k in delete],
        )

    def hub_replace_peers(self, h: HubState, peers: dict[str, HubPeer]) -> None:
        self.wg.replace_peers(
            h.interface, [Peer(base64.b64decode(k), p.allowed_ips) for k, p in peers.items()]
        )

    def hub_peer_state(self, h: HubState) -> dict[str, tuple[str, ...]]:
        """The hub's peers as the device holds them: key -> allowed-ips."""
        device = self.wg.get(h.interface)
        return {
            base64.b64encode(k).decode(): tuple(s.peer.allowed_ips) for k, s in device.peers.items()
        }

    # -- observing (read-only: nothing here creates a key or a device) -----------
    def _read_device(self, name: str) -> Device | None:
        try:
            return self.wg.get(name)
        except (WireGuardError, OSError):
            return None

    def _public_key(self, file: str) -> bytes | None:
        path = key_path(self.state_dir, file)
        if not path.exists():
            return None
        try:
            return keys.public_of(keys.load(path))
        except keys.KeyFileError:
            return None

    def _link_ok(self, name: str, mtu: int) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            return None
        link = self.ipr.get_links(found[0])[0]
        up = bool(link["flags"] & 1)
        return found[0] if up and link.get_attr("IFLA_MTU") == mtu else None

    def observe_uplink(self, u: UplinkState) -> UplinkState | None:
        """`u` if the uplink is configured as it says (device, key, fwmark,
        peer, link, routes, rules), else None."""
        device = self._read_device(u.interface)
        public = self._public_key(u.private_key_file)
        if device is None or public is None or device.public_key != public:
            return None
        if device.fwmark != u.table or len(device.peers) != 1:
            return None
        (peer,) = device.peers.values()
        if base64.b64encode(peer.peer.public_key).decode() != u.peer_public_key:
            return None
        if set(peer.peer.allowed_ips) != {"0.0.0.0/0", "::/0"}:
            return None
        index = self._link_ok(u.interface, u.mtu)
        if index is None:
            return None
        routes = {
            (r.get_attr("RTA_DST"), r.get_attr("RTA_OIF"), r["type"])
            for family in (2, 10)
            for r in self.ipr.get_routes(family=family, table=u.table)
            if r["proto"] == DOM0_PROTO
        }
        if (None, index, 1) not in routes or not any(t == 7 for _d, _o, t in routes):
            return None  # the default route via the tunnel, and the unreachable fallback
        rules = {
            (r.get("FRA_PRIORITY"), r.get("FRA_TABLE"))
            for family in (2, 10)
            for r in self.ipr.get_rules(family=family)
            if r.get("FRA_PROTOCOL") == DOM0_PROTO
        }
        if {(SUPPRESS_PRIORITY, MAIN_TABLE), (UPLINK_PRIORITY, u.table)} - rules:
            return None
        return u

    def observe_hub(self, h: HubState) -> HubState | None:
        device = self._read_device(h.interface)
        public = self._public_key(h.private_key_file)
        if device is None or public is None or device.public_key != public:
            return None
        if device.listen_port != h.listen_port or self._link_ok(h.interface, h.mtu) is None:
            return None
        return h

    def observe_peers(self, h: HubState) -> dict[str, HubPeer]:
        device = self._read_device(h.interface)
        if device is None:
            return {}
        return {
            base64.b64encode(k).decode(): HubPeer(
                base64.b64encode(k).decode(), tuple(s.peer.allowed_ips)
            )
            for k, s in device.peers.items()
        }


# ---- everything dom0 holds in routing (`dom0 flush`) -----------------------------------------


@dataclass(frozen=True, slots=True)
class OwnedRoute:
    """A route carrying dom0's protocol number, in any table."""

    family: int
    table: int
    dst: str | None  # None: default
    dst_len: int
    type: int  # 1 unicast, 7 unreachable
    oif: int | None
    priority: int | None

    def label(self) -> str:
        dst = self.dst or ("default" if self.dst_len == 0 else "?")
        kind = "unreachable " if self.type == 7 else ""
        v = "ipv6" if self.family == 10 else "ipv4"
        return f"{v} route {kind}{dst}{f'/{self.dst_len}' if self.dst else ''} table {self.table}"


@dataclass(frozen=True, slots=True)
class OwnedRule:
    """A policy-routing rule carrying dom0's protocol number."""

    family: int
    priority: int
    table: int
    flags: int
    fwmark: int | None
    suppress_prefixlen: int | None

    def label(self) -> str:
        v = "ipv6" if self.family == 10 else "ipv4"
        mark = ""
        if self.fwmark is not None:
            mark = f" {'not ' if self.flags & FIB_RULE_INVERT else ''}fwmark {self.fwmark:#x}"
        return f"{v} rule {self.priority}{mark} lookup {self.table}"


def owned_routing(ipr: IPRoute) -> tuple[list[OwnedRoute], list[OwnedRule]]:
    """dom0's routes (every table) and rules in this namespace, by protocol number."""
    routes, rules = [], []
    for family in (2, 10):
        for r in ipr.get_routes(family=family):
            if r["proto"] == DOM0_PROTO:
                routes.append(
                    OwnedRoute(
                        family,
                        r.get_attr("RTA_TABLE") or r["table"],
                        r.get_attr("RTA_DST"),
                        r["dst_len"],
                        r["type"],
                        r.get_attr("RTA_OIF"),
                        r.get_attr("RTA_PRIORITY"),
                    )
                )
        for r in ipr.get_rules(family=family):
            if r.get("FRA_PROTOCOL") == DOM0_PROTO:
                suppress = r.get("FRA_SUPPRESS_PREFIXLEN")
                rules.append(
                    OwnedRule(
                        family,
                        r.get("FRA_PRIORITY") or 0,
                        r.get("FRA_TABLE") or r["table"],
                        r["flags"],
                        r.get("FRA_FWMARK"),
                        None if suppress in (None, 0xFFFFFFFF) else suppress,
                    )
                )
    return routes, rules


def delete_route(ipr: IPRoute, r: OwnedRoute) -> None:
    """Gone already (its interface went) is fine."""
    default = "0.0.0.0" if r.family == 2 else "::"
    spec: dict = {
        "family": r.family,
        "table": r.table,
        "dst": f"{r.dst or default}/{r.dst_len}",
        "type": r.type,
        "proto": DOM0_PROTO,
    }
    if r.oif is not None:
        spec["oif"] = r.oif
    if r.priority is not None:
        spec["priority"] = r.priority
    try:
        ipr.route("del", **spec)
    except NetlinkError as e:
        if e.code not in (3, 19):  # ESRCH, ENODEV: already gone
            raise


def delete_rule(ipr: IPRoute, r: OwnedRule) -> None:
    spec: dict = {
        "family": r.family,
        "priority": r.priority,
        "table": r.table,
        "protocol": DOM0_PROTO,
    }
    if r.fwmark is not None:
        spec.update(fwmark=r.fwmark, flags=r.flags)
    if r.suppress_prefixlen is not None:
        spec["suppress_prefixlen"] = r.suppress_prefixlen
    try:
        ipr.rule("del", **spec)
    except NetlinkError as e:
        if e.code != 2:  # ENOENT: already gone
            raise
