"""The live catalog: every provider's priced models, and the order a request tries them in.

A provider's models come from its models file, its inline list, or its own ``GET /models``
(``models: fetch``); models without their own prices take OpenRouter's, from its public model
list. That list and the fetched ones are refreshed every ``MODELS_REFRESH_INTERVAL`` seconds
and kept in a snapshot on disk (``$DATA_DIR/catalog.json``), so a restart with no network
serves the last good catalog; a refresh that fails, or answers nonsense, changes nothing.

``Router`` orders each model's offers: usable providers first, cheapest first (ties: higher
``priority``, then the least recently failed), open ones last; it writes that order into the
``Pricing`` the meter reads, once per change rather than once per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from routstr_addon.ledger import Ledger
from routstr_addon.ledger.upstreams import Override
from routstr_addon.metering.pricing import ModelPrice, Pricing
from routstr_addon.upstreams.health import Health
from routstr_addon.upstreams.providers import ModelSpec, ProviderSpec

if TYPE_CHECKING:
    from routstr_addon.upstreams.live import LiveProviders

__all__ = ["Catalog", "Router", "client_for", "follow_overrides", "probe_forever",
           "provider_headers"]

logger = logging.getLogger("routstr")

SNAPSHOT = "catalog.json"


def client_for(timeout: float, tor_proxy_url: str = "") -> httpx.AsyncClient:
    """An HTTP client for providers' lists and probes: ``.onion`` hosts through
    ``TOR_PROXY_URL`` (the proxy resolves their names), others directly."""
    mounts = None
    if tor_proxy_url:
        proxy = tor_proxy_url.replace("socks5h://", "socks5://", 1)  # httpx: the name is sent
        mounts = {"all://*.onion": httpx.AsyncHTTPTransport(proxy=httpx.Proxy(proxy))}
    return httpx.AsyncClient(timeout=timeout, trust_env=False, mounts=mounts)


def provider_headers(provider: ProviderSpec) -> list[tuple[str, str]]:
    """What a provider gets on every request: its key and its own headers."""
    headers = list(provider.headers)
    if provider.api_key:
        headers.append(("authorization", f"Bearer {provider.api_key}"))
    return headers


class Router:
    """Orders each model's offers and keeps ``pricing`` in that order."""

    def __init__(self, pricing: Pricing, providers: Iterable[ProviderSpec],
                 cooldown: float = 30.0) -> None:
        self.pricing = pricing
        self.priority = {p.name: p.priority for p in providers}
        self.health = Health(self.priority, self.reorder, cooldown=cooldown)
        self._reference: dict[tuple[str, str], float] = {}  # each offer's price, to sort by

    def set_offers(self, offers: Mapping[str, list[ModelPrice]],
                   aliases: Mapping[str, str]) -> None:
        pricing = self.pricing
        # Exact prices compared once here, as floats (a reorder sorts many: health changes);
        # sats-priced offers (other nodes) at the rate of now.
        self._reference = {o.key: float(pricing.reference(o))
                           for group in offers.values() for o in group}
        pricing.set_offers({m: self._order(o) for m, o in offers.items()}, aliases)

    def reorder(self) -> None:
        self.pricing.reorder({m: self._order(o) for m, o in self.pricing.offers.items()})

    def _order(self, offers: Iterable[ModelPrice]) -> tuple[ModelPrice, ...]:
        breakers = self.health.breakers
        reference = self._reference
        priority = self.priority

        def rank(o: ModelPrice) -> tuple[bool, float, int, float]:
            b = breakers.get(o.provider)
            return (b is not None and not b.usable, reference.get(o.key, 0.0),
                    -priority.get(o.provider, 0), b.last_failure if b is not None else 0.0)

        return tuple(sorted(offers, key=rank))


