"""The proxy's work off the request path, one asyncio task each, for one runtime.

Live BTC/USD rates, SQLite checkpoints, the wallet's mints, Lightning invoices, payouts and
refunds, the sweeper of orphaned reservations (with this process's heartbeat), the retry of
settlements the ledger could not take, and the Nostr listing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from routstr_addon.ledger import Ledger
from routstr_addon.metering.meter import Meter
from routstr_addon.metering.pricing import RateKeeper
from routstr_addon.metering.sweeper import Sweeper
from routstr_addon.runtime import Runtime

__all__ = ["Background"]

logger = logging.getLogger("routstr")


class Background:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tasks: dict[str, asyncio.Task[Any]] = {}

    def start(self) -> None:
        """Start every task this runtime's settings ask for (in the running event loop)."""
        self.stop()
        rt, config = self.runtime, self.runtime.config
        work: dict[str, Coroutine[Any, Any, None]] = {}
        if config.model_based_pricing and config.btc_usd_price is None:
            rates = RateKeeper(rt.pricing, config.btc_usd_sources, config.price_refresh_interval)
            work["rates"] = rates.run()
        if rt.ledger.is_sqlite:
            work["checkpoint"] = checkpoints(rt.ledger)
        if rt.wallet is not None:
            work["wallet"] = rt.wallet.start()
        if rt.invoices is not None:
            work["invoices"] = rt.invoices.watch()
        if rt.payouts is not None:
            work["payouts"] = rt.payouts.loop(config.payout_interval, "payouts")
            work["refunds"] = rt.payouts.loop(config.refund_processing_interval, "refunds")
        if rt.ledger.instance_id is None:
            rt.ledger.register_instance()
        sweeper = Sweeper(rt.meter)
        if rt.metrics is not None:
            sweeper.on_swept = rt.metrics.swept
        work["sweeper"] = sweeper.run()
        work["settlements"] = retry_settlements(rt.meter)
        if config.nostr.secret_key:  # NSEC: list this proxy on the Nostr relays, daily
            from routstr_addon.discovery.nostr import announce_forever

            work["nostr"] = announce_forever(config)
        loop = asyncio.get_running_loop()
        self.tasks = {name: loop.create_task(job, name=f"routstr {name}")
                      for name, job in work.items()}

    def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks = {}


async def checkpoints(ledger: Ledger, every: float = 1.0) -> None:
    """Copy SQLite's WAL into the database each second, in a worker thread."""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(ledger.checkpoint)
        except Exception as e:  # a busy database: try again next time
            logger.warning("ledger checkpoint failed: %s", e)


async def retry_settlements(meter: Meter, every: float = 2.0) -> None:
    """Settlements the ledger could not take (disk full, database away), tried again every
    few seconds, so the charge is exact once the ledger is back."""
    while True:
        await asyncio.sleep(every)
        meter.retry_unsettled()
