"""What may be forwarded: the one reading of a request that both the proxy and the upstream get.

Rule 8 of the design: the upstream receives a request the proxy built from what it priced. An
upstream reads requests leniently (it decodes and normalises paths, coerces ``"4"`` to 4,
decompresses bodies, keeps the last of two duplicate keys or matches keys ignoring case), so
anything the proxy reads one way and the upstream another is work paid at the wrong price.
This module owns that reading, free of mitmproxy:

* ``canonical_endpoint``: the endpoint a raw path names however it is spelt (percent-encoding,
  ``//``, dot segments, case, ``;params``, a trailing slash), or None; the upstream path is
  then built from the endpoint's name, never copied from the client;
* ``decode_body``: a request body's Content-Encoding undone, bounded, or 415;
* ``parse_json``: one ``json.loads``, duplicate keys refused;
* ``read_shape``: every field that changes the cost type-checked as OpenAI's API types it and
  the multipliers gathered (a 400 naming the field otherwise); fields that change which model
  runs or how the provider bills are priced (OpenRouter's ``models``) or refused;
* ``upstream_body``: the body the upstream gets, re-serialised from the parsed one;
* ``secret_in_query``, ``ResponseDecoder``: no credentials in URLs; answers the tap can read.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

import brotli
import zstandard

from routstr_addon.errors import ApiError

__all__ = [
    "ENDPOINTS",
    "ResponseDecoder",
    "Shape",
    "canonical_endpoint",
    "check_raw",
    "decode_body",
    "parse_fixed_prices",
    "parse_json",
    "read_shape",
    "secret_in_query",
    "unsupported_endpoint",
    "upstream_body",
]

# Endpoints priced from token usage: their name below /v1 → how their body and usage read.
ENDPOINTS: Mapping[str, str] = {
    "chat/completions": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
    "messages": "messages",
}
# The paths well-behaved clients send: no normalisation needed (the funded-key fast path).
_EXACT = {f"/v1/{name}": name for name in ENDPOINTS} | {f"/{name}": name for name in ENDPOINTS}
MAX_HEADER_BYTES = 64 << 10  # total request header size; larger is answered 431


# --- the path ---------------------------------------------------------------------------------


def canonical_endpoint(path: str) -> str | None:
    """The endpoint name (``chat/completions``) a raw request path (no query) names, as an
    upstream that decodes and normalises paths would route it; None if it cannot be read as
    one name (undecodable, above the root, double-encoded, not ASCII).

    ``%XX`` is decoded (``%2F`` too), ``\\`` read as ``/``, ``;params`` dropped from each
    segment, empty and ``.`` segments dropped, ``..`` resolved, case folded, and a leading
    ``v1`` segment taken off: every spelling an upstream might route to an endpoint is priced
    as that endpoint, and whatever else it is, the upstream never sees the client's spelling.
    """
    exact = _EXACT.get(path)
    if exact is not None:
        return exact
    try:
        decoded = unquote_to_bytes(path).decode("ascii")
    except UnicodeDecodeError:
        return None
    if "%" in decoded or "?" in decoded or "#" in decoded or not decoded.isprintable():
        return None  # encoded twice, or characters no endpoint name has
    segments: list[str] = []
    for segment in decoded.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment.lower())
    if segments[:1] == ["v1"]:
        segments = segments[1:]
    return "/".join(segments)


def unsupported_endpoint(fixed: Mapping[str, int]) -> ApiError:
    """404 for a path this proxy does not forward, naming what it does."""
    names = ", ".join(f"/v1/{name}" for name in (*ENDPOINTS, *fixed))
    return ApiError(404, f"This endpoint is not supported here. Supported: {names}.",
                    code="unsupported_endpoint")


def parse_fixed_prices(raw: str) -> dict[str, int]:
    """``FIXED_PRICE_ENDPOINTS``: ``images/generations=50,audio/speech=10`` → name → sats.
    Raises ValueError with the reason."""
    prices: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, price = item.partition("=")
        endpoint = canonical_endpoint("/" + name.strip())
        if not sep or not endpoint or not price.strip().isdigit():
            raise ValueError(f"expected endpoint=sats pairs such as images/generations=50, "
                             f"got {item!r}")
        if endpoint in ENDPOINTS:
            raise ValueError(f"{endpoint} is priced from its token usage; it cannot have a "
                             "fixed price")
        prices[endpoint] = int(price)
    return prices


def secret_in_query(query: str) -> bool:
    """Whether a query string carries an API key or a Cashu token (which would end up in
    logs, browser histories and mitmweb)."""
    if not query:
        return False
    for name, value in parse_qsl(query, keep_blank_values=True):
        for text in (name, value):
            text = text.strip().lower()
            if text.startswith(("sk-", "cashua", "cashub", "cashu:", "bearer ")):
                return True
    return False


# --- the body ---------------------------------------------------------------------------------

_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "identity"})


def decode_body(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """A request body with its Content-Encoding undone (every listed coding, last applied
    first), at most ``limit`` bytes once decoded: 415 for a coding not spoken here, 413 above
    the limit, 400 for a body that is not what its coding says."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    unknown = [c for c in codings if c not in _CODINGS]
    if unknown:
        raise ApiError(415, f"Content-Encoding {unknown[0]!r} is not supported; send the body "
                       "as plain JSON, or compressed with gzip, deflate, br or zstd.",
                       code="unsupported_content_encoding")
    for coding in reversed(codings):
        if coding == "identity":
            continue
        try:
            raw = _decompress(coding, raw, limit)
        except (zlib.error, brotli.error, zstandard.ZstdError, EOFError):
            raise ApiError(400, f"The request body is not valid {coding}.",
                           code="invalid_content_encoding") from None
        if len(raw) > limit:
            raise ApiError(413, "The request body, decompressed, is larger than this proxy "
                           "accepts.", code="request_too_large")
    return raw