class Catalog:
    """Every provider's models, priced; refreshed in the background."""

    def __init__(self, providers: Iterable[ProviderSpec], router: Router, data_dir: Path,
                 openrouter_url: str, static: Mapping[str, Mapping[str, ModelPrice]]) -> None:
        """``static``: models already priced, by provider (the shorthand's MODELS_PATH)."""
        self.providers = tuple(providers)
        self.router = router
        self.snapshot_path = data_dir / SNAPSHOT
        self.openrouter_url = openrouter_url
        self.static = static
        self.openrouter: dict[str, Mapping[str, Any]] = {}
        self.fetched: dict[str, list[str]] = {}
        # Routstr nodes: their /v1/models entries (with sats_pricing) and their /v1/info.
        self.nodes: dict[str, list[Mapping[str, Any]]] = {}
        self.node_info: dict[str, Mapping[str, Any]] = {}
        self.refreshed: float | None = None  # wall time of the last good refresh
        self._unpriced: set[tuple[str, str]] = set()  # already logged
        self.node_markup: Fraction | None = None  # NODE_MAX_PRICE_MARKUP: discovered nodes
        self.tor_proxy_url = ""  # TOR_PROXY_URL: how .onion providers are reached
        # The operator's overrides (admin API, kept in the ledger): model id → (offered,
        # prices replacing the catalog's); read at each publish.
        self.overrides: Callable[[], Mapping[str, tuple[bool, Mapping[str, str] | None]]] = dict
        # Operators' live changes per provider (routstr upstreams …, /admin/providers, shared
        # through the ledger): off or re-priced, by (provider, model id); model "": all of it.
        self.provider_overrides: dict[tuple[str, str], Override] = {}
        self.running = False  # ``run`` refreshes it (a provider added live may start it)

    @property
    def needs_refresh(self) -> bool:
        """Whether any provider takes its prices from OpenRouter or its models from itself."""
        return any(p.fetch or p.is_node or any(m.entry is None for m in p.models)
                   for p in self.providers)

    # -- building ---------------------------------------------------------------------------

    def load_snapshot(self) -> bool:
        try:
            data = json.loads(self.snapshot_path.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            logger.warning("catalog snapshot %s unreadable (%s); waiting for a refresh",
                           self.snapshot_path, e)
            return False
        if not isinstance(data, dict):
            return False
        self.openrouter = _openrouter_entries(data.get("openrouter"))
        fetched = data.get("fetched")
        if isinstance(fetched, dict):
            self.fetched = {str(k): [str(i) for i in v if isinstance(i, str)]
                            for k, v in fetched.items() if isinstance(v, list)}
        nodes = data.get("nodes")
        if isinstance(nodes, dict):
            self.nodes = {str(k): [e for e in v if isinstance(e, dict)]
                          for k, v in nodes.items() if isinstance(v, list)}
        info = data.get("node_info")
        if isinstance(info, dict):
            self.node_info = {str(k): v for k, v in info.items() if isinstance(v, dict)}
        saved = data.get("saved_at")
        self.refreshed = float(saved) if isinstance(saved, int | float) else None
        return True

    def publish(self) -> int:
        """Build the offers from what is known now and hand them to the router; returns how
        many models are offered."""
        offers: dict[str, list[ModelPrice]] = {}
        aliases: dict[str, str] = {}
        overrides = self.overrides()
        by_provider = self.provider_overrides
        for provider in self.providers:
            whole = by_provider.get((provider.name, ""))
            if whole is not None and whole.disabled:
                continue
            fee = Fraction(provider.fee) if provider.fee is not None else None
            if provider.is_node:
                for entry in self.nodes.get(provider.name, ()):
                    if not overrides.get(str(entry.get("id")), (True, None))[0]:
                        continue  # withdrawn by the operator (its USD prices do not apply)
                    try:
                        price = ModelPrice.from_node_entry(entry, provider.name, fee)
                    except (ValueError, KeyError, TypeError, ArithmeticError) as e:
                        logger.warning("node %s: model %s left out: %s", provider.name,
                                       entry.get("id"), e)
                        continue
                    offers.setdefault(price.id, []).append(price)
                continue
            for public_id, spec, entry in self._models(provider):
                override = by_provider.get((provider.name, public_id))
                if override is not None:
                    if override.disabled:
                        continue
                    entry = _repriced(entry, override)
                enabled, prices = overrides.get(public_id, (True, None))
                if not enabled:
                    continue
                if prices:
                    entry = {**entry, "pricing": {**(entry.get("pricing") or {}), **prices}}
                try:
                    price = ModelPrice.from_entry({**entry, "id": public_id}, provider.name,
                                                  spec.upstream_id, fee)
                except (ValueError, KeyError, TypeError, ArithmeticError) as e:
                    logger.warning("provider %s: model %s left out: %s", provider.name,
                                   public_id, e)
                    continue
                offers.setdefault(public_id, []).append(price)
                for alias in spec.aliases:
                    aliases.setdefault(alias, public_id)
        if self.node_markup is not None:
            offers = self._within_markup(offers, self.node_markup)
        self.router.set_offers(offers, aliases)
        return len(offers)

    def _within_markup(self, offers: dict[str, list[ModelPrice]],
                       markup: Fraction) -> dict[str, list[ModelPrice]]:
        """Discovered nodes' offers only within ``markup`` of the cheapest of each model."""
        discovered = {p.name for p in self.providers if p.discovered}
        if not discovered:
            return offers
        reference = self.router.pricing.reference
        kept: dict[str, list[ModelPrice]] = {}
        for model, listed in offers.items():
            cheapest = min(reference(o) for o in listed)
            kept[model] = [o for o in listed if o.provider not in discovered
                           or reference(o) <= cheapest * markup]
        return kept

    def _models(self, provider: ProviderSpec) -> Iterable[tuple[str, ModelSpec, Mapping[str,
                                                                                         Any]]]:
        """(public id, its spec, its priced entry) for each model the provider offers now."""
        static = self.static.get(provider.name)
        if static is not None:
            for model in static.values():
                yield model.id, ModelSpec(model.id, model.upstream_id), model.info
            return
        if provider.fetch:
            for upstream_id in self.fetched.get(provider.name, ()):
                entry = self._match(provider, upstream_id)
                if entry is None:
                    self._log_unpriced(provider, upstream_id)
                    continue
                yield str(entry["id"]), ModelSpec(str(entry["id"]), upstream_id), entry
            return
        for spec in provider.models:
            entry = spec.entry
            if entry is None:
                entry = self._match(provider, spec.id) or self._match(provider, spec.upstream_id)
                if entry is None:
                    self._log_unpriced(provider, spec.id)
                    continue
            yield spec.id, spec, entry

    def _match(self, provider: ProviderSpec, model_id: str) -> Mapping[str, Any] | None:
        """OpenRouter's entry for a provider's model: its id as is, with the provider's
        prefix, or the one OpenRouter model whose name after the slash it is."""
        known = self.openrouter
        found = known.get(model_id) or known.get(provider.openrouter_prefix + model_id)
        if found is None and "/" not in model_id:
            matches = [e for i, e in known.items() if i.split("/", 1)[-1] == model_id]
            found = matches[0] if len(matches) == 1 else None
        return found

    def _log_unpriced(self, provider: ProviderSpec, model_id: str) -> None:
        if (provider.name, model_id) not in self._unpriced:
            self._unpriced.add((provider.name, model_id))
            logger.info("provider %s: model %s has no known price (not in OpenRouter's list); "
                        "not offered", provider.name, model_id)

    # -- refreshing -------------------------------------------------------------------------

    async def refresh(self, client: httpx.AsyncClient) -> bool:
        """Fetch OpenRouter's list and the fetching providers' lists; what fails keeps its
        last good value. True if anything new was taken."""
        taken = False
        try:
            resp = await client.get(self.openrouter_url)
            resp.raise_for_status()
            entries = _openrouter_entries(resp.json().get("data"))
            if not entries:
                raise ValueError("no priced model in the answer")
            self.openrouter = entries
            taken = True
        except Exception as e:
            logger.warning("OpenRouter's model list not refreshed (%s); keeping the last "
                           "(%d models)", _reason(e), len(self.openrouter))
        for provider in self.providers:
            if provider.is_node:
                taken = await self.refresh_node(client, provider) or taken
                continue
            if provider.fetch:
                taken = await self.refresh_list(client, provider) or taken
        if taken:
            self.refreshed = time.time()
            self._save()
            self.publish()
        return taken

    async def refresh_list(self, client: httpx.AsyncClient, provider: ProviderSpec) -> bool:
        """A provider's own model list (``models: fetch``); a failure keeps the last."""
        try:
            resp = await client.get(f"{provider.base_url}/models",
                                    headers=provider_headers(provider))
            resp.raise_for_status()
            data = resp.json().get("data")
            ids = [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]
            if not ids:
                raise ValueError("no model in the answer")
            self.fetched[provider.name] = ids
            return True
        except Exception as e:
            logger.warning("provider %s: model list not refreshed (%s); keeping the last "
                           "(%d models)", provider.name, _reason(e),
                           len(self.fetched.get(provider.name, ())))
            return False

    async def refresh_node(self, client: httpx.AsyncClient, provider: ProviderSpec) -> bool:
        """A Routstr node's models with their sats prices, and its /v1/info (its mints)."""
        try:
            resp = await client.get(f"{provider.base_url}/models")
            resp.raise_for_status()
            data = resp.json().get("data")
            entries: list[Mapping[str, Any]] = [
                m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)
                and isinstance(m.get("sats_pricing"), dict) and _max_cost(m) > 0]
            if not entries:
                raise ValueError("no model with sats_pricing in the answer")
            self.nodes[provider.name] = entries
        except Exception as e:
            logger.warning("node %s: model list not refreshed (%s); keeping the last "
                           "(%d models)", provider.name, _reason(e),
                           len(self.nodes.get(provider.name, ())))
            return False
        try:
            resp = await client.get(f"{provider.base_url}/info")
            resp.raise_for_status()
            info = resp.json()
            if isinstance(info, dict):
                self.node_info[provider.name] = info
        except Exception as e:
            logger.info("node %s: /v1/info not read (%s)", provider.name, _reason(e))
        return True

    def _save(self) -> None:
        data = {"saved_at": self.refreshed, "openrouter": list(self.openrouter.values()),
                "fetched": self.fetched, "nodes": self.nodes, "node_info": self.node_info}
        tmp = self.snapshot_path.with_suffix(".tmp")
        try:
            self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.snapshot_path)
        except OSError as e:
            logger.warning("catalog snapshot not written (%s)", e)

    async def run(self, interval: float, wait: float = 20.0, retry: float = 15.0) -> None:
        """Refresh now and every ``interval`` seconds (sooner while nothing is known yet);
        ``wait``: seconds one source may take."""
        self.running = True
        async with client_for(wait, self.tor_proxy_url) as client:
            while True:
                try:
                    await self.refresh(client)
                except Exception:  # never let the refresher die
                    logger.exception("catalog refresh failed")
                await asyncio.sleep(interval if self.refreshed is not None
                                    else min(interval, retry))


