"""A fake live system for `dom0 install apply` tests.

Recording stand-ins for zpool, zfs, zgenhostid, efibootmgr, mount, chroot (and
through it emerge, useradd, rc-update, systemctl, ...) go first on PATH; each
appends its argv to one log and emulates just enough state (pools, datasets,
mounts, file systems, boot entries) for the installer's guards to see what a
real host would show. gpg, tar, sgdisk and wipefs are recorded too but run
for real, on image files and in temporary directories. Nothing here touches
the host: PATH holds only the stand-ins, the target is a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

SEP = "\x1f"

PASSTHROUGH = ("gpg", "tar", "wipefs")
STANDINS = (
    "zpool",
    "zfs",
    "zgenhostid",
    "efibootmgr",
    "mount",
    "umount",
    "mountpoint",
    "blkid",
    "mkfs.vfat",
    "mkswap",
    "partprobe",
    "udevadm",
    "chroot",
)

_SCRIPT = r"""#!/bin/sh
# Fake-host stand-in (tests only): records its argv, emulates a little state.
# Written without subshells or helper commands where it can: tests run it often.
FAKE='@FAKE@'
S="$FAKE/state"
name="${0##*/}"
PATH=/usr/sbin:/usr/bin:/sbin:/bin  # for the helpers below; never the real tools faked here
if [ -e "$S/fail-once" ]; then
    read -r pat < "$S/fail-once"
    case "$name $*" in
        *"$pat"*) rm -f "$S/fail-once"; echo "$name: injected failure" >&2; exit 1;;
    esac
fi
{ printf '%s' "$name"; for a in "$@"; do printf '\037%s' "$a"; done; printf '\n'; } >> "$FAKE/log"
# key NAME: NAME with / replaced by %, in $k.  last ARGS: the last argument, in $l.
key() { set -f; _ifs=$IFS; IFS=/; set -- $1; IFS=%; k="$*"; IFS=$_ifs; set +f; }
last() { eval "l=\${$#}"; }
case "$name" in
zpool)
    sub="$1"; shift; last "$@"
    case "$sub" in
    create)
        while [ $# -gt 0 ]; do
            case "$1" in -o|-O|-R|-m|-t) shift 2;; -*) shift;; *) break;; esac
        done
        : > "$S/pool.$1"; : > "$S/imported.$1"; : > "$S/key.$1";;
    list) [ -e "$S/imported.$l" ] || { echo "cannot open '$l': no such pool" >&2; exit 1; }; echo "$l";;
    import) : > "$S/imported.$l"; : > "$S/key.$l";;
    export) rm -f "$S/imported.$l";;
    esac;;
zfs)
    sub="$1"; shift; last "$@"; key "$l"
    case "$sub" in
    create)
        vol=""; auto=1
        while [ $# -gt 1 ]; do
            case "$1" in
            -V|-b) vol=1; shift 2;;
            -o) case "$2" in canmount=off|canmount=noauto|mountpoint=none) auto="";; esac; shift 2;;
            *) shift;;
            esac
        done
        : > "$S/ds.$k"
        if [ -z "$vol" ] && [ -n "$auto" ]; then : > "$S/mounted.$k"; fi;;
    list) [ -e "$S/ds.$k" ] || { echo "dataset does not exist" >&2; exit 1; }; echo "$l";;
    mount) : > "$S/mounted.$k";;
    get)
        case "$4" in
        mounted) if [ -e "$S/mounted.$k" ]; then echo yes; else echo no; fi;;
        keystatus) if [ -e "$S/key.$l" ]; then echo available; else echo unavailable; fi;;
        esac;;
    load-key) : > "$S/key.$l";;
    esac;;
