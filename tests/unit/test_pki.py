"""dom0's CA: what it issues, what it accepts back, its files and commands.

The issuance and verification tests are pure (a fixed `now`, keys made in
memory); the shell's run in tmp_path; one test runs a real TLS 1.3
handshake, both ends in memory (ssl.MemoryBIO), so that OpenSSL itself, in
strict mode, agrees with `verify_chain` about the certificates.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import random
import sqlite3
import ssl
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from controller.pki import ca, cli, commands, issue, report
from controller.pki.issue import ChainError, CsrError, Identity, PkiError, Slot
from controller.pki.store import CaStore, UnknownSerial

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
WEB1 = "web1.x.internal"
SLOT = "dom0:slot/web/1"


class Authority:
    """A CA in memory: the pure functions' inputs."""

    def __init__(self, tld: str = "internal", now: datetime = NOW) -> None:
        self.root_key = issue.new_key()
        self.root = issue.make_root(self.root_key, tld, now)
        self.key = issue.new_key()
        self.intermediate = issue.make_intermediate(self.key, self.root, self.root_key, now)

    def agent(self, key=None, fqdn: str = WEB1, slot: str = SLOT, now: datetime = NOW, **kw):
        return issue.sign_agent_csr(
            csr(key or issue.new_key()), fqdn, slot, self.intermediate, self.key, now, **kw
        )


def csr(key, cn: str = "anything", extensions=()) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki() -> Authority:
    return Authority()


def verify(pki: Authority, leaf, now: datetime = NOW, revoked=frozenset()) -> Identity:
    return issue.verify_chain(leaf, [pki.intermediate], pki.root, now, revoked)


# -- issuance and verification (pure) ---------------------------------------------------
def test_agent_leaf_verifies_and_names_its_machine_and_slot_only(pki: Authority) -> None:
    leaf = pki.agent()
    assert verify(pki, leaf) == Identity(WEB1, Slot("web", 1))
    assert leaf.subject.rfc4514_string() == f"CN={WEB1}"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName(WEB1), x509.UniformResourceIdentifier(SLOT)]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    assert issue.not_after(leaf) - NOW == timedelta(hours=24)
    assert NOW - issue.not_before(leaf) == issue.CLOCK_SKEW
    assert issue.not_after(pki.agent(hours=2)) - NOW == timedelta(hours=2)
    serials = {pki.agent().serial_number for _ in range(5)}
    assert len(serials) == 5 and min(serials) > 2**100  # random, not counted


def test_the_hierarchy_root_pathlen_1_intermediate_pathlen_0(pki: Authority) -> None:
    root_bc = pki.root.extensions.get_extension_for_class(x509.BasicConstraints)
    inter_bc = pki.intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (root_bc.value.ca, root_bc.value.path_length) == (True, 1)
    assert (inter_bc.value.ca, inter_bc.value.path_length) == (True, 0)
    for cert in (pki.root, pki.intermediate):
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert not ku.value.digital_signature
    aki = pki.intermediate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert issue.not_after(pki.root) - NOW == timedelta(days=3650)
    assert issue.not_after(pki.intermediate) - NOW == timedelta(days=365)
    assert isinstance(pki.root.public_key(), ec.EllipticCurvePublicKey)
    assert pki.root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_a_leaf_of_another_ca_is_refused_even_one_copying_our_names(pki: Authority) -> None:
    other = Authority()
    with pytest.raises(ChainError, match="not issued by this CA"):
        verify(pki, other.agent())
    # A forger's intermediate with exactly our intermediate's name: its leaf
    # names our issuer, but the signature is not ours.
    forged_key = issue.new_key()
    forged = (
        x509.CertificateBuilder()
        .subject_name(pki.intermediate.subject)
        .issuer_name(pki.root.subject)
        .public_key(forged_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(forged_key.public_key()), critical=False
        )
        .sign(other.root_key, hashes.SHA256())
    )
    leaf = issue.sign_agent_csr(csr(issue.new_key()), WEB1, SLOT, forged, forged_key, NOW)
    with pytest.raises(ChainError, match="not issued by this CA"):
        verify(pki, leaf)
    with pytest.raises(ChainError, match="signature does not verify"):
        issue.verify_chain(leaf, [forged], pki.root, NOW, set())


