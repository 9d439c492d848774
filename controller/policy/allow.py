"""Allow lists: `allow = [{ to = ..., ports = [...] }]` of domains and rules.

Checked once the domains and rules are known, because a destination may be a
machine name that only a rule gives. Every problem is one line naming the
entry (`domains.lan.allow[2].ports[1]`); a contradiction (an entry that
limits to some ports what another line already grants on every port) is a
problem too, because the operator meant one of the two and dom0 cannot know
which.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

from common.toml import Checker, did_you_mean
from controller.policy.model import INTERNET, PROTOCOLS, Domain, Grant, Ports, Rule
from controller.policy.names import Template, template_slot

_PORTS = re.compile(r"^([a-z]+)(?:/(\d{1,5})(?:-(\d{1,5}))?)?\Z")
_LABEL_GLOB = re.compile(r"^[a-z0-9*?\[\]!-]{1,63}\Z")
_GLOB = re.compile(r"[*?\[]")
MAX_ENTRIES = 256  # per list: every entry is a rule a new connection may walk
EXPECTED_TO = (
    'expected a domain, a machine name or glob like "www1.dmz" or "www*.dmz", '
    '"internet", or a CIDR outside the site like "203.0.113.0/24"'
)


def first_name(template: Template, max_slots: int, glob: str) -> str | None:
    """The first name of a rule's slots that the label glob matches, or None."""
    if not _GLOB.search(glob):
        return glob if template_slot(template, glob, max_slots) is not None else None
    matches = re.compile(fnmatch.translate(glob)).match
    if not template.numbered:
        return template.prefix if matches(template.prefix) else None
    for n in range(1, max_slots + 1):
        name = template.render(n)
        if matches(name):
            return name
    return None


def name_matches(glob: str, label: str) -> bool:
    return fnmatch.fnmatchcase(label, glob)


