"""CORS, so that browser clients on other origins can pay and read what they paid.

A preflight (``OPTIONS`` with an ``Origin``) is answered here, before any key is asked for;
every answer to a request with an ``Origin`` the operator allows (``CORS_ORIGINS``, ``*`` by
default, as routstr-core) says so and exposes the headers Routstr clients read: ``X-Cashu``
(change, payment requests), the ``x-routstr-*`` cost and balance headers, ``Retry-After``.
No credentials (cookies) are ever allowed across origins: keys travel in headers. The
``/admin`` dashboard is same-origin only: it gets no CORS headers at all.
"""

from __future__ import annotations

from mitmproxy import http

__all__ = ["Cors"]

ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
# Always exposed (a stream's cost comes later, in its body); any other x-routstr-* header of
# the answer is added to them.
EXPOSED = ("x-cashu", "retry-after", "x-routstr-request-id", "x-routstr-cost-msats",
           "x-routstr-balance-msats", "x-routstr-reserved-msats")
MAX_AGE = "600"


_KEY = "routstr.cors"  # flow.metadata: the Allow-Origin value this request earned
_EXPOSED = ", ".join(EXPOSED).encode()
_ALLOW_ORIGIN = b"access-control-allow-origin"
_EXPOSE = b"access-control-expose-headers"


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def allowed_origin(self, origin: str | None, path: str = "/") -> str | None:
        """The value of ``Access-Control-Allow-Origin`` for a request from ``origin``."""
        if not origin or path.startswith("/admin"):
            return None
        if self.any:
            return "*"
        return origin if origin.rstrip("/").lower() in self.origins else None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Note whether the request's origin is allowed (one pass over the raw header fields:
        most requests have none, and that must cost next to nothing), and answer a preflight
        at once, before any other addon's request hook asks for a key: it carries none and
        must never be forwarded."""
        req = flow.request
        origin = None
        for name, value in req.headers.fields:
            if len(name) == 6 and name.lower() == b"origin":
                origin = value.decode("latin-1")
                break
        if origin is None:
            return
        allowed = self.allowed_origin(origin, req.path)
        if allowed is not None:
            flow.metadata[_KEY] = allowed
        if req.method != "OPTIONS" or flow.response is not None:
            return
        response = http.Response.make(204)
        if allowed is not None:
            response.headers["access-control-allow-origin"] = allowed
            response.headers["access-control-allow-methods"] = ALLOWED_METHODS
            response.headers["access-control-allow-headers"] = req.headers.get(
                "access-control-request-headers", "authorization, content-type, x-cashu")
            response.headers["access-control-max-age"] = MAX_AGE
            if allowed != "*":
                response.headers["vary"] = "Origin"
        flow.response = response

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Before the answer's headers go out (streams included)."""
        self._mark(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        """Again at the end, for an answer another addon replaced after its headers hook."""
        self._mark(flow)

    def _mark(self, flow: http.HTTPFlow) -> None:
        allowed = flow.metadata.get(_KEY)
        response = flow.response
        if allowed is None or response is None:
            return
        fields = response.headers.fields
        if any(name.lower() == _ALLOW_ORIGIN for name, _ in fields):
            return  # marked already (or a preflight's own answer)
        extra = sorted({name.lower() for name, _ in fields
                        if name.lower().startswith(b"x-routstr-")} - _EXPOSED_SET)
        added = [(_ALLOW_ORIGIN, allowed.encode()),
                 (_EXPOSE, b", ".join((_EXPOSED, *extra)) if extra else _EXPOSED)]
        if allowed != "*":
            added.append((b"vary", b"Origin"))
        response.headers.fields = (*fields, *added)


_EXPOSED_SET = frozenset(name.encode() for name in EXPOSED)
