"""Discovery of dom0 by multicast DNS: controller/sources/advertise.py
advertises `_dom0._tcp` on the bridge only, agents/discover.py browses for it.

The lab tests build three namespaces: "dom0" with a bridge (10.10.0.1/24)
whose port leads to "vm" (10.10.0.5/24), and a WAN interface (10.77.0.1/24)
leading to "wan" (10.77.0.2/24). The advertiser and each browse run as
subprocesses under `ip netns exec`; pytest stays in the root namespace, and
nothing is done there. The unit tests at the end need no root.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from agents import discover
from agents.discover import Answer, candidates
from controller.lab import netns
from controller.lab.processes import python_env
from controller.lab.wait import wait_for
from controller.sources import advertise

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MakeNetns = Callable[[str], str]

DOM0_BRIDGE, VM, DOM0_WAN, WAN = "10.10.0.1", "10.10.0.5", "10.77.0.1", "10.77.0.2"
PORT = 8443
NEGATIVE_BROWSE = 3.0  # seconds a browse that should find nothing listens

# argv[1]: the addresses (JSON); argv[2] "all-groups": without the advertiser's
# IP_MULTICAST_ALL restriction (the control that shows it matters).
# SIGINT cancels it, as the controller's nursery would.
_ADVERTISE = """
import json, signal, sys, trio
from controller.sources import advertise
if sys.argv[2:] == ["all-groups"]:
    advertise._own_groups_only = lambda zc: 1
async def main():
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(advertise.advertise, json.loads(sys.argv[1]), 8443, "dom0 on lab")
            print("advertising", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print("stopped", flush=True)
trio.run(main)
"""

# Another mDNS stack's membership on dom0's WAN (avahi's, say): without it,
# dom0's kernel drops mDNS from the WAN before any socket sees it.
_JOIN = """
import signal, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             socket.inet_aton("224.0.0.251") + socket.inet_aton(sys.argv[1]))
print("joined", flush=True)
signal.pause()
"""

_BROWSE = """
import json, sys
from agents.discover import browse
print(json.dumps(browse(float(sys.argv[1]), interface_address=sys.argv[2] or None)))
"""


@dataclass(frozen=True)
class Topo:
    dom0: str
    vm: str
    wan: str


# Reached when the address answers a TCP SYN to a closed port with a reset
# (no ping in the image; no sleep to wait for links to come up).
_REACH = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=1).close()
except ConnectionRefusedError:
    pass
"""


def _reaches(ns: str, address: str) -> bool:
    return netns.run(ns, [PY, "-c", _REACH, address], check=False).returncode == 0


@pytest.fixture
def topo(make_netns: MakeNetns) -> Topo:
    t = Topo(make_netns("dom0"), make_netns("vm"), make_netns("wan"))
    netns.ip_batch(
        [
            "link set lo up",
            "link add br0 type bridge",
            f"link add vd0 type veth peer name ve0 netns {t.vm}",
            "link set vd0 master br0",
            f"link add wd0 type veth peer name we0 netns {t.wan}",
            f"addr add {DOM0_BRIDGE}/24 dev br0",
            f"addr add {DOM0_WAN}/24 dev wd0",
            "link set vd0 up",
            "link set br0 up",
            "link set wd0 up",
        ],
        t.dom0,
    )
    netns.ip_batch(["link set lo up", f"addr add {VM}/24 dev ve0", "link set ve0 up"], t.vm)
    netns.ip_batch(["link set lo up", f"addr add {WAN}/24 dev we0", "link set we0 up"], t.wan)
    wait_for(lambda: _reaches(t.vm, DOM0_BRIDGE), 10.0, "the vm to reach dom0 over the bridge")
    wait_for(lambda: _reaches(t.wan, DOM0_WAN), 10.0, "the wan to reach dom0's WAN address")
    return t


