"""The plan: desired minus applied, as data that drivers carry out and that
`dom0 plan` prints. Pure functions only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from controller.core.desired import (
    ALL_SETS,
    DhcpConfig,
    DhcpHost,
    Element,
    MachineState,
    Shape,
)

SetKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Flat:
    """A whole data plane state, desired or applied, flattened."""

    shape: Shape | None
    sets: Mapping[SetKey, frozenset[Element]]
    addresses: frozenset[str]
    dhcp: DhcpConfig | None
    hosts: Mapping[str, DhcpHost]  # by MAC


EMPTY = Flat(None, {}, frozenset(), None, {})


@dataclass(frozen=True, slots=True)
class Plan:
    rebuild: bool = False  # the chains change: write dom0's tables whole
    add: Mapping[SetKey, frozenset[Element]] = field(default_factory=dict)
    delete: Mapping[SetKey, frozenset[Element]] = field(default_factory=dict)
    addresses_add: frozenset[str] = frozenset()
    addresses_del: frozenset[str] = frozenset()
    dhcp_config: DhcpConfig | None = None  # set when dnsmasq must (re)start
    hosts_put: Mapping[str, DhcpHost] = field(default_factory=dict)
    hosts_del: frozenset[str] = frozenset()
    hosts_changed: bool = False  # a reservation was removed or rewritten: dnsmasq must re-read

    @property
    def empty(self) -> bool:
        return not (
            self.rebuild
            or any(self.add.values())
            or any(self.delete.values())
            or self.addresses_add
            or self.addresses_del
            or self.dhcp_config
            or self.hosts_put
            or self.hosts_del
        )

    def lines(self) -> list[str]:
        """Human-readable, one change per line, stable order."""
        out: list[str] = []
        if self.rebuild:
            out.append("nftables: rebuild dom0's tables (chains changed or absent)")
        for key in ALL_SETS:
            for e in sorted(self.delete.get(key, ())):
                out.append(f"nftables: delete {key[0]} dom0 {key[1]} {{ {' . '.join(e)} }}")
            for e in sorted(self.add.get(key, ())):
                out.append(f"nftables: add {key[0]} dom0 {key[1]} {{ {' . '.join(e)} }}")
        for a in sorted(self.addresses_del):
            out.append(f"address: delete {a}")
        for a in sorted(self.addresses_add):
            out.append(f"address: add {a}")
        if self.dhcp_config is not None:
            ranges = ", ".join(str(r.network) for r in self.dhcp_config.ranges)
            out.append(f"dhcp: (re)start dnsmasq on {self.dhcp_config.bridge} for {ranges}")
        for mac in sorted(self.hosts_del):
            out.append(f"dhcp: remove reservation {mac}")
        for mac, h in sorted(self.hosts_put.items()):
            out.append(f"dhcp: reserve {mac} -> {h.address} {h.hostname}.{h.tag}")
        return out

    def to_json(self) -> dict:
        def sets(m: Mapping[SetKey, frozenset[Element]]) -> dict:
            return {f"{k[0]}/{k[1]}": sorted(list(e) for e in v) for k, v in m.items() if v}

        return {
            "rebuild": self.rebuild,
            "add": sets(self.add),
            "delete": sets(self.delete),
            "addresses_add": sorted(self.addresses_add),
            "addresses_del": sorted(self.addresses_del),
            "dhcp_restart": self.dhcp_config is not None,
            "hosts_put": {
                m: {"address": h.address, "hostname": h.hostname, "domain": h.tag}
                for m, h in sorted(self.hosts_put.items())
            },
            "hosts_del": sorted(self.hosts_del),
        }


def _set_diff(
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


def _host_diff(
    desired: Mapping[str, DhcpHost], applied: Mapping[str, DhcpHost]
) -> tuple[dict[str, DhcpHost], frozenset[str], bool]:
    put = {m: h for m, h in desired.items() if applied.get(m) != h}
    gone = frozenset(m for m in applied if m not in desired)
    rewritten = any(m in applied for m in put)
    return put, gone, bool(gone) or rewritten


def plan(desired: Flat, applied: Flat) -> Plan:
    """The whole difference. A rebuild rewrites every set, so it carries all
    desired elements as additions and no deletions."""
    rebuild = desired.shape != applied.shape
    if rebuild:
        add = {k: v for k, v in desired.sets.items() if v}
        delete: dict[SetKey, frozenset[Element]] = {}
    else:
        add, delete = _set_diff(desired.sets, applied.sets)
    put, gone, changed = _host_diff(desired.hosts, applied.hosts)
    return Plan(
        rebuild=rebuild,
        add=add,
        delete=delete,
        addresses_add=desired.addresses - applied.addresses,
        addresses_del=applied.addresses - desired.addresses,
        dhcp_config=desired.dhcp if desired.dhcp != applied.dhcp else None,
        hosts_put=put,
        hosts_del=gone,
        hosts_changed=changed,
    )


def plan_machines(
    desired: Mapping[str, MachineState | None], applied: Mapping[str, MachineState | None]
) -> Plan:
    """The difference for a few machines only (the incremental path). Each
    machine's elements contain its MAC, so machines never share an element
    and a per-machine difference is exact."""
    d_sets: dict[SetKey, set[Element]] = {}
    a_sets: dict[SetKey, set[Element]] = {}
    d_hosts: dict[str, DhcpHost] = {}
    a_hosts: dict[str, DhcpHost] = {}
    for mac in set(desired) | set(applied):
        _collect(desired.get(mac), d_sets, d_hosts)
        _collect(applied.get(mac), a_sets, a_hosts)
    add, delete = _set_diff(
        {k: frozenset(v) for k, v in d_sets.items()}, {k: frozenset(v) for k, v in a_sets.items()}
    )
    put, gone, changed = _host_diff(d_hosts, a_hosts)
    return Plan(add=add, delete=delete, hosts_put=put, hosts_del=gone, hosts_changed=changed)


def _collect(
    m: MachineState | None, sets: dict[SetKey, set[Element]], hosts: dict[str, DhcpHost]
) -> None:
    if m is None:
        return
    for key, elems in m.elements.items():
        sets.setdefault(key, set()).update(elems)
    if m.dhcp is not None:
        hosts[m.dhcp.mac] = m.dhcp


def flatten(
    shape: Shape,
    policy_sets: Mapping[SetKey, frozenset[Element]],
    addresses: frozenset[str],
    dhcp: DhcpConfig,
    machines: Iterable[MachineState],
) -> Flat:
    acc: dict[SetKey, set[Element]] = {k: set(v) for k, v in policy_sets.items()}
    hosts: dict[str, DhcpHost] = {}
    for m in machines:
        _collect(m, acc, hosts)
    return Flat(shape, {k: frozenset(v) for k, v in acc.items()}, addresses, dhcp, hosts)
