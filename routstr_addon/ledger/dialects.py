"""The one place that knows SQLite from PostgreSQL.

Everything else in the ledger writes portable SQL with ``?`` marks and asks the dialect for what
differs: the parameter style, how a write transaction begins, how a commit is made durable, a
read-only snapshot, time buckets, WAL checkpoints, and (PostgreSQL) the request path's steps as
single prepared statements.

Durability: SQLite runs in WAL mode with ``synchronous=NORMAL``, PostgreSQL with
``synchronous_commit = off``: a commit survives a crash of the proxy, not a power cut, and the
request path does not wait for an fsync. Money coming in commits durably (SQLite
``synchronous=FULL`` for that commit, PostgreSQL ``SET LOCAL synchronous_commit = on``).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import peewee
from playhouse.db_url import connect as db_connect

from routstr_addon.datadir import private_file

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Cursor, Database

__all__ = ["CONNECTION_ERRORS", "DATABASE_ERRORS", "Dialect", "PostgreSQL", "PreparedSteps",
           "SQLite", "dialect_for"]


def _connection_errors() -> tuple[type[Exception], ...]:
    """Connection errors: peewee's, and the driver's own (peewee wraps only inside its calls)."""
    errors: list[type[Exception]] = [peewee.OperationalError, peewee.InterfaceError]
    try:
        import psycopg2

        errors += [psycopg2.OperationalError, psycopg2.InterfaceError]
    except ImportError:  # pragma: no cover - psycopg2 is a dependency
        pass
    return tuple(errors)


def _driver_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg2
    except ImportError:  # pragma: no cover - psycopg2 is a dependency
        return ()
    return (psycopg2.DatabaseError,)


CONNECTION_ERRORS = _connection_errors()
# What the database can raise when it cannot take a write (full disk, locked, away).
DATABASE_ERRORS: tuple[type[Exception], ...] = (peewee.DatabaseError, sqlite3.DatabaseError,
                                                *CONNECTION_ERRORS, *_driver_errors())
_GONE: tuple[type[Exception], ...] = (ConnectionError, *CONNECTION_ERRORS)


class Dialect:
    """What differs between the databases the ledger runs on."""

    name: ClassVar[str]
    begin_sql: ClassVar[str]  # begins a write transaction
    snapshot_sql: ClassVar[str]  # begins a read-only transaction that sees one moment
    # The open reservations as their primary key's b-tree alone (SQLite's WITHOUT ROWID): one
    # page less written per commit on the request path.
    compact_reservations: ClassVar[bool] = False
    # BEGIN and a first statement in one call (one round trip to a server).
    begins_with_statement: ClassVar[bool] = False

    def open(self, url: str) -> peewee.Database:
        raise NotImplementedError

    def sql(self, text: str) -> str:
        """A statement written with ``?`` marks, in this database's parameter style."""
        return text

    def on_connect(self, conn: Any) -> None:
        """Session settings, on every new connection."""

    def begin_durable(self, cur: Cursor) -> None:
        """Begin a transaction whose commit waits for the disk."""
        raise NotImplementedError

    def end_durable(self, cur: Cursor) -> None:
        """After a durable transaction (committed or not): back to the session's setting."""

    def durable_statement(self, database: Database, sql: str, params: Sequence[Any]) -> list[Any]:
        """One statement as a transaction of its own, committed to disk; its rows."""
        with database.cursor_transaction(durable=True) as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def bucket(self, column: str, seconds: int) -> str:
        """SQL for the whole number of ``seconds`` periods since the epoch (UTC days, minutes)
        at ``column`` (a positive time)."""
        raise NotImplementedError

    def migrator(self, db: peewee.Database) -> Any:
        raise NotImplementedError

    def defer_checkpoints(self, db: peewee.Database) -> None:
        """Stop this connection from checkpointing a write-ahead log during its commits."""

    def checkpoint(self, db: peewee.Database, truncate_above: int) -> None:
        """Copy a write-ahead log back into the database (nothing to do but on SQLite)."""

    def request_steps(self, database: Database) -> PreparedSteps | None:
        """The request path's steps as single statements, where this database runs them
        faster than a transaction of portable ones; None: the portable transaction."""
        return None


