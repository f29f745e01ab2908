"""The Cashu money rules called directly (no proxy), against the real test mint."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.tokens import change_friendly_amounts, parse_token, pick_exact
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.errors import ApiError
from routstr_addon.ledger import Ledger
from routstr_addon.payments.cashu import Payments

from .ecash_user import UserWallet


def with_payments[T](mint: LocalMint, tmp_path: Path,
                  body: Callable[[Payments, Ledger], Awaitable[T]]) -> T:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")

    async def run() -> T:
        wallet = Wallet(ledger, [mint.url])
        await wallet.start()
        try:
            return await body(Payments(ledger, wallet), ledger)
        finally:
            await wallet.close()

    try:
        result = asyncio.run(run())
        assert ledger.check() == []
        return result
    finally:
        ledger.close()


def test_change_left_on_the_payment_key_is_paid_out_on_request(
        mint: LocalMint, user: UserWallet, tmp_path: Path) -> None:
    """The change could not be cut when the request ended: it stays on the payment's key, and
    POST /v1/balance/refund with the original X-Cashu pays it out (once)."""
    token = user.token(40)

    async def body(payments: Payments, ledger: Ledger) -> tuple[str, str]:
        payment = (await payments.open_xcashu(token, "req-1", 12_000)).payment
        ledger.reserve(payment.key_hash, 12_000, "req-1", "m")  # as the meter does
        ledger.settle("req-1", 5_500)  # …and then the process lost track of the request
        first = await payments.stored_change(token)
        again = await payments.stored_change(token)
        assert first is not None and again is not None
        assert first["msats"] == 34_000 and again["token"] == first["token"]
        state = ledger.key(payment.key_hash)  # the 500 msat below one sat: the operator's
        assert state is not None and state.balance_msat == 0
        return str(first["token"]), payment.key_hash

    change, _ = with_payments(mint, tmp_path, body)
    assert user.receive(change) == 34


def test_xcashu_change_is_cut_exactly_for_every_cost(mint: LocalMint, user: UserWallet,
                                                     tmp_path: Path) -> None:
    costs = [0, 1, 999, 1000, 1001, 12_345, 29_999, 30_000]
    tokens = [user.token(50) for _ in costs]

    async def body(payments: Payments, ledger: Ledger) -> list[str]:
        changes = []
        for i, (token, cost) in enumerate(zip(tokens, costs, strict=True)):
            payment = (await payments.open_xcashu(token, f"r{i}", 30_000)).payment
            ledger.reserve(payment.key_hash, 30_000, f"r{i}", "m")  # as the meter does
            ledger.settle(f"r{i}", cost)
            closed = payments.close_xcashu(payment, f"r{i}")
            assert closed.change_msat == 50_000 - -(-cost // 1000) * 1000
            assert ledger.key(payment.key_hash).balance_msat == 0  # type: ignore[union-attr]
            changes.append(closed.change or "")
        return changes

    changes = with_payments(mint, tmp_path, body)
    for change, cost in zip(changes, costs, strict=True):
        assert user.receive(change) == 50 - -(-cost // 1000)


def test_refund_of_an_unknown_key_and_a_bad_token(mint: LocalMint, tmp_path: Path) -> None:
    async def body(payments: Payments, ledger: Ledger) -> None:
        with pytest.raises(ApiError) as e:
            await payments.refund("0" * 64)
        assert e.value.status == 401
        with pytest.raises(ApiError) as e:
            await payments.create("cashuBnotatoken")
        assert e.value.status == 400 and e.value.code == "invalid_token"

    with_payments(mint, tmp_path, body)


@pytest.mark.parametrize("total", [1, 2, 7, 64, 100, 1000, 4097])
def test_change_friendly_amounts_cover_every_change(total: int) -> None:
    for variable in {0, 1, total // 3, total - 1, total}:
        amounts = change_friendly_amounts(total, variable)
        assert sum(amounts) == total
        assert all(a & (a - 1) == 0 for a in amounts)  # powers of two: keyset denominations
        for change in range(total - variable, total + 1):
            picked = pick_exact(amounts, change)
            assert picked is not None and sum(amounts[i] for i in picked) == change


def test_two_wallets_on_one_ledger_never_claim_the_same_proof(
        mint: LocalMint, user: UserWallet, database_url: str) -> None:
    """The proxy and the CLI (or two proxies) sending from one pool at once: while one
    claim is open, the other waits for it and then takes different proofs."""
    tokens = [user.token(16) for _ in range(3)]

    async def scenario() -> None:
        ledgers = [Ledger(database_url), Ledger(database_url)]
        wallets = [Wallet(ledger, [mint.url]) for ledger in ledgers]
        for w in wallets:
            await w.start()
        for token in tokens:  # the pool: three 16-sat proofs
            redeemed = await wallets[0].redeem(parse_token(token))
            with ledgers[0].transaction() as tx:
                wallets[0].store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs,
                                    "unspent")
        mint_wallet = wallets[0].primary
        other: list[list[str]] = []
        with ledgers[0].transaction() as tx:  # the first claim, held open…
            first, _ = wallets[0]._pick_in(tx, mint_wallet, "sat", 16, "first")
            rival = threading.Thread(target=lambda: other.append(
                [p.secret for p in wallets[1]._claim(wallets[1].primary, "sat", 16,
                                                     "second")[0]]))
            rival.start()
            time.sleep(0.5)  # …while the second one reads the same pool and waits on it
        rival.join(20)
        assert other and set(other[0]).isdisjoint(p.secret for p in first)
        for w in wallets:
            await w.close()
        for ledger in ledgers:
            ledger.close()

    asyncio.run(scenario())
