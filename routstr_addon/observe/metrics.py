"""Prometheus metrics (``prometheus-client``): what the proxy did, counted per process, and
what the ledger holds, read at scrape time.

Counters and histograms live in one ``Metrics`` per process (each process exports its own, as
Prometheus expects; ``sum()`` across instances gives the service's figures). The books — ecash
held against what users are owed, payouts and refunds by state — come from the shared ledger,
so every process reports the same figures for them; they are read at most every few seconds,
however often Prometheus scrapes. Labels are bounded: an endpoint is one the proxy knows (or
``other``), a model one models.json prices (or ``""``), so a client cannot grow the series.

Off unless ``METRICS_TOKEN`` or ``METRICS_PORT`` is set: then nothing is counted at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["BOOKS_EVERY", "Metrics"]

BOOKS_EVERY = 5.0  # seconds the figures read from the ledger are kept between scrapes
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            300.0)
_MINT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)


class _Books(Collector):
    """Gauges read from the ledger at scrape time (cached for ``BOOKS_EVERY`` seconds)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read
        self._cached: tuple[float, dict[str, Any]] | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        """Nothing to describe up front: registering must not read the ledger."""
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= BOOKS_EVERY:
            try:
                self._cached = (now, self.read())
            except Exception:  # the ledger away: no books this scrape (/ready says why)
                self._cached = None
                return
        figures = self._cached[1]
        proofs = GaugeMetricFamily("routstr_wallet_proofs_msat",
                                   "Ecash the wallet holds, per mint and unit (msat).",
                                   labels=["mint", "unit"])
        for mint, unit, msat in figures["holdings"]:
            proofs.add_metric([mint, unit], msat)
        yield proofs
        for name, text in (
                ("liabilities_msat", "What users are owed: backed key balances and refunds "
                                     "not yet handed out (msat)."),
                ("keys_msat", "Balances of keys funded with ecash (msat)."),
                ("operator_credit_msat", "Balances the operator granted by hand (msat)."),
                ("pending_payouts_msat", "What payments under way may take (msat)."),
                ("margin_msat", "The operator's: proofs held - liabilities - payouts under "
                                "way (msat)."),
                ("ledger_charged_msat", "Every charge in the ledger, all processes (msat)."),
                ("ledger_requests", "Requests charged in the ledger, all processes.")):
            yield GaugeMetricFamily(f"routstr_{name}", text, value=figures[name])
        for table in ("payouts", "refunds"):
            count = GaugeMetricFamily(f"routstr_{table}", f"{table.title()} by kind and state.",
                                      labels=["kind", "state"])
            msat = GaugeMetricFamily(f"routstr_{table}_msat",
                                     f"{table.title()} by kind and state (msat).",
                                     labels=["kind", "state"])
            for kind, state, n, total in figures[table]:
                count.add_metric([kind, state], n)
                msat.add_metric([kind, state], total)
            yield count
            yield msat
        locked = GaugeMetricFamily("routstr_locked_proofs", "Proofs received locked to the "
                                   "payment key, by state (received, redeeming, redeemed, "
                                   "lost) and unit.", labels=["state", "unit"])
        locked_amount = GaugeMetricFamily("routstr_locked_proofs_amount", "Their amount, in "
                                          "the unit.", labels=["state", "unit"])
        for state, unit, n, amount in figures.get("locked", ()):
            locked.add_metric([state, unit], n)
            locked_amount.add_metric([state, unit], amount)
        yield locked
        yield locked_amount


class Metrics:
    """One process's metrics and the registry they are exported from."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("routstr_requests", "Requests answered, by endpoint, model "
                                "and status.", ["endpoint", "model", "status"], registry=r)
        self.reserved = Counter("routstr_reserved_msat", "Msat reserved before forwarding.",
                                registry=r)
        self.charged = Counter("routstr_charged_msat", "Msat charged for requests.",
                               registry=r)
        self.released = Counter("routstr_released_msat", "Msat reserved and given back "
                                "(reservation less charge).", registry=r)
        self.under_reserved = Counter("routstr_under_reservations", "Requests whose cost from "
                                      "usage exceeded their reservation (charged the "
                                      "reservation).", ["model"], registry=r)
        self.upstream_headers = Histogram("routstr_upstream_headers_seconds", "Time from the "
                                          "request to the upstream's response headers.",
                                          ["endpoint"], buckets=_LATENCY, registry=r)
        self.upstream_duration = Histogram("routstr_upstream_duration_seconds", "Time from the "
                                           "request to the end of the upstream's answer.",
                                           ["endpoint"], buckets=_LATENCY, registry=r)
        self.stream_ttfb = Histogram("routstr_stream_ttfb_seconds", "Streams: time from the "
                                     "request to the first body bytes from the upstream.",
                                     ["endpoint"], buckets=_LATENCY, registry=r)
        self.mint_calls = Counter("routstr_mint_calls", "Calls to mints, by operation and "
                                  "outcome (ok, refused, unreachable).",
                                  ["operation", "outcome"], registry=r)
        self.mint_seconds = Histogram("routstr_mint_call_seconds", "Time of mint calls.",
                                      ["operation"], buckets=_MINT, registry=r)
        self.sweeps = Counter("routstr_swept_reservations", "Orphaned reservations closed by "
                              "the sweeper, by outcome (charged, released).", ["outcome"],
                              registry=r)
        self.rate_age = Gauge("routstr_rate_age_seconds", "Age of the BTC/USD rate in use "
                              "(0: a fixed rate; -1: none yet).", registry=r)
        self.info = Info("routstr_instance", "This process.", registry=r)
        self._children: dict[tuple[str, str, str], Any] = {}
        self._timings: dict[str, tuple[Any, Any, Any]] = {}
        self._books: _Books | None = None

    def watch_books(self, read: Callable[[], dict[str, Any]]) -> None:
        """Export the ledger's figures, read with ``read`` at scrape time."""
        if self._books is not None:
            self.registry.unregister(self._books)
        self._books = _Books(read)
        self.registry.register(self._books)

    def request(self, endpoint: str, model: str, status: str) -> None:
        key = (endpoint, model, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(endpoint, model, status)
        child.inc()

    def swept(self, closed: Iterable[Any]) -> None:
        """Reservations the sweeper closed (``Settlement``s): charged or released."""
        for done in closed:
            self.sweeps.labels("charged" if done.charged_msat else "released").inc()

    def timings(self, endpoint: str) -> tuple[Any, Any, Any]:
        """An endpoint's upstream histograms (headers, duration, stream TTFB), looked up once."""
        found = self._timings.get(endpoint)
        if found is None:
            found = self._timings[endpoint] = (self.upstream_headers.labels(endpoint),
                                               self.upstream_duration.labels(endpoint),
                                               self.stream_ttfb.labels(endpoint))
        return found

    def mint_call(self, operation: str, outcome: str, seconds: float) -> None:
        self.mint_calls.labels(operation, outcome).inc()
        self.mint_seconds.labels(operation).observe(seconds)
