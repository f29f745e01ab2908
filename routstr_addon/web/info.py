"""``/v1/info`` (what this proxy is and how it prices), ``/health`` and ``/ready``."""

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
    """Liveness: the process serves requests (nothing else is asked)."""
    return json_response(200, {"status": "ok"})


def metrics(services: Services, request: http.Request, peer: Peer) -> http.Response:
    """Prometheus metrics, with ``Authorization: Bearer <METRICS_TOKEN>`` (else 404: not on)."""
    from routstr_addon.errors import ApiError
    from routstr_addon.observe.exposition import exposition, token_matches

    token = services.config.metrics_token
    if services.metrics is None or not token:
        raise ApiError(404, "Metrics are not served on this port (set METRICS_TOKEN).",
                       type="invalid_request_error", code="not_found")
    if not token_matches(request.headers.get("authorization", ""), token):
        raise ApiError(401, "Send the metrics token as 'Authorization: Bearer <METRICS_TOKEN>'.",
                       type="invalid_request_error", code="invalid_metrics_token")
    return exposition(services.metrics)


async def ready(services: Services, request: http.Request, peer: Peer) -> http.Response:
    """Readiness: 200 when every check passes, else 503 (a balancer drains this process)."""
    readiness = services.readiness
    checks = await readiness.checks() if readiness is not None else []
    ok = bool(checks) and all(c.ok for c in checks)
    return json_response(200 if ok else 503, {
        "status": "ready" if ok else "not_ready",
        "checks": {c.name: c.as_json() for c in checks},
    }, {"cache-control": "no-store"})
def _payment_key(services: Services) -> str | None:
    payments = services.payments
    if payments is None or payments.locked is None:
        return None
    return payments.locked.key.public_hex
