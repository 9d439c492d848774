"""Reachability by protocol and port between lab namespaces.

    python -m controller.lab.ports serve --tcp 22,80,8000-8002 --udp 53 [--bind ADDR] [--ready FILE]
    python -m controller.lab.ports probe [--json] [--timeout S] ADDR:tcp/PORT ADDR:udp/PORT ADDR:icmp ...

The server answers on every port it serves with the port that was reached: a
TCP connection gets the line "tcp/PORT" and is closed, a datagram gets
"udp/PORT" back from the address it was sent to. It writes its PID to the
--ready file once every socket is bound, and runs until SIGTERM.

The prober runs its targets concurrently (up to 256 at a time). A probe is
ok only if the answer proves that port was reached: the server's line names
that very tcp/PORT or udp/PORT, or, for icmp, an echo reply came from ADDR.
A failure's kind is one of probe.py's KINDS: "timeout" only when nothing came
back within the timeout (a silent drop); "refused" a TCP reset, or an ICMP
port unreachable for UDP; "unreachable" no route or an ICMP unreachable;
"denied" EPERM from this namespace's own firewall; "error" everything else,
including a wrong answer or none on a connection (a redirect, another
service) and a prober that hung or crashed. Hosts rate-limit their ICMP
errors (net.ipv4.icmp_ratelimit): a burst of closed-UDP probes to one host
can read as timeouts.

The library half (`serve`, `probe`, `probe_parallel`) runs both inside a
namespace with `ip netns exec`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import math
import os
import resource
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from controller.lab import netns, processes, wait

# The kinds and the errno mapping are probe.py's: one vocabulary for every lab
# probe, so that controller/lab/expect.py's rules hold for these too.
from controller.lab.probe import KINDS, _classify, _start
from controller.lab.rundir import LabError

DEFAULT_TIMEOUT = 2.0
MAX_PORTS = 2000
MAX_THREADS = 256
RESEND = 0.5  # seconds between datagrams (UDP, ICMP) while no answer came
HANG_GRACE = 10.0  # beyond the probes' own timeouts, before a prober counts as hung
MAX_ANSWER = 256
PROG = "ports"

# Not in Python 3.11's socket module (values from linux/in.h, linux/in6.h).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)


class BadArgument(argparse.ArgumentTypeError, ValueError):
    """A port list, target or option that cannot be used (exit 2, one line)."""


# ---- what to serve and what to probe -----------------------------------------------------


def _port(text: str) -> int:
    if not text.isdigit():
        raise BadArgument(f"not a port number: {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise BadArgument(f"port {port} out of range 1-65535")
    return port


def parse_ports(text: str) -> list[int]:
    """A list like 22,80,8000-8002 as its ports, sorted, without duplicates."""
    if not text.strip():
        raise BadArgument("empty port list")
    ports: set[int] = set()
    for item in text.split(","):
        low, dash, high = item.strip().partition("-")
        first = _port(low)
        last = _port(high) if dash else first
        if last < first:
            raise BadArgument(f"port range {item.strip()} runs backwards")
        if len(ports) + last - first + 1 > MAX_PORTS:
            raise BadArgument(f"more than {MAX_PORTS} ports in {text!r}")
        ports.update(range(first, last + 1))
    return sorted(ports)


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise BadArgument(f"not an IP address: {text!r}") from None


@dataclass(frozen=True, slots=True)
class Target:
    """ADDR:tcp/PORT, ADDR:udp/PORT or ADDR:icmp (port None)."""

    address: str
    protocol: str
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.protocol}" + ("" if self.port is None else f"/{self.port}")


def parse_target(text: str) -> Target:
    """BadArgument (a ValueError) unless text is ADDR:tcp/PORT, ADDR:udp/PORT or ADDR:icmp;
    an IPv6 ADDR may be in brackets."""
    host, colon, what = text.rpartition(":")
    if not colon or not host:
        raise BadArgument(f"target {text!r}: expected ADDR:tcp/PORT, ADDR:udp/PORT or ADDR:icmp")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = _address(host)
        protocol, slash, port = what.partition("/")
        if protocol == "icmp" and not slash:
            return Target(address, "icmp")
        if protocol in ("tcp", "udp") and slash:
            return Target(address, protocol, _port(port))
    except BadArgument as exc:
        raise BadArgument(f"target {text!r}: {exc}") from None
    raise BadArgument(f"target {text!r}: expected tcp/PORT, udp/PORT or icmp after the address")


def _ranges(ports: Iterable[int]) -> str:
    """[22, 80, 81, 82] -> "22,80-82": a short argv for many ports."""
    runs: list[list[int]] = []
    for port in sorted(set(ports)):
        if runs and runs[-1][1] == port - 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ---- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortResult:
    """ok with the answer that proves the port was reached, or not ok with kind
    (see KINDS) and a one-line error. namespace is where the probe ran from
    (set by the library)."""

    target: str
    ok: bool
    kind: str = ""
    error: str = ""
    elapsed: float = 0.0
    answer: str = ""
    namespace: str = ""

    @property
    def blocked(self) -> bool:
        """Nothing got through (what a firewall drop or reject looks like)."""
        return self.kind in ("timeout", "refused", "unreachable", "denied")

    def describe(self) -> str:
        """One line: the probe, where from, and how it ended."""
        where = f" from {self.namespace}" if self.namespace else ""
        if self.ok:
            return f"{self.target}{where}: answered {self.answer!r} ({self.elapsed:.2f} s)"
        return f"{self.target}{where}: {self.kind or 'error'}: {self.error}"

    def to_json(self) -> dict[str, object]:
        """The prober's output: everything but namespace."""
        out = asdict(self)
        del out["namespace"]
        return out


