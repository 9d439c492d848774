"""`dom0 plan --policy FILE`: what the controller would change now.

Reads the policy, the state store (read-only) and the bridge as netlink
shows it in this network namespace; decides on a throw-away copy of the
allocations (the controller's own decision loop, `core.decide.decide_many`);
observes every driver exactly as a full sync does, read-only; prints the
plan between the two — what the next sync would apply. Changes nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import trio

from controller.core import inventory as inv
from controller.core.allocation import Ledger
from controller.core.decide import decide_many
from controller.core.desired import fqdn_of, policy_state
from controller.core.leases import parse_leases
from controller.core.plan import flatten, plan
from controller.dataplane import DataPlane
from controller.drivers.addresses import bridge_netfilter
from controller.policy.load import load_or_report
from controller.store import Store, StoreError


async def _snapshot() -> inv.Tables:
    from controller.sources.netlink import NetlinkSource

    send, recv = trio.open_memory_channel[object](100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(NetlinkSource().run, send)
        first = await recv.receive()
        nursery.cancel_scope.cancel()
    return inv.fold(inv.EMPTY, first)  # type: ignore[arg-type]


def _dataplane(state: Path) -> DataPlane:
    """The drivers, for looking only: nothing here writes a file, a key, a
    table or an address."""
    from common.wireguard import WireGuard, detect
    from controller.drivers.addresses import Addresses
    from controller.drivers.dhcp import Dnsmasq
    from controller.drivers.nft import Nft
    from controller.drivers.tunnels import Tunnels

    addresses = Addresses()
    found: list[WireGuard] = []

    def wg() -> WireGuard:
        if not found:
            d = state / "wireguard"
            found.append(detect(d, log_dir=d))
        return found[0]

    dnsmasq = Dnsmasq(state, readonly=True)
    return DataPlane(
        nft=Nft(),
        hosts=dnsmasq.hosts,
        addresses=addresses,
        dhcp=dnsmasq,
        tunnels=Tunnels(wg, addresses.ipr, state),
    )


def _open_store(state: Path) -> Store | None:
    """The store to plan from, read-only; None (said on stderr) when there is
    none yet: planning a fresh host is legitimate, but never silently, since
    a mistyped --state would otherwise look like a host that knows nothing."""
    try:
        is_dir = state.is_dir()
        present = (state / "state.sqlite").exists()
    except OSError as e:
        raise StoreError(f"{state}: {e.strerror or e} (the state is root's: run as root)") from e
    if state.exists() and not is_dir:
        raise StoreError(f"--state {state}: not a directory, expected the state directory")
    if is_dir and not os.access(state, os.R_OK | os.X_OK):
        raise StoreError(f"{state}: permission denied (the state is root's: run as root)")
    if not present:
        where = "no state" if not is_dir else "no state store"
        print(f"dom0 plan: {where} at {state}: planning as for a fresh host", file=sys.stderr)
        return None
    return Store(state, readonly=True)


def plan_command(policy_file: str, state_dir: str, *, as_json: bool = False) -> int:
    policy = load_or_report(policy_file, "dom0 plan")
    if policy is None:
        return 2
    from controller.cli import net_admin_problem

    # what the plan compares with (nftables above all) is root's to read
    if problem := net_admin_problem("dom0 plan"):
        print(problem, file=sys.stderr)
        return 1
    state = Path(state_dir)
    try:
        store = _open_store(state)
    except StoreError as e:
        print(f"dom0 plan: {e}", file=sys.stderr)
        return 2
    from controller.drivers.machine_keys import MachineKeys

    ledger = Ledger(store.allocations() if store else ())
    tables = trio.run(_snapshot)
    inventory = inv.inventory(tables, policy.bridge)
    now = int(time.time())
    try:
        text = (state / "dhcp" / "leases").read_text(errors="replace")
    except OSError:
        text = ""
    d = decide_many(
        policy,
        inventory,
        ledger,
        set(inventory.sightings) | set(ledger.by_mac),
        now,
        MachineKeys(state).public(),
        parse_leases(text, now).by_mac,
    )
    decisions: list[dict] = []
    for mac in d.touched:
        a = ledger.get(mac)
        if a is None:
            decisions.append({"mac": mac, "released": True})
            continue
        decisions.append(
            {
                "mac": a.mac,
                "rule": a.rule,
                "slot": a.slot,
                "name": fqdn_of(policy, a),
                "address": a.address,
                "port": a.port,
                "absent": a.absent_since is not None,
                "confirmed": a.confirmed,
            }
        )
    # refused MACs change nothing (and there may be thousands: the first 100)
    refused = [
        {"mac": mac, "refused": out.refused} for mac, out in d.outcomes.items() if out.refused
    ][:100]
    pstate = policy_state(policy, inventory.foreign_ports, bridge_netfilter=bridge_netfilter())
    desired = flatten(pstate, [m for m in d.states.values() if m is not None])
    observed = _dataplane(state).observe(desired, {policy.bridge})
    p = plan(desired, observed)
    if as_json:
        print(
            json.dumps(
                {
                    "policy": policy_file,
                    "bridge_present": inventory.bridge_index is not None,
                    "allocations": decisions,
                    "refused": refused,
                    "changes": p.to_json(),
                    "lines": p.lines(),
                    "empty": p.empty and not decisions,
                },
                indent=2,
            )
        )
        return 0
    if inventory.bridge_index is None:
        print(f"note: bridge {policy.bridge} does not exist in this network namespace")
    for x in refused:
        print(f"machine: {x['mac']} refused: {x['refused']}")
    for x in decisions:
        if "released" in x:
            print(f"machine: {x['mac']} released")
        elif x["absent"]:
            print(f"machine: {x['mac']} gone; keeps {x['name']} {x['address']} until released")
        else:
            print(
                f"machine: {x['mac']} on {x['port']} -> {x['name']} {x['address'] or '(no address)'}"
            )
    lines = p.lines()
    for line in lines:
        print(line)
    if not lines and not decisions:
        print("nothing to change")
    return 0
