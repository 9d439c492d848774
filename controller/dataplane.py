"""The data plane as one thing: what every driver holds, and carrying out a plan.

A full sync is `observe` -> `core.plan.plan(desired, observed)` -> `apply`;
the incremental path hands `apply` a plan for a few machines (of the same
`Plan` type); `dom0 plan` runs the same `observe`, read-only, against the
running host. Drivers report what they hold as plain data and carry out
what they are told; they never decide.

`apply` keeps the order that crash safety needs: the kill switch first
(nothing may leak while the rest comes up), then the uplink and the hub,
dom0's addresses, nftables, hub peers, reservations, and dnsmasq. A failing
step is reported and the others still run, except that a refused nftables
transaction falls back to writing the tables whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from controller.core.desired import (
    Address,
    DhcpConfig,
    DhcpHost,
    Element,
    HubPeer,
    HubState,
    KillSwitch,
    Route,
    Shape,
    UplinkState,
)
from controller.core.plan import FOREIGN_KILLSWITCH, Flat, Plan

log = logging.getLogger(__name__)


class NftDriver(Protocol):
    def read(self, shape: Shape) -> KernelStateLike: ...
    def rebuild(self, shape: Shape, sets: Mapping[tuple[str, str], Iterable[Element]]) -> None: ...
    def apply(self, plan: Plan) -> None: ...
    def observe_killswitch(self, ks: KillSwitch | None) -> KillSwitch | None: ...
    def write_killswitch(self, ks: KillSwitch) -> None: ...
    def delete_killswitch(self) -> None: ...


class KernelStateLike(Protocol):
    @property
    def shape_matches(self) -> bool: ...
    @property
    def sets(self) -> Mapping[tuple[str, str], frozenset[Element]]: ...


class AddressDriver(Protocol):
    def owned(self, interfaces: Iterable[str]) -> frozenset[Address]: ...
    def apply(self, add: Iterable[Address], delete: Iterable[Address]) -> None: ...
    def owned_routes(self) -> frozenset[Route]: ...
    def apply_routes(self, add: Iterable[Route], delete: Iterable[Route]) -> None: ...


class HostsDriver(Protocol):
    def read(self) -> dict[str, DhcpHost]: ...
    def write(self, put: Mapping[str, DhcpHost], delete: frozenset[str] | set[str]) -> None: ...


class DhcpDriver(Protocol):
    def observe(self, config: DhcpConfig | None) -> DhcpConfig | None: ...
    def configure(self, config: DhcpConfig) -> None: ...


class TunnelDriver(Protocol):
    def observe_uplink(self, u: UplinkState) -> UplinkState | None: ...
    def observe_hub(self, h: HubState) -> HubState | None: ...
    def observe_peers(self, h: HubState) -> dict[str, HubPeer]: ...
    def ensure_uplink(self, u: UplinkState) -> None: ...
    def ensure_hub(self, h: HubState) -> None: ...
    def hub_peers(self, h: HubState, put: dict[str, HubPeer], delete: frozenset[str]) -> None: ...
    def hub_public_key(self, h: HubState) -> str: ...


@dataclass
class Outcome:
    """What `apply` did: which parts failed (the reconciler counts and logs
    them; the next sync tries again) and whether it wrote the tables whole."""

    errors: list[tuple[str, str]] = field(default_factory=list)
    rebuilt: bool = False
    nft_failed: bool = False  # the element transaction was refused (tables rewritten)


@dataclass
class DataPlane:
    nft: NftDriver
    hosts: HostsDriver
    addresses: AddressDriver | None = None
    dhcp: DhcpDriver | None = None
    tunnels: TunnelDriver | None = None

    def observe(
        self, desired: Flat, interfaces: Iterable[str] = (), *, tables: bool = True
    ) -> Flat:
        """What the drivers hold, shaped like `desired`. Parts without a
        driver (a test, a bench) are taken as they are desired. `tables`
        False: dom0's nftables tables are not read (and taken as absent)."""
        shape = desired.shape
        kernel = self.nft.read(shape) if shape is not None and tables else None
        ifaces = {i for i, _ in desired.addresses} | set(interfaces)
        tunnels = self.tunnels
        return Flat(
            shape=shape if kernel is not None and kernel.shape_matches else None,
            sets=dict(kernel.sets) if kernel is not None else {},
            addresses=(
                self.addresses.owned(ifaces) if self.addresses is not None else desired.addresses
            ),
            routes=self.addresses.owned_routes() if self.addresses is not None else desired.routes,
            dhcp=self.dhcp.observe(desired.dhcp) if self.dhcp is not None else desired.dhcp,
            hosts=self.hosts.read(),
            peers=(
                tunnels.observe_peers(desired.hub)
                if tunnels is not None and desired.hub is not None
                else dict(desired.peers)
            ),
            killswitch=self.nft.observe_killswitch(desired.killswitch),
            uplink=(
                tunnels.observe_uplink(desired.uplink)
                if tunnels is not None and desired.uplink is not None
                else desired.uplink
            ),
            hub=(
                tunnels.observe_hub(desired.hub)
                if tunnels is not None and desired.hub is not None
                else desired.hub
            ),
        )

    def apply(
        self,
        plan: Plan,
        desired: Flat | None = None,
        *,
        hub: HubState | None = None,
        dhcp_ready: bool = True,
    ) -> Outcome:
        """Carry `plan` out. `desired` (a full sync's) lets a refused element
        transaction fall back to writing the tables whole; `hub` is the hub
        that peers go to when neither the plan nor `desired` names it."""
        out = Outcome()
        if plan.killswitch is not None:
            k = plan.killswitch
            log.info(
                "killswitch: only UDP to %s:%d leaves %s", k.endpoint_host, k.endpoint_port, k.wan
            )
            self.nft.write_killswitch(k)  # no fallback: an error here stops the sync
        elif plan.killswitch_remove:
            self.nft.delete_killswitch()
        if self.tunnels is not None:
            try:
                if plan.uplink is not None:
                    self.tunnels.ensure_uplink(plan.uplink)
                if plan.hub is not None:
                    self.tunnels.ensure_hub(plan.hub)
            except Exception as e:  # the kill switch holds; try again at the next sync
                out.errors.append(("tunnels", str(e)))
        if self.addresses is not None and (plan.addresses_add or plan.addresses_del):
            try:
                self.addresses.apply(plan.addresses_add, plan.addresses_del)
            except Exception as e:
                out.errors.append(("addresses", str(e)))
        if self.addresses is not None and (plan.routes_add or plan.routes_del):
            # (after the addresses and the hub: a route's next hop and device)
            try:
                self.addresses.apply_routes(plan.routes_add, plan.routes_del)
            except Exception as e:
                out.errors.append(("routes", str(e)))
        self._nft(plan, desired, out)
        hub = plan.hub or (desired.hub if desired is not None else None) or hub
        if self.tunnels is not None and hub is not None and (plan.peers_put or plan.peers_del):
            try:
                self.tunnels.hub_peers(hub, dict(plan.peers_put), plan.peers_del)
            except Exception as e:
                out.errors.append(("hub peers", str(e)))
        if plan.hosts_put or plan.hosts_del:
            self.hosts.write(plan.hosts_put, plan.hosts_del)
        if self.dhcp is not None and desired is not None and desired.dhcp and dhcp_ready:
            # (what dnsmasq should run, told to its supervisor at every full
            # sync: it adopts a dnsmasq that runs it already, else restarts it)
            self.dhcp.configure(desired.dhcp)
        return out

    def _nft(self, plan: Plan, desired: Flat | None, out: Outcome) -> None:
        from controller.drivers.nft import NftError

        if plan.rebuild:
            assert desired is not None and desired.shape is not None
            log.info("nftables: writing dom0's tables")
            self.nft.rebuild(desired.shape, desired.sets)
            out.rebuilt = True
            return
        if not (any(plan.add.values()) or any(plan.delete.values())):
            return
        try:
            self.nft.apply(plan)
        except NftError as e:
            out.errors.append(("nftables", str(e)))
            out.nft_failed = True
            if desired is None or desired.shape is None:
                return  # the incremental path: the reconciler asks for a rebuild
            log.error("nftables: %s; writing dom0's tables whole", e)
            self.nft.rebuild(desired.shape, desired.sets)
            out.rebuilt = True


def observed_killswitch(matches: bool, exists: bool, ks: KillSwitch | None) -> KillSwitch | None:
    """What a driver reports for the kill switch table: the desired one if it
    matches, a stand-in for "some other table" if one exists, else None."""
    if ks is not None and matches:
        return ks
    return FOREIGN_KILLSWITCH if exists else None
