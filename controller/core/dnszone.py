"""The site's DNS data: which zones dom0 serves, and every record in them.

dom0 is authoritative for the site's suffix (`internal`) and for the reverse
zones of every pool its machines and their containers take addresses from.
A machine `web1.x.internal` has an A record (AAAA where its domain has IPv6),
its interface `eth0.web1.x.internal` the same, and a PTR back to the
machine's name; a container `c1` its agent reports inside the machine's
delegated prefix gets `c1.web1.x.internal` and `eth0.c1.web1.x.internal`.

Pure: plain data in, zone texts out. The driver (drivers/dns.py) writes them
where unbound reads them and asks it to reload the zones that changed.

Reverse zones follow octet boundaries (an in-addr.arpa zone is a whole
number of labels): a /24 pool is one zone, a /20 is served as its /16. A zone
inside another one the site serves is not served on its own: its records go
to the enclosing zone, so that unbound never holds two zones for one name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.core.allocation import Allocation
from controller.core.desired import fqdn_of
from controller.policy.model import QUARANTINE, Domain, Policy

INTERFACE = "eth0"  # the interface label of a machine's and a container's address
NEGATIVE_TTL = 5  # seconds a "no such name" is cached: a new machine answers at once


@dataclass(frozen=True, slots=True, order=True)
class Record:
    name: str  # absolute, without the final dot
    rtype: str  # "A", "AAAA" or "PTR"
    value: str  # an address, or a name (PTR) without the final dot
    ttl: int

    def line(self) -> str:
        value = f"{self.value}." if self.rtype == "PTR" else self.value
        return f"{self.name}. {self.ttl} IN {self.rtype} {value}\n"


@dataclass(frozen=True, slots=True)
class Container:
    """A container an agent reported, as dom0 checked it (api/status.py)."""

    name: str  # its label
    address: str


def reverse_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


def _v4_zone(net: ipaddress.IPv4Network) -> str:
    octets = max(1, net.prefixlen // 8)
    labels = str(net.network_address).split(".")[:octets]
    return ".".join(reversed(labels)) + ".in-addr.arpa"


def _v6_zone(net: ipaddress.IPv6Network) -> str:
    nibbles = max(1, net.prefixlen // 4)
    full = net.network_address.exploded.replace(":", "")
    return ".".join(reversed(full[:nibbles])) + ".ip6.arpa"


def _within(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


def zones(policy: Policy) -> tuple[str, ...]:
    """Every zone dom0 serves: the site's suffix first, then the reverse
    zones of its domains' pools, none inside another."""
    wanted: set[str] = set()
    for d in policy.domains.values():
        for net in d.nets:
            wanted.add(_v4_zone(net))
        if d.pool6 is not None:
            wanted.add(_v6_zone(d.pool6))
    outer = {z for z in wanted if not any(o != z and _within(z, o) for o in wanted)}
    return (policy.tld, *sorted(outer))


def zone_of(name: str, served: Iterable[str]) -> str | None:
    """The most specific served zone a name falls in."""
    best: str | None = None
    for z in served:
        if _within(name, z) and (best is None or len(z) > len(best)):
            best = z
    return best


def machine_records(policy: Policy, a: Allocation, ttl: int) -> list[Record]:
    """A machine's names and their reverse: none for a quarantined one (it
    may not ask dom0 anything) or one without an address."""
    if a.domain == QUARANTINE or a.address is None:
        return []
    domain = policy.domains.get(a.domain)
    if domain is None:
        return []
    fqdn = fqdn_of(policy, a)
    out = _names(fqdn, a.address, ttl)
    six = domain.address6(a.address)
    if six is not None:
        out += _names(fqdn, six, ttl)
    if a.previous is not None:
        # (a remap's grace: its old address still answers, in reverse only;
        # its name already gives the new one)
        for old in (a.previous, domain.address6(a.previous)):
            if old is not None:
                out.append(Record(reverse_name(old), "PTR", fqdn, ttl))
    return out


