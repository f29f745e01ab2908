"""What the /admin dashboard reads from the ledger: figures, pages of keys, journal rows, payouts.

Every query is bounded. The journal (``ledger_entries``) has no index on ``created_at``: its
ids grow with time, so a moment is found by a binary search on ``id`` (one primary-key probe
per step, at most ~64), and a day is the id range between two such boundaries. Days that are
over are summed once and kept in memory; only today's rows are read again on each view.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from routstr_addon.ledger import KeyState, Ledger

__all__ = [
    "KINDS",
    "Day",
    "Page",
    "daily_revenue",
    "first_id_at",
    "journal_page",
    "key_stats",
    "keys_page",
    "payouts_page",
    "set_disabled",
]

DAY = 86400
KINDS = ("credit", "reserve", "charge", "release", "debit", "refund", "change")
SETTLED_AFTER = 300.0  # seconds after a day ends before its sum is cached (late commits)
KIND_SCAN_WINDOW = 200_000  # journal ids looked through per page when filtering by kind alone
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
_KEY_COLUMNS = ("key_hash", "balance_msat", "reserved_msat", "total_spent_msat",
                "total_requests", "created_at", "expires_at", "refund_address", "label",
                "disabled", "backed")
_ENTRY_COLUMNS = ("id", "created_at", "key_hash", "kind", "amount_msat", "reserved_msat",
                  "request_id", "model", "prompt_tokens", "completion_tokens", "note")
_PAYOUT_COLUMNS = ("id", "kind", "key_hash", "destination", "mint", "unit", "amount",
                   "fee_reserve", "fee_paid", "msat", "state", "error", "created_at",
                   "updated_at")


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[Any]
    has_more: bool
    next: int | None = None  # the cursor (journal: an id) or page number of the next page
    note: str | None = None


def is_hex_prefix(text: str) -> bool:
    return bool(_HEX.match(text))


def _prefix_range(prefix: str) -> tuple[str, str]:
    """Key hashes starting with a hex prefix are those in [prefix, prefix + "g"): every hex
    digit sorts below "g". A range uses the primary key's index on any database."""
    return prefix, prefix + "g"


# --- the journal by time --------------------------------------------------------------------


def first_id_at(ledger: Ledger, moment: float, lo: int | None = None,
                hi: int | None = None) -> int:
    """The boundary id of a moment: journal rows with a smaller id were written before it,
    rows from this id on at or after it (ids grow with time; gaps in ids are fine).

    A binary search on the primary key; ``lo``/``hi`` narrow it when a bound is known.
    """
    cur = ledger.db.connection().cursor()
    if lo is None or hi is None:
        cur.execute("SELECT MIN(id), MAX(id) FROM ledger_entries")
        first, last = cur.fetchone()
        if first is None:
            return 1
        lo = int(first) if lo is None else max(lo, int(first))
        hi = int(last) + 1 if hi is None else hi
    probe = ledger.sql("SELECT id, created_at FROM ledger_entries WHERE id >= ? ORDER BY id "
                       "LIMIT 1")
    # Invariant: existing ids below lo are before the moment; existing ids from hi on are not.
    while lo < hi:
        mid = (lo + hi) // 2
        cur.execute(probe, (mid,))
        row = cur.fetchone()
        if row is None or int(row[0]) >= hi or float(row[1]) >= moment:
            hi = mid  # every existing id from mid on is at or after the moment
        else:
            lo = int(row[0]) + 1
    return lo


@dataclass(frozen=True, slots=True)
class Day:
    start: float  # UTC midnight
    revenue_msat: int  # charged
    requests: int  # reservations made (requests admitted)

    @property
    def label(self) -> str:
        return datetime.fromtimestamp(self.start, UTC).strftime("%Y-%m-%d")


