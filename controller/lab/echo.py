"""The lab's "what is my IP" service: answers every GET with the client's address.

    python -m controller.lab.echo --bind 203.0.113.10 --port 80

The body is the source address the server saw plus a newline, so a lab test
can tell whether traffic left dom0 through the tunnel (198.51.100.3), outside
it (198.51.100.2), or was not translated at all (a VM address). Plain sockets
rather than http.server: starts in ~30 ms (the lab runs one per VM), no
access log, every connection bounded by a short timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import socketserver
import sys

READ_TIMEOUT = 5.0
MAX_REQUEST = 16 * 1024


def _client_address(raw: str) -> str:
    addr = ipaddress.ip_address(raw.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def response(method: str, client: str) -> bytes:
    """The full HTTP/1.0 response to a request line's method."""
    if method in ("GET", "HEAD"):
        status, body = "200 OK", f"{client}\n".encode()
    else:
        status, body = "405 Method Not Allowed", b"only GET\n"
    head = (
        f"HTTP/1.0 {status}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + body


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(READ_TIMEOUT)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            method = data.split(b" ", 1)[0].decode("ascii", "replace") if data else ""
            conn.sendall(response(method, _client_address(self.client_address[0])))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that resets or times out is normal in reachability tests.
        pass


def make_server(bind: str, port: int) -> socketserver.TCPServer:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET

    class Server(_Server):
        address_family = family

    return Server((bind, port), _Handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.lab.echo")
    parser.add_argument("--bind", default="0.0.0.0", metavar="ADDR")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument(
        "--ready-fd", type=int, metavar="FD", help="write 'ready' to FD once listening, close it"
    )
    args = parser.parse_args(argv)
    try:
        server = make_server(args.bind, args.port)
    except OSError as exc:
        print(f"echo: cannot listen on {args.bind}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    # SIGTERM from `lab down` ends serve_forever cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
    with server:
        server.serve_forever(poll_interval=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
