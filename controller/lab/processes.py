"""Processes the lab starts, and stopping them safely by PID.

A PID alone can be reused after its process dies, so the lab always pairs it
with the process's start time from /proc (field 22 of /proc/PID/stat, clock
ticks since boot, which survives exec): a signal goes only to a PID whose start
time still matches what was recorded. Nothing here kills by name or by group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import controller

# The tree this code was loaded from: child processes import the same sources
# even when several checkouts share one virtualenv.
SOURCE_ROOT = str(Path(controller.__file__).resolve().parent.parent)

# Popen objects of the children this interpreter started, so that stopping one
# also reaps it (the machine's PID 1 reaps orphans only every few seconds).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True, slots=True)
class ProcId:
    """A process as the lab recorded it: PID plus start time."""

    pid: int
    start: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Start time of PID in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def is_running(proc: ProcId) -> bool:
    """True while the recorded process exists and is not a zombie."""
    fields = _stat_fields(proc.pid)
    if fields is None or int(fields[19]) != proc.start:
        return False
    return fields[0] not in ("Z", "X")


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for lab Python children: our sources first, unbuffered logs."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = SOURCE_ROOT if not path else f"{SOURCE_ROOT}{os.pathsep}{path}"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def spawn(
    argv: Sequence[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> tuple[subprocess.Popen[bytes], ProcId]:
    """Start argv detached from our terminal and session, output appended to log.

    A new session keeps a Ctrl-C meant for `dom0 lab ...` away from the lab's
    daemons: they are stopped only by `lab down`, by PID.
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
    started = start_time(proc.pid)
    if started is None:
        # Gone already (and reaped by nobody yet is impossible: it is our child).
        proc.wait()
        started = 0
    _children[proc.pid] = proc
    return proc, ProcId(proc.pid, started)


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def _signal(proc: ProcId, sig: int) -> bool:
    """Send sig if the PID still belongs to the recorded process."""
    if not is_running(proc):
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def send_signal(proc: ProcId, sig: int) -> bool:
    """Signal a recorded process; False if it is no longer running."""
    return _signal(proc, sig)


def stop(procs: Iterable[ProcId], grace: float = 2.0) -> list[ProcId]:
    """SIGTERM every process, SIGKILL those still running after grace seconds.

    Returns the processes that were still running (and got a signal). Never
    raises for processes that are already gone.
    """
    targets = [p for p in procs if _signal(p, signal.SIGTERM)]
    deadline = time.monotonic() + grace
    pending = list(targets)
    while pending:
        for p in pending:
            _reap(p.pid)
        pending = [p for p in pending if is_running(p)]
        if not pending:
            break
        if time.monotonic() >= deadline:
            for p in pending:
                _signal(p, signal.SIGKILL)
            kill_deadline = time.monotonic() + 2.0
            while pending and time.monotonic() < kill_deadline:
                for p in pending:
                    _reap(p.pid)
                pending = [p for p in pending if is_running(p)]
                time.sleep(0.01)
            break
        time.sleep(0.01)
    for p in targets:
        child = _children.pop(p.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
    return targets


def wait_exit(proc: ProcId, timeout: float) -> bool:
    """Wait until the process is gone; True if it exited within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(proc.pid)
        if not is_running(proc):
            _children.pop(proc.pid, None)
            return True
        time.sleep(0.01)
    return False


def child(pid: int) -> subprocess.Popen[bytes] | None:
    """The Popen of a process this interpreter started, if any."""
    return _children.get(pid)