def test_a_leaf_the_root_signed_itself_is_refused_even_given_the_bundle(pki: Authority) -> None:
    leaf = issue.sign_agent_csr(csr(issue.new_key()), WEB1, SLOT, pki.root, pki.root_key, NOW)
    bundle = [pki.root, pki.intermediate]  # what a caller may pass as "intermediates"
    with pytest.raises(ChainError, match="not issued by this CA"):
        issue.verify_chain(leaf, bundle, pki.root, NOW, set())
    assert issue.verify_chain(pki.agent(), bundle, pki.root, NOW, set()).fqdn == WEB1


def test_an_expired_or_not_yet_valid_leaf_is_refused(pki: Authority) -> None:
    leaf = pki.agent()
    verify(pki, leaf, NOW + timedelta(hours=23, minutes=59))
    with pytest.raises(ChainError, match="expired"):
        verify(pki, leaf, NOW + timedelta(hours=24, seconds=1))
    with pytest.raises(ChainError, match="not valid before"):
        verify(pki, leaf, NOW - timedelta(hours=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(pki, leaf, NOW.replace(tzinfo=None))


def test_a_revoked_serial_is_refused_leaf_or_intermediate(pki: Authority) -> None:
    leaf = pki.agent()
    with pytest.raises(ChainError, match="is revoked"):
        verify(pki, leaf, revoked={issue.serial_hex(leaf.serial_number)})
    with pytest.raises(ChainError, match="is revoked"):
        verify(pki, leaf, revoked={issue.serial_hex(pki.intermediate.serial_number)})
    verify(pki, leaf, revoked={issue.serial_hex(pki.agent().serial_number)})  # another one


def test_a_csr_with_a_bad_signature_or_a_wrong_key_is_refused(pki: Authority) -> None:
    good = x509.load_pem_x509_csr(csr(issue.new_key()))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's s
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrError, match="signature does not verify"):
        issue.sign_agent_csr(tampered, WEB1, SLOT, pki.intermediate, pki.key, NOW)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CsrError, match="secp384r1"):
        issue.sign_agent_csr(csr(p384), WEB1, SLOT, pki.intermediate, pki.key, NOW)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CsrError, match="expected EC P-256 or Ed25519"):
        issue.sign_agent_csr(csr(rsa_key), WEB1, SLOT, pki.intermediate, pki.key, NOW)
    with pytest.raises(CsrError, match="not a PEM certificate signing request"):
        issue.sign_agent_csr(b"hello", WEB1, SLOT, pki.intermediate, pki.key, NOW)
    with pytest.raises(CsrError, match="at most"):
        issue.sign_agent_csr(b"x" * 20000, WEB1, SLOT, pki.intermediate, pki.key, NOW)


def test_a_csr_asking_for_other_names_gets_the_names_it_was_issued_for(pki: Authority) -> None:
    greedy = csr(
        issue.new_key(),
        cn="db1.y.internal",
        extensions=[
            x509.SubjectAlternativeName(
                [x509.DNSName("db1.y.internal"), x509.UniformResourceIdentifier("dom0:slot/db/1")]
            ),
            x509.BasicConstraints(ca=True, path_length=None),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        ],
    )
    leaf = issue.sign_agent_csr(greedy, WEB1, SLOT, pki.intermediate, pki.key, NOW)
    assert verify(pki, leaf) == (WEB1, ("web", 1))
    assert leaf.subject.rfc4514_string() == f"CN={WEB1}"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName(WEB1), x509.UniformResourceIdentifier(SLOT)]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_an_ed25519_agent_key_is_accepted(pki: Authority) -> None:
    leaf = pki.agent(ed25519.Ed25519PrivateKey.generate())
    assert isinstance(leaf.public_key(), ed25519.Ed25519PublicKey)
    assert verify(pki, leaf).fqdn == WEB1


def test_the_names_an_agent_certificate_gets_are_checked(pki: Authority) -> None:
    with pytest.raises(PkiError, match="not a machine's name"):
        pki.agent(fqdn="Web1.x.internal")
    with pytest.raises(PkiError, match="not a machine's name"):
        pki.agent(fqdn="web1.x.internal\n")
    with pytest.raises(PkiError, match="not a slot URI"):
        pki.agent(slot="dom0:slot/web/01")
    with pytest.raises(PkiError, match="lifetime"):
        pki.agent(hours=0)


