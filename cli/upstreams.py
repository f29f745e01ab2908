"""``routstr upstreams``: the providers requests go to, and operators' live changes to them.

A provider or one of its models can be turned off, and a model re-priced (USD per token), while
the proxy runs: the change is a row in the ledger, and every proxy process on that database
applies it within seconds. What exists stays what the configuration says (PROVIDERS_PATH,
OPENAI_API_KEY…, UPSTREAM_BASE_URL).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from routstr_addon.metering.pricing import Pricing
from routstr_addon.settings import Config
from routstr_addon.upstreams.live import add_provider, added_rows, remove_provider
from routstr_addon.upstreams.providers import ProviderError, ProviderSpec, model_entries

from .common import JsonOpt, console, fail, load_config, open_ledger
from .models import provider_models, read_models

__all__ = ["upstreams_app"]

upstreams_app = typer.Typer(help="The upstream providers, and turning them (or their models) "
                                 "off, on or re-priced while the proxy runs.",
                            no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m",
                                       help="One of the provider's models (its public id) "
                                            "rather than the whole provider.")]


def _known(config: Config, provider: str, model: str) -> None:
    names = [p.name for p in config.providers]
    with open_ledger(config) as ledger:
        added = [str(r["name"]) for r in added_rows(ledger)]
    if provider in added:
        return
    if provider not in names:
        raise fail(f"no provider {provider!r} (configured: {', '.join(names)}"
                   f"{'; added: ' + ', '.join(added) if added else ''})", 2)
    if model:
        pricing = Pricing({}, config.exchange_fee, config.upstream_provider_fee)
        if not provider_models(config, pricing):
            pricing = Pricing(read_models(config)[1], config.exchange_fee,
                              config.upstream_provider_fee)
        if model not in pricing.offers:
            raise fail(f"no model {model!r} is offered (see routstr models list)", 2)


@upstreams_app.command("list")
def upstreams_list(as_json: JsonOpt = False) -> None:
    """The providers as configured, with the changes in force (off, re-priced)."""
    config = load_config()
    with open_ledger(config) as ledger:
        overrides = ledger.upstreams.all()
        added = added_rows(ledger)
    rows = []
    for p in config.providers:
        mine = [o for o in overrides if o.provider == p.name]
        rows.append({
            "name": p.name, "base_url": p.base_url or "(the reverse mode's target)",
            "fee": str(p.fee if p.fee is not None else config.upstream_provider_fee),
            "priority": p.priority,
            "models": "fetch" if p.fetch else ("MODELS_PATH" if p.shorthand else len(p.models)),
            "enabled": not any(o.model == "" and o.disabled for o in mine),
            "source": "configured",
            "changes": [{"model": o.model, "disabled": o.disabled, "prompt": o.prompt,
                         "completion": o.completion} for o in mine if o.model]})
    for a in added:  # never its key
        mine = [o for o in overrides if o.provider == a["name"]]
        rows.append({
            "name": a["name"], "base_url": a["base_url"],
            "fee": str(a["fee"] if a["fee"] is not None else config.upstream_provider_fee),
            "priority": a["priority"],
            "models": a["models"] if isinstance(a["models"], str) else len(a["models"] or ()),
            "enabled": a["enabled"] and not any(o.model == "" and o.disabled for o in mine),
            "source": "added",
            "changes": [{"model": o.model, "disabled": o.disabled, "prompt": o.prompt,
                         "completion": o.completion} for o in mine if o.model]})
    if as_json:
        print(json.dumps({"providers": rows}))
        return
    table = Table(title=f"{len(rows)} provider(s)", title_justify="left")
    for col in ("name", "base URL", "fee", "priority", "models", "state", "model changes"):
        table.add_column(col, overflow="fold")
    for r in rows:
        changes = ", ".join(
            f"{c['model']} off" if c["disabled"] else
            f"{c['model']} ${c['prompt'] or '-'}/${c['completion'] or '-'}"
            for c in r["changes"])  # type: ignore[attr-defined]
        table.add_row(escape(str(r["name"])), escape(str(r["base_url"])), str(r["fee"]),
                      str(r["priority"]), str(r["models"]),
                      "[green]on[/green]" if r["enabled"] else "[red]off[/red]",
                      escape(changes))
    console.print(table)


@upstreams_app.command("health")
def upstreams_health(
    wait: Annotated[float, typer.Option(help="Seconds each provider may take.")] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Ask every provider now (its GET /models, with its key), all at once: whether it
    answers, how fast, and how many models it lists. The running proxy's own view (breakers,
    error rates) is on /admin/providers.

    Exit codes: 0 every provider answered; 1 at least one did not."""
    config = load_config()
    results = asyncio.run(_probe_all(config, wait))
    if as_json:
        print(json.dumps({"providers": results}))
    else:
        table = Table(title="providers, asked now", title_justify="left")
        for col in ("name", "base URL", "answer", "ms", "models", "error"):
            table.add_column(col, overflow="fold")
        for r in results:
            ok = r["ok"]
            table.add_row(escape(r["name"]), escape(r["base_url"]),
                          "[green]ok[/green]" if ok else "[red]failed[/red]",
                          "-" if r["ms"] is None else f"{r['ms']:.0f}",
                          "-" if r["models"] is None else str(r["models"]),
                          escape(r["error"] or ""))
        console.print(table)
    raise typer.Exit(0 if all(r["ok"] for r in results) else 1)


