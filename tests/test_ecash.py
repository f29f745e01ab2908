"""Paying with Cashu against a real Nutshell mint: tokens as keys, create/topup/refund, x-cashu
with change (JSON and streaming), and the error table. After each test the operator's proofs,
checked at the mint, cover every balance, and the ledger balances."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.tokens import token_hash

from .conftest import Proxy, books_balance, expected_msat, raw
from .ecash_user import UserWallet

MODEL = "test/model"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "pay me in ecash"}]
BODY = {"model": MODEL, "messages": MESSAGES}
# The published minimum of test/model: its whole context and completion at the test rate.
MIN_SATS = -(-expected_msat(MODEL, 4096, 512) // 1000)


@pytest.fixture(autouse=True)
def _books(ecash_proxy: Proxy, mint: LocalMint) -> Iterator[None]:
    yield
    ecash_proxy.wait_settled()
    books_balance(ecash_proxy, mint.url)


def payments(proxy: Proxy, token: str) -> list[dict[str, Any]]:
    ledger = proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT kind, msat, change, change_msat, fee FROM payments "
                    "WHERE token_hash = ?", (token_hash(token),))
        return [dict(zip(("kind", "msat", "change", "change_msat", "fee"), row, strict=True))
                for row in cur.fetchall()]
    finally:
        ledger.close()


def xpost(proxy: Proxy, token: str, body: Any = None, **headers: str) -> httpx.Response:
    return raw(proxy, "POST", "/v1/chat/completions", json=body or BODY,
               headers={"x-cashu": token, "authorization": "Bearer ignored-by-the-proxy",
                        **headers})


# --- tokens as keys -------------------------------------------------------------------------


def test_token_as_key_is_redeemed_once_and_keeps_working(ecash_proxy: Proxy,
                                                         user: UserWallet) -> None:
    token = user.token(500)
    client = ecash_proxy.client(token)
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert first.usage is not None
    cost1 = expected_msat(MODEL, first.usage.prompt_tokens, first.usage.completion_tokens)
    info = raw(ecash_proxy, "GET", "/v1/balance/info",
               headers={"authorization": f"Bearer {token}"}).json()
    assert info["api_key"] == "sk-" + token_hash(token)
    assert info["balance"] == 500_000 - cost1
    assert user.spent(token)

    second = ecash_proxy.client(token).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert second.usage is not None
    cost2 = expected_msat(MODEL, second.usage.prompt_tokens, second.usage.completion_tokens)
    # The sk- form works as the key too.
    again = raw(ecash_proxy, "GET", "/v1/balance/info",
                headers={"authorization": f"Bearer {info['api_key']}"}).json()
    assert again["balance"] == 500_000 - cost1 - cost2
    assert [p["kind"] for p in payments(ecash_proxy, token)] == ["key"]


def test_20_concurrent_first_uses_of_one_token_credit_it_once(ecash_proxy: Proxy,
                                                              user: UserWallet) -> None:
    token = user.token(1000)

    async def burst() -> Counter[int]:
        client = ecash_proxy.async_client(token)

        async def one() -> int:
            try:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        try:
            return Counter(await asyncio.gather(*(one() for _ in range(20))))
        finally:
            await client.close()

    statuses = asyncio.run(burst())
    assert statuses == Counter({200: 20})
    assert len(payments(ecash_proxy, token)) == 1
    state = ecash_proxy.key_state("sk-" + token_hash(token))
    assert state.balance_msat + state.total_spent_msat == 1_000_000
    assert state.total_requests == 20


def test_cashu_prefix_and_legacy_tokens_are_accepted(ecash_proxy: Proxy,
                                                     user: UserWallet) -> None:
    legacy = user.token(300, legacy=True)
    assert legacy.startswith("cashuA")
    resp = raw(ecash_proxy, "GET", "/v1/balance/info",
               headers={"authorization": f"Bearer cashu:{legacy}"})
    assert resp.status_code == 200 and resp.json()["balance"] == 300_000


# --- create / topup / refund ----------------------------------------------------------------


def test_create_topup_refund_round_trip(ecash_proxy: Proxy, user: UserWallet) -> None:
    expires = int(time.time()) + 3600
    created = raw(ecash_proxy, "POST", "/v1/balance/create",
                  json={"initial_balance_token": user.token(400, dleq=True)},
                  headers={"Key-Expiry-Time": str(expires)})  # no refund address: a token
    assert created.status_code == 200, created.text
    key = created.json()["api_key"]
    assert created.json()["balance"] == 400_000
    state = ecash_proxy.key_state(key)
    assert state.refund_address is None and state.expires_at == expires

    topped = raw(ecash_proxy, "POST", "/v1/balance/topup", json={"cashu_token": user.token(250)},
                 headers={"authorization": f"Bearer {key}"})
    assert topped.status_code == 200 and topped.json() == {"msats": 250_000}

    completion = ecash_proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.usage is not None
    available = ecash_proxy.key_state(key).available_msat
    assert available == 650_000 - expected_msat(MODEL, completion.usage.prompt_tokens,
                                                completion.usage.completion_tokens)

    refund = raw(ecash_proxy, "POST", "/v1/balance/refund",
                 headers={"authorization": f"Bearer {key}"})
    assert refund.status_code == 200, refund.text
    body = refund.json()
    assert body["msats"] == available // 1000 * 1000
    again = raw(ecash_proxy, "POST", "/v1/balance/refund",
                headers={"authorization": f"Bearer {key}"})
    assert again.json()["token"] == body["token"]  # the same token, not a second refund
    assert ecash_proxy.key_state(key).available_msat == available % 1000
    assert user.receive(body["token"]) == available // 1000 - body["fee"]


def test_refund_while_a_request_is_in_flight_is_409(ecash_proxy: Proxy,
                                                    user: UserWallet) -> None:
    key = raw(ecash_proxy, "POST", "/v1/balance/create",
              json={"initial_balance_token": user.token(300)}).json()["api_key"]
    client = ecash_proxy.client(key, default_headers={"x-scenario": "slow"})
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    next(iter(stream))
    refund = raw(ecash_proxy, "POST", "/v1/balance/refund",
                 headers={"authorization": f"Bearer {key}"})
    assert refund.status_code == 409 and refund.json()["error"]["code"] == "requests_in_flight"
    stream.close()


# --- x-cashu --------------------------------------------------------------------------------


def test_xcashu_json_returns_exact_change(ecash_proxy: Proxy, user: UserWallet,
                                          upstream: Any) -> None:
    token = user.token(MIN_SATS + 7)
    upstream.clear()
    resp = xpost(ecash_proxy, token)
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    cost = expected_msat(MODEL, usage["prompt_tokens"], usage["completion_tokens"])
    assert int(resp.headers["x-routstr-cost-msats"]) == cost
    change = resp.headers["x-cashu"]
    assert user.receive(change) == MIN_SATS + 7 - -(-cost // 1000)
    seen = upstream.seen()[-1]
    assert "x-cashu" not in seen.headers and "authorization" not in seen.headers
    (payment,) = payments(ecash_proxy, token)
    assert payment["kind"] == "xcashu" and payment["change"] == change


def test_xcashu_with_the_openai_client(ecash_proxy: Proxy, user: UserWallet) -> None:
    token = user.token(MIN_SATS + 3)
    client = ecash_proxy.client("anything", default_headers={"X-Cashu": token})
    raw_resp = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    completion = raw_resp.parse()
    assert completion.usage is not None
    cost = expected_msat(MODEL, completion.usage.prompt_tokens,
                         completion.usage.completion_tokens)
    assert user.receive(raw_resp.headers["x-cashu"]) == MIN_SATS + 3 - -(-cost // 1000)


def test_xcashu_stream_is_unbuffered_and_ends_with_change(ecash_proxy: Proxy,
                                                          user: UserWallet) -> None:
    token = user.token(MIN_SATS + 11)
    arrivals: list[float] = []
    lines: list[str] = []
    start = time.monotonic()
    with httpx.Client(base_url=ecash_proxy.url, timeout=30) as client, client.stream(
            "POST", "/v1/chat/completions", json={**BODY, "stream": True},
            headers={"x-cashu": token, "x-scenario": "slow"}) as resp:
        assert resp.status_code == 200
        headers_at = time.monotonic() - start
        early = resp.headers.get("x-cashu")  # the token less the reserved maximum, at once
        reserved = int(resp.headers["x-routstr-reserved-msats"])
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - start)
            lines.append(line)
    assert arrivals[0] < 0.35 and arrivals[-1] > 3.0, (headers_at, arrivals)  # chunks came as sent
    cost = int(next(x for x in lines if x.startswith(": x-routstr-cost-msats")).split()[2])
    change = next(x for x in lines if x.startswith(": x-cashu ")).split()[2]
    # Cost and change come before [DONE], where OpenAI clients stop reading.
    done = lines.index("data: [DONE]")
    assert lines.index(f": x-cashu {change}") < done and lines[done + 1:] == [""] * len(
        lines[done + 1:])
    # A client that could not read the stream gets the whole change from the refund endpoint:
    # the header's part and the rest, in one token (the same proofs).
    kept = raw(ecash_proxy, "POST", "/v1/balance/refund", headers={"x-cashu": token}).json()
    assert kept["rest"] == change and kept["early"] == early
    assert user.amount(kept["token"]) == user.amount(early) + user.amount(change)
    header_part = user.receive(early) if early else 0
    assert header_part == MIN_SATS + 11 - -(-reserved // 1000)
    assert header_part + user.receive(change) == MIN_SATS + 11 - -(-cost // 1000)


def test_xcashu_stream_through_the_openai_client_ignores_the_change_comment(
        ecash_proxy: Proxy, user: UserWallet) -> None:
    token = user.token(MIN_SATS + 2)
    client = ecash_proxy.client("anything", default_headers={"X-Cashu": token})
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    kept = raw(ecash_proxy, "POST", "/v1/balance/refund", headers={"x-cashu": token}).json()
    assert user.receive(kept["token"]) >= 2


def test_xcashu_upstream_failure_returns_the_whole_amount(ecash_proxy: Proxy,
                                                          user: UserWallet) -> None:
    token = user.token(MIN_SATS + 5)
    resp = xpost(ecash_proxy, token, **{"x-scenario": "error-500"})
    assert resp.status_code == 500
    change = resp.headers["x-cashu"]
    assert resp.json()["error"]["x_cashu"] == change
    assert user.receive(change) == MIN_SATS + 5


def test_xcashu_token_below_the_minimum_is_402_with_a_payment_request(
        ecash_proxy: Proxy, user: UserWallet, mint: LocalMint, upstream: Any) -> None:
    from cashu.core.nuts.nut18 import deserialize

    token = user.token(MIN_SATS - 1)
    upstream.clear()
    resp = xpost(ecash_proxy, token)
    assert resp.status_code == 402
    assert resp.json()["error"]["code"] == "payment_required"
    # routstr-core's clients read its own 402 fields; OpenAI clients the error; both agree.
    detail = resp.json()["detail"]
    assert detail["type"] == "minimum_balance_required" and detail["model"] == MODEL
    assert detail["amount_required_msat"] == resp.json()["error"]["amount_required_msat"] > 0
    assert resp.json()["error"]["payment_request"] == resp.headers["x-cashu"]
    request = deserialize(resp.headers["x-cashu"])
    published = raw(ecash_proxy, "GET", "/v1/models/test/model").json()["sats_pricing"]
    assert request.a == MIN_SATS == -(-published["max_cost"] * 1000 // 1000)
    assert request.u == "sat" and request.m == [mint.url]
    assert upstream.seen() == []
    assert not user.spent(token)  # not redeemed: still the user's
    # The same request with max_tokens needs less, and the payment request says how much.
    small = xpost(ecash_proxy, token, body={**BODY, "max_tokens": 10})
    assert small.status_code == 200, small.text


def test_spent_truncated_and_foreign_tokens(ecash_proxy: Proxy, user: UserWallet,
                                            other_mint: LocalMint,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    token = user.token(MIN_SATS + 1)
    assert xpost(ecash_proxy, token).status_code == 200
    for replay in (xpost(ecash_proxy, token),
                   raw(ecash_proxy, "POST", "/v1/balance/create",
                       json={"initial_balance_token": token})):
        assert replay.status_code == 400
        assert replay.json()["error"]["code"] == "token_already_spent"

    spent_elsewhere = user.token(50)
    user.receive(spent_elsewhere)  # the user spends it first
    key = ecash_proxy.new_key(sats=1)
    topup = raw(ecash_proxy, "POST", "/v1/balance/topup", json={"cashu_token": spent_elsewhere},
                headers={"authorization": f"Bearer {key}"})
    assert topup.status_code == 400 and topup.json()["error"]["code"] == "token_already_spent"
    assert ecash_proxy.key_state(key).balance_msat == 1000

    fresh = user.token(MIN_SATS + 1)
    truncated = fresh[: len(fresh) // 2]
    for resp in (xpost(ecash_proxy, truncated),
                 raw(ecash_proxy, "POST", "/v1/balance/create",
                     json={"initial_balance_token": truncated})):
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_token"
    assert not user.spent(fresh)

    stranger = UserWallet(other_mint.url, tmp_path_factory.mktemp("stranger"))
    try:
        foreign = stranger.token(MIN_SATS + 1)
        created = raw(ecash_proxy, "POST", "/v1/balance/create",
                      json={"initial_balance_token": foreign})
        assert created.status_code == 400
        assert created.json()["error"]["code"] == "untrusted_mint"
        assert ecash_proxy.env["CASHU_MINTS"] in created.json()["error"]["message"]
        paid = xpost(ecash_proxy, foreign)
        assert paid.status_code == 402 and "x-cashu" in paid.headers
        assert not stranger.spent(foreign)
    finally:
        stranger.close()


def test_mint_down_is_503_and_the_token_works_once_it_is_back(
        upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    from .conftest import start_proxy

    folder = tmp_path_factory.mktemp("flaky")
    flaky = LocalMint(folder / "mint").start()
    owner = UserWallet(flaky.url, folder / "user")
    proxy = start_proxy(folder / "proxy", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": flaky.url})
    try:
        token = owner.token(MIN_SATS + 4)
        flaky.stop()
        for resp in (xpost(proxy, token),
                     raw(proxy, "POST", "/v1/balance/create",
                         json={"initial_balance_token": token})):
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"]
            assert resp.json()["error"]["code"] == "mint_unavailable"
        flaky.start()
        assert not owner.spent(token)
        resp = xpost(proxy, token)
        assert resp.status_code == 200, resp.text
        assert owner.receive(resp.headers["x-cashu"]) > 0
        books_balance(proxy, flaky.url)
    finally:
        proxy.stop()
        owner.close()
        flaky.stop()


def test_mint_fees_are_credited_net_and_change_balances(
        upstream: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    from .conftest import start_proxy

    folder = tmp_path_factory.mktemp("fees")
    fee_mint = LocalMint(folder / "mint", input_fee_ppk=100).start()
    owner = UserWallet(fee_mint.url, folder / "user")
    proxy = start_proxy(folder / "proxy", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1",
                         "CASHU_MINTS": fee_mint.url})
    try:
        token = owner.token(700)  # proofs 512+128+32+16+8+4: 6 inputs, a fee of 1 sat
        created = raw(proxy, "POST", "/v1/balance/create", json={"initial_balance_token": token})
        assert created.status_code == 200, created.text
        assert created.json()["balance"] == 699_000

        xtoken = owner.token(MIN_SATS + 40)
        fee = -(-100 * owner.proof_count(xtoken) // 1000)
        resp = xpost(proxy, xtoken)
        assert resp.status_code == 200, resp.text
        cost = int(resp.headers["x-routstr-cost-msats"])
        change = resp.headers["x-cashu"]
        assert owner.amount(change) == MIN_SATS + 40 - fee - -(-cost // 1000)
        (payment,) = payments(proxy, xtoken)
        assert payment["fee"] == fee
        books_balance(proxy, fee_mint.url)
    finally:
        proxy.stop()
        owner.close()
        fee_mint.stop()


def test_info_lists_the_mints(ecash_proxy: Proxy, mint: LocalMint) -> None:
    assert raw(ecash_proxy, "GET", "/v1/info").json()["mints"] == [mint.url]


def test_ledger_rows_of_an_xcashu_request(ecash_proxy: Proxy, user: UserWallet) -> None:
    token = user.token(MIN_SATS + 9)
    resp = xpost(ecash_proxy, token)
    cost = int(resp.headers["x-routstr-cost-msats"])
    ledger = ecash_proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT key_hash FROM payments WHERE token_hash = ?", (token_hash(token),))
        key_hash = cur.fetchone()[0]
        rows = [(e["kind"], e["amount_msat"]) for e in ledger.entries(key_hash)]
    finally:
        ledger.close()
    change_msat = (MIN_SATS + 9) * 1000 - -(-cost // 1000) * 1000
    rounding = -(-cost // 1000) * 1000 - cost
    expected = [("credit", (MIN_SATS + 9) * 1000), ("reserve", 0), ("charge", -cost),
                ("change", -change_msat)]
    if rounding:
        expected.append(("charge", -rounding))
    assert rows == expected


def test_operator_credit_cannot_be_withdrawn(ecash_proxy: Proxy) -> None:
    key = ecash_proxy.new_key(sats=50)
    resp = raw(ecash_proxy, "POST", "/v1/balance/refund",
               headers={"authorization": f"Bearer {key}"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "not_refundable"
    assert ecash_proxy.key_state(key).balance_msat == 50_000


def test_a_token_with_a_forged_dleq_proof_is_refused(ecash_proxy: Proxy,
                                                     user: UserWallet) -> None:
    from cashu.core.base import TokenV4

    token = user.token(64, dleq=True)
    parsed = TokenV4.deserialize(token)
    first = parsed.t[0].p[0]
    assert first.d is not None
    first.d.s = bytes(32 - len(first.d.s[:1])) + b"\x01"  # a DLEQ proof that cannot verify
    forged = parsed.serialize(include_dleq=True)
    resp = raw(ecash_proxy, "POST", "/v1/balance/create", json={"initial_balance_token": forged})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_token"
    assert "DLEQ" in resp.json()["error"]["message"]
    assert not user.spent(token)


def test_msat_tokens_pay_and_get_exact_change(upstream: Any,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    from .conftest import start_proxy

    folder = tmp_path_factory.mktemp("msat")
    msat_mint = LocalMint(folder / "mint", units=("sat", "msat")).start()
    owner = UserWallet(msat_mint.url, folder / "user", unit="msat")
    proxy = start_proxy(folder / "proxy", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1",
                         "CASHU_MINTS": msat_mint.url})
    try:
        amount = MIN_SATS * 1000 + 12_345
        token = owner.token(amount)
        resp = xpost(proxy, token)
        assert resp.status_code == 200, resp.text
        cost = int(resp.headers["x-routstr-cost-msats"])
        assert owner.receive(resp.headers["x-cashu"]) == amount - cost  # to the msat
        created = raw(proxy, "POST", "/v1/balance/create",
                      json={"initial_balance_token": owner.token(54_321)})
        assert created.status_code == 200 and created.json()["balance"] == 54_321
        books_balance(proxy, msat_mint.url)
    finally:
        proxy.stop()
        owner.close()
        msat_mint.stop()
