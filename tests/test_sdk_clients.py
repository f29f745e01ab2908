"""Clients nobody here wrote, driven as their authors drive them (issue 12, item 8).

* The original Routstr Python SDK's way: an ``openai`` client whose requests carry ``X-Cashu``
  and whose change is read from the ``X-Cashu`` response header only, JSON and streaming, the
  change of each request paying the next (for streams the header holds the change known at
  the start; the rest is claimed afterwards with ``POST /v1/balance/refund``).
* The official ``openai`` client streaming with x-cashu: cost and change arrive before
  ``data: [DONE]``, so they are read while the client still reads the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from routstr_addon.dev.localmint import LocalMint

from .conftest import Proxy, books_balance, expected_msat, raw
from .ecash_user import UserWallet

MODEL = "test/model"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "change, please"}]
MIN_SATS = -(-expected_msat(MODEL, 4096, 512) // 1000)


@pytest.fixture(autouse=True)
def _books(ecash_proxy: Proxy, mint: LocalMint) -> Iterator[None]:
    yield
    ecash_proxy.wait_settled()
    books_balance(ecash_proxy, mint.url)


def sdk_client(proxy: Proxy) -> OpenAI:
    """As routstr-python builds it: the OpenAI client, its key unused, X-Cashu per request."""
    return OpenAI(base_url=proxy.v1, api_key="unused-with-x-cashu", max_retries=0, timeout=30)


def amount(user: UserWallet, token: str | None) -> int:
    return user.amount(token) if token else 0


def test_sdk_json_change_from_the_header_pays_the_next_request(ecash_proxy: Proxy,
                                                                user: UserWallet) -> None:
    start = MIN_SATS * 4
    token: str | None = user.token(start)
    client = sdk_client(ecash_proxy)
    charged = 0
    for _ in range(3):
        assert token is not None
        raw_resp = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=64, extra_headers={"X-Cashu": token})
        completion = raw_resp.parse()
        assert completion.choices[0].message.content
        cost = int(raw_resp.headers["x-routstr-cost-msats"])
        charged += -(-cost // 1000)  # whole sats: the change is in the token's unit
        token = raw_resp.headers.get("x-cashu")  # the SDK reads the change here only
    assert amount(user, token) == start - charged
    assert user.receive(token or "") == start - charged


def test_sdk_streaming_change_from_the_header_pays_the_next_request(ecash_proxy: Proxy,
                                                                     user: UserWallet) -> None:
    start = MIN_SATS * 4
    first = user.token(start)
    token = first
    client = sdk_client(ecash_proxy)
    paid_with: list[str] = []
    costs: list[int] = []
    for _ in range(2):
        raw_resp = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=64, stream=True,
            extra_headers={"X-Cashu": token})
        early = raw_resp.headers.get("x-cashu")  # at once, before the answer
        text = "".join(c.choices[0].delta.content or "" for c in raw_resp.parse() if c.choices)
        assert text
        ecash_proxy.wait_settled()
        paid_with.append(token)
        costs.append(-(-int(_cost(ecash_proxy, token)) // 1000))
        assert early is not None
        token = early  # most of the change: the token less the reserved maximum
    # What the header could not carry yet is claimed afterwards, for each request.
    rests = []
    for spent in paid_with:
        claimed = raw(ecash_proxy, "POST", "/v1/balance/refund", headers={"x-cashu": spent})
        assert claimed.status_code == 200, claimed.text
        rests.append(claimed.json()["rest"])
    total = amount(user, token) + sum(amount(user, r) for r in rests)
    assert total == start - sum(costs)
    assert user.receive(token) + sum(user.receive(r) for r in rests if r) == total


def _cost(proxy: Proxy, token: str) -> int:
    """What the ledger charged the request paid by ``token``."""
    from routstr_addon.ecash.tokens import token_hash

    ledger = proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT key_hash FROM payments WHERE token_hash = ?", (token_hash(token),))
        (key_hash,) = cur.fetchone()
        cur.execute("SELECT -SUM(amount_msat) FROM ledger_entries WHERE key_hash = ? "
                    "AND kind = 'charge' AND (note IS NULL OR note <> 'rounding to the unit')",
                    (key_hash,))
        return int(cur.fetchone()[0])
    finally:
        ledger.close()


class LineTap(httpx2.BaseTransport):
    """Records the lines of each answer in the order the client reads them, and the first
    X-Cashu change comment."""

    def __init__(self) -> None:
        self.inner = httpx2.HTTPTransport()
        self.lines: list[str] = []
        self.header: str | None = None

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        self.header = response.headers.get("x-cashu")
        return httpx2.Response(response.status_code, headers=response.headers,
                               stream=_Lines(response.stream, self),
                               extensions=response.extensions)

    @property
    def change(self) -> str | None:
        return next((line.split()[2] for line in self.lines if line.startswith(": x-cashu ")),
                    None)


class _Lines(httpx2.SyncByteStream):
    def __init__(self, stream: Any, tap: LineTap) -> None:
        self.stream, self.tap, self.partial = stream, tap, b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.stream:
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            self.tap.lines.extend(line.decode() for line in lines if line)
            yield chunk

    def close(self) -> None:
        self.stream.close()


def test_official_client_streaming_reads_the_change_before_done(ecash_proxy: Proxy,
                                                                 user: UserWallet) -> None:
    start = MIN_SATS + 6
    token = user.token(start)
    tap = LineTap()
    client = OpenAI(base_url=ecash_proxy.v1, api_key="x-cashu", max_retries=0,
                    http_client=httpx2.Client(transport=tap, timeout=30))
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            extra_headers={"X-Cashu": token})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    # The client stopped at [DONE], and the change was read before it.
    assert "data: [DONE]" in tap.lines
    rest = tap.change
    assert rest is not None
    assert tap.lines.index(f": x-cashu {rest}") < tap.lines.index("data: [DONE]")
    cost_line = next(line for line in tap.lines if line.startswith(": x-routstr-cost-msats"))
    cost = int(cost_line.split()[2])
    assert tap.lines.index(cost_line) < tap.lines.index("data: [DONE]")
    stream.close()
    got = user.receive(tap.header) if tap.header else 0
    assert got + user.receive(rest) == start - -(-cost // 1000)
