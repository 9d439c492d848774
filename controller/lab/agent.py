"""The real agent (agents/) in lab VMs, as an operator would enroll one by hand:

1. `dom0 token create --machine FQDN --out VMROOT/agent/token` (0600),
2. `dom0 agent run --root VMROOT/agent --server GATEWAY` inside the VM's
   namespace (wireguard-go for its tunnel; the hostname only in its root:
   a namespace shares the host's),
3. once it runs its first configuration, the VM's bootstrap DHCP client is
   stopped: an enrolled agent takes its addresses from dom0, not from DHCP.

The agent talks to dom0 where its policy says: a bridge domain's gateway, or
the hub's bridge address for a machine of a hub domain.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from controller.lab import controllerproc, dhcpclient, netns, processes
from controller.lab.rundir import Lab, LabError


def role(index: int) -> str:
    return f"agent@vm{index}"


def root(lab: Lab, index: int) -> Path:
    return lab.root / "vms" / f"vm{index}" / "agent"


def log_path(lab: Lab, index: int) -> Path:
    return lab.logs_dir / f"agent-vm{index}.log"


def server_of(machine: dict[str, Any]) -> str:
    """dom0's address for this machine's agent (from `dom0 status --json`)."""
    server = machine.get("agent_server")
    if not server:
        raise LabError(
            f"{machine.get('name')}: its domain offers no agent listener "
            '(services need "enroll", and dom0 a CA: dom0 ca init)'
        )
    return str(server)


def enroll(lab: Lab, index: int, *, ttl: str = "10m", discover: bool = False) -> dict[str, Any]:
    """A token for VM index's machine in its agent's root, and the agent
    started (`discover`: given no address, it finds dom0 by mDNS); returns
    the machine as `dom0 status` shows it."""
    mac = lab.vm(index)["mac"]
    machine = controllerproc.machine(lab, mac)
    if machine is None or machine.get("state") != "admitted":
        raise LabError(f"vm{index}: machine {mac} is not admitted: no token for it")
    where = root(lab, index)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = processes.run_dom0(
        "token", "create", "--machine", machine["name"], "--ttl", ttl,
        "--out", str(where / "token"), "--state", str(lab.state_dir), "--json",
    )  # fmt: skip
    if made.returncode != 0:
        raise LabError(f"vm{index}: dom0 token create: {made.stderr.strip()}")
    start(lab, index, None if discover else server_of(machine))
    return machine


def system_root(lab: Lab, index: int) -> Path:
    """The VM's "/" for its resolver configuration (a namespace shares the
    host's /etc): VMROOT/sysroot, with etc/resolv.conf the agent points at
    its DNS stub."""
    where = root(lab, index).parent / "sysroot"
    (where / "etc").mkdir(parents=True, exist_ok=True)
    return where


def start(lab: Lab, index: int, server: str | None) -> processes.ProcId:
    """The agent in VM index, told dom0's address (None: it finds it by mDNS)."""
    current = lab.process(role(index))
    if current is not None and processes.is_running(current):
        raise LabError(f"vm{index}: its agent already runs (pid {current.pid})")
    inner = [
        sys.executable, "-m", "agents", "run", "--root", str(root(lab, index)),
        *(["--server", server] if server else []), "--wireguard", "userspace",
        "--no-set-hostname", "--system-root", str(system_root(lab, index)),
    ]  # fmt: skip
    argv = netns.exec_argv(lab.vm(index)["namespace"], inner)
    _, proc = processes.spawn(argv, log=log_path(lab, index), env=processes.python_env())
    lab.record_process(role(index), proc, lab.vm(index)["namespace"], argv)
    return proc


def stop(lab: Lab, index: int) -> None:
    proc = lab.process(role(index))
    if proc is not None:
        processes.stop([proc])
    lab.forget_process(role(index))


def state(lab: Lab, index: int) -> dict[str, Any]:
    """What the agent holds (`dom0 agent status --json`): enrolment, version."""
    from agents.cli import status_of

    return status_of(root(lab, index))


def applied_version(lab: Lab, index: int) -> int | None:
    try:
        data = json.loads((root(lab, index) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    version = data.get("version")
    return version if isinstance(version, int) else None


def wait_applied(lab: Lab, index: int, timeout: float = 30.0, *, newer_than: int = 0) -> int:
    """Wait until VM index's agent runs a configuration newer than `newer_than`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = applied_version(lab, index)
        if version is not None and version > newer_than:
            return version
        proc = lab.process(role(index))
        if proc is None or not processes.is_running(proc):
            raise LabError(f"vm{index}: its agent exited: {_tail(lab, index)}")
        time.sleep(0.1)
    raise LabError(f"vm{index}: no configuration applied within {timeout:g} s: {_tail(lab, index)}")


def _tail(lab: Lab, index: int) -> str:
    try:
        lines = log_path(lab, index).read_text().strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def take_over(lab: Lab, index: int) -> None:
    """The agent runs its configuration: the bootstrap DHCP client goes (it
    would otherwise renew and rewrite what the agent owns)."""
    proc = lab.process(dhcpclient.role(index))
    if proc is not None and processes.is_running(proc):
        processes.stop([proc])
    lab.forget_process(dhcpclient.role(index))
