"""Ecash melted to pay a Lightning invoice (table ``payouts``): the operator's earnings, or a
user's refund. A row is written ``pending`` before the mint is asked and stays so until the
outcome is known, so a payment is never made twice nor counted as made when it was not."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["PayoutRecord", "PayoutStore"]


@dataclass(frozen=True, slots=True)
class PayoutRecord:
    id: str
    kind: str  # payout | refund
    key_hash: str | None  # the refunded key
    destination: str  # the Lightning address
    mint: str
    unit: str
    amount: int  # of the invoice, in the unit
    fee_reserve: int
    fee_paid: int
    msat: int  # debited from the key (refunds)
    bolt11: str
    quote: str | None
    outputs: str | None  # the blank outputs taking the melt's change (keyset, start, count)
    state: str  # pending | paid | failed
    error: str | None
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(PayoutRecord.__dataclass_fields__)


def payout_record(row: Any) -> PayoutRecord:
    return PayoutRecord(*row)


class PayoutStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def add(self, tx: Tx, payout_id: str, kind: str, key_hash: str | None, destination: str,
            mint: str, amount: int, fee_reserve: int, msat: int, bolt11: str,
            quote: str) -> None:
        """A payment about to be made, in sats (in the transaction that debits a refunded key)."""
        now = time.time()
        tx.execute("INSERT INTO payouts (id, kind, key_hash, destination, mint, unit, amount, "
                   "fee_reserve, fee_paid, msat, bolt11, quote, outputs, state, error, "
                   "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'sat', ?, ?, 0, ?, ?, ?, "
                   "NULL, 'pending', NULL, ?, ?)",
                   (payout_id, kind, key_hash, destination, mint, amount, fee_reserve, msat,
                    bolt11, quote, now, now))

    def set_outputs(self, payout_id: str, outputs: str | None) -> None:
        with self._db.transaction(durable=True) as tx:
            tx.execute("UPDATE payouts SET outputs = ?, updated_at = ? WHERE id = ?",
                       (outputs, time.time(), payout_id))

    def set_state(self, payout_id: str, state: str, fee_paid: int = 0,
                  error: str | None = None) -> None:
        with self._db.transaction(durable=True) as tx:
            tx.execute("UPDATE payouts SET state = ?, fee_paid = ?, error = ?, updated_at = ? "
                       "WHERE id = ?", (state, fee_paid, error, time.time(), payout_id))

    def fail_in(self, tx: Tx, payout_id: str, error: str) -> bool:
        """Mark a pending payment failed; False if it was not pending (settled already)."""
        return tx.execute("UPDATE payouts SET state = 'failed', error = ?, updated_at = ? "
                          "WHERE id = ? AND state = 'pending'",
                          (error[:500], time.time(), payout_id)) == 1

    def get(self, payout_id: str) -> PayoutRecord | None:
        row = self._db.reader().row(f"SELECT {', '.join(COLUMNS)} FROM payouts WHERE id = ?",
                                    (payout_id,))
        return None if row is None else payout_record(row)

    def pending_ids(self) -> list[str]:
        return [r[0] for r in self._db.reader().rows(
            "SELECT id FROM payouts WHERE state = 'pending'")]

    def recent(self, limit: int = 100) -> list[PayoutRecord]:
        return [payout_record(r) for r in self._db.reader().rows(
            f"SELECT {', '.join(COLUMNS)} FROM payouts ORDER BY created_at DESC LIMIT ?",
            (limit,))]
