"""dom0's own input, and the hand-over from the installer's boot baseline:
the controller deletes `inet dom0_baseline` in the transaction that loads its
own tables, whose host rules ([host] in the policy) keep open what the
baseline kept open, and nothing more."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from controller.lab import build, controllerproc, dhcpclient, netns, processes, topology, vm
from controller.lab.rundir import Lab

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

BASELINE = """
table inet dom0_baseline {
    chain input { type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state established,related accept
        tcp dport 22 accept
    }
    chain forward { type filter hook forward priority filter; policy drop; }
}
"""


def listen(lab: Lab, port: int) -> None:
    """An echo service on dom0's WAN address (stands in for sshd)."""
    argv = netns.exec_argv(
        lab.dom0_ns,
        [PY, "-m", "controller.lab.echo", "--bind", topology.DOM0_WAN, "--port", str(port)],
    )
    _, proc = processes.spawn(
        argv, log=lab.logs_dir / f"listen-{port}.log", env=processes.python_env()
    )
    lab.record_process(f"listen-{port}@dom0", proc, lab.dom0_ns, argv)


def from_wan(lab: Lab, port: int, source: str | None = None) -> bool:
    url = vm.echo_url(topology.DOM0_WAN, port)
    argv = [PY, "-m", "controller.lab.probe", "http", url, "--timeout", "1.5"]
    if source:
        argv += ["--source", source]
    return netns.run(lab.wan_ns, argv, check=False, env=processes.python_env()).returncode == 0


def test_controller_takes_over_the_baseline_and_keeps_ssh(make_lab: Any, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        (ROOT / "policies" / "lab.toml").read_text()
        + '\n[host]\nssh_from = ["198.51.100.1/32"]\nssh_port = 2222\n'
    )
    lab = make_lab(2, controller=False, dhcp=False, policy=policy)
    netns.run(lab.dom0_ns, ["nft", "-f", "-"], input=BASELINE)
    listen(lab, 2222)
    listen(lab, 8080)
    netns.ip_batch(["addr add 198.51.100.9/24 dev inet0"], lab.wan_ns)  # a second WAN source
    controllerproc.start(lab)
    rules = netns.run(lab.dom0_ns, ["nft", "list", "tables"]).stdout
    assert "dom0_baseline" not in rules and "table inet dom0" in rules
    dhcpclient.start_many(lab, [1, 2])
    dhcpclient.wait_leases(lab, [1, 2], 20)
    build.join_hub(lab, [1, 2])
    # the VMs work: the baseline's forward drop is gone
    assert vm.whoami(lab, 1) == topology.VPN_WAN
    # SSH (port 2222 here) from the allowed source only; nothing else comes in
    assert from_wan(lab, 2222, source=topology.WAN_GATEWAY)
    assert not from_wan(lab, 2222, source="198.51.100.9")
    assert not from_wan(lab, 8080, source=topology.WAN_GATEWAY)
    # a baseline loaded again behind the controller's back is taken over at the next sync
    netns.run(lab.dom0_ns, ["nft", "-f", "-"], input=BASELINE)
    controllerproc.restart(lab)
    assert "dom0_baseline" not in netns.run(lab.dom0_ns, ["nft", "list", "tables"]).stdout
    assert vm.whoami(lab, 2) == topology.VPN_WAN


def test_killswitch_command_loads_it_alone(make_lab: Any) -> None:
    """What the boot service runs before the network is up."""
    lab = make_lab(1, controller=False, dhcp=False, policy=build.DEFAULT_POLICY)
    cmd = [PY, "-m", "controller.cli", "killswitch", "--policy", str(lab.policy_path)]
    env = processes.python_env()
    check = netns.run(lab.dom0_ns, [*cmd, "--check"], check=False, env=env)
    assert check.returncode == 1
    out = netns.run(lab.dom0_ns, cmd, env=env).stdout
    assert out.startswith(
        "dom0 killswitch: loaded table inet dom0_wan: only UDP to 198.51.100.3:51820"
    )
    assert netns.run(lab.dom0_ns, [*cmd, "--check"], check=False, env=env).returncode == 0
    # dom0's own traffic cannot leave now, tunnel or not
    probe = [PY, "-m", "controller.lab.probe", "http", vm.echo_url(), "--timeout", "1"]
    assert netns.run(lab.dom0_ns, probe, check=False, env=env).returncode != 0
    bad = lab.root / "bad.toml"
    bad.write_text("[uplink]\nendpoint = 3\n")
    r = netns.run(
        lab.dom0_ns,
        [PY, "-m", "controller.cli", "killswitch", "--policy", str(bad)],
        check=False,
        env=env,
    )
    assert r.returncode == 2 and "uplink.endpoint" in r.stderr
