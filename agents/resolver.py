"""The VM's DNS: a stub resolver on the VM's loopback (and on the containers' bridge)
that forwards every query to dom0's resolver over DNS-over-TLS, and the files that
point the VM's resolver library at it.

Why a stub, and why this shape:
- One persistent connection (RFC 7858: TCP, each message after its 2-byte length,
  pipelined, answers in any order). A TLS handshake per query would cost more than
  the query; one connection carries every query of the VM, opened at the first and
  kept. unbound closes it after ~30 s idle, and a connection may drop at any time:
  a query in flight on one that ends is sent once more on the next, then SERVFAIL.
  Connections are opened no faster than a backoff (BACKOFF_MIN doubling to
  BACKOFF_MAX, back to none at the first answer), and a query that comes while the
  stub waits to try again is answered SERVFAIL at once: a dead dom0 is not hammered
  and a client is not kept waiting for nothing.
- dom0's certificate is verified against the CA pinned at enrollment (the caller's
  context, agents/session.py's `tls_client`), by dom0's address. The tenant's
  network carries the queries, so whoever answers without that certificate gets no
  query and gives no answer: the stub fails closed (SERVFAIL), never to plain DNS.
- The stub gives each query an ID of its own, random (`secrets`) and unique among
  the queries in flight, and gives the client's back in the answer: clients pick
  IDs independently and would collide on a shared connection, and an answer is
  taken only for the query in flight on that connection with its ID and question.
- Every message is dnspython's to read and to write (a tenant's bytes go to a
  parser that has seen them all before); only the TCP length framing is done here.

`uses_resolved`, `point_resolver` and `restore_resolver` decide and write the VM's
resolver configuration under a root directory (the VM's "/" in production, a
directory in the lab): a systemd-resolved drop-in if resolved runs, else
resolv.conf itself, its original kept to be put back. They block: run them in a
thread.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import os
import secrets
import socket
import ssl
import struct
import subprocess
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import trio

from agents.files import write_atomic
from agents.session import _one_line

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # (Linux; the socket module names it from 3.12)
PORT = 853  # DNS over TLS
TIMEOUT = 3.0  # seconds a client waits for an answer (glibc retries after 5)
MAX_OUTSTANDING = 256  # queries waiting for an answer, over all clients
MAX_UDP = 4096  # bytes: a longer query is cut, so dropped; the largest UDP answer
MIN_UDP = 512  # bytes: the UDP answer for a client without EDNS (RFC 1035)
MAX_TCP_CLIENTS = 64
TCP_IDLE = 10.0  # seconds a TCP client may send nothing, or read nothing of its answers
PIPELINE = 16  # queries one TCP client may have in flight; then it is not read
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
READ_SIZE = 65536

OpenStream = Callable[[str, int], Awaitable[trio.abc.Stream]]


class ResolverError(Exception):
    """The VM's resolver configuration could not be changed: one line."""


# ---- messages --------------------------------------------------------------------------------


def parse_query(data: bytes) -> dns.message.Message | None:
    """A client's query; None for what is not one (garbage, a response): it is dropped,
    not answered, so the stub amplifies and reflects nothing."""
    message = _parse(data)
    if message is None or message.flags & dns.flags.QR:
        return None
    return message


