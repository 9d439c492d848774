"""The agent's containers (agents/containers.py) against the real kernel, in namespaces
made here, and `dom0 lab container add` in a lab.

The machine is test_agent_apply.py's: a "vm" namespace (the agent's) joined by a veth to
a "dom0" one. The Applier runs in a subprocess under `ip netns exec` (its AGENT script);
so does the watcher (WATCHER below), for as long as a test wants it, and restarted as
the agent would be. A container is a namespace of its own whose eth0's peer is plugged
into the agent's bridge in the vm namespace. What the tests check is what the kernel
holds, the ledger and the watcher's report; waits poll observable state with a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agents.apply import AGENT_PROTO
from agents.containers import BRIDGE, LEDGER, TABLE, Container, Port, Watcher, assign
from agents.files import Known, Root
from agents.session import REPORT_GAP
from common.agentconfig import MachineConfig, parse
from controller.lab import agent as lab_agent
from controller.lab import container as lab_container
from controller.lab import netns, processes, teardown
from controller.lab.probe import ping
from controller.lab.wait import wait_for
from tests.lab.test_agent_apply import ROOT, Machine, config, hub_config, in_ns, needs_wg, sh
from tests.unit.test_agent_session import NAME, Applier, Site, until

MakeNetns = Callable[[str], str]
PREFIX = "10.30.0.16/28"  # bridge 10.30.0.17, containers .18 to .30
GATEWAY = "10.30.0.17"
AGENT_RT = str(AGENT_PROTO)

# The watcher as the agent runs it: argv[1] the agent's root, argv[2] the file its
# report is written to at each change, argv[3] the configuration in place (wire JSON).
# SIGTERM cancels its nursery: it must then end, cleanly (exit 0).
WATCHER = r"""
import json, os, signal, sys
from pathlib import Path
import trio
from agents.containers import Watcher
from common.agentconfig import parse

root, out, config = Path(sys.argv[1]), Path(sys.argv[2]), parse(json.loads(sys.argv[3]))

def write(report):
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)

async def report(watcher):
    seen = watcher.generation
    while True:
        await watcher.wait_change(seen)
        seen = watcher.generation
        write(watcher.report())

async def main():
    watcher = Watcher(root, resync=1.0)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            watcher.configure(config)
            nursery.start_soon(report, watcher)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break

trio.run(main)
"""


class Containers:
    """The watcher of one machine (started, stopped, restarted) and its containers."""

    def __init__(self, m: Machine, make_netns: MakeNetns, tmp: Path) -> None:
        self.m, self.make_netns, self.tmp = m, make_netns, tmp
        self.out = tmp / "report.json"
        self.proc: subprocess.Popen[str] | None = None
        self.spaces: dict[str, str] = {}  # host-side interface -> container namespace

    def start(self, cfg: dict[str, Any]) -> None:
        assert self.proc is None
        self.out.unlink(missing_ok=True)
        self.log = open(self.tmp / "watcher.log", "a")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-c", WATCHER, str(self.m.root), str(self.out), json.dumps(cfg)]
        self.proc = subprocess.Popen(netns.exec_argv(self.m.ns, argv), stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=10)
            self.proc = None
            self.log.close()
            assert code == 0, f"the watcher did not end cleanly ({code}): {self.logged()[-2000:]}"

    def logged(self) -> str:
        return (self.tmp / "watcher.log").read_text()

    def report(self) -> list[dict[str, str]]:
        try:
            return json.loads(self.out.read_text())
        except FileNotFoundError:
            return []

    def wait_report(self, names: set[str], timeout: float = 5.0) -> list[dict[str, str]]:
        def reported() -> list[dict[str, str]] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the watcher exited: {self.logged()[-2000:]}")
            report = self.report()
            return report if {c["name"] for c in report} == names else None

        return wait_for(reported, timeout, f"a report of {sorted(names)}")

    def plug(self, interface: str, alias: str | None = None) -> str:
        """A container: a namespace whose eth0's peer `interface` joins the bridge."""
        ct = self.make_netns("agct")
        sh("ip", "-n", self.m.ns, "link", "add", interface, "type", "veth",
           "peer", "name", "eth0", "netns", ct)  # fmt: skip
        if alias is not None:
            sh("ip", "-n", self.m.ns, "link", "set", interface, "alias", alias)
        sh("ip", "-n", self.m.ns, "link", "set", interface, "master", BRIDGE)
        sh("ip", "-n", self.m.ns, "link", "set", interface, "up")
        self.spaces[interface] = ct
        return ct

    def unplug(self, interface: str) -> None:
        netns.delete([self.spaces.pop(interface)])  # (its veth pair goes with it)

    @staticmethod
    def addresses(ct: str) -> list[list[Any]]:
        """[cidr, IFA_PROTO] of each IPv4 address on the container's eth0."""
        script = (
            "import json, sys\nfrom pyroute2 import IPRoute\nwith IPRoute() as ipr:\n"
            "    i = ipr.link_lookup(ifname='eth0')[0]\n"
            "    out = [[f\"{m.get('IFA_LOCAL')}/{m['prefixlen']}\", m.get('IFA_PROTO')]\n"
            "           for m in ipr.get_addr(family=2) if m['index'] == i]\n"
            "json.dump(out, sys.stdout)\n"
        )
        return json.loads(in_ns(ct, script))

    @staticmethod
    def default(ct: str) -> list[tuple[str | None, str, str]]:
        routes = json.loads(sh("ip", "-n", ct, "-j", "-4", "route", "show", "default") or "[]")
        return [(r.get("gateway"), r["dev"], r.get("protocol", "boot")) for r in routes]


