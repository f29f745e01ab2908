"""The ledger package on its own, on SQLite and PostgreSQL: a unit of work commits all of its
steps or none (a token's proofs and the credit they fund), and a database made by an older
version is brought up to date when it is opened."""

from __future__ import annotations

import pytest

from routstr_addon.ledger import DATABASE_ERRORS, Ledger, ProofRecord

MINT = "http://mint.test"


def _proof(secret: str, amount: int) -> ProofRecord:
    return ProofRecord(secret, "00ab", amount, "02", None)


def test_a_tokens_proofs_and_its_credit_commit_together_or_not_at_all(database_url: str) -> None:
    ledger = Ledger(database_url)
    try:
        key = "a" * 64

        def redeem(token_hash: str, secrets: list[str], fail: bool = False) -> None:
            """What ``Payments`` writes for a token made into a key, in one transaction."""
            with ledger.transaction(durable=True) as tx:
                ledger.payments.record(tx, token_hash, "create", key, MINT, "sat", 10, 0, 10_000)
                ledger.proofs.add(tx, MINT, "sat", [_proof(s, 5) for s in secrets], "unspent")
                ledger.create_key_in(tx, key, 10_000, note="token", backed=True)
                if fail:
                    raise RuntimeError("the process dies before the commit")

        with pytest.raises(RuntimeError):
            redeem("t1", ["s1", "s2"], fail=True)
        assert ledger.key(key) is None and ledger.proofs.balances() == {}
        assert not ledger.payments.seen("t1")

        redeem("t1", ["s1", "s2"])
        with pytest.raises(DATABASE_ERRORS):  # the driver's IntegrityError
            redeem("t1", ["s3", "s4"])  # the same token again: refused as a whole
        state = ledger.key(key)
        assert state is not None and state.balance_msat == 10_000 and state.backed
        assert ledger.proofs.balances() == {(MINT, "sat"): 10}  # not the second pair
        assert ledger.payments.seen("t1")
        books = ledger.books([MINT])
        assert (books.proofs_msat, books.liabilities_msat, books.margin_msat) == (10_000,
                                                                                10_000, 0)
        assert ledger.check() == []
    finally:
        ledger.close()


def test_an_older_ledger_gains_the_columns_added_since(database_url: str) -> None:
    """A key table without the columns later versions added (``backed``, ``label``…): opening
    the ledger adds them with their defaults and keeps every row."""
    ledger = Ledger(database_url)
    ledger.close()
    old = Ledger(database_url, create=False)  # an older version's schema, with one old key
    try:
        with old.transaction() as tx:
            tx.execute("DROP TABLE api_keys")
            tx.execute("CREATE TABLE api_keys (key_hash VARCHAR(64) PRIMARY KEY, "
                       "balance_msat BIGINT NOT NULL, reserved_msat BIGINT NOT NULL, "
                       "total_spent_msat BIGINT NOT NULL, total_requests BIGINT NOT NULL, "
                       "created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION, "
                       "refund_address TEXT, disabled BOOLEAN NOT NULL)")
            tx.execute("INSERT INTO api_keys VALUES (?, 5000, 0, 0, 0, 1.0, NULL, NULL, ?)",
                       ("c" * 64, False))
            tx.execute("INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, "
                       "reserved_msat) VALUES (1.0, ?, 'credit', 5000, 0)", ("c" * 64,))
    finally:
        old.close()
    ledger = Ledger(database_url)
    try:
        state = ledger.key("c" * 64)
        assert state is not None and state.balance_msat == 5000
        assert state.label is None and state.backed is False
        held = ledger.reserve("c" * 64, 1000, "r1", "m")  # the request path runs on it
        assert held.available_msat == 4000
        assert ledger.settle("r1", 600) is not None and ledger.check() == []
    finally:
        ledger.close()
