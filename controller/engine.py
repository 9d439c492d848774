"""`dom0 run`: the always-on controller, its tasks wired together.

One trio nursery owns every task: the netlink and lease sources, the
reconcile loop, dnsmasq's supervisor, the policy watcher, the resync and
kill-switch timers, signal handling and the control socket. Source events,
reload, resync and check requests all go through one channel (of `Item`)
into the reconcile loop, which folds whatever has queued up and then
reconciles once: bursts of events coalesce into one transaction. The
periodic resync runs on its period whatever events arrive, and re-reads
netlink as well as every driver; the kill switch's table is checked more
often than the rest.

SIGTERM (or SIGINT) stops the controller and leaves the data plane in place:
nftables tables, gateway addresses and dnsmasq keep working, fail-closed.
SIGHUP, `dom0 reload`-style requests or a changed policy file reload the
policy; an invalid policy is refused and logged, and the last good one keeps
running.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from common.agentconfig import MachineConfig
from common.wireguard import WireGuard, detect
from controller import control
from controller.api import handlers, status
from controller.core import inventory as inv
from controller.core.allocation import Allocation
from controller.core.desired import fqdn_of
from controller.core.leases import Leases
from controller.drivers.addresses import Addresses, enable_forwarding
from controller.drivers.carrier import Carrier, CarrierError
from controller.drivers.dhcp import Dnsmasq
from controller.drivers.nft import Nft
from controller.drivers.tunnels import Tunnels
from controller.policy.load import PolicyError, load_or_report, load_policy
from controller.policy.model import Policy
from controller.reconcile import Reconciler
from controller.runlock import LOCK_NAME, claim
from controller.sitedns import SiteDns
from controller.sources import leases
from controller.sources.netlink import NetlinkSource
from controller.store import StoreError

log = logging.getLogger("dom0")


@dataclass(frozen=True)
class Reload:
    why: str


@dataclass(frozen=True)
class Resync:
    why: str
    repair: bool = False  # by the clock or the operator: what it changes is drift, repaired


@dataclass(frozen=True)
class CheckKillswitch:
    pass


@dataclass(frozen=True)
class Wake:
    """The reconciler has work marked already (a remap): only sync it."""

    why: str


# Everything the reconcile loop takes.
Item = inv.Event | Leases | Reload | Resync | CheckKillswitch | Wake
KILLSWITCH_CHECK = 5.0  # seconds, at most (and at most half the resync period)
RETRY = 1.0  # seconds between a driver's failure and the sync that retries it
CA_CHECK = 3600.0  # seconds between the CA's expiry warnings in the log
REMAP_CHECK = 30.0  # seconds between looks at the remap schedule, at most
# A renewal's carrier stays down this long (seconds) after dnsmasq holds the
# new reservation: a client sees the loss (and dnsmasq has read the file) before
# it comes back; RENEW_WAIT_MAX bounds the wait for a restarting dnsmasq.
RENEW_DOWN = 0.2
RENEW_WAIT_MAX = 3.0


class Controller:
    def __init__(
        self,
        policy_path: Path,
        policy: Policy,
        state_dir: Path,
        resync: float,
        bridge_netfilter: bool = True,
    ) -> None:
        self.policy_path = policy_path
        self.policy_digest = _digest(policy_path)
        self.state_dir = state_dir
        self.resync_every = resync
        self.dnsmasq = Dnsmasq(state_dir)
        self.dns = SiteDns(state_dir)
        addresses = Addresses()
        self.carrier = Carrier(addresses.ipr)
        self.flapping: set[str] = set()  # ports whose carrier is down for a renewal now
        self.nursery: trio.Nursery | None = None
        self.reconciler = Reconciler(
            policy,
            state_dir,
            nft=Nft(),
            addresses=addresses,
            dnsmasq=self.dnsmasq,
            tunnels=Tunnels(_wireguard(state_dir), addresses.ipr, state_dir),
            renew=self._renew,
            bridge_netfilter=bridge_netfilter,
        )
        self.reconciler.has_agent = self._agent_connected
        self.last_policy_error: str | None = None
        self.agent_listener: object | None = None  # (once dom0 has a CA)
        self.enrollment: Any = None  # controller/pki/enroll.py's, once dom0 has a CA
        self.send, self.recv = trio.open_memory_channel[Item](10_000)

    # -- tasks -------------------------------------------------------------------
    async def run(self) -> None:
        # Before any source, tunnel or machine: nothing leaves the WAN outside
        # the tunnel from here on.
        self.reconciler.early()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._signals, nursery.cancel_scope)
            nursery.start_soon(self.dnsmasq.run)
            authority = self._authority()
            self.dns.configure(self.reconciler.policy, authority, datetime.now(UTC))
            nursery.start_soon(self.dns.unbound.run)
            nursery.start_soon(self.dns.run, self._dns_snapshot)
            if authority is not None:
                nursery.start_soon(self.dns.renewals, lambda: self.reconciler.policy, authority)
            netlink = NetlinkSource()
            await nursery.start(netlink.run, self.send.clone())
            await nursery.start(leases.watch, self.dnsmasq.hosts.root / "leases", self.send.clone())
            nursery.start_soon(self._loop)
            nursery.start_soon(self._watch_policy)
            nursery.start_soon(self._resync_timer, netlink)
            nursery.start_soon(self._killswitch_timer)
            nursery.start_soon(self._retry_timer)
            nursery.start_soon(self._remap_timer)
            nursery.start_soon(self._ca_timer)
            nursery.start_soon(self._agents)
            await nursery.start(control.serve, self.state_dir, self._handle)
            log.info(
                "controller running: policy %s, bridge %s, state %s",
                self.policy_path,
                self.reconciler.policy.bridge,
                self.state_dir,
            )

    async def _loop(self) -> None:
        rec = self.reconciler
        while True:
            self._take(await self.recv.receive())
            while True:  # coalesce whatever else is queued
                try:
                    self._take(self.recv.receive_nowait())
                except trio.WouldBlock:
                    break
            if rec.pending:
                try:
                    rec.reconcile()
                except Exception as e:  # the data plane stays; try again from scratch
                    log.exception("reconcile failed")
                    rec.failed(str(e))
                    await trio.sleep(1)  # (not a busy loop against a broken kernel)
                    await self.send.send(Resync("after a failure"))
                    continue
                self._push_agents()
                self.dns.changed()

    def _push_agents(self) -> None:
        """After each sync: the connected agents whose configuration changed get it."""
        from controller.sources.agents import Listener

        listener = self.agent_listener
        if isinstance(listener, Listener) and listener.book is not None and listener.book.live:
            try:
                listener.book.refresh()
            except Exception:  # (the agents wait; the network is not theirs to stop)
                log.exception("agents: configurations not refreshed")

    def _authority(self) -> Any:
        """dom0's CA, if it has one (else None: no TLS for DNS, no agents)."""
        from controller.pki import ca

        db = self.reconciler.store.db
        try:
            return ca.load(self.state_dir, db) if ca.exists(self.state_dir, db) else None
        except Exception as e:  # (the network is not the CA's to stop)
            log.error("the CA cannot be used: %s", e)
            return None

    def _dns_snapshot(self) -> tuple[Policy, list[Allocation]] | None:
        """The policy and the machines admitted now, once a sync has applied."""
        rec = self.reconciler
        if rec.applied_policy is None:
            return None
        applied = rec.applied
        return rec.policy, [a for mac, a in rec.ledger.by_mac.items() if mac in applied]

    def _agent_connected(self, mac: str) -> bool:
        """Whether the machine's agent is connected: its addresses come from
        its configuration, not from DHCP (a carrier flap would only hurt it)."""
        from controller.sources.agents import Listener

        listener = self.agent_listener
        a = self.reconciler.ledger.get(mac)
        if not isinstance(listener, Listener) or listener.book is None or a is None:
            return False
        return fqdn_of(self.reconciler.policy, a) in listener.book.live

    def _renew(self, mac: str, port: str) -> None:
        if self.nursery is not None and port not in self.flapping:
            self.flapping.add(port)
            self.nursery.start_soon(self._flap, mac, port)

    async def _flap(self, mac: str, port: str) -> None:
        """Carrier down, then up once dnsmasq holds the machine's new
        reservation (it reads rewritten files by inotify, or restarts)."""
        try:
            if not self.carrier.down(port):
                log.info("renew %s: port %s is administratively down: left alone", mac, port)
                return
            with trio.move_on_after(RENEW_WAIT_MAX):
                await self.dnsmasq.settled()
            await trio.sleep(RENEW_DOWN)
            self.carrier.up(port)
        except CarrierError as e:
            log.warning("renew %s: %s", mac, e)
        finally:
            self.flapping.discard(port)

    async def _resync_timer(self, netlink: NetlinkSource) -> None:
        """Every period, whatever else happens: a fresh netlink dump, then a
        full sync against every driver (drift is repaired, and counted)."""
        while True:
            await trio.sleep(self.resync_every)
            # marked first, so that the sync the fresh dump brings is the
            # repairing one (reconcile runs on this thread: no race)
            self.reconciler.request_resync(repair=True)
            await netlink.resync()
            await self.send.send(Resync("periodic", repair=True))

    def _agents_report(self) -> list[dict[str, object]]:
        """Every agent dom0 has pushed to: connected or not, the version it
        should run, the one it applied, its last refusal and its report."""
        from controller.sources.agents import Listener

        if not isinstance(self.agent_listener, Listener):
            return []
        if self.agent_listener.book is not None:
            return list(self.agent_listener.book.report())
        return [
            {
                "name": p.fqdn,
                "slot": p.slot,
                "serial": p.serial,
                "source": p.source,
                "connected": True,
            }
            for p, _scope in self.agent_listener.live.values()
        ]

    def _agent_configs(self, names: Collection[str]) -> dict[str, MachineConfig | None]:
        """The configurations of these machines now (controller/core/agentconfig.py)."""
        from controller.core.agentconfig import machine_config

        rec = self.reconciler
        hub_key = None
        if rec.tunnels is not None and rec.applied_policy is not None and rec.applied_policy.hub:
            try:
                hub_key = rec.tunnels.hub_public_key(rec.applied_policy.hub)
            except Exception as e:  # (no hub key yet: hub machines wait for it)
                log.warning("agents: the hub's key: %s", e)
        found: dict[str, MachineConfig | None] = dict.fromkeys(names)
        index = rec.named()
        for name in found:
            mac = index.get(name)
            a = rec.ledger.by_mac.get(mac) if mac is not None else None
            if a is not None and a.mac in rec.applied:
                found[name] = machine_config(rec.policy, a, hub_key)
        return found

    def _agent_key(self, fqdn: str, public_key: str) -> None:
        """An enrolled agent's WireGuard key: its machine's hub peer from now on."""
        a = self.reconciler.find(fqdn)
        if a is None or a.underlay is None:
            return  # (a machine of a bridge domain has no tunnel to dom0)
        if self.reconciler.keys.adopt(a.key_id, public_key):
            try:  # (the Resync item asks the reconciler for the sync itself)
                self.send.send_nowait(Resync(f"the agent of {fqdn} brought its own key"))
            except trio.WouldBlock:  # a full queue: the next sync it runs is a full one
                self.reconciler.request_resync()

    def _ca_warnings(self) -> list[str]:
        from controller.pki import ca

        try:
            return ca.warnings(self.reconciler.store.db, datetime.now(UTC))
        except Exception as e:  # (a damaged CA record must not take status down)
            return [f"the CA's records cannot be read: {e}"]

    async def _ca_timer(self) -> None:
        """The CA's warnings in the log, at start and every hour: an expiring
        root or intermediate must be impossible to miss."""
        while True:
            for warning in self._ca_warnings():
                log.warning("CA: %s", warning)
            await trio.sleep(CA_CHECK)

    async def _agents(self) -> None:
        """The agents' listener (controller/sources/agents.py) on the gateway
        of every domain whose services include `enroll`, once dom0 has a CA."""
        from controller.pki import ca
        from controller.pki.enroll import Enrollment
        from controller.pki.tokens import Tokens
        from controller.sources.agentbook import ConfigBook
        from controller.sources.agents import REVOCATION_POLL, Listener, server_context

        rec = self.reconciler
        db = rec.store.db
        if not ca.exists(self.state_dir, db):
            log.info("agents: no CA in %s (dom0 ca init): no agent listener", self.state_dir)
            return
        try:
            authority = ca.load(self.state_dir, db)
            now = datetime.now(UTC)
            gateways = agent_gateways(rec.policy)
            server = authority.issue_server([f"dom0.{rec.policy.tld}"], gateways, now)
            bundle = authority.write_bundle(now)
            tokens = Tokens(db)
            tokens.ensure_schema()
        except Exception as e:  # (the network is not the CA's to stop)
            log.error("agents: the CA cannot be used: %s", e)
            return
        log.info("agents: server certificate serial %s", server.serial)
        enrollment = Enrollment(
            authority,
            tokens,
            rec.holder,
            lambda: datetime.now(UTC),
            self._agent_key,
            hours=rec.policy.agent_certificate_seconds / 3600,
        )
        self.enrollment = enrollment
        listener = Listener(
            server_context(bundle, authority.dir / ca.SERVER_PEM),
            rec.holder,
            authority.revoked,
            enroll=enrollment,
            renew=enrollment.renew,
            book=ConfigBook(db, self._agent_configs, on_containers=self.dns.containers_reported),
        )
        self.agent_listener = listener

        async def one(stream: trio.SocketStream) -> None:
            try:
                source = str(stream.socket.getpeername()[0])
                await listener.handle(stream, source)
            except Exception:  # a tenant's connection never takes the controller down
                log.exception("agents: a connection failed")

        async def revocations() -> None:
            while True:
                await trio.sleep(REVOCATION_POLL)
                listener.revoked(authority.revoked())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(revocations)
            for gateway in gateways:
                nursery.start_soon(self._serve_agents, gateway, one)
            if rec.policy.advertise and gateways:
                from controller.sources.advertise import advertise, instance_name
                from controller.sources.agents import AGENT_PORT

                # (discovery is a convenience: it never holds the listener up)
                nursery.start_soon(advertise, gateways, AGENT_PORT, instance_name(rec.policy.tld))

    async def _serve_agents(self, gateway: str, handler: Callable) -> None:
        """Listen on one gateway as soon as dom0 holds it (the first sync adds it)."""
        from controller.sources.agents import AGENT_PORT

        while True:
            try:
                listeners = await trio.open_tcp_listeners(AGENT_PORT, host=gateway)
            except OSError:
                await trio.sleep(1.0)
                continue
            log.info("agents: listening on %s:%d", gateway, AGENT_PORT)
            await trio.serve_listeners(handler, listeners)

    async def _remap_timer(self) -> None:
        """Remaps and the ends of their graces, when they fall (core/remap.py):
        the schedule is looked at again at its next event, and at least every
        REMAP_CHECK seconds (a reload may have changed it)."""
        rec = self.reconciler
        while True:
            when = rec.next_remap_event()
            wait = REMAP_CHECK if when is None else min(REMAP_CHECK, when - time.time())
            await trio.sleep(max(wait, 0.05))
            if rec.applied_policy is None:
                continue  # (not before the first sync: what is applied is not known yet)
            self._remap()

    def _remap(self) -> list[dict[str, object]]:
        moved = self.reconciler.remap(int(time.time()))
        if self.reconciler.pending:
            self._wake("remap")
        return moved

    def _wake(self, why: str) -> None:
        # (a full queue: the loop is busy, and syncs what is marked when it gets there)
        with contextlib.suppress(trio.WouldBlock):
            self.send.send_nowait(Wake(why))

    async def _retry_timer(self) -> None:
        """A driver that failed is tried again a second later, not at the
        next period (and not in a hot loop)."""
        while True:
            await trio.sleep(RETRY)
            if self.reconciler.needs_retry:
                await self.send.send(Resync("retry after a driver failed"))

    async def _killswitch_timer(self) -> None:
        while True:
            await trio.sleep(min(KILLSWITCH_CHECK, self.resync_every / 2))
            await self.send.send(CheckKillswitch())

    def _take(self, item: Item) -> None:
        if isinstance(item, Reload):
            self._reload(item.why)
        elif isinstance(item, Resync):
            self.reconciler.request_resync(repair=item.repair)
        elif isinstance(item, CheckKillswitch):
            self.reconciler.check_killswitch()
        elif isinstance(item, Wake):
            pass  # (what to sync is marked already)
        else:
            self.reconciler.observe(item)

    def _reload(self, why: str) -> None:
        try:
            policy = load_policy(self.policy_path)
        except PolicyError as e:
            self.last_policy_error = "; ".join(map(str, e.problems))
            for p in e.problems:
                log.error("policy reload (%s) refused: %s", why, p)
            log.error("keeping the last good policy")
            self.policy_digest = _digest(self.policy_path)
            self.reconciler.bump()
            return
        self.last_policy_error = None
        self.policy_digest = _digest(self.policy_path)
        if policy == self.reconciler.policy:
            log.info("policy reload (%s): unchanged", why)
            self.reconciler.bump()
            return
        log.info("policy reload (%s): applying %s", why, self.policy_path)
        self.reconciler.set_policy(policy)
        self.dns.configure(policy, self._authority(), datetime.now(UTC))
        if self.enrollment is not None:  # (certificates issued from now on)
            self.enrollment.hours = policy.agent_certificate_seconds / 3600

    async def _watch_policy(self) -> None:
        while True:
            await trio.sleep(1)
            digest = _digest(self.policy_path)
            if digest != self.policy_digest:
                self.policy_digest = digest
                await self.send.send(Reload("file changed"))

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    await self.send.send(Reload("SIGHUP"))
                else:
                    log.info(
                        "%s: stopping; the data plane stays in place", signal.Signals(sig).name
                    )
                    scope.cancel()
                    return

    # -- control socket ------------------------------------------------------------
    def _handle(self, request: dict) -> dict:
        def post(cmd: str) -> bool:
            item = (
                Reload("control socket")
                if cmd == "reload"
                else Resync("control socket", repair=True)
            )
            try:
                self.send.send_nowait(item)
            except trio.WouldBlock:
                return False
            return True

        return handlers.dispatch(
            request,
            status=lambda: status.status(
                self.reconciler,
                policy=str(self.policy_path),
                last_policy_error=self.last_policy_error,
                dnsmasq_pid=self.dnsmasq.pid,
                dnsmasq_reloads=self.dnsmasq.reloads,
                ca_warnings=self._ca_warnings(),
                agents=self._agents_report(),
                dns=self.dns.unbound.report(),
            ),
            post=post,
            export=lambda name: handlers.wg_export(self.reconciler, self.state_dir, name),
            renew=lambda name: handlers.renew(self.reconciler, name),
            remap=self._remap_request,
        )

    def _remap_request(self, name: object) -> dict[str, Any]:
        reply = handlers.remap_now(self.reconciler, name, int(time.time()))
        if reply.get("ok") and reply.get("moved"):
            self._wake("dom0 remap now")
        return reply


