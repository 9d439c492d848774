"""The agent's Applier (agents/apply.py) against the real kernel, in namespaces made here.

Two namespaces joined by a veth: "vm" (the agent's, its end with a fixed MAC) and
"dom0" (10.250.0.1/16, and for the hub tests a wireguard-go hub; for the remap
tests the gateway, an echo server and addresses outside the machine's subnet). The Applier
always runs in a subprocess under `ip netns exec` (AGENT below), one per call as
after an agent restart; pytest stays in the root namespace and changes nothing
there. What the tests check is what the kernel holds (`ip -j`, and IFA_PROTO read
with pyroute2 in the namespace, which iproute2 6.1 does not print) or packets
through the tunnel, or TCP connections held open across passes, and what the
kernel said while a pass ran (`ip monitor`). Waits poll observable state with a
deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.apply import AGENT_PROTO, Applier
from common.wireguard import keys
from controller.lab.probe import ping
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab
needs_wg = pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MakeNetns = Callable[[str], str]
MAC = "52:54:00:aa:00:01"
HUB_PORT = 51820

# One agent call: argv[1] its root; stdin {"op": ..., "config": ..., "previous": ...};
# stdout {"result": ...} or {"error": ApplyError's message}.
AGENT = r"""
import json, sys
from pathlib import Path
from agents.apply import Applier, ApplyError
from common.agentconfig import parse

req = json.load(sys.stdin)
applier = Applier(Path(sys.argv[1]), prefer="userspace")
config = parse(req["config"])
try:
    if req["op"] == "apply":
        previous = req.get("previous")
        applier.apply(config, previous and parse(previous))
        out = {"result": None}
    else:
        out = {"result": applier.observe(config)}
except ApplyError as e:
    out = {"error": str(e)}
json.dump(out, sys.stdout)
"""

# Every address in the namespace with its IFA_PROTO: [[ifname, cidr, proto], ...].
ADDRESSES = r"""
import json
from pyroute2 import IPRoute
with IPRoute() as ipr:
    names = {m["index"]: m.get("IFLA_IFNAME") for m in ipr.get_links()}
    out = [[names[m["index"]], f"{m.get('IFA_LOCAL') or m.get('IFA_ADDRESS')}/{m['prefixlen']}",
            m.get("IFA_PROTO")] for m in ipr.get_addr()]
