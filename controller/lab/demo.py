"""`dom0 lab demo`: build a lab, check what every VM got and can reach, tear it down.

The checks are a pure function of observations (`evaluate`), so the table
and its verdicts are tested with plain data; `run` gathers the observations
from a live lab.

Expectations, from the lab policy's promises:
- every VM is listed by the controller; an admitted VM's lease address is the
  address the controller reports for it on the bridge (its domain address,
  or for a VM of a hub domain its hub address: its domain address then lives
  inside its tunnel);
- an admitted VM reaches the internet echo and is seen as `expected_echo`
  (198.51.100.3 when all egress leaves through dom0's uplink to the VPN
  provider, the lab's default; 198.51.100.2 for a lab without the uplink,
  masqueraded out of dom0's WAN); a quarantined VM reaches nothing;
- a VM reaches another VM's echo exactly when both are admitted in the same
  domain.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from controller.lab import build, controllerproc, dhcpclient, probe, teardown, topology, vm
from controller.lab.probe import ProbeResult
from controller.lab.rundir import Lab, LabError

Machine = dict[str, Any]
PROBE_TIMEOUT = 2.0
ALL_PEERS_UP_TO = 8  # beyond this many VMs, each probes a sample of peers
PROBE_BATCH = 32  # probe processes at once


@dataclass(frozen=True, slots=True)
class Observation:
    """What one VM got and saw."""

    index: int
    mac: str
    lease_address: str | None  # "10.10.0.23/24", or None without a lease
    machine: Machine | None  # its entry in `dom0 status --json`, None if absent
    echo: ProbeResult | None  # fetching the internet echo; None if not probed
    peers: dict[int, ProbeResult] = field(default_factory=dict)  # peer index -> probe
    agent: Machine | None = None  # its agent in `dom0 status --json` (None: it runs none)


@dataclass(frozen=True, slots=True)
class PeerCheck:
    peer: int
    reachable: bool
    expected: bool
    detail: str

    @property
    def ok(self) -> bool:
        return self.reachable == self.expected


@dataclass(frozen=True, slots=True)
class Row:
    index: int
    mac: str
    rule: str | None
    domain: str | None
    name: str | None
    address: str | None
    state: str | None
    echo: str  # what the echo saw, or why it failed
    echo_ok: bool
    peers: tuple[PeerCheck, ...]
    problems: tuple[str, ...]
    agent: str = "-"  # its agent: the version it runs, or what is wrong

    @property
    def vm(self) -> str:
        return f"vm{self.index}"

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def isolation(self) -> str:
        parts = []
        for c in self.peers:
            word = "ok" if c.reachable else "blocked"
            parts.append(f"vm{c.peer} {word}" + ("" if c.ok else "(!)"))
        return ", ".join(parts) or "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "index": self.index,
            "mac": self.mac,
            "rule": self.rule,
            "domain": self.domain,
            "name": self.name,
            "address": self.address,
            "state": self.state,
            "echo": self.echo,
            "echo_ok": self.echo_ok,
            "isolation": [{**asdict(c), "ok": c.ok} for c in self.peers],
            "agent": self.agent,
            "problems": list(self.problems),
            "ok": self.ok,
        }


def _admitted(m: Machine | None) -> bool:
    return m is not None and m.get("state") == "admitted"


def expect_reachable(a: Machine | None, b: Machine | None) -> bool:
    """Same-domain admitted machines reach each other; nothing else does."""
    return _admitted(a) and _admitted(b) and a["domain"] is not None and a["domain"] == b["domain"]  # type: ignore[index]


def _bare(address: str | None) -> str | None:
    return address.split("/", 1)[0] if address else None


def _probe_text(r: ProbeResult) -> str:
    return r.body.strip() if r.ok else f"blocked ({r.kind or 'error'})"


def evaluate(
    observations: Sequence[Observation], expected_echo: str = topology.DOM0_WAN
) -> list[Row]:
    """Rows of the demo table with each expectation checked."""
    by_index = {o.index: o for o in observations}
    rows = []
    for o in sorted(observations, key=lambda o: o.index):
        m = o.machine
        problems: list[str] = []
        if o.lease_address is None:
            problems.append("no DHCP lease")
        if m is None:
            problems.append("not listed by the controller")
        elif _admitted(m):
            on_bridge = m.get("underlay") or m.get("address")
            if on_bridge and o.lease_address and _bare(o.lease_address) != on_bridge:
                problems.append(f"lease {o.lease_address} but controller says {on_bridge}")
        elif m.get("state") != "quarantined":
            problems.append(f"unknown state {m.get('state')!r}")

        if o.echo is None:
            echo_text, echo_ok = "-", not _admitted(m)
            if not echo_ok:
                problems.append("echo not probed")
        else:
            echo_text = _probe_text(o.echo)
            if _admitted(m):
                echo_ok = o.echo.ok and o.echo.body.strip() == expected_echo
                if not echo_ok:
                    problems.append(f"echo saw {echo_text}, expected {expected_echo}")
            else:
                echo_ok = not o.echo.ok
                if not echo_ok:
                    problems.append(f"{'quarantined' if m else 'unknown'} VM reached the internet")

        agent = "-"
        if o.agent is not None:
            a = o.agent
            agent = f"v{a.get('applied')}" if a.get("applied") else "none applied"
            nack = a.get("last_nack") or {}
            if not a.get("connected"):
                agent += " (down)"
            elif not a.get("in_sync"):
                agent += f" (v{nack.get('version')} refused)" if nack else " (pending)"
            if not (a.get("connected") and a.get("in_sync")):
                problems.append(f"agent {agent}")

        checks = []
        for peer, result in sorted(o.peers.items()):
            other = by_index.get(peer)
            expected = expect_reachable(m, other.machine if other else None)
            check = PeerCheck(peer, result.ok, expected, _probe_text(result))
            checks.append(check)
            if not check.ok:
                want = "reachable" if expected else "blocked"
                got = "reached" if result.ok else _probe_text(result)
                problems.append(f"vm{peer} should be {want}, {got}")
        rows.append(
            Row(
                index=o.index,
                mac=o.mac,
                rule=(m or {}).get("rule"),
                domain=(m or {}).get("domain"),
                name=(m or {}).get("name"),
                address=(m or {}).get("address") or _bare(o.lease_address),
                state=(m or {}).get("state"),
                echo=echo_text,
                echo_ok=echo_ok,
                peers=tuple(checks),
                problems=tuple(problems),
                agent=agent,
            )
        )
    return rows


COLUMNS = ("VM", "MAC", "rule", "name", "address", "agent", "echo", "isolation", "result")


def table_rows(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    """The table's cells, header first."""
    out: list[tuple[str, ...]] = [COLUMNS]
    for r in rows:
        out.append(
            (
                r.vm,
                r.mac,
                r.rule or "-",
                r.name or ("(quarantined)" if r.state == "quarantined" else "-"),
                r.address or "-",
                r.agent,
                r.echo + ("" if r.echo_ok else "(!)"),
                r.isolation,
                "PASS" if r.ok else "FAIL",
            )
        )
    return out


