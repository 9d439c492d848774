"""common.wire: both peers over a fake link, every message, every way a frame can be wrong."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wire import (
    CLOSED,
    MAX_DEPTH,
    MAX_FRAME,
    MESSAGES,
    NEED_DATA,
    PROTOCOL_VERSION,
    ROLES,
    SENDS,
    Ack,
    Config,
    Connection,
    Enroll,
    Enrolled,
    Error,
    Event,
    Heartbeat,
    Hello,
    Message,
    Nack,
    ProtocolError,
    Renew,
    Role,
    Signal,
    State,
    Status,
    decode_body,
    encode_frame,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pem(label: str, der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        f"-----BEGIN {label}-----\n" + "".join(f"{x}\n" for x in lines) + f"-----END {label}-----\n"
    )


CSR = pem("CERTIFICATE REQUEST", b"\x30\x82" + bytes(range(200)))
CERT = pem("CERTIFICATE", b"\x30\x82" + bytes(range(100, 250)))
WG_KEY = base64.b64encode(bytes(range(1, 33))).decode()
TOKEN = "abcdefghijklmnop_-0123456789ABCD"
FPR = hashlib.sha256(b"ca").hexdigest()

# One of each message, with the side that sends it.
SAMPLES: list[tuple[Role, Message]] = [
    ("agent", Enroll(TOKEN, CSR, WG_KEY)),
    ("controller", Enrolled(CERT, CERT + CERT, FPR)),
    ("agent", Renew(CSR)),
    ("controller", Enrolled(CERT, CERT, FPR)),
    ("controller", Config(1, {"ports": [{"name": "eth0", "mtu": 1500}], "dns": None})),
    ("controller", Config(2, {"x": [1.5, True, "é", {"deep": []}]})),
    ("agent", Ack(1)),
    ("agent", Nack(2, "eth0: no such device")),
    ("agent", Status(1, {"links": {"eth0": "up"}})),
    ("agent", Status(None, {})),
    ("agent", Heartbeat(0)),
    ("controller", Heartbeat(2**63 - 1)),
    ("agent", Error("shutting down")),
]


def other(role: Role) -> Role:
    return "controller" if role == "agent" else "agent"


def drain(conn: Connection) -> list[Event]:
    """Events up to NEED_DATA, CLOSED included."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if event is CLOSED:
            return events


def ready(*, agent: str | None = "web1.dmz") -> tuple[Connection, Connection]:
    a, c = Connection("agent"), Connection("controller")
    c.receive_data(a.send(Hello(PROTOCOL_VERSION, "agent", agent)))
    a.receive_data(c.send(Hello(PROTOCOL_VERSION, "controller", agent)))
    assert drain(c) == [Hello(1, "agent", agent)] and drain(a) == [Hello(1, "controller", agent)]
    assert a.state is State.READY and c.state is State.READY
    return a, c


def error_of(conn: Connection, data: bytes) -> str:
    """The ProtocolError that `data` from the peer gives (`conn` has sent its Hello)."""
    conn.receive_data(data)
    with pytest.raises(ProtocolError) as e:
        drain(conn)
    return str(e.value)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def obj_frame(obj: Any) -> bytes:
    return frame(json.dumps(obj).encode())


def controller_after_hello() -> Connection:
    """A controller that has sent its Hello and heard the agent's: it takes agent messages."""
    c = Connection("controller")
    c.send(Hello(1, "controller", None))
    c.receive_data(encode_frame(Hello(1, "agent", None)))
    assert drain(c) == [Hello(1, "agent", None)]
    return c


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["one chunk", "byte by byte"])
def test_every_message_round_trips_between_the_two_sides(bytewise: bool) -> None:
    a, c = ready()
    conns = {"agent": a, "controller": c}
    for sender, message in SAMPLES:
        data = conns[sender].send(message)
        assert data == encode_frame(message)
        receiver = conns[other(sender)]
        if bytewise:
            events: list[Event] = []
            for i in range(len(data)):
                receiver.receive_data(data[i : i + 1])
                events += drain(receiver)
        else:
            receiver.receive_data(data)
            events = drain(receiver)
        assert events == ([message, CLOSED] if isinstance(message, Error) else [message])
    # the agent's Error closed the connection, on both sides
    assert a.state is State.CLOSED and c.state is State.CLOSED
    assert c.next_event() is CLOSED and a.next_event() is CLOSED


