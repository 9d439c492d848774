"""The agent's DNS stub (agents/resolver.py) between dnspython clients and a DNS-over-TLS
server of the test's, all on 127.0.0.1 with ephemeral ports, over real TLS 1.3 with
certificates of dom0's CA (controller/pki/issue.py).

Answered, with the client's ID: over UDP and over TCP (several queries on one
connection); 50 at once, with one ID between them, over one upstream connection that
answers them in reverse order; after the server closed the connection, and when it
closed it with the query in flight (sent once more, never a third time); by the new
server after `configure` changes it.
SERVFAIL, never the record: a server whose certificate is of another CA (told once in
the log); no upstream; a server that never answers, or answers another question; more
queries in flight than the bound. Not answered at all: garbage, a response. NOTIMP for
a NOTIFY. Truncated (TC) to 512 bytes for a client without EDNS.

The VM's resolver configuration on a directory root, with systemd-resolved (a drop-in,
resolv.conf untouched) and without (resolv.conf replaced, its original kept, a link
replaced and not written through), and put back.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dns.asyncbackend
import dns.asyncquery
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.files import Root
from agents.resolver import (
    ResolverError,
    Stub,
    parse_query,
    point_resolver,
    restore_resolver,
    uses_resolved,
)
from agents.session import tls_client
from controller.pki import issue

HOST = "127.0.0.1"
BACKEND = dns.asyncbackend.get_backend("trio")
RECORDS = {"web1.x.internal.": ["10.10.0.5"], "db1.x.internal.": ["10.10.0.6"]}
CLIENT_WAIT = 5.0  # seconds a test's client waits: far longer than any stub's timeout


# ---- dom0's side: a CA, its server certificate for 127.0.0.1, a DoT server ---------------


@dataclass
class Pki:
    root: Root  # the agent's, with the pinned root only
    server: ssl.SSLContext  # the server's, certificate for 127.0.0.1

    def client(self) -> ssl.SSLContext:
        return tls_client(self.root, client_cert=False)


def make_pki(directory: Path) -> Pki:
    now = datetime.now(UTC)
    root_key, inter_key, server_key = issue.new_key(), issue.new_key(), issue.new_key()
    root = issue.make_root(root_key, "internal", now)
    inter = issue.make_intermediate(inter_key, root, root_key, now)
    leaf = issue.make_server(server_key.public_key(), inter, inter_key, [], [HOST], now)
    directory.mkdir()
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(root.public_bytes(pem))
    (directory / "chain.pem").write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    return Pki(Root(directory), server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki") / "dom0")


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA's certificate for the same address."""
    return make_pki(tmp_path_factory.mktemp("pki") / "impostor")


