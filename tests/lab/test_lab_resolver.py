"""The lab's resolver beyond the VPN (controller/lab/resolver.py): DNS over
TLS on the lab internet, its certificate, its query log, and `lab up` wiring.

Real namespaces (root only), no controller: NAME-vpn stands in for dom0's
tunnel, since the VPN masquerades dom0's traffic to its own 198.51.100.3.
"""

from __future__ import annotations

import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.lab import build, dnsprobe, processes, resolver, teardown, topology
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

ECHO_NAME = "echo.lab.example"
ADDRESS = resolver.RESOLVER_ADDRESS


def ask(ns: str, query: str, *, ca: Path | None = None, timeout: float = 2.0) -> dnsprobe.Answer:
    return dnsprobe.run(ns, [query], ca=str(ca) if ca else None, tls_name=resolver.RESOLVER_NAME,
                        timeout=timeout)[0]  # fmt: skip


def test_query_log_lines_parse() -> None:
    log = (
        "[1700000000] unbound[42:0] notice: init module 0: iterator\n"
        "[1700000000] unbound[42:0] info: start of service (unbound 1.17.1).\n"
        "[1700000001] unbound[42:0] info: 198.51.100.3 echo.lab.example. A IN\n"
        "[1700000002] unbound[42:0] info: 198.51.100.2 txt.lab.example. TXT IN\n"
    )
    assert resolver.parse_queries(log) == [
        resolver.Query("198.51.100.3", "echo.lab.example.", "A"),
        resolver.Query("198.51.100.2", "txt.lab.example.", "TXT"),
    ]


def test_lab_up_runs_the_resolver_beyond_the_vpn(
    make_lab: Callable[..., Any], tmp_path: Path
) -> None:
    lab: Lab = make_lab(1, policy=build.DEFAULT_POLICY)

    # The policy names the resolver and its CA; the CA is public, the key is not.
    dns = tomllib.loads(lab.policy_path.read_text())["dns"]
    assert dns == {
        "upstream": [f"{resolver.RESOLVER_ADDRESS}@853#{resolver.RESOLVER_NAME}"],
        "upstream_ca": str(resolver.ca_path(lab)),
    }
    where = resolver.directory(lab)
    assert stat.S_IMODE((where / "ca.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((where / "server.key").stat().st_mode) == 0o600
    proc = lab.process(resolver.ROLE)
    assert proc is not None and processes.is_running(proc)

    # From the VPN provider: over TLS, verified against the lab CA by name.
    got = ask(lab.vpn_ns, f"tls:{ADDRESS}:{ECHO_NAME}", ca=resolver.ca_path(lab))
    assert got.error is None, got.error
    assert (got.rcode, got.answers) == ("NOERROR", (topology.ECHO_ADDRESS,))
    seen = resolver.Query(topology.VPN_WAN, f"{ECHO_NAME}.", "A")
    wait_for(lambda: seen in resolver.queries(lab), 5.0, f"{seen} in {resolver.log_path(lab)}")

    # Its zone: local data, NXDOMAIN under lab.example, everything else refused.
    ca = resolver.ca_path(lab)
    txt = ask(lab.vpn_ns, f"tls:{ADDRESS}:txt.lab.example:TXT", ca=ca)
    assert (txt.rcode, txt.answers) == ("NOERROR", ('"beyond the tunnel"',))
    assert ask(lab.vpn_ns, f"tls:{ADDRESS}:nope.lab.example", ca=ca).rcode == "NXDOMAIN"
    assert ask(lab.vpn_ns, f"tls:{ADDRESS}:example.com", ca=ca).rcode == "REFUSED"

    # A client that trusts another CA does not get through the handshake.
    other = tmp_path / "other"
    resolver.make_certificates(other)
    forged = ask(lab.vpn_ns, f"tls:{ADDRESS}:{ECHO_NAME}", ca=other / "ca.pem")
    assert forged.error is not None and forged.error.startswith("tls"), forged

    # TLS only: plain DNS gets no answer, on port 53 or on the TLS port.
    for port in (53, resolver.RESOLVER_PORT):
        plain = ask(lab.vpn_ns, f"udp:{ADDRESS}:{port}:{ECHO_NAME}", timeout=1.0)
        assert plain.error == "timeout" and plain.rcode is None, (port, plain)

    # `lab down` stops it by its record.
    teardown.down(lab)
    assert not processes.is_running(proc)


def test_a_policy_with_its_own_dns_gets_no_lab_resolver(
    make_lab: Callable[..., Any], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    own = '\n[dns]\nupstream = ["203.0.113.99@853#dns.example.net"]\n'
    policy.write_text(build.DEFAULT_POLICY.read_text() + own)
    lab: Lab = make_lab(1, policy=policy)
    text = lab.policy_path.read_text()
    assert tomllib.loads(text)["dns"] == {"upstream": ["203.0.113.99@853#dns.example.net"]}
    assert "uplink" in tomllib.loads(text)
    assert lab.process(resolver.ROLE) is None
    assert not resolver.directory(lab).exists()
