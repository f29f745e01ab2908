"""The paid forward: admit a request (the meter authenticates, prices and reserves), build the
upstream request from what was priced, and close its reservation from the answer.

The hooks only translate between mitmproxy's flow and the meter: the money state is one
``Paid`` in ``flow.metadata`` for the flow's whole life, a streamed answer is owned by its
``MeteredStream``, and every reservation ends through the meter's one settle-or-retry path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from mitmproxy import ctx, http

from routstr_addon.errors import ApiError, no_ecash
from routstr_addon.ledger import DATABASE_ERRORS
from routstr_addon.metering.meter import Meter, Paid, bearer_token
from routstr_addon.metering.stream import MeteredStream
from routstr_addon.payments.cashu import Payments
from routstr_addon.proxy import webview
from routstr_addon.proxy.failclosed import answer_error, decide_later
from routstr_addon.runtime import Runtime

__all__ = ["STATE", "PaidForward"]

logger = logging.getLogger("routstr")

STATE = "routstr"  # key of a forwarded flow's ``Paid`` in flow.metadata
_CLIENT_SECRETS = frozenset((b"authorization", b"x-cashu"))


class PaidForward:
    def __init__(self, runtime: Runtime) -> None:
        config = runtime.config
        self.meter: Meter = runtime.meter
        self.payments: Payments | None = runtime.payments  # None: no mints, no ecash
        self.upstream = config.upstream
        self.upstream_timeout = config.upstream_timeout
        self.seen = runtime.seen
        # Off go the client's key or token; on goes the operator's upstream key.
        self.upstream_auth: tuple[tuple[bytes, bytes], ...] = (
            ((b"authorization", f"Bearer {config.upstream_api_key}".encode()),)
            if config.upstream_api_key else ())

    # -- the request -----------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Admit and rewrite a request for the upstream, or answer it.

        Sync for what needs no mint (funded keys: no await cost per request); a coroutine,
        which mitmproxy awaits, for what does (tokens as keys, x-cashu).
        """
        if flow.response is not None or flow.error is not None:  # answered, or killed
            return None
        req = flow.request
        try:
            try:
                path = req.path.split("?", 1)[0]
                # One pass over the raw header fields: mitmproxy's header lookups cost more than
                # the rest of this hook on the funded-key path.
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
                    return decide_later(flow, self._admit_xcashu(flow, path, x_cashu),
                                        self._undo)
                if authorization and (authorization[7:13] in ("cashuA", "cashuB")
                                      or "cashu:" in authorization[:14]):
                    return decide_later(flow, self._admit_token_key(
                        flow, path, bearer_token(authorization)), self._undo)
                self._forward(flow, path, self.meter.admit(
                    flow.id, authorization, _api_path(path), _body(req, encoded)))
            except Exception as e:
                answer_error(flow, e, self._undo)
            return None
        except BaseException:
            if flow.response is None:  # not even an error answer: never forward it
                flow.kill()
            raise

    async def _admit_token_key(self, flow: http.HTTPFlow, path: str, token: str) -> None:
        """``Authorization: Bearer cashuB…``: the token is the key (redeemed on first use)."""
        if self.payments is None:
            raise no_ecash()
        api_key = await self.payments.key_for_token(token)
        self._forward(flow, path, self.meter.admit(flow.id, f"Bearer {api_key}",
                                                   _api_path(path), _body(flow.request)))

    async def _admit_xcashu(self, flow: http.HTTPFlow, path: str, token: str) -> None:
        """``X-Cashu: <token>``: this request alone is paid by the token; change goes back."""
        if self.payments is None:
            raise no_ecash()
        quote = self.meter.quote(_api_path(path), _body(flow.request), body_bound=False)
        payer = await self.payments.open_xcashu(token, flow.id, quote.amount_msat)
        try:
            paid = self.meter.reserve(quote, flow.id, payer.key_hash, payer)
        except DATABASE_ERRORS as e:
            logger.error("request %s: the ledger is unavailable: %s", flow.id, e)
            raise ApiError(503, "The ledger is unavailable right now; your token was redeemed "
                           "and its value is kept: POST /v1/balance/refund with the same "
                           "X-Cashu header returns it.", type="service_unavailable",
                           code="ledger_unavailable", headers={"retry-after": "5"}) from None
        self._forward(flow, path, paid)

    def _forward(self, flow: http.HTTPFlow, path: str, paid: Paid) -> None:
        """Rewrite an admitted request for the upstream: auth, path, body, our headers off."""
        flow.metadata[STATE] = paid
        req = flow.request
        if paid.upstream_body is not None:
            req.content = paid.upstream_body
        req.headers.fields = tuple(
            field for field in req.headers.fields
            if field[0].lower() not in _CLIENT_SECRETS) + self.upstream_auth
        upstream = self.upstream
        if upstream is not None:
            if req.host != upstream.host or req.port != upstream.port:
                req.scheme, req.host, req.port = upstream.scheme, upstream.host, upstream.port
            query = req.path[len(path):]
            req.path = upstream.base_path + _api_path(path) + query
        if self.upstream_timeout:
            paid.timer = asyncio.get_running_loop().call_later(
                self.upstream_timeout, _upstream_silent, flow)

    def _undo(self, flow: http.HTTPFlow) -> None:
        """Our own failure after admitting: nothing goes upstream, the reservation is closed."""
        paid = flow.metadata.pop(STATE, None)
        if type(paid) is Paid:
            self.meter.fail(paid, "proxy error")

    # -- the answer ------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        paid = flow.metadata.get(STATE)
        resp = flow.response
        if type(paid) is not Paid or resp is None:
            return
        if paid.timer is not None:
            paid.timer.cancel()
        if resp.status_code < 500:
            self.seen.upstream_at = resp.timestamp_start
        fields = resp.headers.fields
        is_sse = any(name.lower() == b"content-type" and b"text/event-stream" in value
                     for name, value in fields)
        resp.headers.fields = (*fields, (b"x-routstr-request-id", paid.request_id.encode()))
        if resp.status_code >= 400 or not is_sse:
            return  # buffered: settled in `response`
        resp.headers["x-routstr-reserved-msats"] = str(paid.reserved_msat)
        resp.headers.pop("content-length", None)  # we may drop the usage chunk
        resp.stream = stream_adapter(MeteredStream(self.meter, paid))

    def response(self, flow: http.HTTPFlow) -> None:
        paid = flow.metadata.get(STATE)
        resp = flow.response
        if type(paid) is not Paid or resp is None:
            return
        if not paid.settled:  # a buffered answer (or a stream that ended without our call)
            done = self.meter.finish(paid, resp.status_code, _content(resp))
            if paid.tap is None:
                if done is not None:
                    resp.headers.fields += (
                        (b"x-routstr-cost-msats", b"%d" % done.charged_msat),
                        (b"x-routstr-balance-msats", b"%d" % done.available_msat))
                if paid.change:
                    resp.headers["x-cashu"] = paid.change
                    if resp.status_code >= 400:
                        _add_to_error(resp, "x_cashu", paid.change)
        webview.show(flow, paid.facts())

    def error(self, flow: http.HTTPFlow) -> None:
        paid = flow.metadata.get(STATE)
        if type(paid) is not Paid or paid.settled:
            return
        if paid.timer is not None:
            paid.timer.cancel()
        self.meter.fail(paid, flow.error.msg if flow.error else "flow failed")
        webview.show(flow, paid.facts())


