"""An OpenAI-compatible upstream that reads requests the way production servers do.

``tests/upstream.py`` is a byte-level echo server: it sees what the proxy sent exactly as sent.
Real providers do not. They run a web framework (FastAPI/Starlette under uvicorn, as vLLM and
most OpenAI-compatible servers do) behind a reverse proxy such as nginx, and every layer reads a
request more leniently than the bytes say:

* uvicorn percent-decodes the path (``%2F`` included) before Starlette routes it;
* nginx in front merges slashes, resolves ``.`` and ``..`` and decodes ``%XX``
  (``Behaviour.normalise_paths``); servlet containers drop ``;params`` (``strip_path_params``);
  some stacks route case-insensitively (``case_insensitive_routes``); trailing slashes are
  accepted, redirected or refused (``trailing_slash``);
* pydantic v2 in lax mode coerces types: ``n: "4"`` and ``4.0`` are 4, ``stream: "true"`` and
  ``1`` are True, ``max_tokens: "500"`` is 500; Python's json keeps the last duplicate key;
  Go servers (Ollama) match keys case-insensitively, the last one winning
  (``case_insensitive_keys``);
* request bodies are decoded by their Content-Encoding (gzip, deflate, br, zstd) and answers are
  compressed whenever the client's Accept-Encoding allows it, event streams included
  (``compress_answers``), or even when it does not (``compress_anyway``);
* vLLM's cap rule: ``max_completion_tokens or max_tokens`` (the first non-zero one); ``best_of``
  candidates are generated and billed; a list of prompts on ``/v1/completions`` gives
  ``len(prompts) * n`` choices; ``reasoning_effort`` adds hidden reasoning tokens.

The model is deterministic: one token per word, on both sides. Prompt tokens are the words of
the prompt text; the model "talks until its cap" (every choice generates exactly the cap when
one is given, else ``words_without_cap``), and its words come from a vocabulary of words of at
least four letters, so a chars/4 estimate of delivered text never counts fewer tokens than were
generated. What it bills (``Served.bills``) is the work it actually did, computed from what *it*
parsed; what it reports in ``usage`` is that, or a lie (``usage``: negative, absurd, none).
Prices are not its business: tests price a ``Bill`` with ``conftest.expected_msat``.

Every request that reaches the app is recorded as a ``Served`` (wire path, routed path,
parsed body, status, bills) so a test can check "the upstream's own bill vs what the proxy
charged", or that a request never reached the upstream at all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.policy
import json
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import quote, unquote_to_bytes

import brotli
import uvicorn
import zstandard
from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Behaviour", "Bill", "RealUpstream", "Served"]

# Generated text: words of four letters or more (see the module docstring).
VOCABULARY = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
              "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
              "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu")
# Hidden reasoning tokens per choice, by reasoning effort (counted in completion tokens).
REASONING = {"minimal": 8, "low": 16, "medium": 64, "high": 256}
COMPLETIONS_DEFAULT_CAP = 16  # /v1/completions without max_tokens, as OpenAI and vLLM do
ABSURD = 10**12
# Nominal work of the endpoints no proxy can meter, in tokens of the default model.
IMAGE_TOKENS = 1000  # per image (image models bill output tokens)
AUDIO_TOKENS_PER_WORD = 10
REALTIME_SESSION_TOKENS = 1000  # what an ephemeral credential is worth to its holder, at least
FINE_TUNING_EPOCHS = 3
CODINGS = ("gzip", "deflate", "br", "zstd")


# --- what the upstream did -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bill:
    """Work the upstream did and billed its operator for: tokens of one model."""

    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Served:
    """One request that reached the upstream, as the upstream saw it."""

    method: str
    wire_path: str  # the path as it came over the wire, before any normalisation
    query: str
    headers: dict[str, str]
    path: str = ""  # the path the router matched against
    endpoint: str | None = None  # the handler that took it (chat, completions, batches, …)
    body: dict[str, Any] | None = None  # the body as the handler read it (after coercion)
    status: int | None = None
    bills: list[Bill] = field(default_factory=list)
    reported: dict[str, Any] | None = None  # the usage it put in its answer
    done: bool = False

    @property
    def billed(self) -> bool:
        return bool(self.bills)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the upstream reads requests and answers; switch with ``RealUpstream.behave``."""

    normalise_paths: bool = False  # nginx in front: %XX decoded, merge_slashes, dot segments
    strip_path_params: bool = False  # servlet-style: ";x=1" dropped from each path segment
    case_insensitive_routes: bool = False
    trailing_slash: Literal["accept", "redirect", "strict"] = "accept"
    case_insensitive_keys: bool = False  # Go's encoding/json: keys match fields ignoring case
    compress_answers: bool = True  # honour the client's Accept-Encoding, event streams too
    compress_anyway: str | None = None  # compress with this coding whatever the client asked
    usage: Literal["honest", "negative", "absurd", "none"] = "honest"
    words_without_cap: int = 20
    enforce_limits: bool = True  # refuse caps above the model's output limit or context
    latency: float = 0.0  # seconds of work before the answer's headers
    word_interval: float = 0.0  # seconds between streamed words
    finish_after_hangup: bool = False  # keep generating when the client is gone (bill it all)
    down: frozenset[str] = frozenset()  # models whose provider is down (OpenRouter fallbacks)


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    context_length: int
    max_completion_tokens: int | None


