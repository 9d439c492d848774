"""Reading an initramfs (to check that the hostid and key were baked in)."""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess

import pytest

from installer.initramfs import InitramfsError, read_members, write_newc

EARLY = write_newc({"kernel/x86/microcode/AuthenticAMD.bin": b"ucode"})
MAIN = write_newc({"etc/hostid": b"\x01\x02\x03\x04", "./etc/zfs/zroot.key": b"k\n", ".x": b""})


def test_plain_archive() -> None:
    files = read_members(MAIN)
    assert files == {"etc/hostid": b"\x01\x02\x03\x04", "etc/zfs/zroot.key": b"k\n", ".x": b""}


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_early_then_compressed(compress) -> None:
    files = read_members(EARLY + compress(MAIN))
    assert files["etc/hostid"] == b"\x01\x02\x03\x04"
    assert "kernel/x86/microcode/AuthenticAMD.bin" in files


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd not installed")
def test_zstd() -> None:
    z = subprocess.run(["zstd", "-q", "-c"], input=MAIN, capture_output=True, check=True).stdout
    assert read_members(EARLY + z)["etc/zfs/zroot.key"] == b"k\n"


def test_garbage_is_refused() -> None:
    with pytest.raises(InitramfsError):
        read_members(b"this is not an initramfs")
