"""The WireGuard driver without a device: keys, validation, UAPI and kernel messages.

The UAPI side is also tested for real against wireguard-go (tests/lab). The kernel
side is tested here at the message level only: this machine's kernel has no
WireGuard module, so the kernel's behaviour (how it applies SET_DEVICE and how it
fragments a GET_DEVICE dump) is synthesized by `FakeKernel`, written from
drivers/net/wireguard/netlink.c.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import pickle
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wireguard import kernel, keys, uapi
from common.wireguard import netlink as nl
from common.wireguard.backend import Backend
from common.wireguard.errors import (
    ConfigError,
    DeviceError,
    DeviceNotFound,
    ProtocolError,
)
from common.wireguard.model import (
    ZERO_KEY,
    Device,
    Peer,
    PeerStatus,
    Update,
    b64,
    diff_peers,
    make_update,
    needs_update,
)

FAMILY = 0x1B  # any id: the kernel assigns the real one at boot


def key(n: int) -> bytes:
    return bytes([n % 251 + 1]) + n.to_bytes(4, "big") + bytes(27)


# ---- keys ---------------------------------------------------------------------------

# RFC 7748, section 6.1
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIV = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
# made with `wg genkey | tee priv | wg pubkey` (a throwaway pair)
WG_PRIV = "gHsPkkEBeqCCrgkv7I0SWdnG+DVpTrwAQi+tnkoETlY="
WG_PUB = "JkXlgLWsmea3cW4IapZVvcl9nPQc68vdH9y6V89aDlY="


def test_public_of_known_vectors() -> None:
    assert keys.public_of(ALICE_PRIV) == ALICE_PUB
    assert keys.public_of(BOB_PRIV) == BOB_PUB
    assert keys.to_base64(keys.public_of(keys.from_base64(WG_PRIV))) == WG_PUB
    assert keys.PrivateKey.from_base64(WG_PRIV).public == keys.from_base64(WG_PUB)


def test_generated_keys_are_clamped_like_wg_genkey() -> None:
    raw = keys.generate_private()
    assert len(raw) == 32 and raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
    assert keys.public_of(raw) == keys.public_of(keys.clamp(raw))


@given(st.binary(min_size=32, max_size=32))
def test_key_encodings_round_trip(raw: bytes) -> None:
    assert keys.from_base64(keys.to_base64(raw)) == raw
    assert keys.from_hex(keys.to_hex(raw)) == raw
    assert keys.to_base64(raw) == base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "text", ["", "not base64!", "AAAA", base64.b64encode(b"x" * 31).decode(), "é" * 44]
)
def test_bad_base64_keys_are_refused_without_echo(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        keys.from_base64(text)
    assert text == "" or text not in str(e.value)


def test_private_key_repr_hides_the_secret() -> None:
    k = keys.PrivateKey(ALICE_PRIV)
    for shown in (repr(k), str(k), f"{k}", repr([k]), repr({"k": k})):
        assert ALICE_PRIV.hex() not in shown and b64(ALICE_PRIV) not in shown
        assert b64(ALICE_PUB) in shown
    assert k == keys.PrivateKey(ALICE_PRIV) and k != keys.PrivateKey(BOB_PRIV)
    with pytest.raises(TypeError):
        pickle.dumps(k)
    update = make_update(private_key=ALICE_PRIV, listen_port=1)
    assert ALICE_PRIV.hex() not in repr(update) and str(list(ALICE_PRIV)) not in repr(update)
    psk = bytes(range(1, 33))
    peer = Peer(ALICE_PUB, preshared_key=psk)
    assert psk.hex() not in repr(peer) and b64(psk) not in repr(peer) and "<set>" in repr(peer)
    assert repr(psk) not in repr(PeerStatus(peer))


def test_key_file_is_created_0600_in_a_0700_dir(tmp_path: Path) -> None:
    old = os.umask(0)  # even a careless umask yields 0600 / 0700
    try:
        path = tmp_path / "keys" / "wg0.key"
        k = keys.load_or_create(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert text.endswith("\n") and keys.from_base64(text) == k.secret_bytes()
    assert keys.load_or_create(path) == k  # loaded, not replaced
    assert [p.name for p in path.parent.iterdir()] == ["wg0.key"]  # no temporary left


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wg0.key"
    keys.load_or_create(path)
    secret = path.read_text().strip()
    path.chmod(0o644)
    with pytest.raises(keys.KeyFileError) as e:
        keys.load_or_create(path)
    msg = str(e.value)
    assert str(path) in msg and "0644" in msg and "0600" in msg and "\n" not in msg
    assert secret not in msg
    assert path.read_text().strip() == secret  # refused, not repaired nor replaced
    path.chmod(0o640)
    with pytest.raises(keys.KeyFileError, match="0640"):
        keys.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello\n",
        b"A" * 44 + b"\n",
        base64.b64encode(b"k" * 16) + b"\n",
        b"\xff" * 44,
        b"x" * 1000,
    ],
)
def test_key_file_that_is_not_a_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(keys.KeyFileError) as e:
        keys.load_or_create(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == content


def test_key_file_creation_never_replaces_an_existing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wg0.key"
    real_link = os.link

    def racing_link(src: str, dst: str) -> None:  # another creator publishes first
        if not os.path.exists(dst):
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, (WG_PRIV + "\n").encode())
            os.close(fd)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert keys.load_or_create(path) == keys.PrivateKey.from_base64(WG_PRIV)
    assert [p.name for p in tmp_path.iterdir()] == ["wg0.key"]


# ---- model ------------------------------------------------------------------------------


def test_allowed_ips_are_canonical_sorted_and_unique() -> None:
    p = Peer(key(1), ("fd00:0:0::/64", "10.1.0.0/16", "10.0.0.0/8", "10.1.0.0/16", "10.0.0.5/32"))
    assert p.allowed_ips == ("10.0.0.0/8", "10.0.0.5/32", "10.1.0.0/16", "fd00::/64")
    assert Peer(key(1), ("10.0.0.5",)).allowed_ips == ("10.0.0.5/32",)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("10.0.0.1/24", "host bits set"),
        ("10.0.0.0/33", "not an IPv4 or IPv6 network"),
        ("fe80::/64%eth0", "not an IPv4 or IPv6 network"),
        ("host.example/32", "not an IPv4 or IPv6 network"),
        (" 10.0.0.0/8", "not an IPv4 or IPv6 network"),
    ],
)
def test_bad_allowed_ips_are_refused(value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Peer(key(1), (value,))


def test_allowed_ips_must_be_a_sequence() -> None:
    with pytest.raises(ConfigError, match="not a single string"):
        Peer(key(1), "10.0.0.0/8")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("198.51.100.7:51820", "198.51.100.7:51820"),
        ("[2001:db8:0::1]:1", "[2001:db8::1]:1"),
        ("[::ffff:10.0.0.1]:65535", "[::ffff:a00:1]:65535"),
    ],
)
def test_endpoints_are_canonical(value: str, canonical: str) -> None:
    assert Peer(key(1), endpoint=value).endpoint == canonical


@pytest.mark.parametrize(
    "value",
    [
        "vpn.example:51820",
        "2001:db8::1:51820",
        "[2001:db8::1]",
        "198.51.100.7",
        "198.51.100.7:0",
        "198.51.100.7:65536",
        "198.51.100.7:+5",
        "[fe80::1%eth0]:5",
        "[198.51.100.7]:5",
        ":51820",
    ],
)
def test_bad_endpoints_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="endpoint"):
        Peer(key(1), endpoint=value)


def test_peer_off_values_are_none() -> None:
    p = Peer(key(1), persistent_keepalive=0, preshared_key=ZERO_KEY)
    assert p.persistent_keepalive is None and p.preshared_key is None
    with pytest.raises(ConfigError):
        Peer(key(1), persistent_keepalive=70000)
    with pytest.raises(ConfigError, match="32 raw bytes"):
        Peer(b"short")
    with pytest.raises(ConfigError, match="all zeros"):
        Peer(ZERO_KEY)


def test_make_update_refuses_ambiguous_changes() -> None:
    a, b = Peer(key(1), ("10.0.0.1/32",)), Peer(key(2), ("10.0.0.1/32",))
    with pytest.raises(ConfigError, match="given to two peers"):
        make_update(upsert=[a, b])
    with pytest.raises(ConfigError, match="given twice"):
        make_update(upsert=[a, Peer(key(1))])
    with pytest.raises(ConfigError, match="both upserted and removed"):
        make_update(upsert=[a], remove=[key(1)])
    with pytest.raises(ConfigError, match="sequences"):
        make_update(upsert=a)  # type: ignore[arg-type]
    assert make_update(remove=[key(3), key(3)]).remove == (key(3),)
    assert make_update(listen_port=0).listen_port is None  # "any port": leave it


def test_diff_keeps_peers_that_are_right_and_accepts_learned_endpoints() -> None:
    observed = {
        key(1): PeerStatus(Peer(key(1), ("10.0.0.1/32",), "198.51.100.9:4000")),  # learned
        key(2): PeerStatus(Peer(key(2), ("10.0.0.2/32",))),
        key(3): PeerStatus(Peer(key(3), ("10.0.0.3/32",))),
    }
    want = [
        Peer(key(1), ("10.0.0.1/32",)),  # endpoint None: whatever it learned is fine
        Peer(key(2), ("10.0.0.2/32", "10.1.0.0/16")),
        Peer(key(4), ("10.0.0.4/32",)),
    ]
    upsert, remove = diff_peers(want, observed)
    assert [p.public_key for p in upsert] == [key(2), key(4)] and remove == [key(3)]
    assert needs_update(Peer(key(1), endpoint="198.51.100.1:1"), observed[key(1)].peer)


# ---- UAPI -----------------------------------------------------------------------------------


def test_uapi_set_request_text() -> None:
    update = make_update(
        private_key=ALICE_PRIV,
        listen_port=51820,
        fwmark=0,
        remove=[key(9)],
        upsert=[
            Peer(
                BOB_PUB, ("10.0.0.2/32", "fd00::2/128"), "[2001:db8::2]:51820", 25, bytes(range(32))
            )
        ],
    )
    assert uapi.build_set(update).decode() == (
        "set=1\n"
        f"private_key={ALICE_PRIV.hex()}\n"
        "listen_port=51820\n"
        "fwmark=0\n"
        f"public_key={key(9).hex()}\n"
        "remove=true\n"
        f"public_key={BOB_PUB.hex()}\n"
        f"preshared_key={bytes(range(32)).hex()}\n"
        "endpoint=[2001:db8::2]:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.0.0.2/32\n"
        "allowed_ip=fd00::2/128\n"
        "\n"
    )
    # an upsert turns off what is not given; replace_peers for a full set
    full = uapi.build_set(make_update(replace_peers=True, upsert=[Peer(key(1))])).decode()
    assert full == (
        f"set=1\nreplace_peers=true\npublic_key={key(1).hex()}\npreshared_key={'0' * 64}\n"
        "persistent_keepalive_interval=0\nreplace_allowed_ips=true\n\n"
    )


# An answer as wireguard-go 0.0.20220316 gives it (peer order: its own).
REAL_GET = (
    "private_key=3033333333333333333333333333333333333333333333333333333333333373\n"
    "listen_port=53333\n"
    "fwmark=7\n"
    f"public_key={'11' * 32}\n"
    f"preshared_key={'00' * 32}\n"
    "protocol_version=1\n"
    "endpoint=[fd00::1]:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=92\n"
    "rx_bytes=180\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=fd00::/64\n"
    "allowed_ip=10.1.0.0/16\n"
    "some_future_key=whatever\n"
    f"public_key={'22' * 32}\n"
    f"preshared_key={'ab' * 32}\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "errno=0\n\n"
)


def test_uapi_parse_real_get_answer() -> None:
    dev = uapi.parse_get("wg0", uapi.split_lines(REAL_GET.encode()))
    secret = bytes.fromhex("30" + "33" * 30 + "73")
    assert dev == Device(
        "wg0",
        keys.public_of(secret),
        53333,
        7,
        {
            b"\x11" * 32: PeerStatus(
                Peer(b"\x11" * 32, ("10.1.0.0/16", "fd00::/64"), "[fd00::1]:51820", 25),
                1700000000.5,
                180,
                92,
            ),
            b"\x22" * 32: PeerStatus(Peer(b"\x22" * 32, preshared_key=b"\xab" * 32)),
        },
    )


def _big_answer(peers: int, ips_per_peer: int = 1) -> tuple[bytes, dict[bytes, PeerStatus]]:
    out = [f"private_key={ALICE_PRIV.hex()}", "listen_port=51820"]
    want = {}
    for i in range(peers):
        pk = key(i)
        ips = [
            str(ipaddress.ip_network((0x0A000000 + i * ips_per_peer + j, 32)))
            for j in range(ips_per_peer)
        ]
        out += [f"public_key={pk.hex()}", f"preshared_key={'0' * 64}", "protocol_version=1"]
        out += [f"endpoint=172.31.{i // 250}.{i % 250 + 1}:51820", "last_handshake_time_sec=0"]
        out += [
            "last_handshake_time_nsec=0",
            f"tx_bytes={i}",
            f"rx_bytes={2 * i}",
            "persistent_keepalive_interval=0",
        ]
        out += [f"allowed_ip={ip}" for ip in ips]
        want[pk] = PeerStatus(
            Peer(pk, tuple(ips), f"172.31.{i // 250}.{i % 250 + 1}:51820"), None, 2 * i, i
        )
    return ("\n".join([*out, "errno=0", "", ""])).encode(), want


def test_uapi_parses_5000_peers_fed_in_random_chunks() -> None:
    data, want = _big_answer(5000)
    reader = uapi.ResponseReader()
    rnd = __import__("random").Random(5)
    pos = 0
    done = False
    while not done:
        step = rnd.randint(1, 70000)
        done = reader.feed(data[pos : pos + step])
        pos += step
    assert pos >= len(data)
    dev = uapi.parse_get("hub", reader.lines())
    assert len(dev.peers) == 5000 and dev.peers == want


def test_uapi_parses_peers_with_many_allowed_ips() -> None:
    data, want = _big_answer(20, ips_per_peer=600)
    dev = uapi.parse_get("hub", uapi.split_lines(data))
    assert dev.peers == want and all(len(s.peer.allowed_ips) == 600 for s in dev.peers.values())


def test_uapi_errno_is_raised_with_its_number() -> None:
    with pytest.raises(DeviceError) as e:
        uapi.check_errno(uapi.split_lines(b"errno=-22\n\n"), "set wg0")
    assert e.value.errno == 22 and "Invalid argument" in str(e.value)
    assert uapi.check_errno(uapi.split_lines(b"errno=0\n\n"), "set wg0") == []
    with pytest.raises(DeviceError):
        uapi.parse_get("wg0", uapi.split_lines(b"listen_port=1\nerrno=1\n\n"))


SECRET_LINE = f"private_key={'5a' * 32}"


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"listen_port=1\n\n", "does not end with errno"),
        (b"listen_port\nerrno=0\n\n", "not key=value"),
        (b"listen_port=x\nerrno=0\n\n", "not a number"),
        (b"listen_port=70000\nerrno=0\n\n", "out of range"),
        (b"errno=zero\n\n", "not a number"),
        (f"public_key={'11' * 31}\nerrno=0\n\n".encode(), "not a hex key"),
        (f"public_key={'zz' * 32}\nerrno=0\n\n".encode(), "not a hex key"),
        (f"public_key={'11' * 32}\npublic_key={'11' * 32}\nerrno=0\n\n".encode(), "listed twice"),
        (
            f"public_key={'11' * 32}\nallowed_ip=10.0.0.1/8\nerrno=0\n\n".encode(),
            "reported invalid",
        ),
        (f"public_key={'11' * 32}\n{SECRET_LINE}\nerrno=0\n\n".encode(), "inside a peer"),
        (f"{SECRET_LINE[:-1]}\nerrno=0\n\n".encode(), "not a hex key"),
        (b"errno=0\nlisten_port=1\n\n", "does not end with errno"),
    ],
)
def test_uapi_malformed_answers_are_refused_cleanly(answer: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as e:
        uapi.parse_get("wg0", uapi.split_lines(answer))
    assert "5a5a5a5a" not in str(e.value)  # never echo what could be a key


def test_uapi_reader_bounds() -> None:
    with pytest.raises(ProtocolError, match="longer than"):
        uapi.ResponseReader().feed(b"x" * 5000)  # refused before the line ends
    r = uapi.ResponseReader()
    r.feed(b"a=" + b"x" * 4000)
    with pytest.raises(ProtocolError, match="longer than"):
        r.feed(b"x" * 200 + b"\n")
    small = uapi.ResponseReader(max_response=1000)
    with pytest.raises(ProtocolError, match="larger than"):
        for _ in range(100):
            small.feed(b"k=v\n" * 10)
    with pytest.raises(ProtocolError, match="after the end"):
        uapi.ResponseReader().feed(b"errno=0\n\nerrno=0\n\n")
    with pytest.raises(ProtocolError, match="empty answer"):
        uapi.ResponseReader().feed(b"\n")
    with pytest.raises(ProtocolError, match="not ASCII"):
        uapi.split_lines("k=é\nerrno=0\n\n".encode())
    with pytest.raises(ProtocolError, match="without its blank line"):
        uapi.split_lines(b"errno=0\n")
    r = uapi.ResponseReader()
    assert not r.feed(b"errno=0\n") and r.feed(b"\n") and r.lines() == ["errno=0"]


class FakeUapiDevice:
    """wireguard-go's UAPI semantics, enough to close the loop in tests."""

    def __init__(self) -> None:
        self.private: bytes | None = None
        self.port = 0
        self.fwmark = 0
        self.peers: dict[bytes, dict] = {}

    def apply(self, request: bytes) -> bytes:
        text = request.decode()
        assert text.startswith("set=1\n") and text.endswith("\n\n")
        peer: dict | None = None
        for line in text[6:-2].split("\n") if text != "set=1\n\n" else []:
            k, _, v = line.partition("=")
            if k == "public_key":
                pk = bytes.fromhex(v)
                peer = self.peers.setdefault(pk, {"psk": ZERO_KEY, "ep": None, "ka": 0, "ips": []})
                peer["key"] = pk
            elif peer is None:
                if k == "private_key":
                    self.private = bytes.fromhex(v)
                elif k == "listen_port":
                    self.port = int(v)
                elif k == "fwmark":
                    self.fwmark = int(v)
                elif k == "replace_peers":
                    self.peers.clear()
                else:
                    return b"errno=-22\n\n"
            elif k == "remove":
                del self.peers[peer["key"]]
            elif k == "preshared_key":
                peer["psk"] = bytes.fromhex(v)
            elif k == "endpoint":
                peer["ep"] = v
            elif k == "persistent_keepalive_interval":
                peer["ka"] = int(v)
            elif k == "replace_allowed_ips":
                peer["ips"] = []
            elif k == "allowed_ip":
                for other in self.peers.values():
                    if v in other["ips"]:
                        other["ips"].remove(v)
                peer["ips"].append(v)
            else:
                return b"errno=-22\n\n"
        return b"errno=0\n\n"

    def get(self) -> bytes:
        out = []
        if self.private:
            out.append(f"private_key={self.private.hex()}")
        if self.port:
            out.append(f"listen_port={self.port}")
        if self.fwmark:
            out.append(f"fwmark={self.fwmark}")
        for pk, p in self.peers.items():
            out += [
                f"public_key={pk.hex()}",
                f"preshared_key={p['psk'].hex()}",
                "protocol_version=1",
            ]
            if p["ep"]:
                out.append(f"endpoint={p['ep']}")
            out += [
                "last_handshake_time_sec=0",
                "last_handshake_time_nsec=0",
                "tx_bytes=0",
                "rx_bytes=0",
            ]
            out.append(f"persistent_keepalive_interval={p['ka']}")
            out += [f"allowed_ip={ip}" for ip in reversed(p["ips"])]  # order is the device's
        return "\n".join([*out, "errno=0", "", ""]).encode()