@given(
    st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z"),
    st.integers(min_value=1, max_value=999_999_999),
)
def test_slot_uri_round_trip(rule: str, number: int) -> None:
    uri = issue.slot_uri(rule, number)
    assert uri == f"dom0:slot/{rule}/{number}"
    assert issue.parse_slot_uri(uri) == Slot(rule, number)


@pytest.mark.parametrize(
    "uri",
    [
        "dom0:slot/web/0",
        "dom0:slot/web/01",
        "dom0:slot/Web/1",
        "dom0:slot/web/1/2",
        "dom0:slot/web/",
        "dom0:slot//1",
        "dom0:slot/web/1\n",
        "https://dom0/slot/web/1",
        "dom0:slot/-web/1",
    ],
)
def test_slot_uri_parser_refuses_every_other_spelling(uri: str) -> None:
    with pytest.raises(PkiError, match="not a slot URI"):
        issue.parse_slot_uri(uri)


def test_slot_uri_refuses_what_no_policy_names() -> None:
    for rule, number in [("Web", 1), ("web", 0), ("web/1", 2), ("", 1), ("a" * 64, 1)]:
        with pytest.raises(PkiError):
            issue.slot_uri(rule, number)


def test_server_certificate_for_its_names_and_servers_only(pki: Authority) -> None:
    key = issue.new_key()
    srv = issue.make_server(
        key.public_key(), pki.intermediate, pki.key, ["dom0.internal"], ["10.0.0.1"], NOW
    )
    revoked: set[str] = set()
    chain = ([pki.intermediate], pki.root, NOW, revoked)
    issue.verify_server(srv, *chain, "dom0.internal")
    issue.verify_server(srv, *chain, "10.0.0.1")
    with pytest.raises(ChainError, match="not issued for"):
        issue.verify_server(srv, *chain, "evil.internal")
    with pytest.raises(ChainError, match="TLS client authentication"):
        issue.verify_chain(srv, *chain)  # a server certificate is no agent's
    with pytest.raises(ChainError, match="TLS server authentication"):
        issue.verify_server(pki.agent(), *chain, WEB1)
    assert issue.not_after(srv) - NOW == timedelta(days=90)
    with pytest.raises(PkiError, match="at least one"):
        issue.make_server(key.public_key(), pki.intermediate, pki.key, [], [], NOW)


def test_a_leaf_never_outlives_its_issuer(pki: Authority) -> None:
    late = issue.not_after(pki.intermediate) - timedelta(hours=3)
    leaf = pki.agent(now=late)
    assert issue.not_after(leaf) == issue.not_after(pki.intermediate)
    with pytest.raises(PkiError, match="has expired"):
        pki.agent(now=issue.not_after(pki.intermediate) + DAY)


def test_needs_rotation_with_90_days_of_overlap(pki: Authority) -> None:
    assert not issue.needs_rotation(pki.intermediate, NOW + timedelta(days=274))
    assert issue.needs_rotation(pki.intermediate, NOW + timedelta(days=275))
    assert issue.needs_rotation(pki.intermediate, NOW + timedelta(days=400))
    assert not issue.needs_rotation(pki.intermediate, NOW + timedelta(days=300), overlap_days=30)


def test_renew_at_half_life_with_jitter(pki: Authority) -> None:
    leaf = pki.agent()
    start, life = issue.not_before(leaf), issue.not_after(leaf) - issue.not_before(leaf)
    rng = random.Random(1)
    times = [issue.renew_at(leaf, rng) for _ in range(500)]
    assert all(start + life * 0.4 <= t <= start + life * 0.6 for t in times)
    assert max(times) - min(times) > life * 0.15  # spread, not one instant
    assert issue.renew_at(leaf, random.Random(7)) == issue.renew_at(leaf, random.Random(7))


def test_fingerprint_and_serial_spelling(pki: Authority) -> None:
    der = pki.root.public_bytes(serialization.Encoding.DER)
    assert issue.fingerprint(pki.root) == hashlib.sha256(der).hexdigest()
    assert issue.serial_hex(0xABC) == "abc"
    assert issue.parse_serial("0A:BC") == issue.parse_serial("0xabc") == "abc"
    for bad in ("", "xyz", "12 34", "1" * 50):
        with pytest.raises(PkiError, match="not a certificate serial"):
            issue.parse_serial(bad)


