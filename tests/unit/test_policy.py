"""Policy files: valid ones load; each kind of bad one is rejected with
`FILE: field.path: what is wrong, what is expected`, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy.load import PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]

BASE = """
[site]
tld = "internal"
[bridge]
name = "virbr0"
[wan]
interface = "wan"
[domains.x]
pool = "10.10.0.0/24"
internet = true
[domains.y]
pool = "10.20.0.0/24"
[[rules]]
name = "web"
domain = "x"
subdomain = "web{n}"
match.mac = "52:54:00:*"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        parse_policy(textwrap.dedent(text).encode(), "p.toml")
    return [str(p) for p in e.value.problems]


def test_example_policies_load() -> None:
    for path in sorted((ROOT / "policies").glob("*.toml")):
        policy = load_policy(path)
        assert policy.domains, path


def test_base_policy_loads_with_defaults() -> None:
    p = parse_policy(BASE.encode(), "p.toml")
    assert p.domains["x"].gateway.exploded == "10.10.0.1"
    assert p.lease_seconds == 3600
    assert [r.name for r in p.rules] == ["web"]
    assert p.quarantine.pool is None


def test_toml_syntax_error_names_its_line() -> None:
    text = BASE + "\n[extra\nname = 'x'\n"
    line = text.splitlines().index("[extra") + 1
    out = problems(text)
    assert len(out) == 1
    assert out[0].startswith(f"p.toml: line {line}, column 7:"), out
    assert "expected valid TOML" in out[0]


def test_duplicate_toml_key_is_a_syntax_error_with_line() -> None:
    out = problems(BASE + '\n[domains.x]\npool = "10.30.0.0/24"\n')
    assert out[0].startswith("p.toml: line ")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            '[site]\ncolour = "x"',
            "p.toml: site.colour: unknown key, expected one of: tld, release_after",
        ),
        (
            '[domains.z]\npool = "10.30.0.0/24"\nintenet = true',
            "p.toml: domains.z.intenet: unknown key",
        ),
    ],
)
def test_unknown_keys(extra: str, expected: str) -> None:
    text = BASE.replace("[site]\n", "") if extra.startswith("[site]") else BASE
    out = problems(text + "\n" + extra + "\n")
    assert any(line.startswith(expected) for line in out), out


@pytest.mark.parametrize(
    ("match", "field"),
    [
        ('mac = "52:54:zz:*"', "rules.web2.match.mac"),
        ('mac = "52:54:00:00:00:00:00"', "rules.web2.match.mac"),
        ('mac_prefix = "52:54:00:00:00:00/49"', "rules.web2.match.mac_prefix"),
        ('mac_prefix = "52:54:00:01:00:00/24"', "rules.web2.match.mac_prefix"),
        ('mac_mask = "52:54:00:00:00:01/ff:ff:ff:00:00:00"', "rules.web2.match.mac_mask"),
        ('mac_mask = "52:54:00:00:00:01"', "rules.web2.match.mac_mask"),
    ],
)
def test_bad_macs(match: str, field: str) -> None:
    out = problems(BASE + f'\n[[rules]]\nname = "web2"\ndomain = "y"\nmatch.{match}\n')
    assert any(line.startswith(f"p.toml: {field}: ") and "expected" in line for line in out), out


@pytest.mark.parametrize(
    "pool", ["10.30.0.0/33", "10.30.0.1/24", "banana", "10.30.0.0/31", "fd00::/64"]
)
def test_bad_cidrs(pool: str) -> None:
    out = problems(BASE + f'\n[domains.z]\npool = "{pool}"\n')
    assert any(line.startswith("p.toml: domains.z.pool: ") and "expected" in line for line in out)


def test_cidr_with_host_bits_suggests_the_network() -> None:
    out = problems(BASE + '\n[domains.z]\npool = "10.30.0.5/24"\n')
    assert "did you mean 10.30.0.0/24?" in out[0]


def test_overlapping_pools() -> None:
    out = problems(BASE + '\n[domains.z]\npool = "10.10.0.128/25"\n')
    assert out == [
        "p.toml: domains.z.pool: 10.10.0.128/25 overlaps domains.x.pool (10.10.0.0/24), "
        "expected disjoint pools"
    ]


