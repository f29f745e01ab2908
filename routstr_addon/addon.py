"""mitmproxy entry point: ``mitmdump --mode reverse:<upstream> -s routstr_addon/addon.py``.

The hooks are thin: they route local endpoints, hand the request to ``Meter`` (authenticate,
price, reserve), rewrite it for the upstream, tap streams, and settle from the answer. Any
failure of our own fails closed: the client gets an error and nothing unpaid is forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

try:
    import routstr_addon  # noqa: F401
except ImportError:  # loaded by path (mitmdump -s) from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routstr_addon import settings, web
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.errors import ApiError, error_response, install_error_pages
from routstr_addon.ledger import DATABASE_ERRORS, Ledger, Settlement
from routstr_addon.metering.meter import Meter, Paid, bearer_token
from routstr_addon.metering.pricing import Pricing, RateKeeper, load_models
from routstr_addon.metering.sweeper import Sweeper
from routstr_addon.payments.cashu import Payments
from routstr_addon.payments.lightning import Invoices
from routstr_addon.payments.payouts import Payouts
from routstr_addon.proxy import webview
from routstr_addon.settings import Config, SettingError

__all__ = ["Routstr", "addons"]

logger = logging.getLogger("routstr")

STATE = "routstr"  # key of a forwarded flow's ``Paid`` in flow.metadata
_CLIENT_SECRETS = frozenset((b"authorization", b"x-cashu"))
LEDGER_DOWN = ApiError(503, "The ledger is unavailable right now (full disk or database away); "
                       "nothing was charged. Try again shortly.", type="service_unavailable",
                       code="ledger_unavailable", headers={"retry-after": "5"})
_OUR_OPTIONS = frozenset(s.option for s in settings.SETTINGS)


class Routstr:
    """The paying proxy: one instance per mitmproxy process."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.ledger: Ledger | None = None
        self.pricing: Pricing | None = None
        self.meter: Meter | None = None
        self.wallet: Wallet | None = None
        self.payments: Payments | None = None
        self.invoices: Invoices | None = None
        self.payouts: Payouts | None = None
        self.services: web.Services | None = None
        self._env_errors: list[str] = []
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._upstream_auth: tuple[tuple[bytes, bytes], ...] = ()
        self._unsettled: list[tuple[Paid, Callable[[], object]]] = []
        self._touch_every = 15.0
        self._running = False
        self._web: webview.Scrubber | None = None  # under mitmweb: keeps secrets off its page

    # -- lifecycle -------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        self._env_errors = settings.register(loader)
        install_error_pages()

    def configure(self, updated: set[str]) -> None:
        if not (updated & _OUR_OPTIONS) and self.config is not None:
            return
        try:
            if self._env_errors:
                raise SettingError(self._env_errors[0])
            config = Config.from_options(ctx.options)
            if config == self.config:
                return  # options set again to the same values
            pricing = Pricing(_models(config), config.exchange_fee, config.upstream_provider_fee)
            if config.btc_usd_price is not None:
                pricing.set_rate(config.btc_usd_price)
            ledger = Ledger(config.database_url)
            wallet = Wallet.from_config(ledger, config) if config.cashu_mints else None
        except Exception as e:
            message = str(e) if isinstance(e, SettingError) else f"cannot start: {e}"
            if self.config is None:
                # At start-up: one clear line; mitmdump exits on an error logged while starting,
                # and until then every request is refused (no meter, nothing forwarded).
                logger.error("routstr: %s", message)
                return
            raise exceptions.OptionsError(message) from None  # a live change: refuse it
        if self.ledger is not None:
            self.ledger.close()
        ledger.defer_checkpoints()
        self.config, self.pricing, self.ledger = config, pricing, ledger
        self.meter = Meter(config, ledger, pricing)
        self._upstream_auth = (((b"authorization",
                                 f"Bearer {config.upstream_api_key}".encode()),)
                               if config.upstream_api_key else ())
        self._touch_every = min(15.0, config.reservation_timeout / 3)
        old_wallet, self.wallet = self.wallet, wallet
        self.invoices = Invoices(ledger, self.wallet) if self.wallet else None
        self.payments = (Payments(ledger, self.wallet, self.invoices, config.swap_untrusted_mints)
                         if self.wallet else None)
        self.payouts = (Payouts(ledger, self.wallet, config, self.payments)
                        if self.wallet else None)
        if old_wallet is not None:
            with contextlib.suppress(RuntimeError):  # no loop yet: nothing was opened
                asyncio.get_running_loop().create_task(old_wallet.close())
        self.services = web.Services(config, ledger, pricing, self.wallet, self.payments,
                                        self.invoices)
        # Requests we answer ourselves must not open an upstream connection first.
        ctx.options.update(connection_strategy="lazy", body_size_limit=str(config.max_request_size))
        if self._running:  # reconfigured while running: restart the timers with the new settings
            self._start_tasks()
        logger.info("routstr: %s pricing, ledger %s, upstream %s",
                    "model-based" if config.model_based_pricing else "fixed",
                    config.database_url.split("://")[0],
                    config.upstream.origin + config.upstream.base_path if config.upstream
                    else "from the reverse mode")

    def running(self) -> None:
        self._running = True
        self._web = webview.install(ctx.master)
        self._start_tasks()
        # Everything loaded at start-up lives as long as the process: keep it out of the
        # garbage collector's full passes, which otherwise stall requests for tens of ms.
        gc.freeze()

    def _start_tasks(self) -> None:
        """The background work: live BTC/USD rates, and SQLite checkpoints off the hot path."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks = {}
        config, pricing, ledger = self.config, self.pricing, self.ledger
        if config is None or pricing is None or ledger is None:
            return
        loop = asyncio.get_running_loop()
        if config.model_based_pricing and config.btc_usd_price is None:
            rates = RateKeeper(pricing, config.btc_usd_sources, config.price_refresh_interval)
            self._tasks["rates"] = loop.create_task(rates.run())
        if ledger.is_sqlite:
            self._tasks["checkpoint"] = loop.create_task(_checkpoints(ledger))
        if self.wallet is not None:
            self._tasks["wallet"] = loop.create_task(self.wallet.start())
        if self.invoices is not None:
            self._tasks["invoices"] = loop.create_task(self.invoices.watch())
        if self.payouts is not None:
            self._tasks["payouts"] = loop.create_task(
                self.payouts.loop(config.payout_interval, "payouts"))
            self._tasks["refunds"] = loop.create_task(
                self.payouts.loop(config.refund_processing_interval, "refunds"))
        if ledger.instance_id is None:
            ledger.register_instance()
        self._tasks["sweeper"] = loop.create_task(Sweeper(ledger, pricing, config).run())
        self._tasks["settlements"] = loop.create_task(self._retry_settlements())
        if config.nostr.secret_key:  # NSEC: list this proxy on the Nostr relays, daily
            from routstr_addon.discovery.nostr import announce_forever

            self._tasks["nostr"] = loop.create_task(announce_forever(config))

    async def done(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                self.ledger.unregister_instance()
        if self.wallet is not None:
            await self.wallet.close()
        if self.ledger is not None:
            try:
                self.ledger.checkpoint()
            finally:
                self.ledger.close()

    # -- the request -----------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Decide a request: answer it, or admit and rewrite it for the upstream.

        Sync for what needs no mint (funded keys, local reads: no await cost per request); a
        coroutine, which mitmproxy awaits, for what does (tokens as keys, x-cashu, top-ups).
        """
        if flow.response is not None:
            return None
        try:
            pending = self._request(flow)
        except BaseException:
            # Fail closed: mitmproxy forwards a request whose hook raised, so if anything went
            # wrong here (even building the error answer), kill the flow instead.
            if flow.response is None:
                flow.kill()
            raise
        return None if pending is None else self._decide_later(flow, pending)

    async def _decide_later(self, flow: http.HTTPFlow, pending: Awaitable[None]) -> None:
        decided = False
        try:
            await pending
            decided = True
        except ApiError as e:
            flow.response = e.response()
            decided = True
        except DATABASE_ERRORS as e:
            logger.error("request %s: the ledger is unavailable: %s", flow.id, e)
            flow.response = LEDGER_DOWN.response()
            decided = True
        except Exception:
            self._failed(flow)
            decided = True
        finally:
            if not decided and flow.response is None:
                flow.kill()

    def _failed(self, flow: http.HTTPFlow) -> None:
        logger.exception("request %s failed inside the proxy", flow.id)
        paid = flow.metadata.pop(STATE, None)
        if isinstance(paid, Paid) and not paid.settled and self.meter is not None:
            self.meter.release(paid, "proxy error")
            if paid.xcashu is not None and self.payments is not None:
                self.payments.close_xcashu(paid.xcashu, paid.request_id)
        flow.response = error_response(500, "The proxy failed to handle this request.",
                                       "server_error", "proxy_error")

    def _request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if self.meter is None or self.services is None:
            flow.response = error_response(503, "The proxy is not configured.", "server_error",
                                           "not_configured")
            return None
        req = flow.request
        path = req.path.split("?", 1)[0]
        try:
            handlers = web.lookup(path)
            if handlers is not None:
                handler = handlers.get(req.method)
                if handler is None:
                    raise ApiError(405, f"{req.method} is not allowed on {path}.",
                                   code="method_not_allowed")
                web.PEER.set(web.Peer.of(flow.client_conn))
                answer = handler(self.services, req)
                if isinstance(answer, http.Response):
                    flow.response = answer
                    return None
                return self._answer_later(flow, answer)
            # One pass over the raw header fields: mitmproxy's header lookups cost more than the
            # rest of this hook on the funded-key path.
            authorization = x_cashu = None
            encoded = False
            for name, value in req.headers.fields:
                low = name.lower()
                if low == b"authorization":
                    authorization = value.decode("latin-1")
                elif low == b"x-cashu":
                    x_cashu = value.decode("latin-1")
                elif low == b"content-encoding":
                    encoded = True
            if x_cashu is not None:
                return self._forward_xcashu(flow, path, x_cashu)
            if authorization and (authorization[7:13] in ("cashuA", "cashuB")
                                  or "cashu:" in authorization[:14]):
                return self._forward_token_key(flow, path, bearer_token(authorization))
            self._forward(flow, path, self.meter.admit(
                flow.id, authorization, _api_path(path), _body(req, encoded)))
        except ApiError as e:
            flow.response = e.response()
        except DATABASE_ERRORS as e:
            logger.error("request %s: the ledger is unavailable: %s", flow.id, e)
            flow.response = LEDGER_DOWN.response()
        except Exception:
            self._failed(flow)
        return None

    async def _answer_later(self, flow: http.HTTPFlow, answer: Awaitable[http.Response]) -> None:
        flow.response = await answer

    async def _forward_token_key(self, flow: http.HTTPFlow, path: str, token: str) -> None:
        """``Authorization: Bearer cashuB…``: the token is the key (redeemed on first use)."""
        assert self.meter is not None
        if self.payments is None:
            raise ApiError(401, "This proxy takes no ecash; use an API key.",
                           code="invalid_api_key")
        api_key = await self.payments.key_for_token(token)
        self._forward(flow, path, self.meter.admit(flow.id, f"Bearer {api_key}",
                                                   _api_path(path), _body(flow.request)))

    async def _forward_xcashu(self, flow: http.HTTPFlow, path: str, token: str) -> None:
        """``X-Cashu: <token>``: this request alone is paid by the token; change goes back."""
        assert self.meter is not None
        if self.payments is None:
            raise ApiError(400, "This proxy takes no ecash (no mints are configured).",
                           code="ecash_not_accepted")
        quote = self.meter.quote(_api_path(path), _body(flow.request), body_bound=False)
        payment, available = await self.payments.open_xcashu(token, flow.id, quote.amount_msat,
                                                             quote.model_name)
        paid = quote.paid(flow.id, payment.key_hash, available)
        paid.xcashu = payment
        self._forward(flow, path, paid)

    def _forward(self, flow: http.HTTPFlow, path: str, paid: Paid) -> None:
        """Rewrite an admitted request for the upstream: auth, path, body, our headers off."""
        assert self.meter is not None and self.config is not None
        flow.metadata[STATE] = paid
        req = flow.request
        new_body = self.meter.upstream_body(paid)
        if new_body is not None:
            req.content = new_body
        # Off go the client's key or token; on goes the operator's upstream key.
        req.headers.fields = tuple(
            field for field in req.headers.fields
            if field[0].lower() not in _CLIENT_SECRETS) + self._upstream_auth
        upstream = self.config.upstream
        if upstream is not None:
            if req.host != upstream.host or req.port != upstream.port:
                req.scheme, req.host, req.port = upstream.scheme, upstream.host, upstream.port
            query = req.path[len(path):]
            req.path = upstream.base_path + _api_path(path) + query
        if self.config.upstream_timeout:
            paid.timer = asyncio.get_running_loop().call_later(
                self.config.upstream_timeout, _upstream_silent, flow)

    # -- the answer ------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        paid = flow.metadata.get(STATE)
        if not isinstance(paid, Paid) or flow.response is None:
            return
        if paid.timer is not None:
            paid.timer.cancel()
        resp = flow.response
        fields = resp.headers.fields
        is_sse = any(name.lower() == b"content-type" and b"text/event-stream" in value
                     for name, value in fields)
        resp.headers.fields = (*fields, (b"x-routstr-request-id", paid.request_id.encode()))
        if resp.status_code >= 400 or not is_sse:
            return  # buffered: settled in `response`
        assert self.meter is not None
        tap = self.meter.open_stream(paid)
        resp.headers["x-routstr-reserved-msats"] = str(paid.reserved_msat)
        resp.headers.pop("content-length", None)  # we may drop the usage chunk
        meter = self.meter
        touch_every = self._touch_every
        next_touch = [0.0]

        def stream(chunk: bytes) -> bytes | tuple[bytes, ...]:
            # An empty bytes object would go out as chunked encoding's end marker: hand back
            # nothing instead while an event is incomplete or dropped.
            if chunk:
                out = tap.feed(chunk)
                now = time.monotonic()
                if now >= next_touch[0]:  # a flowing stream is not swept, and a crash now
                    next_touch[0] = now + touch_every  # leaves what it delivered on record
                    try:
                        meter.touch(paid)
                    except Exception:
                        logger.exception("request %s: recording stream activity failed",
                                         paid.request_id)
                return out if out else ()
            # End of stream: settle now, while the client still reads, and tell it the cost
            # (and, paid by x-cashu, give it its change) in SSE comments clients ignore.
            rest = tap.flush()
            try:
                done = meter.settle_stream(paid)
            except Exception:
                logger.exception("request %s: settling the stream failed; retrying",
                                 paid.request_id)
                self._retry_later(paid, lambda: meter.settle_stream(paid))
                return rest or ()
            if done is None or rest:
                return rest or ()
            tail = (b": x-routstr-cost-msats %d x-routstr-balance-msats %d\n\n"
                    % (done.charged_msat, done.available_msat))
            change = self._close_xcashu(paid)
            if change:
                tail += b": x-cashu " + change.encode() + b"\n\n"
            return tail

        resp.stream = stream

    def response(self, flow: http.HTTPFlow) -> None:
        paid = flow.metadata.get(STATE)
        if self._web is not None:
            self._web.done(flow)
        if not isinstance(paid, Paid) or flow.response is None:
            return
        if paid.settled:  # a stream, settled as it ended
            flow.metadata[STATE] = _shown(flow, paid)
            return
        assert self.meter is not None
        resp = flow.response
        meter = self.meter
        if paid.tap is not None:  # a stream that ended without our end-of-stream call
            def settle() -> Settlement | None:
                return meter.settle_stream(paid)
        else:
            encoded = any(name.lower() == b"content-encoding" for name, _ in resp.headers.fields)
            status = resp.status_code
            body = (resp.get_content(strict=False) if encoded else resp.raw_content) or b""

            def settle() -> Settlement | None:
                return meter.settle_body(paid, status, body)
        try:
            done = settle()
        except Exception:
            logger.exception("request %s: settlement failed; retrying", paid.request_id)
            self._retry_later(paid, settle)
            return
        if done is not None and paid.tap is None:
            resp.headers.fields += ((b"x-routstr-cost-msats", b"%d" % done.charged_msat),
                                    (b"x-routstr-balance-msats", b"%d" % done.available_msat))
        change = self._close_xcashu(paid)
        if change and paid.tap is None:
            resp.headers["x-cashu"] = change
            if resp.status_code >= 400:
                _add_to_error(resp, "x_cashu", change)
        flow.metadata[STATE] = _shown(flow, paid)

    def error(self, flow: http.HTTPFlow) -> None:
        paid = flow.metadata.get(STATE)
        if self._web is not None:
            self._web.done(flow, sent=True)
        if not isinstance(paid, Paid) or paid.settled:
            return
        if paid.timer is not None:
            paid.timer.cancel()
        assert self.meter is not None
        reason = flow.error.msg if flow.error else "flow failed"
        meter = self.meter
        try:
            meter.abort(paid, reason)
        except Exception:
            logger.exception("request %s: closing its reservation failed; retrying",
                             paid.request_id)
            self._retry_later(paid, lambda: meter.abort(paid, reason))
            return
        self._close_xcashu(paid)  # kept for POST /v1/balance/refund with the same X-Cashu
        flow.metadata[STATE] = _shown(flow, paid)

    def _retry_later(self, paid: Paid, settle: Callable[[], object]) -> None:
        """A settlement the ledger could not take now (disk full, database away): kept and
        tried again every few seconds, so the charge is exact once the ledger is back."""
        self._unsettled.append((paid, settle))

    async def _retry_settlements(self, every: float = 2.0) -> None:
        while True:
            await asyncio.sleep(every)
            waiting, self._unsettled = self._unsettled, []
            for paid, settle in waiting:
                try:
                    settle()
                except Exception as e:
                    logger.warning("request %s: settlement still failing: %s", paid.request_id,
                                   e)
                    self._unsettled.append((paid, settle))
                    continue
                logger.info("request %s: settled after a retry", paid.request_id)
                self._close_xcashu(paid)

    def _close_xcashu(self, paid: Paid) -> str | None:
        """An x-cashu request's change token, once its reservation is closed."""
        if paid.xcashu is None or self.payments is None or not paid.settled:
            return None
        try:
            return self.payments.close_xcashu(paid.xcashu, paid.request_id).change
        except Exception:
            logger.exception("request %s: cutting the x-cashu change failed; the value stays "
                             "on its payment key", paid.request_id)
            return None


