"""DNS questions asked from inside a lab namespace, answers as JSON.

    python -m controller.lab.dnsprobe [--ca FILE] [--timeout S] QUERY...

QUERY is `PROTO:SERVER[:PORT]:NAME[:TYPE]` with PROTO `udp`, `tcp` or `tls`
(DNS over TLS, verified against --ca, by the server's address or --tls-name); TYPE is A by
default, PTR takes an address as NAME. One line of JSON per query:
`{"query", "rcode", "answers", "error"}`, where error is null, "timeout"
(no answer in the timeout: a clean block), "refused" (a TCP reset),
"tls: WHY" (the handshake failed) or what else went wrong. A probe
is one Python start for many queries: a test asks dozens at once.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename

from controller.lab import netns

PORTS = {"udp": 53, "tcp": 53, "tls": 853}


@dataclass(frozen=True, slots=True)
class Query:
    proto: str
    server: str
    port: int
    name: str
    rtype: str = "A"

    @property
    def text(self) -> str:
        return f"{self.proto}:{self.server}:{self.port}:{self.name}:{self.rtype}"


@dataclass(frozen=True, slots=True)
class Answer:
    query: str
    rcode: str | None
    answers: tuple[str, ...]
    error: str | None

    @property
    def values(self) -> set[str]:
        return set(self.answers)


def parse_query(text: str) -> Query:
    parts = text.split(":")
    if len(parts) < 3 or parts[0] not in PORTS:
        raise ValueError(f"{text!r}: expected PROTO:SERVER[:PORT]:NAME[:TYPE]")
    proto, server = parts[0], parts[1]
    rest = parts[2:]
    port = PORTS[proto]
    if rest and rest[0].isdigit():
        port = int(rest.pop(0))
    if not rest:
        raise ValueError(f"{text!r}: no name")
    return Query(proto, server, port, rest[0], rest[1] if len(rest) > 1 else "A")


def ask(q: Query, ca: str | None, timeout: float, tls_name: str | None = None) -> Answer:
    name = dns.reversename.from_address(q.name) if q.rtype == "PTR" else q.name
    msg = dns.message.make_query(name, q.rtype)
    try:
        if q.proto == "udp":
            reply = dns.query.udp(msg, q.server, port=q.port, timeout=timeout)
        elif q.proto == "tcp":
            reply = dns.query.tcp(msg, q.server, port=q.port, timeout=timeout)
        else:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            reply = dns.query.tls(
                msg, q.server, port=q.port, timeout=timeout, ssl_context=ctx,
                server_hostname=tls_name or q.server,
            )  # fmt: skip
    except (dns.exception.Timeout, TimeoutError):
        return Answer(q.text, None, (), "timeout")
    except ssl.SSLError as e:
        return Answer(q.text, None, (), f"tls: {e.reason or e}")
    except ConnectionRefusedError:
        return Answer(q.text, None, (), "refused")  # (a reset: nothing listens, or a reject)
    except (OSError, dns.exception.DNSException) as e:
        return Answer(q.text, None, (), f"{type(e).__name__}: {e}")
    values = tuple(sorted(rd.to_text().rstrip(".") for rrset in reply.answer for rd in rrset))
    return Answer(q.text, dns.rcode.to_text(reply.rcode()), values, None)


def run(
    namespace: str,
    queries: Sequence[str],
    *,
    ca: str | None = None,
    tls_name: str | None = None,
    timeout: float = 2.0,
) -> list[Answer]:
    """Ask `queries` from inside `namespace` (one process for all of them)."""
    import subprocess

    from controller.lab import processes

    argv = [sys.executable, "-m", "controller.lab.dnsprobe", "--timeout", str(timeout)]
    if ca:
        argv += ["--ca", ca]
    if tls_name:
        argv += ["--tls-name", tls_name]
    out = subprocess.run(
        netns.exec_argv(namespace, [*argv, *queries]),
        capture_output=True,
        text=True,
        timeout=30 + timeout * len(queries),
        check=False,
        env=processes.python_env(),
    )
    if out.returncode != 0:
        raise RuntimeError(f"dnsprobe in {namespace}: {out.stderr.strip() or out.returncode}")
    return [Answer(**_tuple(json.loads(line))) for line in out.stdout.splitlines() if line]


def _tuple(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "answers": tuple(d["answers"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.lab.dnsprobe")
    p.add_argument("--ca")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--tls-name", help="the name to verify (default: the server's address)")
    p.add_argument("queries", nargs="+")
    args = p.parse_args(argv)
    try:
        queries = [parse_query(q) for q in args.queries]
    except ValueError as e:
        print(f"dnsprobe: {e}", file=sys.stderr)
        return 2
    for q in queries:
        a = ask(q, args.ca, args.timeout, args.tls_name)
        print(json.dumps({"query": a.query, "rcode": a.rcode, "answers": list(a.answers),
                          "error": a.error}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
