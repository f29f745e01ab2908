"""`routstr wallet` and `routstr keys create --token` against the running ecash proxy's own ledger
and a real Nutshell mint: the books read by the CLI match the database after real payments,
`send` never takes users' money, `receive` and `send` round-trip through the pool, `--check`
finds a proof spent behind the ledger's back, and the exit codes.

The proxy and mint are shared with other tests: assertions are about what each test changes
(before/after snapshots), never about global totals."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessageParam
from typer.testing import CliRunner, Result

from cli.main import app
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ecash.tokens import nutshell, sanitize_mint_url, serialize_token
from routstr_addon.ledger import Ledger

from .conftest import Proxy, expected_msat, raw
from .ecash_user import UserWallet

runner = CliRunner()

MODEL = "test/model"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "paid, then audited"}]
POOL = ("unspent", "held", "reserved")


@pytest.fixture
def wallet_env(ecash_proxy: Proxy, mint: LocalMint, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """The CLI pointed at the ecash proxy's ledger and mint, from a folder with no .env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", ecash_proxy.database_url)
    monkeypatch.setenv("CASHU_MINTS", mint.url)
    monkeypatch.setenv("SWAP_UNTRUSTED_MINTS", "false")  # as the proxy runs
    monkeypatch.delenv("UPSTREAM_BASE_URL", raising=False)
    yield ecash_proxy
    ecash_proxy.wait_settled()


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def books(*extra: str) -> dict[str, Any]:
    """``wallet balance --json``; its exit code must agree with its verdict."""
    result = invoke("wallet", "balance", "--json", *extra)
    assert result.exit_code in (0, 1), result.output
    data: dict[str, Any] = json.loads(result.stdout)
    assert result.exit_code == (0 if data["ok"] else 1), data
    return data


def db_books(proxy: Proxy) -> dict[str, Any]:
    """The same figures, read straight from the database (as tests.conftest.books_balance)."""
    ledger = proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT mint, unit, SUM(amount) FROM proofs "
                    "WHERE state IN ('unspent', 'held', 'reserved') GROUP BY mint, unit")
        proofs = {(m, u): int(a) for m, u, a in cur.fetchall()}
        backed = "backed" in {c.name for c in ledger.db.get_columns("api_keys")}
        cur.execute("SELECT COALESCE(SUM(balance_msat), 0) FROM api_keys"
                    + (" WHERE backed" if backed else ""))
        keys = int(cur.fetchone()[0])
        cur.execute("SELECT COALESCE(SUM(msat), 0) FROM refunds WHERE state = 'pending'")
        refunds = int(cur.fetchone()[0])
    finally:
        ledger.close()
    return {"proofs": proofs, "keys": keys, "refunds": refunds}


def proof_rows(proxy: Proxy) -> dict[str, tuple[Any, ...]]:
    """Every proof row by secret: (state, owner, amount, keyset_id, C)."""
    ledger = proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT secret, state, owner, amount, keyset_id, c FROM proofs")
        return {row[0]: tuple(row[1:]) for row in cur.fetchall()}
    finally:
        ledger.close()


# --- balance --------------------------------------------------------------------------------


def test_balance_matches_the_ledger_after_real_payments(wallet_env: Proxy,
                                                        user: UserWallet) -> None:
    proxy = wallet_env
    before = books()
    created = raw(proxy, "POST", "/v1/balance/create",
                  json={"initial_balance_token": user.token(300)})
    assert created.status_code == 200, created.text
    key = created.json()["api_key"]
    completion = proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.usage is not None
    proxy.wait_settled()
    after = books()

    state = proxy.key_state(key)
    cost = expected_msat(MODEL, completion.usage.prompt_tokens,
                         completion.usage.completion_tokens)
    assert state.total_spent_msat == cost > 0
    assert after["proofs_msat"] - before["proofs_msat"] == 300_000  # the test mint takes no fee
    assert after["liabilities_msat"] - before["liabilities_msat"] == state.balance_msat \
        == 300_000 - cost
    assert after["margin_msat"] - before["margin_msat"] == cost  # what the request earned
    assert after["margin_msat"] == after["proofs_msat"] - after["liabilities_msat"]
    assert after["liabilities_msat"] == after["keys_msat"] + after["pending_refunds_msat"]

    db = db_books(proxy)
    assert {(m["mint"], m["unit"]): m["amount"] for m in after["mints"] if m["proofs"]} \
        == db["proofs"]
    assert after["proofs_msat"] == sum(a * 1000 if u == "sat" else a
                                       for (_, u), a in db["proofs"].items())
    assert (after["keys_msat"], after["pending_refunds_msat"]) == (db["keys"], db["refunds"])
    for m in after["mints"]:
        assert m["amount"] == m["unspent"] + m["held"] + m["reserved"]

    human = invoke("wallet", "balance")
    assert human.exit_code == (0 if after["ok"] else 1)
    assert f"{after['margin_msat'] / 1000:,.3f} sats" in human.stdout
    assert f"{after['proofs_msat'] / 1000:,.3f} sats" in human.stdout


