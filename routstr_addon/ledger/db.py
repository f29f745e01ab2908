"""The connection to the ledger's database: transactions, snapshots, the schema made and kept up
to date. What differs between SQLite and PostgreSQL is asked of the dialect (``dialects``).

Transactions run on the raw DB-API connection (``BEGIN`` … ``COMMIT``), not through peewee's
transaction objects: on the request path every microsecond is the proxy's (reserve and settle
with peewee query objects took 406 µs a request, with fixed SQL strings 66 µs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import peewee

from routstr_addon.ledger.dialects import CONNECTION_ERRORS, DATABASE_ERRORS, Dialect, dialect_for

__all__ = ["CONNECTION_ERRORS", "DATABASE_ERRORS", "Cursor", "Database", "Tx"]

logger = logging.getLogger(__name__)


class Cursor(Protocol):
    """A DB-API cursor, as far as the ledger uses one."""

    rowcount: int

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def executemany(self, sql: str, params: Any, /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx:
    """One open transaction of the ledger (or a read-only snapshot).

    Callers outside the ledger only hand it to ledger methods, so that what several of them
    write commits together or not at all (a swap's proofs and the credit they fund). Ledger
    modules run their statements through it, written with ``?`` marks in either dialect.
    """

    __slots__ = ("_dialect", "cur")

    def __init__(self, cur: Cursor, dialect: Dialect) -> None:
        self.cur = cur
        self._dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        self.cur.execute(self._dialect.sql(sql), tuple(params))
        return int(self.cur.rowcount)

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.cur.executemany(self._dialect.sql(sql), params)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self.cur.execute(self._dialect.sql(sql), tuple(params))
        return list(self.cur.fetchall())

    def row(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row, or None."""
        self.cur.execute(self._dialect.sql(sql), tuple(params))
        return self.cur.fetchone()

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row (an aggregate), or None."""
        found = self.row(sql, params)
        return None if found is None else found[0]


class Database:
    """One connection per thread (peewee's), the dialect, and the transactions run on it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = dialect_for(url)
        self.peewee: peewee.Database = self.dialect.open(url)
        self.peewee.connect()
        self.dialect.on_connect(self.peewee.connection())

    @property
    def name(self) -> str:
        return self.dialect.name

    def sql(self, text: str) -> str:
        """A statement written with ``?`` marks, in this database's parameter style."""
        return self.dialect.sql(text)

    def cursor(self) -> Cursor:
        """A cursor outside any transaction: each statement commits (or reads) on its own.

        A connection the server ended (PostgreSQL restarted or stopped, psycopg2 marks it
        closed) is replaced first: it would refuse every statement from now on."""
        conn = self.peewee.connection()
        if getattr(conn, "closed", 0):  # psycopg2's flag; sqlite3 connections have none
            conn = self.reconnect()
        cur: Cursor = conn.cursor()
        return cur

    def reader(self) -> Tx:
        """Reads outside a transaction, each statement on its own, through a ``Tx``."""
        return Tx(self.cursor(), self.dialect)

    def reconnect(self) -> Any:
        """A new connection (the server dropped the old one); returns it."""
        self.peewee.close()
        self.peewee.connect()
        conn = self.peewee.connection()
        self.dialect.on_connect(conn)
        return conn

    @contextmanager
    def cursor_transaction(self, durable: bool = False,
                           first: tuple[str, Sequence[Any]] | None = None) -> Iterator[Cursor]:
        """One short transaction on the raw DB-API connection; rolled back on any error.

        ``durable`` waits for the commit to reach the disk: for money coming in, which a power
        cut must not forget. The request path commits without waiting for an fsync.
        ``first``: a statement (already in this database's parameter style) run first, sent
        with the ``BEGIN`` where the database takes both at once; its rows are on the cursor.
        """
        cur = self.cursor()
        try:
            self._begin(cur, durable, first)
        except CONNECTION_ERRORS:
            # The server went away between requests: reconnect once, nothing was sent yet.
            cur = self.reconnect().cursor()
            self._begin(cur, durable, first)
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            if durable:
                self.dialect.end_durable(cur)

    def _begin(self, cur: Cursor, durable: bool, first: tuple[str, Sequence[Any]] | None) -> None:
        """Begin, and run ``first``; if ``first`` fails, the transaction is rolled back."""
        if durable:
            self.dialect.begin_durable(cur)
        if first is None:
            if not durable:
                cur.execute(self.dialect.begin_sql)
            return
        try:
            if durable or not self.dialect.begins_with_statement:
                if not durable:
                    cur.execute(self.dialect.begin_sql)
                cur.execute(first[0], first[1])
            else:
                cur.execute(f"{self.dialect.begin_sql}; {first[0]}", first[1])  # one round trip
        except CONNECTION_ERRORS:
            raise  # the connection is gone, and its transaction with it
        except BaseException:
            cur.execute("ROLLBACK")
            if durable:
                self.dialect.end_durable(cur)
            raise

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[Tx]:
        """A transaction for several steps at once: hand the ``Tx`` to the ledger's ``*_in``
        methods and stores; everything commits at the end of the block, or nothing."""
        with self.cursor_transaction(durable) as cur:
            yield Tx(cur, self.dialect)

    @contextmanager
    def snapshot(self) -> Iterator[Tx]:
        """A read-only transaction: every query in it sees the same moment, however the proxy
        writes meanwhile."""
        cur = self.cursor()
        cur.execute(self.dialect.snapshot_sql)
        try:
            yield Tx(cur, self.dialect)
        finally:
            cur.execute("ROLLBACK")

    def durable(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Run one statement as a transaction of its own, committed to disk; its rows."""
        return self.dialect.durable_statement(self, self.sql(sql), tuple(params))

    def create(self, models: Sequence[type[peewee.Model]]) -> None:
        """Make the tables that are missing, and add the columns an older version lacked (with
        their defaults). Nothing is ever dropped or rewritten."""
        from playhouse.migrate import migrate

        from routstr_addon.ledger.schema import Reservation

        Reservation._meta.without_rowid = self.dialect.compact_reservations
        tables = set(self.peewee.get_tables())
        new = [m for m in models if m._meta.table_name not in tables]
        if new:
            # Binding models to a database is global to the process: done only when there is
            # something to make (a process opening an existing ledger binds nothing).
            with self.peewee.bind_ctx(models):
                self.peewee.create_tables(new, safe=True)
        migrator = self.dialect.migrator(self.peewee)
        for model in models:
            if model in new:
                continue
            table = model._meta.table_name
            present = {c.name for c in self.peewee.get_columns(table)}
            missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
            if missing:
                logger.info("ledger: adding %s to %s", ", ".join(f.column_name for f in missing),
                            table)
                migrate(*(migrator.add_column(table, f.column_name, f) for f in missing))
        from routstr_addon.ledger.schema import EXTRA_INDEXES

        cur = self.cursor()
        for table, name, statement in EXTRA_INDEXES:
            # Asked first: making one (even "IF NOT EXISTS") locks the table against writes
            # for a moment, and every process and CLI command opens the ledger.
            if name not in {i.name for i in self.peewee.get_indexes(table)}:
                cur.execute(statement)

    def defer_checkpoints(self) -> None:
        self.dialect.defer_checkpoints(self.peewee)

    def checkpoint(self, truncate_above: int) -> None:
        self.dialect.checkpoint(self.peewee, truncate_above)

    def close(self) -> None:
        if not self.peewee.is_closed():
            self.peewee.close()
