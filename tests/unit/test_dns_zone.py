"""The site's DNS from plain data (core/dnszone.py, drivers/dns.py): which
zones dom0 serves, the records of machines and containers, zone files that
dnspython reads back to the same records, files rewritten only on change with
a serial that grows, where unbound listens for which domain, and an unbound
configuration the real `unbound-checkconf` accepts."""

from __future__ import annotations

import shutil
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import dns.name
import dns.rdatatype
import dns.zone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.allocation import Allocation
from controller.core.dnszone import (
    Container,
    container_records,
    dns_config,
    machine_records,
    site_records,
    split,
    zone_of,
    zones,
)
from controller.drivers.dns import Zones, unbound_conf, zone_path
from controller.policy.load import PolicyError, parse_policy
from controller.policy.model import Policy

ROOT = Path(__file__).resolve().parents[2]
HUB = (ROOT / "policies" / "lab.toml").read_text()
BRIDGE = (ROOT / "policies" / "lab-bridge.toml").read_text()
WEB1 = Allocation("52:54:00:d0:00:01", "odd", 1, "x", "10.10.0.5", "vnet1")
DB1 = Allocation("52:54:00:d0:00:02", "even", 1, "y", "10.20.0.7", "vnet2")


def policy(text: str = HUB) -> Policy:
    return parse_policy(text.encode(), "p.toml")


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        policy(text)
    return [str(p) for p in e.value.problems]


def test_the_site_and_the_reverse_zone_of_every_pool() -> None:
    assert zones(policy()) == (
        "internal",
        "0.10.10.in-addr.arpa",
        "0.20.10.in-addr.arpa",
        "130.10.in-addr.arpa",  # a /20 is served as its /16
        "140.10.in-addr.arpa",
    )


def test_a_zone_inside_another_is_served_by_the_outer_one() -> None:
    text = HUB.replace('containers_pool = "10.130.0.0/20"', 'containers_pool = "10.20.16.0/20"')
    text = text.replace('pool = "10.20.0.0/24"', 'pool = "10.20.128.0/24"')
    served = zones(policy(text))
    assert "20.10.in-addr.arpa" in served and "128.20.10.in-addr.arpa" not in served
    assert zone_of("5.128.20.10.in-addr.arpa", served) == "20.10.in-addr.arpa"


def test_a_machine_has_its_name_its_interface_and_its_reverse() -> None:
    got = {(r.name, r.rtype, r.value) for r in machine_records(policy(), WEB1, 300)}
    assert got == {
        ("web1.x.internal", "A", "10.10.0.5"),
        ("eth0.web1.x.internal", "A", "10.10.0.5"),
        ("5.0.10.10.in-addr.arpa", "PTR", "web1.x.internal"),
    }


def test_quarantined_machines_have_no_names() -> None:
    q = Allocation("52:54:00:aa:00:01", "quarantine", 1, "quarantine", "10.99.0.5", "vnet9")
    assert machine_records(policy(), q, 300) == []


def test_an_ipv6_domain_publishes_aaaa_and_its_nibble_zone() -> None:
    text = (ROOT / "tests" / "data" / "policies" / "ipv6-lab.toml").read_text()
    p = policy(text)
    d = next(iter(p.domains.values()))
    a = Allocation("52:54:00:d0:00:01", p.rules[0].name, 1, d.name, str(d.pool[5]), "vnet1")
    recs = machine_records(p, a, 300)
    six = d.address6(str(d.pool[5]))
    assert any(r.rtype == "AAAA" and r.value == six for r in recs)
    assert all(zone_of(r.name, zones(p)) is not None for r in recs)


def test_containers_outside_their_machines_prefix_are_not_named() -> None:
    p = policy()
    prefix = p.domains["x"].delegated(WEB1.address)
    assert prefix is not None
    inside, outside = str(prefix[3]), str(p.domains["x"].delegated("10.10.0.9")[3])  # type: ignore[index]
    got = container_records(
        p.domains["x"], "web1.x.internal", "10.10.0.5",
        [Container("app", inside), Container("evil", outside), Container("bad", "x")], 300,
    )  # fmt: skip
    assert {(r.name, r.value) for r in got if r.rtype == "A"} == {
        ("app.web1.x.internal", inside),
        ("eth0.app.web1.x.internal", inside),
    }


def _read_zone(path: Path, origin: str) -> set[tuple[str, str, str]]:
    z = dns.zone.from_file(str(path), origin=origin, relativize=False)
    out = set()
    for name, rdataset in z.iterate_rdatasets():
        if rdataset.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
            continue
        for rd in rdataset:
            out.add((name.to_text(omit_final_dot=True), dns.rdatatype.to_text(rdataset.rdtype),
                     rd.to_text().rstrip(".")))  # fmt: skip
    return out


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.sets(st.integers(2, 254), min_size=0, max_size=30),
    containers=st.dictionaries(st.integers(2, 254), st.sets(st.integers(2, 14), max_size=3)),
)
def test_the_zone_files_read_back_as_every_record(
    tmp_path_factory: pytest.TempPathFactory, offsets: set[int], containers: dict[int, set[int]]
) -> None:
    """Whatever the machines, dnspython reads each written zone back to
    exactly the records that fall in it: nothing lost, nothing invented."""
    p = policy()
    root = tmp_path_factory.mktemp("dns")
    machines = [
        Allocation(
            f"52:54:00:d0:01:{i:02x}", "odd", i, "x", str(IPv4Address("10.10.0.0") + i), f"vnet{i}"
        )
        for i in sorted(offsets)
    ]
    listed: dict[str, list[Container]] = {}
    for a in machines:
        slot = int(IPv4Address(a.address or "0.0.0.0")) & 0xFF
        prefix = p.domains["x"].delegated(a.address)
        assert prefix is not None
        listed[f"web{a.slot}.x.internal"] = [
            Container(f"c{k}", str(prefix[k])) for k in sorted(containers.get(slot, ()))
        ]
    records = site_records(p, machines, listed)
    config = dns_config(p)
    Zones(root).write(config, records, 300)
    by_zone = split(records, config.zones)
    for zone in config.zones:
        want = {(r.name, r.rtype, r.value) for r in by_zone[zone]}
        assert _read_zone(zone_path(root, zone), zone) == want