def test_quarantine_pool_overlap() -> None:
    out = problems(BASE + '\n[quarantine]\npool = "10.20.0.0/16"\n')
    assert out[0].startswith("p.toml: quarantine.pool: 10.20.0.0/16 overlaps domains.")


def test_unknown_domain_references() -> None:
    text = BASE.replace("internet = true", 'internet = true\nreach = ["y", "nowhere"]')
    out = problems(text + '\n[[rules]]\nname = "db"\ndomain = "mars"\nmatch.mac = "02:*"\n')
    assert "p.toml: domains.x.reach[2]: unknown domain 'nowhere', expected one of: x, y" in out
    assert "p.toml: rules.db.domain: unknown domain 'mars', expected one of: x, y" in out


def test_duplicate_rule_names() -> None:
    out = problems(BASE + '\n[[rules]]\nname = "web"\ndomain = "y"\nmatch.mac = "02:*"\n')
    assert out == [
        "p.toml: rules[2].name: duplicate rule name, also used by rules[1], expected unique names"
    ]


def test_names_that_can_collide() -> None:
    out = problems(
        BASE
        + '\n[[rules]]\nname = "web1"\ndomain = "x"\nsubdomain = "web1{n}"\nmatch.mac = "02:*"\n'
    )
    assert len(out) == 1
    assert out[0].startswith("p.toml: rules.web1.subdomain: 'web1{n}' can give the same name as")
    assert "'web11'" in out[0]


def test_same_template_in_other_domain_is_fine() -> None:
    parse_policy(
        (
            BASE
            + '\n[[rules]]\nname = "web-y"\ndomain = "y"\nsubdomain = "web{n}"\nmatch.mac = "02:*"\n'
        ).encode(),
        "p.toml",
    )


@pytest.mark.parametrize(
    "later",
    [
        'match.mac = "52:54:00:12:*"',
        'match.mac_prefix = "52:54:00:00:00:00/32"',
        'match.mac = "52:54:00:*"\nmatch.interface = "vnet*"',
        'match.mac_mask = "52:54:00:00:00:01/ff:ff:ff:00:00:01"',
    ],
)
def test_shadowed_rules(later: str) -> None:
    out = problems(BASE + f'\n[[rules]]\nname = "db"\ndomain = "y"\n{later}\n')
    assert out == [
        "p.toml: rules.db.match: can never match: rules.web before it matches every machine "
        "it does; expected it to be moved before that rule or narrowed"
    ]


def test_narrower_rule_first_is_fine() -> None:
    text = BASE.replace('match.mac = "52:54:00:*"', 'match.mac = "52:54:00:12:*"')
    parse_policy(
        (text + '\n[[rules]]\nname = "db"\ndomain = "y"\nmatch.mac = "52:54:00:*"\n').encode(), "p"
    )


def test_contradicting_mac_criteria() -> None:
    out = problems(
        BASE
        + '\n[[rules]]\nname = "db"\ndomain = "y"\nmatch.mac = "00:16:*"\nmatch.random = true\n'
    )
    assert any("contradict" in line for line in out)


