"""The peer `dom0 bench reconcile` compares against: firewalld admitting the
same machines into an ipset, the way an operator would do it without dom0.

firewalld is Debian bookworm's (1.3.3, nftables backend), unpacked with
`apt-get download firewalld python3-firewall` + `dpkg -x` into `ROOT`
(scripts/setup does it), never installed: its maintainer scripts would start
it, and its D-Bus, in the root namespace. It runs with Debian's own
`/usr/bin/python3` (python3-dbus, python3-gi) in a network namespace of its
own and a private mount namespace with a tmpfs over /run, beside its own
dbus-daemon whose system bus socket is in that /run. Nothing of it is seen
outside: no polkit there, so firewalld authorizes callers by uid 0 (one bus
round trip, where a polkit check would be one to polkitd).

Admitting a machine is one runtime `ipset.addEntry` call over D-Bus through
firewalld's own client module (`firewall.client.FirewallClient`), timed from
the call to its reply: firewalld answers after its nftables transaction.
Two ipsets, both sources of one zone so that rules use them: by address
(`hash:ip`, what firewalld's zone sources usually are) and by MAC
(`hash:mac`). Each is pre-filled with the same number of present machines
(one `setEntries`), and each new entry is removed again (not timed) so that
every addition sees the same set. The firewall-cmd CLI is not used: a Python
interpreter's start-up per call would be most of what it measured.

    outer half (`measure`, from `dom0 bench reconcile`): the namespace, the
        worker, the clean-up; the answer, or why firewalld could not run.
    worker half (`python3 -m controller.bench.firewalld`, inside): the bus,
        the daemon, the measurement; one JSON object on stdout.

Standard library only at import time: the worker runs under /usr/bin/python3,
outside dom0's venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("DOM0_FIREWALLD_ROOT", "/opt/dom0-bench/firewalld"))
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: python3-dbus and python3-gi live there
ZONE = "dom0bench"
RUN = Path("/run/dom0-bench-firewalld")  # inside the worker's private /run
BUS_SOCKET = "/run/dbus/system_bus_socket"  # the default system bus address
FIREWALLD_NAME = "org.fedoraproject.FirewallD1"
START_TIMEOUT = 60.0

BUS_CONFIG = f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={BUS_SOCKET}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


def address(i: int, base: int = 10 << 24 | 64 << 16) -> str:
    """The i-th machine's address (in 10.64.0.0/14, as dom0's bench pools)."""
    n = base + 1 + i
    return ".".join(str(n >> s & 255) for s in (24, 16, 8, 0))


def mac(i: int) -> str:
    """The i-th machine's MAC, as dom0's bench makes them."""
    return "52:54:" + ":".join(f"{i >> s & 255:02x}" for s in (24, 16, 8, 0))


# What a machine is admitted by: its address (the usual zone source; firewalld
# makes hash:ip an nftables *interval* set and checks a new entry for overlaps
# with every entry present), or its MAC (a plain hash set, no overlap check).
IPSETS = {
    "admit": ("dom0bench", "hash:ip", address),
    "admit_mac": ("dom0benchmac", "hash:mac", mac),
}

ZONE_XML = (
    '<?xml version="1.0" encoding="utf-8"?>\n'
    f'<zone target="ACCEPT"><short>{ZONE}</short>'
    + "".join(f'<source ipset="{name}"/>' for name, _, _ in IPSETS.values())
    + "</zone>\n"
)


# -- the outer half ------------------------------------------------------------------


def unavailable() -> str | None:
    """Why firewalld cannot run here, before trying; None if it may."""
    daemon = ROOT / "usr" / "sbin" / "firewalld"
    if not daemon.exists():
        return (
            f"firewalld is not unpacked in {ROOT} (scripts/setup does it: apt-get download "
            "firewalld python3-firewall, dpkg -x into that directory; or set DOM0_FIREWALLD_ROOT)"
        )
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} (Debian's Python, which firewalld is written for) is missing"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import dbus, dbus.mainloop.glib; from gi.repository import GLib"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{SYSTEM_PYTHON} cannot import dbus/gi ({last}): install python3-dbus python3-gi"
    for tool in ("dbus-daemon", "unshare", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def measure(sizes: list[int], runs: int) -> dict:
    """firewalld's additions at each size, or {"unavailable": why}."""
    from controller.bench.common import delete_namespace
    from controller.lab import netns

    why = unavailable()
    if why is not None:
        return {"unavailable": why}
    ns = f"dom0fw-{os.getpid() % 100000}-{secrets.token_hex(2)}"
    top = Path(__file__).resolve().parents[2]
    dist = ROOT / "usr" / "lib" / "python3" / "dist-packages"
    netns.create([ns])
    try:
        child = subprocess.run(
            netns.exec_argv(
                ns,
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    SYSTEM_PYTHON,
                    "-m",
                    "controller.bench.firewalld",
                    "--sizes",
                    ",".join(map(str, sizes)),
                    "--runs",
                    str(runs),
                ],
            ),
            env={
                **os.environ,
                "PYTHONPATH": f"{top}:{dist}",
                "DOM0_FIREWALLD_ROOT": str(ROOT),
                "DOM0_BENCH_OUTER_NS": _namespaces(),
            },
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 60 + runs * len(sizes) * 2,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"unavailable": "the firewalld benchmark did not finish in time"}
    finally:
        delete_namespace(ns)  # the worker stops its daemons; this is the safety net
    lines = child.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        detail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"the firewalld worker failed (exit {child.returncode}): {detail}"}
    return result


# -- the worker half (in the namespace) ----------------------------------------------


