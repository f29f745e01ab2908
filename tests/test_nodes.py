"""A routing node: this proxy buying from other Routstr nodes, paid per request in ecash.

Real processes: node B is this proxy in front of the test upstream, taking ecash from the test
mint; router A is this proxy with B as a ``type: routstr`` provider, its wallet funded from the
same mint. Users pay A (a funded key, x-cashu); A pays B per request with ``X-Cashu`` and takes
its change back. Checked to the msat: the user's charge at A's price, B's change back in A's
wallet, both books, A's journal of what each request cost at B. A node that is stopped, or
answers 402 (a small server speaking the protocol), is failed over and its token taken back.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from math import ceil
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from routstr_addon.dev.demo import MiniServer, Request, Responder, run_in_thread
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ledger.nodes import NodePaymentRecord
from routstr_addon.upstreams.nodes import (
    Returned,
    Scrubber,
    node_loss,
    published_cost,
    token_amount,
)

from .conftest import BIN, Proxy, books_balance, start_proxy
from .ecash_user import UserWallet
from .test_nostr import relay  # noqa: F401  (the fixture)
from .test_providers_e2e import closed_port
from .upstream import TestUpstream

MODEL = "test/model"
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello node"}]
ROUTER_FEE = "1.1"
FUNDING_SATS = 3000


def node(tmp_path: Path, name: str, upstream: TestUpstream, mint: LocalMint,
         **env: str) -> Proxy:
    return start_proxy(tmp_path / name, upstream.url, {
        "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url,
        "CHANGE_POOL_PER_AMOUNT": "0", **env})


def router(tmp_path: Path, nodes: list[dict[str, Any]], mint: LocalMint, user: UserWallet,
           **env: str) -> Proxy:
    path = tmp_path / "providers.json"
    path.write_text(json.dumps({"providers": nodes}))
    a = start_proxy(tmp_path / "a", nodes[0]["base_url"], {
        "PROVIDERS_PATH": str(path), "CASHU_MINTS": mint.url, "CHANGE_POOL_PER_AMOUNT": "0",
        "OPENROUTER_MODELS_URL": f"http://127.0.0.1:{closed_port()}/models", **env})
    funded = subprocess.run([str(BIN / "routstr"), "wallet", "receive",
                             user.token(FUNDING_SATS)], cwd=a.workdir, env=a.env,
                            capture_output=True, text=True, timeout=60)
    assert funded.returncode == 0, funded.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the catalog read the nodes' /v1/models
        listed = httpx.get(f"{a.v1}/models", timeout=10).json()["data"]
        if any(m["id"] == MODEL for m in listed):
            return a
        time.sleep(0.2)
    raise AssertionError(f"A never listed {MODEL}: {a.output.text[-2000:]}")


def node_price(b: Proxy) -> dict[str, Fraction]:
    """B's published sats prices of the model, as A reads them."""
    (entry,) = [m for m in httpx.get(f"{b.v1}/models", timeout=10).json()["data"]
                if m["id"] == MODEL]
    return {k: Fraction(Decimal(str(v))) for k, v in entry["sats_pricing"].items()}


def a_price(prices: dict[str, Fraction], prompt: int, completion: int) -> int:
    """A's charge in msat: B's sats prices, and a sat per request for B's rounding to the
    sat, times A's fee, rounded up."""
    sats = (prompt * prices["prompt"] + completion * prices["completion"] + prices["request"]
            + 1)
    return ceil(sats * Fraction(ROUTER_FEE) * 1000)


def payments(proxy: Proxy, request_id: str | None = None) -> list[NodePaymentRecord]:
    ledger = proxy.ledger()
    try:
        if request_id is not None:
            return ledger.nodes.of_request(request_id)
        return [r for rid, in ledger.db.execute_sql(
            "SELECT DISTINCT request_id FROM node_payments").fetchall()
            for r in ledger.nodes.of_request(rid)]
    finally:
        ledger.close()


