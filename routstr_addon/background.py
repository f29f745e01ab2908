"""The proxy's work off the request path, one asyncio task each, for one runtime.

Live BTC/USD rates, SQLite checkpoints, the wallet's mints, Lightning invoices, payouts and
refunds, the sweeper of orphaned reservations (with this process's heartbeat), the retry of
settlements the ledger could not take, and the Nostr listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from routstr_addon.ledger import Ledger
from routstr_addon.metering.meter import Meter
from routstr_addon.metering.pricing import RateKeeper
from routstr_addon.metering.sweeper import Sweeper
from routstr_addon.payments.locked import LockedPayments
from routstr_addon.runtime import Runtime
from routstr_addon.upstreams.catalog import follow_overrides, probe_forever
from routstr_addon.upstreams.live import LiveProviders

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
        if rt.payments is not None and rt.payments.locked is not None:
            work["locked"] = redeem_locked(rt.payments.locked, config.locked_redeem_interval)
        if rt.payouts is not None:
            work["payouts"] = rt.payouts.loop(config.payout_interval, "payouts")
            work["refunds"] = rt.payouts.loop(config.refund_processing_interval, "refunds")
        if rt.ledger.instance_id is None:
            rt.ledger.register_instance()
        live = LiveProviders(rt.catalog, rt.route, rt.ledger, (p.name for p in config.providers),
                             config.models_refresh_interval)
        work["provider_overrides"] = follow_overrides(rt.catalog, rt.ledger, live=live)
        if rt.catalog.needs_refresh or config.nodes.enabled:  # prices, providers' lists
            work["catalog"] = rt.catalog.run(config.models_refresh_interval)
            rt.catalog.running = True
        if rt.failover is not None:
            work["failover"] = rt.failover.start()
            work["probes"] = probe_forever(rt.catalog, config.upstream_connect_timeout)
            if rt.failover.payer is not None:  # tokens a stop left in flight to nodes
                work["node_tokens"] = rt.failover.payer.sweep_forever()
        if config.nodes.enabled:  # AUTO_DISCOVER_NODES: nodes listed on the relays join
            from routstr_addon.upstreams.discover import NodeFinder

            finder = NodeFinder(config, rt.catalog, rt.route,
                                rt.failover.payer if rt.failover is not None else None)
            work["nodes"] = finder.run(config.models_refresh_interval)
        work["overrides"] = watch_overrides(rt)
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
        failover = self.runtime.failover
        if failover is not None and failover.port:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(failover.stop())


async def checkpoints(ledger: Ledger, every: float = 1.0) -> None:
    """Copy SQLite's WAL into the database each second, in a worker thread."""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(ledger.checkpoint)
        except Exception as e:  # a busy database: try again next time
            logger.warning("ledger checkpoint failed: %s", e)


async def watch_overrides(rt: Runtime, every: float = 5.0) -> None:
    """Publish the models again when the operator's overrides change (the admin API, on any
    process sharing the ledger)."""
    seen: float | None = None
    while True:
        try:
            version = rt.ledger.admin.overrides_version()
            if seen is not None and version != seen:
                rt.catalog.publish()
            seen = version
        except Exception as e:  # the ledger away: try again next time
            logger.warning("model overrides not read: %s", e)
        await asyncio.sleep(every)


async def retry_settlements(meter: Meter, every: float = 2.0) -> None:
    """Settlements the ledger could not take (disk full, database away), tried again every
    few seconds, so the charge is exact once the ledger is back."""
    while True:
        await asyncio.sleep(every)
        meter.retry_unsettled()


async def redeem_locked(locked: LockedPayments, every: float, refill_every: float = 30.0) -> None:
    """Locked payments off the request path: the change pool topped up (checked every
    ``refill_every`` seconds), and received locked proofs swapped in batches every ``every``
    seconds, or sooner when a locktime comes near."""
    next_redeem = asyncio.get_running_loop().time() + min(every, refill_every)
    while True:
        await asyncio.sleep(min(refill_every, every))
        try:
            await locked.refill()
        except Exception:
            logger.exception("change pool refill failed")
        now = asyncio.get_running_loop().time()
        soon = locked.ledger.locked.earliest_locktime()
        if now < next_redeem and (soon is None or soon - time.time() > 2 * every):
            continue
        next_redeem = now + every
        try:
            result = await locked.redeem()
            if result.redeemed or result.lost or result.pending:
                logger.info("locked proofs: %d redeemed, %d lost, %d batches pending",
                            result.redeemed, result.lost, result.pending)
        except Exception:
            logger.exception("redeeming locked proofs failed")
