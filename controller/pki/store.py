"""Certificates, serials and revocations of dom0's CA, in the state store.

Every certificate the CA issues is recorded (PEM and the fields one asks
about: kind, serial, names, validity) before it is handed out, so that `dom0
ca list` knows every certificate in the wild and a serial can be revoked by
its number alone. Revocation is a timestamp on the row: the controller
refuses a revoked serial at its next handshake, there is no CRL to publish
because the controller is the only party that verifies agent certificates.

Serials are lower-case hex without padding (`issue.serial_hex`); times are
UTC seconds since the epoch. The connection is the caller's: this class
only adds a table and reads and writes it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from controller.pki.issue import PkiError, not_after, not_before, parse_slot_uri, serial_hex

Kind = Literal["root", "intermediate", "server", "agent"]
KINDS: tuple[Kind, ...] = get_args(Kind)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ({", ".join(repr(k) for k in KINDS)})),
    subject TEXT NOT NULL,
    fqdn TEXT,
    slot TEXT,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    pem TEXT NOT NULL,
    revoked_at INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS certificates_slot ON certificates (slot);
CREATE INDEX IF NOT EXISTS certificates_kind ON certificates (kind, not_after);
"""
_COLUMNS = "serial, kind, subject, fqdn, slot, not_before, not_after, pem, revoked_at, reason"


class CaStoreError(PkiError):
    pass


class UnknownSerial(CaStoreError):
    pass


@dataclass(frozen=True)
class CertRecord:
    serial: str
    kind: Kind
    subject: str
    fqdn: str | None
    slot: str | None  # the slot URI, `dom0:slot/web/1`
    not_before: datetime
    not_after: datetime
    pem: str
    revoked_at: datetime | None
    reason: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem.encode("ascii"))

    def in_force(self, now: datetime) -> bool:
        return not self.revoked and self.not_before <= now <= self.not_after


def _ts(t: datetime) -> int:
    return int(t.timestamp())


def _dt(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _record(row: tuple) -> CertRecord:
    serial, kind, subject, fqdn, slot, nb, na, pem, revoked_at, reason = row
    return CertRecord(
        serial=serial,
        kind=kind,
        subject=subject,
        fqdn=fqdn,
        slot=slot,
        not_before=datetime.fromtimestamp(nb, UTC),
        not_after=datetime.fromtimestamp(na, UTC),
        pem=pem,
        revoked_at=_dt(revoked_at),
        reason=reason,
    )


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction of ours, or a part of the caller's if one is open."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class CaStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def ensure_schema(self) -> None:
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)

    def _transaction(self) -> contextlib.AbstractContextManager[None]:
        return transaction(self.db)

    def add(self, cert: x509.Certificate, kind: Kind) -> CertRecord:
        return self.add_all([(cert, kind)])[0]

    def add_all(self, certs: list[tuple[x509.Certificate, Kind]]) -> list[CertRecord]:
        """Several certificates in one transaction (a new CA: root and intermediate)."""
        records = [_new_record(cert, kind) for cert, kind in certs]
        with self._transaction():
            for r in records:
                try:
                    self.db.execute(
                        f"INSERT INTO certificates ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (
                            r.serial,
                            r.kind,
                            r.subject,
                            r.fqdn,
                            r.slot,
                            _ts(r.not_before),
                            _ts(r.not_after),
                            r.pem,
                            None,
                            None,
                        ),
                    )
                except sqlite3.IntegrityError:
                    raise CaStoreError(f"serial {r.serial} is already in the store") from None
        return records

    def get(self, serial: str) -> CertRecord | None:
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM certificates WHERE serial=?", (serial,)
        ).fetchone()
        return None if row is None else _record(row)

    def revoke(self, serial: str, reason: str, now: datetime) -> CertRecord:
        """Revoke by serial. Revoking it again changes nothing (the first time
        and reason stay); an unknown serial is an error."""
        with self._transaction():
            self.db.execute(
                "UPDATE certificates SET revoked_at=?, reason=? "
                "WHERE serial=? AND revoked_at IS NULL",
                (_ts(now), reason, serial),
            )
            record = self.get(serial)
        if record is None:
            raise UnknownSerial(f"no certificate with serial {serial} (see dom0 ca list)")
        return record

    def revoke_slot(self, slot_uri: str, reason: str, now: datetime) -> list[str]:
        """Revoke every unrevoked certificate naming a slot: for when the slot
        passes to another machine. The serials revoked."""
        with self._transaction():
            serials = [
                s
                for (s,) in self.db.execute(
                    "SELECT serial FROM certificates WHERE slot=? AND revoked_at IS NULL",
                    (slot_uri,),
                )
            ]
            self.db.execute(
                "UPDATE certificates SET revoked_at=?, reason=? WHERE slot=? AND revoked_at IS NULL",
                (_ts(now), reason, slot_uri),
            )
        return serials

    def revoked(self) -> set[str]:
        return {
            s
            for (s,) in self.db.execute(
                "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL"
            )
        }

    def all(self, kinds: Collection[Kind] = KINDS) -> list[CertRecord]:
        """Every certificate (of `kinds`), CA first, then by expiry (a tie: in
        the order issued)."""
        order = " ".join(f"WHEN {k!r} THEN {i}" for i, k in enumerate(KINDS))
        marks = ",".join("?" * len(kinds))
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM certificates WHERE kind IN ({marks}) "
            f"ORDER BY CASE kind {order} END, not_after, rowid",
            tuple(kinds),
        )
        return [_record(row) for row in rows]

    def prune(self, expired_before: datetime) -> int:
        """Forget leaves that expired before `expired_before` (revoked or not:
        expired, they are refused anyway). Every renewal adds a row; the
        CA's own certificates are kept. How many were removed."""
        with self._transaction():
            cur = self.db.execute(
                "DELETE FROM certificates WHERE kind IN ('server', 'agent') AND not_after < ?",
                (_ts(expired_before),),
            )
        return cur.rowcount

    def current(self, kind: Kind, now: datetime | None = None) -> list[CertRecord]:
        """The unrevoked certificates of a kind (and valid at `now` if given),
        the one that lives longest first: the root, the issuing intermediate."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM certificates WHERE kind=? AND revoked_at IS NULL "
            "ORDER BY not_after DESC, rowid DESC",  # a tie (same second): the newer
            (kind,),
        )
        records = [_record(row) for row in rows]
        return [r for r in records if now is None or r.in_force(now)]


def _new_record(cert: x509.Certificate, kind: Kind) -> CertRecord:
    if kind not in KINDS:
        raise CaStoreError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    fqdn = slot = None
    if kind == "agent":
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        fqdn = str(cns[0].value) if cns else None
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
        slot = uris[0] if uris else None
        if slot is not None:
            parse_slot_uri(slot)
    elif kind == "server":
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        fqdn = str(cns[0].value) if cns else None
    return CertRecord(
        serial=serial_hex(cert.serial_number),
        kind=kind,
        subject=cert.subject.rfc4514_string(),
        fqdn=fqdn,
        slot=slot,
        not_before=not_before(cert),
        not_after=not_after(cert),
        pem=cert.public_bytes(Encoding.PEM).decode("ascii"),
        revoked_at=None,
        reason=None,
    )
