"""The in-namespace halves of `dom0 bench push` (started by it inside its
namespace, driven over stdin/stdout with one JSON object per line). Two
roles, two processes, so that each one's memory is its own:

    controller ROLE: a real CA and store in WORK/controller, one token per
                     machine written into WORK/agents/mK/token, and the
                     agents' Listener (Enrollment, ConfigBook) on
                     127.0.0.1:8443, wired as controller/engine.py wires it.
                     Machine K holds 127.0.1.K. Commands: synced, changes N.
    agents ROLE:     N real `agents.session.Agent`s in one trio process, each
                     with its own root and source address 127.0.1.K; each
                     enrolls (one after the other, timed), then all hold
                     their sessions. Command: rss.

Only the applier is not the agent's own: `NoopApplier` stands in for
agents/apply.py, whose kernel work `tests/lab/test_agent_apply.py` covers;
what is measured here is the push path, from the book to the agent's ACK.
Every wait has a deadline; a missed one ends the worker with one line on
stderr and exit 1.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel

from common.agentconfig import MachineConfig, Route

if TYPE_CHECKING:
    from controller.sources.agentbook import ConfigBook

SERVER = "127.0.0.1"
MAX_AGENTS = 200  # machine K holds 127.0.1.K
TOKEN_TTL = 3600  # seconds
SYNC_DEADLINE = 60.0  # seconds for all agents connected and in sync, plus SYNC_PER_AGENT each
SYNC_PER_AGENT = 0.5
CHANGE_DEADLINE = 30.0  # seconds for one change to be ACKed (and reported) by every agent
ENROLL_DEADLINE = 30.0  # seconds for one agent's enrollment
# The bench's stand-in's WireGuard public key: any valid one will do, since no
# tunnel is made (base64 of 32 bytes 0x01; all zeros is not a valid key).
BENCH_WG_KEY = base64.b64encode(bytes([1]) * 32).decode()


class BenchFailed(Exception):
    """One line: what did not happen in time, or what broke."""


def address(k: int) -> str:
    return f"127.0.1.{k}"


def fqdn(k: int) -> str:
    return f"m{k}.x.internal"


def machine_config(k: int, generation: int) -> MachineConfig:
    """Machine K's configuration at a generation: each generation is a policy
    change that touches every machine (a route every machine gets, to a
    network that changes with the generation)."""
    net = f"10.10.{k // 250}"
    gateway = f"{net}.254"
    return MachineConfig(
        name=fqdn(k),
        hostname=f"m{k}",
        mac=f"52:54:00:00:{k >> 8:02x}:{k & 255:02x}",
        addresses=(f"{net}.{k % 250 + 1}/24",),
        routes=(Route("0.0.0.0/0", gateway), Route(f"172.16.{generation % 256}.0/24", gateway)),
    )


def rss_mb() -> float:
    """This process's resident set (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise BenchFailed("no VmRSS in /proc/self/status")


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Commands:
    """The parent's commands, one JSON object per line on stdin (EOF: quit)."""

    def __init__(self) -> None:
        self.stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        self.buf = b""

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                return {"op": "quit"}
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        cmd: dict[str, Any] = json.loads(line)
        return cmd


# -- the controller ----------------------------------------------------------------------
class Watch:
    """Wrapped around a ConfigBook's `ack` and `status`: notes the moment the
    last of the machines it waits for has ACKed its current version (after
    the book recorded that ACK, as it always does), and when each has then
    sent its Status (the agent's report that follows its ACK; not timed).

    A wrapper rather than a subclass, so that this module imports nothing of
    the controller's at its top: the agents role's memory is an agent's."""

    def __init__(self, book: ConfigBook) -> None:
        self.book = book
        self.unacked: set[str] = set()
        self.unreported: set[str] = set()
        self.last_ack = 0.0
        self.settled = trio.Event()
        ack, status = book.ack, book.status

        def watched_ack(name: str, version: int) -> None:
            ack(name, version)
            if name in self.unacked and self._current(name, version):
                self.unacked.discard(name)
                if not self.unacked:
                    self.last_ack = time.perf_counter()
                    self._settle()

        def watched_status(name: str, version: int | None, report: dict[str, Any]) -> None:
            status(name, version, report)
            if name in self.unreported and self._current(name, version):
                self.unreported.discard(name)
                self._settle()

        setattr(book, "ack", watched_ack)  # noqa: B010  (mypy: no assigning to a method)
        setattr(book, "status", watched_status)  # noqa: B010

    def expect(self, names: Collection[str]) -> None:
        self.unacked, self.unreported = set(names), set(names)
        self.settled = trio.Event()

    def _current(self, name: str, version: int | None) -> bool:
        rec = self.book.records.get(name)
        return rec is not None and rec.acked == rec.version == version

    def _settle(self) -> None:
        if not self.unacked and not self.unreported:
            self.settled.set()


