"""The real upstream (tests/real_upstream.py) reads requests as production servers do and bills
what it read: checked directly, without the proxy, so the pending surface tests stand on an
upstream whose own behaviour is pinned."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from typing import Any

import brotli
import httpcore
import httpx
import pytest
import zstandard

from .conftest import MODELS
from .real_upstream import Bill, RealUpstream, Served, decode_body, nginx_normalise

PROMPT = "please describe these things"  # four words: four prompt tokens


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "test/model", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 5, **extra}


@pytest.fixture(scope="module")
def real() -> Iterator[RealUpstream]:
    with RealUpstream(MODELS["data"]) as upstream:
        yield upstream


def post(upstream: RealUpstream, target: str, body: Any = None, *,
         headers: dict[str, str] | None = None) -> tuple[httpx.Response, Served]:
    """One request with its target sent byte for byte (httpx would resolve dot segments), and
    how the upstream saw it."""
    mark = upstream.mark()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    port = int(upstream.url.rsplit(":", 1)[1])
    fields = {"content-type": "application/json", "accept-encoding": "identity",
              "content-length": str(len(content)), **(headers or {})}
    with httpcore.ConnectionPool() as pool:
        raw = pool.request("POST", httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=port,
                                                target=target.encode()),
                           headers=list(fields.items()), content=content)
    upstream.wait_idle()
    (served,) = upstream.since(mark)
    return httpx.Response(raw.status, headers=raw.headers, content=raw.content), served


def test_nginx_normalisation_decodes_merges_and_resolves() -> None:
    assert nginx_normalise(b"/v1//chat/./completions") == "/v1/chat/completions"
    assert nginx_normalise(b"/v1/x/%2e%2e/chat%2Fcompletions") == "/v1/chat/completions"
    assert nginx_normalise(b"/v1/chat/completions/") == "/v1/chat/completions/"
    assert nginx_normalise(b"/v1/chat/completions/.") == "/v1/chat/completions/"
    assert nginx_normalise(b"/../etc/passwd") is None  # nginx answers 400


@pytest.mark.parametrize(("target", "behaviour", "routed"), [
    ("/v1/chat%2Fcompletions", {}, True),  # uvicorn decodes %2F before Starlette routes
    ("/v1/chat/%63ompletions", {}, True),
    ("/v1//chat/completions", {}, False),
    ("/v1//chat/completions", {"normalise_paths": True}, True),
    ("/v1/x/../chat/completions", {"normalise_paths": True}, True),
    ("/v1/CHAT/Completions", {}, False),
    ("/v1/CHAT/Completions", {"case_insensitive_routes": True}, True),
    ("/v1/chat/completions;jsessionid=1", {"strip_path_params": True}, True),
    ("/v1/chat/completions/", {}, True),
    ("/v1/chat/completions/", {"trailing_slash": "strict"}, False),
])
def test_paths_are_routed_as_the_configured_stack_reads_them(
        real: RealUpstream, target: str, behaviour: dict[str, Any], routed: bool) -> None:
    with real.behave(**behaviour):
        resp, served = post(real, target, chat())
    assert served.wire_path == target
    assert (resp.status_code == 200) is routed, resp.text
    assert served.billed is routed


def test_a_trailing_slash_can_be_redirected_instead(real: RealUpstream) -> None:
    with real.behave(trailing_slash="redirect"):
        resp, served = post(real, "/v1/chat/completions/", chat())
    assert resp.status_code == 307 and resp.headers["location"].endswith("/v1/chat/completions")
    assert not served.billed


def test_pydantic_lax_types_and_vllms_cap_rule_decide_the_work(real: RealUpstream) -> None:
    body = chat(n="3", max_tokens="7", stream=0)
    resp, served = post(real, "/v1/chat/completions", body)
    assert len(resp.json()["choices"]) == 3
    assert served.bills == [Bill("test/model", 4, 21)]
    assert served.body is not None and served.body["n"] == 3  # as the handler read it
    # max_completion_tokens: 0 is "not set": max_tokens counts (vLLM: the first non-zero)
    _, served = post(real, "/v1/chat/completions", chat(n=4.0, max_completion_tokens=0,
                                                        max_tokens=6))
    assert served.bills == [Bill("test/model", 4, 24)]
    _, served = post(real, "/v1/chat/completions", chat(reasoning_effort="low", max_tokens=40))
    assert served.bills == [Bill("test/model", 4, 40)]  # 16 hidden reasoning + 24 shown


def test_a_string_stream_streams_and_usage_comes_only_when_asked(real: RealUpstream) -> None:
    resp, served = post(real, "/v1/chat/completions", chat(stream="true"))
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert '"usage"' not in resp.text and resp.text.endswith("data: [DONE]\n\n")
    assert served.bills == [Bill("test/model", 4, 5)]
    resp, _ = post(real, "/v1/chat/completions",
                   chat(stream=1, stream_options={"include_usage": "true"}))
    assert '"usage": {"prompt_tokens": 4, "completion_tokens": 5' in resp.text


def test_prompt_lists_best_of_and_embedding_inputs_multiply_the_work(
        real: RealUpstream) -> None:
    resp, served = post(real, "/v1/completions", {
        "model": "test/model", "prompt": [PROMPT, "more words"], "n": 2, "best_of": 3,
        "max_tokens": 4})
    assert [c["index"] for c in resp.json()["choices"]] == [0, 1, 2, 3]  # prompts x n
    assert served.bills == [Bill("test/model", 6, 2 * 3 * 4)]  # best_of candidates are work
    _, served = post(real, "/v1/embeddings", {"model": "test/embed", "input": [PROMPT] * 5})
    assert served.bills == [Bill("test/embed", 20, 0)]


def test_json_keys_last_duplicate_wins_and_go_like_case_folding(real: RealUpstream) -> None:
    raw = b'{"model": "test/model", "messages": [{"role": "user", "content": "hi"}], ' \
          b'"max_tokens": 2, "max_tokens": 9, "N": 3}'
    _, served = post(real, "/v1/chat/completions", raw)
    assert served.bills == [Bill("test/model", 1, 9)]  # "N" is not n for Python
    with real.behave(case_insensitive_keys=True):
        _, served = post(real, "/v1/chat/completions", raw)
    assert served.bills == [Bill("test/model", 1, 27)]  # ... but is for Go


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "gzip, br"])
def test_request_bodies_are_decoded_by_their_content_encoding(real: RealUpstream,
                                                              coding: str) -> None:
    data = json.dumps(chat()).encode()
    for one in coding.split(", "):
        data = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
                "zstd": zstandard.ZstdCompressor().compress}[one](data)
    resp, served = post(real, "/v1/chat/completions", data,
                        headers={"content-encoding": coding})
    assert resp.status_code == 200 and served.billed


def test_an_unknown_request_encoding_is_refused_415(real: RealUpstream) -> None:
    resp, served = post(real, "/v1/chat/completions", json.dumps(chat()).encode(),
                        headers={"content-encoding": "compress"})
    assert resp.status_code == 415 and not served.billed


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("stream", [False, True])
def test_answers_are_compressed_when_the_client_allows_it(real: RealUpstream, coding: str,
                                                          stream: bool) -> None:
    with httpx.Client(timeout=10) as client, client.stream(
            "POST", f"{real.url}/v1/chat/completions", json=chat(stream=stream),
            headers={"accept-encoding": f"{coding}, identity;q=0.5"}) as resp:
        pieces = list(resp.iter_raw())
    assert resp.headers["content-encoding"] == coding
    body = decode_body(b"".join(pieces), coding)
    assert body.endswith(b"data: [DONE]\n\n" if stream else b"}")
    if stream:  # flushed as it goes: the stream came in many decodable pieces
        assert len(pieces) > 3
    with real.behave(compress_anyway="gzip"):
        resp, _ = post(real, "/v1/chat/completions", chat())
    assert resp.headers["content-encoding"] == "gzip"


@pytest.mark.parametrize(("mode", "expected"), [("negative", -5), ("absurd", 10**12),
                                                ("none", None)])
def test_usage_lies_change_the_report_not_the_bill(real: RealUpstream, mode: str,
                                                   expected: int | None) -> None:
    with real.behave(usage=mode):
        resp, served = post(real, "/v1/chat/completions", chat())
    usage = resp.json().get("usage")
    assert (usage["completion_tokens"] if usage else None) == expected
    assert served.bills == [Bill("test/model", 4, 5)]


def test_anthropic_messages_report_cache_tokens(real: RealUpstream) -> None:
    system = [{"type": "text", "text": "cached words " * 10 + "once",
               "cache_control": {"type": "ephemeral"}}]
    body = {"model": "test/model", "max_tokens": 8, "system": system,
            "messages": [{"role": "user", "content": PROMPT}]}
    first, _ = post(real, "/v1/messages", body)
    second, served = post(real, "/v1/messages", {**body, "stream": True})
    assert first.json()["usage"] == {"input_tokens": 4, "output_tokens": 8,
                                     "cache_creation_input_tokens": 21,
                                     "cache_read_input_tokens": 0}
    assert '"cache_read_input_tokens": 21' in second.text
    assert '"type": "message_delta"' in second.text
    assert served.bills == [Bill("test/model", 25, 8)]


def test_limits_and_model_names_are_checked_like_a_provider(real: RealUpstream) -> None:
    resp, served = post(real, "/v1/chat/completions", chat(max_tokens=513))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"
    resp, _ = post(real, "/v1/chat/completions", chat(model="nope"))
    assert resp.status_code == 404
    with real.behave(down=frozenset({"test/embed"})):
        _, served = post(real, "/v1/chat/completions",
                         chat(model="test/embed", models=["test/model"]))
    assert served.bills == [Bill("test/model", 4, 5)]  # OpenRouter's fallback ran


def test_work_is_billed_after_the_client_hung_up_and_background_work_later(
        real: RealUpstream) -> None:
    mark = real.mark()
    with real.behave(latency=0.5), pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{real.url}/v1/chat/completions", json=chat(), timeout=0.1)
    real.wait_idle()
    assert real.since(mark)[0].bills == [Bill("test/model", 4, 5)]
    resp, served = post(real, "/v1/responses", {"model": "test/model", "input": PROMPT,
                                                "max_output_tokens": 9, "background": True})
    assert resp.json()["usage"] is None and served.bills == [Bill("test/model", 4, 9)]


def test_endpoints_no_proxy_can_meter_bill_their_work(real: RealUpstream) -> None:
    line = json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
                       "body": chat(max_tokens=50)})
    file_id = real.add_file("\n".join([line] * 3).encode())
    resp, served = post(real, "/v1/batches", {"input_file_id": file_id,
                                              "endpoint": "/v1/chat/completions"})
    assert resp.json()["request_counts"]["completed"] == 3
    assert served.bills == [Bill("test/model", 4, 50)] * 3
    resp, served = post(real, "/v1/images/generations", {"prompt": PROMPT, "n": 2})
    assert served.bills == [Bill("test/model", 4, 2000)]
