"""The desktop (off by default), built so GNOME does not ask for a second login.

The "double login" has three causes, each removed here: GDM autologin (the
keyring cannot be unlocked without the password), no PAM hook for the keyring
(pambase[gnome-keyring], gnome-keyring[pam]), and VMs on the qxl video model
(their Wayland greeter falls back to the login screen): a libvirt hook refuses
or flags qxl guests so they move to virtio."""

from __future__ import annotations

from installer import files
from installer.config import Config
from installer.ops import Step
from installer.steps.base import StepBuilder


def steps(cfg: Config) -> list[Step]:
    if not cfg.desktop.enabled:
        return []
    b = StepBuilder(cfg, "desktop", "GDM without autologin; keyring via PAM; virtio video hook")
    b.mkdir("gdm-dir", "/etc/gdm")
    b.write("gdm", files.GDM_CUSTOM, files.gdm_custom())
    if cfg.init == "openrc":
        b.write("dm", "/etc/conf.d/display-manager", files.display_manager_conf())
        b.enable("elogind")
    b.enable("display-manager")
    b.mkdir("hook-dir", "/etc/libvirt/hooks/qemu.d")
    b.write("video-hook", files.VIDEO_HOOK, files.video_hook(cfg), 0o755)
    return [b.build()]
