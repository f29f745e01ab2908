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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from routstr_addon.amounts import sats
from routstr_addon.errors import ApiError, invalid_api_key, key_limit
from routstr_addon.ledger import Ledger, ReserveError, Settlement, hash_key
from routstr_addon.metering.costs import CostReport
from routstr_addon.metering.pricing import ModelPrice, Pricing
from routstr_addon.metering.surface import (
    ENDPOINTS,
    Shape,
    canonical_endpoint,
    check_raw,
    decode_body,
    parse_json,
    read_shape,
    unsupported_endpoint,
    upstream_body,
)
from routstr_addon.metering.usage import (
    SSETap,
    Usage,
    completion_text_length,
    estimate_tokens,
    prompt_text_length,
    usage_from_json,
)
from routstr_addon.settings import Config

__all__ = ["Meter", "Paid", "Payer", "Quote", "bearer_token"]

logger = logging.getLogger(__name__)

# Upper bound on prompt tokens the provider adds around a text body (chat templates, tool-use
# system prompts), on top of one token per byte of the body.
PROMPT_OVERHEAD_TOKENS = 1024
# Parts of a request whose token count is not bounded by their size in bytes: attachments,
# and Responses API references to context held by the provider (earlier turns, stored prompts).
_UNBOUNDED_MARKERS = (b"image", b"audio", b"file", b"video", b"previous_response_id",
                      b"conversation", b'"prompt":{', b'"prompt": {')
# How often a flowing stream records what it delivered: a crash loses at most this much.
TOUCH_EVERY = 1.0


def bearer_token(authorization: str | None) -> str:
    """The key in an ``Authorization: Bearer <key>`` header, or a 401."""
    if not authorization:
        raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    # No length bound here: nutshell wallets make 5-9k-character tokens, and the request's
    # headers as a whole are bounded before this runs.
    if scheme.lower() != "bearer" or not token or " " in token:
        raise ApiError(401, "Malformed Authorization header: expected 'Bearer <key>'.",
                       code="invalid_api_key")
    return token


class Payer(Protocol):
    """What pays a request instead of a key's balance (an X-Cashu token, redeemed into a key of
    its own): once the request's reservation is closed, what is left goes back as change.

    Implemented by ``payments``; the meter only calls it, so metering needs no Cashu."""

    @property
    def key_hash(self) -> str:
        """The key the payment was credited to, which the request is reserved on."""
        ...

    def change(self) -> str | None:
        """The change, as a token for the client (None: nothing to give back)."""
        ...

    def early_change(self, reserved_msat: int) -> str | None:
        """The part of the change known before the answer ends (the payment less the
        reserved maximum), cut now for a stream's headers; None: nothing to give yet."""
        ...


@dataclass(frozen=True, slots=True)
class Quote:
    """A priced request, before anything is reserved."""

    endpoint: str | None  # how the body and usage read (chat, …); None: a fixed price
    body: dict[str, Any] | None
    model: ModelPrice | None
    amount_msat: int
    path: str = ""  # the endpoint's name below /v1, from which the upstream path is built
    bounds: tuple[int, int] | None = None  # the most prompt and completion tokens possible
    fallbacks: tuple[ModelPrice, ...] = ()  # other models that may run (OpenRouter's models)
    offers: tuple[ModelPrice, ...] = ()  # the providers that may serve it, in order

    @property
    def model_name(self) -> str | None:
        return self.model.id if self.model else _model_name(self.body)


