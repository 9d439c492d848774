"""The site's DNS, as the controller runs it: what unbound serves follows the
policy, the machines dom0 admitted, and the containers their agents report.

Three inputs, one publisher task: a sync (machines came or went, or the
policy changed) and an agent's report of its containers both only wake it;
it then builds every record from the current state (core/dnszone.py) and
hands them to the unbound driver, which rewrites the zones that changed.
Bursts of events coalesce into one publication.

The containers an agent reported are kept while it is away (a restarted
controller or agent must not make its containers' names vanish): in
`dns/containers.json`, until their machine leaves the site.

DNS over TLS needs a certificate from dom0's CA, for every address it
listens on: `dns/tls.pem` (0600), issued when missing, when the addresses
change and when less than a third of its life is left. Without a CA, only
plain DNS on the loopback and on `dns = "plain"` domains.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from controller.core.allocation import Allocation
from controller.core.dnszone import Container, dns_config, site_records
from controller.drivers.dns import CERT, Unbound, dns_dir
from controller.pki import issue
from controller.policy.model import Policy
from controller.policy.names import is_label

log = logging.getLogger(__name__)

CONTAINERS = "containers.json"
MAX_CONTAINERS = 253  # named per machine (agents/containers.py serves no more)
CERT_DAYS = 30
RENEW_LEFT = 1 / 3  # of its life: then a new certificate
CERT_CHECK = 3600.0  # seconds between checks of the certificate's age


def reported_containers(report: Mapping[str, Any]) -> list[Container]:
    """The containers a report lists, well-formed ones only (the tenant's word)."""
    listed = report.get("containers")
    out: list[Container] = []
    for c in listed if isinstance(listed, list) else ():
        if not isinstance(c, Mapping):
            continue
        name, address = c.get("name"), c.get("address")
        if not (isinstance(name, str) and is_label(name) and isinstance(address, str)):
            continue
        try:
            ip = ipaddress.IPv4Interface(address).ip
        except ValueError:
            continue
        out.append(Container(name, str(ip)))
        if len(out) >= MAX_CONTAINERS:
            break
    return out


class SiteDns:
    def __init__(self, state_dir: Path) -> None:
        self.root = dns_dir(state_dir)
        self.unbound = Unbound(state_dir)
        self.containers: dict[str, list[Container]] = self._load()
        self._wake = trio.Event()
        self.publications = 0

    # -- inputs -----------------------------------------------------------------------
    def configure(self, policy: Policy, authority: Any | None, now: datetime) -> None:
        """What unbound should run for `policy` (with a CA: a certificate for it)."""
        config = dns_config(policy)
        cert = None
        if authority is not None and config.tls:
            try:
                cert = self._certificate(authority, config.tls, policy.tld, now)
            except Exception as e:  # (names still resolve in plain where they may)
                log.error("dns: no certificate for DNS over TLS: %s", e)
        elif config.tls:
            log.warning("dns: dom0 has no CA (dom0 ca init): no DNS over TLS, plain DNS only")
        self.unbound.configure(config, cert, policy.dns.ttl)
        self.changed()

    def changed(self) -> None:
        self._wake.set()

    def containers_reported(self, machine: str, report: Mapping[str, Any]) -> None:
        listed = reported_containers(report)
        if listed == self.containers.get(machine, []):
            return
        if listed:
            self.containers[machine] = listed
        else:
            self.containers.pop(machine, None)
        self._save()
        self.changed()

    # -- the publisher -------------------------------------------------------------------
    async def run(self, snapshot: Callable[[], tuple[Policy, Iterable[Allocation]] | None]) -> None:
        """Publish whenever woken; `snapshot` is the policy and the admitted
        machines now (None: nothing applied yet, publish nothing)."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            state = snapshot()
            if state is None:
                continue
            policy, machines = state
            machines = list(machines)
            self._forget_gone(policy, machines)
            try:
                self.unbound.publish(site_records(policy, machines, self.containers))
                self.publications += 1
            except OSError as e:  # (the last zones keep being served)
                log.error("dns: zones not written: %s", e)
            await trio.lowlevel.checkpoint()

    def _forget_gone(self, policy: Policy, machines: list[Allocation]) -> None:
        from controller.core.desired import fqdn_of

        names = {fqdn_of(policy, a) for a in machines}
        gone = [m for m in self.containers if m not in names]
        for m in gone:
            del self.containers[m]
        if gone:
            self._save()

    # -- files ------------------------------------------------------------------------------
    def _load(self) -> dict[str, list[Container]]:
        try:
            raw = json.loads((self.root / CONTAINERS).read_text())
        except (OSError, ValueError):
            return {}
        out: dict[str, list[Container]] = {}
        for machine, listed in raw.items() if isinstance(raw, dict) else ():
            found = reported_containers({"containers": listed})
            if isinstance(machine, str) and found:
                out[machine] = found
        return out

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / CONTAINERS
        tmp = path.with_name(f".{CONTAINERS}.tmp")
        data = {
            m: [{"name": c.name, "address": c.address} for c in cs]
            for m, cs in sorted(self.containers.items())
        }
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.chmod(0o600)
        tmp.replace(path)

    def _certificate(
        self, authority: Any, addresses: tuple[str, ...], tld: str, now: datetime
    ) -> Path:
        path = self.root / CERT
        self.root.mkdir(parents=True, exist_ok=True)
        if not _needs_new(path, addresses, now):
            return path
        authority.issue_server([f"dns.{tld}"], addresses, now, days=CERT_DAYS, to=path)
        log.info("dns: DNS over TLS certificate for %s", ", ".join(addresses))
        return path

    async def renewals(self, policy: Callable[[], Policy], authority: Any) -> None:
        """A certificate near its end is replaced (unbound restarts to take it)."""
        while True:
            await trio.sleep(CERT_CHECK)
            self.configure(policy(), authority, datetime.now(UTC))


def _needs_new(path: Path, addresses: tuple[str, ...], now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    if have != {str(ipaddress.ip_address(a)) for a in addresses}:
        return True
    start, end = issue.not_before(cert), issue.not_after(cert)
    left = end - now
    return left < (end - start) * RENEW_LEFT or left < timedelta(hours=1)
