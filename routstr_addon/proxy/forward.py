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
from routstr_addon.metering.costs import add_cost_to_answer
from routstr_addon.metering.meter import Meter, Paid, bearer_token
from routstr_addon.metering.stream import MeteredStream
from routstr_addon.metering.surface import ResponseDecoder
from routstr_addon.payments.cashu import Payments
from routstr_addon.proxy import webview
from routstr_addon.proxy.failclosed import answer_error, decide_later
from routstr_addon.proxy.route import Route
from routstr_addon.runtime import Runtime

__all__ = ["STATE", "PaidForward"]

logger = logging.getLogger("routstr")

STATE = "routstr"  # key of a forwarded flow's ``Paid`` in flow.metadata
# Client headers never forwarded: its key or token, and what would let the upstream read the
# request differently than priced (another method or path, an encoding we did not choose).
_NOT_FORWARDED = frozenset((b"authorization", b"x-cashu", b"accept-encoding",
                            b"x-http-method-override", b"x-http-method", b"x-method-override",
                            b"x-original-url", b"x-original-uri", b"x-rewrite-url"))
# And for a body the proxy re-serialised: its framing and type are the proxy's too.
_NOT_FORWARDED_JSON = _NOT_FORWARDED | frozenset((b"content-length", b"content-encoding",
                                                  b"transfer-encoding", b"content-type"))
_IDENTITY = ((b"accept-encoding", b"identity"),)  # answers the tap can read as they come
_JSON = (b"content-type", b"application/json")


class PaidForward:
    def __init__(self, runtime: Runtime) -> None:
        config = runtime.config
        self.meter: Meter = runtime.meter
        self.payments: Payments | None = runtime.payments  # None: no mints, no ecash
        self.upstream_timeout = config.upstream_timeout
        self.route: Route = runtime.route  # which provider(s), its key, the model's name there
        self.seen = runtime.seen

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
                # One pass over the raw header fields: mitmproxy's header lookups cost more than
                # the rest of this hook on the funded-key path.
                authorization = x_cashu = None
                coding = ""
                upgrade = False
                for name, value in req.headers.fields:
                    low = name.lower()
                    if low == b"authorization":
                        authorization = value.decode("latin-1")
                    elif low == b"x-cashu":
                        x_cashu = value.decode("latin-1")
                    elif low == b"content-encoding":
                        coding = value.decode("latin-1")
                    elif low == b"upgrade":
                        upgrade = True
                endpoint = self.meter.endpoint(req.path.partition("?")[0])
                if upgrade and endpoint not in self.meter.fixed_prices:
                    raise ApiError(400, "Protocol upgrades (WebSocket) are not forwarded here: "
                                   "their traffic cannot be metered.", code="upgrade_refused")
                if x_cashu is not None:
                    return decide_later(flow, self._admit_xcashu(flow, endpoint, x_cashu,
                                                                 coding), self._undo)
                if authorization and (authorization[7:13] in ("cashuA", "cashuB")
                                      or "cashu:" in authorization[:14]):
                    return decide_later(flow, self._admit_token_key(
                        flow, endpoint, bearer_token(authorization), coding), self._undo)
                self._forward(flow, self.meter.admit(
                    flow.id, authorization, endpoint, req.raw_content or b"", coding))
            except Exception as e:
                answer_error(flow, e, self._undo)
            return None
        except BaseException:
            if flow.response is None:  # not even an error answer: never forward it
                flow.kill()
            raise

    async def _admit_token_key(self, flow: http.HTTPFlow, endpoint: str, token: str,
                               coding: str) -> None:
        """``Authorization: Bearer cashuB…``: the token is the key (redeemed on first use)."""
        if self.payments is None:
            raise no_ecash()
        headers = flow.request.headers
        api_key = await self.payments.key_for_token(token, headers.get("key-expiry-time"),
                                                    headers.get("refund-lnurl"))
        self._forward(flow, self.meter.admit(flow.id, f"Bearer {api_key}", endpoint,
                                             flow.request.raw_content or b"", coding))

    async def _admit_xcashu(self, flow: http.HTTPFlow, endpoint: str, token: str,
                            coding: str) -> None:
        """``X-Cashu: <token>``: this request alone is paid by the token; change goes back."""
        if self.payments is None:
            raise no_ecash()
        quote = self.meter.quote(endpoint, flow.request.raw_content or b"", body_bound=False,
                                 content_encoding=coding)
        payer = await self.payments.open_xcashu(token, flow.id, quote.amount_msat,
                                                quote.model_name)
        if payer.available_msat is not None:  # reserved with its payment (a locked token)
            self._forward(flow, self.meter.reserved(quote, flow.id, payer.key_hash,
                                                    payer.available_msat, payer))
            return
        try:
            paid = self.meter.reserve(quote, flow.id, payer.key_hash, payer)
        except DATABASE_ERRORS as e:
            logger.error("request %s: the ledger is unavailable: %s", flow.id, e)
            raise ApiError(503, "The ledger is unavailable right now; your token was redeemed "
                           "and its value is kept: POST /v1/balance/refund with the same "
                           "X-Cashu header returns it.", type="service_unavailable",
                           code="ledger_unavailable", headers={"retry-after": "5"}) from None
        self._forward(flow, paid)

    def _forward(self, flow: http.HTTPFlow, paid: Paid) -> None:
        """Build the upstream request from what was priced: the endpoint's path (no client
        query), the re-serialised body, the operator's key, identity encoding."""
        flow.metadata[STATE] = paid
        req = flow.request
        body = self.route.body(paid)  # the model named as its (first) provider names it
        if body is not None:
            req.headers.fields = (*(field for field in req.headers.fields
                                    if field[0].lower() not in _NOT_FORWARDED_JSON),
                                  *_IDENTITY, _JSON, (b"content-length", b"%d" % len(body)))
            req.raw_content = body
        else:  # a fixed-price endpoint: its body as the client sent it
            req.headers.fields = (*(field for field in req.headers.fields
                                    if field[0].lower() not in _NOT_FORWARDED),
                                  *_IDENTITY)
        self.route.aim(flow, paid)  # its provider: address, path, key (or the failover hop)
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
        self.route.answered(flow, paid)
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
        if paid.payer is not None:
            _early_change(resp, paid)
        decoder = _decoder(resp)
        resp.stream = stream_adapter(MeteredStream(self.meter, paid), decoder)

    def response(self, flow: http.HTTPFlow) -> None:
        paid = flow.metadata.get(STATE)
        resp = flow.response
        if type(paid) is not Paid or resp is None:
            return
        if not paid.settled:  # a buffered answer (or a stream that ended without our call)
            if paid.tap is None and resp.raw_content and "content-encoding" in resp.headers:
                resp.decode(strict=False)  # compressed anyway: the client gets it plain too
            done = self.meter.finish(paid, resp.status_code, _content(resp))
            if paid.tap is None:
                if done is not None:
                    _add_cost(resp, paid, done.charged_msat, done.available_msat)
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
        self.route.failed(flow, paid)
        reason = flow.error.msg if flow.error else "flow failed"
        # The client hung up on a request the upstream has (it is working, and billing):
        # not free. The upstream failing, or never reached, is.
        reached = "client" in reason.lower() and flow.server_conn.timestamp_tcp_setup is not None
        self.meter.fail(paid, reason, reached)
        webview.show(flow, paid.facts())