class Host(Machine):
    def settle(self) -> None:
        """Machine's wait, but for the bridge: with no port it has no carrier, and so
        neither an operstate UP nor a link-local address (nor will it get them)."""

        def settled() -> bool:
            for link in self.ip("address"):
                if "UP" not in link["flags"] or link["ifname"] == BRIDGE:
                    continue
                local = any(a["scope"] == "link" for a in link["addr_info"])
                if link["operstate"] not in ("UP", "UNKNOWN") or not local:
                    return False
            return True

        wait_for(settled, 5.0, "links up with their link-local addresses")


@pytest.fixture
def machine(make_netns: MakeNetns, tmp_path: Path) -> Machine:
    return Host(make_netns, tmp_path / "agent")


@pytest.fixture
def containers(machine: Machine, make_netns: MakeNetns, tmp_path: Path) -> Iterator[Containers]:
    c = Containers(machine, make_netns, tmp_path)
    try:
        yield c
    finally:
        c.stop()


def delegating(**over: Any) -> dict[str, Any]:
    """A bridge-domain machine (test_agent_apply's) with a prefix for its containers."""
    return config(**{"containers": PREFIX, **over})


def rules(m: Machine) -> list[dict[str, Any]]:
    return [r for r in m.ip("-4", "rule") if r.get("table") == str(TABLE)]


def table(m: Machine) -> list[dict[str, Any]]:
    # (`show table 97` fails while the table does not exist: all of them, filtered)
    return [r for r in m.ip("-4", "route", "show", "table", "all") if r.get("table") == str(TABLE)]


def route_get(m: Machine, *args: str) -> dict[str, Any]:
    return m.ip("-4", "route", "get", *args)[0]


def ledger(m: Machine) -> dict[str, Any]:
    return json.loads((m.root / LEDGER).read_text())


# ---- the pure part ---------------------------------------------------------------------------


def port(index: int, name: str, alias: str | None = None, nsid: int | None = 0) -> Port:
    return Port(index, name, alias, peer_index=2, peer_nsid=nsid)


