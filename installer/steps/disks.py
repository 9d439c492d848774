"""Preflight, disk checks, partitioning and the ESP / plain swap file systems."""

from __future__ import annotations

from installer.config import Config
from installer.files import (
    ESP_PART,
    SWAP_PART,
    ZFS_PART,
    esp_label,
    partition_device,
    size_arg,
)
from installer.ops import (
    CheckDisk,
    MakeDir,
    PartitionExists,
    RequireFiles,
    RequireTools,
    Step,
    WipeDisk,
)
from installer.steps.base import StepBuilder, fs_type


def required_tools(cfg: Config) -> tuple[str, ...]:
    tools = [
        "sgdisk",
        "wipefs",
        "partprobe",
        "udevadm",
        "blkid",
        "mkfs.vfat",
        "zpool",
        "zfs",
        "zgenhostid",
        "gpg",
        "tar",
        "mount",
        "umount",
        "mountpoint",
        "chroot",
    ]
    if cfg.swap.mode in ("partition", "zvol"):
        tools.append("mkswap")
    if cfg.bootloader.kind == "zfsbootmenu":
        tools.append("efibootmgr")
    return tuple(tools)


def input_files(cfg: Config) -> tuple[str, ...]:
    """Files of the live system the plan reads; checked before anything changes."""
    files = [cfg.gentoo.keyring, cfg.install.resolv_conf, cfg.dom0.policy]
    for src, ext in ((cfg.gentoo.stage3, ".asc"), (cfg.gentoo.snapshot, ".gpgsig")):
        if src.file:
            files += [src.file, src.signature or src.file + ext]
    if cfg.encrypted and cfg.pool.encryption.keysource == "file":
        files.append(cfg.pool.encryption.key_file or "")
    if cfg.dom0.wheel:
        files.append(cfg.dom0.wheel)
    return tuple(files)


def steps(cfg: Config) -> list[Step]:
    out = []
    b = StepBuilder(cfg, "preflight", "check tools and input files; make the work directory")
    b.add(RequireTools(b.oid("tools"), required_tools(cfg)))
    b.add(RequireFiles(b.oid("files"), input_files(cfg)))
    b.add(MakeDir(b.oid("work-dir"), cfg.install.work_dir, 0o700))
    b.add(MakeDir(b.oid("target-dir"), cfg.install.target, 0o755))
    out.append(b.build())

    swap_partition = cfg.swap.mode == "partition"
    for i, disk in enumerate(cfg.disks.devices):
        parts = "ESP, ZFS" + (", swap" if swap_partition else "")
        b = StepBuilder(cfg, f"disk{i}", f"check and partition {disk} ({parts})")
        b.add(CheckDisk(b.oid("check"), disk, cfg.disks.wipe))
        if cfg.disks.wipe:
            b.add(WipeDisk(b.oid("wipe-labels"), disk))
            b.run("wipefs", "wipefs", "--all", "--force", disk, idempotent=True)
            b.run("zap", "sgdisk", "--zap-all", disk, idempotent=True)
        # One sgdisk run per disk: the table is written once, complete (sgdisk
        # applies its options in order), so a crash cannot leave half of it.
        argv = [
            "sgdisk",
            f"--new={ESP_PART}:1M:+{size_arg(cfg.disks.esp_size)}",
            f"--typecode={ESP_PART}:EF00",
            f"--change-name={ESP_PART}:{esp_label(i)}",
        ]
        if swap_partition:
            # At the end of the disk, so the pool partition is one contiguous
            # block between the ESP and the swap.
            argv += [
                f"--new={SWAP_PART}:-{size_arg(cfg.swap.size)}:0",
                f"--typecode={SWAP_PART}:8200",
                f"--change-name={SWAP_PART}:dom0-swap{i}",
            ]
        argv += [
            f"--new={ZFS_PART}:0:0",
            f"--typecode={ZFS_PART}:BF00",
            f"--change-name={ZFS_PART}:dom0-zfs{i}",
            disk,
        ]
        b.run("partition", *argv, skip_if=PartitionExists(disk, ZFS_PART))
        out.append(b.build())

    b = StepBuilder(cfg, "disks.settle", "let the kernel and udev see the new partitions")
    b.run("partprobe", "partprobe", *cfg.disks.devices, idempotent=True)
    b.run("udev-settle", "udevadm", "settle", idempotent=True)
    out.append(b.build())

    b = StepBuilder(
        cfg,
        "disks.format",
        "make the ESP file systems"
        + (" and plain swap" if swap_partition and not cfg.encrypted else ""),
    )
    for i, disk in enumerate(cfg.disks.devices):
        esp = partition_device(disk, ESP_PART)
        b.run(
            f"esp{i}",
            "mkfs.vfat",
            "-F",
            "32",
            "-n",
            f"DOM0ESP{i}",
            esp,
            skip_if=fs_type(esp, "vfat"),
        )
    if swap_partition and not cfg.encrypted:
        # With an encrypted pool the swap partitions get a random key at every
        # boot (dmcrypt/crypttab) and are formatted then, not here.
        for i, disk in enumerate(cfg.disks.devices):
            dev = partition_device(disk, SWAP_PART)
            b.run(f"swap{i}", "mkswap", "-L", f"dom0-swap{i}", dev, skip_if=fs_type(dev, "swap"))
    out.append(b.build())
    return out
