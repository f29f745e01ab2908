"""Endpoints the addon answers itself; they are never forwarded upstream.

A handler takes the proxy's services, the request and the client connection it came on
(``Peer``), and returns a response or an awaitable of one. ``routes.lookup`` finds the
handlers of a path.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger
from routstr_addon.metering.pricing import Pricing
from routstr_addon.payments.cashu import Payments
from routstr_addon.payments.lightning import Invoices
from routstr_addon.settings import Config
from routstr_addon.web.auth import LoginLimiter, Sessions
from routstr_addon.web.limits import RateLimit

if TYPE_CHECKING:
    from routstr_addon.discovery.nostr import Directory
    from routstr_addon.observe.metrics import Metrics
    from routstr_addon.observe.readiness import Readiness
    from routstr_addon.payments.payouts import Payouts
    from routstr_addon.upstreams.health import Health
    from routstr_addon.web.adminshared import SharedLoginLimiter, SharedSessions

__all__ = ["AdminState", "Handler", "Peer", "Services"]


@dataclass(slots=True)
class AdminState:
    """What ``/admin`` keeps between requests: open sessions, failed logins per address, and
    the lock that lets one withdrawal run at a time (the margin is read, then spent). The
    proxy keeps sessions and failures in the ledger (``adminshared``), shared by every process
    on the database; the in-memory ones serve tests of the parts."""

    sessions: Sessions | SharedSessions = field(default_factory=Sessions)
    limiter: LoginLimiter | SharedLoginLimiter = field(
        default_factory=lambda: LoginLimiter(attempts=5, window=60.0))
    withdrawing: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class Services:
    """What local endpoints read and keep: settings, ledger, prices, ecash, the dashboard's
    sessions and the providers found on Nostr."""

    config: Config
    ledger: Ledger
    pricing: Pricing
    wallet: Wallet | None = None
    payments: Payments | None = None
    invoices: Invoices | None = None
    admin: AdminState = field(default_factory=AdminState)
    directory: Directory | None = None  # made on the first /v1/providers
    readiness: Readiness | None = None  # /ready's checks
    metrics: Metrics | None = None  # /metrics (None: metrics are off)
    catalog: Any = None  # the providers' models (the admin API publishes them again)
    invoice_limit: RateLimit = field(default_factory=RateLimit)  # invoices per client address
    payouts: Payouts | None = None  # refunds to a key's refund address
    health: Health | None = None  # the upstream providers' breakers (set by the runtime)


@dataclass(frozen=True, slots=True)
class Peer:
    """The client connection a request came on: its address, and whether it spoke TLS."""

    address: str
    tls: bool

    @classmethod
    def of(cls, client: Any, headers: Any = None, trusted: tuple[str, ...] = ()) -> Peer:
        """From mitmproxy's ``flow.client_conn``; behind a reverse proxy named in
        ``FORWARDED_ALLOW_IPS`` (``trusted``), the client its ``X-Forwarded-For`` names."""
        peername = getattr(client, "peername", None)
        tls = bool(getattr(client, "tls_established", False))
        address = str(peername[0]) if peername else ""
        if trusted and headers is not None and _trusted(address, trusted):
            forwarded = headers.get_all("x-forwarded-for") if hasattr(headers, "get_all") \
                else [headers.get("x-forwarded-for", "")]
            address = forwarded_client(address, ",".join(forwarded), trusted)
        return cls(address, tls)


def _trusted(address: str, trusted: tuple[str, ...]) -> bool:
    if "*" in trusted:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _networks(trusted))


@functools.cache
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                 ...]:
    return tuple(ipaddress.ip_network(n) for n in trusted if n != "*")


def forwarded_client(peer: str, x_forwarded_for: str, trusted: tuple[str, ...]) -> str:
    """The client of a request from trusted proxy ``peer``: walking ``X-Forwarded-For`` from
    the right (the hop nearest us), the first address that is not a trusted proxy; every hop
    trusted: the leftmost; no header: the peer itself (as uvicorn decides)."""
    hops = [h.strip() for h in x_forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


Handler = Callable[[Services, http.Request, Peer],
                   http.Response | Awaitable[http.Response]]
