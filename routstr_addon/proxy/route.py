"""Which provider a paid request goes to, and what it is told there: the forward calls
``Route.aim`` once a request is admitted, and ``answered``/``failed`` when it ends.

A request has the offers the meter reserved for, best first. With one, mitmproxy connects to
that provider itself (no cost added). With several, the request goes through the failover hop,
which tries them in turn before any byte reaches the client. Either way the model id is
rewritten to the provider's own name for it, its key and headers are put on, and the answer
names the provider (``x-routstr-provider``, never its URL or key) and is charged at its price.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http

from routstr_addon.errors import ApiError
from routstr_addon.metering.meter import Paid
from routstr_addon.metering.pricing import ModelPrice, Pricing
from routstr_addon.metering.surface import upstream_body
from routstr_addon.upstreams.catalog import provider_headers
from routstr_addon.upstreams.failover import (
    ATTEMPTS_HEADER,
    PLAN_HEADER,
    PROVIDER_HEADER,
    Attempt,
    Failover,
)
from routstr_addon.upstreams.health import Health
from routstr_addon.upstreams.providers import ProviderSpec
from routstr_addon.upstreams.score import spread

__all__ = ["Route", "body_for"]

logger = logging.getLogger("routstr")

_PROVIDER = PROVIDER_HEADER.encode()
_PLAN = PLAN_HEADER.encode()
_ATTEMPTS = ATTEMPTS_HEADER.encode()


class Route:
    def __init__(self, providers: tuple[ProviderSpec, ...], health: Health,
                 failover: Failover | None, pricing: Pricing | None = None) -> None:
        """``pricing``: to choose among a model's offers by score (None: in price order)."""
        self.pricing = pricing
        self.providers = {p.name: p for p in providers}
        # Requests no model prices (fixed pricing, other endpoints): the preferred provider.
        self.default = max(providers, key=lambda p: p.priority)
        self.health = health
        self.failover = failover
        self.auth = {p.name: tuple((k.encode(), v.encode()) for k, v in provider_headers(p))
                     for p in providers}
        # Routstr nodes (paid per request by the hop) and .onion providers (reached by the
        # hop through Tor): their requests always go through the hop.
        self.nodes = frozenset(p.name for p in providers if p.is_node or _onion(p))
        self.retired: dict[str, ProviderSpec] = {}  # removed while running: for those in flight

    def add(self, provider: ProviderSpec) -> None:
        """A provider that joined while running (a node found on Nostr, one an operator added)."""
        self.providers[provider.name] = provider
        self.retired.pop(provider.name, None)
        self.auth[provider.name] = tuple((k.encode(), v.encode())
                                         for k, v in provider_headers(provider))
        if provider.is_node or _onion(provider):
            self.nodes = self.nodes | {provider.name}

    def remove(self, name: str) -> None:
        """A provider an operator removed while running: requests in flight to it finish."""
        spec = self.providers.pop(name, None)
        if spec is not None:
            self.retired[name] = spec
        if self.default.name == name and self.providers:
            self.default = max(self.providers.values(), key=lambda p: p.priority)

    def body(self, paid: Paid) -> bytes | None:
        """The body the first provider gets: the one built from what was priced, with the
        model named as that provider names it (None: a body the proxy does not rebuild).
        Which provider is first is chosen here: by score, at random among the best few."""
        if len(paid.offers) > 1 and self.pricing is not None:
            paid.offers = tuple(spread(paid.offers, _provider_of, self.pricing.reference,
                                       self.health.breakers))
        offer = paid.offers[0] if paid.offers else None
        if offer is None:
            return paid.upstream_body
        return body_for(paid.endpoint, paid.body, paid.upstream_body, offer)

    def aim(self, flow: http.HTTPFlow, paid: Paid) -> None:
        """Point an admitted request (client secrets off, body rebuilt) at its provider(s)."""
        req = flow.request
        target = f"/{paid.path}"
        offers = paid.offers
        failover = self.failover
        via_hop = len(offers) > 1 or bool(offers and offers[0].provider in self.nodes)
        if via_hop and failover is not None and failover.port:
            # A client's own plan header would pick another request's plan: never passed on.
            fields = tuple(f for f in req.headers.fields if f[0].lower() != _PLAN)
            attempts = tuple(self._attempt(o, target, paid, req) for o in offers)
            failover.arm(paid.request_id, attempts)
            req.scheme, req.host, req.port = "http", "127.0.0.1", failover.port
            req.path = f"/v1{target}"
            req.headers.fields = (*fields, (_PLAN, paid.request_id.encode()))
            return
        offer = offers[0] if offers else None
        provider = (self.providers.get(offer.provider) or self.retired.get(offer.provider)
                    if offer else None)
        provider = provider or self.default
        if provider.name in self.nodes:  # unpaid (402), or unreachable without Tor: never direct
            raise ApiError(503, "The provider of this model cannot be reached right now; nothing "
                           "was charged.", type="service_unavailable",
                           code="upstream_unreachable", headers={"retry-after": "5"})
        paid.provider = provider.name
        req.headers.fields += self.auth[provider.name]
        upstream = provider.upstream
        if upstream is None:  # the reverse mode's own target
            req.path = f"/v1{target}"
            return
        if req.host != upstream.host or req.port != upstream.port:
            req.scheme, req.host, req.port = upstream.scheme, upstream.host, upstream.port
        req.path = upstream.base_path + target

    def answered(self, flow: http.HTTPFlow, paid: Paid) -> None:
        """The answer's headers: who answered (the hop says), its price, its health."""
        resp = flow.response
        assert resp is not None
        if paid.provider is None:  # through the hop: it named the provider (and counted)
            name = attempts = b""
            for k, v in resp.headers.fields:
                low = k.lower()
                if low == _PROVIDER:
                    name = v
                elif low == _ATTEMPTS:
                    attempts = v
            paid.provider = name.decode() or None
            paid.attempts = int(attempts) if attempts.isdigit() else 1
        else:
            status = resp.status_code
            if status == 429 or status >= 500:
                self.health.failure(paid.provider, f"HTTP {status}")
            elif flow.request.timestamp_end is not None:
                self.health.success(paid.provider,
                                    (resp.timestamp_start or 0) - flow.request.timestamp_end)
            # The provider's own x-routstr-* headers never reach the client: ours are the truth.
            resp.headers.fields = (*(f for f in resp.headers.fields
                                     if f[0].lower() not in (_PROVIDER, _ATTEMPTS)),
                                   (_PROVIDER, paid.provider.encode()))
        model = paid.model
        if model is not None and paid.provider and model.provider != paid.provider:
            paid.model = next((o for o in paid.offers if o.provider == paid.provider), model)

    def failed(self, flow: http.HTTPFlow, paid: Paid) -> None:
        """The flow failed: a direct provider that could not be reached is marked so."""
        if self.failover is not None:
            self.failover.disarm(paid.request_id)
        if flow.response is None and paid.provider is not None and flow.error is not None:
            message = flow.error.msg
            refused = "connect" in message.lower() or "refused" in message.lower()
            if flow.server_conn.timestamp_start is None or refused:
                self.health.failure(paid.provider, message, refused=refused)

    def _attempt(self, offer: ModelPrice, target: str, paid: Paid,
                 req: http.Request) -> Attempt:
        provider = self.providers.get(offer.provider) or self.retired[offer.provider]
        up = provider.upstream
        assert up is not None  # several providers: each has its URL
        node = offer.info.get("sats_pricing") if provider.is_node else None
        return Attempt(offer.provider, up.scheme, up.host, up.port, up.base_path + target,
                       tuple(provider_headers(provider)),
                       body_for(paid.endpoint, paid.body, paid.upstream_body, offer)
                       or req.raw_content or b"", node if isinstance(node, dict) else
                       ({} if provider.is_node else None), paid.reserved_msat,
                       provider.base_url if provider.is_node else "")


def _onion(provider: ProviderSpec) -> bool:
    return provider.upstream is not None and provider.upstream.host.endswith(".onion")


def _provider_of(offer: ModelPrice) -> str:
    return offer.provider


def body_for(kind: str | None, body: dict[str, Any] | None, built: bytes | None,
             offer: ModelPrice) -> bytes | None:
    """The body a provider gets: the one built from what was priced (``built``), with the
    model named as that provider names it, rebuilt the same way."""
    wanted = offer.upstream_id
    if kind is None or body is None or not wanted or body.get("model") == wanted:
        return built
    return upstream_body(kind, {**body, "model": wanted})[0]
