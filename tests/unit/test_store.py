"""The state store: round trips, constraints, and SIGKILL at any moment."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.core.allocation import Allocation, Ledger
from controller.store import Store

ROOT = Path(__file__).resolve().parents[2]


def test_round_trip_and_permissions(tmp_path: Path) -> None:
    s = Store(tmp_path)
    a = Allocation("52:54:00:00:00:01", "web", 1, "x", "10.10.0.9", "vnet1")
    b = Allocation("00:16:3e:00:00:01", "quarantine", 1, "quarantine", None, "vnet2", 123)
    s.commit_allocations([a, b])
    s.close()
    assert (tmp_path / "state.sqlite").stat().st_mode & 0o777 == 0o600
    assert sorted(Store(tmp_path).allocations(), key=lambda x: x.mac) == sorted(
        [a, b], key=lambda x: x.mac
    )


def test_constraints_refuse_a_duplicate_slot_or_address(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.commit_allocations([Allocation("52:54:00:00:00:01", "web", 1, "x", "10.10.0.9", "vnet1")])
    with pytest.raises(sqlite3.IntegrityError):
        s.commit_allocations(
            [Allocation("52:54:00:00:00:02", "web", 1, "x", "10.10.0.10", "vnet2")]
        )
    with pytest.raises(sqlite3.IntegrityError):
        s.commit_allocations([Allocation("52:54:00:00:00:02", "web", 2, "x", "10.10.0.9", "vnet2")])
    assert len(s.allocations()) == 1  # the failed transactions left nothing behind


def test_released_slot_passes_to_a_newcomer_in_one_commit(tmp_path: Path) -> None:
    s = Store(tmp_path)
    old = Allocation("52:54:00:00:00:01", "web", 1, "x", "10.10.0.9", "vnet1", 5)
    s.commit_allocations([old])
    new = Allocation("52:54:00:00:00:02", "web", 1, "x", "10.10.0.9", "vnet2")
    s.commit_allocations([new], remove=[old.mac])
    assert s.allocations() == [new]


WRITER = """
import sys
from controller.core.allocation import Ledger, Target, assign
from controller.store import Store
import ipaddress
store = Store(sys.argv[1])
ledger = Ledger(store.allocations())
t = Target("web", "x", ipaddress.IPv4Network("10.64.0.0/16"), ipaddress.IPv4Address("10.64.0.1"), 60000)
start = len(ledger)
for i in range(start, start + 100000):
    mac = "52:54:%02x:%02x:%02x:%02x" % (i >> 24 & 255, i >> 16 & 255, i >> 8 & 255, i & 255)
    d = assign(ledger, t, mac, "vnet1", 0, 3600)
    store.commit_allocations([d.allocation])
    print(mac, d.allocation.slot, d.allocation.address, flush=True)
"""


def test_sigkill_at_any_moment_never_loses_or_duplicates(tmp_path: Path) -> None:
    rng = random.Random(7)
    committed: dict[str, tuple[int, str | None]] = {}
    for _round in range(6):
        p = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            time.sleep(0.3 + rng.random() * 0.4)
        finally:
            os.kill(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:  # a line cut by the kill is not a report
                committed[parts[0]] = (int(parts[1]), parts[2])
        db = sqlite3.connect(tmp_path / "state.sqlite")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        db.close()
        rows = {a.mac: (a.slot, a.address) for a in Store(tmp_path).allocations()}
        # everything the writer said it committed is there, unchanged
        for mac, value in committed.items():
            assert rows[mac] == value
        # at most the one commit in flight when killed is there but unreported
        assert len(rows) - len(committed) <= 1
        committed = rows  # an unreported commit is now known, for the next round
        ledger = Ledger(Store(tmp_path).allocations())  # raises on any duplicate
        assert len(ledger) == len(rows)
    assert len(committed) > 50


def test_schema_1_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.sqlite")
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE allocations (mac TEXT PRIMARY KEY, rule TEXT NOT NULL,
            slot INTEGER NOT NULL, domain TEXT NOT NULL, address TEXT, port TEXT NOT NULL,
            absent_since INTEGER, UNIQUE (rule, slot), UNIQUE (domain, address));
        INSERT INTO allocations VALUES ('52:54:00:00:00:01', 'web', 1, 'x', '10.10.0.9', 'vnet1', NULL);
        CREATE TABLE applied_machines (mac TEXT PRIMARY KEY, port TEXT NOT NULL, address TEXT,
            hostname TEXT, tag TEXT);
        CREATE TABLE applied_policy (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """
    )
    db.close()
    s = Store(tmp_path)
    # machines stored before port security have served: they count as established
    assert s.allocations() == [
        Allocation("52:54:00:00:00:01", "web", 1, "x", "10.10.0.9", "vnet1", confirmed=True)
    ]
    assert s.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("4",)
    tables = {r[0] for r in s.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta", "allocations", "address_history"}  # (what is applied: the drivers)
    s.commit_allocations(
        [Allocation("52:54:00:00:00:02", "web", 2, "x", "10.10.0.10", "vnet2", None, "10.250.0.7")]
    )
    with pytest.raises(sqlite3.IntegrityError):  # underlay addresses are unique too
        s.commit_allocations(
            [
                Allocation(
                    "52:54:00:00:00:03", "web", 3, "x", "10.10.0.11", "vnet3", None, "10.250.0.7"
                )
            ]
        )


def test_unknown_schema_is_refused(tmp_path: Path) -> None:
    from controller.store import StoreError

    s = Store(tmp_path)
    s.db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    s.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path)
