"""`install.toml`: parsed into frozen dataclasses, every problem reported at once.

`parse(data, source, base_dir)` is pure: plain TOML data in, a `Config` or a
`ConfigError` out (one `Problem` per wrong field). `load(path)` only adds
reading the file. Relative paths in the file are taken relative to the
directory of the config file, so an install medium can carry the config next
to its key file, policy and wheel.
"""

from __future__ import annotations

import builtins
import ipaddress
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.toml import REQUIRED, Checker, join, kind, nth
from installer import identity, profiles
from installer.errors import ConfigError
from installer.takeover import readable, ssh_handover_problem

GIB = 1024**3
MIB = 1024**2

# Gentoo's release keys (sec-keys/openpgp-keys-gentoo-release):
# stages are signed by the Release Engineering automated weekly key, the
# ebuild repository snapshots by the infrastructure's automated signing key.
RELENG_FINGERPRINT = "13EBBDBEDE7A12775DFDB1BABB572E0E2D182910"
SNAPSHOT_FINGERPRINT = "DCD05B71EAB94199527F44ACDB6B8C1F96D8BF6D"
DEFAULT_KEYRING = "/usr/share/openpgp-keys/gentoo-release.asc"
DEFAULT_MIRROR = "https://distfiles.gentoo.org"

# ZFSBootMenu, pinned: the v3.1.0 release image (EFI, Linux 6.6 LTS inside).
# The checksum is the one other installers pin for this asset (see
# docs/installer.md); a mismatch stops the fetch, nothing unverified is used.
DEFAULT_ZBM_URL = (
    "https://github.com/zbm-dev/zfsbootmenu/releases/download/v3.1.0/"
    "zfsbootmenu-release-x86_64-v3.1.0-linux6.6.EFI"
)
DEFAULT_ZBM_SHA256 = "d4a67012f03659c91a1f227aa6739b4b41bd5c7d0bd64e89aa7358bf08826cfd"

# Upper bounds that no real machine reaches: a size above one is a typo
# ("64T" for "64G"), refused before it reaches sgdisk or zram.
MAX_ESP = 64 * 1024**3
MAX_SWAP = 1024**4
MAX_ARC = 64 * 1024**4
# The least a disk must leave for the pool (the system, its packages, some VMs).
MIN_POOL = 8 * 1024**3


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class Install:
    target: str = "/mnt/gentoo"
    work_dir: str = "/var/tmp/dom0-install"
    resolv_conf: str = "/etc/resolv.conf"
    export_pool: bool = True


@dataclass(frozen=True)
class Disks:
    devices: tuple[str, ...]
    layout: str = "single"  # "single" | "mirror"
    wipe: bool = False
    esp_size: int = 1 * GIB


@dataclass(frozen=True)
class Encryption:
    enabled: bool = False
    keysource: str = "prompt"  # "prompt" | "file"
    key_file: str | None = None
    cipher: str = "aes-256-gcm"


@dataclass(frozen=True)
class Pool:
    name: str = "zroot"
    ashift: int = 12
    compression: str = "zstd"
    acltype: str = "posixacl"
    xattr: str = "sa"
    autotrim: bool = True
    encryption: Encryption = field(default_factory=Encryption)


@dataclass(frozen=True)
class VmDataset:
    enabled: bool = True
    name: str = "vm"
    mountpoint: str = "/var/lib/libvirt/images"
    properties: tuple[tuple[str, str], ...] = (
        ("recordsize", "64K"),
        ("compression", "lz4"),
        ("atime", "off"),
    )


@dataclass(frozen=True)
class Datasets:
    boot_environment: str = "gentoo"
    home: bool = True
    vm: VmDataset = field(default_factory=VmDataset)


@dataclass(frozen=True)
class System:
    hostname: str = "dom0"
    timezone: str = "UTC"
    locale: str = "en_US.UTF-8"
    keymap: str = "us"


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ("wheel",)
    ssh_keys: tuple[str, ...] = ()
    password_hash: str | None = None  # a secret: never printed, never logged
    shell: str = "/bin/bash"


@dataclass(frozen=True)
class Source:
    """Where a signed archive comes from: a URL, a local file, or `latest`."""

    url: str | None
    file: str | None
    signature: str | None
    fingerprints: tuple[str, ...]


@dataclass(frozen=True)
class Gentoo:
    variant: profiles.Variant
    stage3: Source
    snapshot: Source
    mirror: str = DEFAULT_MIRROR
    keyring: str = DEFAULT_KEYRING
    packages: tuple[str, ...] = ()

    @property
    def init(self) -> str:
        return self.variant.init


