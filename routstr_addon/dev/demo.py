"""A demo upstream: an OpenAI-compatible echo model, for trying the proxy with no provider.

It answers ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``
and ``/v1/models``, JSON and streaming, with real usage figures (one token per word), and says
in every answer that it is a demo. ``MiniServer`` is the small HTTP/1.1 server under it (keep-
alive, Content-Length bodies, chunked answers); the test suite builds its upstream on it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEMO_MODEL", "EchoUpstream", "MiniServer", "Request", "Responder", "run_in_thread"]

DEMO_MODEL = "demo-echo"
DEMO_PREFIX = "[demo echo, no real model] "


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass(slots=True)
class Responder:
    """Writes one answer; ``send`` for a whole body, ``start``/``chunk``/``end`` to stream."""

    writer: asyncio.StreamWriter
    keep_alive: bool = True
    streaming: bool = field(default=False, init=False)

    async def send(self, status: int, body: bytes | dict[str, Any] | list[Any],
                   content_type: str = "application/json",
                   headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                f"content-type: {content_type}", f"content-length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if not self.keep_alive:
            head.append("connection: close")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await self.writer.drain()

    async def start(self, status: int = 200, content_type: str = "text/event-stream") -> None:
        self.streaming = True
        self.writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\ncontent-type: {content_type}"
            "\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        )
        await self.writer.drain()

    async def chunk(self, data: bytes) -> None:
        if data:
            self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            411: "Length Required", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}


class MiniServer:
    """A minimal asyncio HTTP/1.1 server; subclasses implement ``handle``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port,
                                                  limit=2**24)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def handle(self, request: Request, responder: Responder) -> None:
        raise NotImplementedError

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        try:
            while True:
                request = await self._read(reader)
                if request is None:
                    break
                keep_alive = request.headers.get("connection", "").lower() != "close"
                responder = Responder(writer, keep_alive)
                await self.handle(request, responder)
                if not keep_alive or writer.is_closing():
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
        return Request(method, path, headers, body)


# --- the echo model -------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return text.split()


