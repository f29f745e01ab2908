"""The audit of the books: per key, the journal sums to the balance and to what is reserved,
open reservations hold exactly what is reserved, nothing is negative, no row names no key."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["check"]


def check(database: Database) -> list[str]:
    """One line per problem found (empty when all holds)."""
    problems: list[str] = []
    reader = database.reader()
    for key_hash, balance, reserved, entry_sum, entry_reserved, held in reader.rows(
            "SELECT k.key_hash, k.balance_msat, k.reserved_msat, "
            "COALESCE(e.amount, 0), COALESCE(e.reserved, 0), COALESCE(r.held, 0) "
            "FROM api_keys k "
            "LEFT JOIN (SELECT key_hash, SUM(amount_msat) AS amount, "
            "           SUM(reserved_msat) AS reserved "
            "           FROM ledger_entries GROUP BY key_hash) e ON e.key_hash = k.key_hash "
            "LEFT JOIN (SELECT key_hash, SUM(amount_msat) AS held FROM reservations "
            "           GROUP BY key_hash) r ON r.key_hash = k.key_hash"):
        short = key_hash[:12]
        if balance < 0 or reserved < 0:
            problems.append(f"key {short}: negative balance {balance} or reserved {reserved}")
        if int(entry_sum) != balance:
            problems.append(f"key {short}: balance {balance} msat but entries sum to "
                            f"{int(entry_sum)}")
        if int(entry_reserved) != reserved:
            problems.append(f"key {short}: reserved {reserved} msat but entries hold "
                            f"{int(entry_reserved)}")
        if int(held) != reserved:
            problems.append(f"key {short}: reserved {reserved} msat but open reservations "
                            f"hold {int(held)}")
    orphans = reader.value("SELECT COUNT(*) FROM ledger_entries e WHERE NOT EXISTS "
                           "(SELECT 1 FROM api_keys k WHERE k.key_hash = e.key_hash)")
    if orphans:
        problems.append(f"{orphans} journal rows name no key")
    return problems
