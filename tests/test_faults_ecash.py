"""The mint slow, erroring or down around an x-cashu payment: a clear answer, and the user's
token never lost (a swap whose answer was lost is recovered when the token comes back)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routstr_addon.dev.demo import run_in_thread
from routstr_addon.dev.localmint import LocalMint

from .conftest import Proxy, books_balance, expected_msat, raw, start_proxy
from .ecash_user import UserWallet
from .mintfront import MintFront

MODEL = "test/model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "pay through a bad mint"}]}
MIN_SATS = -(-expected_msat(MODEL, 4096, 512) // 1000)


@pytest.fixture
def front(mint: LocalMint) -> Iterator[MintFront]:
    with run_in_thread(MintFront(mint.url)) as server:
        assert isinstance(server, MintFront)
        yield server


@pytest.fixture
def setup(front: MintFront, upstream: Any, tmp_path: Path) -> Iterator[tuple[Proxy, UserWallet]]:
    owner = UserWallet(front.url, tmp_path / "user")
    proxy = start_proxy(tmp_path / "p", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": front.url,
                         "MINT_TIMEOUT": "1"})
    yield proxy, owner
    proxy.stop()
    owner.close()


def pay(proxy: Proxy, token: str) -> Any:
    return raw(proxy, "POST", "/v1/chat/completions", json=BODY, headers={"x-cashu": token})


def test_a_slow_mint_then_the_same_token_recovers_the_lost_swap(
        setup: tuple[Proxy, UserWallet], front: MintFront) -> None:
    proxy, owner = setup
    token = owner.token(MIN_SATS + 9)
    front.delay["/v1/swap"] = 2.5  # the mint swaps, but its answer comes too late
    first = pay(proxy, token)
    assert first.status_code == 503 and first.headers["retry-after"]
    assert first.json()["error"]["code"] == "mint_unavailable"
    time.sleep(2)
    assert owner.spent(token)  # the mint did swap it
    front.delay.clear()
    again = pay(proxy, token)  # the same token: its swap is recovered, not lost
    assert again.status_code == 200, again.text
    cost = int(again.headers["x-routstr-cost-msats"])
    assert owner.receive(again.headers["x-cashu"]) == MIN_SATS + 9 - -(-cost // 1000)
    books_balance(proxy, front.url)


def test_an_erroring_mint_is_a_503_and_the_token_works_afterwards(
        setup: tuple[Proxy, UserWallet], front: MintFront) -> None:
    proxy, owner = setup
    token = owner.token(MIN_SATS + 4)
    front.fail["/v1/swap"] = 500
    first = pay(proxy, token)
    assert first.status_code == 503
    assert not owner.spent(token)
    front.fail.clear()
    again = pay(proxy, token)
    assert again.status_code == 200, again.text
    assert owner.receive(again.headers["x-cashu"]) > 0
    books_balance(proxy, front.url)


def test_the_mint_down_after_the_swap_does_not_stop_the_change(
        setup: tuple[Proxy, UserWallet], front: MintFront) -> None:
    proxy, owner = setup
    token, later = owner.token(MIN_SATS + 6), owner.token(MIN_SATS + 6)
    swaps_before = front.calls.count("/v1/swap")
    resp = pay(proxy, token)
    assert resp.status_code == 200
    assert front.calls.count("/v1/swap") == swaps_before + 1  # one mint call: the swap
    front.fail.update({"/v1/swap": 503, "/v1/checkstate": 503, "/v1/keysets": 503})
    streamed = raw(proxy, "POST", "/v1/chat/completions", json={**BODY, "stream": True},
                   headers={"x-cashu": later})
    # Nothing can be redeemed while the mint is down: a clear 503 for the next token…
    assert streamed.status_code == 503
    front.fail.clear()
    # …while the change of the first, cut without the mint, redeems once it is back, and
    # the second token, not redeemed, is still the user's.
    assert owner.receive(resp.headers["x-cashu"]) > 0
    assert not owner.spent(later)
    books_balance(proxy, front.url)
