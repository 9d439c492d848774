"""Validate the result, then unmount everything and export the pool cleanly, so
the new system imports it at boot as its own."""

from __future__ import annotations

from installer.config import Config
from installer.files import esp_mountpoint
from installer.ops import Probe, Step, Validate
from installer.steps.base import StepBuilder, not_mounted


def steps(cfg: Config) -> list[Step]:
    out = []
    b = StepBuilder(cfg, "final.validate", "validate the installed system")
    b.add(Validate(b.oid("validate"), cfg.install.target))
    out.append(b.build())
    if not cfg.install.export_pool:
        return out
    b = StepBuilder(cfg, "final.export", f"unmount and export {cfg.pool.name}")
    t = b.t
    mps = []
    if cfg.bootloader.kind != "none":
        mps += [esp_mountpoint(i) for i in range(len(cfg.disks.devices))]
    mps += ["/run", "/dev", "/sys", "/proc"]
    for mp in mps:
        b.run(
            f"umount{mp.replace('/', '-')}",
            "umount",
            "--recursive",
            t(mp),
            skip_if=not_mounted(t(mp)),
        )
    pool = cfg.pool.name
    b.run(
        "export",
        "zpool",
        "export",
        pool,
        skip_if=Probe(("zpool", "list", "-H", "-o", "name", pool), invert=True),
    )
    out.append(b.build())
    return out