def test_assign_keeps_known_addresses_and_refuses_what_is_no_container() -> None:
    """Ledger addresses stay, new names take the lowest free; bad names, duplicates, a peer
    in this namespace and what is beyond the limit or the prefix are skipped, each said."""
    known = {
        "b": Container("b", "c-b", "10.30.0.18/28"),
        "gone": Container("gone", "x", "10.30.0.19/28"),
    }
    ports = [port(3, "c-a", "a"), port(4, "c-b", "b"), port(5, "c-c", "Bad_Name"),
             port(6, "c-d", "a"), port(7, "c-e", None, nsid=None), port(8, "web")]  # fmt: skip
    got, problems = assign(ports, known, PREFIX)
    assert [(c.name, c.interface, c.address) for _, c in got] == [
        ("a", "c-a", "10.30.0.19/28"),
        ("b", "c-b", "10.30.0.18/28"),
        ("web", "web", "10.30.0.20/28"),
    ]
    assert len(problems) == 3 and all(p.startswith(("c-c:", "c-d:", "c-e:")) for p in problems)

    # A /30: one container. The limit serves the known name first, whatever its index.
    got, problems = assign([port(3, "c-a", "a"), port(4, "c-b", "b")], known, "10.30.0.16/30")
    assert [(c.name, c.address) for _, c in got] == [("b", "10.30.0.18/30")]
    assert problems == ["c-a: no address left in 10.30.0.16/30, skipped"]
    got, problems = assign([port(3, "c-a", "a"), port(4, "c-b", "b")], known, PREFIX, limit=1)
    assert [c.name for _, c in got] == ["b"] and problems == [
        "c-a: more than 1 containers, skipped"
    ]

    # Another prefix: every container is addressed again in it.
    got, _ = assign([port(4, "c-b", "b")], known, "10.40.0.0/24")
    assert [c.address for _, c in got] == ["10.40.0.2/24"]


# ---- the bridge, forwarding, the rule --------------------------------------------------------


def test_converge_makes_the_bridge_and_the_rule_and_takes_them_away(machine: Machine) -> None:
    """With a prefix: the bridge up with its first host address (the agent's), forwarding
    on, the rule and its table's one route; a second pass changes nothing. Without: the
    bridge, rule and route go, and the machine's own configuration stays."""
    m = machine
    m.apply(delegating())
    bridge = m.ip("address", "show", BRIDGE)[0]
    assert "UP" in bridge["flags"]
    assert ["dom0c", "10.30.0.17/28", AGENT_PROTO] in m.addresses()
    assert in_ns(m.ns, "print(open('/proc/sys/net/ipv4/ip_forward').read().strip())") == "1\n"
    assert [(r["src"], r["srclen"], r["iif"], r["priority"], r["protocol"]) for r in rules(m)] == [
        ("10.30.0.16", 28, BRIDGE, 970, AGENT_RT)
    ]
    assert [(r["dst"], r["gateway"], r["dev"], r["protocol"]) for r in table(m)] == [
        ("default", "10.10.0.1", "eth0", AGENT_RT)
    ]
    before = (m.snapshot(), m.ip("-4", "rule"), m.ip("link"))
    m.apply(delegating(), delegating())
    m.settle()
    assert (m.snapshot(), m.ip("-4", "rule"), m.ip("link")) == before

    # Another gateway: the table's one route follows.
    routes = [{"to": "0.0.0.0/0", "via": "10.10.0.9", "dev": "link"}]
    m.apply(delegating(routes=routes), delegating())
    assert [(r["dst"], r["gateway"]) for r in table(m)] == [("default", "10.10.0.9")]

    # Another prefix: the bridge's address follows, the rule too.
    m.apply(delegating(containers="10.30.1.0/29"), delegating(routes=routes))
    assert ["dom0c", "10.30.1.1/29", AGENT_PROTO] in m.addresses()
    assert not any(a[1] == "10.30.0.17/28" for a in m.addresses())
    assert [(r["src"], r["srclen"]) for r in rules(m)] == [("10.30.1.0", 29)]

    m.apply(config(), delegating(containers="10.30.1.0/29"))
    assert not m.has_link(BRIDGE)
    assert rules(m) == [] and table(m) == []
    assert ["eth0", "10.10.0.5/24", AGENT_PROTO] in m.addresses()


def test_bridge_domain_containers_reach_neighbours_through_the_gateway(machine: Machine) -> None:
    """A container's packet to a neighbour of the machine's own subnet is routed via dom0's
    gateway (the rule), where without the rule it would go on-link; the machine's own
    packets from the bridge's address to a container stay on the bridge."""
    m = machine
    m.apply(delegating())
    got = route_get(m, "10.10.0.7", "from", "10.30.0.18", "iif", BRIDGE)
    assert (got.get("gateway"), got["dev"], got.get("table")) == ("10.10.0.1", "eth0", str(TABLE))
    mine = route_get(m, "10.30.0.18", "from", GATEWAY)
    assert (mine.get("gateway"), mine["dev"]) == (None, BRIDGE)

    # The control: the same packet without the rule is on-link.
    sh("ip", "-n", m.ns, "rule", "del", "priority", "970")
    got = route_get(m, "10.10.0.7", "from", "10.30.0.18", "iif", BRIDGE)
    assert (got.get("gateway"), got["dev"]) == (None, "eth0")

    # The next pass puts the rule back.
    m.apply(delegating(), delegating())
    assert len(rules(m)) == 1