class SQLite(Dialect):
    name = "sqlite"
    begin_sql = "BEGIN IMMEDIATE"  # takes the write lock at once: no upgrade deadlock later
    snapshot_sql = "BEGIN"
    compact_reservations = True

    def open(self, url: str) -> peewee.Database:
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) != ":memory:":
            private_file(path)  # 0600 whatever the umask; its -wal and -shm take its mode
        return peewee.SqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",  # a commit survives a process crash, not a power cut
                "busy_timeout": 10_000,
                "foreign_keys": 1,
            },
            timeout=10,
        )

    def begin_durable(self, cur: Cursor) -> None:
        cur.execute("PRAGMA synchronous = FULL")  # not changeable inside a transaction
        try:
            cur.execute(self.begin_sql)
        except BaseException:
            cur.execute("PRAGMA synchronous = NORMAL")
            raise

    def end_durable(self, cur: Cursor) -> None:
        cur.execute("PRAGMA synchronous = NORMAL")

    def bucket(self, column: str, seconds: int) -> str:
        return f"CAST({column} / {seconds} AS INTEGER)"  # the time is positive: truncation

    def migrator(self, db: peewee.Database) -> Any:
        from playhouse.migrate import SqliteMigrator

        return SqliteMigrator(db)

    def defer_checkpoints(self, db: peewee.Database) -> None:
        """A commit that crosses the WAL's size threshold copies it back into the database and
        syncs it, on the request path. The proxy calls this and runs ``checkpoint`` on a timer
        in a worker thread instead."""
        db.connection().execute("PRAGMA wal_autocheckpoint = 0")

    def checkpoint(self, db: peewee.Database, truncate_above: int) -> None:
        """On a connection of its own (any thread). A passive checkpoint never waits, but
        under steady writes it never catches up either, so the WAL would grow without end;
        once it passes ``truncate_above`` bytes the checkpoint waits for a gap between two
        commits and truncates it."""
        conn = sqlite3.connect(db.database, timeout=10, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            wal = Path(db.database + "-wal")
            if wal.exists() and wal.stat().st_size > truncate_above:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()


class PostgreSQL(Dialect):
    name = "postgresql"
    begin_sql = "BEGIN"
    begins_with_statement = True
    snapshot_sql = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    _DURABLE = "SET LOCAL synchronous_commit = on"

    def open(self, url: str) -> peewee.Database:
        db: peewee.Database = db_connect(url.replace("postgres://", "postgresql://", 1))
        return db

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def on_connect(self, conn: Any) -> None:
        conn.cursor().execute("SET synchronous_commit = off")

    def begin_durable(self, cur: Cursor) -> None:
        cur.execute(f"BEGIN; {self._DURABLE}")  # one round trip

    def durable_statement(self, database: Database, sql: str, params: Sequence[Any]) -> list[Any]:
        # In autocommit a query string of several statements is one implicit transaction:
        # the statement asks for its own commit to be flushed, in one round trip.
        cur = live_cursor(database)
        cur.execute(f"{self._DURABLE}; {sql}", params)
        return list(cur.fetchall())

    def bucket(self, column: str, seconds: int) -> str:
        return f"CAST(FLOOR({column} / {seconds}) AS BIGINT)"

    def migrator(self, db: peewee.Database) -> Any:
        from playhouse.migrate import PostgresqlMigrator

        return PostgresqlMigrator(db)

    def request_steps(self, database: Database) -> PreparedSteps:
        return PreparedSteps(database)


def dialect_for(url: str) -> Dialect:
    return SQLite() if url.startswith("sqlite") else PostgreSQL()


def live_cursor(database: Database) -> Cursor:
    """A cursor on a connection that is still open (PostgreSQL: reconnected if the server
    dropped it while idle; nothing was sent on it yet)."""
    try:
        cur = database.cursor()
        if cur.connection.closed:  # type: ignore[attr-defined]
            raise ConnectionError
    except _GONE:
        cur = database.reconnect().cursor()
    return cur


# --- PostgreSQL's request path ----------------------------------------------------------------

# Each request-path step is one statement (data-modifying CTEs): one round trip instead of five,
# and still atomic, since a statement is its own transaction in autocommit. They do what
# ``accounts.Accounts.reserve_in`` and ``close_in`` do in a transaction of several statements.
_ENTRY_COLUMNS = ("(created_at, key_hash, kind, amount_msat, reserved_msat, request_id, model, "
                  "prompt_tokens, completion_tokens, note)")
_RESERVE = (
    "WITH k AS (UPDATE api_keys SET reserved_msat = reserved_msat + %(amount)s "
    "  WHERE key_hash = %(key)s AND balance_msat - reserved_msat >= %(amount)s "
    "  AND NOT disabled AND (expires_at IS NULL OR expires_at > %(now)s) AND NOT restricted "
    "  RETURNING key_hash, balance_msat - reserved_msat AS available), "
    "h AS (INSERT INTO reservations (request_id, key_hash, amount_msat, model, created_at, "
    "  touched_at, owner, delivered, prompt_tokens) "
    "  SELECT %(rid)s, key_hash, %(amount)s, %(model)s, %(now)s, %(now)s, %(owner)s, 0, 0 "
    "  FROM k), "
    f"e AS (INSERT INTO ledger_entries {_ENTRY_COLUMNS} SELECT %(now)s, key_hash, 'reserve', "
    "  0, %(amount)s, %(rid)s, %(model)s, NULL, NULL, NULL FROM k) "
    "SELECT available FROM k"
)
_SETTLE = (
    "WITH r AS (DELETE FROM reservations WHERE request_id = %(rid)s "
    "  RETURNING key_hash, amount_msat, model, limit_key), "
    "c AS (SELECT key_hash, amount_msat AS reserved, model, limit_key, "
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
    "SELECT c.key_hash, c.charged, c.reserved, k.available, c.limit_key FROM c, k"
)
# A restricted key's reservation, once its limits passed (in the transaction that locked its
# row): held on the key that pays, the reservation naming the limited key, the request counted
# in its minute (the minute's older requests forgotten).
_RESERVE_PAYER = (
    "WITH k AS (UPDATE api_keys SET reserved_msat = reserved_msat + %(amount)s "
    "  WHERE key_hash = %(payer)s AND balance_msat - reserved_msat >= %(amount)s "
    "  AND NOT disabled AND (expires_at IS NULL OR expires_at > %(now)s) "
    "  RETURNING key_hash, balance_msat - reserved_msat AS available), "
    "h AS (INSERT INTO reservations (request_id, key_hash, amount_msat, model, created_at, "
    "  touched_at, owner, delivered, prompt_tokens, limit_key) "
    "  SELECT %(rid)s, key_hash, %(amount)s, %(model)s, %(now)s, %(now)s, %(owner)s, 0, 0, "
    "  %(limit)s FROM k), "
    f"e AS (INSERT INTO ledger_entries {_ENTRY_COLUMNS} SELECT %(now)s, key_hash, 'reserve', "
    "  0, %(amount)s, %(rid)s, %(model)s, NULL, NULL, NULL FROM k), "
    "f AS (DELETE FROM rate_hits WHERE key_hash = %(hit)s AND at <= %(cutoff)s "
    "  AND EXISTS (SELECT 1 FROM k)), "
    "t AS (INSERT INTO rate_hits (key_hash, at) SELECT %(hit)s, %(now)s FROM k "
    "  WHERE %(hit)s IS NOT NULL) "
    "SELECT available FROM k"
)
_TYPES = {"amount": "bigint", "key": "text", "now": "double precision", "rid": "text",
          "model": "text", "owner": "text", "cost": "bigint", "kind": "text",
          "count": "bigint", "pt": "integer", "ct": "integer", "note": "text",
          "payer": "text", "limit": "text", "hit": "text", "cutoff": "double precision"}


def _prepared(name: str, sql: str, order: tuple[str, ...]) -> tuple[str, str]:
    """The server-side prepared form of a ``%(name)s`` statement: (PREPARE, EXECUTE), taking
    its parameters in ``order``. Parsing and planning these CTEs took three quarters of their
    time on every call."""
    found = tuple(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)))
    assert found == order, (name, found)
    text = sql
    for i, param in enumerate(order, 1):
        text = text.replace(f"%({param})s", f"${i}::{_TYPES[param]}")
    types = ", ".join(_TYPES[p] for p in order)
    marks = ", ".join(["%s"] * len(order))
    return f"PREPARE routstr_{name} ({types}) AS {text}", f"EXECUTE routstr_{name} ({marks})"