# --- request models: pydantic v2, lax mode, unknown fields allowed (as vLLM's are) ----------


class Lax(BaseModel):
    model_config = ConfigDict(extra="allow")


class Part(Lax):
    type: str = "text"
    text: str | None = None


class ChatMessage(Lax):
    role: str
    content: str | list[Part] | None = None


class StreamOptions(Lax):
    include_usage: bool | None = None


class ChatRequest(Lax):
    model: str
    messages: list[ChatMessage]
    n: int | None = 1
    best_of: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    reasoning_effort: str | None = None
    models: list[str] | None = None  # OpenRouter: models to fall back on


class CompletionRequest(Lax):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    n: int | None = 1
    best_of: int | None = None
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class EmbeddingRequest(Lax):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str | None = "float"


class Reasoning(Lax):
    effort: str | None = None


class ResponseItem(Lax):
    role: str = "user"
    content: str | list[Part] | None = None


class ResponsesRequest(Lax):
    model: str
    input: str | list[ResponseItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    reasoning: Reasoning | None = None
    stream: bool | None = False
    background: bool | None = False


class Block(Lax):
    type: str = "text"
    text: str | None = None
    cache_control: dict[str, Any] | None = None


class AnthropicMessage(Lax):
    role: str
    content: str | list[Block]


class Thinking(Lax):
    type: str
    budget_tokens: int | None = None


class MessagesRequest(Lax):
    model: str
    max_tokens: int
    messages: list[AnthropicMessage]
    system: str | list[Block] | None = None
    stream: bool | None = False
    thinking: Thinking | None = None


class ImageRequest(Lax):
    prompt: str
    model: str | None = None
    n: int | None = 1


class SpeechRequest(Lax):
    input: str
    model: str | None = None
    voice: str | None = None


class BatchRequest(Lax):
    input_file_id: str
    endpoint: str = "/v1/chat/completions"
    completion_window: str = "24h"


class FineTuningRequest(Lax):
    training_file: str
    model: str | None = None


class ThreadRunRequest(Lax):
    assistant_id: str | None = None
    thread: dict[str, Any] | None = None


# --- the server --------------------------------------------------------------------------------


class RealUpstream:
    """FastAPI app + uvicorn on a free loopback port, in a daemon thread."""

    __test__ = False  # not a test class

    def __init__(self, models: list[dict[str, Any]], **behaviour: Any) -> None:
        self.models = {m["id"]: _card(m) for m in models}
        self.default_model = models[0]["id"]
        self.behaviour = Behaviour(**behaviour)
        self.app = build_app(self)
        self.url = ""
        self.files: dict[str, bytes] = {}
        self._cached_blocks: set[str] = set()  # Anthropic prompt cache: texts written once
        self._served: list[Served] = []
        self._in_flight = 0
        self._changed = threading.Condition()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- life ----------------------------------------------------------------------------

    def start(self) -> RealUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(Recorder(Compressor(PathRewriter(self.app, self), self), self),
                                log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=30, h11_max_incomplete_event_size=4 << 20)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="real-upstream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the real upstream did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def __enter__(self) -> RealUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use ------------------------------------------------------------------

    @contextlib.contextmanager
    def behave(self, **changes: Any) -> Iterator[Behaviour]:
        """Change how the upstream behaves for the length of a block."""
        before = self.behaviour
        self.behaviour = replace(before, **changes)
        try:
            yield self.behaviour
        finally:
            self.behaviour = before

    def mark(self) -> int:
        with self._changed:
            return len(self._served)

    def since(self, mark: int) -> list[Served]:
        """Requests that reached the upstream after ``mark()`` (wait_idle first)."""
        with self._changed:
            return list(self._served[mark:])

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Wait until no request (or background work) is in progress."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self._in_flight} requests still in progress")
                self._changed.wait(left)

    def add_file(self, content: bytes) -> str:
        """A file as if uploaded earlier by the operator (for batches and fine-tuning)."""
        file_id = "file-" + uuid.uuid4().hex[:24]
        self.files[file_id] = content
        return file_id

    # -- bookkeeping (called on the server's loop) ---------------------------------------

    def _begin(self, served: Served) -> None:
        with self._changed:
            self._served.append(served)
            self._in_flight += 1

    def _begin_background(self) -> None:
        """Work that goes on after its answer was sent (ended with ``_end``)."""
        with self._changed:
            self._in_flight += 1

    def _end(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def model(self, name: str, fallbacks: list[str] | None = None) -> ModelCard:
        """The model that runs: the one named, or (OpenRouter) the first fallback that is up."""
        down = self.behaviour.down
        for candidate in [name, *(fallbacks or [])]:
            if candidate in self.models and candidate not in down:
                return self.models[candidate]
        if name in self.models:
            raise ApiFailure(503, f"The provider of {name} is down.", "server_error")
        raise ApiFailure(404, f"The model `{name}` does not exist.", "NotFoundError",
                         param="model", code="model_not_found")

    def any_model(self, name: str | None) -> ModelCard:
        """For endpoints that name models no price list knows: bill the default model."""
        return self.models.get(name or "", self.models[self.default_model])


def _card(entry: Mapping[str, Any]) -> ModelCard:
    top = entry.get("top_provider") or {}
    return ModelCard(entry["id"], int(entry["context_length"]), top.get("max_completion_tokens"))


# --- ASGI layers in front of FastAPI: recording, compression, path rewriting -----------------


class Recorder:
    """Outermost: records every request that reached the upstream, and its status."""

    def __init__(self, app: ASGIApp, upstream: RealUpstream) -> None:
        self.app = app
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        served = Served(method=scope.get("method", "WEBSOCKET"),
                        wire_path=scope.get("raw_path", b"").decode("latin-1"),
                        query=scope.get("query_string", b"").decode("latin-1"),
                        headers={k.decode("latin-1").lower(): v.decode("latin-1")
                                 for k, v in scope["headers"]})
        scope["upstream.served"] = served
        self.upstream._begin(served)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                served.status = message["status"]
            elif message["type"] == "websocket.accept":
                served.status = 101
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            served.done = True
            self.upstream._end()


class PathRewriter:
    """What sits in front of the router: nginx's normalisation and the routing variants."""

    def __init__(self, app: FastAPI, upstream: RealUpstream) -> None:
        self.app = app
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        b = self.upstream.behaviour
        path: str = scope.get("path", "")
        if scope["type"] in ("http", "websocket"):
            if b.normalise_paths:
                normalised = nginx_normalise(scope.get("raw_path", b"") or path.encode())
                if normalised is None:
                    await JSONResponse({"error": {"message": "Bad Request"}}, 400)(
                        scope, receive, send)
                    return
                path = normalised
            if b.strip_path_params:
                path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
            if b.case_insensitive_routes:
                path = path.lower()
            if b.trailing_slash == "accept" and len(path) > 1:
                path = path.rstrip("/") or "/"
            self.app.router.redirect_slashes = b.trailing_slash == "redirect"
            scope = {**scope, "path": path, "raw_path": quote(path).encode()}
            scope["upstream.served"].path = path
        await self.app(scope, receive, send)


def nginx_normalise(raw_path: bytes) -> str | None:
    """nginx's reading of a request path: %XX decoded (%2F too), slashes merged, ``.`` and
    ``..`` resolved; None where nginx answers 400 (``..`` above the root)."""
    decoded = unquote_to_bytes(raw_path).decode("utf-8", "replace")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment)
    trailing = decoded.endswith(("/", "/.", "/..")) and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


