"""The userspace WireGuard backend against real wireguard-go, in namespaces made here.

The driver always runs in a subprocess under `ip netns exec` (the script below,
fed JSON operations on stdin), never in this process: pytest stays in the root
namespace, and nothing is done there. Each subprocess is a "controller": the
daemons it starts outlive it, which is what adoption is about. Namespaces come
from `make_netns`, whose teardown kills whatever is left inside (also when a
test fails); the tests also check that `remove` leaves nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.wireguard import keys

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go"),
]

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MakeNetns = Callable[[str], str]

# One "controller" run: argv[1] is its state dir; stdin is a JSON list of operations;
# stdout is a JSON list of {"result": ..., "ms": ...} or {"error": type, "message": ...}.
DRIVER = r"""
import base64, hashlib, json, os, stat, sys, time
from pathlib import Path
from common.wireguard import Peer, WireGuardError, detect, load_or_create, kernel, netlink

state = Path(sys.argv[1])
wg = detect(state / "wireguard", log_dir=state / "log", prefer="userspace")
b64 = lambda k: base64.b64encode(k).decode()
unb64 = base64.b64decode

def gen(i):
    return Peer(hashlib.sha256(b"peer%d" % i).digest(), (f"10.201.{i // 256}.{i % 256}/32",))

def peers(specs):
    out = []
    for s in specs:
        if "gen" in s:
            out += [gen(i) for i in range(*s["gen"])]
        else:
            out.append(Peer(unb64(s["key"]), tuple(s.get("ips", ())), s.get("endpoint"), s.get("keepalive")))
    return out

def device(d):
    return {
        "public_key": d.public_key and b64(d.public_key),
        "listen_port": d.listen_port,
        "fwmark": d.fwmark,
        "peers": {
            b64(k): {"ips": list(s.peer.allowed_ips), "endpoint": s.peer.endpoint,
                     "keepalive": s.peer.persistent_keepalive, "handshake": s.last_handshake,
                     "rx": s.rx_bytes, "tx": s.tx_bytes}
            for k, s in d.peers.items()
        },
    }

def run(op, name, arg=None):
    if op == "ensure":
        return wg.ensure(name)
    if op == "remove":
        return wg.remove(name)
    if op == "key":
        path = state / "keys" / f"{name}.key"
        k = load_or_create(path)
        return {"public": b64(k.public), "mode": stat.S_IMODE(path.stat().st_mode),
                "dir_mode": stat.S_IMODE(path.parent.stat().st_mode), "repr": repr(k)}
    if op == "configure":
        k = load_or_create(state / "keys" / f"{name}.key")
        return wg.configure(name, private_key=k, listen_port=arg.get("port"), fwmark=arg.get("fwmark"))
    if op == "set_peers":
        return wg.set_peers(name, peers(arg.get("upsert", [])), [unb64(k) for k in arg.get("remove", [])])
    if op == "replace_peers":
        return wg.replace_peers(name, peers(arg))
    if op == "get":
        return device(wg.get(name))
    if op == "count":
        return len(wg.get(name).peers)
    if op == "record":
        r = wg.record(name)
        return r and {"pid": r.pid, "start": r.start}
    if op == "kernel_probe":
        kw = kernel.KernelWireGuard()
        out = {"detect": detect(state / "wg2").kind, "nlctrl": netlink.resolve_family("nlctrl"),
               "available": kernel.available(), "link": kw._link(name)}
        for what, call in (("ensure", kw.ensure), ("remove", kw.remove)):
            try:
                call(name)
            except WireGuardError as e:
                out[what] = [type(e).__name__, str(e)]
        return out
    raise ValueError(op)

out = []
for op, name, *arg in json.load(sys.stdin):
    t = time.perf_counter()
    try:
        res = {"result": run(op, name, *arg)}
    except WireGuardError as e:
        res = {"error": type(e).__name__, "message": str(e)}
    res["ms"] = (time.perf_counter() - t) * 1000
    out.append(res)
