"""The whole install as one ordered, typed plan: a pure function of the config."""

from __future__ import annotations

from installer import identity
from installer.config import Config
from installer.ops import Plan, Step
from installer.steps import (
    boot,
    desktop,
    disks,
    dom0,
    final,
    network,
    pool,
    stage,
    swap,
    system,
    zfs,
)


def build_plan(cfg: Config) -> Plan:
    steps: list[Step] = []
    steps += disks.steps(cfg)
    steps += pool.steps(cfg)
    steps += stage.steps(cfg)
    steps.append(system.chroot_mounts(cfg))
    steps += system.portage(cfg)
    steps.append(system.base(cfg))
    steps.append(system.hostid(cfg))
    steps.append(zfs.config_step(cfg))
    steps += zfs.package_steps(cfg)
    steps.append(zfs.initramfs(cfg))
    steps.append(zfs.services(cfg))
    steps += swap.steps(cfg)
    steps += network.firewall(cfg)
    steps += network.sshd(cfg)
    steps += network.dhcp(cfg)
    steps.append(system.users(cfg))
    steps += desktop.steps(cfg)
    steps += dom0.steps(cfg)
    steps += boot.steps(cfg)
    steps += final.steps(cfg)
    _check_unique(steps)
    return Plan(tuple(steps), notes=_notes(cfg))


def _check_unique(steps: list[Step]) -> None:
    seen: set[str] = set()
    for s in steps:
        for op in s.ops:
            if op.id in seen:
                raise AssertionError(f"duplicate operation id {op.id}")
            seen.add(op.id)


def _notes(cfg: Config) -> tuple[str, ...]:
    notes = [
        f"profile {cfg.gentoo.variant.profile}, stage3 {cfg.gentoo.variant.stage3}, "
        f"init {cfg.init}, {'merged' if cfg.gentoo.variant.merged_usr else 'split'} /usr",
        f"disks ({cfg.disks.layout}): {', '.join(cfg.disks.devices)}"
        + (" -- WIPED" if cfg.disks.wipe else ""),
    ]
    for dev in cfg.disks.devices:
        if identity.kernel_name(dev):
            notes.append("warning: " + identity.kernel_name_warning(dev))
    if cfg.encrypted:
        src = cfg.pool.encryption.keysource
        notes.append(
            f"ZFS native encryption, key from {'a prompt' if src == 'prompt' else 'a file'}"
        )
    if cfg.swap.mode == "zvol":
        notes.append(
            "swap on a zvol: accepted risk of deadlock under memory pressure (OpenZFS 7734)"
        )
    if cfg.bootloader.kind == "zfsbootmenu" and not cfg.bootloader.zbm_sha256:
        notes.append("the ZFSBootMenu image is not pinned (set bootloader.zbm_sha256 to pin it)")
    if cfg.firewall.enabled and cfg.sshd.enabled and not cfg.firewall.ssh_sources:
        notes.append("firewall.ssh_sources is empty: SSH is reachable from nowhere")
    return tuple(notes)
