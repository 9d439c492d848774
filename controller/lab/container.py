"""`dom0 lab container add | list | del`: a container in a lab VM, made as a container
runtime makes one: a network namespace of its own whose eth0's peer is plugged into the
VM agent's bridge (agents/containers.py), with the container's name as the peer's alias.
The agent does the rest (address, default route, names); `add` waits until it has and
says what the container got.

A container's namespace is the lab's: NAME-vmI.CONTAINER, recorded in lab.json before
it is made, so `lab down` deletes it. (A '.' is in no lab name, so the scheme never
takes another lab's namespaces.) Nothing here touches the root namespace: every `ip`
command runs in the VM's or the container's namespace.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from typing import TYPE_CHECKING, Any

from controller.lab import netns, processes
from controller.lab.rundir import Lab, LabError
from controller.lab.wait import wait_for

if TYPE_CHECKING:
    from common.agentconfig import MachineConfig

# (agents.* and lab.agent are imported where they are used: `lab down` imports this
# module for its naming scheme, and needs none of the agent's pyroute2 and trio)

PEER = "eth0"  # the container's end
TIMEOUT = 10.0  # seconds for the agent's bridge, then for the container's address

_SUFFIX = re.compile(r"vm[1-9][0-9]*\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Refused(LabError):
    """Bad input, or a VM that cannot have containers: one line (exit 2)."""


def namespace(lab: Lab, vm: int, name: str) -> str:
    return f"{lab.vm_ns(vm)}.{name}"


def owns_namespace(lab_name: str, ns: str) -> bool:
    """True if ns is a container namespace of lab `lab_name` (by naming scheme)."""
    prefix = f"{lab_name}-"
    return ns.startswith(prefix) and _SUFFIX.fullmatch(ns[len(prefix) :]) is not None


def host_interface(name: str) -> str:
    """The VM's end, at most 15 characters (the kernel's limit): c-NAME, or for a long
    name c-, its first six characters and six of its hash."""
    if len(name) <= 13:
        return f"c-{name}"
    return f"c-{name[:6]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def check_name(name: str) -> str | None:
    from agents.containers import valid_name

    if valid_name(name):
        return None
    return (
        f"{name[:80]!r} is not a container name: one DNS label, 1-63 characters of a-z, "
        "0-9 and '-', not starting or ending with '-'"
    )


def add(lab: Lab, vm: int, name: str, *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Make container `name` in VM `vm` and wait for its address; what it got."""
    from agents.containers import BRIDGE
    from controller.lab import agent

    if problem := check_name(name):
        raise Refused(problem)
    vm_ns = _vm_namespace(lab, vm)
    config = _delegating(lab, vm)
    assert config.containers is not None  # (_delegating refuses a VM without)
    ns, iface = namespace(lab, vm, name), host_interface(name)
    if _key(vm, name) in _recorded(lab) or netns.exists(ns):
        raise Refused(f"vm{vm} has a container {name} already (namespace {ns})")
    wait_for(lambda: _has_link(vm_ns, BRIDGE), timeout, f"vm{vm}'s agent bridge {BRIDGE}")
    with lab.update() as data:
        if ns not in data["namespaces"]:
            data["namespaces"].append(ns)
        data.setdefault("containers", {})[_key(vm, name)] = {
            "vm": vm,
            "name": name,
            "namespace": ns,
            "interface": iface,
        }
    try:
        netns.create([ns])
        netns.ip_batch(["link set lo up"], ns)
        netns.ip_batch(
            [
                f"link add {iface} type veth peer name {PEER} netns {ns}",
                # the alias before it joins the bridge: the agent names it by the alias
                f"link set {iface} alias {name}",
                f"link set {iface} master {BRIDGE}",
                f"link set {iface} up",
            ],
            vm_ns,
        )
        address = wait_for(
            lambda: _address(ns, config.containers or ""),
            timeout,
            f"the address vm{vm}'s agent gives {name} (its log: {agent.log_path(lab, vm)})",
        )
    except BaseException:
        _delete(lab, vm, name)  # nothing half made is left
        raise
    return {
        "name": name,
        "vm": f"vm{vm}",
        "namespace": ns,
        "interface": iface,
        "address": address,
        "fqdn": f"{name}.{config.name}",
    }


def listed(lab: Lab) -> list[dict[str, Any]]:
    """The lab's containers, with the address each has now (None: none yet)."""
    out = []
    for entry in sorted(_recorded(lab).values(), key=lambda e: (e["vm"], e["name"])):
        ns = entry["namespace"]
        address = _address(ns, "0.0.0.0/0") if netns.exists(ns) else None
        out.append({**entry, "vm": f"vm{entry['vm']}", "address": address})
    return out


def remove(lab: Lab, vm: int, name: str) -> None:
    """Delete container `name` of VM `vm` (its namespace, and so its veth pair)."""
    if _key(vm, name) not in _recorded(lab):
        raise Refused(f"vm{vm} has no container {name} (dom0 lab container list)")
    _delete(lab, vm, name)


def _delete(lab: Lab, vm: int, name: str) -> None:
    from controller.lab import teardown  # (it imports this module)

    ns = namespace(lab, vm, name)
    teardown.sweep([ns])
    netns.delete([ns])
    with lab.update() as data:
        data.get("containers", {}).pop(_key(vm, name), None)
        if ns in data["namespaces"]:
            data["namespaces"].remove(ns)


def _key(vm: int, name: str) -> str:
    return f"vm{vm}.{name}"


def _recorded(lab: Lab) -> dict[str, dict[str, Any]]:
    containers = lab.read().get("containers")
    return containers if isinstance(containers, dict) else {}


def _vm_namespace(lab: Lab, vm: int) -> str:
    if not lab.record_path.exists():
        raise Refused(f"no lab {lab.name} is up (dom0 lab up --name {lab.name})")
    try:
        return str(lab.vm(vm)["namespace"])
    except LabError as e:
        raise Refused(str(e)) from None


def _delegating(lab: Lab, vm: int) -> MachineConfig:
    """The configuration VM `vm`'s agent runs, if it delegates a prefix; else Refused."""
    from agents.files import FileError, Root
    from controller.lab import agent

    proc = lab.process(agent.role(vm))
    if proc is None or not processes.is_running(proc):
        raise Refused(f"vm{vm} runs no agent: its containers are its agent's (lab up with agents)")
    try:
        known = Root(agent.root(lab, vm)).known()
    except FileError as e:
        raise LabError(f"vm{vm}'s agent: {e}") from None
    if known is None:
        raise Refused(f"vm{vm}'s agent runs no configuration yet")
    if known.config.containers is None:
        raise Refused(
            f"vm{vm}'s agent has no prefix for containers: its configuration {known.version} "
            f"({known.config.name}) delegates none"
        )
    return known.config


def _has_link(ns: str, name: str) -> bool:
    return netns.run(None, ["ip", "-n", ns, "link", "show", name], check=False).returncode == 0


def _address(ns: str, prefix: str) -> str | None:
    """The container's IPv4 address (CIDR) in `prefix`, or None."""
    out = netns.run(None, ["ip", "-n", ns, "-j", "-4", "address", "show", "dev", PEER],
                    check=False)  # fmt: skip
    if out.returncode != 0:
        return None
    net = ipaddress.IPv4Network(prefix)
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", []):
            cidr = f"{a['local']}/{a['prefixlen']}"
            if ipaddress.IPv4Interface(cidr).ip in net:
                return cidr
    return None