_PREPARE_RESERVE, _EXECUTE_RESERVE = _prepared(
    "reserve", _RESERVE, ("amount", "key", "now", "rid", "model", "owner"))
_PREPARE_SETTLE, _EXECUTE_SETTLE = _prepared(
    "settle", _SETTLE, ("rid", "cost", "count", "now", "kind", "model", "pt", "ct", "note"))
_PREPARE_RESERVE_PAYER, _EXECUTE_RESERVE_PAYER = _prepared(
    "reserve_payer", _RESERVE_PAYER,
    ("amount", "payer", "now", "rid", "model", "owner", "limit", "hit", "cutoff"))


class PreparedSteps:
    """PostgreSQL's reserve and settle: one prepared statement each, prepared once per
    connection (reconnecting once if the server dropped it)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._prepared_on: Any = None  # the connection our statements are prepared on

    def reserve(self, key_hash: str, amount_msat: int, request_id: str, model: str | None,
                owner: str | None, now: float) -> int | None:
        """What the key may still spend after holding ``amount_msat``; None if refused."""
        rows = self._run(_EXECUTE_RESERVE, (amount_msat, key_hash, now, request_id, model, owner))
        return int(rows[0][0]) if rows else None

    def close(self, request_id: str, kind: str, cost_msat: int, count: int, model: str | None,
              prompt_tokens: int | None, completion_tokens: int | None, note: str | None,
              now: float) -> tuple[str, int, int, int, str | None] | None:
        """(key, charged, reserved, available, limited key) of the reservation ended; None
        if none was. A limited key's count is left to the caller."""
        rows = self._run(_EXECUTE_SETTLE, (request_id, cost_msat, count, now, kind, model,
                                           prompt_tokens, completion_tokens, note))
        if not rows:
            return None
        key_hash, charged, reserved, available, limit_key = rows[0]
        return key_hash, int(charged), int(reserved), int(available), limit_key

    def reserve_payer(self, cur: Cursor, payer: str, amount_msat: int, request_id: str,
                      model: str | None, owner: str | None, limit_key: str,
                      hit: str | None, cutoff: float, now: float) -> int | None:
        """A restricted key's reservation on its payer, inside the caller's transaction (on
        ``cur``): one statement. What the payer may still spend; None if it cannot."""
        self._prepare(cur)
        cur.execute(_EXECUTE_RESERVE_PAYER, (amount_msat, payer, now, request_id, model, owner,
                                             limit_key, hit, cutoff))
        rows = cur.fetchall()
        return int(rows[0][0]) if rows else None

    def _run(self, execute: str, values: tuple[Any, ...]) -> list[Any]:
        cur = live_cursor(self._database)
        try:
            self._prepare(cur)
            cur.execute(execute, values)
        except CONNECTION_ERRORS:
            # The server dropped the connection while it was idle (a restart, a terminated
            # backend): the statement did not run. Once more, on a new connection.
            cur = self._database.reconnect().cursor()
            self._prepare(cur)
            cur.execute(execute, values)
        return list(cur.fetchall())

    def _prepare(self, cur: Cursor) -> None:
        conn = cur.connection  # type: ignore[attr-defined]
        if self._prepared_on is conn:
            return
        cur.execute(_PREPARE_RESERVE)
        cur.execute(_PREPARE_SETTLE)
        cur.execute(_PREPARE_RESERVE_PAYER)
        self._prepared_on = conn