def _failure(exc: OSError, timeout: float) -> tuple[str, str]:
    """(kind, error) for a socket error before anything was answered. EACCES is
    "error": a send to a broadcast address gets it, no firewall does."""
    kind = "error" if exc.errno == errno.EACCES else _classify(exc)
    if kind == "timeout":
        return kind, f"no answer within {timeout:g} s"
    return kind, exc.strerror or str(exc) or type(exc).__name__


# ---- probing (inside the namespace) -------------------------------------------------------


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _probe_tcp(t: Target, timeout: float, deadline: float) -> tuple[str, str, str]:
    """(kind, error, answer); kind "" when ok."""
    assert t.port is not None  # parse_target gives tcp a port
    want = f"tcp/{t.port}"
    with socket.socket(_family(t.address), socket.SOCK_STREAM) as sock:
        sock.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            sock.connect((t.address, t.port))
        except OSError as exc:
            return (*_failure(exc, timeout), "")
        # Connected: the packets got through, so from here on nothing is a "timeout".
        data = b""
        try:
            while b"\n" not in data and len(data) < MAX_ANSWER:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(MAX_ANSWER)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            timed_out = isinstance(exc, TimeoutError)
            what = f"no answer within {timeout:g} s" if timed_out else exc.strerror or exc
            return "error", f"connected, then {what} (expected {want})", ""
    answer = data.decode("utf-8", "replace").strip()
    if answer == want:
        return "", "", answer
    return "error", f"connected, but answered {answer!r}, not {want}", answer


