"""The ledger: keys, balances, reservations and an append-only journal, on SQLite or PostgreSQL.

Every amount is an integer number of msat. A key's ``balance_msat`` is everything it holds;
``reserved_msat`` is the part held by requests in flight; what it may still spend is the
difference. Each change to either is one journal row (``ledger_entries``) carrying the two
deltas, so at every moment and per key::

    sum(entries.amount_msat)   == balance_msat
    sum(entries.reserved_msat) == reserved_msat == sum(open reservations)

The schema is declared with peewee (tables, indexes, admin queries). The statements on every
request's path (reserve, settle, release) are fixed SQL strings prepared once and run on the
connection directly: building peewee query objects per request costs more than the proxy itself
(see notes/performance.md). A reservation is one conditional ``UPDATE … WHERE balance - reserved
>= cost``, so concurrent requests on one key can never overdraw it, whatever the database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import sqlite3 as _sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee
from playhouse.db_url import connect as db_connect

__all__ = [
    "ApiKey",
    "KeyState",
    "Ledger",
    "LedgerEntry",
    "Reservation",
    "ReserveError",
    "Settlement",
    "hash_key",
    "new_api_key",
]

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-"
WAL_TRUNCATE_BYTES = 8 * 1024 * 1024


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_hex(32)


def hash_key(key: str) -> str:
    """The only form in which a key is stored: hex SHA-256 of the whole key string."""
    return hashlib.sha256(key.encode()).hexdigest()


# --- schema ---------------------------------------------------------------------------------


class _Base(peewee.Model):
    class Meta:
        legacy_table_names = False


class ApiKey(_Base):
    key_hash = peewee.CharField(max_length=64, primary_key=True)
    balance_msat = peewee.BigIntegerField(default=0)
    reserved_msat = peewee.BigIntegerField(default=0)
    total_spent_msat = peewee.BigIntegerField(default=0)
    total_requests = peewee.BigIntegerField(default=0)
    created_at = peewee.DoubleField()
    expires_at = peewee.DoubleField(null=True)
    refund_address = peewee.TextField(null=True)
    label = peewee.TextField(null=True)
    disabled = peewee.BooleanField(default=False)
    # Funded with ecash (tokens, Lightning): withdrawable, and backed by the wallet's proofs.
    # Keys the operator funds by hand are prepaid credit: spendable, not withdrawable.
    backed = peewee.BooleanField(default=False)

    class Meta:
        table_name = "api_keys"
        constraints = (
            peewee.Check("balance_msat >= 0"),
            peewee.Check("reserved_msat >= 0"),
            peewee.Check("reserved_msat <= balance_msat"),
        )


class LedgerEntry(_Base):
    """One change of a key's balance and/or reserved amount. Rows are never updated.

    ``id`` grows with time, so time ranges are found through it. Indexes cost every request
    a page write per commit, so there are none on ``created_at`` or ``request_id``: admin
    queries do without (per key, the (key_hash, id) index serves).
    """

    id = peewee.BigAutoField()
    created_at = peewee.DoubleField()
    key_hash = peewee.CharField(max_length=64)
    kind = peewee.CharField(max_length=16)  # credit, reserve, charge, release, debit
    amount_msat = peewee.BigIntegerField()  # change of balance_msat
    reserved_msat = peewee.BigIntegerField(default=0)  # change of reserved_msat
    request_id = peewee.CharField(max_length=64, null=True)
    model = peewee.TextField(null=True)
    prompt_tokens = peewee.IntegerField(null=True)
    completion_tokens = peewee.IntegerField(null=True)
    note = peewee.TextField(null=True)

    class Meta:
        table_name = "ledger_entries"
        indexes = ((("key_hash", "id"), False),)


class Reservation(_Base):
    """A request in flight: the amount held on its key until it is charged or released.

    ``owner`` is the proxy process (``Instance``) serving it; ``touched_at``, ``delivered``
    (characters of text that reached the client) and ``prompt_tokens`` (an estimate) are kept
    up to date while a stream flows, so a reservation left by a crash can be settled from what
    the ledger knows.
    """

    request_id = peewee.CharField(max_length=64, primary_key=True)
    key_hash = peewee.CharField(max_length=64)
    amount_msat = peewee.BigIntegerField()
    model = peewee.TextField(null=True)
    created_at = peewee.DoubleField()
    touched_at = peewee.DoubleField()
    owner = peewee.CharField(max_length=80, null=True)
    delivered = peewee.BigIntegerField(default=0)
    prompt_tokens = peewee.IntegerField(default=0)

    class Meta:
        table_name = "reservations"


class Instance(_Base):
    """A running proxy process, with its heartbeat: whose reservations are whose."""

    id = peewee.CharField(max_length=80, primary_key=True)
    host = peewee.TextField()
    pid = peewee.IntegerField()
    started_at = peewee.DoubleField()
    seen_at = peewee.DoubleField()

    class Meta:
        table_name = "instances"


class StoredProof(_Base):
    """A Cashu proof the proxy holds or held (its secret is the bearer value: keep it private).

    ``state``: ``unspent`` (the operator's pool), ``held`` (redeemed for one x-cashu request,
    ``owner`` = its id, until its change is cut), ``reserved`` (picked for a refund or payout,
    ``owner`` = its id), ``sent`` (handed to a user as change or refund), ``spent`` (used as
    input of a swap or melt).
    """

    secret = peewee.TextField(primary_key=True)
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    keyset_id = peewee.CharField(max_length=80)
    amount = peewee.BigIntegerField()
    c = peewee.TextField()
    dleq = peewee.TextField(null=True)
    state = peewee.CharField(max_length=10)
    owner = peewee.CharField(max_length=64, null=True, index=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "proofs"
        indexes = ((("mint", "unit", "state"), False),)


class Payment(_Base):
    """An incoming token, redeemed once: what it credited, and (x-cashu) the change returned."""

    token_hash = peewee.CharField(max_length=64, primary_key=True)
    kind = peewee.CharField(max_length=16)  # key | create | topup | xcashu | lightning
    key_hash = peewee.CharField(max_length=64, index=True)
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()  # in the unit, as received
    fee = peewee.BigIntegerField()  # the mint's input fee, in the unit
    msat = peewee.BigIntegerField()  # credited
    request_id = peewee.CharField(max_length=64, null=True)
    change = peewee.TextField(null=True)  # the change token (x-cashu)
    change_msat = peewee.BigIntegerField(default=0)
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "payments"


class Refund(_Base):
    """A withdrawal of a key's balance as a token: debited first, the token made after."""

    id = peewee.CharField(max_length=64, primary_key=True)
    key_hash = peewee.CharField(max_length=64, index=True)
    msat = peewee.BigIntegerField()
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    token = peewee.TextField(null=True)
    fee = peewee.BigIntegerField(default=0)
    state = peewee.CharField(max_length=10)  # pending | done
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "refunds"