def stream_adapter(stream: MeteredStream, decoder: ResponseDecoder | None = None
                   ) -> Callable[[bytes], bytes | tuple[bytes, ...]]:
    """mitmproxy's stream callable for a metered stream: chunks in, bytes out, ``b""`` at the
    end. An empty bytes object would go out as chunked encoding's end marker, so nothing to
    send is handed back as ``()``. ``decoder``: the answer came compressed (the client gets
    it plain)."""
    feed, finish = stream.feed, stream.finish

    if decoder is not None:
        decode = decoder.feed

        def decoded(chunk: bytes) -> bytes | tuple[bytes, ...]:
            if chunk:
                return feed(decode(chunk)) or ()
            return finish() or ()

        return decoded

    def chunks(chunk: bytes) -> bytes | tuple[bytes, ...]:
        if chunk:
            return feed(chunk) or ()
        return finish() or ()

    return chunks


def _decoder(resp: http.Response) -> ResponseDecoder | None:
    """A decoder for a stream the upstream compressed although asked not to (its header
    comes off: the client gets the stream plain)."""
    coding = resp.headers.get("content-encoding", "")
    if not coding or coding.strip().lower() == "identity":
        return None
    try:
        decoder = ResponseDecoder(coding)
    except ValueError:
        logger.warning("a stream in an unknown Content-Encoding %r: passed on as it is", coding)
        return None
    del resp.headers["content-encoding"]
    return decoder


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


def _early_change(resp: http.Response, paid: Paid) -> None:
    """An x-cashu stream: the change known already (the token less the reserved maximum) in
    the ``X-Cashu`` header at once, for clients that read only headers; the rest follows in
    the stream's closing comment."""
    assert paid.payer is not None
    try:
        early = paid.payer.early_change(paid.reserved_msat)
    except Exception:
        logger.exception("request %s: cutting the early change failed; it comes with the rest",
                         paid.request_id)
        return
    if early:
        resp.headers["x-cashu"] = early


def _add_cost(resp: http.Response, paid: Paid, charged_msat: int, available_msat: int) -> None:
    """A buffered answer's cost where Routstr clients read it: the cost headers and, in a
    JSON answer with usage, ``usage.cost`` and ``cost_sats``."""
    report = paid.report
    if report is None:  # released: nothing charged
        resp.headers.fields += ((b"x-routstr-cost-msats", b"%d" % charged_msat),
                                (b"x-routstr-balance-msats", b"%d" % available_msat))
        return
    resp.headers.fields += (*report.headers(),
                            (b"x-routstr-balance-msats", b"%d" % available_msat))
    if resp.status_code < 400 and paid.answer is not None:
        body = add_cost_to_answer(paid.answer, report)
        if body is not None:
            resp.set_content(body)
    paid.answer = None


def _add_to_error(resp: http.Response, name: str, value: str) -> None:
    """Add a field to an upstream's OpenAI-shaped error body, if it is one."""
    try:
        body = json.loads(resp.get_content(strict=False) or b"")
    except ValueError:
        return
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body["error"][name] = value
        resp.set_content(json.dumps(body).encode())
