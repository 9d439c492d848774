"""`dom0 flush --policy FILE --state DIR`: remove everything dom0 put in place here.

The data plane outlives the controller on purpose; this is how an operator
takes it down (uninstall, a host handed back to libvirt's own network, a
clean slate). It works in the network namespace it runs in, and only on
what carries dom0's marks, each found by the driver that made it:

- dnsmasq, unbound and wireguard-go: by their records in the state directory (PID and
  start time, signalled through a pidfd: never by name), and only when they
  run in this network namespace; a kernel WireGuard device of the policy's
  uplink or hub only when its key is dom0's key file's;
- policy-routing rules and routes (every table): dom0's protocol number;
- addresses: dom0's IFA_PROTO, on every interface (a gateway address an older
  policy left on another bridge is dom0's too);
- the reservation files in STATE/dhcp/hosts;
- nftables: dom0's own tables by name (`inet dom0`, `bridge dom0`, the boot
  baseline `inet dom0_baseline`, and last the kill switch `inet dom0_wan`).

It does not use `DataPlane.observe` whole: that answers "is it as the policy
wants?", and a flush must also find what drifted or what an older policy
left; it uses the same ownership marks the drivers' observe relies on.

Kept: the state directory (allocations, keys, leases, logs: `dom0 run`
starts again from it) and the forwarding sysctls (nothing says whether dom0
or someone else turned them on). Foreign tables, addresses, routes, rules
and processes are never touched.

Refused while a controller answers on STATE/control.sock (it would put
everything back); asks for confirmation on a terminal, else needs --yes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import processes
from common.processes import ProcessRecord
from controller.control import SOCKET_NAME
from controller.core.desired import Address
from controller.drivers.tunnels import OwnedRoute, OwnedRule
from controller.policy.load import load_or_report
from controller.policy.model import Policy
from controller.runlock import held_by_a_controller

PROG = "dom0 flush"
# The kill switch goes last: nothing leaves the WAN in the clear while the
# rest comes down.
TABLE_ORDER = (
    ("inet", "dom0"),
    ("bridge", "dom0"),
    ("inet", "dom0_baseline"),
    ("inet", "dom0_wan"),
)


@dataclass(frozen=True)
class Holdings:
    """What dom0 holds in this namespace, as its drivers recognise it."""

    dnsmasq: ProcessRecord | None = None
    unbound: ProcessRecord | None = None
    wireguard_go: tuple[tuple[str, ProcessRecord], ...] = ()  # (interface, daemon)
    kernel_wireguard: tuple[str, ...] = ()
    rules: tuple[OwnedRule, ...] = ()
    routes: tuple[OwnedRoute, ...] = ()
    addresses: frozenset[Address] = frozenset()
    reservations: tuple[Path, ...] = ()
    tables: frozenset[tuple[str, str]] = frozenset()
    kept: tuple[str, ...] = ()  # what was seen and is left alone, and why


@dataclass(frozen=True)
class Step:
    kind: str  # dnsmasq | unbound | wireguard-go | wireguard | rule | route | address | reservations | table
    what: str
    target: Any = field(compare=False, default=None)

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "what": self.what}


def steps(h: Holdings) -> list[Step]:
    """The removal, in order: daemons first (their devices and routes go with
    them), then routing, addresses, files, and the tables, the kill switch
    last. Pure."""
    out: list[Step] = []
    if h.dnsmasq is not None:
        out.append(Step("dnsmasq", f"dnsmasq pid {h.dnsmasq.pid}", h.dnsmasq))
    if h.unbound is not None:
        out.append(Step("unbound", f"unbound pid {h.unbound.pid}", h.unbound))
    for name, rec in h.wireguard_go:
        out.append(Step("wireguard-go", f"wireguard-go pid {rec.pid} and interface {name}", name))
    for name in h.kernel_wireguard:
        out.append(Step("wireguard", f"WireGuard interface {name}", name))
    out += [Step("rule", r.label(), r) for r in sorted(h.rules, key=lambda r: r.priority)]
    out += [Step("route", r.label(), r) for r in h.routes]
    out += [Step("address", f"address {a} on {i}", (i, a)) for i, a in sorted(h.addresses)]
    if h.reservations:
        n = len(h.reservations)
        out.append(Step("reservations", f"{n} reservation file(s) in dhcp/hosts", h.reservations))
    out += [
        Step("table", f"nftables table {f} {t}", (f, t))
        for f, t in TABLE_ORDER
        if (f, t) in h.tables
    ]
    return out


# ---- reading -------------------------------------------------------------------------------


def controller_answers(state: Path) -> bool:
    """A controller listens on STATE/control.sock (a busy one still accepts)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(state / SOCKET_NAME))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _here(rec: ProcessRecord) -> bool:
    return processes.netns_of(rec.pid) == processes.netns_of("self")