def _private_run() -> None:
    """A tmpfs over /run, in this process's own mount namespace only:
    firewalld's /run/firewalld, the bus socket and the rest stay here."""
    outer = os.environ.get("DOM0_BENCH_OUTER_NS", "")
    if not outer or outer == _namespaces():
        raise RuntimeError(
            "refusing to mount over /run: not in namespaces of its own "
            "(start this through `dom0 bench reconcile`)"
        )
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], check=True)
    RUN.mkdir(mode=0o700)
    Path("/run/dbus").mkdir()


def _namespaces() -> str:
    """This process's mount and network namespaces (what the worker must not share)."""
    return ",".join(f"{ns}:{os.stat(f'/proc/self/ns/{ns}').st_ino}" for ns in ("mnt", "net"))


def _config() -> Path:
    etc = RUN / "etc"
    for d in ("ipsets", "zones", "services", "icmptypes", "helpers", "policies"):
        (etc / d).mkdir(parents=True)
    conf = (ROOT / "etc" / "firewalld" / "firewalld.conf").read_text()
    for key, value in (("FirewallBackend", "nftables"), ("LogDenied", "off")):
        conf, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", conf)
        if not n:
            conf += f"\n{key}={value}\n"
    (etc / "firewalld.conf").write_text(conf)
    for name, kind, _ in IPSETS.values():
        (etc / "ipsets" / f"{name}.xml").write_text(
            f'<?xml version="1.0" encoding="utf-8"?>\n<ipset type="{kind}"><short>{name}</short>'
            "</ipset>\n"
        )
    (etc / "zones" / f"{ZONE}.xml").write_text(ZONE_XML)
    (RUN / "bus.conf").write_text(BUS_CONFIG)
    return etc


def _wait(what: str, ready, procs: list[subprocess.Popen], log: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: exited with {p.returncode}{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {START_TIMEOUT:.0f} s{_log_tail(log)}")
        time.sleep(0.02)


def _log_tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f" ({lines[-1]})" if lines else ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker(sizes: list[int], runs: int) -> dict:
    import dbus
    import dbus.mainloop.glib

    from controller.bench.common import summary

    _private_run()
    etc = _config()
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={BUS_SOCKET}"}
    procs: list[subprocess.Popen] = []
    try:
        bus_log = RUN / "dbus.log"
        with bus_log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    ["dbus-daemon", f"--config-file={RUN / 'bus.conf'}", "--nofork", "--nopidfile"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        _wait("dbus-daemon", lambda: os.path.exists(BUS_SOCKET), procs, bus_log)
        fw_log = RUN / "firewalld.log"
        t0 = time.perf_counter()
        with (RUN / "firewalld.out").open("w") as out:
            procs.append(
                subprocess.Popen(
                    [
                        SYSTEM_PYTHON,
                        str(ROOT / "usr" / "sbin" / "firewalld"),
                        "--nofork",
                        "--nopid",
                        "--system-config",
                        str(etc),
                        "--default-config",
                        str(ROOT / "usr" / "lib" / "firewalld"),
                        "--log-target",
                        "file",
                        "--log-file",
                        str(fw_log),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        # as firewall-cmd and every client of firewall.client: a GLib main loop
        dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
        bus = dbus.SystemBus()

        def running() -> bool:
            if not bus.name_has_owner(FIREWALLD_NAME):
                return False
            obj = bus.get_object(FIREWALLD_NAME, "/org/fedoraproject/FirewallD1")
            state = obj.Get(
                FIREWALLD_NAME, "state", dbus_interface="org.freedesktop.DBus.Properties"
            )
            return str(state) == "RUNNING"

        _wait("firewalld", running, procs, fw_log)
        startup = time.perf_counter() - t0

        from firewall import config as fw_config
        from firewall.client import FirewallClient
        from gi.repository import GLib

        fw = FirewallClient(bus=bus)
        for name, _, _ in IPSETS.values():
            if name not in fw.getIPSets():
                raise RuntimeError(f"firewalld did not load the ipset {name}")
            if fw.getZoneOfSource(f"ipset:{name}") != ZONE:
                raise RuntimeError(f"the ipset {name} is not a source of zone {ZONE}")
        context = GLib.MainContext.default()

        def drain() -> None:  # the client's signal handlers, outside the timing
            while context.pending():
                context.iteration(False)

        results: dict[str, dict] = {}
        for size in sizes:
            results[str(size)] = {}
            for what, (name, _, entry_of) in IPSETS.items():
                fw.setEntries(name, [entry_of(i) for i in range(size)])
                if len(fw.getEntries(name)) != size:
                    raise RuntimeError(f"the ipset {name} does not hold {size} entries")
                times = []
                for k in range(runs):
                    entry = entry_of(size + 1 + k)
                    t = time.perf_counter()
                    fw.addEntry(name, entry)
                    times.append(time.perf_counter() - t)
                    if k == 0:  # once per size: in the kernel's set, not only in firewalld
                        subprocess.run(
                            ["nft", "get", "element", "inet", "firewalld", name, f"{{ {entry} }}"],
                            check=True,
                            capture_output=True,
                        )
                    fw.removeEntry(name, entry)
                    drain()
                fw.setEntries(name, [])  # while the other set is measured, it alone holds `size`
                results[str(size)][what] = summary(times)
        return {
            "name": "firewalld",
            "version": fw_config.VERSION,
            "backend": "nftables",
            "ipsets": {what: kind for what, (_, kind, _) in IPSETS.items()},
            "startup_s": round(startup, 2),
            "sizes": results,
        }
    finally:
        for p in reversed(procs):
            _stop(p)


def main() -> int:
    p = argparse.ArgumentParser(prog="controller.bench.firewalld")
    p.add_argument("--sizes", required=True)
    p.add_argument("--runs", type=int, required=True)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        result = worker(sizes, args.runs)
    except Exception as e:  # any failure becomes the stated reason
        result = {"unavailable": f"firewalld could not run here: {type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
