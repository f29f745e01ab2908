"""One provider as its own process, for routing tests: the test upstream (tests/upstream.py)
with one behaviour for every request, started with ``python -m tests.provider_proc MODE``.

MODE: ``ok``, ``error-500``, ``error-429``, ``error-503``, ``hang`` (no answer for 30 s).
It prints ``listening <port>`` once ready. ``GET /seen`` lists what it was asked (path, the
model named, whether it had the provider key), for assertions from the test process.
"""

from __future__ import annotations

import asyncio
import json
import sys

from routstr_addon.dev.demo import Request, Responder

from .upstream import TestUpstream


class Provider(TestUpstream):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    async def handle(self, request: Request, responder: Responder) -> None:
        if request.path == "/seen":
            await responder.send(200, [
                {"path": r.path, "model": _model(r), "auth": r.headers.get("authorization", ""),
                 "x-title": r.headers.get("x-title", "")}
                for r in self.seen("/completions")])
            return
        if self.mode != "ok" and request.method == "POST":
            request.headers["x-scenario"] = self.mode
        await super().handle(request, responder)


def _model(request: Request) -> str:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return ""
    return str(body.get("model", "")) if isinstance(body, dict) else ""


async def main(mode: str) -> None:
    server = Provider(mode)
    await server.start()
    print(f"listening {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