class Compressor:
    """Compresses answers as a server with compression on does: whenever the client's
    Accept-Encoding allows it, JSON and event streams alike (flushed per chunk, so a stream
    stays live), or always with ``compress_anyway``."""

    def __init__(self, app: ASGIApp, upstream: RealUpstream) -> None:
        self.app = app
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        b = self.upstream.behaviour
        accepted = dict(scope["headers"]).get(b"accept-encoding", b"").decode("latin-1")
        coding = b.compress_anyway or (choose_coding(accepted) if b.compress_answers else None)
        if coding is None:
            await self.app(scope, receive, send)
            return
        encoder: Encoder | None = None

        async def sending(message: Message) -> None:
            nonlocal encoder
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"content-length"]
                kinds = [v for k, v in headers if k.lower() == b"content-type"]
                already = any(k.lower() == b"content-encoding" for k, _ in headers)
                if kinds and not already and kinds[0].startswith(
                        (b"application/json", b"text/event-stream", b"text/plain")):
                    encoder = Encoder(coding)
                    headers += [(b"content-encoding", coding.encode()),
                                (b"vary", b"accept-encoding")]
                    message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and encoder is not None:
                more = message.get("more_body", False)
                body = encoder.feed(message.get("body", b""), final=not more)
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, sending)


def choose_coding(accept_encoding: str) -> str | None:
    """The client's first acceptable coding that the upstream speaks (``*`` means gzip)."""
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = params.strip().removeprefix("q=")
        if params and q.replace(".", "", 1).isdigit() and float(q) == 0:
            continue
        if name == "*":
            return "gzip"
        if name in CODINGS:
            return name
    return None


