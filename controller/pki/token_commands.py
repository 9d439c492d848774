"""`dom0 token create|list`: enrollment tokens for agents (controller/pki/tokens.py).

A token is printed once (or written to --out, 0600) and never logged. With
--policy, the rule or machine it is for must be one the policy has (a
machine: a name one of its rules gives). Exit codes: 0 ok, 1 failure at run
time (no CA, the store), 2 bad input.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

from controller.pki import ca, issue
from controller.pki.commands import open_db
from controller.pki.tokens import Tokens

PROG = "dom0 token"


class _Bad(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _fail(error: str, code: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": error}))
    print(f"{PROG}: {error}", file=sys.stderr)
    return code


def _scope(rule: str | None, machine: str | None, policy_file: str | None) -> tuple[str, str]:
    from controller.policy.load import PolicyError, load_policy
    from controller.policy.names import template_slot

    policy = None
    if policy_file is not None:  # (a policy that cannot be read is the first thing to say)
        try:
            policy = load_policy(policy_file)
        except PolicyError as e:
            raise _Bad(str(e.problems[0]) if e.problems else str(e), 2) from None
    if (rule is None) == (machine is None):
        raise _Bad("give --rule RULE or --machine FQDN (one of them)", 2)
    if policy is None:
        return ("rule", str(rule)) if rule is not None else ("machine", str(machine).lower())
    if rule is not None:
        if policy.rule(rule) is None:
            names = ", ".join(r.name for r in policy.rules)
            raise _Bad(f"--rule {rule}: no such rule in {policy_file}, expected one of: {names}", 2)
        return "rule", rule
    fqdn = str(machine).lower().rstrip(".")
    if not fqdn.endswith(f".{policy.tld}"):
        fqdn = f"{fqdn}.{policy.tld}"
    label, _, rest = fqdn.partition(".")
    domain = rest[: -len(policy.tld) - 1]
    for r in policy.rules:
        if r.domain == domain and template_slot(r.template, label, r.max_slots) is not None:
            return "machine", fqdn
    raise _Bad(f"--machine {machine}: no rule of {policy_file} gives that name", 2)


def create_command(
    state_dir: str,
    *,
    rule: str | None,
    machine: str | None,
    ttl: str,
    policy_file: str | None,
    out: str | None,
    as_json: bool,
) -> int:
    from controller.policy.load import parse_duration

    try:
        seconds = parse_duration(ttl)
        if seconds is None or not 60 <= seconds <= 7 * 86400:
            raise _Bad(f"--ttl {ttl!r}, expected a duration from 1m to 7d, e.g. 10m", 2)
        kind, scope = _scope(rule, machine, policy_file)
        now = datetime.now(UTC)
        db = open_db(state_dir)
        authority = ca.load(state_dir, db)
        tokens = Tokens(db)
        tokens.ensure_schema()
        token = tokens.create(issue.fingerprint(authority.root), kind, scope, seconds, now)
    except _Bad as e:
        return _fail(str(e), e.code, as_json)
    except (ca.CaError, issue.PkiError) as e:
        return _fail(str(e), 1, as_json)
    except (OSError, sqlite3.Error) as e:
        return _fail(f"the state store: {e}", 1, as_json)
    expires = datetime.fromtimestamp(int(now.timestamp()) + seconds, UTC)
    if out is not None:
        path = Path(out)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)
    if as_json:
        reply = {"ok": True, "scope": f"{kind} {scope}", "expires": expires.isoformat()}
        reply["file" if out else "token"] = out or token
        print(json.dumps(reply))
    elif out is None:
        print(token)
    else:
        print(
            f"{PROG}: written to {out} (0600), for {kind} {scope}, until {expires:%Y-%m-%d %H:%M}Z"
        )
    return 0


def list_command(state_dir: str, *, as_json: bool) -> int:
    try:
        db = open_db(state_dir, readonly=True)
        tokens = Tokens(db)
        present = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='enroll_tokens'"
        ).fetchone()
        rows = tokens.all() if present else []
    except ca.CaError as e:
        return _fail(str(e), 1, as_json)
    except (OSError, sqlite3.Error) as e:
        return _fail(f"the state store: {e}", 1, as_json)
    now = int(datetime.now(UTC).timestamp())
    if as_json:
        print(json.dumps({"ok": True, "tokens": [t.to_json(now) for t in rows]}, indent=2))
        return 0
    print(f"{'ID':8}  {'STATE':7}  {'EXPIRES':16}  SCOPE")
    for t in rows:
        when = datetime.fromtimestamp(t.expires, UTC).strftime("%Y-%m-%d %H:%M")
        used = f" (enrolled {t.used_by})" if t.used_by else ""
        print(f"{t.id[:8]:8}  {t.state(now):7}  {when:16}  {t.scope_kind} {t.scope}{used}")
    return 0
