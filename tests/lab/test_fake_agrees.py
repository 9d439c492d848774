"""The fake data plane cannot drift from the kernel: real packets through the
real kernel get the verdicts `controller.drivers.nft.fake` gives them.

A lab with the controller (both modes: domains on the bridge, and hub
domains inside WireGuard tunnels), plus a quarantined machine. The fake is
built from what the kernel holds: dom0's sets read back with `Nft.read`
inside NAME-dom0 (which also checks that the kernel's chains are the ones
`ruleset.chains` describes, and the kill switch the one the policy implies).
Then a few hundred crafted packets, each with a unique marker in its payload
(in an ARP frame's padding, in a DHCP message's sname), are sent from the VMs'
namespaces — Ethernet frames on eth0 as the guest's NIC would, or (hub mode)
IP packets into the VM's tunnel — and looked for everywhere they could
arrive: every VM (`forge.Sniffer`), the internet side (NAME-wan: through the
VPN on to-vpn, or in the clear from dom0's WAN on to-dom0), and dom0 itself
(raw IP sockets, which see only what inet input accepted, and ARP on virbr0,
after bridge input). For every packet the set of places it reached must be
the set the fake says; a disagreement is reported one line per packet.

Sent in phases, each evaluated against the sets read just before it: what
machines may send (allowed, isolated, to dom0's services, the internet, DHCP,
ARP, broadcasts, IPv6); replies and ICMP errors of flows that the first phase
opened (conntrack says established/related, and so does the packet given to
the fake); forged source addresses; forged source MACs last, since a frame
with a forged MAC that passes the bridge's ingress teaches the FDB (which the
fake does not model) and would misdirect later frames to its victim.

Places a packet reaches at its own sender are ignored: they are answers
(echo replies, ICMP errors quoting the packet), never the packet.

Before the sample, a few single packets check *which rule* drops them, as a
future `dom0 policy explain` will say: the kernel's rule counters must move
for exactly the counted rules the fake names (among them a forged source
that inet's reverse path check drops before bridge input polices it:
br_netfilter runs inet prerouting from the bridge's prerouting hook).
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from controller.core.desired import policy_state
from controller.drivers.nft.fake import DOM0, Dhcp, FakeDataPlane, Packet, Verdict
from controller.lab import build, controllerproc, dhcpclient, forge, netns, processes, topology
from controller.lab.rundir import Lab, LabError
from controller.lab.wait import wait_for
from controller.policy.load import load_policy

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
POLICIES = {"bridge": ROOT / "policies" / "lab-bridge.toml", "hub": build.DEFAULT_POLICY}
QUARANTINED_MAC = "00:16:3e:00:00:01"
ECHO = topology.ECHO_ADDRESS
BCAST = forge.BROADCAST
WAN_ADDRESS = (topology.DOM0_WAN_IF, f"{topology.DOM0_WAN}/{topology.WAN_PREFIX}")
PY = sys.executable
MIN_PACKETS = 200
DOMAIN_GATEWAYS = {"x": "10.10.0.1", "y": "10.20.0.1"}

# ---- what the kernel holds -------------------------------------------------------------------

_READ_KERNEL = """
import json, sys
from controller.core.desired import policy_state
from controller.drivers.nft import Nft
from controller.policy.load import load_policy
state = policy_state(load_policy(sys.argv[1]), [])
nft = Nft()
k = nft.read(state.shape)
print(json.dumps({
    "shape_matches": k.shape_matches,
    "killswitch": state.killswitch is None or nft.killswitch_matches(state.killswitch),
    "sets": {f"{f}/{n}": sorted(map(list, v)) for (f, n), v in k.sets.items()},
}))
"""


def kernel_sets(lab: Lab) -> dict[tuple[str, str], frozenset[tuple[str, ...]]]:
    """dom0's sets as the kernel holds them (read inside NAME-dom0: a
    libnftables context is bound to the namespace it is created in)."""
    out = netns.run(
        lab.dom0_ns, [PY, "-c", _READ_KERNEL, str(lab.policy_path)], env=processes.python_env()
    )
    got = json.loads(out.stdout)
    assert got["shape_matches"], "the kernel's chains are not the ones ruleset.chains describes"
    assert got["killswitch"], "the kernel's kill switch is not the one the policy implies"
    return {tuple(k.split("/", 1)): frozenset(tuple(e) for e in v) for k, v in got["sets"].items()}


def fake_of(lab: Lab, sets: dict[tuple[str, str], frozenset[tuple[str, ...]]]) -> FakeDataPlane:
    state = policy_state(load_policy(lab.policy_path), [])
    return FakeDataPlane(
        state.shape,
        sets,
        [*state.addresses, WAN_ADDRESS],
        killswitch=state.killswitch,
        bridge_mac=topology.BRIDGE_MAC,
        routes=[*state.routes, *container_routes(sets, state.shape.bridge)],
    )


def container_routes(sets: dict[tuple[str, str], frozenset[tuple[str, ...]]], bridge: str) -> list:
    """dom0's route to each containers prefix the kernel binds, through the
    machine bound on the same port and MAC (as machine_state makes them)."""
    address = {(port, mac): ip for port, mac, ip in sets.get(("bridge", "binding"), ())}
    return [
        (prefix, address[port, mac], bridge)
        for port, mac, prefix in sets.get(("bridge", "binding_net"), ())
        if (port, mac) in address
    ]


# ---- seeing where packets arrive -------------------------------------------------------------

# dom0's observer: raw IP sockets get a copy of what the stack delivers
# locally, after inet input (a drop there never reaches them); ARP frames on
# the bridge device are what bridge input passed up. ICMP other than echo
# requests is skipped (errors and replies quote other packets' markers). A
# canary datagram to itself proves it live at the start, and at the end that
# everything before it has been read.
_OBSERVER = r"""
import json, os, re, select, signal, socket, sys, time
marker, out, bridge = bytes.fromhex(sys.argv[1]), open(sys.argv[2], "a", buffering=1), sys.argv[3]
found = re.compile(re.escape(marker) + rb"(\d{5})")
socks = {}
for fam, proto in ((socket.AF_INET, 17), (socket.AF_INET, 6), (socket.AF_INET, 1),
                   (socket.AF_INET6, 17), (socket.AF_INET6, 58)):
    s = socket.socket(fam, socket.SOCK_RAW, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    socks[s.fileno()] = (s, fam, proto)
arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
arp.bind((bridge, 0))
socks[arp.fileno()] = (arp, socket.AF_PACKET, 0)
token = b"fake-observer-canary-" + os.urandom(6).hex().encode() + b"-"
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(time.monotonic()))
want, seen, sent = 0, -1, 0.0
while True:
    if stopping:
        want = 1
        if seen >= 1:
            break
        if time.monotonic() - stopping[0] > 5:
            out.write(json.dumps({"canary_lost": True}) + "\n")
            break
    if seen < want and time.monotonic() - sent > 0.5:
        tx.sendto(token + str(want).encode(), ("127.0.0.1", 9))
        sent = time.monotonic()
    for fd in select.select(list(socks), [], [], 0.05)[0]:
        s, fam, proto = socks[fd]
        data, addr = s.recvfrom(65535)
        if fam == socket.AF_PACKET and addr[2] == 4:  # dom0's own ARP, outgoing
            continue
        if token in data:
            n = int(data.rsplit(b"-", 1)[1])
            if n > seen:
                seen = n
                if n == 0:
                    out.write(json.dumps({"ready": True}) + "\n")
            continue
        if fam == socket.AF_INET and proto == 1 and data[(data[0] & 15) * 4] != 8:
            continue
        ids = [int(m) for m in found.findall(data)]
        if ids:
            out.write(json.dumps({"ids": ids, "via": "arp" if proto == 0 else "ip"}) + "\n")
