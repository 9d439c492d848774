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

A running dnsmasq also never forgets an address it has read: a rewritten
file's old entry stays in memory, and a later `dhcp-host` line naming that
address again is refused ("duplicate dhcp-host IP address", in its log),
so the machine would keep being served its previous reservation. HostsDir
therefore keeps the addresses the running dnsmasq has read (`burnt`,
persisted in `dhcp/burnt` so that a restarted controller that adopts dnsmasq
knows them too); the allocator hands out an address that is not burnt while
the pool has one (core/allocation.py), and a reservation that must name a
burnt address (a machine keeps its address under a new name, a pool is used
up) makes the supervisor restart dnsmasq: planned, at most once a second,
leases kept in its lease file.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio

from common import processes
from common.processes import ProcessRecord
from controller.core.desired import DhcpConfig, DhcpHost

log = logging.getLogger(__name__)


def dnsmasq_argv(config: DhcpConfig, state_dir: Path, binary: str = "dnsmasq") -> list[str]:
    d = state_dir / "dhcp"
    argv = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",  # no DNS here: unbound serves names (drivers/dns.py)
        "--no-hosts",
        f"--interface={config.bridge}",
        "--bind-interfaces",
        f"--dhcp-hostsdir={d / 'hosts'}",
        f"--dhcp-leasefile={d / 'leases'}",
        "--no-ping",  # the controller already guarantees addresses are unique
        "--dhcp-authoritative",
        f"--log-facility={d / 'dnsmasq.log'}",
        *DHCP_LOG_ARGS[config.log],
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
        # (no DNS server where DNS is over TLS only: a plain client would ask in vain)
        dns = f",{r.dns}" if r.dns else ""
        argv.append(f"--dhcp-option=tag:{r.tag},option:dns-server{dns}")
    for tag, domain_name in config.tag_domains:
        argv.append(f"--dhcp-option=tag:{tag},option:domain-name,{domain_name}")
    if config.ranges6:
        # Router advertisements for every domain's /64 (one RA per interface:
        # each machine hears every prefix): managed (M), no SLAAC (A=0) and not
        # on-link (L=0), so that a machine's only address is its DHCPv6
        # reservation and all its IPv6 goes through dom0, which applies the
        # policy; router lifetime 0 (no default route) unless the uplink
        # carries IPv6.
        argv.append("--enable-ra")
        if not config.default_route6:
            argv.append(f"--ra-param={config.bridge},0,0")
        for tag, prefix in config.ranges6:
            network = prefix.split("/")[0]
            argv.append(
                f"--dhcp-range=set:{tag},{network},static,off-link,64,{config.lease_seconds}"
            )
    return argv


# policy [dhcp] log: dnsmasq's own switches for it
DHCP_LOG_ARGS = {"quiet": ("--quiet-dhcp",), "transactions": (), "verbose": ("--log-dhcp",)}

RELOAD_INTERVAL = 1.0  # seconds between planned restarts of dnsmasq, at least

_MAC_FILE = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}$")
_V6_FILE = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}\.v6$")
V6 = ".v6"  # a machine's DHCPv6 reservation: a file of its own beside its DHCPv4 one


def _host_file(mac: str) -> str:
    return mac.replace(":", "-")


def tombstone(mac: str) -> str:
    return f"{mac},ignore\n"


def parse_host_line(line: str) -> DhcpHost | None:
    parts = line.strip().split(",")
    if len(parts) != 5 or parts[1] != "id:*" or not parts[2].startswith("set:"):
        return None
    return DhcpHost(parts[0], parts[3], parts[4], parts[2][4:])


