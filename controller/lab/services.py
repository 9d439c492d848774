"""Starting the lab's echo services and waiting until they listen.

Each echo gets the write end of a pipe (`--ready-fd`) and writes "ready" once
its socket listens, so the lab returns only when every service answers,
without polling ports from outside.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from controller.lab import netns, processes
from controller.lab.rundir import Lab, LabError
from controller.lab.topology import ECHO_ADDRESS, ECHO_PORT

READY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class EchoSpec:
    role: str  # record key, e.g. "echo@wan", "echo@vm3"
    namespace: str
    bind: str
    port: int = ECHO_PORT


def wan_echo(lab: Lab) -> EchoSpec:
    return EchoSpec("echo@wan", lab.wan_ns, ECHO_ADDRESS)


def vm_echo(lab: Lab, index: int) -> EchoSpec:
    return EchoSpec(f"echo@vm{index}", lab.vm_ns(index), "0.0.0.0")


def start_echos(lab: Lab, specs: Sequence[EchoSpec], timeout: float | None = None) -> None:
    """Start every echo at once, then wait until all of them listen.

    The default timeout grows with the number of services: on 2 cores each
    Python start costs ~20 ms of CPU.
    """
    if timeout is None:
        timeout = READY_TIMEOUT + 0.05 * len(specs)
    pending: dict[int, tuple[EchoSpec, processes.ProcId]] = {}
    try:
        for spec in specs:
            r, w = os.pipe()
            try:
                argv = netns.exec_argv(
                    spec.namespace,
                    [
                        sys.executable, "-m", "controller.lab.echo",
                        "--bind", spec.bind, "--port", str(spec.port), "--ready-fd", str(w),
                    ],
                )  # fmt: skip
                _, proc = processes.spawn(
                    argv,
                    log=lab.logs_dir / f"{spec.role.replace('@', '-')}.log",
                    env=processes.python_env(),
                    pass_fds=(w,),
                )
            except BaseException:
                os.close(r)
                raise
            finally:
                os.close(w)
            pending[r] = (spec, proc)
            lab.record_process(spec.role, proc, spec.namespace, argv)
        _wait_ready(lab, pending, timeout)
    finally:
        for r in pending:
            os.close(r)


def _wait_ready(
    lab: Lab, pending: dict[int, tuple[EchoSpec, processes.ProcId]], timeout: float
) -> None:
    waiting = dict(pending)
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            roles = ", ".join(spec.role for spec, _ in waiting.values())
            raise LabError(f"echo service not listening within {timeout:g} s: {roles}")
        ready, _, _ = select.select(list(waiting), [], [], left)
        for r in ready:
            spec, _ = waiting.pop(r)
            # EOF without "ready": the service exited (its log says why).
            if not os.read(r, 64).startswith(b"ready"):
                log = lab.logs_dir / f"{spec.role.replace('@', '-')}.log"
                raise LabError(f"{spec.role} failed to start: {_last_line(log)}")


def _last_line(path: os.PathLike[str] | str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