def test_tls13_handshake_in_memory_openssl_strict_agrees(tmp_path: Path) -> None:
    """Server and agent as OpenSSL sees them (at the real time, OpenSSL's):
    TLS 1.3, X.509 strict mode, only the root trusted, each side sending its
    intermediate; an agent key of either kind."""
    now = datetime.now(UTC)
    pki = Authority(now=now)
    server_key = issue.new_key()
    server = issue.make_server(
        server_key.public_key(), pki.intermediate, pki.key, ["dom0.internal"], [], now
    )
    for agent_key in (issue.new_key(), ed25519.Ed25519PrivateKey.generate()):
        agent = pki.agent(agent_key, now=now)
        peer = _handshake(tmp_path, pki, (server_key, server), (agent_key, agent))
        assert peer == agent
        assert issue.agent_identity(peer) == (WEB1, ("web", 1))


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _handshake(tmp: Path, pki: Authority, server, agent) -> x509.Certificate:
    def pem(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.PEM)

    (tmp / "root.pem").write_bytes(pem(pki.root))
    (tmp / "server.pem").write_bytes(_pem_key(server[0]) + pem(server[1]) + pem(pki.intermediate))
    (tmp / "agent.pem").write_bytes(_pem_key(agent[0]) + pem(agent[1]) + pem(pki.intermediate))
    contexts = []
    for purpose, own in ((ssl.PROTOCOL_TLS_SERVER, "server"), (ssl.PROTOCOL_TLS_CLIENT, "agent")):
        c = ssl.SSLContext(purpose)
        c.minimum_version = ssl.TLSVersion.TLSv1_3
        c.verify_mode = ssl.CERT_REQUIRED
        c.verify_flags |= ssl.VERIFY_X509_STRICT
        c.load_verify_locations(tmp / "root.pem")
        c.load_cert_chain(tmp / f"{own}.pem")
        contexts.append(c)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = contexts[0].wrap_bio(s_in, s_out, server_side=True)
    cli = contexts[1].wrap_bio(c_in, c_out, server_hostname="dom0.internal")
    done = set()
    for _ in range(10):
        for end, name in ((cli, "client"), (srv, "server")):
            if name not in done:
                try:
                    end.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert done == {"client", "server"} and srv.version() == "TLSv1.3"
    der = srv.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# -- the store ------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    # Python's default (implicit transactions), unlike controller.store's
    # autocommit connection that the commands use: CaStore works with both.
    conn = sqlite3.connect(tmp_path / "state.sqlite")
    yield conn
    conn.close()


def test_store_records_revokes_idempotently_and_refuses_unknown(pki: Authority, db) -> None:
    store = CaStore(db)
    store.ensure_schema()
    store.ensure_schema()  # again: nothing happens
    leaf = pki.agent()
    serial = issue.serial_hex(leaf.serial_number)
    store.add_all([(pki.root, "root"), (pki.intermediate, "intermediate"), (leaf, "agent")])
    record = store.get(serial)
    assert record is not None and (record.fqdn, record.slot, record.revoked) == (WEB1, SLOT, False)
    assert record.serial == serial and serial == serial.lower()
    assert record.certificate() == leaf and record.not_after == issue.not_after(leaf)
    first = store.revoke(serial, "key compromise", NOW)
    again = store.revoke(serial, "other", NOW + DAY)
    assert first == again and again.revoked_at == NOW and again.reason == "key compromise"
    assert store.revoked() == {serial}
    with pytest.raises(UnknownSerial, match="no certificate with serial abc"):
        store.revoke("abc", "x", NOW)
    with pytest.raises(PkiError, match="already in the store"):
        store.add(leaf, "agent")
    with pytest.raises(sqlite3.IntegrityError):  # the CHECK holds below the Python too
        db.execute("INSERT INTO certificates VALUES ('1','ca','s',NULL,NULL,0,0,'',NULL,NULL)")
    assert [r.kind for r in store.all()] == ["root", "intermediate", "agent"]
    assert [r.serial for r in store.current("agent")] == []


