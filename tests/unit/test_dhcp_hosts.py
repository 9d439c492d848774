"""The reservation directory: what is on disk is what `read` says, also when
files change behind the controller's back (its cache must not hide that)."""

from __future__ import annotations

import os
from pathlib import Path

from controller.core.desired import DhcpHost
from controller.drivers.dhcp import HostsDir

A = DhcpHost("52:54:00:00:00:01", "10.10.0.9", "web1", "x")
B = DhcpHost("52:54:00:00:00:02", "10.20.0.9", "db1", "y")


def test_write_read_and_outside_changes(tmp_path: Path) -> None:
    h = HostsDir(tmp_path)
    h.write({A.mac: A, B.mac: B}, set())
    assert h.read() == {A.mac: A, B.mac: B}
    assert (h.dir / "52-54-00-00-00-01").read_text() == "52:54:00:00:00:01,set:x,10.10.0.9,web1\n"
    # somebody edits a file: read sees the new content
    f = h.dir / "52-54-00-00-00-02"
    f.write_text("52:54:00:00:00:02,set:y,10.20.0.10,db1\n")
    os.utime(f, ns=(1, 1))  # even with an old mtime: the inode or mtime differs
    assert h.read()[B.mac].address == "10.20.0.10"
    # a stray or damaged file is removed; a deleted one is gone
    (h.dir / "junk").write_text("nonsense\n")
    (h.dir / "52-54-00-00-00-01").unlink()
    assert h.read() == {B.mac: DhcpHost(B.mac, "10.20.0.10", "db1", "y")}
    assert not (h.dir / "junk").exists()
    # a fresh HostsDir (a restarted controller) reads the same
    assert HostsDir(tmp_path).read() == h.read()
    h.write({}, {B.mac})
    assert h.read() == {}
    assert (h.dir.stat().st_mode & 0o777) == 0o755
