"""Is a disk safe to use? Mounted, holding a ZFS pool label, or holding data.

Works on block devices and on image files alike (the tests use image files).
The parsers (`parse_mountinfo`, `parse_gpt`, `find_zfs_labels`) are pure; the
rest reads the device and /proc, /sys. `wipe` is the only writer.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass, field

KIB = 1024
MIB = 1024 * KIB
LABEL_SIZE = 256 * KIB  # a ZFS vdev label
UBERBLOCK_OFFSET = 128 * KIB  # the uberblock ring inside a label
UB_MAGIC = 0x00BAB10C
_MAGIC_LE = struct.pack("<Q", UB_MAGIC)
_MAGIC_BE = struct.pack(">Q", UB_MAGIC)


# ---------------------------------------------------------------- mounts


@dataclass(frozen=True)
class Mount:
    dev: tuple[int, int]  # major, minor of the mounted file system
    mountpoint: str
    source: str


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and i + 3 < len(field_) + 0 and field_[i + 1 : i + 4].isdigit():
            out.append(chr(int(field_[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/self/mountinfo (see proc(5))."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 10 or "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        major, _, minor = parts[2].partition(":")
        out.append(Mount((int(major), int(minor)), _unescape(parts[4]), _unescape(parts[sep + 2])))
    return out


# ---------------------------------------------------------------- GPT


@dataclass(frozen=True)
class Partition:
    number: int
    first_lba: int
    last_lba: int
    name: str
    sector: int

    @property
    def start(self) -> int:
        return self.first_lba * self.sector

    @property
    def size(self) -> int:
        return (self.last_lba - self.first_lba + 1) * self.sector


def parse_gpt(read_at, size: int) -> list[Partition] | None:
    """Partitions of a GPT disk, or None if there is no primary GPT header.

    `read_at(offset, length) -> bytes` reads the device.
    """
    for sector in (512, 4096):
        head = read_at(sector, 92)
        if len(head) < 92 or head[:8] != b"EFI PART":
            continue
        entries_lba, count, esize = struct.unpack_from("<QII", head, 72)
        if not (128 <= esize <= 4096) or count > 1024:
            return []
        table = read_at(entries_lba * sector, count * esize)
        parts = []
        for i in range(count):
            e = table[i * esize : (i + 1) * esize]
            if len(e) < 128 or e[:16] == b"\0" * 16:
                continue
            first, last = struct.unpack_from("<QQ", e, 32)
            name = e[56:128].decode("utf-16-le", "replace").rstrip("\0")
            if first <= last and last * sector < size:
                parts.append(Partition(i + 1, first, last, name, sector))
        return parts
    return None


# ---------------------------------------------------------------- ZFS labels


def label_offsets(start: int, size: int) -> list[int]:
    """Where the 4 ZFS labels of a vdev of `size` bytes at `start` would be."""
    aligned = size - size % LABEL_SIZE
    if aligned < 4 * LABEL_SIZE:
        return [start] if size >= LABEL_SIZE else []
    return [
        start,
        start + LABEL_SIZE,
        start + aligned - 2 * LABEL_SIZE,
        start + aligned - LABEL_SIZE,
    ]


def has_uberblock(label: bytes) -> bool:
    """Whether a 256 KiB label holds an uberblock (magic 0x00bab10c, either endian)."""
    ring = label[UBERBLOCK_OFFSET:]
    for off in range(0, len(ring) - 8 + 1, KIB):
        word = ring[off : off + 8]
        if word in (_MAGIC_LE, _MAGIC_BE):
            return True
    return False


def find_zfs_labels(read_at, start: int, size: int) -> list[int]:
    return [off for off in label_offsets(start, size) if has_uberblock(read_at(off, LABEL_SIZE))]


# ---------------------------------------------------------------- inspection


@dataclass
class Findings:
    device: str
    size: int = 0
    mounted: list[str] = field(default_factory=list)  # why it is in use
    zfs: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)

    @property
    def in_use(self) -> bool:
        return bool(self.mounted)

    @property
    def clean(self) -> bool:
        return not (self.mounted or self.zfs or self.data)

    def summary(self) -> str:
        parts = self.mounted + self.zfs + self.data
        return "; ".join(parts) if parts else "empty"


class _Reader:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _dev_numbers(path: str) -> set[tuple[int, int]]:
    """The device numbers of a block device, its partitions and holders; for an
    image file, those of the loop devices backed by it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    devs: set[tuple[int, int]] = set()
    if stat.S_ISBLK(st.st_mode):
        devs.add((os.major(st.st_rdev), os.minor(st.st_rdev)))
    elif stat.S_ISREG(st.st_mode):
        for loop in _loops_backed_by(real):
            devs.add(loop)
    more: set[tuple[int, int]] = set()
    for major, minor in devs:
        sysdir = f"/sys/dev/block/{major}:{minor}"
        for sub in _listdir(sysdir):
            dev = _read(f"{sysdir}/{sub}/dev")
            if dev and os.path.exists(f"{sysdir}/{sub}/partition"):
                more.add(_pair(dev))
        for base in [sysdir] + [f"{sysdir}/{s}" for s in _listdir(sysdir)]:
            for holder in _listdir(f"{base}/holders"):
                dev = _read(f"/sys/class/block/{holder}/dev")
                if dev:
                    more.add(_pair(dev))
    return devs | more