@dataclass(frozen=True)
class Kernel:
    package: str = "gentoo-kernel-bin"
    series: str = "6.12"


@dataclass(frozen=True)
class Zfs:
    arc_max: int = 4 * GIB


@dataclass(frozen=True)
class Bootloader:
    kind: str = "zfsbootmenu"  # "zfsbootmenu" | "none"
    zbm_url: str = DEFAULT_ZBM_URL
    zbm_sha256: str | None = DEFAULT_ZBM_SHA256
    commandline: str = "quiet loglevel=4"


@dataclass(frozen=True)
class Swap:
    mode: str = "zram"  # "zram" | "partition" | "zvol" | "none"
    size: int = 8 * GIB
    accept_zvol_swap_risk: bool = False


@dataclass(frozen=True)
class Firewall:
    enabled: bool = True
    ssh_sources: tuple[str, ...] = ()
    allow_ping: bool = True
    allow_dhcp: bool = True


@dataclass(frozen=True)
class Sshd:
    enabled: bool = True
    port: int = 22


@dataclass(frozen=True)
class Network:
    dhcp: bool = True


@dataclass(frozen=True)
class Desktop:
    enabled: bool = False
    environment: str = "gnome"
    qxl_guests: str = "refuse"  # "refuse" | "warn"


@dataclass(frozen=True)
class Dom0:
    policy: str
    wheel: str | None = None
    package: str | None = None
    venv: str = "/opt/dom0"
    state_dir: str = "/var/lib/dom0"


@dataclass(frozen=True)
class Config:
    source: str
    install: Install
    disks: Disks
    pool: Pool
    datasets: Datasets
    system: System
    users: tuple[User, ...]
    gentoo: Gentoo
    kernel: Kernel
    zfs: Zfs
    bootloader: Bootloader
    swap: Swap
    firewall: Firewall
    sshd: Sshd
    network: Network
    desktop: Desktop
    dom0: Dom0

    @property
    def init(self) -> str:
        return self.gentoo.variant.init

    @property
    def encrypted(self) -> bool:
        return self.pool.encryption.enabled

    @property
    def boot_dataset(self) -> str:
        return f"{self.pool.name}/ROOT/{self.datasets.boot_environment}"

    def secrets(self) -> dict[str, str]:
        """Secret values the config itself carries, by the name the plan uses."""
        out: dict[str, str] = {}
        for u in self.users:
            if u.password_hash:
                out[f"password:{u.name}"] = u.password_hash
        return out


# ---------------------------------------------------------------- reading


class _Reader(Checker):
    """install.toml's own wording (its tests and operators' scripts know it)."""

    error = ConfigError
    whole_file = ""
    unreadable = "cannot read the config: {reason}"
    not_utf8 = "not UTF-8 text ({reason})"
    bad_syntax = "invalid TOML: {message}"

    def mistyped(self, value: object, expected: str) -> str:
        return f"expected {expected}, got {kind(value)}"


