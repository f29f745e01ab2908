"""Operated as an operator would: two proxy processes on one PostgreSQL ledger behind the
loopback balancer. An /admin session made on one works on the other and ends on both; failed
logins count across both; /metrics scraped from both adds up to the ledger's totals; /ready
turns 503 when the mint or the database is stopped and 200 when they are back."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg2

from bench.balancer import Balancer
from routstr_addon.dev.localmint import LocalMint

from .conftest import PG_ADMIN_URL, Proxy, start_proxy
from .test_observe import METRICS_TOKEN, scrape, value, wait_ready

PASSWORD = "operator's password"
ADMIN_TOKEN = "operator-admin-token-0123456789"
COOKIE = "routstr_admin"


def login(proxy: Proxy, password: str = PASSWORD) -> httpx.Response:
    return httpx.post(f"{proxy.url}/admin/login", data={"password": password}, timeout=10)


def overview(proxy: Proxy, session: str) -> httpx.Response:
    return httpx.get(f"{proxy.url}/admin", cookies={COOKIE: session}, timeout=10)


def offered(proxy: Proxy) -> list[str]:
    return [m["id"] for m in httpx.get(f"{proxy.url}/v1/models", timeout=10).json()["data"]]


def set_connections(database_url: str, allowed: bool) -> None:
    """Stop (or start again) the test's database for every client, as a stopped server is:
    connections refused, open ones cut."""
    name = database_url.rsplit("/", 1)[1]
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    try:
        cur = admin.cursor()
        cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s", (name,))
    finally:
        admin.close()


def test_two_processes_share_the_admin_the_metrics_add_up_and_ready_follows_the_parts(
        upstream: Any, pg_database: str, tmp_path: Path) -> None:
    mint = LocalMint(tmp_path / "mint").start()
    env = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "DATABASE_URL": pg_database,
           "CASHU_MINTS": mint.url, "WALLET_MNEMONIC": _mnemonic(), "ADMIN_PASSWORD": PASSWORD,
           "METRICS_TOKEN": METRICS_TOKEN, "READY_MAX_AGE": "1", "ADMIN_TOKEN": ADMIN_TOKEN}
    first = start_proxy(tmp_path / "a", upstream.url, env)
    second = start_proxy(tmp_path / "b", upstream.url, env)
    proxies = (first, second)
    try:
        # One admin: a session made on one process works on the other; logout ends it on both.
        made = login(first)
        assert made.status_code == 303
        session = made.cookies[COOKIE]
        page = overview(second, session)
        assert page.status_code == 200 and "Overview" in page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        out = httpx.post(f"{second.url}/admin/logout", data={"csrf": csrf.group(1)},
                         cookies={COOKIE: session}, timeout=10)
        assert out.status_code == 303
        for proxy in proxies:
            gone = overview(proxy, session)
            assert gone.status_code == 303 and gone.headers["location"] == "/admin/login"
        # Changing ADMIN_PASSWORD ends every session: a process with the new password refuses
        # an old session, which is then gone for the others too.
        session = login(second).cookies[COOKIE]
        assert overview(first, session).status_code == 200
        changed = start_proxy(tmp_path / "c", upstream.url,
                              {**env, "ADMIN_PASSWORD": "the operator's new password"})
        try:
            assert overview(changed, session).status_code == 303
        finally:
            changed.stop()
        assert overview(first, session).status_code == 303
        # The login limit counts failures on every process: 5 a minute per address.
        for proxy in (first, second, first, second, first):
            assert login(proxy, "wrong password").status_code == 401
        assert login(second).status_code == 429 and login(first).status_code == 429

        # Metrics: counters per process, which add up to the ledger's totals.
        keys = [first.new_key(sats=1000) for _ in range(4)]
        with Balancer([("127.0.0.1", int(p.url.rsplit(":", 1)[1])) for p in proxies]
                      ).running() as lb:
            with httpx.Client(base_url=lb.url, timeout=30) as client:
                for i in range(40):
                    answer = client.post(
                        "/v1/chat/completions",
                        headers={"authorization": f"Bearer {keys[i % 4]}", "connection": "close"},
                        json={"model": "test/model",
                              "messages": [{"role": "user", "content": f"request {i}"}]})
                    assert answer.status_code == 200
            assert min(lb.counts) >= 10  # both processes served
        first.wait_settled()
        scraped = [scrape(httpx.get(f"{p.url}/metrics", timeout=10,
                                    headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text)
                   for p in proxies]
        ledger = first.ledger()
        try:
            states = ledger.keys(limit=100)
            spent = sum(k.total_spent_msat for k in states)
            requests = sum(k.total_requests for k in states)
        finally:
            ledger.close()
        chat = {"endpoint": "/v1/chat/completions", "model": "test/model", "status": "200"}
        assert all(value(s, "routstr_requests_total", **chat) >= 10 for s in scraped)
        assert sum(value(s, "routstr_requests_total", **chat) for s in scraped) == requests == 40
        assert sum(value(s, "routstr_charged_msat_total") for s in scraped) == spent > 0
        for s in scraped:  # the books come from the shared ledger: the same on both
            assert value(s, "routstr_ledger_charged_msat") == spent
            assert value(s, "routstr_operator_credit_msat") == 4 * 1_000_000 - spent
            assert value(s, "routstr_mint_calls_total", operation="keysets", outcome="ok") >= 1

        # A model withdrawn through the admin API of one process goes from the other too.
        withdrawn = httpx.patch(f"{first.url}/admin/api/models/test/model",
                                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                                json={"enabled": False}, timeout=10)
        assert withdrawn.status_code == 200
        deadline = time.monotonic() + 15
        while "test/model" in offered(second):
            assert time.monotonic() < deadline, "the other process still offers the model"
            time.sleep(0.3)
        assert "test/model" not in offered(first)

        # Ready follows the mint and the database, on both processes.
        for proxy in proxies:
            assert wait_ready(proxy, 200)["checks"]["mint"]["ok"] is True
        mint.stop()
        for proxy in proxies:
            checks = wait_ready(proxy, 503)["checks"]
            assert checks["mint"]["ok"] is False and checks["ledger"]["ok"] is True
            assert checks["mint"]["age_s"] >= 1 and "Connect" in checks["mint"]["detail"]
        mint.start()
        for proxy in proxies:
            assert wait_ready(proxy, 200)["checks"]["mint"]["age_s"] < 1
        set_connections(pg_database, allowed=False)
        try:
            for proxy in proxies:
                checks = wait_ready(proxy, 503)["checks"]
                assert checks["ledger"]["ok"] is False and checks["mint"]["ok"] is True
                assert checks["ledger"]["detail"]
        finally:
            set_connections(pg_database, allowed=True)
        for proxy in proxies:
            assert wait_ready(proxy, 200)["checks"]["ledger"]["age_s"] < 2
    finally:
        first.stop()
        second.stop()
        mint.stop()


def _mnemonic() -> str:
    from mnemonic import Mnemonic

    return str(Mnemonic("english").generate())


# --- the parts on their own, on SQLite and PostgreSQL -----------------------------------------


def test_shared_sessions_and_login_limits_live_in_the_ledger(database_url: str) -> None:
    from routstr_addon.ledger import Ledger
    from routstr_addon.web.adminshared import SharedLoginLimiter, SharedSessions
    from routstr_addon.web.auth import password_tag

    one, two = Ledger(database_url), Ledger(database_url)  # two processes' connections
    try:
        tag = password_tag(PASSWORD)
        made = SharedSessions(one.admin, lifetime=100)
        seen = SharedSessions(two.admin, lifetime=100)
        sid, session = made.create(tag, now=1000)
        found = seen.get(sid, tag, now=1050)
        assert found is not None and found.csrf == session.csrf and found.csrf_ok(session.csrf)
        found.flash.append(("ok", "shown once"))
        seen.save_flash(found)
        again = made.get(sid, tag, now=1051)
        assert again is not None and again.flash == [("ok", "shown once")]
        assert made.get(sid, tag, now=1100) is None  # expired
        sid, _ = made.create(tag)
        assert seen.get(sid, password_tag("another password")) is None  # password changed
        assert made.get(sid, tag) is None  # and the session is gone for every process
        sid, _ = made.create(tag)
        seen.drop(sid)  # logout on one process
        assert made.get(sid, tag) is None and len(made) == 0
        few = SharedSessions(one.admin, limit=3)
        ids = [few.create(tag)[0] for _ in range(5)]
        assert len(few) == 3 and few.get(ids[0], tag) is None and few.get(ids[4], tag)

        limits = [SharedLoginLimiter(ledger.admin, attempts=5, window=60) for ledger in (one, two)]
        for i in range(5):
            assert limits[i % 2].retry_after("10.0.0.1", now=100 + i) == 0
            limits[i % 2].failed("10.0.0.1", now=100 + i)
        assert limits[0].retry_after("10.0.0.1", now=105) == 55
        assert limits[1].retry_after("10.0.0.1", now=105) == 55
        assert limits[1].retry_after("10.0.0.2", now=105) == 0
        assert limits[0].retry_after("10.0.0.1", now=160.5) == 0  # the first aged out
        limits[1].failed("10.0.0.1", now=161)
        limits[0].succeeded("10.0.0.1")
        assert limits[1].retry_after("10.0.0.1", now=162) == 0
    finally:
        one.close()
        two.close()


def test_an_older_ledger_gets_the_new_tables(database_url: str) -> None:
    from routstr_addon.ledger import Ledger

    ledger = Ledger(database_url)
    for table in ("admin_sessions", "admin_login_failures", "admin_actions"):
        ledger.db.execute_sql(f"DROP TABLE {table}")
    ledger.close()
    reopened = Ledger(database_url)
    try:
        assert {"admin_sessions", "admin_login_failures", "admin_actions"} <= set(
            reopened.db.get_tables())
        reopened.admin.journal(1.0, "api", "key.create", "k", "{}")
        assert reopened.admin.actions()[0]["action"] == "key.create"
    finally:
        reopened.close()
