"""`dom0 bench wireguard`: what the hub costs.

- adding one peer to the hub with 10 and with 1,000 peers present (dom0's
  driver, one UAPI transaction to wireguard-go);
- the first packet through a fresh peer: both ends configured, then the time
  until a UDP echo comes back through the tunnel (the handshake included);
- TCP throughput from a VM to the internet echo host: through the hub and
  dom0's uplink (two tunnels, as the lab's default policy has it) as a ratio
  to the same path without tunnels (policies/lab-bridge.toml, no uplink).

Everything runs in network namespaces it creates and deletes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from common.wireguard import keys
from controller.bench.common import delete_namespace, machine_info, parse_sizes, summary, tail

PY = sys.executable


class Worker:
    """A wgworker in a namespace, driven by JSON lines."""

    def __init__(self, ns: str, role: str, state: Path) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PY, "-m", "controller.bench.wgworker", role, str(state)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.first = self._read()

    def _read(self) -> dict:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        line = out.readline()
        if not line:
            raise RuntimeError("bench worker died")
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict:
        inp: IO[str] = self.proc.stdin  # type: ignore[assignment]
        inp.write(json.dumps(cmd) + "\n")
        inp.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, BrokenPipeError, OSError):
            self.ask(op="quit")
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _ns(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def peers_and_first_packet(sizes: list[int], runs: int) -> dict:
    tag = f"wgb{os.getpid() % 10000}{secrets.token_hex(2)}"
    hub_ns, cli_ns = f"{tag}-hub", f"{tag}-cli"
    work = Path(tempfile.mkdtemp(prefix="dom0-wgbench-"))
    workers: list[Worker] = []
    try:
        from controller.lab import netns

        netns.create([hub_ns, cli_ns])
        _ns(
            "link",
            "add",
            "wh",
            "netns",
            hub_ns,
            "type",
            "veth",
            "peer",
            "name",
            "wc",
            "netns",
            cli_ns,
        )
        _ns("-n", hub_ns, "addr", "add", "172.31.0.1/24", "dev", "wh")
        _ns("-n", cli_ns, "addr", "add", "172.31.0.2/24", "dev", "wc")
        for ns, dev in ((hub_ns, "wh"), (cli_ns, "wc")):
            _ns("-n", ns, "link", "set", dev, "up")
            _ns("-n", ns, "link", "set", "lo", "up")
        hub = Worker(hub_ns, "hub", work / "hub")
        workers.append(hub)
        client = Worker(cli_ns, "client", work / "client")
        workers.append(client)
        add: dict[str, Any] = {}
        for n in sizes:
            hub.ask(op="fill", n=n)
            times = []
            for _ in range(runs):
                key = keys.to_base64(keys.PrivateKey.generate().public)
                times.append(hub.ask(op="add", key=key, allowed="10.98.0.1/32")["seconds"])
                hub.ask(op="remove", key=key)
            add[str(n)] = summary(times)
        first = []
        for _ in range(max(5, runs // 10)):
            pub = client.ask(op="setup", hub=hub.first["public_key"], endpoint="172.31.0.1:51821")
            hub.ask(op="add", key=pub["public_key"], allowed="10.99.0.2/32")
            got = client.ask(op="probe")["seconds"]
            hub.ask(op="remove", key=pub["public_key"])
            if got is not None:
                first.append(got)
        return {"add_peer": add, "first_packet": summary(first) if first else None}
    finally:
        for w in workers:
            w.close()
        for ns in (hub_ns, cli_ns):
            delete_namespace(ns)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def throughput(seconds: int) -> dict:
    from controller.lab import build, netns, processes, teardown, topology

    root = Path(__file__).resolve().parents[2]
    results = {}
    for label, policy, with_uplink in (
        ("tunnels", root / "policies" / "lab.toml", True),
        ("plain", root / "policies" / "lab-bridge.toml", False),
    ):
        name = f"wgt{os.getpid() % 10000}{secrets.token_hex(2)}"
        try:
            lab = build.create(name, 1, policy=policy, with_uplink=with_uplink)
            argv = netns.exec_argv(lab.wan_ns, ["iperf3", "-s", "-B", topology.ECHO_ADDRESS, "-1"])
            _, proc = processes.spawn(argv, log=lab.logs_dir / "iperf3.log")
            lab.record_process("iperf3@wan", proc, lab.wan_ns, argv)
            time.sleep(0.3)
            out = netns.run(
                lab.vm_ns(1),
                ["iperf3", "-c", topology.ECHO_ADDRESS, "-t", str(seconds), "-J"],
                timeout=seconds + 30,
            ).stdout
            end = json.loads(out)["end"]
            results[label] = round(end["sum_received"]["bits_per_second"] / 1e6, 1)
        finally:
            with teardown.shielded():
                teardown.down(name)
    return {
        "mbit_per_s": results,
        "ratio_tunnels_over_plain": round(results["tunnels"] / results["plain"], 3),
    }


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}"]
    for n, s in result["add_peer"].items():
        label, v = tail(s)
        lines.append(
            f"add one hub peer with {n:>5} present: median {s['median_ms']:.3f} ms, "
            f"{label} {v:.3f} ms (n={s['runs']})"
        )
    fp = result["first_packet"]
    if fp:
        label, v = tail(fp)
        lines.append(
            f"first packet through a fresh peer (handshake included): median "
            f"{fp['median_ms']:.2f} ms, {label} {v:.2f} ms (n={fp['runs']})"
        )
    t = result.get("throughput")
    if t:
        lines.append(
            f"TCP VM -> echo: {t['mbit_per_s']['tunnels']} Mbit/s through hub + uplink, "
            f"{t['mbit_per_s']['plain']} Mbit/s without tunnels: ratio "
            f"{t['ratio_tunnels_over_plain']}"
        )
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.sizes, at_least=2, at_most=20_000)
    if sizes is None:
        print(
            "dom0 bench wireguard: --sizes: expected two or more counts 1..20000", file=sys.stderr
        )
        return 2
    if args.runs < 1 or args.seconds < 1:
        print("dom0 bench wireguard: --runs/--seconds: expected positive numbers", file=sys.stderr)
        return 2
    print("bench: hub peers and first packets ...", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"benchmark": "wireguard", "machine": machine_info()}
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result.update(peers_and_first_packet(sizes, args.runs))
    if not args.no_throughput:
        print("bench: throughput (two labs) ...", file=sys.stderr, flush=True)
        result["throughput"] = throughput(args.seconds)
    lo, hi = str(min(sizes)), str(max(sizes))
    add = result["add_peer"]
    result["ratios"] = {
        f"add_peer_{hi}_over_{lo}": round(add[hi]["median_ms"] / add[lo]["median_ms"], 2)
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0
