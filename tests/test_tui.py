"""`routstr tui`: ``read_snapshot`` against figures recomputed from the database (SQLite and
PostgreSQL), ``render`` showing them, the incremental tally, a journal of a million rows read
and drawn in well under a second, and the live screen quitting on q or Ctrl-C with the terminal
restored."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import termios
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cli import tui
from cli.main import app
from cli.models import Rate
from cli.stats import DAY
from cli.tui import Snapshot, Tally, read_snapshot, render
from routstr_addon.ledger import Ledger, Tx

from .conftest import BIN

MINT = "http://mint.test"
RATE = Rate(Fraction(100_000), "fixed")


def text_of(snapshot: Snapshot, width: int = 160, height: int = 48) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO(),
                      color_system=None)
    console.print(render(snapshot))
    return console.export_text()


def add_proof(ledger: Ledger, tx: Tx, secret: str, amount: int, state: str,
              mint: str = MINT, unit: str = "sat") -> None:
    now = time.time()
    tx.execute(
        "INSERT INTO proofs (secret, mint, unit, keyset_id, amount, c, dleq, state, owner, "
        "created_at, updated_at) VALUES (?, ?, ?, '00', ?, '02', NULL, ?, NULL, ?, ?)",
        (secret, mint, unit, amount, state, now, now))


def populate(ledger: Ledger) -> dict[str, Any]:
    """Keys, charged and released requests, open reservations and proofs; what was made."""
    with ledger.transaction() as tx:  # an old charge first (ids grow with time)
        tx.execute(
            "INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, reserved_msat, "
            "request_id, model, prompt_tokens, completion_tokens, note) "
            "VALUES (?, 'gone', 'charge', -50000, 0, 'old', 'old/model', 1, 1, NULL)",
            (time.time() - 20 * DAY,))
    _, operator_key = ledger.create_key(200_000, label="operator")
    with ledger.transaction(durable=True) as tx:
        ledger.create_key_in(tx, "b" * 64, 300_000, note="token", backed=True)
        add_proof(ledger, tx, "p1", 256, "unspent")
        add_proof(ledger, tx, "p2", 64, "held")
        add_proof(ledger, tx, "p3", 16, "reserved")
        add_proof(ledger, tx, "p4", 1024, "sent")  # handed out: not the proxy's any more
        add_proof(ledger, tx, "p5", 2000, "unspent", mint="http://other.test", unit="msat")
    charges = [("test/alpha", 1234, 10, 20), ("test/alpha", 2000, 30, 40),
               ("test/beta", 777, 5, 6)]
    for i, (model, cost, pt, ct) in enumerate(charges):
        key = operator_key.key_hash if i % 2 else "b" * 64
        ledger.reserve(key, 10_000, f"req-{i}", model)
        ledger.settle(f"req-{i}", cost, model=model, prompt_tokens=pt, completion_tokens=ct)
    ledger.reserve(operator_key.key_hash, 10_000, "req-failed", "test/beta")
    ledger.release("req-failed", "upstream answered 500")
    ledger.reserve(operator_key.key_hash, 4_000, "open-1", "test/alpha")
    ledger.reserve("b" * 64, 6_000, "open-2", "test/beta")
    return {"charges": charges, "revenue": sum(c for _, c, _, _ in charges)}


def test_snapshot_and_screen_show_the_ledger(database_url: str) -> None:
    ledger = Ledger(database_url)
    try:
        made = populate(ledger)
        snap = read_snapshot(ledger, mints=[MINT], rate=RATE, name="Test proxy")
    finally:
        ledger.close()
    revenue = made["revenue"]
    assert snap.revenue_week_msat == revenue  # the 20-day-old charge is outside the window
    assert snap.requests_week == 3
    assert (snap.revenue_today_msat, snap.requests_today) in ((revenue, 3), (0, 0))  # midnight
    assert snap.requests_last_minute == 4  # charged or released
    assert sum(snap.per_minute) == 4 and len(snap.per_minute) == 15
    assert [r.request_id for r in snap.recent] == ["req-failed", "req-2", "req-1", "req-0",
                                                   "old"]
    assert [r.status for r in snap.recent] == ["released", "charged", "charged", "charged",
                                               "charged"]
    assert [r.cost_msat for r in snap.recent] == [0, 777, 2000, 1234, 50_000]
    assert (snap.recent[1].model, snap.recent[1].prompt_tokens) == ("test/beta", 5)
    assert (snap.reservations, snap.reserved_msat) == (2, 10_000)
    books = snap.books
    assert [(m.mint, m.unit, m.count, m.amount, m.trusted) for m in books.holdings] == [
        (MINT, "sat", 3, 336, True), ("http://other.test", "msat", 1, 2000, False)]
    assert books.proofs_msat == 336_000 + 2_000
    backed = 300_000 - 1234 - 777  # the token-funded key paid requests 0 and 2
    assert books.keys_msat == backed == books.liabilities_msat
    assert books.credit_msat == 200_000 - 2000
    assert books.margin_msat == 338_000 - backed

    text = text_of(snap)
    assert "Test proxy" in text
    assert f"{revenue / 1000:,.3f} sats" in text  # 7 days (and today)
    assert "3 charged" in text
    assert "4 requests" in text  # the last minute
    for needle in ("test/alpha", "test/beta", "req-fail", "upstream answered 500", "released",
                   "30/40", "2.000", "0.777", "1.234", "2 in flight", "10.000 sats", MINT,
                   "(untrusted)", "338.000 sats", f"{backed / 1000:,.3f} sats",
                   f"{(338_000 - backed) / 1000:,.3f} sats", "$100,000.00", "fixed"):
        assert needle in text, needle
    assert json.loads(json.dumps(snap.as_json()))["books"]["margin_msat"] == books.margin_msat


def test_the_tally_reads_only_new_rows_and_keeps_the_figures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        made = populate(ledger)
        tally = Tally()
        first = read_snapshot(ledger, rate=RATE, tally=tally)
        # Rows younger than the settling window are counted again on every read, not kept.
        assert tally.mark < first.journal_rows
        monkeypatch.setattr(tui, "SETTLE_SECONDS", 0.0)
        second = read_snapshot(ledger, rate=RATE, tally=tally)
        assert tally.mark == second.journal_rows  # counted once for all
        _, key = ledger.create_key(50_000)
        ledger.reserve(key.key_hash, 5_000, "req-new", "test/gamma")
        ledger.settle("req-new", 4321, model="test/gamma", prompt_tokens=1, completion_tokens=1)
        now = time.time()
        recent = tui._recent

        def fail(*args: Any) -> Any:
            raise RuntimeError("the database went away")

        monkeypatch.setattr(tui, "_recent", fail)  # a read failing after the counts
        with pytest.raises(RuntimeError):
            read_snapshot(ledger, rate=RATE, tally=tally, now=now)
        monkeypatch.setattr(tui, "_recent", recent)
        third = read_snapshot(ledger, rate=RATE, tally=tally, now=now)  # nothing counted twice
        assert tally.mark == third.journal_rows == second.journal_rows + 3
        fresh = read_snapshot(ledger, rate=RATE, now=now)  # all from scratch
    finally:
        ledger.close()
    assert first.revenue_week_msat == second.revenue_week_msat == made["revenue"]
    assert first.requests_week == second.requests_week == 3
    assert third.revenue_week_msat == made["revenue"] + 4321 == fresh.revenue_week_msat
    assert third.requests_week == fresh.requests_week == 4
    assert third.per_minute == fresh.per_minute and sum(third.per_minute) == 5
    assert third.recent[0].request_id == "req-new" and third.recent[0].model == "test/gamma"


def test_a_million_journal_rows_are_read_and_drawn_in_under_a_second(tmp_path: Path) -> None:
    """The journal's time windows are id ranges: with a million rows, all in the revenue
    window (the worst case), a first read and a render take well under a second, a refresh a
    few milliseconds."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'big.sqlite'}")
    try:
        _, key = ledger.create_key(10**12)
        now = time.time()
        n = 1_000_000
        requests = n // 2
        start = now - 6 * DAY + 3600  # six days of traffic, up to now
        step = (now - 10 - start) / requests
        models = ("openai/gpt-4o", "anthropic/claude-sonnet-4", "meta-llama/llama-3.3-70b")

        def rows() -> Any:
            for i in range(requests):
                at = start + i * step
                rid = f"r{i:07d}"
                model = models[i % 3]
                yield (at, key.key_hash, "reserve", 0, 9000, rid, model, None, None, None)
                if i % 50:
                    yield (at + 0.5, key.key_hash, "charge", -(1000 + i % 997), -9000, rid,
                           model, 100 + i % 13, 200 + i % 17, None)
                else:
                    yield (at + 0.5, key.key_hash, "release", 0, -9000, rid, model, None, None,
                           "upstream answered 500")

        built = time.perf_counter()
        conn = ledger.db.connection()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, reserved_msat, "
            "request_id, model, prompt_tokens, completion_tokens, note) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
        conn.execute("COMMIT")
        built = time.perf_counter() - built
        cur = conn.cursor()
        cur.execute("SELECT COUNT(*) FROM ledger_entries")
        assert cur.fetchone()[0] == n + 1

        started = time.perf_counter()
        tally = Tally()
        snap = read_snapshot(ledger, rate=RATE, tally=tally, now=now)
        screen = text_of(snap)
        first = time.perf_counter() - started

        started = time.perf_counter()
        again = read_snapshot(ledger, rate=RATE, tally=tally, now=now + 1)
        text_of(again)
        refresh = time.perf_counter() - started

        day = int(now // DAY)
        cur.execute("SELECT COUNT(*), SUM(-amount_msat) FROM ledger_entries "
                    "WHERE kind = 'charge' AND created_at >= ?", ((day - 6) * DAY,))
        count, revenue = cur.fetchone()
        cur.execute("SELECT COUNT(*), SUM(-amount_msat) FROM ledger_entries "
                    "WHERE kind = 'charge' AND created_at >= ?", (day * DAY,))
        count_today, revenue_today = cur.fetchone()
        cur.execute("SELECT COUNT(*) FROM ledger_entries WHERE kind IN ('charge', 'release') "
                    "AND created_at >= ?", (now - 60,))
        last_minute = cur.fetchone()[0]
    finally:
        ledger.close()
    print(f"\n1M journal rows: built in {built:.1f} s; first read + render {first * 1000:.0f} ms "
          f"(read {snap.read_seconds * 1000:.0f} ms); refresh {refresh * 1000:.1f} ms")
    assert (snap.requests_week, snap.revenue_week_msat) == (count, revenue)
    assert (snap.requests_today, snap.revenue_today_msat) == (count_today, revenue_today or 0)
    assert snap.requests_last_minute == last_minute > 0
    assert (again.requests_week, again.revenue_week_msat) == (count, revenue)
    assert f"{revenue / 1000:,.3f}" in screen
    assert len(snap.recent) == 15 and "anthropic/claude-sonnet-4" in screen
    assert first < 1.0, f"first read and render took {first:.2f} s"
    assert refresh < 0.25, f"a refresh took {refresh:.2f} s"


# --- the command ----------------------------------------------------------------------------


runner = CliRunner()


def test_tui_json_and_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("BTC_USD_PRICE", "100000")
    monkeypatch.setenv("CASHU_MINTS", MINT)
    ledger = Ledger(url)
    try:
        made = populate(ledger)
    finally:
        ledger.close()
    result = runner.invoke(app, ["tui", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["revenue_week_msat"] == made["revenue"] and data["reservations"] == 2
    assert data["rate"] == {"btc_usd": 100000.0, "source": "fixed", "updated_at": None,
                            "error": None}
    assert data["books"]["proofs_msat"] == 338_000
    once = runner.invoke(app, ["tui", "--once"])
    assert once.exit_code == 0, once.output
    assert "recent requests" in once.stdout and "test/alpha" in once.stdout


def _spawn_tui(tmp_path: Path, url: str) -> tuple[subprocess.Popen[bytes], int, int,
                                                    list[bytes]]:
    """``routstr tui`` on a pseudo-terminal of 40×140 that is its controlling terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TERM": "xterm-256color",
           "DATABASE_URL": url, "BTC_USD_PRICE": "100000"}
    proc = subprocess.Popen([str(BIN / "routstr"), "tui", "--interval", "0.3"], cwd=tmp_path,
                            env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=controlling_tty)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    data = os.read(master, 65536)
                    if not data:
                        return
                    chunks.append(data)
                elif proc.poll() is not None:
                    return
            except OSError:
                return

    threading.Thread(target=drain, daemon=True).start()
    return proc, master, slave, chunks


def _wait_for(chunks: list[bytes], needle: bytes, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while needle not in b"".join(chunks):
        assert time.monotonic() < deadline, b"".join(chunks)[-2000:]
        time.sleep(0.05)


@pytest.mark.parametrize("keys", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_live_screen_quits_and_restores_the_terminal(tmp_path: Path, keys: bytes) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger(url)
    try:
        populate(ledger)
    finally:
        ledger.close()
    proc, master, slave, chunks = _spawn_tui(tmp_path, url)
    try:
        _wait_for(chunks, b"recent requests")
        _wait_for(chunks, b"test/alpha")
        shown = len(b"".join(chunks))
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # cbreak while it runs
        time.sleep(0.7)  # it refreshes meanwhile
        assert len(b"".join(chunks)) > shown
        os.write(master, keys)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    output = b"".join(chunks)
    assert b"\x1b[?1049h" in output and b"\x1b[?1049l" in output  # alternate screen, left
    assert b"Traceback" not in output
    lflag = termios.tcgetattr(slave)[3]
    assert lflag & termios.ICANON and lflag & termios.ECHO  # line mode and echo again
    os.close(master)
    os.close(slave)


def test_the_rate_watcher_keeps_the_last_good_rate_and_shows_its_age(tmp_path: Path) -> None:
    from dataclasses import replace

    from cli.tui import RateWatcher
    from routstr_addon.settings import load_config

    fetched_at = time.time() - 125
    answers = [Rate(Fraction(90_000), "live", fetched_at), Rate(None, "none", error="down")]
    calls: list[int] = []

    def fetch(config: Any) -> Rate:
        calls.append(1)
        return answers[min(len(calls), 2) - 1]

    watcher = RateWatcher(load_config({}), interval=0.05, fetch=fetch).start()
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        watcher.stop()
    rate = watcher.current()
    assert rate.btc_usd == 90_000 and rate.updated_at == fetched_at
    assert rate.error == "refresh failed: down"
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        snap = read_snapshot(ledger, rate=rate)
    finally:
        ledger.close()
    text = text_of(snap)
    assert "$90,000.00" in text and "live, 2 min ago" in text and "refresh failed" in text
    none = text_of(replace(snap, rate=Rate(None, "none", error="no source answered")))
    assert "no rate" in none and "no source answered" in none
