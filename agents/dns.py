"""The VM's names: the agent's stub resolver (agents/resolver.py) follows the
configuration in place, and the VM's resolver configuration points at it.

A configuration with `dns` (dom0's DNS-over-TLS address) starts forwarding
there, over TLS verified against the pinned CA, and points the VM at the stub
on its loopback (through systemd-resolved where it runs, else resolv.conf,
both under the agent's root); one without stops forwarding (the stub then
answers SERVFAIL: nothing leaves in clear) and puts the VM's own resolver
configuration back. The stub runs from the agent's start, so a VM restarted
while dom0 is away still resolves with its last-known-good configuration.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import trio

from agents.files import Root
from agents.resolver import ResolverError, Stub, point_resolver, restore_resolver
from agents.session import tls_client
from common.agentconfig import MachineConfig

log = logging.getLogger(__name__)

LISTEN = (("127.0.0.1", 53),)  # the VM's loopback; systemd-resolved holds 127.0.0.53


def dns_context(root: Root) -> ssl.SSLContext:
    """dom0's DNS verified against the pinned CA; before enrollment, against
    nothing at all (every handshake fails: nothing is asked in clear or of
    an unverified server)."""
    if root.ca.exists():
        return tls_client(root, client_cert=False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class DnsFollower:
    def __init__(
        self,
        root: Path,
        context: Callable[[], Any],
        listen: Sequence[tuple[str, int]] = LISTEN,
        *,
        manage_resolver: bool = True,
    ) -> None:
        self.root = root
        self.context = context  # the pinned CA's TLS context (made once enrolled)
        self.listen = tuple(listen)
        self.manage_resolver = manage_resolver
        self.stub: Stub | None = None
        self.server: str | None = None
        self.pointed: str | None = None  # what the VM's resolver configuration says now
        self._containers: tuple[tuple[str, int], ...] = ()
        self._moved = trio.Event()  # where the stub listens changed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The stub, until cancelled, started again when where it listens
        changes (the containers' bridge comes and goes with the configuration);
        a listen address that cannot be bound is logged and the agent goes on
        without DNS there."""
        started = False
        while True:
            self._moved = trio.Event()
            self.stub = Stub(self.context(), self.listening)
            self.stub.configure(self.server)
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    try:
                        await nursery.start(self.stub.run)
                    except OSError as e:
                        log.error("dns: %s: the VM's queries are not forwarded", e)
                        self.stub = None
                    if not started:
                        started = True
                        task_status.started()
                    await self._moved.wait()
                    scope.cancel()

    @property
    def listening(self) -> tuple[tuple[str, int], ...]:
        return self.listen + self._containers

    def configure(self, config: MachineConfig | None) -> None:
        server = config.dns if config is not None else None
        # the containers' gateway (their bridge's address) when they have a prefix
        prefix = config.containers if config is not None and server is not None else None
        containers = () if prefix is None else ((str(ip_network(prefix)[1]), 53),)
        if containers != self._containers:
            self._containers = containers
            self._moved.set()
        if server != self.server:
            self.server = server
            if self.stub is not None:
                self.stub.context = self.context()  # (the pinned CA, as it is now)
                self.stub.configure(server)
            log.info("dns: forwarding to %s", f"{server}:853 over TLS" if server else "nobody")
        if not self.manage_resolver:
            return
        try:
            if server is not None and self.pointed != self.listen[0][0]:
                self.pointed = self.listen[0][0]
                log.info("dns: %s", point_resolver(self.root, self.pointed))
            elif server is None and self.pointed is not None:
                self.pointed = None
                log.info("dns: %s", restore_resolver(self.root))
        except (ResolverError, OSError) as e:
            log.error("dns: the VM's resolver configuration: %s", e)

    def report(self) -> dict[str, Any]:
        out = self.stub.report() if self.stub is not None else {"server": self.server}
        return {**out, "resolver": self.pointed}
