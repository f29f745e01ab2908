"""The listening sockets' backlog: how many new connections the kernel queues for the proxy.

mitmproxy opens its listeners with asyncio's default backlog of 100. A burst of a few hundred
clients connecting at once (a batch job, a load balancer's reconnect storm) then overflows the
accept queue and the kernel resets the excess: those clients see a connection error although
the proxy had capacity. Calling ``listen()`` again on a listening socket sets a new backlog
(Linux and the BSDs), so this does that once the proxy runs and whenever mitmproxy (re)starts
its servers.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from mitmproxy import ctx

__all__ = ["ListenBacklog"]

logger = logging.getLogger(__name__)


class ListenBacklog:
    def __init__(self, backlog: int) -> None:
        self.backlog = backlog
        self._servers: Any = None

    def start(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        if proxyserver is None:
            return
        self._servers = proxyserver.servers
        self._servers.changed.connect(self.apply)
        self.apply()

    def stop(self) -> None:
        if self._servers is not None:
            self._servers.changed.disconnect(self.apply)
            self._servers = None

    def apply(self) -> None:
        """Give every TCP listener the configured backlog. mitmproxy keeps a mode's asyncio
        servers in a private list: read defensively, so a change there only loses the tuning."""
        for instance in self._servers or ():
            for server in getattr(instance, "_servers", ()):
                for sock in getattr(server, "sockets", ()):
                    if sock.type == socket.SOCK_STREAM:
                        # asyncio hands out wrappers without listen(): act on a duplicate of
                        # the descriptor, which shares the listening socket itself.
                        with socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:
                            dup.listen(self.backlog)
