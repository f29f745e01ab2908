"""Bringing a routstr-core database's keys into this ledger (``routstr import-core``).

routstr-core keeps a key as ``api_keys.hashed_key`` = the secret part of the user's ``sk-…``
(for a Cashu token used as the key: the token's SHA-256, which is also how this proxy names a
token's key), so the key this ledger stores is ``hash_key("sk-" + hashed_key)`` and every
user's ``sk-…`` (or token) keeps working with the same balance. Its reservations are released
(its ``balance`` already holds them), child keys keep their parent and ``balance_limit``, and
invoices still ``pending`` are watched here from then on. Read from its database only (SQLite
opened read-only, PostgreSQL in a read-only transaction); columns of both its older schema and
v0.4's are understood, whichever are present.

Each imported key is one journal row (a ``credit`` of its balance, noted), in one transaction
for the whole import; a key already here is skipped, so running it twice imports nothing twice.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from routstr_addon.ledger.accounts import KEY_PREFIX, hash_key
from routstr_addon.ledger.limits import parse_period

if TYPE_CHECKING:
    from routstr_addon.ledger.core import Ledger

__all__ = ["CoreInvoice", "CoreKey", "CoreSnapshot", "ImportReport", "core_invoice_key",
           "import_core", "read_core"]

NOTE = "imported from routstr-core"


def core_invoice_key(invoice_id: str, quote: str) -> str:
    """The key routstr-core makes for a paid ``create`` invoice (from its id and quote)."""
    return KEY_PREFIX + hashlib.sha256(f"invoice-{invoice_id}-{quote}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CoreKey:
    hashed_key: str
    balance_msat: int
    reserved_msat: int
    total_spent_msat: int
    total_requests: int
    refund_address: str | None
    expires_at: float | None
    created_at: float | None
    parent: str | None  # the parent's hashed_key
    balance_limit_msat: int | None
    balance_limit_reset: str | None
    limit_window_start: float | None

    @property
    def key_hash(self) -> str:
        return hash_key(KEY_PREFIX + self.hashed_key)


@dataclass(frozen=True, slots=True)
class CoreInvoice:
    id: str
    bolt11: str
    amount_sats: int
    quote: str  # routstr-core's ``payment_hash`` column holds the mint quote's id
    purpose: str
    api_key_hash: str | None
    mint_url: str | None
    created_at: float
    expires_at: float | None


@dataclass(slots=True)
class CoreSnapshot:
    keys: list[CoreKey] = field(default_factory=list)
    invoices: list[CoreInvoice] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ImportReport:
    keys: int = 0  # imported (or, dry run, to import)
    children: int = 0
    skipped: int = 0  # already here
    balance_msat: int = 0  # the balances imported: what users are now owed here
    released_msat: int = 0  # routstr-core reservations released
    invoices: int = 0
    invoices_skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # one per key, for people

    def as_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "children": self.children, "skipped": self.skipped,
                "balance_msat": self.balance_msat, "released_msat": self.released_msat,
                "invoices": self.invoices, "invoices_skipped": self.invoices_skipped,
                "warnings": self.warnings}


# --- reading routstr-core's database --------------------------------------------------------


def _connect(url: str) -> tuple[Any, str]:
    """A read-only DB-API connection to routstr-core's database, and its parameter mark."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    base = scheme.split("+", 1)[0].lower()
    if base == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel, sqlite:////abs
        if not path or path == ":memory:":
            raise ValueError("routstr-core's SQLite database needs a file path")
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True), "?"
    if base in ("postgresql", "postgres"):
        import psycopg2

        conn = psycopg2.connect(f"postgresql://{rest}")
        conn.set_session(readonly=True)
        return conn, "%s"
    raise ValueError(f"unsupported database URL scheme {scheme!r} (sqlite, postgresql)")


def _columns(cur: Any, mark: str, table: str, sqlite: bool) -> set[str]:
    if sqlite:
        cur.execute(f"PRAGMA table_info({table})")
        return {r[1] for r in cur.fetchall()}
    cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = "
                f"{mark} AND table_schema = current_schema()", (table,))
    return {r[0] for r in cur.fetchall()}


