"""Packet captures in lab namespaces (tcpdump), to make leaks visible.

A capture runs tcpdump in the foreground inside a namespace, in its own
session, recorded like every lab process; `stop()` signals it by PID and
returns one line per packet (tcpdump -n -e: link-level headers included).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import TracebackType

from controller.lab import netns, processes
from controller.lab.rundir import Lab, LabError


class Capture:
    def __init__(self, lab: Lab, namespace: str, interface: str, bpf: str, tag: str) -> None:
        self.lab = lab
        self.namespace = namespace
        self.interface = interface
        self.bpf = bpf
        self.role = f"capture-{tag}"
        self.out: Path = lab.logs_dir / f"{self.role}.txt"
        self.proc: processes.ProcId | None = None

    def start(self) -> Capture:
        self.out.unlink(missing_ok=True)
        argv = netns.exec_argv(
            self.namespace,
            ["tcpdump", "-i", self.interface, "-n", "-e", "-l", "-U", "-p", self.bpf],
        )
        _, self.proc = processes.spawn(argv, log=self.out)
        self.lab.record_process(self.role, self.proc, self.namespace, argv)
        # tcpdump says "listening on ..." (to the same log) once it captures
        deadline = time.monotonic() + 5
        while "listening on" not in self.out.read_text(errors="replace"):
            if time.monotonic() > deadline or not processes.is_running(self.proc):
                raise LabError(f"tcpdump did not start: {self.out.read_text(errors='replace')}")
            time.sleep(0.02)
        return self

    def stop(self) -> list[str]:
        """Stop it and return the packets it saw, one line each."""
        if self.proc is not None:
            time.sleep(0.2)  # let the last packets in flight be written
            processes.send_signal(self.proc, signal.SIGINT)
            processes.wait_exit(self.proc, 5.0)
            self.lab.forget_process(self.role)
            self.proc = None
        lines = self.out.read_text(errors="replace").splitlines()
        return [
            line
            for line in lines
            if line
            and not line.startswith(("listening on", "tcpdump:"))
            and "packets captured" not in line
            and "packets received by filter" not in line
            and "packets dropped by kernel" not in line
        ]

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            self.stop()
