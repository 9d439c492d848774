"""WireGuard driver: dom0's uplink (`wg0`) and hub, on two backends behind one interface.

- `kernel.KernelWireGuard`: the kernel module, over generic netlink (production).
- `userspace.UserspaceWireGuard`: wireguard-go daemons over their UAPI sockets
  (machines without the module, such as the build machines and the lab).

`detect(state_dir)` picks the one this machine supports. Both validate and
behave the same (shared in `backend.Backend`); see docs/wireguard.md.
Addresses and routes of the interfaces are not this driver's job.
"""

from __future__ import annotations

from common.wireguard.backend import Backend, WireGuard, detect
from common.wireguard.errors import (
    ConfigError,
    DeviceError,
    DeviceNotFound,
    ProtocolError,
    WireGuardError,
    WireGuardUnavailable,
)
from common.wireguard.keys import KeyFileError, PrivateKey, load_or_create, public_of
from common.wireguard.model import Device, Peer, PeerStatus, diff_peers, needs_update

__all__ = [
    "Backend",
    "ConfigError",
    "Device",
    "DeviceError",
    "DeviceNotFound",
    "KeyFileError",
    "Peer",
    "PeerStatus",
    "PrivateKey",
    "ProtocolError",
    "WireGuard",
    "WireGuardError",
    "WireGuardUnavailable",
    "detect",
    "diff_peers",
    "load_or_create",
    "needs_update",
    "public_of",
]
