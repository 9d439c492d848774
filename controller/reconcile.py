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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from controller.core import inventory as inv
from controller.core.allocation import Allocation, Ledger
from controller.core.decide import Outcome, decide, decide_order
from controller.core.desired import (
    HubPeer,
    KillSwitch,
    MachineState,
    PolicyState,
    fqdn_of,
    policy_state,
)
from controller.core.leases import Leases
from controller.core.plan import Plan, flatten, host_diff, plan_machines, set_diff
from controller.drivers.addresses import AddressError, Addresses
from controller.drivers.dhcp import Dnsmasq, HostsDir
from controller.drivers.nft import Nft, NftError
from controller.drivers.tunnels import Tunnels, machine_public_key
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
    underlay: str | None = None  # hub machines: the bridge address their tunnel uses
    confirmed: bool = False  # has held its DHCP lease (established; see core.decide)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Stats:
    reconciles: int = 0
    syncs: int = 0
    rebuilds: int = 0
    errors: int = 0
    refusals: int = 0  # MACs refused (port security, full pools), counted per decision
    last_error: str | None = None
    last_reconcile: float | None = None
    started: float = field(default_factory=time.time)


class LogBudget:
    """At most `lines` log lines per `window` seconds for one kind of news
    (input a guest controls must not fill the log); the rest is counted and
    summed up in one line when the next window opens."""

    def __init__(self, lines: int, window: float, clock: Callable[[], float]) -> None:
        self.lines = lines
        self.window = window
        self.clock = clock
        self.start = clock()
        self.used = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = self.clock()
        if now - self.start >= self.window:
            if self.suppressed:
                log.warning(
                    "%d more refusals in the last %.0f s were not logged (see dom0 status)",
                    self.suppressed,
                    now - self.start,
                )
            self.start, self.used, self.suppressed = now, 0, 0
        if self.used < self.lines:
            self.used += 1
            return True
        self.suppressed += 1
        return False


REFUSED_KEPT = 1000  # refused MACs remembered (to count and log each once); status shows 100
REFUSED_SHOWN = 100


