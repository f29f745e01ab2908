"""Every reservation ends: the sweeper closes those nobody else will.

A reservation is orphaned when the proxy process that made it is gone (a crash, ``kill -9``,
a host that stopped sending heartbeats) or when it has seen no activity for
``RESERVATION_TIMEOUT`` seconds. Streams that flow are touched as they flow, so a long stream
is never swept; a request stuck on a hung upstream is. An orphan that delivered text is charged
an estimate of it (from what the last touch recorded); one that delivered nothing is released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from routstr_addon.ledger import Settlement
from routstr_addon.metering.meter import Meter
from routstr_addon.metering.usage import Usage, estimate_tokens

__all__ = ["Sweeper"]

logger = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.ledger = meter.ledger
        self.timeout = float(meter.config.reservation_timeout)
        self.heartbeat_every = max(0.5, min(5.0, self.timeout / 4))
        self.stale_after = 6 * self.heartbeat_every
        self.on_swept: Callable[[list[Settlement]], None] | None = None  # metrics count them

    def sweep(self) -> list[Settlement]:
        """Close every orphaned reservation; returns what was done."""
        closed = []
        for held in self.ledger.orphans(self.timeout, self.stale_after):
            done = self.close(held)
            if done is not None:
                closed.append(done)
        _, gone = self.ledger.instances(self.stale_after)
        if gone:
            self.ledger.forget_instances(gone)
        return closed

    def close(self, held: dict[str, Any]) -> Settlement | None:
        """Charge what an orphaned request delivered (estimated), or release it."""
        request_id = held["request_id"]
        delivered = int(held["delivered"] or 0)
        if delivered <= 0:
            done = self.ledger.release(request_id, "swept: nothing delivered")
            if done is not None:
                logger.warning("released orphaned reservation %s (%d msat)", request_id,
                               done.reserved_msat)
            return done
        usage = Usage(max(1, int(held["prompt_tokens"] or 0)), estimate_tokens(delivered),
                      estimated=True)
        cost = self.meter.cost_by_name(held["model"], usage, ceiling=held["amount_msat"])
        done = self.ledger.settle(request_id, cost, prompt_tokens=usage.prompt_tokens,
                                  completion_tokens=usage.completion_tokens,
                                  note="swept: estimated from what was delivered")
        if done is not None:
            logger.warning("settled orphaned reservation %s: %d msat for ~%d tokens delivered",
                           request_id, done.charged_msat, usage.completion_tokens)
        return done

    async def run(self) -> None:
        """Heartbeat and sweep, from the start (a restart finds what a crash left)."""
        while True:
            try:
                self.ledger.heartbeat()
                closed = self.sweep()
                if closed and self.on_swept is not None:
                    self.on_swept(closed)
            except Exception:
                logger.exception("reservation sweep failed")
            await asyncio.sleep(self.heartbeat_every)
