"""What keeps an operator from installing onto the wrong disk, with absurd
sizes or an unpinned boot loader: warnings for kernel disk names, sizes
refused with one line, each disk's model, size and serial shown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from installer import config, identity, validate
from installer.cli import main
from installer.errors import ConfigError
from installer.ops import Fetch
from installer.plan import build_plan

from .conftest import mini_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "install" / "openrc.toml"


def _problems(tmp: Path, over: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        mini_config(tmp, over)
    return e.value.lines()


def _config_file(tmp: Path, extra: str) -> str:
    path = tmp / "install.toml"
    path.write_text(EXAMPLE.read_text() + "\n" + extra)
    return str(path)


# ---------------------------------------------------------------- sizes


def test_an_absurd_zram_size_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    cfg = _config_file(tmp_path, '[swap]\nmode = "zram"\nsize = "64T"\n')
    assert main(["plan", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err == f"{cfg}: swap.size: '64T' is too large, expected at most 1T\n"


@pytest.mark.parametrize(
    ("over", "line"),
    [
        (
            {"disks": {"esp_size": "100G"}},
            "disks.esp_size: '100G' is too large, expected at most 64G",
        ),
        ({"zfs": {"arc_max": "128T"}}, "zfs.arc_max: '128T' is too large, expected at most 64T"),
    ],
)
def test_other_absurd_sizes_are_refused(tmp_path, over, line) -> None:
    assert f"t.toml: {line}" in _problems(tmp_path, over)


def test_sane_sizes_pass(tmp_path) -> None:
    cfg = mini_config(tmp_path, {"swap": {"size": "1T"}, "disks": {"esp_size": "64G"}})
    assert cfg.swap.size == 1024**4


def _disk(tmp: Path, size: int) -> None:
    with open(tmp / "disk.img", "wb") as f:
        f.truncate(size)


def test_a_swap_partition_larger_than_the_disk_is_refused(tmp_path) -> None:
    _disk(tmp_path, 20 << 30)
    lines = _problems(tmp_path, {"swap": {"mode": "partition", "size": "16G"}})
    assert len(lines) == 1
    assert lines[0].startswith(f"t.toml: swap.size: does not fit {tmp_path}/disk.img (20G): ")
    assert "esp_size 1G + a 16G swap partition + 8G for the system" in lines[0]


def test_a_swap_zvol_larger_than_the_pool_is_refused(tmp_path) -> None:
    _disk(tmp_path, 20 << 30)
    over = {"swap": {"mode": "zvol", "size": "16G", "accept_zvol_swap_risk": True}}
    assert "a 16G swap zvol" in _problems(tmp_path, over)[0]


def test_what_fits_the_disk_passes(tmp_path) -> None:
    _disk(tmp_path, 20 << 30)
    cfg = mini_config(tmp_path, {"swap": {"mode": "partition", "size": "8G"}})
    assert cfg.swap.size == 8 << 30
    # A disk that is not on this machine is not measured (plan made elsewhere).
    os.unlink(tmp_path / "disk.img")
    assert mini_config(tmp_path, {"swap": {"mode": "partition", "size": "900G"}})


# ---------------------------------------------------------------- names


def test_a_kernel_disk_name_is_a_warning_in_the_plan(tmp_path) -> None:
    cfg = mini_config(tmp_path, {"disks": {"devices": ["/dev/sda"]}})
    notes = [n for n in build_plan(cfg).notes if n.startswith("warning:")]
    assert notes == [
        "warning: /dev/sda is a kernel name, which can move to another disk between boots; "
        "use its stable name from `ls -l /dev/disk/by-id/ | grep -w sda` "
        "(e.g. /dev/disk/by-id/nvme-MODEL_SERIAL)"
    ]
    stable = mini_config(tmp_path, {"disks": {"devices": ["/dev/disk/by-id/ata-X_1"]}})
    assert not [n for n in build_plan(stable).notes if n.startswith("warning:")]


@pytest.mark.parametrize("dev", ["/dev/sda", "/dev/vdb", "/dev/nvme0n1", "/dev/mmcblk0"])
def test_kernel_names(dev) -> None:
    assert identity.kernel_name(dev)


@pytest.mark.parametrize("dev", ["/dev/disk/by-id/ata-X", "/dev/disk/by-path/pci-0", "/dev/md0"])
def test_stable_names(dev) -> None:
    assert not identity.kernel_name(dev)


def test_a_kernel_disk_name_is_a_warning_in_validate(tmp_path) -> None:
    cfg = mini_config(tmp_path, {"disks": {"devices": ["/dev/sda"]}})
    (tmp_path / "root").mkdir()
    results = validate.validate(cfg, str(tmp_path / "root"))
    warned = [r for r in results if r.id == "disks.name0"]
    assert [r.status for r in warned] == ["warn"]
    assert "(1 with a warning)" in validate.render_text(results).splitlines()[-1]


def test_the_plan_refuses_another_venv(tmp_path) -> None:
    lines = _problems(tmp_path, {"dom0": {"venv": "/usr/local/dom0"}})
    assert lines == [
        "t.toml: dom0.venv: '/usr/local/dom0' is not supported, expected /opt/dom0 (the "
        "shipped service files run /opt/dom0/bin/dom0; see docs/operations.md)"
    ]


# ---------------------------------------------------------------- identity


def _fake_sys(tmp: Path) -> tuple[str, str]:
    sysfs, dev = tmp / "sys", tmp / "dev"
    block = sysfs / "class" / "block" / "sda"
    (block / "device").mkdir(parents=True)
    (block / "size").write_text(f"{(931 << 30) // 512}\n")
    (block / "device" / "model").write_text("Samsung SSD 870 \n")
    (block / "device" / "serial").write_text("S6PNNS0T123456\n")
    byid = dev / "disk" / "by-id"
    byid.mkdir(parents=True)
    (dev / "sda").touch()
    for name in ("wwn-0x5002538f4", "ata-Samsung_SSD_870_S6PNNS0T123456"):
        os.symlink("../../sda", byid / name)
    os.symlink("../../sda1", byid / "ata-Samsung_SSD_870_S6PNNS0T123456-part1")
    return str(sysfs), str(dev)


def test_identify_reads_model_size_serial_and_stable_names(tmp_path) -> None:
    sysfs, dev = _fake_sys(tmp_path)
    d = identity.identify("/dev/sda", sys_root=sysfs, dev_root=dev)
    assert (d.kind, d.size, d.model, d.serial) == (
        "disk",
        931 << 30,
        "Samsung SSD 870",
        "S6PNNS0T123456",
    )
    assert d.by_id == (
        "/dev/disk/by-id/ata-Samsung_SSD_870_S6PNNS0T123456",
        "/dev/disk/by-id/wwn-0x5002538f4",
    )
    assert d.describe() == (
        "/dev/sda: Samsung SSD 870, 931G, serial S6PNNS0T123456 "
        "(also /dev/disk/by-id/ata-Samsung_SSD_870_S6PNNS0T123456)"
    )
    missing = identity.identify("/dev/sdz", sys_root=sysfs, dev_root=dev)
    assert missing.kind == "missing" and "not on this machine" in missing.describe()


def test_the_plan_shows_each_disk(tmp_path, capsys) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(20 << 30)
    cfg = tmp_path / "install.toml"
    old = '"/dev/disk/by-id/nvme-Samsung_SSD_980_1TB_S64ANS0T000001"'
    cfg.write_text(EXAMPLE.read_text().replace(old, f'"{img}"', 1))
    assert main(["plan", "--config", str(cfg)]) == 0
    assert f"  disk: {img}: image file, 20G\n" in capsys.readouterr().out
    assert main(["plan", "--config", str(cfg), "--json"]) == 0
    disks = json.loads(capsys.readouterr().out)["disks"]
    assert disks == [
        {
            "device": str(img),
            "kind": "image",
            "size": 20 << 30,
            "model": "",
            "serial": "",
            "by_id": [],
        }
    ]


# ---------------------------------------------------------------- ZFSBootMenu


def test_zfsbootmenu_is_pinned_by_default(tmp_path) -> None:
    cfg = mini_config(tmp_path)
    assert cfg.bootloader.zbm_url == config.DEFAULT_ZBM_URL
    assert cfg.bootloader.zbm_sha256 == config.DEFAULT_ZBM_SHA256
    fetches = [op for _, op in build_plan(cfg).ops() if isinstance(op, Fetch)]
    fetch = next(op for op in fetches if op.dest.endswith("zfsbootmenu.EFI"))
    assert fetch.sha256 == config.DEFAULT_ZBM_SHA256
    assert not [n for n in build_plan(cfg).notes if "not pinned" in n]


def test_an_image_of_your_own_is_not_pinned_by_the_default(tmp_path) -> None:
    own = mini_config(tmp_path, {"bootloader": {"zbm_url": "https://get.zfsbootmenu.org/efi"}})
    assert own.bootloader.zbm_sha256 is None
    assert any("not pinned" in n for n in build_plan(own).notes)
    sha = "ab" * 32
    pinned = mini_config(
        tmp_path, {"bootloader": {"zbm_url": "https://example.org/zbm.EFI", "zbm_sha256": sha}}
    )
    assert pinned.bootloader.zbm_sha256 == sha
