"""DHCP for machines without an agent: dnsmasq on the bridge.

The controller starts dnsmasq in the foreground (its own process group, so
that it outlives the controller: the data plane keeps running when the
controller stops or crashes) and records it in `dhcp/dnsmasq.json`; a
restarted controller adopts the running dnsmasq when its command line is
still the one wanted, instead of starting a second one.

Reservations are one file per machine in `dhcp/hosts/` (dnsmasq's
--dhcp-hostsdir, re-read via inotify). Files are written next door and
renamed in, so dnsmasq never reads half a file. Ranges are `static`: a
machine without a reservation gets no address at all, so a machine's first
lease is the one the controller chose.

dnsmasq is never sent SIGHUP. dnsmasq 2.90 (Debian 12's) frees the tags of
`dhcp-host` entries on a SIGHUP re-read while a DHCP exchange still refers to
them, and crashes (SIGSEGV/SIGABRT; reproduced outside the lab: hosts with
`set:` tags, one DISCOVER, then SIGHUP after a change). On its own, by
inotify, dnsmasq picks up new and rewritten files but ignores deleted ones.
So a reservation is never deleted while dnsmasq runs: it is rewritten as a
tombstone, `MAC,ignore` (dnsmasq then never answers that MAC), and
tombstones are swept before a new dnsmasq starts. Every reservation carries
`id:*`: dnsmasq identifies the lease by hardware address only, so a client-id
copied from another machine finds nothing of that machine's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import trio

from controller.core.desired import DhcpConfig, DhcpHost

log = logging.getLogger(__name__)


def dnsmasq_argv(config: DhcpConfig, state_dir: Path, binary: str = "dnsmasq") -> list[str]:
    d = state_dir / "dhcp"
    argv = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",  # no DNS here: unbound serves names (a later issue)
        "--no-hosts",
        f"--interface={config.bridge}",
        "--bind-interfaces",
        f"--dhcp-hostsdir={d / 'hosts'}",
        f"--dhcp-leasefile={d / 'leases'}",
        "--no-ping",  # the controller already guarantees addresses are unique
        "--dhcp-authoritative",
        f"--log-facility={d / 'dnsmasq.log'}",
        "--log-dhcp",
        "--pid-file=",
    ]
    for r in config.ranges:
        argv.append(
            f"--dhcp-range=set:{r.tag},{r.network.network_address},static,"
            f"{r.network.netmask},{config.lease_seconds}"
        )
        if r.domain_name:
            argv.append(f"--domain={r.domain_name},{r.network}")
        if r.router:
            argv.append(f"--dhcp-option=tag:{r.tag},option:router,{r.router}")
        else:
            argv.append(f"--dhcp-option=tag:{r.tag},option:router")
    for tag, domain_name in config.tag_domains:
        argv.append(f"--dhcp-option=tag:{tag},option:domain-name,{domain_name}")
    return argv


_MAC_FILE = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}$")


def _host_file(mac: str) -> str:
    return mac.replace(":", "-")


def tombstone(mac: str) -> str:
    return f"{mac},ignore\n"


def parse_host_line(line: str) -> DhcpHost | None:
    parts = line.strip().split(",")
    if len(parts) != 5 or parts[1] != "id:*" or not parts[2].startswith("set:"):
        return None
    return DhcpHost(parts[0], parts[3], parts[4], parts[2][4:])


class HostsDir:
    """The reservation files. The state dir is 0711 and this dir 0755:
    dnsmasq reads it after dropping to an unprivileged user."""

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.root = state_dir / "dhcp"
        self.dir = self.root / "hosts"
        self.tmp = self.root / "tmp"
        self.readonly = readonly  # `dom0 plan`: look, never touch
        if not readonly:
            for d in (self.root, self.dir, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o755)
        # file name -> (inode, mtime_ns, host): a file unchanged since it was
        # last read or written is not read again (10,000 of them at a resync)
        self._known: dict[str, tuple[int, int, DhcpHost | None]] = {}

    def read(self) -> dict[str, DhcpHost]:
        """Every reservation on disk. A file that is not a reservation of
        ours is neutralised in place (a tombstone, or emptied): dnsmasq would
        keep a deleted file's entries until it restarts."""
        out = {}
        seen = set()
        if self.readonly and not self.dir.is_dir():
            return out
        with os.scandir(self.dir) as entries:
            for e in entries:
                seen.add(e.name)
                st = e.stat(follow_symlinks=False)
                known = self._known.get(e.name)
                if known is not None and known[:2] == (st.st_ino, st.st_mtime_ns):
                    if known[2] is not None:
                        out[known[2].mac] = known[2]
                    continue
                text = Path(e.path).read_text(errors="replace") if e.is_file() else ""
                host = parse_host_line(text)
                if host is not None and _host_file(host.mac) == e.name:
                    out[host.mac] = host
                    self._remember(e.name, host)
                    continue
                if self.readonly:
                    continue
                mac = e.name.replace("-", ":")
                want = tombstone(mac) if _MAC_FILE.match(e.name) else ""
                if text != want or not e.is_file():
                    self._replace(e.name, want)
                self._remember(e.name, None)
        for name in set(self._known) - seen:
            del self._known[name]
        return out

    def write(self, put: Mapping[str, DhcpHost], delete: frozenset[str] | set[str]) -> None:
        """Reservations in, removed ones as tombstones (never deleted: see
        the module's docstring)."""
        for mac in delete:
            if mac not in put:
                name = _host_file(mac)
                self._replace(name, tombstone(mac))
                self._remember(name, None)
        for mac, host in put.items():
            name = _host_file(mac)
            self._replace(name, host.line())
            self._remember(name, host)

    def sweep(self) -> int:
        """Remove tombstones and whatever else is not a reservation: only
        while no dnsmasq runs (a running one would keep their entries)."""
        removed = 0
        with os.scandir(self.dir) as entries:
            for e in entries:
                text = Path(e.path).read_text(errors="replace") if e.is_file() else ""
                if parse_host_line(text) is None:
                    Path(e.path).unlink(missing_ok=True)
                    self._known.pop(e.name, None)
                    removed += 1
        return removed

    def _replace(self, name: str, text: str) -> None:
        tmp = self.tmp / name
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, self.dir / name)

    def _remember(self, name: str, host: DhcpHost | None) -> None:
        try:
            st = (self.dir / name).stat()
        except FileNotFoundError:
            self._known.pop(name, None)
            return
        self._known[name] = (st.st_ino, st.st_mtime_ns, host)


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


