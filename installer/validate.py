"""Check an installed tree against its config: `dom0 install validate`.

Every check reads the tree below `root` with chroot semantics (an absolute
symlink in the tree points into the tree, never at the live system) and gives
one `Result`: ok, fail (with what was expected), or skip (with why). The same
checks run inside `apply`: right after extraction (the stage3 and repository
checks) and at the end (everything).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from installer import files, identity, profiles
from installer.config import Config
from installer.initramfs import InitramfsError, read_members
from installer.paths import PathError, resolve_in_root
from installer.takeover import ssh_handover_problem

REPO = "var/db/repos/gentoo"

# What a stage3 has at its top level; anything else is a stray (the old
# installer once left a whole tree in `profile/`).
STAGE3_TOP = frozenset(
    [
        "bin",
        "boot",
        "dev",
        "etc",
        "home",
        "lib",
        "lib32",
        "lib64",
        "media",
        "mnt",
        "opt",
        "proc",
        "root",
        "run",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "var",
    ]
)


@dataclass(frozen=True)
class Result:
    id: str
    status: str  # "ok" | "fail" | "skip" | "warn" (worth a look, not a failure)
    detail: str


def ok(cid: str, detail: str) -> Result:
    return Result(cid, "ok", detail)


def fail(cid: str, detail: str) -> Result:
    return Result(cid, "fail", detail)


def skip(cid: str, detail: str) -> Result:
    return Result(cid, "skip", detail)


def warn(cid: str, detail: str) -> Result:
    return Result(cid, "warn", detail)


def check(cid: str, good: bool, yes: str, no: str) -> Result:
    return ok(cid, yes) if good else fail(cid, no)


class Tree:
    """Read-only view of an installed system."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _rel(self, path: str) -> str:
        return path.strip("/")

    def path(self, path: str, *, follow: bool = True) -> str:
        rel = self._rel(path)
        if not rel:
            return self.root
        return resolve_in_root(self.root, rel, follow_last=follow)

    def exists(self, path: str) -> bool:
        try:
            return os.path.lexists(self.path(path))
        except PathError:
            return False

    def isdir(self, path: str) -> bool:
        try:
            return os.path.isdir(self.path(path))
        except PathError:
            return False

    def isfile(self, path: str) -> bool:
        try:
            return os.path.isfile(self.path(path))
        except PathError:
            return False

    def islink(self, path: str) -> bool:
        return os.path.islink(self.path(path, follow=False))

    def readlink(self, path: str) -> str | None:
        p = self.path(path, follow=False)
        return os.readlink(p) if os.path.islink(p) else None

    def read_bytes(self, path: str) -> bytes | None:
        try:
            with open(self.path(path), "rb") as f:
                return f.read()
        except (OSError, PathError):
            return None

    def read(self, path: str) -> str | None:
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", "replace")

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(path)))
        except (OSError, PathError):
            return []

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.path(path))
        except (OSError, PathError):
            return None

    def installed(self, atom: str) -> list[str]:
        """Versions of `cat/pkg` in the package database (var/db/pkg)."""
        cat, pn = atom.split("/", 1)
        pat = re.compile(rf"^{re.escape(pn)}-([0-9][^/]*)$")
        return [m.group(1) for d in self.listdir(f"var/db/pkg/{cat}") if (m := pat.match(d))]

    def passwd(self) -> dict[str, list[str]]:
        out = {}
        for line in (self.read("etc/passwd") or "").splitlines():
            parts = line.split(":")
            if len(parts) >= 7:
                out[parts[0]] = parts
        return out

    def enabled(self, cfg: Config, key: str) -> bool:
        openrc, level, unit = files.SERVICES[key]
        if cfg.init == "openrc":
            # Enabled means the runlevel link is there (rc-update refuses to make
            # one for a service without an init script).
            try:
                return os.path.lexists(self.path(f"etc/runlevels/{level}/{openrc}", follow=False))
            except PathError:
                return False
        for wants in self.listdir("etc/systemd/system"):
            if wants.endswith((".wants", ".requires")) and os.path.lexists(
                os.path.join(self.path(f"etc/systemd/system/{wants}"), unit)
            ):
                return True
        return False


