"""Fail closed: every error met while deciding a request becomes the client's answer, and a
request whose decision failed is never forwarded (mitmproxy forwards a request whose hook
raised, so the flow is killed instead when not even an answer could be made)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from mitmproxy import http

from routstr_addon.errors import ApiError, ledger_unavailable
from routstr_addon.ledger import DATABASE_ERRORS

__all__ = ["answer_error", "decide_later"]

logger = logging.getLogger("routstr")

OnFailure = Callable[[http.HTTPFlow], None]


def answer_error(flow: http.HTTPFlow, e: Exception, on_failure: OnFailure | None = None) -> None:
    """Answer ``flow`` for an error met while deciding it: a refusal (ApiError) as it is, the
    ledger away as a 503, and a failure of our own as a 500 (logged; ``on_failure`` first
    undoes what the request holds)."""
    if isinstance(e, ApiError):
        flow.response = e.response()
    elif isinstance(e, DATABASE_ERRORS):
        logger.error("request %s: the ledger is unavailable: %s", flow.id, e)
        flow.response = ledger_unavailable().response()
    else:
        logger.error("request %s failed inside the proxy", flow.id, exc_info=e)
        if on_failure is not None:
            on_failure(flow)
        flow.response = ApiError(500, "The proxy failed to handle this request.",
                                 "server_error", "proxy_error").response()


async def decide_later(flow: http.HTTPFlow, pending: Awaitable[object],
                       on_failure: OnFailure | None = None) -> None:
    """Await a decision that needs the network (a mint, a relay): as ``answer_error`` for what
    it raises; a flow left undecided (cancelled) is killed."""
    decided = False
    try:
        await pending
        decided = True
    except Exception as e:
        answer_error(flow, e, on_failure)
        decided = True
    finally:
        if not decided and flow.response is None:
            flow.kill()
