"""The VM side of DHCP: one client in the foreground per VM namespace, busybox
udhcpc (the default) or dhcpcd (`start(..., client="dhcpcd")`), which, like
systemd-networkd and NetworkManager, re-acquires its lease when the carrier
comes back: the kind of guest `dom0 machine renew` and moves re-address at once.

udhcpc runs the event script written here; on bound/renew the script puts the
leased address and default route on eth0 and writes the lease to
RUNDIR/leases/vmI.lease (key=value lines, replaced atomically); on deconfig it
removes what the previous lease put there and deletes the file. The script
never touches /etc/resolv.conf (that file belongs to the root namespace's
host): DNS servers are only recorded.

The client sends no hostname: the name must come from dom0.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from controller.lab import netns, processes
from controller.lab.rundir import Lab, LabError
from controller.lab.topology import VM_IF

LEASE_ENV = "DOM0_LAB_LEASE_FILE"

SCRIPT = r"""#!/bin/sh
# udhcpc event script of a dom0 lab VM (written by controller/lab/dhcpclient.py).
# $1 is the event; udhcpc passes the lease in the environment ($ip, $mask in
# prefix bits, $router, ...). The lease file lives in the lab's run directory.
lease_file="${DOM0_LAB_LEASE_FILE:?}"
dev="${interface:-eth0}"
event="$1"

old() { [ -f "$lease_file" ] && sed -n "s/^$1=//p" "$lease_file"; }
old_ip=$(old ip)
old_mask=$(old mask)

# Values are written one per line: keep each on one line.
put() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr -d '\r\n')"; }

# Which client saw which event last: `lab` waits for a new client's first
# deconfig, so that its signal handlers are installed and stale state is gone.
printf '%s %s\n' "$event" "$PPID" > "$lease_file.event"

case "$event" in
deconfig)
    if [ -n "$old_ip" ]; then
        ip -4 route del default dev "$dev" 2>/dev/null
        ip -4 addr del "$old_ip/$old_mask" dev "$dev" 2>/dev/null
    fi
    ip link set dev "$dev" up
    rm -f "$lease_file"
    ;;
bound|renew)
    if [ -n "$old_ip" ] && { [ "$old_ip" != "$ip" ] || [ "$old_mask" != "$mask" ]; }; then
        ip -4 addr del "$old_ip/$old_mask" dev "$dev" 2>/dev/null
    fi
    ip -4 addr replace "$ip/$mask" ${broadcast:+broadcast "$broadcast"} dev "$dev"
    if [ -n "$router" ]; then
        set -- $router
        ip -4 route replace default via "$1" dev "$dev"
    else
        ip -4 route del default dev "$dev" 2>/dev/null
    fi
    tmp="$lease_file.tmp.$$"
    {
        put event "$event"
        put interface "$dev"
        put ip "$ip"
        put mask "$mask"
        put router "$router"
        put hostname "$hostname"
        put domain "$domain"
        put serverid "$serverid"
        put lease "$lease"
        put dns "$dns"
        put time "$(date +%s)"
    } > "$tmp" && mv -f "$tmp" "$lease_file"
    ;;
esac
exit 0
"""


DHCPCD_SCRIPT = r"""#!/bin/sh
# dhcpcd hook of a dom0 lab VM (written by controller/lab/dhcpclient.py).
# dhcpcd puts the address and routes on eth0 itself; this only records the
# lease, in the format the udhcpc script writes. $pid is dhcpcd's own.
# (dhcpcd gives its hooks an environment of its own: the path is written in.)
lease_file="@LEASE_FILE@"
put() { printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr -d '\r\n')"; }
printf '%s %s\n' "$reason" "$pid" > "$lease_file.event"
case "$reason" in
BOUND|RENEW|REBIND|REBOOT)
    tmp="$lease_file.tmp.$$"
    {
        put event "$(echo "$reason" | tr 'A-Z' 'a-z')"
        put interface "$interface"
        put ip "$new_ip_address"
        put mask "$new_subnet_cidr"
        put router "$new_routers"
        put hostname "$new_host_name"
        put domain "$new_domain_name"
        put serverid "$new_dhcp_server_identifier"
        put lease "$new_dhcp_lease_time"
        put dns "$new_domain_name_servers"
        put time "$(date +%s)"
    } > "$tmp" && mv -f "$tmp" "$lease_file"
    ;;
