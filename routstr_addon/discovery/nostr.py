"""Nostr discovery, compatible with the original Routstr's provider listings (kind 38421).

**Announce.** With ``NSEC`` set, the proxy signs a listing of itself and sends it to ``RELAYS``
on start and every day: tags ``d`` (the provider id), ``u`` (its HTTP and onion URLs),
``mint`` (the trusted mints) and ``version``; content ``{"name", "about"}``. A listing is
addressable (NIP-01: kind 30000-39999), so relays keep only the newest per pubkey and ``d``.

**Discover.** ``GET /v1/providers`` and ``routstr providers`` read the listings on ``RELAYS``,
keep the newest per pubkey and ``d``, and ask each provider for its ``/v1/info`` (all at once,
with a short timeout; ``.onion`` URLs through ``TOR_PROXY_URL``). Those that do not answer are
left out; the rest come back with what they answered.

Keys, signatures and relay I/O are nostr-sdk's (rust-nostr).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import nostr_sdk as nostr

from routstr_addon import __version__
from routstr_addon.netguard import GuardedTransport
from routstr_addon.settings import Config, Nostr

__all__ = [
    "LISTING_KIND",
    "Directory",
    "Provider",
    "announce",
    "announce_forever",
    "check",
    "discover",
    "endpoint_urls",
    "fetch_listings",
    "latest",
    "listing_event",
    "parse_listing",
    "provider_id",
]

logger = logging.getLogger("routstr.nostr")

LISTING_KIND = 38421
ANNOUNCE_EVERY = 24 * 3600.0
RETRY_AFTER = (60.0, 300.0, 900.0, 3600.0)  # while no relay took the announcement
RELAY_TIMEOUT = 10.0
INFO_TIMEOUT = 5.0
ONION_INFO_TIMEOUT = 20.0  # a Tor circuit to a hidden service takes a few seconds
MAX_LISTINGS = 500


# --- who we are ---------------------------------------------------------------------------


def provider_id(pubkey_hex: str) -> str:
    """The listing's ``d`` tag: stable per key (the original's default, its pubkey's start)."""
    return pubkey_hex[:12]


def npub(pubkey_hex: str) -> str:
    return str(nostr.PublicKey.parse(pubkey_hex).to_bech32())


def endpoint_urls(n: Nostr) -> list[str]:
    """This proxy's public URLs: ``HTTP_URL`` and the onion URL."""
    return [url for url in (n.http_url, n.onion()) if url]


def _private(url: str) -> bool:
    """A URL only this machine or its network can reach."""
    host = (urlsplit(url).hostname or "").lower()
    if not host or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified


def listing_event(keys: nostr.Keys, urls: Iterable[str], mints: Iterable[str], name: str,
                  about: str, version: str = __version__) -> nostr.Event:
    """This provider's signed listing, as the original Routstr writes it."""
    pubkey = keys.public_key().to_hex()
    tags = [nostr.Tag.identifier(provider_id(pubkey))]
    tags += [nostr.Tag.parse(["u", url]) for url in urls]
    tags += [nostr.Tag.parse(["mint", mint]) for mint in mints]
    tags.append(nostr.Tag.parse(["version", version]))
    content = json.dumps({"name": name, "about": about}, separators=(",", ":"))
    return nostr.EventBuilder(nostr.Kind(LISTING_KIND), content).tags(tags).finalize(keys)


# --- relays -------------------------------------------------------------------------------


async def _connected(relays: Iterable[str],
                     wait: float) -> tuple[nostr.Client, list[nostr.RelayUrl]]:
    client = nostr.Client()
    for url in relays:
        try:
            await client.add_relay(nostr.RelayUrl.parse(url))
        except Exception as e:
            logger.warning("nostr: relay %s: %s", url, e)
    out = await client.try_connect(timedelta(seconds=wait))
    for url, reason in out.failed.items():
        logger.info("nostr: relay %s unreachable: %s", url, reason)
    return client, list(out.success)


async def publish(event: nostr.Event, relays: Iterable[str],
                  wait: float = RELAY_TIMEOUT) -> list[str]:
    """Send an event to the relays; the ones that accepted it."""
    client, connected = await _connected(relays, wait)
    try:
        if not connected:
            return []
        out = await client.send_event(event, nostr.SendEventTarget.to(connected),
                                      ok_timeout=timedelta(seconds=wait))
        for url, reason in out.failed.items():
            logger.warning("nostr: relay %s refused the listing: %s", url, reason)
        return [str(url) for url in out.success]
    finally:
        await client.shutdown()


