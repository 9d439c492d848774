"""The netlink source against a real kernel, in namespaces this test creates.

The source always runs in a subprocess under `ip netns exec` (the debug tool
`python -m controller.sources.netlink_dump`), never in this process: pytest
stays in the root namespace, and nothing is done there.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.core.inventory import Fdb, FdbGone, FdbUp, Link, LinkGone, LinkUp
from controller.sources import netlink

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MakeNetns = Callable[[str], str]
State = dict[str, Any]


def sh(*argv: str, stdin: str | None = None) -> str:
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def in_ns(ns: str, *argv: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, *argv, stdin=stdin)


# A broadcast frame from the VM's MAC (local experimental ethertype 0x88b5): the
# bridge learns the source MAC; nothing answers, nothing leaves the namespaces.
_SEND_FRAME = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
mac = bytes.fromhex(sys.argv[2].replace(":", ""))
s.send(b"\\xff" * 6 + mac + b"\\x88\\xb5" + b"dom0 lab frame " * 4)
"""


class Host:
    """A dom0-like namespace with bridges, and VM namespaces hanging off its ports."""

    def __init__(self, make_netns: MakeNetns) -> None:
        self.make_netns = make_netns
        self.ns = make_netns("nl")
        self.vms: dict[str, tuple[str, str]] = {}  # port -> (vm namespace, mac)

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.ns, *args)

    def bridge(self, name: str) -> None:
        self.ip("link", "add", name, "type", "bridge")
        self.ip("link", "set", name, "up")

    def vm(self, port: str, bridge: str, mac: str) -> None:
        """A VM namespace whose eth0 (with `mac`) is the peer of `port` on `bridge`."""
        vm = self.make_netns("nlvm")
        self.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", vm)
        sh("ip", "-n", vm, "link", "set", "eth0", "address", mac)
        sh("ip", "-n", vm, "link", "set", "eth0", "up")
        self.ip("link", "set", port, "master", bridge)
        self.ip("link", "set", port, "up")
        self.vms[port] = (vm, mac)

    def rename(self, port: str, new: str) -> None:
        self.ip("link", "set", port, "name", new)
        self.vms[new] = self.vms.pop(port)

    def talk(self, port: str) -> None:
        vm, mac = self.vms[port]
        in_ns(vm, PY, "-c", _SEND_FRAME, "eth0", mac)

    def fdb_rows(self) -> list[dict[str, Any]]:
        return json.loads(in_ns(self.ns, "bridge", "-j", "fdb", "show"))

    def batch(self, tool: str, lines: list[str]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            in_ns(self.ns, tool, "-batch", f.name)


class Dump:
    """`python -m controller.sources.netlink_dump` in a namespace; its JSON lines."""

    def __init__(self, ns: str, bridge: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-m", "controller.sources.netlink_dump",
             "--bridge", bridge, *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self.lines: list[State] = []
        self._buf = b""

    @property
    def last(self) -> State:
        assert self.lines, "no output yet"
        return self.lines[-1]

    def _read(self, timeout: float) -> bool:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 0))
        if not ready:
            return False
        chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        if not chunk:
            self.proc.wait(5)
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"netlink_dump exited {self.proc.returncode}: {err}")
        self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        self.lines += [json.loads(line) for line in complete]
        return True

    def wait_for(self, pred: Callable[[State], bool], timeout: float = 5.0) -> State:
        deadline = time.monotonic() + timeout
        while not (self.lines and pred(self.last)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; last output: {self.lines[-1:]}")
            self._read(left)
        return self.last

    def wait_exit(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(AssertionError):
                self._read(0.1)
        with contextlib.suppress(AssertionError):
            while self._read(0):
                pass
        return self.proc.wait(max(deadline - time.monotonic(), 0.1))

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)  # `ip netns exec` execs: this PID is the tool

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.wait_exit(5)  # keeps reading: a full pipe would block its exit
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def host(make_netns: MakeNetns) -> Host:
    return Host(make_netns)


@pytest.fixture
def dump() -> Iterator[Callable[..., Dump]]:
    started: list[Dump] = []

    def start(ns: str, bridge: str, *extra: str) -> Dump:
        started.append(Dump(ns, bridge, *extra))
        return started[-1]

    try:
        yield start
    finally:
        for d in started:
            d.close()


VM1, VM2, VM3 = "52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"


def test_snapshot_then_events(host: Host, dump: Callable[..., Dump]) -> None:
    host.bridge("virbr0")
    host.vm("vnet1", "virbr0", VM1)
    host.talk("vnet1")
    follow = dump(host.ns, "virbr0", "--follow")

    # What existed before the source started comes in the Snapshot.
    state = follow.wait_for(lambda s: s["sightings"] == {VM1: "vnet1"})
    assert state["snapshots"] == 1
    assert state["ports"] == {"vnet1": {"index": state["ports"]["vnet1"]["index"], "up": True}}

    # A new VM: RTM_NEWLINK (master set), then the learned MAC.
    host.vm("vnet2", "virbr0", VM2)
    host.talk("vnet2")
    follow.wait_for(lambda s: s["sightings"] == {VM1: "vnet1", VM2: "vnet2"})

    # A second bridge: its ports are foreign, its machines are not ours.
    host.bridge("br1")
    host.vm("x1", "br1", VM3)
    host.talk("x1")
    follow.wait_for(lambda s: s["foreign_ports"] == ["x1"])

    # Port removal takes its machine along (whatever order the kernel reports in).
    host.ip("link", "del", "vnet1")
    state = follow.wait_for(lambda s: "vnet1" not in s["ports"])
    follow.wait_for(lambda s: s["sightings"] == {VM2: "vnet2"})

    # Rename (a port must be down for it; the kernel flushes learned entries then).
    host.ip("link", "set", "vnet2", "down")
    follow.wait_for(lambda s: s["sightings"] == {} and not s["ports"]["vnet2"]["up"])
    host.rename("vnet2", "web1")
    host.ip("link", "set", "web1", "up")
    host.talk("web1")
    state = follow.wait_for(lambda s: s["sightings"] == {VM2: "web1"})
    assert state["ports"]["web1"]["up"]
    assert state["snapshots"] == 1 and state["overruns"] == 0
    assert all(VM3 not in s["sightings"] for s in follow.lines)


def test_resync_on_request(host: Host, dump: Callable[..., Dump]) -> None:
    host.bridge("virbr0")
    host.vm("vnet1", "virbr0", VM1)
    host.talk("vnet1")
    follow = dump(host.ns, "virbr0", "--follow")
    before = follow.wait_for(lambda s: s["sightings"] == {VM1: "vnet1"})
    follow.signal(signal.SIGUSR1)  # -> NetlinkSource.resync()
    after = follow.wait_for(lambda s: s["snapshots"] == 2)
    assert after["sightings"] == before["sightings"] and after["ports"] == before["ports"]
    assert after["dumps"] == 2


def test_many_entries_and_links_parse_completely(host: Host, dump: Callable[..., Dump]) -> None:
    """Dumps arrive in many datagrams (NLM_F_MULTI until NLMSG_DONE): read them all."""
    host.bridge("virbr0")
    host.ip("link", "add", "p1", "type", "veth", "peer", "name", "p1peer")
    host.ip("link", "set", "p1", "master", "virbr0")
    host.ip("link", "set", "p1", "up")
    n = 3000
    macs = [f"02:00:00:01:{i >> 8:02x}:{i & 255:02x}" for i in range(n)]
    # `static` entries are NUD_NOARP: not permanent, so each is a machine sighting.
    host.batch("bridge", [f"fdb add {m} dev p1 master static" for m in macs])
    host.batch("ip", [f"link add v{i} type veth peer name w{i}" for i in range(300)])

    once = dump(host.ns, "virbr0")
    assert once.wait_exit() == 0
    state = once.last
    assert state["sightings"] == dict.fromkeys(macs, "p1")
    links = in_ns(host.ns, "ip", "-o", "link", "show").splitlines()
    assert state["links"] == len(links) == 300 * 2 + 4
    # Every bridge FDB row (not the devices' own "self" address lists) is in the tables.
    rows = [r for r in host.fdb_rows() if "self" not in r.get("flags", [])]
    assert state["fdb"] == len(rows) > n


def test_overrun_resyncs(host: Host, dump: Callable[..., Dump]) -> None:
    """ENOBUFS (lost events) leads to a fresh dump and Snapshot, and the view converges."""
    host.bridge("virbr0")
    host.ip("link", "add", "p1", "type", "veth", "peer", "name", "p1peer")
    host.ip("link", "set", "p1", "master", "virbr0")
    host.ip("link", "set", "p1", "up")
    follow = dump(host.ns, "virbr0", "--follow", "--rcvbuf", "65536")
    follow.wait_for(lambda s: s["snapshots"] == 1)
    macs = [f"02:00:00:02:{i >> 8:02x}:{i & 255:02x}" for i in range(2000)]
    follow.signal(signal.SIGSTOP)  # cannot read: the burst must overflow the buffer
    try:
        host.batch("bridge", [f"fdb add {m} dev p1 master static" for m in macs])
    finally:
        follow.signal(signal.SIGCONT)
    state = follow.wait_for(lambda s: len(s["sightings"]) == len(macs))
    assert state["overruns"] >= 1 and state["snapshots"] >= 2
    assert state["sightings"] == dict.fromkeys(macs, "p1")
    # And back down, while reading (lost or not, it must end right).
    host.batch("bridge", [f"fdb del {m} dev p1 master" for m in macs])
    follow.wait_for(lambda s: s["sightings"] == {})


def test_changes_during_dump_converge(host: Host, dump: Callable[..., Dump]) -> None:
    """The source subscribes, then dumps; what changes meanwhile is folded after the Snapshot."""
    host.bridge("virbr0")
    for p in ("p1", "p2"):
        host.ip("link", "add", p, "type", "veth", "peer", "name", f"{p}peer")
        host.ip("link", "set", p, "master", "virbr0")
        host.ip("link", "set", p, "up")
    macs = [f"02:00:00:03:{i >> 8:02x}:{i & 255:02x}" for i in range(1500)]
    marker = "02:00:00:03:ff:ff"  # only in the final state, not after earlier rounds
    # Station moves (p1 -> p2, re-announced without a delete), deletes and adds.
    lines = [f"fdb add {m} dev p1 master static" for m in macs]
    lines += [f"fdb replace {m} dev p2 master static" for m in macs[::2]]
    lines += [f"fdb del {m} dev p1 master" for m in macs[1::4]]
    with tempfile.NamedTemporaryFile("w", suffix=".batch") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        churn = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, "sh", "-c",
             f"for i in $(seq 20); do bridge -batch {f.name} >/dev/null 2>&1; "
             f"bridge fdb flush dev p1 master 2>/dev/null; "
             f"bridge fdb flush dev p2 master 2>/dev/null; done; "
             f"bridge -batch {f.name} && bridge fdb add {marker} dev p1 master static"],
        )  # fmt: skip
        try:
            follow = dump(host.ns, "virbr0", "--follow")
            assert churn.wait(30) == 0
        finally:
            if churn.poll() is None:
                churn.kill()
                churn.wait()
    expected = {m: "p2" for m in macs[::2]} | {m: "p1" for m in [*macs[3::4], marker]}
    state = follow.wait_for(lambda s: s["sightings"] == expected, timeout=10)
    kernel = {
        r["mac"]: r["ifname"]
        for r in host.fdb_rows()
        if r.get("state") == "static" and "self" not in r.get("flags", [])
    }
    assert kernel == expected == state["sightings"]
    assert state["events"] > 0  # the source was up while the churn went on