def container_records(
    domain: Domain, machine_fqdn: str, address: str, containers: Iterable[Container], ttl: int
) -> list[Record]:
    """Names of the containers inside the machine's delegated prefix (what
    an agent reports is its tenant's word: anything outside is not named)."""
    prefix = domain.delegated(address)
    if prefix is None:
        return []
    out: list[Record] = []
    for c in containers:
        try:
            inside = ipaddress.ip_address(c.address) in prefix
        except ValueError:
            continue
        if inside:
            out += _names(f"{c.name}.{machine_fqdn}", c.address, ttl)
    return out


def _names(fqdn: str, address: str, ttl: int) -> list[Record]:
    rtype = "AAAA" if ":" in address else "A"
    return [
        Record(fqdn, rtype, address, ttl),
        Record(f"{INTERFACE}.{fqdn}", rtype, address, ttl),
        Record(reverse_name(address), "PTR", fqdn, ttl),
    ]


def split(records: Iterable[Record], served: tuple[str, ...]) -> dict[str, list[Record]]:
    """Records by the zone they belong to (one outside every zone is dropped)."""
    out: dict[str, list[Record]] = {z: [] for z in served}
    for r in records:
        z = zone_of(r.name, served)
        if z is not None:
            out[z].append(r)
    return out


def zone_body(records: Iterable[Record]) -> str:
    """The records' lines, sorted: equal bodies mean an unchanged zone."""
    return "".join(r.line() for r in sorted(set(records)))


def zone_text(zone: str, tld: str, body: str, serial: int, ttl: int) -> str:
    """A whole zone file: its SOA and NS (dom0, as `dns.TLD`), then `body`."""
    soa_ttl = min(ttl, 3600)
    return (
        f"$ORIGIN {zone}.\n"
        f"@ {soa_ttl} IN SOA dns.{tld}. hostmaster.{tld}. {serial} 3600 600 86400 "
        f"{NEGATIVE_TTL}\n"
        f"@ {soa_ttl} IN NS dns.{tld}.\n" + body
    )


def site_records(
    policy: Policy,
    allocations: Iterable[Allocation],
    containers: Mapping[str, Iterable[Container]],
) -> list[Record]:
    """Every record of the site: each machine's, and its containers' (by
    machine FQDN)."""
    out: list[Record] = []
    for a in allocations:
        domain = policy.domains.get(a.domain)
        ttl = domain.record_ttl(policy.dns.ttl) if domain is not None else policy.dns.ttl
        mine = machine_records(policy, a, ttl)
        if not mine:
            continue
        out += mine
        fqdn = mine[0].name
        listed = containers.get(fqdn)
        if listed and a.address is not None:
            out += container_records(policy.domains[a.domain], fqdn, a.address, listed, ttl)
    return out


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """What dom0's DNS server should be: where it listens, for whom, and
    where it asks for names outside the site."""

    tld: str
    zones: tuple[str, ...]
    tls: tuple[str, ...]  # addresses of DNS over TLS: each asking domain's gateway
    plain: tuple[str, ...]  # plain DNS: dom0's loopback, and `dns = "plain"` domains' gateways
    clients: tuple[str, ...]  # networks that may ask (besides the loopback)
    upstream: tuple[str, ...] = ()  # DoT forwarders, unbound's "ADDRESS@PORT#NAME"
    upstream_ca: str | None = None
    recurse: bool = False  # names outside the site are resolved at all (an uplink carries them)


LOOPBACK = ("127.0.0.1", "::1")


def dns_config(policy: Policy) -> DnsConfig:
    """Outside names only with an uplink: dom0's own queries leave through
    it (the kill switch lets nothing else out), never in clear on the WAN."""
    tls: list[str] = []
    plain: list[str] = list(LOOPBACK)
    clients: list[str] = []
    for d in policy.domains.values():
        if not d.resolves:
            continue
        mine = [str(d.gateway)] + ([str(d.gateway6)] if d.gateway6 is not None else [])
        tls += mine
        if d.dns == "plain":
            plain += mine
        clients += [str(n) for n in d.nets]
        if d.pool6 is not None:
            clients.append(str(d.pool6))
    return DnsConfig(
        tld=policy.tld,
        zones=zones(policy),
        tls=tuple(dict.fromkeys(tls)),
        plain=tuple(dict.fromkeys(plain)),
        clients=tuple(dict.fromkeys(clients)),
        upstream=policy.dns.upstream,
        upstream_ca=policy.dns.upstream_ca,
        recurse=policy.uplink is not None,
    )
