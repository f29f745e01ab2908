"""Lightning top-ups through the primary mint's mint quotes (FakeWallet pays its invoices)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger, hash_key
from routstr_addon.payments.lightning import Invoices, invoice_key

from .conftest import Proxy, books_balance, raw, start_proxy


def wait_credited(proxy: Proxy, status_url: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = raw(proxy, "GET", status_url).json()
        if status["state"] == "credited":
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def credits_of(proxy: Proxy, key_hash: str) -> list[int]:
    ledger = proxy.ledger()
    try:
        return [e["amount_msat"] for e in ledger.entries(key_hash) if e["kind"] == "credit"]
    finally:
        ledger.close()


def test_invoice_creates_a_funded_key_once(ecash_proxy: Proxy, mint: LocalMint) -> None:
    resp = raw(ecash_proxy, "POST", "/v1/balance/lightning/invoice",
               json={"amount_sats": 321, "purpose": "create"})
    assert resp.status_code == 200, resp.text
    invoice = resp.json()
    assert invoice["bolt11"].startswith("lnbc") and invoice["state"] == "unpaid"
    status = wait_credited(ecash_proxy, invoice["status_url"])
    key = status["api_key"]
    assert status["balance"] == 321_000 and status["msats"] == 321_000
    for _ in range(3):  # asking again credits nothing more
        assert raw(ecash_proxy, "GET", invoice["status_url"]).json()["api_key"] == key
    assert credits_of(ecash_proxy, hash_key(key)) == [321_000]
    completion = ecash_proxy.client(key).chat.completions.create(
        model="test/model", messages=[{"role": "user", "content": "paid over lightning"}])
    assert completion.choices[0].message.content
    books_balance(ecash_proxy, mint.url)


def test_invoice_tops_up_the_callers_key(ecash_proxy: Proxy, mint: LocalMint) -> None:
    key = ecash_proxy.new_key(sats=5)
    resp = raw(ecash_proxy, "POST", "/v1/wallet/lightning/invoice",
               json={"amount_sats": 100, "purpose": "topup"},
               headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    status = wait_credited(ecash_proxy, resp.json()["status_url"])
    assert "api_key" not in status and status["msats"] == 100_000
    assert ecash_proxy.key_state(key).balance_msat == 105_000
    assert credits_of(ecash_proxy, hash_key(key)) == [5_000, 100_000]
    books_balance(ecash_proxy, mint.url)


@pytest.mark.parametrize(("body", "code"), [
    ({"amount_sats": 0}, "invalid_amount"),
    ({"amount_sats": "ten"}, "invalid_amount"),
    ({"amount_sats": 10, "purpose": "steal"}, "invalid_purpose"),
])
def test_bad_invoice_requests_are_400(ecash_proxy: Proxy, body: dict[str, Any],
                                      code: str) -> None:
    resp = raw(ecash_proxy, "POST", "/v1/balance/lightning/invoice", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == code


def test_topup_invoice_needs_a_key_and_unknown_invoices_are_404(ecash_proxy: Proxy) -> None:
    resp = raw(ecash_proxy, "POST", "/v1/balance/lightning/invoice",
               json={"amount_sats": 10, "purpose": "topup"})
    assert resp.status_code == 401
    assert raw(ecash_proxy, "GET",
               "/v1/balance/lightning/invoice/nope/status").status_code == 404


def test_paid_invoice_is_credited_after_a_restart(upstream: Any, mint: LocalMint,
                                                  tmp_path: Path) -> None:
    env = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url}
    first = start_proxy(tmp_path / "p", upstream.url, env)
    invoice = raw(first, "POST", "/v1/balance/lightning/invoice",
                  json={"amount_sats": 77, "purpose": "create"}).json()
    first.stop()  # paid (FakeWallet pays by itself) while nobody is running
    time.sleep(0.5)
    second = start_proxy(tmp_path / "p", upstream.url, env)
    try:
        key_hash = hash_key(invoice_key(invoice["invoice_id"]))
        deadline = time.monotonic() + 15
        while True:  # the watcher credits it without anybody asking
            ledger = second.ledger()
            state = ledger.key(key_hash)
            ledger.close()
            if state is not None:
                break
            assert time.monotonic() < deadline, "not credited after the restart"
            time.sleep(0.2)
        assert state.balance_msat == 77_000
        books_balance(second, mint.url)
    finally:
        second.stop()


def test_minting_interrupted_after_the_mint_signed_is_recovered(mint: LocalMint,
                                                                tmp_path: Path) -> None:
    """A crash between the mint signing and the credit: the saved outputs get the signatures
    back (NUT-09) and the key is credited once."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")

    async def scenario() -> None:
        wallet = Wallet(ledger, [mint.url])
        await wallet.start()
        invoices = Invoices(ledger, wallet)
        created = await invoices.create(55, "create")
        row = invoices._row(hashlib.sha256(created["invoice_id"].encode()).hexdigest())
        assert row is not None
        for _ in range(50):
            quote = await wallet.primary.client.mint_quote_state(row.quote)
            if quote["state"] == "PAID":
                break
            await asyncio.sleep(0.1)
        lost = await invoices._mint(wallet.primary, row)  # signed, then the process "dies"
        assert sum(p.amount for p in lost) == 55
        again = invoices._row(row.id_hash)
        assert again is not None and again.state == "minting"
        restarted = Invoices(ledger, wallet)
        settled = await restarted.settle(again)
        assert settled is not None and settled.state == "credited"
        key = invoice_key(created["invoice_id"])
        state = ledger.key(hash_key(key))
        assert state is not None and state.balance_msat == 55_000
        assert wallet.balances()[(mint.url, "sat")] == 55
        await wallet.close()

    asyncio.run(scenario())
    assert ledger.check() == []
    ledger.close()


def test_foreign_tokens_are_swapped_in_over_lightning_when_allowed(
        upstream: Any, mint: LocalMint, other_mint: LocalMint, tmp_path: Path) -> None:
    from .ecash_user import UserWallet

    proxy = start_proxy(tmp_path / "p", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url,
                         "SWAP_UNTRUSTED_MINTS": "true",
                         "ALLOW_PRIVATE_LN_ADDRESSES": "true"})  # the other mint is local
    stranger = UserWallet(other_mint.url, tmp_path / "stranger")
    try:
        token = stranger.token(300)
        created = raw(proxy, "POST", "/v1/balance/create", json={"initial_balance_token": token})
        assert created.status_code == 200, created.text
        balance = created.json()["balance"]
        # Lightning fee reserve and mint fees come off: less than the token, but most of it.
        assert 250_000 <= balance < 300_000 and balance % 1000 == 0
        assert stranger.spent(token)
        key = created.json()["api_key"]
        topped = raw(proxy, "POST", "/v1/balance/topup", json={"cashu_token": stranger.token(200)},
                     headers={"authorization": f"Bearer {key}"})
        assert topped.status_code == 200, topped.text
        assert 150_000 <= topped.json()["msats"] < 200_000
        assert proxy.key_state(key).balance_msat == balance + topped.json()["msats"]
        # The proxy holds only proofs of its own mint.
        ledger = proxy.ledger()
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT DISTINCT mint FROM proofs")
        assert [m for (m,) in cur.fetchall()] == [mint.url]
        ledger.close()
        books_balance(proxy, mint.url)
    finally:
        stranger.close()
        proxy.stop()
