"""Allow lists by protocol and port, and `dom0 policy explain`, against real
packets (tests/data/policies/allow-lab.toml).

Every VM and an internet host (NAME-wan, 203.0.113.20, reached through the
uplink) serve tcp/22, 80, 443, 8080, udp/53, 5353 and answer ping
(controller/lab/ports.py): a probe is ok only when the very port answered.
A blocked probe must be a clean block (no answer within its timeout).

- lan may reach dmz on tcp/443 only: tcp/443 passes, tcp/80 and tcp/22 do not;
- the admin rule's grant (www*.dmz on tcp/22) lets exactly that rule's machine
  through, and only to the web server, not to the database;
- `policy explain`, on the controller's own store, agrees with a probe for
  every (source, destination, service) of the lab: 252 cases;
- the control: with lan's `reach = ["dmz"]` instead (every port), the same
  probes that were blocked pass.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from controller.core.explain import explain
from controller.lab import controllerproc, netns, ports, processes
from controller.lab.rundir import Lab
from controller.policy.load import load_policy
from controller.store import Store

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "tests" / "data" / "policies" / "allow-lab.toml"
INTERNET = "203.0.113.20"  # on NAME-wan's lo, beside the echo service's 203.0.113.10
TCP = (22, 80, 443, 8080)
UDP = (53, 5353)
SERVICES = [f"tcp/{p}" for p in TCP] + [f"udp/{p}" for p in UDP] + ["icmp"]
# vm index -> (MAC, the name its rule gives)
VMS = {
    1: ("52:54:00:a1:00:01", "pc1.lan"),
    2: ("52:54:00:a1:00:02", "pc2.lan"),
    3: ("52:54:00:a2:00:01", "admin.lan"),
    4: ("52:54:00:b1:00:01", "www1.dmz"),
    5: ("52:54:00:b2:00:01", "db1.dmz"),
    6: ("52:54:00:c1:00:01", "g1.guest"),
}
TIMEOUT = 2.0


def target(address: str, service: str) -> str:
    return f"{address}:{service}"


@pytest.fixture(scope="module")
def allow_lab() -> Any:
    """The lab, with a port server in every VM and on the internet host."""
    from tests.lab.conftest import _need_root, unique_lab_name

    _need_root()
    from controller.lab import build, teardown

    name = unique_lab_name()
    servers: list[ports.Server] = []
    try:
        lab = build.create(
            name, len(VMS), policy=POLICY, macs={i: mac for i, (mac, _) in VMS.items()}
        )
        netns.run(lab.wan_ns, ["ip", "addr", "add", f"{INTERNET}/32", "dev", "lo"])
        servers.append(ports.serve(lab.wan_ns, TCP, UDP, bind=INTERNET))
        for i in VMS:
            # the VM's echo service holds tcp/80: this lab's VMs serve ports instead
            echo = lab.process(f"echo@vm{i}")
            if echo is not None:
                processes.stop([echo])
                lab.forget_process(f"echo@vm{i}")
            servers.append(ports.serve(lab.vm_ns(i), TCP, UDP))
        yield lab
    finally:
        for s in servers:
            s.stop()
        teardown.down(name)
        assert not teardown.exists(name), f"lab {name} not fully torn down"


def addresses(lab: Lab) -> dict[int, str]:
    """vm index -> its address, as the controller's store has it (names checked)."""
    store = Store(lab.state_dir, readonly=True)
    try:
        by_mac = {a.mac: a for a in store.allocations()}
    finally:
        store.close()
    out = {}
    for i, (mac, _name) in VMS.items():
        a = by_mac[mac]
        assert a.address is not None, a
        out[i] = a.address
    return out


def run_cases(lab: Lab, cases: list[tuple[int, str, str]]) -> list[ports.PortResult]:
    """(vm, destination address, service) -> one probe each, every VM at once."""
    by_vm: dict[int, list[int]] = {}
    for k, (i, _, _) in enumerate(cases):
        by_vm.setdefault(i, []).append(k)
    jobs = [
        (lab.vm_ns(i), [target(cases[k][1], cases[k][2]) for k in ks]) for i, ks in by_vm.items()
    ]
    results: list[ports.PortResult | None] = [None] * len(cases)
    for ks, got in zip(by_vm.values(), ports.probe_parallel(jobs, timeout=TIMEOUT), strict=True):
        for k, r in zip(ks, got, strict=True):
            results[k] = r
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def clean(r: ports.PortResult, passes: bool) -> str | None:
    """Why r does not show `passes` (a pass: answered; a block: a timeout), or None."""
    if passes:
        return None if r.ok else f"{r.describe()} (expected an answer)"
    if r.ok:
        return f"{r.describe()} (expected blocked)"
    return None if r.kind == "timeout" else f"{r.describe()} (not a clean block)"


def test_lan_reaches_dmz_on_443_only(allow_lab: Lab) -> None:
    ip = addresses(allow_lab)
    cases = [(1, ip[4], "tcp/443"), (1, ip[4], "tcp/80"), (1, ip[4], "tcp/22")]
    got = run_cases(allow_lab, cases)
    problems = [clean(r, want) for r, want in zip(got, (True, False, False), strict=True)]
    assert not [p for p in problems if p], problems


