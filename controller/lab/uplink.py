"""The lab's WireGuard: the VPN provider's server, dom0's uplink to it, and
the VMs joining dom0's hub.

`lab up` generates both ends' keys of the uplink (the server's in RUNDIR/vpn,
dom0's where its policy says, in its state directory), starts the server in
NAME-vpn, and appends the matching [uplink] section to the lab's policy, so
that the controller comes up with its kill switch and its tunnel. Once the
controller has admitted a VM of a hub domain, the lab fetches that VM's
configuration with `dom0 wg export` and applies it inside the VM, as an
operator would by hand.
"""

from __future__ import annotations

import json
import sys

from common.wireguard import keys
from controller.lab import netns, processes, topology
from controller.lab.rundir import Lab

SERVER_PORT = 51820
SERVER_TUNNEL = "10.200.0.1/24"
DOM0_TUNNEL = "10.200.0.2/32"
# The provider's IPv6 in the tunnel, for a lab whose policy has IPv6 domains
SERVER_TUNNEL6 = "fd99:200::1/64"
DOM0_TUNNEL6 = "fd99:200::2/128"
UPLINK_KEY = "keys/uplink.key"  # relative to the controller's state directory


def _b64(key: bytes) -> str:
    return keys.to_base64(key)


def prepare(lab: Lab, ipv6: bool = False) -> str:
    """Both ends' keys; returns the [uplink] section for dom0's policy (with
    an IPv6 tunnel address too when its domains have IPv6: the uplink then
    carries their IPv6)."""
    vpn_dir = lab.root / "vpn"
    vpn_dir.mkdir(mode=0o700, exist_ok=True)
    server = keys.load_or_create(vpn_dir / "server.key")
    keys.load_or_create(lab.state_dir / UPLINK_KEY)
    return (
        "\n# Appended by `dom0 lab up`: dom0's uplink to the lab's VPN provider.\n"
        "[uplink]\n"
        'interface = "wg0"\n'
        f'endpoint = "{topology.VPN_WAN}:{SERVER_PORT}"\n'
        f'public_key = "{_b64(server.public)}"\n'
        f'private_key_file = "{UPLINK_KEY}"\n'
        + (
            f'addresses = ["{DOM0_TUNNEL}", "{DOM0_TUNNEL6}"]\n'
            if ipv6
            else f'addresses = ["{DOM0_TUNNEL}"]\n'
        )
    )


def start_server(lab: Lab) -> None:
    dom0 = keys.load(lab.state_dir / UPLINK_KEY)
    vpn_dir = lab.root / "vpn"
    netns.run(
        lab.vpn_ns,
        [
            sys.executable, "-m", "controller.lab.tunnel", "server",
            "--state", str(vpn_dir / "wireguard"), "--key", str(vpn_dir / "server.key"),
            "--listen", str(SERVER_PORT), "--address", f"{SERVER_TUNNEL},{SERVER_TUNNEL6}",
            "--peer", _b64(dom0.public), "--allowed", f"{DOM0_TUNNEL},{DOM0_TUNNEL6}",
            "--wan", topology.VPN_WAN_IF,
        ],
        env=processes.python_env(),
    )  # fmt: skip


def export(lab: Lab, mac: str) -> dict:
    """`dom0 wg export` for one machine, as JSON (config included)."""
    out = netns.run(
        lab.dom0_ns,
        [
            sys.executable, "-m", "controller.cli", "wg", "export", mac,
            "--state", str(lab.state_dir), "--json",
        ],
        env=processes.python_env(),
    )  # fmt: skip
    return json.loads(out.stdout)


def join_hub(lab: Lab, index: int, mac: str) -> dict:
    """Apply VM index's exported configuration inside it; returns the export."""
    info = export(lab, mac)
    vm_dir = lab.root / "vms" / f"vm{index}"
    vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = vm_dir / "wg0.conf"
    conf.touch(mode=0o600)
    conf.write_text(info["config"])
    netns.run(
        lab.vm_ns(index),
        [
            sys.executable, "-m", "controller.lab.tunnel", "client",
            "--state", str(vm_dir / "wireguard"), "--config", str(conf),
        ],
        env=processes.python_env(),
    )  # fmt: skip
    return info


def hub_machines(machines: list[dict]) -> dict[str, dict]:
    """MAC -> machine, for machines of hub domains (they have an underlay)."""
    return {m["mac"]: m for m in machines if m.get("underlay") and m["state"] == "admitted"}