out.write(json.dumps({"done": True}) + "\n")
"""


class Dom0Observer:
    def __init__(self, lab: Lab, marker: bytes) -> None:
        self.lab = lab
        self.marker = marker
        self.role = "fake-observer"
        self.out = lab.logs_dir / f"{self.role}.jsonl"
        self.proc: processes.ProcId | None = None

    def _lines(self) -> list[dict]:
        try:
            return [json.loads(x) for x in self.out.read_text().splitlines() if x.endswith("}")]
        except FileNotFoundError:
            return []

    def start(self) -> Dom0Observer:
        self.out.unlink(missing_ok=True)
        argv = netns.exec_argv(
            self.lab.dom0_ns, [PY, "-c", _OBSERVER, self.marker.hex(), str(self.out),
                               topology.BRIDGE],
        )  # fmt: skip
        log = self.lab.logs_dir / f"{self.role}.log"
        _, self.proc = processes.spawn(argv, log=log, env=processes.python_env())
        self.lab.record_process(self.role, self.proc, self.lab.dom0_ns, argv)
        proc = self.proc
        wait_for(
            lambda: any(x.get("ready") for x in self._lines()) or not processes.is_running(proc),
            what="dom0's observer to see its canary",
        )
        if not any(x.get("ready") for x in self._lines()):
            raise LabError(f"dom0's observer died: {log.read_text(errors='replace')[-300:]}")
        return self

    def stop(self) -> list[int]:
        assert self.proc is not None
        forge.settle()
        processes.send_signal(self.proc, signal.SIGTERM)
        if not processes.wait_exit(self.proc, 10.0):
            processes.stop([self.proc])
        self.lab.forget_process(self.role)
        self.proc = None
        lines = self._lines()
        if not any(x.get("done") for x in lines) or any(x.get("canary_lost") for x in lines):
            raise LabError("dom0's observer did not finish its capture cleanly")
        return [n for x in lines for n in x.get("ids", [])]


@dataclass
class Observers:
    """Every place a packet can reach, by the names `where()` gives."""

    lab: Lab
    marker: bytes
    vms: list[int]

    def __enter__(self) -> Observers:
        tag = self.marker[-6:].decode()
        self.sniffers = {
            f"vm{i}": forge.Sniffer(self.lab, self.lab.vm_ns(i), self.marker, f"fake-vm{i}-{tag}")
            for i in self.vms
        }
        self.sniffers["wan"] = forge.Sniffer(
            self.lab, self.lab.wan_ns, self.marker, f"fake-wan-{tag}"
        )
        self.dom0 = Dom0Observer(self.lab, self.marker)
        try:
            for s in self.sniffers.values():
                s.start()
            self.dom0.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for s in self.sniffers.values():
            if s.proc is not None:
                s.stop()
        if self.dom0.proc is not None:
            self.dom0.stop()

    def seen(self) -> dict[int, set[str]]:
        """packet number -> where it arrived (stops the observers)."""
        found = re.compile(re.escape(self.marker) + rb"(\d{5})")
        where: dict[int, set[str]] = {}
        for label, s in self.sniffers.items():
            for f in s.stop().frames:
                if label == "wan":
                    place = {"to-vpn": "internet", topology.WAN_PORT_DOM0: "wan-clear"}.get(
                        f.ifname
                    )
                    if place is None:
                        continue  # (the same packet again on inet0)
                else:
                    place = label
                for n in found.findall(f.data):
                    where.setdefault(int(n), set()).add(place)
        for n in self.dom0.stop():
            where.setdefault(n, set()).add("dom0")
        return where


# ---- the lab's machines, and the packets ------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    index: int
    mac: str
    port: str
    domain: str
    bridge_ip: str  # its address on the bridge (the hub address in hub mode)
    tunnel_ip: str | None  # its domain address inside its tunnel (hub mode)
    gateway: str  # dom0's address it talks to for its domain's services


@dataclass(frozen=True)
class Case:
    n: int
    what: str  # "category: description"
    sender: int
    packet: Packet
    l3: bool = False  # an IP packet into the VM's own stack (its tunnel)


@dataclass
class Sample:
    machines: dict[int, Machine]
    marker: bytes
    gateways: dict[str, str]  # domain -> dom0's address for it on the bridge
    hub: bool
    cases: list[Case]

    def add(self, what: str, sender: int, packet: Packet, l3: bool = False) -> None:
        n = len(self.cases)
        tag = self.marker + b"%05d" % n
        if packet.ether_type == "ip" and packet.proto == "udp" and packet.dhcp is not None:
            packet = replace(packet, payload=tag)
        else:
            packet = replace(packet, payload=packet.payload + tag)
        if packet.proto == "icmp" and packet.icmp_type == "echo-request":
            packet = replace(packet, icmp_id=n)
        self.cases.append(Case(n, what, sender, packet, l3))

    def sport(self) -> int:
        return 20000 + len(self.cases)  # every flow its own: conntrack never mixes two cases


def machines_of(lab: Lab, hub: bool) -> dict[int, Machine]:
    by_mac = {m["mac"]: m for m in controllerproc.status(lab)}
    out = {}
    for i in build.vm_indexes(lab):
        m = by_mac[lab.vm(i)["mac"]]
        domain = m["domain"] or "quarantine"
        tunnel = m["address"] if m.get("underlay") else None
        bridge_ip = m.get("underlay") or m["address"]
        gateway = DOMAIN_GATEWAYS.get(domain, "10.99.0.1")
        out[i] = Machine(i, m["mac"], m["port"], domain, bridge_ip, tunnel, gateway)
    return out


def frame(s: Sample, i: int, dst_mac: str | None, **kw: Any) -> Packet:
    m = s.machines[i]
    kw.setdefault("src", m.bridge_ip)
    kw.setdefault("sport", s.sport())
    return Packet(m.port, m.mac, dst_mac, **kw)


def services(s: Sample, i: int, dst: str, label: str) -> None:
    for proto, port in (("udp", 53), ("tcp", 53), ("tcp", 22), ("udp", 123)):
        s.add(f"{label} {proto}/{port}", i, frame(s, i, None, dst=dst, proto=proto, dport=port))
    s.add(f"{label} ping", i, frame(s, i, None, dst=dst, proto="icmp"))


def phase_machines(s: Sample) -> None:
    """What machines may (or may not) send, from their own MAC and address."""
    ms = s.machines
    for i, m in ms.items():
        q = "quarantined: " if m.domain == "quarantine" else ""
        for j, o in ms.items():
            if j == i:
                continue
            kind = "allowed" if m.domain == o.domain and not s.hub and not q else "isolated"
            c = f"{q or kind + ': '}vm{i} -> vm{j}"
            for proto, port in (("udp", 7), ("tcp", 80), ("icmp", 0)):
                p = frame(s, i, o.mac, dst=o.bridge_ip, proto=proto, dport=port)
                s.add(f"{c} bridged {proto}", i, p)
            s.add(f"{c} routed udp", i, frame(s, i, None, dst=o.bridge_ip, dport=7))
            # a forged destination MAC: j's, with another machine's address
            k = next(k for k in ms if k not in (i, j))
            p = frame(s, i, o.mac, dst=ms[k].bridge_ip, dport=7)
            s.add(f"isolated: vm{i} -> vm{k}'s address at vm{j}'s MAC", i, p)
            # ARP for j's address (broadcast), and an answer to j (unicast)
            p = frame(s, i, BCAST, ether_type="arp", dst=o.bridge_ip)
            s.add(f"{c} arp who-has", i, p)
            p = frame(s, i, o.mac, ether_type="arp", arp_op=2, dst=o.bridge_ip, arp_tha=o.mac)
            s.add(f"{c} arp reply", i, p)
            # DHCP to a machine (never port to port)
            p = frame(s, i, o.mac, dst=o.bridge_ip, sport=68, dport=67)
            s.add(f"{q or 'isolated: '}vm{i} -> vm{j} dhcp", i, p)
        # dom0's services: on its own gateway, the others, and dom0's other addresses
        for domain, gw in s.gateways.items():
            own = domain == m.domain or (s.hub and domain == "hub")
            services(s, i, gw, f"{q or 'dom0: '}vm{i} -> {'own' if own else domain} gateway {gw}")
        if s.hub:
            for gw in ("10.10.0.1", "10.20.0.1"):  # the hub domains' gateways, on hub0
                services(s, i, gw, f"isolated: vm{i} underlay -> {gw}")
        for addr in (topology.DOM0_WAN, "10.200.0.2"):
            s.add(f"isolated: vm{i} -> dom0 {addr}", i, frame(s, i, None, dst=addr, dport=53))
        # the internet, and the WAN's own subnet
        for proto, port in (("tcp", 80), ("udp", 7), ("icmp", 0)):
            p = frame(s, i, None, dst=ECHO, proto=proto, dport=port)
            s.add(f"{q or 'internet: '}vm{i} -> {ECHO} {proto}", i, p)
        for addr, port in ((topology.WAN_GATEWAY, 7), (topology.VPN_WAN, 51820)):
            s.add(f"isolated: vm{i} -> {addr}", i, frame(s, i, None, dst=addr, dport=port))
        # DHCP: its own, about another MAC, malformed
        peer = ms[i % len(ms) + 1]
        dhcp = {"src": "0.0.0.0", "dst": "255.255.255.255", "sport": 68, "dport": 67}
        d = f"{q or 'dhcp: '}vm{i}"
        s.add(f"{d} discover", i, frame(s, i, BCAST, **dhcp))
        # (a renewing client has its address: from 0.0.0.0 a unicast is a martian)
        renew = {**dhcp, "src": m.bridge_ip, "dst": m.gateway}
        s.add(f"{d} request to {m.gateway}", i, frame(s, i, None, **renew))
        for what, fields in (
            (f"about vm{peer.index}'s MAC", Dhcp(chaddr=peer.mac)),
            ("as a relay", Dhcp(giaddr=m.bridge_ip)),
            ("as a server", Dhcp(op=2, chaddr=m.mac)),
            ("not Ethernet", Dhcp(htype=6)),
        ):
            s.add(f"spoofed: {d} {what}", i, frame(s, i, BCAST, dhcp=fields, **dhcp))
        s.add(f"{d} from port 1234", i, frame(s, i, BCAST, **{**dhcp, "sport": 1234}))
        # ARP for the gateway, an ARP probe; broadcasts; IPv6
        s.add(f"dom0: vm{i} arp who-has {m.gateway}", i,
              frame(s, i, BCAST, ether_type="arp", dst=m.gateway))  # fmt: skip
        s.add(f"dom0: vm{i} arp probe", i,
              frame(s, i, BCAST, ether_type="arp", src="0.0.0.0", dst=peer.bridge_ip))  # fmt: skip
        s.add(f"isolated: vm{i} broadcast udp", i,
              frame(s, i, BCAST, dst="255.255.255.255", dport=9999))  # fmt: skip
        # its subnet's broadcast: to the ports of its domain, if its members reach each other
        subnet = ipaddress.ip_network(f"{m.bridge_ip}/{16 if m.tunnel_ip else 24}", strict=False)
        kind = q or ("isolated: " if s.hub else "allowed: ")
        s.add(f"{kind}vm{i} broadcast to {subnet.broadcast_address}", i,
              frame(s, i, BCAST, dst=str(subnet.broadcast_address), dport=9999))  # fmt: skip
        s.add(f"isolated: vm{i} ipv6 multicast", i,
              frame(s, i, "33:33:00:00:00:01", ether_type="ip6", src="fe80::5054:ff:fed0:1",
                    dst="ff02::1", dport=9999))  # fmt: skip


def phase_tunnels(s: Sample) -> None:
    """Hub mode: IP packets into each VM's tunnel, from its domain address."""
    ms = {i: m for i, m in s.machines.items() if m.tunnel_ip}
    for i, m in ms.items():
        src = m.tunnel_ip
        assert src is not None, f"vm{i}: no tunnel address in hub mode"
        for j, o in ms.items():
            if j == i:
                continue
            kind = "allowed" if m.domain == o.domain else "isolated"
            for proto, port in (("udp", 7), ("tcp", 80), ("icmp", 0)):
                assert o.tunnel_ip is not None
                p = Packet("hub0", src=src, dst=o.tunnel_ip, proto=proto, sport=s.sport(),
                           dport=port)  # fmt: skip
                s.add(f"{kind}: vm{i} -> vm{j} in the tunnel {proto}", i, p, l3=True)
        for gw in ("10.10.0.1", "10.20.0.1"):
            own = gw == DOMAIN_GATEWAYS[m.domain]
            for proto, port in (("udp", 53), ("tcp", 53), ("tcp", 22)):
                p = Packet("hub0", src=src, dst=gw, proto=proto, sport=s.sport(), dport=port)
                label = "own" if own else "other"
                s.add(f"dom0: vm{i} -> {label} gateway {gw} {proto}/{port} in the tunnel", i, p,
                      l3=True)  # fmt: skip
            p = Packet("hub0", src=src, dst=gw, proto="icmp")
            s.add(f"dom0: vm{i} -> {gw} ping in the tunnel", i, p, l3=True)
        for proto, port in (("tcp", 80), ("udp", 7), ("icmp", 0)):
            p = Packet("hub0", src=src, dst=ECHO, proto=proto, sport=s.sport(), dport=port)
            s.add(f"internet: vm{i} -> {ECHO} in the tunnel {proto}", i, p, l3=True)
        p = Packet("hub0", src=src, dst=topology.WAN_GATEWAY, sport=s.sport(), dport=7)
        s.add(f"isolated: vm{i} -> {topology.WAN_GATEWAY} in the tunnel", i, p, l3=True)


