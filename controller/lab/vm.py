"""Acting as a VM: run commands in it, forge addresses and MACs, probe from it.

These are the moves of a misbehaving or ordinary guest that the controller
must cope with; they touch only the VM's own namespace.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from controller.lab import dhcpclient, netns, processes, topology
from controller.lab.probe import DEFAULT_TIMEOUT, ProbeResult, probe_http, probe_many
from controller.lab.rundir import Lab, LabError


def run(
    lab: Lab, index: int, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run argv inside VM index (text output captured)."""
    return netns.run(lab.vm(index)["namespace"], argv, check=check, timeout=timeout)


def _dad_flag(cidr: str) -> str:
    return " nodad" if ":" in cidr else ""


def add_address(lab: Lab, index: int, cidr: str, dev: str = topology.VM_IF) -> None:
    """Put an extra (e.g. forged) address on the VM's interface."""
    netns.ip_batch([f"addr add {cidr} dev {dev}{_dad_flag(cidr)}"], lab.vm(index)["namespace"])


def del_address(lab: Lab, index: int, cidr: str, dev: str = topology.VM_IF) -> None:
    netns.ip_batch([f"addr del {cidr} dev {dev}"], lab.vm(index)["namespace"])


def addresses(lab: Lab, index: int, dev: str = topology.VM_IF) -> list[str]:
    """Global addresses on the VM's interface as CIDR strings."""
    out = run(lab, index, ["ip", "-j", "addr", "show", "dev", dev]).stdout
    result = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            if a.get("scope") == "global":
                result.append(f"{a['local']}/{a['prefixlen']}")
    return result


def mac(lab: Lab, index: int) -> str:
    return str(lab.vm(index)["mac"])


def set_mac(lab: Lab, index: int, new_mac: str, *, restart_dhcp: bool = True) -> None:
    """Change the VM's MAC (a guest randomizing or forging it).

    udhcpc reads the MAC once at start, so by default a running DHCP client
    is restarted to ask with the new MAC.
    """
    new_mac = new_mac.lower()
    ns = lab.vm(index)["namespace"]
    netns.ip_batch([f"link set {topology.VM_IF} address {new_mac}"], ns)
    with lab.update() as data:
        data["vms"][str(index)]["mac"] = new_mac
    proc = lab.process(dhcpclient.role(index))
    if restart_dhcp and proc is not None and processes.is_running(proc):
        dhcpclient.restart(lab, index)


def set_link(lab: Lab, index: int, up: bool) -> None:
    """Take the VM's eth0 down or up (a guest's link going away without leaving)."""
    netns.ip_batch(
        [f"link set {topology.VM_IF} {'up' if up else 'down'}"], lab.vm(index)["namespace"]
    )


def probe(
    lab: Lab,
    index: int,
    url: str,
    *,
    source: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    freebind: bool = False,
) -> ProbeResult:
    """GET url from inside VM index (optionally from a forged source address)."""
    return probe_http(
        lab.vm(index)["namespace"], url, source=source, timeout=timeout, freebind=freebind
    )


def probe_urls(
    lab: Lab, index: int, urls: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT
) -> list[ProbeResult]:
    return probe_many(lab.vm(index)["namespace"], urls, timeout=timeout)


def echo_url(address: str = topology.ECHO_ADDRESS, port: int = topology.ECHO_PORT) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}/" if port == 80 else f"http://{host}:{port}/"


def whoami(lab: Lab, index: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The address the internet echo service sees for VM index (raises if unreachable)."""
    result = probe(lab, index, echo_url(), timeout=timeout)
    if not result.ok:
        raise LabError(f"vm{index}: echo at {topology.ECHO_ADDRESS} unreachable: {result.error}")
    return result.body.strip()
