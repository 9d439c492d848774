"""The VM's containers: an address and two names for each one plugged into the agent's
bridge, from the prefix dom0 delegates to this machine (config.containers).

Two halves, as the rest of the agent:
- `converge(config)`, a step of the Applier's pass (agents/apply.py: synchronous,
  idempotent, rolled back with the rest): the bridge BRIDGE with the prefix's first
  host address, IPv4 forwarding, and for a bridge-domain machine the rule
  `from PREFIX iif BRIDGE lookup TABLE`, whose table holds only the default route via
  dom0's gateway: what a container sends to a neighbour of the machine's own subnet
  goes through dom0, which enforces the policy, never on-link. (A hub machine's
  default route is its tunnel already.) Without a prefix it removes what it made.
- `Watcher`, a trio task: every veth enslaved to the bridge is a container, named by
  the interface's alias (else its name). Each gets an address of the prefix, kept in
  ROOT/containers.json (the ledger) so that a name keeps its address across restarts;
  the watcher puts it on the veth's peer, in the container's namespace, with a
  default route via the bridge, and reports who has what (`report()`).

The watcher is level-triggered: a netlink event only wakes it, and each pass reads
the whole bridge and makes every container right (a lost event costs a delay, and a
resync every RESYNC seconds repairs what changed inside a container's namespace,
which this namespace cannot see). A tenant's processes may make interfaces: names are
checked, at most MAX_CONTAINERS are served, and a problem is logged, not fatal.

What the agent puts in place carries AGENT_PROTO as in apply.py: the bridge's address,
the container end's address and default route, the rule and its table's route.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

# The Applier's own marks and error, and how its steps name a failure: this module's
# converge is one of its steps. (apply.py imports this module inside its functions.)
from agents.apply import (
    AGENT_PROTO,
    MAIN_TABLE,
    ApplyError,
    _pick_link,
    _read_links,
    _reason,
    _step,
)
from agents.files import MAX_FILE, FileError, write_atomic
from common.agentconfig import MachineConfig

log = logging.getLogger(__name__)

BRIDGE = "dom0c"  # the containers' bridge in the VM's namespace
TABLE = 0x61  # the routing table of the containers' rule (97, as AGENT_PROTO)
RULE_PRIORITY = 970  # before the main table's 32766
MAX_CONTAINERS = 253  # served per machine; more veths are logged and skipped
LEDGER = "containers.json"  # under the agent's root
LEDGER_VERSION = 1
RESYNC = 60.0  # seconds between passes that check every container's namespace again
SETTLE = 0.05  # seconds an event waits for the rest of its burst (a veth: add, master, up)
NETNS_DIR = Path("/run/netns")
FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")  # this namespace's (per opener)

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_IFF_UP = 0x1
_CLONE_NEWNET = 0x40000000
_NSID_NONE = (-1, 0xFFFFFFFF)  # RTM_GETNSID: this namespace has no id for that one
_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10
_NETLINK_ROUTE = 0
_MAX_WARNED = 1024

T = TypeVar("T")


# ---- the pure core -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Port:
    """A veth enslaved to the bridge, as the kernel shows it in this namespace."""

    index: int
    interface: str  # the host-side name
    alias: str | None
    peer_index: int  # IFLA_LINK: the peer's index in its own namespace
    peer_nsid: int | None  # IFLA_LINK_NETNSID: None when the peer is in this namespace

    @property
    def name(self) -> str:
        return self.alias or self.interface


@dataclass(frozen=True, slots=True, order=True)
class Container:
    name: str  # one DNS label: NAME of NAME.web1.x.internal
    interface: str  # the host-side veth
    address: str  # CIDR, the prefix's length: 10.30.0.18/28


def valid_name(name: str) -> bool:
    """One DNS label: a-z, 0-9 and '-' (not first or last), 1 to 63 characters."""
    return _LABEL.fullmatch(name) is not None


def bridge_address(prefix: str) -> str:
    """The prefix's first host address, the bridge's: 10.30.0.17/28."""
    net = ipaddress.IPv4Network(prefix)
    return f"{net.network_address + 1}/{net.prefixlen}"


def gateway(config: MachineConfig) -> str | None:
    """Where a bridge-domain machine's containers send everything: its IPv4 default
    route's gateway on the link. None for a hub machine (its default is the tunnel)."""
    if config.tunnel is not None:
        return None
    for r in config.routes:
        if r.to == "0.0.0.0/0" and r.dev == "link" and r.via:
            return r.via
    raise ApplyError(
        "containers: a machine without a tunnel needs an IPv4 default route via a gateway "
        "for its containers' traffic"
    )


