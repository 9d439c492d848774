"""The cross-platform WireGuard UAPI (https://www.wireguard.com/xplatform/).

A request is `get=1\\n\\n` or `set=1\\n` + `key=value` lines + a blank line; the
answer is `key=value` lines (for get) ending with `errno=N` and a blank line.
Keys are hex. wireguard-go answers errors with negative errno values.

Pure functions build requests and parse answers of any length; `transact` is the
thin socket part. Every read is bounded: an answer over MAX_RESPONSE bytes or a
line over MAX_LINE bytes is refused rather than buffered without end. Unknown keys
in an answer are ignored (newer daemons add fields); a non-zero errno raises.
Messages never echo values from an answer: a get answer carries the private key.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from common.wireguard.errors import (
    ConfigError,
    DeviceError,
    ProtocolError,
)
from common.wireguard.keys import public_of
from common.wireguard.model import (
    KEY_LEN,
    ZERO_KEY,
    Device,
    Peer,
    PeerStatus,
    Update,
    b64,
)

MAX_RESPONSE = 64 << 20
MAX_LINE = 4096
GET = b"get=1\n\n"
PROBE = b"set=1\n\n"  # an empty set: a cheap "do you answer?" with no effect


def build_set(update: Update) -> bytes:
    """The set request for `update` (removals first, then upserts)."""
    lines = ["set=1"]
    if update.private_key is not None:
        lines.append(f"private_key={update.private_key.hex()}")
    if update.listen_port is not None:
        lines.append(f"listen_port={update.listen_port}")
    if update.fwmark is not None:
        lines.append(f"fwmark={update.fwmark}")
    if update.replace_peers:
        lines.append("replace_peers=true")
    for key in update.remove:
        lines.append(f"public_key={key.hex()}")
        lines.append("remove=true")
    for peer in update.upsert:
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={(peer.preshared_key or ZERO_KEY).hex()}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive or 0}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={ip}" for ip in peer.allowed_ips)
    lines.append("")
    lines.append("")
    return "\n".join(lines).encode("ascii")


class ResponseReader:
    """Accumulates one answer, chunk by chunk, up to its terminating blank line."""

    def __init__(self, max_response: int = MAX_RESPONSE, max_line: int = MAX_LINE) -> None:
        self.max_response = max_response
        self.max_line = max_line
        self._buf = bytearray()
        self._scanned = 0  # everything before this has no "\n\n" and no over-long line
        self._end: int | None = None

    def feed(self, data: bytes) -> bool:
        """Add received bytes; True once the answer is complete."""
        if self._end is not None:
            if data:
                raise ProtocolError("UAPI: data after the end of the answer")
            return True
        self._buf += data
        buf = self._buf
        if len(buf) > self.max_response + 2:
            raise ProtocolError(f"UAPI: answer larger than {self.max_response} bytes")
        if buf[:1] == b"\n":
            raise ProtocolError("UAPI: empty answer")
        end = buf.find(b"\n\n", max(0, self._scanned - 1))
        stop = len(buf) if end < 0 else end + 1
        line_start = buf.rfind(b"\n", 0, self._scanned) + 1
        while line_start < stop:
            nl = buf.find(b"\n", line_start, stop)
            line_end = stop if nl < 0 else nl
            if line_end - line_start > self.max_line:
                raise ProtocolError(
                    f"UAPI: a line of the answer is longer than {self.max_line} bytes"
                )
            if nl < 0:
                break
            line_start = nl + 1
        if end >= 0:
            if len(buf) > end + 2:
                raise ProtocolError("UAPI: data after the end of the answer")
            self._end = end
            return True
        self._scanned = len(buf)
        return False

    def lines(self) -> list[str]:
        if self._end is None:
            raise ProtocolError("UAPI: answer incomplete")
        try:
            return self._buf[: self._end].decode("ascii").split("\n")
        except UnicodeDecodeError:
            raise ProtocolError("UAPI: answer is not ASCII") from None


def split_lines(data: bytes) -> list[str]:
    """A complete answer (as one bytes object) to its lines, with the same checks."""
    reader = ResponseReader()
    if not reader.feed(data):
        raise ProtocolError("UAPI: answer ends without its blank line")
    return reader.lines()


def _int(key: str, value: str, n: int, *, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if not value.isascii() or not value.lstrip("-").isdigit():
        raise ProtocolError(f"UAPI: line {n}: {key} is not a number")
    v = int(value)
    if not lo <= v <= hi:
        raise ProtocolError(f"UAPI: line {n}: {key} out of range")
    return v


def _key(key: str, value: str, n: int) -> bytes:
    if len(value) != 2 * KEY_LEN:
        raise ProtocolError(f"UAPI: line {n}: {key} is not a hex key")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError(f"UAPI: line {n}: {key} is not a hex key") from None


def check_errno(lines: list[str], what: str) -> list[str]:
    """The lines before the final `errno=N`; raises DeviceError when N != 0."""
    if not lines or not lines[-1].startswith("errno="):
        raise ProtocolError(f"UAPI {what}: the answer does not end with errno")
    n = _int("errno", lines[-1][6:], len(lines), lo=-(2**31), hi=2**31 - 1)
    if n:
        code = abs(n)
        raise DeviceError(
            f"{what} refused by wireguard-go: errno {code} ({os.strerror(code)})", code
        )
    return lines[:-1]


class _PeerFields:
    __slots__ = (
        "allowed",
        "endpoint",
        "handshake_ns",
        "handshake_s",
        "keepalive",
        "key",
        "psk",
        "rx",
        "tx",
    )

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.psk: bytes | None = None
        self.endpoint: str | None = None
        self.keepalive = 0
        self.handshake_s = 0
        self.handshake_ns = 0
        self.rx = 0
        self.tx = 0
        self.allowed: list[str] = []

    def status(self) -> PeerStatus:
        try:
            peer = Peer(
                self.key,
                tuple(self.allowed),
                self.endpoint,
                self.keepalive or None,
                self.psk,
            )
        except ConfigError as e:
            raise ProtocolError(f"UAPI: peer {b64(self.key)} reported invalid: {e}") from None
        handshake = self.handshake_s + self.handshake_ns / 1e9 if self.handshake_s else None
        return PeerStatus(peer, handshake, self.rx, self.tx)


def parse_get(name: str, lines: list[str]) -> Device:
    """A get answer (its lines, errno last) to a Device."""
    body = check_errno(lines, f"get {name}")
    public: bytes | None = None
    port: int | None = None
    fwmark: int | None = None
    peers: dict[bytes, PeerStatus] = {}
    cur: _PeerFields | None = None
    for n, line in enumerate(body, 1):
        key, sep, value = line.partition("=")
        if not sep:
            raise ProtocolError(f"UAPI get {name}: line {n} is not key=value")
        if key == "public_key":
            if cur is not None:
                peers[cur.key] = cur.status()
            pk = _key(key, value, n)
            if pk in peers:
                raise ProtocolError(f"UAPI get {name}: peer {b64(pk)} listed twice")
            cur = _PeerFields(pk)
        elif cur is None:
            if key == "private_key":
                secret = _key(key, value, n)
                public = public_of(secret) if secret != ZERO_KEY else None
            elif key == "listen_port":
                port = _int(key, value, n, hi=0xFFFF) or None
            elif key == "fwmark":
                fwmark = _int(key, value, n, hi=0xFFFFFFFF) or None
            # unknown device keys: ignored
        elif key == "preshared_key":
            cur.psk = _key(key, value, n)
        elif key == "endpoint":
            cur.endpoint = value
        elif key == "persistent_keepalive_interval":
            cur.keepalive = _int(key, value, n, hi=0xFFFF)
        elif key == "last_handshake_time_sec":
            cur.handshake_s = _int(key, value, n)
        elif key == "last_handshake_time_nsec":
            cur.handshake_ns = _int(key, value, n)
        elif key == "rx_bytes":
            cur.rx = _int(key, value, n)
        elif key == "tx_bytes":
            cur.tx = _int(key, value, n)
        elif key == "allowed_ip":
            cur.allowed.append(value)
        elif key in ("private_key", "listen_port", "fwmark"):
            raise ProtocolError(f"UAPI get {name}: line {n}: device key {key} inside a peer")
        # unknown peer keys (protocol_version, ...): ignored
    if cur is not None:
        peers[cur.key] = cur.status()
    return Device(name, public, port, fwmark, peers)


def transact(path: str, request: bytes, *, timeout: float) -> list[str]:
    """Send one request on a fresh connection and read its whole answer.

    `timeout` bounds the whole exchange, not each read. Raises FileNotFoundError /
    ConnectionRefusedError when nothing listens (the caller knows what that means).
    """
    deadline = time.monotonic() + timeout
    reader = ResponseReader()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)  # one request per connection
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError(f"UAPI: no complete answer within {timeout:g} s")
            s.settimeout(left)
            try:
                chunk = s.recv(1 << 16)
            except TimeoutError:
                raise ProtocolError(f"UAPI: no complete answer within {timeout:g} s") from None
            if not chunk:
                raise ProtocolError("UAPI: connection closed before the end of the answer")
            if reader.feed(chunk):
                return reader.lines()