# ---------------------------------------------------------------- the tree


def expected_top(cfg: Config) -> frozenset[str]:
    extra = {"efi"} | {files.esp_mountpoint(i).strip("/") for i in range(len(cfg.disks.devices))}
    if cfg.datasets.home:
        extra.add("home")
    if cfg.datasets.vm.enabled:
        extra.add(cfg.datasets.vm.mountpoint.strip("/").split("/")[0])
    return STAGE3_TOP | extra


def stage3_checks(cfg: Config, t: Tree) -> list[Result]:
    out = []
    top = set(t.listdir(""))
    stray = sorted(top - expected_top(cfg))
    out.append(
        check(
            "tree.top-level",
            not stray,
            "only the expected top-level folders",
            f"unexpected at the top of {t.root}: {', '.join(stray)} "
            "(a stage3 or snapshot extracted into the wrong place?)",
        )
    )
    missing = [d for d in ("etc", "usr", "var", "bin") if not t.exists(d)]
    out.append(
        check(
            "tree.stage3",
            not missing,
            "etc, usr, var and bin are there",
            f"missing {', '.join(missing)}: not a stage3 extracted into this root",
        )
    )
    out.append(
        check(
            "tree.etc-portage",
            t.isdir("etc/portage"),
            "etc/portage is a directory",
            "etc/portage is missing: expected the stage3's Portage configuration",
        )
    )
    out.append(usr_layout(cfg, t))
    out.append(init_matches(cfg, t))
    return out


def usr_layout(cfg: Config, t: Tree) -> Result:
    merged = cfg.gentoo.variant.merged_usr
    names = ["bin", "sbin", "lib"]
    links = {n: t.readlink(n) for n in names}
    if merged:
        bad = [
            f"/{n} -> {links[n]}" if links[n] else f"/{n} is not a symlink"
            for n in names
            if not (
                (target := links[n]) and posixpath.normpath(target).lstrip("/").startswith("usr/")
            )
        ]
        return check(
            "usr.layout",
            not bad,
            "merged /usr: /bin, /sbin, /lib link into /usr",
            f"the profile wants a merged /usr but {'; '.join(bad)}",
        )
    bad = [f"/{n} -> {links[n]}" for n in names if links[n]]
    bad += [f"/{n} missing" for n in names if not links[n] and not t.isdir(n)]
    return check(
        "usr.layout",
        not bad,
        "split /usr: /bin, /sbin, /lib are real directories",
        f"the profile wants a split /usr but {'; '.join(bad)}",
    )


def init_matches(cfg: Config, t: Tree) -> Result:
    want = cfg.init
    has_openrc = bool(t.installed("sys-apps/openrc"))
    has_systemd = bool(t.installed("sys-apps/systemd"))
    got = (
        "openrc"
        if has_openrc and not has_systemd
        else "systemd"
        if has_systemd and not has_openrc
        else "both"
        if has_openrc
        else "none"
    )
    return check(
        "init.stage3",
        got == want,
        f"the stage3 runs {want}",
        f"the stage3 has init {got!r} (var/db/pkg), the config wants {want!r}: "
        f"use stage3-{cfg.gentoo.variant.stage3}",
    )


def repo_checks(cfg: Config, t: Tree) -> list[Result]:
    out = []
    name = (t.read(f"{REPO}/profiles/repo_name") or "").strip()
    out.append(
        check(
            "tree.repo",
            t.isdir(f"{REPO}/profiles") and name == "gentoo",
            f"{REPO}/profiles is the gentoo repository",
            f"{REPO}/profiles/repo_name is {name or 'missing'!r}, expected 'gentoo'",
        )
    )
    nested = [
        d for d in t.listdir(REPO) if t.isdir(f"{REPO}/{d}/profiles") and d not in ("profiles",)
    ]
    out.append(
        check(
            "tree.repo-stripped",
            not nested,
            "the snapshot's top folder was stripped",
            f"found {REPO}/{nested[0] if nested else ''}/profiles: the snapshot was extracted "
            "without stripping its top folder",
        )
    )
    stray = [d for d in ("profile", "profiles", "gentoo", "portage") if t.exists(d)]
    out.append(
        check(
            "tree.no-stray-profile",
            not stray,
            "no repository or profile folder at the top of the tree",
            f"{', '.join('/' + s for s in stray)} at the top of the tree: a repository or "
            "profile extracted into the wrong place",
        )
    )
    profile = cfg.gentoo.variant.profile
    pdir = f"{REPO}/profiles/{profile}"
    deprecated = t.exists(f"{pdir}/deprecated")
    out.append(
        check(
            "profile.available",
            t.isdir(pdir) and not deprecated,
            f"{profile} exists in the repository",
            f"{profile} is {'deprecated' if deprecated else 'missing'} in the repository",
        )
    )
    return out


