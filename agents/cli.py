"""`dom0 agent ...` (also `python -m agents`): the in-VM agent.

    dom0 agent run --root DIR --server ADDRESS [--port 8443] [--wireguard MODE]
                   [--no-set-hostname] [--log-level LEVEL]
    dom0 agent status --root DIR [--json]

Exit codes as the rest of dom0: 0 ok, 1 failure at run time, 2 bad input.
This module imports only the agent's own light dependencies.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
DISCOVER_TIMEOUT = 5.0  # seconds one mDNS browse for dom0 lasts at most
EXIT_CODES = (
    "exit codes: 0 ok; 1 failure at run time (dom0 unreachable is not one: the agent waits); "
    "2 bad input (argument, file)"
)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected dom0's address on this VM's network (e.g. 10.250.0.1)"
        ) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port from 1 to 65535")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dom0 agent", description="dom0's agent inside a VM")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="enroll if need be, then take configuration from dom0")
    run.add_argument("--root", required=True, type=Path, help="the agent's directory (0700)")
    run.add_argument(
        "--server",
        type=_address,
        help="dom0's address (default: found by mDNS on the link, _dom0._tcp, and trusted "
        "only if its TLS verifies against the pinned CA)",
    )
    run.add_argument("--port", type=_port, default=8443, help="its agent port (default: 8443)")
    run.add_argument(
        "--server-name",
        help="the name to verify in dom0's certificate (default: the address)",
    )
    run.add_argument(
        "--wireguard",
        choices=["auto", "kernel", "userspace"],
        default="auto",
        help="the hub tunnel's WireGuard: the kernel module or wireguard-go (auto: the kernel's "
        "if it has one)",
    )
    run.add_argument(
        "--no-set-hostname",
        action="store_true",
        help="write the hostname to ROOT/hostname only (a VM that is a network namespace "
        "shares its host's hostname)",
    )
    run.add_argument(
        "--system-root",
        type=Path,
        default=Path("/"),
        help="the VM's root directory, for its resolver configuration (etc/resolv.conf, or "
        "systemd-resolved's drop-in); default /",
    )
    run.add_argument(
        "--dns-listen",
        default="127.0.0.1",
        type=_address,
        help="where the VM's DNS stub listens, port 53 (default 127.0.0.1; systemd-resolved "
        "holds 127.0.0.53)",
    )
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    status = sub.add_parser("status", help="what this agent holds: enrolment, certificate, config")
    status.add_argument("--root", required=True, type=Path)
    status.add_argument("--json", action="store_true", help="as JSON")
    return p


def _run(args: argparse.Namespace) -> int:
    from functools import partial

    import trio

    from agents.apply import Applier
    from agents.containers import Watcher
    from agents.dns import DnsFollower, dns_context
    from agents.files import Root
    from agents.session import Agent

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    root = Root(args.root)
    try:
        root.ensure()
    except OSError as e:
        print(f"dom0 agent run: --root {args.root}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    applier = Applier(root.path, set_hostname=not args.no_set_hostname, prefer=args.wireguard)
    discover = None
    if args.server is None:
        from agents.discover import browse

        discover = partial(browse, DISCOVER_TIMEOUT)
    follower = DnsFollower(args.system_root, partial(dns_context, root),
                           ((args.dns_listen, 53),))  # fmt: skip
    agent = Agent(root, applier, args.server, args.port, server_name=args.server_name,
                  containers=Watcher(root.path), discover=discover, dns=follower)  # fmt: skip
    try:
        trio.run(agent.run)
    except KeyboardInterrupt:
        return 130
    return 0


def status_of(root_dir: Path) -> dict[str, Any]:
    from agents import containers, identity
    from agents.files import FileError, Root

    root = Root(root_dir)
    out: dict[str, Any] = {"root": str(root.path), "enrolled": root.enrolled()}
    out["token_waiting"] = root.token.exists()
    if root.cert.exists():
        life = identity.life(root.cert.read_bytes())
        out["certificate"] = {
            "serial": life.serial,
            "not_after": life.not_after.isoformat(),
            "expired": life.not_after <= datetime.now(UTC),
        }
    try:
        known = root.known()
    except FileError as e:
        out["config_error"] = str(e)
        known = None
    out["config_version"] = known.version if known else None
    out["name"] = known.config.name if known else None
    out["containers_prefix"] = known.config.containers if known else None
    # The ledger's: the addresses the agent gave (the running agent reports the ones
    # in place to dom0).
    try:
        ledger = containers.read_ledger(root.path)
    except FileError as e:
        out["containers_error"] = str(e)
        ledger = {}
    out["containers"] = containers.report_of(ledger.values(), known.config.name) if known else []
    return out


def _status(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        print(f"dom0 agent status: --root {args.root}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    out = status_of(args.root)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"agent in {out['root']}: {'enrolled' if out['enrolled'] else 'not enrolled'}")
    if "certificate" in out:
        c = out["certificate"]
        print(f"  certificate {c['serial']} until {c['not_after']}"
              + (" (EXPIRED: enroll again)" if c["expired"] else ""))  # fmt: skip
    if out.get("config_error"):
        print(f"  configuration: {out['config_error']}")
    elif out["config_version"] is not None:
        print(f"  configuration {out['config_version']} for {out['name']}")
    else:
        print("  no configuration yet")
    if out["containers_prefix"]:
        print(f"  containers in {out['containers_prefix']}: {len(out['containers'])}")
    if out.get("containers_error"):
        print(f"  containers: {out['containers_error']}")
    for c in out["containers"]:
        print(f"    {c['fqdn']}  {c['address']}  ({c['interface']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return _run(args) if args.action == "run" else _status(args)


if __name__ == "__main__":
    sys.exit(main())
