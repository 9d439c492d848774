"""The lab without the controller: topology, services, VM-side DHCP, teardown.

Real namespaces (root only). A plain dnsmasq stands in for the controller's
DHCP where a test needs leases, and a tiny script stands in for `dom0 run`
where a test exercises the controller's process management.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.lab import (
    build,
    controllerproc,
    dhcpclient,
    echo,
    netns,
    processes,
    teardown,
    topology,
    vm,
)
from controller.lab.demo import Observation, evaluate, render, select_peers, table_rows
from controller.lab.probe import ProbeResult, probe_http
from controller.lab.rundir import Lab, LabError, check_name, owns_namespace

pytestmark = pytest.mark.lab

ECHO_URL = f"http://{topology.ECHO_ADDRESS}/"


def lab_pids(lab: Lab) -> list[processes.ProcId]:
    """Every recorded process plus every process inside the lab's namespaces."""
    recorded = [
        processes.ProcId(p["pid"], p["start"]) for p in lab.read().get("processes", {}).values()
    ]
    inside = [
        processes.ProcId(pid, processes.start_time(pid) or 0)
        for pids in netns.pids(teardown.lab_namespaces(lab, lab.read())).values()
        for pid in pids
    ]
    return recorded + inside


def assert_gone(lab: Lab, pids: list[processes.ProcId]) -> None:
    assert not [ns for ns in netns.listed() if owns_namespace(lab.name, ns)]
    assert not lab.root.exists()
    running = [p.pid for p in pids if processes.is_running(p)]
    assert not running, f"processes left running: {running}"


