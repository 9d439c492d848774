"""The control socket's requests: status, reload, resync, wg-export.

Each handler takes what it needs from the running controller and returns a
reply; requests are already bounded and parsed (controller/control.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.wireguard import keys
from controller import wgexport
from controller.core.desired import fqdn_of
from controller.drivers.machine_keys import key_path
from controller.policy.model import QUARANTINE
from controller.reconcile import Reconciler

log = logging.getLogger("dom0")


def wg_export(rec: Reconciler, state_dir: Path, name: object) -> dict[str, Any]:
    if not isinstance(name, str) or not 0 < len(name) <= 253:
        return {"ok": False, "usage": True, "error": "NAME: expected a machine name or MAC"}
    a = rec.find(name)
    if a is None:
        return {"ok": False, "usage": True, "error": f"{name}: no such machine (see dom0 status)"}
    hub = rec.policy.hub
    if hub is None or a.underlay is None or a.address is None or a.absent_since is not None:
        return {
            "ok": False,
            "usage": True,
            "error": f"{name}: not a present machine of a hub domain (its domain needs hub = true)",
        }
    if rec.tunnels is None or rec.applied_policy is None or rec.applied_policy.hub is None:
        return {"ok": False, "error": "this controller runs without its hub (yet)"}
    if rec.keys.is_agents(a.key_id):
        return {
            "ok": False,
            "usage": True,
            "error": f"{name}: its agent enrolled with a key of its own, which never leaves it: "
            "there is nothing to export",
        }
    private = keys.load(key_path(state_dir, a.key_id))
    hub_key = rec.tunnels.hub_public_key(rec.applied_policy.hub)
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


def renew(rec: Reconciler, name: object) -> dict[str, Any]:
    """`dom0 machine renew NAME`: flap the carrier of the machine's port."""
    if not isinstance(name, str) or not 0 < len(name) <= 253:
        return {"ok": False, "usage": True, "error": "NAME: expected a machine name or MAC"}
    a = rec.find(name)
    if a is None:
        return {"ok": False, "usage": True, "error": f"{name}: no such machine (see dom0 status)"}
    fqdn = fqdn_of(rec.policy, a)
    if a.absent_since is not None:
        return {"ok": False, "error": f"{fqdn}: absent (its port {a.port} is gone)"}
    if not a.confirmed:
        # (it has no lease to renew; and a flap would make the bridge forget
        # it, which releases a machine that never held its lease)
        return {"ok": False, "error": f"{fqdn}: has not held its lease yet: nothing to renew"}
    if not rec.renew(a.mac, a.port):
        return {"ok": False, "error": "this controller cannot flap carriers"}
    log.info("machine renew: flapping the carrier of %s for %s", a.port, fqdn)
    return {"ok": True, "name": fqdn, "mac": a.mac, "port": a.port}


def remap_now(rec: Reconciler, name: object, now: int) -> dict[str, Any]:
    """`dom0 remap now [--machine NAME]`."""
    from controller.core import remap

    if name is None:
        force = [a.mac for a in rec.ledger.by_mac.values() if remap.remappable(rec.policy, a)]
        if not any(d.remap_every for d in rec.policy.domains.values()):
            return {"ok": False, "usage": True,
                    "error": "no domain has remap_every: name a machine (--machine)"}  # fmt: skip
    else:
        if not isinstance(name, str) or not 0 < len(name) <= 253:
            return {"ok": False, "usage": True, "error": "--machine: expected a name or MAC"}
        a = rec.find(name)
        if a is None:
            return {"ok": False, "usage": True,
                    "error": f"--machine {name}: no such machine (see dom0 status)"}  # fmt: skip
        fqdn = fqdn_of(rec.policy, a)
        if a.rule == QUARANTINE or a.address is None or a.absent_since is not None:
            return {"ok": False, "error": f"{fqdn}: not admitted with an address: not remapped"}
        if a.previous is not None:
            until = datetime.fromtimestamp(a.previous_until or 0, UTC).isoformat()
            return {"ok": False, "error": f"{fqdn}: still holds {a.previous} from its last "
                    f"remap, until {until}"}  # fmt: skip
        rule = rec.policy.rule(a.rule)
        if rule is not None and rule.pins:
            return {"ok": False, "error": f"{fqdn}: its rule pins its address: never remapped"}
        force = [a.mac]
    return {"ok": True, "moved": rec.remap(now, force=force)}


def dispatch(
    request: dict,
    *,
    status: Callable[[], dict],
    post: Callable[[str], bool],
    export: Callable[[object], dict],
    renew: Callable[[object], dict],
    remap: Callable[[object], dict] | None = None,
) -> dict[str, Any]:
    """One request to its handler. `post(cmd)` queues a reload or resync for
    the reconcile loop (False when its queue is full)."""
    cmd = request["cmd"]
    if cmd == "status":
        return status()
    if cmd == "wg-export":
        return export(request.get("name"))
    if cmd == "renew":
        return renew(request.get("name"))
    if cmd == "remap" and remap is not None:
        return remap(request.get("name"))
    if cmd in ("reload", "resync"):
        if not post(cmd):
            return {"ok": False, "error": "busy, try again"}
        return {"ok": True}
    return {
        "ok": False,
        "error": f"unknown command {cmd!r}, expected status, reload, resync, renew or wg-export",
    }
