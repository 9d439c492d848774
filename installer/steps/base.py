"""A small helper to build one step: stable op ids, paths inside the target."""

from __future__ import annotations

from installer.config import Config
from installer.files import SERVICES
from installer.ops import (
    CopyFile,
    EnsureLine,
    Guard,
    MakeDir,
    Op,
    Probe,
    Run,
    Step,
    Symlink,
    WriteFile,
    WriteSecret,
)
from installer.paths import in_target


class StepBuilder:
    def __init__(self, cfg: Config, step_id: str, title: str, *, session: bool = False) -> None:
        self.cfg = cfg
        self.root = cfg.install.target
        self.step_id = step_id
        self.title = title
        self.session = session
        self._ops: list[Op] = []
        self._names: set[str] = set()

    def oid(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate op name {name!r} in step {self.step_id}")
        self._names.add(name)
        return f"{self.step_id}/{name}"

    def t(self, system_path: str) -> str:
        """A path of the installed system, as a path on the live system."""
        return in_target(self.root, system_path)

    def add(self, op: Op) -> None:
        self._ops.append(op)

    def run(
        self,
        name: str,
        *argv: str,
        skip_if: Guard | None = None,
        idempotent: bool = False,
        stdin_secret: str | None = None,
        requires: Probe | None = None,
    ) -> None:
        if skip_if is None and not idempotent:
            raise ValueError(f"{self.step_id}/{name}: a command needs a guard or idempotent=True")
        self.add(Run(self.oid(name), tuple(argv), skip_if, idempotent, stdin_secret, requires))

    def chroot(self, name: str, *argv: str, **kw) -> None:
        self.run(name, "chroot", self.root, *argv, **kw)

    def write(
        self, name: str, system_path: str, content: str, mode: int = 0o644, owner: str | None = None
    ) -> None:
        self.add(WriteFile(self.oid(name), self.t(system_path), content, mode, owner, self.root))

    def write_secret(self, name: str, system_path: str, secret: str, mode: int = 0o600) -> None:
        self.add(WriteSecret(self.oid(name), self.t(system_path), secret, mode, self.root))

    def copy(
        self, name: str, src: str, system_path: str, mode: int = 0o644, secret: bool = False
    ) -> None:
        self.add(CopyFile(self.oid(name), src, self.t(system_path), mode, secret, self.root))

    def mkdir(self, name: str, system_path: str, mode: int = 0o755, owner: str | None = None):
        self.add(MakeDir(self.oid(name), self.t(system_path), mode, owner, self.root))

    def symlink(self, name: str, system_path: str, target: str) -> None:
        self.add(Symlink(self.oid(name), self.t(system_path), target, self.root))

    def ensure_line(self, name: str, system_path: str, line: str) -> None:
        self.add(EnsureLine(self.oid(name), self.t(system_path), line, self.root))

    def enable(self, key: str) -> None:
        """Enable a service of the installed system for its init system."""
        openrc, level, unit = SERVICES[key]
        if self.cfg.init == "openrc":
            if openrc:
                self.chroot(f"enable-{openrc}", "rc-update", "add", openrc, level, idempotent=True)
        elif unit:
            self.chroot(f"enable-{unit}", "systemctl", "enable", unit, idempotent=True)

    def build(self) -> Step:
        return Step(self.step_id, self.title, tuple(self._ops), self.session)


def zfs_exists(name: str) -> Probe:
    return Probe(("zfs", "list", "-H", "-o", "name", name))


def pool_imported(pool: str) -> Probe:
    return Probe(("zpool", "list", "-H", "-o", "name", pool))


def zfs_mounted(name: str) -> Probe:
    return Probe(("zfs", "get", "-H", "-o", "value", "mounted", name), expect="yes")


def mounted(path: str) -> Probe:
    return Probe(("mountpoint", "-q", path))


def not_mounted(path: str) -> Probe:
    return Probe(("mountpoint", "-q", path), invert=True)


def fs_type(device: str, kind: str) -> Probe:
    return Probe(("blkid", "-p", "-s", "TYPE", "-o", "value", device), expect=kind)
