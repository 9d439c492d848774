"""`dom0 bench reconcile`: what admitting one machine costs, and a full
rebuild, with 10, 1,000 and 10,000 machines already present.

Runs against real nftables in a network namespace it creates (and deletes):
the command re-executes itself inside it. Machines are synthesized as
netlink events (a new bridge port, then its MAC learned in the FDB): the
measured path is the controller's own from event in to nftables elements
committed and the DHCP reservation file in place. One run, one machine:
report ratios, not absolute numbers, across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from controller.bench.common import machine_info, parse_sizes, summary
from controller.core import inventory as inv
from controller.core.plan import flatten
from controller.policy.load import parse_policy

BENCH_POLICY = """
[site]
tld = "internal"
[bridge]
name = "virbr0"
[domains.bench]
pool = "10.64.0.0/14"
members_reach = true
services = ["dns", "icmp"]
[[rules]]
name = "vm"
domain = "bench"
subdomain = "vm{n}"
match.mac = "52:54:*"
"""

BRIDGE_INDEX = 1_000_000  # synthesized ifindexes, far from real ones


def _mac(i: int) -> str:
    return "52:54:" + ":".join(f"{i >> s & 255:02x}" for s in (24, 16, 8, 0))


def _port(i: int) -> inv.Link:
    return inv.Link(BRIDGE_INDEX + 1 + i, f"vnet{i}", "tun", BRIDGE_INDEX, True, None)


def measure(size: int, runs: int, rebuilds: int, work: Path) -> dict:
    from controller.drivers.addresses import Addresses
    from controller.drivers.nft import Nft
    from controller.reconcile import Reconciler

    policy = parse_policy(BENCH_POLICY.encode(), "bench")
    state = work / f"state-{size}"
    rec = Reconciler(policy, state, nft=Nft(), addresses=Addresses(), dnsmasq=None)
    bridge = inv.Link(BRIDGE_INDEX, "virbr0", "bridge", None, True, None)
    links = (bridge, *(_port(i) for i in range(size)))
    fdb = tuple(inv.Fdb(_mac(i), BRIDGE_INDEX + 1 + i, False) for i in range(size))
    rec.observe(inv.Snapshot(links, fdb))
    rec.reconcile()  # first sync: allocates and writes everything
    assert len(rec.applied) == size, (len(rec.applied), size)

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
        assert (state / "dhcp" / "hosts" / mac.replace(":", "-")).exists()
        # take it away again (not measured) so every admission sees `size` machines
        rec.observe(inv.FdbGone(mac, port.index))
        rec.observe(inv.LinkGone(port.index))
        rec.reconcile()
        assert mac not in rec.applied

    full: list[float] = []
    nft_only: list[float] = []
    for _ in range(rebuilds):
        rec.request_rebuild()
        t0 = time.perf_counter()
        rec.reconcile()
        full.append(time.perf_counter() - t0)
        assert len(rec.applied) == size
        # the nftables part alone: the whole ruleset in one transaction
        pstate = rec.applied_policy
        assert pstate is not None
        desired = flatten(pstate, rec.applied.values())
        t0 = time.perf_counter()
        rec.nft.rebuild(desired.shape, desired.sets)  # type: ignore[arg-type]
        nft_only.append(time.perf_counter() - t0)
    rec.store.close()
    return {
        "admit": summary(admit),
        "rebuild": summary(full),
        "rebuild_nft_only": summary(nft_only),
    }


def run_inside(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    subprocess.run(["ip", "link", "add", "virbr0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", "virbr0", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="dom0-bench-"))
    try:
        results = {}
        for size in sizes:
            print(f"bench: {size} machines ...", file=sys.stderr, flush=True)
            results[str(size)] = measure(size, args.runs, args.rebuilds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lo, hi = str(min(sizes)), str(max(sizes))
    return {
        "benchmark": "reconcile",
        "machine": machine_info(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sizes": results,
        "ratios": {
            f"admit_{hi}_over_{lo}": round(
                results[hi]["admit"]["median_ms"] / results[lo]["admit"]["median_ms"], 2
            ),
            f"rebuild_over_admit_at_{hi}": round(
                results[hi]["rebuild"]["median_ms"] / results[hi]["admit"]["median_ms"], 1
            ),
        },
    }


def table(result: dict) -> str:
    lines = [
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"kernel {result['machine']['kernel']}, {result['machine']['nftables']}",
        f"{'present':>8}  {'admit median':>12}  {'admit p99':>9}  {'rebuild median':>14}  "
        f"{'rebuild p99':>11}  {'nft part':>8}",
    ]
    for size, r in result["sizes"].items():
        lines.append(
            f"{size:>8}  {r['admit']['median_ms']:>10.2f}ms  {r['admit']['p99_ms']:>7.2f}ms  "
            f"{r['rebuild']['median_ms']:>12.1f}ms  {r['rebuild']['p99_ms']:>9.1f}ms  "
            f"{r['rebuild_nft_only']['median_ms']:>6.1f}ms"
        )
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    if parse_sizes(args.sizes, at_least=1, at_most=200_000) is None:
        print(
            "dom0 bench reconcile: --sizes: expected comma-separated counts 1..200000",
            file=sys.stderr,
        )
        return 2
    if args.runs < 1 or args.rebuilds < 1:
        print("dom0 bench reconcile: --runs/--rebuilds: expected positive counts", file=sys.stderr)
        return 2
    if os.environ.get("DOM0_BENCH_INSIDE") == "1":
        result = run_inside(args)
        print(json.dumps(result))
        return 0
    ns = f"dom0bench-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
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
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    if child.returncode != 0:
        print("dom0 bench reconcile: the benchmark failed (see above)", file=sys.stderr)
        return 1
    result = json.loads(child.stdout.strip().splitlines()[-1])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
