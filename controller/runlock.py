"""One controller per state directory: STATE/controller.lock, held (flock)
for as long as the controller runs. The kernel drops the lock when the
process ends, however it ends: nothing stale to clean up."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "controller.lock"


def claim(state: Path) -> int | None:
    """Hold STATE/controller.lock for as long as this process lives (an open
    descriptor, not inherited by dnsmasq or wireguard-go); None if another
    controller holds it. Two controllers on one state would fight over every
    table, reservation and the control socket."""
    fd = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def held_by_a_controller(state: Path) -> bool:
    """Whether a running controller holds STATE's lock (for `dom0 flush`)."""
    try:
        fd = os.open(state / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
