"""dnsmasq's lease file as a trio event stream: a `Leases` whenever it changes.

dnsmasq rewrites the file (a new inode) or appends to it on every lease
change; a stat once a second is all it costs to notice, and the file is read
only when its inode, size or mtime moved.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from controller.core.leases import Leases, parse_leases

POLL = 1.0


async def watch(
    path: Path,
    send: trio.MemorySendChannel[object],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    last: tuple[int, int, int] | None = None
    task_status.started()
    while True:
        try:
            st = os.stat(path)
            mark = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            mark = (0, 0, 0)
        if mark != last:
            last = mark
            try:
                text = await trio.Path(path).read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            await send.send(parse_leases(text, int(time.time())))
        await trio.sleep(POLL)


__all__ = ["Leases", "watch"]
