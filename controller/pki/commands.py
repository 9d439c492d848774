"""`dom0 ca init|status|list|revoke|rotate`: the CA from the command line.

Exit codes as everywhere in dom0: 0 ok, 1 failure at run time (no CA, a CA
already there, a store or key file that cannot be used), 2 bad input (a
serial, a site suffix, a passphrase or its file). A failure is one line on
stderr; with --json the same as `{"ok": false, "error": ...}` on stdout.
The clock is read here, once per command, and passed down.
"""

from __future__ import annotations

import getpass
import json
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from controller.pki import ca, issue, report
from controller.pki.store import KINDS, CertRecord, UnknownSerial

PROG = "dom0 ca"


class _Usage(Exception):
    """Bad input: exit 2."""


def open_db(
    state_dir: str | Path, *, readonly: bool = False, create: bool = False
) -> sqlite3.Connection:
    """The state store's connection (made, with its directory, only if
    `create`). Through controller.store's opener, not a bare sqlite3.connect:
    a file made by sqlite3 alone would lack the store's schema record, and the
    controller would then refuse to start."""
    from controller.store import Store, StoreError

    path = Path(state_dir) / "state.sqlite"
    try:
        present = path.exists()
    except PermissionError:
        raise ca.CaError(f"{path}: permission denied (the state is root's: run as root)") from None
    if not create and not present:
        raise ca.CaError(f"no CA in {state_dir} (no state store there): dom0 ca init")
    try:
        return Store(state_dir, readonly=readonly).db
    except StoreError as e:
        raise ca.CaError(str(e)) from None


def _now() -> datetime:
    return datetime.now(UTC)


