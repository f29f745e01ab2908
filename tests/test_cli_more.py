"""The rest of the `routstr` CLI: `keys topup|disable|enable|refund`, `models list`, `stats` and
`demo`, checked against the ledger after real requests through the proxy (and a real mint for
refunds), and their exit codes.

The proxies are shared with other tests: assertions are about what each test changes (before and
after), or are recomputed from the database, never global totals assumed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from typer.testing import CliRunner, Result

from cli.main import app
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ledger import Ledger, ReserveError, hash_key

from .conftest import (
    BIN,
    EXCHANGE_FEE,
    MODELS,
    PROVIDER_FEE,
    RATE,
    Output,
    Proxy,
    books_balance,
    expected_msat,
    raw,
)
from .ecash_user import UserWallet

runner = CliRunner()

MODEL = "test/model"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "counted by stats"}]


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def run_json(*args: str) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def on_proxy(proxy: Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Proxy:
    """The CLI pointed at the shared proxy's ledger, from a folder with no .env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", proxy.database_url)
    monkeypatch.delenv("UPSTREAM_BASE_URL", raising=False)
    monkeypatch.delenv("CASHU_MINTS", raising=False)
    return proxy


@pytest.fixture
def on_ecash_proxy(ecash_proxy: Proxy, mint: LocalMint, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """The CLI pointed at the ecash proxy's ledger and mint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", ecash_proxy.database_url)
    monkeypatch.setenv("CASHU_MINTS", mint.url)
    monkeypatch.setenv("SWAP_UNTRUSTED_MINTS", "false")
    monkeypatch.delenv("UPSTREAM_BASE_URL", raising=False)
    yield ecash_proxy
    ecash_proxy.wait_settled()


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI on a ledger of its own, with the test models and a fixed rate."""
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "UPSTREAM_BASE_URL", "CASHU_MINTS", "BTC_USD_SOURCES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    models = tmp_path / "models.json"
    models.write_text(json.dumps(MODELS))
    monkeypatch.setenv("MODELS_PATH", str(models))
    monkeypatch.setenv("BTC_USD_PRICE", RATE)
    monkeypatch.setenv("EXCHANGE_FEE", EXCHANGE_FEE)
    monkeypatch.setenv("UPSTREAM_PROVIDER_FEE", PROVIDER_FEE)
    return tmp_path


def charges_in_db(proxy: Proxy, since: float) -> dict[str | None, tuple[int, int]]:
    """(count, msat) of the journal's charge rows since ``since``, per model, read directly."""
    ledger = proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT model, COUNT(*), SUM(-amount_msat) FROM ledger_entries "
                               "WHERE kind = 'charge' AND created_at >= ? GROUP BY model",
                    (since,))
        return {m: (int(n), int(s)) for m, n, s in cur.fetchall()}
    finally:
        ledger.close()


def model_row(data: dict[str, Any], model: str) -> dict[str, Any]:
    return next((m for m in data["models"] if m["model"] == model),
                {"model": model, "requests": 0, "revenue_msat": 0, "prompt_tokens": 0,
                 "completion_tokens": 0})


# --- stats ----------------------------------------------------------------------------------


def test_stats_counts_a_paid_request_with_the_exact_revenue_of_its_charge(
        on_proxy: Proxy) -> None:
    proxy = on_proxy
    before = run_json("stats", "--days", "2")
    key = proxy.new_key(sats=50)
    completion = proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.usage is not None
    proxy.wait_settled()
    after = run_json("stats", "--days", "2")

    cost = expected_msat(MODEL, completion.usage.prompt_tokens,
                         completion.usage.completion_tokens)
    ledger = proxy.ledger()
    try:
        charge = [e for e in ledger.entries(hash_key(key)) if e["kind"] == "charge"]
    finally:
        ledger.close()
    assert [-e["amount_msat"] for e in charge] == [cost]
    row, was = model_row(after, MODEL), model_row(before, MODEL)
    assert row["requests"] - was["requests"] == 1
    assert row["revenue_msat"] - was["revenue_msat"] == cost
    assert row["prompt_tokens"] - was["prompt_tokens"] == completion.usage.prompt_tokens
    assert after["revenue_msat"] - before["revenue_msat"] == cost

    # Every figure is the journal's charge rows of the window, read directly.
    db = charges_in_db(proxy, after["since"])
    assert {m["model"]: (m["requests"], m["revenue_msat"]) for m in after["models"]} == db
    assert after["requests"] == sum(n for n, _ in db.values())
    assert after["revenue_msat"] == sum(s for _, s in db.values())
    assert after["revenue_sats"] == after["revenue_msat"] / 1000
    assert [d["day"] for d in after["per_day"]] == sorted(d["day"] for d in after["per_day"])
    assert len(after["per_day"]) == 2
    assert sum(d["revenue_msat"] for d in after["per_day"]) == after["revenue_msat"]
    assert sum(r["revenue_msat"] for r in after["per_day_model"] if r["model"] == MODEL) \
        == row["revenue_msat"]

    human = invoke("stats", "--days", "2")
    assert human.exit_code == 0, human.output
    assert MODEL in human.stdout
    assert f"{row['revenue_msat'] / 1000:,.3f}" in human.stdout


