"""Payouts to a Lightning address and refunds of expired keys, against real FakeWallet mints.

FakeWallet marks every incoming invoice paid by itself, so "the receiver got paid" proves
nothing. A payout is proven by what can fail: the Lightning-address server was asked for
exactly the right amount, the proxy's mint reports the melt quote of that very invoice as paid,
and the proxy's proofs fell by the amount plus the fee actually charged."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from routstr_addon.dev.demo import run_in_thread
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.mint import MintUnreachable
from routstr_addon.ecash.seed import seed_from_mnemonic
from routstr_addon.ecash.tokens import parse_token
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger
from routstr_addon.payments.cashu import Payments
from routstr_addon.payments.payouts import Payouts
from routstr_addon.settings import load_config

from .conftest import BIN, books_balance, raw, start_proxy
from .ecash_user import UserWallet
from .lnaddress import LnAddressServer


@pytest.fixture(scope="module")
def ln_server(other_mint: LocalMint) -> Iterator[LnAddressServer]:
    """The operator's Lightning address, receiving at a second mint."""
    with run_in_thread(LnAddressServer(other_mint.url)) as server:
        assert isinstance(server, LnAddressServer)
        yield server


def fresh_mnemonic() -> str:
    from mnemonic import Mnemonic

    return str(Mnemonic("english").generate())


class Books:
    """A ledger and wallet of the proxy's, driven directly."""

    def __init__(self, folder: Path, mint: LocalMint, **env: str) -> None:
        self.config = load_config({"DATA_DIR": str(folder), "CASHU_MINTS": mint.url,
                                   "WALLET_MNEMONIC": fresh_mnemonic(), **env})
        self.ledger = Ledger(self.config.database_url)
        self.mint = mint

    async def open(self) -> tuple[Wallet, Payouts]:
        wallet = Wallet(self.ledger, [self.mint.url],
                        seed=seed_from_mnemonic(self.config.wallet_mnemonic))
        await wallet.start()
        payments = Payments(self.ledger, wallet)
        return wallet, Payouts(self.ledger, wallet, self.config, payments)

    def pool_msat(self) -> int:
        cur = self.ledger.db.connection().cursor()
        cur.execute("SELECT COALESCE(SUM(amount), 0) FROM proofs "
                    "WHERE state IN ('unspent', 'held', 'reserved')")
        return int(cur.fetchone()[0]) * 1000


async def receive(wallet: Wallet, ledger: Ledger, token: str) -> None:
    """Ecash into the pool (as if users had paid: the operator's earnings)."""
    redeemed = await wallet.redeem(parse_token(token))
    with ledger.transaction() as tx:
        wallet.store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs, "unspent")


def melt_quote_state(mint: LocalMint, quote: str) -> dict[str, Any]:
    state: dict[str, Any] = httpx.get(f"{mint.url}/v1/melt/quote/bolt11/{quote}",
                                      timeout=10).json()
    return state


def test_profit_above_the_minimum_is_paid_once_for_the_right_amount(
        mint: LocalMint, user: UserWallet, ln_server: LnAddressServer, tmp_path: Path) -> None:
    operator = f"op{secrets.token_hex(4)}"
    books = Books(tmp_path, mint, RECEIVE_LN_ADDRESS=ln_server.address(operator),
                  MINIMUM_PAYOUT="100")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], int, int]:
        wallet, payouts = await books.open()
        await receive(wallet, books.ledger, user.token(300))
        _key, _ = books.ledger.create_key(0, key="sk-" + secrets.token_hex(8))
        before = books.pool_msat()
        first = await payouts.run()
        after = books.pool_msat()
        second = await payouts.run()  # nothing left above the minimum: nothing moves
        await wallet.close()
        return first, second, before, after

    first, second, before, after = asyncio.run(scenario())
    payout = first["payout"]
    assert payout["state"] == "paid" and payout["destination"] == ln_server.address(operator)
    (asked,) = ln_server.requests_for(operator)
    assert asked.amount_msat == payout["amount"] * 1000
    assert payout["bolt11"] == asked.invoice
    assert melt_quote_state(mint, payout["quote"])["state"] == "PAID"
    assert before - after == (payout["amount"] + payout["fee_paid"]) * 1000
    assert 280 <= payout["amount"] <= 300
    assert second["payout"] is None and "below" in second["skipped"]
    assert len(ln_server.requests_for(operator)) == 1
    assert books.ledger.check() == []


