"""Suite-wide guard: the root network namespace is exactly as before.

Lab tests build everything in namespaces of their own; this checks, once for
the whole session, that nothing leaked into the root namespace: none of the
namespaces the suite created is left behind (each creation is noted in a
registry file, `controller.lab.netns.REGISTRY`, which child processes
inherit), and routes, rules, links, addresses and nftables are unchanged, and
so are the host's /etc/resolv.conf and hostname.
Namespaces that other processes on the machine create or delete meanwhile are
none of the suite's business and are not compared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        return f"({e.strerror})"


def _root_state() -> dict[str, object]:
    def out(argv: list[str]) -> str:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        return r.stdout

    def links() -> list:
        # link statistics and carrier timings change on their own; compare identity
        return sorted(
            (link["ifname"], link.get("address"), link.get("master"))
            for link in json.loads(out(["ip", "-j", "link", "show"]) or "[]")
        )

    state: dict[str, object] = {
        "route4": out(["ip", "-4", "route", "show", "table", "all"]),
        "route6": out(["ip", "-6", "route", "show", "table", "all"]),
        "rule4": out(["ip", "-4", "rule"]),
        "rule6": out(["ip", "-6", "rule"]),
        "addr": out(["ip", "-br", "addr"]),
        "links": links(),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
        # the host's files a guest's DHCP client would write if a lab let it
        # (a VM namespace shares the file system and the hostname with the host)
        "resolv.conf": _read("/etc/resolv.conf"),
        "hostname": _read("/etc/hostname") + "|" + os.uname().nodename,
    }
    if shutil.which("nft"):
        state["nft"] = out(["nft", "list", "ruleset"])
    return state


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="session", autouse=True)
def root_namespace_unchanged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from controller.lab.netns import REGISTRY

    if os.geteuid() != 0:
        yield
        return
    registry = tmp_path_factory.mktemp("netns") / "created.txt"
    registry.touch()
    os.environ[REGISTRY] = str(registry)
    before = _root_state()
    yield
    after = _root_state()
    os.environ.pop(REGISTRY, None)
    left = sorted(set(registry.read_text().split()) & _namespaces())
    changed = [k for k in before if before[k] != after[k]]
    assert not left, f"the test suite left namespaces behind: {', '.join(left)}"
    assert not changed, f"the test suite changed the root namespace: {changed}"


# Under CI (`.ci/run` sets DOM0_REQUIRE_ALL=1), a skipped test is a failure:
# a lab test that skips for want of root, a tool or a kernel feature would
# otherwise let the run claim what it never tried.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("DOM0_REQUIRE_ALL") == "1" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but DOM0_REQUIRE_ALL=1 (CI) wants every test run: {reason}"
