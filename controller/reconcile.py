"""The reconciler: observed inventory + policy + allocations -> data plane.

Level-triggered: events only mark machines dirty; `reconcile` then decides
and applies the difference for those machines (the incremental path, whose
cost does not grow with the number of machines), or for everything (`sync`:
at start, after a reload, after an error, and periodically against the
kernel to repair drift). A lost or duplicated event can delay the result,
never corrupt it.

Order matters for crash safety: allocations are committed to the store
before the data plane hears of them, so nothing ever hands out an address
that a restarted controller would not know about.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from controller.core import inventory as inv
from controller.core.allocation import Allocation, Ledger
from controller.core.decide import Outcome, decide, decide_order
from controller.core.desired import MachineState, PolicyState, fqdn_of, policy_state
from controller.core.plan import Flat, Plan, flatten, plan, plan_machines
from controller.drivers.addresses import Addresses
from controller.drivers.dhcp import Dnsmasq, HostsDir
from controller.drivers.nft import Nft, NftError
from controller.policy.model import QUARANTINE, Policy
from controller.store import Store

log = logging.getLogger(__name__)


@dataclass
class Machine:
    """One machine as `dom0 status` shows it."""

    mac: str
    port: str | None
    rule: str | None
    domain: str | None
    name: str | None
    address: str | None
    state: str  # admitted | quarantined | refused | absent
    reason: str | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Stats:
    reconciles: int = 0
    syncs: int = 0
    rebuilds: int = 0
    errors: int = 0
    last_error: str | None = None
    last_reconcile: float | None = None
    started: float = field(default_factory=time.time)


class Reconciler:
    def __init__(
        self,
        policy: Policy,
        state_dir: Path,
        *,
        nft: Nft,
        addresses: Addresses | None,
        dnsmasq: Dnsmasq | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.state_dir = state_dir
        self.store = Store(state_dir)
        self.ledger = Ledger(self.store.allocations())
        self.nft = nft
        self.addresses = addresses
        self.dnsmasq = dnsmasq
        self.hosts = dnsmasq.hosts if dnsmasq else HostsDir(state_dir)
        self.clock = clock
        self.tables = inv.EMPTY
        self.inventory = inv.inventory(self.tables, policy.bridge)
        self.applied: dict[str, MachineState] = {}
        self.applied_policy: PolicyState | None = None
        self.refused: dict[str, str] = {}
        self.dirty: set[str] = set()
        self.dirty_all = True  # the first reconcile is a full sync
        self.force_rebuild = False
        self.stats = Stats()

    # -- observing -------------------------------------------------------------
    def observe(self, event: object) -> None:
        """Fold one source event in and mark what it may have changed.

        O(machines touched), not O(machines): this runs for every event."""
        before = self.tables
        self.tables = inv.fold(before, event)
        if isinstance(event, inv.Snapshot):
            self.dirty_all = True
        elif isinstance(event, inv.FdbUp):
            self.dirty.add(event.entry.mac)
        elif isinstance(event, inv.FdbGone):
            self.dirty.add(event.mac)
        elif isinstance(event, inv.LinkUp | inv.LinkGone):
            index = event.link.index if isinstance(event, inv.LinkUp) else event.index
            self._link_changed(before.links.get(index), self.tables.links.get(index), before)

    def _link_changed(self, old: inv.Link | None, new: inv.Link | None, before: inv.Tables) -> None:
        bridge = inv.bridge_index(self.tables, self.policy.bridge)
        if any(link is not None and link.kind == "bridge" for link in (old, new)):
            # Only the managed bridge coming, going or being renamed matters:
            # its carrier and MTU change with every port and are no concern.
            if bridge != inv.bridge_index(before, self.policy.bridge):
                self.dirty_all = True
            return
        was = old is not None and old.master is not None
        now = new is not None and new.master is not None
        if not (was or now):
            return
        managed_before = old is not None and old.master == bridge and bridge is not None
        managed_now = new is not None and new.master == bridge and bridge is not None
        if (was and not managed_before) or (now and not managed_now):
            self.dirty_all = True  # a port of another bridge: the exempt set changes
            return
        if (
            old is not None
            and new is not None
            and old.name == new.name
            and old.master == new.master
        ):
            return  # up/down or MAC: presence is by port existence and the FDB
        for link in (old, new):
            if link is None:
                continue
            self.dirty.update(self.ledger.on_port(link.name))
            self.dirty.update(inv.macs_on(self.tables, link.index))
            self.dirty.update(inv.macs_on(before, link.index))

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.dirty_all = True

    @property
    def pending(self) -> bool:
        return self.dirty_all or bool(self.dirty) or self.force_rebuild

    # -- deciding --------------------------------------------------------------
    def _decide(self, mac: str, now: int) -> Outcome:
        out = decide(self.policy, self.inventory, self.ledger, mac, now)
        if out.refused:
            if self.refused.get(mac) != out.refused:
                log.error("machine %s: %s; it gets nothing", mac, out.refused)
            self.refused[mac] = out.refused
        else:
            self.refused.pop(mac, None)
        if out.spoof:
            log.warning(
                "machine %s seen on port %s but bound to another port: ignored", mac, out.spoof
            )
        if out.new and out.put:
            a = out.put[0]
            log.info(
                "machine %s on %s: %s %s",
                mac,
                a.port,
                fqdn_of(self.policy, a),
                a.address or "(no address)",
            )
        for r in out.released:
            log.info("released %s/%d (%s) of absent machine %s", r.rule, r.slot, r.address, r.mac)
        return out

    # -- applying --------------------------------------------------------------
    def reconcile(self) -> None:
        """Bring the data plane in line with everything marked dirty."""
        self.stats.reconciles += 1
        self.stats.last_reconcile = self.clock()
        if self.dirty_all or self.force_rebuild:
            self.sync()
            return
        dirty, self.dirty = self.dirty, set()
        self.inventory = inv.inventory(self.tables, self.policy.bridge)
        now = int(self.clock())
        puts: list[Allocation] = []
        removed: list[str] = []
        desired: dict[str, MachineState | None] = {}
        for mac in dirty:
            out = self._decide(mac, now)
            puts += out.put
            removed += [r.mac for r in out.released]
            desired[mac] = out.state
        for mac in removed:
            desired[mac] = None
        self.store.commit_allocations(puts, removed)
        applied = {mac: self.applied.get(mac) for mac in desired}
        p = plan_machines(desired, applied)
        if p.empty:
            return
        try:
            self.nft.apply(p)
        except NftError as e:
            self._failed(f"nftables: {e}")
            return
        self._apply_hosts(p)
        for mac, state in desired.items():
            if state is None:
                self.applied.pop(mac, None)
            else:
                self.applied[mac] = state
        self.store.commit_applied_machines(desired)

    def _apply_hosts(self, p: Plan) -> None:
        self.hosts.write(p.hosts_put, p.hosts_del)
        if p.hosts_changed and self.dnsmasq is not None:
            self.dnsmasq.reload_hosts()

    def _failed(self, what: str) -> None:
        self.stats.errors += 1
        self.stats.last_error = what
        log.error("%s; rebuilding dom0's tables from scratch", what)
        self.force_rebuild = True

    def desired_all(self, now: int) -> tuple[PolicyState, dict[str, MachineState]]:
        """Decide for every machine (present or known) and commit the result."""
        self.inventory = inv.inventory(self.tables, self.policy.bridge)
        macs = set(self.inventory.sightings) | set(self.ledger.by_mac)
        puts: list[Allocation] = []
        removed: list[str] = []
        machines: dict[str, MachineState] = {}
        for mac in decide_order(self.ledger, macs):
            out = self._decide(mac, now)
            puts += out.put
            removed += [r.mac for r in out.released]
            if out.state is not None:
                machines[mac] = out.state
        for mac in removed:
            machines.pop(mac, None)
        self.store.commit_allocations(puts, removed)
        return policy_state(self.policy, self.inventory.foreign_ports), machines

    def sync(self) -> None:
        """The full path: everything desired against what the kernel holds."""
        self.stats.syncs += 1
        rebuild = self.force_rebuild
        self.dirty_all = self.force_rebuild = False
        self.dirty.clear()
        pstate, machines = self.desired_all(int(self.clock()))
        desired = flatten(
            pstate.shape, pstate.sets, pstate.addresses, pstate.dhcp, machines.values()
        )
        kernel = self.nft.read(pstate.shape)
        try:
            if rebuild or not kernel.shape_matches:
                self.stats.rebuilds += 1
                log.info("nftables: writing dom0's tables (%d machines)", len(machines))
                self.nft.rebuild(desired.shape, desired.sets)  # type: ignore[arg-type]
            else:
                current = Flat(pstate.shape, kernel.sets, frozenset(), None, {})
                self.nft.apply(
                    plan(Flat(pstate.shape, desired.sets, frozenset(), None, {}), current)
                )
        except NftError as e:
            self.stats.errors += 1
            self.stats.last_error = f"nftables: {e}"
            if rebuild:
                raise
            log.error("nftables: %s; rebuilding", e)
            self.nft.rebuild(desired.shape, desired.sets)  # type: ignore[arg-type]
        if self.addresses is not None:
            owned = self.addresses.owned(self.policy.bridge)
            if self.inventory.bridge_index is None:
                log.warning("bridge %s does not exist yet: waiting for it", self.policy.bridge)
            elif owned != pstate.addresses:
                self.addresses.apply(
                    self.policy.bridge, pstate.addresses - owned, owned - pstate.addresses
                )
        on_disk = self.hosts.read()
        hp = plan(
            Flat(None, {}, frozenset(), None, desired.hosts),
            Flat(None, {}, frozenset(), None, on_disk),
        )
        self._apply_hosts(hp)
        if self.dnsmasq is not None and self.inventory.bridge_index is not None:
            self.dnsmasq.configure(pstate.dhcp)
        self.applied = dict(machines)
        self.applied_policy = pstate
        self.store.replace_applied(
            Flat(pstate.shape, pstate.sets, pstate.addresses, pstate.dhcp, {}), machines
        )

    # -- reporting -------------------------------------------------------------
    def machines(self) -> list[Machine]:
        out: list[Machine] = []
        for mac in sorted(set(self.ledger.by_mac) | set(self.refused)):
            a = self.ledger.get(mac)
            if mac in self.refused:
                out.append(
                    Machine(
                        mac,
                        self.inventory.sightings.get(mac),
                        None,
                        None,
                        None,
                        None,
                        "refused",
                        self.refused[mac],
                    )
                )
                continue
            assert a is not None
            quarantined = a.rule == QUARANTINE
            state = (
                "absent"
                if a.absent_since is not None
                else ("quarantined" if quarantined else "admitted")
            )
            out.append(
                Machine(
                    mac=mac,
                    port=a.port,
                    rule=None if quarantined else a.rule,
                    domain=a.domain,
                    name=fqdn_of(self.policy, a),
                    address=a.address,
                    state=state,
                )
            )
        return out
