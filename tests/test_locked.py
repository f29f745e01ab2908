"""x-cashu with no mint on the request path (issue 15): ecash locked to the proxy's payment key.

A real nutshell mint, a real mitmdump, cashu-ts paying the 402's NUT-18 request: the request
succeeds while the mint is stopped; replays in every disguise are refused; every misbuilt lock
is refused with nothing stored; the batch swap redeems the proofs and the books balance; change
comes from the pool and no proof of it is handed out twice, even by two processes at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.p2pk import PaymentKey
from routstr_addon.ecash.tokens import nutshell, parse_token, serialize_token
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger
from routstr_addon.payments.locked import LockedPayments

from .cashu_ts import CashuTs
from .conftest import Proxy, books_balance, expected_msat, raw, start_proxy
from .ecash_user import UserWallet
from .test_p2pk import DAY, OTHER, mint_secrets, p2pk

nutshell()
from cashu.core.base import (  # noqa: E402
    DLEQWallet,
    NUT10Option,
    PaymentRequest,
    TokenV3,
    TokenV3Token,
)
from cashu.core.nuts.nut18 import deserialize, serialize  # noqa: E402
from mnemonic import Mnemonic  # noqa: E402

MODEL = "test/model"


class MintAt(Protocol):
    """A mint as the helpers need it: its URL (a LocalMint, or a front naming itself so)."""

    @property
    def url(self) -> str: ...

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "pay me offline"}]}
MIN_SATS = -(-expected_msat(MODEL, 4096, 512) // 1000)
POOL_TOKEN = 2047  # funds the change pool with one proof of each amount 1 … 1024


@pytest.fixture(scope="module")
def locked_mint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMint]:
    """A mint of the module's own: it is stopped and started again."""
    m = LocalMint(tmp_path_factory.mktemp("locked-mint")).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def owner(locked_mint: LocalMint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserWallet]:
    u = UserWallet(locked_mint.url, tmp_path_factory.mktemp("locked-user"))
    yield u
    u.close()


def proxy_env(mint: MintAt, upstream_url: str, **extra: str) -> dict[str, str]:
    """A proxy's settings: a mnemonic of its own (proxies with one ledger share one), no
    background batch swap or refill (the tests run them)."""
    return {"UPSTREAM_BASE_URL": f"{upstream_url}/v1", "CASHU_MINTS": mint.url,
            "WALLET_MNEMONIC": Mnemonic("english").generate(128),
            "LOCKED_REDEEM_INTERVAL": "3600", "CHANGE_POOL_PER_AMOUNT": "0", **extra}


def key_of(proxy: Proxy) -> str:
    """The proxy's payment key, as a payer learns it."""
    key: str = raw(proxy, "GET", "/v1/info").json()["payment_key"]
    return key


def locked_request(proxy: Proxy, mint: LocalMint, amount: int) -> str:
    """A NUT-18 request like the 402's, for another amount."""
    request = PaymentRequest(a=amount, u="sat", m=[mint.url],
                             nut10=NUT10Option(k="P2PK", d=key_of(proxy)))
    encoded: str = serialize(request)
    return encoded