class AllowChecker:
    """Parses the allow lists of a policy's domains and rules."""

    def __init__(
        self,
        checker: Checker,
        domains: dict[str, Domain],
        rules: list[Rule],
        site_pools: Iterable[tuple[str, ipaddress.IPv4Network]],
        wan: str | None,
        tld: str,
    ) -> None:
        self.c = checker
        self.domains = domains
        self.rules = rules
        self.site_pools = list(site_pools)
        self.wan = wan
        self.tld = tld

    def apply(
        self, domain_bodies: Mapping[str, object], rule_bodies: Mapping[str, tuple[str, object]]
    ) -> tuple[dict[str, Domain], list[Rule]]:
        """Domains and rules with their allow lists (bodies: the raw tables)."""
        domains = dict(self.domains)
        for name, body in domain_bodies.items():
            d = domains.get(name)
            if d is not None and isinstance(body, dict) and "allow" in body:
                grants = self.entries(body["allow"], f"domains.{name}", d, None)
                domains[name] = replace(d, allow=grants)
        rules = []
        for r in self.rules:
            path, body = rule_bodies.get(r.name, ("", None))
            if isinstance(body, dict) and "allow" in body and r.domain in domains:
                r = replace(r, allow=self.entries(body["allow"], path, domains[r.domain], r))
            rules.append(r)
        return domains, rules

    def entries(
        self, raw: object, path: str, domain: Domain, rule: Rule | None
    ) -> tuple[Grant, ...]:
        where = f"{path}.allow"
        if not isinstance(raw, list):
            self.c.bad(
                where, self.c.mistyped(raw, 'a list like [{ to = "dmz", ports = ["tcp/443"] }]')
            )
            return ()
        if len(raw) > MAX_ENTRIES:
            self.c.bad(where, f"{len(raw)} entries, expected at most {MAX_ENTRIES}")
            return ()
        out: list[Grant] = []
        seen: dict[tuple[str, str], str] = {}
        for i, entry in enumerate(raw, 1):
            g = self.entry(entry, f"{where}[{i}]", domain, rule)
            if g is None:
                continue
            key = (g.kind, g.to)
            if key in seen:
                self.c.bad(
                    f"{g.where}.to",
                    f"{g.to!r} is listed in {seen[key]} too, expected one entry per destination "
                    "(with all its ports)",
                )
                continue
            seen[key] = g.where
            if (why := self.already(domain, rule, g, out)) is not None:
                self.c.bad(g.where, why)
                continue
            out.append(g)
        return tuple(out)

    def entry(self, entry: object, where: str, domain: Domain, rule: Rule | None) -> Grant | None:
        if isinstance(entry, str):
            entry = {"to": entry}
        if not isinstance(entry, dict):
            self.c.bad(where, self.c.mistyped(entry, '{ to = "...", ports = [...] } or a string'))
            return None
        before = len(self.c.problems)
        self.c.unknown_keys(entry, where, ["to", "ports"])
        to = entry.get("to")
        if not isinstance(to, str):
            self.c.bad(
                f"{where}.to",
                f"{'missing' if to is None else self.c.mistyped(to, 'a string')}, {EXPECTED_TO}",
            )
            return None
        dest = self.destination(to.strip().lower(), f"{where}.to")
        ports = self.ports(entry["ports"], f"{where}.ports") if "ports" in entry else ()
        if dest is None or ports is None or len(self.c.problems) > before:
            return None  # (an entry with a misspelt key would grant more than meant)
        kind, target = dest
        return Grant(where, domain.name, rule.name if rule else None, kind, target, ports)

    def destination(self, to: str, where: str) -> tuple[str, str] | None:
        if to == INTERNET:
            if self.wan is None:
                self.c.bad(
                    where, "the internet, but [wan] names no interface, expected wan.interface"
                )
                return None
            return "internet", INTERNET
        if to in self.domains:
            return "domain", to
        if to[:1].isdigit():
            if self.wan is None:
                self.c.bad(
                    where,
                    f"{to!r} is outside the site, but [wan] names no interface, expected wan.interface",
                )
                return None
            return self.network(to, where)
        label, dot, rest = to.partition(".")
        if rest.endswith(f".{self.tld}"):
            rest = rest[: -len(self.tld) - 1]
        if not dot:
            known = [*self.domains, INTERNET]
            self.c.bad(
                where,
                f"unknown destination {to!r}{did_you_mean(to, known)}, {EXPECTED_TO}",
            )
            return None
        if rest not in self.domains:
            self.c.bad(
                where,
                f"{to!r} names domain {rest!r}, which is not one{did_you_mean(rest, self.domains)}; "
                f"expected one of: {', '.join(self.domains)}",
            )
            return None
        if not _LABEL_GLOB.match(label):
            self.c.bad(where, f"{label!r} is not a machine name or glob, {EXPECTED_TO}")
            return None
        candidates = [r for r in self.rules if r.domain == rest]
        if not any(first_name(r.template, r.max_slots, label) for r in candidates):
            given = (
                ", ".join(
                    f"{r.template.render(1)}..{r.template.render(r.max_slots)}" for r in candidates
                )
                or "no rule gives names there"
            )
            self.c.bad(
                where,
                f"{to!r} matches no machine: no rule of domain {rest} gives such a name "
                f"(names there: {given})",
            )
            return None
        return "machines", f"{label}.{rest}"

    def network(self, to: str, where: str) -> tuple[str, str] | None:
        try:
            net = ipaddress.IPv4Network(to, strict=True)
        except ValueError as e:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f" (did you mean {ipaddress.IPv4Network(to, strict=False)}?)"
            self.c.bad(where, f"{to!r} is not an IPv4 network: {e}{hint}, {EXPECTED_TO}")
            return None
        if net.prefixlen == 0:
            self.c.bad(where, f'{to} is every address, expected "internet" for that')
            return None
        for path, pool in self.site_pools:
            if net.overlaps(pool):
                self.c.bad(
                    where,
                    f"{net} is inside the site ({path} = {pool}), expected a domain or machine "
                    "name for the site's machines, or a network outside every pool",
                )
                return None
        return "network", str(net)

    def ports(self, raw: object, where: str) -> tuple[Ports, ...] | None:
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            self.c.bad(
                where, self.c.mistyped(raw, 'a list of strings like ["tcp/443", "udp/53", "icmp"]')
            )
            return None
        if not raw:
            self.c.bad(where, 'empty, expected e.g. ["tcp/443"], or no ports key for every port')
            return None
        by_proto: dict[str, list[tuple[int, int, str]]] = {}
        ok = True
        for i, text in enumerate(raw, 1):
            at = f"{where}[{i}]"
            m = _PORTS.match(text.strip().lower())
            if m is None or m[1] not in PROTOCOLS:
                proto = m[1] if m else text
                self.c.bad(
                    at,
                    f"{text!r}{did_you_mean(proto, PROTOCOLS) if m else ''}, expected PROTOCOL or "
                    f"PROTOCOL/PORT or PROTOCOL/LOW-HIGH with PROTOCOL one of {', '.join(PROTOCOLS)}, "
                    'e.g. "tcp/443", "tcp/8000-8100", "icmp"',
                )
                ok = False
                continue
            proto, lo_s, hi_s = m[1], m[2], m[3]
            if proto == "icmp" and lo_s:
                self.c.bad(at, f'{text!r}: icmp has no ports, expected "icmp"')
                ok = False
                continue
            lo, hi = (
                (int(lo_s), int(hi_s or lo_s)) if lo_s else (1 if proto != "icmp" else 0, 65535)
            )
            if lo_s and not (1 <= lo <= hi <= 65535):
                self.c.bad(
                    at, f"{text!r}, expected ports from 1 to 65535 (LOW-HIGH with LOW <= HIGH)"
                )
                ok = False
                continue
            for olo, ohi, other in by_proto.get(proto, []):
                if lo <= ohi and olo <= hi:
                    self.c.bad(
                        at, f"{text!r} overlaps {other!r} of the same list, expected each port once"
                    )
                    ok = False
                    break
            else:
                by_proto.setdefault(proto, []).append((lo, hi, text))
        if not ok:
            return None
        out = []
        for proto in PROTOCOLS:
            spans = sorted(by_proto.get(proto, []))
            if not spans:
                continue
            whole = proto == "icmp" or (
                len(spans) == 1 and spans[0][:2] == (1, 65535) and "/" not in spans[0][2]
            )
            out.append(Ports(proto, () if whole else tuple((lo, hi) for lo, hi, _ in spans)))
        return tuple(out)

    def already(
        self, domain: Domain, rule: Rule | None, g: Grant, earlier: list[Grant]
    ) -> str | None:
        """Why g contradicts what the policy already grants on every port, or None."""
        whole = _whole_grants(domain)
        if rule is not None:
            whole += [
                (x.kind, x.to, x.where, "or narrow that") for x in domain.allow if not x.ports
            ]
        whole += [(x.kind, x.to, x.where, "or narrow that") for x in earlier if not x.ports]
        for kind, to, line, fix in whole:
            if (kind, to) == (g.kind, g.to) or (kind, to) == ("domain", g.to_domain):
                ports = f"limits to {g.ports_text}" if g.ports else "grants again"
                return (
                    f"{ports} what {line} already grants on every port; expected one of "
                    f"the two ({fix})"
                )
        return None


def _whole_grants(d: Domain) -> list[tuple[str, str, str, str]]:
    """What the shorthand keys of a domain grant on every port: (kind, to,
    the line, how to limit it instead)."""
    path = f"domains.{d.name}"
    out = [
        ("domain", other, f"{path}.reach", f"remove {other!r} from it to limit it")
        for other in d.reach
    ]
    if d.members_reach:
        out.append(("domain", d.name, f"{path}.members_reach", "set it to false to limit it"))
    if d.internet:
        out.append(("internet", INTERNET, f"{path}.internet", "set it to false to limit it"))
    return out