class Child:
    """A Python one-off in a namespace; stopped by its PID (`ip netns exec`
    execs, so the PID is Python's)."""

    def __init__(self, ns: str, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            netns.exec_argv(ns, [PY, "-c", script, *args]),
            cwd=ROOT,
            env=python_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""

    def expect(self, line: str, timeout: float) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while line.encode() not in self._buf.split(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                self.stop()
                why = "exited" if ready else f"no {line!r} within {timeout:g} s"
                raise AssertionError(f"{why}; stdout {self._buf!r}; stderr: {self.stderr()}")
            self._buf += chunk

    def stderr(self) -> str:
        """What it wrote to stderr (once it has exited)."""
        return self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (the advertiser is cancelled: goodbyes), SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def advertising(ns: str, addresses: list[str], *flags: str) -> Iterator[Child]:
    child = Child(ns, _ADVERTISE, json.dumps(addresses), *flags)
    try:
        child.expect("advertising", 15.0)
        yield child
    finally:
        child.stop()


def browse_in(ns: str, timeout: float, interface_address: str = "") -> list[tuple[str, int]]:
    out = netns.run(ns, [PY, "-c", _BROWSE, str(timeout), interface_address],
                    timeout=timeout + 15, env=python_env())  # fmt: skip
    return [(a, p) for a, p in json.loads(out.stdout)]


# ---- lab: real namespaces ----------------------------------------------------------------


@pytest.mark.lab
def test_the_vm_finds_dom0_on_the_bridge(topo: Topo) -> None:
    with advertising(topo.dom0, [DOM0_BRIDGE]) as adv:
        assert browse_in(topo.vm, 8.0) == [(DOM0_BRIDGE, PORT)]
        assert browse_in(topo.vm, 8.0, interface_address=VM) == [(DOM0_BRIDGE, PORT)]
        # cancelled, it unregisters and closes (the shielded finally) and exits
        rc, err = adv.stop(), adv.stderr()
        assert (rc, err) == (0, "")  # (no warning either: its wildcard socket was restricted)
        adv.expect("stopped", 1.0)


@pytest.mark.lab
def test_an_address_dom0_comes_to_hold_is_advertised_too(topo: Topo) -> None:
    """The controller starts the advertiser before its first sync adds the
    gateways: it advertises what dom0 holds, and again when that changes."""
    second = "10.10.0.2"
    with advertising(topo.dom0, [DOM0_BRIDGE, second]):
        assert browse_in(topo.vm, 8.0) == [(DOM0_BRIDGE, PORT)]
        netns.ip_batch([f"addr add {second}/24 dev br0"], topo.dom0)
        both = [(DOM0_BRIDGE, PORT), (second, PORT)]
        wait_for(lambda: browse_in(topo.vm, 3.0) == both, 15.0, "both addresses advertised")


@pytest.mark.lab
def test_the_wan_hears_nothing(topo: Topo) -> None:
    """Bridge only, even with another mDNS stack joined on dom0's WAN. The
    controls: the same browse from the wan finds dom0 when the advertiser is
    told to use the WAN address too; and, bridge-only but without the
    advertiser's IP_MULTICAST_ALL restriction, the WAN's query reaches
    python-zeroconf's wildcard socket and is answered."""
    joiner = Child(topo.dom0, _JOIN, DOM0_WAN)
    try:
        joiner.expect("joined", 10.0)
        maddr = netns.run(topo.dom0, ["ip", "maddr", "show", "dev", "wd0"]).stdout
        assert "224.0.0.251" in maddr

        with advertising(topo.dom0, [DOM0_BRIDGE]):
            assert browse_in(topo.vm, 8.0) == [(DOM0_BRIDGE, PORT)]  # it is up
            assert browse_in(topo.wan, NEGATIVE_BROWSE) == []

        with advertising(topo.dom0, [DOM0_BRIDGE], "all-groups"):
            assert (DOM0_BRIDGE, PORT) in browse_in(topo.wan, 8.0)

        with advertising(topo.dom0, [DOM0_BRIDGE, DOM0_WAN]):
            # one instance, both addresses: the one on the browser's own network first
            assert browse_in(topo.wan, 8.0) == [(DOM0_WAN, PORT), (DOM0_BRIDGE, PORT)]
            assert browse_in(topo.vm, 8.0) == [(DOM0_BRIDGE, PORT), (DOM0_WAN, PORT)]
    finally:
        joiner.stop()


# ---- unit: no sockets --------------------------------------------------------------------


def test_service_info_holds_the_instance_and_nothing_secret() -> None:
    info = advertise.service_info(["10.10.0.1", "10.20.0.1", "10.10.0.1"], 8443, "dom0 on lab")
    assert info.type == "_dom0._tcp.local."
    assert info.name == "dom0 on lab._dom0._tcp.local."
    assert info.server == "dom0-on-lab.local."
    assert info.port == 8443
    assert info.parsed_addresses() == ["10.10.0.1", "10.20.0.1"]
    assert info.properties == {b"v": b"1", b"tls": b"1.3"}
    assert advertise.instance_name("host1.example.org") == "dom0 on host1"


@pytest.mark.parametrize(
    ("addresses", "port", "name"),
    [
        ([], 8443, "dom0 on lab"),
        (["fd00::1"], 8443, "dom0 on lab"),
        (["10.0.0.300"], 8443, "dom0 on lab"),
        (["10.10.0.1"], 0, "dom0 on lab"),
        (["10.10.0.1"], 65536, "dom0 on lab"),
        (["10.10.0.1"], 8443, ""),
        (["10.10.0.1"], 8443, "dom0 on lab.example"),
        (["10.10.0.1"], 8443, "x" * 64),
        (["10.10.0.1"], 8443, "dom0\non lab"),
    ],
)
def test_service_info_refuses_what_no_agent_could_use(
    addresses: list[str], port: int, name: str
) -> None:
    with pytest.raises(ValueError):
        advertise.service_info(addresses, port, name)


def test_the_agent_reads_what_the_controller_advertises() -> None:
    info = advertise.service_info(["10.10.0.1"], 8443, "dom0 on lab")
    assert candidates([Answer.of(info)]) == [("10.10.0.1", 8443)]


V1 = {b"v": b"1", b"tls": b"1.3"}


def test_malformed_answers_are_skipped() -> None:
    answers = [
        Answer("no port", None, ("10.0.0.1",), V1),
        Answer("port 0", 0, ("10.0.0.2",), V1),
        Answer("port too big", 70000, ("10.0.0.3",), V1),
        Answer("no address", 8443, (), V1),
        Answer("not an address", 8443, ("dom0.local", "10.0.0.256"), V1),
        Answer(
            "unusable addresses",
            8443,
            ("0.0.0.0", "127.0.0.1", "224.0.0.251", "255.255.255.255", "240.0.0.1"),
            V1,
        ),
        Answer("no version", 8443, ("10.0.0.4",), {b"tls": b"1.3"}),
        Answer("version 2", 8443, ("10.0.0.5",), {b"v": b"2"}),
        Answer("version without a value", 8443, ("10.0.0.6",), {b"v": None}),
        Answer("good", 8443, ("10.0.0.7",), V1),
    ]
    assert candidates(answers) == [("10.0.0.7", 8443)]


def test_candidates_are_deduplicated_ordered_and_bounded() -> None:
    many = [
        Answer(f"dom0 {i}", 8443, (f"10.9.{i}.1", f"10.9.{i}.1"), V1) for i in reversed(range(40))
    ]
    same = [Answer("again", 8443, ("10.9.3.1",), V1), Answer("other port", 9443, ("10.9.3.1",), V1)]
    got = candidates([*many, *same], on_link=[IPv4Network("10.9.30.0/24")])
    assert len(got) == discover.MAX_CANDIDATES
    assert len(set(got)) == len(got)
    assert got[0] == ("10.9.30.1", 8443)  # on this VM's network first
    assert got[1:5] == [("10.9.0.1", 8443), ("10.9.1.1", 8443), ("10.9.2.1", 8443),
                        ("10.9.3.1", 8443)]  # fmt: skip
    assert got[5] == ("10.9.3.1", 9443)
    # stable: the order of the answers does not matter
    assert candidates([*same, *reversed(many)], on_link=[IPv4Network("10.9.30.0/24")]) == got
