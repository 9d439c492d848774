"""Which rule a machine falls under: the first whose match holds."""

from __future__ import annotations

import functools

from controller.policy.macs import parse_mac
from controller.policy.model import Policy, Rule

_mac = functools.lru_cache(maxsize=1 << 16)(parse_mac)


def match_rule(policy: Policy, mac: str, bridge: str, port: str) -> Rule | None:
    """The first rule matching, or None (the machine is quarantined)."""
    value = _mac(mac)
    for rule in policy.rules:
        if rule.match.matches(value, bridge, port):
            return rule
    return None
