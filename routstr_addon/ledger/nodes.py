"""Tokens sent to other Routstr nodes, one per request (table ``node_payments``): what each
request cost this proxy, what came back as change, what a node kept that it should not have.

The wallet's proofs leave the pool when a token is sent (they are ``sent``, no longer counted
in the books); the change received comes back as new proofs. So the books need nothing from
this table to balance: a token in flight is cost until its change is back. This table is the
journal beside the users' charges (same ``request_id``) for revenue, cost and margin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["NodePaymentRecord", "NodePaymentStore", "ProviderTotals"]

_COLUMNS = ("id, request_id, provider, mint, unit, token, sent_msat, change_msat, reported_msat, "
            "cost_msat, loss_msat, state, created_at, settled_at")


@dataclass(frozen=True, slots=True)
class NodePaymentRecord:
    id: int
    request_id: str
    provider: str
    mint: str
    unit: str
    token: str
    sent_msat: int
    change_msat: int
    reported_msat: int | None
    cost_msat: int
    loss_msat: int
    state: str
    created_at: float
    settled_at: float | None


@dataclass(frozen=True, slots=True)
class ProviderTotals:
    """One provider's figures: what users were charged for its answers, what it was paid."""

    provider: str
    requests: int
    revenue_msat: int
    cost_msat: int
    loss_msat: int

    @property
    def margin_msat(self) -> int:
        return self.revenue_msat - self.cost_msat

    def as_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "requests": self.requests,
                "revenue_msat": self.revenue_msat, "cost_msat": self.cost_msat,
                "loss_msat": self.loss_msat, "margin_msat": self.margin_msat}


def _record(row: Any) -> NodePaymentRecord:
    (row_id, request_id, provider, mint, unit, token, sent, change, reported, cost, loss,
     state, created, settled) = row
    return NodePaymentRecord(int(row_id), request_id, provider, mint, unit, token, int(sent),
                             int(change), None if reported is None else int(reported),
                             int(cost), int(loss), state, float(created),
                             None if settled is None else float(settled))


class NodePaymentStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    def sent_in(self, tx: Tx, request_id: str, provider: str, mint: str, unit: str, token: str,
                sent_msat: int) -> int:
        """A token is on its way to a node with a request (its cost, until change is back).
        Returns the row's id."""
        tx.execute(f"INSERT INTO node_payments ({_COLUMNS.removeprefix('id, ')}) VALUES "
                   "(?, ?, ?, ?, ?, ?, 0, NULL, ?, 0, 'sent', ?, NULL)",
                   (request_id, provider, mint, unit, token, sent_msat, sent_msat, time.time()))
        return int(tx.value("SELECT MAX(id) FROM node_payments WHERE request_id = ? AND "
                            "provider = ?", (request_id, provider)))

    def settle_in(self, tx: Tx, row_id: int, state: str, change_msat: int,
                  reported_msat: int | None, loss_msat: int) -> bool:
        """Close an in-flight payment once: the change is back (or known lost). False if it
        was closed already."""
        return bool(tx.execute(
            "UPDATE node_payments SET state = ?, change_msat = ?, reported_msat = ?, "
            "cost_msat = sent_msat - ?, loss_msat = ?, settled_at = ? "
            "WHERE id = ? AND state = 'sent'",
            (state, change_msat, reported_msat, change_msat, loss_msat, time.time(), row_id)))

    def of_request(self, request_id: str) -> list[NodePaymentRecord]:
        """Every node paid (or tried) for one user request, in order."""
        return [_record(r) for r in self._db.reader().rows(
            f"SELECT {_COLUMNS} FROM node_payments WHERE request_id = ? ORDER BY id",
            (request_id,))]

    def in_flight(self, older_than: float) -> list[NodePaymentRecord]:
        """Payments sent before ``older_than`` (wall time) whose outcome is not recorded: a
        crash between sending and settling; their tokens are taken back if still unspent."""
        return [_record(r) for r in self._db.reader().rows(
            f"SELECT {_COLUMNS} FROM node_payments WHERE state = 'sent' AND created_at < ?",
            (older_than,))]

    def totals(self, since: float = 0.0) -> list[ProviderTotals]:
        """Per node paid: revenue (what users were charged for the requests it served), cost
        (tokens paid less change), losses."""
        rows = self._db.reader().rows(
            "SELECT n.provider, COUNT(*), COALESCE(SUM(c.charged), 0), "
            "COALESCE(SUM(n.cost_msat), 0), COALESCE(SUM(n.loss_msat), 0) "
            "FROM node_payments n LEFT JOIN (SELECT request_id, SUM(-amount_msat) AS charged "
            "  FROM ledger_entries WHERE kind IN ('charge', 'overrun') GROUP BY request_id) c "
            "ON c.request_id = n.request_id AND n.state IN ('settled', 'lost') "
            "WHERE n.created_at >= ? GROUP BY n.provider ORDER BY n.provider", (since,))
        return [ProviderTotals(str(p), int(n), int(r), int(c), int(loss))
                for p, n, r, c, loss in rows]
