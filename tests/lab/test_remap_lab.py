"""Scheduled remapping, make-before-break, in the default lab (both domains
inside the hub's tunnels, an agent in every VM) with x remapping
(`remap_grace = "25s"`: its records' TTL is 12 s):

- `dom0 remap now` moves both of x's machines while vm3 sends to vm1 over
  TCP (iperf3, from and to the old addresses) and pings it every 10 ms: the
  transfer completes, at most one ping is lost; each VM holds its new address
  beside the old, deprecated one, and routes new connections from the new;
  the name answers the new address within one TTL;
- after the grace the old address is gone from the VM and from dom0's view:
  a ping to it gets no answer (control: the new one answers), a VM forging it
  as its source gets nothing through (control: from its new address it does),
  and no machine holds it: it is free in the pool.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.lab import controllerproc, dnsprobe, netns, processes, vm
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
GRACE = 25
TRANSFER = 12  # seconds of iperf3, started before the remap, over before the grace ends


@pytest.fixture(scope="module")
def remap_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from tests.lab.conftest import _need_root, unique_lab_name

    _need_root()
    from controller.lab import build, teardown

    text = (ROOT / "policies" / "lab.toml").read_text()
    text = text.replace(
        "[domains.x]\n", f'[domains.x]\nremap_every = "1h"\nremap_grace = "{GRACE}s"\n', 1
    )
    policy = tmp_path_factory.mktemp("remap") / "policy.toml"
    policy.write_text(text)
    name = unique_lab_name()
    try:
        yield build.create(name, 3, policy=policy, agents=True)
    finally:
        teardown.down(name)
        assert not teardown.exists(name), f"lab {name} not fully torn down"


def row(lab: Lab, index: int) -> dict[str, Any]:
    m = controllerproc.machine(lab, lab.vm(index)["mac"])
    assert m is not None, f"vm{index} not in dom0 status"
    return m


def wg_addresses(lab: Lab, index: int) -> dict[str, bool]:
    """The VM's tunnel addresses -> deprecated."""
    out = vm.run(lab, index, ["ip", "-j", "-4", "addr", "show", "dev", "wg0"])
    infos = json.loads(out.stdout)[0]["addr_info"]
    # (IPv4 shows the flag; only IPv6 shows a preferred lifetime of 0)
    return {i["local"]: bool(i.get("deprecated")) for i in infos}


def listening(lab: Lab, index: int, port: int) -> bool:
    out = vm.run(lab, index, ["ss", "-Hltn", f"sport = :{port}"], check=False)
    return bool(out.stdout.strip())


def established(lab: Lab, index: int, port: int) -> bool:
    out = vm.run(lab, index, ["ss", "-Htn", "state", "established", f"dport = :{port}"],
                 check=False)  # fmt: skip
    return bool(out.stdout.strip())


def ping(lab: Lab, index: int, to: str, *, count: int = 3, source: str | None = None) -> int:
    """Replies to `count` pings (0.2 s apart, 1 s for the last)."""
    argv = ["busybox", "ping", "-c", str(count), "-i", "0.2", "-W", "1", to]
    if source:
        argv[2:2] = ["-I", source]
    out = vm.run(lab, index, argv, check=False)
    m = re.search(r"(\d+) packets received", out.stdout)
    return int(m[1]) if m else 0


