"""Issuance policy of dom0's CA: what it signs, for how long, and what it
accepts back as one of its own certificates. Pure: keys, names and `now` come
in, certificates and verdicts go out; the clock is never read here and
nothing touches a file (the shell, controller/pki/ca.py, does that).

The hierarchy is root -> issuing intermediate -> leaf. The root signs only
intermediates (pathlen 1, so an intermediate can sign leaves but no further
CA); intermediates (pathlen 0) sign the controller's server certificate and
the agents' client certificates. An agent leaf names its machine twice: its
fqdn (CN and a DNS SAN) and its rule slot (a URI SAN, see `slot_uri`), which
is what the identity of a machine belongs to.

Keys are ECDSA P-256 rather than Ed25519: OpenSSL (Python's ssl) does TLS 1.3
with either, but the certificates this CA signs are also read by clients we
do not choose (DNS-over-TLS resolvers, mail clients, curl/GnuTLS builds, the
browser of an operator), and P-256 is the one every one of them verifies.
Agents may bring Ed25519 keys in their CSRs: only the controller (OpenSSL)
verifies agent certificates.

The installed `cryptography` (Debian's 38) has no path validation API
(`x509.verification` came in 42), so `verify_chain` checks the path itself:
signatures, validity, names, CA flags, path length, key usages, revocation.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import re
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.policy.names import MAX_NAME, is_label, suffix_problem

# Certificates start a little in the past: a VM's clock that lags at boot
# must not find its brand new certificate "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)
ROOT_YEARS = 10
INTERMEDIATE_DAYS = 365
SERVER_DAYS = 90
AGENT_HOURS = 24
ROTATION_OVERLAP_DAYS = 90  # a new intermediate this long before the old expires
WARN_DAYS = 30  # root or issuing intermediate expiring within this: a warning
MAX_CSR = 16 * 1024  # a P-256 CSR is ~500 bytes of PEM; a tenant sends this one
_HASH = hashes.SHA256()

# The policy's rule-name grammar (controller/policy/load.py); a slot is >= 1.
_SLOT_URI = re.compile(r"dom0:slot/([a-z0-9][a-z0-9_-]{0,62})/([1-9][0-9]{0,8})")  # fullmatch
SLOT_URI_PREFIX = "dom0:slot/"
_NAME_CHARS = re.compile(r"[a-z0-9.-]+")

CaKey = ec.EllipticCurvePrivateKey
LeafPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class PkiError(Exception):
    """A request the CA refuses, or a certificate it does not accept. The
    message is one line and names certificates by serial and subject only:
    never key material, never the bytes a tenant sent."""


class CsrError(PkiError):
    pass


class ChainError(PkiError):
    pass


class Slot(NamedTuple):
    rule: str
    number: int


class Identity(NamedTuple):
    """Who an agent certificate speaks for."""

    fqdn: str
    slot: Slot


# -- names ---------------------------------------------------------------------
def slot_uri(rule: str, slot: int) -> str:
    """The URI SAN naming a rule slot: `dom0:slot/RULE/N` (`dom0:slot/web/1`).
    One spelling per slot (no leading zeros), so comparing text is enough."""
    uri = f"{SLOT_URI_PREFIX}{rule}/{slot}"
    if not _SLOT_URI.fullmatch(uri):
        raise PkiError(
            f"no slot URI for rule {rule!r} slot {slot!r}: expected a rule name "
            "(a-z, 0-9, '_', '-', at most 63) and a slot >= 1"
        )
    return uri


def parse_slot_uri(uri: str) -> Slot:
    m = _SLOT_URI.fullmatch(uri)
    if not m:
        raise PkiError(f"{uri!r} is not a slot URI (expected {SLOT_URI_PREFIX}RULE/N)")
    return Slot(m[1], int(m[2]))


def check_fqdn(fqdn: str) -> str:
    labels = fqdn.split(".")
    if (
        len(fqdn) > MAX_NAME
        or len(labels) < 2
        or not _NAME_CHARS.fullmatch(fqdn)  # (is_label's `$` lets a final newline pass)
        or not all(is_label(label) for label in labels)
    ):
        raise PkiError(
            f"{fqdn!r} is not a machine's name (lower-case DNS labels, at least two, "
            f"at most {MAX_NAME} characters)"
        )
    return fqdn


def serial_hex(serial: int) -> str:
    """How serials are written everywhere in dom0: lower-case hex, no padding."""
    return format(serial, "x")


def parse_serial(text: str) -> str:
    """A serial as an operator may paste it (`3A:5F:..`, `0x3a5f`, upper case)."""
    raw = text.strip().lower().replace(":", "")
    raw = raw.removeprefix("0x")
    if not raw or len(raw) > 42 or not re.fullmatch(r"[0-9a-f]+", raw):
        raise PkiError(f"{text!r} is not a certificate serial (hex, as `dom0 ca list` shows it)")
    return serial_hex(int(raw, 16))


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def describe(cert: x509.Certificate) -> str:
    return f"serial {serial_hex(cert.serial_number)} ({cert.subject.rfc4514_string()})"


# -- time ----------------------------------------------------------------------
def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware (datetime.now(UTC))")
    return now.astimezone(UTC)


def not_before(cert: x509.Certificate) -> datetime:
    # `not_valid_before` is naive UTC in cryptography 38 (`*_utc` came in 42).
    return cert.not_valid_before.replace(tzinfo=UTC)


def not_after(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after.replace(tzinfo=UTC)


def needs_rotation(
    intermediate: x509.Certificate, now: datetime, overlap_days: int = ROTATION_OVERLAP_DAYS
) -> bool:
    """True once the intermediate has `overlap_days` or less to live: its
    successor is issued then, and both stay in the trust bundle."""
    return not_after(intermediate) - _aware(now) <= timedelta(days=overlap_days)


def renew_at(cert: x509.Certificate, rng: random.Random) -> datetime:
    """When a holder should renew: at half the certificate's life, give or
    take 10% of it, so that agents started together do not renew together."""
    start, end = not_before(cert), not_after(cert)
    life = end - start
    return start + life / 2 + life * rng.uniform(-0.1, 0.1)


def expiry_warning(kind: str, not_after_: datetime, now: datetime) -> str | None:
    """The warning for a root or issuing intermediate expiring within
    WARN_DAYS (or expired), as a phrase, or None."""
    left = not_after_ - _aware(now)
    if left <= timedelta(0):
        return f"the {kind} expired on {not_after_:%Y-%m-%d %H:%M}Z"
    if left <= timedelta(days=WARN_DAYS):
        return f"the {kind} expires in {left.days} days, on {not_after_:%Y-%m-%d %H:%M}Z"
    return None


# -- issuance ------------------------------------------------------------------
def new_key() -> CaKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: LeafPublicKey,
    start: datetime,
    end: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())  # 159 random bits from os.urandom
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,  # TLS 1.3 with an EC or Ed25519 key signs; nothing else
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _short_id(public_key: ec.EllipticCurvePublicKey) -> str:
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest.hex()[:8]


def make_root(
    key: CaKey, site_tld: str, now: datetime, years: int = ROOT_YEARS
) -> x509.Certificate:
    problem = suffix_problem(site_tld)
    if problem:
        raise PkiError(f"site suffix {site_tld!r}: {problem}")
    now = _aware(now)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"dom0 {site_tld}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"dom0 root CA {_short_id(key.public_key())}"),
        ]
    )
    # 365 days a year: a root made on 29 February still has an end date.
    end = now + timedelta(days=365 * years)
    return (
        _builder(name, name, key.public_key(), now, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .sign(key, _HASH)
    )


def make_intermediate(
    key: CaKey,
    root_cert: x509.Certificate,
    root_key: CaKey,
    now: datetime,
    days: int = INTERMEDIATE_DAYS,
) -> x509.Certificate:
    """An issuing CA, named by its start date and key id so that two of them
    in the bundle at once are told apart by name as well as by key."""
    now = _aware(now)
    org = root_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    name = x509.Name(
        [
            *org,
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                f"dom0 issuing CA {now:%Y-%m-%d} {_short_id(key.public_key())}",
            ),
        ]
    )
    end = min(now + timedelta(days=days), not_after(root_cert))
    return (
        _builder(name, root_cert.subject, key.public_key(), now, end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(_authority_key_id(root_cert), critical=False)
        .sign(root_key, _HASH)
    )


def _leaf(
    subject: x509.Name,
    public_key: LeafPublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: CaKey,
    now: datetime,
    life: timedelta,
    names: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> x509.Certificate:
    now = _aware(now)
    if now >= not_after(issuer_cert):
        raise PkiError(f"issuer {describe(issuer_cert)} has expired: dom0 ca rotate")
    end = min(now + life, not_after(issuer_cert))  # a leaf never outlives its issuer
    return (
        _builder(subject, issuer_cert.subject, public_key, now, end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(_authority_key_id(issuer_cert), critical=False)
        .sign(issuer_key, _HASH)
    )


def make_server(
    public_key: ec.EllipticCurvePublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: CaKey,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
    now: datetime,
    days: int = SERVER_DAYS,
) -> x509.Certificate:
    """The controller's TLS server certificate (agents, DNS-over-TLS)."""
    dns = [check_fqdn(n) if "." in n else _label(n) for n in dns_names]
    try:
        ips = [ipaddress.ip_address(a) for a in ip_addresses]
    except ValueError as e:
        raise PkiError(f"server certificate: {e}") from None
    if not dns and not ips:
        raise PkiError("server certificate: give at least one DNS name or address")
    cn = dns[0] if dns else str(ips[0])
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    names += [x509.IPAddress(a) for a in ips]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return _leaf(
        subject,
        public_key,
        issuer_cert,
        issuer_key,
        now,
        timedelta(days=days),
        names,
        ExtendedKeyUsageOID.SERVER_AUTH,
    )


