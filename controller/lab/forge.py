"""Forged frames in the lab: send crafted bytes from one namespace, look for them in another.

    python -m controller.lab.forge send --file FRAMES.hex [--iface eth0 | --l3] [--repeat N]
    python -m controller.lab.forge sniff --marker HEX --out FILE [--count-only]
    python -m controller.lab.forge hold --listen PORT | --connect ADDR:PORT [--sport P]

The adversarial tests build their frames with scapy in the test process (the
builders at the end, `dhcp()` and `vary_tcp_sport()`, import it only there;
tests/lab/test_attacks.py uses scapy directly) and hand the bytes to a
small sender that runs inside a VM's namespace: an AF_PACKET socket puts whole
Ethernet frames on the VM's eth0, source MAC and all, exactly as a guest's NIC
would; `--l3` sends IP datagrams through a raw socket instead, so that the
namespace's own routing carries them (e.g. into a VM's WireGuard tunnel). The
in-namespace side imports only the standard library: it starts in ~30 ms.

The sniffer sees every interface of its namespace (AF_PACKET, ETH_P_ALL) and
keeps the frames that contain a marker, the random token a test put in its
forged packets; outgoing frames are ignored (a namespace's own copies). A
sniffer is ready only once it has seen its own canary datagram on `lo`, so a
capture that stays empty is a capture that demonstrably works. `stop()` waits
a moment for packets in flight, then a second canary marks the end: every
frame that reached the namespace before it has been read. `hold` keeps a TCP
connection open (a flow in dom0's conntrack) for as long as a test needs it.

Why not capture.py's tcpdump: a crafted frame is recognised by a marker
anywhere in its bytes (also inside an ICMP error's quote, or in an ARP
frame's padding), storms of 20,000 frames are counted without a line each,
and the capture proves it is live before the attack is sent.

Nothing here touches the root namespace: both sides run via `ip netns exec`.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PACKET_STATISTICS = 6
SOL_PACKET = 263
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
SO_RCVBUFFORCE = 33
CANARY_PORT = 9  # discard: the canary goes to 127.0.0.1 and is dropped there
READY_TIMEOUT = 10.0
IN_FLIGHT = 0.3  # seconds for frames still crossing dom0 before a capture ends


def settle() -> None:
    """Wait for frames just sent to finish crossing dom0 (and the kernel to
    count them) before their effect is read: a packet's flight, not a wait
    for the controller (which has its generation for that)."""
    time.sleep(IN_FLIGHT)


def new_marker(tag: str = "x") -> bytes:
    """A token no frame of the lab carries unless a test put it there."""
    return f"dom0-attack-{tag}-{secrets.token_hex(8)}".encode()


# ---- the in-namespace side (standard library only) ---------------------------------------


def _read_frames(path: str) -> list[bytes]:
    return [bytes.fromhex(line) for line in Path(path).read_text().split() if line]


def _send(args: argparse.Namespace) -> int:
    frames = _read_frames(args.file)
    if args.l3:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)

        def put(frame: bytes) -> None:
            sock.sendto(frame, (socket.inet_ntoa(frame[16:20]), 0))
    else:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((args.iface, 0))

        def put(frame: bytes) -> None:
            sock.send(frame)

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sent = 0
    for _ in range(args.repeat):
        for frame in frames:
            put(frame)
            sent += 1
            if args.burst and sent % args.burst == 0:
                time.sleep(args.pause)
        if args.interval:
            time.sleep(args.interval)
    print(json.dumps({"sent": sent}), flush=True)
    return 0


class _Sniff:
    def __init__(self, args: argparse.Namespace) -> None:
        self.marker = bytes.fromhex(args.marker)
        self.count_only = args.count_only
        self.outgoing = args.outgoing
        self.out = open(args.out, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.canary_tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.token = secrets.token_hex(8).encode()
        self.counts: dict[str, int] = {}
        self.wanted_canary = 0
        self.stop = False

    def _canary(self, n: int) -> bytes:
        return b"dom0-sniff-canary-" + self.token + b"-" + str(n).encode()

    def _emit(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj) + "\n")

    def _drops(self) -> int:
        try:
            raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return -1
        return struct.unpack("II", raw)[1]

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        self.sock.settimeout(0.05)
        sent, seen, last_sent, stop_at = -1, -1, 0.0, None
        while True:
            want = self.wanted_canary  # canary 0 means ready, the stop asks for one more
            if self.stop and stop_at is None:
                stop_at = time.monotonic()
            if self.stop and seen >= want:
                break
            if stop_at is not None and time.monotonic() - stop_at > 5.0:
                self._emit({"canary_lost": want})
                break
            if seen < want and (sent < want or time.monotonic() - last_sent > 0.5):
                # every lab namespace has lo up
                self.canary_tx.sendto(self._canary(want), ("127.0.0.1", CANARY_PORT))
                sent, last_sent = want, time.monotonic()
            try:
                data, addr = self.sock.recvfrom(65535)
            except (TimeoutError, InterruptedError):
                continue
            ifname, pkttype, hatype = addr[0], addr[2], addr[3]
            if pkttype == PACKET_OUTGOING and not self.outgoing:
                continue
            if hatype == ARPHRD_LOOPBACK and self._canary(0)[:-1] in data:
                n = int(data.rsplit(b"-", 1)[1])
                if n > seen:
                    seen = n
                    if n == 0:
                        self._emit({"ready": True})
                continue
            if self.marker not in data:
                continue
            self.counts[ifname] = self.counts.get(ifname, 0) + 1
            if not self.count_only:
                self._emit({"if": ifname, "pkttype": pkttype, "hatype": hatype, "hex": data.hex()})
        self._emit({"done": True, "counts": self.counts, "drops": self._drops()})
        self.out.close()
        return 0

    def _on_stop(self, *_: object) -> None:
        if not self.stop:
            self.wanted_canary += 1
            self.stop = True


def _hold(args: argparse.Namespace) -> int:
    """A TCP connection that stays open (a flow in dom0's conntrack) until SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.listen:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", args.listen))
        srv.listen(16)
        print(json.dumps({"listening": args.listen}), flush=True)
        held = []
        while True:
            conn, peer = srv.accept()
            held.append(conn)
            print(json.dumps({"accepted": list(peer)}), flush=True)
    host, port = args.connect.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.sport))
    sock.settimeout(5)
    sock.connect((host, int(port)))
    print(json.dumps({"connected": list(sock.getsockname())}), flush=True)
    while True:
        time.sleep(3600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.lab.forge")
    sub = parser.add_subparsers(dest="cmd", required=True)
    send = sub.add_parser("send", help="send frames (hex, one per line) from this namespace")
    send.add_argument("--file", required=True)
    send.add_argument("--iface", default="eth0")
    send.add_argument("--l3", action="store_true", help="IP datagrams, routed by this namespace")
    send.add_argument("--repeat", type=int, default=1, help="send the whole list N times")
    send.add_argument("--interval", type=float, default=0.0, help="pause between repeats (s)")
    send.add_argument("--burst", type=int, default=0, help="pause after every B frames")
    send.add_argument("--pause", type=float, default=0.001, help="that pause (s)")
    sniff = sub.add_parser("sniff", help="record frames that contain a marker")
    sniff.add_argument("--marker", required=True, help="hex")
    sniff.add_argument("--out", required=True)
    sniff.add_argument("--count-only", action="store_true", help="count frames, keep none")
    sniff.add_argument("--outgoing", action="store_true", help="include frames sent from here")
    hold = sub.add_parser("hold", help="hold a TCP connection open until SIGTERM")
    hold.add_argument("--listen", type=int, metavar="PORT")
    hold.add_argument("--connect", metavar="ADDR:PORT")
    hold.add_argument("--sport", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "hold":
        return _hold(args)
    return _send(args) if args.cmd == "send" else _Sniff(args).run()


# ---- the test side ----------------------------------------------------------------------


def _lab_modules() -> Any:
    # Imported late: the in-namespace side above needs only the standard library.
    from controller.lab import netns, processes
    from controller.lab.rundir import LabError

    return netns, processes, LabError


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame: interface, packet type (0 host, 1 broadcast, 2 multicast,
    3 other host), link type (1 Ethernet, 65534 raw IP as on a tun) and bytes."""

    ifname: str
    pkttype: int
    hatype: int
    data: bytes

    def packet(self) -> Any:
        """The frame decoded by scapy (Ether, or IP on a tun like wg0)."""
        from scapy.layers.inet import IP
        from scapy.layers.l2 import Ether

        return Ether(self.data) if self.hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK) else IP(self.data)

    def summary(self) -> str:
        try:
            return f"{self.ifname}: {self.packet().summary()}"
        except Exception:  # a summary for a message only
            return f"{self.ifname}: {len(self.data)} bytes"


@dataclass(slots=True)
class Sniffed:
    frames: list[Frame] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # marked frames per interface
    drops: int = 0  # frames the kernel dropped before the sniffer read them

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self, limit: int = 3) -> str:
        shown = "; ".join(f.summary() for f in self.frames[:limit])
        more = f" (+{len(self.frames) - limit} more)" if len(self.frames) > limit else ""
        return f"{self.total} frame(s) {self.counts}: {shown}{more}"


class Sniffer:
    """A marker sniffer in one namespace, recorded like every lab process."""

    def __init__(
        self,
        lab: Any,
        namespace: str,
        marker: bytes,
        tag: str,
        *,
        count_only: bool = False,
        outgoing: bool = False,
    ) -> None:
        self.lab = lab
        self.namespace = namespace
        self.marker = marker
        self.role = f"sniff-{tag}"
        self.out = lab.logs_dir / f"{self.role}.jsonl"
        self.count_only = count_only
        self.outgoing = outgoing
        self.proc: Any = None

    def _lines(self) -> list[dict[str, Any]]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        lines = []
        for raw in text.splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue  # a line being written
        return lines

    def start(self) -> Sniffer:
        netns, processes, LabError = _lab_modules()
        self.out.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "controller.lab.forge", "sniff",
            "--marker", self.marker.hex(), "--out", str(self.out),
        ]  # fmt: skip
        if self.count_only:
            argv.append("--count-only")
        if self.outgoing:
            argv.append("--outgoing")
        full = netns.exec_argv(self.namespace, argv)
        log = self.lab.logs_dir / f"{self.role}.log"
        _, self.proc = processes.spawn(full, log=log, env=processes.python_env())
        self.lab.record_process(self.role, self.proc, self.namespace, full)
        deadline = time.monotonic() + READY_TIMEOUT
        while not any(line.get("ready") for line in self._lines()):
            if time.monotonic() > deadline or not processes.is_running(self.proc):
                detail = log.read_text(errors="replace").strip().splitlines()
                raise LabError(
                    f"sniffer in {self.namespace} never saw its canary: "
                    f"{detail[-1] if detail else 'no output'}"
                )
            time.sleep(0.02)
        return self

    def snapshot(self) -> Sniffed:
        """What it has recorded so far (it keeps running)."""
        return self._parse(self._lines())

    def _parse(self, lines: list[dict[str, Any]]) -> Sniffed:
        got = Sniffed()
        for line in lines:
            if "hex" in line:
                got.frames.append(
                    Frame(line["if"], line["pkttype"], line["hatype"], bytes.fromhex(line["hex"]))
                )
            if "counts" in line:
                got.counts = dict(line["counts"])
                got.drops = int(line.get("drops", 0))
        if not any("counts" in line for line in lines):
            for f in got.frames:
                got.counts[f.ifname] = got.counts.get(f.ifname, 0) + 1
        return got

    def stop(self) -> Sniffed:
        """End the capture (after IN_FLIGHT seconds and a final canary) and return it."""
        _netns, processes, LabError = _lab_modules()
        if self.proc is None:
            return self._parse(self._lines())
        time.sleep(IN_FLIGHT)  # frames still crossing dom0
        processes.send_signal(self.proc, signal.SIGTERM)
        exited = processes.wait_exit(self.proc, 10.0)
        if not exited:
            processes.stop([self.proc])
        self.lab.forget_process(self.role)
        self.proc = None
        lines = self._lines()
        if not any(line.get("done") for line in lines) or any("canary_lost" in x for x in lines):
            raise LabError(f"sniffer in {self.namespace} did not finish its capture cleanly")
        return self._parse(lines)

    def __enter__(self) -> Sniffer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            self.stop()


def _frames_file(lab: Any, tag: str, frames: Iterable[bytes]) -> Path:
    d = lab.root / "forge"
    d.mkdir(exist_ok=True)
    path = d / f"{tag}.hex"
    path.write_text("".join(f"{bytes(f).hex()}\n" for f in frames))
    return path


def send_argv(
    path: Path,
    *,
    iface: str = "eth0",
    l3: bool = False,
    repeat: int = 1,
    interval: float = 0.0,
    burst: int = 0,
    pause: float = 0.001,
) -> list[str]:
    argv = [sys.executable, "-m", "controller.lab.forge", "send", "--file", str(path)]
    argv += ["--repeat", str(repeat), "--interval", f"{interval:g}"]
    argv += ["--burst", str(burst), "--pause", f"{pause:g}"]
    argv += ["--l3"] if l3 else ["--iface", iface]
    return argv


def send(
    lab: Any,
    namespace: str,
    frames: Sequence[bytes],
    *,
    tag: str = "frames",
    timeout: float = 60.0,
    **kw: Any,
) -> int:
    """Send frames from namespace (Ethernet out of iface, or l3=True: routed IP);
    returns how many were sent. Any failure raises: an error is never a block."""
    netns, processes, LabError = _lab_modules()
    path = _frames_file(lab, tag, frames)
    proc = netns.run(
        namespace, send_argv(path, **kw), check=False, timeout=timeout, env=processes.python_env()
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"forge send in {namespace}: {detail[-1] if detail else proc.returncode}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["sent"])


class Sender:
    """A sender in the background (a flood while the test measures something)."""

    def __init__(self, lab: Any, namespace: str, frames: Sequence[bytes], tag: str, **kw: Any):
        self.lab = lab
        self.namespace = namespace
        self.role = f"forge-{tag}"
        self.path = _frames_file(lab, tag, frames)
        self.kw = kw
        self.log = lab.logs_dir / f"{self.role}.log"
        self.proc: Any = None

    def start(self) -> Sender:
        netns, processes, _LabError = _lab_modules()
        self.log.unlink(missing_ok=True)
        full = netns.exec_argv(self.namespace, send_argv(self.path, **self.kw))
        _, self.proc = processes.spawn(full, log=self.log, env=processes.python_env())
        self.lab.record_process(self.role, self.proc, self.namespace, full)
        return self

    def running(self) -> bool:
        _netns, processes, _LabError = _lab_modules()
        return self.proc is not None and processes.is_running(self.proc)

    def finished(self, within: float) -> bool:
        """Whether it has finished, waiting at most `within` seconds for it."""
        _netns, processes, _LabError = _lab_modules()
        return self.proc is None or processes.wait_exit(self.proc, within)

    def wait(self, timeout: float = 120.0) -> int:
        """Wait for it to finish; the number of frames sent (raises if it failed)."""
        _netns, processes, LabError = _lab_modules()
        if not processes.wait_exit(self.proc, timeout):
            processes.stop([self.proc])
            self.lab.forget_process(self.role)
            raise LabError(f"forge sender in {self.namespace} still running after {timeout:g} s")
        self.lab.forget_process(self.role)
        text = self.log.read_text(errors="replace").strip().splitlines()
        try:
            return int(json.loads(text[-1])["sent"])
        except (IndexError, ValueError, KeyError):
            raise LabError(
                f"forge sender in {self.namespace} failed: {text[-1] if text else 'no output'}"
            ) from None


def hold(lab: Any, namespace: str, tag: str, argv: Sequence[str], ready: str) -> Any:
    """Start `forge hold ARGV` in namespace; returns its ProcId once its log says `ready`."""
    netns, processes, LabError = _lab_modules()
    role = f"hold-{tag}"
    log = lab.logs_dir / f"{role}.log"
    log.unlink(missing_ok=True)
    full = netns.exec_argv(namespace, [sys.executable, "-m", "controller.lab.forge", "hold", *argv])
    _, proc = processes.spawn(full, log=log, env=processes.python_env())
    lab.record_process(role, proc, namespace, full)
    deadline = time.monotonic() + 10.0
    while ready not in log.read_text(errors="replace"):
        if time.monotonic() > deadline or not processes.is_running(proc):
            text = log.read_text(errors="replace").strip().splitlines()
            raise LabError(f"forge hold in {namespace}: {text[-1] if text else 'no output'}")
        time.sleep(0.02)
    return proc


# ---- building frames (scapy, in the test process) -----------------------------------------

BROADCAST = "ff:ff:ff:ff:ff:ff"


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def dhcp(
    kind: str,
    *,
    src_mac: str,
    chaddr: str | None = None,
    dst_mac: str = BROADCAST,
    src: str = "0.0.0.0",
    dst: str = "255.255.255.255",
    ciaddr: str = "0.0.0.0",
    requested: str | None = None,
    server_id: str | None = None,
    client_id: str | None = None,
    broadcast_flag: bool = True,
    xid: int | None = None,
    extra: bytes = b"",
) -> bytes:
    """A DHCP message (discover, request, decline, release) as a whole Ethernet frame.

    chaddr defaults to src_mac; client_id is a MAC (sent as type 1 + MAC, as
    dnsmasq and most clients do) or None for no option 61; extra is appended
    after the options (e.g. a marker, in the padding)."""
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    chaddr = chaddr or src_mac
    options: list[Any] = [("message-type", kind)]
    if requested:
        options.append(("requested_addr", requested))
    if server_id:
        options.append(("server_id", server_id))
    if client_id:
        options.append(("client_id", b"\x01" + mac_bytes(client_id)))
    options.append("end")
    pkt = (
        Ether(src=src_mac, dst=dst_mac)
        / IP(src=src, dst=dst)
        / UDP(sport=68, dport=67)
        / BOOTP(
            op=1,
            chaddr=mac_bytes(chaddr) + b"\x00" * 10,
            xid=xid if xid is not None else secrets.randbits(32),
            flags=0x8000 if broadcast_flag else 0,
            ciaddr=ciaddr,
        )
        / DHCP(options=options)
    )
    return bytes(pkt) + extra


def dhcp_replies(frames: Iterable[Frame]) -> list[dict[str, Any]]:
    """DHCP server messages among frames: type, yiaddr, chaddr, hostname, frame."""
    from scapy.layers.dhcp import BOOTP, DHCP

    out = []
    for f in frames:
        try:
            pkt = f.packet()
        except Exception:  # not decodable: not a DHCP reply
            continue
        if BOOTP not in pkt or pkt[BOOTP].op != 2:
            continue
        opts = (
            {o[0]: o[1] for o in pkt[DHCP].options if isinstance(o, tuple)} if DHCP in pkt else {}
        )
        code = opts.get("message-type")
        names = {1: "discover", 2: "offer", 3: "request", 4: "decline", 5: "ack", 6: "nak"}
        kind = names.get(code, str(code)) if isinstance(code, int) else str(code)
        host = opts.get("hostname")
        out.append(
            {
                "type": kind,
                "yiaddr": pkt[BOOTP].yiaddr,
                "chaddr": ":".join(f"{b:02x}" for b in bytes(pkt[BOOTP].chaddr)[:6]),
                "hostname": host.decode(errors="replace") if isinstance(host, bytes) else host,
                "xid": pkt[BOOTP].xid,
            }
        )
    return out


def _checksum_adjust(csum: int, old: int, new: int) -> int:
    """RFC 1624 incremental update of a 16-bit one's complement checksum."""
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def vary_tcp_sport(frame: bytes, ports: Iterable[int], *, l2: bool = True) -> list[bytes]:
    """Copies of a TCP frame (Ethernet/IPv4 without options, or bare IPv4 with
    l2=False) with each source port, checksums kept valid (scapy builds one,
    this makes 20,000 in milliseconds)."""
    start = 14 if l2 else 0
    ihl = (frame[start] & 0x0F) * 4
    tcp = start + ihl
    (old_port,) = struct.unpack_from("!H", frame, tcp)
    (old_sum,) = struct.unpack_from("!H", frame, tcp + 16)
    out = []
    for port in ports:
        b = bytearray(frame)
        struct.pack_into("!H", b, tcp, port)
        struct.pack_into("!H", b, tcp + 16, _checksum_adjust(old_sum, old_port, port))
        out.append(bytes(b))
    return out


if __name__ == "__main__":
    sys.exit(main())
