"""Providers operators add or remove while the proxy runs (``routstr upstreams add``/``remove``,
``POST``/``DELETE /admin/api/providers``), shared through the ledger's ``upstream_providers``.

Each process polls the table's version (one cheap query) and, when it changes, reads every
entry exactly as the providers file would be read, then puts the new ones in the catalog, the
router, the breakers and the route, and takes the removed ones out. The configured providers
(PROVIDERS_PATH, OPENAI_API_KEY…, UPSTREAM_BASE_URL) are never touched here: a ledger entry
whose name they already use is ignored (logged once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from routstr_addon.ledger import Ledger
from routstr_addon.proxy.route import Route
from routstr_addon.upstreams.catalog import Catalog, client_for
from routstr_addon.upstreams.health import Breaker
from routstr_addon.upstreams.providers import ProviderError, ProviderSpec, live_provider

__all__ = ["LiveProviders", "add_provider", "added_rows", "describe", "remove_provider"]

logger = logging.getLogger("routstr")


class LiveProviders:
    def __init__(self, catalog: Catalog, route: Route, ledger: Ledger,
                 configured: Iterable[str], refresh_interval: float = 300.0) -> None:
        """``refresh_interval``: MODELS_REFRESH_INTERVAL, for a catalog that was not being
        refreshed until a provider needing OpenRouter's prices or its own list joined."""
        self.catalog = catalog
        self.refresh_interval = refresh_interval
        self._refresher: asyncio.Task[None] | None = None
        self.route = route
        self.ledger = ledger
        self.configured = frozenset(configured)
        self.applied: dict[str, str] = {}  # name → the entry in force (its JSON)
        self._seen: tuple[int, float] | None = None
        self._refused: set[tuple[str, str]] = set()  # already logged

    async def follow(self) -> None:
        """One look at the table; the changes applied, new fetching providers' lists read."""
        try:
            version = self.ledger.providers.version()
            if version == self._seen:
                return
            rows = self.ledger.providers.all()
        except Exception as e:  # the database away: keep what is in force, try again
            logger.warning("added providers not read: %s", e)
            return
        self._seen = version
        joined = self.apply(rows)
        catalog = self.catalog
        catalog.publish()  # before any await: no request is aimed at one removed
        fetching = [p for p in joined if p.fetch]
        if not catalog.running and any(p.fetch or any(m.entry is None for m in p.models)
                                       for p in joined):
            # Its prices (or list) come from outside: refreshed from now on, at once.
            catalog.running = True
            self._refresher = asyncio.get_running_loop().create_task(
                catalog.run(self.refresh_interval))
        elif fetching:
            async with client_for(15.0, self.catalog.tor_proxy_url) as client:
                for provider in fetching:
                    await self.catalog.refresh_list(client, provider)
            self.catalog.publish()

    def apply(self, rows: Iterable[tuple[str, str]]) -> list[ProviderSpec]:
        """Make the providers in force those of ``rows``; returns the ones that joined."""
        wanted: dict[str, str] = {}
        for name, entry in rows:
            if name in self.configured:
                self._refuse(name, "", "the name is a configured provider's")
            else:
                wanted[name] = entry
        for name in [n for n, e in self.applied.items() if wanted.get(n) != e]:
            self._leave(name)
        joined = []
        for name, entry in wanted.items():
            if name in self.applied:
                continue
            try:
                spec = live_provider(json.loads(entry), os.environ)
            except (ProviderError, ValueError) as e:
                self._refuse(name, entry, str(e))
                continue
            if spec is None or spec.name != name:
                self.applied[name] = entry  # enabled: false: in force as nothing
                continue
            self._join(spec)
            self.applied[name] = entry
            joined.append(spec)
        return joined

    def _join(self, spec: ProviderSpec) -> None:
        catalog = self.catalog
        catalog.providers = (*catalog.providers, spec)
        router = catalog.router
        router.priority[spec.name] = spec.priority
        router.health.breakers.setdefault(spec.name, Breaker(spec.name))
        self.route.add(spec)
        logger.info("routstr: provider %s added (%s)", spec.name, spec.base_url)

    def _leave(self, name: str) -> None:
        catalog = self.catalog
        catalog.providers = tuple(p for p in catalog.providers if p.name != name)
        catalog.fetched.pop(name, None)
        catalog.router.priority.pop(name, None)
        catalog.router.health.breakers.pop(name, None)
        self.route.remove(name)
        self.applied.pop(name, None)
        logger.info("routstr: provider %s removed", name)

    def _refuse(self, name: str, entry: str, why: str) -> None:
        if (name, entry) not in self._refused:
            self._refused.add((name, entry))
            logger.warning("routstr: added provider %s not used: %s", name, why)


def add_provider(ledger: Ledger, configured: Iterable[str], raw: Mapping[str, Any],
                 env: Mapping[str, str]) -> ProviderSpec | None:
    """Check ``raw`` as a providers-file entry and store it for every process; the one-line
    ``ProviderError`` otherwise. Returns what it reads as here (None: ``enabled: false``)."""
    spec = live_provider(dict(raw), env)
    name = str(raw["name"])
    if name in set(configured):
        raise ProviderError(f"provider {name!r}: name: already configured (PROVIDERS_PATH or "
                            "the environment); choose another name")
    try:
        entry = json.dumps(dict(raw))
    except (TypeError, ValueError):
        raise ProviderError(f"provider {name!r}: expected plain values (text, numbers, "
                            "lists, mappings)") from None
    if not ledger.providers.add(name, entry):
        raise ProviderError(f"provider {name!r}: name: already added (routstr upstreams "
                            "remove it first)")
    return spec


def remove_provider(ledger: Ledger, configured: Iterable[str], name: str) -> None:
    """Remove an added provider (and the live changes made to it)."""
    if name in set(configured):
        raise ProviderError(f"provider {name!r}: configured (PROVIDERS_PATH or the "
                            "environment), not added: disable it instead")
    if not ledger.providers.remove(name):
        raise ProviderError(f"provider {name!r}: no such added provider")


def describe(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What may be shown of an entry: never its key (``api_key_env``: the variable's name)."""
    models = raw.get("models")
    return {"name": raw.get("name"), "base_url": raw.get("base_url"), "fee": raw.get("fee"),
            "priority": raw.get("priority", 0),
            "models": models if isinstance(models, str) else
            [m if isinstance(m, str) else m.get("id") for m in models
             if isinstance(m, str | dict)] if isinstance(models, list) else None,
            "api_key_env": raw.get("api_key_env"), "enabled": raw.get("enabled", True) is True}


def added_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """The added providers as ``describe`` shows them (entries that are not JSON skipped)."""
    rows = []
    for _, entry in ledger.providers.all():
        try:
            raw = json.loads(entry)
        except ValueError:
            continue
        if isinstance(raw, dict):
            rows.append(describe(raw))
    return rows
