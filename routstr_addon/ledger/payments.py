"""Incoming tokens (table ``payments``): each is redeemed once, and its row says what it
credited to which key and, for an x-cashu request, the change handed back. The row keyed by the
token's hash is what makes a second credit of the same token impossible."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["PaymentStore", "XCashuRecord"]


@dataclass(frozen=True, slots=True)
class XCashuRecord:
    """An x-cashu payment as recorded: its key, what it credited, and the change (once cut)."""

    key_hash: str
    mint: str
    unit: str
    msat: int  # credited
    request_id: str
    change: str | None
    change_msat: int
    early_change: str | None = None
    early_change_msat: int = 0


class PaymentStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def record(self, tx: Tx, token_hash: str, kind: str, key_hash: str, mint: str, unit: str,
               amount: int, fee: int, msat: int, request_id: str | None = None) -> None:
        """A token redeemed: ``amount`` and ``fee`` in the unit, ``msat`` credited. Fails (and
        rolls the caller's transaction back) if the token was recorded before."""
        tx.execute("INSERT INTO payments (token_hash, kind, key_hash, mint, unit, amount, fee, "
                   "msat, request_id, change, change_msat, early_change, early_change_msat, "
                   "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0, NULL, 0, ?)",
                   (token_hash, kind, key_hash, mint, unit, amount, fee, msat, request_id,
                    time.time()))

    def seen(self, token_hash: str) -> bool:
        return self._db.reader().row("SELECT 1 FROM payments WHERE token_hash = ?",
                                     (token_hash,)) is not None

    def xcashu(self, token_hash: str) -> XCashuRecord | None:
        row = self._db.reader().row(
            "SELECT key_hash, mint, unit, msat, request_id, change, change_msat, early_change, "
            "early_change_msat FROM payments WHERE token_hash = ? AND kind = 'xcashu'",
            (token_hash,))
        if row is None:
            return None
        key_hash, mint, unit, msat, request_id, change, change_msat, early, early_msat = row
        return XCashuRecord(key_hash, mint, unit, int(msat), request_id, change,
                            int(change_msat), early, int(early_msat or 0))

    def set_change(self, tx: Tx, token_hash: str, change: str | None, change_msat: int) -> None:
        tx.execute("UPDATE payments SET change = ?, change_msat = ? WHERE token_hash = ?",
                   (change, change_msat, token_hash))

    def set_early_change(self, tx: Tx, token_hash: str, change: str | None,
                         change_msat: int) -> None:
        tx.execute("UPDATE payments SET early_change = ?, early_change_msat = ? "
                   "WHERE token_hash = ?", (change, change_msat, token_hash))
