"""The reservation directory: what is on disk is what `read` says, also when
files change behind the controller's back (its cache must not hide that);
nothing is ever deleted while dnsmasq may run (it would keep a deleted
file's entries): removals are tombstones, swept only before dnsmasq starts."""

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
    assert (h.dir / "52-54-00-00-00-01").read_text() == (
        "52:54:00:00:00:01,id:*,set:x,10.10.0.9,web1\n"
    )
    # somebody edits a file: read sees the new content
    f = h.dir / "52-54-00-00-00-02"
    f.write_text("52:54:00:00:00:02,id:*,set:y,10.20.0.10,db1\n")
    os.utime(f, ns=(1, 1))  # even with an old mtime: the inode or mtime differs
    assert h.read()[B.mac].address == "10.20.0.10"
    # a stray file is emptied and a damaged reservation becomes a tombstone,
    # in place; a file deleted behind our back is simply gone
    (h.dir / "junk").write_text("00:11:22:33:44:55,10.10.0.7\n")
    (h.dir / "52-54-00-00-00-01").write_text("52:54:00:00:00:01,10.10.0.66\n")
    assert h.read() == {B.mac: DhcpHost(B.mac, "10.20.0.10", "db1", "y")}
    assert (h.dir / "junk").read_text() == ""
    assert (h.dir / "52-54-00-00-00-01").read_text() == "52:54:00:00:00:01,ignore\n"
    # a fresh HostsDir (a restarted controller) reads the same
    assert HostsDir(tmp_path).read() == h.read()
    assert (h.dir.stat().st_mode & 0o777) == 0o755


def test_removal_is_a_tombstone_until_swept(tmp_path: Path) -> None:
    h = HostsDir(tmp_path)
    h.write({A.mac: A, B.mac: B}, set())
    h.write({}, {B.mac})
    assert h.read() == {A.mac: A}
    assert (h.dir / "52-54-00-00-00-02").read_text() == "52:54:00:00:00:02,ignore\n"
    # a tombstone comes back to life when the machine does
    h.write({B.mac: B}, set())
    assert h.read() == {A.mac: A, B.mac: B}
    h.write({}, {A.mac})
    (h.dir / "junk").write_text("x\n")
    assert h.sweep() == 2  # A's tombstone and the junk; B is a reservation
    assert sorted(p.name for p in h.dir.iterdir()) == ["52-54-00-00-00-02"]
    assert h.read() == {B.mac: B}


def _host(mac: str, address: str, name: str = "web1", tag: str = "x") -> DhcpHost:
    return DhcpHost(mac, address, name, tag)


def test_a_reused_address_marks_dnsmasq_stale_and_a_new_one_does_not(tmp_path: Path) -> None:
    """dnsmasq keeps every address it has read: naming one again needs a restart."""
    h = HostsDir(tmp_path)
    calls: list[int] = []
    h.on_stale = lambda: calls.append(1)
    a = "52:54:00:00:00:01"
    h.write({a: _host(a, "10.0.0.5")}, set())
    assert not h.stale and "10.0.0.5" in h.burnt
    h.write({a: _host(a, "10.0.0.6", "special1", "y")}, set())  # a move: a new address
    assert not h.stale and not calls
    h.write({a: _host(a, "10.0.0.5")}, set())  # back to the first: dnsmasq would refuse it
    assert h.stale and calls == [1]
    # a controller restarted meanwhile knows it too (the record is on disk)
    assert HostsDir(tmp_path).burnt == {"10.0.0.5", "10.0.0.6"}
    # a new dnsmasq reads only what the files name now
    h.reset_burnt()
    assert h.burnt == {"10.0.0.5"} and not h.stale
    assert HostsDir(tmp_path).burnt == {"10.0.0.5"}


def test_dnsmasq_log_levels_follow_the_policy() -> None:
    from ipaddress import IPv4Network

    from controller.core.desired import DhcpConfig, DhcpRange
    from controller.drivers.dhcp import dnsmasq_argv

    def argv(log: str) -> list[str]:
        r = DhcpRange("x", IPv4Network("10.0.0.0/24"), "10.0.0.1", "x.internal")
        return dnsmasq_argv(DhcpConfig("virbr0", 3600, (r,), (), log), Path("/s"))

    assert "--log-dhcp" in argv("verbose") and "--quiet-dhcp" not in argv("verbose")
    assert "--quiet-dhcp" in argv("quiet")
    assert not {"--log-dhcp", "--quiet-dhcp"} & set(argv("transactions"))
