"""One controller per state directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controller.runlock import claim, held_by_a_controller


def test_a_second_claim_fails_until_the_first_holder_is_gone(tmp_path: Path) -> None:
    assert not held_by_a_controller(tmp_path)
    fd = claim(tmp_path)
    assert fd is not None and held_by_a_controller(tmp_path)
    assert claim(tmp_path) is None  # another open of the same file: refused
    os.close(fd)  # what the kernel does when the controller ends, however it ends
    assert not held_by_a_controller(tmp_path)
    again = claim(tmp_path)
    assert again is not None
    os.close(again)


def test_a_process_that_dies_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from controller.runlock import claim;"
         f"assert claim(Path({str(tmp_path)!r})) is not None; print('held', flush=True);"
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert held_by_a_controller(tmp_path) and claim(tmp_path) is None
    finally:
        holder.kill()
        holder.wait()
    assert not held_by_a_controller(tmp_path)
