"""Unit tests of the meter (metering.meter) on a real SQLite ledger: no servers, no network."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from routstr_addon.errors import ApiError
from routstr_addon.ledger import Ledger, hash_key
from routstr_addon.metering.meter import Meter, Paid, bearer_token
from routstr_addon.metering.pricing import Pricing, load_models
from routstr_addon.metering.stream import MeteredStream
from routstr_addon.metering.usage import SSETap, Usage
from routstr_addon.settings import load_config

REPO = Path(__file__).resolve().parent.parent
RATE = "100000"
FEES = ("1.005", "1.05")

# --- bearer_token ---------------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    None, "", "sk-abc", "Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer    ",
    "Bearer sk-a sk-b", "Token sk-abc", "Bearersk-abc",
])
def test_bearer_token_rejects(header):
    with pytest.raises(ApiError) as raised:
        bearer_token(header)
    assert raised.value.status == 401
    assert raised.value.code == "invalid_api_key"


@pytest.mark.parametrize(("header", "key"), [
    ("Bearer sk-abc", "sk-abc"),
    ("bearer sk-abc", "sk-abc"),
    ("BEARER sk-abc", "sk-abc"),
    ("  Bearer   sk-abc  ", "sk-abc"),
    # nutshell's tokens of many proofs with DLEQ run to 5-9k characters: no length bound here
    # (the request's headers as a whole are bounded)
    ("Bearer cashuB" + "x" * 9000, "cashuB" + "x" * 9000),
])
def test_bearer_token_accepts(header, key):
    assert bearer_token(header) == key


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    books = Ledger("sqlite:///" + str(tmp_path / "l.sqlite"))
    yield books
    books.close()


def make_meter(tmp_path: Path, ledger: Ledger, rate: str | None = RATE,
               **env: str) -> Meter:
    config = load_config({"DATA_DIR": str(tmp_path), "EXCHANGE_FEE": FEES[0],
                          "UPSTREAM_PROVIDER_FEE": FEES[1], **env})
    pricing = Pricing(load_models(REPO / "models.example.json"), config.exchange_fee,
                      config.upstream_provider_fee)
    if rate is not None:
        pricing.set_rate(rate)
    return Meter(config, ledger, pricing)


@pytest.fixture
def meter(tmp_path: Path, ledger: Ledger) -> Meter:
    return make_meter(tmp_path, ledger)


def msat(usd: Fraction) -> int:
    """The documented price formula, independent of the code under test."""
    return math.ceil(usd * Fraction(FEES[0]) * Fraction(FEES[1]) * 10**11 / Fraction(RATE))


# models.example.json, per token
MINI_PROMPT = Fraction("0.00000015")
MINI_COMPLETION = Fraction("0.0000006")
MINI_CACHE = Fraction("0.000000075")
MINI_CONTEXT = 128000
MINI_MAX_COMPLETION = 16384
GPT4O_PROMPT = Fraction("0.0000025")
GPT4O_COMPLETION = Fraction("0.00001")
EMBED_PROMPT = Fraction("0.00000002")


def funded(ledger: Ledger, sats: int) -> tuple[str, str]:
    key, state = ledger.create_key(sats * 1000)
    return "Bearer " + key, state.key_hash


def chat_body(**extra: Any) -> bytes:
    body: dict[str, Any] = {"model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": "Say hello in French."}]}
    body.update(extra)
    return json.dumps(body).encode()


def audit(ledger: Ledger) -> None:
    assert ledger.check() == []
    assert ledger.open_reservations() == []


# --- admit: reservations --------------------------------------------------------------------


def test_admit_reserves_the_maximum_cost(meter, ledger):
    auth, key_hash = funded(ledger, 10_000)
    body = chat_body(max_tokens=100)
    paid = meter.admit("req-1", auth, "/chat/completions", body)
    assert paid.model is not None and paid.model.id == "openai/gpt-4o-mini"
    assert paid.endpoint == "chat"
    assert paid.key_hash == key_hash == hash_key(auth.removeprefix("Bearer "))
    # a text body of N bytes holds at most N tokens, plus the provider's template overhead
    expected = msat((len(body) + 1024) * MINI_PROMPT + 100 * MINI_COMPLETION)
    assert paid.reserved_msat == expected
    assert paid.available_msat == 10_000_000 - expected
    state = ledger.key(key_hash)
    assert state is not None and state.reserved_msat == expected
    assert [r["request_id"] for r in ledger.open_reservations()] == ["req-1"]
    assert ledger.check() == []
    meter.release(paid, "test")
    audit(ledger)


@pytest.mark.parametrize(("path", "extra", "usd"), [
    # several caps: the largest counts (vLLM takes the first non-zero one)
    ("/chat/completions", {"max_completion_tokens": 50, "max_tokens": 999},
     lambda n: (n + 1024) * MINI_PROMPT + 999 * MINI_COMPLETION),
    ("/chat/completions", {"max_completion_tokens": 0, "max_tokens": 99},
     lambda n: (n + 1024) * MINI_PROMPT + 99 * MINI_COMPLETION),
    ("/chat/completions", {"max_tokens": 10, "n": 2, "best_of": 5},
     lambda n: (n + 1024) * MINI_PROMPT + 50 * MINI_COMPLETION),
    ("/chat/completions", {},
     lambda n: (n + 1024) * MINI_PROMPT + MINI_MAX_COMPLETION * MINI_COMPLETION),
    ("/chat/completions", {"max_tokens": 100, "n": 3},
     lambda n: (n + 1024) * MINI_PROMPT + 300 * MINI_COMPLETION),
    ("/responses", {"max_output_tokens": 10},
     lambda n: (n + 1024) * MINI_PROMPT + 10 * MINI_COMPLETION),
    ("/chat/completions", {"max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}]}]},
     # an image's tokens are not bounded by the body's size: the prompt may fill the context
     # but what the completion needs (prompt + completion <= context)
     lambda n: (MINI_CONTEXT - 10) * MINI_PROMPT + 10 * MINI_COMPLETION),
])
def test_admit_reservation_follows_the_request_limits(meter, ledger, path, extra, usd):
    auth, _ = funded(ledger, 10_000)
    body = chat_body(**extra)
    paid = meter.admit("req-1", auth, path, body)
    assert paid.reserved_msat == msat(usd(len(body)))
    meter.release(paid, "test")
    audit(ledger)


def test_admit_embeddings_reserves_no_completion(meter, ledger):
    auth, _ = funded(ledger, 1_000)
    body = json.dumps({"model": "text-embedding-3-small", "input": "The food was delicious",
                       "max_tokens": 500}).encode()
    paid = meter.admit("req-1", auth, "/embeddings", body)
    assert paid.endpoint == "embeddings"
    assert paid.reserved_msat == msat((len(body) + 1024) * EMBED_PROMPT)
    meter.settle_body(paid, 200, json.dumps({
        "object": "list", "data": [{"object": "embedding", "embedding": [0.1], "index": 0}],
        "model": "text-embedding-3-small", "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }).encode())
    entries = ledger.entries()
    assert entries[-1]["kind"] == "charge"
    assert entries[-1]["amount_msat"] == -msat(5 * EMBED_PROMPT)
    audit(ledger)


def test_admit_responses_with_previous_response_id_is_not_bounded_by_body_size(meter, ledger):
    auth, _ = funded(ledger, 10_000)
    body = json.dumps({"model": "gpt-4o-mini", "previous_response_id": "resp_68af4030592c",
                       "input": "And in German?", "max_output_tokens": 10}).encode()
    paid = meter.admit("req-1", auth, "/responses", body)
    try:
        # the earlier turns can fill the whole context window
        usage = {"input_tokens": 100_000, "output_tokens": 10}
        assert paid.reserved_msat >= msat(100_000 * MINI_PROMPT + 10 * MINI_COMPLETION)
    finally:
        meter.settle_body(paid, 200, json.dumps({"usage": usage}).encode())
        audit(ledger)


# --- settle ---------------------------------------------------------------------------------


CHAT_ANSWER = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1741570283,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour !"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 13, "completion_tokens": 4, "total_tokens": 17,
              "prompt_tokens_details": {"cached_tokens": 0}},
}


def test_settle_body_charges_exactly_the_reported_usage(meter, ledger):
    auth, key_hash = funded(ledger, 10_000)
    paid = meter.admit("req-1", auth, "/chat/completions", chat_body(max_tokens=100))
    done = meter.settle_body(paid, 200, json.dumps(CHAT_ANSWER).encode())
    expected = msat(13 * MINI_PROMPT + 4 * MINI_COMPLETION)
    assert done is not None
    assert done.charged_msat == expected
    assert done.reserved_msat == paid.reserved_msat
    assert done.available_msat == 10_000_000 - expected
    assert paid.settled and paid.usage == Usage(13, 4, 0)
    state = ledger.key(key_hash)
    assert state is not None
    assert (state.balance_msat, state.reserved_msat, state.total_spent_msat,
            state.total_requests) == (10_000_000 - expected, 0, expected, 1)
    last = ledger.entries()[-1]
    assert (last["kind"], last["request_id"], last["model"], last["prompt_tokens"],
            last["completion_tokens"]) == ("charge", "req-1", "openai/gpt-4o-mini", 13, 4)
    audit(ledger)
    # settling again does nothing
    assert meter.settle_body(paid, 200, json.dumps(CHAT_ANSWER).encode()) is None
    audit(ledger)


def test_settle_body_charges_cached_tokens_at_the_cache_price(meter, ledger):
    auth, _ = funded(ledger, 10_000)
    paid = meter.admit("req-1", auth, "/chat/completions", chat_body(max_tokens=100))
    answer = json.loads(json.dumps(CHAT_ANSWER))
    answer["usage"].update(prompt_tokens=1500, completion_tokens=20,
                           prompt_tokens_details={"cached_tokens": 1024})
    done = meter.settle_body(paid, 200, json.dumps(answer).encode())
    assert done is not None
    assert done.charged_msat == msat(476 * MINI_PROMPT + 1024 * MINI_CACHE
                                     + 20 * MINI_COMPLETION)
    audit(ledger)


def test_settle_body_responses_api_usage(meter, ledger):
    auth, _ = funded(ledger, 10_000)
    body = json.dumps({"model": "openai/gpt-4o", "input": "Tell me a story.",
                       "max_output_tokens": 200}).encode()
    paid = meter.admit("req-1", auth, "/responses", body)
    done = meter.settle_body(paid, 200, json.dumps({
        "id": "resp_1", "object": "response", "status": "completed",
        "output": [{"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Once upon a time."}]}],
        "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 87, "total_tokens": 123},
    }).encode())
    assert done is not None
    assert done.charged_msat == msat(36 * GPT4O_PROMPT + 87 * GPT4O_COMPLETION)
    audit(ledger)


@pytest.mark.parametrize("status", [400, 429, 500, 502, 503])
def test_settle_body_releases_on_an_upstream_error(meter, ledger, status):
    auth, key_hash = funded(ledger, 10_000)
    paid = meter.admit("req-1", auth, "/chat/completions", chat_body())
    # even an error body that reports usage is not charged
    done = meter.settle_body(paid, status, json.dumps(
        {"error": {"message": "boom", "type": "server_error"},
         "usage": {"prompt_tokens": 10, "completion_tokens": 10}}).encode())
    assert done is not None and done.charged_msat == 0
    assert done.available_msat == 10_000_000
    state = ledger.key(key_hash)
    assert state is not None
    assert (state.balance_msat, state.reserved_msat, state.total_requests) == (10_000_000, 0, 0)
    assert ledger.entries()[-1]["kind"] == "release"
    audit(ledger)


@pytest.mark.parametrize("answer", [
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 400},
                  "finish_reason": "stop"}]},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 400},
                  "finish_reason": "stop"}], "usage": None},
    None,  # not even JSON
])
def test_settle_body_estimates_when_usage_is_missing(meter, ledger, answer):
    auth, _ = funded(ledger, 10_000)
    content = "Say hello in French."
    paid = meter.admit("req-1", auth, "/chat/completions", chat_body(max_tokens=1000))
    raw = b"<html>oops</html>" if answer is None else json.dumps(answer).encode()
    done = meter.settle_body(paid, 200, raw)
    completion = 100 if answer is not None else 0
    expected = msat(math.ceil(len(content) / 4) * MINI_PROMPT
                    + completion * MINI_COMPLETION)
    assert done is not None
    assert done.charged_msat == expected
    assert 0 < done.charged_msat < paid.reserved_msat
    assert paid.usage is not None and paid.usage.estimated
    assert ledger.entries()[-1]["note"] == "usage estimated"
    audit(ledger)


def test_estimate_is_never_zero(meter, ledger):
    auth, _ = funded(ledger, 10_000)
    paid = meter.admit("req-1", auth, "/chat/completions",
                       json.dumps({"model": "gpt-4o-mini", "messages": []}).encode())
    done = meter.settle_body(paid, 200, b'{"choices": []}')
    assert done is not None
    assert done.charged_msat == msat(1 * MINI_PROMPT)  # at least one prompt token
    assert done.charged_msat > 0
    audit(ledger)


def test_settle_stream_charges_reported_usage_and_drops_the_injected_chunk(meter, ledger):
    auth, _ = funded(ledger, 10_000)
    paid = meter.admit("req-1", auth, "/chat/completions", chat_body(stream=True))
    assert paid.upstream_body is not None and paid.drop_usage
    stream = MeteredStream(meter, paid)
    content = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,'
               b'"delta":{"content":"Bonjour"},"finish_reason":null}],"usage":null}\n\n')
    usage = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":'
             b'{"prompt_tokens":13,"completion_tokens":2,"total_tokens":15}}\n\n')
    out = stream.feed(content + usage[:30]) + stream.feed(usage[30:] + b"data: [DONE]\n\n")
    # Settled at [DONE], the cost in a comment clients ignore, sent before [DONE] (where
    # OpenAI clients stop reading).
    done = paid.closed
    assert done is not None
    assert done.charged_msat == msat(13 * MINI_PROMPT + 2 * MINI_COMPLETION)
    assert out == content + (b": x-routstr-cost-msats %d x-routstr-balance-msats %d\n\n"
                             % (done.charged_msat, done.available_msat)) + b"data: [DONE]\n\n"
    assert stream.finish() == b""  # nothing after [DONE]
    audit(ledger)


def test_a_usage_chunk_the_client_asked_for_carries_the_cost(meter, ledger):
    auth, _ = funded(ledger, 10_000)
    body = chat_body(stream=True, stream_options={"include_usage": True})
    paid = meter.admit("req-1", auth, "/chat/completions", body)
    assert not paid.drop_usage
    stream = MeteredStream(meter, paid)
    usage = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":'
             b'{"prompt_tokens":13,"completion_tokens":2,"total_tokens":15,'
             b'"prompt_tokens_details":{"cached_tokens":3}}}\n\n')
    out = stream.feed(usage) + stream.finish()
    chunk = json.loads(out.split(b"\n\n")[0][len(b"data: "):])
    cost = chunk["usage"]["cost"]
    charged = paid.closed.charged_msat
    assert cost["total_msats"] == cost["charged_msats"] == charged
    assert cost["input_msats"] + cost["output_msats"] + cost["base_msats"] == charged
    assert cost["cache_read_input_tokens"] == 3
    assert chunk["usage"]["cost_sats"] == charged / 1000
    assert chunk["usage"]["prompt_tokens"] == 13  # the rest as it came
    audit(ledger)


def test_stream_cut_short_is_charged_an_estimate_and_unsent_one_released(meter, ledger):
    auth, _ = funded(ledger, 10_000)
    paid = meter.admit("req-1", auth, "/chat/completions", chat_body(stream=True))
    stream = MeteredStream(meter, paid)
    stream.feed(b'data: {"choices":[{"index":0,"delta":{"content":"' + b"y" * 80 + b'"}}]}\n\n')
    done = meter.abort(paid, "connection reset")
    assert done is not None
    assert done.charged_msat == msat(5 * MINI_PROMPT + 20 * MINI_COMPLETION)
    assert 0 < done.charged_msat < paid.reserved_msat

    paid = meter.admit("req-2", auth, "/chat/completions", chat_body(stream=True))
    MeteredStream(meter, paid)
    done = meter.abort(paid, "connection refused")
    assert done is not None and done.charged_msat == 0
    audit(ledger)


def test_fixed_price_mode_and_unmetered_paths(tmp_path, ledger):
    auth, key_hash = funded(ledger, 100)
    fixed = make_meter(tmp_path, ledger, MODEL_BASED_PRICING="false", COST_PER_REQUEST="3")
    paid = fixed.admit("req-1", auth, "/chat/completions", chat_body())
    assert paid.reserved_msat == 3000 and paid.model is None
    done = fixed.settle_body(paid, 200, json.dumps(CHAT_ANSWER).encode())
    assert done is not None and done.charged_msat == 3000

    metered = make_meter(tmp_path, ledger, FIXED_PRICE_ENDPOINTS="images/generations=2")
    paid = metered.admit("req-2", auth, "/v1/Images//generations/", b"not even json")
    assert paid.endpoint is None and paid.reserved_msat == 2000
    assert paid.path == "images/generations" and paid.upstream_body is None
    done = metered.settle_body(paid, 200, b'{"data": []}')
    assert done is not None and done.charged_msat == 2000
    state = ledger.key(key_hash)
    assert state is not None and state.balance_msat == 95_000
    audit(ledger)


# --- admit: refusals ------------------------------------------------------------------------


def refused(meter: Meter, auth: str | None, body: bytes, path: str = "/chat/completions",
            ) -> ApiError:
    with pytest.raises(ApiError) as raised:
        meter.admit("req-x", auth, path, body)
    return raised.value


def test_insufficient_balance_is_402_with_required_and_available(meter, ledger):
    auth, key_hash = funded(ledger, 5)
    body = chat_body(model="gpt-4o", max_tokens=4000)
    required = msat((len(body) + 1024) * GPT4O_PROMPT + 4000 * GPT4O_COMPLETION)
    assert required > 5000
    error = refused(meter, auth, body)
    assert error.status == 402
    assert error.code == "insufficient_balance"
    assert error.type == "insufficient_quota"
    found = re.search(r"needs up to ([\d,.]+) sats .* has ([\d,.]+) sats", error.message)
    assert found is not None, error.message
    assert Decimal(found[1].replace(",", "")) == Decimal(required) / 1000
    assert Decimal(found[2].replace(",", "")) == 5
    state = ledger.key(key_hash)
    assert state is not None and state.reserved_msat == 0
    audit(ledger)


def test_insufficient_balance_counts_what_other_requests_hold(meter, ledger):
    auth, _ = funded(ledger, 100)
    first = meter.admit("req-1", auth, "/chat/completions", chat_body(max_tokens=10))
    left = 100_000 - first.reserved_msat
    error = refused(meter, auth, chat_body(model="gpt-4o", max_tokens=16000))
    assert error.status == 402
    found = re.search(r"has ([\d,.]+) sats", error.message)
    assert found is not None
    assert Decimal(found[1].replace(",", "")) == Decimal(left) / 1000
    meter.release(first, "test")
    audit(ledger)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[]", b"", chat_body()])
def test_unknown_key_is_401_whatever_the_body(meter, ledger, body):
    funded(ledger, 100)
    error = refused(meter, "Bearer sk-not-a-key", body)
    assert error.status == 401
    assert error.code == "invalid_api_key"
    audit(ledger)


@pytest.mark.parametrize("auth", [None, "", "Basic abc", "Bearer "])
def test_missing_or_malformed_key_is_401_before_the_body(meter, ledger, auth):
    error = refused(meter, auth, b"{not json")
    assert error.status == 401
    assert error.code == "invalid_api_key"
    audit(ledger)


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00", "invalid_json"),
    (b"", "invalid_json"),
    (b'["model", "gpt-4o"]', "invalid_json"),
    (b'"gpt-4o"', "invalid_json"),
    (json.dumps({"messages": []}).encode(), "model_required"),
    (json.dumps({"model": "", "messages": []}).encode(), "model_required"),
    (json.dumps({"model": 4, "messages": []}).encode(), "model_required"),
    (json.dumps({"model": "gpt-7", "messages": []}).encode(), "model_not_found"),
    (json.dumps({"model": "llama", "messages": []}).encode(), "model_not_found"),
])
def test_bad_request_is_400(meter, ledger, body, code):
    auth, key_hash = funded(ledger, 100)
    error = refused(meter, auth, body)
    assert error.status == 400
    assert error.code == code
    if code.startswith("model"):
        assert error.param == "model"
    state = ledger.key(key_hash)
    assert state is not None and state.reserved_msat == 0
    audit(ledger)


def test_no_rate_is_503(tmp_path, ledger):
    auth, _ = funded(ledger, 100)
    meter = make_meter(tmp_path, ledger, rate=None)
    error = refused(meter, auth, chat_body())
    assert error.status == 503
    assert error.code == "rate_unavailable"
    # the body is still checked first
    assert refused(meter, auth, chat_body(model="gpt-7")).status == 400
    assert refused(meter, "Bearer sk-unknown", chat_body()).status == 401
    audit(ledger)


@pytest.mark.parametrize(("field", "code"), [("expires_at", "key_expired"),
                                             ("disabled", "key_disabled")])
def test_expired_or_disabled_key_is_403(meter, ledger, field, code):
    kwargs: dict[str, Any] = {"expires_at": 1.0} if field == "expires_at" else {}
    key, state = ledger.create_key(100_000, **kwargs)
    if field == "disabled":
        ledger.db.execute_sql("UPDATE api_keys SET disabled = 1 WHERE key_hash = ?",
                              (state.key_hash,))
    error = refused(meter, "Bearer " + key, chat_body())
    assert error.status == 403
    assert error.code == code
    audit(ledger)


# --- what the upstream gets ----------------------------------------------------------------


def admitted(meter: Meter, ledger: Ledger, path: str = "/chat/completions",
             **body: Any) -> Paid:
    auth, _ = funded(ledger, 10_000)
    if path == "/completions":
        body = {"prompt": "Say hello", **body}
    return meter.admit("req-1", auth, path, chat_body(**body))


USAGE_CHUNK = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
               b'"usage":{"prompt_tokens":13,"completion_tokens":2,"total_tokens":15}}\n\n')


def tap_output(paid: Paid) -> bytes:
    tap = SSETap(drop_usage_chunk=paid.drop_usage)
    return tap.feed(USAGE_CHUNK + b"data: [DONE]\n\n") + tap.flush()


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_upstream_body_injects_include_usage(meter, ledger, path):
    paid = admitted(meter, ledger, path, stream=True, temperature=0.5)
    new = paid.upstream_body
    assert new is not None
    extra = {"prompt": "Say hello"} if path == "/completions" else {}
    assert json.loads(new) == {**json.loads(chat_body(stream=True, temperature=0.5, **extra)),
                               "stream_options": {"include_usage": True}}
    assert paid.drop_usage
    # the injected usage chunk is then kept from the client
    assert tap_output(paid) == b"data: [DONE]\n\n"
    meter.release(paid, "test")
    audit(ledger)


def test_upstream_body_keeps_the_clients_other_stream_options(meter, ledger):
    paid = admitted(meter, ledger, stream=True,
                    stream_options={"include_obfuscation": False, "x_custom": [1, 2]})
    new = paid.upstream_body
    assert new is not None
    sent = json.loads(new)
    assert sent["stream_options"] == {"include_obfuscation": False, "x_custom": [1, 2],
                                      "include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in json.loads(chat_body(stream=True)).items()}
    assert paid.drop_usage
    meter.release(paid, "test")
    audit(ledger)


def test_upstream_body_overrides_include_usage_false(meter, ledger):
    paid = admitted(meter, ledger, stream=True, stream_options={"include_usage": False})
    new = paid.upstream_body
    assert new is not None
    assert json.loads(new)["stream_options"] == {"include_usage": True}
    assert paid.drop_usage
    assert tap_output(paid) == b"data: [DONE]\n\n"
    meter.release(paid, "test")
    audit(ledger)


def test_upstream_body_unchanged_when_the_client_asked_for_usage(meter, ledger):
    paid = admitted(meter, ledger, stream=True, stream_options={"include_usage": True})
    assert paid.upstream_body is not None  # re-serialised, the same fields
    assert json.loads(paid.upstream_body) == json.loads(
        chat_body(stream=True, stream_options={"include_usage": True}))
    assert not paid.drop_usage
    # and the client gets the usage chunk it asked for
    assert tap_output(paid) == USAGE_CHUNK + b"data: [DONE]\n\n"
    meter.release(paid, "test")
    audit(ledger)


@pytest.mark.parametrize(("path", "body"), [
    ("/chat/completions", {}),
    ("/chat/completions", {"stream": False}),
    ("/chat/completions", {"stream_options": {"include_usage": False}}),
    ("/responses", {"stream": True}),
    ("/embeddings", {"stream": True, "input": "hello"}),
])
def test_upstream_body_is_the_same_fields_re_serialised(meter, ledger, path, body):
    paid = admitted(meter, ledger, path, **body)
    assert paid.upstream_body is not None
    assert json.loads(paid.upstream_body) == json.loads(chat_body(**body))
    assert not paid.drop_usage
    meter.release(paid, "test")
    audit(ledger)