def phase_replies(s: Sample, opened: list[Case]) -> None:
    """Answers to the UDP flows phase 1 opened between machines: the reply
    (established), an ICMP error from the destination (related), and the same
    error forged by a machine of another domain (related, not its flow)."""
    ms = s.machines
    for c in opened:
        p = c.packet
        i = c.sender
        j = next(k for k, m in ms.items() if m.bridge_ip == p.dst)
        back = frame(s, j, ms[i].mac, src=p.dst, dst=p.src, sport=p.dport, dport=p.sport,
                     ct="established", ct_dir="reply", ct_original=(p.src, p.dst))  # fmt: skip
        s.add(f"allowed: vm{j} answers vm{i}", j, back)
        quote = p.l3()[:28]  # its IP header and UDP header, as an ICMP error quotes them
        err = {"proto": "icmp", "icmp_type": "destination-unreachable", "icmp_code": 3,
               "payload": quote, "ct": "related", "ct_original": (p.src, p.dst)}  # fmt: skip
        s.add(f"allowed: vm{j} port unreachable to vm{i}", j,
              frame(s, j, ms[i].mac, dst=p.src, sport=0, **err))  # fmt: skip
        k = next(k for k, m in ms.items() if m.domain not in (ms[i].domain, "quarantine"))
        s.add(f"spoofed: vm{k} forges vm{j}'s port unreachable to vm{i}", k,
              frame(s, k, None, dst=p.src, sport=0, **err))  # fmt: skip


