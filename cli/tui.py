"""``routstr tui``: a live dashboard of the proxy, read from its ledger.

Two pure parts, so they can be tested and timed apart from the terminal:

* ``read_snapshot(ledger, …)`` reads what the screen shows, with bounded queries only. The
  journal may hold millions of rows and has no index on ``created_at``; its ids grow with time,
  so time windows are id ranges found by binary search on the primary key. A ``Tally`` carries
  the per-day revenue and per-minute request counts from one read to the next: the first read
  scans the 7-day window once, later ones only the rows added since (plus the last few seconds,
  in case a transaction that took its id earlier commits late).
* ``render(snapshot)`` builds the screen (a rich ``Layout``) from a snapshot alone.

The ``tui`` command runs them in one ``rich.live.Live`` on the alternate screen, refreshing
every second, reading keys from stdin in cbreak mode without blocking (``q`` quits, ``r``
refreshes now; Ctrl-C quits too) and restoring the terminal on the way out. The BTC/USD rate is
``BTC_USD_PRICE`` (shown as fixed) or fetched at start and every PRICE_REFRESH_INTERVAL seconds
in a background thread (shown with its age). No mint is asked anything.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.layout import Layout
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from routstr_addon.ledger import Books, Ledger, Tx
from routstr_addon.settings import Config

from .common import JsonOpt, console, err, load_config, open_ledger, sats
from .models import Rate, age_text, configured_rate, fetch_live_rate
from .stats import DAY
from .wallet import read_books

__all__ = ["RateWatcher", "Snapshot", "Tally", "read_snapshot", "render", "tui"]

WINDOW_DAYS = 7  # revenue: today and the 7 UTC days up to today
RATE_MINUTES = 15  # request rate: per minute over the last 15 minutes
SETTLE_SECONDS = 30.0  # rows younger than this are read again on every refresh
RECENT_SCAN = 10_000  # recent requests are looked for among the newest rows only
BOOKS_EVERY = 10.0  # the wallet's books (a sum over all keys) are read this often at most
SPARK = "▁▂▃▄▅▆▇█"


# --- the snapshot ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recent:
    """A finished request, from its charge or release row."""

    id: int
    at: float
    request_id: str | None
    key_id: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_msat: int
    status: str  # charged | swept | released
    note: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the dashboard shows, at one moment."""

    at: float
    name: str
    database: str
    journal_rows: int  # the newest id: about how many rows the journal holds
    requests_last_minute: int  # finished (charged or released) in the last 60 s
    per_minute: tuple[int, ...]  # finished per minute, oldest first, the current minute last
    requests_today: int  # charged
    revenue_today_msat: int
    requests_week: int
    revenue_week_msat: int
    recent: tuple[Recent, ...]
    reservations: int
    reserved_msat: int
    oldest_reservation: float | None
    books: Books
    books_at: float  # when the books were read (they are read every BOOKS_EVERY seconds)
    rate: Rate
    read_seconds: float = 0.0
    problem: str | None = None  # the last read failed (the figures are the previous read's)

    @property
    def per_second(self) -> tuple[float, ...]:
        """Requests per second in each minute of ``per_minute`` (the current one so far)."""
        if not self.per_minute:
            return ()
        elapsed = max(1.0, self.at % 60)
        return (*(n / 60 for n in self.per_minute[:-1]), self.per_minute[-1] / elapsed)

    def as_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["recent"] = [asdict(r) for r in self.recent]
        data["books"] = self.books.as_json()
        data["rate"] = self.rate.as_json()
        data["per_minute"] = list(self.per_minute)
        data["per_second"] = list(self.per_second)
        return data


@dataclass(slots=True)
class Tally:
    """Per-day charges and per-minute finished requests, counted from the journal up to
    ``mark``: what one read leaves for the next, so a refresh reads only the new rows."""

    mark: int = -1  # rows with id <= mark are counted; -1: nothing read yet
    days: dict[int, list[int]] = field(default_factory=dict)  # day -> [charges, revenue msat]
    minutes: dict[int, int] = field(default_factory=dict)  # minute -> finished requests
    books: Books | None = None
    books_at: float = 0.0

    def absorb(self, other: Tally) -> None:
        """Add ``other``'s counts to these."""
        for d, (n, r) in other.days.items():
            mine = self.days.setdefault(d, [0, 0])
            mine[0] += n
            mine[1] += r
        for m, n in other.minutes.items():
            self.minutes[m] = self.minutes.get(m, 0) + n

    def merged(self, other: Tally) -> Tally:
        both = Tally(other.mark, {d: list(v) for d, v in self.days.items()}, dict(self.minutes))
        both.absorb(other)
        return both

    def forget_before(self, first_day: int, first_minute: int) -> None:
        self.days = {d: v for d, v in self.days.items() if d >= first_day}
        self.minutes = {m: n for m, n in self.minutes.items() if m >= first_minute}


