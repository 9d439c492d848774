"""The baseline firewall's hand-over to the controller keeps SSH open."""

from __future__ import annotations

from installer.takeover import ssh_handover_problem

POLICY = '[host]\nssh_from = ["10.0.0.0/8", "2001:db8::/32"]\n[domains.x]\npool = "10.10.0.0/24"\n'


def test_covered_sources_are_fine() -> None:
    assert ssh_handover_problem(POLICY, "p.toml", ("10.1.0.0/16", "2001:db8:1::/48"), 22) is None


def test_a_source_the_policy_would_close() -> None:
    why = ssh_handover_problem(POLICY, "p.toml", ("10.1.0.0/16", "203.0.113.0/24"), 22)
    assert why is not None and "does not cover 203.0.113.0/24" in why and "lock SSH out" in why


def test_other_port_or_invalid_policy() -> None:
    assert "host.ssh_port is 22 but sshd listens on 2222" in (
        ssh_handover_problem(POLICY, "p.toml", ("10.0.0.0/8",), 2222) or ""
    )
    assert "not a valid dom0 policy" in (ssh_handover_problem("[x", "p.toml", (), 22) or "")
    # no [host] at all: SSH would be closed
    bare = '[domains.x]\npool = "10.10.0.0/24"\n'
    assert "does not cover 10.0.0.0/8" in (
        ssh_handover_problem(bare, "p.toml", ("10.0.0.0/8",), 22) or ""
    )