def phase_forged_addresses(s: Sample) -> None:
    ms = s.machines
    for i, m in ms.items():
        same = next((o for o in ms.values() if o.domain == m.domain and o.index != i), None)
        other = next(o for o in ms.values() if o.domain not in (m.domain, "quarantine"))
        pool = m.bridge_ip.rsplit(".", 1)[0]
        forged = [other.bridge_ip, f"{pool}.77", ECHO] + ([same.bridge_ip] if same else [])
        target = same or other
        for src in forged:
            for what, dst_mac, dst, port in (
                (f"vm{target.index}", target.mac, target.bridge_ip, 7),
                (ECHO, None, ECHO, 80),
                ("its gateway", None, m.gateway, 53),
            ):
                p = frame(s, i, dst_mac, src=src, dst=dst, dport=port)
                s.add(f"spoofed: vm{i} as {src} -> {what}", i, p)
        p = frame(s, i, BCAST, ether_type="arp", src=other.bridge_ip, dst=target.bridge_ip)
        s.add(f"spoofed: vm{i} arp as {other.bridge_ip}", i, p)


def phase_containers(s: Sample, prefixes: dict[int, str]) -> None:
    """Bridge domains with `containers`: a machine's containers (sent from its
    delegated prefix, as its agent routes them) to its domain's other machine,
    another domain's, another machine's containers, the internet and dom0's
    DNS; and the same machine sending from another machine's prefix."""
    ms = s.machines
    for i, prefix in prefixes.items():
        m = ms[i]
        net = ipaddress.ip_network(prefix)
        mine = str(net.network_address + 2)
        same = next((o for o in ms.values() if o.domain == m.domain and o.index != i), None)
        other = next(o for o in ms.values() if o.domain not in (m.domain, "quarantine"))
        theirs = prefixes.get(same.index) if same is not None else None
        neighbour = same.index if same is not None else 0
        targets = [(f"vm{other.index}", other.bridge_ip, 7), (ECHO, ECHO, 80),
                   ("its gateway", m.gateway, 53)]  # fmt: skip
        if same is not None:
            targets.append((f"vm{same.index}", same.bridge_ip, 7))
        if theirs is not None:
            targets.append((f"vm{neighbour}'s containers", str(ipaddress.ip_network(theirs).network_address + 3), 7))  # fmt: skip
        for what, dst, port in targets:
            for proto in ("udp", "tcp"):
                p = frame(s, i, None, src=mine, dst=dst, proto=proto, dport=port)
                s.add(f"container: vm{i}'s {mine} -> {what} {proto}", i, p)
        if theirs is not None:
            forged = str(ipaddress.ip_network(theirs).network_address + 4)
            for what, dst, port in targets[:3]:
                p = frame(s, i, None, src=forged, dst=dst, dport=port)
                s.add(f"spoofed: vm{i} as vm{neighbour}'s container {forged} -> {what}", i, p)