def test_every_problem_reported_at_once() -> None:
    text = BASE.replace('tld = "internal"', 'tld = "Bad Tld"').replace(
        'pool = "10.20.0.0/24"', 'pool = "10.10.0.0/16"'
    )
    out = problems(text)
    assert any(line.startswith("p.toml: site.tld:") for line in out)
    assert any(line.startswith("p.toml: domains.y.pool:") for line in out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_never_a_traceback_on_bytes(data: bytes) -> None:
    try:
        parse_policy(data, "p.toml")
    except PolicyError as e:
        assert e.problems and all(str(p).startswith("p.toml: ") for p in e.problems)


toml_values = st.recursive(
    st.none().map(lambda _: "x") | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
keys = st.sampled_from(
    [
        "site",
        "bridge",
        "wan",
        "dhcp",
        "domains",
        "rules",
        "quarantine",
        "tld",
        "pool",
        "match",
        "name",
        "domain",
        "mac",
        "x",
        "y",
        "reach",
        "internet",
        "services",
        "subdomain",
        "max",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(keys, st.dictionaries(keys, toml_values, max_size=4) | toml_values, max_size=6)
)
def test_never_a_traceback_on_structures(doc: dict) -> None:
    import json

    # JSON is a TOML subset only for inline values; build TOML via a tiny writer.
    text = "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items())
    try:
        parse_policy(text.encode(), "p.toml")
    except PolicyError as e:
        assert all(str(p).startswith("p.toml: ") for p in e.problems)


def _toml(v: object) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(x)}" for k, x in v.items()) + "}"
    return '""'


def run_check(*files: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", "policy", "check", *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_cli_valid_files_one_summary_line_each(tmp_path: Path) -> None:
    f = tmp_path / "ok.toml"
    f.write_text(BASE)
    r = run_check(str(ROOT / "policies" / "lab.toml"), str(f))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith(f"{f}: ok: bridge virbr0, 2 domain(s)")


def test_cli_invalid_file_exit_2_one_line_per_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(BASE)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        BASE
        + '\n[domains.z]\npool = "10.10.0.0/16"\n[[rules]]\nname = "web"\ndomain = "q"\nmatch.mac = "02:*"\n'
    )
    r = run_check(str(good), str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stdout.startswith(f"{good}: ok")
    errs = r.stderr.splitlines()
    assert all(line.startswith(f"{bad}: ") for line in errs)
    assert len(errs) == 3, errs  # overlap, duplicate name, unknown domain


def test_cli_missing_file(tmp_path: Path) -> None:
    r = run_check(str(tmp_path / "nope.toml"))
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"{tmp_path / 'nope.toml'}: file: cannot read it (No such file or directory)"
    )


def test_cli_usage_error_is_one_line_exit_2() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli", "policy", "chek"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1


UPLINK = """
[uplink]
endpoint = "198.51.100.3:51820"
public_key = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="
addresses = ["10.200.0.2/32"]
"""
HUB = '\n[hub]\npool = "10.250.0.0/16"\n'


def test_uplink_and_hub_load_with_defaults() -> None:
    text = BASE.replace("internet = true", "internet = true\nhub = true") + UPLINK + HUB
    p = parse_policy(text.encode(), "p.toml")
    assert p.uplink is not None and p.hub is not None
    assert (p.uplink.interface, p.uplink.table, p.uplink.endpoint) == (
        "wg0",
        51820,
        "198.51.100.3:51820",
    )
    assert p.uplink.private_key_file == "keys/uplink.key"
    assert (p.hub.interface, p.hub.listen_port, str(p.hub.gateway)) == ("hub0", 51821, "10.250.0.1")
    assert p.domains["x"].hub and not p.domains["y"].hub


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('endpoint = "198.51.100.3:51820"', 'endpoint = "vpn.example.net:51820"'),
            "p.toml: uplink.endpoint: 'vpn.example.net:51820' is not ADDRESS:PORT",
        ),
        (
            ('endpoint = "198.51.100.3:51820"', 'endpoint = "198.51.100.3"'),
            "p.toml: uplink.endpoint:",
        ),
        (
            ('public_key = "Q6bUtz4Uwvgimwqwj4cH6z6J5Jlsr/dEKBtUJoOZSTA="', 'public_key = "short"'),
            "p.toml: uplink.public_key: missing or not a WireGuard key",
        ),
        (
            ('addresses = ["10.200.0.2/32"]', 'addresses = ["10.200.0.2/40"]'),
            "p.toml: uplink.addresses[1]:",
        ),
        (
            ('addresses = ["10.200.0.2/32"]', 'addresses = ["10.200.0.2/32"]\ntable = 254'),
            "p.toml: uplink.table: 254 is a kernel table",
        ),
        (
            ('addresses = ["10.200.0.2/32"]', 'addresses = ["10.200.0.2/32"]\nmtu = 100'),
            "p.toml: uplink.mtu: 100, expected an integer from 1280 to 9000",
        ),
        (
            ('addresses = ["10.200.0.2/32"]', 'addresses = ["10.200.0.2/32"]\nlisten = 1'),
            "p.toml: uplink.listen: unknown key",
        ),
    ],
)
def test_bad_uplinks(change: tuple[str, str], expected: str) -> None:
    out = problems(BASE + UPLINK.replace(*change))
    assert any(line.startswith(expected) for line in out), out


