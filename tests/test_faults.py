"""Streams that break: upstream dropping mid-stream, client leaving mid-stream, odd upstreams.
Each leaves the ledger consistent: sum(entries) == balance and no reservation left open."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from routstr_addon.ledger import hash_key

from .conftest import Proxy, expected_msat
from .upstream import TestUpstream

MODEL = "test/model"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def charges(proxy: Proxy, key: str) -> list[dict[str, Any]]:
    ledger = proxy.ledger()
    try:
        return [e for e in ledger.entries(hash_key(key), limit=100) if e["kind"] == "charge"]
    finally:
        ledger.close()


def test_upstream_disconnect_mid_stream_charges_what_was_delivered(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    received = b""
    with (httpx.Client(base_url=proxy.url, timeout=30) as client,
          pytest.raises(httpx.HTTPError),
          client.stream("POST", "/v1/chat/completions",
                        headers={"authorization": f"Bearer {key}", "x-scenario": "cut"},
                        json={"model": MODEL, "messages": MESSAGES, "stream": True}) as resp):
        assert resp.status_code == 200
        for chunk in resp.iter_bytes():
            received += chunk
    assert received.count(b"data: ") == 3
    proxy.wait_settled()
    (charge,) = charges(proxy, key)
    # Three words of 6 characters were delivered: 5 tokens estimated; the prompt, 2 tokens.
    assert charge["note"] == "usage estimated"
    assert (charge["prompt_tokens"], charge["completion_tokens"]) == (2, 5)
    assert -charge["amount_msat"] == expected_msat(MODEL, 2, 5)
    assert proxy.key_state(key).reserved_msat == 0
    assert proxy.check() == []


def test_close_delimited_stream_ending_early_is_estimated_not_free(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    chunks = list(proxy.client(key, default_headers={"x-scenario": "cut-close"})
                  .chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert len(chunks) == 3
    proxy.wait_settled()
    (charge,) = charges(proxy, key)
    assert charge["note"] == "usage estimated" and charge["completion_tokens"] == 5
    assert proxy.check() == []


def test_client_disconnect_mid_stream_settles_and_leaves_nothing_open(
        proxy: Proxy, upstream: TestUpstream) -> None:
    key = proxy.new_key(sats=100)
    reserved_during = 0
    client = proxy.client(key, default_headers={"x-scenario": "endless"})
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    for i, _ in enumerate(stream):
        if i == 0:
            reserved_during = proxy.key_state(key).reserved_msat
        if i == 4:
            break
    stream.close()  # the client goes away while the upstream is still sending
    assert reserved_during > 0
    proxy.wait_settled()
    (charge,) = charges(proxy, key)
    assert charge["note"] == "usage estimated"
    assert 5 <= charge["completion_tokens"] <= 10  # what reached the client, give or take
    state = proxy.key_state(key)
    assert state.reserved_msat == 0 and state.balance_msat == 100_000 + charge["amount_msat"]
    assert proxy.check() == []


def test_client_leaving_before_any_answer_pays_for_its_prompt(proxy: Proxy) -> None:
    """Issue 11 rule 5: the upstream had the request (it works, and bills, anyway)."""
    key = proxy.new_key(sats=100)
    with pytest.raises(openai.APITimeoutError):
        proxy.client(key, default_headers={"x-scenario": "hang"}, timeout=1.0) \
            .chat.completions.create(model=MODEL, messages=MESSAGES)
    proxy.wait_settled()
    state = proxy.key_state(key)
    (charge,) = charges(proxy, key)
    assert charge["note"].startswith("client gone")
    assert charge["completion_tokens"] == 0 and charge["prompt_tokens"] > 0
    assert -charge["amount_msat"] == expected_msat(MODEL, charge["prompt_tokens"], 0)
    assert state.balance_msat == 100_000 + charge["amount_msat"] and state.reserved_msat == 0
    assert proxy.check() == []


def test_garbage_sse_passes_through_and_is_charged_an_estimate(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        resp = client.post("/v1/chat/completions",
                           headers={"authorization": f"Bearer {key}", "x-scenario": "garbage"},
                           json={"model": MODEL, "messages": MESSAGES, "stream": True})
    assert resp.status_code == 200
    assert b"data: {not json" in resp.content and b"data: [DONE]" in resp.content
    proxy.wait_settled()
    (charge,) = charges(proxy, key)
    assert charge["note"] == "usage estimated"
    assert -charge["amount_msat"] == expected_msat(MODEL, 2, 0)  # the prompt, never zero
    assert proxy.check() == []


def test_proxy_serves_normally_after_the_faults(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    start = time.monotonic()
    completion = proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content
    assert time.monotonic() - start < 5
    assert proxy.check() == []


def test_a_silent_upstream_times_out_with_a_clear_error_and_nothing_charged(make_proxy) -> None:
    p = make_proxy({"UPSTREAM_TIMEOUT": "1"})
    key = p.new_key(sats=100)
    start = time.monotonic()
    with httpx.Client(base_url=p.url, timeout=10) as client:
        resp = client.post("/v1/chat/completions",
                           json={"model": MODEL, "messages": MESSAGES},
                           headers={"authorization": f"Bearer {key}", "x-scenario": "hang"})
    assert 1 <= time.monotonic() - start < 5
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "upstream_unreachable"
    p.wait_settled()
    state = p.key_state(key)
    assert state.balance_msat == 100_000 and state.reserved_msat == 0
    assert p.check() == []
    # …and it keeps serving
    assert p.client(key).chat.completions.create(model=MODEL, messages=MESSAGES).choices
