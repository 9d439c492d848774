"""`dom0 plan --policy FILE`: what the controller would change now.

Reads the policy, the state store (read-only) and the bridge as netlink
shows it in this network namespace; decides on a throw-away copy of the
allocations; prints desired minus last applied. Changes nothing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import trio

from controller.core import inventory as inv
from controller.core.allocation import Ledger
from controller.core.decide import decide, decide_order
from controller.core.desired import fqdn_of, policy_state
from controller.core.leases import parse_leases
from controller.core.plan import EMPTY, Flat, flatten, plan, with_machines
from controller.drivers.tunnels import machine_public_key
from controller.policy.load import load_or_report
from controller.store import Store, StoreError


async def _snapshot() -> inv.Tables:
    from controller.sources.netlink import NetlinkSource

    send, recv = trio.open_memory_channel[object](100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(NetlinkSource().run, send)
        first = await recv.receive()
        nursery.cancel_scope.cancel()
    return inv.fold(inv.EMPTY, first)


def applied_flat(store: Store | None) -> Flat:
    """What was last applied, policy and machines together."""
    if store is None:
        return EMPTY
    base = store.applied_policy()
    if base.shape is None:
        return EMPTY
    return with_machines(base, store.applied_machines().values())


def plan_command(policy_file: str, state_dir: str, *, as_json: bool = False) -> int:
    policy = load_or_report(policy_file, "dom0 plan")
    if policy is None:
        return 2
    store: Store | None = None
    if (Path(state_dir) / "state.sqlite").exists():
        try:
            store = Store(state_dir, readonly=True)
        except (StoreError, OSError) as e:
            print(f"dom0 plan: {state_dir}: {e}", file=sys.stderr)
            return 1
    ledger = Ledger(store.allocations() if store else ())
    tables = trio.run(_snapshot)
    inventory = inv.inventory(tables, policy.bridge)
    now = int(time.time())
    try:
        text = (Path(state_dir) / "dhcp" / "leases").read_text(errors="replace")
    except OSError:
        text = ""
    leased = parse_leases(text, now).by_mac
    machines = {}
    decisions = []
    for mac in decide_order(ledger, set(inventory.sightings) | set(ledger.by_mac)):
        out = decide(
            policy,
            inventory,
            ledger,
            mac,
            now,
            lambda key: machine_public_key(Path(state_dir), key, create=False),
            leased,
        )
        if out.state is not None:
            machines[mac] = out.state
        for a in out.put:
            decisions.append(
                {
                    "mac": a.mac,
                    "rule": a.rule,
                    "slot": a.slot,
                    "name": fqdn_of(policy, a),
                    "address": a.address,
                    "port": a.port,
                    "absent": a.absent_since is not None,
                }
            )
        if out.refused:
            decisions.append({"mac": mac, "refused": out.refused})
    pstate = policy_state(policy, inventory.foreign_ports)
    desired = flatten(pstate, machines.values())
    p = plan(desired, applied_flat(store))
    if as_json:
        print(
            json.dumps(
                {
                    "policy": policy_file,
                    "bridge_present": inventory.bridge_index is not None,
                    "allocations": decisions,
                    "changes": p.to_json(),
                    "empty": p.empty and not decisions,
                },
                indent=2,
            )
        )
        return 0
    if inventory.bridge_index is None:
        print(f"note: bridge {policy.bridge} does not exist in this network namespace")
    for d in decisions:
        if "refused" in d:
            print(f"machine: {d['mac']} refused: {d['refused']}")
        elif d["absent"]:
            print(f"machine: {d['mac']} gone; keeps {d['name']} {d['address']} until released")
        else:
            print(
                f"machine: {d['mac']} on {d['port']} -> {d['name']} {d['address'] or '(no address)'}"
            )
    lines = p.lines()
    for line in lines:
        print(line)
    if not lines and not decisions:
        print("nothing to change")
    return 0
