"""Fixtures with real parts: a real ``mitmdump`` running the addon, a local OpenAI-compatible
upstream, real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from math import ceil
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg2
import pytest

from routstr_addon.dev.demo import run_in_thread
from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ledger import KeyState, Ledger

from .cashu_ts import CashuTs
from .ecash_user import UserWallet
from .upstream import TestUpstream

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ADDON = ROOT / "routstr_addon" / "addon.py"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# Prices chosen to be awkward: exact arithmetic matters to the msat.
RATE = "91234.56"
EXCHANGE_FEE = "1.005"
PROVIDER_FEE = "1.05"
MODELS = {
    "data": [
        {"id": "test/model", "name": "Test model", "context_length": 4096,
         "pricing": {"prompt": "0.000001234", "completion": "0.00000321", "request": "0.0000007"},
         "top_provider": {"context_length": 4096, "max_completion_tokens": 512}},
        {"id": "test/embed", "name": "Test embeddings", "context_length": 8192,
         "pricing": {"prompt": "0.00000013", "completion": "0", "request": "0"},
         "top_provider": {"context_length": 8192, "max_completion_tokens": None}},
    ]
}


def expected_msat(model_id: str, prompt_tokens: int, completion_tokens: int) -> int:
    """The price of a usage, computed independently of the proxy's code."""
    model = next(m for m in MODELS["data"] if m["id"] == model_id)
    pricing: dict[str, str] = model["pricing"]  # type: ignore[assignment]
    usd = (prompt_tokens * Fraction(pricing["prompt"]) + completion_tokens
           * Fraction(pricing["completion"]) + Fraction(pricing["request"]))
    return ceil(usd * Fraction(EXCHANGE_FEE) * Fraction(PROVIDER_FEE) * 10**11 / Fraction(RATE))


@dataclass
class Proxy:
    """A running ``mitmdump -s routstr_addon/addon.py`` and what it was started with."""

    url: str
    database_url: str
    env: dict[str, str]
    process: subprocess.Popen[str]
    workdir: Path
    output: Output

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def ledger(self) -> Ledger:
        return Ledger(self.database_url)

    def new_key(self, sats: int = 0, msat: int | None = None, **kw: Any) -> str:
        ledger = self.ledger()
        try:
            key, _ = ledger.create_key(sats * 1000 if msat is None else msat, **kw)
            return key
        finally:
            ledger.close()

    def key_state(self, key: str) -> KeyState:
        from routstr_addon.ledger import hash_key

        ledger = self.ledger()
        try:
            state = ledger.key(hash_key(key))
            assert state is not None
            return state
        finally:
            ledger.close()

    def client(self, key: str, **kw: Any) -> openai.OpenAI:
        kw.setdefault("timeout", 30)
        return openai.OpenAI(base_url=self.v1, api_key=key, max_retries=0, **kw)

    def async_client(self, key: str, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key=key, max_retries=0, timeout=60, **kw)

    def check(self) -> list[str]:
        ledger = self.ledger()
        try:
            return ledger.check()
        finally:
            ledger.close()

    def open_reservations(self) -> list[dict[str, Any]]:
        ledger = self.ledger()
        try:
            return ledger.open_reservations()
        finally:
            ledger.close()

    def wait_settled(self, timeout: float = 10.0) -> None:
        """Wait until no reservation is open (the proxy settles after the client is done)."""
        deadline = time.monotonic() + timeout
        while self.open_reservations():
            if time.monotonic() > deadline:
                raise AssertionError(f"reservations still open: {self.open_reservations()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Output:
    """Collects a child process's output lines in a thread; ``wait_for`` a pattern in them."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # end of output
            self._changed.notify_all()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self._proc.poll() is not None and self.lines[-1:] == [""]):
                    raise AssertionError(f"no {pattern!r} in the output:\n{self.text}")
                self._changed.wait(min(left, 0.5))


def start_proxy(workdir: Path, mode_target: str, env: dict[str, str],
                args: tuple[str, ...] = ()) -> Proxy:
    """Start mitmdump with the addon in ``workdir`` (so no stray .env is read)."""
    workdir.mkdir(parents=True, exist_ok=True)
    models = workdir / "models.json"
    if not models.exists():
        models.write_text(json.dumps(MODELS))
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        "HOME": str(workdir),
        "DATA_DIR": str(workdir / "data"),
        "MODELS_PATH": str(models),
        "BTC_USD_PRICE": RATE,
        "EXCHANGE_FEE": EXCHANGE_FEE,
        "UPSTREAM_PROVIDER_FEE": PROVIDER_FEE,
        **env,
    }
    database_url = (full_env.get("DATABASE_URL")
                    or f"sqlite:///{workdir / 'data' / 'routstr.sqlite'}")
    cmd = [str(BIN / "mitmdump"), "--mode", f"reverse:{mode_target}", "--listen-host",
           "127.0.0.1", "-p", "0", "-s", str(ADDON), *args]
    proc = subprocess.Popen(cmd, cwd=workdir, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = Output(proc)
    try:
        port = int(output.wait_for(r"listening at \S+:(\d+)").group(1))
    except AssertionError:
        proc.kill()
        raise
    return Proxy(f"http://127.0.0.1:{port}", database_url, full_env, proc, workdir, output)


@pytest.fixture(scope="session")
def upstream() -> Iterator[TestUpstream]:
    with run_in_thread(TestUpstream()) as server:
        assert isinstance(server, TestUpstream)
        yield server


@pytest.fixture(scope="session")
def proxy(upstream: TestUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The proxy with model-based pricing in front of the test upstream, on SQLite."""
    p = start_proxy(tmp_path_factory.mktemp("proxy"), upstream.url,
                    {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "MAX_REQUEST_SIZE": "64k"})
    yield p
    p.stop()


@pytest.fixture
def make_proxy(upstream: TestUpstream, tmp_path: Path) -> Iterator[Any]:
    """Start a proxy with extra settings for one test."""
    started: list[Proxy] = []

    def make(env: dict[str, str] | None = None, name: str = "p",
             mode_target: str | None = None) -> Proxy:
        settings = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", **(env or {})}
        p = start_proxy(tmp_path / name, mode_target or upstream.url, settings)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def _pg_available() -> bool:
    try:
        psycopg2.connect(PG_ADMIN_URL, connect_timeout=3).close()
        return True
    except psycopg2.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The machine's PostgreSQL server, started if it has stopped."""
    if not _pg_available():
        with contextlib.suppress(Exception):
            versions = os.listdir("/etc/postgresql")
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main",
                            "start"], check=False, timeout=60)
            time.sleep(2)
    assert _pg_available(), "PostgreSQL is not reachable on 127.0.0.1:5432"
    return PG_ADMIN_URL


