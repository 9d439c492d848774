"""nftables driver: dom0's own tables through the libnftables JSON API.

Two tables, both owned by dom0 and written whole only at start-up or after
an error, in one transaction (add, delete, add: the old table is replaced
atomically, there is never a moment without it). Everything per machine or
per policy lives in sets, so admitting a machine is a transaction of a few
element changes whose cost does not grow with the number of machines.

`bridge dom0` polices frames from the bridge's ports, statelessly: a port
sends only with the MACs bound to it, a MAC only with its bound address,
ARP included; no DHCP between ports; nothing but IPv4 and ARP; direct frames
between machines only within a domain whose members may reach each other.
Unicast frames go only to the port their MAC is bound to, which defeats FDB
poisoning. It runs on every bridge of dom0's namespace (this kernel has no
`meta ibrname` in the bridge family), so ports of other bridges, and trusted
ports, are listed in `exempt_ports`: a new port is policed until dom0 says
otherwise, which is what fail-closed means here.

`inet dom0` polices what is routed or delivered to dom0, statefully, by
address (the bridge table has already bound addresses to machines): who may
open connections to whom, who may leave through the WAN (masqueraded), and
which of dom0's services each domain may use. With br_netfilter, bridged
IPv4 crosses these chains too and meets the same policy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.core.desired import (
    BINDING,
    EGRESS,
    EXEMPT,
    ICMP,
    PEERS,
    PORT_MAC,
    REACH,
    SERVICE,
    SSH4,
    SSH6,
    Element,
    KillSwitch,
    Shape,
)
from controller.core.plan import Plan

TABLE = "dom0"
RULESET_VERSION = 2
FAMILIES = ("bridge", "inet")

# set key -> (nft type, interval?)
SET_TYPES: dict[tuple[str, str], tuple[list[str] | str, bool]] = {
    EXEMPT: ("ifname", False),
    PORT_MAC: (["ifname", "ether_addr"], False),
    BINDING: (["ifname", "ether_addr", "ipv4_addr"], False),
    PEERS: (["ipv4_addr", "ipv4_addr"], True),
    REACH: (["ipv4_addr", "ipv4_addr"], True),
    EGRESS: ("ipv4_addr", True),
    SERVICE: (["ipv4_addr", "inet_proto", "inet_service"], True),
    ICMP: ("ipv4_addr", True),
    SSH4: ("ipv4_addr", True),
    SSH6: ("ipv6_addr", True),
}

# The installer's boot firewall: dom0 takes it over, deleting it in the very
# transaction that writes dom0's own tables (which carry its host rules).
BASELINE_TABLE = "dom0_baseline"


class NftError(Exception):
    pass


# -- JSON expression helpers ---------------------------------------------------
ACCEPT: dict = {"accept": None}
DROP: dict = {"drop": None}
RETURN: dict = {"return": None}


def _match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _pl(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _cat(*items: Any) -> dict:
    return {"concat": list(items)}


def _jump(chain: str) -> dict:
    return {"jump": {"target": chain}}


def _counter() -> dict:
    return {"counter": {"packets": 0, "bytes": 0}}


UNICAST_DST = _match({"&": [_pl("ether", "daddr"), "01:00:00:00:00:00"]}, "00:00:00:00:00:00")


def shape_marker(shape: Shape) -> str:
    """The name of an empty chain recording which chains the tables hold."""
    digest = hashlib.sha256(
        json.dumps([RULESET_VERSION, shape.to_json()], sort_keys=True).encode()
    ).hexdigest()
    return f"shape_{digest[:16]}"


def _chains(shape: Shape) -> dict[str, tuple[dict | None, list[list[dict]]]]:
    """family -> chain name -> (base chain spec or None, rules)."""
    bridge = shape.bridge
    b: dict[str, tuple[dict | None, list[list[dict]]]] = {}
    b["police_source"] = (
        None,
        [
            [_match(_cat(_meta("iifname"), _pl("ether", "saddr")), "@port_mac", "!="), DROP],
            [
                _match(_pl("ether", "type"), "arp"),
                _match(_pl("arp", "saddr ip"), "0.0.0.0"),
                _match(_cat(_meta("iifname"), _pl("arp", "saddr ether")), "@port_mac"),
                RETURN,
            ],
            [
                _match(_pl("ether", "type"), "arp"),
                _match(
                    _cat(_meta("iifname"), _pl("arp", "saddr ether"), _pl("arp", "saddr ip")),
                    "@binding",
                    "!=",
                ),
                DROP,
            ],
            [
                _match(_pl("ether", "type"), "ip"),
                _match(
                    _cat(_meta("iifname"), _pl("ether", "saddr"), _pl("ip", "saddr")),
                    "@binding",
                    "!=",
                ),
                DROP,
            ],
            [_match(_pl("ether", "type"), {"set": ["ip", "arp"]}, "!="), _counter(), DROP],
        ],
    )
    b["ports_forward"] = (
        {"type": "filter", "hook": "forward", "prio": -200, "policy": "accept"},
        [
            [_match(_meta("iifname"), "@exempt_ports"), ACCEPT],
            [_jump("police_source")],
            [
                _match(_meta("oifname"), "@exempt_ports", "!="),
                UNICAST_DST,
                _match(_cat(_meta("oifname"), _pl("ether", "daddr")), "@port_mac", "!="),
                _counter(),
                DROP,
            ],
            [
                _match(_pl("ether", "type"), "arp"),
                _match(_pl("arp", "saddr ip"), "0.0.0.0"),
                ACCEPT,
            ],
            [
                _match(_pl("ether", "type"), "arp"),
                _match(_cat(_pl("arp", "saddr ip"), _pl("arp", "daddr ip")), "@peers"),
                ACCEPT,
            ],
            [
                _match(_pl("ether", "type"), "ip"),
                _match(_pl("udp", "dport"), {"set": [67, 68]}),
                _counter(),
                DROP,
            ],
            [
                _match(_pl("ether", "type"), "ip"),
                _match(_cat(_pl("ip", "saddr"), _pl("ip", "daddr")), "@peers"),
                ACCEPT,
            ],
            [_counter(), DROP],
        ],
    )
    b["ports_input"] = (
        {"type": "filter", "hook": "input", "prio": -200, "policy": "accept"},
        [
            [_match(_meta("iifname"), "@exempt_ports"), ACCEPT],
            [
                _match(_cat(_meta("iifname"), _pl("ether", "saddr")), "@port_mac", "!="),
                _counter(),
                DROP,
            ],
            # A known machine may always talk DHCP to dom0, even from an
            # address it no longer holds: that is how it learns its new one.
            [
                _match(_pl("ether", "type"), "ip"),
                _match(_pl("udp", "sport"), 68),
                _match(_pl("udp", "dport"), 67),
                ACCEPT,
            ],
            [_jump("police_source")],
        ],
    )
    b["ports_output"] = (
        {"type": "filter", "hook": "output", "prio": -200, "policy": "accept"},
        [
            [_match(_meta("oifname"), "@exempt_ports"), ACCEPT],
            [
                UNICAST_DST,
                _match(_cat(_meta("oifname"), _pl("ether", "daddr")), "@port_mac", "!="),
                _counter(),
                DROP,
            ],
        ],
    )

    i: dict[str, tuple[dict | None, list[list[dict]]]] = {}
    established = _match({"ct": {"key": "state"}}, {"set": ["established", "related"]})
    # Machines arrive on the bridge, and (hub domains) through the hub's tunnels.
    machine_ifs: Any = bridge if shape.hub is None else {"set": [bridge, shape.hub]}
    egress = shape.egress
    from_machines: list[list[dict]] = [
        [established, ACCEPT],
        [
            _match(_meta("nfproto"), "ipv4"),
            _match(_cat(_pl("ip", "saddr"), _pl("ip", "daddr")), "@reach"),
            ACCEPT,
        ],
    ]
    if egress:
        from_machines.append(
            [_match(_meta("oifname"), egress), _match(_pl("ip", "saddr"), "@egress"), ACCEPT]
        )
    from_machines.append([_counter(), DROP])
    i["from_machines"] = (None, from_machines)
    i["to_machines"] = (None, [[established, ACCEPT], [_counter(), DROP]])
    i["forward"] = (
        {"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
        [
            [_match(_meta("iifname"), machine_ifs), _jump("from_machines")],
            [_match(_meta("oifname"), machine_ifs), _jump("to_machines")],
            # dom0 forwards for its machines only
            [_counter(), DROP],
        ],
    )
    to_host: list[list[dict]] = [
        [established, ACCEPT],
        [_match(_pl("udp", "sport"), 68), _match(_pl("udp", "dport"), 67), ACCEPT],
    ]
    if shape.hub and shape.underlay and shape.hub_port:
        # a hub machine's bridge address may only dial the hub
        net, length = shape.underlay.split("/")
        to_host.append(
            [
                _match(_meta("iifname"), bridge),
                _match(_pl("ip", "saddr"), {"prefix": {"addr": net, "len": int(length)}}),
                _match(_pl("udp", "dport"), shape.hub_port),
                ACCEPT,
            ]
        )
    to_host += [
        [
            _match(_cat(_pl("ip", "saddr"), _meta("l4proto"), _pl("th", "dport")), "@services"),
            ACCEPT,
        ],
        [
            _match(_pl("icmp", "type"), "echo-request"),
            _match(_pl("ip", "saddr"), "@icmp"),
            ACCEPT,
        ],
        [_counter(), DROP],
    ]
    i["to_host"] = (None, to_host)
    i["host_in"] = (None, _host_in(shape))
    i["input"] = (
        {"type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
        [
            [_match(_meta("iifname"), "lo"), ACCEPT],
            [_match(_meta("iifname"), machine_ifs), _jump("to_host")],
            [_jump("host_in")],
        ],
    )
    if egress:
        i["postrouting"] = (
            {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
            [
                [
                    _match(_meta("oifname"), egress),
                    _match(_pl("ip", "saddr"), "@egress"),
                    {"masquerade": None},
                ]
            ],
        )
    return {"bridge": b, "inet": i}


KILLSWITCH_TABLE = "dom0_wan"

# What `wan.allow` lets through the kill switch, out and in.
_WAN_ALLOW_OUT: dict[str, list[dict]] = {
    "dhcp": [_match(_pl("udp", "sport"), 68), _match(_pl("udp", "dport"), 67)],
    "dhcpv6": [_match(_pl("udp", "sport"), 546), _match(_pl("udp", "dport"), 547)],
    "ndp": [
        _match(
            _pl("icmpv6", "type"),
            {"set": ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]},
        )
    ],
}
_WAN_ALLOW_IN: dict[str, list[dict]] = {
    "dhcp": [_match(_pl("udp", "sport"), 67), _match(_pl("udp", "dport"), 68)],
    "dhcpv6": [_match(_pl("udp", "sport"), 547), _match(_pl("udp", "dport"), 546)],
    "ndp": [
        _match(
            _pl("icmpv6", "type"),
            {"set": ["nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert"]},
        )
    ],
}


def killswitch_marker(ks: KillSwitch) -> str:
    digest = hashlib.sha256(
        json.dumps([RULESET_VERSION, ks.to_json()], sort_keys=True).encode()
    ).hexdigest()
    return f"ks_{digest[:16]}"


def killswitch_chains(ks: KillSwitch) -> dict[str, tuple[dict | None, list[list[dict]]]]:
    """Only the tunnel's own UDP (marked with its fwmark) to the endpoint
    leaves the WAN, plus what `wan.allow` names; only replies and the same
    allowances come in; nothing is forwarded in from it. IPv6 included: what
    is not allowed is dropped whatever the family."""
    family = "ip6" if ":" in ks.endpoint_host else "ip"
    out: list[list[dict]] = [
        [
            _match(_meta("mark"), ks.fwmark),
            _match(_pl(family, "daddr"), ks.endpoint_host),
            _match(_pl("udp", "dport"), ks.endpoint_port),
            ACCEPT,
        ]
    ]
    inbound: list[list[dict]] = [
        [_match({"ct": {"key": "state"}}, {"set": ["established", "related"]}), ACCEPT]
    ]
    for name in ks.allow:
        out.append([*_WAN_ALLOW_OUT[name], ACCEPT])
        inbound.append([*_WAN_ALLOW_IN[name], ACCEPT])
    for family in ("ip", "ip6"):
        sources = [_prefix(c) for c in ks.ssh_from if (":" in c) == (family == "ip6")]
        if sources:
            inbound.append(
                [
                    _match(_pl(family, "saddr"), {"set": sources}),
                    _match(_pl("tcp", "dport"), ks.ssh_port),
                    ACCEPT,
                ]
            )
    if ks.ssh_from:
        # answers to what came in (and only that: dom0's own connections out
        # are the original direction, and stay dropped)
        out.append(
            [
                _match({"ct": {"key": "direction"}}, "reply"),
                _match({"ct": {"key": "state"}}, "established"),
                ACCEPT,
            ]
        )
    out.append([_counter(), DROP])
    inbound.append([_counter(), DROP])
    return {
        "wan_out": (None, out),
        "wan_in": (None, inbound),
        "leaving": (
            # after NAT: what really leaves, whoever sent it (dom0 or forwarded)
            {"type": "filter", "hook": "postrouting", "prio": 300, "policy": "accept"},
            [[_match(_meta("oifname"), ks.wan), _jump("wan_out")]],
        ),
        "arriving": (
            {"type": "filter", "hook": "input", "prio": -10, "policy": "accept"},
            [[_match(_meta("iifname"), ks.wan), _jump("wan_in")]],
        ),
        "passing": (
            {"type": "filter", "hook": "forward", "prio": -10, "policy": "accept"},
            [
                [
                    _match(_meta("iifname"), ks.wan),
                    _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}, "!="),
                    _counter(),
                    DROP,
                ]
            ],
        ),
    }


def _prefix(cidr: str) -> dict:
    addr, length = cidr.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def killswitch_commands(ks: KillSwitch) -> list[dict]:
    table = {"family": "inet", "name": KILLSWITCH_TABLE}
    cmds: list[dict] = [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    cmds.append(
        {
            "add": {
                "chain": {
                    "family": "inet",
                    "table": KILLSWITCH_TABLE,
                    "name": killswitch_marker(ks),
                }
            }
        }
    )
    chains = killswitch_chains(ks)
    for name, (base, _rules) in chains.items():
        spec: dict[str, Any] = {"family": "inet", "table": KILLSWITCH_TABLE, "name": name}
        if base:
            spec.update(base)
        cmds.append({"add": {"chain": spec}})
    for name, (_base, rules) in chains.items():
        for expr in rules:
            cmds.append(
                {
                    "add": {
                        "rule": {
                            "family": "inet",
                            "table": KILLSWITCH_TABLE,
                            "chain": name,
                            "expr": expr,
                        }
                    }
                }
            )
    return cmds


_ICMP_ERRORS = ["destination-unreachable", "time-exceeded", "parameter-problem"]
_ICMPV6_NEEDED = [
    "destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem",
    "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert", "mld-listener-query",
]  # fmt: skip


def _host_in(shape: Shape) -> list[list[dict]]:
    """dom0's own input from everything but its machines (the WAN, the
    uplink, a management interface): what the installer's boot baseline
    allowed, and nothing else."""
    established = _match({"ct": {"key": "state"}}, {"set": ["established", "related"]})
    rules: list[list[dict]] = [
        [established, ACCEPT],
        [_match({"ct": {"key": "state"}}, "invalid"), DROP],
        [_match(_pl("icmp", "type"), {"set": _ICMP_ERRORS}), ACCEPT],
        [_match(_pl("icmpv6", "type"), {"set": _ICMPV6_NEEDED}), ACCEPT],
    ]
    if shape.ping:
        rules.append([_match(_pl("icmp", "type"), "echo-request"), ACCEPT])
        rules.append([_match(_pl("icmpv6", "type"), "echo-request"), ACCEPT])
    if shape.dhcp_client:
        rules.append([_match(_pl("udp", "sport"), 67), _match(_pl("udp", "dport"), 68), ACCEPT])
        rules.append(
            [
                _match(_pl("ip6", "saddr"), {"prefix": {"addr": "fe80::", "len": 10}}),
                _match(_pl("udp", "sport"), 547),
                _match(_pl("udp", "dport"), 546),
                ACCEPT,
            ]
        )
    rules.append(
        [_match(_pl("ip", "saddr"), "@ssh4"), _match(_pl("tcp", "dport"), shape.ssh_port), ACCEPT]
    )
    rules.append(
        [_match(_pl("ip6", "saddr"), "@ssh6"), _match(_pl("tcp", "dport"), shape.ssh_port), ACCEPT]
    )
    rules.append([_counter(), DROP])
    return rules


def elem_json(key: tuple[str, str], element: Element) -> Any:
    types, _interval = SET_TYPES[key]
    types = types if isinstance(types, list) else [types]
    parts = [_value_json(t, v) for t, v in zip(types, element, strict=True)]
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _value_json(nft_type: str, value: str) -> Any:
    if nft_type == "inet_service":
        return int(value)
    if nft_type in ("ipv4_addr", "ipv6_addr") and "/" in value:
        addr, length = value.split("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    return value


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            lo, hi = value["range"]
            return f"{_value_text(lo)}-{_value_text(hi)}"
        if "elem" in value:
            return _value_text(value["elem"]["val"])
    return str(value).lower() if isinstance(value, str) else str(value)


def elem_from_json(value: Any) -> Element:
    if isinstance(value, dict) and "elem" in value:
        value = value["elem"]["val"]
    if isinstance(value, dict) and "concat" in value:
        return tuple(_value_text(v) for v in value["concat"])
    return (_value_text(value),)


def ruleset_commands(shape: Shape, sets: Mapping[tuple[str, str], Iterable[Element]]) -> list[dict]:
    """The whole of dom0's tables, for one atomic transaction."""
    baseline = {"family": "inet", "name": BASELINE_TABLE}
    cmds: list[dict] = [{"add": {"table": baseline}}, {"delete": {"table": baseline}}]
    chains = _chains(shape)
    for family in FAMILIES:
        table = {"family": family, "name": TABLE}
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
        for (fam, name), (nft_type, interval) in SET_TYPES.items():
            if fam != family:
                continue
            spec: dict[str, Any] = {
                "family": family,
                "table": TABLE,
                "name": name,
                "type": nft_type,
            }
            if interval:
                spec["flags"] = ["interval"]
            cmds.append({"add": {"set": spec}})
        cmds.append(
            {"add": {"chain": {"family": family, "table": TABLE, "name": shape_marker(shape)}}}
        )
        for name, (base, _rules) in chains[family].items():
            spec = {"family": family, "table": TABLE, "name": name}
            if base:
                spec.update(base)
            cmds.append({"add": {"chain": spec}})
        for name, (_base, rules) in chains[family].items():
            for expr in rules:
                cmds.append(
                    {
                        "add": {
                            "rule": {"family": family, "table": TABLE, "chain": name, "expr": expr}
                        }
                    }
                )
    for key, elements in sets.items():
        elems = [elem_json(key, e) for e in elements]
        if elems:
            cmds.append({"add": {"element": _set_ref(key, elems)}})
    return cmds


