"""The agent's Applier (agents/apply.py) against the real kernel, in namespaces made here.

Two namespaces joined by a veth: "vm" (the agent's, its end with a fixed MAC) and
"dom0" (10.250.0.1/16, and for the hub tests a wireguard-go hub). The Applier
always runs in a subprocess under `ip netns exec` (AGENT below), one per call as
after an agent restart; pytest stays in the root namespace and changes nothing
there. What the tests check is what the kernel holds (`ip -j`, and IFA_PROTO read
with pyroute2 in the namespace, which iproute2 6.1 does not print) or packets
through the tunnel. Waits poll observable state with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
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
state, key, port, peer, allowed = sys.argv[1:]
wg = detect(Path(state), prefer="userspace")
wg.ensure("wg0")
wg.configure("wg0", private_key=load_or_create(Path(key)), listen_port=int(port))
wg.replace_peers("wg0", [Peer(base64.b64decode(peer), (allowed,))])
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
    assert seen["routes"] == [{"to": "0.0.0.0/0", "via": None, "dev": "wg0"}]

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