def check(config: MachineConfig) -> None:
    """What no pass could converge to, refused before any change (ApplyError)."""
    if config.containers is not None:
        gateway(config)


def assign(
    ports: Iterable[Port],
    ledger: Mapping[str, Container],
    prefix: str,
    limit: int = MAX_CONTAINERS,
) -> tuple[list[tuple[Port, Container]], list[str]]:
    """The containers among the ports, each with its address (sorted by name), and what
    was skipped, one line each.

    A name is one port's, the oldest's (lowest index). A name keeps its ledger address
    while that is still a container's address of the prefix (not the network, the
    bridge's or the broadcast); a new one takes the lowest free. At most `limit`, those
    the ledger knows first: new interfaces cannot push a running container out."""
    net = ipaddress.IPv4Network(prefix)
    first, last = int(net.network_address) + 2, int(net.broadcast_address) - 1
    problems: list[str] = []
    chosen: dict[str, Port] = {}
    for p in sorted(ports, key=lambda p: p.index):
        if not valid_name(p.name):
            problems.append(
                f"{p.interface}: {p.name[:80]!r} is not a container name (one DNS label: "
                "a-z, 0-9 and '-', 1 to 63 characters), skipped"
            )
        elif p.peer_nsid is None:
            problems.append(f"{p.interface}: its peer is in this namespace, not a container")
        elif p.name in chosen:
            problems.append(f"{p.interface}: {p.name} is {chosen[p.name].interface}'s, skipped")
        else:
            chosen[p.name] = p
    served = sorted(chosen.values(), key=lambda p: (p.name not in ledger, p.index))
    problems += [f"{p.interface}: more than {limit} containers, skipped" for p in served[limit:]]
    found: list[tuple[Port, int]] = []
    used: set[int] = set()
    fresh: list[Port] = []
    for p in served[:limit]:
        old = ledger.get(p.name)
        ip = int(ipaddress.IPv4Interface(old.address).ip) if old else 0
        if first <= ip <= last and ip not in used:
            used.add(ip)
            found.append((p, ip))
        else:
            fresh.append(p)
    free = (ip for ip in range(first, last + 1) if ip not in used)
    for p in sorted(fresh, key=lambda p: p.index):
        got = next(free, None)
        if got is None:
            problems.append(f"{p.interface}: no address left in {prefix}, skipped")
            continue
        found.append((p, got))
    out = [
        (p, Container(p.name, p.interface, f"{ipaddress.IPv4Address(ip)}/{net.prefixlen}"))
        for p, ip in found
    ]
    return sorted(out, key=lambda pc: pc[1].name), problems


def report_of(containers: Iterable[Container], machine: str) -> list[dict[str, str]]:
    """The status report's "containers": names under the machine's fqdn, sorted by name."""
    return [
        {
            "name": c.name,
            "interface": c.interface,
            "address": c.address,
            "fqdn": f"{c.name}.{machine}",
            "interface_fqdn": f"eth0.{c.name}.{machine}",
        }
        for c in sorted(containers)
    ]


# ---- the ledger: ROOT/containers.json ------------------------------------------------------


def read_ledger(root: Path) -> dict[str, Container]:
    """name -> Container; {} if there is none; FileError (one line) if it is damaged."""
    path = root / LEDGER
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        if len(data) > MAX_FILE:
            raise ValueError(f"{len(data)} bytes, expected at most {MAX_FILE}")
        obj: Any = json.loads(data)
        if obj.get("version") != LEDGER_VERSION:
            raise ValueError(f"version {obj.get('version')!r}, expected {LEDGER_VERSION}")
        entries = obj["containers"]
        if not isinstance(entries, dict) or len(entries) > MAX_CONTAINERS:
            raise ValueError(f"containers: expected an object of at most {MAX_CONTAINERS}")
        out = {}
        for name, e in entries.items():
            if not valid_name(name):
                raise ValueError(f"{name[:80]!r} is not a container name")
            interface, address = e["interface"], str(ipaddress.IPv4Interface(e["address"]))
            if not isinstance(interface, str) or not 1 <= len(interface) <= 15:
                raise ValueError(f"{name}: interface {interface!r}, expected an interface name")
            out[name] = Container(name, interface, address)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FileError(f"{path}: {e}") from None


