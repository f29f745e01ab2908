"""Per-key limits and child keys in the ledger, on SQLite and PostgreSQL: what a limited key
may do, that a child spends its parent's balance within its own budget, and that the books
still balance."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from routstr_addon.ledger import Ledger, Limits, ReserveError, hash_key, parse_period
from routstr_addon.ledger.limits import budget_left, next_window, window_start


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    led = Ledger(database_url)
    yield led
    led.close()


def _refusal(ledger: Ledger, key_hash: str, amount: int, rid: str,
             model: str | None = "m") -> ReserveError:
    with pytest.raises(ReserveError) as e:
        ledger.reserve(key_hash, amount, rid, model)
    return e.value


def test_periods_parse_and_roll_over_on_utc_calendar() -> None:
    assert parse_period("1d") == "86400"
    assert parse_period("12h") == "43200"
    assert parse_period("daily") == "daily"
    assert parse_period("manual") is None
    with pytest.raises(ValueError):
        parse_period("fortnightly")
    now = 1_796_616_220.0  # a Monday afternoon, UTC
    assert window_start("daily", now) == 1_796_601_600.0
    assert next_window("daily", now) == 1_796_601_600.0 + 86400
    assert window_start("weekly", now) == window_start("daily", now)
    assert window_start("86400", now) == 1_796_601_600.0
    month = window_start("monthly", now)
    assert month is not None and month <= now < (next_window("monthly", now) or 0)
    limits = Limits(budget_msat=1000, period="daily")
    assert budget_left(limits, 900, now - 10, 0, now) == 100
    assert budget_left(limits, 900, now - 86400, 0, now) == 1000  # spent yesterday


def test_a_plain_key_is_untouched_by_limits(ledger: Ledger) -> None:
    _, state = ledger.create_key(10_000)
    assert not state.restricted
    ledger.reserve(state.key_hash, 1000, "r1", "m")
    assert ledger.settle("r1", 400) is not None
    assert ledger.key(state.key_hash).limit_spent_msat == 0  # type: ignore[union-attr]
    assert ledger.check() == []


def test_requests_per_minute_hold_and_say_when_to_come_back(ledger: Ledger) -> None:
    _, state = ledger.create_key(100_000)
    limited = ledger.set_limits(state.key_hash, Limits(rpm=3))
    assert limited is not None and limited.restricted
    for i in range(3):
        ledger.reserve(state.key_hash, 100, f"r{i}", "m")
        ledger.settle(f"r{i}", 50)
    refused = _refusal(ledger, state.key_hash, 100, "r3")
    assert refused.refused is not None and refused.refused.reason == "rate"
    assert 1 <= (refused.refused.retry_after or 0) <= 60
    # lifting the limit lets it through at once, on the plain path again
    lifted = ledger.set_limits(state.key_hash, Limits())
    assert lifted is not None and not lifted.restricted
    ledger.reserve(state.key_hash, 100, "r4", "m")
    assert ledger.check() == []


def test_concurrent_requests_are_counted_from_open_reservations(ledger: Ledger) -> None:
    _, state = ledger.create_key(100_000)
    ledger.set_limits(state.key_hash, Limits(concurrent=2))
    ledger.reserve(state.key_hash, 100, "a", "m")
    ledger.reserve(state.key_hash, 100, "b", "m")
    refused = _refusal(ledger, state.key_hash, 100, "c")
    assert refused.refused is not None and refused.refused.reason == "concurrency"
    ledger.release("a")
    ledger.reserve(state.key_hash, 100, "c", "m")
    assert ledger.check() == []


def test_models_outside_the_allow_list_are_refused(ledger: Ledger) -> None:
    _, state = ledger.create_key(100_000)
    ledger.set_limits(state.key_hash, Limits(models=("gpt-4o-mini",)))
    refused = _refusal(ledger, state.key_hash, 100, "x", model="gpt-4o")
    assert refused.refused is not None and refused.refused.reason == "model"
    ledger.reserve(state.key_hash, 100, "y", "gpt-4o-mini")


def test_a_budget_per_period_counts_charges_and_resets_by_itself(ledger: Ledger) -> None:
    _, state = ledger.create_key(100_000)
    ledger.set_limits(state.key_hash, Limits(budget_msat=1000, period="daily"))
    ledger.reserve(state.key_hash, 800, "a", "m")
    refused = _refusal(ledger, state.key_hash, 300, "b")  # 800 in flight count too
    assert refused.refused is not None and refused.refused.reason == "budget"
    assert refused.refused.retry_after is not None and refused.refused.retry_after > 0
    ledger.settle("a", 600)
    assert ledger.key(state.key_hash).limit_spent_msat == 600  # type: ignore[union-attr]
    ledger.reserve(state.key_hash, 400, "b", "m")
    ledger.settle("b", 400)
    _refusal(ledger, state.key_hash, 1, "c")
    # yesterday's spending no longer counts
    with ledger.transaction() as tx:
        tx.execute("UPDATE api_keys SET limit_window_start = ? WHERE key_hash = ?",
                   (time.time() - 2 * 86400, state.key_hash))
    ledger.reserve(state.key_hash, 1000, "d", "m")
    ledger.settle("d", 1000)
    assert ledger.key(state.key_hash).limit_spent_msat == 1000  # type: ignore[union-attr]
    assert ledger.check() == []


def test_child_keys_spend_the_parent_within_their_own_limit(ledger: Ledger) -> None:
    _, pstate = ledger.create_key(50_000)
    a, b = ledger.create_children(pstate.key_hash, 2, Limits(budget_msat=5000), None)
    ha, hb = hash_key(a), hash_key(b)
    child = ledger.key(ha)
    assert child is not None and child.parent_key_hash == pstate.key_hash
    assert child.restricted and child.balance_msat == 0
    held = ledger.reserve(ha, 3000, "c1", "m")
    assert held.available_msat == 47_000  # the parent's
    ledger.settle("c1", 2000)
    after = ledger.key(ha)
    assert after is not None
    assert (after.total_spent_msat, after.total_requests, after.limit_spent_msat) == (2000, 1,
                                                                                     2000)
    parent_after = ledger.key(pstate.key_hash)
    assert parent_after is not None and parent_after.balance_msat == 48_000
    refused = _refusal(ledger, ha, 3001, "c2")
    assert refused.refused is not None and refused.refused.reason == "budget"
    assert refused.refused.retry_after is None  # reset only by the parent
    assert not ledger.reset_child(hb, ha)  # not its parent
    assert ledger.reset_child(pstate.key_hash, ha)
    ledger.reserve(ha, 5000, "c2", "m")
    ledger.release("c2")
    assert {c.key_hash for c in ledger.children(pstate.key_hash)} == {ha, hb}
    assert ledger.check() == []


def test_children_racing_never_overdraw_their_parent(ledger: Ledger) -> None:
    _, pstate = ledger.create_key(10_000)
    children = [hash_key(k) for k in ledger.create_children(pstate.key_hash, 4, Limits(), None)]
    url = ledger.url
    won: list[str] = []

    def spend(child: str, n: int) -> None:
        led = Ledger(url, create=False)
        try:
            for i in range(8):
                rid = f"{child[:8]}-{n}-{i}"
                try:
                    led.reserve(child, 700, rid, "m")
                except ReserveError as e:
                    assert e.reason == "insufficient"
                    continue
                won.append(rid)
        finally:
            led.close()

    threads = [threading.Thread(target=spend, args=(c, n)) for n, c in enumerate(children)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 14  # 10,000 msat hold 14 reservations of 700, not one more
    for rid in won:
        ledger.settle(rid, 700)
    parent = ledger.key(pstate.key_hash)
    assert parent is not None and parent.balance_msat == 10_000 - 14 * 700
    assert sum(c.total_spent_msat for c in ledger.children(pstate.key_hash)) == 14 * 700
    assert ledger.check() == []


def test_keys_limit_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "UPSTREAM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()

    def run(*args: str) -> Any:
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    made = run("keys", "create", "--balance-sats", "100", "--rpm", "30", "--models",
               "a,b")
    assert made["limits"]["rpm"] == 30 and made["limits"]["models"] == ["a", "b"]
    key = made["api_key"]
    changed = run("keys", "limit", key, "--budget-sats", "5", "--period", "1d", "--rpm", "0")
    assert changed["limits"] == {"rpm": None, "concurrent": None, "models": ["a", "b"],
                                 "budget_msat": 5000, "period": "86400"}
    assert run("keys", "limit", key, "--clear")["limits"] is None
    bad = runner.invoke(app, ["keys", "limit", key, "--period", "fortnightly"])
    assert bad.exit_code == 2
    ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'routstr.sqlite'}")
    try:
        state = ledger.key(hash_key(key))
        assert state is not None and not state.restricted
    finally:
        ledger.close()


def test_a_childs_late_charge_is_paid_by_its_parent(ledger: Ledger) -> None:
    _, pstate = ledger.create_key(10_000)
    child = hash_key(ledger.create_children(pstate.key_hash, 1, Limits(budget_msat=5000),
                                            None)[0])
    ledger.reserve(child, 1000, "r", "m")
    ledger.settle("r", 1000)
    assert ledger.late_charge(child, "r", 300, "m", overrun=True) == 300
    parent = ledger.key(pstate.key_hash)
    after = ledger.key(child)
    assert parent is not None and parent.balance_msat == 10_000 - 1300
    assert after is not None and after.limit_spent_msat == 1300
    assert after.total_spent_msat == 1300 and after.total_requests == 1
    assert ledger.check() == []


def test_the_books_owe_what_the_parent_holds_once_children_spend(ledger: Ledger) -> None:
    parent = hash_key("sk-" + "e" * 64)
    with ledger.transaction(durable=True) as tx:
        ledger.create_key_in(tx, parent, 20_000, note="ecash", backed=True)
    child = hash_key(ledger.create_children(parent, 1, Limits(), None)[0])
    before = ledger.books().liabilities_msat
    ledger.reserve(child, 5000, "r", "m")
    ledger.settle("r", 3000)
    assert before == 20_000
    assert ledger.books().liabilities_msat == 17_000  # the parent's balance, nothing more
    assert ledger.check() == []