# ---------------------------------------------------------------------------
# The decoder against pyroute2's, on bytes from a real kernel.

_COMPARE = """
import json, socket
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from controller.sources import netlink as nl

s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, 0))
marshal = MarshalRtnl()
mine, theirs = [], []
for seq, request in ((1, nl.link_dump_request(1)), (2, nl.fdb_dump_request(2))):
    s.send(request)
    done = False
    while not done:
        data = s.recv(1 << 16)
        for mtype, flags, mseq, pid, off, length in nl.iter_messages(data):
            done |= mtype == 3
            if mtype == 16:
                mine.append(nl.parse_link(data, off, length).__repr__())
            elif mtype == 28:
                e = nl.parse_fdb(data, off, length)
                mine.append(repr(e) if e else "skip")
        for m in marshal.parse(data):
            t = m["header"]["type"]
            if t == 16:
                kind = m.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
                addr = m.get_attr("IFLA_ADDRESS")
                theirs.append(repr(nl.Link(
                    m["index"], m.get_attr("IFLA_IFNAME"), kind, m.get_attr("IFLA_MASTER"),
                    bool(m["flags"] & 1) and bool(m["flags"] & 0x40),
                    addr if addr and len(addr) == 17 else None)))
            elif t == 28:
                self_ = m["flags"] & 2 or m["family"] != 7
                theirs.append("skip" if self_ else repr(nl.Fdb(
                    m.get_attr("NDA_LLADDR"), m["ifindex"], bool(m["state"] & 0x80),
                    m.get_attr("NDA_MASTER"))))
print(json.dumps({"mine": mine, "theirs": theirs}))
"""