def write_ledger(root: Path, prefix: str | None, containers: Iterable[Container]) -> None:
    body = {
        "version": LEDGER_VERSION,
        "prefix": prefix,
        "containers": {
            c.name: {"interface": c.interface, "address": c.address} for c in sorted(containers)
        },
    }
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(root / LEDGER, json.dumps(body, indent=1).encode() + b"\n", 0o600)


# ---- converge: the bridge, forwarding, the rule (a step of the Applier's pass) --------------


def converge(config: MachineConfig | None, *, bridge: str = BRIDGE) -> None:
    """Make the namespace's container plumbing match `config` (None, or no prefix: none
    of it; what the agent made goes). ApplyError naming the step."""
    prefix = config.containers if config is not None else None
    with IPRoute() as ipr:
        if config is None or prefix is None:
            _policy(ipr, None)
            _remove_bridge(ipr, bridge)
            return
        check(config)
        via = gateway(config)
        index = _bridge(ipr, bridge)
        _bridge_address(ipr, index, bridge, bridge_address(prefix))
        _forwarding()
        if via is None:
            _policy(ipr, None)
            return
        link = _pick_link(_read_links(ipr), config.mac)
        if link is None:
            raise ApplyError(f"no interface with MAC {config.mac}")
        _policy(ipr, _Policy(prefix, bridge, via, link.index))


def _kind(m: Any) -> str | None:
    info = m.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info is not None else None


def _link_named(ipr: IPRoute, name: str) -> Any | None:
    return next((m for m in ipr.get_links() if m.get("IFLA_IFNAME") == name), None)


def _bridge(ipr: IPRoute, name: str) -> int:
    """The bridge's index: made if missing, refused if the name is something else's, up."""
    m = _link_named(ipr, name)
    if m is None:
        with _step(f"container bridge {name}"):
            # A MAC of its own: else the bridge takes its lowest port's, and the
            # containers' gateway changes MAC whenever a container comes or goes.
            mac = bytearray(os.urandom(6))
            mac[0] = (mac[0] & 0xFE) | 0x02  # unicast, locally administered
            ipr.link("add", ifname=name, kind="bridge", address=mac.hex(":"))
            log.info("agent: made the container bridge %s", name)
        m = _link_named(ipr, name)
        if m is None:
            raise ApplyError(f"container bridge {name}: the interface vanished")
    if _kind(m) != "bridge":
        raise ApplyError(f"container bridge {name}: {name} exists and is not a bridge")
    if not m["flags"] & _IFF_UP:
        with _step(f"container bridge {name} up"):
            ipr.link("set", index=m["index"], state="up")
    return int(m["index"])


def _addresses_on(ipr: IPRoute, index: int) -> list[tuple[str, bool]]:
    """The IPv4 addresses on interface `index`, CIDR, and whether each is the agent's."""
    out = []
    for m in ipr.get_addr(family=socket.AF_INET):
        if m["index"] == index:
            ip = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
            out.append((f"{ip}/{m['prefixlen']}", m.get("IFA_PROTO") == AGENT_PROTO))
    return out


def _bridge_address(ipr: IPRoute, index: int, name: str, cidr: str) -> None:
    """`cidr` on the bridge, and no other address of the agent's there."""
    present = _addresses_on(ipr, index)
    for have, owned in present:
        if owned and have != cidr:
            with _step(f"removing address {have} from {name}"):
                iface = ipaddress.IPv4Interface(have)
                with _gone(errno.EADDRNOTAVAIL):
                    ipr.addr("del", index=index, address=str(iface.ip),
                             prefixlen=iface.network.prefixlen)  # fmt: skip
                log.info("agent: removed address %s from %s", have, name)
    if not any(have == cidr for have, _ in present):
        with _step(f"address {cidr} on {name}"):
            iface = ipaddress.IPv4Interface(cidr)
            ipr.addr("add", index=index, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen, proto=AGENT_PROTO)  # fmt: skip
            log.info("agent: added address %s to %s", cidr, name)


