"""Routstr nodes found on Nostr join as providers (``AUTO_DISCOVER_NODES``).

Every ``MODELS_REFRESH_INTERVAL`` seconds the listings (kind 38421) on ``RELAYS`` are read and
each node's ``/v1/info`` asked (``discovery.nostr.discover``). A node joins as a provider of
type ``routstr`` when its key is allowed (``NODE_ALLOWED_PUBKEYS``) and not blocked
(``NODE_BLOCKED_PUBKEYS``), it is not this proxy, its URL may be reached, and it takes one of
``CASHU_MINTS`` (a node whose mints this proxy does not trust is never paid). Its models are
then read like any node's; the catalog offers a discovered node's model only within
``NODE_MAX_PRICE_MARKUP`` of the cheapest offer of that model.

Discovered URLs are anyone's on Nostr: like users' addresses they must be https to a public
address (``ALLOW_PRIVATE_LN_ADDRESSES`` lifts that, for tests and private networks); ``.onion``
nodes are reached through ``TOR_PROXY_URL``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from urllib.parse import urlsplit

import httpx

from routstr_addon.discovery.nostr import Provider, discover
from routstr_addon.proxy.route import Route
from routstr_addon.settings import Config
from routstr_addon.upstreams.catalog import Catalog, client_for
from routstr_addon.upstreams.health import Breaker
from routstr_addon.upstreams.nodes import NodePayer
from routstr_addon.upstreams.providers import ProviderError, ProviderSpec, _url

__all__ = ["NodeFinder", "acceptable"]

logger = logging.getLogger("routstr")


def acceptable(url: str, allow_private: bool, tor: bool = False) -> bool:
    """Whether a node's announced URL may be connected to (``.onion``: with a Tor proxy)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or parts.scheme not in ("http", "https"):
        return False
    if host.endswith(".onion"):
        return tor
    if allow_private:
        return True
    if parts.scheme != "https" or host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True  # a name (resolved when connected; see the module's note)
    return address.is_global


class NodeFinder:
    """Adds the nodes the relays list to the live catalog, route and payer."""

    def __init__(self, config: Config, catalog: Catalog, route: Route,
                 payer: NodePayer | None) -> None:
        self.config = config
        self.catalog = catalog
        self.route = route
        self.payer = payer

    def admit(self, node: Provider) -> ProviderSpec | None:
        """The provider a listing becomes, or None (logged at debug) when it may not join."""
        rules = self.config.nodes
        own = self.config.nostr.pubkey
        why = None
        mints = (node.info or {}).get("mints") or node.mint_urls
        theirs = {str(m).rstrip("/") for m in mints} if isinstance(mints, list) else set()
        url = node.endpoint_url or ""
        if node.pubkey in rules.blocked:
            why = "its key is blocked"
        elif rules.allowed and node.pubkey not in rules.allowed:
            why = "its key is not allowed"
        elif own and node.pubkey == own:
            why = "it is this proxy"
        elif not acceptable(url, self.config.allow_private_ln_addresses,
                            bool(self.config.nostr.tor_proxy_url)):
            why = f"its URL {url} may not be reached"
        elif not any(m.rstrip("/") in theirs for m in self.config.cashu_mints):
            why = "it takes none of CASHU_MINTS"
        if why is not None:
            logger.debug("nostr: node %s (%s) not used: %s", node.name, node.pubkey[:12], why)
            return None
        name = f"nostr-{node.pubkey[:16]}"
        try:
            return ProviderSpec(name, _url(name, "url", f"{url.rstrip('/')}/v1"), type="routstr",
                                fetch=True, discovered=True)
        except ProviderError:
            return None

    def add(self, spec: ProviderSpec) -> bool:
        """Put a new node in the catalog, the router, the breakers, the route and the payer."""
        catalog = self.catalog
        if any(p.name == spec.name for p in catalog.providers):
            return False
        catalog.providers = (*catalog.providers, spec)
        router = catalog.router
        router.priority[spec.name] = spec.priority
        router.health.breakers.setdefault(spec.name, Breaker(spec.name))
        self.route.add(spec)
        if self.payer is not None:
            self.payer.bases[spec.name] = spec.base_url
        logger.info("nostr: node %s joins as a provider (%s)", spec.name, spec.base_url)
        return True

    async def find(self, client: httpx.AsyncClient) -> list[str]:
        """One look at the relays; the names of the nodes that joined."""
        added = []
        for node in await discover(self.config.nostr):
            spec = self.admit(node)
            if spec is not None and self.add(spec):
                added.append(spec.name)
                await self.catalog.refresh_node(client, spec)
        if added:
            self.catalog.publish()
        return added

    async def run(self, interval: float) -> None:
        async with client_for(20.0, self.config.nostr.tor_proxy_url) as client:
            while True:
                try:
                    await self.find(client)
                except Exception:  # never let the finder die
                    logger.exception("nostr: node discovery failed")
                await asyncio.sleep(interval)
