"""Enrollment: an agent without a certificate, its token, its CSR and its
WireGuard key, from the address of the machine it runs on.

In this order, so that a refused request spends nothing: the machine that
holds the connection's source address (none: refused); the CSR checked (its
signature, its key type); the token used for that machine (one atomic
update: unused, unexpired, this CA's, for its rule or its name); then the
certificate issued for that machine's fqdn and slot — never for a name the
agent asks for — and its WireGuard public key handed to the controller to
become the machine's hub peer. The agent's private keys never leave it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from cryptography.hazmat.primitives import serialization

from common import wire
from controller.pki import issue
from controller.pki.ca import CaError, CertificateAuthority
from controller.pki.tokens import TokenError, Tokens
from controller.sources.agents import Holder, Peer, Refused


class Enrollment:
    def __init__(
        self,
        authority: CertificateAuthority,
        tokens: Tokens,
        holder: Holder,
        clock: Callable[[], datetime],
        on_key: Callable[[str, str], None],
        hours: float = issue.AGENT_HOURS,
    ) -> None:
        self.authority = authority
        self.tokens = tokens
        self.holder = holder
        self.clock = clock
        self.on_key = on_key  # (fqdn, WireGuard public key): its hub peer from now on
        self.hours = hours

    def __call__(self, request: wire.Enroll, source: str) -> wire.Enrolled:
        held = self.holder(source)
        if held is None:
            raise Refused(f"enrollment from {source}, which no machine holds")
        fqdn, slot = held
        try:
            rule = issue.parse_slot_uri(slot).rule
            issue.csr_public_key(request.csr_pem)
        except issue.PkiError as e:
            raise Refused(f"enrollment of {fqdn}: {e}") from None
        now = self.clock()
        fingerprint = issue.fingerprint(self.authority.root)
        try:
            self.tokens.consume(
                request.token, ca_fingerprint=fingerprint, rule=rule, fqdn=fqdn, now=now
            )
            issued = self.authority.issue_agent(request.csr_pem, fqdn, slot, now, self.hours)
        except (TokenError, issue.PkiError, CaError) as e:
            raise Refused(f"enrollment of {fqdn}: {e}") from None
        self.on_key(fqdn, request.wg_public_key)
        pem = issued.certificate.public_bytes(serialization.Encoding.PEM).decode()
        return wire.Enrolled(
            certificate_pem=pem, chain_pem=issued.chain_pem.decode(), ca_fingerprint=fingerprint
        )

    def renew(self, request: wire.Renew, peer: Peer) -> wire.Enrolled:
        """A new certificate for an agent whose connection `identify` let in:
        the same machine, the same slot, for the key in its CSR."""
        try:
            issue.csr_public_key(request.csr_pem)
            issued = self.authority.issue_agent(
                request.csr_pem, peer.fqdn, peer.slot, self.clock(), self.hours
            )
        except (issue.PkiError, CaError) as e:
            raise Refused(f"renewal of {peer.fqdn}: {e}") from None
        pem = issued.certificate.public_bytes(serialization.Encoding.PEM).decode()
        return wire.Enrolled(
            certificate_pem=pem,
            chain_pem=issued.chain_pem.decode(),
            ca_fingerprint=issue.fingerprint(self.authority.root),
        )