def test_a_rule_grant_lets_exactly_its_machines_through(allow_lab: Lab) -> None:
    ip = addresses(allow_lab)
    cases = [
        (3, ip[4], "tcp/22"),  # admin -> www1: its rule's grant
        (3, ip[4], "tcp/8080"),
        (3, ip[6], "udp/5353"),  # admin -> guest
        (1, ip[4], "tcp/22"),  # pc1, same domain, another rule: no
        (2, ip[4], "tcp/8080"),
        (1, ip[6], "udp/5353"),
        (3, ip[5], "tcp/22"),  # admin -> db1: not a www* name
        (3, ip[4], "tcp/80"),  # admin -> www1 on another port
    ]
    want = (True, True, True, False, False, False, False, False)
    got = run_cases(allow_lab, cases)
    problems = [clean(r, w) for r, w in zip(got, want, strict=True)]
    assert not [p for p in problems if p], problems


def test_explain_agrees_with_real_probes(allow_lab: Lab) -> None:
    """Every source VM, to every other VM and the internet host, on every service."""
    ip = addresses(allow_lab)
    policy = load_policy(allow_lab.policy_path)
    store = Store(allow_lab.state_dir, readonly=True)
    try:
        allocations = store.allocations()
    finally:
        store.close()
    cases: list[tuple[int, str, str]] = []
    names: list[tuple[str, str]] = []
    for i, j in itertools.product(VMS, [*VMS, 0]):
        if i == j:
            continue
        for service in SERVICES:
            cases.append((i, ip[j] if j else INTERNET, service))
            names.append((VMS[i][1], VMS[j][1] if j else INTERNET))
    assert len(cases) >= 100
    answers = [
        explain(policy, src, dst, service, allocations)
        for (src, dst), (_, _, service) in zip(names, cases, strict=True)
    ]
    assert not any(a.source.stand_in or a.destination.stand_in for a in answers)
    got = run_cases(allow_lab, cases)
    disagree = [
        f"{a.line()}; probe: {r.describe()}"
        for a, r in zip(answers, got, strict=True)
        if clean(r, a.passes) is not None
    ]
    passing = sum(a.passes for a in answers)
    assert not disagree, f"{len(disagree)} of {len(cases)} disagree:\n" + "\n".join(disagree)
    # both outcomes are well represented, and each line of the policy decides some case
    assert 30 <= passing <= len(cases) - 30, passing
    deciding = {a.decided_by for a in answers if a.passes}
    for line in (
        "domains.lan.allow[1]",
        "domains.lan.allow[2]",
        "domains.lan.allow[3]",
        "domains.dmz.allow[1]",
        "domains.dmz.members_reach",
        "domains.guest.internet",
        "rules.admin.allow[1]",
        "rules.admin.allow[2]",
    ):
        assert line in deciding, (line, sorted(deciding))


def test_explain_command_on_the_lab_state(allow_lab: Lab) -> None:
    """The command an operator runs: text, JSON, exit 0 for a pass and 1 for a drop."""
    args = ["policy", "explain", str(allow_lab.policy_path)]
    state = ["--state", str(allow_lab.state_dir)]
    ok = processes.run_dom0(*args, "admin.lan", "www1.dmz", "tcp/22", *state, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "passes, decided by rules.admin.allow[1]" in ok.stdout, ok.stdout
    assert "stand-in" not in ok.stdout
    no = processes.run_dom0(*args, "pc1.lan", "www1.dmz", "tcp/22", *state, "--json", timeout=30)
    assert no.returncode == 1, no.stderr
    import json

    reply = json.loads(no.stdout)
    assert reply["passes"] is False and reply["source"]["name"] == "pc1.lan.internal"
    assert "no line of" in reply["decided_by"]


def test_control_reach_opens_every_port(allow_lab: Lab) -> None:
    """The same probes with lan's dmz entry replaced by `reach = ["dmz"]`: they pass.
    (Last in this module: it changes the lab's policy.)"""
    ip = addresses(allow_lab)
    cases = [(1, ip[4], "tcp/80"), (1, ip[4], "tcp/22"), (2, ip[5], "udp/53")]
    before = run_cases(allow_lab, cases)
    assert not [p for r in before if (p := clean(r, False))], before
    text = allow_lab.policy_path.read_text()
    opened = (
        text.replace('  { to = "dmz", ports = ["tcp/443"] },\n', "")
        # (admin's narrower grant would now contradict the domain's: policy check refuses it)
        .replace('  { to = "www*.dmz", ports = ["tcp/22", "tcp/8080"] },\n', "")
        .replace("members_reach = false\n", 'members_reach = false\nreach = ["dmz"]\n', 1)
    )
    assert opened != text
    assert controllerproc.reload(allow_lab, opened) == "applying"
    after = run_cases(allow_lab, cases)
    assert not [p for r in after if (p := clean(r, True))], after
