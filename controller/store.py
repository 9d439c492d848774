"""The state store: SQLite (WAL) in the state directory.

What the controller decided and must remember: allocations (rule slots and
addresses). What is applied is not recorded here: it is read back from the
drivers (see controller/dataplane.py). Every change is one transaction, and
the UNIQUE constraints are the last line of defence: killing the controller
at any moment can lose an undecided allocation but never a committed one,
and can never leave two machines holding one slot or one address.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from controller.core.allocation import Allocation

SCHEMA_VERSION = 4
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
    underlay TEXT UNIQUE,
    port_index INTEGER,
    confirmed INTEGER NOT NULL DEFAULT 0,
    origin TEXT,
    previous TEXT,
    previous_until INTEGER,
    remapped_at INTEGER,
    UNIQUE (rule, slot),
    UNIQUE (domain, address)
);
CREATE TABLE IF NOT EXISTS address_history (
    rule TEXT NOT NULL,
    slot INTEGER NOT NULL,
    domain TEXT NOT NULL,
    address TEXT NOT NULL,
    mac TEXT NOT NULL,
    since INTEGER NOT NULL,
    until INTEGER
);
CREATE INDEX IF NOT EXISTS address_history_slot ON address_history (rule, slot, since);
"""
# Each step takes the schema from version N to N+1, in one transaction.
_MIGRATIONS = {
    1: """
    ALTER TABLE allocations ADD COLUMN underlay TEXT;
    CREATE UNIQUE INDEX allocations_underlay ON allocations (underlay);
    DROP TABLE applied_machines;  -- a record of what was applied: the next sync rewrites it
    CREATE TABLE applied_machines (mac TEXT PRIMARY KEY, state TEXT NOT NULL);
    DELETE FROM applied_policy;
    """,
    # Port security: a port is identified by its ifindex too; machines that
    # held their lease are established (those already stored have served).
    2: """
    ALTER TABLE allocations ADD COLUMN port_index INTEGER;
    ALTER TABLE allocations ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE allocations ADD COLUMN origin TEXT;
    UPDATE allocations SET confirmed = 1;
    DROP TABLE applied_machines;  -- what is applied is read from the drivers now
    DROP TABLE applied_policy;
    """,
    # Remapping: the address a machine had before its last remap, kept until
    # previous_until; every address a slot held, and when.
    3: """
    ALTER TABLE allocations ADD COLUMN previous TEXT;
    ALTER TABLE allocations ADD COLUMN previous_until INTEGER;
    ALTER TABLE allocations ADD COLUMN remapped_at INTEGER;
    CREATE TABLE address_history (rule TEXT NOT NULL, slot INTEGER NOT NULL,
        domain TEXT NOT NULL, address TEXT NOT NULL, mac TEXT NOT NULL,
        since INTEGER NOT NULL, until INTEGER);
    CREATE INDEX address_history_slot ON address_history (rule, slot, since);
    """,
}


class StoreError(Exception):
    pass


