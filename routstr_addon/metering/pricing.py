"""Prices: models.json (OpenRouter's shape), the BTC/USD rate, and msat costs.

A request costing ``usd`` dollars costs ``ceil(usd × EXCHANGE_FEE × UPSTREAM_PROVIDER_FEE ×
1e11 / BTC_USD)`` msat (1 BTC = 1e11 msat). The arithmetic is exact: each model's prices are
turned, once per rate change, into integer numerators over one common denominator, so a cost
is a few integer multiplications and one ceiling division on the request path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "ModelPrice",
    "Pricing",
    "RateKeeper",
    "load_models",
]

logger = logging.getLogger(__name__)

MSAT_PER_BTC = 10**11

# How to read each rate source's answer (settings.RATE_SOURCES names them and their URLs).
def _read_kraken(data: Any) -> str:
    return str(next(iter(data["result"].values()))["c"][0])


def _read_coinbase(data: Any) -> str:
    return str(data["data"]["amount"])


def _read_binance(data: Any) -> str:
    return str(data["price"])


_READERS = {"kraken": _read_kraken, "coinbase": _read_coinbase, "binance": _read_binance}


# --- models ---------------------------------------------------------------------------------


NODE_ROUNDING_SATS = 1  # per request paid to another node: its charge rounded up to the sat
_NOMINAL_RATE = Fraction(100_000)  # USD per BTC, only to rank offers before a rate is known


def _usd(value: Any) -> Fraction:
    """A price as OpenRouter writes it (a decimal string, sometimes "-1" for "varies")."""
    if value in (None, ""):
        return Fraction(0)
    number = Fraction(Decimal(str(value)))
    return max(number, Fraction(0))


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's USD prices (per token, per request) and its token limits, as one provider
    offers it: ``id`` is the name clients send, ``upstream_id`` the provider's ("": whatever
    name the client used), ``fee`` its own multiplier (None: UPSTREAM_PROVIDER_FEE)."""

    id: str
    prompt: Fraction
    completion: Fraction
    request: Fraction
    cache_read: Fraction | None
    context_length: int
    max_completion_tokens: int | None
    info: Mapping[str, Any] = field(compare=False, repr=False)
    cache_write: Fraction | None = None  # Anthropic-style prompt cache writes
    provider: str = ""
    upstream_id: str = ""
    fee: Fraction | None = None
    sats: bool = False  # prices in sats, not USD: another Routstr node's ``sats_pricing``

    @property
    def key(self) -> tuple[str, str]:
        """Which price table is this offer's: one per model and provider."""
        return (self.provider, self.id)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], provider: str = "", upstream_id: str = "",
                   fee: Fraction | None = None) -> ModelPrice:
        pricing = entry.get("pricing") or {}
        top = entry.get("top_provider") or {}
        context = int(entry.get("context_length") or top.get("context_length") or 0)
        if context <= 0:
            raise ValueError(f"model {entry.get('id')!r} has no context_length")
        max_completion = top.get("max_completion_tokens")
        cache_read = pricing.get("input_cache_read")
        cache_write = pricing.get("input_cache_write")
        return cls(
            id=str(entry["id"]),
            prompt=_usd(pricing.get("prompt")),
            completion=_usd(pricing.get("completion")),
            request=_usd(pricing.get("request")),
            cache_read=None if cache_read in (None, "") else _usd(cache_read),
            context_length=context,
            max_completion_tokens=int(max_completion) if max_completion else None,
            info=entry,
            cache_write=None if cache_write in (None, "") else _usd(cache_write),
            provider=provider,
            upstream_id=upstream_id or str(entry.get("upstream_id") or ""),
            fee=fee,
        )

    @classmethod
    def from_node_entry(cls, entry: Mapping[str, Any], provider: str,
                        fee: Fraction | None = None) -> ModelPrice:
        """A model as another Routstr node lists it in its ``/v1/models``: priced by its
        ``sats_pricing`` (what that node charges, in sats per token and per request), plus
        ``NODE_ROUNDING_SATS`` per request: a node paid with ecash per request keeps its
        charge rounded up to the whole sat (its change is in sats)."""
        sats_pricing = entry.get("sats_pricing")
        if not isinstance(sats_pricing, Mapping):
            raise ValueError(f"model {entry.get('id')!r} has no sats_pricing")
        price = cls.from_entry({**entry, "pricing": {
            k: sats_pricing.get(k) for k in ("prompt", "completion", "request")}},
            provider, str(entry["id"]), fee)
        return replace(price, cache_read=None, cache_write=None, sats=True,
                       request=price.request + NODE_ROUNDING_SATS)

    @property
    def completion_limit(self) -> int:
        return min(self.max_completion_tokens or self.context_length, self.context_length)


