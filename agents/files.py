"""The agent's files, all under its root directory (`--root`, 0700):

    ROOT/tls.key      its TLS key (P-256), made here, 0600: it never leaves the VM
    ROOT/cert.pem     its certificate and the intermediate that issued it (0644)
    ROOT/ca.pem       dom0's root certificate, pinned at enrollment (0644)
    ROOT/wg.key       its WireGuard key, made here, 0600 (agents/apply.py)
    ROOT/token        an enrollment token put there by the operator or the lab
                      (0600); deleted once it has been used
    ROOT/config.json  the last configuration it applied and ACKed, with its
                      version: the last-known-good it applies at start
    ROOT/hostname     the hostname of that configuration
    ROOT/wireguard/   the userspace WireGuard backend's state

Every write is a new file renamed over the old one (fsync'd first), so a
crash leaves the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import agentconfig
from common.agentconfig import MachineConfig

MAX_FILE = 1 << 20  # bytes: no file of the agent's is larger


class FileError(Exception):
    """One line naming the file and what is wrong with it."""


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # (the umask does not widen or narrow it)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_private(path: Path) -> bytes:
    """A secret file, refused (not tightened) if others may read it: it must
    then be considered leaked."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise
    if not stat.S_ISREG(st.st_mode):
        raise FileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise FileError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, expected 0600")
    if st.st_uid != os.geteuid():
        raise FileError(f"{path}: owned by uid {st.st_uid}, expected {os.geteuid()}")
    if st.st_size > MAX_FILE:
        raise FileError(f"{path}: {st.st_size} bytes, expected at most {MAX_FILE}")
    return path.read_bytes()


@dataclass(frozen=True, slots=True)
class Known:
    """The last-known-good: a configuration applied and ACKed."""

    version: int
    config: MachineConfig


@dataclass(frozen=True, slots=True)
class Root:
    path: Path

    def ensure(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    @property
    def tls_key(self) -> Path:
        return self.path / "tls.key"

    @property
    def cert(self) -> Path:
        return self.path / "cert.pem"

    @property
    def ca(self) -> Path:
        return self.path / "ca.pem"

    @property
    def token(self) -> Path:
        return self.path / "token"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    def enrolled(self) -> bool:
        return self.tls_key.exists() and self.cert.exists() and self.ca.exists()

    def read_token(self) -> str | None:
        """The enrollment token, or None if there is none."""
        try:
            return read_private(self.token).decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None

    def known(self) -> Known | None:
        """The last-known-good configuration, or None (none yet); FileError if
        the file is damaged (the caller says so and starts without it)."""
        try:
            data = self.config.read_bytes()
        except FileNotFoundError:
            return None
        try:
            obj: Any = json.loads(data)
            version = obj["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"version {version!r}, expected a positive integer")
            return Known(version, agentconfig.parse(obj["config"]))
        except (ValueError, KeyError, TypeError) as e:
            raise FileError(f"{self.config}: {e}") from None

    def keep(self, known: Known) -> None:
        body = {"version": known.version, "config": agentconfig.to_wire(known.config)}
        write_atomic(self.config, json.dumps(body, indent=1).encode() + b"\n", 0o600)
