"""``/v1/balance/*`` (alias ``/v1/wallet/*``): a key's balance, funded and refunded in ecash.

Shapes follow the original Routstr so its clients keep working: ``create`` →
``{"api_key", "balance"}``, ``topup`` → ``{"msats"}``, ``refund`` → ``{"token", …}``; amounts
in msat.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mitmproxy import http

from routstr_addon.ecash.tokens import looks_like_token
from routstr_addon.errors import ApiError, invalid_api_key, invalid_json, json_response, no_ecash
from routstr_addon.ledger import KeyState, Limits, hash_key
from routstr_addon.metering.meter import bearer_token
from routstr_addon.payments.cashu import KeyTerms, Payments
from routstr_addon.payments.lightning import Invoices
from routstr_addon.web import Peer, Services


def _payments(services: Services) -> Payments:
    if services.payments is None:
        raise no_ecash()
    return services.payments


async def _key(services: Services, request: http.Request) -> tuple[str, KeyState]:
    """The request's key; a Cashu token as the key is redeemed into one on first use."""
    key = bearer_token(request.headers.get("authorization"))
    if looks_like_token(key):
        key = await _payments(services).key_for_token(key, request.headers.get("key-expiry-time"),
                                                      request.headers.get("refund-lnurl"))
    state = services.ledger.key(hash_key(key))
    if state is None:
        raise invalid_api_key()
    return key, state


def payer_of(services: Services, state: KeyState) -> KeyState:
    """The key whose balance ``state`` spends: its parent for a child key, else itself."""
    if state.parent_key_hash is None:
        return state
    parent = services.ledger.key(state.parent_key_hash)
    return parent if parent is not None else state


def _describe(key: str, state: KeyState, payer: KeyState | None = None) -> dict[str, Any]:
    """Ours and routstr-core's fields: a child shows its parent's balance (what it spends)
    and its own totals and limits."""
    payer = payer or state
    expiry = int(state.expires_at) if state.expires_at is not None else None
    limits = state.limits
    return {
        "api_key": key,
        "balance": payer.balance_msat,
        "reserved": payer.reserved_msat,
        "available": payer.available_msat,
        "total_spent": state.total_spent_msat,
        "total_requests": state.total_requests,
        "expiry_time": expiry,
        "refund_address": state.refund_address,
        "disabled": state.disabled,
        "is_child": state.parent_key_hash is not None,
        "balance_limit": limits.budget_msat,
        "balance_limit_reset": limits.period,
        "balance_limit_spent": state.limit_spent_msat,
        "validity_date": expiry,
        "limits": limits.describe() if limits.any else None,
    }


def _child(state: KeyState) -> dict[str, Any]:
    limits = state.limits
    expiry = int(state.expires_at) if state.expires_at is not None else None
    return {"key_id": state.key_hash[:16], "total_requests": state.total_requests,
            "total_spent": state.total_spent_msat, "balance_limit": limits.budget_msat,
            "balance_limit_reset": limits.period, "balance_limit_spent": state.limit_spent_msat,
            "validity_date": expiry, "disabled": state.disabled,
            "limits": limits.describe() if limits.any else None}


def _info(services: Services, key: str, state: KeyState) -> http.Response:
    answer = _describe(key, state, payer_of(services, state))
    if state.parent_key_hash is not None:
        answer["parent_key_preview"] = state.parent_key_hash[:8] + "..."
    else:
        children = services.ledger.children(state.key_hash)
        if children:  # the keys themselves are shown once, at creation: ids here
            answer["child_keys"] = [_child(c) for c in children]
    return json_response(200, answer)


def info(services: Services, request: http.Request,
         peer: Peer) -> http.Response | Awaitable[http.Response]:
    key = bearer_token(request.headers.get("authorization"))
    if looks_like_token(key):
        return _info_later(services, request)
    state = services.ledger.key(hash_key(key))
    if state is None:
        raise invalid_api_key()
    return _info(services, key, state)


async def _info_later(services: Services, request: http.Request) -> http.Response:
    key, state = await _key(services, request)
    return _info(services, key, state)


def _field(request: http.Request, *names: str) -> str:
    """A value from the JSON body, or (as the original accepted) the query string."""
    body: Any = {}
    if request.raw_content:
        try:
            body = json.loads(request.get_content(strict=False) or b"{}")
        except ValueError:
            raise invalid_json() from None
    query = parse_qs(urlsplit(request.path).query)
    for name in names:
        value = body.get(name) if isinstance(body, dict) else None
        if value is None and name in query:
            value = query[name][0]
        if isinstance(value, str) and value.strip():
            return value
    raise ApiError(400, f"Send the token as {names[0]!r}.", param=names[0],
                   code="missing_token")


