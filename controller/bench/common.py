"""What every `dom0 bench` shares: summaries, the machine, size lists."""

from __future__ import annotations

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {
        "runs": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "min_ms": round(min(ms), 3),
    }


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
