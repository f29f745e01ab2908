"""Token usage from upstream answers: JSON bodies and Server-Sent Event streams.

Covers the shapes the proxy meters: chat completions and legacy completions
(``usage.prompt_tokens`` / ``completion_tokens``), embeddings (``prompt_tokens`` only), the
Responses API (``input_tokens`` / ``output_tokens``, in ``response.completed`` when streaming)
and Anthropic's Messages API (``input_tokens`` / ``output_tokens`` plus prompt-cache reads and
writes, streamed in ``message_start`` and ``message_delta``).

Figures that cannot be true (negative, not integers) are read as zero and the usage marked
``suspect``: the meter then charges at least its own estimate.

``SSETap`` sits in mitmproxy's stream callable: it is fed raw chunks as they arrive, hands back
at once every complete event (less the usage-only chunk the proxy injected, if the client did
not ask for it), and meanwhile keeps the usage and the length of the text delivered, from which
usage is estimated when the stream ends without any.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SSETap", "Usage", "estimate_tokens", "prompt_text_length", "usage_from_json"]

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE tokenizers


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    estimated: bool = False
    written_tokens: int = 0  # prompt tokens written to the provider's cache (Anthropic)
    suspect: bool = False  # the upstream reported figures that cannot be true


class _Figures:
    """Reads a usage object's token counts, noting any that cannot be true."""

    __slots__ = ("suspect",)

    def __init__(self) -> None:
        self.suspect = False

    def __call__(self, obj: Any, name: str) -> int:
        value = obj.get(name) if isinstance(obj, dict) else None
        if type(value) is int and value >= 0:
            return value
        if value is not None:
            self.suspect = True
        return 0


def parse_usage(usage: Any) -> Usage | None:
    """A ``usage`` object in any of the shapes metered, or None if it is not one."""
    if not isinstance(usage, dict):
        return None
    read = _Figures()
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        # Anthropic: input_tokens leaves out the tokens read from or written to the cache.
        cached = read(usage, "cache_read_input_tokens")
        written = read(usage, "cache_creation_input_tokens")
        found = Usage(read(usage, "input_tokens") + cached + written,
                      read(usage, "output_tokens"), cached, written_tokens=written)
    elif "input_tokens" in usage or "output_tokens" in usage:  # Responses API
        found = Usage(read(usage, "input_tokens"), read(usage, "output_tokens"),
                      read(usage.get("input_tokens_details"), "cached_tokens"))
    elif "prompt_tokens" in usage or "completion_tokens" in usage:
        found = Usage(read(usage, "prompt_tokens"), read(usage, "completion_tokens"),
                      read(usage.get("prompt_tokens_details"), "cached_tokens"))
    else:
        return None
    if read.suspect:
        return Usage(found.prompt_tokens, found.completion_tokens, found.cached_tokens,
                     written_tokens=found.written_tokens, suspect=True)
    return found


def usage_from_json(body: Any) -> Usage | None:
    """Usage from a JSON answer (or a Responses API event carrying ``response``)."""
    if not isinstance(body, dict):
        return None
    found = parse_usage(body.get("usage"))
    if found is None and isinstance(body.get("response"), dict):
        found = parse_usage(body["response"].get("usage"))
    return found


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text: at least one when there is any text."""
    return -(-chars // CHARS_PER_TOKEN) if chars > 0 else 0


def _text_length(value: Any, skip: frozenset[str] = frozenset({"role", "type", "id", "index",
                                                              "finish_reason", "object"})) -> int:
    """Characters of text anywhere inside a JSON value, leaving out bookkeeping fields."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_length(v) for k, v in value.items() if k not in skip)
    return 0


def prompt_text_length(body: dict[str, Any]) -> int:
    """Characters of prompt in a request body (messages, prompt, input, instructions, tools)."""
    total = 0
    for name in ("messages", "prompt", "input", "instructions", "tools", "system"):
        if name in body:
            total += _text_length(body[name])
    return total


def completion_text_length(body: Any) -> int:
    """Characters of generated text in a non-streamed answer, for estimates."""
    if not isinstance(body, dict):
        return 0
    if "choices" in body:
        return _text_length(body["choices"])
    if "output" in body:
        return _text_length(body["output"])
    if body.get("type") == "message":  # Anthropic
        return _text_length(body.get("content"))
    return 0