def parse_host6_line(line: str) -> tuple[str, str] | None:
    """(MAC, IPv6 address) of a `MAC,set:TAG,[ADDRESS],NAME` reservation."""
    parts = line.strip().split(",")
    if len(parts) != 4 or not parts[1].startswith("set:"):
        return None
    if not (parts[2].startswith("[") and parts[2].endswith("]")):
        return None
    return parts[0], parts[2][1:-1]


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
        self._known6: dict[str, tuple[int, int, tuple[str, str] | None]] = {}  # MAC.v6 files
        self.burnt_path = self.root / "burnt"
        self.burnt: set[str] = self._load_burnt()
        # called when a reservation was written that the running dnsmasq
        # cannot take (its address is burnt): it must be restarted
        self.on_stale: Callable[[], None] | None = None
        self.stale = False

    def _load_burnt(self) -> set[str]:
        try:
            return set(self.burnt_path.read_text().split())
        except FileNotFoundError:
            # (no record: what the files name now is at least what dnsmasq has read)
            return {h.address for h in self._peek().values()}

    def _peek(self) -> dict[str, DhcpHost]:
        out: dict[str, DhcpHost] = {}
        if not self.dir.is_dir():
            return out
        for f in self.dir.iterdir():
            host = parse_host_line(f.read_text(errors="replace")) if f.is_file() else None
            if host is not None:
                out[host.mac] = host
        return out

    def reset_burnt(self) -> None:
        """A new dnsmasq is about to start: it reads only what the files name now."""
        self.burnt = {h.address for h in self._peek().values()}
        self.stale = False
        if not self.readonly:
            tmp = self.tmp / "burnt"
            tmp.write_text("".join(f"{a}\n" for a in sorted(self.burnt)))
            os.replace(tmp, self.burnt_path)

    def read(self) -> dict[str, DhcpHost]:
        """Every reservation on disk. A file that is not a reservation of
        ours is neutralised in place (a tombstone, or emptied): dnsmasq would
        keep a deleted file's entries until it restarts."""
        out: dict[str, DhcpHost] = {}
        six: dict[str, str] = {}
        seen: set[str] = set()
        if self.readonly and not self.dir.is_dir():
            return out
        with os.scandir(self.dir) as entries:
            for e in entries:
                seen.add(e.name)
                if _V6_FILE.match(e.name):
                    st6 = e.stat(follow_symlinks=False)
                    cached = self._known6.get(e.name)
                    if cached is not None and cached[:2] == (st6.st_ino, st6.st_mtime_ns):
                        pair = cached[2]
                    else:  # (read again only when it changed, as the IPv4 files)
                        text = Path(e.path).read_text(errors="replace") if e.is_file() else ""
                        pair = parse_host6_line(text)
                        if pair is not None and _host_file(pair[0]) + V6 != e.name:
                            pair = None
                        if pair is None and text and not self.readonly:
                            self._replace(e.name, "")  # (no entry: see write())
                            st6 = (self.dir / e.name).stat()
                        self._known6[e.name] = (st6.st_ino, st6.st_mtime_ns, pair)
                    if pair is not None:
                        six[pair[0]] = pair[1]
                    continue
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
        for name in set(self._known6) - seen:
            del self._known6[name]
        return {
            mac: dataclasses.replace(h, address6=six.get(mac)) if h.address6 != six.get(mac) else h
            for mac, h in out.items()
        }

    def write(self, put: Mapping[str, DhcpHost], delete: frozenset[str] | set[str]) -> None:
        """Reservations in, removed ones as tombstones (never deleted: see
        the module's docstring)."""
        for mac in delete:
            if mac not in put:
                name = _host_file(mac)
                self._replace(name, tombstone(mac))
                self._remember(name, None)
        for mac in delete:
            if mac not in put:
                self._drop6(mac)
        fresh: list[str] = []
        for mac, host in put.items():
            name = _host_file(mac)
            self._replace(name, host.line())
            self._remember(name, dataclasses.replace(host, address6=None))
            if host.address6 is not None:
                self._replace(name + V6, host.line6())
            elif self._drop6(mac):
                self.stale = True  # (dnsmasq keeps a v6 entry it has read)
            if host.address in self.burnt:
                self.stale = True
            else:
                self.burnt.add(host.address)
                fresh.append(host.address)
        if fresh:
            with self.burnt_path.open("a") as f:
                f.write("".join(f"{a}\n" for a in fresh))
        if self.stale and self.on_stale is not None:
            self.on_stale()

    def _drop6(self, mac: str) -> bool:
        """Empty a machine's DHCPv6 file (an empty file: `MAC,ignore` there
        would silence its DHCPv4 too); whether it named an address."""
        path = self.dir / (_host_file(mac) + V6)
        try:
            had = bool(path.read_text().strip())
        except FileNotFoundError:
            return False
        if had:
            self._replace(path.name, "")
        return had

    def sweep(self) -> int:
        """Remove tombstones and whatever else is not a reservation: only
        while no dnsmasq runs (a running one would keep their entries)."""
        removed = 0
        with os.scandir(self.dir) as entries:
            for e in entries:
                text = Path(e.path).read_text(errors="replace") if e.is_file() else ""
                if _V6_FILE.match(e.name) and parse_host6_line(text) is not None:
                    continue
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
        self.restarts = 0  # dnsmasq exited on its own (and was started again)
        self.reloads = 0  # restarted on purpose: reservations it could not take running
        self._settled = trio.Event()  # set while the running dnsmasq holds every reservation
        self.hosts.on_stale = self._stale

    def _argv(self) -> list[str]:
        assert self.config is not None
        return dnsmasq_argv(self.config, self.state_dir, self.binary)

    def _running(self) -> ProcessRecord | None:
        """The recorded dnsmasq if it still runs (a zombie does not: it is reaped
        if it was our child)."""
        rec = processes.read_record(self.record)
        if rec is None or processes.is_running(rec):
            return rec
        processes.reap(rec.pid)
        return None

    def alive(self) -> bool:
        return self._running() is not None

    async def settled(self) -> None:
        """Return once the running dnsmasq holds every reservation written
        (none waits for a restart)."""
        await self._settled.wait()

    def _stale(self) -> None:
        if self._settled.is_set():
            self._settled = trio.Event()
        self._changed.set()

    def observe(self, config: DhcpConfig | None) -> DhcpConfig | None:
        """`config` if the recorded dnsmasq is alive and runs exactly it."""
        rec = self._running()
        if config is None or rec is None:
            return None
        argv = dnsmasq_argv(config, self.state_dir, self.binary)
        return config if rec.argv == processes.command_digest(argv) else None

    def configure(self, config: DhcpConfig) -> None:
        """Ask the supervisor to run dnsmasq with `config` (restart if needed)."""
        if config != self.config:
            self.config = config
            self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep dnsmasq running with the latest config, forever. Leaves it
        running on cancellation: the data plane outlives the controller."""
        started = False
        last_start = -RELOAD_INTERVAL
        while True:
            while self.config is None:
                await self._changed.wait()
                self._changed = trio.Event()
            self._changed = trio.Event()
            argv = self._argv()
            digest = processes.command_digest(argv)
            running = self._running()
            if running is not None and running.argv == digest and not self.hosts.stale:
                rec = running
                if processes.child(rec.pid) is None:
                    log.info("dhcp: adopted running dnsmasq pid %d", rec.pid)
            else:
                if running is not None:
                    if running.argv == digest:
                        # (see the module's docstring: burnt addresses)
                        await trio.sleep_until(last_start + RELOAD_INTERVAL)
                        self.reloads += 1
                        why = "to read reservations that reuse an address it has read"
                    else:
                        why = "configuration changed"
                    log.info("dhcp: stopping dnsmasq pid %d (%s)", running.pid, why)
                    await trio.to_thread.run_sync(
                        functools.partial(processes.stop, [running], 5.0, kill_wait=5.0)
                    )
                swept = self.hosts.sweep()  # no dnsmasq runs now: tombstones can go
                if swept:
                    log.info("dhcp: swept %d tombstones of removed reservations", swept)
                self.hosts.reset_burnt()
                last_start = trio.current_time()
                _, started_rec = await trio.to_thread.run_sync(processes.spawn, argv)
                rec = dataclasses.replace(started_rec, argv=digest)
                processes.write_record(self.record, rec)
                log.info("dhcp: started dnsmasq pid %d", rec.pid)
            pid = rec.pid
            self.pid = pid
            if not self.hosts.stale:
                self._settled.set()
            if not started:
                started = True
                task_status.started()
            if await self._wait_exit_or_change(rec):
                self.restarts += 1
                log.error(
                    "dhcp: dnsmasq pid %d exited; restarting in 1 s (see %s)",
                    pid,
                    self.hosts.root / "dnsmasq.log",
                )
                await trio.sleep(1)

    async def _wait_exit_or_change(self, rec: ProcessRecord) -> bool:
        """True when dnsmasq exited, False when the wanted config changed."""
        return await processes.exited_before(rec, lambda: self._changed)


# ---- for `dom0 host check` and `dom0 flush` (outside the controller) ------------------------


def record_path(state_dir: Path) -> Path:
    """Where the controller records the dnsmasq it runs for `state_dir`."""
    return state_dir / "dhcp" / "dnsmasq.json"


def state_dir_of(argv: Sequence[str]) -> Path | None:
    """The state directory a dnsmasq started by `dnsmasq_argv` serves, from
    its command line (its --dhcp-hostsdir is STATE/dhcp/hosts)."""
    for a in argv:
        if a.startswith("--dhcp-hostsdir="):
            hosts = Path(a.split("=", 1)[1])
            if hosts.name == "hosts" and hosts.parent.name == "dhcp":
                return hosts.parent.parent
    return None


def reservation_files(state_dir: Path) -> list[Path]:
    """The reservation (and tombstone) files in STATE/dhcp/hosts."""
    d = state_dir / "dhcp" / "hosts"
    try:
        return sorted(p for p in d.iterdir() if not p.is_dir())
    except FileNotFoundError:
        return []
