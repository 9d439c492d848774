"""The policy as plain, validated, immutable data (what `load` produces)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from controller.policy.macs import Ternary
from controller.policy.names import Template

QUARANTINE = "quarantine"  # the pseudo-domain of machines no rule matches

# dom0's own services a domain may be allowed to reach, and what they listen on.
# DHCP is always reachable from the bridge (quarantined machines included).
SERVICES: Mapping[str, tuple[tuple[str, int], ...]] = {
    # DNS over TLS; plain DNS on port 53 too only where the domain's `dns` is
    # "plain" (see `service_ports`). "dot" is the same as "dns" (an older name).
    "dns": (("tcp", 853),),
    "dot": (("tcp", 853),),
    "ntp": (("udp", 123),),
    "icmp": (("icmp", 0),),
    "enroll": (("tcp", 8443),),
    "mirror": (("tcp", 873), ("tcp", 8080)),
    "proxy": (("tcp", 3128),),
    "smtp": (("tcp", 25), ("tcp", 587)),
}


PLAIN_DNS = (("udp", 53), ("tcp", 53))
# A domain's `dns`: DNS over TLS only (agents' stubs speak it), or plain DNS
# on its gateway too, for machines without an agent.
DNS_MODES = ("tls", "plain")


def service_ports(domain: Domain, service: str) -> tuple[tuple[str, int], ...]:
    """What one of dom0's services listens on for this domain's machines."""
    ports = SERVICES[service]
    if service in ("dns", "dot") and domain.dns == "plain":
        return PLAIN_DNS + ports
    return ports


@dataclass(frozen=True, slots=True)
class Match:
    """All given criteria must hold. `mac` is the intersection of every MAC
    criterion (glob, prefix, mask, random); globs are fnmatch patterns."""

    mac: Ternary
    bridge: str | None = None
    interface: str | None = None
    libvirt_name: str | None = None  # parsed now, matched once libvirt is a source
    libvirt_metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def needs_libvirt(self) -> bool:
        return self.libvirt_name is not None or bool(self.libvirt_metadata)

    def matches(self, mac: int, bridge: str, interface: str) -> bool:
        # Rules that name libvirt facts cannot match until libvirt is a source.
        if self.needs_libvirt or not self.mac.matches(mac):
            return False
        if self.bridge is not None and not fnmatch.fnmatchcase(bridge, self.bridge):
            return False
        return self.interface is None or fnmatch.fnmatchcase(interface, self.interface)


# What an allow entry's `ports` may name: a protocol, with ports for tcp and udp.
PROTOCOLS = ("tcp", "udp", "icmp")
INTERNET = "internet"  # an allow entry's destination: anything out of the uplink (or WAN)


@dataclass(frozen=True, slots=True)
class Ports:
    """One protocol of an allow entry; `ranges` () is every port (icmp has none)."""

    proto: str  # one of PROTOCOLS
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def text(self) -> str:
        if not self.ranges:
            return self.proto
        return ", ".join(
            f"{self.proto}/{lo}" if lo == hi else f"{self.proto}/{lo}-{hi}"
            for lo, hi in self.ranges
        )

    def holds(self, proto: str, port: int | None) -> bool:
        if proto != self.proto:
            return False
        return not self.ranges or (
            port is not None and any(lo <= port <= hi for lo, hi in self.ranges)
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """One allow entry: machines of a domain (or of one rule) may open
    connections to a destination, on some protocols and ports or on all.
    Replies come back by connection tracking; nothing else is implied."""

    where: str  # the policy line, e.g. "domains.lan.allow[1]"
    domain: str  # the source's domain
    rule: str | None  # the source is this rule's machines; None: the whole domain
    kind: str  # "domain", "machines" (a name glob within a domain), "internet", "network"
    to: str  # domain name, "LABEL-GLOB.DOMAIN", "internet", or a CIDR outside the site
    ports: tuple[Ports, ...] = ()  # () every protocol and port

    @property
    def to_domain(self) -> str | None:
        """The destination's domain (for a domain or a machine name glob)."""
        if self.kind == "domain":
            return self.to
        if self.kind == "machines":
            return self.to.split(".", 1)[1]
        return None

    @property
    def ports_text(self) -> str:
        return ", ".join(p.text for p in self.ports) if self.ports else "every port"

    def covers(self, proto: str, port: int | None) -> bool:
        return not self.ports or any(p.holds(proto, port) for p in self.ports)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    domain: str
    template: Template
    max_slots: int
    match: Match
    max_per_port: int | None = None  # machines of this rule one bridge port may hold
    pins: tuple[tuple[int, str], ...] = ()  # (slot, fixed address in the domain's pool)
    allow: tuple[Grant, ...] = ()  # what this rule's machines may reach beyond their domain


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    pool: IPv4Network
    gateway: IPv4Address
    reach: tuple[str, ...]  # other domains whose members this one may open connections to
    members_reach: bool  # members of this domain reach each other
    internet: bool
    services: tuple[str, ...]
    hub: bool = False  # members talk only through their WireGuard tunnel to the hub
    allow: tuple[Grant, ...] = ()  # by protocol and port (reach/internet: everything)
    pool6: IPv6Network | None = None  # its IPv6 /64, if it has IPv6
    # `containers = N`: each machine's agent gets a /N of `containers_pool`
    # for its containers, the one at the machine's offset in `pool`
    containers: int | None = None
    containers_pool: IPv4Network | None = None
    dns: str = "tls"  # one of DNS_MODES
    # scheduled remapping (seconds; None: addresses never move): every machine
    # gets a new address every `remap_every`, keeping its old one `remap_grace`
    remap_every: int | None = None
    remap_grace: int | None = None

    def record_ttl(self, ttl: int) -> int:
        """Its records' TTL given [dns] ttl: within half the remap grace, so that
        no resolver holds a withdrawn address (remap_grace >= 2 x TTL)."""
        if self.remap_grace is None:
            return ttl
        return max(1, min(ttl, self.remap_grace // 2))

    @property
    def resolves(self) -> bool:
        """Its machines may ask dom0's DNS service."""
        return "dns" in self.services or "dot" in self.services

    @property
    def nets(self) -> tuple[IPv4Network, ...]:
        """Every IPv4 network of the domain's members: its pool, and its
        containers' pool (the domain's policy holds for both alike)."""
        return (self.pool,) if self.containers_pool is None else (self.pool, self.containers_pool)

    def delegated(self, address: str | None) -> IPv4Network | None:
        """The containers prefix of the machine at `address` (None: the
        domain delegates none): deterministic, so that it follows the
        address and needs no ledger of its own."""
        if self.containers is None or self.containers_pool is None or address is None:
            return None
        offset = int(ip_address(address)) - int(self.pool.network_address)
        size = 1 << (32 - self.containers)
        start = int(self.containers_pool.network_address) + offset * size
        return IPv4Network((start, self.containers))

    @property
    def gateway6(self) -> IPv6Address | None:
        """dom0's address in the /64 (the first host), as in IPv4."""
        return None if self.pool6 is None else self.pool6.network_address + 1

    def address6(self, address: str | None) -> str | None:
        """A machine's IPv6 address: its IPv4 address's offset in the pool,
        in the /64 (it follows the IPv4 allocation, pins included)."""
        if self.pool6 is None or address is None:
            return None
        offset = int(ip_address(address)) - int(self.pool.network_address)
        return str(self.pool6.network_address + offset)


# What may leave (and enter) the WAN besides the uplink's tunnel, on request.
WAN_ALLOW = ("dhcp", "dhcpv6", "ndp")
# dnsmasq's DHCP log: nothing routine, one line per message, or every option too
DHCP_LOG = ("quiet", "transactions", "verbose")


# Where a published port is offered: on dom0's tunnel address (traffic the
# VPN provider forwards to it), or on the WAN (only where the policy says so).
PUBLISH_VIA = ("uplink", "wan")


@dataclass(frozen=True, slots=True)
class Publish:
    """A machine's port offered to the outside: destination NAT from dom0's
    `listen` port (on the uplink's tunnel address, or on the WAN) to the
    machine's pinned address and `port`; nothing else of the machine."""

    where: str  # the policy line: "publish[1]"
    machine: str  # its name within the site, "www1.dmz"
    domain: str
    address: str  # its pinned address: a forward is by number
    proto: str  # "tcp" or "udp"
    port: int  # the machine's
    listen: int  # dom0's
    via: str  # one of PUBLISH_VIA


@dataclass(frozen=True, slots=True)
class Uplink:
    """dom0's WireGuard tunnel to the upstream VPN: all egress leaves through it."""

    interface: str
    endpoint_host: str  # an IP address (v4 or v6)
    endpoint_port: int
    public_key: str  # the server's, base64
    private_key_file: str  # relative paths are inside the state directory
    addresses: tuple[str, ...]  # dom0's tunnel addresses, CIDR
    table: int  # routing table and fwmark (as wg-quick's Table=auto)
    mtu: int
    persistent_keepalive: int

    @property
    def endpoint(self) -> str:
        host = f"[{self.endpoint_host}]" if ":" in self.endpoint_host else self.endpoint_host
        return f"{host}:{self.endpoint_port}"


@dataclass(frozen=True, slots=True)
class Hub:
    """dom0's WireGuard interface for the machines of `hub = true` domains."""

    interface: str
    listen_port: int
    pool: IPv4Network  # bridge (underlay) addresses of hub machines: DHCP, tunnel UDP only
    gateway: IPv4Address  # dom0's address in that pool: the tunnels' endpoint
    private_key_file: str
    mtu: int


@dataclass(frozen=True, slots=True)
class Quarantine:
    pool: IPv4Network | None
    gateway: IPv4Address | None
    template: Template


@dataclass(frozen=True, slots=True)
class Host:
    """dom0's own input from outside its machines: what the installer's boot
    baseline allowed, which the controller takes over when it starts."""

    ssh_from: tuple[str, ...] = ()  # CIDRs, v4 or v6
    ssh_port: int = 22
    ping: bool = True
    dhcp_client: bool = True  # DHCP replies for dom0's own interfaces (e.g. the WAN)


@dataclass(frozen=True, slots=True)
class Dns:
    """dom0's DNS service ([dns]): the site's names, and where others are asked."""

    # DNS-over-TLS upstreams, "ADDRESS[@PORT][#TLS-NAME]" (unbound's forward-addr
    # form); () with an uplink: dom0 resolves names outside the site itself
    upstream: tuple[str, ...] = ()
    upstream_ca: str | None = None  # the upstreams' CA bundle (default: the system's)
    ttl: int = 300  # seconds: the site's records


@dataclass(frozen=True, slots=True)
class Limits:
    """What one machine or one port may use of dom0, whatever it sends."""

    connections_per_machine: int = 4096  # conntrack entries a machine's address may hold
    new_connections_per_second: int = 200  # per machine (burst twice that)
    broadcasts_per_second: int = 100  # broadcast and multicast frames per bridge port
    unknown_frames_per_second: int = 10  # frames per port from MACs not admitted (learning)


# id(policy) -> (policy, rules by name): a frozen policy's index, built once
_RULE_INDEX: dict[int, tuple[Policy, dict[str, Rule]]] = {}


@dataclass(frozen=True, slots=True)
class Policy:
    source: str  # file it came from
    tld: str
    bridge: str
    trusted_ports: tuple[str, ...]  # bridge ports that are not machines (never policed)
    wan: str | None
    wan_allow: tuple[str, ...]
    uplink: Uplink | None
    hub: Hub | None
    lease_seconds: int
    release_after: int  # seconds a machine may be absent before its slot is reused
    domains: Mapping[str, Domain]
    rules: tuple[Rule, ...]
    quarantine: Quarantine
    host: Host = field(default_factory=Host)
    max_machines_per_port: int = 1  # port security: a libvirt NIC has one MAC
    limits: Limits = field(default_factory=Limits)
    dhcp_log: str = "transactions"  # one of DHCP_LOG
    # domain -> every address pinned in it (rules' `address`/`pins`): no one else's
    pinned: Mapping[str, frozenset[str]] = field(default_factory=dict)
    publish: tuple[Publish, ...] = ()  # ports offered to the outside
    agent_certificate_seconds: int = 86400  # [agents] certificate_life: agents renew at half
    advertise: bool = True  # [agents] advertise: _dom0._tcp by mDNS where agents enroll
    dns: Dns = field(default_factory=Dns)

    @property
    def mdns_pools(self) -> tuple[str, ...]:
        """The pools whose machines may ask dom0's mDNS responder: where
        agents enroll (a hub domain's do so from the hub's pool), when it
        advertises at all."""
        if not self.advertise:
            return ()
        pools = [str(d.pool) for d in self.domains.values() if "enroll" in d.services
                 and not (d.hub and self.hub is not None)]  # fmt: skip
        if self.hub is not None and any(
            "enroll" in d.services for d in self.domains.values() if d.hub
        ):
            pools.append(str(self.hub.pool))
        return tuple(pools)

    @property
    def grants(self) -> tuple[Grant, ...]:
        """Every allow entry, domains' first (in file order), then rules'."""
        return tuple(g for d in self.domains.values() for g in d.allow) + tuple(
            g for r in self.rules for g in r.allow
        )

    def rule(self, name: str) -> Rule | None:
        """The rule of that name (a decision asks this for every machine)."""
        index = _RULE_INDEX.get(id(self))
        if index is None or index[0] is not self:
            if len(_RULE_INDEX) > 8:
                _RULE_INDEX.clear()
            index = (self, {r.name: r for r in self.rules})
            _RULE_INDEX[id(self)] = index
        return index[1].get(name)

    def port_limit(self, rule: Rule | None) -> int:
        if rule is not None and rule.max_per_port is not None:
            return rule.max_per_port
        return self.max_machines_per_port

    def fqdn(self, label: str, domain: str) -> str:
        return f"{label}.{domain}.{self.tld}"