class _Table:
    """One TOML table being read: its keys are checked as they are asked for,
    and `done` reports the ones nobody asked for."""

    def __init__(self, data: Mapping[str, Any], path: str, checker: Checker) -> None:
        self.data = data
        self.path = path
        self.checker = checker
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        return join(self.path, key)

    def problem(self, key: str, message: str) -> None:
        self.checker.bad(self.where(key) if key else self.path, message)

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, t: type, default: Any) -> Any:
        self.seen.add(key)
        return self.checker.get(self.data, key, self.path, t, default)

    def str(
        self,
        key: str,
        default: Any = REQUIRED,
        *,
        choices: tuple[str, ...] | None = None,
        pattern: re.Pattern[str] | None = None,
        expected: str = "",
    ) -> Any:
        value = self._get(key, str, default)
        if value is None or (value is default and key not in self.data):
            return value
        if choices is not None and value not in choices:
            self.problem(key, f"{value!r} is not allowed, expected one of: {', '.join(choices)}")
            return default if default is not REQUIRED else None
        if pattern is not None and not pattern.fullmatch(value):
            self.problem(key, f"{value!r} is not valid, expected {expected}")
            return default if default is not REQUIRED else None
        return value

    def bool(self, key: builtins.str, default: Any = REQUIRED) -> Any:
        return self._get(key, bool, default)

    def int(
        self, key: builtins.str, default: Any = REQUIRED, *, lo: builtins.int, hi: builtins.int
    ) -> Any:
        value = self._get(key, int, default)
        if isinstance(value, int) and key in self.data and not lo <= value <= hi:
            self.problem(key, f"{value} is out of range, expected {lo}..{hi}")
            return default if default is not REQUIRED else None
        return value

    def size(
        self,
        key: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int,
        maximum: builtins.int,
    ) -> builtins.int:
        self.seen.add(key)
        if key not in self.data:
            return default
        raw = self.data[key]
        parsed = parse_size(raw)
        if parsed is None:
            self.problem(key, f'{raw!r} is not a size, expected e.g. "512M", "8G" or bytes')
            return default
        if parsed < minimum:
            self.problem(key, f"{raw!r} is too small, expected at least {format_size(minimum)}")
            return default
        if parsed > maximum:
            self.problem(key, f"{raw!r} is too large, expected at most {format_size(maximum)}")
            return default
        return parsed

    def strs(self, key: builtins.str, default: Any = REQUIRED) -> Any:
        value = self._get(key, list, default)
        if value is None:
            return None if default is REQUIRED else default
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problem(nth(key, i), self.checker.mistyped(item, "a string"))
            else:
                out.append(item)
        return tuple(out)

    def table(self, key: builtins.str) -> _Table:
        value = self._get(key, dict, {})
        return _Table(value if isinstance(value, dict) else {}, self.where(key), self.checker)

    def tables(self, key: builtins.str) -> list[_Table]:
        value = self._get(key, list, [])
        out = []
        for i, item in enumerate(value or []):
            if not isinstance(item, dict):
                self.problem(nth(key, i), self.checker.mistyped(item, "a table"))
                continue
            out.append(_Table(item, nth(self.where(key), i), self.checker))
        return out

    def done(self) -> None:
        self.checker.unknown_keys(self.data, self.path, sorted(self.seen))


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024**4}


