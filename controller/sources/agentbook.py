"""Which configuration each agent should have, which it applied, which it
refused: versions, ACKs and NACKs, kept in the store.

A machine's configuration gets a new version only when what it says
changes; the version is stored with it, so a restarted controller goes on
counting where it stopped and pushes nothing an agent already has as new.
Pushing is the connections' job (controller/sources/agents.py): each asks
`next_push` with the last version it sent on that connection, and waits on
`changed` for the next. A version an agent NACKed is never pushed again,
not on this connection nor on a later one: only a changed configuration,
with a new version, is.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from common import agentconfig
from common.agentconfig import MachineConfig
from controller.pki.store import transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_configs (
    name TEXT PRIMARY KEY,          -- the machine's fqdn
    version INTEGER NOT NULL CHECK (version >= 1),
    config TEXT NOT NULL,           -- its wire form (common/agentconfig.py), canonical JSON
    changed INTEGER NOT NULL,       -- when this version was made (unix seconds)
    acked INTEGER,                  -- the last version the agent applied
    acked_at INTEGER,
    nacked INTEGER,                 -- the last version it refused, and why
    nack_reason TEXT,
    nacked_at INTEGER
)
"""

# names -> their configuration now (None: a machine with none to take)
Source = Callable[[Collection[str]], Mapping[str, MachineConfig | None]]


@dataclass
class Record:
    version: int
    config: dict[str, Any]
    text: str
    changed: int
    acked: int | None = None
    acked_at: int | None = None
    nacked: int | None = None
    nack_reason: str | None = None
    nacked_at: int | None = None


@dataclass
class Live:
    """One connected agent."""

    serial: str
    source: str
    slot: str
    since: float
    report: dict[str, Any] | None = None
    reported_version: int | None = None
    last_seen: float = 0.0
    sent: int = 0  # the last version pushed on this connection (0: none)
    looked: bool = False  # its pusher has looked at what to push since it connected


def _canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass
class ConfigBook:
    db: sqlite3.Connection
    source: Source
    clock: Callable[[], float] = time.time
    records: dict[str, Record] = field(default_factory=dict)
    live: dict[str, Live] = field(default_factory=dict)
    _events: dict[str, trio.Event] = field(default_factory=dict)
    # called with an agent's name and its report when the containers it
    # reports change (their names in DNS: kept while it is away)
    on_containers: Callable[[str, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        with transaction(self.db):
            self.db.execute(_SCHEMA)
        for row in self.db.execute(
            "SELECT name, version, config, changed, acked, acked_at, nacked, nack_reason, "
            "nacked_at FROM agent_configs"
        ):
            name, version, text, *rest = row
            self.records[name] = Record(version, json.loads(text), text, *rest)

    # -- what an agent should have -------------------------------------------------------
    def refresh(self, names: Collection[str] | None = None) -> list[str]:
        """Bring the configurations of `names` (default: the connected
        agents) up to date; the names whose version changed are woken."""
        wanted = list(self.live) if names is None else list(names)
        if not wanted:
            return []
        now = int(self.clock())
        changed = []
        configs = self.source(wanted)
        with transaction(self.db):
            for name in wanted:
                config = configs.get(name)
                if config is None:
                    continue
                obj = agentconfig.to_wire(config)
                text = _canonical(obj)
                old = self.records.get(name)
                if old is not None and old.text == text:
                    continue
                version = 1 if old is None else old.version + 1
                rec = Record(version, obj, text, now)
                if old is not None:
                    rec.acked, rec.acked_at = old.acked, old.acked_at
                    rec.nacked, rec.nack_reason, rec.nacked_at = (
                        old.nacked, old.nack_reason, old.nacked_at)  # fmt: skip
                self.records[name] = rec
                self.db.execute(
                    "INSERT INTO agent_configs (name, version, config, changed) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET version = excluded.version,"
                    " config = excluded.config, changed = excluded.changed",
                    (name, version, text, now),
                )
                changed.append(name)
        for name in changed:
            self._wake(name)
        return changed

    def next_push(self, name: str, sent: int) -> tuple[int, dict[str, Any]] | None:
        """What to push to `name` on a connection that has sent version `sent`
        (0: nothing yet), or None."""
        if (live := self.live.get(name)) is not None:
            live.looked = True
        rec = self.records.get(name)
        if rec is None or rec.version <= sent or rec.nacked == rec.version:
            return None
        return rec.version, rec.config

    async def changed(self, name: str) -> None:
        """Returns once `name`'s configuration may have changed."""
        event = self._events.get(name)
        if event is None:
            event = self._events[name] = trio.Event()
        await event.wait()

    def _wake(self, name: str) -> None:
        event = self._events.pop(name, None)
        if event is not None:
            event.set()

    # -- what the agents say ---------------------------------------------------------------
    def ack(self, name: str, version: int) -> None:
        rec = self.records.get(name)
        if rec is None or version > rec.version:
            return  # (a version this controller never made: nothing to record)
        now = int(self.clock())
        rec.acked, rec.acked_at = version, now
        with transaction(self.db):
            self.db.execute(
                "UPDATE agent_configs SET acked = ?, acked_at = ? WHERE name = ?",
                (version, now, name),
            )

    def nack(self, name: str, version: int, reason: str) -> None:
        rec = self.records.get(name)
        if rec is None or version > rec.version:
            return
        now = int(self.clock())
        rec.nacked, rec.nack_reason, rec.nacked_at = version, reason, now
        with transaction(self.db):
            self.db.execute(
                "UPDATE agent_configs SET nacked = ?, nack_reason = ?, nacked_at = ? "
                "WHERE name = ?",
                (version, reason, now, name),
            )

    def connect(self, name: str, serial: str, source: str, slot: str) -> None:
        self.live[name] = Live(serial, source, slot, self.clock(), last_seen=self.clock())
        self.refresh([name])

    def disconnect(self, name: str, serial: str) -> None:
        live = self.live.get(name)
        if live is not None and live.serial == serial:
            del self.live[name]

    def pushed(self, name: str, version: int) -> None:
        if (live := self.live.get(name)) is not None:
            live.sent = version

    def seen(self, name: str) -> None:
        if (live := self.live.get(name)) is not None:
            live.last_seen = self.clock()

    def status(self, name: str, version: int | None, report: dict[str, Any]) -> None:
        if (live := self.live.get(name)) is not None:
            before = live.report.get("containers") if isinstance(live.report, dict) else None
            live.report, live.reported_version = report, version
            if report.get("containers") != before and self.on_containers is not None:
                self.on_containers(name, report)

    # -- what `dom0 status` shows ----------------------------------------------------------
    def report(self) -> list[dict[str, Any]]:
        out = []
        for name in sorted(set(self.records) | set(self.live)):
            rec = self.records.get(name)
            live = self.live.get(name)
            entry: dict[str, Any] = {
                "name": name,
                "connected": live is not None,
                "version": rec.version if rec else None,
                "applied": rec.acked if rec else None,
                "in_sync": rec is not None and rec.acked == rec.version,
                "last_nack": None
                if rec is None or rec.nacked is None
                else {"version": rec.nacked, "reason": rec.nack_reason, "at": rec.nacked_at},
            }
            if live is not None:
                entry.update(
                    serial=live.serial,
                    source=live.source,
                    slot=live.slot,
                    since=round(live.since, 3),
                    pushed=live.sent or None,
                    looked=live.looked,
                    report=live.report,
                )
            out.append(entry)
        return out
