"""The agent's TLS identity: its key and CSRs (made here, the key never
leaves the VM), its certificate's life, and pinning dom0's root by the
fingerprint that the enrollment token carries.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agents.files import Root, read_private, write_atomic

# v1-<root fingerprint>-<secret>: controller/pki/tokens.py makes them
_TOKEN = re.compile(r"v1-([0-9a-f]{64})-[A-Za-z0-9_-]{43}\Z")
RENEW_AT = 0.5  # of its life: a certificate is renewed at half-life ...
RENEW_JITTER = 0.1  # ... plus or minus this much of its life, so agents spread out


class IdentityError(Exception):
    """One line: what is wrong with a token, a certificate or a chain."""


def token_fingerprint(token: str) -> str:
    """The root fingerprint a token carries (what the agent pins)."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        raise IdentityError(
            f"token: {len(token)} characters, expected v1-<64 hex>-<43 base64url> "
            "(as `dom0 token create` prints it)"
        )
    return m.group(1)


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def ensure_key(root: Root) -> ec.EllipticCurvePrivateKey:
    """The agent's TLS key, made (0600) the first time."""
    try:
        data = read_private(root.tls_key)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(root.tls_key, pem, 0o600)
        return key
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{root.tls_key}: not an EC key")
    return loaded


def csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """A CSR for the key. Its subject is a placeholder: the controller names
    the certificate after the machine it sees, never after what the agent asks."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dom0-agent")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def pick_root(chain_der: list[bytes], pinned: str) -> bytes:
    """The certificate of a server's (unverified) chain whose SHA-256 is the
    pinned fingerprint; it must be a self-signed CA. OpenSSL then verifies the
    whole chain against it on a second connection."""
    for der in chain_der:
        if fingerprint(der) != pinned:
            continue
        cert = x509.load_der_x509_certificate(der)
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca or cert.subject != cert.issuer:
            raise IdentityError("the pinned certificate is not a self-signed CA")
        return der
    raise IdentityError(
        f"the controller's chain has no certificate with the token's fingerprint {pinned[:16]}…"
        " (another CA, or not dom0)"
    )


def root_pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class Life:
    not_before: datetime
    not_after: datetime
    serial: str

    def renew_at(self, rng: random.Random) -> datetime:
        span = (self.not_after - self.not_before).total_seconds()
        share = RENEW_AT + rng.uniform(-RENEW_JITTER, RENEW_JITTER)
        return self.not_before + timedelta(seconds=span * share)


def life(cert_pem: bytes) -> Life:
    """The life of the first certificate in a PEM file (the agent's own)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise IdentityError(f"certificate: {e}") from None
    nb, na = cert.not_valid_before, cert.not_valid_after  # (naive UTC in cryptography 38)
    return Life(nb.replace(tzinfo=UTC), na.replace(tzinfo=UTC), format(cert.serial_number, "x"))