def _few(names: Collection[str]) -> str:
    return ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")


async def _caught_up(watch: Watch, n: int, deadline: float, what: str) -> None:
    """Every agent ACKed its current version and sent its Status after it."""
    with trio.move_on_after(deadline) as limit:
        await watch.settled.wait()
    if limit.cancelled_caught:
        late = watch.unacked or watch.unreported
        said = "ACKed" if watch.unacked else "reported"
        raise BenchFailed(f"{what}: {len(late)} of {n} agents had not {said} their current "
                          f"configuration within {deadline:g} s: {_few(late)}")  # fmt: skip


async def run_controller(n: int, work: Path) -> None:
    from controller.pki import ca, issue
    from controller.pki.enroll import Enrollment
    from controller.pki.tokens import Tokens
    from controller.sources.agentbook import ConfigBook
    from controller.sources.agents import AGENT_PORT, REVOCATION_POLL, Listener, server_context
    from controller.store import Store

    state = work / "controller"
    store = Store(state)
    db = store.db
    now = datetime.now(UTC)
    authority = ca.init(state, db, "internal", now)
    authority.issue_server(["dom0.internal"], [SERVER], now)
    bundle = authority.write_bundle(now)
    tokens = Tokens(db)
    tokens.ensure_schema()
    fingerprint = issue.fingerprint(authority.root)
    held = {address(k): (fqdn(k), issue.slot_uri("bench", k)) for k in range(1, n + 1)}
    index = {fqdn(k): k for k in range(1, n + 1)}
    names = sorted(index)
    for k in range(1, n + 1):
        token = tokens.create(fingerprint, "machine", fqdn(k), TOKEN_TTL, now)
        root = work / "agents" / f"m{k}"
        root.mkdir(parents=True, mode=0o700)
        fd = os.open(root / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")

    generation = 0

    def source(wanted: Collection[str]) -> Mapping[str, MachineConfig | None]:
        return {
            name: machine_config(index[name], generation) if name in index else None
            for name in wanted
        }

    book = ConfigBook(db, source)
    watch = Watch(book)
    watch.expect(names)
    enrollment = Enrollment(
        authority, tokens, held.get, lambda: datetime.now(UTC), lambda _fqdn, _key: None
    )
    listener = Listener(
        server_context(bundle, authority.dir / ca.SERVER_PEM),
        held.get,
        authority.revoked,
        enroll=enrollment,
        renew=enrollment.renew,
        book=book,
    )

    async def one(stream: trio.SocketStream) -> None:
        try:
            await listener.handle(stream, str(stream.socket.getpeername()[0]))
        except Exception:
            logging.exception("bench controller: a connection failed")

    async def revocations() -> None:
        while True:
            await trio.sleep(REVOCATION_POLL)
            listener.revoked(authority.revoked())

    commands = Commands()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(AGENT_PORT, host=SERVER)
        nursery.start_soon(trio.serve_listeners, one, listeners)
        nursery.start_soon(revocations)
        reply({"listening": f"{SERVER}:{AGENT_PORT}", "rss_mb": rss_mb()})
        while True:
            cmd = await commands.next()
            if cmd["op"] == "synced":
                deadline = SYNC_DEADLINE + SYNC_PER_AGENT * n
                await _caught_up(watch, n, deadline, "the first configuration")
                reply({"rss_mb": rss_mb(), "in_sync_at": watch.last_ack,
                       "connected": len(listener.live)})  # fmt: skip
            elif cmd["op"] == "changes":
                samples, refreshes = [], []
                cpu = time.process_time()
                for i in range(cmd["n"]):
                    generation += 1
                    watch.expect(names)
                    t0 = time.perf_counter()
                    changed = book.refresh()
                    refreshes.append(time.perf_counter() - t0)  # (before anything is pushed)
                    if sorted(changed) != names:
                        raise BenchFailed(f"change {i + 1}: {len(changed)} of {n} configurations "
                                          "changed (an agent is not connected?)")  # fmt: skip
                    await _caught_up(watch, n, CHANGE_DEADLINE, f"change {i + 1}")
                    samples.append(watch.last_ack - t0)
                    versions = {book.records[name].acked or 0 for name in names}
                    if versions != {i + 2}:  # (version 1 was the first configuration)
                        raise BenchFailed(f"change {i + 1}: ACKed versions {sorted(versions)}, "
                                          f"expected {i + 2}")  # fmt: skip
                reply({"seconds": samples, "refresh_seconds": refreshes,
                       "cpu_seconds": time.process_time() - cpu,
                       "rss_mb": rss_mb(), "refusals": listener.refusals})  # fmt: skip
            elif cmd["op"] == "quit":
                reply({})
                nursery.cancel_scope.cancel()
                break
    store.close()


# -- the agents --------------------------------------------------------------------------
class NoopApplier:
    """The bench's stand-in for agents/apply.py's Applier: applies nothing,
    observes nothing, and has a fixed WireGuard key. Applying to the kernel
    is measured elsewhere; here only what surrounds it."""

    def apply(self, config: MachineConfig, previous: MachineConfig | None) -> None:
        return None

    def observe(self, config: MachineConfig) -> dict[str, Any]:
        return {}

    def wg_public_key(self) -> str:
        return BENCH_WG_KEY


async def run_agents(n: int, work: Path) -> None:
    # A real agent imports its applier, pyroute2 with it: counted in its memory.
    importlib.import_module("agents.apply")
    from agents.files import Root
    from agents.session import Agent

    fleet = [
        Agent(Root(work / "agents" / f"m{k}"), NoopApplier(), SERVER, local_address=address(k))
        for k in range(1, n + 1)
    ]
    enroll = []
    for k, agent in enumerate(fleet, 1):
        t0 = time.perf_counter()
        with trio.move_on_after(ENROLL_DEADLINE) as limit:
            try:
                await agent.enroll()
            except Exception as e:
                raise BenchFailed(f"agent {fqdn(k)}: enrollment failed: {e}") from None
        if limit.cancelled_caught:
            raise BenchFailed(f"agent {fqdn(k)}: not enrolled within {ENROLL_DEADLINE:g} s")
        enroll.append(time.perf_counter() - t0)

    async def hold(k: int, agent: Agent) -> None:
        try:
            await agent.session()
        except Exception as e:
            raise BenchFailed(f"agent {fqdn(k)}: the session ended: {e}") from None
        raise BenchFailed(f"agent {fqdn(k)}: the controller ended the session")

    commands = Commands()
    async with trio.open_nursery() as nursery:
        # (perf_counter is CLOCK_MONOTONIC on Linux: one clock for both processes)
        started = time.perf_counter()
        for k, agent in enumerate(fleet, 1):
            nursery.start_soon(hold, k, agent)
        reply({"enroll_seconds": enroll, "sessions_started_at": started})
        while True:
            cmd = await commands.next()
            if cmd["op"] == "rss":
                versions = sorted({a.known.version if a.known else 0 for a in fleet})
                # (this module's own package aside, nothing of the controller's)
                mine = {"controller", "controller.bench", "controller.bench.pushworker"}
                extra = sorted(m for m in sys.modules if m.split(".")[0] == "controller")
                reply({"rss_mb": rss_mb(), "versions": versions,
                       "cpu_seconds": time.process_time(),
                       "controller_modules": [m for m in extra if m not in mine]})  # fmt: skip
            elif cmd["op"] == "quit":
                reply({})
                nursery.cancel_scope.cancel()
                break


def _first(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m controller.bench.pushworker")
    p.add_argument("role", choices=("controller", "agents"))
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args()
    if not 1 <= args.agents <= MAX_AGENTS:
        p.error(f"--agents: expected 1..{MAX_AGENTS}")
    form = f"pushworker {args.role}: %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=form)
    role = run_controller if args.role == "controller" else run_agents
    failed: BaseException | None = None
    try:
        trio.run(role, args.agents, args.work)
    except* BenchFailed as group:
        failed = _first(group)
    if failed is not None:
        print(f"pushworker {args.role}: {failed}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
