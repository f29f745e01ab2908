"""CORS (issue 12, item 5): a browser page on another origin pays the proxy and reads what it
paid — the preflight answered without a key, the X-Cashu and cost headers exposed — driven in
headless Chromium with a real ``fetch``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, sync_playwright

from routstr_addon.dev.localmint import LocalMint
from tests.ecash_user import UserWallet

from .conftest import Proxy, raw, start_proxy

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
BODY = {"model": "test/model", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hello from a browser"}]}


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another origin</title><p>client</p>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    """A web page of another origin (another port), where the browser client runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


FETCH = """async ([url, headers, body]) => {
  try {
    const r = await fetch(url, {method: body === null ? "GET" : "POST", headers,
                                body: body === null ? undefined : JSON.stringify(body)});
    const seen = {};
    for (const name of ["x-cashu", "x-routstr-cost-msats", "x-routstr-balance-msats",
                        "x-routstr-request-id", "content-type"]) {
      seen[name] = r.headers.get(name);
    }
    return {status: r.status, headers: seen, body: await r.text()};
  } catch (e) {
    return {error: String(e)};
  }
}"""


def browser_fetch(browser: Browser, site: str, url: str, headers: dict[str, str],
                  body: Any = None) -> dict[str, Any]:
    page = browser.new_page()
    try:
        page.goto(site)
        result: dict[str, Any] = page.evaluate(FETCH, [url, headers, body])
        return result
    finally:
        page.close()


def test_a_browser_on_another_origin_pays_with_a_key_and_with_x_cashu(
        browser: Browser, site: str, upstream: Any, mint: LocalMint, user: UserWallet,
        tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url})
    try:
        key = proxy.new_key(sats=500)
        url = f"{proxy.url}/v1/chat/completions"
        paid = browser_fetch(browser, site, url, {"authorization": f"Bearer {key}",
                                                  "content-type": "application/json"}, BODY)
        assert "error" not in paid, paid
        assert paid["status"] == 200, paid
        cost = int(paid["headers"]["x-routstr-cost-msats"])
        assert cost > 0
        assert int(paid["headers"]["x-routstr-balance-msats"]) == 500_000 - cost
        assert json.loads(paid["body"])["choices"]

        token = user.token(200)
        by_token = browser_fetch(browser, site, url, {"x-cashu": token,
                                                      "content-type": "application/json"}, BODY)
        assert by_token["status"] == 200, by_token
        change = by_token["headers"]["x-cashu"]
        assert change and change.startswith("cashu")
        assert user.receive(change) > 0

        info = browser_fetch(browser, site, f"{proxy.url}/v1/balance/info",
                             {"authorization": f"Bearer {key}"})
        assert info["status"] == 200 and json.loads(info["body"])["balance"] == 500_000 - cost
        proxy.wait_settled()
        assert proxy.check() == []
    finally:
        proxy.stop()


def test_the_preflight_needs_no_key_and_other_origins_are_refused(
        browser: Browser, site: str, upstream: Any, tmp_path: Path) -> None:
    only = start_proxy(tmp_path / "only", upstream.url,
                       {"UPSTREAM_BASE_URL": f"{upstream.url}/v1",
                        "CORS_ORIGINS": "https://app.example.com"})
    try:
        preflight = raw(only, "OPTIONS", "/v1/chat/completions", headers={
            "origin": "https://app.example.com", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-cashu"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "x-cashu" in preflight.headers["access-control-allow-headers"]
        key = only.new_key(sats=100)
        # The browser's page is not an allowed origin: the request never leaves it.
        refused = browser_fetch(browser, site, f"{only.url}/v1/chat/completions",
                                {"authorization": f"Bearer {key}",
                                 "content-type": "application/json"}, BODY)
        assert "error" in refused and "Failed to fetch" in refused["error"]
        assert only.key_state(key).total_requests == 0
        answer = raw(only, "GET", "/v1/info", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in answer.headers
    finally:
        only.stop()


def test_default_cors_allows_any_origin_and_exposes_the_payment_headers(
        proxy: Proxy) -> None:
    preflight = raw(proxy, "OPTIONS", "/v1/balance/info", headers={
        "origin": "https://anywhere.example", "access-control-request-method": "GET"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    answer = raw(proxy, "GET", "/v1/models", headers={"origin": "https://anywhere.example"})
    assert answer.headers["access-control-allow-origin"] == "*"
    exposed = answer.headers["access-control-expose-headers"]
    for name in ("x-cashu", "x-routstr-cost-msats", "x-routstr-balance-msats", "retry-after"):
        assert name in exposed
    unauthorized = raw(proxy, "GET", "/v1/balance/info",
                       headers={"origin": "https://anywhere.example"})
    assert unauthorized.status_code == 401  # only the preflight goes without a key
    assert unauthorized.headers["access-control-allow-origin"] == "*"
    too_big = raw(proxy, "GET", "/v1/models", headers={"origin": "https://anywhere.example",
                                                       "x-padding": "x" * 70_000})
    assert too_big.status_code == 431  # refused by the gate, still readable by the page
    assert too_big.headers["access-control-allow-origin"] == "*"
    admin = raw(proxy, "GET", "/admin", headers={"origin": "https://anywhere.example"})
    assert "access-control-allow-origin" not in admin.headers  # the dashboard: same origin
