"""The plan: golden files per variant, determinism, idempotence rules, no secrets.

Regenerate the golden files after an intended change with
`DOM0_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/installer/test_plan.py`
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from installer import config, files, identity
from installer.ops import CopyFile, Fetch, MakeDir, Run, Symlink, WriteFile, WriteSecret
from installer.paths import is_inside
from installer.plan import build_plan
from installer.render import plan_json, plan_text

HERE = Path(__file__).parent
EXAMPLES = HERE.parents[1] / "examples" / "install"
GOLDEN = HERE / "golden"
CONFIGS = sorted(EXAMPLES.glob("*.toml")) + sorted((HERE / "configs").glob("*.toml"))
UPDATE = os.environ.get("DOM0_UPDATE_GOLDEN") == "1"


def _load(path: Path) -> config.Config:
    return config.load(str(path))


def _name(path: Path) -> str:
    return f"{path.parent.name}-{path.stem}"


def _nowhere(device: str) -> identity.Disk:
    """Disk identities as on a machine without these disks: golden files do
    not depend on the disks of the machine running the tests."""
    return identity.identify(device, sys_root="/nonexistent", dev_root="/nonexistent")


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_golden_plan(path: Path) -> None:
    plan = build_plan(_load(path))
    texts = (plan_json(plan, identify=_nowhere), plan_text(plan, identify=_nowhere))
    for suffix, text in zip((".json", ".txt"), texts, strict=True):
        golden = GOLDEN / f"{_name(path)}{suffix}"
        if UPDATE:
            golden.parent.mkdir(exist_ok=True)
            golden.write_text(text)
        assert golden.exists(), f"no golden file {golden.name}: run with DOM0_UPDATE_GOLDEN=1"
        assert text == golden.read_text(), (
            f"the plan for {path.name} differs from {golden.name}; if intended, regenerate "
            "with DOM0_UPDATE_GOLDEN=1 and review the diff"
        )


def test_every_variant_has_a_golden_file() -> None:
    names = {p.stem for p in GOLDEN.glob("*.json")}
    assert names == {_name(p) for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_plan_is_deterministic_and_well_formed(path: Path) -> None:
    cfg = _load(path)
    a, b = build_plan(cfg), build_plan(_load(path))
    assert a.digest() == b.digest()
    ids = [op.id for _, op in a.ops()]
    assert len(ids) == len(set(ids)), "op ids are unique"
    for step, op in a.ops():
        assert op.id.startswith(step.id + "/")
        if isinstance(op, Run):
            # create-if-absent: a command is guarded, or harmless to repeat
            assert op.skip_if is not None or op.idempotent, op.id
            if step.session:
                assert op.skip_if is not None, f"session op {op.id} must have a guard"
        target = cfg.install.target
        for attr in ("path", "dest"):
            value = getattr(op, attr, None)
            if value and getattr(op, "root", None):
                assert is_inside(target, value), (op.id, value)
                assert value != target or op.kind == "extract", (op.id, value)
        if isinstance(op, WriteFile | WriteSecret | CopyFile | MakeDir | Symlink) and op.root:
            assert op.root == target


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_plan_holds_no_secret(path: Path) -> None:
    cfg = _load(path)
    plan = build_plan(cfg)
    text = plan_json(plan) + plan_text(plan)
    for value in cfg.secrets().values():
        assert value not in text
    assert "$6$" not in text


def _commands(plan) -> list[tuple[str, ...]]:
    return [c for _, op in plan.ops() for c in op.commands()]


def _writes(plan) -> dict[str, str]:
    return {op.path: op.content for _, op in plan.ops() if isinstance(op, WriteFile)}


def test_openrc_plan_has_the_to_do_list_items() -> None:
    cfg = _load(EXAMPLES / "openrc.toml")
    plan = build_plan(cfg)
    cmds = _commands(plan)
    writes = _writes(plan)
    t = cfg.install.target
    # hostid generated at apply time (the plan only shows the command)
    assert ("zgenhostid", "-o", f"{t}/etc/hostid") in cmds
    # sshd enabled for OpenRC, key-only
    assert ("chroot", t, "rc-update", "add", "sshd", "default") in cmds
    assert "PasswordAuthentication no" in writes[f"{t}/etc/ssh/sshd_config.d/50-dom0.conf"]
    # firewall loaded at boot, fail-closed
    assert ("chroot", t, "rc-update", "add", "dom0-firewall", "boot") in cmds
    baseline = writes[f"{t}/etc/dom0/firewall-baseline.nft"]
    assert baseline.count("policy drop;") == 2 and "192.168.1.0/24" in baseline
    # zram swap by default, nothing in fstab
    assert ("chroot", t, "rc-update", "add", "zram-init", "boot") in cmds
    assert " swap " not in writes[f"{t}/etc/fstab"]
    # ZFS import/mount at boot, ARC cap, hostid in the initramfs
    for svc in ("zfs-import", "zfs-mount"):
        assert ("chroot", t, "rc-update", "add", svc, "boot") in cmds
    assert "zfs_arc_max=4294967296" in writes[f"{t}/etc/modprobe.d/zfs.conf"]
    assert "/etc/hostid" in writes[f"{t}/etc/dracut.conf.d/dom0-zfs.conf"]
    # no desktop: no display manager anywhere
    assert not any("gdm" in " ".join(c) for c in cmds)
    assert not any("gdm" in p for p in writes)
    # the dom0 controller and its service
    assert 'command="/opt/dom0/bin/dom0"' in writes[f"{t}/etc/init.d/dom0"]
    assert 'dom0_state="/var/lib/dom0"' in writes[f"{t}/etc/conf.d/dom0"]
    assert "copytruncate" in writes[f"{t}/etc/logrotate.d/dom0"]


def test_systemd_plan_enables_units() -> None:
    cfg = _load(EXAMPLES / "systemd.toml")
    cmds = _commands(build_plan(cfg))
    t = cfg.install.target
    for unit in (
        "sshd.service",
        "zfs-import-cache.service",
        "zfs-mount.service",
        "zfs.target",
        "dom0.service",
        "dom0-firewall.service",
    ):
        assert ("chroot", t, "systemctl", "enable", unit) in cmds
    assert not any(c[2:3] == ("rc-update",) for c in cmds)


def test_zvol_plan_uses_the_lists_recipe_with_hibernation_off() -> None:
    cfg = _load(EXAMPLES / "zvol.toml")
    plan = build_plan(cfg)
    cmds = _commands(plan)
    create = next(c for c in cmds if c[:3] == ("zfs", "create", "-V"))
    assert create == (
        "zfs",
        "create",
        "-V",
        "8G",
        "-b",
        "4096",
        "-o",
        "logbias=throughput",
        "-o",
        "sync=always",
        "-o",
        "primarycache=metadata",
        "-o",
        "secondarycache=none",
        "-o",
        "com.sun:auto-snapshot=false",
        "zroot/swap",
    )
    assert ("mkswap", "-f", "/dev/zvol/zroot/swap") in cmds
    writes = _writes(plan)
    t = cfg.install.target
    assert "/dev/zvol/zroot/swap  none  swap  discard  0 0" in writes[f"{t}/etc/fstab"]
    assert "AllowHibernation=no" in writes[f"{t}/etc/systemd/sleep.conf.d/90-dom0-nohibernate.conf"]
    assert any("nohibernate" in " ".join(c) for c in cmds)
    assert any("7734" in n for n in plan.notes)


def test_encrypted_partition_swap_gets_a_random_key() -> None:
    cfg = _load(EXAMPLES / "mirror-encrypted.toml")
    plan = build_plan(cfg)
    writes = _writes(plan)
    t = cfg.install.target
    dmcrypt = writes[f"{t}/etc/conf.d/dmcrypt"]
    assert dmcrypt.count("--key-file /dev/urandom") == 2
    fstab = writes[f"{t}/etc/fstab"]
    assert "/dev/mapper/crypt-swap0  none  swap" in fstab
    assert "/dev/mapper/crypt-swap1  none  swap" in fstab
    cmds = _commands(plan)
    assert not any(c[0] == "mkswap" for c in cmds), "random-keyed swap is formatted at boot"
    create = next(c for c in cmds if c[:2] == ("zpool", "create"))
    assert "mirror" in create and "keylocation=file:///media/usb/tank.key" in create


def test_plain_partition_swap_is_formatted() -> None:
    cfg = _load(EXAMPLES / "split-usr.toml")
    plan = build_plan(cfg)
    cmds = _commands(plan)
    assert ("mkswap", "-L", "dom0-swap0", "/dev/sda3") in cmds
    assert (
        "/dev/sda3  none  swap  sw,discard  0 0" in _writes(plan)[f"{cfg.install.target}/etc/fstab"]
    )
    # wipe = true: labels and signatures cleared before partitioning
    assert ("wipefs", "--all", "--force", "/dev/sda") in cmds
    assert any(op.kind == "wipe-disk" for _, op in plan.ops())


def test_desktop_plan_prevents_the_double_login() -> None:
    cfg = _load(EXAMPLES / "desktop.toml")
    plan = build_plan(cfg)
    writes = _writes(plan)
    t = cfg.install.target
    custom = writes[f"{t}/etc/gdm/custom.conf"]
    assert "AutomaticLoginEnable=false" in custom and "TimedLoginEnable=false" in custom
    use = writes[f"{t}/etc/portage/package.use/dom0"]
    assert "sys-auth/pambase gnome-keyring" in use and "gnome-base/gnome-keyring pam" in use
    hook = writes[f"{t}{files.VIDEO_HOOK}"]
    assert "qxl" in hook and "exit 1" in hook
    cmds = _commands(plan)
    assert ("chroot", t, "systemctl", "enable", "gdm.service") in cmds


def test_bare_plan_skips_what_is_off() -> None:
    cfg = _load(HERE / "configs" / "minimal-nonet.toml")
    plan = build_plan(cfg)
    ids = {s.id for s in plan.steps}
    assert not {"sshd", "firewall", "boot.zfsbootmenu", "final.export", "pool.mount"} & ids
    cmds = _commands(plan)
    assert not any(c[0] == "efibootmgr" for c in cmds)
    fetches = [op for _, op in plan.ops() if isinstance(op, Fetch)]
    assert [op.url for op in fetches][:1] == [cfg.gentoo.stage3.url]


def test_plan_touches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from installer.cli import main

    text = (EXAMPLES / "openrc.toml").read_text()
    text += f'\n[install]\ntarget = "{tmp_path}/target"\nwork_dir = "{tmp_path}/work"\n'
    cfg_path = tmp_path / "install.toml"
    cfg_path.write_text(text)
    assert main(["plan", "--config", str(cfg_path)]) == 0
    assert main(["plan", "--config", str(cfg_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "zpool create" in out and '"digest"' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["install.toml"]


def test_json_plan_round_trips() -> None:
    plan = build_plan(_load(EXAMPLES / "desktop.toml"))
    data = json.loads(plan_json(plan))
    assert data["digest"] == plan.digest()
    assert [s["id"] for s in data["steps"]] == [s.id for s in plan.steps]
    kinds = {op["kind"] for s in data["steps"] for op in s["ops"]}
    assert {"run", "write", "verify", "extract", "check-tree", "check-disk"} <= kinds
