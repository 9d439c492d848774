"""The hand-over from the boot baseline to the dom0 controller.

When the controller starts it deletes the baseline (`inet dom0_baseline`) in
the same transaction that loads its own tables, whose host rules come from
the dom0 policy's [host] section. So the policy must keep open what the
baseline kept open, SSH from `firewall.ssh_sources` above all: otherwise the
first start of the controller would lock the operator out.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path


def ssh_handover_problem(
    policy_text: str, policy_name: str, ssh_sources: tuple[str, ...], port: int
) -> str | None:
    """Why the policy would not keep SSH open as the baseline does, or None."""
    from controller.policy.load import PolicyError, parse_policy

    try:
        policy = parse_policy(policy_text.encode(), policy_name)
    except PolicyError as e:
        return f"{policy_name} is not a valid dom0 policy: {e.problems[0]}"
    if policy.host.ssh_port != port:
        return (
            f"{policy_name}: host.ssh_port is {policy.host.ssh_port} but sshd listens on {port}; "
            "the controller would close SSH when it takes over the baseline firewall"
        )
    allowed = [ipaddress.ip_network(c) for c in policy.host.ssh_from]
    missing = [
        s
        for s in ssh_sources
        if not any(
            (net := ipaddress.ip_network(s)).version == a.version and net.subnet_of(a)  # type: ignore[arg-type]
            for a in allowed
        )
    ]
    if missing:
        return (
            f"{policy_name}: host.ssh_from does not cover {', '.join(missing)} from "
            "firewall.ssh_sources; the controller would lock SSH out when it takes over the "
            "baseline firewall (add them to [host] ssh_from)"
        )
    return None


def readable(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None
