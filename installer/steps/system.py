"""The chroot, Portage profile and configuration, the base system, users."""

from __future__ import annotations

import posixpath

from installer import files
from installer.config import Config
from installer.files import ESP_PART, esp_mountpoint, partition_device
from installer.ops import PathExists, Step, UserExists
from installer.steps.base import StepBuilder, mounted

PROFILES = "/var/db/repos/gentoo/profiles"


def chroot_mounts(cfg: Config) -> Step:
    b = StepBuilder(
        cfg, "chroot.mounts", "mount /proc, /sys, /dev, /run and the ESPs", session=True
    )
    t = b.t
    b.run("proc", "mount", "--types", "proc", "/proc", t("/proc"), skip_if=mounted(t("/proc")))
    b.run("sys", "mount", "--rbind", "--make-rslave", "/sys", t("/sys"), skip_if=mounted(t("/sys")))
    b.run("dev", "mount", "--rbind", "--make-rslave", "/dev", t("/dev"), skip_if=mounted(t("/dev")))
    b.run("run", "mount", "--bind", "--make-slave", "/run", t("/run"), skip_if=mounted(t("/run")))
    if cfg.bootloader.kind != "none":
        for i, disk in enumerate(cfg.disks.devices):
            mp = esp_mountpoint(i)
            b.mkdir(f"esp{i}-dir", mp)
            b.run(
                f"esp{i}", "mount", partition_device(disk, ESP_PART), t(mp), skip_if=mounted(t(mp))
            )
    return b.build()


def portage(cfg: Config) -> list[Step]:
    profile = cfg.gentoo.variant.profile
    b = StepBuilder(cfg, "portage.profile", f"select the profile {profile}")
    # Relative, as eselect makes it; the op replaces an old link, never writes
    # through it (an `ln -sf` onto a link to a directory would create the new
    # link *inside* the old profile directory).
    b.symlink("make-profile", "/etc/portage/make.profile", f"../..{PROFILES}/{profile}")
    out = [b.build()]

    b = StepBuilder(cfg, "portage.config", "Portage settings: USE, kernel pin, licenses, DNS")
    b.mkdir("use-dir", "/etc/portage/package.use")
    b.write("use", "/etc/portage/package.use/dom0", files.package_use(cfg))
    b.mkdir("mask-dir", "/etc/portage/package.mask")
    b.write("mask", "/etc/portage/package.mask/dom0-kernel", files.package_mask(cfg))
    b.mkdir("license-dir", "/etc/portage/package.license")
    b.write("license", "/etc/portage/package.license/dom0", files.package_license())
    b.copy("resolv", cfg.install.resolv_conf, "/etc/resolv.conf")
    out.append(b.build())
    return out


def base(cfg: Config) -> Step:
    b = StepBuilder(cfg, "system.base", "host name, time zone, locale, keymap, fstab")
    for path, content in files.hostname_files(cfg).items():
        b.write(posixpath.basename(path), path, content)
    b.symlink("localtime", "/etc/localtime", f"../usr/share/zoneinfo/{cfg.system.timezone}")
    for path, content in files.locale_files(cfg).items():
        b.write(posixpath.basename(path), path, content)
    b.chroot("locale-gen", "locale-gen", idempotent=True)
    b.write("fstab", "/etc/fstab", files.fstab(cfg))
    b.chroot("env-update", "env-update", idempotent=True)
    return b.build()


def users(cfg: Config) -> Step:
    b = StepBuilder(cfg, "users", "users, their SSH keys and sudo for wheel")
    groups = sorted({g for u in cfg.users for g in u.groups})
    for g in groups:
        b.chroot(f"group-{g}", "groupadd", "--force", g, idempotent=True)
    for u in cfg.users:
        argv = ["useradd", "--create-home", "--shell", u.shell]
        if u.groups:
            argv += ["--groups", ",".join(u.groups)]
        b.chroot(f"add-{u.name}", *argv, u.name, skip_if=UserExists(cfg.install.target, u.name))
        if u.password_hash:
            b.chroot(
                f"password-{u.name}",
                "chpasswd",
                "--encrypted",
                stdin_secret=f"password:{u.name}",
                idempotent=True,
            )
        if u.ssh_keys:
            b.mkdir(f"ssh-dir-{u.name}", f"/home/{u.name}/.ssh", 0o700, owner=u.name)
            b.write(
                f"keys-{u.name}",
                f"/home/{u.name}/.ssh/authorized_keys",
                files.authorized_keys(u.ssh_keys),
                0o600,
                owner=u.name,
            )
    b.mkdir("sudoers-dir", "/etc/sudoers.d", 0o750)
    b.write("sudoers", "/etc/sudoers.d/wheel", files.sudoers_wheel(), 0o440)
    return b.build()


def hostid(cfg: Config) -> Step:
    b = StepBuilder(cfg, "zfs.hostid", "generate the host id (random, at apply time)")
    path = b.t("/etc/hostid")
    # The value is made when this runs, so the plan stays deterministic.
    b.run("zgenhostid", "zgenhostid", "-o", path, skip_if=PathExists(path))
    return b.build()