def delegated(lab: Lab, s: Sample) -> dict[int, str]:
    policy = load_policy(lab.policy_path)
    out = {}
    for i, m in s.machines.items():
        d = policy.domains.get(m.domain)
        prefix = d.delegated(m.bridge_ip) if d is not None else None
        if prefix is not None:
            out[i] = str(prefix)
    return out


def phase_forged_macs(s: Sample) -> None:
    ms = s.machines
    for i, m in ms.items():
        victim = ms[i % len(ms) + 1]
        target = next((o for o in ms.values() if o.domain == m.domain and o.index != i), victim)
        # a MAC of nobody's, of a rule other than the sender's (a MAC of the
        # sender's own rule would carry its identity on: port security)
        parity = 0 if m.domain == "x" else 1
        stranger = f"52:54:00:d0:4e:{(2 * i + parity) & 0xFF:02x}"
        for forged in (victim.mac, stranger):
            for what, dst_mac, dst, port in (
                (f"vm{target.index}", target.mac, target.bridge_ip, 7),
                (ECHO, None, ECHO, 80),
                ("its gateway", None, m.gateway, 53),
            ):
                p = replace(frame(s, i, dst_mac, dst=dst, dport=port), src_mac=forged)
                s.add(f"spoofed: vm{i} as MAC {forged} -> {what}", i, p)
        p = frame(s, i, BCAST, ether_type="arp", dst=target.bridge_ip, arp_sha=victim.mac)
        s.add(f"spoofed: vm{i} arp with sender MAC {victim.mac}", i, p)