def test_below_the_minimum_nothing_moves(mint: LocalMint, user: UserWallet,
                                         ln_server: LnAddressServer, tmp_path: Path) -> None:
    operator = f"op{secrets.token_hex(4)}"
    books = Books(tmp_path, mint, RECEIVE_LN_ADDRESS=ln_server.address(operator),
                  MINIMUM_PAYOUT="500")

    async def scenario() -> dict[str, Any]:
        wallet, payouts = await books.open()
        await receive(wallet, books.ledger, user.token(300))
        # Users are owed 200 of the 300: a profit of 100.
        books.ledger.create_key(200_000, key="sk-" + secrets.token_hex(8))
        with books.ledger.transaction() as tx:
            tx.execute("UPDATE api_keys SET backed = ?", (True,))
        result = await payouts.run()
        await wallet.close()
        return result

    result = asyncio.run(scenario())
    assert result["payout"] is None and result["books"]["margin_msat"] == 100_000
    assert ln_server.requests_for(operator) == []
    assert books.pool_msat() == 300_000


def test_mint_down_during_a_payout_leaves_no_drift_and_the_next_run_pays(
        user: UserWallet, ln_server: LnAddressServer, tmp_path: Path) -> None:
    flaky = LocalMint(tmp_path / "mint").start()
    owner = UserWallet(flaky.url, tmp_path / "user")
    operator = f"op{secrets.token_hex(4)}"
    books = Books(tmp_path / "p", flaky, RECEIVE_LN_ADDRESS=ln_server.address(operator),
                  MINIMUM_PAYOUT="50")
    try:
        async def fund() -> None:
            wallet, _ = await books.open()
            await receive(wallet, books.ledger, owner.token(200))
            await wallet.close()

        asyncio.run(fund())
        flaky.stop()

        async def attempt() -> dict[str, Any]:
            wallet, payouts = await books.open()
            try:
                return await payouts.run()
            finally:
                await wallet.close()

        with pytest.raises(MintUnreachable):  # the mint does not answer: nothing is paid
            asyncio.run(attempt())
        assert books.pool_msat() == 200_000
        assert books.ledger.check() == []
        flaky.start()
        result = asyncio.run(attempt())
        assert result["payout"]["state"] == "paid"
        assert books.pool_msat() == 200_000 - (result["payout"]["amount"]
                                               + result["payout"]["fee_paid"]) * 1000
    finally:
        owner.close()
        flaky.stop()


def test_expired_keys_are_refunded_once(mint: LocalMint, user: UserWallet,
                                        ln_server: LnAddressServer, tmp_path: Path) -> None:
    books = Books(tmp_path, mint, ALLOW_PRIVATE_LN_ADDRESSES="true")  # the address is local
    alice = f"alice{secrets.token_hex(4)}"

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, str]:
        wallet, payouts = await books.open()
        payments = Payments(books.ledger, wallet)
        with_address, _ = await payments.create(user.token(150), time.time() + 0.5,
                                                ln_server.address(alice))
        without, _ = await payments.create(user.token(80), time.time() + 0.5)
        _not_yet, _ = await payments.create(user.token(60), time.time() + 3600)
        await asyncio.sleep(0.6)
        first = await payouts.refund_expired()
        second = await payouts.refund_expired()
        await wallet.close()
        return first, second, with_address, without

    first, second, with_address, without = asyncio.run(scenario())
    from routstr_addon.ledger import hash_key

    lightning = [r for r in first if r.get("kind") == "refund"]
    tokens = [r for r in first if r.get("kind") == "token"]
    assert len(lightning) == 1 and lightning[0]["state"] == "paid"
    (asked,) = [a for a in ln_server.requests_for(alice) if a.invoice == lightning[0]["bolt11"]]
    assert asked.amount_msat == lightning[0]["amount"] * 1000 <= 150_000
    assert melt_quote_state(mint, lightning[0]["quote"])["state"] == "PAID"
    assert books.ledger.key(hash_key(with_address)).balance_msat == 0  # type: ignore[union-attr]
    assert tokens == [{"kind": "token", "key_hash": hash_key(without), "msat": 80_000}]
    assert second == []  # once each
    claim = asyncio.run(_claim(books, without))
    assert user.receive(claim["token"]) == 80
    assert books.ledger.check() == []


