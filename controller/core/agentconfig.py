"""What the controller pushes to a machine's agent (pure): the same network
the machine would get from DHCP, RAs and `dom0 wg export`, as one
configuration (common/agentconfig.py), so that an enrolled agent needs none
of them.

- A machine of a bridge domain: its address in the domain's pool, its /64
  when the domain has IPv6, and the default route via the domain's gateway
  (the IPv6 one only when the uplink carries IPv6: dom0 advertises no IPv6
  default route otherwise either).
- A machine of a hub domain: its underlay address on the bridge (it reaches
  only the hub's UDP and dom0's agent listener there), and a tunnel to the
  hub with its domain address, every destination through it.
- Either, in a domain with `containers`: the prefix delegated to it.
"""

from __future__ import annotations

from common.agentconfig import MachineConfig, Route, Tunnel
from controller.core.allocation import Allocation
from controller.core.desired import fqdn_of, label_of
from controller.policy.model import QUARANTINE, Policy

TUNNEL_IF = "wg0"
KEEPALIVE = 25  # seconds: the hub learns a machine's endpoint again after a NAT or a restart


def machine_config(
    policy: Policy, a: Allocation, hub_public_key: str | None
) -> MachineConfig | None:
    """The configuration for machine `a`, or None when it has none to take
    (quarantined, absent, no address yet, or a hub without its key yet)."""
    domain = policy.domains.get(a.domain)
    if a.rule == QUARANTINE or domain is None or a.address is None or a.absent_since is not None:
        return None
    name = fqdn_of(policy, a)
    delegated = domain.delegated(a.address)
    containers = None if delegated is None else str(delegated)
    hostname = label_of(policy, a).split(".", 1)[0]
    # (an agent exists only where dom0 has a CA: DNS over TLS is served)
    dns = str(domain.gateway) if domain.resolves else None
    # a remap's grace: the old address beside the new one, deprecated (core/remap.py)
    old = a.previous
    if a.underlay is not None:
        hub = policy.hub
        if hub is None or hub_public_key is None:
            return None
        return MachineConfig(
            name=name,
            hostname=hostname,
            mac=a.mac,
            addresses=(f"{a.underlay}/{hub.pool.prefixlen}",),
            routes=(Route("0.0.0.0/0", None, "tunnel"),),
            tunnel=Tunnel(
                interface=TUNNEL_IF,
                address=f"{a.address}/32",
                peer_public_key=hub_public_key,
                endpoint=f"{hub.gateway}:{hub.listen_port}",
                allowed_ips=("0.0.0.0/0",),
                mtu=hub.mtu,
                keepalive=KEEPALIVE,
            ),
            containers=containers,
            dns=dns,
            deprecated=(f"{old}/32",) if old is not None else (),
        )
    addresses = [f"{a.address}/{domain.pool.prefixlen}"]
    routes = [Route("0.0.0.0/0", str(domain.gateway), "link")]
    address6 = domain.address6(a.address)
    if address6 is not None:
        addresses.append(f"{address6}/64")
        uplink = policy.uplink
        if uplink is not None and any(":" in x for x in uplink.addresses):
            routes.append(Route("::/0", str(domain.gateway6), "link"))
    deprecated: list[str] = []
    if old is not None:
        deprecated.append(f"{old}/{domain.pool.prefixlen}")
        if (old6 := domain.address6(old)) is not None:
            deprecated.append(f"{old6}/64")
    return MachineConfig(
        name=name,
        hostname=hostname,
        mac=a.mac,
        addresses=tuple(addresses),
        routes=tuple(routes),
        containers=containers,
        dns=dns,
        deprecated=tuple(deprecated),
    )