# A JSON string value of a field that carries generated text, in an event's raw bytes.
_TEXT_FIELD = re.compile(rb'"(?:content|text|delta|arguments|name|refusal|reasoning|'
                         rb'reasoning_content)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _chars(raw: bytes) -> int:
    """Characters in a JSON string's raw bytes (escapes and UTF-8 decoded when present)."""
    if raw.isascii() and b"\\" not in raw:
        return len(raw)
    try:
        return len(json.loads(b'"' + raw + b'"'))
    except ValueError:
        return len(raw)
# A Responses API event's type: only its ``….delta`` events carry new text.
_RESPONSES_TYPE = re.compile(rb'"type"\s*:\s*"(response\.[a-z_.]+)"')
# Events worth parsing: a usage object, or the Responses API's final events.
_NEEDS_PARSING = re.compile(rb'"usage"\s*:\s*\{|"response\.(?:completed|incomplete|failed)"')


class SSETap:
    """Passes an SSE stream through event by event while reading its usage and text."""

    __slots__ = (
        "_buffer",
        "_drop_usage_chunk",
        "_hold_done",
        "_rewritten",
        "delivered",
        "done",
        "events",
        "held_done",
        "on_usage",
        "text_chars",
        "usage",
    )

    def __init__(self, drop_usage_chunk: bool = False, hold_done: bool = False,
                 on_usage: Callable[[Usage, dict[str, Any]], None] | None = None) -> None:
        self._buffer = b""
        self._drop_usage_chunk = drop_usage_chunk
        # ``data: [DONE]`` kept back (in ``held_done``) so that what follows the answer (its
        # cost, a payer's change) can still go before it: OpenAI clients stop reading there.
        self._hold_done = hold_done
        self.held_done: bytes | None = None
        # Called with the usage read and the ``usage`` object of the event that carried it, which
        # it may change in place (to add the cost); the event is then sent re-serialised.
        self.on_usage = on_usage
        self._rewritten: bytes | None = None
        self.usage: Usage | None = None
        self.text_chars = 0
        self.events = 0
        self.delivered = 0  # bytes handed on to the client
        self.done = False  # the stream said it finished ([DONE] or response.completed)

    def feed(self, chunk: bytes) -> bytes:
        """Take one raw chunk; return the bytes to send on now."""
        data = self._buffer + chunk if self._buffer else chunk
        tail = b""
        if b"\r" in data:
            if data.endswith(b"\r"):  # maybe the first half of a CRLF: decide with the next chunk
                data, tail = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data + tail
            return b""
        complete, self._buffer = data[: end + 2], data[end + 2 :] + tail
        out = self._events(complete)
        self.delivered += len(out)
        return out

    def flush(self) -> bytes:
        """At the end of the stream: whatever partial event is left, as it was."""
        rest, self._buffer = self._buffer, b""
        if rest.endswith(b"\r"):  # a line ending held back in case an LF followed
            rest = rest[:-1] + b"\n"
        if rest.strip():
            before = self.held_done
            out = self._events(rest + b"\n\n")
            if self.held_done is not before:  # the last event was [DONE]: held back
                rest = out
        self.delivered += len(rest)
        return rest

    def _events(self, complete: bytes) -> bytes:
        kept: list[bytes] = []
        dropped = False
        for event in complete.split(b"\n\n"):
            if not event:
                continue
            self.events += 1
            if self._read(event):
                dropped = True
            elif self._rewritten is not None:
                kept.append(self._rewritten)
                self._rewritten = None
                dropped = True
            else:
                kept.append(event)
        if not dropped:
            return complete
        return b"".join(e + b"\n\n" for e in kept)

    def _read(self, event: bytes) -> bool:
        """Read one event; True if it must not reach the client."""
        data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n")
                          if line.startswith(b"data:"))
        if not data:
            return False
        if data == b"[DONE]":
            self.done = True
            if self._hold_done:
                self.held_done = event + b"\n\n"
                return True
            return False
        # Most events are a few words of text: measure that text from the raw bytes, and
        # parse JSON only for the events that carry usage or end the answer.
        if not _NEEDS_PARSING.search(data):
            kind = _RESPONSES_TYPE.search(data)
            if kind is None or kind.group(1).endswith(b".delta"):  # not a summary event
                self.text_chars += sum(map(_chars, _TEXT_FIELD.findall(data)))
            return False
        try:
            obj = json.loads(data)
        except ValueError:
            return False
        if not isinstance(obj, dict):
            return False
        kind = obj.get("type")
        if kind == "message_start" or kind == "message_delta":  # Anthropic
            self._anthropic(obj, kind)
            return False
        if isinstance(kind, str):  # Responses API events
            if kind == "response.output_text.delta" or kind.endswith(".delta"):
                delta = obj.get("delta")
                self.text_chars += len(delta) if isinstance(delta, str) else 0
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                self.done = True
                self.usage = usage_from_json(obj) or self.usage
                response = obj.get("response")
                if self.on_usage is not None and self.usage is not None and \
                        isinstance(response, dict) and isinstance(response.get("usage"), dict):
                    self._rewrite(obj, response["usage"])
            return False
        choices = obj.get("choices")
        if choices:
            self.text_chars += _text_length(choices)
        usage = parse_usage(obj.get("usage"))
        if usage is not None:
            self.usage = usage
            # The usage-only chunk the proxy asked for on the client's behalf.
            if self._drop_usage_chunk and not choices:
                return True
            if self.on_usage is not None:
                self._rewrite(obj, obj["usage"])
        return False

    def _rewrite(self, obj: dict[str, Any], usage: dict[str, Any]) -> None:
        """Let ``on_usage`` add to the event's usage, and keep the event re-serialised."""
        assert self.on_usage is not None and self.usage is not None
        self.on_usage(self.usage, usage)
        self._rewritten = b"data: " + json.dumps(obj, ensure_ascii=False,
                                                  separators=(",", ":")).encode()

    def _anthropic(self, obj: dict[str, Any], kind: str) -> None:
        """``message_start`` carries the prompt's usage; each ``message_delta`` the output
        tokens so far (cumulative)."""
        if kind == "message_start":
            message = obj.get("message")
            self.usage = parse_usage(message.get("usage") if isinstance(message, dict)
                                     else None) or self.usage
            return
        delta = obj.get("usage")
        if not isinstance(delta, dict):
            return
        read = _Figures()
        output = read(delta, "output_tokens")
        start = self.usage or Usage(0, 0)
        self.usage = Usage(start.prompt_tokens, max(output, start.completion_tokens),
                           start.cached_tokens, written_tokens=start.written_tokens,
                           suspect=start.suspect or read.suspect)
        self.done = True
