"""Enrollment tokens (controller/pki/tokens.py): single use, expiring, for one
rule or one machine, only their hash stored; and `dom0 token create|list`."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.pki import ca, issue
from controller.pki.tokens import TokenError, Tokens, parse
from controller.store import Store

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
FP = "ab" * 32


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    t = Tokens(Store(tmp_path).db)
    t.ensure_schema()
    return t


def test_a_token_is_used_once_by_the_machine_it_is_for(tokens: Tokens) -> None:
    token = tokens.create(FP, "rule", "web", 600, NOW)
    assert parse(token)[0] == FP and len(token) == 111
    used = tokens.consume(token, ca_fingerprint=FP, rule="web", fqdn="web1.x.internal", now=NOW)
    assert used.used_by == "web1.x.internal"
    with pytest.raises(TokenError, match=r"already used \(by web1.x.internal"):
        tokens.consume(token, ca_fingerprint=FP, rule="web", fqdn="web2.x.internal", now=NOW)


@pytest.mark.parametrize(
    ("scope", "rule", "fqdn", "later", "says"),
    [
        (("rule", "web"), "db", "db1.y.internal", 0, "for rule web, not for db1.y.internal"),
        (("machine", "web1.x.internal"), "web", "web2.x.internal", 0, "for machine web1.x.internal"),
        (("rule", "web"), "web", "web1.x.internal", 600, "expired"),
    ],
)  # fmt: skip
def test_a_token_for_another_machine_or_too_late_is_refused(
    tokens: Tokens, scope: tuple[str, str], rule: str, fqdn: str, later: int, says: str
) -> None:
    token = tokens.create(FP, *scope, 600, NOW)
    with pytest.raises(TokenError, match=says) as e:
        tokens.consume(
            token, ca_fingerprint=FP, rule=rule, fqdn=fqdn, now=NOW + timedelta(seconds=later)
        )
    assert token.split("-", 2)[2] not in str(e.value)  # never the secret
    # refused, so still usable by its machine in time
    if not later:
        ok_rule, ok_fqdn = ("web", "web1.x.internal")
        assert tokens.consume(token, ca_fingerprint=FP, rule=ok_rule, fqdn=ok_fqdn, now=NOW)


def test_forged_and_foreign_tokens(tokens: Tokens) -> None:
    real = tokens.create(FP, "rule", "web", 600, NOW)
    forged = real[:-43] + ("A" * 43)
    with pytest.raises(TokenError, match="unknown"):
        tokens.consume(forged, ca_fingerprint=FP, rule="web", fqdn="web1.x.internal", now=NOW)
    with pytest.raises(TokenError, match="another CA"):
        tokens.consume(real, ca_fingerprint="cd" * 32, rule="web", fqdn="web1.x.internal", now=NOW)
    for bad in ("", "v2-" + "ab" * 32 + "-" + "A" * 43, real + "x", "v1-xyz"):
        with pytest.raises(TokenError, match="not a dom0 enrollment token"):
            parse(bad)


def test_only_the_hash_is_stored_and_two_racers_cannot_both_win(tmp_path: Path) -> None:
    first = Tokens(Store(tmp_path).db)
    first.ensure_schema()
    token = first.create(FP, "rule", "web", 600, NOW)
    secret = token.split("-", 2)[2]
    first.db.execute("PRAGMA wal_checkpoint(FULL)")
    data = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    assert secret.encode() not in data
    second = Tokens(sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None))
    wins = 0
    for t, fqdn in ((first, "web1.x.internal"), (second, "web2.x.internal")):
        try:
            t.consume(token, ca_fingerprint=FP, rule="web", fqdn=fqdn, now=NOW)
            wins += 1
        except TokenError:
            pass
    assert wins == 1


POLICY = """
[domains.x]
pool = "10.10.0.0/24"
[[rules]]
name = "web"
domain = "x"
subdomain = "web{n}"
match.mac_prefix = "52:54:00:00:00:00/24"
"""


def dom0(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *argv],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_the_commands(tmp_path: Path) -> None:
    state, policy = tmp_path / "state", tmp_path / "policy.toml"
    policy.write_text(POLICY)
    args = ["token", "create", "--state", str(state), "--policy", str(policy)]
    none = dom0(*args, "--rule", "web")
    assert none.returncode == 1 and "no CA" in none.stderr, none.stderr
    store = Store(state)
    authority = ca.init(state, store.db, "internal", datetime.now(UTC))
    store.close()
    made = dom0(*args, "--rule", "web")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert parse(token)[0] == issue.fingerprint(authority.root)
    out = tmp_path / "token"
    filed = dom0(*args, "--machine", "web1.x", "--ttl", "1h", "--out", str(out), "--json")
    assert filed.returncode == 0 and json.loads(filed.stdout)["scope"] == "machine web1.x.internal"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and parse(out.read_text())
    assert out.read_text().strip() not in filed.stdout + filed.stderr
    for bad, says in (
        (["--rule", "web", "--machine", "web1.x"], "one of them"),
        (["--rule", "nope"], "no such rule"),
        (["--machine", "db1.x"], "no rule of"),
        (["--rule", "web", "--ttl", "1s"], "--ttl"),
    ):
        r = dom0(*args, *bad)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and says in r.stderr, r.stderr
    listed = json.loads(dom0("token", "list", "--state", str(state), "--json").stdout)
    assert [t["state"] for t in listed["tokens"]] == ["valid", "valid"]
    assert token not in json.dumps(listed)
