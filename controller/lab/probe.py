"""Reachability probes, run inside a lab namespace.

    python -m controller.lab.probe http URL [URL ...] [--source ADDR] [--timeout S] [--json]

One URL without --json: prints the body, or one line on stderr and exit 1.
Several URLs are fetched concurrently; --json prints one result object per
URL (and exits 0 if all succeeded). --source binds the client socket to ADDR
first (a forged address must be on an interface, or use --freebind).

The library half (`probe_http`, `probe_many`, `probe_parallel`, `ping`) runs
in a namespace with `ip netns exec` and returns ProbeResult objects, whose
`kind` says how a probe failed: a test that expects a block checks that it
was the right kind of failure (controller/lab/expect.py), because a probe
that could not run is not a firewall's doing.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from urllib.parse import urlsplit

DEFAULT_TIMEOUT = 3.0
MAX_BODY = 64 * 1024
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


# What a failed probe's kind means. Only the first four are what a firewall or
# a route does to a packet; the others are the probe's own failures.
KINDS = {
    "timeout": "no answer within the timeout (a silent drop)",
    "refused": "a TCP reset (nothing listening, or a reject)",
    "unreachable": "no route, or an ICMP unreachable",
    "denied": "this namespace's own firewall refused to send it (EPERM)",
    "bind": "the source address could not be bound",
    "http": "an answer that is not HTTP 2xx",
    "error": "the probe could not run",
}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """ok with the body, or not ok with kind (see KINDS) and a one-line error.
    namespace and source say where the probe ran from (set by the library)."""

    url: str
    ok: bool
    body: str = ""
    kind: str = ""
    error: str = ""
    elapsed: float = 0.0
    namespace: str = ""
    source: str = ""

    @property
    def blocked(self) -> bool:
        """The connection did not complete (what a firewall drop or reject looks like)."""
        return self.kind in ("timeout", "refused", "unreachable", "denied")

    def describe(self) -> str:
        """One line: the probe, where from, and how it ended."""
        where = f" from {self.namespace}" if self.namespace else ""
        if self.source:
            where += f" (source {self.source})"
        if self.ok:
            return f"{self.url}{where}: answered ({self.elapsed:.2f} s)"
        return f"{self.url}{where}: {self.kind or 'error'}: {self.error}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _classify(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if exc.errno == errno.ECONNREFUSED:
        return "refused"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "denied"  # a drop in this namespace's own output path
    return "error"


def fetch(
    url: str, *, source: str | None = None, timeout: float = DEFAULT_TIMEOUT, freebind: bool = False
) -> ProbeResult:
    """GET url over a fresh TCP connection; the whole exchange within timeout."""
    started = time.monotonic()

    def fail(kind: str, error: str) -> ProbeResult:
        return ProbeResult(url, False, kind=kind, error=error, elapsed=time.monotonic() - started)

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return fail("error", "only http://HOST[:PORT]/PATH URLs")
    host, port = parts.hostname, parts.port or 80
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source is not None:
            if freebind:
                level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
                sock.setsockopt(level, IP_FREEBIND, 1)
            try:
                sock.bind((source, 0))
            except OSError as exc:
                return fail("bind", f"cannot bind source {source}: {exc.strerror}")
        try:
            sock.connect((host, port))
            path = parts.path or "/"
            if parts.query:
                path += f"?{parts.query}"
            hostport = f"[{host}]" if ":" in host else host
            sock.sendall(
                f"GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while len(data) < MAX_BODY:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(8192)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            kind = _classify(exc)
            what = f"timed out after {timeout:g} s" if kind == "timeout" else exc.strerror or kind
            return fail(kind, what)
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[0].startswith(b"HTTP/"):
        return fail("http", "not an HTTP response")
    if not status[1].startswith(b"2"):
        return fail("http", f"HTTP {status[1].decode('ascii', 'replace')}")
    return ProbeResult(
        url, True, body=body.decode("utf-8", "replace"), elapsed=time.monotonic() - started
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.lab.probe")
    sub = parser.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http", help="GET URLs, print the body")
    http.add_argument("urls", nargs="+", metavar="URL")
    http.add_argument("--source", metavar="ADDR", help="bind to this source address first")
    http.add_argument("--freebind", action="store_true", help="allow a source not on any link")
    http.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S")
    http.add_argument("--json", action="store_true", help="one JSON list of results")
    args = parser.parse_args(argv)

    def one(url: str) -> ProbeResult:
        return fetch(url, source=args.source, timeout=args.timeout, freebind=args.freebind)

    if len(args.urls) == 1:
        results = [one(args.urls[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(32, len(args.urls))) as pool:
            results = list(pool.map(one, args.urls))
    if args.json:
        print(json.dumps([r.to_json() for r in results]))
        return 0 if all(r.ok for r in results) else 1
    for r in results:
        if r.ok:
            sys.stdout.write(r.body)
        else:
            print(f"probe: {r.url}: {r.error}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


# ---- library: run probes inside a namespace -----------------------------------------------


def probe_argv(
    urls: Sequence[str],
    *,
    source: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    freebind: bool = False,
) -> list[str]:
    argv = [sys.executable, "-m", "controller.lab.probe", "http", *urls, "--json"]
    argv += ["--timeout", f"{timeout:g}"]
    if source is not None:
        argv += ["--source", source]
    if freebind:
        argv.append("--freebind")
    return argv


def _start(ns: str, argv: list[str]) -> subprocess.Popen[str]:
    from controller.lab import netns, processes

    return subprocess.Popen(
        netns.exec_argv(ns, argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=processes.python_env(),
    )


def _collect(proc: subprocess.Popen[str], urls: Sequence[str], timeout: float) -> list[ProbeResult]:
    try:
        out, err = proc.communicate(timeout=timeout + 10.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return [ProbeResult(u, False, kind="error", error="probe process hung") for u in urls]
    try:
        return [ProbeResult(**item) for item in json.loads(out)]
    except (ValueError, TypeError):
        line = (err.strip().splitlines() or ["no output"])[-1]
        return [ProbeResult(u, False, kind="error", error=line) for u in urls]


def _placed(results: list[ProbeResult], ns: str, source: str | None) -> list[ProbeResult]:
    return [replace(r, namespace=ns, source=source or "") for r in results]


def probe_many(
    ns: str,
    urls: Sequence[str],
    *,
    source: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    freebind: bool = False,
) -> list[ProbeResult]:
    """Fetch every URL from inside ns, concurrently; one result per URL, in order."""
    if not urls:
        return []
    argv = probe_argv(urls, source=source, timeout=timeout, freebind=freebind)
    return _placed(_collect(_start(ns, argv), urls, timeout), ns, source)


def probe_http(
    ns: str,
    url: str,
    *,
    source: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    freebind: bool = False,
) -> ProbeResult:
    """Fetch url from inside ns."""
    return probe_many(ns, [url], source=source, timeout=timeout, freebind=freebind)[0]


def probe_parallel(
    jobs: Sequence[tuple[str, Sequence[str]]], *, timeout: float = DEFAULT_TIMEOUT
) -> list[list[ProbeResult]]:
    """Several namespaces at once: [(ns, urls), ...] -> results per job, in order."""
    running = [
        (_start(ns, probe_argv(urls, timeout=timeout)), urls) if urls else (None, urls)
        for ns, urls in jobs
    ]
    return [
        [] if proc is None else _placed(_collect(proc, urls, timeout), ns, None)
        for (proc, urls), (ns, _) in zip(running, jobs, strict=True)
    ]


_RECEIVED = re.compile(r"(\d+) packets transmitted, (\d+) packets received")


def ping(ns: str, address: str, *, timeout: float = 1.0, count: int = 1) -> ProbeResult:
    """`busybox ping` from inside ns, as a ProbeResult: ok if any echo reply
    came back, "timeout" if the requests went out and none came back, and
    otherwise why ping could not send (unreachable, denied) or run (error).
    busybox exits 1 in every one of these cases: its statistics line is what
    tells "no reply" from "did not send"."""
    from controller.lab import netns

    argv = ["busybox", "ping", *(["-6"] if ":" in address else []), "-c", str(count)]
    argv += ["-W", f"{max(1, round(timeout))}", address]
    url = f"ping {address}"
    started = time.monotonic()
    try:
        proc = netns.run(ns, argv, check=False, timeout=timeout * count + 10.0)
    except subprocess.TimeoutExpired:
        return ProbeResult(url, False, kind="error", error="ping hung", namespace=ns)
    elapsed = time.monotonic() - started
    out = f"{proc.stdout}\n{proc.stderr}"
    stats = _RECEIVED.search(out)
    if stats and int(stats[2]) > 0:
        return ProbeResult(url, True, body=proc.stdout, elapsed=elapsed, namespace=ns)
    if stats and int(stats[1]) > 0:
        error = f"{stats[1]} sent, no reply within {timeout:g} s"
        return ProbeResult(url, False, kind="timeout", error=error, elapsed=elapsed, namespace=ns)
    line = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
    kind = "error"
    if "Network is unreachable" in out or "No route to host" in out:
        kind = "unreachable"
    elif "sendto: Operation not permitted" in out:
        kind = "denied"
    return ProbeResult(url, False, kind=kind, error=line[-1], elapsed=elapsed, namespace=ns)


if __name__ == "__main__":
    sys.exit(main())
