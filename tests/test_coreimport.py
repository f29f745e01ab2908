"""``routstr import-core``: a routstr-core database (its older schema and v0.4's, on SQLite and
on PostgreSQL, built here from that schema's facts) brought into the ledger; the users' keys
then work through a real proxy with the same balance."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from typer.testing import CliRunner

from cli.main import app
from routstr_addon.ledger import Ledger, hash_key
from routstr_addon.ledger.coreimport import core_invoice_key

from .conftest import Proxy

runner = CliRunner()

# routstr-core's tables as its older releases made them, and the columns v0.4 added.
OLD_KEYS = ("CREATE TABLE api_keys (hashed_key VARCHAR PRIMARY KEY, balance INTEGER NOT NULL, "
            "reserved_balance INTEGER NOT NULL DEFAULT 0, refund_address VARCHAR, "
            "key_expiry_time INTEGER, total_spent INTEGER NOT NULL DEFAULT 0, "
            "total_requests INTEGER NOT NULL DEFAULT 0, refund_mint_url VARCHAR, "
            "refund_currency VARCHAR)")
OLD_INVOICES = ("CREATE TABLE lightning_invoices (id VARCHAR PRIMARY KEY, bolt11 VARCHAR NOT "
                "NULL UNIQUE, amount_sats INTEGER NOT NULL, description VARCHAR NOT NULL, "
                "payment_hash VARCHAR NOT NULL UNIQUE, status VARCHAR NOT NULL, "
                "api_key_hash VARCHAR, purpose VARCHAR NOT NULL, created_at INTEGER NOT NULL, "
                "expires_at INTEGER NOT NULL, paid_at INTEGER)")
V04_COLUMNS = ("ALTER TABLE api_keys ADD COLUMN created_at INTEGER",
               "ALTER TABLE api_keys ADD COLUMN reserved_at INTEGER",
               "ALTER TABLE api_keys ADD COLUMN parent_key_hash VARCHAR",
               "ALTER TABLE api_keys ADD COLUMN balance_limit INTEGER",
               "ALTER TABLE api_keys ADD COLUMN balance_limit_reset VARCHAR",
               "ALTER TABLE api_keys ADD COLUMN balance_limit_reset_date INTEGER",
               "ALTER TABLE api_keys ADD COLUMN validity_date INTEGER",
               "ALTER TABLE lightning_invoices ADD COLUMN mint_url VARCHAR",
               "ALTER TABLE lightning_invoices ADD COLUMN validity_date INTEGER",
               "ALTER TABLE lightning_invoices ADD COLUMN direction VARCHAR DEFAULT 'in'")

NOW = int(time.time())
PARENT = "ab" * 32  # the secret part of the user's sk-…
TOKEN = "cashuBo2FteBtodHRwOi8vbWludC5leGFtcGxlLmNvbWF1Y3NhdA"  # a token used as the key
TOKEN_KEY = hashlib.sha256(TOKEN.encode()).hexdigest()
CHILD = "cd" * 32


def _fill(cur: Any, mark: str, v04: bool) -> None:
    cur.execute(OLD_KEYS)
    cur.execute(OLD_INVOICES)
    if v04:
        for statement in V04_COLUMNS:
            cur.execute(statement)
    rows = [(PARENT, 50_000, 3_000, "user@example.com", NOW + 86_400, 12_345, 7),
            (TOKEN_KEY, 10_000, 0, None, None, 250, 2)]
    cur.executemany("INSERT INTO api_keys (hashed_key, balance, reserved_balance, "
                    "refund_address, key_expiry_time, total_spent, total_requests) VALUES "
                    f"({', '.join([mark] * 7)})", rows)
    invoices = [("inv-topup", "lnbc1topup", 100, "q-topup", "pending", PARENT, "topup"),
                ("inv-create", "lnbc1create", 200, "q-create", "pending", None, "create"),
                ("inv-paid", "lnbc1paid", 300, "q-paid", "paid", PARENT, "topup"),
                ("inv-busy", "lnbc1busy", 400, "q-busy", "settlement_pending", PARENT, "topup")]
    cur.executemany("INSERT INTO lightning_invoices (id, bolt11, amount_sats, payment_hash, "
                    "status, api_key_hash, purpose, description, created_at, expires_at) "
                    f"VALUES ({', '.join([mark] * 7)}, 'Routstr', {NOW}, {NOW + 3600})",
                    invoices)
    if v04:
        cur.execute("INSERT INTO api_keys (hashed_key, balance, reserved_balance, total_spent, "
                    "total_requests, parent_key_hash, balance_limit, balance_limit_reset, "
                    f"balance_limit_reset_date, created_at) VALUES ({mark}, 0, 0, 1000, 3, "
                    f"{mark}, 20000, 'daily', {mark}, {mark})", (CHILD, PARENT, NOW, NOW - 60))


def _sqlite_core(path: Path, v04: bool) -> str:
    conn = sqlite3.connect(path)
    _fill(conn.cursor(), "?", v04)
    conn.commit()
    conn.close()
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def pg_core(pg_server: str) -> Iterator[Callable[[bool], str]]:
    """routstr-core's database on the PostgreSQL server (a database of its own)."""
    names: list[str] = []

    def make(v04: bool) -> str:
        name = f"routstr_core_{uuid.uuid4().hex[:12]}"
        admin = psycopg2.connect(pg_server)
        admin.autocommit = True
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
        admin.close()
        names.append(name)
        conn = psycopg2.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
        _fill(conn.cursor(), "%s", v04)
        conn.commit()
        conn.close()
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"

    yield make
    admin = psycopg2.connect(pg_server)
    admin.autocommit = True
    for name in names:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "UPSTREAM_BASE_URL", "CASHU_MINTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CASHU_MINTS", "http://127.0.0.1:9/")
    return tmp_path / "data" / "routstr.sqlite"