PREINIT|EXPIRE|FAIL|NAK|NOCARRIER|STOP|STOPPED|RELEASE|DEPARTED)
    rm -f "$lease_file"
    ;;
esac
exit 0
"""

# DHCPv4 only, no IPv4LL, no ARP probing (the lab's addresses are the
# controller's to keep unique), and nothing that writes outside the VM.
DHCPCD_CONF = """\
ipv4only
noipv4ll
noarp
option domain_name_servers, domain_name, host_name, routers
"""

# dhcpcd keeps its pid and lease files in /run/dhcpcd and /var/lib/dhcpcd: in
# a private mount namespace with a tmpfs over each, every VM has its own.
# Its hook is ours (-c), and /etc/resolv.conf is a lab file bind-mounted over
# the host's in that mount namespace: no dhcpcd may write the host's DNS.
_DHCPCD_START = (
    "mkdir -p /run/dhcpcd /var/lib/dhcpcd && mount -t tmpfs tmpfs /run/dhcpcd && "
    'mount -t tmpfs tmpfs /var/lib/dhcpcd && mount --bind "$4" /etc/resolv.conf && '
    'exec dhcpcd -B -4 -f "$1" -c "$2" "$3"'
)


@dataclass(frozen=True, slots=True)
class Lease:
    """A VM's current lease as its DHCP client recorded it."""

    ip: str
    prefix: int
    router: str | None
    hostname: str | None
    domain: str | None
    serverid: str | None
    lease: int | None
    dns: tuple[str, ...] = ()
    event: str = "bound"
    written: float = 0.0  # mtime of the lease file
    raw: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def fqdn(self) -> str | None:
        if not self.hostname:
            return None
        if self.domain and not self.hostname.endswith(f".{self.domain}"):
            return f"{self.hostname}.{self.domain}"
        return self.hostname

    def to_json(self) -> dict[str, object]:
        return {
            "ip": self.ip,
            "prefix": self.prefix,
            "router": self.router,
            "hostname": self.hostname,
            "domain": self.domain,
            "serverid": self.serverid,
            "lease": self.lease,
            "dns": list(self.dns),
        }


def parse_lease(text: str, written: float = 0.0) -> Lease:
    """Parse the key=value lines the event script writes."""
    raw: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            raw[key] = value
    if not raw.get("ip"):
        raise ValueError("lease without ip")

    def opt(key: str) -> str | None:
        return raw.get(key) or None

    lease = opt("lease")
    return Lease(
        ip=raw["ip"],
        prefix=int(raw.get("mask") or 32),
        router=(raw["router"].split() or [""])[0] or None if opt("router") else None,
        hostname=opt("hostname"),
        domain=opt("domain"),
        serverid=opt("serverid"),
        lease=int(lease) if lease and lease.isdigit() else None,
        dns=tuple((raw.get("dns") or "").split()),
        event=raw.get("event", "bound"),
        written=written,
        raw=raw,
    )


def write_script(lab: Lab) -> Path:
    lab.dhcp_script.write_text(SCRIPT)
    lab.dhcp_script.chmod(0o755)
    _dhcpcd_conf(lab).write_text(DHCPCD_CONF)
    return lab.dhcp_script


def _dhcpcd_conf(lab: Lab) -> Path:
    return lab.dhcp_script.with_name("dhcpcd.conf")


def _dhcpcd_hook(lab: Lab, index: int) -> Path:
    return lab.dhcp_script.with_name(f"dhcpcd-hook-vm{index}.sh")


