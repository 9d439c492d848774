"""A lab VM's DHCPv6 client: dhcpcd -6, beside its DHCPv4 client.

dhcpcd is the only DHCPv6 client on these machines (busybox has no
udhcpc6). It runs in a private mount namespace with a tmpfs over its state
directories, as the DHCPv4 dhcpcd does (controller/lab/dhcpclient.py), with
a DUID of its MAC (`duid ll`): a DUID made fresh at every start would leave
the reserved address bound to the previous one's lease until it expires.
It takes its address from dom0's DHCPv6 reservation after dom0's router
advertisement (managed, no on-link prefix) and routes every prefix through
dom0.
"""

from __future__ import annotations

import ipaddress
import json

from controller.lab import netns, processes
from controller.lab.rundir import Lab, LabError
from controller.lab.topology import VM_IF
from controller.lab.wait import wait_for

# No hook runs (`-c /bin/true`, and none named here either): dhcpcd's stock
# hooks write /etc/resolv.conf and set the hostname, and a VM namespace shares
# both with the host. Its /etc/resolv.conf is also a lab file bind-mounted in
# its private mount namespace, so that no dhcpcd can ever write the host's.
CONF = "ipv6only\nduid ll\nnohook resolv.conf, hostname\n"
_START = (
    "mkdir -p /run/dhcpcd /var/lib/dhcpcd && mount -t tmpfs tmpfs /run/dhcpcd && "
    'mount -t tmpfs tmpfs /var/lib/dhcpcd && mount --bind "$3" /etc/resolv.conf && '
    'exec dhcpcd -B -6 -c /bin/true -f "$1" "$2"'
)


def role(index: int) -> str:
    return f"dhcp6-vm{index}"


def start(lab: Lab, index: int) -> processes.ProcId:
    conf = lab.root / "dhcpcd6.conf"
    if not conf.exists():
        conf.write_text(CONF)
    resolv = lab.root / f"resolv-vm{index}.conf"
    resolv.touch()
    ns = lab.vm_ns(index)
    inner = ["unshare", "-m", "--propagation", "private", "sh", "-c", _START, "dhcpcd6"]
    argv = netns.exec_argv(ns, [*inner, str(conf), VM_IF, str(resolv)])
    _, proc = processes.spawn(argv, log=lab.logs_dir / f"dhcp6-vm{index}.log")
    lab.record_process(role(index), proc, ns, argv)
    return proc


def addresses(lab: Lab, index: int) -> list[str]:
    """The VM's global IPv6 addresses on eth0."""
    out = netns.run(lab.vm_ns(index), ["ip", "-6", "-j", "addr", "show", "dev", VM_IF])
    found = []
    for link in json.loads(out.stdout or "[]"):
        for a in link.get("addr_info", []):
            ip = ipaddress.ip_address(a["local"])
            if not ip.is_link_local and "tentative" not in a:
                found.append(str(ip))
    return found


def wait_address(lab: Lab, index: int, address: str, timeout: float = 20.0) -> None:
    """Until the VM holds address (its reservation); LabError after timeout."""
    try:
        wait_for(lambda: address in addresses(lab, index), timeout, f"vm{index} to hold {address}")
    except LabError as e:
        log = lab.logs_dir / f"dhcp6-vm{index}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise LabError(f"{e} (dhcpcd: {' | '.join(tail) or 'no output'})") from None


def stop(lab: Lab, index: int) -> None:
    proc = lab.process(role(index))
    if proc is not None:
        processes.stop([proc])
        lab.forget_process(role(index))
