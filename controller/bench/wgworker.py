"""The in-namespace half of `dom0 bench wireguard` (started by it, driven
over stdin/stdout with one JSON object per line).

    hub ROLE:    a hub device (dom0's driver, wireguard-go) + a UDP echo on
                 its tunnel address; commands: fill N, add, remove, key
    client ROLE: a device dialing the hub; commands: setup, probe
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.wireguard import Peer, detect, keys

HUB_IF = "benchhub"
CLIENT_IF = "benchwg"
HUB_TUNNEL = "10.99.0.1"
CLIENT_TUNNEL = "10.99.0.2"
PORT = 51821


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _echo(address: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, 7))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)


def _random_peer(i: int) -> Peer:
    return Peer(keys.generate_private(), (f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32",))


def hub(state: Path) -> None:
    wg = detect(state, prefer="userspace")
    wg.ensure(HUB_IF)
    private = keys.PrivateKey.generate()
    wg.configure(HUB_IF, private_key=private, listen_port=PORT)
    _ip("address", "replace", f"{HUB_TUNNEL}/32", "dev", HUB_IF)
    _ip("link", "set", HUB_IF, "up")
    _ip("route", "replace", f"{CLIENT_TUNNEL}/32", "dev", HUB_IF)
    threading.Thread(target=_echo, args=(HUB_TUNNEL,), daemon=True).start()
    reply({"public_key": keys.to_base64(private.public)})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "fill":  # exactly N peers present (random ones)
            wg.replace_peers(HUB_IF, [_random_peer(i) for i in range(cmd["n"])], reset=True)
            reply({"peers": len(wg.get(HUB_IF).peers)})
        elif cmd["op"] == "add":
            peer = Peer(base64.b64decode(cmd["key"]), (cmd["allowed"],))
            t0 = time.perf_counter()
            wg.set_peers(HUB_IF, upsert=[peer])
            reply({"seconds": time.perf_counter() - t0})
        elif cmd["op"] == "remove":
            wg.set_peers(HUB_IF, remove=[base64.b64decode(cmd["key"])])
            reply({})
        elif cmd["op"] == "quit":
            wg.remove(HUB_IF)
            reply({})
            return


def client(state: Path) -> None:
    wg = detect(state, prefer="userspace")
    wg.ensure(CLIENT_IF)
    _ip("address", "replace", f"{CLIENT_TUNNEL}/32", "dev", CLIENT_IF)
    _ip("link", "set", CLIENT_IF, "up")
    _ip("route", "replace", f"{HUB_TUNNEL}/32", "dev", CLIENT_IF)
    reply({})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((CLIENT_TUNNEL, 0))
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "setup":  # a fresh identity: the hub has never seen this peer
            private = keys.PrivateKey.generate()
            wg.configure(CLIENT_IF, private_key=private)
            wg.replace_peers(
                CLIENT_IF,
                [
                    Peer(
                        base64.b64decode(cmd["hub"]),
                        (f"{HUB_TUNNEL}/32",),
                        endpoint=cmd["endpoint"],
                    )
                ],
                reset=True,
            )
            reply({"public_key": keys.to_base64(private.public)})
        elif cmd["op"] == "probe":  # first packet through: handshake included
            sock.settimeout(0.05)
            t0 = time.perf_counter()
            deadline = t0 + 10
            got = None
            while got is None and time.perf_counter() < deadline:
                sock.sendto(b"x", (HUB_TUNNEL, 7))
                try:
                    got = sock.recv(16)
                except TimeoutError:
                    continue
            reply({"seconds": time.perf_counter() - t0 if got else None})
        elif cmd["op"] == "quit":
            wg.remove(CLIENT_IF)
            reply({})
            return


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    role, state = sys.argv[1], Path(sys.argv[2])
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ.setdefault("LOG_LEVEL", "error")
    (hub if role == "hub" else client)(state)
