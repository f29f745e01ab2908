"""``/admin/api/``: the operator's API for scripts (the shape of the Routstr protocol's RIP-07),
JSON with ``Authorization: Bearer <ADMIN_TOKEN>``.

=========================================  =========================================================
``GET  /admin/api/settings``               every setting, secrets redacted
``GET  /admin/api/keys?q=&page=``          keys (newest first; ``q``: start of id or label)
``POST /admin/api/keys``                   ``{"balance_sats", "expiry_days", "label"}`` → the key
``GET  /admin/api/keys/{id}``              one key (full 64-hex id) and its open reservations
``POST /admin/api/keys/{id}/disable``      (and ``/enable``)
``GET  /admin/api/balances``               the books and the figures over all keys
``GET  /admin/api/upstreams``              the upstream (one, from the settings)
``GET  /admin/api/providers``              configured and added providers (never a key)
``POST /admin/api/providers``              a providers-file entry → added on every process
``DELETE /admin/api/providers/{name}``     an added provider removed (configured: disable)
``GET  /admin/api/models``                 the models offered, with their prices
``PATCH /admin/api/models/{id}``           ``{"enabled", "pricing"}``: offer it or not, prices
``POST /admin/api/withdraw``               ``{"amount_sats", "mint"}`` → a token of the margin
``GET  /admin/api/logs/{request_id}``      what the ledger knows of one request
``GET  /admin/api/logs/recent?kind=&key=`` the newest journal rows (``before``: older ones)
``GET  /admin/api/temporary-balances``     what requests in flight hold (open reservations)
``GET  /admin/api/journal``                the operator's changes (dashboard and API)
=========================================  =========================================================

The token is compared in constant time; an address that sends a wrong one five times in a
minute is refused for the rest of it (429), counted in the ledger across processes. Every change
is journaled (``admin_actions``) with its actor. Secrets are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from mitmproxy import http

from routstr_addon import settings
from routstr_addon.ecash.mint import MintError, MintUnreachable
from routstr_addon.ecash.wallet import WalletError
from routstr_addon.errors import ApiError, json_response
from routstr_addon.ledger import KINDS, KeyState
from routstr_addon.observe.exposition import token_matches
from routstr_addon.web import Peer, Services

__all__ = ["PREFIX", "handle"]

logger = logging.getLogger("routstr.admin")

PREFIX = "/admin/api/"
MAX_BODY = 16 * 1024
MAX_KEY_SATS = 2_100_000_000_000_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Answer = http.Response | Awaitable[http.Response]


def handle(services: Services, request: http.Request, peer: Peer) -> Answer:
    """Any method on a path under /admin/api/: authenticate, then route."""
    try:
        _authenticate(services, request, peer)
        path = request.path.split("?", 1)[0].removeprefix(PREFIX).strip("/")
        parts = path.split("/") if path else []
        route = _route(request.method, parts)
        if route is None:
            raise ApiError(404, f"No such admin API call: {request.method} {PREFIX}{path}.",
                           type="invalid_request_error", code="not_found")
        return route(services, request, parts)
    except ApiError as e:
        return e.response()


def _authenticate(services: Services, request: http.Request, peer: Peer) -> None:
    token = services.config.admin_token
    if not token:
        raise ApiError(404, "The admin API is off: set ADMIN_TOKEN to turn it on.",
                       type="invalid_request_error", code="admin_api_off")
    limiter, address = services.admin.limiter, "api:" + (peer.address or "unknown")
    wait = limiter.retry_after(address)
    if wait:
        raise ApiError(429, f"Too many wrong tokens; try again in {wait} seconds.",
                       type="rate_limit_exceeded", code="rate_limit_exceeded",
                       headers={"retry-after": str(wait)})
    if not token_matches(request.headers.get("authorization", ""), token):
        limiter.failed(address)
        logger.warning("admin api: wrong or missing token from %s", peer.address or "unknown")
        raise ApiError(401, "Send the admin token as 'Authorization: Bearer <ADMIN_TOKEN>'.",
                       type="invalid_request_error", code="invalid_admin_token")


Route = Callable[[Services, http.Request, list[str]], Answer]


def _route(method: str, parts: list[str]) -> Route | None:
    match method, parts:
        case "GET", ["settings"]:
            return _settings
        case "GET", ["keys"]:
            return _keys
        case "POST", ["keys"]:
            return _create_key
        case "GET", ["keys", _]:
            return _key
        case "POST", ["keys", _, "disable" | "enable"]:
            return _set_disabled
        case "GET", ["balances"]:
            return _balances
        case "GET", ["upstreams"]:
            return _upstreams
        case "GET", ["providers"]:
            return _providers
        case "POST", ["providers"]:
            return _add_provider
        case "DELETE", ["providers", _]:
            return _remove_provider
        case "GET", ["models"]:
            return _models
        case "PATCH", ["models", *name] if name:  # model ids hold slashes
            return _override_model
        case "POST", ["withdraw"]:
            return _withdraw
        case "GET", ["logs", "recent"]:
            return _recent
        case "GET", ["temporary-balances"]:
            return _held
        case "GET", ["logs", _]:
            return _request_log
        case "GET", ["journal"]:
            return _journal
    return None


# --- helpers ----------------------------------------------------------------------------------


def _body(request: http.Request) -> dict[str, Any]:
    raw = request.raw_content or b""
    if len(raw) > MAX_BODY:
        raise ApiError(413, "The body is too large.", code="request_too_large")
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "The body must be JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
    return data


def _query(request: http.Request) -> dict[str, str]:
    return {k: v for k, v in request.query.items()}


def _whole(value: Any, name: str, low: int, high: int, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a whole number from {low} to {high}.",
                       param=name, code="invalid_value")
    return value


def _key_json(state: KeyState) -> dict[str, Any]:
    return {"id": state.key_hash, "label": state.label, "balance_msat": state.balance_msat,
            "reserved_msat": state.reserved_msat, "available_msat": state.available_msat,
            "total_spent_msat": state.total_spent_msat, "total_requests": state.total_requests,
            "created_at": state.created_at, "expires_at": state.expires_at,
            "disabled": state.disabled, "backed": state.backed,
            "refund_address": state.refund_address}


def _journal_change(services: Services, action: str, target: str, detail: str) -> None:
    services.ledger.admin.journal(time.time(), "api", action, target, detail)
    logger.info("admin api: %s %s", action, target[:16])


# --- reading ----------------------------------------------------------------------------------


def _settings(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    from mitmproxy import ctx

    values: dict[str, Any] = {}
    for s in settings.SETTINGS:
        value = getattr(ctx.options, s.option, s.default)
        if s.secret:
            value = "<redacted>" if value else ""
        values[s.env] = value
    return json_response(200, {"settings": values})


def _keys(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    query = _query(request)
    try:
        page_no = max(1, min(int(query.get("page", "1")), 100_000))
    except ValueError:
        page_no = 1
    page = services.ledger.reports.keys_page(query.get("q", "")[:100], page_no)
    return json_response(200, {"keys": [_key_json(k) for k in page.rows],
                               "page": page_no, "next_page": page.next})


def _key(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    key_hash = parts[1].lower()
    state = services.ledger.key(key_hash) if _HEX64.fullmatch(key_hash) else None
    if state is None:
        raise ApiError(404, "No such key (give its full 64-hex id).", code="key_not_found")
    return json_response(200, {**_key_json(state),
                               "reservations": services.ledger.open_reservations(key_hash)})


def _balances(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    wallet = services.wallet
    books = services.ledger.books(list(wallet.mints) if wallet is not None else [])
    stats = services.ledger.reports.key_stats()
    return json_response(200, {"books": books.as_json(), "keys": {
        "count": stats.keys, "funded": stats.funded_keys, "disabled": stats.disabled_keys,
        "balance_msat": stats.balance_msat, "reserved_msat": stats.reserved_msat,
        "backed_msat": stats.backed_msat, "credit_msat": stats.credit_msat,
        "spent_msat": stats.spent_msat, "requests": stats.requests,
        "in_flight": stats.in_flight}})


def _upstreams(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    """The providers in use (configured, added, found on Nostr), keys redacted, with each
    one's breaker (``upstreams.health``)."""
    health = ({f["name"]: f for f in services.health.facts()}
              if services.health is not None else {})
    return json_response(200, {"upstreams": [{
        "id": p.name, "enabled": True, "type": p.type, "priority": p.priority,
        "base_url": p.upstream.origin + p.upstream.base_path if p.upstream else None,
        "api_key": "<redacted>" if p.api_key else "",
        "models": [m.id for m in p.models] if p.models else None,
        "health": health.get(p.name),
    } for p in (services.catalog.providers if services.catalog is not None
                else services.config.providers)]})