def parse_size(raw: object) -> int | None:
    """`"8G"`, `"512MiB"`, `"1024"` or an integer -> bytes (binary units)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if raw >= 0 else None
    if not isinstance(raw, str):
        return None
    m = _SIZE.match(raw)
    if not m:
        return None
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit]


def format_size(n: int) -> str:
    for unit, size in (("T", 1024**4), ("G", GIB), ("M", MIB), ("K", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


# ---------------------------------------------------------------- checks

_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_POOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
_POOL_RESERVED = re.compile(r"^(mirror|raidz.*|draid.*|spare|log|cache|special|dedup|c[0-9].*)$")
_DS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_SYSTEM_USERS = frozenset(
    [
        "root",
        "bin",
        "daemon",
        "adm",
        "lp",
        "sync",
        "shutdown",
        "halt",
        "mail",
        "news",
        "uucp",
        "operator",
        "portage",
        "nobody",
        "sshd",
        "messagebus",
        "polkitd",
        "gdm",
        "libvirt",
        "qemu",
        "dom0",
    ]
)
_SSH_KEY = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
    r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\n\r]*)?"
)
_CRYPT = re.compile(r"\$(5|6|y|gy|2[aby]|7)\$[^\s:]+")
_TIMEZONE = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+){0,2}")
_LOCALE = re.compile(r"[a-z]{2,3}(_[A-Z]{2})?\.(UTF-8|utf8)(@[a-z]+)?")
_KEYMAP = re.compile(r"[A-Za-z0-9_.-]+")
_FPR = re.compile(r"[0-9A-F]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SERIES = re.compile(r"[1-9][0-9]*\.[0-9]+")
_ATOM = re.compile(r"[a-z0-9][a-z0-9+_-]*/[A-Za-z0-9+_-]+(:[A-Za-z0-9.+_-]+)?")
_PROP_VALUE = re.compile(r"[A-Za-z0-9._:-]+")
_URL = re.compile(r"(https?|file)://[^\s]+")
_CIPHERS = (
    "aes-256-gcm",
    "aes-192-gcm",
    "aes-128-gcm",
    "aes-256-ccm",
    "aes-192-ccm",
    "aes-128-ccm",
)
_COMPRESSION = re.compile(r"off|on|lz4|zle|lzjb|gzip(-[1-9])?|zstd(-([1-9]|1[0-9]))?|zstd-fast")
VM_PROPERTIES = frozenset(
    [
        "recordsize",
        "compression",
        "atime",
        "relatime",
        "sync",
        "logbias",
        "primarycache",
        "secondarycache",
        "copies",
        "checksum",
        "redundant_metadata",
        "xattr",
    ]
)


def _abs_path(base_dir: str, value: str) -> str:
    if value.startswith("/"):
        return posixpath.normpath(value)
    return posixpath.normpath(posixpath.join(base_dir, value))


def _check_system_path(t: _Table, key: str, value: str | None) -> None:
    """A path of the installed system: absolute, normalized, no `..`."""
    if value is None:
        return
    if not value.startswith("/") or posixpath.normpath(value) != value or "/../" in value + "/":
        t.problem(key, f"{value!r} is not a normalized absolute path")


# ---------------------------------------------------------------- parse


def load(path: str) -> Config:
    """Read and parse a config file; ConfigError on any problem, incl. TOML syntax."""
    data = _Reader(path).read_file(path)
    base = os.path.dirname(os.path.abspath(path))
    return parse(data, source=path, base_dir=base)


def parse(data: Mapping[str, Any], *, source: str = "install.toml", base_dir: str = "/") -> Config:
    checker = _Reader(source)
    top = _Table(data, "", checker)
    out = _Parser(top, base_dir).run()
    top.done()
    if checker.problems or out is None:
        if not checker.problems:
            checker.bad("", "invalid config")
        checker.fail()
    return Config(source=source, **out)


class _Parser:
    def __init__(self, top: _Table, base_dir: str) -> None:
        self.top = top
        self.base = base_dir

    def path(self, t: _Table, key: str, default: Any = None) -> Any:
        value = t.str(key, default)
        if value is None or value == "":
            return None if value == "" else value
        return _abs_path(self.base, value)

    def run(self) -> dict[str, Any] | None:
        top = self.top
        install = self.install(top.table("install"))
        disks = self.disks(top.table("disks"))
        pool = self.pool(top.table("pool"))
        datasets = self.datasets(top.table("datasets"))
        system = self.system(top.table("system"))
        users = self.users(top)
        gentoo = self.gentoo(top.table("gentoo"), top)
        kernel = self.kernel(top.table("kernel"))
        zfs = self.zfs(top.table("zfs"))
        bootloader = self.bootloader(top.table("bootloader"))
        swap = self.swap(top.table("swap"))
        firewall = self.firewall(top.table("firewall"))
        sshd = self.sshd(top.table("sshd"))
        network = self.network(top.table("network"))
        desktop = self.desktop(top.table("desktop"))
        dom0 = self.dom0(top.table("dom0"))
        parts = dict(
            install=install,
            disks=disks,
            pool=pool,
            datasets=datasets,
            system=system,
            users=users,
            gentoo=gentoo,
            kernel=kernel,
            zfs=zfs,
            bootloader=bootloader,
            swap=swap,
            firewall=firewall,
            sshd=sshd,
            network=network,
            desktop=desktop,
            dom0=dom0,
        )
        if any(v is None for v in parts.values()):
            return None
        self.cross_checks(parts)
        return parts

    # -- sections

    def install(self, t: _Table) -> Install:
        d = Install()
        target = t.str("target", d.target)
        if target is not None and (
            target == "/" or not target.startswith("/") or posixpath.normpath(target) != target
        ):
            t.problem(
                "target",
                f"{target!r} cannot be the target, expected an absolute normalized "
                "mount point other than / (e.g. /mnt/gentoo)",
            )
            target = d.target
        work = t.str("work_dir", d.work_dir)
        if work is not None and (not work.startswith("/") or posixpath.normpath(work) != work):
            t.problem("work_dir", f"{work!r} is not a normalized absolute path")
        if target and work and (work + "/").startswith(target + "/"):
            t.problem("work_dir", "must not be inside the target (it holds the install state)")
        resolv = self.path(t, "resolv_conf", d.resolv_conf)
        export = t.bool("export_pool", d.export_pool)
        t.done()
        return Install(target or d.target, work or d.work_dir, resolv or d.resolv_conf, export)

    def disks(self, t: _Table) -> Disks | None:
        devices = t.strs("devices")
        layout = t.str("layout", "single", choices=("single", "mirror"))
        wipe = t.bool("wipe", False)
        esp = t.size("esp_size", 1 * GIB, minimum=256 * MIB, maximum=MAX_ESP)
        t.done()
        for i, dev in enumerate(devices or ()):
            if not dev.startswith("/") or posixpath.normpath(dev) != dev:
                t.problem(nth("devices", i), f"{dev!r} is not an absolute device path")
        if devices is not None and len(set(devices)) != len(devices):
            t.problem("devices", "lists the same device twice")
        if layout == "single" and devices is not None and len(devices) != 1:
            t.problem("devices", f"layout 'single' takes exactly one device, got {len(devices)}")
        if layout == "mirror" and devices is not None and len(devices) < 2:
            t.problem("devices", f"layout 'mirror' takes two or more devices, got {len(devices)}")
        if devices is None:
            return None
        return Disks(tuple(devices), layout or "single", bool(wipe), esp)

    def pool(self, t: _Table) -> Pool:
        d = Pool()
        name = t.str("name", d.name, pattern=_POOL_NAME, expected="a ZFS pool name like 'zroot'")
        if name and _POOL_RESERVED.match(name):
            t.problem("name", f"{name!r} is reserved by ZFS, expected another pool name")
            name = d.name
        ashift = t.int("ashift", d.ashift, lo=9, hi=16)
        comp = t.str(
            "compression", d.compression, pattern=_COMPRESSION, expected="lz4, zstd, zstd-N, off"
        )
        acl = t.str("acltype", d.acltype, choices=("posixacl", "posix", "off"))
        xattr = t.str("xattr", d.xattr, choices=("sa", "on", "dir", "off"))
        autotrim = t.bool("autotrim", d.autotrim)
        enc = self.encryption(t.table("encryption"))
        t.done()
        return Pool(
            name or d.name,
            ashift if ashift is not None else d.ashift,
            comp or d.compression,
            acl or d.acltype,
            xattr or d.xattr,
            bool(autotrim),
            enc,
        )

    def encryption(self, t: _Table) -> Encryption:
        d = Encryption()
        enabled = t.bool("enabled", False)
        keysource = t.str("keysource", d.keysource, choices=("prompt", "file"))
        key_file = self.path(t, "key_file", None)
        cipher = t.str("cipher", d.cipher, choices=_CIPHERS)
        t.done()
        if enabled and keysource == "file" and not key_file:
            t.problem("key_file", "missing, expected the key file to use with keysource = 'file'")
        if key_file and keysource != "file":
            t.problem("key_file", "is only used with keysource = 'file'")
        return Encryption(bool(enabled), keysource or d.keysource, key_file, cipher or d.cipher)

    def datasets(self, t: _Table) -> Datasets:
        d = Datasets()
        be = t.str(
            "boot_environment", d.boot_environment, pattern=_DS_NAME, expected="a dataset name"
        )
        home = t.bool("home", d.home)
        vt = t.table("vm")
        dv = VmDataset()
        enabled = vt.bool("enabled", dv.enabled)
        name = vt.str("name", dv.name, pattern=_DS_NAME, expected="a dataset name like 'vm'")
        if name == "ROOT" or name == "home" or name == "swap":
            vt.problem("name", f"{name!r} is used by the installer, expected another name")
            name = dv.name
        mountpoint = vt.str("mountpoint", dv.mountpoint)
        _check_system_path(vt, "mountpoint", mountpoint)
        props = dict(dv.properties)
        pt = vt.table("properties")
        for key, value in pt.data.items():
            pt.seen.add(key)
            if key not in VM_PROPERTIES:
                allowed = ", ".join(sorted(VM_PROPERTIES))
                pt.problem(key, f"not a property the installer sets, expected one of: {allowed}")
            elif not isinstance(value, str) or not _PROP_VALUE.fullmatch(value):
                pt.problem(key, 'expected a ZFS property value as a string, e.g. "64K"')
            else:
                props[key] = value
        vt.done()
        t.done()
        vm = VmDataset(
            bool(enabled),
            name or dv.name,
            mountpoint or dv.mountpoint,
            tuple(sorted(props.items())),
        )
        return Datasets(be or d.boot_environment, bool(home), vm)

    def system(self, t: _Table) -> System:
        d = System()
        hostname = t.str("hostname", d.hostname)
        if hostname is not None and (
            len(hostname) > 253
            or not all(_HOST_LABEL.fullmatch(label) for label in hostname.split("."))
        ):
            t.problem("hostname", f"{hostname!r} is not a valid host name, expected e.g. 'dom0'")
            hostname = d.hostname
        tz = t.str("timezone", d.timezone, pattern=_TIMEZONE, expected="a zone like Europe/Paris")
        loc = t.str("locale", d.locale, pattern=_LOCALE, expected="a UTF-8 locale like en_US.UTF-8")
        km = t.str("keymap", d.keymap, pattern=_KEYMAP, expected="a console keymap like 'us'")
        t.done()
        return System(hostname or d.hostname, tz or d.timezone, loc or d.locale, km or d.keymap)

    def users(self, top: _Table) -> tuple[User, ...]:
        out = []
        names: set[str] = set()
        for t in top.tables("users"):
            name = t.str("name", pattern=_USER, expected="a lower-case login name")
            if name in _SYSTEM_USERS:
                t.problem("name", f"{name!r} is a system account, expected a personal login")
                name = None
            if name in names:
                t.problem("name", f"{name!r} is defined twice")
            groups = t.strs("groups", ("wheel",))
            for i, g in enumerate(groups):
                if not _USER.fullmatch(g):
                    t.problem(nth("groups", i), f"{g!r} is not a group name")
            keys = t.strs("ssh_keys", ())
            for i, k in enumerate(keys):
                if not _SSH_KEY.fullmatch(k):
                    t.problem(
                        nth("ssh_keys", i),
                        "not an OpenSSH public key, expected 'ssh-ed25519 AAAA... comment'",
                    )
            pw = t.str("password_hash", None)
            if pw is not None and not _CRYPT.fullmatch(pw):
                # Never echo the value: it may be a plain password typed by mistake.
                t.problem(
                    "password_hash",
                    "not a crypt(3) hash, expected '$6$...' or '$y$...' "
                    "(make one with `openssl passwd -6`), never a plain password",
                )
                pw = None
            shell = t.str("shell", "/bin/bash")
            _check_system_path(t, "shell", shell)
            t.done()
            if name:
                names.add(name)
                out.append(User(name, tuple(groups), tuple(keys), pw, shell or "/bin/bash"))
        return tuple(out)

    def source(self, t: _Table, default_fpr: str, default_url: str | None) -> Source:
        url = t.str("url", None)
        if url is not None and not _URL.fullmatch(url):
            t.problem("url", f"{url!r} is not a URL, expected https://... or file://...")
        file = self.path(t, "file", None)
        sig = self.path(t, "signature", None)
        fprs = t.strs("fingerprints", (default_fpr,))
        clean = []
        for i, f in enumerate(fprs):
            c = f.replace(" ", "").upper()
            if not _FPR.fullmatch(c):
                t.problem(nth("fingerprints", i), "expected a 40-digit OpenPGP fingerprint")
            else:
                clean.append(c)
        if not fprs:
            t.problem("fingerprints", "is empty, expected at least one signing key fingerprint")
        if url and file:
            t.problem("file", "set either url or file, not both")
        if sig and not (url or file):
            t.problem("signature", "only makes sense together with url or file")
        t.done()
        return Source(url if not file else None, file, sig, tuple(clean))

    def gentoo(self, t: _Table, top: _Table) -> Gentoo | None:
        init = t.str("init", "openrc", choices=("openrc", "systemd"))
        split = t.bool("split_usr", False)
        hardened = t.bool("hardened", False)
        profile = t.str("profile", None)
        mirror = t.str("mirror", DEFAULT_MIRROR)
        if mirror and not _URL.fullmatch(mirror):
            t.problem("mirror", f"{mirror!r} is not a URL")
        keyring = self.path(t, "keyring", DEFAULT_KEYRING)
        packages = t.strs("packages", ())
        for i, atom in enumerate(packages):
            if not _ATOM.fullmatch(atom):
                t.problem(
                    nth("packages", i), f"{atom!r} is not a package atom like 'app-misc/tmux'"
                )
        stage3 = self.source(t.table("stage3"), RELENG_FINGERPRINT, None)
        snapshot = self.source(t.table("snapshot"), SNAPSHOT_FINGERPRINT, None)
        t.done()

        # The profile depends on the desktop choice, which the [desktop] section
        # owns (and reports problems for); only its two keys are peeked at here.
        raw_desktop = top.data.get("desktop")
        dt: dict = raw_desktop if isinstance(raw_desktop, dict) else {}
        desktop = None
        if dt.get("enabled") is True:
            env = dt.get("environment", "gnome")
            desktop = env if isinstance(env, str) else "gnome"
        if desktop not in (None, "gnome"):
            return None  # reported by the desktop section

        if profile:
            repl = profiles.deprecated_replacement(profile)
            if repl is not None:
                t.problem(
                    "profile",
                    f"{profile} is a deprecated pre-23.0 profile, expected its 23.0 successor "
                    f"{repl}",
                )
                return None
            variant = profiles.variant_for_profile(profile)
            if variant is None:
                supported = ", ".join(v.profile for v in profiles.SUPPORTED)
                known = "a known 23.0 profile but " if profile in profiles.KNOWN_23 else ""
                t.problem(
                    "profile",
                    f"{profile} is {known}not one the installer supports, expected one of: "
                    f"{supported}",
                )
                return None
            said = {
                "init": (init, variant.init) if t.has("init") else None,
                "split_usr": (split, not variant.merged_usr) if t.has("split_usr") else None,
                "hardened": (hardened, variant.hardened) if t.has("hardened") else None,
            }
            for key, pair in said.items():
                if pair is not None and pair[0] != pair[1]:
                    t.problem(
                        key,
                        f"{pair[0]!r} contradicts gentoo.profile {profile}, expected {pair[1]!r}",
                    )
            if variant.desktop != desktop:
                t.problem(
                    "profile",
                    f"{profile} {'is' if variant.desktop else 'is not'} a desktop profile but "
                    f"desktop.enabled = {str(bool(desktop)).lower()}",
                )
        else:
            if init is None or split is None or hardened is None:
                return None
            chosen = profiles.select(init, split, desktop, hardened)
            if isinstance(chosen, str):
                t.problem("", chosen)
                return None
            variant = chosen

        for key, src in (("stage3", stage3), ("snapshot", snapshot)):
            if key == "stage3" and src.file:
                got = profiles.stage3_variant_of(posixpath.basename(src.file))
                if got is not None and got != variant.stage3:
                    t.problem(
                        "stage3.file",
                        f"is a {got} stage3 but the profile {variant.profile} needs "
                        f"stage3-{variant.stage3}",
                    )
        return Gentoo(variant, stage3, snapshot, mirror or DEFAULT_MIRROR, keyring, packages)

    def kernel(self, t: _Table) -> Kernel:
        d = Kernel()
        pkg = t.str("package", d.package, choices=("gentoo-kernel-bin", "gentoo-kernel"))
        series = t.str("series", d.series, pattern=_SERIES, expected="a kernel series like '6.12'")
        t.done()
        return Kernel(pkg or d.package, series or d.series)

    def zfs(self, t: _Table) -> Zfs:
        arc = t.size("arc_max", Zfs().arc_max, minimum=64 * MIB, maximum=MAX_ARC)
        t.done()
        return Zfs(arc)

    def bootloader(self, t: _Table) -> Bootloader:
        d = Bootloader()
        kind = t.str("kind", d.kind, choices=("zfsbootmenu", "none"))
        url = t.str("zbm_url", d.zbm_url)
        if url and not _URL.fullmatch(url):
            t.problem("zbm_url", f"{url!r} is not a URL")
        # The default image comes with its pin; an image of your own is
        # pinned only if you say how (the plan notes an unpinned one).
        sha = t.str("zbm_sha256", d.zbm_sha256 if url == d.zbm_url else None)
        if sha == "":
            sha = None
        if sha is not None and not _SHA256.fullmatch(sha):
            t.problem("zbm_sha256", "expected 64 lower-case hex digits (sha256sum output)")
        cmdline = t.str("commandline", d.commandline)
        if cmdline and ("\n" in cmdline or '"' in cmdline):
            t.problem("commandline", "must be one line without double quotes")
        t.done()
        return Bootloader(kind or d.kind, url or d.zbm_url, sha, cmdline or d.commandline)

    def swap(self, t: _Table) -> Swap:
        d = Swap()
        mode = t.str("mode", d.mode, choices=("zram", "partition", "zvol", "none"))
        size = t.size("size", d.size, minimum=64 * MIB, maximum=MAX_SWAP)
        accept = t.bool("accept_zvol_swap_risk", False)
        t.done()
        if mode == "zvol" and not accept:
            t.problem(
                "mode",
                "swap on a zvol can deadlock under memory pressure (OpenZFS issue 7734); "
                "expected accept_zvol_swap_risk = true to use it anyway, or mode = 'zram'",
            )
        if accept and mode != "zvol":
            t.problem("accept_zvol_swap_risk", "only applies to mode = 'zvol'")
        return Swap(mode or d.mode, size, bool(accept))

    def firewall(self, t: _Table) -> Firewall:
        enabled = t.bool("enabled", True)
        sources = t.strs("ssh_sources", REQUIRED if enabled else ())
        clean = []
        for i, s in enumerate(sources or ()):
            try:
                clean.append(str(ipaddress.ip_network(s, strict=True)))
            except ValueError as e:
                t.problem(nth("ssh_sources", i), f"{s!r}: {e}, expected a network like 10.0.0.0/8")
        ping = t.bool("allow_ping", True)
        dhcp = t.bool("allow_dhcp", True)
        t.done()
        return Firewall(bool(enabled), tuple(clean), bool(ping), bool(dhcp))

    def sshd(self, t: _Table) -> Sshd:
        enabled = t.bool("enabled", True)
        port = t.int("port", 22, lo=1, hi=65535)
        t.done()
        return Sshd(bool(enabled), port if port is not None else 22)

    def network(self, t: _Table) -> Network:
        dhcp = t.bool("dhcp", True)
        t.done()
        return Network(bool(dhcp))

    def desktop(self, t: _Table) -> Desktop:
        d = Desktop()
        enabled = t.bool("enabled", False)
        env = t.str("environment", d.environment, choices=("gnome",))
        qxl = t.str("qxl_guests", d.qxl_guests, choices=("refuse", "warn"))
        t.done()
        return Desktop(bool(enabled), env or d.environment, qxl or d.qxl_guests)

    def dom0(self, t: _Table) -> Dom0 | None:
        policy = self.path(t, "policy")
        wheel = self.path(t, "wheel", None)
        package = t.str("package", None)
        venv = t.str("venv", "/opt/dom0")
        if venv is not None and venv != "/opt/dom0":
            t.problem(
                "venv",
                f"{venv!r} is not supported, expected /opt/dom0 (the shipped service "
                "files run /opt/dom0/bin/dom0; see docs/operations.md)",
            )
        state = t.str("state_dir", "/var/lib/dom0")
        _check_system_path(t, "state_dir", state)
        t.done()
        if wheel and package:
            t.problem("package", "set either wheel or package, not both")
        if not wheel and not package:
            t.problem(
                "wheel",
                "missing, expected the dom0 wheel to install (python3 -m pip wheel --no-deps "
                "-w dist .) or `package` (a pip requirement)",
            )
        if wheel and not wheel.endswith(".whl"):
            t.problem("wheel", f"{wheel!r} is not a .whl file")
        if policy is None:
            return None
        return Dom0(policy, wheel, package, venv or "/opt/dom0", state or "/var/lib/dom0")

    # -- rules spanning sections

    def disks_fit(self, disks: Disks, swap: Swap) -> None:
        """The partitions fit each disk that is there to measure (like the
        policy file, a disk is read when it can be; `plan` on another machine
        checks only the fixed bounds)."""
        for dev in disks.devices:
            size = identity.device_size(dev)
            if size is None:
                continue
            pool = size - disks.esp_size - 2 * MIB  # GPT and alignment
            parts = [f"esp_size {format_size(disks.esp_size)}"]
            if swap.mode == "partition":
                pool -= swap.size
                parts.append(f"a {format_size(swap.size)} swap partition")
            need_pool = MIN_POOL + (swap.size if swap.mode == "zvol" else 0)
            if swap.mode == "zvol":
                parts.append(f"a {format_size(swap.size)} swap zvol")
            if pool < need_pool:
                where = "swap.size" if swap.mode in ("partition", "zvol") else "disks.esp_size"
                self.top.checker.bad(
                    where,
                    f"does not fit {dev} ({identity.human_size(size)}): {' + '.join(parts)} + "
                    f"{format_size(MIN_POOL)} for the system need more, expected smaller sizes "
                    "or a bigger disk",
                )

    def cross_checks(self, p: dict[str, Any]) -> None:
        bad = self.top.checker.bad
        sshd: Sshd = p["sshd"]
        users: tuple[User, ...] = p["users"]
        if sshd.enabled and not any(u.ssh_keys for u in users):
            bad(
                "users",
                "sshd is key-only but no user has ssh_keys, expected at least one "
                "[[users]] with ssh_keys (or sshd.enabled = false)",
            )
        dom0_cfg = p.get("dom0")
        firewall = p.get("firewall")
        if dom0_cfg is not None and firewall is not None and firewall.enabled and sshd.enabled:
            # Checked here when the policy can be read (it is an input file;
            # `dom0 install validate` checks the installed copy too).
            text = readable(dom0_cfg.policy)
            if text is not None:
                why = ssh_handover_problem(text, dom0_cfg.policy, firewall.ssh_sources, sshd.port)
                if why:
                    bad("dom0.policy", why)
        self.disks_fit(p["disks"], p["swap"])
        vm: VmDataset = p["datasets"].vm
        if vm.enabled and p["datasets"].home and vm.mountpoint == "/home":
            bad("datasets.vm.mountpoint", "collides with the home dataset")
