"""X25519 keys for WireGuard, and the private key file.

Keys are 32 raw bytes everywhere in the driver; base64 (what `wg` prints and
reads) and hex (what the UAPI speaks) exist only at the edges. A private key
travels as a `PrivateKey`, whose repr shows the public half only, so a log line,
a traceback or a debugger never prints the secret.

Key file policy: one line of base64, as written by `wg genkey` (so `wg set ...
private-key FILE` reads it too). `load_or_create` creates it 0600 in a 0700
directory (made if missing), atomically and without ever replacing an existing
key; it refuses, with a one-line error naming the file, a key file that its
group or others can access or that another user owns: such a key must be
considered leaked, and silently tightening the mode would hide that. The fix is
the operator's: `chmod 600 FILE` if the exposure is known to be harmless, or
delete the file to have a new key made.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from common.wireguard.errors import ConfigError, WireGuardError
from common.wireguard.model import KEY_LEN, b64, check_key

MAX_KEY_FILE = 256  # a key file is 45 bytes; anything much larger is not one


class KeyFileError(WireGuardError):
    """The key file is unsafe or not a key (message: one line, names the file)."""


def clamp(raw: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` does: the same public key either way,
    but the stored private key then matches what the devices report back."""
    k = bytearray(raw)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def generate_private() -> bytes:
    return clamp(secrets.token_bytes(KEY_LEN))


def public_of(private: bytes | PrivateKey) -> bytes:
    raw = private.secret_bytes() if isinstance(private, PrivateKey) else private
    check_key(raw, "private key", secret=True)
    return (
        X25519PrivateKey.from_private_bytes(raw)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def to_base64(key: bytes) -> str:
    return base64.b64encode(check_key(key, "key", secret=True)).decode("ascii")


def from_base64(text: str) -> bytes:
    """A key in `wg` notation. The error never repeats the input (it may be a secret)."""
    try:
        raw = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise ConfigError("not a base64 WireGuard key") from None
    if len(raw) != KEY_LEN:
        raise ConfigError(f"not a WireGuard key: decodes to {len(raw)} bytes, not {KEY_LEN}")
    return raw


def to_hex(key: bytes) -> str:
    return check_key(key, "key", secret=True).hex()


def from_hex(text: str) -> bytes:
    if len(text) != 2 * KEY_LEN:
        raise ConfigError(f"not a hex WireGuard key: {len(text)} characters, not {2 * KEY_LEN}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ConfigError("not a hex WireGuard key") from None


class PrivateKey:
    """A private key that does not show itself: repr and str print the public key."""

    __slots__ = ("_public", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = check_key(raw, "private key", secret=True)
        self._public = public_of(raw)

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(generate_private())

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(from_base64(text))

    @property
    def public(self) -> bytes:
        return self._public

    def secret_bytes(self) -> bytes:
        """The raw secret, for the backends only. Never log it."""
        return self._raw

    def __repr__(self) -> str:
        return f"PrivateKey(public={b64(self._public)})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._public)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("PrivateKey is not picklable: secrets stay in this process")


def _check_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"WireGuard key file {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise KeyFileError(
            f"WireGuard key file {path} is owned by uid {st.st_uid}, expected {os.geteuid()} "
            "(mode 0600, owner only)"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"WireGuard key file {path} has mode {mode:04o}, expected 0600 (owner only): "
            f"the key may have leaked; delete it for a new key, or chmod 600 {path}"
        )


def load(path: Path) -> PrivateKey:
    """Read a key file, checking it on the open descriptor (no check-then-open race)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        _check_file(path, os.fstat(fd))
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(
            f"WireGuard key file {path} is not a key (larger than {MAX_KEY_FILE} bytes)"
        )
    try:
        return PrivateKey(from_base64(data.decode("ascii")))
    except (ConfigError, UnicodeDecodeError):
        raise KeyFileError(
            f"WireGuard key file {path} is not a key (expected one line of base64 "
            "of 32 bytes, as written by `wg genkey`)"
        ) from None


def load_or_create(path: Path) -> PrivateKey:
    """The private key in `path`, made (0600, in a 0700 directory) if missing."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        return load(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = PrivateKey.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask: exactly owner read/write
        os.write(fd, (to_base64(key.secret_bytes()) + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        # link, not rename: never replace a key a concurrent creator already
        # published (and perhaps gave to a device); the first one wins.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return load(path)
