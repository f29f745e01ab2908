"""The /admin dashboard: headless Chromium (Playwright) against a real mitmdump running the addon,
with a real Nutshell mint behind its wallet; plus the guard's and the queries' parts on their own.

The proxy's ledger is seeded, before it starts, with 32 days of history (ids grow with time, as
in a real journal), so the revenue chart has known figures, including days just outside it.
"""

from __future__ import annotations

import hashlib
import http.client as httpclient
import re
import shutil
import sqlite3
import time
from bisect import bisect_left
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest
from mitmproxy import http
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from routstr_addon.dev.localmint import LocalMint
from routstr_addon.ledger import Ledger, PayoutTotals, hash_key
from routstr_addon.web import AdminState, Peer, Services
from routstr_addon.web import admin as admin_routes
from routstr_addon.web.auth import LoginLimiter, Sessions, password_matches, password_tag
from routstr_addon.web.routes import lookup

from .conftest import ROOT, Proxy, books_balance, raw, start_proxy
from .ecash_user import UserWallet
from .upstream import TestUpstream

PASSWORD = "correct horse battery staple"
COST_SATS = 3  # fixed price per request on the admin proxy: margins in whole sats
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DAY = 86400
HISTORY_LABEL = "history seed"
SECRETS: list[str] = []  # session ids, keys and tokens met: none may reach the proxy's log

GET_URLS = ["/admin", "/admin/", "/admin/login/x", "/admin/keys", "/admin/keys?q={id}",
            "/admin/keys?page=2", "/admin/ledger", "/admin/ledger?key={id}&kind=charge",
            "/admin/ledger?before=99", "/admin/payouts", "/admin/payouts?page=2",
            "/admin/nothing-here", "/admin/keys/create", "/admin/withdraw", "/adminx",
            "/admin/static/../keys"]
POST_URLS = ["/admin", "/admin/logout", "/admin/keys/create", "/admin/keys/disable",
             "/admin/keys/enable", "/admin/withdraw", "/admin/keys", "/admin/nothing-here"]


# --- the seeded history ---------------------------------------------------------------------


def history(now: float) -> list[tuple[float, int]]:
    """(time, cost msat) of each past request: days 1–32 ago, some days busier than others."""
    today = now - now % DAY
    requests = []
    for days_ago in range(32, 0, -1):
        for j in range(1 + days_ago * 7 % 5):
            requests.append((today - days_ago * DAY + 12 * 3600 + j * 60,
                             (1 + days_ago % 4) * 1000 + 250))
    return requests


def expected_day(now: float, days_ago: int) -> tuple[str, int, int]:
    """The seeded (date, revenue msat, requests) of one day."""
    start = now - now % DAY - days_ago * DAY
    mine = [cost for t, cost in history(now) if start <= t < start + DAY]
    return time.strftime("%Y-%m-%d", time.gmtime(start)), sum(mine), len(mine)


