"""`dom0 host check`'s pure part: parsing the host's tables and judging them
(controller/core/hostfacts.py). The lab test (tests/lab/test_host_check.py)
runs the whole check against real sockets, tables and processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controller.core import hostfacts as hf

# libvirt's own default network (libvirt-daemon-config-network 9.0.0,
# /usr/share/libvirt/networks/default.xml), as `virsh net-define` stores it.
LIBVIRT_XML = Path(__file__).resolve().parents[1] / "data" / "libvirt"
# libvirt's own `default` network (NAT and its DHCP on virbr0), and the bridge-mode
# network that dom0 manages (docs/host.md)
LIBVIRT_DEFAULT = (LIBVIRT_XML / "default.xml").read_text()
DOM0_NETWORK = (LIBVIRT_XML / "dom0.xml").read_text()

UDP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 2011: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 34928 2 00000000978f7a52 0
 2012: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 34929 2 00000000978f7a52 0
 2013: 0100007F:9C40 0200007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 34930 2 00000000978f7a52 0
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 000080FE00000000FF005452FEFF0100:0035 00000000000000000000000000000000:0000 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
"""


def bridge(addresses: tuple[str, ...] = ("10.250.0.1",)) -> hf.Bridge:
    return hf.Bridge("virbr0", "bridge", addresses)


def facts(**kw: object) -> hf.Facts:
    kw.setdefault("bridge", bridge())
    return hf.Facts(**kw)  # type: ignore[arg-type]


def dnsmasq(pid: int, *args: str, own: bool = False) -> hf.Holder:
    return hf.Holder(pid, "dnsmasq", ("dnsmasq", *args), own)


def test_proc_net_lists_server_sockets_with_their_addresses() -> None:
    udp = hf.parse_proc_net(UDP, "udp")
    assert [(s.address, s.port, s.inode) for s in udp] == [
        ("0.0.0.0", 67, 34928),
        ("127.0.0.1", 53, 34929),
    ]  # the connected client socket (state 01) is no server
    (tcp,) = hf.parse_proc_net(TCP6, "tcp")  # TIME_WAIT (06) is no listener
    assert (tcp.address, tcp.port, tcp.wildcard) == ("::", 53, True)


def test_a_second_dhcp_server_on_the_bridge_is_a_problem_naming_its_pid() -> None:
    rogue = dnsmasq(4242, "--interface=virbr0", "--conf-file=/dev/null")
    found = hf.judge(
        facts(
            listeners=(
                hf.Listener(hf.Socket("udp", "0.0.0.0", 67, 1, "virbr0"), (rogue,)),
                hf.Listener(hf.Socket("udp", "0.0.0.0", 67, 2, "virbr0"), (dnsmasq(7, own=True),)),
            )
        )
    )
    assert hf.failed(found)
    (f,) = found
    assert f.check == "listener" and "pid 4242" in f.summary
    assert f.details["pid"] == 4242 and f.details["interface"] == ["virbr0"]


def test_listeners_elsewhere_are_not_reported() -> None:
    holder = (hf.Holder(9, "unbound", ("unbound",), False),)
    found = hf.judge(
        facts(
            listeners=(
                hf.Listener(hf.Socket("udp", "127.0.0.1", 53, 1), holder),  # loopback
                hf.Listener(hf.Socket("udp", "0.0.0.0", 67, 2, "wan"), holder),  # bound to wan
                hf.Listener(hf.Socket("udp", "0.0.0.0", 51821, 3), holder),  # not DHCP/DNS
            )
        )
    )
    assert found == []


def test_dns_on_a_bridge_address_or_wildcard_is_reported_and_libvirts_dnsmasq_is_named() -> None:
    libvirt = dnsmasq(55, "--conf-file=/var/lib/libvirt/dnsmasq/default.conf", "--leasefile-ro")
    found = hf.judge(
        facts(
            listeners=(
                hf.Listener(hf.Socket("tcp", "10.250.0.1", 53, 1), (libvirt,)),
                hf.Listener(hf.Socket("udp", "::", 53, 2), ()),
            )
        )
    )
    assert len(found) == 2 and hf.failed(found)
    named = next(f for f in found if f.details.get("pid") == 55)
    assert named.details["libvirt_network"] == "default"
    assert "virsh net-destroy default" in named.fix
    unknown = next(f for f in found if f.details.get("pids") == [])
    assert "as root" in unknown.fix