@dataclass(slots=True, eq=False)
class Paid:
    """A forwarded request's money state, from its reservation to its settlement.

    The one object a flow carries (``flow.metadata``) for its whole life. A copy of the flow
    (mitmproxy copies metadata to save, export or duplicate a flow) gets ``facts()`` instead:
    plain values, never the live state with its timer and payer.
    """

    request_id: str
    key_hash: str
    reserved_msat: int
    available_msat: int
    endpoint: str | None  # chat | completions | embeddings | responses | messages; None: fixed
    model: ModelPrice | None
    body: dict[str, Any] | None
    upstream_body: bytes | None = None  # what the upstream gets instead of the client's body
    drop_usage: bool = False  # a stream's usage chunk was asked for by us, not the client
    payer: Payer | None = None  # paid by an X-Cashu token rather than a key
    tap: SSETap | None = None  # a streamed answer: what it delivered
    closed: Settlement | None = None
    usage: Usage | None = None
    change: str | None = None  # the payer's change, once closed
    report: CostReport | None = None  # the cost as clients read it, once known
    answer: Any = None  # a buffered answer's parsed JSON, read once to settle it
    retrying: bool = False  # the ledger could not take its settlement: retried in the background
    prompt_estimate: int | None = None
    timer: Any = None  # asyncio.TimerHandle of the upstream timeout
    path: str = ""  # the endpoint's name below /v1 (the upstream path is built from it)
    bounds: tuple[int, int] | None = None  # the most prompt and completion tokens possible
    fallbacks: tuple[ModelPrice, ...] = ()  # other models that may run: charged the dearest
    # The providers that may serve it, in the order they are tried; ``model`` becomes the
    # offer of the one that answered, whose price is charged.
    offers: tuple[ModelPrice, ...] = ()
    provider: str | None = None  # the provider that answered, once known
    attempts: int = 1  # providers tried for it (more than one: failover happened)
    first_byte_at: float | None = None  # a stream's first chunk from the upstream (metrics)

    @property
    def settled(self) -> bool:
        return self.closed is not None

    def facts(self) -> dict[str, Any]:
        """Who paid what, as plain values: for mitmweb and saved flows."""
        closed = self.closed
        return {"key_id": self.key_hash[:16], "model": self.model.id if self.model else None,
                "reserved_msat": self.reserved_msat,
                "charged_msat": closed.charged_msat if closed is not None else None,
                "paid_by": "key" if self.payer is None else "x-cashu"}

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return self.facts()


Settle = Callable[..., Settlement | None]


