"""dom0's CA on disk: the private keys under `STATE/ca/`, the certificates in
the state store, and the few operations that use both (init, rotate, issue,
revoke). The decisions (names, lifetimes, extensions, what is accepted) are
controller/pki/issue.py's; this module reads and writes files and rows.

Files (the directory 0700, every key 0600, each written to a temporary file,
fsync'd and renamed in, so a crash leaves the old file or the new one):

    STATE/ca/root.key                     the root's key, PKCS#8 PEM, encrypted
                                          when made with a passphrase
    STATE/ca/intermediate-SERIAL.key      one per issuing intermediate
    STATE/ca/server.pem  (0600)           the controller's key, its certificate
                                          and the issuing intermediate, in one
                                          file so that they always match
                                          (`SSLContext.load_cert_chain(path)`)
    STATE/ca/bundle.pem  (0644)           the trust bundle: the root and the
                                          intermediates in force

The root key is read only by `init` and `rotate`; a passphrase keeps it
useless to whoever copies the state directory. A key file that its group or
others can read, or that another user owns, is refused, not tightened (as
common/wireguard/keys.py does): it must be considered leaked.
No message, log line or exception here carries key material.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import sqlite3
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from controller.pki import issue, report
from controller.pki.store import CaStore, CertRecord

log = logging.getLogger(__name__)

CA_DIR = "ca"
ROOT_KEY = "root.key"
SERVER_PEM = "server.pem"
BUNDLE = "bundle.pem"
MAX_KEY_FILE = 64 * 1024  # a P-256 key with its chain is ~2 KB
MAX_PASSPHRASE = 1023  # what OpenSSL's PEM encryption takes


class CaError(issue.PkiError):
    """The CA cannot do what was asked; one line, naming the file or serial."""


class PassphraseError(CaError):
    """No passphrase for an encrypted root key, a wrong one, or one unusable."""


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    chain_pem: bytes  # the certificate, then the intermediate that issued it

    @property
    def serial(self) -> str:
        return issue.serial_hex(self.certificate.serial_number)


def ca_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / CA_DIR


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def check_passphrase(passphrase: bytes | None) -> None:
    if passphrase is not None and not 0 < len(passphrase) <= MAX_PASSPHRASE:
        raise PassphraseError(
            f"a passphrase has 1 to {MAX_PASSPHRASE} bytes, this one {len(passphrase)}"
        )


# -- files ---------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically: a temporary file next door, fsync'd, renamed over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _key_bytes(key: issue.CaKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _read_secret(path: Path) -> bytes:
    """A key file's bytes, its ownership and mode checked on the open descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise CaError(f"{path}: missing (the CA's keys are incomplete)") from None
    except OSError as e:
        raise CaError(f"{path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CaError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise CaError(f"{path} is owned by uid {st.st_uid}, expected {os.geteuid()}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CaError(
                f"{path} has mode {mode:04o}, expected 0600: the key may have leaked; "
                f"if the exposure is known to be harmless, chmod 600 {path}"
            )
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise CaError(f"{path} is not a key file (larger than {MAX_KEY_FILE} bytes)")
    return data


def _load_key(path: Path, passphrase: bytes | None = None) -> issue.CaKey:
    data = _read_secret(path)
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and passphrase is None:
        raise PassphraseError(
            f"{path} is encrypted: give its passphrase (--passphrase-file or --ask)"
        )
    if passphrase is not None and not encrypted:
        # Said, not ignored: whoever gives one believes the key is protected.
        raise PassphraseError(f"{path} is not encrypted, but a passphrase was given")
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except (ValueError, TypeError):
        # cryptography's messages carry no key bytes, but the chain of causes is
        # dropped too: nothing of the file's content travels on from here.
        if encrypted:
            raise PassphraseError(f"{path}: wrong passphrase, or a damaged key file") from None
        raise CaError(f"{path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaError(f"{path}: not an EC P-256 key")
    return key


def _same_key(key: issue.CaKey, cert: x509.Certificate) -> bool:
    spki = (Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


# -- the CA ----------------------------------------------------------------------
class CertificateAuthority:
    """A loaded CA: its root certificate, its store, its key directory.
    Keys are read from their files when used, never kept."""

    def __init__(self, state_dir: str | Path, store: CaStore, root: x509.Certificate) -> None:
        self.state_dir = Path(state_dir)
        self.dir = ca_dir(state_dir)
        self.store = store
        self.root = root

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.dir}, root serial {issue.serial_hex(self.root.serial_number)})"

    # -- reading ---------------------------------------------------------------
    @property
    def tld(self) -> str:
        org = self.root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(org[0].value).removeprefix("dom0 ") if org else "?"

    def root_key_encrypted(self) -> bool:
        """Whether `rotate` needs a passphrase (the controller cannot rotate alone)."""
        return b"ENCRYPTED PRIVATE KEY" in _read_secret(self.dir / ROOT_KEY)

    def intermediates(self, now: datetime) -> list[x509.Certificate]:
        """The intermediates in force, the issuing one first."""
        return [r.certificate() for r in self.store.current("intermediate", now)]

    def revoked(self) -> set[str]:
        return self.store.revoked()

    def bundle_pem(self, now: datetime) -> bytes:
        """The trust bundle: the root, then every intermediate in force (two
        of them between a rotation and the old one's expiry)."""
        return _pem(self.root) + b"".join(_pem(c) for c in self.intermediates(now))

    def status(self, now: datetime) -> list[dict[str, Any]]:
        return report.status(self.store.all(), now)

    def warnings(self, now: datetime) -> list[str]:
        return report.warnings(self.store.all(report.WATCHED), now)

    def _intermediate_key_path(self, serial: str) -> Path:
        return self.dir / f"intermediate-{serial}.key"

    def issuer(self, now: datetime) -> tuple[x509.Certificate, issue.CaKey]:
        """The issuing intermediate and its key."""
        live = self.store.current("intermediate", now)  # as report.issuing chooses
        if not live:
            raise CaError("no issuing intermediate in force (expired or revoked): dom0 ca rotate")
        current = live[0]
        cert = current.certificate()
        path = self._intermediate_key_path(current.serial)
        key = _load_key(path)
        if not _same_key(key, cert):
            raise CaError(f"{path} is not the key of intermediate serial {current.serial}")
        return cert, key

    # -- writing ---------------------------------------------------------------
    def write_bundle(self, now: datetime) -> Path:
        path = self.dir / BUNDLE
        _write(path, self.bundle_pem(now), 0o644)
        return path

    def _root_key(self, passphrase: bytes | None) -> issue.CaKey:
        path = self.dir / ROOT_KEY
        key = _load_key(path, passphrase)
        if not _same_key(key, self.root):
            raise CaError(f"{path} is not the key of the root in the store")
        return key

    def rotate(
        self,
        now: datetime,
        *,
        passphrase: bytes | None = None,
        force: bool = False,
        days: int = issue.INTERMEDIATE_DAYS,
        overlap_days: int = issue.ROTATION_OVERLAP_DAYS,
    ) -> x509.Certificate | None:
        """A new issuing intermediate if the current one has `overlap_days`
        or less to live (or none is in force, or `force`); None if not needed.
        The old one stays in the bundle until it expires."""
        if days <= overlap_days:
            raise CaError(
                f"an intermediate of {days} days cannot overlap its successor by {overlap_days}"
            )
        current = self.store.current("intermediate", now)
        if (
            current
            and not force
            and not issue.needs_rotation(current[0].certificate(), now, overlap_days)
        ):
            return None
        if now >= issue.not_after(self.root):
            raise CaError("the root has expired: a new CA is needed (docs/ca.md)")
        root_key = self._root_key(passphrase)
        key = issue.new_key()
        cert = issue.make_intermediate(key, self.root, root_key, now, days)
        serial = issue.serial_hex(cert.serial_number)
        # The key first: a key without its row is litter, a row without its
        # key an intermediate that cannot sign.
        _write(self._intermediate_key_path(serial), _key_bytes(key), 0o600)
        self.store.add(cert, "intermediate")
        self.write_bundle(now)
        log.info("CA: new issuing intermediate serial %s, until %s", serial, issue.not_after(cert))
        return cert

    def issue_server(
        self,
        dns_names: Iterable[str],
        ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
        now: datetime,
        days: int = issue.SERVER_DAYS,
        to: Path | None = None,
    ) -> Issued:
        """A new key and certificate for the controller, into STATE/ca/server.pem
        (or `to`: another of dom0's servers, e.g. its DNS over TLS)."""
        issuer, issuer_key = self.issuer(now)
        key = issue.new_key()
        cert = issue.make_server(
            key.public_key(), issuer, issuer_key, dns_names, ip_addresses, now, days
        )
        chain = _pem(cert) + _pem(issuer)
        self.store.add(cert, "server")
        # The root goes in the handshake too: an enrolling agent has only the
        # fingerprint its token carries, and pins the root it finds by it
        # (agents/identity.py); a verifying client ignores an extra anchor.
        _write(to or self.dir / SERVER_PEM, _key_bytes(key) + chain + _pem(self.root), 0o600)
        log.info(
            "CA: server certificate serial %s for %s, until %s",
            issue.serial_hex(cert.serial_number),
            cert.subject.rfc4514_string(),
            issue.not_after(cert),
        )
        return Issued(cert, chain)

    def issue_agent(
        self,
        csr_pem: bytes | str,
        fqdn: str,
        slot_uri: str,
        now: datetime,
        hours: float = issue.AGENT_HOURS,
    ) -> Issued:
        """An agent's certificate for the key in its CSR, recorded before it is handed out."""
        issuer, issuer_key = self.issuer(now)
        cert = issue.sign_agent_csr(csr_pem, fqdn, slot_uri, issuer, issuer_key, now, hours)
        self.store.add(cert, "agent")
        log.info(
            "CA: agent certificate serial %s for %s (%s), until %s",
            issue.serial_hex(cert.serial_number),
            fqdn,
            slot_uri,
            issue.not_after(cert),
        )
        return Issued(cert, _pem(cert) + _pem(issuer))

    def revoke(self, serial: str, reason: str, now: datetime) -> CertRecord:
        """Revoke by serial (any spelling `issue.parse_serial` reads). The root
        cannot be: a CA that distrusts its root is a new CA."""
        serial = issue.parse_serial(serial)
        before = self.store.get(serial)
        if before is not None and before.kind == "root":
            raise CaError(
                f"serial {serial} is the root: it cannot be revoked; make a new CA instead"
            )
        record = self.store.revoke(serial, reason, now)
        if before is None or before.revoked:
            return record  # revoked before: nothing changes
        if record.kind == "intermediate":
            self.write_bundle(now)
        log.warning("CA: revoked %s serial %s (%s)", record.kind, serial, record.reason)
        return record


# -- making and finding one --------------------------------------------------------
def _has_table(db: sqlite3.Connection) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='certificates'"
    return db.execute(query).fetchone() is not None


def _root_record(db: sqlite3.Connection) -> CertRecord | None:
    if not _has_table(db):
        return None
    roots = CaStore(db).current("root")
    return roots[0] if roots else None


def exists(state_dir: str | Path, db: sqlite3.Connection) -> bool:
    return ca_dir(state_dir).exists() or _root_record(db) is not None


def init(
    state_dir: str | Path,
    db: sqlite3.Connection,
    tld: str,
    now: datetime,
    passphrase: bytes | None = None,
    *,
    root_years: int = issue.ROOT_YEARS,
    intermediate_days: int = issue.INTERMEDIATE_DAYS,
) -> CertificateAuthority:
    """A new CA: root and first intermediate. Refuses if one exists.

    The keys are written into a fresh directory that is renamed to STATE/ca
    in one step, then the certificates are recorded in one transaction. A
    crash between the two leaves keys without certificates, which `load`
    names as an interrupted init."""
    state = Path(state_dir)
    target = ca_dir(state)
    check_passphrase(passphrase)
    if exists(state, db):
        raise CaError(f"{target}: a CA exists already (see dom0 ca status)")
    store = CaStore(db)
    store.ensure_schema()
    root_key = issue.new_key()
    root = issue.make_root(root_key, tld, now, root_years)
    key = issue.new_key()
    intermediate = issue.make_intermediate(key, root, root_key, now, intermediate_days)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = state / f".{CA_DIR}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(mode=0o700)
    try:
        os.chmod(tmp, 0o700)  # whatever the umask
        _write(tmp / ROOT_KEY, _key_bytes(root_key, passphrase), 0o600)
        serial = issue.serial_hex(intermediate.serial_number)
        _write(tmp / f"intermediate-{serial}.key", _key_bytes(key), 0o600)
        os.rename(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CaError(f"{target}: cannot write the CA's keys: {e.strerror or e}") from None
    _fsync_dir(state)
    store.add_all([(root, "root"), (intermediate, "intermediate")])
    ca = CertificateAuthority(state, store, root)
    ca.write_bundle(now)
    log.info(
        "CA: new root serial %s (%s), intermediate serial %s, root key %s",
        issue.serial_hex(root.serial_number),
        root.subject.rfc4514_string(),
        serial,
        "encrypted" if passphrase else "not encrypted",
    )
    return ca


def load(state_dir: str | Path, db: sqlite3.Connection) -> CertificateAuthority:
    target = ca_dir(state_dir)
    record = _root_record(db)
    if record is None:
        if target.exists():
            raise CaError(
                f"{target} holds keys but the store no root certificate (an interrupted "
                f"dom0 ca init?): remove {target} and init again"
            )
        raise CaError(f"no CA in {state_dir}: dom0 ca init")
    if not target.is_dir():
        raise CaError(f"{target}: missing, but the store has a CA: its keys are lost")
    return CertificateAuthority(state_dir, CaStore(db), record.certificate())


def warnings(db: sqlite3.Connection, now: datetime) -> list[str]:
    """The CA's warnings from the store alone (no key is read), for `dom0
    status`: none where no CA was ever made."""
    if not _has_table(db):
        return []
    return report.warnings(CaStore(db).all(report.WATCHED), now)
