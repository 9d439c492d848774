"""In-memory drivers, for tests of the reconciler without a kernel.

Each holds what its real driver would have put in the kernel or a daemon,
answers `observe`/`read` from it, and applies plans with the real one's
semantics where they matter to the reconciler: a transaction of nftables
element changes is all or nothing, and deleting an element that is not
there fails it (as libnftables does), so an incremental path that loses
track of what it applied shows up as a failure, not as silence. Failures
can be injected (`fail_next`) to test recovery.

They are fakes, named as such: the lab tests check the real drivers, and
the fake data plane (nft/fake.py) checks the ruleset against the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controller.core.desired import (
    Address,
    Element,
    HubPeer,
    HubState,
    KillSwitch,
    Route,
    Shape,
)
from controller.core.plan import FOREIGN_KILLSWITCH, Plan
from controller.drivers.nft.client import KernelState, NftError
from controller.drivers.nft.ruleset import set_specs


class InjectedFailure(Exception):
    pass


@dataclass
class MemoryNft:
    """dom0's tables: their shape (None: absent or tampered) and set contents."""

    shape: Shape | None = None
    sets: dict[tuple[str, str], set[Element]] = field(default_factory=dict)
    killswitch: KillSwitch | None = None
    fail_next: int = 0  # element transactions to refuse
    rebuilds: int = 0
    transactions: int = 0

    def read(self, shape: Shape) -> KernelState:
        return KernelState(
            self.shape == shape and self.shape is not None,
            {k: frozenset(self.sets.get(k, ())) for k in set_specs(self.shape)}
            if self.shape
            else {},
        )

    def rebuild(self, shape: Shape, sets: Mapping[tuple[str, str], Iterable[Element]]) -> None:
        self.shape = shape
        self.sets = {k: set(sets.get(k, ())) for k in set_specs(shape)}
        self.rebuilds += 1

    def apply(self, plan: Plan) -> None:
        self.transactions += 1
        if self.fail_next:
            self.fail_next -= 1
            raise NftError("injected: the transaction was refused")
        if self.shape is None:
            raise NftError("No such file or directory (the table is gone)")
        staged = {k: set(v) for k, v in self.sets.items()}
        for key, elements in plan.delete.items():
            missing = set(elements) - staged.get(key, set())
            if missing:
                raise NftError(f"Could not process rule: No such file or directory ({key[1]})")
            staged[key] -= set(elements)
        for key, elements in plan.add.items():
            staged.setdefault(key, set()).update(elements)
        self.sets = staged

    def observe_killswitch(self, ks: KillSwitch | None) -> KillSwitch | None:
        if self.killswitch is None:
            return None
        return ks if self.killswitch == ks else FOREIGN_KILLSWITCH

    def write_killswitch(self, ks: KillSwitch) -> None:
        self.killswitch = ks

    def delete_killswitch(self) -> None:
        self.killswitch = None


@dataclass
class MemoryAddresses:
    held: set[Address] = field(default_factory=set)
    fail_next: int = 0
    routes: set[Route] = field(default_factory=set)

    def owned(self, interfaces: Iterable[str]) -> frozenset[Address]:
        wanted = set(interfaces)
        return frozenset(a for a in self.held if a[0] in wanted)

    def apply(self, add: Iterable[Address], delete: Iterable[Address]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise InjectedFailure("injected: addresses refused")
        self.held -= set(delete)
        self.held |= set(add)

    def owned_routes(self) -> frozenset[Route]:
        return frozenset(self.routes)

    def apply_routes(self, add: Iterable[Route], delete: Iterable[Route]) -> None:
        self.routes -= set(delete)
        self.routes |= set(add)


@dataclass
class MemoryTunnels:
    """The uplink and the hub as configured, and the hub's peers."""

    uplink: object | None = None
    hub: HubState | None = None
    peers: dict[str, HubPeer] = field(default_factory=dict)
    fail_next: int = 0

    def observe_uplink(self, u: object) -> object | None:
        return u if self.uplink == u else None

    def observe_hub(self, h: HubState) -> HubState | None:
        return h if self.hub == h else None

    def observe_peers(self, h: HubState) -> dict[str, HubPeer]:
        return dict(self.peers) if self.hub is not None else {}

    def ensure_uplink(self, u: object) -> None:
        self.uplink = u

    def ensure_hub(self, h: HubState) -> None:
        if self.hub != h:
            self.peers = {}  # a new device starts without peers
        self.hub = h

    def hub_peers(self, h: HubState, put: dict[str, HubPeer], delete: frozenset[str]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise InjectedFailure("injected: hub peers refused")
        if self.hub is None:
            raise InjectedFailure(f"no hub device {h.interface}")
        for key in delete:
            self.peers.pop(key, None)
        self.peers.update(put)

    def hub_public_key(self, h: HubState) -> str:
        return "A" * 43 + "="