def _import(url: str, *extra: str) -> dict[str, Any]:
    result = runner.invoke(app, ["import-core", url, "--json", *extra])
    assert result.exit_code == 0, result.output
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@pytest.mark.parametrize("where", ["sqlite", "postgresql"])
@pytest.mark.parametrize("v04", [False, True], ids=["older", "v0.4"])
def test_import_core_brings_every_key_over_once(where: str, v04: bool, target: Path,
                                               tmp_path: Path,
                                               pg_core: Callable[[bool], str]) -> None:
    url = _sqlite_core(tmp_path / "keys.db", v04) if where == "sqlite" else pg_core(v04)
    keys = 3 if v04 else 2
    planned = _import(url, "--dry-run")
    assert planned["dry_run"] and planned["keys"] == keys and planned["invoices"] == 2
    ledger = Ledger(f"sqlite:///{target}")
    try:
        assert ledger.keys() == []  # a dry run writes nothing
        done = _import(url)
        assert (done["keys"], done["children"], done["skipped"]) == (keys, int(v04), 0)
        assert done["balance_msat"] == 60_000 and done["released_msat"] == 3_000
        assert any("settlement_pending" in w for w in done["warnings"])
        parent = ledger.key(hash_key("sk-" + PARENT))
        assert parent is not None
        assert (parent.balance_msat, parent.reserved_msat, parent.total_spent_msat,
                parent.total_requests) == (50_000, 0, 12_345, 7)
        assert parent.refund_address == "user@example.com" and parent.backed
        assert parent.expires_at == NOW + 86_400
        token_key = ledger.key(hash_key("sk-" + TOKEN_KEY))
        assert token_key is not None and token_key.balance_msat == 10_000
        imported = ledger.keys()
        assert len(imported) == keys
        for state in imported:  # one journal row per key, its balance
            entries = ledger.entries(state.key_hash)
            assert [(e["kind"], e["amount_msat"]) for e in entries] == [
                ("credit", state.balance_msat)]
        if v04:
            child = ledger.key(hash_key("sk-" + CHILD))
            assert child is not None and child.parent_key_hash == parent.key_hash
            assert child.restricted and child.limits.budget_msat == 20_000
            assert child.limits.period == "daily" and child.limit_spent_msat == 1000
        topup = ledger.invoices.get(hashlib.sha256(b"inv-topup").hexdigest())
        create = ledger.invoices.get(hashlib.sha256(b"inv-create").hexdigest())
        assert topup is not None and topup.key_hash == parent.key_hash
        assert topup.state == "unpaid" and topup.quote == "q-topup"
        assert topup.mint == "http://127.0.0.1:9"
        assert create is not None
        assert create.key_hash == hash_key(core_invoice_key("inv-create", "q-create"))
        assert ledger.invoices.get(hashlib.sha256(b"inv-paid").hexdigest()) is None
        assert ledger.check() == []
        again = _import(url)  # idempotent
        assert (again["keys"], again["skipped"], again["invoices"]) == (0, keys, 0)
        assert len(ledger.entries()) == keys
    finally:
        ledger.close()


def test_imported_keys_keep_working_through_the_proxy(
        target: Path, tmp_path: Path, make_proxy: Callable[..., Proxy]) -> None:
    _import(_sqlite_core(tmp_path / "keys.db", True))
    proxy = make_proxy({"DATABASE_URL": f"sqlite:///{target}"})
    for key in ("sk-" + PARENT, "sk-" + CHILD):
        reply = proxy.client(key).chat.completions.with_raw_response.create(
            model="test/model", messages=[{"role": "user", "content": "still here?"}])
        assert reply.http_response.status_code == 200
    parent = proxy.key_state("sk-" + PARENT)
    child = proxy.key_state("sk-" + CHILD)
    spent_by_child = child.total_spent_msat - 1000
    assert child.balance_msat == 0 and spent_by_child > 0
    # the parent's totals count what its balance paid, its child's requests included
    assert parent.balance_msat == 50_000 - (parent.total_spent_msat - 12_345)
    assert parent.total_spent_msat - 12_345 > spent_by_child
    assert parent.total_requests == 9 and child.total_requests == 4
    ledger = proxy.ledger()
    try:
        assert ledger.check() == []
    finally:
        ledger.close()


def test_import_core_says_what_it_cannot_read(target: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = runner.invoke(app, ["import-core", f"sqlite:///{empty}"])
    assert result.exit_code == 2 and "routstr-core" in result.output
    result = runner.invoke(app, ["import-core", "mysql://nowhere/db"])
    assert result.exit_code == 2 and "scheme" in result.output
