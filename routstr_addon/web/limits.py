"""Per-client rate limits for local endpoints that cost the operator something (a Lightning
invoice is a mint quote and a ledger row): a sliding window of recent uses per address."""

from __future__ import annotations

import time
from collections import deque

__all__ = ["RateLimit"]


class RateLimit:
    """At most ``limit`` uses per client address in any ``window`` seconds; the memory is
    bounded (the least recently seen addresses are forgotten first)."""

    def __init__(self, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.window = window
        self.max_addresses = max_addresses
        self._uses: dict[str, deque[float]] = {}

    def take(self, address: str, limit: int, now: float | None = None) -> int:
        """Count one use by ``address`` and return 0, or, if it has used its ``limit`` in the
        window, count nothing and return the whole seconds until it may again."""
        now = time.monotonic() if now is None else now
        uses = self._uses.pop(address, None)  # re-inserted last: dict order is recency
        if uses is None:
            uses = deque()
            while len(self._uses) >= self.max_addresses:
                del self._uses[next(iter(self._uses))]
        self._uses[address] = uses
        while uses and uses[0] <= now - self.window:
            uses.popleft()
        if len(uses) >= limit:
            return max(1, int(uses[0] + self.window - now + 0.999))
        uses.append(now)
        return 0