def _count(ledger: Ledger, tx: Tx, tally: Tally, low: int, high: int,
           minute_since: float) -> None:
    """Add the journal rows with ids in [low, high] to ``tally``: charges per day, finished
    requests per minute (those since ``minute_since``)."""
    if high < low:
        return
    reports = ledger.reports
    for d, (n, revenue) in reports.charges_per_day(tx, low, high).items():
        counted = tally.days.setdefault(d, [0, 0])
        counted[0] += n
        counted[1] += revenue
    start = reports.first_id_at(minute_since, low, high + 1, tx)
    for m, n in reports.finished_per_minute(tx, start, high, minute_since).items():
        tally.minutes[m] = tally.minutes.get(m, 0) + n


def _recent(ledger: Ledger, tx: Tx, high: int, limit: int) -> tuple[Recent, ...]:
    found = []
    for row in ledger.reports.recent_finished(tx, high, limit, RECENT_SCAN):
        note = row.note
        status = ("released" if row.kind == "release"
                  else "swept" if (note or "").startswith(("swept", "after its reservation"))
                  else "charged")
        found.append(Recent(row.id, row.at, row.request_id, row.key_hash[:12], row.model,
                            row.prompt_tokens, row.completion_tokens, -row.amount_msat, status,
                            note))
    return tuple(found)


def read_snapshot(ledger: Ledger, *, mints: Sequence[str] = (), rate: Rate | None = None,
                  tally: Tally | None = None, now: float | None = None, recent: int = 15,
                  name: str = "", books_every: float = BOOKS_EVERY) -> Snapshot:
    """What the dashboard shows, read with bounded queries only (see the module's doc).

    Pass the same ``tally`` to every call: the first read counts the revenue window once,
    later ones only what was added since. ``mints``: the trusted mints (CASHU_MINTS)."""
    started = time.perf_counter()
    now = time.time() if now is None else now
    tally = Tally() if tally is None else tally
    today = int(now // DAY)
    first_day = today - WINDOW_DAYS + 1
    this_minute = int(now // 60)
    first_minute = this_minute - RATE_MINUTES + 1
    reports = ledger.reports
    with ledger.snapshot() as tx:
        low, high = reports.id_bounds(tx)
        # Counted so far: up to the mark; on the first read, up to the window's first row.
        mark = (tally.mark if tally.mark >= 0
                else reports.first_id_at(first_day * DAY, low, high + 1, tx) - 1)
        # Rows older than a few seconds are counted once and for all; younger ones again on
        # every read (on PostgreSQL a row may commit after rows with larger ids).
        settled = max(mark, reports.first_id_at(now - SETTLE_SECONDS, mark + 1, high + 1,
                                                 tx) - 1)
        newly = Tally(mark=settled)
        _count(ledger, tx, newly, mark + 1, settled, first_minute * 60)
        fresh = Tally(mark=high)
        _count(ledger, tx, fresh, settled + 1, high, first_minute * 60)
        start = reports.first_id_at(now - 60, max(low, high - RECENT_SCAN * 10), high + 1, tx)
        last_minute = reports.finished_since(tx, start, now - 60)
        recent_rows = _recent(ledger, tx, high, recent)
        held, held_msat, oldest = reports.in_flight(tx)
    tally.absorb(newly)  # only now that every query succeeded: never counted twice
    tally.mark = settled
    tally.forget_before(first_day, first_minute)
    if tally.books is None or now - tally.books_at >= books_every:
        tally.books, tally.books_at = read_books(ledger, mints), now
    counted = tally.merged(fresh)
    week = [counted.days.get(d, [0, 0]) for d in range(first_day, today + 1)]
    return Snapshot(
        at=now,
        name=name,
        database=ledger.database.name,
        journal_rows=high,
        requests_last_minute=last_minute,
        per_minute=tuple(counted.minutes.get(m, 0)
                         for m in range(first_minute, this_minute + 1)),
        requests_today=week[-1][0],
        revenue_today_msat=week[-1][1],
        requests_week=sum(n for n, _ in week),
        revenue_week_msat=sum(r for _, r in week),
        recent=recent_rows,
        reservations=held,
        reserved_msat=held_msat,
        oldest_reservation=oldest,
        books=tally.books,
        books_at=tally.books_at,
        rate=rate or Rate(None, "none", error="not fetched"),
        read_seconds=time.perf_counter() - started,
    )


# --- the screen -----------------------------------------------------------------------------


def _clock(ts: float, now: float | None = None) -> str:
    """The time of day; with the date too when it is not ``now``'s day (UTC)."""
    moment = datetime.fromtimestamp(ts, UTC)
    if now is not None and int(ts // DAY) != int(now // DAY):
        return moment.strftime("%m-%d %H:%M")
    return moment.strftime("%H:%M:%S")


def sparkline(values: Sequence[float]) -> str:
    top = max(values, default=0)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, round(v / top * (len(SPARK) - 1)))]
                   for v in values)


