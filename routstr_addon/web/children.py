"""Child keys and a key's history, as routstr-core's clients use them (``/v1/balance/…``).

A child key spends its parent's balance (its own stays 0) within its own limits: routstr-core's
``balance_limit`` (msat) with ``balance_limit_reset`` (daily, weekly, monthly; or seconds) and
``validity_date``, and ours (``rpm``, ``concurrent``, ``models``). A child cannot make children
nor be refunded; its parent resets its spending (``child-key/reset``) or changes its limits
(``child-key/limits``).
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import http

from routstr_addon.errors import ApiError, invalid_api_key, invalid_json, json_response
from routstr_addon.ledger import KEY_PREFIX, KeyState, Limits, hash_key, parse_period
from routstr_addon.metering.meter import bearer_token
from routstr_addon.web import Peer, Services

__all__ = ["create_children", "history", "limit_child", "reset_child"]

MAX_CHILDREN = 50  # per call, as routstr-core


def _caller(services: Services, request: http.Request) -> KeyState:
    key = bearer_token(request.headers.get("authorization"))
    state = services.ledger.key(hash_key(key))
    if state is None:
        raise invalid_api_key()
    return state


def _body(request: http.Request) -> dict[str, Any]:
    try:
        body = json.loads(request.get_content(strict=False) or b"{}")
    except ValueError:
        raise invalid_json() from None
    if not isinstance(body, dict):
        raise invalid_json()
    return body


def _whole(body: dict[str, Any], name: str, minimum: int = 0) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ApiError(400, f"{name} must be a whole number of at least {minimum}.", param=name,
                       code="invalid_limit")
    return value


def limits_from(body: dict[str, Any]) -> Limits:
    """Limits as a request states them (routstr-core's names and ours)."""
    try:
        period = parse_period(body.get("balance_limit_reset") if isinstance(
            body.get("balance_limit_reset"), str) else None)
    except ValueError as e:
        raise ApiError(400, str(e), param="balance_limit_reset", code="invalid_limit") from None
    models = body.get("models")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if models is not None and not (isinstance(models, list)
                                   and all(isinstance(m, str) and m for m in models)):
        raise ApiError(400, "models must be a list of model names.", param="models",
                       code="invalid_limit")
    return Limits(rpm=_whole(body, "rpm", 1), concurrent=_whole(body, "concurrent", 1),
                  models=tuple(models) if models else None,
                  budget_msat=_whole(body, "balance_limit"), period=period)


def _validity(body: dict[str, Any]) -> float | None:
    value = _whole(body, "validity_date", 1)
    return None if value is None else float(value)


def _a_parent(state: KeyState) -> None:
    if state.parent_key_hash is not None:
        raise ApiError(400, "A child key cannot make or manage child keys: use its parent.",
                       code="child_key")


async def create_children(services: Services, request: http.Request,
                          peer: Peer) -> http.Response:
    """``POST /v1/balance/child-key {"count", "balance_limit", "balance_limit_reset",
    "validity_date", "rpm", "concurrent", "models"}`` → the new keys, shown once."""
    parent = _caller(services, request)
    _a_parent(parent)
    body = _body(request)
    count = _whole(body, "count", 1)
    if count is None or count > MAX_CHILDREN:
        raise ApiError(400, f"count must be between 1 and {MAX_CHILDREN}.", param="count",
                       code="invalid_count")
    keys = services.ledger.create_children(parent.key_hash, count, limits_from(body),
                                           _validity(body))
    return json_response(200, {"api_keys": keys, "count": count, "cost_msats": 0,
                               "cost_sats": 0, "parent_balance": parent.balance_msat,
                               "parent_balance_sats": parent.balance_msat // 1000})


def _child_of(services: Services, parent: KeyState, body: dict[str, Any]) -> KeyState:
    child_key = body.get("child_key")
    if not isinstance(child_key, str) or not child_key.startswith(KEY_PREFIX):
        raise ApiError(400, "Send the child key as 'child_key' (sk-…).", param="child_key",
                       code="missing_child_key")
    child = services.ledger.key(hash_key(child_key))
    if child is None:
        raise ApiError(404, "Child key not found.", code="child_key_not_found")
    if child.parent_key_hash != parent.key_hash:
        raise ApiError(403, "This key is not the parent of that child key.",
                       type="permission_error", code="not_parent")
    return child


def reset_child(services: Services, request: http.Request, peer: Peer) -> http.Response:
    """``POST /v1/balance/child-key/reset {"child_key"}``: its spending counts from zero."""
    parent = _caller(services, request)
    _a_parent(parent)
    child = _child_of(services, parent, _body(request))
    services.ledger.reset_child(parent.key_hash, child.key_hash)
    return json_response(200, {"success": True,
                               "message": "Child key balance reset successfully."})


def limit_child(services: Services, request: http.Request, peer: Peer) -> http.Response:
    """``POST /v1/balance/child-key/limits {"child_key", …limits}``: replace its limits."""
    parent = _caller(services, request)
    _a_parent(parent)
    body = _body(request)
    child = _child_of(services, parent, body)
    state = services.ledger.set_limits(child.key_hash, limits_from(body))
    assert state is not None
    return json_response(200, {"success": True, "limits": state.limits.describe()})


def history(services: Services, request: http.Request, peer: Peer) -> http.Response:
    """``GET /v1/balance/history``: money in and out of the key, newest first."""
    state = _caller(services, request)
    if state.parent_key_hash is not None:
        raise ApiError(400, "A child key has no history of its own: use its parent key.",
                       code="child_key")
    return json_response(200, {"transactions": services.ledger.history(state.key_hash)})