def _fail(action: str, error: str, code: int, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": error}))
    print(f"{PROG} {action}: {error}", file=sys.stderr)
    return code


def _run(action: str, as_json: bool, body: Any) -> int:
    try:
        return int(body())
    except _Usage as e:
        return _fail(action, str(e), 2, as_json)
    except (ca.PassphraseError, UnknownSerial) as e:
        return _fail(action, str(e), 2, as_json)
    except issue.PkiError as e:
        return _fail(action, str(e), 1, as_json)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(action, f"{where}{e.strerror or e}", 1, as_json)
    except sqlite3.Error as e:
        return _fail(action, f"the state store: {e}", 1, as_json)


def read_passphrase(passphrase_file: str | None, *, ask: bool, confirm: bool) -> bytes | None:
    """The passphrase from a file (its one line; `-` for stdin) or the
    terminal, or None for none."""
    if passphrase_file is not None and ask:
        raise _Usage("give --passphrase-file or --ask, not both")
    if ask:
        if not sys.stdin.isatty():
            raise _Usage("--ask needs a terminal; use --passphrase-file FILE (or - for stdin)")
        first = getpass.getpass("CA root key passphrase: ").encode()
        if confirm and getpass.getpass("again: ").encode() != first:
            raise _Usage("the two passphrases differ")
        passphrase = first
        where = "the passphrase"
    elif passphrase_file is None:
        return None
    else:
        where = f"passphrase file {passphrase_file}"
        try:
            if passphrase_file == "-":
                data = sys.stdin.buffer.read(ca.MAX_PASSPHRASE + 3)
            else:
                with open(passphrase_file, "rb") as f:
                    data = f.read(ca.MAX_PASSPHRASE + 3)
        except OSError as e:
            raise _Usage(f"cannot read {where}: {e.strerror or e}") from None
        passphrase = data.removesuffix(b"\n").removesuffix(b"\r")
        if b"\n" in passphrase:
            raise _Usage(f"{where} has more than one line (the passphrase is its one line)")
    if not passphrase:
        raise _Usage(f"{where} is empty")
    if len(passphrase) > ca.MAX_PASSPHRASE:
        raise _Usage(f"{where} is longer than {ca.MAX_PASSPHRASE} bytes")
    return passphrase


def _summary(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "serial": issue.serial_hex(cert.serial_number),
        "subject": cert.subject.rfc4514_string(),
        "not_after": issue.not_after(cert).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sha256": issue.fingerprint(cert),
    }


# -- the commands ------------------------------------------------------------------
def init_command(
    state_dir: str,
    *,
    tld: str = "internal",
    passphrase_file: str | None = None,
    ask_passphrase: bool = False,
    as_json: bool = False,
) -> int:
    def body() -> int:
        from controller.policy.names import suffix_problem

        problem = suffix_problem(tld)
        if problem:
            raise _Usage(f"--tld {tld!r}: {problem}")
        passphrase = read_passphrase(passphrase_file, ask=ask_passphrase, confirm=True)
        db = open_db(state_dir, create=True)
        try:
            now = _now()
            authority = ca.init(state_dir, db, tld, now, passphrase)
            (intermediate,) = authority.intermediates(now)
        finally:
            db.close()
        bundle = str(authority.dir / ca.BUNDLE)
        if as_json:
            out = {
                "ok": True,
                "root": _summary(authority.root),
                "intermediate": _summary(intermediate),
                "root_key_encrypted": passphrase is not None,
                "bundle": bundle,
            }
            print(json.dumps(out, indent=2))
        else:
            print(f"CA for {tld}: root serial {issue.serial_hex(authority.root.serial_number)}")
            print(f"  root sha256 {issue.fingerprint(authority.root)}")
            print(f"  trust bundle {bundle}")
            protection = "encrypted" if passphrase else "NOT encrypted (no passphrase)"
            print(f"  root key {authority.dir / ca.ROOT_KEY}: {protection}")
        return 0

    return _run("init", as_json, body)


def _records(state_dir: str) -> tuple[ca.CertificateAuthority, list[CertRecord]]:
    db = open_db(state_dir, readonly=True)
    try:
        authority = ca.load(state_dir, db)
        return authority, authority.store.all()
    finally:
        db.close()


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols = ["KIND", "SERIAL", "NAME", "EXPIRES (UTC)", "DAYS", "STATE"]
    cells = [
        [
            r["kind"],
            r["serial"],
            " ".join(x for x in (r["fqdn"], r["slot"]) if x) or r["subject"],
            (r["not_after"] or "").replace("T", " ").removesuffix("Z"),
            f"{r['days_left']:g}",
            r["state"] + (f" ({r['reason']})" if r["reason"] else ""),
        ]
        for r in rows
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return [line.rstrip() for line in lines]


def status_command(state_dir: str, *, as_json: bool = False) -> int:
    """The CA's certificates and every certificate in force, with expiry and warnings."""

    def body() -> int:
        now = _now()
        authority, records = _records(state_dir)
        # In force, and what the CA stands on whatever its state.
        rows = [
            row
            for row in report.status(records, now)
            if row["state"] == "valid" or row["kind"] == "root" or row["warning"]
        ]
        warnings = report.warnings(records, now)
        current = report.issuing(records, now)
        due = current is not None and issue.needs_rotation(current.certificate(), now)
        if as_json:
            out = {
                "ok": True,
                "tld": authority.tld,
                "warnings": warnings,
                "rotation_due": due,
                "certificates": rows,
            }
            print(json.dumps(out, indent=2))
            return 0
        agents = sum(1 for r in rows if r["kind"] == "agent")
        print(f"CA for {authority.tld}: {agents} agent certificates in force")
        for line in _table(rows):
            print(line)
        if due and current is not None:
            until = f"{current.not_after:%Y-%m-%d}"
            print(f"rotation due: the issuing intermediate expires on {until}: dom0 ca rotate")
        for w in warnings:
            print(f"warning: {w}")
        return 0

    return _run("status", as_json, body)


def list_command(state_dir: str, *, kind: str | None = None, as_json: bool = False) -> int:
    """Every certificate the CA ever issued (expired and revoked too)."""

    def body() -> int:
        if kind is not None and kind not in KINDS:
            raise _Usage(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
        now = _now()
        _, records = _records(state_dir)
        rows = report.status([r for r in records if kind is None or r.kind == kind], now)
        if as_json:
            print(json.dumps({"ok": True, "certificates": rows}, indent=2))
        else:
            for line in _table(rows):
                print(line)
        return 0

    return _run("list", as_json, body)


def revoke_command(
    state_dir: str, serial: str, *, reason: str = "unspecified", as_json: bool = False
) -> int:
    def body() -> int:
        try:
            wanted = issue.parse_serial(serial)
        except issue.PkiError as e:
            raise _Usage(str(e)) from None
        now = _now()
        db = open_db(state_dir)
        try:
            authority = ca.load(state_dir, db)
            before = authority.store.get(wanted)
            if before is None:
                raise _Usage(f"no certificate with serial {wanted} (see dom0 ca list)")
            record = authority.revoke(wanted, reason, now)
        finally:
            db.close()
        already = before.revoked
        if as_json:
            out = {
                "ok": True,
                "serial": record.serial,
                "kind": record.kind,
                "subject": record.subject,
                "revoked_at": report.status([record], now)[0]["revoked_at"],
                "reason": record.reason,
                "already_revoked": already,
            }
            print(json.dumps(out, indent=2))
        else:
            name = record.fqdn or record.subject
            verb = "was already" if already else "is"
            print(f"{record.kind} serial {record.serial} ({name}) {verb} revoked")
        return 0

    return _run("revoke", as_json, body)


def rotate_command(
    state_dir: str,
    *,
    passphrase_file: str | None = None,
    ask_passphrase: bool = False,
    force: bool = False,
    as_json: bool = False,
) -> int:
    def body() -> int:
        passphrase = read_passphrase(passphrase_file, ask=ask_passphrase, confirm=False)
        now = _now()
        db = open_db(state_dir)
        try:
            authority = ca.load(state_dir, db)
            new = authority.rotate(now, passphrase=passphrase, force=force)
            current = authority.intermediates(now)
        finally:
            db.close()
        if as_json:
            out = {
                "ok": True,
                "rotated": new is not None,
                "intermediate": _summary(new) if new is not None else None,
                "in_bundle": [_summary(c) for c in current],
                "bundle": str(authority.dir / ca.BUNDLE),
            }
            print(json.dumps(out, indent=2))
        elif new is None:
            until = f"{issue.not_after(current[0]):%Y-%m-%d}"
            print(f"no rotation needed: the issuing intermediate expires on {until} (--force)")
        else:
            print(
                f"new issuing intermediate serial {issue.serial_hex(new.serial_number)}, until "
                f"{issue.not_after(new):%Y-%m-%d}; {len(current)} in the bundle"
            )
        return 0

    return _run("rotate", as_json, body)


# -- the parser ----------------------------------------------------------------------