def _wireguard_go(state: Path, kept: list[str]) -> list[tuple[str, ProcessRecord]]:
    out = []
    for file in sorted((state / "wireguard").glob("*.json")):
        rec = processes.read_record(file)
        if rec is None or not processes.is_running(rec):
            continue
        if rec.netns != processes.netns_of("self"):
            kept.append(
                f"wireguard-go pid {rec.pid} ({file.stem}): runs in another network namespace"
            )
            continue
        out.append((file.stem, rec))
    return out


def _kernel_wireguard(policy: Policy, state: Path, kept: list[str]) -> list[str]:
    """The policy's uplink and hub devices, when they are kernel WireGuard
    devices holding dom0's own keys."""
    from common.wireguard import WireGuardError, kernel, keys
    from controller.drivers.tunnels import key_path

    wanted = [(u.interface, u.private_key_file) for u in [policy.uplink] if u is not None]
    wanted += [(h.interface, h.private_key_file) for h in [policy.hub] if h is not None]
    if not wanted or not kernel.available():
        return []
    wg = kernel.KernelWireGuard()
    out = []
    for name, key_file in wanted:
        try:
            device = wg.get(name)
        except (WireGuardError, OSError):
            continue
        try:
            mine = keys.public_of(keys.load(key_path(state, key_file)))
        except (keys.KeyFileError, OSError):
            mine = None
        if device.public_key == mine:
            out.append(name)
        else:
            kept.append(f"WireGuard interface {name}: its key is not dom0's ({key_file})")
    return out


def _daemon(name: str, record: Path, kept: list[str]) -> ProcessRecord | None:
    """The daemon a record names, if it still runs here."""
    rec = processes.read_record(record)
    if rec is None or not processes.is_running(rec):
        return None
    if not _here(rec):
        kept.append(f"{name} pid {rec.pid}: runs in another network namespace")
        return None
    return rec


def observe(policy: Policy, state: Path) -> Holdings:
    from controller.drivers import dns
    from controller.drivers.addresses import Addresses
    from controller.drivers.dhcp import record_path, reservation_files
    from controller.drivers.nft import Nft
    from controller.drivers.tunnels import owned_routing

    kept: list[str] = []
    dnsmasq = _daemon("dnsmasq", record_path(state), kept)
    unbound = _daemon("unbound", dns.record_path(state), kept)
    wg_go = _wireguard_go(state, kept)
    kernel_wg = _kernel_wireguard(policy, state, kept)
    addresses = Addresses()
    try:
        owned = addresses.owned(name for _, name in socket.if_nameindex())
        routes, rules = owned_routing(addresses.ipr)
    finally:
        addresses.close()
    tables = {(o["table"]["family"], o["table"]["name"]) for o in Nft().ruleset() if "table" in o}
    return Holdings(
        dnsmasq=dnsmasq,
        unbound=unbound,
        wireguard_go=tuple(wg_go),
        kernel_wireguard=tuple(kernel_wg),
        rules=tuple(rules),
        routes=tuple(routes),
        addresses=owned,
        reservations=tuple(reservation_files(state)),
        tables=frozenset(tables & set(TABLE_ORDER)),
        kept=tuple(kept),
    )


# ---- removing ------------------------------------------------------------------------------


