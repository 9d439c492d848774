"""The `dom0` command line: one entry point, subcommands dispatched lazily.

Every subcommand returns an exit code: 0 success, 1 failure at run time,
2 bad input (argument, policy, config) reported as one line per problem.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_CODES = (
    "exit codes: 0 ok; 1 failure at run time (no controller, not root, a daemon or the "
    "kernel refused, a check found something); 2 bad input (argument, policy, config, path)"
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, and every
    help ends with the exit codes (sub-commands are made with this class too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


CAP_NET_ADMIN = 12  # linux/capability.h


def net_admin_problem(prog: str) -> str | None:
    """Why this process cannot read or change the network (nftables, links),
    as one line, or None. Checked before anything else by the commands that
    need it: without it libnftables says only "Operation not permitted"."""
    try:
        with open("/proc/self/status") as f:
            caps = next(int(x.split()[1], 16) for x in f if x.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None  # no /proc to ask: let the kernel say it
    if caps >> CAP_NET_ADMIN & 1:
        return None
    return (
        f"{prog}: needs CAP_NET_ADMIN to see and change the network, "
        f"and uid {os.geteuid()} has not: run it as root"
    )


def version() -> str:
    """The installed distribution's version (what pip and the package manager see)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("dom0")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _add(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help)


def build_parser() -> argparse.ArgumentParser:
    from controller import commands

    parser = _Parser(prog="dom0", description="dom0: network controller of a virtualization host")
    parser.add_argument("--version", action="version", version=f"dom0 {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    commands.register(sub)
    # The installer parses its own arguments; it only shares the entry point.
    sub.add_parser("install", help="bootstrap installer (Gentoo on root-on-ZFS)", add_help=False)
    sub.add_parser("agent", help="the agent inside a VM (dom0 agent run --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] == "install":
        from installer.cli import main as install_main

        return install_main(args_in[1:])
    if args_in and args_in[0] == "agent":  # (the agent imports none of the controller)
        from agents.cli import main as agent_main

        return agent_main(args_in[1:])
    parser = build_parser()
    args = parser.parse_args(args_in)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