def _usd(msat: int, rate: Rate) -> str:
    if rate.btc_usd is None:
        return ""
    usd = float(Fraction(msat, 10**11) * rate.btc_usd)
    return f" [dim]≈ ${usd:,.2f}[/dim]" if usd >= 1 or usd == 0 else f" [dim]≈ ${usd:.4f}[/dim]"


def _requests_panel(s: Snapshot) -> Panel:
    per_second = s.per_second
    lines = Table.grid(padding=(0, 1))
    lines.add_column(style="dim")
    lines.add_column()
    lines.add_row("last minute", f"[bold]{s.requests_last_minute:,}[/bold] requests "
                                 f"({s.requests_last_minute / 60:.2f}/s)")
    lines.add_row("now", f"{per_second[-1] if per_second else 0:.2f} req/s")
    lines.add_row(f"{len(per_second)} min", f"[cyan]{sparkline(per_second)}[/cyan]")
    lines.add_row("peak", f"{max(per_second, default=0):.2f} req/s")
    return Panel(lines, title="requests", border_style="cyan")


def _revenue_panel(s: Snapshot) -> Panel:
    lines = Table.grid(padding=(0, 1))
    lines.add_column(style="dim")
    lines.add_column(justify="right")
    lines.add_column()
    lines.add_row("today", f"[bold green]{sats(s.revenue_today_msat)}[/bold green] sats",
                  f"{s.requests_today:,} charged" + _usd(s.revenue_today_msat, s.rate))
    lines.add_row(f"{WINDOW_DAYS} days", f"[green]{sats(s.revenue_week_msat)}[/green] sats",
                  f"{s.requests_week:,} charged" + _usd(s.revenue_week_msat, s.rate))
    return Panel(lines, title="revenue (UTC days)", border_style="green")


def _rate_panel(s: Snapshot) -> Panel:
    rate = s.rate
    if rate.btc_usd is None:
        body = Text.from_markup(f"[red]no rate[/red]\n[dim]{escape(rate.error or '')}[/dim]")
    else:
        if rate.source == "live" and rate.updated_at is not None:
            age = f"live, {age_text(max(0.0, s.at - rate.updated_at))} ago"
        else:
            age = rate.source
        warn = f"\n[yellow]{escape(rate.error)}[/yellow]" if rate.error else ""
        per_sat = float(rate.btc_usd) / 1e8
        body = Text.from_markup(f"[bold]${float(rate.btc_usd):,.2f}[/bold]\n[dim]{age}[/dim]\n"
                                f"1 sat = ${per_sat:.6f}{warn}")
    return Panel(body, title="BTC/USD", border_style="yellow")