def test_balance_check_finds_a_proof_spent_behind_the_ledgers_back(
        wallet_env: Proxy, user: UserWallet, mint: LocalMint) -> None:
    proxy = wallet_env
    known = set(proof_rows(proxy))
    assert invoke("wallet", "receive", user.token(12)).exit_code == 0  # proofs of 8 and 4
    fresh = {s: row for s, row in proof_rows(proxy).items() if s not in known}
    assert sorted(row[2] for row in fresh.values()) == [4, 8]
    assert all(row[0] == "unspent" for row in fresh.values())

    clean = books("--check")
    assert clean["check"]["checked"] == sum(m["proofs"] for m in clean["mints"]) >= 2
    assert clean["check"]["spent"] == [] and clean["check"]["errors"] == []

    # One of the proofs leaks and is spent at the mint; the ledger still counts it.
    secret, (_, _, amount, keyset_id, c) = next((s, r) for s, r in fresh.items() if r[2] == 4)
    nutshell()
    from cashu.core.base import Proof
    from cashu.core.crypto.b_dhke import hash_to_curve

    leaked = serialize_token(sanitize_mint_url(mint.url), "sat",
                             [Proof(id=keyset_id, amount=amount, secret=secret, C=c)])
    try:
        assert user.receive(leaked) == 4
        result = invoke("wallet", "balance", "--check", "--json")
        assert result.exit_code == 1, result.output
        found = json.loads(result.stdout)
        assert found["ok"] is False
        assert found["check"]["spent"] == [{
            "mint": sanitize_mint_url(mint.url), "unit": "sat", "amount": 4, "state": "SPENT",
            "y": hash_to_curve(secret.encode()).format().hex()}]
        assert found["check"]["spent_msat"] == 4000
        human = invoke("wallet", "balance", "--check")
        assert human.exit_code == 1
        assert "spent" in human.stdout and "4 sat" in human.stdout
        audit = invoke("ledger", "check", "--json")  # the audit asks the mints too
        assert audit.exit_code == 1
        assert any("spent at the mint" in p for p in json.loads(audit.stdout)["problems"])
    finally:  # put the books right for the tests that follow
        ledger = proxy.ledger()
        try:
            with ledger.transaction() as tx:
                tx.execute("UPDATE proofs SET state = 'spent' WHERE secret = ?",
                            (secret,))
        finally:
            ledger.close()
    assert books("--check")["check"]["spent"] == []
    audit = invoke("ledger", "check", "--json")
    assert audit.exit_code == 0, audit.stdout
    assert json.loads(audit.stdout)["wallet"]["check"]["checked"] >= 1


# --- send and receive -----------------------------------------------------------------------


