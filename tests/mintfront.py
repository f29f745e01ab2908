"""A front for a test mint that can delay or break its answers: a mint that is slow, erroring
or down, as the proxy sees it. Tokens minted through the front name it as their mint."""

from __future__ import annotations

import asyncio

import httpx

from routstr_addon.dev.demo import MiniServer, Request, Responder


class MintFront(MiniServer):
    def __init__(self, mint_url: str) -> None:
        super().__init__()
        self.mint_url = mint_url
        self.delay: dict[str, float] = {}  # path → seconds to hold the mint's answer back
        self.fail: dict[str, int] = {}  # path → status to answer instead of asking the mint
        # path → (status, JSON body, times): an error as a mint words it, the next few times
        self.refuse: dict[str, tuple[int, dict[str, object], int]] = {}
        self.calls: list[str] = []

    async def handle(self, request: Request, responder: Responder) -> None:
        path = request.path.split("?", 1)[0]
        self.calls.append(path)
        if path in self.refuse:
            status, body, times = self.refuse[path]
            if times <= 1:
                del self.refuse[path]
            else:
                self.refuse[path] = (status, body, times - 1)
            await responder.send(status, body)
            return
        if path in self.fail:
            await responder.send(self.fail[path], b"mint trouble", content_type="text/plain")
            return
        headers = {k: v for k, v in request.headers.items()
                   if k in ("content-type", "accept")}
        async with httpx.AsyncClient(base_url=self.mint_url, timeout=30) as client:
            answer = await client.request(request.method, request.path, content=request.body,
                                          headers=headers)
        if path in self.delay:
            await asyncio.sleep(self.delay[path])
        await responder.send(answer.status_code, answer.content,
                             content_type=answer.headers.get("content-type", "application/json"))