def test_decoder_agrees_with_pyroute2(host: Host) -> None:
    host.bridge("virbr0")
    host.vm("vnet1", "virbr0", VM1)
    host.talk("vnet1")
    host.ip("link", "add", "x1", "type", "veth", "peer", "name", "x1peer")
    host.ip("link", "set", "x1", "master", "virbr0")
    host.batch(
        "bridge", [f"fdb add 02:00:00:04:00:{i:02x} dev x1 master static" for i in range(50)]
    )
    host.ip("tuntap", "add", "dev", "tap0", "mode", "tun")
    out = json.loads(in_ns(host.ns, PY, "-c", _COMPARE))
    assert out["mine"] == out["theirs"]
    assert len(out["mine"]) > 60
    assert any("kind='bridge'" in r for r in out["mine"])
    assert any(f"mac='{VM1}'" in r and "permanent=False" in r for r in out["mine"])


def test_constants_match_pyroute2() -> None:
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    def nla_id(cls: Any, name: str) -> int:
        return next(i for i, entry in enumerate(cls.nla_map) if entry[0] == name)

    assert nla_id(ifinfmsg, "IFLA_ADDRESS") == netlink.IFLA_ADDRESS
    assert nla_id(ifinfmsg, "IFLA_IFNAME") == netlink.IFLA_IFNAME
    assert nla_id(ifinfmsg, "IFLA_MASTER") == netlink.IFLA_MASTER
    assert nla_id(ifinfmsg, "IFLA_OPERSTATE") == netlink.IFLA_OPERSTATE
    assert nla_id(ifinfmsg, "IFLA_LINKINFO") == netlink.IFLA_LINKINFO
    assert nla_id(ifinfmsg, "IFLA_EXT_MASK") == netlink.IFLA_EXT_MASK
    assert nla_id(ndmsg, "NDA_LLADDR") == netlink.NDA_LLADDR
    assert nla_id(ndmsg, "NDA_MASTER") == netlink.NDA_MASTER


