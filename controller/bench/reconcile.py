"""`dom0 bench reconcile`: what admitting one machine costs, and a full
rebuild, with 10, 1,000 and 10,000 machines already present; under the hub
policy and under the bridge policy; beside firewalld admitting the same
machines into an ipset (`controller.bench.firewalld`).

Runs against real nftables in a network namespace it creates (and deletes):
the command re-executes itself inside it. Machines are synthesized as
netlink events (a new bridge port, then its MAC learned in the FDB): the
measured path is the controller's own, from the events into the reconciler
to everything committed:

- hub policy (policies/lab.toml's shape, pools sized for 10,000 machines):
  the allocations in the store, the machine's tunnel key created (0600,
  fsync'd), the nftables elements, the hub peer added to a real hub device
  (wireguard-go here, the driver's userspace backend, in its own private
  mount namespace), the DHCP reservation file in place;
- bridge policy (policies/lab-bridge.toml's shape): the same without key
  and hub peer;
- allow policy: the bridge policy with allow lists by protocol and port (a
  rule's own grant, destinations by name glob): a machine also joins its
  groups, one element each.

No dnsmasq runs: it re-reads the reservation directory through inotify on
its own, after the controller is done, so it is no part of admission's
cost (the file it reads is). One run, one machine: report ratios, not
absolute numbers, across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from controller.bench import firewalld
from controller.bench.common import (
    delete_namespace,
    machine_info,
    parse_sizes,
    ratio,
    summary,
    tail,
)
from controller.core import inventory as inv
from controller.core.plan import flatten
from controller.policy.load import parse_policy

if TYPE_CHECKING:
    from controller.reconcile import Reconciler

# policies/lab.toml and lab-bridge.toml, with pools for 10,000 machines and
# rules that split the bench's MACs (52:54:NN:NN:NN:NN) odd/even as the lab's do.
_COMMON = """
[site]
tld = "internal"
[bridge]
name = "virbr0"
[wan]
interface = "wan"
[dhcp]
lease_time = "10m"
[[rules]]
name = "odd"
domain = "x"
subdomain = "web{n}"
match.mac_mask = "52:54:00:00:00:01/ff:ff:00:00:00:01"
[[rules]]
name = "even"
domain = "y"
subdomain = "db{n}"
match.mac_mask = "52:54:00:00:00:00/ff:ff:00:00:00:01"
[quarantine]
pool = "10.99.0.0/24"
"""
HUB_POLICY = (
    _COMMON
    + """
[hub]
interface = "hub0"
listen_port = 51821
pool = "10.250.0.0/16"
[domains.x]
pool = "10.64.0.0/16"
internet = true
services = ["dns", "icmp"]
hub = true
[domains.y]
pool = "10.65.0.0/16"
internet = true
services = ["dns", "icmp"]
hub = true
"""
)
BRIDGE_POLICY = (
    _COMMON
    + """
[domains.x]
pool = "10.64.0.0/16"
internet = true
services = ["dns", "icmp"]
[domains.y]
pool = "10.65.0.0/16"
internet = true
services = ["dns", "icmp"]
"""
)
# The bridge policy with allow lists by protocol and port, as
# policies/example.toml writes them: domain-wide entries, a rule's own grant,
# and destinations by name glob (every even machine, db{n}, joins one or two
# name groups; every odd one its rule's group).
ALLOW_POLICY = (
    _COMMON.replace(
        'subdomain = "web{n}"\n',
        'subdomain = "web{n}"\n'
        'allow = [{ to = "db*.y", ports = ["tcp/22"] }, { to = "y", ports = ["udp/5353"] }]\n',
    )
    + """
