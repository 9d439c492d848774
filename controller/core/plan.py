"""The plan: desired minus applied, as data that drivers carry out and that
`dom0 plan` prints. Pure functions only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from controller.core.desired import (
    PORT_SETS,
    Address,
    DhcpConfig,
    DhcpHost,
    Element,
    HubPeer,
    HubState,
    KillSwitch,
    MachineState,
    PolicyState,
    Route,
    Shape,
    UplinkState,
)

SetKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Flat:
    """A whole data plane state, desired or applied, flattened."""

    shape: Shape | None
    sets: Mapping[SetKey, frozenset[Element]]
    addresses: frozenset[Address]
    dhcp: DhcpConfig | None
    hosts: Mapping[str, DhcpHost]  # by MAC
    peers: Mapping[str, HubPeer] = field(default_factory=dict)  # by public key
    killswitch: KillSwitch | None = None
    uplink: UplinkState | None = None
    hub: HubState | None = None
    routes: frozenset[Route] = frozenset()  # dom0's own, in the main table


EMPTY = Flat(None, {}, frozenset(), None, {})

# What a driver reports when a kill switch table exists that is not the one
# desired (tampered, older, or left by a policy without an uplink).
FOREIGN_KILLSWITCH = KillSwitch("?", "?", 0, 0, ())


@dataclass(frozen=True, slots=True)
class Plan:
    rebuild: bool = False  # the chains change: write dom0's tables whole
    add: Mapping[SetKey, frozenset[Element]] = field(default_factory=dict)
    delete: Mapping[SetKey, frozenset[Element]] = field(default_factory=dict)
    addresses_add: frozenset[Address] = frozenset()
    addresses_del: frozenset[Address] = frozenset()
    routes_add: frozenset[Route] = frozenset()
    routes_del: frozenset[Route] = frozenset()
    dhcp_config: DhcpConfig | None = None  # set when dnsmasq must (re)start
    hosts_put: Mapping[str, DhcpHost] = field(default_factory=dict)
    hosts_del: frozenset[str] = frozenset()
    peers_put: Mapping[str, HubPeer] = field(default_factory=dict)
    peers_del: frozenset[str] = frozenset()
    killswitch: KillSwitch | None = None  # set when the kill switch table must be rewritten
    killswitch_remove: bool = False  # the policy has no uplink (any more): delete the table
    uplink: UplinkState | None = None  # set when the uplink must be (re)configured
    hub: HubState | None = None  # set when the hub must be (re)configured

    @property
    def empty(self) -> bool:
        return not (
            self.rebuild
            or any(self.add.values())
            or any(self.delete.values())
            or self.addresses_add
            or self.addresses_del
            or self.routes_add
            or self.routes_del
            or self.dhcp_config
            or self.hosts_put
            or self.hosts_del
            or self.peers_put
            or self.peers_del
            or self.killswitch
            or self.killswitch_remove
            or self.uplink
            or self.hub
        )

    def lines(self) -> list[str]:
        """Human-readable, one change per line, stable order."""
        out: list[str] = []
        if self.killswitch is not None:
            k = self.killswitch
            out.append(
                f"killswitch: only UDP to {k.endpoint_host}:{k.endpoint_port} leaves {k.wan}"
                + (f" (and {', '.join(k.allow)})" if k.allow else "")
            )
        if self.killswitch_remove:
            out.append("killswitch: remove the table (the policy has no uplink)")
        if self.uplink is not None:
            u = self.uplink
            out.append(
                f"uplink: {u.interface} to {u.endpoint} as {', '.join(u.addresses)}, "
                f"all traffic through it (table {u.table})"
            )
        if self.hub is not None:
            out.append(f"hub: {self.hub.interface} listening on {self.hub.endpoint}")
        if self.rebuild:
            count = sum(len(v) for v in self.add.values())
            out.append(
                f"nftables: rebuild dom0's tables with {count} elements (chains changed or absent)"
            )
        for key in sorted(set(self.add) | set(self.delete)) if not self.rebuild else ():
            for e in sorted(self.delete.get(key, ())):
                out.append(f"nftables: delete {key[0]} dom0 {key[1]} {{ {' . '.join(e)} }}")
            for e in sorted(self.add.get(key, ())):
                out.append(f"nftables: add {key[0]} dom0 {key[1]} {{ {' . '.join(e)} }}")
        for iface, a in sorted(self.addresses_del):
            out.append(f"address: delete {a} from {iface}")
        for iface, a in sorted(self.addresses_add):
            out.append(f"address: add {a} to {iface}")
        for net, via, dev in sorted(self.routes_del):
            out.append(f"route: delete {net}" + (f" via {via}" if via else "") + f" dev {dev}")
        for net, via, dev in sorted(self.routes_add):
            out.append(f"route: add {net}" + (f" via {via}" if via else "") + f" dev {dev}")
        if self.dhcp_config is not None:
            ranges = ", ".join(str(r.network) for r in self.dhcp_config.ranges)
            out.append(f"dhcp: (re)start dnsmasq on {self.dhcp_config.bridge} for {ranges}")
        for mac in sorted(self.hosts_del):
            out.append(f"dhcp: remove reservation {mac}")
        for mac, h in sorted(self.hosts_put.items()):
            six = f" and {h.address6}" if h.address6 else ""
            out.append(f"dhcp: reserve {mac} -> {h.address}{six} {h.hostname}.{h.tag}")
        for peer in sorted(self.peers_del):
            out.append(f"hub: remove peer {peer}")
        for peer, p in sorted(self.peers_put.items()):
            out.append(f"hub: peer {peer} allowed {', '.join(p.allowed_ips)}")
        return out

    def to_json(self) -> dict:
        def sets(m: Mapping[SetKey, frozenset[Element]]) -> dict:
            return {f"{k[0]}/{k[1]}": sorted(list(e) for e in v) for k, v in m.items() if v}

        return {
            "rebuild": self.rebuild,
            "add": sets(self.add),
            "delete": sets(self.delete),
            "addresses_add": sorted(f"{a} {i}" for i, a in self.addresses_add),
            "addresses_del": sorted(f"{a} {i}" for i, a in self.addresses_del),
            "routes_add": sorted(list(r) for r in self.routes_add),
            "routes_del": sorted(list(r) for r in self.routes_del),
            "dhcp_restart": self.dhcp_config is not None,
            "hosts_put": {
                m: {"address": h.address, "hostname": h.hostname, "domain": h.tag}
                for m, h in sorted(self.hosts_put.items())
            },
            "hosts_del": sorted(self.hosts_del),
            "peers_put": {k: list(p.allowed_ips) for k, p in sorted(self.peers_put.items())},
            "peers_del": sorted(self.peers_del),
            "killswitch": self.killswitch is not None,
            "killswitch_remove": self.killswitch_remove,
            "uplink": self.uplink is not None,
            "hub": self.hub is not None,
        }


def set_diff(
    desired: Mapping[SetKey, frozenset[Element]], applied: Mapping[SetKey, frozenset[Element]]
) -> tuple[dict[SetKey, frozenset[Element]], dict[SetKey, frozenset[Element]]]:
    add: dict[SetKey, frozenset[Element]] = {}
    delete: dict[SetKey, frozenset[Element]] = {}
    for key in set(desired) | set(applied):
        d, a = desired.get(key, frozenset()), applied.get(key, frozenset())
        if d - a:
            add[key] = d - a
        if a - d:
            delete[key] = a - d
    return add, delete


def host_diff(
    desired: Mapping[str, DhcpHost], applied: Mapping[str, DhcpHost]
) -> tuple[dict[str, DhcpHost], frozenset[str]]:
    put = {m: h for m, h in desired.items() if applied.get(m) != h}
    gone = frozenset(m for m in applied if m not in desired)
    return put, gone


def plan(desired: Flat, applied: Flat) -> Plan:
    """The whole difference between what should be and what the drivers hold
    (`applied`: as observed). A rebuild rewrites every set, so it carries all
    desired elements as additions and no deletions."""
    rebuild = desired.shape != applied.shape
    if rebuild:
        add = {k: v for k, v in desired.sets.items() if v}
        delete: dict[SetKey, frozenset[Element]] = {}
    else:
        add, delete = set_diff(desired.sets, applied.sets)
    put, gone = host_diff(desired.hosts, applied.hosts)
    peers_put, peers_del = peer_diff(desired.peers, applied.peers)
    return Plan(
        rebuild=rebuild,
        add=add,
        delete=delete,
        addresses_add=desired.addresses - applied.addresses,
        addresses_del=applied.addresses - desired.addresses,
        routes_add=desired.routes - applied.routes,
        routes_del=applied.routes - desired.routes,
        dhcp_config=desired.dhcp if desired.dhcp != applied.dhcp else None,
        hosts_put=put,
        hosts_del=gone,
        peers_put=peers_put,
        peers_del=peers_del,
        killswitch=desired.killswitch if desired.killswitch != applied.killswitch else None,
        killswitch_remove=desired.killswitch is None and applied.killswitch is not None,
        uplink=desired.uplink if desired.uplink != applied.uplink else None,
        hub=desired.hub if desired.hub != applied.hub else None,
    )


def peer_diff(
    desired: Mapping[str, HubPeer], applied: Mapping[str, HubPeer]
) -> tuple[dict[str, HubPeer], frozenset[str]]:
    put = {k: p for k, p in desired.items() if applied.get(k) != p}
    return put, frozenset(k for k in applied if k not in desired)


def plan_machines(
    desired: Mapping[str, MachineState | None],
    applied: Mapping[str, MachineState | None],
    context: Iterable[MachineState] = (),
) -> Plan:
    """The difference for a few machines only (the incremental path). Almost
    every element contains its machine's MAC, so machines share none; those
    of PORT_SETS belong to a port, and machines of one port share them:
    `context` are the unchanged machines on the ports concerned, counted on
    both sides, so that the difference of the unions stays exact."""
    d_sets: dict[SetKey, set[Element]] = {}
    a_sets: dict[SetKey, set[Element]] = {}
    d_hosts: dict[str, DhcpHost] = {}
    a_hosts: dict[str, DhcpHost] = {}
    d_peers: dict[str, HubPeer] = {}
    a_peers: dict[str, HubPeer] = {}
    d_routes: set[Route] = set()
    a_routes: set[Route] = set()
    for mac in set(desired) | set(applied):
        _collect(desired.get(mac), d_sets, d_hosts, d_peers, d_routes)
        _collect(applied.get(mac), a_sets, a_hosts, a_peers, a_routes)
    for m in context:
        for key in PORT_SETS:
            d_sets.setdefault(key, set()).update(m.elements.get(key, ()))
            a_sets.setdefault(key, set()).update(m.elements.get(key, ()))
    add, delete = set_diff(
        {k: frozenset(v) for k, v in d_sets.items()}, {k: frozenset(v) for k, v in a_sets.items()}
    )
    put, gone = host_diff(d_hosts, a_hosts)
    peers_put, peers_del = peer_diff(d_peers, a_peers)
    return Plan(
        add=add,
        delete=delete,
        routes_add=frozenset(d_routes - a_routes),
        routes_del=frozenset(a_routes - d_routes),
        hosts_put=put,
        hosts_del=gone,
        peers_put=peers_put,
        peers_del=peers_del,
    )


def _collect(
    m: MachineState | None,
    sets: dict[SetKey, set[Element]],
    hosts: dict[str, DhcpHost],
    peers: dict[str, HubPeer],
    routes: set[Route],
) -> None:
    if m is None:
        return
    routes |= m.routes
    for key, elems in m.elements.items():
        sets.setdefault(key, set()).update(elems)
    if m.dhcp is not None:
        hosts[m.dhcp.mac] = m.dhcp
    if m.peer is not None:
        peers[m.peer.public_key] = m.peer


def with_machines(base: Flat, machines: Iterable[MachineState]) -> Flat:
    """`base` (a policy's state) plus every machine's elements, reservations
    and peers."""
    acc: dict[SetKey, set[Element]] = {k: set(v) for k, v in base.sets.items()}
    hosts: dict[str, DhcpHost] = dict(base.hosts)
    peers: dict[str, HubPeer] = dict(base.peers)
    routes: set[Route] = set(base.routes)
    for m in machines:
        _collect(m, acc, hosts, peers, routes)
    return replace(
        base,
        sets={k: frozenset(v) for k, v in acc.items()},
        hosts=hosts,
        peers=peers,
        routes=frozenset(routes),
    )


def flatten(policy: PolicyState, machines: Iterable[MachineState]) -> Flat:
    base = Flat(
        policy.shape,
        policy.sets,
        policy.addresses,
        policy.dhcp,
        {},
        {},
        policy.killswitch,
        policy.uplink,
        policy.hub,
        policy.routes,
    )
    return with_machines(base, machines)
