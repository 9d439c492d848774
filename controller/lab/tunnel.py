"""WireGuard ends in lab namespaces: the VPN provider's server, and VMs
applying the configuration `dom0 wg export` gives them.

Runs *inside* the namespace (`ip netns exec NS python -m controller.lab.tunnel
...`), using dom0's own WireGuard driver: wireguard-go in a private mount
namespace (so that every namespace can have its own `wg0`), started in its own
session so that it outlives this short command; `lab down` stops it with
everything else in the lab's namespaces.

    python -m controller.lab.tunnel server --state DIR --key FILE --listen PORT \\
        --address CIDR --peer PUBKEY --allowed CIDR[,CIDR] --wan IFNAME
    python -m controller.lab.tunnel client --state DIR --config FILE
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from common.wireguard import Peer, detect, keys
from controller.wgexport import parse

IFNAME = "wg0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def server(args: argparse.Namespace) -> None:
    """The VPN provider: terminates dom0's uplink and forwards it to the
    internet, masqueraded as its own WAN address."""
    wg = detect(Path(args.state), prefer="userspace")
    wg.ensure(IFNAME)
    wg.configure(IFNAME, private_key=keys.load_or_create(Path(args.key)), listen_port=args.listen)
    wg.replace_peers(
        IFNAME,
        [Peer(base64.b64decode(args.peer), tuple(args.allowed.split(",")))],
    )
    for address in args.address.split(","):
        _ip("address", "replace", address, "dev", IFNAME)
    _ip("link", "set", IFNAME, "up")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1")
    rules = (
        "table inet labvpn\n"
        "delete table inet labvpn\n"
        "table inet labvpn {\n"
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{args.wan}" masquerade\n'
        "  }\n"
        "}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=rules, check=True, capture_output=True, text=True)


def client(args: argparse.Namespace) -> None:
    """A VM joining dom0's hub with an exported configuration: every
    destination through the tunnel (its bridge address only reaches the hub)."""
    conf = parse(Path(args.config).read_text())
    iface, peer = conf["Interface"], conf["Peer"]
    wg = detect(Path(args.state), prefer="userspace")
    wg.ensure(IFNAME)
    wg.configure(IFNAME, private_key=keys.PrivateKey.from_base64(iface["PrivateKey"]))
    wg.replace_peers(
        IFNAME,
        [
            Peer(
                base64.b64decode(peer["PublicKey"]),
                tuple(a.strip() for a in peer["AllowedIPs"].split(",")),
                endpoint=peer["Endpoint"],
                persistent_keepalive=int(peer.get("PersistentKeepalive", "0")) or None,
            )
        ],
    )
    _ip("address", "replace", iface["Address"], "dev", IFNAME)
    _ip("link", "set", IFNAME, "mtu", iface.get("MTU", "1420"), "up")
    # The endpoint is on the bridge's subnet (a connected route), so the
    # default route can simply point into the tunnel.
    _ip("route", "replace", "default", "dev", IFNAME)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.lab.tunnel")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--state", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--listen", type=int, required=True)
    s.add_argument("--address", required=True)
    s.add_argument("--peer", required=True)
    s.add_argument("--allowed", required=True)
    s.add_argument("--wan", required=True)
    c = sub.add_parser("client")
    c.add_argument("--state", required=True)
    c.add_argument("--config", required=True)
    args = p.parse_args(argv)
    try:
        (server if args.role == "server" else client)(args)
    except (OSError, subprocess.CalledProcessError, KeyError, ValueError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        print(f"lab tunnel {args.role}: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
