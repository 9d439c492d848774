"""Packet captures in lab namespaces (tcpdump into a pcap file), to make leaks visible.

A capture runs tcpdump in the foreground inside a namespace, in its own
session, recorded like every lab process. It listens on "any" with Linux
cooked v2 headers, so each packet keeps its interface and its direction,
writes whole packets to a pcap file, and keeps those of the one interface it
was asked for. It counts as working only because it demonstrably does: it is
ready once it has captured a canary frame sent out of that interface, and
`stop()` sends a second canary and waits until it is written before it
signals tcpdump by PID, so every packet that crossed the link before it is
in the file. Canaries are left out of what `stop()` returns.

`classify_wan` sorts what dom0 put on its WAN link by content, not by port:
only WireGuard messages to the uplink's endpoint (and ARP, which a link needs
to reach its gateway) may leave; any other packet is a leak.
"""

from __future__ import annotations

import json
import secrets
import signal
import struct
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from controller.lab import forge, netns, processes
from controller.lab.rundir import Lab, LabError

READY_TIMEOUT = 5.0
LINKTYPE_LINUX_SLL2 = 276
PACKET_OUTGOING = 4
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
CANARY_ETHERTYPE = 0x88B5  # IEEE local experimental: nothing in the lab speaks it


@dataclass(frozen=True, slots=True)
class Packet:
    """One captured packet: sent by the capturing namespace out of the
    interface (outgoing), or received on it from the other end."""

    outgoing: bool
    protocol: int  # the ethertype
    src_mac: str
    data: bytes  # from the network layer on

    def decode(self):
        """The packet decoded by scapy (IP, IPv6, ARP, else Raw)."""
        from scapy.layers.inet import IP
        from scapy.layers.inet6 import IPv6
        from scapy.layers.l2 import ARP
        from scapy.packet import Raw

        layer = {ETH_P_IP: IP, ETH_P_IPV6: IPv6, ETH_P_ARP: ARP}.get(self.protocol, Raw)
        return layer(self.data)

    def addresses(self) -> tuple[str, str] | None:
        """(source, destination) of an IP or IPv6 packet."""
        if self.protocol not in (ETH_P_IP, ETH_P_IPV6):
            return None
        ip = self.decode()
        return str(ip.src), str(ip.dst)

    def summary(self) -> str:
        try:
            return str(self.decode().summary())
        except Exception:  # a summary for a message only
            return f"ethertype 0x{self.protocol:04x}, {len(self.data)} bytes from {self.src_mac}"


