"""What `dom0 host check` makes of the host it reads: parsing and judging, no I/O.

The shell (`controller.hostcheck`) reads the namespace's socket tables, the
processes holding those sockets, the nftables ruleset, libvirt's network
definitions and a few sysctls, and hands them here as text and plain data.
This module turns them into findings: each one thing that competes with dom0
on the managed bridge, and what the operator should do about it. A
`problem` makes the check fail; a `note` is context only.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DHCP_PORT = 67
DHCP6_PORT = 547
DNS_PORT = 53
# (protocol, port) -> what a listener there serves
SERVED = {
    ("udp", DHCP_PORT): "DHCP",
    ("udp", DHCP6_PORT): "DHCPv6",
    ("udp", DNS_PORT): "DNS",
    ("tcp", DNS_PORT): "DNS",
}
TCP_LISTEN = 0x0A
UDP_UNCONNECTED = 0x07  # a bound, unconnected UDP socket: a server's

# dom0's own nftables tables (controller/drivers/nft/ruleset.py; the baseline
# is the installer's boot firewall, which the controller takes over).
OWN_TABLES = frozenset(
    {("bridge", "dom0"), ("inet", "dom0"), ("inet", "dom0_wan"), ("inet", "dom0_baseline")}
)

PROBLEM = "problem"
NOTE = "note"


@dataclass(frozen=True, slots=True)
class Socket:
    proto: str  # udp | tcp (udp6/tcp6 folded in; `address` says which family)
    address: str
    port: int
    inode: int
    device: str | None = None  # bound to one interface (SO_BINDTODEVICE), as dnsmasq does

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.address).is_unspecified

    def where(self) -> str:
        a = f"[{self.address}]" if ":" in self.address else self.address
        dev = f"%{self.device}" if self.device else ""
        return f"{a}{dev}:{self.port}/{self.proto}"


@dataclass(frozen=True, slots=True)
class Holder:
    """A process holding a socket."""

    pid: int
    comm: str
    argv: tuple[str, ...]
    own: bool  # dom0's own dnsmasq or unbound (its record names this very process)


@dataclass(frozen=True, slots=True)
class Listener:
    socket: Socket
    holders: tuple[Holder, ...]  # empty: no process found (not root, or in flight)


@dataclass(frozen=True, slots=True)
class LibvirtNetwork:
    name: str
    file: str
    bridge: str | None
    forward: str | None  # forward mode; "nat" for a bare <forward/>; None: isolated
    dhcp: tuple[str, ...]  # "start-end" of each <dhcp><range>
    addresses: tuple[str, ...]  # <ip address=...> (libvirt puts them on the bridge)
    autostart: bool = False
    active: bool = False


@dataclass(frozen=True, slots=True)
class ForeignTable:
    family: str
    name: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Bridge:
    name: str
    kind: str | None  # "bridge", another link kind ("" if none), None: no such link
    addresses: tuple[str, ...] = ()  # bare addresses, both families


@dataclass(frozen=True, slots=True)
class Facts:
    bridge: Bridge
    listeners: tuple[Listener, ...] = ()
    tables: tuple[ForeignTable, ...] = ()
    own_tables: frozenset[tuple[str, str]] = frozenset()  # those of OWN_TABLES present
    networks: tuple[LibvirtNetwork, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()  # (file, why) of libvirt files not parsed
    sysctls: Mapping[str, str] = field(default_factory=dict)  # "net.ipv4.ip_forward" -> "1"
    wan: str | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # bridge | listener | nftables | libvirt | sysctl
    severity: str  # problem | note
    summary: str
    fix: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "details": dict(self.details)}


# ---- parsing ----------------------------------------------------------------------------


def _hex_address(text: str) -> str:
    """/proc/net's address: 4 or 16 bytes in hex, each 32-bit word in host
    (little-endian) order."""
    raw = bytes.fromhex(text)
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(swapped))


def parse_proc_net(text: str, proto: str) -> list[Socket]:
    """Server sockets in /proc/net/{udp,udp6,tcp,tcp6}: bound unconnected UDP
    sockets, listening TCP ones. `proto` is "udp" or "tcp"."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        local, state, inode = f[1], int(f[3], 16), int(f[9])
        if state != (TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED) or inode == 0:
            continue
        address, port = local.rsplit(":", 1)
        out.append(Socket(proto, _hex_address(address), int(port, 16), inode))
    return out


