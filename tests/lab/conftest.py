"""Fixtures for lab tests (real network namespaces; root only).

Shared file: fixtures are only ever added here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# ---- the dom0 lab (controller/lab) ---------------------------------------------------------


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests build network namespaces: run as root")


def unique_lab_name() -> str:
    """Short and unique per test: it prefixes namespace names (t1234abcd-vm1)."""
    return f"t{os.getpid() % 10000}{secrets.token_hex(2)}"


@pytest.fixture
def lab_name() -> str:
    return unique_lab_name()


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Any]]:
    """Factory: make_lab(vms=2, controller=False, dhcp=False, **build.create kwargs) -> Lab.

    Every lab it builds is torn down afterwards, also when the test fails,
    and the teardown is checked: no namespace of the lab may remain.
    Defaults build the topology and echo services only; pass controller=True
    (and dhcp=True) for a lab with the controller and leased VMs.
    """
    _need_root()
    from controller.lab import build, teardown

    names: list[str] = []

    def factory(vms: int = 2, *, name: str | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("controller", False)
        kwargs.setdefault("dhcp", kwargs["controller"])
        name = name or unique_lab_name()
        names.append(name)
        return build.create(name, vms, **kwargs)

    yield factory
    left = []
    for name in names:
        teardown.down(name)
        if teardown.exists(name):
            left.append(name)
    assert not left, f"labs not fully torn down: {left}"


@pytest.fixture
def lab(make_lab: Callable[..., Any]) -> Any:
    """A topology-only lab with 2 VMs: namespaces, links, echo services; no controller."""
    return make_lab(2)


# ---- bare namespaces (tests/lab/test_netlink_source.py and others) -------------------------


def _pids_in(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], str]]:
    """Factory: make_netns("tag") creates a namespace named tag+pid+random, returns the name.

    At teardown, also when the test fails, processes still inside (started by the
    test: the namespace is new) are killed by PID and the namespaces deleted.
    Nothing is done in the root network namespace.
    """
    _need_root()
    if shutil.which("ip") is None:
        pytest.skip("lab tests need iproute2")
    created: list[str] = []

    def make(tag: str = "ns") -> str:
        name = f"{tag}{os.getpid()}{secrets.token_hex(3)}"
        from controller.lab import netns

        netns.create([name])
        created.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            for pid in _pids_in(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
