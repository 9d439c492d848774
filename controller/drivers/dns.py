"""DNS for the site: unbound, owned by the controller.

unbound runs in the foreground in dom0's namespace, in its own session, and
outlives the controller like dnsmasq (drivers/dhcp.py): its record in
`dns/unbound.json` lets a restarted controller adopt it when it still runs
the configuration wanted, else it is stopped by PID and started again.

The site's records are zone files, one per zone (`dns/zones/ZONE.zone`),
served as unbound auth-zones. A change rewrites the zones it touches (renamed
in whole) and asks unbound over its control socket to reload just those:
no restart, and a restarted unbound reads the same files and answers the
same at once. The control socket is a Unix socket in `dns/` (unbound's
remote-control without TLS keys: only root and unbound's group may open it),
spoken as unbound-control does: one line `UBCT1 COMMAND`, a text reply.

Where it listens follows the policy (core/dnszone.py): DNS over TLS on each
asking domain's gateway, with a certificate from dom0's CA; plain DNS on the
loopback and on the gateways of `dns = "plain"` domains only. Addresses may
not exist yet when it starts (the first sync adds them): ip-freebind. What
the tenants send is bounded: per-client rate limits, no recursion for anyone
but the site's networks, and outside names only through the uplink.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pwd
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import trio

from common import processes
from common.processes import ProcessRecord
from controller.core.dnszone import DnsConfig, Record, split, zone_body, zone_text

log = logging.getLogger(__name__)

DOT_PORT = 853
CONTROL = "control.sock"
CERT = "tls.pem"  # its key, certificate and chain, 0600
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
# queries per second one client address may send (unbound's ip-ratelimit):
# a tenant flooding dom0's resolver is slowed, the others are not
CLIENT_RATE = 200
RESTART_DELAY = 1.0  # seconds after unbound exited on its own
CONTROL_TIMEOUT = 5.0


class DnsError(Exception):
    """unbound refused or could not be asked; one line."""


def dns_dir(state_dir: Path) -> Path:
    return state_dir / "dns"


def unbound_user() -> str:
    """unbound drops to its own user where the system has one (it reads its
    TLS key and binds before dropping privileges)."""
    try:
        pwd.getpwnam("unbound")
    except KeyError:
        return ""
    return "unbound"


def zone_path(root: Path, zone: str) -> Path:
    return root / "zones" / f"{zone}.zone"


def unbound_conf(config: DnsConfig, root: Path, cert: Path | None, username: str) -> str:
    """unbound.conf for `config`. Without a certificate (dom0 has no CA yet)
    there is no DNS over TLS: plain DNS on the loopback and plain domains only."""
    lines = [
        "server:",
        "  interface-automatic: no",
        "  ip-freebind: yes",
        "  port: 53",
        f"  tls-port: {DOT_PORT}",
    ]
    lines += [f"  interface: {a}@53" for a in config.plain]
    if cert is not None:
        lines += [f"  interface: {a}@{DOT_PORT}" for a in config.tls]
        lines += [f'  tls-service-key: "{cert}"', f'  tls-service-pem: "{cert}"']
    lines += [
        "  access-control: 0.0.0.0/0 refuse",
        "  access-control: ::/0 refuse",
        "  access-control: 127.0.0.0/8 allow",
        "  access-control: ::1/128 allow",
    ]
    lines += [f"  access-control: {net} allow" for net in config.clients]
    if config.recurse and config.upstream:
        lines.append(f'  tls-cert-bundle: "{config.upstream_ca or SYSTEM_CA}"')
    lines += [
        f'  username: "{username}"',
        '  chroot: ""',
        f'  directory: "{root}"',
        '  pidfile: ""',
        "  use-syslog: no",
        '  logfile: ""',  # (stderr: the log file the controller opened for it)
        "  log-time-ascii: yes",
        "  verbosity: 1",
        '  module-config: "iterator"',
        "  hide-identity: yes",
        "  hide-version: yes",
        "  qname-minimisation: yes",
        "  do-not-query-localhost: yes",
        "  num-threads: 1",
        f"  ip-ratelimit: {CLIENT_RATE}",
        "  tcp-idle-timeout: 30000",
        "  edns-tcp-keepalive: yes",
    ]
    # unbound's own RFC 1918 and ULA reverse zones are empty and would hide
    # ours: a transparent local zone of the same name lets the auth-zone answer
    lines += [f'  local-zone: "{z}." transparent' for z in config.zones]
    if not config.recurse:
        lines.append('  local-zone: "." refuse')  # (no uplink: the site's names only)
    lines += [
        "remote-control:",
        "  control-enable: yes",
        f'  control-interface: "{root / CONTROL}"',
    ]
    for z in config.zones:
        lines += [
            "auth-zone:",
            f'  name: "{z}."',
            f'  zonefile: "{zone_path(root, z)}"',
            "  for-downstream: yes",
            "  for-upstream: yes",
            "  fallback-enabled: no",
        ]
    if config.recurse and config.upstream:
        lines += ["forward-zone:", '  name: "."', "  forward-tls-upstream: yes"]
        lines += [f"  forward-addr: {u}" for u in config.upstream]
    return "\n".join(lines) + "\n"


class Zones:
    """The zone files: rewritten only when their records change, with a
    serial that only grows."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bodies: dict[str, str] = {}
        self.serials: dict[str, int] = {}

    def ensure(self, config: DnsConfig, ttl: int) -> None:
        """A file for every zone (unbound refuses to start without one): an
        empty zone where none was written yet."""
        (self.root / "zones").mkdir(parents=True, exist_ok=True)
        for zone in config.zones:
            path = zone_path(self.root, zone)
            if not path.exists():
                self._replace(path, zone_text(zone, config.tld, "", int(time.time()), ttl))

    def _replace(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)

    def write(self, config: DnsConfig, records: Iterable[Record], ttl: int) -> set[str]:
        """Every zone of `config` with `records`; the zones whose file changed."""
        (self.root / "zones").mkdir(parents=True, exist_ok=True)
        changed: set[str] = set()
        for zone, mine in split(records, config.zones).items():
            body = zone_body(mine)
            path = zone_path(self.root, zone)
            if self.bodies.get(zone) == body and path.exists():
                continue
            if zone not in self.bodies and _body_of(path) == body:
                self.bodies[zone] = body  # (as a restarted controller finds it)
                continue
            serial = max(self.serials.get(zone, 0) + 1, int(time.time()), _serial_of(path) + 1)
            self._replace(path, zone_text(zone, config.tld, body, serial, ttl))
            self.bodies[zone] = body
            self.serials[zone] = serial
            changed.add(zone)
        return changed


