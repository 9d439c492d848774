"""The controller as the lab runs it: `dom0 run` inside NAME-dom0.

    ip netns exec NAME-dom0 PYTHON -m controller.cli run --policy RUNDIR/policy.toml \
        --state RUNDIR/state            >> RUNDIR/logs/controller.log 2>&1

The lab talks to it only through its command line and `dom0 status --json`.
It is ready when RUNDIR/state/control.sock accepts a connection. Tests stop it
gracefully, SIGKILL it (the data plane must outlive it) and start it again on
the same state directory.

Tests never sleep to let the controller act: status carries a "generation"
that the controller bumps after every applied reconcile and every policy
reload's outcome, so a test reads it before it acts and waits until it has
passed that value (`wait_generation`), or waits for the fact it expects.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from controller.lab import netns, processes
from controller.lab.rundir import Lab, LabError
from controller.lab.wait import wait_for

ROLE = "controller"
READY_TIMEOUT = 20.0


def run_argv(lab: Lab) -> list[str]:
    return [
        sys.executable, "-m", "controller.cli", "run",
        "--policy", str(lab.policy_path), "--state", str(lab.state_dir),
    ]  # fmt: skip


def install_policy(lab: Lab, policy: str | Path) -> Path:
    """Copy policy into the run directory (atomically): the controller's --policy."""
    src = Path(policy)
    if not src.is_file():
        raise LabError(f"policy file {src} not found")
    tmp = lab.policy_path.with_name(".policy.toml.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(lab.policy_path)
    with lab.update() as data:
        data["policy"] = {"source": str(src.resolve()), "path": str(lab.policy_path)}
    return lab.policy_path


def write_policy(lab: Lab, text: str) -> Path:
    """Replace the policy in use with text (a reload test's edit), atomically."""
    tmp = lab.policy_path.with_name(".policy.toml.tmp")
    tmp.write_text(text)
    tmp.replace(lab.policy_path)
    return lab.policy_path


def pid(lab: Lab) -> processes.ProcId | None:
    """The recorded controller process, if it is running."""
    proc = lab.process(ROLE)
    return proc if proc is not None and processes.is_running(proc) else None


def is_ready(lab: Lab) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(str(lab.control_socket))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def start(
    lab: Lab,
    policy: str | Path | None = None,
    *,
    wait: bool = True,
    timeout: float = READY_TIMEOUT,
    argv: Sequence[str] | None = None,
) -> processes.ProcId:
    """Start the controller in NAME-dom0 (policy: replace the policy in use first).

    With wait, returns once control.sock accepts connections; raises LabError
    with the last log line if the controller exits or is not ready in time.
    argv replaces the command (tests of the lab itself use a stand-in).
    """
    running = pid(lab)
    if running is not None:
        raise LabError(f"controller already running (pid {running.pid})")
    if policy is not None:
        install_policy(lab, policy)
    elif not lab.policy_path.exists():
        raise LabError("no policy installed for the controller")
    lab.state_dir.mkdir(parents=True, exist_ok=True)
    lab.logs_dir.mkdir(parents=True, exist_ok=True)
    full = netns.exec_argv(lab.dom0_ns, list(argv) if argv is not None else run_argv(lab))
    _, proc = processes.spawn(full, log=lab.controller_log, env=processes.python_env())
    lab.record_process(ROLE, proc, lab.dom0_ns, full)
    if wait:
        wait_ready(lab, proc, timeout)
    return proc


def wait_ready(
    lab: Lab, proc: processes.ProcId | None = None, timeout: float = READY_TIMEOUT
) -> None:
    proc = proc or lab.process(ROLE)
    deadline = time.monotonic() + timeout
    while True:
        if is_ready(lab):
            return
        if proc is None or not processes.is_running(proc):
            status = _exit_status(proc)
            raise LabError(f"controller exited{status} before it was ready: {last_log_line(lab)}")
        if time.monotonic() >= deadline:
            raise LabError(
                f"controller not ready within {timeout:g} s (no {lab.control_socket}): "
                f"{last_log_line(lab)}"
            )
        time.sleep(0.05)


def check_running(lab: Lab) -> None:
    """Raise LabError with the log's last line if the controller is not running."""
    proc = lab.process(ROLE)
    if proc is None or not processes.is_running(proc):
        raise LabError(f"controller exited{_exit_status(proc)}: {last_log_line(lab)}")


def _exit_status(proc: processes.ProcId | None) -> str:
    child = processes.child(proc.pid) if proc is not None else None
    if child is None:
        return ""
    code = child.poll()
    if code is None:
        return ""
    return f" with status {code}" if code >= 0 else f" on signal {-code}"


def stop(lab: Lab, *, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after grace seconds; fine if it is not running."""
    proc = lab.process(ROLE)
    if proc is not None:
        processes.stop([proc], grace=grace)
    lab.forget_process(ROLE)


def kill(lab: Lab) -> None:
    """SIGKILL the controller, as a crash would; what it started keeps running."""
    proc = lab.process(ROLE)
    if proc is not None and processes.send_signal(proc, signal.SIGKILL):
        processes.wait_exit(proc, 5.0)
    lab.forget_process(ROLE)


def restart(
    lab: Lab,
    policy: str | Path | None = None,
    *,
    hard: bool = False,
    timeout: float = READY_TIMEOUT,
) -> processes.ProcId:
    """Stop (hard: SIGKILL) and start again on the same state directory."""
    if hard:
        kill(lab)
    else:
        stop(lab)
    return start(lab, policy, timeout=timeout)


def reply(lab: Lab, timeout: float = 10.0) -> dict[str, Any]:
    """`dom0 status --json` of the lab's controller: the whole reply."""
    proc = netns.run(
        lab.dom0_ns,
        [
            sys.executable, "-m", "controller.cli", "status",
            "--state", str(lab.state_dir), "--json",
        ],
        check=False,
        timeout=timeout,
        env=processes.python_env(),
    )  # fmt: skip
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"dom0 status failed: {detail[-1] if detail else proc.returncode}")
    try:
        got = json.loads(proc.stdout)
    except ValueError as exc:
        raise LabError(f"dom0 status: unexpected output: {exc}") from exc
    if not isinstance(got, dict) or not isinstance(got.get("machines"), list):
        raise LabError("dom0 status: unexpected output: no machines list")
    if not isinstance(got.get("generation"), int):
        raise LabError("dom0 status: unexpected output: no generation")
    return got


def status(lab: Lab, timeout: float = 10.0) -> list[dict[str, Any]]:
    """`dom0 status --json` of the lab's controller: its "machines" list."""
    return list(reply(lab, timeout)["machines"])


def generation(lab: Lab) -> int:
    """The controller's generation now (read it before an action, then wait_generation)."""
    return int(reply(lab)["generation"])


def wait_generation(
    lab: Lab,
    after: int,
    until: Callable[[dict[str, Any]], object] | None = None,
    *,
    timeout: float = 10.0,
    what: str = "",
) -> dict[str, Any]:
    """The first status reply whose generation has passed `after` (a value read
    before the action) and, with until, for which until(reply) is true.
    LabError after timeout, also if the controller has exited."""

    def ready() -> dict[str, Any] | None:
        check_running(lab)
        got = reply(lab)
        if int(got["generation"]) <= after:
            return None
        return got if until is None or until(got) else None

    label = what or f"the controller's generation to pass {after}"
    return wait_for(ready, timeout, label)


# The outcomes of a policy reload, as the controller logs them (controller/engine.py).
RELOAD_OUTCOME = re.compile(
    r"policy reload \((?P<why>[^)]*)\)(?:: (?P<outcome>applying|unchanged)| (?P<refused>refused):)"
)


def _log_size(lab: Lab) -> int:
    try:
        return lab.controller_log.stat().st_size
    except FileNotFoundError:
        return 0


def reload_outcomes(lab: Lab, since: int = 0) -> list[str]:
    """applying / unchanged / refused, for each reload logged after byte offset since."""
    try:
        with lab.controller_log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    return [m["outcome"] or m["refused"] for m in RELOAD_OUTCOME.finditer(text)]


def reload(lab: Lab, text: str | None = None, *, hup: bool = True, timeout: float = 10.0) -> str:
    """Replace the policy with text (if given) and reload it: SIGHUP (hup),
    else the controller's own poll of the file. Waits for the reload's
    outcome in the log, then for the generation to pass the one read before:
    the controller logs the outcome and bumps the generation in one step of
    its loop (after applying, if it applies), and answers status only between
    steps. Returns the first outcome: "applying", "unchanged" or "refused"."""
    before = generation(lab)
    mark = _log_size(lab)
    if text is not None:
        write_policy(lab, text)
    if hup:
        proc = pid(lab)
        if proc is None:
            raise LabError("controller not running: nothing to reload")
        processes.send_signal(proc, signal.SIGHUP)

    def first() -> str | None:
        outcomes = reload_outcomes(lab, mark)
        return outcomes[0] if outcomes else None

    outcome = wait_for(first, timeout, "the policy reload's outcome in controller.log")
    wait_generation(lab, before, timeout=timeout, what=f"the generation to pass {before}")
    return outcome


def machine(lab: Lab, mac: str) -> dict[str, Any] | None:
    mac = mac.lower()
    return next((m for m in status(lab) if str(m.get("mac", "")).lower() == mac), None)


def wait_machines(
    lab: Lab, macs: Sequence[str], timeout: float = 10.0
) -> dict[str, dict[str, Any]]:
    """Wait until status lists every MAC; returns mac -> machine."""
    want = {m.lower() for m in macs}
    deadline = time.monotonic() + timeout
    while True:
        seen = {str(m.get("mac", "")).lower(): m for m in status(lab)}
        if want <= seen.keys():
            return {m: seen[m] for m in want}
        if time.monotonic() >= deadline:
            missing = ", ".join(sorted(want - seen.keys()))
            raise LabError(f"controller does not list {missing} after {timeout:g} s")
        time.sleep(0.2)


def last_log_line(lab: Lab) -> str:
    tail = log_tail(lab, 1)
    return tail[-1].lstrip(" |").rstrip() if tail else "no output in controller.log"


def log_tail(lab: Lab, lines: int = 20) -> list[str]:
    try:
        text = lab.controller_log.read_text(errors="replace")
    except OSError:
        return []
    # Skip blank lines and the frame lines of exception-group tracebacks.
    return [line for line in text.splitlines() if line.strip(" |+-\t")][-lines:]
