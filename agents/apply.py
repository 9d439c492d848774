"""The agent's one side effect: a MachineConfig made real in this network namespace.

What the agent puts in place carries its mark, as dom0's addresses carry
DOM0_PROTO (controller/drivers/addresses.py): IFA_PROTO on addresses and
rtm_protocol on routes are AGENT_PROTO. A pass reads what is there, compares it
with what the configuration wants (the pure functions at the top) and changes
only the difference: a second pass with the same configuration writes
nothing, and what a DHCP client, the kernel or an operator put there is never
removed. The WireGuard interface is the driver's (common.wireguard), named by
the configuration; its private key is the agent's own, root/wg.key. The
containers' bridge, forwarding and rule are a step of the same pass
(agents/containers.py converge), rolled back with the rest.

A remap is make-before-break. The address the machine held before is kept through
the grace in `config.deprecated`, on the interface that holds the domain address,
with a preferred lifetime of 0 (valid forever): connections open on it go on. New
ones leave from the new address because every route the agent installs names its
device's first address of the family as `src` (for IPv4 the deprecated mark alone
does not change source selection). An address that turns from preferred to
deprecated, or back, has its lifetimes changed in place, never removed and added
again: that would cut what is open on it. A pass puts the wanted addresses and the
routes in place before it removes what is stale, since IPv4 deletes a route with the
address it leaves from. promote_secondaries is on for IPv4 on the link and the
tunnel, so that removing the old address when the grace is over (in a bridge domain
the subnet's primary) keeps the new one and the routes. (The kernel's own route to
the subnet keeps the primary's source until then: a new connection to an on-link
neighbour, dom0's gateway included, leaves from the old address during the grace.)

A pass that fails converges back to the previous configuration (with none: takes
away everything marked), so a configuration the kernel refuses leaves the machine
as it was, and the one-line reason becomes the Nack's error.

Synchronous; each call opens its own netlink socket, because pyroute2's IPRoute
is thread-affine and the caller runs each call in whatever worker thread it has.
Light on purpose (the agent runs inside VMs): the standard library, pyroute2,
and common.* only.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from common.agentconfig import MachineConfig, Tunnel
from common.wireguard import Backend, Peer, PrivateKey, WireGuardError, detect, load_or_create
from common.wireguard.backend import Kind
from common.wireguard.model import b64

log = logging.getLogger(__name__)

AGENT_PROTO = 0x61  # IFA_PROTO of addresses and rtm_protocol of routes the agent owns ("a")
MAIN_TABLE = 254
MAX_ERROR = 1000  # the Nack's error
_SCOPE_LINK = 253
_IFF_UP = 0x1
_IFA_F_NODAD = 0x02
_IFA_F_DEPRECATED = 0x20
_IFA_F_PERMANENT = 0x80  # valid forever
FOREVER = 0xFFFFFFFF  # a lifetime of IFA_CACHEINFO
_CONF4 = Path("/proc/sys/net/ipv4/conf")  # this namespace's (as containers.FORWARDING)
_ETC_HOSTNAME = Path("/etc/hostname")


class ApplyError(Exception):
    """One line: what could not be applied (it becomes the Nack's error, <= 1000 chars)."""


# ---- the pure core: values read from the kernel, values wanted, their difference ----------


@dataclass(frozen=True, slots=True, order=True)
class _Address:
    """An address is known by where it is and what it is; its lifetimes are its state."""

    index: int
    cidr: str  # canonical, as common.agentconfig writes it: 10.10.0.5/24
    owned: bool = field(default=True, compare=False)
    # Preferred lifetime 0 (new connections do not choose it); wanted: in config.deprecated.
    deprecated: bool = field(default=False, compare=False)
    # A lifetime that is not forever (it will change by itself): never as the agent sets
    # them (valid forever; preferred forever, or 0 when deprecated).
    expires: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class _AddressChanges:
    """In the order of a pass: `clear`, `add`, `change`, the routes, `delete`."""

    clear: list[_Address]  # the agent's, not wanted, in the way of one to add
    add: list[_Address]  # wanted and not there, as here
    change: list[_Address]  # the agent's, wanted with other lifetimes: set in place, as here
    delete: list[_Address]  # the agent's other ones not wanted (anywhere in the namespace)


@dataclass(frozen=True, slots=True)
class _Route:
    to: str  # a canonical network: 0.0.0.0/0
    via: str | None
    index: int  # the output interface (0: none, e.g. a multipath route somebody made)
    src: str | None = None  # the preferred source (RTA_PREFSRC): the device's first address
    metric: int = field(default=0, compare=False)

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.to else socket.AF_INET


@dataclass(frozen=True, slots=True)
class _Link:
    index: int
    name: str
    mac: str | None
    up: bool
    mtu: int
    enslaved: bool


def _pick_link(links: Iterable[_Link], mac: str) -> _Link | None:
    """The interface the configuration's MAC names. A VLAN shares its parent's MAC and
    a bridge or bond takes a port's: the addresses belong on the master (ports are
    enslaved), and on the parent, created before its VLANs (the lowest index)."""
    found = [link for link in links if link.mac == mac and not link.enslaved]
    return min(found, key=lambda link: link.index) if found else None


def _wanted_addresses(config: MachineConfig, link: int, tunnel: int | None) -> set[_Address]:
    """The configuration's addresses on its interfaces: `deprecated` beside the domain
    address (on the tunnel when there is one, else on the link)."""
    wanted = {_Address(link, a) for a in config.addresses}
    domain = link
    if config.tunnel is not None:
        if tunnel is None:
            raise ApplyError(f"tunnel {config.tunnel.interface}: no interface")
        wanted.add(_Address(tunnel, config.tunnel.address))
        domain = tunnel
    # (the schema refuses an address both in `deprecated` and wanted preferred)
    return wanted | {_Address(domain, a, deprecated=True) for a in config.deprecated}


def _address_changes(wanted: Collection[_Address], present: Iterable[_Address]) -> _AddressChanges:
    """What makes `present` the wanted addresses. The agent's own no longer wanted go
    (anywhere in the namespace: also on a link whose MAC the configuration no longer
    names), after the wanted ones are in place, except those in the way of one; one
    there with other lifetimes is changed, not removed (what is open on it goes on);
    one somebody else put there (a DHCP lease) counts as there, as it is, and stays
    theirs."""
    here = {a: a for a in present}
    stale = sorted(a for a in here if a.owned and a not in wanted)
    change, add = [], []
    for w in sorted(wanted):
        p = here.get(w)
        if p is None:
            add.append(w)
        elif p.owned and (p.deprecated != w.deprecated or p.expires):
            change.append(w)
    # IPv6 knows an interface's address by its IP alone (IPv4 takes one IP with two
    # prefix lengths): the old prefix length goes first.
    taken = {(a.index, _ip(a)) for a in add if _ip(a).version == 6}
    clear = [a for a in stale if (a.index, _ip(a)) in taken]
    delete = [a for a in stale if (a.index, _ip(a)) not in taken]
    return _AddressChanges(clear, add, change, delete)


def _ip(a: _Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_interface(a.cidr).ip


def _route_changes(
    wanted: Sequence[_Route], owned: Collection[_Route]
) -> tuple[list[_Route], list[_Route]]:
    """(to delete, to replace). An owned route to a destination still wanted is not
    deleted: the replace overwrites it (same destination and metric), so changing the
    default gateway leaves no moment without a default route."""
    destinations = {r.to for r in wanted}
    delete = sorted((r for r in owned if r.to not in destinations), key=_route_order)
    replace = [r for r in wanted if r not in owned]
    return delete, replace


def _route_order(r: _Route) -> tuple[str, str, int]:
    return (r.to, r.via or "", r.index)


def _first(cidrs: Iterable[str], version: int) -> str | None:
    """The IP of the first address of this family: what the device's routes leave from."""
    ips = (ipaddress.ip_interface(c).ip for c in cidrs)
    return next((str(ip) for ip in ips if ip.version == version), None)


def _check(config: MachineConfig) -> None:
    """What the schema allows but no pass could converge to, refused before any change."""
    from agents import containers  # (it imports this module)

    containers.check(config)
    seen: set[str] = set()
    for r in config.routes:
        if r.to in seen:  # each replace would overwrite the other, on every pass
            raise ApplyError(f"route {r.to}: more than one route to this destination")
        seen.add(r.to)


def _wanted_routes(config: MachineConfig, link: int, tunnel: int | None) -> list[_Route]:
    """The configuration's routes, each with the source new connections leave from: the
    first address of its family on its device (after a remap the new one, never a
    deprecated one)."""
    routes = []
    for r in config.routes:
        own: Sequence[str]
        if r.dev == "link":
            index, own = link, config.addresses
        elif tunnel is not None and config.tunnel is not None:
            index, own = tunnel, (config.tunnel.address,)
        else:  # (the schema refuses it)
            raise ApplyError(f"route {r.to}: through the tunnel, but there is no tunnel")
        src = _first(own, ipaddress.ip_network(r.to).version)
        routes.append(_Route(r.to, r.via, index, src=src))
    return routes


def _one_line(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 3] + "..."


def _reason(e: BaseException) -> str:
    if isinstance(e, ApplyError):
        return str(e)
    if isinstance(e, NetlinkError):  # args: (errno, message)
        return str(e.args[1]) if len(e.args) > 1 else os.strerror(e.code)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Name the step in the error: `route 10.99.0.0/24 via 10.77.0.1: Network is unreachable`.

    Any exception: pyroute2, the WireGuard driver and the file system fail in their own
    ways, and every failure must end in a rollback and a Nack."""
    try:
        yield
    except ApplyError:
        raise
    except Exception as e:
        raise ApplyError(f"{what}: {_reason(e)}") from e


# ---- reading the kernel ------------------------------------------------------------------


def _read_links(ipr: IPRoute) -> list[_Link]:
    return [
        _Link(
            index=m["index"],
            name=m.get("IFLA_IFNAME"),
            mac=m.get("IFLA_ADDRESS"),
            up=bool(m["flags"] & _IFF_UP),
            mtu=m.get("IFLA_MTU"),
            enslaved=bool(m.get("IFLA_MASTER")),
        )
        for m in ipr.get_links()
    ]


def _by_name(links: Iterable[_Link], name: str) -> _Link | None:
    return next((link for link in links if link.name == name), None)


def _read_addresses(ipr: IPRoute) -> list[_Address]:
    out = []
    for m in ipr.get_addr():
        ip = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
        cidr = str(ipaddress.ip_interface(f"{ip}/{m['prefixlen']}"))
        flags = m.get("IFA_FLAGS") or m["flags"]
        cache = m.get("IFA_CACHEINFO")
        preferred = cache["ifa_preferred"] if cache is not None else FOREVER
        deprecated = bool(flags & _IFA_F_DEPRECATED)
        # (IPv4 shows a permanent address's preferred lifetime as forever and never ages
        # it; IPv6 shows what is left of it)
        expires = not flags & _IFA_F_PERMANENT or (not deprecated and preferred != FOREVER)
        owned = m.get("IFA_PROTO") == AGENT_PROTO
        out.append(_Address(m["index"], cidr, owned, deprecated=deprecated, expires=expires))
    return out


def _read_routes(ipr: IPRoute) -> list[_Route]:
    """The agent's routes in the main table."""
    out = []
    for m in ipr.get_routes(table=MAIN_TABLE):
        if m["proto"] != AGENT_PROTO or m.get("RTA_TABLE") != MAIN_TABLE:
            continue
        dst = m.get("RTA_DST") or ("::" if m["family"] == socket.AF_INET6 else "0.0.0.0")
        to = str(ipaddress.ip_network(f"{dst}/{m['dst_len']}", strict=False))
        via, src = m.get("RTA_GATEWAY"), m.get("RTA_PREFSRC")
        out.append(
            _Route(
                to,
                str(ipaddress.ip_address(via)) if via else None,
                m.get("RTA_OIF") or 0,
                src=str(ipaddress.ip_address(src)) if src else None,
                metric=m.get("RTA_PRIORITY") or 0,
            )
        )
    return out


# ---- the shell -----------------------------------------------------------------------------


def _kind(prefer: str) -> Kind | None:
    if prefer == "auto":
        return None
    if prefer == "kernel":
        return "kernel"
    if prefer == "userspace":
        return "userspace"
    raise ValueError(f"WireGuard backend must be 'auto', 'kernel' or 'userspace', not {prefer!r}")


def _promote_secondaries(name: str) -> None:
    """Removing an interface's primary IPv4 address keeps the other addresses of its
    subnet (and the routes from them), one promoted: when a remap's grace is over the
    old address goes and the new one stays. Left on when the agent's addresses go:
    the VM's network is the agent's, and nothing there relies on it being off."""
    path = _CONF4 / name / "promote_secondaries"
    with _step(f"promote_secondaries on {name}"):
        if path.read_text().strip() != "1":
            path.write_text("1\n")
            log.info("agent: promote_secondaries on %s", name)


def _write_if_changed(path: Path, text: str, *, atomic: bool = True) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    if not atomic:
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Applier:
    root: Path  # wg.key (0600, made if missing) and wireguard/ (userspace backend state)
    set_hostname: bool = False  # also sethostname() and /etc/hostname (not in the lab)
    prefer: str = "auto"  # WireGuard backend: "auto", "kernel" or "userspace"
    bridge: str | None = None  # the containers' bridge (None: agents/containers.py's BRIDGE)
    _wg: Backend | None = field(default=None, init=False, repr=False, compare=False)

    # ---- public API ----------------------------------------------------------------------

    def wg_public_key(self) -> str:
        """The agent's WireGuard public key, base64 (the key file made 0600 if missing).
        KeyFileError (one line, naming the file) if the file is unsafe or not a key."""
        return b64(self._key().public)

    def apply(self, config: MachineConfig, previous: MachineConfig | None) -> None:
        """Make the namespace match `config`; on any failure roll back to `previous`
        (best effort, also when previous is None: remove what this apply added) and raise ApplyError."""
        try:
            self._converge(config, previous)
        except Exception as e:
            reason = _reason(e)
            log.warning("agent: cannot apply %s (%s); rolling back", config.name, reason)
            try:
                self._converge(previous, config)
            except Exception as r:
                reason += f"; rollback failed: {_reason(r)}"
            raise ApplyError(_one_line(reason)) from e

    def observe(self, config: MachineConfig) -> dict[str, Any]:
        """What is in place now, as plain JSON for a status report: the link's addresses
        (anybody's) and which of them are deprecated, the tunnel's the same way (None if
        its interface is missing), the agent's routes with their sources."""
        with IPRoute() as ipr:
            links = _read_links(ipr)
            addresses = _read_addresses(ipr)
            routes = _read_routes(ipr)
        names = {link.index: link.name for link in links}
        link = _pick_link(links, config.mac)
        tunnel = None
        if config.tunnel is not None:
            wg_link = _by_name(links, config.tunnel.interface)
            if wg_link is not None:
                on_wg = [a for a in addresses if a.index == wg_link.index]
                tunnel = {
                    "interface": wg_link.name,
                    "addresses": [a.cidr for a in on_wg],
                    "deprecated": [a.cidr for a in on_wg if a.deprecated],
                    "latest_handshake": self._latest_handshake(config.tunnel),
                }
        on_link = [a for a in addresses if link and a.index == link.index]
        return {
            "interface": link.name if link else None,
            "addresses": [a.cidr for a in on_link],
            "deprecated": [a.cidr for a in on_link if a.deprecated],
            "tunnel": tunnel,
            "routes": [
                {"to": r.to, "via": r.via, "dev": names.get(r.index), "src": r.src} for r in routes
            ],
        }

    # ---- one pass ------------------------------------------------------------------------

    def _converge(self, config: MachineConfig | None, other: MachineConfig | None) -> None:
        """Make the namespace match `config` (None: nothing of the agent's). `other` is
        the configuration that may be in place instead: its tunnel goes unless `config`
        has one of the same name."""
        from agents import containers  # (it imports this module)

        if config is not None:
            _check(config)
        bridge = self.bridge or containers.BRIDGE
        keep = config.tunnel.interface if config and config.tunnel else None
        stale = other.tunnel.interface if other and other.tunnel else None
        with IPRoute() as ipr:
            if stale is not None and stale != keep:
                with _step(f"removing tunnel {stale}"):
                    self._backend().remove(stale)
                    log.info("agent: removed tunnel %s", stale)
            links = _read_links(ipr)
            names = {link.index: link.name for link in links}  # for the error messages
            # The bridge's address is containers.converge's: not stale here.
            theirs = {link.index for link in links if link.name == bridge}
            if config is None:
                self._network(ipr, set(), [], names, theirs)
                containers.converge(None, bridge=bridge)
                return
            link = self._link(ipr, links, config.mac)
            _promote_secondaries(link.name)  # before any address changes
            tunnel_index, new = None, False
            if config.tunnel is not None:
                wg_link, new = self._tunnel_link(ipr, config.tunnel)
                tunnel_index = wg_link.index
                names[wg_link.index] = wg_link.name
                _promote_secondaries(wg_link.name)
            self._network(
                ipr,
                _wanted_addresses(config, link.index, tunnel_index),
                _wanted_routes(config, link.index, tunnel_index),
                names,
                theirs,
            )
            # After the routes: the gateway of the containers' table is on-link by now.
            containers.converge(config, bridge=bridge)
            if config.tunnel is not None:
                # The peer last, once the way to its endpoint is in place: its first
                # handshake then goes out at once, not after a 5 s retry.
                self._tunnel_peer(config.tunnel, new)
        self._hostname(config.hostname)  # last: a failed pass has not renamed the machine

    def _link(self, ipr: IPRoute, links: list[_Link], mac: str) -> _Link:
        link = _pick_link(links, mac)
        if link is None:
            raise ApplyError(f"no interface with MAC {mac}")
        if not link.up:
            with _step(f"link {link.name} up"):
                ipr.link("set", index=link.index, state="up")
        return link

    def _tunnel_link(self, ipr: IPRoute, t: Tunnel) -> tuple[_Link, bool]:
        """The tunnel's interface, its MTU, up; whether it is new (no configuration)."""
        with _step(f"tunnel {t.interface}"):
            new = self._backend().ensure(t.interface)
            link = _by_name(_read_links(ipr), t.interface)
            if link is None:
                raise ApplyError(f"tunnel {t.interface}: the interface vanished")
            if link.mtu != t.mtu:
                ipr.link("set", index=link.index, mtu=t.mtu)
            if not link.up:
                ipr.link("set", index=link.index, state="up")
            if new:
                log.info("agent: tunnel %s is new", t.interface)
            return link, new

    def _tunnel_peer(self, t: Tunnel, new: bool) -> None:
        with _step(f"tunnel {t.interface}"):
            wg, key = self._backend(), self._key()
            # Only when needed: the same key again is harmless, but a pass that
            # changes nothing should write nothing.
            if new or wg.get(t.interface).public_key != key.public:
                wg.configure(t.interface, private_key=key)
            peer = Peer(
                base64.b64decode(t.peer_public_key),
                t.allowed_ips,
                endpoint=t.endpoint,
                persistent_keepalive=t.keepalive or None,
            )
            wg.replace_peers(t.interface, [peer])

    def _network(
        self,
        ipr: IPRoute,
        wanted: set[_Address],
        routes: list[_Route],
        names: dict[int, str],
        theirs: set[int],
    ) -> None:
        """Addresses and routes, make-before-break: the wanted addresses in place, the
        routes leaving from them, and only then the agent's other addresses removed. A
        route then never leaves from an address about to go (IPv4 deletes such a route
        with the address: no moment without a default route, also in a rollback)."""

        def present() -> list[_Address]:
            return [a for a in _read_addresses(ipr) if a.index not in theirs]

        changes = _address_changes(wanted, present())
        self._remove_addresses(ipr, changes.clear, names)
        self._put_addresses(ipr, changes, names)
        self._routes(ipr, routes, names)
        if self._remove_addresses(ipr, changes.delete, names):
            # Removing a primary IPv4 address where promote_secondaries is off (not the
            # link or the tunnel) takes the other addresses of its subnet, and the
            # routes leaving from them: what went comes back (as a rule nothing did).
            self._put_addresses(ipr, _address_changes(wanted, present()), names)
            self._routes(ipr, routes, names)

    def _remove_addresses(self, ipr: IPRoute, gone: list[_Address], names: dict[int, str]) -> bool:
        for a in gone:
            with _step(f"removing address {a.cidr} from {names.get(a.index, a.index)}"):
                iface = ipaddress.ip_interface(a.cidr)
                try:
                    ipr.addr(
                        "del",
                        index=a.index,
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    )
                except NetlinkError as e:
                    # gone already: a primary IPv4 address takes its secondaries with it
                    if e.code != errno.EADDRNOTAVAIL:
                        raise
                log.info("agent: removed address %s", a.cidr)
        return bool(gone)

    def _put_addresses(self, ipr: IPRoute, changes: _AddressChanges, names: dict[int, str]) -> None:
        # The new before the old is deprecated: IPv6 has a preferred address throughout.
        for a in changes.add:
            with _step(f"address {a.cidr} on {names.get(a.index, a.index)}"):
                ipr.addr("add", **self._address_keys(a))
                log.info("agent: added address %s%s", a.cidr, " deprecated" if a.deprecated else "")
        for a in changes.change:
            state = "deprecated" if a.deprecated else "preferred"
            with _step(f"address {a.cidr} on {names.get(a.index, a.index)} {state}"):
                # in place: removed and added again, what is open on it would be cut
                ipr.addr("replace", **self._address_keys(a))
                log.info("agent: address %s %s", a.cidr, state)

    @staticmethod
    def _address_keys(a: _Address) -> dict[str, Any]:
        iface = ipaddress.ip_interface(a.cidr)
        return {
            "index": a.index,
            "address": str(iface.ip),
            "prefixlen": iface.network.prefixlen,
            "proto": AGENT_PROTO,  # also on a replace: the kernel takes it anew
            # usable at once: the controller allocated it, nobody else has it
            "flags": _IFA_F_NODAD if iface.version == 6 else 0,
            # (pyroute2 puts both in IFA_CACHEINFO; the kernel's deprecated is preferred 0)
            "preferred_lft": 0 if a.deprecated else FOREVER,
            "valid_lft": FOREVER,
        }

    def _routes(self, ipr: IPRoute, wanted: list[_Route], names: dict[int, str]) -> None:
        delete, replace = _route_changes(wanted, _read_routes(ipr))
        for r in delete:
            with _step(f"removing route {r.to}"):
                try:
                    ipr.route("del", **self._route_keys(r), priority=r.metric)
                except NetlinkError as e:
                    if e.code != errno.ESRCH:  # gone with its address or interface
                        raise
                log.info("agent: removed route %s", r.to)
        for r in replace:
            where = f"via {r.via}" if r.via else f"dev {names.get(r.index, r.index)}"
            with _step(f"route {r.to} {where}"):
                scope = {} if r.via or r.family == socket.AF_INET6 else {"scope": _SCOPE_LINK}
                src = {"prefsrc": r.src} if r.src else {}
                # replace: a DHCP client's route to the same destination becomes ours, and
                # one of ours with another source changes without a moment gone
                ipr.route("replace", **self._route_keys(r), **scope, **src)
                log.info("agent: route %s %s src %s", r.to, where, r.src)

    @staticmethod
    def _route_keys(r: _Route) -> dict[str, Any]:
        net = ipaddress.ip_network(r.to)
        keys: dict[str, Any] = {
            "family": r.family,
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "table": MAIN_TABLE,
            "proto": AGENT_PROTO,  # also on delete: the kernel then removes only ours
        }
        if r.index:
            keys["oif"] = r.index
        if r.via:
            keys["gateway"] = r.via
        return keys

    def _hostname(self, name: str) -> None:
        with _step("hostname"):
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_if_changed(self.root / "hostname", name + "\n")
            if self.set_hostname:
                if socket.gethostname() != name:
                    socket.sethostname(name)
                # in place: in a container /etc/hostname may be a bind mount
                _write_if_changed(_ETC_HOSTNAME, name + "\n", atomic=False)

    # ---- the WireGuard driver and key ----------------------------------------------------

    def _backend(self) -> Backend:
        if self._wg is None:
            self._wg = detect(self.root / "wireguard", prefer=_kind(self.prefer))
        return self._wg

    def _key(self) -> PrivateKey:
        return load_or_create(self.root / "wg.key")

    def _latest_handshake(self, t: Tunnel) -> int | None:
        try:
            status = self._backend().get(t.interface).peers.get(base64.b64decode(t.peer_public_key))
        except (WireGuardError, ValueError):
            return None
        if status is None or status.last_handshake is None:
            return None
        return int(status.last_handshake)