json.dump(sorted(out), __import__("sys").stdout)
"""

# The hub's end: wireguard-go wg0 listening, the agent's key as its one peer.
HUB = r"""
import base64, sys
from pathlib import Path
from common.wireguard import Peer, detect, load_or_create
state, key, port, peer, allowed = sys.argv[1:]  # allowed: comma-separated
wg = detect(Path(state), prefer="userspace")
wg.ensure("wg0")
wg.configure("wg0", private_key=load_or_create(Path(key)), listen_port=int(port))
wg.replace_peers("wg0", [Peer(base64.b64decode(peer), tuple(allowed.split(",")))])
"""


def sh(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def in_ns(ns: str, script: str, *args: str, stdin: str = "") -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        ["ip", "netns", "exec", ns, PY, "-c", script, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    if out.returncode:
        raise AssertionError(f"script in {ns} failed: {out.stderr.strip()}")
    return out.stdout


class Machine:
    """The vm namespace (its agent's root directory beside it) and dom0's, joined by a veth."""

    def __init__(self, make_netns: MakeNetns, root: Path) -> None:
        self.ns, self.dom0 = make_netns("agvm"), make_netns("agd0")
        self.root = root
        for ns in (self.ns, self.dom0):
            # Addresses usable at once, so that nothing changes after a pass
            # (a tentative link-local would, a second later).
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
               "net.ipv6.conf.default.accept_dad=0")  # fmt: skip
        sh("ip", "-n", self.ns, "link", "add", "eth0", "address", MAC, "type", "veth",
           "peer", "name", "d0", "netns", self.dom0)  # fmt: skip
        sh("ip", "-n", self.dom0, "address", "add", "10.250.0.1/16", "dev", "d0")
        sh("ip", "-n", self.dom0, "link", "set", "d0", "up")

    def agent(self, op: str, config: dict[str, Any], previous: dict[str, Any] | None = None) -> Any:
        req = {"op": op, "config": config, "previous": previous}
        return json.loads(in_ns(self.ns, AGENT, str(self.root), stdin=json.dumps(req)))

    def apply(self, config: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
        out = self.agent("apply", config, previous)
        assert out == {"result": None}, out
        self.settle()

    def addresses(self) -> list[list[Any]]:
        return json.loads(in_ns(self.ns, ADDRESSES))

    def ip(self, *args: str) -> Any:
        return json.loads(sh("ip", "-n", self.ns, "-j", *args) or "[]")

    def routes(self, family: str = "-4") -> list[dict[str, Any]]:
        return self.ip(family, "route", "show", "table", "main")

    def snapshot(self) -> dict[str, Any]:
        return {
            "addr": self.ip("address"),
            "route4": self.ip("-4", "route", "show", "table", "all"),
            "route6": self.ip("-6", "route", "show", "table", "all"),
        }

    def settle(self) -> None:
        """Wait for what the kernel does after a link comes up: its operstate, and its
        IPv6 link-local address (on the tunnel's too: a stable-privacy one)."""

        def settled() -> bool:
            for link in self.ip("address"):
                if "UP" not in link["flags"]:
                    continue
                local = any(a["scope"] == "link" for a in link["addr_info"])
                if link["operstate"] not in ("UP", "UNKNOWN") or not local:
                    return False
            return True

        wait_for(settled, 5.0, "links up with their link-local addresses")

    def has_link(self, name: str) -> bool:
        return subprocess.run(["ip", "-n", self.ns, "link", "show", name],
                              capture_output=True).returncode == 0  # fmt: skip

    def daemons(self) -> list[int]:
        """wireguard-go processes in the namespace (not zombies)."""
        pids = []
        for pid in sh("ip", "netns", "pids", self.ns).split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if comm == "wireguard-go" and state != "Z":
                pids.append(int(pid))
        return pids


@pytest.fixture
def machine(make_netns: MakeNetns, tmp_path: Path) -> Machine:
    return Machine(make_netns, tmp_path / "agent")


def config(**over: Any) -> dict[str, Any]:
    """A bridge-domain machine: its domain address on the link, dom0 its gateway."""
    base: dict[str, Any] = {
        "schema": 1,
        "name": "web1.x.internal",
        "hostname": "web1",
        "mac": MAC,
        "addresses": ["10.10.0.5/24", "fd00:10::5/64"],
        "routes": [
            {"to": "0.0.0.0/0", "via": "10.10.0.1", "dev": "link"},
            {"to": "10.20.0.0/16", "via": "10.10.0.1", "dev": "link"},
            {"to": "::/0", "via": "fd00:10::1", "dev": "link"},
        ],
        "tunnel": None,
        "containers": None,
    }
    return {**base, **over}


def hub_config(hub_key: str, interface: str = "wg0") -> dict[str, Any]:
    """A hub machine: its underlay address on the link, everything through the tunnel."""
    return config(
        addresses=["10.250.0.5/16"],
        routes=[{"to": "0.0.0.0/0", "via": None, "dev": "tunnel"}],
        tunnel={
            "interface": interface,
            "address": "10.10.0.5/32",
            "peer_public_key": hub_key,
            "endpoint": f"10.250.0.1:{HUB_PORT}",
            "allowed_ips": ["0.0.0.0/0"],
            "mtu": 1380,  # not wireguard-go's 1420: set by the agent
            "keepalive": 25,
        },
    )


def owned(m: Machine) -> list[tuple[str, str]]:
    return [(name, cidr) for name, cidr, proto in m.addresses() if proto == AGENT_PROTO]


def route_set(m: Machine, family: str = "-4") -> set[tuple[str, str | None, str, str]]:
    return {
        (r["dst"], r.get("gateway"), r["dev"], r.get("protocol", "boot"))  # iproute2 omits "boot"
        for r in m.routes(family)
    }


AGENT_RT = str(AGENT_PROTO)  # how `ip -j route` shows a protocol without a name


def test_bridge_domain_config(machine: Machine) -> None:
    """Addresses and routes in place with the agent's marks, the link up; a second pass
    changes nothing; a foreign address and route survive; what the next config drops goes."""
    m = machine
    m.apply(config())
    assert "UP" in m.ip("link", "show", "eth0")[0]["flags"]
    assert owned(m) == [("eth0", "10.10.0.5/24"), ("eth0", "fd00:10::5/64")]
    v6 = [a for a in m.ip("address", "show", "eth0")[0]["addr_info"] if a["local"] == "fd00:10::5"]
    assert v6 and v6[0].get("nodad"), v6  # usable at once (this namespace skips DAD anyway)
    assert {("default", "10.10.0.1", "eth0", AGENT_RT),
            ("10.20.0.0/16", "10.10.0.1", "eth0", AGENT_RT)} <= route_set(m)  # fmt: skip
    assert ("default", "fd00:10::1", "eth0", AGENT_RT) in route_set(m, "-6")
    assert (m.root / "hostname").read_text() == "web1\n"

    before = m.snapshot()
    m.apply(config(), config())
    assert m.snapshot() == before

    # Somebody else's address and route, then a config without the IPv6 address,
    # its default route and the 10.20.0.0/16 route.
    sh("ip", "-n", m.ns, "address", "add", "10.10.0.77/24", "dev", "eth0")
    sh("ip", "-n", m.ns, "route", "add", "10.66.0.0/24", "via", "10.10.0.1")
    smaller = config(
        addresses=["10.10.0.5/24"], routes=[{"to": "0.0.0.0/0", "via": "10.10.0.1", "dev": "link"}]
    )
    m.apply(smaller, config())
    assert owned(m) == [("eth0", "10.10.0.5/24")]
    assert ["eth0", "10.10.0.77/24", None] in m.addresses()
    routes = route_set(m)
    assert ("default", "10.10.0.1", "eth0", AGENT_RT) in routes
    assert ("10.66.0.0/24", "10.10.0.1", "eth0", "boot") in routes
    assert not any(r[0] == "10.20.0.0/16" for r in routes)
    assert not any(r[3] == AGENT_RT for r in route_set(m, "-6"))


def test_unappliable_config_rolls_back(machine: Machine) -> None:
    """A route the kernel refuses (its gateway on no connected subnet): ApplyError naming
    it, and the previous configuration exactly in place; with no previous one, nothing
    of the agent's is left."""
    m = machine
    bad = config(
        hostname="web2",
        addresses=["10.10.0.6/24", "fd00:10::6/64"],
        routes=[
            {"to": "0.0.0.0/0", "via": "10.10.0.1", "dev": "link"},
            {"to": "10.99.0.0/24", "via": "10.77.0.1", "dev": "link"},
        ],
    )
    reason = "route 10.99.0.0/24 via 10.77.0.1: Network is unreachable"

    assert m.agent("apply", bad) == {"error": reason}
    assert owned(m) == []
    assert not any(r[3] == AGENT_RT for r in route_set(m) | route_set(m, "-6"))
    assert not (m.root / "hostname").exists()

    m.apply(config())
    before = m.snapshot()
    assert m.agent("apply", bad, config()) == {"error": reason}
    m.settle()
    assert m.snapshot() == before
    assert owned(m) == [("eth0", "10.10.0.5/24"), ("eth0", "fd00:10::5/64")]
    assert (m.root / "hostname").read_text() == "web1\n"


@needs_wg
def test_hub_config_reaches_the_hub_through_the_tunnel(machine: Machine, tmp_path: Path) -> None:
    """Underlay address on the link, wg0 with the domain address and the agent's key,
    everything routed into it: a ping reaches the hub's tunnel address, and observe
    reports the handshake. A second pass changes nothing and keeps the daemon."""
    m = machine
    hub_key = tmp_path / "hub.key"
    hub_pub = keys.to_base64(keys.load_or_create(hub_key).public)
    agent_pub = Applier(m.root).wg_public_key()
    hub = (str(tmp_path / "hub-wg"), str(hub_key), str(HUB_PORT), agent_pub, "10.10.0.5/32")
    in_ns(m.dom0, HUB, *hub)
    sh("ip", "-n", m.dom0, "address", "add", "10.10.0.1/24", "dev", "wg0")
    sh("ip", "-n", m.dom0, "link", "set", "wg0", "up")

    m.apply(hub_config(hub_pub))
    assert owned(m) == [("eth0", "10.250.0.5/16"), ("wg0", "10.10.0.5/32")]
    wg0 = m.ip("link", "show", "wg0")[0]
    assert wg0["mtu"] == 1380 and "UP" in wg0["flags"]
    assert ("default", None, "wg0", AGENT_RT) in route_set(m)

    # The hub answers only packets from 10.10.0.5 sealed with the agent's key.
    wait_for(lambda: ping(m.ns, "10.10.0.1").ok, 10.0, "a ping through the tunnel to the hub")
    seen = m.agent("observe", hub_config(hub_pub))["result"]
    assert seen["interface"] == "eth0" and seen["addresses"][0] == "10.250.0.5/16"
    assert seen["tunnel"]["interface"] == "wg0" and "10.10.0.5/32" in seen["tunnel"]["addresses"]
    assert seen["tunnel"]["latest_handshake"] is not None
    assert seen["routes"] == [{"to": "0.0.0.0/0", "via": None, "dev": "wg0", "src": "10.10.0.5"}]
    assert seen["deprecated"] == [] and seen["tunnel"]["deprecated"] == []

    daemons, before = m.daemons(), m.snapshot()
    assert len(daemons) == 1
    m.apply(hub_config(hub_pub), hub_config(hub_pub))
    assert m.snapshot() == before and m.daemons() == daemons


@needs_wg
def test_removing_the_tunnel_deletes_its_interface(machine: Machine) -> None:
    """A new tunnel name replaces the old interface; a config without a tunnel removes it,
    its daemon, its address and the routes through it."""
    m = machine
    some_key = keys.to_base64(keys.PrivateKey.generate().public)
    m.apply(hub_config(some_key))
    assert m.has_link("wg0") and len(m.daemons()) == 1

    m.apply(hub_config(some_key, "wg1"), hub_config(some_key))
    assert m.has_link("wg1") and not m.has_link("wg0") and len(m.daemons()) == 1
    assert ("default", None, "wg1", AGENT_RT) in route_set(m)

    plain = config(addresses=["10.250.0.5/16"], routes=[])
    m.apply(plain, hub_config(some_key, "wg1"))
    assert not m.has_link("wg1") and m.daemons() == []
    assert owned(m) == [("eth0", "10.250.0.5/16")]
    assert not any(r[3] == AGENT_RT for r in route_set(m))


def test_wg_key_is_private(tmp_path: Path) -> None:
    """root/wg.key is made 0600, kept, and is the key whose public half is reported."""
    applier = Applier(tmp_path / "agent")
    public = applier.wg_public_key()
    path = tmp_path / "agent" / "wg.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert applier.wg_public_key() == public
    assert keys.to_base64(keys.load(path).public) == public


# ---- remaps: the old address kept deprecated through the grace, then removed ------------------

ECHO_PORT = 7007
OUTSIDE, OUTSIDE6 = "203.0.113.1", "2001:db8::1"  # dom0's, beyond the machine's subnet

# dom0's end: answers each line with the address it came from ("10.10.0.5 ping").
ECHO = r"""
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])), reuse_port=True)
print("listening", flush=True)
def serve(c, peer):
    with c, c.makefile("rb") as f:
        for line in f:
            c.sendall(peer.encode() + b" " + line)
while True:
    c, (peer, _) = srv.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# The machine's end, one line a command: "open NAME" (prints the local address),
# "send NAME TEXT" (prints the answer). A connection that fails ends the script.
CLIENT = r"""
import socket, sys
conns = {}
for line in sys.stdin:
    op, name, *text = line.split()
    if op == "open":
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        conns[name] = (s, s.makefile("rb"))
        print(s.getsockname()[0], flush=True)
    else:
        s, f = conns[name]
        s.sendall(text[0].encode() + b"\n")
        print(f.readline().decode().strip(), flush=True)
"""

Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a long-lived process (argv); each one is killed by its pid at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(*argv: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


class Connections:
    """TCP connections from the vm namespace to the echo server in dom0's, held open
    across passes by one client process."""

    def __init__(self, m: Machine, spawn: Spawn, to: str) -> None:
        server = spawn("ip", "netns", "exec", m.dom0, PY, "-c", ECHO, str(ECHO_PORT))
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        self.client = spawn("ip", "netns", "exec", m.ns, PY, "-c", CLIENT, to, str(ECHO_PORT))

    def _ask(self, line: str) -> str:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(line + "\n")
        self.client.stdin.flush()
        out = self.client.stdout.readline().strip()
        if not out:
            assert self.client.stderr is not None
            raise AssertionError(f"{line}: the client failed: {self.client.stderr.read()[-2000:]}")
        return out

    def open(self, name: str) -> str:
        """A new connection; its source address."""
        return self._ask(f"open {name}")

    def send(self, name: str, text: str) -> str:
        """`text` through connection `name`: "SOURCE TEXT" as the server saw it."""
        return self._ask(f"send {name} {text}")


class Monitor:
    """`ip monitor address route` in the vm namespace: what the kernel did while a pass
    ran, between two marks (an address added to lo and removed; the agent leaves lo
    alone)."""

    def __init__(self, m: Machine, spawn: Spawn) -> None:
        self.ns, self.lines, self.marks = m.ns, list[str](), 0
        self.proc = spawn("ip", "-n", m.ns, "-o", "monitor", "address", "route")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def _mark(self) -> int:
        """Where a new mark came through (tried again until the monitor listens)."""
        self.marks += 1
        gone = f"Deleted 1: lo    inet 127.0.0.{self.marks + 1}/32"

        def seen() -> int | None:
            sh("ip", "-n", self.ns, "address", "add", f"127.0.0.{self.marks + 1}/32", "dev", "lo")
            sh("ip", "-n", self.ns, "address", "del", f"127.0.0.{self.marks + 1}/32", "dev", "lo")
            at = [i for i, line in enumerate(self.lines) if line.startswith(gone)]
            return at[-1] + 1 if at else None

        return wait_for(seen, 5.0, "ip monitor to listen")

    def during(self, fn: Callable[[], object]) -> list[str]:
        """The kernel's address and route events while fn ran."""
        start = self._mark()
        fn()
        end = self._mark()
        return self.lines[start:end]


def deleted(events: list[str], what: str) -> list[str]:
    """Deleted addresses ("inet 10.10.0.5/24") or routes ("default via")."""
    return [e for e in events if e.startswith("Deleted") and what in e]


def addr_info(m: Machine, dev: str = "eth0") -> dict[str, dict[str, Any]]:
    return {a["local"]: a for a in m.ip("address", "show", dev)[0]["addr_info"]}


def source(m: Machine, to: str) -> str:
    """The address a new connection to `to` leaves from (the kernel's route lookup)."""
    return str(m.ip("-6" if ":" in to else "-4", "route", "get", to)[0]["prefsrc"])


def promote_secondaries(m: Machine, dev: str) -> str:
    path = f"/proc/sys/net/ipv4/conf/{dev}/promote_secondaries"
    return sh("ip", "netns", "exec", m.ns, "cat", path).strip()


FOREVER = 4294967295  # `ip -j`'s lifetime "forever"


def snapshot(m: Machine) -> dict[str, Any]:
    """m.snapshot() once eth0's operstate is UP: it may still say UNKNOWN for up to a
    second after the link came up (the kernel's linkwatch), which settle() accepts."""
    wait_for(lambda: m.ip("link", "show", "eth0")[0]["operstate"] == "UP", 5.0, "eth0 UP")
    return m.snapshot()


def remap(old: str, new: str, old6: str, new6: str, **over: Any) -> dict[str, Any]:
    """A bridge-domain machine's config through a remap: new addresses, the old ones
    deprecated (or, with old="" and old6="", none left)."""
    return config(addresses=[new, new6], deprecated=[a for a in (old, old6) if a], **over)


@pytest.fixture
def gateway(machine: Machine) -> Machine:
    """dom0 as the bridge domain's gateway, with addresses beyond the machine's subnet."""
    m = machine
    for cidr, dev in (("10.10.0.1/24", "d0"), ("fd00:10::1/64", "d0"),
                      (f"{OUTSIDE}/32", "lo"), (f"{OUTSIDE6}/128", "lo")):  # fmt: skip
        sh("ip", "-n", m.dom0, "address", "add", cidr, "dev", dev)
    sh("ip", "-n", m.dom0, "link", "set", "lo", "up")
    return m


A, B, A6, B6 = "10.10.0.5/24", "10.10.0.6/24", "fd00:10::5/64", "fd00:10::6/64"


def test_remap_keeps_the_old_address_deprecated_then_removes_it(
    gateway: Machine, spawn: Spawn
) -> None:
    """[A] then [B] with A deprecated: A's lifetimes change in place (never removed), a
    connection open from A goes on passing data, new ones leave from B (routes carry src);
    a second pass changes nothing. Then [B] alone: A goes, B and the routes stay
    (promote_secondaries: A was the subnet's primary)."""
    m = gateway
    first = config(addresses=[A, A6])
    m.apply(first)
    assert promote_secondaries(m, "eth0") == "1"
    assert source(m, OUTSIDE) == "10.10.0.5" and source(m, OUTSIDE6) == "fd00:10::5"
    conns, monitor = Connections(m, spawn, OUTSIDE), Monitor(m, spawn)
    assert conns.open("old") == "10.10.0.5"
    assert conns.send("old", "before") == "10.10.0.5 before"

    during = remap(A, B, A6, B6)
    events = monitor.during(lambda: m.apply(during, first))
    assert not [e for e in events if e.startswith("Deleted") and "proto 97" in e], events
    assert not deleted(events, f"inet {A}") and not deleted(events, f"inet6 {A6}"), events
    info = addr_info(m)
    assert info["10.10.0.5"].get("deprecated") and info["fd00:10::5"].get("deprecated")
    assert (
        info["fd00:10::5"]["preferred_life_time"] == 0
    )  # (IPv4 shows a permanent one's as forever)
    for ip in ("10.10.0.5", "fd00:10::5", "10.10.0.6", "fd00:10::6"):
        assert info[ip]["valid_life_time"] == FOREVER, info[ip]
    for ip in ("10.10.0.6", "fd00:10::6"):
        assert not info[ip].get("deprecated") and info[ip]["preferred_life_time"] == FOREVER
    assert sorted(owned(m)) == sorted(("eth0", x) for x in (A, B, A6, B6))  # still the agent's
    assert source(m, OUTSIDE) == "10.10.0.6" and source(m, OUTSIDE6) == "fd00:10::6"
    assert {(r["dst"], r.get("prefsrc")) for r in m.routes() if r.get("protocol") == AGENT_RT} == {
        ("default", "10.10.0.6"), ("10.20.0.0/16", "10.10.0.6")}  # fmt: skip
    assert conns.send("old", "during") == "10.10.0.5 during"
    assert conns.open("new") == "10.10.0.6"
    assert conns.send("new", "during") == "10.10.0.6 during"
    seen = m.agent("observe", during)["result"]
    assert sorted(seen["deprecated"]) == [A, A6]
    assert {"to": "0.0.0.0/0", "via": "10.10.0.1", "dev": "eth0", "src": "10.10.0.6"} in seen[
        "routes"
    ]
    before = snapshot(m)
    m.apply(during, during)
    assert snapshot(m) == before

    after = config(addresses=[B, B6])
    events = monitor.during(lambda: m.apply(after, during))
    assert deleted(events, f"inet {A}") and deleted(events, f"inet6 {A6}"), events
    assert not deleted(events, f"inet {B}") and not deleted(events, "default via"), events
    assert owned(m) == [("eth0", B), ("eth0", B6)]
    assert ("default", "10.10.0.1", "eth0", AGENT_RT) in route_set(m)
    assert source(m, OUTSIDE) == "10.10.0.6" and source(m, OUTSIDE6) == "fd00:10::6"
    assert conns.send("new", "after") == "10.10.0.6 after"
    assert m.agent("observe", after)["result"]["deprecated"] == []


def test_a_failed_remap_rolls_back_in_place(gateway: Machine, spawn: Spawn) -> None:
    """A remap the kernel refuses (a route it cannot reach): the previous configuration
    exactly as it was, the old address never removed nor the default route (the
    rollback makes A preferred and routes leave from it before B goes), and a
    connection open from A passes data throughout."""
    m = gateway
    first = config(addresses=[A, A6])
    m.apply(first)
    conns, monitor = Connections(m, spawn, OUTSIDE), Monitor(m, spawn)
    assert conns.open("old") == "10.10.0.5"
    before = snapshot(m)
    bad = remap(A, B, A6, B6, routes=[*first["routes"], {"to": "10.99.0.0/24",
                "via": "10.77.0.1", "dev": "link"}])  # fmt: skip

    out: list[Any] = []
    events = monitor.during(lambda: out.append(m.agent("apply", bad, first)))
    assert out == [{"error": "route 10.99.0.0/24 via 10.77.0.1: Network is unreachable"}]
    assert not deleted(events, f"inet {A}") and not deleted(events, "default via"), events
    m.settle()
    assert snapshot(m) == before
    assert conns.send("old", "still") == "10.10.0.5 still"


@needs_wg
def test_hub_remap_keeps_the_old_tunnel_address_deprecated(
    machine: Machine, spawn: Spawn, tmp_path: Path
) -> None:
    """The same through the tunnel: the old domain address stays on wg0, deprecated, a
    connection from it to the hub goes on, new ones leave from the new address; then
    it goes, and the new address and the route through the tunnel stay."""
    m = machine
    hub_key = tmp_path / "hub.key"
    hub_pub = keys.to_base64(keys.load_or_create(hub_key).public)
    agent_pub = Applier(m.root).wg_public_key()
    both = "10.10.0.5/32,10.10.0.6/32"  # (dom0 routes both to the machine through the grace)
    in_ns(m.dom0, HUB, str(tmp_path / "hub-wg"), str(hub_key), str(HUB_PORT), agent_pub, both)
    sh("ip", "-n", m.dom0, "address", "add", "10.10.0.1/24", "dev", "wg0")
    sh("ip", "-n", m.dom0, "link", "set", "wg0", "up")

    def hub(address: str, deprecated: list[str]) -> dict[str, Any]:
        c = hub_config(hub_pub)
        return {**c, "tunnel": {**c["tunnel"], "address": address}, "deprecated": deprecated}

    first = hub("10.10.0.5/32", [])
    m.apply(first)
    assert promote_secondaries(m, "wg0") == "1"
    wait_for(lambda: ping(m.ns, "10.10.0.1").ok, 10.0, "a ping through the tunnel to the hub")
    conns, monitor = Connections(m, spawn, "10.10.0.1"), Monitor(m, spawn)
    assert conns.open("old") == "10.10.0.5"

    during = hub("10.10.0.6/32", ["10.10.0.5/32"])
    events = monitor.during(lambda: m.apply(during, first))
    assert not deleted(events, "inet 10.10.0.5/32") and not deleted(events, "default"), events
    info = addr_info(m, "wg0")
    assert info["10.10.0.5"].get("deprecated") and not info["10.10.0.6"].get("deprecated")
    assert source(m, "10.10.0.1") == "10.10.0.6"
    assert conns.send("old", "during") == "10.10.0.5 during"
    assert conns.open("new") == "10.10.0.6"
    seen = m.agent("observe", during)["result"]
    assert seen["tunnel"]["deprecated"] == ["10.10.0.5/32"] and seen["deprecated"] == []
    assert seen["routes"] == [{"to": "0.0.0.0/0", "via": None, "dev": "wg0", "src": "10.10.0.6"}]

    after = hub("10.10.0.6/32", [])
    events = monitor.during(lambda: m.apply(after, during))
    assert deleted(events, "inet 10.10.0.5/32") and not deleted(events, "default"), events
    assert owned(m) == [("eth0", "10.250.0.5/16"), ("wg0", "10.10.0.6/32")]
    assert ("default", None, "wg0", AGENT_RT) in route_set(m)
    assert conns.send("new", "after") == "10.10.0.6 after"
