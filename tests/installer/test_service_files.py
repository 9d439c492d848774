"""The service files in init/: the installer installs exactly these, systemd
accepts the unit, logrotate accepts (and applies) the rotation."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from installer import files, shipped
from installer.ops import WriteFile
from installer.plan import build_plan

from .conftest import mini_config

INIT = Path(__file__).resolve().parents[2] / "init"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
LOGROTATE = shutil.which("logrotate", path="/usr/sbin:/usr/bin:/sbin:/bin")


def _writes(cfg, step: str | None = None) -> dict[str, WriteFile]:
    t = cfg.install.target
    return {
        op.path[len(t) :]: op
        for s, op in build_plan(cfg).ops()
        if isinstance(op, WriteFile) and op.root and step in (None, s.id)
    }


@pytest.mark.parametrize(
    ("init", "shipped_files"),
    [
        (
            "openrc",
            {
                "/etc/init.d/dom0": ("openrc/dom0", 0o755),
                "/etc/conf.d/dom0": ("openrc/dom0.confd", 0o644),
                "/etc/logrotate.d/dom0": ("logrotate/dom0", 0o644),
            },
        ),
        (
            "systemd",
            {
                "/etc/systemd/system/dom0.service": ("systemd/dom0.service", 0o644),
                "/etc/dom0/dom0.env": ("systemd/dom0.env", 0o644),
            },
        ),
    ],
)
def test_plan_installs_the_shipped_files_byte_for_byte(tmp_path, init, shipped_files) -> None:
    cfg = mini_config(tmp_path, {"gentoo": {"init": init}})
    writes = _writes(cfg)
    for path, (name, mode) in shipped_files.items():
        op = writes[path]
        assert op.content.encode() == (INIT / name).read_bytes(), path
        assert op.mode == mode, path
    # The dom0 step writes nothing else (the settings file included).
    assert set(_writes(cfg, "dom0")) == set(shipped_files)


def test_the_settings_file_follows_the_config(tmp_path) -> None:
    cfg = mini_config(tmp_path, {"dom0": {"state_dir": "/srv/dom0"}})
    assert 'dom0_state="/srv/dom0"' in _writes(cfg)["/etc/conf.d/dom0"].content
    # The shipped init script itself never changes with the config.
    assert _writes(cfg)["/etc/init.d/dom0"].content == (INIT / "openrc/dom0").read_text()


def test_the_package_reads_init_itself() -> None:
    """installer/shipped is a link to init/, so a wheel carries these files."""
    link = Path(files.__file__).parent / "shipped"
    assert link.is_symlink() and link.resolve() == INIT
    for name in (shipped.SYSTEMD_UNIT, shipped.OPENRC_SCRIPT, shipped.LOGROTATE):
        assert shipped.read(name) == (INIT / name).read_text()


def _verify(unit: Path) -> tuple[int, str]:
    assert SYSTEMD_ANALYZE, "systemd-analyze is needed (package systemd, see scripts/setup)"
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _unit_copy(tmp_path: Path, edit=lambda text: text) -> Path:
    """The shipped unit in a temporary directory, its ExecStart aimed at a
    stand-in program (verify checks that the program exists)."""
    exe = tmp_path / "dom0"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    text = (INIT / "systemd/dom0.service").read_text()
    assert text.count("/opt/dom0/bin/dom0 ") == 1
    unit = tmp_path / "units" / "dom0.service"
    unit.parent.mkdir()
    unit.write_text(edit(text.replace("/opt/dom0/bin/dom0 ", f"{exe} ")))
    return unit


def test_systemd_analyze_verify_accepts_the_unit(tmp_path) -> None:
    rc, out = _verify(_unit_copy(tmp_path))
    # verify only warns (exit 0) about unknown keys or values: any output fails.
    assert (rc, out) == (0, "")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.replace("KillMode=", "KilMode="), "Unknown key 'KilMode'"),
        (lambda t: t.replace("Restart=always", "Restart=alwayz"), "restart specifier"),
    ],
    ids=["typo-key", "bad-value"],
)
def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path, edit, needle) -> None:
    """The control: the same check does fail when the unit is wrong."""
    rc, out = _verify(_unit_copy(tmp_path, edit))
    assert (rc, out) != (0, "") and needle in out


def test_the_unit_keeps_the_data_plane_on_restart() -> None:
    lines = set((INIT / "systemd/dom0.service").read_text().splitlines())
    assert {
        "KillMode=process",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "Before=libvirtd.service libvirt-guests.service",
    } <= lines
    script = (INIT / "openrc/dom0").read_text()
    assert 'supervisor="supervise-daemon"' in script and 'rc_cgroup_cleanup="no"' in script
    assert 'extra_started_commands="reload"' in script and "--signal HUP" in script


def _logrotate(*args: str) -> str:
    assert LOGROTATE, "logrotate is needed (see scripts/setup)"
    proc = subprocess.run([LOGROTATE, *args], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def test_logrotate_accepts_the_shipped_file(tmp_path) -> None:
    out = _logrotate("--debug", "--state", str(tmp_path / "state"), str(INIT / "logrotate/dom0"))
    assert "rotating pattern: /var/log/dom0.log" in out
    assert "error" not in out


def test_logrotate_reports_a_broken_file(tmp_path) -> None:
    bad = tmp_path / "dom0"
    bad.write_text((INIT / "logrotate/dom0").read_text().replace("copytruncate", "copytruncat"))
    out = _logrotate("--debug", "--state", str(tmp_path / "state"), str(bad))
    assert "unknown option 'copytruncat'" in out


def test_rotation_keeps_the_open_log_file(tmp_path) -> None:
    """copytruncate: the file supervise-daemon holds open stays the log file."""
    log = tmp_path / "dom0.log"
    log.write_text("line before the rotation\n")
    held = open(log, "a")  # noqa: SIM115 - stands in for supervise-daemon's descriptor
    try:
        conf = tmp_path / "logrotate.conf"
        conf.write_text(
            (INIT / "logrotate/dom0").read_text().replace("/var/log/dom0.log", str(log))
        )
        os.chmod(conf, 0o644)
        _logrotate("--force", "--state", str(tmp_path / "state"), str(conf))
        assert (tmp_path / "dom0.log.1").read_text() == "line before the rotation\n"
        held.write("line after\n")
        held.flush()
        assert log.read_text().lstrip("\0") == "line after\n"
    finally:
        held.close()


@pytest.mark.parametrize("init", ["openrc", "systemd"])
def test_validate_finds_an_edited_service_file(make_install, capsys, init) -> None:
    from installer import validate
    from installer.cli import main

    over = {"gentoo": {"init": init}} | ({"swap": {"mode": "none"}} if init == "systemd" else {})
    inst = make_install(over)
    assert main(inst.argv()) == 0
    capsys.readouterr()
    path, _content, _mode = files.dom0_service(inst.cfg())
    installed = inst.target / path.lstrip("/")
    assert (
        installed.read_bytes()
        == (INIT / ("openrc/dom0" if init == "openrc" else "systemd/dom0.service")).read_bytes()
    )
    results = {r.id: r for r in validate.validate(inst.cfg(), str(inst.target))}
    assert results["dom0.service-file"].status == "ok"
    installed.write_text(
        installed.read_text()
        .replace("KillMode=process", "KillMode=control-group")
        .replace('rc_cgroup_cleanup="no"', 'rc_cgroup_cleanup="yes"')
    )
    results = {r.id: r for r in validate.validate(inst.cfg(), str(inst.target))}
    assert results["dom0.service-file"].status == "fail"
    assert "differs from what the config asks for" in results["dom0.service-file"].detail
