"""The real agent session (agents/session.py) against the real listener and
config book (controller/sources/), over real TLS 1.3 on an in-memory link:
the agent applies what is pushed and ACKs it, NACKs what its applier
refuses (and keeps its last-known-good), and renews its certificate at half
its life. Only the applier is a stand-in (the kernel's part is
tests/lab/test_agent_apply.py and tests/lab/test_agent_lab.py)."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from cryptography.hazmat.primitives import serialization

from agents import identity
from agents.apply import ApplyError
from agents.files import Root
from agents.session import Agent
from common.agentconfig import MachineConfig, Route
from controller.pki import ca, issue
from controller.pki.enroll import Enrollment
from controller.pki.tokens import Tokens
from controller.sources.agentbook import ConfigBook
from controller.sources.agents import Listener, server_context
from controller.store import Store

NAME, SLOT, SOURCE = "web1.x.internal", "dom0:slot/odd/1", "10.10.0.5"


class Applier:
    """The stand-in: records what it was asked to apply; refuses a gateway .99."""

    def __init__(self) -> None:
        self.applied: list[MachineConfig] = []

    def apply(self, config: MachineConfig, previous: MachineConfig | None) -> None:
        if any(r.via == "10.10.0.99" for r in config.routes):
            raise ApplyError("route 0.0.0.0/0 via 10.10.0.99: Network is unreachable")
        self.applied.append(config)

    def observe(self, config: MachineConfig) -> dict[str, Any]:
        return {"addresses": list(config.addresses)}

    def wg_public_key(self) -> str:
        return "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="


class Site:
    def __init__(self, tmp: Path, hours: float = 24) -> None:
        self.now = datetime.now(UTC)
        store = Store(tmp / "state")
        self.ca = ca.init(tmp / "state", store.db, "internal", self.now - timedelta(days=1))
        self.ca.issue_server(["dom0.internal"], ["10.10.0.1"], self.now)
        bundle = self.ca.write_bundle(self.now)
        self.gateway = "10.10.0.1"
        self.book = ConfigBook(sqlite3.connect(tmp / "book.db", isolation_level=None), self.source)
        self.gateway_of_route = "10.10.0.1"
        holder = {SOURCE: (NAME, SLOT)}.get
        enrollment = Enrollment(self.ca, Tokens(store.db), holder, lambda: self.now,
                                lambda *_: None, hours=hours)  # fmt: skip
        self.listener = Listener(
            server_context(bundle, tmp / "state" / "ca" / "server.pem"),
            holder,
            self.ca.revoked,
            renew=enrollment.renew,
            book=self.book,
        )
        # the agent, enrolled already: its key, its certificate, the pinned root
        self.root = Root(tmp / "agent")
        self.root.ensure()
        key = identity.ensure_key(self.root)
        issued = self.ca.issue_agent(identity.csr_pem(key), NAME, SLOT, self.now, hours)
        self.root.cert.write_bytes(issued.chain_pem)
        self.root.ca.write_bytes(self.ca.root.public_bytes(serialization.Encoding.PEM))
        self.serial = issued.serial

    def source(self, names: object) -> dict[str, MachineConfig | None]:
        return {
            NAME: MachineConfig(
                name=NAME,
                hostname="web1",
                mac="52:54:00:d0:00:01",
                addresses=(f"{SOURCE}/24",),
                routes=(Route("0.0.0.0/0", self.gateway_of_route),),
            )
        }

    def agent(self, applier: Applier, **kwargs: Any) -> Agent:
        async def link(host: str, port: int, local: str | None) -> trio.abc.Stream:
            server_end, client_end = trio.testing.memory_stream_pair()
            self.nursery.start_soon(self.listener.handle, server_end, SOURCE)
            return client_end

        return Agent(self.root, applier, self.gateway, open_stream=link, **kwargs)

    nursery: trio.Nursery


async def until(check: Any, seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        # (polls state that the code under test changes: no event of its own to wait on)
        while not check():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_pushed_configurations_are_applied_acked_or_nacked(tmp_path: Path) -> None:
    site = Site(tmp_path)
    applier = Applier()
    async with trio.open_nursery() as nursery:
        site.nursery = nursery
        agent = site.agent(applier)
        nursery.start_soon(agent.session)
        await until(lambda: site.book.records.get(NAME) and site.book.records[NAME].acked == 1)
        assert [c.routes[0].via for c in applier.applied] == ["10.10.0.1"]
        assert site.root.known() is not None and site.root.known().version == 1  # type: ignore[union-attr]
        # an unappliable change: NACKed with the reason, the last-known-good stays
        site.gateway_of_route = "10.10.0.99"
        site.book.refresh()
        await until(lambda: site.book.records[NAME].nacked == 2)
        assert "Network is unreachable" in (site.book.records[NAME].nack_reason or "")
        assert site.root.known().version == 1  # type: ignore[union-attr]
        assert len(applier.applied) == 1
        # the control: a change it can apply is pushed, applied and ACKed
        site.gateway_of_route = "10.10.0.254"
        site.book.refresh()
        await until(lambda: site.book.records[NAME].acked == 3)
        assert applier.applied[-1].routes[0].via == "10.10.0.254"
        nursery.cancel_scope.cancel()


async def test_the_certificate_is_renewed_at_half_its_life(tmp_path: Path) -> None:
    site = Site(tmp_path, hours=1)
    first = identity.life(site.root.cert.read_bytes())
    later = first.not_before + timedelta(minutes=40)  # past half its life, and the jitter
    site.now = later  # (dom0's clock too: the new certificate starts then)
    async with trio.open_nursery() as nursery:
        site.nursery = nursery
        agent = site.agent(Applier(), clock=lambda: later)
        nursery.start_soon(agent.session)
        await until(lambda: identity.life(site.root.cert.read_bytes()).serial != first.serial)
        nursery.cancel_scope.cancel()
    renewed = identity.life(site.root.cert.read_bytes())
    assert renewed.not_after > first.not_after
    cert = site.root.cert.read_bytes()
    from cryptography import x509

    who = issue.agent_identity(x509.load_pem_x509_certificate(cert))
    assert who.fqdn == NAME  # the same machine and slot, for the same key


async def test_a_change_made_while_one_is_being_sent_is_pushed_too(tmp_path: Path) -> None:
    """Two changes in a row, the second while the first is on its way: the
    agent ends on the second (a lost wake-up once left it one behind)."""
    site = Site(tmp_path)
    async with trio.open_nursery() as nursery:
        site.nursery = nursery
        nursery.start_soon(site.agent(Applier()).session)
        await until(lambda: site.book.records.get(NAME) and site.book.records[NAME].acked == 1)
        for trial in range(20):
            site.gateway_of_route = f"10.10.0.{100 + trial}"
            site.book.refresh()
            for _ in range(trial % 5):  # let the pusher get into its send
                await trio.lowlevel.checkpoint()
            site.gateway_of_route = f"10.10.0.{200 + trial}"
            site.book.refresh()
            want = site.book.records[NAME].version
            await until(lambda: site.book.records[NAME].acked == want, 5)  # noqa: B023
        nursery.cancel_scope.cancel()


async def test_a_discovered_answer_is_trusted_only_when_its_tls_verifies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent given no address tries what discovery found, in order: an
    impostor answering first (its own CA, a certificate for its own
    address) fails the handshake against the pinned root, and the agent goes
    on to dom0. The control: with only the impostor found, it never gets a
    session."""
    site = Site(tmp_path / "dom0")
    other = Store(tmp_path / "other")
    impostor = ca.init(tmp_path / "other", other.db, "internal", site.now - timedelta(days=1))
    impostor.issue_server(["dom0.internal"], ["10.99.9.9"], site.now)
    fake = Listener(
        server_context(impostor.write_bundle(site.now), tmp_path / "other" / "ca" / "server.pem"),
        {SOURCE: (NAME, SLOT)}.get,
        impostor.revoked,
    )
    tried: list[str] = []

    async def link(host: str, port: int, local: str | None) -> trio.abc.Stream:
        tried.append(host)
        server_end, client_end = trio.testing.memory_stream_pair()
        listener = fake if host == "10.99.9.9" else site.listener
        site.nursery.start_soon(listener.handle, server_end, SOURCE)
        return client_end

    def agent(found: list[tuple[str, int]]) -> Agent:
        return Agent(site.root, Applier(), None, open_stream=link, discover=lambda: list(found),
                     rng=random.Random(1))  # fmt: skip

    async with trio.open_nursery() as nursery:
        site.nursery = nursery
        first = agent([("10.99.9.9", 8443), ("10.10.0.1", 8443)])
        nursery.start_soon(first.run)
        await until(lambda: site.book.records.get(NAME) and site.book.records[NAME].acked == 1)
        assert tried[:2] == ["10.99.9.9", "10.10.0.1"] and first.server == "10.10.0.1"
        assert fake.refusals == 1 and not fake.live  # (its TLS handshake failed: no hello)
        nursery.cancel_scope.cancel()
    tried.clear()
    async with trio.open_nursery() as nursery:
        site.nursery = nursery
        alone = agent([("10.99.9.9", 8443)])
        nursery.start_soon(alone.run)
        await until(lambda: len(tried) >= 2)  # tried, failed, browsed again, tried again
        assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)
        assert alone.sessions == 0 and set(tried) == {"10.99.9.9"}
        nursery.cancel_scope.cancel()
