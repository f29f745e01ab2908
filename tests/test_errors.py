"""Every row of the error table: the status, the OpenAI shape, and that nothing is lost."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .conftest import Proxy, raw
from .upstream import TestUpstream

MODEL = "test/model"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
BODY = {"model": MODEL, "messages": MESSAGES}


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None,
                        type_: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if type_ is not None:
        assert error["type"] == type_
    return error


def post(proxy: Proxy, key: str | None = None, json: Any = None, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    return raw(proxy, "POST", "/v1/chat/completions", json=json, content=content, headers=h)


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer sk-unknown-key"},
    {"authorization": "Basic dXNlcjpwYXNz"},
    {"authorization": "Bearer"},
    {"authorization": "Bearer two words"},
])
def test_no_unknown_or_malformed_key_is_401_and_never_forwarded(
        proxy: Proxy, upstream: TestUpstream, headers: dict[str, str]) -> None:
    upstream.clear()
    resp = post(proxy, json=BODY, headers=headers)
    assert_openai_error(resp, 401, "invalid_api_key")
    assert upstream.seen() == []


def test_openai_client_raises_authentication_error_for_a_bad_key(proxy: Proxy) -> None:
    with pytest.raises(openai.AuthenticationError):
        proxy.client("sk-not-a-key").chat.completions.create(model=MODEL, messages=MESSAGES)


def test_unknown_key_with_a_bad_body_is_still_401(proxy: Proxy) -> None:
    resp = post(proxy, "sk-unknown", content=b"{not json")
    assert_openai_error(resp, 401, "invalid_api_key")


def test_balance_below_the_reservation_is_402_with_required_and_available_sats(
        proxy: Proxy, upstream: TestUpstream) -> None:
    key = proxy.new_key(msat=1500)
    upstream.clear()
    error = assert_openai_error(post(proxy, key, json=BODY), 402, "insufficient_balance",
                                "insufficient_quota")
    assert "1.500 sats available" in error["message"]
    assert "needs up to" in error["message"]
    assert upstream.seen() == []
    state = proxy.key_state(key)
    assert state.balance_msat == 1500 and state.reserved_msat == 0
    with pytest.raises(openai.APIStatusError) as e:
        proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert e.value.status_code == 402


def test_expired_key_is_403(proxy: Proxy, upstream: TestUpstream) -> None:
    key = proxy.new_key(sats=100, expires_at=time.time() - 1)
    upstream.clear()
    assert_openai_error(post(proxy, key, json=BODY), 403, "key_expired")
    assert upstream.seen() == []


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"),
    (b"[1, 2, 3]", "invalid_json"),
    (b'{"messages": []}', "model_required"),
    (b'{"model": "no/such-model", "messages": []}', "model_not_found"),
])
def test_bad_body_is_400_and_nothing_is_reserved(proxy: Proxy, upstream: TestUpstream,
                                                 body: bytes, code: str) -> None:
    key = proxy.new_key(sats=100)
    upstream.clear()
    error = assert_openai_error(post(proxy, key, content=body,
                                     headers={"content-type": "application/json"}), 400, code)
    if code == "model_not_found":
        assert "/v1/models" in error["message"]
    assert upstream.seen() == []
    ledger = proxy.ledger()
    try:
        assert [e["kind"] for e in ledger.entries(proxy.key_state(key).key_hash)] == ["credit"]
    finally:
        ledger.close()


def test_body_over_the_limit_is_413(proxy: Proxy, upstream: TestUpstream) -> None:
    key = proxy.new_key(sats=100)
    upstream.clear()
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_openai_error(post(proxy, key, json=big), 413, "request_too_large")
    assert upstream.seen() == []
    assert proxy.key_state(key).reserved_msat == 0
    assert proxy.check() == []


@pytest.mark.parametrize("status", [500, 429])
def test_upstream_error_status_is_passed_on_and_nothing_is_charged(
        proxy: Proxy, status: int) -> None:
    key = proxy.new_key(sats=100)
    resp = post(proxy, key, json=BODY, headers={"x-scenario": f"error-{status}"})
    assert resp.status_code == status
    assert resp.json()["error"]["message"] == f"upstream says {status}"
    state = proxy.key_state(key)
    assert state.balance_msat == 100_000 and state.reserved_msat == 0
    assert state.total_requests == 0
    assert proxy.check() == []


def test_upstream_error_on_a_stream_request_is_passed_on_and_released(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    with pytest.raises(openai.InternalServerError):
        list(proxy.client(key, default_headers={"x-scenario": "error-500"})
             .chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    state = proxy.key_state(key)
    assert state.balance_msat == 100_000 and state.reserved_msat == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_upstream_unreachable_is_an_openai_shaped_502_and_the_reservation_is_released(
        make_proxy) -> None:
    port = _closed_port()
    p = make_proxy({"UPSTREAM_BASE_URL": f"http://127.0.0.1:{port}/v1"},
                   mode_target=f"http://127.0.0.1:{port}")
    key = p.new_key(sats=100)
    error = assert_openai_error(post(p, key, json=BODY), 502, "upstream_unreachable")
    assert str(port) not in error["message"]  # no internal address in what clients see
    p.wait_settled()
    state = p.key_state(key)
    assert state.balance_msat == 100_000 and state.reserved_msat == 0
    assert p.check() == []
    with pytest.raises(openai.InternalServerError):
        p.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)


def test_model_request_without_any_rate_is_503(make_proxy) -> None:
    port = _closed_port()  # the only rate source answers nothing
    p = make_proxy({"BTC_USD_PRICE": "", "BTC_USD_SOURCES": f"kraken=http://127.0.0.1:{port}/"})
    key = p.new_key(sats=100)
    assert_openai_error(post(p, key, json=BODY), 503, "rate_unavailable")
    assert p.key_state(key).reserved_msat == 0


def test_wrong_method_on_a_local_endpoint_is_405(proxy: Proxy) -> None:
    assert_openai_error(raw(proxy, "DELETE", "/v1/info"), 405, "method_not_allowed")


def test_proxy_keeps_serving_after_bad_input(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    for body in (b"\xff\xfe", b"{}", b'{"model": null}', b'{"model": 5, "stream": "yes"}',
                 b'{"model": "test/model", "max_tokens": -5, "n": "many"}'):
        resp = post(proxy, key, content=body)
        assert 400 <= resp.status_code < 500 or resp.status_code == 200
    completion = proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content
    proxy.wait_settled()
    assert proxy.check() == []


def test_live_rate_from_local_sources_prices_requests(make_proxy) -> None:
    """Two sources speaking Kraken's and Coinbase's protocols: the median prices requests."""
    import json as _json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = {"/kraken": {"error": [], "result": {"XXBTZUSD": {"c": ["90000.0", "0.1"]}}},
               "/coinbase": {"data": {"amount": "92000.00", "base": "BTC", "currency": "USD"}}}

    class Ticker(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = _json.dumps(answers[self.path]).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ticker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        p = make_proxy({"BTC_USD_PRICE": "",
                        "BTC_USD_SOURCES": f"kraken={base}/kraken,coinbase={base}/coinbase"})
        deadline = time.monotonic() + 10
        while raw(p, "GET", "/v1/info").json()["btc_usd"]["rate"] is None:
            assert time.monotonic() < deadline, "no rate after 10 s"
            time.sleep(0.1)
        assert raw(p, "GET", "/v1/info").json()["btc_usd"]["rate"] == 91000.0
        key = p.new_key(sats=100)
        assert post(p, key, json=BODY).status_code == 200
    finally:
        server.shutdown()