async def read_message(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes | None:
    """The next length-prefixed message (the test's own framing); None at the end."""
    while True:
        if len(buffer) >= 2:
            length = int.from_bytes(buffer[:2], "big")
            if len(buffer) >= 2 + length:
                message = bytes(buffer[2 : 2 + length])
                del buffer[: 2 + length]
                return message
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data


@dataclass
class Upstream:
    """dom0's unbound in miniature: DNS over TLS, A records from a dict; it can hold
    answers and send them in reverse order, stay silent, answer another question, or
    hang up on a query."""

    context: ssl.SSLContext
    records: dict[str, list[str]] = field(default_factory=lambda: dict(RECORDS))
    port: int = 0
    accepted: int = 0  # TCP connections
    connections: int = 0  # TLS handshakes completed
    open: int = 0
    queries: int = 0
    ids: list[int] = field(default_factory=list)
    batch: int = 1  # answers held until this many, then sent last first
    silent: bool = False
    wrong_question: bool = False
    hang_up: int = 0  # the next this many queries: the connection closed instead
    _scopes: set[trio.CancelScope] = field(default_factory=set)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        tls = [trio.SSLListener(one, self.context, https_compatible=False) for one in listeners]
        task_status.started()
        await trio.serve_listeners(self._handle, tls)

    def drop(self) -> None:
        """Every connection closed, as unbound closes an idle one."""
        for scope in self._scopes:
            scope.cancel()

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.accepted += 1
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with stream:
                    await stream.do_handshake()
                    self.connections += 1
                    self.open += 1
                    try:
                        await self._converse(stream)
                    finally:
                        self.open -= 1
            except trio.BrokenResourceError:
                pass  # (a client that refused the certificate)
            finally:
                self._scopes.discard(scope)

    async def _converse(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        buffer, held = bytearray(), []
        while (data := await read_message(stream, buffer)) is not None:
            query = dns.message.from_wire(data)
            self.queries += 1
            self.ids.append(query.id)
            if self.hang_up:
                self.hang_up -= 1
                return
            if self.silent:
                continue
            held.append(self._answer(query))
            if len(held) >= self.batch:
                for answer in reversed(held):
                    await stream.send_all(answer.to_wire(prepend_length=True))
                held.clear()

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        answer = dns.message.make_response(query)
        name = query.question[0].name.to_text().lower()
        addresses = self.records.get(name)
        if addresses:
            answer.answer.append(dns.rrset.from_text_list(name, 60, "IN", "A", addresses))
        else:
            answer.set_rcode(dns.rcode.NXDOMAIN)
        if self.wrong_question:
            answer.question = dns.message.make_query("elsewhere.x.internal.", "A").question
        return answer


# ---- the agent's side ----------------------------------------------------------------------


async def start(nursery: trio.Nursery, pki: Pki, upstream: Upstream | None, **kw: Any) -> Stub:
    stub = Stub(pki.client(), [(HOST, 0)], **kw)
    if upstream is not None:
        await nursery.start(upstream.run)
        stub.configure(HOST, upstream.port)
    await nursery.start(stub.run)
    return stub


def port_of(stub: Stub) -> int:
    return stub.bound[0][1]


async def ask(stub: Stub, name: str, *, qid: int | None = None, **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, "A", **kw)
    if qid is not None:
        query.id = qid
    answer = await dns.asyncquery.udp(
        query, HOST, port=port_of(stub), timeout=CLIENT_WAIT, backend=BACKEND
    )
    assert answer.id == query.id
    return answer


async def ask_tcp(stub: Stub, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.tcp(
        query, HOST, port=port_of(stub), timeout=CLIENT_WAIT, backend=BACKEND
    )


def addresses(answer: dns.message.Message) -> list[str]:
    assert answer.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(answer.rcode())
    return [rdata.to_text() for rrset in answer.answer for rdata in rrset]


def servfail(answer: dns.message.Message) -> bool:
    return answer.rcode() == dns.rcode.SERVFAIL and not answer.answer


async def until(check: Any, seconds: float = 5) -> None:
    with trio.fail_after(seconds):
        # (polls state that the code under test changes: no event of its own to wait on)
        while not check():  # noqa: ASYNC110
            await trio.sleep(0.005)


# ---- answered ------------------------------------------------------------------------------


async def test_a_udp_query_gets_the_servers_answer_under_its_own_id(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server)
    stub = await start(nursery, pki, upstream)
    answer = await ask(stub, "web1.x.internal", qid=4242)
    assert addresses(answer) == ["10.10.0.5"]
    assert answer.id == 4242
    assert upstream.queries == 1
    report = stub.report()
    assert report["connected"] is True
    assert (report["queries"], report["answered"], report["servfail"]) == (1, 1, 0)
    assert report["listen"] == [[HOST, port_of(stub)]]
    assert report["server"] == HOST and report["port"] == upstream.port


async def test_tcp_queries_get_answers_several_on_one_connection(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server)
    stub = await start(nursery, pki, upstream)
    assert addresses(await ask_tcp(stub, "web1.x.internal")) == ["10.10.0.5"]

    stream = await trio.open_tcp_stream(HOST, port_of(stub))
    async with stream:
        queries = {}
        for i, name in enumerate(["web1.x.internal", "db1.x.internal", "web1.x.internal"]):
            query = dns.message.make_query(name, "A")
            query.id = 100 + i
            queries[query.id] = query
        await stream.send_all(b"".join(q.to_wire(prepend_length=True) for q in queries.values()))
        buffer = bytearray()
        with trio.fail_after(CLIENT_WAIT):
            for _ in range(len(queries)):
                data = await read_message(stream, buffer)
                assert data is not None
                answer = dns.message.from_wire(data)
                assert queries.pop(answer.id).is_response(answer)
        assert not queries
        # garbage ends the connection
        await stream.send_all(b"\x00\x03abc")
        with trio.fail_after(CLIENT_WAIT):
            assert await read_message(stream, buffer) is None
    assert upstream.connections == 1


async def test_fifty_at_once_share_one_connection_answered_in_reverse(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server, batch=50)
    upstream.records = {f"host{i}.x.internal.": [f"10.20.0.{i}"] for i in range(50)}
    stub = await start(nursery, pki, upstream)
    got: dict[int, list[str]] = {}

    async def one(i: int) -> None:
        # every client picked the same ID: the stub's own keep them apart
        got[i] = addresses(await ask(stub, f"host{i}.x.internal", qid=7))

    async with trio.open_nursery() as clients:
        for i in range(50):
            clients.start_soon(one, i)
    assert got == {i: [f"10.20.0.{i}"] for i in range(50)}
    assert upstream.connections == 1
    assert len(set(upstream.ids)) == 50
    assert stub.report()["answered"] == 50


async def test_after_the_server_closes_the_next_query_reconnects(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server)
    stub = await start(nursery, pki, upstream)
    assert addresses(await ask(stub, "web1.x.internal")) == ["10.10.0.5"]
    upstream.drop()
    await until(lambda: not stub.report()["connected"])
    assert addresses(await ask(stub, "db1.x.internal")) == ["10.10.0.6"]
    assert upstream.connections == 2
    assert stub.report()["reconnects"] == 1


async def test_a_query_in_flight_when_the_connection_drops_is_sent_once_more(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server, hang_up=1)
    stub = await start(nursery, pki, upstream)
    assert addresses(await ask(stub, "web1.x.internal")) == ["10.10.0.5"]
    assert (upstream.queries, upstream.connections) == (2, 2)
    assert stub.report()["reconnects"] == 1

    upstream.hang_up = 5  # the second connection ends too: no third try
    assert servfail(await ask(stub, "db1.x.internal"))
    assert upstream.queries == 4  # (2 before, 2 for this one)


async def test_another_server_configured_answers_the_next_query(
    nursery: trio.Nursery, pki: Pki
) -> None:
    first = Upstream(pki.server)
    second = Upstream(pki.server, records={"web1.x.internal.": ["10.10.0.99"]})
    await nursery.start(second.run)
    stub = await start(nursery, pki, first)
    assert addresses(await ask(stub, "web1.x.internal")) == ["10.10.0.5"]
    stub.configure(HOST, second.port)
    assert addresses(await ask(stub, "web1.x.internal")) == ["10.10.0.99"]
    await until(lambda: first.open == 0)
    assert (first.queries, second.queries) == (1, 1)


async def test_an_answer_too_large_for_udp_is_truncated(nursery: trio.Nursery, pki: Pki) -> None:
    upstream = Upstream(pki.server)
    upstream.records["many.x.internal."] = [f"10.30.0.{i}" for i in range(1, 101)]
    stub = await start(nursery, pki, upstream)
    small = await ask(stub, "many.x.internal")  # no EDNS: 512 bytes
    assert small.flags & dns.flags.TC
    assert not small.answer
    large = await ask(stub, "many.x.internal", use_edns=0, payload=4096)
    assert not large.flags & dns.flags.TC
    assert len(addresses(large)) == 100


# ---- SERVFAIL --------------------------------------------------------------------------------


async def test_a_certificate_of_another_ca_gets_no_query_and_gives_no_answer(
    nursery: trio.Nursery, pki: Pki, impostor: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents.resolver")
    upstream = Upstream(impostor.server)
    stub = await start(nursery, pki, upstream)
    assert servfail(await ask(stub, "web1.x.internal"))
    assert upstream.accepted == 1

    # again and again until the backoff lets it try a second time: one line in the log
    with trio.fail_after(CLIENT_WAIT):
        while upstream.accepted < 2:
            assert servfail(await ask(stub, "web1.x.internal"))
            await trio.sleep(0.01)
    assert (upstream.connections, upstream.queries) == (0, 0)
    assert stub.report()["answered"] == 0
    problem = stub.report()["problem"]
    assert "certificate verify failed" in problem
    logged = [r.getMessage() for r in caplog.records if r.name == "agents.resolver"]
    assert logged == [problem]


async def test_no_upstream_means_servfail(nursery: trio.Nursery, pki: Pki) -> None:
    stub = await start(nursery, pki, None)
    assert servfail(await ask(stub, "web1.x.internal"))
    assert stub.report()["servfail"] == 1

    upstream = Upstream(pki.server)
    await nursery.start(upstream.run)
    stub.configure(HOST, upstream.port)
    assert addresses(await ask(stub, "web1.x.internal")) == ["10.10.0.5"]
    stub.configure(None)
    assert servfail(await ask(stub, "web1.x.internal"))
    assert upstream.queries == 1


async def test_a_server_that_never_answers_gets_servfail_after_the_timeout(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server, silent=True)
    stub = await start(nursery, pki, upstream, timeout=0.3)
    assert servfail(await ask(stub, "web1.x.internal"))
    assert upstream.queries == 1
    # nothing heard on it while the query waited: the connection is given up
    await until(lambda: upstream.open == 0)


async def test_an_answer_to_another_question_is_discarded(nursery: trio.Nursery, pki: Pki) -> None:
    upstream = Upstream(pki.server, wrong_question=True)
    stub = await start(nursery, pki, upstream, timeout=0.3)
    assert servfail(await ask(stub, "web1.x.internal"))
    assert upstream.queries == 1
    assert stub.report()["answered"] == 0


async def test_beyond_the_bound_of_queries_in_flight_servfail_at_once(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server, silent=True)
    stub = await start(nursery, pki, upstream, timeout=60, max_outstanding=2)
    async with trio.open_nursery() as waiting:
        for name in ["web1.x.internal", "db1.x.internal"]:
            waiting.start_soon(ask, stub, name)
        await until(lambda: upstream.queries == 2)
        assert servfail(await ask(stub, "web1.x.internal"))  # (long before the 60 s)
        assert stub.report()["outstanding"] == 2
        waiting.cancel_scope.cancel()
    assert upstream.queries == 2


# ---- not answered, or not forwarded ---------------------------------------------------------


async def test_garbage_and_responses_get_no_reply_and_the_stub_serves_on(
    nursery: trio.Nursery, pki: Pki
) -> None:
    upstream = Upstream(pki.server)
    stub = await start(nursery, pki, upstream)
    query = dns.message.make_query("web1.x.internal", "A")
    response = dns.message.make_response(dns.message.make_query("db1.x.internal", "A"))
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect((HOST, port_of(stub)))
        await sock.send(b"\x12\x34 not a DNS message")
        await sock.send(response.to_wire())
        await sock.send(query.to_wire())
        with trio.fail_after(CLIENT_WAIT):
            first = dns.message.from_wire(await sock.recv(4096))  # (no reply came before it)
    assert query.is_response(first)
    assert addresses(first) == ["10.10.0.5"]
    assert stub.report()["queries"] == 1


async def test_a_notify_gets_notimp_and_is_not_forwarded(nursery: trio.Nursery, pki: Pki) -> None:
    upstream = Upstream(pki.server)
    stub = await start(nursery, pki, upstream)
    notify = dns.message.make_query("x.internal", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    answer = await dns.asyncquery.udp(
        notify, HOST, port=port_of(stub), timeout=CLIENT_WAIT, backend=BACKEND
    )
    assert answer.rcode() == dns.rcode.NOTIMP
    assert answer.opcode() == dns.opcode.NOTIFY
    assert upstream.accepted == 0


async def test_tcp_clients_beyond_the_bound_are_closed(nursery: trio.Nursery, pki: Pki) -> None:
    upstream = Upstream(pki.server)
    stub = await start(nursery, pki, upstream, max_tcp_clients=1)
    query = dns.message.make_query("web1.x.internal", "A")
    async with await trio.open_tcp_stream(HOST, port_of(stub)) as first:
        await first.send_all(query.to_wire(prepend_length=True))
        with trio.fail_after(CLIENT_WAIT):
            assert await read_message(first, bytearray()) is not None  # (it is being served)
        async with await trio.open_tcp_stream(HOST, port_of(stub)) as second:
            with trio.fail_after(CLIENT_WAIT):
                try:
                    await second.send_all(query.to_wire(prepend_length=True))
                    assert await read_message(second, bytearray()) is None
                except trio.BrokenResourceError:
                    pass  # (reset: closed just as well)


async def test_a_listen_address_taken_is_named_in_the_error(pki: Pki) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        stub = Stub(pki.client(), [(HOST, port)])
        with pytest.raises(OSError, match=f"{HOST}:{port} \\(UDP\\)"):
            await stub.run()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_whatever_bytes_come_they_are_a_query_or_dropped(data: st.DataObject) -> None:
    wire = bytearray(dns.message.make_query("web1.x.internal", "A", use_edns=0).to_wire())
    if data.draw(st.booleans()):
        wire = bytearray(data.draw(st.binary(max_size=600)))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    query = parse_query(bytes(wire))  # (never raises)
    assert query is None or not query.flags & dns.flags.QR


# ---- the VM's resolver configuration ------------------------------------------------------


class Reloads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_with_systemd_resolved_a_drop_in_is_written_and_resolved_reloaded(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run/systemd/resolve"
    run.mkdir(parents=True)
    (run / "stub-resolv.conf").write_text("nameserver 127.0.0.53\n")
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "etc/resolv.conf"
    conf.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    assert uses_resolved(tmp_path)
    reload = Reloads()

    point_resolver(tmp_path, "127.0.0.1", reload=reload)
    drop_in = tmp_path / "etc/systemd/resolved.conf.d/dom0.conf"
    assert drop_in.read_text() == "[Resolve]\nDNS=127.0.0.1\nDomains=~.\n"
    assert drop_in.stat().st_mode & 0o777 == 0o644
    assert reload.count == 1
    point_resolver(tmp_path, "127.0.0.1", reload=reload)
    assert reload.count == 1  # (unchanged: nothing to reload)
    assert os.readlink(conf) == "../run/systemd/resolve/stub-resolv.conf"
    assert not (tmp_path / "etc/resolv.conf.dom0-saved").exists()

    restore_resolver(tmp_path, reload=reload)
    assert not drop_in.exists()
    assert reload.count == 2
    assert os.readlink(conf) == "../run/systemd/resolve/stub-resolv.conf"


def test_resolved_is_known_by_its_socket_too(tmp_path: Path) -> None:
    run = tmp_path / "run/systemd/resolve"
    run.mkdir(parents=True)
    assert not uses_resolved(tmp_path)
    (run / "io.systemd.Resolve").touch()
    assert uses_resolved(tmp_path)


def test_without_resolved_resolv_conf_is_replaced_and_put_back(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "etc/resolv.conf"
    original = "search lan\nnameserver 192.168.1.1\n"
    conf.write_text(original)
    reload = Reloads()

    point_resolver(tmp_path, "127.0.0.1", reload=reload)
    text = conf.read_text()
    assert "dom0 agent" in text.splitlines()[0]
    assert text.endswith("nameserver 127.0.0.1\noptions edns0 trust-ad\n")
    assert (tmp_path / "etc/resolv.conf.dom0-saved").read_text() == original
    inode = conf.stat().st_ino
    point_resolver(tmp_path, "127.0.0.1", reload=reload)
    assert conf.stat().st_ino == inode  # (unchanged: not written)
    point_resolver(tmp_path, "10.10.0.5", reload=reload)
    assert conf.read_text().endswith("nameserver 10.10.0.5\noptions edns0 trust-ad\n")
    assert (tmp_path / "etc/resolv.conf.dom0-saved").read_text() == original  # (saved once)
    assert reload.count == 0

    restore_resolver(tmp_path, reload=reload)
    assert conf.read_text() == original
    assert not (tmp_path / "etc/resolv.conf.dom0-saved").exists()
    assert reload.count == 0


def test_a_linked_resolv_conf_is_replaced_not_written_through(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "run/NetworkManager").mkdir(parents=True)
    target = tmp_path / "run/NetworkManager/resolv.conf"
    target.write_text("nameserver 192.168.1.1\n")
    conf = tmp_path / "etc/resolv.conf"
    conf.symlink_to("../run/NetworkManager/resolv.conf")

    point_resolver(tmp_path, "127.0.0.1")
    assert not conf.is_symlink()
    assert "nameserver 127.0.0.1" in conf.read_text()
    assert target.read_text() == "nameserver 192.168.1.1\n"
    saved = tmp_path / "etc/resolv.conf.dom0-saved"
    assert os.readlink(saved) == "../run/NetworkManager/resolv.conf"

    restore_resolver(tmp_path)
    assert os.readlink(conf) == "../run/NetworkManager/resolv.conf"
    assert conf.read_text() == "nameserver 192.168.1.1\n"
    assert not os.path.lexists(saved)


def test_a_resolv_conf_the_agent_made_from_nothing_is_removed(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    point_resolver(tmp_path, "::1")
    conf = tmp_path / "etc/resolv.conf"
    assert "nameserver ::1" in conf.read_text()
    assert not os.path.lexists(tmp_path / "etc/resolv.conf.dom0-saved")
    restore_resolver(tmp_path)
    assert not os.path.lexists(conf)
    assert "nothing" in restore_resolver(tmp_path)


def test_an_address_that_is_not_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    with pytest.raises(ResolverError, match="not an IP address"):
        point_resolver(tmp_path, "127.0.0.1\nnameserver 203.0.113.9")
    assert not (tmp_path / "etc/resolv.conf").exists()
