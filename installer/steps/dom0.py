"""dom0 itself: the controller in a venv, its policy, its service."""

from __future__ import annotations

import posixpath

from installer import files
from installer.config import Config
from installer.ops import PathExists, Step
from installer.steps.base import StepBuilder


def steps(cfg: Config) -> list[Step]:
    d = cfg.dom0
    b = StepBuilder(
        cfg, "dom0", f"install the dom0 controller into {d.venv}, its policy and service"
    )
    b.mkdir("etc-dir", "/etc/dom0")
    b.copy("policy", d.policy, files.POLICY_PATH, 0o640)
    b.mkdir("state-dir", d.state_dir, 0o700)
    # --system-site-packages: the nftables bindings come from
    # net-firewall/nftables[python], not from PyPI.
    b.chroot(
        "venv",
        "python3",
        "-m",
        "venv",
        "--system-site-packages",
        d.venv,
        skip_if=PathExists(b.t(f"{d.venv}/bin/python")),
    )
    if d.wheel:
        inside = f"/var/tmp/dom0/{posixpath.basename(d.wheel)}"
        b.mkdir("wheel-dir", "/var/tmp/dom0", 0o700)
        b.copy("wheel", d.wheel, inside)
        spec = inside
    else:
        spec = d.package or "dom0"
    b.chroot("pip", f"{d.venv}/bin/pip", "install", "--upgrade", spec, idempotent=True)
    # The unit or init script is the one shipped in init/, unchanged; only
    # the small settings file next to it depends on the config.
    for name, (path, content, mode) in zip(
        ("settings", "service", "logrotate"), files.dom0_files(cfg), strict=False
    ):
        b.write(name, path, content, mode)
    b.enable("dom0")
    return [b.build()]