def read_pcap(path: Path) -> list[tuple[int, int, Packet]]:
    """(ifindex, pkttype, packet) for each whole record of a LINUX_SLL2 pcap
    file (a record tcpdump is still writing is left out)."""
    blob = path.read_bytes()
    if len(blob) < 24:
        return []
    magic = blob[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise LabError(f"{path}: not a pcap file")
    (linktype,) = struct.unpack_from(endian + "I", blob, 20)
    if linktype != LINKTYPE_LINUX_SLL2:
        raise LabError(f"{path}: link type {linktype}, expected LINUX_SLL2")
    out, at = [], 24
    while at + 16 <= len(blob):
        _, _, caplen, _ = struct.unpack_from(endian + "IIII", blob, at)
        rec = blob[at + 16 : at + 16 + caplen]
        if len(rec) < caplen or caplen < 20:
            break
        at += 16 + caplen
        proto, _, ifindex, _, pkttype, halen, addr = struct.unpack_from("!HHIHBB8s", rec)
        mac = ":".join(f"{b:02x}" for b in addr[: min(halen, 8)])
        out.append((ifindex, pkttype, Packet(pkttype == PACKET_OUTGOING, proto, mac, rec[20:])))
    return out


class Capture:
    def __init__(
        self, lab: Lab, namespace: str, interface: str, bpf: str = "", tag: str = "capture"
    ) -> None:
        self.lab = lab
        self.namespace = namespace
        self.interface = interface
        # (the canary must pass the filter, whatever else it keeps)
        self.bpf = f"ether proto 0x{CANARY_ETHERTYPE:04x} or ({bpf})" if bpf else ""
        self.role = f"capture-{tag}"
        self.log: Path = lab.logs_dir / f"{self.role}.txt"
        self.pcap: Path = lab.logs_dir / f"{self.role}.pcap"
        self.proc: processes.ProcId | None = None
        self.ifindex = 0
        self.mac = ""
        self.packets: list[Packet] = []

    def _link(self) -> None:
        out = netns.run(self.namespace, ["ip", "-j", "link", "show", "dev", self.interface])
        link = json.loads(out.stdout)[0]
        self.ifindex, self.mac = int(link["ifindex"]), str(link["address"])

    def _canary(self, what: str) -> None:
        """A frame out of the interface, and wait until tcpdump has written it."""
        marker = f"dom0-capture-{what}-{secrets.token_hex(8)}".encode()
        mac = bytes.fromhex(self.mac.replace(":", ""))
        frame = b"\xff" * 6 + mac + struct.pack("!H", CANARY_ETHERTYPE) + marker
        forge.send(
            self.lab, self.namespace, [frame.ljust(60, b"\0")], iface=self.interface,
            tag=f"{self.role}-{what}",
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._has(marker):
            if (
                time.monotonic() > deadline
                or self.proc is None
                or not processes.is_running(self.proc)
            ):
                raise LabError(
                    f"capture on {self.namespace}/{self.interface} never saw its {what} canary: "
                    f"{self.log.read_text(errors='replace').strip()[-300:]}"
                )
            time.sleep(0.02)

    def _has(self, marker: bytes) -> bool:
        try:
            return marker in self.pcap.read_bytes()
        except FileNotFoundError:
            return False

    def start(self) -> Capture:
        self.log.unlink(missing_ok=True)
        self.pcap.unlink(missing_ok=True)
        self._link()
        argv = netns.exec_argv(
            self.namespace,
            ["tcpdump", "-i", "any", "-y", "LINUX_SLL2", "-n", "-p", "-U",
             "-w", str(self.pcap), *([self.bpf] if self.bpf else [])],
        )  # fmt: skip
        _, self.proc = processes.spawn(argv, log=self.log)
        self.lab.record_process(self.role, self.proc, self.namespace, argv)
        # tcpdump says "listening on ..." once it captures; the canary proves it
        deadline = time.monotonic() + READY_TIMEOUT
        while "listening on" not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline or not processes.is_running(self.proc):
                raise LabError(f"tcpdump did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.02)
        self._canary("start")
        return self

    def stop(self) -> list[Packet]:
        """Stop it (after the end canary) and return the interface's packets, in order."""
        if self.proc is not None:
            try:
                self._canary("end")
            finally:
                processes.send_signal(self.proc, signal.SIGINT)
                processes.wait_exit(self.proc, 5.0)
                self.lab.forget_process(self.role)
                self.proc = None
            self.packets = [
                p
                for ifindex, _, p in read_pcap(self.pcap)
                if ifindex == self.ifindex
                and not (p.protocol == CANARY_ETHERTYPE and b"dom0-capture-" in p.data)
            ]
        return self.packets

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            self.stop()


# ---- what dom0 may send on its WAN ---------------------------------------------------------

# WireGuard's messages (https://www.wireguard.com/protocol/): a type byte, three
# zero bytes, then a fixed layout.
WIREGUARD_MESSAGES = {
    1: ("handshake initiation", 148),
    2: ("handshake response", 92),
    3: ("cookie reply", 64),
    4: ("transport data", None),  # 16-byte header + ciphertext padded to 16 + 16-byte tag
}


def wireguard_message(payload: bytes) -> int | None:
    """The WireGuard message type of a UDP payload, or None if it is none."""
    if len(payload) < 4 or payload[1:4] != b"\0\0\0" or payload[0] not in WIREGUARD_MESSAGES:
        return None
    kind = payload[0]
    size = WIREGUARD_MESSAGES[kind][1]
    if size is None:
        return kind if len(payload) >= 32 and len(payload) % 16 == 0 else None
    return kind if len(payload) == size else None


def wan_verdict(p: Packet, endpoint: tuple[str, int]) -> str:
    """The verdict "wireguard-N" for a WireGuard message of type N in one
    unfragmented UDP datagram to the endpoint (host, port), "arp" for ARP,
    else "leak". (An ICMP error quoting UDP is not UDP, nor is IPv6 with
    extension headers: both are leaks.)"""
    if p.protocol == ETH_P_ARP:
        return "arp"
    if p.protocol == ETH_P_IP:
        ip = p.decode()
        if ip.flags.MF or ip.frag:
            return "leak"
    udp = udp_of(p)
    if udp is None or (udp[0], udp[1]) != (endpoint[0], int(endpoint[1])):
        return "leak"
    kind = wireguard_message(udp[2])
    return "leak" if kind is None else f"wireguard-{kind}"


@dataclass
class WanTraffic:
    """What dom0 sent on its WAN link, sorted by wan_verdict; what came in to it
    is only counted."""

    wireguard: Counter[int] = field(default_factory=Counter)  # message type -> packets
    tunnel: list[Packet] = field(default_factory=list)  # those packets
    arp: int = 0
    inbound: int = 0
    leaks: list[Packet] = field(default_factory=list)

    def describe_leaks(self, limit: int = 5) -> str:
        shown = "; ".join(p.summary() for p in self.leaks[:limit])
        more = f" (+{len(self.leaks) - limit} more)" if len(self.leaks) > limit else ""
        return f"{len(self.leaks)} leak(s): {shown}{more}" if self.leaks else "no leaks"


def classify_wan(packets: Iterable[Packet], endpoint: tuple[str, int]) -> WanTraffic:
    """Sort packets captured on the WAN side of dom0's link (in the wan
    namespace: outgoing there is what came in to dom0)."""
    got = WanTraffic()
    for p in packets:
        if p.outgoing:
            got.inbound += 1
            continue
        verdict = wan_verdict(p, endpoint)
        if verdict == "arp":
            got.arp += 1
        elif verdict == "leak":
            got.leaks.append(p)
        else:
            got.wireguard[int(verdict.rsplit("-", 1)[1])] += 1
            got.tunnel.append(p)
    return got


def udp_of(p: Packet) -> tuple[str, int, bytes] | None:
    """(destination, port, payload) of a UDP datagram, else None."""
    from scapy.layers.inet import UDP

    if p.protocol not in (ETH_P_IP, ETH_P_IPV6):
        return None
    ip = p.decode()
    udp = ip.payload
    if type(udp) is not UDP:
        return None
    return str(ip.dst), int(udp.dport), bytes(udp)[8 : int(udp.len)]