def _create_limits(request: http.Request) -> Limits | None:
    """Limits asked for with ``create`` (routstr-core's ``balance_limit`` and
    ``balance_limit_reset``, and ours), in the body or the query string; checked before the
    token is redeemed."""
    from routstr_addon.web.children import limits_from

    asked: dict[str, Any] = {}
    try:
        body = json.loads(request.get_content(strict=False) or b"{}")
    except ValueError:
        body = {}
    if isinstance(body, dict):
        asked.update(body)
    for name, values in parse_qs(urlsplit(request.path).query).items():
        value: Any = values[0]
        asked[name] = int(value) if name != "balance_limit_reset" and value.isdigit() else value
    limits = limits_from(asked)
    return limits if limits.any else None


async def create(services: Services, request: http.Request, peer: Peer) -> http.Response:
    payments = _payments(services)
    token = _field(request, "initial_balance_token", "cashu_token", "token")
    terms = KeyTerms.parse(request.headers.get("key-expiry-time"),
                           request.headers.get("refund-lnurl"))
    limits = _create_limits(request)
    api_key, state = await payments.create(token, terms.expires_at, terms.refund_address)
    if limits is not None:
        state = services.ledger.set_limits(state.key_hash, limits) or state
    return json_response(200, {**_describe(api_key, state), "balance": state.balance_msat})


async def topup(services: Services, request: http.Request, peer: Peer) -> http.Response:
    payments = _payments(services)
    token = _field(request, "cashu_token", "token")
    _, state = await _key(services, request)
    credited = await payments.topup(payer_of(services, state).key_hash, token)
    return json_response(200, {"msats": credited})


async def refund(services: Services, request: http.Request, peer: Peer) -> http.Response:
    payments = _payments(services)
    original = request.headers.get("x-cashu")
    if original:  # the change of an x-cashu request, for a client that could not read it
        change = await payments.stored_change(original)
        if change is None:
            raise ApiError(404, "No x-cashu payment with this token is known here.",
                           code="payment_not_found")
        return json_response(200, change)
    _, state = await _key(services, request)
    if state.parent_key_hash is not None:
        raise ApiError(400, "A child key cannot be refunded: refund its parent key instead.",
                       code="child_key")
    if state.refund_address and services.payouts is not None:  # paid there, as routstr-core
        return json_response(200, await services.payouts.refund_to_address(state.key_hash))
    return json_response(200, await payments.refund(state.key_hash))


def _invoices(services: Services) -> Invoices:
    if services.invoices is None:
        raise no_ecash()
    return services.invoices


async def lightning_invoice(services: Services, request: http.Request,
                            peer: Peer) -> http.Response:
    """``POST /v1/balance/lightning/invoice {"amount_sats", "purpose"}``: a bolt11 invoice
    that, once paid, creates a key (``create``) or tops up the caller's (``topup``)."""
    invoices = _invoices(services)
    wait = services.invoice_limit.take(peer.address or "unknown",
                                       services.config.invoices_per_minute)
    if wait:
        raise ApiError(429, f"Too many invoices from this address; try again in {wait} s.",
                       type="rate_limit_error", code="rate_limited",
                       headers={"retry-after": str(wait)})
    try:
        body = json.loads(request.get_content(strict=False) or b"{}")
    except ValueError:
        raise invalid_json() from None
    amount = body.get("amount_sats") if isinstance(body, dict) else None
    purpose = body.get("purpose", "create") if isinstance(body, dict) else None
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ApiError(400, "amount_sats must be a whole number of sats.", param="amount_sats",
                       code="invalid_amount")
    key_hash = None
    if purpose == "topup":
        _, state = await _key(services, request)
        key_hash = payer_of(services, state).key_hash
    answer = await invoices.create(amount, str(purpose), key_hash)
    base = request.path.split("/lightning/", 1)[0]
    answer["status_url"] = f"{base}/lightning/invoice/{answer['invoice_id']}/status"
    return json_response(200, answer)


async def lightning_recover(services: Services, request: http.Request,
                            peer: Peer) -> http.Response:
    """``POST …/lightning/recover {"bolt11"}`` (routstr-core's): how an invoice stands, settled
    if it was paid unnoticed."""
    try:
        body = json.loads(request.get_content(strict=False) or b"{}")
    except ValueError:
        raise invalid_json() from None
    bolt11 = body.get("bolt11") if isinstance(body, dict) else None
    if not isinstance(bolt11, str) or not bolt11.strip():
        raise ApiError(400, "Send the invoice as 'bolt11'.", param="bolt11",
                       code="missing_bolt11")
    return json_response(200, await _invoices(services).recover(bolt11))


async def lightning_status(services: Services, request: http.Request,
                           peer: Peer) -> http.Response:
    invoice_id = request.path.split("?", 1)[0].split("/lightning/invoice/", 1)[1]
    invoice_id = invoice_id.removesuffix("/status")
    return json_response(200, await _invoices(services).status(invoice_id))
