"""The wallet's NUT-13 derivation counters: the next unused counter of each keyset.

The wallet's secrets are derived from its seed and these counters, so a counter must never be
handed out twice, by this process or any other on the database, even after a crash: a
reservation is one upsert that adds ``n`` and returns the new value, committed to disk before
the outputs it numbers go to the mint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["KeysetCounters"]

_RESERVE = ("INSERT INTO keyset_counters (keyset_id, counter) VALUES (?, ?) "
            "ON CONFLICT (keyset_id) DO UPDATE SET counter = keyset_counters.counter "
            "+ excluded.counter RETURNING counter")


class KeysetCounters:
    def __init__(self, database: Database) -> None:
        self._db = database

    def reserve(self, keyset_id: str, n: int) -> int:
        """Reserve ``n`` consecutive counters of a keyset; returns the first."""
        if n < 1:
            raise ValueError("reserve at least one counter")
        ((end,),) = self._db.durable(_RESERVE, (keyset_id, n))
        return int(end) - n

    def current(self, keyset_id: str) -> int:
        """The next counter a reservation would hand out (0 for a keyset never used)."""
        found = self._db.reader().value(
            "SELECT counter FROM keyset_counters WHERE keyset_id = ?", (keyset_id,))
        return int(found) if found is not None else 0

    def advance(self, keyset_id: str, at_least: int) -> None:
        """Make sure no counter below ``at_least`` is handed out again."""
        with self._db.transaction(durable=True) as tx:
            tx.execute("INSERT INTO keyset_counters (keyset_id, counter) VALUES (?, ?) "
                       "ON CONFLICT (keyset_id) DO UPDATE SET counter = excluded.counter "
                       "WHERE keyset_counters.counter < excluded.counter", (keyset_id, at_least))
