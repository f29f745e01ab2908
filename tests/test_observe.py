"""Operating the proxy: liveness and readiness, the request log, metrics — on a real mitmdump."""

from __future__ import annotations

import time
from typing import Any

import httpx

from routstr_addon.dev.localmint import free_port

from .conftest import Proxy, raw


def ready(proxy: Proxy) -> httpx.Response:
    return raw(proxy, "GET", "/ready")


def wait_ready(proxy: Proxy, status: int, timeout: float = 15.0) -> dict[str, Any]:
    """Ask /ready until it answers ``status``; its body."""
    deadline = time.monotonic() + timeout
    while True:
        resp = ready(proxy)
        if resp.status_code == status or time.monotonic() > deadline:
            assert resp.status_code == status, resp.text
            body: dict[str, Any] = resp.json()
            return body
        time.sleep(0.3)


def test_health_serves_and_ready_names_each_check_with_its_age(proxy: Proxy) -> None:
    assert raw(proxy, "GET", "/health").json() == {"status": "ok"}
    body = wait_ready(proxy, 200)
    assert body["status"] == "ready"
    checks = body["checks"]
    assert set(checks) == {"ledger", "rate", "upstream"}  # no mint configured: no mint check
    assert all(c["ok"] for c in checks.values())
    assert 0 <= checks["ledger"]["age_s"] < 2
    assert checks["rate"]["detail"] == "fixed BTC_USD_PRICE"
    assert 0 <= checks["upstream"]["age_s"] <= checks["upstream"]["limit_s"]


def test_ready_is_503_while_the_upstream_is_away(make_proxy: Any) -> None:
    port = free_port()  # nothing listens there
    proxy = make_proxy({"UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"},
                       mode_target=f"http://127.0.0.1:{port}")
    body = wait_ready(proxy, 503)
    assert body["status"] == "not_ready"
    assert body["checks"]["upstream"]["ok"] is False
    assert body["checks"]["upstream"]["age_s"] is None
    assert "Connect" in body["checks"]["upstream"]["detail"]
    assert body["checks"]["ledger"]["ok"] is True
    assert raw(proxy, "GET", "/health").status_code == 200  # alive all the same
