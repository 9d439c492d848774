"""`dom0 host check --policy FILE`: does anything else serve or NAT the managed bridge?

Reads, in the network namespace it runs in (the host's; in the lab
`ip netns exec NAME-dom0 dom0 host check ...`), and changes nothing:

- the bridge: present, and a bridge (netlink), with its addresses;
- DHCP (UDP 67, 547) and DNS (UDP/TCP 53) server sockets on the bridge's
  addresses or a wildcard address, from this namespace's own socket tables
  (/proc/self/net/...), and the processes holding them (/proc/PID/fd): a
  process of another namespace may appear in /proc, but only inodes listed in
  this namespace's tables count. dom0's own dnsmasq is recognised by its
  record: its command line names its state directory (--dhcp-hostsdir), and
  that directory's record names this very process (PID, start time and
  command), so no --state is needed;
- nftables tables that are not dom0's and masquerade/snat or touch the
  bridge (libvirt's iptables-nft chains LIBVIRT_* included);
- libvirt networks defined for the bridge's name (/etc/libvirt/qemu/networks,
  its autostart/, /run/libvirt/network for the active ones, and
  `virsh net-list` when virsh is installed). DOM0_LIBVIRT_ROOT=DIR reads
  DIR/etc/libvirt/... and DIR/run/libvirt/... instead (tests), and skips virsh;
- forwarding and reverse-path sysctls.

Exit 0: nothing found; 1: a problem found (or the host could not be read);
2: bad policy. The judging is `controller.core.hostfacts` (pure).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from common import processes
from controller.core import hostfacts as hf
from controller.drivers.dhcp import record_path, state_dir_of
from controller.policy.load import load_or_report
from controller.policy.model import Policy

PROG = "dom0 host check"
LIBVIRT_ROOT_ENV = "DOM0_LIBVIRT_ROOT"
_TABLES = (("udp", "udp"), ("udp6", "udp"), ("tcp", "tcp"), ("tcp6", "tcp"))


class HostReadError(Exception):
    pass


def _bridge(name: str) -> hf.Bridge:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return hf.Bridge(name, None)
        link = ipr.get_links(found[0])[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
        addresses = tuple(
            str(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
            for a in ipr.get_addr(index=found[0])
        )
    return hf.Bridge(name, kind, addresses)


def _diag_sockets() -> list[hf.Socket]:
    """Server sockets through sock_diag (netlink, this namespace's): unlike
    /proc/net it says which interface a socket is bound to (dnsmasq binds its
    DHCP socket to 0.0.0.0 on one interface)."""
    from pyroute2 import DiagSocket

    out = []
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto, name, state in (
                (socket.IPPROTO_UDP, "udp", hf.UDP_UNCONNECTED),
                (socket.IPPROTO_TCP, "tcp", hf.TCP_LISTEN),
            ):
                for m in ds.get_sock_stats(family=family, protocol=proto, states=1 << state):
                    if m["idiag_state"] != state:
                        continue
                    index = m["idiag_if"]
                    try:
                        device = socket.if_indextoname(index) if index else None
                    except OSError:
                        device = f"#{index}"
                    out.append(
                        hf.Socket(
                            name, str(m["idiag_src"]), m["idiag_sport"], m["idiag_inode"], device
                        )
                    )
    return out


def _sockets() -> list[hf.Socket]:
    try:
        return _diag_sockets()
    except Exception:  # no sock_diag for UDP in this kernel: /proc/net, without devices
        pass
    out = []
    for table, proto in _TABLES:
        try:
            text = Path(f"/proc/self/net/{table}").read_text()
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
        out += hf.parse_proc_net(text, proto)
    return out


def _fd_inodes(pid: str) -> Iterator[int]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            inode = hf.socket_inode(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if inode is not None:
            yield inode


def _argv(pid: int) -> tuple[str, ...]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def is_own_dnsmasq(pid: int, argv: tuple[str, ...]) -> bool:
    """Whether pid is the dnsmasq a dom0 controller recorded for the state
    directory its own command line names."""
    state = state_dir_of(argv)
    if state is None:
        return False
    rec = processes.read_record(record_path(state))
    return (
        rec is not None
        and rec.pid == pid
        and processes.is_running(rec)
        and rec.argv == processes.command_digest(argv)
    )


def is_own_unbound(pid: int, argv: tuple[str, ...]) -> bool:
    """Whether pid is the unbound a dom0 controller recorded for the state
    directory its configuration file is in (STATE/dns/unbound.conf)."""
    from controller.drivers import dns

    conf = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-c"), None)
    if conf is None or Path(conf).name != "unbound.conf" or Path(conf).parent.name != "dns":
        return False
    rec = processes.read_record(dns.record_path(Path(conf).parent.parent))
    return rec is not None and rec.pid == pid and processes.is_running(rec)


def _own(pid: int, comm: str, argv: tuple[str, ...]) -> bool:
    if comm == "dnsmasq":
        return is_own_dnsmasq(pid, argv)
    return comm == "unbound" and is_own_unbound(pid, argv)


def _listeners() -> list[hf.Listener]:
    wanted = {s.inode: s for s in _sockets() if hf.serves(s)}
    holders: dict[int, list[hf.Holder]] = {i: [] for i in wanted}
    if wanted:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            hits = [i for i in set(_fd_inodes(entry.name)) if i in wanted]
            if not hits:
                continue
            pid = int(entry.name)
            argv = _argv(pid)
            comm = _comm(pid)
            holder = hf.Holder(pid, comm, argv, _own(pid, comm, argv))
            for i in hits:
                holders[i].append(holder)
    return [hf.Listener(s, tuple(holders[i])) for i, s in wanted.items()]


def _ruleset() -> list[dict]:
    from controller.drivers.nft import Nft

    try:
        return Nft().ruleset()
    except Exception as e:  # libnftables missing or refusing: say so, do not guess
        raise HostReadError(f"cannot read the nftables ruleset: {e}") from None


def _libvirt(root: Path) -> tuple[list[hf.LibvirtNetwork], list[tuple[str, str]]]:
    conf = root / "etc/libvirt/qemu/networks"
    active = root / "run/libvirt/network"
    networks, unreadable = [], []
    for file in sorted(conf.glob("*.xml")):
        try:
            n = hf.parse_libvirt_network(file.read_text(errors="replace"), str(file))
        except (OSError, ValueError) as e:
            unreadable.append((str(file), str(e)))
            continue
        networks.append(
            dataclasses.replace(
                n,
                autostart=(conf / "autostart" / f"{n.name}.xml").exists(),
                active=(active / f"{n.name}.xml").exists(),
            )
        )
    return networks, unreadable


def _virsh(networks: list[hf.LibvirtNetwork]) -> list[hf.LibvirtNetwork]:
    """libvirtd's own word on which networks run, when it answers."""
    virsh = shutil.which("virsh")
    if virsh is None:
        return networks
    try:
        r = subprocess.run(
            [virsh, "-q", "-c", "qemu:///system", "net-list", "--all"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return networks
    if r.returncode != 0:
        return networks
    states = hf.parse_virsh_net_list(r.stdout)
    out = []
    for n in networks:
        active, autostart = states.get(n.name, (n.active, n.autostart))
        out.append(dataclasses.replace(n, active=active, autostart=autostart))
    return out


def _sysctls(keys: list[tuple[str, ...]]) -> dict[str, str]:
    """Values by dotted name; keys are path components (an interface name may
    hold a dot)."""
    out = {}
    for key in keys:
        try:
            out[".".join(key)] = Path("/proc/sys", *key).read_text().strip()
        except OSError:
            continue
    return out


def gather(policy: Policy) -> hf.Facts:
    """Everything the check looks at, read from this namespace; HostReadError
    if the host cannot be read."""
    env_root = os.environ.get(LIBVIRT_ROOT_ENV)
    networks, unreadable = _libvirt(Path(env_root or "/"))
    if not env_root:
        networks = _virsh(networks)
    objs = _ruleset()
    keys = [("net", "ipv4", "ip_forward"), ("net", "ipv4", "conf", "all", "rp_filter")]
    keys += [("net", "ipv4", "conf", i, "rp_filter") for i in (policy.bridge, policy.wan) if i]
    return hf.Facts(
        bridge=_bridge(policy.bridge),
        listeners=tuple(_listeners()),
        tables=tuple(hf.foreign_tables(objs, policy.bridge)),
        own_tables=hf.present_own_tables(objs),
        networks=tuple(networks),
        unreadable=tuple(unreadable),
        sysctls=_sysctls(keys),
        wan=policy.wan,
    )


def format_findings(bridge: str, findings: list[hf.Finding]) -> str:
    if not findings:
        return f"host check: nothing else serves DHCP or DNS, or NATs, on {bridge}"
    width = max(len(f.check) for f in findings)
    lines = [f"{'SEVERITY':8}  {'CHECK':{width}}  FINDING / WHAT TO DO"]
    for f in findings:
        lines.append(f"{f.severity:8}  {f.check:{width}}  {f.summary}")
        lines.append(f"{'':8}  {'':{width}}  -> {f.fix}")
    problems = sum(f.severity == hf.PROBLEM for f in findings)
    lines.append(
        f"host check: {problems} problem(s) on {bridge}"
        if problems
        else f"host check: no problem on {bridge} ({len(findings)} note(s))"
    )
    return "\n".join(lines)


def check_command(policy_file: str, *, as_json: bool = False) -> int:
    policy = load_or_report(policy_file, PROG)
    if policy is None:
        return 2
    if os.geteuid() != 0:
        print(
            f"{PROG}: needs root (it reads nftables and other processes' sockets)", file=sys.stderr
        )
        return 1
    try:
        facts = gather(policy)
    except (HostReadError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    findings = hf.judge(facts)
    bad = hf.failed(findings)
    if as_json:
        print(
            json.dumps(
                {
                    "policy": policy_file,
                    "bridge": policy.bridge,
                    "ok": not bad,
                    "problems": sum(f.severity == hf.PROBLEM for f in findings),
                    "findings": [f.to_json() for f in findings],
                },
                indent=2,
            )
        )
    else:
        print(format_findings(policy.bridge, findings))
    return 1 if bad else 0