@needs_wg
def test_hub_machine_containers_follow_its_tunnel(machine: Machine) -> None:
    """A hub machine's containers need no rule: the main table's default is the tunnel.
    Turning it into a bridge-domain machine adds the rule, and back removes it."""
    from common.wireguard import keys

    m = machine
    hub_key = keys.to_base64(keys.PrivateKey.generate().public)
    m.apply({**hub_config(hub_key), "containers": PREFIX})
    assert ["dom0c", "10.30.0.17/28", AGENT_PROTO] in m.addresses()
    assert rules(m) == [] and table(m) == []
    got = route_get(m, "10.10.0.7", "from", "10.30.0.18", "iif", BRIDGE)
    assert got["dev"] == "wg0"

    m.apply(delegating(), {**hub_config(hub_key), "containers": PREFIX})
    assert len(rules(m)) == 1
    m.apply({**hub_config(hub_key), "containers": PREFIX}, delegating())
    assert rules(m) == [] and table(m) == []


def test_a_failing_container_step_rolls_the_pass_back(machine: Machine) -> None:
    """An interface of somebody else's where the bridge would go: the pass is refused
    with the reason, and rolled back (nothing of the agent's left); theirs stays."""
    m = machine
    sh("ip", "-n", m.ns, "link", "add", BRIDGE, "type", "veth", "peer", "name", "other")
    out = m.agent("apply", delegating())
    assert out == {"error": f"container bridge {BRIDGE}: {BRIDGE} exists and is not a bridge"}
    assert not any(proto == AGENT_PROTO for _, _, proto in m.addresses())
    assert rules(m) == [] and m.has_link(BRIDGE)


# ---- the watcher -----------------------------------------------------------------------------


def test_containers_get_addresses_routes_and_names(containers: Containers) -> None:
    """Each veth in the bridge is a container (named by its alias, else its own name): an
    address of the prefix on its peer, up, a default route via the bridge (both the
    agent's), and the report names it twice; two containers, two addresses; it works."""
    c, m = containers, containers.m
    m.apply(delegating())
    mac = m.ip("link", "show", BRIDGE)[0]["address"]
    c.start(delegating())
    nginx = c.plug("c-nginx", "nginx")
    web = c.plug("web")
    report = c.wait_report({"nginx", "web"})
    # (its own MAC: a port's would make the containers' gateway change with its ports)
    assert m.ip("link", "show", BRIDGE)[0]["address"] == mac
    by_name = {r["name"]: r for r in report}
    assert [r["name"] for r in report] == ["nginx", "web"]
    assert by_name["nginx"] == {
        "name": "nginx",
        "interface": "c-nginx",
        "address": by_name["nginx"]["address"],
        "fqdn": "nginx.web1.x.internal",
        "interface_fqdn": "eth0.nginx.web1.x.internal",
    }
    addresses = {r["address"] for r in report}
    assert len(addresses) == 2
    assert addresses <= {f"10.30.0.{i}/28" for i in range(18, 31)}
    for ct, name in ((nginx, "nginx"), (web, "web")):
        assert c.addresses(ct) == [[by_name[name]["address"], AGENT_PROTO]]
        assert c.default(ct) == [(GATEWAY, "eth0", AGENT_RT)]
        assert "UP" in m.ip("link", "show", by_name[name]["interface"])[0]["flags"]
    assert wait_for(lambda: ping(nginx, GATEWAY).ok, 5.0, "a ping from a container to its bridge")
    stored = ledger(m)
    assert stored["prefix"] == PREFIX and set(stored["containers"]) == {"nginx", "web"}
    assert stat.S_IMODE((m.root / LEDGER).stat().st_mode) == 0o600

    # A container gone: out of the report and of the ledger.
    c.unplug("web")
    c.wait_report({"nginx"})
    assert set(ledger(m)["containers"]) == {"nginx"}