def wait_closed(proxy: Proxy, timeout: float = 20) -> list[NodePaymentRecord]:
    """Every node payment settled (change received, or the token taken back)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = payments(proxy)
        if rows and all(r.state != "sent" for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"node payments still open: {rows}")
        time.sleep(0.1)


def proofs_msat(proxy: Proxy) -> int:
    ledger = proxy.ledger()
    try:
        return ledger.books().proofs_msat
    finally:
        ledger.close()


def charged_at(proxy: Proxy) -> int:
    """Everything the proxy charged its users (msat)."""
    ledger = proxy.ledger()
    try:
        (total,) = ledger.db.execute_sql(
            "SELECT COALESCE(SUM(-amount_msat), 0) FROM ledger_entries "
            "WHERE kind IN ('charge', 'overrun')").fetchone()
        return int(total)
    finally:
        ledger.close()


@pytest.fixture
def b_node(tmp_path: Path, upstream: TestUpstream, mint: LocalMint) -> Iterator[Proxy]:
    b = node(tmp_path, "b", upstream, mint, UPSTREAM_PROVIDER_FEE="1.5")  # C is far cheaper
    yield b
    b.stop()


def test_router_pays_a_node_per_request_and_keeps_the_margin(
        tmp_path: Path, b_node: Proxy, mint: LocalMint, user: UserWallet) -> None:
    b = b_node
    a = router(tmp_path, [{"name": "b", "type": "routstr", "base_url": b.url,
                           "fee": ROUTER_FEE}], mint, user)
    try:
        prices = node_price(b)
        funded = proofs_msat(a)
        assert funded == FUNDING_SATS * 1000
        # /v1/models at A: the node's model at A's price.
        (listed,) = [m for m in httpx.get(f"{a.v1}/models", timeout=10).json()["data"]
                     if m["id"] == MODEL]
        assert Fraction(Decimal(str(listed["sats_pricing"]["prompt"]))) == pytest.approx(
            prices["prompt"] * Fraction(ROUTER_FEE))
        # A user with a funded key, JSON.
        key = a.new_key(sats=500)
        raw = a.client(key).chat.completions.with_raw_response.create(model=MODEL,
                                                                    messages=MSG)
        assert raw.headers["x-routstr-provider"] == "b"
        assert "x-cashu" not in raw.headers  # B's change is A's, never the user's
        usage = raw.parse().usage
        assert usage is not None
        charge = a_price(prices, usage.prompt_tokens, usage.completion_tokens)
        assert int(raw.headers["x-routstr-cost-msats"]) == charge
        assert a.key_state(key).total_spent_msat == charge
        request_id = raw.headers["x-routstr-request-id"]
        wait_closed(a)
        (paid,) = payments(a, request_id)
        assert paid.provider == "b" and paid.state == "settled" and paid.loss_msat == 0
        # What A sent covers B's published maximum; B's charge, rounded up to the sat (its
        # change is whole sats), is what the request cost A.
        assert paid.sent_msat == token_amount({"max_cost": float(prices["max_cost"])}) * 1000
        assert paid.reported_msat is not None and 0 < paid.reported_msat <= charged_at(b)
        assert paid.cost_msat == ceil(paid.reported_msat / 1000) * 1000
        assert proofs_msat(b) == paid.cost_msat  # what B kept is what A paid
        assert paid.change_msat == paid.sent_msat - paid.cost_msat
        assert charge > paid.cost_msat  # the margin

        # A stream: B's cost and change comments never reach the user; A's trailer does.
        with httpx.stream("POST", f"{a.v1}/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": MODEL, "messages": MSG, "stream": True,
                                "stream_options": {"include_usage": True}}) as resp:
            assert resp.status_code == 200 and "x-cashu" not in resp.headers
            body = resp.read().decode()
        assert "cashu" not in body and body.rstrip().endswith("data: [DONE]")
        (trailer,) = [line for line in body.splitlines()
                      if line.startswith(": x-routstr-cost-msats")]
        usage_event = [json.loads(line[6:]) for line in body.splitlines()
                       if line.startswith("data: {") and '"usage"' in line
                       and json.loads(line[6:]).get("usage")][-1]["usage"]
        stream_charge = a_price(prices, usage_event["prompt_tokens"],
                                usage_event["completion_tokens"])
        assert int(trailer.split()[2]) == stream_charge

        # A user paying with x-cashu at A: A's change, at A's price.
        token = user.token(300)
        resp = httpx.post(f"{a.v1}/chat/completions", timeout=30, headers={"x-cashu": token},
                          json={"model": MODEL, "messages": MSG})
        assert resp.status_code == 200, resp.text
        cost = int(resp.headers["x-routstr-cost-msats"])
        used = resp.json()["usage"]
        assert cost == a_price(prices, used["prompt_tokens"], used["completion_tokens"])
        assert user.amount(resp.headers["x-cashu"]) == (300_000 - cost) // 1000
        assert user.receive(resp.headers["x-cashu"]) == (300_000 - cost) // 1000

        rows = wait_closed(a)
        assert len(rows) == 3 and all(r.state == "settled" and r.loss_msat == 0 for r in rows)
        # A's wallet: the funding, plus what the x-cashu user left, less what B was paid.
        xcashu_kept = 300_000 - (300_000 - cost) // 1000 * 1000
        assert proofs_msat(a) == funded + xcashu_kept - sum(r.cost_msat for r in rows)
        books_balance(a, mint.url)
        books_balance(b, mint.url)
        # The books of both: B holds what A paid it; A's margin is its charges less that.
        assert proofs_msat(b) == sum(r.cost_msat for r in rows)
        check = subprocess.run([str(BIN / "routstr"), "ledger", "check"], cwd=a.workdir,
                               env=a.env, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        # routstr stats: per node, what users paid for its answers, what it cost, the margin.
        stats = subprocess.run([str(BIN / "routstr"), "stats", "--json"], cwd=a.workdir,
                               env=a.env, capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0, stats.stderr
        (b_stats,) = json.loads(stats.stdout)["nodes"]
        assert b_stats == {"provider": "b", "requests": 3, "revenue_msat": charged_at(a),
                           "cost_msat": sum(r.cost_msat for r in rows), "loss_msat": 0,
                           "margin_msat": charged_at(a) - sum(r.cost_msat for r in rows)}
    finally:
        a.stop()


def test_a_stream_cut_at_the_node_has_its_change_asked_for(
        tmp_path: Path, b_node: Proxy, mint: LocalMint, user: UserWallet) -> None:
    """The node's upstream drops the stream: no trailer reaches A, so A asks B for the change
    it kept for the token; nothing is lost and both books balance."""
    b = b_node
    a = router(tmp_path, [{"name": "b", "type": "routstr", "base_url": b.url,
                           "fee": ROUTER_FEE}], mint, user)
    try:
        key = a.new_key(sats=500)
        with httpx.stream("POST", f"{a.v1}/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}", "x-scenario": "cut"},
                          json={"model": MODEL, "messages": MSG, "stream": True}) as resp:
            assert resp.status_code == 200
            with pytest.raises(httpx.HTTPError):
                resp.read()
        a.wait_settled()
        (paid,) = wait_closed(a)
        assert paid.state == "settled" and paid.loss_msat == 0, paid
        assert paid.change_msat > 0 and paid.cost_msat == proofs_msat(b)
        # B charged what it delivered; the rest of the token came back (its stored change).
        assert paid.cost_msat == ceil(charged_at(b) / 1000) * 1000
        assert proofs_msat(a) == FUNDING_SATS * 1000 - paid.cost_msat
        books_balance(a, mint.url)
        books_balance(b, mint.url)
    finally:
        a.stop()


class RefusingNode(MiniServer):
    """A node speaking the protocol with fixed answers. ``refuse``: it answers every request
    402 without taking the token (asking far more than any reservation). ``honour``: it
    publishes too low a maximum, answers the first token 402 asking 4 sats, and the second
    with a completion, handing that whole token back as change."""

    def __init__(self, mint_url: str, mode: str = "refuse") -> None:
        super().__init__()
        self.mint_url = mint_url
        self.mode = mode
        self.tokens: list[str] = []

    async def handle(self, request: Request, responder: Responder) -> None:
        honour = self.mode == "honour"
        if request.path == "/v1/models":
            await responder.send(200, {"data": [{
                "id": MODEL, "context_length": 4096, "pricing": {},
                "top_provider": {"max_completion_tokens": 512},
                "sats_pricing": {"prompt": 0.000001, "completion": 0.000001,
                                 "request": 5.0 if honour else 0.0,
                                 "max_cost": 0.5 if honour else 3.5}}]})
        elif request.path == "/v1/info":
            await responder.send(200, {"name": "refusing", "mints": [self.mint_url]})
        else:
            token = request.headers.get("x-cashu", "")
            self.tokens.append(token)
            if self.mode == "greedy":  # keeps the whole token, says it cost that much
                await responder.send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                    "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant",
                                                             "content": "hi"}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}},
                    headers={"x-routstr-cost-msats": "5000"})
                return
            if honour and len(self.tokens) > 1:
                await responder.send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                    "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant",
                                                             "content": "hi"}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}},
                    headers={"x-cashu": token, "x-routstr-cost-msats": "0"})
                return
            await responder.send(402, {"detail": {
                "reason": "Insufficient balance",
                "amount_required_msat": 4000 if honour else 10**9,
                "model": MODEL, "type": "minimum_balance_required"}})


@pytest.mark.parametrize("failure", ["stopped", "402"])
def test_a_failing_node_is_failed_over_and_its_token_taken_back(
        tmp_path: Path, b_node: Proxy, upstream: TestUpstream, mint: LocalMint,
        user: UserWallet, failure: str) -> None:
    b = b_node
    with run_in_thread(RefusingNode(mint.url)) as refusing:
        assert isinstance(refusing, RefusingNode)
        c = (node(tmp_path, "c", upstream, mint, UPSTREAM_PROVIDER_FEE="1.0")
             if failure == "stopped" else None)
        c_url = c.url if c is not None else refusing.url
        a = router(tmp_path, [{"name": "b", "type": "routstr", "base_url": b.url,
                               "fee": ROUTER_FEE},
                              {"name": "c", "type": "routstr", "base_url": c_url,
                               "fee": ROUTER_FEE}], mint, user)
        try:
            # C is the cheaper: A goes there first.
            (listed,) = [m for m in httpx.get(f"{a.v1}/models", timeout=10).json()["data"]
                         if m["id"] == MODEL]
            assert Fraction(Decimal(str(listed["sats_pricing"]["prompt"]))) < \
                node_price(b)["prompt"] * Fraction(ROUTER_FEE)
            if c is not None:
                c.stop()
            key = a.new_key(sats=500)
            raw = a.client(key).chat.completions.with_raw_response.create(model=MODEL,
                                                                        messages=MSG)
            assert raw.headers["x-routstr-provider"] == "b"
            assert raw.headers["x-routstr-attempts"] == "2"
            usage = raw.parse().usage
            assert usage is not None
            assert a.key_state(key).total_spent_msat == a_price(
                node_price(b), usage.prompt_tokens, usage.completion_tokens)
            rows = wait_closed(a)
            first, second = payments(a, raw.headers["x-routstr-request-id"])
            assert (first.provider, first.state) == ("c", "recovered")
            assert first.change_msat == first.sent_msat and first.cost_msat == 0
            assert (second.provider, second.state) == ("b", "settled")
            if failure == "402":
                assert refusing.tokens == [first.token]
            # Nothing lost to C: A's wallet holds its funding less what B was paid.
            assert proofs_msat(a) == FUNDING_SATS * 1000 - sum(r.cost_msat for r in rows)
            books_balance(a, mint.url)
            books_balance(b, mint.url)
        finally:
            a.stop()
            if c is not None:
                c.stop()


def test_a_nodes_402_is_honoured_once_within_the_reservation(
        tmp_path: Path, mint: LocalMint, user: UserWallet) -> None:
    with run_in_thread(RefusingNode(mint.url, "honour")) as honouring:
        assert isinstance(honouring, RefusingNode)
        a = router(tmp_path, [{"name": "h", "type": "routstr", "base_url": honouring.url,
                               "fee": ROUTER_FEE}], mint, user)
        try:
            key = a.new_key(sats=500)
            raw = a.client(key).chat.completions.with_raw_response.create(model=MODEL,
                                                                        messages=MSG)
            assert raw.headers["x-routstr-provider"] == "h"
            assert "x-cashu" not in raw.headers
            wait_closed(a)
            first, second = payments(a, raw.headers["x-routstr-request-id"])
            assert [first.token, second.token] == honouring.tokens
            assert (first.state, first.sent_msat, first.cost_msat) == ("recovered", 2000, 0)
            assert (second.state, second.sent_msat) == ("settled", 5000)
            assert second.change_msat == 5000 and second.cost_msat == 0
            assert proofs_msat(a) == FUNDING_SATS * 1000
            books_balance(a, mint.url)
        finally:
            a.stop()


def test_a_node_killed_mid_burst_moves_traffic_and_the_books_hold(
        tmp_path: Path, b_node: Proxy, upstream: TestUpstream, mint: LocalMint,
        user: UserWallet) -> None:
    """C (the cheaper) is killed in the middle of a burst of JSON and stream requests: every
    request is answered (by C before, by B after), tokens C never used are taken back, and
    A's wallet is its funding less exactly what the nodes kept."""
    import asyncio

    b = b_node
    c = node(tmp_path, "c", upstream, mint, UPSTREAM_PROVIDER_FEE="1.0")
    a = router(tmp_path, [{"name": "b", "type": "routstr", "base_url": b.url,
                           "fee": ROUTER_FEE},
                          {"name": "c", "type": "routstr", "base_url": c.url,
                           "fee": ROUTER_FEE}], mint, user)
    try:
        key = a.new_key(sats=5000)

        async def burst() -> list[tuple[int, str]]:
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(i: int) -> tuple[int, str]:
                    await asyncio.sleep(i * 0.05)
                    if i == 12:
                        c.process.kill()  # in the middle of the burst
                    try:
                        resp = await client.post(
                            f"{a.v1}/chat/completions",
                            headers={"authorization": f"Bearer {key}"},
                            json={"model": MODEL, "messages": MSG, "stream": i % 2 == 0})
                    except httpx.RemoteProtocolError:  # C died after its first byte
                        return 0, "c"
                    return resp.status_code, resp.headers.get("x-routstr-provider", "")

                return await asyncio.gather(*(one(i) for i in range(30)))

        results = asyncio.run(burst())
        # Before its first byte a failure goes to the next node; after it, the answer was
        # C's (cut): only a request C was answering at the moment it died can be cut.
        assert [s for s, _ in results if s not in (200, 0)] == []
        assert sum(1 for s, _ in results if s == 0) <= 2
        served = [p for _, p in results]
        assert served[0] == "c" and served[-1] == "b"
        a.wait_settled()
        rows = wait_closed(a)
        assert {r.state for r in rows if r.provider == "b"} == {"settled"}
        assert {r.state for r in rows if r.provider == "c"} <= {"settled", "recovered", "lost"}
        assert a.key_state(key).total_requests == 30
        assert proofs_msat(a) == FUNDING_SATS * 1000 - sum(r.cost_msat for r in rows)
        assert proofs_msat(b) == sum(r.cost_msat for r in rows if r.provider == "b")
        books_balance(a, mint.url)
        books_balance(b, mint.url)
    finally:
        a.stop()
        c.stop()