# ---- sending and comparing --------------------------------------------------------------------


def send_all(lab: Lab, cases: list[Case]) -> None:
    by: dict[tuple[int, bool], list[Case]] = {}
    for c in cases:
        by.setdefault((c.sender, c.l3), []).append(c)
    for (i, l3), group in by.items():
        frames = [c.packet.l3() if l3 else c.packet.frame(topology.BRIDGE_MAC) for c in group]
        tag = f"fake-{group[0].n}-vm{i}"
        sent = forge.send(lab, lab.vm_ns(i), frames, tag=tag, l3=l3, burst=10, pause=0.002)
        assert sent == len(frames)


def expected(fake: FakeDataPlane, s: Sample, c: Case) -> tuple[set[str], Verdict]:
    v = fake.verdict(c.packet)
    where = set()
    for place in v.delivered:
        if place == DOM0:
            where.add("dom0")
        elif place == "hub0":  # to the peer whose tunnel address it is
            peer = next((m for m in s.machines.values() if m.tunnel_ip == c.packet.dst), None)
            where.add(f"vm{peer.index}" if peer else "hub0 (no such peer)")
        elif place == "wg0":
            where.add("internet")
        elif place == topology.DOM0_WAN_IF:
            where.add("wan-clear")
        else:
            peer = next((m for m in s.machines.values() if m.port == place), None)
            where.add(f"vm{peer.index}" if peer else place)
    return where, v


