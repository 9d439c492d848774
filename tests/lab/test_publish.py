"""Published ports against real packets (tests/data/policies/publish-lab.toml).

The lab's VPN provider (NAME-vpn) forwards every TCP port of its public
address to dom0's tunnel address, as a provider's port forward does, so
that dom0 alone decides what of www1 the internet reaches. The internet is
NAME-wan, from 203.0.113.10 (an address off the WAN's subnet, as the
internet is). www1 serves tcp/22, 80 and 443 (controller/lab/ports.py).

- through the uplink, the published tcp/443 answers and www1's other ports
  do not (a clean block), while no packet other than the tunnel's leaves
  dom0's WAN; the control: publishing tcp/22 opens it the same way;
- hairpin: a machine of a domain with the internet reaches the published
  port at the public (tunnel) address; one of a closed domain does not;
- on the WAN: nothing gets in until the policy publishes a port there
  (`via = "wan"`), and then that port only;
- the fake data plane, built from the sets the store implies, answers each
  of the uplink and hairpin probes as the kernel did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.lab import controllerproc, netns, ports, processes, topology, uplink
from controller.lab.capture import Capture, classify_wan
from controller.lab.rundir import Lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "tests" / "data" / "policies" / "publish-lab.toml"
VMS = {1: "52:54:00:a1:00:01", 2: "52:54:00:b1:00:01", 3: "52:54:00:c1:00:01"}
PC, WWW, CLOSED = 1, 2, 3
PUBLIC = topology.VPN_WAN  # the VPN provider's address: what the internet dials
TUNNEL = uplink.DOM0_TUNNEL.split("/")[0]
INTERNET_SOURCE = topology.ECHO_ADDRESS  # on NAME-wan's lo
TIMEOUT = 2.0
PROVIDER_FORWARD = f"""
table ip labfwd {{
  chain pre {{ type nat hook prerouting priority dstnat; policy accept;
    iifname "{topology.VPN_WAN_IF}" ip daddr {PUBLIC} meta l4proto tcp dnat to {TUNNEL}
  }}
}}
"""


@pytest.fixture(scope="module")
def publish_lab() -> Any:
    from tests.lab.conftest import _need_root, unique_lab_name

    _need_root()
    from controller.lab import build, teardown

    name = unique_lab_name()
    server: ports.Server | None = None
    try:
        lab = build.create(name, len(VMS), policy=POLICY, macs=VMS)
        netns.run(lab.vpn_ns, ["nft", "-f", "-"], input=PROVIDER_FORWARD)
        # the internet's connections to the provider come from off the WAN's subnet
        netns.run(
            lab.wan_ns,
            ["ip", "route", "add", f"{PUBLIC}/32", "dev", topology.WAN_BRIDGE,
             "src", INTERNET_SOURCE],
        )  # fmt: skip
        echo = lab.process(f"echo@vm{WWW}")
        if echo is not None:  # (it holds tcp/80)
            processes.stop([echo])
            lab.forget_process(f"echo@vm{WWW}")
        server = ports.serve(lab.vm_ns(WWW), (22, 80, 443))
        yield lab
    finally:
        if server is not None:
            server.stop()
        teardown.down(name)
        assert not teardown.exists(name), f"lab {name} not fully torn down"


def probe(ns: str, *targets: str) -> list[ports.PortResult]:
    return ports.probe(ns, targets, timeout=TIMEOUT)


def problems(results: list[ports.PortResult], want: tuple[bool, ...]) -> list[str]:
    out = []
    for r, ok in zip(results, want, strict=True):
        if ok and not r.ok:
            out.append(f"{r.describe()} (expected an answer)")
        elif not ok and (r.ok or r.kind != "timeout"):
            out.append(f"{r.describe()} (expected a clean block)")
    return out


def test_through_the_uplink_only_the_published_port(publish_lab: Lab) -> None:
    lab = publish_lab
    cap = Capture(lab, lab.wan_ns, topology.WAN_PORT_DOM0, tag="publish").start()
    try:
        got = probe(lab.wan_ns, f"{PUBLIC}:tcp/443", f"{PUBLIC}:tcp/22", f"{PUBLIC}:tcp/80")
    finally:
        seen = classify_wan(cap.stop(), (topology.VPN_WAN, uplink.SERVER_PORT))
    assert not problems(got, (True, False, False)), problems(got, (True, False, False))
    assert not seen.leaks, seen.describe_leaks()
    assert seen.wireguard[4] > 0  # (the connection did cross the tunnel)


def test_hairpin_from_a_domain_with_the_internet(publish_lab: Lab) -> None:
    lab = publish_lab
    (pc,) = probe(lab.vm_ns(PC), f"{TUNNEL}:tcp/443")
    (closed,) = probe(lab.vm_ns(CLOSED), f"{TUNNEL}:tcp/443")
    assert not problems([pc, closed], (True, False)), problems([pc, closed], (True, False))


def test_the_fake_data_plane_agrees(publish_lab: Lab) -> None:
    """The in-memory data plane (destination NAT, br_netfilter's bridged
    hairpin) gives the same answers as these real probes, from the sets the
    controller's store implies."""
    from controller.core.desired import machine_state, policy_state
    from controller.core.plan import flatten
    from controller.drivers.nft.fake import FakeDataPlane, Packet
    from controller.policy.load import load_policy
    from controller.store import Store

    lab = publish_lab
    policy = load_policy(lab.policy_path)
    store = Store(lab.state_dir, readonly=True)
    try:
        allocs = {a.mac: a for a in store.allocations()}
    finally:
        store.close()
    flat = flatten(policy_state(policy, []), [machine_state(policy, a) for a in allocs.values()])
    assert flat.shape is not None
    fake = FakeDataPlane(
        flat.shape,
        flat.sets,
        [*flat.addresses, (topology.DOM0_WAN_IF, f"{topology.DOM0_WAN}/{topology.WAN_PREFIX}")],
        killswitch=flat.killswitch,
        bridge_mac=topology.BRIDGE_MAC,
    )
    www, pc, closed = (allocs[VMS[i]] for i in (WWW, PC, CLOSED))

    def inbound(port: int) -> Packet:
        return Packet("wg0", src=INTERNET_SOURCE, dst=TUNNEL, proto="tcp", sport=40000, dport=port)

    def hairpin(a: Any) -> Packet:
        return Packet(
            a.port, a.mac, None, src=a.address, dst=TUNNEL, proto="tcp", sport=40000, dport=443
        )

    cases = [(inbound(443), True), (inbound(22), False), (inbound(80), False)]
    cases += [(hairpin(pc), True), (hairpin(closed), False)]
    real = probe(lab.wan_ns, f"{PUBLIC}:tcp/443", f"{PUBLIC}:tcp/22", f"{PUBLIC}:tcp/80")
    real += probe(lab.vm_ns(PC), f"{TUNNEL}:tcp/443") + probe(
        lab.vm_ns(CLOSED), f"{TUNNEL}:tcp/443"
    )
    for (packet, want), r in zip(cases, real, strict=True):
        assert fake.verdict(packet).reaches(www.port) is want is r.ok, (packet, r.describe())


