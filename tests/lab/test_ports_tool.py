"""controller/lab/ports.py between two namespaces joined by a veth pair.

The server runs in one namespace and the prober in the other; nftables rules
go into the server's namespace only (or, for "denied", the prober's), in a
table of this test's own. Each kind of failure is checked against the cause
that should produce it, and every blocked probe has its control: the same
probe answered before the rule went in, and tcp/80 still answered after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from controller.lab import netns, ports, processes
from controller.lab.ports import PortResult
from controller.lab.rundir import LabError

pytestmark = pytest.mark.lab

MakeNetns = Callable[[str], str]
SERVER, CLIENT = "10.77.0.1", "10.77.0.2"
TCP = [22, 80, 443, 8000, 8001, 8002]
UDP = [53, 5353]
TIMEOUT = 1.0  # a drop waits this long: keep it short

DROP = """
table inet portstest {
    chain input {
        type filter hook input priority 0;
        tcp dport 443 drop
        udp dport 53 drop
        icmp type echo-request drop
    }
}
"""


@dataclass(frozen=True)
class Pair:
    server: str
    client: str


@pytest.fixture
def pair(make_netns: MakeNetns) -> Pair:
    server, client = make_netns("psrv"), make_netns("pcli")
    netns.ip_batch(
        [
            f"link add eth0 type veth peer name eth0 netns {client}",
            f"addr add {SERVER}/30 dev eth0",
            "link set eth0 up",
            "link set lo up",
        ],
        ns=server,
    )
    netns.ip_batch([f"addr add {CLIENT}/30 dev eth0", "link set eth0 up", "link set lo up"], client)
    return Pair(server, client)


@pytest.fixture
def served(pair: Pair) -> Iterator[ports.Server]:
    with ports.serve(pair.server, tcp=TCP, udp=UDP) as server:
        yield server


def nft(ns: str, ruleset: str) -> None:
    netns.run(ns, ["nft", "-f", "-"], input=ruleset)


def outcomes(results: Sequence[PortResult]) -> dict[str, str]:
    """target -> "ok" or the kind of failure (one dict compares a whole run)."""
    return {r.target: "ok" if r.ok else r.kind for r in results}


def explain(results: Sequence[PortResult]) -> str:
    return "\n".join(r.describe() for r in results)


def test_open_ports_answer_with_their_own_name(pair: Pair, served: ports.Server) -> None:
    targets = [f"{SERVER}:tcp/{p}" for p in TCP] + [f"{SERVER}:udp/{p}" for p in UDP]
    results = ports.probe(pair.client, [*targets, f"{SERVER}:icmp"], timeout=TIMEOUT)
    assert all(r.ok for r in results), explain(results)
    assert [r.answer for r in results[:-1]] == [t.split(":")[1] for t in targets]
    # a new namespace's ping_group_range allows no ping socket: the raw one answered
    assert results[-1].answer == f"echo reply from {SERVER} (raw socket)"
    assert {r.namespace for r in results} == {pair.client}


def test_closed_ports_refuse_and_a_missing_route_is_unreachable(
    pair: Pair, served: ports.Server
) -> None:
    results = ports.probe(
        pair.client,
        [
            f"{SERVER}:tcp/81",
            f"{SERVER}:udp/9",
            "10.99.0.1:tcp/80",
            "10.99.0.1:udp/80",
            "10.99.0.1:icmp",
            "10.77.0.3:icmp",  # the /30's broadcast address: EACCES, which is no firewall's
        ],
        timeout=TIMEOUT,
    )
    assert outcomes(results) == {
        f"{SERVER}:tcp/81": "refused",
        f"{SERVER}:udp/9": "refused",
        "10.99.0.1:tcp/80": "unreachable",
        "10.99.0.1:udp/80": "unreachable",
        "10.99.0.1:icmp": "unreachable",
        "10.77.0.3:icmp": "error",
    }, explain(results)


def test_a_drop_in_the_server_namespace_reads_as_timeout(pair: Pair, served: ports.Server) -> None:
    blocked = [f"{SERVER}:tcp/443", f"{SERVER}:udp/53", f"{SERVER}:icmp"]
    control = f"{SERVER}:tcp/80"
    before = ports.probe(pair.client, [*blocked, control], timeout=TIMEOUT)
    assert all(r.ok for r in before), explain(before)

    nft(pair.server, DROP)
    started = time.monotonic()
    after = ports.probe(pair.client, [*blocked, control], timeout=TIMEOUT)
    took = time.monotonic() - started
    assert outcomes(after) == {**dict.fromkeys(blocked, "timeout"), control: "ok"}, explain(after)
    assert all(r.elapsed >= TIMEOUT for r in after[:-1])
    assert took < 3 * TIMEOUT + 2.0, f"probes ran one after another ({took:.1f} s)"


def test_rejects_redirects_and_own_output_drops_are_told_apart(
    pair: Pair, served: ports.Server
) -> None:
    nft(
        pair.server,
        """
        table inet portstest {
            chain input {
                type filter hook input priority 0;
                tcp dport 8000 reject with icmp type host-unreachable
                udp dport 5353 reject with icmp type admin-prohibited
                icmp type echo-request reject with icmp type host-unreachable
            }
            chain prerouting {
                type nat hook prerouting priority -100;
                tcp dport 8080 redirect to :80
                udp dport 5300 redirect to :53
            }
        }
        """,
    )
    nft(
        pair.client,
        """
        table inet portstest {
            chain output {
                type filter hook output priority 0;
                udp dport 54 drop
            }
        }
        """,
    )
    targets = [f"{SERVER}:{t}" for t in ("tcp/8000", "udp/5353", "icmp")]
    targets += [f"{SERVER}:{t}" for t in ("tcp/8080", "udp/5300", "udp/54")]
    results = ports.probe(pair.client, targets, timeout=TIMEOUT)
    assert [r.kind for r in results] == [
        "unreachable",  # ICMP host unreachable to a SYN
        "unreachable",  # admin prohibited to a datagram (IP_RECVERR)
        "unreachable",  # to an echo request, read off the raw socket
        "error",  # reached port 80, not 8080: an answer that proves nothing
        "error",
        "denied",  # the prober's own output chain: EPERM
    ], explain(results)
    assert [results[3].answer, results[4].answer] == ["tcp/80", "udp/53"]

    # With ping sockets allowed, the same unreachable comes back as a socket error.
    netns.sysctl(pair.client, {"net.ipv4.ping_group_range": "0 0"})
    (icmp,) = ports.probe(pair.client, [f"{SERVER}:icmp"], timeout=TIMEOUT)
    assert icmp.kind == "unreachable", icmp.describe()
    nft(pair.server, "delete table inet portstest")
    (icmp,) = ports.probe(pair.client, [f"{SERVER}:icmp"], timeout=TIMEOUT)
    assert icmp.answer == f"echo reply from {SERVER} (ping socket)", icmp.describe()


def test_probe_parallel_probes_from_each_namespace(pair: Pair, served: ports.Server) -> None:
    jobs = [
        (pair.client, [f"{SERVER}:tcp/22", f"{SERVER}:udp/5353"]),
        (pair.server, [f"{CLIENT}:icmp", "127.0.0.1:tcp/8002", "127.0.0.1:udp/53"]),
        (pair.client, []),
    ]
    got = ports.probe_parallel(jobs, timeout=TIMEOUT)
    assert [len(results) for results in got] == [2, 3, 0]
    for (ns, _), results in zip(jobs, got, strict=True):
        assert all(r.ok and r.namespace == ns for r in results), explain(results)


def test_server_lifecycle(pair: Pair) -> None:
    server = ports.serve(pair.server, tcp=[80], udp=[53])
    try:
        assert server.pid in netns.pids([pair.server])[pair.server]
        assert (server.workdir / "ready").read_text() == f"{server.pid}\n"

        # A second server on a port in use fails at once, with the server's reason.
        started = time.monotonic()
        with pytest.raises(
            LabError, match=r"cannot serve tcp/80 on 0\.0\.0\.0: Address already in use"
        ):
            ports.serve(pair.server, tcp=[80], deadline=10.0)
        assert time.monotonic() - started < 5.0
        assert netns.pids([pair.server])[pair.server] == [server.pid]
    finally:
        server.stop()
    assert not processes.is_running(server.record)
    assert not server.workdir.exists()
    assert netns.pids([pair.server])[pair.server] == []
    results = ports.probe(pair.client, [f"{SERVER}:tcp/80", f"{SERVER}:udp/53"], timeout=TIMEOUT)
    assert outcomes(results) == dict.fromkeys([r.target for r in results], "refused")


def test_a_prober_that_cannot_run_gives_errors_never_timeouts() -> None:
    if os.geteuid() != 0:
        pytest.skip("ip netns exec needs root")
    missing = f"nosuchns{os.getpid()}"
    assert not netns.exists(missing)
    results = ports.probe(missing, [f"{SERVER}:tcp/80", f"{SERVER}:icmp"], timeout=TIMEOUT)
    assert [r.kind for r in results] == ["error", "error"]
    assert all(r.error.startswith("prober failed: ") for r in results), explain(results)
