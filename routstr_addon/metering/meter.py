"""The money path of one forwarded request: admit (authenticate, price, reserve), then settle.

Independent of mitmproxy's flow objects so each step can be called and tested on its own; the
addon's hooks only hand over headers and bodies. The rules kept here:

* nothing is forwarded before the request's maximum cost is reserved on its key;
* the charge is the cost of the usage the upstream reported, or, when it reported none, an
  estimate from the text delivered (never zero, never billed as the maximum by default);
* a request that delivered nothing (upstream error, connection failure) is released, not charged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from routstr_addon.errors import ApiError
from routstr_addon.ledger import Ledger, ReserveError, Settlement, hash_key
from routstr_addon.metering.pricing import ModelPrice, Pricing
from routstr_addon.metering.usage import (
    SSETap,
    Usage,
    completion_text_length,
    estimate_tokens,
    prompt_text_length,
    usage_from_json,
)
from routstr_addon.payments.cashu import XCashu
from routstr_addon.settings import Config

__all__ = ["METERED", "Meter", "Paid", "Quote", "bearer_token"]

logger = logging.getLogger(__name__)

# Endpoints priced from token usage, by path below /v1.
METERED = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/embeddings": "embeddings",
    "/responses": "responses",
}
# Upper bound on prompt tokens the provider adds around a text body (chat templates, tool-use
# system prompts), on top of one token per byte of the body.
PROMPT_OVERHEAD_TOKENS = 1024
# Parts of a request whose token count is not bounded by their size in bytes: attachments,
# and Responses API references to context held by the provider (earlier turns, stored prompts).
_UNBOUNDED_MARKERS = (b"image", b"audio", b"file", b"video", b"previous_response_id",
                      b"conversation", b'"prompt":{', b'"prompt": {')


def bearer_token(authorization: str | None) -> str:
    """The key in an ``Authorization: Bearer <key>`` header, or a 401."""
    if not authorization:
        raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token or len(token) > 4096:
        raise ApiError(401, "Malformed Authorization header: expected 'Bearer <key>'.",
                       code="invalid_api_key")
    return token


def _sats(msat: int) -> str:
    return f"{msat / 1000:,.3f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class Quote:
    """A priced request, before anything is reserved."""

    endpoint: str | None
    body: dict[str, Any] | None
    model: ModelPrice | None
    amount_msat: int

    @property
    def model_name(self) -> str | None:
        return self.model.id if self.model else _model_name(self.body)

    def paid(self, request_id: str, key_hash: str, available_msat: int) -> Paid:
        return Paid(request_id, key_hash, self.amount_msat, available_msat, self.endpoint,
                    self.model, self.body,
                    stream=bool(self.body and self.body.get("stream") is True))


@dataclass(slots=True)
class Paid:
    """A forwarded request's money state, from its reservation to its settlement."""

    request_id: str
    key_hash: str
    reserved_msat: int
    available_msat: int
    endpoint: str | None  # chat | completions | embeddings | responses; None: fixed price
    model: ModelPrice | None
    body: dict[str, Any] | None
    stream: bool = False
    wants_usage: bool = False  # the client itself asked for the usage chunk
    tap: SSETap | None = None
    closed: Settlement | None = None
    usage: Usage | None = None
    xcashu: XCashu | None = None  # paid by an X-Cashu token rather than a key
    prompt_estimate: int | None = None
    timer: Any = None  # asyncio.TimerHandle of the upstream timeout

    @property
    def settled(self) -> bool:
        return self.closed is not None


