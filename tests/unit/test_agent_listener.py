"""The agents' listener over real TLS (OpenSSL through trio's SSLStream, on an
in-memory transport): who gets a conversation, and who gets nothing.

Refused, each with nothing granted: no client certificate; a certificate of
another CA; an expired one; a revoked one (and a live connection closed when
its certificate is revoked); a valid certificate from another machine's
address; a TLS 1.2 client; a client that never completes its handshake. The
control: the right certificate from its own machine's address gets the
controller's hello and an answer to its heartbeat.

Bounded, each against a control with the bound off or raised: an agent that
sends too fast, or renews twice within a minute, is told why and closed; a
status report too large is kept as its size only.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from common import wire
from controller.pki import ca, issue
from controller.sources import agents
from controller.sources.agentbook import ConfigBook
from controller.sources.agents import (
    MAX_REPORT,
    MESSAGE_BURST,
    Bucket,
    Listener,
    Peer,
    Refused,
    identify,
    kept_report,
    server_context,
)
from controller.store import Store

SERVER_NAME = "dom0.internal"
WEB1 = ("web1.x.internal", "dom0:slot/odd/1")
ADDRESSES = {"10.10.0.5": WEB1, "10.10.0.6": ("web2.x.internal", "dom0:slot/odd/2")}


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.now = datetime.now(UTC)
        self.store = Store(root / "state")
        past = self.now - timedelta(days=3)
        self.ca = ca.init(root / "state", self.store.db, "internal", past)
        self.ca.issue_server([SERVER_NAME], [], past, days=30)
        self.bundle = self.ca.write_bundle(self.now)
        self.server_pem = root / "state" / "ca" / "server.pem"

    def agent(self, name: str, fqdn: str, slot: str, *, when: datetime | None = None,
              hours: float = 24, authority: ca.CertificateAuthority | None = None) -> tuple[Path, str]:  # fmt: skip
        """An agent's key and certificate chain in one file, and its serial."""
        key = issue.new_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        issued = (authority or self.ca).issue_agent(csr, fqdn, slot, when or self.now, hours)
        path = self.root / f"{name}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + issued.chain_pem
        )
        return path, issued.serial

    def client(self, cert: Path | None, *, tls12: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.bundle))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            ctx.load_cert_chain(str(cert))
        return ctx

    def listener(self) -> Listener:
        return Listener(
            server_context(self.bundle, self.server_pem),
            ADDRESSES.get,
            lambda: self.store_revoked(),
        )

    def store_revoked(self) -> set[str]:
        return self.ca.revoked()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


async def conversation(
    listener: Listener, ctx: ssl.SSLContext, source: str, client: Callable | None = None
) -> list[object]:
    """Run the listener on one end of an in-memory link and a TLS client on
    the other; the events the client saw (or the exception it got)."""
    server_end, client_end = trio.testing.memory_stream_pair()
    seen: list[object] = []

    async def default(stream: trio.SSLStream, conn: wire.Connection) -> None:
        await stream.send_all(
            conn.send(wire.Hello(version=wire.PROTOCOL_VERSION, role="agent", agent=None))
        )
        sent = False
        while len([e for e in seen if isinstance(e, wire.Heartbeat)]) < 1:
            data = bytes(await stream.receive_some(65536))
            conn.receive_data(data)
            while (e := conn.next_event()) not in (wire.NEED_DATA, wire.CLOSED):
                seen.append(e)
            if not data:
                return
            if not sent and any(isinstance(e, wire.Hello) for e in seen):
                await stream.send_all(conn.send(wire.Heartbeat(seq=7)))  # (after both hellos)
                sent = True

    async def run_client() -> None:
        stream = trio.SSLStream(client_end, ctx, server_hostname=SERVER_NAME)
        conn = wire.Connection("agent")
        try:
            await stream.do_handshake()
            await (client or default)(stream, conn)
        except (ssl.SSLError, trio.BrokenResourceError, wire.ProtocolError) as e:
            seen.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listener.handle, server_end, source)
        with trio.fail_after(30):
            await run_client()
        nursery.cancel_scope.cancel()
    return seen