# ---- Hypothesis strategies ------------------------------------------------------------

keys_st = st.binary(min_size=32, max_size=32).filter(lambda k: k != ZERO_KEY)
v4_nets = st.builds(
    lambda a, n: str(ipaddress.ip_network((a, n), strict=False)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_nets = st.builds(
    lambda a, n: str(ipaddress.ip_network((a, n), strict=False)),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
endpoints = st.one_of(
    st.none(),
    st.builds(
        lambda a, p: f"{ipaddress.IPv4Address(a)}:{p}",
        st.integers(0, 2**32 - 1),
        st.integers(1, 65535),
    ),
    st.builds(
        lambda a, p: f"[{ipaddress.IPv6Address(a)}]:{p}",
        st.integers(0, 2**128 - 1),
        st.integers(1, 65535),
    ),
)


@st.composite
def peer_lists(draw: st.DrawFn, max_peers: int = 8, max_ips: int = 12) -> list[Peer]:
    pks = draw(st.lists(keys_st, max_size=max_peers, unique=True))
    taken: set[str] = set()
    peers = []
    for pk in pks:
        ips = [
            ip
            for ip in draw(st.lists(st.one_of(v4_nets, v6_nets), max_size=max_ips))
            if ip not in taken
        ]
        taken.update(ips)
        peers.append(
            Peer(
                pk,
                tuple(ips),
                draw(endpoints),
                draw(st.one_of(st.none(), st.integers(1, 65535))),
                draw(st.one_of(st.none(), keys_st)),
            )
        )
    return peers


configs = st.fixed_dictionaries(
    {
        "private_key": st.one_of(st.none(), keys_st),
        "listen_port": st.one_of(st.none(), st.integers(1, 65535)),
        "fwmark": st.one_of(st.none(), st.integers(1, 2**32 - 1)),
        "peers": peer_lists(),
    }
)


def expected_device(cfg: dict) -> Device:
    pub = keys.public_of(cfg["private_key"]) if cfg["private_key"] else None
    return Device(
        "wg0",
        pub,
        cfg["listen_port"],
        cfg["fwmark"],
        {p.public_key: PeerStatus(p) for p in cfg["peers"]},
    )


def full_update(cfg: dict) -> Update:
    return make_update(
        private_key=cfg["private_key"],
        listen_port=cfg["listen_port"],
        fwmark=cfg["fwmark"],
        replace_peers=True,
        upsert=cfg["peers"],
    )


@given(configs)
def test_uapi_round_trip(cfg: dict) -> None:
    """config -> set request -> simulated device -> get answer -> parsed == config"""
    dev = FakeUapiDevice()
    assert dev.apply(uapi.build_set(full_update(cfg))) == b"errno=0\n\n"
    assert uapi.parse_get("wg0", uapi.split_lines(dev.get())) == expected_device(cfg)


# ---- UAPI socket I/O (a local fake daemon) ----------------------------------------------


@pytest.fixture
def uapi_server(tmp_path: Path) -> Iterator[tuple[str, list, list]]:
    """A unix socket answering with the scripted `answers` (list of chunk lists);
    what it received goes to `requests`."""
    path = str(tmp_path / "wg0.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    srv.settimeout(0.02)
    answers: list = []
    requests: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                req = b""
                while not req.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    req += chunk
                requests.append(req)
                for chunk in answers.pop(0) if answers else []:
                    if chunk is None:
                        time.sleep(0.3)  # a hung daemon
                        continue
                    conn.sendall(chunk)
                    time.sleep(0.002)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, answers, requests
    stop.set()
    t.join(2)
    srv.close()


def test_uapi_transact_reads_a_chunked_answer(uapi_server: tuple[str, list, list]) -> None:
    path, answers, requests = uapi_server
    data, want = _big_answer(300)
    answers.append([data[i : i + 1000] for i in range(0, len(data), 1000)])
    lines = uapi.transact(path, uapi.GET, timeout=5)
    assert uapi.parse_get("hub", lines).peers == want
    assert requests == [b"get=1\n\n"]


def test_uapi_transact_fails_cleanly(uapi_server: tuple[str, list, list], tmp_path: Path) -> None:
    path, answers, _ = uapi_server
    answers.append([b"listen_port=1\n"])  # then closes
    with pytest.raises(ProtocolError, match="closed before the end"):
        uapi.transact(path, uapi.GET, timeout=5)
    answers.append([b"listen_port=1\n", None])
    with pytest.raises(ProtocolError, match=r"within 0\.2 s"):
        uapi.transact(path, uapi.GET, timeout=0.2)
    with pytest.raises(FileNotFoundError):
        uapi.transact(str(tmp_path / "nothing.sock"), uapi.GET, timeout=1)


# ---- netlink basics ------------------------------------------------------------------


def test_netlink_attributes_round_trip_and_reject_truncation() -> None:
    data = nl.attr_u16(1, 7) + nl.attr_str(2, "wg0") + nl.nested(3, nl.attr_u64(1, 2**40))
    parsed = list(nl.iter_attrs(data))
    assert [k for k, _ in parsed] == [1, 2, 3]
    assert nl.u16(parsed[0][1]) == 7 and nl.string(parsed[1][1]) == "wg0"
    assert nl.u64(next(nl.iter_attrs(parsed[2][1]))[1]) == 2**40
    with pytest.raises(nl.MalformedMessage):
        list(nl.iter_attrs(data[:-3]))
    with pytest.raises(nl.MalformedMessage):
        list(nl.iter_attrs(struct.pack("=HH", 2, 1)))
    msg = nl.genl_message(FAMILY, 1, 1, nl.NLM_F_REQUEST, 0, data)
    (m,) = nl.iter_messages(nl.with_seq(msg, 77) + b"")
    assert (m.type, m.seq, bytes(nl.genl_attrs(m))) == (FAMILY, 77, data)
    with pytest.raises(nl.MalformedMessage):
        list(nl.iter_messages(msg[:-1]))


def _error(code: int, request: bytes, text: str = "") -> bytes:
    tlvs = nl.attr_str(nl.NLMSGERR_ATTR_MSG, text) if text else b""
    flags = (nl.NLM_F_ACK_TLVS if text else 0) | nl.NLM_F_CAPPED
    return nl.message(nl.NLMSG_ERROR, flags, 0, struct.pack("=i", -code) + request[:16] + tlvs)


def test_netlink_errors_carry_the_kernel_text() -> None:
    req = nl.build_get_family("wireguard", 0)
    (m,) = nl.iter_messages(_error(2, req, "no such family"))
    err = nl.parse_error(m)
    assert err is not None and err.errno == 2 and "no such family" in str(err)
    (ack,) = nl.iter_messages(_error(0, req))
    assert nl.parse_error(ack) is None
    reply = nl.genl_message(
        nl.GENL_ID_CTRL,
        1,
        2,
        0,
        0,
        nl.attr_u16(nl.CTRL_ATTR_FAMILY_ID, 0x1B) + nl.attr_str(2, "wireguard"),
    )
    assert nl.parse_family_id(next(nl.iter_messages(reply))) == 0x1B


def test_rtnetlink_link_messages() -> None:
    (m,) = nl.iter_messages(nl.build_new_link("wg0", "wireguard", 5))
    assert m.type == nl.RTM_NEWLINK and m.flags & nl.NLM_F_CREATE and m.flags & nl.NLM_F_EXCL
    assert nl.parse_link(m)[1:] == ("wg0", "wireguard")
    (d,) = nl.iter_messages(nl.build_del_link(7, 1))
    assert d.type == nl.RTM_DELLINK and nl.IFINFO.unpack_from(d.payload)[2] == 7


# ---- kernel genetlink messages (message level: the kernel module cannot run here) -----


def _peer_attrs(data: memoryview) -> dict[int, list[memoryview]]:
    out: dict[int, list[memoryview]] = {}
    for k, v in nl.iter_attrs(data):
        out.setdefault(k, []).append(v)
    return out


class FakeKernel:
    """One WireGuard device as drivers/net/wireguard/netlink.c handles it."""

    def __init__(self, name: str = "wg0") -> None:
        self.name = name
        self.private: bytes | None = None
        self.port = 0
        self.fwmark = 0
        self.peers: dict[bytes, dict] = {}
        self.owner: dict[str, bytes] = {}
        self.messages: list[bytes] = []

    # WG_CMD_SET_DEVICE
    def apply(self, data: bytes) -> None:
        self.messages.append(data)
        (m,) = nl.iter_messages(data)
        assert m.type == FAMILY and m.flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
        assert nl.GENL_HDR.unpack_from(m.payload)[:2] == (kernel.WG_CMD_SET_DEVICE, 1)
        attrs = _peer_attrs(nl.genl_attrs(m))
        assert nl.string(attrs[kernel.WGDEVICE_A_IFNAME][0]) == self.name
        if kernel.WGDEVICE_A_FLAGS in attrs and nl.u32(attrs[kernel.WGDEVICE_A_FLAGS][0]) & 1:
            self.peers.clear()
        if kernel.WGDEVICE_A_PRIVATE_KEY in attrs:
            self.private = bytes(attrs[kernel.WGDEVICE_A_PRIVATE_KEY][0])
        if kernel.WGDEVICE_A_LISTEN_PORT in attrs:
            self.port = nl.u16(attrs[kernel.WGDEVICE_A_LISTEN_PORT][0])
        if kernel.WGDEVICE_A_FWMARK in attrs:
            self.fwmark = nl.u32(attrs[kernel.WGDEVICE_A_FWMARK][0])
        for peers in attrs.get(kernel.WGDEVICE_A_PEERS, []):
            for _, entry in nl.iter_attrs(peers):
                self._set_peer(_peer_attrs(entry))

    def _set_peer(self, a: dict[int, list[memoryview]]) -> None:
        pk = bytes(a[kernel.WGPEER_A_PUBLIC_KEY][0])
        flags = nl.u32(a[kernel.WGPEER_A_FLAGS][0]) if kernel.WGPEER_A_FLAGS in a else 0
        if flags & kernel.WGPEER_F_REMOVE_ME:
            self.peers.pop(pk, None)
            return
        p = self.peers.setdefault(
            pk, {"psk": ZERO_KEY, "ep": None, "ka": 0, "ips": [], "rx": 0, "tx": 0}
        )
        if kernel.WGPEER_A_PRESHARED_KEY in a:
            p["psk"] = bytes(a[kernel.WGPEER_A_PRESHARED_KEY][0])
        if kernel.WGPEER_A_ENDPOINT in a:
            p["ep"] = bytes(a[kernel.WGPEER_A_ENDPOINT][0])
        if kernel.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL in a:
            p["ka"] = nl.u16(a[kernel.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL][0])
        if flags & kernel.WGPEER_F_REPLACE_ALLOWEDIPS:
            p["ips"] = []
        for ips in a.get(kernel.WGPEER_A_ALLOWEDIPS, []):
            for _, ip in nl.iter_attrs(ips):
                cidr = kernel.decode_allowed_ip(ip)
                old = self.owner.get(cidr)
                if old is not None and old in self.peers and cidr in self.peers[old]["ips"]:
                    self.peers[old]["ips"].remove(cidr)  # an allowed-ip has one peer
                self.owner[cidr] = pk
                p["ips"].append(cidr)

    # WG_CMD_GET_DEVICE: the dump, cut where a `limit`-byte message is full
    def dump(self, limit: int, *, pad: bool = False, intr_at: int | None = None) -> list[bytes]:
        room = limit - nl.NLMSG_HDR.size - nl.GENL_HDR.size
        order = list(self.peers)
        messages: list[bytes] = []
        cursor, next_ip = 0, None
        while True:
            body = b""
            if not messages:
                body += nl.attr_u16(kernel.WGDEVICE_A_LISTEN_PORT, self.port)
                body += nl.attr_u32(kernel.WGDEVICE_A_FWMARK, self.fwmark)
                body += nl.attr_u32(kernel.WGDEVICE_A_IFINDEX, 4) + nl.attr_str(
                    kernel.WGDEVICE_A_IFNAME, self.name
                )
                if self.private:
                    body += nl.attr(kernel.WGDEVICE_A_PRIVATE_KEY, self.private)
                    body += nl.attr(kernel.WGDEVICE_A_PUBLIC_KEY, keys.public_of(self.private))
            entries, used, done = [], len(body) + nl.NLA_HDR.size, True
            while cursor < len(order):
                entry, next_ip = self._peer_entry(order[cursor], next_ip, room - used, pad)
                if entry is None:  # not even its head fits: next message
                    done = False
                    break
                entries.append(entry)
                used += len(entry)
                if next_ip is not None:  # allowed-ips continue in the next message
                    done = False
                    break
                cursor += 1
            assert entries or done or not messages, "no progress: limit too small"
            if entries:
                body += nl.nested(kernel.WGDEVICE_A_PEERS, b"".join(entries))
            assert len(body) <= room
            flags = nl.NLM_F_MULTI | (nl.NLM_F_DUMP_INTR if intr_at == len(messages) else 0)
            messages.append(nl.genl_message(FAMILY, kernel.WG_CMD_GET_DEVICE, 1, flags, 0, body))
            if done:
                return [
                    *messages,
                    nl.message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 0, struct.pack("=i", 0)),
                ]

    def _peer_entry(
        self, pk: bytes, start: int | None, room: int, pad: bool
    ) -> tuple[bytes | None, int | None]:
        p = self.peers[pk]
        head = nl.attr(kernel.WGPEER_A_PUBLIC_KEY, pk)
        if start is None:
            u64pad = nl.attr(0, b"") if pad else b""  # nla_put_u64_64bit's padding
            head += nl.attr(kernel.WGPEER_A_PRESHARED_KEY, p["psk"])
            head += nl.attr(kernel.WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", 0, 0))
            head += nl.attr_u16(kernel.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, p["ka"])
            head += u64pad + nl.attr_u64(kernel.WGPEER_A_TX_BYTES, p["tx"])
            head += u64pad + nl.attr_u64(kernel.WGPEER_A_RX_BYTES, p["rx"])
            head += nl.attr_u32(kernel.WGPEER_A_PROTOCOL_VERSION, 1)
            if p["ep"]:
                head += nl.attr(kernel.WGPEER_A_ENDPOINT, p["ep"])
        ips = p["ips"][start or 0 :]
        if nl.NLA_HDR.size + len(head) + (nl.NLA_HDR.size if ips else 0) > room:
            return None, start
        if not ips:
            return nl.nested(0, head), None
        left = room - 2 * nl.NLA_HDR.size - len(head)
        taken = []
        for ip in ips:
            enc = kernel.encode_allowed_ip(ip)
            if len(enc) > left:
                break
            taken.append(enc)
            left -= len(enc)
        entry = nl.nested(0, head + nl.nested(kernel.WGPEER_A_ALLOWEDIPS, b"".join(taken)))
        rest = (start or 0) + len(taken)
        return entry, (rest if rest < len(p["ips"]) else None)


def _peer(i: int, ips: int = 1, *, v6: bool = False) -> Peer:
    base = 0xFD00 << 112 if v6 else 0x0A000000
    nets = [
        str(ipaddress.ip_network((base + (i << 12) + j, 128 if v6 else 32))) for j in range(ips)
    ]
    return Peer(key(i), tuple(nets), f"172.31.{i % 250}.1:{51820 + i % 100}", 25 if i % 2 else None)


def test_kernel_set_device_small_message_fields() -> None:
    psk = bytes(range(1, 33))
    update = make_update(
        private_key=ALICE_PRIV,
        listen_port=51820,
        fwmark=0,
        remove=[key(7)],
        upsert=[Peer(BOB_PUB, ("10.0.0.2/32", "fd00::/64"), "[2001:db8::1]:51820", 25, psk)],
    )
    (msg,) = kernel.build_set_device(FAMILY, "wg0", update)
    (m,) = nl.iter_messages(msg)
    a = _peer_attrs(nl.genl_attrs(m))
    assert bytes(a[kernel.WGDEVICE_A_PRIVATE_KEY][0]) == ALICE_PRIV
    assert nl.u16(a[kernel.WGDEVICE_A_LISTEN_PORT][0]) == 51820
    assert nl.u32(a[kernel.WGDEVICE_A_FWMARK][0]) == 0
    assert kernel.WGDEVICE_A_FLAGS not in a  # no replace-peers in an incremental set
    removed, upserted = [_peer_attrs(e) for _, e in nl.iter_attrs(a[kernel.WGDEVICE_A_PEERS][0])]
    assert nl.u32(removed[kernel.WGPEER_A_FLAGS][0]) == kernel.WGPEER_F_REMOVE_ME
    assert nl.u32(upserted[kernel.WGPEER_A_FLAGS][0]) == kernel.WGPEER_F_REPLACE_ALLOWEDIPS
    assert bytes(upserted[kernel.WGPEER_A_PRESHARED_KEY][0]) == psk
    assert kernel.decode_endpoint(upserted[kernel.WGPEER_A_ENDPOINT][0]) == "[2001:db8::1]:51820"
    assert len(upserted[kernel.WGPEER_A_ENDPOINT][0]) == 28  # a sockaddr_in6
    ips = [
        kernel.decode_allowed_ip(v)
        for _, v in nl.iter_attrs(upserted[kernel.WGPEER_A_ALLOWEDIPS][0])
    ]
    assert ips == ["10.0.0.2/32", "fd00::/64"]
    # nested attributes carry NLA_F_NESTED, as wg(8) sends them
    assert struct.unpack_from("=H", bytes(a[kernel.WGDEVICE_A_PEERS][0]), 2)[0] & nl.NLA_F_NESTED


def test_kernel_endpoint_sockaddrs() -> None:
    raw = kernel.encode_endpoint("198.51.100.7:51820")
    assert (
        len(raw) == 16
        and raw[2:4] == struct.pack("!H", 51820)
        and raw[4:8] == bytes([198, 51, 100, 7])
    )
    assert kernel.decode_endpoint(raw) == "198.51.100.7:51820"
    assert kernel.decode_endpoint(struct.pack("=H", 0) + bytes(14)) is None


def test_kernel_set_device_splits_many_peers_like_wg() -> None:
    fake = FakeKernel()
    peers = [_peer(i, v6=i % 3 == 0) for i in range(500)]
    msgs = kernel.build_set_device(
        FAMILY,
        "wg0",
        make_update(private_key=ALICE_PRIV, replace_peers=True, upsert=peers, remove=[key(9999)]),
    )
    assert len(msgs) > 5 and all(len(m) <= kernel.SET_LIMIT for m in msgs)
    for i, m in enumerate(msgs):
        a = _peer_attrs(nl.genl_attrs(next(nl.iter_messages(m))))
        # device attributes and replace-peers only in the first message
        assert (kernel.WGDEVICE_A_FLAGS in a) == (kernel.WGDEVICE_A_PRIVATE_KEY in a) == (i == 0)
    fake.peers[key(12345)] = {
        "psk": ZERO_KEY,
        "ep": None,
        "ka": 0,
        "ips": ["10.9.9.9/32"],
        "rx": 0,
        "tx": 0,
    }
    for m in msgs:
        fake.apply(m)
    dev = kernel.parse_get_device("wg0", FAMILY, fake.dump(16384))
    assert dev.peers == {p.public_key: PeerStatus(p) for p in peers}


def test_kernel_set_device_continues_a_peers_allowed_ips_without_its_flags() -> None:
    big = _peer(1, ips=1000, v6=True)
    update = make_update(upsert=[_peer(0), big, _peer(2)])
    msgs = kernel.build_set_device(FAMILY, "wg0", update)
    assert len(msgs) >= 10 and all(len(m) <= 4096 for m in msgs)
    continuations = 0
    for m in msgs[1:]:
        entries = [
            _peer_attrs(e)
            for _, e in nl.iter_attrs(
                _peer_attrs(nl.genl_attrs(next(nl.iter_messages(m))))[kernel.WGDEVICE_A_PEERS][0]
            )
        ]
        first = entries[0]
        if bytes(first[kernel.WGPEER_A_PUBLIC_KEY][0]) == big.public_key:
            continuations += 1
            assert set(first) == {kernel.WGPEER_A_PUBLIC_KEY, kernel.WGPEER_A_ALLOWEDIPS}
    assert continuations >= 9
    fake = FakeKernel()
    fake.peers[big.public_key] = {
        "psk": ZERO_KEY,
        "ep": None,
        "ka": 0,
        "ips": ["10.7.0.0/16"],
        "rx": 0,
        "tx": 0,
    }
    for m in msgs:
        fake.apply(m)
    assert sorted(fake.peers[big.public_key]["ips"]) == sorted(
        big.allowed_ips
    )  # the old one replaced


def test_kernel_set_device_without_changes_is_one_probe_message() -> None:
    (m,) = kernel.build_set_device(FAMILY, "wg0", Update())
    assert list(_peer_attrs(nl.genl_attrs(next(nl.iter_messages(m))))) == [kernel.WGDEVICE_A_IFNAME]
    for limit in (100, 70000):
        with pytest.raises(ValueError, match="must be from"):
            kernel.build_set_device(FAMILY, "wg0", Update(), limit=limit)


def _device_of(fake: FakeKernel, peers: list[Peer]) -> Device:
    pub = keys.public_of(fake.private) if fake.private else None
    return Device(
        fake.name,
        pub,
        fake.port or None,
        fake.fwmark or None,
        {p.public_key: PeerStatus(p) for p in peers},
    )


def test_kernel_dump_of_a_large_device_is_merged_completely() -> None:
    fake = FakeKernel()
    peers = [_peer(i, ips=1 + (i % 7 == 0) * 40) for i in range(2000)]
    peers.append(_peer(5000, ips=900, v6=True))  # more allowed-ips than one message holds
    for m in kernel.build_set_device(
        FAMILY, "wg0", make_update(private_key=BOB_PRIV, listen_port=51820, upsert=peers)
    ):
        fake.apply(m)
    dump = fake.dump(4096, pad=True)
    assert len(dump) > 50
    # the big peer is cut: it opens a message again with only its key and allowed-ips
    cut = 0
    for chunk in dump[1:-1]:
        (message,) = nl.iter_messages(chunk)
        a = _peer_attrs(nl.genl_attrs(message))
        assert kernel.WGDEVICE_A_LISTEN_PORT not in a  # device attributes: first message only
        first = _peer_attrs(next(nl.iter_attrs(a[kernel.WGDEVICE_A_PEERS][0]))[1])
        if set(first) == {kernel.WGPEER_A_PUBLIC_KEY, kernel.WGPEER_A_ALLOWEDIPS}:
            cut += 1
    assert cut >= 5
    want = _device_of(fake, peers)
    assert kernel.parse_get_device("wg0", FAMILY, dump) == want
    # several messages per datagram parse the same
    assert kernel.parse_get_device("wg0", FAMILY, [b"".join(dump[:10]), *dump[10:]]) == want
    # reading only the first datagram must not pass for a (truncated) device
    with pytest.raises(ProtocolError, match="before NLMSG_DONE"):
        kernel.parse_get_device("wg0", FAMILY, dump[:1])


def test_kernel_dump_interrupted_is_flagged() -> None:
    fake = FakeKernel()
    for m in kernel.build_set_device(
        FAMILY, "wg0", make_update(upsert=[_peer(i) for i in range(200)])
    ):
        fake.apply(m)
    parser = kernel.DumpParser("wg0", FAMILY)
    for chunk in fake.dump(1024, intr_at=2):
        for message in nl.iter_messages(chunk):
            parser.feed(message)
    assert parser.done and parser.interrupted


def test_kernel_dump_errors() -> None:
    req = kernel.build_get_device(FAMILY, "wg0")
    with pytest.raises(DeviceNotFound, match="wg0"):
        kernel.parse_get_device("wg0", FAMILY, [_error(19, req)])  # ENODEV
    with pytest.raises(DeviceError, match="not a WireGuard interface"):
        kernel.parse_get_device("wg0", FAMILY, [_error(95, req)])  # EOPNOTSUPP
    with pytest.raises(DeviceError) as e:
        kernel.parse_get_device(
            "wg0", FAMILY, [nl.message(nl.NLMSG_DONE, 2, 0, struct.pack("=i", -12))]
        )
    assert e.value.errno == 12
    bad_peer = nl.nested(
        kernel.WGDEVICE_A_PEERS,
        nl.nested(0, nl.attr_u16(kernel.WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, 1)),
    )
    msg = nl.genl_message(FAMILY, 0, 1, nl.NLM_F_MULTI, 0, bad_peer)
    done = nl.message(nl.NLMSG_DONE, 2, 0, struct.pack("=i", 0))
    with pytest.raises(ProtocolError, match="without public key"):
        kernel.parse_get_device("wg0", FAMILY, [msg, done])
    short_key = nl.genl_message(
        FAMILY, 0, 1, 2, 0, nl.attr(kernel.WGDEVICE_A_PUBLIC_KEY, b"x" * 31)
    )
    with pytest.raises(ProtocolError, match="key attribute"):
        kernel.parse_get_device("wg0", FAMILY, [short_key, done])
    with pytest.raises(ProtocolError, match="unexpected message type"):
        kernel.parse_get_device("wg0", FAMILY, [nl.genl_message(FAMILY + 1, 0, 1, 2, 0, b""), done])


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(configs, st.integers(400, 4096), st.integers(400, 8192), st.booleans())
def test_kernel_round_trip(cfg: dict, set_limit: int, dump_limit: int, pad: bool) -> None:
    """config -> SET_DEVICE messages (split) -> simulated kernel -> fragmented dump -> parsed == config"""
    fake = FakeKernel()
    fake.peers[key(1)] = {
        "psk": ZERO_KEY,
        "ep": None,
        "ka": 0,
        "ips": [],
        "rx": 0,
        "tx": 0,
    }  # replaced away
    for m in kernel.build_set_device(FAMILY, "wg0", full_update(cfg), limit=set_limit):
        assert len(m) <= set_limit
        fake.apply(m)
    got = kernel.parse_get_device("wg0", FAMILY, fake.dump(dump_limit, pad=pad))
    assert got == expected_device(cfg)


# ---- both backends behave the same -------------------------------------------------------


class UapiOnFake(Backend):
    kind = "uapi-fake"

    def __init__(self) -> None:
        self.dev = FakeUapiDevice()
        self.sent: list[Update] = []

    def ensure(self, name: str) -> bool:
        return False

    def remove(self, name: str) -> None:
        pass

    def get(self, name: str) -> Device:
        return uapi.parse_get(name, uapi.split_lines(self.dev.get()))

    def _apply(self, name: str, update: Update) -> None:
        self.sent.append(update)
        uapi.check_errno(uapi.split_lines(self.dev.apply(uapi.build_set(update))), f"set {name}")


class KernelOnFake(Backend):
    kind = "kernel-fake"

    def __init__(self) -> None:
        self.dev = FakeKernel()
        self.sent: list[Update] = []

    def ensure(self, name: str) -> bool:
        return False

    def remove(self, name: str) -> None:
        pass

    def get(self, name: str) -> Device:
        return kernel.parse_get_device(name, FAMILY, self.dev.dump(2048))

    def _apply(self, name: str, update: Update) -> None:
        self.sent.append(update)
        for m in kernel.build_set_device(FAMILY, name, update, limit=1024):
            self.dev.apply(m)


def _scenario(wg: Backend) -> list[Device]:
    seen = []
    wg.configure("wg0", private_key=keys.PrivateKey(ALICE_PRIV), listen_port=51820, fwmark=0x10)
    wg.replace_peers("wg0", [_peer(i, ips=3) for i in range(50)])
    seen.append(wg.get("wg0"))
    wg.set_peers(
        "wg0", upsert=[_peer(100), Peer(key(3), ("10.99.0.0/16",))], remove=[key(4), key(777)]
    )
    seen.append(wg.get("wg0"))
    wg.configure("wg0", private_key=ALICE_PRIV)  # port kept, fwmark off
    wg.replace_peers("wg0", [_peer(i, ips=3) for i in range(10)])
    seen.append(wg.get("wg0"))
    return seen


def test_both_backends_converge_to_the_same_devices() -> None:
    u, k = UapiOnFake(), KernelOnFake()
    a, b = _scenario(u), _scenario(k)
    assert a == b
    assert len(a[0].peers) == 50 and a[1].peers[key(3)].peer.allowed_ips == ("10.99.0.0/16",)
    assert key(4) not in a[1].peers and len(a[1].peers) == 50
    assert (a[2].listen_port, a[2].fwmark, len(a[2].peers)) == (51820, None, 10)
    assert u.sent == k.sent  # the same updates were sent to both


@pytest.mark.parametrize("backend", [UapiOnFake, KernelOnFake])
def test_both_backends_refuse_the_same_calls_before_any_io(backend: type[Backend]) -> None:
    wg = backend()
    bad_calls = [
        lambda: wg.set_peers("wg 0", [_peer(1)]),
        lambda: wg.set_peers("a" * 16, [_peer(1)]),
        lambda: wg.set_peers("../x", [_peer(1)]),
        lambda: wg.set_peers("wg0", [_peer(1), _peer(1)]),
        lambda: wg.set_peers("wg0", remove=[b"short"]),
        lambda: wg.replace_peers(
            "wg0", [Peer(key(1), ("10.0.0.1/32",)), Peer(key(2), ("10.0.0.1/32",))]
        ),
        lambda: wg.configure("wg0", private_key=b"x" * 31),
        lambda: wg.configure("wg0", private_key=ALICE_PRIV, listen_port=70000),
        lambda: wg.configure("wg0", private_key=ALICE_PRIV, fwmark=-1),
    ]
    for call in bad_calls:
        with pytest.raises(ConfigError):
            call()
    assert wg.sent == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", [UapiOnFake, KernelOnFake])
def test_incremental_and_replace_send_only_what_changed(backend: type[Backend]) -> None:
    wg = backend()
    peers = [_peer(i) for i in range(300)]
    wg.replace_peers("wg0", peers)
    wg.sent.clear()  # type: ignore[attr-defined]
    wg.replace_peers("wg0", peers)  # already right: nothing is sent
    wg.set_peers("wg0")  # nothing to do: no round trip
    assert wg.sent == []  # type: ignore[attr-defined]
    changed = Peer(key(5), ("10.55.0.0/16",))
    wg.replace_peers("wg0", [*peers[:5], changed, *peers[6:299]])
    assert wg.sent == [make_update(upsert=[changed], remove=[key(299)])]  # type: ignore[attr-defined]
    wg.replace_peers("wg0", peers[:3], reset=True)
    assert wg.sent[-1].replace_peers and len(wg.get("wg0").peers) == 3  # type: ignore[attr-defined]
