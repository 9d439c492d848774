"""controller/lab/ports.py without namespaces: its arguments, its kinds, its prober handling."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from controller.lab import ports, processes
from controller.lab.ports import BadArgument, PortResult, Target


def test_port_lists() -> None:
    assert ports.parse_ports("22,80,443,8000-8002") == [22, 80, 443, 8000, 8001, 8002]
    assert ports.parse_ports(" 81, 79-81 ,80") == [79, 80, 81]
    assert ports.parse_ports("65535") == [65535]
    assert len(ports.parse_ports(f"1-{ports.MAX_PORTS}")) == ports.MAX_PORTS


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty port list"),
        ("80,,81", "not a port number: ''"),
        ("0", "port 0 out of range"),
        ("70000", "port 70000 out of range"),
        ("http", "not a port number: 'http'"),
        ("90-80", "runs backwards"),
        ("80-", "not a port number: ''"),
        ("-5", "not a port number: ''"),
        (f"1-{ports.MAX_PORTS + 1}", f"more than {ports.MAX_PORTS} ports"),
    ],
)
def test_bad_port_lists(text: str, why: str) -> None:
    with pytest.raises(BadArgument, match=why):
        ports.parse_ports(text)


def test_ranges_are_the_inverse_of_port_lists() -> None:
    assert ports._ranges([8002, 22, 8000, 8001, 80, 81, 443]) == "22,80-81,443,8000-8002"
    assert ports.parse_ports(ports._ranges([1, 3, 4, 5, 9])) == [1, 3, 4, 5, 9]


@pytest.mark.parametrize(
    ("text", "target", "canonical"),
    [
        ("10.77.0.1:tcp/80", Target("10.77.0.1", "tcp", 80), "10.77.0.1:tcp/80"),
        ("10.77.0.1:udp/53", Target("10.77.0.1", "udp", 53), "10.77.0.1:udp/53"),
        ("10.77.0.1:icmp", Target("10.77.0.1", "icmp"), "10.77.0.1:icmp"),
        ("[fd00::1]:tcp/22", Target("fd00::1", "tcp", 22), "[fd00::1]:tcp/22"),
        ("fd00:0::1:icmp", Target("fd00::1", "icmp"), "[fd00::1]:icmp"),
    ],
)
def test_targets(text: str, target: Target, canonical: str) -> None:
    assert ports.parse_target(text) == target
    assert str(target) == canonical
    assert ports.parse_target(canonical) == target


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10.77.0.1:tcp/70000", "port 70000 out of range 1-65535"),
        ("10.77.0.1:foo/1", "expected tcp/PORT, udp/PORT or icmp"),
        ("10.77.0.1:tcp", "expected tcp/PORT, udp/PORT or icmp"),
        ("10.77.0.1:icmp/8", "expected tcp/PORT, udp/PORT or icmp"),
        ("10.77.0.1:udp/", "not a port number"),
        ("10.77.0.1", "expected ADDR:tcp/PORT"),
        ("tcp/80", "expected ADDR:tcp/PORT"),
        ("host.example:tcp/80", "not an IP address: 'host.example'"),
    ],
)
def test_bad_targets(text: str, why: str) -> None:
    with pytest.raises(BadArgument, match=why):
        ports.parse_target(text)
    assert issubclass(BadArgument, ValueError)  # what library callers catch


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["probe", "10.77.0.1:tcp/70000"], "port 70000 out of range 1-65535"),
        (["probe", "10.77.0.1:foo/1"], "expected tcp/PORT, udp/PORT or icmp"),
        (["probe"], "the following arguments are required: TARGET"),
        (["probe", "--timeout", "0", "10.77.0.1:icmp"], "timeout 0 s"),
        (["serve", "--tcp", ""], "argument --tcp: empty port list"),
        (["serve", "--udp", "53,x"], "argument --udp: not a port number: 'x'"),
        (["serve"], "nothing to serve"),
        (["serve", "--tcp", "1-1500", "--udp", "1-501"], "2001 ports, at most 2000"),
        (["serve", "--tcp", "80", "--bind", "localhost"], "not an IP address"),
        (["listen"], "invalid choice: 'listen'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ports.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("ports: "), err
    assert why in err


def test_bad_arguments_from_the_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "controller.lab.ports", "probe", "--json", "10.77.0.1:tcp/70000"],
        capture_output=True,
        text=True,
        timeout=30,
        env=processes.python_env(),
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        "ports: argument TARGET: target '10.77.0.1:tcp/70000': port 70000 out of range 1-65535\n"
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), "timeout"),
        (OSError(errno.ECONNREFUSED, "Connection refused"), "refused"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "unreachable"),
        (OSError(errno.EPERM, "Operation not permitted"), "denied"),
        (OSError(errno.EACCES, "Permission denied"), "error"),  # a broadcast address
        (OSError(errno.ECONNRESET, "Connection reset by peer"), "error"),
        (OSError(errno.EIO, "Input/output error"), "error"),
    ],
)
def test_only_silence_is_a_timeout(exc: OSError, kind: str) -> None:
    assert ports._failure(exc, 1.0)[0] == kind


def test_results_json_and_describe() -> None:
    ok = PortResult("10.77.0.1:tcp/80", True, elapsed=0.012, answer="tcp/80", namespace="cli")
    assert ok.to_json() == {
        "target": "10.77.0.1:tcp/80",
        "ok": True,
        "kind": "",
        "error": "",
        "elapsed": 0.012,
        "answer": "tcp/80",
    }
    assert ok.describe() == "10.77.0.1:tcp/80 from cli: answered 'tcp/80' (0.01 s)"
    dropped = PortResult("10.77.0.1:udp/53", False, "timeout", "no answer within 1 s")
    assert dropped.describe() == "10.77.0.1:udp/53: timeout: no answer within 1 s"
    assert dropped.blocked and not PortResult("x", False, "error").blocked


def _prober(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


TARGETS = [Target("10.77.0.1", "tcp", 80), Target("10.77.0.1", "icmp")]


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("import sys; sys.exit('Traceback: boom')", "prober failed: Traceback: boom"),
        ("print('[]')", "prober failed: exit 0, results do not match the targets"),
        ("print('not json')", "prober failed: exit 0, Expecting value"),
        ("import time; time.sleep(30)", "prober hung: killed after 0.5 s"),
    ],
)
def test_a_crashed_or_hung_prober_gives_errors(code: str, why: str) -> None:
    results = ports._collect(_prober(code), "cli", TARGETS, limit=0.5)
    assert [(r.target, r.ok, r.kind) for r in results] == [
        ("10.77.0.1:tcp/80", False, "error"),
        ("10.77.0.1:icmp", False, "error"),
    ]
    assert all(r.error.startswith(why) and r.namespace == "cli" for r in results), results


def test_a_prober_claiming_an_unknown_kind_is_not_believed() -> None:
    item = {"target": "10.77.0.1:tcp/80", "ok": False, "kind": "dropped", "error": "", "elapsed": 0}
    item2 = {**item, "target": "10.77.0.1:icmp", "kind": "timeout"}
    code = f"import json; print(json.dumps({[item, item2]!r}))"
    results = ports._collect(_prober(code), "cli", TARGETS, limit=10.0)
    assert [r.kind for r in results] == ["error", "error"]