def test_uplink_needs_a_wan() -> None:
    text = BASE.replace('[wan]\ninterface = "wan"\n', "").replace("internet = true", "")
    out = problems(text + UPLINK)
    assert out == [
        "p.toml: uplink: needs wan.interface: the interface whose traffic the kill switch "
        "limits to the tunnel"
    ]


def test_hub_problems() -> None:
    out = problems(BASE.replace("internet = true", "internet = true\nhub = true"))
    assert out == [
        "p.toml: domains.x.hub: is true but there is no [hub] section, expected one (interface, pool)"
    ]
    out = problems(BASE + '\n[hub]\npool = "10.10.0.0/16"\n')
    assert out == [
        "p.toml: hub.pool: 10.10.0.0/16 overlaps domains.x.pool (10.10.0.0/24), expected disjoint pools"
    ]
    out = problems(BASE + "\n[hub]\nlisten_port = 70000\n")
    assert "p.toml: hub.listen_port: 70000, expected an integer from 1 to 65535" in out
    assert any(line.startswith("p.toml: hub.pool: missing") for line in out)


def test_wan_allow() -> None:
    p = parse_policy(
        (
            BASE.replace('interface = "wan"', 'interface = "wan"\nallow = ["dhcp", "ndp"]') + UPLINK
        ).encode(),
        "p",
    )
    assert p.wan_allow == ("dhcp", "ndp")
    out = problems(BASE.replace('interface = "wan"', 'interface = "wan"\nallow = ["ssh"]'))
    assert out == ["p.toml: wan.allow[1]: unknown 'ssh', expected one of: dhcp, dhcpv6, ndp"]


# -- the site suffix may have several labels (home.arpa, RFC 8375) --------------
HOME = BASE.replace('tld = "internal"', 'tld = "home.arpa"')


def test_a_site_suffix_may_have_several_labels() -> None:
    p = parse_policy(HOME.encode(), "p.toml")
    assert p.tld == "home.arpa"
    assert p.fqdn("web1", "x") == "web1.x.home.arpa"


@pytest.mark.parametrize(
    ("tld", "needle"),
    [
        ("home..arpa", "'home..arpa': '' is not a DNS label"),
        ("home.arpa.", "'home.arpa.': '' is not a DNS label"),
        ("Home.arpa", "'Home' is not a DNS label"),
        ("-home.arpa", "'-home' is not a DNS label"),
        ("x" * 64 + ".arpa", f"'{'x' * 64}' is not a DNS label"),
        ("example.123", "its last label '123' is all digits"),
    ],
)
def test_a_bad_site_suffix_names_its_bad_label(tld: str, needle: str) -> None:
    out = problems(BASE.replace('tld = "internal"', f"tld = {tld!r}"))
    assert len(out) == 1 and out[0].startswith("p.toml: site.tld: "), out
    assert needle in out[0] and 'expected a DNS suffix like "internal" or "home.arpa"' in out[0]


def test_names_that_would_exceed_253_characters_are_refused() -> None:
    tld = ".".join(["a" * 60] * 3 + ["b" * 52])  # 235 characters: a valid suffix on its own
    text = BASE.replace('tld = "internal"', f'tld = "{tld}"')
    # "webserver-number-10.x." + 235 = 257
    long_names = 'subdomain = "webserver-number-{n}"\nmax = 10'
    out = problems(text.replace('subdomain = "web{n}"', long_names))
    assert len(out) == 1 and out[0].startswith("p.toml: rules.web.subdomain: gives names like")
    assert "of 257 characters, expected at most 253" in out[0]
    # the control: the same suffix with names that fit ("w9.x." + 235 = 240, and the
    # quarantine's "q65535.quarantine." + 235 = 253 exactly)
    short_names = 'subdomain = "w{n}"\nmax = 9'
    assert parse_policy(text.replace('subdomain = "web{n}"', short_names).encode(), "p").tld == tld
    # the quarantine's names count too: 9 more characters of suffix, 262
    longer = text.replace(tld, tld + ".cccccccc").replace('subdomain = "web{n}"', short_names)
    out = problems(longer)
    assert len(out) == 1 and out[0].startswith("p.toml: quarantine.subdomain: gives names like")
    assert "of 262 characters" in out[0]


