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