def _pair(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().partition(":")
    return int(major), int(minor)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _loops_backed_by(real: str) -> list[tuple[int, int]]:
    out = []
    for name in _listdir("/sys/block"):
        if name.startswith("loop") and _read(f"/sys/block/{name}/loop/backing_file") == real:
            dev = _read(f"/sys/block/{name}/dev")
            if dev:
                out.append(_pair(dev))
    return out


def _swaps() -> list[str]:
    return [line.split()[0] for line in _read("/proc/swaps").splitlines()[1:] if line.split()]


def inspect(device: str) -> Findings:
    """What is on `device`. Raises OSError if it cannot be opened at all."""
    f = Findings(device)
    devs = _dev_numbers(device)
    for m in parse_mountinfo(_read("/proc/self/mountinfo")):
        if m.dev in devs:
            f.mounted.append(f"mounted at {m.mountpoint}")
    for sw in _swaps():
        try:
            st = os.stat(sw)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) in devs:
            f.mounted.append(f"used as swap ({sw})")
    st = os.stat(device)
    flags = os.O_RDONLY | os.O_CLOEXEC
    if stat.S_ISBLK(st.st_mode):
        # An exclusive open fails while the kernel holds the device: a mounted
        # file system, an imported pool, an md or dm device on top.
        try:
            os.close(os.open(device, flags | os.O_EXCL))
        except OSError as e:
            if e.errno == errno.EBUSY:
                f.mounted.append("busy (held by the kernel: mounted, imported pool, md or dm)")
            else:
                raise
    fd = os.open(device, flags)
    try:
        read = _Reader(fd)
        size = f.size = _device_size(fd)
        gpt = parse_gpt(read, size)
        if gpt is not None:
            names = ", ".join(f"{p.number}:{p.name or '?'}" for p in gpt)
            f.data.append(
                f"a GPT partition table ({len(gpt)} partitions{': ' + names if names else ''})"
            )
        for off in find_zfs_labels(read, 0, size):
            f.zfs.append(f"a ZFS label at byte {off} (a pool on the whole disk)")
        for p in gpt or []:
            for off in find_zfs_labels(read, p.start, p.size):
                f.zfs.append(f"a ZFS label in partition {p.number} at byte {off}")
                break
        head = read(0, min(MIB, size))
        tail = read(max(0, size - MIB), min(MIB, size))
        if gpt is None and head.strip(b"\0"):
            f.data.append("non-zero data in the first MiB (a partition table or file system)")
        if gpt is None and tail.strip(b"\0"):
            f.data.append("non-zero data in the last MiB")
    finally:
        os.close(fd)
    return f


def wipe(device: str) -> list[str]:
    """Zero every ZFS label and the first/last MiB of the disk and of each old
    partition. Returns what was zeroed. Refuses a disk in use."""
    found = inspect(device)
    if found.in_use:
        raise OSError(errno.EBUSY, f"{device} is in use: {found.summary()}")
    done = []
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        read = _Reader(fd)
        size = _device_size(fd)
        regions = [(0, size, "disk")]
        for p in parse_gpt(read, size) or []:
            regions.append((p.start, p.size, f"partition {p.number}"))
        for start, length, what in regions:
            spans = [(start, min(MIB, length)), (start + max(0, length - MIB), min(MIB, length))]
            spans += [(off, LABEL_SIZE) for off in label_offsets(start, length)]
            for off, n in spans:
                _zero(fd, off, n)
            done.append(f"{what}: ZFS labels and first/last MiB zeroed")
        os.fsync(fd)
    finally:
        os.close(fd)
    return done


def _zero(fd: int, offset: int, length: int) -> None:
    chunk = b"\0" * min(length, MIB)
    pos = offset
    end = offset + length
    while pos < end:
        n = os.pwrite(fd, chunk[: end - pos], pos)
        pos += n
