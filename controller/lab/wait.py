"""Waiting for a condition in the lab, bounded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from controller.lab.rundir import LabError

T = TypeVar("T")


def wait_for(cond: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    """cond()'s first truthy value; LabError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
