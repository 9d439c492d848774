"""dom0's nftables tables as plain data (pure: no I/O, no libnftables).

Two tables, both dom0's own, plus the kill switch's (`inet dom0_wan`).
Everything per machine or per policy lives in sets, so admitting a machine
is a few element changes whatever the policy says; the chains change only
with the `Shape` (a reload that changes interfaces or limits).

`bridge dom0` polices frames from the bridge's ports, statelessly, before the
bridge learns or forwards anything (see docs/security.md for what each rule
stops):

- `ingress` (prerouting, before FDB learning): a frame with the MAC of a
  machine admitted on another port is dropped before the bridge can learn
  it there (FDB poisoning would cut that machine off); frames from MACs that
  hold no admission are rate-limited per port, so a MAC flood teaches the
  bridge (and the controller) only a trickle; broadcast and multicast are
  rate-limited per port.
- `police_source`: a port sends only with the MACs bound to it, a MAC only
  with its bound address, ARP included; nothing but IPv4 and ARP.
- `ports_forward` (port to port): a unicast frame only to the port its MAC is
  bound to (FDB poisoning teaches nothing); ARP probes never cross ports;
  no DHCP between ports; IPv4 and ARP only between addresses that may talk
  directly (`peers`) *and* only out of the port that holds the destination
  address (`port_addr`), or, for a domain's broadcast, out of the ports of
  that domain (`port_bcast`): the output port is checked, not just the
  address pair, so neither a forged destination MAC nor a broadcast carries a
  frame into another domain. An ARP request reaches only the port holding
  the address it asks for.
- `ports_input` (port to dom0): nothing from unknown MACs; a DHCP client
  message to dom0's server is checked field by field (`dhcp_request`) and may
  come from any source address (0.0.0.0, or the one a machine held before a
  move); the exception goes no further than dnsmasq. Everything else,
  UDP to port 67 elsewhere included, is policed and then decided by
  `inet dom0`.
- `ports_output` (dom0 to a port): unicast only to the bound port; a DHCP
  reply only to the port of the machine it is for (broadcast ones included).

The bridge family of this kernel has no `meta ibrname`, so these chains see
every bridge of the namespace; ports of other bridges, and trusted ports,
are listed in `exempt_ports`: a port dom0 has never heard of is policed.

`inet dom0` polices what is routed or delivered to dom0, statefully, by
address (the bridge table has bound addresses to machines): strict
reverse-path filtering for the machines' interfaces; who may open
connections to whom; ICMP errors accepted as related only when they concern
a flow of the machine that sends them; per-machine connection and
new-connection limits; who may leave through the WAN (masqueraded); which
of dom0's services each domain may use, on its own gateway only. Everything
else a machine sends to dom0 is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from controller.core.desired import (
    BINDING,
    BINDING6,
    BINDING_NET,
    DHCP_CLIENT,
    DHCP_REPLY,
    DHCP_SERVER,
    EGRESS,
    EGRESS6,
    EXEMPT,
    GROUP6_PREFIX,
    GROUP_PREFIX,
    ICMP,
    ICMP6,
    MACS,
    NAT_OUT,
    NAT_OUT6,
    ND_LLADDR,
    ND_TARGET,
    PEERS,
    PORT_ADDR,
    PORT_BCAST,
    PORT_MAC,
    REACH,
    REACH6,
    SELF4,
    SELF6,
    SERVICE,
    SERVICE6,
    SSH4,
    SSH6,
    AllowRule,
    Forward,
    KillSwitch,
    Shape,
)

TABLE = "dom0"
RULESET_VERSION = 4
FAMILIES = ("bridge", "inet")
KILLSWITCH_TABLE = "dom0_wan"
# The installer's boot firewall: dom0 takes it over, deleting it in the very
# transaction that writes dom0's own tables (which carry its host rules).
BASELINE_TABLE = "dom0_baseline"

# Where a DHCP message's fields are, in bits from the start of the UDP header
# (RFC 2131: op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr,
# giaddr, chaddr).
_BOOTP = 64
OP = (_BOOTP, 8)
HTYPE_HLEN = (_BOOTP + 8, 16)
GIADDR = (_BOOTP + 24 * 8, 32)
CHADDR = (_BOOTP + 28 * 8, 48)
# A neighbour advertisement's target address (RFC 4861 4.4: after type, code,
# checksum and 32 bits of flags); nft 1.0.6 has no name for it.
NA_TARGET = (64, 128)
NA_TARGET_PREFIX = (64, 64)  # its first 64 bits: fe80:: for a link-local one
LINK_LOCAL_PREFIX = 0xFE80000000000000
# The first option of a neighbour solicitation or advertisement (after the
# target) and of a router solicitation (after 32 reserved bits): its type,
# and the link-layer address it carries (RFC 4861 4.6.1).
ND_OPTION_TYPE = (192, 8)
ND_OPTION_MAC = (208, 48)
RS_OPTION_TYPE = (64, 8)
RS_OPTION_MAC = (80, 48)
SOURCE_LLADDR, TARGET_LLADDR = 1, 2


@dataclass(frozen=True, slots=True)
class SetSpec:
    """A set dom0 fills. `kinds` name each component: nft types, and
    `chaddr` (48 raw bits of a DHCP packet, compared with a MAC). Sets with
    a raw component are declared with `typeof` (nft cannot name their type)."""

    family: str
    name: str
    kinds: tuple[str, ...]
    interval: bool = False
    typeof: str | None = None


@dataclass(frozen=True, slots=True)
class Meter:
    """A set the kernel fills from the packet path (a per-port or
    per-machine rate or connection count); dom0 never writes its elements."""

    family: str
    name: str
    kind: str
    timeout: int | None = None  # seconds; None: elements stay while counted
    size: int = 65535


MDNS_GROUP = "224.0.0.251"  # (controller/sources/advertise.py answers there)
MDNS_PORT = 5353

SETS: dict[tuple[str, str], SetSpec] = {
    (s.family, s.name): s
    for s in (
        SetSpec("bridge", EXEMPT[1], ("ifname",)),
        SetSpec("bridge", PORT_MAC[1], ("ifname", "ether_addr")),
        SetSpec("bridge", MACS[1], ("ether_addr",)),
        SetSpec("bridge", BINDING[1], ("ifname", "ether_addr", "ipv4_addr")),
        SetSpec("bridge", BINDING_NET[1], ("ifname", "ether_addr", "ipv4_addr"), interval=True),
        SetSpec(
            "bridge",
            DHCP_CLIENT[1],
            ("ifname", "ether_addr", "chaddr"),
            typeof=f"meta iifname . ether saddr . @th,{CHADDR[0]},{CHADDR[1]}",
        ),
        SetSpec(
            "bridge",
            DHCP_REPLY[1],
            ("ifname", "chaddr"),
            typeof=f"meta oifname . @th,{CHADDR[0]},{CHADDR[1]}",
        ),
        SetSpec("bridge", PORT_ADDR[1], ("ifname", "ipv4_addr")),
        SetSpec("bridge", PORT_BCAST[1], ("ifname", "ipv4_addr")),
        SetSpec("bridge", PEERS[1], ("ipv4_addr", "ipv4_addr"), interval=True),
        SetSpec("bridge", DHCP_SERVER[1], ("ipv4_addr",)),
        SetSpec("inet", REACH[1], ("ipv4_addr", "ipv4_addr"), interval=True),
        SetSpec("inet", EGRESS[1], ("ipv4_addr",), interval=True),
        SetSpec(
            "inet",
            SERVICE[1],
            ("ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"),
            interval=True,
        ),
        SetSpec("inet", ICMP[1], ("ipv4_addr", "ipv4_addr"), interval=True),
        SetSpec("inet", SELF4[1], ("ipv4_addr", "ipv4_addr")),
        SetSpec("inet", SSH4[1], ("ipv4_addr",), interval=True),
        SetSpec("inet", SSH6[1], ("ipv6_addr",), interval=True),
        SetSpec("inet", NAT_OUT[1], ("ipv4_addr",), interval=True),
        SetSpec("bridge", BINDING6[1], ("ifname", "ether_addr", "ipv6_addr")),
        SetSpec(
            "bridge",
            ND_TARGET[1],
            ("ifname", "nd_target"),
            typeof=f"meta iifname . @th,{NA_TARGET[0]},{NA_TARGET[1]}",
        ),
        SetSpec(
            "bridge",
            ND_LLADDR[1],
            ("ifname", "chaddr"),
            typeof=f"meta iifname . @th,{ND_OPTION_MAC[0]},{ND_OPTION_MAC[1]}",
        ),
        SetSpec("inet", SELF6[1], ("ipv6_addr", "ipv6_addr")),
        SetSpec("inet", REACH6[1], ("ipv6_addr", "ipv6_addr"), interval=True),
        SetSpec(
            "inet",
            SERVICE6[1],
            ("ipv6_addr", "ipv6_addr", "inet_proto", "inet_service"),
            interval=True,
        ),
        SetSpec("inet", ICMP6[1], ("ipv6_addr", "ipv6_addr"), interval=True),
        SetSpec("inet", EGRESS6[1], ("ipv6_addr",), interval=True),
        SetSpec("inet", NAT_OUT6[1], ("ipv6_addr",), interval=True),
    )
}


def spec_of(key: tuple[str, str]) -> SetSpec | None:
    """The set of that name: one of SETS, or a group set of an allow list."""
    spec = SETS.get(key)
    if spec is None and key[0] == "inet" and key[1].startswith(GROUP6_PREFIX):
        return SetSpec("inet", key[1], ("ipv6_addr",))
    if spec is None and key[0] == "inet" and key[1].startswith(GROUP_PREFIX):
        return SetSpec("inet", key[1], ("ipv4_addr",))
    return spec


def set_specs(shape: Shape) -> dict[tuple[str, str], SetSpec]:
    """Every set dom0's tables hold with this shape."""
    groups = {("inet", g): spec_of(("inet", g)) for g in shape.groups}
    return {**SETS, **{k: v for k, v in groups.items() if v is not None}}