class Encoder:
    """One compressed body, written in pieces that can each be decoded as they arrive."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding in ("gzip", "deflate"):
            self._zlib = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
        elif coding == "br":
            self._br = brotli.Compressor()
        elif coding == "zstd":
            self._zstd = zstandard.ZstdCompressor().compressobj()
        else:
            raise ValueError(f"unknown coding {coding}")

    def feed(self, data: bytes, final: bool) -> bytes:
        if self.coding in ("gzip", "deflate"):
            out = self._zlib.compress(data)
            return out + self._zlib.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
        if self.coding == "br":
            out = self._br.process(data)
            return bytes(out + (self._br.finish() if final else self._br.flush()))
        out = self._zstd.compress(data)
        return bytes(out + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH if final
                                            else zstandard.COMPRESSOBJ_FLUSH_BLOCK))


def decode_body(body: bytes, content_encoding: str) -> bytes:
    """A request body as the app reads it: every listed coding undone, last applied first."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        try:
            if coding in ("gzip", "x-gzip"):
                body = zlib.decompress(body, wbits=47)
            elif coding == "deflate":
                try:
                    body = zlib.decompress(body)
                except zlib.error:
                    body = zlib.decompress(body, wbits=-15)  # raw deflate, as some clients send
            elif coding == "br":
                body = brotli.decompress(body)
            elif coding == "zstd":
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30)
            elif coding != "identity":
                raise ApiFailure(415, f"Unsupported Content-Encoding {coding!r}.",
                                 "invalid_request_error")
        except (zlib.error, brotli.error, zstandard.ZstdError) as e:
            raise ApiFailure(400, f"The body is not valid {coding}: {e}",
                             "invalid_request_error") from None
    return body


# --- FastAPI: request reading, errors, routes --------------------------------------------------


class ApiFailure(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param,
                               "code": code}}


class UpstreamRequest(Request):
    """The request as the app reads it: Content-Encoding undone, JSON keys folded like Go's
    encoding/json when the upstream is set to (a key that matches a known field ignoring case
    sets that field; the last one wins)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_decoded_body"):
            raw = await super().body()
            self._decoded_body = decode_body(raw, self.headers.get("content-encoding", ""))
        return self._decoded_body

    async def json(self) -> Any:
        if not hasattr(self, "_parsed_json"):
            upstream: RealUpstream = self.app.state.upstream
            hook = _fold_keys if upstream.behaviour.case_insensitive_keys else None
            self._parsed_json = json.loads(await self.body(), object_pairs_hook=hook)
        return self._parsed_json


def _known_fields() -> dict[str, str]:
    names: set[str] = set()
    for model in (ChatRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest,
                  MessagesRequest, StreamOptions, ChatMessage, Part, Reasoning, Block, Thinking):
        names.update(model.model_fields)
    return {name.lower(): name for name in names}


_FIELDS = _known_fields()


def _fold_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        out[_FIELDS.get(key.lower(), key)] = value
    return out


class UpstreamRoute(APIRoute):
    """FastAPI's documented way to read bodies differently: a route class whose handler gets
    our request class."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_as_the_upstream(request: Request) -> Response:
            ours = UpstreamRequest(request.scope, request.receive)
            try:
                await ours.body()  # FastAPI would turn a decoding failure into a bare 400
            except ApiFailure as e:
                return JSONResponse(e.body, e.status)
            return await handler(ours)

        return read_as_the_upstream


def build_app(upstream: RealUpstream) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.upstream = upstream
    app.router.route_class = UpstreamRoute

    @app.exception_handler(ApiFailure)
    async def failure(request: Request, exc: ApiFailure) -> Response:
        return JSONResponse(exc.body, exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        # vLLM answers pydantic's complaints as an OpenAI 400.
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return JSONResponse({"error": {"message": str(first.get("msg", "invalid request")),
                                       "type": "BadRequestError", "param": ".".join(loc) or None,
                                       "code": 400}}, 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                       "param": None, "code": exc.status_code}}, exc.status_code)

    routes: list[tuple[str, Callable[..., Awaitable[Any]], str]] = [
        ("/v1/chat/completions", chat_completions, "POST"),
        ("/v1/completions", completions, "POST"),
        ("/v1/embeddings", embeddings, "POST"),
        ("/v1/responses", responses, "POST"),
        ("/v1/messages", messages, "POST"),
        ("/v1/models", list_models, "GET"),
        ("/v1/files", upload_file, "POST"),
        ("/v1/batches", create_batch, "POST"),
        ("/v1/realtime/sessions", realtime_session, "POST"),
        ("/v1/fine_tuning/jobs", fine_tuning_job, "POST"),
        ("/v1/threads/runs", thread_run, "POST"),
        ("/v1/images/generations", generate_images, "POST"),
        ("/v1/audio/speech", speech, "POST"),
    ]
    for path, handler, method in routes:
        app.add_api_route(path, handler, methods=[method])
    app.add_api_websocket_route("/v1/realtime", realtime_socket)
    return app


def _upstream(request: Request | WebSocket) -> RealUpstream:
    upstream: RealUpstream = request.app.state.upstream
    return upstream


def _served(request: Request | WebSocket, endpoint: str, body: BaseModel | None) -> Served:
    served: Served = request.scope["upstream.served"]
    served.endpoint = endpoint
    served.body = body.model_dump(exclude_unset=True) if body is not None else None
    return served


# --- the model ---------------------------------------------------------------------------------


def words(count: int, start: int = 0) -> list[str]:
    return [VOCABULARY[i % len(VOCABULARY)] for i in range(start, start + count)]


