"""Print what the netlink source sees, as JSON lines (operator/debug tool, lab tests).

Usage (in the namespace to inspect, e.g. the lab's dom0)::

    ip netns exec NAME-dom0 python -m controller.sources.netlink_dump --bridge virbr0
    ip netns exec NAME-dom0 python -m controller.sources.netlink_dump --bridge virbr0 --follow

Without --follow: one line after the initial dump, then exit. With --follow: a
line after the dump and after every burst of events that changes the output;
SIGUSR1 forces a resync (new dump + Snapshot); SIGINT/SIGTERM exit cleanly.

Each line is one JSON object::

    {"bridge": "virbr0", "bridge_index": 4,
     "ports": {"vnet0": {"index": 7, "up": true}},
     "foreign_ports": ["eth1"],
     "sightings": {"52:54:00:12:34:56": "vnet0"},
     "links": 9, "fdb": 23,                       # rows in the folded tables
     "snapshots": 1, "events": 0,                 # what the source has sent so far
     "dumps": 1, "overruns": 0}                   # the source's counters

`--rcvbuf BYTES` sets the socket receive buffer (default 8 MiB); a small one
makes overruns (ENOBUFS) and the resulting resyncs easy to see.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from controller.core.inventory import EMPTY, Event, Snapshot, Tables, fold, inventory
from controller.sources.netlink import NetlinkSource

_COUNTERS = frozenset({"events", "dumps", "overruns"})


def write_line(text: str) -> None:
    """Write one whole line to stdout.

    Not print(): when a signal (SIGUSR1, SIGTERM) interrupts a large write to a
    full pipe, CPython's buffered stdout can drop the rest of the line, and the
    reader gets broken JSON. os.write reports partial writes; finish them here.
    """
    view = memoryview((text + "\n").encode())
    while view:
        view = view[os.write(sys.stdout.fileno(), view) :]


def render(
    tables: Tables, bridge: str, source: NetlinkSource, snapshots: int, events: int
) -> dict[str, Any]:
    inv = inventory(tables, bridge)
    return {
        "bridge": inv.bridge,
        "bridge_index": inv.bridge_index,
        "ports": {n: {"index": p.index, "up": p.up} for n, p in sorted(inv.ports.items())},
        "foreign_ports": sorted(inv.foreign_ports),
        "sightings": dict(sorted(inv.sightings.items())),
        "links": len(tables.links),
        "fdb": len(tables.fdb),
        "snapshots": snapshots,
        "events": events,
        "dumps": source.dumps,
        "overruns": source.overruns,
    }


async def main_async(bridge: str, follow: bool, rcvbuf: int) -> None:
    source = NetlinkSource(rcvbuf=rcvbuf)
    send, receive = trio.open_memory_channel[Event](1024)
    tables = EMPTY
    snapshots = events = 0
    last = ""

    def emit() -> None:
        nonlocal last
        state = render(tables, bridge, source, snapshots, events)
        # Counters alone changing is not news; a new Snapshot is (tests wait for it).
        key = json.dumps({k: v for k, v in state.items() if k not in _COUNTERS})
        if key != last:
            last = key
            write_line(json.dumps(state))

    async def on_signals(cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
            async for signum in signals:
                if signum == signal.SIGTERM:
                    cancel.cancel()
                    return
                await source.resync()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals, nursery.cancel_scope)
        await nursery.start(source.run, send)
        async for event in receive:
            while True:
                snapshots += isinstance(event, Snapshot)
                events += not isinstance(event, Snapshot)
                tables = fold(tables, event)
                try:
                    event = receive.receive_nowait()
                except trio.WouldBlock:
                    break
            emit()
            if not follow:
                nursery.cancel_scope.cancel()
                return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controller.sources.netlink_dump",
        description="Print the bridge inventory the netlink source sees, as JSON lines.",
    )
    parser.add_argument("--bridge", required=True, help="the managed bridge's name")
    parser.add_argument("--follow", action="store_true", help="keep printing changes")
    parser.add_argument("--rcvbuf", type=int, default=8 << 20, help="receive buffer, bytes")
    args = parser.parse_args(argv)
    try:
        trio.run(main_async, args.bridge, args.follow, args.rcvbuf)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
