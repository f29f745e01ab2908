"""Everything one configuration of the proxy runs with, built whole from its ``Config``.

The addon builds a ``Runtime`` each time its settings change and hands it to its hooks; a
runtime is never half-built: what a configuration does not have (no mints: no wallet, no ecash
payments) is None here once, and nowhere is a service missing because it is not built yet.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger
from routstr_addon.metering.meter import Meter
from routstr_addon.metering.pricing import Pricing, load_models
from routstr_addon.observe.readiness import Readiness, Seen
from routstr_addon.payments.cashu import Payments
from routstr_addon.payments.lightning import Invoices
from routstr_addon.payments.payouts import Payouts
from routstr_addon.settings import Config, SettingError
from routstr_addon.web import AdminState, Services

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
    seen: Seen  # when the upstream last answered (stamped on the request path)

    @classmethod
    def build(cls, config: Config, admin: AdminState | None = None) -> Runtime:
        """Open the ledger, load prices and make the services; ``admin``: the dashboard's
        sessions and login limits to keep from the runtime this one replaces."""
        pricing = Pricing(_models(config), config.exchange_fee, config.upstream_provider_fee)
        if config.btc_usd_price is not None:
            pricing.set_rate(config.btc_usd_price)
        ledger = Ledger(config.database_url)
        try:
            wallet = Wallet.from_config(ledger, config) if config.cashu_mints else None
        except BaseException:
            ledger.close()
            raise
        ledger.defer_checkpoints()
        invoices = payments = payouts = None
        if wallet is not None:
            invoices = Invoices(ledger, wallet)
            payments = Payments(ledger, wallet, invoices, config.swap_untrusted_mints)
            payouts = Payouts(ledger, wallet, config, payments)
        seen = Seen()
        services = Services(config, ledger, pricing, wallet, payments, invoices,
                            admin or AdminState())
        services.readiness = Readiness(config, ledger, pricing, wallet, seen)
        return cls(config, ledger, pricing, Meter(config, ledger, pricing), services, wallet,
                   payments, invoices, payouts, seen)

    async def close(self) -> None:
        """At shutdown: leave the process registry, close the mints' connections, checkpoint
        and close the ledger."""
        with contextlib.suppress(Exception):
            self.ledger.unregister_instance()
        if self.wallet is not None:
            await self.wallet.close()
        if self.services.readiness is not None:
            await self.services.readiness.close()
        try:
            self.ledger.checkpoint()
        finally:
            self.ledger.close()


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
        return load_models(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SettingError(f"MODELS_PATH: cannot read {path}: {e}") from None
