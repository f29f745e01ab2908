"""Endpoints the addon answers itself; they are never forwarded upstream.

A handler takes the proxy's services and the request and returns a response. ``lookup`` is a
dictionary lookup on the exact path (plus ``/v1/models/{id}`` and everything under ``/admin``),
cheap enough for every request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger
from routstr_addon.metering.pricing import Pricing
from routstr_addon.payments.cashu import Payments
from routstr_addon.payments.lightning import Invoices
from routstr_addon.settings import Config

__all__ = ["PEER", "Handler", "Peer", "Services", "lookup"]


@dataclass(slots=True)
class Services:
    """What local endpoints read: settings, ledger and prices."""

    config: Config
    ledger: Ledger
    pricing: Pricing
    wallet: Wallet | None = None
    payments: Payments | None = None
    invoices: Invoices | None = None


Handler = Callable[[Services, http.Request], http.Response | Awaitable[http.Response]]


@dataclass(frozen=True, slots=True)
class Peer:
    """The client connection a request came on: its address, and whether it spoke TLS."""

    address: str
    tls: bool

    @classmethod
    def of(cls, client: Any) -> Peer:
        """From mitmproxy's ``flow.client_conn``."""
        peername = getattr(client, "peername", None)
        tls = bool(getattr(client, "tls_established", False))
        return cls(str(peername[0]) if peername else "", tls)


# The connection of the request a handler is answering, set by the addon just before it calls
# the handler (read it in the handler's synchronous part); None when the addon did not set it.
PEER: ContextVar[Peer | None] = ContextVar("routstr_peer", default=None)


def _table() -> dict[str, dict[str, Handler]]:
    from routstr_addon.web import balance, info, models, providers

    table: dict[str, dict[str, Handler]] = {
        "/": {"GET": info.info},
        "/health": {"GET": info.health},
        "/v1/info": {"GET": info.info},
        "/v1/models": {"GET": models.list_models},
        "/v1/providers": {"GET": providers.providers},
        "/v1/providers/": {"GET": providers.providers},
    }
    for base in ("/v1/balance", "/v1/wallet"):
        table[f"{base}/info"] = {"GET": balance.info}
        table[f"{base}/"] = {"GET": balance.info}
        table[base] = {"GET": balance.info}
        table[f"{base}/create"] = {"POST": balance.create, "GET": balance.create}
        table[f"{base}/topup"] = {"POST": balance.topup}
        table[f"{base}/refund"] = {"POST": balance.refund}
        table[f"{base}/lightning/invoice"] = {"POST": balance.lightning_invoice}
    return table


_ROUTES: dict[str, dict[str, Handler]] | None = None


def lookup(path: str) -> dict[str, Handler] | None:
    """The handlers (by method) for a local path, or None if the path is forwarded."""
    global _ROUTES
    if _ROUTES is None:
        _ROUTES = _table()
    found = _ROUTES.get(path)
    if found is None and path.startswith("/admin"):  # the dashboard; nothing under it goes out
        from routstr_addon.web import admin

        return admin.HANDLERS
    if found is None and path.startswith("/v1/models/"):
        from routstr_addon.web import models

        return {"GET": models.get_model}
    if found is None and path.endswith("/status") and (
            path.startswith(("/v1/balance/lightning/invoice/", "/v1/wallet/lightning/invoice/"))):
        from routstr_addon.web import balance

        return {"GET": balance.lightning_status}
    return found