async def refusal_frame(listener: Listener, ctx: ssl.SSLContext, source: str) -> list[object]:
    async def read_all(stream: trio.SSLStream, conn: wire.Connection) -> None:
        # the refusal is an Error before any hello: read it as raw frames
        buf = b""
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            buf += data
        seen.append(wire.decode_body(buf[wire.HEADER :]) if buf else None)

    seen: list[object] = []
    await conversation(listener, ctx, source, read_all)
    return seen


async def test_the_right_certificate_from_its_machine_is_answered(site: Site) -> None:
    cert, _ = site.agent("web1", *WEB1)
    seen = await conversation(site.listener(), site.client(cert), "10.10.0.5")
    assert [type(e) for e in seen] == [wire.Hello, wire.Heartbeat], seen
    assert seen[0].agent == WEB1[0] and seen[1].seq == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", ["no certificate", "from another address", "revoked"])
async def test_refused_after_the_handshake_with_a_reason(site: Site, case: str) -> None:
    cert, serial = site.agent("web1", *WEB1)
    source = "10.10.0.6" if case == "from another address" else "10.10.0.5"
    if case == "revoked":
        site.ca.revoke(serial, "test", site.now)
    listener = site.listener()
    seen = await refusal_frame(
        listener, site.client(None if case == "no certificate" else cert), source
    )
    assert len(seen) == 1 and isinstance(seen[0], wire.Error), seen
    says = {"no certificate": "no client certificate", "from another address": "which web2.x.internal holds",
            "revoked": "is revoked"}[case]  # fmt: skip
    assert says in seen[0].reason and listener.refusals == 1 and not listener.live


async def test_refused_in_the_handshake(site: Site, tmp_path: Path) -> None:
    other = Site(tmp_path / "other")
    foreign, _ = other.agent("foreign", *WEB1)
    expired, _ = site.agent("old", *WEB1, when=site.now - timedelta(days=2), hours=1)
    cert, _ = site.agent("web1", *WEB1)
    for ctx in (site.client(foreign), site.client(expired), site.client(cert, tls12=True)):
        listener = site.listener()
        seen = await conversation(listener, ctx, "10.10.0.5")
        # (in TLS 1.3 the client's side of the handshake may complete before the
        # server has judged its certificate: it then reads an alert or the end)
        assert not [e for e in seen if isinstance(e, wire.Hello | wire.Heartbeat)], seen
        assert listener.refusals == 1 and not listener.live


async def test_a_client_that_never_handshakes_is_dropped(
    site: Site, autojump_clock: object
) -> None:
    listener = site.listener()
    server_end, _client_end = trio.testing.memory_stream_pair()
    with trio.fail_after(listener.handshake_timeout + 1):
        await listener.handle(server_end, "10.10.0.5")  # returns: it gave up
    assert listener.refusals == 1


async def test_a_live_connection_is_closed_when_its_certificate_is_revoked(site: Site) -> None:
    cert, serial = site.agent("web1", *WEB1)
    listener = site.listener()
    closed: list[object] = []

    async def stay(stream: trio.SSLStream, conn: wire.Connection) -> None:
        await stream.send_all(
            conn.send(wire.Hello(version=wire.PROTOCOL_VERSION, role="agent", agent=None))
        )
        while serial not in listener.live:
            await trio.lowlevel.checkpoint()
        site.ca.revoke(serial, "stolen", site.now)
        assert listener.revoked(site.ca.revoked()) == 1
        while True:  # the controller's hello, then the end
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                closed.append("eof")
                return

    await conversation(listener, site.client(cert), "10.10.0.5", stay)
    assert closed == ["eof"] and not listener.live


