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
Only recorded processes are ever signalled, by `common.processes` (a pidfd
checked against the start time: no PID-reuse race).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import processes
from common.processes import ProcessRecord
from common.wireguard import uapi
from common.wireguard.backend import Backend
from common.wireguard.errors import (
    DeviceNotFound,
    WireGuardError,
    WireGuardUnavailable,
)
from common.wireguard.model import Device, Update, check_ifname

log = logging.getLogger(__name__)

# Where wireguard-go puts sockets, with symlinks resolved (see the module docstring).
SOCKET_DIR = os.path.realpath("/var/run/wireguard")
_START = 'mkdir -p "$1" && mount -t tmpfs -o mode=0700,size=1m tmpfs "$1" && exec "$2" -f "$3"'


def socket_path(rec: ProcessRecord, name: str) -> str:
    """The daemon's UAPI socket, seen through its own mount namespace."""
    return f"/proc/{rec.pid}/root{SOCKET_DIR}/{name}.sock"


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

    # ---- records -------------------------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"wireguard-go-{name}.log"

    def record(self, name: str) -> ProcessRecord | None:
        """The recorded daemon of `name` (running or not), or None."""
        rec = processes.read_record(self._record_path(check_ifname(name)))
        return rec if rec is not None and rec.netns is not None else None

    def _forget(self, name: str) -> None:
        self._record_path(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        """One ensure/remove of a device at a time, across threads and processes."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock, open(self.state_dir / f"{name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _live(self, name: str) -> ProcessRecord:
        """The daemon to talk to for `name`, or DeviceNotFound."""
        rec = self.record(check_ifname(name))
        if rec is None or not self._runs_here(name, rec):
            raise DeviceNotFound(f"no running wireguard-go for {name} (see {self.state_dir})")
        return rec

    def _runs_here(self, name: str, rec: ProcessRecord) -> bool:
        """Whether the recorded daemon runs; WireGuardError if it runs in another
        network namespace (not ours to touch from here)."""
        if not processes.is_running(rec):
            return False
        if rec.netns != processes.netns_of("self"):
            raise WireGuardError(
                f"wireguard-go for {name} (pid {rec.pid}) runs in another network namespace "
                f"than this process: is {self.state_dir} shared between two controllers?"
            )
        return True

    # ---- UAPI ------------------------------------------------------------------------------

    def _transact(self, name: str, rec: ProcessRecord, request: bytes, what: str) -> list[str]:
        try:
            return uapi.transact(socket_path(rec, name), request, timeout=self.timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DeviceNotFound(
                f"wireguard-go for {name} (pid {rec.pid}) does not answer"
            ) from None
        except OSError as e:
            raise WireGuardError(f"UAPI {what} on {name} failed: {e}") from None

    def _answers(self, name: str, rec: ProcessRecord) -> bool:
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
            if rec is not None and self._runs_here(name, rec):
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
                processes.reap(rec.pid)
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
            if rec is not None and self._runs_here(name, rec):
                self._stop(name, rec)
            self._forget(name)
            if not self._wait_link_gone(name, 2.0 if rec is not None else 0.0):
                raise WireGuardError(
                    f"interface {name} still exists and is not run by a daemon of this driver; "
                    "not removing it"
                )

    def _start(self, name: str) -> ProcessRecord:
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
        proc, rec = processes.spawn(argv, log=self.log_path(name), env=env)
        rec = dataclasses.replace(rec, netns=processes.netns_of("self"))
        # Record before waiting: if we die now, the next ensure finds and stops it.
        processes.write_record(self._record_path(name), rec)
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

    def _wait_ready(self, name: str, rec: ProcessRecord, proc: subprocess.Popen[bytes]) -> None:
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

    def _stop(self, name: str, rec: ProcessRecord) -> None:
        """SIGTERM, then SIGKILL after 3 s, to the recorded process only; wait for
        it to exit and for its interface to go."""
        processes.stop([rec], grace=3.0, kill_wait=5.0)
        self._wait_link_gone(name, 2.0)

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
