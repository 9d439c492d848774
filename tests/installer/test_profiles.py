"""Gentoo profiles per major version: 23.0 selected, 17.x refused with its successor."""

from __future__ import annotations

import pytest

from installer import profiles

P = "default/linux/amd64"


@pytest.mark.parametrize(
    ("init", "split", "desktop", "hardened", "profile", "stage3"),
    [
        ("openrc", False, None, False, f"{P}/23.0", "amd64-openrc"),
        ("systemd", False, None, False, f"{P}/23.0/systemd", "amd64-systemd"),
        ("openrc", True, None, False, f"{P}/23.0/split-usr", "amd64-openrc-splitusr"),
        ("openrc", False, "gnome", False, f"{P}/23.0/desktop/gnome", "amd64-desktop-openrc"),
        (
            "systemd",
            False,
            "gnome",
            False,
            f"{P}/23.0/desktop/gnome/systemd",
            "amd64-desktop-systemd",
        ),
        (
            "openrc",
            True,
            "gnome",
            False,
            f"{P}/23.0/split-usr/desktop/gnome",
            "amd64-openrc-splitusr",
        ),
        ("openrc", False, None, True, f"{P}/23.0/hardened", "amd64-hardened-openrc"),
        ("systemd", False, None, True, f"{P}/23.0/hardened/systemd", "amd64-hardened-systemd"),
    ],
)
def test_select(init, split, desktop, hardened, profile, stage3) -> None:
    v = profiles.select(init, split, desktop, hardened)
    assert isinstance(v, profiles.Variant)
    assert (v.profile, v.stage3, v.merged_usr) == (profile, stage3, not split)
    assert v.profile in profiles.KNOWN_23


@pytest.mark.parametrize(
    ("init", "split", "desktop", "hardened", "why"),
    [
        ("systemd", True, None, False, "merged /usr"),
        ("openrc", False, "gnome", True, "desktop with hardened"),
        ("openrc", True, None, True, "split-usr hardened"),
    ],
)
def test_impossible_combinations(init, split, desktop, hardened, why) -> None:
    v = profiles.select(init, split, desktop, hardened)
    assert isinstance(v, str) and why in v


# From the `deprecated` files in ::gentoo (first line = the replacement).
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (f"{P}/17.1", f"{P}/23.0/split-usr"),
        (f"{P}/17.1/desktop", f"{P}/23.0/split-usr/desktop"),
        (f"{P}/17.1/desktop/gnome", f"{P}/23.0/split-usr/desktop/gnome"),
        (f"{P}/17.1/hardened", f"{P}/23.0/split-usr/hardened"),
        (f"{P}/17.1/no-multilib/hardened", f"{P}/23.0/split-usr/no-multilib/hardened"),
        (f"{P}/17.1/systemd/merged-usr", f"{P}/23.0/systemd"),
        (f"{P}/17.1/systemd", f"{P}/23.0/systemd"),
        (f"{P}/17.1/desktop/gnome/systemd/merged-usr", f"{P}/23.0/desktop/gnome/systemd"),
        (f"{P}/17.1/desktop/plasma/systemd/merged-usr", f"{P}/23.0/desktop/plasma/systemd"),
        (f"{P}/17.1/selinux", f"{P}/23.0/split-usr/hardened/selinux"),
        (f"{P}/17.0", f"{P}/23.0/split-usr"),
    ],
)
def test_deprecated_profiles_name_their_successor(old: str, new: str) -> None:
    assert profiles.is_deprecated(old)
    assert profiles.deprecated_replacement(old) == new


def test_23_profiles_are_not_deprecated() -> None:
    for p in profiles.KNOWN_23:
        assert profiles.deprecated_replacement(p) is None


def test_stage3_names() -> None:
    f = profiles.stage3_variant_of
    assert f("stage3-amd64-openrc-20250105T170325Z.tar.xz") == "amd64-openrc"
    assert f("stage3-amd64-openrc-splitusr-20250105T170325Z.tar.xz") == "amd64-openrc-splitusr"
    assert f("stage3-amd64-desktop-systemd-20250105T170325Z.tar.xz") == "amd64-desktop-systemd"
    assert f("my-stage.tar.xz") is None
