"""`dom0 bench reconcile` at tiny sizes, so that it cannot rot.

The bench runs as an operator runs it (`python -m controller.cli bench
reconcile`): in namespaces it makes and deletes itself. What is checked is
the shape of its answer, not its numbers: hub and bridge admission at every
size with the sample count asked for, a tail called "max" below 100 samples,
and firewalld's additions at the same sizes, or the reason it could not run.
When everything firewalld needs is here, the reason is not accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.bench import firewalld
from controller.bench.common import P99_MIN_RUNS, summary, tail

ROOT = Path(__file__).resolve().parents[2]
SIZES = ("2", "5")
RUNS = 3


def test_p99_only_from_enough_samples() -> None:
    few = summary([i / 1000 for i in range(1, P99_MIN_RUNS)])
    assert "p99_ms" not in few and tail(few) == ("max", few["max_ms"]) and few["runs"] == 99
    many = summary([i / 1000 for i in range(1, P99_MIN_RUNS + 1)])
    assert many["runs"] == 100 and tail(many) == ("p99", many["p99_ms"])
    assert many["p99_ms"] <= many["max_ms"]


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0, reason="the bench builds network namespaces: root only")
@pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("nft", "wireguard-go", "ip")),
    reason="needs nft, wireguard-go and ip",
)
def test_bench_reconcile_tiny(tmp_path: Path) -> None:
    out = tmp_path / "reconcile.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "bench",
            "reconcile",
            "--sizes",
            ",".join(SIZES),
            "--runs",
            str(RUNS),
            "--rebuilds",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    left = [n for n in _namespaces() if f"-{proc.pid}-" in n or f"-{proc.pid % 100000}-" in n]
    assert not left, f"the bench left namespaces behind: {left}"

    r = json.loads(out.read_text())
    assert r["runs"] == RUNS
    for variant in ("hub", "bridge", "allow"):
        sizes = r[variant]["sizes"]
        assert tuple(sizes) == SIZES, variant
        for s in sizes.values():
            admit = s["admit"]
            assert admit["runs"] == RUNS and "p99_ms" not in admit
            assert admit["min_ms"] <= admit["median_ms"] <= admit["max_ms"]
            assert s["rebuild"]["runs"] == 1
        assert r["ratios"][f"{variant}_admit_5_over_2"] is not None
    assert "max, n=3" in stdout and "p99" not in stdout

    peer = r["firewalld"]
    if "unavailable" in peer:
        assert peer["unavailable"].strip()
        why = firewalld.unavailable()
        assert why is not None, f"firewalld has all it needs here, yet: {peer['unavailable']}"
        assert "firewalld: not measured: " + peer["unavailable"] in stdout
    else:
        assert tuple(peer["sizes"]) == SIZES
        assert all(s["admit"]["runs"] == RUNS for s in peer["sizes"].values())
        assert set(r["ratios"]["dom0_over_firewalld"]) == {"hub", "bridge", "allow"}


def _namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0, reason="the bench builds a network namespace: root only")
@pytest.mark.skipif(shutil.which("ip") is None, reason="needs ip")
def test_bench_push_tiny() -> None:
    """`dom0 bench push` at 2 and 3 agents, 3 changes each: the shape of its
    answer (sample counts, no p99 below 100 samples, memory), and its
    namespace gone afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "bench", "push", "--agents", "2,3",
         "--changes", "3", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    left = [n for n in _namespaces() if n.startswith(f"dom0bp-{proc.pid}-")]
    assert not left, f"the bench left namespaces behind: {left}"

    r = json.loads(stdout)
    assert r["benchmark"] == "push" and r["changes"] == 3
    assert {"cpu", "cores", "kernel", "python", "openssl"} <= set(r["machine"])
    assert tuple(r["agents"]) == ("2", "3")
    for n, s in r["agents"].items():
        push = s["change_to_last_ack"]
        assert push["runs"] == 3 and "p99_ms" not in push and s["refresh"]["runs"] == 3
        assert push["min_ms"] <= push["median_ms"] <= push["max_ms"]
        assert s["enroll_one_agent"]["runs"] == int(n)
        rss = s["controller_rss_mb"]
        assert rss["before_agents"] > 0 and rss["agents_connected"] > 0
        assert set(s["cpu_ms_per_change"]) == {"controller", "agents_process"}
    assert r["enroll_one_agent"]["runs"] == 2 + 3 + 1  # (and the single agent's)
    assert r["single_agent"]["change_to_last_ack"]["runs"] == 3
    assert r["agent_rss_mb"]["in_sync"] > 0 and r["agent_rss_mb"]["after_changes"] > 0
    assert r["target"]["agents"] == 3 and r["target"]["met"] is None  # (judged at 200 only)
