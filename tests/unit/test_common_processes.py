"""common.processes: a record is PID + start time; only that process is signalled or waited for.

Every process here is a child this test starts itself, and every one is
stopped by its PID at the end, also when a test fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from common import processes
from common.processes import ProcessRecord

Start = Callable[..., ProcessRecord]


@pytest.fixture
def start() -> Iterator[Start]:
    started: list[ProcessRecord] = []

    def run(*argv: str, log: Path | None = None) -> ProcessRecord:
        _, rec = processes.spawn(argv or ("sleep", "60"), log=log)
        started.append(rec)
        return rec

    yield run
    processes.stop(started, grace=0.5)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_start_time_of_this_process_and_of_none() -> None:
    assert isinstance(processes.start_time(os.getpid()), int)
    assert processes.start_time(2**22 + 1) is None  # above pid_max: never a process


def test_a_spawned_child_is_running_with_its_own_start_time(start: Start) -> None:
    rec = start()
    assert rec.start == processes.start_time(rec.pid)
    assert processes.is_running(rec) and processes.child(rec.pid) is not None


def test_record_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    for rec in (ProcessRecord(10, 20), ProcessRecord(10, 20, processes.command_digest(["a"]), 5)):
        processes.write_record(path, rec)
        assert processes.read_record(path) == rec
        assert not (tmp_path / "d.tmp").exists()
    assert ProcessRecord(1, 2).to_json() == {"pid": 1, "start": 2}


def test_read_record_of_nothing_or_garbage_is_none(tmp_path: Path) -> None:
    assert processes.read_record(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert processes.read_record(tmp_path / "bad.json") is None
    (tmp_path / "short.json").write_text('{"pid": 1}')
    assert processes.read_record(tmp_path / "short.json") is None


def test_a_record_with_the_start_as_a_string_still_reads(tmp_path: Path) -> None:
    """dnsmasq.json before the shared records wrote the start time as a string."""
    (tmp_path / "old.json").write_text(json.dumps({"pid": 7, "start": "123", "argv": "ab"}))
    assert processes.read_record(tmp_path / "old.json") == ProcessRecord(7, 123, "ab")


def test_command_digest_tells_command_lines_apart() -> None:
    assert processes.command_digest(["a", "b"]) != processes.command_digest(["a b"])
    assert processes.command_digest(["a"]) == processes.command_digest(["a"])


def test_a_pid_whose_start_time_differs_is_another_process(start: Start) -> None:
    rec = start()
    other = dataclasses.replace(rec, start=rec.start + 1)  # what a reused PID looks like
    assert not processes.is_running(other)
    assert not processes.send_signal(other, signal.SIGTERM)
    assert processes.stop([other], grace=0.1) == []
    assert processes.wait_exit(other, 0.0)
    assert processes.is_running(rec)  # untouched by all of the above


def test_a_zombie_is_not_running(start: Start) -> None:
    rec = start()
    os.kill(rec.pid, signal.SIGKILL)  # our child: a zombie until it is reaped
    wait_for(lambda: state(rec.pid) == "Z")
    assert processes.start_time(rec.pid) == rec.start  # the PID is still taken
    assert not processes.is_running(rec)
    assert not processes.send_signal(rec, signal.SIGTERM)
    processes.reap(rec.pid, timeout=1.0)
    assert processes.start_time(rec.pid) is None and processes.child(rec.pid) is None


def test_stop_by_pid_terms_and_reaps(start: Start) -> None:
    a, b = start(), start()
    bystander = start()
    assert processes.stop([a, b], grace=2.0) == [a, b]
    for rec in (a, b):
        assert not processes.is_running(rec)
        assert processes.start_time(rec.pid) is None  # reaped, not a zombie
        assert processes.child(rec.pid) is None
    assert processes.is_running(bystander)
    assert processes.stop([a, b]) == []  # already gone: nothing to do, no error


def test_stop_kills_what_ignores_sigterm(start: Start, tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    rec = start(sys.executable, "-c", code, log=log)
    wait_for(lambda: log.exists() and "ready" in log.read_text())
    began = time.monotonic()
    assert processes.stop([rec], grace=0.3) == [rec]
    assert 0.3 <= time.monotonic() - began < 5
    assert processes.start_time(rec.pid) is None


def test_send_signal_reaches_the_recorded_process(start: Start) -> None:
    rec = start()
    assert processes.send_signal(rec, signal.SIGSTOP)
    wait_for(lambda: state(rec.pid) == "T")
    assert processes.send_signal(rec, signal.SIGCONT)


def test_wait_exit(start: Start) -> None:
    rec = start()
    assert not processes.wait_exit(rec, 0.05)
    os.kill(rec.pid, signal.SIGTERM)
    assert processes.wait_exit(rec, 5.0)
    assert processes.start_time(rec.pid) is None  # reaped


async def test_wait_exit_async(start: Start) -> None:
    rec = start("sleep", "0.2")
    with trio.fail_after(5):
        await processes.wait_exit_async(rec)
    assert processes.start_time(rec.pid) is None and processes.child(rec.pid) is None
    await processes.wait_exit_async(rec)  # gone already: returns at once


async def test_wait_exit_async_is_cancellable(start: Start) -> None:
    rec = start()
    with trio.move_on_after(0.05) as scope:
        await processes.wait_exit_async(rec)
    assert scope.cancelled_caught and processes.is_running(rec)


def test_dnsmasq_counts_a_zombie_as_dead(start: Start, tmp_path: Path) -> None:
    """The supervisor's record check (it used to compare start times only)."""
    from controller.drivers.dhcp import Dnsmasq

    d = Dnsmasq(tmp_path)
    rec = start()
    processes.write_record(d.record, rec)
    assert d.alive()
    os.kill(rec.pid, signal.SIGKILL)
    wait_for(lambda: state(rec.pid) == "Z")
    assert not d.alive()
    assert processes.start_time(rec.pid) is None  # and, being our child, it was reaped
