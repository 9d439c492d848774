"""Addresses, links and forwarding through pyroute2 (netlink).

dom0's gateway address for each domain pool lives on the managed bridge.
Addresses dom0 adds carry its own IFA_PROTO number, so it recognises and
removes only its own and never touches an address somebody else put there.
So do its routes in the main table (rtm_protocol): the containers prefixes
that machines' agents hold, through those machines or into the hub.

pyroute2 0.9's IPRoute is thread-affine: one instance, used from the thread
that created it (the controller's trio thread; every call here is a single
fast netlink round trip).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from controller.core.desired import Address, Route

log = logging.getLogger(__name__)

DOM0_PROTO = 0x64  # IFA_PROTO of the addresses dom0 owns ("d")
MAIN_TABLE = 254
_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    # wg-quick's Table=auto: the tunnel's own packets are routed by their fwmark.
    "net/ipv4/conf/all/src_valid_mark": "1",
    # With br_netfilter, bridged IPv4 also meets the inet tables' policy.
    "net/bridge/bridge-nf-call-iptables": "1",
    "net/bridge/bridge-nf-call-ip6tables": "1",
}


class AddressError(Exception):
    pass


class Addresses:
    def __init__(self) -> None:
        self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    def link_index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def owned(self, interfaces: Iterable[str]) -> frozenset[Address]:
        """dom0's own addresses on these interfaces, as (interface, 'a.b.c.d/len')."""
        out: set[Address] = set()
        for name in interfaces:
            index = self.link_index(name)
            if index is None:
                continue
            for a in self.ipr.get_addr(index=index):
                if a.get("IFA_PROTO") == DOM0_PROTO:
                    out.add(
                        (name, f"{a.get('IFA_LOCAL') or a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                    )
        return frozenset(out)

    def apply(self, add: Iterable[Address], delete: Iterable[Address]) -> None:
        """Remove, then add; an interface that does not exist (yet) is an error
        for additions only: the next sync adds what is missing."""
        for name, cidr in sorted(delete):
            index = self.link_index(name)
            if index is None:
                continue
            iface = ipaddress.ip_interface(cidr)
            try:
                self.ipr.addr(
                    "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            except NetlinkError as e:
                if e.code != 99:  # EADDRNOTAVAIL: already gone
                    raise AddressError(f"cannot remove {cidr} from {name}: {e}") from e
        missing = []
        for name, cidr in sorted(add):
            index = self.link_index(name)
            if index is None:
                missing.append(name)
                continue
            iface = ipaddress.ip_interface(cidr)
            try:
                self.ipr.addr(
                    "add",
                    index=index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    proto=DOM0_PROTO,
                )
            except NetlinkError as e:
                if e.code != 17:  # EEXIST
                    raise AddressError(f"cannot add {cidr} to {name}: {e}") from e
            self.ipr.link("set", index=index, state="up")
        if missing:
            raise AddressError(f"interface(s) {', '.join(sorted(set(missing)))} do not exist (yet)")

    def owned_routes(self) -> frozenset[Route]:
        """dom0's IPv4 routes in the main table, as (network, next hop or "", device)."""
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self.ipr.get_links()}
        out: set[Route] = set()
        for r in self.ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if r["proto"] != DOM0_PROTO:
                continue
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            dev = names.get(r.get_attr("RTA_OIF"), "?")
            out.add((f"{dst}/{r['dst_len']}", r.get_attr("RTA_GATEWAY") or "", dev))
        return frozenset(out)

    def apply_routes(self, add: Iterable[Route], delete: Iterable[Route]) -> None:
        """Remove, then add (replace: a route to the same network through
        another machine takes its place); a device that does not exist
        (yet) is an error: the next sync adds what is missing."""
        for net, via, _dev in sorted(delete):
            try:
                self.ipr.route("del", dst=net, table=MAIN_TABLE, proto=DOM0_PROTO,
                               **({"gateway": via} if via else {}))  # fmt: skip
            except NetlinkError as e:
                if e.code not in (3, 19):  # ESRCH, ENODEV: already gone
                    raise AddressError(f"cannot remove the route to {net}: {e}") from e
        for net, via, dev in sorted(add):
            index = self.link_index(dev)
            if index is None:
                raise AddressError(f"route to {net}: interface {dev} does not exist (yet)")
            try:
                self.ipr.route("replace", dst=net, oif=index, table=MAIN_TABLE, proto=DOM0_PROTO,
                               **({"gateway": via} if via else {}))  # fmt: skip
            except NetlinkError as e:
                raise AddressError(f"cannot add the route to {net} on {dev}: {e}") from e


def enable_ipv6_forwarding(proc_sys: Path = Path("/proc/sys")) -> None:
    """For a policy with IPv6 domains: dom0 routes their IPv6. (A WAN that
    takes its own IPv6 address by SLAAC then needs accept_ra = 2: the kernel
    ignores router advertisements on a forwarding host otherwise.)"""
    path = proc_sys / "net/ipv6/conf/all/forwarding"
    if path.exists() and path.read_text().strip() != "1":
        path.write_text("1")


def bridge_netfilter(proc_sys: Path = Path("/proc/sys")) -> bool:
    """Whether bridged IPv4 crosses the inet tables here (br_netfilter loaded)."""
    return (proc_sys / "net/bridge/bridge-nf-call-iptables").exists()


def enable_forwarding(proc_sys: Path = Path("/proc/sys")) -> bool:
    """Forwarding in dom0's own network namespace (the controller's); whether
    bridged IPv4 meets the inet tables (see `bridge_netfilter`)."""
    for key, value in _SYSCTLS.items():
        path = proc_sys / key
        if not path.exists():
            log.warning(
                "sysctl %s absent (br_netfilter not loaded?): bridged traffic is "
                "policed by the bridge table only",
                key.replace("/", "."),
            )
            continue
        if path.read_text().strip() != value:
            path.write_text(value)
    return bridge_netfilter(proc_sys)
