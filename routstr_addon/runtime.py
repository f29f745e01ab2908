"""Everything one configuration of the proxy runs with, built whole from its ``Config``.

The addon builds a ``Runtime`` each time its settings change and hands it to its hooks; a
runtime is never half-built: what a configuration does not have (no mints: no wallet, no ecash
payments) is None here once, and nowhere is a service missing because it is not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routstr_addon.datadir import exposed, private_dir, sqlite_files
from routstr_addon.ecash.seed import MNEMONIC_FILE
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import DATABASE_ERRORS, Ledger
from routstr_addon.metering.meter import Meter
from routstr_addon.metering.pricing import Pricing, load_models
from routstr_addon.observe.readiness import Readiness, Seen
from routstr_addon.payments.cashu import Payments
from routstr_addon.payments.lightning import Invoices
from routstr_addon.payments.locked import LockedPayments
from routstr_addon.payments.payouts import Payouts
from routstr_addon.proxy.route import Route
from routstr_addon.settings import Config, SettingError
from routstr_addon.upstreams.catalog import Catalog, Router
from routstr_addon.upstreams.failover import Failover
from routstr_addon.upstreams.nodes import NodePayer
from routstr_addon.web import AdminState, Services
from routstr_addon.web.adminshared import SharedLoginLimiter, SharedSessions

if TYPE_CHECKING:
    from routstr_addon.observe.metrics import Metrics

__all__ = ["Runtime"]

logger = logging.getLogger("routstr")


@dataclass(slots=True, eq=False)
class Runtime:
    config: Config
    ledger: Ledger
    pricing: Pricing
    meter: Meter
    services: Services  # what local endpoints read (and the dashboard's sessions)
    wallet: Wallet | None  # None: no CASHU_MINTS, so no ecash in or out
    payments: Payments | None
    invoices: Invoices | None
    payouts: Payouts | None
    catalog: Catalog  # every provider's priced models, refreshed in the background
    router: Router  # their order, and each provider's health
    route: Route  # which provider a request goes to
    failover: Failover | None  # the hop trying the next provider; None with one provider
    seen: Seen  # when an upstream last answered (stamped on the request path)
    metrics: Metrics | None = None  # None: METRICS_TOKEN and METRICS_PORT unset

    @classmethod
    def build(cls, config: Config, admin: AdminState | None = None,
              metrics: Metrics | None = None) -> Runtime:
        """Open the ledger, load prices and make the services; ``admin``: the dashboard's
        state to keep from the runtime this one replaces (its sessions and login limits live
        in the ledger, shared by every process); ``metrics``: the process's, to count in."""
        pricing = Pricing({}, config.exchange_fee, config.upstream_provider_fee)
        if config.btc_usd_price is not None:
            pricing.set_rate(config.btc_usd_price)
        router = Router(pricing, config.providers, config.upstream_cooldown)
        static = {p.name: _models(config) for p in config.providers if p.shorthand}
        catalog = Catalog(config.providers, router, config.data_dir,
                          config.openrouter_models_url, static)
        if catalog.needs_refresh:
            catalog.load_snapshot()
        catalog.tor_proxy_url = config.nostr.tor_proxy_url
        if config.nodes.enabled:
            catalog.node_markup = Fraction(config.nodes.max_markup)
        nodes = any(p.is_node for p in config.providers) or config.nodes.enabled
        if nodes and not config.cashu_mints:
            raise SettingError("other Routstr nodes (a provider of type routstr, or "
                               "AUTO_DISCOVER_NODES) are paid with ecash: set CASHU_MINTS "
                               "(and fund the wallet)")
        failover = (Failover(router.health, config.upstream_connect_timeout,
                             config.upstream_timeout, config.nostr.tor_proxy_url)
                    if len(config.providers) > 1 or nodes or any(
                        p.upstream is not None and p.upstream.host.endswith(".onion")
                        for p in config.providers) else None)
        route = Route(config.providers, router.health, failover, pricing)
        private_dir(config.data_dir)
        for line in exposed([config.data_dir, *sqlite_files(config.database_url),
                             config.data_dir / MNEMONIC_FILE]):
            logger.warning("routstr: %s", line)
        ledger = Ledger(config.database_url)
        try:
            # Operators' live changes to the providers (routstr upstreams …).
            catalog.provider_overrides = {(o.provider, o.model): o
                                          for o in ledger.upstreams.all()}
            wallet = Wallet.from_config(ledger, config) if config.cashu_mints else None
        except BaseException:
            ledger.close()
            raise
        ledger.defer_checkpoints()
        catalog.overrides = _overrides(ledger)  # the operator's word on models
        catalog.publish()
        invoices = payments = payouts = None
        if wallet is not None:
            invoices = Invoices(ledger, wallet)
            locked = (LockedPayments(ledger, wallet, config.change_pool_per_amount)
                      if config.locked_payments and wallet.payment_key is not None else None)
            payments = Payments(ledger, wallet, invoices, config.swap_untrusted_mints, locked)
            payouts = Payouts(ledger, wallet, config, payments)
            if failover is not None and nodes:
                failover.payer = NodePayer(
                    ledger, wallet, router.health, catalog.node_info.get,
                    {p.name: p.base_url for p in config.providers if p.is_node},
                    float(config.mint_timeout), config.nostr.tor_proxy_url)
        seen = Seen()
        shared = AdminState(SharedSessions(ledger.admin), SharedLoginLimiter(ledger.admin),
                            admin.withdrawing if admin is not None else asyncio.Lock())
        services = Services(config, ledger, pricing, wallet, payments, invoices, shared,
                            payouts=payouts, health=router.health)
        services.readiness = Readiness(config, ledger, pricing, wallet, seen)
        services.metrics = metrics
        services.catalog = catalog
        if metrics is not None:
            _measure(metrics, config, ledger, pricing, wallet)
        return cls(config, ledger, pricing, Meter(config, ledger, pricing), services, wallet,
                   payments, invoices, payouts, catalog, router, route, failover, seen, metrics)

    async def close(self) -> None:
        """At shutdown: leave the process registry, close the mints' connections, checkpoint
        and close the ledger."""
        with contextlib.suppress(Exception):
            self.ledger.unregister_instance()
        if self.failover is not None:
            await self.failover.stop()
        if self.wallet is not None:
            await self.wallet.close()
        if self.services.readiness is not None:
            await self.services.readiness.close()
        try:
            self.ledger.checkpoint()
        finally:
            self.ledger.close()


