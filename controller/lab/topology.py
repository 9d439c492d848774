"""The lab's wiring: which namespaces, links and addresses make a dom0 host.

    NAME-wan   inet0 bridge 198.51.100.1/24 (ports to-dom0, to-vpn), 203.0.113.10/32 on lo
    NAME-vpn   wan 198.51.100.3/24, default via 198.51.100.1
    NAME-dom0  wan 198.51.100.2/24, default via 198.51.100.1; virbr0 bridge (no address),
               ports vnet1..vnetN
    NAME-vmI   eth0 (peer of vnetI), MAC 52:54:00:d0:00:II

The functions that produce `ip -batch` lines are pure, so the wiring can be
read and tested without a kernel; `wire_*` apply them. dom0 gets no sysctl or
nftables from the lab: forwarding and filtering are the controller's job.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.lab import netns
from controller.lab.rundir import Lab

WAN_GATEWAY = "198.51.100.1"
DOM0_WAN = "198.51.100.2"
VPN_WAN = "198.51.100.3"
WAN_PREFIX = 24
ECHO_ADDRESS = "203.0.113.10"
ECHO_PORT = 80

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


def port_name(index: int) -> str:
    return f"vnet{index}"


def port_mac(vm_mac_: str) -> str:
    """Host side of a VM's link, libvirt style: the guest MAC with first octet fe."""
    return "fe:" + vm_mac_.split(":", 1)[1]


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


def vm_links(lab: Lab, index: int, mac: str) -> list[str]:
    return [
        f"link add {port_name(index)} netns {lab.dom0_ns} address {port_mac(mac)} type veth "
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


def dom0_port_config(index: int) -> list[str]:
    return [
        f"link set {port_name(index)} master {BRIDGE}",
        f"link set {port_name(index)} up",
    ]


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


def wire_vms(lab: Lab, vms: Iterable[tuple[int, str]]) -> None:
    """Links of VMs (index, mac) to virbr0; their namespaces already exist."""
    vms = list(vms)
    netns.ip_batch(line for index, mac in vms for line in vm_links(lab, index, mac))
    for index, _ in vms:
        # Before eth0 goes up, so its link-local address is never tentative.
        netns.sysctl(lab.vm_ns(index), vm_sysctls())
        netns.ip_batch(vm_config(), lab.vm_ns(index))
    netns.ip_batch((line for index, _ in vms for line in dom0_port_config(index)), lab.dom0_ns)