def test_revoke_slot_revokes_every_certificate_of_the_slot(pki: Authority, db) -> None:
    store = CaStore(db)
    store.ensure_schema()
    mine = [pki.agent(), pki.agent()]
    theirs = pki.agent(fqdn="web2.x.internal", slot="dom0:slot/web/2")
    for cert in [*mine, theirs]:
        store.add(cert, "agent")
    revoked = store.revoke_slot(SLOT, "slot released", NOW)
    assert sorted(revoked) == sorted(issue.serial_hex(c.serial_number) for c in mine)
    assert store.revoke_slot(SLOT, "again", NOW) == []
    assert [r.fqdn for r in store.current("agent", NOW)] == ["web2.x.internal"]


# -- the shell --------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_files_and_modes_and_refuses_a_second_ca(tmp_path: Path, db) -> None:
    authority = ca.init(tmp_path, db, "x.example", NOW)
    d = tmp_path / "ca"
    assert _mode(d) == 0o700
    keys = sorted(p.name for p in d.glob("*.key"))
    assert keys[-1] == "root.key" and keys[0].startswith("intermediate-") and len(keys) == 2
    assert all(_mode(p) == 0o600 for p in d.glob("*.key"))
    assert _mode(d / "bundle.pem") == 0o644
    assert not list(tmp_path.glob(".*tmp")) and not list(d.glob(".*tmp"))
    assert authority.tld == "x.example" and not authority.root_key_encrypted()
    authority.issue_server(["dom0.x.example"], ["10.0.0.1"], NOW)
    assert _mode(d / "server.pem") == 0o600
    with pytest.raises(ca.CaError, match="a CA exists already"):
        ca.init(tmp_path, db, "x.example", NOW)
    loaded = ca.load(tmp_path, db)
    assert loaded.root == authority.root
    assert [r["kind"] for r in loaded.status(NOW)] == ["root", "intermediate", "server"]


def test_load_names_an_interrupted_init_and_a_missing_ca(tmp_path: Path, db) -> None:
    with pytest.raises(ca.CaError, match="no CA in"):
        ca.load(tmp_path, db)
    (tmp_path / "ca").mkdir()
    with pytest.raises(ca.CaError, match="interrupted"):
        ca.load(tmp_path, db)


def test_rotation_with_overlap_bundle_carries_both_and_leaves_of_both_verify(
    tmp_path: Path, db
) -> None:
    authority = ca.init(tmp_path, db, "internal", NOW)
    (first,) = authority.intermediates(NOW)
    assert authority.rotate(NOW + timedelta(days=100)) is None  # not due
    later = NOW + timedelta(days=280)
    old_leaf = authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, later - timedelta(hours=1))
    second = authority.rotate(later)
    assert second is not None and second != first
    assert issue.not_after(first) - later == timedelta(days=85)  # issued 85 days ahead
    assert authority.intermediates(later) == [second, first]
    bundle = x509_load_all(authority.bundle_pem(later))
    assert bundle == [authority.root, second, first]
    assert (tmp_path / "ca" / "bundle.pem").read_bytes() == authority.bundle_pem(later)
    new_leaf = authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, later)
    assert new_leaf.certificate.issuer == second.subject  # the newest one issues
    revoked = authority.revoked()
    soon = later + timedelta(hours=1)
    for issued, issuer in ((old_leaf, first), (new_leaf, second)):
        chain = x509_load_all(issued.chain_pem)
        assert chain == [issued.certificate, issuer]
        ident = issue.verify_chain(
            issued.certificate, authority.intermediates(soon), authority.root, soon, revoked
        )
        assert ident == (WEB1, ("web", 1))
    assert authority.rotate(later) is None  # the new one is not due
    gone = issue.not_after(first) + DAY
    assert x509_load_all(authority.bundle_pem(gone)) == [authority.root, second]
    assert authority.warnings(later) == []  # the old one expires as planned


def x509_load_all(pem: bytes) -> list[x509.Certificate]:
    marker = b"-----END CERTIFICATE-----\n"
    return [x509.load_pem_x509_certificate(p + marker) for p in pem.split(marker) if p.strip()]


def _key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and "-----" not in line]


