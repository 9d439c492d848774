"""The local control socket (`STATE/control.sock`, mode 0600) and `dom0 status`.

Protocol: one JSON object per line in, one JSON object per line out, then
the server closes. Requests are bounded (4 KiB) and validated.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import trio

MAX_REQUEST = 4096
SOCKET_NAME = "control.sock"

Handler = Callable[[dict], dict]


async def serve(
    state_dir: Path,
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    path = state_dir / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()

    async def client(stream: trio.SocketStream) -> None:
        await _client(stream, handler)

    try:
        await trio.serve_listeners(client, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _client(stream: trio.abc.Stream, handler: Handler) -> None:
    async with stream:
        buf = b""
        with trio.move_on_after(5):
            while b"\n" not in buf and len(buf) <= MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        if len(line) > MAX_REQUEST:
            reply = {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        else:
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ValueError("expected an object with a string 'cmd'")
                reply = handler(request)
            except ValueError as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


def request(state_dir: str | Path, cmd: str, timeout: float = 5.0, **args: object) -> dict:
    """Blocking client (for the CLI)."""
    path = Path(state_dir) / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def unreachable(state_dir: str | Path, e: Exception) -> str:
    """Why a request to the control socket got no answer, in an operator's words."""
    path = Path(state_dir) / SOCKET_NAME
    if isinstance(e, FileNotFoundError | ConnectionRefusedError):
        return f"no controller is running with state {state_dir} ({path} does not answer)"
    if isinstance(e, PermissionError):
        return f"{path}: permission denied (the control socket is root's: run as root)"
    if isinstance(e, OSError):
        return f"{path}: {e.strerror or e}"
    return f"{path}: not a dom0 controller's answer ({e})"


def failed(prog: str, error: str, *, as_json: bool) -> int:
    """A request that failed at run time: one line on stderr, and with --json
    the same as an object on stdout, so that a script always gets JSON."""
    if as_json:
        print(json.dumps({"ok": False, "error": error}))
    print(f"{prog}: {error}", file=sys.stderr)
    return 1


def _ask(state_dir: str, *cmds: str) -> list[dict] | str:
    """The replies to `cmds`, or why there are none."""
    try:
        return [request(state_dir, cmd) for cmd in cmds]
    except (OSError, ValueError) as e:
        return unreachable(state_dir, e)


def status_command(state_dir: str, *, as_json: bool = False) -> int:
    replies = _ask(state_dir, "status")
    if isinstance(replies, str):
        return failed("dom0 status", replies, as_json=as_json)
    (reply,) = replies
    if as_json:
        print(json.dumps(reply, indent=2))
    else:
        from controller.api.status import format_status

        print(format_status(reply))
    return 0 if reply.get("ok", True) else 1


def ask_command(state_dir: str, cmd: str, *, as_json: bool = False) -> int:
    """`dom0 reload` / `dom0 resync`: queue the request; the generation in
    `dom0 status --json` passes the one printed here once it is done."""
    replies = _ask(state_dir, "status", cmd)
    if isinstance(replies, str):
        return failed(f"dom0 {cmd}", replies, as_json=as_json)
    status, reply = replies
    reply = {**reply, "generation_before": status.get("generation")}
    if as_json:
        print(json.dumps(reply))
    elif reply.get("ok"):
        print(f"{cmd} queued (generation {reply['generation_before']}; see dom0 status)")
    else:
        print(f"dom0 {cmd}: {reply.get('error')}", file=sys.stderr)
    return 0 if reply.get("ok") else 1


def renew_command(state_dir: str, name: str, *, as_json: bool = False) -> int:
    """`dom0 machine renew NAME`: the controller flaps the carrier of the
    machine's port, so that a DHCP client that watches carrier re-acquires."""
    try:
        reply = request(state_dir, "renew", name=name)
    except (OSError, ValueError) as e:
        return failed("dom0 machine renew", unreachable(state_dir, e), as_json=as_json)
    if as_json:
        print(json.dumps(reply))
    elif reply.get("ok"):
        print(f"{reply['name']}: carrier of port {reply['port']} flapped; it re-acquires now")
    else:
        print(f"dom0 machine renew: {reply.get('error')}", file=sys.stderr)
    if reply.get("ok"):
        return 0
    return 2 if reply.get("usage") else 1


def remap_command(state_dir: str, machine: str | None, *, as_json: bool = False) -> int:
    """`dom0 remap now [--machine NAME]`: new addresses now, the old ones kept
    through the grace (the running controller does it)."""
    try:
        reply = request(state_dir, "remap", name=machine)
    except (OSError, ValueError) as e:
        return failed("dom0 remap now", unreachable(state_dir, e), as_json=as_json)
    if as_json:
        print(json.dumps(reply))
    elif reply.get("ok"):
        moved = reply.get("moved", [])
        if not moved:
            print("nothing to remap")
        for m in moved:
            print(f"{m['name']}: {m['from']} -> {m['to']} ({m['from']} kept until "
                  f"{_clock(m['until'])})")  # fmt: skip
    else:
        print(f"dom0 remap now: {reply.get('error')}", file=sys.stderr)
    if reply.get("ok"):
        return 0
    return 2 if reply.get("usage") else 1


def _clock(t: object) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(int(t), UTC).isoformat() if isinstance(t, int) else "?"
