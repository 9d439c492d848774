"""Which disk is this? Its model, size and serial, and its stable names.

An operator confirms a disk by what is printed on it and what the firmware
shows, not by `/dev/sda`, a name the kernel hands out in probe order and
which can move to another disk at the next boot. `identify` reads sysfs
(model, serial, size) and `/dev/disk/by-id`; both roots are parameters, so
the tests give it a fake tree. An image file (the tests' disks) is reported
by its size only.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

SECTOR = 512  # /sys/block/*/size counts 512-byte sectors, whatever the disk's own
# Kernel names that depend on probe order (a by-id, by-path or PARTLABEL name does not).
_KERNEL_NAME = re.compile(r"/dev/(sd[a-z]+|vd[a-z]+|xvd[a-z]+|hd[a-z]+|nvme\d+n\d+|mmcblk\d+)")


@dataclass(frozen=True)
class Disk:
    device: str
    kind: str  # "disk" | "image" | "missing"
    size: int | None = None
    model: str = ""
    serial: str = ""
    by_id: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        if self.kind == "missing":
            return f"{self.device}: not on this machine (model, size and serial unknown)"
        size = human_size(self.size) if self.size is not None else "size unknown"
        if self.kind == "image":
            return f"{self.device}: image file, {size}"
        text = f"{self.device}: {self.model or 'model unknown'}, {size}, serial "
        text += self.serial or "unknown"
        if self.by_id:
            text += f" (also {self.by_id[0]})"
        return text

    def to_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "kind": self.kind,
            "size": self.size,
            "model": self.model,
            "serial": self.serial,
            "by_id": list(self.by_id),
        }


def human_size(n: int) -> str:
    """A disk size as people read it: 20G, 931.5G, 1.8T."""
    for unit, size in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + unit
    return f"{n} bytes"


def kernel_name(device: str) -> bool:
    """Whether `device` is a probe-order name like /dev/sda or /dev/nvme0n1."""
    return _KERNEL_NAME.fullmatch(device) is not None


def kernel_name_warning(device: str) -> str:
    name = os.path.basename(device)
    return (
        f"{device} is a kernel name, which can move to another disk between boots; "
        f"use its stable name from `ls -l /dev/disk/by-id/ | grep -w {name}` "
        "(e.g. /dev/disk/by-id/nvme-MODEL_SERIAL)"
    )


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def device_size(device: str) -> int | None:
    """Bytes of a block device or an image file; None if it is not here."""
    try:
        st = os.stat(device)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        return None
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def identify(device: str, *, sys_root: str = "/sys", dev_root: str = "/dev") -> Disk:
    """What `device` is, from sysfs under `sys_root` and links under `dev_root`."""
    real = os.path.realpath(device)
    if os.path.isfile(real):
        return Disk(device, "image", os.path.getsize(real))
    name = os.path.basename(real)
    block = os.path.join(sys_root, "class", "block", name)
    if not os.path.isdir(block):
        return Disk(device, "missing")
    sectors = _read(os.path.join(block, "size"))
    size = int(sectors) * SECTOR if sectors.isdigit() else None
    dev = os.path.join(block, "device")
    model = _read(os.path.join(dev, "model"))
    serial = _read(os.path.join(dev, "serial")) or _read(os.path.join(block, "serial"))
    by_id_dir = os.path.join(dev_root, "disk", "by-id")
    try:
        links = sorted(os.listdir(by_id_dir))
    except OSError:
        links = []
    names = []
    for link in links:
        path = os.path.join(by_id_dir, link)
        if os.path.basename(os.path.realpath(path)) == name and "-part" not in link:
            names.append(f"/dev/disk/by-id/{link}")
    # The wwn- names are opaque; a model_serial name is the one to copy.
    names.sort(key=lambda n: n.startswith("/dev/disk/by-id/wwn-"))
    return Disk(device, "disk", size, model, serial, tuple(names))