def test_every_message_type_is_in_the_samples_and_sent_by_its_roles() -> None:
    types = {type(m) for _, m in SAMPLES} | {Hello}
    assert types == set().union(*SENDS.values())
    for sender, m in SAMPLES:
        assert type(m) in SENDS[sender]


def test_encoding_is_canonical() -> None:
    assert encode_frame(Ack(3)) == b'\x00\x00\x00\x1a{"type":"ack","version":3}'
    assert encode_frame(Config(1, {"b": 1, "a": {"d": 2, "c": "é"}})) == frame(
        '{"config":{"a":{"c":"é","d":2},"b":1},"type":"config","version":1}'.encode()
    )
    # non-canonical input is accepted (whitespace, key order, escapes) and re-encodes canonically
    assert decode_body(b' { "version" : 3 , "type" : "\\u0061ck" } ') == Ack(3)


def test_clean_eof_at_a_frame_boundary_is_closed() -> None:
    a, c = ready()
    c.receive_data(a.send(Heartbeat(1)))
    c.receive_data(b"")
    assert drain(c) == [Heartbeat(1), CLOSED]
    assert c.state is State.CLOSED and c.next_event() is CLOSED
    with pytest.raises(ProtocolError, match="cannot send heartbeat: the connection is closed"):
        c.send(Heartbeat(2))


# --- Hypothesis: messages ------------------------------------------------------------------

NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z0-9]{1,8}){0,2}", fullmatch=True)
TOKENS = st.text(string.ascii_letters + string.digits + "_-", min_size=16, max_size=64)
CSRS = st.binary(min_size=1, max_size=300).map(lambda b: pem("CERTIFICATE REQUEST", b))
CERTS = st.binary(min_size=1, max_size=300).map(lambda b: pem("CERTIFICATE", b))
CHAINS = st.lists(CERTS, min_size=1, max_size=3).map("".join)
WG_KEYS = (
    st.binary(min_size=32, max_size=32).filter(any).map(lambda b: base64.b64encode(b).decode())
)
FPRS = st.binary(max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
TEXTS = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=60
)
VERSIONS = st.integers(1, 2**63 - 1)
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
JSON = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
OBJECTS = st.dictionaries(st.text(max_size=6), JSON, max_size=4)

STRATEGIES: dict[type, st.SearchStrategy[Any]] = {
    Hello: st.builds(Hello, st.just(1), st.sampled_from(ROLES), st.none() | NAMES),
    Enroll: st.builds(Enroll, TOKENS, CSRS, WG_KEYS),
    Enrolled: st.builds(Enrolled, CERTS, CHAINS, FPRS),
    Config: st.builds(Config, VERSIONS, OBJECTS),
    Ack: st.builds(Ack, VERSIONS),
    Nack: st.builds(Nack, VERSIONS, TEXTS),
    Status: st.builds(Status, st.none() | VERSIONS, OBJECTS),
    Renew: st.builds(Renew, CSRS),
    Heartbeat: st.builds(Heartbeat, st.integers(0, 2**63 - 1)),
    Error: st.builds(Error, TEXTS),
}
ANY_MESSAGE: st.SearchStrategy[Message] = st.one_of(*STRATEGIES.values())