def test_libvirt_default_network_on_the_bridge_is_a_problem_a_bridge_mode_one_is_not() -> None:
    default = hf.parse_libvirt_network(LIBVIRT_DEFAULT, "default.xml")
    assert default.forward == "nat" and default.dhcp == ("192.168.122.2-192.168.122.254",)
    ours = hf.parse_libvirt_network(DOM0_NETWORK, "dom0.xml")
    found = hf.judge(facts(networks=(ours,)))
    assert not hf.failed(found) and [f.severity for f in found] == [hf.NOTE]
    found = hf.judge(facts(networks=(default, ours)))
    assert hf.failed(found)
    bad = found[0]
    assert bad.check == "libvirt" and "'default'" in bad.summary
    assert "virsh net-autostart --disable default" in bad.fix
    # another bridge's network is none of dom0's business
    other = hf.parse_libvirt_network(LIBVIRT_DEFAULT.replace("virbr0", "virbr1"), "x.xml")
    assert hf.judge(facts(networks=(other,))) == []


def test_bare_forward_means_nat_and_bad_files_are_refused() -> None:
    n = hf.parse_libvirt_network(
        "<network><name>n</name><bridge name='virbr0'/><forward/></network>", "n.xml"
    )
    assert n.forward == "nat"
    for text in ("<domain><name>x</name></domain>", "<network/>", "not xml"):
        try:
            hf.parse_libvirt_network(text, "bad.xml")
        except ValueError:
            continue
        raise AssertionError(f"accepted {text!r}")


def test_foreign_nat_and_bridge_rules_are_found_dom0s_tables_are_not() -> None:
    objs: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": "dom0"}},
        {
            "rule": {
                "family": "inet",
                "table": "dom0",
                "chain": "post",
                "expr": [{"masquerade": None}],
            }
        },
        {"table": {"family": "ip", "name": "nat"}},
        {"chain": {"family": "ip", "table": "nat", "name": "LIBVIRT_PRT"}},
        {
            "rule": {
                "family": "ip",
                "table": "nat",
                "chain": "LIBVIRT_PRT",
                "expr": [{"masquerade": None}],
            }
        },
        {"table": {"family": "ip", "name": "filter"}},
        {
            "rule": {
                "family": "ip",
                "table": "filter",
                "chain": "FORWARD",
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"meta": {"key": "iifname"}},
                            "right": "virbr0",
                        }
                    },
                    {"accept": None},
                ],
            }
        },
        {"table": {"family": "inet", "name": "harmless"}},
        {
            "rule": {
                "family": "inet",
                "table": "harmless",
                "chain": "in",
                "expr": [{"accept": None}],
            }
        },
    ]
    tables = {(t.family, t.name): t.reasons for t in hf.foreign_tables(objs, "virbr0")}
    assert set(tables) == {("ip", "nat"), ("ip", "filter")}
    assert any("masquerade" in r for r in tables[("ip", "nat")])
    assert any("virbr0" in r for r in tables[("ip", "filter")])
    assert hf.present_own_tables(objs) == {("inet", "dom0")}


def test_missing_or_wrong_bridge_and_forwarding_off_under_dom0s_tables() -> None:
    assert hf.failed(hf.judge(facts(bridge=hf.Bridge("virbr0", None))))
    (f,) = hf.judge(facts(bridge=hf.Bridge("virbr0", "veth")))
    assert "not a bridge" in f.summary
    off = {"net.ipv4.ip_forward": "0"}
    assert not hf.failed(hf.judge(facts(sysctls=off)))  # the controller turns it on
    assert hf.failed(hf.judge(facts(sysctls=off, own_tables=frozenset({("inet", "dom0")}))))


def test_virsh_net_list() -> None:
    text = " default   active   yes   yes\n dom0      inactive no    yes\n"
    assert hf.parse_virsh_net_list(text) == {"default": (True, True), "dom0": (False, False)}
