"""A Lightning-address (LNURL-pay) server for the tests: real bolt11 invoices, taken from a
second FakeWallet mint's mint quotes, and a record of every amount it was asked for."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx

from routstr_addon.dev.demo import MiniServer, Request, Responder


@dataclass(frozen=True)
class Asked:
    user: str
    amount_msat: int
    invoice: str
    quote: str


class LnAddressServer(MiniServer):
    """``<user>@127.0.0.1:<port>`` receives payments into ``receiving_mint``'s quotes."""

    def __init__(self, receiving_mint: str) -> None:
        super().__init__()
        self.receiving_mint = receiving_mint
        self.asked: list[Asked] = []
        self._lock = threading.Lock()
        self.refuse = False  # answer callbacks with an LNURL error

    def address(self, user: str) -> str:
        return f"{user}@127.0.0.1:{self.port}"

    def requests_for(self, user: str) -> list[Asked]:
        with self._lock:
            return [a for a in self.asked if a.user == user]

    async def handle(self, request: Request, responder: Responder) -> None:
        parts = urlsplit(request.path)
        path = parts.path
        if path.startswith("/.well-known/lnurlp/"):
            user = path.rsplit("/", 1)[1]
            await responder.send(200, {
                "tag": "payRequest", "callback": f"{self.url}/lnurlp/callback/{user}",
                "minSendable": 1000, "maxSendable": 100_000_000_000,
                "metadata": json.dumps([["text/plain", f"payment to {user}"]]),
                "commentAllowed": 0})
            return
        if path.startswith("/lnurlp/callback/"):
            user = path.rsplit("/", 1)[1]
            amount = int(parse_qs(parts.query).get("amount", ["0"])[0])
            if self.refuse or amount % 1000:
                await responder.send(200, {"status": "ERROR", "reason": "cannot pay this"})
                return
            async with httpx.AsyncClient(base_url=self.receiving_mint, timeout=10) as client:
                quote = (await client.post("/v1/mint/quote/bolt11",
                                           json={"amount": amount // 1000, "unit": "sat"})).json()
            with self._lock:
                self.asked.append(Asked(user, amount, quote["request"], quote["quote"]))
            await responder.send(200, {"pr": quote["request"], "routes": []})
            return
        await responder.send(404, {"status": "ERROR", "reason": "not found"})