def agent_gateways(policy: Policy) -> list[str]:
    """Where the agents' listener listens: the gateway of each bridge domain
    whose services include `enroll`, and the hub's bridge address when a hub
    domain's do (a hub machine talks to dom0 over its underlay)."""
    out = [str(d.gateway) for d in policy.domains.values() if "enroll" in d.services and not d.hub]
    if policy.hub is not None and any(
        "enroll" in d.services for d in policy.domains.values() if d.hub
    ):
        out.append(str(policy.hub.gateway))
    return out


def _wireguard(state_dir: Path) -> Callable[[], WireGuard]:
    """The WireGuard backend, found on first use: a policy without uplink or
    hub never needs one, and a missing one is an error of the sync that needs
    it (retried), not of the controller's start."""
    found: list[WireGuard] = []

    def get() -> WireGuard:
        if not found:
            d = state_dir / "wireguard"
            d.mkdir(mode=0o700, exist_ok=True)
            found.append(detect(d, log_dir=d))
            log.info("wireguard: using the %s backend", found[0].kind)
        return found[0]

    return get


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def run_command(policy_file: str, state_dir: str, log_level: str, resync: float) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    policy = load_or_report(policy_file, "dom0 run")
    if policy is None:
        return 2
    if resync <= 0:
        print("dom0 run: --resync: must be a positive number of seconds", file=sys.stderr)
        return 2
    from controller.cli import net_admin_problem

    if problem := net_admin_problem("dom0 run"):
        print(problem, file=sys.stderr)
        return 1
    state = Path(state_dir)
    if state.exists() and not state.is_dir():
        print(f"dom0 run: --state {state_dir}: not a directory, expected one", file=sys.stderr)
        return 2
    try:
        state.mkdir(parents=True, exist_ok=True)
        # 0711: dnsmasq, unprivileged, must reach dhcp/ inside; nothing is listable
        os.chmod(state, 0o711)
    except OSError as e:
        print(f"dom0 run: state directory {state_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        lock = claim(state)
    except OSError as e:
        print(f"dom0 run: {state / LOCK_NAME}: {e.strerror or e}", file=sys.stderr)
        return 1
    if lock is None:
        print(
            f"dom0 run: a controller already runs with state {state_dir} "
            f"(it holds {state / LOCK_NAME}): stop it first",
            file=sys.stderr,
        )
        return 1
    try:
        bridged = enable_forwarding()
        controller = Controller(Path(policy_file), policy, state, resync, bridged)
    except (OSError, StoreError) as e:
        print(f"dom0 run: {e}", file=sys.stderr)
        return 1
    trio.run(controller.run)
    return 0
