"""`dom0 policy explain`: may this machine open that connection, and which
policy line decides? (pure: no I/O)

The answer is not a second reading of the policy: the policy's desired state
(the very sets and chains the kernel is given) is loaded into the fake data
plane, the first packet of the connection is sent through it from the
source's port (or its tunnel), and the rule that accepted or dropped it is
traced back to the line of the policy it was built from. Machines are those
the store holds when given, otherwise stand-ins at addresses of their pools
(a pinned machine at its pin): what decides is the pool, the rule and the
name, which a stand-in has too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from controller.core.allocation import Allocation
from controller.core.desired import fqdn_of, machine_state, policy_state
from controller.core.plan import flatten
from controller.drivers.nft import render
from controller.drivers.nft.fake import DOM0, Drop, FakeDataPlane, Packet, Verdict
from controller.policy.model import INTERNET, PROTOCOLS, QUARANTINE, Policy
from controller.policy.names import template_slot

# Stand-in internet destinations (outside every documentation range a
# policy's networks are likely to name); the first one no allow entry names
# is taken, so that "internet" means "somewhere no entry singles out".
_ELSEWHERE = ("198.18.0.77", "100.64.0.77", "192.0.0.77", "203.0.113.77")
_SERVICE = re.compile(r"^(tcp|udp)/(\d{1,5})$|^icmp$")
WAN_STAND_IN = ("wan", "198.51.100.250/24")  # dom0's WAN address in the fake
_BRIDGE_MAC = "02:d0:00:00:00:01"


class ExplainError(ValueError):
    """A source, destination or service that names nothing in the policy."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A source or destination: a machine (`alloc`), dom0, or an address outside."""

    text: str  # as the operator wrote it
    address: str
    alloc: Allocation | None = None
    name: str = ""  # fqdn, "dom0", or "" (outside)
    stand_in: bool = False  # a machine the store does not hold

    def describe(self) -> str:
        what = self.name or "outside"
        extra = ", not present: a stand-in" if self.stand_in else ""
        return f"{what} ({self.address}{extra})"


@dataclass(frozen=True, slots=True)
class Answer:
    source: Endpoint
    destination: Endpoint
    service: str  # "tcp/22", "udp/53", "icmp"
    passes: bool
    decided_by: str  # a policy line ("domains.lan.allow[1]"), or why nothing allows it
    rule: str  # the nft rule that decided, as nft prints it
    notes: tuple[str, ...] = field(default_factory=tuple)

    def line(self) -> str:
        verdict = "passes" if self.passes else "dropped"
        return (
            f"{self.source.describe()} -> {self.destination.describe()} {self.service}: "
            f"{verdict}, decided by {self.decided_by}"
        )

    def to_json(self) -> dict:
        def ep(e: Endpoint) -> dict:
            return {
                "as_given": e.text,
                "name": e.name or None,
                "address": e.address,
                "stand_in": e.stand_in,
            }

        return {
            "source": ep(self.source),
            "destination": ep(self.destination),
            "service": self.service,
            "passes": self.passes,
            "decided_by": self.decided_by,
            "rule": self.rule,
            "notes": list(self.notes),
        }


def parse_service(text: str) -> tuple[str, int | None]:
    m = _SERVICE.match(text.strip().lower())
    if m is None or (m[2] and not 1 <= int(m[2]) <= 65535):
        raise ExplainError(
            f"{text!r} is not a service, expected tcp/PORT, udp/PORT or icmp "
            f"(PORT 1-65535; protocols: {', '.join(PROTOCOLS)})"
        )
    return (m[1], int(m[2])) if m[1] else ("icmp", None)


