"""`dom0 install apply` against a fake host (see fakehost.py): the whole install
per variant, a failure injected at every step in turn and resumed, nothing
done twice, secrets never written anywhere but where they belong."""

from __future__ import annotations

import collections
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from installer import config, disks, validate
from installer.cli import main
from installer.plan import build_plan

from . import fakehost
from .conftest import PASSPHRASE, TEST_HASH, merge, mini_config

# The richest variant: every kind of step appears (wipe, mirror, encryption with
# a prompted passphrase, zvol swap, systemd, desktop).
RICH: dict[str, Any] = {
    "gentoo": {"init": "systemd"},
    "desktop": {"enabled": True},
    "pool": {"encryption": {"enabled": True, "keysource": "prompt"}},
    "swap": {"mode": "zvol", "accept_zvol_swap_risk": True},
    "disks": {"layout": "mirror", "wipe": True},
}
VARIANTS: dict[str, dict[str, Any]] = {
    "openrc": {},
    "systemd": {"gentoo": {"init": "systemd"}, "swap": {"mode": "none"}},
    "split-usr": {"gentoo": {"split_usr": True}, "swap": {"mode": "partition", "size": "1G"}},
    "desktop-openrc": {"desktop": {"enabled": True}},
    "hardened": {"gentoo": {"hardened": True}, "swap": {"mode": "none"}},
    "mirror-keyfile": {
        "disks": {"layout": "mirror"},
        "swap": {"mode": "partition", "size": "1G"},
        "pool": {"encryption": {"enabled": True, "keysource": "file"}},
    },
    "rich": RICH,
}
FAULT = "DOM0_INSTALL_FAULT"


def _rich_plan_shape() -> list[tuple[str, str]]:
    """(step id, id of its last operation) of the RICH plan; ids do not depend on paths."""
    local = {
        "gentoo": {"stage3": {"file": "/m/stage3.tar.xz"}, "snapshot": {"file": "/m/gentoo.tar.xz"}}
    }  # as make_install does
    cfg = mini_config(Path("/tmp/dom0-shape"), merge(RICH, local))
    return [(s.id, s.ops[-1].id) for s in build_plan(cfg).steps]


RICH_STEPS = _rich_plan_shape()


def normalized(inst) -> list[tuple[str, ...]]:
    base = str(inst.dir)
    return [tuple(a.replace(base, "<I>") for a in e) for e in inst.host.entries()]


def actions(inst) -> list[tuple[str, ...]]:
    """The recorded commands that change something (probes filtered out)."""
    plan = build_plan(inst.cfg())
    probes = {p for _, op in plan.ops() for p in op.probes()}
    base = str(inst.dir)
    probes = {tuple(a.replace(base, "<I>") for a in p) for p in probes}
    return [e for e in normalized(inst) if e not in probes]


def apply(inst, *extra: str) -> int:
    return main(inst.argv(*extra))


def passphrase_args(inst, passphrase_file: str) -> tuple[str, ...]:
    enc = inst.data.get("pool", {}).get("encryption", {})
    return ("--passphrase-file", passphrase_file) if enc.get("keysource") == "prompt" else ()


_reference: dict[str, list[tuple[str, ...]]] = {}


def reference(name: str, make_install, passphrase_file: str) -> list[tuple[str, ...]]:
    """The commands of one clean, uninterrupted run of a variant (cached)."""
    if name not in _reference:
        inst = make_install(VARIANTS[name])
        assert apply(inst, *passphrase_args(inst, passphrase_file)) == 0
        _reference[name] = actions(inst)
    return _reference[name]