@pytest.fixture(scope="module")
def lproxy(upstream: Any, locked_mint: LocalMint, owner: UserWallet,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A proxy taking locked payments, its change pool funded by a key's token."""
    p = start_proxy(tmp_path_factory.mktemp("locked-proxy"), upstream.url,
                    proxy_env(locked_mint, upstream.url))
    for _ in range(4):
        fund_pool(p, owner)
    yield p
    p.stop()


def fund_pool(proxy: Proxy, owner: UserWallet, amount: int = POOL_TOKEN) -> None:
    created = raw(proxy, "POST", "/v1/balance/create",
                  json={"initial_balance_token": owner.token(amount)})
    assert created.status_code == 200, created.text


def xpost(proxy: Proxy, token: str, body: Any = None) -> httpx.Response:
    return raw(proxy, "POST", "/v1/chat/completions", json=body or BODY,
               headers={"x-cashu": token, "authorization": "Bearer anything"})


def ledger_rows(proxy: Proxy, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    ledger = proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute(ledger.database.sql(sql), tuple(params))
        return list(cur.fetchall())
    finally:
        ledger.close()


def mint_log_size(mint: LocalMint) -> int:
    return (mint.folder / "mint.log").stat().st_size


def locked_token(proxy: Proxy, mint: MintAt, amounts: Sequence[int], **lock: Any) -> str:
    """A token of proofs locked as asked (p2pk() of test_p2pk; to the proxy's key unless
    ``data`` says otherwise), minted at the real mint."""
    lock.setdefault("data", key_of(proxy))
    proofs = mint_secrets(mint.url, [(p2pk(**lock), a) for a in amounts])
    return serialize_token(mint.url, "sat", proofs)


def payment_request(proxy: Proxy, owner: UserWallet) -> str:
    """The creqA of a 402: a token too small for the request."""
    resp = xpost(proxy, owner.token(1))
    assert resp.status_code == 402, resp.text
    return resp.headers["x-cashu"]


def private_key(mnemonic: str) -> bytes:
    from bip32 import BIP32

    from routstr_addon.ecash.seed import seed_from_mnemonic

    return bytes(BIP32.from_seed(seed_from_mnemonic(mnemonic)).get_privkey_from_path(
        "m/1381192786'/0'/0'"))


def redeem(proxy: Proxy, mint: LocalMint) -> Any:
    """Run the batch swap the proxy runs in the background, on its ledger."""
    async def run() -> Any:
        ledger = Ledger(proxy.database_url)
        from routstr_addon.ecash.seed import seed_from_mnemonic

        wallet = Wallet(ledger, [mint.url],
                        seed=seed_from_mnemonic(proxy.env["WALLET_MNEMONIC"]))
        try:
            await wallet.start()
            return await LockedPayments(ledger, wallet, 0).redeem()
        finally:
            await wallet.close()
            ledger.close()

    return asyncio.run(run())


# --- the headline: cashu-ts pays, the mint is stopped, the request succeeds -----------------


def test_info_publishes_the_payment_key_and_the_402_asks_for_a_lock(
        lproxy: Proxy, owner: UserWallet, locked_mint: LocalMint) -> None:
    info = raw(lproxy, "GET", "/v1/info").json()
    key = PaymentKey.from_mnemonic(lproxy.env["WALLET_MNEMONIC"]).public_hex
    assert info["payment_key"] == key  # derived from WALLET_MNEMONIC: restored with it
    request = deserialize(payment_request(lproxy, owner))
    assert request.nut10 is not None
    assert (request.nut10.k, request.nut10.d, request.nut10.t) == ("P2PK", key, None)
    assert request.a == MIN_SATS and request.u == "sat" and request.m == [locked_mint.url]


def test_cashu_ts_pays_the_402_and_the_request_succeeds_with_the_mint_stopped(
        lproxy: Proxy, owner: UserWallet, locked_mint: LocalMint, cashu_ts: CashuTs,
        upstream: Any) -> None:
    creq = payment_request(lproxy, owner)
    paid = cashu_ts.pay(locked_mint.url, creq)  # sendToRequest, locked as the request asks
    json_token = cashu_ts.pay(locked_mint.url, creq)
    stream_token = cashu_ts.pay(locked_mint.url, locked_request(lproxy, locked_mint,
                                                                  MIN_SATS + 5))
    assert sum(p.amount for p in parse_token(paid).proofs) == MIN_SATS
    locked_mint.stop()
    size = mint_log_size(locked_mint)
    try:
        upstream.clear()
        resp = xpost(lproxy, paid)
        assert resp.status_code == 200, resp.text
        cost = int(resp.headers["x-routstr-cost-msats"])
        change = resp.headers["x-cashu"]
        assert sum(p.amount for p in parse_token(change).proofs) == MIN_SATS - -(-cost // 1000)
        assert len(upstream.seen()) == 1
        # JSON and a stream through the proxy, both offline.
        assert xpost(lproxy, json_token).status_code == 200
        with httpx.Client(base_url=lproxy.url, timeout=30) as client, client.stream(
                "POST", "/v1/chat/completions", json={**BODY, "stream": True},
                headers={"x-cashu": stream_token}) as streamed:
            assert streamed.status_code == 200
            early = streamed.headers.get("x-cashu")
            lines = list(streamed.iter_lines())
        rest = next(x for x in lines if x.startswith(": x-cashu ")).split()[2]
        assert lines.index(f": x-cashu {rest}") < lines.index("data: [DONE]")
        assert early is not None and sum(p.amount for p in parse_token(early).proofs) == 5
        assert mint_log_size(locked_mint) == size  # not one request reached the mint
        assert "mint unreachable" not in lproxy.output.text
    finally:
        locked_mint.start()
    # The change is good ecash at the mint, and the locked proofs are the proxy's to redeem.
    assert owner.receive(change) == MIN_SATS - -(-cost // 1000)
    assert owner.receive(early) == 5 and owner.receive(rest) >= 0
    result = redeem(lproxy, locked_mint)
    assert result.redeemed >= 3 and result.lost == 0
    assert ledger_rows(lproxy, "SELECT COUNT(*) FROM locked_proofs WHERE state <> 'redeemed'") \
        == [(0,)]
    lproxy.wait_settled()
    books_balance(lproxy, locked_mint.url)


def test_nutshell_cashu_pay_works_too(lproxy: Proxy, owner: UserWallet, locked_mint: LocalMint,
                                      nutshell_cli: Any) -> None:
    import re

    assert "Invoice paid" in nutshell_cli("invoice", "100")
    output = nutshell_cli("-y", "pay", payment_request(lproxy, owner))
    found = re.search(r"cashuB[A-Za-z0-9_-]+", output)
    assert found, output
    resp = xpost(lproxy, found.group(0))
    assert resp.status_code == 200, resp.text
    lock = json.loads(parse_token(found.group(0)).proofs[0].secret)
    assert any(tag[0] == "locktime" for tag in lock[1]["tags"])  # a day ahead: redeemed in time


@pytest.fixture
def nutshell_cli(locked_mint: LocalMint, tmp_path: Path) -> Iterator[Any]:
    import os
    import subprocess

    from .conftest import BIN

    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path),
           "CASHU_DIR": str(tmp_path / "cashu"), "MINT_URL": locked_mint.url, "DEBUG": "FALSE"}

    def run(*args: str) -> str:
        done = subprocess.run([str(BIN / "cashu"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    yield run


# --- replays --------------------------------------------------------------------------------


def reencoded_v3(token: str) -> str:
    parsed = parse_token(token)
    text: str = TokenV3(token=[TokenV3Token(mint=parsed.mint, proofs=parsed.proofs)],
                        _unit="sat").serialize(include_dleq=True)
    assert text.startswith("cashuA")
    return text


def with_long_ids(token: str, mint: LocalMint) -> str:
    keysets = httpx.get(f"{mint.url}/v1/keysets", timeout=10).json()["keysets"]
    parsed = parse_token(token)
    proofs = [p.model_copy(update={"id": next(k["id"] for k in keysets
                                               if k["id"].startswith(p.id))})
              for p in parsed.proofs]
    return serialize_token(parsed.mint, "sat", proofs)


def test_replays_in_every_disguise_are_refused(lproxy: Proxy, owner: UserWallet,
                                               locked_mint: LocalMint,
                                               cashu_ts: CashuTs) -> None:
    paid = cashu_ts.pay(locked_mint.url, locked_request(lproxy, locked_mint,
                                                                  MIN_SATS + 3))
    assert all(len(p.id) == 16 for p in parse_token(paid).proofs)  # short keyset ids
    assert xpost(lproxy, paid).status_code == 200
    parsed = parse_token(paid)
    disguises = [paid, reencoded_v3(paid), with_long_ids(paid, locked_mint),
                 serialize_token(parsed.mint, "sat", list(reversed(parsed.proofs)))]
    assert len({parse_token(d).hash for d in disguises}) == 4  # four different token hashes
    for disguise in disguises:
        resp = xpost(lproxy, disguise)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "token_already_spent"
    # One proof of a spent token inside a new one: refused too.
    fresh = locked_token(lproxy, locked_mint, [8])
    mixed = serialize_token(parsed.mint, "sat", [*parse_token(fresh).proofs, parsed.proofs[0]])
    assert xpost(lproxy, mixed).json()["error"]["code"] == "token_already_spent"


def test_two_processes_never_accept_the_same_proofs(
        upstream: Any, locked_mint: LocalMint, owner: UserWallet, pg_database: str,
        tmp_path: Path) -> None:
    env = proxy_env(locked_mint, upstream.url, DATABASE_URL=pg_database)
    a = start_proxy(tmp_path / "a", upstream.url, env)
    b = start_proxy(tmp_path / "b", upstream.url, env)
    try:
        fund_pool(a, owner)
        tokens = [locked_token(a, locked_mint, [8, 4, 2]) for _ in range(4)]
        results: list[int] = []

        def send(proxy: Proxy, token: str) -> None:
            results.append(xpost(proxy, token).status_code)

        for token in tokens:
            threads = [threading.Thread(target=send, args=(p, token)) for p in (a, b, a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert sorted(results) == [200] * 4 + [400] * 12, results
        a.wait_settled()
        assert ledger_rows(a, "SELECT COUNT(*) FROM locked_proofs") == [(12,)]
        books_balance(a, locked_mint.url)
    finally:
        a.stop()
        b.stop()


# --- refusals: each a clear 400, nothing stored ---------------------------------------------


def forged(token: str, field: str) -> str:
    parsed = parse_token(token)
    first = parsed.proofs[0]
    assert first.dleq is not None
    if field == "C":
        from cashu.core.crypto.secp import PrivateKey

        other = PrivateKey(bytes.fromhex("05" * 32)).public_key.format().hex()
        changed = first.model_copy(update={"C": other})
    elif field == "dleq":
        changed = first.model_copy(update={"dleq": None})
    else:
        value = (int(getattr(first.dleq, field), 16) ^ 1).to_bytes(32, "big").hex()
        changed = first.model_copy(update={"dleq": DLEQWallet(**{**first.dleq.model_dump(),
                                                                 field: value})})
    return serialize_token(parsed.mint, "sat", [changed, *parsed.proofs[1:]])


REFUSED_LOCKS: dict[str, tuple[dict[str, Any], str]] = {
    "wrong_key": ({"data": OTHER.public_hex}, "wrong_key"),
    "extra_pubkeys": ({"tags": [["pubkeys", OTHER.public_hex]]}, "extra_pubkeys"),
    "refund_tag": ({"tags": [["locktime", str(int(time.time()) + 2 * DAY)],
                             ["refund", OTHER.public_hex]]}, "refund_path"),
    "short_locktime": ({"tags": [["locktime", str(int(time.time()) + 600)]]},
                       "locktime_too_soon"),
    "sig_all": ({"tags": [["sigflag", "SIG_ALL"]]}, "sig_all"),
}


def test_misbuilt_locked_tokens_are_refused_and_nothing_is_stored(
        lproxy: Proxy, locked_mint: LocalMint, other_mint: LocalMint, upstream: Any) -> None:
    cases: dict[str, tuple[str, str]] = {
        name: (locked_token(lproxy, locked_mint, [8, 4], **lock), code)
        for name, (lock, code) in REFUSED_LOCKS.items()}
    good = locked_token(lproxy, locked_mint, [8, 4])
    cases["forged_C"] = (forged(good, "C"), "invalid_dleq")
    cases["forged_s"] = (forged(good, "s"), "invalid_dleq")
    cases["missing_dleq"] = (forged(good, "dleq"), "missing_dleq")
    key = key_of(lproxy)
    foreign = mint_secrets(other_mint.url, [(p2pk(data=key), 8), (p2pk(data=key), 4)])
    # Proofs of another mint's keyset, presented as this mint's.
    cases["foreign_keyset"] = (serialize_token(locked_mint.url, "sat", foreign),
                               "unknown_keyset")
    before = ledger_rows(lproxy, "SELECT COUNT(*) FROM locked_proofs")
    payments = ledger_rows(lproxy, "SELECT COUNT(*) FROM payments")
    upstream.clear()
    for name, (token, code) in cases.items():
        resp = xpost(lproxy, token)
        expected = 402 if code == "unknown_keyset" else 400
        assert resp.status_code == expected, (name, resp.text)
        if expected == 400:
            assert resp.json()["error"]["code"] == code, (name, resp.text)
    assert upstream.seen() == []
    assert ledger_rows(lproxy, "SELECT COUNT(*) FROM locked_proofs") == before
    assert ledger_rows(lproxy, "SELECT COUNT(*) FROM payments") == payments
    # The good token was never taken: it pays.
    assert xpost(lproxy, good).status_code == 200


# --- change from the pool -------------------------------------------------------------------


def test_concurrent_requests_never_get_the_same_change_proof(
        upstream: Any, locked_mint: LocalMint, owner: UserWallet, tmp_path: Path) -> None:
    env = proxy_env(locked_mint, upstream.url)
    a = start_proxy(tmp_path / "a", upstream.url, env)
    b = start_proxy(tmp_path / "b", upstream.url, {
        **env, "DATABASE_URL": a.database_url})
    try:
        for _ in range(6):
            fund_pool(a, owner)
        tokens = [locked_token(a, locked_mint, [8, 4]) for _ in range(8)]
        changes: list[str] = []

        def send(proxy: Proxy, token: str) -> None:
            resp = xpost(proxy, token)
            assert resp.status_code == 200, resp.text
            changes.append(resp.headers["x-cashu"])

        threads = [threading.Thread(target=send, args=((a, b)[i % 2], t))
                   for i, t in enumerate(tokens)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(changes) == 8
        secrets = [p.secret for c in changes for p in parse_token(c).proofs]
        assert len(secrets) == len(set(secrets))  # no proof handed out twice
        a.wait_settled()
        books_balance(a, locked_mint.url)
    finally:
        a.stop()
        b.stop()


def test_a_change_the_pool_cannot_cover_stays_claimable(
        upstream: Any, locked_mint: LocalMint, owner: UserWallet, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path / "p", upstream.url, proxy_env(locked_mint, upstream.url))
    try:
        fund_pool(proxy, owner, 1)  # a pool of one 1-sat proof
        token = locked_token(proxy, locked_mint, [64, 8])
        resp = xpost(proxy, token)
        assert resp.status_code == 200, resp.text
        cost = int(resp.headers["x-routstr-cost-msats"])
        part = resp.headers.get("x-cashu")
        got = owner.receive(part) if part else 0
        assert got <= 1
        proxy.wait_settled()
        redeem(proxy, locked_mint)  # the batch swap brings the proofs the rest is paid from
        claimed = raw(proxy, "POST", "/v1/balance/refund", headers={"x-cashu": token})
        assert claimed.status_code == 200, claimed.text
        whole = claimed.json()["token"]
        # The whole change, with the part already received (its proofs are spent now).
        assert owner.amount(whole) == 72 - -(-cost // 1000)
        again = raw(proxy, "POST", "/v1/balance/refund", headers={"x-cashu": token}).json()
        assert again["token"] == whole
        proxy.wait_settled()
        books_balance(proxy, locked_mint.url)
    finally:
        proxy.stop()


def test_the_batch_swap_signs_witnesses_and_refills_the_pool(
        lproxy: Proxy, locked_mint: LocalMint) -> None:
    for _ in range(3):
        assert xpost(lproxy, locked_token(lproxy, locked_mint, [16, 8, 2])).status_code == 200
    lproxy.wait_settled()
    received = ledger_rows(lproxy, "SELECT y FROM locked_proofs WHERE state = 'received'")
    assert len(received) >= 9

    async def run() -> Any:
        ledger = Ledger(lproxy.database_url)
        from routstr_addon.ecash.seed import seed_from_mnemonic

        wallet = Wallet(ledger, [locked_mint.url],
                        seed=seed_from_mnemonic(lproxy.env["WALLET_MNEMONIC"]))
        try:
            await wallet.start()
            locked = LockedPayments(ledger, wallet, 2)
            return await locked.redeem(), ledger.locked.pool_counts(locked_mint.url, "sat")
        finally:
            await wallet.close()
            ledger.close()

    result, pool = asyncio.run(run())
    assert result.redeemed == len(received) and result.lost == 0
    assert pool.get(1, 0) >= 2 and pool.get(2, 0) >= 2  # the outputs topped the pool up
    states = httpx.post(f"{locked_mint.url}/v1/checkstate",
                        json={"Ys": [y for (y,) in received]}, timeout=10).json()["states"]
    assert {s["state"] for s in states} == {"SPENT"}  # swapped by the proxy, with witnesses
    books_balance(lproxy, locked_mint.url)


def test_a_proof_spent_elsewhere_is_marked_lost_and_counted(
        upstream: Any, locked_mint: LocalMint, owner: UserWallet, tmp_path: Path) -> None:
    """A locked proof with a locktime that passed after acceptance: anyone could spend it."""
    from .test_p2pk import witness_by

    proxy = start_proxy(tmp_path / "p", upstream.url,
                        proxy_env(locked_mint, upstream.url))
    try:
        fund_pool(proxy, owner)
        key = key_of(proxy)
        proofs = mint_secrets(locked_mint.url, [(p2pk(data=key), 16), (p2pk(data=key), 8)])
        assert xpost(proxy, serialize_token(locked_mint.url, "sat", proofs)).status_code == 200
        proxy.wait_settled()
        # The payer spends one first (it still holds the secret: a mint honouring another path
        # looks the same to the proxy). Here: with the proxy's own key, as a thief would need.
        thief = proofs[0].model_copy(update={"witness": witness_by(
            private_key(proxy.env["WALLET_MNEMONIC"]), proofs[0].secret)})

        async def steal() -> None:
            from routstr_addon.ecash.wallet import MintWallet

            w = MintWallet(locked_mint.url)
            try:
                await w.load()
                await w.swap([thief], [16], "sat")
            finally:
                await w.client.aclose()

        asyncio.run(steal())
        result = redeem(proxy, locked_mint)
        assert result.lost == 1 and result.redeemed == 0
        assert ledger_rows(proxy, "SELECT state FROM locked_proofs ORDER BY amount") == [
            ("received",), ("lost",)]
        result = redeem(proxy, locked_mint)
        assert result.redeemed == 1
    finally:
        proxy.stop()



# --- off the request path: the proxy's own background work, lost answers, the audit ---------


def test_the_proxy_redeems_in_the_background_and_refills_its_pool(
        upstream: Any, locked_mint: LocalMint, owner: UserWallet, tmp_path: Path,
        database_url: str) -> None:
    from .test_observe import METRICS_TOKEN, scrape, value

    proxy = start_proxy(tmp_path / "p", upstream.url, proxy_env(
        locked_mint, upstream.url, LOCKED_REDEEM_INTERVAL="1", CHANGE_POOL_PER_AMOUNT="2",
        DATABASE_URL=database_url, METRICS_TOKEN=METRICS_TOKEN))
    try:
        fund_pool(proxy, owner, 4096)  # one large proof: the refill splits it
        assert xpost(proxy, locked_token(proxy, locked_mint, [16, 4])).status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = ledger_rows(proxy, "SELECT COUNT(*) FROM locked_proofs "
                                      "WHERE state <> 'redeemed'")
            small = ledger_rows(proxy, "SELECT COUNT(*) FROM proofs WHERE state = 'unspent' "
                                       "AND amount = 1")
            if left == [(0,)] and small[0][0] >= 2:
                break
            time.sleep(0.5)
        assert left == [(0,)] and small[0][0] >= 2, (left, small)
        proxy.wait_settled()
        books_balance(proxy, locked_mint.url)
        # The first scrape reads the ledger now.
        metrics = raw(proxy, "GET", "/metrics",
                      headers={"authorization": f"Bearer {METRICS_TOKEN}"})
        samples = scrape(metrics.text)
        assert value(samples, "routstr_locked_proofs", state="redeemed", unit="sat") == 2
        assert value(samples, "routstr_locked_proofs_amount", state="redeemed",
                     unit="sat") == 20
        assert value(samples, "routstr_locked_proofs", state="lost", unit="sat") == 0
    finally:
        proxy.stop()


def test_a_batch_swap_whose_answer_is_lost_is_recovered(
        upstream: Any, locked_mint: LocalMint, owner: UserWallet, tmp_path: Path) -> None:
    """The mint swaps but its answer never arrives (a timeout, or the proxy killed meanwhile):
    the outputs saved before the call find the new proofs again (NUT-09); nothing is lost."""
    from routstr_addon.dev.demo import run_in_thread
    from routstr_addon.ecash.seed import seed_from_mnemonic

    from .mintfront import MintFront

    with run_in_thread(MintFront(locked_mint.url)) as front:
        assert isinstance(front, MintFront)
        proxy = start_proxy(tmp_path / "p", upstream.url,
                            proxy_env(LocalMintAt(front.url), upstream.url))
        funder = UserWallet(front.url, tmp_path / "u")
        try:
            fund_pool(proxy, funder)
            token = locked_token(proxy, LocalMintAt(front.url), [32, 8])
            assert xpost(proxy, token).status_code == 200
            proxy.wait_settled()
            mnemonic = proxy.env["WALLET_MNEMONIC"]

            async def redeem_with(timeout: float) -> Any:
                ledger = Ledger(proxy.database_url)
                wallet = Wallet(ledger, [front.url], timeout=timeout,
                                seed=seed_from_mnemonic(mnemonic))
                try:
                    await wallet.start()
                    return await LockedPayments(ledger, wallet, 0).redeem(recover_all=True)
                finally:
                    await wallet.close()
                    ledger.close()

            front.delay["/v1/swap"] = 3.0
            lost = asyncio.run(redeem_with(1.0))
            assert lost.pending == 1 and lost.redeemed == 0
            assert ledger_rows(proxy, "SELECT DISTINCT state FROM locked_proofs") == [
                ("redeeming",)]
            front.delay.clear()
            time.sleep(2.5)  # the mint has done the swap by now
            found = asyncio.run(redeem_with(10.0))
            assert found.recovered == 1 and found.redeemed == 2
            assert ledger_rows(proxy, "SELECT DISTINCT state FROM locked_proofs") == [
                ("redeemed",)]
            books_balance(proxy, locked_mint.url)
        finally:
            proxy.stop()
            funder.close()


class LocalMintAt:
    """A front that names itself the mint, as the helpers take a mint."""

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def url(self) -> str:
        return self._url


def test_ledger_check_counts_locked_proofs_and_the_pool(lproxy: Proxy,
                                                        locked_mint: LocalMint) -> None:
    import subprocess

    from .conftest import BIN

    assert xpost(lproxy, locked_token(lproxy, locked_mint, [16, 8])).status_code == 200
    lproxy.wait_settled()
    done = subprocess.run([str(BIN / "routstr"), "ledger", "check", "--json"],
                          env=lproxy.env, cwd=lproxy.workdir, capture_output=True, text=True,
                          timeout=120)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], done.stdout + done.stderr
    wallet = report["wallet"]
    assert wallet["locked_msat"] >= 24_000  # counted, and checked unspent at the mint
    assert wallet["locked"]["received"][0] >= 2
    assert wallet["check"]["checked"] >= 2
    (pool,) = wallet["change_pool"].values()
    assert sum(pool.values()) > 0