def test_no_key_material_in_errors_logs_or_reprs(tmp_path: Path, db, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    authority = ca.init(tmp_path, db, "internal", NOW)
    authority.issue_server(["dom0.internal"], [], NOW)
    authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, NOW)
    authority.rotate(NOW, force=True)
    files = [*(tmp_path / "ca").glob("*.key"), tmp_path / "ca" / "server.pem"]
    secrets = [line for p in files for line in _key_lines(p) if "PRIVATE" not in line]
    said = [caplog.text, repr(authority)]
    inter = next((tmp_path / "ca").glob("intermediate-*.key"))
    original = inter.read_bytes()
    # damaged: a PEM with its middle lines gone
    lines = original.splitlines(keepends=True)
    inter.write_bytes(b"".join(lines[:2] + lines[-1:]))
    for path in (tmp_path / "ca").glob("intermediate-*.key"):
        path.chmod(0o644)
        with pytest.raises(ca.CaError, match="mode 0644") as e:
            ca._load_key(path)
        said.append(str(e.value))
        path.chmod(0o600)
    with pytest.raises(ca.CaError) as e:
        ca._load_key(inter)
    said.append(str(e.value))
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert "not a PEM private key" in str(e.value)
    text = "\n".join(said)
    assert "PRIVATE KEY" not in text
    for secret in secrets:
        for piece in (secret[i : i + 16] for i in range(0, len(secret) - 16, 16)):
            assert piece not in text
    assert base64.b64encode(original[40:60]).decode() not in text


def test_a_revoked_agent_is_refused_at_once_and_pruned_when_expired(tmp_path: Path, db) -> None:
    authority = ca.init(tmp_path, db, "internal", NOW)
    issued = authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, NOW)
    kept = authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, NOW + timedelta(hours=20))

    def check(cert: x509.Certificate, now: datetime) -> Identity:
        chain = authority.intermediates(now)
        return issue.verify_chain(cert, chain, authority.root, now, authority.revoked())

    assert check(issued.certificate, NOW) == (WEB1, ("web", 1))
    authority.revoke(issued.serial.upper(), "key compromise", NOW + timedelta(minutes=1))
    with pytest.raises(ChainError, match="is revoked"):
        check(issued.certificate, NOW + timedelta(minutes=1))
    assert check(kept.certificate, NOW + timedelta(hours=21)).fqdn == WEB1
    assert authority.store.prune(NOW + timedelta(hours=30)) == 1  # the revoked one, expired
    assert authority.store.get(issued.serial) is None
    assert authority.store.get(kept.serial) is not None
    assert len(authority.store.all()) == 3  # root, intermediate, the kept leaf


def test_a_passphrase_protected_root_key_is_needed_for_rotation(tmp_path: Path, db) -> None:
    authority = ca.init(tmp_path, db, "internal", NOW, b"correct horse")
    root_key = tmp_path / "ca" / "root.key"
    assert b"ENCRYPTED PRIVATE KEY" in root_key.read_bytes() and authority.root_key_encrypted()
    assert _mode(root_key) == 0o600
    with pytest.raises(ca.PassphraseError, match="is encrypted: give its passphrase"):
        authority.rotate(NOW, force=True)
    with pytest.raises(ca.PassphraseError, match="wrong passphrase"):
        authority.rotate(NOW, force=True, passphrase=b"battery staple")
    assert authority.rotate(NOW, force=True, passphrase=b"correct horse") is not None
    assert len(authority.intermediates(NOW)) == 2
    key = serialization.load_pem_private_key(root_key.read_bytes(), b"correct horse")
    assert ca._same_key(key, authority.root)  # type: ignore[arg-type]
    with pytest.raises(ca.PassphraseError, match="1 to 1023"):
        ca.init(tmp_path / "other", db, "internal", NOW, b"")
    # The service issues without the root key's passphrase.
    authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, NOW)


def test_warnings_within_30_days_of_root_or_intermediate_expiry(tmp_path: Path, db) -> None:
    authority = ca.init(tmp_path, db, "internal", NOW, root_years=1, intermediate_days=200)
    assert authority.warnings(NOW) == [] and ca.warnings(db, NOW) == []
    t = NOW + timedelta(days=180)  # the intermediate has 20 days left, the root 185
    (line,) = authority.warnings(t)
    assert "issuing intermediate expires in 20 days" in line and "dom0 ca rotate" in line
    assert ca.warnings(db, t) == [line]
    rows = {r["kind"]: r for r in authority.status(t)}
    assert rows["intermediate"]["warning"] and rows["root"]["warning"] is None
    authority.rotate(t)
    assert authority.warnings(t) == []  # superseded: no warning about the old one
    t = NOW + timedelta(days=350)  # root: 15 days; intermediates clamped to the root
    lines = authority.warnings(t)
    assert any("root expires in 15 days" in w for w in lines)
    assert any("issuing intermediate expires in 15 days" in w for w in lines)
    t = NOW + timedelta(days=400)
    lines = authority.warnings(t)
    assert any("root expired" in w for w in lines)
    assert any("issuing intermediate expired" in w for w in lines)
    with pytest.raises(ca.CaError, match="root has expired"):
        authority.rotate(t)


