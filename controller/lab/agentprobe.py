"""A stand-in agent for lab tests, run inside a VM's namespace: enroll with a
token, or connect with a certificate, and say what the controller answered.

    python -m controller.lab.agentprobe enroll --ca BUNDLE --server ADDR --token TOKEN --out DIR
    python -m controller.lab.agentprobe hello --ca BUNDLE --server ADDR --cert DIR/agent.pem

Prints one JSON object: {"ok": bool, "got": [message types], "error": reason}.
Blocking sockets and the standard library's ssl, with the one wire protocol
(common/wire.py) the real agent will use; the key is made here, inside the VM.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
from pathlib import Path

from common import wire

PORT = 8443
SERVER_NAME_PREFIX = "dom0."


def _key_and_csr() -> tuple[bytes, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _talk(sock: ssl.SSLSocket, first: wire.Message | None) -> tuple[list[str], str]:
    conn = wire.Connection("agent")
    sock.sendall(conn.send(wire.Hello(version=wire.PROTOCOL_VERSION, role="agent", agent=None)))
    got: list[str] = []
    sent = False
    while True:
        try:
            data = sock.recv(65536)
        except (ssl.SSLError, OSError) as failed:
            return got, f"{type(failed).__name__}: {failed}"
        try:
            conn.receive_data(data)
            while (event := conn.next_event()) not in (wire.NEED_DATA, wire.CLOSED):
                assert not isinstance(event, wire.Signal)
                got.append(type(event).TYPE)
                if isinstance(event, wire.Error):
                    return got, event.reason
                if isinstance(event, wire.Enrolled):
                    _talk.enrolled = event  # type: ignore[attr-defined]
                    return got, ""
                if isinstance(event, wire.Heartbeat):
                    return got, ""
        except wire.ProtocolError as err:
            return got, f"protocol: {err}"
        if not data:
            return got, "closed"
        if not sent and "hello" in got:
            sock.sendall(conn.send(first or wire.Heartbeat(seq=1)))
            sent = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="agentprobe")
    p.add_argument("action", choices=["enroll", "hello"])
    p.add_argument("--ca", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--name", default="dom0.internal", help="the server's name in its certificate")
    p.add_argument("--token")
    p.add_argument("--out")
    p.add_argument("--cert")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
    first: wire.Message | None = None
    key_pem = b""
    if args.action == "enroll":
        key_pem, csr = _key_and_csr()
        wg = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="
        first = wire.Enroll(token=args.token, csr_pem=csr, wg_public_key=wg)
    elif args.cert:
        ctx.load_cert_chain(args.cert)
    try:
        raw = socket.create_connection((args.server, PORT), timeout=args.timeout)
        with ctx.wrap_socket(raw, server_hostname=args.name) as sock:
            got, error = _talk(sock, first)
    except (OSError, ssl.SSLError) as e:
        got, error = [], f"{type(e).__name__}: {e}"
    enrolled = getattr(_talk, "enrolled", None)
    if enrolled is not None and args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "agent.pem").write_bytes(key_pem + enrolled.chain_pem.encode())
        (out / "agent.pem").chmod(0o600)
    ok = not error
    print(json.dumps({"ok": ok, "got": got, "error": error}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