class Meter:
    def __init__(self, config: Config, ledger: Ledger, pricing: Pricing) -> None:
        self.config = config
        self.ledger = ledger
        self.pricing = pricing

    # -- before forwarding -----------------------------------------------------------------

    def quote(self, path: str, body: bytes, *, body_bound: bool = True) -> Quote:
        """What a request may cost at most: the amount to reserve before forwarding it.

        ``body_bound``: let the body's size bound the prompt. Off for x-cashu, whose clients
        must be able to work out the amount from the published prices alone.
        """
        endpoint = METERED.get(path)
        parsed = self._parse(body) if endpoint is not None else None
        if self.config.model_based_pricing and endpoint is not None:
            assert parsed is not None
            model = self._model(parsed)
            amount = self._max_cost(model, endpoint, parsed, body if body_bound else None)
            return Quote(endpoint, parsed, model, amount)
        return Quote(endpoint, parsed, None, self.config.cost_per_request_msat)

    def admit(self, request_id: str, authorization: str | None, path: str,
              body: bytes) -> Paid:
        """Authenticate, price and reserve; raises ApiError with the answer otherwise."""
        key_hash = hash_key(bearer_token(authorization))
        try:
            q = self.quote(path, body)
        except ApiError:
            self._known_key(key_hash)  # a bad key is answered 401 first, whatever the body
            raise
        try:
            held = self.ledger.reserve(key_hash, q.amount_msat, request_id, q.model_name)
        except ReserveError as e:
            raise _reserve_error(e) from None
        return q.paid(request_id, key_hash, held.available_msat)

    def _known_key(self, key_hash: str) -> None:
        if self.ledger.key(key_hash) is None:
            raise ApiError(401, "Invalid API key.", code="invalid_api_key")

    @staticmethod
    def _parse(body: bytes) -> dict[str, Any]:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON.",
                           code="invalid_json") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return parsed

    def _model(self, body: dict[str, Any]) -> ModelPrice:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "The request names no model: set 'model' (GET /v1/models lists "
                           "the models and their prices).", param="model", code="model_required")
        model = self.pricing.resolve(name)
        if model is None:
            raise ApiError(400,
                           f"The model {name!r} is not offered here; GET /v1/models lists the "
                           "models and their prices.", param="model", code="model_not_found")
        if self.pricing.rate is None:
            raise ApiError(503, "No BTC/USD exchange rate is available yet, so the request cannot "
                           "be priced; try again shortly.", type="service_unavailable",
                           code="rate_unavailable")
        return model

    def _max_cost(self, model: ModelPrice, endpoint: str, body: dict[str, Any],
                  raw: bytes | None) -> int:
        max_tokens = None
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                max_tokens = value
                break
        choices = body.get("n")
        if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
            limit = max_tokens if max_tokens is not None else model.completion_limit
            max_tokens = limit * choices
        prompt_bound = None
        if raw is not None and not any(marker in raw for marker in _UNBOUNDED_MARKERS):
            prompt_bound = len(raw) + PROMPT_OVERHEAD_TOKENS
        if endpoint == "embeddings":
            max_tokens = 0  # embeddings generate no tokens
        return self.pricing.max_cost(model, max_tokens, prompt_bound)

    def upstream_body(self, paid: Paid) -> bytes | None:
        """The body to send upstream, if it must differ from the client's (None: unchanged).

        A streamed chat or completion request is made to report usage in its last chunk;
        the client's own stream options are kept.
        """
        body = paid.body
        if not paid.stream or body is None or paid.endpoint not in ("chat", "completions"):
            return None
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            paid.wants_usage = True
            return None
        new_options = dict(options) if isinstance(options, dict) else {}
        new_options["include_usage"] = True
        return json.dumps({**body, "stream_options": new_options}).encode()

    # -- after forwarding ------------------------------------------------------------------

    def cost(self, paid: Paid, usage: Usage) -> int:
        if paid.model is None:
            return self.config.cost_per_request_msat
        return self.pricing.cost(paid.model, usage.prompt_tokens, usage.completion_tokens,
                                 usage.cached_tokens)

    def estimate(self, paid: Paid, completion_chars: int) -> Usage:
        """Usage for an answer that reported none: from the prompt sent and the text delivered."""
        prompt_chars = prompt_text_length(paid.body) if paid.body else 0
        return Usage(max(1, estimate_tokens(prompt_chars)), estimate_tokens(completion_chars),
                     estimated=True)

    def settle(self, paid: Paid, usage: Usage, note: str | None = None) -> Settlement | None:
        """Charge a request's usage, once; None if it was already settled or released."""
        if paid.closed is not None:
            return None
        paid.usage = usage
        cost = self.cost(paid, usage)
        if usage.estimated:
            note = note or "usage estimated"
        model = paid.model.id if paid.model else None
        paid.closed = self.ledger.settle(
            paid.request_id, cost, model=model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            note=note)
        if paid.closed is None:  # swept while it ran (no activity for RESERVATION_TIMEOUT)
            charged = self.ledger.late_charge(paid.key_hash, paid.request_id, cost, model)
            logger.warning("request %s outlived its reservation; charged %d of %d msat late",
                           paid.request_id, charged, cost)
            paid.closed = Settlement(paid.request_id, paid.key_hash, charged, 0,
                                     max(0, paid.available_msat - charged))
        return paid.closed

    def touch(self, paid: Paid) -> None:
        """Record that a stream is flowing, with what it delivered so far."""
        if paid.prompt_estimate is None:
            paid.prompt_estimate = self.estimate(paid, 0).prompt_tokens
        self.ledger.touch(paid.request_id, paid.tap.text_chars if paid.tap else 0,
                          paid.prompt_estimate)

    def release(self, paid: Paid, note: str) -> Settlement | None:
        if paid.closed is not None:
            return None
        paid.closed = self.ledger.release(paid.request_id, note)
        return paid.closed

    def settle_body(self, paid: Paid, status: int, body: bytes) -> Settlement | None:
        """Settle a buffered (non-streamed) answer: charge its usage, or release on an error."""
        if status >= 400:
            return self.release(paid, f"upstream answered {status}")
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            parsed = None
        usage = usage_from_json(parsed)
        if usage is None:
            if paid.endpoint is None:  # a fixed-price endpoint has no usage to report
                return self.settle(paid, Usage(0, 0))
            usage = self.estimate(paid, completion_text_length(parsed))
            logger.warning("request %s: upstream reported no usage; charging an estimate",
                           paid.request_id)
        return self.settle(paid, usage)

    def open_stream(self, paid: Paid) -> SSETap:
        paid.tap = SSETap(drop_usage_chunk=paid.stream and not paid.wants_usage
                          and paid.endpoint in ("chat", "completions"))
        return paid.tap

    def settle_stream(self, paid: Paid) -> Settlement | None:
        """Settle a stream that ended: its reported usage, or an estimate from what it carried."""
        tap = paid.tap
        assert tap is not None
        if tap.usage is not None:
            return self.settle(paid, tap.usage)
        if paid.endpoint is None:
            return self.settle(paid, Usage(0, 0))
        logger.warning("request %s: stream ended without usage%s; charging an estimate",
                       paid.request_id, "" if tap.done else " (cut short)")
        return self.settle(paid, self.estimate(paid, tap.text_chars))

    def abort(self, paid: Paid, reason: str) -> Settlement | None:
        """The flow failed: charge what reached the client, release the rest."""
        if paid.settled:
            return paid.closed
        if paid.tap is not None and paid.tap.delivered > 0:
            return self.settle_stream(paid)
        return self.release(paid, reason[:200])


def _model_name(body: dict[str, Any] | None) -> str | None:
    name = body.get("model") if body else None
    return name if isinstance(name, str) else None


def _reserve_error(e: ReserveError) -> ApiError:
    if e.reason == "unknown_key":
        return ApiError(401, "Invalid API key.", code="invalid_api_key")
    if e.reason == "expired":
        return ApiError(403, "This API key has expired.", type="permission_error",
                        code="key_expired")
    if e.reason == "disabled":
        return ApiError(403, "This API key has been disabled.", type="permission_error",
                        code="key_disabled")
    return ApiError(
        402,
        f"Insufficient balance: this request needs up to {_sats(e.required_msat)} sats "
        f"and the key has {_sats(e.available_msat)} sats available.",
        type="insufficient_quota", code="insufficient_balance",
    )
