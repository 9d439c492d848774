"""Every sub-command of `dom0`, given bad input, says so in one line and
exits 2 (bad input) or 1 (failure at run time): never a traceback, as root
and as an unprivileged user.

The sub-commands are read from the parser itself, so a new one is covered
the day it is registered. The inputs are chosen to fail before any action:
nothing here touches a network namespace, starts a lab or a controller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.cli import parser as build_agent_parser
from controller.cli import EXIT_CODES, build_parser
from installer.cli import build_parser as build_install_parser

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
FILE_OPTIONS = {"--policy", "--config"}  # options that name an input file
MISSING = "/nonexistent/dom0-test/input.toml"


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        if (*path, name) == ("install",):  # its own parser: it only shares the entry point
            yield from _leaves(build_install_parser(), ("install",))
        elif (*path, name) == ("agent",):  # the agent's own, too
            yield from _leaves(build_agent_parser(), ("agent",))
        else:
            yield from _leaves(child, (*path, name))


LEAVES = dict(_leaves(build_parser()))
IDS = [" ".join(p) for p in LEAVES]


def _file_args(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if FILE_OPTIONS & set(a.option_strings) or (not a.option_strings and a.metavar == "FILE")
    ]


def _argv(path: tuple[str, ...], file: str, state: str, root: str) -> list[str]:
    """The sub-command with every required argument given: input files are
    `file` (of the installer's kind for `install`: its twin in install/),
    state directories `state`, anything else a plausible value."""
    parser = LEAVES[path]
    if path[0] == "install" and file != MISSING:
        file = str(Path(file).parent / "install" / Path(file).name)
    argv = list(path)
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        is_file = a in _file_args(parser)
        if not a.option_strings:
            argv.append(file if is_file else "web1")
        elif a.required or "--state" in a.option_strings or is_file:
            value = {"--state": state, "--root": root, "--server": "10.250.0.1"}.get(
                a.option_strings[0], file
            )
            argv += [a.option_strings[0], value]
    return argv


def dom0(argv: list[str], *, nobody: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "controller.cli", *argv]
    return subprocess.run(
        NOBODY + cmd if nobody else cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def assert_one_line(proc: subprocess.CompletedProcess, codes: tuple[int, ...], needle: str = ""):
    said = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, said
    assert proc.returncode in codes, said
    assert len(proc.stderr.splitlines()) == 1, said
    assert needle in proc.stderr, said


@pytest.fixture(scope="module")
def place() -> Iterator[Path]:
    """A directory an unprivileged user can enter (pytest's tmp_path is root's),
    with a valid policy anyone may read, the same policy readable by root
    only, and a state directory that is root's alone."""
    d = Path(tempfile.mkdtemp(prefix="dom0-cli-errors-"))
    try:
        d.chmod(0o755)
        policy = (ROOT / "policies" / "lab-bridge.toml").read_text()
        (d / "policy.toml").write_text(policy)
        (d / "policy.toml").chmod(0o644)
        (d / "secret.toml").write_text(policy)
        (d / "secret.toml").chmod(0o600)
        install = (ROOT / "examples" / "install" / "openrc.toml").read_text()
        (d / "install").mkdir(mode=0o755)
        (d / "install" / "policy.toml").write_text(install)
        (d / "install" / "policy.toml").chmod(0o644)
        (d / "install" / "secret.toml").write_text(install)
        (d / "install" / "secret.toml").chmod(0o600)
        (d / "state").mkdir(mode=0o700)
        (d / "root").mkdir(mode=0o755)
        yield d
    finally:
        shutil.rmtree(d)


def test_every_sub_command_is_found() -> None:
    for path in [("plan",), ("run",), ("machine", "renew"), ("host", "check"), ("flush",),
                 ("lab", "up"), ("bench", "reconcile"), ("install", "apply")]:  # fmt: skip
        assert path in LEAVES, path


@pytest.mark.parametrize("path", LEAVES, ids=IDS)
def test_a_bad_argument_is_one_line_exit_2(path: tuple[str, ...], place: Path) -> None:
    argv = _argv(path, MISSING, str(place / "state"), str(place / "root"))
    assert_one_line(dom0([*argv, "--no-such-option"]), (2,), "unrecognized arguments")


@pytest.mark.parametrize("path", [p for p in LEAVES if _file_args(LEAVES[p])], ids=" ".join)
def test_a_missing_file_is_one_line_exit_2(path: tuple[str, ...], place: Path) -> None:
    argv = _argv(path, MISSING, str(place / "state"), str(place / "root"))
    assert_one_line(dom0(argv), (2,), MISSING)


@pytest.mark.parametrize("path", LEAVES, ids=IDS)
def test_as_an_unprivileged_user(path: tuple[str, ...], place: Path) -> None:
    """An input file only root may read is bad input (2); a state directory
    that is root's, or a command that needs root, is a failure at run time (1)."""
    parser = LEAVES[path]
    secret = str(place / "secret.toml")
    if _file_args(parser):
        argv = _argv(path, secret, str(place / "state"), str(place / "root"))
        assert_one_line(dom0(argv, nobody=True), (2,), "ermission denied")
    if any("--state" in a.option_strings for a in parser._actions):
        # readable input, but the state (or the network) is root's
        argv = _argv(path, str(place / "policy.toml"), str(place / "state"), str(place / "root"))
        proc = dom0(argv, nobody=True)
        if path in (("plan",), ("run",)) or path[0] in (
            "status",
            "reload",
            "resync",
            "wg",
            "machine",
        ):
            assert_one_line(proc, (1,), "root")
        else:  # (a command may first refuse something else, e.g. flush without --yes)
            assert_one_line(proc, (1, 2))


# Bad values that argparse cannot see, for the sub-commands that take no file.
BAD_VALUES: dict[tuple[str, ...], tuple[list[str], str]] = {
    ("lab", "down"): (["--name", "no/such lab!"], "--name"),
    ("lab", "up"): (["--vms", "zero"], "--vms"),
    ("lab", "demo"): (["--vms", "0"], "--vms"),
    ("bench", "reconcile"): (["--sizes", "ten"], "--sizes"),
    ("bench", "wireguard"): (["--sizes", "ten"], "--sizes"),
    ("install", "validate"): (["--root", "/nonexistent/dom0-test"], "--root"),
    ("agent", "status"): (["--root", "/nonexistent/dom0-test"], "--root"),
    ("agent", "run"): (["--server", "dom0.example"], "--server"),
}


@pytest.mark.parametrize("path", BAD_VALUES, ids=" ".join)
def test_a_bad_value_is_one_line_exit_2(path: tuple[str, ...], place: Path) -> None:
    extra, needle = BAD_VALUES[path]
    argv = _argv(path, str(place / "policy.toml"), str(place / "state"), str(place / "root"))
    assert_one_line(dom0([*argv, *extra]), (2,), needle)
    assert_one_line(dom0([*argv, *extra], nobody=True), (2,), needle)


CONTROL = [p for p in LEAVES if p[0] in ("status", "reload", "resync", "wg", "machine")]


@pytest.mark.parametrize("path", CONTROL, ids=" ".join)
def test_no_controller_is_exit_1_and_json_with_json(path: tuple[str, ...], place: Path) -> None:
    empty = tempfile.mkdtemp(dir=place)
    argv = _argv(path, MISSING, empty, str(place / "root"))
    assert_one_line(dom0(argv), (1,), "no controller is running")
    proc = dom0([*argv, "--json"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and "no controller is running" in reply["error"], reply


@pytest.mark.parametrize("path", LEAVES, ids=IDS)
def test_help_states_the_exit_codes_and_defaults(path: tuple[str, ...]) -> None:
    proc = dom0([*path, "--help"])
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "exit codes: 0 ok; 1 " in text and "2 bad input" in text, text
    if "--state DIR" in text and path[0] != "install":
        assert "(default: /var/lib/dom0)" in text, text
    for option in ("--policy", "--state", "--json"):
        for action in LEAVES[path]._actions:
            if option in action.option_strings:
                assert action.help, f"{' '.join(path)} {option} has no help"


def test_top_level_help_and_version() -> None:
    proc = dom0(["--help"])
    assert proc.returncode == 0 and " ".join(EXIT_CODES.split()) in " ".join(proc.stdout.split())
    proc = dom0(["--version"])
    from importlib.metadata import version

    assert (proc.returncode, proc.stdout) == (0, f"dom0 {version('dom0')}\n"), proc.stderr


def test_killswitch_check_without_uplink_says_there_is_nothing_to_check(place: Path) -> None:
    # (the policy has no [uplink]: nothing reaches nftables)
    policy = place / "policy.toml"
    from controller.policy.load import load_policy

    assert load_policy(policy).uplink is None
    proc = dom0(["killswitch", "--check", "--policy", str(policy)])
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout == f"dom0 killswitch: no [uplink] in {policy}: no kill switch to check\n"


def test_plan_without_a_state_says_it_plans_for_a_fresh_host(place: Path) -> None:
    """In a network namespace of its own (`unshare --net`: anonymous, gone
    with the process), so that nothing of this host is even read."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    missing = place / "no-state-here"
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "controller.cli", "plan",
         "--policy", str(place / "policy.toml"), "--state", str(missing)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"dom0 plan: no state at {missing}: planning as for a fresh host\n"
    assert not missing.exists()  # a plan makes nothing
    # a state that is a file is bad input
    proc = dom0(
        ["plan", "--policy", str(place / "policy.toml"), "--state", str(place / "policy.toml")]
    )
    assert_one_line(proc, (2,), "not a directory")


def test_plan_on_a_damaged_state_store_is_one_line_exit_2(place: Path) -> None:
    # (found before anything of the network is read)
    state = Path(tempfile.mkdtemp(dir=place))
    (state / "state.sqlite").write_text("not a database")
    proc = dom0(["plan", "--policy", str(place / "policy.toml"), "--state", str(state)])
    assert_one_line(proc, (2,), f"{state}/state.sqlite: cannot open the state store: ")