def cli(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return processes.run_dom0(*argv, timeout=timeout)


# ---- topology ------------------------------------------------------------------------------


def test_wan_vpn_dom0_addressing(lab: Lab) -> None:
    # dom0 and the VPN provider reach the internet echo, which sees their WAN addresses.
    seen_by_echo = probe_http(lab.dom0_ns, ECHO_URL)
    assert seen_by_echo.ok, seen_by_echo.error
    assert seen_by_echo.body == f"{topology.DOM0_WAN}\n"
    assert probe_http(lab.vpn_ns, ECHO_URL).body == f"{topology.VPN_WAN}\n"

    # dom0: wan addressed, virbr0 up without address, every vnet enslaved; the
    # lab leaves forwarding and nftables to the controller.
    links = {
        link["ifname"]: link
        for link in json.loads(netns.run(lab.dom0_ns, ["ip", "-j", "addr"]).stdout)
    }
    v4 = {
        name: [a["local"] for a in link["addr_info"] if a["family"] == "inet"]
        for name, link in links.items()
    }
    assert v4["wan"] == [topology.DOM0_WAN]
    assert v4["virbr0"] == []
    assert "UP" in links["virbr0"]["flags"]
    assert links["virbr0"]["address"] == topology.BRIDGE_MAC
    for i in (1, 2):
        port = links[f"vnet{i}"]
        assert port["master"] == "virbr0" and "UP" in port["flags"]
    forward = netns.run(lab.dom0_ns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    assert forward == "0"
    assert netns.run(lab.dom0_ns, ["nft", "list", "ruleset"]).stdout.strip() == ""

    # VMs: eth0 with the lab MAC, up, no address until DHCP.
    for i in (1, 2):
        (eth0,) = json.loads(vm.run(lab, i, ["ip", "-j", "addr", "show", "dev", "eth0"]).stdout)
        assert eth0["address"] == topology.vm_mac(i) == vm.mac(lab, i)
        assert "UP" in eth0["flags"]
        assert vm.addresses(lab, i) == []
    assert topology.vm_mac(1) == "52:54:00:d0:00:01"
    assert topology.vm_mac(200) == "52:54:00:d0:00:c8"


def test_vm_to_vm_over_virbr0_and_forged_source(lab: Lab) -> None:
    # Without the controller, virbr0 is a plain bridge: VMs on one subnet talk
    # directly. This exercises the VM echo services, the probes and --source.
    vm.add_address(lab, 1, "10.77.0.1/24")
    vm.add_address(lab, 2, "10.77.0.2/24")
    assert vm.probe(lab, 1, "http://10.77.0.2/").body == "10.77.0.1\n"

    vm.add_address(lab, 1, "10.77.0.99/24")
    forged = vm.probe(lab, 1, "http://10.77.0.2/", source="10.77.0.99")
    assert forged.ok and forged.body == "10.77.0.99\n"
    vm.del_address(lab, 1, "10.77.0.99/24")
    assert vm.addresses(lab, 1) == ["10.77.0.1/24"]

    not_ours = vm.probe(lab, 1, "http://10.77.0.2/", source="10.77.0.98", timeout=1)
    assert not not_ours.ok and not_ours.kind == "bind"
    # No route to the internet: the VM has no gateway without DHCP.
    unreachable = vm.probe(lab, 1, ECHO_URL, timeout=1)
    assert not unreachable.ok and unreachable.blocked
    closed = vm.probe(lab, 1, "http://10.77.0.2:81/", timeout=1)
    assert closed.kind == "refused"


def test_add_vm_with_any_mac_and_change_mac(lab: Lab) -> None:
    index = build.add_vm(lab, "00:16:3E:00:00:01", dhcp=False)
    assert index == 3
    assert vm.mac(lab, 3) == "00:16:3e:00:00:01"
    link = json.loads(netns.run(lab.dom0_ns, ["ip", "-j", "link", "show", "vnet3"]).stdout)[0]
    assert link["master"] == "virbr0"
    vm.add_address(lab, 3, "10.77.0.3/24")
    vm.add_address(lab, 2, "10.77.0.2/24")
    assert vm.probe(lab, 3, "http://10.77.0.2/").body == "10.77.0.3\n"

    vm.set_mac(lab, 3, "52:54:00:d0:00:77")
    (eth0,) = json.loads(vm.run(lab, 3, ["ip", "-j", "link", "show", "eth0"]).stdout)
    assert eth0["address"] == "52:54:00:d0:00:77" == vm.mac(lab, 3)

    build.remove_vm(lab, 3)
    assert not netns.exists(lab.vm_ns(3))
    assert 3 not in lab.vms()
    assert lab.process("echo@vm3") is None


# ---- teardown ------------------------------------------------------------------------------


def test_down_leaves_nothing_and_is_idempotent(lab: Lab) -> None:
    pids = lab_pids(lab)
    assert len({p.pid for p in pids}) == 3  # echo in wan, vm1, vm2
    report = teardown.down(lab.name)
    assert report.found_anything and len(report.namespaces) == 5
    assert_gone(lab, pids)
    again = teardown.down(lab.name)
    assert not again.found_anything


def test_down_half_built_lab(
    make_lab: Callable[..., Lab], lab_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The build fails after namespaces, links and echo services exist.
    def fail(*args: Any, **kwargs: Any) -> None:
        raise LabError("simulated failure")

    monkeypatch.setattr(build.dhcpclient, "start_many", fail)
    with pytest.raises(LabError, match="simulated"):
        make_lab(2, name=lab_name, dhcp=True, teardown_on_error=False)
    lab = Lab.named(lab_name)
    assert netns.exists(lab.vm_ns(2))
    # A process started but never recorded (a crash between start and record).
    stray = subprocess.Popen(netns.exec_argv(lab.vm_ns(1), ["sleep", "60"]), start_new_session=True)
    time.sleep(0.05)
    pids = [*lab_pids(lab), processes.ProcId(stray.pid, processes.start_time(stray.pid) or 0)]
    teardown.down(lab_name)
    assert stray.wait(timeout=5) == -signal.SIGTERM
    assert_gone(lab, pids)
    assert not teardown.down(lab_name).found_anything


def test_failed_build_tears_itself_down(
    make_lab: Callable[..., Lab], lab_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise LabError("simulated failure")

    monkeypatch.setattr(build.dhcpclient, "start_many", fail)
    with pytest.raises(LabError):
        make_lab(2, name=lab_name, dhcp=True)
    assert not teardown.exists(lab_name)


def test_down_after_crash_mid_build(lab_name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only")
    lab = Lab.named(lab_name)
    # `lab up` is SIGKILLed after the echo services started: no cleanup code runs.
    code = (
        "import os, signal\n"
        "from controller.lab import build\n"
        "build.dhcpclient.start_many = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"build.create({lab_name!r}, 2, controller=False, dhcp=True)\n"
    )
    try:
        crashed = subprocess.run(
            [sys.executable, "-c", code], env=processes.python_env(), timeout=30, check=False
        )
        assert crashed.returncode == -signal.SIGKILL
        pids = lab_pids(lab)
        assert len(pids) >= 3 and all(processes.is_running(p) for p in pids)
        down = cli("lab", "down", "--name", lab_name)
        assert down.returncode == 0, down.stderr
        assert_gone(lab, pids)
    finally:
        teardown.down(lab_name)


def test_down_without_run_directory(lab: Lab) -> None:
    # Someone removed /run/dom0-lab/NAME: the naming scheme still finds the namespaces.
    pids = lab_pids(lab)
    shutil.rmtree(lab.root)
    report = teardown.down(lab.name)
    assert len(report.namespaces) == 5
    assert_gone(lab, pids)


def test_down_with_damaged_record(lab: Lab) -> None:
    pids = lab_pids(lab)
    lab.record_path.write_text("{not json")
    teardown.down(lab.name)
    assert_gone(lab, pids)


def test_namespace_ownership_is_exact() -> None:
    assert owns_namespace("dom0lab", "dom0lab-vm12")
    assert owns_namespace("dom0lab", "dom0lab-dom0")
    assert not owns_namespace("dom0lab", "dom0lab-x-wan")  # lab "dom0lab-x"
    assert not owns_namespace("dom0lab", "dom0lab-vm0")
    assert not owns_namespace("dom0lab", "dom0lab2-wan")
    assert check_name("dom0lab") is None
    for bad in ("", "-a", "a-", "Dom0", "a_b", "../x", "a" * 17):
        assert check_name(bad) is not None


# Fields that change on their own (address and route lifetimes count down).
_VOLATILE = {"valid_life_time", "preferred_life_time", "expires"}


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _root_snapshot() -> dict[str, Any]:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    def ip_json(*argv: str) -> Any:
        return _stable(json.loads(out("ip", "-j", *argv) or "[]"))

    return {
        "route": ip_json("route"),
        "route6": ip_json("-6", "route"),
        "rule": ip_json("rule"),
        "link": ip_json("link"),
        "addr": ip_json("addr"),
        "netconf": out("ip", "netconf"),
        "nft": out("nft", "list", "ruleset"),
        "forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


def test_root_namespace_unchanged(make_lab: Callable[..., Lab]) -> None:
    before = _root_snapshot()
    lab = make_lab(2)
    build.add_vm(lab, "00:16:3e:00:00:01", dhcp=False)
    during = _root_snapshot()
    teardown.down(lab.name)
    after = _root_snapshot()
    assert during == before
    assert after == before


# ---- command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lab", "up", "--vms", "0"], "dom0 lab up: --vms: "),
        (["lab", "up", "--vms", "201"], "dom0 lab up: --vms: "),
        (["lab", "up", "--vms", "many"], "dom0 lab up: --vms: "),
        (["lab", "up", "--name", "Bad_Name"], "dom0 lab up: --name: "),
        (["lab", "up", "--policy", "/nonexistent/p.toml"], "dom0 lab up: --policy: "),
        (["lab", "down", "--name", "../etc"], "dom0 lab down: --name: "),
        (["lab", "demo", "--vms", "-1"], "dom0 lab demo: --vms: "),
        (["lab", "demo", "--name", "Demo_1"], "dom0 lab demo: --name: "),
        (["lab", "up", "--mac", "3=52:54:00:00:00:01"], "dom0 lab up: --mac: "),
        (["lab", "up", "--mac", "vm5=52:54:00:00:00:01"], "dom0 lab up: --mac: "),
        (["lab", "up", "--mac", "vm1=52:54:00:00:00"], "dom0 lab up: --mac: vm1: "),
        (["lab", "up", "--mac", "vm1=01:00:5e:00:00:01"], "dom0 lab up: --mac: vm1: "),
        (["lab", "up", "--ports", "vnet-with-a-long-name"], "dom0 lab up: --ports: "),
        (
            ["lab", "up", "--mac", "vm1=02:00:00:00:00:01", "--mac", "vm2=02:00:00:00:00:01"],
            "dom0 lab up: --mac: vm2: ",
        ),
    ],
)
def test_cli_rejects_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_cli_rejects_policies_the_lab_cannot_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[site]\ntld = 7\n[[rules]]\nname = "r"\n')
    assert main(["lab", "up", "--policy", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("dom0 lab up: refusing an invalid policy")
    assert all(line.startswith(f"{bad}: ") for line in err[:-1]) and len(err) > 2

    other = tmp_path / "br0.toml"
    other.write_text(build.DEFAULT_POLICY.read_text().replace('name = "virbr0"', 'name = "br0"', 1))
    assert main(["lab", "demo", "--policy", str(other)]) == 2
    assert capsys.readouterr().err == (
        f"dom0 lab demo: --policy: {other}: bridge.name: 'br0' is not the lab's bridge, "
        "expected 'virbr0'\n"
    )


def test_cli_up_refuses_existing_lab(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    from controller.cli import main

    with pytest.raises(build.LabExists):
        build.create(lab.name, 1, controller=False)
    assert main(["lab", "up", "--name", lab.name, "--no-controller"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert netns.exists(lab.vm_ns(2))  # the refusal touched nothing

    replaced = build.create(lab.name, 1, controller=False, replace=True)
    assert sorted(replaced.vms()) == [1] and not netns.exists(lab.vm_ns(2))


def test_cli_up_with_failing_controller_leaves_nothing(
    lab_name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only")
    from controller.cli import main

    def failing(lab: Lab) -> list[str]:
        return [sys.executable, "-c", "import sys; print('bad policy: x'); sys.exit(2)"]

    monkeypatch.setattr(controllerproc, "run_argv", failing)
    try:
        assert main(["lab", "up", "--name", lab_name, "--vms", "1"]) == 1
        err = capsys.readouterr().err.splitlines()
        assert err[-1] == (
            "dom0 lab up: controller exited with status 2 before it was ready: bad policy: x"
        )
        assert not teardown.exists(lab_name)
    finally:
        teardown.down(lab_name)


def test_cli_up_no_controller_and_down(lab_name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only")
    try:
        up = cli("lab", "up", "--name", lab_name, "--vms", "2", "--no-controller", "--json")
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["namespaces"]["dom0"] == f"{lab_name}-dom0"
        assert [v["mac"] for v in info["vms"]] == ["52:54:00:d0:00:01", "52:54:00:d0:00:02"]
        lab = Lab.named(lab_name)
        # The processes outlive `lab up` and belong to no terminal session of ours.
        pids = lab_pids(lab)
        assert len(pids) >= 5 and all(processes.is_running(p) for p in pids)
        assert probe_http(lab.dom0_ns, ECHO_URL).body == f"{topology.DOM0_WAN}\n"
        down = cli("lab", "down", "--name", lab_name)
        assert down.returncode == 0, down.stderr
        assert_gone(lab, pids)
        again = cli("lab", "down", "--name", lab_name)
        assert again.returncode == 0 and "nothing to do" in again.stderr
    finally:
        teardown.down(lab_name)


# ---- VM-side DHCP against a plain dnsmasq --------------------------------------------------


def start_test_dnsmasq(lab: Lab) -> None:
    """A plain DHCP server where the controller's would be (test only)."""
    netns.ip_batch(["addr add 10.77.0.1/24 dev virbr0"], lab.dom0_ns)
    argv = netns.exec_argv(
        lab.dom0_ns,
        [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--interface=virbr0", "--bind-interfaces", "--no-ping", "--pid-file=",
            "--log-facility=-", "--log-dhcp",
            "--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,2m",
            "--dhcp-host=52:54:00:d0:00:01,10.77.0.23,web1", "--domain=x.internal",
            f"--dhcp-leasefile={lab.root / 'test-dnsmasq.leases'}",
        ],
    )  # fmt: skip
    _, proc = processes.spawn(argv, log=lab.logs_dir / "test-dnsmasq.log")
    lab.record_process("test-dnsmasq", proc, lab.dom0_ns, argv)


def test_dhcp_client_configures_vm_and_records_lease(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(2)
    # Clients first, server later: the lab's order when the controller starts late.
    dhcpclient.start_many(lab, [1, 2])
    start_test_dnsmasq(lab)
    leases = dhcpclient.wait_leases(lab, [1, 2], timeout=10)

    one = leases[1]
    assert (one.ip, one.prefix, one.router) == ("10.77.0.23", 24, "10.77.0.1")
    assert (one.hostname, one.domain, one.fqdn) == ("web1", "x.internal", "web1.x.internal")
    assert one.serverid == "10.77.0.1" and one.lease == 120 and one.event == "bound"
    assert vm.addresses(lab, 1) == ["10.77.0.23/24"]
    assert "default via 10.77.0.1 dev eth0" in vm.run(lab, 1, ["ip", "route"]).stdout
    # VM 2 has no reservation: a pool address and no name (it sent none).
    assert leases[2].hostname is None and leases[2].ip.startswith("10.77.0.")
    server_leases = (lab.root / "test-dnsmasq.leases").read_text()
    line2 = next(x for x in server_leases.splitlines() if topology.vm_mac(2) in x)
    assert line2.split()[3] == "*"  # dnsmasq's "no hostname"

    renewed = dhcpclient.renew(lab, 1)
    assert renewed is not None and renewed.event == "renew" and renewed.ip == one.ip

    # Stopped without release: the address stays, like a dead guest agent.
    dhcpclient.stop(lab, 2)
    assert vm.addresses(lab, 2) == [f"{leases[2].ip}/24"]
    dhcpclient.start(lab, 2)
    assert dhcpclient.wait_lease(lab, 2, timeout=10).ip == leases[2].ip
    # Released: address, route and lease file are gone.
    dhcpclient.stop(lab, 2, release=True)
    assert vm.addresses(lab, 2) == []
    assert dhcpclient.read_lease(lab, 2) is None
    assert lab.process(dhcpclient.role(2)) is None


# ---- controller process management with a stand-in -----------------------------------------

FAKE_CONTROLLER = """
import os, signal, socket, sys, time
path = os.path.join(sys.argv[1], "control.sock")
if os.path.exists(path):
    os.unlink(path)
time.sleep(0.1)
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen()
def bye(*_):
    os.unlink(path)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("fake controller ready", flush=True)
while True:
    s.accept()[0].close()
"""


def test_controller_start_kill_restart_stop(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, policy=build.DEFAULT_POLICY)
    # the lab's policy is the source plus the lab's [uplink] (keys it made)
    assert lab.policy_path.read_text().startswith(build.DEFAULT_POLICY.read_text())
    assert "\n[uplink]\n" in lab.policy_path.read_text()
    assert lab.read()["policy"]["source"] == str(build.DEFAULT_POLICY)
    argv = [sys.executable, "-c", FAKE_CONTROLLER, str(lab.state_dir)]

    first = controllerproc.start(lab, argv=argv, timeout=10)
    assert controllerproc.is_ready(lab)
    assert netns.in_namespace(first.pid, lab.dom0_ns)
    assert controllerproc.pid(lab) == first
    with pytest.raises(LabError, match="already running"):
        controllerproc.start(lab, argv=argv)

    controllerproc.kill(lab)  # SIGKILL: the socket file stays, nothing answers it
    assert not processes.is_running(first)
    assert lab.control_socket.exists() and not controllerproc.is_ready(lab)

    second = controllerproc.start(lab, argv=argv, timeout=10)
    assert second != first and controllerproc.is_ready(lab)
    controllerproc.stop(lab)
    assert not processes.is_running(second)
    assert controllerproc.pid(lab) is None
    assert "fake controller ready" in lab.controller_log.read_text()


def test_controller_that_fails_is_reported(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, policy=build.DEFAULT_POLICY)
    argv = [sys.executable, "-c", "import sys; print('policy is bad'); sys.exit(3)"]
    with pytest.raises(LabError, match=r"exited with status 3 .*policy is bad"):
        controllerproc.start(lab, argv=argv, timeout=10)
    assert controllerproc.pid(lab) is None


# ---- services ------------------------------------------------------------------------------


def test_echo_response() -> None:
    assert echo.response("GET", "198.51.100.2").endswith(b"\r\n\r\n198.51.100.2\n")
    assert echo.response("GET", "10.0.0.1").startswith(b"HTTP/1.0 200 OK\r\n")
    assert echo.response("HEAD", "10.0.0.1").endswith(b"\r\n\r\n")
    assert echo.response("POST", "10.0.0.1").startswith(b"HTTP/1.0 405")
    assert echo._client_address("::ffff:10.1.2.3") == "10.1.2.3"


# ---- demo table (plain data) ---------------------------------------------------------------


def machine(i: int, domain: str | None = None, state: str = "admitted") -> dict[str, Any]:
    domain = domain or ("x" if i % 2 else "y")
    admitted = state == "admitted"
    return {
        "mac": topology.vm_mac(i),
        "port": f"vnet{i}",
        "rule": ("odd" if i % 2 else "even") if admitted else None,
        "domain": domain if admitted else None,
        "name": f"{'web' if i % 2 else 'db'}{i}.{domain}.internal" if admitted else None,
        "address": f"10.{10 if domain == 'x' else 20}.0.{i}" if admitted else None,
        "state": state,
    }


def ok(body: str) -> ProbeResult:
    return ProbeResult("http://x/", True, body=body)


BLOCKED = ProbeResult("http://x/", False, kind="timeout", error="timed out")


def observation(i: int, n: int, **changes: Any) -> Observation:
    m = machine(i)
    peers = {j: ok(m["address"]) if j % 2 == i % 2 else BLOCKED for j in range(1, n + 1) if j != i}
    values: dict[str, Any] = {
        "index": i,
        "mac": m["mac"],
        "lease_address": f"{m['address']}/24",
        "machine": m,
        "echo": ok("198.51.100.2\n"),
        "peers": peers,
    }
    values.update(changes)
    return Observation(**values)


def test_demo_all_expectations_hold() -> None:
    rows = evaluate([observation(i, 4) for i in range(1, 5)])
    assert all(r.ok for r in rows)
    assert rows[0].isolation == "vm2 blocked, vm3 ok, vm4 blocked"
    cells = table_rows(rows)
    assert cells[0] == (
        "VM", "MAC", "rule", "name", "address", "agent", "echo", "isolation", "result"
    )  # fmt: skip
    assert cells[1][:7] == (
        "vm1",
        "52:54:00:d0:00:01",
        "odd",
        "web1.x.internal",
        "10.10.0.1",
        "-",
        "198.51.100.2",
    )
    assert cells[1][8] == "PASS"
    assert render(rows).endswith("4/4 VMs as expected: PASS")


def test_demo_shows_each_agent_and_flags_one_out_of_step() -> None:
    synced = {"connected": True, "in_sync": True, "applied": 2, "version": 2, "last_nack": None}
    refused = {**synced, "in_sync": False, "version": 3, "last_nack": {"version": 3}}
    down = {**synced, "connected": False}
    rows = evaluate([observation(1, 3, agent=synced), observation(2, 3, agent=refused),
                     observation(3, 3, agent=down)])  # fmt: skip
    assert [r.agent for r in rows] == ["v2", "v2 (v3 refused)", "v2 (down)"]
    assert [r.ok for r in rows] == [True, False, False]
    assert "agent v2 (v3 refused)" in rows[1].problems


def test_demo_hub_vms_lease_their_hub_address() -> None:
    """A VM of a hub domain leases its bridge (hub) address; its domain
    address lives in its tunnel, and that is what the table shows."""
    obs = []
    for i in range(1, 3):
        o = observation(i, 2, echo=ok("198.51.100.3\n"))
        m = {**o.machine, "underlay": f"10.250.0.{i}"}  # type: ignore[dict-item]
        obs.append(dataclasses.replace(o, machine=m, lease_address=f"10.250.0.{i}/16"))
    rows = evaluate(obs, "198.51.100.3")
    assert all(r.ok for r in rows), [r.problems for r in rows]
    assert rows[0].address == "10.10.0.1"
    wrong = dataclasses.replace(obs[0], lease_address="10.10.0.1/24")
    assert not evaluate([wrong, obs[1]], "198.51.100.3")[0].ok


def test_demo_flags_leaks_and_broken_isolation() -> None:
    obs = [observation(i, 4) for i in range(1, 5)]
    obs[0] = observation(1, 4, echo=ok("10.10.0.1\n"))  # not masqueraded
    peers = dict(obs[1].peers)
    peers[1] = ok("10.20.0.2\n")  # y reached x
    obs[1] = observation(2, 4, peers=peers)
    obs[2] = observation(3, 4, machine=None)  # controller does not know vm3
    rows = evaluate(obs)
    assert [r.ok for r in rows] == [False, False, False, True]
    assert "echo saw 10.10.0.1, expected 198.51.100.2" in rows[0].problems
    assert rows[1].isolation.startswith("vm1 ok(!)")
    assert "not listed by the controller" in rows[2].problems
    text = render(rows)
    assert "FAIL vm2: vm1 should be blocked, reached" in text
    assert text.endswith("1/4 VMs as expected: FAIL")


def test_demo_quarantined_vm_must_reach_nothing() -> None:
    q = machine(5, state="quarantined")
    quiet = observation(5, 1, machine=q, echo=BLOCKED, peers={1: BLOCKED})
    leaky = observation(5, 1, machine=q, echo=ok("198.51.100.2\n"), peers={1: BLOCKED})
    first = observation(1, 1)
    assert evaluate([first, quiet])[1].ok
    row = evaluate([first, leaky])[1]
    assert not row.ok and "quarantined VM reached the internet" in row.problems
    assert table_rows([row])[1][3] == "(quarantined)"


def test_demo_peer_sampling() -> None:
    few = {i: machine(i) for i in range(1, 5)}
    assert select_peers(1, few) == [2, 3, 4]
    many = {i: machine(i) for i in range(1, 21)}
    assert select_peers(10, many) == [8, 9, 11, 12]


# ---- fitting VMs to a policy (pure) ----------------------------------------------------------

FIT_POLICY = """
[domains.a]
pool = "10.30.0.0/24"
[domains.b]
pool = "10.40.0.0/24"
[[rules]]
name = "exact"
domain = "a"
match.mac = "52:54:00:00:00:07"
[[rules]]
name = "oui"
domain = "a"
max = 2
match.mac = "52:54:00:*"
[[rules]]
name = "masked"
domain = "b"
match.mac_mask = "02:00:00:00:00:00/03:00:00:00:00:01"
[[rules]]
name = "libvirt-only"
domain = "b"
match.libvirt_name = "web*"
[[rules]]
name = "taps"
domain = "b"
match.interface = "tap*"
"""


def fit(count: int, overrides: dict[int, str] | None = None, prefix: str = "vnet") -> Any:
    from controller.core.matching import match_rule
    from controller.policy.load import parse_policy

    policy = parse_policy(FIT_POLICY.encode(), "fit.toml")
    specs, warnings = topology.fit_vms(policy, count, overrides, prefix)
    for s in specs:  # every prediction is what the controller's matcher decides
        got = match_rule(policy, s.mac, topology.BRIDGE, s.port)
        assert (got.name if got else None) == s.rule
    return specs, warnings


def test_fit_takes_the_rules_in_turn_and_respects_max() -> None:
    specs, warnings = fit(7)
    assert [(s.rule, s.mac) for s in specs] == [
        ("exact", "52:54:00:00:00:07"),
        ("oui", "52:54:00:d0:00:02"),  # the lab's own MAC where the rule takes it
        ("masked", "02:00:00:00:00:02"),  # the mask pins the last bit: 0
        # libvirt-only and taps (no tap* port) are passed over; exact is used up
        ("oui", "52:54:00:d0:00:04"),
        ("masked", "02:00:00:00:00:04"),  # oui is full (max 2)
        ("masked", "02:00:00:00:00:06"),
        ("masked", "02:00:00:00:00:08"),
    ]
    assert [s.port for s in specs] == [f"vnet{i}" for i in range(1, 8)]
    assert [s.domain for s in specs[:3]] == ["a", "a", "b"]
    assert warnings == []
    assert len({s.mac for s in specs}) == 7


def test_fit_overrides_warn_when_no_rule_takes_them() -> None:
    specs, warnings = fit(3, {2: "AA:00:00:00:00:01", 3: "52:54:00:00:00:07"})
    assert [(s.mac, s.rule) for s in specs] == [
        ("52:54:00:d0:00:01", "oui"),  # exact is taken by vm3's override
        ("aa:00:00:00:00:01", None),
        ("52:54:00:00:00:07", "exact"),
    ]
    assert warnings == [
        "vm2: MAC aa:00:00:00:00:01 on port vnet2 matches no rule of fit.toml: "
        "it will be quarantined"
    ]


def test_fit_port_names_and_interface_rules() -> None:
    specs, _ = fit(4, prefix="tap")
    assert [s.port for s in specs] == ["tap1", "tap2", "tap3", "tap4"]
    # On tap* ports the taps rule is usable, in its turn (after the earlier rules),
    # with the first MAC of its pattern (any) that no earlier rule takes.
    assert [(s.rule, s.mac) for s in specs][3:] == [("taps", "00:00:00:00:00:01")]
    assert [s.rule for s in specs] == ["exact", "oui", "masked", "taps"]
    # Not on vnet ports: vm4 passes over taps (and the used-up exact) to oui.
    assert [s.rule for s in fit(4)[0]] == ["exact", "oui", "masked", "oui"]


def test_fit_without_policy_keeps_the_lab_macs() -> None:
    specs, warnings = topology.fit_vms(None, 2, {2: "02:00:00:00:00:09"})
    assert [(s.mac, s.rule) for s in specs] == [
        ("52:54:00:d0:00:01", None),
        ("02:00:00:00:00:09", None),
    ]
    assert warnings == []


def test_fit_the_lab_policy_keeps_the_lab_macs() -> None:
    from controller.policy.load import load_policy

    specs, warnings = topology.fit_vms(load_policy(build.DEFAULT_POLICY), 6)
    assert [s.mac for s in specs] == [topology.vm_mac(i) for i in range(1, 7)]
    assert [s.rule for s in specs] == ["odd", "even"] * 3 and warnings == []


def test_pattern_macs_are_unicast_and_inside_the_pattern() -> None:
    from controller.policy.macs import RANDOM, Ternary, is_multicast, parse_glob, parse_mac

    for pattern in (parse_glob("52:54:00:*"), RANDOM, Ternary(), parse_glob("??:??:??:??:??:?1")):
        got = list(topology.pattern_macs(pattern, limit=64))
        assert got and len(set(got)) == len(got)
        for mac in got:
            value = parse_mac(mac)
            assert pattern.matches(value) and not is_multicast(value) and value != 0
    assert list(topology.pattern_macs(parse_glob("52:54:00:*"), limit=3)) == [
        "52:54:00:00:00:01",
        "52:54:00:00:00:02",
        "52:54:00:00:00:00",
    ]
    assert list(topology.pattern_macs(parse_glob("01:*"))) == []  # multicast only
    assert topology.port_mac("fe:54:00:00:00:01") == "fa:54:00:00:00:01"
    assert topology.port_mac("52:54:00:00:00:01") == "fe:54:00:00:00:01"