def test_control_publishing_another_port_opens_it_then_the_wan(publish_lab: Lab) -> None:
    """Last in the module: it changes the lab's policy."""
    lab = publish_lab
    wan_before = probe(lab.wan_ns, f"{topology.DOM0_WAN}:tcp/80")
    assert not problems(wan_before, (False,)), problems(wan_before, (False,))
    text = lab.policy_path.read_text()
    more = text.replace(
        '[[publish]]\nmachine = "www1.dmz"\nport = "tcp/443"\n',
        '[[publish]]\nmachine = "www1.dmz"\nport = "tcp/443"\n\n'
        '[[publish]]\nmachine = "www1.dmz"\nport = "tcp/22"\n\n'
        '[[publish]]\nmachine = "www1.dmz"\nport = "tcp/80"\nvia = "wan"\n',
    )
    assert more != text
    assert controllerproc.reload(lab, more) == "applying"
    got = probe(lab.wan_ns, f"{PUBLIC}:tcp/22", f"{PUBLIC}:tcp/443", f"{PUBLIC}:tcp/80")
    assert not problems(got, (True, True, False)), problems(got, (True, True, False))
    # on the WAN: its own port only (tcp/80 there is www1's 80; 443 is not published there)
    wan = probe(lab.wan_ns, f"{topology.DOM0_WAN}:tcp/80", f"{topology.DOM0_WAN}:tcp/443")
    assert not problems(wan, (True, False)), problems(wan, (True, False))
