"""install.toml: defaults, every problem on its own line, exit code 2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from installer import config
from installer.cli import main
from installer.errors import ConfigError

from .conftest import to_toml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "install"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDom0ExampleKeyForTheDocsOnlyNotARealKey00 a@b"
BASE: dict[str, Any] = {
    "disks": {"devices": ["/dev/sda"]},
    "users": [{"name": "admin", "ssh_keys": [KEY]}],
    "firewall": {"ssh_sources": ["10.0.0.0/8"]},
    "dom0": {"policy": "/root/policy.toml", "wheel": "/root/dom0-0.1.0-py3-none-any.whl"},
}
LINE = re.compile(r"^\S+\.toml: [a-z_.\[\]0-9]*: .+$|^\S+\.toml: .+$")


def parse(**over: Any) -> config.Config:
    data = {**BASE, **over}
    return config.parse(data, source="t.toml", base_dir="/cfg")


def problems(**over: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse(**over)
    return e.value.lines()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.stem)
def test_examples_parse(path: Path) -> None:
    cfg = config.load(str(path))
    assert cfg.gentoo.variant.profile.startswith("default/linux/amd64/23.0")


def test_defaults() -> None:
    cfg = parse()
    assert cfg.install.target == "/mnt/gentoo"
    assert cfg.pool.name == "zroot" and cfg.pool.ashift == 12 and cfg.pool.xattr == "sa"
    assert cfg.boot_dataset == "zroot/ROOT/gentoo"
    assert cfg.swap.mode == "zram"
    assert cfg.bootloader.kind == "zfsbootmenu"
    assert not cfg.desktop.enabled
    assert cfg.init == "openrc" and cfg.gentoo.variant.merged_usr
    assert cfg.gentoo.stage3.fingerprints == (config.RELENG_FINGERPRINT,)
    assert cfg.gentoo.snapshot.fingerprints == (config.SNAPSHOT_FINGERPRINT,)
    assert cfg.zfs.arc_max == 4 * config.GIB
    assert dict(cfg.datasets.vm.properties)["recordsize"] == "64K"


def test_relative_paths_are_taken_from_the_config_directory() -> None:
    cfg = parse(dom0={"policy": "policy.toml", "wheel": "dist/dom0-0.1.0-py3-none-any.whl"})
    assert cfg.dom0.policy == "/cfg/policy.toml"
    assert cfg.dom0.wheel == "/cfg/dist/dom0-0.1.0-py3-none-any.whl"


def test_many_problems_one_line_each() -> None:
    lines = problems(
        disks={"devices": ["sda"], "layout": "raid"},
        pool={"ashift": 20, "name": "mirror", "colour": "blue"},
        swap={"mode": "zvol"},
        system={"hostname": "not a host"},
        firewall={"ssh_sources": ["10.0.0.1/8"]},
    )
    text = "\n".join(lines)
    for needle in (
        "t.toml: disks.devices[1]: 'sda' is not an absolute device path",
        "t.toml: disks.layout: 'raid' is not allowed, expected one of: single, mirror",
        "t.toml: pool.ashift: 20 is out of range, expected 9..16",
        "t.toml: pool.name: 'mirror' is reserved by ZFS",
        "t.toml: pool.colour: unknown key, expected one of:",
        "t.toml: swap.mode: swap on a zvol can deadlock under memory pressure (OpenZFS issue 7734)",
        "t.toml: system.hostname: 'not a host' is not a valid host name",
        "t.toml: firewall.ssh_sources[1]: '10.0.0.1/8': 10.0.0.1/8 has host bits set",
    ):
        assert needle in text, needle
    for line in lines:
        assert "\n" not in line and LINE.match(line), line


def test_zvol_needs_the_explicit_risk_acceptance() -> None:
    assert parse(swap={"mode": "zvol", "accept_zvol_swap_risk": True}).swap.mode == "zvol"
    assert any("accept_zvol_swap_risk = true" in p for p in problems(swap={"mode": "zvol"}))
    assert any("only applies" in p for p in problems(swap={"accept_zvol_swap_risk": True}))


def test_deprecated_profile_is_refused_with_its_successor() -> None:
    lines = problems(gentoo={"profile": "default/linux/amd64/17.1/desktop/gnome"})
    assert lines == [
        "t.toml: gentoo.profile: default/linux/amd64/17.1/desktop/gnome is a deprecated pre-23.0 "
        "profile, expected its 23.0 successor default/linux/amd64/23.0/split-usr/desktop/gnome"
    ]


def test_explicit_profile_sets_and_checks_the_rest() -> None:
    cfg = parse(gentoo={"profile": "default/linux/amd64/23.0/systemd"})
    assert cfg.init == "systemd"
    lines = problems(gentoo={"profile": "default/linux/amd64/23.0/systemd", "init": "openrc"})
    assert any("gentoo.init: 'openrc' contradicts" in x for x in lines)
    lines = problems(gentoo={"profile": "default/linux/amd64/23.0/llvm"})
    assert any("is a known 23.0 profile but not one the installer supports" in x for x in lines)
    lines = problems(gentoo={"profile": "default/linux/amd64/23.0/desktop/gnome"})
    assert any("is a desktop profile but desktop.enabled = false" in x for x in lines)


def test_impossible_gentoo_combination() -> None:
    lines = problems(gentoo={"init": "systemd", "split_usr": True})
    assert lines == [
        "t.toml: gentoo: systemd needs a merged /usr (systemd >= 255); 23.0 has "
        "no split-usr systemd profile"
    ]


def test_stage3_file_must_match_the_variant() -> None:
    lines = problems(
        gentoo={
            "init": "openrc",
            "stage3": {"file": "/m/stage3-amd64-systemd-20250101T000000Z.tar.xz"},
        }
    )
    assert any("gentoo.stage3.file: is a amd64-systemd stage3" in x for x in lines)


def test_secrets_are_never_echoed() -> None:
    lines = problems(users=[{"name": "admin", "ssh_keys": [KEY], "password_hash": "hunter2!"}])
    assert all("hunter2" not in x for x in lines)
    assert any("users[1].password_hash: not a crypt(3) hash" in x for x in lines)


def test_sshd_needs_a_key() -> None:
    lines = problems(users=[{"name": "admin"}])
    assert any(x.startswith("t.toml: users: sshd is key-only") for x in lines)
    cfg = parse(users=[], sshd={"enabled": False})
    assert not cfg.sshd.enabled


def test_mirror_needs_two_disks_and_target_is_never_root() -> None:
    lines = problems(disks={"devices": ["/dev/sda"], "layout": "mirror"}, install={"target": "/"})
    assert any("layout 'mirror' takes two or more devices" in x for x in lines)
    assert any("install.target: '/' cannot be the target" in x for x in lines)


def test_encryption_key_file_rules() -> None:
    lines = problems(pool={"encryption": {"enabled": True, "keysource": "file"}})
    assert any("pool.encryption.key_file: missing" in x for x in lines)
    cfg = parse(pool={"encryption": {"enabled": True, "keysource": "file", "key_file": "k.key"}})
    assert cfg.pool.encryption.key_file == "/cfg/k.key"


def test_types_are_checked() -> None:
    lines = problems(disks={"devices": "/dev/sda"}, swap={"size": "lots"})
    assert "t.toml: disks.devices: expected an array, got a string" in lines
    assert any(x.startswith("t.toml: swap.size: 'lots' is not a size") for x in lines)


def test_sizes() -> None:
    assert config.parse_size("8G") == 8 * config.GIB
    assert config.parse_size("512MiB") == 512 * config.MIB
    assert config.parse_size(4096) == 4096
    assert config.parse_size("-1") is None and config.parse_size(True) is None
    assert config.format_size(8 * config.GIB) == "8G"


def test_toml_syntax_error_gives_its_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[disks]\ndevices = ["/dev/sda"]\nlayout = \n')
    assert main(["plan", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{bad}: line 3, column 10: invalid TOML: Invalid value"]


def test_cli_bad_config_exit_2_one_line_per_problem(tmp_path: Path, capsys) -> None:
    path = tmp_path / "install.toml"
    path.write_text(to_toml({**BASE, "swap": {"mode": "zvol"}, "pool": {"ashift": 3}}))
    assert main(["plan", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"{path}: ") for line in err)
    assert "Traceback" not in "\n".join(err)


def test_missing_config_file(capsys) -> None:
    assert main(["validate", "--config", "/nonexistent/install.toml", "--root", "/tmp"]) == 2
    err = capsys.readouterr().err
    assert err == "/nonexistent/install.toml: cannot read the config: No such file or directory\n"


_scalar = st.one_of(st.booleans(), st.integers(-5, 1 << 40), st.text(max_size=12))
_value = st.recursive(
    _scalar,
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(
            st.sampled_from(["devices", "mode", "name", "enabled", "x"]), c, max_size=3
        )
    ),
    max_leaves=8,
)
_sections = st.sampled_from(
    [
        "install",
        "disks",
        "pool",
        "datasets",
        "system",
        "users",
        "gentoo",
        "swap",
        "firewall",
        "sshd",
        "desktop",
        "dom0",
        "kernel",
        "zfs",
    ]
)


@given(st.dictionaries(_sections, _value, max_size=6))
@settings(max_examples=150, deadline=None)
def test_any_input_gives_a_config_or_problems_never_a_crash(data) -> None:
    try:
        config.parse(data, source="f.toml")
    except ConfigError as e:
        assert e.problems
        for line in e.lines():
            assert line.startswith("f.toml: ") and "\n" not in line
