"""The driver's exceptions, shared by both backends so callers catch one set.

No message ever contains a private or preshared key: keys appear, if at all, as
public keys in base64 (what `wg show` prints), and key files by path only.
"""

from __future__ import annotations


class WireGuardError(Exception):
    """Anything the WireGuard driver could not do."""


class ConfigError(WireGuardError, ValueError):
    """A value given to the driver is invalid (checked before any I/O)."""


class DeviceNotFound(WireGuardError):
    """The device does not exist (or, userspace, has no live daemon of ours)."""


class WireGuardUnavailable(WireGuardError):
    """This machine cannot run the requested backend."""


class ProtocolError(WireGuardError):
    """The daemon or the kernel answered something we cannot parse."""


class DeviceError(WireGuardError):
    """The daemon or the kernel refused an operation (carries its errno)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno
