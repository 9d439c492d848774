"""Scheduled remapping from plain data (core/remap.py, the policy's keys):
when each machine moves, that remaps are spread over the interval, that a
machine never moves while it holds a previous address or when its rule pins
it, and that records' TTL stays within half the grace."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core import remap
from controller.core.allocation import Allocation
from controller.policy.load import PolicyError, parse_policy
from controller.policy.model import Policy

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = (ROOT / "policies" / "lab-bridge.toml").read_text()
EVERY, GRACE = 3600, 120


def policy(extra: str = f'remap_every = "{EVERY}s"\nremap_grace = "{GRACE}s"\n') -> Policy:
    text = BRIDGE.replace("[domains.x]\n", f"[domains.x]\n{extra}", 1)
    return parse_policy(text.encode(), "p.toml")


def problems(extra: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        policy(extra)
    return [str(p) for p in e.value.problems]


def machine(slot: int, **kw: object) -> Allocation:
    base = Allocation(f"52:54:00:d0:01:{slot:02x}", "odd", slot, "x", f"10.10.0.{slot + 1}",
                      f"vnet{slot}")  # fmt: skip
    from dataclasses import replace

    return replace(base, **kw)  # type: ignore[arg-type]


def test_the_keys_and_their_defaults() -> None:
    x = policy().domains["x"]
    assert (x.remap_every, x.remap_grace) == (EVERY, GRACE)
    assert x.record_ttl(300) == GRACE // 2  # (a withdrawn address outlives no cached record)
    default = policy('remap_every = "6h"\n').domains["x"]
    assert (default.remap_every, default.remap_grace) == (6 * 3600, 600)
    assert policy("").domains["x"].remap_every is None
    assert policy("").domains["x"].record_ttl(300) == 300


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ('remap_grace = "1m"\n', "domains.x.remap_grace: is set but remap_every is not"),
        ('remap_every = "1m"\nremap_grace = "1m"\n', "is not shorter than remap_every"),
        ('remap_every = "5s"\n', "domains.x.remap_every: '5s' is too short"),
        ('remap_every = "1h"\nremap_grace = "2s"\n', "domains.x.remap_grace: '2s' is too short"),
        ('remap_every = "often"\n', "is not a duration"),
    ],
)
def test_bad_remap_keys_are_named(extra: str, says: str) -> None:
    assert any(says in p for p in problems(extra)), problems(extra)


def test_an_unscheduled_machine_is_scheduled_from_now_not_moved() -> None:
    p = policy()
    a = machine(1)
    (scheduled,) = remap.unscheduled(p, [a], 1000)
    assert scheduled.remapped_at == 1000 and scheduled.address == a.address
    assert remap.due(p, [a, scheduled], 1000) == []


@settings(max_examples=200)
@given(slot=st.integers(1, 200), last=st.integers(0, 10**9))
def test_the_next_remap_is_within_one_interval_and_never_inside_the_grace(
    slot: int, last: int
) -> None:
    d = policy().domains["x"]
    t = remap.next_remap(machine(slot, remapped_at=last), d)
    assert t is not None and last + GRACE <= t <= last + EVERY + GRACE
    assert (t - remap.phase(machine(slot), EVERY)) % EVERY == 0  # its slot's phase


def test_remaps_of_many_machines_are_spread_over_the_interval() -> None:
    d = policy().domains["x"]
    times = sorted(
        t for s in range(1, 201) if (t := remap.next_remap(machine(s, remapped_at=0), d))
    )
    # (200 slots over an hour: no minute holds a large share of them)
    per_minute: dict[int, int] = {}
    for t in times:
        per_minute[t // 60] = per_minute.get(t // 60, 0) + 1
    assert len(times) == 200 and max(per_minute.values()) <= 20, per_minute


def test_due_skips_a_held_previous_a_pinned_rule_and_absent_machines() -> None:
    p = policy()
    now = 10**6
    due = machine(1, remapped_at=0)
    assert remap.due(p, [due], now) == [due]
    assert remap.due(p, [machine(2, remapped_at=0, previous="10.10.0.99",
                                 previous_until=now + 5)], now) == []  # fmt: skip
    assert remap.due(p, [machine(3, remapped_at=0, absent_since=5)], now) == []
    pins = BRIDGE.replace("[domains.x]\n", f'[domains.x]\nremap_every = "{EVERY}s"\n', 1)
    pins = pins.replace(
        'subdomain = "web{n}"\n', 'subdomain = "web{n}"\npins = { web1 = "10.10.0.2" }\n', 1
    )
    pinned = parse_policy(pins.encode(), "p.toml")
    assert pinned.rules[0].pins and remap.due(pinned, [due], now) == []


def test_moved_and_expired() -> None:
    a = machine(1, remapped_at=0)
    b = remap.moved(a, "10.10.0.77", 500, GRACE)
    assert (b.address, b.previous, b.previous_until, b.remapped_at) == (
        "10.10.0.77", a.address, 500 + GRACE, 500)  # fmt: skip
    assert remap.expired([b], 500 + GRACE - 1) == []
    (c,) = remap.expired([b], 500 + GRACE)
    assert (c.address, c.previous, c.previous_until) == ("10.10.0.77", None, None)
    assert remap.next_event(policy(), [b]) == 500 + GRACE