def test_send_more_than_the_margin_is_refused_and_changes_nothing(wallet_env: Proxy) -> None:
    proxy = wallet_env
    before = books()
    rows = proof_rows(proxy)
    too_much = max(1, before["margin_msat"] // 1000 + 1)
    result = invoke("wallet", "send", str(too_much))
    assert result.exit_code == 1, result.output
    assert "margin" in result.stderr and result.stdout == ""
    assert proof_rows(proxy) == rows
    assert books() == before


def test_receive_then_send_round_trips_through_the_pool(wallet_env: Proxy, user: UserWallet,
                                                       mint: LocalMint) -> None:
    mint_url = sanitize_mint_url(mint.url)
    before = books()
    token = user.token(65)
    received = invoke("wallet", "receive", token, "--json")
    assert received.exit_code == 0, received.output
    assert json.loads(received.stdout) == {"amount": 65, "fee": 0, "msat": 65_000,
                                           "mint": mint_url, "unit": "sat"}
    middle = books()
    assert middle["proofs_msat"] - before["proofs_msat"] == 65_000
    assert middle["margin_msat"] - before["margin_msat"] == 65_000
    assert middle["liabilities_msat"] == before["liabilities_msat"]

    again = invoke("wallet", "receive", token)
    assert again.exit_code == 1 and "spent" in again.stderr

    sent = invoke("wallet", "send", "64", "--mint", mint.url, "--json")
    assert sent.exit_code == 0, sent.output
    out = json.loads(sent.stdout)
    assert {k: out[k] for k in ("amount", "fee", "withdrawn", "mint", "unit")} == {
        "amount": 64, "fee": 0, "withdrawn": 64, "mint": mint_url, "unit": "sat"}
    assert user.receive(out["token"]) == 64

    plain = invoke("wallet", "send", "1")  # the token alone on stdout, a summary on stderr
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.strip().startswith("cashuB") and "sent 1 sat" in plain.stderr
    assert user.receive(plain.stdout.strip()) == 1

    after = books()
    assert after["proofs_msat"] == before["proofs_msat"]
    assert after["margin_msat"] == before["margin_msat"]


# --- keys create --token --------------------------------------------------------------------


def test_keys_create_with_a_token_funds_a_key_the_proxy_takes(wallet_env: Proxy,
                                                              user: UserWallet) -> None:
    proxy = wallet_env
    before = books()
    token = user.token(21)
    expires = int(time.time()) + 3600
    result = invoke("keys", "create", "--token", token, "--label", "from the cli",
                    "--expiry", str(expires), "--refund-address", "bob@example.com", "--json")
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    key = created["api_key"]
    state = proxy.key_state(key)
    assert state.balance_msat == created["balance_msat"] == created["credited_msat"] == 21_000
    assert state.label == created["label"] == "from the cli"
    assert state.expires_at == expires and state.refund_address == "bob@example.com"
    assert created["backed"] is True

    after = books()
    assert after["proofs_msat"] - before["proofs_msat"] == 21_000
    assert after["liabilities_msat"] - before["liabilities_msat"] == 21_000
    assert after["margin_msat"] == before["margin_msat"]

    completion = proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.usage is not None
    proxy.wait_settled()
    assert proxy.key_state(key).total_requests == 1

    again = invoke("keys", "create", "--token", token)
    assert again.exit_code == 1 and "spent" in again.stderr and again.stdout == ""


# --- exit codes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code"), [
    (["keys", "create", "--token", "cashuBnot-a-token"], 1),
    (["keys", "create", "--token", "hello"], 1),
    (["keys", "create", "--token", "cashuBnot-a-token", "--balance-sats", "5"], 2),
    (["keys", "create", "--token", "cashuBnot-a-token", "--balance-sats", "0"], 2),
    (["wallet", "receive", "cashuBnot-a-token"], 1),
    (["wallet", "receive", ""], 1),
    (["wallet", "send", "0"], 2),
    (["wallet", "send", "lots"], 2),
    (["wallet", "send", "1", "--unit", "usd"], 2),
    (["wallet", "send", "1", "--mint", "http://elsewhere.example"], 2),
])
def test_bad_input_exit_codes(wallet_env: Proxy, args: list[str], code: int) -> None:
    keys_before, rows_before = key_count(wallet_env), proof_rows(wallet_env)
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert key_count(wallet_env) == keys_before and proof_rows(wallet_env) == rows_before


def key_count(proxy: Proxy) -> int:
    ledger = proxy.ledger()
    try:
        return len(ledger.keys(limit=1_000_000))
    finally:
        ledger.close()


def test_a_token_from_an_untrusted_mint_is_refused(wallet_env: Proxy,
                                                   other_mint: LocalMint,
                                                   tmp_path: Path) -> None:
    stranger = UserWallet(other_mint.url, tmp_path / "stranger")
    try:
        token = stranger.token(5)
        for args in (["wallet", "receive", token], ["keys", "create", "--token", token]):
            result = invoke(*args)
            assert result.exit_code == 1, result.output
            assert "not accepted" in result.stderr
        assert stranger.receive(token) == 5  # still the stranger's
    finally:
        stranger.close()


