"""What every `dom0 bench` shares: summaries, the machine, size lists."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from pathlib import Path


def parse_sizes(text: str, *, at_least: int, at_most: int) -> list[int] | None:
    """Comma-separated counts, at least `at_least` of them, each 1..at_most."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        return None
    if len(sizes) < at_least or min(sizes) < 1 or max(sizes) > at_most:
        return None
    return sizes


# A tail percentile needs enough samples to mean anything: with fewer than
# 100, "p99" would just be the largest value under another name.
P99_MIN_RUNS = 100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> dict:
    """Seconds in, milliseconds out: the sample count always, the median,
    min and max, and p99 only from at least `P99_MIN_RUNS` samples."""
    ms = [v * 1000 for v in values]
    out = {
        "runs": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }
    if len(ms) >= P99_MIN_RUNS:
        out["p99_ms"] = round(percentile(ms, 0.99), 3)
    return out


def tail(s: dict) -> tuple[str, float]:
    """The tail a summary can vouch for: ("p99", ms) or, with too few
    samples for a percentile, ("max", ms)."""
    return ("p99", s["p99_ms"]) if "p99_ms" in s else ("max", s["max_ms"])


def ratio(a: float, b: float, digits: int = 2) -> float | None:
    """a / b, or None when b is 0 (a timer too coarse for the step)."""
    return round(a / b, digits) if b else None


def delete_namespace(name: str) -> None:
    """Stop whatever still runs in one of the bench's own network namespaces
    (by PID: only processes inside it), then delete it."""
    import signal

    from controller.lab import netns

    for pid in netns.pids([name]).get(name, []):
        if netns.in_namespace(pid, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    netns.delete([name])


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nftables": nft.stdout.strip(),
    }
