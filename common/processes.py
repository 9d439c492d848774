"""Processes recorded by PID and start time, and signalled only while they are still the same one.

A PID alone can be reused after its process dies, so a record pairs it with
the process's start time from /proc (field 22 of /proc/PID/stat, clock ticks
since boot, which survives exec). A record is written to a file so that a
restarted controller adopts the daemon it started instead of starting a
second one. A process is running while it exists with that start time and is
not a zombie: a zombie has exited, only its parent has not collected it yet.

Signals go through a pidfd opened before the start time is checked, so the
checked process is the one signalled (no PID-reuse race). Nothing here kills
by name or by group. The children this interpreter starts with `spawn` are
kept here so that stopping one also reaps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Popen objects of the children this interpreter started: wait() on them reaps
# them (the machine's PID 1 reaps orphans only every few seconds).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process as it was recorded when it started."""

    pid: int
    start: int  # field 22 of /proc/PID/stat: differs for a reused PID
    argv: str | None = None  # command_digest() of what it runs, to adopt only the same
    netns: int | None = None  # inode of the network namespace it was started in

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """ValueError, KeyError or TypeError if `data` is no record."""
        argv, netns = data.get("argv"), data.get("netns")
        return cls(
            int(data["pid"]),
            int(data["start"]),
            None if argv is None else str(argv),
            None if netns is None else int(netns),
        )


def command_digest(argv: Sequence[str]) -> str:
    return hashlib.sha256("\0".join(argv).encode()).hexdigest()


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Start time of PID in clock ticks since boot, or None if it does not exist."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def netns_of(pid: int | str) -> int | None:
    """Inode of PID's network namespace (`"self"` for this process), None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def is_running(rec: ProcessRecord) -> bool:
    """True while the recorded process exists and is not a zombie."""
    fields = _stat(rec.pid)
    return fields is not None and int(fields[19]) == rec.start and fields[0] not in ("Z", "X")


def read_record(path: Path) -> ProcessRecord | None:
    """The record in `path` (running or not), or None if there is none."""
    try:
        return ProcessRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(path: Path, rec: ProcessRecord) -> None:
    """Written next door and renamed in: a reader sees the old record or the new one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.to_json()) + "\n")
    os.replace(tmp, path)


def spawn(
    argv: Sequence[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start argv in its own session, output appended to log (else discarded).

    Its own session keeps it out of our process group: a Ctrl-C or the end of
    the controller does not reach it; it is stopped only by PID.
    """
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    _children[proc.pid] = proc
    started = start_time(proc.pid)  # an unreaped child always has one
    if started is None:
        raise ChildProcessError(f"{argv[0]} (pid {proc.pid}) has no /proc entry")
    return proc, ProcessRecord(proc.pid, started)


def child(pid: int) -> subprocess.Popen[bytes] | None:
    """The Popen of a process this interpreter started (and has not reaped), if any."""
    return _children.get(pid)


def reap(pid: int, timeout: float = 0.0) -> None:
    """Collect a child of ours that has exited (waiting up to timeout for it)."""
    proc = _children.get(pid)
    if proc is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        if timeout > 0:
            proc.wait(timeout)
        else:
            proc.poll()
    if proc.returncode is not None:
        _children.pop(pid, None)


def _pin(rec: ProcessRecord) -> int | None:
    """A pidfd of the recorded process if it is still running, else None."""
    try:
        fd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        return None
    if not is_running(rec):  # checked after opening: the pidfd holds this very process
        os.close(fd)
        return None
    return fd


def _wait_fds(fds: dict[int, ProcessRecord], timeout: float) -> dict[int, ProcessRecord]:
    """Wait until every pidfd is readable (its process exited); those still running."""
    left = dict(fds)
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while left:
        for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            poller.unregister(fd)
            left.pop(fd, None)
        if time.monotonic() >= deadline:
            break
    return left


def send_signal(rec: ProcessRecord, sig: int) -> bool:
    """Signal a recorded process; False if it is no longer running."""
    fd = _pin(rec)
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)
    return True


def stop(
    recs: Iterable[ProcessRecord], grace: float = 2.0, *, kill_wait: float = 2.0
) -> list[ProcessRecord]:
    """SIGTERM every recorded process, SIGKILL those still running after grace
    seconds, and wait up to kill_wait for them to exit.

    Returns the processes that were still running (and got a signal). Never
    raises for processes that are already gone.
    """
    recs = list(recs)
    pinned: dict[int, ProcessRecord] = {}
    try:
        for rec in recs:
            fd = _pin(rec)
            if fd is None:
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
            except ProcessLookupError:  # exited in between
                os.close(fd)
                continue
            pinned[fd] = rec
        left = _wait_fds(pinned, grace)
        for fd in left:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        _wait_fds(left, kill_wait)
    finally:
        for fd in pinned:
            os.close(fd)
    signalled = list(pinned.values())
    for rec in recs:
        reap(rec.pid, timeout=1.0 if rec in signalled else 0.0)
    return signalled


def wait_exit(rec: ProcessRecord, timeout: float) -> bool:
    """Wait until the process is gone; True if it exited within timeout."""
    fd = _pin(rec)
    if fd is not None:
        try:
            if _wait_fds({fd: rec}, timeout):
                return False
        finally:
            os.close(fd)
    reap(rec.pid, timeout=1.0)
    return True


async def wait_exit_async(rec: ProcessRecord) -> None:
    """For trio callers: return once the recorded process has exited (reaped if ours)."""
    import trio  # only here: the other helpers serve callers outside trio too

    fd = _pin(rec)
    if fd is not None:
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
    reap(rec.pid)


async def exited_before(rec: ProcessRecord, changed: Any, *beside: Any) -> bool:
    """For a trio supervisor: True once the recorded process has exited, False
    once `changed()` (a trio.Event) is set; `beside` are async functions run
    meanwhile (cancelled with the rest)."""
    import trio

    exited = False
    async with trio.open_nursery() as nursery:

        async def watch_exit() -> None:
            nonlocal exited
            await wait_exit_async(rec)
            exited = True
            nursery.cancel_scope.cancel()

        async def watch_change() -> None:
            await changed().wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_exit)
        nursery.start_soon(watch_change)
        for task in beside:
            nursery.start_soon(task)
    return exited