def test_identify_is_pure_and_names_what_is_wrong(site: Site) -> None:
    with pytest.raises(Refused, match="no client certificate"):
        identify(None, "10.10.0.5", set(), ADDRESSES.get)
    cert, _ = site.agent("web1", *WEB1)
    pem = cert.read_bytes()
    first = pem[pem.index(b"-----BEGIN CERTIFICATE-----") :]
    der = x509.load_pem_x509_certificate(first).public_bytes(serialization.Encoding.DER)
    assert identify(der, "10.10.0.5", set(), ADDRESSES.get).fqdn == WEB1[0]
    with pytest.raises(Refused, match="which no machine holds"):
        identify(der, "10.10.0.99", set(), ADDRESSES.get)


# ---- enrollment: no certificate yet, a token ----------------------------------------------


def enrollment_listener(site: Site) -> tuple[Listener, list[tuple[str, str]]]:
    from controller.pki.enroll import Enrollment
    from controller.pki.tokens import Tokens

    keys: list[tuple[str, str]] = []
    site.tokens = Tokens(site.store.db)  # type: ignore[attr-defined]
    site.tokens.ensure_schema()  # type: ignore[attr-defined]
    listener = site.listener()
    listener.enroll = Enrollment(
        site.ca, site.tokens, ADDRESSES.get, lambda: datetime.now(UTC),  # type: ignore[attr-defined]
        lambda fqdn, key: keys.append((fqdn, key)),
    )  # fmt: skip
    return listener, keys


def csr_pem() -> str:
    key = issue.new_key()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin.x.internal")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


WG_KEY = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="  # 32 bytes, base64


def enroll_with(token: str, first: wire.Message | None = None) -> Callable:
    async def client(stream: trio.SSLStream, conn: wire.Connection) -> None:
        await stream.send_all(
            conn.send(wire.Hello(version=wire.PROTOCOL_VERSION, role="agent", agent=None))
        )
        sent = False
        while True:
            try:
                data = bytes(await stream.receive_some(65536))
            except trio.BrokenResourceError:
                return
            conn.receive_data(data)
            while (e := conn.next_event()) not in (wire.NEED_DATA, wire.CLOSED):
                client.seen.append(e)  # type: ignore[attr-defined]
            if not data or conn.state is wire.State.CLOSED:
                return
            if not sent and any(isinstance(e, wire.Hello) for e in client.seen):  # type: ignore[attr-defined]
                msg = first or wire.Enroll(token=token, csr_pem=csr_pem(), wg_public_key=WG_KEY)
                await stream.send_all(conn.send(msg))
                sent = True

    client.seen = []  # type: ignore[attr-defined]
    return client


async def test_an_agent_enrolls_with_its_token_as_its_machine(site: Site) -> None:
    listener, keys = enrollment_listener(site)
    fp = issue.fingerprint(site.ca.root)
    token = site.tokens.create(fp, "rule", "odd", 600, site.now)  # type: ignore[attr-defined]
    client = enroll_with(token)
    await conversation(listener, site.client(None), "10.10.0.5", client)
    got = [e for e in client.seen if isinstance(e, wire.Enrolled)]  # type: ignore[attr-defined]
    assert len(got) == 1 and got[0].ca_fingerprint == fp, client.seen  # type: ignore[attr-defined]
    cert = x509.load_pem_x509_certificate(got[0].certificate_pem.encode())
    who = issue.agent_identity(cert)
    assert (who.fqdn, issue.slot_uri(who.slot.rule, who.slot.number)) == WEB1  # not what it asked
    assert keys == [(WEB1[0], WG_KEY)]
    # the same token again: refused, with its reason, nothing issued
    again = enroll_with(token)
    await conversation(listener, site.client(None), "10.10.0.6", again)
    errors = [e for e in again.seen if isinstance(e, wire.Error)]  # type: ignore[attr-defined]
    assert errors and "already used" in errors[0].reason and keys == [(WEB1[0], WG_KEY)]


