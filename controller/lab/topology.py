"""The lab's wiring: which namespaces, links and addresses make a dom0 host.

    NAME-wan   inet0 bridge 198.51.100.1/24 (ports to-dom0, to-vpn), 203.0.113.10/32 on lo
    NAME-vpn   wan 198.51.100.3/24, default via 198.51.100.1
    NAME-dom0  wan 198.51.100.2/24, default via 198.51.100.1; virbr0 bridge (no address),
               ports vnet1..vnetN (libvirt's tap names; another prefix on request)
    NAME-vmI   eth0 (peer of vnetI), MAC 52:54:00:d0:00:II, or one fitted to the policy

The functions that produce `ip -batch` lines are pure, so the wiring can be
read and tested without a kernel; `wire_*` apply them. dom0 gets no sysctl or
nftables from the lab: forwarding and filtering are the controller's job.
`fit_vms` (pure too) gives the VMs MACs that fall under an operator's rules.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from controller.core.matching import match_rule
from controller.lab import netns
from controller.lab.rundir import Lab
from controller.policy.macs import FULL, Ternary, format_mac
from controller.policy.model import Policy, Rule

WAN_GATEWAY = "198.51.100.1"
DOM0_WAN = "198.51.100.2"
VPN_WAN = "198.51.100.3"
WAN_PREFIX = 24
ECHO_ADDRESS = "203.0.113.10"
ECHO_PORT = 80
# The lab internet's IPv6 (ULAs: nothing of it is anyone's outside the lab)
WAN_GATEWAY6 = "fd98::1"
VPN_WAN6 = "fd98::3"
INTERNET6 = "fd97::10"  # on NAME-wan's lo, beside the echo's address

WAN_BRIDGE = "inet0"
DOM0_WAN_IF = "wan"
VPN_WAN_IF = "wan"
WAN_PORT_DOM0 = "to-dom0"
WAN_PORT_VPN = "to-vpn"
BRIDGE = "virbr0"
VM_IF = "eth0"
# Fixed so that it never changes when ports come and go (a Linux bridge without
# an explicit address takes its lowest port MAC, which would invalidate the
# VMs' ARP entries for the gateway whenever a VM is added). fe: like libvirt's
# host-side taps; outside 52:54:00:d0:* so no lab rule matches it.
BRIDGE_MAC = "fe:54:00:d0:ff:fe"

MAX_VMS = 200
# Every lab namespace: IPv6 duplicate address detection would hold addresses
# tentative for ~1 s; nothing in a lab can collide.
NO_DAD = {
    "net.ipv6.conf.all.accept_dad": 0,
    "net.ipv6.conf.default.accept_dad": 0,
}


def vm_mac(index: int) -> str:
    """The lab MAC of VM index: 52:54:00:d0:00:II (index 1..255 in the last octet).

    Odd indexes match policy rule "odd" (domain x), even ones rule "even" (domain y).
    """
    if not 1 <= index <= 0xFF:
        raise ValueError(f"VM index {index} out of range 1..255 for a lab MAC")
    return f"52:54:00:d0:00:{index:02x}"


PORT_PREFIX = "vnet"
_PORT_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,11}$")  # + up to 3 digits: 15


def check_port_prefix(prefix: str) -> str | None:
    """None if PREFIX1..PREFIX200 are interface names, else what is expected."""
    if not _PORT_PREFIX_RE.match(prefix):
        return (
            f"{prefix!r} is not a port name prefix, expected 1-12 characters of "
            "a-z, A-Z, 0-9, '_', '-' starting with a letter, like vnet"
        )
    return None


def port_name(index: int, prefix: str = PORT_PREFIX) -> str:
    return f"{prefix}{index}"


def port_mac(vm_mac_: str) -> str:
    """Host side of a VM's link, libvirt style: the guest MAC with first octet fe
    (fa when the guest's own starts with fe, so the two ends never collide)."""
    first, rest = vm_mac_.split(":", 1)
    return ("fa:" if first.lower() == "fe" else "fe:") + rest


# ---- fitting the VMs to a policy ----------------------------------------------------------

# Candidates tried per rule before giving up: earlier rules may shadow most of
# a later rule's space, and a bounded search keeps `lab up` instant.
FIT_SEARCH = 4096
_MULTICAST = 1 << 40


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What one lab VM is: its MAC and port, and the rule that takes it (None:
    no rule matches, so the controller will quarantine it)."""

    index: int
    mac: str
    port: str
    rule: str | None = None
    domain: str | None = None


def pattern_macs(pattern: Ternary, limit: int = FIT_SEARCH) -> Iterable[str]:
    """Concrete unicast, non-zero MACs inside pattern, in a fixed order: the
    free bits count up from the lowest (1, 2, 3, ... then 0), so the first
    ones read like the pattern with a small number at the end."""
    if pattern.mask & _MULTICAST and pattern.value & _MULTICAST:
        return
    care = pattern.mask | _MULTICAST  # the multicast bit stays clear
    free = [bit for bit in range(48) if not (care >> bit) & 1]
    size = 1 << len(free)
    for n in [*range(1, min(size, limit)), 0]:
        value = pattern.value & ~_MULTICAST
        for i, bit in enumerate(free):
            if (n >> i) & 1:
                value |= 1 << bit
        if value & FULL:
            yield format_mac(value)


def _usable(rule: Rule) -> bool:
    """Rules a lab VM can fall under: not libvirt-only, on the lab's bridge."""
    m = rule.match
    return not m.needs_libvirt and (m.bridge is None or fnmatch.fnmatchcase(BRIDGE, m.bridge))


def fit_vms(
    policy: Policy | None,
    count: int,
    overrides: Mapping[int, str] | None = None,
    prefix: str = PORT_PREFIX,
) -> tuple[list[VmSpec], list[str]]:
    """VMs 1..count fitted to policy, and one warning per VM the policy will quarantine.

    VM I without an override takes the policy's usable rules in turn, from
    rule I modulo their number (one that is full, per its `max`, or whose
    interface glob misses the VM's port, is passed over): the lab's own MAC 52:54:00:d0:00:II if that rule is the
    first to match it, else the first free MAC of the rule's pattern that the
    rule is the first to match. Without a policy every VM keeps the lab MAC.
    """
    overrides = {i: m.lower() for i, m in (overrides or {}).items()}
    ports = {i: port_name(i, prefix) for i in range(1, count + 1)}
    if policy is None:
        return [VmSpec(i, overrides.get(i) or vm_mac(i), ports[i]) for i in ports], []
    taken = {BRIDGE_MAC} | set(overrides.values()) | {port_mac(m) for m in overrides.values()}
    left = {r.name: r.max_slots for r in policy.rules}
    warnings: list[str] = []

    def takes(mac: str, i: int) -> Rule | None:
        return match_rule(policy, mac, BRIDGE, ports[i])

    for i, given in overrides.items():
        if i in ports and (got := takes(given, i)) is not None:
            left[got.name] -= 1
    usable = [r for r in policy.rules if _usable(r)]
    specs: list[VmSpec] = []
    for i in ports:
        mac: str | None = overrides.get(i)
        rule: Rule | None = None
        if mac is not None:
            rule = takes(mac, i)
        else:
            for k in range(len(usable)):
                wanted = usable[(i - 1 + k) % len(usable)]
                if left[wanted.name] < 1:
                    continue
                found = _mac_for(wanted, i, takes, taken)
                if found is not None:
                    mac, rule = found, wanted
                    left[wanted.name] -= 1
                    break
            if mac is None:
                mac = vm_mac(i)
                rule = takes(mac, i)
                if rule is not None:
                    left[rule.name] -= 1
            taken |= {mac, port_mac(mac)}
        specs.append(VmSpec(i, mac, ports[i], rule.name if rule else None, _domain(rule)))
        if rule is None:
            warnings.append(
                f"vm{i}: MAC {mac} on port {ports[i]} matches no rule of {policy.source}: "
                "it will be quarantined"
            )
        elif left[rule.name] < 0:
            warnings.append(
                f"vm{i}: rule {rule.name} of {policy.source} is full (max {rule.max_slots}): "
                "it will be quarantined"
            )
        if ports[i] in policy.trusted_ports:
            warnings.append(
                f"vm{i}: port {ports[i]} is in bridge.trusted_ports of {policy.source}: "
                "the controller does not police it"
            )
    return specs, warnings


def _domain(rule: Rule | None) -> str | None:
    return rule.domain if rule else None


def _mac_for(
    rule: Rule, index: int, takes: Callable[[str, int], Rule | None], taken: set[str]
) -> str | None:
    """A free MAC that rule is the first to match for VM index, or None."""
    for mac in itertools.chain([vm_mac(index)], pattern_macs(rule.match.mac)):
        if mac in taken or port_mac(mac) in taken:
            continue
        got = takes(mac, index)
        if got is not None and got.name == rule.name:
            return mac
    return None


def core_namespaces(lab: Lab) -> list[str]:
    return [lab.wan_ns, lab.vpn_ns, lab.dom0_ns]


def core_links(lab: Lab) -> list[str]:
    """Root-namespace `ip -batch` lines: veths created directly in their namespaces."""
    return [
        f"link add {WAN_PORT_DOM0} netns {lab.wan_ns} type veth "
        f"peer name {DOM0_WAN_IF} netns {lab.dom0_ns}",
        f"link add {WAN_PORT_VPN} netns {lab.wan_ns} type veth "
        f"peer name {VPN_WAN_IF} netns {lab.vpn_ns}",
    ]


def vm_links(lab: Lab, index: int, mac: str, port: str | None = None) -> list[str]:
    return [
        f"link add {port or port_name(index)} netns {lab.dom0_ns} address {port_mac(mac)} type veth "
        f"peer name {VM_IF} netns {lab.vm_ns(index)} address {mac}",
    ]


def wan_config() -> list[str]:
    return [
        "link set lo up",
        f"link add {WAN_BRIDGE} type bridge stp_state 0 forward_delay 0",
        f"link set {WAN_PORT_DOM0} master {WAN_BRIDGE}",
        f"link set {WAN_PORT_VPN} master {WAN_BRIDGE}",
        f"addr add {WAN_GATEWAY}/{WAN_PREFIX} dev {WAN_BRIDGE}",
        f"addr add {ECHO_ADDRESS}/32 dev lo",
        f"addr add {WAN_GATEWAY6}/64 dev {WAN_BRIDGE}",
        f"addr add {INTERNET6}/128 dev lo",
        f"link set {WAN_PORT_DOM0} up",
        f"link set {WAN_PORT_VPN} up",
        f"link set {WAN_BRIDGE} up",
    ]


def vpn_config() -> list[str]:
    return [
        "link set lo up",
        f"addr add {VPN_WAN}/{WAN_PREFIX} dev {VPN_WAN_IF}",
        f"link set {VPN_WAN_IF} up",
        f"route add default via {WAN_GATEWAY} dev {VPN_WAN_IF}",
        f"addr add {VPN_WAN6}/64 dev {VPN_WAN_IF}",
        f"route add ::/0 via {WAN_GATEWAY6} dev {VPN_WAN_IF}",
    ]


def dom0_config() -> list[str]:
    return [
        "link set lo up",
        f"addr add {DOM0_WAN}/{WAN_PREFIX} dev {DOM0_WAN_IF}",
        f"link set {DOM0_WAN_IF} up",
        f"route add default via {WAN_GATEWAY} dev {DOM0_WAN_IF}",
        f"link add {BRIDGE} address {BRIDGE_MAC} type bridge stp_state 0 forward_delay 0",
        f"link set {BRIDGE} up",
    ]


def dom0_port_config(port: str) -> list[str]:
    return [f"link set {port} master {BRIDGE}", f"link set {port} up"]


def vm_config() -> list[str]:
    return ["link set lo up", f"link set {VM_IF} up"]


def vm_sysctls() -> dict[str, int]:
    return {**NO_DAD, f"net.ipv6.conf.{VM_IF}.accept_dad": 0}


def wire_core(lab: Lab) -> None:
    """Links and addresses of wan, vpn and dom0 (namespaces already exist)."""
    netns.ip_batch(core_links(lab))
    netns.sysctl(lab.wan_ns, {**NO_DAD, "net.ipv4.ip_forward": 1})
    netns.sysctl(lab.vpn_ns, NO_DAD)
    netns.ip_batch(wan_config(), lab.wan_ns)
    netns.ip_batch(vpn_config(), lab.vpn_ns)
    netns.ip_batch(dom0_config(), lab.dom0_ns)


def wire_vms(lab: Lab, vms: Iterable[VmSpec]) -> None:
    """Links of VMs to virbr0; their namespaces already exist."""
    vms = list(vms)
    netns.ip_batch(line for v in vms for line in vm_links(lab, v.index, v.mac, v.port))
    for v in vms:
        # Before eth0 goes up, so its link-local address is never tentative.
        netns.sysctl(lab.vm_ns(v.index), vm_sysctls())
        netns.ip_batch(vm_config(), lab.vm_ns(v.index))
    netns.ip_batch((line for v in vms for line in dom0_port_config(v.port)), lab.dom0_ns)
