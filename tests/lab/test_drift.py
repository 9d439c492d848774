"""Drift is repaired: the periodic resync (and the kill switch's own, more
frequent check) finds what was changed behind the controller's back in each
kind of state it owns, puts it back, and counts the repair; `dom0 plan`, run
after the tampering, shows exactly the repair that the next resync makes.

Real namespaces, nftables, dnsmasq's reservation files, addresses and
wireguard-go, as in the other lab tests; the tampering is what an operator's
slip (or a tool that flushes tables) would do, done in dom0's namespace."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from controller import control
from controller.lab import controllerproc, dhcpclient, netns, processes, vm
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
BRIDGE_POLICY = ROOT / "policies" / "lab-bridge.toml"
PY = sys.executable


def status(lab: Lab) -> dict[str, Any]:
    return control.request(lab.state_dir, "status")


def restart_with_resync(lab: Lab, seconds: float) -> None:
    controllerproc.stop(lab)
    argv = [*controllerproc.run_argv(lab), "--resync", str(seconds)]
    controllerproc.start(lab, argv=argv)
    wait_for(
        lambda: all(m["confirmed"] for m in status(lab)["machines"]), what="machines established"
    )


def nft(lab: Lab, *args: str) -> str:
    return netns.run(lab.dom0_ns, ["nft", *args]).stdout


def last_rule_handle(lab: Lab, family: str, table: str, chain: str) -> str:
    out = nft(lab, "-a", "list", "chain", family, table, chain)
    return re.findall(r"# handle (\d+)", out)[-1]


def host_file(lab: Lab, mac: str) -> Path:
    return lab.state_dir / "dhcp" / "hosts" / mac.replace(":", "-")


def addresses(lab: Lab) -> str:
    return netns.run(lab.dom0_ns, ["ip", "-br", "addr", "show", "dev", "virbr0"]).stdout


def repaired(lab: Lab, before: int, check: Any, what: str, timeout: float = 20.0) -> None:
    """The controller counts a repair and the state is back."""

    def done() -> bool:
        return status(lab)["stats"]["repairs"] > before and bool(check())

    try:
        wait_for(done, timeout=timeout, what=f"the resync to repair: {what}")
    except Exception as e:
        stats = status(lab)["stats"]
        raise AssertionError(
            f"{e}: repairs {before} -> {stats['repairs']}, state back: {bool(check())}, "
            f"last repair {stats['last_repair'][:3]}, last error {stats['last_error']}"
        ) from None


def test_every_kind_of_tampering_is_repaired_by_the_next_resync(make_lab: Any) -> None:
    lab = make_lab(2, controller=True, policy=BRIDGE_POLICY)
    restart_with_resync(lab, 3)
    mac1 = vm.mac(lab, 1)
    reservation = host_file(lab, mac1).read_text()
    rules = nft(lab, "list", "chain", "inet", "dom0", "from_machines")
    cases = [
        (
            "a rule deleted",
            lambda: nft(
                lab, "delete", "rule", "inet", "dom0", "from_machines", "handle",
                last_rule_handle(lab, "inet", "dom0", "from_machines"),
            ),
            lambda: nft(lab, "list", "chain", "inet", "dom0", "from_machines").count("drop")
            == rules.count("drop"),
        ),
        (
            "a chain's policy changed",
            lambda: nft(lab, "chain", "inet", "dom0", "forward", "{ policy drop ; }"),
            lambda: "policy accept" in nft(lab, "list", "chain", "inet", "dom0", "forward"),
        ),
        (
            "a foreign element added",
            lambda: nft(
                lab, "add", "element", "bridge", "dom0", "port_mac",
                '{ "vnet9" . 02:00:00:00:00:09 }',
            ),
            lambda: "vnet9" not in nft(lab, "list", "set", "bridge", "dom0", "port_mac"),
        ),
        (
            "a reservation file removed",
            lambda: host_file(lab, mac1).unlink(),
            lambda: host_file(lab, mac1).exists()
            and host_file(lab, mac1).read_text() == reservation,
        ),
        (
            "a reservation file edited",
            lambda: host_file(lab, mac1).write_text(reservation.replace(",web", ",evil")),
            lambda: host_file(lab, mac1).read_text() == reservation,
        ),
        (
            "a gateway address removed",
            lambda: netns.run(lab.dom0_ns, ["ip", "addr", "del", "10.10.0.1/24", "dev", "virbr0"]),
            lambda: "10.10.0.1/24" in addresses(lab),
        ),
        (
            "the kill switch's chain flushed",
            lambda: nft(lab, "flush", "chain", "inet", "dom0_wan", "wan_out"),
            lambda: "drop" in nft(lab, "list", "chain", "inet", "dom0_wan", "wan_out"),
        ),
    ]  # fmt: skip
    for what, tamper, back in cases:
        before = status(lab)["stats"]["repairs"]
        tamper()
        assert not back(), f"the tampering did nothing: {what}"
        repaired(lab, before, back, what)
        assert vm.probe(lab, 1, vm.echo_url(), timeout=3).ok, f"no egress after: {what}"
    # and everything works as before
    assert vm.whoami(lab, 1) == "198.51.100.3"
    renewed = dhcpclient.renew(lab, 1)
    assert renewed is not None and renewed.ip == status_address(lab, mac1)


def status_address(lab: Lab, mac: str) -> str:
    return next(m["address"] for m in status(lab)["machines"] if m["mac"] == mac)


def hub_peers(lab: Lab) -> list[str]:
    code = (
        "import json,sys; from pathlib import Path;"
        "from common.wireguard.userspace import UserspaceWireGuard as W;"
        "wg=W(Path(sys.argv[1]));"
        "print(json.dumps([k.hex() for k in wg.get('hub0').peers]))"
    )
    out = netns.run(
        lab.dom0_ns,
        [PY, "-c", code, str(lab.state_dir / "wireguard")],
        env=processes.python_env(),
    ).stdout
    return list(json.loads(out))


def remove_hub_peer(lab: Lab, key_hex: str) -> None:
    code = (
        "import sys; from pathlib import Path;"
        "from common.wireguard.userspace import UserspaceWireGuard as W;"
        "W(Path(sys.argv[1])).set_peers('hub0', remove=[bytes.fromhex(sys.argv[2])])"
    )
    netns.run(
        lab.dom0_ns,
        [PY, "-c", code, str(lab.state_dir / "wireguard"), key_hex],
        env=processes.python_env(),
    )


def test_a_removed_hub_peer_is_put_back(make_lab: Any) -> None:
    lab = make_lab(2, controller=True)  # the hub lab
    restart_with_resync(lab, 3)
    peers = hub_peers(lab)
    assert len(peers) == 2
    before = status(lab)["stats"]["repairs"]
    remove_hub_peer(lab, peers[0])
    assert peers[0] not in hub_peers(lab)
    repaired(lab, before, lambda: sorted(hub_peers(lab)) == sorted(peers), "a hub peer removed")
    # the re-added peer has no session: the VM's WireGuard finds that out and
    # makes a new handshake (REKEY_TIMEOUT, up to ~15 s without replies)
    wait_for(
        lambda: vm.probe(lab, 1, vm.echo_url(), timeout=2).ok,
        timeout=40,
        what="vm1's tunnel to the hub to work again",
    )


def plan_json(lab: Lab) -> dict[str, Any]:
    out = netns.run(
        lab.dom0_ns,
        [PY, "-m", "controller.cli", "plan", "--policy", str(lab.policy_path),
         "--state", str(lab.state_dir), "--json"],
        env=processes.python_env(),
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def test_plan_after_tampering_shows_exactly_the_repair_the_resync_makes(make_lab: Any) -> None:
    lab = make_lab(2, controller=True, policy=BRIDGE_POLICY)
    restart_with_resync(lab, 3600)  # nothing repairs behind the test's back
    assert plan_json(lab)["empty"]
    mac1 = vm.mac(lab, 1)
    nft(lab, "add", "element", "bridge", "dom0", "port_mac", '{ "vnet9" . 02:00:00:00:00:09 }')
    host_file(lab, mac1).unlink()
    netns.run(lab.dom0_ns, ["ip", "addr", "del", "10.20.0.1/24", "dev", "virbr0"])
    planned = plan_json(lab)
    assert not planned["empty"] and not planned["allocations"], planned
    assert len(planned["lines"]) == 3, planned["lines"]
    before = status(lab)
    r = netns.run(
        lab.dom0_ns,
        [PY, "-m", "controller.cli", "resync", "--state", str(lab.state_dir)],
        env=processes.python_env(),
    )
    assert "resync queued" in r.stdout
    wait_for(
        lambda: status(lab)["stats"]["repairs"] > before["stats"]["repairs"], what="the repair"
    )
    assert status(lab)["stats"]["last_repair"] == planned["lines"]
    assert plan_json(lab)["empty"]
