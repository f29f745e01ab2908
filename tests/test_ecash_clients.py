"""Ecash as Routstr's clients send it (issue 12, item 6): long tokens as keys, the protocol's
Lightning paths at the root, invoices from the next mint while the primary is down, foreign
tokens whose melt fails, and a busy mint answered with 503 rather than ``invalid_token``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr_addon.dev.demo import run_in_thread
from routstr_addon.dev.localmint import LocalMint
from tests.ecash_user import UserWallet

from .conftest import Proxy, books_balance, raw, start_proxy
from .mintfront import MintFront

MODEL = "test/model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def front(mint: LocalMint) -> Iterator[MintFront]:
    with run_in_thread(MintFront(mint.url)) as server:
        assert isinstance(server, MintFront)
        yield server


@pytest.fixture
def other_front(other_mint: LocalMint) -> Iterator[MintFront]:
    with run_in_thread(MintFront(other_mint.url)) as server:
        assert isinstance(server, MintFront)
        yield server


def env_for(upstream: Any, mints: str, **extra: str) -> dict[str, str]:
    return {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mints, **extra}


def many_proof_token(user: UserWallet, proofs: int) -> str:
    """A token of ``proofs`` one-sat proofs with DLEQ, as a nutshell wallet makes after many
    small payments: thousands of characters."""

    async def make() -> str:
        import asyncio

        wallet = user.wallet
        quote = await wallet.request_mint(proofs)
        for _ in range(100):  # FakeWallet pays its invoice after a short delay
            try:
                ones = await wallet.mint(proofs, quote_id=quote.quote, split=[1] * proofs)
                break
            except Exception:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the test mint never paid its invoice")
        await wallet.set_reserved_for_send(ones, reserved=True)
        token: str = await wallet.serialize_proofs(ones, include_dleq=True)
        return token

    return user.run(make())


def test_a_token_of_nine_thousand_characters_works_as_the_bearer_key(
        ecash_proxy: Proxy, user: UserWallet) -> None:
    token = many_proof_token(user, 60)
    assert len(token) > 9000
    client = ecash_proxy.client(token)
    answer = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert answer.http_response.status_code == 200
    cost = int(answer.headers["x-routstr-cost-msats"])
    info = raw(ecash_proxy, "GET", "/v1/balance/info",
               headers={"authorization": f"Bearer {token}"})
    assert info.status_code == 200, info.text
    assert info.json()["balance"] == 60_000 - cost


def test_lightning_invoices_at_the_protocols_root_paths(ecash_proxy: Proxy,
                                                        mint: LocalMint) -> None:
    made = raw(ecash_proxy, "POST", "/lightning/invoice",
               json={"amount_sats": 42, "purpose": "create"})
    assert made.status_code == 200, made.text
    invoice = made.json()
    assert invoice["status_url"] == f"/lightning/invoice/{invoice['invoice_id']}/status"
    deadline = time.monotonic() + 15
    while (status := raw(ecash_proxy, "GET", invoice["status_url"]).json())["state"] \
            != "credited":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["api_key"].startswith("sk-") and status["balance"] == 42_000
    books_balance(ecash_proxy, mint.url)


def test_an_invoice_comes_from_the_next_mint_while_the_primary_is_rate_limited_or_down(
        upstream: Any, front: MintFront, other_mint: LocalMint, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        env_for(upstream, f"{front.url},{other_mint.url}", MINT_TIMEOUT="2"))
    try:
        front.refuse["/v1/mint/quote/bolt11"] = (
            429, {"detail": "Rate limit exceeded: 60 per 1 minute"}, 1)
        limited = raw(proxy, "POST", "/v1/balance/lightning/invoice",
                      json={"amount_sats": 30, "purpose": "create"})
        assert limited.status_code == 200, limited.text
        front.fail["/v1/mint/quote/bolt11"] = 502  # now down
        down = raw(proxy, "POST", "/lightning/invoice", json={"amount_sats": 31})
        assert down.status_code == 200, down.text
        for made, sats in ((limited.json(), 30), (down.json(), 31)):
            deadline = time.monotonic() + 15
            while (status := raw(proxy, "GET", made["status_url"]).json())["state"] \
                    != "credited":
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["balance"] == sats * 1000
        ledger = proxy.ledger()
        try:
            cur = ledger.db.connection().cursor()
            cur.execute("SELECT DISTINCT mint FROM proofs")
            assert [m for (m,) in cur.fetchall()] == [other_mint.url]
        finally:
            ledger.close()
        front.fail.clear()  # the primary is back: invoices are its own again
        back = raw(proxy, "POST", "/lightning/invoice", json={"amount_sats": 5}).json()
        assert "/v1/mint/quote/bolt11" in front.calls[-2:] and back["bolt11"]
    finally:
        proxy.stop()


@pytest.mark.parametrize("detail", ["database is locked", "Rate limit exceeded"])
def test_a_busy_mint_answers_503_with_a_retry_hint_and_leaves_the_token_unspent(
        upstream: Any, front: MintFront, tmp_path: Path, detail: str) -> None:
    owner = UserWallet(front.url, tmp_path / "owner")
    proxy = start_proxy(tmp_path / "p", upstream.url, env_for(upstream, front.url))
    try:
        token = owner.token(400)
        front.refuse["/v1/swap"] = (400, {"detail": f"(sqlite3.OperationalError) {detail}",
                                          "code": 0}, 3)
        for attempt in (
                lambda: raw(proxy, "POST", "/v1/balance/create",
                            json={"initial_balance_token": token}),
                lambda: raw(proxy, "POST", "/v1/chat/completions", json=BODY,
                            headers={"authorization": f"Bearer {token}"}),
                lambda: raw(proxy, "POST", "/v1/chat/completions", json=BODY,
                            headers={"x-cashu": token})):
            resp = attempt()
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "mint_unavailable"
            assert "still yours" in resp.json()["error"]["message"]
            assert int(resp.headers["retry-after"]) > 0
        assert not owner.spent(token)
        again = raw(proxy, "POST", "/v1/balance/create", json={"initial_balance_token": token})
        assert again.status_code == 200, again.text
    finally:
        proxy.stop()
        owner.close()


def test_a_foreign_token_whose_melt_fails_is_quoted_again_then_says_it_is_unspent(
        upstream: Any, mint: LocalMint, other_front: MintFront, tmp_path: Path) -> None:
    stranger = UserWallet(other_front.url, tmp_path / "stranger")
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        env_for(upstream, mint.url, SWAP_UNTRUSTED_MINTS="true",
                                ALLOW_PRIVATE_LN_ADDRESSES="true"))
    try:
        refusal = (400, {"detail": "Lightning payment failed: no route", "code": 20000}, 1)
        other_front.refuse["/v1/melt/bolt11"] = refusal
        token = stranger.token(300)
        created = raw(proxy, "POST", "/v1/balance/create", json={"initial_balance_token": token})
        assert created.status_code == 200, created.text
        assert other_front.calls.count("/v1/melt/quote/bolt11") == 2  # quoted again
        assert 250_000 <= created.json()["balance"] < 300_000

        other_front.refuse["/v1/melt/bolt11"] = (*refusal[:2], 5)  # it never pays
        token = stranger.token(200)
        failed = raw(proxy, "POST", "/v1/balance/create", json={"initial_balance_token": token})
        assert failed.status_code == 502, failed.text
        error = failed.json()["error"]
        assert error["code"] == "swap_failed" and "not spent" in error["message"]
        assert not stranger.spent(token)
        assert stranger.receive(token) == 200  # still the user's
        books_balance(proxy, mint.url)
    finally:
        proxy.stop()
        stranger.close()


def test_a_mint_refusing_the_proxys_own_outputs_says_the_token_is_still_the_users(
        upstream: Any, front: MintFront, tmp_path: Path) -> None:
    """The mint signed these outputs before (the wallet's counters are behind): the fault is
    the proxy's, the token is untouched, and the answer says so rather than invalid_token."""
    owner = UserWallet(front.url, tmp_path / "owner")
    proxy = start_proxy(tmp_path / "p", upstream.url, env_for(upstream, front.url))
    try:
        token = owner.token(100)
        front.refuse["/v1/swap"] = (400, {"detail": "outputs have already been signed before.",
                                          "code": 11003}, 1)
        resp = raw(proxy, "POST", "/v1/balance/create", json={"initial_balance_token": token})
        assert resp.status_code == 502, resp.text
        error = resp.json()["error"]
        assert error["code"] == "mint_error" and "still yours" in error["message"]
        assert not owner.spent(token)
    finally:
        proxy.stop()
        owner.close()


@pytest.mark.parametrize(("status", "detail", "passing"), [
    (400, "database is locked", True),
    # nutshell's answer when its proofs_pending lock times out under a burst of swaps
    (400, "failed to acquire database locks (LockOptions(table='proofs_pending', "
          "select_statement=None, parameters={}, timeout=1),) after 1s and 1 trials", True),
    (429, "slow down", True),
    (400, "Token already spent.", False),
    (400, "could not verify proofs.", False),
])
def test_which_mint_answers_are_passing_trouble(status: int, detail: str, passing: bool) -> None:
    from routstr_addon.ecash.mint import transient

    assert transient(status, detail) is passing