def _decompress(coding: str, data: bytes, limit: int) -> bytes:
    """Decompress at most ``limit + 1`` bytes (a zip bomb stops there)."""
    if coding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if coding != "deflate" else (15 if data[:1] == b"x" else -15)
        z = zlib.decompressobj(wbits)
        out = z.decompress(data, limit + 1)
        if len(out) <= limit and not z.eof:
            raise zlib.error("truncated")
        return out
    if coding == "br":
        b = brotli.Decompressor()
        out = b.process(data, output_buffer_limit=limit + 1)
        if len(out) <= limit and not b.is_finished():
            raise brotli.error("truncated")
        return bytes(out)
    reader = zstandard.ZstdDecompressor().stream_reader(data)
    chunks: list[bytes] = []
    size = 0
    while size <= limit and (piece := reader.read(1 << 20)):
        chunks.append(piece)
        size += len(piece)
    return b"".join(chunks)


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as one JSON object: 400 if it is not one, or if a key appears twice in an
    object (upstreams disagree about which one counts)."""
    try:
        parsed = _DECODER.decode(body.decode("utf-8"))
    except _Duplicate as e:
        raise ApiError(400, f"The key {e.key!r} appears twice in one JSON object; send it once.",
                       param=e.key, code="duplicate_key") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON (UTF-8).",
                       code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return parsed


# --- the fields that change the cost ------------------------------------------------------------

# Fields the proxy reads, at the top level of a body: a key equal to one of these ignoring case
# only is refused (Go servers such as Ollama match keys ignoring case, the last one winning).
_READ = frozenset({
    "model", "models", "messages", "prompt", "input", "n", "best_of", "max_tokens",
    "max_completion_tokens", "max_output_tokens", "stream", "stream_options", "service_tier",
    "background", "tools", "audio", "modalities", "thinking", "route", "provider", "plugins",
    "web_search_options", "instructions", "system", "reasoning", "reasoning_effort",
    "prediction",
})
_READ_FOLDED = {name.lower(): name for name in _READ}
_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Service tiers billed at the standard price or below; others (priority, scale) cost more.
_TIERS = frozenset({"auto", "default", "flex", "standard_only"})
# Tool types that cost tokens only (the client runs them); others are billed per call.
_TOKEN_ONLY_TOOLS = frozenset({"function", "custom"})
_CLIENT_TOOL_PREFIXES = ("bash_", "text_editor_", "computer_")  # Anthropic tools the client runs


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a µs more to build
class Shape:
    """What a validated body asks for, in the terms its price depends on."""

    models: tuple[str, ...]  # the model, then OpenRouter fallbacks (any of them may run)
    cap: int | None  # the largest completion cap given (None: the model's limit)
    choices: int  # completions generated per prompt (n, best_of)
    prompts: int  # prompts or inputs that are each bounded by the context (lists)
    stream: bool


def _bad(name: str, expected: str) -> ApiError:
    return ApiError(400, f"'{name}' must be {expected}.", param=name, code="invalid_type")


def _refused(name: str, why: str) -> ApiError:
    return ApiError(400, f"'{name}' is not accepted here: {why}", param=name,
                    code="unsupported_parameter")


def _count(body: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise _bad(name, f"an integer of at least {minimum}")
    return value


def _is_prompt_list(value: Any) -> bool:
    """A list of prompts (strings, or token-id lists) rather than one prompt of token ids."""
    return isinstance(value, list) and bool(value) and not isinstance(value[0], int)


def _check_prompt(name: str, value: Any) -> int:
    """``prompt``/``input`` of completions and embeddings: a string, a list of strings, a list
    of token ids, or a list of token-id lists. Returns how many prompts it holds."""
    if isinstance(value, str):
        return 1
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return max(len(value), 1)
        if all(type(v) is int for v in value):
            return 1
        if all(isinstance(v, list) and all(type(t) is int for t in v) for v in value):
            return max(len(value), 1)
    raise _bad(name, "a string, a list of strings, or token ids")


def check_raw(kind: str, raw: bytes) -> None:
    """What the raw body alone shows: Anthropic's one-hour prompt cache (``"ttl": "1h"`` in a
    ``cache_control``) writes at twice the prompt price, above the cache-write price known."""
    if kind == "messages" and b'"ttl"' in raw:
        raise _refused("cache_control", "a cache 'ttl' other than the default 5 minutes is "
                       "not priced here.")


def read_shape(kind: str, body: Mapping[str, Any]) -> Shape:
    """Type-check every field of ``body`` that changes what a ``kind`` request costs, as
    OpenAI's API types it; refuse what changes which model runs or how the provider bills
    unless it can be priced. Raises ApiError (400, naming the field)."""
    for key in body:
        if key not in _READ and key.lower() in _READ_FOLDED:
            raise ApiError(400, f"The key {key!r} differs only in case from "
                           f"{_READ_FOLDED[key.lower()]!r}; send it as that.", param=key,
                           code="case_variant_key")
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise _bad("stream", "a boolean (true or false)")
    caps = [c for name in _CAPS if (c := _count(body, name, 0))]
    n = _count(body, "n", 1) or 1
    best_of = _count(body, "best_of", 1) or 1
    models = _models(body)
    _billing_fields(kind, body)
    prompts = 1
    if kind == "chat" or kind == "messages":
        if not isinstance(body.get("messages"), list):
            raise _bad("messages", "a list of messages")
    elif kind == "completions":
        prompts = _check_prompt("prompt", body.get("prompt"))
    elif kind == "embeddings":
        prompts = _check_prompt("input", body.get("input"))
    elif kind == "responses":
        value = body.get("input")
        if value is not None and not isinstance(value, (str, list)):
            raise _bad("input", "a string or a list of input items")
    if kind == "messages":
        _thinking(body)
    return Shape(models, max(caps) if caps else None, max(n, best_of), prompts, bool(stream))


def _models(body: Mapping[str, Any]) -> tuple[str, ...]:
    name = body.get("model")
    names = (name,) if isinstance(name, str) and name else ()
    fallbacks = body.get("models")
    if fallbacks is not None:
        if not isinstance(fallbacks, list) or not all(isinstance(m, str) and m
                                                      for m in fallbacks):
            raise _bad("models", "a list of model names")
        names += tuple(m for m in fallbacks if m not in names)
    route = body.get("route")
    if route is not None and route != "fallback":
        raise _refused("route", "only 'fallback' (with 'models') can be priced.")
    return names


# The fields ``_billing_fields`` looks at: most bodies have none of them.
_BILLING = frozenset({"provider", "service_tier", "background", "plugins", "web_search_options",
                      "audio", "prediction", "modalities", "tools"})


def _billing_fields(kind: str, body: Mapping[str, Any]) -> None:
    """Refuse the fields that make the provider bill what the proxy cannot price."""
    if _BILLING.isdisjoint(body):
        return
    if body.get("provider") is not None:
        raise _refused("provider", "provider preferences choose among prices this proxy "
                       "does not know.")
    tier = body.get("service_tier")
    if tier is not None and tier not in _TIERS:
        raise _refused("service_tier", "only 'auto', 'default' or 'flex' are priced here.")
    background = body.get("background")
    if background is not None and type(background) is not bool:
        raise _bad("background", "a boolean")
    if background:
        raise _refused("background", "a background response does its work after the answer, "
                       "where its usage cannot be metered; send it in the foreground.")
    for name in ("plugins", "web_search_options"):
        if body.get(name) is not None:
            raise _refused(name, "web search is billed per call, which is not priced here.")
    if body.get("audio") is not None:
        raise _refused("audio", "audio output is not priced here.")
    if body.get("prediction") is not None:
        raise _refused("prediction", "rejected predicted tokens are billed beyond the "
                       "completion cap, which is not priced here.")
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list)
                                   or any(m != "text" for m in modalities)):
        raise _refused("modalities", "only text output is priced here.")
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("tools", "a list of tools")
    for tool in tools:
        kind_of = tool.get("type") if isinstance(tool, dict) else None
        if not isinstance(tool, dict):
            raise _bad("tools", "a list of tool objects")
        if kind_of in _TOKEN_ONLY_TOOLS or (kind == "messages" and (
                kind_of is None or (isinstance(kind_of, str)
                                    and kind_of.startswith(_CLIENT_TOOL_PREFIXES)))):
            continue
        raise _refused("tools", f"the built-in tool {kind_of!r} is billed per call, which is "
                       "not priced here; only function tools are.")


def _thinking(body: Mapping[str, Any]) -> None:
    """Anthropic's ``thinking``: its budget is spent inside ``max_tokens``, which is priced."""
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
        raise _bad("thinking", "an object with a 'type'")
    budget = thinking.get("budget_tokens")
    if budget is not None and (type(budget) is not int or budget < 0):
        raise _bad("thinking", "an object whose 'budget_tokens' is a non-negative integer")


