"""Policy files: TOML in, a validated `Policy` or a list of problems out.

Every problem is one line, `FILE: field.path: what is wrong, what is expected`.
Validation goes on after the first problem so that the operator sees all of
them at once; nothing is half-accepted: a file with any problem yields none.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import hashlib
import ipaddress
import re
from pathlib import Path

from common.agentconfig import MAX_CONTAINERS, MIN_CONTAINERS
from common.toml import Checker, Problem, Problems, did_you_mean
from controller.policy import macs, publish
from controller.policy.allow import AllowChecker
from controller.policy.model import (
    DHCP_LOG,
    DNS_MODES,
    QUARANTINE,
    SERVICES,
    WAN_ALLOW,
    Dns,
    Domain,
    Host,
    Hub,
    Limits,
    Match,
    Policy,
    Quarantine,
    Rule,
    Uplink,
)
from controller.policy.names import (
    MAX_NAME,
    Template,
    TemplateError,
    can_collide,
    is_label,
    parse_template,
    suffix_problem,
    template_slot,
)

_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}\Z")
_IFGLOB = re.compile(r"^[A-Za-z0-9_.:\-*?\[\]!]{1,15}\Z")
_RULE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
_DURATION = re.compile(r"^(\d+)([smhd])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ULA = ipaddress.IPv6Network("fc00::/7")


__all__ = ["PolicyError", "Problem", "load_or_report", "load_policy", "parse_policy"]


class PolicyError(Problems):
    """A policy file that cannot be used; `problems` says why, one per line."""


def load_policy(path: str | Path) -> Policy:
    """Read and validate one file; raise PolicyError with every problem."""
    v = _Validator(str(path))
    return v.policy_of(v.read_file(path))


def load_or_report(path: str | Path, prog: str) -> Policy | None:
    """For commands: the policy, or None after printing one line per problem
    to stderr (the caller exits 2). One problem is one line; several end with
    a count, so that a reader of a log knows the list is whole."""
    import sys

    try:
        return load_policy(path)
    except PolicyError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        if len(e.problems) > 1:
            print(
                f"{prog}: refusing an invalid policy ({len(e.problems)} problems)", file=sys.stderr
            )
        return None


def parse_policy(data: bytes, name: str) -> Policy:
    v = _Validator(name)
    return v.policy_of(v.read_bytes(data))


MAX_AGENT_CERTIFICATE = 30 * 86400  # seconds: [agents] certificate_life at most
MIN_REMAP_EVERY = 20  # seconds: a domain's remap_every at least
MIN_REMAP_GRACE = 10  # seconds (its records' TTL is at most half of it)


def parse_duration(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _DURATION.match(value.strip())):
        return int(m[1]) * _UNITS[m[2]]
    return None


class _Validator(Checker):
    error = PolicyError

    def __init__(self, file: str) -> None:
        super().__init__(file)
        self.rule_bodies: dict[str, tuple[str, dict]] = {}  # rule name -> (path, raw table)

    def policy_of(self, raw: dict) -> Policy:
        policy = self.policy(raw)
        if self.problems or policy is None:
            self.fail()
        return policy

    # -- helpers (the typed getters are Checker's) -------------------------------
    def duration(self, raw: dict, key: str, path: str, default: str, minimum: int) -> int:
        value = raw.get(key, default)
        seconds = parse_duration(value)
        if seconds is None:
            self.bad(
                f"{path}.{key}",
                f'{value!r} is not a duration, expected e.g. "90s", "10m", "1h", "7d"',
            )
            return parse_duration(default) or 0
        if seconds < minimum:
            self.bad(
                f"{path}.{key}", f"{value!r} is too short, expected at least {minimum} seconds"
            )
        return seconds

    def ifname(self, value: str | None, path: str, glob: bool = False) -> str | None:
        if value is None:
            return None
        if not (_IFGLOB if glob else _IFNAME).match(value):
            what = "an interface name glob" if glob else "an interface name"
            self.bad(path, f"{value!r} is not {what}, expected 1-15 characters like virbr0")
            return None
        return value

    def network(self, value: object, path: str) -> ipaddress.IPv4Network | None:
        if not isinstance(value, str):
            self.bad(path, self.mistyped(value, 'an IPv4 CIDR like "10.10.0.0/24"'))
            return None
        try:
            net = ipaddress.IPv4Network(value, strict=True)
        except ValueError as e:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f" (did you mean {ipaddress.IPv4Network(value, strict=False)}?)"
            self.bad(
                path,
                f'{value!r} is not an IPv4 network: {e}{hint}, expected a CIDR like "10.10.0.0/24"',
            )
            return None
        if net.prefixlen > 30:
            self.bad(path, f"{value!r} is too small, expected a prefix of /30 or shorter")
            return None
        return net

    def gateway(
        self, raw: dict, path: str, pool: ipaddress.IPv4Network | None
    ) -> ipaddress.IPv4Address | None:
        if pool is None:
            return None
        value = raw.get("gateway")
        if value is None:
            return pool.network_address + 1
        try:
            addr = ipaddress.IPv4Address(value) if isinstance(value, str) else None
        except ValueError:
            addr = None
        if (
            addr is None
            or addr not in pool
            or addr in (pool.network_address, pool.broadcast_address)
        ):
            self.bad(
                f"{path}.gateway",
                f"{value!r} is not a host address of {pool}, expected e.g. {pool.network_address + 1}",
            )
            return None
        return addr

    # -- sections --------------------------------------------------------------
    def policy(self, raw: dict) -> Policy | None:
        self.unknown_keys(
            raw,
            "policy",
            [
                "site",
                "host",
                "bridge",
                "wan",
                "uplink",
                "hub",
                "dhcp",
                "domains",
                "rules",
                "quarantine",
                "limits",
                "publish",
                "agents",
                "dns",
            ],
        )
        site = self.table(raw, "site", "", ["tld", "release_after", "ula"])
        tld = self.string(site, "tld", "site", "internal") or "internal"
        if problem := suffix_problem(tld):
            self.bad(
                "site.tld",
                f'{tld!r}: {problem}, expected a DNS suffix like "internal" or "home.arpa"',
            )
            tld = "internal"  # (the other checks go on with a valid one)
        release_after = self.duration(site, "release_after", "site", "30d", 60)

        bridge_t = self.table(raw, "bridge", "", ["name", "trusted_ports", "max_machines_per_port"])
        per_port = self.integer(bridge_t, "max_machines_per_port", "bridge", 1, 1, 4096)
        bridge = (
            self.ifname(self.string(bridge_t, "name", "bridge", "virbr0"), "bridge.name")
            or "virbr0"
        )
        trusted = tuple(
            p
            for i, p in enumerate(self.strings(bridge_t, "trusted_ports", "bridge"))
            if self.ifname(p, f"bridge.trusted_ports[{i + 1}]")
        )
        wan_t = self.table(raw, "wan", "", ["interface", "allow"])
        wan = self.ifname(self.string(wan_t, "interface", "wan"), "wan.interface")
        if wan is not None and wan == bridge:
            self.bad("wan.interface", f"{wan!r} is the managed bridge, expected the host's uplink")
        wan_allow = self.strings(wan_t, "allow", "wan")
        for i, a in enumerate(wan_allow):
            if a not in WAN_ALLOW:
                self.bad(
                    f"wan.allow[{i + 1}]",
                    f"unknown {a!r}{did_you_mean(a, WAN_ALLOW)}, "
                    f"expected one of: {', '.join(WAN_ALLOW)}",
                )
        uplink = self.uplink(raw, wan, bridge)
        hub = self.hub(raw, bridge, uplink)

        host = self.host(raw)
        limits = self.limits(raw)
        dhcp_t = self.table(raw, "dhcp", "", ["lease_time", "log"])
        lease = self.duration(dhcp_t, "lease_time", "dhcp", "1h", 120)
        dhcp_log = self.string(dhcp_t, "log", "dhcp", "transactions")
        agents_t = self.table(raw, "agents", "", ["certificate_life", "advertise"])
        advertise = self.boolean(agents_t, "advertise", "agents", True)
        cert_life = self.duration(agents_t, "certificate_life", "agents", "24h", 600)
        if cert_life > MAX_AGENT_CERTIFICATE:
            self.bad(
                "agents.certificate_life",
                f"{agents_t['certificate_life']!r} is too long, expected at most 30d "
                "(a stolen certificate is good until it expires or is revoked)",
            )
        if isinstance(dhcp_log, str) and dhcp_log not in DHCP_LOG:
            self.bad(
                "dhcp.log",
                f"{dhcp_log!r}{did_you_mean(dhcp_log, DHCP_LOG)}, "
                f"expected one of: {', '.join(DHCP_LOG)}",
            )

        dns = self.dns(raw)
        self.site_ula = self.ula(site, tld)
        domains = self.domains(raw, wan, hub is not None or "hub" in raw)
        quarantine = self.quarantine(raw)
        self.overlaps(domains, quarantine, hub)
        rules = self.rules(raw, domains, bridge)
        self.name_lengths(tld, rules, quarantine)
        domains, rules = self.allow_lists(raw, domains, rules, quarantine, hub, wan, tld)
        published = publish.parse(self, raw, domains, rules, tld, uplink, wan, host)
        if self.problems:
            return None
        return Policy(
            source=self.file,
            tld=tld,
            bridge=bridge,
            trusted_ports=trusted,
            wan=wan,
            wan_allow=tuple(dict.fromkeys(wan_allow)),
            uplink=uplink,
            hub=hub,
            lease_seconds=lease,
            dhcp_log=dhcp_log,
            pinned={
                d: frozenset(a for r in rules if r.domain == d for _, a in r.pins) for d in domains
            },
            release_after=release_after,
            domains=domains,
            rules=tuple(rules),
            quarantine=quarantine,
            host=host,
            max_machines_per_port=per_port,
            limits=limits,
            publish=published,
            agent_certificate_seconds=cert_life,
            advertise=advertise,
            dns=dns,
        )

    def remap(self, body: dict, path: str) -> tuple[int | None, int | None]:
        """`remap_every` (off by default) and `remap_grace` (default: half of
        it, at most 10 minutes; shorter than remap_every)."""
        if "remap_every" not in body:
            if "remap_grace" in body:
                self.bad(f"{path}.remap_grace", "is set but remap_every is not, expected both")
            return None, None
        every = self.duration(body, "remap_every", path, "6h", MIN_REMAP_EVERY)
        default = f"{max(MIN_REMAP_GRACE, min(every // 2, 600))}s"
        grace = self.duration(body, "remap_grace", path, default, MIN_REMAP_GRACE)
        if grace >= every:
            self.bad(
                f"{path}.remap_grace",
                f"{body.get('remap_grace', default)!r} is not shorter than remap_every "
                f"({body['remap_every']!r}), expected a shorter grace",
            )
        return every, grace

    def dns(self, raw: dict) -> Dns:
        t = self.table(raw, "dns", "", ["upstream", "upstream_ca", "ttl"])
        upstream = self.strings(t, "upstream", "dns")
        for i, u in enumerate(upstream):
            if problem := _upstream_problem(u):
                self.bad(
                    f"dns.upstream[{i + 1}]",
                    f"{u!r}: {problem}, expected ADDRESS[@PORT][#TLS-NAME] like "
                    '"9.9.9.9@853#dns.quad9.net"',
                )
        ca = self.string(t, "upstream_ca", "dns")
        if ca is not None and not ca.startswith("/"):
            self.bad("dns.upstream_ca", f"{ca!r} is not an absolute path, expected a PEM file")
        elif ca is not None and not upstream:
            self.bad("dns.upstream_ca", "is set but dns.upstream names no resolver")
        ttl = self.duration(t, "ttl", "dns", "5m", 5)
        if ttl > 86400:
            self.bad("dns.ttl", f"{t['ttl']!r} is too long, expected at most 1d")
        return Dns(tuple(dict.fromkeys(upstream)), ca, ttl)

    def allow_lists(
        self,
        raw: dict,
        domains: dict[str, Domain],
        rules: list[Rule],
        quarantine: Quarantine,
        hub: Hub | None,
        wan: str | None,
        tld: str,
    ) -> tuple[dict[str, Domain], list[Rule]]:
        pools = [(f"domains.{d.name}.pool", d.pool) for d in domains.values()]
        pools += [
            (f"domains.{d.name}.containers_pool", d.containers_pool)
            for d in domains.values()
            if d.containers_pool is not None
        ]
        if quarantine.pool is not None:
            pools.append(("quarantine.pool", quarantine.pool))
        if hub is not None:
            pools.append(("hub.pool", hub.pool))
        section = raw.get("domains", {})
        checker = AllowChecker(self, domains, rules, pools, wan, tld)
        return checker.apply(section if isinstance(section, dict) else {}, self.rule_bodies)

    def uplink(self, raw: dict, wan: str | None, bridge: str) -> Uplink | None:
        if "uplink" not in raw:
            return None
        keys = ["interface", "endpoint", "public_key", "private_key_file", "addresses", "table",
                "mtu", "persistent_keepalive"]  # fmt: skip
        u = self.table(raw, "uplink", "", keys)
        if not isinstance(raw["uplink"], dict):
            return None
        ok = len(self.problems)
        iface = (
            self.ifname(self.string(u, "interface", "uplink", "wg0"), "uplink.interface") or "wg0"
        )
        if iface in (wan, bridge):
            self.bad(
                "uplink.interface",
                f"{iface!r} is already the WAN or the bridge, expected its own name",
            )
        if wan is None:
            self.bad(
                "uplink",
                "needs wan.interface: the interface whose traffic the kill switch limits to the tunnel",
            )
        endpoint = self.string(u, "endpoint", "uplink")
        host, port = None, 0
        if endpoint is None:
            self.bad("uplink.endpoint", 'missing, expected the VPN server as "ADDRESS:PORT"')
        else:
            host, port = _endpoint(endpoint)
            if host is None:
                self.bad(
                    "uplink.endpoint",
                    f'{endpoint!r} is not ADDRESS:PORT, expected e.g. "198.51.100.3:51820" '
                    "(an IP address: resolving a name would need DNS outside the tunnel)",
                )
        key = self.string(u, "public_key", "uplink")
        if key is None or not _is_wg_key(key):
            self.bad(
                "uplink.public_key",
                "missing or not a WireGuard key, expected 44 characters of base64 (as `wg pubkey` prints)",
            )
        key_file = self.string(u, "private_key_file", "uplink", "keys/uplink.key") or ""
        addresses = self.strings(u, "addresses", "uplink")
        if not addresses:
            self.bad(
                "uplink.addresses",
                'missing, expected dom0\'s tunnel addresses like ["10.200.0.2/32"]',
            )
        for i, a in enumerate(addresses):
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                self.bad(
                    f"uplink.addresses[{i + 1}]",
                    f'{a!r} is not an address with prefix, expected e.g. "10.200.0.2/32"',
                )
        table = self.integer(u, "table", "uplink", 51820, 1, 0xFFFFFFFF)
        if table in (253, 254, 255):
            self.bad(
                "uplink.table",
                f"{table} is a kernel table (default, main or local), expected e.g. 51820",
            )
        mtu = self.integer(u, "mtu", "uplink", 1420, 1280, 9000)
        keepalive = self.integer(u, "persistent_keepalive", "uplink", 25, 0, 65535)
        if len(self.problems) != ok or host is None or key is None:
            return None
        return Uplink(iface, host, port, key, key_file, tuple(addresses), table, mtu, keepalive)

    def hub(self, raw: dict, bridge: str, uplink: Uplink | None) -> Hub | None:
        if "hub" not in raw:
            return None
        h = self.table(
            raw,
            "hub",
            "",
            ["interface", "listen_port", "pool", "gateway", "private_key_file", "mtu"],
        )
        if not isinstance(raw["hub"], dict):
            return None
        ok = len(self.problems)
        iface = self.ifname(self.string(h, "interface", "hub", "hub0"), "hub.interface") or "hub0"
        if iface == bridge or (uplink and iface == uplink.interface):
            self.bad("hub.interface", f"{iface!r} is already in use, expected its own name")
        port = self.integer(h, "listen_port", "hub", 51821, 1, 65535)
        if "pool" not in h:
            self.bad(
                "hub.pool",
                'missing, expected an IPv4 CIDR for the machines\' bridge addresses, like "10.250.0.0/16"',
            )
            pool = None
        else:
            pool = self.network(h["pool"], "hub.pool")
        gateway = self.gateway(h, "hub", pool)
        key_file = self.string(h, "private_key_file", "hub", "keys/hub.key") or ""
        mtu = self.integer(h, "mtu", "hub", 1420, 1280, 9000)
        if len(self.problems) != ok or pool is None or gateway is None:
            return None
        return Hub(iface, port, pool, gateway, key_file, mtu)

    def host(self, raw: dict) -> Host:
        h = self.table(raw, "host", "", ["ssh_from", "ssh_port", "ping", "dhcp_client"])
        sources = []
        for i, cidr in enumerate(self.strings(h, "ssh_from", "host")):
            try:
                sources.append(str(ipaddress.ip_network(cidr, strict=True)))
            except ValueError as e:
                self.bad(
                    f"host.ssh_from[{i + 1}]",
                    f'{cidr!r}: {e}, expected a CIDR like "203.0.113.0/24"',
                )
        return Host(
            ssh_from=tuple(dict.fromkeys(sources)),
            ssh_port=self.integer(h, "ssh_port", "host", 22, 1, 65535),
            ping=self.boolean(h, "ping", "host", True),
            dhcp_client=self.boolean(h, "dhcp_client", "host", True),
        )

    def limits(self, raw: dict) -> Limits:
        d = Limits()
        keys = {
            "connections_per_machine": (d.connections_per_machine, 16, 1_000_000),
            "new_connections_per_second": (d.new_connections_per_second, 1, 1_000_000),
            "broadcasts_per_second": (d.broadcasts_per_second, 1, 1_000_000),
            "unknown_frames_per_second": (d.unknown_frames_per_second, 1, 1_000_000),
        }
        t = self.table(raw, "limits", "", keys)
        return Limits(
            **{k: self.integer(t, k, "limits", dflt, lo, hi) for k, (dflt, lo, hi) in keys.items()}
        )

    def ula(self, site: dict, tld: str) -> ipaddress.IPv6Network:
        """The site's ULA /48 (RFC 4193): `site.ula`, or one derived from the
        suffix, so that it stays the same across reloads and restarts."""
        value = site.get("ula")
        if value is not None:
            try:
                net = ipaddress.IPv6Network(value, strict=True) if isinstance(value, str) else None
            except ValueError:
                net = None
            if net is None or net.prefixlen != 48 or not net.subnet_of(_ULA):
                self.bad("site.ula", f'{value!r}, expected a ULA /48 like "fd12:3456:789a::/48"')
            else:
                return net
        digest = hashlib.sha256(f"dom0 site {tld}".encode()).digest()
        return ipaddress.IPv6Network((int.from_bytes(b"\xfd" + digest[:5], "big") << 80, 48))

    def pool6(
        self, body: dict, path: str, name: str, in_hub: bool, ula: ipaddress.IPv6Network
    ) -> ipaddress.IPv6Network | None:
        has_pool = "pool6" in body
        wanted = self.boolean(body, "ipv6", path, has_pool)
        if not wanted:
            if has_pool:
                self.bad(f"{path}.ipv6", "is false but pool6 is set, expected one of the two")
            return None
        if in_hub:
            self.bad(
                f"{path}.ipv6",
                "IPv6 inside hub tunnels is not supported yet, expected it on bridge domains only",
            )
            return None
        if not has_pool:
            subnet = int.from_bytes(
                hashlib.sha256(f"dom0 domain {name}".encode()).digest()[:2], "big"
            )
            return ipaddress.IPv6Network((int(ula.network_address) | subnet << 64, 64))
        value = body["pool6"]
        try:
            net = ipaddress.IPv6Network(value, strict=True) if isinstance(value, str) else None
        except ValueError as e:
            self.bad(f"{path}.pool6", f"{value!r} is not an IPv6 network: {e}, expected a /64")
            return None
        if net is None or net.prefixlen != 64:
            self.bad(
                f"{path}.pool6",
                f'{value!r}, expected an IPv6 /64 like "fd12:3456:789a:1::/64" '
                "(machines get addresses by DHCPv6 in it)",
            )
            return None
        if net.is_link_local or net.is_multicast or net.is_loopback:
            self.bad(
                f"{path}.pool6", f"{net} is not a unicast prefix, expected a ULA or global /64"
            )
            return None
        return net

    def containers(
        self, body: dict, path: str, pool: ipaddress.IPv4Network | None
    ) -> tuple[int | None, ipaddress.IPv4Network | None]:
        """`containers = N` and `containers_pool`: a /N per machine, so the
        pool must hold one for every address of the domain's pool."""
        if "containers" not in body and "containers_pool" not in body:
            return None, None
        if "containers_pool" not in body:
            self.bad(f"{path}.containers_pool", "missing, expected the IPv4 CIDR that "
                     f"{path}.containers' prefixes come from")  # fmt: skip
            return None, None
        if "containers" not in body:
            self.bad(f"{path}.containers", "missing, expected the prefix length each "
                     f"machine's agent gets of {path}.containers_pool, e.g. 28")  # fmt: skip
            return None, None
        size = self.integer(body, "containers", path, MAX_CONTAINERS, MIN_CONTAINERS,
                            MAX_CONTAINERS)  # fmt: skip
        net = self.network(body["containers_pool"], f"{path}.containers_pool")
        if net is None or pool is None:
            return None, None
        if net.prefixlen > size:
            self.bad(f"{path}.containers", f"/{size} is larger than {path}.containers_pool "
                     f"{net}, expected a prefix length of {net.prefixlen} or more")  # fmt: skip
            return None, None
        held = 1 << (size - net.prefixlen)
        if held < pool.num_addresses:
            need = size - (pool.num_addresses - 1).bit_length()
            self.bad(
                f"{path}.containers_pool",
                f"{net} holds {held} /{size} prefixes, expected one per address of {path}.pool "
                f"{pool} ({pool.num_addresses}): a /{need} or larger",
            )
            return None, None
        return size, net

    def overlaps6(self, domains: dict[str, Domain]) -> None:
        seen: dict[ipaddress.IPv6Network, str] = {}
        for d in domains.values():
            if d.pool6 is None:
                continue
            if d.pool6 in seen:
                self.bad(
                    f"domains.{d.name}.pool6",
                    f"{d.pool6} is domains.{seen[d.pool6]}'s too, expected distinct /64s "
                    "(set pool6 for one of them)",
                )
            seen[d.pool6] = d.name

    def domains(self, raw: dict, wan: str | None, hub: bool) -> dict[str, Domain]:
        section = raw.get("domains", {})
        if not isinstance(section, dict):
            self.bad("domains", self.mistyped(section, "tables [domains.NAME]"))
            return {}
        if not section:
            self.bad("domains", "none defined, expected at least one [domains.NAME] with a pool")
        allowed = [
            "pool", "gateway", "reach", "members_reach", "internet", "services", "hub", "allow",
            "ipv6", "pool6", "containers", "containers_pool", "dns", "remap_every",
            "remap_grace",
        ]  # fmt: skip
        out: dict[str, Domain] = {}
        for name, body in section.items():
            path = f"domains.{name}"
            if not isinstance(body, dict):
                self.bad(path, self.mistyped(body, f"a table [{path}]"))
                continue
            if not is_label(name) or name == QUARANTINE:
                self.bad(
                    path,
                    f"{name!r} is not a usable domain name, expected a DNS label other than 'quarantine'",
                )
            self.unknown_keys(body, path, allowed)
            if "pool" not in body:
                self.bad(f"{path}.pool", 'missing, expected an IPv4 CIDR like "10.10.0.0/24"')
                pool = None
            else:
                pool = self.network(body["pool"], f"{path}.pool")
            gateway = self.gateway(body, path, pool)
            internet = self.boolean(body, "internet", path, False)
            if internet and wan is None:
                self.bad(
                    f"{path}.internet",
                    "is true but [wan] names no interface, expected wan.interface",
                )
            services = self.strings(body, "services", path)
            for i, s in enumerate(services):
                if s not in SERVICES:
                    self.bad(
                        f"{path}.services[{i + 1}]",
                        f"unknown service {s!r}{did_you_mean(s, SERVICES)}, "
                        f"expected one of: {', '.join(SERVICES)}",
                    )
            reach = self.strings(body, "reach", path)
            in_hub = self.boolean(body, "hub", path, False)
            if in_hub and not hub:
                self.bad(
                    f"{path}.hub",
                    "is true but there is no [hub] section, expected one (interface, pool)",
                )
            pool6 = self.pool6(body, path, name, in_hub, self.site_ula)
            containers, containers_pool = self.containers(body, path, pool)
            dns = self.string(body, "dns", path, "tls")
            if isinstance(dns, str) and dns not in DNS_MODES:
                self.bad(
                    f"{path}.dns",
                    f"{dns!r}{did_you_mean(dns, DNS_MODES)}, expected one of: "
                    f"{', '.join(DNS_MODES)}",
                )
            elif dns == "plain" and not any(s in services for s in ("dns", "dot")):
                self.bad(f"{path}.dns", 'is "plain" but services has no "dns", expected it there')
            remap_every, remap_grace = self.remap(body, path)
            if pool is not None and gateway is not None:
                out[name] = Domain(
                    name=name,
                    pool=pool,
                    gateway=gateway,
                    reach=tuple(dict.fromkeys(reach)),
                    members_reach=self.boolean(body, "members_reach", path, True),
                    internet=internet,
                    services=tuple(dict.fromkeys(services)),
                    hub=in_hub,
                    pool6=pool6,
                    containers=containers,
                    containers_pool=containers_pool,
                    dns=dns if dns in DNS_MODES else "tls",
                    remap_every=remap_every,
                    remap_grace=remap_grace,
                )
        self.overlaps6(out)
        for name, body in section.items():
            if not isinstance(body, dict):
                continue
            for i, other in enumerate(
                body.get("reach", []) if isinstance(body.get("reach"), list) else []
            ):
                if other not in section:
                    self.bad(
                        f"domains.{name}.reach[{i + 1}]",
                        f"unknown domain {other!r}{did_you_mean(other, section)}, "
                        f"expected one of: {', '.join(section)}",
                    )
                elif other == name:
                    self.bad(
                        f"domains.{name}.reach[{i + 1}]",
                        "a domain cannot list itself, expected members_reach = true instead",
                    )
        return out

    def quarantine(self, raw: dict) -> Quarantine:
        q = self.table(raw, "quarantine", "", ["pool", "gateway", "subdomain"])
        pool = self.network(q["pool"], "quarantine.pool") if "pool" in q else None
        gateway = self.gateway(q, "quarantine", pool)
        text = self.string(q, "subdomain", "quarantine", "q{n}") or "q{n}"
        size = _capacity(pool) if pool else 65535
        try:
            template = parse_template(text, size)
        except TemplateError as e:
            self.bad("quarantine.subdomain", f"{e}")
            template = parse_template("q{n}", size)
        return Quarantine(pool=pool, gateway=gateway, template=template)

    def overlaps(self, domains: dict[str, Domain], quarantine: Quarantine, hub: Hub | None) -> None:
        pools = [(f"domains.{d.name}.pool", d.pool) for d in domains.values()]
        pools += [
            (f"domains.{d.name}.containers_pool", d.containers_pool)
            for d in domains.values()
            if d.containers_pool is not None
        ]
        if quarantine.pool is not None:
            pools.append(("quarantine.pool", quarantine.pool))
        if hub is not None:
            pools.append(("hub.pool", hub.pool))
        for i, (path_a, a) in enumerate(pools):
            for path_b, b in pools[i + 1 :]:
                if a.overlaps(b):
                    self.bad(path_b, f"{b} overlaps {path_a} ({a}), expected disjoint pools")

    def rules(self, raw: dict, domains: dict[str, Domain], bridge: str) -> list[Rule]:
        section = raw.get("rules", [])
        if not isinstance(section, list) or not all(isinstance(r, dict) for r in section):
            self.bad("rules", self.mistyped(section, "[[rules]] tables"))
            return []
        allowed = [
            "name", "domain", "subdomain", "max", "max_per_port", "match", "address", "pins",
            "allow",
        ]  # fmt: skip
        rules: list[Rule] = []
        matches: list[tuple[str, Match]] = []  # every parsed match, for shadowing
        seen: dict[str, str] = {}
        for i, body in enumerate(section):
            name = body.get("name")
            path = (
                f"rules.{name}"
                if isinstance(name, str) and _RULE_NAME.match(name)
                else f"rules[{i + 1}]"
            )
            self.unknown_keys(body, path, allowed)
            if not isinstance(name, str) or not _RULE_NAME.match(name):
                self.bad(
                    f"{path}.name",
                    f"{'missing' if name is None else repr(name)}, expected a unique rule name (a-z, 0-9, '-', '_')",
                )
                name = None
            elif name in seen:
                path = f"rules[{i + 1}]"
                self.bad(
                    f"{path}.name",
                    f"duplicate rule name, also used by {seen[name]}, expected unique names",
                )
            else:
                seen[name] = f"rules[{i + 1}]"
            domain = body.get("domain")
            if not isinstance(domain, str):
                self.bad(
                    f"{path}.domain",
                    f"{'missing' if domain is None else 'not a string'}, expected one of: {', '.join(domains) or '(no domains)'}",
                )
                domain = None
            elif domain not in domains:
                if domain not in raw.get("domains", {}):
                    self.bad(
                        f"{path}.domain",
                        f"unknown domain {domain!r}{did_you_mean(domain, domains)}, "
                        f"expected one of: {', '.join(domains) or '(no domains)'}",
                    )
                domain = None
            capacity = _capacity(domains[domain].pool) if domain else 65535
            max_slots = body.get("max", capacity)
            if not isinstance(max_slots, int) or isinstance(max_slots, bool) or max_slots < 1:
                self.bad(f"{path}.max", f"{max_slots!r}, expected a positive integer")
                max_slots = capacity
            elif domain and max_slots > capacity:
                self.bad(
                    f"{path}.max",
                    f"{max_slots} exceeds the {capacity} addresses of {domains[domain].pool}, expected at most {capacity}",
                )
            template_text = body.get("subdomain", f"{name or 'machine'}{{n}}")
            template = None
            if not isinstance(template_text, str):
                self.bad(
                    f"{path}.subdomain", 'not a string, expected a name template like "web{n}"'
                )
            else:
                try:
                    template = parse_template(template_text, max_slots)
                except TemplateError as e:
                    self.bad(f"{path}.subdomain", str(e))
            match = self.match(body.get("match"), f"{path}.match")
            if match is not None:
                matches.append((path, match))
            per_port = (
                self.integer(body, "max_per_port", path, 1, 1, 4096)
                if "max_per_port" in body
                else None
            )
            pins = (
                self.pins(body, path, domains[domain], template, max_slots)
                if domain and template
                else ()
            )
            if name and domain and template and match:
                rules.append(Rule(name, domain, template, max_slots, match, per_port, pins))
                self.rule_bodies[name] = (path, body)
        self.shadows(matches)
        self.collisions(rules)
        self.pins_unique(rules)
        return rules

    def pins(
        self, body: dict, path: str, domain: Domain, template: Template, max_slots: int
    ) -> tuple[tuple[int, str], ...]:
        """`address = A` (a rule of one machine) and `pins = { NAME = A }`
        (names this rule gives): fixed addresses in the domain's pool."""
        wanted: list[tuple[str, int, object]] = []
        if "address" in body:
            if max_slots != 1:
                self.bad(
                    f"{path}.address",
                    f"a fixed address for a rule of {max_slots} machines, expected max = 1 "
                    "(or pins = { NAME = ADDRESS } for some of its machines)",
                )
            else:
                wanted.append((f"{path}.address", 1, body["address"]))
        table = body.get("pins", {})
        if not isinstance(table, dict):
            self.bad(f"{path}.pins", self.mistyped(table, 'a table like { web1 = "10.0.0.5" }'))
            table = {}
        for label, value in table.items():
            slot = template_slot(template, label, max_slots)
            if slot is None:
                first = template.render(1)
                last = template.render(max_slots)
                self.bad(
                    f"{path}.pins.{label}",
                    f"not a name this rule gives, expected one of {first} .. {last}",
                )
                continue
            wanted.append((f"{path}.pins.{label}", slot, value))
        out: dict[int, str] = {}
        reserved = {domain.pool.network_address, domain.pool.broadcast_address, domain.gateway}
        for where, slot, value in wanted:
            try:
                address = ipaddress.IPv4Address(value) if isinstance(value, str) else None
            except ValueError:
                address = None
            if address is None:
                self.bad(where, f"{value!r}, expected an IPv4 address in {domain.pool}")
            elif address not in domain.pool or address in reserved:
                self.bad(
                    where,
                    f"{address} is not a machine address of domain {domain.name}'s pool "
                    f"{domain.pool}, expected one in it other than its network, broadcast "
                    f"and gateway ({domain.gateway})",
                )
            elif slot in out:
                self.bad(where, f"{template.render(slot)} is pinned twice, expected one address")
            else:
                out[slot] = str(address)
        return tuple(sorted(out.items()))

    def pins_unique(self, rules: list[Rule]) -> None:
        used: dict[tuple[str, str], str] = {}
        for r in rules:
            for slot, address in r.pins:
                where = f"rules.{r.name} ({r.template.render(slot)})"
                if (r.domain, address) in used:
                    self.bad(
                        f"rules.{r.name}.pins",
                        f"{address} is pinned for {used[(r.domain, address)]} too, "
                        "expected each address pinned once",
                    )
                else:
                    used[(r.domain, address)] = where

    def match(self, body: object, path: str) -> Match | None:
        allowed = [
            "mac",
            "mac_prefix",
            "mac_mask",
            "random",
            "bridge",
            "interface",
            "libvirt_name",
            "libvirt_metadata",
        ]
        if body is None:
            self.bad(path, f"missing, expected a table with at least one of: {', '.join(allowed)}")
            return None
        if not isinstance(body, dict):
            self.bad(path, self.mistyped(body, "a table"))
            return None
        self.unknown_keys(body, path, allowed)
        if not any(k in body for k in allowed):
            self.bad(path, f"empty, expected at least one of: {', '.join(allowed)}")
            return None
        ok = True
        pattern: macs.Ternary | None = macs.ANY
        for key, parse in (
            ("mac", macs.parse_glob),
            ("mac_prefix", macs.parse_prefix),
            ("mac_mask", macs.parse_mask),
        ):
            if key not in body:
                continue
            value = body[key]
            if not isinstance(value, str):
                self.bad(f"{path}.{key}", self.mistyped(value, "a string"))
                ok = False
                continue
            try:
                part = parse(value)
            except macs.MacError as e:
                self.bad(f"{path}.{key}", str(e))
                ok = False
                continue
            pattern = pattern.intersect(part) if pattern else None
        if "random" in body:
            random = self.boolean(body, "random", path, False)
            if random:
                pattern = pattern.intersect(macs.RANDOM) if pattern else None
            else:
                self.bad(f"{path}.random", "false matches nothing more, expected true or no key")
                ok = False
        if ok and pattern is None:
            self.bad(
                path,
                "its MAC criteria contradict each other, so no MAC can match; expected criteria that overlap",
            )
            return None
        if (
            pattern is not None
            and pattern.mask
            and macs.is_multicast(pattern.value)
            and pattern.mask & (1 << 40)
        ):
            self.bad(
                path,
                "matches only multicast MACs, which are never machines; expected a unicast pattern",
            )
            ok = False
        bridge = self.ifname(self.string(body, "bridge", path), f"{path}.bridge", glob=True)
        interface = self.ifname(
            self.string(body, "interface", path), f"{path}.interface", glob=True
        )
        libvirt_name = self.string(body, "libvirt_name", path)
        metadata = body.get("libvirt_metadata", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self.bad(
                f"{path}.libvirt_metadata", 'expected a table of strings like { role = "web" }'
            )
            metadata = {}
        if not ok or pattern is None:
            return None
        return Match(pattern, bridge, interface, libvirt_name, dict(metadata))

    def shadows(self, matches: list[tuple[str, Match]]) -> None:
        for j, (path, later) in enumerate(matches):
            for earlier_path, earlier in matches[:j]:
                if _covers(earlier, later):
                    self.bad(
                        f"{path}.match",
                        f"can never match: {earlier_path} before it matches every machine it does; "
                        "expected it to be moved before that rule or narrowed",
                    )
                    break

    def name_lengths(self, tld: str, rules: list[Rule], quarantine: Quarantine) -> None:
        """The longest name a rule can give (its highest slot) fits in a DNS name."""
        longest = [
            (f"rules.{r.name}.subdomain", r.template.render(r.max_slots), r.domain) for r in rules
        ]
        q_slots = _capacity(quarantine.pool) if quarantine.pool else 65535
        longest.append(("quarantine.subdomain", quarantine.template.render(q_slots), QUARANTINE))
        for path, label, domain in longest:
            name = f"{label}.{domain}.{tld}"
            if len(name) > MAX_NAME:
                self.bad(
                    path,
                    f"gives names like {name[:40]!r}... of {len(name)} characters, "
                    f"expected at most {MAX_NAME} (shorten it, the domain or site.tld)",
                )

    def collisions(self, rules: list[Rule]) -> None:
        for j, b in enumerate(rules):
            for a in rules[:j]:
                if a.domain != b.domain:
                    continue
                name = can_collide(a.template, b.template)
                if name is not None:
                    self.bad(
                        f"rules.{b.name}.subdomain",
                        f"{b.template.text!r} can give the same name as rule {a.name!r} "
                        f"({a.template.text!r}), e.g. {name!r} in domain {a.domain!r}; "
                        "expected distinct names",
                    )


def _upstream_problem(text: str) -> str | None:
    """What is wrong with an upstream "ADDRESS[@PORT][#TLS-NAME]", or None."""
    rest, _, name = text.partition("#")
    address, at, port = rest.partition("@")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"{address!r} is not an IP address"
    if at and not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"{port!r} is not a port"
    if name and suffix_problem(name) is not None:
        return f"{name!r} is not a DNS name"
    return None


def _endpoint(text: str) -> tuple[str | None, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None, 0
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None, 0


def _is_wg_key(text: str) -> bool:
    try:
        return len(text) == 44 and len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def _capacity(pool: ipaddress.IPv4Network) -> int:
    # network, broadcast and dom0's gateway are not given to machines
    return max(pool.num_addresses - 3, 1)


def _glob_covers(a: str | None, b: str | None) -> bool:
    """Sound, not complete: True only when glob `a` surely matches all `b` does."""
    if a is None or a == "*":
        return True
    if b is None:
        return False
    if a == b:
        return True
    return not any(c in b for c in "*?[") and fnmatch.fnmatchcase(b, a)


def _covers(a: Match, b: Match) -> bool:
    if not a.mac.covers(b.mac):
        return False
    if not (_glob_covers(a.bridge, b.bridge) and _glob_covers(a.interface, b.interface)):
        return False
    if not _glob_covers(a.libvirt_name, b.libvirt_name):
        return False
    return all(_glob_covers(v, b.libvirt_metadata.get(k)) for k, v in a.libvirt_metadata.items())
