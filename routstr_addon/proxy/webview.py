"""What mitmweb (and saved flows) show of the proxy's traffic: who paid what, and no secrets.

Each paid flow gets a comment, and its copies (saved, exported) ``flow.metadata["routstr"]`` as
plain facts: the key id (the start of the key's hash, as ``routstr keys`` shows it), the model,
and the reserved and charged msat.

Credentials must reach the wire intact (the client's key or token, the upstream key we put in,
the change token we hand back), yet mitmweb shows a flow as it is when the hooks run. So, where
flows are kept for display (mitmweb, and mitmproxy's console for the stored part):

- its flow serializer is wrapped to redact secret headers (``Authorization``, ``X-Cashu``,
  cookies) and keys or tokens in request paths and query strings in everything it sends the
  browser, live updates included;
- once a flow is done (sent), its stored copy is scrubbed too (headers, and the tokens and keys
  in the JSON bodies of ``/v1/balance`` answers and error answers), so downloads, exports and
  replays do not carry them either. Streams keep no body: their ``: x-cashu`` comment is never
  stored.

Under ``routstr serve`` and mitmdump the redaction does not run at all.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from typing import Any

from mitmproxy import http

__all__ = ["SECRET_FIELDS", "SECRET_HEADERS", "FlowView", "Scrubber", "install", "redact_header",
           "redact_url", "show"]

REDACTED = "[redacted]"
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-cashu", "cookie",
                            "set-cookie"})
SECRET_FIELDS = frozenset({"api_key", "token", "cashu_token", "initial_balance_token", "x_cashu",
                           "password"})
_BODY_PATHS = ("/v1/balance", "/v1/wallet", "/admin")
_MAX_BODY = 1 << 20


def show(flow: http.HTTPFlow, facts: dict[str, Any]) -> None:
    """Set a paid flow's comment from its facts (``Paid.facts``)."""
    charged = facts["charged_msat"]
    flow.comment = (f"{facts['paid_by']} {facts['key_id']} · {facts['model'] or '-'} · "
                    f"reserved {facts['reserved_msat']} msat · "
                    f"charged {'unsettled' if charged is None else f'{charged} msat'}")


def redact_header(name: str, value: str) -> str:
    if name.lower() not in SECRET_HEADERS:
        return value
    scheme, sep, _ = value.partition(" ")
    return f"{scheme} {REDACTED}" if sep and scheme.lower() in ("bearer", "basic") else REDACTED


# An API key or a Cashu token in a URL (path or query string), plain or percent-encoded.
_SECRET_IN_URL = re.compile(r"(sk-|cashu[AB]|cashu(?::|%3[aA]))[^&/?#;\s]*")


def redact_url(path: str) -> str:
    """A request path (with its query) with any key or token in it replaced."""
    if "sk-" not in path and "cashu" not in path:
        return path
    return _SECRET_IN_URL.sub(r"\1" + REDACTED, path)


def _redact_json(value: Any) -> bool:
    changed = False
    if isinstance(value, dict):
        for k, v in value.items():
            if k in SECRET_FIELDS and isinstance(v, str) and v != REDACTED:
                value[k] = REDACTED
                changed = True
            else:
                changed = _redact_json(v) or changed
    elif isinstance(value, list):
        for item in value:
            changed = _redact_json(item) or changed
    return changed


def _scrub_message(message: http.Message, body: bool) -> bool:
    changed = False
    for name in SECRET_HEADERS:
        values = message.headers.get_all(name)
        if values and any(v != redact_header(name, v) for v in values):
            message.headers.set_all(name, [redact_header(name, v) for v in values])
            changed = True
    raw = message.raw_content
    if not body or not raw or len(raw) > _MAX_BODY:
        return changed
    if isinstance(message, http.Request) and message.urlencoded_form:
        form = message.urlencoded_form
        secret = [k for k in form if k in SECRET_FIELDS]
        for k in secret:
            form[k] = REDACTED
        return changed or bool(secret)
    try:
        data = json.loads(message.get_content(strict=False) or b"")
    except (ValueError, UnicodeDecodeError):
        return changed
    if _redact_json(data):
        message.set_content(json.dumps(data).encode())
        return True
    return changed


def scrub(flow: http.HTTPFlow) -> bool:
    """Redact the secrets of a flow that is done; True if anything changed."""
    path = flow.request.path
    error_answer = flow.response is not None and flow.response.status_code >= 400
    body = path.startswith(_BODY_PATHS)
    changed = _scrub_message(flow.request, body)
    if redact_url(path) != path:
        flow.request.path = redact_url(path)
        changed = True
    if flow.response is not None:
        changed = _scrub_message(flow.response, body or error_answer) or changed
    return changed


class Scrubber:
    """Scrubs each flow's stored copy once it has been sent, and tells mitmweb."""

    def __init__(self, view: Any) -> None:
        self.view = view  # mitmproxy's View addon

    def done(self, flow: http.HTTPFlow, sent: bool = False) -> None:
        """Called from the response (and error) hook, before mitmproxy sends the answer."""
        asyncio.get_running_loop().call_soon(self._scrub, flow, sent, 0.02)

    def _scrub(self, flow: http.HTTPFlow, sent: bool, wait: float) -> None:
        if flow.live and not sent:  # not on the wire yet (or held by an intercept): later
            asyncio.get_running_loop().call_later(wait, self._scrub, flow, sent,
                                                  min(wait * 2, 1.0))
            return
        if scrub(flow):
            self.view.update([flow])


def install(master: Any) -> Scrubber | None:
    """Where flows are kept for display (a ``view`` addon): the flow scrubber, and under mitmweb
    its flow serializer wrapped to redact secret headers. None elsewhere (``routstr serve``,
    mitmdump)."""
    view = master.addons.get("view") if master is not None else None
    if view is None:
        return None
    app: Any = sys.modules.get("mitmproxy.tools.web.app")
    if app is None:
        return Scrubber(view)
    original = app.flow_to_json
    if not getattr(original, "routstr_redacts", False):
        def flow_to_json(flow: Any) -> dict[str, Any]:
            data: dict[str, Any] = original(flow)
            for part in ("request", "response"):
                message = data.get(part)
                if message:
                    message["headers"] = tuple((k, redact_header(k, v))
                                               for k, v in message["headers"])
                    if isinstance(message.get("path"), str):
                        message["path"] = redact_url(message["path"])
            return data

        flow_to_json.routstr_redacts = True  # type: ignore[attr-defined]
        app.flow_to_json = flow_to_json
    return Scrubber(view)


class FlowView:
    """The addon part that keeps secrets off mitmweb's page (nothing to do under mitmdump)."""

    def __init__(self) -> None:
        self.scrubber: Scrubber | None = None

    def running(self) -> None:
        from mitmproxy import ctx

        self.scrubber = install(ctx.master)

    def response(self, flow: http.HTTPFlow) -> None:
        if self.scrubber is not None:
            self.scrubber.done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if self.scrubber is not None:
            self.scrubber.done(flow, sent=True)
