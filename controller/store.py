"""The state store: SQLite (WAL) in the state directory.

What the controller decided and must remember: allocations (rule slots and
addresses) and what it last applied. Every change is one transaction, and
the UNIQUE constraints are the last line of defence: killing the controller
at any moment can lose an undecided allocation but never a committed one,
and can never leave two machines holding one slot or one address.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network
from pathlib import Path

from controller.core.allocation import Allocation
from controller.core.desired import (
    BINDING,
    PORT_MAC,
    DhcpConfig,
    DhcpHost,
    DhcpRange,
    MachineState,
    Shape,
)
from controller.core.plan import EMPTY, Flat

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS allocations (
    mac TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    slot INTEGER NOT NULL CHECK (slot >= 1),
    domain TEXT NOT NULL,
    address TEXT,
    port TEXT NOT NULL,
    absent_since INTEGER,
    UNIQUE (rule, slot),
    UNIQUE (domain, address)
);
CREATE TABLE IF NOT EXISTS applied_machines (
    mac TEXT PRIMARY KEY,
    port TEXT NOT NULL,
    address TEXT,
    hostname TEXT,
    tag TEXT
);
CREATE TABLE IF NOT EXISTS applied_policy (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(Exception):
    pass


class Store:
    def __init__(self, state_dir: str | Path, *, readonly: bool = False) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "state.sqlite"
        if readonly:
            if not self.path.exists():
                raise StoreError(f"{self.path}: no state store here")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fresh = not self.path.exists()
            self.db = sqlite3.connect(self.path, isolation_level=None)
            if fresh:
                os.chmod(self.path, 0o600)
            # WAL: readers (dom0 plan) never block the controller. NORMAL
            # sync: a commit survives the process being killed at any point
            # (the WAL is in the OS); only power loss can drop the last ones.
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            self._check_version()
        self.db.execute("PRAGMA busy_timeout=5000")

    def _check_version(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {row[0]}, this dom0 knows {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self.db.close()

    # -- allocations -------------------------------------------------------------
    def allocations(self) -> list[Allocation]:
        rows = self.db.execute(
            "SELECT mac, rule, slot, domain, address, port, absent_since FROM allocations"
        )
        return [Allocation(*row) for row in rows]

    def commit_allocations(self, put: Iterable[Allocation], remove: Iterable[str] = ()) -> None:
        """One transaction: removals first, so a slot or an address can pass
        from a released machine to a new one in the same commit."""
        with _transaction(self.db):
            self.db.executemany("DELETE FROM allocations WHERE mac=?", [(m,) for m in remove])
            self.db.executemany(
                "INSERT INTO allocations VALUES (?,?,?,?,?,?,?) ON CONFLICT(mac) DO UPDATE SET "
                "rule=excluded.rule, slot=excluded.slot, domain=excluded.domain, "
                "address=excluded.address, port=excluded.port, absent_since=excluded.absent_since",
                [(a.mac, a.rule, a.slot, a.domain, a.address, a.port, a.absent_since) for a in put],
            )

    # -- what was last applied ---------------------------------------------------
    def commit_applied_machines(self, changes: Mapping[str, MachineState | None]) -> None:
        with _transaction(self.db):
            for mac, m in changes.items():
                if m is None:
                    self.db.execute("DELETE FROM applied_machines WHERE mac=?", (mac,))
                    continue
                (port, _mac), *_ = m.elements[PORT_MAC]
                h = m.dhcp
                self.db.execute(
                    "INSERT OR REPLACE INTO applied_machines VALUES (?,?,?,?,?)",
                    (
                        mac,
                        port,
                        h.address if h else None,
                        h.hostname if h else None,
                        h.tag if h else None,
                    ),
                )

    def replace_applied(self, flat_policy: Flat, machines: Mapping[str, MachineState]) -> None:
        """After a full apply: the whole applied record at once."""
        with _transaction(self.db):
            self.db.execute("DELETE FROM applied_machines")
            self.db.execute("DELETE FROM applied_policy")
        self.commit_applied_policy(flat_policy)
        self.commit_applied_machines(machines)

    def commit_applied_policy(self, flat: Flat) -> None:
        value = {
            "shape": None if flat.shape is None else [flat.shape.bridge, flat.shape.wan],
            "sets": {f"{k[0]}/{k[1]}": sorted(list(e) for e in v) for k, v in flat.sets.items()},
            "addresses": sorted(flat.addresses),
            "dhcp": None if flat.dhcp is None else _dhcp_json(flat.dhcp),
        }
        with _transaction(self.db):
            self.db.execute(
                "INSERT OR REPLACE INTO applied_policy VALUES ('state', ?)", (json.dumps(value),)
            )

    def applied_machines(self) -> dict[str, MachineState]:
        out = {}
        for mac, port, address, hostname, tag in self.db.execute(
            "SELECT mac, port, address, hostname, tag FROM applied_machines"
        ):
            elements = {PORT_MAC: frozenset({(port, mac)}), BINDING: frozenset()}
            host = None
            if address is not None:
                elements[BINDING] = frozenset({(port, mac, address)})
                host = DhcpHost(mac, address, hostname, tag)
            out[mac] = MachineState(elements, host)
        return out

    def applied_policy(self) -> Flat:
        row = self.db.execute("SELECT value FROM applied_policy WHERE key='state'").fetchone()
        if row is None:
            return EMPTY
        v = json.loads(row[0])
        return Flat(
            shape=None if v["shape"] is None else Shape(*v["shape"]),
            sets={
                tuple(k.split("/", 1)): frozenset(tuple(e) for e in elems)  # type: ignore[misc]
                for k, elems in v["sets"].items()
            },
            addresses=frozenset(v["addresses"]),
            dhcp=None if v["dhcp"] is None else _dhcp_from_json(v["dhcp"]),
            hosts={},
        )


def _dhcp_json(c: DhcpConfig) -> dict:
    return {
        "bridge": c.bridge,
        "lease": c.lease_seconds,
        "ranges": [[r.tag, str(r.network), r.router, r.domain_name] for r in c.ranges],
    }


def _dhcp_from_json(v: dict) -> DhcpConfig:
    return DhcpConfig(
        v["bridge"],
        v["lease"],
        tuple(DhcpRange(t, IPv4Network(n), r, d) for t, n, r, d in v["ranges"]),
    )


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
