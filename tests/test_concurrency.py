"""Concurrent requests on one key never overdraw it: through the proxy, on SQLite and PostgreSQL,
and on the ledger alone from several threads and processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import uuid
from collections import Counter

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from routstr_addon.ledger import Ledger, ReserveError, hash_key

from .conftest import Proxy

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "concurrency"}]


async def _burst(proxy: Proxy, key: str, n: int, stream: bool = False) -> Counter[int]:
    client = proxy.async_client(key)

    async def one() -> int:
        try:
            if stream:
                async for _ in await client.chat.completions.create(
                        model="anything", messages=MESSAGES, stream=True):
                    pass
            else:
                await client.chat.completions.create(model="anything", messages=MESSAGES)
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    try:
        return Counter(await asyncio.gather(*(one() for _ in range(n))))
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_100_concurrent_requests_on_a_key_funded_for_10_never_overdraw_it(
        make_proxy, database_url: str, stream: bool) -> None:
    p = make_proxy({"MODEL_BASED_PRICING": "false", "COST_PER_REQUEST": "2",
                    "DATABASE_URL": database_url})
    key = p.new_key(sats=20)  # ten requests at 2 sats

    statuses = asyncio.run(_burst(p, key, 100, stream))

    assert statuses == Counter({200: 10, 402: 90})
    p.wait_settled()
    state = p.key_state(key)
    assert state.balance_msat == 0 and state.reserved_msat == 0
    assert state.total_requests == 10 and state.total_spent_msat == 20_000
    ledger = p.ledger()
    try:
        entries = ledger.entries(state.key_hash, limit=1000)
    finally:
        ledger.close()
    kinds = Counter(e["kind"] for e in entries)
    assert kinds == Counter({"credit": 1, "reserve": 10, "charge": 10})
    assert p.check() == []


def test_concurrent_model_priced_requests_keep_the_books_exact(proxy: Proxy) -> None:
    key = proxy.new_key(sats=25)  # a few max-cost reservations' worth
    statuses = asyncio.run(_burst_model(proxy, key, 60))
    assert set(statuses) <= {200, 402} and statuses[200] >= 3
    proxy.wait_settled()
    state = proxy.key_state(key)
    assert 0 <= state.balance_msat == 25_000 - state.total_spent_msat
    assert state.total_requests == statuses[200]
    assert proxy.check() == []


async def _burst_model(proxy: Proxy, key: str, n: int) -> Counter[int]:
    client = proxy.async_client(key)

    async def one(i: int) -> int:
        try:
            await client.chat.completions.create(model="test/model", messages=MESSAGES,
                                                 max_tokens=50, stream=i % 2 == 0)
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    try:
        return Counter(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await client.close()


# --- the ledger on its own ------------------------------------------------------------------


def _spend(url: str, key_hash: str, tries: int, results: list[str]) -> None:
    ledger = Ledger(url, create=False)
    try:
        for _ in range(tries):
            rid = uuid.uuid4().hex
            try:
                ledger.reserve(key_hash, 1000, rid)
            except ReserveError as e:
                results.append(e.reason)
                continue
            ledger.settle(rid, 700)
            results.append("ok")
    finally:
        ledger.close()


def test_threads_reserving_on_one_key_never_overdraw_it(database_url: str) -> None:
    ledger = Ledger(database_url)
    key, state = ledger.create_key(10_000)
    results: list[str] = []
    threads = [threading.Thread(target=_spend, args=(database_url, state.key_hash, 10, results))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = ledger.key(hash_key(key))
    assert after is not None
    # 10 000 msat at 700 per request (1000 held while in flight): at most 14 can be paid.
    paid = results.count("ok")
    assert 10 <= paid <= 14
    assert after.balance_msat == 10_000 - 700 * paid >= 0
    assert after.reserved_msat == 0
    assert set(results) <= {"ok", "insufficient"}
    assert ledger.check() == []
    ledger.close()


def _spend_process(url: str, key_hash: str, tries: int,
                   queue: multiprocessing.Queue[list[str]]) -> None:
    results: list[str] = []
    _spend(url, key_hash, tries, results)
    queue.put(results)


def test_processes_reserving_on_one_key_never_overdraw_it(database_url: str) -> None:
    ledger = Ledger(database_url)
    key, state = ledger.create_key(20_000)
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[list[str]] = ctx.Queue()
    procs = [ctx.Process(target=_spend_process, args=(database_url, state.key_hash, 15, queue))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get(timeout=60)]
    for p in procs:
        p.join(30)
    paid = results.count("ok")
    after = ledger.key(hash_key(key))
    assert after is not None
    assert 20 <= paid <= 28
    assert after.balance_msat == 20_000 - 700 * paid >= 0 and after.reserved_msat == 0
    assert ledger.check() == []
    ledger.close()


def test_the_wal_stays_bounded_under_steady_writes(tmp_path) -> None:
    """Checkpoints run off the request path (a timer, here every 1,000 requests); under
    steady writes a passive checkpoint never lets the WAL start over, so once it passes the
    bound the checkpoint truncates it instead of letting it grow without end."""
    import os

    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    ledger = Ledger(url)
    ledger.defer_checkpoints()
    _, state = ledger.create_key(10**12)
    wal = tmp_path / "l.sqlite-wal"
    largest = 0
    for i in range(20_000):
        held = ledger.reserve(state.key_hash, 5, f"r{i}")
        ledger.settle(held.request_id, 3)
        if i % 1000 == 999:
            largest = max(largest, os.path.getsize(wal))
            ledger.checkpoint(truncate_above=1024 * 1024)
            assert os.path.getsize(wal) == 0
    # 20,000 requests write ~700 MB of WAL frames; it never holds more than 1,000 requests'.
    assert largest < 60 * 1024 * 1024, largest
    assert ledger.check() == []
    ledger.close()
