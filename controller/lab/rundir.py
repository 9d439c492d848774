"""A lab's run directory and its record of everything the lab created.

    /run/dom0-lab/NAME/
        lab.json              namespaces, VMs, processes (PID + start time), policy
        lab.lock              flock for read-modify-write of lab.json
        policy.toml           the policy the controller runs with: a copy of the
                              default (or of `build.create(policy=...)`'s file);
                              absent when `lab up --policy FILE` runs on FILE itself
        state/                the controller's --state directory (control.sock)
        logs/                 controller.log, echo-*.log, dhcp-vmI.log
        leases/vmI.lease      the VM's current DHCP lease (key=value), absent when none
        udhcpc.sh             the VM-side DHCP event script

The record is written *before* each namespace is created, and each process
is started only in a namespace already recorded, so `lab down` after a crash
at any point finds everything: the recorded PIDs, and whatever still runs in
the recorded namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.lab.processes import ProcId

RUN_ROOT = Path("/run/dom0-lab")
DEFAULT_NAME = "dom0lab"
RECORD_VERSION = 1

# The name prefixes namespace names (NAME-vm200 must stay short and greppable).
NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?$")
MAX_NAME = 16
# Namespaces of one lab, and nothing else: "dom0lab-x-wan" is not dom0lab's.
_ROLE_RE = re.compile(r"^(wan|vpn|dom0|vm[1-9][0-9]*)$")


class LabError(RuntimeError):
    """A lab operation failed; the message is one line for the operator."""


def check_name(name: str) -> str | None:
    """None if name is a valid lab name, else what is wrong."""
    if not NAME_RE.match(name):
        return (
            f"{name!r} is not a lab name: 1-{MAX_NAME} characters of a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return None


def owns_namespace(name: str, ns: str) -> bool:
    """True if ns is one of lab name's namespaces (by naming scheme)."""
    prefix = f"{name}-"
    return ns.startswith(prefix) and bool(_ROLE_RE.match(ns[len(prefix) :]))


@dataclass(frozen=True, slots=True)
class Lab:
    """Handle on one lab: names and paths; the live data is in lab.json."""

    name: str
    root: Path

    @classmethod
    def named(cls, name: str, run_root: Path = RUN_ROOT) -> Lab:
        return cls(name, run_root / name)

    # Namespaces.
    @property
    def wan_ns(self) -> str:
        return f"{self.name}-wan"

    @property
    def vpn_ns(self) -> str:
        return f"{self.name}-vpn"

    @property
    def dom0_ns(self) -> str:
        return f"{self.name}-dom0"

    def vm_ns(self, index: int) -> str:
        return f"{self.name}-vm{index}"

    # Paths.
    @property
    def record_path(self) -> Path:
        return self.root / "lab.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "lab.lock"

    @property
    def policy_copy(self) -> Path:
        return self.root / "policy.toml"

    @property
    def policy_path(self) -> Path:
        """The file the controller runs on (its --policy): the operator's own
        file when the lab runs on it in place, else the run directory's copy."""
        policy = self.read().get("policy")
        if isinstance(policy, dict) and policy.get("live") and policy.get("path"):
            return Path(policy["path"])
        return self.policy_copy

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def controller_log(self) -> Path:
        return self.logs_dir / "controller.log"

    @property
    def leases_dir(self) -> Path:
        return self.root / "leases"

    def lease_path(self, index: int) -> Path:
        return self.leases_dir / f"vm{index}.lease"

    @property
    def dhcp_script(self) -> Path:
        return self.root / "udhcpc.sh"

    # Record.
    def exists(self) -> bool:
        return self.root.exists()

    def read(self) -> dict[str, Any]:
        """The record; an empty one if the lab has none (gone or never written)."""
        try:
            data = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return empty_record(self.name)
        except json.JSONDecodeError as exc:
            raise LabError(f"{self.record_path}: unreadable record: {exc}") from exc
        if not isinstance(data, dict):
            raise LabError(f"{self.record_path}: unreadable record: not an object")
        return data

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the record under an exclusive lock, atomically replaced."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            yield data
            _write_json(self.record_path, data)

    # Convenience views of the record.
    def vms(self) -> dict[int, dict[str, Any]]:
        """VM index -> {"namespace", "mac", "port"}."""
        return {int(k): v for k, v in self.read().get("vms", {}).items()}

    def vm(self, index: int) -> dict[str, Any]:
        try:
            return self.vms()[index]
        except KeyError:
            raise LabError(f"lab {self.name} has no vm{index}") from None

    def process(self, role: str) -> ProcId | None:
        entry = self.read().get("processes", {}).get(role)
        return None if entry is None else ProcId(int(entry["pid"]), int(entry["start"]))

    def record_process(
        self, role: str, proc: ProcId, namespace: str | None, argv: list[str]
    ) -> None:
        with self.update() as data:
            data.setdefault("processes", {})[role] = {
                **proc.to_json(),
                "namespace": namespace,
                "argv": argv,
                "started": time.time(),
            }

    def forget_process(self, role: str) -> None:
        with self.update() as data:
            data.setdefault("processes", {}).pop(role, None)


def empty_record(name: str) -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "name": name,
        "namespaces": [],
        "vms": {},
        "processes": {},
        "policy": None,
    }


def _write_json(target: Path, data: dict[str, Any]) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)


def list_labs(run_root: Path = RUN_ROOT) -> list[str]:
    try:
        return sorted(p.name for p in run_root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
