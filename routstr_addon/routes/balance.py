"""``/v1/balance/*`` (alias ``/v1/wallet/*``): what a key holds, in msat."""

from __future__ import annotations

from mitmproxy import http

from ..errors import ApiError, json_response
from ..ledger import hash_key
from ..metering import bearer_token
from . import Services


def info(services: Services, request: http.Request) -> http.Response:
    key = bearer_token(request.headers.get("authorization"))
    state = services.ledger.key(hash_key(key))
    if state is None:
        raise ApiError(401, "Invalid API key.", code="invalid_api_key")
    return json_response(200, {
        "api_key": key,
        "balance": state.balance_msat,
        "reserved": state.reserved_msat,
        "available": state.available_msat,
        "total_spent": state.total_spent_msat,
        "total_requests": state.total_requests,
        "expiry_time": int(state.expires_at) if state.expires_at is not None else None,
        "refund_address": state.refund_address,
        "disabled": state.disabled,
    })
