"""A quiet stop.

Stopping mitmproxy (SIGTERM) while clients hold keep-alive connections leaves each
connection's server task to ``asyncio.run``, which cancels it after mitmproxy's own error
handler is gone; asyncio's stream protocol then asks the cancelled task for its exception
inside a loop callback (Python 3.12) and the loop prints a ``CancelledError`` traceback per
connection, which reads like a crash. So at ``done`` the open connections are ended the way
mitmproxy ends one itself (their handler task is cancelled, the client task then finishes
normally, client-disconnect hooks included); and a loop handler drops a cancelled task's
``CancelledError`` should one still reach it, handing everything else on.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["close_connections", "quiet_shutdown"]



def quiet_shutdown() -> None:
    """Install the quiet handler on the running loop (once; no loop yet: nothing to do)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    previous = loop.get_exception_handler()
    if getattr(previous, "routstr_quiet", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), asyncio.CancelledError):
            return  # a connection's task cancelled at shutdown: how it ends, not an error
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.routstr_quiet = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


async def close_connections(grace: float = 2.0) -> None:
    """End the client connections still open (at shutdown), and wait for them to go."""
    from mitmproxy import ctx

    try:
        server = ctx.master.addons.get("proxyserver")
    except AttributeError:
        return
    connections = getattr(server, "connections", None)
    if not connections:
        return
    for handler in list(connections.values()):
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None:
            io.handler.cancel("shutting down")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            while connections:  # noqa: ASYNC110 - mitmproxy has no event for "all gone"
                await asyncio.sleep(0.02)