def _label(name: str) -> str:
    if not _NAME_CHARS.fullmatch(name) or not is_label(name):
        raise PkiError(f"{name!r} is not a DNS name")
    return name


def csr_public_key(csr_pem: bytes | str) -> LeafPublicKey:
    """The public key of a CSR from a tenant, once the CSR is checked: well
    formed, signed by that key (it proves possession), EC P-256 or Ed25519."""
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR:
        raise CsrError(f"CSR refused: {len(data)} bytes, at most {MAX_CSR}")
    try:
        csr = x509.load_pem_x509_csr(data)
        key = csr.public_key()
    except ValueError:
        raise CsrError("CSR refused: not a PEM certificate signing request") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise CsrError(f"CSR refused: EC key on {key.curve.name}, expected P-256 or Ed25519")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CsrError(f"CSR refused: a {type(key).__name__}, expected EC P-256 or Ed25519")
    try:
        valid = csr.is_signature_valid
    except Exception:  # an algorithm OpenSSL cannot verify proves nothing
        valid = False
    if not valid:
        raise CsrError("CSR refused: its signature does not verify")
    return key


def sign_agent_csr(
    csr_pem: bytes | str,
    fqdn: str,
    slot_uri_: str,
    issuer_cert: x509.Certificate,
    issuer_key: CaKey,
    now: datetime,
    hours: float = AGENT_HOURS,
) -> x509.Certificate:
    """An agent's client certificate. Of the CSR only the public key is used:
    the subject and extensions it asks for are ignored, the names are the
    ones the controller decided (the machine's fqdn and its rule slot)."""
    parse_slot_uri(slot_uri_)
    check_fqdn(fqdn)
    public_key = csr_public_key(csr_pem)
    if not 0 < hours <= 24 * 30:
        raise PkiError(f"agent certificate lifetime {hours} h: expected 0 < hours <= 720")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)])
    names = [x509.DNSName(fqdn), x509.UniformResourceIdentifier(slot_uri_)]
    return _leaf(
        subject,
        public_key,
        issuer_cert,
        issuer_key,
        now,
        timedelta(hours=hours),
        names,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )


