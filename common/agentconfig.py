"""A machine's whole configuration, as the controller pushes it to the agent
in a Config message (common/wire.py) and the agent keeps it on disk.

wire.py checks a Config only as bounded JSON; this module is the schema of
its `config` object, checked strictly on both sides: the controller builds it
with `to_wire(MachineConfig(...))`, which runs the same checks the agent's
`parse` does, so a configuration the agent would refuse is never sent. An
error names the field (`config.tunnel.endpoint: ...`) and what is expected.
Standard library only, like wire.py.

What an agent applies, and owns from then on (agents/apply.py):
- `addresses` on the interface whose MAC is `mac` (the one the controller
  sees on its bridge port): the domain address and /64 of a bridge domain,
  or the underlay address of a hub machine;
- `deprecated`: addresses the machine held before a remap, kept through its
  grace beside the new one on the interface that holds the domain address
  (the tunnel's when there is one, else the link), deprecated: connections
  already open on them go on, new ones leave from the new address (every
  route the agent installs names its device's first address as its source);
  when the grace is over they leave the configuration and the agent removes
  them;
- `tunnel`: a hub machine's WireGuard interface to dom0's hub (its private
  key is the agent's own, never in the config), the domain address on it;
- `routes`, through the link or through the tunnel;
- `hostname`;
- `dns`: dom0's DNS-over-TLS address, which the agent's stub resolver
  forwards the VM's queries to (agents/dns.py);
- `containers`: the prefix dom0 delegates to this machine's containers
  (agents/containers.py): the agent's container bridge takes its first
  address, each container one of the rest, and what they send is routed
  the way the machine's own traffic goes (through dom0, never on-link).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

SCHEMA: Final = 1  # the config's own version ("schema"); wire.Config.version is the push's
MAX_ADDRESSES: Final = 16
MAX_ROUTES: Final = 64
MAX_ALLOWED: Final = 16
MIN_CONTAINERS: Final = 16  # prefix lengths of a delegated containers prefix
MAX_CONTAINERS: Final = 30  # (a /30: the bridge's address and one container)

Dev: TypeAlias = Literal["link", "tunnel"]

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
_HOSTNAME = re.compile(_LABEL)
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class ConfigError(ValueError):
    """One line: the field and what is expected."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _need(path: str, ok: bool, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {_show(value)}, expected {expected}")


def _cidr(path: str, value: object, *, host: bool = True) -> str:
    """An interface address (host bits allowed) or, with host=False, a network."""
    _need(path, isinstance(value, str) and len(value) <= 64, value, "an address/prefix string")
    assert isinstance(value, str)
    try:
        if host:
            parsed = str(ipaddress.ip_interface(value))
        else:
            parsed = str(ipaddress.ip_network(value, strict=True))
    except ValueError:
        what = "an address with its prefix length" if host else "a network (no host bits)"
        raise ConfigError(f"{path}: {_show(value)}, expected {what}") from None
    _need(path, "/" in value and parsed == value, value, "the canonical address/prefix form")
    return value


def _address(path: str, value: object) -> str:
    _need(path, isinstance(value, str) and len(value) <= 45, value, "an IP address")
    assert isinstance(value, str)
    try:
        if str(ipaddress.ip_address(value)) == value:
            return value
    except ValueError:
        pass
    raise ConfigError(f"{path}: {_show(value)}, expected an IP address in canonical form")


def _wg_key(path: str, value: object) -> str:
    raw = b""
    if isinstance(value, str) and len(value) == 44:
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raw = b""
    ok = len(raw) == 32 and base64.b64encode(raw).decode() == value and raw != bytes(32)
    _need(path, ok, value, "a WireGuard public key (44 characters of base64)")
    return str(value)