METERS: tuple[Meter, ...] = (
    Meter("bridge", "unknown_rate", "ifname", timeout=60),
    Meter("bridge", "flood_rate", "ifname", timeout=60),
    Meter("inet", "conns", "ipv4_addr"),
    Meter("inet", "new_conns", "ipv4_addr", timeout=60),
    Meter("inet", "conns6", "ipv6_addr"),
    Meter("inet", "new_conns6", "ipv6_addr", timeout=60),
)

Rule = list[dict]
Chain = tuple[dict | None, list[Rule]]  # (base chain spec or None, rules)

# -- expressions (nftables' JSON schema) -------------------------------------
ACCEPT: dict = {"accept": None}
DROP: dict = {"drop": None}
RETURN: dict = {"return": None}


def match(left: Any, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> dict:
    return {"meta": {"key": key}}


def pl(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def raw(base: str, offset: int, length: int) -> dict:
    return {"payload": {"base": base, "offset": offset, "len": length}}


def th(field: tuple[int, int]) -> dict:
    return raw("th", *field)


def cat(*items: Any) -> dict:
    return {"concat": list(items)}


def ct(key: str, direction: str | None = None) -> dict:
    return {"ct": {"key": key, "dir": direction}} if direction else {"ct": {"key": key}}


def jump(chain: str) -> dict:
    return {"jump": {"target": chain}}


def counter() -> dict:
    return {"counter": {"packets": 0, "bytes": 0}}


def prefix(cidr: str) -> dict:
    addr, length = cidr.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def over_rate(meter: str, key: Any, per_second: int) -> dict:
    """True (for the rule) once `key` exceeds per_second packets (burst twice that)."""
    return {
        "set": {
            "op": "add",
            "elem": key,
            "set": f"@{meter}",
            "stmt": [
                {
                    "limit": {
                        "rate": per_second,
                        "burst": 2 * per_second,
                        "per": "second",
                        "inv": True,
                    }
                }
            ],
        }
    }


def over_count(meter: str, key: Any, count: int) -> dict:
    """True once `key` holds more than `count` tracked connections."""
    return {
        "set": {
            "op": "add",
            "elem": key,
            "set": f"@{meter}",
            "stmt": [{"ct count": {"val": count, "inv": True}}],
        }
    }


UNICAST_DST = match({"&": [pl("ether", "daddr"), "01:00:00:00:00:00"]}, "00:00:00:00:00:00")
MULTICAST_DST = match({"&": [pl("ether", "daddr"), "01:00:00:00:00:00"]}, "01:00:00:00:00:00")
ESTABLISHED = match(ct("state"), "established", "in")
RELATED = match(ct("state"), "related", "in")
NEW = match(ct("state"), "new", "in")
IS_IP = match(pl("ether", "type"), "ip")
IS_ARP = match(pl("ether", "type"), "arp")
IS_IP6 = match(pl("ether", "type"), "ip6")


def shape_marker(shape: Shape) -> str:
    """The name of an empty chain recording which chains the tables hold."""
    digest = hashlib.sha256(
        json.dumps([RULESET_VERSION, shape.to_json()], sort_keys=True).encode()
    ).hexdigest()
    return f"shape_{digest[:16]}"


def chains(shape: Shape) -> dict[str, dict[str, Chain]]:
    """family -> chain name -> (base chain spec or None, rules)."""
    return {"bridge": _bridge(shape), "inet": _inet(shape)}


def _bridge(shape: Shape) -> dict[str, Chain]:
    limits = shape.limits
    port = meta("iifname")
    b: dict[str, Chain] = {}
    b["ingress"] = (
        # before the bridge learns the source MAC or forwards anything
        {"type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"},
        [
            [match(port, "@exempt_ports"), ACCEPT],
            [match(cat(port, pl("ether", "saddr")), "@port_mac", "!="), jump("unknown_mac")],
            [
                MULTICAST_DST,
                over_rate("flood_rate", port, limits.broadcasts_per_second),
                counter(),
                DROP,
            ],
        ],
    )
    b["unknown_mac"] = (
        None,
        [
            # another port's machine: never learned here
            [match(pl("ether", "saddr"), "@machine_macs"), counter(), DROP],
            [over_rate("unknown_rate", port, limits.unknown_frames_per_second), counter(), DROP],
        ],
    )
    b["police_source"] = (
        None,
        [
            [match(cat(port, pl("ether", "saddr")), "@port_mac", "!="), DROP],
            [
                IS_ARP,
                match(pl("arp", "saddr ip"), "0.0.0.0"),
                match(cat(port, pl("arp", "saddr ether")), "@port_mac"),
                RETURN,
            ],
            [
                IS_ARP,
                match(
                    cat(port, pl("arp", "saddr ether"), pl("arp", "saddr ip")),
                    "@binding",
                    "!=",
                ),
                DROP,
            ],
            [
                # its containers' prefix, behind it (the agent routes them)
                IS_IP,
                match(cat(port, pl("ether", "saddr"), pl("ip", "saddr")), "@binding_net"),
                RETURN,
            ],
            [
                IS_IP,
                match(cat(port, pl("ether", "saddr"), pl("ip", "saddr")), "@binding", "!="),
                DROP,
            ],
            *([[IS_IP6, jump("police6")]] if shape.ipv6 else []),
            [
                match(
                    pl("ether", "type"),
                    {"set": ["ip", "arp", "ip6"] if shape.ipv6 else ["ip", "arp"]},
                    "!=",
                ),
                counter(),
                DROP,
            ],
        ],
    )
    if shape.ipv6:
        b["police6"] = (None, _police6(port))
    out = meta("oifname")
    b["ports_forward"] = (
        {"type": "filter", "hook": "forward", "prio": -200, "policy": "accept"},
        [
            [match(port, "@exempt_ports"), ACCEPT],
            [jump("police_source")],
            [match(out, "@exempt_ports"), jump("to_exempt")],
            [
                UNICAST_DST,
                match(cat(out, pl("ether", "daddr")), "@port_mac", "!="),
                counter(),
                DROP,
            ],
            # IPv6 never crosses between ports: machines have no on-link prefix
            # (router advertisements say so), dom0 routes all of it
            *([[IS_IP6, counter(), DROP]] if shape.ipv6 else []),
            # dom0 guarantees unique addresses: probes need not reach anyone
            [IS_ARP, match(pl("arp", "saddr ip"), "0.0.0.0"), counter(), DROP],
            [
                IS_ARP,
                match(cat(pl("arp", "saddr ip"), pl("arp", "daddr ip")), "@peers"),
                match(cat(out, pl("arp", "daddr ip")), "@port_addr"),
                ACCEPT,
            ],
            [IS_IP, match(pl("udp", "dport"), {"set": [67, 68]}), counter(), DROP],
            [
                IS_IP,
                match(cat(pl("ip", "saddr"), pl("ip", "daddr")), "@peers"),
                match(cat(out, pl("ip", "daddr")), "@port_addr"),
                ACCEPT,
            ],
            [
                IS_IP,
                match(cat(pl("ip", "saddr"), pl("ip", "daddr")), "@peers"),
                match(cat(out, pl("ip", "daddr")), "@port_bcast"),
                ACCEPT,
            ],
            *_hairpin_bridged(shape, out),
            [counter(), DROP],
        ],
    )
    b["to_exempt"] = (
        # a trusted port (or another bridge's): the address pair decides
        None,
        [
            [IS_ARP, match(pl("arp", "saddr ip"), "0.0.0.0"), DROP],
            [IS_ARP, match(cat(pl("arp", "saddr ip"), pl("arp", "daddr ip")), "@peers"), ACCEPT],
            [IS_IP, match(pl("udp", "dport"), {"set": [67, 68]}), DROP],
            [IS_IP, match(cat(pl("ip", "saddr"), pl("ip", "daddr")), "@peers"), ACCEPT],
            [counter(), DROP],
        ],
    )
    b["ports_input"] = (
        {"type": "filter", "hook": "input", "prio": -200, "policy": "accept"},
        [
            [match(port, "@exempt_ports"), ACCEPT],
            [match(cat(port, pl("ether", "saddr")), "@port_mac", "!="), counter(), DROP],
            [
                IS_IP,
                match(pl("ip", "daddr"), "@dhcp_server"),
                match(meta("l4proto"), "udp"),
                match(pl("udp", "dport"), 67),
                jump("dhcp_request"),
            ],
            [jump("police_source")],
        ],
    )
    b["dhcp_request"] = (
        # A client's message to dom0's DHCP server, from any source address
        # (0.0.0.0, its own, the one it held before a move: that is how it
        # learns its new one), but only about itself.
        None,
        [
            [match(pl("udp", "sport"), 68, "!="), counter(), DROP],
            [match(th(OP), 1, "!="), counter(), DROP],  # BOOTREQUEST
            [match(th(HTYPE_HLEN), 0x0106, "!="), counter(), DROP],  # Ethernet, 6 bytes
            [match(th(GIADDR), 0, "!="), counter(), DROP],  # a client is not a relay
            [
                # chaddr is the frame's own source MAC, a machine of this port
                match(cat(port, pl("ether", "saddr"), th(CHADDR)), "@dhcp_client", "!="),
                counter(),
                DROP,
            ],
            [ACCEPT],
        ],
    )
    b["ports_output"] = (
        {"type": "filter", "hook": "output", "prio": -200, "policy": "accept"},
        [
            [match(out, "@exempt_ports"), ACCEPT],
            [
                UNICAST_DST,
                match(cat(out, pl("ether", "daddr")), "@port_mac", "!="),
                counter(),
                DROP,
            ],
            [
                IS_IP,
                match(meta("l4proto"), "udp"),
                match(pl("udp", "sport"), 67),
                match(cat(out, th(CHADDR)), "@dhcp_reply", "!="),
                counter(),
                DROP,
            ],
        ],
    )
    return b


_ND_TO_DOM0 = [
    "nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert", "mld2-listener-report",
    "mld-listener-report",
]  # fmt: skip
_ND_FROM_LINK_LOCAL = [
    "nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert", "mld2-listener-report",
    "mld-listener-report", "echo-request", "echo-reply",
]  # fmt: skip


def _police6(port: dict) -> list[Rule]:
    """IPv6 from a port (its MAC already checked): never a router's or a
    DHCPv6 server's messages; a neighbour advertisement only for a link-local
    address or the port's own; from `::` only duplicate address detection and
    MLD; from a link-local address only neighbour discovery, MLD, ping and
    the DHCPv6 client; everything else only from the machine's own address."""
    icmp6 = pl("icmpv6", "type")
    not_dad = match(pl("ip6", "saddr"), "::", "!=")
    # The link-layer address in a solicitation or advertisement is what a
    # neighbour cache believes: the first such option must name the port's
    # machine (the kernel takes the first of duplicated options).
    lladdr = [
        [match(icmp6, "nd-router-solicit"), match(th(RS_OPTION_TYPE), SOURCE_LLADDR, "!="), counter(), DROP],
        [match(icmp6, "nd-router-solicit"), match(cat(port, th(RS_OPTION_MAC)), "@nd_lladdr", "!="), counter(), DROP],
        [match(icmp6, "nd-neighbor-solicit"), not_dad, match(th(ND_OPTION_TYPE), SOURCE_LLADDR, "!="), counter(), DROP],
        [match(icmp6, "nd-neighbor-solicit"), not_dad, match(cat(port, th(ND_OPTION_MAC)), "@nd_lladdr", "!="), counter(), DROP],
        [match(icmp6, "nd-neighbor-advert"), match(th(ND_OPTION_TYPE), TARGET_LLADDR, "!="), counter(), DROP],
        [match(icmp6, "nd-neighbor-advert"), match(cat(port, th(ND_OPTION_MAC)), "@nd_lladdr", "!="), counter(), DROP],
    ]  # fmt: skip
    return [
        [match(icmp6, {"set": ["nd-router-advert", "nd-redirect"]}), counter(), DROP],
        *lladdr,
        [match(meta("l4proto"), "udp"), match(pl("udp", "sport"), 547), counter(), DROP],
        [
            match(icmp6, "nd-neighbor-advert"),
            match(th(NA_TARGET_PREFIX), LINK_LOCAL_PREFIX, "!="),
            match(cat(port, th(NA_TARGET)), "@nd_target", "!="),
            counter(),
            DROP,
        ],
        [
            match(pl("ip6", "saddr"), "::"),
            match(
                icmp6,
                {"set": ["nd-neighbor-solicit", "mld2-listener-report", "mld-listener-report"]},
            ),
            RETURN,
        ],
        [
            match(pl("ip6", "saddr"), prefix("fe80::/64")),
            match(icmp6, {"set": _ND_FROM_LINK_LOCAL}),
            RETURN,
        ],
        [
            match(pl("ip6", "saddr"), prefix("fe80::/64")),
            match(pl("ip6", "daddr"), "ff02::1:2"),
            match(pl("udp", "sport"), 546),
            match(pl("udp", "dport"), 547),
            RETURN,
        ],
        [match(cat(port, pl("ether", "saddr"), pl("ip6", "saddr")), "@binding6"), RETURN],
        [counter(), DROP],
    ]


def _hairpin_bridged(shape: Shape, out: dict) -> list[Rule]:
    """A machine's connection to a published port at its public address, and
    the answers: after destination NAT to a machine on the same bridge,
    br_netfilter bridges the frame on (it does not route it), so it crosses
    these chains between two ports of different domains. The bridge family
    cannot see conntrack here (that needs nf_conntrack_bridge), so these
    rules pass that flow's addresses and port only, out of the port holding
    the address; `inet dom0` then passes it only through dom0's NAT (`ct
    status dnat`), which br_netfilter runs it through. Without br_netfilter
    the flow is routed, never bridged, and these rules are not there."""
    if not (shape.hairpin and shape.bridge_netfilter):
        return []
    pools = {"set": [prefix(p) for p in shape.hairpin]}
    rules: list[Rule] = []
    for f in shape.forwards:
        if f.via != "uplink":
            continue
        rules.append(
            [
                IS_IP,
                match(pl("ip", "saddr"), pools),
                *_to(f.address, f.proto, f.port),
                match(cat(out, pl("ip", "daddr")), "@port_addr"),
                counter(),
                ACCEPT,
            ]
        )
        rules.append(
            [
                IS_IP,
                match(pl("ip", "saddr"), f.address),
                match(meta("l4proto"), f.proto),
                match(pl("th", "sport"), f.port),
                match(pl("ip", "daddr"), pools),
                match(cat(out, pl("ip", "daddr")), "@port_addr"),
                counter(),
                ACCEPT,
            ]
        )
    return rules


def _inet(shape: Shape) -> dict[str, Chain]:
    bridge = shape.bridge
    limits = shape.limits
    # Machines arrive on the bridge, and (hub domains) through the hub's tunnels.
    machine_ifs: Any = bridge if shape.hub is None else {"set": [bridge, shape.hub]}
    i: dict[str, Chain] = {}
    i["guard"] = (
        {"type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"},
        [
            [match(meta("iifname"), machine_ifs), match(meta("nfproto"), "ipv4"), jump("rpf")],
            *(
                [
                    [
                        match(meta("iifname"), bridge),
                        match(meta("nfproto"), "ipv6"),
                        match(pl("ip6", "saddr"), "::", "!="),  # (duplicate address detection)
                        jump("rpf"),
                    ]
                ]
                if shape.ipv6
                else []
            ),
        ],
    )
    i["rpf"] = (
        # strict reverse-path filtering: a source address only from the
        # interface its route leaves by (a second line behind the bridge's
        # bindings); DHCP clients have no address yet
        None,
        [
            [
                match(meta("iifname"), bridge),
                match(pl("udp", "sport"), 68),
                match(pl("udp", "dport"), 67),
                RETURN,
            ],
            [match({"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, False), counter(), DROP],
        ],
    )
    i["related_check"] = (
        # An ICMP error is related to the flow it quotes: accept it only from
        # an endpoint of that flow, not from whoever copied its 5-tuple.
        None,
        [
            [match(cat(pl("ip", "saddr"), ct("ip saddr", "original")), "@self4"), ACCEPT],
            [match(cat(pl("ip", "saddr"), ct("ip saddr", "reply")), "@self4"), ACCEPT],
            *(
                [
                    [match(cat(pl("ip6", "saddr"), ct("ip6 saddr", "original")), "@self6"), ACCEPT],
                    [match(cat(pl("ip6", "saddr"), ct("ip6 saddr", "reply")), "@self6"), ACCEPT],
                ]
                if shape.ipv6
                else []
            ),
            [counter(), DROP],
        ],
    )
    # a new connection from a machine: within its share of conntrack
    i["machine_limits"] = (None, _machine_limits(limits, "ip", ""))
    if shape.ipv6:
        i["machine_limits6"] = (None, _machine_limits(limits, "ip6", "6"))
        i["from_machines6"] = (
            None,
            [
                # (the bridge table drops these from ports already; the hub has no IPv6)
                [
                    match(pl("icmpv6", "type"), {"set": ["nd-router-advert", "nd-redirect"]}),
                    counter(),
                    DROP,
                ],
                [match(meta("l4proto"), "udp"), match(pl("udp", "sport"), 547), counter(), DROP],
                [NEW, jump("machine_limits6")],
                [match(cat(pl("ip6", "saddr"), pl("ip6", "daddr")), "@reach6"), ACCEPT],
                *([[jump("allow6")]] if shape.allow6 else []),
                *(
                    [
                        [
                            match(meta("oifname"), shape.egress),
                            match(pl("ip6", "saddr"), "@egress6"),
                            ACCEPT,
                        ]
                    ]
                    if shape.egress6 and shape.egress
                    else []
                ),
                [counter(), DROP],
            ],
        )
        if shape.allow6:
            i["allow6"] = (None, [_allow(r, shape.egress) for r in shape.allow6])
        i["to_host6"] = (
            None,
            [
                [match(pl("icmpv6", "type"), {"set": _ND_TO_DOM0}), ACCEPT],
                [match(pl("udp", "sport"), 546), match(pl("udp", "dport"), 547), ACCEPT],
                [NEW, jump("machine_limits6")],
                [
                    match(
                        cat(
                            pl("ip6", "saddr"),
                            pl("ip6", "daddr"),
                            meta("l4proto"),
                            pl("th", "dport"),
                        ),
                        "@services6",
                    ),
                    ACCEPT,
                ],
                [
                    match(pl("icmpv6", "type"), "echo-request"),
                    match(cat(pl("ip6", "saddr"), pl("ip6", "daddr")), "@ping6"),
                    ACCEPT,
                ],
                [counter(), DROP],
            ],
        )
        i["output"] = (
            # dom0 routes a machine's IPv6 back out of the bridge it came in on:
            # it never tells the machine to go around it (an ICMPv6 redirect)
            {"type": "filter", "hook": "output", "prio": 0, "policy": "accept"},
            [
                [
                    match(meta("oifname"), bridge),
                    match(pl("icmpv6", "type"), "nd-redirect"),
                    counter(),
                    DROP,
                ]
            ],
        )
    v6 = [[match(meta("nfproto"), "ipv6"), jump("from_machines6")]] if shape.ipv6 else []
    egress = shape.egress
    from_machines: list[Rule] = [
        [ESTABLISHED, ACCEPT],
        [RELATED, jump("related_check")],
        *v6,
        [match(meta("nfproto"), "ipv4", "!="), counter(), DROP],
        # a machine is never a DHCP server, for anyone
        [match(meta("l4proto"), "udp"), match(pl("udp", "sport"), 67), counter(), DROP],
        [match(meta("l4proto"), "udp"), match(pl("udp", "dport"), 68), counter(), DROP],
        [NEW, jump("machine_limits")],
        [match(cat(pl("ip", "saddr"), pl("ip", "daddr")), "@reach"), ACCEPT],
    ]
    if shape.allow:
        from_machines.append([jump("allow")])
        i["allow"] = (None, [_allow(r, egress) for r in shape.allow])
    for f in shape.forwards:
        if f.via == "uplink" and shape.hairpin:
            # a machine to a published port at its public address (hairpin)
            from_machines.append(
                [
                    match(ct("status"), "dnat"),
                    match(pl("ip", "saddr"), {"set": [prefix(p) for p in shape.hairpin]}),
                    *_to(f.address, f.proto, f.port),
                    counter(),
                    ACCEPT,
                ]
            )
    if egress:
        from_machines.append(
            [match(meta("oifname"), egress), match(pl("ip", "saddr"), "@egress"), ACCEPT]
        )
    from_machines.append([counter(), DROP])
    i["from_machines"] = (None, from_machines)
    i["to_machines"] = (
        None,
        [
            [match(ct("state"), {"set": ["established", "related"]}, "in"), ACCEPT],
            # a published port, through the destination NAT of `publish` only
            *(
                [match(ct("status"), "dnat"), *_to(f.address, f.proto, f.port), counter(), ACCEPT]
                for f in shape.forwards
            ),
            [counter(), DROP],
        ],
    )
    if shape.forwards:
        i["publish"] = (
            {"type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"},
            [_dnat(f, shape.wan) for f in shape.forwards],
        )
    i["forward"] = (
        {"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
        [
            [match(meta("iifname"), machine_ifs), jump("from_machines")],
            [match(meta("oifname"), machine_ifs), jump("to_machines")],
            # dom0 forwards for its machines only
            [counter(), DROP],
        ],
    )
    to_host: list[Rule] = [
        [ESTABLISHED, ACCEPT],
        [RELATED, jump("related_check")],
        *([[match(meta("nfproto"), "ipv6"), jump("to_host6")]] if shape.ipv6 else []),
        [match(meta("nfproto"), "ipv4", "!="), counter(), DROP],
        # (the bridge table let through only well-formed client messages to dom0's server)
        [
            match(meta("iifname"), bridge),
            match(pl("udp", "sport"), 68),
            match(pl("udp", "dport"), 67),
            ACCEPT,
        ],
        [NEW, jump("machine_limits")],
    ]
    if shape.mdns:
        # agents' discovery: a query to the mDNS group from where agents enroll
        # (dom0's answers go out as any of its own packets do)
        to_host.append(
            [
                match(meta("iifname"), bridge),
                match(pl("ip", "saddr"), {"set": [prefix(p) for p in shape.mdns]}),
                match(pl("ip", "daddr"), MDNS_GROUP),
                match(pl("udp", "dport"), MDNS_PORT),
                ACCEPT,
            ]
        )
    if shape.hub and shape.underlay and shape.hub_port and shape.hub_gateway:
        # a hub machine's bridge address may only dial the hub
        to_host.append(
            [
                match(meta("iifname"), bridge),
                match(pl("ip", "saddr"), prefix(shape.underlay)),
                match(pl("ip", "daddr"), shape.hub_gateway),
                match(pl("udp", "dport"), shape.hub_port),
                ACCEPT,
            ]
        )
    to_host += [
        [
            match(
                cat(pl("ip", "saddr"), pl("ip", "daddr"), meta("l4proto"), pl("th", "dport")),
                "@services",
            ),
            ACCEPT,
        ],
        [
            match(pl("icmp", "type"), "echo-request"),
            match(cat(pl("ip", "saddr"), pl("ip", "daddr")), "@ping"),
            ACCEPT,
        ],
        # silence: no reject, no RST, no port unreachable
        [counter(), DROP],
    ]
    i["to_host"] = (None, to_host)
    i["host_in"] = (None, _host_in(shape))
    i["input"] = (
        {"type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
        [
            [match(meta("iifname"), "lo"), ACCEPT],
            [match(meta("iifname"), machine_ifs), jump("to_host")],
            [jump("host_in")],
        ],
    )
    nat: list[Rule] = []
    if egress:
        nat.append(
            [
                match(meta("oifname"), egress),
                match(pl("ip", "saddr"), "@nat_out"),
                {"masquerade": None},
            ]
        )
    if egress and shape.egress6:
        nat.append(
            [
                match(meta("oifname"), egress),
                match(pl("ip6", "saddr"), "@nat_out6"),
                {"masquerade": None},
            ]
        )
    if shape.forwards and shape.site:
        # hairpin: the published machine answers dom0, not a neighbour behind its back
        nat.append(
            [
                match(ct("status"), "dnat"),
                match(meta("oifname"), machine_ifs),
                match(pl("ip", "saddr"), {"set": [prefix(p) for p in shape.site]}),
                {"masquerade": None},
            ]
        )
    if nat:
        i["postrouting"] = (
            {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
            nat,
        )
    return i


def _to(address: str, proto: str, port: int) -> list[dict]:
    return [
        match(pl("ip", "daddr"), address),
        match(meta("l4proto"), proto),
        match(pl("th", "dport"), port),
    ]


def _dnat(f: Forward, wan: str | None) -> Rule:
    """dom0's listen port to the machine's: on the tunnel address (from anywhere,
    the site's machines included: hairpin), or arriving on the WAN."""
    where = (
        [match(pl("ip", "daddr"), f.on)]
        if f.via == "uplink" and f.on is not None
        else [match(meta("iifname"), wan)]
    )
    return [
        *where,
        match(meta("l4proto"), f.proto),
        match(pl("th", "dport"), f.listen),
        counter(),
        {"dnat": {"family": "ip", "addr": f.address, "port": f.port}},
    ]


def _machine_limits(limits: Any, family: str, suffix: str) -> list[Rule]:
    """Per machine (by its source address): connections held, and new ones a second."""
    source = pl(family, "saddr")
    return [
        [over_count(f"conns{suffix}", source, limits.connections_per_machine), counter(), DROP],
        [
            over_rate(f"new_conns{suffix}", source, limits.new_connections_per_second),
            counter(),
            DROP,
        ],
    ]


def _address(cidr_or_set: str) -> Any:
    return cidr_or_set if cidr_or_set.startswith("@") else prefix(cidr_or_set)


def _allow(r: AllowRule, egress: str | None) -> Rule:
    """An allow entry for one protocol: source, destination, protocol, ports."""
    rule = [match(pl(r.family, "saddr"), _address(r.src))]
    if r.dst is not None:
        rule.append(match(pl(r.family, "daddr"), _address(r.dst)))
    if r.out:
        if egress is None:
            raise ValueError(f"{r.where}: leaves the site, but the shape has no egress")
        rule.append(match(meta("oifname"), egress))
    if r.proto is not None:
        rule.append(match(meta("l4proto"), r.proto))
    if r.ports:
        ports = [lo if lo == hi else {"range": [lo, hi]} for lo, hi in r.ports]
        rule.append(match(pl("th", "dport"), {"set": ports}))
    rule += [counter(), ACCEPT]
    return rule


_ICMP_ERRORS = ["destination-unreachable", "time-exceeded", "parameter-problem"]
_ICMPV6_NEEDED = [
    "destination-unreachable", "packet-too-big", "time-exceeded", "parameter-problem",
    "nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert", "mld-listener-query",
]  # fmt: skip


def _host_in(shape: Shape) -> list[Rule]:
    """dom0's own input from everything but its machines (the WAN, the
    uplink, a management interface): what the installer's boot baseline
    allowed, and nothing else."""
    rules: list[Rule] = [
        [match(ct("state"), {"set": ["established", "related"]}, "in"), ACCEPT],
        [match(ct("state"), "invalid", "in"), DROP],
        [match(pl("icmp", "type"), {"set": _ICMP_ERRORS}), ACCEPT],
        [match(pl("icmpv6", "type"), {"set": _ICMPV6_NEEDED}), ACCEPT],
    ]
    if shape.ping:
        rules.append([match(pl("icmp", "type"), "echo-request"), ACCEPT])
        rules.append([match(pl("icmpv6", "type"), "echo-request"), ACCEPT])
    if shape.dhcp_client:
        rules.append([match(pl("udp", "sport"), 67), match(pl("udp", "dport"), 68), ACCEPT])
        rules.append(
            [
                match(pl("ip6", "saddr"), prefix("fe80::/10")),
                match(pl("udp", "sport"), 547),
                match(pl("udp", "dport"), 546),
                ACCEPT,
            ]
        )
    rules.append(
        [match(pl("ip", "saddr"), "@ssh4"), match(pl("tcp", "dport"), shape.ssh_port), ACCEPT]
    )
    rules.append(
        [match(pl("ip6", "saddr"), "@ssh6"), match(pl("tcp", "dport"), shape.ssh_port), ACCEPT]
    )
    rules.append([counter(), DROP])
    return rules


# -- the kill switch -----------------------------------------------------------

# What `wan.allow` lets through the kill switch, out and in.
_WAN_ALLOW_OUT: dict[str, list[dict]] = {
    "dhcp": [match(pl("udp", "sport"), 68), match(pl("udp", "dport"), 67)],
    "dhcpv6": [match(pl("udp", "sport"), 546), match(pl("udp", "dport"), 547)],
    "ndp": [
        match(
            pl("icmpv6", "type"),
            {"set": ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]},
        )
    ],
}
_WAN_ALLOW_IN: dict[str, list[dict]] = {
    "dhcp": [match(pl("udp", "sport"), 67), match(pl("udp", "dport"), 68)],
    "dhcpv6": [match(pl("udp", "sport"), 547), match(pl("udp", "dport"), 546)],
    "ndp": [
        match(
            pl("icmpv6", "type"),
            {"set": ["nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert"]},
        )
    ],
}


def killswitch_marker(ks: KillSwitch) -> str:
    digest = hashlib.sha256(
        json.dumps([RULESET_VERSION, ks.to_json()], sort_keys=True).encode()
    ).hexdigest()
    return f"ks_{digest[:16]}"


def killswitch_chains(ks: KillSwitch) -> dict[str, Chain]:
    """Only the tunnel's own UDP (marked with its fwmark) to the endpoint
    leaves the WAN, plus what `wan.allow` names; only replies and the same
    allowances come in; nothing is forwarded in from it. IPv6 included: what
    is not allowed is dropped whatever the family."""
    family = "ip6" if ":" in ks.endpoint_host else "ip"
    out: list[Rule] = [
        [
            match(meta("mark"), ks.fwmark),
            match(pl(family, "daddr"), ks.endpoint_host),
            match(pl("udp", "dport"), ks.endpoint_port),
            ACCEPT,
        ]
    ]
    inbound: list[Rule] = [[match(ct("state"), {"set": ["established", "related"]}, "in"), ACCEPT]]
    for name in ks.allow:
        out.append([*_WAN_ALLOW_OUT[name], ACCEPT])
        inbound.append([*_WAN_ALLOW_IN[name], ACCEPT])
    for fam in ("ip", "ip6"):
        sources = [prefix(c) for c in ks.ssh_from if (":" in c) == (fam == "ip6")]
        if sources:
            inbound.append(
                [
                    match(pl(fam, "saddr"), {"set": sources}),
                    match(pl("tcp", "dport"), ks.ssh_port),
                    ACCEPT,
                ]
            )
    for proto, listen, _, _ in ks.published:
        # answers of a port published on the WAN (after NAT: from dom0's port)
        out.append(
            [
                match(ct("direction"), "reply"),
                match(ct("status"), "dnat"),
                match(meta("l4proto"), proto),
                match(pl("th", "sport"), listen),
                counter(),
                ACCEPT,
            ]
        )
    if ks.ssh_from:
        # answers to what came in (and only that: dom0's own connections out
        # are the original direction, and stay dropped)
        out.append(
            [
                match(ct("direction"), "reply"),
                match(ct("state"), "established", "in"),
                ACCEPT,
            ]
        )
    out.append([counter(), DROP])
    inbound.append([counter(), DROP])
    return {
        "wan_out": (None, out),
        "wan_in": (None, inbound),
        "leaving": (
            # after NAT: what really leaves, whoever sent it (dom0 or forwarded)
            {"type": "filter", "hook": "postrouting", "prio": 300, "policy": "accept"},
            [[match(meta("oifname"), ks.wan), jump("wan_out")]],
        ),
        "arriving": (
            {"type": "filter", "hook": "input", "prio": -10, "policy": "accept"},
            [[match(meta("iifname"), ks.wan), jump("wan_in")]],
        ),
        "passing": (
            {"type": "filter", "hook": "forward", "prio": -10, "policy": "accept"},
            [
                # a port published on the WAN: to its machine, through dom0's NAT only
                *(
                    [
                        match(meta("iifname"), ks.wan),
                        match(ct("status"), "dnat"),
                        match(pl("ip", "daddr"), address),
                        match(meta("l4proto"), proto),
                        match(pl("th", "dport"), port),
                        counter(),
                        ACCEPT,
                    ]
                    for proto, _listen, address, port in ks.published
                ),
                [
                    match(meta("iifname"), ks.wan),
                    match(ct("state"), {"set": ["established", "related"]}, "!="),
                    counter(),
                    DROP,
                ],
            ],
        ),
    }
