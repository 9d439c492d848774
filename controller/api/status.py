"""`dom0 status`: the controller's state as plain data, and as a table."""

from __future__ import annotations

import time
from typing import Any

from controller.reconcile import Reconciler


def status(
    rec: Reconciler,
    *,
    policy: str,
    last_policy_error: str | None,
    dnsmasq_pid: int | None,
    dnsmasq_reloads: int = 0,
    ca_warnings: list[str] | None = None,
    agents: list[dict[str, object]] | None = None,
) -> dict[str, Any]:
    s = rec.stats
    return {
        "ok": True,
        # the CA's root or issuing intermediate near expiry (or gone): an
        # expired CA would stop every agent at once, so it is said everywhere
        "ca_warnings": list(ca_warnings or ()),
        "agents": list(agents or ()),  # every agent pushed to: connected, versions, last NACK
        "policy": policy,
        "bridge": rec.policy.bridge,
        "last_policy_error": last_policy_error,
        "dnsmasq_pid": dnsmasq_pid,
        "dnsmasq_reloads": dnsmasq_reloads,
        "generation": s.generation,
        "stats": {
            "reconciles": s.reconciles,
            "syncs": s.syncs,
            "rebuilds": s.rebuilds,
            "errors": s.errors,
            "refusals": s.refusals,
            "repairs": s.repairs,
            "renewals": s.renewals,
            "last_repair": s.last_repair,
            "last_error": s.last_error,
            "uptime": round(time.time() - s.started, 1),
        },
        "machines": [m.to_json() for m in rec.machines()],
    }


def format_status(reply: dict) -> str:
    machines = reply.get("machines", [])
    stats = reply.get("stats", {})
    cols = ["mac", "port", "state", "rule", "domain", "name", "address"]
    rows = [[str(m.get(c) or "-") for c in cols] for m in machines]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = [
        f"policy {reply.get('policy')}  bridge {reply.get('bridge')}  "
        f"machines {len(machines)}  reconciles {stats.get('reconciles')}  "
        f"errors {stats.get('errors')}  refusals {stats.get('refusals', 0)}  "
        f"repairs {stats.get('repairs', 0)}"
    ]
    for warning in reply.get("ca_warnings", []):
        lines.append(f"WARNING: {warning}")
    if reply.get("last_policy_error"):
        lines.append(f"policy reload refused: {reply['last_policy_error']}")
    if stats.get("last_repair"):
        lines.append(f"last repair: {'; '.join(stats['last_repair'])}")
    lines.append("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for m in machines:
        if m.get("reason"):
            lines.append(f"{m['mac']}: {m['reason']}")
    return "\n".join(line.rstrip() for line in lines)
