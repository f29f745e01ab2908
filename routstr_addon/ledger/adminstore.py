"""The /admin dashboard's state shared by every process on one database: open sessions (by the
SHA-256 of their id; the id itself is only in the browser's cookie) and failed logins per
client address, so that behind a balancer a session opened on one process works on all, a
logout ends it everywhere, and the login limit counts every process's failures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["AdminStore", "StoredSession"]


@dataclass(frozen=True, slots=True)
class StoredSession:
    id_hash: str
    csrf: str
    tag: str  # hex of the keyed digest of the password it was opened with
    created_at: float
    expires_at: float
    flash: list[tuple[str, str]]


class AdminStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    # -- sessions ------------------------------------------------------------------------

    def open_session(self, session: StoredSession, now: float, limit: int) -> None:
        """Store a new session; expired ones go, and beyond ``limit`` the oldest."""
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", (now,))
            tx.execute("INSERT INTO admin_sessions (id_hash, csrf, tag, created_at, expires_at, "
                       "flash) VALUES (?, ?, ?, ?, ?, NULL)",
                       (session.id_hash, session.csrf, session.tag, session.created_at,
                        session.expires_at))
            extra = int(tx.value("SELECT COUNT(*) FROM admin_sessions")) - limit
            if extra > 0:
                tx.execute("DELETE FROM admin_sessions WHERE id_hash IN (SELECT id_hash FROM "
                           "admin_sessions ORDER BY created_at LIMIT ?)", (extra,))

    def session(self, id_hash: str) -> StoredSession | None:
        row = self._db.reader().row(
            "SELECT id_hash, csrf, tag, created_at, expires_at, flash FROM admin_sessions "
            "WHERE id_hash = ?", (id_hash,))
        if row is None:
            return None
        flash = [(str(a), str(b)) for a, b in json.loads(row[5])] if row[5] else []
        return StoredSession(row[0], row[1], row[2], float(row[3]), float(row[4]), flash)

    def set_flash(self, id_hash: str, flash: list[tuple[str, str]]) -> None:
        with self._db.transaction() as tx:
            tx.execute("UPDATE admin_sessions SET flash = ? WHERE id_hash = ?",
                       (json.dumps(flash) if flash else None, id_hash))

    def close_session(self, id_hash: str) -> None:
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM admin_sessions WHERE id_hash = ?", (id_hash,))

    def close_all_sessions(self) -> None:
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM admin_sessions")

    def count_sessions(self, now: float) -> int:
        return int(self._db.reader().value(
            "SELECT COUNT(*) FROM admin_sessions WHERE expires_at > ?", (now,)))

    # -- failed logins ----------------------------------------------------------------------

    def failures(self, address: str, since: float) -> list[float]:
        """When this address failed to log in since ``since``, oldest first."""
        return [float(at) for (at,) in self._db.reader().rows(
            "SELECT at FROM admin_login_failures WHERE address = ? AND at > ? ORDER BY at",
            (address, since))]

    def add_failure(self, address: str, at: float, forget_before: float) -> None:
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM admin_login_failures WHERE at <= ?", (forget_before,))
            tx.execute("INSERT INTO admin_login_failures (address, at) VALUES (?, ?)",
                       (address, at))

    def clear_failures(self, address: str) -> None:
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM admin_login_failures WHERE address = ?", (address,))

    # -- the operator's actions, journaled --------------------------------------------------

    def journal(self, at: float, actor: str, action: str, target: str, detail: str) -> None:
        """One row per change the operator makes (dashboard or API): who, what, on what."""
        with self._db.transaction(durable=True) as tx:
            tx.execute("INSERT INTO admin_actions (at, actor, action, target, detail) "
                       "VALUES (?, ?, ?, ?, ?)", (at, actor, action, target[:200], detail[:1000]))

    def actions(self, limit: int = 100, before: int | None = None) -> list[dict[str, object]]:
        rows = self._db.reader().rows(
            "SELECT id, at, actor, action, target, detail FROM admin_actions "
            + ("WHERE id < ? " if before else "") + "ORDER BY id DESC LIMIT ?",
            (before, limit) if before else (limit,))
        return [dict(zip(("id", "at", "actor", "action", "target", "detail"), r, strict=True))
                for r in rows]

    # -- the operator's word on models ----------------------------------------------------------

    def model_overrides(self) -> dict[str, tuple[bool, dict[str, str] | None]]:
        """model id → (offered, prices replacing the catalog's or None)."""
        return {str(m): (bool(e), json.loads(p) if p else None) for m, e, p in
                self._db.reader().rows("SELECT model_id, enabled, pricing FROM model_overrides")}

    def overrides_version(self) -> float:
        """Changes when any override does: processes poll it to publish their models again."""
        return float(self._db.reader().value(
            "SELECT COALESCE(MAX(updated_at), 0) FROM model_overrides") or 0)

    def set_model_override(self, model_id: str, enabled: bool,
                           pricing: dict[str, str] | None, at: float) -> None:
        with self._db.transaction(durable=True) as tx:
            tx.execute("INSERT INTO model_overrides (model_id, enabled, pricing, updated_at) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT (model_id) DO UPDATE SET "
                       "enabled = excluded.enabled, pricing = excluded.pricing, "
                       "updated_at = excluded.updated_at",
                       (model_id, enabled, json.dumps(pricing) if pricing else None, at))

    # -- one request, by id ------------------------------------------------------------------

    def request_trail(self, request_id: str) -> dict[str, object]:
        """What the ledger knows of one request: its journal rows, its reservation while it is
        open, and the x-cashu payment that paid it. The journal has no index on request ids
        (it would cost every request a write): this reads the table, for the operator only."""
        reader = self._db.reader()
        entry_columns = ("id", "created_at", "key_hash", "kind", "amount_msat", "reserved_msat",
                         "model", "prompt_tokens", "completion_tokens", "note")
        entries = [dict(zip(entry_columns, r, strict=True)) for r in reader.rows(
            f"SELECT {', '.join(entry_columns)} FROM ledger_entries WHERE request_id = ? "
            "ORDER BY id", (request_id,))]
        held_columns = ("key_hash", "amount_msat", "model", "created_at", "touched_at", "owner",
                        "delivered")
        held = reader.row(f"SELECT {', '.join(held_columns)} FROM reservations "
                          "WHERE request_id = ?", (request_id,))
        paid_columns = ("kind", "key_hash", "mint", "unit", "amount", "fee", "msat",
                        "change_msat", "created_at")
        payment = reader.row(f"SELECT {', '.join(paid_columns)} FROM payments "
                             "WHERE request_id = ?", (request_id,))
        return {
            "request_id": request_id,
            "entries": entries,
            "reservation": dict(zip(held_columns, held, strict=True)) if held else None,
            "payment": dict(zip(paid_columns, payment, strict=True)) if payment else None,
        }
