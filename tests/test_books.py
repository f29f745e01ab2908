"""The operator's margin is one figure: ``routstr wallet balance``, /admin (the overview and its
withdraw) and the payouts read the same ``Ledger.books``, also while a payout is under way, when
the proofs it claimed are still counted as held but are not the operator's to take.

No mint answers here (CASHU_MINTS names a closed port): the books are the ledger's alone, and a
payout whose outcome cannot be asked stays pending."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from routstr_addon.ecash.wallet import Wallet
from routstr_addon.ledger import Ledger, ProofRecord
from routstr_addon.payments.payouts import Payouts
from routstr_addon.settings import load_config

from .conftest import start_proxy
from .upstream import TestUpstream

MINT = "http://127.0.0.1:9"  # nobody listens: every mint call fails at once, nothing is sent
PASSWORD = "one margin for everyone"


def seed_books(ledger: Ledger) -> int:
    """Proofs, what users are owed and a payout under way; the margin they make (msat)."""
    owner = "b" * 64
    with ledger.transaction(durable=True) as tx:
        ledger.create_key_in(tx, owner, 7_000, note="token", backed=True)
        ledger.debit_in(tx, owner, 3_000, "refund", request_id="r1", kind="refund")
        ledger.refunds.add(tx, "r1", owner, 3_000, MINT, "sat")  # owed until its token is made
        ledger.create_key_in(tx, "c" * 64, 50_000, note="by hand")  # credit: not owed in ecash
        for i, (amount, state, proof_owner) in enumerate([
                (100, "unspent", None), (2, "held", "req"), (30, "reserved", "p1"),
                (64, "sent", "change")]):  # handed out: not the proxy's
            ledger.proofs.add(tx, MINT, "sat", [ProofRecord(f"s{i}", "00ab", amount, "02", None)],
                              state, proof_owner)
        ledger.proofs.add(tx, MINT, "msat", [ProofRecord("m", "00cd", 512, "02", None)],
                          "unspent")
        # A payout that claimed the 30-sat proof; the mint was never heard back from.
        ledger.payouts.add(tx, "p1", "payout", None, "op@example.com", MINT, 20, 2, 0,
                           "lnbc200n1…", "quote-1")
    held = (100 + 2 + 30) * 1000 + 512
    owed = (7_000 - 3_000) + 3_000
    outgoing = (20 + 2) * 1000
    return held - owed - outgoing


@pytest.fixture
def cli_env(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("CASHU_MINTS", MINT)
    monkeypatch.delenv("UPSTREAM_BASE_URL", raising=False)
    return database_url


def test_wallet_balance_admin_and_payouts_agree_while_a_payout_is_pending(
        cli_env: str, upstream: TestUpstream, tmp_path: Path) -> None:
    database_url = cli_env
    ledger = Ledger(database_url)
    try:
        margin = seed_books(ledger)
    finally:
        ledger.close()
    assert margin == 103_512

    # routstr wallet balance
    result = CliRunner().invoke(app, ["wallet", "balance", "--json"])
    assert result.exit_code == 0, result.output
    books = json.loads(result.stdout)
    assert books["margin_msat"] == margin
    assert books["pending_payouts_msat"] == 22_000 and books["pending_payouts"] == 1
    assert books["proofs_msat"] - books["liabilities_msat"] - books["pending_payouts_msat"] \
        == margin
    assert books["operator_credit_msat"] == 50_000 and books["covered"]

    # the payouts, driven directly: the figure a payout would be cut from
    config = load_config({"DATA_DIR": str(tmp_path / "payouts"), "DATABASE_URL": database_url,
                          "CASHU_MINTS": MINT, "RECEIVE_LN_ADDRESS": "op@example.com",
                          "MINIMUM_PAYOUT": "1000", "MINT_TIMEOUT": "2"})
    ledger = Ledger(database_url)
    try:
        wallet = Wallet(ledger, [MINT], timeout=2)
        payouts = Payouts(ledger, wallet, config)
        assert payouts.books().margin_msat == margin

        async def run() -> dict[str, object]:
            try:
                return await payouts.run()
            finally:
                await wallet.close()

        ran = asyncio.run(run())
        assert ran["payout"] is None and ran["settled"] == []  # still pending: nobody answered
        assert ran["books"] == {k: v for k, v in books.items()
                                if k not in ("covered", "check", "ok")}
        assert ran["skipped"] == (f"profit {margin // 1000:,}.{margin % 1000:03d} sats is below "
                                  "MINIMUM_PAYOUT "
                                  "(1000)")
        assert ledger.payouts.get("p1").state == "pending"  # type: ignore[union-attr]
    finally:
        ledger.close()

    # /admin: the overview's margin and what its withdraw refuses
    proxy = start_proxy(tmp_path / "proxy", upstream.url, {
        "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "ADMIN_PASSWORD": PASSWORD,
        "DATABASE_URL": database_url, "CASHU_MINTS": MINT, "MINT_TIMEOUT": "2"})
    try:
        with httpx.Client(base_url=proxy.url, timeout=30) as c:
            assert c.post("/admin/login", data={"password": PASSWORD}).status_code == 303
            page = c.get("/admin").text
            shown = re.search(r'id="profit">([^<]+)<', page)
            assert shown is not None, page
            assert shown.group(1).strip() == f"{margin / 1000:,.3f}"
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf is not None
            over = c.post("/admin/withdraw", data={"csrf": csrf.group(1), "mint": MINT,
                                                   "amount_sats": str(margin // 1000 + 1)})
            assert over.status_code == 400 and "Refused" in over.text
            assert f"{margin / 1000:,.3f} sats" in over.text
    finally:
        proxy.stop()
    assert proxy.check() == []
    ledger = Ledger(database_url)
    try:  # the proxy's own payouts run could not settle it either
        assert ledger.payouts.get("p1").state == "pending"  # type: ignore[union-attr]
        assert ledger.books([MINT]).margin_msat == margin
    finally:
        ledger.close()