def _upstream_silent(flow: http.HTTPFlow) -> None:
    """UPSTREAM_TIMEOUT passed without an answer: close the upstream connection. mitmproxy
    then answers the client 502 (our JSON error page) and the error hook releases."""
    if flow.response is not None or not flow.live:
        return
    logger.warning("request %s: no answer from the upstream in time; giving up", flow.id)
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(flow.client_conn.id) if server is not None else None
    io = handler.transports.get(flow.server_conn) if handler is not None else None
    if io is not None and io.handler is not None:
        io.handler.cancel("upstream timeout")


def _shown(flow: http.HTTPFlow, paid: Paid) -> dict[str, Any]:
    """A settled flow's comment, and its metadata: plain facts in place of the live state."""
    closed = paid.closed
    return webview.shown(flow, paid.key_hash, paid.model.id if paid.model is not None else None,
                         paid.reserved_msat, closed.charged_msat if closed is not None else None,
                         paid.xcashu is not None)


def _add_to_error(resp: http.Response, name: str, value: str) -> None:
    """Add a field to an upstream's OpenAI-shaped error body, if it is one."""
    try:
        body = json.loads(resp.get_content(strict=False) or b"")
    except ValueError:
        return
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body["error"][name] = value
        resp.set_content(json.dumps(body).encode())


