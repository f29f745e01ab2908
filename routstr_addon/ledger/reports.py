"""What the operator reads: /admin's figures and pages, ``routstr stats``, the TUI's counts.

Every query is bounded. The journal (``ledger_entries``) may hold millions of rows and has no
index on ``created_at``: its ids grow with time, so a moment is found by a binary search on
``id`` (one primary-key probe per step, at most ~64), and a time window is the id range between
two such boundaries. For /admin, days that are over are summed once and kept in memory; only
today's rows are read again on each view.

Readers that must see one moment across several queries (the TUI, ``routstr stats``) pass the
``Tx`` of ``Ledger.snapshot()``; the others read statement by statement.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from routstr_addon.ledger.accounts import ENTRY_COLUMNS, KEY_COLUMNS, key_state
from routstr_addon.ledger.payouts import COLUMNS as PAYOUT_COLUMNS
from routstr_addon.ledger.payouts import payout_record

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database, Tx

__all__ = ["KINDS", "ChargeGroup", "Day", "Finished", "KeyStats", "Page", "PayoutTotals",
           "Reports", "is_hex_prefix"]

DAY = 86400
KINDS = ("credit", "reserve", "charge", "release", "debit", "refund", "change", "overrun")
SETTLED_AFTER = 300.0  # seconds after a day ends before its sum is cached (late commits)
KIND_SCAN_WINDOW = 200_000  # journal ids looked through per page when filtering by kind alone
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
_FINISHED = "('charge', 'release')"  # the rows that end a request


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Any]
    has_more: bool
    next: int | None = None  # the cursor (journal: an id) or page number of the next page
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Day:
    start: float  # UTC midnight
    revenue_msat: int  # charged
    requests: int  # reservations made (requests admitted)

    @property
    def label(self) -> str:
        return datetime.fromtimestamp(self.start, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class KeyStats:
    """Figures over all keys."""

    keys: int
    funded_keys: int
    disabled_keys: int
    balance_msat: int
    reserved_msat: int
    backed_msat: int  # of the balances, funded with ecash
    credit_msat: int  # of the balances, granted by hand
    spent_msat: int
    requests: int
    in_flight: int  # open reservations
    pending_refunds_msat: int


@dataclass(frozen=True, slots=True)
class PayoutTotals:
    paid_sats: dict[str, int] = field(default_factory=dict)  # amount + fees, by kind
    pending: int = 0  # payments whose outcome is not known yet


@dataclass(frozen=True, slots=True)
class ChargeGroup:
    """Charged requests of one model on one UTC day (``day``: days since the epoch)."""

    model: str | None
    day: int
    requests: int
    revenue_msat: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Finished:
    """A finished request: its charge or release row."""

    id: int
    at: float
    request_id: str | None
    key_hash: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    amount_msat: int  # the row's change of balance (minus the charge)
    kind: str  # charge | release
    note: str | None


def is_hex_prefix(text: str) -> bool:
    return bool(_HEX.match(text))


def _prefix_range(prefix: str) -> tuple[str, str]:
    """Key hashes starting with a hex prefix are those in [prefix, prefix + "g"): every hex
    digit sorts below "g". A range uses the primary key's index on any database."""
    return prefix, prefix + "g"