def test_a_node_keeping_more_than_its_prices_say_is_a_loss_against_it(
        tmp_path: Path, mint: LocalMint, user: UserWallet) -> None:
    with run_in_thread(RefusingNode(mint.url, "greedy")) as greedy:
        assert isinstance(greedy, RefusingNode)
        a = router(tmp_path, [{"name": "g", "type": "routstr", "base_url": greedy.url,
                               "fee": ROUTER_FEE}], mint, user)
        try:
            key = a.new_key(sats=500)
            raw = a.client(key).chat.completions.with_raw_response.create(model=MODEL,
                                                                        messages=MSG)
            assert raw.headers["x-routstr-provider"] == "g"
            (paid,) = wait_closed(a)
            # 5 sats sent, none back; its prices make 6 tokens cost well under a sat.
            assert (paid.state, paid.sent_msat, paid.change_msat) == ("lost", 5000, 0)
            assert paid.reported_msat == 5000 and paid.loss_msat == 4000
            stats = subprocess.run([str(BIN / "routstr"), "stats", "--json"], cwd=a.workdir,
                                   env=a.env, capture_output=True, text=True, timeout=60)
            (g_stats,) = json.loads(stats.stdout)["nodes"]
            assert g_stats["loss_msat"] == 4000 and g_stats["cost_msat"] == 5000
            books_balance(a, mint.url)
        finally:
            a.stop()


