"""`lab up`: build a lab, in the order topology -> controller -> VM DHCP clients.

Every step is recorded before it happens (see rundir.py), and by default a
failure tears down what was built, so an error leaves nothing behind.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import controller
from controller.lab import (
    controllerproc,
    dhcpclient,
    netns,
    processes,
    resolver,
    services,
    teardown,
    topology,
    uplink,
)
from controller.lab.rundir import RUN_ROOT, Lab, LabError, check_name
from controller.policy.load import PolicyError, load_policy
from controller.policy.model import Policy

DEFAULT_POLICY = Path(controller.__file__).resolve().parent.parent / "policies" / "lab.toml"
DEFAULT_VMS = 4

Progress = Callable[[str], None]


class LabExists(LabError):
    """A lab of that name (run directory or namespaces) is already there."""


def _quiet(_: str) -> None:
    pass


def check_vms(vms: int) -> str | None:
    if not 1 <= vms <= topology.MAX_VMS:
        return f"must be from 1 to {topology.MAX_VMS}, got {vms}"
    return None


def check_policy(policy: Policy) -> list[str]:
    """What makes a valid policy unusable in the lab, whose interfaces are fixed."""
    problems = []
    if policy.bridge != topology.BRIDGE:
        problems.append(
            f"{policy.source}: bridge.name: {policy.bridge!r} is not the lab's bridge, "
            f"expected {topology.BRIDGE!r}"
        )
    if policy.wan is not None and policy.wan != topology.DOM0_WAN_IF:
        problems.append(
            f"{policy.source}: wan.interface: {policy.wan!r} is not the lab's WAN, "
            f"expected {topology.DOM0_WAN_IF!r}"
        )
    return problems


def read_policy(path: str | Path) -> Policy:
    """The policy, or LabError with its first problem (and how many more)."""
    try:
        return load_policy(path)
    except PolicyError as exc:
        first, more = exc.problems[0], len(exc.problems) - 1
        raise LabError(f"{first}" + (f" (and {more} more problems)" if more else "")) from exc


def create(
    name: str,
    vms: int = DEFAULT_VMS,
    *,
    policy: str | Path | None = None,
    controller: bool = True,
    dhcp: bool = True,
    wait_leases: bool = True,
    lease_timeout: float = 30.0,
    replace: bool = False,
    teardown_on_error: bool = True,
    run_root: Path = RUN_ROOT,
    progress: Progress = _quiet,
    with_uplink: bool = True,
    live_policy: bool = False,
    fit: bool = False,
    macs: Mapping[int, str] | None = None,
    port_prefix: str = topology.PORT_PREFIX,
    warn: Progress = _quiet,
    agents: bool = False,
) -> Lab:
    """Build lab name with VMs 1..vms and return its handle.

    controller=False builds the topology and services only (the VMs' DHCP
    clients then start only with dhcp=True and keep asking). policy defaults to
    policies/lab.toml; it is copied to RUNDIR/policy.toml, with the lab's
    [uplink] appended unless with_uplink is False or it has its own. With
    live_policy the controller runs on the file itself (its absolute path), so
    the operator's edits reach it; the lab then appends nothing and has no VPN
    uplink unless the file has one. VMs of hub domains then join the hub with
    their `dom0 wg export` configuration.

    With agents, dom0 gets a CA (`dom0 ca init`) before its controller starts,
    and every VM whose domain offers the `enroll` service runs the real agent
    (controller/lab/agent.py), enrolled with a token for its machine, instead
    of its DHCP client and `dom0 wg export`.

    VM I has MAC 52:54:00:d0:00:II and port vnetI (port_prefix + I), macs
    overrides some; fit=True gives the others MACs that the policy's rules take
    in turn (topology.fit_vms) and calls warn once for each VM it will quarantine.
    """
    problem = check_name(name) or (f"--vms: {p}" if (p := check_vms(vms)) else None)
    problem = problem or topology.check_port_prefix(port_prefix)
    if problem:
        raise LabError(problem)
    if live_policy and policy is None:
        raise LabError("live_policy needs the operator's policy file")
    source = Path(policy or DEFAULT_POLICY).absolute()
    fitted = read_policy(source) if fit else None
    specs, warnings = topology.fit_vms(fitted, vms, macs, port_prefix)
    # A VM that no rule takes gets a lease only if the quarantine has a pool.
    leased = [
        v.index
        for v in specs
        if fitted is None or v.rule is not None or fitted.quarantine.pool is not None
    ]
    lab = Lab.named(name, run_root)
    if teardown.exists(name, run_root):
        if not replace:
            raise LabExists(f"lab {name} already exists (dom0 lab down --name {name})")
        progress(f"replacing lab {name}")
        teardown.down(lab, run_root=run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    try:
        lab.root.mkdir()  # atomic claim: a concurrent `lab up` of the same name loses here
    except FileExistsError:
        raise LabExists(f"lab {name} already exists (dom0 lab down --name {name})") from None
    for line in warnings:
        warn(line)
    try:
        _build(
            lab,
            specs,
            leased,
            port_prefix,
            source if (policy is not None or controller) else None,
            live_policy,
            controller,
            dhcp,
            wait_leases,
            lease_timeout,
            progress,
            with_uplink,
            agents,
        )
    except BaseException:
        if teardown_on_error:
            with teardown.shielded():
                teardown.down(lab, run_root=run_root)
        raise
    return lab


def _build(
    lab: Lab,
    specs: list[topology.VmSpec],
    leased: list[int],
    port_prefix: str,
    policy: Path | None,
    live_policy: bool,
    with_controller: bool,
    dhcp: bool,
    wait_leases: bool,
    lease_timeout: float,
    progress: Progress,
    with_uplink: bool = True,
    agents: bool = False,
) -> None:
    started = time.monotonic()
    for d in (lab.logs_dir, lab.state_dir, lab.leases_dir):
        d.mkdir(parents=True, exist_ok=True)
    indexes = [v.index for v in specs]
    namespaces = topology.core_namespaces(lab) + [lab.vm_ns(i) for i in indexes]
    with lab.update() as data:
        data["created"] = time.time()
        data["paths"] = {
            "run": str(lab.root),
            "state": str(lab.state_dir),
            "logs": str(lab.logs_dir),
            "leases": str(lab.leases_dir),
        }
        data["namespaces"] = namespaces
        data["vms"] = {str(v.index): _vm_entry(lab, v) for v in specs}
        data["port_prefix"] = port_prefix
    dhcpclient.write_script(lab)
    has_uplink = False
    with_resolver = False
    if policy is not None and live_policy:
        with lab.update() as data:
            data["policy"] = {"source": str(policy), "path": str(policy), "live": True}
        # The lab's VPN server has keys of its own that no operator's [uplink] names.
        with_uplink = False
        if "uplink" in tomllib.loads(policy.read_text()):
            progress(f"{policy} has its own [uplink]: the lab starts no VPN server for it")
        else:
            progress(
                f"{policy} has no [uplink]: the lab runs without its VPN, egress leaves "
                f"dom0's WAN (the echo sees {topology.DOM0_WAN})"
            )
    elif policy is not None:
        path = controllerproc.install_policy(lab, policy)
        text = path.read_text()
        has_uplink = "uplink" in tomllib.loads(text)
        if with_uplink and not has_uplink:
            ipv6 = any(
                isinstance(d, dict) and (d.get("ipv6") or "pool6" in d)
                for d in tomllib.loads(text).get("domains", {}).values()
            )
            appended = uplink.prepare(lab, ipv6=ipv6)
            # dom0's upstream resolver beyond the VPN, unless the policy names its own.
            with_resolver = "dns" not in tomllib.loads(text)
            if with_resolver:
                appended += resolver.prepare(lab)
            controllerproc.write_policy(lab, text + appended)
            has_uplink = True

    netns.create(namespaces)
    topology.wire_core(lab)
    if has_uplink and with_uplink:
        uplink.start_server(lab)
    if with_resolver:
        resolver.start(lab)
    topology.wire_vms(lab, specs)
    services.start_echos(
        lab, [services.wan_echo(lab), *(services.vm_echo(lab, i) for i in indexes)]
    )
    progress(
        f"topology {lab.name}: {len(namespaces)} namespaces, {len(specs)} VMs "
        f"({time.monotonic() - started:.1f} s)"
    )
    if with_controller and agents:
        made = processes.run_dom0("ca", "init", "--state", str(lab.state_dir), timeout=120)
        if made.returncode != 0:
            raise LabError(f"dom0 ca init: {made.stderr.strip()}")
        progress("dom0's CA made (dom0 ca init)")
    if with_controller:
        proc = controllerproc.start(lab)
        progress(f"controller ready (pid {proc.pid}, log {lab.controller_log})")
    if dhcp:
        dhcpclient.start_many(lab, indexes)
    if with_controller and dhcp and wait_leases and leased:

        def report(have: int, want: int, missing: list[int]) -> None:
            first = ", ".join(f"vm{i}" for i in missing[:5])
            more = "" if len(missing) <= 5 else f" and {len(missing) - 5} more"
            progress(f"leases {have}/{want}, waiting for {first}{more}")

        dhcpclient.wait_leases(
            lab,
            leased,
            lease_timeout,
            progress=report,
            check=lambda: controllerproc.check_running(lab),
        )
        which = "all" if len(leased) == len(indexes) else f"{len(leased)} of"
        progress(f"{which} {len(indexes)} VMs have leases ({time.monotonic() - started:.1f} s)")
        enrolled = enroll_agents(lab, leased, progress) if agents else []
        joined = join_hub(lab, [i for i in leased if i not in enrolled])
        if enrolled:
            progress(
                f"{len(enrolled)} agents enrolled and run their configuration "
                f"({time.monotonic() - started:.1f} s)"
            )
        if joined:
            progress(f"{len(joined)} VMs joined the hub ({time.monotonic() - started:.1f} s)")


def enroll_agents(lab: Lab, indexes: Iterable[int], progress: Progress = _quiet,
                  timeout: float = 60.0) -> list[int]:  # fmt: skip
    """The VMs whose domain offers `enroll` run the agent: enrolled, each
    runs its first configuration, then their DHCP clients stop."""
    from controller.lab import agent

    machines = {m["mac"]: m for m in controllerproc.status(lab)}
    started = []
    for i in indexes:
        m = machines.get(lab.vm(i)["mac"])
        if m is not None and m.get("state") == "admitted" and m.get("agent_server"):
            agent.enroll(lab, i)
            started.append(i)
    for n, i in enumerate(started):
        agent.wait_applied(lab, i, timeout)
        agent.take_over(lab, i)
        if (n + 1) % 10 == 0 and n + 1 < len(started):
            progress(f"agents {n + 1}/{len(started)} run their configuration")
    return started


def join_hub(lab: Lab, indexes: Iterable[int]) -> list[int]:
    """VMs of hub domains apply their exported tunnel configuration."""
    hub = uplink.hub_machines(controllerproc.status(lab))
    joined = []
    for i in indexes:
        mac = lab.vm(i)["mac"]
        if mac in hub:
            uplink.join_hub(lab, i, mac)
            joined.append(i)
    return joined


def _vm_entry(lab: Lab, spec: topology.VmSpec) -> dict[str, str | None]:
    return {
        "namespace": lab.vm_ns(spec.index),
        "mac": spec.mac,
        "port": spec.port,
        "rule": spec.rule,
        "domain": spec.domain,
    }


def add_vm(
    lab: Lab,
    mac: str | None = None,
    *,
    index: int | None = None,
    echo: bool = True,
    dhcp: bool = True,
) -> int:
    """Add a VM after the fact (any MAC, e.g. an unmatched one); returns its index.

    The new port joins virbr0 like a freshly started libvirt guest's tap.
    """
    existing = lab.vms()
    if index is None:
        index = max(existing, default=0) + 1
    if index in existing:
        raise LabError(f"lab {lab.name} already has vm{index}")
    if index < 1:
        raise LabError(f"VM index must be >= 1, got {index}")
    prefix = str(lab.read().get("port_prefix") or topology.PORT_PREFIX)
    spec = topology.VmSpec(
        index, (mac or topology.vm_mac(index)).lower(), topology.port_name(index, prefix)
    )
    ns = lab.vm_ns(index)
    with lab.update() as data:
        if ns not in data["namespaces"]:
            data["namespaces"].append(ns)
        data["vms"][str(index)] = _vm_entry(lab, spec)
    netns.create([ns])
    topology.wire_vms(lab, [spec])
    if echo:
        services.start_echos(lab, [services.vm_echo(lab, index)])
    if dhcp:
        dhcpclient.start(lab, index)
    return index


def remove_vm(lab: Lab, index: int) -> None:
    """Remove a VM: its processes, namespace (and so its link to virbr0), its lease."""
    lab.vm(index)
    ns = lab.vm_ns(index)
    suffix = f"@vm{index}"
    roles = [r for r in lab.read().get("processes", {}) if r.endswith(suffix)]
    for role in roles:
        proc = lab.process(role)
        if proc is not None:
            processes.stop([proc])
        lab.forget_process(role)
    teardown.sweep([ns])
    netns.delete([ns])
    lab.lease_path(index).unlink(missing_ok=True)
    with lab.update() as data:
        data["vms"].pop(str(index), None)
        if ns in data["namespaces"]:
            data["namespaces"].remove(ns)


def vm_indexes(lab: Lab) -> list[int]:
    return sorted(lab.vms())


def start_dhcp_all(lab: Lab, indexes: Iterable[int] | None = None) -> None:
    dhcpclient.start_many(lab, vm_indexes(lab) if indexes is None else indexes)
