"""Stage3 and snapshot handling: the pure parts (gpg status, Gentoo's `latest`
listing, the archive's top folder). The executor runs gpg and tar and feeds
their output here."""

from __future__ import annotations

import re
from dataclasses import dataclass


class SignatureError(ValueError):
    pass


@dataclass(frozen=True)
class GoodSignature:
    fingerprint: str  # the signing (sub)key
    primary: str  # its primary key


def check_gpg_status(status: str, allowed: tuple[str, ...]) -> GoodSignature:
    """Decide from `gpg --status-fd` output whether an allowed key made a good signature.

    Only GOODSIG + VALIDSIG count; an expired or revoked key, a bad signature or
    a missing key is refused with a clear reason.
    """
    lines = [ln.split() for ln in status.splitlines() if ln.startswith("[GNUPG:] ")]
    kinds = {ln[1] for ln in lines if len(ln) > 1}
    for bad, why in (
        ("BADSIG", "the signature does not match the file (corrupt or tampered download)"),
        ("EXPKEYSIG", "the signing key has expired"),
        ("REVKEYSIG", "the signing key was revoked"),
        ("EXPSIG", "the signature has expired"),
        ("ERRSIG", "the signature cannot be checked (the signing key is not in the keyring?)"),
        ("NO_PUBKEY", "the signing key is not in the keyring"),
    ):
        if bad in kinds:
            raise SignatureError(why)
    if "GOODSIG" not in kinds:
        raise SignatureError("gpg reported no good signature")
    allowed_set = {a.upper() for a in allowed}
    for ln in lines:
        if len(ln) >= 3 and ln[1] == "VALIDSIG":
            fpr = ln[2].upper()
            primary = ln[-1].upper() if len(ln) >= 12 else fpr
            if fpr in allowed_set or primary in allowed_set:
                return GoodSignature(fpr, primary)
            raise SignatureError(
                f"good signature by {primary}, which is not an allowed key "
                f"({', '.join(sorted(allowed_set))})"
            )
    raise SignatureError("gpg reported no VALIDSIG line")


_LISTING = re.compile(
    r"^(?P<path>\S+/(?P<name>stage3-(?P<variant>[a-z0-9-]+)-\d{8}T\d{6}Z\.tar\.\w+))"
    r"\s+\d+\s*$"
)


def parse_latest(text: str, variant: str) -> str:
    """The stage3 path from a verified `latest-stage3-<variant>.txt` body."""
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _LISTING.match(line.strip())
        if m and m["variant"] == variant and ".." not in m["path"].split("/"):
            return m["path"]
    raise ValueError(f"no stage3-{variant} entry in the listing")


def top_folder(members: list[str]) -> str:
    """The single top folder every member lives in (e.g. `gentoo-20250101`).

    A snapshot is extracted with `--strip-components=1`; if its members do not
    all share one top folder, stripping would drop or misplace files, so such an
    archive is refused.
    """
    tops = set()
    for m in members:
        while m.startswith("./"):
            m = m[2:]
        if not m or m == ".":
            continue
        first = m.split("/", 1)[0]
        if first in ("", ".", ".."):
            raise ValueError(f"member {m!r} has no usable top folder")
        if "/" not in m.rstrip("/") and not m.endswith("/"):
            raise ValueError(f"member {m!r} is a file at the top of the archive")
        tops.add(first)
    if len(tops) != 1:
        shown = ", ".join(sorted(tops)[:5]) or "none"
        raise ValueError(f"expected one top folder, found: {shown}")
    return tops.pop()