def _remove_bridge(ipr: IPRoute, name: str) -> None:
    m = _link_named(ipr, name)
    if m is None or _kind(m) != "bridge":  # (not a bridge: not the agent's)
        return
    with _step(f"removing container bridge {name}"):
        with _gone(errno.ENODEV):
            ipr.link("del", index=m["index"])
        log.info("agent: removed the container bridge %s", name)


def _forwarding() -> None:
    # On, and left on when the containers go: the kernel does not say who else
    # relies on it, and turning it off under them breaks what they forward.
    with _step("IPv4 forwarding"):
        if FORWARDING.read_text().strip() != "1":
            FORWARDING.write_text("1\n")
            log.info("agent: IPv4 forwarding on")


@dataclass(frozen=True, slots=True)
class _Policy:
    prefix: str
    bridge: str
    via: str
    link: int  # the machine's link: where the gateway is


def _policy(ipr: IPRoute, want: _Policy | None) -> None:
    """The rule and its table's one route (want None: neither). The route goes in before
    the rule and out after it: a rule to an empty table falls through to the main table,
    where a neighbour is on-link."""
    rules = [
        r
        for r in ipr.get_rules(family=socket.AF_INET)
        if r.get("FRA_PROTOCOL") == AGENT_PROTO and (r.get("FRA_TABLE") or r["table"]) == TABLE
    ]
    routes = [
        m
        for m in ipr.get_routes(family=socket.AF_INET, table=TABLE)
        if m["proto"] == AGENT_PROTO and m.get("RTA_TABLE") == TABLE
    ]
    net = ipaddress.IPv4Network(want.prefix) if want else None

    def rule_ok(r: Any) -> bool:
        return (
            net is not None
            and want is not None
            and r.get("FRA_SRC") == str(net.network_address)
            and r["src_len"] == net.prefixlen
            and r.get("FRA_IIFNAME") == want.bridge
            and r.get("FRA_PRIORITY") == RULE_PRIORITY
        )

    def route_ok(m: Any) -> bool:
        return (
            want is not None
            and m["dst_len"] == 0
            and m.get("RTA_GATEWAY") == want.via
            and m.get("RTA_OIF") == want.link
            and not m.get("RTA_PRIORITY")
        )

    if want is not None and not any(route_ok(m) for m in routes):
        with _step(f"containers' route: default via {want.via} in table {TABLE}"):
            ipr.route("replace", family=socket.AF_INET, dst="0.0.0.0", dst_len=0, table=TABLE,
                      gateway=want.via, oif=want.link, proto=AGENT_PROTO)  # fmt: skip
            log.info("agent: containers' default route via %s (table %d)", want.via, TABLE)
    for r in rules:
        if rule_ok(r):
            continue
        src = f"{r.get('FRA_SRC') or '0.0.0.0'}/{r['src_len']}"
        with _step(f"removing containers' rule from {src}"):
            keys: dict[str, Any] = {
                "table": TABLE,
                "protocol": AGENT_PROTO,
                "src_len": r["src_len"],
            }
            if r.get("FRA_PRIORITY") is not None:
                keys["priority"] = r.get("FRA_PRIORITY")
            if r.get("FRA_SRC"):
                keys["src"] = r.get("FRA_SRC")
            if r.get("FRA_IIFNAME"):
                keys["iifname"] = r.get("FRA_IIFNAME")
            with _gone(errno.ENOENT):
                ipr.rule("del", family=socket.AF_INET, **keys)
            log.info("agent: removed containers' rule from %s", src)
    if want is not None and net is not None and not any(rule_ok(r) for r in rules):
        with _step(f"containers' rule from {want.prefix} iif {want.bridge} lookup {TABLE}"):
            ipr.rule("add", family=socket.AF_INET, table=TABLE, priority=RULE_PRIORITY,
                     src=str(net.network_address), src_len=net.prefixlen,
                     iifname=want.bridge, protocol=AGENT_PROTO)  # fmt: skip
            log.info("agent: containers' rule from %s lookup %d", want.prefix, TABLE)
    for m in routes:
        if route_ok(m) or (want is not None and m["dst_len"] == 0 and not m.get("RTA_PRIORITY")):
            continue  # (the one the replace above overwrote: the same destination and metric)
        with _step(f"removing containers' route in table {TABLE}"):
            keys = {"family": socket.AF_INET, "table": TABLE, "proto": AGENT_PROTO,
                    "dst": m.get("RTA_DST") or "0.0.0.0", "dst_len": m["dst_len"]}  # fmt: skip
            if m.get("RTA_PRIORITY"):
                keys["priority"] = m.get("RTA_PRIORITY")
            with _gone(errno.ESRCH):
                ipr.route("del", **keys)
            log.info("agent: removed a containers' route from table %d", TABLE)


