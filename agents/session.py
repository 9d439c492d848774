"""The agent's life: its last-known-good configuration at start, enrollment,
then one mutual-TLS connection to the controller after another.

On a connection (common/wire.py on top of trio's TLS):
- each Config is checked (common/agentconfig.py), applied (agents/apply.py,
  in a thread: pyroute2 blocks) and answered: Ack, then a Status of what is
  in place; or Nack with the reason, after the applier rolled back, so the
  VM keeps working on the previous configuration. A version it already runs
  is acknowledged without applying it again.
- a Heartbeat every HEARTBEAT seconds; nothing heard for IDLE seconds ends
  the connection.
- its certificate is renewed (Renew with a CSR for the same key) at half its
  life, with jitter so that agents enrolled together do not renew together.
- a container added or gone (agents/containers.py: the watcher runs in the
  agent's nursery, for the life of the agent, and follows each configuration
  applied) sends a fresh Status at once, its "containers" the watcher's report.

Between connections it waits BACKOFF_MIN doubling to BACKOFF_MAX seconds,
each wait drawn from 50 % to 100 % of that (full jitter): a restarted
controller is not met by every agent at once.

Enrollment (no certificate yet) needs the token in ROOT/token. Its
fingerprint pins dom0's root: a first connection takes the server's chain
unverified only to find the certificate with that fingerprint; the second,
which sends the token, is verified by OpenSSL against that root alone.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import trio

from agents import identity
from agents.files import FileError, Known, Root, write_atomic
from common import agentconfig, wire
from common.agentconfig import MachineConfig

if TYPE_CHECKING:
    from agents.containers import Watcher
    from agents.dns import DnsFollower

log = logging.getLogger("dom0.agent")

PORT = 8443
HEARTBEAT = 30.0  # seconds between heartbeats (the controller closes after 90 s of silence)
IDLE = 90.0  # seconds without a frame from the controller: the connection is dead
CONNECT_TIMEOUT = 10.0  # seconds for TCP, TLS and both hellos
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
# Seconds at least between two Status reports that container changes send: a tenant
# making and deleting veths in a loop must not have its agent spend the controller's
# message rate (controller/sources/agents.py closes a connection that sends too many).
REPORT_GAP = 0.5
READ_SIZE = 65536


class Applier(Protocol):
    def apply(self, config: MachineConfig, previous: MachineConfig | None) -> None: ...
    def observe(self, config: MachineConfig) -> dict[str, Any]: ...
    def wg_public_key(self) -> str: ...


class ApplyFailed(Exception):
    """What agents/apply.py raises is turned into this by `Agent._apply`."""


class Ended(Exception):
    """Why a connection (or an enrollment) ended: one line for the log."""


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before connection attempt `attempt` (0 = the first retry)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2**attempt)
    return ceiling * rng.uniform(0.5, 1.0)


def tls_client(root: Root | None, *, client_cert: bool) -> ssl.SSLContext:
    """TLS 1.3 only. With a root: the server verified against dom0's pinned
    root alone (never the system's CAs), by name or address."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if root is None:  # (only to read a chain whose root the token pins)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=str(root.ca))
    if client_cert:
        ctx.load_cert_chain(str(root.cert), str(root.tls_key))
    return ctx


def fetch_chain(host: str, port: int, timeout: float, local: str | None = None) -> list[bytes]:
    """The server's certificate chain, unverified (blocking: run in a thread)."""
    ctx = tls_client(None, client_cert=False)
    source = (local, 0) if local else None
    with (
        socket.create_connection((host, port), timeout=timeout, source_address=source) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        sslobj: Any = tls
        get = getattr(sslobj, "get_unverified_chain", None)  # public from Python 3.13
        if get is None:
            get = sslobj._sslobj.get_unverified_chain  # (3.10 to 3.12: the same, private)
        chain = get() or []
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


@dataclass
class Agent:
    root: Root
    applier: Applier
    server: str | None  # None: found by `discover` (and again after each failure)
    port: int = PORT
    server_name: str | None = None  # the name or address in dom0's certificate (default: server)
    local_address: str | None = None  # the source address to connect from (default: the kernel's)
    # how a connection is opened: TCP by default (a test gives an in-memory link)
    open_stream: Callable[[str, int, str | None], Awaitable[trio.abc.Stream]] | None = None
    heartbeat: float = HEARTBEAT
    idle: float = IDLE
    rng: random.Random = field(default_factory=random.SystemRandom)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    known: Known | None = None
    connected: bool = False
    sessions: int = 0  # connections that got past both hellos
    # (version, reason) of the last configuration refused, for the status report
    last_nack: tuple[int, str] | None = None
    containers: Watcher | None = None  # the VM's containers (None: not this agent's business)
    dns: DnsFollower | None = None  # the VM's DNS stub (None: not this agent's business)
    # Where dom0 may be, (address, port), for an agent given no --server: a
    # hint only (agents/discover.py), each tried with TLS verified against
    # the pinned CA; blocking, run in a thread.
    discover: Callable[[], list[tuple[str, int]]] | None = None
    _candidates: list[tuple[str, int]] = field(default_factory=list)
    _send_lock: trio.Lock = field(default_factory=trio.Lock)
    _renewed: trio.Event = field(default_factory=trio.Event)

    # -- start -----------------------------------------------------------------------
    async def start(self) -> None:
        """Apply the last-known-good configuration, whether dom0 answers or not."""
        try:
            known = self.root.known()
        except FileError as e:
            log.error("last-known-good configuration unusable, starting without it: %s", e)
            return
        if known is None:
            log.info("no configuration yet: waiting for the controller's")
            return
        try:
            await self._apply(known.config, None)
        except ApplyFailed as e:
            log.error("last-known-good configuration %d cannot be applied: %s", known.version, e)
            return
        self.known = known
        self._follow()
        log.info("applied the last-known-good configuration, version %d", known.version)

    def _follow(self) -> None:
        """The container watcher and the DNS stub follow the configuration in place."""
        if self.containers is not None and self.known is not None:
            self.containers.configure(self.known.config)
        if self.dns is not None and self.known is not None:
            self.dns.configure(self.known.config)

    async def run(self) -> None:
        """Forever: enroll if need be, then connect, and again after each end; the
        container watcher beside it."""
        async with trio.open_nursery() as nursery:
            if self.containers is not None:
                await nursery.start(self.containers.run)
            if self.dns is not None:
                await nursery.start(self.dns.run)
            await self._run()

    async def _run(self) -> None:
        await self.start()
        attempt = 0
        while True:
            sessions = self.sessions
            try:
                if self.discover is not None and (self.server is None or attempt > 0):
                    await self._next_candidate()
                if not self.root.enrolled():
                    await self.enroll()
                await self.session()
            except (Ended, OSError, ssl.SSLError, trio.BrokenResourceError,
                    identity.IdentityError) as e:  # fmt: skip
                log.warning("controller %s:%d: %s", self.server, self.port, _one_line(e))
            # a connection that got past the hellos resets the wait
            attempt = 0 if self.sessions > sessions else attempt + 1
            await trio.sleep(backoff(attempt, self.rng))

    async def _next_candidate(self) -> None:
        """The next place dom0 may be: the next answer of the last browse, or
        a new browse once they are spent (an answer is only a hint: the TLS
        handshake against the pinned CA decides)."""
        assert self.discover is not None
        if not self._candidates:
            self.server = None
            found = await trio.to_thread.run_sync(self.discover)
            if not found:
                raise Ended("no answer for _dom0._tcp on the link (mDNS): give --server")
            log.info("discovered %s", ", ".join(f"{a}:{p}" for a, p in found))
            self._candidates = list(found)
        self.server, self.port = self._candidates.pop(0)

    @property
    def _where(self) -> str:
        if self.server is None:
            raise Ended("no controller address (none given, none discovered)")
        return self.server

    # -- enrollment ------------------------------------------------------------------
    async def enroll(self) -> None:
        token = self.root.read_token()
        if token is None:
            raise Ended(f"not enrolled, and no token in {self.root.token} (dom0 token create)")
        pinned = identity.token_fingerprint(token)
        chain = await trio.to_thread.run_sync(
            fetch_chain, self._where, self.port, CONNECT_TIMEOUT, self.local_address
        )
        root_der = identity.pick_root(chain, pinned)
        write_atomic(self.root.ca, identity.root_pem(root_der), 0o644)
        key = identity.ensure_key(self.root)
        request = wire.Enroll(
            token=token, csr_pem=identity.csr_pem(key), wg_public_key=self.applier.wg_public_key()
        )
        stream, conn = await self._connect(client_cert=False)
        async with stream:
            with trio.fail_after(CONNECT_TIMEOUT):
                await stream.send_all(conn.send(request))
                answer = await self._next(stream, conn)
        if isinstance(answer, wire.Error):
            raise Ended(f"enrollment refused: {answer.reason}")
        if not isinstance(answer, wire.Enrolled):
            raise Ended(f"enrollment answered with {answer.TYPE}")
        if answer.ca_fingerprint != pinned:
            raise Ended("enrollment answered for another CA than the token's")
        self._keep_certificate(answer)
        self.root.token.unlink(missing_ok=True)  # used: it enrolls no one again
        log.info("enrolled: certificate %s", identity.life(self.root.cert.read_bytes()).serial)

    def _keep_certificate(self, answer: wire.Enrolled) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = x509.load_pem_x509_certificate(answer.chain_pem.encode())
        key = identity.ensure_key(self.root)
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
            raise Ended("the certificate issued is not for this agent's key")
        write_atomic(self.root.cert, answer.chain_pem.encode(), 0o644)

    # -- one connection --------------------------------------------------------------
    async def _connect(self, *, client_cert: bool) -> tuple[trio.SSLStream, wire.Connection]:
        ctx = tls_client(self.root, client_cert=client_cert)
        server = self._where
        name = self.server_name or server
        with trio.fail_after(CONNECT_TIMEOUT):
            if self.open_stream is not None:
                tcp = await self.open_stream(server, self.port, self.local_address)
            else:
                tcp = await trio.open_tcp_stream(server, self.port,
                                                 local_address=self.local_address)  # fmt: skip
            stream = trio.SSLStream(tcp, ctx, server_hostname=name)
            try:
                await stream.do_handshake()
                conn = wire.Connection("agent")
                agent = self.known.config.name if self.known else None
                await stream.send_all(
                    conn.send(wire.Hello(version=wire.PROTOCOL_VERSION, role="agent", agent=agent))
                )
                hello = await self._next(stream, conn)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        if isinstance(hello, wire.Error):
            await trio.aclose_forcefully(stream)
            raise Ended(f"refused: {hello.reason}")
        if not isinstance(hello, wire.Hello):
            await trio.aclose_forcefully(stream)
            raise Ended(f"the controller began with {hello.TYPE}")
        return stream, conn

    async def _next(self, stream: trio.SSLStream, conn: wire.Connection) -> wire.Message:
        """The next message, reading as needed; Ended at the end of the stream."""
        while True:
            event = conn.next_event()
            if isinstance(event, wire.Signal):
                if event is wire.CLOSED:
                    raise Ended("the controller closed the connection")
                data = bytes(await stream.receive_some(READ_SIZE))
                conn.receive_data(data)
                continue
            return event

    async def session(self) -> None:
        """One connection with the certificate, until it ends."""
        stream, conn = await self._connect(client_cert=True)
        log.info("connected to the controller %s:%d", self.server, self.port)
        self.connected = True
        self.sessions += 1
        try:
            async with stream:
                try:
                    await self._converse(stream, conn)
                except wire.ProtocolError as e:
                    with trio.move_on_after(1):
                        await stream.send_all(conn.error_frame())
                    raise Ended(f"protocol error: {e}") from None
        finally:
            self.connected = False

    async def _converse(self, stream: trio.SSLStream, conn: wire.Connection) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, stream, conn)
                nursery.start_soon(self._renewals, stream, conn)
                if self.containers is not None:
                    # (taken before _read builds the first Status: no change is missed)
                    seen = self.containers.generation
                    nursery.start_soon(self._container_reports, stream, conn, seen)
                try:
                    await self._read(stream, conn)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _first(group) from None

    async def _send(self, stream: trio.SSLStream, conn: wire.Connection, m: wire.Message) -> None:
        async with self._send_lock:  # (trio: one send_all at a time on a stream)
            await stream.send_all(conn.send(m))

    async def _read(self, stream: trio.SSLStream, conn: wire.Connection) -> None:
        await self._send(stream, conn, self._status())
        while True:
            with trio.move_on_after(self.idle) as idle:
                m = await self._next(stream, conn)
            if idle.cancelled_caught:
                raise Ended(f"nothing from the controller for {self.idle:g} s")
            if isinstance(m, wire.Error):
                raise Ended(f"closed by the controller: {m.reason}")
            if isinstance(m, wire.Config):
                await self._config(stream, conn, m)
            elif isinstance(m, wire.Enrolled):
                self._keep_certificate(m)
                self._renewed.set()
                log.info("certificate renewed: %s", identity.life(m.chain_pem.encode()).serial)

    async def _config(self, stream: trio.SSLStream, conn: wire.Connection, m: wire.Config) -> None:
        try:
            config = agentconfig.parse(m.config)
        except agentconfig.ConfigError as e:
            await self._refuse(stream, conn, m.version, str(e))
            return
        if self.known is not None and self.known == Known(m.version, config):
            await self._send(stream, conn, wire.Ack(version=m.version))
            return
        previous = self.known.config if self.known else None
        try:
            await self._apply(config, previous)
        except ApplyFailed as e:
            await self._refuse(stream, conn, m.version, str(e))
            return
        self.known = Known(m.version, config)
        self.root.keep(self.known)
        self._follow()
        log.info("configuration %d applied", m.version)
        await self._send(stream, conn, wire.Ack(version=m.version))
        await self._send(stream, conn, self._status())

    async def _refuse(
        self, stream: trio.SSLStream, conn: wire.Connection, version: int, reason: str
    ) -> None:
        reason = _one_line(reason)[: wire.MAX_TEXT]
        self.last_nack = (version, reason)
        log.error("configuration %d refused: %s", version, reason)
        await self._send(stream, conn, wire.Nack(version=version, error=reason))

    async def _apply(self, config: MachineConfig, previous: MachineConfig | None) -> None:
        from agents.apply import ApplyError

        try:
            await trio.to_thread.run_sync(self.applier.apply, config, previous)
        except ApplyError as e:
            raise ApplyFailed(str(e)) from None

    def _status(self) -> wire.Status:
        report: dict[str, Any] = {}
        if self.known is not None:
            try:
                report["applied"] = self.applier.observe(self.known.config)
            except Exception as e:  # (a report is not worth a connection)
                report["observe_error"] = _one_line(str(e))[:200]
        if self.containers is not None:
            report["containers"] = self.containers.report()
        if self.dns is not None:
            report["dns"] = self.dns.report()
        if self.last_nack is not None:
            report["last_nack"] = {"version": self.last_nack[0], "error": self.last_nack[1]}
        return wire.Status(version_applied=self.known.version if self.known else None,
                           report=report)  # fmt: skip

    async def _heartbeats(self, stream: trio.SSLStream, conn: wire.Connection) -> None:
        seq = 0
        while True:
            await trio.sleep(self.heartbeat)
            seq += 1
            await self._send(stream, conn, wire.Heartbeat(seq=seq))

    async def _container_reports(
        self, stream: trio.SSLStream, conn: wire.Connection, seen: int
    ) -> None:
        """A container added or gone: a fresh Status now, so dom0 learns of it (its names,
        its route) within a pass of the watcher, not at the next configuration."""
        assert self.containers is not None
        while True:
            await self.containers.wait_change(seen)
            seen = self.containers.generation
            await self._send(stream, conn, self._status())
            await trio.sleep(REPORT_GAP)  # (the changes meanwhile: in the next one)

    async def _renewals(self, stream: trio.SSLStream, conn: wire.Connection) -> None:
        while True:
            life = identity.life(self.root.cert.read_bytes())
            wait = (life.renew_at(self.rng) - self.clock()).total_seconds()
            await trio.sleep(max(wait, 0.0))
            key = identity.ensure_key(self.root)
            log.info("renewing certificate %s (until %s)", life.serial, life.not_after)
            self._renewed = trio.Event()
            await self._send(stream, conn, wire.Renew(csr_pem=identity.csr_pem(key)))
            await self._renewed.wait()  # (one Renew at a time: the protocol's rule 4)


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a nursery's group (the others are cancellations)."""
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return _first(e)
        if not isinstance(e, trio.Cancelled):
            return e
    return group.exceptions[0]


def _one_line(e: object) -> str:
    if isinstance(e, trio.BrokenResourceError) and e.__cause__ is not None:
        e = e.__cause__  # (trio's wrapper of the TLS error that says what failed)
    return " ".join(str(e).split()) or type(e).__name__
