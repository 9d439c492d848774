"""The kernel backend: WireGuard's generic netlink family ("wireguard").

Semantics follow include/uapi/linux/wireguard.h and what wg(8) does:

- GET_DEVICE is a dump. The kernel fills a message, and when the next peer does
  not fit it ends the message and goes on in the next one; when a peer's
  allowed-ips do not fit, the peer is closed with the ones that did, and the next
  message starts with that peer again: its public key plus the remaining
  allowed-ips, nothing else. Device attributes come in the first message only.
  `DumpParser` merges every message up to NLMSG_DONE, peer by public key. If the
  peer list changed during the dump the kernel flags it (NLM_F_DUMP_INTR); the
  dump is then repeated.
- SET_DEVICE is split like wg(8) splits it, at a page (4096 bytes) per message:
  device attributes, and replace-peers, in the first message only; a peer that
  does not fit opens the next message; a peer whose allowed-ips do not fit is
  continued in the next message with its public key and the rest of them, without
  its flags (a second replace-allowed-ips would drop the first part). The kernel
  applies each message as it comes, so a split set is not atomic (neither is wg's).

Message building and parsing are pure (bytes in, bytes out): this machine has no
WireGuard module, so they are tested against synthesized kernel behaviour, and
the socket part is kept thin. Interfaces are created over rtnetlink with kind
"wireguard", like `ip link add NAME type wireguard`.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from common.wireguard import netlink as nl
from common.wireguard.backend import Backend
from common.wireguard.errors import (
    DeviceError,
    DeviceNotFound,
    ProtocolError,
    WireGuardError,
    WireGuardUnavailable,
)
from common.wireguard.model import (
    ZERO_KEY,
    Device,
    Peer,
    PeerStatus,
    Update,
    check_ifname,
    format_endpoint,
    parse_endpoint,
)

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1

WGDEVICE_A_IFINDEX = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PRIVATE_KEY = 3
WGDEVICE_A_PUBLIC_KEY = 4
WGDEVICE_A_FLAGS = 5
WGDEVICE_A_LISTEN_PORT = 6
WGDEVICE_A_FWMARK = 7
WGDEVICE_A_PEERS = 8
WGDEVICE_F_REPLACE_PEERS = 0x1

WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_PRESHARED_KEY = 2
WGPEER_A_FLAGS = 3
WGPEER_A_ENDPOINT = 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES = 7
WGPEER_A_TX_BYTES = 8
WGPEER_A_ALLOWEDIPS = 9
WGPEER_A_PROTOCOL_VERSION = 10
WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4

WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3

SET_LIMIT = 4096  # bytes per SET_DEVICE message: wg(8) uses one page
DUMP_RETRIES = 4

_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, packed apart), port, addr
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # port, flowinfo, addr, scope id
_TIMESPEC = struct.Struct("=qq")


# ---- attribute encoders ------------------------------------------------------------


def encode_endpoint(endpoint: str) -> bytes:
    addr, port = parse_endpoint(endpoint)
    if addr.version == 4:
        return struct.pack("=H", socket.AF_INET) + _SOCKADDR_IN.pack(port, addr.packed)[2:]
    return struct.pack("=H", socket.AF_INET6) + _SOCKADDR_IN6.pack(port, 0, addr.packed, 0)[2:]


def decode_endpoint(data: bytes | memoryview) -> str | None:
    if len(data) < 2:
        raise nl.MalformedMessage("endpoint attribute too short")
    family = nl.u16(data[:2])
    if family == socket.AF_INET and len(data) >= _SOCKADDR_IN.size:
        port, raw = _SOCKADDR_IN.unpack_from(data)
        return format_endpoint(ipaddress.IPv4Address(raw), port)
    if family == socket.AF_INET6 and len(data) >= _SOCKADDR_IN6.size:
        port, _, raw, _ = _SOCKADDR_IN6.unpack_from(data)
        return format_endpoint(ipaddress.IPv6Address(raw), port)
    if family == socket.AF_UNSPEC:
        return None
    raise nl.MalformedMessage(f"endpoint of family {family} and {len(data)} bytes")


def encode_allowed_ip(cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr)
    fam = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return nl.nested(
        0,
        nl.attr_u16(WGALLOWEDIP_A_FAMILY, fam)
        + nl.attr(WGALLOWEDIP_A_IPADDR, net.network_address.packed)
        + nl.attr_u8(WGALLOWEDIP_A_CIDR_MASK, net.prefixlen),
    )


def decode_allowed_ip(data: bytes | memoryview) -> str:
    fam = addr = cidr = None
    for kind, value in nl.iter_attrs(data):
        if kind == WGALLOWEDIP_A_FAMILY:
            fam = nl.u16(value)
        elif kind == WGALLOWEDIP_A_IPADDR:
            addr = bytes(value)
        elif kind == WGALLOWEDIP_A_CIDR_MASK:
            cidr = nl.u8(value)
    if fam == socket.AF_INET and addr is not None and len(addr) == 4 and cidr is not None:
        return f"{ipaddress.IPv4Address(addr)}/{cidr}"
    if fam == socket.AF_INET6 and addr is not None and len(addr) == 16 and cidr is not None:
        return f"{ipaddress.IPv6Address(addr)}/{cidr}"
    raise nl.MalformedMessage("allowed-ip without a valid family, address and mask")


# ---- SET_DEVICE --------------------------------------------------------------------


def build_set_device(
    family: int, name: str, update: Update, *, limit: int = SET_LIMIT
) -> list[bytes]:
    """The SET_DEVICE messages for `update`, each at most `limit` bytes (seq 0)."""
    check_ifname(name)
    ifname = nl.attr_str(WGDEVICE_A_IFNAME, name)
    fixed = nl.NLMSG_HDR.size + nl.GENL_HDR.size + nl.NLA_HDR.size  # + the peers nest
    head = ifname
    if update.private_key is not None:
        head += nl.attr(WGDEVICE_A_PRIVATE_KEY, update.private_key)
    if update.listen_port is not None:
        head += nl.attr_u16(WGDEVICE_A_LISTEN_PORT, update.listen_port)
    if update.fwmark is not None:
        head += nl.attr_u32(WGDEVICE_A_FWMARK, update.fwmark)
    if update.replace_peers:
        head += nl.attr_u32(WGDEVICE_A_FLAGS, WGDEVICE_F_REPLACE_PEERS)
    # 256: room for the largest peer head plus one allowed-ip, so every message progresses
    if limit > 0xFFFF or fixed + len(head) + 256 > limit:
        raise ValueError(
            f"SET_DEVICE limit {limit} must be from {fixed + len(head) + 256} to 65535"
        )

    messages: list[bytes] = []
    attrs = head
    entries: list[bytes] = []
    used = fixed + len(attrs)

    def flush() -> None:
        nonlocal attrs, entries, used
        body = attrs + (nl.nested(WGDEVICE_A_PEERS, b"".join(entries)) if entries else b"")
        messages.append(
            nl.genl_message(
                family, WG_CMD_SET_DEVICE, WG_GENL_VERSION, nl.NLM_F_REQUEST | nl.NLM_F_ACK, 0, body
            )
        )
        attrs, entries, used = ifname, [], fixed + len(ifname)

    for key in update.remove:
        entry = nl.nested(
            0, nl.attr(WGPEER_A_PUBLIC_KEY, key) + nl.attr_u32(WGPEER_A_FLAGS, WGPEER_F_REMOVE_ME)
        )
        if used + len(entry) > limit:
            flush()
        entries.append(entry)
        used += len(entry)

    for peer in update.upsert:
        lead = (
            nl.attr(WGPEER_A_PUBLIC_KEY, peer.public_key)
            + nl.attr_u32(WGPEER_A_FLAGS, WGPEER_F_REPLACE_ALLOWEDIPS)
            + nl.attr(WGPEER_A_PRESHARED_KEY, peer.preshared_key or ZERO_KEY)
            + nl.attr_u16(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, peer.persistent_keepalive or 0)
        )
        if peer.endpoint is not None:
            lead += nl.attr(WGPEER_A_ENDPOINT, encode_endpoint(peer.endpoint))
        ips = [encode_allowed_ip(ip) for ip in peer.allowed_ips]
        i = 0
        while True:
            base = nl.NLA_HDR.size + len(lead) + (nl.NLA_HDR.size if i < len(ips) else 0)
            want = base + (len(ips[i]) if i < len(ips) else 0)
            if used + want > limit:
                flush()  # the limit check above guarantees a fresh message fits `want`
            room = limit - used - base
            start = i
            while i < len(ips) and len(ips[i]) <= room:
                room -= len(ips[i])
                i += 1
            body = lead
            if start < len(ips):
                body += nl.nested(WGPEER_A_ALLOWEDIPS, b"".join(ips[start:i]))
            entry = nl.nested(0, body)
            entries.append(entry)
            used += len(entry)
            if i == len(ips):
                break
            flush()
            lead = nl.attr(WGPEER_A_PUBLIC_KEY, peer.public_key)  # continuation: no flags
    if entries or not messages:
        flush()
    return messages


def build_get_device(family: int, name: str) -> bytes:
    return nl.genl_message(
        family,
        WG_CMD_GET_DEVICE,
        WG_GENL_VERSION,
        nl.NLM_F_REQUEST | nl.NLM_F_DUMP,
        0,
        nl.attr_str(WGDEVICE_A_IFNAME, check_ifname(name)),
    )


# ---- GET_DEVICE dump ---------------------------------------------------------------


class _PeerAcc:
    __slots__ = ("allowed", "endpoint", "handshake", "keepalive", "key", "psk", "rx", "tx")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.psk: bytes | None = None
        self.endpoint: str | None = None
        self.keepalive = 0
        self.handshake: float | None = None
        self.rx = 0
        self.tx = 0
        self.allowed: list[str] = []


class DumpParser:
    """Merges the messages of one GET_DEVICE dump into a Device."""

    def __init__(self, name: str, family: int) -> None:
        self.name = name
        self.family = family
        self.public_key: bytes | None = None
        self.listen_port: int | None = None
        self.fwmark: int | None = None
        self.peers: dict[bytes, _PeerAcc] = {}
        self.interrupted = False
        self.done = False

    def feed(self, msg: nl.Message) -> bool:
        """Take one message; True at the end of the dump. Raises on errors."""
        if self.done:
            raise ProtocolError(f"kernel dump of {self.name}: message after NLMSG_DONE")
        if msg.type == nl.NLMSG_ERROR:
            err = nl.parse_error(msg)
            if err is None:
                return False  # an ACK (when one was asked for): the dump goes on
            raise kernel_error(err, "get", self.name)
        if msg.type == nl.NLMSG_DONE:
            err = nl.done_error(msg)
            if err is not None:
                raise kernel_error(err, "get", self.name)
            self.done = True
            return True
        if msg.type != self.family:
            raise ProtocolError(f"kernel dump of {self.name}: unexpected message type {msg.type}")
        if msg.flags & nl.NLM_F_DUMP_INTR:
            self.interrupted = True
        try:
            for kind, value in nl.iter_attrs(nl.genl_attrs(msg)):
                if kind == WGDEVICE_A_PUBLIC_KEY:
                    self.public_key = _key(value)
                elif kind == WGDEVICE_A_LISTEN_PORT:
                    self.listen_port = nl.u16(value) or None
                elif kind == WGDEVICE_A_FWMARK:
                    self.fwmark = nl.u32(value) or None
                elif kind == WGDEVICE_A_PEERS:
                    for _, entry in nl.iter_attrs(value):
                        self._peer(entry)
                # IFNAME, IFINDEX, PRIVATE_KEY (never kept), unknown: ignored
        except nl.MalformedMessage as e:
            raise ProtocolError(f"kernel dump of {self.name}: {e}") from None
        return False

    def _peer(self, data: memoryview) -> None:
        attrs = list(nl.iter_attrs(data))
        key = next((_key(v) for k, v in attrs if k == WGPEER_A_PUBLIC_KEY), None)
        if key is None:
            raise nl.MalformedMessage("peer without public key")
        acc = self.peers.get(key)
        if acc is None:
            acc = self.peers[key] = _PeerAcc(key)
        for kind, value in attrs:
            if kind == WGPEER_A_PRESHARED_KEY:
                acc.psk = _key(value)
            elif kind == WGPEER_A_ENDPOINT:
                acc.endpoint = decode_endpoint(value)
            elif kind == WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL:
                acc.keepalive = nl.u16(value)
            elif kind == WGPEER_A_LAST_HANDSHAKE_TIME:
                if len(value) != _TIMESPEC.size:
                    raise nl.MalformedMessage("last handshake time is not a timespec")
                sec, nsec = _TIMESPEC.unpack(value)
                acc.handshake = sec + nsec / 1e9 if sec or nsec else None
            elif kind == WGPEER_A_RX_BYTES:
                acc.rx = nl.u64(value)
            elif kind == WGPEER_A_TX_BYTES:
                acc.tx = nl.u64(value)
            elif kind == WGPEER_A_ALLOWEDIPS:
                acc.allowed.extend(decode_allowed_ip(v) for _, v in nl.iter_attrs(value))
            # PUBLIC_KEY (done), PROTOCOL_VERSION, padding (type 0), unknown: ignored

    def device(self) -> Device:
        if not self.done:
            raise ProtocolError(f"kernel dump of {self.name} ended before NLMSG_DONE")
        peers = {}
        for key, acc in self.peers.items():
            try:
                peer = Peer(key, tuple(acc.allowed), acc.endpoint, acc.keepalive or None, acc.psk)
            except ValueError as e:
                raise ProtocolError(f"kernel dump of {self.name}: {e}") from None
            peers[key] = PeerStatus(peer, acc.handshake, acc.rx, acc.tx)
        return Device(self.name, self.public_key, self.listen_port, self.fwmark, peers)


def _key(value: memoryview | bytes) -> bytes:
    if len(value) != 32:
        raise nl.MalformedMessage(f"key attribute of {len(value)} bytes")
    return bytes(value)


def parse_get_device(name: str, family: int, datagrams: list[bytes]) -> Device:
    """A whole dump (as received: datagrams of one or more messages) to a Device."""
    parser = DumpParser(name, family)
    for data in datagrams:
        for msg in nl.iter_messages(data):
            if parser.feed(msg):
                return parser.device()
    raise ProtocolError(f"kernel dump of {name} ended before NLMSG_DONE")


def kernel_error(err: nl.NetlinkError, op: str, name: str) -> WireGuardError:
    if err.errno == errno.ENODEV:
        return DeviceNotFound(f"no WireGuard device {name}")
    if err.errno == errno.EOPNOTSUPP and op == "get":
        return DeviceError(f"{name} is not a WireGuard interface", err.errno)
    return DeviceError(f"kernel refused {op} on {name}: {err}", err.errno)


# ---- the backend ---------------------------------------------------------------------


def available() -> bool:
    try:
        return nl.resolve_family(WG_GENL_NAME) is not None
    except (OSError, nl.NetlinkError, nl.MalformedMessage):
        return False


class KernelWireGuard(Backend):
    """WireGuard devices of the kernel module, in the caller's network namespace."""

    kind = "kernel"

    def __init__(self, *, timeout: float = 5.0, set_limit: int = SET_LIMIT) -> None:
        self.timeout = timeout
        self.set_limit = set_limit
        self._family: int | None = None

    def family(self) -> int:
        if self._family is None:
            fam = nl.resolve_family(WG_GENL_NAME, timeout=self.timeout)
            if fam is None:
                raise WireGuardUnavailable(
                    "this kernel has no WireGuard (no 'wireguard' genetlink family)"
                )
            self._family = fam
        return self._family

    def _link(self, name: str) -> tuple[int, str | None] | None:
        with nl.Socket(nl.NETLINK_ROUTE, timeout=self.timeout) as s:
            seq = s.next_seq()
            try:
                msgs = s.request(nl.with_seq(nl.build_get_link(name, 0), seq), seq)
            except nl.NetlinkError as e:
                if e.errno == errno.ENODEV:
                    return None
                raise DeviceError(f"cannot look up interface {name}: {e}", e.errno) from None
        if not msgs:
            raise ProtocolError(f"link lookup of {name} answered without data")
        index, _, kind = nl.parse_link(msgs[0])
        return index, kind

    def ensure(self, name: str) -> bool:
        check_ifname(name)
        link = self._link(name)
        created = False
        if link is None:
            with nl.Socket(nl.NETLINK_ROUTE, timeout=self.timeout) as s:
                seq = s.next_seq()
                try:
                    s.request(nl.with_seq(nl.build_new_link(name, "wireguard", 0), seq), seq)
                    created = True
                except nl.NetlinkError as e:
                    if e.errno == errno.EOPNOTSUPP:
                        raise WireGuardUnavailable(
                            f"cannot create {name}: this kernel has no WireGuard link type ({e})"
                        ) from None
                    if e.errno != errno.EEXIST:
                        raise DeviceError(f"cannot create {name}: {e}", e.errno) from None
            link = self._link(name)
        if link is None or link[1] != "wireguard":
            what = f"a {link[1]} device" if link and link[1] else "a device without a kind"
            raise WireGuardError(
                f"interface {name} exists but is {what}, not WireGuard; not touching it"
            )
        self._apply(name, Update())  # an empty set: proves the device answers
        return created

    def remove(self, name: str) -> None:
        check_ifname(name)
        link = self._link(name)
        if link is None:
            return
        if link[1] != "wireguard":
            raise WireGuardError(f"interface {name} is not WireGuard ({link[1]}); not removing it")
        with nl.Socket(nl.NETLINK_ROUTE, timeout=self.timeout) as s:
            seq = s.next_seq()
            try:
                s.request(nl.with_seq(nl.build_del_link(link[0], 0), seq), seq)
            except nl.NetlinkError as e:
                if e.errno != errno.ENODEV:
                    raise DeviceError(f"cannot delete {name}: {e}", e.errno) from None

    def get(self, name: str) -> Device:
        check_ifname(name)
        family = self.family()
        request = build_get_device(family, name)
        for _ in range(DUMP_RETRIES):
            parser = DumpParser(name, family)
            with nl.Socket(nl.NETLINK_GENERIC, timeout=self.timeout) as s:
                seq = s.next_seq()
                s.send(nl.with_seq(request, seq))
                try:
                    for msg in s.replies(seq):
                        if parser.feed(msg):
                            break
                except nl.MalformedMessage as e:
                    raise ProtocolError(f"kernel dump of {name}: {e}") from None
            if not parser.interrupted:
                return parser.device()
        raise WireGuardError(f"{name}: its peers changed during {DUMP_RETRIES} dumps in a row")

    def _apply(self, name: str, update: Update) -> None:
        family = self.family()
        with nl.Socket(nl.NETLINK_GENERIC, timeout=self.timeout) as s:
            for message in build_set_device(family, name, update, limit=self.set_limit):
                seq = s.next_seq()
                try:
                    s.request(nl.with_seq(message, seq), seq)
                except nl.NetlinkError as e:
                    raise kernel_error(e, "set", name) from None
