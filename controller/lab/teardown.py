"""`lab down`: stop everything a lab started, delete its namespaces and run directory.

Idempotent and crash-tolerant: it works from whatever exists (the record, the
namespaces named NAME-wan/vpn/dom0/vmI and NAME-vmI.CONTAINER, the run directory)
and succeeds when nothing is left. Processes are stopped by PID only: the recorded
ones (checked against their recorded start time) and then any process still inside
one of the lab's namespaces, which can only be the lab's (the controller's dnsmasq,
a probe, a process a crashed `lab up` started before recording it).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.lab import container, netns, processes
from controller.lab.rundir import RUN_ROOT, Lab, LabError, check_name, owns_namespace

SWEEPS = 3


@dataclass(slots=True)
class DownReport:
    name: str
    stopped: list[int] = field(default_factory=list)  # PIDs that were still running
    namespaces: list[str] = field(default_factory=list)  # namespaces deleted
    removed_rundir: bool = False

    @property
    def found_anything(self) -> bool:
        return bool(self.stopped or self.namespaces or self.removed_rundir)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "found": self.found_anything,
            "stopped": sorted(self.stopped),
            "namespaces": sorted(self.namespaces),
            "removed_rundir": self.removed_rundir,
        }


def lab_namespaces(lab: Lab, record: dict[str, Any] | None = None) -> list[str]:
    """Recorded namespaces plus any that exist under the lab's naming scheme."""
    recorded = [str(ns) for ns in (record or {}).get("namespaces") or []]
    existing = [ns for ns in netns.listed() if _owns(lab.name, ns)]
    return sorted(set(recorded) | set(existing))


def exists(name: str, run_root: Path = RUN_ROOT) -> bool:
    """True if anything of lab name is left: run directory or a namespace."""
    lab = Lab.named(name, run_root)
    return lab.root.exists() or any(_owns(name, ns) for ns in netns.listed())


def _owns(name: str, ns: str) -> bool:
    return owns_namespace(name, ns) or container.owns_namespace(name, ns)


def sweep(namespaces: list[str], grace: float = 1.0) -> list[int]:
    """Stop every process inside the namespaces; returns the PIDs signalled."""
    signalled: list[int] = []
    for _ in range(SWEEPS):
        found = netns.pids(namespaces)
        targets = []
        for pids in found.values():
            for pid in pids:
                start = processes.start_time(pid)
                if start is not None:
                    targets.append(processes.ProcId(pid, start))
        if not targets:
            break
        signalled += [p.pid for p in processes.stop(targets, grace=grace)]
    return signalled


def _recorded_processes(record: dict[str, Any]) -> list[processes.ProcId]:
    found = []
    entries = record.get("processes")
    for entry in entries.values() if isinstance(entries, dict) else []:
        try:
            found.append(processes.ProcId(int(entry["pid"]), int(entry["start"])))
        except (KeyError, TypeError, ValueError):
            continue  # a damaged entry: the namespace sweep still finds the process
    return found


def down(lab: Lab | str, *, run_root: Path = RUN_ROOT, grace: float = 2.0) -> DownReport:
    """Tear lab down completely; safe on a half-built or already removed lab."""
    if isinstance(lab, str):
        problem = check_name(lab)
        if problem:
            raise LabError(problem)
        lab = Lab.named(lab, run_root)
    report = DownReport(lab.name)
    record: dict[str, Any]
    try:
        record = lab.read()
    except LabError:
        record = {}  # an unreadable record: fall back to the naming scheme
    recorded = _recorded_processes(record)
    report.stopped += [p.pid for p in processes.stop(recorded, grace=grace)]
    namespaces = lab_namespaces(lab, record)
    report.stopped += sweep(namespaces)
    present = [ns for ns in namespaces if netns.exists(ns)]
    netns.delete(present)
    report.namespaces = present
    if lab.root.exists():
        shutil.rmtree(lab.root)
        report.removed_rundir = True
    return report


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while tearing down, so a second Ctrl-C cannot
    leave a half-deleted lab (main thread only: elsewhere signals go to main)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
