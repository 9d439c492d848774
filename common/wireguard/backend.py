"""The interface both backends implement, the logic they share, and `detect`.

Everything that decides *what* to send lives here, once: validation, the
meaning of None, the diff behind `replace_peers`. A backend only moves an
`Update` to its device (`_apply`) and reads a `Device` back, so the kernel and
the userspace backend validate, refuse and converge the same way.

The calls block (socket I/O with timeouts). Under trio, run them in a worker
thread: `await trio.to_thread.run_sync(wg.set_peers, "hub", [peer])`.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

from common.wireguard.errors import WireGuardUnavailable
from common.wireguard.keys import PrivateKey
from common.wireguard.model import (
    Device,
    Peer,
    Update,
    check_fwmark,
    check_ifname,
    check_key,
    diff_peers,
    make_update,
)


class WireGuard(Protocol):
    """What the controller uses; `Backend` is the implementation both share."""

    kind: str

    def ensure(self, name: str) -> bool: ...
    def remove(self, name: str) -> None: ...
    def get(self, name: str) -> Device: ...
    def configure(
        self,
        name: str,
        *,
        private_key: PrivateKey | bytes,
        listen_port: int | None = None,
        fwmark: int | None = None,
    ) -> None: ...
    def set_peers(
        self, name: str, upsert: Sequence[Peer] = (), remove: Sequence[bytes] = ()
    ) -> None: ...
    def replace_peers(self, name: str, peers: Sequence[Peer], *, reset: bool = False) -> None: ...


class Backend(ABC):
    kind: str = "?"

    # ---- what each backend provides -------------------------------------------------

    @abstractmethod
    def ensure(self, name: str) -> bool:
        """Make the device exist and answer: create, start, adopt, or repair it.

        True when the device is new (so it has no configuration: configure it and
        set all its peers); False when an existing, answering one was kept."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete the device (stop its daemon). Nothing to do if it is gone."""

    @abstractmethod
    def get(self, name: str) -> Device:
        """The device with all its peers, however many. DeviceNotFound if missing."""

    @abstractmethod
    def _apply(self, name: str, update: Update) -> None:
        """Send a validated update to the device."""

    # ---- shared behaviour -------------------------------------------------------------

    def configure(
        self,
        name: str,
        *,
        private_key: PrivateKey | bytes,
        listen_port: int | None = None,
        fwmark: int | None = None,
    ) -> None:
        """Set the device's own identity.

        `listen_port=None` (or 0) leaves the port as it is: a new device picked a
        random one, and asking for "any port" again would move it each time.
        `fwmark=None` turns the mark off (sent as 0).
        Sending the same values again keeps keys and sessions on both backends, but
        wireguard-go re-opens its UDP socket whenever a listen_port is sent: call
        this at start-up and when the identity changes, not on every pass."""
        check_ifname(name)
        raw = private_key.secret_bytes() if isinstance(private_key, PrivateKey) else private_key
        check_key(raw, "private_key", secret=True)
        mark = check_fwmark(fwmark) or 0
        self._apply(name, make_update(private_key=raw, listen_port=listen_port, fwmark=mark))

    def set_peers(
        self, name: str, upsert: Sequence[Peer] = (), remove: Sequence[bytes] = ()
    ) -> None:
        """Add or change `upsert` (each ends up exactly as given) and remove the
        peers with the `remove` public keys; others are untouched. One round trip
        (kernel: more only for very large changes); the cost depends on the size of
        the change, never on the number of peers already on the device. Removing an
        absent peer is not an error."""
        check_ifname(name)
        update = make_update(upsert=upsert, remove=remove)
        if not update.empty():
            self._apply(name, update)

    def replace_peers(self, name: str, peers: Sequence[Peer], *, reset: bool = False) -> None:
        """Make the device's peers exactly `peers` (start-up, repair).

        By default: read the device, then upsert only what differs and remove the
        rest, so peers that are already right keep their sessions. `reset=True`
        sends the whole set with replace-peers instead: every session restarts,
        for when the device's state cannot be trusted at all."""
        check_ifname(name)
        full = make_update(upsert=peers)  # validates before any I/O
        if reset:
            self._apply(name, make_update(replace_peers=True, upsert=full.upsert))
            return
        upsert, remove = diff_peers(full.upsert, self.get(name).peers)
        if upsert or remove:
            self._apply(name, make_update(upsert=upsert, remove=remove))


Kind = Literal["kernel", "userspace"]


def detect(
    state_dir: Path,
    *,
    log_dir: Path | None = None,
    prefer: Kind | None = None,
) -> Backend:
    """The backend this machine supports: the kernel module when its generic netlink
    family exists (asking may autoload the module), else wireguard-go if installed.

    `state_dir` (and `log_dir`) serve the userspace backend: daemon records, logs.
    `prefer` forces a backend and fails clearly when it cannot work here."""
    from common.wireguard import kernel

    if prefer not in (None, "kernel", "userspace"):
        raise ValueError(f"prefer must be 'kernel', 'userspace' or None, not {prefer!r}")
    if prefer != "userspace" and kernel.available():
        return kernel.KernelWireGuard()
    if prefer == "kernel":
        raise WireGuardUnavailable(
            "kernel WireGuard requested, but this kernel has no 'wireguard' generic "
            "netlink family (module not built in and not loadable)"
        )
    binary = shutil.which("wireguard-go")
    if binary is not None:
        from common.wireguard.userspace import UserspaceWireGuard

        return UserspaceWireGuard(state_dir, log_dir=log_dir, binary=binary)
    raise WireGuardUnavailable(
        "no WireGuard on this machine: the kernel has no 'wireguard' generic netlink "
        "family, and wireguard-go is not installed "
        "(apt-get install --no-install-recommends wireguard-go wireguard-tools)"
    )
