"""The reconciler: observed inventory + policy + allocations -> data plane.

Level-triggered: events only mark machines dirty; `reconcile` then decides
and applies the difference for those machines (the incremental path, whose
cost does not grow with the number of machines), or for everything (`sync`:
at start, after a reload, after an error, and periodically against what the
drivers hold, to repair drift). Both paths decide through
`core.decide.decide_many` and hand a `core.plan.Plan` to
`DataPlane.apply`; a full sync's plan is `plan(desired, observed)`, where
observed is what every driver reports holding. A lost or duplicated event
can delay the result, never corrupt it.

Order matters for crash safety: allocations are committed to the store
before the data plane hears of them, so nothing ever hands out an address
that a restarted controller would not know about.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controller.core import inventory as inv
from controller.core import remap
from controller.core.allocation import Allocation, Ledger
from controller.core.decide import Outcome, decide_many
from controller.core.desired import (
    MachineState,
    PolicyState,
    fqdn_of,
    limited_members,
    machine_state,
    policy_state,
    port_of,
)
from controller.core.leases import Leases, stale_leases
from controller.core.plan import Flat, Plan, flatten, plan, plan_machines
from controller.dataplane import AddressDriver, DataPlane, NftDriver, TunnelDriver
from controller.dataplane import Outcome as Applied
from controller.drivers.dhcp import Dnsmasq, HostsDir
from controller.drivers.machine_keys import MachineKeys
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
    address6: str | None = None  # in a domain with IPv6: its DHCPv6 reservation
    agent_server: str | None = None  # where its agent enrolls and connects (None: nowhere)
    previous: str | None = None  # a remap's grace: the address it had, still its own
    previous_until: int | None = None  # when that one goes back to the pool
    next_remap: int | None = None  # unix time of its next scheduled remap

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Stats:
    reconciles: int = 0
    syncs: int = 0
    rebuilds: int = 0
    errors: int = 0
    refusals: int = 0  # MACs refused (port security, full pools), counted per decision
    repairs: int = 0  # changes a repairing resync (periodic or asked for) found: drift
    last_repair: list[str] = field(default_factory=list)  # what the latest repair changed
    generation: int = 0  # bumped after every applied reconcile and every reload outcome
    renewals: int = 0  # carrier flaps: machines re-addressed at once (moves, `machine renew`)
    last_error: str | None = None
    last_reconcile: float | None = None
    started: float = field(default_factory=time.time)


class LogBudget:
    """At most `lines` log lines per `window` seconds for the news a guest's
    MACs make (refusals, a new MAC carrying a machine on): input a guest
    controls must not fill the log. The rest is counted and summed up in one
    line when the next window opens."""

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
                    "%d more refusals and MAC changes in the last %.0f s were not logged "
                    "(see dom0 status)",
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
        nft: NftDriver,
        addresses: AddressDriver | None,
        dnsmasq: Dnsmasq | None,
        tunnels: TunnelDriver | None = None,
        keys: MachineKeys | None = None,
        clock: Callable[[], float] = time.time,
        renew: Callable[[str, str], None] | None = None,
        bridge_netfilter: bool = True,
    ) -> None:
        self.policy = policy
        self.state_dir = state_dir
        self.store = Store(state_dir)
        self.ledger = Ledger(self.store.allocations())
        self.nft = nft
        self.tunnels = tunnels
        self.dnsmasq = dnsmasq
        self.hosts = dnsmasq.hosts if dnsmasq else HostsDir(state_dir)
        self.dataplane = DataPlane(
            nft=nft, hosts=self.hosts, addresses=addresses, dhcp=dnsmasq, tunnels=tunnels
        )
        self.keys = keys if keys is not None else MachineKeys(state_dir)
        self.clock = clock
        self.bridge_netfilter = bridge_netfilter  # bridged IPv4 meets the inet tables
        self.sysctls = addresses is not None  # (a real host, not a unit test's drivers)
        self._warn_unbridged()
        self._ipv6_forwarding()
        self.tables = inv.EMPTY
        self.inventory = inv.inventory(self.tables, policy.bridge)
        self.applied: dict[str, MachineState] = {}
        self.applied_ports: dict[str, set[str]] = {}  # port -> MACs applied on it
        self.applied_policy: PolicyState | None = None
        # MAC -> (why, port): the latest refusals, bounded (a flood brings thousands)
        self.refused: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.refusal_log = LogBudget(10, 60.0, clock)
        self.leased: dict[str, str] = {}
        self.dirty: set[str] = set()
        # (the policy, the ledger and its version it was built for; the index)
        self._named: tuple[tuple[object, Ledger, int], dict[str, str]] = (
            (None, self.ledger, -1),
            {},
        )
        self.dirty_all = True  # the first reconcile is a full sync
        self.force_rebuild = False
        self.repairing = False  # the pending full sync was asked for to repair: changes are drift
        self.needs_retry = False  # a driver failed: sync again after a moment
        self.stats = Stats()
        # renew(mac, port): flap the port's carrier (the engine's; None: nobody to flap)
        self.renew_port = renew
        self.renewed: dict[str, str] = {}  # MAC -> the reservation it was last renewed for
        # has_agent(mac): its agent is connected (the engine's): its addresses come
        # from its configuration, never from DHCP, so it is never re-addressed by a flap
        self.has_agent: Callable[[str], bool] = lambda mac: False

    # -- observing -------------------------------------------------------------
    def observe(self, event: inv.Event | Leases) -> None:
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
            # the port's other MACs: one refused while this one held the port
            # (one port, one domain; its limit) may be admitted now
            self.dirty.update(inv.macs_on(self.tables, event.port))
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
        self._ipv6_forwarding()
        self._warn_unbridged()
        self.dirty_all = True
        self.repairing = False  # what the next sync changes, the new policy asks for

    def _ipv6_forwarding(self) -> None:
        if self.sysctls and any(d.pool6 is not None for d in self.policy.domains.values()):
            from controller.drivers.addresses import enable_ipv6_forwarding

            enable_ipv6_forwarding()

    def _warn_unbridged(self) -> None:
        if self.bridge_netfilter:
            return
        for d in limited_members(self.policy):
            log.warning(
                "domain %s: its members' allow entry limits them to some ports, which "
                "needs br_netfilter (not loaded): they get no direct path at all",
                d,
            )

    def request_resync(self, repair: bool = False) -> None:
        """The next reconcile is a full sync against what the drivers hold;
        `repair`: asked for by the clock or the operator, not by a change, so
        whatever it changes is drift, repaired (and counted)."""
        self.repairing = repair or (self.repairing and self.dirty_all)
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

    def bump(self) -> None:
        """Something an observer may wait for happened (see Stats.generation)."""
        self.stats.generation += 1

    @property
    def pending(self) -> bool:
        return self.dirty_all or bool(self.dirty) or self.force_rebuild

    # -- deciding --------------------------------------------------------------
    def _decide(self, macs: set[str], now: int) -> dict[str, MachineState | None]:
        """Decide `macs`, create the tunnel keys the decisions ask for, commit
        the allocations; the machines' desired states."""
        self.inventory = inv.inventory(self.tables, self.policy.bridge)
        self.ledger.avoid = self.hosts.burnt
        d = decide_many(
            self.policy, self.inventory, self.ledger, macs, now, self.keys.public(), self.leased
        )
        for key_id in d.keys_needed:
            self.keys.create(key_id)
        states = dict(d.states)
        if d.keys_needed:
            for mac, state in states.items():
                a = self.ledger.get(mac)
                if state is not None and a is not None and a.key_id in d.keys_needed:
                    states[mac] = machine_state(self.policy, a, self.keys.public()[a.key_id])
        for mac, out in d.outcomes.items():
            self._report(mac, out)
        self.store.commit_allocations(
            [a for m in d.touched if (a := self.ledger.get(m)) is not None],
            [m for m in d.touched if self.ledger.get(m) is None],
        )
        return states

    def _report(self, mac: str, out: Outcome) -> None:
        """Log and count one decision (refusals within the log's budget)."""
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
        if out.took_over is not None and self.refusal_log.allow():
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
            if a.rule == QUARANTINE:
                log.warning(
                    "machine %s on %s: QUARANTINED, no rule matches it: %s %s "
                    "(it reaches only dom0's DHCP)",
                    mac,
                    a.port,
                    fqdn_of(self.policy, a),
                    a.address or "(no address)",
                )
            else:
                log.info(
                    "machine %s on %s: admitted by rule %s into %s: %s %s",
                    mac,
                    a.port,
                    a.rule,
                    a.domain,
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

    def desired(self, now: int) -> tuple[PolicyState, dict[str, MachineState]]:
        """Decide for every machine (present or known) and commit the result."""
        self.inventory = inv.inventory(self.tables, self.policy.bridge)
        states = self._decide(set(self.inventory.sightings) | set(self.ledger.by_mac), now)
        machines = {mac: s for mac, s in states.items() if s is not None}
        state = policy_state(
            self.policy, self.inventory.foreign_ports, bridge_netfilter=self.bridge_netfilter
        )
        return state, machines

    # -- applying --------------------------------------------------------------
    def reconcile(self) -> None:
        """Bring the data plane in line with everything marked dirty."""
        self.stats.reconciles += 1
        self.stats.last_reconcile = self.clock()
        if self.dirty_all or self.force_rebuild:
            self.sync()
            self.bump()
            return
        dirty, self.dirty = self.dirty, set()
        desired = self._decide(dirty, int(self.clock()))
        applied = {mac: self.applied.get(mac) for mac in desired}
        ports = {port_of(m) for m in (*desired.values(), *applied.values()) if m is not None}
        context = [
            self.applied[m]
            for port in ports
            for m in self.applied_ports.get(port, ())
            if m not in desired
        ]
        p = plan_machines(desired, applied, context)
        if not p.empty:
            hub = self.applied_policy.hub if self.applied_policy is not None else None
            outcome = self.dataplane.apply(p, hub=hub)
            self._count(outcome)
            if outcome.nft_failed:
                self.force_rebuild = True  # the change trackers are spent: start over
                return
            for mac, state in desired.items():
                self._set_applied(mac, state)
            self._readdress(desired)
        self.bump()

    def _set_applied(self, mac: str, state: MachineState | None) -> None:
        old = self.applied.pop(mac, None)
        if old is not None:
            macs = self.applied_ports.get(port_of(old))
            if macs is not None:
                macs.discard(mac)
                if not macs:
                    del self.applied_ports[port_of(old)]
        if state is not None:
            self.applied[mac] = state
            self.applied_ports.setdefault(port_of(state), set()).add(mac)

    def _count(self, applied: Applied) -> None:
        if applied.errors:
            self.needs_retry = True  # a full sync soon (the engine waits a moment first)
        for part, error in applied.errors:
            self.stats.errors += 1
            self.stats.last_error = f"{part}: {error}"
            log.error("%s: %s (retrying at the next sync)", part, error)
        if applied.rebuilt:
            self.stats.rebuilds += 1

    def early(self) -> None:
        """Before anything else: the kill switch, so that nothing can leave the
        WAN outside the tunnel while the rest is being set up."""
        ks = policy_state(self.policy, ()).killswitch
        if ks is not None and self.nft.observe_killswitch(ks) != ks:
            log.info(
                "killswitch: only UDP to %s:%d leaves %s",
                ks.endpoint_host,
                ks.endpoint_port,
                ks.wan,
            )
            self.nft.write_killswitch(ks)

    def check_killswitch(self) -> bool:
        """The kill switch's own table, checked more often than the rest: it is
        what stands between a tampered host and a leak. True if it was repaired."""
        want = self.applied_policy.killswitch if self.applied_policy is not None else None
        if want is None or self.nft.observe_killswitch(want) == want:
            return False
        log.warning("killswitch: the kernel's table is not dom0's: rewriting it")
        self.nft.write_killswitch(want)
        self.stats.repairs += 1
        self.stats.last_repair = ["killswitch: rewrite the table"]
        self.bump()
        return True

    def interfaces(self) -> set[str]:
        """Where dom0's own addresses may be: to observe them all."""
        out = {self.policy.bridge}
        if self.applied_policy is not None:
            out |= {i for i, _ in self.applied_policy.addresses}
        return out

    def full_plan(
        self, now: int, rebuild: bool = False
    ) -> tuple[PolicyState, dict[str, MachineState], Flat, Plan]:
        """Decide everything, observe every driver, and the plan between the
        two. `rebuild`: take dom0's tables as absent (they are written whole
        anyway, so they are not even read)."""
        pstate, machines = self.desired(now)
        want = flatten(pstate, machines.values())
        observed = self.dataplane.observe(want, self.interfaces(), tables=not rebuild)
        return pstate, machines, want, plan(want, observed)

    def sync(self) -> None:
        """The full path: observe what every driver holds, plan, apply."""
        self.stats.syncs += 1
        rebuild, repairing = self.force_rebuild, self.repairing
        self.dirty_all = self.force_rebuild = self.repairing = self.needs_retry = False
        self.dirty.clear()
        pstate, machines, want, p = self.full_plan(int(self.clock()), rebuild)
        if self.inventory.bridge_index is None:
            log.warning("bridge %s does not exist yet: waiting for it", self.policy.bridge)
        if repairing and not p.empty:
            lines = p.lines()
            self.stats.repairs += len(lines)
            self.stats.last_repair = lines[:20]
            log.warning(
                "resync: repaired %d thing(s) that had drifted: %s",
                len(lines),
                "; ".join(lines[:5]),
            )
        applied = self.dataplane.apply(p, want, dhcp_ready=self.inventory.bridge_index is not None)
        self._count(applied)
        self.applied, self.applied_ports = {}, {}
        for mac, m in machines.items():
            self._set_applied(mac, m)
        self.applied_policy = pstate
        self._readdress(machines)

    def _readdress(self, states: Mapping[str, MachineState | None]) -> None:
        """Machines of `states` that hold a lease for an address they no
        longer have (moved to another domain, re-slotted): flap their port's
        carrier so that they ask again now, not when their lease is half over.
        Their old address is closed to them already (source policing)."""
        reserved = {}
        for mac, m in states.items():
            a = self.ledger.get(mac)
            if m is None or m.dhcp is None or a is None or a.absent_since is not None:
                self.renewed.pop(mac, None)
                continue
            if self.leased.get(mac) == m.dhcp.address:
                self.renewed.pop(mac, None)  # done: it holds its reservation
                continue
            if a.previous is not None and self.leased.get(mac) == a.previous:
                continue  # (a remap's grace: it moves when it renews, its old address works)
            if self.has_agent(mac):
                continue
            reserved[mac] = (a.port, m.dhcp.address)
        for mac, port, address in stale_leases(reserved, self.leased, self.renewed):
            self.renewed[mac] = address
            log.info(
                "machine %s on %s: its lease is for %s, its address now %s: renewing it "
                "(carrier flap)",
                mac,
                port,
                self.leased.get(mac),
                address,
            )
            self.renew(mac, port)

    # -- remapping (core/remap.py) ---------------------------------------------------
    def remap(
        self, now: int, *, force: Collection[str] = (), grace: int | None = None
    ) -> list[dict[str, object]]:
        """Drop previous addresses whose grace is over, schedule machines of
        remapping domains, and give a new address to those due (and to the
        MACs in `force`, whatever their schedule); commit; the machines
        changed are synced next. What moved, as (name, from, to, until)."""
        allocations = list(self.ledger.by_mac.values())
        changed: dict[str, Allocation] = {}
        for a in remap.expired(allocations, now):
            log.info("remap: %s gives back %s", fqdn_of(self.policy, a),
                     self.ledger.by_mac[a.mac].previous)  # fmt: skip
            changed[a.mac] = a
        changed.update((a.mac, a) for a in remap.unscheduled(self.policy, allocations, now))
        for a in changed.values():
            self.ledger.put(a)
        targets = {a.mac for a in remap.due(self.policy, list(self.ledger.by_mac.values()), now)}
        targets |= set(force)
        moved: list[dict[str, object]] = []
        history: list[tuple[Allocation, str, int, int]] = []
        for mac in sorted(targets):
            held = self.ledger.get(mac)
            if held is None or held.address is None or held.previous is not None:
                continue
            a = held
            domain = self.policy.domains.get(a.domain)
            if domain is None:
                continue
            new = self.ledger.free_in(
                a.domain, domain.pool, domain.gateway, f"{a.key_id}@{now}",
                self.policy.pinned.get(a.domain, frozenset()),
            )  # fmt: skip
            if new is None or new == a.address:
                log.warning("remap: %s keeps %s: its pool has no other free address",
                            fqdn_of(self.policy, a), a.address)  # fmt: skip
                continue
            wait = grace or domain.remap_grace or 2 * domain.record_ttl(self.policy.dns.ttl)
            b = remap.moved(a, new, now, wait)
            self.ledger.put(b)
            changed[mac] = b
            history.append((b, held.address, a.remapped_at or now, now))
            name = fqdn_of(self.policy, b)
            log.info("remap: %s moves %s -> %s (the old one kept %d s)", name, held.address, new,
                     wait)  # fmt: skip
            moved.append({"name": name, "mac": mac, "from": held.address, "to": new,
                          "until": b.previous_until})  # fmt: skip
        if changed:
            self.store.commit_allocations(changed.values())
            self.store.record_addresses(history)
            self.dirty.update(changed)
        return moved

    def next_remap_event(self) -> int | None:
        return remap.next_event(self.policy, list(self.ledger.by_mac.values()))

    def renew(self, mac: str, port: str) -> bool:
        """Flap `port`'s carrier for machine `mac` (False: nobody to do it)."""
        if self.renew_port is None:
            return False
        self.stats.renewals += 1
        self.renew_port(mac, port)
        return True

    # -- reporting -------------------------------------------------------------
    def holder(self, source: str) -> tuple[str, str] | None:
        """(fqdn, slot URI) of the admitted machine that holds this domain
        address now (what an agent's certificate must name), or None."""
        from controller.pki.issue import slot_uri

        for space, table in self.ledger.addresses.items():
            mac = table.get(source)
            if space == QUARANTINE or mac is None:
                continue
            a = self.ledger.by_mac[mac]
            if a.absent_since is not None or a.rule == QUARANTINE or mac not in self.applied:
                return None
            return fqdn_of(self.policy, a), slot_uri(a.rule, a.slot)
        return None

    def _agent_server(self, domain: str) -> str | None:
        d = self.policy.domains.get(domain)
        if d is None or "enroll" not in d.services:
            return None
        if d.hub and self.policy.hub is not None:
            return str(self.policy.hub.gateway)
        return str(d.gateway)

    def named(self) -> Mapping[str, str]:
        """Every machine's full name -> its MAC; built again only when the
        ledger or the policy has changed (each sync asks it for the agents)."""
        (policy, ledger, version), index = self._named
        if policy is not self.policy or ledger is not self.ledger or version != ledger.version:
            index = {fqdn_of(self.policy, a): a.mac for a in self.ledger.by_mac.values()}
            self._named = ((self.policy, self.ledger, self.ledger.version), index)
        return index

    def find(self, name: str) -> Allocation | None:
        """A machine by MAC, full name, or label when that is unambiguous."""
        wanted = name.strip().lower().rstrip(".")
        if wanted in self.ledger.by_mac:
            return self.ledger.by_mac[wanted]
        if (mac := self.named().get(wanted)) is not None:
            return self.ledger.by_mac.get(mac)
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
                    address6=(
                        d.address6(a.address)
                        if (d := self.policy.domains.get(a.domain)) is not None
                        else None
                    ),
                    agent_server=None if quarantined else self._agent_server(a.domain),
                    previous=a.previous,
                    previous_until=a.previous_until,
                    next_remap=(
                        remap.next_remap(a, d)
                        if (d := remap.remappable(self.policy, a)) is not None
                        and a.previous is None
                        else None
                    ),
                )
            )
        return out
