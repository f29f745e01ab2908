"""``routstr stats``: requests and revenue per model and per day, from the journal.

The journal may hold millions of rows: ``Ledger.reports.charges_since`` reads only the id range
of the window (found by a binary search on the primary key; see ``routstr_addon.ledger.reports``).
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

__all__ = ["read_stats", "stats"]

DAY = 86400
MAX_DAYS = 3660


def day_name(day: int) -> str:
    return datetime.fromtimestamp(day * DAY, UTC).strftime("%Y-%m-%d")


def read_stats(ledger: Ledger, days: int, now: float | None = None) -> dict[str, Any]:
    """Charges (requests and revenue) of the last ``days`` UTC days, today included, per model,
    per day, and per model and day; read in one snapshot over the window's id range."""
    now = time.time() if now is None else now
    today = int(now // DAY)
    first_day = today - days + 1
    since = float(first_day * DAY)
    models: dict[str | None, dict[str, Any]] = {}
    per_day: dict[int, dict[str, Any]] = {d: {"day": day_name(d), "requests": 0, "revenue_msat": 0}
               for d in range(first_day, today + 1)}
    by_day_model: list[dict[str, Any]] = []
    for g in ledger.reports.charges_since(since):
        model, d, count, revenue = g.model, g.day, g.requests, g.revenue_msat
        m = models.setdefault(model, {"model": model, "requests": 0, "revenue_msat": 0,
                                      "prompt_tokens": 0, "completion_tokens": 0})
        m["requests"] += count
        m["revenue_msat"] += revenue
        m["prompt_tokens"] += g.prompt_tokens
        m["completion_tokens"] += g.completion_tokens
        if d in per_day:
            per_day[d]["requests"] += count
            per_day[d]["revenue_msat"] += revenue
        by_day_model.append({"day": day_name(d), "model": model, "requests": count,
                             "revenue_msat": revenue})
    by_day_model.sort(key=lambda r: (r["day"], -r["revenue_msat"], str(r["model"])))
    total_requests = sum(m["requests"] for m in models.values())
    total_revenue = sum(m["revenue_msat"] for m in models.values())
    overruns, overrun_msat = ledger.reports.overruns_since(since)
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
        # Requests that cost more than was reserved for them (the excess is charged on top,
        # as far as the key could pay): each one is a pricing rule to fix.
        "under_reservations": overruns,
        "under_reserved_msat": overrun_msat,
        # Other Routstr nodes paid per request: what users were charged for the requests each
        # served, what it was paid (tokens less change), change it kept, and the margin.
        "nodes": [t.as_json() for t in ledger.nodes.totals(since)],
    }


def stats(
    days: Annotated[int, typer.Option(help="How many UTC days, today included.", min=1,
                                      max=MAX_DAYS)] = 7,
    as_json: JsonOpt = False,
) -> None:
    """Requests and revenue in sats per model and per day, from the journal's charges; with
    other Routstr nodes as providers, revenue, cost, margin and losses per node.

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
    if data["nodes"]:
        nodes = Table(title="other Routstr nodes paid", title_justify="left")
        nodes.add_column("provider", overflow="fold")
        for col in ("requests", "revenue sats", "cost sats", "margin sats", "lost sats"):
            nodes.add_column(col, justify="right")
        for n in data["nodes"]:
            nodes.add_row(escape(n["provider"]), f"{n['requests']:,}", sats(n["revenue_msat"]),
                          sats(n["cost_msat"]), f"[green]{sats(n['margin_msat'])}[/green]",
                          sats(n["loss_msat"]) if n["loss_msat"] else "-")
        console.print(nodes)
    if data["under_reservations"]:
        console.print(f"[red]under-reservations: {data['under_reservations']:,} request(s) cost "
                      f"more than was reserved ({sats(data['under_reserved_msat'])} sats charged "
                      "beyond their reservations)[/red]")