class Dnsmasq:
    """Supervises one dnsmasq for the current DhcpConfig."""

    def __init__(
        self, state_dir: Path, binary: str | None = None, *, readonly: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.hosts = HostsDir(state_dir, readonly=readonly)
        self.record = self.hosts.root / "dnsmasq.json"
        self.binary = binary or shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.config: DhcpConfig | None = None
        self.pid: int | None = None
        self._changed = trio.Event()
        self.restarts = 0

    def _argv(self) -> list[str]:
        assert self.config is not None
        return dnsmasq_argv(self.config, self.state_dir, self.binary)

    def _digest(self, argv: list[str]) -> str:
        return hashlib.sha256("\0".join(argv).encode()).hexdigest()

    def _recorded(self) -> tuple[int, str, str] | None:
        try:
            r = json.loads(self.record.read_text())
            return int(r["pid"]), str(r["start"]), str(r["argv"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool:
        rec = self._recorded()
        return rec is not None and _start_time(rec[0]) == rec[1]

    def observe(self, config: DhcpConfig | None) -> DhcpConfig | None:
        """`config` if the recorded dnsmasq is alive and runs exactly it."""
        rec = self._recorded()
        if config is None or rec is None or _start_time(rec[0]) != rec[1]:
            return None
        argv = dnsmasq_argv(config, self.state_dir, self.binary)
        return config if rec[2] == self._digest(argv) else None

    def configure(self, config: DhcpConfig) -> None:
        """Ask the supervisor to run dnsmasq with `config` (restart if needed)."""
        if config != self.config:
            self.config = config
            self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep dnsmasq running with the latest config, forever. Leaves it
        running on cancellation: the data plane outlives the controller."""
        started = False
        proc: trio.Process | None = None  # set when dnsmasq is our own child
        while True:
            while self.config is None:
                await self._changed.wait()
                self._changed = trio.Event()
            self._changed = trio.Event()
            argv = self._argv()
            digest = self._digest(argv)
            rec = self._recorded()
            running = rec is not None and _start_time(rec[0]) == rec[1]
            if rec and running and rec[2] == digest:
                pid = rec[0]
                if proc is None or proc.pid != pid:
                    proc = None
                    log.info("dhcp: adopted running dnsmasq pid %d", pid)
            else:
                if rec and running:
                    log.info("dhcp: stopping dnsmasq pid %d (configuration changed)", rec[0])
                    await _stop(rec[0], proc if proc and proc.pid == rec[0] else None)
                swept = self.hosts.sweep()  # no dnsmasq runs now: tombstones can go
                if swept:
                    log.info("dhcp: swept %d tombstones of removed reservations", swept)
                proc = await trio.lowlevel.open_process(
                    argv,
                    start_new_session=True,  # not in the controller's process group
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                pid = proc.pid
                tmp = self.record.with_suffix(".tmp")
                tmp.write_text(json.dumps({"pid": pid, "start": _start_time(pid), "argv": digest}))
                os.replace(tmp, self.record)
                log.info("dhcp: started dnsmasq pid %d", pid)
            self.pid = pid
            if not started:
                started = True
                task_status.started()
            if await self._wait_exit_or_change(pid, proc):
                self.restarts += 1
                proc = None
                log.error(
                    "dhcp: dnsmasq pid %d exited; restarting in 1 s (see %s)",
                    pid,
                    self.hosts.root / "dnsmasq.log",
                )
                await trio.sleep(1)

    async def _wait_exit_or_change(self, pid: int, proc: trio.Process | None) -> bool:
        """True when dnsmasq exited, False when the wanted config changed."""
        exited = False
        async with trio.open_nursery() as nursery:

            async def watch_exit() -> None:
                nonlocal exited
                await _wait_exit(pid, proc)
                exited = True
                nursery.cancel_scope.cancel()

            async def watch_change() -> None:
                await self._changed.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_exit)
            nursery.start_soon(watch_change)
        return exited


async def _wait_exit(pid: int, proc: trio.Process | None) -> None:
    if proc is not None:  # our child: wait() also reaps it
        await proc.wait()
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def _stop(pid: int, proc: trio.Process | None) -> None:
    os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(5):
        await _wait_exit(pid, proc)
        return
    os.kill(pid, signal.SIGKILL)
    await _wait_exit(pid, proc)