def _parse(data: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(data)
    # (a tenant's bytes: whatever the parser raises on them, they are no message, and
    # must not end the task that read them)
    except Exception:
        return None


def reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    """The stub's own answer, without records: SERVFAIL, NOTIMP."""
    response = dns.message.make_response(query, recursion_available=True, our_payload=MAX_UDP)
    response.set_rcode(rcode)
    return response


def udp_size(query: dns.message.Message) -> int:
    """The largest UDP answer the client takes (RFC 6891: its EDNS payload size)."""
    if query.edns < 0:
        return MIN_UDP
    return max(MIN_UDP, min(MAX_UDP, query.payload))


def render(query: dns.message.Message, answer: dns.message.Message, size: int) -> bytes:
    """`answer` in at most `size` bytes, truncated (TC) if need be; SERVFAIL if it
    cannot be written at all."""
    try:
        return answer.to_wire(max_size=size, prefer_truncation=True)
    except dns.exception.DNSException:
        return reply(query, dns.rcode.SERVFAIL).to_wire(max_size=size, prefer_truncation=True)


class _Framer:
    """Messages out of a byte stream, each after its length (RFC 1035 4.2.2)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> bytes | None:
        if len(self._buffer) < 2:
            return None
        (length,) = struct.unpack_from("!H", self._buffer)
        if len(self._buffer) < 2 + length:
            return None
        message = bytes(self._buffer[2 : 2 + length])
        del self._buffer[: 2 + length]
        return message


async def _receive(stream: trio.abc.ReceiveStream, framer: _Framer) -> bytes | None:
    """The next message; None at the end of the stream."""
    while (message := framer.next()) is None:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            return None
        framer.feed(bytes(data))
    return message


# ---- the upstream connection ------------------------------------------------------------


@dataclass(eq=False)
class _Link:
    """One TLS connection to dom0, while it lasts."""

    stream: trio.SSLStream[trio.abc.Stream]
    opened: float
    heard: float  # when the last message came on it (`opened` until one does)
    sent: int = 0
    answers: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: str | None = None  # why, for the log

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
        self.scope.cancel()


@dataclass(eq=False)
class _Query:
    """A query as sent upstream, under the stub's ID, until answered or given up."""

    message: dns.message.Message
    frame: bytes
    queued: float
    link: _Link | None = None  # the connection it was last sent on
    tries: int = 0
    answer: dns.message.Message | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def finish(self, answer: dns.message.Message | None) -> None:
        if not self.done.is_set():
            self.answer = answer
            self.done.set()


class Stub:
    """The stub resolver: UDP and TCP on each listen address, one DoT link upstream."""

    def __init__(
        self,
        context: ssl.SSLContext,
        listen: Sequence[tuple[str, int]],
        *,
        timeout: float = TIMEOUT,
        open_stream: OpenStream | None = None,
        max_outstanding: int = MAX_OUTSTANDING,
        max_tcp_clients: int = MAX_TCP_CLIENTS,
        tcp_idle: float = TCP_IDLE,
    ) -> None:
        self.context = context
        self.listen = list(listen)  # port 0: one ephemeral port, the same for UDP and TCP
        self.timeout = timeout
        self.max_outstanding = max_outstanding
        self.max_tcp_clients = max_tcp_clients
        self.tcp_idle = tcp_idle
        self._open_stream: OpenStream = open_stream or trio.open_tcp_stream
        self.server: str | None = None
        self.port = PORT
        self.bound: list[tuple[str, int]] = []  # what `run` listens on
        # counters for the status report
        self.queries = 0
        self.answered = 0  # by dom0
        self.servfail = 0  # by the stub
        self.reconnects = 0  # connections opened after the first
        self._connections = 0
        self._queries: dict[int, _Query] = {}  # by the stub's ID: those in flight
        self._unsent: deque[_Query] = deque()
        self._more = trio.Event()  # set when a query joins _unsent
        self._link: _Link | None = None
        self._scope: trio.CancelScope | None = None  # the upstream's attempt or connection
        self._delay = 0.0  # the backoff: seconds from a failure to the next attempt
        self._not_before = float("-inf")  # (trio's clock)
        self._problem: str | None = None  # the last failure logged
        self._tcp_clients = 0

    def configure(self, server: str | None, port: int = PORT) -> None:
        """dom0's address (None: no upstream, every query SERVFAIL). Another address
        ends the connection: the queries in flight and the next go to the new one.
        (From the stub's trio thread.)"""
        if (server, port) == (self.server, self.port):
            return
        self.server, self.port = server, port
        self._delay, self._not_before, self._problem = 0.0, float("-inf"), None
        if self._scope is not None:
            self._scope.cancel()
        if server is None:
            self._fail(list(self._queries.values()))

    def report(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "port": self.port,
            "connected": self._link is not None,
            "listen": [[host, port] for host, port in self.bound],
            "queries": self.queries,
            "answered": self.answered,
            "servfail": self.servfail,
            "reconnects": self.reconnects,
            "outstanding": len(self._queries),
            "problem": self._problem,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on every address (started once all are bound), serve forever."""
        with contextlib.ExitStack() as sockets:
            udp, tcp = await self._bind(sockets)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upstream)
                for sock in udp:
                    nursery.start_soon(self._serve_udp, sock)
                listeners = [trio.SocketListener(sock) for sock in tcp]
                await nursery.start(trio.serve_listeners, self._serve_tcp, listeners)
                task_status.started()

    async def _bind(
        self, sockets: contextlib.ExitStack
    ) -> tuple[list[trio.socket.SocketType], list[trio.socket.SocketType]]:
        udp, tcp = [], []
        self.bound = []
        for host, port in self.listen:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            u = sockets.enter_context(trio.socket.socket(family, socket.SOCK_DGRAM))
            u.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            await _bind_one(u, host, port, "UDP")
            port = u.getsockname()[1]
            t = sockets.enter_context(trio.socket.socket(family, socket.SOCK_STREAM))
            # (a restarted agent binds again while its old connections linger in TIME_WAIT)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # (the containers' bridge may not have its address yet: it comes with
            # the configuration's pass, and the stub must not wait for it)
            t.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            await _bind_one(t, host, port, "TCP")
            t.listen(socket.SOMAXCONN)
            udp.append(u)
            tcp.append(t)
            self.bound.append((host, port))
        return udp, tcp

    # ---- clients ----------------------------------------------------------------------

    async def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The answer to a client's query: dom0's, under the client's ID; else the stub's."""
        self.queries += 1
        if query.opcode() != dns.opcode.QUERY:
            return reply(query, dns.rcode.NOTIMP)
        answer = await self._forward(query)
        if answer is None:
            self.servfail += 1
            return reply(query, dns.rcode.SERVFAIL)
        self.answered += 1
        answer.id = query.id
        return answer

    async def _serve_udp(self, sock: trio.socket.SocketType) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                data, peer = await sock.recvfrom(MAX_UDP)
                query = parse_query(data)
                if query is not None:
                    nursery.start_soon(self._answer_udp, sock, query, peer)

    async def _answer_udp(
        self, sock: trio.socket.SocketType, query: dns.message.Message, peer: Any
    ) -> None:
        answer = await self.answer(query)
        try:
            await sock.sendto(render(query, answer, udp_size(query)), peer)
        except OSError as e:  # (the client's problem, not the stub's)
            log.debug("DNS answer to %s not sent: %s", peer, e)

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        if self._tcp_clients >= self.max_tcp_clients:
            await trio.aclose_forcefully(stream)
            return
        self._tcp_clients += 1
        try:
            async with stream:
                await self._converse(stream)
        finally:
            self._tcp_clients -= 1

    async def _converse(self, stream: trio.SocketStream) -> None:
        """Queries one after another on one TCP connection, answered as they come in;
        garbage, silence or a client that does not read ends it."""
        framer, sending, slots = _Framer(), trio.Lock(), trio.Semaphore(PIPELINE)
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()  # (PIPELINE in flight: the client waits for answers)
                data = None
                with (
                    trio.move_on_after(self.tcp_idle),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    data = await _receive(stream, framer)
                query = parse_query(data) if data is not None else None
                if query is None:
                    if data is not None:  # (garbage: what follows it is no better)
                        nursery.cancel_scope.cancel()
                    return  # (the end, or silence: the answers in flight are still sent)
                nursery.start_soon(self._answer_tcp, stream, sending, slots, query,
                                   nursery.cancel_scope)  # fmt: skip

    async def _answer_tcp(
        self,
        stream: trio.SocketStream,
        sending: trio.Lock,
        slots: trio.Semaphore,
        query: dns.message.Message,
        connection: trio.CancelScope,
    ) -> None:
        try:
            answer = await self.answer(query)
            wire = render(query, answer, 65535)
            frame = struct.pack("!H", len(wire)) + wire
            with trio.move_on_after(self.tcp_idle) as stuck:
                async with sending:
                    await stream.send_all(frame)
            if stuck.cancelled_caught:
                connection.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            connection.cancel()
        finally:
            slots.release()

    # ---- upstream ---------------------------------------------------------------------

    async def _forward(self, query: dns.message.Message) -> dns.message.Message | None:
        """dom0's answer to `query`, or None (SERVFAIL)."""
        if self.server is None or len(self._queries) >= self.max_outstanding:
            return None
        if self._link is None and trio.current_time() < self._not_before:
            return None  # waiting to try again: see the module's docstring
        upstream = copy.copy(query)  # (sections shared; only the ID differs)
        upstream.id = self._new_id()
        try:
            frame = upstream.to_wire(max_size=65535, prepend_length=True)
        except dns.exception.DNSException:
            return None
        q = _Query(upstream, frame, trio.current_time())
        self._queries[upstream.id] = q
        self._unsent.append(q)
        self._more.set()
        try:
            with trio.move_on_after(self.timeout):
                await q.done.wait()
            link = self._link
            # Nothing at all heard on the connection while this query waited: it is
            # dead without knowing it (a path gone black drops no TCP connection).
            if q.answer is None and link is not None and link.heard <= max(q.queued, link.opened):
                link.end(f"no answer in {self.timeout:g} s")
            return q.answer
        finally:
            if self._queries.get(upstream.id) is q:
                del self._queries[upstream.id]
            q.finish(None)

    def _new_id(self) -> int:
        while True:
            candidate = secrets.randbits(16)
            if candidate not in self._queries:
                return candidate

    def _fail(self, queries: Iterable[_Query]) -> None:
        for q in queries:
            q.finish(None)

    async def _wait_unsent(self) -> None:
        """Until a query waits to be sent (those whose clients gave up are dropped)."""
        while True:
            while self._unsent and self._unsent[0].done.is_set():
                self._unsent.popleft()
            if self._unsent:
                return
            self._more = trio.Event()
            await self._more.wait()

    async def _upstream(self) -> None:
        """The connection to dom0, opened when a query waits and kept; again and
        again. configure() cancels `_scope`: the next attempt is to the new server."""
        while True:
            await self._wait_unsent()
            server, port = self.server, self.port
            if server is None:  # (configure(None) came after the query)
                self._fail(self._unsent)
                self._unsent.clear()
                continue
            with trio.CancelScope() as scope:
                self._scope = scope
                await self._attempt(server, port)
            self._scope = None

    async def _attempt(self, server: str, port: int) -> None:
        """A connection, served until it ends; or a failure to open one."""
        await trio.sleep_until(self._not_before)
        try:
            with trio.fail_after(self.timeout):
                stream = await self._dial(server, port)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
            reason = "no answer" if isinstance(e, trio.TooSlowError) else _one_line(e)
            self._failed(f"DNS over TLS to {server}:{port}: {reason}")
            self._fail(self._unsent)  # (their one chance was this connection)
            self._unsent.clear()
            return
        await self._serve(stream, server, port)

    async def _dial(self, server: str, port: int) -> trio.SSLStream[trio.abc.Stream]:
        tcp = await self._open_stream(server, port)
        stream = trio.SSLStream(tcp, self.context, server_hostname=server, https_compatible=False)
        try:
            await stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _serve(self, stream: trio.SSLStream[trio.abc.Stream], server: str, port: int) -> None:
        now = trio.current_time()
        link = _Link(stream, opened=now, heard=now)
        self._connections += 1
        if self._connections > 1:
            self.reconnects += 1
        if self._problem is not None:
            log.info("DNS over TLS to %s:%d: connected", server, port)
            self._problem = None
        self._link = link
        try:
            with link.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write, link)
                    nursery.start_soon(self._read, link)
        finally:
            self._link = None
            await trio.aclose_forcefully(stream)
            self._lost(link)
        ended = f"DNS over TLS to {server}:{port}: {link.ended or 'closed'}"
        if link.sent and not link.answers:  # (a server that answers nothing is no better)
            self._failed(ended)
        else:
            log.debug("%s", ended)

    async def _write(self, link: _Link) -> None:
        try:
            while True:
                await self._wait_unsent()
                q = self._unsent.popleft()
                if q.done.is_set():  # (its client gave up)
                    continue
                q.link, q.tries = link, q.tries + 1
                link.sent += 1
                await link.stream.send_all(q.frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            link.end(_one_line(e))

    async def _read(self, link: _Link) -> None:
        framer = _Framer()
        try:
            while (data := await _receive(link.stream, framer)) is not None:
                link.heard = trio.current_time()
                answer = _parse(data)
                if answer is None:
                    continue
                q = self._queries.get(answer.id)
                # Only the answer to the query in flight on this connection under this
                # ID, with its question (is_response): anything else is late or forged.
                if q is None or q.link is not link or not q.message.is_response(answer):
                    continue
                del self._queries[answer.id]
                q.finish(answer)
                link.answers += 1
                self._delay, self._not_before = 0.0, float("-inf")
            link.end("closed by the server")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            link.end(_one_line(e))

    def _lost(self, link: _Link) -> None:
        """The connection ended: what was in flight on it goes once more, on the next."""
        again = []
        for q in self._queries.values():
            if q.link is link and not q.done.is_set():
                if q.tries < 2:
                    q.link = None
                    again.append(q)
                else:
                    q.finish(None)
        if again:
            self._unsent.extendleft(reversed(again))
            self._more.set()

    def _failed(self, problem: str) -> None:
        """An attempt failed: wait longer before the next; say why once per reason."""
        self._delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self._delay * 2))
        self._not_before = trio.current_time() + self._delay
        if problem != self._problem:
            log.warning("%s", problem)
            self._problem = problem


async def _bind_one(sock: trio.socket.SocketType, host: str, port: int, proto: str) -> None:
    try:
        await sock.bind((host, port))
    except OSError as e:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(e.errno, f"DNS stub: cannot listen on {where} ({proto}): {e.strerror}") from e


# ---- the VM's resolver configuration ------------------------------------------------------

RESOLVED_DIR = "run/systemd/resolve"
DROP_IN = "etc/systemd/resolved.conf.d/dom0.conf"
RESOLV_CONF = "etc/resolv.conf"
SAVED = "etc/resolv.conf.dom0-saved"
RELOAD_TIMEOUT = 30.0  # seconds for systemctl
HEADER = "# Managed by the dom0 agent: it points the resolver at its DNS stub, and puts\n"
HEADER_MORE = "# the original (resolv.conf.dom0-saved) back when it stops managing it.\n"


def uses_resolved(root: Path) -> bool:
    """systemd-resolved runs (its runtime directory has its stub file or its socket)."""
    run = root / RESOLVED_DIR
    return (run / "stub-resolv.conf").exists() or (run / "io.systemd.Resolve").exists()


def reload_resolved() -> None:
    argv = ["systemctl", "try-reload-or-restart", "systemd-resolved"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=RELOAD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ResolverError(f"{' '.join(argv)}: {_one_line(e)}") from None
    if done.returncode != 0:
        why = _one_line(done.stderr) if done.stderr.strip() else f"exit status {done.returncode}"
        raise ResolverError(f"{' '.join(argv)}: {why}")


def point_resolver(root: Path, address: str, *, reload: Callable[[], None] | None = None) -> str:
    """The VM's resolver pointed at the stub on `address`; what was done, in a line.
    `reload` (default `reload_resolved`) is called when resolved's drop-in changed."""
    try:
        address = str(ipaddress.ip_address(address))  # (it goes into files: an address only)
    except ValueError:
        raise ResolverError(f"DNS stub address {address!r}: not an IP address") from None
    with _file_errors():
        if uses_resolved(root):
            # resolved owns resolv.conf (a link to its own stub): its configuration, not
            # that file, decides where it sends queries.
            drop_in = root / DROP_IN
            text = f"[Resolve]\nDNS={address}\nDomains=~.\n"
            if _read_text(drop_in) == text:
                return f"systemd-resolved already sends queries to {address} ({drop_in})"
            drop_in.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_atomic(drop_in, text.encode(), 0o644)
            (reload or reload_resolved)()
            return f"systemd-resolved sends queries to {address} ({drop_in}, reloaded)"
        conf, saved = root / RESOLV_CONF, root / SAVED
        text = f"{HEADER}{HEADER_MORE}nameserver {address}\noptions edns0 trust-ad\n"
        current = None if conf.is_symlink() else _read_text(conf)
        if current == text:
            return f"{conf} already names {address}"
        kept = ""
        if not os.path.lexists(saved) and os.path.lexists(conf) and not _managed(current):
            _save(conf, saved)
            kept = f" (the original kept as {saved.name})"
        write_atomic(conf, text.encode(), 0o644)  # (renamed over a link, never written through)
        return f"{conf} names {address}{kept}"


def restore_resolver(root: Path, *, reload: Callable[[], None] | None = None) -> str:
    """What `point_resolver` did, undone; what was done, in a line."""
    done = []
    with _file_errors():
        drop_in = root / DROP_IN
        if os.path.lexists(drop_in):
            drop_in.unlink()
            _sync_dir(drop_in.parent)
            (reload or reload_resolved)()
            done.append(f"removed {drop_in}, systemd-resolved reloaded")
        conf, saved = root / RESOLV_CONF, root / SAVED
        if os.path.lexists(saved):
            os.replace(saved, conf)  # (a link stays a link: see _save)
            _sync_dir(conf.parent)
            done.append(f"{conf} put back as it was")
        elif not conf.is_symlink() and _managed(_read_text(conf)):
            conf.unlink()  # (ours, and none saved: there was none before it)
            _sync_dir(conf.parent)
            done.append(f"removed {conf} (there was none before the agent's)")
    return "; ".join(done) or "nothing of the agent's in the resolver configuration"


@contextlib.contextmanager
def _file_errors() -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise ResolverError(
            f"{e.filename or 'resolver configuration'}: {e.strerror or e}"
        ) from None


def _save(conf: Path, saved: Path) -> None:
    """The original resolv.conf, once: a link is kept as a link to the same target
    (the same directory, so a relative target still means the same file)."""
    tmp = saved.with_name(f".{saved.name}.tmp")
    tmp.unlink(missing_ok=True)
    if conf.is_symlink():
        os.symlink(os.readlink(conf), tmp)
        os.replace(tmp, saved)
        _sync_dir(saved.parent)
    else:
        write_atomic(saved, conf.read_bytes(), os.stat(conf).st_mode & 0o7777)


def _managed(text: str | None) -> bool:
    return text is not None and text.startswith(HEADER)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
