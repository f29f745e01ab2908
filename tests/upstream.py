"""The upstream the tests put behind the proxy: the demo echo model plus faults on demand.

A request picks a behaviour with its ``x-scenario`` header (the proxy forwards it unchanged):

* ``error-500`` / ``error-429``: an OpenAI-shaped error with that status;
* ``no-usage``: a normal answer without any usage figures;
* ``slow``: streamed chunks 0.4 s apart;
* ``cut``: a chunked stream whose connection drops after three events;
* ``cut-close``: a close-delimited stream that stops after three events, with no [DONE];
* ``endless``: a stream that goes on (0.2 s per chunk) until the client leaves;
* ``hang``: no answer for 30 s;
* ``garbage``: an SSE stream of lines that are not JSON, then [DONE].

Every request is recorded (method, path, headers, JSON body) for assertions.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from routstr_addon.dev.demo import EchoUpstream, Request, Responder, sse


class TestUpstream(EchoUpstream):
    __test__ = False  # not a test class

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def seen(self, path_suffix: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith(path_suffix)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def delay(self, request: Request) -> float:
        return 0.4 if request.headers.get("x-scenario") == "slow" else 0.0

    async def handle(self, request: Request, responder: Responder) -> None:
        with self._lock:
            self.requests.append(request)
        scenario = request.headers.get("x-scenario", "")
        if scenario.startswith("error-"):
            status = int(scenario.removeprefix("error-"))
            await responder.send(status, {"error": {"message": f"upstream says {status}",
                                                    "type": "server_error", "param": None,
                                                    "code": None}})
            return
        if scenario == "hang":
            await asyncio.sleep(30)
            return
        if scenario in ("cut", "cut-close", "endless", "garbage"):
            await self.faulty_stream(scenario, request, responder)
            return
        if scenario == "no-usage":
            await self.without_usage(request, responder)
            return
        await super().handle(request, responder)

    async def without_usage(self, request: Request, responder: Responder) -> None:
        body = request.json()
        text = " ".join(self.reply_words(body))
        if body.get("stream"):
            await responder.start()
            for word in text.split():
                await responder.chunk(sse({"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}))
            await responder.chunk(sse(b"[DONE]"))
            await responder.end()
            return
        await responder.send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant",
                                                            "content": text}}]})

    async def faulty_stream(self, scenario: str, request: Request, responder: Responder) -> None:
        def event(i: int) -> bytes:
            return sse({"object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]})

        writer = responder.writer
        if scenario == "cut-close":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"connection: close\r\n\r\n")
            for i in range(3):
                writer.write(event(i))
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.close()
            return
        await responder.start()
        if scenario == "garbage":
            for line in (b"data: {not json\n\n", b"data: \x00\xff\n\n", b"garbage line\n\n",
                         b"data: [1, 2]\n\n", b"data: [DONE]\n\n"):
                await responder.chunk(line)
            await responder.end()
            return
        count = 3 if scenario == "cut" else 150
        for i in range(count):
            await responder.chunk(event(i))
            await asyncio.sleep(0.05 if scenario == "cut" else 0.2)
        # "cut": drop the connection in the middle of the chunked body
        writer.transport.abort()


def body_json(request: Request) -> Any:
    return json.loads(request.body)
