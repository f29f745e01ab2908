"""Proofs received locked to the proxy's payment key (table ``locked_proofs``), accepted
offline and swapped later in batches; and the change pool's reads and claims on ``proofs``.

A locked proof's ``y`` is its primary key: inserting it is the replay check, exact across
processes (the second insert of the same proof fails, on SQLite and PostgreSQL alike).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from routstr_addon.ledger.proofs import ProofRecord

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["LockedRecord", "LockedStore"]

_BATCH = 100  # Ys per IN (...) list
_COLUMNS = "y, secret, mint, unit, keyset_id, amount, c, dleq, locktime"


@dataclass(frozen=True, slots=True)
class LockedRecord:
    y: str
    secret: str
    mint: str
    unit: str
    keyset_id: str
    amount: int
    c: str
    dleq: str | None
    locktime: int | None


def _locked(row: Sequence[Any]) -> LockedRecord:
    y, secret, mint, unit, keyset_id, amount, c, dleq, locktime = row
    return LockedRecord(y, secret, mint, unit, keyset_id, int(amount), c, dleq,
                        None if locktime is None else int(locktime))


class LockedStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- receiving -----------------------------------------------------------------------------

    def seen(self, ys: Sequence[str]) -> set[str]:
        """Which of these Ys were received before (in any state)."""
        found: set[str] = set()
        reader = self._db.reader()
        for start in range(0, len(ys), _BATCH):
            batch = list(ys[start:start + _BATCH])
            marks = ", ".join("?" * len(batch))
            found.update(str(r[0]) for r in reader.rows(
                f"SELECT y FROM locked_proofs WHERE y IN ({marks})", batch))
        return found

    def add(self, tx: Tx, token_hash: str, records: Sequence[LockedRecord]) -> None:
        """Record received proofs; fails (rolling the caller's transaction back) if any was
        received before."""
        now = time.time()
        tx.executemany(
            "INSERT INTO locked_proofs (y, secret, mint, unit, keyset_id, amount, c, dleq, "
            "locktime, token_hash, state, batch, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received', NULL, ?, ?)",
            [(r.y, r.secret, r.mint, r.unit, r.keyset_id, r.amount, r.c, r.dleq, r.locktime,
              token_hash, now, now) for r in records])

    # -- the batch swap ------------------------------------------------------------------------

    def claim_batch(self, batch: str, mint: str, unit: str, limit: int) -> list[LockedRecord]:
        """Mark up to ``limit`` received proofs of a mint and unit ``redeeming`` in ``batch``,
        the earliest locktime first (then the oldest); conditional, so two processes never
        take the same proof."""
        now = time.time()
        with self._db.transaction() as tx:
            rows = [_locked(r) for r in tx.rows(
                f"SELECT {_COLUMNS} FROM locked_proofs WHERE state = 'received' AND mint = ? "
                "AND unit = ? ORDER BY CASE WHEN locktime IS NULL THEN 1 ELSE 0 END, locktime, "
                "created_at LIMIT ?", (mint, unit, limit))]
            taken = [r for r in rows if tx.execute(
                "UPDATE locked_proofs SET state = 'redeeming', batch = ?, updated_at = ? "
                "WHERE y = ? AND state = 'received'", (batch, now, r.y)) == 1]
        return taken

    def in_batch(self, batch: str) -> list[LockedRecord]:
        return [_locked(r) for r in self._db.reader().rows(
            f"SELECT {_COLUMNS} FROM locked_proofs WHERE batch = ? AND state = 'redeeming'",
            (batch,))]

    def batches(self, started_before: float) -> list[str]:
        """Batches whose outcome is not recorded yet, claimed before ``started_before`` (so
        not one another process is swapping right now)."""
        return [str(r[0]) for r in self._db.reader().rows(
            "SELECT DISTINCT batch FROM locked_proofs WHERE state = 'redeeming' "
            "AND updated_at < ?", (started_before,))]

    def set_state(self, tx: Tx, ys: Sequence[str], state: str) -> None:
        now = time.time()
        tx.executemany("UPDATE locked_proofs SET state = ?, updated_at = ? WHERE y = ?",
                       [(state, now, y) for y in ys])

    def unclaim(self, tx: Tx, batch: str) -> None:
        """A batch the mint did not swap: its proofs wait for the next one."""
        tx.execute("UPDATE locked_proofs SET state = 'received', batch = NULL, updated_at = ? "
                   "WHERE batch = ? AND state = 'redeeming'", (time.time(), batch))

    # -- reads ---------------------------------------------------------------------------------

    def totals(self) -> dict[str, tuple[int, int]]:
        """Per state: (proofs, amount in their unit summed naively across units)."""
        return {str(s): (int(n), int(a)) for s, n, a in self._db.reader().rows(
            "SELECT state, COUNT(*), COALESCE(SUM(amount), 0) FROM locked_proofs "
            "GROUP BY state")}

    def earliest_locktime(self) -> int | None:
        value = self._db.reader().value(
            "SELECT MIN(locktime) FROM locked_proofs WHERE state IN ('received', 'redeeming')")
        return None if value is None else int(value)

    # -- the change pool (unlocked proofs the proxy holds, in ``proofs``) ----------------------

    def pool_counts(self, mint: str, unit: str) -> dict[int, int]:
        """Unspent proofs per amount at a mint in a unit."""
        return {int(a): int(n) for a, n in self._db.reader().rows(
            "SELECT amount, COUNT(*) FROM proofs WHERE mint = ? AND unit = ? "
            "AND state = 'unspent' GROUP BY amount", (mint, unit))}

    def pool_of_amount(self, tx: Tx, mint: str, unit: str, amount: int,
                       limit: int) -> list[ProofRecord]:
        return [ProofRecord(s, k, int(a), c, d) for s, k, a, c, d in tx.rows(
            "SELECT secret, keyset_id, amount, c, dleq FROM proofs WHERE mint = ? AND unit = ? "
            "AND state = 'unspent' AND amount = ? LIMIT ?", (mint, unit, amount, limit))]

    def hand_out(self, tx: Tx, secrets: Sequence[str], owner: str) -> bool:
        """Mark unspent pool proofs ``sent`` to ``owner``; conditional, so a proof is handed
        out once even across processes. False if another took one first (roll back)."""
        now = time.time()
        for secret in secrets:
            if tx.execute("UPDATE proofs SET state = 'sent', owner = ?, updated_at = ? "
                          "WHERE secret = ? AND state = 'unspent'", (owner, now, secret)) != 1:
                return False
        return True

    def take_back(self, tx: Tx, secrets: Sequence[str], owner: str) -> None:
        """Undo a partial ``hand_out`` (the proofs this owner got in this transaction)."""
        tx.executemany("UPDATE proofs SET state = 'unspent', owner = NULL WHERE secret = ? "
                       "AND state = 'sent' AND owner = ?", [(s, owner) for s in secrets])
