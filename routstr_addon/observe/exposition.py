"""Where Prometheus reads the metrics: ``GET /metrics`` on the proxy's own port with
``Authorization: Bearer <METRICS_TOKEN>``, and/or without a token on 127.0.0.1:METRICS_PORT
(a listener in mitmproxy's event loop: the ledger is read on the thread that owns its
connection)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from typing import TYPE_CHECKING

from mitmproxy import http

if TYPE_CHECKING:
    from routstr_addon.observe.metrics import Metrics

__all__ = ["MetricsListener", "exposition", "token_matches"]

logger = logging.getLogger(__name__)


def token_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time (of the SHA-256 digests,
    so neither the length nor the first differing byte shows). No token: never."""
    if not token:
        return False
    given = hashlib.sha256(authorization.strip().encode("utf-8", "replace")).digest()
    return hmac.compare_digest(given, hashlib.sha256(f"Bearer {token}".encode()).digest())


def exposition(metrics: Metrics) -> http.Response:
    """The metrics in Prometheus's text format (prometheus-client is imported only when
    metrics are on: it costs start-up a fifth of a second)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return http.Response.make(200, generate_latest(metrics.registry),
                              {"content-type": CONTENT_TYPE_LATEST, "cache-control": "no-store"})


class MetricsListener:
    """``/metrics`` on a loopback port, for a Prometheus (or an agent) on the same host."""

    def __init__(self, metrics: Metrics, port: int, host: str = "127.0.0.1") -> None:
        self.metrics = metrics
        self.port = port
        self.host = host
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self.server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as e:
            logger.error("metrics: cannot listen on %s:%d: %s", self.host, self.port, e)
            return
        logger.info("metrics at http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") \
                    and parts[1].split(b"?", 1)[0] == b"/metrics":
                status, body = b"200 OK", generate_latest(self.metrics.registry)
                kind = CONTENT_TYPE_LATEST.encode()
            else:
                status, body, kind = b"404 Not Found", b"not found\n", b"text/plain"
            if parts[:1] == [b"HEAD"]:
                body = b""
            writer.write(b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (status, kind, len(body), body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
