"""``routstr models``: the models offered, with their USD prices and what they cost in sats now.

The prices are read as the proxy reads them (``MODELS_PATH``, falling back to
``models.example.json``) and converted at the rate the proxy would use: ``BTC_USD_PRICE``, or
the median of the live sources (``BTC_USD_SOURCES``) fetched now, as the proxy fetches them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from routstr_addon.amounts import sats
from routstr_addon.metering.pricing import ModelPrice, Pricing, RateKeeper, load_models
from routstr_addon.settings import Config

from .common import JsonOpt, console, err, fail, load_config

__all__ = ["Rate", "fetch_live_rate", "models_app", "read_models"]

models_app = typer.Typer(help="The models offered and their prices in USD and sats.",
                         no_args_is_help=True)

PACKAGE_EXAMPLE = Path(__file__).resolve().parent.parent / "models.example.json"


@contextmanager
def quiet_rate_logs() -> Iterator[None]:
    """The rate fetcher logs each failing source; the CLI says it once, its own way (and a
    full-screen dashboard must not be written over)."""
    log = logging.getLogger("routstr_addon.metering.pricing")
    before, sink = log.propagate, logging.NullHandler()
    log.propagate = False
    log.addHandler(sink)  # else logging's last resort prints to stderr
    try:
        yield
    finally:
        log.removeHandler(sink)
        log.propagate = before


def provider_models(config: Config, pricing: Pricing) -> bool:
    """With providers configured (PROVIDERS_PATH, OPENAI_API_KEY…): put their catalog into
    ``pricing`` as the proxy builds it (each model's offers, best first; models priced from
    OpenRouter's list as last saved in DATA_DIR). False with UPSTREAM_BASE_URL alone."""
    if all(p.shorthand for p in config.providers):
        return False
    from routstr_addon.upstreams.catalog import Catalog, Router

    router = Router(pricing, config.providers)
    static = {p.name: read_models(config)[1] for p in config.providers if p.shorthand}
    catalog = Catalog(config.providers, router, config.data_dir, config.openrouter_models_url,
                      static)
    catalog.load_snapshot()
    catalog.publish()
    return True


def read_models(config: Config) -> tuple[Path | None, dict[str, ModelPrice]]:
    """The models the proxy would offer, and the file they came from (as the addon finds it:
    MODELS_PATH, else models.example.json here, else the one shipped). Exits 2 on a bad file."""
    path: Path | None = config.models_path
    if path is None or not path.is_file():
        path = next((p for p in (Path("models.example.json"), PACKAGE_EXAMPLE) if p.is_file()),
                    None)
        if path is None:
            if config.model_based_pricing:
                raise fail(f"MODELS_PATH: {config.models_path} does not exist and there is no "
                           "models.example.json to fall back to", 2)
            return None, {}
    try:
        return path, load_models(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fail(f"MODELS_PATH: cannot read {path}: {e}", 2) from None


@dataclass(frozen=True, slots=True)
class Rate:
    """A BTC/USD rate and where it came from: ``fixed`` (BTC_USD_PRICE), ``given`` (--rate),
    ``live`` (fetched at ``updated_at``) or ``none`` (no source answered)."""

    btc_usd: Fraction | None
    source: str
    updated_at: float | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"btc_usd": None if self.btc_usd is None else float(self.btc_usd),
                "source": self.source, "updated_at": self.updated_at, "error": self.error}


def fetch_live_rate(config: Config, pricing: Pricing | None = None,
                    timeout: float = 5.0) -> Rate:
    """The live rate now, fetched as the proxy does (RateKeeper over BTC_USD_SOURCES)."""
    pricing = pricing or Pricing({}, config.exchange_fee, config.upstream_provider_fee)
    keeper = RateKeeper(pricing, config.btc_usd_sources, config.price_refresh_interval,
                        timeout=timeout)
    error: str | None = None
    try:
        with quiet_rate_logs():
            ok = asyncio.run(keeper.refresh())
    except Exception as e:  # any failure is "no rate", said once
        ok, error = False, str(e)
    if not ok or pricing.rate is None:
        names = ", ".join(name for name, _ in config.btc_usd_sources)
        return Rate(None, "none", None, error or f"no BTC/USD source answered ({names})")
    return Rate(pricing.rate, "live", pricing.rate_updated or time.time())


def configured_rate(config: Config) -> Rate | None:
    """BTC_USD_PRICE as a rate, or None when the rate is live."""
    if config.btc_usd_price is None:
        return None
    return Rate(Fraction(config.btc_usd_price), "fixed")


def _parse_rate(text: str) -> Fraction:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise fail(f"--rate: expected a number of US dollars per bitcoin, got {text!r}",
                   2) from None
    if not value.is_finite() or value <= 0:
        raise fail(f"--rate: must be positive, got {text!r}", 2)
    return Fraction(value)


def model_json(model: ModelPrice, pricing: Pricing, config: Config) -> dict[str, Any]:
    pricing_info = model.info.get("pricing") or {}
    if not config.model_based_pricing:
        fixed = config.cost_per_request_msat / 1000
        sats_pricing: dict[str, float] | None = {"prompt": 0.0, "completion": 0.0,
                                                 "request": fixed, "max_cost": fixed}
    else:
        sats_pricing = pricing.sats_pricing(model)
    return {
        "id": model.id,
        "name": model.info.get("name") or model.id,
        "context_length": model.context_length,
        "max_completion_tokens": model.max_completion_tokens,
        "pricing": {k: str(v) for k, v in pricing_info.items()},  # USD, as models.json has them
        "sats_pricing": sats_pricing,
    }


def _per_million(value: float | Fraction) -> str:
    number = float(value) * 1_000_000
    if number == 0:
        return "0"
    return f"{number:,.2f}" if abs(number) >= 0.1 else f"{number:.3g}"


@models_app.command("list")
def models_list(
    rate: Annotated[str | None, typer.Option(
        help="Price at this BTC/USD rate (US dollars per bitcoin) instead of BTC_USD_PRICE or "
             "the live rate.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The models of MODELS_PATH with their USD prices and their sats prices at the current
    BTC/USD rate: BTC_USD_PRICE, or the live rate fetched now from BTC_USD_SOURCES.

    Prices per token (USD as in models.json; sats with the EXCHANGE_FEE and
    UPSTREAM_PROVIDER_FEE multipliers, as /v1/models publishes them); the table shows them per
    million tokens. With no rate to be had, the sats prices are null (exit 1).

    Exit codes: 0 listed; 1 no BTC/USD rate could be fetched (the list is still printed);
    2 bad settings, models file or --rate."""
    config = load_config()
    pricing = Pricing({}, config.exchange_fee, config.upstream_provider_fee)
    if provider_models(config, pricing):
        path, models = None, pricing.models
    else:
        path, models = read_models(config)
        pricing = Pricing(models, config.exchange_fee, config.upstream_provider_fee)
    current = Rate(_parse_rate(rate), "given") if rate is not None else configured_rate(config)
    if current is None and config.model_based_pricing:
        with err.status("fetching the BTC/USD rate…"):
            current = fetch_live_rate(config, pricing)
    elif current is None:
        current = Rate(None, "none", error="fixed pricing (MODEL_BASED_PRICING=false)")
    if current.btc_usd is not None and pricing.rate != current.btc_usd:
        pricing.set_rate(current.btc_usd)
    missing = config.model_based_pricing and current.btc_usd is None
    entries = [model_json(m, pricing, config) for m in models.values()]
    if path is None and models:  # from providers: who serves each, and who else offers it
        for entry in entries:
            entry["providers"] = [o.provider for o in pricing.offers[entry["id"]]]
    if as_json:
        print(json.dumps({"models_path": str(path) if path else None,
                          "pricing": "model_based" if config.model_based_pricing else "fixed",
                          "rate": current.as_json(), "exchange_fee": str(config.exchange_fee),
                          "provider_fee": str(config.upstream_provider_fee),
                          "models": entries}))
        raise typer.Exit(1 if missing else 0)
    print_models(entries, current, config, path)
    if missing:
        err.print(f"[yellow]no sats prices:[/yellow] {escape(current.error or 'no rate')}; set "
                  "BTC_USD_PRICE or pass --rate", highlight=False)
    raise typer.Exit(1 if missing else 0)


def describe_rate(rate: Rate, now: float | None = None) -> str:
    if rate.btc_usd is None:
        return "[red]no rate[/red]"
    value = f"${float(rate.btc_usd):,.2f}"
    if rate.source == "live" and rate.updated_at is not None:
        age = max(0.0, (now or time.time()) - rate.updated_at)
        return f"{value} (live, {age_text(age)} ago)"
    return f"{value} ({rate.source})"


def age_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_models(entries: list[dict[str, Any]], rate: Rate, config: Config,
                 path: Path | None) -> None:
    fees = f"fees ×{config.exchange_fee} ×{config.upstream_provider_fee}"
    source = path if path is not None else "the providers (cheapest first)"
    title = (f"{len(entries)} model(s) from {source} — BTC/USD {describe_rate(rate)}, {fees}"
             if config.model_based_pricing else
             f"{len(entries)} model(s) — fixed price {sats(config.cost_per_request_msat)} "
             "sats per request")
    table = Table(title=title, title_justify="left")
    table.add_column("model", overflow="fold", min_width=22)
    by_provider = any("providers" in e for e in entries)
    if by_provider:
        table.add_column("providers", overflow="fold")
    table.add_column("context", justify="right")
    for col in ("in $/M", "out $/M", "in sats/M", "out sats/M", "sats/req", "max sats"):
        table.add_column(col, justify="right", style="green" if "sats" in col else None)
    for e in entries:
        usd = e["pricing"]
        sp = e["sats_pricing"]

        def usd_m(name: str, usd: dict[str, str] = usd) -> str:
            try:
                return _per_million(Fraction(Decimal(usd.get(name) or "0")))
            except (InvalidOperation, ValueError):
                return escape(str(usd.get(name)))

        first = [escape(e["id"])]
        if by_provider:
            first.append(escape(", ".join(e.get("providers", []))))
        table.add_row(*first, f"{e['context_length']:,}", usd_m("prompt"),
                      usd_m("completion"),
                      *((_per_million(sp["prompt"]), _per_million(sp["completion"]),
                         f"{sp['request']:,.3f}", f"{sp['max_cost']:,.3f}") if sp
                        else ("-",) * 4))
    console.print(table)