# ---------------------------------------------------------------- whole installs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_installs_and_validates(name, make_install, passphrase_file, capsys) -> None:
    inst = make_install(VARIANTS[name])
    rc = apply(inst, *passphrase_args(inst, passphrase_file))
    out = capsys.readouterr()
    assert rc == 0, out.err
    cfg = inst.cfg()
    n = len(build_plan(cfg).steps)
    assert f"[{n}/{n}] final" in out.out and "dom0 install: complete" in out.out
    state = json.loads(inst.state.read_text())
    assert state["complete"] and set(state["done"]) == {op.id for _, op in build_plan(cfg).ops()}
    # Only the fakes ran: PATH holds nothing else.
    names = {e[0] for e in inst.host.entries()}
    assert names <= set(fakehost.STANDINS) | set(fakehost.PASSTHROUGH) | {"sgdisk"}
    # The finished tree passes validation (apply ran it too, as its last step).
    results = validate.validate(cfg, str(inst.target))
    assert not validate.failures(results)
    ids = {r.id for r in results}
    assert {
        "zfs.hostid",
        "swap.no-hibernate",
        "firewall.baseline",
        "sshd.key-only",
        "profile.link",
        "usr.layout",
        "init.stage3",
    } <= ids
    assert any(i.startswith("initramfs.") for i in ids)
    # Each command once: no action repeated unless the plan itself has it twice.
    acts = actions(inst)
    plan_cmds = collections.Counter(
        tuple(a.replace(str(inst.dir), "<I>") for a in c)
        for _, op in build_plan(cfg).ops()
        for c in op.commands()
    )
    for cmd, count in collections.Counter(acts).items():
        assert count <= plan_cmds[cmd], f"{cmd} ran {count} times"
    _reference.setdefault(name, acts)  # the clean run the resume tests compare against


def test_openrc_tree_details(make_install, capsys) -> None:
    inst = make_install({})
    assert apply(inst) == 0
    capsys.readouterr()
    t = inst.target
    assert (
        os.readlink(t / "etc/portage/make.profile")
        == "../../var/db/repos/gentoo/profiles/default/linux/amd64/23.0"
    )
    assert (t / "etc/hostid").read_bytes() == b"\x01\x02\x03\x04"
    assert os.readlink(t / "etc/runlevels/default/sshd") == "/etc/init.d/sshd"
    assert (
        (t / "etc/ssh/sshd_config")
        .read_text()
        .startswith("Include /etc/ssh/sshd_config.d/*.conf\n#\t$OpenBSD")
    )
    assert 'rc_need="dom0-firewall"' in (t / "etc/conf.d/sshd").read_text()
    keys = t / "home/admin/.ssh/authorized_keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600 and keys.stat().st_uid == 1001
    assert (t / "etc/dom0/policy.toml").read_text() == (inst.dir / "policy.toml").read_text()
    assert (t / "efi/EFI/zbm/zfsbootmenu.EFI").read_bytes() == b"MZ fake zfsbootmenu"
    assert not (t / "profile").exists()


