"""`dom0 install plan|apply|validate`: the installer's command line.

Exit codes: 0 success, 1 failure while applying (or validation found a
problem), 2 bad input (argument, config, state file), one line per problem.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from installer.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, ConfigError, UsageError

EXIT_CODES = (
    "exit codes: 0 ok; 1 a step failed (apply) or a check failed (validate); "
    "2 bad input (argument, config, state)"
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, and every
    help ends with the exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dom0 install",
        description="Bootstrap installer: Gentoo on root-on-ZFS with the dom0 controller.",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "plan", help="print every operation of the install, in order; changes nothing"
    )
    p.add_argument("--config", required=True, metavar="FILE", help="install.toml")
    p.add_argument("--json", action="store_true", help="machine-readable plan")

    a = sub.add_parser("apply", help="carry out the plan, with checkpoints (see --resume)")
    a.add_argument("--config", required=True, metavar="FILE", help="install.toml")
    a.add_argument("--resume", action="store_true", help="continue a run that stopped")
    a.add_argument(
        "--state",
        metavar="DIR",
        help="directory of the run's state file, DIR/state.json (default: install.work_dir)",
    )
    a.add_argument("--log", metavar="FILE", help="log file (default WORK_DIR/install.log)")
    a.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the ZFS passphrase from FILE instead of prompting (keysource = 'prompt')",
    )
    a.add_argument("--yes", action="store_true", help="do not ask before changing the disks")

    v = sub.add_parser("validate", help="check a finished install against its config")
    v.add_argument("--config", required=True, metavar="FILE", help="install.toml")
    v.add_argument("--root", required=True, metavar="DIR", help="root of the installed system")
    v.add_argument("--json", action="store_true", help="machine-readable results")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        if args.action == "plan":
            return plan_command(args.config, as_json=args.json)
        if args.action == "validate":
            return validate_command(args.config, args.root, as_json=args.json)
        return apply_command(args)
    except ConfigError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"dom0 install: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dom0 install: interrupted", file=sys.stderr)
        return 130


def _load(path: str):
    from installer.config import load

    return load(path)


def plan_command(config_path: str, *, as_json: bool, out: TextIO | None = None) -> int:
    from installer.plan import build_plan
    from installer.render import plan_json, plan_text

    out = out or sys.stdout
    cfg = _load(config_path)
    plan = build_plan(cfg)
    out.write(plan_json(plan) if as_json else plan_text(plan, config_path))
    return EXIT_OK


def validate_command(config_path: str, root: str, *, as_json: bool) -> int:
    from installer.validate import render_json, render_text, validate

    cfg = _load(config_path)
    root = os.path.abspath(root)
    if not os.path.isdir(root) or root == "/":
        raise UsageError(f"--root {root}: expected the directory of an installed system, not /")
    results = validate(cfg, root)
    sys.stdout.write(render_json(root, results) if as_json else render_text(results))
    return EXIT_OK if all(r.status != "fail" for r in results) else EXIT_FAIL


STATE_FILE = "state.json"


def _state_dir(path: str) -> str:
    """--state names a directory, as every other --state of dom0 does; the
    directory is made (0700) with the state file when the run starts."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(
            f"--state {path}: not a directory, expected the directory to keep "
            f"{STATE_FILE} in (e.g. --state {os.path.dirname(path) or '.'})"
        )
    return path


def apply_command(args: argparse.Namespace) -> int:
    from installer.execute import Executor, Secrets, confirm
    from installer.plan import build_plan

    cfg = _load(args.config)
    plan = build_plan(cfg)
    work = cfg.install.work_dir
    state = os.path.join(_state_dir(args.state) if args.state else work, STATE_FILE)
    log = args.log or os.path.join(work, "install.log")
    if args.passphrase_file and not os.path.isfile(args.passphrase_file):
        raise UsageError(f"--passphrase-file {args.passphrase_file}: no such file")
    if not args.resume and not args.yes:
        if not sys.stdin.isatty():  # no one to ask: one line, as for any bad input
            raise UsageError("apply changes disks and no terminal can confirm: pass --yes")
        if not confirm(cfg):
            print("dom0 install: not confirmed; nothing was changed", file=sys.stderr)
            return EXIT_USAGE
    secrets = Secrets(cfg.secrets(), passphrase_file=args.passphrase_file)
    ex = Executor(
        cfg,
        plan,
        state_path=os.path.abspath(state),
        log_path=os.path.abspath(log),
        secrets=secrets,
        config_path=os.path.abspath(args.config),
    )
    return ex.run(resume=args.resume)