class _Site:
    """The machines to explain with: the store's, and stand-ins made on demand."""

    def __init__(self, policy: Policy, allocations: Iterable[Allocation]) -> None:
        self.policy = policy
        self.allocs = [a for a in allocations if a.address is not None]
        self.by_name = {fqdn_of(policy, a): a for a in self.allocs}
        self.by_address = {a.address: a for a in self.allocs}
        self.made: list[Allocation] = []

    def used(self) -> set[str]:
        return {a.address for a in (*self.allocs, *self.made) if a.address} | {
            a for pins in self.policy.pinned.values() for a in pins
        }

    def stand_in(self, rule: str, slot: int, domain: str, address: str | None = None) -> Allocation:
        policy = self.policy
        pool = policy.domains[domain].pool
        if address is None:
            taken = self.used() | {str(policy.domains[domain].gateway)}
            address = next(str(h) for h in pool.hosts() if str(h) not in taken)
        n = len(self.made) + 1
        underlay = None
        if policy.domains[domain].hub and policy.hub is not None:
            underlay = str(policy.hub.pool.network_address + 10 + n)
        a = Allocation(
            mac=f"02:e0:00:00:00:{n:02x}",
            rule=rule,
            slot=slot,
            domain=domain,
            address=address,
            port=f"explain{n}",
            underlay=underlay,
            confirmed=True,
        )
        self.made.append(a)
        return a

    def endpoint(self, text: str, role: str) -> Endpoint:
        policy = self.policy
        t = text.strip().lower()
        if t in policy.domains:
            # a machine of the domain that no rule's list or name singles out
            a = self.stand_in(f"({t})", 1, t)
            return Endpoint(text, a.address or "", a, f"a machine of {t}", stand_in=True)
        if t == INTERNET:
            if role == "source":
                raise ExplainError("the internet as a source: connections in are published ports")
            named = [ipaddress.ip_network(g.to) for g in policy.grants if g.kind == "network"]
            for candidate in _ELSEWHERE:
                ip = ipaddress.ip_address(candidate)
                if not any(ip in n for n in named) and self._domain_of(candidate) is None:
                    return Endpoint(text, candidate, name="")
            raise ExplainError("every stand-in internet address is named by an allow entry")
        if t[:1].isdigit():
            return self._address(text, t, role)
        return self._machine(text, t)

    def _domain_of(self, address: str) -> str | None:
        ip = ipaddress.ip_address(address)
        for d in self.policy.domains.values():
            if ip in d.pool:
                return d.name
        q = self.policy.quarantine.pool
        if q is not None and ip in q:
            return QUARANTINE
        return None

    def _address(self, text: str, t: str, role: str) -> Endpoint:
        try:
            ip = ipaddress.IPv4Address(t.split("/")[0])
        except ValueError:
            raise ExplainError(f"{text!r} is not an IPv4 address") from None
        address = str(ip)
        for d in self.policy.domains.values():
            if ip == d.gateway:
                if role == "source":
                    raise ExplainError(f"{address} is dom0's own address, expected a machine")
                return Endpoint(text, address, name="dom0")
        if address in self.by_address:
            a = self.by_address[address]
            return Endpoint(text, address, a, fqdn_of(self.policy, a))
        domain = self._domain_of(address)
        if domain == QUARANTINE:
            raise ExplainError(f"{address} is in the quarantine pool: it reaches only DHCP")
        if domain is not None:
            a = self.stand_in(f"({domain})", 1, domain, address)
            return Endpoint(text, address, a, f"a machine of {domain}", stand_in=True)
        if role == "source":
            raise ExplainError(f"{address} is outside the site, expected a machine or a domain")
        return Endpoint(text, address)

    def _machine(self, text: str, t: str) -> Endpoint:
        policy = self.policy
        name = t if t.endswith(f".{policy.tld}") else f"{t}.{policy.tld}"
        if name in self.by_name:
            a = self.by_name[name]
            return Endpoint(text, a.address or "", a, name)
        label, _, rest = name.partition(".")
        domain = rest[: -len(policy.tld) - 1] if rest.endswith(f".{policy.tld}") else rest
        if domain not in policy.domains:
            raise ExplainError(
                f"{text!r}: expected a machine name like web1.DOMAIN, a domain, an address "
                f"or internet (domains: {', '.join(policy.domains)})"
            )
        for r in policy.rules:
            if r.domain != domain:
                continue
            slot = template_slot(r.template, label, r.max_slots)
            if slot is not None:
                pin = dict(r.pins).get(slot)
                a = self.stand_in(r.name, slot, domain, pin)
                return Endpoint(text, a.address or "", a, name, stand_in=True)
        raise ExplainError(f"{text!r}: no rule of domain {domain} gives the name {label!r}")


