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
