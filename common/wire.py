"""The one wire protocol between the controller and an in-VM agent, sans-IO.

Bytes in (`Connection.receive_data`), events out (`Connection.next_event`), bytes
to send (`Connection.send`); no sockets, no trio, no TLS here, so that the
controller's listener and the agent drive the same code and a test can run both
peers over a fake link. Standard library only: the agent imports this without
any of the controller's dependencies.

A frame is a 4-byte big-endian length (1 to MAX_FRAME) and that many bytes of
UTF-8 JSON, one object with a "type". Every message is validated in full (types,
bounds, no unknown or missing key) before it becomes an event, and a message this
module would not accept is never sent either: both directions run the same
checks. docs/protocol.md describes the protocol for a reader of the wire.

The rules of the state machine (all of them live in `Connection._apply`, which
both `send` and `next_event` go through, so that each side checks its own
messages exactly as the peer will):

Rule 1: each side's first message is Hello (or Error), once, with this side's
        PROTOCOL_VERSION and the sender's own role.
Rule 2: every other message waits for both Hellos: a side sends nothing else
        until it has sent its Hello and received the peer's.
Rule 3: each message has one sender role (SENDS); Hello, Heartbeat and Error
        have two.
Rule 4: Enroll and Renew are requests, one outstanding at a time; Enrolled
        answers the outstanding one and is sent at no other time.
Rule 5: Config versions strictly increase on a connection; Ack and Nack name a
        Config of this connection that is not yet answered, and answering a
        version also answers every older one (the agent may skip a superseded
        config).
Rule 6: after Error (sent or received) or the peer's EOF the connection is
        closed: nothing more is sent or delivered.
Rule 7: any violation, by either side, is a ProtocolError, kept in
        `Connection.error`: every later call raises it again. The caller sends
        `error_frame()` and closes; nothing of the bad frame was delivered.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import json
import math
import re
from collections import deque
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Literal, TypeAlias

PROTOCOL_VERSION: Final = 1
MAX_FRAME: Final = 1 << 20  # bytes of one frame's JSON; a VM's whole config is well under it
HEADER: Final = 4  # bytes of the big-endian length before each frame
MAX_DEPTH: Final = 32  # nesting of a config or a status report (the object itself is level 1)
MAX_TEXT: Final = 1000  # characters of a Nack's error or an Error's reason
MAX_PEM: Final = 16384  # characters of a CSR or a certificate
MAX_CHAIN: Final = 65536  # characters of a certificate chain
MAX_UNANSWERED: Final = 256  # configs of one connection remembered for Ack and Nack
U63: Final = 2**63 - 1

Role: TypeAlias = Literal["agent", "controller"]
ROLES: Final[tuple[Role, Role]] = ("agent", "controller")


class ProtocolError(Exception):
    """What is wrong with a frame or a message, in one line; the connection must close."""


class State(enum.Enum):
    BEFORE_HELLO = "before hello"
    READY = "ready"
    CLOSED = "closed"
    ERROR = "error"


class Signal(enum.Enum):
    """What `next_event` returns when it has no message: like h11's sentinels."""

    NEED_DATA = "need data"
    CLOSED = "closed"


NEED_DATA: Final = Signal.NEED_DATA
CLOSED: Final = Signal.CLOSED


# --- showing values in errors -------------------------------------------------------------
# Everything a peer sent is shown JSON-escaped and cut short, so that an error stays
# one printable line and can go back to the peer in an Error.


def _show(value: object) -> str:
    if isinstance(value, str):
        text = json.dumps(value[:40])
        return text + "…" if len(value) > 40 else text
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _bound(n: int) -> str:
    return {U63: "2**63-1", -(2**63): "-2**63"}.get(n, str(n))


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", key) else f"{path}[{_show(key)}]"


# --- field checks: each raises a ProtocolError naming the field path ---------------------


