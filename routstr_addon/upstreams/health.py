"""One circuit breaker per provider: closed (used), open (skipped for a cool-down after
consecutive failures or one refused connection), half-open (cool-down over: probed in the
background, closed again when it answers).

Plain state and arithmetic, no I/O: the failover hop and the forward report outcomes, the
probe loop asks which providers are due, and every change of state is passed to one callback
(the router reorders the candidates then, not on every request).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Breaker", "Health"]

FAILURES_TO_OPEN = 3  # consecutive failures (a refused connection opens at once)
COOLDOWN = 30.0  # seconds an open provider is skipped before it is probed


@dataclass(slots=True)
class Breaker:
    name: str
    state: str = "closed"  # closed | open | half-open
    consecutive: int = 0
    opened_until: float = 0.0
    last_failure: float = 0.0  # monotonic; 0: never failed
    last_error: str = ""
    latency_ms: float | None = None  # moving average of the time to the answer's headers
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=100))

    @property
    def usable(self) -> bool:
        """Whether requests go to it (first, by price); an open one is tried last."""
        return self.state == "closed"

    def error_rate(self) -> float:
        return (self.outcomes.count(False) / len(self.outcomes)) if self.outcomes else 0.0

    def facts(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state,
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 1),
                "error_rate": round(self.error_rate(), 3), "requests": len(self.outcomes),
                "consecutive_failures": self.consecutive, "last_error": self.last_error}


class Health:
    """The breakers of every provider; ``on_change`` runs when one opens or closes."""

    def __init__(self, names: Iterable[str], on_change: Callable[[], None] | None = None,
                 *, failures: int = FAILURES_TO_OPEN, cooldown: float = COOLDOWN) -> None:
        self.breakers = {name: Breaker(name) for name in names}
        self.on_change = on_change
        self.failures = failures
        self.cooldown = cooldown

    def success(self, name: str, latency_s: float | None = None) -> None:
        b = self.breakers.get(name)
        if b is None:
            return
        b.outcomes.append(True)
        b.consecutive = 0
        if latency_s is not None:
            ms = latency_s * 1000
            b.latency_ms = ms if b.latency_ms is None else b.latency_ms * 0.8 + ms * 0.2
        if b.state != "closed":
            b.state = "closed"
            self._changed()

    def failure(self, name: str, reason: str, *, refused: bool = False) -> None:
        b = self.breakers.get(name)
        if b is None:
            return
        now = time.monotonic()
        b.outcomes.append(False)
        b.consecutive += 1
        b.last_failure = now
        b.last_error = reason[:200]
        if b.state == "closed" and (refused or b.consecutive >= self.failures):
            b.state = "open"
            b.opened_until = now + self.cooldown
            self._changed()
        elif b.state == "half-open":  # the probe failed: another cool-down
            b.state = "open"
            b.opened_until = now + self.cooldown
        elif b.state == "closed" and b.consecutive == 1:
            self._changed()  # ties go to the least recently failed: it moved back

    def due(self) -> list[str]:
        """Open providers whose cool-down is over: probe them now (they turn half-open)."""
        now = time.monotonic()
        due = []
        for b in self.breakers.values():
            if b.state == "open" and now >= b.opened_until:
                b.state = "half-open"
                due.append(b.name)
        return due

    def facts(self) -> list[dict[str, Any]]:
        return [b.facts() for b in self.breakers.values()]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