blkid) last "$@"; key "$l"; [ -e "$S/fs.$k" ] || exit 2; read -r t < "$S/fs.$k"; echo "$t";;
mkfs.vfat) last "$@"; key "$l"; echo vfat > "$S/fs.$k";;
mkswap) last "$@"; key "$l"; echo swap > "$S/fs.$k";;
mount) last "$@"; key "$l"; : > "$S/mnt.$k";;
umount) last "$@"; key "$l"; rm -f "$S/mnt.$k";;
mountpoint) last "$@"; key "$l"; [ -e "$S/mnt.$k" ];;
efibootmgr)
    if [ $# -eq 0 ]; then [ -e "$S/efi" ] && cat "$S/efi"; exit 0; fi
    while [ $# -gt 0 ]; do
        if [ "$1" = --label ]; then echo "Boot0000* $2" >> "$S/efi"; fi
        shift
    done;;
zgenhostid) last "$@"; printf '\001\002\003\004' > "$l";;
chroot)
    R="$1"; shift; cmd="$1"; shift; last "$@"
    case "$cmd" in
    emerge)
        # Packages are recorded in var/db/pkg, plus the few files validation reads;
        # `emerge --config` (the initramfs) is done by fake_emerge.py.
        case " $* " in *" --config "*) exec '@PYTHON@' -S -E '@EMERGE@' "$R" "$@";; esac
        for a in "$@"; do
            case "$a" in -*) continue;; esac
            a=${a%%:*}; cat=${a%%/*}; pn=${a#*/}
            case "$a" in
            sys-kernel/gentoo-kernel*) v=6.12.41;;
            sys-fs/zfs|sys-fs/zfs-kmod) v=2.3.3;;
            *) v=1.0;;
            esac
            mkdir -p "$R/var/db/pkg/$cat/$pn-$v"
            case "$a" in
            sys-kernel/gentoo-kernel*)
                mkdir -p "$R/lib/modules/$v-gentoo-dist" "$R/boot"
                echo kernel > "$R/boot/vmlinuz-$v-gentoo-dist";;
            sys-fs/zfs-kmod)
                for d in "$R"/lib/modules/*/; do mkdir -p "${d}extra"; echo module > "${d}extra/zfs.ko"; done;;
            gnome-base/gdm)
                mkdir -p "$R/etc/pam.d"
                printf '%s\n' \
                    'auth     substack     system-local-login' \
                    '-auth    optional     pam_gnome_keyring.so' \
                    'account  include      system-local-login' \
                    'password substack     system-local-login' \
                    '-password optional    pam_gnome_keyring.so use_authtok' \
                    'session  include      system-local-login' \
                    '-session optional     pam_gnome_keyring.so auto_start' \
                    > "$R/etc/pam.d/gdm-password";;
            esac
        done;;
    useradd)
        n=1000; [ -e "$S/uid" ] && read -r n < "$S/uid"; n=$((n + 1)); echo "$n" > "$S/uid"
        echo "$l:x:$n:$n::/home/$l:/bin/bash" >> "$R/etc/passwd"
        echo "$l:x:$n:" >> "$R/etc/group"
        mkdir -p "$R/home/$l"; chown "$n:$n" "$R/home/$l";;
    rc-update) mkdir -p "$R/etc/runlevels/$3"; ln -sfn "/etc/init.d/$2" "$R/etc/runlevels/$3/$2";;
    systemctl)
        w="$R/etc/systemd/system/multi-user.target.wants"; mkdir -p "$w"
        ln -sfn "/usr/lib/systemd/system/$2" "$w/$2";;
    python3) mkdir -p "$R$l/bin"; : > "$R$l/bin/python"; : > "$R$l/bin/pip";;
    */bin/pip) : > "$R${cmd%/pip}/dom0";;
    chpasswd) cat > /dev/null;;
    esac;;
