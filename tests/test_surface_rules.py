"""Issue 11's rules one function at a time: the reading of a request that the proxy prices and
the upstream gets (``metering/surface.py``), the bounds on what a request may cost and what
its usage is charged (``Meter``, ``Pricing``), and what the proxy's first look refuses
(``proxy/gate.py``, ``proxy/webview.py``). The end-to-end corpus is ``test_surface.py``."""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.stats import read_stats
from routstr_addon.errors import ApiError
from routstr_addon.ledger import Ledger, hash_key
from routstr_addon.metering.meter import Meter
from routstr_addon.metering.pricing import Pricing, load_models
from routstr_addon.metering.surface import (
    ENDPOINTS,
    ResponseDecoder,
    canonical_endpoint,
    check_raw,
    decode_body,
    parse_fixed_prices,
    parse_json,
    read_shape,
    secret_in_query,
    upstream_body,
)
from routstr_addon.metering.usage import Usage, parse_usage
from routstr_addon.proxy.gate import check_head
from routstr_addon.proxy.webview import redact_url
from routstr_addon.settings import load_config

from .conftest import EXCHANGE_FEE, MODELS, PROVIDER_FEE, RATE, expected_msat
from .real_upstream import nginx_normalise

# --- the path ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/v1/chat/completions", "/chat/completions", "/v1/chat/%63ompletions",
    "/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1//chat/completions",
    "/v1/./chat/completions", "/v1/x/../chat/completions", "/v1/%2e/chat/completions",
    "/v1/x/%2e%2e/chat/completions", "/v1/chat/completions/.", "/v1/chat/completions/",
    "/v1/models/../chat/completions", "/v1/CHAT/COMPLETIONS", "/v1/Chat/Completions/",
    "/v1/chat/completions;x=1", "/v1/chat;a/completions;b", "/v1\\chat\\completions",
    "/%76%31/chat/completions",
])
def test_every_spelling_of_an_endpoint_is_that_endpoint(path: str) -> None:
    assert canonical_endpoint(path) == "chat/completions"


@pytest.mark.parametrize("path", [
    "/v1/chat%252Fcompletions",  # encoded twice: an upstream decoding twice reads another path
    "/../v1/chat/completions",  # above the root
    "/v1/chat/compl%C3%A9tions",  # not ASCII
    "/v1/chat/completions%00", "/v1/chat/completions%3F", "/v1/chat/completions%23x",
])
def test_spellings_that_cannot_be_read_as_one_name_are_none(path: str) -> None:
    assert canonical_endpoint(path) is None


@st.composite
def spelt(draw: st.DrawFn) -> tuple[str, str]:
    """An endpoint and a path spelling it as a lenient upstream would still route it."""
    name = draw(st.sampled_from(sorted(ENDPOINTS)))
    out = "/v1"
    for segment in name.split("/"):
        out += draw(st.sampled_from(["/", "//", "/./", "/x/../", "%2F", "/%2e/"]))
        for ch in segment:
            how = draw(st.sampled_from(["keep"] * 5 + ["upper", "percent"]))
            out += ch.upper() if how == "upper" else f"%{ord(ch):02X}" if how == "percent" \
                else ch
        if draw(st.booleans()):
            out += ";p=1"
    return name, out + draw(st.sampled_from(["", "/", "/.", "//"]))


def _upstream_route(path: str) -> str | None:
    """How the real upstream (nginx in front, servlet-style params, case-insensitive routes,
    trailing slashes accepted) routes a path: the endpoint below /v1, if any."""
    normalised = nginx_normalise(path.encode())
    if normalised is None:
        return None
    routed = "/".join(s.split(";", 1)[0] for s in normalised.split("/")).lower().rstrip("/")
    return routed.removeprefix("/v1/") if routed.startswith("/v1/") else None


@settings(max_examples=400, deadline=None)
@given(case=spelt())
def test_whatever_endpoint_a_lenient_upstream_routes_to_is_the_one_priced(
        case: tuple[str, str]) -> None:
    name, path = case
    assert _upstream_route(path) == name
    assert canonical_endpoint(path) == name


