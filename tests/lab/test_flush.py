"""`dom0 flush` in the lab: refused while the controller runs; after a
SIGTERM (the data plane stays) it removes every table, address, route, rule
and daemon of dom0's in NAME-dom0 and nothing else (a foreign table, address
and route planted beforehand stay: the control that flush does not simply
wipe the namespace); `dom0 run` then brings it all back from the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common import processes as records
from controller.drivers import dns
from controller.drivers.dhcp import record_path
from controller.lab import controllerproc, netns, processes
from controller.lab.rundir import Lab
from controller.lab.wait import wait_for

pytestmark = pytest.mark.lab

DOM0_TABLES = {("inet", "dom0"), ("bridge", "dom0"), ("inet", "dom0_wan")}
FOREIGN_ADDRESS = "10.251.0.1/24"
FOREIGN_ROUTE = "10.252.0.0/24"
UPLINK_TABLE = "51820"  # the lab's [uplink] table: dom0's routes live there


def flush(lab: Lab, *extra: str) -> subprocess.CompletedProcess[str]:
    return netns.run(
        lab.dom0_ns,
        [
            sys.executable, "-m", "controller.cli", "flush",
            "--policy", str(lab.policy_path), "--state", str(lab.state_dir), *extra,
        ],
        check=False,
        env=processes.python_env(),
    )  # fmt: skip


def tables(lab: Lab) -> set[tuple[str, str]]:
    out = json.loads(netns.run(lab.dom0_ns, ["nft", "-j", "list", "tables"]).stdout)
    return {(o["table"]["family"], o["table"]["name"]) for o in out["nftables"] if "table" in o}


def addresses(lab: Lab) -> dict[str, set[str]]:
    out = json.loads(netns.run(lab.dom0_ns, ["ip", "-j", "addr"]).stdout)
    return {
        link["ifname"]: {
            f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"
        }
        for link in out
    }


def routing(lab: Lab) -> str:
    return "".join(
        netns.run(lab.dom0_ns, argv).stdout
        for argv in (
            ["ip", "-4", "rule"],
            ["ip", "-6", "rule"],
            ["ip", "-4", "route", "show", "table", "all"],
            ["ip", "-6", "route", "show", "table", "all"],
        )
    )


def daemons(lab: Lab) -> list[records.ProcessRecord]:
    files = [record_path(lab.state_dir), dns.record_path(lab.state_dir),
             *sorted((lab.state_dir / "wireguard").glob("*.json"))]  # fmt: skip
    recs = [records.read_record(f) for f in files]
    return [r for r in recs if r is not None]


def dom0_present(lab: Lab) -> bool:
    addrs = addresses(lab)
    return (
        tables(lab) >= DOM0_TABLES
        and "10.250.0.1/16" in addrs.get("virbr0", set())
        and {"hub0", "wg0"} <= addrs.keys()
        and "proto 100" in routing(lab)
        and len([r for r in daemons(lab) if records.is_running(r)]) == 4  # (with unbound)
    )


def test_flush_removes_dom0s_data_plane_and_only_it(make_lab: Any) -> None:
    lab = make_lab(1, controller=True)
    (before,) = controllerproc.status(lab)
    assert dom0_present(lab)
    ns = lab.dom0_ns
    netns.run(ns, ["ip", "addr", "add", FOREIGN_ADDRESS, "dev", "virbr0"])
    netns.run(ns, ["ip", "route", "add", FOREIGN_ROUTE, "dev", "virbr0", "table", UPLINK_TABLE])
    netns.run(ns, ["nft", "add", "table", "inet", "foreign"])
    netns.run(ns, ["nft", "add", "chain", "inet", "foreign", "input"])

    # refused while the controller runs (it would put everything back)
    r = flush(lab, "--yes")
    assert r.returncode == 1 and "controller is running" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # no terminal and no --yes: nothing is asked, nothing removed
    controllerproc.stop(lab)  # SIGTERM: the data plane stays
    assert dom0_present(lab)
    r = flush(lab)
    assert r.returncode == 2 and "--yes" in r.stderr
    assert dom0_present(lab)

    daemons_before = daemons(lab)
    r = flush(lab, "--yes", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["failed"] == []
    kinds = {x["kind"] for x in report["removed"]}
    assert {"dnsmasq", "unbound", "wireguard-go", "rule", "route", "address", "table"} <= kinds

    left = tables(lab)
    assert not (left & DOM0_TABLES) and ("inet", "foreign") in left
    addrs = addresses(lab)
    assert addrs["virbr0"] == {FOREIGN_ADDRESS}
    assert "hub0" not in addrs and "wg0" not in addrs
    routes = routing(lab)
    assert "proto 100" not in routes
    assert f"{FOREIGN_ROUTE} dev virbr0 table {UPLINK_TABLE}" in routes
    assert len(daemons_before) == 4  # dnsmasq, unbound, wireguard-go for wg0 and hub0
    assert not any(records.is_running(rec) for rec in daemons_before)
    assert list((lab.state_dir / "dhcp" / "hosts").iterdir()) == []
    assert (lab.state_dir / "state.sqlite").exists()  # the store is kept

    # once more: nothing of dom0's is left to remove
    r = flush(lab, "--yes")
    assert r.returncode == 0 and "nothing of dom0's" in r.stdout

    # dom0 run starts from the store and puts it all back
    controllerproc.start(lab)
    wait_for(lambda: dom0_present(lab), 20, "dom0's data plane to come back")
    after = wait_for(
        lambda: next((m for m in controllerproc.status(lab) if m["state"] == "admitted"), None),
        20,
        "vm1 admitted again",
    )
    assert (after["mac"], after["name"], after["address"]) == (
        before["mac"],
        before["name"],
        before["address"],
    )
    assert FOREIGN_ADDRESS in addresses(lab)["virbr0"]


def test_bad_policy_is_refused_before_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[bridge]\nname = 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "controller.cli", "flush", "--policy", str(bad),
         "--state", str(tmp_path / "state"), "--yes"],
        capture_output=True, text=True, check=False, env=processes.python_env(),
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bad.toml" in r.stderr
