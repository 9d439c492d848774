"""An in-memory data plane: does this packet pass dom0's tables, and where does it end?

Like Faucet's fake flow table and kube-proxy's fake nftables, this answers
questions about behaviour ("vm1's frame to vm3 arrives on vnet3", "a DHCP
message about another machine's MAC is dropped") without a kernel, from the
very structure the kernel is given: `ruleset.chains(shape)` (and the kill
switch's chains) with the set elements of a `Flat`. It interprets that
structure generically — every rule is walked, every expression evaluated
against the packet's bytes — and never restates the policy: when the ruleset
changes, the fake follows. Every rule is checked when the fake is built: an
expression, statement or set it does not know raises `UnknownExpression`
then, whatever packets follow, so a new rule can never silently pass.
`tests/lab/test_fake_agrees.py` keeps it honest: real packets through the
real kernel must get the verdicts this module gives.

The rules of the interpreter (nftables' semantics, as the kernel runs them):

1. A payload field is loaded from the packet's bytes (link, network or
   transport header, at the field's bit offset), with the dependency nft adds
   implicitly (`udp dport` implies `meta l4proto udp`, `ip saddr` an IPv4
   network header, `arp ...` an ARP one). A missing header or a load past the
   end of the packet ends the rule unmatched (the kernel's NFT_BREAK), for
   `==` and `!=` alike.
2. A constant is read with the type of the expression it is compared with
   (`"ip"` as an ether type, `"udp"` as a protocol, a MAC as 48 bits, a CIDR
   as a range); a set's elements with the kinds `ruleset.set_specs` gives it, which
   must match the expression's types component by component.
3. `accept` ends the base chain (the hook's other base chains still run),
   `drop` ends the packet, `return` (or the end of a chain) goes back to the
   rule after the `jump`; a base chain's end applies its policy. Base chains
   of one hook run in priority order; nat chains only for new connections.
4. A meter (`add @meter { key limit rate over N }`, `ct count over N`) holds
   "under the limit" unless the packet names the meter in `over`.
5. Conntrack is the caller's: `Packet.ct` is the state the packet has
   (`new` by default), `ct_original`/`ct_reply` the addresses of the flow it
   belongs to (a related ICMP error: the flow it quotes).

The hooks, for dom0's namespace (`verdict`):

- A frame from a bridge port: bridge prerouting; IPv4 then crosses inet
  prerouting (br_netfilter runs it from the bridge's prerouting hook, at
  priority 0, with the bridge as input interface, and skips it when the frame
  is later passed up to the bridge device); then the bridge decides by
  destination MAC — the bridge's own MAC: dom0 only;
  broadcast or multicast: dom0 and a copy for every other port; a MAC in the
  FDB: that port; an unknown one: every other port. To dom0: bridge input,
  then ARP is delivered and IPv4 routed (a local or broadcast destination:
  inet input; another one: inet forward, inet postrouting, out of the route's
  interface; out of the bridge: bridge output, to the port of the neighbour's
  MAC). To a port: bridge forward, and for IPv4 inet forward and inet
  postrouting (br_netfilter, bridge in and out).
- A packet from an interface that is not a bridge port (the hub, the uplink,
  the WAN: `Packet.iif`): inet prerouting, routing, then as above.
- A packet dom0 sends (`iif=""`): inet output, routing, inet postrouting,
  out (bridge output per port for the bridge).

Routing: dom0's own addresses (local, with their connected routes and
subnet broadcasts), the longest prefix first, then the default route (the uplink when the policy has
one, else the WAN); `fib saddr . iif oif` (strict reverse path) uses the same
table. Neighbours and the FDB come from the `binding` and `port_mac` sets
(the bridge and the ARP cache learn what the bridge table lets through).

Not modelled: conntrack's state machine and source NAT (masquerade is noted,
the addresses stay; destination NAT rewrites the destination, as the nat
prerouting chain runs before routing), the meters' clocks, FDB learning (a frame that passes the
bridge with a forged source MAC teaches the kernel's bridge; the fake's FDB
stays as the sets say), WireGuard's cryptokey routing (which inner sources a
hub peer may send), policy routing beyond the uplink's fwmark, IPv4
multicast groups, the bridge's reserved groups
(01:80:c2:00:00:0X are never forwarded), VLANs, IPv6 past the bridge table,
fragments, and what the IP stack itself drops (martian sources, TTL,
checksums: the fake writes valid packets).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, ip_network
from typing import Any

from controller.core.desired import Address, Element, KillSwitch, Route, Shape
from controller.drivers.nft.ruleset import (
    KILLSWITCH_TABLE,
    METERS,
    TABLE,
    Chain,
    chains,
    killswitch_chains,
    set_specs,
)

BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
DEFAULT_BRIDGE_MAC = "02:d0:00:00:00:01"  # any: tests of the fake name their own
DOM0 = "dom0"  # an Outcome's destination: delivered to dom0's own stack
ACCEPTED = "accepted by"  # an Outcome's note: the rule that accepted it in a base chain


class FakeError(Exception):
    """The fake cannot answer for this packet or ruleset."""


class UnknownExpression(FakeError):
    """The ruleset uses an expression, statement or set the fake does not know."""


class NotModelled(FakeError):
    """The packet takes a path the fake does not model (see the module docstring)."""


class _Break(Exception):
    """NFT_BREAK: the rule does not match (a header is missing)."""


# -- the packet ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dhcp:
    """The BOOTP fields dom0's rules look at (RFC 2131). chaddr None: the
    frame's source MAC for a client message, its destination for a reply."""

    op: int = 1  # 1 BOOTREQUEST, 2 BOOTREPLY
    htype: int = 1  # Ethernet
    hlen: int = 6
    giaddr: str = "0.0.0.0"
    chaddr: str | None = None
    xid: int = 0
    yiaddr: str = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class Packet:
    """One frame (from a bridge port) or packet (from any other interface, or
    sent by dom0 with iif=""), in the terms the rules use. `frame()` writes
    it as the bytes the fake evaluates, which are also what a lab test sends.

    ether_type "arp": src/dst are the ARP sender and target addresses,
    src_mac/arp_tha the sender's and target's MACs. proto "udp" to or from
    port 67 carries a BOOTP message (`dhcp`, defaulting from the frame).
    payload follows the transport header (for DHCP: in the sname field).
    """

    iif: str
    src_mac: str = "00:00:00:00:00:00"
    dst_mac: str | None = None  # None: the bridge's own MAC
    ether_type: str | int = "ip"
    src: str = "0.0.0.0"
    dst: str = "0.0.0.0"
    proto: str | int = "udp"
    sport: int = 0
    dport: int = 0
    icmp_type: str | int = "echo-request"
    icmp_code: int = 0
    icmp_id: int = 0
    icmp_seq: int = 0
    tcp_flags: int = 0x02  # SYN
    arp_op: int = 1  # request
    arp_sha: str | None = None  # None: src_mac
    arp_tha: str = "00:00:00:00:00:00"
    ttl: int = 64
    ip_id: int = 0
    dhcp: Dhcp | None = None
    payload: bytes = b""
    # conntrack, as the caller says it is
    ct: str = "new"  # new, established, related, invalid, untracked
    ct_dir: str = "original"
    ct_original: tuple[str, str] | None = None  # (saddr, daddr); None: this packet's
    ct_reply: tuple[str, str] | None = None  # None: the original reversed
    ct_status: tuple[str, ...] = ()  # its flow's status bits (e.g. "dnat" for a published port's)
    mark: int = 0
    over: frozenset[str] = frozenset()  # meters this packet is over the limit of

    def __post_init__(self) -> None:
        if self.ether_type == "ip" and self.proto == "udp" and 67 in (self.sport, self.dport):
            request = self.dport == 67
            d = self.dhcp or Dhcp(op=1 if request else 2)
            if d.chaddr is None:
                object.__setattr__(
                    self, "dhcp", replace(d, chaddr=self.src_mac if request else self.dst_mac)
                )
            else:
                object.__setattr__(self, "dhcp", d)

    # -- bytes -------------------------------------------------------------

    def frame(self, bridge_mac: str = DEFAULT_BRIDGE_MAC) -> bytes:
        """The Ethernet frame (destination MAC None: bridge_mac)."""
        return _ll(self.dst_mac or bridge_mac, self.src_mac, self.ether_type) + self.l3()

    def l3(self) -> bytes:
        """What follows the link layer header (an IP packet, an ARP message)."""
        nh, th = self._headers()
        return nh + (th or b"")

    def _headers(self) -> tuple[bytes, bytes | None]:
        et = self.ether_type
        if et == "arp":
            sha = self.arp_sha or self.src_mac
            nh = struct.pack("!HHBBH", 1, 0x0800, 6, 4, self.arp_op)
            nh += _mac(sha) + _ip4(self.src) + _mac(self.arp_tha) + _ip4(self.dst)
            return nh + self.payload, None
        if et == "ip":
            proto = _parse("inet_proto", self.proto)
            th = self._transport(proto, _ip4(self.src), _ip4(self.dst))
            nh = struct.pack(
                "!BBHHHBBH4s4s",
                0x45, 0, 20 + len(th), self.ip_id, 0, self.ttl, proto, 0,
                _ip4(self.src), _ip4(self.dst),
            )  # fmt: skip
            nh = nh[:10] + struct.pack("!H", _checksum(nh)) + nh[12:]
            return nh, th
        if et == "ip6":
            proto = _parse("inet_proto", self.proto)
            s, d = IPv6Address(self.src).packed, IPv6Address(self.dst).packed
            th = self._transport(proto, s, d)
            nh = struct.pack("!IHBB", 6 << 28, len(th), proto, self.ttl) + s + d
            return nh, th
        return self.payload, None

    def _transport(self, proto: int, src: bytes, dst: bytes) -> bytes:
        if proto == 17:
            body = self.payload
            if self.dhcp is not None:
                body = _bootp(self.dhcp, self.payload)
            head = struct.pack("!HHHH", self.sport, self.dport, 8 + len(body), 0)
            csum = _checksum(_pseudo(src, dst, proto, len(head) + len(body)) + head + body)
            return head[:6] + struct.pack("!H", csum or 0xFFFF) + body
        if proto == 6:
            head = struct.pack(
                "!HHIIBBHHH", self.sport, self.dport, 0, 0, 5 << 4, self.tcp_flags, 64240, 0, 0
            )
            csum = _checksum(_pseudo(src, dst, proto, len(head) + len(self.payload)) + head
                             + self.payload)  # fmt: skip
            return head[:16] + struct.pack("!H", csum) + head[18:] + self.payload
        if proto in (1, 58):
            kind = "icmp_type" if proto == 1 else "icmpv6_type"
            t = _parse(kind, self.icmp_type)
            head = struct.pack("!BBHHH", t, self.icmp_code, 0, self.icmp_id, self.icmp_seq)
            msg = head + self.payload
            if proto == 58:
                csum = _checksum(_pseudo(src, dst, proto, len(msg)) + msg)
            else:
                csum = _checksum(msg)
            return msg[:2] + struct.pack("!H", csum) + msg[4:]
        return self.payload