# -- verification ----------------------------------------------------------------
def agent_identity(cert: x509.Certificate) -> Identity:
    """The (fqdn, slot) an agent certificate names: exactly one DNS SAN equal
    to its CN, exactly one slot URI SAN. For a certificate whose path is
    already verified (by OpenSSL during the handshake, or `verify_chain`)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ChainError(f"{describe(cert)}: no subjectAltName, not an agent certificate") from None
    dns = san.get_values_for_type(x509.DNSName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(dns) != 1 or len(uris) != 1 or cns != dns:
        raise ChainError(
            f"{describe(cert)}: an agent certificate names one fqdn (CN and DNS) and one "
            f"slot URI; this one has DNS {dns}, URI {uris}"
        )
    try:
        slot = parse_slot_uri(uris[0])
    except PkiError as e:
        raise ChainError(f"{describe(cert)}: {e}") from None
    return Identity(dns[0], slot)


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Iterable[x509.Certificate],
    root: x509.Certificate,
    now: datetime,
    revoked_serials: Collection[str],
) -> Identity:
    """An agent certificate checked against the trust anchor `root`, through
    one of `intermediates`, at `now`; its identity, or ChainError."""
    _verify_path(leaf, intermediates, root, now, revoked_serials, ExtendedKeyUsageOID.CLIENT_AUTH)
    return agent_identity(leaf)


def verify_server(
    leaf: x509.Certificate,
    intermediates: Iterable[x509.Certificate],
    root: x509.Certificate,
    now: datetime,
    revoked_serials: Collection[str],
    name: str,
) -> None:
    """The controller's server certificate checked as a client would, for `name`."""
    _verify_path(leaf, intermediates, root, now, revoked_serials, ExtendedKeyUsageOID.SERVER_AUTH)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    try:
        wanted: object = ipaddress.ip_address(name)
        found = wanted in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        found = name in san.get_values_for_type(x509.DNSName)
    if not found:
        raise ChainError(f"{describe(leaf)}: not issued for {name!r}")


