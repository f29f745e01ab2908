"""Keys and their money: balances, reservations and the append-only journal.

Every amount is an integer number of msat. A key's ``balance_msat`` is everything it holds;
``reserved_msat`` is the part held by requests in flight; what it may still spend is the
difference. Each change to either is one journal row (``ledger_entries``) carrying the two
deltas, so at every moment and per key::

    sum(entries.amount_msat)   == balance_msat
    sum(entries.reserved_msat) == reserved_msat == sum(open reservations)

The statements on every request's path (reserve, settle, release) are fixed SQL strings,
translated to the database's parameter style once and run on the connection directly: building
peewee query objects per request cost six times what the fixed statements do (406 µs against
66 µs for reserve and settle). A reservation is one conditional ``UPDATE … WHERE balance -
reserved >= cost``, so concurrent requests on one key can never overdraw it, whatever the
database. PostgreSQL runs each step as one prepared statement (``dialects.PreparedSteps``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from routstr_addon.ledger.limits import (
    NO_LIMITS,
    RPM_WINDOW,
    LimitRefused,
    Limits,
    budget_left,
    next_window,
    window_start,
)

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Cursor, Database, Tx
    from routstr_addon.ledger.instances import Instances

__all__ = ["KEY_PREFIX", "Accounts", "Held", "KeyState", "ReserveError", "Settlement",
           "hash_key", "new_api_key"]

logger = logging.getLogger(__name__)

KEY_PREFIX = "sk-"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_hex(32)


def hash_key(key: str) -> str:
    """The only form in which a key is stored: hex SHA-256 of the whole key string."""
    return hashlib.sha256(key.encode()).hexdigest()


# --- results --------------------------------------------------------------------------------


class ReserveError(Exception):
    """The key cannot pay for this request; ``reason`` says why."""

    def __init__(self, reason: str, available_msat: int = 0, required_msat: int = 0,
                 refused: LimitRefused | None = None) -> None:
        super().__init__(reason)
        # unknown_key | disabled | expired | insufficient | limited (``refused`` says which)
        self.reason = reason
        self.available_msat = available_msat
        self.required_msat = required_msat
        self.refused = refused


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
    parent_key_hash: str | None = None  # a child key: its parent pays
    restricted: bool = False  # limited or a child: admitted by the limits' transaction
    limits: Limits = NO_LIMITS
    limit_spent_msat: int = 0  # charged in the budget's current period
    limit_window_start: float | None = None

    @property
    def available_msat(self) -> int:
        return self.balance_msat - self.reserved_msat


KEY_COLUMNS = ("key_hash", "balance_msat", "reserved_msat", "total_spent_msat",
               "total_requests", "created_at", "expires_at", "refund_address", "label",
               "disabled", "backed", "parent_key_hash", "restricted", "limit_rpm",
               "limit_concurrent", "limit_models", "limit_budget_msat", "limit_period",
               "limit_spent_msat", "limit_window_start")
ENTRY_COLUMNS = ("id", "created_at", "key_hash", "kind", "amount_msat", "reserved_msat",
                 "request_id", "model", "prompt_tokens", "completion_tokens", "note")
RESERVATION_COLUMNS = ("request_id", "key_hash", "amount_msat", "model", "created_at",
                       "touched_at", "owner", "delivered", "prompt_tokens")


def key_state(row: Sequence[Any]) -> KeyState:
    """A row of ``KEY_COLUMNS``."""
    models = tuple(m for m in (row[15] or "").split(",") if m) or None
    limits = Limits(row[13], row[14], models, None if row[16] is None else int(row[16]),
                    row[17])
    return KeyState(row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]), float(row[5]),
                    None if row[6] is None else float(row[6]), row[7], row[8], bool(row[9]),
                    bool(row[10]), row[11], bool(row[12]), limits, int(row[18] or 0),
                    None if row[19] is None else float(row[19]))


# --- the statements -------------------------------------------------------------------------

_SQL = {
    "reserve": (
        "UPDATE api_keys SET reserved_msat = reserved_msat + ? "
        "WHERE key_hash = ? AND balance_msat - reserved_msat >= ? AND NOT disabled "
        "AND (expires_at IS NULL OR expires_at > ?) AND NOT restricted "
        "RETURNING balance_msat - reserved_msat"
    ),
    # The same for the key that pays a restricted key's request, once its limits passed.
    "reserve_payer": (
        "UPDATE api_keys SET reserved_msat = reserved_msat + ? "
        "WHERE key_hash = ? AND balance_msat - reserved_msat >= ? AND NOT disabled "
        "AND (expires_at IS NULL OR expires_at > ?) "
        "RETURNING balance_msat - reserved_msat"
    ),
    "hold": ("INSERT INTO reservations (request_id, key_hash, amount_msat, model, created_at, "
             "touched_at, owner, delivered, prompt_tokens, limit_key) "
             "VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, ?)"),
    "unhold": ("DELETE FROM reservations WHERE request_id = ? "
               "RETURNING key_hash, amount_msat, model, limit_key"),
    # Locks a restricted key's row for the rest of its admission (every process waits here).
    "lock_key": (f"UPDATE api_keys SET restricted = restricted WHERE key_hash = ? "
                 f"RETURNING {', '.join(KEY_COLUMNS)}"),
    "in_flight": ("SELECT COUNT(*), COALESCE(SUM(amount_msat), 0) FROM reservations "
                  "WHERE limit_key = ?"),
    "hits_forget": "DELETE FROM rate_hits WHERE key_hash = ? AND at <= ?",
    "hits": "SELECT COUNT(*), MIN(at) FROM rate_hits WHERE key_hash = ? AND at > ?",
    "hit": "INSERT INTO rate_hits (key_hash, at) VALUES (?, ?)",
    "new_window": ("UPDATE api_keys SET limit_spent_msat = 0, limit_window_start = ? "
                   "WHERE key_hash = ?"),
    "limit_spent": ("UPDATE api_keys SET limit_spent_msat = limit_spent_msat + ? "
                    "WHERE key_hash = ?"),
    "child_spent": ("UPDATE api_keys SET limit_spent_msat = limit_spent_msat + ?, "
                    "total_spent_msat = total_spent_msat + ?, "
                    "total_requests = total_requests + ? WHERE key_hash = ?"),
    "close": (
        "UPDATE api_keys SET balance_msat = balance_msat - ?, reserved_msat = reserved_msat - ?, "
        "total_spent_msat = total_spent_msat + ?, total_requests = total_requests + ? "
        "WHERE key_hash = ? RETURNING balance_msat - reserved_msat"
    ),
    "credit": ("UPDATE api_keys SET balance_msat = balance_msat + ? WHERE key_hash = ? "
               "RETURNING balance_msat - reserved_msat"),
    "debit": ("UPDATE api_keys SET balance_msat = balance_msat - ? WHERE key_hash = ? "
              "AND balance_msat - reserved_msat >= ? RETURNING balance_msat - reserved_msat"),
    "entry": ("INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, "
              "reserved_msat, request_id, model, prompt_tokens, completion_tokens, note) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
    "key": f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys WHERE key_hash = ?",
    "new_key": ("INSERT INTO api_keys (key_hash, balance_msat, reserved_msat, total_spent_msat, "
                "total_requests, created_at, expires_at, refund_address, label, disabled, "
                "backed) VALUES (?, ?, 0, 0, 0, ?, ?, ?, ?, ?, ?)"),
    "touch": ("UPDATE reservations SET touched_at = ?, delivered = ?, prompt_tokens = ? "
              "WHERE request_id = ?"),
}

ReserveStep = Callable[[str, int, str, "str | None", "str | None", float], "int | None"]
CloseStep = Callable[[str, str, int, int, "str | None", "int | None", "int | None", "str | None",
                      float], "tuple[str, int, int, int, str | None] | None"]


class Accounts:
    """Every change of a key's money goes through here: one instance per ledger."""

    def __init__(self, database: Database, instances: Instances) -> None:
        self._db = database
        self._instances = instances  # whose reservations new ones are
        self._sql = {name: database.sql(text) for name, text in _SQL.items()}
        steps = database.dialect.request_steps(database)
        self._reserve_step: ReserveStep = (steps.reserve if steps is not None
                                           else self._reserve_in_transaction)
        self._close_step: CloseStep = (steps.close if steps is not None
                                       else self._close_in_transaction)
        self._steps = steps
        # Keys this process has seen restricted: their requests skip the plain reservation
        # (which would refuse them anyway). Only ever a shortcut: limits are read in the
        # admitting transaction, so a key whose limits were lifted is still served right.
        self._restricted: set[str] = set()

    # -- the request path ------------------------------------------------------------------

    def reserve(self, key_hash: str, amount_msat: int, request_id: str,
                model: str | None = None) -> Held:
        """Hold ``amount_msat`` of the key's available balance for one request, or raise."""
        now = time.time()
        if key_hash not in self._restricted:
            available = self._reserve_step(key_hash, amount_msat, request_id, model,
                                           self._instances.instance_id, now)
            if available is not None:
                return Held(request_id, key_hash, amount_msat, available)
            state = self.key(key_hash)
            if state is None or not state.restricted:
                raise self._why_not(key_hash, amount_msat, now, state)
            self._restricted.add(key_hash)
        available = self._reserve_limited(key_hash, amount_msat, request_id, model, now)
        return Held(request_id, key_hash, amount_msat, available)

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

    def touch(self, request_id: str, delivered: int = 0, prompt_tokens: int = 0) -> None:
        """Mark a reservation as still active (a stream is flowing), with what it delivered."""
        with self._db.cursor_transaction() as cur:
            cur.execute(self._sql["touch"], (time.time(), delivered, prompt_tokens, request_id))

    def late_charge(self, key_hash: str, request_id: str, cost_msat: int,
                    model: str | None, *, overrun: bool = False) -> int:
        """Charge a request whose reservation was already swept: as much of the cost as the
        key can still pay (never overdrawn). Returns what was charged.

        ``overrun``: the part of a settled request's cost above its reservation (an
        under-reservation, counted by ``routstr stats``): a row of kind 'overrun', the request
        already counted by its charge."""
        kind, note = (("overrun", "cost above its reservation") if overrun
                      else ("charge", "after its reservation was swept"))
        with self._db.transaction() as tx:
            # A child key's requests are paid by its parent (and counted on the child).
            found = tx.row("SELECT COALESCE(parent_key_hash, key_hash), restricted "
                           "FROM api_keys WHERE key_hash = ?", (key_hash,))
            payer, restricted = (found[0], bool(found[1])) if found else (key_hash, False)
            available = tx.value("SELECT balance_msat - reserved_msat FROM api_keys "
                                 "WHERE key_hash = ?", (payer,))
            charged = max(0, min(cost_msat, int(available or 0)))
            if charged:
                count = 0 if overrun else 1
                tx.execute("UPDATE api_keys SET balance_msat = balance_msat - ?, "
                           "total_spent_msat = total_spent_msat + ?, total_requests = "
                           "total_requests + ? WHERE key_hash = ? AND "
                           "balance_msat - reserved_msat >= ?",
                           (charged, charged, count, payer, charged))
                self._entry(tx.cur, time.time(), payer, kind, -charged, 0, request_id,
                            model, note=note)
                if restricted:
                    self._close_limit(tx.cur, payer, key_hash, charged, count)
        return charged

    def _why_not(self, key_hash: str, amount_msat: int, now: float,
                 state: KeyState | None) -> ReserveError:
        if state is None:
            return ReserveError("unknown_key")
        if state.disabled:
            return ReserveError("disabled")
        if state.expires_at is not None and state.expires_at <= now:
            return ReserveError("expired")
        return ReserveError("insufficient", state.available_msat, amount_msat)

    def _close(self, request_id: str, kind: str, cost_msat: int, model: str | None,
               prompt_tokens: int | None, completion_tokens: int | None,
               note: str | None) -> Settlement | None:
        """End a reservation, charging ``cost_msat`` (capped at it) or nothing; exactly once."""
        done = self._close_step(request_id, kind, cost_msat, 1 if kind == "charge" else 0,
                                model, prompt_tokens, completion_tokens, note, time.time())
        if done is None:
            return None
        key_hash, charged, reserved, available, limit_key = done
        if limit_key is not None:
            # PostgreSQL closed the money in one statement; the limit's count follows, one
            # statement on its own (atomic by itself: no transaction's round trips around it).
            self._close_limit(self._db.cursor(), key_hash, limit_key, charged,
                              1 if kind == "charge" else 0)
        return Settlement(request_id, key_hash, charged, reserved, available)

    def _reserve_limited(self, key_hash: str, amount_msat: int, request_id: str,
                         model: str | None, now: float) -> int:
        """Admit a restricted key's request: in one transaction that locks the key's row
        (so concurrent admissions on any process wait their turn), check its limits, hold
        the amount on the key that pays (its parent, for a child) and count the request.
        Returns what the payer may still spend; raises ReserveError."""
        sql = self._sql
        with self._db.cursor_transaction(first=(sql["lock_key"], (key_hash,))) as cur:
            rows = cur.fetchall()
            if not rows:
                raise ReserveError("unknown_key")
            state = key_state(rows[0])
            if state.disabled:
                raise ReserveError("disabled")
            if state.expires_at is not None and state.expires_at <= now:
                raise ReserveError("expired")
            limits = state.limits
            if limits.models and model not in limits.models:
                raise ReserveError("limited", refused=LimitRefused(
                    "model", f"This key may use only: {', '.join(limits.models)}."))
            if limits.rpm is not None:
                count, oldest = self._hits(cur, key_hash, now - RPM_WINDOW)
                if count >= limits.rpm:
                    wait = max(1.0, (oldest or now) + RPM_WINDOW - now)
                    raise ReserveError("limited", refused=LimitRefused(
                        "rate", f"This key is limited to {limits.rpm} requests a minute.",
                        wait))
            if limits.concurrent is not None or limits.budget_msat is not None:
                cur.execute(sql["in_flight"], (key_hash,))
                flying, flying_msat = cur.fetchall()[0]
                if limits.concurrent is not None and int(flying) >= limits.concurrent:
                    raise ReserveError("limited", refused=LimitRefused(
                        "concurrency", f"This key is limited to {limits.concurrent} "
                        "requests at once.", 1.0))
                left = budget_left(limits, state.limit_spent_msat, state.limit_window_start,
                                   int(flying_msat), now)
                if left is not None and left < amount_msat:
                    comes_back = next_window(limits.period, now)
                    raise ReserveError("limited", refused=LimitRefused(
                        "budget", f"This key's budget of {limits.budget_msat} msat"
                        f"{' per period' if limits.period else ''} is spent: this request "
                        f"needs up to {amount_msat} msat and {max(left, 0)} msat remain.",
                        None if comes_back is None else max(1.0, comes_back - now)))
            payer = state.parent_key_hash or key_hash
            hit = key_hash if limits.rpm is not None else None
            available = self._hold_on_payer(cur, payer, amount_msat, request_id, model,
                                            key_hash, hit, now)
            if available is None:
                payer_state = self.key(payer) if payer != key_hash else state
                if payer_state is None or payer_state.disabled:
                    raise ReserveError("disabled")
                if payer_state.expires_at is not None and payer_state.expires_at <= now:
                    raise ReserveError("expired")
                raise ReserveError("insufficient", payer_state.available_msat, amount_msat)
            if limits.budget_msat is not None and limits.period is not None:
                start = window_start(limits.period, now)
                if state.limit_window_start is None or (
                        start is not None and state.limit_window_start < start):
                    cur.execute(sql["new_window"], (start, key_hash))
            return available

    def _hold_on_payer(self, cur: Cursor, payer: str, amount_msat: int, request_id: str,
                       model: str | None, limit_key: str, hit: str | None,
                       now: float) -> int | None:
        """Reserve on the key that pays, the reservation naming the limited key, and count
        the request in its minute (``hit``); what the payer may still spend, or None."""
        owner = self._instances.instance_id
        if self._steps is not None:  # PostgreSQL: one round trip
            return self._steps.reserve_payer(cur, payer, amount_msat, request_id, model, owner,
                                             limit_key, hit, now - RPM_WINDOW, now)
        sql = self._sql
        cur.execute(sql["reserve_payer"], (amount_msat, payer, amount_msat, now))
        reserved = cur.fetchall()
        if not reserved:
            return None
        cur.execute(sql["hold"], (request_id, payer, amount_msat, model, now, now, owner,
                                  limit_key))
        self._entry(cur, now, payer, "reserve", 0, amount_msat, request_id, model)
        if hit is not None:
            cur.execute(sql["hits_forget"], (hit, now - RPM_WINDOW))
            cur.execute(sql["hit"], (hit, now))
        return int(reserved[0][0])

    def _hits(self, cur: Cursor, key_hash: str, cutoff: float) -> tuple[int, float | None]:
        """Requests admitted on the key since ``cutoff``, and the oldest one's time."""
        cur.execute(self._sql["hits"], (key_hash, cutoff))
        count, oldest = cur.fetchall()[0]
        return int(count), None if oldest is None else float(oldest)

    def _close_limit(self, cur: Cursor, payer: str, limit_key: str, charged: int,
                     count: int) -> None:
        """Count a restricted key's charge against its budget (and, for a child, its own
        totals: the money is on its parent's row)."""
        if limit_key == payer:
            if charged:
                cur.execute(self._sql["limit_spent"], (charged, limit_key))
        else:
            cur.execute(self._sql["child_spent"], (charged, charged, count, limit_key))

    # The portable form of the two steps: a short transaction of a few statements.

    def _reserve_in_transaction(self, key_hash: str, amount_msat: int, request_id: str,
                                model: str | None, owner: str | None, now: float) -> int | None:
        with self._db.cursor_transaction() as cur:
            return self._reserve(cur, key_hash, amount_msat, request_id, model, owner, now)

    def _close_in_transaction(self, request_id: str, kind: str, cost_msat: int, count: int,
                              model: str | None, prompt_tokens: int | None,
                              completion_tokens: int | None, note: str | None,
                              now: float) -> tuple[str, int, int, int, str | None] | None:
        sql = self._sql
        with self._db.cursor_transaction() as cur:
            cur.execute(sql["unhold"], (request_id,))
            held = cur.fetchall()
            if not held:
                return None
            key_hash, reserved, held_model, limit_key = held[0]
            charged = max(0, min(cost_msat, reserved))
            cur.execute(sql["close"], (charged, reserved, charged, count, key_hash))
            available = cur.fetchall()[0][0]
            self._entry(cur, now, key_hash, kind, -charged, -reserved, request_id,
                        model or held_model, prompt_tokens, completion_tokens, note)
            if limit_key is not None:
                self._close_limit(cur, key_hash, limit_key, charged, count)
        # The limit's count is done: the caller must not do it again.
        return key_hash, charged, int(reserved), int(available), None

    def _reserve(self, cur: Cursor, key_hash: str, amount_msat: int, request_id: str,
                 model: str | None, owner: str | None, now: float) -> int | None:
        cur.execute(self._sql["reserve"], (amount_msat, key_hash, amount_msat, now))
        rows = cur.fetchall()
        if not rows:
            return None
        cur.execute(self._sql["hold"], (request_id, key_hash, amount_msat, model, now, now,
                                        owner, None))
        self._entry(cur, now, key_hash, "reserve", 0, amount_msat, request_id, model)
        return int(rows[0][0])

    def _entry(self, cur: Cursor, now: float, key_hash: str, kind: str, amount: int,
               reserved: int, request_id: str | None = None, model: str | None = None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None,
               note: str | None = None) -> None:
        cur.execute(self._sql["entry"], (now, key_hash, kind, amount, reserved, request_id,
                                         model, prompt_tokens, completion_tokens, note))

    # -- inside a caller's transaction -------------------------------------------------------

    def create_key_in(self, tx: Tx, key_hash: str, balance_msat: int, *, note: str,
                      expires_at: float | None = None, refund_address: str | None = None,
                      label: str | None = None, backed: bool = False) -> None:
        now = time.time()
        tx.cur.execute(self._sql["new_key"], (key_hash, balance_msat, now, expires_at,
                                              refund_address, label, False, backed))
        self._entry(tx.cur, now, key_hash, "credit", balance_msat, 0, note=note)

    def credit_in(self, tx: Tx, key_hash: str, amount_msat: int, note: str | None,
                  request_id: str | None = None) -> int | None:
        """Credit inside a transaction; the key's available balance, or None if unknown."""
        tx.cur.execute(self._sql["credit"], (amount_msat, key_hash))
        rows = tx.cur.fetchall()
        if not rows:
            return None
        self._entry(tx.cur, time.time(), key_hash, "credit", amount_msat, 0, request_id,
                    note=note)
        return int(rows[0][0])

    def debit_in(self, tx: Tx, key_hash: str, amount_msat: int, note: str,
                 request_id: str | None = None, kind: str = "debit") -> int | None:
        """Take from what the key may spend; its available balance after, or None if short."""
        tx.cur.execute(self._sql["debit"], (amount_msat, key_hash, amount_msat))
        rows = tx.cur.fetchall()
        if not rows:
            return None
        self._entry(tx.cur, time.time(), key_hash, kind, -amount_msat, 0, request_id, note=note)
        return int(rows[0][0])

    def reserve_in(self, tx: Tx, key_hash: str, amount_msat: int, request_id: str,
                   model: str | None) -> int | None:
        """Reserve inside a transaction; the available balance after, or None if refused."""
        return self._reserve(tx.cur, key_hash, amount_msat, request_id, model,
                             self._instances.instance_id, time.time())

    # -- money in --------------------------------------------------------------------------

    def create_key(self, balance_msat: int = 0, *, expires_at: float | None = None,
                   refund_address: str | None = None, label: str | None = None,
                   key: str | None = None, note: str = "created") -> tuple[str, KeyState]:
        """Create a key, optionally funded; returns the key (shown once) and its state."""
        if balance_msat < 0:
            raise ValueError("balance must not be negative")
        key = key or new_api_key()
        key_hash = hash_key(key)
        with self._db.transaction(durable=True) as tx:
            self.create_key_in(tx, key_hash, balance_msat, note=note, expires_at=expires_at,
                               refund_address=refund_address, label=label)
        state = self.key(key_hash)
        assert state is not None
        return key, state

    def credit(self, key_hash: str, amount_msat: int, note: str | None = None) -> int:
        """Add funds to an existing key; returns its available balance. KeyError if unknown."""
        if amount_msat <= 0:
            raise ValueError("a credit must be positive")
        with self._db.transaction(durable=True) as tx:
            available = self.credit_in(tx, key_hash, amount_msat, note)
            if available is None:
                raise KeyError(key_hash)
        return available

    def credit_entry(self, key_hash: str, amount_msat: int, note: str) -> dict[str, Any] | None:
        """Credit a key by hand; the journal row that records it (None: no such key)."""
        if amount_msat <= 0:
            raise ValueError("a credit must be positive")
        with self._db.transaction(durable=True) as tx:
            if self.credit_in(tx, key_hash, amount_msat, note) is None:
                return None
            row = tx.row(f"SELECT {', '.join(ENTRY_COLUMNS)} FROM ledger_entries "
                         "WHERE key_hash = ? ORDER BY id DESC LIMIT 1", (key_hash,))
        return dict(zip(ENTRY_COLUMNS, row, strict=True))

    def set_disabled(self, key_hash: str, disabled: bool) -> bool | None:
        """Switch a key off (its next requests are refused: reservations check the flag) or
        on. Whether anything changed; None if there is no such key. Requests already in
        flight finish and are charged."""
        with self._db.transaction() as tx:
            was = tx.row("SELECT disabled FROM api_keys WHERE key_hash = ?", (key_hash,))
            if was is None:
                return None
            if bool(was[0]) == disabled:
                return False
            tx.execute("UPDATE api_keys SET disabled = ? WHERE key_hash = ?",
                       (disabled, key_hash))
            return True

    # -- limits and child keys ---------------------------------------------------------------

    def set_limits(self, key_hash: str, limits: Limits) -> KeyState | None:
        """Replace a key's limits (all of them: None lifts one); its state after, or None if
        there is no such key. A new budget starts a new period now."""
        models = ",".join(limits.models) if limits.models else None
        now = time.time()
        with self._db.transaction() as tx:
            found = tx.execute(
                "UPDATE api_keys SET limit_rpm = ?, limit_concurrent = ?, limit_models = ?, "
                "limit_budget_msat = ?, limit_period = ?, limit_spent_msat = CASE WHEN "
                "limit_budget_msat IS NULL THEN 0 ELSE limit_spent_msat END, "
                "limit_window_start = COALESCE(limit_window_start, ?), "
                "restricted = (parent_key_hash IS NOT NULL OR ?) WHERE key_hash = ?",
                (limits.rpm, limits.concurrent, models, limits.budget_msat, limits.period, now,
                 limits.any, key_hash))
        if not found:
            return None
        return self.key(key_hash)

    def create_children(self, parent_hash: str, count: int, limits: Limits,
                        expires_at: float | None) -> list[str]:
        """``count`` child keys of a key: each spends the parent's balance (its own stays 0)
        within its own limits. Returns the new keys (shown once)."""
        keys = [new_api_key() for _ in range(count)]
        models = ",".join(limits.models) if limits.models else None
        now = time.time()
        with self._db.transaction(durable=True) as tx:
            for key in keys:
                key_hash = hash_key(key)
                self.create_key_in(tx, key_hash, 0, note="child key", expires_at=expires_at)
                tx.execute(
                    "UPDATE api_keys SET parent_key_hash = ?, restricted = ?, limit_rpm = ?, "
                    "limit_concurrent = ?, limit_models = ?, limit_budget_msat = ?, "
                    "limit_period = ?, limit_window_start = ? WHERE key_hash = ?",
                    (parent_hash, True, limits.rpm, limits.concurrent, models,
                     limits.budget_msat, limits.period, now, key_hash))
        return keys

    def reset_child(self, parent_hash: str, child_hash: str) -> bool:
        """Give a child key its whole budget again (its parent asks); False if it is not a
        child of this parent."""
        with self._db.transaction() as tx:
            return tx.execute("UPDATE api_keys SET limit_spent_msat = 0, limit_window_start = ? "
                              "WHERE key_hash = ? AND parent_key_hash = ?",
                              (time.time(), child_hash, parent_hash)) == 1

    def children(self, parent_hash: str) -> list[KeyState]:
        return [key_state(r) for r in self._db.reader().rows(
            f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys WHERE parent_key_hash = ? "
            "ORDER BY created_at", (parent_hash,))]

    # -- reads -----------------------------------------------------------------------------

    def key(self, key_hash: str) -> KeyState | None:
        cur = self._db.cursor()
        cur.execute(self._sql["key"], (key_hash,))
        row = cur.fetchone()
        return key_state(row) if row else None

    def find_keys(self, prefix: str) -> list[KeyState]:
        """Keys whose hash starts with ``prefix`` (how people name keys: a short hash)."""
        prefix = prefix.lower()
        # Hashes starting with the prefix are those in [prefix, prefix + "g"): every hex digit
        # sorts below "g". A range uses the primary key's index on any database.
        return [key_state(r) for r in self._db.reader().rows(
            f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys WHERE key_hash >= ? "
            "AND key_hash < ? ORDER BY created_at LIMIT 50", (prefix, prefix + "g"))]

    def keys(self, limit: int = 1000) -> list[KeyState]:
        return [key_state(r) for r in self._db.reader().rows(
            f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys ORDER BY created_at DESC LIMIT ?",
            (limit,))]

    def entries(self, key_hash: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest journal rows (of one key, or all), newest last."""
        where, params = ("WHERE key_hash = ?", (key_hash, limit)) if key_hash else ("", (limit,))
        rows = self._db.reader().rows(f"SELECT {', '.join(ENTRY_COLUMNS)} FROM ledger_entries "
                                      f"{where} ORDER BY id DESC LIMIT ?", params)
        return [dict(zip(ENTRY_COLUMNS, r, strict=True)) for r in reversed(rows)]

    def expired_with_balance(self, now: float) -> list[KeyState]:
        """Keys funded with ecash, expired by ``now``, with at least a sat on them and no
        request in flight: what is due to be refunded."""
        return [key_state(r) for r in self._db.reader().rows(
            f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys WHERE backed "
            "AND expires_at IS NOT NULL AND expires_at <= ? AND reserved_msat = 0 "
            "AND balance_msat >= 1000", (now,))]

    def open_reservations(self, key_hash: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE key_hash = ?", (key_hash,)) if key_hash else ("", ())
        return [dict(zip(RESERVATION_COLUMNS, r, strict=True)) for r in self._db.reader().rows(
            f"SELECT {', '.join(RESERVATION_COLUMNS)} FROM reservations {where} "
            "ORDER BY created_at", params)]