def _recverr(sock: socket.socket, family: socket.AddressFamily) -> None:
    """Every ICMP error about this socket's datagrams becomes a socket error; without
    it a UDP or ping socket reports only "hard" ones, and a host unreachable from a
    router would read as a timeout."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


_Mine = Callable[[bytes, str], bool]


def _exchange(
    sock: socket.socket, payload: bytes, to: tuple[str, int], deadline: float, mine: _Mine
) -> bytes:
    """Send payload to `to` every RESEND seconds until a datagram that is mine(data,
    sender) arrives, and return it; TimeoutError at the deadline."""
    resend = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError
        if now >= resend:
            sock.sendto(payload, to)
            resend = now + RESEND
        sock.settimeout(min(deadline, resend) - now)
        try:
            data, sender = sock.recvfrom(4096)
        except TimeoutError:
            continue
        if mine(data, sender[0]):
            return data


def _probe_udp(t: Target, timeout: float, deadline: float) -> tuple[str, str, str]:
    assert t.port is not None  # parse_target gives udp a port
    want = f"udp/{t.port}"
    family = _family(t.address)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            # Connected: only the target's replies arrive, and its ICMP port
            # unreachable comes back as ECONNREFUSED.
            sock.connect((t.address, t.port))
            _recverr(sock, family)
            data = _exchange(sock, b"dom0 ports probe\n", (t.address, t.port), deadline, _any)
        except OSError as exc:
            return (*_failure(exc, timeout), "")
    answer = data.decode("utf-8", "replace").strip()
    if answer == want:
        return "", "", answer
    return "error", f"answered {answer!r}, not {want}", answer


def _any(data: bytes, sender: str) -> bool:
    return True


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmp_socket(family: socket.AddressFamily) -> tuple[socket.socket, bool]:
    """A ping socket if net.ipv4.ping_group_range allows one, else a raw socket;
    the bool says raw."""
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        return socket.socket(family, socket.SOCK_DGRAM, proto), False
    except OSError:
        return socket.socket(family, socket.SOCK_RAW, proto), True


def _probe_icmp(t: Target, timeout: float, deadline: float) -> tuple[str, str, str]:
    """An echo request; ok on the echo reply from t.address.

    A ping socket's kernel matches replies to it (by the ident it picks) and turns
    ICMP errors into socket errors. A raw socket sees every ICMP message to this
    namespace: ours is the reply with our ident, sequence and random payload, or a
    destination unreachable that quotes our request. It is not connected, so that
    an unreachable from a router on the way reaches it too.
    """
    family = _family(t.address)
    v6 = family == socket.AF_INET6
    request, reply, unreachable = (128, 129, 1) if v6 else (8, 0, 3)
    ident = secrets.randbelow(0x10000)
    header = struct.pack("!BBHHH", request, 0, 0, ident, 1)
    token = b"dom0 ports " + secrets.token_bytes(8)
    packet = bytearray(header + token)
    struct.pack_into("!H", packet, 2, _checksum(bytes(packet)))  # the kernel does it for v6
    sock, raw = _icmp_socket(family)
    errors: list[str] = []

    def mine(data: bytes, sender: str) -> bool:
        if raw and not v6:
            data = data[(data[0] & 0x0F) * 4 :]  # a raw IPv4 socket gets the IP header too
        if len(data) < 8:
            return False
        kind, code = data[0], data[1]
        if kind == reply:
            # a ping socket's kernel chose the ident, and delivers only its replies
            same = data[6:8] == header[6:8] and (not raw or data[4:6] == header[4:6])
            return same and data[8:] == token and _address(sender) == t.address
        if kind == unreachable and raw:
            quoted = data[8:]  # the IP header of our request, then its first 8 bytes
            if quoted:
                quoted = quoted[40:] if v6 else quoted[(quoted[0] & 0x0F) * 4 :]
            if quoted[:1] == header[:1] and quoted[4:8] == header[4:8]:
                errors.append(f"ICMP destination unreachable (code {code}) from {sender}")
                return True
        return False

    with sock:
        try:
            if not raw:
                sock.connect((t.address, 0))
                _recverr(sock, family)
            _exchange(sock, bytes(packet), (t.address, 0), deadline, mine)
        except OSError as exc:
            return (*_failure(exc, timeout), "")
    if errors:
        return "unreachable", errors[0], ""
    return "", "", f"echo reply from {t.address} ({'raw' if raw else 'ping'} socket)"


_PROBES = {"tcp": _probe_tcp, "udp": _probe_udp, "icmp": _probe_icmp}


def probe_target(target: Target, timeout: float = DEFAULT_TIMEOUT) -> PortResult:
    """One probe from this namespace, within timeout."""
    started = time.monotonic()
    try:
        kind, error, answer = _PROBES[target.protocol](target, timeout, started + timeout)
    except Exception as exc:  # a probe that could not run: never a timeout
        kind, error, answer = "error", f"{type(exc).__name__}: {exc}", ""
    return PortResult(
        str(target), not kind, kind, error, round(time.monotonic() - started, 4), answer
    )


def run_probes(targets: Sequence[Target], timeout: float = DEFAULT_TIMEOUT) -> list[PortResult]:
    """Every target at once (up to MAX_THREADS at a time); results in order."""
    if not targets:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_THREADS, len(targets))) as pool:
        return list(pool.map(lambda t: probe_target(t, timeout), targets))


# ---- serving (inside the namespace) -------------------------------------------------------


def _listen(family: socket.AddressFamily, bind: str, protocol: str, port: int) -> socket.socket:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if protocol == "tcp":
            # Not for UDP: there it would let a second server share the port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        elif family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((bind, port))
        if protocol == "tcp":
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _answer_tcp(sock: socket.socket, port: int) -> None:
    try:
        conn, _ = sock.accept()
    except OSError:  # gone before we got to it, or out of descriptors
        return
    with conn, contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(f"tcp/{port}\n".encode())  # 10 bytes fit any fresh send buffer


def _answer_udp(sock: socket.socket, port: int) -> None:
    """Reply from the address the datagram was sent to (IP_PKTINFO): a prober's
    connected socket takes no reply from another of this namespace's addresses."""
    try:
        _, ancillary, _, peer = sock.recvmsg(MAX_ANSWER, socket.CMSG_SPACE(64))
    except OSError:
        return
    control = []
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            # struct in_pktinfo {ifindex; spec_dst; addr}: the source is spec_dst
            control = [(level, kind, struct.pack("=i4s4s", 0, data[8:12], bytes(4)))]
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            control = [(level, kind, data)]  # struct in6_pktinfo {addr; ifindex}
    line = [f"udp/{port}\n".encode()]
    try:
        sock.sendmsg(line, control, 0, peer)
    except OSError:  # e.g. sent to a broadcast address: answer from the default source
        with contextlib.suppress(OSError):
            sock.sendmsg(line, [], 0, peer)


