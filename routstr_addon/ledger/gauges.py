"""What the metrics read from the ledger at scrape time: the books, charges over all processes,
and payouts and refunds by state. Small aggregates (one row per key, per payout), read in one
snapshot; the caller keeps them a few seconds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from routstr_addon.ledger.books import read_books

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["read_gauges"]


def read_gauges(database: Database, trusted: Sequence[str] = ()) -> dict[str, Any]:
    books = read_books(database, trusted)
    with database.snapshot() as tx:
        charged, requests = tx.row("SELECT COALESCE(SUM(total_spent_msat), 0), "
                                   "COALESCE(SUM(total_requests), 0) FROM api_keys")
        payouts = tx.rows("SELECT kind, state, COUNT(*), COALESCE(SUM(CASE unit WHEN 'sat' "
                          "THEN amount * 1000 ELSE amount END), 0) FROM payouts "
                          "GROUP BY kind, state")
        refunds = tx.rows("SELECT state, COUNT(*), COALESCE(SUM(msat), 0) FROM refunds "
                          "GROUP BY state")
        locked = tx.rows("SELECT state, unit, COUNT(*), COALESCE(SUM(amount), 0) "
                         "FROM locked_proofs GROUP BY state, unit")
    return {
        "holdings": [(h.mint, h.unit, h.msat) for h in books.holdings],
        "liabilities_msat": books.liabilities_msat,
        "keys_msat": books.keys_msat,
        "operator_credit_msat": books.credit_msat,
        "pending_payouts_msat": books.payouts_msat,
        "margin_msat": books.margin_msat,
        "ledger_charged_msat": int(charged),
        "ledger_requests": int(requests),
        "payouts": [(str(k), str(s), int(n), int(m)) for k, s, n, m in payouts],
        "refunds": [("token", str(s), int(n), int(m)) for s, n, m in refunds],
        # Proofs received locked to the payment key: received, redeeming, redeemed, lost.
        "locked": [(str(s), str(u), int(n), int(a)) for s, u, n, a in locked],
    }