def seed(database: Path, now: float) -> None:
    """A key with a month of charged requests, written as the proxy writes them (reserve,
    then charge), in time order; the books balance (``Ledger.check``)."""
    ledger = Ledger(f"sqlite:///{database}")
    ledger.close()
    rows = history(now)
    credit = 1_000_000_000
    key_hash = hash_key("sk-history-seed")
    db = sqlite3.connect(database)
    with db:
        start = rows[0][0] - 3600
        spent = sum(cost for _, cost in rows)
        db.execute("INSERT INTO api_keys (key_hash, balance_msat, reserved_msat, "
                   "total_spent_msat, total_requests, created_at, label, disabled, backed) "
                   "VALUES (?, ?, 0, ?, ?, ?, ?, 0, 0)",
                   (key_hash, credit - spent, spent, len(rows), start, HISTORY_LABEL))
        entry = ("INSERT INTO ledger_entries (created_at, key_hash, kind, amount_msat, "
                 "reserved_msat, request_id, model, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        db.execute(entry, (start, key_hash, "credit", credit, 0, None, None, "seeded"))
        for i, (t, cost) in enumerate(rows):
            db.execute(entry, (t, key_hash, "reserve", 0, cost, f"seed-{i}", "test/model", None))
            db.execute(entry, (t + 1, key_hash, "charge", -cost, -cost, f"seed-{i}",
                               "test/model", None))
    db.close()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(upstream: TestUpstream, mint: LocalMint,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The proxy with the dashboard on, a wallet at ``mint`` and a fixed price per request."""
    workdir = tmp_path_factory.mktemp("admin")
    (workdir / "data").mkdir()
    seed(workdir / "data" / "routstr.sqlite", time.time())
    p = start_proxy(workdir, upstream.url, {
        "UPSTREAM_BASE_URL": f"{upstream.url}/v1", "ADMIN_PASSWORD": PASSWORD,
        "CASHU_MINTS": mint.url, "MODEL_BASED_PRICING": "false",
        "COST_PER_REQUEST": str(COST_SATS)})
    yield p
    p.stop()
    assert p.check() == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser, admin: Proxy) -> Iterator[BrowserContext]:
    ctx = browser.new_context(base_url=admin.url, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def log_in(page: Page) -> str:
    """Log in through the form; returns the session cookie's value."""
    page.goto("/admin")
    assert urlsplit(page.url).path == "/admin/login"
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/admin")
    cookie = next(c for c in page.context.cookies() if c["name"] == admin_routes.COOKIE)
    SECRETS.append(cookie["value"])
    return cookie["value"]


def in_sats(msat: int) -> str:
    """msat as the pages write sats: 1,234.500"""
    return f"{Decimal(msat) / 1000:,.3f}"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def chat(proxy: Proxy, key: str) -> httpx.Response:
    return raw(proxy, "POST", "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
               json={"model": "test/model", "messages": [{"role": "user", "content": "hi"}]})


def margin_msat(proxy: Proxy) -> int:
    """Ecash held − what users are owed − payouts under way, read straight from the database."""
    ledger = proxy.ledger()
    try:
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT unit, COALESCE(SUM(amount), 0) FROM proofs "
                    "WHERE state IN ('unspent', 'held', 'reserved') GROUP BY unit")
        held = sum(int(a) * (1000 if u == "sat" else 1) for u, a in cur.fetchall())
        cur.execute("SELECT COALESCE(SUM(balance_msat), 0) FROM api_keys WHERE backed")
        owed = int(cur.fetchone()[0])
        cur.execute("SELECT COALESCE(SUM(msat), 0) FROM refunds WHERE state = 'pending'")
        owed += int(cur.fetchone()[0])
        cur.execute("SELECT COALESCE(SUM(amount + fee_reserve), 0) FROM payouts "
                    "WHERE state = 'pending'")
        owed += int(cur.fetchone()[0]) * 1000
        return held - owed
    finally:
        ledger.close()


def key_count(proxy: Proxy) -> int:
    ledger = proxy.ledger()
    try:
        return len(ledger.keys(100_000))
    finally:
        ledger.close()


def ecash_key(proxy: Proxy, user: UserWallet, sats: int) -> str:
    token = user.token(sats)
    created = raw(proxy, "POST", "/v1/balance/create", json={"cashu_token": token})
    assert created.status_code == 200, created.text
    key: str = created.json()["api_key"]
    SECRETS.extend([key, token])
    return key


# --- without a password ---------------------------------------------------------------------


def test_without_a_password_every_page_only_explains_how_to_set_one(proxy: Proxy,
                                                                     browser: Browser) -> None:
    key = proxy.new_key(sats=4321, label="not for your eyes")
    kid = key_id(key)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for url in GET_URLS:
            r = c.get(url.format(id=kid))
            assert r.status_code == 200, url
            assert "ADMIN_PASSWORD" in r.text and ".env" in r.text, url
            assert kid not in r.text and "4,321" not in r.text and "not for" not in r.text
        for url in [*POST_URLS, "/admin/login"]:
            r = c.post(url, data={"password": "", "key_hash": hash_key(key),
                                  "balance_sats": "5"})
            assert r.status_code == 403, url
            assert "ADMIN_PASSWORD" in r.text and kid not in r.text, url
            assert "set-cookie" not in r.headers
        assert c.get("/admin/static/admin.css").status_code == 200
    assert not proxy.key_state(key).disabled
    page = browser.new_page()
    try:
        page.goto(f"{proxy.url}/admin/keys")
        assert page.locator("h1").inner_text() == "The dashboard is off"
        assert "ADMIN_PASSWORD" in page.content()
        assert page.locator("input").count() == 0 and page.locator("table").count() == 0
    finally:
        page.close()


# --- no session: nothing --------------------------------------------------------------------


def test_requests_without_a_session_get_the_login_page_and_no_data(
        admin: Proxy, upstream: TestUpstream) -> None:
    key = admin.new_key(sats=8765, label="secret customer")
    kid, full = key_id(key), hash_key(key)
    keys_before = key_count(admin)
    forbidden = [kid, full[:12], "8,765", "secret customer", HISTORY_LABEL]
    upstream.clear()
    with httpx.Client(base_url=admin.url, timeout=10) as c:
        for cookie in (None, "forged-session-id", "x" * 500):
            headers = {"cookie": f"{admin_routes.COOKIE}={cookie}"} if cookie else {}
            for url in GET_URLS:
                r = c.get(url.format(id=kid), headers=headers)
                assert r.status_code == 303, url
                assert r.headers["location"] == "/admin/login" and r.content == b"", url
            for url in POST_URLS:
                r = c.post(url, headers=headers, data={
                    "csrf": "guess", "key_hash": full, "balance_sats": "99",
                    "amount_sats": "1"})
                assert r.status_code == 303 and r.headers["location"] == "/admin/login", url
                assert r.content == b""
        login = c.get("/admin/login")
        assert login.status_code == 200 and 'type="password"' in login.text
        assert not any(f in login.text for f in forbidden)
    assert not admin.key_state(key).disabled
    assert key_count(admin) == keys_before
    assert not [r for r in upstream.requests if "admin" in r.path]  # never forwarded


@pytest.mark.parametrize("path", [
    "/admin/static/../../routstr_addon/settings.py", "/admin/static/../keys",
    "/admin/static/..%2f..%2fpyproject.toml", "/admin/static/%2e%2e/%2e%2e/README.md",
    "/admin/static//etc/passwd", "/admin/static/admin.css/../../../.env",
    "/admin/static/./admin.css", "/admin/static/ADMIN.CSS", "/admin/static/"])
def test_static_files_are_a_fixed_set(admin: Proxy, path: str) -> None:
    host, port = urlsplit(admin.url).netloc.split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)  # sent as is: no client-side normalization of dot segments
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 404 and body == b"not found"


