"""The baseline firewall, key-only sshd and DHCP on the WAN.

The firewall is fail-closed: it loads before any interface is up, falls back
to an emergency ruleset if the baseline does not load, and sshd/dhcpcd refuse
to start without it. The dom0 controller takes it over once it runs."""

from __future__ import annotations

from installer import files
from installer.config import Config
from installer.ops import Step
from installer.steps.base import StepBuilder


def _after_firewall(b: StepBuilder, cfg: Config, service: str) -> None:
    path, line = files.needs_firewall(cfg, service)
    if cfg.init == "openrc":
        b.ensure_line(f"needs-firewall-{service}", path, line)
    else:
        b.mkdir(f"dropin-dir-{service}", path.rsplit("/", 1)[0])
        b.write(f"needs-firewall-{service}", path, files.HEADER + line + "\n")


def firewall(cfg: Config) -> list[Step]:
    if not cfg.firewall.enabled:
        return []
    b = StepBuilder(cfg, "firewall", "nftables baseline, loaded at boot, fail-closed")
    b.mkdir("dir", "/etc/dom0")
    b.write("baseline", files.BASELINE_PATH, files.firewall_baseline(cfg))
    b.write("emergency", files.EMERGENCY_PATH, files.firewall_emergency())
    path, content, mode = files.firewall_service(cfg)
    b.write("service", path, content, mode)
    b.enable("firewall")
    if cfg.sshd.enabled:
        _after_firewall(b, cfg, "sshd")
    if cfg.network.dhcp:
        _after_firewall(b, cfg, "dhcpcd")
    return [b.build()]


def sshd(cfg: Config) -> list[Step]:
    if not cfg.sshd.enabled:
        return []
    b = StepBuilder(cfg, "sshd", f"key-only sshd on port {cfg.sshd.port}, enabled")
    b.mkdir("dropin-dir", "/etc/ssh/sshd_config.d")
    b.write("dropin", files.SSHD_DROPIN, files.sshd_dropin(cfg))
    b.ensure_line("include", "/etc/ssh/sshd_config", files.SSHD_INCLUDE)
    b.enable("sshd")
    return [b.build()]


def dhcp(cfg: Config) -> list[Step]:
    b = StepBuilder(
        cfg, "host.services", "enable libvirtd" + (" and dhcpcd" if cfg.network.dhcp else "")
    )
    b.enable("libvirtd")
    if cfg.network.dhcp:
        b.enable("dhcpcd")
    return [b.build()]