def test_zone_files_change_only_with_their_records_and_serials_grow(tmp_path: Path) -> None:
    p = policy()
    config = dns_config(p)
    zones_ = Zones(tmp_path)
    first = zones_.write(config, site_records(p, [WEB1], {}), 300)
    assert first == set(config.zones)
    assert zones_.write(config, site_records(p, [WEB1], {}), 300) == set()
    serial = zones_.serials["internal"]
    changed = zones_.write(config, site_records(p, [WEB1, DB1], {}), 300)
    assert changed == {"internal", "0.20.10.in-addr.arpa"}
    assert zones_.serials["internal"] > serial
    # a restarted controller finds the same files: nothing is rewritten
    again = Zones(tmp_path)
    assert again.write(config, site_records(p, [WEB1, DB1], {}), 300) == set()
    assert again.write(config, site_records(p, [WEB1], {}), 300) == {
        "internal", "0.20.10.in-addr.arpa"}  # fmt: skip


def test_tls_on_every_asking_gateway_plain_only_where_the_policy_says() -> None:
    text = BRIDGE.replace(
        'services = ["dns", "icmp", "enroll"]\n\n[domains.y]',
        'services = ["dns", "icmp", "enroll"]\n\n[domains.y]\ndns = "plain"',
    )
    c = dns_config(policy(text))
    assert c.tls == ("10.10.0.1", "10.20.0.1")
    assert c.plain == ("127.0.0.1", "::1", "10.20.0.1")
    assert set(c.clients) >= {"10.10.0.0/24", "10.20.0.0/24"}
    assert not c.recurse  # (no uplink: outside names are not resolved at all)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ('[domains.x]\ndns = "clear"', "domains.x.dns: 'clear', expected one of: tls, plain"),
        (
            '[dns]\nupstream = ["9.9.9.9@99999"]',
            "dns.upstream[1]: '9.9.9.9@99999': '99999' is not a port",
        ),
        ('[dns]\nupstream = ["dns.example"]', "is not an IP address"),
        ('[dns]\nupstream_ca = "ca.pem"', "dns.upstream_ca: 'ca.pem' is not an absolute path"),
        ('[dns]\nttl = "1s"', "dns.ttl: '1s' is too short"),
    ],
)
def test_bad_dns_keys_are_named(change: str, says: str) -> None:
    section, line = change.split("\n", 1)
    text = BRIDGE.replace(f"{section}\n", f"{section}\n{line}\n", 1) if section in BRIDGE \
        else BRIDGE + f"\n{change}\n"  # fmt: skip
    assert any(says in p for p in problems(text)), problems(text)


def test_a_plain_domain_opens_port_53_on_its_gateway_only() -> None:
    from controller.core.desired import SERVICE, policy_state

    text = BRIDGE.replace(
        'services = ["dns", "icmp", "enroll"]\n\n[domains.y]',
        'services = ["dns", "icmp", "enroll"]\n\n[domains.y]\ndns = "plain"',
    )
    services = policy_state(policy(text), ()).sets[SERVICE]
    assert ("10.20.0.0/24", "10.20.0.1", "udp", "53") in services
    assert ("10.10.0.0/24", "10.10.0.1", "udp", "53") not in services
    assert ("10.10.0.0/24", "10.10.0.1", "tcp", "853") in services


@pytest.mark.skipif(shutil.which("unbound-checkconf") is None, reason="needs unbound-checkconf")
@pytest.mark.parametrize("cert", [False, True])
def test_unbound_accepts_the_configuration(tmp_path: Path, cert: bool) -> None:
    p = policy(HUB + '\n[dns]\nupstream = ["203.0.113.53@853#resolver.lab.example"]\n'
               f'upstream_ca = "{tmp_path / "ca.pem"}"\n')  # fmt: skip
    config = dns_config(p)
    Zones(tmp_path).ensure(config, 300)
    pem = tmp_path / "tls.pem"
    if cert:
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(pem), "-out", str(tmp_path / "c.pem"), "-days", "1",
             "-subj", "/CN=dns"], capture_output=True, check=False)  # fmt: skip
        assert made.returncode == 0, made.stderr
        pem.write_bytes(pem.read_bytes() + (tmp_path / "c.pem").read_bytes())
    (tmp_path / "ca.pem").write_text("")
    conf = tmp_path / "unbound.conf"
    conf.write_text(unbound_conf(config, tmp_path, pem if cert else None, ""))
    out = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("@853" in conf.read_text()) == cert


def test_dhcp_names_dom0_as_dns_server_only_where_dns_is_plain(tmp_path: Path) -> None:
    from controller.core.desired import policy_state
    from controller.drivers.dhcp import dnsmasq_argv

    text = BRIDGE.replace(
        'services = ["dns", "icmp", "enroll"]\n\n[domains.y]',
        'services = ["dns", "icmp", "enroll"]\n\n[domains.y]\ndns = "plain"',
    )
    argv = dnsmasq_argv(policy_state(policy(text), ()).dhcp, tmp_path)
    assert "--dhcp-option=tag:y,option:dns-server,10.20.0.1" in argv
    assert "--dhcp-option=tag:x,option:dns-server" in argv  # (none: x asks over TLS only)
