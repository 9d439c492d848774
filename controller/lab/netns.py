"""Named network namespaces through iproute2: create, delete, run inside, find PIDs.

Everything goes through `ip` so that the lab behaves exactly like an operator's
shell session (`ip netns exec NS ...`), and nothing here touches the root
namespace's interfaces, addresses, routes or sysctls: only /run/netns entries.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class NetnsError(RuntimeError):
    """An `ip` command failed; the message holds its stderr."""


def path(ns: str) -> Path:
    return NETNS_DIR / ns


def exists(ns: str) -> bool:
    return path(ns).exists()


def listed() -> list[str]:
    """Names of all named namespaces on the machine."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """argv run inside ns; `ip netns exec` execs without forking, so PIDs match."""
    return ["ip", "netns", "exec", ns, *argv]


def run(
    ns: str | None,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 30.0,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv in ns (None: this namespace), capture text output."""
    full = exec_argv(ns, argv) if ns is not None else list(argv)
    proc = subprocess.run(
        full,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=dict(env) if env is not None else None,
        check=False,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsError(
            f"{' '.join(full)}: exit {proc.returncode}: {detail[-1] if detail else 'no output'}"
        )
    return proc


def ip_batch(lines: Iterable[str], ns: str | None = None, *, force: bool = False) -> None:
    """Run many `ip` commands in one process (ns: as `ip -n ns`).

    Without force, the batch stops at the first failing line and raises.
    """
    text = "".join(f"{line}\n" for line in lines)
    if not text:
        return
    argv = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and not force:
        where = f" (in {ns})" if ns else ""
        raise NetnsError(f"ip -batch{where}: {proc.stderr.strip() or 'failed'}")


REGISTRY = "DOM0_NETNS_REGISTRY"


def create(names: Iterable[str]) -> None:
    """Create namespaces; under the test suite each name is also noted in the
    file $DOM0_NETNS_REGISTRY, so that the suite checks that exactly these
    are gone at its end (and nobody else's namespaces)."""
    names = list(names)
    registry = os.environ.get(REGISTRY)
    if registry:
        with open(registry, "a") as f:
            f.writelines(f"{n}\n" for n in names)
    ip_batch(f"netns add {n}" for n in names)


def delete(names: Iterable[str]) -> None:
    """Delete the namespaces that exist; missing ones are fine (idempotent)."""
    present = [n for n in names if exists(n)]
    ip_batch((f"netns del {n}" for n in present), force=True)
    left = [n for n in present if exists(n)]
    if left:
        raise NetnsError(f"could not delete namespaces: {', '.join(left)}")


def sysctl(ns: str, settings: Mapping[str, str | int]) -> None:
    """Set sysctls inside ns (/proc/sys/net is per namespace, read by who opens it)."""
    run(ns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def _inode(p: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids(names: Iterable[str]) -> dict[str, list[int]]:
    """PIDs of the processes whose network namespace is one of names.

    Same as `ip netns pids NS` for each name, in one pass over /proc.
    """
    wanted: dict[tuple[int, int], str] = {}
    for n in names:
        key = _inode(path(n))
        if key is not None:
            wanted[key] = n
    found: dict[str, list[int]] = {n: [] for n in wanted.values()}
    if not wanted:
        return found
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        key = _inode(f"/proc/{entry.name}/ns/net")
        if key in wanted:
            found[wanted[key]].append(int(entry.name))
    return found


def in_namespace(pid: int, ns: str) -> bool:
    """True if pid still lives in ns (checked right before signalling it)."""
    a = _inode(f"/proc/{pid}/ns/net")
    return a is not None and a == _inode(path(ns))