def run_phases(
    lab: Lab, s: Sample, phases: list[tuple[str, Callable[[], None]]]
) -> tuple[list[str], Counter[str]]:
    """Send each phase's packets; returns the disagreements (one line each)
    and how many packets of each category passed and were dropped."""
    disagree: list[str] = []
    tally: Counter[str] = Counter()
    fakes: dict[int, FakeDataPlane] = {}
    phase_of: dict[int, str] = {}
    reads: list[tuple[str, dict]] = []
    with Observers(lab, s.marker, sorted(s.machines)) as obs:
        for name, build_phase in phases:
            first = len(s.cases)
            build_phase()
            sets = kernel_sets(lab)
            reads.append((name, sets))
            fake = fake_of(lab, sets)
            for c in s.cases[first:]:
                fakes[c.n] = fake
                phase_of[c.n] = name
            send_all(lab, s.cases[first:])
            forge.settle()
        reads.append(("the end", kernel_sets(lab)))
        seen = obs.seen()
    # (the sets must hold still: a phase's packets met the sets read before it)
    for (name, a), (_next, b) in pairwise(reads):
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if changed:
            disagree.append(f"the controller changed {changed} during phase {name!r}")
    for c in s.cases:
        want, v = expected(fakes[c.n], s, c)
        got = seen.get(c.n, set()) - {f"vm{c.sender}"}
        category = c.what.split(":", 1)[0]
        tally[f"{category} {'passed' if got else 'dropped'}"] += 1
        if got != want:
            disagree.append(
                f"#{c.n} [{phase_of[c.n]}] {c.what}: kernel {sorted(got) or 'dropped'}, "
                f"fake {sorted(want) or 'dropped'} ({v})"
            )
    return disagree, tally


# ---- which rule: the kernel's counters ---------------------------------------------------------


def counters(lab: Lab) -> dict[tuple[str, str, str, int], int]:
    """(family, table, chain, rule index) -> packets, for every rule with a counter."""
    out: dict[tuple[str, str, str, int], int] = {}
    for family, table in (("bridge", "dom0"), ("inet", "dom0"), ("inet", "dom0_wan")):
        r = netns.run(lab.dom0_ns, ["nft", "-j", "list", "table", family, table], check=False)
        if r.returncode != 0:
            continue
        seen: Counter[str] = Counter()
        for obj in json.loads(r.stdout)["nftables"]:
            if "rule" not in obj:
                continue
            rule = obj["rule"]
            index = seen[rule["chain"]]
            seen[rule["chain"]] += 1
            for e in rule["expr"]:
                if "counter" in e:
                    out[(family, table, rule["chain"], index)] = int(e["counter"]["packets"])
    return out


def attribution(lab: Lab, fake: FakeDataPlane, s: Sample) -> list[str]:
    """Single packets whose drops the fake pins on counted rules: the kernel's
    counters must move for exactly those rules, by as many copies. The first
    one is dropped by inet's reverse path check *before* bridge input polices
    its source: br_netfilter runs inet prerouting from the bridge's own
    prerouting hook (the order `dom0 policy explain` will report)."""
    ms = s.machines
    m1, m2, m3 = ms[1], ms[2], ms[3]
    q = next(i for i, m in ms.items() if m.domain == "quarantine")
    sport = iter(range(10000, 10100))
    probes = [
        ("forged source, routed elsewhere", 1,
         frame(s, 1, None, src=ECHO, dst=m1.gateway, sport=next(sport), dport=53)),
        ("cross-domain, routed", 1, frame(s, 1, None, dst=m2.bridge_ip, sport=next(sport), dport=7)),
        ("dhcp about another MAC", 1,
         frame(s, 1, BCAST, src="0.0.0.0", dst="255.255.255.255", sport=68, dport=67,
               dhcp=Dhcp(chaddr=m3.mac))),
        ("own gateway, ssh", 1,
         frame(s, 1, None, dst=m1.gateway, proto="tcp", sport=next(sport), dport=22)),
        ("the WAN's subnet", 1,
         frame(s, 1, None, dst=topology.WAN_GATEWAY, sport=next(sport), dport=7)),
        ("quarantined to the internet", q,
         frame(s, q, None, dst=ECHO, proto="tcp", sport=next(sport), dport=80)),
        ("forged destination MAC", 1,
         frame(s, 1, m2.mac, dst=m3.bridge_ip, sport=next(sport), dport=7)),
        ("dhcp port to port", 1,
         frame(s, 1, m3.mac, dst=m3.bridge_ip, sport=68, dport=67)),
        ("arp probe (flooded)", 1,
         frame(s, 1, BCAST, ether_type="arp", src="0.0.0.0", dst=m3.bridge_ip)),
    ]  # fmt: skip
    counted = {
        (f, t, c, i)
        for (f, t), chains in fake.tables.items()
        for c, (_b, rules) in chains.items()
        for i, rule in enumerate(rules)
        if any("counter" in x for x in rule)
    }

    # (police_source's last rule: anything but IPv4 and ARP)
    other_types = len(fake.tables["bridge", "dom0"]["police_source"][1]) - 1

    def noise(k: tuple[str, str | None, str, int | None]) -> bool:
        # what background traffic hits: the VMs' own IPv6 (anything but IPv4
        # and ARP, at police_source), dom0's own packets at the kill switch
        return k == ("bridge", "dom0", "police_source", other_types) or k[1] == "dom0_wan"

    problems = []
    for what, i, p in probes:
        want = Counter(
            (d.family, d.table, d.chain, d.rule)
            for d in fake.verdict(p).drops
            if (d.family, d.table, d.chain, d.rule) in counted
        )
        assert want and not any(noise(k) for k in want), f"{what}: not a useful probe"
        for attempt in range(2):  # (once more if background traffic hit a counter)
            before = counters(lab)
            frames = [replace(p, ip_id=attempt).frame(topology.BRIDGE_MAC)]
            forge.send(lab, lab.vm_ns(i), frames, tag="fake-attribution")
            forge.settle()
            after = counters(lab)
            moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
            got = Counter({k: n for k, n in moved.items() if not noise(k)})
            if got == want:
                break
        else:
            problems.append(f"{what}: kernel counted {dict(got)}, fake {dict(want)}")
    return problems