class Reconciler:
    def __init__(
        self,
        policy: Policy,
        state_dir: Path,
        *,
        nft: Nft,
        addresses: Addresses | None,
        dnsmasq: Dnsmasq | None,
        tunnels: Tunnels | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.state_dir = state_dir
        self.store = Store(state_dir)
        self.ledger = Ledger(self.store.allocations())
        self.nft = nft
        self.addresses = addresses
        self.dnsmasq = dnsmasq
        self.tunnels = tunnels
        self.hosts = dnsmasq.hosts if dnsmasq else HostsDir(state_dir)
        self.clock = clock
        self.tables = inv.EMPTY
        self.inventory = inv.inventory(self.tables, policy.bridge)
        self.applied: dict[str, MachineState] = {}
        self.applied_policy: PolicyState | None = None
        # MAC -> (why, port): the latest refusals, bounded (a flood brings thousands)
        self.refused: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.refusal_log = LogBudget(10, 60.0, clock)
        self.leased: dict[str, str] = {}
        self.dirty: set[str] = set()
        self.dirty_all = True  # the first reconcile is a full sync
        self.force_rebuild = False
        self.stats = Stats()

    # -- observing -------------------------------------------------------------
    def observe(self, event: object) -> None:
        """Fold one source event in and mark what it may have changed.

        O(machines touched), not O(machines): this runs for every event."""
        if isinstance(event, Leases):
            self._leases(event)
            return
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
        tunnels = {t.interface for t in (self.policy.uplink, self.policy.hub) if t is not None}
        if any(link is not None and link.name in tunnels for link in (old, new)):
            # the uplink or the hub went down, away or came back: repair now
            # (a dead wireguard-go takes its interface with it)
            if (old is None) != (new is None) or (old and new and old.up != new.up):
                self.dirty_all = True
            return
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

    def _leases(self, event: Leases) -> None:
        """A lease confirms its machine (see core.decide): only those matter."""
        for mac, address in event.by_mac.items():
            a = self.ledger.get(mac)
            if self.leased.get(mac) != address and a is not None and not a.confirmed:
                self.dirty.add(mac)
        self.leased = dict(event.by_mac)

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy
        self.dirty_all = True

    def request_resync(self) -> None:
        """The next reconcile is a full sync against what the kernel holds."""
        self.dirty_all = True

    def request_rebuild(self) -> None:
        """The next reconcile writes dom0's tables whole (after an error)."""
        self.force_rebuild = True

    def failed(self, what: str) -> None:
        """A reconcile failed outside the drivers' own handling: count it and
        start over from scratch next time (the data plane stays meanwhile)."""
        self.stats.errors += 1
        self.stats.last_error = what
        self.force_rebuild = True

    @property
    def pending(self) -> bool:
        return self.dirty_all or bool(self.dirty) or self.force_rebuild

    # -- deciding --------------------------------------------------------------
    def _key(self, key_id: str) -> str:
        return machine_public_key(self.state_dir, key_id)

    def _decide(self, mac: str, now: int) -> Outcome:
        out = decide(self.policy, self.inventory, self.ledger, mac, now, self._key, self.leased)
        if out.refused:
            if self.refused.get(mac, (None,))[0] != out.refused:
                self.stats.refusals += 1
                if self.refusal_log.allow():
                    log.warning("machine %s refused: %s; it gets nothing", mac, out.refused)
            self.refused[mac] = (out.refused, out.refused_port)
            self.refused.move_to_end(mac)
            while len(self.refused) > REFUSED_KEPT:
                self.refused.popitem(last=False)
        else:
            self.refused.pop(mac, None)
        if out.took_over is not None:
            log.info(
                "machine %s on %s carries on as %s (was %s: same port, same rule)",
                mac,
                out.took_over.port,
                fqdn_of(self.policy, out.took_over),
                out.took_over.mac,
            )
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
            if out.took_over is not None and r.mac == out.took_over.mac:
                continue
            why = "absent" if r.confirmed else "gone before it ever held its lease"
            log.info(
                "released %s/%d (%s) of machine %s (%s)", r.rule, r.slot, r.address, r.mac, why
            )
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
        self._commit(puts, removed)
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
        if (p.peers_put or p.peers_del) and self.tunnels is not None:
            hub = self.applied_policy.hub if self.applied_policy else None
            if hub is not None:
                try:
                    self.tunnels.hub_peers(hub, dict(p.peers_put), p.peers_del)
                except Exception as e:
                    self._failed(f"hub peers: {e}")
        for mac, state in desired.items():
            self._set_applied(mac, state)
        self.store.commit_applied_machines(desired)

    def _commit(self, puts: list[Allocation], removed: list[str]) -> None:
        """Into the store, what the ledger now holds for every MAC decided
        (a MAC may have been put, then taken over, in one batch)."""
        touched = dict.fromkeys([a.mac for a in puts] + removed)
        now = [self.ledger.get(m) for m in touched]
        self.store.commit_allocations(
            [a for a in now if a is not None], [m for m in touched if self.ledger.get(m) is None]
        )

    def _set_applied(self, mac: str, state: MachineState | None) -> None:
        if state is None:
            self.applied.pop(mac, None)
        else:
            self.applied[mac] = state

    def _apply_hosts(self, p: Plan) -> None:
        self.hosts.write(p.hosts_put, p.hosts_del)

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
        self._commit(puts, removed)
        return policy_state(self.policy, self.inventory.foreign_ports), machines

    def early(self) -> None:
        """Before anything else: the kill switch, so that nothing can leave the
        WAN outside the tunnel while the rest is being set up."""
        ks = policy_state(self.policy, ()).killswitch
        self._killswitch(ks)

    def _killswitch(self, ks: KillSwitch | None) -> None:
        if ks is not None:
            if not self.nft.killswitch_matches(ks):
                log.info(
                    "killswitch: only UDP to %s:%d leaves %s",
                    ks.endpoint_host,
                    ks.endpoint_port,
                    ks.wan,
                )
                self.nft.write_killswitch(ks)
        elif self.applied_policy is None or self.applied_policy.killswitch is not None:
            self.nft.delete_killswitch()  # the policy has no uplink (any more)

    def _tunnels(self, pstate: PolicyState) -> None:
        if self.tunnels is None:
            return
        if pstate.uplink is not None:
            self.tunnels.ensure_uplink(pstate.uplink)
        if pstate.hub is not None:
            self.tunnels.ensure_hub(pstate.hub)

    def _hub_peers(self, pstate: PolicyState, peers: dict[str, HubPeer]) -> None:
        if self.tunnels is None or pstate.hub is None:
            return
        have = self.tunnels.hub_peer_state(pstate.hub)
        put = {k: p for k, p in peers.items() if have.get(k) != p.allowed_ips}
        gone = frozenset(k for k in have if k not in peers)
        if put or gone:
            self.tunnels.hub_peers(pstate.hub, put, gone)

    def sync(self) -> None:
        """The full path: everything desired against what the kernel holds.

        In order: the kill switch (nothing may leak while the rest comes up),
        the uplink and the hub, dom0's addresses, nftables, hub peers, DHCP."""
        self.stats.syncs += 1
        rebuild = self.force_rebuild
        self.dirty_all = self.force_rebuild = False
        self.dirty.clear()
        pstate, machines = self.desired_all(int(self.clock()))
        desired = flatten(pstate, machines.values())
        self._killswitch(pstate.killswitch)
        try:
            self._tunnels(pstate)
        except Exception as e:  # the kill switch holds; try again at the next sync
            self.stats.errors += 1
            self.stats.last_error = f"tunnels: {e}"
            log.error("tunnels: %s (the kill switch holds; retrying at the next sync)", e)
        if self.addresses is not None:
            self._addresses(pstate)
        # (a forced rebuild rewrites everything anyway: no need to read it back)
        kernel = None if rebuild else self.nft.read(pstate.shape)
        try:
            if kernel is None or not kernel.shape_matches:
                self.stats.rebuilds += 1
                log.info("nftables: writing dom0's tables (%d machines)", len(machines))
                self.nft.rebuild(pstate.shape, desired.sets)
            else:
                self.nft.apply(_set_plan(desired.sets, kernel.sets))
        except NftError as e:
            self.stats.errors += 1
            self.stats.last_error = f"nftables: {e}"
            if rebuild:
                raise
            log.error("nftables: %s; rebuilding", e)
            self.nft.rebuild(pstate.shape, desired.sets)
        try:
            self._hub_peers(pstate, dict(desired.peers))
        except Exception as e:
            self.stats.errors += 1
            self.stats.last_error = f"hub peers: {e}"
            log.error("hub peers: %s (retrying at the next sync)", e)
        put, gone = host_diff(desired.hosts, self.hosts.read())
        self._apply_hosts(Plan(hosts_put=put, hosts_del=gone))
        if self.dnsmasq is not None and self.inventory.bridge_index is not None:
            self.dnsmasq.configure(pstate.dhcp)
        self._record_applied(pstate, machines)

    def _record_applied(self, pstate: PolicyState, machines: dict[str, MachineState]) -> None:
        """What was applied, into the store: whole after start, else only what
        changed (a periodic resync with 10,000 machines and nothing new writes
        nothing)."""
        if self.applied_policy is None:
            self.store.replace_applied(flatten(pstate, ()), machines)
        else:
            changes: dict[str, MachineState | None] = {
                mac: m for mac, m in machines.items() if self.applied.get(mac) != m
            }
            changes.update({mac: None for mac in self.applied if mac not in machines})
            if changes:
                self.store.commit_applied_machines(changes)
            if pstate != self.applied_policy:
                self.store.commit_applied_policy(flatten(pstate, ()))
        self.applied = dict(machines)
        self.applied_policy = pstate

    def _addresses(self, pstate: PolicyState) -> None:
        assert self.addresses is not None
        interfaces = {i for i, _ in pstate.addresses} | {self.policy.bridge}
        if self.applied_policy is not None:
            interfaces |= {i for i, _ in self.applied_policy.addresses}
        owned = self.addresses.owned(interfaces)
        if self.inventory.bridge_index is None:
            log.warning("bridge %s does not exist yet: waiting for it", self.policy.bridge)
        if owned == pstate.addresses:
            return
        try:
            self.addresses.apply(pstate.addresses - owned, owned - pstate.addresses)
        except AddressError as e:
            self.stats.errors += 1
            self.stats.last_error = f"addresses: {e}"
            log.warning("addresses: %s; retrying at the next sync", e)

    # -- reporting -------------------------------------------------------------
    def find(self, name: str) -> Allocation | None:
        """A machine by MAC, full name, or label when that is unambiguous."""
        wanted = name.strip().lower().rstrip(".")
        if wanted in self.ledger.by_mac:
            return self.ledger.by_mac[wanted]
        found = [
            a
            for a in self.ledger.by_mac.values()
            if fqdn_of(self.policy, a) == wanted
            or fqdn_of(self.policy, a).split(".", 1)[0] == wanted
        ]
        return found[0] if len(found) == 1 else None

    def machines(self) -> list[Machine]:
        out: list[Machine] = []
        shown = list(self.refused)[-REFUSED_SHOWN:]
        for mac in shown:
            why, port = self.refused[mac]
            out.append(Machine(mac, port, None, None, None, None, "refused", why))
        for mac in sorted(self.ledger.by_mac):
            if mac in self.refused:
                continue
            a = self.ledger.get(mac)
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
                    underlay=a.underlay,
                    confirmed=a.confirmed,
                )
            )
        return out


def _set_plan(desired: dict, kernel: dict) -> Plan:
    add, delete = set_diff(desired, kernel)
    return Plan(add=add, delete=delete)