@pytest.mark.parametrize("case", ["another rule", "forged", "expired", "not an enroll"])
async def test_enrollment_refused(site: Site, case: str) -> None:
    listener, keys = enrollment_listener(site)
    fp = issue.fingerprint(site.ca.root)
    tokens = site.tokens  # type: ignore[attr-defined]
    if case == "another rule":
        token = tokens.create(fp, "rule", "even", 600, site.now)
    elif case == "expired":
        token = tokens.create(fp, "rule", "odd", 60, site.now - timedelta(minutes=5))
    else:
        token = tokens.create(fp, "rule", "odd", 600, site.now)
        if case == "forged":
            token = token[:-43] + "B" * 43
    first = wire.Status(version_applied=None, report={}) if case == "not an enroll" else None
    client = enroll_with(token, first)
    await conversation(listener, site.client(None), "10.10.0.5", client)
    errors = [e for e in client.seen if isinstance(e, wire.Error)]  # type: ignore[attr-defined]
    says = {"another rule": "for rule even", "forged": "unknown", "expired": "expired",
            "not an enroll": "only enroll"}[case]  # fmt: skip
    assert errors and says in errors[0].reason, client.seen  # type: ignore[attr-defined]
    assert not [e for e in client.seen if isinstance(e, wire.Enrolled)]  # type: ignore[attr-defined]
    assert keys == [] and listener.refusals == 1


async def test_a_source_holding_connections_open_gets_no_more(
    site: Site, autojump_clock: object
) -> None:
    """A VM that opens connections and never handshakes holds at most
    MAX_PER_SOURCE of them (each for the handshake timeout); the next is
    closed at once, and another machine is answered meanwhile (the control)."""
    listener = site.listener()
    held: list[trio.StapledStream] = []
    async with trio.open_nursery() as nursery:
        for _ in range(listener.max_per_source):
            server_end, client_end = trio.testing.memory_stream_pair()
            held.append(client_end)
            nursery.start_soon(listener.handle, server_end, "10.10.0.6")
        await trio.testing.wait_all_tasks_blocked()
        assert listener.open == {"10.10.0.6": listener.max_per_source}
        server_end, client_end = trio.testing.memory_stream_pair()
        with trio.fail_after(0.1):  # closed before any handshake
            await listener.handle(server_end, "10.10.0.6")
            assert await client_end.receive_some(1) == b""
        assert listener.refusals == 1
        cert, _ = site.agent("web1", *WEB1)
        seen = await conversation(listener, site.client(cert), "10.10.0.5")
        assert [type(e) for e in seen] == [wire.Hello, wire.Heartbeat], seen
    # the held ones ran out their handshake timeout, and nothing is left counted
    assert listener.open == {} and listener.refusals == 1 + listener.max_per_source


# ---- bounds on what an enrolled agent may ask: how fast, how often, how much ---------------


class Script:
    """The agent's side of a conversation, step by step: `seen` is what it received."""

    def __init__(self, stream: trio.SSLStream, conn: wire.Connection) -> None:
        self.stream, self.conn = stream, conn
        self.seen: list[wire.Message] = []
        self.ended = False  # the controller closed the connection

    async def send(self, *messages: wire.Message) -> None:
        await self.stream.send_all(b"".join(self.conn.send(m) for m in messages))

    def count(self, kind: type) -> int:
        return sum(isinstance(e, kind) for e in self.seen)

    def reasons(self) -> list[str]:
        return [e.reason for e in self.seen if isinstance(e, wire.Error)]

    async def until(self, done: Callable[[], bool]) -> None:
        """Read until done() or the end of the stream (after an Error, only the end)."""
        while not done() and not self.ended:
            try:
                data = bytes(await self.stream.receive_some(65536))
            except trio.BrokenResourceError:
                data = b""
            self.conn.receive_data(data)
            while (e := self.conn.next_event()) not in (wire.NEED_DATA, wire.CLOSED):
                self.seen.append(e)
            self.ended = not data


