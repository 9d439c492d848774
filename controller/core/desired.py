"""The desired state: what the kernel, dnsmasq and WireGuard should hold.

Split in two so that cost follows change: `policy_state` depends only on the
policy and on the bridge's foreign ports (rebuilt on a reload), and
`machine_state` depends on one machine's allocation (one admission touches
one machine's elements). Elements are plain tuples of strings; the nftables
driver knows each set's type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from ipaddress import IPv4Network, ip_interface

from controller.core.allocation import Allocation
from controller.policy.model import QUARANTINE, SERVICES, Limits, Policy, service_ports
from controller.policy.publish import tunnel_address

# (table family, set name). The tables are dom0's own: `bridge dom0` polices
# frames between bridge ports (stateless, MAC/IP bindings); `inet dom0`
# polices what is routed or delivered to dom0 (stateful, per domain).
# Per machine:
PORT_MAC = ("bridge", "port_mac")  # ifname . ether_addr: the machine on its port
MACS = ("bridge", "machine_macs")  # ether_addr: every admitted MAC, whatever its port
BINDING = ("bridge", "binding")  # ifname . ether_addr . ipv4_addr: its bridge address
# ifname . ether_addr . ipv4_addr (interval): the prefix delegated to its containers
BINDING_NET = ("bridge", "binding_net")
DHCP_CLIENT = ("bridge", "dhcp_client")  # ifname . ether_addr . chaddr: DHCP for itself only
DHCP_REPLY = ("bridge", "dhcp_reply")  # ifname . chaddr: where a DHCP reply may go
SELF4 = ("inet", "self4")  # ipv4_addr . ipv4_addr: (a, a) for each of its addresses
PORT_ADDR = ("bridge", "port_addr")  # ifname . ipv4_addr: the port that holds an address
BINDING6 = ("bridge", "binding6")  # ifname . ether_addr . ipv6_addr: its IPv6 address
ND_TARGET = ("bridge", "nd_target")  # ifname . 128 raw bits: what its NAs may advertise
ND_LLADDR = ("bridge", "nd_lladdr")  # ifname . 48 raw bits: the MAC its ND options may name
SELF6 = ("inet", "self6")  # ipv6_addr . ipv6_addr: (a, a)
# Per port (its machines share it: they are of one domain):
PORT_BCAST = ("bridge", "port_bcast")  # ifname . ipv4_addr: the port's domain broadcast
# Per policy:
EXEMPT = ("bridge", "exempt_ports")  # ifname
PEERS = ("bridge", "peers")  # ipv4_addr . ipv4_addr (interval): direct L2 allowed
DHCP_SERVER = ("bridge", "dhcp_server")  # ipv4_addr: where DHCP client messages may go
REACH = ("inet", "reach")  # ipv4_addr . ipv4_addr (interval): may open connections
EGRESS = ("inet", "egress")  # ipv4_addr (interval): may reach the internet
# pool . dom0's address in that pool (the domain's gateway) . protocol . port
SERVICE = ("inet", "services")
ICMP = ("inet", "ping")  # pool . gateway: may ping dom0 there
SSH4 = ("inet", "ssh4")  # ipv4_addr (interval): may reach dom0's sshd (host.ssh_from)
SSH6 = ("inet", "ssh6")  # ipv6_addr (interval)
REACH6 = ("inet", "reach6")  # ipv6_addr . ipv6_addr (interval): as reach, for the /64s
SERVICE6 = ("inet", "services6")  # /64 . dom0's address in it . protocol . port
ICMP6 = ("inet", "ping6")  # /64 . dom0's address in it
EGRESS6 = ("inet", "egress6")  # ipv6_addr (interval): /64s that may reach the internet
NAT_OUT6 = ("inet", "nat_out6")  # /64s masqueraded when they leave (through the uplink)
NAT_OUT = ("inet", "nat_out")  # ipv4_addr (interval): pools masqueraded when they leave
# Per machine, one set per group that allow lists name (all `ipv4_addr`, in
# `inet dom0`, named GROUP_PREFIX...): the machines of a rule that has an
# allow list (`grp_r_RULE`), the machines whose names an allow list's
# destination glob matches (`grp_mN`). A machine joins its groups: one
# element each, whatever the lists say.
GROUP_PREFIX = "grp_"
GROUP6_PREFIX = "grp6_"  # a group's IPv6 twin (`ipv6_addr`), in policies with IPv6


def twin6(group: str) -> str:
    return GROUP6_PREFIX + group.removeprefix(GROUP_PREFIX)


MACHINE_SETS = (
    PORT_MAC, MACS, BINDING, BINDING_NET, PORT_ADDR, PORT_BCAST, DHCP_CLIENT, DHCP_REPLY,
    SELF4, BINDING6, ND_TARGET, ND_LLADDR, SELF6,
)  # fmt: skip
# Elements the machines of one port share (the incremental path counts the
# port's other machines in: see core.plan.plan_machines).
PORT_SETS = (PORT_BCAST,)
POLICY_SETS = (
    EXEMPT, PEERS, DHCP_SERVER, REACH, EGRESS, SERVICE, ICMP, SSH4, SSH6, NAT_OUT,
    REACH6, SERVICE6, ICMP6, EGRESS6, NAT_OUT6,
)  # fmt: skip
ALL_SETS = MACHINE_SETS + POLICY_SETS

Element = tuple[str, ...]
Address = tuple[str, str]  # (interface, "a.b.c.d/len")
# dom0's route to a network: (network, next hop or "" for on the device, device)
Route = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One rule of `inet dom0`'s `allow` chain: an allow entry, for one of
    its protocols. Addresses are CIDRs or a group set (`@grp_...`)."""

    where: str  # the policy line it comes from (what `policy explain` names)
    src: str  # a domain's pool, or a rule's group
    dst: str | None  # a pool, a network outside, a group of machines; None: anywhere
    out: bool  # only out of the egress interface (the internet, a network outside)
    proto: str | None = None  # None: every protocol
    ports: tuple[tuple[int, int], ...] = ()  # () every port
    family: str = "ip"  # "ip6": a rule of the `allow6` chain (IPv6 /64s and groups)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Forward:
    """A published port: destination NAT from dom0's `listen` to a machine."""

    where: str  # the policy line
    via: str  # "uplink" (on the tunnel address `on`) or "wan" (whatever address it has)
    on: str | None
    proto: str
    listen: int
    address: str  # the machine's pinned address
    port: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Shape:
    """What the chains of `inet dom0` and `bridge dom0` depend on; a change
    means writing them whole."""

    bridge: str
    wan: str | None
    egress: str | None  # where masqueraded egress leaves: the uplink, else the WAN
    hub: str | None = None  # the hub's WireGuard interface
    hub_port: int | None = None
    underlay: str | None = None  # the hub's bridge pool: tunnel UDP and DHCP only
    hub_gateway: str | None = None  # dom0's address in the hub pool: the tunnels' endpoint
    ssh_port: int = 22  # dom0's own input (host.*), which it takes over from the boot baseline
    ping: bool = True
    dhcp_client: bool = True
    limits: Limits = field(default_factory=Limits)
    allow: tuple[AllowRule, ...] = ()  # the allow lists, in policy order
    allow6: tuple[AllowRule, ...] = ()  # the same for IPv6, where both ends have it
    groups: tuple[str, ...] = ()  # the group sets they name (GROUP_PREFIX...)
    forwards: tuple[Forward, ...] = ()  # published ports
    hairpin: tuple[str, ...] = ()  # pools that may reach the published ports from inside
    site: tuple[str, ...] = ()  # every domain's pool (hairpin connections are masqueraded)
    bridge_netfilter: bool = True  # bridged IPv4 crosses the inet tables too (br_netfilter)
    ipv6: bool = False  # some domain has IPv6: the bridge polices it instead of dropping it
    egress6: bool = False  # the uplink carries IPv6: domains may reach the internet over it
    mdns: tuple[str, ...] = ()  # pools that may query dom0's mDNS responder (agents' discovery)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class KillSwitch:
    """`inet dom0_wan`: on the WAN only the tunnel's UDP to its endpoint (plus
    what the policy allows) leaves; its own table, written before anything
    else and independent of every other change."""

    wan: str
    endpoint_host: str
    endpoint_port: int
    fwmark: int
    allow: tuple[str, ...]
    ssh_from: tuple[str, ...] = ()  # may come in over the WAN to dom0's sshd
    ssh_port: int = 22
    # ports published on the WAN: (protocol, dom0's port, machine address, its port)
    published: tuple[tuple[str, int, str, int], ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class UplinkState:
    interface: str
    private_key_file: str
    peer_public_key: str
    endpoint: str
    addresses: tuple[str, ...]
    table: int  # routing table, and the fwmark of the tunnel's own packets
    mtu: int
    persistent_keepalive: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class HubState:
    interface: str
    private_key_file: str
    listen_port: int
    mtu: int
    endpoint: str  # what machines dial: the hub's bridge gateway and port

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DhcpRange:
    tag: str  # the domain
    network: IPv4Network
    router: str | None
    domain_name: str | None  # e.g. x.internal; None: by host tag (the hub's range)
    dns: str | None = None  # the DNS server DHCP names: dom0's gateway where DNS is plain


@dataclass(frozen=True, slots=True)
class DhcpConfig:
    bridge: str
    lease_seconds: int
    ranges: tuple[DhcpRange, ...]
    # host tag -> domain name: hub machines share one range but not one domain
    tag_domains: tuple[tuple[str, str], ...] = ()
    log: str = "transactions"  # policy.DHCP_LOG
    # (tag, /64): DHCPv6 from reservations only, announced by router advertisements
    ranges6: tuple[tuple[str, str], ...] = ()
    default_route6: bool = False  # the RAs make dom0 the default router (IPv6 egress)


@dataclass(frozen=True, slots=True)
class DhcpHost:
    mac: str
    address: str
    hostname: str
    tag: str
    address6: str | None = None  # its DHCPv6 reservation (a file of its own: MAC.v6)

    def line(self) -> str:
        # id:*: dnsmasq keys the lease by hardware address only, never by a
        # client-id (which a guest may copy from another machine)
        return f"{self.mac},id:*,set:{self.tag},{self.address},{self.hostname}\n"

    def line6(self) -> str:
        # (dnsmasq finds a DHCPv6 client's MAC in the neighbour table, whatever its DUID)
        return f"{self.mac},set:{self.tag},[{self.address6}],{self.hostname}\n"


@dataclass(frozen=True, slots=True)
class HubPeer:
    public_key: str  # base64
    allowed_ips: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PolicyState:
    shape: Shape
    killswitch: KillSwitch | None
    sets: Mapping[tuple[str, str], frozenset[Element]]
    addresses: frozenset[Address]  # dom0's own, on the bridge, the hub and the uplink
    dhcp: DhcpConfig
    uplink: UplinkState | None = None
    hub: HubState | None = None
    routes: frozenset[Route] = frozenset()  # hub domains' containers pools, into the hub


@dataclass(frozen=True, slots=True)
class MachineState:
    elements: Mapping[tuple[str, str], frozenset[Element]]
    dhcp: DhcpHost | None
    peer: HubPeer | None = None
    routes: frozenset[Route] = frozenset()  # its containers' prefix, via its address

    def to_json(self) -> dict:
        return {
            "elements": {f"{k[0]}/{k[1]}": sorted(map(list, v)) for k, v in self.elements.items()},
            "dhcp": None if self.dhcp is None else asdict(self.dhcp),
            "peer": None if self.peer is None else asdict(self.peer),
            "routes": sorted(map(list, self.routes)),
        }

    @classmethod
    def from_json(cls, v: dict) -> MachineState:
        peer = v.get("peer")
        return cls(
            elements={
                tuple(k.split("/", 1)): frozenset(tuple(e) for e in elems)
                for k, elems in v["elements"].items()
            },
            dhcp=None if v["dhcp"] is None else DhcpHost(**v["dhcp"]),
            peer=None if peer is None else HubPeer(peer["public_key"], tuple(peer["allowed_ips"])),
            routes=frozenset((r[0], r[1], r[2]) for r in v.get("routes", ())),
        )


@dataclass(frozen=True, slots=True)
class Desired:
    policy: PolicyState
    machines: Mapping[str, MachineState] = field(default_factory=dict)


def port_of(m: MachineState) -> str:
    """The bridge port a machine's state binds it to."""
    for port, _mac in m.elements[PORT_MAC]:
        return port
    raise ValueError("a machine state without its port")


def label_of(policy: Policy, a: Allocation) -> str:
    if a.rule == QUARANTINE:
        return policy.quarantine.template.render(a.slot)
    rule = policy.rule(a.rule)
    return rule.template.render(a.slot) if rule else f"{a.rule}{a.slot}"


def fqdn_of(policy: Policy, a: Allocation) -> str:
    return policy.fqdn(label_of(policy, a), a.domain)


@dataclass(frozen=True, slots=True)
class Groups:
    """The group sets a policy's allow lists name."""

    rules: Mapping[str, str]  # rule name -> its machines' set
    names: tuple[tuple[str, str, str], ...]  # (set, domain, label glob) of named machines

    @property
    def sets(self) -> tuple[str, ...]:
        return (*self.rules.values(), *(s for s, _, _ in self.names))


# id(policy) -> (policy, its groups): asked at every admission, built once
_GROUPS: dict[int, tuple[Policy, Groups]] = {}


def groups_of(policy: Policy) -> Groups:
    cached = _GROUPS.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    rules = {r.name: f"{GROUP_PREFIX}r_{r.name}" for r in policy.rules if r.allow}
    named: dict[str, str] = {}
    for g in policy.grants:
        if g.kind == "machines" and g.to not in named:
            named[g.to] = f"{GROUP_PREFIX}m{len(named) + 1}"
    names = tuple((s, to.split(".", 1)[1], to.split(".", 1)[0]) for to, s in named.items())
    groups = Groups(rules, names)
    if len(_GROUPS) > 8:
        _GROUPS.clear()
    _GROUPS[id(policy)] = (policy, groups)
    return groups


def _group_elements(policy: Policy, a: Allocation) -> dict[tuple[str, str], frozenset[Element]]:
    """The machine's elements in the groups it belongs to (by rule, by name)."""
    if a.address is None or a.rule == QUARANTINE:
        return {}
    groups = groups_of(policy)
    out: dict[tuple[str, str], frozenset[Element]] = {}
    held = held_addresses(a)
    mine = frozenset((x,) for x in held)
    d = policy.domains.get(a.domain)
    sixes = (
        frozenset((x,) for h in held if (x := d.address6(h)) is not None)
        if d is not None and a.underlay is None
        else frozenset()
    )
    joined = []
    if (name := groups.rules.get(a.rule)) is not None:
        joined.append(name)
    if groups.names:
        label = label_of(policy, a)
        joined += [
            n for n, domain, glob in groups.names if domain == a.domain and fnmatchcase(label, glob)
        ]
    for name in joined:
        out[("inet", name)] = mine
        if sixes:
            out[("inet", twin6(name))] = sixes
    return out


def held_addresses(a: Allocation) -> tuple[str, ...]:
    """The machine's domain addresses now: its address, and through a
    remap's grace the previous one (core/remap.py)."""
    return tuple(x for x in (a.address, a.previous) if x is not None)


def allow_rules(policy: Policy) -> tuple[AllowRule, ...]:
    """The `allow` chain: one rule per allow entry and protocol, in policy order."""
    groups = groups_of(policy)
    named = {f"{glob}.{domain}": s for s, domain, glob in groups.names}
    out: list[AllowRule] = []
    for g in policy.grants:
        # a domain's containers are its members too: a grant holds for both nets
        srcs = (
            [f"@{groups.rules[g.rule]}"]
            if g.rule
            else [str(n) for n in policy.domains[g.domain].nets]
        )
        dsts: list[str | None]
        if g.kind == "domain":
            dsts, leaves = [str(n) for n in policy.domains[g.to].nets], False
        elif g.kind == "machines":
            dsts, leaves = [f"@{named[g.to]}"], False
        elif g.kind == "internet":
            dsts, leaves = [None], True
        else:
            dsts, leaves = [g.to], True
        for src in srcs:
            for dst in dsts:
                if not g.ports:
                    out.append(AllowRule(g.where, src, dst, leaves))
                for p in g.ports:
                    out.append(AllowRule(g.where, src, dst, leaves, p.proto, p.ranges))
    return tuple(out)


def allow_rules6(policy: Policy, egress: bool = False) -> tuple[AllowRule, ...]:
    """The `allow6` chain: the allow entries whose both ends have IPv6 (the
    internet only when the uplink carries IPv6; a network outside is an IPv4
    CIDR, IPv4's only)."""
    out: list[AllowRule] = []
    for r in allow_rules(policy):
        src = _six(policy, r.src)
        if r.out:
            if egress and r.dst is None and src is not None:  # the internet
                out.append(AllowRule(r.where, src, None, True, r.proto, r.ports, "ip6"))
            continue
        dst = _six(policy, r.dst) if r.dst is not None else None
        if src is None or dst is None:
            continue
        out.append(AllowRule(r.where, src, dst, False, r.proto, r.ports, "ip6"))
    return tuple(out)


def _six(policy: Policy, v4: str) -> str | None:
    """A pool's /64 (None: it has none), or a group's IPv6 twin."""
    if v4.startswith("@"):
        return "@" + twin6(v4[1:])
    for d in policy.domains.values():
        if str(d.pool) == v4:
            return None if d.pool6 is None else str(d.pool6)
    return None


def machine_state(policy: Policy, a: Allocation, public_key: str | None = None) -> MachineState:
    """What one machine needs. A hub machine's bridge address is its underlay
    (DHCP and tunnel UDP only); its domain address lives inside its tunnel,
    and `public_key` is its tunnel's key."""
    bridge_address = a.underlay if a.underlay is not None else a.address
    held = held_addresses(a)
    # (through a remap's grace both of its domain addresses are its own)
    on_bridge = (a.underlay,) if a.underlay is not None else held
    elements: dict[tuple[str, str], frozenset[Element]] = {
        PORT_MAC: frozenset({(a.port, a.mac)}),
        MACS: frozenset({(a.mac,)}),
        BINDING: frozenset(),
        DHCP_CLIENT: frozenset({(a.port, a.mac, a.mac)}),
        DHCP_REPLY: frozenset({(a.port, a.mac)}),
        SELF4: frozenset((x, x) for x in {*held, a.underlay} if x is not None),
        PORT_ADDR: frozenset(),
        PORT_BCAST: frozenset(),
    }
    dhcp = None
    domain = policy.domains.get(a.domain)
    address6 = domain.address6(a.address) if domain is not None and a.underlay is None else None
    if address6 is not None and domain is not None:
        sixes = [x for h in held if (x := domain.address6(h)) is not None]
        elements[BINDING6] = frozenset((a.port, a.mac, x) for x in sixes)
        elements[ND_TARGET] = frozenset((a.port, x) for x in sixes)
        elements[ND_LLADDR] = frozenset({(a.port, a.mac)})
        elements[SELF6] = frozenset((x, x) for x in sixes)
    if bridge_address is not None:
        elements[BINDING] = frozenset((a.port, a.mac, x) for x in on_bridge)
        elements[PORT_ADDR] = frozenset((a.port, x) for x in on_bridge)
        tag = f"hub-{a.domain}" if a.underlay is not None else a.domain
        dhcp = DhcpHost(a.mac, bridge_address, label_of(policy, a), tag, address6)
    if domain is not None and domain.members_reach and a.underlay is None:
        # its domain's broadcasts may reach this port (and only those)
        elements[PORT_BCAST] = frozenset({(a.port, str(domain.pool.broadcast_address))})
    elements.update(_group_elements(policy, a))
    # (its containers' prefix follows its address: through a grace, both)
    delegated = [
        (str(net), x)
        for x in held
        if domain is not None and a.rule != QUARANTINE and (net := domain.delegated(x)) is not None
    ]
    routes: frozenset[Route] = frozenset()
    if delegated and a.underlay is None:
        # its containers' packets cross the bridge from its port and MAC,
        # and dom0 routes theirs back through it
        elements[BINDING_NET] = frozenset((a.port, a.mac, net) for net, _ in delegated)
        routes = frozenset((net, via, policy.bridge) for net, via in delegated)
    peer = None
    if a.underlay is not None and a.address is not None and public_key is not None:
        allowed = tuple(f"{x}/32" for x in held) + tuple(net for net, _ in delegated)
        peer = HubPeer(public_key, allowed)
    return MachineState(elements, dhcp, peer, routes)


def limited_members(policy: Policy) -> list[str]:
    """Bridge domains whose members an allow entry limits to some ports."""
    hub = policy.hub is not None
    return sorted(
        {
            g.domain
            for g in policy.grants
            if g.to_domain == g.domain and not (policy.domains[g.domain].hub and hub)
        }
    )


def _hairpin(policy: Policy) -> set[str]:
    """Pools that may reach the internet (whole or by some port): they may
    reach the site's published ports at their public address too."""
    pools = {str(n) for d in policy.domains.values() if d.internet for n in d.nets}
    return pools | {
        str(n)
        for g in policy.grants
        if g.kind == "internet" and g.rule is None
        for n in policy.domains[g.domain].nets
    }


def policy_state(
    policy: Policy, foreign_ports: Iterable[str], *, bridge_netfilter: bool = True
) -> PolicyState:
    """What the policy needs, whatever machines there are. Without
    `bridge_netfilter` (br_netfilter not loaded: bridged IPv4 never meets the
    inet tables), members of a domain that an allow entry limits to some
    ports get no direct path on the bridge at all: the ports could not be
    enforced there, so they get nothing (fail-closed)."""
    domains = policy.domains
    hub = policy.hub
    uplink = policy.uplink
    peers: set[Element] = set()
    reach: set[Element] = set()
    egress: set[Element] = set()
    services: set[Element] = set()
    icmp: set[Element] = set()
    dhcp_server: set[Element] = {("255.255.255.255",)}
    addresses: set[Address] = set()
    ranges: list[DhcpRange] = []
    reach6: set[Element] = set()
    egress6: set[Element] = set()
    nat_out6: set[Element] = set()
    v6_out = uplink is not None and any(":" in a for a in uplink.addresses)
    services6: set[Element] = set()
    icmp6: set[Element] = set()
    ranges6: list[tuple[str, str]] = []
    for d in domains.values():
        if d.pool6 is None:
            continue
        pool6, gw6 = str(d.pool6), str(d.gateway6)
        addresses.add((policy.bridge, f"{gw6}/64"))
        ranges6.append((d.name, pool6))
        if d.members_reach:
            reach6.add((pool6, pool6))  # through dom0: machines have no on-link prefix
        if v6_out and d.internet:
            egress6.add((pool6,))
        if v6_out and (
            d.internet or any(g.kind == "internet" for g in policy.grants if g.domain == d.name)
        ):
            nat_out6.add((pool6,))  # (a ULA: it leaves behind dom0's tunnel address)
        for other in d.reach:
            if (o6 := domains[other].pool6) is not None:
                reach6.add((pool6, str(o6)))
        for name in d.services:
            for proto, port in service_ports(d, name):
                if proto == "icmp":
                    icmp6.add((pool6, gw6))
                else:
                    services6.add((pool6, gw6, proto, str(port)))
    routes: set[Route] = set()
    for d in domains.values():
        pool = str(d.pool)
        nets = [str(n) for n in d.nets]  # the pool, and its containers' pool
        gateway = f"{d.gateway}/{d.pool.prefixlen}"
        if d.hub and hub is not None:
            # The domain lives inside the tunnels: its gateway is on the hub,
            # and no DHCP range: addresses come with the tunnel configuration.
            addresses.add((hub.interface, gateway))
            if d.containers_pool is not None:
                # (each machine's prefix is in its peer's allowed IPs: WireGuard
                # picks the tunnel, and refuses a source from any other)
                routes.add((str(d.containers_pool), "", hub.interface))
        else:
            addresses.add((policy.bridge, gateway))
            dhcp_server.add((str(d.gateway),))
            plain = str(d.gateway) if d.resolves and d.dns == "plain" else None
            ranges.append(
                DhcpRange(d.name, d.pool, str(d.gateway), f"{d.name}.{policy.tld}", plain)
            )
            if d.members_reach:
                peers.add((pool, pool))  # direct frames on the bridge: bridge domains only
        for net in nets:
            if d.members_reach:
                reach.update((net, other) for other in nets)
            for other in d.reach:
                reach.update((net, str(o)) for o in domains[other].nets)
            if d.internet:
                egress.add((net,))
            for name in d.services:
                # only on the domain's own gateway: the rest of dom0 stays silent
                for proto, port in service_ports(d, name):
                    if proto == "icmp":
                        icmp.add((net, str(d.gateway)))
                    else:
                        services.add((net, str(d.gateway), proto, str(port)))
    nat_out = set(egress)
    for g in policy.grants:
        d = domains[g.domain]
        if g.kind in ("internet", "network"):
            nat_out.update((str(n),) for n in d.nets)
    if bridge_netfilter:
        # members limited to some ports still need the bridge between them
        # (the inet tables, which br_netfilter runs for bridged IPv4, limit them)
        peers |= {(str(domains[d].pool), str(domains[d].pool)) for d in limited_members(policy)}
    q = policy.quarantine
    if q.pool is not None and q.gateway is not None:
        addresses.add((policy.bridge, f"{q.gateway}/{q.pool.prefixlen}"))
        dhcp_server.add((str(q.gateway),))
        # No router option: a quarantined machine has nowhere to go.
        ranges.append(DhcpRange(QUARANTINE, q.pool, None, f"{QUARANTINE}.{policy.tld}"))
    hub_state = None
    if hub is not None:
        if any("enroll" in d.services for d in domains.values() if d.hub):
            # a hub machine's agent talks to dom0 over its underlay, before
            # (and besides) its tunnel: the bridge address is the one its port binds
            for proto, port in SERVICES["enroll"]:
                services.add((str(hub.pool), str(hub.gateway), proto, str(port)))
        addresses.add((policy.bridge, f"{hub.gateway}/{hub.pool.prefixlen}"))
        dhcp_server.add((str(hub.gateway),))
        # No router: a hub machine's only destination on the bridge is the hub.
        ranges.append(DhcpRange("hub", hub.pool, None, None))
        hub_state = HubState(
            hub.interface,
            hub.private_key_file,
            hub.listen_port,
            hub.mtu,
            f"{hub.gateway}:{hub.listen_port}",
        )
    forwards = tuple(
        Forward(
            p.where,
            p.via,
            tunnel_address(uplink) if p.via == "uplink" and uplink is not None else None,
            p.proto,
            p.listen,
            p.address,
            p.port,
        )
        for p in policy.publish
    )
    uplink_state = killswitch = None
    if uplink is not None and policy.wan is not None:
        for a in uplink.addresses:
            addresses.add((uplink.interface, str(ip_interface(a))))
        uplink_state = UplinkState(
            uplink.interface,
            uplink.private_key_file,
            uplink.public_key,
            uplink.endpoint,
            uplink.addresses,
            uplink.table,
            uplink.mtu,
            uplink.persistent_keepalive,
        )
        killswitch = KillSwitch(
            policy.wan,
            uplink.endpoint_host,
            uplink.endpoint_port,
            uplink.table,
            policy.wan_allow,
            policy.host.ssh_from,
            policy.host.ssh_port,
            tuple((f.proto, f.listen, f.address, f.port) for f in forwards if f.via == "wan"),
        )
    exempt = {(p,) for p in foreign_ports} | {(p,) for p in policy.trusted_ports}
    shape = Shape(
        bridge=policy.bridge,
        wan=policy.wan,
        egress=uplink.interface if uplink is not None else policy.wan,
        hub=hub.interface if hub else None,
        hub_port=hub.listen_port if hub else None,
        underlay=str(hub.pool) if hub else None,
        hub_gateway=str(hub.gateway) if hub else None,
        ssh_port=policy.host.ssh_port,
        ping=policy.host.ping,
        dhcp_client=policy.host.dhcp_client,
        limits=policy.limits,
        allow=allow_rules(policy),
        allow6=allow_rules6(policy, v6_out) if ranges6 else (),
        groups=groups_of(policy).sets
        + (tuple(twin6(g) for g in groups_of(policy).sets) if ranges6 else ()),
        forwards=forwards,
        hairpin=tuple(sorted(_hairpin(policy))) if forwards else (),
        site=tuple(str(n) for d in domains.values() for n in d.nets) if forwards else (),
        bridge_netfilter=bridge_netfilter,
        ipv6=bool(ranges6),
        egress6=bool(ranges6) and v6_out,
        mdns=policy.mdns_pools,
    )
    return PolicyState(
        shape=shape,
        killswitch=killswitch,
        sets={
            EXEMPT: frozenset(exempt),
            PEERS: frozenset(peers),
            DHCP_SERVER: frozenset(dhcp_server),
            REACH: frozenset(reach),
            EGRESS: frozenset(egress),
            SERVICE: frozenset(services),
            ICMP: frozenset(icmp),
            SSH4: frozenset((c,) for c in policy.host.ssh_from if ":" not in c),
            SSH6: frozenset((c,) for c in policy.host.ssh_from if ":" in c),
            NAT_OUT: frozenset(nat_out),
            REACH6: frozenset(reach6),
            EGRESS6: frozenset(egress6),
            NAT_OUT6: frozenset(nat_out6),
            SERVICE6: frozenset(services6),
            ICMP6: frozenset(icmp6),
        },
        addresses=frozenset(addresses),
        dhcp=DhcpConfig(
            policy.bridge,
            policy.lease_seconds,
            tuple(ranges),
            tuple((f"hub-{d.name}", f"{d.name}.{policy.tld}") for d in domains.values() if d.hub)
            if hub is not None
            else (),
            policy.dhcp_log,
            tuple(ranges6),
            bool(ranges6) and v6_out,
        ),
        uplink=uplink_state,
        hub=hub_state,
        routes=frozenset(routes),
    )