async def _claim(books: Books, key: str) -> dict[str, Any]:
    from routstr_addon.ledger import hash_key

    wallet, _ = await books.open()
    try:
        return await Payments(books.ledger, wallet).refund(hash_key(key))
    finally:
        await wallet.close()


def test_payouts_cli(mint: LocalMint, user: UserWallet, ln_server: LnAddressServer,
                     tmp_path: Path) -> None:
    operator = f"op{secrets.token_hex(4)}"
    books = Books(tmp_path, mint, RECEIVE_LN_ADDRESS=ln_server.address(operator),
                  MINIMUM_PAYOUT="10")

    async def fund() -> None:
        wallet, _ = await books.open()
        await receive(wallet, books.ledger, user.token(120))
        await wallet.close()

    asyncio.run(fund())
    env = {**os.environ, "DATA_DIR": str(tmp_path), "CASHU_MINTS": mint.url,
           "WALLET_MNEMONIC": books.config.wallet_mnemonic,
           "RECEIVE_LN_ADDRESS": ln_server.address(operator), "MINIMUM_PAYOUT": "10"}
    dry = subprocess.run([str(BIN / "routstr"), "payouts", "run", "--dry-run", "--json"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert '"would_pay_sats": 120' in dry.stdout and ln_server.requests_for(operator) == []
    paid = subprocess.run([str(BIN / "routstr"), "payouts", "run", "--json"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert paid.returncode == 0, paid.stderr
    listed = subprocess.run([str(BIN / "routstr"), "payouts", "list", "--json"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert '"state": "paid"' in listed.stdout and operator in listed.stdout


def test_kill_9_during_a_payout_then_restart_pays_exactly_once(
        upstream: Any, ln_server: LnAddressServer, tmp_path: Path) -> None:
    """The proxy dies while its mint is paying the invoice; the restarted proxy finds the
    payout pending, asks the mint, and records it paid: once, with no drift."""
    slow = LocalMint(tmp_path / "mint", outgoing_delay=3.0).start()
    owner = UserWallet(slow.url, tmp_path / "user")
    operator = f"op{secrets.token_hex(4)}"
    mnemonic = fresh_mnemonic()
    env = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": slow.url,
           "WALLET_MNEMONIC": mnemonic, "RECEIVE_LN_ADDRESS": ln_server.address(operator),
           "MINIMUM_PAYOUT": "50", "PAYOUT_INTERVAL": "3600"}
    try:
        proxy = start_proxy(tmp_path / "p", upstream.url, {**env, "PAYOUT_INTERVAL": "3600"})
        # The operator's earnings: ecash put into the pool, owed to nobody.
        created = raw(proxy, "POST", "/v1/balance/create",
                      json={"initial_balance_token": owner.token(300)}).json()
        ledger = proxy.ledger()
        with ledger.transaction() as tx:
            tx.execute("UPDATE api_keys SET balance_msat = 0")  # …as if all of it was spent
            tx.execute("DELETE FROM ledger_entries")
        ledger.close()
        assert created["balance"] == 300_000
        proxy.stop()
        # Start it with payouts due at once; kill it while the mint pays (3 s).
        proxy = start_proxy(tmp_path / "p", upstream.url, {**env, "PAYOUT_INTERVAL": "1"})
        deadline = time.monotonic() + 20
        while not ln_server.requests_for(operator):
            assert time.monotonic() < deadline, "no payout started"
            time.sleep(0.05)
        time.sleep(0.5)
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait(10)
        ledger = proxy.ledger()
        (row,) = [r for r in _payout_rows(ledger)]
        ledger.close()
        assert row["state"] == "pending"  # the crash left it unknown

        again = start_proxy(tmp_path / "p", upstream.url, {**env, "PAYOUT_INTERVAL": "3600"})
        try:
            deadline = time.monotonic() + 20
            while True:
                ledger = again.ledger()
                rows = _payout_rows(ledger)
                ledger.close()
                if rows[0]["state"] != "pending":
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
            (done,) = rows
            assert done["state"] == "paid"
            assert len(ln_server.requests_for(operator)) == 1  # paid once
            assert melt_quote_state(slow, done["quote"])["state"] == "PAID"
            books_balance(again, slow.url)
            ledger = again.ledger()
            cur = ledger.db.connection().cursor()
            cur.execute("SELECT COALESCE(SUM(amount), 0) FROM proofs WHERE state = 'unspent'")
            assert int(cur.fetchone()[0]) == 300 - done["amount"] - done["fee_paid"]
            ledger.close()
        finally:
            again.stop()
    finally:
        owner.close()
        slow.stop()


def _payout_rows(ledger: Ledger) -> list[dict[str, Any]]:
    cur = ledger.db.connection().cursor()
    cur.execute("SELECT state, amount, fee_paid, quote FROM payouts ORDER BY created_at")
    return [dict(zip(("state", "amount", "fee_paid", "quote"), r, strict=True))
            for r in cur.fetchall()]



def test_kill_9_during_a_refund_then_restart_refunds_exactly_once(
        upstream: Any, ln_server: LnAddressServer, tmp_path: Path) -> None:
    slow = LocalMint(tmp_path / "mint", outgoing_delay=3.0).start()
    owner = UserWallet(slow.url, tmp_path / "user")
    alice = f"alice{secrets.token_hex(4)}"
    env = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": slow.url,
           "WALLET_MNEMONIC": fresh_mnemonic(), "REFUND_PROCESSING_INTERVAL": "1",
           "ALLOW_PRIVATE_LN_ADDRESSES": "true"}  # the refund address is on loopback
    try:
        proxy = start_proxy(tmp_path / "p", upstream.url, env)
        created = raw(proxy, "POST", "/v1/balance/create",
                      json={"initial_balance_token": owner.token(200)},
                      headers={"Refund-LNURL": ln_server.address(alice),
                               "Key-Expiry-Time": str(int(time.time()) + 2)}).json()
        key = created["api_key"]
        deadline = time.monotonic() + 20
        while not ln_server.requests_for(alice):  # expired: the refund starts…
            assert time.monotonic() < deadline, "no refund started"
            time.sleep(0.05)
        time.sleep(0.5)
        proxy.process.send_signal(signal.SIGKILL)  # …and the proxy dies while the mint pays
        proxy.process.wait(10)
        assert proxy.key_state(key).balance_msat == 0  # debited before paying

        again = start_proxy(tmp_path / "p", upstream.url, env)
        try:
            deadline = time.monotonic() + 20
            while True:
                ledger = again.ledger()
                rows = _payout_rows(ledger)
                ledger.close()
                if rows and rows[0]["state"] != "pending":
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
            (done,) = rows
            assert done["state"] == "paid"
            assert melt_quote_state(slow, done["quote"])["state"] == "PAID"
            assert again.key_state(key).balance_msat == 0
            paid = [a for a in ln_server.requests_for(alice) if a.quote and a.amount_msat ==
                    done["amount"] * 1000]
            assert paid  # the address was asked for exactly what was paid
            books_balance(again, slow.url)
        finally:
            again.stop()
    finally:
        owner.close()
        slow.stop()