def render_table(rows: Sequence[Row]) -> str:
    cells = table_rows(rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def render(rows: Sequence[Row]) -> str:
    """Table plus one line per failed expectation and the verdict."""
    text = [render_table(rows)]
    failed = [(r.vm, p) for r in rows for p in r.problems]
    if failed:
        text.append("")
        text += [f"FAIL {vm_}: {p}" for vm_, p in failed]
    passed = sum(r.ok for r in rows)
    text.append("")
    text.append(f"{passed}/{len(rows)} VMs as expected: {'PASS' if not failed else 'FAIL'}")
    return "\n".join(text)


def to_json(rows: Sequence[Row], lab_name: str, expected_echo: str) -> dict[str, Any]:
    return {
        "lab": lab_name,
        "expected_echo": expected_echo,
        "ok": all(r.ok for r in rows),
        "vms": [r.to_json() for r in rows],
    }


def select_peers(
    index: int, machines: Mapping[int, Machine | None], limit: int = ALL_PEERS_UP_TO
) -> list[int]:
    """Which peers VM index probes: all when few, else the nearest two of its own
    domain and the nearest two of others (both expectations stay covered)."""
    others = sorted((i for i in machines if i != index), key=lambda i: (abs(i - index), i))
    if len(machines) <= limit:
        return sorted(others)
    mine = (machines.get(index) or {}).get("domain")
    same = [i for i in others if mine is not None and (machines[i] or {}).get("domain") == mine]
    diff = [i for i in others if i not in same]
    return sorted(same[:2] + diff[:2])


def observe(
    lab: Lab,
    leases: dict[int, dhcpclient.Lease],
    machines_by_mac: dict[str, Machine],
    timeout: float = PROBE_TIMEOUT,
    agents: Mapping[str, Machine] | None = None,
) -> list[Observation]:
    """Probe the echo and the peers from every VM (concurrently) and collect
    results; `agents` are `dom0 status`'s, by machine name."""
    vms = lab.vms()
    machines = {i: machines_by_mac.get(str(v["mac"]).lower()) for i, v in vms.items()}
    jobs: list[tuple[int, list[int], list[str]]] = []
    for i in sorted(vms):
        peers = [p for p in select_peers(i, machines) if p in leases]
        urls = [vm.echo_url()] + [vm.echo_url(_address(machines[p], leases[p])) for p in peers]
        jobs.append((i, peers, urls))
    results: dict[int, list[ProbeResult]] = {}
    for start in range(0, len(jobs), PROBE_BATCH):
        batch = jobs[start : start + PROBE_BATCH]
        got = probe.probe_parallel([(lab.vm_ns(i), urls) for i, _, urls in batch], timeout=timeout)
        results.update({i: r for (i, _, _), r in zip(batch, got, strict=True)})
    observations = []
    for i, peers, _ in jobs:
        lease = leases.get(i)
        echo, *peer_results = results[i]
        observations.append(
            Observation(
                index=i,
                mac=str(vms[i]["mac"]),
                lease_address=f"{lease.ip}/{lease.prefix}" if lease else None,
                machine=machines[i],
                echo=echo,
                peers=dict(zip(peers, peer_results, strict=True)),
                agent=(agents or {}).get(str((machines[i] or {}).get("name"))),
            )
        )
    return observations


def _address(machine: Machine | None, lease: dhcpclient.Lease) -> str:
    """Where to reach a VM: its domain address (inside its tunnel for hub VMs)."""
    return str((machine or {}).get("address") or lease.ip)


def run(
    vms: int = build.DEFAULT_VMS,
    *,
    policy: str | None = None,
    name: str | None = None,
    expected_echo: str = topology.VPN_WAN,
    lease_timeout: float = 30.0,
    progress: Callable[[str], None] = lambda _: None,
    warn: Callable[[str], None] = lambda _: None,
    agents: bool = True,
) -> tuple[str, list[Row]]:
    """Build a lab, observe, evaluate, and always tear the lab down (only the
    demo's own: a lab of that name that already exists raises LabExists and
    is left alone). The VMs' MACs are fitted to the policy's rules."""
    name = name or unique_name("demo")
    # Raises LabExists before anything is built; `finally` must not remove that lab.
    started = time.monotonic()
    lab = build.create(
        name,
        vms,
        policy=policy,
        wait_leases=False,
        fit=True,
        progress=progress,
        warn=warn,
        agents=agents,
    )
    try:
        indexes = sorted(lab.vms())
        try:
            leases = dhcpclient.wait_leases(
                lab,
                indexes,
                lease_timeout,
                progress=lambda have, want, _: progress(f"leases {have}/{want}"),
                check=lambda: controllerproc.check_running(lab),
            )
        except LabError as exc:
            progress(str(exc))
            leases = {i: le for i in indexes if (le := dhcpclient.read_lease(lab, i)) is not None}
        progress(f"{len(leases)}/{len(indexes)} VMs leased ({time.monotonic() - started:.1f} s)")
        macs = [str(lab.vm(i)["mac"]) for i in leases]
        try:
            machines = controllerproc.wait_machines(lab, macs, timeout=10.0)
        except LabError as exc:
            progress(str(exc))
            try:
                machines = {str(m.get("mac", "")).lower(): m for m in controllerproc.status(lab)}
            except LabError as exc2:
                progress(str(exc2))
                machines = {}
        enrolled = build.enroll_agents(lab, sorted(leases), progress) if agents else []
        if enrolled:
            progress(f"{len(enrolled)} VMs run the agent, enrolled with a token each")
        joined = build.join_hub(lab, [i for i in sorted(leases) if i not in enrolled])
        if joined:
            progress(f"{len(joined)} VMs joined the hub with `dom0 wg export`")
        progress("probing the echo service and the other VMs")
        seen = {a["name"]: a for a in controllerproc.reply(lab).get("agents", [])}
        rows = evaluate(observe(lab, leases, machines, agents=seen), expected_echo)
        return name, rows
    finally:
        with teardown.shielded():
            teardown.down(lab)
        progress(f"lab {name} torn down")


def unique_name(prefix: str) -> str:
    """A short lab name unique to this process: prefix + pid + random."""
    return f"{prefix}{os.getpid() % 10000}{secrets.token_hex(2)}"