async def probe_forever(catalog: Catalog, wait: float, every: float = 2.0) -> None:
    """Ask each provider whose cool-down is over for its ``/models``; any answer but 429 or
    5xx takes it back, anything else opens it for another cool-down."""
    health = catalog.router.health
    async with client_for(wait, catalog.tor_proxy_url) as client:
        while True:
            await asyncio.sleep(every)
            providers = {p.name: p for p in catalog.providers}  # nodes may have joined
            for name in health.due():
                provider = providers.get(name)
                if provider is None or provider.upstream is None:
                    continue
                started = time.monotonic()
                try:
                    resp = await client.get(f"{provider.base_url}/models",
                                            headers=provider_headers(provider))
                except httpx.HTTPError as e:
                    health.failure(name, f"probe: {_reason(e)}")
                    continue
                if resp.status_code == 429 or resp.status_code >= 500:
                    health.failure(name, f"probe: HTTP {resp.status_code}")
                else:
                    logger.info("provider %s answers again; back in use", name)
                    health.success(name, time.monotonic() - started)


def _repriced(entry: Mapping[str, Any], override: Override) -> Mapping[str, Any]:
    pricing = dict(entry.get("pricing") or {})
    if override.prompt is not None:
        pricing["prompt"] = override.prompt
    if override.completion is not None:
        pricing["completion"] = override.completion
    return {**entry, "pricing": pricing}