[domains.x]
pool = "10.64.0.0/16"
members_reach = false
services = ["dns", "icmp"]
allow = [
  { to = "y", ports = ["tcp/443", "tcp/8000-8100"] },
  { to = "x", ports = ["tcp/22", "icmp"] },
  { to = "internet", ports = ["tcp/80", "tcp/443", "udp/53"] },
  { to = "203.0.113.0/24" },
  { to = "db1*.y", ports = ["tcp/5432"] },
]
[domains.y]
pool = "10.65.0.0/16"
services = ["dns", "icmp"]
allow = [{ to = "internet", ports = ["tcp/443"] }]
"""
)
POLICIES = {"hub": HUB_POLICY, "bridge": BRIDGE_POLICY, "allow": ALLOW_POLICY}

BRIDGE_INDEX = 1_000_000  # synthesized ifindexes, far from real ones


def _mac(i: int) -> str:
    return "52:54:" + ":".join(f"{i >> s & 255:02x}" for s in (24, 16, 8, 0))


def _port(i: int) -> inv.Link:
    return inv.Link(BRIDGE_INDEX + 1 + i, f"vnet{i}", "tun", BRIDGE_INDEX, True, None)


def _check_admitted(rec: Reconciler, mac: str, state: Path, hub: bool) -> None:
    """Everything an admission promises, read back from where it lives (once
    per size, not timed): the elements in the kernel's sets, the reservation
    file, and in a hub domain the key file and the peer on the hub device."""
    m = rec.applied[mac]
    pstate = rec.applied_policy
    assert pstate is not None
    base = flatten(pstate, ()).sets
    kernel = rec.nft.read(pstate.shape).sets
    for key, elements in flatten(pstate, [m]).sets.items():
        missing = elements - base.get(key, frozenset()) - kernel.get(key, frozenset())
        assert not missing, f"{mac}: not in the kernel's {key}: {sorted(map(str, missing))[:3]}"
    assert (state / "dhcp" / "hosts" / mac.replace(":", "-")).exists(), "no reservation"
    if hub:
        import base64

        assert m.peer is not None, f"{mac}: admitted without a hub peer"
        key_file = state / "keys" / "machines" / f"{mac.replace(':', '-')}.key"
        assert key_file.stat().st_mode & 0o777 == 0o600, "no tunnel key (0600)"
        from controller.drivers.tunnels import Tunnels

        assert isinstance(rec.tunnels, Tunnels) and pstate.hub is not None
        peers = rec.tunnels.wg.get(pstate.hub.interface).peers
        assert base64.b64decode(m.peer.public_key) in peers, f"{mac}: not a peer of the hub"


def measure(variant: str, size: int, runs: int, rebuilds: int, work: Path) -> dict:
    from common.wireguard import detect
    from controller.drivers.addresses import Addresses
    from controller.drivers.nft import Nft
    from controller.drivers.tunnels import Tunnels
    from controller.reconcile import Reconciler

    policy = parse_policy(POLICIES[variant].encode(), f"bench-{variant}")
    hub = policy.hub is not None
    state = work / f"{variant}-{size}"
    state.mkdir(mode=0o700)
    addresses = Addresses()
    tunnels = None
    if hub:
        wgdir = state / "wireguard"
        wgdir.mkdir(mode=0o700)
        backend = detect(wgdir, log_dir=wgdir)  # the kernel module in production
        tunnels = Tunnels(lambda: backend, addresses.ipr, state)
    rec = Reconciler(policy, state, nft=Nft(), addresses=addresses, dnsmasq=None, tunnels=tunnels)
    try:
        bridge = inv.Link(BRIDGE_INDEX, "virbr0", "bridge", None, True, None)
        links = (bridge, *(_port(i) for i in range(size)))
        fdb = tuple(inv.Fdb(_mac(i), BRIDGE_INDEX + 1 + i, False) for i in range(size))
        t0 = time.perf_counter()
        rec.observe(inv.Snapshot(links, fdb))
        rec.reconcile()  # first sync: allocates, makes keys, writes everything
        start = time.perf_counter() - t0
        assert len(rec.applied) == size, (len(rec.applied), size)
        assert rec.stats.errors == 0, rec.stats.last_error
        if hub:
            assert all(m.peer is not None for m in rec.applied.values())

        admit: list[float] = []
        for k in range(runs):
            i = size + 1 + k
            port, mac = _port(i), _mac(i)
            t0 = time.perf_counter()
            rec.observe(inv.LinkUp(port))
            rec.observe(inv.FdbUp(inv.Fdb(mac, port.index, False)))
            rec.reconcile()
            admit.append(time.perf_counter() - t0)
            assert mac in rec.applied, "the machine was not admitted"
            assert rec.stats.errors == 0 and not rec.force_rebuild, rec.stats.last_error
            assert (state / "dhcp" / "hosts" / mac.replace(":", "-")).exists()
            if k == 0:
                _check_admitted(rec, mac, state, hub)
            # take it away again (not timed) so that every admission sees `size` machines
            rec.observe(inv.FdbGone(mac, port.index))
            rec.observe(inv.LinkGone(port.index))
            rec.reconcile()
            assert mac not in rec.applied and len(rec.applied) == size
        if tunnels is not None and policy.hub is not None:  # every peer added was taken away
            peers = len(tunnels.wg.get(policy.hub.interface).peers)
            assert peers == size, f"the hub holds {peers} peers, not {size}"

        full: list[float] = []
        nft_only: list[float] = []
        for _ in range(rebuilds):
            rec.request_rebuild()
            t0 = time.perf_counter()
            rec.reconcile()
            full.append(time.perf_counter() - t0)
            assert len(rec.applied) == size and rec.stats.errors == 0, rec.stats.last_error
            # the nftables part alone: the whole ruleset in one transaction
            pstate = rec.applied_policy
            assert pstate is not None
            desired = flatten(pstate, rec.applied.values())
            t0 = time.perf_counter()
            rec.nft.rebuild(pstate.shape, desired.sets)
            nft_only.append(time.perf_counter() - t0)
    finally:
        rec.store.close()
        if tunnels is not None and policy.hub is not None:
            with contextlib.suppress(Exception):
                tunnels.wg.remove(policy.hub.interface)  # stops its wireguard-go
    return {
        "start_s": round(start, 2),
        "admit": summary(admit),
        "rebuild": summary(full),
        "rebuild_nft_only": summary(nft_only),
    }


def run_inside(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "link", "add", "virbr0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", "virbr0", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="dom0-bench-"))
    out: dict[str, dict] = {variant: {} for variant in POLICIES}
    try:
        for size in sizes:
            for variant in POLICIES:
                print(f"bench: {variant} policy, {size} machines ...", file=sys.stderr, flush=True)
                out[variant][str(size)] = measure(variant, size, args.runs, args.rebuilds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def ratios(result: dict, sizes: list[int]) -> dict:
    """Medians over medians, measured in this one run."""
    lo, hi = str(min(sizes)), str(max(sizes))
    out: dict = {}
    peer = result["firewalld"].get("sizes")
    for variant in POLICIES:
        r = result[variant]["sizes"]
        if lo != hi:
            out[f"{variant}_admit_{hi}_over_{lo}"] = ratio(
                r[hi]["admit"]["median_ms"], r[lo]["admit"]["median_ms"]
            )
        out[f"{variant}_rebuild_over_admit_at_{hi}"] = ratio(
            r[hi]["rebuild"]["median_ms"], r[hi]["admit"]["median_ms"], 1
        )
    for variant in ("hub", "allow"):
        out[f"{variant}_over_bridge"] = {
            n: ratio(
                result[variant]["sizes"][n]["admit"]["median_ms"],
                result["bridge"]["sizes"][n]["admit"]["median_ms"],
            )
            for n in map(str, sizes)
        }
    if peer:
        for what, label in (("admit", ""), ("admit_mac", "_mac")):
            if lo != hi:
                out[f"firewalld{label}_admit_{hi}_over_{lo}"] = ratio(
                    peer[hi][what]["median_ms"], peer[lo][what]["median_ms"]
                )
            out[f"dom0_over_firewalld{label}"] = {
                variant: {
                    n: ratio(
                        result[variant]["sizes"][n]["admit"]["median_ms"],
                        peer[n][what]["median_ms"],
                        3,
                    )
                    for n in map(str, sizes)
                }
                for variant in POLICIES
            }
    return out


def _ms(s: dict) -> str:
    label, value = tail(s)
    return f"{s['median_ms']:.2f} / {value:.2f} ms ({label}, n={s['runs']})"


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, {m['nftables']}",
        "admission: median / tail; rebuild: median; nft part: the one transaction alone",
    ]
    peer = result["firewalld"]
    for variant in POLICIES:
        lines.append(f"{variant} policy:")
        for size, r in result[variant]["sizes"].items():
            lines.append(
                f"  {size:>6} present: admit {_ms(r['admit'])}, rebuild "
                f"{r['rebuild']['median_ms']:.1f} ms, nft part "
                f"{r['rebuild_nft_only']['median_ms']:.1f} ms"
            )
    if "sizes" in peer:
        lines.append(f"firewalld {peer['version']} ({peer['backend']}), one ipset entry:")
        for size, r in peer["sizes"].items():
            lines.append(
                f"  {size:>6} present: {peer['ipsets']['admit']} {_ms(r['admit'])}; "
                f"{peer['ipsets']['admit_mac']} {_ms(r['admit_mac'])}"
            )
    else:
        lines.append(f"firewalld: not measured: {peer['unavailable']}")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.sizes, at_least=1, at_most=200_000)
    if sizes is None or len(set(sizes)) != len(sizes):
        print(
            "dom0 bench reconcile: --sizes: expected distinct comma-separated counts 1..200000",
            file=sys.stderr,
        )
        return 2
    if args.runs < 1 or args.rebuilds < 1:
        print("dom0 bench reconcile: --runs/--rebuilds: expected positive counts", file=sys.stderr)
        return 2
    if os.environ.get("DOM0_BENCH_INSIDE") == "1":
        print(json.dumps(run_inside(args)))
        return 0
    ns = f"dom0bench-{os.getpid()}-{secrets.token_hex(2)}"
    from controller.lab import netns

    netns.create([ns])
    try:
        child = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "controller.cli",
                "bench",
                "reconcile",
                "--sizes",
                args.sizes,
                "--runs",
                str(args.runs),
                "--rebuilds",
                str(args.rebuilds),
            ],
            env={**os.environ, "DOM0_BENCH_INSIDE": "1"},
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        delete_namespace(ns)  # and whatever still runs in it (a hub's wireguard-go)
    if child.returncode != 0:
        print("dom0 bench reconcile: the benchmark failed (see above)", file=sys.stderr)
        return 1
    dom0 = json.loads(child.stdout.strip().splitlines()[-1])
    print("bench: firewalld, the same sizes ...", file=sys.stderr, flush=True)
    peer = firewalld.measure(sizes, args.runs)
    result: dict = {
        "benchmark": "reconcile",
        "machine": machine_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": args.runs,
        "rebuilds": args.rebuilds,
        "hub": {"policy": "policies/lab.toml's shape", "sizes": dom0["hub"]},
        "bridge": {"policy": "policies/lab-bridge.toml's shape", "sizes": dom0["bridge"]},
        "allow": {
            "policy": "the bridge shape with allow lists (ports, a rule's grant, name globs)",
            "sizes": dom0["allow"],
        },
        "firewalld": peer,
    }
    result["ratios"] = ratios(result, sizes)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