def serves(s: Socket) -> str | None:
    return SERVED.get((s.proto, s.port))


def socket_inode(link: str) -> int | None:
    """The inode of a /proc/PID/fd link target `socket:[12345]`."""
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return None


def option(argv: Sequence[str], name: str) -> list[str]:
    """Values of a GNU long option (`--name=v` or `--name v`) in argv."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith(f"{name}="):
            out.append(a.split("=", 1)[1])
        elif a == name and i + 1 < len(argv):
            out.append(argv[i + 1])
    return out


def parse_libvirt_network(text: str, file: str) -> LibvirtNetwork:
    """A libvirt network definition (`virsh net-dumpxml`'s format); ValueError
    if it is not one."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not XML: {e}") from None
    if root.tag != "network":
        raise ValueError(f"root element is <{root.tag}>, not <network>")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise ValueError("no <name>")
    bridge = root.find("bridge")
    forward = root.find("forward")
    mode = None if forward is None else forward.get("mode", "nat")
    dhcp = tuple(f"{r.get('start')}-{r.get('end')}" for r in root.iterfind("ip/dhcp/range"))
    addresses = tuple(a for ip in root.iterfind("ip") if (a := ip.get("address")))
    return LibvirtNetwork(
        name=name,
        file=file,
        bridge=None if bridge is None else bridge.get("name"),
        forward=mode,
        dhcp=dhcp,
        addresses=addresses,
    )


