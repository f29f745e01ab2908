"""The sub-addon that watches each request end: its log line and its metrics.

It runs after the paid forward, so a forwarded flow's ``Paid`` is settled (or retrying) when
it looks; it only reads. Nothing here can fail a request: its errors are logged and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from routstr_addon.metering.meter import Meter, Paid
from routstr_addon.metering.surface import ENDPOINTS
from routstr_addon.observe.requestlog import PATH, LineWriter, fields, format_line, safe_path

if TYPE_CHECKING:
    from routstr_addon.observe.metrics import Metrics

__all__ = ["FlowObserver", "endpoint_label", "known_endpoints"]

logger = logging.getLogger(__name__)

STATE = "routstr"  # proxy.forward.STATE
LOGGED = "routstr.logged"


def endpoint_label(path: str, known: Mapping[str, Any]) -> str:
    """A path as a bounded metrics label: the known ones as they are, the rest grouped (a
    client cannot grow the series)."""
    if path in known:
        return path
    if path.startswith("/admin"):
        return "/admin/api" if path.startswith("/admin/api/") else "/admin"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith(("/v1/balance/lightning/invoice/", "/v1/wallet/lightning/invoice/")):
        return "/v1/balance/lightning/invoice/{id}"
    return "other"


def known_endpoints() -> dict[str, bool]:
    from routstr_addon.web.routes import ROUTES

    return {**dict.fromkeys(ROUTES, True), **{f"/v1/{p}": True for p in ENDPOINTS}}


class FlowObserver:
    """``requestheaders`` keeps the client's path (the paid forward rewrites it for the
    upstream); ``response`` and ``error`` write the line and count the request, once."""

    def __init__(self, log_format: str, metrics: Metrics | None, meter: Meter) -> None:
        self.log_format = log_format
        self.log = LineWriter() if log_format != "off" else None
        self.metrics = metrics
        self.meter = meter
        self.known: Mapping[str, Any] = known_endpoints()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        path = flow.request.path
        cut = path.find("?")
        # Kept without what may be a secret: mitmweb shows a flow's metadata.
        flow.metadata[PATH] = safe_path((path if cut < 0 else path[:cut])[:300])

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def done(self) -> None:
        if self.log is not None:
            self.log.flush()  # the last lines, before the process ends

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow)

    def _ended(self, flow: http.HTTPFlow) -> None:
        metadata = flow.metadata
        if LOGGED in metadata:
            return  # a flow that fails after its answer (a stream cut short) counts once
        metadata[LOGGED] = True
        try:
            if self.log is not None:
                self.log.write(format_line(fields(flow), self.log_format))
            if self.metrics is not None:
                self._count(flow)
        except Exception:
            logger.exception("observing request %s failed", flow.id)

    def _count(self, flow: http.HTTPFlow) -> None:
        metrics = self.metrics
        assert metrics is not None
        req, resp = flow.request, flow.response
        paid = flow.metadata.get(STATE)
        paid = paid if type(paid) is Paid else None
        if paid is not None and paid.path:  # forwarded: the endpoint it was priced as
            endpoint = "/v1/" + paid.path
        else:
            endpoint = endpoint_label(flow.metadata.get(PATH) or req.path.split("?", 1)[0],
                                      self.known)
        model = paid.model.id if paid is not None and paid.model is not None else ""
        metrics.request(endpoint, model, str(resp.status_code) if resp is not None else "failed")
        if paid is None:
            return
        metrics.reserved.inc(paid.reserved_msat)
        closed = paid.closed
        if closed is not None:
            metrics.charged.inc(closed.charged_msat)
            metrics.released.inc(max(0, paid.reserved_msat - closed.charged_msat))
            if (closed.charged_msat >= paid.reserved_msat and paid.usage is not None
                    and self.meter.cost(paid.model, paid.usage) > paid.reserved_msat):
                metrics.under_reserved.labels(model).inc()
        sent = req.timestamp_end
        if resp is not None and sent and resp.timestamp_start and flow.server_conn.timestamp_start:
            headers, duration, ttfb = metrics.timings(endpoint)
            headers.observe(resp.timestamp_start - sent)
            if resp.timestamp_end:
                duration.observe(resp.timestamp_end - sent)
            if paid.first_byte_at is not None:
                ttfb.observe(paid.first_byte_at - sent)