@contextlib.contextmanager
def _gone(code: int) -> Iterator[None]:
    """A delete of what is gone already (with its interface or address) is done."""
    try:
        yield
    except NetlinkError as e:
        if e.code != code:
            raise


# ---- the watcher ---------------------------------------------------------------------------


@dataclass
class Watcher:
    """Follows the bridge's ports; `run` is its task, `configure` tells it the
    configuration in place, `report()` says who has what."""

    root: Path  # the agent's root: the ledger is root/containers.json
    bridge: str = BRIDGE
    netns_dir: Path = NETNS_DIR
    resync: float = RESYNC
    generation: int = 0  # one more whenever report() changes
    _config: MachineConfig | None = field(default=None, repr=False)
    _known: bool = False  # a configuration is in place (None ones too)
    _report: list[dict[str, str]] = field(default_factory=list, repr=False)
    _wake: trio.Event = field(default_factory=trio.Event, repr=False)
    _changed: trio.Event = field(default_factory=trio.Event, repr=False)
    # The passes' own: one pass at a time, each in a worker thread.
    _ledger: dict[str, Container] | None = field(default=None, repr=False)
    _done: dict[str, tuple[object, ...]] = field(default_factory=dict, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def configure(self, config: MachineConfig | None) -> None:
        """The configuration now in place (after each apply): the next pass follows it."""
        self._config, self._known = config, True
        self._wake.set()

    def report(self) -> list[dict[str, str]]:
        """The containers configured now: report_of's list."""
        return list(self._report)

    async def wait_change(self, seen: int) -> None:
        """Until `generation` is past `seen`."""
        while self.generation <= seen:
            await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forever, until cancelled: a pass at each change of this namespace's links or
        IPv4 addresses, and every `resync` seconds."""
        with _subscribe() as sock:  # before the first pass: no change between is lost
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, sock)
                resync_at = trio.current_time()
                while True:
                    self._wake = trio.Event()  # (a change during the pass: another pass)
                    full = trio.current_time() >= resync_at
                    if full:
                        resync_at = trio.current_time() + self.resync
                    if self._known:
                        await self._pass(self._config, full)
                    with trio.move_on_at(resync_at):
                        await self._wake.wait()
                    await trio.sleep(SETTLE)

    async def _pass(self, config: MachineConfig | None, full: bool) -> None:
        try:
            found = await trio.to_thread.run_sync(self.sync, config, full)
        except Exception as e:  # (a pass that fails is tried again at the next change)
            log.warning("containers: %s", _reason(e))
            return
        self._publish(report_of(found, config.name) if config is not None else [])

    def _publish(self, report: list[dict[str, str]]) -> None:
        if report != self._report:
            self._report = report
            self.generation += 1
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    async def _listen(self, sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:  # drain: any event means "look again"
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError as e:  # ENOBUFS: events were lost, which is a change too
                    if e.errno != errno.ENOBUFS:
                        raise
            self._wake.set()

    # ---- one pass (in a worker thread) ---------------------------------------------------

    def sync(self, config: MachineConfig | None, full: bool = True) -> list[Container]:
        """Make every container of the bridge right for `config`; the ones configured.
        `full`: also those the last passes configured (their namespace may have changed)."""
        if full:
            self._done.clear()
            self._warned.clear()
        ledger = self._load()
        prefix = config.containers if config is not None else None
        with IPRoute() as ipr:
            links = ipr.get_links()
            if prefix is None:
                if ledger:
                    self._release(ipr, links, ledger)
                    self._save(None, [])
                return []
            bridge = next((m for m in links if m.get("IFLA_IFNAME") == self.bridge), None)
            if bridge is None or _kind(bridge) != "bridge":
                # The ports left it with it: the ledger waits for the next apply.
                self._warn(f"no container bridge {self.bridge}")
                return []
            chosen, problems = assign(_ports(links, bridge["index"]), ledger, prefix)
            for line in problems:
                self._warn(line)
            if {c.name: c for _, c in chosen} != ledger:
                self._save(prefix, [c for _, c in chosen])
            self._configure(ipr, chosen, bridge_address(prefix).split("/")[0])
        names = {c.name for _, c in chosen}
        for name in set(self._done) - names:
            del self._done[name]
        return [c for _, c in chosen if c.name in self._done]

    def _configure(self, ipr: IPRoute, chosen: Sequence[tuple[Port, Container]], via: str) -> None:
        todo = [(p, c, (p.index, p.peer_index, p.peer_nsid, c.address, via)) for p, c in chosen]
        todo = [(p, c, key) for p, c, key in todo if self._done.get(c.name) != key]
        if not todo:
            return
        with _peer_namespaces(ipr, {p.peer_nsid for p, _, _ in todo if p.peer_nsid is not None},
                              self.netns_dir) as spaces:  # fmt: skip
            for p, c, key in todo:
                self._done.pop(c.name, None)
                fd = spaces.get(p.peer_nsid) if p.peer_nsid is not None else None
                if fd is None:
                    self._warn(f"{c.name}: the namespace of {p.interface}'s peer is not found")
                    continue
                try:
                    _in_namespace(fd, partial(_configure_end, p.peer_index, c.address, via))
                except Exception as e:
                    self._warn(f"{c.name}: {c.address} on {p.interface}'s peer: {_reason(e)}")
                    continue
                self._done[c.name] = key
                log.info("container %s: %s (%s)", c.name, c.address, p.interface)

    def _release(self, ipr: IPRoute, links: Sequence[Any], ledger: Mapping[str, Container]) -> None:
        """No prefix: the agent's address and route off each container it had addressed
        (its bridge is gone already, or about to: its veths are found by name)."""
        ends = {}
        for m in links:
            nsid = m.get("IFLA_LINK_NETNSID")
            if _kind(m) == "veth" and nsid not in (None, *_NSID_NONE) and m.get("IFLA_LINK"):
                ends[m.get("IFLA_IFNAME")] = (int(m.get("IFLA_LINK")), int(nsid))
        wanted = [(c, ends[c.interface]) for c in ledger.values() if c.interface in ends]
        with _peer_namespaces(ipr, {nsid for _, (_, nsid) in wanted}, self.netns_dir) as spaces:
            for c, (peer, nsid) in wanted:
                fd = spaces.get(nsid)
                if fd is None:
                    continue
                try:
                    _in_namespace(fd, partial(_configure_end, peer, None, None))
                    log.info("container %s: removed %s", c.name, c.address)
                except Exception as e:
                    log.warning("container %s: cannot remove %s: %s", c.name, c.address, _reason(e))
        self._done.clear()

    def _load(self) -> dict[str, Container]:
        if self._ledger is None:
            try:
                self._ledger = read_ledger(self.root)
            except FileError as e:
                log.error("containers: ledger unusable, starting without it: %s", e)
                self._ledger = {}
        return self._ledger

    def _save(self, prefix: str | None, containers: Sequence[Container]) -> None:
        write_ledger(self.root, prefix, containers)
        self._ledger = {c.name: c for c in containers}

    def _warn(self, line: str) -> None:
        if line not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(line)
            log.warning("containers: %s", line)


def _ports(links: Iterable[Any], bridge: int) -> list[Port]:
    out = []
    for m in links:
        if m.get("IFLA_MASTER") != bridge or _kind(m) != "veth":
            continue
        nsid = m.get("IFLA_LINK_NETNSID")
        out.append(
            Port(
                index=m["index"],
                interface=m.get("IFLA_IFNAME"),
                alias=m.get("IFLA_IFALIAS") or None,
                peer_index=int(m.get("IFLA_LINK") or 0),
                peer_nsid=None if nsid is None or nsid in _NSID_NONE else int(nsid),
            )
        )
    return out


def _subscribe() -> socket.socket:
    """A netlink socket that hears this namespace's link and IPv4 address changes (only
    as a wake-up: pyroute2's own reader drops events in bursts, see MACHINE-NOTES)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)  # fmt: skip
    try:
        sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR))
    except OSError:
        sock.close()
        raise
    return sock


