"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients turn these into typed exceptions (401 → AuthenticationError, 402/429 →
RateLimitError-like quota errors, …), so the shape and the status both matter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from mitmproxy import http

__all__ = [
    "ApiError",
    "PaymentRequired",
    "error_body",
    "invalid_api_key",
    "invalid_json",
    "json_response",
    "key_limit",
    "ledger_unavailable",
    "no_ecash",
]

_JSON_HEADERS = ((b"content-type", b"application/json"),)


class ApiError(Exception):
    """Raised by request handling to answer the client with an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> http.Response:
        """The answer: this error as OpenAI's JSON, with its status and headers."""
        resp = http.Response.make(self.status, error_body(self.message, self.type, self.code,
                                                          self.param), _JSON_HEADERS)
        if self.headers:
            resp.headers.update(self.headers)
        return resp


class PaymentRequired(ApiError):
    """402 for a request to pay with ecash: OpenAI's error, the NUT-18 payment request in the
    ``X-Cashu`` header, and routstr-core's ``detail`` (``amount_required_msat``, ``type``
    ``minimum_balance_required``), so both kinds of clients can act on it."""

    def __init__(self, message: str, payment_request: str, required_msat: int,
                 model: str | None = None) -> None:
        super().__init__(402, message, type="insufficient_quota", code="payment_required",
                         headers={"x-cashu": payment_request})
        self.payment_request = payment_request
        self.required_msat = required_msat
        self.model = model

    def response(self) -> http.Response:
        body = {
            "error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code, "amount_required_msat": self.required_msat,
                      "payment_request": self.payment_request},
            "detail": {"reason": self.message, "amount_required_msat": self.required_msat,
                       "model": self.model, "type": "minimum_balance_required"},
        }
        return json_response(self.status, body, self.headers)


# --- the errors answered from more than one place: one builder each -------------------------


def invalid_api_key() -> ApiError:
    """A key this proxy does not know (401: OpenAI clients raise AuthenticationError)."""
    return ApiError(401, "Invalid API key.", code="invalid_api_key")


def no_ecash() -> ApiError:
    """Ecash offered (a token as the key, an X-Cashu header, a top-up) to a proxy without mints.

    400, not 401: the request is well-formed and its credential may be good money; this proxy
    only does not take that kind of payment, and the client should pay another way."""
    return ApiError(400, "This proxy takes no ecash (no mints are configured); use an API key.",
                    code="ecash_not_accepted")


def invalid_json() -> ApiError:
    return ApiError(400, "The request body is not valid JSON.", code="invalid_json")


def ledger_unavailable() -> ApiError:
    """The ledger's database cannot take a write now (full disk, database away)."""
    return ApiError(503, "The ledger is unavailable right now (full disk or database away); "
                    "nothing was charged. Try again shortly.", type="service_unavailable",
                    code="ledger_unavailable", headers={"retry-after": "5"})


def key_limit(reason: str, message: str, retry_after: float | None) -> ApiError:
    """A request a key's own limits refuse: 403 for a model outside its allow-list, 402 for a
    budget that comes back only by hand, otherwise 429 ``rate_limit_exceeded`` with the
    seconds to wait (OpenAI clients back off on 429 and honour ``Retry-After``)."""
    if reason == "model":
        return ApiError(403, message, type="permission_error", code="model_not_allowed",
                        param="model")
    if retry_after is None:
        return ApiError(402, message, type="insufficient_quota", code="balance_limit_exceeded")
    return ApiError(429, message, type="requests", code="rate_limit_exceeded",
                    headers={"retry-after": str(max(1, math.ceil(retry_after)))})


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    ).encode()


def json_response(status: int, data: object,
                  headers: Mapping[str, str] | None = None) -> http.Response:
    resp = http.Response.make(status, json.dumps(data).encode(), _JSON_HEADERS)
    if headers:
        resp.headers.update(headers)
    return resp


# --- mitmproxy's own error answers ----------------------------------------------------------

_PROXY_ERRORS = {
    400: ("The request could not be read as HTTP.", "invalid_request_error", "bad_request"),
    413: ("The request body is larger than this proxy accepts.", "invalid_request_error",
          "request_too_large"),
    502: ("The upstream provider could not be reached or failed; nothing was charged.",
          "upstream_error", "upstream_unreachable"),
    504: ("The upstream provider did not answer in time; nothing was charged.",
          "upstream_error", "upstream_timeout"),
}


def proxy_error_body(status: int) -> bytes:
    message, type_, code = _PROXY_ERRORS.get(
        status, ("The proxy could not complete the request.", "server_error", "proxy_error"))
    return error_body(message, type_, code)


def install_error_pages() -> None:
    """Make the errors mitmproxy answers by itself (upstream unreachable, body too large…)
    OpenAI-shaped JSON instead of an HTML page, so clients get a typed error they can read.

    mitmproxy builds these in ``make_error_response`` (HTTP/1) and ``format_error`` (HTTP/2
    and 3) before any hook could set a response; replacing those functions is the one place
    to change them. The detail mitmproxy had (an address, an OS error) stays in its log.
    """
    from mitmproxy.net.http import http1
    from mitmproxy.proxy.layers.http import _http1, _http2, _http3

    def make_error_response(status_code: int, message: str = "") -> bytes:
        resp = http.Response.make(status_code, proxy_error_body(status_code),
                                  {"content-type": "application/json", "connection": "close"})
        data: bytes = http1.assemble_response(resp)
        return data

    def format_error(status_code: int, message: str) -> bytes:
        return proxy_error_body(status_code)

    _http1.make_error_response = make_error_response
    _http2.format_error = format_error  # type: ignore[attr-defined]
    _http3.format_error = format_error  # type: ignore[attr-defined]