def count_words(value: Any) -> int:
    """Prompt tokens in a piece of a request: words of its text, one per token id."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, BaseModel):
        text = getattr(value, "text", None)
        content = getattr(value, "content", None)
        return count_words(text) + count_words(content)
    return 0


@dataclass(slots=True)
class Plan:
    """What one request will generate: per choice, hidden reasoning then visible words."""

    model: ModelCard
    prompt_tokens: int
    per_choice: int  # completion tokens of each generated choice
    reasoning: int  # of which hidden reasoning
    generated: int  # choices generated (best_of counts)
    returned: int  # choices returned

    @property
    def visible(self) -> int:
        return self.per_choice - self.reasoning

    def bill(self, visible_done: int | None = None) -> Bill:
        """The work: everything, or (a stream cut short) the reasoning and words generated."""
        completion = (self.per_choice * self.generated if visible_done is None
                      else self.reasoning * self.generated + visible_done)
        return Bill(self.model.id, self.prompt_tokens, completion)


def plan(upstream: RealUpstream, model: ModelCard, prompt_tokens: int, cap: int | None,
         n: int | None = 1, best_of: int | None = None, effort: str | None = None,
         default: int | None = None, cap_name: str = "max_tokens") -> Plan:
    """vLLM's checks and the model's generation for one prompt."""
    b = upstream.behaviour
    n = 1 if n is None else n
    if n < 1:
        raise ApiFailure(400, "n must be at least 1.", "BadRequestError", param="n")
    if best_of is not None and best_of < n:
        raise ApiFailure(400, f"best_of must be greater than or equal to n, got n={n} and "
                         f"best_of={best_of}.", "BadRequestError", param="best_of")
    if cap is not None and cap < 1:
        raise ApiFailure(400, f"{cap_name} must be at least 1, got {cap}.", "BadRequestError",
                         param=cap_name)
    room = model.context_length - prompt_tokens
    if b.enforce_limits:
        if room <= 0 or (cap is not None and cap > room):
            raise ApiFailure(400, f"This model's maximum context length is "
                             f"{model.context_length} tokens. However, you requested "
                             f"{prompt_tokens + (cap or 0)} tokens ({prompt_tokens} in the "
                             f"messages, {cap or 0} in the completion).", "BadRequestError",
                             param=cap_name)
        limit = model.max_completion_tokens
        if cap is not None and limit is not None and cap > limit:
            raise ApiFailure(400, f"{cap_name} is too large: {cap}. This model supports at "
                             f"most {limit} completion tokens.", "invalid_request_error",
                             param=cap_name)
    reasoning = REASONING.get(effort or "", 0)
    if cap is not None:
        per_choice = cap
    else:
        per_choice = reasoning + (b.words_without_cap if default is None else default)
        for bound in (model.max_completion_tokens, max(room, 0)):
            if b.enforce_limits and bound is not None:
                per_choice = min(per_choice, bound)
    return Plan(model, prompt_tokens, per_choice, min(reasoning, per_choice),
                max(n, best_of or 0), n)


def reported(upstream: RealUpstream, usage: dict[str, Any]) -> dict[str, Any] | None:
    """The usage the answer carries: the truth, or the lie the upstream is set to tell."""
    mode = upstream.behaviour.usage
    if mode == "none":
        return None
    if mode == "honest":
        return usage

    def lie(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: lie(v) for k, v in value.items()}
        if isinstance(value, int) and not isinstance(value, bool):
            return -value if mode == "negative" else ABSURD
        return value

    lied: dict[str, Any] = lie(usage)
    return lied


def openai_usage(bill: Bill, reasoning: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": bill.prompt_tokens, "completion_tokens": bill.completion_tokens,
            "total_tokens": bill.prompt_tokens + bill.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + payload + b"\n\n"


async def work(upstream: RealUpstream) -> None:
    """The time the model takes before the answer's headers."""
    if upstream.behaviour.latency:
        await asyncio.sleep(upstream.behaviour.latency)


async def paced(upstream: RealUpstream, request: Request) -> bool:
    """Between streamed words: wait, and say whether to go on (the client may have left)."""
    b = upstream.behaviour
    if b.word_interval:
        await asyncio.sleep(b.word_interval)
    return b.finish_after_hangup or not await request.is_disconnected()


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --- metered endpoints ---------------------------------------------------------------------------


