"""Unit tests of routstr_addon.metering.usage: usage in JSON answers and in SSE streams."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr_addon.metering.usage import (
    SSETap,
    Usage,
    completion_text_length,
    estimate_tokens,
    prompt_text_length,
    usage_from_json,
)

# --- usage_from_json ------------------------------------------------------------------------

CHAT = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "The sky is blue.", "refusal": None,
                    "annotations": []},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}


def test_usage_from_chat_completion():
    assert usage_from_json(CHAT) == Usage(1117, 46, 0)


def test_usage_from_chat_completion_with_cached_tokens():
    body = json.loads(json.dumps(CHAT))
    body["usage"]["prompt_tokens_details"]["cached_tokens"] = 1024
    assert usage_from_json(body) == Usage(1117, 46, 1024)


def test_usage_from_chat_completion_with_null_details():
    body = json.loads(json.dumps(CHAT))
    body["usage"]["prompt_tokens_details"] = None
    assert usage_from_json(body) == Usage(1117, 46, 0)


def test_usage_from_legacy_completion():
    body = {
        "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7", "object": "text_completion",
        "created": 1589478378, "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    assert usage_from_json(body) == Usage(5, 7, 0)


def test_usage_from_embeddings():
    body = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.0023064255, -0.009327292], "index": 0}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert usage_from_json(body) == Usage(8, 0, 0)


RESPONSES = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "model": "gpt-4o-2024-08-06",
    "output": [{
        "type": "message", "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
        "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "In a peaceful grove...", "annotations": []}],
    }],
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 380,
    },
}


def test_usage_from_responses_api():
    assert usage_from_json(RESPONSES) == Usage(328, 52, 256)


def test_usage_from_responses_api_event_carrying_response():
    event = {"type": "response.completed", "sequence_number": 12, "response": RESPONSES}
    assert usage_from_json(event) == Usage(328, 52, 256)


def test_usage_from_responses_api_without_details():
    assert usage_from_json({"usage": {"input_tokens": 3, "output_tokens": 4}}) == Usage(3, 4, 0)


@pytest.mark.parametrize("body", [
    None, "usage", 42, [CHAT], {}, {"usage": None}, {"usage": "12"}, {"usage": []},
    {"usage": {}}, {"usage": {"total_tokens": 12}},
    {"error": {"message": "Rate limit", "type": "rate_limit_error"}},
    {"type": "response.created", "response": {"id": "resp_1", "usage": None}},
    {"response": "done"},
])
def test_usage_from_garbage_is_none(body):
    assert usage_from_json(body) is None


def test_usage_ignores_non_integer_counts():
    usage = usage_from_json({"usage": {"prompt_tokens": "12", "completion_tokens": True,
                                       "prompt_tokens_details": {"cached_tokens": -3}}})
    assert usage == Usage(0, 0, 0, suspect=True)  # charged at least the meter's estimate


# --- estimates ------------------------------------------------------------------------------


@pytest.mark.parametrize(("chars", "tokens"), [
    (0, 0), (-5, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (4000, 1000), (4001, 1001),
])
def test_estimate_tokens(chars, tokens):
    assert estimate_tokens(chars) == tokens


def test_prompt_text_length_counts_text_not_bookkeeping():
    body = {
        "model": "gpt-4o-mini",  # not prompt
        "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "Be brief."},  # 9
            {"role": "user", "content": [
                {"type": "text", "text": "Hello there"},  # 11
                {"type": "image_url", "image_url": {"url": "http://x.test/a.png"}},  # 19
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}},  # 1 + 2
            ]},
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather",  # 11 + 7
            "parameters": {"type": "object", "properties": {}}}}],
    }
    assert prompt_text_length(body) == 9 + 11 + 19 + 3 + 18


def test_prompt_text_length_of_other_endpoints():
    assert prompt_text_length({"model": "m", "prompt": "Say this is a test"}) == 18
    assert prompt_text_length({"model": "m", "prompt": ["ab", "cde"]}) == 5
    assert prompt_text_length({"model": "m", "input": "The food was delicious"}) == 22
    assert prompt_text_length({"model": "m", "instructions": "Be kind.",
                               "input": [{"role": "user", "content": "Hi"}]}) == 10
    assert prompt_text_length({"model": "m", "system": "abc", "messages": []}) == 3
    assert prompt_text_length({"model": "m", "max_tokens": 5}) == 0


def test_completion_text_length():
    assert completion_text_length(CHAT) == len("The sky is blue.")
    assert completion_text_length(RESPONSES) >= len("In a peaceful grove...")
    assert completion_text_length({"data": []}) == 0
    assert completion_text_length("text") == 0


# --- SSETap: realistic streams --------------------------------------------------------------


def sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chat_chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = True,
               **extra: Any) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
        "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:  # with stream_options.include_usage every chunk carries "usage": null
        chunk["usage"] = None
    chunk.update(extra)
    return chunk


USAGE_CHUNK = {
    "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
    "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_44709d6fcb", "choices": [],
    "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0,
                                            "rejected_prediction_tokens": 0}},
}

WORDS = ["Hello", "!", " How", " can", " I", " assist", " you", " today", "?"]
CHAT_HEAD = b"".join(
    [sse(chat_chunk({"role": "assistant", "content": "", "refusal": None}))]
    + [sse(chat_chunk({"content": w})) for w in WORDS]
    + [sse(chat_chunk({}, finish="stop"))]
)
CHAT_USAGE = sse(USAGE_CHUNK)
CHAT_STREAM = CHAT_HEAD + CHAT_USAGE + DONE
CHAT_TEXT = sum(len(w) for w in WORDS)

TOOL_ARGS = ['{"', 'location', '":"', 'Paris', ', France', '"}']
TOOL_STREAM = b"".join(
    [sse(chat_chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}], "refusal": None}))]
    + [sse(chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}))
       for a in TOOL_ARGS]
    + [sse(chat_chunk({}, finish="tool_calls"))]
) + CHAT_USAGE + DONE

LEGACY_STREAM = b"".join(
    sse({"id": "cmpl-1", "object": "text_completion", "created": 1,
         "model": "gpt-3.5-turbo-instruct",
         "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": f}],
         "usage": None})
    for t, f in [("This", None), (" is", None), (" a test", "length")]
) + sse({"id": "cmpl-1", "object": "text_completion", "created": 1,
         "model": "gpt-3.5-turbo-instruct", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}) + DONE

RESPONSE_OBJ = {"id": "resp_1", "object": "response", "created_at": 1741290958,
                "status": "in_progress", "model": "gpt-4.1-2025-04-14", "output": [],
                "usage": None}
RESP_DELTAS = ["Hi", " there", "!"]
RESPONSES_STREAM = b"".join(
    [sse({"type": "response.created", "sequence_number": 0, "response": RESPONSE_OBJ},
         "response.created"),
     sse({"type": "response.in_progress", "sequence_number": 1, "response": RESPONSE_OBJ},
         "response.in_progress"),
     sse({"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
          "item": {"id": "msg_1", "type": "message", "status": "in_progress",
                   "role": "assistant", "content": []}}, "response.output_item.added"),
     sse({"type": "response.content_part.added", "sequence_number": 3, "item_id": "msg_1",
          "output_index": 0, "content_index": 0,
          "part": {"type": "output_text", "text": "", "annotations": []}},
         "response.content_part.added")]
    + [sse({"type": "response.output_text.delta", "sequence_number": 4 + i, "item_id": "msg_1",
            "output_index": 0, "content_index": 0, "delta": d}, "response.output_text.delta")
       for i, d in enumerate(RESP_DELTAS)]
    + [sse({"type": "response.output_text.done", "sequence_number": 7, "item_id": "msg_1",
            "output_index": 0, "content_index": 0, "text": "Hi there!"},
           "response.output_text.done"),
       sse({"type": "response.completed", "sequence_number": 8, "response": {
           **RESPONSE_OBJ, "status": "completed",
           "output": [{"id": "msg_1", "type": "message", "status": "completed",
                       "role": "assistant",
                       "content": [{"type": "output_text", "text": "Hi there!",
                                    "annotations": []}]}],
           "usage": {"input_tokens": 37, "input_tokens_details": {"cached_tokens": 5},
                     "output_tokens": 11, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": 48}}}, "response.completed")]
)

STREAMS = {"chat": CHAT_STREAM, "tools": TOOL_STREAM, "legacy": LEGACY_STREAM,
           "responses": RESPONSES_STREAM}


def run(stream: bytes, chunks: list[int] | None = None, drop: bool = False,
        ) -> tuple[bytes, SSETap, list[bytes]]:
    """Feed ``stream`` cut at ``chunks`` (offsets); returns the output, the tap, each piece."""
    tap = SSETap(drop_usage_chunk=drop)
    cuts = [0, *(chunks or []), len(stream)]
    pieces = [tap.feed(stream[a:b]) for a, b in itertools.pairwise(cuts)]
    pieces.append(tap.flush())
    return b"".join(pieces), tap, pieces


def state(tap: SSETap) -> tuple[Any, ...]:
    return tap.usage, tap.text_chars, tap.done, tap.events, tap.delivered


def test_chat_stream_passes_unchanged_and_reads_usage():
    out, tap, _ = run(CHAT_STREAM)
    assert out == CHAT_STREAM
    assert tap.usage == Usage(19, 10, 0)
    assert tap.text_chars == CHAT_TEXT
    assert tap.done
    assert tap.events == len(WORDS) + 4
    assert tap.delivered == len(CHAT_STREAM)


def test_usage_chunk_is_dropped_only_when_asked():
    out, tap, _ = run(CHAT_STREAM, drop=True)
    assert out == CHAT_HEAD + DONE  # everything else byte for byte, [DONE] included
    assert tap.usage == Usage(19, 10, 0)
    assert tap.done
    assert tap.delivered == len(CHAT_HEAD + DONE)

    out, tap, _ = run(CHAT_STREAM, drop=False)
    assert out == CHAT_STREAM
    assert tap.usage == Usage(19, 10, 0)


def test_usage_chunk_dropped_from_legacy_completion_stream():
    out, tap, _ = run(LEGACY_STREAM, drop=True)
    assert out == LEGACY_STREAM.replace(sse({"id": "cmpl-1", "object": "text_completion",
                                             "created": 1, "model": "gpt-3.5-turbo-instruct",
                                             "choices": [], "usage": {
                                                 "prompt_tokens": 5, "completion_tokens": 3,
                                                 "total_tokens": 8}}), b"")
    assert tap.usage == Usage(5, 3, 0)
    assert tap.text_chars == len("This is a test")


def test_usage_on_a_chunk_with_choices_is_never_dropped():
    last = chat_chunk({}, finish="stop", usage=False)
    last["usage"] = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    stream = sse(chat_chunk({"content": "Hi"}, usage=False)) + sse(last) + DONE
    out, tap, _ = run(stream, drop=True)
    assert out == stream
    assert tap.usage == Usage(7, 2, 0)


def test_usage_chunk_dropped_from_inside_a_bigger_chunk_keeps_neighbours():
    # the usage chunk arrives glued to the previous event and [DONE] in one read
    stream = CHAT_STREAM
    at = len(CHAT_HEAD) - 10
    out, _, pieces = run(stream, [at], drop=True)
    assert out == CHAT_HEAD + DONE
    assert pieces[-2] == CHAT_HEAD[-len(sse(chat_chunk({}, finish="stop"))):] + DONE


def test_cached_tokens_in_stream_usage():
    usage_chunk = json.loads(json.dumps(USAGE_CHUNK))
    usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] = 12
    _, tap, _ = run(CHAT_HEAD + sse(usage_chunk) + DONE)
    assert tap.usage == Usage(19, 10, 12)


def test_tool_call_arguments_are_counted():
    _, tap, _ = run(TOOL_STREAM)
    # the function name is generated text too; ids and types are not
    assert tap.text_chars == len("get_weather") + sum(len(a) for a in TOOL_ARGS)
    assert tap.usage == Usage(19, 10, 0)


def test_responses_stream_done_usage_and_text():
    out, tap, _ = run(RESPONSES_STREAM)
    assert out == RESPONSES_STREAM
    assert tap.done
    assert tap.usage == Usage(37, 11, 5)
    assert tap.text_chars == sum(len(d) for d in RESP_DELTAS)


def test_responses_stream_is_never_dropped_from():
    out, _, _ = run(RESPONSES_STREAM, drop=True)
    assert out == RESPONSES_STREAM


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_responses_stream_other_endings_are_done(kind):
    stream = sse({"type": kind, "response": {**RESPONSE_OBJ, "status": kind.split(".")[1],
                                             "usage": {"input_tokens": 3, "output_tokens": 1}}},
                 kind)
    _, tap, _ = run(stream)
    assert tap.done
    assert tap.usage == Usage(3, 1, 0)


def test_not_done_before_done_marker():
    tap = SSETap()
    tap.feed(CHAT_HEAD + CHAT_USAGE)
    assert (tap.done, tap.usage) == (False, Usage(19, 10, 0))
    tap.feed(DONE)
    assert (tap.done, tap.usage) == (True, Usage(19, 10, 0))

    tap = SSETap()
    tap.feed(RESPONSES_STREAM[: RESPONSES_STREAM.index(b"event: response.completed")])
    assert (tap.done, tap.usage) == (False, None)
    tap.feed(RESPONSES_STREAM[RESPONSES_STREAM.index(b"event: response.completed") :])
    assert (tap.done, tap.usage) == (True, Usage(37, 11, 5))


def test_stream_without_usage():
    stream = b"".join(sse(chat_chunk({"content": w}, usage=False)) for w in WORDS) + DONE
    out, tap, _ = run(stream, drop=True)
    assert out == stream
    assert tap.usage is None
    assert tap.text_chars == CHAT_TEXT
    assert tap.done


def test_comments_garbage_and_other_fields_pass_through():
    stream = (b": OPENROUTER PROCESSING\n\n"
              b"retry: 3000\n\n"
              b"data: not json at all\n\n"
              b"data: [1, 2, 3]\n\n"
              b"id: 7\nevent: message\ndata: {\"choices\":[{\"index\":0,\"delta\":"
              b"{\"content\":\"ok\"}}]}\n\n"
              + CHAT_USAGE + DONE)
    out, tap, _ = run(stream, drop=True)
    assert out == stream.replace(CHAT_USAGE, b"")
    assert tap.text_chars == 2
    assert tap.usage == Usage(19, 10, 0)
    assert tap.done


def test_data_without_space_after_colon():
    stream = b'data:{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n' + DONE
    out, tap, _ = run(stream, drop=True)
    assert out == DONE
    assert tap.usage == Usage(4, 2, 0)


# --- SSETap: chunking -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("drop", [False, True])
def test_every_split_position_gives_the_same_result(name, drop):
    stream = STREAMS[name]
    whole, tap_whole, _ = run(stream, drop=drop)
    for i in range(len(stream) + 1):
        out, tap, _ = run(stream, [i], drop=drop)
        assert out == whole, i
        assert state(tap) == state(tap_whole), i


def test_byte_by_byte_gives_the_same_result_and_only_whole_events():
    for drop in (False, True):
        stream = CHAT_STREAM
        whole, tap_whole, _ = run(stream, drop=drop)
        out, tap, pieces = run(stream, list(range(1, len(stream))), drop=drop)
        assert out == whole
        assert state(tap) == state(tap_whole)
        assert all(p == b"" or p.endswith(b"\n\n") for p in pieces)


@settings(max_examples=200)
@given(name=st.sampled_from(sorted(STREAMS)), drop=st.booleans(), data=st.data())
def test_any_chunking_gives_the_same_result(name, drop, data):
    stream = STREAMS[name]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    whole, tap_whole, _ = run(stream, drop=drop)
    out, tap, pieces = run(stream, cuts, drop=drop)
    assert out == whole
    assert state(tap) == state(tap_whole)
    # feed hands on whole events only: every cumulative output ends on an event boundary
    sent = b""
    for piece in pieces[:-1]:
        sent += piece
        assert whole.startswith(sent)
        assert sent == b"" or sent.endswith(b"\n\n")


@given(data=st.data())
def test_feed_returns_nothing_for_an_incomplete_event(data):
    event = sse(chat_chunk({"content": "partial"}))
    cut = data.draw(st.integers(0, len(event) - 1))  # anything short of the blank line
    tap = SSETap()
    assert tap.feed(event[:cut]) == b""
    assert tap.delivered == 0
    assert tap.events == 0
    assert tap.feed(event[cut:]) == event
    assert tap.delivered == len(event)


def test_flush_returns_a_trailing_partial_event_unchanged():
    tap = SSETap()
    assert tap.feed(CHAT_HEAD[:-5]) == CHAT_HEAD[: CHAT_HEAD.rindex(b"\n\n", 0, -5) + 2]
    rest = tap.flush()
    assert rest == CHAT_HEAD[CHAT_HEAD.rindex(b"\n\n", 0, -5) + 2 : -5]
    assert tap.delivered == len(CHAT_HEAD) - 5
    assert tap.flush() == b""


def test_flush_reads_a_last_event_missing_its_blank_line():
    tap = SSETap(drop_usage_chunk=True)
    assert tap.feed(CHAT_HEAD + CHAT_USAGE + b"data: [DONE]\n") == CHAT_HEAD
    assert tap.flush() == b"data: [DONE]\n"
    assert tap.done
    tap = SSETap(drop_usage_chunk=True)
    assert tap.feed(CHAT_HEAD + CHAT_USAGE[:-2]) == CHAT_HEAD
    # at the end of the stream the partial event is handed on as it was, and still read
    assert tap.flush() == CHAT_USAGE[:-2]
    assert tap.usage == Usage(19, 10, 0)
    assert tap.delivered == len(CHAT_HEAD) + len(CHAT_USAGE) - 2


def test_delivered_counts_bytes_handed_on():
    tap = SSETap(drop_usage_chunk=True)
    total = 0
    for i in range(0, len(CHAT_STREAM), 37):
        total += len(tap.feed(CHAT_STREAM[i:i + 37]))
        assert tap.delivered == total
    total += len(tap.flush())
    assert tap.delivered == total == len(CHAT_HEAD + DONE)


def test_empty_feeds_and_empty_stream():
    tap = SSETap()
    assert tap.feed(b"") == b""
    assert tap.flush() == b""
    assert state(tap) == (None, 0, False, 0, 0)


# --- SSETap: CRLF ---------------------------------------------------------------------------


def crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_crlf_stream_is_read_like_lf(name):
    stream = STREAMS[name]
    out, tap, _ = run(crlf(stream))
    _, lf_tap, _ = run(stream)
    assert out == stream  # line endings normalised to LF, content unchanged
    assert state(tap) == state(lf_tap)


def test_crlf_usage_chunk_dropped():
    out, tap, _ = run(crlf(CHAT_STREAM), [100, 2000], drop=True)
    assert out == CHAT_HEAD + DONE
    assert tap.usage == Usage(19, 10, 0)
    assert tap.done


def test_cr_only_line_endings():
    stream = CHAT_STREAM.replace(b"\n", b"\r")
    out, tap, _ = run(stream, [len(stream) // 2], drop=True)
    assert out == CHAT_HEAD + DONE
    assert tap.usage == Usage(19, 10, 0)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_crlf_every_split_position_not_between_cr_and_lf(name):
    stream = crlf(STREAMS[name])
    whole, tap_whole, _ = run(stream)
    for i in range(len(stream) + 1):
        if stream[i - 1 : i + 1] == b"\r\n":
            continue  # see test_crlf_split_between_cr_and_lf
        out, tap, _ = run(stream, [i])
        assert out == whole, i
        assert state(tap) == state(tap_whole), i


@pytest.mark.parametrize("name", ["responses", "chat"])
def test_crlf_split_between_cr_and_lf(name):
    stream = crlf(STREAMS[name])
    whole, tap_whole, _ = run(stream)
    for i in range(1, len(stream)):
        if stream[i - 1 : i + 1] == b"\r\n":
            out, tap, _ = run(stream, [i])
            assert out == whole, i
            assert state(tap) == state(tap_whole), i


def test_the_tap_adds_to_the_usage_it_passes_on_and_holds_done() -> None:
    """What the proxy's stream owner uses to put the cost in the usage a client reads, and to
    send its closing comments before [DONE]."""
    seen: list[Usage] = []

    def add(usage: Usage, event_usage: dict[str, Any]) -> None:
        seen.append(usage)
        event_usage["cost"] = {"total_msats": 7}

    tap = SSETap(hold_done=True, on_usage=add)
    chat = (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
            b"data: [DONE]\n\n")
    out = tap.feed(chat)
    assert json.loads(out.split(b"\n\n")[0][6:])["usage"]["cost"] == {"total_msats": 7}
    assert b"[DONE]" not in out and tap.held_done == b"data: [DONE]\n\n"
    assert seen == [Usage(3, 4)]
    responses = SSETap(on_usage=add)
    done = (b'data: {"type":"response.completed","response":{"usage":'
            b'{"input_tokens":5,"output_tokens":6}}}\n\n')
    event = json.loads(responses.feed(done)[6:])
    assert event["response"]["usage"]["cost"] == {"total_msats": 7}
    # [DONE] as the last bytes with no blank line after it: held back too.
    tail = SSETap(hold_done=True)
    assert tail.feed(b'data: {"choices":[]}\n\ndata: [DONE]') == b'data: {"choices":[]}\n\n'
    assert tail.flush() == b"" and tail.held_done == b"data: [DONE]\n\n"
