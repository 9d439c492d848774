"""Fixtures for the installer tests: a throwaway signing key, signed synthetic
Gentoo artefacts, fake hosts and configs that point at them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from installer import config as config_mod
from installer import profiles

from . import fakehost, synth

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "install"
# A dom0 policy whose [host] keeps SSH open from what the install configs
# allow (the controller takes the baseline firewall over).
POLICY = (
    "# a test policy\n"
    '[host]\nssh_from = ["203.0.113.0/24", "10.0.0.0/8"]\n'
    '[domains.x]\npool = "10.10.0.0/24"\n'
)
TEST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKeyForTheInstallerTestsOnly0000000000 t@test"
TEST_HASH = "$6$testsalt$SecretHashValueForRedactionTestsXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
PASSPHRASE = "correct horse battery staple"


@dataclass
class Signing:
    home: Path
    fingerprint: str
    keyring: Path


@pytest.fixture(scope="session")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signing]:
    base = tmp_path_factory.mktemp("gpg")
    home = base / "home"
    fpr, keyring = synth.make_key(home)
    yield Signing(home, fpr, keyring)
    synth.kill_agent(home)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory, signing: Signing) -> synth.Artifacts:
    return synth.Artifacts(tmp_path_factory.mktemp("artifacts"), signing.home)


# ---------------------------------------------------------------- TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for test configs (tables, arrays of tables, scalars)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict) or (
            isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        ):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out += f"\n[{name}]\n" + to_toml(v, name + ".")
        else:
            for item in v:
                out += f"\n[[{name}]]\n" + to_toml(item, name + ".")
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- fake install


@dataclass
class Install:
    """One fake-host install: its config file, fake host and paths."""

    dir: Path
    host: fakehost.FakeHost
    config: Path
    target: Path
    work: Path
    disks: list[Path]
    data: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.work / "state.json"

    @property
    def log(self) -> Path:
        return self.work / "install.log"

    def cfg(self) -> config_mod.Config:
        return config_mod.load(str(self.config))

    def argv(self, *extra: str) -> list[str]:
        return ["apply", "--config", str(self.config), "--yes", *extra]


def variant_of(data: dict[str, Any]) -> profiles.Variant:
    g = data.get("gentoo", {})
    d = data.get("desktop", {})
    v = profiles.select(
        g.get("init", "openrc"),
        g.get("split_usr", False),
        "gnome" if d.get("enabled") else None,
        g.get("hardened", False),
    )
    assert isinstance(v, profiles.Variant), v
    return v


@pytest.fixture
def make_install(
    tmp_path: Path, artifacts: synth.Artifacts, signing: Signing, monkeypatch: pytest.MonkeyPatch
):
    """`make_install(**overrides) -> Install`: a fake host and a config aimed at it.

    PATH is set to the fake host's stand-ins only for the test's duration.
    """
    counter = iter(range(100))

    def make(
        overrides: dict[str, Any] | None = None,
        *,
        disk_size: int = 20 << 30,
        real_sgdisk: bool = False,
    ) -> Install:
        n = next(counter)
        base = tmp_path / f"install{n}"
        host = fakehost.make(base / "host", real_sgdisk=real_sgdisk)
        target, work = base / "target", base / "work"
        over = overrides or {}
        layout = over.get("disks", {}).get("layout", "single")
        disks = [base / f"disk{i}.img" for i in range(2 if layout == "mirror" else 1)]
        for d in disks:
            with open(d, "wb") as f:
                f.truncate(disk_size)
        (base / "policy.toml").write_text(POLICY)
        (base / "resolv.conf").write_text("nameserver 198.51.100.53\n")
        (base / "dom0-0.1.0-py3-none-any.whl").write_bytes(b"PK fake wheel")
        (base / "pool.key").write_text(PASSPHRASE + "\n")
        variant = variant_of(over)
        stage, stage_sig = artifacts.stage3(variant)
        snap, snap_sig = artifacts.snapshot()
        data: dict[str, Any] = {
            "install": {
                "target": str(target),
                "work_dir": str(work),
                "resolv_conf": str(base / "resolv.conf"),
            },
            "disks": {"devices": [str(d) for d in disks]},
            "gentoo": {
                "keyring": str(signing.keyring),
                "stage3": {
                    "file": str(stage),
                    "signature": str(stage_sig),
                    "fingerprints": [signing.fingerprint],
                },
                "snapshot": {
                    "file": str(snap),
                    "signature": str(snap_sig),
                    "fingerprints": [signing.fingerprint],
                },
            },
            "users": [
                {
                    "name": "admin",
                    "groups": ["wheel", "kvm", "libvirt"],
                    "ssh_keys": [TEST_KEY],
                    "password_hash": TEST_HASH,
                }
            ],
            "firewall": {"ssh_sources": ["203.0.113.0/24"]},
            "bootloader": {"zbm_url": (base / "zbm.EFI").as_uri()},
            "dom0": {
                "policy": str(base / "policy.toml"),
                "wheel": str(base / "dom0-0.1.0-py3-none-any.whl"),
            },
        }
        (base / "zbm.EFI").write_bytes(b"MZ fake zfsbootmenu")
        data = merge(data, over)
        enc = data.get("pool", {}).get("encryption", {})
        if enc.get("keysource") == "file":
            enc["key_file"] = str(base / "pool.key")
        cfg_path = base / "install.toml"
        cfg_path.write_text(to_toml(data))
        monkeypatch.setenv("PATH", host.path_env)
        monkeypatch.delenv("DOM0_INSTALL_FAULT", raising=False)
        return Install(base, host, cfg_path, target, work, disks, data)

    return make


@pytest.fixture
def passphrase_file(tmp_path: Path) -> str:
    p = tmp_path / "passphrase"
    p.write_text(PASSPHRASE + "\n")
    os.chmod(p, 0o600)
    return str(p)


def mini_config(tmp: Path, over: dict[str, Any] | None = None) -> config_mod.Config:
    """A parsed config with its target and work directory in `tmp` (nothing is created)."""
    data: dict[str, Any] = {
        "install": {"target": str(tmp / "target"), "work_dir": str(tmp / "work")},
        "disks": {
            "devices": [str(tmp / "disk.img")]
            + (
                [str(tmp / "disk1.img")]
                if (over or {}).get("disks", {}).get("layout") == "mirror"
                else []
            )
        },
        "users": [{"name": "admin", "ssh_keys": [TEST_KEY]}],
        "firewall": {"ssh_sources": ["203.0.113.0/24"]},
        "dom0": {"policy": str(tmp / "policy.toml"), "wheel": str(tmp / "d-0-py3-none-any.whl")},
    }
    return config_mod.parse(merge(data, over or {}), source="t.toml")


def executor(cfg: config_mod.Config, tmp: Path, path: str = "/usr/sbin:/usr/bin:/sbin:/bin"):
    """An executor for calling single operations directly, with the real tools."""
    from installer.execute import Executor, Secrets
    from installer.plan import build_plan

    os.makedirs(cfg.install.work_dir, exist_ok=True)
    return Executor(
        cfg,
        build_plan(cfg),
        state_path=str(tmp / "state.json"),
        log_path=str(tmp / "log"),
        secrets=Secrets({}),
        config_path="t.toml",
        env={"PATH": path},
    )