def _integer(path: str, value: object, lo: int, hi: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    _need(path, ok, value, f"an integer from {lo} to {hi}")
    assert isinstance(value, int)
    return value


def _list(path: str, value: object, limit: int) -> list[Any]:
    ok = isinstance(value, list) and len(value) <= limit
    _need(path, ok, value if not isinstance(value, list) else f"{len(value)} items",
          f"a list of at most {limit}")  # fmt: skip
    assert isinstance(value, list)
    return value


def _object(path: str, value: object, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {_show(value)}, expected an object")
    for k in value:
        if k not in keys:
            raise ConfigError(f"{path}: unknown key {_show(k)}, expected only {', '.join(keys)}")
    for k in keys:
        if k not in value:
            raise ConfigError(f"{path}: missing key {k!r}")
    return value


@dataclass(frozen=True, slots=True)
class Route:
    to: str  # a network: 0.0.0.0/0 for the default route
    via: str | None  # a gateway on the link; None: directly on the device
    dev: Dev = "link"

    def __post_init__(self) -> None:
        _cidr("route.to", self.to, host=False)
        if self.via is not None:
            _address("route.via", self.via)
            same = ipaddress.ip_address(self.via).version == ipaddress.ip_network(self.to).version
            _need("route.via", same, self.via, f"an address of the same family as {self.to}")
        _need("route.dev", self.dev in ("link", "tunnel"), self.dev, '"link" or "tunnel"')
        _need("route.via", not (self.dev == "tunnel" and self.via), self.via,
              "null for a route through the tunnel")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A hub machine's WireGuard interface; its private key is the agent's."""

    interface: str
    address: str  # the machine's domain address, e.g. 10.10.0.5/32
    peer_public_key: str  # dom0's hub
    endpoint: str  # dom0's hub on the bridge, ADDRESS:PORT
    allowed_ips: tuple[str, ...]
    mtu: int
    keepalive: int  # seconds, 0: none

    def __post_init__(self) -> None:
        _need("tunnel.interface", isinstance(self.interface, str)
              and bool(_IFNAME.fullmatch(self.interface)), self.interface,
              "an interface name of 1 to 15 characters")  # fmt: skip
        _cidr("tunnel.address", self.address)
        _wg_key("tunnel.peer_public_key", self.peer_public_key)
        host, sep, port = str(self.endpoint).rpartition(":")
        _need("tunnel.endpoint", isinstance(self.endpoint, str) and bool(sep) and port.isdigit(),
              self.endpoint, "ADDRESS:PORT")  # fmt: skip
        _address("tunnel.endpoint", host.strip("[]"))
        _integer("tunnel.endpoint", int(port), 1, 65535)
        for i, a in enumerate(_list("tunnel.allowed_ips", list(self.allowed_ips), MAX_ALLOWED)):
            _cidr(f"tunnel.allowed_ips[{i}]", a, host=False)
        _integer("tunnel.mtu", self.mtu, 1280, 9000)
        _integer("tunnel.keepalive", self.keepalive, 0, 3600)


@dataclass(frozen=True, slots=True)
class MachineConfig:
    name: str  # the machine's fqdn (web1.x.internal)
    hostname: str
    mac: str  # the interface the addresses and link routes go on
    addresses: tuple[str, ...]
    routes: tuple[Route, ...] = ()
    tunnel: Tunnel | None = None
    containers: str | None = None  # the delegated IPv4 prefix, e.g. 10.30.0.16/28
    # dom0's DNS over TLS (port 853) for this machine: its resolver (agents/dns.py)
    dns: str | None = None
    # addresses kept through a remap's grace, deprecated (on the tunnel if any, else the link)
    deprecated: tuple[str, ...] = ()
    schema: int = field(default=SCHEMA)

    def __post_init__(self) -> None:
        _need("config.schema", self.schema == SCHEMA, self.schema, f"{SCHEMA}")
        _need("config.name", isinstance(self.name, str) and bool(_NAME.fullmatch(self.name)),
              self.name, "a machine name (DNS labels)")  # fmt: skip
        _need("config.hostname", isinstance(self.hostname, str)
              and bool(_HOSTNAME.fullmatch(self.hostname)), self.hostname,
              "one DNS label")  # fmt: skip
        _need("config.mac", isinstance(self.mac, str) and bool(_MAC.fullmatch(self.mac)),
              self.mac, "a MAC address in lower case with colons")  # fmt: skip
        for i, a in enumerate(_list("config.addresses", list(self.addresses), MAX_ADDRESSES)):
            _cidr(f"config.addresses[{i}]", a)
        _list("config.routes", list(self.routes), MAX_ROUTES)
        if any(r.dev == "tunnel" for r in self.routes) and self.tunnel is None:
            raise ConfigError("config.routes: a route through the tunnel, but no tunnel")
        if self.containers is not None:
            _cidr("config.containers", self.containers, host=False)
            net = ipaddress.ip_network(self.containers)
            _need("config.containers", net.version == 4 and MIN_CONTAINERS <= net.prefixlen
                  <= MAX_CONTAINERS, self.containers,
                  f"an IPv4 network of /{MIN_CONTAINERS} to /{MAX_CONTAINERS}")  # fmt: skip
        if self.dns is not None:
            _address("config.dns", self.dns)
        # By IP, not CIDR: one address cannot be both preferred and deprecated, and the
        # kernel knows an IPv6 address by its IP alone.
        taken = {ipaddress.ip_interface(a).ip: "not in config.addresses" for a in self.addresses}
        if self.tunnel is not None:
            tunnel_ip = ipaddress.ip_interface(self.tunnel.address).ip
            taken[tunnel_ip] = "other than config.tunnel.address"
        for i, a in enumerate(_list("config.deprecated", list(self.deprecated), MAX_ADDRESSES)):
            path = f"config.deprecated[{i}]"
            _cidr(path, a)
            ip = ipaddress.ip_interface(a).ip
            _need(path, ip not in taken, a, f"an address {taken.get(ip)}")
            taken[ip] = "not earlier in config.deprecated"


def to_wire(config: MachineConfig) -> dict[str, Any]:
    """The JSON object of a Config message (checked again on the way)."""
    obj = {
        "schema": config.schema,
        "name": config.name,
        "hostname": config.hostname,
        "mac": config.mac,
        "addresses": list(config.addresses),
        "routes": [{"to": r.to, "via": r.via, "dev": r.dev} for r in config.routes],
        "tunnel": None
        if config.tunnel is None
        else {
            "interface": config.tunnel.interface,
            "address": config.tunnel.address,
            "peer_public_key": config.tunnel.peer_public_key,
            "endpoint": config.tunnel.endpoint,
            "allowed_ips": list(config.tunnel.allowed_ips),
            "mtu": config.tunnel.mtu,
            "keepalive": config.tunnel.keepalive,
        },
        "containers": config.containers,
        "dns": config.dns,
        "deprecated": list(config.deprecated),
    }
    parse(obj)  # what the agent will check, checked here first
    return obj


_CONFIG_KEYS = ("schema", "name", "hostname", "mac", "addresses", "routes", "tunnel",
                "containers", "dns", "deprecated")  # fmt: skip
# Absent in a last-known-good kept before dom0 served DNS, or remapped: None, or [].
_OPTIONAL_KEYS: Final[dict[str, Any]] = {"dns": None, "deprecated": []}
_ROUTE_KEYS = ("to", "via", "dev")
_TUNNEL_KEYS = ("interface", "address", "peer_public_key", "endpoint", "allowed_ips", "mtu",
                "keepalive")  # fmt: skip


def parse(obj: object) -> MachineConfig:
    """The configuration in a Config message's object, or ConfigError."""
    if isinstance(obj, dict):
        obj = {**_OPTIONAL_KEYS, **obj}
    o = _object("config", obj, _CONFIG_KEYS)
    _integer("config.schema", o["schema"], SCHEMA, SCHEMA)
    routes = []
    for i, r in enumerate(_list("config.routes", o["routes"], MAX_ROUTES)):
        ro = _object(f"config.routes[{i}]", r, _ROUTE_KEYS)
        try:
            routes.append(Route(ro["to"], ro["via"], ro["dev"]))
        except ConfigError as e:
            raise ConfigError(f"config.routes[{i}].{str(e).removeprefix('route.')}") from None
    tunnel = None
    if o["tunnel"] is not None:
        t = _object("config.tunnel", o["tunnel"], _TUNNEL_KEYS)
        allowed = _list("config.tunnel.allowed_ips", t["allowed_ips"], MAX_ALLOWED)
        try:
            tunnel = Tunnel(t["interface"], t["address"], t["peer_public_key"], t["endpoint"],
                            tuple(allowed), t["mtu"], t["keepalive"])  # fmt: skip
        except ConfigError as e:
            raise ConfigError(f"config.{e}") from None
        except (TypeError, ValueError) as e:  # (an endpoint's port that int() refuses)
            raise ConfigError(f"config.tunnel: {e}") from None
    addresses = _list("config.addresses", o["addresses"], MAX_ADDRESSES)
    deprecated = _list("config.deprecated", o["deprecated"], MAX_ADDRESSES)
    return MachineConfig(
        name=o["name"],
        hostname=o["hostname"],
        mac=o["mac"],
        addresses=tuple(addresses),
        routes=tuple(routes),
        tunnel=tunnel,
        containers=o["containers"],
        dns=o["dns"],
        deprecated=tuple(deprecated),
        schema=o["schema"],
    )