async def _probe_all(config: Config, wait: float) -> list[dict[str, Any]]:
    from routstr_addon.upstreams.catalog import provider_headers

    async with httpx.AsyncClient(timeout=wait, trust_env=False) as client:
        async def probe(provider: ProviderSpec) -> dict[str, Any]:
            result: dict[str, Any] = {"name": provider.name, "base_url": provider.base_url,
                                      "ok": False, "status": None, "ms": None,
                                      "models": None, "error": None}
            if provider.upstream is None:
                result["error"] = "the reverse mode's target: not known here"
                return result
            started = time.monotonic()
            try:
                resp = await client.get(f"{provider.base_url}/models",
                                        headers=provider_headers(provider))
            except httpx.HTTPError as e:
                result["error"] = f"{type(e).__name__}: {e}"[:200]
                return result
            result["ms"] = (time.monotonic() - started) * 1000
            result["status"] = resp.status_code
            result["ok"] = resp.status_code < 400
            if not result["ok"]:
                result["error"] = f"HTTP {resp.status_code}"
                return result
            try:
                data = resp.json().get("data")
                result["models"] = len(data) if isinstance(data, list) else None
            except (ValueError, AttributeError):
                pass
            return result

        return list(await asyncio.gather(*(probe(p) for p in config.providers)))


def _set(provider: str, model: str, disabled: bool) -> None:
    config = load_config()
    _known(config, provider, model)
    with open_ledger(config) as ledger:
        current = next((o for o in ledger.upstreams.all()
                        if o.provider == provider and o.model == model), None)
        if not disabled and (current is None or (current.prompt is None
                                                 and current.completion is None)):
            ledger.upstreams.clear(provider, model)  # nothing else changed: as configured
        else:
            ledger.upstreams.set(provider, model, disabled=disabled,
                                 prompt=current.prompt if current else None,
                                 completion=current.completion if current else None)
    what = f"model {model} of {provider}" if model else f"provider {provider}"
    console.print(f"{what}: {'off' if disabled else 'on'} (running proxies follow within "
                  "seconds)")


@upstreams_app.command("disable")
def upstreams_disable(provider: str, model: ModelOpt = "") -> None:
    """Stop sending requests to a provider (or one of its models), without a restart."""
    _set(provider, model, True)


@upstreams_app.command("enable")
def upstreams_enable(provider: str, model: ModelOpt = "") -> None:
    """Send requests to a provider (or one of its models) again."""
    _set(provider, model, False)


