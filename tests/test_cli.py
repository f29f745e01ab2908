"""The `routstr` CLI and `routstr serve`: JSON output checked against the ledger, exit codes,
start-up refusing bad settings, and the demo served out of the box."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app, parse_expiry
from routstr_addon.ledger import Ledger, hash_key

from .conftest import ADDON, BIN, Output, Proxy

runner = CliRunner()


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "UPSTREAM_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def run_json(*args: str) -> object:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_keys_create_prints_only_the_key_and_stores_only_its_hash(cli_env: Path) -> None:
    result = runner.invoke(app, ["keys", "create", "--balance-sats", "42"])
    assert result.exit_code == 0
    key = result.stdout.strip()
    assert re.fullmatch(r"sk-[0-9a-f]{64}", key)
    ledger = Ledger(f"sqlite:///{cli_env / 'data' / 'routstr.sqlite'}")
    state = ledger.key(hash_key(key))
    assert state is not None and state.balance_msat == 42_000
    db_bytes = (cli_env / "data" / "routstr.sqlite").read_bytes()
    wal = cli_env / "data" / "routstr.sqlite-wal"
    db_bytes += wal.read_bytes() if wal.exists() else b""
    assert key.encode() not in db_bytes and hash_key(key).encode() in db_bytes
    ledger.close()


def test_keys_json_output_matches_the_ledger(cli_env: Path) -> None:
    created = run_json("keys", "create", "--balance-sats", "5", "--expiry", "30d",
                       "--refund-address", "me@example.com", "--label", "alice")
    assert isinstance(created, dict)
    key = created["api_key"]
    assert created["balance_msat"] == 5000 and created["refund_address"] == "me@example.com"
    assert abs(created["expires_at"] - (time.time() + 30 * 86400)) < 60

    listed = run_json("keys", "list")
    assert isinstance(listed, list) and [k["key_hash"] for k in listed] == [hash_key(key)]

    for ref in (key, hash_key(key)[:10]):
        shown = run_json("keys", "show", ref)
        assert isinstance(shown, dict)
        assert shown["key_hash"] == hash_key(key) and shown["label"] == "alice"
        assert [e["kind"] for e in shown["recent_entries"]] == ["credit"]

    tail = run_json("ledger", "tail", "-n", "5")
    assert isinstance(tail, list) and tail[-1]["amount_msat"] == 5000
    assert run_json("ledger", "check") == {"ok": True, "problems": [], "wallet": {}}


def test_cli_reads_the_proxy_ledger_after_real_requests(proxy: Proxy,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", proxy.database_url)
    key = proxy.new_key(sats=50)
    completion = proxy.client(key).chat.completions.create(
        model="test/model", messages=[{"role": "user", "content": "from the cli test"}])
    assert completion.usage is not None
    shown = run_json("keys", "show", key)
    assert isinstance(shown, dict)
    state = proxy.key_state(key)
    assert shown["balance_msat"] == state.balance_msat < 50_000
    assert shown["total_requests"] == 1
    kinds = [e["kind"] for e in shown["recent_entries"]]
    assert kinds == ["credit", "reserve", "charge"]
    charge = shown["recent_entries"][-1]
    assert charge["prompt_tokens"] == completion.usage.prompt_tokens
    assert -charge["amount_msat"] == state.total_spent_msat


@pytest.mark.parametrize(("args", "code"), [
    (["keys", "show", "sk-does-not-exist"], 1),
    (["keys", "show", "abc"], 2),
    (["keys", "show", "0123456789abcdef"], 1),
    (["keys", "create", "--balance-sats", "-5"], 2),
    (["keys", "create", "--balance-sats", "lots"], 2),
    (["keys", "create", "--expiry", "next tuesday"], 2),
])
def test_bad_input_exits_non_zero(cli_env: Path, args: list[str], code: int) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output


def test_bad_setting_exits_2_naming_it(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCHANGE_FEE", "cheap")
    result = runner.invoke(app, ["keys", "list"])
    assert result.exit_code == 2
    assert "EXCHANGE_FEE" in result.output


def test_ledger_check_fails_on_a_tampered_balance(cli_env: Path) -> None:
    created = run_json("keys", "create", "--balance-sats", "5")
    assert isinstance(created, dict)
    ledger = Ledger(f"sqlite:///{cli_env / 'data' / 'routstr.sqlite'}")
    ledger.db.execute_sql("UPDATE api_keys SET balance_msat = balance_msat + 1")
    ledger.close()
    result = runner.invoke(app, ["ledger", "check"])
    assert result.exit_code == 1
    assert "entries sum to 5000" in result.output


def test_parse_expiry_forms() -> None:
    now = 1_000_000.0
    assert parse_expiry("12h", now) == now + 43200
    assert parse_expiry("2w", now) == now + 14 * 86400
    assert parse_expiry("1700000000", now) == 1_700_000_000
    assert parse_expiry("2030-01-01", now) == 1893456000
    assert parse_expiry("2030-01-01T01:00:00+01:00", now) == 1893456000


# --- start-up -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [
    ("EXCHANGE_FEE", "abc"),
    ("UPSTREAM_BASE_URL", "ftp://nowhere"),
    ("COST_PER_REQUEST", "several"),
    ("MAX_REQUEST_SIZE", "huge"),
])
def test_mitmdump_refuses_to_start_on_a_bad_setting(tmp_path: Path, name: str, value: str) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BTC_USD_PRICE": "50000",
           name: value}
    proc = subprocess.run([str(BIN / "mitmdump"), "--mode", "reverse:http://127.0.0.1:9",
                           "-p", "0", "-s", str(ADDON)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "routstr:" in line]
    assert len(errors) == 1 and name in errors[0], output
    assert "Traceback" not in output


def test_routstr_serve_runs_the_demo_out_of_the_box(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "routstr"), "serve", "--listen-port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output = Output(proc)
        output.wait_for("listening at")
        banner = output.text
        assert "DEMO" in banner and "no real money" in banner.lower()
        key = re.search(r"Demo key:\s+(sk-[0-9a-f]{64})", banner)
        assert key is not None
        curl = re.search(r"curl (http://\S+/v1/chat/completions)", banner)
        assert curl is not None
        resp = httpx.post(curl.group(1), headers={"authorization": f"Bearer {key.group(1)}"},
                          json={"model": "demo-echo",
                                "messages": [{"role": "user", "content": "Hello!"}]}, timeout=10)
        assert resp.status_code == 200
        assert "demo" in resp.json()["choices"][0]["message"]["content"]
        assert int(resp.headers["x-routstr-cost-msats"]) > 0
        info = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=5).json()
        assert "DEMO" in info["name"]
        # The demo mint's token pays a request by itself, and the change comes back.
        token = re.search(r"Demo token \(1000 sats\): (cashuB\S+)", banner)
        assert token is not None and "worthless" in banner
        paid = httpx.post(curl.group(1), headers={"x-cashu": token.group(1)},
                          json={"model": "demo-echo",
                                "messages": [{"role": "user", "content": "ecash"}]}, timeout=20)
        assert paid.status_code == 200, paid.text
        assert paid.headers["x-cashu"].startswith("cashuB")
        assert info["mints"] == [re.search(r"Demo mint: (\S+)", banner).group(1)]  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0


def test_routstr_serve_forwards_to_the_configured_upstream(tmp_path: Path, upstream) -> None:
    port = _free_port()
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"data": [{"id": "m", "context_length": 1000, "pricing": {
        "prompt": "0.00001", "completion": "0.00001"}}]}))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "BTC_USD_PRICE": "100000",
           "MODELS_PATH": str(models), "DATA_DIR": str(tmp_path / "data")}
    key = subprocess.run([str(BIN / "routstr"), "keys", "create", "--balance-sats", "100"],
                         cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    proc = subprocess.Popen([str(BIN / "routstr"), "serve", "--listen-port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        Output(proc).wait_for("listening at")
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                          timeout=10)
        assert resp.status_code == 200
        # 1 prompt token + 6 completion tokens at $0.00001 each, fees 1.005 × 1.05, $100k/BTC
        assert resp.headers["x-routstr-cost-msats"] == "74"
    finally:
        proc.terminate()
        proc.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




def test_routstr_serve_web_runs_mitmweb_with_the_addon(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    port, web_port = _free_port(), _free_port()
    proc = subprocess.Popen([str(BIN / "routstr"), "serve", "--web", "--listen-port", str(port),
                             "--web-port", str(web_port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = Output(proc)
        output.wait_for(rf"listening at \S+:{port}")
        web_url = output.wait_for(r"Web server listening at (http://\S+)").group(1)
        key = re.search(r"Demo key:\s+(sk-[0-9a-f]{64})", output.text)
        assert key is not None
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                          headers={"authorization": f"Bearer {key.group(1)}"},
                          json={"model": "demo-echo",
                                "messages": [{"role": "user", "content": "web"}]}, timeout=10)
        assert resp.status_code == 200 and int(resp.headers["x-routstr-cost-msats"]) > 0
        assert httpx.get(web_url, timeout=5).status_code == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
