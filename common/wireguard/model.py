"""Plain data of the WireGuard driver: peers, devices, updates, and their validation.

Values are normalised on construction so that what the controller asks for and
what a device reports compare equal when they mean the same thing: allowed-ips
are canonical networks, sorted and deduplicated (devices report them in their
own order); endpoints are canonical `ip:port` / `[ip6]:port`; "off" values (no
keepalive, no preshared key, fwmark 0, port 0) are None. Both backends build and
parse these same objects, so they validate and fail the same way.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from common.wireguard.errors import ConfigError

KEY_LEN = 32
ZERO_KEY = bytes(KEY_LEN)

# Stricter than the kernel (which takes almost any byte): the name also becomes part
# of file and socket paths, so no '/', no whitespace, nothing a shell would expand.
_IFNAME = re.compile(r"[A-Za-z0-9_.+-]{1,15}")


def b64(key: bytes) -> str:
    """A public key as `wg show` prints it. Never call this on a secret."""
    return base64.b64encode(key).decode("ascii")


def check_ifname(name: object) -> str:
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"invalid interface name {name!r}: 1 to 15 characters from A-Z a-z 0-9 _ . + -"
        )
    return name


def check_key(key: object, what: str, *, secret: bool) -> bytes:
    """32 raw bytes. The message names the field and the length, never the content."""
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise ConfigError(f"{what} must be {KEY_LEN} raw bytes, got {got}")
    if not secret and key == ZERO_KEY:
        raise ConfigError(f"{what} is all zeros")
    return key


def check_port(port: object, what: str = "listen_port") -> int | None:
    if port is None:
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ConfigError(f"{what} must be an integer from 0 to 65535 or None, got {port!r}")
    return port or None


def check_fwmark(mark: object) -> int | None:
    if mark is None:
        return None
    if isinstance(mark, bool) or not isinstance(mark, int) or not 0 <= mark <= 0xFFFFFFFF:
        raise ConfigError(f"fwmark must be an integer from 0 to 2**32-1 or None, got {mark!r}")
    return mark or None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allowed_ip(value: object) -> Network:
    """One allowed-ip: a v4 or v6 network in CIDR notation, host bits clear.

    Host bits are an error rather than silently masked (as `wg` does): the
    caller computed a wrong network, and a masked one would never compare equal
    to what it asked for.
    """
    if not isinstance(value, str) or "%" in value or value != value.strip():
        raise ConfigError(f"allowed-ip {value!r} is not an IPv4 or IPv6 network in CIDR notation")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ConfigError(
                f"allowed-ip {value!r} is not an IPv4 or IPv6 network in CIDR notation"
            ) from None
        raise ConfigError(f"allowed-ip {value!r} has host bits set (network: {loose})") from None


def _network_order(net: Network) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def normalize_allowed_ips(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str | bytes):
        raise ConfigError("allowed_ips must be a sequence of CIDR strings, not a single string")
    nets = {parse_allowed_ip(v) for v in values}
    return tuple(str(n) for n in sorted(nets, key=_network_order))


def parse_endpoint(value: object) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """`198.51.100.1:51820` or `[2001:db8::1]:51820`: an address, not a host name.

    Both the kernel and wireguard-go take addresses only; resolving a name is the
    caller's decision (and its timing), not something to hide in a driver call.
    """
    bad = ConfigError(
        f"endpoint {value!r} must be 'IPv4:port' or '[IPv6]:port' "
        "(e.g. '198.51.100.1:51820', '[2001:db8::1]:51820'); resolve host names first"
    )
    if not isinstance(value, str):
        raise bad
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep or "%" in host:
            raise bad
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port = value.rpartition(":")
        try:
            addr = ipaddress.IPv4Address(host)
        except ValueError:
            raise bad from None
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) <= 0xFFFF:
        raise bad
    return addr, int(port)


def format_endpoint(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def normalize_endpoint(value: object) -> str:
    return format_endpoint(*parse_endpoint(value))


@dataclass(frozen=True, slots=True, repr=False)
class Peer:
    """One peer as configured (and, inside PeerStatus, as a device reports it).

    `endpoint=None` means "not set by us": hub peers (VMs) are learned from their
    first handshake, and neither backend can unset an endpoint anyway.
    `persistent_keepalive` and `preshared_key` are absolute: None turns them off.
    """

    public_key: bytes
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    preshared_key: bytes | None = field(default=None)

    def __post_init__(self) -> None:
        check_key(self.public_key, "peer public_key", secret=False)
        object.__setattr__(self, "allowed_ips", normalize_allowed_ips(self.allowed_ips))
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", normalize_endpoint(self.endpoint))
        object.__setattr__(
            self,
            "persistent_keepalive",
            check_port(self.persistent_keepalive, "persistent_keepalive"),
        )
        if self.preshared_key is not None:
            check_key(self.preshared_key, "preshared_key", secret=True)
            if self.preshared_key == ZERO_KEY:  # what both devices report for "none"
                object.__setattr__(self, "preshared_key", None)

    def __repr__(self) -> str:
        psk = "<set>" if self.preshared_key is not None else None
        return (
            f"Peer({b64(self.public_key)}, allowed_ips={self.allowed_ips!r}, "
            f"endpoint={self.endpoint!r}, persistent_keepalive={self.persistent_keepalive!r}, "
            f"preshared_key={psk})"
        )


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A peer as the device reports it, with its counters."""

    peer: Peer
    last_handshake: float | None = None  # unix time; None: never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True, slots=True, repr=False)
