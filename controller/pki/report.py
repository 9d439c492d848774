"""What the CA's state looks like to an operator: one plain dict per
certificate (`dom0 ca status|list --json`) and the warnings that `dom0
status` and the log repeat. Pure: the store's records and `now` in.

Only the certificates the CA stands on are warned about: the root and the
issuing intermediate (the one in force that lives longest). An intermediate
superseded by a rotation expires quietly: that is the plan, not a problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from controller.pki.issue import expiry_warning
from controller.pki.store import CertRecord, Kind

# What the warnings are about: `warnings` needs no other rows.
WATCHED: tuple[Kind, ...] = ("root", "intermediate")


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def state(record: CertRecord, now: datetime) -> str:
    if record.revoked:
        return "revoked"
    if now > record.not_after:
        return "expired"
    if now < record.not_before:
        return "not yet valid"
    return "valid"


def issuing(records: Sequence[CertRecord], now: datetime) -> CertRecord | None:
    """The intermediate that signs new certificates: in force, longest to live."""
    live = [r for r in records if r.kind == "intermediate" and r.in_force(now)]
    return _longest(live)


def _longest(records: Sequence[CertRecord]) -> CertRecord | None:
    """The one that lives longest; of a tie (same second), the later in
    `records` (the store lists them in the order issued)."""
    return max(reversed(records), key=lambda r: r.not_after, default=None)


def _watched(records: Sequence[CertRecord], now: datetime) -> dict[str, str]:
    """serial -> the warning phrase, for the certificates the CA stands on."""
    out: dict[str, str] = {}
    for r in records:
        if r.kind == "root" and not r.revoked:
            phrase = expiry_warning("root", r.not_after, now)
            if phrase:
                out[r.serial] = f"{phrase}: a new CA is needed (docs/ca.md, root renewal)"
    current = issuing(records, now)
    if current is None:  # none in force: the newest unrevoked one tells when it ended
        ended = [r for r in records if r.kind == "intermediate" and not r.revoked]
        current = _longest(ended)
    if current is not None:
        phrase = expiry_warning("issuing intermediate", current.not_after, now)
        if phrase:
            out[current.serial] = f"{phrase}: run dom0 ca rotate"
    return out


def warnings(records: Sequence[CertRecord], now: datetime) -> list[str]:
    """One line each, for `dom0 status` and the log; none without a CA."""
    if not records:
        return []
    watched = _watched(records, now)
    lines = [f"CA: {watched[r.serial]} (serial {r.serial})" for r in records if r.serial in watched]
    if not any(r.kind == "root" and not r.revoked for r in records):
        lines.append("CA: no root certificate in the store: dom0 ca init")
    elif issuing(records, now) is None and not any(
        r.kind == "intermediate" and r.serial in watched for r in records
    ):  # all revoked, or (a clock set back) none valid yet
        lines.append("CA: no issuing intermediate in force: run dom0 ca rotate --force")
    return lines


def status(records: Sequence[CertRecord], now: datetime) -> list[dict[str, Any]]:
    watched = _watched(records, now)
    return [
        {
            "kind": r.kind,
            "serial": r.serial,
            "subject": r.subject,
            "fqdn": r.fqdn,
            "slot": r.slot,
            "not_before": _iso(r.not_before),
            "not_after": _iso(r.not_after),
            "days_left": round((r.not_after - now).total_seconds() / 86400, 1),
            "state": state(r, now),
            "revoked": r.revoked,
            "revoked_at": _iso(r.revoked_at),
            "reason": r.reason,
            "warning": watched.get(r.serial),
        }
        for r in records
    ]