def explain(
    policy: Policy,
    source: str,
    destination: str,
    service: str,
    allocations: Iterable[Allocation] = (),
) -> Answer:
    """Whether a new connection from source to destination passes; raises
    ExplainError for names the policy does not know."""
    proto, port = parse_service(service)
    site = _Site(policy, allocations)
    src = site.endpoint(source, "source")
    dst = site.endpoint(destination, "destination")
    if src.alloc is None:
        raise ExplainError(f"{source!r} is not a machine of the site")
    if src.alloc.rule == QUARANTINE:
        raise ExplainError(f"{source!r} is quarantined: it reaches only DHCP")
    machines = [src.alloc] + ([dst.alloc] if dst.alloc and dst.alloc is not src.alloc else [])
    state = policy_state(policy, [])
    flat = flatten(state, [machine_state(policy, a, _KEY) for a in machines])
    assert flat.shape is not None
    fake = FakeDataPlane(
        flat.shape,
        flat.sets,
        [*flat.addresses, WAN_STAND_IN],
        killswitch=flat.killswitch,
        bridge_mac=_BRIDGE_MAC,
    )
    packet = _packet(policy, src.alloc, dst, proto, port)
    target = _target(policy, fake, dst)
    verdict = fake.verdict(packet)
    return _judge(policy, fake, verdict, target, src, dst, _service_text(proto, port))


_KEY = "explain" + "A" * 36 + "AAA="  # a tunnel key for stand-in hub machines


def _service_text(proto: str, port: int | None) -> str:
    return proto if port is None else f"{proto}/{port}"


def _packet(policy: Policy, a: Allocation, dst: Endpoint, proto: str, port: int | None) -> Packet:
    l4: dict = {"proto": proto}
    if port is not None:
        l4 |= {"sport": 40000, "dport": port}
    hub = policy.hub
    if policy.domains[a.domain].hub and hub is not None:
        return Packet(hub.interface, src=a.address or "", dst=dst.address, **l4)
    same_link = (
        dst.alloc is not None and dst.alloc.domain == a.domain and not policy.domains[a.domain].hub
    )
    dst_mac = dst.alloc.mac if same_link and dst.alloc is not None else None
    return Packet(a.port, a.mac, dst_mac, src=a.address or "", dst=dst.address, **l4)


def _target(policy: Policy, fake: FakeDataPlane, dst: Endpoint) -> str:
    if dst.name == "dom0":
        return DOM0
    if dst.alloc is None:
        return fake.shape.egress or ""
    hub = policy.hub
    if policy.domains[dst.alloc.domain].hub and hub is not None:
        return hub.interface
    return dst.alloc.port


def _judge(
    policy: Policy,
    fake: FakeDataPlane,
    verdict: Verdict,
    target: str,
    src: Endpoint,
    dst: Endpoint,
    service: str,
) -> Answer:
    outcome = next((o for o in verdict.outcomes if o.to == target), None)
    if outcome is not None and outcome.passed:
        line, rule = _accepting_line(fake, outcome.accepts, src, dst)
        return Answer(src, dst, service, True, line, rule)
    drop = outcome.dropped if outcome is not None else next(iter(verdict.drops), None)
    if drop is not None and drop.table is None:  # the stack: no route, no neighbour
        return Answer(src, dst, service, False, f"nothing: {drop.reason}", "", (str(drop),))
    where = f" ({drop.family} {drop.table} {drop.chain})" if drop is not None else ""
    return Answer(
        src,
        dst,
        service,
        False,
        f"no line of {policy.source} allows it: dom0 drops the rest{where}",
        _drop_rule(fake, drop),
        (str(drop) if drop is not None else str(verdict),),
    )


def _drop_rule(fake: FakeDataPlane, drop: Drop | None) -> str:
    if drop is None or drop.table is None or drop.rule is None:
        return ""
    return render.rule(fake.tables[(drop.family, drop.table)][drop.chain][1][drop.rule])


def _accepting_line(
    fake: FakeDataPlane,
    accepts: tuple[tuple[str, str, str, int], ...],
    src: Endpoint,
    dst: Endpoint,
) -> tuple[str, str]:
    """The policy line behind the inet rule that accepted the connection."""
    assert src.alloc is not None
    d = src.alloc.domain
    for family, table, chain, index in accepts:
        if family != "inet" or table != "dom0":
            continue
        rule = fake.tables[(family, table)][chain][1][index]
        text = render.rule(rule)
        if chain == "allow":
            return fake.shape.allow[index].where, text
        if "@reach" in text:
            same = dst.alloc is not None and dst.alloc.domain == d
            return (f"domains.{d}.members_reach" if same else f"domains.{d}.reach"), text
        if "@egress" in text:
            return f"domains.{d}.internet", text
        if "@services" in text or "@ping" in text:
            return f"domains.{d}.services", text
    return "(no policy line: accepted by " + ", ".join(
        f"{c} rule {i}" for _, _, c, i in accepts
    ) + ")", ""
