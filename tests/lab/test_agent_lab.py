"""The real agent (agents/) in every VM of the default lab (policies/lab.toml:
both domains inside the hub's tunnels), as `dom0 lab up` builds it: dom0 gets
a CA, each VM a token for its machine, and its agent enrolls over its
underlay, takes its addresses and its tunnel (with a key of its own) from the
pushed configuration, and its DHCP client is stopped.

- each VM reaches the internet's echo through the tunnel its agent made, and
  the echo sees the VPN's address (198.51.100.3): the kill switch holds;
- dom0 holds no private key of theirs (the ones it had made are gone), their
  key files are 0600, and no agent's key appears in dom0's state or log;
- a policy change that touches every machine (the hub's MTU) is ACKed by
  every agent, with the new version in `dom0 status`, and is in place in the
  VMs;
- an agent restarted while the controller is down, in a VM that lost its
  network (as after a reboot), comes back on its last-known-good
  configuration and reaches the internet before dom0's controller returns;
- a container (`dom0 lab container add`) gets an address of its machine's
  delegated prefix and its names, shows under its VM in `dom0 status`,
  reaches what its domain allows (the internet, its domain's other machine)
  and not another domain; no VM may send from another machine's prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.lab import (
    agent,
    container,
    controllerproc,
    dhcpclient,
    netns,
    processes,
    topology,
    vm,
)
from controller.lab.expect import assert_blocked
from controller.lab.probe import probe_http
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

VMS = 3


@pytest.fixture(scope="module")
def agents_lab() -> Iterator[Lab]:
    from tests.lab.conftest import _need_root, unique_lab_name

    _need_root()
    from controller.lab import build, teardown

    name = unique_lab_name()
    try:
        yield build.create(name, VMS, agents=True)
    finally:
        teardown.down(name)
        assert not teardown.exists(name), f"lab {name} not fully torn down"


def agents(lab: Lab) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in controllerproc.reply(lab)["agents"]}


def link(lab: Lab, index: int, dev: str) -> dict[str, Any] | None:
    out = vm.run(lab, index, ["ip", "-j", "link", "show", "dev", dev], check=False)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def test_every_vm_takes_its_network_from_its_agent(agents_lab: Lab) -> None:
    lab = agents_lab
    seen = agents(lab)
    assert len(seen) == VMS, seen
    for i in range(1, VMS + 1):
        held = agent.state(lab, i)
        assert held["enrolled"] and held["config_version"] and not held["token_waiting"], held
        assert lab.process(dhcpclient.role(i)) is None  # no DHCP client runs
        assert link(lab, i, "wg0") is not None
        assert vm.whoami(lab, i) == topology.VPN_WAN
        status = seen[held["name"]]
        assert status["connected"] and status["in_sync"], status
        assert status["applied"] == held["config_version"], status
        tunnel = status["report"]["applied"]["tunnel"]
        assert tunnel["interface"] == "wg0" and tunnel["latest_handshake"], status


def test_no_private_key_of_an_agent_on_dom0(agents_lab: Lab) -> None:
    lab = agents_lab
    machines = lab.state_dir / "keys" / "machines"
    assert sorted(p.suffix for p in machines.iterdir()) == [".pub"] * VMS
    secrets = []
    for i in range(1, VMS + 1):
        root = agent.root(lab, i)
        for name in ("tls.key", "wg.key", "config.json"):
            assert (root / name).stat().st_mode & 0o777 == 0o600, root / name
        assert (root.stat().st_mode & 0o777) == 0o700
        wg = (root / "wg.key").read_text().strip()
        pem = (root / "tls.key").read_bytes()
        body = b"".join(pem.splitlines()[1:-1]).decode()  # (its first 36 characters are ASN.1)
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        secrets += [wg, body[36:], format(key.private_numbers().private_value, "x")]
    everything = [p for p in lab.state_dir.rglob("*") if p.is_file()] + [lab.controller_log]
    for path in everything:
        text = path.read_bytes().decode(errors="replace")
        for secret in secrets:
            assert secret not in text, f"an agent's private key in {path}"


def test_a_policy_change_is_acked_by_every_agent(agents_lab: Lab) -> None:
    lab = agents_lab
    before = agents(lab)
    text = lab.policy_path.read_text()
    assert "mtu" not in text.split("[hub]", 1)[1].split("[", 1)[0]
    outcome = controllerproc.reload(lab, text.replace("[hub]\n", "[hub]\nmtu = 1380\n", 1))
    assert outcome == "applying", outcome

    def all_acked() -> bool:
        now = agents(lab)
        return all(
            now[n]["applied"] == now[n]["version"] == before[n]["version"] + 1 for n in before
        )

    wait_for(all_acked, 20, "every agent ACKing the new version")
    for i in range(1, VMS + 1):
        wg0 = link(lab, i, "wg0")
        assert wg0 is not None and wg0["mtu"] == 1380, wg0
        assert vm.whoami(lab, i) == topology.VPN_WAN


def test_an_agent_restarted_while_dom0_is_down_runs_its_last_known_good(agents_lab: Lab) -> None:
    lab = agents_lab
    known = agent.applied_version(lab, 1)
    server = agent.server_of(controllerproc.machine(lab, vm.mac(lab, 1)) or {})
    controllerproc.stop(lab)
    try:
        agent.stop(lab, 1)
        # the VM lost its network, as after a reboot: no tunnel, no address
        vm.run(lab, 1, ["ip", "link", "del", "wg0"])
        netns.ip_batch([f"addr flush dev {topology.VM_IF} scope global"], lab.vm_ns(1))
        assert vm.addresses(lab, 1) == [] and link(lab, 1, "wg0") is None
        # the agent's own tunnel daemon went with the interface; the agent starts anew
        agent.start(lab, 1, server)
        wait_for(lambda: link(lab, 1, "wg0") is not None and vm.addresses(lab, 1) != [], 20,
                 "vm1's agent applying its last-known-good configuration")  # fmt: skip
        assert controllerproc.pid(lab) is None  # (dom0's controller is still down)
        # dom0's data plane outlives its controller: the tunnel carries vm1 out
        wait_for(lambda: vm.probe(lab, 1, vm.echo_url()).body.strip() == topology.VPN_WAN, 20,
                 "vm1 reaching the echo through its tunnel")  # fmt: skip
    finally:
        if controllerproc.pid(lab) is None:
            controllerproc.start(lab)

    def back() -> bool:
        seen = agents(lab)
        name = agent.state(lab, 1)["name"]
        return name in seen and seen[name]["connected"] and seen[name]["applied"] == known

    wait_for(back, 90, "vm1's agent connected to the restarted controller")
    proc = lab.process(agent.role(1))
    assert proc is not None and processes.is_running(proc)


# -- containers (policies/lab.toml: x delegates a /28 of 10.130.0.0/20 to each machine) --


def machine_row(lab: Lab, index: int) -> dict[str, Any]:
    m = controllerproc.machine(lab, lab.vm(index)["mac"])
    assert m is not None, f"vm{index} not in dom0 status"
    return m


def domain_address(lab: Lab, index: int) -> str:
    return str(machine_row(lab, index)["address"])


def test_a_container_gets_its_address_and_names_and_shows_in_status(agents_lab: Lab) -> None:
    from ipaddress import ip_interface, ip_network

    lab = agents_lab
    made = container.add(lab, 1, "app")
    web1 = machine_row(lab, 1)
    prefix = ip_network(web1["containers_prefix"])
    assert ip_interface(made["address"]).ip in prefix, (made, prefix)
    assert made["fqdn"] == f"app.{web1['name']}"

    def shown() -> dict[str, Any] | None:
        rows = machine_row(lab, 1).get("containers") or []
        return next((c for c in rows if c["name"] == "app"), None)

    row = wait_for(shown, 10, "app under web1 in dom0 status")
    assert row == {
        "name": "app",
        "address": str(ip_interface(made["address"]).ip),
        "fqdn": f"app.{web1['name']}",
        "interface_fqdn": f"eth0.app.{web1['name']}",
    }, row
    table = processes.run_dom0("status", "--state", str(lab.state_dir))
    assert f"container app.{web1['name']}" in table.stdout, table.stdout


def test_a_container_reaches_what_its_domain_allows_and_nothing_else(agents_lab: Lab) -> None:
    """x's container: the internet (through the tunnels, as 198.51.100.3) and
    x's other machine, seen by its own address; not y's machine. The control:
    with x allowed to reach y, the same probe gets through."""
    lab = agents_lab
    ns = container.namespace(lab, 1, "app")
    if not netns.exists(ns):
        container.add(lab, 1, "app")
    mine = str(machine_row(lab, 1)["containers"][0]["address"])
    out = probe_http(ns, vm.echo_url(), timeout=3.0)
    assert out.ok and out.body.strip() == topology.VPN_WAN, out
    web2 = probe_http(ns, vm.echo_url(domain_address(lab, 3)), timeout=3.0)
    assert web2.ok and web2.body.strip() == mine, web2  # (routed, never masqueraded)
    db1 = vm.echo_url(domain_address(lab, 2))
    assert_blocked(probe_http(ns, db1, timeout=1.5))
    text = lab.policy_path.read_text()
    opened = text.replace("[domains.x]\n", '[domains.x]\nreach = ["y"]\n', 1)
    assert controllerproc.reload(lab, opened) == "applying"
    try:
        wait_for(lambda: probe_http(ns, db1, timeout=1.5).ok, 10, "the control: x reaches y")
    finally:
        assert controllerproc.reload(lab, text) == "applying"
    wait_for(lambda: not probe_http(ns, db1, timeout=1.0).ok, 10, "x closed to y again")


def test_a_vm_cannot_send_from_another_machines_containers_prefix(agents_lab: Lab) -> None:
    """vm1 forges a source in web2's (vm3's) prefix into its tunnel: the hub
    refuses it (not in vm1's peer's allowed IPs). The control: a source in
    vm1's own prefix, the same probe, gets through."""
    from ipaddress import ip_network

    lab = agents_lab
    own = ip_network(machine_row(lab, 1)["containers_prefix"])
    other = ip_network(machine_row(lab, 3)["containers_prefix"])
    forged, control = str(other.network_address + 5), str(own.network_address + 13)
    for a in (forged, control):
        vm.add_address(lab, 1, f"{a}/32", dev="lo")
    try:
        assert_blocked(vm.probe(lab, 1, vm.echo_url(), source=forged, timeout=1.5))
        got = vm.probe(lab, 1, vm.echo_url(), source=control, timeout=3.0)
        assert got.ok and got.body.strip() == topology.VPN_WAN, got
    finally:
        for a in (forged, control):
            vm.del_address(lab, 1, f"{a}/32", dev="lo")


def test_an_agent_given_no_address_finds_dom0_by_mdns_and_enrolls(agents_lab: Lab) -> None:
    """A new VM (of y, on the hub's underlay) whose agent is given no
    --server: it browses `_dom0._tcp` on its link, finds dom0's hub address
    (advertised on the bridge, and let through dom0's input from where
    agents enroll), enrolls there with TLS verified against the token's CA,
    and runs its configuration like the others."""
    from controller.lab import build

    lab = agents_lab
    index = build.add_vm(lab)
    dhcpclient.wait_lease(lab, index, timeout=20)
    wait_for(lambda: (m := controllerproc.machine(lab, lab.vm(index)["mac"])) is not None
             and m.get("state") == "admitted", 20, f"vm{index} admitted")  # fmt: skip
    machine = agent.enroll(lab, index, discover=True)
    agent.wait_applied(lab, index, 40)
    agent.take_over(lab, index)
    log = agent.log_path(lab, index).read_text()
    assert f"discovered {machine['agent_server']}:8443" in log, log[-2000:]
    assert vm.whoami(lab, index) == topology.VPN_WAN
    assert agents(lab)[machine["name"]]["connected"]