class _DayCache:
    """Sums of days that are over, per database; they do not change any more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._days: dict[tuple[str, float], tuple[int, int, int, int]] = {}

    def get(self, url: str, start: float) -> tuple[int, int, int, int] | None:
        with self._lock:
            return self._days.get((url, start))

    def put(self, url: str, start: float, value: tuple[int, int, int, int]) -> None:
        with self._lock:
            self._days[(url, start)] = value
            if len(self._days) > 400:
                for key in sorted(self._days)[: len(self._days) - 400]:
                    del self._days[key]

    def clear(self) -> None:
        with self._lock:
            self._days.clear()


DAYS = _DayCache()


def daily_revenue(ledger: Ledger, days: int = 30, now: float | None = None) -> list[Day]:
    """Revenue and requests per UTC day for the last ``days`` days, today last."""
    now = time.time() if now is None else now
    today = now - now % DAY
    starts = [today - DAY * i for i in range(days - 1, -1, -1)]
    cur = ledger.db.connection().cursor()
    cur.execute("SELECT MIN(id), MAX(id) FROM ledger_entries")
    first, last = cur.fetchone()
    if first is None:
        return [Day(s, 0, 0) for s in starts]
    top = int(last) + 1
    total = ledger.sql(
        "SELECT COALESCE(SUM(CASE WHEN kind = 'charge' THEN -amount_msat ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN kind = 'reserve' THEN 1 ELSE 0 END), 0) "
        "FROM ledger_entries WHERE id >= ? AND id < ?")
    out: list[Day] = []
    lo = int(first)
    for start in starts:
        end = start + DAY
        over = end + SETTLED_AFTER <= now
        cached = DAYS.get(ledger.url, start) if over else None
        if cached is not None:
            begin, stop, revenue, requests = cached
        else:
            begin = first_id_at(ledger, start, lo, top)
            stop = first_id_at(ledger, end, begin, top) if end <= now else top
            cur.execute(total, (begin, stop))
            revenue, requests = (int(v) for v in cur.fetchone())
            if over:
                DAYS.put(ledger.url, start, (begin, stop, revenue, requests))
        lo = max(lo, stop)
        out.append(Day(start, revenue, requests))
    return out


# --- figures --------------------------------------------------------------------------------


def key_stats(ledger: Ledger) -> dict[str, int]:
    cur = ledger.db.connection().cursor()
    cur.execute(
        "SELECT COUNT(*), COALESCE(SUM(balance_msat), 0), COALESCE(SUM(reserved_msat), 0), "
        "COALESCE(SUM(CASE WHEN backed THEN balance_msat ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN disabled THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN balance_msat > 0 THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(total_spent_msat), 0), COALESCE(SUM(total_requests), 0) FROM api_keys")
    (keys, balance, reserved, backed, disabled, funded, spent,
     requests) = (int(v) for v in cur.fetchone())
    cur.execute("SELECT COUNT(*) FROM reservations")
    in_flight = int(cur.fetchone()[0])
    cur.execute("SELECT COALESCE(SUM(msat), 0) FROM refunds WHERE state = 'pending'")
    refunds = int(cur.fetchone()[0])
    return {"keys": keys, "funded_keys": funded, "disabled_keys": disabled,
            "balance_msat": balance, "reserved_msat": reserved, "backed_msat": backed,
            "credit_msat": balance - backed, "spent_msat": spent, "requests": requests,
            "in_flight": in_flight, "pending_refunds_msat": refunds}


# --- keys -----------------------------------------------------------------------------------


def _key_state(row: Sequence[Any]) -> KeyState:
    return KeyState(row[0], int(row[1]), int(row[2]), int(row[3]), int(row[4]), float(row[5]),
                    None if row[6] is None else float(row[6]), row[7], row[8], bool(row[9]),
                    bool(row[10]))


def keys_page(ledger: Ledger, query: str = "", page: int = 1, per_page: int = 50) -> Page:
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
            where = "WHERE (key_hash >= ? AND key_hash < ?) OR LOWER(label) LIKE ? ESCAPE '\\'"
            params = [low, high, pattern]
    offset = (page - 1) * per_page
    cur = ledger.db.connection().cursor()
    cur.execute(ledger.sql(f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys {where} "
                           "ORDER BY created_at DESC, key_hash LIMIT ? OFFSET ?"),
                (*params, per_page + 1, offset))
    rows = [_key_state(r) for r in cur.fetchall()]
    more = len(rows) > per_page
    return Page(rows[:per_page], more, page + 1 if more else None)


def set_disabled(ledger: Ledger, key_hash: str, disabled: bool) -> bool:
    """Disable (or enable again) a key; False if there is no such key. A disabled key's
    requests are refused from the next one on (reservations check the flag)."""
    with ledger.transaction() as cur:
        cur.execute(ledger.sql("UPDATE api_keys SET disabled = ? WHERE key_hash = ?"),
                    (disabled, key_hash))
        return bool(cur.rowcount == 1)


# --- the journal ----------------------------------------------------------------------------


def journal_page(ledger: Ledger, key_prefix: str = "", kind: str = "",
                 before: int | None = None, per_page: int = 50) -> Page:
    """Journal rows, newest first, older than the id ``before``; filtered by the start of
    their key's id and by kind. Filtering by kind alone looks through at most
    ``KIND_SCAN_WINDOW`` ids per page (there is no index on kind): the next page goes on
    from where the look stopped."""
    cur = ledger.db.connection().cursor()
    conditions: list[str] = []
    params: list[Any] = []
    key_prefix = key_prefix.strip().lower()
    if key_prefix:
        if not is_hex_prefix(key_prefix):
            return Page([], False, note="A key id is made of the digits 0-9 and a-f.")
        low, high = _prefix_range(key_prefix)
        cur.execute(ledger.sql("SELECT key_hash FROM api_keys WHERE key_hash >= ? AND "
                               "key_hash < ? ORDER BY key_hash LIMIT 51"), (low, high))
        hashes = [r[0] for r in cur.fetchall()]
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
        cur.execute("SELECT MIN(id), MAX(id) FROM ledger_entries")
        first, last = cur.fetchone()
        if first is None:
            return Page([], False)
        top = min(before if before is not None else int(last) + 1, int(last) + 1)
        window_floor = max(int(first), top - KIND_SCAN_WINDOW)
        conditions.append("id >= ?")
        params.append(window_floor)
        floor_reached = window_floor <= int(first)
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    cur.execute(ledger.sql(f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM ledger_entries {where} "
                           "ORDER BY id DESC LIMIT ?"), (*params, per_page + 1))
    rows = [dict(zip(_ENTRY_COLUMNS, r, strict=True)) for r in cur.fetchall()]
    if len(rows) > per_page:
        return Page(rows[:per_page], True, int(rows[per_page - 1]["id"]))
    if window_floor is not None and not floor_reached:
        return Page(rows, True, window_floor,
                    note=f"Looked through {KIND_SCAN_WINDOW:,} rows; older ones are on the "
                         "next page.")
    return Page(rows, False)


# --- payouts --------------------------------------------------------------------------------


def payouts_page(ledger: Ledger, page: int = 1, per_page: int = 50) -> Page:
    cur = ledger.db.connection().cursor()
    cur.execute(ledger.sql(f"SELECT {', '.join(_PAYOUT_COLUMNS)} FROM payouts "
                           "ORDER BY created_at DESC, id LIMIT ? OFFSET ?"),
                (per_page + 1, (page - 1) * per_page))
    rows = [dict(zip(_PAYOUT_COLUMNS, r, strict=True)) for r in cur.fetchall()]
    more = len(rows) > per_page
    return Page(rows[:per_page], more, page + 1 if more else None)


def payout_totals(ledger: Ledger) -> dict[str, int]:
    """Sats paid out (amount + fees), by kind, and the count of payments still pending."""
    cur = ledger.db.connection().cursor()
    cur.execute("SELECT kind, COALESCE(SUM(amount + fee_paid), 0), COUNT(*) FROM payouts "
                "WHERE state = 'paid' GROUP BY kind")
    totals = {f"{kind}_sats": int(total) for kind, total, _ in cur.fetchall()}
    cur.execute("SELECT COUNT(*) FROM payouts WHERE state = 'pending'")
    totals["pending"] = int(cur.fetchone()[0])
    return totals
