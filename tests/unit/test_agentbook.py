"""The controller's book of agent configurations: versions change only with
the configuration, survive a restart, and a NACKed version is never pushed
again (only a changed configuration, with a new version, is)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from common.agentconfig import MachineConfig, Route
from controller.core.agentconfig import machine_config
from controller.core.allocation import Allocation
from controller.policy.load import parse_policy
from controller.sources.agentbook import ConfigBook

NAME = "web1.x.internal"


def config(generation: int) -> MachineConfig:
    return MachineConfig(
        name=NAME,
        hostname="web1",
        mac="52:54:00:d0:00:01",
        addresses=(f"10.10.0.{5 + generation % 200}/24",),
        routes=(Route("0.0.0.0/0", "10.10.0.1"),),
    )


class Source:
    def __init__(self) -> None:
        self.generation = 0

    def __call__(self, names: object) -> dict[str, MachineConfig | None]:
        return {NAME: config(self.generation)}


def book(path: Path, source: Source) -> ConfigBook:
    return ConfigBook(sqlite3.connect(path, isolation_level=None), source)


def test_versions_follow_changes_and_survive_a_restart(tmp_path: Path) -> None:
    source = Source()
    b = book(tmp_path / "db", source)
    assert b.refresh([NAME]) == [NAME] and b.next_push(NAME, 0) is not None
    assert b.refresh([NAME]) == []  # the same configuration: no new version
    source.generation = 1
    b.refresh([NAME])
    push = b.next_push(NAME, 1)
    assert push is not None and push[0] == 2
    b.ack(NAME, 2)
    again = book(tmp_path / "db", source)  # a restarted controller
    assert again.records[NAME].version == 2 and again.records[NAME].acked == 2
    assert again.refresh([NAME]) == []
    source.generation = 2
    again.refresh([NAME])
    assert again.records[NAME].version == 3


def test_a_nacked_version_is_never_pushed_again(tmp_path: Path) -> None:
    source = Source()
    b = book(tmp_path / "db", source)
    b.refresh([NAME])
    version, _ = b.next_push(NAME, 0) or (0, {})
    b.nack(NAME, version, "route: Network is unreachable")
    assert b.next_push(NAME, 0) is None  # not on a new connection either
    assert book(tmp_path / "db", source).next_push(NAME, 0) is None  # nor after a restart
    report = b.report()[0]
    assert report["last_nack"]["reason"] == "route: Network is unreachable"
    assert not report["in_sync"]
    source.generation = 1  # the control: a changed configuration is pushed
    b.refresh([NAME])
    assert (b.next_push(NAME, 0) or (0, {}))[0] == version + 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30))
def test_pushes_only_ever_increase_and_follow_the_latest(generations: list[int]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        source = Source()
        b = book(Path(d) / "db", source)
        sent = 0
        for g in generations:
            source.generation = g
            b.refresh([NAME])
            push = b.next_push(NAME, sent)
            if push is not None:
                assert push[0] > sent
                sent = push[0]
            assert b.records[NAME].config["addresses"] == [f"10.10.0.{5 + g}/24"]
        assert sent == b.records[NAME].version


POLICY = b"""
[site]
tld = "internal"
[bridge]
name = "virbr0"
[hub]
interface = "hub0"
listen_port = 51821
pool = "10.250.0.0/16"
[domains.x]
pool = "10.10.0.0/24"
services = ["enroll"]
hub = true
[domains.y]
pool = "10.20.0.0/24"
ipv6 = true
[[rules]]
name = "odd"
domain = "x"
subdomain = "web{n}"
match.mac_mask = "52:54:00:d0:00:01/ff:ff:ff:ff:00:01"
[[rules]]
name = "even"
domain = "y"
subdomain = "db{n}"
match.mac_mask = "52:54:00:d0:00:00/ff:ff:ff:ff:00:01"
"""


def test_what_a_machine_gets_is_what_dhcp_and_the_hub_would_give() -> None:
    policy = parse_policy(POLICY, "test")
    hub_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    web = Allocation("52:54:00:d0:00:01", "odd", 1, "x", "10.10.0.7", "vnet1",
                     underlay="10.250.3.9")  # fmt: skip
    hub = machine_config(policy, web, hub_key)
    assert hub is not None and hub.addresses == ("10.250.3.9/16",)
    assert hub.tunnel is not None and hub.tunnel.address == "10.10.0.7/32"
    assert hub.tunnel.endpoint == "10.250.0.1:51821" and hub.tunnel.peer_public_key == hub_key
    assert [(r.to, r.dev) for r in hub.routes] == [("0.0.0.0/0", "tunnel")]
    assert machine_config(policy, web, None) is None  # no hub key yet: nothing to push
    db = Allocation("52:54:00:d0:00:02", "even", 1, "y", "10.20.0.9", "vnet2")
    bridge = machine_config(policy, db, None)
    assert bridge is not None and bridge.tunnel is None and bridge.name == "db1.y.internal"
    assert bridge.addresses[0] == "10.20.0.9/24" and bridge.addresses[1].endswith("/64")
    # no IPv6 default route: the uplink carries no IPv6 (dom0 advertises none either)
    assert [(r.to, r.via) for r in bridge.routes] == [("0.0.0.0/0", "10.20.0.1")]
