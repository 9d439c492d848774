"""Swap: zram (default), a partition (random-keyed when the pool is encrypted),
a zvol (only with accept_zvol_swap_risk), or none. Hibernation is off."""

from __future__ import annotations

from installer import files
from installer.config import Config
from installer.ops import Step
from installer.steps.base import StepBuilder, fs_type


def steps(cfg: Config) -> list[Step]:
    mode = cfg.swap.mode
    b = StepBuilder(cfg, "swap", f"swap: {mode}; hibernation off")
    if mode == "zram":
        path, content = files.zram_file(cfg)
        b.write("zram", path, content)
        b.enable("zram")
    elif mode == "partition" and cfg.encrypted:
        path, content = files.dmcrypt_file(cfg)
        b.write("crypt", path, content)
        b.enable("dmcrypt")
    elif mode == "zvol":
        dev = f"/dev/zvol/{files.zvol_swap(cfg)}"
        b.run("mkswap", "mkswap", "-f", dev, skip_if=fs_type(dev, "swap"))
    path, content = files.nohibernate_file(cfg)
    b.write("nohibernate", path, content)
    return [b.build()]