def _providers(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    """Every provider: the configured ones and those added while running (name, URL, fee,
    priority, models, enabled; never a key), with the live changes in force."""
    from routstr_addon.upstreams.live import added_rows

    config = services.config
    off = {o.provider for o in services.ledger.upstreams.all() if o.model == "" and o.disabled}
    rows: list[dict[str, Any]] = [{
        "name": p.name, "source": "configured", "base_url": p.base_url or None,
        "fee": str(p.fee if p.fee is not None else config.upstream_provider_fee),
        "priority": p.priority,
        "models": "fetch" if p.fetch else [m.id for m in p.models] or None,
        "enabled": p.name not in off} for p in config.providers]
    for a in added_rows(services.ledger):
        rows.append({"name": a["name"], "source": "added", "base_url": a["base_url"],
                     "fee": str(a["fee"] if a["fee"] is not None
                                else config.upstream_provider_fee),
                     "priority": a["priority"], "models": a["models"],
                     "enabled": a["enabled"] and a["name"] not in off})
    return json_response(200, {"providers": rows})


def _add_provider(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    """A providers-file entry (name, base_url, api_key or api_key_env, fee, priority, models…)
    checked exactly as the file's, then stored for every process (this one within seconds)."""
    import os

    from routstr_addon.upstreams.live import add_provider, describe
    from routstr_addon.upstreams.providers import ProviderError

    body = _body(request)
    try:
        add_provider(services.ledger, (p.name for p in services.config.providers), body,
                     os.environ)
    except ProviderError as e:
        taken = ": name: already" in str(e)
        raise ApiError(409 if taken else 400, str(e), param="provider",
                       code="provider_exists" if taken else "invalid_provider") from None
    shown = describe(body)  # never the key
    _journal_change(services, "provider.add", str(body["name"]), json.dumps(shown))
    return json_response(201, {**shown, "source": "added"})


def _remove_provider(services: Services, request: http.Request,
                     parts: list[str]) -> http.Response:
    from routstr_addon.upstreams.live import remove_provider
    from routstr_addon.upstreams.providers import ProviderError

    name = parts[1][:64]
    configured = [p.name for p in services.config.providers]
    try:
        remove_provider(services.ledger, configured, name)
    except ProviderError as e:
        raise ApiError(409 if name in configured else 404, str(e), param="provider",
                       code="provider_configured" if name in configured
                       else "provider_not_found") from None
    _journal_change(services, "provider.remove", name, "")
    return json_response(200, {"name": name, "removed": True})


def _models(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    pricing = services.pricing
    models = []
    for model in pricing.models.values():
        entry: dict[str, Any] = {
            "id": model.id, "enabled": True, "context_length": model.context_length,
            "max_completion_tokens": model.max_completion_tokens,
            "usd": {"prompt": str(float(model.prompt)), "completion": str(float(model.completion)),
                    "request": str(float(model.request))}}
        if pricing.rate is not None:
            entry["max_cost_msat"] = pricing.max_cost(model, None, None)
        models.append(entry)
    overrides = services.ledger.admin.model_overrides()
    for entry in models:
        entry["override"] = _override_json(overrides.get(entry["id"]))
    offered = {entry["id"] for entry in models}
    models += [{"id": model_id, "enabled": False, "override": _override_json(found)}
               for model_id, found in sorted(overrides.items())
               if not found[0] and model_id not in offered]
    return json_response(200, {"models": models, "pricing": "model_based"
                               if services.config.model_based_pricing else "fixed"})


def _override_json(found: tuple[bool, dict[str, str] | None] | None) -> Any:
    return None if found is None else {"enabled": found[0], "pricing": found[1]}


_PRICE_FIELDS = ("prompt", "completion", "request", "input_cache_read")


def _override_model(services: Services, request: http.Request, parts: list[str]) -> Answer:
    """Offer a model or not, and/or replace its USD prices (models.json's fields, per token
    and per request) on every process sharing the ledger (each publishes its models again
    within seconds; this one at once). ``"pricing": null`` goes back to the catalog's."""
    model_id = "/".join(parts[1:])[:200]
    overrides = services.ledger.admin.model_overrides()
    known = services.pricing.resolve(model_id)
    if known is not None:
        model_id = known.id
    elif model_id not in overrides:
        raise ApiError(404, f"No model {model_id!r} is offered or overridden here.",
                       code="model_not_found")
    body = _body(request)
    enabled, pricing = overrides.get(model_id, (True, None))
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise ApiError(400, "'enabled' must be true or false.", param="enabled",
                           code="invalid_value")
        enabled = body["enabled"]
    if "pricing" in body:
        pricing = _prices(body["pricing"])
    services.ledger.admin.set_model_override(model_id, enabled, pricing, time.time())
    _journal_change(services, "model.override", model_id,
                    json.dumps({"enabled": enabled, "pricing": pricing}))
    if services.catalog is not None:
        services.catalog.publish()
    return json_response(200, {"id": model_id,
                               "override": _override_json((enabled, pricing))})


def _prices(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value or set(value) - set(_PRICE_FIELDS):
        raise ApiError(400, f"'pricing' must be an object of USD prices ({', '.join(_PRICE_FIELDS)}"
                       ") or null.", param="pricing", code="invalid_value")
    out = {}
    for name, price in value.items():
        try:
            number = Decimal(str(price))
        except InvalidOperation:
            number = Decimal(-1)
        if isinstance(price, bool) or not number.is_finite() or number < 0 or number > 1000:
            raise ApiError(400, f"'pricing.{name}' must be a USD amount from 0 to 1000.",
                           param=f"pricing.{name}", code="invalid_value")
        out[name] = str(number)
    return out


def _request_log(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    request_id = parts[1]
    if not _REQUEST_ID.fullmatch(request_id):
        raise ApiError(400, "Not a request id.", code="invalid_value")
    trail = services.ledger.admin.request_trail(request_id)
    if not trail["entries"] and not trail["reservation"] and not trail["payment"]:
        raise ApiError(404, "The ledger knows no request of this id.", code="request_not_found")
    return json_response(200, trail)


def _recent(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    query = _query(request)
    kind = query.get("kind", "")
    try:
        before = int(query["before"]) if "before" in query else None
    except ValueError:
        before = None
    page = services.ledger.reports.journal_page(query.get("key", "").strip().lower()[:64],
                                                kind if kind in KINDS else "", before)
    return json_response(200, {"entries": page.rows, "before": page.next if page.has_more
                               else None, "note": page.note})


def _held(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    held = services.ledger.open_reservations()
    return json_response(200, {"reservations": held,
                               "total_msat": sum(int(r["amount_msat"]) for r in held)})


def _journal(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    query = _query(request)
    try:
        before = int(query["before"]) if "before" in query else None
    except ValueError:
        before = None
    return json_response(200, {"actions": services.ledger.admin.actions(100, before)})


# --- changing ---------------------------------------------------------------------------------


def _create_key(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    body = _body(request)
    balance = _whole(body.get("balance_sats"), "balance_sats", 0, MAX_KEY_SATS, default=0)
    days = body.get("expiry_days")
    if days is not None:
        days = _whole(days, "expiry_days", 1, 36500)
    label = body.get("label")
    if label is not None and not isinstance(label, str):
        raise ApiError(400, "'label' must be a string.", param="label", code="invalid_value")
    label = " ".join((label or "").split())[:100] or None
    expires_at = time.time() + days * 86400 if days is not None else None
    key, state = services.ledger.create_key(balance * 1000, expires_at=expires_at, label=label,
                                            note="created by operator (admin api)")
    _journal_change(services, "key.create", state.key_hash,
                    json.dumps({"balance_sats": balance, "expiry_days": days, "label": label}))
    return json_response(201, {"api_key": key, **_key_json(state)})


def _set_disabled(services: Services, request: http.Request, parts: list[str]) -> http.Response:
    key_hash, disabled = parts[1].lower(), parts[2] == "disable"
    if not _HEX64.fullmatch(key_hash) or services.ledger.set_disabled(key_hash, disabled) is None:
        raise ApiError(404, "No such key (give its full 64-hex id).", code="key_not_found")
    _journal_change(services, "key.disable" if disabled else "key.enable", key_hash, "")
    state = services.ledger.key(key_hash)
    assert state is not None
    return json_response(200, _key_json(state))


def _withdraw(services: Services, request: http.Request, parts: list[str]) -> Answer:
    wallet = services.wallet
    if wallet is None:
        raise ApiError(400, "Withdrawals need a wallet: set CASHU_MINTS.",
                       code="ecash_not_accepted")
    body = _body(request)
    amount = _whole(body.get("amount_sats"), "amount_sats", 1, MAX_KEY_SATS)
    mint_url = body.get("mint") or wallet.primary.url
    if mint_url not in wallet.mints:
        raise ApiError(400, "'mint' must be one of the trusted mints.", param="mint",
                       code="invalid_value")
    return _withdraw_later(services, amount, str(mint_url))


async def _withdraw_later(services: Services, amount: int, mint_url: str) -> http.Response:
    wallet = services.wallet
    assert wallet is not None
    async with services.admin.withdrawing:  # one at a time: the margin is read, then spent
        margin = services.ledger.books(list(wallet.mints)).margin_msat
        if amount * 1000 > margin:
            return ApiError(400, f"{amount} sats is more than the margin ({max(0, margin)} "
                            "msat); nothing was withdrawn.", code="over_margin").response()
        owner = f"operator-api-{uuid.uuid4().hex}"
        try:
            token, fee = await wallet.send(mint_url, "sat", amount, owner)
        except WalletError as e:
            return ApiError(400, f"{e}. Nothing was withdrawn.", code="wallet_error").response()
        except MintError as e:
            return ApiError(502, f"The mint refused: {e}. Nothing was withdrawn.",
                            type="server_error", code="mint_error").response()
        except MintUnreachable as e:
            text = (f"{e}. The mint may have made the token: the proofs picked stay reserved "
                    f"under owner {owner}." if e.sent else f"{e}. Nothing was withdrawn.")
            return ApiError(502, text, type="server_error", code="mint_unavailable").response()
    _journal_change(services, "withdraw", mint_url,
                    json.dumps({"amount_sats": amount, "fee_sats": fee, "owner": owner}))
    return json_response(200, {"token": token, "amount_sats": amount - fee, "fee_sats": fee,
                               "mint": mint_url})
