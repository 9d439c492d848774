"""What a lab test expects of a probe, checked so that only the expected outcome passes.

A negative probe ("vm1 must not reach vm2") passes only on a clean block: the
kinds of failure the protection produces (controller/lab/probe.py, KINDS).
dom0 drops silently, so for traffic it forwards or receives that is a
"timeout"; dom0's own traffic stopped by its own output chains fails with
"denied" (EPERM; TCP retransmits instead, so a timeout), and with its
uplink's unreachable route with "unreachable". A bind error, a crashed probe, an HTTP error or a reset is
never taken for a block: it fails the test with a line that names the probe
and what happened. A positive probe passes only with an answer.

Every family of negative probe has a control in its test module: the same
probe answered once the protection it stands for is removed.
"""

from __future__ import annotations

from collections.abc import Iterable

from controller.lab.probe import KINDS, ProbeResult

DROPPED = ("timeout",)  # dom0 dropped it on the way (its policy never rejects)
# dom0's own traffic: its output chains' drop (EPERM to a datagram socket;
# TCP ignores it and retransmits until the timeout) or its uplink's routes
OWN_OUTPUT = ("denied", "unreachable", "timeout")


def blocked_problems(results: Iterable[ProbeResult], allow: Iterable[str]) -> list[str]:
    """One line for each result that is not a clean block of an allowed kind."""
    allow = tuple(allow)
    unknown = [k for k in allow if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown probe kinds {unknown}")
    problems = []
    for r in results:
        if r.ok:
            problems.append(f"{r.describe()} (expected blocked: {'/'.join(allow)})")
        elif r.kind not in allow:
            problems.append(f"{r.describe()} (not a clean block: expected {'/'.join(allow)})")
    return problems


def assert_blocked(result: ProbeResult, *more: ProbeResult, allow: Iterable[str] = DROPPED) -> None:
    """Each probe ended in a clean block of a kind in allow; else AssertionError,
    one line per probe that did not."""
    __tracebackhide__ = True
    problems = blocked_problems((result, *more), allow)
    if problems:
        raise AssertionError("; ".join(problems))


def assert_reached(result: ProbeResult) -> ProbeResult:
    """The probe got its answer; returns it (for its body)."""
    __tracebackhide__ = True
    if not result.ok:
        raise AssertionError(f"{result.describe()} (expected an answer)")
    return result


def assert_all_reached(results: Iterable[ProbeResult]) -> list[ProbeResult]:
    __tracebackhide__ = True
    results = list(results)
    problems = [f"{r.describe()} (expected an answer)" for r in results if not r.ok]
    if problems:
        raise AssertionError("; ".join(problems))
    return results