def text_of(value: Any) -> str:
    """All text in a prompt: strings, message contents, content parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(v) for v in value)
    if isinstance(value, dict):
        if "content" in value:
            return text_of(value["content"])
        if "text" in value:
            return text_of(value["text"])
    return ""


def last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return text_of(message.get("content"))
    return text_of(body.get("prompt") or body.get("input") or "")


def prompt_tokens(body: dict[str, Any]) -> int:
    text = text_of(body.get("messages") or body.get("prompt") or body.get("input") or "")
    return max(1, len(words(text)))


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


class EchoUpstream(MiniServer):
    """Answers like an OpenAI-compatible provider, with a reply that repeats the prompt."""

    model = DEMO_MODEL

    def reply_words(self, body: dict[str, Any]) -> list[str]:
        said = words(last_user_text(body)) or ["(nothing)"]
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or \
            body.get("max_output_tokens")
        out = words(DEMO_PREFIX) + said
        return out[: int(limit)] if isinstance(limit, int) and limit > 0 else out

    async def handle(self, request: Request, responder: Responder) -> None:
        path = request.path.split("?", 1)[0]
        if request.method == "GET" and path.rstrip("/").endswith("/models"):
            await responder.send(200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "demo"}]})
            return
        if request.method != "POST":
            await responder.send(404, _error("not found"))
            return
        try:
            body = request.json()
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError:
            await responder.send(400, _error("body is not JSON"))
            return
        delay = self.delay(request)
        if path.endswith("/chat/completions"):
            await self.chat(body, responder, delay)
        elif path.endswith("/completions"):
            await self.completion(body, responder, delay)
        elif path.endswith("/embeddings"):
            await self.embeddings(body, responder)
        elif path.endswith("/responses"):
            await self.responses(body, responder, delay)
        else:
            await responder.send(404, _error(f"no such endpoint {path}"))

    async def chat(self, body: dict[str, Any], responder: Responder, delay: float = 0) -> None:
        out = self.reply_words(body)
        usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": len(out),
                 "total_tokens": prompt_tokens(body) + len(out)}
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time()), \
            body.get("model", self.model)
        if not body.get("stream"):
            await responder.send(200, {
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": " ".join(out)}}],
                "usage": usage})
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        await responder.start()
        for i, word in self.stream_pieces(out):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            await responder.chunk(sse({**base, "choices": [
                {"index": 0, "delta": delta, "finish_reason": None}]}))
            await asyncio.sleep(delay)
        await responder.chunk(sse({**base, "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if include_usage:
            await responder.chunk(sse({**base, "choices": [], "usage": usage}))
        await responder.chunk(sse(b"[DONE]"))
        await responder.end()

    async def completion(self, body: dict[str, Any], responder: Responder,
                         delay: float = 0) -> None:
        out = self.reply_words(body)
        usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": len(out),
                 "total_tokens": prompt_tokens(body) + len(out)}
        base = {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion",
                "created": int(time.time()), "model": body.get("model", self.model)}
        if not body.get("stream"):
            await responder.send(200, {**base, "choices": [
                {"index": 0, "text": " ".join(out), "finish_reason": "stop", "logprobs": None}],
                "usage": usage})
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        await responder.start()
        for _, word in self.stream_pieces(out):
            await responder.chunk(sse({**base, "choices": [
                {"index": 0, "text": word, "finish_reason": None, "logprobs": None}]}))
            await asyncio.sleep(delay)
        if include_usage:
            await responder.chunk(sse({**base, "choices": [], "usage": usage}))
        await responder.chunk(sse(b"[DONE]"))
        await responder.end()

    async def embeddings(self, body: dict[str, Any], responder: Responder) -> None:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i,
                 "embedding": [round((len(text_of(x)) % 7) / 7, 3), 0.5, -0.25]}
                for i, x in enumerate(items)]
        tokens = max(1, len(words(text_of(items))))
        await responder.send(200, {"object": "list", "data": data,
                                   "model": body.get("model", self.model),
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def responses(self, body: dict[str, Any], responder: Responder,
                        delay: float = 0) -> None:
        out = self.reply_words(body)
        text = " ".join(out)
        ptokens = prompt_tokens(body)
        usage = {"input_tokens": ptokens, "output_tokens": len(out),
                 "total_tokens": ptokens + len(out)}
        rid = f"resp_{uuid.uuid4().hex[:16]}"
        message = {"type": "message", "id": f"msg_{rid}", "status": "completed",
                   "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response = {"id": rid, "object": "response", "created_at": int(time.time()),
                    "status": "completed", "model": body.get("model", self.model),
                    "output": [message], "usage": usage}
        if not body.get("stream"):
            await responder.send(200, response)
            return
        await responder.start()
        seq = 0
        await responder.chunk(b"event: response.created\n" + sse(
            {"type": "response.created", "sequence_number": seq,
             "response": {**response, "status": "in_progress", "output": [], "usage": None}}))
        for _, word in self.stream_pieces(out):
            seq += 1
            await responder.chunk(b"event: response.output_text.delta\n" + sse(
                {"type": "response.output_text.delta", "sequence_number": seq,
                 "item_id": message["id"], "output_index": 0, "content_index": 0,
                 "delta": word}))
            await asyncio.sleep(delay)
        await responder.chunk(b"event: response.completed\n" + sse(
            {"type": "response.completed", "sequence_number": seq + 1, "response": response}))
        await responder.end()

    @staticmethod
    def stream_pieces(out: list[str]) -> Iterator[tuple[int, str]]:
        for i, word in enumerate(out):
            yield i, word if i == 0 else " " + word

    def delay(self, request: Request) -> float:
        """Seconds between streamed chunks (none for the demo; tests slow it down)."""
        return 0.0


def _error(message: str, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


@contextlib.contextmanager
def run_in_thread(server: MiniServer) -> Iterator[MiniServer]:
    """Run a server on its own event loop in a daemon thread, for as long as the block lasts."""
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name=f"{type(server).__name__}", daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
