"""The first look at a request, from its head alone (before its body is read): what no
endpoint, local or forwarded, takes.

* a request head larger than ``MAX_HEADER_BYTES`` (64 KiB): 431;
* an API key or a Cashu token in the query string: 400 saying to send it in a header or the
  body (URLs end up in logs, browser histories and mitmweb; the secret is not used).
"""

from __future__ import annotations

from mitmproxy import http

from routstr_addon.errors import ApiError
from routstr_addon.metering.surface import MAX_HEADER_BYTES, secret_in_query

__all__ = ["Gate"]


class Gate:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        req = flow.request
        error = check_head(req.path, req.headers.fields)
        if error is not None:
            flow.response = error.response()


def check_head(path: str, fields: tuple[tuple[bytes, bytes], ...]) -> ApiError | None:
    """The refusal a request's head earns on its own, if any."""
    size = len(path) + sum(len(name) + len(value) + 4 for name, value in fields)
    if size > MAX_HEADER_BYTES:
        return ApiError(431, f"The request's headers are too large ({size:,} bytes; at most "
                        f"{MAX_HEADER_BYTES:,}).", code="request_header_fields_too_large")
    _, sep, query = path.partition("?")
    if sep and secret_in_query(query):
        return ApiError(400, "An API key or a Cashu token was sent in the URL's query string, "
                        "where logs keep it; it was not used. Send the key in the "
                        "'Authorization: Bearer' header, a token in the 'X-Cashu' header or "
                        "the JSON body.", code="secret_in_url")
    return None