class Model:
    """What the rules allow next, from what each side has sent and received."""

    def __init__(self) -> None:
        self.agent_asked = False  # the agent sent Enroll/Renew and has no Enrolled yet
        self.controller_asked = False  # the controller has an Enroll/Renew to answer
        self.last_config = 0
        self.agent_configs: list[int] = []  # received by the agent, unanswered

    def choices(self, role: Role) -> list[st.SearchStrategy[Message]]:
        if role == "agent":
            out = [STRATEGIES[Status], STRATEGIES[Heartbeat]]
            if not self.agent_asked:
                out += [STRATEGIES[Enroll], STRATEGIES[Renew]]
            if self.agent_configs:
                version = st.sampled_from(self.agent_configs)
                out += [st.builds(Ack, version), st.builds(Nack, version, TEXTS)]
            return out
        config = st.integers(1, 3).flatmap(
            lambda n: st.builds(Config, st.just(self.last_config + n), OBJECTS)
        )
        out = [STRATEGIES[Heartbeat], config]
        if self.controller_asked:
            out.append(STRATEGIES[Enrolled])
        return out

    def sent(self, role: Role, m: Message) -> None:
        if isinstance(m, Enroll | Renew):
            self.agent_asked = True
        elif isinstance(m, Enrolled):
            self.controller_asked = False
        elif isinstance(m, Config):
            self.last_config = m.version
        elif isinstance(m, Ack | Nack):
            self.agent_configs = [v for v in self.agent_configs if v > m.version]

    def received(self, role: Role, m: Event) -> None:
        if isinstance(m, Enroll | Renew):
            self.controller_asked = True
        elif isinstance(m, Enrolled):
            self.agent_asked = False
        elif isinstance(m, Config):
            self.agent_configs.append(m.version)


def split(data: st.DataObject, chunk: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(chunk)), max_size=5)))
    return [chunk[a:b] for a, b in zip([0, *cuts], [*cuts, len(chunk)], strict=True) if b > a]


@SETTINGS
@given(st.data())
def test_valid_conversations_split_anywhere_arrive_as_sent(data: st.DataObject) -> None:
    conns = {role: Connection(role) for role in ROLES}
    sent: dict[Role, list[Event]] = {role: [] for role in ROLES}
    got: dict[Role, list[Event]] = {role: [] for role in ROLES}
    wire: dict[Role, bytes] = {role: b"" for role in ROLES}  # sent by role, not yet delivered
    model = Model()

    def send(role: Role, m: Message) -> None:
        wire[role] += conns[role].send(m)
        sent[role].append(m)
        model.sent(role, m)

    def deliver(sender: Role, n: int) -> None:
        receiver = other(sender)
        chunk, wire[sender] = wire[sender][:n], wire[sender][n:]
        for piece in split(data, chunk):
            conns[receiver].receive_data(piece)
            for event in drain(conns[receiver]):
                got[receiver].append(event)
                model.received(receiver, event)

    for role in ROLES:
        send(role, Hello(1, role, data.draw(st.none() | NAMES)))
    for _ in range(data.draw(st.integers(0, 25))):
        role = data.draw(st.sampled_from(ROLES))
        if conns[role].state is State.READY:
            send(role, data.draw(st.one_of(*model.choices(role))))
        for sender in ROLES:
            deliver(sender, data.draw(st.integers(0, len(wire[sender]))))
    for sender in ROLES:
        deliver(sender, len(wire[sender]))
        conns[other(sender)].receive_data(b"")
        got[other(sender)] += drain(conns[other(sender)])
    assert got["controller"] == [*sent["agent"], CLOSED]
    assert got["agent"] == [*sent["controller"], CLOSED]


def body_of(m: Message) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(encode_frame(m)[4:])
    return obj


