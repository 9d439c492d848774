"""Processes the lab starts, and stopping them safely by PID.

The records themselves (PID plus start time, stop and signal only while the
PID is still that process, zombies are dead) are `common.processes`, shared
with the drivers' daemons; `ProcId` is the lab's name for such a record. What
is the lab's own is the environment of its Python children.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import controller
from common.processes import ProcessRecord as ProcId
from common.processes import (
    child,
    is_running,
    send_signal,
    spawn,
    start_time,
    stop,
    wait_exit,
)

__all__ = [
    "SOURCE_ROOT",
    "ProcId",
    "child",
    "is_running",
    "python_env",
    "send_signal",
    "spawn",
    "start_time",
    "stop",
    "wait_exit",
]

# The tree this code was loaded from: child processes import the same sources
# even when several checkouts share one virtualenv.
SOURCE_ROOT = str(Path(controller.__file__).resolve().parent.parent)


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for lab Python children: our sources first, unbuffered logs."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = SOURCE_ROOT if not path else f"{SOURCE_ROOT}{os.pathsep}{path}"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_dom0(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`dom0 ARGV...` from this tree, to completion: what an operator types."""
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=python_env(),
        check=False,
    )
