"""Drift detection: a table's fingerprint ignores what traffic and the kernel
change (counters, handles, set elements) and sees what tampering changes (a
rule, a chain's policy)."""

from __future__ import annotations

import copy

from controller.drivers.nft.client import STAMP, fingerprint, stamped

LISTING = [
    {"table": {"family": "inet", "name": "dom0", "handle": 3}},
    {"set": {"family": "inet", "name": "egress", "table": "dom0", "type": "ipv4_addr",
             "handle": 4, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.10.0.0", "len": 24}}]}},
    {"chain": {"family": "inet", "table": "dom0", "name": "shape_0123", "handle": 5}},
    {"chain": {"family": "inet", "table": "dom0", "name": "forward", "handle": 6, "type": "filter",
               "hook": "forward", "prio": 0, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "dom0", "chain": "forward", "handle": 7,
              "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"drop": None}]}},
]  # fmt: skip


def stamp(objs: list[dict]) -> list[dict]:
    name = STAMP + fingerprint(objs)
    return [*objs, {"chain": {"family": "inet", "table": "dom0", "name": name, "handle": 9}}]


def test_traffic_and_elements_do_not_count() -> None:
    written = stamp(LISTING)
    later = copy.deepcopy(written)
    later[4]["rule"]["expr"][0]["counter"] = {"packets": 812, "bytes": 99999}
    later[1]["set"]["elem"] = []
    for o in later:
        for v in o.values():
            v["handle"] = v.get("handle", 0) + 100
    assert stamped(written) and stamped(later)


def test_a_changed_rule_or_policy_is_drift() -> None:
    written = stamp(LISTING)
    no_rule = [o for o in written if "rule" not in o]
    policy = copy.deepcopy(written)
    policy[3]["chain"]["policy"] = "drop"
    verdict = copy.deepcopy(written)
    verdict[4]["rule"]["expr"][1] = {"accept": None}
    for tampered in (no_rule, policy, verdict):
        assert not stamped(tampered)
    assert not stamped(LISTING)  # never stamped: not dom0's as written