def test_a_remap_under_a_transfer_and_pings_loses_nothing_then_frees_the_old(
    remap_lab: Lab,
) -> None:
    lab = remap_lab
    old1, old3 = row(lab, 1)["address"], row(lab, 3)["address"]
    assert row(lab, 1)["domain"] == row(lab, 3)["domain"] == "x"
    name1 = row(lab, 1)["name"]

    server = netns.exec_argv(lab.vm_ns(1), ["iperf3", "-s", "-B", old1, "-1"])
    _, srv = processes.spawn(server, log=lab.logs_dir / "remap-iperf3-server.log")
    lab.record_process("iperf3@vm1", srv, lab.vm_ns(1), server)
    report = lab.logs_dir / "remap-iperf3.json"
    client = netns.exec_argv(lab.vm_ns(3), [
        # (paced: a saturated userspace tunnel drops pings whatever a remap does)
        "iperf3", "-c", old1, "-B", old3, "-t", str(TRANSFER), "-b", "20M", "-J",
        "--connect-timeout", "3000",
        "--logfile", str(report)])  # fmt: skip
    pings = netns.exec_argv(lab.vm_ns(3), [
        "busybox", "ping", "-q", "-i", "0.01", "-w", str(TRANSFER), "-I", old3, old1])  # fmt: skip
    pinglog = lab.logs_dir / "remap-ping.log"
    wait_for(lambda: listening(lab, 1, 5201), 10, "iperf3 listening in vm1")
    _, cli = processes.spawn(client, log=lab.logs_dir / "remap-iperf3-client.log")
    lab.record_process("iperf3@vm3", cli, lab.vm_ns(3), client)
    _, pinger = processes.spawn(pings, log=pinglog)
    lab.record_process("ping@vm3", pinger, lab.vm_ns(3), pings)
    wait_for(lambda: established(lab, 3, 5201), 10, "the transfer under way")

    remapped = processes.run_dom0("remap", "now", "--state", str(lab.state_dir), "--json")
    assert remapped.returncode == 0, remapped.stderr
    moved = {m["from"]: m for m in json.loads(remapped.stdout)["moved"]}
    assert set(moved) == {old1, old3}, moved
    started = time.monotonic()
    new1, new3 = moved[old1]["to"], moved[old3]["to"]

    # DNS answers the new address within one TTL (12 s)
    def resolves() -> bool:
        got = dnsprobe.run(lab.vm_ns(3), [f"udp:127.0.0.1:{name1}"], timeout=1.0)[0]
        return got.answers == (new1,)

    wait_for(resolves, 12, f"{name1} answering {new1}")
    assert time.monotonic() - started <= 12
    # each VM: the new address preferred, the old one kept deprecated; new connections from the new
    wait_for(lambda: wg_addresses(lab, 1) == {new1: False, old1: True}, 10,
             "vm1 holding both addresses")  # fmt: skip
    wait_for(lambda: wg_addresses(lab, 3) == {new3: False, old3: True}, 10,
             "vm3 holding both addresses")  # fmt: skip
    route = vm.run(lab, 3, ["ip", "-j", "route", "get", new1]).stdout
    assert json.loads(route)[0]["prefsrc"] == new3, route

    assert processes.wait_exit(cli, TRANSFER + 15), "iperf3 did not finish"
    assert processes.wait_exit(pinger, TRANSFER + 15), "ping did not finish"
    assert time.monotonic() - started < GRACE, "the transfer outlasted the grace"
    result = json.loads(report.read_text())
    assert "error" not in result, result.get("error")
    assert result["end"]["sum_received"]["bytes"] > 0
    assert result["end"]["sum_received"]["seconds"] >= TRANSFER - 1
    summary = pinglog.read_text()
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", summary)
    assert m is not None, summary
    sent, received = int(m[1]), int(m[2])
    assert sent >= 100 and sent - received <= 1, summary

    # the grace ends: the old addresses are withdrawn everywhere
    wait_for(lambda: row(lab, 1).get("previous") is None and row(lab, 3).get("previous") is None,
             GRACE + 10, "the grace to end")  # fmt: skip
    wait_for(lambda: wg_addresses(lab, 1) == {new1: False}, 10, "vm1 dropping its old address")
    assert ping(lab, 3, old1) == 0  # nobody answers it
    assert ping(lab, 3, new1) == 3  # control: the new one does
    # a tenant putting its old address back and sending from it gets nothing through
    vm.run(lab, 1, ["ip", "addr", "add", f"{old1}/32", "dev", "wg0"])
    try:
        assert ping(lab, 1, new3, source=old1) == 0
        assert ping(lab, 1, new3, source=new1) == 3  # control: from its own address
    finally:
        vm.run(lab, 1, ["ip", "addr", "del", f"{old1}/32", "dev", "wg0"], check=False)
    held = {x for m in controllerproc.status(lab) for x in (m.get("address"), m.get("previous"))}
    assert old1 not in held and old3 not in held  # free in the pool