async def fetch_listings(relays: Iterable[str], wait: float = RELAY_TIMEOUT,
                         pubkey: str | None = None) -> list[dict[str, Any]]:
    """Every provider listing the relays hold (signatures checked), as event JSON."""
    client, connected = await _connected(relays, wait)
    try:
        if not connected:
            return []
        query = nostr.Filter().kind(nostr.Kind(LISTING_KIND)).limit(MAX_LISTINGS)
        if pubkey:
            query = query.author(nostr.PublicKey.parse(pubkey))
        events = await client.fetch_events(
            nostr.ReqTarget.manual({url: [query] for url in connected}),
            timedelta(seconds=wait))
    finally:
        await client.shutdown()
    return [json.loads(e.as_json()) for e in events if e.verify()]


# --- listings -----------------------------------------------------------------------------


@dataclass(slots=True)
class Provider:
    """One provider's listing, in the original Routstr's shape, and what it answered."""

    id: str
    pubkey: str
    created_at: int
    endpoint_urls: list[str]
    mint_urls: list[str]
    version: str | None
    name: str
    description: str | None
    content: str
    event_id: str
    endpoint_url: str | None = None  # the URL whose /v1/info answered
    info: dict[str, Any] | None = field(default=None)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "npub": npub(self.pubkey),
            "created_at": self.created_at,
            "kind": LISTING_KIND,
            "endpoint_url": self.endpoint_url or next(iter(self.endpoint_urls), None),
            "endpoint_urls": self.endpoint_urls,
            "name": self.name,
            "description": self.description,
            "mint_urls": self.mint_urls,
            "version": self.version,
            "content": self.content,
            "info": self.info,
        }


def _values(tags: list[Any], name: str) -> list[str]:
    return [t[1] for t in tags if isinstance(t, list) and len(t) >= 2 and t[0] == name
            and isinstance(t[1], str)]


def parse_listing(event: dict[str, Any]) -> Provider | None:
    """A kind 38421 event as a provider; None if it lacks a ``d`` tag or any URL."""
    tags = event.get("tags")
    if event.get("kind") != LISTING_KIND or not isinstance(tags, list):
        return None
    ids, urls = _values(tags, "d"), _values(tags, "u")
    urls = [u.rstrip("/") for u in urls if urlsplit(u).scheme in ("http", "https")]
    if not ids or not urls:
        return None
    content = event.get("content") or ""
    try:
        meta = json.loads(content) if content else {}
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    versions = _values(tags, "version")
    return Provider(
        id=ids[0], pubkey=str(event.get("pubkey", "")),
        created_at=int(event.get("created_at", 0)), endpoint_urls=list(dict.fromkeys(urls)),
        mint_urls=list(dict.fromkeys(_values(tags, "mint"))),
        version=versions[0] if versions else None,
        name=str(meta.get("name") or "Unknown Provider"),
        description=str(meta["about"]) if meta.get("about") is not None else None,
        content=content, event_id=str(event.get("id", "")))


def latest(events: Iterable[dict[str, Any]]) -> list[Provider]:
    """One provider per pubkey and ``d``: its newest listing."""
    newest: dict[tuple[str, str], Provider] = {}
    for event in events:
        provider = parse_listing(event)
        if provider is None:
            continue
        key = (provider.pubkey, provider.id)
        seen = newest.get(key)
        if seen is None or (provider.created_at, provider.event_id) > (seen.created_at,
                                                                       seen.event_id):
            newest[key] = provider
    return sorted(newest.values(), key=lambda p: -p.created_at)


# --- checking providers -------------------------------------------------------------------


def _httpx_proxy(tor_proxy_url: str) -> str:
    # httpx sends the host name to a SOCKS5 proxy, which resolves it: socks5h in effect.
    return tor_proxy_url.replace("socks5h://", "socks5://", 1)