class Device:
    """A whole device as read back: never holds the private key.

    `peers` is keyed by public key, complete however many peers there are.
    Treat it as read-only.
    """

    name: str
    public_key: bytes | None
    listen_port: int | None
    fwmark: int | None
    peers: Mapping[bytes, PeerStatus]

    def __repr__(self) -> str:
        key = b64(self.public_key) if self.public_key else None
        return (
            f"Device({self.name!r}, public_key={key}, listen_port={self.listen_port}, "
            f"fwmark={self.fwmark}, peers={len(self.peers)})"
        )


@dataclass(frozen=True, slots=True)
class Update:
    """One change to send to a device, backend-neutral (both encoders take it).

    Built only by `make_update`, which validates it. Removals are applied before
    upserts. An upserted peer ends up exactly as given: its allowed-ips replaced,
    keepalive and preshared key set (to off when None), its endpoint set when given.
    """

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None  # None: leave as is (0 would pick a new random port)
    fwmark: int | None = None  # None: leave as is; 0 is sent as a real value ("off")
    replace_peers: bool = False
    remove: tuple[bytes, ...] = ()
    upsert: tuple[Peer, ...] = ()

    def empty(self) -> bool:
        return (
            self.private_key is None
            and self.listen_port is None
            and self.fwmark is None
            and not self.replace_peers
            and not self.remove
            and not self.upsert
        )


def make_update(
    *,
    private_key: bytes | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
    replace_peers: bool = False,
    upsert: Sequence[Peer] = (),
    remove: Sequence[bytes] = (),
) -> Update:
    if private_key is not None:
        check_key(private_key, "private_key", secret=True)
    listen_port = check_port(listen_port)  # 0 ("any port") is None: leave the port as is
    if fwmark is not None:
        check_fwmark(fwmark)  # 0 stays 0: sent, it turns the mark off
    if isinstance(upsert, Peer) or isinstance(remove, bytes):
        raise ConfigError("upsert and remove take sequences (of Peer, of public keys)")
    seen: dict[bytes, Peer] = {}
    owner: dict[str, bytes] = {}
    for peer in upsert:
        if not isinstance(peer, Peer):
            raise ConfigError(f"upsert takes Peer objects, got {type(peer).__name__}")
        if peer.public_key in seen:
            raise ConfigError(f"peer {b64(peer.public_key)} is given twice")
        seen[peer.public_key] = peer
        for ip in peer.allowed_ips:
            if ip in owner:
                # A device would silently move it to the later peer: surely a bug upstream.
                raise ConfigError(
                    f"allowed-ip {ip} is given to two peers: {b64(owner[ip])} and {b64(peer.public_key)}"
                )
            owner[ip] = peer.public_key
    removed: list[bytes] = []
    for key in remove:
        check_key(key, "public key to remove", secret=False)
        if key in seen:
            raise ConfigError(f"peer {b64(key)} is both upserted and removed")
        if key not in removed:
            removed.append(key)
    return Update(
        private_key=private_key,
        listen_port=listen_port,
        fwmark=fwmark,
        replace_peers=replace_peers,
        remove=tuple(removed),
        upsert=tuple(upsert),
    )


def needs_update(desired: Peer, observed: Peer) -> bool:
    """Whether upserting `desired` would change the device. A desired endpoint of
    None accepts whatever endpoint the device learned from the peer's traffic."""
    return (
        desired.allowed_ips != observed.allowed_ips
        or desired.persistent_keepalive != observed.persistent_keepalive
        or desired.preshared_key != observed.preshared_key
        or (desired.endpoint is not None and desired.endpoint != observed.endpoint)
    )


def diff_peers(
    desired: Iterable[Peer], observed: Mapping[bytes, PeerStatus]
) -> tuple[list[Peer], list[bytes]]:
    """(peers to upsert, public keys to remove) that turn `observed` into `desired`,
    leaving peers that are already right alone (their sessions keep running)."""
    want = {p.public_key: p for p in desired}
    upsert = [p for k, p in want.items() if k not in observed or needs_update(p, observed[k].peer)]
    remove = [k for k in observed if k not in want]
    return upsert, remove