def _executor(state: Path) -> Callable[[Step], None]:
    """One function that carries out a step (each its driver's operation)."""
    from common.wireguard.userspace import UserspaceWireGuard
    from controller.drivers import dns
    from controller.drivers.addresses import Addresses
    from controller.drivers.dhcp import record_path
    from controller.drivers.nft import Nft
    from controller.drivers.tunnels import delete_route, delete_rule

    addresses = Addresses()
    nft = Nft()

    def run(step: Step) -> None:
        if step.kind in ("dnsmasq", "unbound"):
            processes.stop([step.target], 5.0, kill_wait=5.0)
            if processes.is_running(step.target):
                raise RuntimeError(f"pid {step.target.pid} still runs")
            record = record_path(state) if step.kind == "dnsmasq" else dns.record_path(state)
            record.unlink(missing_ok=True)
        elif step.kind == "wireguard-go":
            UserspaceWireGuard(state / "wireguard").remove(step.target)
        elif step.kind == "wireguard":
            from common.wireguard import kernel

            kernel.KernelWireGuard().remove(step.target)
        elif step.kind == "rule":
            delete_rule(addresses.ipr, step.target)
        elif step.kind == "route":
            delete_route(addresses.ipr, step.target)
        elif step.kind == "address":
            addresses.apply((), [step.target])
        elif step.kind == "reservations":
            for p in step.target:
                p.unlink(missing_ok=True)
        elif step.kind == "table":
            nft.delete_table(*step.target)
        else:  # pragma: no cover - steps() makes only the kinds above
            raise ValueError(step.kind)

    return run


def _confirm(plan: list[Step], kept: list[str]) -> bool:
    print("dom0 flush will remove:")
    for s in plan:
        print(f"  {s.what}")
    for k in kept:
        print(f"  (kept: {k})")
    try:
        answer = input("type yes to remove all of this: ")
    except EOFError:
        return False
    return answer.strip() == "yes"


def flush_command(
    policy_file: str, state_dir: str, *, yes: bool = False, as_json: bool = False
) -> int:
    policy = load_or_report(policy_file, PROG)
    if policy is None:
        return 2
    if not yes and (as_json or not sys.stdin.isatty()):
        why = "--json" if as_json else "not on a terminal"
        print(f"{PROG}: {why}: pass --yes to remove without asking", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            f"{PROG}: needs root (it removes tables, addresses, routes, daemons)", file=sys.stderr
        )
        return 1
    state = Path(state_dir)
    if controller_answers(state) or held_by_a_controller(state):
        print(
            f"{PROG}: a controller is running with state {state_dir} "
            f"({state / SOCKET_NAME} answers, or it holds controller.lock): stop it first "
            "(SIGTERM keeps the data plane)",
            file=sys.stderr,
        )
        return 1
    try:
        held = observe(policy, state)
    except Exception as e:  # permissions, libnftables: one line, nothing removed
        print(f"{PROG}: cannot read what dom0 holds here: {e}", file=sys.stderr)
        return 1
    plan = steps(held)
    kept = [
        f"state directory {state_dir} (allocations, keys, leases, logs): dom0 run starts from it",
        "forwarding sysctls (net.ipv4.ip_forward, ...): left as they are",
        *held.kept,
    ]
    if plan and not yes and not _confirm(plan, kept):
        print(f"{PROG}: nothing removed", file=sys.stderr)
        return 1
    removed, failed = [], []
    run = _executor(state) if plan else None
    for step in plan:
        assert run is not None
        try:
            run(step)
        except Exception as e:  # one failed step must not stop the others
            failed.append(
                {**step.to_json(), "error": str(e).splitlines()[0] if str(e) else repr(e)}
            )
            continue
        removed.append(step.to_json())
    notes = []
    if any(r["kind"] == "table" and r["what"].endswith("inet dom0_wan") for r in removed):
        notes.append(
            "the kill switch is gone: the WAN is no longer limited to the tunnel "
            f"(dom0 killswitch --policy {policy_file} loads it alone)"
        )
    if as_json:
        print(
            json.dumps(
                {"removed": removed, "failed": failed, "kept": kept, "notes": notes}, indent=2
            )
        )
    else:
        for r in removed:
            print(f"removed: {r['what']}")
        for f in failed:
            print(f"FAILED: {f['what']}: {f['error']}")
        for k in kept:
            print(f"kept: {k}")
        for n in notes:
            print(f"note: {n}")
        if not plan:
            print(f"{PROG}: nothing of dom0's in this network namespace")
    if failed:
        print(f"{PROG}: {len(failed)} step(s) failed; run it again once fixed", file=sys.stderr)
        return 1
    return 0