class Store:
    def __init__(self, state_dir: str | Path, *, readonly: bool = False) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / "state.sqlite"
        try:
            self._open(readonly)
        except sqlite3.Error as e:
            # sqlite's own words ("unable to open database file") name no file
            # and no cause; a directory we cannot enter is the usual one.
            raise StoreError(
                f"{self.path}: cannot open the state store: {_why(self.dir, e)}"
            ) from e
        except OSError as e:
            raise StoreError(f"{self.path}: cannot open the state store: {e.strerror or e}") from e

    def _open(self, readonly: bool) -> None:
        if readonly:
            if not self.path.exists():
                raise StoreError(f"{self.path}: no state store here")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()  # opens it
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
            self._migrate(fresh)
        self.db.execute("PRAGMA busy_timeout=5000")

    def _migrate(self, fresh: bool) -> None:
        if fresh:
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            return
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION or version not in (*_MIGRATIONS, SCHEMA_VERSION):
            raise StoreError(
                f"{self.path}: schema version {version}, this dom0 knows up to {SCHEMA_VERSION}"
            )
        while version < SCHEMA_VERSION:
            with _transaction(self.db):
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                version += 1
                self.db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(version),))

    def close(self) -> None:
        self.db.close()

    # -- allocations -------------------------------------------------------------
    def allocations(self) -> list[Allocation]:
        rows = self.db.execute(
            "SELECT mac, rule, slot, domain, address, port, absent_since, underlay, "
            "port_index, confirmed, origin, previous, previous_until, remapped_at "
            "FROM allocations"
        )
        return [
            Allocation(
                mac=mac, rule=rule, slot=slot, domain=domain, address=address, port=port,
                absent_since=absent, underlay=underlay, port_index=index,
                confirmed=bool(confirmed), origin=origin, previous=previous,
                previous_until=until, remapped_at=remapped,
            )
            for (mac, rule, slot, domain, address, port, absent, underlay, index, confirmed,
                 origin, previous, until, remapped) in rows
        ]  # fmt: skip

    def record_addresses(self, changes: Iterable[tuple[Allocation, str, int, int]]) -> None:
        """History of remaps: (allocation with its new address, the address it
        had, since when, now). The slot's open row closes now (one is made for
        the old address if the slot has none yet) and the new one opens."""
        with _transaction(self.db):
            for a, old, old_since, now in changes:
                closed = self.db.execute(
                    "UPDATE address_history SET until = ? WHERE rule = ? AND slot = ? "
                    "AND until IS NULL",
                    (now, a.rule, a.slot),
                ).rowcount
                if not closed:
                    self.db.execute(
                        "INSERT INTO address_history VALUES (?,?,?,?,?,?,?)",
                        (a.rule, a.slot, a.domain, old, a.mac, old_since, now),
                    )
                self.db.execute(
                    "INSERT INTO address_history VALUES (?,?,?,?,?,?,NULL)",
                    (a.rule, a.slot, a.domain, a.address, a.mac, now),
                )

    def address_history(self, rule: str, slot: int, limit: int = 20) -> list[dict]:
        rows = self.db.execute(
            "SELECT domain, address, mac, since, until FROM address_history "
            "WHERE rule = ? AND slot = ? ORDER BY since DESC LIMIT ?",
            (rule, slot, limit),
        )
        return [
            {"domain": d, "address": a, "mac": m, "since": s, "until": u} for d, a, m, s, u in rows
        ]

    def commit_allocations(self, put: Iterable[Allocation], remove: Iterable[str] = ()) -> None:
        """One transaction: removals first, so a slot or an address can pass
        from a released machine to a new one in the same commit."""
        with _transaction(self.db):
            self.db.executemany("DELETE FROM allocations WHERE mac=?", [(m,) for m in remove])
            self.db.executemany(
                "INSERT INTO allocations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(mac) DO UPDATE "
                "SET rule=excluded.rule, slot=excluded.slot, domain=excluded.domain, "
                "address=excluded.address, port=excluded.port, "
                "absent_since=excluded.absent_since, underlay=excluded.underlay, "
                "port_index=excluded.port_index, confirmed=excluded.confirmed, "
                "origin=excluded.origin, previous=excluded.previous, "
                "previous_until=excluded.previous_until, remapped_at=excluded.remapped_at",
                [
                    (
                        a.mac,
                        a.rule,
                        a.slot,
                        a.domain,
                        a.address,
                        a.port,
                        a.absent_since,
                        a.underlay,
                        a.port_index,
                        int(a.confirmed),
                        a.origin,
                        a.previous,
                        a.previous_until,
                        a.remapped_at,
                    )
                    for a in put
                ],
            )


def _why(directory: Path, e: sqlite3.Error) -> str:
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK) or not os.access(
        directory / "state.sqlite", os.R_OK
    ):
        return "permission denied (the state is root's: run as root)"
    return str(e)


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
