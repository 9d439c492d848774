"""`dom0 wg export NAME`: a wg-quick configuration for a machine of a hub
domain, so that it can join the hub by hand (agents will do this themselves
later, with keys they generate).

The controller holds the machine's tunnel key (made when the machine was
admitted, 0600 in the state directory) and has already added the peer; the
configuration carries the private key, so it is printed only to the
operator asking on the root-only control socket, never logged.
"""

from __future__ import annotations

import json
import sys

from controller import control


def render(
    *,
    fqdn: str,
    mac: str,
    private_key: str,
    address: str,
    hub_public_key: str,
    endpoint: str,
    mtu: int,
) -> str:
    return (
        f"# dom0 hub tunnel for {fqdn} (machine {mac})\n"
        "# wg-quick up ./FILE, or apply with `wg setconf` and `ip` by hand\n"
        "[Interface]\n"
        f"PrivateKey = {private_key}\n"
        f"Address = {address}/32\n"
        f"MTU = {mtu}\n"
        "\n"
        "[Peer]\n"
        "# dom0's hub: every destination goes through it\n"
        f"PublicKey = {hub_public_key}\n"
        f"Endpoint = {endpoint}\n"
        "AllowedIPs = 0.0.0.0/0\n"
        "PersistentKeepalive = 25\n"
    )


def parse(text: str) -> dict[str, dict[str, str]]:
    """A wg-quick file as {"Interface": {...}, "Peer": {...}} (one peer)."""
    out: dict[str, dict[str, str]] = {}
    section: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
        elif "=" in line and section is not None:
            key, value = line.split("=", 1)
            section[key.strip()] = value.strip()
        else:
            raise ValueError(f"not a wg-quick line: {raw!r}")
    return out


def export_command(state_dir: str, name: str, *, as_json: bool = False) -> int:
    try:
        reply = control.request(state_dir, "wg-export", name=name)
    except (OSError, ValueError) as e:
        return control.failed("dom0 wg export", control.unreachable(state_dir, e), as_json=as_json)
    if not reply.get("ok"):
        if as_json:
            print(json.dumps(reply))
        print(f"dom0 wg export: {reply.get('error')}", file=sys.stderr)
        return 2 if reply.get("usage") else 1
    if as_json:
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}, indent=2))
    else:
        sys.stdout.write(reply["config"])
    return 0