def _verify_path(
    leaf: x509.Certificate,
    intermediates: Iterable[x509.Certificate],
    root: x509.Certificate,
    now: datetime,
    revoked: Collection[str],
    usage: x509.ObjectIdentifier,
) -> None:
    now = _aware(now)
    _check_signed_by(root, root)
    _check_ca(root, below=1)
    issuer = _find_issuer(leaf, intermediates)
    _check_signed_by(issuer, root)
    _check_ca(issuer, below=0)
    for cert in (root, issuer, leaf):
        _check_time(cert, now)
        _check_critical(cert)
        if serial_hex(cert.serial_number) in revoked:
            raise ChainError(f"{describe(cert)} is revoked")
    if _basic(leaf).ca:
        raise ChainError(f"{describe(leaf)} is a CA, not a leaf certificate")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise ChainError(f"{describe(leaf)}: its key usage does not allow TLS")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise ChainError(f"{describe(leaf)}: no extended key usage") from None
    if usage not in eku:
        raise ChainError(
            f"{describe(leaf)}: not for {_USAGE_NAMES.get(usage, usage.dotted_string)}"
        )


def _find_issuer(
    leaf: x509.Certificate, candidates: Iterable[x509.Certificate]
) -> x509.Certificate:
    for cert in candidates:
        # A self-issued certificate (the root, if given the whole bundle) is
        # no intermediate: the root signs intermediates only.
        if cert.subject == leaf.issuer and cert.subject != cert.issuer:
            try:
                _check_signed_by(leaf, cert)
            except ChainError:
                continue  # same name, another key (a damaged bundle): try the next
            return cert
    raise ChainError(
        f"{describe(leaf)}: not issued by this CA (issuer {leaf.issuer.rfc4514_string()})"
    )


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    if cert.issuer != issuer.subject:
        raise ChainError(f"{describe(cert)}: not issued by {describe(issuer)}")
    key = issuer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = cert.signature_hash_algorithm
            if algorithm is None:
                raise InvalidSignature
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            raise ChainError(f"{describe(issuer)}: a {type(key).__name__}, not a key of this CA")
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        raise ChainError(f"{describe(cert)}: its signature does not verify") from None


def _basic(cert: x509.Certificate) -> x509.BasicConstraints:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return x509.BasicConstraints(ca=False, path_length=None)


def _check_ca(cert: x509.Certificate, below: int) -> None:
    """A CA certificate with at least `below` CA certificates allowed under it."""
    basic = _basic(cert)
    if not basic.ca:
        raise ChainError(f"{describe(cert)} is not a CA")
    if basic.path_length is not None and basic.path_length < below:
        raise ChainError(f"{describe(cert)}: its path length does not allow this chain")
    try:
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            raise ChainError(f"{describe(cert)}: its key usage does not allow signing certificates")
    except x509.ExtensionNotFound:
        raise ChainError(f"{describe(cert)}: a CA without key usage") from None


def _check_time(cert: x509.Certificate, now: datetime) -> None:
    if now < not_before(cert):
        raise ChainError(f"{describe(cert)} is not valid before {not_before(cert):%Y-%m-%d %H:%M}Z")
    if now > not_after(cert):
        raise ChainError(f"{describe(cert)} expired on {not_after(cert):%Y-%m-%d %H:%M}Z")


_USAGE_NAMES = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "TLS client authentication",
    ExtendedKeyUsageOID.SERVER_AUTH: "TLS server authentication",
}
_KNOWN = {
    x509.BasicConstraints.oid,
    x509.KeyUsage.oid,
    x509.ExtendedKeyUsage.oid,
    x509.SubjectAlternativeName.oid,
    x509.SubjectKeyIdentifier.oid,
    x509.AuthorityKeyIdentifier.oid,
}


def _check_critical(cert: x509.Certificate) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _KNOWN:
            raise ChainError(
                f"{describe(cert)}: unknown critical extension {ext.oid.dotted_string}"
            )