def test_an_onion_node_is_reached_and_paid_through_tor(
        tmp_path: Path, upstream: TestUpstream, mint: LocalMint, user: UserWallet) -> None:
    """B is known only by its .onion address: A reads its models, pays it and takes its
    change back through TOR_PROXY_URL (a SOCKS5 stand-in for Tor leading to B)."""
    from .test_nostr import ONION_HOST, Socks5, free_port

    b_port = free_port()
    socks = Socks5(onion_target=b_port)
    b = start_proxy(tmp_path / "b", upstream.url, {
        "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url,
        "CHANGE_POOL_PER_AMOUNT": "0"}, args=("-p", str(b_port)))
    a = None
    try:
        a = router(tmp_path, [{"name": "onion", "type": "routstr",
                               "base_url": f"http://{ONION_HOST}", "fee": ROUTER_FEE}],
                   mint, user, TOR_PROXY_URL=f"socks5h://127.0.0.1:{socks.port}")
        key = a.new_key(sats=500)
        raw = a.client(key).chat.completions.with_raw_response.create(model=MODEL,
                                                                    messages=MSG)
        assert raw.headers["x-routstr-provider"] == "onion"
        (paid,) = wait_closed(a)
        assert paid.state == "settled" and paid.loss_msat == 0
        assert paid.cost_msat == proofs_msat(b)
        assert set(socks.asked) == {ONION_HOST}  # the name went to the proxy, never to DNS
        books_balance(a, mint.url)
        books_balance(b, mint.url)
    finally:
        if a is not None:
            a.stop()
        b.stop()
        socks.stop()


