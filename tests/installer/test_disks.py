"""Disk refusal and wiping, on image files: partition tables, ZFS labels, mounts."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from installer import config, disks
from installer.ops import Run
from installer.plan import build_plan

FOUND = shutil.which("sgdisk", path="/usr/sbin:/usr/bin:/sbin:/bin")
needs_sgdisk = pytest.mark.skipif(FOUND is None, reason="sgdisk (gdisk) is not installed")
SGDISK = FOUND or "sgdisk"
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "install"


def image(tmp_path: Path, size: int = 1 << 30, name: str = "disk.img") -> Path:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def reader(path: Path):
    fd = os.open(path, os.O_RDONLY)
    return fd, (lambda off, n: os.pread(fd, n, off))


def plant_uberblock(path: Path, offset: int, big_endian: bool = False) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q" if big_endian else "<Q", disks.UB_MAGIC))


def test_parse_mountinfo() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "37 35 7:3 / /mnt/with\\040space rw shared:2 - ext4 /dev/loop3 rw\n"
        "38 35 0:22 / /proc rw - proc proc rw\n"
    )
    mounts = disks.parse_mountinfo(text)
    assert [m.dev for m in mounts] == [(98, 0), (7, 3), (0, 22)]
    assert mounts[1].mountpoint == "/mnt/with space" and mounts[1].source == "/dev/loop3"


def test_label_offsets_cover_start_and_end() -> None:
    size = 10 * disks.MIB + 123
    offs = disks.label_offsets(1000, size)
    aligned = size - size % disks.LABEL_SIZE
    assert offs == [
        1000,
        1000 + disks.LABEL_SIZE,
        1000 + aligned - 2 * disks.LABEL_SIZE,
        1000 + aligned - disks.LABEL_SIZE,
    ]


def test_empty_image_is_clean(tmp_path: Path) -> None:
    found = disks.inspect(str(image(tmp_path)))
    assert found.clean and found.summary() == "empty"


@pytest.mark.parametrize("label", [0, 1, 2, 3])
@pytest.mark.parametrize("big_endian", [False, True])
def test_zfs_label_on_the_whole_disk_is_found(tmp_path: Path, label: int, big_endian) -> None:
    img = image(tmp_path, 64 * disks.MIB)
    off = disks.label_offsets(0, img.stat().st_size)[label] + disks.UBERBLOCK_OFFSET + 7 * 1024
    plant_uberblock(img, off, big_endian)
    found = disks.inspect(str(img))
    assert found.zfs and "a ZFS label at byte" in found.zfs[0]


@needs_sgdisk
def test_partitioning_with_the_plans_own_sgdisk_commands(tmp_path: Path) -> None:
    """The real sgdisk, run with exactly the argv the plan holds, on an image file."""
    img = image(tmp_path, 24 << 30)
    cfg = config.load(str(EXAMPLES / "split-usr.toml"))  # ESP + ZFS + swap partition
    plan = build_plan(cfg)
    options = [
        arg
        for _, op in plan.ops()
        if isinstance(op, Run) and op.argv[0] == "sgdisk" and "--zap-all" not in op.argv
        for arg in op.argv[1:-1]
    ]
    # One sgdisk run with all the plan's options, in the plan's order (sgdisk
    # applies them in order): each real run sleeps a second after writing.
    subprocess.run([SGDISK, *options, str(img)], check=True, capture_output=True)
    fd, read = reader(img)
    try:
        parts = disks.parse_gpt(read, img.stat().st_size)
    finally:
        os.close(fd)
    assert parts is not None
    by_num = {p.number: p for p in parts}
    assert by_num[1].name == "dom0-esp0" and by_num[1].size == 1 << 30
    assert by_num[1].start == 1 << 20  # aligned at 1 MiB
    assert by_num[3].name == "dom0-swap0" and by_num[3].size >= 16 << 30
    assert by_num[2].name == "dom0-zfs0"
    assert by_num[1].last_lba < by_num[2].first_lba and by_num[2].last_lba < by_num[3].first_lba
    out = subprocess.run([SGDISK, "--print", str(img)], capture_output=True, text=True).stdout
    assert "dom0-zfs0" in out and "EF00" in out and "8200" in out
    found = disks.inspect(str(img))
    assert not found.clean and "a GPT partition table (3 partitions" in found.summary()


@needs_sgdisk
def test_wipe_clears_old_pool_labels_not_only_signatures(tmp_path: Path) -> None:
    img = image(tmp_path, 2 << 30)
    subprocess.run(
        [SGDISK, "--new=1:1M:+256M", "--change-name=1:old-esp", "--new=2:0:0", str(img)],
        check=True,
        capture_output=True,
    )
    fd, read = reader(img)
    parts = disks.parse_gpt(read, img.stat().st_size)
    assert parts is not None
    part2 = next(p for p in parts if p.number == 2)
    os.close(fd)
    # An old pool's labels at the END of partition 2: `wipefs` on the disk would
    # not find them, and `zpool import` would still show the old pool.
    for off in disks.label_offsets(part2.start, part2.size)[2:]:
        plant_uberblock(img, off + disks.UBERBLOCK_OFFSET)
    found = disks.inspect(str(img))
    assert any("ZFS label in partition 2" in z for z in found.zfs)
    done = disks.wipe(str(img))
    assert "partition 2: ZFS labels and first/last MiB zeroed" in done
    after = disks.inspect(str(img))
    assert after.clean, after.summary()
    fd, read = reader(img)
    try:
        assert not disks.find_zfs_labels(read, part2.start, part2.size)
    finally:
        os.close(fd)


def test_data_in_the_first_mib_is_found(tmp_path: Path) -> None:
    img = image(tmp_path, 16 * disks.MIB)
    with open(img, "r+b") as f:
        f.seek(1024)
        f.write(b"\x53\xef")  # e.g. an ext4 superblock magic
    found = disks.inspect(str(img))
    assert found.data and "first MiB" in found.data[0]


CHECK_IN_NS = """
import sys
from installer import disks
f = disks.inspect(sys.argv[1])
print("MOUNTED" if f.in_use else "FREE", f.summary())
"""


@pytest.mark.skipif(
    os.geteuid() != 0
    or not shutil.which("unshare")
    or not shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin"),
    reason="needs root, unshare and mkfs.ext4",
)
def test_mounted_image_is_refused_even_with_wipe(tmp_path: Path) -> None:
    """Mounted through a loop device, in a private mount namespace of the test's own."""
    img = image(tmp_path, 32 * disks.MIB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(img)],
        check=True,
        env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"},
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"mount -o loop {img} {mnt} && "
        f"{sys.executable} -c '{CHECK_IN_NS}' {img}; rc=$?; umount {mnt}; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    if "failed to setup loop device" in proc.stderr or "mount:" in proc.stderr:
        pytest.skip(f"cannot loop-mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MOUNTED"), proc.stdout
    assert f"mounted at {mnt}" in proc.stdout
    # ... and outside that namespace, nothing is mounted.
    assert disks.inspect(str(img)).in_use is False
    # Wiping it is refused too, whatever the config says.
    wipe = (
        f"mount -o loop {img} {mnt} && {sys.executable} -c "
        f"'from installer import disks; disks.wipe(\"{img}\")'; rc=$?; umount {mnt}; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", wipe],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode != 0 and "is in use: mounted at" in proc.stderr


def test_wipe_refuses_a_disk_in_use(monkeypatch, tmp_path: Path) -> None:
    img = image(tmp_path, 8 * disks.MIB)
    busy = disks.Findings(str(img), mounted=["mounted at /somewhere"])
    monkeypatch.setattr(disks, "inspect", lambda _dev: busy)
    with pytest.raises(OSError, match="in use: mounted at /somewhere"):
        disks.wipe(str(img))