def parse_virsh_net_list(text: str) -> dict[str, tuple[bool, bool]]:
    """`virsh -q net-list --all`: name -> (active, autostart)."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3:
            out[f[0]] = (f[1] == "active", f[2] == "yes")
    return out


def _strings(v: object) -> Iterable[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)


def _keys(v: object) -> Iterable[str]:
    if isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from _keys(x)
    elif isinstance(v, list):
        for x in v:
            yield from _keys(x)


def foreign_tables(objs: Iterable[Mapping[str, Any]], bridge: str) -> list[ForeignTable]:
    """The tables of a ruleset listing (libnftables JSON, `nft -j list
    ruleset`'s "nftables" list) that are not dom0's and NAT, or touch the
    bridge: masquerade/snat anywhere (it rewrites what leaves, bridge traffic
    included), a rule or set naming the bridge, a base chain of the bridge
    family (it sees every bridge's frames), libvirt's chains."""
    reasons: dict[tuple[str, str], list[str]] = {}

    def add(family: str, table: str, why: str) -> None:
        if (family, table) in OWN_TABLES:
            return
        got = reasons.setdefault((family, table), [])
        if why not in got:
            got.append(why)

    for obj in objs:
        if "table" in obj:
            t = obj["table"]
            reasons.setdefault((t["family"], t["name"]), [])
            if t["name"].startswith("libvirt"):
                add(t["family"], t["name"], "libvirt's table")
        elif "chain" in obj:
            c = obj["chain"]
            if c["name"].startswith("LIBVIRT_"):
                add(c["family"], c["table"], f"libvirt's chain {c['name']}")
            if c["family"] == "bridge" and "hook" in c:
                add(c["family"], c["table"], f"filters bridged frames (chain {c['name']})")
        elif "rule" in obj:
            r = obj["rule"]
            keys = set(_keys(r.get("expr", [])))
            for nat in ("masquerade", "snat"):
                if nat in keys:
                    add(r["family"], r["table"], f"NAT: {nat} (chain {r['chain']})")
            if bridge in set(_strings(r.get("expr", []))):
                add(r["family"], r["table"], f"names {bridge} (chain {r['chain']})")
        elif "set" in obj or "map" in obj:
            s = obj.get("set") or obj["map"]
            if bridge in set(_strings(s.get("elem", []))):
                add(s["family"], s["table"], f"names {bridge} (set {s['name']})")
    return [ForeignTable(f, n, tuple(w)) for (f, n), w in reasons.items() if w]


def present_own_tables(objs: Iterable[Mapping[str, Any]]) -> frozenset[tuple[str, str]]:
    return frozenset(
        (o["table"]["family"], o["table"]["name"])
        for o in objs
        if "table" in o and (o["table"]["family"], o["table"]["name"]) in OWN_TABLES
    )


# ---- judging ----------------------------------------------------------------------------


def _libvirt_of(argv: Sequence[str]) -> str | None:
    """The libvirt network a dnsmasq serves (libvirt gives it
    --conf-file=/var/lib/libvirt/dnsmasq/NAME.conf)."""
    for conf in option(argv, "--conf-file"):
        if "/libvirt/dnsmasq/" in conf and conf.endswith(".conf"):
            return conf.rsplit("/", 1)[1][: -len(".conf")]
    return None


def _on_bridge(s: Socket, bridge: Bridge) -> bool:
    if s.device is not None:
        return s.device == bridge.name
    return s.wildcard or s.address in bridge.addresses


def _listener_findings(facts: Facts) -> list[Finding]:
    out = []
    br = facts.bridge.name
    for lst in facts.listeners:
        s = lst.socket
        what = serves(s)
        if what is None or not _on_bridge(s, facts.bridge):
            continue
        if lst.holders and all(h.own for h in lst.holders):
            continue
        scope = f"a wildcard address ({br} included)" if s.wildcard and s.device is None else br
        if not lst.holders:
            out.append(
                Finding(
                    "listener",
                    PROBLEM,
                    f"{what} server socket {s.where()} on {scope}, held by no process visible here",
                    "run the check as root to name the process; stop it or bind it elsewhere",
                    {"socket": s.where(), "serves": what, "inode": s.inode, "pids": []},
                )
            )
            continue
        for h in lst.holders:
            if h.own:
                continue
            details: dict[str, Any] = {
                "socket": s.where(),
                "serves": what,
                "inode": s.inode,
                "pid": h.pid,
                "comm": h.comm,
                "cmdline": list(h.argv),
            }
            extra = ""
            if h.comm == "dnsmasq":
                interfaces = option(h.argv, "--interface")
                confs = option(h.argv, "--conf-file")
                details.update(interface=interfaces, conf_file=confs)
                shown = [f"--interface={i}" for i in interfaces] + [
                    f"--conf-file={c}" for c in confs
                ]
                extra = f" ({' '.join(shown)})" if shown else ""
            network = _libvirt_of(h.argv)
            if network is not None:
                details["libvirt_network"] = network
                fix = (
                    f"libvirt's network {network!r} runs it: virsh net-destroy {network}; "
                    f"virsh net-autostart --disable {network} (docs/host.md)"
                )
            else:
                fix = (
                    f"stop pid {h.pid} (and whatever starts it), or make it serve another "
                    f"interface than {br}: dom0's dnsmasq answers DHCP on {br}"
                )
            out.append(
                Finding(
                    "listener",
                    PROBLEM,
                    f"{h.comm} pid {h.pid} serves {what} on {scope} ({s.where()}){extra}",
                    fix,
                    details,
                )
            )
    return out


def _libvirt_findings(facts: Facts) -> list[Finding]:
    out = []
    br = facts.bridge.name
    for file, why in facts.unreadable:
        out.append(
            Finding(
                "libvirt",
                NOTE,
                f"libvirt network file {file} not read: {why}",
                "check it with virsh net-dumpxml",
                {"file": file},
            )
        )
    for n in facts.networks:
        if n.bridge != br:
            continue
        state = ", ".join(
            [
                ("active" if n.active else "inactive"),
                ("autostart" if n.autostart else "no autostart"),
            ]
        )
        details = {**asdict(n), "dhcp": list(n.dhcp), "addresses": list(n.addresses)}
        if n.forward == "bridge" and not n.addresses:
            out.append(
                Finding(
                    "libvirt",
                    NOTE,
                    f"libvirt network {n.name!r} attaches guests to {br} ({n.file}; {state})",
                    "nothing to do: the network dom0 expects (forward mode bridge, no <ip>)",
                    details,
                )
            )
            continue
        parts = [f"forward mode {n.forward}" if n.forward else "isolated"]
        if n.addresses:
            parts.append(f"address {', '.join(n.addresses)} on {br}")
        if n.dhcp:
            parts.append(f"its own dnsmasq with DHCP {', '.join(n.dhcp)}")
        if n.forward in ("nat", "route"):
            parts.append("its own NAT/forward rules")
        out.append(
            Finding(
                "libvirt",
                PROBLEM,
                f"libvirt network {n.name!r} creates {br} itself: {'; '.join(parts)} "
                f"({n.file}; {state})",
                f"virsh net-destroy {n.name}; virsh net-autostart --disable {n.name}; then "
                f"define a bridge-mode network on {br} (docs/host.md)",
                details,
            )
        )
    return out


def _sysctl_findings(facts: Facts) -> list[Finding]:
    out = []
    fwd = facts.sysctls.get("net.ipv4.ip_forward")
    if fwd == "0":
        if ("inet", "dom0") in facts.own_tables:
            out.append(
                Finding(
                    "sysctl",
                    PROBLEM,
                    "net.ipv4.ip_forward is 0 while dom0's tables are in place: "
                    "nothing is routed between the domains and the uplink",
                    "find what turned it off (sysctl.d, another network manager); the "
                    "controller sets it to 1 when it starts",
                    {"net.ipv4.ip_forward": fwd},
                )
            )
        else:
            out.append(
                Finding(
                    "sysctl",
                    NOTE,
                    "net.ipv4.ip_forward is 0",
                    "nothing to do: the controller sets it to 1 when it starts",
                    {"net.ipv4.ip_forward": fwd},
                )
            )
    rp_all = facts.sysctls.get("net.ipv4.conf.all.rp_filter")
    for iface in (facts.bridge.name, facts.wan):
        if iface is None:
            continue
        own = facts.sysctls.get(f"net.ipv4.conf.{iface}.rp_filter")
        if own is None or rp_all is None:
            continue
        # the kernel applies the larger of `all` and the interface's value
        effective = max(int(rp_all), int(own))
        if effective:
            out.append(
                Finding(
                    "sysctl",
                    NOTE,
                    f"kernel reverse-path filter on {iface}: "
                    f"{'strict' if effective == 1 else 'loose'} (rp_filter={effective})",
                    "nothing required: dom0's own tables filter the machines' sources "
                    "strictly, whatever this says",
                    {"interface": iface, "rp_filter": effective},
                )
            )
    return out


def judge(facts: Facts) -> list[Finding]:
    """Every finding, problems first."""
    br = facts.bridge
    out: list[Finding] = []
    if br.kind is None:
        out.append(
            Finding(
                "bridge",
                PROBLEM,
                f"bridge {br.name} does not exist in this network namespace",
                f"create it in the host's network configuration (docs/host.md), or run "
                f"the check where {br.name} lives (ip netns exec NS dom0 host check ...)",
                {"bridge": br.name},
            )
        )
    elif br.kind != "bridge":
        out.append(
            Finding(
                "bridge",
                PROBLEM,
                f"{br.name} is not a bridge (link kind {br.kind or 'none'})",
                f"make {br.name} a Linux bridge (docs/host.md), or name the right one in "
                "[bridge] of the policy",
                {"bridge": br.name, "kind": br.kind},
            )
        )
    out += _listener_findings(facts)
    for t in facts.tables:
        libvirt = any("libvirt" in r for r in t.reasons)
        fix = (
            "libvirt's rules: stop libvirt's network on this bridge "
            "(virsh net-destroy NAME; virsh net-autostart --disable NAME)"
            if libvirt
            else f"remove it if nobody needs it (nft delete table {t.family} {t.name}), or "
            f"keep it off {br.name} and the domains' traffic: dom0 does the NAT"
        )
        out.append(
            Finding(
                "nftables",
                PROBLEM,
                f"table {t.family} {t.name} is not dom0's: {'; '.join(t.reasons)}",
                fix,
                {"family": t.family, "table": t.name, "reasons": list(t.reasons)},
            )
        )
    out += _libvirt_findings(facts)
    out += _sysctl_findings(facts)
    return sorted(out, key=lambda f: f.severity != PROBLEM)


def failed(findings: Iterable[Finding]) -> bool:
    return any(f.severity == PROBLEM for f in findings)