def test_the_stylesheet_is_served(admin: Proxy) -> None:
    css = raw(admin, "GET", "/admin/static/admin.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "url(" not in css.text and "@import" not in css.text  # nothing from elsewhere


# --- in the browser -------------------------------------------------------------------------


def test_a_wrong_password_is_refused(page: Page) -> None:
    page.goto("/admin/keys")
    assert urlsplit(page.url).path == "/admin/login"
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "Wrong password."
    assert urlsplit(page.url).path == "/admin/login"
    assert not [c for c in page.context.cookies() if c["name"] == admin_routes.COOKIE]
    page.goto("/admin")
    assert urlsplit(page.url).path == "/admin/login"


def test_login_sets_a_strict_httponly_session_cookie(page: Page) -> None:
    log_in(page)
    cookie = next(c for c in page.context.cookies() if c["name"] == admin_routes.COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert not cookie["secure"]  # plain http here; over https it is Secure
    assert len(cookie["value"]) >= 40
    assert page.locator("h1").inner_text() == "Overview"
    assert page.evaluate("document.cookie") == ""  # not readable by scripts


def test_the_keys_view_shows_a_key_made_through_the_api(page: Page, admin: Proxy,
                                                       user: UserWallet) -> None:
    key = ecash_key(admin, user, 50)
    log_in(page)
    page.goto("/admin/keys")
    row = page.locator(f"tr[data-key='{key_id(key)}']")
    assert row.locator("td.balance").inner_text() == "50.000"
    assert "ecash" in row.inner_text() and "active" in row.inner_text()
    assert key not in page.content()
    page.fill("input[name=q]", key_id(key)[:10])  # search by the start of its id
    page.click("form[role=search] button")
    rows = page.locator("#keys tbody tr")
    assert rows.count() == 1 and rows.first.get_attribute("data-key") == key_id(key)
    page.fill("input[name=q]", "HISTORY")  # or by label
    page.click("form[role=search] button")
    assert page.locator("#keys tbody tr").count() == 1
    assert HISTORY_LABEL in page.locator("#keys").inner_text()


def test_create_key_shows_it_once_with_the_balance_given(page: Page, admin: Proxy) -> None:
    log_in(page)
    page.goto("/admin/keys")
    page.fill("input[name=balance_sats]", "21")
    page.fill("input[name=label]", "made in the browser")
    page.fill("input[name=expiry_days]", "7")
    page.click("text=Create key")
    assert page.locator("h1").inner_text() == "New API key"
    key = page.locator("textarea.secret").input_value()
    SECRETS.append(key)
    assert re.fullmatch(r"sk-[0-9a-f]{64}", key)
    info = raw(admin, "GET", "/v1/balance/info", headers={"authorization": f"Bearer {key}"})
    assert info.status_code == 200
    assert info.json()["balance"] == 21_000 and info.json()["disabled"] is False
    assert 6.9 * DAY < info.json()["expiry_time"] - time.time() <= 7 * DAY
    state = admin.key_state(key)
    assert state.label == "made in the browser" and not state.backed
    page.click("text=Done")
    assert page.locator(f"tr[data-key='{key_id(key)}']").count() == 1
    assert key not in page.content()  # never shown again


def test_disable_key_refuses_its_requests(page: Page, admin: Proxy) -> None:
    key = admin.new_key(sats=10)
    SECRETS.append(key)
    assert chat(admin, key).status_code == 200
    log_in(page)
    page.goto(f"/admin/keys?q={key_id(key)}")
    row = page.locator(f"tr[data-key='{key_id(key)}']")
    row.locator("button", has_text="Disable").click()
    assert f"Key {key_id(key)} disabled." in page.locator(".flash").inner_text()
    assert "disabled" in page.locator(f"tr[data-key='{key_id(key)}'] td.status").inner_text()
    refused = chat(admin, key)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "key_disabled"
    assert admin.key_state(key).balance_msat == (10 - COST_SATS) * 1000  # nothing charged


def test_withdraw_the_margin_and_never_more(page: Page, admin: Proxy, user: UserWallet,
                                            mint: LocalMint) -> None:
    key = ecash_key(admin, user, 20)
    before = margin_msat(admin)
    for _ in range(2):  # each request earns the operator COST_SATS
        assert chat(admin, key).status_code == 200
    admin.wait_settled()
    margin = margin_msat(admin)
    assert margin - before == 2 * COST_SATS * 1000
    log_in(page)
    assert page.locator("#profit").inner_text() == in_sats(margin)

    too_much = margin // 1000 + 1
    page.fill("input[name=amount_sats]", str(too_much))
    page.click("text=Withdraw as a token")
    assert page.locator("h1").inner_text() == "Refused"
    assert "more than the margin" in page.locator("main").inner_text()
    assert margin_msat(admin) == margin  # nothing moved

    page.goto("/admin")
    page.fill("input[name=amount_sats]", "4")
    page.click("text=Withdraw as a token")
    assert page.locator("h1").inner_text() == "Withdrawn: 4 sats"
    token = page.locator("textarea.secret").input_value()
    SECRETS.append(token)
    assert token.startswith("cashu")
    assert margin_msat(admin) == margin - 4000
    assert user.receive(token) == 4  # real ecash, now the operator's own
    books_balance(admin, mint.url)  # what users are owed is still covered


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
        page: Page, admin: Proxy) -> None:
    session = log_in(page)
    victim = admin.new_key(sats=30)
    victim_hash = hash_key(victim)
    keys_before, margin_before = key_count(admin), margin_msat(admin)
    cookie = {"cookie": f"{admin_routes.COOKIE}={session}"}
    with httpx.Client(base_url=admin.url, timeout=10, headers=cookie) as c:
        assert c.get("/admin/keys").status_code == 200  # the session itself is good
        for csrf in (None, "", "wrong-token"):
            extra = {} if csrf is None else {"csrf": csrf}
            for url, form in (("/admin/keys/disable", {"key_hash": victim_hash}),
                              ("/admin/keys/create", {"balance_sats": "1000"}),
                              ("/admin/withdraw", {"amount_sats": "1"}),
                              ("/admin/logout", {})):
                r = c.post(url, data={**form, **extra})
                assert r.status_code == 403, (url, csrf)
                assert "nothing was done" in r.text and "set-cookie" not in r.headers
        assert c.get("/admin/keys").status_code == 200  # still logged in: logout was refused
        # With the token, an action goes through, and only ever back to a page of keys.
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/admin/keys").text)
        assert token is not None
        for back, location in (("/admin/keys?q=ab&page=2", "/admin/keys?q=ab&page=2"),
                               ("https://elsewhere.example/", "/admin/keys"),
                               ("//elsewhere.example/admin/keys", "/admin/keys"),
                               ("/admin/keys\r\nset-cookie: x=1", "/admin/keys")):
            r = c.post("/admin/keys/enable", data={"csrf": token.group(1),
                                                    "key_hash": victim_hash, "back": back})
            assert r.status_code == 303 and r.headers["location"] == location, back
            assert "set-cookie" not in r.headers
    assert not admin.key_state(victim).disabled
    assert key_count(admin) == keys_before and margin_msat(admin) == margin_before


def test_overview_figures_chart_and_screenshot(page: Page, admin: Proxy, browser: Browser,
                                               tmp_path: Path) -> None:
    log_in(page)
    now = time.time()
    ledger = admin.ledger()
    try:
        keys = len(ledger.keys(100_000))
    finally:
        ledger.close()
    assert page.locator("#keys-count").inner_text() == f"{keys:,}"
    # The chart: 30 days, each bar titled with its own figures; the seeded days are exact.
    chart = page.locator("svg.chart")
    assert chart.locator("g").count() == 30
    titles = [t.strip() for t in chart.locator("g > title").all_text_contents()]
    for days_ago in (29, 14, 3, 1):
        date, revenue, requests = expected_day(now, days_ago)
        assert f"{date}: {in_sats(revenue)} sats charged, {requests} requests" in titles
    old_date, _, _ = expected_day(now, 30)  # just outside the window
    assert not [t for t in titles if t.startswith(old_date)]
    assert titles[-1].endswith("(today, so far)")
    month = sum(expected_day(now, d)[1] for d in range(1, 30))
    ledger = admin.ledger()
    try:
        today_start = now - now % DAY
        cur = ledger.db.connection().cursor()
        cur.execute("SELECT COALESCE(SUM(-amount_msat), 0) FROM ledger_entries "
                    "WHERE kind = 'charge' AND created_at >= ?", (today_start,))
        today = int(cur.fetchone()[0])
        cur.execute("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'reserve' "
                    "AND created_at >= ?", (today_start,))
        today_requests = int(cur.fetchone()[0])
    finally:
        ledger.close()
    assert today > 0
    assert page.locator("#revenue-today").inner_text() == in_sats(today)
    assert page.locator("#requests-today").inner_text() == f"{today_requests:,}"
    assert page.locator("#revenue-30d").inner_text() == in_sats(month + today)

    page.screenshot(path=str(tmp_path / "admin-overview.png"), full_page=True)
    phone = browser.new_context(base_url=admin.url, viewport={"width": 390, "height": 844},
                                device_scale_factor=2, is_mobile=True, has_touch=True)
    try:
        small = phone.new_page()
        log_in(small)
        for path in ("/admin", "/admin/keys", "/admin/ledger", "/admin/payouts"):
            small.goto(path)
            # Nothing sticks out sideways; wide tables scroll inside their own box.
            assert small.evaluate("document.documentElement.scrollWidth") <= 390, path
        small.goto("/admin")
        small.screenshot(path=str(tmp_path / "admin-overview-phone.png"), full_page=True)
    finally:
        phone.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name in ("admin-overview.png", "admin-overview-phone.png"):
        shutil.copy(tmp_path / name, ARTIFACTS / name)
    print(f"\nscreenshots in {tmp_path} (copied to {ARTIFACTS}): admin-overview.png, "
          "admin-overview-phone.png")


def test_ledger_and_payouts_views(page: Page, admin: Proxy) -> None:
    log_in(page)
    seeded = hash_key("sk-history-seed")
    page.goto(f"/admin/ledger?key={seeded[:10]}&kind=charge")
    rows = page.locator("#ledger tbody tr")
    assert rows.count() == 50 and "charge" in rows.first.inner_text()
    assert page.locator("text=older").count() == 1
    page.click("text=older")
    assert page.locator("#ledger tbody tr").count() > 0
    page.goto("/admin/ledger?key=zz")
    assert "0-9 and a-f" in page.locator("main").inner_text()
    page.goto("/admin/payouts")
    assert "No payouts yet." in page.locator("#payouts").inner_text()


def test_logout_ends_the_session(page: Page, admin: Proxy) -> None:
    session = log_in(page)
    page.click("text=Log out")
    page.wait_for_url("**/admin/login")
    for path in ("/admin", "/admin/keys", "/admin/ledger", "/admin/payouts"):
        page.goto(path)
        assert urlsplit(page.url).path == "/admin/login", path
    with httpx.Client(base_url=admin.url, timeout=10) as c:  # the old id is worth nothing
        r = c.get("/admin/keys", headers={"cookie": f"{admin_routes.COOKIE}={session}"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"


def test_login_attempts_are_rate_limited(upstream: TestUpstream, tmp_path: Path) -> None:
    """On a proxy of its own: the limit would lock the other tests out of theirs."""
    p = start_proxy(tmp_path / "limited", upstream.url,
                    {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "ADMIN_PASSWORD": PASSWORD})
    try:
        with httpx.Client(base_url=p.url, timeout=10) as c:
            for _ in range(5):
                assert c.post("/admin/login", data={"password": "guess"}).status_code == 401
            limited = c.post("/admin/login", data={"password": PASSWORD})  # even the right one
            assert limited.status_code == 429
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            assert "Too many failed attempts" in limited.text
            assert "set-cookie" not in limited.headers
    finally:
        p.stop()


def test_the_login_limit_is_per_client_address(upstream: TestUpstream, tmp_path: Path) -> None:
    p = start_proxy(tmp_path / "per-address", upstream.url,
                    {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "ADMIN_PASSWORD": PASSWORD})

    def client(address: str) -> httpx.Client:
        return httpx.Client(base_url=p.url, timeout=10,
                            transport=httpx.HTTPTransport(local_address=address))

    try:
        with client("127.0.0.3") as one, client("127.0.0.4") as two:
            for _ in range(5):
                assert one.post("/admin/login", data={"password": "guess"}).status_code == 401
            assert one.post("/admin/login", data={"password": PASSWORD}).status_code == 429
            assert two.post("/admin/login", data={"password": PASSWORD}).status_code == 303
    finally:
        p.stop()
    assert "failed login from 127.0.0.3" in p.output.text


def test_no_password_session_or_key_reaches_the_log(admin: Proxy) -> None:
    with httpx.Client(base_url=admin.url, timeout=10) as c:  # one more of each, at least
        login = c.post("/admin/login", data={"password": PASSWORD})
        session = login.cookies[admin_routes.COOKIE]
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/admin/keys").text)
        assert token is not None
        made = c.post("/admin/keys/create", data={"csrf": token.group(1), "balance_sats": "1"})
        key = re.search(r"sk-[0-9a-f]{64}", made.text)
        assert key is not None
        SECRETS.extend([session, token.group(1), key.group(0)])
    log = admin.output.text
    assert PASSWORD not in log
    assert SECRETS and not [s for s in SECRETS if s in log]


# --- the parts on their own -----------------------------------------------------------------


def test_password_check_sessions_and_csrf() -> None:
    assert password_matches(PASSWORD, PASSWORD)
    assert not password_matches(PASSWORD + " ", PASSWORD) and not password_matches("", "")
    sessions = Sessions(lifetime=100)
    tag = password_tag(PASSWORD)
    sid, session = sessions.create(tag, now=1000)
    assert sessions.get(sid, tag, now=1099) is session
    assert sessions.get(sid, password_tag("another password"), now=1050) is None  # changed: over
    assert sessions.get(sid, tag, now=1050) is None  # and gone for good
    sid, session = sessions.create(tag, now=1000)
    assert sessions.get(sid, tag, now=1100) is None  # expired
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("") \
        and not session.csrf_ok(None) and not session.csrf_ok(session.csrf[:-1])
    few = Sessions(limit=3)
    ids = [few.create(tag)[0] for _ in range(5)]
    assert len(few) == 3 and few.get(ids[0], tag) is None and few.get(ids[4], tag) is not None


def test_login_limiter_counts_failures_per_address_in_a_sliding_window() -> None:
    limiter = LoginLimiter(attempts=5, window=60)
    for i in range(5):
        assert limiter.retry_after("10.0.0.1", now=100 + i) == 0
        limiter.failed("10.0.0.1", now=100 + i)
    assert limiter.retry_after("10.0.0.1", now=105) == 55
    assert limiter.retry_after("10.0.0.2", now=105) == 0  # another address is not held up
    assert limiter.retry_after("10.0.0.1", now=160.5) == 0  # the first failure aged out
    limiter.succeeded("10.0.0.1")
    assert limiter.retry_after("10.0.0.1", now=161) == 0


def _services(password: str = PASSWORD) -> Services:
    config = SimpleNamespace(admin_password=password, name="Test")
    admin = AdminState(Sessions(), LoginLimiter(attempts=2, window=60))
    return cast(Services, SimpleNamespace(config=config, ledger=None, wallet=None, admin=admin))


def _post(services: Services, peer: Peer, path: str, body: bytes,
          headers: dict[str, str] | None = None) -> http.Response:
    handlers = lookup(path)
    assert handlers is not None
    fields: dict[str | bytes, str | bytes] = {
        "content-type": "application/x-www-form-urlencoded"}
    fields.update(headers or {})
    request = http.Request.make("POST", f"http://proxy{path}", body, fields)
    answer: Any = handlers["POST"](services, request, peer)
    assert isinstance(answer, http.Response)
    return answer


def test_the_limit_and_the_secure_flag_follow_the_client_connection() -> None:
    """Handlers are told the client's connection: limits are per address, and the cookie is
    Secure when the browser came over TLS. Each runtime keeps its own sessions and limits."""
    services = _services()
    right = f"password={PASSWORD}".replace(" ", "+").encode()
    first = Peer("10.1.1.1", tls=False)
    for _ in range(2):
        assert _post(services, first, "/admin/login", b"password=nope").status_code == 401
    assert _post(services, first, "/admin/login", b"password=nope").status_code == 429
    assert _post(_services(), first, "/admin/login", right).status_code == 303  # another runtime
    ok = _post(services, Peer("10.2.2.2", tls=True), "/admin/login", right)
    assert ok.status_code == 303
    cookie = ok.headers["set-cookie"]
    assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert len(services.admin.sessions) == 1
    plain_peer = Peer("10.3.3.3", tls=False)
    behind = _post(services, plain_peer, "/admin/login", right, {"x-forwarded-proto": "https"})
    assert "; Secure" in behind.headers["set-cookie"]
    plain = _post(services, plain_peer, "/admin/login", right)
    assert "Secure" not in plain.headers["set-cookie"]


def test_every_admin_path_is_answered_locally() -> None:
    for path in ("/admin", "/admin/", "/admin/anything/at/all", "/admin/static/../../x",
                 "/adminer"):
        handlers = lookup(path)
        assert handlers is not None and set(handlers) == {"GET", "POST"}, path
    assert lookup("/v1/chat/completions") is None


def _journal(tmp_path: Path, times: list[float]) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path / 'journal.sqlite'}")
    with ledger.transaction() as tx:
        tx.executemany("INSERT INTO ledger_entries (id, created_at, key_hash, kind, amount_msat, "
                        "reserved_msat) VALUES (?, ?, 'k', ?, ?, 0)",
                        [(3 * i + 7, t, "charge" if i % 2 else "reserve", -(i % 13) * 10)
                         for i, t in enumerate(times)])
    return ledger


def test_the_moment_search_is_a_bounded_binary_search(tmp_path: Path) -> None:
    times = [1_000_000 + i * 0.5 for i in range(200_000)]  # ids 7, 10, 13…: gaps are fine
    ids = [3 * i + 7 for i in range(len(times))]
    ledger = _journal(tmp_path, times)
    statements: list[str] = []
    ledger.db.connection().set_trace_callback(statements.append)
    try:
        for moment in (0, 1_000_000, 1_000_000.25, 1_050_000, 1_099_999.5, 2_000_000):
            statements.clear()
            found = ledger.reports.first_id_at(moment)
            # A boundary: every id below it is before the moment, every id from it on is not.
            assert bisect_left(ids, found) == bisect_left(times, moment), moment
            assert found <= ids[-1] + 1
            assert len(statements) <= 25, len(statements)  # log2(600k) + 2, never a scan
    finally:
        ledger.close()


def test_daily_revenue_matches_a_plain_count(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    times = [now - 40 * DAY + i * 97.3 for i in range(int(40 * DAY / 97.3))]
    ledger = _journal(tmp_path, times)
    try:
        for _ in range(2):  # the second time, the days that are over come from memory
            days = ledger.reports.daily_revenue(30, now)
            assert len(days) == 30 and days[-1].start == now - now % DAY
            for day in days:
                mine = range(bisect_left(times, day.start), bisect_left(times, day.start + DAY))
                assert day.requests == sum(1 for i in mine if i % 2 == 0)
                assert day.revenue_msat == sum((i % 13) * 10 for i in mine if i % 2)
    finally:
        ledger.close()


def test_the_dashboard_queries_on_both_databases(database_url: str) -> None:
    ledger = Ledger(database_url)
    try:
        key, state = ledger.create_key(5000, label="Alice_100%")
        ledger.create_key(7000, label="bob")
        ledger.reserve(state.key_hash, 1200, "r1", "test/model")
        ledger.settle("r1", 1000, model="test/model")
        assert [k.label for k in ledger.reports.keys_page("alice_100%").rows] == ["Alice_100%"]
        assert ledger.reports.keys_page("lice_1").rows[0].key_hash == state.key_hash
        # LIKE's wildcards are taken literally
        assert [k.label for k in ledger.reports.keys_page("%").rows] == ["Alice_100%"]
        assert ledger.reports.keys_page("b_b").rows == []
        assert [k.key_hash for k in ledger.reports.keys_page(state.key_hash[:9]).rows] == \
            [state.key_hash]
        both = ledger.reports.keys_page("", per_page=1)
        assert len(both.rows) == 1 and both.has_more and both.next == 2
        assert ledger.set_disabled(state.key_hash, True)
        assert ledger.set_disabled(state.key_hash, True) is False  # it already was
        assert ledger.set_disabled("f" * 64, True) is None
        assert ledger.key(state.key_hash).disabled  # type: ignore[union-attr]
        charges = ledger.reports.journal_page(state.key_hash[:8], "charge")
        assert [e["amount_msat"] for e in charges.rows] == [-1000]
        everything = ledger.reports.journal_page(per_page=2)
        assert len(everything.rows) == 2 and everything.has_more
        rest = ledger.reports.journal_page(before=everything.next)
        assert [e["kind"] for e in everything.rows] == ["charge", "reserve"]
        assert [e["kind"] for e in rest.rows] == ["credit", "credit"] and not rest.has_more
        assert ledger.reports.journal_page(kind="charge").rows[0]["key_hash"] == state.key_hash
        today = ledger.reports.daily_revenue(30)[-1]
        assert (today.revenue_msat, today.requests) == (1000, 1)
        stats = ledger.reports.key_stats()
        assert (stats.keys, stats.balance_msat, stats.disabled_keys) == (2, 11_000, 1)
        assert ledger.reports.payouts_page().rows == []
        assert ledger.reports.payout_totals() == PayoutTotals({}, 0)
        assert key.startswith("sk-")
    finally:
        ledger.close()