def test_multi_label_suffix_end_to_end(tmp_path: Path) -> None:
    """Names, DHCP domain options and look-ups by name with a two-label suffix."""
    from controller.core import inventory as inv
    from controller.core.desired import policy_state
    from controller.drivers.dhcp import dnsmasq_argv
    from controller.drivers.memory import MemoryAddresses, MemoryNft, MemoryTunnels
    from controller.reconcile import Reconciler
    from controller.wgexport import render

    policy = parse_policy((HOME + '\n[quarantine]\npool = "10.99.0.0/24"\n').encode(), "p.toml")
    dhcp = policy_state(policy, ()).dhcp
    argv = dnsmasq_argv(dhcp, tmp_path)
    assert "--domain=x.home.arpa,10.10.0.0/24" in argv
    assert "--domain=quarantine.home.arpa,10.99.0.0/24" in argv

    rec = Reconciler(
        policy,
        tmp_path,
        nft=MemoryNft(),
        addresses=MemoryAddresses(),
        dnsmasq=None,
        tunnels=cast(Any, MemoryTunnels()),  # (its observe_uplink is untyped)
        clock=lambda: 1_000_000.0,
    )
    bridge = inv.Link(1, "virbr0", "bridge", None, True, "fe:54:00:d0:ff:fe")
    port = inv.Link(100, "vnet1", "veth", 1, True, None)
    rec.observe(inv.Snapshot((bridge, port), (inv.Fdb("52:54:00:d0:00:01", 100, False, 1),)))
    rec.reconcile()
    (machine,) = [m for m in rec.machines() if m.mac == "52:54:00:d0:00:01"]
    assert machine.name == "web1.x.home.arpa"
    for name in ("web1.x.home.arpa", "WEB1.x.home.arpa.", "web1"):
        found = rec.find(name)
        assert found is not None and found.mac == "52:54:00:d0:00:01", name
    assert rec.find("web1.x") is None and rec.find("arpa") is None
    conf = render(
        fqdn=machine.name, mac=machine.mac, private_key="k", address="10.10.0.2",
        hub_public_key="h", endpoint="10.250.0.1:51821", mtu=1420,
    )  # fmt: skip
    assert conf.startswith("# dom0 hub tunnel for web1.x.home.arpa (machine 52:54:00:d0:00:01)")


def test_unknown_keys_say_did_you_mean() -> None:
    out = problems(BASE.replace("internet = true", "intenet = true"))
    assert out == [
        "p.toml: domains.x.intenet: unknown key (did you mean 'internet'?), expected one of: "
        "pool, gateway, reach, members_reach, internet, services, hub, allow, ipv6, pool6, containers, containers_pool, dns, remap_every, remap_grace"
    ]
    # the control: nothing close, no guess
    out = problems(BASE.replace("internet = true", "zzzz = true"))
    assert len(out) == 1 and "did you mean" not in out[0]


def test_unknown_values_say_did_you_mean() -> None:
    out = problems(BASE.replace("internet = true", 'internet = true\nservices = ["dsn"]'))
    assert out == [
        "p.toml: domains.x.services[1]: unknown service 'dsn' (did you mean 'dns'?), "
        "expected one of: " + out[0].split("expected one of: ", 1)[1]
    ]
    out = problems(BASE.replace('domain = "x"', 'domain = "xx"'))
    assert out[0].startswith("p.toml: rules.web.domain: unknown domain 'xx' (did you mean 'x'?)")


