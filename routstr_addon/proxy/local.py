"""The endpoints the proxy answers itself (``/v1/info``, ``/v1/models``, ``/v1/balance/*``,
``/admin``…): found by path, answered here, never forwarded."""

from __future__ import annotations

from collections.abc import Awaitable

from mitmproxy import http

from routstr_addon.errors import ApiError
from routstr_addon.proxy.failclosed import answer_error, decide_later
from routstr_addon.web import Peer, Services
from routstr_addon.web.routes import lookup

__all__ = ["LocalEndpoints"]


class LocalEndpoints:
    def __init__(self, services: Services) -> None:
        self.services = services

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Answer a local path: at once, or (a coroutine mitmproxy awaits) once a mint or a
        relay has answered. Any other path is left to the paid forward."""
        if flow.response is not None:
            return None
        req = flow.request
        path = req.path.split("?", 1)[0]
        handlers = lookup(path)
        if handlers is None:
            return None
        try:
            try:
                handler = handlers.get(req.method)
                if handler is None:
                    raise ApiError(405, f"{req.method} is not allowed on {path}.",
                                   code="method_not_allowed")
                peer = Peer.of(flow.client_conn, req.headers,
                               self.services.config.forwarded_allow_ips)
                answer = handler(self.services, req, peer)
                if isinstance(answer, http.Response):
                    flow.response = answer
                    return None
                return decide_later(flow, _answer(flow, answer))
            except Exception as e:
                answer_error(flow, e)
                return None
        except BaseException:
            if flow.response is None:  # not even an error answer: never forward it
                flow.kill()
            raise


async def _answer(flow: http.HTTPFlow, answer: Awaitable[http.Response]) -> None:
    flow.response = await answer