def profile_checks(cfg: Config, t: Tree) -> list[Result]:
    profile = cfg.gentoo.variant.profile
    out = []
    link = t.readlink("etc/portage/make.profile")
    want = os.path.join(t.root, REPO, "profiles", profile)
    got = t.path("etc/portage/make.profile") if link else None
    out.append(
        check(
            "profile.link",
            got == want and os.path.isdir(want),
            f"/etc/portage/make.profile -> {profile}",
            f"/etc/portage/make.profile is {link or 'not a symlink'!r}, expected a link to "
            f"/{REPO}/profiles/{profile}",
        )
    )
    target = posixpath.relpath(got, os.path.join(t.root, REPO, "profiles")) if got else ""
    repl = profiles.deprecated_replacement(target) if target else None
    out.append(
        check(
            "profile.version",
            bool(target) and "/23.0" in "/" + target and repl is None,
            "a 23.0 profile",
            f"{target or 'no profile'} is not a 23.0 profile" + (f"; use {repl}" if repl else ""),
        )
    )
    expect_systemd = cfg.init == "systemd"
    out.append(
        check(
            "profile.init",
            ("/systemd" in "/" + target) == expect_systemd,
            f"the profile is for {cfg.init}",
            f"the profile {target} does not match init = {cfg.init}",
        )
    )
    return out


# ---------------------------------------------------------------- system


def _same_file(t: Tree, path: str, content: str, cid: str, what: str) -> Result:
    got = t.read(path)
    if got is None:
        return fail(cid, f"{path} is missing ({what})")
    return check(
        cid,
        got == content,
        f"{path}: {what}",
        f"{path} differs from what the config asks for (edited, or a different config?)",
    )


def system_checks(cfg: Config, t: Tree) -> list[Result]:
    out = []
    for path, content in files.hostname_files(cfg).items():
        out.append(_same_file(t, path, content, "system.hostname", cfg.system.hostname))
    tz = t.readlink("etc/localtime") or ""
    out.append(
        check(
            "system.timezone",
            tz.endswith(f"zoneinfo/{cfg.system.timezone}"),
            cfg.system.timezone,
            f"/etc/localtime -> {tz or 'nothing'}, expected zoneinfo/{cfg.system.timezone}",
        )
    )
    fstab = t.read("etc/fstab")
    out.append(fstab_check(cfg, fstab))
    return out