def dhcpcd_argv(lab: Lab, index: int) -> list[str]:
    hook, conf = _dhcpcd_hook(lab, index), _dhcpcd_conf(lab)
    hook.write_text(DHCPCD_SCRIPT.replace("@LEASE_FILE@", str(lab.lease_path(index))))
    hook.chmod(0o755)
    resolv = hook.with_name(f"resolv-vm{index}.conf")
    resolv.touch()
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", _DHCPCD_START, "dhcpcd-lab", str(conf), str(hook), VM_IF, str(resolv),
    ]  # fmt: skip


CLIENTS = ("udhcpc", "dhcpcd")


def client_of(lab: Lab, index: int) -> str:
    """Which client VM index runs (or last ran)."""
    entry = lab.read().get("processes", {}).get(role(index))
    argv = entry.get("argv", []) if entry else []
    return "dhcpcd" if any(a == "dhcpcd-lab" for a in argv) else "udhcpc"


def role(index: int) -> str:
    return f"dhcp@vm{index}"


def udhcpc_argv(lab: Lab) -> list[str]:
    # -t 5 -T 1 -A 1: a discover every second, retried forever, so a client
    # started before the controller gets its lease ~1 s after dnsmasq is up.
    # No -R: stopping the client leaves the address, like a crashed guest agent.
    # No -x hostname / -F: the name comes from dom0.
    return [
        "busybox", "udhcpc", "-f", "-i", VM_IF, "-s", str(lab.dhcp_script),
        "-t", "5", "-T", "1", "-A", "1",
    ]  # fmt: skip


def start(lab: Lab, index: int, *, wait: bool = True, client: str = "udhcpc") -> processes.ProcId:
    """Start VM index's DHCP client (replacing a recorded one that is not running).

    With wait, returns after the client's first event (see wait_started).
    """
    if client not in CLIENTS:
        raise LabError(f"DHCP client: expected one of {', '.join(CLIENTS)}, got {client!r}")
    vm = lab.vm(index)
    current = lab.process(role(index))
    if current is not None and processes.is_running(current):
        raise LabError(f"vm{index}: DHCP client already running (pid {current.pid})")
    if not lab.dhcp_script.exists() or not _dhcpcd_conf(lab).exists():
        write_script(lab)
    lab.leases_dir.mkdir(parents=True, exist_ok=True)
    inner = dhcpcd_argv(lab, index) if client == "dhcpcd" else udhcpc_argv(lab)
    argv = netns.exec_argv(vm["namespace"], inner)
    env = dict(os.environ)
    env[LEASE_ENV] = str(lab.lease_path(index))
    _event_path(lab, index).unlink(missing_ok=True)
    _, proc = processes.spawn(argv, log=lab.logs_dir / f"dhcp-vm{index}.log", env=env)
    lab.record_process(role(index), proc, vm["namespace"], argv)
    if wait:
        wait_started(lab, index, proc)
    return proc


def wait_started(lab: Lab, index: int, proc: processes.ProcId, timeout: float = 5.0) -> None:
    """Wait for a new client's first event (deconfig): from then on it handles
    SIGUSR1/SIGUSR2 (before, they would kill it) and a lease file left by an
    earlier client is gone."""

    def started() -> bool:
        try:
            words = _event_path(lab, index).read_text().split()
        except FileNotFoundError:
            return False
        return len(words) == 2 and words[1] == str(proc.pid)

    if not _wait_for(started, timeout):
        raise LabError(f"vm{index}: DHCP client did not start within {timeout:g} s")


def _event_path(lab: Lab, index: int) -> Path:
    return lab.lease_path(index).with_name(f"vm{index}.lease.event")


def start_many(lab: Lab, indexes: Iterable[int], *, wait: bool = True) -> None:
    """Start several clients, then (wait) make sure each one is running."""
    started = [(index, start(lab, index, wait=False)) for index in indexes]
    if wait:
        for index, proc in started:
            wait_started(lab, index, proc)


