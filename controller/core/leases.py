"""DHCP leases as dnsmasq records them: which machine holds which address.

dnsmasq's lease file has one lease per line: `EXPIRY MAC ADDRESS HOSTNAME
CLIENT-ID` (EXPIRY 0: infinite). A machine that has held its reserved lease
is established (see core.decide); the file is the only place that says so.
Pure: text in, a mapping out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.policy.macs import MacError, format_mac, parse_mac


@dataclass(frozen=True, slots=True)
class Leases:
    """The current leases: MAC -> leased IPv4 address (an event for the reconciler)."""

    by_mac: Mapping[str, str] = field(default_factory=dict)


def parse_leases(text: str, now: int) -> Leases:
    """Unexpired leases; malformed lines (the file is dnsmasq's, written as
    clients ask) are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        expiry = int(parts[0])
        if expiry != 0 and expiry < now:
            continue
        try:
            mac = format_mac(parse_mac(parts[1]))
            address = str(ipaddress.IPv4Address(parts[2]))
        except (MacError, ValueError):
            continue
        out[mac] = address
    return Leases(out)


def stale_leases(
    reserved: Mapping[str, tuple[str, str]],
    leased: Mapping[str, str],
    renewed: Mapping[str, str],
) -> list[tuple[str, str, str]]:
    """(mac, port, address) of the present machines that hold a lease for
    another address than their reservation (`reserved`: MAC -> (port,
    address)) and have not been renewed for that address yet: a client that
    ignores the carrier is flapped once per change, not at every sync."""
    out = []
    for mac, (port, address) in reserved.items():
        held = leased.get(mac)
        if held is not None and held != address and renewed.get(mac) != address:
            out.append((mac, port, address))
    return sorted(out)