def _candidates(netns_dir: Path) -> Iterator[str]:
    """Where a container's namespace may be named: ip netns's (and podman's) directory,
    then any process's (docker keeps its own elsewhere)."""
    with contextlib.suppress(OSError):
        yield from sorted(str(p) for p in netns_dir.iterdir())
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                yield f"/proc/{entry.name}/ns/net"


@contextlib.contextmanager
def _peer_namespaces(ipr: IPRoute, wanted: set[int], netns_dir: Path) -> Iterator[dict[int, int]]:
    """nsid (as this namespace knows it) -> an open descriptor of that namespace, for the
    wanted ones found: each candidate is asked of the kernel, not guessed by name."""
    found: dict[int, int] = {}
    seen: set[tuple[int, int]] = set()
    try:
        for path in _candidates(netns_dir) if wanted else ():
            if len(found) == len(wanted):
                break
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            keep = False
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                answer = ipr.get_netnsid(fd=fd) or {}
                nsid = answer.get("nsid")
                if nsid in wanted and nsid not in found:
                    found[nsid] = fd
                    keep = True
            except (OSError, NetlinkError):
                continue
            finally:
                if not keep:
                    os.close(fd)
        yield found
    finally:
        for fd in found.values():
            os.close(fd)


_libc: ctypes.CDLL | None = None


