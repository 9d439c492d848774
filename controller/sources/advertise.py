"""dom0's agent service advertised on the bridge by multicast DNS
(`_dom0._tcp.local.`), so that an agent without a configured address finds
the listener (controller/sources/agents.py).

An answer is a hint, never trust: the agent connects to what it finds with
TLS verified against its pinned root (agents/session.py), so a forged answer
costs it a failed handshake and nothing more. The TXT record therefore holds
nothing secret: the protocol version and the TLS version.

Bridge only: python-zeroconf joins the mDNS group and sends from the given
addresses alone, never from all interfaces, and its shared wildcard socket
(0.0.0.0:5353, which every python-zeroconf has) is set to take multicast only
from the groups it joined itself (IP_MULTICAST_ALL off): with another mDNS
stack on the WAN, a query from there would otherwise reach it, and be
answered by unicast out of the WAN. What that cannot stop, a query sent to
the WAN address itself, dom0's input chain drops (`host_in`).

python-zeroconf runs its own asyncio loop in a thread; this trio task only
starts and stops it, each time in a worker thread (both block on network
round trips: probing, announcements, goodbyes).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Sequence

import ifaddr  # (python-zeroconf's own dependency)
import trio
from zeroconf import IPVersion, ServiceInfo, Zeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_dom0._tcp.local."
PROTOCOL_VERSION = "1"  # the TXT record's v=; agents/discover.py takes only this one
TXT = {"v": PROTOCOL_VERSION, "tls": "1.3"}
ADDRESS_POLL = 2.0  # seconds between looks at which of the addresses dom0 holds
RETRY = 10.0  # seconds before trying again after python-zeroconf failed to start
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # (Linux's value; Python lacks it)
_MAX_LABEL = 63  # bytes in one DNS label, an instance name included


def instance_name(host: str) -> str:
    """The instance name for dom0 on `host` (a hostname or the policy's tld):
    its first label, since a dot cannot be part of one here."""
    return f"dom0 on {host.split('.')[0]}"


def service_info(addresses: Sequence[str], port: int, name: str) -> ServiceInfo:
    """The one service instance: `name` on `port` at `addresses` (IPv4).

    Pure (no sockets); ValueError for what no agent could use.
    """
    if not name or "." in name or len(name.encode()) > _MAX_LABEL:
        raise ValueError(f"instance name {name!r}: 1 to {_MAX_LABEL} bytes, no dot")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError(f"instance name {name!r}: no control characters")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port}: expected 1 to 65535")
    if not addresses:
        raise ValueError("no address to advertise")
    parsed = [str(ipaddress.IPv4Address(a)) for a in addresses]  # (ValueError: not IPv4)
    # The SRV target, whose A records are the addresses: a name of its own,
    # never the host's `hostname.local` (another responder's, say avahi's).
    host = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:_MAX_LABEL] or "dom0"
    return ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties=dict(TXT),
        server=f"{host}.local.",
        parsed_addresses=sorted(set(parsed), key=ipaddress.IPv4Address),
    )


def held(addresses: Sequence[str]) -> list[str]:
    """Those of `addresses` that an interface of this host holds now."""
    mine = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4}
    return [a for a in addresses if a in mine]


def _own_groups_only(zc: Zeroconf) -> int:
    """IP_MULTICAST_ALL off on zeroconf's wildcard socket(s): multicast only
    for the groups joined on them, that is on our addresses' interfaces.
    Returns how many were set (python-zeroconf keeps them in its engine)."""
    done = 0
    for reader in getattr(zc.engine, "readers", []):
        sock = getattr(reader, "sock", None)  # (asyncio's TransportSocket)
        if sock is not None and tuple(sock.getsockname())[:1] == ("0.0.0.0",):
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            done += 1
    return done


def _start(info: ServiceInfo, addresses: list[str], opened: list[Zeroconf]) -> None:
    """Blocking: open python-zeroconf on `addresses` only and register `info`
    (probing, then announcements: a second or two)."""
    zc = Zeroconf(interfaces=list(addresses), ip_version=IPVersion.V4Only)
    opened.append(zc)  # (before anything else can fail: closed by the caller)
    if not _own_groups_only(zc):
        log.warning("advertise: no wildcard mDNS socket found to restrict (zeroconf changed?)")
    zc.register_service(info, allow_name_change=True)


def _stop(zc: Zeroconf, info: ServiceInfo) -> None:
    """Blocking: goodbyes (TTL 0) for `info`, then close every socket."""
    try:
        with contextlib.suppress(Exception):  # (it may never have been registered)
            zc.unregister_service(info)
    finally:
        zc.close()


async def _until_changed(addresses: list[str], now: list[str]) -> None:
    """Returns when the addresses dom0 holds are no longer `now` (polled:
    there is no cheap notification short of a netlink subscription)."""
    while True:
        await trio.sleep(ADDRESS_POLL)
        if await trio.to_thread.run_sync(held, addresses) != now:
            return


async def advertise(
    addresses: list[str],
    port: int,
    name: str,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Advertise `name` (`_dom0._tcp`, v=1, tls=1.3) on `port` at those of
    `addresses` dom0 holds, until cancelled; then say goodbye.

    As `_serve_agents` does, it waits for addresses dom0 does not hold yet
    (the first sync adds them), and starts again with the new set whenever
    that changes. `nursery.start` returns once the first registration is
    announced: in the controller, use `start_soon`.
    """
    service_info(addresses, port, name)  # (ValueError now, not at the first address)
    started = False
    while True:
        now = await trio.to_thread.run_sync(held, addresses)
        if not now:
            await trio.sleep(ADDRESS_POLL)
            continue
        info = service_info(now, port, name)
        opened: list[Zeroconf] = []
        failed = False
        try:
            # Not abandoned on cancellation: the thread is waited for, so
            # what it opened is in `opened` for the finally to close.
            try:
                await trio.to_thread.run_sync(_start, info, now, opened)
            except Exception as e:  # (discovery is a convenience: never the controller's end)
                log.error("advertise: cannot advertise on %s: %s (again in %gs)", now, e, RETRY)
                failed = True
            else:
                log.info("advertise: %r (%s) on %s, port %d", info.name, SERVICE_TYPE, now, port)
                if not started:
                    started = True
                    task_status.started()
                await _until_changed(addresses, now)
                log.info("advertise: dom0's addresses changed: advertising again")
        finally:
            if opened:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_stop, opened[0], info)
        if failed:
            await trio.sleep(RETRY)
