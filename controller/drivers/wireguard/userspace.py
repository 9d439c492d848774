"""The userspace backend: one wireguard-go daemon per device, over its UAPI socket.

wireguard-go puts its socket in /var/run/wireguard (= /run/wireguard), one
directory for every network namespace of the machine: two namespaces could not
both have a `wg0`, and several dom0 labs run side by side. So each daemon starts
in a private mount namespace with its own tmpfs over /run/wireguard:

    unshare --mount --propagation private -- sh -c \\
        'mkdir -p DIR && mount -t tmpfs -o mode=0700 tmpfs DIR && exec wireguard-go -f NAME'

and the driver reaches the socket through the daemon's own view of the file
system, `/proc/PID/root/run/wireguard/NAME.sock`: the magic /proc/PID/root link
resolves the rest of the path in the daemon's mount namespace. (The path is spelt
without /var/run: an absolute symlink met under /proc/PID/root would be resolved
from *our* root.) `unshare` and `sh` exec, so PID is wireguard-go's own. The
`mkdir` creates an empty /run/wireguard in the shared /run once, under the mount:
it stays empty. `wg show` in the root mount namespace therefore sees none of
these daemons; `nsenter -t PID -m wg show` does.

The daemon runs in the caller's network namespace (the controller runs under
`ip netns exec`), in its own session, so that it outlives the controller: the
data plane keeps running when the controller stops or crashes. It is recorded in
STATE_DIR/NAME.json (pid, start time from /proc, network namespace); a new
controller adopts a recorded daemon that is still the same process (pid + start
time), in the same network namespace, whose interface exists and whose socket
answers, instead of starting a second one. A recorded daemon that is gone (its
tun closes with it, so the interface is gone too) or no longer answers is started
again; `ensure` then returns True because the new daemon has no configuration.
Only recorded processes are ever signalled, through a pidfd opened after the
start time was checked (no PID-reuse race).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from controller.drivers.wireguard import uapi
from controller.drivers.wireguard.backend import Backend
from controller.drivers.wireguard.errors import (
    DeviceNotFound,
    WireGuardError,
    WireGuardUnavailable,
)
from controller.drivers.wireguard.model import Device, Update, check_ifname

log = logging.getLogger(__name__)

# Where wireguard-go puts sockets, with symlinks resolved (see the module docstring).
SOCKET_DIR = os.path.realpath("/var/run/wireguard")
_START = 'mkdir -p "$1" && mount -t tmpfs -o mode=0700,size=1m tmpfs "$1" && exec "$2" -f "$3"'


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    pid: int
    start: int  # field 22 of /proc/PID/stat: survives exec, differs for a reused PID
    netns: int  # inode of the network namespace the daemon was started in

    def socket_path(self, name: str) -> str:
        return f"/proc/{self.pid}/root{SOCKET_DIR}/{name}.sock"


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()  # comm may hold spaces and ')'


def start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def alive(rec: DaemonRecord) -> bool:
    """The recorded process still exists (a zombie counts as gone)."""
    fields = _stat(rec.pid)
    return fields is not None and int(fields[19]) == rec.start and fields[0] not in ("Z", "X")


def _netns_of(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class UserspaceWireGuard(Backend):
    """wireguard-go daemons in the caller's network namespace."""

    kind = "userspace"

    def __init__(
        self,
        state_dir: Path,
        *,
        log_dir: Path | None = None,
        binary: str = "wireguard-go",
        timeout: float = 5.0,
        start_timeout: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.log_dir = Path(log_dir) if log_dir is not None else self.state_dir
        self.binary = binary
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        # Daemons this process started: wait() on them reaps them when they die.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ---- records -------------------------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"wireguard-go-{name}.log"

    def record(self, name: str) -> DaemonRecord | None:
        """The recorded daemon of `name` (alive or not), or None."""
        try:
            r = json.loads(self._record_path(check_ifname(name)).read_text())
            return DaemonRecord(int(r["pid"]), int(r["start"]), int(r["netns"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_record(self, name: str, rec: DaemonRecord) -> None:
        path = self._record_path(name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": rec.pid, "start": rec.start, "netns": rec.netns}) + "\n")
        os.replace(tmp, path)

    def _forget(self, name: str) -> None:
        self._record_path(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        """One ensure/remove of a device at a time, across threads and processes."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock, open(self.state_dir / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _live(self, name: str) -> DaemonRecord:
        """The daemon to talk to for `name`, or DeviceNotFound."""
        rec = self.record(check_ifname(name))
        if rec is None or not alive(rec):
            raise DeviceNotFound(f"no running wireguard-go for {name} (see {self.state_dir})")
        if rec.netns != _netns_of("self"):
            raise WireGuardError(
                f"wireguard-go for {name} (pid {rec.pid}) runs in another network namespace "
                f"than this process: is {self.state_dir} shared between two controllers?"
            )
        return rec

    # ---- UAPI ------------------------------------------------------------------------------

    def _transact(self, name: str, rec: DaemonRecord, request: bytes, what: str) -> list[str]:
        try:
            return uapi.transact(rec.socket_path(name), request, timeout=self.timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DeviceNotFound(
                f"wireguard-go for {name} (pid {rec.pid}) does not answer"
            ) from None
        except OSError as e:
            raise WireGuardError(f"UAPI {what} on {name} failed: {e}") from None

    def _answers(self, name: str, rec: DaemonRecord) -> bool:
        if not link_exists(name):
            return False
        try:
            uapi.check_errno(self._transact(name, rec, uapi.PROBE, "probe"), f"probe {name}")
        except WireGuardError:
            return False
        return True

    def get(self, name: str) -> Device:
        rec = self._live(name)
        return uapi.parse_get(name, self._transact(name, rec, uapi.GET, "get"))

    def _apply(self, name: str, update: Update) -> None:
        rec = self._live(name)
        uapi.check_errno(self._transact(name, rec, uapi.build_set(update), "set"), f"set {name}")

    # ---- the daemon -----------------------------------------------------------------------

    def ensure(self, name: str) -> bool:
        check_ifname(name)
        with self._exclusive(name):
            rec = self.record(name)
            if rec is not None and alive(rec):
                if rec.netns != _netns_of("self"):
                    self._live(name)  # raises: not ours to touch from here
                if self._answers(name, rec):
                    return False
                log.warning(
                    "wireguard: wireguard-go for %s (pid %d) does not answer; restarting it",
                    name,
                    rec.pid,
                )
                self._stop(name, rec)
            elif rec is not None:
                log.warning(
                    "wireguard: wireguard-go for %s (pid %d) is gone; starting it again",
                    name,
                    rec.pid,
                )
                self._reap(rec.pid)
            self._forget(name)
            # A daemon that just died takes its tun with it, a moment later.
            if not self._wait_link_gone(name, 1.0 if rec is not None else 0.0):
                raise WireGuardError(
                    f"interface {name} exists but no live wireguard-go of this driver runs it "
                    f"(no record in {self.state_dir}); not touching it"
                )
            self._start(name)
            return True

    def remove(self, name: str) -> None:
        check_ifname(name)
        with self._exclusive(name):
            rec = self.record(name)
            if rec is not None and alive(rec):
                if rec.netns != _netns_of("self"):
                    self._live(name)  # raises
                self._stop(name, rec)
            self._forget(name)
            if not self._wait_link_gone(name, 2.0 if rec is not None else 0.0):
                raise WireGuardError(
                    f"interface {name} still exists and is not run by a daemon of this driver; "
                    "not removing it"
                )

    def _start(self, name: str) -> DaemonRecord:
        if shutil.which(self.binary) is None:
            raise WireGuardUnavailable(
                f"{self.binary} not found (apt-get install --no-install-recommends wireguard-go)"
            )
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = ["unshare", "--mount", "--propagation", "private", "--"]
        argv += ["sh", "-c", _START, "wireguard-go", SOCKET_DIR, self.binary, name]
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "LOG_LEVEL": "error",
            "WG_PROCESS_FOREGROUND": "1",  # as -f; also silences a banner meant for humans
        }
        began = time.monotonic()
        with open(self.log_path(name), "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # not in the controller's process group
                close_fds=True,
            )
        started = start_time(proc.pid)
        netns = _netns_of("self")
        if started is None or netns is None:  # cannot happen for our unreaped child
            proc.kill()
            proc.wait()
            raise WireGuardError(f"wireguard-go for {name} vanished at start")
        rec = DaemonRecord(proc.pid, started, netns)
        self._children[proc.pid] = proc
        # Record before waiting: if we die now, the next ensure finds and stops it.
        self._write_record(name, rec)
        try:
            self._wait_ready(name, rec, proc)
        except BaseException:
            self._stop(name, rec)
            self._forget(name)
            raise
        log.info(
            "wireguard: started wireguard-go for %s, pid %d, ready in %.0f ms",
            name,
            proc.pid,
            (time.monotonic() - began) * 1000,
        )
        return rec

    def _wait_ready(self, name: str, rec: DaemonRecord, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        pause = 0.001
        while True:
            code = proc.poll()
            if code is not None:
                raise WireGuardError(
                    f"wireguard-go for {name} exited with status {code} at start "
                    f"(see {self.log_path(name)})"
                )
            # comm is wireguard-go only after the exec, i.e. after the private tmpfs is
            # mounted: before that the path would reach the shared /run/wireguard.
            if _comm(rec.pid) == "wireguard-go" and self._answers(name, rec):
                return
            if time.monotonic() > deadline:
                raise WireGuardError(
                    f"wireguard-go for {name} not ready after {self.start_timeout:g} s "
                    f"(see {self.log_path(name)})"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _stop(self, name: str, rec: DaemonRecord) -> None:
        """SIGTERM, then SIGKILL after 3 s, to the recorded process only; wait for
        it to exit and for its interface to go."""
        try:
            fd = os.pidfd_open(rec.pid)
        except ProcessLookupError:
            fd = None
        try:
            if fd is not None and alive(rec):  # the pidfd now pins the checked process
                for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, sig)
                    if select.select([fd], [], [], wait)[0]:
                        break
        finally:
            if fd is not None:
                os.close(fd)
        child = self._children.pop(rec.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        self._wait_link_gone(name, 2.0)

    def _reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            del self._children[pid]

    @staticmethod
    def _wait_link_gone(name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while link_exists(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