def stop(lab: Lab, index: int, *, release: bool = False, grace: float = 2.0) -> None:
    """Stop VM index's DHCP client; release=True first gives the lease back
    (SIGUSR2: the client sends DHCPRELEASE and deconfigures eth0)."""
    proc = lab.process(role(index))
    if proc is None:
        return
    # (release: udhcpc on SIGUSR2, dhcpcd on SIGHUP, which also ends it)
    sig = signal.SIGHUP if client_of(lab, index) == "dhcpcd" else signal.SIGUSR2
    if release and processes.send_signal(proc, sig):
        _wait_for(lambda: not lab.lease_path(index).exists(), 3.0)
    processes.stop([proc], grace=grace)
    lab.forget_process(role(index))


def restart(lab: Lab, index: int) -> processes.ProcId:
    client = client_of(lab, index)
    stop(lab, index)
    return start(lab, index, client=client)


def read_lease(lab: Lab, index: int) -> Lease | None:
    p = lab.lease_path(index)
    try:
        text = p.read_text()
        written = p.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return parse_lease(text, written)
    except ValueError:
        return None


def _wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def wait_lease(
    lab: Lab, index: int, timeout: float = 30.0, *, newer_than: float | None = None
) -> Lease:
    """Wait until VM index holds a lease (written after newer_than, if given)."""
    found: list[Lease] = []

    def ready() -> bool:
        lease = read_lease(lab, index)
        if lease is None or (newer_than is not None and lease.written <= newer_than):
            return False
        found.append(lease)
        return True

    if not _wait_for(ready, timeout):
        raise LabError(f"vm{index}: no DHCP lease within {timeout:g} s")
    return found[-1]


def wait_leases(
    lab: Lab,
    indexes: Iterable[int],
    timeout: float = 30.0,
    progress: Callable[[int, int, list[int]], None] | None = None,
    check: Callable[[], None] | None = None,
) -> dict[int, Lease]:
    """Wait for every listed VM's lease; progress(have, want, missing) about once a
    second. check() runs as often and may raise to stop waiting early (e.g. when
    the DHCP server's process died)."""
    want = sorted(indexes)
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 1.0
    leases: dict[int, Lease] = {}
    while True:
        for index in want:
            if index not in leases:
                lease = read_lease(lab, index)
                if lease is not None:
                    leases[index] = lease
        missing = [i for i in want if i not in leases]
        if not missing:
            return leases
        now = time.monotonic()
        if now >= deadline:
            names = ", ".join(f"vm{i}" for i in missing)
            raise LabError(f"no DHCP lease within {timeout:g} s for {names}")
        if now >= next_report:
            if check is not None:
                check()
            if progress is not None:
                progress(len(leases), len(want), missing)
            next_report = now + 1.0
        time.sleep(0.05)


def _generation(lab: Lab, index: int) -> tuple[int, int] | None:
    """Identity of the current lease file: each write is a new file (mv), so a
    new inode, even within one tick of the filesystem clock."""
    try:
        st = lab.lease_path(index).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def renew(lab: Lab, index: int, *, wait: bool = True, timeout: float = 10.0) -> Lease | None:
    """Ask VM index's client to renew now (SIGUSR1); wait for the rewritten lease."""
    proc = lab.process(role(index))
    if proc is None or not processes.is_running(proc):
        raise LabError(f"vm{index}: DHCP client not running")
    before = _generation(lab, index)
    processes.send_signal(proc, signal.SIGUSR1)
    if not wait:
        return None
    fresh: list[Lease] = []

    def changed() -> bool:
        gen = _generation(lab, index)
        if gen is None or gen == before:
            return False
        lease = read_lease(lab, index)
        if lease is not None:
            fresh.append(lease)
        return lease is not None

    if not _wait_for(changed, timeout):
        raise LabError(f"vm{index}: lease not renewed within {timeout:g} s")
    return fresh[-1]
