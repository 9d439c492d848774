"""The agents' listener in the lab: enrollment and mutual TLS from real VMs
(tests/data/policies/agents-lab.toml: the `enroll` service on each gateway).

`dom0 ca init` on the lab's state, then the controller restarted: it listens
on tcp/8443 of every gateway. A stand-in agent (controller/lab/agentprobe.py)
makes its key inside its VM, enrolls with a token from `dom0 token create`,
and then connects with the certificate it got.

- vm1 enrolls with a token for its rule and gets a certificate (the control
  of every refusal below), then connects with it: the controller says hello
  and answers its heartbeat;
- vm3 presenting vm1's (valid) certificate is refused: the certificate names
  a machine that does not hold vm3's address;
- the same token used again is refused; a token for the other rule is refused;
- without a certificate, anything but enrollment is refused;
- vm2 runs the real agent (agents/): a configuration it cannot apply is
  NACKed with its reason, and not pushed again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.lab import agent as agent_lab
from controller.lab import controllerproc, netns, processes, vm
from controller.lab.rundir import Lab
from controller.lab.topology import VPN_WAN
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "tests" / "data" / "policies" / "agents-lab.toml"
GATEWAY_X = "10.10.0.1"


@pytest.fixture(scope="module")
def agents_lab() -> Any:
    from tests.lab.conftest import _need_root, unique_lab_name

    _need_root()
    from controller.lab import build, teardown

    name = unique_lab_name()
    try:
        lab = build.create(name, 3, policy=POLICY)
        made = processes.run_dom0("ca", "init", "--state", str(lab.state_dir), timeout=60)
        assert made.returncode == 0, made.stderr
        controllerproc.restart(lab)
        wait_for(
            lambda: f"agents: listening on {GATEWAY_X}:8443" in lab.controller_log.read_text(),
            15,
            "the agents' listener on x's gateway",
        )
        yield lab
    finally:
        teardown.down(name)
        assert not teardown.exists(name), f"lab {name} not fully torn down"


def token(lab: Lab, rule: str) -> str:
    made = processes.run_dom0(
        "token", "create", "--rule", rule, "--state", str(lab.state_dir), timeout=60
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def agent(lab: Lab, vm: int, *args: str) -> dict:
    bundle = lab.state_dir / "ca" / "bundle.pem"
    argv = [sys.executable, "-m", "controller.lab.agentprobe", *args, "--ca", str(bundle),
            "--server", GATEWAY_X]  # fmt: skip
    out = netns.run(lab.vm_ns(vm), argv, check=False, env=processes.python_env(), timeout=30)
    assert out.stdout.strip(), out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_agent_enrolls_and_then_speaks_with_its_certificate(agents_lab: Lab) -> None:
    lab = agents_lab
    where = lab.root / "agent-vm1"
    got = agent(lab, 1, "enroll", "--token", token(lab, "odd"), "--out", str(where))
    assert got["ok"] and got["got"] == ["hello", "enrolled"], got
    assert (where / "agent.pem").stat().st_mode & 0o777 == 0o600
    hello = agent(lab, 1, "hello", "--cert", str(where / "agent.pem"))
    # (a bridge domain's machine: its configuration comes first, then the heartbeat's answer)
    assert hello["ok"] and hello["got"] in (
        ["hello", "heartbeat"],
        ["hello", "config", "heartbeat"],
    ), hello
    # the same certificate from vm3 (same domain, same rule, another machine)
    stolen = agent(lab, 3, "hello", "--cert", str(where / "agent.pem"))
    assert not stolen["ok"] and "which web2.x.internal holds" in stolen["error"], stolen


def test_tokens_are_for_one_use_and_one_rule(agents_lab: Lab) -> None:
    lab = agents_lab
    once = token(lab, "odd")
    first = agent(lab, 3, "enroll", "--token", once, "--out", str(lab.root / "agent-vm3"))
    assert first["ok"], first
    again = agent(lab, 3, "enroll", "--token", once)
    assert not again["ok"] and "already used" in again["error"], again
    other = agent(lab, 1, "enroll", "--token", token(lab, "even"))
    assert not other["ok"] and "for rule even" in other["error"], other
    # no token (nor its secret) in the controller's log
    log = lab.controller_log.read_text()
    assert once not in log and once.split("-", 2)[2] not in log


def test_without_a_certificate_only_enrollment(agents_lab: Lab) -> None:
    got = agent(agents_lab, 1, "hello")
    assert not got["ok"] and "only enroll" in got["error"], got


def test_an_unappliable_configuration_is_nacked_and_not_pushed_again(agents_lab: Lab) -> None:
    """vm2 runs the real agent; its VM has IPv6 switched off, and the policy
    then gives its domain IPv6: the agent cannot add its address, rolls back,
    NACKs with the reason, and keeps working on the previous configuration.
    The controller does not push that version again, not even to the agent's
    next connection; a changed policy (the control) is pushed and applied."""
    lab = agents_lab
    machine = agent_lab.enroll(lab, 2)
    name = machine["name"]
    first = agent_lab.wait_applied(lab, 2)
    agent_lab.take_over(lab, 2)
    netns.run(lab.vm_ns(2), ["sysctl", "-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=1"])
    policy = lab.policy_path.read_text()
    with_ipv6 = policy.replace("[domains.y]\n", "[domains.y]\nipv6 = true\n", 1)
    assert controllerproc.reload(lab, with_ipv6) == "applying"

    def seen() -> dict:
        return {a["name"]: a for a in controllerproc.reply(lab)["agents"]}[name]

    wait_for(lambda: (seen()["last_nack"] or {}).get("version") == first + 1, 20,
             "the agent's NACK of the IPv6 configuration")  # fmt: skip
    status = seen()
    assert status["applied"] == first and not status["in_sync"], status
    assert "fd" in status["last_nack"]["reason"], status  # it names the address it could not add
    assert agent_lab.applied_version(lab, 2) == first
    assert vm.whoami(lab, 2) == VPN_WAN  # working on the previous configuration

    pushed = f"agent {name}: configuration {first + 1} pushed"
    assert lab.controller_log.read_text().count(pushed) == 1
    since = status["since"]
    agent_lab.stop(lab, 2)
    agent_lab.start(lab, 2, machine["agent_server"])
    wait_for(lambda: seen()["connected"] and seen().get("since", since) > since
             and seen()["looked"], 30, "the agent's next connection, past its hello")  # fmt: skip
    assert seen()["pushed"] is None, seen()  # nothing pushed on it: not that version again
    assert lab.controller_log.read_text().count(pushed) == 1

    assert controllerproc.reload(lab, policy) == "applying"  # the control: a change is pushed
    wait_for(lambda: seen()["applied"] == first + 2 == seen()["version"], 20,
             "the changed configuration applied")  # fmt: skip
    assert vm.whoami(lab, 2) == VPN_WAN