def fstab_entries(text: str) -> list[list[str]]:
    return [
        line.split()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def fstab_check(cfg: Config, text: str | None) -> Result:
    if text is None:
        return fail("fstab.swap", "/etc/fstab is missing")
    swaps = sorted(e[0] for e in fstab_entries(text) if len(e) >= 3 and e[2] == "swap")
    want = sorted(files.swap_devices(cfg))
    return check(
        "fstab.swap",
        swaps == want,
        f"swap lines match mode {cfg.swap.mode!r}: {', '.join(want) or 'none'}",
        f"fstab swap lines {swaps or 'none'} do not match mode {cfg.swap.mode!r} "
        f"(expected {want or 'none'})",
    )


def swap_checks(cfg: Config, t: Tree) -> list[Result]:
    out = []
    mode = cfg.swap.mode
    if mode == "zram":
        path, content = files.zram_file(cfg)
        out.append(_same_file(t, path, content, "swap.zram", "zram swap configured"))
        pkg = "sys-block/zram-init" if cfg.init == "openrc" else "sys-apps/zram-generator"
        out.append(
            check(
                "swap.zram-package",
                bool(t.installed(pkg)),
                f"{pkg} installed",
                f"{pkg} is not installed",
            )
        )
        if cfg.init == "openrc":
            out.append(service(cfg, t, "zram"))
    elif mode == "partition" and cfg.encrypted:
        path, content = files.dmcrypt_file(cfg)
        out.append(
            _same_file(
                t, path, content, "swap.crypt", "swap partitions encrypted with a random key"
            )
        )
        if cfg.init == "openrc":
            out.append(service(cfg, t, "dmcrypt"))
    elif mode == "zvol":
        out.append(
            skip(
                "swap.zvol",
                f"the zvol {files.zvol_swap(cfg)} lives in the pool, "
                "not in the tree (fstab is checked)",
            )
        )
    path, content = files.nohibernate_file(cfg)
    out.append(_same_file(t, path, content, "swap.no-hibernate", "hibernation disabled"))
    return out


def service(cfg: Config, t: Tree, key: str) -> Result:
    name = files.service_name(cfg, key)
    return check(
        f"service.{name}",
        t.enabled(cfg, key),
        f"{name} enabled ({cfg.init})",
        f"{name} is not enabled for {cfg.init}",
    )


def firewall_checks(cfg: Config, t: Tree) -> list[Result]:
    if not cfg.firewall.enabled:
        return [skip("firewall", "firewall.enabled = false")]
    out = [
        _same_file(
            t,
            files.BASELINE_PATH,
            files.firewall_baseline(cfg),
            "firewall.baseline",
            "fail-closed baseline with the configured SSH sources",
        ),
        _same_file(
            t,
            files.EMERGENCY_PATH,
            files.firewall_emergency(),
            "firewall.emergency",
            "emergency ruleset",
        ),
    ]
    path, content, _mode = files.firewall_service(cfg)
    out.append(_same_file(t, path, content, "firewall.service-file", "loads the baseline at boot"))
    out.append(service(cfg, t, "firewall"))
    text = files.firewall_baseline(cfg)
    closed = text.count("policy drop;") >= 2
    out.append(
        check(
            "firewall.fail-closed",
            closed,
            "input and forward policy drop",
            "the baseline does not drop by default",
        )
    )
    if cfg.sshd.enabled and cfg.dom0 is not None:
        policy = t.read(files.POLICY_PATH)
        if policy is None:
            out.append(fail("firewall.handover", f"{files.POLICY_PATH} is missing"))
        else:
            why = ssh_handover_problem(
                policy, files.POLICY_PATH, cfg.firewall.ssh_sources, cfg.sshd.port
            )
            out.append(
                check(
                    "firewall.handover",
                    why is None,
                    "the dom0 policy keeps SSH open from the baseline's sources",
                    why or "",
                )
            )
    for svc in ["sshd"] * cfg.sshd.enabled + ["dhcpcd"] * cfg.network.dhcp:
        path, line = files.needs_firewall(cfg, svc)
        body = t.read(path) or ""
        out.append(
            check(
                f"firewall.before-{svc}",
                line in body,
                f"{svc} does not start without the firewall",
                f"{path} lacks {line.splitlines()[0]!r}",
            )
        )
    return out


def sshd_checks(cfg: Config, t: Tree) -> list[Result]:
    if not cfg.sshd.enabled:
        return [skip("sshd", "sshd.enabled = false")]
    out = [
        _same_file(
            t,
            files.SSHD_DROPIN,
            files.sshd_dropin(cfg),
            "sshd.key-only",
            "password and keyboard-interactive logins off",
        )
    ]
    main = t.read("etc/ssh/sshd_config") or ""
    first = next(
        (ln.strip() for ln in main.splitlines() if ln.strip() and not ln.lstrip().startswith("#")),
        "",
    )
    out.append(
        check(
            "sshd.include",
            first == files.SSHD_INCLUDE,
            "sshd_config includes sshd_config.d/ first",
            f"the first setting of /etc/ssh/sshd_config is {first!r}, expected "
            f"{files.SSHD_INCLUDE!r} (sshd keeps the first value it reads)",
        )
    )
    out.append(service(cfg, t, "sshd"))
    return out


def user_checks(cfg: Config, t: Tree) -> list[Result]:
    out = []
    pw = t.passwd()
    for u in cfg.users:
        entry = pw.get(u.name)
        out.append(
            check(
                f"user.{u.name}",
                entry is not None,
                f"{u.name} exists",
                f"{u.name} is not in /etc/passwd",
            )
        )
        if not u.ssh_keys:
            continue
        path = f"home/{u.name}/.ssh/authorized_keys"
        st = t.lstat(path)
        body = t.read(path)
        good = (
            body == files.authorized_keys(u.ssh_keys)
            and st is not None
            and stat.S_IMODE(st.st_mode) == 0o600
            and (entry is None or str(st.st_uid) == entry[2])
        )
        out.append(
            check(
                f"user.{u.name}.keys",
                good,
                "authorized_keys: the keys, 0600, own",
                f"/{path} is missing, differs, or is not 0600 and owned by {u.name}",
            )
        )
    return out


# ---------------------------------------------------------------- ZFS


def zfs_checks(cfg: Config, t: Tree) -> list[Result]:
    out = []
    hostid = t.read_bytes("etc/hostid")
    out.append(
        check(
            "zfs.hostid",
            hostid is not None and len(hostid) == 4 and hostid != b"\0\0\0\0",
            "/etc/hostid holds a host id",
            "/etc/hostid is missing or not 4 bytes (zgenhostid)",
        )
    )
    out.append(
        _same_file(
            t,
            "etc/dracut.conf.d/dom0-zfs.conf",
            files.dracut_conf(cfg),
            "zfs.dracut",
            "initramfs with zfs, hostid, ARC cap" + (", key" if cfg.encrypted else ""),
        )
    )
    out.append(
        _same_file(
            t,
            "etc/modprobe.d/zfs.conf",
            files.modprobe_zfs(cfg),
            "zfs.arc",
            f"ARC capped at {cfg.zfs.arc_max} bytes",
        )
    )
    out.append(
        _same_file(
            t,
            "etc/portage/package.mask/dom0-kernel",
            files.package_mask(cfg),
            "zfs.kernel-pin",
            f"kernel kept on {cfg.kernel.series}",
        )
    )
    use = t.read("etc/portage/package.use/dom0") or ""
    out.append(
        check(
            "zfs.dist-kernel",
            "sys-fs/zfs-kmod dist-kernel" in use,
            "zfs-kmod is rebuilt with each kernel",
            "package.use lacks 'sys-fs/zfs-kmod dist-kernel'",
        )
    )
    for pkg in ("sys-fs/zfs", "sys-fs/zfs-kmod", f"sys-kernel/{cfg.kernel.package}"):
        vs = t.installed(pkg)
        out.append(
            check(f"package.{pkg}", bool(vs), f"{pkg}-{', '.join(vs)}", f"{pkg} is not installed")
        )
    out += kernel_fit(cfg, t)
    out += initramfs_checks(cfg, t, hostid)
    for key in files.services_for(cfg):
        out.append(service(cfg, t, key))
    if cfg.encrypted:
        st = t.lstat(files.key_path(cfg))
        out.append(
            check(
                "zfs.key",
                st is not None and stat.S_IMODE(st.st_mode) & 0o077 == 0,
                f"{files.key_path(cfg)} present, 0600",
                f"{files.key_path(cfg)} is missing or readable by others",
            )
        )
    return out


def _series(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def kernel_fit(cfg: Config, t: Tree) -> list[Result]:
    """The kernel stays on its series, and each installed kernel has a ZFS module."""
    out = []
    want = _series(cfg.kernel.series)
    versions = t.installed(f"sys-kernel/{cfg.kernel.package}")
    off = [v for v in versions if _series(v) != want]
    out.append(
        check(
            "kernel.series",
            bool(versions) and not off,
            f"kernel on the {cfg.kernel.series} series",
            f"kernel versions {versions or 'none'} are not all on {cfg.kernel.series}",
        )
    )
    kvers = t.listdir("lib/modules")
    if not kvers:
        out.append(fail("zfs.module", "no kernel in /lib/modules"))
    for kv in kvers:
        mods = [
            f"lib/modules/{kv}/{d}/zfs.ko{ext}"
            for d in ("extra", "updates", "extra/zfs")
            for ext in ("", ".xz", ".zst", ".gz")
        ]
        found = any(t.exists(m) for m in mods)
        out.append(
            check(
                f"zfs.module.{kv}",
                found,
                f"zfs.ko built for {kv}",
                f"no zfs.ko for kernel {kv}: the kernel ran ahead of zfs-kmod",
            )
        )
    return out


def initramfs_checks(cfg: Config, t: Tree, hostid: bytes | None) -> list[Result]:
    images = [n for n in t.listdir("boot") if n.startswith("initramfs-") and n.endswith(".img")]
    if not images:
        return [fail("initramfs", "no /boot/initramfs-*.img (emerge --config the kernel)")]
    out = []
    for name in images:
        data = t.read_bytes(f"boot/{name}") or b""
        try:
            members = read_members(data)
        except (InitramfsError, OSError, EOFError, ValueError) as e:
            out.append(fail(f"initramfs.{name}", f"cannot read: {e}"))
            continue
        problems = []
        if members.get("etc/hostid") != hostid:
            problems.append("its /etc/hostid differs from the system's")
        if members.get("etc/modprobe.d/zfs.conf") != (t.read_bytes("etc/modprobe.d/zfs.conf")):
            problems.append("its ARC setting differs")
        if cfg.encrypted and files.key_path(cfg).lstrip("/") not in members:
            problems.append("the pool key is missing (ZFSBootMenu would ask twice)")
        out.append(
            check(
                f"initramfs.{name}",
                not problems,
                "hostid and ARC cap baked in" + (", key too" if cfg.encrypted else ""),
                "; ".join(problems),
            )
        )
    return out


# ---------------------------------------------------------------- desktop, dom0, boot


def pam_lines(t: Tree, name: str, seen: set[str] | None = None) -> list[list[str]]:
    """The PAM stack of /etc/pam.d/NAME with include/substack followed."""
    seen = seen if seen is not None else set()
    if name in seen:
        return []
    seen.add(name)
    out = []
    for raw in (t.read(f"etc/pam.d/{name}") or "").splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0].startswith("@include") and len(words) > 1:
            out += pam_lines(t, words[1], seen)
            continue
        if len(words) >= 3 and words[1] in ("include", "substack"):
            out += pam_lines(t, words[2], seen)
            continue
        out.append(words)
    return out


def desktop_checks(cfg: Config, t: Tree) -> list[Result]:
    dms = [p for p in files.DISPLAY_MANAGERS if t.installed(p)]
    if not cfg.desktop.enabled:
        return [
            check(
                "desktop.no-display-manager",
                not dms and not t.enabled(cfg, "display-manager"),
                "desktop off: no display manager installed or enabled",
                f"desktop is off but {', '.join(dms) or 'a display manager'} is there",
            )
        ]
    out = [
        check("desktop.gdm", "gnome-base/gdm" in dms, "GDM installed", "GDM is not installed"),
        service(cfg, t, "display-manager"),
    ]
    custom = t.read(files.GDM_CUSTOM) or ""
    autologin = re.search(r"^\s*(Automatic|Timed)LoginEnable\s*=\s*true", custom, re.M | re.I)
    out.append(
        check(
            "desktop.no-autologin",
            bool(custom) and not autologin,
            "GDM autologin off",
            "GDM autologin is on or custom.conf is missing",
        )
    )
    stack = pam_lines(t, "gdm-password")
    keyring = {w[0].lstrip("-") for w in stack if any("pam_gnome_keyring.so" in x for x in w)}
    out.append(
        check(
            "desktop.keyring-pam",
            {"auth", "session"} <= keyring,
            "the keyring is unlocked by PAM at login (auth + session)",
            "the gdm-password PAM stack lacks pam_gnome_keyring in auth and session "
            f"(has: {', '.join(sorted(keyring)) or 'none'})",
        )
    )
    out.append(
        _same_file(
            t,
            files.VIDEO_HOOK,
            files.video_hook(cfg),
            "desktop.vm-video",
            f"qxl guests: {cfg.desktop.qxl_guests}, virtio expected",
        )
    )
    return out


def dom0_checks(cfg: Config, t: Tree) -> list[Result]:
    out = [
        check(
            "dom0.installed",
            t.exists(f"{cfg.dom0.venv}/bin/dom0"),
            f"{cfg.dom0.venv}/bin/dom0 present",
            f"{cfg.dom0.venv}/bin/dom0 is missing",
        )
    ]
    want = None
    try:
        with open(cfg.dom0.policy, "rb") as f:
            want = f.read()
    except OSError:
        pass
    got = t.read_bytes(files.POLICY_PATH)
    if want is None:
        out.append(
            check(
                "dom0.policy",
                got is not None,
                f"{files.POLICY_PATH} present",
                f"{files.POLICY_PATH} is missing",
            )
        )
    else:
        out.append(
            check(
                "dom0.policy",
                got == want,
                f"{files.POLICY_PATH} is the configured policy",
                f"{files.POLICY_PATH} differs from {cfg.dom0.policy}",
            )
        )
    checks = [
        ("dom0.settings", "its paths"),
        ("dom0.service-file", "as shipped in init/"),
        ("dom0.logrotate", "as shipped in init/"),
    ]
    for (cid, what), (path, content, _mode) in zip(checks, files.dom0_files(cfg), strict=False):
        out.append(_same_file(t, path, content, cid, what))
    out.append(service(cfg, t, "dom0"))
    return out


def boot_checks(cfg: Config, t: Tree) -> list[Result]:
    if cfg.bootloader.kind == "none":
        return [skip("boot", "bootloader.kind = 'none'")]
    out = []
    kernels = [n for n in t.listdir("boot") if n.startswith(("vmlinuz-", "kernel-"))]
    out.append(
        check(
            "boot.kernel",
            bool(kernels),
            f"kernel in /boot: {', '.join(kernels)}",
            "no kernel in /boot for ZFSBootMenu to find",
        )
    )
    for i in range(len(cfg.disks.devices)):
        mp = files.esp_mountpoint(i).strip("/")
        if not t.listdir(mp):
            out.append(skip(f"boot.esp{i}", f"/{mp} is empty: mount the ESP there to check it"))
            continue
        out.append(
            check(
                f"boot.esp{i}",
                t.isfile(f"{mp}/EFI/zbm/zfsbootmenu.EFI"),
                f"ZFSBootMenu on /{mp}",
                f"/{mp}/EFI/zbm/zfsbootmenu.EFI is missing",
            )
        )
    return out


def disk_checks(cfg: Config, t: Tree) -> list[Result]:
    out = []
    for i, dev in enumerate(cfg.disks.devices):
        if identity.kernel_name(dev):
            out.append(warn(f"disks.name{i}", identity.kernel_name_warning(dev)))
        else:
            out.append(ok(f"disks.name{i}", f"{dev}: a stable name"))
    return out


SECTIONS: tuple[Callable[[Config, Tree], list[Result]], ...] = (
    disk_checks,
    stage3_checks,
    repo_checks,
    profile_checks,
    system_checks,
    swap_checks,
    firewall_checks,
    sshd_checks,
    user_checks,
    zfs_checks,
    desktop_checks,
    dom0_checks,
    boot_checks,
)


def validate(cfg: Config, root: str) -> list[Result]:
    t = Tree(root)
    out: list[Result] = []
    for section in SECTIONS:
        out += section(cfg, t)
    return out


def failures(results: Iterable[Result]) -> list[Result]:
    return [r for r in results if r.status == "fail"]


def render_text(results: list[Result]) -> str:
    width = max((len(r.id) for r in results), default=0)
    lines = [f"{r.status.upper():<4}  {r.id:<{width}}  {r.detail}" for r in results]
    bad = len(failures(results))
    warned = sum(r.status == "warn" for r in results)
    also = f" ({warned} with a warning)" if warned else ""
    lines.append(
        f"{len(results)} checks: {len(results) - bad} passed or skipped{also}, {bad} failed"
    )
    return "\n".join(lines) + "\n"


def render_json(root: str, results: list[Result]) -> str:
    data = {
        "root": root,
        "ok": not failures(results),
        "checks": [asdict(r) for r in results],
    }
    return json.dumps(data, indent=2) + "\n"