def test_dhcp_log_level() -> None:
    assert parse_policy(BASE.encode(), "p.toml").dhcp_log == "transactions"
    p = parse_policy((BASE + '\n[dhcp]\nlog = "quiet"\n').encode(), "p.toml")
    assert p.dhcp_log == "quiet"
    (problem,) = problems(BASE + '\n[dhcp]\nlog = "verbos"\n')
    assert problem.startswith("p.toml: dhcp.log: 'verbos'")
    assert "did you mean" in problem and "quiet, transactions, verbose" in problem


PINNED = BASE.replace(
    'match.mac = "52:54:00:*"', 'match.mac = "52:54:00:*"\npins = { web1 = "10.10.0.50" }'
)


def test_pins_give_fixed_addresses_in_the_pool() -> None:
    p = parse_policy(PINNED.encode(), "p.toml")
    assert p.rules[0].pins == ((1, "10.10.0.50"),)
    assert p.pinned["x"] == frozenset({"10.10.0.50"})
    one = BASE.replace(
        'match.mac = "52:54:00:*"', 'match.mac = "52:54:00:*"\nmax = 1\naddress = "10.10.0.9"'
    )
    assert parse_policy(
        one.replace('subdomain = "web{n}"', 'subdomain = "web"').encode(), "p"
    ).rules[0].pins == ((1, "10.10.0.9"),)


def test_bad_pins_are_one_line_each() -> None:
    (outside,) = problems(PINNED.replace("10.10.0.50", "10.20.0.5"))
    assert outside.startswith("p.toml: rules.web.pins.web1: 10.20.0.5 is not a machine address")
    (gateway,) = problems(PINNED.replace("10.10.0.50", "10.10.0.1"))
    assert "other than its network, broadcast and gateway" in gateway
    (name,) = problems(PINNED.replace("web1 =", "db1 ="))
    assert name.startswith("p.toml: rules.web.pins.db1: not a name this rule gives")
    (twice,) = problems(
        PINNED.replace('web1 = "10.10.0.50"', 'web1 = "10.10.0.50", web2 = "10.10.0.50"')
    )
    assert "pinned for rules.web (web1) too" in twice
    (many,) = problems(
        BASE.replace('match.mac = "52:54:00:*"', 'match.mac = "52:54:00:*"\naddress = "10.10.0.9"')
    )
    assert (
        many.startswith("p.toml: rules.web.address: a fixed address for a rule of")
        and "max = 1" in many
    )
    (garbage,) = problems(PINNED.replace('"10.10.0.50"', '"ten"'))
    assert "expected an IPv4 address in 10.10.0.0/24" in garbage


def test_a_trailing_newline_is_not_part_of_a_valid_name() -> None:
    """`$` in a pattern also matches before a final newline: every policy
    pattern anchors with `\\Z`, so "web\\n" is no rule name, label or interface."""
    from controller.policy.names import is_label

    assert not is_label("web1\n") and is_label("web1")
    bad = BASE.replace('name = "web"', 'name = "web\\n"', 1)
    assert bad != BASE
    assert any("rules[1].name" in p for p in problems(bad)), problems(bad)
    bad_if = BASE.replace('name = "virbr0"', 'name = "virbr0\\n"', 1)
    assert bad_if != BASE
    assert any("bridge.name" in p for p in problems(bad_if)), problems(bad_if)


@pytest.mark.parametrize(
    ("life", "expected"),
    [
        ('"5m"', "p.toml: agents.certificate_life: '5m' is too short"),
        ('"31d"', "p.toml: agents.certificate_life: '31d' is too long, expected at most 30d"),
        ('"soon"', "p.toml: agents.certificate_life: 'soon' is not a duration"),
    ],
)
def test_agent_certificate_life(life: str, expected: str) -> None:
    out = problems(BASE + f"\n[agents]\ncertificate_life = {life}\n")
    assert len(out) == 1 and out[0].startswith(expected), out
    good = parse_policy((BASE + '\n[agents]\ncertificate_life = "12h"\n').encode(), "p.toml")
    assert good.agent_certificate_seconds == 12 * 3600
    assert parse_policy(BASE.encode(), "p.toml").agent_certificate_seconds == 86400