def test_real_sgdisk_partitions_the_image(make_install, capsys) -> None:
    inst = make_install({"swap": {"mode": "partition", "size": "2G"}}, real_sgdisk=True)
    assert apply(inst) == 0
    capsys.readouterr()
    out = subprocess.run(
        ["/usr/sbin/sgdisk", "--print", str(inst.disks[0])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("dom0-esp0", "dom0-zfs0", "dom0-swap0"):
        assert name in out


# ---------------------------------------------------------------- failures and resume


@pytest.mark.parametrize(("step", "last_op"), RICH_STEPS, ids=[s for s, _ in RICH_STEPS])
def test_failure_at_each_step_then_resume(
    step, last_op, make_install, passphrase_file, monkeypatch, capsys
) -> None:
    """Fail at step k (just before its last operation, so the step is half done),
    then --resume: the install completes and every command ran exactly once."""
    ref = reference("rich", make_install, passphrase_file)
    inst = make_install(RICH)
    assert [(s.id, s.ops[-1].id) for s in build_plan(inst.cfg()).steps] == RICH_STEPS
    pp = passphrase_args(inst, passphrase_file)
    monkeypatch.setenv(FAULT, last_op)
    assert apply(inst, *pp) == 1
    err = capsys.readouterr().err
    index = [s for s, _ in RICH_STEPS].index(step) + 1
    assert f"step {index}/{len(RICH_STEPS)} {step} failed at {last_op}: injected fault" in err
    assert "--resume" in err
    state = json.loads(inst.state.read_text())
    assert not state["complete"] and last_op not in state["done"]
    monkeypatch.delenv(FAULT)
    assert apply(inst, "--resume", *pp) == 0
    out = capsys.readouterr().out
    assert "done earlier" in out or index == 1
    assert json.loads(inst.state.read_text())["complete"]
    assert actions(inst) == ref


@pytest.mark.parametrize("name", ["rich", "openrc"])
def test_crash_after_each_step_is_recognised_on_resume(
    name, make_install, passphrase_file, monkeypatch, capsys
) -> None:
    """A crash right after an operation took effect but before its checkpoint:
    resume sees the effect (create-if-absent guards) and does not redo it. One
    chain of runs, crashing after the last operation of every step in turn."""
    ref = reference(name, make_install, passphrase_file)
    inst = make_install(VARIANTS[name])
    pp = passphrase_args(inst, passphrase_file)
    plan = build_plan(inst.cfg())
    for i, step in enumerate(plan.steps):
        monkeypatch.setenv(FAULT, f"{step.ops[-1].id}@after")
        assert apply(inst, *(("--resume",) if i else ()), *pp) == 1
    monkeypatch.delenv(FAULT)
    assert apply(inst, "--resume", *pp) == 0
    capsys.readouterr()
    got = collections.Counter(actions(inst))
    want = collections.Counter(ref)
    assert not want - got, "nothing is missing"
    base = str(inst.dir)
    # Allowed again: commands harmless to repeat; session steps (pool import,
    # mounts), which a resume re-establishes by design; and the final export,
    # which a crash right after it plus that re-import legitimately repeats.
    repeatable = {
        tuple(a.replace(base, "<I>") for a in c)
        for step, op in plan.ops()
        if op.safe_to_repeat or step.session or step.id == "final.export"
        for c in op.commands()
    }
    extra = got - want
    assert set(extra) <= repeatable, f"re-run although guarded: {set(extra) - repeatable}"


def test_a_failing_command_stops_the_run_and_resume_finishes(
    make_install, passphrase_file, capsys
) -> None:
    ref = reference("openrc", make_install, passphrase_file)
    inst = make_install({})
    inst.host.fail_once("emerge --noreplace --quiet-build=y sys-fs/zfs")
    assert apply(inst) == 1
    err = capsys.readouterr().err
    assert "step" in err and "packages.zfs failed at packages.zfs/emerge" in err
    assert "exited with 1: chroot: injected failure" in err
    assert apply(inst, "--resume") == 0
    assert actions(inst) == ref


def test_changed_plan_is_refused_on_resume(make_install, monkeypatch, capsys) -> None:
    inst = make_install({})
    monkeypatch.setenv(FAULT, "portage.config/use")
    assert apply(inst) == 1
    monkeypatch.delenv(FAULT)
    inst.config.write_text(
        inst.config.read_text().replace(
            '[firewall]\nssh_sources = ["203.0.113.0/24"]',
            '[firewall]\nssh_sources = ["10.0.0.0/8"]',
        )
    )
    capsys.readouterr()
    assert apply(inst, "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("dom0 install: the plan changed since") and err.count("\n") == 1


def test_state_rules(make_install, monkeypatch, capsys) -> None:
    inst = make_install({})
    assert apply(inst, "--resume") == 2
    assert "there is no state file" in capsys.readouterr().err
    monkeypatch.setenv(FAULT, "disks.settle/partprobe")
    assert apply(inst) == 1
    monkeypatch.delenv(FAULT)
    capsys.readouterr()
    assert apply(inst) == 2
    assert "a previous run left" in capsys.readouterr().err
    assert apply(inst, "--resume") == 0
    assert apply(inst, "--resume") == 0
    assert "already complete" in capsys.readouterr().out


def test_secrets_stay_secret(make_install, passphrase_file, capsys) -> None:
    inst = make_install(RICH)
    assert apply(inst, "--passphrase-file", passphrase_file) == 0
    out = capsys.readouterr()
    places = {
        "stdout": out.out,
        "stderr": out.err,
        "log": inst.log.read_text(),
        "state": inst.state.read_text(),
        "fake host log": inst.host.log_path.read_text(),
    }
    for where, text in places.items():
        assert PASSPHRASE not in text, where
        assert TEST_HASH not in text, where
    assert "<secret password:admin>" in out.out
    for path in (inst.log, inst.state):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    key = inst.target / "etc/zfs/zroot.key"
    assert key.read_text() == PASSPHRASE + "\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The typed passphrase served `zpool create` and was removed right after.
    assert not (inst.work / "zroot.key").exists()
    assert stat.S_IMODE(inst.work.stat().st_mode) == 0o700


def test_prompted_passphrase_needs_a_terminal_or_a_file(make_install, capsys) -> None:
    inst = make_install({"pool": {"encryption": {"enabled": True}}})
    assert apply(inst) == 1
    err = capsys.readouterr().err
    assert (
        "pool.create/work-key: the ZFS passphrase is needed: run on a terminal or pass "
        "--passphrase-file" in err
    )


def test_a_disk_with_data_is_refused_unless_wiped(make_install, capsys) -> None:
    inst = make_install({})
    with open(inst.disks[0], "r+b") as f:
        f.seek(4096)
        f.write(b"old data")
    assert apply(inst) == 1
    err = capsys.readouterr().err
    assert "refusing" in err and "set disks.wipe = true" in err
    assert not any(e[0] in ("sgdisk", "zpool") for e in inst.host.entries())


def test_wipe_clears_an_old_pool(make_install, capsys) -> None:
    inst = make_install({"disks": {"wipe": True}})
    img = inst.disks[0]
    size = img.stat().st_size
    # An old whole-disk pool: labels at both ends.
    for off in disks.label_offsets(0, size):
        with open(img, "r+b") as f:
            f.seek(off + disks.UBERBLOCK_OFFSET)
            f.write((disks.UB_MAGIC).to_bytes(8, "little"))
    assert disks.inspect(str(img)).zfs
    assert apply(inst) == 0
    out = capsys.readouterr().out
    assert "it will be wiped" in out
    fd = os.open(img, os.O_RDONLY)
    try:
        assert not disks.find_zfs_labels(lambda o, n: os.pread(fd, n, o), 0, size)
    finally:
        os.close(fd)


def test_apply_asks_before_touching_disks(make_install, capsys) -> None:
    inst = make_install({})
    assert main(["apply", "--config", str(inst.config)]) == 2
    assert "pass --yes" in capsys.readouterr().err
    assert inst.host.entries() == [] and not inst.state.exists()


def test_validate_command(make_install, capsys) -> None:
    inst = make_install({})
    assert apply(inst) == 0
    capsys.readouterr()
    argv = ["validate", "--config", str(inst.config), "--root", str(inst.target)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith(", 0 failed")
    assert "OK    sshd.key-only" in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and {c["status"] for c in data["checks"]} <= {"ok", "skip"}
    (inst.target / "etc/fstab").write_text("/dev/sda3 none swap sw 0 0\n")
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL  fstab.swap" in out and "do not match mode 'zram'" in out


def test_config_paths_are_checked_before_anything_runs(make_install, capsys) -> None:
    inst = make_install({})
    (inst.dir / "policy.toml").unlink()
    assert apply(inst) == 1
    assert "missing input files:" in capsys.readouterr().err
    assert inst.host.entries() == []
    cfg = config.load(str(inst.config))
    assert cfg.dom0.policy.endswith("policy.toml")


def test_key_file_contents_stay_secret(make_install, capsys) -> None:
    inst = make_install(VARIANTS["mirror-keyfile"])
    assert apply(inst) == 0
    out = capsys.readouterr()
    for text in (out.out, out.err, inst.log.read_text(), inst.state.read_text()):
        assert PASSPHRASE not in text
    key = inst.target / "etc/zfs/zroot.key"
    assert key.read_text() == PASSPHRASE + "\n" and stat.S_IMODE(key.stat().st_mode) == 0o600
