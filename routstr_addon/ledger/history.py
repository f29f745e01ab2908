"""A key's money in and out, as routstr-core's ``/v1/balance/history`` lists it: tokens and
Lightning invoices that funded it (``in``), balances withdrawn as tokens (``out``). Amounts in
the unit they moved in; the tokens themselves are never listed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["key_history"]


def key_history(database: Database, key_hash: str, limit: int = 500) -> list[dict[str, Any]]:
    """Newest first."""
    reader = database.reader()
    moves: list[dict[str, Any]] = []
    for token_hash, kind, mint, unit, amount, created in reader.rows(
            "SELECT token_hash, kind, mint, unit, amount, created_at FROM payments "
            "WHERE key_hash = ? AND kind <> 'xcashu' ORDER BY created_at DESC LIMIT ?",
            (key_hash, limit)):
        moves.append({"id": token_hash[:32], "type": "in", "source": f"cashu:{kind}",
                      "amount": int(amount), "unit": unit, "mint_url": mint,
                      "created_at": int(created), "_at": float(created), "collected": True,
                      "swept": False})
    for id_hash, mint, unit, amount, created in reader.rows(
            "SELECT id_hash, mint, unit, amount, COALESCE(paid_at, updated_at) FROM invoices "
            "WHERE key_hash = ? AND state = 'credited' ORDER BY created_at DESC LIMIT ?",
            (key_hash, limit)):
        moves.append({"id": id_hash[:32], "type": "in", "source": "lightning",
                      "amount": int(amount), "unit": unit, "mint_url": mint,
                      "created_at": int(created), "_at": float(created), "collected": True,
                      "swept": False})
    for refund_id, mint, unit, msat, state, created in reader.rows(
            "SELECT id, mint, unit, msat, state, created_at FROM refunds WHERE key_hash = ? "
            "ORDER BY created_at DESC LIMIT ?", (key_hash, limit)):
        per_unit = 1000 if unit == "sat" else 1
        moves.append({"id": refund_id[:32], "type": "out", "source": "apikey",
                      "amount": int(msat) // per_unit, "unit": unit, "mint_url": mint,
                      "created_at": int(created), "_at": float(created),
                      "collected": state == "done",
                      "swept": False})
    moves.sort(key=lambda m: (m["_at"], m["type"]), reverse=True)  # a refund after its credit
    for move in moves:
        del move["_at"]
    return moves[:limit]