esac
exit 0
"""

_PASS = """#!/bin/sh
# Fake-host recorder (tests only): records its argv, then runs the real tool.
{{ printf '%s' "${{0##*/}}"; for a in "$@"; do printf '\\037%s' "$a"; done; printf '\\n'; }} >> '{fake}/log'
PATH=/usr/sbin:/usr/bin:/sbin:/bin exec {cmd} "$@"
"""

_EMERGE = r'''"""Fake `emerge --config <kernel>` (tests only): builds an initramfs the way
dracut would lay it out (an early cpio, then a compressed one) holding what
the real dracut config asks for: /etc/hostid, the ARC setting, the pool key."""
import gzip
import os
import sys


def write_newc(files):
    out = bytearray()
    for ino, (name, body) in enumerate([*files.items(), ("TRAILER!!!", b"")], 1):
        nb = name.encode() + b"\0"
        mode = 0 if name == "TRAILER!!!" else 0o100644
        fields = (ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(nb), 0)
        out += ("070701" + "".join(f"{v:08x}" for v in fields)).encode() + nb
        out += b"\0" * (-len(out) % 4) + body
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def read(rel):
    try:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


root = sys.argv[1]
modules = os.path.join(root, "lib/modules")
for kv in sorted(os.listdir(modules)) if os.path.isdir(modules) else []:
    members = {}
    for rel in ("etc/hostid", "etc/modprobe.d/zfs.conf"):
        if read(rel) is not None:
            members[rel] = read(rel)
    zdir = os.path.join(root, "etc/zfs")
    for name in sorted(os.listdir(zdir)) if os.path.isdir(zdir) else []:
        if name.endswith(".key"):
            members[f"etc/zfs/{name}"] = read(f"etc/zfs/{name}")
    early = write_newc({"kernel/x86/microcode/GenuineIntel.bin": b"ucode"})
    with open(os.path.join(root, f"boot/initramfs-{kv}.img"), "wb") as f:
        f.write(early + gzip.compress(write_newc(members)))
'''


# The real sgdisk sleeps a second after every write (gdisk's DiskSync), which
# is too slow for tests that apply the plan dozens of times. This stand-in
# understands the few sgdisk options the installer uses and writes a real GPT
# (protective MBR, both headers and tables, CRCs) that `sgdisk -p` accepts;
# the real sgdisk is used by the disk tests and the one real-partitioning apply.
_SGDISK = r'''"""Fast sgdisk stand-in (tests only): --zap-all, --new, --typecode, --change-name."""
import json
import os
import struct
import sys
import zlib

TYPES = {
    "EF00": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
    "BF00": "6A85CF4D-1DD2-11B2-99A6-080020736631",
    "8200": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    "8300": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
}
SECTOR, ALIGN, ENTRIES = 512, 2048, 128
UNITS = {"K": 2, "M": 2048, "G": 2048 * 1024, "T": 2048 * 1024 * 1024}

disk = sys.argv[-1]
opts = sys.argv[1:-1]
side = disk + ".fakegpt.json"
parts = json.load(open(side)) if os.path.exists(side) else {}
size = os.path.getsize(disk) // SECTOR
first_usable, last_usable = 34, size - 34


def guid(text):
    """A GUID in the mixed-endian GPT byte order (as uuid.UUID(...).bytes_le)."""
    h = bytes.fromhex(text.replace("-", ""))
    return h[3::-1] + h[5:3:-1] + h[7:5:-1] + h[8:]


def sectors(text):
    unit = text[-1].upper()
    return int(text[:-1]) * UNITS[unit] if unit in UNITS else int(text)


def free_blocks():
    used = sorted((p["first"], p["last"]) for p in parts.values())
    blocks, pos = [], first_usable
    for a, b in used:
        if a > pos:
            blocks.append((pos, a - 1))
        pos = max(pos, b + 1)
    if pos <= last_usable:
        blocks.append((pos, last_usable))
    return blocks


def align_up(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


for opt in opts:
    if opt == "--zap-all":
        parts = {}
        with open(disk, "r+b") as f:
            f.write(b"\0" * 34 * SECTOR)
            f.seek((size - 33) * SECTOR)
            f.write(b"\0" * 33 * SECTOR)
        continue
    key, _, val = opt.partition("=")
    num, _, rest = val.partition(":")
    if key == "--new":
        start_s, end_s = rest.split(":")
        block = max(free_blocks(), key=lambda b: b[1] - b[0])
        if start_s == "0":
            start = align_up(block[0])
        elif start_s.startswith("-"):
            start = (last_usable + 1 - sectors(start_s[1:])) // ALIGN * ALIGN
            block = next(b for b in free_blocks() if b[0] <= start <= b[1])
        else:
            start = sectors(start_s)
            block = next(b for b in free_blocks() if b[0] <= start <= b[1])
        if end_s == "0":
            end = block[1]
        elif end_s.startswith("+"):
            end = start + sectors(end_s[1:]) - 1
        else:
            end = sectors(end_s)
        if num in parts or end > last_usable or end < start:
            sys.exit(f"sgdisk(fake): cannot create partition {num}")
        parts[num] = {"first": start, "last": end, "type": "8300", "name": ""}
    elif key == "--typecode":
        parts[num]["type"] = rest
    elif key == "--change-name":
        parts[num]["name"] = rest
    else:
        sys.exit(f"sgdisk(fake): unsupported option {opt}")

json.dump(parts, open(side, "w"))
if not parts:
    sys.exit(0)
table = bytearray(ENTRIES * 128)
for num, p in parts.items():
    off = (int(num) - 1) * 128
    table[off:off + 16] = guid(TYPES[p["type"]])
    table[off + 16:off + 32] = os.urandom(16)
    struct.pack_into("<QQQ", table, off + 32, p["first"], p["last"], 0)
    table[off + 56:off + 128] = p["name"].encode("utf-16-le")[:72].ljust(72, b"\0")
disk_guid = os.urandom(16)


def header(current, backup, entries_lba):
    h = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, current,
                              backup, first_usable, last_usable, disk_guid, entries_lba,
                              ENTRIES, 128, zlib.crc32(table)))
    struct.pack_into("<I", h, 16, zlib.crc32(bytes(h)))
    return bytes(h).ljust(SECTOR, b"\0")


mbr = bytearray(SECTOR)
mbr[446:462] = struct.pack("<BBBBBBBBII", 0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1,
                           min(size - 1, 0xFFFFFFFF))
mbr[510:512] = b"\x55\xaa"
with open(disk, "r+b") as f:
    f.write(bytes(mbr) + header(1, size - 1, 2) + bytes(table))
    f.seek((size - 33) * SECTOR)
    f.write(bytes(table) + header(size - 1, 1, size - 33))
'''


@dataclass
class FakeHost:
    dir: Path
    bin: Path
    state: Path
    log_path: Path

    @property
    def path_env(self) -> str:
        return str(self.bin)

    def entries(self) -> list[tuple[str, ...]]:
        """Every recorded command, in order, as argv tuples."""
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text().splitlines():
            out.append(tuple(line.split(SEP)))
        return out

    def fail_once(self, pattern: str) -> None:
        """Make the next stand-in whose 'name args' contains `pattern` fail (once)."""
        (self.state / "fail-once").write_text(pattern)


def make(base: Path, *, real_sgdisk: bool = False) -> FakeHost:
    base.mkdir(parents=True, exist_ok=True)
    bindir = base / "bin"
    state = base / "state"
    bindir.mkdir()
    state.mkdir()
    emerge = base / "fake_emerge.py"
    emerge.write_text(_EMERGE)
    script = base / "standin.sh"
    script.write_text(
        _SCRIPT.replace("@FAKE@", str(base))
        .replace("@PYTHON@", sys.executable)
        .replace("@EMERGE@", str(emerge))
    )
    script.chmod(0o755)
    for name in STANDINS:
        os.symlink(script, bindir / name)
    if real_sgdisk:
        real = shutil.which("sgdisk", path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert real, "sgdisk is needed for the fake host"
        (bindir / "sgdisk").write_text(_PASS.format(fake=base, cmd=f"'{real}'"))
    else:
        fast = base / "fake_sgdisk.py"
        fast.write_text(_SGDISK)
        cmd = f"'{sys.executable}' -S -E '{fast}'"
        (bindir / "sgdisk").write_text(_PASS.format(fake=base, cmd=cmd))
    (bindir / "sgdisk").chmod(0o755)
    for name in PASSTHROUGH:
        real = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert real, f"{name} is needed for the fake host"
        p = bindir / name
        p.write_text(_PASS.format(fake=base, cmd=f"'{real}'"))
        p.chmod(0o755)
    return FakeHost(base, bindir, state, base / "log")
