"""The lab's public resolver "beyond the VPN": unbound serving DNS over TLS
on the lab's internet, where dom0's own DNS server forwards outside names.

    NAME-wan   203.0.113.53/32 on lo; unbound -d -c RUNDIR/resolver/unbound.conf
    RUNDIR/resolver/
        ca.pem        (0644) the lab internet's CA: dom0's policy names it as
                      its upstream CA bundle ([dns] upstream_ca)
        server.key    (0600) and server.pem: resolver.lab.example and
                      IP:203.0.113.53, signed by that CA
        unbound.conf  written by `start`
        unbound.log   unbound's log, one line per query (log-queries)

It answers a small zone of outside names from local data, NXDOMAIN for any
other name under lab.example, and refuses everything else: nothing recurses
to the real internet. It serves TLS only, so a query that reached it in the
clear is one that left dom0 outside its stub's DoT forwarding. As the VPN
masquerades, dom0's queries through its uplink arrive from 198.51.100.3 and
are logged so (`queries`): a query logged from 198.51.100.2 left dom0's WAN
outside the tunnel, the DNS counterpart of the echo service.

    python -m controller.lab.resolver ask NAME [TYPE] --ca FILE [--udp] [--json]

asks it from inside a namespace (the library half, `ask`, runs that with
`ip netns exec`), so that a test sees what a client there sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from controller.lab import dnsprobe, netns, processes, topology
from controller.lab.rundir import Lab, LabError

RESOLVER_ADDRESS = "203.0.113.53"
RESOLVER_PORT = 853
RESOLVER_NAME = "resolver.lab.example"
ROLE = "resolver@wan"
READY_TIMEOUT = 10.0

ZONE = "lab.example."
# The outside names it knows; any other name under ZONE is NXDOMAIN.
ZONE_DATA = (
    f"{ZONE} 3600 IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 60",
    f"echo.{ZONE} 300 IN A {topology.ECHO_ADDRESS}",
    f"www.{ZONE} 300 IN A {topology.ECHO_ADDRESS}",
    f'txt.{ZONE} 300 IN TXT "beyond the tunnel"',
)
CERT_DAYS = 7
# A certificate with less than this left is made again by `prepare`.
CERT_MARGIN = timedelta(days=1)

CA_PEM = "ca.pem"
SERVER_KEY = "server.key"
SERVER_PEM = "server.pem"
CONF = "unbound.conf"
LOG = "unbound.log"


def directory(lab: Lab) -> Path:
    return lab.root / "resolver"


def ca_path(lab: Lab) -> Path:
    return directory(lab) / CA_PEM


def log_path(lab: Lab) -> Path:
    return directory(lab) / LOG


# ---- certificates --------------------------------------------------------------------------


def make_certificates(where: Path, now: datetime | None = None) -> None:
    """A new CA (where/ca.pem) and the resolver's key and certificate signed by it.

    The CA's key is not kept: nothing else is ever signed with it, and a lab
    that needs a new certificate gets a new CA with it (at `lab up`, before
    dom0's policy names the CA file).
    """
    from cryptography.hazmat.primitives import serialization

    from controller.pki import issue

    now = now or datetime.now(UTC)
    ca_key = issue.new_key()
    # (a root as dom0's own are made: one place knows what a CA certificate carries)
    ca = issue.make_root(ca_key, ZONE.rstrip("."), now, years=1)
    # The leaf is shaped as dom0's own server certificates are (one place
    # knows what a TLS server certificate carries).
    key = issue.new_key()
    leaf = issue.make_server(
        key.public_key(), ca, ca_key, [RESOLVER_NAME], [RESOLVER_ADDRESS], now, days=CERT_DAYS
    )
    pem = serialization.Encoding.PEM
    key_bytes = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    where.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write(where / SERVER_KEY, key_bytes, 0o600)
    _write(where / SERVER_PEM, leaf.public_bytes(pem), 0o644)
    _write(where / CA_PEM, ca.public_bytes(pem), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with exactly mode whatever the umask (the key is never readable by others)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _usable(where: Path, now: datetime) -> bool:
    """True if the CA, key and certificate are there and the certificate is
    valid for a while yet."""
    from cryptography import x509

    if not all((where / f).is_file() for f in (CA_PEM, SERVER_KEY, SERVER_PEM)):
        return False
    try:
        cert = x509.load_pem_x509_certificate((where / SERVER_PEM).read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after.replace(tzinfo=UTC) - now > CERT_MARGIN


def prepare(lab: Lab) -> str:
    """The CA and certificate (made if missing); returns the [dns] section for
    dom0's policy: its upstream is this resolver, verified against its CA."""
    where = directory(lab)
    if not _usable(where, datetime.now(UTC)):
        make_certificates(where)
    return (
        "\n# Appended by `dom0 lab up`: dom0 forwards outside names over DNS-over-TLS,\n"
        "# through its uplink, to the lab's resolver on the lab's internet.\n"
        "[dns]\n"
        f'upstream = ["{RESOLVER_ADDRESS}@{RESOLVER_PORT}#{RESOLVER_NAME}"]\n'
        f'upstream_ca = "{ca_path(lab).absolute()}"\n'
    )


# ---- the server ----------------------------------------------------------------------------


def config(lab: Lab) -> str:
    """unbound.conf: TLS on RESOLVER_ADDRESS only, local data, no recursion."""
    where = directory(lab).absolute()
    lines = [
        "server:",
        f"    interface: {RESOLVER_ADDRESS}@{RESOLVER_PORT}",
        f"    tls-port: {RESOLVER_PORT}",
        f'    tls-service-key: "{where / SERVER_KEY}"',
        f'    tls-service-pem: "{where / SERVER_PEM}"',
        "    do-ip6: no",
        # TLS is TCP; without this, unbound also answers plain DNS on udp/853.
        "    do-udp: no",
        "    ip-freebind: yes",
        "    access-control: 0.0.0.0/0 allow",  # a public resolver on the lab internet
        '    username: ""',  # root, in the lab's namespace
        '    chroot: ""',
        f'    directory: "{where}"',
        '    pidfile: ""',
        "    use-syslog: no",
        f'    logfile: "{where / LOG}"',
        "    verbosity: 1",
        "    log-queries: yes",  # the client address of every query: see `queries`
        '    module-config: "iterator"',
        "    do-not-query-localhost: yes",
        # The most specific local zone wins: lab.example from local data,
        # everything else refused (nothing is looked up on the real internet).
        '    local-zone: "." refuse',
        f'    local-zone: "{ZONE}" static',
        *(f"    local-data: '{rr}'" for rr in ZONE_DATA),
        "remote-control:",
        "    control-enable: no",
    ]
    return "".join(f"{line}\n" for line in lines)


def start(lab: Lab, timeout: float = READY_TIMEOUT) -> processes.ProcId:
    """Start unbound in NAME-wan (recorded as ROLE, so `lab down` stops it)
    and return once it answers a DoT query there; LabError if it does not
    within timeout. A resolver the lab already runs is stopped first."""
    where = directory(lab)
    if not _usable(where, datetime.now(UTC)):
        raise LabError(f"no resolver certificate in {where}: resolver.prepare first")
    old = lab.process(ROLE)
    if old is not None:
        processes.stop([old])
        lab.forget_process(ROLE)
    # Beside the echo's address on NAME-wan's lo; `replace` is idempotent.
    netns.ip_batch([f"addr replace {RESOLVER_ADDRESS}/32 dev lo"], lab.wan_ns)
    conf = where / CONF
    conf.write_text(config(lab))
    check = subprocess.run(
        ["unbound-checkconf", str(conf)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise LabError(f"{conf}: {_last(check.stderr or check.stdout)}")
    argv = netns.exec_argv(lab.wan_ns, ["unbound", "-d", "-c", str(conf)])
    stderr_log = lab.logs_dir / f"{ROLE.replace('@', '-')}.log"
    _, proc = processes.spawn(argv, log=stderr_log)
    lab.record_process(ROLE, proc, lab.wan_ns, argv)
    deadline = time.monotonic() + timeout
    while True:
        if not processes.is_running(proc):
            why = _last_line(stderr_log) or _last_line(log_path(lab)) or "no output"
            raise LabError(f"{ROLE}: unbound exited: {why}")
        left = deadline - time.monotonic()
        if left <= 0:
            why = _last_line(log_path(lab)) or _last_line(stderr_log) or "no output"
            raise LabError(f"{ROLE}: no DoT answer within {timeout:g} s: {why}")
        # A refused connection returns at once; the next try is a new process.
        probe = f"tls:{RESOLVER_ADDRESS}:echo.{ZONE}"
        got = dnsprobe.run(lab.wan_ns, [probe], ca=str(ca_path(lab)), tls_name=RESOLVER_NAME,
                           timeout=min(left, 1.0))  # fmt: skip
        if got[0].error is None:
            return proc


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _last_line(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- its query log -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """One query as the resolver saw it: who asked, for what."""

    client: str
    name: str  # as logged: absolute, with its final dot
    type: str


# unbound's log-queries line: "[1700000000] unbound[123:0] info: 198.51.100.3 echo.lab.example. A IN"
_QUERY_RE = re.compile(r"\] unbound\[\d+:\d+\] info: (\S+) (\S+) (\S+) (\S+)$")


def parse_queries(text: str) -> list[Query]:
    """The queries in an unbound log, in order (other lines are skipped)."""
    out = []
    for line in text.splitlines():
        m = _QUERY_RE.search(line)
        if m:
            out.append(Query(m[1], m[2], m[3]))
    return out


def queries(lab: Lab) -> list[Query]:
    """Every query the lab's resolver has logged, in order."""
    try:
        return parse_queries(log_path(lab).read_text(errors="replace"))
    except FileNotFoundError:
        return []
