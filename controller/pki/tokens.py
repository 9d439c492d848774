"""Enrollment tokens: single use, expiring, for one rule or one machine.

    v1-<the CA root's sha256 fingerprint, 64 hex>-<secret, 43 base64url>

The fingerprint lets an agent pin dom0's CA before it has anything else (it
checks the controller's chain against it); the secret proves the token.
Only a hash of the secret is stored, so a copy of the store enrolls no one;
its use is one UPDATE that succeeds only while the token is unused,
unexpired and for the machine that presents it, so two agents racing with
one token cannot both win. A token is never logged: errors name it by the
first 8 characters of its hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from controller.pki.store import transaction

VERSION = "v1"
_TOKEN = re.compile(r"v1-([0-9a-f]{64})-([A-Za-z0-9_-]{43})\Z")
SCOPES = ("rule", "machine")
MAX_TTL = 7 * 86400  # seconds: a token is for enrolling now, not a credential

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enroll_tokens (
    id TEXT PRIMARY KEY,               -- sha256 of the secret, hex
    scope_kind TEXT NOT NULL CHECK (scope_kind IN ('rule', 'machine')),
    scope TEXT NOT NULL,               -- a rule name, or a machine's fqdn
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    used_at INTEGER,
    used_by TEXT                       -- the fqdn it enrolled
)
"""


class TokenError(Exception):
    """A token that cannot be used; the message never contains it."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str  # its hash: what `dom0 token list` shows (first 8 characters)
    scope_kind: str
    scope: str
    created: int
    expires: int
    used_at: int | None
    used_by: str | None

    def state(self, now: int) -> str:
        if self.used_at is not None:
            return "used"
        return "expired" if now >= self.expires else "valid"

    def to_json(self, now: int) -> dict:
        return {
            "id": self.id[:8],
            "scope": f"{self.scope_kind} {self.scope}",
            "created": self.created,
            "expires": self.expires,
            "state": self.state(now),
            "used_at": self.used_at,
            "used_by": self.used_by,
        }


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(token: str) -> tuple[str, str]:
    """(the CA fingerprint, the secret's hash) of a well-formed token."""
    m = _TOKEN.match(token.strip()) if isinstance(token, str) else None
    if m is None:
        raise TokenError(
            f"not a dom0 enrollment token, expected {VERSION}-FINGERPRINT-SECRET "
            "(as dom0 token create prints it)"
        )
    return m[1], _hash(m[2])


class Tokens:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def ensure_schema(self) -> None:
        with self._transaction():
            self.db.execute(_SCHEMA)

    def _transaction(self) -> AbstractContextManager[None]:
        return transaction(self.db)

    def create(
        self, ca_fingerprint: str, scope_kind: str, scope: str, ttl: int, now: datetime
    ) -> str:
        """A new token (returned once: only its hash is kept)."""
        if scope_kind not in SCOPES:
            raise ValueError(f"scope {scope_kind!r}, expected one of {SCOPES}")
        if not re.fullmatch(r"[0-9a-f]{64}", ca_fingerprint):
            raise ValueError("the CA fingerprint: expected 64 lower-case hex digits")
        if not 60 <= ttl <= MAX_TTL:
            raise ValueError(f"ttl {ttl} s, expected from 60 s to {MAX_TTL // 86400} days")
        secret = secrets.token_urlsafe(32)  # 43 characters
        t = int(now.timestamp())
        with self._transaction():
            self.db.execute(
                "INSERT INTO enroll_tokens (id, scope_kind, scope, created, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (_hash(secret), scope_kind, scope, t, t + ttl),
            )
        return f"{VERSION}-{ca_fingerprint}-{secret}"

    def consume(
        self, token: str, *, ca_fingerprint: str, rule: str, fqdn: str, now: datetime
    ) -> TokenInfo:
        """Use the token for the machine (rule, fqdn) that presents it, at
        most once: TokenError says why not (unknown, used, expired, another
        CA's, or for another rule or machine)."""
        fingerprint, ident = parse(token)
        short = ident[:8]
        if fingerprint != ca_fingerprint:
            raise TokenError(f"token {short}: made for another CA (its fingerprint differs)")
        t = int(now.timestamp())
        with self._transaction():
            done = self.db.execute(
                "UPDATE enroll_tokens SET used_at = ?, used_by = ? WHERE id = ? "
                "AND used_at IS NULL AND expires > ? AND ("
                "(scope_kind = 'rule' AND scope = ?) OR (scope_kind = 'machine' AND scope = ?))",
                (t, fqdn, ident, t, rule, fqdn),
            ).rowcount
            info = self.get(ident)
        if done == 1 and info is not None:
            return info
        if info is None:
            raise TokenError(f"token {short}: unknown (never made here, or a forgery)")
        if info.used_at is not None:
            raise TokenError(f"token {short}: already used (by {info.used_by})")
        if t >= info.expires:
            raise TokenError(f"token {short}: expired")
        raise TokenError(
            f"token {short}: for {info.scope_kind} {info.scope}, not for {fqdn} (rule {rule})"
        )

    def get(self, ident: str) -> TokenInfo | None:
        row = self.db.execute(
            "SELECT id, scope_kind, scope, created, expires, used_at, used_by "
            "FROM enroll_tokens WHERE id = ?",
            (ident,),
        ).fetchone()
        return TokenInfo(*row) if row else None

    def all(self) -> list[TokenInfo]:
        rows = self.db.execute(
            "SELECT id, scope_kind, scope, created, expires, used_at, used_by "
            "FROM enroll_tokens ORDER BY created, id"
        )
        return [TokenInfo(*r) for r in rows]