@settings(max_examples=400, deadline=None)
@given(path=st.text(alphabet="/.;%2eEfFcCvV1aA\\x", max_size=30).map(lambda p: "/" + p))
def test_no_spelling_is_priced_as_one_endpoint_and_routed_to_another(path: str) -> None:
    priced = canonical_endpoint(path)
    routed = _upstream_route(path)
    if priced in ENDPOINTS and routed in ENDPOINTS:
        assert priced == routed


def test_fixed_price_endpoints_parse_to_canonical_names() -> None:
    assert parse_fixed_prices(" Images/Generations=50 , audio/speech=10,") == {
        "images/generations": 50, "audio/speech": 10}
    assert parse_fixed_prices("") == {}
    for bad in ("images", "images=x", "chat/completions=5", "=4"):
        with pytest.raises(ValueError):
            parse_fixed_prices(bad)


@pytest.mark.parametrize(("query", "secret"), [
    ("api_key=sk-abcdef", True), ("key=cashuBo2F0", True), ("t=cashuAeyJ0", True),
    ("x=cashu%3AcashuB", True), ("sk-abc", True), ("a=1&auth=Bearer%20sk-x", True),
    ("task-id=7&n=2", False), ("api-version=2024-10-01", False), ("", False),
])
def test_secret_in_query(query: str, secret: bool) -> None:
    assert secret_in_query(query) is secret


def test_check_head_refuses_huge_heads_and_secrets_in_the_query() -> None:
    assert check_head("/v1/chat/completions?x=1", ((b"a", b"b"),)) is None
    big = check_head("/v1/chat/completions", ((b"x-big", b"a" * (64 << 10)),))
    assert big is not None and big.status == 431
    many = check_head("/", tuple((b"x-h%d" % i, b"v" * 24) for i in range(3000)))
    assert many is not None and many.status == 431
    secret = check_head("/v1/balance/create?initial_balance_token=cashuBxyz", ())
    assert secret is not None and secret.status == 400 and "header" in secret.message


def test_mitmweb_redaction_covers_paths_and_query_strings() -> None:
    assert redact_url("/v1/x?initial_balance_token=cashuBabc&n=1") == \
        "/v1/x?initial_balance_token=cashuB[redacted]&n=1"
    assert redact_url("/v1/balance/sk-0123abcd/info") == "/v1/balance/sk-[redacted]/info"
    assert redact_url("/v1/x?t=cashu%3AcashuAabc") == "/v1/x?t=cashu%3A[redacted]"
    assert redact_url("/v1/chat/completions") == "/v1/chat/completions"


# --- the body ---------------------------------------------------------------------------------

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi " * 50}]}).encode()


@pytest.mark.parametrize(("coding", "pack"), [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", lambda d: zlib.compress(d)[2:-4]),  # raw deflate, as some clients send it
    ("br", brotli.compress),
    ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
    ("gzip, br", lambda d: brotli.compress(gzip.compress(d))),
    ("identity", lambda d: d),
])
def test_request_bodies_are_decoded(coding: str, pack: Any) -> None:
    assert decode_body(pack(BODY), coding, 1 << 20) == BODY


@pytest.mark.parametrize("coding", ["compress", "x-snappy", "gzip, pack200-gzip", "utf8"])
def test_request_bodies_in_other_codings_are_415(coding: str) -> None:
    with pytest.raises(ApiError) as raised:
        decode_body(BODY, coding, 1 << 20)
    assert raised.value.status == 415


@pytest.mark.parametrize(("coding", "pack"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress),
    ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
])
def test_the_size_limit_applies_after_decoding_and_stops_a_bomb(coding: str, pack: Any) -> None:
    bomb = pack(b" " * (8 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(ApiError) as raised:
        decode_body(bomb, coding, 1 << 20)
    assert raised.value.status == 413


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_body_that_is_not_its_coding_is_400(coding: str) -> None:
    with pytest.raises(ApiError) as raised:
        decode_body(gzip.compress(BODY)[:-12] if coding == "gzip" else b"not compressed!",
                    coding, 1 << 20)
    assert raised.value.status == 400


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "a", "n": 1, "n": 4}', "n"),
    (b'{"model": "a", "stream_options": {"include_usage": false, "include_usage": true}}',
     "include_usage"),
])
def test_duplicate_keys_are_400_naming_the_key(raw: bytes, param: str) -> None:
    with pytest.raises(ApiError) as raised:
        parse_json(raw)
    assert (raised.value.status, raised.value.param) == (400, param)


