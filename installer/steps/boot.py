"""ZFSBootMenu on every ESP, a firmware boot entry per disk, the kernel command line."""

from __future__ import annotations

from installer import files
from installer.config import Config
from installer.files import ESP_PART, esp_label, esp_mountpoint
from installer.ops import Fetch, Probe, Step
from installer.steps.base import StepBuilder

LOADER = "\\EFI\\zbm\\zfsbootmenu.EFI"


def steps(cfg: Config) -> list[Step]:
    if cfg.bootloader.kind == "none":
        return []
    bl = cfg.bootloader
    pool = cfg.pool.name
    b = StepBuilder(cfg, "boot.zfsbootmenu", "install ZFSBootMenu and its boot entries")
    efi = f"{cfg.install.work_dir}/zfsbootmenu.EFI"
    b.add(Fetch(b.oid("fetch"), bl.zbm_url, efi, bl.zbm_sha256))
    for i, _disk in enumerate(cfg.disks.devices):
        mp = esp_mountpoint(i)
        b.mkdir(f"esp{i}-zbm-dir", f"{mp}/EFI/zbm")
        b.copy(f"esp{i}-zbm", efi, f"{mp}/EFI/zbm/zfsbootmenu.EFI")
        # The removable-media path too, for firmware that forgets its entries.
        b.mkdir(f"esp{i}-fallback-dir", f"{mp}/EFI/BOOT")
        b.copy(f"esp{i}-fallback", efi, f"{mp}/EFI/BOOT/BOOTX64.EFI")
    b.run(
        "commandline",
        "zfs",
        "set",
        f"org.zfsbootmenu:commandline={files.kernel_commandline(cfg)}",
        f"{pool}/ROOT",
        idempotent=True,
    )
    for i, disk in enumerate(cfg.disks.devices):
        label = f"ZFSBootMenu ({esp_label(i)})"
        b.run(
            f"efi-entry{i}",
            "efibootmgr",
            "--create",
            "--disk",
            disk,
            "--part",
            str(ESP_PART),
            "--label",
            label,
            "--loader",
            LOADER,
            skip_if=Probe(("efibootmgr",), contains=label),
        )
    return [b.build()]
