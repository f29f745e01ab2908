"""The wallet's Cashu proofs, kept in the ledger so that receiving a token and crediting it are
one transaction, and several proxy processes on one database share one wallet.

A proof's ``state``: ``unspent`` (the operator's pool), ``held`` (redeemed for one x-cashu
request, ``owner`` = its id, until its change is cut), ``reserved`` (picked for a refund or
payout, ``owner`` = its id), ``sent`` (handed to a user as change or refund), ``spent`` (used as
input of a swap or melt). The first three are the proxy's (``POOL_STATES``).

Also here: swaps whose answer was lost (``pending_swaps``), to ask the mint for their
signatures again when the same token comes back.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["POOL_STATES", "ProofRecord", "ProofStore"]

POOL_STATES = ("unspent", "held", "reserved")
_IN_POOL = ", ".join(f"'{s}'" for s in POOL_STATES)
_COLUMNS = "secret, keyset_id, amount, c, dleq"
_BATCH = 100  # secrets per IN (...) list


@dataclass(frozen=True, slots=True)
class ProofRecord:
    """A proof as stored: its secret is the bearer value (keep it private)."""

    secret: str
    keyset_id: str
    amount: int
    c: str
    dleq: str | None  # the DLEQ proof (NUT-12), as JSON


def _record(row: Sequence[Any]) -> ProofRecord:
    secret, keyset_id, amount, c, dleq = row
    return ProofRecord(secret, keyset_id, int(amount), c, dleq)


class ProofStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- writes, inside a caller's transaction -------------------------------------------------

    def add(self, tx: Tx, mint: str, unit: str, proofs: Iterable[ProofRecord], state: str,
            owner: str | None = None) -> None:
        now = time.time()
        tx.executemany("INSERT INTO proofs (secret, mint, unit, keyset_id, amount, c, dleq, "
                       "state, owner, created_at, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(p.secret, mint, unit, p.keyset_id, p.amount, p.c, p.dleq, state, owner,
                         now, now) for p in proofs])

    def add_found(self, tx: Tx, mint: str, unit: str, proof: ProofRecord) -> bool:
        """Put a proof found again (restore) into the pool; False if it is known already."""
        now = time.time()
        return tx.execute(
            "INSERT INTO proofs (secret, mint, unit, keyset_id, amount, c, dleq, state, owner, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'unspent', NULL, ?, ?) "
            "ON CONFLICT (secret) DO NOTHING",
            (proof.secret, mint, unit, proof.keyset_id, proof.amount, proof.c, proof.dleq,
             now, now)) == 1

    def set_state(self, tx: Tx, secrets: Iterable[str], state: str, owner: str | None) -> None:
        now = time.time()
        tx.executemany("UPDATE proofs SET state = ?, owner = ?, updated_at = ? WHERE secret = ?",
                       [(state, owner, now, s) for s in secrets])

    def owned(self, tx: Tx, owner: str) -> list[ProofRecord]:
        """The proofs held or reserved for ``owner``."""
        return [_record(r) for r in tx.rows(f"SELECT {_COLUMNS} FROM proofs WHERE owner = ? "
                                            "AND state IN ('held', 'reserved')", (owner,))]

    def pool(self, tx: Tx, mint: str, unit: str) -> list[ProofRecord]:
        """The unspent proofs at a mint in a unit, largest first."""
        return [_record(r) for r in tx.rows(
            f"SELECT {_COLUMNS} FROM proofs WHERE mint = ? AND unit = ? AND state = 'unspent' "
            "ORDER BY amount DESC", (mint, unit))]

    def claim(self, tx: Tx, secrets: Sequence[str], owner: str) -> bool:
        """Mark unspent proofs reserved for ``owner``, with conditional updates (no proof is
        handed out twice across processes). False if another process claimed one first:
        the caller rolls the transaction back."""
        now = time.time()
        for secret in secrets:
            if tx.execute("UPDATE proofs SET state = 'reserved', owner = ?, updated_at = ? "
                          "WHERE secret = ? AND state = 'unspent'", (owner, now, secret)) != 1:
                return False
        return True

    def mark_spent(self, tx: Tx, secret: str) -> bool:
        """An unspent proof the mint says is spent; False if it was not unspent."""
        return tx.execute("UPDATE proofs SET state = 'spent', updated_at = ? "
                          "WHERE secret = ? AND state = 'unspent'", (time.time(), secret)) == 1

    # -- its own transaction -----------------------------------------------------------------

    def unclaim(self, secrets: Iterable[str], owner: str) -> None:
        """Give claimed proofs back to the pool, only those still reserved for ``owner``."""
        now = time.time()
        with self._db.transaction() as tx:
            tx.executemany("UPDATE proofs SET state = 'unspent', owner = NULL, updated_at = ? "
                           "WHERE secret = ? AND state = 'reserved' AND owner = ?",
                           [(now, s, owner) for s in secrets])

    # -- reads -----------------------------------------------------------------------------

    def reserved_for(self, owner: str) -> list[ProofRecord]:
        return [_record(r) for r in self._db.reader().rows(
            f"SELECT {_COLUMNS} FROM proofs WHERE owner = ? AND state = 'reserved'", (owner,))]

    def has_reserved(self, owner: str) -> bool:
        return self._db.reader().row("SELECT 1 FROM proofs WHERE owner = ? AND "
                                     "state = 'reserved' LIMIT 1", (owner,)) is not None

    def unspent_at(self, mint: str) -> list[tuple[str, str, int]]:
        """(secret, unit, amount) of the unspent proofs at a mint."""
        return [(str(s), str(u), int(a)) for s, u, a in self._db.reader().rows(
            "SELECT secret, unit, amount FROM proofs WHERE mint = ? AND state = 'unspent'",
            (mint,))]

    def unspent_total(self, mint: str, unit: str) -> int:
        """The unspent amount at a mint, in the unit."""
        return int(self._db.reader().value(
            "SELECT COALESCE(SUM(amount), 0) FROM proofs WHERE mint = ? AND unit = ? "
            "AND state = 'unspent'", (mint, unit)))

    def balances(self) -> dict[tuple[str, str], int]:
        """What the proxy holds per (mint, unit), in the unit: proofs not handed out or spent."""
        return {(m, u): int(total) for m, u, total in self._db.reader().rows(
            f"SELECT mint, unit, SUM(amount) FROM proofs WHERE state IN ({_IN_POOL}) "
            "GROUP BY mint, unit")}

    def still_held(self, secrets: Sequence[str]) -> set[str]:
        """Which of these proofs the ledger still counts (the proxy may have spent some)."""
        held: set[str] = set()
        reader = self._db.reader()
        for start in range(0, len(secrets), _BATCH):
            batch = list(secrets[start:start + _BATCH])
            marks = ", ".join("?" * len(batch))
            held.update(row[0] for row in reader.rows(
                f"SELECT secret FROM proofs WHERE secret IN ({marks}) AND state IN ({_IN_POOL}) "
                f"UNION ALL SELECT secret FROM locked_proofs WHERE secret IN ({marks}) "
                "AND state IN ('received', 'redeeming')", [*batch, *batch]))
        return held

    # -- swaps whose answer was lost ---------------------------------------------------------

    def save_lost_swap(self, token_hash: str, mint: str, unit: str, amount: int, fee: int,
                       outputs: str) -> None:
        """The outputs of a swap the mint may have done (its answer did not arrive)."""
        with self._db.transaction(durable=True) as tx:
            tx.execute("INSERT INTO pending_swaps (token_hash, mint, unit, amount, fee, outputs, "
                       "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (token_hash, mint, unit, amount, fee, outputs, time.time()))

    def lost_swap(self, token_hash: str) -> str | None:
        """The saved outputs of a lost swap of this token, if there was one."""
        found = self._db.reader().value("SELECT outputs FROM pending_swaps WHERE token_hash = ?",
                                        (token_hash,))
        return None if found is None else str(found)

    def forget_lost_swap(self, token_hash: str) -> None:
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM pending_swaps WHERE token_hash = ?", (token_hash,))