def test_scrubber_takes_change_and_cost_out_of_a_stream() -> None:
    returned = Returned()
    scrub = Scrubber(returned, sse=True)
    out = scrub.feed(b'data: {"a": 1}\n\n: x-routstr-cost-msats 1234 x-routstr-bal')
    out += scrub.feed(b"ance-msats 5\n\n: x-cashu cashuBxyz\n\ndata: [DONE]\n\n")
    out += scrub.finish()
    assert out == b'data: {"a": 1}\n\ndata: [DONE]\n\n'
    assert returned.changes == ["cashuBxyz"] and returned.reported_msat == 1234
    crlf = Returned()
    scrub = Scrubber(crlf, sse=True)
    out = scrub.feed(b'data: {"b": 2}\r\n\r\n: x-cashu cashuBcr\r\ndata: [DONE]\r\n\r\n')
    assert out == b'data: {"b": 2}\n\ndata: [DONE]\n\n' and crlf.changes == ["cashuBcr"]
    cut = Returned()
    scrub = Scrubber(cut, sse=True)
    assert scrub.feed(b": x-cashu cashuBend") == b""
    assert scrub.finish() == b"" and cut.changes == ["cashuBend"]
    errors = Returned()
    scrub = Scrubber(errors, sse=False)
    errors.header(b"x-cashu", b"cashuBabc")  # the header and the body: one change
    assert scrub.feed(b'{"error": {"message": "bad", "x_cashu": "cashuBabc"}}') == b""
    assert json.loads(scrub.finish()) == {"error": {"message": "bad"}}
    assert errors.changes == ["cashuBabc"]


