"""The command line: usage errors are one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from installer.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "install" / "openrc.toml")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "the following arguments are required: ACTION"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["plan"], "the following arguments are required: --config"),
        (["validate", "--config", EXAMPLE], "the following arguments are required: --root"),
        (["apply", "--config", EXAMPLE, "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert err.startswith("dom0 install") and ": error: " in err


def test_through_the_dom0_entry_point() -> None:
    """`dom0 install ...` reaches this CLI with its own arguments."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from controller.cli import main; sys.exit(main(sys.argv[1:]))",
            "install",
            "plan",
            "--config",
            EXAMPLE,
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"digest"' in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from controller.cli import main; sys.exit(main(sys.argv[1:]))",
            "install",
            "nope",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_missing_passphrase_file_is_a_usage_error(capsys) -> None:
    assert main(["apply", "--config", EXAMPLE, "--yes", "--passphrase-file", "/no/such"]) == 2
    assert capsys.readouterr().err == "dom0 install: --passphrase-file /no/such: no such file\n"


def _problems(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    cfg = tmp_path / "install.toml"
    cfg.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "install", "plan", "--config", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stderr.splitlines()


def test_config_problems_count_array_elements_from_one_and_guess_typos(tmp_path: Path) -> None:
    """As the policy does: `users[1]` is the first user, and a typo gets a guess."""
    text = Path(EXAMPLE).read_text()
    assert "[[users]]" in text and "\nname = " in text
    bad = text.replace("[[users]]\n", "[[users]]\nnaem = 'x'\n", 1)
    code, lines = _problems(tmp_path, bad)
    assert code == 2
    assert any(
        line.endswith("users[1].naem: unknown key (did you mean 'name'?), expected one of: "
                      + line.split("expected one of: ", 1)[1])
        for line in lines
    ), lines  # fmt: skip
    assert not any("users[0]" in line for line in lines), lines


def test_apply_state_is_a_directory(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "install", "apply", "--config", EXAMPLE,
         "--state", str(state)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # (never --yes: a regression must not reach the disks)
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"dom0 install: --state {state}: not a directory, expected the directory to keep "
        f"state.json in (e.g. --state {tmp_path})\n"
    )
    assert state.read_text() == "{}"  # untouched


def test_help_states_the_exit_codes() -> None:
    for argv in ([], ["plan"], ["apply"], ["validate"]):
        proc = subprocess.run(
            [sys.executable, "-m", "controller.cli", "install", *argv, "--help"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0
        assert "exit codes: 0 ok; 1 " in proc.stdout and "2 bad" in proc.stdout, argv
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "install", "apply", "--help"],
        capture_output=True,
        text=True,
    )
    assert "--state DIR" in proc.stdout