def test_keys_create_swaps_a_foreign_token_in_when_allowed(
        mint: LocalMint, other_mint: LocalMint, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With SWAP_UNTRUSTED_MINTS the CLI does what the proxy does: the token is melted at its
    own mint to pay an invoice of the primary. (A ledger of its own: no proxy's invoice
    watcher races the CLI for the invoice.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CASHU_MINTS", mint.url)
    monkeypatch.setenv("SWAP_UNTRUSTED_MINTS", "true")
    monkeypatch.setenv("ALLOW_PRIVATE_LN_ADDRESSES", "true")  # the other mint is on loopback
    stranger = UserWallet(other_mint.url, tmp_path / "stranger")
    try:
        token = stranger.token(300)
        result = invoke("keys", "create", "--token", token, "--json")
        assert result.exit_code == 0, result.output
        credited = json.loads(result.stdout)["credited_msat"]
        assert 250_000 <= credited < 300_000  # the Lightning and mint fees came off
        assert stranger.spent(token)
    finally:
        stranger.close()
    after = books("--check")
    assert after["proofs_msat"] == after["liabilities_msat"] == credited
    assert after["margin_msat"] == 0 and after["ok"] is True
    assert [m["mint"] for m in after["mints"] if m["proofs"]] == [sanitize_mint_url(mint.url)]


@pytest.mark.parametrize("args", [
    ["wallet", "balance"],
    ["wallet", "balance", "--check", "--json"],
    ["wallet", "send", "1"],
    ["wallet", "receive", "cashuBnot-a-token"],
    ["keys", "create", "--token", "cashuBnot-a-token"],
])
def test_no_mints_configured_exits_2(args: list[str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CASHU_MINTS", "")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "no mints configured (CASHU_MINTS)" in result.stderr


# --- the books on both databases, no mint needed ----------------------------------------------


def test_balance_reads_one_snapshot_on_sqlite_and_postgresql(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("CASHU_MINTS", "http://127.0.0.1:9/, http://Mint.Example")
    ledger = Ledger(database_url)
    try:
        ledger.create_key(7_000)
        now = time.time()
        with ledger.transaction() as tx:
            for i, (mint, unit, amount, state) in enumerate([
                    ("http://127.0.0.1:9", "sat", 8, "unspent"),
                    ("http://127.0.0.1:9", "sat", 2, "held"),
                    ("http://127.0.0.1:9", "sat", 64, "sent"),  # handed out: not counted
                    ("http://127.0.0.1:9", "msat", 512, "reserved"),
                    ("http://old-mint.example", "sat", 1, "unspent")]):
                tx.execute(
                    "INSERT INTO proofs (secret, mint, unit, keyset_id, amount, c, dleq, state, "
                    "owner, created_at, updated_at) VALUES (?, ?, ?, '00', ?, '02', NULL, ?, "
                    "NULL, ?, ?)", (f"secret-{i}", mint, unit, amount, state, now, now))
            tx.execute(
                "INSERT INTO refunds (id, key_hash, msat, mint, unit, token, fee, state, "
                "created_at, updated_at) VALUES (?, 'k', ?, 'http://127.0.0.1:9', 'sat', NULL, "
                "0, ?, ?, ?)", ("r1", 3_000, "pending", now, now))
            tx.execute(
                "INSERT INTO refunds (id, key_hash, msat, mint, unit, token, fee, state, "
                "created_at, updated_at) VALUES (?, 'k', ?, 'http://127.0.0.1:9', 'sat', 't', "
                "0, ?, ?, ?)", ("r2", 5_000, "done", now, now))
    finally:
        ledger.close()
    data = books()
    assert [(m["mint"], m["unit"], m["trusted"], m["amount"], m["msat"]) for m in data["mints"]] \
        == [("http://127.0.0.1:9", "msat", True, 512, 512),
            ("http://127.0.0.1:9", "sat", True, 10, 10_000),
            ("http://mint.example", "sat", True, 0, 0),
            ("http://old-mint.example", "sat", False, 1, 1_000)]
    assert data["proofs_msat"] == 11_512
    assert data["pending_refunds_msat"] == 3_000 and data["pending_refunds"] == 1
    # a key the operator funded is credit, not owed in ecash (on a ledger that tells them apart)
    assert data["keys_msat"] + data["operator_credit_msat"] == 7_000
    assert data["margin_msat"] == 11_512 - 3_000 - data["keys_msat"]
    assert data["check"] is None
