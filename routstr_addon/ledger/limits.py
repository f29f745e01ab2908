"""Per-key limits and child keys: what a restricted key may do, as plain rules.

A key is *restricted* when it has limits (requests per minute, requests in flight, allowed
models, a budget per period) or is a child key (it spends its parent's balance). Its requests
are admitted in one transaction that locks the key's row, counts and checks, and reserves on
the key that pays (``Accounts._reserve_limited``), so limits hold across processes sharing one
database. Keys without limits never come here: the request path's one-statement reservation
refuses restricted keys (one more predicate, no query), and only then is this path taken.

Periods: ``daily``, ``weekly``, ``monthly`` (UTC calendar, as routstr-core's
``balance_limit_reset``), or a number of seconds (``86400``, written ``1d`` by people); none
(or ``manual``) means the budget is reset only by hand (``child-key/reset``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = [
    "CALENDAR_PERIODS",
    "NO_LIMITS",
    "LimitRefused",
    "Limits",
    "budget_left",
    "next_window",
    "parse_period",
    "window_start",
]

CALENDAR_PERIODS = ("daily", "weekly", "monthly")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
RPM_WINDOW = 60.0  # seconds a requests-per-minute limit counts over (a sliding window)


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's limits; None: no such limit."""

    rpm: int | None = None
    concurrent: int | None = None
    models: tuple[str, ...] | None = None
    budget_msat: int | None = None
    period: str | None = None

    @property
    def any(self) -> bool:
        return (self.rpm is not None or self.concurrent is not None or bool(self.models)
                or self.budget_msat is not None)

    def describe(self) -> dict[str, object]:
        return {"rpm": self.rpm, "concurrent": self.concurrent,
                "models": list(self.models) if self.models else None,
                "budget_msat": self.budget_msat, "period": self.period}


NO_LIMITS = Limits()


class LimitRefused(Exception):
    """A request a key's limits do not allow; ``reason`` is rate | concurrency | budget |
    model, ``retry_after`` seconds until it may pass (None: not by waiting)."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


def parse_period(text: str | None) -> str | None:
    """A period as stored: ``daily|weekly|monthly``, seconds as digits, or None (manual).
    Accepts ``1d``, ``12h``, ``30m``, ``3600``, ``day``…; ValueError otherwise."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("", "manual", "none", "never"):
        return None
    value = {"day": "daily", "week": "weekly", "month": "monthly"}.get(value, value)
    if value in CALENDAR_PERIODS:
        return value
    found = re.fullmatch(r"(\d+)\s*([smhdw]?)", value)
    if not found or int(found.group(1)) <= 0:
        raise ValueError(f"not a period: {text!r} (daily, weekly, monthly, or 1d, 12h, 3600)")
    return str(int(found.group(1)) * _UNITS[found.group(2) or "s"])


def window_start(period: str | None, now: float) -> float | None:
    """When the period holding ``now`` began; None for a budget reset only by hand."""
    if period is None:
        return None
    if period.isdigit():
        length = int(period)
        return float(int(now // length) * length)
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "weekly":
        day -= timedelta(days=day.weekday())
    elif period == "monthly":
        day = day.replace(day=1)
    return day.timestamp()


def next_window(period: str | None, now: float) -> float | None:
    """When the next period begins (the budget comes back); None if never by itself."""
    start = window_start(period, now)
    if start is None or period is None:
        return None
    if period.isdigit():
        return start + int(period)
    day = datetime.fromtimestamp(start, UTC)
    if period == "daily":
        return (day + timedelta(days=1)).timestamp()
    if period == "weekly":
        return (day + timedelta(days=7)).timestamp()
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return day.replace(year=year, month=month).timestamp()


def budget_left(limits: Limits, spent_msat: int, window_began: float | None,
                in_flight_msat: int, now: float) -> int | None:
    """What the key may still reserve under its budget (None: no budget). Spending recorded
    in an earlier period no longer counts: the period rolled over."""
    if limits.budget_msat is None:
        return None
    start = window_start(limits.period, now)
    if start is not None and (window_began is None or window_began < start):
        spent_msat = 0
    return limits.budget_msat - spent_msat - in_flight_msat
