"""`dom0 status`: the controller's state as plain data, and as a table."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from typing import Any

from common.agentconfig import MAX_CONTAINERS
from controller.policy.model import Policy
from controller.reconcile import Reconciler

MAX_SHOWN = 1 << (32 - MAX_CONTAINERS)  # (bounded anyway by the report's size)


def status(
    rec: Reconciler,
    *,
    policy: str,
    last_policy_error: str | None,
    dnsmasq_pid: int | None,
    dnsmasq_reloads: int = 0,
    ca_warnings: list[str] | None = None,
    agents: list[dict[str, object]] | None = None,
    dns: dict[str, object] | None = None,
) -> dict[str, Any]:
    s = rec.stats
    by_name = {str(a.get("name")): a for a in agents or ()}
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
        "dns": dns,  # unbound: its pid, zones, records, where it listens
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
        "machines": [with_containers(m.to_json(), rec.policy, by_name) for m in rec.machines()],
    }


def with_containers(
    machine: dict[str, Any], policy: Policy, agents: Mapping[str, Mapping[str, object]]
) -> dict[str, Any]:
    """A machine's row with the prefix dom0 delegates to it and the
    containers its agent reports there. The report is the tenant's word:
    only well-formed entries inside the prefix are shown."""
    domain = policy.domains.get(str(machine.get("domain")))
    prefix = domain.delegated(machine.get("address")) if domain is not None else None
    if prefix is None:
        return machine
    agent = agents.get(str(machine.get("name")))  # (agents by name)
    report = agent.get("report") if agent is not None else None
    listed = report.get("containers") if isinstance(report, Mapping) else None
    shown: list[dict[str, str]] = []
    for c in listed if isinstance(listed, list) else ():
        entry = _container(c, prefix, str(machine.get("name")))
        if entry is not None and len(shown) < MAX_SHOWN:
            shown.append(entry)
    return {**machine, "containers_prefix": str(prefix), "containers": shown}


def _container(c: object, prefix: ipaddress.IPv4Network, machine: str) -> dict[str, str] | None:
    if not isinstance(c, Mapping):
        return None
    name, address = c.get("name"), c.get("address")
    if not (isinstance(name, str) and isinstance(address, str)):
        return None
    try:
        ip = ipaddress.ip_interface(address).ip
    except ValueError:
        return None
    if ip not in prefix:
        return None
    fqdn = f"{name}.{machine}"
    if c.get("fqdn") != fqdn:  # (the names follow from the machine's: never the agent's own)
        return None
    return {"name": name, "address": str(ip), "fqdn": fqdn, "interface_fqdn": f"eth0.{fqdn}"}


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
    dns = reply.get("dns")
    if isinstance(dns, dict):
        lines.append(dns_line(dns))
    lines.append("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    for m in machines:
        for c in m.get("containers") or ():
            lines.append(f"  container {c['fqdn']} {c['address']} (on {m.get('name')})")
    for m in machines:
        if m.get("previous"):
            lines.append(f"  remap {m.get('name')}: {m['previous']} -> {m.get('address')}, "
                         f"{m['previous']} kept until {_when(m.get('previous_until'))}")  # fmt: skip
        elif m.get("next_remap"):
            lines.append(f"  next remap {m.get('name')}: {_when(m['next_remap'])}")
    for m in machines:
        if m.get("reason"):
            lines.append(f"{m['mac']}: {m['reason']}")
    return "\n".join(line.rstrip() for line in lines)


def dns_line(dns: dict) -> str:
    if not dns.get("running"):
        return f"dns: unbound NOT running (see {dns.get('log')})"
    tls = ", ".join(dns.get("tls") or ()) or "nowhere (no CA)"
    plain = ", ".join(dns.get("plain") or ())
    return (
        f"dns: unbound pid {dns.get('pid')}, {dns.get('records')} records in "
        f"{len(dns.get('zones') or ())} zones; TLS on {tls}; plain on {plain}"
    )


def _when(t: object) -> str:
    from datetime import UTC, datetime

    if not isinstance(t, int):
        return "?"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