def _set_ref(key: tuple[str, str], elems: list) -> dict:
    return {"family": key[0], "table": TABLE, "name": key[1], "elem": elems}


def element_commands(plan: Plan) -> list[dict]:
    cmds = []
    for key, elements in plan.delete.items():
        if elements:
            cmds.append(
                {"delete": {"element": _set_ref(key, [elem_json(key, e) for e in elements])}}
            )
    for key, elements in plan.add.items():
        if elements:
            cmds.append({"add": {"element": _set_ref(key, [elem_json(key, e) for e in elements])}})
    return cmds


@dataclass(frozen=True, slots=True)
class KernelState:
    shape_matches: bool  # both tables present, chains as `shape` says, no boot baseline
    sets: dict[tuple[str, str], frozenset[Element]]


class Nft:
    """One libnftables context, bound to the network namespace it is created
    in; used from one thread at a time."""

    def __init__(self) -> None:
        import nftables  # Debian's python3-nftables; imported late: only the controller needs it

        self.ctx = nftables.Nftables()
        self.ctx.set_json_output(True)
        self.ctx.set_handle_output(False)

    def _run(self, cmds: list[dict]) -> dict:
        if not cmds:
            return {}
        rc, out, err = self.ctx.json_cmd({"nftables": cmds})
        if rc != 0:
            raise NftError((err or "nftables refused the transaction").strip().splitlines()[0])
        return out or {}

    def rebuild(self, shape: Shape, sets: Mapping[tuple[str, str], Iterable[Element]]) -> None:
        self._run(ruleset_commands(shape, sets))

    def apply(self, plan: Plan) -> None:
        """Element changes only, in one transaction (all or nothing)."""
        self._run(element_commands(plan))

    def read(self, shape: Shape) -> KernelState:
        """What the kernel holds now in dom0's tables."""
        sets: dict[tuple[str, str], frozenset[Element]] = {}
        ok = True
        marker = shape_marker(shape)
        expected = _chains(shape)
        for family in FAMILIES:
            rc, out, _err = self.ctx.cmd(f"list table {family} {TABLE}")
            if rc != 0:
                ok = False
                continue
            chains: set[str] = set()
            rules: dict[str, int] = {}
            for obj in json.loads(out)["nftables"]:
                if "set" in obj:
                    s = obj["set"]
                    sets[(family, s["name"])] = frozenset(
                        elem_from_json(e) for e in s.get("elem", [])
                    )
                elif "chain" in obj:
                    chains.add(obj["chain"]["name"])
                elif "rule" in obj:
                    chain = obj["rule"]["chain"]
                    rules[chain] = rules.get(chain, 0) + 1
            want = expected[family]
            if chains != {*want, marker} or any(
                rules.get(n, 0) != len(r) for n, (_b, r) in want.items()
            ):
                ok = False
        if set(sets) != set(SET_TYPES):
            ok = False
        rc, _out, _err = self.ctx.cmd(f"list table inet {BASELINE_TABLE}")
        if rc == 0:
            ok = False  # the boot baseline is (back): the next write takes it over
        return KernelState(ok, sets)

    def killswitch_matches(self, ks: KillSwitch) -> bool:
        """Whether the kernel holds exactly this kill switch."""
        rc, out, _err = self.ctx.cmd(f"list table inet {KILLSWITCH_TABLE}")
        if rc != 0:
            return False
        chains: set[str] = set()
        rules: dict[str, int] = {}
        for obj in json.loads(out)["nftables"]:
            if "chain" in obj:
                chains.add(obj["chain"]["name"])
            elif "rule" in obj:
                rules[obj["rule"]["chain"]] = rules.get(obj["rule"]["chain"], 0) + 1
        want = killswitch_chains(ks)
        return chains == {*want, killswitch_marker(ks)} and all(
            rules.get(n, 0) == len(r) for n, (_b, r) in want.items()
        )

    def write_killswitch(self, ks: KillSwitch) -> None:
        """Replace the kill switch table atomically (never a moment without it)."""
        self._run(killswitch_commands(ks))

    def delete_killswitch(self) -> None:
        table = {"family": "inet", "name": KILLSWITCH_TABLE}
        self._run([{"add": {"table": table}}, {"delete": {"table": table}}])

    def delete_tables(self) -> None:
        """Remove dom0's tables (tests and `lab down` only: the controller
        leaves them in place when it stops, that is the point)."""
        cmds = []
        for family in FAMILIES:
            table = {"family": family, "name": TABLE}
            cmds += [{"add": {"table": table}}, {"delete": {"table": table}}]
        self._run(cmds)
