"""The proxy's own log as the operator asked (``LOG_LEVEL``), and a quiet stop.

Stopping mitmproxy (SIGTERM) while clients hold keep-alive connections cancels each
connection's server task after mitmproxy's own error handler is gone; asyncio's stream
protocol then asks the cancelled task for its exception inside a loop callback (Python 3.12)
and the loop prints a ``CancelledError`` traceback per connection, which reads like a crash.
The handler installed here drops exactly those (a cancelled task is how a connection ends at
shutdown) and hands everything else to the handler that was there before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

__all__ = ["apply_log_level", "quiet_shutdown"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_TERMLOG = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}


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


def apply_log_level(level: str) -> None:
    """LOG_LEVEL: our loggers' level, and mitmproxy's terminal log when it has one."""
    value = _LEVELS.get(level, logging.INFO)
    for name in ("routstr", "routstr_addon"):
        logging.getLogger(name).setLevel(value)
    from mitmproxy import ctx

    with contextlib.suppress(AttributeError, KeyError):
        options = ctx.options
        if "termlog_verbosity" in options and options.termlog_verbosity != _TERMLOG[level]:
            options.update(termlog_verbosity=_TERMLOG[level])