def _header_lines() -> int:
    return 3  # $ORIGIN, SOA, NS (dnszone.zone_text)


def _body_of(path: Path) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    return "".join(text.splitlines(keepends=True)[_header_lines() :])


def _serial_of(path: Path) -> int:
    try:
        soa = path.read_text().splitlines()[1].split()
        return int(soa[6])
    except (OSError, IndexError, ValueError):
        return 0


def control(root: Path, command: str, timeout: float = CONTROL_TIMEOUT) -> str:
    """One unbound-control command over the local socket (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(root / CONTROL))
            s.sendall(f"UBCT1 {command}\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise DnsError(f"unbound's control socket {root / CONTROL}: {e}") from e
    return b"".join(chunks).decode(errors="replace")


class Unbound:
    """Supervises one unbound for the current DnsConfig and keeps its zones."""

    def __init__(self, state_dir: Path, binary: str | None = None) -> None:
        self.root = dns_dir(state_dir)
        self.record = self.root / "unbound.json"
        self.log_path = self.root / "unbound.log"
        self.binary = binary or shutil.which("unbound") or "/usr/sbin/unbound"
        self.zones = Zones(self.root)
        self.config: DnsConfig | None = None
        self.cert: Path | None = None
        self.ttl = 300
        self.pid: int | None = None
        self.restarts = 0  # unbound exited on its own (and was started again)
        self.reloads = 0  # zones reloaded into a running unbound
        self.published = 0  # records in the zones now
        self._dirty: set[str] = set()  # zones written that the running unbound has not read
        self._changed = trio.Event()  # the wanted configuration changed
        self._zones_changed = trio.Event()
        self.loaded = trio.Event()  # set while unbound serves every zone file as written

    # -- what the controller asks ---------------------------------------------------
    def configure(self, config: DnsConfig, cert: Path | None, ttl: int) -> None:
        if (config, cert, ttl) != (self.config, self.cert, self.ttl):
            self.config, self.cert, self.ttl = config, cert, ttl
            self._changed.set()

    def publish(self, records: Iterable[Record]) -> None:
        """The site's records now: the zones that change are written at once,
        and reloaded by the supervisor."""
        if self.config is None:
            return
        records = list(records)
        changed = self.zones.write(self.config, records, self.ttl)
        self.published = len(records)
        if changed:
            self._dirty |= changed
            if self.loaded.is_set():
                self.loaded = trio.Event()
            self._zones_changed.set()

    def report(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "running": self._running() is not None,
            "zones": list(self.config.zones) if self.config else [],
            "records": self.published,
            "tls": list(self.config.tls) if self.config and self.cert else [],
            "plain": list(self.config.plain) if self.config else [],
            "restarts": self.restarts,
            "reloads": self.reloads,
            "log": str(self.log_path),
        }

    # -- the process -------------------------------------------------------------------
    def _conf_path(self) -> Path:
        return self.root / "unbound.conf"

    def _argv(self) -> list[str]:
        return [self.binary, "-d", "-c", str(self._conf_path())]

    def _digest(self, conf: str) -> str:
        cert = b""
        if self.cert is not None:
            try:
                cert = self.cert.read_bytes()
            except OSError:
                cert = b"missing"
        extra = hashlib.sha256(conf.encode() + b"\0" + cert).hexdigest()
        return processes.command_digest([*self._argv(), extra])

    def _running(self) -> ProcessRecord | None:
        rec = processes.read_record(self.record)
        if rec is None or processes.is_running(rec):
            return rec
        processes.reap(rec.pid)
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep unbound running with the latest configuration and zones,
        forever. Leaves it running on cancellation."""
        started = False
        while True:
            while self.config is None:
                await self._changed.wait()
                self._changed = trio.Event()
            self._changed = trio.Event()
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.chmod(0o755)  # (unbound, unprivileged, reads its zones here)
            (self.root / "zones").mkdir(exist_ok=True)
            conf = unbound_conf(self.config, self.root, self.cert, unbound_user())
            digest = self._digest(conf)
            running = self._running()
            if running is not None and running.argv == digest:
                rec = running
                if processes.child(rec.pid) is None:
                    log.info("dns: adopted running unbound pid %d", rec.pid)
            else:
                if running is not None:
                    log.info("dns: stopping unbound pid %d (configuration changed)", running.pid)
                    await trio.to_thread.run_sync(
                        functools.partial(processes.stop, [running], 5.0, kill_wait=5.0)
                    )
                self.zones.ensure(self.config, self.ttl)
                self._write_conf(conf)
                self._dirty.clear()  # (a new unbound reads every zone file as it is)
                _, started_rec = await trio.to_thread.run_sync(
                    functools.partial(processes.spawn, self._argv(), log=self.log_path)
                )
                rec = dataclasses.replace(started_rec, argv=digest)
                processes.write_record(self.record, rec)
                log.info("dns: started unbound pid %d", rec.pid)
            self.pid = rec.pid
            if not started:
                started = True
                task_status.started()
            if await self._serve(rec):
                self.restarts += 1
                log.error("dns: unbound pid %d exited; restarting (see %s)", rec.pid, self.log_path)
                await trio.sleep(RESTART_DELAY)

    def _write_conf(self, conf: str) -> None:
        path = self._conf_path()
        tmp = path.with_name(".unbound.conf.tmp")
        tmp.write_text(conf)
        tmp.chmod(0o644)
        os.replace(tmp, path)

    async def _serve(self, rec: ProcessRecord) -> bool:
        """Reload zones as they change, until unbound exits (True) or the
        wanted configuration changes (False)."""
        return await processes.exited_before(rec, lambda: self._changed, self._reloads)

    async def _reloads(self) -> None:
        # (a freshly started unbound takes a moment to open its control socket)
        while True:
            while self._dirty:
                zone = min(self._dirty)
                try:
                    reply = await trio.to_thread.run_sync(
                        control, self.root, f"auth_zone_reload {zone}"
                    )
                except DnsError as e:
                    log.debug("dns: %s (retrying)", e)
                    await trio.sleep(0.05)
                    continue
                if not reply.startswith("ok"):
                    log.error("dns: unbound refused to reload %s: %s", zone, reply.strip())
                self._dirty.discard(zone)
                self.reloads += 1
            self.loaded.set()
            self._zones_changed = trio.Event()
            if self._dirty:
                continue
            await self._zones_changed.wait()


# ---- for `dom0 host check` and `dom0 flush` (outside the controller) ------------------------


def record_path(state_dir: Path) -> Path:
    return dns_dir(state_dir) / "unbound.json"
