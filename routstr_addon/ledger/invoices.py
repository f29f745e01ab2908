"""Lightning invoices that fund keys (table ``invoices``): ``unpaid`` → ``minting`` →
``credited`` (or ``expired``). Each move is one conditional update, so one process mints an
invoice and a key is credited once: the move to ``credited`` happens in the transaction that
stores the proofs and credits the key."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["InvoiceRecord", "InvoiceStore"]

_COLUMNS = ("id_hash", "quote", "mint", "unit", "amount", "purpose", "key_hash", "state",
            "outputs", "expires_at", "bolt11", "created_at", "paid_at")


@dataclass(slots=True)
class InvoiceRecord:
    id_hash: str  # SHA-256 of the invoice id the client holds (a bearer secret)
    quote: str  # the mint quote's id
    mint: str
    unit: str
    amount: int  # in the unit
    purpose: str  # create | topup
    key_hash: str  # the key it funds
    state: str  # unpaid | minting | credited | expired
    outputs: str | None  # the blinded messages sent while minting, as JSON (NUT-09 recovery)
    expires_at: float | None
    bolt11: str = ""
    created_at: float = 0.0
    paid_at: float | None = None  # when it was credited


class InvoiceStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def add(self, id_hash: str, quote: str, mint: str, amount: int, bolt11: str, purpose: str,
            key_hash: str, expires_at: float | None) -> None:
        """A new unpaid invoice, in sats."""
        now = time.time()
        with self._db.transaction(durable=True) as tx:
            tx.execute("INSERT INTO invoices (id_hash, quote, mint, unit, amount, bolt11, "
                       "purpose, key_hash, state, outputs, expires_at, created_at, updated_at) "
                       "VALUES (?, ?, ?, 'sat', ?, ?, ?, ?, 'unpaid', NULL, ?, ?, ?)",
                       (id_hash, quote, mint, amount, bolt11, purpose, key_hash, expires_at,
                        now, now))

    def add_in(self, tx: Tx, id_hash: str, quote: str, mint: str, amount: int, bolt11: str,
               purpose: str, key_hash: str, expires_at: float | None,
               created_at: float) -> bool:
        """An unpaid invoice brought from elsewhere (``routstr import-core``), inside the
        caller's transaction; False if it is here already."""
        if tx.value("SELECT 1 FROM invoices WHERE id_hash = ?", (id_hash,)) is not None:
            return False
        tx.execute("INSERT INTO invoices (id_hash, quote, mint, unit, amount, bolt11, purpose, "
                   "key_hash, state, outputs, expires_at, created_at, updated_at) "
                   "VALUES (?, ?, ?, 'sat', ?, ?, ?, ?, 'unpaid', NULL, ?, ?, ?)",
                   (id_hash, quote, mint, amount, bolt11, purpose, key_hash, expires_at,
                    created_at, time.time()))
        return True

    def get(self, id_hash: str) -> InvoiceRecord | None:
        return self._one("id_hash", id_hash)

    def by_bolt11(self, bolt11: str) -> InvoiceRecord | None:
        """The invoice of a bolt11 request (whoever holds it may ask how it stands)."""
        return self._one("bolt11", bolt11)

    def _one(self, column: str, value: str) -> InvoiceRecord | None:
        row = self._db.reader().row(f"SELECT {', '.join(_COLUMNS)} FROM invoices "
                                    f"WHERE {column} = ?", (value,))
        if row is None:
            return None
        return InvoiceRecord(row[0], row[1], row[2], row[3], int(row[4]), row[5], row[6], row[7],
                             row[8], None if row[9] is None else float(row[9]), row[10],
                             float(row[11]), None if row[12] is None else float(row[12]))

    def start_minting(self, id_hash: str, outputs: str) -> bool:
        """Claim an unpaid invoice for minting, with the outputs about to be sent (written to
        disk first); False if another process claimed it."""
        with self._db.transaction(durable=True) as tx:
            return tx.execute("UPDATE invoices SET state = 'minting', outputs = ?, "
                              "updated_at = ? WHERE id_hash = ? AND state = 'unpaid'",
                              (outputs, time.time(), id_hash)) == 1

    def credited_in(self, tx: Tx, id_hash: str) -> bool:
        """Mark a minting invoice credited, in the transaction that credits its key; False if
        another process did first (the caller rolls back)."""
        now = time.time()
        return tx.execute("UPDATE invoices SET state = 'credited', outputs = NULL, "
                          "updated_at = ?, paid_at = ? WHERE id_hash = ? AND state = 'minting'",
                          (now, now, id_hash)) == 1

    def move(self, id_hash: str, old: str, new: str) -> None:
        """From state ``old`` (only) to ``new``."""
        with self._db.transaction() as tx:
            tx.execute("UPDATE invoices SET state = ?, updated_at = ? WHERE id_hash = ? "
                       "AND state = ?", (new, time.time(), id_hash, old))

    def open_ids(self) -> list[str]:
        """Invoices not settled yet: unpaid, or interrupted while minting."""
        return [r[0] for r in self._db.reader().rows(
            "SELECT id_hash FROM invoices WHERE state IN ('unpaid', 'minting')")]

    def minting_outputs(self, mint: str) -> list[str]:
        """The saved outputs (JSON) of the invoices being minted at a mint."""
        return [r[0] for r in self._db.reader().rows(
            "SELECT outputs FROM invoices WHERE mint = ? AND state = 'minting' "
            "AND outputs IS NOT NULL", (mint,))]
