"""MAC addresses and MAC patterns.

Every pattern the policy can express (a glob, a prefix, a mask, "locally
administered random") is a *ternary* pattern: a 48-bit value and a 48-bit
care-mask. Ternary patterns intersect into ternary patterns and their subset
relation is exact, which is what lets `policy check` prove that a rule is
shadowed by an earlier one instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FULL = (1 << 48) - 1
_HEX2 = re.compile(r"^[0-9a-f]{2}\Z")
_GLOB_OCTET = re.compile(r"^[0-9a-f?]{2}\Z")


class MacError(ValueError):
    """A MAC or MAC pattern that does not parse; the message says what is expected."""


def parse_mac(text: str) -> int:
    """'52:54:00:AB:cd:01' (or with '-') -> 48-bit int."""
    parts = text.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(_HEX2.match(p) for p in parts):
        raise MacError(f"{text!r} is not a MAC, expected six hex octets like 52:54:00:12:34:56")
    return int("".join(parts), 16)


def format_mac(value: int) -> str:
    raw = f"{value:012x}"
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


def normalize_mac(text: str) -> str:
    return format_mac(parse_mac(text))


@dataclass(frozen=True, slots=True)
class Ternary:
    """Matches a MAC m when m & mask == value."""

    value: int = 0
    mask: int = 0

    def matches(self, mac: int) -> bool:
        return mac & self.mask == self.value

    def intersect(self, other: Ternary) -> Ternary | None:
        common = self.mask & other.mask
        if self.value & common != other.value & common:
            return None
        return Ternary(self.value | other.value, self.mask | other.mask)

    def covers(self, other: Ternary) -> bool:
        """Every MAC that `other` matches, `self` matches too."""
        return self.mask & ~other.mask == 0 and other.value & self.mask == self.value

    def describe(self) -> str:
        return f"{format_mac(self.value)}/{format_mac(self.mask)}"


ANY = Ternary()
# Locally administered (bit 1 of the first octet) and unicast (bit 0 clear):
# what randomizing guests (and `random` MAC features) generate.
RANDOM = Ternary(0x02 << 40, 0x03 << 40)


def parse_glob(text: str) -> Ternary:
    """A MAC glob: six colon-separated octets, each two hex digits where a
    digit may be '?', or '*' for a whole octet; a trailing '*' stands for all
    remaining octets ('52:54:00:*'). Byte-aligned on purpose: a glob that
    could slide across colons would make matching and shadowing ambiguous."""
    raw = text.strip().lower()
    parts = raw.split(":")
    if parts and parts[-1] == "*" and len(parts) < 6:
        parts = parts[:-1] + ["*"] * (6 - len(parts) + 1)
    if len(parts) != 6:
        raise MacError(
            f"{text!r} is not a MAC glob, expected six octets like 52:54:00:*:*:* "
            "or a prefix ending in '*' like 52:54:00:*"
        )
    value = mask = 0
    for part in parts:
        value <<= 8
        mask <<= 8
        if part == "*":
            continue
        if not _GLOB_OCTET.match(part):
            raise MacError(
                f"{text!r}: octet {part!r} is not valid, expected two hex digits, '?' per digit, or '*'"
            )
        for i, ch in enumerate(part):
            shift = 4 if i == 0 else 0
            if ch != "?":
                value |= int(ch, 16) << shift
                mask |= 0xF << shift
    return Ternary(value, mask)


def parse_prefix(text: str) -> Ternary:
    """'52:54:00:00:00:00/24': the first 24 bits."""
    addr, sep, length = text.strip().partition("/")
    if not sep or not length.isdigit() or not 0 <= int(length) <= 48:
        raise MacError(
            f"{text!r} is not a MAC prefix, expected ADDRESS/LENGTH like 52:54:00:00:00:00/24"
        )
    bits = int(length)
    mask = (FULL << (48 - bits)) & FULL
    value = parse_mac(addr)
    if value & ~mask:
        raise MacError(
            f"{text!r} has bits set beyond /{bits}, expected {format_mac(value & mask)}/{bits}"
        )
    return Ternary(value, mask)


def parse_mask(text: str) -> Ternary:
    """'52:54:00:d0:00:01/ff:ff:ff:ff:00:01': value and care-mask, any bits."""
    addr, sep, mask_text = text.strip().partition("/")
    if not sep:
        raise MacError(
            f"{text!r} is not a MAC mask, expected ADDRESS/MASK like 52:54:00:00:00:01/ff:ff:ff:00:00:01"
        )
    value = parse_mac(addr)
    mask = parse_mac(mask_text)
    if value & ~mask:
        raise MacError(
            f"{text!r} sets bits outside its mask, expected {format_mac(value & mask)}/{format_mac(mask)}"
        )
    return Ternary(value, mask)


def is_multicast(mac: int) -> bool:
    return bool((mac >> 40) & 0x01)
