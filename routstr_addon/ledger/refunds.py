"""Withdrawals of a key's balance as a token (table ``refunds``): the key is debited and the row
written in one transaction, the token made after; until it is, the refund is owed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["RefundRecord", "RefundStore"]


@dataclass(frozen=True, slots=True)
class RefundRecord:
    id: str
    msat: int  # debited from the key
    mint: str
    unit: str
    token: str | None  # None until made
    fee: int  # the mint's input fee, in the unit


class RefundStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def add(self, tx: Tx, refund_id: str, key_hash: str, msat: int, mint: str,
            unit: str) -> RefundRecord:
        """A refund owed, in the transaction that debits its key."""
        now = time.time()
        tx.execute("INSERT INTO refunds (id, key_hash, msat, mint, unit, token, fee, state, "
                   "created_at, updated_at) VALUES (?, ?, ?, ?, ?, NULL, 0, 'pending', ?, ?)",
                   (refund_id, key_hash, msat, mint, unit, now, now))
        return RefundRecord(refund_id, msat, mint, unit, None, 0)

    def last(self, key_hash: str) -> RefundRecord | None:
        """The key's newest refund."""
        row = self._db.reader().row("SELECT id, msat, mint, unit, token, fee FROM refunds "
                                    "WHERE key_hash = ? ORDER BY created_at DESC LIMIT 1",
                                    (key_hash,))
        return None if row is None else RefundRecord(row[0], int(row[1]), row[2], row[3],
                                                     row[4], int(row[5]))

    def made(self, refund_id: str, token: str, fee: int) -> None:
        """The refund's token exists: it is handed out, owed no more."""
        with self._db.transaction(durable=True) as tx:
            tx.execute("UPDATE refunds SET token = ?, fee = ?, state = 'done', updated_at = ? "
                       "WHERE id = ?", (token, fee, time.time(), refund_id))
