"""Read the member files of an initramfs, to check what was baked into it.

An initramfs is one or more "newc" cpio archives, concatenated, each maybe
compressed (dracut: an uncompressed early-microcode archive, then the main one
compressed). Only reading is needed, and only regular files.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess

_NEWC = (b"070701", b"070702")
_GZIP = b"\x1f\x8b"
_XZ = b"\xfd7zXZ\x00"
_ZSTD = b"\x28\xb5\x2f\xfd"
_MAX = 1 << 31  # never inflate more than this (a broken image must not eat memory)


class InitramfsError(ValueError):
    pass


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _cpio(data: bytes, pos: int, files: dict[str, bytes]) -> int:
    """Parse one newc archive starting at `pos`; return the offset after its trailer."""
    while True:
        if data[pos : pos + 6] not in _NEWC:
            raise InitramfsError(f"bad cpio header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode("utf-8", "replace")
        body = _align4(name_start + namesize)
        end = _align4(body + filesize)
        if name == "TRAILER!!!":
            return end
        if (mode & 0o170000) == 0o100000:
            files[_clean(name)] = data[body : body + filesize]
        pos = end
        if pos > len(data):
            raise InitramfsError("truncated cpio archive")


def _zstd(data: bytes) -> bytes:
    exe = shutil.which("zstd")
    if exe is None:
        raise InitramfsError("zstd-compressed initramfs but no zstd command to read it")
    return subprocess.run(
        [exe, "-dc"], input=data, stdout=subprocess.PIPE, check=True, timeout=120
    ).stdout


def read_members(data: bytes) -> dict[str, bytes]:
    """All regular files of all archives in the image, by path (no leading slash)."""
    files: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        head = data[pos : pos + 6]
        if head in _NEWC:
            pos = _cpio(data, pos, files)
        elif head == b"\0" * len(head):
            pos += 4  # padding between archives
        elif head.startswith(_GZIP):
            files.update(read_members(gzip.decompress(data[pos:])[:_MAX]))
            break
        elif head.startswith(_XZ):
            files.update(read_members(lzma.decompress(data[pos:])[:_MAX]))
            break
        elif head.startswith(_ZSTD):
            files.update(read_members(_zstd(data[pos:])))
            break
        else:
            raise InitramfsError(f"unknown data at offset {pos}")
    return files


def write_newc(files: dict[str, bytes]) -> bytes:
    """A minimal newc archive (used by tests and fakes to make an initramfs)."""
    out = bytearray()
    ino = 1

    def entry(name: str, mode: int, body: bytes) -> None:
        nonlocal ino
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name_b), 0)
        )
        ino += 1
        out.extend(hdr.encode() + name_b)
        out.extend(b"\0" * (_align4(len(out)) - len(out)))
        out.extend(body)
        out.extend(b"\0" * (_align4(len(out)) - len(out)))

    for name, body in files.items():
        entry(name, 0o100644, body)
    entry("TRAILER!!!", 0, b"")
    return bytes(out)