def _overrides(ledger: Ledger) -> Callable[[], dict[str, Any]]:
    """The operator's model overrides as the catalog reads them: the last ones read when the
    ledger cannot answer (a catalog refresh must not fail for it)."""
    last: dict[str, Any] = {}

    def read() -> dict[str, Any]:
        nonlocal last
        try:
            last = dict(ledger.admin.model_overrides())
        except DATABASE_ERRORS as e:
            logger.warning("model overrides not read: %s", e)
        return last

    return read


def _measure(metrics: Metrics, config: Config, ledger: Ledger, pricing: Pricing,
             wallet: Wallet | None) -> None:
    """Point the process's metrics at this runtime: the ledger's books, the rate's age, the
    trusted mints' calls, and what this process is."""
    from routstr_addon import __version__

    trusted = list(wallet.mints) if wallet is not None else []
    metrics.watch_books(lambda: ledger.gauges(trusted))

    def rate_age() -> float:
        if config.btc_usd_price is not None:
            return 0.0
        return -1.0 if pricing.rate_updated is None else time.time() - pricing.rate_updated

    metrics.rate_age.set_function(rate_age)
    if wallet is not None:
        for mint in wallet.mints.values():
            mint.client.observe = metrics.mint_call
    metrics.info.info({"version": __version__, "database": ledger.database.name,
                       "pricing": "model_based" if config.model_based_pricing else "fixed",
                       "host": socket.gethostname(), "pid": str(os.getpid())})


def _models(config: Config) -> dict[str, Any]:
    """MODELS_PATH, or models.example.json (here or beside the package) when it is missing."""
    path = config.models_path
    if not path.is_file():
        fallback = Path("models.example.json")
        if not fallback.is_file():
            fallback = Path(__file__).resolve().parents[1] / "models.example.json"
        if config.model_based_pricing and not fallback.is_file():
            raise SettingError(f"MODELS_PATH: {path} does not exist and there is no "
                               "models.example.json to fall back to")
        if not fallback.is_file():
            return {}
        path = fallback
    try:
        models = load_models(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SettingError(f"MODELS_PATH: cannot read {path}: {e}") from None
    if config.model_based_pricing and not models:
        raise SettingError(f"MODELS_PATH: {path} holds no model (model-based pricing needs "
                           "at least one)")
    return models
