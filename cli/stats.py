"""``routstr stats``: requests and revenue per model and per day, from the journal.

The journal (``ledger_entries``) may hold millions of rows and has no index on ``created_at``:
its ``id`` grows with time, so a time window is found as an id range (a binary search on the
primary key, a few dozen index probes) and only the rows of that range are read.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from routstr_addon.ledger import Ledger

from .common import JsonOpt, console, open_ledger, sats

__all__ = ["bucket_sql", "first_id_since", "id_bounds", "read_stats", "stats"]

DAY = 86400
MAX_DAYS = 3660


def bucket_sql(ledger: Ledger, seconds: int, column: str = "created_at") -> str:
    """SQL for the whole number of ``seconds`` periods since the epoch (UTC days, minutes)."""
    if ledger.is_sqlite:  # created_at is positive: truncation is floor
        return f"CAST({column} / {seconds} AS INTEGER)"
    return f"CAST(FLOOR({column} / {seconds}) AS BIGINT)"


def id_bounds(ledger: Ledger, cur: Any) -> tuple[int, int]:
    """The journal's smallest and largest id (0, 0 when empty): two primary-key lookups."""
    # Two subqueries: SQLite reads MIN or MAX from the primary key only when alone in a query.
    cur.execute("SELECT (SELECT MIN(id) FROM ledger_entries), "
                "(SELECT MAX(id) FROM ledger_entries)")
    low, high = cur.fetchone()
    return (0, 0) if low is None else (int(low), int(high))


def first_id_since(ledger: Ledger, cur: Any, since: float, low: int, high: int) -> int:
    """The first id in [low, high] of a row made at ``since`` or later; ``high + 1`` if none.

    Ids grow with time, so this is a binary search on the primary key: each probe reads one
    row through the index, about log2(high - low) probes in all, whatever the journal holds.
    """
    probe = ledger.sql("SELECT id, created_at FROM ledger_entries WHERE id >= ? AND id <= ? "
                       "ORDER BY id LIMIT 1")
    found = high + 1
    while low <= high:
        middle = (low + high) // 2
        cur.execute(probe, (middle, high))
        row = cur.fetchone()
        if row is None:  # no row in [middle, high]
            high = middle - 1
        elif float(row[1]) >= since:
            found = int(row[0])
            high = middle - 1
        else:
            low = int(row[0]) + 1
    return found


def day_name(day: int) -> str:
    return datetime.fromtimestamp(day * DAY, UTC).strftime("%Y-%m-%d")


def read_stats(ledger: Ledger, days: int, now: float | None = None) -> dict[str, Any]:
    """Charges (requests and revenue) of the last ``days`` UTC days, today included, per model,
    per day, and per model and day; read in one snapshot over the window's id range."""
    from .wallet import snapshot

    now = time.time() if now is None else now
    today = int(now // DAY)
    first_day = today - days + 1
    since = float(first_day * DAY)
    day = bucket_sql(ledger, DAY)
    with snapshot(ledger) as cur:
        low, high = id_bounds(ledger, cur)
        start = first_id_since(ledger, cur, since, low, high) if high else 1
        cur.execute(ledger.sql(
            f"SELECT model, {day}, COUNT(*), COALESCE(SUM(-amount_msat), 0), "
            "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
            "FROM ledger_entries WHERE id >= ? AND kind = 'charge' AND created_at >= ? "
            f"GROUP BY model, {day}"), (start, since))
        rows = [(m, int(d), int(n), int(r), int(p), int(c)) for m, d, n, r, p, c in cur.fetchall()]
    models: dict[str | None, dict[str, Any]] = {}
    per_day: dict[int, dict[str, Any]] = {d: {"day": day_name(d), "requests": 0, "revenue_msat": 0}
               for d in range(first_day, today + 1)}
    by_day_model = []
    for model, d, count, revenue, prompt, completion in rows:
        m = models.setdefault(model, {"model": model, "requests": 0, "revenue_msat": 0,
                                      "prompt_tokens": 0, "completion_tokens": 0})
        m["requests"] += count
        m["revenue_msat"] += revenue
        m["prompt_tokens"] += prompt
        m["completion_tokens"] += completion
        if d in per_day:
            per_day[d]["requests"] += count
            per_day[d]["revenue_msat"] += revenue
        by_day_model.append({"day": day_name(d), "model": model, "requests": count,
                             "revenue_msat": revenue})
    by_day_model.sort(key=lambda r: (r["day"], -r["revenue_msat"], str(r["model"])))
    total_requests = sum(m["requests"] for m in models.values())
    total_revenue = sum(m["revenue_msat"] for m in models.values())
    return {
        "days": days,
        "since": since,
        "until": now,
        "requests": total_requests,
        "revenue_msat": total_revenue,
        "revenue_sats": total_revenue / 1000,
        "models": sorted(models.values(), key=lambda m: (-m["revenue_msat"], str(m["model"]))),
        "per_day": list(per_day.values()),
        "per_day_model": by_day_model,
    }


def stats(
    days: Annotated[int, typer.Option(help="How many UTC days, today included.", min=1,
                                      max=MAX_DAYS)] = 7,
    as_json: JsonOpt = False,
) -> None:
    """Requests and revenue in sats per model and per day, from the journal's charges.

    Revenue is what requests were charged (the journal's 'charge' rows), whoever funded the
    key; amounts in the JSON are msat. The window is whole UTC days, today included.

    Exit codes: 0 shown (an empty window too); 2 bad input or settings."""
    with open_ledger() as ledger:
        data = read_stats(ledger, days)
    if as_json:
        print(json.dumps(data))
        return
    total = data["revenue_msat"]
    table = Table(title=f"per model, last {days} day(s): {data['requests']:,} requests, "
                        f"{sats(total)} sats", title_justify="left")
    table.add_column("model", overflow="fold")
    for col in ("requests", "tokens in", "tokens out", "revenue sats", "share"):
        table.add_column(col, justify="right")
    for m in data["models"]:
        share = f"{100 * m['revenue_msat'] / total:.1f}%" if total else "-"
        table.add_row(escape(m["model"] or "(no model)"), f"{m['requests']:,}",
                      f"{m['prompt_tokens']:,}", f"{m['completion_tokens']:,}",
                      f"[green]{sats(m['revenue_msat'])}[/green]", share)
    console.print(table)
    top = max((d["revenue_msat"] for d in data["per_day"]), default=0)
    daily = Table(title="per day (UTC)", title_justify="left")
    daily.add_column("day")
    daily.add_column("requests", justify="right")
    daily.add_column("revenue sats", justify="right")
    daily.add_column("", no_wrap=True)
    for d in data["per_day"]:
        bar = "█" * round(30 * d["revenue_msat"] / top) if top else ""
        daily.add_row(d["day"], f"{d['requests']:,}", sats(d["revenue_msat"]),
                      f"[green]{bar}[/green]")
    console.print(daily)
