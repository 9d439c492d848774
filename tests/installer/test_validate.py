"""`dom0 install validate`: a finished install against its config, each check named."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from installer import validate
from installer.cli import main
from installer.initramfs import write_newc

from .conftest import mini_config


def _failing(cfg, root: Path) -> dict[str, str]:
    return {r.id: r.detail for r in validate.validate(cfg, str(root)) if r.status == "fail"}


@pytest.fixture
def installed(make_install, capsys):
    """A finished fake-host install (openrc, zram, no desktop)."""
    inst = make_install({})
    assert main(inst.argv()) == 0
    capsys.readouterr()
    return inst


def test_fresh_install_passes(installed) -> None:
    assert _failing(installed.cfg(), installed.target) == {}


def _break(root: Path, how: Callable[[Path], None]) -> Path:
    copy = root.parent / "broken"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(root, copy, symlinks=True)
    how(copy)
    return copy


def _write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def how(root: Path) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(p):
            p.unlink()
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    return how


def _relink(rel: str, target: str) -> Callable[[Path], None]:
    def how(root: Path) -> None:
        (root / rel).unlink()
        os.symlink(target, root / rel)

    return how


CASES = {
    "stray profile folder": (lambda r: (r / "profile").mkdir(), "tree.top-level"),
    "17.1 profile": (
        _relink(
            "etc/portage/make.profile",
            "../../var/db/repos/gentoo/profiles/default/linux/amd64/17.1",
        ),
        "profile.link",
    ),
    "split /bin on a merged profile": (
        lambda r: ((r / "bin").unlink(), (r / "bin").mkdir()),
        "usr.layout",
    ),
    "systemd in the stage": (
        lambda r: (r / "var/db/pkg/sys-apps/systemd-256").mkdir(),
        "init.stage3",
    ),
    "swap line with zram": (_write("etc/fstab", "/dev/sda3 none swap sw 0 0\n"), "fstab.swap"),
    "password login": (
        _write("etc/ssh/sshd_config.d/50-dom0.conf", "PasswordAuthentication yes\n"),
        "sshd.key-only",
    ),
    "sshd_config without the include first": (
        _write("etc/ssh/sshd_config", "Port 22\n"),
        "sshd.include",
    ),
    "sshd not enabled": (lambda r: (r / "etc/runlevels/default/sshd").unlink(), "service.sshd"),
    "no hostid": (lambda r: (r / "etc/hostid").unlink(), "zfs.hostid"),
    "initramfs without the hostid": (
        _write(
            "boot/initramfs-6.12.41-gentoo-dist.img",
            gzip.compress(write_newc({"etc/modprobe.d/zfs.conf": b"x"})),
        ),
        "initramfs.initramfs-6.12.41-gentoo-dist.img",
    ),
    "kernel ahead of zfs": (
        lambda r: (r / "lib/modules/6.13.1-gentoo-dist").mkdir(),
        "zfs.module.6.13.1-gentoo-dist",
    ),
    "firewall changed": (
        _write("etc/dom0/firewall-baseline.nft", "flush ruleset\n"),
        "firewall.baseline",
    ),
    "a display manager without desktop": (
        lambda r: (r / "var/db/pkg/gnome-base/gdm-47.2").mkdir(parents=True),
        "desktop.no-display-manager",
    ),
    "keys readable by others": (
        lambda r: (r / "home/admin/.ssh/authorized_keys").chmod(0o644),
        "user.admin.keys",
    ),
    "policy differs": (_write("etc/dom0/policy.toml", "other\n"), "dom0.policy"),
    "unstripped snapshot": (
        lambda r: shutil.copytree(
            r / "var/db/repos/gentoo/profiles", r / "var/db/repos/gentoo/gentoo/profiles"
        ),
        "tree.repo-stripped",
    ),
}


def test_each_broken_install_fails_its_check(installed) -> None:
    cfg = installed.cfg()
    for name, (how, check_id) in CASES.items():
        broken = _break(installed.target, how)
        bad = _failing(cfg, broken)
        assert check_id in bad, f"{name}: {check_id} did not fail ({bad})"


def test_desktop_checks_on_a_tree(tmp_path: Path) -> None:
    """The PAM stack is followed through include/substack to find the keyring."""
    root = tmp_path / "root"
    (root / "etc/pam.d").mkdir(parents=True)
    (root / "etc/pam.d/gdm-password").write_text(
        "auth substack system-local-login\nsession include system-local-login\n"
    )
    (root / "etc/pam.d/system-local-login").write_text(
        "auth include system-login\nsession include system-login\n"
    )
    (root / "etc/pam.d/system-login").write_text(
        "auth optional pam_gnome_keyring.so\n-session optional pam_gnome_keyring.so auto_start\n"
    )
    cfg = mini_config(tmp_path, {"desktop": {"enabled": True}})
    results = {r.id: r for r in validate.desktop_checks(cfg, validate.Tree(str(root)))}
    assert results["desktop.keyring-pam"].status == "ok"
    assert results["desktop.no-autologin"].status == "fail"  # no custom.conf at all
    (root / "etc/pam.d/system-login").write_text("auth required pam_unix.so\n")
    results = {r.id: r for r in validate.desktop_checks(cfg, validate.Tree(str(root)))}
    assert results["desktop.keyring-pam"].status == "fail"


def test_validate_refuses_the_live_root(capsys) -> None:
    from .conftest import EXAMPLES

    assert main(["validate", "--config", str(EXAMPLES / "openrc.toml"), "--root", "/"]) == 2
    assert "not /" in capsys.readouterr().err