def test_warning_when_every_intermediate_is_revoked(tmp_path: Path, db) -> None:
    authority = ca.init(tmp_path, db, "internal", NOW)
    (first,) = authority.intermediates(NOW)
    authority.revoke(issue.serial_hex(first.serial_number), "compromised", NOW)
    assert authority.warnings(NOW) == [
        "CA: no issuing intermediate in force: run dom0 ca rotate --force"
    ]
    assert authority.bundle_pem(NOW) == authority.root.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca.CaError, match="no issuing intermediate"):
        authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, NOW)
    assert authority.rotate(NOW) is not None  # needed: none in force
    assert authority.warnings(NOW) == []
    root = issue.serial_hex(authority.root.serial_number)
    with pytest.raises(ca.CaError, match="the root: it cannot be revoked"):
        authority.revoke(root, "no", NOW)


def test_report_no_records_no_warnings() -> None:
    assert report.warnings([], NOW) == [] and report.status([], NOW) == []


# -- the commands -------------------------------------------------------------------------
STATUS_KEYS = {
    "kind", "serial", "subject", "fqdn", "slot", "not_before", "not_after", "days_left",
    "state", "revoked", "revoked_at", "reason", "warning",
}  # fmt: skip


def _parser(state: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dom0")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub, default_state=str(state))
    return parser


def _dom0(state: Path, *argv: str) -> int:
    args = _parser(state).parse_args(list(argv))
    return args.handler(args)


def _one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


def test_commands_init_status_list_revoke_rotate(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    pw = tmp_path / "pw"
    pw.write_text("sesame\n")
    assert _dom0(state, "ca", "status") == 1
    _one_line(capsys, "no CA in")
    assert _dom0(state, "ca", "init", "--passphrase-file", str(pw), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["root_key_encrypted"] and len(out["root"]["sha256"]) == 64
    assert (state / "state.sqlite").exists() and _mode(state) == 0o700
    assert _dom0(state, "ca", "init") == 1
    _one_line(capsys, "a CA exists already")

    assert _dom0(state, "ca", "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {"ok", "tld", "warnings", "rotation_due", "certificates"}
    assert status["tld"] == "internal" and status["warnings"] == []
    assert [c["kind"] for c in status["certificates"]] == ["root", "intermediate"]
    for row in status["certificates"]:
        assert set(row) == STATUS_KEYS
        assert row["state"] == "valid" and row["revoked"] is False and row["warning"] is None
        assert isinstance(row["days_left"], float) and row["not_after"].endswith("Z")

    assert _dom0(state, "ca", "rotate") == 0
    assert "no rotation needed" in capsys.readouterr().out
    assert _dom0(state, "ca", "rotate", "--force") == 2
    _one_line(capsys, "is encrypted: give its passphrase")
    assert _dom0(state, "ca", "rotate", "--force", "--passphrase-file", str(pw), "--json") == 0
    rotated = json.loads(capsys.readouterr().out)
    assert rotated["rotated"] and len(rotated["in_bundle"]) == 2

    serial = rotated["in_bundle"][1]["serial"]
    assert _dom0(state, "ca", "revoke", serial.upper(), "--reason", "test") == 0
    assert "is revoked" in capsys.readouterr().out
    assert _dom0(state, "ca", "revoke", serial, "--json") == 0
    assert json.loads(capsys.readouterr().out)["already_revoked"] is True
    assert _dom0(state, "ca", "list", "--kind", "intermediate", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["certificates"]
    assert {r["serial"]: r["state"] for r in rows} == {
        serial: "revoked",
        rotated["intermediate"]["serial"]: "valid",
    }
    assert _dom0(state, "ca", "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["KIND", "SERIAL", "NAME"] and len(table) == 4


def test_status_shows_what_is_in_force_and_list_shows_everything(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    assert _dom0(state, "ca", "init", "--tld", "x.internal") == 0
    db = commands.open_db(state)
    authority = ca.load(state, db)
    now = datetime.now(UTC)
    live = authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, now)
    # (the intermediate is valid from 5 minutes before init: issued then, gone now)
    then = now - timedelta(minutes=4)
    old = authority.issue_agent(csr(issue.new_key()), WEB1, SLOT, then, hours=0.01)
    db.close()
    capsys.readouterr()
    assert _dom0(state, "ca", "status") == 0
    out = capsys.readouterr().out
    assert out.startswith("CA for x.internal: 1 agent certificates in force\n")
    assert live.serial in out and old.serial not in out and "warning" not in out
    assert f"{WEB1} {SLOT}" in out
    assert _dom0(state, "ca", "list", "--kind", "agent", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["certificates"]
    assert [(r["serial"], r["state"]) for r in rows] == [
        (old.serial, "expired"),
        (live.serial, "valid"),
    ]
    assert all(set(r) == STATUS_KEYS for r in rows)


def test_commands_bad_input_is_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    missing = tmp_path / "no" / "such-file"
    assert _dom0(state, "ca", "init", "--passphrase-file", str(missing)) == 2
    _one_line(capsys, f"cannot read passphrase file {missing}: No such file or directory")
    assert not state.exists()  # nothing made for bad input
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert _dom0(state, "ca", "init", "--passphrase-file", str(empty)) == 2
    _one_line(capsys, "is empty")
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    assert _dom0(state, "ca", "init", "--passphrase-file", str(two)) == 2
    _one_line(capsys, "more than one line")
    assert _dom0(state, "ca", "init", "--tld", "Not A Suffix", "--json") == 2
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["ok"] is False and "--tld" in out["error"]
    assert _dom0(state, "ca", "init") == 0
    capsys.readouterr()
    assert _dom0(state, "ca", "revoke", "web1") == 2
    _one_line(capsys, "not a certificate serial")
    assert _dom0(state, "ca", "revoke", "abc123") == 2
    _one_line(capsys, "no certificate with serial abc123")
    wrong = tmp_path / "wrong"
    wrong.write_text("guess")
    assert _dom0(state, "ca", "rotate", "--force", "--passphrase-file", str(wrong)) == 2
    _one_line(capsys, "is not encrypted")


def test_commands_on_a_missing_state_make_nothing(tmp_path: Path, capsys) -> None:
    state = tmp_path / "none"
    for argv in (["status"], ["list"], ["rotate"], ["revoke", "abc"]):
        assert _dom0(state, "ca", *argv) == 1
        _one_line(capsys, "no CA in")
    assert not state.exists()


def test_the_controllers_store_still_opens_after_ca_init(tmp_path: Path, capsys) -> None:
    """The commands make the state store through controller.store (its
    schema record included), and the CA's table beside it changes nothing."""
    from controller.store import Store

    assert _dom0(tmp_path, "ca", "init") == 0
    store = Store(tmp_path)
    assert store.allocations() == []
    assert [r.kind for r in CaStore(store.db).all()] == ["root", "intermediate"]
    store.close()
    assert _mode(tmp_path / "state.sqlite") == 0o600


def test_the_cli_knows_the_stores_kinds() -> None:
    from controller.pki import store

    assert cli.KINDS == store.KINDS


def test_dom0_status_shows_the_cas_warnings(tmp_path: Path) -> None:
    """An expiring root or intermediate is a WARNING line in `dom0 status`
    (and its JSON), from the store alone."""
    from controller.api.status import format_status
    from controller.store import Store

    store = Store(tmp_path)
    try:
        assert ca.warnings(store.db, NOW) == []  # no CA yet: nothing to say
        ca.init(tmp_path, store.db, "internal", NOW, root_years=1, intermediate_days=20)
        lines = ca.warnings(store.db, NOW)
    finally:
        store.close()
    assert lines and all("expires" in line or "intermediate" in line for line in lines), lines
    text = format_status({"machines": [], "stats": {}, "ca_warnings": lines})
    assert f"WARNING: {lines[0]}" in text.splitlines()