def _integer(path: str, value: object, lo: int, hi: int, *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        null = "null or " if nullable else ""
        raise ProtocolError(
            f"{path}: {_show(value)}, expected {null}an integer from {_bound(lo)} to {_bound(hi)}"
        )


_NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _text(path: str, value: object) -> None:
    """One line of human text: no control characters, line separators or lone surrogates."""
    expected = f"expected a string of 1 to {MAX_TEXT} characters without control characters"
    if not isinstance(value, str):
        raise ProtocolError(f"{path}: {_show(value)}, {expected}")
    if not 1 <= len(value) <= MAX_TEXT:
        raise ProtocolError(f"{path}: {len(value)} characters, {expected}")
    bad = _NOT_TEXT.search(value)
    if bad:
        raise ProtocolError(
            f"{path}: character U+{ord(bad.group()):04X} at {bad.start()}, {expected}"
        )


def _string(path: str, value: object, pattern: re.Pattern[str], expected: str, *,
            secret: bool = False, nullable: bool = False) -> None:  # fmt: skip
    if value is None and nullable:
        return
    null = "null or " if nullable else ""
    if not isinstance(value, str):
        raise ProtocolError(f"{path}: {_show(value)}, expected {null}{expected}")
    if not pattern.fullmatch(value):
        # a secret is described, never shown: errors end up in logs and in the peer's
        shown = f"{len(value)} characters" if secret else _show(value)
        raise ProtocolError(f"{path}: {shown}, expected {null}{expected}")


def _pem_block(label: str) -> str:
    return rf"-----BEGIN {label}-----\n(?:[A-Za-z0-9+/=]{{1,76}}\n)+-----END {label}-----"


def _pem(path: str, value: object, label: str, limit: int, *, many: bool = False) -> None:
    block = _pem_block(label)
    pattern = rf"(?:{block}\n)*{block}\n?" if many else rf"{block}\n?"
    what = "one or more PEM blocks" if many else "one PEM block"
    expected = f"{what} -----BEGIN {label}----- of base64 lines, at most {limit} characters"
    if isinstance(value, str) and len(value) > limit:
        raise ProtocolError(f"{path}: {len(value)} characters, expected {expected}")
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        shown = f"{len(value)} characters" if isinstance(value, str) else _show(value)
        raise ProtocolError(f"{path}: {shown}, expected {expected}")


def _wg_key(path: str, value: object) -> None:
    expected = "a WireGuard public key (44 characters of base64, 32 bytes, not all zeros)"
    raw = b""
    if isinstance(value, str) and len(value) == 44 and value.isascii():
        with contextlib.suppress(binascii.Error):
            raw = base64.b64decode(value, validate=True)
    # re-encoding catches the non-canonical spellings of the same 32 bytes
    if len(raw) != 32 or base64.b64encode(raw).decode() != value or raw == bytes(32):
        raise ProtocolError(f"{path}: {_show(value)}, expected {expected}")


def _json_object(path: str, value: object) -> None:
    """A JSON object as this module would encode it, nested at most MAX_DEPTH deep."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}: {_show(value)}, expected a JSON object")
    _json_value(path, value, 1, path)


def _json_value(path: str, value: object, depth: int, top: str) -> None:
    if isinstance(value, dict | list) and depth > MAX_DEPTH:
        raise ProtocolError(f"{top}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError(f"{path}: key {_show(k)}, expected string keys")
            _json_value(_key(path, k), k, depth + 1, top)
            _json_value(_key(path, k), v, depth + 1, top)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json_value(f"{path}[{i}]", v, depth + 1, top)
    elif isinstance(value, str):
        bad = re.search(r"[\ud800-\udfff]", value)
        if bad:
            raise ProtocolError(
                f"{path}: lone surrogate U+{ord(bad.group()):04X}, expected Unicode text"
            )
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError(f"{path}: {_show(value)}, expected a finite number")
    elif isinstance(value, int) and not isinstance(value, bool):
        _integer(path, value, -(2**63), U63)
    elif value is not None and not isinstance(value, bool):
        raise ProtocolError(
            f"{path}: {_show(value)}, expected a JSON value "
            "(object, array, string, number, true, false or null)"
        )


# A machine name: DNS labels as in controller/policy/names.py (which common cannot import).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First message of each side. `agent` is the machine's name: the agent's own idea of
    it, or, from the controller, the name its certificate was issued for; None if unknown."""

    TYPE: ClassVar[str] = "hello"
    version: int
    role: Role
    agent: str | None

    def __post_init__(self) -> None:
        _integer("hello.version", self.version, 1, 2**31 - 1)
        if self.role not in ROLES:
            raise ProtocolError(f'hello.role: {_show(self.role)}, expected "agent" or "controller"')
        _string(
            "hello.agent",
            self.agent,
            _NAME,
            "a machine name (DNS labels, at most 253 characters)",
            nullable=True,
        )


@dataclass(frozen=True, slots=True)
class Enroll:
    """An agent without a certificate asks for one, with its one-time token."""

    TYPE: ClassVar[str] = "enroll"
    token: str
    csr_pem: str
    wg_public_key: str

    def __post_init__(self) -> None:
        _string(
            "enroll.token",
            self.token,
            _TOKEN,
            "16 to 256 characters of A-Z a-z 0-9 _ -",
            secret=True,
        )
        _pem("enroll.csr_pem", self.csr_pem, "CERTIFICATE REQUEST", MAX_PEM)
        _wg_key("enroll.wg_public_key", self.wg_public_key)


@dataclass(frozen=True, slots=True)
class Enrolled:
    """The certificate issued for an Enroll or a Renew, its chain, and the CA to pin."""

    TYPE: ClassVar[str] = "enrolled"
    certificate_pem: str
    chain_pem: str
    ca_fingerprint: str

    def __post_init__(self) -> None:
        _pem("enrolled.certificate_pem", self.certificate_pem, "CERTIFICATE", MAX_PEM)
        _pem("enrolled.chain_pem", self.chain_pem, "CERTIFICATE", MAX_CHAIN, many=True)
        _string(
            "enrolled.ca_fingerprint",
            self.ca_fingerprint,
            _FINGERPRINT,
            "a SHA-256 in 64 lowercase hex digits",
        )


@dataclass(frozen=True, slots=True)
class Config:
    """The machine's whole desired configuration, validated here only as JSON."""

    TYPE: ClassVar[str] = "config"
    version: int
    config: dict[str, Any]

    def __post_init__(self) -> None:
        _integer("config.version", self.version, 1, U63)
        _json_object("config.config", self.config)


@dataclass(frozen=True, slots=True)
class Ack:
    """The agent applied this version."""

    TYPE: ClassVar[str] = "ack"
    version: int

    def __post_init__(self) -> None:
        _integer("ack.version", self.version, 1, U63)


@dataclass(frozen=True, slots=True)
class Nack:
    """The agent could not apply this version, and why."""

    TYPE: ClassVar[str] = "nack"
    version: int
    error: str

    def __post_init__(self) -> None:
        _integer("nack.version", self.version, 1, U63)
        _text("nack.error", self.error)


@dataclass(frozen=True, slots=True)
class Status:
    """What the agent has applied (None: nothing yet) and what it observes."""

    TYPE: ClassVar[str] = "status"
    version_applied: int | None
    report: dict[str, Any]

    def __post_init__(self) -> None:
        _integer("status.version_applied", self.version_applied, 1, U63, nullable=True)
        _json_object("status.report", self.report)


@dataclass(frozen=True, slots=True)
class Renew:
    """An enrolled agent asks for a new certificate before its own expires."""

    TYPE: ClassVar[str] = "renew"
    csr_pem: str

    def __post_init__(self) -> None:
        _pem("renew.csr_pem", self.csr_pem, "CERTIFICATE REQUEST", MAX_PEM)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either side, to show that it is alive; it is not answered."""

    TYPE: ClassVar[str] = "heartbeat"
    seq: int

    def __post_init__(self) -> None:
        _integer("heartbeat.seq", self.seq, 0, U63)


@dataclass(frozen=True, slots=True)
class Error:
    """Why the sender is closing the connection: the last message it sends."""

    TYPE: ClassVar[str] = "error"
    reason: str

    def __post_init__(self) -> None:
        _text("error.reason", self.reason)


Message: TypeAlias = (
    Hello | Enroll | Enrolled | Config | Ack | Nack | Status | Renew | Heartbeat | Error
)
Event: TypeAlias = Message | Signal

MESSAGES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (Hello, Enroll, Enrolled, Config, Ack, Nack, Status, Renew, Heartbeat, Error)
}
# Rule 3: who sends what.
SENDS: Final[dict[Role, frozenset[type[Message]]]] = {
    "agent": frozenset({Hello, Enroll, Renew, Ack, Nack, Status, Heartbeat, Error}),
    "controller": frozenset({Hello, Enrolled, Config, Heartbeat, Error}),
}
_FIELDS: Final = {t: tuple(f.name for f in fields(cls)) for t, cls in MESSAGES.items()}


# --- frames --------------------------------------------------------------------------------


def encode_frame(message: Message) -> bytes:
    """One whole frame, header included, in the canonical encoding (sorted keys, no spaces)."""
    message.__post_init__()  # again: a config's dict may have changed since
    obj = {"type": message.TYPE} | {k: getattr(message, k) for k in _FIELDS[message.TYPE]}
    body = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = body.encode("utf-8")
    if len(data) > MAX_FRAME:
        raise ProtocolError(
            f"{message.TYPE}: {len(data)} bytes encoded, more than the {MAX_FRAME} of a frame"
        )
    return len(data).to_bytes(HEADER, "big") + data


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise ProtocolError(f"frame: duplicate key {_show(k)} in a JSON object")
        obj[k] = v
    return obj


def _constant(name: str) -> Any:
    raise ProtocolError(f"frame: {name} is not JSON, expected a finite number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"frame: number {_show(text)} is out of range")
    return value


def _int(text: str) -> int:
    if len(text) > 20:  # no 64-bit integer has more digits; spares parsing huge ones
        raise ProtocolError(f"frame: an integer of {len(text)} digits, expected at most 64 bits")
    return int(text)


def decode_body(body: bytes) -> Message:
    """The message in one frame's body (the bytes after the length), validated in full."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"frame: not UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
        )
    except json.JSONDecodeError as e:
        raise ProtocolError(f"frame: invalid JSON: {e.msg} at character {e.pos}") from None
    except RecursionError:
        raise ProtocolError("frame: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f'frame: {_show(obj)}, expected a JSON object with a "type"')
    if "type" not in obj:
        raise ProtocolError('frame: no "type", expected a JSON object with a "type"')
    kind = obj.pop("type")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(
            f"frame: unknown message type {_show(kind)}, expected one of {', '.join(sorted(MESSAGES))}"
        )
    names = _FIELDS[cls.TYPE]
    for k in obj:
        if k not in names:
            raise ProtocolError(
                f"{cls.TYPE}: unknown key {_show(k)}, expected only type, {', '.join(names)}"
            )
    for k in names:
        if k not in obj:
            raise ProtocolError(f"{cls.TYPE}: missing key {_show(k)}")
    return cls(**obj)


# --- the connection ------------------------------------------------------------------------


def _a(role: Role) -> str:
    return f"an {role}" if role == "agent" else f"a {role}"


class Connection:
    """One side of one connection: `role` is this side's."""

    def __init__(self, role: Role) -> None:
        if role not in ROLES:
            raise ValueError(f"role {role!r}, expected 'agent' or 'controller'")
        self.role: Role = role
        self.peer_role: Role = "controller" if role == "agent" else "agent"
        self._buffer = bytearray()
        self._eof = False
        self._closed = False
        self._error: ProtocolError | None = None
        self._told = False  # an Error went either way: the peer must not be told again
        self._hello = {"agent": False, "controller": False}  # whose Hello has gone through
        self._request = False  # Rule 4: an Enroll or Renew awaits its Enrolled
        self._last_config = 0  # Rule 5
        self._unanswered: deque[int] = deque(maxlen=MAX_UNANSWERED)

    @property
    def state(self) -> State:
        if self._error is not None:
            return State.ERROR
        if self._closed:
            return State.CLOSED
        return State.READY if all(self._hello.values()) else State.BEFORE_HELLO

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    def send(self, message: Message) -> bytes:
        """The frame to send for `message`; ProtocolError if the rules do not allow it now."""
        self._raise_if_error()
        try:
            if self._closed:
                raise ProtocolError(f"cannot send {message.TYPE}: the connection is closed")
            frame = encode_frame(message)
            self._apply(self.role, message)
        except ProtocolError as e:
            self._error = e
            raise
        return frame

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; b"" is its end of stream."""
        self._raise_if_error()
        if self._eof and data:
            self._error = ProtocolError("data after the end of the stream")
            raise self._error
        if not data:
            self._eof = True
        elif not self._closed:
            self._buffer += data

    def next_event(self) -> Event:
        """The next message from the peer, NEED_DATA, or CLOSED (after EOF or an Error)."""
        self._raise_if_error()
        if self._closed:
            return CLOSED
        try:
            body = self._next_body()
            if body is None:
                if not self._eof:
                    return NEED_DATA
                if self._buffer:
                    raise ProtocolError(f"truncated frame: the stream ended {self._partial()}")
                self._closed = True
                return CLOSED
            message = decode_body(body)
            self._apply(self.peer_role, message)
        except ProtocolError as e:
            self._error = e
            raise
        return message

    def error_frame(self) -> bytes:
        """After a ProtocolError: the Error frame that tells the peer why, to send before
        closing; b"" if there is nothing to tell (no error, or an Error went already)."""
        if self._error is None or self._told:
            return b""
        self._told = True
        reason = _NOT_TEXT.sub("?", str(self._error))[:MAX_TEXT] or "protocol error"
        return encode_frame(Error(reason))

    def _raise_if_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _next_body(self) -> bytes | None:
        if len(self._buffer) < HEADER:
            return None
        n = int.from_bytes(self._buffer[:HEADER], "big")
        if not 1 <= n <= MAX_FRAME:  # before a byte of the body is waited for
            raise ProtocolError(f"frame length {n}, expected 1 to {MAX_FRAME} bytes")
        if len(self._buffer) < HEADER + n:
            return None
        body = bytes(self._buffer[HEADER : HEADER + n])
        del self._buffer[: HEADER + n]
        return body

    def _partial(self) -> str:
        if len(self._buffer) < HEADER:
            return f"after {len(self._buffer)} of the {HEADER} bytes of a frame's length"
        n = int.from_bytes(self._buffer[:HEADER], "big")
        return f"after {len(self._buffer) - HEADER} of a frame's {n} bytes"

    def _apply(self, sender: Role, m: Message) -> None:
        """The rules (see the module docstring) for `m` from `sender`: raise, or record it.
        Nothing is recorded before every check has passed."""
        t = m.TYPE
        if type(m) not in SENDS[sender]:  # Rule 3
            other: Role = "controller" if sender == "agent" else "agent"
            raise ProtocolError(f"{t} from {_a(sender)}: only {_a(other)} sends {t}")
        if isinstance(m, Error):  # Rule 6
            self._closed = self._told = True
            return
        if isinstance(m, Hello):  # Rule 1
            if self._hello[sender]:
                raise ProtocolError("hello again: each side sends hello once")
            if m.role != sender:
                raise ProtocolError(f'hello.role: {_show(m.role)}, expected "{sender}", the sender')
            if m.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"unsupported protocol version {m.version}, this side speaks {PROTOCOL_VERSION}"
                )
            self._hello[sender] = True
            return
        if not self._hello[sender]:  # Rule 2
            raise ProtocolError(f"{t} before hello: the first message each side sends is hello")
        if not all(self._hello.values()):
            raise ProtocolError(f"{t} before both hellos: nothing else is sent until then")
        if isinstance(m, Enroll | Renew):  # Rule 4
            if self._request:
                raise ProtocolError(f"{t} while an enroll or renew is unanswered: one at a time")
            self._request = True
        elif isinstance(m, Enrolled):
            if not self._request:
                raise ProtocolError("enrolled without an enroll or renew to answer")
            self._request = False
        elif isinstance(m, Config):  # Rule 5
            if m.version <= self._last_config:
                raise ProtocolError(
                    f"config.version: {m.version}, expected more than {self._last_config}, "
                    "the last config of this connection"
                )
            self._last_config = m.version
            self._unanswered.append(m.version)
        elif isinstance(m, Ack | Nack):
            if m.version not in self._unanswered:
                waiting = ", ".join(map(str, list(self._unanswered)[-5:])) or "none"
                raise ProtocolError(
                    f"{t}.version: {m.version}, expected an unanswered config of this "
                    f"connection (the last ones: {waiting})"
                )
            while self._unanswered and self._unanswered[0] <= m.version:
                self._unanswered.popleft()