def _write_ready(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)  # a waiter sees no file or the whole one


def _stop(signum: int, frame: object) -> NoReturn:
    raise SystemExit(0)


def serve_forever(
    tcp: Sequence[int], udp: Sequence[int], bind: str = "0.0.0.0", ready: Path | None = None
) -> int:
    """Listen on every port, write ready, answer until SIGTERM; 1 if a port cannot be bound."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(tcp) + len(udp) + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    family = _family(bind)
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        for protocol, ports in (("tcp", tcp), ("udp", udp)):
            for port in ports:
                try:
                    socks.append(_listen(family, bind, protocol, port))
                except OSError as exc:
                    print(
                        f"{PROG}: cannot serve {protocol}/{port} on {bind}: {exc.strerror}",
                        file=sys.stderr,
                    )
                    return 1
                selector.register(socks[-1], selectors.EVENT_READ, (protocol, port))
        if ready is not None:
            _write_ready(ready)
        try:
            while True:
                for key, _ in selector.select():
                    protocol, port = key.data
                    answer = _answer_tcp if protocol == "tcp" else _answer_udp
                    answer(key.fileobj, port)  # type: ignore[arg-type]
        finally:
            if ready is not None:
                with contextlib.suppress(OSError):
                    ready.unlink()
    finally:
        selector.close()
        for sock in socks:
            sock.close()


# ---- command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise BadArgument(message)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadArgument(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 600:
        raise BadArgument(f"timeout {text} s: must be more than 0 and at most 600")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m controller.lab.ports")
    sub = parser.add_subparsers(dest="mode", required=True)
    serve_p = sub.add_parser("serve", help="answer on TCP and UDP ports with the port reached")
    serve_p.add_argument("--tcp", type=parse_ports, default=[], metavar="PORTS")
    serve_p.add_argument("--udp", type=parse_ports, default=[], metavar="PORTS")
    serve_p.add_argument("--bind", type=_address, default="0.0.0.0", metavar="ADDR")
    serve_p.add_argument("--ready", type=Path, metavar="FILE", help="written (PID) once bound")
    probe_p = sub.add_parser("probe", help="probe targets, one result each")
    probe_p.add_argument(
        "targets", nargs="+", type=parse_target, metavar="TARGET",
        help="ADDR:tcp/PORT, ADDR:udp/PORT or ADDR:icmp",
    )  # fmt: skip
    probe_p.add_argument(
        "--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="S",
        help=f"for each probe (default {DEFAULT_TIMEOUT:g})",
    )  # fmt: skip
    probe_p.add_argument("--json", action="store_true", help="one JSON list of results")
    try:
        args = parser.parse_args(argv)
        if args.mode == "serve":
            count = len(args.tcp) + len(args.udp)
            if not count:
                raise BadArgument("serve: nothing to serve: give --tcp and/or --udp")
            if count > MAX_PORTS:
                raise BadArgument(f"serve: {count} ports, at most {MAX_PORTS}")
    except BadArgument as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.mode == "serve":
        return serve_forever(args.tcp, args.udp, args.bind, args.ready)
    results = run_probes(args.targets, args.timeout)
    if args.json:
        print(json.dumps([r.to_json() for r in results]))
    else:
        for r in results:
            print(r.describe())
    return 0 if all(r.ok for r in results) else 1


# ---- library: serve and probe inside a namespace ------------------------------------------


class Server:
    """A port server running in a namespace; stop() (or leaving the with block) ends it."""

    def __init__(
        self,
        namespace: str,
        tcp: Sequence[int],
        udp: Sequence[int],
        record: processes.ProcId,
        workdir: Path,
    ) -> None:
        self.namespace = namespace
        self.tcp = tuple(tcp)
        self.udp = tuple(udp)
        self.record = record
        self.workdir = workdir

    @property
    def pid(self) -> int:
        return self.record.pid

    def log(self) -> str:
        try:
            return (self.workdir / "serve.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM this very process (SIGKILL if it lingers), reap it, remove its files."""
        processes.stop([self.record])
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    ns: str,
    tcp: Iterable[int] = (),
    udp: Iterable[int] = (),
    *,
    bind: str | None = None,
    deadline: float = 10.0,
) -> Server:
    """Start a port server in ns and return once all its ports are bound;
    LabError if it exits first (its error in the message) or is not ready
    within deadline seconds (it is stopped then)."""
    tcp, udp = sorted(set(tcp)), sorted(set(udp))
    for port in (*tcp, *udp):
        _port(str(port))
    if not 1 <= len(tcp) + len(udp) <= MAX_PORTS:
        raise BadArgument(f"serve: between 1 and {MAX_PORTS} ports, not {len(tcp) + len(udp)}")
    workdir = Path(tempfile.mkdtemp(prefix="dom0-ports-"))
    ready = workdir / "ready"
    argv = [sys.executable, "-m", "controller.lab.ports", "serve", "--ready", str(ready)]
    argv += ["--tcp", _ranges(tcp)] if tcp else []
    argv += ["--udp", _ranges(udp)] if udp else []
    argv += ["--bind", bind] if bind is not None else []
    try:
        proc, record = processes.spawn(
            netns.exec_argv(ns, argv), log=workdir / "serve.log", env=processes.python_env()
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    server = Server(ns, tcp, udp, record, workdir)

    def bound() -> bool:
        if proc.poll() is not None:
            lines = server.log().strip().splitlines() or ["no output"]
            raise LabError(f"port server in {ns} exited {proc.returncode}: {lines[-1]}")
        try:
            text = ready.read_text().strip()
        except FileNotFoundError:
            return False
        if text != str(proc.pid):  # `ip netns exec` execs: the PID must be the server's
            raise LabError(f"port server in {ns}: ready file names PID {text}, not {proc.pid}")
        return True

    try:
        wait.wait_for(bound, deadline, f"the port server in {ns} to bind its ports")
    except BaseException:
        server.stop()
        raise
    return server


def _parsed(targets: Iterable[str | Target]) -> list[Target]:
    return [t if isinstance(t, Target) else parse_target(t) for t in targets]


def probe_argv(targets: Sequence[Target], timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    argv = [sys.executable, "-m", "controller.lab.ports", "probe", "--json"]
    return [*argv, "--timeout", f"{timeout:g}", *(str(t) for t in targets)]


def _limit(targets: Sequence[Target], timeout: float) -> float:
    """How long a prober may take: its rounds of MAX_THREADS probes, plus a start."""
    return timeout * math.ceil(len(targets) / MAX_THREADS) + HANG_GRACE


def _collect(
    proc: subprocess.Popen[str], ns: str, targets: Sequence[Target], limit: float
) -> list[PortResult]:
    """The prober's results; "error" results for every target if it hung or crashed."""

    def failed(error: str) -> list[PortResult]:
        return [PortResult(str(t), False, "error", error, namespace=ns) for t in targets]

    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return failed(f"prober hung: killed after {limit:g} s")
    try:
        results = [replace(PortResult(**item), namespace=ns) for item in json.loads(out)]
        if [r.target for r in results] != [str(t) for t in targets]:
            raise ValueError("results do not match the targets")
        if any(not r.ok and r.kind not in KINDS for r in results):
            raise ValueError("unknown kind of failure")
    except (ValueError, TypeError) as exc:
        lines = err.strip().splitlines()
        why = lines[-1] if lines else f"exit {proc.returncode}, {exc}"
        return failed(f"prober failed: {why}")
    return results


def probe(
    ns: str, targets: Iterable[str | Target], *, timeout: float = DEFAULT_TIMEOUT
) -> list[PortResult]:
    """Probe every target from inside ns, all at once; one result per target, in order.
    A bad target raises BadArgument (a ValueError) here, before anything runs."""
    return probe_parallel([(ns, targets)], timeout=timeout)[0]


def probe_parallel(
    jobs: Sequence[tuple[str, Iterable[str | Target]]], timeout: float = DEFAULT_TIMEOUT
) -> list[list[PortResult]]:
    """Several namespaces at once: [(ns, targets), ...] -> results per job, in order."""
    parsed = [(ns, _parsed(targets)) for ns, targets in jobs]
    running: list[subprocess.Popen[str] | None] = []
    try:
        for ns, targets in parsed:
            running.append(_start(ns, probe_argv(targets, timeout)) if targets else None)
    except BaseException:
        for proc in running:
            if proc is not None:
                proc.kill()
                proc.communicate()
        raise
    return [
        [] if proc is None else _collect(proc, ns, targets, _limit(targets, timeout))
        for proc, (ns, targets) in zip(running, parsed, strict=True)
    ]


if __name__ == "__main__":
    sys.exit(main())
