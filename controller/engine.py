"""`dom0 run`: the always-on controller.

One trio nursery owns every task: the netlink source, the reconcile loop,
dnsmasq's supervisor, the policy watcher, signal handling and the control
socket. Source events, reload and resync requests all go through one
channel into the reconcile loop, which folds whatever has queued up and then
reconciles once: bursts of events coalesce into one transaction.

SIGTERM (or SIGINT) stops the controller and leaves the data plane in place:
nftables tables, gateway addresses and dnsmasq keep working, fail-closed.
SIGHUP, `dom0 reload`-style requests or a changed policy file reload the
policy; an invalid policy is refused and logged, and the last good one keeps
running.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from controller import control, wgexport
from controller.core.desired import fqdn_of
from controller.drivers.addresses import Addresses, enable_forwarding
from controller.drivers.dhcp import Dnsmasq
from controller.drivers.nft import Nft
from controller.drivers.tunnels import Tunnels, machine_key_path
from controller.drivers.wireguard import WireGuard, detect, keys
from controller.policy.load import PolicyError, load_or_report, load_policy
from controller.policy.model import Policy
from controller.reconcile import Reconciler
from controller.sources import leases

log = logging.getLogger("dom0")


@dataclass(frozen=True)
class Reload:
    why: str


@dataclass(frozen=True)
class Resync:
    why: str


class Controller:
    def __init__(self, policy_path: Path, policy: Policy, state_dir: Path, resync: float) -> None:
        self.policy_path = policy_path
        self.policy_digest = _digest(policy_path)
        self.state_dir = state_dir
        self.resync_every = resync
        self.dnsmasq = Dnsmasq(state_dir)
        addresses = Addresses()
        self.reconciler = Reconciler(
            policy,
            state_dir,
            nft=Nft(),
            addresses=addresses,
            dnsmasq=self.dnsmasq,
            tunnels=Tunnels(_wireguard(state_dir), addresses.ipr, state_dir),
        )
        self.last_policy_error: str | None = None
        self.send, self.recv = trio.open_memory_channel[object](10_000)

    # -- tasks -------------------------------------------------------------------
    async def run(self) -> None:
        from controller.sources.netlink import NetlinkSource

        # Before any source, tunnel or machine: nothing leaves the WAN outside
        # the tunnel from here on.
        self.reconciler.early()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, nursery.cancel_scope)
            nursery.start_soon(self.dnsmasq.run)
            await nursery.start(NetlinkSource().run, self.send.clone())
            await nursery.start(leases.watch, self.dnsmasq.hosts.root / "leases", self.send.clone())
            nursery.start_soon(self._loop)
            nursery.start_soon(self._watch_policy)
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
            with trio.move_on_after(self.resync_every) as scope:
                self._take(await self.recv.receive())
            if scope.cancelled_caught:
                rec.request_resync()
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
                    await trio.sleep(1)
                    await self.send.send(Resync("after a failure"))

    def _take(self, item: object) -> None:
        if isinstance(item, Reload):
            self._reload(item.why)
        elif isinstance(item, Resync):
            self.reconciler.request_resync()
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
            return
        self.last_policy_error = None
        self.policy_digest = _digest(self.policy_path)
        if policy == self.reconciler.policy:
            log.info("policy reload (%s): unchanged", why)
            return
        log.info("policy reload (%s): applying %s", why, self.policy_path)
        self.reconciler.set_policy(policy)

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
        rec = self.reconciler
        cmd = request["cmd"]
        if cmd == "status":
            s = rec.stats
            return {
                "ok": True,
                "policy": str(self.policy_path),
                "bridge": rec.policy.bridge,
                "last_policy_error": self.last_policy_error,
                "dnsmasq_pid": self.dnsmasq.pid,
                "stats": {
                    "reconciles": s.reconciles,
                    "syncs": s.syncs,
                    "rebuilds": s.rebuilds,
                    "errors": s.errors,
                    "refusals": s.refusals,
                    "last_error": s.last_error,
                    "uptime": round(time.time() - s.started, 1),
                },
                "machines": [m.to_json() for m in rec.machines()],
            }
        if cmd == "wg-export":
            return self._wg_export(request.get("name"))
        if cmd in ("reload", "resync"):
            item = Reload("control socket") if cmd == "reload" else Resync("control socket")
            try:
                self.send.send_nowait(item)
            except trio.WouldBlock:
                return {"ok": False, "error": "busy, try again"}
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}, expected status, reload or resync"}

    def _wg_export(self, name: object) -> dict:
        rec = self.reconciler
        if not isinstance(name, str) or not 0 < len(name) <= 253:
            return {"ok": False, "usage": True, "error": "NAME: expected a machine name or MAC"}
        a = rec.find(name)
        if a is None:
            return {
                "ok": False,
                "usage": True,
                "error": f"{name}: no such machine (see dom0 status)",
            }
        hub = rec.policy.hub
        if hub is None or a.underlay is None or a.address is None or a.absent_since is not None:
            return {
                "ok": False,
                "usage": True,
                "error": f"{name}: not a present machine of a hub domain (its domain needs hub = true)",
            }
        if rec.tunnels is None:
            return {"ok": False, "error": "this controller runs without WireGuard"}
        private = keys.load(machine_key_path(self.state_dir, a.key_id))
        hub_key = rec.tunnels.hub_public_key(rec.applied_policy.hub)  # type: ignore[union-attr]
        fqdn = fqdn_of(rec.policy, a)
        endpoint = f"{hub.gateway}:{hub.listen_port}"
        config = wgexport.render(
            fqdn=fqdn,
            mac=a.mac,
            private_key=keys.to_base64(private.secret_bytes()),
            address=a.address,
            hub_public_key=hub_key,
            endpoint=endpoint,
            mtu=hub.mtu,
        )
        log.info("wg export: handed out the tunnel configuration of %s", fqdn)
        return {
            "ok": True,
            "name": fqdn,
            "mac": a.mac,
            "address": a.address,
            "underlay": a.underlay,
            "endpoint": endpoint,
            "public_key": keys.to_base64(private.public),
            "config": config,
        }


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
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    # 0711: dnsmasq, unprivileged, must reach dhcp/ inside; nothing is listable
    os.chmod(state, 0o711)
    try:
        enable_forwarding()
        controller = Controller(Path(policy_file), policy, state, resync)
    except OSError as e:
        print(f"dom0 run: {e}", file=sys.stderr)
        return 1
    trio.run(controller.run)
    return 0