def _recent_panel(s: Snapshot) -> Panel:
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    for col, justify in (("time", "left"), ("request", "left"), ("key", "left"),
                         ("model", "left"), ("tokens in/out", "right"), ("cost sats", "right"),
                         ("status", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "status",  # type: ignore[arg-type]
                         overflow="ellipsis")
    colours = {"charged": "green", "swept": "yellow", "released": "cyan"}
    for r in s.recent:
        tokens = "" if r.prompt_tokens is None else f"{r.prompt_tokens:,}/{r.completion_tokens:,}"
        status = f"[{colours.get(r.status, 'white')}]{r.status}[/]"
        if r.note and r.status != "charged":
            status += f" [dim]{escape(r.note)}[/dim]"
        table.add_row(_clock(r.at, s.at), (r.request_id or "")[:8], r.key_id[:8],
                      escape(r.model or "-"), tokens, sats(r.cost_msat), status)
    if not s.recent:
        table.add_row("", "", "", "[dim]no requests yet[/dim]", "", "", "")
    return Panel(table, title="recent requests", border_style="blue")


def _reservations_panel(s: Snapshot) -> Panel:
    lines = Table.grid(padding=(0, 1))
    lines.add_column(style="dim")
    lines.add_column()
    lines.add_row("open", f"[bold]{s.reservations:,}[/bold] in flight")
    lines.add_row("held", f"{sats(s.reserved_msat)} sats")
    oldest = ("-" if s.oldest_reservation is None
              else f"{age_text(max(0.0, s.at - s.oldest_reservation))}")
    lines.add_row("oldest", oldest)
    return Panel(lines, title="reservations", border_style="magenta")


def _wallet_panel(s: Snapshot) -> Panel:
    b = s.books
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    table.add_column("mint", overflow="ellipsis", no_wrap=True)
    table.add_column("unit")
    table.add_column("proofs", justify="right")
    table.add_column("sats", justify="right")
    for m in b.holdings:
        name = escape(m.mint) + ("" if m.trusted else " [yellow](untrusted)[/yellow]")
        table.add_row(name, m.unit, f"{m.count:,}", sats(m.msat))
    if not b.holdings:
        table.add_row("[dim]no ecash (CASHU_MINTS is empty)[/dim]", "", "", "")
    colour = "green" if b.margin_msat >= 0 else "red"
    totals = Table.grid(padding=(0, 1))
    totals.add_column(style="dim")
    totals.add_column(justify="right")
    totals.add_column(style="dim")
    totals.add_row("proofs", f"{sats(b.proofs_msat)} sats", "held by the wallet")
    totals.add_row("liabilities", f"{sats(b.liabilities_msat)} sats",
                   f"keys {sats(b.keys_msat)} + refunds {sats(b.refunds_msat)}")
    if b.payouts:
        totals.add_row("payouts", f"{sats(b.payouts_msat)} sats", "under way")
    totals.add_row("margin", f"[bold {colour}]{sats(b.margin_msat)} sats[/]",
                   "proofs − liabilities − payouts")
    if b.credit_msat:
        totals.add_row("operator credit", f"{sats(b.credit_msat)} sats", "not owed in ecash")
    age = f" [dim]as of {_clock(s.books_at)}[/dim]" if s.books_at else ""
    return Panel(Group(table, totals), title=f"wallet: proofs vs liabilities{age}",
                 border_style="green" if b.margin_msat >= 0 else "red")


def render(s: Snapshot) -> Layout:
    """The dashboard for one snapshot (nothing is read here)."""
    layout = Layout(name="root")
    header = Text.from_markup(
        f"[bold reverse] ROUTSTR [/bold reverse] [bold]{escape(s.name)}[/bold]  "
        f"[dim]{s.database} · journal {s.journal_rows:,} rows · "
        f"{datetime.fromtimestamp(s.at, UTC):%Y-%m-%d %H:%M:%S} UTC · read in "
        f"{s.read_seconds * 1000:.0f} ms ·[/dim] [bold]q[/bold] quit"
        + (f"  [bold red]{escape(s.problem)}[/bold red]" if s.problem else ""))
    # borders 2, table header 2, one line per mint, totals 3 (+ operator credit)
    bottom_height = (7 + max(1, len(s.books.holdings)) + (1 if s.books.credit_msat else 0)
                     + (1 if s.books.payouts else 0))
    layout.split_column(Layout(header, name="header", size=1),
                        Layout(name="top", size=6),
                        Layout(_recent_panel(s), name="recent", ratio=1, minimum_size=5),
                        Layout(name="bottom", size=bottom_height))
    layout["top"].split_row(Layout(_requests_panel(s), name="requests", ratio=3),
                            Layout(_revenue_panel(s), name="revenue", ratio=4),
                            Layout(_rate_panel(s), name="rate", ratio=2))
    layout["bottom"].split_row(Layout(_reservations_panel(s), name="reservations", ratio=1),
                               Layout(_wallet_panel(s), name="wallet", ratio=3))
    return layout


# --- the rate, in the background ------------------------------------------------------------


class RateWatcher:
    """The live BTC/USD rate, fetched now and every ``interval`` seconds in a thread, the last
    good one kept when a fetch fails (its age shows it)."""

    def __init__(self, config: Config, interval: float | None = None,
                 fetch: Callable[[Config], Rate] = fetch_live_rate) -> None:
        self.config = config
        self.interval = float(interval or config.price_refresh_interval)
        self.fetch = fetch
        self.rate = Rate(None, "none", error="fetching…")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="btc-usd", daemon=True)

    def start(self) -> RateWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def current(self) -> Rate:
        return self.rate

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self.fetch(self.config)
            if got.btc_usd is not None or self.rate.btc_usd is None:
                self.rate = got
            else:  # keep the last good rate; say why it is getting old
                self.rate = replace(self.rate, error=f"refresh failed: {got.error}")
            self._stop.wait(self.interval if got.btc_usd is not None
                            else min(self.interval, 30.0))