@pytest.fixture
def pg_database(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"routstr_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(pg_server)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.cursor().execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    url: str = request.getfixturevalue("pg_database")
    return url


def raw(proxy: Proxy, method: str, path: str, **kw: Any) -> httpx.Response:
    """A plain HTTP request to the proxy (for what the openai client would not send)."""
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        return c.request(method, path, **kw)


# --- Cashu: a real Nutshell mint (FakeWallet), a user's wallet, a proxy taking ecash -------


@pytest.fixture(scope="session")
def mint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMint]:
    m = LocalMint(tmp_path_factory.mktemp("mint")).start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def other_mint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMint]:
    """A second mint the proxy does not trust."""
    m = LocalMint(tmp_path_factory.mktemp("other-mint"), private_key="another mint").start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def user(mint: LocalMint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserWallet]:
    u = UserWallet(mint.url, tmp_path_factory.mktemp("user"))
    yield u
    u.close()


@pytest.fixture(scope="session")
def ecash_proxy(upstream: TestUpstream, mint: LocalMint,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The proxy taking ecash from ``mint``, model-based pricing, on SQLite."""
    p = start_proxy(tmp_path_factory.mktemp("ecash-proxy"), upstream.url,
                    {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "CASHU_MINTS": mint.url})
    yield p
    p.stop()


def books_balance(proxy: Proxy, mint_url: str) -> None:
    """The operator is never short: the proofs it holds (unspent at the mint, checked there)
    cover every key's balance and every refund not yet handed out; the ledger balances."""
    ledger = proxy.ledger()
    try:
        assert ledger.check() == []
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT secret, unit, amount FROM proofs "
                    "WHERE state IN ('unspent', 'held', 'reserved') UNION ALL "
                    "SELECT secret, unit, amount FROM locked_proofs "
                    "WHERE state IN ('received', 'redeeming')")
        held = cur.fetchall()
        cur.execute("SELECT COALESCE(SUM(balance_msat), 0) FROM api_keys WHERE backed")
        liabilities = int(cur.fetchone()[0])
        cur.execute("SELECT COALESCE(SUM(msat), 0) FROM refunds WHERE state = 'pending'")
        liabilities += int(cur.fetchone()[0])
    finally:
        ledger.close()
    held_msat = sum(amount * (1000 if unit == "sat" else 1) for _, unit, amount in held)
    assert held_msat >= liabilities, (held_msat, liabilities)
    if held:
        from routstr_addon.ecash.tokens import nutshell

        nutshell()
        from cashu.core.crypto.b_dhke import hash_to_curve

        ys = [hash_to_curve(secret.encode()).format().hex() for secret, _, _ in held]
        states = httpx.post(f"{mint_url}/v1/checkstate", json={"Ys": ys}, timeout=30).json()
        assert {s["state"] for s in states["states"]} == {"UNSPENT"}


@pytest.fixture(scope="session")
def cashu_ts() -> CashuTs:
    """cashu-ts at its pinned version, installed once per session (``npm ci``)."""
    return CashuTs().install()
