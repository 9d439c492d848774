"""A bridge port's carrier, flapped so that the guest behind it re-acquires
its lease now (a move to another domain, `dom0 machine renew`).

The port is the host side of the guest's link: a veth's peer or a tap. Taking
a veth end down drops the carrier its peer sees; DHCP clients that watch the
carrier (dhcpcd, systemd-networkd, NetworkManager) then ask again when it
comes back, and the server's NAK of the old address sends them to the new
one. A tap's guest (QEMU) does not see the tap's state: libvirt's link state
(`virsh domif-setlink`) is the carrier there, once libvirt is a source. A
port that is administratively down is left alone.

pyroute2's IPRoute is thread-affine: one instance, made and used in the
controller's trio thread.
"""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFF_UP = 0x1


class CarrierError(Exception):
    pass


class Carrier:
    def __init__(self, ipr: IPRoute | None = None) -> None:
        self.ipr = ipr if ipr is not None else IPRoute()

    def _index(self, port: str) -> int:
        found = self.ipr.link_lookup(ifname=port)
        if not found:
            raise CarrierError(f"{port}: no such interface")
        return int(found[0])

    def down(self, port: str) -> bool:
        """Take `port` down; False (and nothing done) if it was not up."""
        try:
            index = self._index(port)
            (link,) = self.ipr.link("get", index=index)
            if not link["flags"] & IFF_UP:
                return False
            self.ipr.link("set", index=index, state="down")
        except NetlinkError as e:
            raise CarrierError(f"{port}: {e}") from e
        return True

    def up(self, port: str) -> None:
        try:
            self.ipr.link("set", index=self._index(port), state="up")
        except NetlinkError as e:
            raise CarrierError(f"{port}: {e}") from e