# --- the terminal ---------------------------------------------------------------------------


@contextmanager
def keypresses() -> Iterator[Callable[[float], str]]:
    """``wait(timeout)``: the keys pressed within ``timeout`` seconds ("" if none). stdin is in
    cbreak mode meanwhile (keys arrive unbuffered, unechoed; Ctrl-C still interrupts) and its
    settings are restored on the way out. Without a terminal on stdin, it only waits."""
    if not sys.stdin.isatty():

        def sleep(timeout: float) -> str:
            time.sleep(max(0.0, timeout))
            return ""

        yield sleep
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)

        def wait(timeout: float) -> str:
            ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
            return os.read(fd, 64).decode(errors="ignore") if ready else ""

        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _visible_rows(mints: int = 1) -> int:
    """How many recent requests fit: the terminal less the header, the top row, the bottom
    row (which grows with the mints) and the recent panel's borders and header."""
    return max(3, console.size.height - 21 - max(1, mints))


def run_dashboard(ledger: Ledger, config: Config, rate: Callable[[], Rate],
                  interval: float) -> None:
    """The live screen until q or Ctrl-C."""
    from rich.live import Live

    tally = Tally()
    last: list[Snapshot] = []

    def read() -> Snapshot:
        try:
            snap = read_snapshot(ledger, mints=config.cashu_mints, rate=rate(), tally=tally,
                                 recent=_visible_rows(len(config.cashu_mints)),
                                 name=config.name)
        except Exception as e:  # the database went away: keep the screen, say so, retry
            ledger.disconnect()  # reconnected on the next read
            if not last:
                raise
            problem = f"reading the ledger failed: {e}".splitlines()[0][:120]
            return replace(last[0], at=time.time(), rate=rate(), problem=problem)
        last[:] = [snap]
        return snap

    with keypresses() as wait, Live(render(read()), console=console, screen=True,
                                    auto_refresh=False, transient=True) as live:
        next_at = time.monotonic() + interval
        while True:
            keys = wait(next_at - time.monotonic())
            if "q" in keys.lower() or keys == "\x1b":
                return
            if keys and "r" not in keys.lower() and time.monotonic() < next_at:
                continue
            live.update(render(read()), refresh=True)
            next_at = time.monotonic() + interval


def tui(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.2)] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (no live "
                                                      "screen).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A live dashboard: request rate, recent requests, revenue, reservations, the wallet's
    proofs against what users are owed, and the BTC/USD rate.

    Read from the ledger (safe while the proxy runs; no mint is asked). Keys: q (or Esc)
    quits, r refreshes now; Ctrl-C quits too. --json prints one snapshot for scripts.

    Exit codes: 0 done; 2 bad settings."""
    config = load_config()
    fixed = configured_rate(config)
    with open_ledger(config) as ledger:
        if once or as_json:
            current = fixed
            if current is None:
                with err.status("fetching the BTC/USD rate…"):
                    current = fetch_live_rate(config)
            snap = read_snapshot(ledger, mints=config.cashu_mints, rate=current,
                                 name=config.name,
                                 recent=20 if as_json else _visible_rows(len(config.cashu_mints)))
            if as_json:
                print(json.dumps(snap.as_json()))
            else:
                console.print(render(snap), height=max(30, console.size.height))
            return
        if fixed is not None:
            live_dashboard(ledger, config, constant(fixed), interval)
            return
        watcher = RateWatcher(config).start()
        try:
            live_dashboard(ledger, config, watcher.current, interval)
        finally:
            watcher.stop()


def constant(rate: Rate) -> Callable[[], Rate]:
    return lambda: rate


def live_dashboard(ledger: Ledger, config: Config, rate: Callable[[], Rate],
                   interval: float) -> None:
    """The live screen until q, Ctrl-C or SIGTERM (the terminal restored in every case)."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        run_dashboard(ledger, config, rate, interval)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
