"""The desired state: what the kernel, dnsmasq and the bridge should hold.

Split in two so that cost follows change: `policy_state` depends only on the
policy and on the bridge's foreign ports (rebuilt on a reload), and
`machine_state` depends on one machine's allocation (one admission touches
one machine's elements). Elements are plain tuples of strings; the nftables
driver knows each set's type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from controller.core.allocation import Allocation
from controller.policy.model import QUARANTINE, SERVICES, Policy

# (table family, set name). The tables are dom0's own: `bridge dom0` polices
# frames between bridge ports (stateless, MAC/IP bindings); `inet dom0`
# polices what is routed or delivered to dom0 (stateful, per domain).
PORT_MAC = ("bridge", "port_mac")  # ifname . ether_addr
BINDING = ("bridge", "binding")  # ifname . ether_addr . ipv4_addr
EXEMPT = ("bridge", "exempt_ports")  # ifname
PEERS = ("bridge", "peers")  # ipv4_addr . ipv4_addr (interval): direct L2 allowed
REACH = ("inet", "reach")  # ipv4_addr . ipv4_addr (interval): may open connections
EGRESS = ("inet", "egress")  # ipv4_addr (interval): may reach the internet
SERVICE = ("inet", "services")  # ipv4_addr . inet_proto . inet_service (interval)
ICMP = ("inet", "icmp")  # ipv4_addr (interval): may ping dom0

MACHINE_SETS = (PORT_MAC, BINDING)
POLICY_SETS = (EXEMPT, PEERS, REACH, EGRESS, SERVICE, ICMP)
ALL_SETS = MACHINE_SETS + POLICY_SETS

Element = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Shape:
    """What the chains themselves depend on; a change means a full rebuild."""

    bridge: str
    wan: str | None


@dataclass(frozen=True, slots=True)
class DhcpRange:
    tag: str  # the domain
    network: IPv4Network
    router: str | None
    domain_name: str  # e.g. x.internal


@dataclass(frozen=True, slots=True)
class DhcpConfig:
    bridge: str
    lease_seconds: int
    ranges: tuple[DhcpRange, ...]


@dataclass(frozen=True, slots=True)
class DhcpHost:
    mac: str
    address: str
    hostname: str
    tag: str

    def line(self) -> str:
        return f"{self.mac},set:{self.tag},{self.address},{self.hostname}\n"


@dataclass(frozen=True, slots=True)
class PolicyState:
    shape: Shape
    sets: Mapping[tuple[str, str], frozenset[Element]]
    addresses: frozenset[str]  # "10.10.0.1/24": dom0's gateways on the bridge
    dhcp: DhcpConfig


@dataclass(frozen=True, slots=True)
class MachineState:
    elements: Mapping[tuple[str, str], frozenset[Element]]
    dhcp: DhcpHost | None


@dataclass(frozen=True, slots=True)
class Desired:
    policy: PolicyState
    machines: Mapping[str, MachineState] = field(default_factory=dict)


def label_of(policy: Policy, a: Allocation) -> str:
    if a.rule == QUARANTINE:
        return policy.quarantine.template.render(a.slot)
    rule = next((r for r in policy.rules if r.name == a.rule), None)
    return rule.template.render(a.slot) if rule else f"{a.rule}{a.slot}"


def fqdn_of(policy: Policy, a: Allocation) -> str:
    return policy.fqdn(label_of(policy, a), a.domain)


def machine_state(policy: Policy, a: Allocation) -> MachineState:
    elements: dict[tuple[str, str], frozenset[Element]] = {
        PORT_MAC: frozenset({(a.port, a.mac)}),
        BINDING: frozenset(),
    }
    dhcp = None
    if a.address is not None:
        elements[BINDING] = frozenset({(a.port, a.mac, a.address)})
        dhcp = DhcpHost(a.mac, a.address, label_of(policy, a), a.domain)
    return MachineState(elements, dhcp)


def policy_state(policy: Policy, foreign_ports: Iterable[str]) -> PolicyState:
    domains = policy.domains
    peers: set[Element] = set()
    reach: set[Element] = set()
    egress: set[Element] = set()
    services: set[Element] = set()
    icmp: set[Element] = set()
    addresses: set[str] = set()
    ranges: list[DhcpRange] = []
    for d in domains.values():
        pool = str(d.pool)
        addresses.add(f"{d.gateway}/{d.pool.prefixlen}")
        ranges.append(DhcpRange(d.name, d.pool, str(d.gateway), f"{d.name}.{policy.tld}"))
        if d.members_reach:
            peers.add((pool, pool))
            reach.add((pool, pool))
        for other in d.reach:
            reach.add((pool, str(domains[other].pool)))
        if d.internet:
            egress.add((pool,))
        for name in d.services:
            for proto, port in SERVICES[name]:
                if proto == "icmp":
                    icmp.add((pool,))
                else:
                    services.add((pool, proto, str(port)))
    q = policy.quarantine
    if q.pool is not None and q.gateway is not None:
        addresses.add(f"{q.gateway}/{q.pool.prefixlen}")
        # No router option: a quarantined machine has nowhere to go.
        ranges.append(DhcpRange(QUARANTINE, q.pool, None, f"{QUARANTINE}.{policy.tld}"))
    exempt = {(p,) for p in foreign_ports} | {(p,) for p in policy.trusted_ports}
    return PolicyState(
        shape=Shape(policy.bridge, policy.wan),
        sets={
            EXEMPT: frozenset(exempt),
            PEERS: frozenset(peers),
            REACH: frozenset(reach),
            EGRESS: frozenset(egress),
            SERVICE: frozenset(services),
            ICMP: frozenset(icmp),
        },
        addresses=frozenset(addresses),
        dhcp=DhcpConfig(policy.bridge, policy.lease_seconds, tuple(ranges)),
    )
