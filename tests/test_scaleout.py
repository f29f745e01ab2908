"""Scaling out: two mitmdump processes sharing one PostgreSQL ledger (and wallet) behind a
load balancer; the load test passes across them, x-cashu included."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from bench.balancer import Balancer
from routstr_addon.ecash.tokens import token_hash
from routstr_addon.ledger import Limits, hash_key

from .conftest import books_balance, expected_msat, start_proxy
from .ecash_user import UserWallet
from .loadgen import burst
from .test_load import FUNDING_SATS, assert_keys_exact


def test_two_proxies_on_one_postgresql_ledger_behind_a_balancer(
        upstream: Any, mint: Any, user: UserWallet, pg_database: str, tmp_path: Path) -> None:
    env = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "DATABASE_URL": pg_database,
           "CASHU_MINTS": mint.url, "WALLET_MNEMONIC": _mnemonic()}
    first = start_proxy(tmp_path / "a", upstream.url, env)
    second = start_proxy(tmp_path / "b", upstream.url, env)
    try:
        keys = [first.new_key(sats=FUNDING_SATS) for _ in range(50)]
        with Balancer([("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
                       for p in (first, second)]).running() as lb:
            outcome = asyncio.run(burst(lb.url, [{"authorization": f"Bearer {keys[i % 50]}"}
                                                 for i in range(500)]))
            assert min(lb.counts) >= 200  # both processes served
            price = -(-expected_msat("test/model", 4096, 512) // 1000) + 5
            tokens = [user.token(price) for _ in range(60)]
            paid = asyncio.run(burst(lb.url, [{"x-cashu": t} for t in tokens], seed=3))
        assert set(outcome.statuses) <= {"200", "500", "left"}, outcome.statuses
        assert set(paid.statuses) <= {"200", "500", "left"}, paid.statuses
        first.wait_settled(timeout=30)
        charged = assert_keys_exact(first, keys)
        assert charged == outcome.statuses["200"] + outcome.statuses["left"]
        ledger = first.ledger()
        try:
            cur = ledger.db.connection().cursor()
            changes = []
            for token in tokens:
                cur.execute("SELECT change FROM payments WHERE token_hash = %s",
                            (token_hash(token),))
                changes.append(cur.fetchone()[0])
        finally:
            ledger.close()
        assert all(changes)
        assert all(user.receive(c) > 0 for c in changes)
        books_balance(first, mint.url)
    finally:
        first.stop()
        second.stop()


def _mnemonic() -> str:
    from mnemonic import Mnemonic

    return str(Mnemonic("english").generate())


def test_a_requests_per_minute_limit_holds_across_two_processes(
        upstream: Any, pg_database: str, tmp_path: Path) -> None:
    env = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "DATABASE_URL": pg_database}
    first = start_proxy(tmp_path / "a", upstream.url, env)
    second = start_proxy(tmp_path / "b", upstream.url, env)
    rpm = 12
    try:
        key = first.new_key(sats=1000)
        ledger = first.ledger()
        try:
            ledger.set_limits(hash_key(key), Limits(rpm=rpm))
        finally:
            ledger.close()
        with Balancer([("127.0.0.1", int(p.url.rsplit(":", 1)[1]))
                       for p in (first, second)]).running() as lb:
            statuses = asyncio.run(_each_on_its_own_connection(lb.url, key, 40))
            assert min(lb.counts) >= 15  # both processes answered
        admitted = statuses.count(200)
        assert rpm - 1 <= admitted <= rpm + 1, statuses
        assert admitted + statuses.count(429) == 40, statuses
        first.wait_settled(timeout=30)
        assert first.key_state(key).total_requests == admitted
        assert first.check() == []
    finally:
        first.stop()
        second.stop()


async def _each_on_its_own_connection(url: str, key: str, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count + 5, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one() -> int:
            resp = await client.post(
                "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})
            if resp.status_code == 429:
                assert 1 <= int(resp.headers["retry-after"]) <= 60
            return resp.status_code

        return list(await asyncio.gather(*(one() for _ in range(count))))