def _ll(dst: str, src: str, ether_type: Any) -> bytes:
    return _mac(dst) + _mac(src) + struct.pack("!H", _parse("ether_type", ether_type))


def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def _ip4(s: str) -> bytes:
    return IPv4Address(s).packed


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def _bootp(d: Dhcp, sname: bytes) -> bytes:
    if len(sname) > 64:
        raise FakeError("a DHCP packet's payload goes in sname: 64 bytes at most")
    chaddr = _mac(d.chaddr or "00:00:00:00:00:00")
    return (
        struct.pack("!BBBBIHH", d.op, d.htype, d.hlen, 0, d.xid, 0, 0)
        + _ip4("0.0.0.0") + _ip4(d.yiaddr) + _ip4("0.0.0.0") + _ip4(d.giaddr)
        + chaddr.ljust(16, b"\0") + sname.ljust(64, b"\0") + bytes(128)
        + b"\x63\x82\x53\x63\xff"  # magic cookie, end (no message type)
    )  # fmt: skip


# -- where it ends -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drop:
    """Where a packet was dropped: a rule (its index in its chain; None for a
    base chain's policy) reached through `trail` (chain, rule index) from the
    base chain, or, with `table` None, the stack itself (`reason`)."""

    family: str
    table: str | None
    chain: str
    rule: int | None
    trail: tuple[tuple[str, int | None], ...] = ()
    reason: str = ""

    def __str__(self) -> str:
        if self.table is None:
            return f"dropped by the {self.chain}: {self.reason}"
        where = f"{self.family} {self.table} {self.chain}"
        rule = "policy" if self.rule is None else f"rule {self.rule}"
        via = " <- ".join(f"{c} rule {r}" for c, r in reversed(self.trail[:-1]))
        return f"dropped by {where} {rule}" + (f" (via {via})" if via else "")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One copy of the packet (a flooded frame has one per port): where it
    was going and whether it got there, with the base chains it crossed."""

    to: str | None  # DOM0, an interface or bridge port; None: dropped before it knew
    dropped: Drop | None
    path: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.dropped is None and self.to is not None

    @property
    def accepts(self) -> tuple[tuple[str, str, str, int], ...]:
        """(family, table, chain, rule index) of every rule that accepted the
        packet on its way, in order (one per base chain that accepted it)."""
        out = []
        for note in self.notes:
            if note.startswith(ACCEPTED + " "):
                family, table, chain, _, index = note[len(ACCEPTED) + 1 :].split()
                out.append((family, table, chain, int(index)))
        return tuple(out)

    def __str__(self) -> str:
        target = "dom0" if self.to == DOM0 else (self.to or "?")
        return f"to {target}: " + ("delivered" if self.passed else str(self.dropped))


@dataclass(frozen=True, slots=True)
class Verdict:
    packet: Packet
    outcomes: tuple[Outcome, ...]

    @property
    def delivered(self) -> frozenset[str]:
        """Where copies arrived: DOM0, bridge ports, other interfaces."""
        return frozenset(o.to for o in self.outcomes if o.passed and o.to is not None)

    @property
    def passes(self) -> bool:
        return bool(self.delivered)

    def reaches(self, where: str) -> bool:
        return where in self.delivered

    @property
    def drops(self) -> tuple[Drop, ...]:
        return tuple(o.dropped for o in self.outcomes if o.dropped is not None)

    def outcome(self, to: str) -> Outcome:
        for o in self.outcomes:
            if o.to == to:
                return o
        raise KeyError(f"no copy of the packet went to {to}: {self}")

    def __str__(self) -> str:
        return "; ".join(str(o) for o in self.outcomes) or "nowhere"


# -- types and constants -------------------------------------------------------

_ETHER_TYPES: dict[Any, int] = {"ip": 0x0800, "arp": 0x0806, "ip6": 0x86DD, "vlan": 0x8100}
_NAMES: dict[str, dict[str, int]] = {
    "ether_type": _ETHER_TYPES,
    "inet_proto": {
        "icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
        "icmpv6": 58, "sctp": 132, "udplite": 136,
    },
    "nf_proto": {"inet": 1, "ipv4": 2, "arp": 3, "netdev": 5, "bridge": 7, "ipv6": 10},
    "icmp_type": {
        "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5,
        "echo-request": 8, "router-advertisement": 9, "router-solicitation": 10,
        "time-exceeded": 11, "parameter-problem": 12, "timestamp-request": 13,
        "timestamp-reply": 14, "info-request": 15, "info-reply": 16,
        "address-mask-request": 17, "address-mask-reply": 18,
    },
    "icmpv6_type": {
        "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3,
        "parameter-problem": 4, "echo-request": 128, "echo-reply": 129,
        "mld-listener-query": 130, "mld-listener-report": 131, "mld-listener-done": 132,
        "mld-listener-reduction": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
        "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137,
        "mld2-listener-report": 143,
    },
    "ct_state": {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64},
    "ct_status": {"expected": 1, "seen-reply": 2, "assured": 4, "confirmed": 8, "snat": 16,
                  "dnat": 32, "dying": 512},
    "ct_dir": {"original": 0, "reply": 1},
    "arp_op": {"request": 1, "reply": 2},
}  # fmt: skip
_INTEGERS = {"inet_service", "mark", "integer"}
# a set's kind -> the expression type it holds (chaddr: 48 raw bits of a DHCP packet)
_KIND_TYPE = {"chaddr": "integer/48", "nd_target": "integer/128"}


def _parse(kind: str, v: Any) -> int:
    """A constant of `kind` as the integer the kernel compares."""
    if isinstance(v, bool):
        raise UnknownExpression(f"boolean {v!r} as a {kind}")
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        raise UnknownExpression(f"constant {v!r} as a {kind}")
    base = kind.split("/")[0]
    if base in ("ether_addr",) or (kind == "integer/48" and ":" in v):
        return int(v.replace(":", ""), 16)
    if kind == "integer/128" and ":" in v:  # an IPv6 address as raw bits (nd_target)
        return int(IPv6Address(v))
    if base == "ipv4_addr":
        return int(IPv4Address(v))
    if base == "ipv6_addr":
        return int(IPv6Address(v))
    if base in _NAMES and v in _NAMES[base]:
        return _NAMES[base][v]
    if (base in _INTEGERS or base in _NAMES) and v.isdigit():
        return int(v)
    if base.startswith("integer") and v.startswith("0x"):
        return int(v, 16)
    raise UnknownExpression(f"constant {v!r} as a {kind}")


@dataclass(frozen=True, slots=True)
class _Range:
    lo: int
    hi: int

    def holds(self, v: Any) -> bool:
        return isinstance(v, int) and self.lo <= v <= self.hi


@dataclass(frozen=True, slots=True)
class _Name:
    """An interface name; a trailing * matches a prefix, as in nft."""

    name: str

    def holds(self, v: Any) -> bool:
        if not isinstance(v, str):
            return False
        if self.name.endswith("*"):
            return v.startswith(self.name[:-1])
        return v == self.name


_Matcher = _Range | _Name


def _const(kind: str, v: Any) -> _Matcher:
    """A constant, prefix or range of `kind` (a set element's component, or
    the right side of a match)."""
    if kind == "ifname":
        if not isinstance(v, str):
            raise UnknownExpression(f"{v!r} as an interface name")
        return _Name(v)
    if kind.startswith("fib"):
        raise UnknownExpression(f"{v!r} compared with a fib result (only exists/missing)")
    if isinstance(v, dict):
        if "prefix" in v:
            return _prefix(kind, f"{v['prefix']['addr']}/{v['prefix']['len']}")
        if "range" in v:
            lo, hi = v["range"]
            return _Range(_parse(kind, lo), _parse(kind, hi))
        raise UnknownExpression(f"constant {v!r}")
    if isinstance(v, str) and "/" in v and kind in ("ipv4_addr", "ipv6_addr"):
        return _prefix(kind, v)
    x = _parse(kind, v)
    return _Range(x, x)


def _prefix(kind: str, cidr: str) -> _Range:
    if kind not in ("ipv4_addr", "ipv6_addr"):
        raise UnknownExpression(f"prefix {cidr} as a {kind}")
    net = ip_network(cidr, strict=False)
    return _Range(int(net.network_address), int(net.broadcast_address))


# -- payload fields: (base, bit offset, bit length, type, dependency) --------------

_FIELDS: dict[tuple[str, str], tuple[str, int, int, str, str | None]] = {
    ("ether", "daddr"): ("ll", 0, 48, "ether_addr", None),
    ("ether", "saddr"): ("ll", 48, 48, "ether_addr", None),
    ("ether", "type"): ("ll", 96, 16, "ether_type", None),
    ("arp", "htype"): ("nh", 0, 16, "integer/16", "arp"),
    ("arp", "ptype"): ("nh", 16, 16, "ether_type", "arp"),
    ("arp", "hlen"): ("nh", 32, 8, "integer/8", "arp"),
    ("arp", "plen"): ("nh", 40, 8, "integer/8", "arp"),
    ("arp", "operation"): ("nh", 48, 16, "arp_op", "arp"),
    ("arp", "saddr ether"): ("nh", 64, 48, "ether_addr", "arp"),
    ("arp", "saddr ip"): ("nh", 112, 32, "ipv4_addr", "arp"),
    ("arp", "daddr ether"): ("nh", 144, 48, "ether_addr", "arp"),
    ("arp", "daddr ip"): ("nh", 192, 32, "ipv4_addr", "arp"),
    ("ip", "length"): ("nh", 16, 16, "integer/16", "ipv4"),
    ("ip", "id"): ("nh", 32, 16, "integer/16", "ipv4"),
    ("ip", "ttl"): ("nh", 64, 8, "integer/8", "ipv4"),
    ("ip", "protocol"): ("nh", 72, 8, "inet_proto", "ipv4"),
    ("ip", "saddr"): ("nh", 96, 32, "ipv4_addr", "ipv4"),
    ("ip", "daddr"): ("nh", 128, 32, "ipv4_addr", "ipv4"),
    ("ip6", "nexthdr"): ("nh", 48, 8, "inet_proto", "ipv6"),
    ("ip6", "hoplimit"): ("nh", 56, 8, "integer/8", "ipv6"),
    ("ip6", "saddr"): ("nh", 64, 128, "ipv6_addr", "ipv6"),
    ("ip6", "daddr"): ("nh", 192, 128, "ipv6_addr", "ipv6"),
    ("udp", "sport"): ("th", 0, 16, "inet_service", "udp"),
    ("udp", "dport"): ("th", 16, 16, "inet_service", "udp"),
    ("udp", "length"): ("th", 32, 16, "integer/16", "udp"),
    ("tcp", "sport"): ("th", 0, 16, "inet_service", "tcp"),
    ("tcp", "dport"): ("th", 16, 16, "inet_service", "tcp"),
    ("tcp", "flags"): ("th", 104, 8, "integer/8", "tcp"),
    ("th", "sport"): ("th", 0, 16, "inet_service", None),
    ("th", "dport"): ("th", 16, 16, "inet_service", None),
    ("icmp", "type"): ("th", 0, 8, "icmp_type", "icmp"),
    ("icmp", "code"): ("th", 8, 8, "integer/8", "icmp"),
    ("icmp", "id"): ("th", 32, 16, "integer/16", "icmp"),
    ("icmp", "sequence"): ("th", 48, 16, "integer/16", "icmp"),
    ("icmpv6", "type"): ("th", 0, 8, "icmpv6_type", "icmpv6"),
    ("icmpv6", "code"): ("th", 8, 8, "integer/8", "icmpv6"),
}
_L4 = {"udp": 17, "tcp": 6, "icmp": 1, "icmpv6": 58}
_META_TYPES = {
    "iifname": "ifname",
    "oifname": "ifname",
    "l4proto": "inet_proto",
    "nfproto": "nf_proto",
    "protocol": "ether_type",
    "mark": "mark",
}


@dataclass(slots=True)
class _Wire:
    """The packet as a hook sees it: its headers' bytes and where it is."""

    packet: Packet
    ll: bytes | None
    nh: bytes | None
    th: bytes | None
    nfproto: str  # ipv4, ipv6, arp, other
    l4: int | None
    family: str = ""
    hook: str = ""
    iif: str = ""
    oif: str = ""
    dnat: bool = False  # its destination was NATed on the way (ct status dnat)


