"""Synthetic Gentoo artefacts for tests: a small stage3 and ebuild repository
snapshot with the real layout, signed with a throwaway test key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from installer import profiles

GPG_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def make_key(home: Path) -> tuple[str, Path]:
    """A fresh ed25519 signing key in `home`; returns (fingerprint, public keyring)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    gpg = ["gpg", "--homedir", str(home), "--batch"]
    subprocess.run(
        [
            *gpg,
            "--passphrase",
            "",
            "--quick-gen-key",
            "dom0 test key <test@example.invalid>",
            "ed25519",
            "sign",
            "never",
        ],
        check=True,
        capture_output=True,
        env=GPG_ENV,
    )
    out = subprocess.run(
        [*gpg, "--with-colons", "--list-keys"],
        check=True,
        capture_output=True,
        text=True,
        env=GPG_ENV,
    ).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    keyring = home.parent / f"{home.name}-public.asc"
    pub = subprocess.run(
        [*gpg, "--armor", "--export", fpr], check=True, capture_output=True, env=GPG_ENV
    ).stdout
    keyring.write_bytes(pub)
    return fpr, keyring


def kill_agent(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--kill", "all"],
        capture_output=True,
        env=GPG_ENV,
        check=False,
    )


def sign(home: Path, file: Path, sig: Path, *, clear: bool = False) -> None:
    mode = ["--clearsign"] if clear else ["--detach-sign", "--armor"]
    subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--yes", *mode, "--output", str(sig), str(file)],
        check=True,
        capture_output=True,
        env=GPG_ENV,
    )


def _put(root: Path, rel: str, text: str = "", mode: int = 0o644) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)


SSHD_CONFIG = """#\t$OpenBSD: sshd_config,v 1.104 2021/07/02 05:11:21 dtucker Exp $
# This is the sshd server system-wide configuration file.
#Port 22
#PermitRootLogin prohibit-password
UsePAM yes
Subsystem\tsftp\t/usr/lib64/misc/sftp-server
"""


def stage3_tree(root: Path, *, init: str = "openrc", merged: bool = True) -> None:
    """The top of a stage3: enough for the installer's checks and emulated chroot."""
    for d in (
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "home",
        "media",
        "mnt",
        "opt",
        "root",
        "boot",
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "var/tmp",
        "var/lib",
        "var/log",
        "var/db/repos",
        "etc/portage",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    if merged:
        for name, target in (
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ):
            os.symlink(target, root / name)
    else:
        for name in ("bin", "sbin", "lib", "lib64"):
            (root / name).mkdir()
        _put(root, "bin/busybox", "#!/bin/sh\n", 0o755)
    _put(root, "usr/share/zoneinfo/UTC", "TZif2")
    _put(root, "usr/share/zoneinfo/Europe/Berlin", "TZif2")
    _put(root, "etc/portage/make.conf", 'COMMON_FLAGS="-O2 -pipe"\nLC_MESSAGES=C.utf8\n')
    os.symlink(
        "../../var/db/repos/gentoo/profiles/default/linux/amd64/23.0",
        root / "etc/portage/make.profile",
    )
    os.symlink("/proc/self/mounts", root / "etc/mtab")  # an absolute link, as in real stages
    _put(
        root,
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\nportage:x:250:250::/var/lib/portage/home:/sbin/nologin\n",
    )
    _put(root, "etc/group", "root::0:\nwheel::10:root\nkvm::78:\nportage::250:\n")
    _put(root, "etc/shadow", "root:*:10770:0:::::\n", 0o640)
    _put(root, "etc/ssh/sshd_config", SSHD_CONFIG)
    _put(
        root,
        "etc/pam.d/system-local-login",
        "auth include system-login\n"
        "account include system-login\npassword include system-login\n"
        "session include system-login\n",
    )
    _put(
        root, "etc/pam.d/system-login", "auth required pam_unix.so\nsession required pam_unix.so\n"
    )
    pkg = root / "var/db/pkg"
    (pkg / "sys-auth/pambase-20240128").mkdir(parents=True)
    if init == "openrc":
        (pkg / "sys-apps/openrc-0.56").mkdir(parents=True)
        (pkg / "sys-apps/systemd-utils-256.7").mkdir(parents=True)
        for lvl in ("boot", "default", "sysinit", "shutdown"):
            (root / "etc/runlevels" / lvl).mkdir(parents=True)
        _put(root, "etc/init.d/sshd", "#!/sbin/openrc-run\n", 0o755)
        _put(root, "etc/conf.d/sshd", '# /etc/conf.d/sshd\n#SSHD_OPTS=""\n')
    else:
        (pkg / "sys-apps/systemd-256.7").mkdir(parents=True)
        _put(root, "usr/lib/systemd/system/sshd.service", "[Unit]\n")
        (root / "etc/systemd/system").mkdir(parents=True)
    # An extended attribute, to prove extraction keeps them (--xattrs).
    os.setxattr(root / "usr/share/zoneinfo/UTC", "user.dom0test", b"kept")


def snapshot_tree(top: Path) -> None:
    """A repository snapshot as distributed: everything under one top folder."""
    _put(top, "profiles/repo_name", "gentoo\n")
    _put(top, "metadata/timestamp.chk", "Wed, 01 Jan 2025 00:00:00 +0000\n")
    _put(top, "sys-fs/zfs/zfs-2.3.3.ebuild", "EAPI=8\n")
    for v in profiles.SUPPORTED:
        _put(top, f"profiles/{v.profile}/parent", "..\n")
    _put(
        top,
        "profiles/default/linux/amd64/17.1/deprecated",
        "default/linux/amd64/23.0/split-usr\n\nA profile upgrade to version 23.0 ...\n",
    )


def tar(src: Path, out: Path, *members: str) -> None:
    subprocess.run(
        [
            "tar",
            "--create",
            "--xz",
            "--file",
            str(out),
            "--directory",
            str(src),
            "--xattrs",
            "--numeric-owner",
            *(members or (".",)),
        ],
        check=True,
        env=GPG_ENV,
    )


class Artifacts:
    """Builds (once per session) the signed stage3s and the snapshot."""

    def __init__(self, base: Path, home: Path) -> None:
        self.base = base
        self.home = home
        self._cache: dict[str, tuple[Path, Path]] = {}

    def stage3(self, variant: profiles.Variant) -> tuple[Path, Path]:
        key = variant.stage3
        if key not in self._cache:
            tree = self.base / f"tree-{key}"
            stage3_tree(tree, init=variant.init, merged=variant.merged_usr)
            out = self.base / f"stage3-{key}-20250101T000000Z.tar.xz"
            tar(tree, out)
            sig = Path(str(out) + ".asc")
            sign(self.home, out, sig)
            self._cache[key] = (out, sig)
        return self._cache[key]

    def snapshot(self) -> tuple[Path, Path]:
        if "snapshot" not in self._cache:
            src = self.base / "snapshot-src"
            snapshot_tree(src / "gentoo-20250101")
            out = self.base / "gentoo-20250101.tar.xz"
            tar(src, out, "gentoo-20250101")
            sig = Path(str(out) + ".gpgsig")
            sign(self.home, out, sig)
            self._cache["snapshot"] = (out, sig)
        return self._cache["snapshot"]