# --- what goes upstream -------------------------------------------------------------------------


def upstream_body(kind: str, body: dict[str, Any]) -> tuple[bytes, bool]:
    """The bytes the upstream gets for a validated body, and whether the stream's usage chunk
    is the proxy's to drop (it asked for it on the client's behalf).

    Every chat or completions stream is made to report its usage; the client's other stream
    options are kept, and if it asked for usage itself it gets it."""
    drop_usage = False
    if body.get("stream") is True and kind in ("chat", "completions"):
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            kept = ({k: v for k, v in options.items() if k.lower() != "include_usage"}
                    if isinstance(options, dict) else {})
            body = {**body, "stream_options": {**kept, "include_usage": True}}
            drop_usage = True
    return json.dumps(body).encode(), drop_usage


# --- answers --------------------------------------------------------------------------------------


class ResponseDecoder:
    """Undoes an answer's Content-Encoding piece by piece, as a stream arrives (the upstream
    was asked for identity; some compress anyway). ``ValueError`` for a coding not known."""

    __slots__ = ("_feed", "_stages")

    def __init__(self, content_encoding: str) -> None:
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
        stages: list[Any] = []
        for coding in reversed(codings):
            if coding == "identity":
                continue
            if coding in ("gzip", "x-gzip"):
                stages.append(zlib.decompressobj(47).decompress)
            elif coding == "deflate":
                stages.append(_Deflate().feed)
            elif coding == "br":
                stages.append(brotli.Decompressor().process)
            elif coding == "zstd":
                stages.append(zstandard.ZstdDecompressor().decompressobj().decompress)
            else:
                raise ValueError(f"unknown Content-Encoding {coding!r}")
        self._stages = stages

    def feed(self, data: bytes) -> bytes:
        for stage in self._stages:
            if not data:
                break
            data = bytes(stage(data))
        return data


class _Deflate:
    """``deflate`` as servers send it: zlib-wrapped, or (some) raw."""

    __slots__ = ("_z",)

    def __init__(self) -> None:
        self._z: Any = None

    def feed(self, data: bytes) -> bytes:
        if self._z is None:
            self._z = zlib.decompressobj(15 if data[:1] == b"x" else -15)
        out: bytes = self._z.decompress(data)
        return out