class Payout(_Base):
    """Ecash melted to pay a Lightning invoice: the operator's earnings, or a user's refund.

    ``pending`` from before the melt is asked until its outcome is known; an ambiguous melt
    stays pending and is settled from the mint's quote state, so it is never paid twice nor
    counted as paid when it was not. ``outputs`` names the blank outputs (keyset, first
    counter, count) that take the melt's change, so it can be had again after a crash.
    """

    id = peewee.CharField(max_length=64, primary_key=True)
    kind = peewee.CharField(max_length=8)  # payout | refund
    key_hash = peewee.CharField(max_length=64, null=True)  # the refunded key
    destination = peewee.TextField()  # the Lightning address
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()  # of the invoice, in the unit
    fee_reserve = peewee.BigIntegerField(default=0)
    fee_paid = peewee.BigIntegerField(default=0)
    msat = peewee.BigIntegerField(default=0)  # debited from the key (refunds)
    bolt11 = peewee.TextField()
    quote = peewee.TextField(null=True)
    outputs = peewee.TextField(null=True)
    state = peewee.CharField(max_length=8)  # pending | paid | failed
    error = peewee.TextField(null=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "payouts"
        indexes = ((("state",), False),)


class PendingSwap(_Base):
    """A token's swap whose answer was lost (the mint may have done it): the outputs, to ask
    the mint for their signatures (NUT-09) when the same token comes back."""

    token_hash = peewee.CharField(max_length=64, primary_key=True)
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()
    fee = peewee.BigIntegerField()
    outputs = peewee.TextField()
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "pending_swaps"


class Invoice(_Base):
    """A Lightning invoice (a mint quote at the primary mint) that funds a key once paid.

    ``id_hash`` is the SHA-256 of the invoice id the client holds (the id is a bearer secret:
    for ``create`` it leads to the new key). ``outputs`` keeps the blinded messages sent to
    the mint while minting, so a crash between minting and crediting can be recovered (NUT-09).
    """

    id_hash = peewee.CharField(max_length=64, primary_key=True)
    quote = peewee.TextField()
    mint = peewee.TextField()
    unit = peewee.CharField(max_length=8)
    amount = peewee.BigIntegerField()
    bolt11 = peewee.TextField()
    purpose = peewee.CharField(max_length=8)  # create | topup
    key_hash = peewee.CharField(max_length=64)
    state = peewee.CharField(max_length=10)  # unpaid | minting | credited | expired
    outputs = peewee.TextField(null=True)
    expires_at = peewee.DoubleField(null=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "invoices"
        indexes = ((("state",), False),)


class KeysetCounter(_Base):
    """The next unused NUT-13 derivation counter of a keyset: the wallet's secrets are derived
    from its seed and these, and a counter is never used twice (see ``seed.Counters``)."""

    keyset_id = peewee.CharField(max_length=80, primary_key=True)
    counter = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "keyset_counters"


MODELS: Sequence[type[peewee.Model]] = (ApiKey, LedgerEntry, Reservation, Instance, StoredProof,
                                        Payment, Refund, Invoice, KeysetCounter, Payout,
                                        PendingSwap)


# --- results --------------------------------------------------------------------------------


class ReserveError(Exception):
    """The key cannot pay for this request; ``reason`` says why."""

    def __init__(self, reason: str, available_msat: int = 0, required_msat: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason  # unknown_key | disabled | expired | insufficient
        self.available_msat = available_msat
        self.required_msat = required_msat


@dataclass(frozen=True, slots=True)
class Held:
    """A reservation made: what is held, and what the key may still spend besides."""

    request_id: str
    key_hash: str
    amount_msat: int
    available_msat: int


@dataclass(frozen=True, slots=True)
class Settlement:
    request_id: str
    key_hash: str
    charged_msat: int
    reserved_msat: int
    available_msat: int  # what the key may spend after this settlement


@dataclass(frozen=True, slots=True)
class KeyState:
    key_hash: str
    balance_msat: int
    reserved_msat: int
    total_spent_msat: int
    total_requests: int
    created_at: float
    expires_at: float | None
    refund_address: str | None
    label: str | None
    disabled: bool
    backed: bool = False

    @property
    def available_msat(self) -> int:
        return self.balance_msat - self.reserved_msat


# --- the ledger -----------------------------------------------------------------------------

_KEY_COLUMNS = ("key_hash, balance_msat, reserved_msat, total_spent_msat, total_requests, "
                "created_at, expires_at, refund_address, label, disabled, backed")

_ENTRY_INSERT = ("INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, "
                 "reserved_msat, request_id, model, prompt_tokens, completion_tokens, note) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

_SQL = {
    "reserve": (
        "UPDATE api_keys SET reserved_msat = reserved_msat + ? "
        "WHERE key_hash = ? AND balance_msat - reserved_msat >= ? AND NOT disabled "
        "AND (expires_at IS NULL OR expires_at > ?) "
        "RETURNING balance_msat - reserved_msat"
    ),
    "hold": ("INSERT INTO reservations (request_id, key_hash, amount_msat, model, created_at, "
             "touched_at, owner, delivered, prompt_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0)"),
    "unhold": ("DELETE FROM reservations WHERE request_id = ? "
               "RETURNING key_hash, amount_msat, model"),
    "close": (
        "UPDATE api_keys SET balance_msat = balance_msat - ?, reserved_msat = reserved_msat - ?, "
        "total_spent_msat = total_spent_msat + ?, total_requests = total_requests + ? "
        "WHERE key_hash = ? RETURNING balance_msat - reserved_msat"
    ),
    "credit": ("UPDATE api_keys SET balance_msat = balance_msat + ? WHERE key_hash = ? "
               "RETURNING balance_msat - reserved_msat"),
    "debit": ("UPDATE api_keys SET balance_msat = balance_msat - ? WHERE key_hash = ? "
              "AND balance_msat - reserved_msat >= ? RETURNING balance_msat - reserved_msat"),
    "entry": _ENTRY_INSERT,
    "key": f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?",
    "new_key": ("INSERT INTO api_keys (key_hash, balance_msat, reserved_msat, total_spent_msat, "
                "total_requests, created_at, expires_at, refund_address, label, disabled, "
                "backed) VALUES (?, ?, 0, 0, 0, ?, ?, ?, ?, ?, ?)"),
    "touch": ("UPDATE reservations SET touched_at = ?, delivered = ?, prompt_tokens = ? "
              "WHERE request_id = ?"),
}


# PostgreSQL runs each request-path step as one statement (data-modifying CTEs): one round trip
# instead of five, and still atomic, since a statement is its own transaction in autocommit.
_ENTRY_COLUMNS = ("(created_at, key_hash, kind, amount_msat, reserved_msat, request_id, model, "
                  "prompt_tokens, completion_tokens, note)")
_PG_SQL = {
    "reserve": (
        "WITH k AS (UPDATE api_keys SET reserved_msat = reserved_msat + %(amount)s "
        "  WHERE key_hash = %(key)s AND balance_msat - reserved_msat >= %(amount)s "
        "  AND NOT disabled AND (expires_at IS NULL OR expires_at > %(now)s) "
        "  RETURNING key_hash, balance_msat - reserved_msat AS available), "
        "h AS (INSERT INTO reservations (request_id, key_hash, amount_msat, model, created_at, "
        "  touched_at, owner, delivered, prompt_tokens) "
        "  SELECT %(rid)s, key_hash, %(amount)s, %(model)s, %(now)s, %(now)s, %(owner)s, 0, 0 "
        "  FROM k), "
        f"e AS (INSERT INTO ledger_entries {_ENTRY_COLUMNS} SELECT %(now)s, key_hash, 'reserve', "
        "  0, %(amount)s, %(rid)s, %(model)s, NULL, NULL, NULL FROM k) "
        "SELECT available FROM k"
    ),
    "settle": (
        "WITH r AS (DELETE FROM reservations WHERE request_id = %(rid)s "
        "  RETURNING key_hash, amount_msat, model), "
        "c AS (SELECT key_hash, amount_msat AS reserved, model, "
        "  LEAST(GREATEST(%(cost)s, 0), amount_msat) AS charged FROM r), "
        "k AS (UPDATE api_keys SET balance_msat = balance_msat - c.charged, "
        "  reserved_msat = reserved_msat - c.reserved, "
        "  total_spent_msat = total_spent_msat + c.charged, "
        "  total_requests = total_requests + %(count)s "
        "  FROM c WHERE api_keys.key_hash = c.key_hash "
        "  RETURNING api_keys.balance_msat - api_keys.reserved_msat AS available), "
        f"e AS (INSERT INTO ledger_entries {_ENTRY_COLUMNS} SELECT %(now)s, key_hash, %(kind)s, "
        "  -charged, -reserved, %(rid)s, COALESCE(%(model)s, model), %(pt)s, %(ct)s, %(note)s "
        "  FROM c) "
        "SELECT c.key_hash, c.charged, c.reserved, k.available FROM c, k"
    ),
}


_PG_TYPES = {"amount": "bigint", "key": "text", "now": "double precision", "rid": "text",
             "model": "text", "owner": "text", "cost": "bigint", "kind": "text",
             "count": "bigint", "pt": "integer", "ct": "integer", "note": "text"}


def _prepared(name: str, sql: str) -> tuple[str, str, tuple[str, ...]]:
    """A server-side prepared form of a ``%(name)s`` statement: (PREPARE, EXECUTE, params).
    Parsing and planning these CTEs took three quarters of their time on every call."""
    order: list[str] = []
    for found in re.findall(r"%\((\w+)\)s", sql):
        if found not in order:
            order.append(found)
    text = sql
    for i, param in enumerate(order, 1):
        text = text.replace(f"%({param})s", f"${i}::{_PG_TYPES[param]}")
    types = ", ".join(_PG_TYPES[p] for p in order)
    marks = ", ".join(["%s"] * len(order))
    return (f"PREPARE routstr_{name} ({types}) AS {text}", f"EXECUTE routstr_{name} ({marks})",
            tuple(order))


_PG_PREPARED = {name: _prepared(name, sql) for name, sql in _PG_SQL.items()}


class Ledger:
    """All balance changes go through here. One instance per process and database."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.instance_id: str | None = None
        self._prepared_on: Any = None  # the PostgreSQL connection our statements are prepared on
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = Path(url.removeprefix("sqlite:///"))
            if str(path) != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
            self.db: peewee.Database = peewee.SqliteDatabase(
                str(path),
                pragmas={
                    "journal_mode": "wal",
                    "synchronous": "normal",  # durable against process crashes (see DESIGN)
                    "busy_timeout": 10_000,
                    "foreign_keys": 1,
                },
                timeout=10,
            )
            self._begin_sql = "BEGIN IMMEDIATE"
            self._sql = dict(_SQL)
        else:
            self.db = db_connect(url.replace("postgres://", "postgresql://", 1))
            self._begin_sql = "BEGIN"
            self._sql = {k: v.replace("?", "%s") for k, v in _SQL.items()}
        self.db.connect()
        self._on_connect()
        if create:
            # On SQLite the open reservations are their primary key's b-tree alone (WITHOUT
            # ROWID): one page less written per commit on the request path.
            Reservation._meta.without_rowid = self.is_sqlite
            with self.db.bind_ctx(MODELS):
                self.db.create_tables(MODELS, safe=True)
                self._add_new_columns()

    def _add_new_columns(self) -> None:
        """Bring a database made by an older version up to date: columns added since then
        are added (with their defaults). Nothing is ever dropped or rewritten."""
        from playhouse.migrate import PostgresqlMigrator, SqliteMigrator, migrate

        migrator = (SqliteMigrator(self.db) if self.is_sqlite else PostgresqlMigrator(self.db))
        for model in MODELS:
            table = model._meta.table_name
            present = {c.name for c in self.db.get_columns(table)}
            missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
            if missing:
                logger.info("ledger: adding %s to %s", ", ".join(f.column_name for f in missing),
                            table)
                migrate(*(migrator.add_column(table, f.column_name, f) for f in missing))

    def _on_connect(self) -> None:
        if not self.is_sqlite:
            # Like SQLite's synchronous=NORMAL: a charge survives a proxy crash, and the request
            # path does not wait for the server's fsync. Money coming in commits durably
            # (see ``_tx(durable=True)``).
            self.db.connection().cursor().execute("SET synchronous_commit = off")

    def defer_checkpoints(self) -> None:
        """Stop this connection from checkpointing the WAL during commits (SQLite only).

        A commit that crosses the WAL's size threshold copies it back into the database and
        syncs it, on the request path. The proxy calls this and runs ``checkpoint`` on a
        timer in a worker thread instead.
        """
        if self.is_sqlite:
            self.db.connection().execute("PRAGMA wal_autocheckpoint = 0")

    def checkpoint(self, truncate_above: int = WAL_TRUNCATE_BYTES) -> None:
        """Copy the WAL back into the database, on a connection of its own (any thread).

        A passive checkpoint never waits, but under steady writes it never catches up either,
        so the WAL would grow without end; once it passes ``truncate_above`` bytes the
        checkpoint waits for a gap between two commits and truncates it.
        """
        if not self.is_sqlite:
            return
        conn = _sqlite3.connect(self.db.database, timeout=10, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            wal = Path(self.db.database + "-wal")
            if wal.exists() and wal.stat().st_size > truncate_above:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[Any]:
        """One short transaction on the raw DB-API connection; rolled back on any error.

        ``durable`` waits for the commit to reach the disk: for money coming in, which a power
        cut must not forget. The request path commits without waiting for an fsync.
        """
        conn = self.db.connection()
        cur = conn.cursor()
        try:
            if durable and self.is_sqlite:
                cur.execute("PRAGMA synchronous = FULL")  # not changeable inside a transaction
            cur.execute(self._begin_sql)
        except _CONNECTION_ERRORS:
            # The server went away between requests: reconnect once, nothing was sent yet.
            cur = self._reconnect().cursor()
            cur.execute(self._begin_sql)
        try:
            if durable and not self.is_sqlite:
                cur.execute("SET LOCAL synchronous_commit = on")
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            if durable and self.is_sqlite:
                cur.execute("PRAGMA synchronous = NORMAL")

    def transaction(self, durable: bool = False) -> Any:
        """A transaction for several steps at once (the ``*_in`` methods); yields a cursor."""
        return self._tx(durable)

    def sql(self, text: str) -> str:
        """A statement written with ``?`` placeholders, in this database's parameter style."""
        return text if self.is_sqlite else text.replace("?", "%s")

    def one(self, table: str, columns: Sequence[str], where: str,
            params: Sequence[Any], order: str = "") -> dict[str, Any] | None:
        """The first row of ``SELECT columns FROM table WHERE where`` as a dict, or None."""
        cur = self.db.connection().cursor()
        cur.execute(self.sql(f"SELECT {', '.join(columns)} FROM {table} WHERE {where} "
                             f"{order} LIMIT 1"), tuple(params))
        row = cur.fetchone()
        return None if row is None else dict(zip(columns, row, strict=True))

    def create_key_in(self, cur: Any, key_hash: str, balance_msat: int, *, note: str,
                      expires_at: float | None = None, refund_address: str | None = None,
                      label: str | None = None, backed: bool = False) -> None:
        now = time.time()
        cur.execute(self._sql["new_key"], (key_hash, balance_msat, now, expires_at,
                                           refund_address, label, False, backed))
        self._entry(cur, now, key_hash, "credit", balance_msat, 0, note=note)

    def credit_in(self, cur: Any, key_hash: str, amount_msat: int, note: str | None,
                  request_id: str | None = None) -> int | None:
        """Credit inside a transaction; the key's available balance, or None if unknown."""
        cur.execute(self._sql["credit"], (amount_msat, key_hash))
        rows = cur.fetchall()
        if not rows:
            return None
        self._entry(cur, time.time(), key_hash, "credit", amount_msat, 0, request_id, note=note)
        return int(rows[0][0])

    def debit_in(self, cur: Any, key_hash: str, amount_msat: int, note: str,
                 request_id: str | None = None, kind: str = "debit") -> int | None:
        """Take from what the key may spend; its available balance after, or None if short."""
        cur.execute(self._sql["debit"], (amount_msat, key_hash, amount_msat))
        rows = cur.fetchall()
        if not rows:
            return None
        self._entry(cur, time.time(), key_hash, kind, -amount_msat, 0, request_id, note=note)
        return int(rows[0][0])

    def reserve_in(self, cur: Any, key_hash: str, amount_msat: int, request_id: str,
                   model: str | None) -> int | None:
        """Reserve inside a transaction; the available balance after, or None if refused."""
        now = time.time()
        cur.execute(self._sql["reserve"], (amount_msat, key_hash, amount_msat, now))
        rows = cur.fetchall()
        if not rows:
            return None
        cur.execute(self._sql["hold"], (request_id, key_hash, amount_msat, model, now, now,
                                        self.instance_id))
        self._entry(cur, now, key_hash, "reserve", 0, amount_msat, request_id, model)
        return int(rows[0][0])

    def _entry(self, cur: Any, now: float, key_hash: str, kind: str, amount: int, reserved: int,
               request_id: str | None = None, model: str | None = None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None,
               note: str | None = None) -> None:
        cur.execute(self._sql["entry"], (now, key_hash, kind, amount, reserved, request_id, model,
                                         prompt_tokens, completion_tokens, note))

    # -- the request path ------------------------------------------------------------------

    def reserve(self, key_hash: str, amount_msat: int, request_id: str,
                model: str | None = None) -> Held:
        """Hold ``amount_msat`` of the key's available balance for one request, or raise."""
        now = time.time()
        if not self.is_sqlite:
            rows = self._pg("reserve", amount=amount_msat, key=key_hash, now=now,
                            rid=request_id, model=model, owner=self.instance_id)
            if not rows:
                raise self._why_not(key_hash, amount_msat, now)
            return Held(request_id, key_hash, amount_msat, int(rows[0][0]))
        with self._tx() as cur:
            available = self.reserve_in(cur, key_hash, amount_msat, request_id, model)
        if available is None:
            raise self._why_not(key_hash, amount_msat, now)
        return Held(request_id, key_hash, amount_msat, available)

    def _why_not(self, key_hash: str, amount_msat: int, now: float) -> ReserveError:
        state = self.key(key_hash)
        if state is None:
            return ReserveError("unknown_key")
        if state.disabled:
            return ReserveError("disabled")
        if state.expires_at is not None and state.expires_at <= now:
            return ReserveError("expired")
        return ReserveError("insufficient", state.available_msat, amount_msat)

    def settle(self, request_id: str, cost_msat: int, *, model: str | None = None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None,
               note: str | None = None) -> Settlement | None:
        """Charge a request's actual cost and free the rest of its reservation.

        The charge never exceeds what was reserved (the reservation is the price's upper
        bound). Returns None if the reservation was already settled or released.
        """
        done = self._close(request_id, "charge", cost_msat, model, prompt_tokens,
                           completion_tokens, note)
        if done is not None and cost_msat > done.reserved_msat:
            logger.warning("request %s cost %d msat, above its reservation of %d; charged %d",
                           request_id, cost_msat, done.reserved_msat, done.charged_msat)
        return done

    def release(self, request_id: str, note: str | None = None) -> Settlement | None:
        """Free a reservation without charging (nothing was delivered)."""
        return self._close(request_id, "release", 0, None, None, None, note)

    def _close(self, request_id: str, kind: str, cost_msat: int, model: str | None,
               prompt_tokens: int | None, completion_tokens: int | None,
               note: str | None) -> Settlement | None:
        """End a reservation, charging ``cost_msat`` (capped at it) or nothing; exactly once."""
        now = time.time()
        count = 1 if kind == "charge" else 0
        if not self.is_sqlite:
            rows = self._pg("settle", rid=request_id, cost=cost_msat, now=now, kind=kind,
                            count=count, model=model, pt=prompt_tokens, ct=completion_tokens,
                            note=note)
            if not rows:
                return None
            key_hash, charged, reserved, available = rows[0]
            return Settlement(request_id, key_hash, int(charged), int(reserved), int(available))
        sql = self._sql
        with self._tx() as cur:
            cur.execute(sql["unhold"], (request_id,))
            held = cur.fetchall()
            if not held:
                return None
            key_hash, reserved, held_model = held[0]
            charged = max(0, min(cost_msat, reserved))
            cur.execute(sql["close"], (charged, reserved, charged, count, key_hash))
            available = cur.fetchall()[0][0]
            self._entry(cur, now, key_hash, kind, -charged, -reserved, request_id,
                        model or held_model, prompt_tokens, completion_tokens, note)
        return Settlement(request_id, key_hash, charged, reserved, available)

    def _pg(self, name: str, **params: Any) -> list[Any]:
        """Run one of the single-statement PostgreSQL steps, prepared once per connection
        (reconnecting once if needed)."""
        try:
            cur = self.db.connection().cursor()
        except _CONNECTION_ERRORS:
            cur = self._reconnect().cursor()
        if cur.connection.closed:
            cur = self._reconnect().cursor()
        _, execute, order = _PG_PREPARED[name]
        values = tuple(params[p] for p in order)
        try:
            self._prepare(cur)
            cur.execute(execute, values)
        except _CONNECTION_ERRORS:
            # The server dropped the connection while it was idle (a restart, a terminated
            # backend): the statement did not run. Once more, on a new connection.
            cur = self._reconnect().cursor()
            self._prepare(cur)
            cur.execute(execute, values)
        return list(cur.fetchall())

    def _prepare(self, cur: Any) -> None:
        if self._prepared_on is cur.connection:
            return
        for prepare, _, _ in _PG_PREPARED.values():
            cur.execute(prepare)
        self._prepared_on = cur.connection

    def _reconnect(self) -> Any:
        self.db.close()
        self.db.connect()
        self._on_connect()
        return self.db.connection()

    def touch(self, request_id: str, delivered: int = 0, prompt_tokens: int = 0) -> None:
        """Mark a reservation as still active (a stream is flowing), with what it delivered."""
        with self._tx() as cur:
            cur.execute(self._sql["touch"], (time.time(), delivered, prompt_tokens, request_id))

    # -- processes and orphaned reservations -------------------------------------------------

    def register_instance(self) -> str:
        """Record this process; its reservations carry its id from now on."""
        now = time.time()
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{int(now * 1000)}"
        with self._tx() as cur:
            cur.execute(self.sql("INSERT INTO instances (id, host, pid, started_at, seen_at) "
                                 "VALUES (?, ?, ?, ?, ?)"),
                        (self.instance_id, socket.gethostname(), os.getpid(), now, now))
        return self.instance_id

    def heartbeat(self) -> None:
        if self.instance_id is None:
            return
        with self._tx() as cur:
            cur.execute(self.sql("UPDATE instances SET seen_at = ? WHERE id = ?"),
                        (time.time(), self.instance_id))

    def unregister_instance(self) -> None:
        if self.instance_id is None:
            return
        with self._tx() as cur:
            cur.execute(self.sql("DELETE FROM instances WHERE id = ?"), (self.instance_id,))
        self.instance_id = None

    def instances(self, stale_after: float) -> tuple[set[str], set[str]]:
        """Registered processes, as (alive, gone): gone is on this host with a dead pid, or
        silent for longer than ``stale_after`` seconds."""
        host = socket.gethostname()
        now = time.time()
        alive: set[str] = set()
        gone: set[str] = set()
        cur = self.db.connection().cursor()
        cur.execute("SELECT id, host, pid, seen_at FROM instances")
        for instance_id, its_host, pid, seen_at in cur.fetchall():
            dead = (its_host == host and not _pid_alive(int(pid))) or seen_at < now - stale_after
            (gone if dead and instance_id != self.instance_id else alive).add(instance_id)
        return alive, gone

    def forget_instances(self, ids: set[str]) -> None:
        with self._tx() as cur:
            for instance_id in ids:
                cur.execute(self.sql("DELETE FROM instances WHERE id = ?"), (instance_id,))

    def orphans(self, timeout: float, stale_after: float) -> list[dict[str, Any]]:
        """Reservations nobody will close: their process is gone, or they saw no activity for
        ``timeout`` seconds (a stream that flows is touched; one that hangs is not)."""
        alive, _ = self.instances(stale_after)
        cur = self.db.connection().cursor()
        cur.execute(self.sql("SELECT r.request_id, r.key_hash, r.amount_msat, r.model, "
                             "r.owner, r.delivered, r.prompt_tokens, r.touched_at "
                             "FROM reservations r"))
        now = time.time()
        found = []
        for row in cur.fetchall():
            held = dict(zip(("request_id", "key_hash", "amount_msat", "model", "owner",
                             "delivered", "prompt_tokens", "touched_at"), row, strict=True))
            idle = now - held["touched_at"]
            owner_gone = held["owner"] not in alive if held["owner"] else idle > stale_after
            if owner_gone or idle > timeout:
                found.append(held)
        return found

    def late_charge(self, key_hash: str, request_id: str, cost_msat: int,
                    model: str | None) -> int:
        """Charge a request whose reservation was already swept: as much of the cost as the
        key can still pay (never overdrawn). Returns what was charged."""
        with self._tx() as cur:
            cur.execute(self.sql("SELECT balance_msat - reserved_msat FROM api_keys "
                                 "WHERE key_hash = ?"), (key_hash,))
            row = cur.fetchone()
            charged = max(0, min(cost_msat, int(row[0]) if row else 0))
            if charged:
                cur.execute(self.sql(
                    "UPDATE api_keys SET balance_msat = balance_msat - ?, total_spent_msat = "
                    "total_spent_msat + ?, total_requests = total_requests + 1 "
                    "WHERE key_hash = ? AND balance_msat - reserved_msat >= ?"),
                    (charged, charged, key_hash, charged))
                self._entry(cur, time.time(), key_hash, "charge", -charged, 0, request_id, model,
                            note="after its reservation was swept")
        return charged

    # -- money in --------------------------------------------------------------------------

    def create_key(self, balance_msat: int = 0, *, expires_at: float | None = None,
                   refund_address: str | None = None, label: str | None = None,
                   key: str | None = None, note: str = "created") -> tuple[str, KeyState]:
        """Create a key, optionally funded; returns the key (shown once) and its state."""
        if balance_msat < 0:
            raise ValueError("balance must not be negative")
        key = key or new_api_key()
        key_hash = hash_key(key)
        with self._tx(durable=True) as cur:
            self.create_key_in(cur, key_hash, balance_msat, note=note, expires_at=expires_at,
                               refund_address=refund_address, label=label)
        state = self.key(key_hash)
        assert state is not None
        return key, state

    def credit(self, key_hash: str, amount_msat: int, note: str | None = None) -> int:
        """Add funds to an existing key; returns its available balance. KeyError if unknown."""
        if amount_msat <= 0:
            raise ValueError("a credit must be positive")
        with self._tx(durable=True) as cur:
            available = self.credit_in(cur, key_hash, amount_msat, note)
            if available is None:
                raise KeyError(key_hash)
        return available

    # -- reads -----------------------------------------------------------------------------

    def key(self, key_hash: str) -> KeyState | None:
        cur = self.db.connection().cursor()
        cur.execute(self._sql["key"], (key_hash,))
        row = cur.fetchone()
        return _key_state(row) if row else None

    def find_keys(self, prefix: str) -> list[KeyState]:
        """Keys whose hash starts with ``prefix`` (how people name keys: a short hash)."""
        with self.db.bind_ctx(MODELS):
            query = (ApiKey.select().where(ApiKey.key_hash.startswith(prefix.lower()))
                     .order_by(ApiKey.created_at).limit(50).tuples())
            return [_key_state(row) for row in query.execute()]

    def keys(self, limit: int = 1000) -> list[KeyState]:
        with self.db.bind_ctx(MODELS):
            query = ApiKey.select().order_by(ApiKey.created_at.desc()).limit(limit).tuples()
            return [_key_state(row) for row in query.execute()]

    def entries(self, key_hash: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest journal rows, newest last."""
        with self.db.bind_ctx(MODELS):
            query = LedgerEntry.select().order_by(LedgerEntry.id.desc()).limit(limit)
            if key_hash:
                query = query.where(LedgerEntry.key_hash == key_hash)
            rows: list[dict[str, Any]] = list(query.dicts().execute())
            return rows[::-1]

    def open_reservations(self, key_hash: str | None = None) -> list[dict[str, Any]]:
        with self.db.bind_ctx(MODELS):
            query = Reservation.select().order_by(Reservation.created_at)
            if key_hash:
                query = query.where(Reservation.key_hash == key_hash)
            held: list[dict[str, Any]] = list(query.dicts().execute())
            return held

    def check(self) -> list[str]:
        """Audit the books; returns one line per problem found (empty when all holds)."""
        problems: list[str] = []
        cur = self.db.connection().cursor()
        cur.execute(
            "SELECT k.key_hash, k.balance_msat, k.reserved_msat, "
            "COALESCE(e.amount, 0), COALESCE(e.reserved, 0), COALESCE(r.held, 0) "
            "FROM api_keys k "
            "LEFT JOIN (SELECT key_hash, SUM(amount_msat) AS amount, "
            "           SUM(reserved_msat) AS reserved "
            "           FROM ledger_entries GROUP BY key_hash) e ON e.key_hash = k.key_hash "
            "LEFT JOIN (SELECT key_hash, SUM(amount_msat) AS held FROM reservations "
            "           GROUP BY key_hash) r ON r.key_hash = k.key_hash"
        )
        for key_hash, balance, reserved, entry_sum, entry_reserved, held in cur.fetchall():
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
        cur.execute("SELECT COUNT(*) FROM ledger_entries e WHERE NOT EXISTS "
                    "(SELECT 1 FROM api_keys k WHERE k.key_hash = e.key_hash)")
        orphans = cur.fetchone()[0]
        if orphans:
            problems.append(f"{orphans} journal rows name no key")
        return problems


def _psycopg2_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg2
    except ImportError:  # pragma: no cover
        return ()
    return (psycopg2.DatabaseError,)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _key_state(row: Sequence[Any]) -> KeyState:
    return KeyState(row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]), float(row[5]),
                    None if row[6] is None else float(row[6]), row[7], row[8], bool(row[9]),
                    bool(row[10]))


def _connection_errors() -> tuple[type[Exception], ...]:
    """Connection errors: peewee's, and the driver's own (peewee wraps only inside its calls)."""
    errors: list[type[Exception]] = [peewee.OperationalError, peewee.InterfaceError]
    try:
        import psycopg2

        errors += [psycopg2.OperationalError, psycopg2.InterfaceError]
    except ImportError:  # pragma: no cover - psycopg2 is a dependency
        pass
    return tuple(errors)


_CONNECTION_ERRORS = _connection_errors()
# What the database can raise when it cannot take a write (full disk, locked, away).
DATABASE_ERRORS: tuple[type[Exception], ...] = (peewee.DatabaseError, _sqlite3.DatabaseError,
                                                *_CONNECTION_ERRORS, *_psycopg2_errors())
