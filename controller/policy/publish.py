"""`[[publish]]`: a machine's port offered to the outside.

    [[publish]]
    machine = "www1.dmz"   # a name a rule gives, and pins: a forward is by number
    port = "tcp/443"       # the machine's port (tcp or udp, one port)
    listen = 8443          # dom0's port (default: the same)
    via = "uplink"         # on the uplink's tunnel address (default), or "wan"

One line per problem, naming the entry (`publish[2].port`).
"""

from __future__ import annotations

import ipaddress
import re

from common.toml import Checker, did_you_mean
from controller.policy.model import PUBLISH_VIA, Domain, Host, Publish, Rule, Uplink
from controller.policy.names import template_slot

_PORT = re.compile(r"^(tcp|udp)/(\d{1,5})\Z")
MAX_PUBLISH = 256


def tunnel_address(uplink: Uplink) -> str | None:
    """dom0's IPv4 address in the uplink's tunnel: what the VPN provider forwards to."""
    for a in uplink.addresses:
        ip = ipaddress.ip_interface(a).ip
        if ip.version == 4:
            return str(ip)
    return None


def parse(
    c: Checker,
    raw: dict,
    domains: dict[str, Domain],
    rules: list[Rule],
    tld: str,
    uplink: Uplink | None,
    wan: str | None,
    host: Host,
) -> tuple[Publish, ...]:
    section = raw.get("publish", [])
    if not isinstance(section, list) or not all(isinstance(x, dict) for x in section):
        c.bad("publish", c.mistyped(section, "[[publish]] tables"))
        return ()
    if len(section) > MAX_PUBLISH:
        c.bad("publish", f"{len(section)} entries, expected at most {MAX_PUBLISH}")
        return ()
    out: list[Publish] = []
    seen: dict[tuple[str, str, int], str] = {}
    for i, body in enumerate(section, 1):
        where = f"publish[{i}]"
        before = len(c.problems)
        c.unknown_keys(body, where, ["machine", "port", "listen", "via"])
        target = _machine(c, body.get("machine"), f"{where}.machine", domains, rules, tld)
        proto, port = _port(c, body.get("port"), f"{where}.port")
        listen = c.integer(body, "listen", where, port or 1, 1, 65535)
        via = c.string(body, "via", where, "uplink")
        if isinstance(via, str) and via not in PUBLISH_VIA:
            c.bad(
                f"{where}.via",
                f"{via!r}{did_you_mean(via, PUBLISH_VIA)}, expected one of: {', '.join(PUBLISH_VIA)}",
            )
        elif via == "uplink" and (uplink is None or tunnel_address(uplink) is None):
            c.bad(
                f"{where}.via",
                '"uplink", but there is no [uplink] with an IPv4 tunnel address, expected one '
                '(or via = "wan")',
            )
        elif via == "wan" and wan is None:
            c.bad(f"{where}.via", '"wan", but [wan] names no interface, expected wan.interface')
        if proto == "tcp" and listen == host.ssh_port and host.ssh_from:
            c.bad(
                f"{where}.listen",
                f"{listen} is dom0's own sshd (host.ssh_port), expected another port",
            )
        if len(c.problems) > before or target is None or proto is None:
            continue
        key = (str(via), proto, listen)
        if key in seen:
            c.bad(
                f"{where}.listen",
                f"{proto}/{listen} on the {via} is published by {seen[key]} too, expected "
                "one machine per port",
            )
            continue
        seen[key] = where
        name, domain, address = target
        out.append(Publish(where, name, domain, address, proto, port, listen, str(via)))
    return tuple(out)


def _machine(
    c: Checker, value: object, where: str, domains: dict[str, Domain], rules: list[Rule], tld: str
) -> tuple[str, str, str] | None:
    if not isinstance(value, str):
        c.bad(where, f"{'missing' if value is None else c.mistyped(value, 'a string')}, "
              'expected a machine\'s name like "www1.dmz"')  # fmt: skip
        return None
    name = value.strip().lower()
    if name.endswith(f".{tld}"):
        name = name[: -len(tld) - 1]
    label, _, domain = name.partition(".")
    if domain not in domains:
        c.bad(
            where,
            f"{value!r} names no domain of the site{did_you_mean(domain, domains)}, expected "
            f"LABEL.DOMAIN with DOMAIN one of: {', '.join(domains)}",
        )
        return None
    for r in rules:
        if r.domain != domain:
            continue
        slot = template_slot(r.template, label, r.max_slots)
        if slot is None:
            continue
        pin = dict(r.pins).get(slot)
        if pin is None:
            c.bad(
                where,
                f"{name} is not pinned: a forward is by number, expected "
                f'pins = {{ {label} = "ADDRESS" }} on rules.{r.name} (or its address)',
            )
            return None
        return name, domain, pin
    c.bad(where, f"{value!r}: no rule of domain {domain} gives the name {label!r}")
    return None


def _port(c: Checker, value: object, where: str) -> tuple[str | None, int]:
    m = _PORT.match(value.strip().lower()) if isinstance(value, str) else None
    if m is None or not 1 <= int(m[2]) <= 65535:
        c.bad(where, f'{value!r}, expected one port like "tcp/443" or "udp/51820" (1-65535)')
        return None, 0
    return m[1], int(m[2])