def test_stats_on_sqlite_and_postgresql_counts_only_the_window(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", database_url)
    ledger = Ledger(database_url)
    now = time.time()
    try:
        _, state = ledger.create_key(100_000)
        with ledger.transaction() as tx:  # an old charge: 40 days ago, outside a 30-day window
            tx.execute(
                "INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, "
                "reserved_msat, request_id, model, prompt_tokens, completion_tokens, note) "
                "VALUES (?, ?, 'charge', -777, 0, 'old', 'a/model', 1, 1, NULL)",
                (now - 40 * 86400, state.key_hash))
        costs = {"a/model": [1234, 1], "b/model": [999]}
        n = 0
        for model, amounts in costs.items():
            for amount in amounts:
                ledger.reserve(state.key_hash, 5000, f"r{n}", model)
                ledger.settle(f"r{n}", amount, model=model, prompt_tokens=10,
                              completion_tokens=amount % 7)
                n += 1
        ledger.reserve(state.key_hash, 5000, "failed", "b/model")
        ledger.release("failed", "upstream answered 500")  # not a charge
    finally:
        ledger.close()
    data = run_json("stats", "--days", "30")
    assert data["requests"] == 3 and data["revenue_msat"] == 1234 + 1 + 999
    assert [(m["model"], m["requests"], m["revenue_msat"], m["prompt_tokens"])
            for m in data["models"]] == [("a/model", 2, 1235, 20), ("b/model", 1, 999, 10)]
    assert len(data["per_day"]) == 30
    assert data["per_day"][-1]["revenue_msat"] in (0, 2234)  # 0 only across midnight UTC
    assert sum(d["revenue_msat"] for d in data["per_day"]) == 2234
    everything = run_json("stats", "--days", "60")
    assert everything["revenue_msat"] == 2234 + 777


# --- keys topup, disable, enable --------------------------------------------------------------


def test_topup_credits_the_key_with_a_journal_entry(on_proxy: Proxy) -> None:
    proxy = on_proxy
    key = proxy.new_key(sats=5)
    out = run_json("keys", "topup", key, "--sats", "7", "--note", "goodwill")
    assert out["balance_msat"] == 12_000 and out["credited_msat"] == 7_000
    assert out["entry"]["kind"] == "credit" and out["entry"]["amount_msat"] == 7_000
    assert out["entry"]["note"] == "goodwill"

    shown = run_json("keys", "show", hash_key(key)[:12])
    assert shown["balance_msat"] == shown["available_msat"] == 12_000
    assert proxy.key_state(key).balance_msat == 12_000
    credits = [e for e in shown["recent_entries"] if e["kind"] == "credit"]
    assert [(e["amount_msat"], e["note"]) for e in credits] == [(5_000, "created"),
                                                                (7_000, "goodwill")]
    assert credits[-1]["id"] == out["entry"]["id"]
    assert proxy.check() == []

    plain = invoke("keys", "topup", key, "--sats", "1")
    assert plain.exit_code == 0 and "credited 1 sats" in plain.stdout
    assert proxy.key_state(key).balance_msat == 13_000
    # the credit is spendable at once
    completion = proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content


def test_a_disabled_key_gets_403_until_enabled(on_proxy: Proxy) -> None:
    proxy = on_proxy
    key = proxy.new_key(sats=50)
    proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    proxy.wait_settled()
    balance = proxy.key_state(key).balance_msat

    out = run_json("keys", "disable", key)
    assert out["disabled"] is True and out["changed"] is True
    assert proxy.key_state(key).disabled
    with pytest.raises(openai.PermissionDeniedError) as e:
        proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert e.value.status_code == 403 and e.value.code == "key_disabled"
    resp = raw(proxy, "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
               json={"model": MODEL, "messages": MESSAGES})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "key_disabled"
    assert proxy.key_state(key).balance_msat == balance  # nothing charged, nothing reserved

    again = run_json("keys", "disable", key)
    assert again["disabled"] is True and again["changed"] is False
    assert run_json("keys", "list")[0]["disabled"] in (True, False)  # listed with the flag

    human = invoke("keys", "enable", key)
    assert human.exit_code == 0 and "enabled" in human.stdout
    assert not proxy.key_state(key).disabled
    proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    proxy.wait_settled()
    assert proxy.key_state(key).total_requests == 2
    assert proxy.check() == []


def test_topup_disable_enable_on_sqlite_and_postgresql(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", database_url)
    ledger = Ledger(database_url)
    try:
        key, state = ledger.create_key(1_000)
    finally:
        ledger.close()
    out = run_json("keys", "topup", state.key_hash[:10], "--sats", "2")
    assert out["balance_msat"] == 3_000 and out["entry"]["note"] == "operator top-up"
    assert run_json("keys", "disable", key)["changed"] is True
    assert run_json("keys", "disable", key)["changed"] is False
    ledger = Ledger(database_url)
    try:
        with pytest.raises(ReserveError) as refused:
            ledger.reserve(state.key_hash, 100, "while-disabled")
        assert refused.value.reason == "disabled"
        assert run_json("keys", "enable", key)["disabled"] is False
        ledger.reserve(state.key_hash, 100, "enabled-again")
        ledger.release("enabled-again")
        assert ledger.check() == []
    finally:
        ledger.close()


# --- keys refund ----------------------------------------------------------------------------


def test_refund_of_a_token_funded_key_is_a_token_the_user_redeems(
        on_ecash_proxy: Proxy, user: UserWallet, mint: LocalMint) -> None:
    proxy = on_ecash_proxy
    created = raw(proxy, "POST", "/v1/balance/create",
                  json={"initial_balance_token": user.token(200)})
    assert created.status_code == 200, created.text
    key = created.json()["api_key"]
    completion = proxy.client(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.usage is not None
    proxy.wait_settled()
    state = proxy.key_state(key)
    cost = expected_msat(MODEL, completion.usage.prompt_tokens,
                         completion.usage.completion_tokens)
    assert state.backed and state.available_msat == 200_000 - cost

    result = invoke("keys", "refund", key, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    amount = (200_000 - cost) // 1000
    assert (out["amount"], out["fee"], out["unit"]) == (amount, 0, "sat")
    assert out["msats"] == amount * 1000
    assert out["key"]["balance_msat"] == (200_000 - cost) % 1000
    assert proxy.key_state(key).balance_msat == (200_000 - cost) % 1000
    assert user.receive(out["token"]) == amount

    ledger = proxy.ledger()
    try:
        refund = [e for e in ledger.entries(hash_key(key)) if e["kind"] == "refund"]
        assert [-e["amount_msat"] for e in refund] == [amount * 1000]
    finally:
        ledger.close()
    again = invoke("keys", "refund", key)  # nothing left: the same refund, as the API does
    assert again.exit_code == 0 and again.stdout.strip() == out["token"]
    books_balance(proxy, mint.url)


def test_refund_is_refused_for_operator_credit_and_requests_in_flight(
        on_ecash_proxy: Proxy, user: UserWallet) -> None:
    proxy = on_ecash_proxy
    granted = proxy.new_key(sats=100)
    result = invoke("keys", "refund", granted)
    assert result.exit_code == 1 and result.stdout == ""
    assert "granted by the operator" in result.stderr
    assert proxy.key_state(granted).balance_msat == 100_000

    created = raw(proxy, "POST", "/v1/balance/create",
                  json={"initial_balance_token": user.token(20)})
    key = created.json()["api_key"]
    ledger = proxy.ledger()
    try:
        ledger.reserve(hash_key(key), 3_000, "cli-refund-in-flight", MODEL)
        busy = invoke("keys", "refund", key)
        assert busy.exit_code == 1 and "in flight" in busy.stderr and busy.stdout == ""
        assert proxy.key_state(key).balance_msat == 20_000
    finally:
        ledger.release("cli-refund-in-flight", "test")
        ledger.close()
    done = invoke("keys", "refund", key, "--json")
    assert done.exit_code == 0, done.output
    assert user.receive(json.loads(done.stdout)["token"]) == 20


# --- models list ----------------------------------------------------------------------------


def test_models_list_prices_as_the_proxy_publishes(on_proxy: Proxy, cli_env: Path) -> None:
    data = run_json("models", "list")
    assert data["rate"] == {"btc_usd": float(Decimal(RATE)), "source": "fixed",
                            "updated_at": None, "error": None}
    published = raw(on_proxy, "GET", "/v1/models").json()["data"]
    assert [m["id"] for m in data["models"]] == [m["id"] for m in published]
    for mine, theirs in zip(data["models"], published, strict=True):
        assert mine["sats_pricing"] == theirs["sats_pricing"]
        assert mine["pricing"] == theirs["pricing"]
    model = data["models"][0]
    usd = Fraction(MODELS["data"][0]["pricing"]["prompt"])  # type: ignore[index]
    per_token = usd * Fraction(EXCHANGE_FEE) * Fraction(PROVIDER_FEE) * 10**8 / Fraction(RATE)
    assert model["sats_pricing"]["prompt"] == pytest.approx(float(per_token), rel=1e-12)

    human = invoke("models", "list")
    assert human.exit_code == 0, human.output
    assert "test/model" in human.stdout and "(fixed)" in human.stdout

    given = run_json("models", "list", "--rate", "50000")
    assert given["rate"]["source"] == "given"
    assert given["models"][0]["sats_pricing"]["prompt"] == pytest.approx(
        float(per_token * Fraction(RATE) / 50000), rel=1e-12)


@pytest.fixture
def ticker() -> Iterator[str]:
    """A local BTC/USD source speaking Kraken's protocol."""

    class Ticker(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"error": [], "result": {"XXBTZUSD": {"c": ["80000.5", "1"]}}})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ticker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ticker"
    server.shutdown()


def test_models_list_fetches_the_live_rate(cli_env: Path, ticker: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BTC_USD_PRICE", "")
    monkeypatch.setenv("BTC_USD_SOURCES", f"kraken={ticker}")
    started = time.time()
    data = run_json("models", "list")
    assert data["rate"]["source"] == "live" and data["rate"]["btc_usd"] == 80000.5
    assert started <= data["rate"]["updated_at"] <= time.time()
    usd = Fraction(MODELS["data"][0]["pricing"]["completion"])  # type: ignore[index]
    per_token = usd * Fraction(EXCHANGE_FEE) * Fraction(PROVIDER_FEE) * 10**8 / Fraction(
        "80000.5")
    assert data["models"][0]["sats_pricing"]["completion"] == pytest.approx(float(per_token))

    # No source answers: the models still, no sats prices, exit 1.
    monkeypatch.setenv("BTC_USD_SOURCES", "kraken=http://127.0.0.1:9/down")
    result = invoke("models", "list", "--json")
    assert result.exit_code == 1, result.output
    down = json.loads(result.stdout)
    assert down["rate"]["source"] == "none" and down["rate"]["btc_usd"] is None
    assert [m["sats_pricing"] for m in down["models"]] == [None, None]
    human = invoke("models", "list")
    assert human.exit_code == 1 and "no sats prices" in human.stderr


# --- exit codes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code"), [
    (["keys", "topup", "sk-nope", "--sats", "5"], 1),
    (["keys", "topup", "0123456789abcdef", "--sats", "5"], 1),
    (["keys", "topup", "{key}", "--sats", "0"], 2),
    (["keys", "topup", "{key}", "--sats", "-3"], 2),
    (["keys", "topup", "{key}", "--sats", "lots"], 2),
    (["keys", "topup", "{key}"], 2),
    (["keys", "topup", "abc", "--sats", "5"], 2),
    (["keys", "disable", "sk-nope"], 1),
    (["keys", "enable", "sk-nope"], 1),
    (["keys", "disable", "xyz"], 2),
    (["keys", "refund", "{key}"], 2),  # no CASHU_MINTS
    (["keys", "refund", "sk-nope", "--json"], 2),
    (["stats", "--days", "0"], 2),
    (["stats", "--days", "many"], 2),
    (["models", "list", "--rate", "-5"], 2),
    (["models", "list", "--rate", "cheap"], 2),
    (["tui", "--interval", "0"], 2),
])
def test_bad_input_exit_codes(cli_env: Path, args: list[str], code: int) -> None:
    ledger = Ledger(f"sqlite:///{cli_env / 'data' / 'routstr.sqlite'}")
    try:
        key, _ = ledger.create_key(5_000)
        before = ledger.entries(limit=100)
    finally:
        ledger.close()
    result = runner.invoke(app, [a.replace("{key}", key) for a in args])
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    ledger = Ledger(f"sqlite:///{cli_env / 'data' / 'routstr.sqlite'}")
    try:
        assert ledger.entries(limit=100) == before  # nothing written
        assert ledger.key(hash_key(key)).disabled is False  # type: ignore[union-attr]
    finally:
        ledger.close()


def test_refund_of_operator_credit_exits_1_without_asking_a_mint(
        cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASHU_MINTS", "http://127.0.0.1:9")  # nobody there
    created = run_json("keys", "create", "--balance-sats", "5")
    result = invoke("keys", "refund", created["api_key"])
    assert result.exit_code == 1 and "granted by the operator" in result.stderr
    missing = invoke("keys", "refund", "sk-nope")
    assert missing.exit_code == 1 and "no such key" in missing.stderr


def test_bad_models_file_exits_2(cli_env: Path) -> None:
    (cli_env / "models.json").write_text("{not json")
    result = invoke("models", "list")
    assert result.exit_code == 2 and "MODELS_PATH" in result.stderr


def test_every_command_has_help() -> None:
    groups = {"keys": ["create", "list", "show", "topup", "disable", "enable", "refund"],
              "models": ["list"], "ledger": ["tail", "check"],
              "wallet": ["balance", "send", "receive", "restore"], "payouts": ["list", "run"]}
    top = invoke("--help")
    assert top.exit_code == 0
    for name in ("serve", "demo", "tui", "stats", "version", *groups):
        assert name in top.stdout
    commands = [[name] for name in ("serve", "demo", "tui", "stats", "version")]
    commands += [[group, sub] for group, subs in groups.items() for sub in subs]
    for command in commands:
        result = invoke(*command, "--help")
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.stdout
        reads = command[-1] in ("list", "show", "tail", "check", "balance", "stats", "tui",
                                "topup", "disable", "enable", "refund")
        if reads:
            assert "--json" in result.stdout, command


# --- demo -----------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_prints_commands_that_work_as_pasted(tmp_path: Path) -> None:
    """`routstr demo` runs the demo even with a real upstream configured, and its banner's
    curl command and Python snippet work as they are."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", "UPSTREAM_API_KEY": "sk-real-secret",
           "CASHU_MINTS": "http://127.0.0.1:9", "RECEIVE_LN_ADDRESS": "me@example.com",
           "DATABASE_URL": "mysql://not-even-supported", "WALLET_MNEMONIC": "not a mnemonic",
           "NSEC": "not-a-key"}
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "routstr"), "demo", "--listen-port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output = Output(proc)
        output.wait_for("listening at", timeout=60)
        banner = output.text
        assert "ROUTSTR DEMO" in banner and "no real money moves" in banner
        assert "worthless" in banner
        key = re.search(r"Demo key:\s+(sk-[0-9a-f]{64})", banner)
        token = re.search(r"Demo token \(1000 sats\): (cashuB\S+)", banner)
        assert key is not None and token is not None
        curl = re.search(r"^ *(curl http://\S+/v1/chat/completions \\\n(?: .*\\\n)* .*)$",
                         banner, re.M)
        assert curl is not None and key.group(1) in curl.group(1)
        snippet = re.search(r"^(from openai import OpenAI\n(?:.+\n)+)", banner, re.M)
        assert snippet is not None and f'api_key="{key.group(1)}"' in snippet.group(1)

        pasted = subprocess.run(["bash", "-c", curl.group(1)], capture_output=True, text=True,
                                timeout=30)
        assert pasted.returncode == 0, pasted.stderr
        answer = json.loads(pasted.stdout)
        assert answer["choices"][0]["message"]["content"] == "[demo echo, no real model] Hello!"
        assert answer["usage"]["total_tokens"] > 0

        python = subprocess.run([sys.executable, "-c", snippet.group(1)], capture_output=True,
                                text=True, timeout=60)
        assert python.returncode == 0, python.stderr
        assert python.stdout.strip() == "[demo echo, no real model] Hello!"

        xcashu = re.search(r"^ *(curl -i http://\S+/v1/chat/completions \\\n(?: .*\\\n)* .*)$",
                           banner, re.M)
        assert xcashu is not None and token.group(1) in xcashu.group(1)
        paid = subprocess.run(["bash", "-c", xcashu.group(1)], capture_output=True, text=True,
                              timeout=30)
        assert paid.returncode == 0 and " 200" in paid.stdout.splitlines()[0]
        assert re.search(r"^x-cashu: cashuB", paid.stdout, re.M | re.I)

        info = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=5).json()
        assert "DEMO" in info["name"] and info["mints"] != ["http://127.0.0.1:9"]
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
    demo = tmp_path / "data" / "demo"
    assert (demo / "demo-mnemonic.txt").is_file()  # its own wallet seed, not the operator's
    assert not (tmp_path / "data" / "wallet-mnemonic.txt").exists()
    assert "NEW WALLET MNEMONIC" not in output.text
