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
  configuration and reaches the internet before dom0's controller returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.lab import agent, controllerproc, dhcpclient, netns, processes, topology, vm
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