async def check(provider: Provider, tor_proxy_url: str,
                wait: float = INFO_TIMEOUT, guard: bool = False) -> Provider | None:
    """The provider with its ``/v1/info``, from the first of its URLs that answers; else None.
    ``guard``: the URLs are anyone's (a listing on a public relay), so they are reached only at
    public addresses, checked on the socket (``netguard``): a listing cannot make the proxy
    fetch from its own machine or network."""
    for url in provider.endpoint_urls:
        onion = (urlsplit(url).hostname or "").endswith(".onion")
        if onion and not tor_proxy_url:
            continue
        transport: httpx.AsyncBaseTransport
        if onion:
            transport = httpx.AsyncHTTPTransport(proxy=httpx.Proxy(_httpx_proxy(tor_proxy_url)))
        elif guard:
            transport = GuardedTransport(https_only=False)
        else:
            transport = httpx.AsyncHTTPTransport()
        try:
            async with httpx.AsyncClient(transport=transport, follow_redirects=True,
                                         timeout=ONION_INFO_TIMEOUT if onion else wait) as c:
                resp = await c.get(f"{url}/v1/info")
            info = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, OSError) as e:
            logger.debug("nostr: provider %s at %s: %s", provider.name, url, e)
            continue
        if isinstance(info, dict):
            provider.endpoint_url, provider.info = url, info
            return provider
    return None


async def discover(n: Nostr, wait: float = RELAY_TIMEOUT,
                   pubkey: str | None = None) -> list[Provider]:
    """The providers listed on the relays that answer on ``/v1/info``."""
    found = latest(await fetch_listings(n.relays, wait, pubkey))
    # As for announcements: private addresses are for a setup whose relays are all local.
    guard = any(not _private(relay) for relay in n.relays)
    checked = await asyncio.gather(*(check(p, n.tor_proxy_url, guard=guard) for p in found))
    alive = [p for p in checked if p is not None]
    logger.info("nostr: %d provider listing(s) on %d relay(s), %d answering",
                len(found), len(n.relays), len(alive))
    return alive


class Directory:
    """``discover``'s answer kept for ``PROVIDERS_REFRESH_INTERVAL``; one refresh at a time.

    Once something was found, a stale answer is served while the next refresh runs.
    """

    def __init__(self, n: Nostr) -> None:
        self.nostr = n
        self._found: list[Provider] | None = None
        self._at = 0.0
        self._refresh: asyncio.Future[list[Provider]] | None = None

    async def providers(self) -> list[Provider]:
        fresh = time.monotonic() - self._at < self.nostr.providers_refresh_interval
        if self._found is not None and fresh:
            return self._found
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self._load())
        if self._found is not None:
            return self._found
        return await asyncio.shield(self._refresh)

    async def _load(self) -> list[Provider]:
        try:
            found = await discover(self.nostr)
        except Exception:
            logger.exception("nostr: provider discovery failed")
            found = self._found or []
        finally:
            self._refresh = None
        self._found, self._at = found, time.monotonic()
        return found


# --- announcing ---------------------------------------------------------------------------


async def announce(config: Config) -> list[str] | None:
    """Send this proxy's listing to the relays: the relays that took it; None if there is
    nothing to announce yet (no NSEC, or no URL: HTTP_URL, ONION_URL or tor's hostname)."""
    n = config.nostr
    if not n.secret_key:
        return None
    urls = endpoint_urls(n)
    if any(not _private(relay) for relay in n.relays):
        private = [url for url in urls if _private(url)]
        if private:
            logger.warning("nostr: not announcing %s to public relays: nobody else can reach it",
                           ", ".join(private))
        urls = [url for url in urls if url not in private]
    if not urls:
        logger.warning("nostr: nothing to announce yet: set HTTP_URL or ONION_URL (or "
                       "ONION_HOSTNAME_FILE: tor writes it once the hidden service is up)")
        return None
    keys = nostr.Keys.parse(n.secret_key)
    event = listing_event(keys, urls, config.cashu_mints, config.name, config.description)
    accepted = await publish(event, n.relays)
    logger.info("nostr: announced %s as %s (d=%s) to %d of %d relay(s)", " ".join(urls),
                n.npub, provider_id(n.pubkey), len(accepted), len(n.relays))
    return accepted


async def announce_forever(config: Config, every: float = ANNOUNCE_EVERY) -> None:
    """Announce on start and every day; sooner again while no relay took it."""
    failures = 0
    while True:
        try:
            accepted = await announce(config)
        except Exception:
            logger.exception("nostr: announcing failed")
            accepted = []
        if accepted:
            failures = 0
            delay = every
        else:
            delay = RETRY_AFTER[min(failures, len(RETRY_AFTER) - 1)]
            failures += 1
        await asyncio.sleep(delay)
