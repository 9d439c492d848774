"""Just enough netlink for the kernel backend: messages and attributes as bytes.

Pure encoders and decoders (testable without a kernel), the generic netlink
controller's family lookup, a few rtnetlink link messages (create, look up and
delete an interface of a given kind), and a thin blocking socket that reads
every part of a reply: dumps come in many messages and many datagrams, and
stopping at the first one is how peer lists get silently truncated.

Why not pyroute2 here: its WireGuard class is bound to asyncio-era socket
objects that are thread-affine, and the parsing we need (merging a device
dump) has to be ours anyway. The controller still uses pyroute2 for addresses.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
GENL_HDR = struct.Struct("=BBH")  # cmd, version, reserved
NLA_HDR = struct.Struct("=HH")  # len, type
IFINFO = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16  # not in Python's socket module
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
IFLA_IFNAME = 3
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1


class NetlinkError(Exception):
    """A netlink request failed: errno plus the kernel's extended-ack text if any."""

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message
        text = os.strerror(errno)
        super().__init__(f"{text}: {message}" if message else text)


class MalformedMessage(Exception):
    """Bytes that are not well-formed netlink."""


def _align(n: int) -> int:
    return (n + 3) & ~3


# ---- attributes ----------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    size = NLA_HDR.size + len(payload)
    if size > 0xFFFF:
        raise ValueError(f"netlink attribute {kind} too large ({size} bytes)")
    return NLA_HDR.pack(size, kind) + payload + bytes(_align(size) - size)