@pytest.fixture
def agreement_lab(make_lab: Any) -> Iterator[Callable[[str], tuple[Lab, Sample]]]:
    def build_lab(mode: str) -> tuple[Lab, Sample]:
        lab = make_lab(4, controller=True, policy=POLICIES[mode])
        q = build.add_vm(lab, mac=QUARANTINED_MAC)
        dhcpclient.wait_lease(lab, q, timeout=20)
        wait_for(
            lambda: all(m["confirmed"] for m in controllerproc.status(lab)),
            timeout=20,
            what="every lease seen by the controller",
        )
        hub = mode == "hub"
        ms = machines_of(lab, hub)
        if hub:  # every tunnel handshaken: dom0 knows each peer's endpoint
            for m in ms.values():
                if m.tunnel_ip:

                    def answers(m: Machine = m) -> bool:
                        ping = ["busybox", "ping", "-c1", "-W1", m.gateway]
                        return netns.run(lab.vm_ns(m.index), ping, check=False).returncode == 0

                    wait_for(
                        answers,
                        timeout=15,
                        what=f"vm{m.index}'s tunnel",
                    )  # fmt: skip
        gateways = (
            {"hub": "10.250.0.1", "quarantine": "10.99.0.1"}
            if hub
            else {"x": "10.10.0.1", "y": "10.20.0.1", "quarantine": "10.99.0.1"}
        )
        if hub:
            ms = {i: replace(m, gateway="10.250.0.1") if m.tunnel_ip else m
                  for i, m in ms.items()}  # fmt: skip
        return lab, Sample(ms, forge.new_marker("fake"), gateways, hub, [])

    yield build_lab


def _report(mode: str, s: Sample, disagree: list[str], tally: Counter[str]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(tally.items()))
    head = f"{mode}: {len(s.cases)} packets, {len(s.cases) - len(disagree)} agreed ({counts})"
    return "\n".join([head, *disagree])


def test_the_fake_agrees_with_the_kernel_domains_on_the_bridge(agreement_lab: Any) -> None:
    lab, s = agreement_lab("bridge")
    misattributed = attribution(lab, fake_of(lab, kernel_sets(lab)), s)
    opened: list[Case] = []

    def machines() -> None:
        phase_machines(s)
        opened.extend(
            c for c in s.cases
            if c.what.startswith("allowed") and "bridged udp" in c.what
        )  # fmt: skip

    disagree, tally = run_phases(
        lab,
        s,
        [
            ("machines", machines),
            ("replies", lambda: phase_replies(s, opened)),
            ("forged addresses", lambda: phase_forged_addresses(s)),
            ("containers", lambda: phase_containers(s, delegated(lab, s))),
            ("forged MACs", lambda: phase_forged_macs(s)),
        ],
    )
    report = "\n".join([_report("bridge", s, disagree, tally), *misattributed])
    print(report)
    assert len(s.cases) >= MIN_PACKETS
    for category in ("allowed", "internet", "dom0", "dhcp", "container"):
        assert tally[f"{category} passed"] > 0, report  # the sample is not all drops
    assert tally["container dropped"] > 0, report
    for category in ("isolated", "spoofed", "quarantined"):
        assert tally[f"{category} dropped"] > 0, report
    assert not disagree, report
    assert not misattributed, report


def test_the_fake_agrees_with_the_kernel_hub_domains(agreement_lab: Any) -> None:
    lab, s = agreement_lab("hub")
    disagree, tally = run_phases(
        lab,
        s,
        [
            ("machines", lambda: phase_machines(s)),
            ("tunnels", lambda: phase_tunnels(s)),
            ("forged addresses", lambda: phase_forged_addresses(s)),
            ("forged MACs", lambda: phase_forged_macs(s)),
        ],
    )
    report = _report("hub", s, disagree, tally)
    print(report)
    assert len(s.cases) >= MIN_PACKETS
    for category in ("allowed", "internet", "dom0", "dhcp"):
        assert tally[f"{category} passed"] > 0, report
    assert not disagree, report