def test_node_loss_is_change_kept_beyond_the_reported_cost() -> None:
    assert node_loss(10_000, 7_000, 2_500) == 0  # 2.5 sats charged: 3 sats kept
    assert node_loss(10_000, 5_000, 2_500) == 2_000
    assert node_loss(10_000, 0, None) == 10_000  # nothing back, nothing said
    assert node_loss(10_000, 4_000, None) == 0
    # A node that reports more than its own published prices make of the usage: the excess is
    # a loss (its prices, generously rounded, then up to the sat).
    assert published_cost({"prompt": 0.5, "completion": 1.0, "request": 2}, 10, 4) == 11012
    assert node_loss(20_000, 0, 20_000, 11_012) == 8_000
    assert node_loss(20_000, 8_000, 12_000, 11_012) == 0
    assert token_amount({"max_cost": 3.2}) == 5
    assert token_amount({"max_cost": 3.2}, ppk=100) == 6


def test_score_weighs_price_latency_and_failures_and_spreads_among_the_best() -> None:
    from collections import Counter
    from random import Random

    from routstr_addon.upstreams.health import Breaker
    from routstr_addon.upstreams.score import score, spread

    fast, slow, flaky = Breaker("fast"), Breaker("slow"), Breaker("flaky")
    slow.latency_ms = 2000.0  # two seconds to the first byte: as dear as twice the price
    flaky.outcomes.extend([True, False])  # half its requests failed: twice as dear
    assert score(Fraction(10), fast) == 10.0
    assert score(Fraction(10), slow) == 20.0
    assert score(Fraction(10), flaky) == 20.0
    breakers = {b.name: b for b in (fast, slow, flaky)}
    prices = {"a": Fraction(100), "b": Fraction(105), "c": Fraction(200), "fast": Fraction(10),
              "slow": Fraction(8), "flaky": Fraction(9)}
    rng = Random(7)
    # Close prices (within 15 %) share the load, weighted by 1/score; a dearer one never leads.
    first = Counter(spread(["a", "b", "c"], str, prices.__getitem__, {}, rng)[0]
                    for _ in range(2000))
    assert set(first) == {"a", "b"} and 0.45 < first["a"] / 2000 < 0.6
    # The slow and the flaky lose to the fast one although cheaper.
    assert {spread(["slow", "flaky", "fast"], str, prices.__getitem__, breakers, rng)[0]
            for _ in range(200)} == {"fast"}
    # The order behind the first is kept for failover; an open breaker never leads.
    assert spread(["slow", "flaky", "fast"], str, prices.__getitem__, breakers, rng) == (
        "fast", "slow", "flaky")
    fast.state = "open"
    assert spread(["slow", "fast"], str, prices.__getitem__, breakers, rng)[0] == "slow"


