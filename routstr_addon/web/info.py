"""``/v1/info`` (what this proxy is and how it prices) and ``/health``."""

from __future__ import annotations

from mitmproxy import http

from routstr_addon import __version__
from routstr_addon.errors import json_response
from routstr_addon.web import Peer, Services


def info(services: Services, request: http.Request, peer: Peer) -> http.Response:
    config, pricing = services.config, services.pricing
    return json_response(200, {
        "name": config.name,
        "description": config.description,
        "version": __version__,
        "mints": list(config.cashu_mints),
        # The key x-cashu payments are locked to (NUT-11), when locked payments are on.
        "payment_key": _payment_key(services),
        "pricing": "model_based" if config.model_based_pricing else "fixed",
        "cost_per_request_sats": config.cost_per_request_msat / 1000,
        "btc_usd": {
            "rate": float(pricing.rate) if pricing.rate is not None else None,
            "updated_at": pricing.rate_updated,
        },
        "models": len(pricing.models),
        "http_url": config.nostr.http_url or None,
        "onion_url": config.nostr.onion() or None,
        "npub": config.nostr.npub or None,
    })


def health(services: Services, request: http.Request, peer: Peer) -> http.Response:
    return json_response(200, {"status": "ok"})


def _payment_key(services: Services) -> str | None:
    payments = services.payments
    if payments is None or payments.locked is None:
        return None
    return payments.locked.key.public_hex
