"""dom0's DNS in the default lab (policies/lab.toml: both domains inside the
hub's tunnels, an agent in every VM, y with `dns = "plain"`), as `dom0 lab up`
builds it, with the lab's upstream resolver on its internet:

- every name (machine, interface, container) and its PTR answers from dom0's
  loopback and, over DNS over TLS verified against dom0's CA, from every VM
  (at its gateway, and through its agent's stub on its loopback; a container
  asks the stub on its bridge);
- a name outside the site resolves from a VM, and the upstream resolver sees
  the question arrive from the VPN's address (198.51.100.3): through dom0's
  tunnel, never from dom0's WAN address;
- port 53 answers a VM of y (plain) and gives a VM of x no answer at all;
- a killed unbound is started again and answers the same at once; a restarted
  controller adopts the running unbound (same PID) and answers the same;
- captures on every VM's bridge port for the whole module hold no clear-text
  DNS (nothing on port 53, no site name in the clear); control: a plain query
  sent from a VM's link is seen by the same captures.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from controller.lab import container, controllerproc, dnsprobe, resolver, topology
from controller.lab.build import read_policy
from controller.lab.capture import ETH_P_IP, Capture, Packet
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for
from controller.policy.model import Policy

pytestmark = pytest.mark.lab

VMS = 3
TIMEOUT = 1.5  # seconds a negative probe waits for an answer


@pytest.fixture(scope="module")
def dns_lab() -> Iterator[tuple[Lab, list[Capture]]]:
    from tests.lab.conftest import _need_root, unique_lab_name

    _need_root()
    from controller.lab import build, teardown

    name = unique_lab_name()
    try:
        lab = build.create(name, VMS, agents=True)
        captures = [
            Capture(lab, lab.dom0_ns, lab.vm(i)["port"], tag=f"dns-vnet{i}").start()
            for i in range(1, VMS + 1)
        ]
        yield lab, captures
    finally:
        teardown.down(name)
        assert not teardown.exists(name), f"lab {name} not fully torn down"


def policy_of(lab: Lab) -> Policy:
    return read_policy(lab.policy_path)


def ca(lab: Lab) -> str:
    return str(lab.state_dir / "ca" / "bundle.pem")


def machines(lab: Lab) -> list[dict[str, Any]]:
    return [m for m in controllerproc.status(lab) if m.get("state") == "admitted"]


def expected(lab: Lab) -> dict[tuple[str, str], str]:
    """(name, type) -> the answer, for every name dom0 status shows."""
    out: dict[tuple[str, str], str] = {}
    for m in machines(lab):
        names = [(m["name"], m["address"])]
        names += [(c["fqdn"], c["address"]) for c in m.get("containers") or ()]
        for fqdn, address in names:
            out[(fqdn, "A")] = address
            out[(f"eth0.{fqdn}", "A")] = address
            out[(address, "PTR")] = fqdn
    return out


def gateway(lab: Lab, index: int) -> str:
    m = controllerproc.machine(lab, lab.vm(index)["mac"])
    assert m is not None
    return str(policy_of(lab).domains[m["domain"]].gateway)


def answers(
    ns: str, proto_server: str, want: dict[tuple[str, str], str], **kw: Any
) -> dict[tuple[str, str], tuple[str | None, tuple[str, ...], str | None]]:
    queries = [f"{proto_server}:{name}:{rtype}" for name, rtype in want]
    got = dnsprobe.run(ns, queries, **kw)
    return {k: (a.rcode, a.answers, a.error) for k, a in zip(want, got, strict=True)}


def assert_all_answer(got: dict, want: dict[tuple[str, str], str], where: str) -> None:
    wrong = {k: v for k, v in got.items() if v != ("NOERROR", (want[k],), None)}
    assert not wrong, f"{where}: {wrong}"


def test_every_name_and_its_reverse_answers_from_dom0_and_every_vm(
    dns_lab: tuple[Lab, list[Capture]],
) -> None:
    lab, _ = dns_lab
    container.add(lab, 1, "app")
    wait_for(lambda: ("app." + machines_by_vm(lab, 1)["name"], "A") in expected(lab), 10,
             "app under web1 in dom0 status")  # fmt: skip
    want = expected(lab)
    assert len(want) == 3 * (VMS + 1), want  # three VMs and one container, three names each

    def all_answer(ns: str, proto_server: str, **kw: Any) -> bool:
        got = answers(ns, proto_server, want, **kw)
        return all(v == ("NOERROR", (want[k],), None) for k, v in got.items())

    # (the container's names follow its agent's report: within a moment)
    wait_for(lambda: all_answer(lab.dom0_ns, "udp:127.0.0.1"), 10, "every name from dom0")
    for i in range(1, VMS + 1):
        ns = lab.vm_ns(i)
        assert_all_answer(answers(ns, f"tls:{gateway(lab, i)}", want, ca=ca(lab)), want,
                          f"vm{i} over TLS")  # fmt: skip
        assert_all_answer(answers(ns, "udp:127.0.0.1", want), want, f"vm{i} through its stub")
        conf = (lab.root / "vms" / f"vm{i}" / "sysroot" / "etc" / "resolv.conf").read_text()
        assert "nameserver 127.0.0.1" in conf, conf
    # the container asks its VM's stub on its bridge (the prefix's first address)
    row = next(c for c in machines_by_vm(lab, 1)["containers"] if c["name"] == "app")
    address = str(ip_network(machines_by_vm(lab, 1)["containers_prefix"])[1])
    got = answers(container.namespace(lab, 1, "app"), f"udp:{address}", want)
    assert_all_answer(got, want, "the container through its VM's stub")
    assert want[(row["fqdn"], "A")] == row["address"]


def machines_by_vm(lab: Lab, index: int) -> dict[str, Any]:
    m = controllerproc.machine(lab, lab.vm(index)["mac"])
    assert m is not None, f"vm{index} not in dom0 status"
    return m


def test_a_name_outside_the_site_resolves_through_the_tunnel(
    dns_lab: tuple[Lab, list[Capture]],
) -> None:
    lab, _ = dns_lab
    got = dnsprobe.run(lab.vm_ns(2), ["udp:127.0.0.1:echo.lab.example"])[0]
    assert (got.rcode, got.answers) == ("NOERROR", (topology.ECHO_ADDRESS,)), got
    # a name asked only now, so that its arrival upstream is this question's
    fresh = f"q{secrets.token_hex(4)}.lab.example"
    got = dnsprobe.run(lab.vm_ns(1), [f"tls:{gateway(lab, 1)}:{fresh}"], ca=ca(lab))[0]
    assert got.rcode == "NXDOMAIN", got  # (the upstream's answer for a name it lacks)
    seen = [q.client for q in resolver.queries(lab) if q.name == f"{fresh}."]
    assert seen == [topology.VPN_WAN], seen


def test_port_53_answers_only_a_domain_whose_policy_says_plain(
    dns_lab: tuple[Lab, list[Capture]],
) -> None:
    lab, _ = dns_lab
    p = policy_of(lab)
    assert p.domains["x"].dns == "tls" and p.domains["y"].dns == "plain"
    # vm1 is x's, vm2 y's (the lab's rules: odd and even MACs)
    x_gw, y_gw = gateway(lab, 1), gateway(lab, 2)
    name = machines_by_vm(lab, 1)["name"]
    for proto in ("udp", "tcp"):
        blocked = dnsprobe.run(lab.vm_ns(1), [f"{proto}:{x_gw}:{name}"], timeout=TIMEOUT)[0]
        assert blocked.error == "timeout", blocked  # a clean block: no answer at all
        control = dnsprobe.run(lab.vm_ns(2), [f"{proto}:{y_gw}:{name}"], timeout=TIMEOUT)[0]
        assert (control.rcode, control.error) == ("NOERROR", None), control


def dns_status(lab: Lab) -> dict[str, Any]:
    dns = controllerproc.reply(lab)["dns"]
    assert isinstance(dns, dict)
    return dns


def test_a_killed_unbound_comes_back_and_answers_the_same_at_once(
    dns_lab: tuple[Lab, list[Capture]],
) -> None:
    lab, _ = dns_lab
    want = expected(lab)
    before = dns_status(lab)
    pid = int(before["pid"])
    # (the lab's controller started it: it runs on this lab's state directory)
    assert str(lab.state_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: dns_status(lab)["pid"] not in (None, pid) and dns_status(lab)["running"],
             15, "the controller starting unbound again")  # fmt: skip
    # its first answers are the zones on disk: no sync is waited for
    first = answers(lab.vm_ns(3), f"tls:{gateway(lab, 3)}", want, ca=ca(lab))
    if any(v[2] is not None for v in first.values()):  # (it may still be binding)
        wait_for(lambda: all(v[2] is None for v in
                             answers(lab.dom0_ns, "udp:127.0.0.1", want).values()),
                 5, "the new unbound listening")  # fmt: skip
        first = answers(lab.vm_ns(3), f"tls:{gateway(lab, 3)}", want, ca=ca(lab))
    assert_all_answer(first, want, "vm3 after unbound restarted")
    assert dns_status(lab)["restarts"] == before["restarts"] + 1


def test_a_restarted_controller_adopts_unbound_and_answers_the_same(
    dns_lab: tuple[Lab, list[Capture]],
) -> None:
    lab, _ = dns_lab
    want = expected(lab)
    pid = dns_status(lab)["pid"]
    controllerproc.stop(lab)
    # dom0's data plane outlives its controller: names still answer
    assert_all_answer(answers(lab.vm_ns(1), "udp:127.0.0.1", want), want, "controller down")
    controllerproc.start(lab)
    after = dns_status(lab)
    assert after["pid"] == pid and after["running"], after  # adopted, not started again
    assert_all_answer(answers(lab.vm_ns(2), f"tls:{gateway(lab, 2)}", want, ca=ca(lab)), want,
                      "after the controller restarted")  # fmt: skip
    log = lab.controller_log.read_text()
    assert f"adopted running unbound pid {pid}" in log


def clear_dns(p: Packet, suffix: bytes) -> bool:
    """A DNS message in the clear: on port 53, or any packet that carries a
    site name as DNS encodes it (what a tunnel or TLS would hide)."""
    if suffix in p.data:
        return True
    if p.protocol != ETH_P_IP:
        return False
    ip = p.decode()
    layer = ip.payload
    return hasattr(layer, "dport") and 53 in (layer.sport, layer.dport)


def test_no_clear_text_dns_left_any_enrolled_vm(dns_lab: tuple[Lab, list[Capture]]) -> None:
    """Last in the module: its captures ran through every test above."""
    lab, captures = dns_lab
    tld = policy_of(lab).tld.encode()
    suffix = b"".join(bytes([len(label)]) + label for label in tld.split(b".")) + b"\0"
    # control: a plain question sent from vm1's link is seen (dom0 drops it)
    control = dnsprobe.run(lab.vm_ns(1), [f"udp:{lab_hub_gateway(lab)}:web1.x.internal"],
                           timeout=TIMEOUT)[0]  # fmt: skip
    assert control.error == "timeout", control
    packets = {i + 1: c.stop() for i, c in enumerate(captures)}
    from_vm = {i: [p for p in ps if not p.outgoing] for i, ps in packets.items()}
    assert all(from_vm.values()), "a capture saw nothing from its VM"
    leaks = {i: [p for p in ps if clear_dns(p, suffix)] for i, ps in from_vm.items()}
    shown = {i: [p.summary() for p in ps] for i, ps in leaks.items()}
    assert len(leaks[1]) == 1, shown  # the control, and only it
    assert leaks[1][0].addresses() == (vm_link_address(lab, 1), lab_hub_gateway(lab)), shown
    assert leaks[1][0].decode().payload.dport == 53, shown
    assert leaks[2] == [] and leaks[3] == [], shown


def vm_link_address(lab: Lab, index: int) -> str:
    return str(machines_by_vm(lab, index)["underlay"])


def lab_hub_gateway(lab: Lab) -> str:
    hub = policy_of(lab).hub
    assert hub is not None
    return str(hub.gateway)
