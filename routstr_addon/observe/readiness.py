"""``/ready``: whether this process can serve paid requests now, for a balancer to drain it.

Four checks, each reported with its age: the ledger takes a write (this process's heartbeat),
a BTC/USD rate younger than its limit exists (when prices need one), the primary mint answered
recently, the upstream answered recently. Mints and upstream are watched from the traffic
itself (``Seen``: a timestamp stored per answer, nothing more on the request path); when the
traffic is older than ``READY_MAX_AGE``, ``/ready`` asks them itself, one probe at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from routstr_addon.ledger import Ledger
from routstr_addon.metering.pricing import Pricing
from routstr_addon.settings import Config, SettingError, Upstream, parse_upstream

__all__ = ["Check", "Readiness", "Seen"]

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0
LEDGER_EVERY = 1.0  # a ledger write at most once a second, however often /ready is asked


class Seen:
    """When the upstream last answered (any status below 500), stamped by the paid forward's
    ``responseheaders`` hook: one float store per request."""

    __slots__ = ("upstream_at",)

    def __init__(self) -> None:
        self.upstream_at: float | None = None


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    age: float | None  # seconds since the thing checked last worked; None: never
    limit: float | None  # the age beyond which it no longer counts; None: no limit
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok,
                               "age_s": None if self.age is None else round(self.age, 3),
                               "limit_s": self.limit}
        if self.detail:
            out["detail"] = self.detail
        return out


class _Probe:
    """One outside service asked at most once at a time: concurrent ``/ready`` calls share the
    probe under way."""

    def __init__(self, ask: Callable[[], Awaitable[bool]]) -> None:
        self.ask = ask
        self.answered_at: float | None = None
        self.error = ""
        self._running: asyncio.Task[None] | None = None

    async def run(self) -> None:
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().create_task(self._once())
        await asyncio.shield(self._running)

    async def _once(self) -> None:
        try:
            if await self.ask():
                self.answered_at = time.time()
                self.error = ""
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"[:200]


class Readiness:
    """The checks of one runtime."""

    def __init__(self, config: Config, ledger: Ledger, pricing: Pricing, wallet: Any,
                 seen: Seen, upstream: Upstream | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.pricing = pricing
        self.wallet = wallet
        self.seen = seen
        self.upstream = upstream or config.upstream
        self.max_age = float(config.ready_max_age)
        self._ledger_ok: tuple[float, str] | None = None  # (when it last took a write, error)
        self._ledger_tried = 0.0
        self._upstream = _Probe(self._ask_upstream)
        self._mint = _Probe(self._ask_mint)
        self._client: httpx.AsyncClient | None = None

    async def checks(self) -> list[Check]:
        now = time.time()
        out = [self._check_ledger(now), self._check_rate(now)]
        probes = []
        if self.wallet is not None and self._mint_age(now) is None:
            probes.append(self._mint.run())
        if self._upstream_age(now) is None:
            probes.append(self._upstream.run())
        if probes:
            await asyncio.gather(*probes)
        # Judged at the moment the probes were decided on (an answer that was recent enough
        # then counts, however long the other probe took); ages are told as of now.
        if self.wallet is not None:
            out.append(self._check_mint(now, time.time()))
        out.append(self._check_upstream(now, time.time()))
        return out

    # -- the ledger ----------------------------------------------------------------------

    def _check_ledger(self, now: float) -> Check:
        if now - self._ledger_tried >= LEDGER_EVERY:
            self._ledger_tried = now
            try:
                self.ledger.probe_write()
                self._ledger_ok = (now, "")
            except Exception as e:
                last = self._ledger_ok[0] if self._ledger_ok and not self._ledger_ok[1] else None
                self._ledger_ok = (last or 0.0, f"{type(e).__name__}: {e}"[:200])
                logger.warning("ready: the ledger does not take a write: %s", e)
        last, error = self._ledger_ok or (0.0, "never tried")
        age = now - last if last else None
        return Check("ledger", not error, age, None, error)

    # -- the rate --------------------------------------------------------------------------

    def rate_limit(self) -> float:
        """How old a live rate may be: three refreshes missed, and a minute."""
        return 3.0 * self.config.price_refresh_interval + 60.0

    def _check_rate(self, now: float) -> Check:
        if self.config.btc_usd_price is not None:
            return Check("rate", True, None, None, "fixed BTC_USD_PRICE")
        updated = self.pricing.rate_updated
        age = None if updated is None else now - updated
        needed = self.config.model_based_pricing
        ok = age is not None and age <= self.rate_limit()
        detail = "" if ok else ("no rate yet" if age is None else "the rate is too old")
        if not needed:
            ok, detail = True, "fixed pricing needs no rate"
        return Check("rate", ok, age, self.rate_limit(), detail)

    # -- the primary mint ----------------------------------------------------------------

    def _mint_answered(self) -> float | None:
        seen: float | None = self.wallet.primary.client.answered_at
        probed = self._mint.answered_at
        return max((t for t in (seen, probed) if t is not None), default=None)

    def _mint_age(self, now: float) -> float | None:
        """The age of the mint's last answer if it is recent enough, else None."""
        last = self._mint_answered()
        return now - last if last is not None and now - last <= self.max_age else None

    async def _ask_mint(self) -> bool:
        await self.wallet.primary.client.info()  # stamps answered_at itself
        return True

    def _check_mint(self, then: float, now: float) -> Check:
        last = self._mint_answered()
        age = None if last is None else max(0.0, now - last)
        ok = last is not None and then - last <= self.max_age
        return Check("mint", ok, age, self.max_age,
                     "" if ok else self._mint.error or "no answer yet")

    # -- the upstream ----------------------------------------------------------------------

    def _upstream_answered(self) -> float | None:
        times = (self.seen.upstream_at, self._upstream.answered_at)
        return max((t for t in times if t is not None), default=None)

    def _upstream_age(self, now: float) -> float | None:
        last = self._upstream_answered()
        return now - last if last is not None and now - last <= self.max_age else None

    def _targets(self) -> list[tuple[str, Upstream | None, str]]:
        """(name, where, key) of every provider; no UPSTREAM_BASE_URL: the reverse target."""
        providers = getattr(self.config, "providers", ())
        if providers:
            return [(p.name, p.upstream or _reverse_target(), p.api_key) for p in providers]
        return [("upstream", self.upstream or _reverse_target(), self.config.upstream_api_key)]

    async def _ask_upstream(self) -> bool:
        """Any answer below 500 to ``GET {base}/models`` from any provider means requests can
        be served (the failover takes them to one that answers)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=PROBE_TIMEOUT)
        client = self._client

        async def ask(name: str, upstream: Upstream | None, key: str) -> None:
            if upstream is None:
                raise RuntimeError(f"{name}: no address")
            headers = {"authorization": f"Bearer {key}"} if key else {}
            try:
                resp = await client.get(f"{upstream.origin}{upstream.base_path}/models",
                                        headers=headers)
            except httpx.HTTPError as e:
                raise RuntimeError(f"{name}: {type(e).__name__}: {e}") from None
            if resp.status_code >= 500:
                raise RuntimeError(f"{name} answered {resp.status_code}")

        results = await asyncio.gather(*(ask(*t) for t in self._targets()),
                                       return_exceptions=True)
        if any(r is None for r in results):
            return True
        raise RuntimeError("; ".join(str(r) for r in results)[:300])

    def _check_upstream(self, then: float, now: float) -> Check:
        last = self._upstream_answered()
        age = None if last is None else max(0.0, now - last)
        ok = last is not None and then - last <= self.max_age
        return Check("upstream", ok, age, self.max_age,
                     "" if ok else self._upstream.error or "no answer yet")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _reverse_target() -> Upstream | None:
    """Without UPSTREAM_BASE_URL: the target of mitmproxy's reverse mode, if it runs one."""
    from mitmproxy import ctx

    try:
        modes = list(ctx.options.mode)
    except (AttributeError, KeyError):
        return None
    for mode in modes:
        if mode.startswith("reverse:"):
            try:
                return parse_upstream(mode.removeprefix("reverse:"))
            except SettingError:
                return None
    return None