@SETTINGS
@given(ANY_MESSAGE)
def test_any_message_encodes_canonically_and_decodes_to_itself(m: Message) -> None:
    data = encode_frame(m)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode_body(data[4:]) == m
    canonical = json.dumps(body_of(m), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert data[4:] == canonical.encode()


def check_event(event: Event, sender: Role) -> None:
    """An event is a valid message of the sender's role: it re-encodes and decodes to itself."""
    assert isinstance(event, Signal) or (
        type(event) in SENDS[sender] and decode_body(encode_frame(event)[4:]) == event
    )


def near_frames() -> st.SearchStrategy[bytes]:
    """Frames that are nearly right: a real type, field names, random JSON values."""
    fields = ["version", "role", "agent", "token", "csr_pem", "wg_public_key", "certificate_pem",
              "chain_pem", "ca_fingerprint", "config", "error", "version_applied", "report",
              "seq", "reason", "x"]  # fmt: skip
    objs = st.builds(
        lambda t, rest: {"type": t, **rest},
        st.sampled_from(["hello", "ack", "status", "heartbeat", "config", "enroll", "nope"]),
        st.dictionaries(st.sampled_from(fields), JSON, max_size=4),
    )
    return objs.map(lambda o: frame(json.dumps(o).encode()))


@SETTINGS
@given(
    st.sampled_from(ROLES),
    st.lists(
        st.binary(max_size=40)
        | near_frames()
        | ANY_MESSAGE.map(encode_frame)
        | st.sampled_from([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00"]),
        max_size=6,
    ).map(b"".join),
    st.booleans(),
    st.data(),
)
def test_arbitrary_bytes_give_valid_events_or_a_protocol_error(
    role: Role, stream: bytes, eof: bool, data: st.DataObject
) -> None:
    conn = Connection(role)
    conn.send(Hello(1, role, None))
    try:
        for piece in split(data, stream):
            conn.receive_data(piece)
            for event in drain(conn):
                check_event(event, other(role))
        if eof:
            conn.receive_data(b"")
            for event in drain(conn):
                check_event(event, other(role))
    except ProtocolError as e:
        assert conn.error is e and conn.state is State.ERROR
        assert "\n" not in str(e)
        with pytest.raises(ProtocolError) as again:
            conn.next_event()
        assert again.value is e


@SETTINGS
@given(
    st.lists(STRATEGIES[Status] | STRATEGIES[Heartbeat], max_size=5),
    st.data(),
)
def test_truncation_anywhere_then_eof_is_a_truncated_frame(
    messages: list[Message], data: st.DataObject
) -> None:
    frames = [encode_frame(m) for m in [Hello(1, "agent", None), *messages]]
    stream = b"".join(frames)
    cut = data.draw(st.integers(0, len(stream)))
    conn = Connection("controller")
    conn.send(Hello(1, "controller", None))
    events: list[Event] = []
    for piece in split(data, stream[:cut]):
        conn.receive_data(piece)
        events += drain(conn)
    conn.receive_data(b"")
    boundaries = {sum(map(len, frames[:i])) for i in range(len(frames) + 1)}
    whole = [decode_body(f[4:]) for f in frames][: sum(1 for b in boundaries if 0 < b <= cut)]
    if cut in boundaries:
        assert events + drain(conn) == [*whole, CLOSED]
    else:
        with pytest.raises(ProtocolError, match=r"^truncated frame: the stream ended after"):
            events += drain(conn)
        assert events == whole  # the frames before the cut were whole, and delivered


# Field kinds, and values of every other JSON type.
KINDS = {
    "int": [True, 1.5, "1", [], {}, None],
    "int?": [True, 1.5, "1", [], {}],
    "str": [1, True, 1.5, [], {}, None],
    "str?": [1, True, 1.5, [], {}],
    "object": [1, True, 1.5, "x", [], None],
}
FIELD_KINDS = {
    ("hello", "version"): "int",
    ("hello", "role"): "str",
    ("hello", "agent"): "str?",
    ("enroll", "token"): "str",
    ("enroll", "csr_pem"): "str",
    ("enroll", "wg_public_key"): "str",
    ("enrolled", "certificate_pem"): "str",
    ("enrolled", "chain_pem"): "str",
    ("enrolled", "ca_fingerprint"): "str",
    ("config", "version"): "int",
    ("config", "config"): "object",
    ("ack", "version"): "int",
    ("nack", "version"): "int",
    ("nack", "error"): "str",
    ("status", "version_applied"): "int?",
    ("status", "report"): "object",
    ("renew", "csr_pem"): "str",
    ("heartbeat", "seq"): "int",
    ("error", "reason"): "str",
}


def test_field_kinds_cover_every_field() -> None:
    fields = {(t, f.name) for t, cls in MESSAGES.items() for f in dataclasses.fields(cls)}
    assert fields == set(FIELD_KINDS)


@SETTINGS
@given(ANY_MESSAGE, st.data())
def test_a_field_of_the_wrong_type_is_an_error_naming_the_field(
    m: Message, data: st.DataObject
) -> None:
    obj = body_of(m)
    key = data.draw(st.sampled_from(sorted(k for k in obj if k != "type")))
    obj[key] = data.draw(st.sampled_from(KINDS[FIELD_KINDS[m.TYPE, key]]))
    with pytest.raises(ProtocolError, match=rf"^{m.TYPE}\.{key}: "):
        decode_body(json.dumps(obj).encode())


# --- frames --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 2**32 - 1])
def test_a_bad_length_is_refused_from_the_header_alone(length: int) -> None:
    conn = controller_after_hello()
    conn.receive_data(length.to_bytes(4, "big"))  # no body follows, none is waited for
    with pytest.raises(
        ProtocolError, match=rf"^frame length {length}, expected 1 to {MAX_FRAME} bytes$"
    ):
        conn.next_event()


def test_the_largest_frame_passes_and_a_larger_config_is_not_sent() -> None:
    a, c = ready()
    padding = MAX_FRAME - len(encode_frame(Config(1, {"p": ""}))) + 4
    big = Config(1, {"p": "x" * padding})
    data = c.send(big)
    assert len(data) == 4 + MAX_FRAME
    a.receive_data(data)
    assert drain(a) == [big]
    with pytest.raises(ProtocolError, match=rf"^config: {MAX_FRAME + 1} bytes encoded, more than"):
        c.send(Config(2, {"p": "x" * (padding + 1)}))


def test_truncated_frames_name_what_was_missing() -> None:
    c = controller_after_hello()
    c.receive_data(b"\x00\x00")
    c.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"^truncated frame: .* after 2 of the 4 bytes"):
        c.next_event()
    c = controller_after_hello()
    c.receive_data(encode_frame(Heartbeat(5))[:-3])
    c.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"^truncated frame: .* after 25 of a frame's 28 bytes"):
        c.next_event()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"type":"bogus"}', 'frame: unknown message type "bogus", expected one of ack, config,'),
        (b'{"type":7}', "frame: unknown message type 7"),
        (b'{"version":1}', 'frame: no "type"'),
        (b'{"type":"ack","version":1,"extra":2}', 'ack: unknown key "extra", expected only type, version'),
        (b'{"type":"nack","version":1}', 'nack: missing key "error"'),
        (b'{"type":"ack","version":1,"version":2}', 'frame: duplicate key "version"'),
        (b'{"type":"ack","version":NaN}', "frame: NaN is not JSON"),
        (b'{"type":"ack","version":-Infinity}', "frame: -Infinity is not JSON"),
        (b'{"type":"status","version_applied":null,"report":{"x":1e400}}', 'frame: number "1e400" is out of range'),
        (b'{"type":"ack","version":' + b"9" * 30 + b"}", "frame: an integer of 30 digits"),
        (b"[1,2]", 'frame: an array, expected a JSON object with a "type"'),
        (b'"ack"', 'frame: "ack", expected a JSON object'),
        (b"\xff\xfe", "frame: not UTF-8 (byte 0)"),
        (b'{"type":"ack"', "frame: invalid JSON: Expecting"),
        (b'{"type":"ack","version":1} x', "frame: invalid JSON: Extra data"),
        (b"[" * 100_000, "frame: JSON nested too deeply"),
        (b'{"type":"heartbeat","seq":-1}', "heartbeat.seq: -1, expected an integer from 0 to 2**63-1"),
        (b'{"type":"heartbeat","seq":9223372036854775808}', "heartbeat.seq: 9223372036854775808, expected"),
        (b'{"type":"ack","version":true}', "ack.version: true, expected an integer from 1 to 2**63-1"),
        (b'{"type":"nack","version":1,"error":""}', "nack.error: 0 characters, expected a string of 1 to 1000"),
        (b'{"type":"nack","version":1,"error":"a\\nb"}', "nack.error: character U+000A at 1"),
        (b'{"type":"hello","version":1,"role":"admin","agent":null}', 'hello.role: "admin", expected "agent" or "controller"'),
        (b'{"type":"hello","version":1,"role":"agent","agent":"Web_1"}', 'hello.agent: "Web_1", expected null or a machine name'),
        (b'{"type":"hello","version":0,"role":"agent","agent":null}', "hello.version: 0, expected an integer from 1"),
        (b'{"type":"status","version_applied":null,"report":{"a":"\\ud800"}}', "status.report.a: lone surrogate U+D800"),
        (b'{"type":"status","version_applied":null,"report":{"a":[[{"b":9223372036854775808}]]}}', "status.report.a[0][0].b: 9223372036854775808, expected an integer from -2**63 to 2**63-1"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_clear_errors(body: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode_body(body)
    assert str(e.value).startswith(expected), str(e.value)


def test_nesting_is_bounded() -> None:
    def nested(n: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(n - 1):
            value = {"a": value}
        return value

    assert Config(1, nested(MAX_DEPTH)).config == nested(MAX_DEPTH)
    with pytest.raises(
        ProtocolError, match=rf"^config.config: nested more than {MAX_DEPTH} levels"
    ):
        Config(1, nested(MAX_DEPTH + 1))
    with pytest.raises(ProtocolError, match=r"^status.report: nested more than"):
        decode_body(
            json.dumps({"type": "status", "version_applied": None, "report": nested(40)}).encode()
        )


def test_field_checks_of_the_enrollment_messages() -> None:
    def error(build: Any) -> str:
        with pytest.raises(ProtocolError) as e:
            build()
        return str(e.value)

    # a token is never shown, only described
    e = error(lambda: Enroll("secret!" * 4, CSR, WG_KEY))
    assert e.startswith(
        "enroll.token: 28 characters, expected 16 to 256 characters of A-Z a-z 0-9 _ -"
    )
    assert "secret" not in e
    assert error(lambda: Enroll("short", CSR, WG_KEY)).startswith("enroll.token: 5 characters")
    assert error(lambda: Enroll(TOKEN, CERT, WG_KEY)).startswith(
        "enroll.csr_pem: 262 characters, expected one PEM block -----BEGIN CERTIFICATE REQUEST-----"
    )
    assert error(lambda: Enroll(TOKEN, "x" * 20000, WG_KEY)).startswith(
        "enroll.csr_pem: 20000 characters"
    )
    assert error(lambda: Renew(CSR.replace("\n", "\r\n"))).startswith("renew.csr_pem:")
    assert error(lambda: Enroll(TOKEN, CSR, base64.b64encode(bytes(32)).decode())).startswith(
        "enroll.wg_public_key:"  # all zeros
    )
    assert error(lambda: Enroll(TOKEN, CSR, WG_KEY[:-2] + "B=")).startswith(
        "enroll.wg_public_key:"  # the same 32 bytes, spelt another way
    )
    assert error(lambda: Enroll(TOKEN, CSR, base64.b64encode(bytes(33)).decode()[:44])).startswith(
        "enroll.wg_public_key:"
    )
    assert error(lambda: Enrolled(CERT + CERT, CERT, FPR)).startswith("enrolled.certificate_pem:")
    assert error(lambda: Enrolled(CERT, "", FPR)).startswith("enrolled.chain_pem: 0 characters")
    assert error(lambda: Enrolled(CERT, CERT, FPR.upper())).startswith(
        'enrolled.ca_fingerprint: "' + FPR.upper()[:40]
    )
    assert error(lambda: Config(1, {"a": (1, 2)})).startswith(
        "config.config.a: a tuple, expected a JSON value"
    )
    int_keys: Any = {1: 2}
    assert error(lambda: Config(1, int_keys)).startswith(
        "config.config: key 1, expected string keys"
    )
    assert error(lambda: Status(None, {"x": float("nan")})).startswith(
        "status.report.x: NaN, expected a finite number"
    )
    assert error(lambda: Status(None, {"odd key": True, "k": {"a b": b""}})).startswith(
        'status.report.k["a b"]: a bytes, expected a JSON value'
    )


# --- the state machine ---------------------------------------------------------------------


def test_a_hello_of_another_version_is_refused() -> None:
    c = Connection("controller")
    c.send(Hello(1, "controller", None))
    e = error_of(c, encode_frame(Hello(2, "agent", None)))
    assert e == "unsupported protocol version 2, this side speaks 1"
    # the answer a peer of any version can read: framing and Error stay the same
    reason = decode_body(c.error_frame()[4:])
    assert reason == Error("unsupported protocol version 2, this side speaks 1")
    assert c.error_frame() == b""  # told once


def test_this_side_cannot_send_a_hello_of_another_version_or_role() -> None:
    with pytest.raises(ProtocolError, match=r"^unsupported protocol version 3"):
        Connection("agent").send(Hello(3, "agent", None))
    with pytest.raises(ProtocolError, match=r'^hello.role: "controller", expected "agent"'):
        Connection("agent").send(Hello(1, "controller", None))


def test_a_peer_hello_with_the_wrong_role_is_refused() -> None:
    a = Connection("agent")
    a.send(Hello(1, "agent", None))
    assert error_of(a, encode_frame(Hello(1, "agent", None))) == (
        'hello.role: "agent", expected "controller", the sender'
    )


def test_messages_before_hello_are_refused_both_ways() -> None:
    with pytest.raises(
        ProtocolError, match=r"^heartbeat before hello: the first message each side sends is hello$"
    ):
        Connection("agent").send(Heartbeat(1))
    c = Connection("controller")
    c.send(Hello(1, "controller", None))
    assert error_of(c, encode_frame(Status(None, {}))) == (
        "status before hello: the first message each side sends is hello"
    )
    # this side has sent its Hello but has not heard the peer's
    a = Connection("agent")
    a.send(Hello(1, "agent", None))
    with pytest.raises(ProtocolError, match=r"^heartbeat before both hellos"):
        a.send(Heartbeat(1))
    # the peer sent something before it could have had this side's Hello
    c = Connection("controller")
    c.receive_data(encode_frame(Hello(1, "agent", None)) + encode_frame(Heartbeat(1)))
    assert c.next_event() == Hello(1, "agent", None)
    with pytest.raises(ProtocolError, match=r"^heartbeat before both hellos"):
        c.next_event()


def test_hello_only_once() -> None:
    a, c = ready()
    with pytest.raises(ProtocolError, match=r"^hello again: each side sends hello once$"):
        a.send(Hello(1, "agent", None))
    assert (
        error_of(c, encode_frame(Hello(1, "agent", None)))
        == "hello again: each side sends hello once"
    )


@pytest.mark.parametrize(
    ("receiver", "message", "expected"),
    [
        ("controller", Config(1, {}), "config from an agent: only a controller sends config"),
        ("controller", Enrolled(CERT, CERT, FPR), "enrolled from an agent: only a controller sends enrolled"),
        ("agent", Enroll(TOKEN, CSR, WG_KEY), "enroll from a controller: only an agent sends enroll"),
        ("agent", Renew(CSR), "renew from a controller: only an agent sends renew"),
        ("agent", Ack(1), "ack from a controller: only an agent sends ack"),
        ("agent", Nack(1, "x"), "nack from a controller: only an agent sends nack"),
        ("agent", Status(1, {}), "status from a controller: only an agent sends status"),
    ],
)  # fmt: skip
def test_messages_not_of_the_peers_role_are_refused(
    receiver: Role, message: Message, expected: str
) -> None:
    a, c = ready()
    conn = a if receiver == "agent" else c
    assert error_of(conn, encode_frame(message)) == expected
    # and this side would not have sent it either
    peer = c if receiver == "agent" else a
    with pytest.raises(ProtocolError, match=rf"^{expected}$"):
        peer.send(message)


def test_enrolled_answers_one_request_at_a_time() -> None:
    a, c = ready()
    with pytest.raises(ProtocolError, match=r"^enrolled without an enroll or renew to answer$"):
        c.send(Enrolled(CERT, CERT, FPR))
    a, c = ready()
    assert error_of(a, encode_frame(Enrolled(CERT, CERT, FPR))) == (
        "enrolled without an enroll or renew to answer"
    )
    a, c = ready()
    a.send(Renew(CSR))
    with pytest.raises(ProtocolError, match=r"^enroll while an enroll or renew is unanswered"):
        a.send(Enroll(TOKEN, CSR, WG_KEY))
    a, c = ready()
    c.receive_data(encode_frame(Renew(CSR)) + encode_frame(Renew(CSR)))
    assert c.next_event() == Renew(CSR)
    with pytest.raises(ProtocolError, match=r"^renew while an enroll or renew is unanswered"):
        c.next_event()


def test_config_versions_increase_and_answers_name_an_unanswered_config() -> None:
    a, c = ready()
    for v in (3, 5, 9):
        a.receive_data(c.send(Config(v, {})))
    assert [e.version for e in drain(a) if isinstance(e, Config)] == [3, 5, 9]
    with pytest.raises(ProtocolError, match=r"^config.version: 9, expected more than 9, the last"):
        c.send(Config(9, {}))
    a, c = ready()
    a.receive_data(c.send(Config(3, {})) + c.send(Config(5, {})) + c.send(Config(9, {})))
    drain(a)
    c.receive_data(a.send(Ack(5)))  # 3 was superseded, and is answered with 5
    assert drain(c) == [Ack(5)]
    with pytest.raises(
        ProtocolError,
        match=r"^nack.version: 3, expected an unanswered config of this connection \(the last ones: 9\)$",
    ):
        a.send(Nack(3, "x"))
    a, c = ready()
    assert error_of(c, encode_frame(Ack(1))).startswith(
        "ack.version: 1, expected an unanswered config"
    )
    a, c = ready()
    a.receive_data(c.send(Config(2, {})))
    assert error_of(a, encode_frame(Config(1, {}))) == (
        "config.version: 1, expected more than 2, the last config of this connection"
    )


def test_after_an_error_every_call_raises_the_same_error() -> None:
    _, c = ready()
    e = error_of(c, frame(b"{}"))
    assert c.state is State.ERROR and str(c.error) == e
    for call in (lambda: c.next_event(), lambda: c.receive_data(b"x"), lambda: c.receive_data(b""),
                 lambda: c.send(Heartbeat(1))):  # fmt: skip
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value is c.error
    # nothing of the bad frame, or of what followed it, was delivered
    assert decode_body(c.error_frame()[4:]) == Error(e)


def test_a_bad_frame_delivers_nothing_after_the_good_ones_before_it() -> None:
    _, c = ready()
    c.receive_data(
        encode_frame(Heartbeat(1))
        + frame(b'{"type":"heartbeat","seq":2,"x":1}')
        + encode_frame(Heartbeat(3))
    )
    assert c.next_event() == Heartbeat(1)
    with pytest.raises(ProtocolError, match=r'^heartbeat: unknown key "x"'):
        c.next_event()


def test_error_from_the_peer_closes_and_is_not_answered() -> None:
    a, c = ready()
    a.receive_data(c.send(Error("enrollment refused: unknown token")) + encode_frame(Heartbeat(1)))
    assert drain(a) == [Error("enrollment refused: unknown token"), CLOSED]
    assert a.state is State.CLOSED and c.state is State.CLOSED and a.error is None
    assert a.error_frame() == b""
    with pytest.raises(ProtocolError, match=r"^cannot send ack: the connection is closed"):
        c.send(Ack(1))


def test_error_may_come_first() -> None:
    c = Connection("controller")
    c.receive_data(encode_frame(Error("unsupported protocol version 1, this side speaks 2")))
    assert drain(c) == [Error("unsupported protocol version 1, this side speaks 2"), CLOSED]


def test_data_after_eof_is_refused() -> None:
    c = controller_after_hello()
    c.receive_data(b"")
    with pytest.raises(ProtocolError, match=r"^data after the end of the stream$"):
        c.receive_data(b"\x00")


def test_error_frame_keeps_to_the_bounds_of_an_error() -> None:
    c = controller_after_hello()
    error_of(
        c,
        obj_frame(
            {
                "type": "status",
                "version_applied": None,
                "report": {"é\n" * 30: [1] * 40},
                "x" * 3000: 1,
            }
        ),
    )
    reason = decode_body(c.error_frame()[4:])
    assert isinstance(reason, Error) and 1 <= len(reason.reason) <= 1000
    assert Connection("agent").error_frame() == b""  # no error, nothing to tell
