"""The pool, its boot environment and datasets; import, keys and mounts."""

from __future__ import annotations

from installer.config import Config
from installer.files import ZFS_PART, partition_device, size_arg, zvol_swap
from installer.ops import Probe, RemoveFile, Step, WriteSecret
from installer.steps.base import StepBuilder, pool_imported, zfs_exists, zfs_mounted

PASSPHRASE = "zfs-passphrase"


def work_key(cfg: Config) -> str:
    return f"{cfg.install.work_dir}/{cfg.pool.name}.key"


def key_source(cfg: Config) -> str:
    """Where the key is while installing: the operator's key file, or the
    passphrase written to the work directory."""
    enc = cfg.pool.encryption
    return enc.key_file if enc.keysource == "file" and enc.key_file else work_key(cfg)


def create_argv(cfg: Config) -> tuple[str, ...]:
    p = cfg.pool
    argv = [
        "zpool",
        "create",
        "-o",
        f"ashift={p.ashift}",
        "-o",
        f"autotrim={'on' if p.autotrim else 'off'}",
        "-O",
        f"acltype={p.acltype}",
        "-O",
        f"xattr={p.xattr}",
        "-O",
        f"compression={p.compression}",
        "-O",
        "relatime=on",
        "-O",
        "dnodesize=auto",
        "-O",
        "canmount=off",
        "-O",
        "mountpoint=none",
    ]
    if p.encryption.enabled:
        argv += [
            "-O",
            f"encryption={p.encryption.cipher}",
            "-O",
            "keyformat=passphrase",
            "-O",
            f"keylocation=file://{key_source(cfg)}",
        ]
    argv += ["-R", cfg.install.target, p.name]
    if cfg.disks.layout == "mirror":
        argv.append("mirror")
    argv += [partition_device(d, ZFS_PART) for d in cfg.disks.devices]
    return tuple(argv)


def steps(cfg: Config) -> list[Step]:
    out = []
    pool = cfg.pool.name
    enc = cfg.pool.encryption

    b = StepBuilder(cfg, "pool.create", f"create the pool {pool}")
    if enc.enabled and enc.keysource == "prompt":
        b.add(WriteSecret(b.oid("work-key"), work_key(cfg), PASSPHRASE, 0o600))
    b.run("create", *create_argv(cfg), skip_if=pool_imported(pool))
    if enc.enabled and enc.keysource == "prompt":
        # The pool has the key now; the new system gets its copy from the
        # secret itself (zfs.config), and a resumed import asks again.
        b.add(RemoveFile(b.oid("remove-work-key"), work_key(cfg)))
    out.append(b.build())

    b = StepBuilder(cfg, "pool.import", f"import {pool} under {cfg.install.target}", session=True)
    b.run(
        "import",
        "zpool",
        "import",
        "-N",
        "-R",
        cfg.install.target,
        pool,
        skip_if=pool_imported(pool),
    )
    if enc.enabled:
        available = Probe(("zfs", "get", "-H", "-o", "value", "keystatus", pool), "available")
        if enc.keysource == "file":
            b.run(
                "load-key",
                "zfs",
                "load-key",
                "-L",
                f"file://{key_source(cfg)}",
                pool,
                skip_if=available,
            )
        else:
            b.run(
                "load-key",
                "zfs",
                "load-key",
                "-L",
                "prompt",
                pool,
                skip_if=available,
                stdin_secret=PASSPHRASE,
            )
    out.append(b.build())

    be = cfg.boot_dataset
    b = StepBuilder(cfg, "pool.root", f"create the boot environment {be}")
    b.run(
        "root",
        "zfs",
        "create",
        "-o",
        "canmount=off",
        "-o",
        "mountpoint=none",
        f"{pool}/ROOT",
        skip_if=zfs_exists(f"{pool}/ROOT"),
    )
    # canmount=noauto: the boot environment is mounted by the initramfs (or by
    # ZFSBootMenu) as /, never by `zfs mount -a`.
    b.run(
        "be",
        "zfs",
        "create",
        "-o",
        "canmount=noauto",
        "-o",
        "mountpoint=/",
        be,
        skip_if=zfs_exists(be),
    )
    b.run("bootfs", "zpool", "set", f"bootfs={be}", pool, idempotent=True)
    out.append(b.build())

    b = StepBuilder(cfg, "pool.mount-root", f"mount {be} at {cfg.install.target}", session=True)
    b.run("mount", "zfs", "mount", be, skip_if=zfs_mounted(be))
    out.append(b.build())

    datasets: list[tuple[str, tuple[str, ...]]] = []
    if cfg.datasets.home:
        datasets.append((f"{pool}/home", ("-o", "mountpoint=/home")))
    vm = cfg.datasets.vm
    if vm.enabled:
        props: list[str] = ["-o", f"mountpoint={vm.mountpoint}"]
        for key, value in vm.properties:
            props += ["-o", f"{key}={value}"]
        datasets.append((f"{pool}/{vm.name}", tuple(props)))
    if datasets or cfg.swap.mode == "zvol":
        b = StepBuilder(cfg, "pool.datasets", "create the datasets")
        for name, options in datasets:
            b.run(
                f"create-{name.split('/')[-1]}",
                "zfs",
                "create",
                *options,
                name,
                skip_if=zfs_exists(name),
            )
        if cfg.swap.mode == "zvol":
            # The recipe from the original to-do list (with "throughput" spelled
            # right): synchronous writes, metadata-only caching, no snapshots.
            b.run(
                "create-swap",
                "zfs",
                "create",
                "-V",
                size_arg(cfg.swap.size),
                "-b",
                "4096",
                "-o",
                "logbias=throughput",
                "-o",
                "sync=always",
                "-o",
                "primarycache=metadata",
                "-o",
                "secondarycache=none",
                "-o",
                "com.sun:auto-snapshot=false",
                zvol_swap(cfg),
                skip_if=zfs_exists(zvol_swap(cfg)),
            )
        out.append(b.build())
    if datasets:
        b = StepBuilder(cfg, "pool.mount", "mount the datasets", session=True)
        for name, _props in datasets:
            b.run(f"mount-{name.split('/')[-1]}", "zfs", "mount", name, skip_if=zfs_mounted(name))
        out.append(b.build())
    return out
