"""``GET /v1/providers``: the Routstr providers listed on the Nostr relays that answer.

The original Routstr's shape: ``{"providers": [provider, …]}``, each with ``id`` (its ``d``
tag), ``pubkey``, ``endpoint_url(s)``, ``name``, ``description``, ``mint_urls``, ``version``
and, here, ``info`` (what its ``/v1/info`` answered). ``?include_json=true`` gives
``{"provider", "health"}`` pairs as the original does; ``?pubkey=<hex>`` keeps one operator's.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from mitmproxy import http

from routstr_addon.errors import ApiError, json_response
from routstr_addon.web import Peer, Services

if TYPE_CHECKING:
    from routstr_addon.discovery.nostr import Directory


def _directory_for(services: Services) -> Directory:
    """The runtime's directory of providers, made on first use (it loads nostr-sdk)."""
    n = services.config.nostr
    if services.directory is None or services.directory.nostr != n:
        from routstr_addon.discovery.nostr import Directory

        services.directory = Directory(n)
    return services.directory


def providers(services: Services, request: http.Request,
              peer: Peer) -> Awaitable[http.Response]:
    n = services.config.nostr
    if n.providers_refresh_interval == 0:
        raise ApiError(404, "Provider discovery is off here (PROVIDERS_REFRESH_INTERVAL=0).",
                       code="not_found")
    pubkey = request.query.get("pubkey") or None
    include_json = request.query.get("include_json", "").lower() in ("1", "true", "yes")
    return _answer(_directory_for(services), pubkey, include_json)


async def _answer(directory: Directory, pubkey: str | None,
                  include_json: bool) -> http.Response:
    found = [p.as_json() for p in await directory.providers()
             if pubkey is None or p.pubkey == pubkey]
    if include_json:
        return json_response(200, {"providers": [
            {"provider": p, "health": {"status_code": 200, "endpoint": "info", "json": p["info"]}}
            for p in found]})
    return json_response(200, {"providers": found})
