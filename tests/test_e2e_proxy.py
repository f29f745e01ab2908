"""Paid requests end to end: official openai client → real mitmdump with the addon → upstream."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from .conftest import RATE, Proxy, expected_msat, raw, start_proxy
from .upstream import TestUpstream, body_json

MODEL = "test/model"
MSG: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "tell me about ecash and proxies"}]


def test_chat_json_returns_upstream_answer_and_charges_exact_usage_price(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    client = proxy.client(key)
    before = proxy.key_state(key)

    raw_resp = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG)
    completion: ChatCompletion = raw_resp.parse()

    assert completion.choices[0].message.content == \
        "[demo echo, no real model] tell me about ecash and proxies"
    assert completion.usage is not None
    price = expected_msat(MODEL, completion.usage.prompt_tokens, completion.usage.completion_tokens)
    after = proxy.key_state(key)
    assert before.balance_msat - after.balance_msat == price
    assert after.total_spent_msat == price and after.total_requests == 1
    assert after.reserved_msat == 0
    assert int(raw_resp.headers["x-routstr-cost-msats"]) == price
    assert int(raw_resp.headers["x-routstr-balance-msats"]) == after.available_msat
    assert proxy.check() == []


def test_chat_stream_charges_exact_usage_price_and_hides_the_injected_usage_chunk(
        proxy: Proxy, upstream: TestUpstream) -> None:
    key = proxy.new_key(sats=100)
    upstream.clear()
    chunks = list(proxy.client(key).chat.completions.create(model=MODEL, messages=MSG,
                                                           stream=True))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[demo echo, no real model] tell me about ecash and proxies"
    # The client did not ask for usage: it must not see the chunk the proxy asked for.
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    sent = body_json(upstream.seen("/chat/completions")[-1])
    assert sent["stream_options"] == {"include_usage": True}
    # The upstream reports one token per word; the proxy charged that usage exactly.
    usage_prompt, usage_completion = 6, len(text.split())
    state = proxy.key_state(key)
    assert state.total_spent_msat == expected_msat(MODEL, usage_prompt, usage_completion)
    assert state.reserved_msat == 0
    assert proxy.check() == []


def test_stream_usage_chunk_reaches_a_client_that_asked_and_other_options_are_kept(
        proxy: Proxy, upstream: TestUpstream) -> None:
    key = proxy.new_key(sats=100)
    upstream.clear()
    chunks = list(proxy.client(key).chat.completions.create(
        model=MODEL, messages=MSG, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1
    sent = body_json(upstream.seen("/chat/completions")[-1])
    assert sent["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert proxy.key_state(key).total_spent_msat == expected_msat(
        MODEL, usage[0].prompt_tokens, usage[0].completion_tokens)


def test_stream_reaches_the_client_while_the_upstream_is_still_sending(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    client = proxy.client(key, default_headers={"x-scenario": "slow"})
    start = time.monotonic()
    arrivals = []
    for chunk in client.chat.completions.create(model=MODEL, messages=MSG, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
    # The upstream sends its 11 words 0.4 s apart: 4 s from the first to the last.
    assert len(arrivals) == 11
    assert arrivals[0] < 0.35, arrivals
    assert arrivals[-1] > 3.6, arrivals
    # Each chunk arrived close to when it was sent, not all together at the end.
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) > 0.25, gaps
    proxy.wait_settled()
    assert proxy.check() == []


def test_cost_comment_closes_a_stream(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    resp = raw(proxy, "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
               json={"model": MODEL, "messages": MSG, "stream": True})
    assert resp.status_code == 200
    assert int(resp.headers["x-routstr-reserved-msats"]) > 0
    lines = [line for line in resp.text.strip().splitlines() if line]
    assert lines[-1] == "data: [DONE]"  # the cost comes before it: OpenAI clients stop there
    assert lines[-2].startswith(": x-routstr-cost-msats ")
    cost = int(lines[-2].split()[2])
    assert cost == proxy.key_state(key).total_spent_msat


def test_cost_where_routstr_clients_read_it(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    resp = raw(proxy, "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
               json={"model": MODEL, "messages": MSG})
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    cost = expected_msat(MODEL, usage["prompt_tokens"], usage["completion_tokens"])
    headers = resp.headers
    assert int(headers["x-routstr-cost-msats"]) == cost == usage["cost"]["total_msats"]
    assert int(headers["x-routstr-input-cost-msats"]) == usage["cost"]["input_msats"]
    assert int(headers["x-routstr-output-cost-msats"]) == usage["cost"]["output_msats"]
    assert (usage["cost"]["input_msats"] + usage["cost"]["output_msats"]
            + usage["cost"]["base_msats"]) == cost
    assert usage["cost_sats"] == resp.json()["cost_sats"] == cost / 1000
    assert abs(float(headers["x-routstr-cost-usd"]) - cost * float(RATE) / 1e11) < 1e-9
    assert usage["cost"]["total_usd"] == pytest.approx(cost * float(RATE) / 1e11)
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_legacy_completion_embeddings_and_responses_are_metered(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    client = proxy.client(key)
    spent = 0

    completion = client.completions.create(model=MODEL, prompt="say something")
    assert completion.usage is not None
    spent += expected_msat(MODEL, completion.usage.prompt_tokens,
                           completion.usage.completion_tokens)
    assert proxy.key_state(key).total_spent_msat == spent

    streamed = list(client.completions.create(model=MODEL, prompt="say something", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices).endswith("say something")
    spent += expected_msat(MODEL, 2, 7)
    assert proxy.key_state(key).total_spent_msat == spent

    embedding = client.embeddings.create(model="test/embed", input=["one two", "three"])
    assert len(embedding.data) == 2
    spent += expected_msat("test/embed", embedding.usage.prompt_tokens, 0)
    assert proxy.key_state(key).total_spent_msat == spent

    response = client.responses.create(model=MODEL, input="hello responses api")
    assert response.output_text.endswith("hello responses api")
    assert response.usage is not None
    spent += expected_msat(MODEL, response.usage.input_tokens, response.usage.output_tokens)
    assert proxy.key_state(key).total_spent_msat == spent

    events = list(client.responses.create(model=MODEL, input="hello responses api", stream=True))
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1 and completed[0].response.usage is not None
    u = completed[0].response.usage
    spent += expected_msat(MODEL, u.input_tokens, u.output_tokens)
    state = proxy.key_state(key)
    assert state.total_spent_msat == spent and state.total_requests == 5
    assert proxy.check() == []


def test_upstream_gets_the_operator_key_and_the_rewritten_path(make_proxy,
                                                              upstream: TestUpstream) -> None:
    p = make_proxy({"UPSTREAM_API_KEY": "sk-upstream-secret",
                    "UPSTREAM_BASE_URL": f"{upstream.url}/provider/api/v1"})
    key = p.new_key(sats=10)
    upstream.clear()
    p.client(key).chat.completions.create(model=MODEL, messages=MSG)
    seen = upstream.seen()[-1]
    assert seen.path == "/provider/api/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-upstream-secret"
    assert key not in json.dumps(seen.headers)


def test_client_key_is_never_sent_upstream_without_an_operator_key(proxy: Proxy,
                                                                  upstream: TestUpstream) -> None:
    key = proxy.new_key(sats=10)
    upstream.clear()
    proxy.client(key).chat.completions.create(model=MODEL, messages=MSG)
    seen = upstream.seen()[-1]
    assert "authorization" not in seen.headers
    assert seen.path == "/v1/chat/completions"


def test_missing_usage_is_estimated_from_the_delivered_text(proxy: Proxy) -> None:
    key = proxy.new_key(sats=100)
    client = proxy.client(key, default_headers={"x-scenario": "no-usage"})
    completion = client.chat.completions.create(model=MODEL, messages=MSG)
    assert completion.usage is None
    state = proxy.key_state(key)
    assert state.reserved_msat == 0
    # Prompt: 31 characters of message (8 tokens); answer: 57 characters (15 tokens).
    assert state.total_spent_msat == expected_msat(MODEL, 8, 15)

    list(client.chat.completions.create(model=MODEL, messages=MSG, stream=True))
    proxy.wait_settled()
    streamed = proxy.key_state(key).total_spent_msat - state.total_spent_msat
    assert streamed == expected_msat(MODEL, 8, 15)
    assert proxy.check() == []


def test_model_pricing_published_in_models_endpoint(proxy: Proxy) -> None:
    models = proxy.client("unused").models.list()
    ids = [m.id for m in models.data]
    assert ids == ["test/model", "test/embed"]
    entry = raw(proxy, "GET", "/v1/models").json()["data"][0]
    sats_pricing = entry["sats_pricing"]
    # prompt + completion fit the 4096-token context: the dearest request is 3584 prompt tokens
    # and the 512-token completion cap
    assert sats_pricing["max_cost"] == expected_msat(MODEL, 4096 - 512, 512) / 1000
    assert entry["pricing"]["prompt"] == "0.000001234"
    one = raw(proxy, "GET", "/v1/models/test/model").json()
    assert one["id"] == "test/model"
    assert raw(proxy, "GET", "/v1/models/nope").status_code == 404


def test_info_and_balance_endpoints(proxy: Proxy) -> None:
    info = raw(proxy, "GET", "/v1/info").json()
    assert info["pricing"] == "model_based"
    assert info["btc_usd"]["rate"] == float("91234.56")
    key = proxy.new_key(sats=7)
    for path in ("/v1/balance/info", "/v1/wallet/info"):
        balance = raw(proxy, "GET", path, headers={"authorization": f"Bearer {key}"}).json()
        assert balance["api_key"] == key
        assert balance["balance"] == 7000 and balance["reserved"] == 0
    assert raw(proxy, "GET", "/v1/balance/info").status_code == 401
    assert raw(proxy, "GET", "/v1/balance/info",
               headers={"authorization": "Bearer sk-nope"}).status_code == 401


def test_fixed_pricing_charges_cost_per_request(make_proxy) -> None:
    p = make_proxy({"MODEL_BASED_PRICING": "false", "COST_PER_REQUEST": "3"})
    key = p.new_key(sats=10)
    client = p.client(key)
    for _ in range(3):
        client.chat.completions.create(model="anything-goes", messages=MSG)
    state = p.key_state(key)
    assert state.total_spent_msat == 9000 and state.balance_msat == 1000
    try:
        client.chat.completions.create(model="anything-goes", messages=MSG)
        raise AssertionError("a fourth request must not be paid for by 1 sat")
    except openai.APIStatusError as e:
        assert e.status_code == 402
    assert p.check() == []


def test_upstream_base_url_wins_over_the_reverse_mode_target(make_proxy,
                                                            upstream: TestUpstream) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = s.getsockname()[1]
    p = make_proxy(mode_target=f"http://127.0.0.1:{nowhere}")
    key = p.new_key(sats=10)
    completion = p.client(key).chat.completions.create(model=MODEL, messages=MSG)
    assert completion.choices[0].message.content
    assert upstream.seen()[-1].headers["host"] == f"127.0.0.1:{upstream.port}"


def test_gzip_request_body_is_read(proxy: Proxy) -> None:
    import gzip

    key = proxy.new_key(sats=10)
    body = gzip.compress(json.dumps({"model": MODEL, "messages": MSG}).encode())
    resp = raw(proxy, "POST", "/v1/chat/completions", content=body,
               headers={"authorization": f"Bearer {key}", "content-encoding": "gzip",
                        "content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert int(resp.headers["x-routstr-cost-msats"]) > 0


def _listen_backlog(port: int) -> int:
    """The backlog of the TCP listener on ``port``, as the kernel reports it (ss's Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[2])


def test_the_listener_queues_a_burst_of_connections(upstream: TestUpstream,
                                                    tmp_path: Path) -> None:
    """asyncio listens with a backlog of 100; a burst of clients beyond it was reset."""
    p = start_proxy(tmp_path / "backlog", upstream.url,
                    {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "LISTEN_BACKLOG": "777"})
    try:
        port = int(p.url.rsplit(":", 1)[1])
        wanted = min(777, int(Path("/proc/sys/net/core/somaxconn").read_text()))
        deadline = time.monotonic() + 10  # mitmproxy says it listens before its running hook
        while _listen_backlog(port) != wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _listen_backlog(port) == wanted
    finally:
        p.stop()
