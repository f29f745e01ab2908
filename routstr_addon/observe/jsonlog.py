"""``LOG_FORMAT=json``: the proxy's own log lines as JSON too (one object a line on stderr:
time, level, logger, message, and the traceback when there is one), so a log shipper reads
every line the proxy writes the same way. mitmproxy's own lines (listening, client connects)
stay as mitmproxy writes them."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

__all__ = ["JsonFormatter", "use_json_logs"]

_LOGGERS = ("routstr", "routstr_addon")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed (so it is installed once, and removed)."""


def use_json_logs(on: bool, stream: TextIO | None = None) -> None:
    """Turn the JSON lines on (our loggers write them, and no longer through mitmproxy's
    terminal log) or off (back to mitmproxy's)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        mine = [h for h in logger.handlers if isinstance(h, _JsonHandler)]
        if on and not mine:
            handler = _JsonHandler(stream or sys.stderr)
            handler.setFormatter(JsonFormatter())
            # What mitmproxy's terminal shows by default, or lower if LOG_LEVEL asks for it.
            handler.setLevel(min(logging.INFO, logger.level) if logger.level else logging.INFO)
            logger.addHandler(handler)
            logger.propagate = False
        elif not on and mine:
            for handler in mine:
                logger.removeHandler(handler)
            logger.propagate = True
