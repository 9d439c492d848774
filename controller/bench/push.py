"""`dom0 bench push`: how long a policy change that touches every machine
takes to be applied everywhere, from the controller's side: from the book's
refresh to the last agent's ACK recorded, with 10, 50 and 200 agents
connected (median and p99 over repeated changes); what enrolling one agent
takes; the controller's memory with its agents connected, and one agent's.

Real TLS 1.3 with mutual authentication, a real CA, real tokens, a real
sqlite store, the controller's own Listener, Enrollment and ConfigBook, and
the agent's own `agents.session.Agent`; only the agent's applier is a no-op
stand-in (`pushworker.NoopApplier`), because applying to the kernel is
measured elsewhere. Everything runs in one network namespace the bench
creates (and deletes, with whatever it started): the controller and the
agents are two processes there (controller.bench.pushworker), talking over
its loopback, each agent from its machine's own source address.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from controller.bench import pushworker as pw
from controller.bench.common import delete_namespace, machine_info, parse_sizes, summary, tail

PY = sys.executable
TARGET_P99_MS = 1000.0  # the target: p99 change -> last ACK at 200 agents
ANSWER_MARGIN = 30.0  # seconds the parent waits beyond a worker's own deadline


class BenchError(Exception):
    """One line: which worker failed, and at what."""


class Worker:
    """A pushworker in the namespace, driven by JSON lines; every answer is
    awaited with a deadline (a worker that hangs or dies is an error)."""

    def __init__(self, ns: str, role: str, n: int, work: Path) -> None:
        self.role = role
        argv = [PY, "-m", "controller.bench.pushworker", role, "--agents", str(n),
                "--work", str(work)]  # fmt: skip
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.buf = b""

    def read(self, timeout: float, what: str) -> dict[str, Any]:
        out: IO[bytes] = self.proc.stdout  # type: ignore[assignment]
        fd = out.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError(f"the {self.role} worker: no answer within {timeout:g} s ({what})")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    code = self.proc.wait()
                    raise BenchError(f"the {self.role} worker ended (exit {code}) at: {what} "
                                     "(its reason is above)")  # fmt: skip
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, timeout: float, what: str, **cmd: Any) -> dict[str, Any]:
        inp: IO[bytes] = self.proc.stdin  # type: ignore[assignment]
        try:
            inp.write(json.dumps(cmd).encode() + b"\n")
            inp.flush()
        except BrokenPipeError:
            raise BenchError(f"the {self.role} worker is gone (at: {what})") from None
        return self.read(timeout, what)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BenchError, OSError):
                self.ask(10, "quit", op="quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()  # (by its PID: `ip netns exec` execs the worker itself)
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _count(n: int) -> str:
    return "1 agent" if n == 1 else f"{n} agents"


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def measure(ns: str, n: int, changes: int, base: Path) -> dict[str, Any]:
    """One controller, `n` agents, `changes` policy changes."""
    work = base / f"n{n}"
    work.mkdir()
    workers: list[Worker] = []
    try:
        ctl = Worker(ns, "controller", n, work)
        workers.append(ctl)
        first = ctl.read(60 + 0.2 * n, "its CA, store and listener")
        _say(f"{_count(n)}: enrolling, one after the other ...")
        fleet = Worker(ns, "agents", n, work)
        workers.append(fleet)
        enrolled = fleet.read(60 + pw.ENROLL_DEADLINE * n, "enrolling every agent")
        _say(f"{_count(n)}: connecting, first configuration ...")
        deadline = pw.SYNC_DEADLINE + pw.SYNC_PER_AGENT * n + ANSWER_MARGIN
        synced = ctl.ask(deadline, "all agents connected and in sync", op="synced")
        fleet_synced = fleet.ask(30, "the agents' memory", op="rss")
        _say(f"{_count(n)}: {changes} changes ...")
        deadline = pw.CHANGE_DEADLINE * changes + ANSWER_MARGIN
        done = ctl.ask(deadline, f"{changes} changes", op="changes", n=changes)
        fleet_done = fleet.ask(30, "the agents' memory", op="rss")
    finally:
        for w in reversed(workers):  # the agents first: a controller that goes ends them
            w.close()
    if fleet_done["versions"] != [changes + 1]:
        raise BenchError(f"{n} agents: applied versions {fleet_done['versions']}, "
                         f"expected {changes + 1} everywhere")  # fmt: skip
    if fleet_done["controller_modules"]:  # (an agent's memory must be an agent's alone)
        raise BenchError(f"the agents process imported {fleet_done['controller_modules'][:3]}")
    if done["refusals"]:
        raise BenchError(f"{n} agents: the controller refused {done['refusals']} connections")
    return {
        "change_to_last_ack": summary(done["seconds"]),
        # its first part: the book's refresh, every configuration made and stored
        "refresh": summary(done["refresh_seconds"]),
        "enroll_one_agent": summary(enrolled["enroll_seconds"]),
        "connect_all_s": round(synced["in_sync_at"] - enrolled["sessions_started_at"], 3),
        # CPU time per change of each process (both share the machine's cores)
        "cpu_ms_per_change": {
            "controller": round(done["cpu_seconds"] / changes * 1000, 2),
            "agents_process": round(
                (fleet_done["cpu_seconds"] - fleet_synced["cpu_seconds"]) / changes * 1000, 2
            ),
        },
        "controller_rss_mb": {
            "before_agents": first["rss_mb"],
            "agents_connected": synced["rss_mb"],
            "after_changes": done["rss_mb"],
        },
        "agents_process_rss_mb": {
            "in_sync": fleet_synced["rss_mb"],
            "after_changes": fleet_done["rss_mb"],
        },
        "_enroll_seconds": enrolled["enroll_seconds"],
    }


def _filesystem(path: Path) -> str:
    out = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True)
    lines = out.stdout.split()
    return lines[-1] if out.returncode == 0 and len(lines) > 1 else "unknown"


def run(sizes: list[int], changes: int) -> dict[str, Any]:
    import trio

    ns = f"dom0bp-{os.getpid()}-{secrets.token_hex(2)}"
    base = Path(tempfile.mkdtemp(prefix="dom0-pushbench-"))
    from controller.lab import netns

    machine = machine_info()
    machine.update(openssl=ssl.OPENSSL_VERSION, trio=trio.__version__,
                   work_filesystem=_filesystem(base))  # fmt: skip
    result: dict[str, Any] = {
        "benchmark": "push",
        "machine": machine,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "changes": changes,
        "applier": "NoopApplier (the bench's stand-in: applies nothing)",
        "agents": {},
    }
    enroll: list[float] = []
    try:
        netns.create([ns])
        netns.run(ns, ["ip", "link", "set", "lo", "up"])
        for n in sizes:
            r = measure(ns, n, changes, base)
            enroll += r.pop("_enroll_seconds")
            result["agents"][str(n)] = r
        _say(f"one agent alone (its memory), {changes} changes ...")
        one = measure(ns, 1, changes, base)
        enroll += one.pop("_enroll_seconds")
    finally:
        delete_namespace(ns)  # and whatever still runs in it
        shutil.rmtree(base, ignore_errors=True)
    result["enroll_one_agent"] = summary(enroll)
    result["agent_rss_mb"] = one["agents_process_rss_mb"]
    result["single_agent"] = one
    biggest = str(max(sizes))
    label, value = tail(result["agents"][biggest]["change_to_last_ack"])
    judged = biggest == str(pw.MAX_AGENTS) and label == "p99"  # (the target's own terms)
    result["target"] = {
        "what": f"p99 change -> last ACK at {pw.MAX_AGENTS} agents <= {TARGET_P99_MS:g} ms",
        "agents": int(biggest),
        "measured": {label + "_ms": value},
        "met": value <= TARGET_P99_MS if judged else None,
    }
    return result


def _ms(s: dict) -> str:
    label, value = tail(s)
    return f"{s['median_ms']:.1f} / {value:.1f} ms ({label}, n={s['runs']})"


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, "
        f"{m['openssl']}, work on {m['work_filesystem']}",
        f"a change to every machine -> last ACK (median / tail), {result['changes']} changes; "
        "controller RSS before agents -> with them",
    ]
    for n, r in result["agents"].items():
        rss, cpu = r["controller_rss_mb"], r["cpu_ms_per_change"]
        lines.append(f"  {n:>4} agents: {_ms(r['change_to_last_ack'])}, of which the refresh "
                     f"{r['refresh']['median_ms']:.1f} ms (median)")  # fmt: skip
        lines.append(
            f"         CPU per change: controller {cpu['controller']:.1f} ms, agents "
            f"{cpu['agents_process']:.1f} ms; enroll one {_ms(r['enroll_one_agent'])}; "
            f"controller {rss['before_agents']:.1f} -> {rss['agents_connected']:.1f} MB; "
            f"all connected and in sync in {r['connect_all_s']:.2f} s"
        )
    lines.append(f"enroll one agent, every sample: {_ms(result['enroll_one_agent'])}")
    a = result["agent_rss_mb"]
    lines.append(
        f"one agent's process: {a['in_sync']:.1f} MB in sync, {a['after_changes']:.1f} MB "
        f"after {result['changes']} changes"
    )
    t = result["target"]
    (label, value), met = next(iter(t["measured"].items())), t["met"]
    verdict = "not judged" if met is None else ("met" if met else "NOT met")
    lines.append(f"target {t['what']}: {label.removesuffix('_ms')} {value:.1f} ms at "
                 f"{t['agents']} agents: {verdict}")  # fmt: skip
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.agents, at_least=1, at_most=pw.MAX_AGENTS)
    if sizes is None or len(set(sizes)) != len(sizes):
        print(
            "dom0 bench push: --agents: expected distinct comma-separated counts "
            f"1..{pw.MAX_AGENTS}",
            file=sys.stderr,
        )
        return 2
    if args.changes < 1:
        print("dom0 bench push: --changes: expected a positive count", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("dom0 bench push: needs root (it creates a network namespace)", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    try:
        result = run(sizes, args.changes)
    except BenchError as e:
        print(f"dom0 bench push: {e}", file=sys.stderr)
        return 1
    result["bench_seconds"] = round(time.monotonic() - t0, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
