"""ZFS in the installed system: initramfs contents, ARC cap, kernel and module
packages that fit together, and the import/mount services."""

from __future__ import annotations

from installer import files
from installer.config import Config
from installer.ops import Step
from installer.steps.base import StepBuilder
from installer.steps.pool import PASSPHRASE, key_source


def emerge(b: StepBuilder, name: str, atoms: tuple[str, ...]) -> None:
    # --noreplace: an atom already installed is left alone, so a resumed step
    # never rebuilds what is there.
    b.chroot(name, "emerge", "--noreplace", "--quiet-build=y", *atoms, idempotent=True)


def config_step(cfg: Config) -> Step:
    b = StepBuilder(cfg, "zfs.config", "dracut and module settings; the key in the new system")
    b.mkdir("dracut-dir", "/etc/dracut.conf.d")
    b.write("dracut", "/etc/dracut.conf.d/dom0-zfs.conf", files.dracut_conf(cfg))
    b.mkdir("modprobe-dir", "/etc/modprobe.d")
    b.write("modprobe", "/etc/modprobe.d/zfs.conf", files.modprobe_zfs(cfg))
    enc = cfg.pool.encryption
    if enc.enabled:
        b.mkdir("zfs-dir", "/etc/zfs")
        key = files.key_path(cfg)
        if enc.keysource == "file":
            b.copy("key", key_source(cfg), key, 0o600, secret=True)
        else:
            b.write_secret("key", key, PASSPHRASE, 0o600)
        b.run(
            "keylocation", "zfs", "set", f"keylocation=file://{key}", cfg.pool.name, idempotent=True
        )
    return b.build()


def package_steps(cfg: Config) -> list[Step]:
    out = []
    b = StepBuilder(
        cfg,
        "packages.kernel",
        f"install the kernel ({cfg.kernel.package}, {cfg.kernel.series} series) and firmware",
    )
    emerge(b, "emerge", files.packages_kernel(cfg))
    out.append(b.build())
    b = StepBuilder(cfg, "packages.zfs", "install ZFS (userland and the module for the kernel)")
    emerge(b, "emerge", files.packages_zfs())
    out.append(b.build())
    b = StepBuilder(cfg, "packages.host", "install the host packages (libvirt, nftables, ...)")
    emerge(b, "emerge", files.packages_host(cfg))
    out.append(b.build())
    if cfg.desktop.enabled:
        b = StepBuilder(cfg, "packages.desktop", "install GNOME, GDM and virt-manager")
        emerge(b, "emerge", files.packages_desktop())
        out.append(b.build())
    return out


def initramfs(cfg: Config) -> Step:
    b = StepBuilder(cfg, "kernel.initramfs", "rebuild the initramfs with ZFS, hostid and ARC cap")
    b.chroot("config", "emerge", "--config", f"sys-kernel/{cfg.kernel.package}", idempotent=True)
    return b.build()


def services(cfg: Config) -> Step:
    b = StepBuilder(cfg, "zfs.services", f"enable ZFS import and mount for {cfg.init}")
    for key in files.services_for(cfg):
        b.enable(key)
    return b.build()