def load_models(path: Path) -> dict[str, ModelPrice]:
    """Read models.json in any shape operators have: routstr-core's ``{"models": [...]}``,
    OpenRouter's ``{"data": [...]}``, or a bare list. An entry that cannot be priced raises
    ValueError naming it (by id, else by its position), never a model silently left out."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        entries = data
    elif isinstance(data, dict) and isinstance(data.get("models"), list):
        entries = data["models"]
    elif isinstance(data, dict) and isinstance(data.get("data"), list):
        entries = data["data"]
    else:
        raise ValueError('expected {"models": [...]} (routstr-core), {"data": [...]} '
                         "(OpenRouter) or a list of models")
    models: dict[str, ModelPrice] = {}
    for number, entry in enumerate(entries, 1):
        name = entry.get("id") if isinstance(entry, dict) else None
        label = repr(name) if isinstance(name, str) and name else f"#{number}"
        try:
            if not isinstance(entry, dict) or not isinstance(name, str) or not name:
                raise ValueError("no model id")
            price = ModelPrice.from_entry(entry)
        except (ValueError, TypeError, KeyError, ArithmeticError) as e:
            raise ValueError(f"entry {label} cannot be priced: {e}") from None
        models[price.id] = price
    return models


# --- costs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rational:
    """A model's msat prices as integer numerators over one denominator."""

    prompt: int
    completion: int
    request: int
    cache_read: int
    cache_write: int
    denominator: int

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
             written_tokens: int = 0) -> int:
        cached = min(max(cached_tokens, 0), prompt_tokens)
        written = min(max(written_tokens, 0), prompt_tokens - cached)
        total = ((prompt_tokens - cached - written) * self.prompt + cached * self.cache_read
                 + written * self.cache_write + completion_tokens * self.completion
                 + self.request)
        return -(-total // self.denominator)

    def parts(self, prompt_tokens: int, completion_tokens: int,
              cached_tokens: int = 0) -> tuple[int, int, int, int]:
        """(input, output, base, cache_read) msat of a usage, adding up to ``cost``: each part
        rounded down, and the rounding of the whole given to the output part."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        den = self.denominator
        cache_read = cached * self.cache_read // den
        prompt = ((prompt_tokens - cached) * self.prompt + cached * self.cache_read) // den
        base = self.request // den
        output = self.cost(prompt_tokens, completion_tokens, cached_tokens) - prompt - base
        return prompt, output, base, cache_read


class Pricing:
    """Converts usage into msat for every model at the current BTC/USD rate.

    ``offers`` holds every provider's offer of each model, in the order a request would try
    them now (the router keeps that order); ``models`` is the first of each, the offer that
    would serve it now: what /v1/models shows and what names resolve to.
    """

    def __init__(self, models: Mapping[str, ModelPrice], exchange_fee: Decimal,
                 provider_fee: Decimal) -> None:
        self.exchange_fee = Fraction(exchange_fee)
        self.provider_fee = Fraction(provider_fee)
        self.fee = self.exchange_fee * self.provider_fee
        self.rate: Fraction | None = None
        self.rate_updated: float | None = None
        self._tables: dict[tuple[str, str], _Rational] = {}
        self.models: dict[str, ModelPrice] = {}
        self.offers: dict[str, tuple[ModelPrice, ...]] = {}
        self._aliases: dict[str, str] = {}
        self.set_offers({model_id: (m,) for model_id, m in models.items()})

    def set_offers(self, offers: Mapping[str, tuple[ModelPrice, ...]],
                   aliases: Mapping[str, str] | None = None) -> None:
        """Replace the catalog (every offer of every model, best first), pricing it at once
        at the current rate."""
        offers = {model_id: tuple(o) for model_id, o in offers.items() if o}
        tables = self._price(offers, self.rate) if self.rate is not None else {}
        self.offers = offers
        self.models = {model_id: o[0] for model_id, o in offers.items()}
        self._aliases = {**_aliases(self.models),
                         **{a: t for a, t in (aliases or {}).items() if t in offers}}
        self._tables = tables

    def reorder(self, offers: Mapping[str, tuple[ModelPrice, ...]]) -> None:
        """The same offers in a new order (a provider's health changed): no repricing."""
        self.offers = dict(offers)
        self.models = {model_id: o[0] for model_id, o in self.offers.items()}

    def candidates(self, model: ModelPrice) -> tuple[ModelPrice, ...]:
        """Every offer of a model, in the order a request tries them now."""
        return self.offers.get(model.id) or (model,)

    def set_rate(self, btc_usd: Fraction | Decimal | str) -> None:
        rate = Fraction(Decimal(btc_usd)) if isinstance(btc_usd, str) else Fraction(btc_usd)
        if rate <= 0:
            raise ValueError("the BTC/USD rate must be positive")
        self._tables = self._price(self.offers, rate)
        self.rate = rate
        self.rate_updated = time.time()

    def fee_of(self, model: ModelPrice) -> Fraction:
        """The multiplier on a model's USD prices: the exchange fee and its provider's fee."""
        own = model.fee if model.fee is not None else self.provider_fee
        return own if model.sats else self.exchange_fee * own  # sats: nothing to exchange

    def _price(self, offers: Mapping[str, tuple[ModelPrice, ...]],
               rate: Fraction) -> dict[tuple[str, str], _Rational]:
        return {m.key: self._table(m, rate) for models in offers.values() for m in models}

    def _table(self, m: ModelPrice, rate: Fraction) -> _Rational:
        factor = self.fee_of(m) * (1000 if m.sats else MSAT_PER_BTC / rate)  # sats: nodes
        parts = [p * factor for p in
                 (m.prompt, m.completion, m.request,
                  m.cache_read if m.cache_read is not None else m.prompt,
                  m.cache_write if m.cache_write is not None else m.prompt)]
        den = math.lcm(*(p.denominator for p in parts))
        nums = [p.numerator * (den // p.denominator) for p in parts]
        return _Rational(nums[0], nums[1], nums[2], nums[3], nums[4], den)

    def _table_of(self, model: ModelPrice) -> _Rational:
        """A model's table; for an offer no longer in the catalog (its provider turned off or
        its list refreshed while a request to it was in flight), made from its own prices, so
        the request still settles. LookupError when no rate is known."""
        table = self._tables.get(model.key)
        if table is None:
            if self.rate is None:
                raise LookupError("no BTC/USD rate yet")
            table = self._table(model, self.rate)
        return table

    def reference(self, model: ModelPrice) -> Fraction:
        """A price to rank offers by (USD and sats alike): msat for a thousand prompt and a
        thousand completion tokens and one request, at the current rate (or a nominal one
        before any is known)."""
        per_unit = Fraction(1000) if model.sats else MSAT_PER_BTC / (self.rate or _NOMINAL_RATE)
        return ((model.prompt + model.completion) * 1000 + model.request) * self.fee_of(
            model) * per_unit

    def resolve(self, model: str) -> ModelPrice | None:
        """The priced model for a name a client sent (exact id, an alias, or an unambiguous
        short name): the offer that would serve it now."""
        found = self.models.get(model)
        if found is None:
            alias = self._aliases.get(model)
            found = self.models.get(alias) if alias else None
        return found

    def cost(self, model: ModelPrice, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int = 0, written_tokens: int = 0) -> int:
        """The msat cost of a request's usage. Raises LookupError when no rate is known."""
        return self._table_of(model).cost(prompt_tokens, completion_tokens, cached_tokens,
                                          written_tokens)

    def parts(self, model: ModelPrice, prompt_tokens: int, completion_tokens: int,
              cached_tokens: int = 0) -> tuple[int, int, int, int]:
        """The cost split as routstr-core's clients read it: (input, output, base,
        cache_read) msat, the first three adding up to ``cost``."""
        return self._table_of(model).parts(prompt_tokens, completion_tokens, cached_tokens)

    def usd(self, msat: int) -> float | None:
        """An msat amount in USD at the current rate (None without one)."""
        rate = self.rate
        if rate is None:
            return None
        return msat * (rate.numerator / rate.denominator) / MSAT_PER_BTC  # display: float

    def max_cost(self, model: ModelPrice, max_tokens: int | None = None,
                 prompt_bound: int | None = None, choices: int = 1, prompts: int = 1) -> int:
        """The most a request can cost: what is reserved before it is forwarded.

        See ``bounds``; the prompt is priced at the dearest of its prices (fresh, cached, or
        written to the cache).
        """
        return max(self._dearest(model, p, c)
                   for p, c in self.bounds(model, max_tokens, prompt_bound, choices, prompts))

    def bounds(self, model: ModelPrice, max_tokens: int | None = None,
               prompt_bound: int | None = None, choices: int = 1,
               prompts: int = 1) -> list[tuple[int, int]]:
        """The (prompt, completion) token counts a request's most expensive outcomes lie at.

        ``max_tokens`` (the largest cap the client gave, if any) bounds each completion, with
        the model's limit; ``prompt_bound`` bounds the prompt when its size is known (a text
        body cannot hold more tokens than bytes). ``choices`` completions are generated per
        prompt (n, best_of) and ``prompts`` prompts (a list on /v1/completions, inputs on
        /v1/embeddings) are each bounded by the context. Per prompt, prompt + completion fit in
        the context: with one prompt, the cost peaks where the prompt fills what the cap leaves,
        (context − cap) × prompt price + cap × completion price, or where the prompt is
        largest; both are returned.
        """
        cap = model.completion_limit
        if max_tokens is not None and max_tokens >= 0:
            cap = min(cap, max_tokens)
        context = model.context_length
        prompt = context * max(prompts, 1)
        if prompt_bound is not None:
            prompt = min(prompt, max(prompt_bound, 1))
        if prompts > 1:
            return [(prompt, cap * choices * prompts)]
        points = [(prompt, choices * max(0, min(cap, context - prompt)))]
        if context - cap < prompt:
            filled = max(context - cap, 0)
            points.append((filled, choices * min(cap, context - filled)))
        return points

    def _dearest(self, model: ModelPrice, prompt: int, completion: int) -> int:
        return max(self.cost(model, prompt, completion),
                   self.cost(model, prompt, completion, prompt),
                   self.cost(model, prompt, completion, 0, prompt))

    def sats_pricing(self, model: ModelPrice) -> dict[str, float] | None:
        """Per-token and maximum prices in sats, as published in /v1/models."""
        if self.rate is None:
            return None
        factor = self.fee_of(model) * (1 if model.sats else MSAT_PER_BTC / self.rate / 1000)
        max_prompt = self.cost(model, model.context_length, 0) - self.cost(model, 0, 0)
        max_completion = self.cost(model, 0, model.completion_limit) - self.cost(model, 0, 0)
        return {
            "prompt": float(model.prompt * factor),
            "completion": float(model.completion * factor),
            "request": float(model.request * factor),
            "max_prompt_cost": max_prompt / 1000,
            "max_completion_cost": max_completion / 1000,
            "max_cost": self.max_cost(model) / 1000,
        }


def _aliases(models: Mapping[str, ModelPrice]) -> dict[str, str]:
    """``gpt-4o`` for ``openai/gpt-4o``, when only one provider offers that name."""
    seen: dict[str, list[str]] = {}
    for model_id in models:
        if "/" in model_id:
            seen.setdefault(model_id.split("/", 1)[1], []).append(model_id)
    return {short: ids[0] for short, ids in seen.items() if len(ids) == 1 and short not in models}


# --- live BTC/USD ---------------------------------------------------------------------------


async def fetch_rate(client: httpx.AsyncClient,
                     sources: Iterable[tuple[str, str]]) -> Fraction | None:
    """The median of what the sources answer now; None if none of them answered."""

    async def one(name: str, url: str) -> Fraction | None:
        try:
            resp = await client.get(url)
            resp.raise_for_status()
            value = Fraction(Decimal(_READERS[name](resp.json())))
            if value <= 0:
                raise ValueError(f"non-positive price {value}")
            return value
        except Exception as e:  # any failure of one source only drops that source
            logger.warning("BTC/USD source %s failed: %s", name, e)
            return None

    results = await asyncio.gather(*(one(name, url) for name, url in sources))
    values = [v for v in results if v is not None]
    return statistics.median(values) if values else None


class RateKeeper:
    """Keeps ``pricing``'s rate fresh from live sources; the last good rate stays on failure."""

    def __init__(self, pricing: Pricing, sources: Iterable[tuple[str, str]], interval: float,
                 timeout: float = 5.0, retry: float = 10.0) -> None:
        self.pricing = pricing
        self.sources = tuple(sources)
        self.interval = interval
        self.timeout = timeout
        self.retry = retry

    async def refresh(self) -> bool:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            rate = await fetch_rate(client, self.sources)
        if rate is None:
            logger.warning("no BTC/USD source answered; keeping the last rate (%s)",
                           "none yet" if self.pricing.rate is None else float(self.pricing.rate))
            return False
        self.pricing.set_rate(rate)
        logger.info("BTC/USD rate %.2f", float(rate))
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let the refresher die
                logger.exception("BTC/USD refresh failed")
            # Without any rate, model requests are refused: try again soon rather than later.
            await asyncio.sleep(self.interval if self.pricing.rate is not None
                                else min(self.interval, self.retry))