def test_a_name_keeps_its_address_across_restarts(containers: Containers) -> None:
    """After a restart of the agent the same name has the same address, a container gone
    meanwhile is forgotten, and a new one takes a free address."""
    c, m = containers, containers.m
    m.apply(delegating())
    c.start(delegating())
    c.plug("c-a", "a")
    c.wait_report({"a"})
    c.plug("c-b", "b")
    before = {r["name"]: r["address"] for r in c.wait_report({"a", "b"})}
    c.stop()

    c.unplug("c-a")
    c.plug("c-new", "new")
    c.start(delegating())
    after = {r["name"]: r["address"] for r in c.wait_report({"b", "new"})}
    assert after["b"] == before["b"]
    assert after["new"] != after["b"]
    assert set(ledger(m)["containers"]) == {"b", "new"}


def test_names_that_are_no_dns_label_are_skipped(containers: Containers) -> None:
    """An alias that is no DNS label, or a name another container has, gets nothing (and is
    logged); the containers beside it are served."""
    c, m = containers, containers.m
    m.apply(delegating())
    c.start(delegating())
    bad = c.plug("c-bad", "Bad_Name!")
    long = c.plug("c-long", "x" * 64)
    c.plug("c-one", "one")
    twin = c.plug("c-twin", "one")
    c.plug("c-ok", "ok")
    c.wait_report({"one", "ok"})
    assert [r["interface"] for r in c.report() if r["name"] == "one"] == ["c-one"]
    for ct in (bad, long, twin):
        assert c.addresses(ct) == [] and c.default(ct) == []
    assert "'Bad_Name!' is not a container name" in c.logged()
    assert "c-twin: one is c-one's, skipped" in c.logged()


def test_a_prefix_removed_takes_the_addresses_away(containers: Containers) -> None:
    """Without a prefix the bridge goes (converge) and the watcher takes the agent's address
    and route off each container it had addressed; the ledger is emptied."""
    c, m = containers, containers.m
    m.apply(delegating())
    c.start(delegating())
    ct = c.plug("c-a", "a")
    c.wait_report({"a"})
    c.stop()
    sh("ip", "-n", ct, "address", "add", "192.168.77.2/24", "dev", "eth0")  # theirs

    m.apply(config(), delegating())
    assert not m.has_link(BRIDGE) and rules(m) == []
    c.start(config())
    wait_for(lambda: c.addresses(ct) == [["192.168.77.2/24", None]], 5.0, "the address gone")
    assert c.default(ct) == []
    wait_for(lambda: ledger(m)["containers"] == {}, 5.0, "an empty ledger")


def test_a_new_prefix_readdresses_every_container(containers: Containers) -> None:
    c, m = containers, containers.m
    m.apply(delegating())
    c.start(delegating())
    ct = c.plug("c-a", "a")
    c.wait_report({"a"})
    c.stop()
    m.apply(delegating(containers="10.30.1.0/29"), delegating())
    c.start(delegating(containers="10.30.1.0/29"))
    (r,) = c.wait_report({"a"})
    assert r["address"] == "10.30.1.2/29"
    assert c.addresses(ct) == [["10.30.1.2/29", AGENT_PROTO]]
    assert c.default(ct) == [("10.30.1.1", "eth0", AGENT_RT)]


# ---- the session: a change is reported at once -----------------------------------------------