def _usd(name: str, raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        value = Decimal(raw)
    except InvalidOperation:
        value = Decimal(-1)
    if not value.is_finite() or value < 0:
        raise fail(f"{name}: expected USD per token such as 0.0000025, got {raw!r}", 2)
    return str(value)


@upstreams_app.command("price")
def upstreams_price(
    provider: str,
    model: Annotated[str, typer.Argument(help="The model's public id.")],
    prompt: Annotated[str | None, typer.Option(help="USD per prompt token.")] = None,
    completion: Annotated[str | None, typer.Option(help="USD per completion token.")] = None,
    clear: Annotated[bool, typer.Option(help="Back to the configured prices.")] = False,
) -> None:
    """Re-price one model of a provider (USD per token, before the fees), without a restart."""
    config = load_config()
    _known(config, provider, model)
    if not clear and prompt is None and completion is None:
        raise fail("give --prompt and/or --completion, or --clear", 2)
    with open_ledger(config) as ledger:
        current = next((o for o in ledger.upstreams.all()
                        if o.provider == provider and o.model == model), None)
        disabled = current.disabled if current else False
        if clear and not disabled:
            ledger.upstreams.clear(provider, model)
        else:
            keep_prompt = current.prompt if current else None
            keep_completion = current.completion if current else None
            ledger.upstreams.set(
                provider, model, disabled=disabled,
                prompt=None if clear else (_usd("--prompt", prompt) or keep_prompt),
                completion=None if clear else (_usd("--completion", completion)
                                               or keep_completion))
    console.print(f"model {model} of {provider}: "
                  f"{'configured prices' if clear else 're-priced'} (running proxies follow "
                  "within seconds)")


@upstreams_app.command("add")
def upstreams_add(
    name: Annotated[str, typer.Argument(help="Its name (unique among all providers).")],
    base_url: Annotated[str, typer.Option("--base-url", help="Its OpenAI-compatible API, "
                                          "e.g. https://api.openai.com/v1.")],
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="Its key: kept in the ledger in clear (see --api-key-env).")] = None,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", help="The variable each proxy process reads its key from.")] = None,
    fee: Annotated[str | None, typer.Option(help="Multiplier on its prices (1.05 = 5 %); "
                                            "default UPSTREAM_PROVIDER_FEE.")] = None,
    priority: Annotated[int, typer.Option(help="Ties between equal prices: higher "
                                          "first.")] = 0,
    models: Annotated[str, typer.Option(help="'fetch' (its GET /models, priced by "
                                        "OpenRouter's list) or ids a,b,….")] = "fetch",
    models_file: Annotated[Path | None, typer.Option(
        "--models-file", help="Its models with their own prices (any models.json shape); "
                              "stored inline, so every host reads the same.")] = None,
) -> None:
    """Add a provider while the proxy runs: checked as an entry of the providers file, then
    every proxy process on this database uses it within seconds. Its key is never shown."""
    config = load_config()
    raw: dict[str, Any] = {"name": name, "base_url": base_url, "priority": priority}
    if api_key is not None:
        raw["api_key"] = api_key
    if api_key_env is not None:
        raw["api_key_env"] = api_key_env
    if fee is not None:
        raw["fee"] = fee
    try:
        if models_file is not None:
            raw["models"] = model_entries(f"provider {name!r}", models_file.expanduser())
        elif models.strip() == "fetch":
            raw["models"] = "fetch"
        else:
            raw["models"] = [m.strip() for m in models.split(",") if m.strip()]
        with open_ledger(config) as ledger:
            add_provider(ledger, (p.name for p in config.providers), raw, os.environ)
    except ProviderError as e:
        raise fail(str(e), 2) from None
    console.print(f"provider {escape(name)} added (running proxies use it within seconds)")


@upstreams_app.command("remove")
def upstreams_remove(name: str) -> None:
    """Remove a provider added with `routstr upstreams add` (configured ones: disable them)."""
    config = load_config()
    try:
        with open_ledger(config) as ledger:
            remove_provider(ledger, (p.name for p in config.providers), name)
    except ProviderError as e:
        raise fail(str(e), 2) from None
    console.print(f"provider {escape(name)} removed (running proxies stop using it within "
                  "seconds)")