def test_nodes_found_on_nostr_join_and_serve(
        tmp_path: Path, relay: str, upstream: TestUpstream,  # noqa: F811  (the fixture)
        mint: LocalMint, user: UserWallet) -> None:
    """B announces itself on a local relay; A, with AUTO_DISCOVER_NODES and no provider of
    that model of its own, finds it, reads its models and pays it per request."""
    import nostr_sdk as ns

    from .test_nostr import free_port

    b_keys = ns.Keys.generate()
    b_port = free_port()
    b = start_proxy(tmp_path / "b", upstream.url, {
        "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url,
        "CHANGE_POOL_PER_AMOUNT": "0", "NSEC": b_keys.secret_key().to_bech32(),
        "RELAYS": relay, "HTTP_URL": f"http://127.0.0.1:{b_port}"}, args=("-p", str(b_port)))
    a_dir = tmp_path / "a"
    a_dir.mkdir()
    (a_dir / "models.json").write_text(json.dumps({"data": [{  # A's own: another model
        "id": "own/model", "context_length": 4096,
        "pricing": {"prompt": "0.000001", "completion": "0.000001", "request": "0"}}]}))
    a: Proxy | None = None
    try:
        b.output.wait_for(r"nostr: announced .* to 1 of 1 relay")
        a = start_proxy(a_dir, upstream.url, {
            "CASHU_MINTS": mint.url, "CHANGE_POOL_PER_AMOUNT": "0", "RELAYS": relay,
            "AUTO_DISCOVER_NODES": "true", "ALLOW_PRIVATE_LN_ADDRESSES": "true",
            "NODE_BLOCKED_PUBKEYS": ns.Keys.generate().public_key().to_bech32(),
            "OPENROUTER_MODELS_URL": f"http://127.0.0.1:{closed_port()}/models"})
        funded = subprocess.run([str(BIN / "routstr"), "wallet", "receive",
                                 user.token(FUNDING_SATS)], cwd=a.workdir, env=a.env,
                                capture_output=True, text=True, timeout=60)
        assert funded.returncode == 0, funded.stderr
        name = f"nostr-{b_keys.public_key().to_hex()[:16]}"
        a.output.wait_for(rf"node {name} joins as a provider", timeout=60)
        deadline = time.monotonic() + 30
        while not any(m["id"] == MODEL for m in
                      httpx.get(f"{a.v1}/models", timeout=10).json()["data"]):
            assert time.monotonic() < deadline, a.output.text[-2000:]
            time.sleep(0.2)
        key = a.new_key(sats=500)
        raw = a.client(key).chat.completions.with_raw_response.create(model=MODEL,
                                                                    messages=MSG)
        assert raw.headers["x-routstr-provider"] == name
        (paid,) = wait_closed(a)
        assert paid.provider == name and paid.state == "settled" and paid.loss_msat == 0
        assert proofs_msat(b) == paid.cost_msat
        books_balance(a, mint.url)
        books_balance(b, mint.url)
    finally:
        if a is not None:
            a.stop()
        b.stop()


