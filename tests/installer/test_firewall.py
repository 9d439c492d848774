"""The nftables baseline: fail-closed, SSH only from the configured sources, and
accepted by nft itself (checked in a private network namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from installer import files

from .conftest import mini_config

NFT = shutil.which("nft", path="/usr/sbin:/usr/bin:/sbin:/bin")


def _cfg(tmp_path: Path, **fw):
    return mini_config(
        tmp_path, {"firewall": {"ssh_sources": ["203.0.113.0/24", "2001:db8::/32"], **fw}}
    )


def test_baseline_is_fail_closed(tmp_path: Path) -> None:
    text = files.firewall_baseline(_cfg(tmp_path))
    assert "chain input {\n        type filter hook input priority filter; policy drop;" in text
    assert "chain forward {\n        type filter hook forward priority filter; policy drop;" in text
    assert "elements = { 203.0.113.0/24 }" in text and "elements = { 2001:db8::/32 }" in text
    assert "ip saddr @ssh_v4 tcp dport 22 accept" in text
    assert f"delete table inet {files.BASELINE_TABLE}" in text  # reloadable


def test_no_ping_no_dhcp_no_ssh(tmp_path: Path) -> None:
    cfg = mini_config(
        tmp_path,
        {
            "firewall": {"ssh_sources": [], "allow_ping": False, "allow_dhcp": False},
            "sshd": {"enabled": False},
            "users": [],
        },
    )
    text = files.firewall_baseline(cfg)
    assert "echo-request" not in text and "dport 68" not in text and "@ssh_v4" not in text


@pytest.mark.skipif(
    NFT is None or os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs nft, root and unshare",
)
@pytest.mark.parametrize("which", ["baseline", "empty-sources", "emergency"])
def test_nft_accepts_the_rulesets(tmp_path: Path, which: str) -> None:
    if which == "emergency":
        text = files.firewall_emergency()
    elif which == "empty-sources":
        text = files.firewall_baseline(mini_config(tmp_path, {"firewall": {"ssh_sources": []}}))
    else:
        text = files.firewall_baseline(_cfg(tmp_path))
    rules = tmp_path / "rules.nft"
    rules.write_text(text)
    # Loaded for real, twice (the file must be reloadable), in a network
    # namespace of this test's own: the host's ruleset is never touched.
    script = f"{NFT} -f {rules} && {NFT} -f {rules} && {NFT} list table inet dom0_baseline"
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "policy drop" in proc.stdout