async def chat_completions(body: ChatRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "chat", body)
    model = upstream.model(body.model, body.models)
    prompt = sum(count_words(m.content) for m in body.messages)
    cap = body.max_completion_tokens or body.max_tokens  # vLLM: the first non-zero
    cap_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    p = plan(upstream, model, prompt, cap, body.n, body.best_of, body.reasoning_effort,
             cap_name=cap_name)
    if body.stream and p.generated > p.returned:
        raise ApiFailure(400, "best_of cannot be used with stream.", "BadRequestError",
                         param="best_of")
    await work(upstream)
    rid, created = _id("chatcmpl"), int(time.time())
    finish = "length" if cap is not None else "stop"
    if not body.stream:
        bill = p.bill()
        served.bills.append(bill)
        usage = reported(upstream, openai_usage(bill, p.reasoning * p.generated))
        served.reported = usage
        answer: dict[str, Any] = {
            "id": rid, "object": "chat.completion", "created": created, "model": model.id,
            "choices": [{"index": i, "finish_reason": finish, "message": {
                "role": "assistant", "content": " ".join(words(p.visible, i))}}
                for i in range(p.returned)]}
        if usage is not None:
            answer["usage"] = usage
        return JSONResponse(answer)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model.id, "choices": choices, **extra})

    async def stream() -> AsyncIterator[bytes]:
        done = 0
        try:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None} for i in range(p.returned)])
            for w in range(p.visible):
                if not await paced(upstream, request):
                    return
                for i in range(p.returned):
                    done += 1
                    yield chunk([{"index": i, "delta": {"content": words(1, w + i)[0] + " "},
                                  "finish_reason": None}])
            yield chunk([{"index": i, "delta": {}, "finish_reason": finish}
                         for i in range(p.returned)])
            if include_usage:
                usage = reported(upstream, openai_usage(p.bill(), p.reasoning * p.generated))
                served.reported = usage
                if usage is not None:
                    yield chunk([], usage=usage)
            yield sse(b"[DONE]")
        finally:
            served.bills.append(p.bill(done))

    return StreamingResponse(stream(), media_type="text/event-stream")


async def completions(body: CompletionRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "completions", body)
    model = upstream.model(body.model)
    raw = body.prompt
    prompts: list[Any]
    if isinstance(raw, str):
        prompts = [raw]
    elif raw and isinstance(raw[0], (str, list)):
        prompts = list(raw)
    else:
        prompts = [raw]  # one prompt of token ids
    plans = [plan(upstream, model, count_words(one), body.max_tokens, body.n, body.best_of,
                  default=COMPLETIONS_DEFAULT_CAP) for one in prompts]
    if body.stream and plans[0].generated > plans[0].returned:
        raise ApiFailure(400, "best_of cannot be used with stream.", "BadRequestError",
                         param="best_of")
    await work(upstream)
    rid, created = _id("cmpl"), int(time.time())
    n = plans[0].returned
    finish = "length" if body.max_tokens else "stop"

    def total(done: int | None = None) -> Bill:
        prompt = sum(p.prompt_tokens for p in plans)
        everything = sum(p.per_choice * p.generated for p in plans)
        return Bill(model.id, prompt, everything if done is None else done)

    if not body.stream:
        bill = total()
        served.bills.append(bill)
        usage = reported(upstream, openai_usage(bill))
        served.reported = usage
        answer: dict[str, Any] = {
            "id": rid, "object": "text_completion", "created": created, "model": model.id,
            "choices": [{"index": k * n + i, "finish_reason": finish, "logprobs": None,
                         "text": " ".join(words(p.visible, i))}
                        for k, p in enumerate(plans) for i in range(n)]}
        if usage is not None:
            answer["usage"] = usage
        return JSONResponse(answer)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": rid, "object": "text_completion", "created": created,
                    "model": model.id, "choices": choices, **extra})

    async def stream() -> AsyncIterator[bytes]:
        done = 0
        try:
            for w in range(max(p.visible for p in plans)):
                if not await paced(upstream, request):
                    return
                for k, p in enumerate(plans):
                    if w >= p.visible:
                        continue
                    for i in range(n):
                        done += 1
                        yield chunk([{"index": k * n + i, "text": words(1, w + i)[0] + " ",
                                      "finish_reason": None, "logprobs": None}])
            yield chunk([{"index": j, "text": "", "finish_reason": finish, "logprobs": None}
                         for j in range(len(plans) * n)])
            if include_usage:
                usage = reported(upstream, openai_usage(total()))
                served.reported = usage
                if usage is not None:
                    yield chunk([], usage=usage)
            yield sse(b"[DONE]")
        finally:
            served.bills.append(total(done))

    return StreamingResponse(stream(), media_type="text/event-stream")


