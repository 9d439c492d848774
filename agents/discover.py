"""Finding dom0 on the VM's link by multicast DNS (`_dom0._tcp.local.`,
advertised by controller/sources/advertise.py), for an agent that was given
no address.

What this finds is a list of candidates, not of trusted servers: anyone on
the link can answer mDNS. The agent connects to each with TLS verified
against its pinned root (agents/session.py), and that handshake is the only
thing that makes an answer dom0's. So the parser (`candidates`, pure) only
keeps what could be dom0's listener, and bounds what a noisy link costs:
MAX_CANDIDATES at most, MAX_NAMES instances looked at, IPv4 only.

Light imports only (python-zeroconf, its ifaddr, the standard library): the
agent never imports the controller.
"""

from __future__ import annotations

import ipaddress
import queue
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

import ifaddr  # (python-zeroconf's own dependency)
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

SERVICE_TYPE = "_dom0._tcp.local."  # (controller/sources/advertise.py's)
PROTOCOL_VERSION = b"1"
MAX_CANDIDATES = 16
MAX_NAMES = 64  # instance names resolved per browse; more are ignored
RESOLVE_TIMEOUT = 1.0  # seconds for one instance's SRV, TXT and A records
SETTLE = 1.0  # seconds to keep listening after the first usable answer


@dataclass(frozen=True, slots=True)
class Answer:
    """One resolved instance, as plain data (what `candidates` judges)."""

    name: str
    port: int | None
    addresses: tuple[str, ...]
    txt: Mapping[bytes, bytes | None] = field(default_factory=dict)

    @classmethod
    def of(cls, info: ServiceInfo) -> Answer:
        return cls(
            info.name,
            info.port,
            tuple(info.parsed_addresses(IPVersion.V4Only)),
            dict(info.properties),
        )


def _usable(address: str) -> IPv4Address | None:
    try:
        a = IPv4Address(address)
    except ValueError:
        return None
    if a.is_unspecified or a.is_multicast or a.is_loopback or a.is_reserved:
        return None  # (is_reserved: 240/4, the limited broadcast included)
    return a


def candidates(
    answers: Iterable[Answer], on_link: Sequence[IPv4Network] = ()
) -> list[tuple[str, int]]:
    """The (address, port) pairs worth a TLS handshake, deduplicated, at
    most MAX_CANDIDATES: those on one of the `on_link` networks first (dom0's
    gateway on this VM's network; another domain's gateway on the same
    bridge is advertised too, and dom0 drops connections to it), then by
    address and port. Malformed answers are skipped: no valid port, no usable
    IPv4 address, TXT v other than 1."""
    found: set[tuple[IPv4Address, int]] = set()
    for answer in answers:
        if answer.txt.get(b"v") != PROTOCOL_VERSION:
            continue
        if not isinstance(answer.port, int) or not 1 <= answer.port <= 65535:
            continue
        for text in answer.addresses:
            address = _usable(text)
            if address is not None:
                found.add((address, answer.port))

    def order(c: tuple[IPv4Address, int]) -> tuple[bool, IPv4Address, int]:
        return (not any(c[0] in net for net in on_link), *c)

    return [(str(a), port) for a, port in sorted(found, key=order)[:MAX_CANDIDATES]]


def local_networks(interface_address: str | None = None) -> list[IPv4Network]:
    """The IPv4 networks of this host's interfaces (of the one holding
    `interface_address`, if given), loopback excepted."""
    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ip.is_IPv4 or not isinstance(ip.ip, str):
                continue
            if interface_address is not None and ip.ip != interface_address:
                continue
            net = ipaddress.ip_interface(f"{ip.ip}/{ip.network_prefix}").network
            if isinstance(net, IPv4Network) and not net.is_loopback:
                out.append(net)
    return out


def browse(
    timeout: float, *, interface_address: str | None = None, settle: float = SETTLE
) -> list[tuple[str, int]]:
    """Blocking (the agent calls it in a thread): browse `_dom0._tcp` for
    up to `timeout` seconds, on the interface holding `interface_address` or
    on all of them; the candidates (`candidates`) found. It returns early,
    `settle` seconds after the first usable answer: every responder on the
    link answers within that."""
    deadline = time.monotonic() + timeout
    interfaces = [interface_address] if interface_address else InterfaceChoice.All
    names: queue.SimpleQueue[str] = queue.SimpleQueue()

    def heard(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.put(name)

    zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[heard])
        try:
            answers = _resolve(zc, names, deadline, settle)
        finally:
            browser.cancel()
    finally:
        zc.close()
    return candidates(answers, local_networks(interface_address))


def _resolve(
    zc: Zeroconf, names: queue.SimpleQueue[str], deadline: float, settle: float
) -> list[Answer]:
    """The instances named in `names` as they arrive, each resolved once
    (a name that failed is tried again when it is heard again)."""
    answers: dict[str, Answer] = {}
    seen: set[str] = set()
    while (left := deadline - time.monotonic()) > 0:
        try:
            name = names.get(timeout=left)
        except queue.Empty:
            break
        if name in answers or (name not in seen and len(seen) >= MAX_NAMES):
            continue
        seen.add(name)
        wait = min(RESOLVE_TIMEOUT, deadline - time.monotonic())
        try:
            info = ServiceInfo(SERVICE_TYPE, name)
            if wait <= 0 or not info.request(zc, wait * 1000):  # (milliseconds)
                continue
            answers[name] = Answer.of(info)
        except Exception:  # (a malformed record: skipped like any other)
            continue
        if candidates(answers.values()):
            deadline = min(deadline, time.monotonic() + settle)
    return list(answers.values())
