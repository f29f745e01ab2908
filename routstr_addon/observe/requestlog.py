"""A line per request, for an operator to grep or ship: ``LOG_FORMAT=text`` (key=value pairs)
or ``json`` (one object per line), on stdout, apart from the proxy's own log (``flows``
writes them).

Each line: the time the request arrived (UTC), its id (``x-routstr-request-id``), the key's id
(the first 16 hex digits of its hash, never the key), how it was paid, method and path, model,
status, reserved and charged msat, the upstream's time to headers, the total time, and the
bytes in and out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from typing import Any, TextIO

from mitmproxy import http

from routstr_addon.metering.meter import Paid

__all__ = ["PATH", "LineWriter", "fields", "format_line", "safe_path"]

PATH = "routstr.path"  # the client's path, kept before the paid forward rewrites it
STATE = "routstr"  # the paid forward's ``Paid`` (proxy.forward.STATE)


class LineWriter:
    """Writes the lines on stdout, apart from mitmproxy's log and not through ``logging``
    (whose records and caller lookup cost the request path more than the line itself).

    In the event loop the lines are gathered and written together every ``every`` seconds (or
    every ``batch`` lines), so a busy proxy makes a few writes a second rather than one per
    request (stdout is unbuffered under ``PYTHONUNBUFFERED``, as in the image); ``flush``
    writes what is left (at shutdown). Outside a loop each line is written at once."""

    def __init__(self, stream: TextIO | None = None, every: float = 0.25,
                 batch: int = 512) -> None:
        self.stream = stream
        self.every = every
        self.batch = batch
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.batch:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.every, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        with contextlib.suppress(OSError, ValueError):  # stdout gone: the requests go on
            stream = self.stream or sys.stdout
            stream.write(text)
            stream.flush()


# Path segments that may be bearer secrets: keys, tokens, invoices, and anything long and
# random-looking (an invoice id in a status path is the key to the key it funds).
_SECRET_SEGMENT = re.compile(r"(?i)(sk-|cashu|lnbc|lntb|lnurl|creq)|[A-Za-z0-9_-]{32,}")


def safe_path(path: str) -> str:
    """The path as logged: segments that may be secrets replaced by ``{secret}``."""
    if not _SECRET_SEGMENT.search(path):
        return path
    return "/".join("{secret}" if _SECRET_SEGMENT.match(part) or len(part) >= 32 else part
                    for part in path.split("/"))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def fields(flow: http.HTTPFlow, now: float | None = None) -> dict[str, Any]:
    """What the line says about a finished (or failed) flow."""
    req, resp = flow.request, flow.response
    paid = flow.metadata.get(STATE)
    paid = paid if type(paid) is Paid else None
    end = (resp.timestamp_end if resp is not None and resp.timestamp_end else None) or \
        (now or time.time())
    upstream_ms = None
    if paid is not None and resp is not None and resp.timestamp_start and req.timestamp_end:
        upstream_ms = _ms(resp.timestamp_start - req.timestamp_end)
    if resp is None:
        out_bytes = 0
    elif paid is not None and paid.tap is not None:
        out_bytes = paid.tap.delivered
    else:
        out_bytes = len(resp.raw_content or b"")
    closed = paid.closed if paid is not None else None
    model = None
    if paid is not None:
        model = paid.model.id if paid.model is not None else _model(paid.body)
    path = safe_path(flow.metadata.get(PATH) or req.path.split("?", 1)[0])
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(req.timestamp_start))
        + f".{int(req.timestamp_start * 1000) % 1000:03d}Z",
        "request_id": flow.id,
        "key_id": paid.key_hash[:16] if paid is not None else None,
        "paid_by": None if paid is None else "key" if paid.payer is None else "x-cashu",
        "method": req.method,
        "endpoint": path,
        "model": model,
        "status": resp.status_code if resp is not None else None,
        "reserved_msat": paid.reserved_msat if paid is not None else None,
        "charged_msat": closed.charged_msat if closed is not None else None,
        "upstream_ms": upstream_ms,
        "total_ms": _ms(end - req.timestamp_start),
        "bytes_in": len(req.raw_content or b""),
        "bytes_out": out_bytes,
        "error": flow.error.msg if flow.error is not None else None,
    }


def _model(body: dict[str, Any] | None) -> str | None:
    name = body.get("model") if body else None
    return name[:100] if isinstance(name, str) else None


_QUOTE = re.compile(r'[\s"=\\]')


def format_line(values: dict[str, Any], fmt: str) -> str:
    """``json``: one object; ``text``: ``name=value`` pairs, strings quoted (JSON) when they
    hold a space, a quote, ``=`` or a backslash, absent values left out."""
    if fmt == "json":
        return json.dumps(values, separators=(",", ":"))
    parts = []
    for name, value in values.items():
        if value is None:
            continue
        if type(value) is str and (not value or _QUOTE.search(value)):
            value = json.dumps(value)
        parts.append(f"{name}={value}")
    return " ".join(parts)