class _DayCache:
    """Sums of days that are over; they do not change any more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._days: dict[float, tuple[int, int, int, int]] = {}

    def get(self, start: float) -> tuple[int, int, int, int] | None:
        with self._lock:
            return self._days.get(start)

    def put(self, start: float, value: tuple[int, int, int, int]) -> None:
        with self._lock:
            self._days[start] = value
            if len(self._days) > 400:
                for key in sorted(self._days)[: len(self._days) - 400]:
                    del self._days[key]

    def clear(self) -> None:
        with self._lock:
            self._days.clear()


class Reports:
    """The operator's reads of one ledger (with its cache of days that are over)."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self.days_cache = _DayCache()

    # -- the journal by time ---------------------------------------------------------------

    def id_bounds(self, tx: Tx | None = None) -> tuple[int, int]:
        """The journal's smallest and largest id (0, 0 when empty): two primary-key lookups."""
        # Two subqueries: SQLite reads MIN or MAX from the primary key only when alone in a
        # query (together, it scans the table).
        low, high = (tx or self._db.reader()).row(
            "SELECT (SELECT MIN(id) FROM ledger_entries), (SELECT MAX(id) FROM ledger_entries)")
        return (0, 0) if low is None else (int(low), int(high))

    def first_id_at(self, moment: float, lo: int | None = None, hi: int | None = None,
                    tx: Tx | None = None) -> int:
        """The boundary id of a moment among the ids [lo, hi): journal rows with a smaller id
        were written before it, rows from this id on at or after it (ids grow with time; gaps
        in ids are fine). ``hi`` when no row of the range is at or after it.

        A binary search on the primary key; without ``lo``/``hi``, over the whole journal.
        """
        reader = tx or self._db.reader()
        if lo is None or hi is None:
            first, last = self.id_bounds(reader)
            if not last:
                return 1
            lo = first if lo is None else max(lo, first)
            hi = last + 1 if hi is None else hi
        probe = "SELECT id, created_at FROM ledger_entries WHERE id >= ? ORDER BY id LIMIT 1"
        # Invariant: existing ids below lo are before the moment; existing ids from hi on are
        # not (or out of the range).
        while lo < hi:
            mid = (lo + hi) // 2
            row = reader.row(probe, (mid,))
            if row is None or int(row[0]) >= hi or float(row[1]) >= moment:
                hi = mid  # every existing id of the range from mid on is at or after it
            else:
                lo = int(row[0]) + 1
        return min(lo, hi)

    def daily_revenue(self, days: int = 30, now: float | None = None) -> list[Day]:
        """Revenue and requests per UTC day for the last ``days`` days, today last."""
        now = time.time() if now is None else now
        today = now - now % DAY
        starts = [today - DAY * i for i in range(days - 1, -1, -1)]
        reader = self._db.reader()
        first, last = self.id_bounds(reader)
        if not last:
            return [Day(s, 0, 0) for s in starts]
        top = last + 1
        out: list[Day] = []
        lo = first
        for start in starts:
            end = start + DAY
            over = end + SETTLED_AFTER <= now
            cached = self.days_cache.get(start) if over else None
            if cached is not None:
                begin, stop, revenue, requests = cached
            else:
                begin = self.first_id_at(start, lo, top, reader)
                stop = self.first_id_at(end, begin, top, reader) if end <= now else top
                revenue, requests = (int(v) for v in reader.row(
                    "SELECT COALESCE(SUM(CASE WHEN kind = 'charge' THEN -amount_msat ELSE 0 "
                    "END), 0), COALESCE(SUM(CASE WHEN kind = 'reserve' THEN 1 ELSE 0 END), 0) "
                    "FROM ledger_entries WHERE id >= ? AND id < ?", (begin, stop)))
                if over:
                    self.days_cache.put(start, (begin, stop, revenue, requests))
            lo = max(lo, stop)
            out.append(Day(start, revenue, requests))
        return out

    # -- figures ---------------------------------------------------------------------------

    def key_stats(self) -> KeyStats:
        reader = self._db.reader()
        (keys, balance, reserved, backed, disabled, funded, spent,
         requests) = (int(v) for v in reader.row(
            "SELECT COUNT(*), COALESCE(SUM(balance_msat), 0), COALESCE(SUM(reserved_msat), 0), "
            "COALESCE(SUM(CASE WHEN backed THEN balance_msat ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN disabled THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN balance_msat > 0 THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(total_spent_msat), 0), COALESCE(SUM(total_requests), 0) "
            "FROM api_keys"))
        in_flight = int(reader.value("SELECT COUNT(*) FROM reservations"))
        refunds = int(reader.value("SELECT COALESCE(SUM(msat), 0) FROM refunds "
                                   "WHERE state = 'pending'"))
        return KeyStats(keys, funded, disabled, balance, reserved, backed, balance - backed,
                        spent, requests, in_flight, refunds)

    def keys_page(self, query: str = "", page: int = 1, per_page: int = 50) -> Page:
        """Keys, newest first; ``query`` matches the start of a key's id (hex) or its label."""
        query = query.strip()
        where, params = "", []
        if query:
            pattern = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace(
                "_", "\\_") + "%"
            where = "WHERE LOWER(label) LIKE ? ESCAPE '\\'"
            params = [pattern]
            if is_hex_prefix(query.lower()):
                low, high = _prefix_range(query.lower())
                where = ("WHERE (key_hash >= ? AND key_hash < ?) "
                         "OR LOWER(label) LIKE ? ESCAPE '\\'")
                params = [low, high, pattern]
        offset = (page - 1) * per_page
        rows = [key_state(r) for r in self._db.reader().rows(
            f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys {where} "
            "ORDER BY created_at DESC, key_hash LIMIT ? OFFSET ?",
            (*params, per_page + 1, offset))]
        more = len(rows) > per_page
        return Page(rows[:per_page], more, page + 1 if more else None)

    def journal_page(self, key_prefix: str = "", kind: str = "", before: int | None = None,
                     per_page: int = 50) -> Page:
        """Journal rows, newest first, older than the id ``before``; filtered by the start of
        their key's id and by kind. Filtering by kind alone looks through at most
        ``KIND_SCAN_WINDOW`` ids per page (there is no index on kind): the next page goes on
        from where the look stopped."""
        reader = self._db.reader()
        conditions: list[str] = []
        params: list[Any] = []
        key_prefix = key_prefix.strip().lower()
        if key_prefix:
            if not is_hex_prefix(key_prefix):
                return Page([], False, note="A key id is made of the digits 0-9 and a-f.")
            low, high = _prefix_range(key_prefix)
            hashes = [r[0] for r in reader.rows(
                "SELECT key_hash FROM api_keys WHERE key_hash >= ? AND key_hash < ? "
                "ORDER BY key_hash LIMIT 51", (low, high))]
            if not hashes:
                return Page([], False, note=f"No key id starts with {key_prefix}.")
            if len(hashes) > 50:
                return Page([], False, note=f"More than 50 key ids start with {key_prefix}: "
                                            "give more digits.")
            conditions.append(f"key_hash IN ({', '.join('?' * len(hashes))})")
            params += hashes
        if kind:
            conditions.append("kind = ?")
            params.append(kind)
        if before is not None:
            conditions.append("id < ?")
            params.append(before)
        window_floor, floor_reached = None, True
        if kind and not key_prefix:
            first, last = self.id_bounds(reader)
            if not last:
                return Page([], False)
            top = min(before if before is not None else last + 1, last + 1)
            window_floor = max(first, top - KIND_SCAN_WINDOW)
            conditions.append("id >= ?")
            params.append(window_floor)
            floor_reached = window_floor <= first
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = [dict(zip(ENTRY_COLUMNS, r, strict=True)) for r in reader.rows(
            f"SELECT {', '.join(ENTRY_COLUMNS)} FROM ledger_entries {where} "
            "ORDER BY id DESC LIMIT ?", (*params, per_page + 1))]
        if len(rows) > per_page:
            return Page(rows[:per_page], True, int(rows[per_page - 1]["id"]))
        if window_floor is not None and not floor_reached:
            return Page(rows, True, window_floor,
                        note=f"Looked through {KIND_SCAN_WINDOW:,} rows; older ones are on the "
                             "next page.")
        return Page(rows, False)

    def payouts_page(self, page: int = 1, per_page: int = 50) -> Page:
        rows = [payout_record(r) for r in self._db.reader().rows(
            f"SELECT {', '.join(PAYOUT_COLUMNS)} FROM payouts ORDER BY created_at DESC, id "
            "LIMIT ? OFFSET ?", (per_page + 1, (page - 1) * per_page))]
        more = len(rows) > per_page
        return Page(rows[:per_page], more, page + 1 if more else None)

    def payout_totals(self) -> PayoutTotals:
        """Sats paid out (amount + fees), by kind, and the count of payments still pending."""
        reader = self._db.reader()
        paid = {kind: int(total) for kind, total in reader.rows(
            "SELECT kind, COALESCE(SUM(amount + fee_paid), 0) FROM payouts "
            "WHERE state = 'paid' GROUP BY kind")}
        pending = int(reader.value("SELECT COUNT(*) FROM payouts WHERE state = 'pending'"))
        return PayoutTotals(paid, pending)

    # -- routstr stats -----------------------------------------------------------------------

    def charges_since(self, since: float) -> list[ChargeGroup]:
        """Charged requests since ``since``, per model and UTC day, read in one snapshot over
        the window's id range."""
        day = self._db.dialect.bucket("created_at", DAY)
        with self._db.snapshot() as tx:
            low, high = self.id_bounds(tx)
            start = self.first_id_at(since, low, high + 1, tx) if high else 1
            return [ChargeGroup(m, int(d), int(n), int(r), int(p), int(c)) for m, d, n, r, p, c
                    in tx.rows(f"SELECT model, {day}, COUNT(*), COALESCE(SUM(-amount_msat), 0), "
                               "COALESCE(SUM(prompt_tokens), 0), "
                               "COALESCE(SUM(completion_tokens), 0) FROM ledger_entries "
                               "WHERE id >= ? AND kind = 'charge' AND created_at >= ? "
                               f"GROUP BY model, {day}", (start, since))]

    def overruns_since(self, since: float) -> tuple[int, int]:
        """Under-reservations since ``since``: requests whose cost exceeded what was reserved
        for them (each an 'overrun' row charging the excess), and the msat they charged."""
        with self._db.snapshot() as tx:
            low, high = self.id_bounds(tx)
            start = self.first_id_at(since, low, high + 1, tx) if high else 1
            rows = tx.rows("SELECT COUNT(*), COALESCE(SUM(-amount_msat), 0) FROM ledger_entries "
                           "WHERE id >= ? AND kind = 'overrun' AND created_at >= ?",
                           (start, since))
            count, msat = rows[0]
            return int(count), int(msat)

    # -- the TUI (in a snapshot) -------------------------------------------------------------

    def charges_per_day(self, tx: Tx, low: int, high: int) -> dict[int, tuple[int, int]]:
        """Charges with ids in [low, high], per UTC day: (count, msat)."""
        day = self._db.dialect.bucket("created_at", DAY)
        return {int(d): (int(n), int(r)) for d, n, r in tx.rows(
            f"SELECT {day}, COUNT(*), COALESCE(SUM(-amount_msat), 0) FROM ledger_entries "
            f"WHERE id >= ? AND id <= ? AND kind = 'charge' GROUP BY {day}", (low, high))}

    def finished_per_minute(self, tx: Tx, low: int, high: int, since: float) -> dict[int, int]:
        """Requests finished (charged or released) with ids in [low, high] and at or after
        ``since``, per minute since the epoch."""
        minute = self._db.dialect.bucket("created_at", 60)
        return {int(m): int(n) for m, n in tx.rows(
            f"SELECT {minute}, COUNT(*) FROM ledger_entries WHERE id >= ? AND id <= ? "
            f"AND kind IN {_FINISHED} AND created_at >= ? GROUP BY {minute}",
            (low, high, since))}

    def finished_since(self, tx: Tx, start: int, since: float) -> int:
        """How many requests finished from the id ``start`` on, at or after ``since``."""
        return int(tx.value(f"SELECT COUNT(*) FROM ledger_entries WHERE id >= ? "
                            f"AND kind IN {_FINISHED} AND created_at >= ?", (start, since)))

    def recent_finished(self, tx: Tx, high: int, limit: int, scan: int) -> list[Finished]:
        """The newest finished requests, looked for among the ``scan`` ids up to ``high``."""
        return [Finished(int(i), float(at), rid, key, model,
                         None if pt is None else int(pt), None if ct is None else int(ct),
                         int(amount), kind, note)
                for i, at, rid, key, model, pt, ct, amount, kind, note in tx.rows(
                    "SELECT id, created_at, request_id, key_hash, model, prompt_tokens, "
                    "completion_tokens, amount_msat, kind, note FROM ledger_entries "
                    f"WHERE id > ? AND kind IN {_FINISHED} ORDER BY id DESC LIMIT ?",
                    (high - scan, limit))]

    def in_flight(self, tx: Tx) -> tuple[int, int, float | None]:
        """Open reservations: how many, what they hold (msat), when the oldest was made."""
        count, held, oldest = tx.row("SELECT COUNT(*), COALESCE(SUM(amount_msat), 0), "
                                     "MIN(created_at) FROM reservations")
        return int(count), int(held), None if oldest is None else float(oldest)
