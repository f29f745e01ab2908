"""Hostile input: property tests for what parses untrusted bytes, and a fuzz run over the HTTP
surface. The proxy never crashes, never credits, never leaks a key or token; each run prints
how many inputs it tried."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import string
from pathlib import Path
from typing import Any

import cbor2
import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr_addon.ecash.tokens import TokenError, parse_token
from routstr_addon.metering.pricing import ModelPrice, Pricing
from routstr_addon.metering.usage import SSETap, usage_from_json

from .conftest import Proxy, start_proxy

# --- properties ------------------------------------------------------------------------------


def _cbor_token(obj: Any) -> str:
    return "cashuB" + base64.urlsafe_b64encode(cbor2.dumps(obj)).decode().rstrip("=")


token_like = st.one_of(
    st.text(max_size=300),
    st.text(max_size=300).map(lambda t: "cashuA" + t),
    st.text(alphabet=string.ascii_letters + string.digits + "-_=", max_size=400)
    .map(lambda t: "cashuB" + t),
    st.binary(max_size=300).map(lambda b: "cashuA" + base64.urlsafe_b64encode(b).decode()),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                 | st.binary(max_size=40),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.sampled_from(["t", "m", "u", "i", "p", "a", "s", "c", "d"]),
                                   inner, max_size=5), max_leaves=20).map(_cbor_token),
)


@settings(max_examples=600, deadline=None)
@given(token_like)
def test_token_parsing_only_ever_raises_token_error(text: str) -> None:
    try:
        token = parse_token(text)
    except TokenError:
        return
    assert token.proofs and token.amount > 0  # what parses is a plausible token


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20), st.booleans())
def test_sse_tap_takes_any_bytes(chunks: list[bytes], drop: bool) -> None:
    tap = SSETap(drop_usage_chunk=drop)
    out = b"".join(tap.feed(c) for c in chunks) + tap.flush()
    assert tap.delivered == len(out)
    if not drop:
        # Nothing dropped: what goes out is what came in (line endings normalised).
        assert out == b"".join(chunks).replace(b"\r\n", b"\n").replace(b"\r", b"\n")


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["usage", "prompt_tokens",
                                                       "completion_tokens", "input_tokens",
                                                       "output_tokens", "response",
                                                       "prompt_tokens_details",
                                                       "cached_tokens"]), inner, max_size=4),
                    max_leaves=25))
def test_usage_from_any_json_is_none_or_non_negative(body: Any) -> None:
    usage = usage_from_json(body)
    if usage is not None:
        assert usage.prompt_tokens >= 0 and usage.completion_tokens >= 0


@settings(max_examples=300, deadline=None)
@given(st.integers(-10**9, 10**12), st.integers(-10**9, 10**12), st.integers(-10**9, 10**12))
def test_pricing_of_hostile_token_counts_is_never_negative(prompt: int, completion: int,
                                                           cached: int) -> None:
    from decimal import Decimal

    model = ModelPrice.from_entry({"id": "m", "context_length": 1000, "pricing": {
        "prompt": "0.000001", "completion": "0.000002", "request": "0.0001",
        "input_cache_read": "0.0000001"}})
    pricing = Pricing({"m": model}, Decimal("1.005"), Decimal("1.05"))
    pricing.set_rate("60000")
    if prompt >= 0 and completion >= 0:
        assert pricing.cost(model, prompt, completion, cached) >= 0
    assert pricing.max_cost(model, completion, prompt) >= 0


# --- the HTTP surface ---------------------------------------------------------------------


def _raw_http(port: int, payload: bytes) -> bytes:
    """Send bytes as they are (what no HTTP client would send) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_fuzzing_the_http_surface_never_crashes_credits_or_leaks(
        upstream: Any, mint: Any, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url,
                         "MAX_REQUEST_SIZE": "64k", "ADMIN_PASSWORD": "correct horse battery"})
    try:
        secret_key = proxy.new_key(sats=5)
        counts = asyncio.run(_fuzz(proxy, secret_key))
        total = sum(counts.values())
        print(f"\nfuzz: {total} inputs: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        assert counts["bogus tokens"] == 10_000 and total > 10_250
        # Still serving, nothing credited, nothing leaked.
        assert httpx.get(f"{proxy.url}/v1/info", timeout=5).status_code == 200
        ledger = proxy.ledger()
        try:
            cur = ledger.db.connection().cursor()
            cur.execute("SELECT COUNT(*), COALESCE(SUM(balance_msat), 0) FROM api_keys")
            keys, balance = cur.fetchone()
            # Only the key made above; charged for the odd requests that were real requests,
            # never credited.
            assert keys == 1 and balance <= 5000
            cur.execute("SELECT COUNT(*) FROM ledger_entries WHERE amount_msat > 0")
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT COUNT(*) FROM payments")
            assert cur.fetchone()[0] == 0
            assert ledger.check() == []
        finally:
            ledger.close()
        log = "\n".join(proxy.output.lines)
        assert secret_key not in log
        assert "cashuB" not in log and "cashuA" not in log
        assert "correct horse" not in log
    finally:
        proxy.stop()


async def _fuzz(proxy: Proxy, secret_key: str) -> dict[str, int]:
    rng = random.Random(1234)
    counts: dict[str, int] = {}
    leaks: list[str] = []
    port = int(proxy.url.rsplit(":", 1)[1])

    def check(kind: str, status: int, body: bytes) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        assert status < 500 or status in (502, 503), (kind, status, body[:200])
        if secret_key.encode() in body:
            leaks.append(kind)

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30, limits=limits) as client:
        sem = asyncio.Semaphore(48)

        async def send(kind: str, method: str, path: str, **kw: Any) -> None:
            async with sem:
                try:
                    resp = await client.request(method, path, **kw)
                except httpx.HTTPError:
                    counts[kind] = counts.get(kind, 0) + 1  # refused at the socket: fine
                    return
                check(kind, resp.status_code, resp.content)

        jobs = []
        # Malformed and odd JSON bodies, with a real key.
        auth = {"authorization": f"Bearer {secret_key}"}
        bodies = [b"", b"{", b"[]", b"null", b"1e999999", b'{"model": 1}',
                  b'{"model": "test/model", "messages": "x", "max_tokens": -1}',
                  b'{"model": "test/model", "n": 1e308, "max_tokens": 99999999999999999999}',
                  b'{"model": "\\u0000\\ud800", "messages": []}', "{\"model\": \"模型\"}".encode(),
                  bytes(rng.getrandbits(8) for _ in range(500))]
        for body in bodies * 20:
            jobs.append(send("malformed json", "POST", "/v1/chat/completions", content=body,
                             headers=auth))
        # Bodies over the limit.
        for size in (70_000, 300_000, 2_000_000):
            jobs.append(send("huge bodies", "POST", "/v1/chat/completions",
                             content=b"x" * size, headers=auth))
        # Odd paths: traversal on /admin, unicode, encoded slashes.
        for path in ("/admin/../../etc/passwd", "/admin/static/../../../etc/passwd",
                     "/admin/static/%2e%2e/%2e%2e/etc/passwd", "/admin//static//x",
                     "/v1/models/%00", "/v1/models/" + "é" * 100, "/v1/../../etc/passwd",
                     "/v1/balance/lightning/invoice/../../admin/status", "/%ff%fe"):
            for method in ("GET", "POST"):
                jobs.append(send("odd paths", method, path))
        # Negative and overflowing amounts.
        for amount in (-1, 0, 10**30, 2**63, "1e9", None, 1.5):
            jobs.append(send("amounts", "POST", "/v1/balance/lightning/invoice",
                             json={"amount_sats": amount, "purpose": "topup"}, headers=auth))
            jobs.append(send("amounts", "POST", "/v1/balance/topup",
                             json={"cashu_token": amount}, headers=auth))
        # 10,000 bogus tokens, as x-cashu, as keys, to create and top up.
        for i in range(10_000):
            junk = "".join(rng.choices(string.ascii_letters + string.digits + "-_",
                                       k=rng.randint(1, 300)))
            token = rng.choice(["cashuB", "cashuA", "cashu:cashuB", ""]) + junk
            where = i % 4
            if where == 0:
                jobs.append(send("bogus tokens", "POST", "/v1/chat/completions",
                                 json={"model": "test/model", "messages": []},
                                 headers={"x-cashu": token}))
            elif where == 1:
                jobs.append(send("bogus tokens", "POST", "/v1/chat/completions",
                                 json={"model": "test/model", "messages": []},
                                 headers={"authorization": f"Bearer {token}"}))
            elif where == 2:
                jobs.append(send("bogus tokens", "POST", "/v1/balance/create",
                                 json={"initial_balance_token": token}))
            else:
                jobs.append(send("bogus tokens", "POST", "/v1/balance/topup",
                                 json={"cashu_token": token}, headers=auth))
        await asyncio.gather(*jobs)

    # Huge headers and header injection, as raw bytes.
    raw_inputs = [
        b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n" + b"X-B: 2\r\n" * 5000 + b"\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x\r\n"
        b"X-Cashu: a\r\nInjected: 1\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /v1/info\r\nHTTP/1.1\r\n\r\n",
        b"GET /v1/info HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(100),
        bytes(rng.getrandbits(8) for _ in range(2000)),
    ]
    for payload in raw_inputs:
        answer = await asyncio.to_thread(_raw_http, port, payload)
        counts["raw requests"] = counts.get("raw requests", 0) + 1
        assert secret_key.encode() not in answer
    assert not leaks, leaks
    return counts


def test_answers_never_echo_a_token_or_key(proxy: Proxy) -> None:
    """Errors name what is wrong without repeating the secret that came in."""
    key = "sk-" + "a" * 64
    token = "cashuB" + "Z" * 80
    for headers in ({"authorization": f"Bearer {key}"}, {"x-cashu": token},
                    {"authorization": f"Bearer {token}"}):
        resp = httpx.post(f"{proxy.url}/v1/chat/completions", headers=headers, timeout=10,
                          json={"model": "test/model", "messages": []})
        assert resp.status_code in (400, 401, 402)
        assert key not in resp.text and token not in resp.text
        assert json.loads(resp.text)["error"]["message"]
