"""Gentoo profiles per major version: which 23.0 profile and stage3 fit a config.

Gentoo 23.0 (March 2024) replaced the 17.x profiles. In 23.0 every profile is
merged-usr (`/bin` -> `usr/bin`) unless its path says `split-usr`, and there is
no split-usr systemd profile (systemd >= 255 needs merged /usr). The 17.x
profiles are deprecated: the installer refuses them and names the 23.0
profile to use instead, following Gentoo's own `deprecated` files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ARCH = "amd64"
PREFIX = f"default/linux/{ARCH}"

# Every stable amd64 23.0 profile, used to check an explicitly configured
# profile and to suggest replacements for 17.x.
KNOWN_23 = frozenset(
    f"{PREFIX}/23.0{suffix}"
    for suffix in (
        "",
        "/systemd",
        "/desktop",
        "/desktop/systemd",
        "/desktop/gnome",
        "/desktop/gnome/systemd",
        "/desktop/plasma",
        "/desktop/plasma/systemd",
        "/no-multilib",
        "/no-multilib/systemd",
        "/no-multilib/hardened",
        "/no-multilib/hardened/systemd",
        "/no-multilib/hardened/selinux",
        "/no-multilib/hardened/selinux/systemd",
        "/llvm",
        "/llvm/systemd",
        "/hardened",
        "/hardened/systemd",
        "/hardened/selinux",
        "/hardened/selinux/systemd",
        "/split-usr",
        "/split-usr/desktop",
        "/split-usr/desktop/gnome",
        "/split-usr/desktop/plasma",
        "/split-usr/no-multilib",
        "/split-usr/no-multilib/selinux",
        "/split-usr/no-multilib/hardened",
        "/split-usr/no-multilib/hardened/selinux",
        "/split-usr/llvm",
        "/split-usr/hardened",
        "/split-usr/hardened/selinux",
    )
)


@dataclass(frozen=True)
class Variant:
    """One supported combination: the profile, the stage3 that matches it."""

    profile: str
    stage3: str  # the stage3 variant name, as in latest-stage3-<variant>.txt
    init: str  # "openrc" | "systemd"
    merged_usr: bool
    desktop: str | None  # "gnome" or None
    hardened: bool


def _v(suffix: str, stage3: str, init: str, merged: bool, desktop: str | None, hardened: bool):
    return Variant(f"{PREFIX}/23.0{suffix}", f"{ARCH}-{stage3}", init, merged, desktop, hardened)


# What dom0 installs. The split-usr desktop starts from the split-usr stage3
# (Gentoo builds no split-usr desktop stage); the desktop packages are built.
SUPPORTED: tuple[Variant, ...] = (
    _v("", "openrc", "openrc", True, None, False),
    _v("/systemd", "systemd", "systemd", True, None, False),
    _v("/split-usr", "openrc-splitusr", "openrc", False, None, False),
    _v("/desktop/gnome", "desktop-openrc", "openrc", True, "gnome", False),
    _v("/desktop/gnome/systemd", "desktop-systemd", "systemd", True, "gnome", False),
    _v("/split-usr/desktop/gnome", "openrc-splitusr", "openrc", False, "gnome", False),
    _v("/hardened", "hardened-openrc", "openrc", True, None, True),
    _v("/hardened/systemd", "hardened-systemd", "systemd", True, None, True),
)

_BY_PROFILE = {v.profile: v for v in SUPPORTED}


def select(init: str, split_usr: bool, desktop: str | None, hardened: bool) -> Variant | str:
    """The variant for these choices, or a sentence saying why there is none."""
    if init == "systemd" and split_usr:
        return "systemd needs a merged /usr (systemd >= 255); 23.0 has no split-usr systemd profile"
    if desktop and hardened:
        return "no stock 23.0 profile combines a desktop with hardened; choose one"
    if hardened and split_usr:
        return "Gentoo publishes no split-usr hardened stage3; use a merged /usr"
    for v in SUPPORTED:
        if (v.init, v.merged_usr, v.desktop, v.hardened) == (
            init,
            not split_usr,
            desktop,
            hardened,
        ):
            return v
    return "no supported 23.0 profile for this combination"  # pragma: no cover - table is total


def variant_for_profile(profile: str) -> Variant | None:
    return _BY_PROFILE.get(profile)


_OLD = re.compile(rf"^{re.escape(PREFIX)}/(1[0-9]\.[0-9])(/.*)?$")


def deprecated_replacement(profile: str) -> str | None:
    """For a 17.x (or older) profile, the 23.0 profile Gentoo says to use; else None.

    The mapping follows the `deprecated` files in ::gentoo: an OpenRC (split
    /usr) profile moves to its `23.0/split-usr/...` twin, a systemd
    `.../merged-usr` profile to `23.0/...` without `merged-usr`.
    """
    m = _OLD.match(profile)
    if not m:
        return None
    rest = [p for p in (m.group(2) or "").split("/") if p]
    systemd = "systemd" in rest
    rest = [p for p in rest if p not in ("merged-usr", "developer", "clang")]
    if "selinux" in rest and "hardened" not in rest:
        # 17.x had a plain selinux profile; in 23.0 SELinux lives under hardened.
        rest.insert(rest.index("selinux"), "hardened")
    if systemd:
        candidate = "/".join([PREFIX, "23.0", *rest])
    else:
        candidate = "/".join([PREFIX, "23.0", "split-usr", *rest])
    if candidate in KNOWN_23:
        return candidate
    # selinux without hardened, and other oddities: the nearest base profile.
    return f"{PREFIX}/23.0/systemd" if systemd else f"{PREFIX}/23.0/split-usr"


def is_deprecated(profile: str) -> bool:
    return _OLD.match(profile) is not None


_STAGE3_NAME = re.compile(r"^stage3-(?P<variant>[a-z0-9-]+)-\d{8}T\d{6}Z\.tar\.(xz|bz2|zst|gz)$")


def stage3_variant_of(filename: str) -> str | None:
    """`stage3-amd64-openrc-20240303T170409Z.tar.xz` -> `amd64-openrc`; None if unnamed."""
    m = _STAGE3_NAME.match(filename)
    return m.group("variant") if m else None