def _opt(present: set[str], name: str) -> str:
    return name if name in present else f"NULL AS {name}"


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def read_core(url: str) -> CoreSnapshot:
    """Everything worth bringing over from routstr-core's database at ``url``."""
    conn, mark = _connect(url)
    sqlite = mark == "?"
    snapshot = CoreSnapshot()
    try:
        cur = conn.cursor()
        present = _columns(cur, mark, "api_keys", sqlite)
        if "hashed_key" not in present:
            raise ValueError("no routstr-core api_keys table in that database")
        optional = ("created_at", "parent_key_hash", "balance_limit", "balance_limit_reset",
                    "balance_limit_reset_date", "validity_date")
        cur.execute("SELECT hashed_key, balance, reserved_balance, total_spent, total_requests, "
                    "refund_address, key_expiry_time, "
                    + ", ".join(_opt(present, c) for c in optional)
                    + " FROM api_keys ORDER BY hashed_key")
        for row in cur.fetchall():
            (hashed, balance, reserved, spent, requests, refund, expiry, created, parent,
             limit, reset, reset_date, validity) = row
            ends = [float(t) for t in (expiry, validity) if t]
            if int(balance or 0) < 0:
                snapshot.warnings.append(f"key {hashed[:8]}…: negative balance {balance} "
                                         "msat imported as 0")
            try:
                period = parse_period(reset) if isinstance(reset, str) else None
            except ValueError:
                snapshot.warnings.append(f"key {hashed[:8]}…: balance_limit_reset {reset!r} "
                                         "not understood; reset by hand only")
                period = None
            snapshot.keys.append(CoreKey(
                hashed, max(0, int(balance or 0)), max(0, int(reserved or 0)),
                int(spent or 0), int(requests or 0), refund or None,
                min(ends) if ends else None, _number(created), parent or None,
                None if limit is None else int(limit), period, _number(reset_date)))
        invoice_columns = _columns(cur, mark, "lightning_invoices", sqlite)
        if invoice_columns:
            direction = ("AND direction = 'in' " if "direction" in invoice_columns else "")
            cur.execute("SELECT id, bolt11, amount_sats, payment_hash, purpose, api_key_hash, "
                        f"{_opt(invoice_columns, 'mint_url')}, created_at, expires_at, status "
                        "FROM lightning_invoices WHERE status IN ('pending', "
                        f"'settlement_pending') {direction}ORDER BY created_at")
            for (iid, bolt11, amount, quote, purpose, key, mint, created, expires,
                 status) in cur.fetchall():
                if status != "pending":
                    snapshot.warnings.append(
                        f"invoice {iid[:8]}…: {status} in routstr-core (paid, its minting "
                        "unfinished): settle it there or by hand")
                    continue
                snapshot.invoices.append(CoreInvoice(
                    iid, bolt11, int(amount), quote, purpose, key or None, mint or None,
                    float(created or time.time()), _number(expires)))
    finally:
        conn.close()
    return snapshot


# --- writing it here ------------------------------------------------------------------------


def import_core(ledger: Ledger, snapshot: CoreSnapshot, default_mint: str | None,
                dry_run: bool = False) -> ImportReport:
    """Create the snapshot's keys (and pending invoices) that are not here yet, in one
    transaction; with ``dry_run`` only say what would be created."""
    report = ImportReport(warnings=list(snapshot.warnings))
    now = time.time()
    # parents first, so a child's parent exists by the time it is written
    ordered = sorted(snapshot.keys, key=lambda k: k.parent is not None)
    with ledger.transaction(durable=True) as tx:
        for key in ordered:
            key_hash = key.key_hash
            if tx.value("SELECT 1 FROM api_keys WHERE key_hash = ?", (key_hash,)) is not None:
                report.skipped += 1
                continue
            report.keys += 1
            report.children += key.parent is not None
            report.balance_msat += key.balance_msat
            report.released_msat += key.reserved_msat
            kind = "child of " + hash_key(KEY_PREFIX + key.parent)[:16] if key.parent else "key"
            report.lines.append(f"{key_hash[:16]}  {kind}  balance {key.balance_msat} msat, "
                                f"spent {key.total_spent_msat} msat in {key.total_requests} "
                                "requests")
            if dry_run:
                continue
            parent = hash_key(KEY_PREFIX + key.parent) if key.parent else None
            restricted = parent is not None or key.balance_limit_msat is not None
            tx.execute(
                "INSERT INTO api_keys (key_hash, balance_msat, reserved_msat, total_spent_msat, "
                "total_requests, created_at, expires_at, refund_address, label, disabled, "
                "backed, parent_key_hash, restricted, limit_budget_msat, limit_period, "
                "limit_spent_msat, limit_window_start) "
                "VALUES (?, ?, 0, ?, ?, ?, ?, ?, 'routstr-core', ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_hash, key.balance_msat, key.total_spent_msat, key.total_requests,
                 key.created_at or now, key.expires_at, key.refund_address, False,
                 parent is None, parent, restricted, key.balance_limit_msat,
                 key.balance_limit_reset,
                 key.total_spent_msat if key.balance_limit_msat is not None else 0,
                 key.limit_window_start or now))
            note = NOTE if not key.reserved_msat else (
                f"{NOTE} ({key.reserved_msat} msat reserved there, released)")
            tx.execute("INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, "
                       "reserved_msat, request_id, model, prompt_tokens, completion_tokens, "
                       "note) VALUES (?, ?, 'credit', ?, 0, NULL, NULL, NULL, NULL, ?)",
                       (now, key_hash, key.balance_msat, note))
        for invoice in snapshot.invoices:
            mint = invoice.mint_url.rstrip("/") if invoice.mint_url else default_mint
            if mint is None or invoice.purpose not in ("create", "topup"):
                report.invoices_skipped += 1
                report.warnings.append(f"invoice {invoice.id[:8]}…: no mint to watch it at")
                continue
            if invoice.purpose == "create":
                funds = hash_key(core_invoice_key(invoice.id, invoice.quote))
            elif invoice.api_key_hash:
                funds = hash_key(KEY_PREFIX + invoice.api_key_hash)
            else:
                report.invoices_skipped += 1
                continue
            id_hash = hashlib.sha256(invoice.id.encode()).hexdigest()
            if tx.value("SELECT 1 FROM invoices WHERE id_hash = ?", (id_hash,)) is not None:
                report.invoices_skipped += 1
                continue
            report.invoices += 1
            if not dry_run:
                ledger.invoices.add_in(tx, id_hash, invoice.quote, mint, invoice.amount_sats,
                                       invoice.bolt11, invoice.purpose, funds,
                                       invoice.expires_at, invoice.created_at)
    return report