def test_discovered_nodes_are_filtered_by_key_url_and_mints() -> None:
    from dataclasses import replace as changed

    from routstr_addon.discovery.nostr import Provider
    from routstr_addon.settings import NodeDiscovery, load_config
    from routstr_addon.upstreams.discover import NodeFinder, acceptable

    mint_url = "https://mint.example"
    config = changed(load_config({"CASHU_MINTS": mint_url}),
                     nodes=NodeDiscovery(True, Decimal("1.5"), frozenset(),
                                         frozenset({"bb" * 32})))

    def listing(pubkey: str, url: str = "https://node.example",
                mints: tuple[str, ...] = (mint_url,)) -> Provider:
        return Provider(pubkey[:8], pubkey, 1, [url], [], None, "n", None, "", "e",
                        endpoint_url=url, info={"mints": list(mints)})

    finder = NodeFinder(config, None, None, None)  # type: ignore[arg-type]
    spec = finder.admit(listing("aa" * 32))
    assert spec is not None and spec.type == "routstr" and spec.discovered
    assert spec.base_url == "https://node.example:443/v1" and spec.name == "nostr-" + "a" * 16
    assert finder.admit(listing("bb" * 32)) is None  # blocked
    assert finder.admit(listing("aa" * 32, mints=("https://other.example",))) is None
    assert finder.admit(listing("aa" * 32, url="http://127.0.0.1:9")) is None
    allowed = NodeFinder(changed(config, nodes=NodeDiscovery(
        True, Decimal("1.5"), frozenset({"cc" * 32}))), None, None, None)  # type: ignore[arg-type]
    assert allowed.admit(listing("aa" * 32)) is None and allowed.admit(listing("cc" * 32))
    assert not acceptable("http://node.example", False)
    assert not acceptable("https://10.0.0.1", False) and acceptable("https://8.8.8.8", False)
    assert not acceptable("http://abc.onion", True) and acceptable("http://127.0.0.1:1", True)
    assert acceptable("http://abc.onion", False, tor=True)  # through TOR_PROXY_URL


def test_node_payments_journal_on_sqlite_and_postgresql(database_url: str) -> None:
    """The journal of tokens paid to nodes: in flight until settled once, per request in
    order, and per node the revenue of the requests it served beside what it cost."""
    from routstr_addon.ledger import Ledger

    ledger = Ledger(database_url)
    try:
        key, _ = ledger.create_key(10_000)
        from routstr_addon.ledger import hash_key

        key_hash = hash_key(key)
        ledger.reserve(key_hash, 3000, "req-1")
        ledger.settle("req-1", 2500, model=MODEL)
        with ledger.transaction() as tx:
            first = ledger.nodes.sent_in(tx, "req-1", "c", "https://m", "sat", "cashuB1", 4000)
            second = ledger.nodes.sent_in(tx, "req-1", "b", "https://m", "sat", "cashuB2", 4000)
        assert second > first
        assert [r.state for r in ledger.nodes.in_flight(time.time() + 1)] == ["sent", "sent"]
        with ledger.transaction() as tx:
            assert ledger.nodes.settle_in(tx, first, "recovered", 4000, None, 0)
            assert ledger.nodes.settle_in(tx, second, "settled", 2000, 1800, 0)
            assert not ledger.nodes.settle_in(tx, second, "lost", 0, None, 4000)  # once
        c, b = ledger.nodes.of_request("req-1")
        assert (c.provider, c.state, c.cost_msat) == ("c", "recovered", 0)
        assert (b.provider, b.state, b.cost_msat, b.reported_msat) == ("b", "settled", 2000,
                                                                       1800)
        assert ledger.nodes.in_flight(time.time() + 1) == []
        totals = {t.provider: t.as_json() for t in ledger.nodes.totals()}
        assert totals["b"] == {"provider": "b", "requests": 1, "revenue_msat": 2500,
                               "cost_msat": 2000, "loss_msat": 0, "margin_msat": 500}
        assert totals["c"]["revenue_msat"] == 0 and totals["c"]["cost_msat"] == 0
    finally:
        ledger.close()


def test_discovered_offers_only_within_the_markup_of_the_cheapest() -> None:
    from routstr_addon.metering.pricing import Pricing
    from routstr_addon.settings import Upstream
    from routstr_addon.upstreams.catalog import Catalog, Router
    from routstr_addon.upstreams.providers import ProviderSpec

    def entry(prompt: float) -> dict[str, Any]:
        return {"id": MODEL, "context_length": 1000,
                "sats_pricing": {"prompt": prompt, "completion": prompt, "request": 0,
                                 "max_cost": 10}}

    up = Upstream("https", "node.example", 443, "/v1")
    specs = [ProviderSpec("mine", up, type="routstr", fetch=True),
             ProviderSpec("near", up, type="routstr", fetch=True, discovered=True),
             ProviderSpec("far", up, type="routstr", fetch=True, discovered=True)]
    pricing = Pricing({}, Decimal("1.005"), Decimal("1.05"))
    pricing.set_rate("91234.56")
    catalog = Catalog(specs, Router(pricing, specs), Path("/nonexistent"), "", {})
    catalog.node_markup = Fraction("1.5")
    catalog.nodes = {"mine": [entry(0.001)], "near": [entry(0.0012)], "far": [entry(0.01)]}
    catalog.publish()
    assert [o.provider for o in pricing.offers[MODEL]] == ["mine", "near"]