async def scripted(
    listener: Listener, ctx: ssl.SSLContext, steps: Callable[[Script], Awaitable[None]]
) -> Script:
    """One conversation from web1's address: both hellos, then `steps`."""
    scripts: list[Script] = []

    async def client(stream: trio.SSLStream, conn: wire.Connection) -> None:
        script = Script(stream, conn)
        scripts.append(script)
        await script.send(wire.Hello(version=wire.PROTOCOL_VERSION, role="agent", agent=None))
        await script.until(lambda: script.count(wire.Hello) == 1)
        await steps(script)

    failed = await conversation(listener, ctx, "10.10.0.5", client)
    assert not failed, failed
    return scripts[0]


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]  # fmt: skip


def test_the_bucket_holds_a_burst_and_refills_at_the_rate() -> None:
    bucket: Bucket | None = Bucket(100, 0.0)
    for _ in range(100):
        assert bucket is not None
        bucket = bucket.take(0.0, 20, 100)
    assert bucket is not None and bucket.take(0.0, 20, 100) is None  # the 101st at once
    later = bucket.take(0.05, 20, 100)  # 1/20 s later: one more
    assert later is not None and later.take(0.05, 20, 100) is None
    # a long pause fills it up to the burst, not beyond
    full: Bucket | None = bucket
    for _ in range(100):
        assert full is not None
        full = full.take(1000.0, 20, 100)
    assert full is not None and full.take(1000.0, 20, 100) is None


@pytest.mark.parametrize("burst", [10, MESSAGE_BURST], ids=["limited", "control: raised"])
async def test_an_agent_sending_too_fast_is_told_and_closed(
    site: Site, autojump_clock: object, caplog: pytest.LogCaptureFixture, burst: int
) -> None:
    cert, _ = site.agent("web1", *WEB1)
    listener = site.listener()
    listener.message_burst = burst

    async def flood(script: Script) -> None:
        await script.send(*(wire.Heartbeat(seq=i) for i in range(20)))
        await script.until(lambda: script.count(wire.Heartbeat) == 20)

    # (the clock stands still while the heartbeats are in flight: nothing refills)
    script = await scripted(listener, site.client(cert), flood)
    if burst == 10:  # its hello and 9 heartbeats empty the bucket; the next one is refused
        assert script.count(wire.Heartbeat) == 9 and script.ended, script.seen
        assert script.reasons() == ["more than 20 messages per second"]
        assert listener.throttled == 1 and len(warnings(caplog, "messages per second")) == 1
    else:
        assert script.count(wire.Heartbeat) == 20 and not script.reasons(), script.seen
        assert listener.throttled == 0 and not warnings(caplog, "messages per second")


def renewing_listener(site: Site) -> tuple[Listener, list[str]]:
    """A listener whose `renew` records who asked and answers with a certificate."""
    issued = site.ca.issue_agent(csr_pem(), *WEB1, site.now)
    answer = wire.Enrolled(
        certificate_pem=issued.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        chain_pem=issued.chain_pem.decode(),
        ca_fingerprint=issue.fingerprint(site.ca.root),
    )
    asked: list[str] = []

    def renew(request: wire.Renew, peer: Peer) -> wire.Enrolled:
        asked.append(peer.fqdn)
        return answer

    listener = site.listener()
    listener.renew = renew
    return listener, asked


def renewing(times: int) -> Callable[[Script], Awaitable[None]]:
    async def steps(script: Script) -> None:
        for n in range(1, times + 1):
            await script.send(wire.Renew(csr_pem=csr_pem()))
            await script.until(lambda: script.count(wire.Enrolled) == n)  # noqa: B023

    return steps