def nested(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


def attr_u8(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=B", v))


def attr_u16(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=H", v))


def attr_u32(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=I", v))


def attr_u64(kind: int, v: int) -> bytes:
    return attr(kind, struct.pack("=Q", v))


def attr_str(kind: int, v: str) -> bytes:
    return attr(kind, v.encode() + b"\0")


def iter_attrs(data: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type without flags, payload) for each attribute in `data`."""
    view = memoryview(data)
    off = 0
    end = len(view)
    while off + NLA_HDR.size <= end:
        size, kind = NLA_HDR.unpack_from(view, off)
        if size < NLA_HDR.size or off + size > end:
            raise MalformedMessage(f"attribute at offset {off} has bad length {size}")
        yield kind & NLA_TYPE_MASK, view[off + NLA_HDR.size : off + size]
        off += _align(size)
    if off < end and any(view[off:end]):
        raise MalformedMessage("trailing bytes after the last attribute")


def u16(b: memoryview | bytes) -> int:
    return _unpack("=H", b)


def u32(b: memoryview | bytes) -> int:
    return _unpack("=I", b)


def u64(b: memoryview | bytes) -> int:
    return _unpack("=Q", b)


def u8(b: memoryview | bytes) -> int:
    return _unpack("=B", b)


def _unpack(fmt: str, b: memoryview | bytes) -> int:
    if len(b) != struct.calcsize(fmt):
        raise MalformedMessage(f"attribute of {len(b)} bytes, expected {struct.calcsize(fmt)}")
    return struct.unpack(fmt, b)[0]


def string(b: memoryview | bytes) -> str:
    return bytes(b).split(b"\0", 1)[0].decode(errors="replace")


# ---- messages ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    flags: int
    seq: int
    pid: int
    payload: memoryview


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    size = NLMSG_HDR.size + len(payload)
    return NLMSG_HDR.pack(size, kind, flags, seq, 0) + payload + bytes(_align(size) - size)


def with_seq(data: bytes, seq: int) -> bytes:
    """The same message with another sequence number (builders leave it 0)."""
    return data[:8] + struct.pack("=I", seq) + data[12:]


def genl_message(family: int, cmd: int, version: int, flags: int, seq: int, attrs: bytes) -> bytes:
    return message(family, flags, seq, GENL_HDR.pack(cmd, version, 0) + attrs)


def iter_messages(data: bytes | memoryview) -> Iterator[Message]:
    """Every netlink message in one datagram (a datagram may carry several)."""
    view = memoryview(data)
    off = 0
    while off + NLMSG_HDR.size <= len(view):
        size, kind, flags, seq, pid = NLMSG_HDR.unpack_from(view, off)
        if size < NLMSG_HDR.size or off + size > len(view):
            raise MalformedMessage(f"message at offset {off} has bad length {size}")
        yield Message(kind, flags, seq, pid, view[off + NLMSG_HDR.size : off + size])
        off += _align(size)
    if off < len(view):
        raise MalformedMessage("trailing bytes after the last message")


def genl_attrs(msg: Message) -> memoryview:
    if len(msg.payload) < GENL_HDR.size:
        raise MalformedMessage("generic netlink message without its header")
    return msg.payload[GENL_HDR.size :]


def parse_error(msg: Message) -> NetlinkError | None:
    """None for an ACK (error 0); else the error with the extended-ack message."""
    if len(msg.payload) < 4:
        raise MalformedMessage("truncated netlink error message")
    code = -struct.unpack_from("=i", msg.payload)[0]
    if code == 0:
        return None
    text = ""
    if msg.flags & NLM_F_ACK_TLVS:
        # after the error code: the request's header, and its payload unless capped
        skip = 4 + NLMSG_HDR.size
        if not msg.flags & NLM_F_CAPPED and len(msg.payload) >= skip:
            skip = 4 + _align(struct.unpack_from("=I", msg.payload, 4)[0])
        try:
            for kind, value in iter_attrs(msg.payload[skip:]):
                if kind == NLMSGERR_ATTR_MSG:
                    text = string(value)
        except MalformedMessage:
            pass
    return NetlinkError(code, text)


def done_error(msg: Message) -> NetlinkError | None:
    """NLMSG_DONE carries an int: a negative errno when a dump failed midway."""
    if len(msg.payload) >= 4:
        code = -struct.unpack_from("=i", msg.payload)[0]
        if code > 0:
            return NetlinkError(code)
    return None


# ---- generic netlink controller --------------------------------------------------


def build_get_family(name: str, seq: int) -> bytes:
    return genl_message(
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        1,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        attr_str(CTRL_ATTR_FAMILY_NAME, name),
    )


def parse_family_id(msg: Message) -> int:
    for kind, value in iter_attrs(genl_attrs(msg)):
        if kind == CTRL_ATTR_FAMILY_ID:
            return u16(value)
    raise MalformedMessage("family reply without CTRL_ATTR_FAMILY_ID")


# ---- rtnetlink: links by kind ------------------------------------------------------


def build_new_link(name: str, kind: str, seq: int) -> bytes:
    attrs = attr_str(IFLA_IFNAME, name) + nested(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, kind))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return message(RTM_NEWLINK, flags, seq, IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attrs)


def build_get_link(name: str, seq: int) -> bytes:
    return message(
        RTM_GETLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name),
    )


def build_del_link(index: int, seq: int) -> bytes:
    return message(
        RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    )


def parse_link(msg: Message) -> tuple[int, str, str | None]:
    """(ifindex, name, kind or None) of an RTM_NEWLINK message."""
    if len(msg.payload) < IFINFO.size:
        raise MalformedMessage("truncated ifinfomsg")
    index = IFINFO.unpack_from(msg.payload)[2]
    name, kind = "", None
    for t, value in iter_attrs(msg.payload[IFINFO.size :]):
        if t == IFLA_IFNAME:
            name = string(value)
        elif t == IFLA_LINKINFO:
            for t2, v2 in iter_attrs(value):
                if t2 == IFLA_INFO_KIND:
                    kind = string(v2)
    return index, name, kind


# ---- the socket ------------------------------------------------------------------


class Socket:
    """A blocking netlink socket in the caller's network namespace.

    One per call sequence and thread; requests carry increasing sequence numbers,
    and replies to anything else are dropped.
    """

    RECV = 1 << 18  # dumps fill up to 32 KiB per datagram; room to spare

    def __init__(self, protocol: int, *, timeout: float = 5.0) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol
        )
        try:
            self.sock.settimeout(timeout)
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                with contextlib.suppress(OSError):  # older kernels: errors without text
                    self.sock.setsockopt(SOL_NETLINK, opt, 1)
            self.sock.bind((0, 0))
        except BaseException:
            self.sock.close()
            raise
        self.seq = int.from_bytes(os.urandom(2), "little") << 8
        self._buf = bytearray(self.RECV)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (0, 0))

    def replies(self, seq: int) -> Iterator[Message]:
        """Messages answering `seq`, datagram after datagram, until the caller stops.

        The caller decides when a reply is complete (ACK, error, or NLMSG_DONE)."""
        while True:
            try:
                n, _, flags, _ = self.sock.recvmsg_into([self._buf])
            except TimeoutError:
                raise NetlinkError(errno_mod.ETIMEDOUT, "no netlink reply") from None
            if flags & socket.MSG_TRUNC:
                raise MalformedMessage("netlink datagram larger than the receive buffer")
            for msg in iter_messages(bytes(self._buf[:n])):
                if msg.seq == seq:
                    yield msg

    def request(self, data: bytes, seq: int) -> list[Message]:
        """Send a request made with NLM_F_ACK; its data messages, once ACKed.
        Raises NetlinkError when the kernel answers with an error."""
        self.send(data)
        out: list[Message] = []
        for msg in self.replies(seq):
            if msg.type == NLMSG_ERROR:
                err = parse_error(msg)
                if err is not None:
                    raise err
                return out
            out.append(msg)
        return out  # pragma: no cover - replies() only ends by raising


def resolve_family(name: str, *, timeout: float = 5.0) -> int | None:
    """The generic netlink family id of `name`, or None if the kernel has none.

    Asking may autoload the family's module (request_module), which is also
    what `wg` does: a dom0 with a loadable wireguard module then just works.
    """
    with Socket(NETLINK_GENERIC, timeout=timeout) as s:
        seq = s.next_seq()
        try:
            replies = s.request(build_get_family(name, seq), seq)
        except NetlinkError as e:
            if e.errno == errno_mod.ENOENT:
                return None
            raise
    if not replies:
        raise MalformedMessage("family lookup answered without data")
    return parse_family_id(replies[0])
