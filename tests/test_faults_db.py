"""The ledger's database in trouble: locked for a moment, its connections cut, its disk full.
Each gets a clear answer, nothing is lost, and the proxy serves again afterwards."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg2

from .conftest import PG_ADMIN_URL, expected_msat, start_proxy

MODEL = "test/model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "the disk is full"}]}


def chat(url: str, key: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=30,
                      headers={"authorization": f"Bearer {key}", **headers})


def test_a_database_locked_for_a_moment_only_delays_requests(upstream: Any,
                                                             tmp_path: Path) -> None:
    p = start_proxy(tmp_path / "p", upstream.url, {"UPSTREAM_BASE_URL": f"{upstream.url}/v1"})
    try:
        key = p.new_key(sats=100)
        database = p.database_url.removeprefix("sqlite:///")
        locked = threading.Event()

        def hold() -> None:
            conn = sqlite3.connect(database, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(1.5)
            conn.execute("COMMIT")
            conn.close()

        holder = threading.Thread(target=hold)
        holder.start()
        locked.wait(5)
        start = time.monotonic()
        resp = chat(p.url, key)
        holder.join()
        assert resp.status_code == 200 and time.monotonic() - start >= 1.0
        assert p.check() == []
    finally:
        p.stop()


def test_postgresql_connections_cut_are_reopened(upstream: Any, pg_database: str,
                                                  tmp_path: Path) -> None:
    p = start_proxy(tmp_path / "p", upstream.url, {"UPSTREAM_BASE_URL": f"{upstream.url}/v1",
                                                   "DATABASE_URL": pg_database})
    try:
        key = p.new_key(sats=100)
        assert chat(p.url, key).status_code == 200
        admin = psycopg2.connect(PG_ADMIN_URL)
        admin.autocommit = True
        cur = admin.cursor()
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (pg_database.rsplit("/", 1)[1],))
        admin.close()
        for _ in range(3):  # the proxy's connection is gone: it reconnects
            assert chat(p.url, key).status_code == 200
        p.wait_settled()
        assert p.key_state(key).total_requests == 4
        assert p.check() == []
    finally:
        p.stop()


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A small tmpfs for the data folder, to fill up."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # no space left: that is the point
            pass
    return filler


def test_a_full_disk_answers_503_keeps_the_books_and_recovers(upstream: Any,
                                                              tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk") as disk:
        p = start_proxy(tmp_path / "p", upstream.url,
                        {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "DATA_DIR": str(disk),
                         "DATABASE_URL": f"sqlite:///{disk / 'routstr.sqlite'}"})
        try:
            key = p.new_key(sats=100)
            assert chat(p.url, key).status_code == 200
            # A stream is under way when the disk fills up.
            with httpx.Client(base_url=p.url, timeout=30) as client, client.stream(
                    "POST", "/v1/chat/completions", json={**BODY, "stream": True},
                    headers={"authorization": f"Bearer {key}", "x-scenario": "slow"}) as resp:
                lines = resp.iter_lines()
                next(lines)
                filler = fill(disk)
                refused = chat(p.url, key)  # a new request cannot be recorded: refused
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "ledger_unavailable"
                rest = list(lines)  # the stream still reaches its end…
            assert any("[DONE]" in line for line in rest)
            time.sleep(1)
            filler.unlink()  # …and once there is room its charge is recorded, exactly
            p.wait_settled(timeout=15)
            ledger = p.ledger()
            try:
                charges = [e for e in ledger.entries(p.key_state(key).key_hash)
                           if e["kind"] == "charge"]
            finally:
                ledger.close()
            assert len(charges) == 2
            assert -charges[1]["amount_msat"] == expected_msat(MODEL, 4, 9)
            assert chat(p.url, key).status_code == 200  # serving again
            assert any("settled after a retry" in line for line in p.output.lines)
            assert p.check() == []
        finally:
            p.stop()