@pytest.mark.parametrize("limited", [True, False], ids=["limited", "control: no limit"])
@pytest.mark.parametrize("reconnect", [False, True], ids=["same connection", "reconnected"])
async def test_a_second_renewal_within_a_minute_is_refused(
    site: Site, autojump_clock: object, reconnect: bool, limited: bool
) -> None:
    cert, _ = site.agent("web1", *WEB1)
    listener, asked = renewing_listener(site)
    if not limited:
        listener.renew_every = 0
    if reconnect:  # with its new certificate: the same machine, another serial
        first = await scripted(listener, site.client(cert), renewing(1))
        renewed, _ = site.agent("web1-renewed", *WEB1)
        last = await scripted(listener, site.client(renewed), renewing(1))
        enrolled = first.count(wire.Enrolled) + last.count(wire.Enrolled)
    else:
        last = await scripted(listener, site.client(cert), renewing(2))
        enrolled = last.count(wire.Enrolled)
    if limited:
        assert last.reasons() == ["renewal asked again within 60 s"] and last.ended, last.seen
        assert asked == [WEB1[0]] and enrolled == 1 and listener.throttled == 1
    else:
        assert not last.reasons() and asked == [WEB1[0]] * 2 and enrolled == 2, last.seen
        assert listener.throttled == 0


async def test_a_renewal_a_minute_later_is_answered(
    site: Site, autojump_clock: trio.testing.MockClock
) -> None:
    cert, _ = site.agent("web1", *WEB1)
    listener, asked = renewing_listener(site)
    await scripted(listener, site.client(cert), renewing(1))
    autojump_clock.jump(listener.renew_every)
    again = await scripted(listener, site.client(cert), renewing(1))
    assert again.count(wire.Enrolled) == 1 and not again.reasons() and asked == [WEB1[0]] * 2


async def test_the_renewal_times_kept_stay_bounded(
    site: Site, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents, "RENEWALS_KEPT", 3)
    listener = site.listener()

    def peer(fqdn: str) -> Peer:
        return Peer(fqdn, "dom0:slot/odd/1", "01", "10.10.0.5")

    for name in ("m0", "m1"):
        listener._renewal(peer(name))
    autojump_clock.jump(30)
    listener._renewal(peer("m2"))
    autojump_clock.jump(30)
    listener._renewal(peer("m3"))  # at 3 kept: m0 and m1, a minute old, are dropped
    assert set(listener._renewed) == {"m2", "m3"}
    listener._renewal(peer("m0"))
    with pytest.raises(Refused, match="within 60 s"):  # the control: m2's half minute holds
        listener._renewal(peer("m2"))


def test_a_report_is_kept_up_to_its_bound() -> None:
    report = {"b": [1, 2], "a": "é" * 10}
    size = len(json.dumps(report, sort_keys=True, separators=(",", ":")).encode())
    assert kept_report(report, size) is report
    assert kept_report(report, size - 1) == {"truncated": True, "bytes": size}


@pytest.mark.parametrize("limit", [MAX_REPORT, 1 << 20], ids=["capped", "control: raised"])
async def test_a_status_report_too_large_is_kept_as_its_size(
    site: Site, caplog: pytest.LogCaptureFixture, limit: int
) -> None:
    cert, _ = site.agent("web1", *WEB1)
    listener = site.listener()
    book = listener.book = ConfigBook(
        sqlite3.connect(":memory:", isolation_level=None), lambda names: {}
    )  # (no configuration to push)
    listener.max_report = limit
    report = {"links": [{"name": f"eth{i}", "mtu": 1500} for i in range(3000)]}
    size = len(json.dumps(report, sort_keys=True, separators=(",", ":")))
    assert size > MAX_REPORT
    kept: list[object] = []

    async def steps(script: Script) -> None:
        status = wire.Status(version_applied=None, report=report)
        await script.send(status, status, wire.Heartbeat(seq=1))
        await script.until(lambda: script.count(wire.Heartbeat) == 1)  # both statuses are in
        kept.append(book.live[WEB1[0]].report)

    script = await scripted(listener, site.client(cert), steps)
    assert not script.reasons(), script.seen
    if limit == MAX_REPORT:
        assert kept == [{"truncated": True, "bytes": size}]
        assert len(warnings(caplog, "status report")) == 1  # once for the connection
    else:
        assert kept == [report] and not warnings(caplog, "status report")