class Meter:
    """Admits requests (price, reserve) and closes their reservations (charge or release)."""

    def __init__(self, config: Config, ledger: Ledger, pricing: Pricing) -> None:
        self.config = config
        self.ledger = ledger
        self.pricing = pricing
        # How often a flowing stream records its progress: well inside the sweeper's timeout.
        self.touch_every = min(TOUCH_EVERY, config.reservation_timeout / 3)
        self.fixed_prices = config.fixed_price_endpoints  # name → msat
        self._unsettled: list[tuple[Paid, Settle, tuple[Any, ...]]] = []

    # -- before forwarding -----------------------------------------------------------------

    def endpoint(self, path: str) -> str:
        """The endpoint a path below /v1 names (its canonical name), or 404 if it is neither
        metered nor priced by ``FIXED_PRICE_ENDPOINTS``."""
        name = canonical_endpoint(path)
        if name is None or (name not in ENDPOINTS and name not in self.fixed_prices):
            raise unsupported_endpoint(self.fixed_prices)
        return name

    def quote(self, path: str, body: bytes, *, body_bound: bool = True,
              content_encoding: str = "") -> Quote:
        """What a request may cost at most: the amount to reserve before forwarding it.

        ``path``: the endpoint's canonical name (or any path below /v1 naming it).
        ``body_bound``: let the body's size bound the prompt. Off for x-cashu, whose clients
        must be able to work out the amount from the published prices alone.
        """
        name = path if path in ENDPOINTS or path in self.fixed_prices else self.endpoint(path)
        kind = ENDPOINTS.get(name)
        if kind is None:
            return Quote(None, None, None, self.fixed_prices[name], name)
        if content_encoding:
            body = decode_body(body, content_encoding, self.config.max_request_size)
        parsed = parse_json(body)
        shape = read_shape(kind, parsed)
        check_raw(kind, body)
        if not self.config.model_based_pricing:
            return Quote(kind, parsed, None, self.config.cost_per_request_msat, name)
        models = self._models(shape)
        offers = self.pricing.candidates(models[0])
        amount, bounds = 0, (0, 0)
        # Any of them may run: another provider of the model (failover before the first byte),
        # or one of OpenRouter's fallback models. The dearest counts.
        for model in (*offers, *models[1:]):
            cost, most = self._max_cost(model, kind, shape, body if body_bound else None)
            if cost > amount:
                amount = cost
            bounds = (max(bounds[0], most[0]), max(bounds[1], most[1]))
        return Quote(kind, parsed, offers[0], amount, name, bounds, tuple(models[1:]), offers)

    def admit(self, request_id: str, authorization: str | None, path: str,
              body: bytes, content_encoding: str = "") -> Paid:
        """Authenticate, price and reserve; raises ApiError with the answer otherwise."""
        key_hash = hash_key(bearer_token(authorization))
        try:
            q = self.quote(path, body, content_encoding=content_encoding)
        except ApiError:
            self._known_key(key_hash)  # a bad key is answered 401 first, whatever the body
            raise
        return self.reserve(q, request_id, key_hash)

    def reserve(self, q: Quote, request_id: str, key_hash: str,
                payer: Payer | None = None) -> Paid:
        """Hold a quote's amount on a key (every reservation is made here): the request's
        money state, with what its upstream request needs. Raises ApiError if refused."""
        try:
            held = self.ledger.reserve(key_hash, q.amount_msat, request_id, q.model_name)
        except ReserveError as e:
            raise _reserve_error(e) from None
        return self.reserved(q, request_id, key_hash, held.available_msat, payer)

    def reserved(self, q: Quote, request_id: str, key_hash: str, available_msat: int,
                 payer: Payer | None = None) -> Paid:
        """The money state of a quote already reserved on a key (by ``reserve``, or in the
        transaction that also recorded its payment)."""
        forwarded, drop_usage = (upstream_body(q.endpoint, q.body)
                                 if q.endpoint is not None and q.body is not None
                                 else (None, False))
        return Paid(request_id, key_hash, q.amount_msat, available_msat, q.endpoint,
                    q.model, q.body, forwarded, drop_usage, payer, path=q.path, bounds=q.bounds,
                    fallbacks=q.fallbacks, offers=q.offers)

    def _known_key(self, key_hash: str) -> None:
        if self.ledger.key(key_hash) is None:
            raise invalid_api_key()

    def _models(self, shape: Shape) -> list[ModelPrice]:
        if not shape.models:
            raise ApiError(400, "The request names no model: set 'model' (GET /v1/models lists "
                           "the models and their prices).", param="model", code="model_required")
        models: list[ModelPrice] = []
        for i, name in enumerate(shape.models):
            model = self.pricing.resolve(name)
            if model is None:
                raise ApiError(400,
                               f"The model {name!r} is not offered here; GET /v1/models lists "
                               "the models and their prices.", param="model" if i == 0
                               else "models", code="model_not_found")
            models.append(model)
        if self.pricing.rate is None:
            raise ApiError(503, "No BTC/USD exchange rate is available yet, so the request cannot "
                           "be priced; try again shortly.", type="service_unavailable",
                           code="rate_unavailable")
        return models

    def _max_cost(self, model: ModelPrice, kind: str, shape: Shape,
                  raw: bytes | None) -> tuple[int, tuple[int, int]]:
        """The most a request can cost on ``model``, and the most prompt and completion tokens
        it can use there (usage beyond them is impossible)."""
        prompt_bound = None
        if raw is not None and not any(marker in raw for marker in _UNBOUNDED_MARKERS):
            prompt_bound = len(raw) + PROMPT_OVERHEAD_TOKENS
        cap = 0 if kind == "embeddings" else shape.cap  # embeddings generate no tokens
        pricing = self.pricing
        choices = 1 if kind == "embeddings" else shape.choices
        points = pricing.bounds(model, cap, prompt_bound, choices, shape.prompts)
        most_prompt = max(p for p, _ in points)
        most_completion = choices * shape.prompts * min(
            model.completion_limit, cap if cap is not None else model.completion_limit)
        return (pricing.max_cost(model, cap, prompt_bound, choices, shape.prompts),
                (most_prompt, most_completion))

    # -- the cost rule ---------------------------------------------------------------------

    def cost(self, model: ModelPrice | None, usage: Usage) -> int:
        """What usage costs: the model's token prices, or COST_PER_REQUEST when no model prices
        the request (fixed pricing, or an endpoint without token usage)."""
        if model is None:
            return self.config.cost_per_request_msat
        return self.pricing.cost(model, usage.prompt_tokens, usage.completion_tokens,
                                 usage.cached_tokens, usage.written_tokens)

    def cost_by_name(self, model_name: str | None, usage: Usage, ceiling: int) -> int:
        """The same rule for a request known only by what the ledger kept of it (its model's
        name): ``ceiling``, what the client agreed to at most, when no price is known now."""
        if not self.config.model_based_pricing:
            return self.cost(None, usage)
        if not model_name:  # a FIXED_PRICE_ENDPOINTS request: its price is what was reserved
            return ceiling
        model = self.pricing.resolve(model_name)
        if model is None or self.pricing.rate is None:
            return ceiling
        return self.cost(model, usage)

    def estimate(self, paid: Paid, completion_chars: int) -> Usage:
        """Usage for an answer that reported none: from the prompt sent and the text delivered."""
        prompt_chars = prompt_text_length(paid.body) if paid.body else 0
        return Usage(max(1, estimate_tokens(prompt_chars)), estimate_tokens(completion_chars),
                     estimated=True)

    # -- after forwarding: what to charge --------------------------------------------------

    def bounded_cost(self, paid: Paid, usage: Usage, delivered_chars: int = 0
                     ) -> tuple[int, str | None]:
        """What a request's reported usage is charged, sanity-bounded, and why if not as
        reported: figures that cannot be true (negative, not integers) are charged at least
        the estimate from the prompt and the text delivered; usage beyond what the request
        could use (more tokens than its prompt and caps allow) at most its reservation. A
        plausible cost above the reservation is returned as is: an under-reservation."""
        if paid.model is None:  # a fixed price: what was reserved, or COST_PER_REQUEST
            return (paid.reserved_msat if paid.endpoint is None
                    else self.cost(None, usage)), None
        cost = self.cost(paid.model, usage)
        for model in paid.fallbacks:  # whichever ran, the usage is paid at the dearest price
            cost = max(cost, self.cost(model, usage))
        note = None
        if usage.suspect:
            floor = self.cost(paid.model, self.estimate(paid, delivered_chars))
            logger.warning("request %s: the upstream reported impossible usage %s; charging at "
                           "least the estimate", paid.request_id, usage)
            if cost < floor:
                cost, note = floor, "impossible usage reported; charged the estimate"
        bounds = paid.bounds
        if cost > paid.reserved_msat and bounds is not None and (
                usage.prompt_tokens > bounds[0] or usage.completion_tokens > bounds[1]):
            logger.warning("request %s: the upstream reported usage beyond what the request "
                           "could use (%s); charging its reservation", paid.request_id, usage)
            cost, note = paid.reserved_msat, "usage beyond the request's limits; clamped"
        return cost, note

    def settle(self, paid: Paid, usage: Usage, note: str | None = None,
               delivered_chars: int = 0, late: bool = True) -> Settlement | None:
        """Charge a request's usage, once; None if it was already settled or released.

        A cost above the reservation (an under-reservation: a pricing rule missed something)
        is charged on top, as far as the key can pay, and recorded as an 'overrun' row.
        ``late``: if the sweeper closed the reservation meanwhile, charge anyway (reported
        usage is work done; an estimate for a request the upstream left silent is not)."""
        if paid.closed is not None:
            return None
        paid.usage = usage
        cost, why = self.bounded_cost(paid, usage, delivered_chars)
        if usage.estimated:
            note = note or "usage estimated"
        note = note or why
        if len(paid.offers) > 1 and paid.provider:  # which provider was paid for, and why
            served = f"provider {paid.provider}" + (
                f" (attempt {paid.attempts})" if paid.attempts > 1 else "")
            note = f"{served}; {note}" if note else served
        model = paid.model.id if paid.model else None
        paid.closed = closed = self.ledger.settle(
            paid.request_id, cost, model=model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            note=note)
        if closed is None and not late:
            paid.closed = Settlement(paid.request_id, paid.key_hash, 0, 0, paid.available_msat)
        elif closed is None:  # swept while it ran (no activity for RESERVATION_TIMEOUT)
            charged = self.ledger.late_charge(paid.key_hash, paid.request_id, cost, model)
            logger.warning("request %s outlived its reservation; charged %d of %d msat late",
                           paid.request_id, charged, cost)
            paid.closed = Settlement(paid.request_id, paid.key_hash, charged, 0,
                                     max(0, paid.available_msat - charged))
        elif cost > closed.charged_msat and paid.model is not None:
            extra = self.ledger.late_charge(paid.key_hash, paid.request_id,
                                            cost - closed.charged_msat, model, overrun=True)
            logger.error("request %s cost %d msat, above its reservation of %d: an "
                         "under-reservation (charged %d more)", paid.request_id, cost,
                         closed.reserved_msat, extra)
            paid.closed = Settlement(paid.request_id, paid.key_hash,
                                     closed.charged_msat + extra, closed.reserved_msat,
                                     closed.available_msat - extra)
        assert paid.closed is not None
        paid.report = self._report(paid, usage, cost, paid.closed.charged_msat)
        return paid.closed

    def _report(self, paid: Paid, usage: Usage, cost: int, charged: int) -> CostReport:
        return CostReport.of(self.pricing, paid.model, usage, cost, charged)

    def report_usage(self, paid: Paid, usage: Usage) -> CostReport:
        """The cost of a usage as it will be charged (capped at the reservation), before the
        request is settled: for a stream's usage chunk, which the client reads before the
        stream ends."""
        cost, _ = self.bounded_cost(paid, usage, paid.tap.text_chars if paid.tap else 0)
        # Above the reservation, the overrun is charged as far as the key can pay.
        return self._report(paid, usage, cost, paid.reserved_msat + paid.available_msat)

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
        paid.answer = parsed
        usage = usage_from_json(parsed)
        if usage is None:
            if paid.endpoint is None:  # a fixed-price endpoint has no usage to report
                return self.settle(paid, Usage(0, 0))
            usage = self.estimate(paid, completion_text_length(parsed))
            logger.warning("request %s: upstream reported no usage; charging an estimate",
                           paid.request_id)
        elif usage.suspect:
            return self.settle(paid, usage, delivered_chars=completion_text_length(parsed))
        return self.settle(paid, usage)

    def settle_stream(self, paid: Paid) -> Settlement | None:
        """Settle a stream that ended: its reported usage, or an estimate from what it carried."""
        tap = paid.tap
        assert tap is not None
        if tap.usage is not None:
            return self.settle(paid, tap.usage, delivered_chars=tap.text_chars)
        if paid.endpoint is None:
            return self.settle(paid, Usage(0, 0))
        logger.warning("request %s: stream ended without usage%s; charging an estimate",
                       paid.request_id, "" if tap.done else " (cut short)")
        return self.settle(paid, self.estimate(paid, tap.text_chars))

    def abort(self, paid: Paid, reason: str, reached: bool = False) -> Settlement | None:
        """The flow failed: charge what reached the client, release the rest.

        ``reached``: the request reached the upstream and the client hung up, so the upstream
        did (and billed) work: at least the prompt's estimate is charged, with what was
        delivered. Only a request that never reached the upstream, or that the upstream
        failed with nothing delivered, is released free."""
        if paid.settled:
            return paid.closed
        if paid.tap is not None and paid.tap.delivered > 0:
            return self.settle_stream(paid)
        if reached:
            delivered = paid.tap.text_chars if paid.tap is not None else 0
            return self.settle(paid, self.estimate(paid, delivered),
                               note=f"client gone: {reason[:150]}", late=False)
        return self.release(paid, reason[:200])

    # -- after forwarding: the one way a reservation ends ----------------------------------

    def finish(self, paid: Paid, status: int, body: bytes) -> Settlement | None:
        """The answer is complete: settle it (a stream from what it carried, else its body)."""
        if paid.tap is not None:
            return self.conclude(paid, self.settle_stream)
        return self.conclude(paid, self.settle_body, status, body)

    def fail(self, paid: Paid, reason: str, reached: bool = False) -> Settlement | None:
        """The flow failed (upstream gone, client gone, our own error): charge what was
        delivered (and, once the upstream had it, at least the prompt), release the rest."""
        return self.conclude(paid, self.abort, reason, reached)

    def conclude(self, paid: Paid, settle: Settle, *args: Any) -> Settlement | None:
        """Close a reservation with ``settle(paid, *args)``, then give a payer its change.

        If the ledger cannot take it now (disk full, database away), the same call is kept and
        tried again by ``retry_unsettled`` until it can, so the charge is exact once the ledger
        is back; meanwhile nothing else settles this request."""
        if paid.retrying:
            return None
        try:
            done = settle(paid, *args)
        except Exception:
            logger.exception("request %s: settlement failed; retrying", paid.request_id)
            paid.retrying = True
            self._unsettled.append((paid, settle, args))
            return None
        self._pay_back(paid)
        return done

    def retry_unsettled(self) -> None:
        """Try the settlements the ledger could not take again (a background task's step)."""
        waiting, self._unsettled = self._unsettled, []
        for paid, settle, args in waiting:
            try:
                settle(paid, *args)
            except Exception as e:
                logger.warning("request %s: settlement still failing: %s", paid.request_id, e)
                self._unsettled.append((paid, settle, args))
                continue
            logger.info("request %s: settled after a retry", paid.request_id)
            paid.retrying = False
            self._pay_back(paid)

    def take_unsettled(self, other: Meter) -> None:
        """Take over the settlements another meter still waits to retry (it is replaced)."""
        self._unsettled += other._unsettled
        other._unsettled = []

    def _pay_back(self, paid: Paid) -> None:
        """A closed x-cashu request: its change, cut now (kept for ``POST /v1/balance/refund``
        with the same X-Cashu header if the client cannot read it)."""
        payer = paid.payer
        if payer is None or paid.closed is None or paid.change is not None:
            return
        try:
            paid.change = payer.change()
        except Exception:
            logger.exception("request %s: cutting the change failed; the value stays on its "
                             "payment key", paid.request_id)


def _model_name(body: dict[str, Any] | None) -> str | None:
    name = body.get("model") if body else None
    return name if isinstance(name, str) else None


def _reserve_error(e: ReserveError) -> ApiError:
    if e.refused is not None:
        return key_limit(e.refused.reason, e.refused.message, e.refused.retry_after)
    if e.reason == "unknown_key":
        return invalid_api_key()
    if e.reason == "expired":
        return ApiError(403, "This API key has expired.", type="permission_error",
                        code="key_expired")
    if e.reason == "disabled":
        return ApiError(403, "This API key has been disabled.", type="permission_error",
                        code="key_disabled")
    return ApiError(
        402,
        f"Insufficient balance: this request needs up to {sats(e.required_msat)} sats "
        f"and the key has {sats(e.available_msat)} sats available.",
        type="insufficient_quota", code="insufficient_balance",
    )