class QuietWatcher(Watcher):
    """The real Watcher's reporting, without its netlink (this test runs in the root
    namespace): the test publishes what a pass would have found."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


async def test_a_container_change_sends_a_status_at_once(tmp_path: Path) -> None:
    site = Site(tmp_path)
    watcher = QuietWatcher(tmp_path / "agent")
    async with trio.open_nursery() as nursery:
        site.nursery = nursery
        agent = site.agent(Applier(), containers=watcher)
        nursery.start_soon(agent.session)

        def reported() -> Any:
            live = site.book.live.get(NAME)
            return live and live.report and live.report.get("containers")

        await until(lambda: site.book.live.get(NAME) and reported() == [])
        # (heartbeats every 30 s: only the change itself can send this report)
        found = [Container("nginx", "c-nginx", "10.30.0.18/28")]
        watcher._publish([{"name": c.name, "address": c.address} for c in found])
        with trio.fail_after(1):
            await until(lambda: reported() == [{"name": "nginx", "address": "10.30.0.18/28"}])
        # Changes in a burst: the last one is reported too, after REPORT_GAP.
        watcher._publish([{"name": "nginx"}, {"name": "web"}])
        watcher._publish([{"name": "web"}])
        with trio.fail_after(1 + REPORT_GAP):
            await until(lambda: reported() == [{"name": "web"}])
        nursery.cancel_scope.cancel()


# ---- dom0 lab container add ------------------------------------------------------------------


def lab_config(mac: str) -> MachineConfig:
    """A bridge-domain VM on the lab's bridge with a prefix (no controller: the agent runs
    it as its last-known-good and keeps trying to enroll)."""
    return parse(
        config(
            mac=mac,
            addresses=["10.250.0.55/16"],
            routes=[{"to": "0.0.0.0/0", "via": "10.250.0.1", "dev": "link"}],
            containers=PREFIX,
        )
    )


def dom0(*argv: str) -> subprocess.CompletedProcess[str]:
    return processes.run_dom0(*argv)


def test_lab_container_add_list_del_and_down(make_lab: Callable[..., Any]) -> None:
    """On a lab VM whose agent has a prefix: `container add` makes a namespace of the lab's,
    plugs it into the agent's bridge and prints the address the agent gave it; bad input
    is one line and exit 2; `lab down` deletes the container's namespace too."""
    lab = make_lab(2)
    root = Root(lab_agent.root(lab, 1))
    root.ensure()
    root.keep(Known(1, lab_config(lab.vm(1)["mac"])))
    lab_agent.start(lab, 1, "10.250.0.1")

    made = dom0("lab", "container", "add", "--name", lab.name, "--vm", "1", "nginx", "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["namespace"] == f"{lab.name}-vm1.nginx" == lab_container.namespace(lab, 1, "nginx")
    assert info["fqdn"] == "nginx.web1.x.internal" and info["address"].endswith("/28")
    assert Containers.addresses(info["namespace"]) == [[info["address"], AGENT_PROTO]]
    assert info["namespace"] in lab.read()["namespaces"]
    status = lab_agent.state(lab, 1)  # dom0 agent status --json
    assert status["containers_prefix"] == PREFIX
    assert [(c["fqdn"], c["address"]) for c in status["containers"]] == [
        ("nginx.web1.x.internal", info["address"])
    ]

    listed = dom0("lab", "container", "list", "--name", lab.name, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(c["name"], c["address"]) for c in json.loads(listed.stdout)] == [
        ("nginx", info["address"])
    ]

    for argv, says in (
        (["--vm", "1", "nginx"], "already"),  # the same again
        (["--vm", "1", "Bad_Name"], "not a container name"),
        (["--vm", "9", "db"], "no vm9"),
        (["--vm", "2", "db"], "runs no agent"),
        (["--vm", "two", "db"], "expected a VM's number"),
    ):
        out = dom0("lab", "container", "add", "--name", lab.name, *argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert says in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr

    # An agent whose configuration delegates no prefix.
    other = Root(lab_agent.root(lab, 2))
    other.ensure()
    other.keep(
        Known(
            1,
            dataclasses.replace(
                lab_config(lab.vm(2)["mac"]), addresses=("10.250.0.56/16",), containers=None
            ),
        )
    )
    lab_agent.start(lab, 2, "10.250.0.1")
    out = dom0("lab", "container", "add", "--name", lab.name, "--vm", "2", "db")
    assert out.returncode == 2 and "delegates none" in out.stderr, out.stderr

    made = dom0("lab", "container", "add", "--name", lab.name, "--vm", "1", "db")
    assert made.returncode == 0, made.stderr
    gone = dom0("lab", "container", "del", "--name", lab.name, "--vm", "1", "db")
    assert gone.returncode == 0, gone.stderr
    assert not netns.exists(lab_container.namespace(lab, 1, "db"))

    teardown.down(lab.name)
    assert not netns.exists(info["namespace"])
