"""The agents' listener: mutual TLS 1.3, then the wire protocol (common/wire.py).

Per connection, in this order, and nothing is granted before all of it holds:

1. The TLS handshake, within HANDSHAKE_TIMEOUT: a client that opens a
   connection and never completes a handshake holds a task for seconds, not
   forever. TLS 1.3 only; OpenSSL verifies a client certificate against the
   CA's bundle (strictly: X509_STRICT), so another CA's or an expired one
   fails the handshake itself.
2. Who it is (`identify`, pure): a certificate is required for everything
   but enrollment; its serial must not be revoked; it must name one machine
   (its fqdn and slot); and that machine must be the one that holds the
   connection's source address now (the bridge binds an address to its
   port and MAC, so a certificate copied to another VM is refused there).
3. The protocol: both hellos, then the agent's messages. A protocol error
   is answered with an Error frame and the connection closed; so is an
   agent that sends more than MESSAGE_RATE messages a second (beyond a
   burst of MESSAGE_BURST), or that asks for a renewal again within
   RENEW_EVERY. A status report larger than MAX_REPORT is kept as its size.

A live connection whose certificate is revoked is closed by
`Listener.revoked`, which the controller calls whenever the store's
revocations change (it polls them every REVOCATION_POLL seconds: `dom0 ca
revoke` is another process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from common import wire
from controller.pki import issue
from controller.sources.agentbook import ConfigBook

log = logging.getLogger(__name__)

AGENT_PORT = 8443  # the `enroll` service's port (policy/model.py SERVICES) on a domain's gateway
HANDSHAKE_TIMEOUT = 5.0  # seconds for the TLS handshake and both hellos
IDLE_TIMEOUT = 90.0  # seconds without a frame (agents send a heartbeat every 30 s)
REVOCATION_POLL = 2.0  # seconds between looks at the store's revocations
READ_SIZE = 65536
# A machine is one agent: a few connections at once are a reconnect racing a
# dying one; more are a tenant holding sockets open. Beyond these, a new
# connection is closed before its handshake costs anything.
MAX_PER_SOURCE = 4
MAX_CONNECTIONS = 4096  # over every source: the controller's own file descriptors
REFUSAL_LOG_EVERY = 10.0  # seconds: one log line per source and period for refused floods
# An agent sends a heartbeat every 30 s and a status, an ack or a nack now and
# then: a connection that sends more is a tenant spending the controller's CPU.
MESSAGE_RATE = 20.0  # messages per second, sustained, per connection
MESSAGE_BURST = 100  # messages at once (a full bucket)
# Each renewal signs a certificate and writes it to the store; an agent renews
# at half its certificate's life, hours apart. Per machine, not per connection:
# a reconnect must not start the count again.
RENEW_EVERY = 60.0  # seconds
RENEWALS_KEPT = MAX_CONNECTIONS  # machines remembered; past it, those outside the window go
# A report is kept in memory and shown by `dom0 status`, for every machine;
# the frame's own bound (MAX_FRAME, 1 MiB) would let one tenant fill that.
# (253 containers, the most an agent reports, fit)
MAX_REPORT = 65536  # bytes of a status report's JSON (sorted keys, compact, ASCII)


class Refused(Exception):
    """Why a connection gets nothing: one line, said to the peer and logged."""


@dataclass(frozen=True, slots=True)
class Peer:
    fqdn: str
    slot: str  # the slot URI (dom0:slot/RULE/N)
    serial: str
    source: str


# What the controller knows of a source address: the (fqdn, slot URI) of the
# machine that holds it on the bridge now, or None.
Holder = Callable[[str], tuple[str, str] | None]


def server_context(bundle: Path, server_pem: Path) -> ssl.SSLContext:
    """TLS 1.3 only; a client certificate is verified when one is sent (the
    check that one *was* sent is `identify`'s: enrollment has none yet)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(server_pem))
    return ctx


def identify(der: bytes | None, source: str, revoked: Collection[str], holder: Holder) -> Peer:
    """The peer of a completed handshake (its certificate already verified
    by OpenSSL), or Refused."""
    if der is None:
        raise Refused("no client certificate: a machine without one may only enroll")
    cert = x509.load_der_x509_certificate(der)
    serial = issue.serial_hex(cert.serial_number)
    if serial in revoked:
        raise Refused(f"certificate {serial} is revoked")
    try:
        who = issue.agent_identity(cert)
    except issue.PkiError as e:
        raise Refused(f"certificate {serial}: {e}") from None
    slot = issue.slot_uri(who.slot.rule, who.slot.number)
    held = holder(source)
    if held is None:
        raise Refused(f"certificate of {who.fqdn} from {source}, which no machine holds")
    if held != (who.fqdn, slot):
        raise Refused(f"certificate of {who.fqdn} from {source}, which {held[0]} holds")
    return Peer(who.fqdn, slot, serial, source)


@dataclass(frozen=True, slots=True)
class Bucket:
    """A connection's token bucket: `tokens` left at time `at` (trio's clock)."""

    tokens: float
    at: float

    def take(self, now: float, rate: float, burst: float) -> Bucket | None:
        """The bucket after one more message at `now`, or None: it is empty."""
        tokens = min(burst, self.tokens + (now - self.at) * rate)
        return Bucket(tokens - 1, now) if tokens >= 1 else None


def kept_report(report: dict[str, Any], limit: int) -> dict[str, Any]:
    """The report itself, or, if its JSON is larger than `limit` bytes, its size only
    (json.dumps' ASCII: a non-ASCII character counts as its escape, not its UTF-8)."""
    size = len(json.dumps(report, sort_keys=True, separators=(",", ":")).encode())
    return report if size <= limit else {"truncated": True, "bytes": size}


@dataclass
class Listener:
    """The live agent connections, by certificate serial."""

    context: ssl.SSLContext
    holder: Holder
    revocations: Callable[[], Collection[str]]
    # an agent without a certificate, its Enroll from an address (Refused: why not)
    enroll: Callable[[wire.Enroll, str], wire.Enrolled] | None = None
    # an enrolled agent's Renew: its new certificate (Refused: why not)
    renew: Callable[[wire.Renew, Peer], wire.Enrolled] | None = None
    # the configurations to push, and what the agents answered (None: push nothing)
    book: ConfigBook | None = None
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    live: dict[str, tuple[Peer, trio.CancelScope]] = field(default_factory=dict)
    refusals: int = 0
    max_per_source: int = MAX_PER_SOURCE
    max_connections: int = MAX_CONNECTIONS
    open: dict[str, int] = field(default_factory=dict)  # source -> its connections now
    message_rate: float = MESSAGE_RATE
    message_burst: int = MESSAGE_BURST
    renew_every: float = RENEW_EVERY
    max_report: int = MAX_REPORT
    # conversations closed for going too fast (messages or renewals); not in
    # `refusals`, which counts connections that got no conversation at all
    throttled: int = 0
    _logged: dict[str, float] = field(default_factory=dict)
    _renewed: dict[str, float] = field(default_factory=dict)  # fqdn -> when it last asked

    def revoked(self, serials: Collection[str]) -> int:
        """Close every live connection whose certificate is now revoked."""
        closed = 0
        for serial in set(self.live) & set(serials):
            peer, scope = self.live.pop(serial)
            scope.cancel()
            log.warning("agent %s: certificate %s revoked, connection closed", peer.fqdn, serial)
            closed += 1
        return closed

    async def handle(self, raw: trio.abc.Stream, source: str) -> None:
        """One connection, start to end; it is closed when this returns."""
        held = self.open.get(source, 0)
        if held >= self.max_per_source or sum(self.open.values()) >= self.max_connections:
            self.refusals += 1
            self._log_flood(source, held)
            await trio.aclose_forcefully(raw)
            return
        self.open[source] = held + 1
        stream = trio.SSLStream(raw, self.context, server_side=True)
        try:
            await self._handle(stream, source)
        finally:
            # (counted down before the close awaits: a cancelled close must not leak it)
            if self.open[source] <= 1:
                del self.open[source]
            else:
                self.open[source] -= 1
            await trio.aclose_forcefully(stream)

    def _log_flood(self, source: str, held: int) -> None:
        now = trio.current_time()
        if now - self._logged.get(source, -REFUSAL_LOG_EVERY) >= REFUSAL_LOG_EVERY:
            self._logged[source] = now
            log.warning("agent connections from %s: %d open already, more are closed at once",
                        source, held)  # fmt: skip

    async def _handle(self, stream: trio.SSLStream, source: str) -> None:
        conn = wire.Connection("controller")
        with trio.move_on_after(self.handshake_timeout) as limit:
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as e:
                self.refusals += 1
                log.info("agent connection from %s: TLS handshake failed: %s", source, e)
                return
        if limit.cancelled_caught:
            self.refusals += 1
            log.info("agent connection from %s: no TLS handshake within %gs", source,
                     self.handshake_timeout)  # fmt: skip
            return
        der = stream.getpeercert(binary_form=True)
        if der is None and self.enroll is not None:
            await self._enrollment(stream, conn, source)
            return
        try:
            peer = identify(der, source, self.revocations(), self.holder)
        except Refused as e:
            self.refusals += 1
            log.warning("agent connection from %s refused: %s", source, e)
            await _say(stream, wire.encode_frame(wire.Error(reason=str(e))))
            return
        with trio.CancelScope() as scope:
            self.live[peer.serial] = (peer, scope)
            try:
                await self._converse(stream, conn, peer)
            finally:
                self.live.pop(peer.serial, None)

    async def _converse(self, stream: trio.SSLStream, conn: wire.Connection, peer: Peer) -> None:
        talk = _Talk(stream, conn, Bucket(self.message_burst, trio.current_time()))
        await talk.send(wire.Hello(version=wire.PROTOCOL_VERSION, role="controller",
                                   agent=peer.fqdn))  # fmt: skip
        if self.book is not None:
            self.book.connect(peer.fqdn, peer.serial, peer.source, peer.slot)
        try:
            async with trio.open_nursery() as nursery:
                if self.book is not None:
                    nursery.start_soon(self._push, talk, peer, self.book)
                try:
                    await self._receive(talk, peer)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # (the pusher's own failure: the stream broke)
            if not group.subgroup((trio.BrokenResourceError, ssl.SSLError)):
                raise
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
        finally:
            if self.book is not None:
                self.book.disconnect(peer.fqdn, peer.serial)

    async def _push(self, talk: _Talk, peer: Peer, book: ConfigBook) -> None:
        """Each new configuration of the agent's machine, as it comes (once
        the agent's hello is in: nothing else goes before both hellos)."""
        await talk.ready.wait()
        sent = 0
        while True:
            push = book.next_push(peer.fqdn, sent)
            if push is None:
                # (no await between the look and the wait: a change cannot slip in)
                await book.changed(peer.fqdn)
                continue
            sent, config = push
            # a change made while this is sent finds no waiter: the loop looks again
            await talk.send(wire.Config(version=sent, config=config))
            book.pushed(peer.fqdn, sent)
            log.info("agent %s: configuration %d pushed", peer.fqdn, sent)

    async def _receive(self, talk: _Talk, peer: Peer) -> None:
        conn = talk.conn
        while True:
            with trio.move_on_after(self.idle_timeout) as idle:
                try:
                    data = bytes(await talk.stream.receive_some(READ_SIZE))
                except (trio.BrokenResourceError, ssl.SSLError):
                    return
            if idle.cancelled_caught:
                log.info("agent %s: silent for %gs, closed", peer.fqdn, self.idle_timeout)
                return
            try:
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    if event is wire.NEED_DATA or event is wire.CLOSED:
                        break
                    assert not isinstance(event, wire.Signal)
                    if conn.state is wire.State.READY:
                        talk.ready.set()
                    self._draw(talk)
                    reply = self._answer(event, peer, talk)
                    if reply is not None:
                        await talk.send(reply)
            except wire.ProtocolError as e:
                log.warning("agent %s: protocol error: %s", peer.fqdn, e)
                async with talk.lock:
                    await _say(talk.stream, conn.error_frame())
                return
            except Refused as e:
                log.warning("agent %s: %s", peer.fqdn, e)
                async with talk.lock:
                    await _say(talk.stream, conn.send(wire.Error(reason=str(e))))
                return
            if conn.state in (wire.State.CLOSED, wire.State.ERROR) or not data:
                return

    async def _enrollment(self, stream: trio.SSLStream, conn: wire.Connection, source: str) -> None:
        """Hellos, one Enroll, its answer, the end: the agent comes back with
        its certificate. Anything else, or a refusal, is an Error."""
        assert self.enroll is not None
        hello = wire.Hello(version=wire.PROTOCOL_VERSION, role="controller", agent=None)
        with trio.move_on_after(self.handshake_timeout):
            try:
                await stream.send_all(conn.send(hello))
                while True:
                    data = bytes(await stream.receive_some(READ_SIZE))
                    conn.receive_data(data)
                    event = conn.next_event()
                    while event is not wire.NEED_DATA and event is not wire.CLOSED:
                        if isinstance(event, wire.Enroll):
                            try:
                                answer = self.enroll(event, source)
                            except Refused as e:
                                self.refusals += 1
                                log.warning("agent connection from %s refused: %s", source, e)
                                await _say(stream, conn.send(wire.Error(reason=str(e))))
                                return
                            await stream.send_all(conn.send(answer))
                            log.info("agent at %s enrolled", source)
                            return
                        if not isinstance(event, wire.Hello):
                            raise wire.ProtocolError(
                                f"{type(event).TYPE} without a certificate: only enroll is possible"
                            )
                        event = conn.next_event()
                    if not data or event is wire.CLOSED:
                        return
            except wire.ProtocolError as e:
                self.refusals += 1
                log.warning("agent connection from %s: protocol error: %s", source, e)
                await _say(
                    stream, conn.error_frame() or wire.encode_frame(wire.Error(reason=str(e)))
                )
            except (trio.BrokenResourceError, ssl.SSLError):
                return

    def _draw(self, talk: _Talk) -> None:
        """One message's token from the connection's bucket, or Refused."""
        bucket = talk.bucket.take(trio.current_time(), self.message_rate, self.message_burst)
        if bucket is None:
            self.throttled += 1
            raise Refused(f"more than {self.message_rate:g} messages per second")
        talk.bucket = bucket

    def _answer(self, event: wire.Message, peer: Peer, talk: _Talk) -> wire.Message | None:
        book = self.book
        if book is not None:
            book.seen(peer.fqdn)
        if isinstance(event, wire.Heartbeat):
            return wire.Heartbeat(seq=event.seq)
        if isinstance(event, wire.Hello):
            log.info("agent %s (%s) connected from %s", peer.fqdn, peer.slot, peer.source)
        elif isinstance(event, wire.Ack):
            log.info("agent %s: configuration %d applied", peer.fqdn, event.version)
            if book is not None:
                book.ack(peer.fqdn, event.version)
        elif isinstance(event, wire.Nack):
            log.warning("agent %s: configuration %d refused: %s", peer.fqdn, event.version,
                        event.error)  # fmt: skip
            if book is not None:
                book.nack(peer.fqdn, event.version, event.error)
        elif isinstance(event, wire.Status):
            if book is not None:
                book.status(peer.fqdn, event.version_applied, self._report(event, peer, talk))
        elif isinstance(event, wire.Renew):
            if self.renew is None:
                raise Refused("renewal is not possible here: enroll again")
            self._renewal(peer)
            return self.renew(event, peer)
        return None

    def _report(self, event: wire.Status, peer: Peer, talk: _Talk) -> dict[str, Any]:
        kept = kept_report(event.report, self.max_report)
        if kept is not event.report and not talk.oversized:
            talk.oversized = True
            log.warning("agent %s: status report of %d bytes, more than %d: only its size is kept",
                        peer.fqdn, kept["bytes"], self.max_report)  # fmt: skip
        return kept

    def _renewal(self, peer: Peer) -> None:
        """Refused if the machine asked within renew_every; else the time is noted."""
        now = trio.current_time()
        last = self._renewed.get(peer.fqdn)
        if last is not None and now - last < self.renew_every:
            self.throttled += 1
            raise Refused(f"renewal asked again within {self.renew_every:g} s")
        if len(self._renewed) >= RENEWALS_KEPT:
            # (what is left are machines that asked within the window: at most one each)
            self._renewed = {k: t for k, t in self._renewed.items() if now - t < self.renew_every}
        self._renewed[peer.fqdn] = now


class _Talk:
    """One connection's stream and protocol state; sends are one at a time
    (trio allows a single send_all on a stream at once)."""

    def __init__(self, stream: trio.SSLStream, conn: wire.Connection, bucket: Bucket) -> None:
        self.stream = stream
        self.conn = conn
        self.lock = trio.Lock()
        self.ready = trio.Event()  # both hellos are through
        self.bucket = bucket  # what the agent may still send (Listener._draw)
        self.oversized = False  # a too large report was logged already

    async def send(self, message: wire.Message) -> None:
        async with self.lock:
            await self.stream.send_all(self.conn.send(message))


async def _say(stream: trio.SSLStream, frame: bytes) -> None:
    """A last frame before closing, if the peer still listens."""
    if not frame:
        return
    with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError, ssl.SSLError):
        await stream.send_all(frame)