async def _checkpoints(ledger: Ledger, every: float = 1.0) -> None:
    """Copy SQLite's WAL into the database each second, in a worker thread."""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(ledger.checkpoint)
        except Exception as e:  # a busy database: try again next time
            logger.warning("ledger checkpoint failed: %s", e)


def _api_path(path: str) -> str:
    """The path below /v1 (``/v1/chat/completions`` → ``/chat/completions``)."""
    return path[3:] if path.startswith("/v1/") else path


def _body(req: http.Request, encoded: bool | None = None) -> bytes:
    """The request body as plain bytes; ``encoded``: whether it has a Content-Encoding, when
    the caller already knows (saves a header lookup on the funded-key path)."""
    if encoded if encoded is not None else "content-encoding" in req.headers:
        req.decode(strict=False)  # read (and forward) compressed bodies as plain JSON
    return req.raw_content or b""


def _models(config: Config) -> dict[str, Any]:
    path = config.models_path
    if not path.is_file():
        fallback = Path("models.example.json")
        if not fallback.is_file():
            fallback = Path(__file__).resolve().parents[1] / "models.example.json"
        if config.model_based_pricing and not fallback.is_file():
            raise SettingError(f"MODELS_PATH: {path} does not exist and there is no "
                               "models.example.json to fall back to")
        if not fallback.is_file():
            return {}
        path = fallback
    try:
        return load_models(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SettingError(f"MODELS_PATH: cannot read {path}: {e}") from None


addons = [Routstr()]