@pytest.mark.parametrize("raw", [b"[1]", b"not json", b'"x"', b"\xff\xfe{}", b""])
def test_bodies_that_are_not_a_json_object_are_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as raised:
        parse_json(raw)
    assert raised.value.status == 400


CHAT_BODY: dict[str, Any] = {"model": "m", "messages": []}


@pytest.mark.parametrize(("kind", "extra", "param"), [
    ("chat", {"n": "4"}, "n"), ("chat", {"n": 4.0}, "n"), ("chat", {"n": True}, "n"),
    ("chat", {"n": -1}, "n"), ("chat", {"n": 0}, "n"), ("completions", {"best_of": "4"},
                                                         "best_of"),
    ("chat", {"max_tokens": "500"}, "max_tokens"), ("chat", {"max_tokens": 5.0}, "max_tokens"),
    ("chat", {"max_tokens": -5}, "max_tokens"),
    ("chat", {"max_completion_tokens": "1"}, "max_completion_tokens"),
    ("responses", {"max_output_tokens": "500"}, "max_output_tokens"),
    ("chat", {"stream": "true"}, "stream"), ("chat", {"stream": 1}, "stream"),
    ("chat", {"messages": "hi"}, "messages"),
    ("completions", {"prompt": {"text": "x"}}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("embeddings", {"input": 12}, "input"), ("responses", {"input": 5}, "input"),
    ("chat", {"Model": "x"}, "Model"), ("chat", {"N": 4}, "N"),
    ("chat", {"MAX_TOKENS": 500}, "MAX_TOKENS"), ("chat", {"Stream": True}, "Stream"),
    ("messages", {"thinking": {"type": "enabled", "budget_tokens": "300"}}, "thinking"),
    # what changes which model runs or how the provider bills, unpriced
    ("chat", {"provider": {"order": ["x"]}}, "provider"), ("chat", {"route": "cheapest"}, "route"),
    ("chat", {"models": "a"}, "models"), ("chat", {"service_tier": "priority"}, "service_tier"),
    ("responses", {"background": True}, "background"),
    ("responses", {"background": "yes"}, "background"),
    ("responses", {"tools": [{"type": "web_search"}]}, "tools"),
    ("responses", {"tools": [{"type": "file_search"}]}, "tools"),
    ("responses", {"tools": [{"type": "code_interpreter"}]}, "tools"),
    ("messages", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),
    ("chat", {"web_search_options": {}}, "web_search_options"),
    ("chat", {"plugins": [{"id": "web"}]}, "plugins"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
])
def test_cost_fields_are_type_checked_and_billing_fields_refused_naming_them(
        kind: str, extra: dict[str, Any], param: str) -> None:
    base: dict[str, Any] = {"chat": CHAT_BODY, "messages": {**CHAT_BODY, "max_tokens": 500},
            "completions": {"model": "m", "prompt": "x"},
            "embeddings": {"model": "m", "input": "x"},
            "responses": {"model": "m", "input": "x"}}[kind]
    with pytest.raises(ApiError) as raised:
        read_shape(kind, {**base, **extra})
    assert (raised.value.status, raised.value.param) == (400, param)
    assert param in raised.value.message


def test_a_one_hour_prompt_cache_is_refused() -> None:
    raw = json.dumps({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]})
    with pytest.raises(ApiError) as raised:
        check_raw("messages", raw.encode())
    assert raised.value.param == "cache_control"
    check_raw("chat", raw.encode())  # only Anthropic's API has it


def test_what_is_priced_is_accepted() -> None:
    fine = {**CHAT_BODY, "service_tier": "flex", "route": "fallback", "models": ["b"],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "modalities": ["text"], "background": False, "stream": None, "n": None}
    assert read_shape("chat", fine).models == ("m", "b")
    read_shape("messages", {**CHAT_BODY, "max_tokens": 900, "tools": [
        {"name": "f", "input_schema": {}}, {"type": "bash_20250124", "name": "bash"},
        {"type": "custom", "name": "g"}], "thinking": {"type": "enabled", "budget_tokens": 500}})


@pytest.mark.parametrize(("kind", "extra", "cap", "choices", "prompts"), [
    ("chat", {}, None, 1, 1),
    ("chat", {"max_tokens": 10, "max_completion_tokens": 400}, 400, 1, 1),
    ("chat", {"max_completion_tokens": 0, "max_tokens": 500}, 500, 1, 1),  # 0: no cap
    ("chat", {"max_tokens": 0}, None, 1, 1),
    ("chat", {"n": 3, "best_of": 5}, None, 5, 1),
    ("completions", {"prompt": ["a"] * 50, "n": 3}, None, 3, 50),
    ("completions", {"prompt": [1, 2, 3]}, None, 1, 1),  # one prompt of token ids
    ("completions", {"prompt": [[1, 2], [3]]}, None, 1, 2),
    ("embeddings", {"input": ["a"] * 200}, None, 1, 200),
])
def test_every_multiplier_is_read(kind: str, extra: dict[str, Any], cap: int | None,
                                  choices: int, prompts: int) -> None:
    base = {"completions": {"model": "m", "prompt": "x"},
            "embeddings": {"model": "m", "input": "x"}}.get(kind, CHAT_BODY)
    shape = read_shape(kind, {**base, **extra})
    assert (shape.cap, shape.choices, shape.prompts) == (cap, choices, prompts)


def test_the_upstream_body_asks_every_stream_for_its_usage() -> None:
    body = {**CHAT_BODY, "stream": True, "stream_options": {"INCLUDE_USAGE": False, "x": 1}}
    sent, drop = upstream_body("chat", body)
    assert json.loads(sent)["stream_options"] == {"x": 1, "include_usage": True} and drop
    sent, drop = upstream_body("completions", {"model": "m", "prompt": "p", "stream": True})
    assert json.loads(sent)["stream_options"] == {"include_usage": True} and drop
    asked = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    assert upstream_body("chat", asked) == (json.dumps(asked).encode(), False)
    assert upstream_body("responses", {"model": "m", "stream": True})[1] is False


# --- answers ----------------------------------------------------------------------------------

SSE = b"".join(b'data: {"choices": [{"delta": {"content": "word %d "}}]}\n\n' % i
               for i in range(200)) + b"data: [DONE]\n\n"


def _packer(coding: str) -> Any:
    if coding == "gzip":
        return zlib.compressobj(wbits=31)
    if coding == "deflate":
        return zlib.compressobj()
    return None


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_streams_are_decoded_piece_by_piece(coding: str) -> None:
    pieces = [SSE[i:i + 97] for i in range(0, len(SSE), 97)]
    if coding in ("gzip", "deflate"):
        z = _packer(coding)
        sent = [z.compress(p) + z.flush(zlib.Z_SYNC_FLUSH) for p in pieces] + [z.flush()]
    elif coding == "br":
        b = brotli.Compressor()
        sent = [bytes(b.process(p) + b.flush()) for p in pieces] + [bytes(b.finish())]
    else:
        zs = zstandard.ZstdCompressor().compressobj()
        sent = [zs.compress(p) + zs.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for p in pieces]
        sent.append(zs.flush())
    decoder = ResponseDecoder(coding)
    out = b""
    for piece, chunk in zip(pieces, sent, strict=False):
        out += decoder.feed(chunk)
        assert SSE.startswith(out) and len(out) >= len(piece) - 0  # readable as it comes
    out += decoder.feed(sent[-1])
    assert out == SSE
    with pytest.raises(ValueError):
        ResponseDecoder("compress")


# --- what usage is charged ----------------------------------------------------------------------


def test_anthropic_usage_counts_cache_reads_and_writes_in_the_prompt() -> None:
    usage = parse_usage({"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 600,
                         "cache_creation_input_tokens": 40})
    assert usage == Usage(650, 7, 600, written_tokens=40)
    assert parse_usage({"input_tokens": -3, "output_tokens": 7}) == Usage(0, 7, suspect=True)


@pytest.fixture
def meter(tmp_path: Path) -> Any:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    models = tmp_path / "models.json"
    models.write_text(json.dumps(MODELS))
    config = load_config({"DATA_DIR": str(tmp_path), "EXCHANGE_FEE": EXCHANGE_FEE,
                          "UPSTREAM_PROVIDER_FEE": PROVIDER_FEE, "MODELS_PATH": str(models)})
    pricing = Pricing(load_models(models), config.exchange_fee, config.upstream_provider_fee)
    pricing.set_rate(RATE)
    yield Meter(config, ledger, pricing)
    ledger.close()


def _paid(meter: Meter, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    key, _ = meter.ledger.create_key(10**9)
    return meter.admit("r1", f"Bearer {key}", path, json.dumps(body).encode())


PROMPT = {"model": "test/model", "messages": [{"role": "user", "content": "x" * 400}],
          "max_tokens": 100}


def test_impossible_usage_is_charged_at_least_the_estimate(meter: Meter) -> None:
    paid = _paid(meter, PROMPT)
    cost, note = meter.bounded_cost(paid, Usage(0, 0, suspect=True), delivered_chars=40)
    assert cost == expected_msat("test/model", 100, 10) and note  # 400 + 40 chars / 4
    honest, note = meter.bounded_cost(paid, Usage(3, 2))  # low but possible: as reported
    assert honest == expected_msat("test/model", 3, 2) and note is None
    meter.release(paid, "test")


def test_usage_beyond_the_requests_limits_is_clamped_to_its_reservation(meter: Meter) -> None:
    paid = _paid(meter, PROMPT)
    cost, note = meter.bounded_cost(paid, Usage(10**12, 10**12))
    assert cost == paid.reserved_msat and note
    meter.release(paid, "test")


def test_an_under_reservation_is_charged_beyond_and_counted(meter: Meter) -> None:
    key, _ = meter.ledger.create_key(10**9)
    quote = meter.quote("chat/completions", json.dumps(PROMPT).encode())
    # as if a pricing rule had missed something: 1 msat reserved
    paid = meter.reserve(dataclasses.replace(quote, amount_msat=1), "r1", hash_key(key))
    usage = Usage(50, 100)
    assert meter.bounded_cost(paid, usage) == (expected_msat("test/model", 50, 100), None)
    done = meter.settle(paid, usage)
    assert done is not None and done.charged_msat == expected_msat("test/model", 50, 100)
    assert meter.ledger.check() == []
    stats = read_stats(meter.ledger, 1)
    assert stats["under_reservations"] == 1
    assert stats["under_reserved_msat"] == done.charged_msat - done.reserved_msat > 0


def test_fallback_models_are_reserved_and_charged_at_the_dearest(meter: Meter) -> None:
    cheap_first = {**PROMPT, "model": "test/embed", "models": ["test/model"]}
    paid = _paid(meter, cheap_first)
    alone = meter.quote("chat/completions", json.dumps({**PROMPT}).encode())
    assert paid.reserved_msat >= alone.amount_msat
    cost, _ = meter.bounded_cost(paid, Usage(10, 100))
    assert cost == expected_msat("test/model", 10, 100)
    meter.release(paid, "test")


def test_a_hang_up_after_the_upstream_had_the_request_pays_the_prompt(meter: Meter) -> None:
    paid = _paid(meter, PROMPT)
    done = meter.abort(paid, "Client disconnected.", reached=True)
    assert done is not None and done.charged_msat == expected_msat("test/model", 100, 0)
    assert meter.ledger.check() == []


def test_a_request_that_never_reached_the_upstream_is_free(meter: Meter) -> None:
    paid = _paid(meter, PROMPT)
    done = meter.abort(paid, "Client disconnected.", reached=False)
    assert done is not None and done.charged_msat == 0


def test_unsupported_endpoints_are_404_naming_what_is_supported(meter: Meter) -> None:
    for path in ("/v1/batches", "/v1/files", "/v1/realtime/sessions", "/v1/Batches/",
                 "/v1/chat/completions/..%2F..%2Fbatches", "/v1/images/generations"):
        with pytest.raises(ApiError) as raised:
            meter.endpoint(path)
        assert (raised.value.status, raised.value.code) == (404, "unsupported_endpoint")
        assert "/v1/chat/completions" in raised.value.message
    assert meter.endpoint("/v1/Messages/") == "messages"


def test_a_swept_fixed_price_request_is_charged_its_price(meter: Meter) -> None:
    assert meter.cost_by_name(None, Usage(1, 50, estimated=True), ceiling=7000) == 7000