json.dump(out, sys.stdout)
"""


def gen_key(i: int) -> str:
    return base64.b64encode(hashlib.sha256(b"peer%d" % i).digest()).decode()


def sh(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def driver(ns: str, state: Path, *ops: list[Any]) -> list[dict[str, Any]]:
    """Run the driver as a fresh controller process inside `ns`."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, PY, "-c", DRIVER, str(state)],
        input=json.dumps(ops),
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=ROOT,
    )
    if out.returncode:
        raise AssertionError(f"driver in {ns} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def ok(results: list[dict[str, Any]]) -> list[Any]:
    for r in results:
        assert "error" not in r, r
    return [r["result"] for r in results]


def daemons(ns: str) -> list[int]:
    """PIDs of wireguard-go processes in `ns` (zombies excluded)."""
    pids = []
    for pid in sh("ip", "netns", "pids", ns).split():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if comm == "wireguard-go" and state != "Z":
            pids.append(int(pid))
    return pids


def has_link(ns: str, name: str) -> bool:
    return (
        subprocess.run(["ip", "-n", ns, "link", "show", name], capture_output=True).returncode == 0
    )


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_two_namespaces_each_run_their_own_wg0(make_netns: MakeNetns, tmp_path: Path) -> None:
    """The private tmpfs over /run/wireguard: two `wg0` daemons at once."""
    runs = {}
    for tag in ("a", "b"):
        ns = make_netns("wg")
        res = driver(
            ns,
            tmp_path / tag,
            ["ensure", "wg0"],
            ["configure", "wg0", {"port": 51820}],
            ["record", "wg0"],
            ["get", "wg0"],
            ["key", "wg0"],
        )
        print(f"\nwireguard-go started and answering (ensure) in {ns}: {res[0]['ms']:.1f} ms")
        runs[tag] = (ns, *ok(res))
    (ns_a, new_a, _, rec_a, dev_a, key_a), (ns_b, new_b, _, rec_b, dev_b, key_b) = (
        runs["a"],
        runs["b"],
    )
    assert new_a and new_b and rec_a["pid"] != rec_b["pid"]
    assert daemons(ns_a) == [rec_a["pid"]] and daemons(ns_b) == [rec_b["pid"]]  # both still running
    for ns, rec, dev, key in ((ns_a, rec_a, dev_a, key_a), (ns_b, rec_b, dev_b, key_b)):
        assert has_link(ns, "wg0")
        # each daemon sits in its namespace, its socket in its own private tmpfs
        assert os.stat(f"/proc/{rec['pid']}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
        assert os.listdir(f"/proc/{rec['pid']}/root/run/wireguard") == ["wg0.sock"]
        assert dev["public_key"] == key["public"] and dev["listen_port"] == 51820
    assert dev_a["public_key"] != dev_b["public_key"]
    assert not os.path.exists("/run/wireguard/wg0.sock")  # nothing in the shared directory
    for ns, tag in ((ns_a, "a"), (ns_b, "b")):
        ok(driver(ns, tmp_path / tag, ["remove", "wg0"]))
        assert daemons(ns) == [] and not has_link(ns, "wg0")


def test_private_key_file_is_0600_and_configures_the_device(
    make_netns: MakeNetns, tmp_path: Path
) -> None:
    ns = make_netns("wg")
    key, _, _, dev = ok(
        driver(
            ns,
            tmp_path,
            ["key", "wg0"],
            ["ensure", "wg0"],
            ["configure", "wg0", {}],
            ["get", "wg0"],
        )
    )
    path = tmp_path / "keys" / "wg0.key"
    assert key["mode"] == 0o600 and key["dir_mode"] == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert (
        keys.to_base64(keys.public_of(keys.from_base64(secret)))
        == key["public"]
        == dev["public_key"]
    )
    assert secret not in key["repr"] and key["public"] in key["repr"]
    # a random port was chosen by the daemon and is kept by later configure calls
    port = dev["listen_port"]
    assert port
    (dev2,) = ok(driver(ns, tmp_path, ["configure", "wg0", {"fwmark": 0x51}], ["get", "wg0"]))[1:]
    assert dev2["listen_port"] == port and dev2["fwmark"] == 0x51
    path.chmod(0o644)
    (res,) = driver(ns, tmp_path, ["configure", "wg0", {}])
    assert (
        res["error"] == "KeyFileError" and "0644" in res["message"] and str(path) in res["message"]
    )
    ok(driver(ns, tmp_path, ["remove", "wg0"]))


def test_two_devices_exchange_traffic_through_the_tunnel(
    make_netns: MakeNetns, tmp_path: Path
) -> None:
    a, b = make_netns("wga"), make_netns("wgb")
    sh("ip", "-n", a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", b)
    for ns, last in ((a, 1), (b, 2)):
        sh("ip", "-n", ns, "addr", "add", f"172.31.0.{last}/24", "dev", "veth0")
        sh("ip", "-n", ns, "link", "set", "veth0", "up")
    ka = ok(driver(a, tmp_path / "a", ["key", "wg0"]))[0]["public"]
    kb = ok(driver(b, tmp_path / "b", ["key", "wg0"]))[0]["public"]
    # both ends configured before any traffic (see MACHINE-NOTES: keepalive before the peer knows us)
    for ns, state, other, last, other_last in ((a, "a", kb, 1, 2), (b, "b", ka, 2, 1)):
        peer = {
            "key": other,
            "ips": [f"10.200.0.{other_last}/32"],
            "endpoint": f"172.31.0.{other_last}:51820",
        }
        ok(
            driver(
                ns,
                tmp_path / state,
                ["ensure", "wg0"],
                ["configure", "wg0", {"port": 51820}],
                ["set_peers", "wg0", {"upsert": [peer]}],
            )
        )
        sh("ip", "-n", ns, "addr", "add", f"10.200.0.{last}/24", "dev", "wg0")
        sh("ip", "-n", ns, "link", "set", "wg0", "up")
    sh("ip", "netns", "exec", a, "busybox", "ping", "-c", "2", "-W", "2", "10.200.0.2")
    (dev,) = ok(driver(a, tmp_path / "a", ["get", "wg0"]))
    st = dev["peers"][kb]
    assert (
        st["handshake"] and st["rx"] > 0 and st["tx"] > 0 and st["endpoint"] == "172.31.0.2:51820"
    )
    for ns, state in ((a, "a"), (b, "b")):
        ok(driver(ns, tmp_path / state, ["remove", "wg0"]))
        assert daemons(ns) == []


def test_many_peers_get_complete_and_incremental_changes(
    make_netns: MakeNetns, tmp_path: Path
) -> None:
    ns = make_netns("wg")
    n = 2100
    res = driver(
        ns,
        tmp_path,
        ["ensure", "hub"],
        ["replace_peers", "hub", [{"gen": [0, n]}]],
        ["get", "hub"],
        ["set_peers", "hub", {"upsert": [{"gen": [n, n + 1]}], "remove": [gen_key(7)]}],
        ["get", "hub"],
    )
    before, after = res[2]["result"], res[4]["result"]
    print(
        f"\nreplace_peers {n} peers: {res[1]['ms']:.0f} ms; get with {n} peers: {res[2]['ms']:.0f} ms"
    )
    assert set(before["peers"]) == {gen_key(i) for i in range(n)}
    assert before["peers"][gen_key(2099)]["ips"] == ["10.201.8.51/32"]
    # one added, one removed, every other peer exactly as before
    assert set(after["peers"]) == (set(before["peers"]) - {gen_key(7)}) | {gen_key(n)}
    assert all(after["peers"][k] == v for k, v in before["peers"].items() if k != gen_key(7))
    ok(driver(ns, tmp_path, ["remove", "hub"]))


def test_one_peer_add_with_10_vs_1000_peers_present(make_netns: MakeNetns, tmp_path: Path) -> None:
    """Cost follows change: timed, printed, not asserted (shared 2-core machines)."""
    ns = make_netns("wg")
    ops: list[list[Any]] = [["ensure", "hub"]]
    for present in (10, 1000):
        ops.append(["replace_peers", "hub", [{"gen": [0, present]}]])
        ops += [["set_peers", "hub", {"upsert": [{"gen": [5000 + j, 5001 + j]}]}] for j in range(5)]
        ops.append(["count", "hub"])
    res = ok_timed(driver(ns, tmp_path, *ops))
    small = sorted(r["ms"] for r in res[2:7])
    large = sorted(r["ms"] for r in res[9:14])
    assert res[7]["result"] == 15 and res[14]["result"] == 1005
    print(
        f"\none peer add, median of 5: {small[2]:.2f} ms with 10 peers, {large[2]:.2f} ms with 1000 peers"
    )
    ok(driver(ns, tmp_path, ["remove", "hub"]))


def ok_timed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok(results)
    return results


def test_a_new_controller_adopts_the_running_daemon(make_netns: MakeNetns, tmp_path: Path) -> None:
    ns = make_netns("wg")
    peer = {"key": gen_key(1), "ips": ["10.200.0.2/32"]}
    first = ok(
        driver(
            ns,
            tmp_path,
            ["ensure", "wg0"],
            ["configure", "wg0", {"port": 51821}],
            ["set_peers", "wg0", {"upsert": [peer]}],
            ["record", "wg0"],
        )
    )
    assert first[0] is True
    # the first controller process has exited; its daemon runs on
    second = ok(driver(ns, tmp_path, ["ensure", "wg0"], ["record", "wg0"], ["get", "wg0"]))
    assert second[0] is False and second[1] == first[3]
    assert daemons(ns) == [first[3]["pid"]]
    assert second[2]["listen_port"] == 51821 and list(second[2]["peers"]) == [gen_key(1)]
    # two controllers starting at the same moment still make one daemon
    ns2 = make_netns("wg")
    procs = [
        subprocess.Popen(
            ["ip", "netns", "exec", ns2, PY, "-c", DRIVER, str(tmp_path / "race")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    outs = [
        json.loads(p.communicate(json.dumps([["ensure", "wg0"]]), timeout=60)[0]) for p in procs
    ]
    assert sorted(o[0]["result"] for o in outs) == [False, True]
    assert len(daemons(ns2)) == 1
    for n, state in ((ns, tmp_path), (ns2, tmp_path / "race")):
        ok(driver(n, state, ["remove", "wg0"]))
        assert (
            daemons(n) == []
            and not has_link(n, "wg0")
            and not (state / "wireguard" / "wg0.json").exists()
        )


def test_a_killed_daemon_is_started_again(make_netns: MakeNetns, tmp_path: Path) -> None:
    ns = make_netns("wg")
    _, _, rec = ok(
        driver(
            ns,
            tmp_path,
            ["ensure", "wg0"],
            ["set_peers", "wg0", {"upsert": [{"gen": [0, 3]}]}],
            ["record", "wg0"],
        )
    )
    os.kill(rec["pid"], signal.SIGKILL)  # our daemon, in our test namespace
    assert wait_until(lambda: not has_link(ns, "wg0"))  # the tun goes with it
    res = driver(
        ns,
        tmp_path,
        ["get", "wg0"],
        ["ensure", "wg0"],
        ["record", "wg0"],
        ["get", "wg0"],
        ["ensure", "wg0"],
    )
    assert res[0]["error"] == "DeviceNotFound"
    assert res[1]["result"] is True and res[2]["result"]["pid"] != rec["pid"]
    assert res[3]["result"]["peers"] == {}  # a new daemon is empty: ensure said so
    assert res[4]["result"] is False
    assert daemons(ns) == [res[2]["result"]["pid"]] and has_link(ns, "wg0")
    ok(driver(ns, tmp_path, ["remove", "wg0"]))
    assert daemons(ns) == []


def test_kernel_backend_here_and_foreign_interfaces(make_netns: MakeNetns, tmp_path: Path) -> None:
    """No WireGuard module on this machine: detect picks wireguard-go, the kernel backend
    says so clearly; its netlink plumbing still talks to the real kernel (genetlink
    controller, rtnetlink link lookup). And neither backend touches an interface of
    the wanted name that is not its own."""
    ns = make_netns("wg")
    sh("ip", "-n", ns, "link", "add", "wg1", "type", "bridge")
    probe, userspace = driver(ns, tmp_path, ["kernel_probe", "wg1"], ["ensure", "wg1"])
    p = probe["result"]
    assert p["detect"] == "userspace" and p["nlctrl"] == 16 and p["available"] is False
    assert p["link"][1] == "bridge"
    assert p["ensure"][0] == "WireGuardError" and "not touching it" in p["ensure"][1]
    assert p["remove"][0] == "WireGuardError"
    assert userspace["error"] == "WireGuardError" and "not touching it" in userspace["message"]
    (kp,) = driver(ns, tmp_path, ["kernel_probe", "wgk0"])
    assert kp["result"]["link"] is None
    assert (
        kp["result"]["ensure"][0] == "WireGuardUnavailable"
        and "no WireGuard" in kp["result"]["ensure"][1]
    )
    assert has_link(ns, "wg1") and daemons(ns) == []