def stream_adapter(stream: MeteredStream) -> Callable[[bytes], bytes | tuple[bytes, ...]]:
    """mitmproxy's stream callable for a metered stream: chunks in, bytes out, ``b""`` at the
    end. An empty bytes object would go out as chunked encoding's end marker, so nothing to
    send is handed back as ``()``."""
    feed, finish = stream.feed, stream.finish

    def chunks(chunk: bytes) -> bytes | tuple[bytes, ...]:
        if chunk:
            return feed(chunk) or ()
        return finish() or ()

    return chunks


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


def _content(resp: http.Response) -> bytes:
    """A buffered answer's body as plain bytes (b"" for a stream, whose body went by)."""
    encoded = any(name.lower() == b"content-encoding" for name, _ in resp.headers.fields)
    return (resp.get_content(strict=False) if encoded else resp.raw_content) or b""


def _add_to_error(resp: http.Response, name: str, value: str) -> None:
    """Add a field to an upstream's OpenAI-shaped error body, if it is one."""
    try:
        body = json.loads(resp.get_content(strict=False) or b"")
    except ValueError:
        return
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body["error"][name] = value
        resp.set_content(json.dumps(body).encode())


def _api_path(path: str) -> str:
    """The path below /v1 (``/v1/chat/completions`` → ``/chat/completions``)."""
    return path[3:] if path.startswith("/v1/") else path


def _body(req: http.Request, encoded: bool | None = None) -> bytes:
    """The request body as plain bytes; ``encoded``: whether it has a Content-Encoding, when
    the caller already knows (saves a header lookup on the funded-key path)."""
    if encoded if encoded is not None else "content-encoding" in req.headers:
        req.decode(strict=False)  # read (and forward) compressed bodies as plain JSON
    return req.raw_content or b""
