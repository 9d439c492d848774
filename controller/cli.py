"""The `dom0` command line: one entry point, subcommands dispatched lazily.

Every subcommand returns an exit code: 0 success, 1 failure at run time,
2 bad input (argument, policy, config) reported as one line per problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help)


def build_parser() -> argparse.ArgumentParser:
    from controller import commands

    parser = _Parser(prog="dom0", description="dom0: network controller of a virtualization host")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    commands.register(sub)
    # The installer parses its own arguments; it only shares the entry point.
    sub.add_parser("install", help="bootstrap installer (Gentoo on root-on-ZFS)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] == "install":
        from installer.cli import main as install_main

        return install_main(args_in[1:])
    parser = build_parser()
    args = parser.parse_args(args_in)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