async def follow_overrides(catalog: Catalog, ledger: Ledger, every: float = 3.0,
                           live: LiveProviders | None = None) -> None:
    """Apply operators' live changes made by any process (the CLI, /admin) within seconds;
    ``live`` (``upstreams.live.LiveProviders``): also the providers they added or removed."""
    seen: tuple[int, float] | None = None
    while True:
        if live is not None:
            await live.follow()
        try:
            version = ledger.upstreams.version()
            if version != seen:
                overrides = {(o.provider, o.model): o for o in ledger.upstreams.all()}
                if seen is not None or overrides:
                    catalog.provider_overrides = overrides
                    catalog.publish()
                    logger.info("routstr: provider changes applied (%d in force)",
                                len(overrides))
                seen = version
        except Exception as e:  # the database away: keep what is in force, try again
            logger.warning("provider changes not read: %s", e)
        await asyncio.sleep(every)


def _openrouter_entries(data: Any) -> dict[str, Mapping[str, Any]]:
    """OpenRouter's list, keeping only entries the proxy can price."""
    entries: dict[str, Mapping[str, Any]] = {}
    if not isinstance(data, list):
        return entries
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        try:
            ModelPrice.from_entry(entry)
        except (ValueError, KeyError, TypeError, ArithmeticError):
            continue
        entries[entry["id"]] = entry
    return entries


def _max_cost(entry: Mapping[str, Any]) -> float:
    """A node's published maximum for a model (what a token must carry), 0 if none: a model
    without one cannot be paid per request, so it is not offered."""
    value = entry["sats_pricing"].get("max_cost")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number and number != float("inf") else 0.0


def _reason(e: Exception) -> str:
    if isinstance(e, httpx.HTTPStatusError):
        return f"HTTP {e.response.status_code}"
    return f"{type(e).__name__}: {e}"[:200]