def _msg(mtype: int, body: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
    payload = body
    for atype, value in attrs:
        nla = len(value) + 4
        payload += nla.to_bytes(2, "little") + atype.to_bytes(2, "little") + value
        payload += b"\0" * (-nla % 4)
    return netlink._NLMSGHDR.pack(16 + len(payload), mtype, 0, 0, 0) + payload


def test_parse_events_offline() -> None:
    """What is kept and what is dropped, from hand-built messages (no kernel needed)."""
    mac = bytes.fromhex("525400aa0001")
    link = netlink._IFINFOMSG.pack(0, 1, 5, 0x1043, 0)
    kind = (4 + 7).to_bytes(2, "little") + (1).to_bytes(2, "little") + b"bridge\0" + b"\0"
    full = [(3, b"br0\0"), (1, mac), (16, b"\x06"), (10, (7).to_bytes(4, "little")),
            (18 | 0x8000, kind)]  # fmt: skip
    fdb = [(2, mac), (9, (7).to_bytes(4, "little"))]
    nd = netlink._NDMSG.pack
    data = b"".join([
        _msg(16, link, full),
        _msg(16, link, [(3, b"wlan0\0"), (11, b"x")]),  # partial (wireless event): ignored
        _msg(16, netlink._IFINFOMSG.pack(7, 1, 5, 0, 0), full),  # AF_BRIDGE port message
        _msg(17, netlink._IFINFOMSG.pack(7, 1, 5, 0, 0), full),  # AF_BRIDGE: left the bridge
        _msg(28, nd(7, 8, 0x02, 0, 0), fdb),  # learned
        _msg(28, nd(7, 8, 0x80, 0, 0), fdb),  # permanent (local)
        _msg(28, nd(7, 8, 0x80, 0x02, 0), fdb),  # NTF_SELF: the device's own list
        _msg(28, nd(2, 8, 0x02, 0, 0), fdb),  # ARP
        _msg(29, nd(7, 8, 0x02, 0, 0), fdb),
        _msg(17, link, full),
    ])  # fmt: skip
    got = netlink.parse_events(data)
    br0 = Link(5, "br0", "bridge", 7, True, "52:54:00:aa:00:01")
    assert got == [
        LinkUp(br0),
        FdbUp(Fdb("52:54:00:aa:00:01", 8, False, 7)),
        FdbUp(Fdb("52:54:00:aa:00:01", 8, True, 7)),
        FdbGone("52:54:00:aa:00:01", 8),
        LinkGone(5),
    ]
    # A truncated tail is not misread.
    assert netlink.parse_events(data[:-3]) == got[:-1]