async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "embeddings", body)
    model = upstream.model(body.model)
    raw = body.input
    inputs: list[Any] = ([raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int))
                         else list(raw))
    counts = [count_words(one) for one in inputs]
    if upstream.behaviour.enforce_limits and any(c > model.context_length for c in counts):
        raise ApiFailure(400, "An input is longer than the model's context.", "BadRequestError",
                         param="input")
    await work(upstream)
    bill = Bill(model.id, sum(counts), 0)
    served.bills.append(bill)
    usage = reported(upstream, {"prompt_tokens": bill.prompt_tokens,
                                "total_tokens": bill.prompt_tokens})
    served.reported = usage
    data = []
    for i, count in enumerate(counts):
        vector = [((count + i + d) % 7) / 7 for d in range(8)]
        embedding: Any = vector
        if body.encoding_format == "base64":
            embedding = base64.b64encode(struct.pack("<8f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    answer: dict[str, Any] = {"object": "list", "model": model.id, "data": data}
    if usage is not None:
        answer["usage"] = usage
    return JSONResponse(answer)


async def responses(body: ResponsesRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "responses", body)
    model = upstream.model(body.model)
    prompt = count_words(body.instructions) + count_words(body.input)
    effort = body.reasoning.effort if body.reasoning else None
    p = plan(upstream, model, prompt, body.max_output_tokens, effort=effort,
             cap_name="max_output_tokens")
    rid, created = _id("resp"), int(time.time())

    def response(status: str, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        return {"id": rid, "object": "response", "created_at": created, "status": status,
                "model": model.id, "output": [] if not text else [
                    {"type": "message", "id": _id("msg"), "role": "assistant",
                     "status": "completed",
                     "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": usage}

    def responses_usage(bill: Bill) -> dict[str, Any] | None:
        return reported(upstream, {
            "input_tokens": bill.prompt_tokens, "output_tokens": bill.completion_tokens,
            "total_tokens": bill.prompt_tokens + bill.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": p.reasoning}})

    if body.background:
        # The work happens after the answer: whoever reads usage from the answer sees none.
        async def later() -> None:
            try:
                await work(upstream)
                await asyncio.sleep(0.05)
                served.bills.append(p.bill())
            finally:
                upstream._end()

        upstream._begin_background()
        asyncio.get_running_loop().create_task(later())
        return JSONResponse(response("queued", "", None))
    await work(upstream)
    text = " ".join(words(p.visible))
    if not body.stream:
        served.bills.append(p.bill())
        served.reported = responses_usage(p.bill())
        return JSONResponse(response("completed", text, served.reported))

    async def stream() -> AsyncIterator[bytes]:
        done = 0
        try:
            yield sse({"type": "response.created",
                       "response": response("in_progress", "", None)}, "response.created")
            for w in range(p.visible):
                if not await paced(upstream, request):
                    return
                done += 1
                yield sse({"type": "response.output_text.delta", "output_index": 0,
                           "content_index": 0, "delta": words(1, w)[0] + " "},
                          "response.output_text.delta")
            served.reported = responses_usage(p.bill())
            yield sse({"type": "response.completed",
                       "response": response("completed", text, served.reported)},
                      "response.completed")
        finally:
            served.bills.append(p.bill(done))

    return StreamingResponse(stream(), media_type="text/event-stream")


async def messages(body: MessagesRequest, request: Request) -> Response:
    """Anthropic's Messages API: usage as input/output tokens plus prompt-cache tokens."""
    upstream = _upstream(request)
    served = _served(request, "messages", body)
    model = upstream.model(body.model)
    blocks: list[Any] = ([] if body.system is None else
                         [body.system] if isinstance(body.system, str) else list(body.system))
    for m in body.messages:
        blocks += [m.content] if isinstance(m.content, str) else list(m.content)
    fresh = creation = read = 0
    for block in blocks:
        count = count_words(block)
        if isinstance(block, Block) and block.cache_control is not None and block.text:
            if block.text in upstream._cached_blocks:
                read += count
            else:
                upstream._cached_blocks.add(block.text)
                creation += count
        else:
            fresh += count
    budget = body.thinking.budget_tokens if body.thinking and body.thinking.budget_tokens else 0
    if budget and budget >= body.max_tokens:
        raise ApiFailure(400, "max_tokens must be greater than thinking.budget_tokens",
                         "invalid_request_error", param="max_tokens")
    p = plan(upstream, model, fresh + creation + read, body.max_tokens)
    p.reasoning = min(budget, p.per_choice)
    await work(upstream)
    rid = _id("msg")

    def usage(output: int) -> dict[str, Any] | None:
        return reported(upstream, {"input_tokens": fresh, "output_tokens": output,
                                   "cache_creation_input_tokens": creation,
                                   "cache_read_input_tokens": read})

    def message(text: str, output: int) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if p.reasoning:
            content.append({"type": "thinking", "thinking": "(summary)", "signature": "x"})
        if text:
            content.append({"type": "text", "text": text})
        return {"id": rid, "type": "message", "role": "assistant", "model": model.id,
                "content": content, "stop_reason": "max_tokens", "stop_sequence": None,
                "usage": usage(output)}

    if not body.stream:
        served.bills.append(p.bill())
        served.reported = usage(p.per_choice)
        return JSONResponse(message(" ".join(words(p.visible)), p.per_choice))

    async def stream() -> AsyncIterator[bytes]:
        done = 0
        try:
            start = message("", 1)
            yield sse({"type": "message_start", "message": start}, "message_start")
            yield sse({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}, "content_block_start")
            for w in range(p.visible):
                if not await paced(upstream, request):
                    return
                done += 1
                yield sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": words(1, w)[0] + " "}},
                          "content_block_delta")
            yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            final = usage(p.per_choice)
            served.reported = final
            delta: dict[str, Any] = {"type": "message_delta",
                                     "delta": {"stop_reason": "max_tokens",
                                               "stop_sequence": None}}
            if final is not None:
                delta["usage"] = {"output_tokens": final["output_tokens"]}
            yield sse(delta, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")
        finally:
            served.bills.append(p.bill(done))

    return StreamingResponse(stream(), media_type="text/event-stream")


async def list_models(request: Request) -> Response:
    upstream = _upstream(request)
    _served(request, "models", None)
    return JSONResponse({"object": "list", "data": [
        {"id": m.id, "object": "model", "context_length": m.context_length}
        for m in upstream.models.values()]})


# --- endpoints no proxy can meter (each bills its nominal work) --------------------------------


async def upload_file(request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "files", None)
    content_type = request.headers.get("content-type", "")
    raw = await request.body()
    content, purpose, name = raw, "batch", "upload.jsonl"
    if content_type.startswith("multipart/form-data"):
        parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"content-type: " + content_type.encode() + b"\r\n\r\n" + raw)
        for part in parsed.iter_parts():
            field_name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            payload = payload if isinstance(payload, bytes) else b""
            if field_name == "file":
                content, name = payload, part.get_filename() or name
            elif field_name == "purpose":
                purpose = payload.decode()
    file_id = upstream.add_file(content)
    served.body = {"purpose": purpose, "filename": name, "bytes": len(content)}
    return JSONResponse({"id": file_id, "object": "file", "bytes": len(content),
                         "purpose": purpose, "filename": name, "created_at": int(time.time())})


async def create_batch(body: BatchRequest, request: Request) -> Response:
    """Runs every request of the input file (at once: the bill is the same)."""
    upstream = _upstream(request)
    served = _served(request, "batches", body)
    content = upstream.files.get(body.input_file_id)
    if content is None:
        raise ApiFailure(404, f"No such file: {body.input_file_id}", "invalid_request_error",
                         param="input_file_id")
    lines = [json.loads(line) for line in content.splitlines() if line.strip()]
    await work(upstream)
    for line in lines:
        chat = ChatRequest.model_validate(line["body"])
        model = upstream.any_model(chat.model)
        prompt = sum(count_words(m.content) for m in chat.messages)
        cap = chat.max_completion_tokens or chat.max_tokens
        per_choice = cap if cap is not None else upstream.behaviour.words_without_cap
        served.bills.append(Bill(model.id, prompt, per_choice * (chat.n or 1)))
    return JSONResponse({"id": _id("batch"), "object": "batch", "endpoint": body.endpoint,
                         "status": "completed", "input_file_id": body.input_file_id,
                         "request_counts": {"total": len(lines), "completed": len(lines),
                                            "failed": 0}})


async def realtime_session(request: Request) -> Response:
    """Hands out an ephemeral credential that spends on the operator's account."""
    upstream = _upstream(request)
    served = _served(request, "realtime_sessions", None)
    body = await request.json()
    model = upstream.any_model(body.get("model") if isinstance(body, dict) else None)
    served.body = body if isinstance(body, dict) else None
    served.bills.append(Bill(model.id, 0, REALTIME_SESSION_TOKENS))
    return JSONResponse({"id": _id("sess"), "object": "realtime.session", "model": model.id,
                         "client_secret": {"value": "ek_" + uuid.uuid4().hex,
                                           "expires_at": int(time.time()) + 60}})


async def fine_tuning_job(body: FineTuningRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "fine_tuning", body)
    content = upstream.files.get(body.training_file)
    if content is None:
        raise ApiFailure(404, f"No such file: {body.training_file}", "invalid_request_error",
                         param="training_file")
    model = upstream.any_model(body.model)
    served.bills.append(Bill(model.id, count_words(content.decode(errors="replace"))
                             * FINE_TUNING_EPOCHS, 0))
    return JSONResponse({"id": _id("ftjob"), "object": "fine_tuning.job", "status": "queued",
                         "model": model.id, "training_file": body.training_file})


async def thread_run(body: ThreadRunRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "threads_runs", body)
    model = upstream.default_model
    thread_messages = (body.thread or {}).get("messages") or []
    prompt = sum(count_words(m.get("content")) for m in thread_messages if isinstance(m, dict))
    served.bills.append(Bill(model, prompt, upstream.behaviour.words_without_cap))
    return JSONResponse({"id": _id("run"), "object": "thread.run", "status": "queued",
                         "assistant_id": body.assistant_id})


async def generate_images(body: ImageRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "images", body)
    model = upstream.any_model(body.model)
    n = body.n or 1
    served.bills.append(Bill(model.id, count_words(body.prompt), IMAGE_TOKENS * n))
    pixel = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": pixel}] * n})


async def speech(body: SpeechRequest, request: Request) -> Response:
    upstream = _upstream(request)
    served = _served(request, "audio_speech", body)
    model = upstream.any_model(body.model)
    spoken = count_words(body.input)
    served.bills.append(Bill(model.id, spoken, AUDIO_TOKENS_PER_WORD * spoken))
    return Response(b"ID3" + bytes(64), media_type="audio/mpeg")


async def realtime_socket(websocket: WebSocket) -> None:
    """The Realtime API over a WebSocket: a session billed once it is open."""
    upstream = _upstream(websocket)
    served = _served(websocket, "realtime", None)
    await websocket.accept()
    served.bills.append(Bill(upstream.default_model, 0, REALTIME_SESSION_TOKENS))
    with contextlib.suppress(Exception):
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(json.dumps({"type": "echo", "data": text}))