def _in_namespace(fd: int, fn: Callable[[], T]) -> T:
    """fn() inside the network namespace `fd`, in a thread of its own: setns moves only
    the calling thread, and this one ends with fn, so nothing else ever runs there."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    out: list[T] = []
    failed: list[BaseException] = []

    def inside() -> None:
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns: {os.strerror(code)}")
            out.append(fn())
        except BaseException as e:
            failed.append(e)

    thread = threading.Thread(target=inside, name="dom0-agent-container", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out[0]


def _configure_end(index: int, address: str | None, via: str | None) -> None:
    """In the container's namespace: `address` on interface `index` (and no other address
    of the agent's), the interface up, the default route via `via` (the bridge). None:
    the agent's address and route taken away, nothing else touched."""
    with IPRoute() as ipr:
        link = ipr.get_links(index)[0]
        owned_routes = [
            m
            for m in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE)
            if m["proto"] == AGENT_PROTO and m["dst_len"] == 0 and m.get("RTA_TABLE") == MAIN_TABLE
        ]
        if via is None:
            for _ in owned_routes:
                with _gone(errno.ESRCH):
                    ipr.route("del", family=socket.AF_INET, dst="0.0.0.0", dst_len=0,
                              table=MAIN_TABLE, proto=AGENT_PROTO)  # fmt: skip
        present = _addresses_on(ipr, index)
        for have, owned in present:
            if owned and have != address:
                iface = ipaddress.IPv4Interface(have)
                with _gone(errno.EADDRNOTAVAIL):
                    ipr.addr("del", index=index, address=str(iface.ip),
                             prefixlen=iface.network.prefixlen)  # fmt: skip
        if address is None:
            return
        if not any(have == address for have, _ in present):
            iface = ipaddress.IPv4Interface(address)
            ipr.addr("add", index=index, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen, proto=AGENT_PROTO)  # fmt: skip
        if not link["flags"] & _IFF_UP:
            ipr.link("set", index=index, state="up")
        if not any(m.get("RTA_GATEWAY") == via and m.get("RTA_OIF") == index
                   and not m.get("RTA_PRIORITY") for m in owned_routes):  # fmt: skip
            # replace: a default route somebody else put there becomes ours
            ipr.route("replace", family=socket.AF_INET, dst="0.0.0.0", dst_len=0,
                      table=MAIN_TABLE, gateway=via, oif=index, proto=AGENT_PROTO)  # fmt: skip