def _bits(data: bytes | None, offset: int, length: int) -> int:
    if data is None:
        raise _Break
    first, last = offset // 8, (offset + length + 7) // 8
    if last > len(data):
        raise _Break
    v = int.from_bytes(data[first:last], "big")
    return (v >> (last * 8 - offset - length)) & ((1 << length) - 1)


# -- the data plane ------------------------------------------------------------

Value = Any  # int, str (ifname), None (fib: missing), or a tuple of them (concat)
_Chains = Mapping[str, Chain]


@dataclass(slots=True)
class _Ctx:
    """One base chain's run: where a drop happened."""

    drop: Drop | None = None
    notes: list[str] = field(default_factory=list)
    dnat: tuple[str, int] | None = None  # a nat chain's destination NAT: (address, port)


class FakeDataPlane:
    """dom0's namespace in memory: its tables, addresses and bridge.

    `sets` is a `Flat.sets` mapping (or what `Nft.read` returns); `addresses`
    dom0's own (interface, CIDR), e.g. `PolicyState.addresses` plus the WAN's.
    `ports` adds bridge ports the sets do not name; `fdb` and `neighbours`
    add MAC -> port and IPv4 -> MAC entries to those the sets imply.
    `tables` replaces the ruleset (family, table) -> chains, for tests of
    the interpreter itself.
    """

    def __init__(
        self,
        shape: Shape,
        sets: Mapping[tuple[str, str], Iterable[Element]],
        addresses: Iterable[Address] = (),
        *,
        killswitch: KillSwitch | None = None,
        bridge_mac: str = DEFAULT_BRIDGE_MAC,
        ports: Iterable[str] = (),
        fdb: Mapping[str, str] | None = None,
        neighbours: Mapping[str, str] | None = None,
        default_route: str | None = None,
        br_netfilter: bool = True,
        tables: Mapping[tuple[str, str], _Chains] | None = None,
        routes: Iterable[Route] = (),
    ) -> None:
        addresses = list(addresses)
        self.shape = shape
        self.bridge = shape.bridge
        self.bridge_mac = bridge_mac.lower()
        self.br_netfilter = br_netfilter
        if tables is None:
            built = chains(shape)
            tables = {(f, TABLE): built[f] for f in built}
            if killswitch is not None:
                tables = {**tables, ("inet", KILLSWITCH_TABLE): killswitch_chains(killswitch)}
        self.tables = dict(tables)
        self._sets = {k: frozenset(v) for k, v in sets.items()}
        self._set_cache: dict[tuple[str, str], tuple[tuple[_Matcher, ...], ...]] = {}
        self._hooks: dict[tuple[str, str], list[tuple[int, tuple[str, str], str, dict]]] = {}
        for key, table in self.tables.items():
            for name, (base, _rules) in table.items():
                if base is not None:
                    if base.get("type") not in ("filter", "nat"):
                        raise UnknownExpression(f"base chain type {base.get('type')!r}")
                    hooks = self._hooks.setdefault((key[0], base["hook"]), [])
                    hooks.append((int(base["prio"]), key, name, base))
        for hooks in self._hooks.values():
            hooks.sort(key=lambda h: h[0])
        self._meters = {(m.family, m.name) for m in METERS}
        self._specs = set_specs(shape)
        for key, table in self.tables.items():  # every rule, before any packet
            for name, (_base, rules) in table.items():
                for i, rule in enumerate(rules):
                    for stmt in rule:
                        try:
                            self._check(key, stmt)
                        except UnknownExpression as e:
                            raise UnknownExpression(
                                f"{key[0]} {key[1]} {name} rule {i}: {e}"
                            ) from None
        # the bridge's ports, its FDB, dom0's neighbours
        port_mac = self._sets.get(("bridge", "port_mac"), frozenset())
        binding = self._sets.get(("bridge", "binding"), frozenset())
        self.fdb: dict[str, str] = {}
        for port, mac in sorted(port_mac):
            self.fdb.setdefault(mac.lower(), port)
        self.fdb.update({m.lower(): p for m, p in (fdb or {}).items()})
        # (exempt ports are not among them: they may be ports of other bridges)
        self.ports = sorted({p for p, _ in port_mac} | set(ports) | set(self.fdb.values()))
        self.neighbours: dict[int, str] = {}
        for _port, mac, ip in sorted(binding):
            self.neighbours.setdefault(int(IPv4Address(ip)), mac.lower())
        for ip, mac in (neighbours or {}).items():
            self.neighbours[int(IPv4Address(ip))] = mac.lower()
        # routing
        self.local: dict[int, str] = {int(IPv4Address("127.0.0.1")): "lo"}
        self.connected: list[tuple[int, int, int, str]] = []  # (len, net, mask, dev)
        self.broadcasts: dict[int, str] = {}
        for iface, cidr in addresses:
            if ":" in cidr:
                continue  # (IPv6 past the bridge table is not modelled)
            a = IPv4Interface(cidr)
            self.local[int(a.ip)] = iface
            n = a.network
            if n.prefixlen < 32:
                self.connected.append((n.prefixlen, int(n.network_address), int(n.netmask), iface))
            if n.prefixlen < 31:  # the kernel adds the subnet's broadcast route itself
                self.broadcasts[int(n.broadcast_address)] = iface
        # dom0's own routes (containers' prefixes): through a machine, or a device
        self.gateways: list[tuple[int, int, int]] = []  # (net, mask, next hop)
        for cidr, via, dev in routes:
            n = IPv4Network(cidr)
            self.connected.append((n.prefixlen, int(n.network_address), int(n.netmask), dev))
            if via:
                self.gateways.append(
                    (int(n.network_address), int(n.netmask), int(IPv4Address(via)))
                )
        self.connected.sort(reverse=True)
        self.default_route = default_route or shape.egress
        # the uplink's own packets (its fwmark) use the main table: out of the WAN
        self.fwmark = (killswitch.fwmark, killswitch.wan) if killswitch is not None else None
        # where packets arrive that are not frames from a bridge port
        named = {i for i, _ in addresses} | {x for x in (shape.hub, shape.wan, shape.egress) if x}
        self.l3_interfaces = ({"lo"} | named) - {self.bridge}

    @classmethod
    def from_flat(cls, flat: Any, **kw: Any) -> FakeDataPlane:
        """From a `controller.core.plan.Flat` (desired or applied)."""
        if flat.shape is None:
            raise FakeError("a Flat without a shape has no tables")
        kw.setdefault("killswitch", flat.killswitch)
        kw.setdefault("routes", flat.routes)
        return cls(flat.shape, flat.sets, flat.addresses, **kw)

    # -- routing -----------------------------------------------------------

    def route(self, address: str | int, mark: int = 0) -> tuple[str, str | None] | None:
        """(type, device) of the route to address: local, broadcast,
        multicast or unicast; None: no route."""
        ip = address if isinstance(address, int) else int(IPv4Address(address))
        if ip in self.local:
            return "local", self.local[ip]
        if ip >> 24 == 127:
            return "local", "lo"
        if ip == 0xFFFFFFFF:
            return "broadcast", None
        if ip in self.broadcasts:
            return "broadcast", self.broadcasts[ip]
        if 0xE0000000 <= ip < 0xF0000000:
            return "multicast", None
        for _len, net, mask, dev in self.connected:
            if ip & mask == net:
                return "unicast", dev
        if self.fwmark is not None and mark == self.fwmark[0]:
            return "unicast", self.fwmark[1]
        if self.default_route:
            return "unicast", self.default_route
        return None

    # -- the paths ---------------------------------------------------------

    def verdict(self, packet: Packet) -> Verdict:
        if packet.iif == "":
            return Verdict(packet, tuple(self._from_dom0(packet)))
        if packet.iif == self.bridge:
            raise FakeError(f"frames arrive on a port of {self.bridge}, not on the bridge itself")
        if packet.iif in self.l3_interfaces:
            return Verdict(packet, tuple(self._from_interface(packet)))
        return Verdict(packet, tuple(self._from_port(packet)))

    def _wire(self, p: Packet, with_ll: bool) -> _Wire:
        """The packet's headers; with_ll: it came from (or goes to) Ethernet."""
        nh, th = p._headers()
        kind = {"ip": "ipv4", "ip6": "ipv6", "arp": "arp"}.get(str(p.ether_type), "other")
        l4 = _parse("inet_proto", p.proto) if kind in ("ipv4", "ipv6") else None
        ll = p.frame(self.bridge_mac)[:14] if with_ll else None
        return _Wire(p, ll, nh, th if l4 is not None else None, kind, l4)

    def _hook(
        self, w: _Wire, family: str, hook: str, iif: str, oif: str, path: list[str],
        notes: list[str],
    ) -> Drop | None:  # fmt: skip
        """Run every base chain of a hook in priority order; the first drop ends it."""
        w.family, w.hook, w.iif, w.oif = family, hook, iif, oif
        for _prio, key, name, base in self._hooks.get((family, hook), []):
            if base["type"] == "nat" and w.packet.ct != "new":
                continue
            path.append(f"{key[0]} {key[1]} {name}")
            ctx = _Ctx()
            v = self._call(key, name, w, ctx, ())
            notes.extend(ctx.notes)
            if ctx.dnat is not None:
                self._rewrite(w, *ctx.dnat)
            if v == "drop":
                return ctx.drop
            if v is None and base.get("policy", "accept") == "drop":
                return Drop(key[0], key[1], name, None, ((name, None),))
            if v not in (None, "accept"):
                raise UnknownExpression(f"verdict {v!r} in base chain {name}")
        return None

    def _bridged_dnat(self, w: _Wire, path: list[str], notes: list[str]) -> Outcome | None:
        """br_netfilter after a destination NAT in prerouting: when the new
        destination is on the bridge itself, the frame is not routed but
        bridged on, to the neighbour's MAC (br_nf_pre_routing_finish_bridge)."""
        r = self.route(w.packet.dst)
        if r != ("unicast", self.bridge):
            return None
        mac = self.neighbours.get(int(IPv4Address(w.packet.dst)))
        if mac is None:
            return self._stack_drop(
                "neighbour", f"{w.packet.dst} does not answer ARP on {self.bridge}", path, notes
            )
        q = replace(w.packet, dst_mac=mac)
        n = self._wire(q, True)
        w.packet, w.ll, w.nh, w.th = q, n.ll, n.nh, n.th
        notes.append(f"bridged on to {mac} by br_netfilter after destination NAT")
        return None

    def _rewrite(self, w: _Wire, address: str, port: int) -> None:
        """Destination NAT: the packet goes on to address:port (its flow keeps
        the original tuple)."""
        p = w.packet
        q = replace(p, dst=address, dport=port, ct_original=p.ct_original or (p.src, p.dst))
        n = self._wire(q, w.ll is not None)
        w.packet, w.ll, w.nh, w.th, w.dnat = q, n.ll, n.nh, n.th, True

    def _from_port(self, p: Packet) -> list[Outcome]:
        port = p.iif
        w = self._wire(p, True)
        path: list[str] = []
        notes: list[str] = []
        drop = self._hook(w, "bridge", "prerouting", port, "", path, notes)
        if drop:
            return [Outcome(None, drop, tuple(path), tuple(notes))]
        bridged_ip = self.br_netfilter and w.nfproto == "ipv4"
        if bridged_ip:
            drop = self._hook(w, "inet", "prerouting", self.bridge, "", path, notes)
            if drop:
                return [Outcome(None, drop, tuple(path), tuple(notes))]
            if w.dnat and (p.dst_mac or self.bridge_mac).lower() == self.bridge_mac:
                stop = self._bridged_dnat(w, path, notes)
                if stop is not None:
                    return [stop]
                p = w.packet
        dst = (p.dst_mac or self.bridge_mac).lower()
        group = int(dst.split(":")[0], 16) & 1
        local = dst == self.bridge_mac or bool(group)
        if dst == self.bridge_mac:
            out_ports: list[str] = []
        elif group or dst not in self.fdb:
            out_ports = [q for q in self.ports if q != port]  # flooded
        else:
            out_ports = [self.fdb[dst]] if self.fdb[dst] != port else []
        outcomes: list[Outcome] = []
        if local:
            lp, ln = list(path), list(notes)
            drop = self._hook(w, "bridge", "input", port, "", lp, ln)
            if drop:
                outcomes.append(Outcome(DOM0, drop, tuple(lp), tuple(ln)))
            elif w.nfproto == "arp":
                outcomes.append(Outcome(DOM0, None, tuple(lp), tuple(ln)))
            elif w.nfproto == "ipv4":
                outcomes += self._routed(w, self.bridge, lp, ln, prerouted=bridged_ip)
            else:
                raise NotModelled(f"{w.nfproto} delivered to dom0 past the bridge table")
        for q in out_ports:
            fp, fn = list(path), list(notes)
            drop = self._hook(w, "bridge", "forward", port, q, fp, fn)
            if drop is None and bridged_ip:
                drop = self._hook(w, "inet", "forward", self.bridge, self.bridge, fp, fn) or (
                    self._hook(w, "inet", "postrouting", "", self.bridge, fp, fn)
                )
            if drop is None:
                drop = self._hook(w, "bridge", "postrouting", "", q, fp, fn)
            outcomes.append(Outcome(q, drop, tuple(fp), tuple(fn)))
        if not outcomes:
            outcomes.append(
                Outcome(None, Drop("bridge", None, "bridge", None, reason=(
                    f"{dst} is learned on {port} itself: not sent back")), tuple(path)))  # fmt: skip
        return outcomes

    def _from_interface(self, p: Packet) -> list[Outcome]:
        if p.ether_type != "ip":
            raise NotModelled(f"{p.ether_type} arriving on {p.iif}")
        w = self._wire(p, False)
        return self._routed(w, p.iif, [], [], prerouted=False)

    def _routed(
        self, w: _Wire, iif: str, path: list[str], notes: list[str], *, prerouted: bool
    ) -> list[Outcome]:
        """An IPv4 packet dom0's stack received on iif: input or forward."""
        if not prerouted:
            drop = self._hook(w, "inet", "prerouting", iif, "", path, notes)
            if drop:
                return [Outcome(None, drop, tuple(path), tuple(notes))]
        r = self.route(w.packet.dst, w.packet.mark)
        if r is None:
            return [self._stack_drop("routing", f"no route to {w.packet.dst}", path, notes)]
        kind, dev = r
        if kind in ("local", "broadcast"):
            drop = self._hook(w, "inet", "input", iif, "", path, notes)
            return [Outcome(DOM0, drop, tuple(path), tuple(notes))]
        if kind == "multicast":
            raise NotModelled(f"IPv4 multicast to {w.packet.dst}")
        assert dev is not None
        drop = self._hook(w, "inet", "forward", iif, dev, path, notes)
        if drop:
            return [Outcome(dev, drop, tuple(path), tuple(notes))]
        return self._out(w, iif, dev, path, notes)

    def _from_dom0(self, p: Packet) -> list[Outcome]:
        if p.ether_type != "ip":
            raise NotModelled(f"dom0 sending {p.ether_type}")
        w = self._wire(p, False)
        path: list[str] = []
        notes: list[str] = []
        r = self.route(p.dst, p.mark)
        if r is None:
            return [self._stack_drop("routing", f"no route to {p.dst}", path, notes)]
        kind, dev = r
        if kind == "broadcast":
            dev = self.bridge  # (a broadcast dom0 sends leaves by the interface it names)
        if kind == "local":
            drop = self._hook(w, "inet", "output", "", "lo", path, notes)
            return [Outcome(DOM0, drop, tuple(path), tuple(notes))]
        if kind == "multicast" or dev is None:
            raise NotModelled(f"dom0 sending to {p.dst}")
        drop = self._hook(w, "inet", "output", "", dev, path, notes)
        if drop:
            return [Outcome(dev, drop, tuple(path), tuple(notes))]
        return self._out(w, "", dev, path, notes)

    def _out(
        self, w: _Wire, iif: str, dev: str, path: list[str], notes: list[str]
    ) -> list[Outcome]:
        """inet postrouting, then out of dev (the bridge: bridge output per port)."""
        drop = self._hook(w, "inet", "postrouting", iif, dev, path, notes)
        if drop:
            return [Outcome(dev, drop, tuple(path), tuple(notes))]
        if dev != self.bridge:
            return [Outcome(dev, None, tuple(path), tuple(notes))]
        p = w.packet
        if p.dst_mac is not None:
            mac = p.dst_mac.lower()
        elif p.dst == "255.255.255.255":
            mac = BROADCAST_MAC
        else:
            n = self.neighbours.get(self._next_hop(int(IPv4Address(p.dst))))
            if n is None:
                return [self._stack_drop("neighbour", f"{p.dst} does not answer ARP on "
                                         f"{self.bridge}", path, notes)]  # fmt: skip
            mac = n
        if int(mac.split(":")[0], 16) & 1 or mac not in self.fdb:
            targets = list(self.ports)
        else:
            targets = [self.fdb[mac]]
        framed = self._wire(replace(p, src_mac=self.bridge_mac, dst_mac=mac), True)
        outcomes = []
        for q in targets:
            op, on = list(path), list(notes)
            drop = self._hook(framed, "bridge", "output", "", q, op, on) or self._hook(
                framed, "bridge", "postrouting", "", q, op, on
            )
            outcomes.append(Outcome(q, drop, tuple(op), tuple(on)))
        return outcomes

    def _next_hop(self, ip: int) -> int:
        """The neighbour a packet to `ip` goes to: a route's gateway, or itself."""
        for net, mask, via in self.gateways:
            if ip & mask == net:
                return via
        return ip

    @staticmethod
    def _stack_drop(what: str, reason: str, path: list[str], notes: list[str]) -> Outcome:
        return Outcome(None, Drop("ip", None, what, None, reason=reason), tuple(path), tuple(notes))

    # -- the ruleset, checked before any packet ------------------------------

    def _check(self, key: tuple[str, str], s: Any) -> None:
        """Raise UnknownExpression unless the interpreter knows every part of
        statement s (so that no rule is skipped unread because an earlier
        condition did not match the packets a test happened to send)."""
        if not isinstance(s, dict) or len(s) != 1:
            raise UnknownExpression(f"statement {s!r}")
        ((kind, arg),) = s.items()
        if kind == "match":
            if arg.get("op") not in ("==", "!=", "in"):
                raise UnknownExpression(f"operator {arg.get('op')!r}")
            self._check_right(key, arg["right"], self._type(arg["left"]))
        elif kind == "set" and isinstance(arg, dict):
            name = str(arg.get("set", "")).lstrip("@")
            if arg.get("op") not in ("add", "update") or (key[0], name) not in self._meters:
                raise UnknownExpression(f"set statement {arg!r} (not one of ruleset.METERS)")
            self._type(arg["elem"])
            for inner in arg.get("stmt", []):
                if not isinstance(inner, dict) or set(inner) - {"limit", "ct count"}:
                    raise UnknownExpression(f"statement {inner!r} in a meter")
        elif kind in ("jump", "goto"):
            if arg.get("target") not in self.tables[key]:
                raise UnknownExpression(
                    f"{kind} to chain {arg.get('target')!r}, which is not there"
                )
        elif kind == "dnat":
            if not isinstance(arg, dict) or arg.get("family") != "ip":
                raise UnknownExpression(f"dnat {arg!r} (only ip to ADDRESS:PORT)")
            _parse("ipv4_addr", arg.get("addr"))
            _parse("inet_service", arg.get("port"))
        elif kind not in ("counter", "accept", "drop", "return", "masquerade"):
            raise UnknownExpression(f"statement {s!r}")

    def _check_right(self, key: tuple[str, str], right: Any, kind: Any) -> None:
        if isinstance(right, bool) or kind == "fib":
            if not (isinstance(right, bool) and kind == "fib"):
                raise UnknownExpression(f"{right!r} compared with a {kind} (fib: exists/missing)")
        elif isinstance(right, str) and right.startswith("@"):
            self._set(key, right[1:], kind)
        elif isinstance(right, dict) and isinstance(right.get("set"), list):
            for x in right["set"]:
                self._check_right(key, x, kind)
        elif isinstance(kind, tuple):
            raise UnknownExpression(f"concatenation compared with {right!r}")
        elif kind == "ct_state":
            _parse("ct_state", right)
        else:
            _const(kind, right)

    def _type(self, e: Any) -> Any:
        """The type of expression e (a tuple for a concatenation), without a packet."""
        if not isinstance(e, dict) or len(e) != 1:
            raise UnknownExpression(f"expression {e!r}")
        ((kind, arg),) = e.items()
        if kind == "payload":
            if "base" in arg:
                if arg["base"] not in ("ll", "nh", "th"):
                    raise UnknownExpression(f"payload base {arg['base']!r}")
                return f"integer/{int(arg['len'])}"
            spec = _FIELDS.get((arg.get("protocol"), arg.get("field")))
            if spec is None:
                raise UnknownExpression(f"payload {arg.get('protocol')} {arg.get('field')}")
            return spec[3]
        if kind == "meta":
            if arg.get("key") not in _META_TYPES:
                raise UnknownExpression(f"meta {arg.get('key')}")
            return _META_TYPES[arg["key"]]
        if kind == "concat":
            return tuple(self._type(x) for x in arg)
        if kind == "&":
            t = self._type(arg[0])
            if isinstance(t, tuple) or t in ("ifname", "fib"):
                raise UnknownExpression(f"bitwise and on {arg[0]!r}")
            _parse(t, arg[1])
            return t
        if kind == "ct":
            k, d = arg.get("key"), arg.get("dir")
            if k in ("state", "direction", "status") and d is None:
                return {"state": "ct_state", "direction": "ct_dir", "status": "ct_status"}[k]
            if k in ("ip saddr", "ip daddr") and d in ("original", "reply"):
                return "ipv4_addr"
            if k in ("ip6 saddr", "ip6 daddr") and d in ("original", "reply"):
                return "ipv6_addr"
            raise UnknownExpression(f"ct {d or ''} {k}".replace("  ", " "))
        if kind == "fib":
            flags, result = set(arg.get("flags", [])), arg.get("result")
            if (
                result not in ("oif", "oifname")
                or not flags <= {"saddr", "daddr", "iif", "oif"}
                or len(flags & {"saddr", "daddr"}) != 1
                or {"iif", "oif"} <= flags
            ):
                raise UnknownExpression(f"fib {' . '.join(arg.get('flags', []))} {result}")
            return "fib"
        raise UnknownExpression(f"expression {e!r}")

    # -- the interpreter ---------------------------------------------------

    def _call(
        self, key: tuple[str, str], name: str, w: _Wire, ctx: _Ctx,
        trail: tuple[tuple[str, int | None], ...],
    ) -> str | None:  # fmt: skip
        """Run chain `name`: "accept", "drop", or None (returned or fell through)."""
        table = self.tables[key]
        if name not in table:
            raise UnknownExpression(f"jump to chain {name!r}, which {key[0]} {key[1]} lacks")
        for i, rule in enumerate(table[name][1]):
            v = self._rule(key, name, i, rule, w, ctx, (*trail, (name, i)))
            if v == "return":
                return None
            if v is not None:
                return v
        return None

    def _rule(
        self, key: tuple[str, str], chain: str, index: int, rule: list[dict], w: _Wire,
        ctx: _Ctx, trail: tuple[tuple[str, int | None], ...],
    ) -> str | None:  # fmt: skip
        for s in rule:
            if not isinstance(s, dict) or len(s) != 1:
                raise UnknownExpression(f"statement {s!r} in {chain}")
            ((kind, arg),) = s.items()
            if kind == "match":
                if not self._match(key, arg, w):
                    return None
            elif kind == "counter":
                continue
            elif kind == "set" and isinstance(arg, dict):
                if not self._meter(key, arg, w):
                    return None
            elif kind in ("accept", "drop"):
                if kind == "drop":
                    ctx.drop = Drop(key[0], key[1], trail[-1][0], index, trail)
                else:
                    ctx.notes.append(f"{ACCEPTED} {key[0]} {key[1]} {chain} rule {index}")
                return kind
            elif kind == "return":
                return "return"
            elif kind in ("jump", "goto"):
                v = self._call(key, arg["target"], w, ctx, trail)
                if v is not None:
                    return v
                return "return" if kind == "goto" else None
            elif kind == "masquerade":
                ctx.notes.append(f"masqueraded by {key[0]} {key[1]} {chain}")
                return "accept"
            elif kind == "dnat":
                ctx.notes.append(
                    f"dnat to {arg['addr']}:{arg['port']} by {key[0]} {key[1]} {chain}"
                )
                ctx.dnat = (str(arg["addr"]), int(arg["port"]))
                return "accept"
            else:
                raise UnknownExpression(f"statement {s!r} in {key[0]} {key[1]} {chain}")
        return None

    def _meter(self, key: tuple[str, str], d: dict, w: _Wire) -> bool:
        """A dynamic set statement as a condition (rule 4 of the docstring)."""
        try:
            self._eval(d["elem"], w)
        except _Break:
            return False
        over = str(d["set"]).lstrip("@") in w.packet.over
        # `limit rate over N` / `ct count over N` (inv) hold when over; without inv, when under
        return all(
            over if arg.get("inv") else not over for s in d.get("stmt", ()) for arg in s.values()
        )

    def _match(self, key: tuple[str, str], m: dict, w: _Wire) -> bool:
        op, left, right = m["op"], m["left"], m["right"]
        try:
            value, kind = self._eval(left, w)
        except _Break:
            return False
        if kind == "fib":  # a route exists (True) or is missing (False)
            hit = (value is not None) == right
        else:
            hit = self._holds(key, right, kind, value)
        return hit if op in ("==", "in") else not hit

    def _holds(self, key: tuple[str, str], right: Any, kind: Any, value: Value) -> bool:
        if isinstance(right, str) and right.startswith("@"):
            return any(self._element_holds(e, value) for e in self._set(key, right[1:], kind))
        if isinstance(right, dict) and isinstance(right.get("set"), list):
            return any(self._holds(key, x, kind, value) for x in right["set"])
        if isinstance(kind, tuple):
            raise UnknownExpression(f"concatenation compared with {right!r}")
        if kind in ("ct_state", "ct_status"):  # a bit mask: `ct state established` tests a bit
            return bool(value & _parse(kind, right))
        return _const(kind, right).holds(value)

    @staticmethod
    def _element_holds(element: tuple[_Matcher, ...], value: Value) -> bool:
        values = value if isinstance(value, tuple) else (value,)
        return all(m.holds(v) for m, v in zip(element, values, strict=True))

    def _set(self, key: tuple[str, str], name: str, kind: Any) -> tuple[tuple[_Matcher, ...], ...]:
        skey = (key[0], name)
        spec = self._specs.get(skey) if key[1] == TABLE else None
        if spec is None:
            raise UnknownExpression(
                f"set @{name} is not one of ruleset.set_specs in {key[0]} {key[1]}"
            )
        want = tuple(_KIND_TYPE.get(k, k) for k in spec.kinds)
        have = kind if isinstance(kind, tuple) else (kind,)
        if want != have:
            raise UnknownExpression(f"set @{name} holds {spec.kinds}, compared with {have}")
        if skey not in self._set_cache:
            self._set_cache[skey] = tuple(
                tuple(_const(k, v) for k, v in zip(want, e, strict=True))
                for e in sorted(self._sets.get(skey, frozenset()))
            )
        return self._set_cache[skey]

    def _eval(self, e: Any, w: _Wire) -> tuple[Value, Any]:
        """An expression's value and type (a tuple of types for a concatenation)."""
        if not isinstance(e, dict) or len(e) != 1:
            raise UnknownExpression(f"expression {e!r}")
        ((kind, arg),) = e.items()
        if kind == "payload":
            return self._payload(arg, w)
        if kind == "meta":
            return self._meta(arg["key"], w)
        if kind == "concat":
            parts = [self._eval(x, w) for x in arg]
            return tuple(v for v, _ in parts), tuple(t for _, t in parts)
        if kind == "&":
            a, b = arg
            v, t = self._eval(a, w)
            if not isinstance(v, int) or isinstance(t, tuple):
                raise UnknownExpression(f"bitwise and on {a!r}")
            return v & _parse(t, b), t
        if kind == "ct":
            return self._ct(arg, w)
        if kind == "fib":
            return self._fib(arg, w), "fib"
        raise UnknownExpression(f"expression {e!r}")

    def _payload(self, p: dict, w: _Wire) -> tuple[Value, Any]:
        if "base" in p:
            base, offset, length = p["base"], int(p["offset"]), int(p["len"])
            if base not in ("ll", "nh", "th"):
                raise UnknownExpression(f"payload base {base!r}")
            return _bits(getattr(w, base), offset, length), f"integer/{length}"
        spec = _FIELDS.get((str(p.get("protocol")), str(p.get("field"))))
        if spec is None:
            raise UnknownExpression(f"payload {p.get('protocol')} {p.get('field')}")
        base, offset, length, kind, dep = spec
        if dep in ("ipv4", "ipv6", "arp") and w.nfproto != dep:
            raise _Break
        if dep in _L4 and w.l4 != _L4[dep]:
            raise _Break
        return _bits(getattr(w, base), offset, length), kind

    def _meta(self, key: str, w: _Wire) -> tuple[Value, Any]:
        if key == "iifname":
            return w.iif, "ifname"
        if key == "oifname":
            return w.oif, "ifname"
        if key == "l4proto":
            if w.l4 is None:
                raise _Break
            return w.l4, "inet_proto"
        if key == "nfproto":
            return _NAMES["nf_proto"]["bridge" if w.family == "bridge" else w.nfproto], "nf_proto"
        if key == "protocol":
            return _parse("ether_type", w.packet.ether_type), "ether_type"
        if key == "mark":
            return w.packet.mark, "mark"
        raise UnknownExpression(f"meta {key}")

    def _ct(self, c: dict, w: _Wire) -> tuple[Value, Any]:
        p = w.packet
        key, direction = c["key"], c.get("dir")
        if key == "state":
            return _parse("ct_state", p.ct), "ct_state"
        if p.ct in ("invalid", "untracked"):
            raise _Break  # no conntrack entry
        if key == "direction":
            return _parse("ct_dir", p.ct_dir), "ct_dir"
        if key == "status":
            bits = {"dnat"} if w.dnat else set()
            return sum(_parse("ct_status", b) for b in bits | set(p.ct_status)), "ct_status"
        if key in ("ip saddr", "ip daddr") and direction in ("original", "reply"):
            original = p.ct_original or (
                (p.src, p.dst) if p.ct_dir == "original" else (p.dst, p.src)
            )
            tup = original if direction == "original" else (p.ct_reply or original[::-1])
            return int(IPv4Address(tup[0 if key == "ip saddr" else 1])), "ipv4_addr"
        if key in ("ip6 saddr", "ip6 daddr") and direction in ("original", "reply"):
            original = p.ct_original or (
                (p.src, p.dst) if p.ct_dir == "original" else (p.dst, p.src)
            )
            tup = original if direction == "original" else (p.ct_reply or original[::-1])
            return int(IPv6Address(tup[0 if key == "ip6 saddr" else 1])), "ipv6_addr"
        raise UnknownExpression(f"ct {direction or ''} {key}".replace("  ", " "))

    def _fib(self, f: dict, w: _Wire) -> str | None:
        """The output interface of the route to the packet's source (or
        destination); with iif/oif, only if it is that interface (strict)."""
        flags = set(f["flags"])
        if w.nfproto != "ipv4":
            raise NotModelled(f"fib for {w.nfproto}")
        saddr = _bits(w.nh, 96, 32)
        daddr = _bits(w.nh, 128, 32)
        if "saddr" in flags and saddr == 0 and (daddr == 0xFFFFFFFF or daddr >> 8 == 0xE00000):
            return w.iif or None  # (the kernel answers with the input device)
        r = self.route(saddr if "saddr" in flags else daddr)  # (no mark flag: mark 0)
        if r is None or r[0] != "unicast":
            return None
        dev = r[1]
        if "iif" in flags:
            return dev if dev == w.iif else None
        if "oif" in flags:
            return dev if dev == w.oif else None
        return dev
