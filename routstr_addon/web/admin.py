"""``/admin``: the operator's dashboard, answered by the proxy itself (never forwarded).

Server-rendered HTML (jinja2, autoescaped) with one local stylesheet and no script: overview
(the books, keys, requests and revenue, a revenue chart drawn as inline SVG), keys, the
journal and payouts; and three actions, each a POST carrying the session's CSRF token: create
a funded key (shown once), disable or enable a key, withdraw the operator's margin as a Cashu
token (shown once).

Without ``ADMIN_PASSWORD`` every page only says how to set it. With it, everything but the
login form and the stylesheet needs a session (see ``adminauth``); a request without one is
sent to the login form and gets no data. Passwords, session ids, keys and tokens are never
logged.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from mitmproxy import http

from routstr_addon.amounts import sats
from routstr_addon.ecash.mint import MintError, MintUnreachable
from routstr_addon.ecash.tokens import UNIT_MSAT
from routstr_addon.ecash.wallet import WalletError
from routstr_addon.ledger import KINDS, Limits, is_hex_prefix, parse_period
from routstr_addon.upstreams.providers import ProviderSpec
from routstr_addon.web import Handler, Peer, Services
from routstr_addon.web.auth import Session, password_matches, password_tag
from routstr_addon.web.chart import Bar, bar_chart

__all__ = ["COOKIE", "HANDLERS"]

logger = logging.getLogger("routstr.admin")

COOKIE = "routstr_admin"
LOGIN = "/admin/login"
MAX_FORM = 16 * 1024
MAX_KEY_SATS = 2_100_000_000_000_000  # 21 million BTC
_BACK_TO_KEYS = re.compile(r"/admin/keys(\?[A-Za-z0-9_.~%+=&-]{0,300})?")  # a page of keys
_PACKAGE = Path(__file__).resolve().parent
_STATIC: dict[str, tuple[str, bytes]] = {
    "admin.css": ("text/css; charset=utf-8", (_PACKAGE / "static" / "admin.css").read_bytes()),
}
_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": ("default-src 'none'; style-src 'self'; img-src 'self' data:; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
}


# --- rendering ------------------------------------------------------------------------------


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M")


_env = Environment(loader=FileSystemLoader(_PACKAGE / "templates" / "admin"),
                   autoescape=select_autoescape(default=True, default_for_string=True),
                   trim_blocks=True, lstrip_blocks=True)
_env.filters["sats"] = sats
_env.filters["when"] = when
_env.filters["limits"] = lambda limits: describe_limits(limits)


def _response(status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
              headers: Mapping[str, str] | None = None) -> http.Response:
    resp = http.Response.make(status, body, {"content-type": content_type})
    resp.headers.update(_SECURITY_HEADERS)
    if headers:
        for name, value in headers.items():
            resp.headers[name] = value
    return resp


def _render(services: Services, template: str, status: int = 200,
            session: Session | None = None, headers: Mapping[str, str] | None = None,
            **context: Any) -> http.Response:
    flash: list[tuple[str, str]] = []
    if session is not None and session.flash:
        flash, session.flash = session.flash, []
        services.admin.sessions.save_flash(session)  # shown once, on whichever process
    page = _env.get_template(template).render(
        name=services.config.name, csrf=session.csrf if session else None, flash=flash,
        **context)
    return _response(status, page.encode(), headers=headers)


def _redirect(location: str, cookie: str | None = None) -> http.Response:
    headers = {"location": location}
    if cookie is not None:
        headers["set-cookie"] = cookie
    return _response(303, b"", headers=headers)


def _message(services: Services, status: int, title: str, text: str,
             session: Session | None = None, back: str = "/admin") -> http.Response:
    return _render(services, "message.html", status, session, title=title, text=text, back=back)


# --- reading the request --------------------------------------------------------------------


def _split(request: http.Request) -> tuple[str, dict[str, str]]:
    parts = urlsplit(request.path)
    query = {k: v[0] for k, v in parse_qs(parts.query, max_num_fields=20).items()}
    return parts.path, query


def _form(request: http.Request) -> dict[str, str]:
    body = request.raw_content or b""
    if len(body) > MAX_FORM:
        return {}
    try:
        fields = parse_qs(body.decode(), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in fields.items()}


def _secure(request: http.Request, peer: Peer) -> bool:
    """Whether the browser reached us over https: on the connection itself, or through a
    reverse proxy in front that says so (a client lying here only hurts its own cookie)."""
    return peer.tls or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _session_id(request: http.Request) -> str | None:
    values = request.cookies.get_all(COOKIE)
    return values[0] if values else None


def _session(services: Services, request: http.Request) -> tuple[str | None, Session | None]:
    session_id = _session_id(request)
    tag = password_tag(services.config.admin_password)
    return session_id, services.admin.sessions.get(session_id, tag)


def _cookie(value: str, max_age: int, secure: bool) -> str:
    return (f"{COOKIE}={value}; Path=/admin; Max-Age={max_age}; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else ""))


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        number = int((value or "").strip() or default)
    except ValueError:
        return default
    return min(max(number, low), high)


# --- GET --------------------------------------------------------------------------------------


def get(services: Services, request: http.Request, peer: Peer) -> http.Response:
    path, query = _split(request)
    if path.startswith("/admin/static/"):
        found = _STATIC.get(path.removeprefix("/admin/static/"))
        if found is None:
            return _response(404, b"not found", "text/plain; charset=utf-8")
        return _response(200, found[1], found[0], {"cache-control": "public, max-age=300"})
    if not services.config.admin_password:
        return _render(services, "setup.html", title="Turn the dashboard on")
    _, session = _session(services, request)
    if path == LOGIN:
        if session is not None:
            return _redirect("/admin")
        return _render(services, "login.html", title="Log in")
    if session is None:
        return _redirect(LOGIN)
    view = _VIEWS.get(path)
    if view is None:
        return _message(services, 404, "Not found", "There is no such page.", session)
    return view(services, query, session)


def _overview(services: Services, query: dict[str, str], session: Session) -> http.Response:
    ledger, wallet = services.ledger, services.wallet
    now = time.time()
    days = ledger.reports.daily_revenue(30, now)
    stats = ledger.reports.key_stats()
    books = ledger.books(list(wallet.mints)) if wallet is not None else None
    holdings = sorted((h for h in books.holdings if h.count),
                      key=lambda h: (h.mint, h.unit)) if books else None
    today = days[-1]
    bars = [Bar(d.label[5:], d.revenue_msat / 1000,
                f"{d.label}: {sats(d.revenue_msat)} sats charged, {d.requests:,} requests"
                + (" (today, so far)" if d is today else ""), d is today) for d in days]
    chart = bar_chart(bars, title="Revenue per day, last 30 days (sats, UTC)")
    return _render(services, "overview.html", session=session, title="Overview",
                   active="overview", books=books, holdings=holdings, stats=stats,
                   today=today, month_msat=sum(d.revenue_msat for d in days),
                   month_requests=sum(d.requests for d in days), chart=chart,
                   mints=list(wallet.mints) if wallet is not None else [],
                   withdrawable=max(0, books.margin_msat) // 1000 if books else 0)


def _keys(services: Services, query: dict[str, str], session: Session) -> http.Response:
    q = query.get("q", "").strip()[:100]
    page_no = _int(query.get("page"), 1, 1, 100_000)
    page = services.ledger.reports.keys_page(q, page_no)
    return _render(services, "keys.html", session=session, title="Keys", active="keys",
                   q=q, page=page, page_no=page_no, now=time.time(),
                   link=lambda n: "/admin/keys?" + urlencode({"q": q, "page": n}))


def _journal(services: Services, query: dict[str, str], session: Session) -> http.Response:
    key = query.get("key", "").strip().lower()[:64]
    kind = query.get("kind", "")
    if kind not in KINDS:
        kind = ""
    before = _int(query.get("before"), 0, 0, 2**63 - 1) or None
    page = services.ledger.reports.journal_page(key, kind, before)
    older = ("/admin/ledger?" + urlencode({"key": key, "kind": kind, "before": page.next})
             if page.has_more else None)
    return _render(services, "ledger.html", session=session, title="Ledger", active="ledger",
                   key=key, kind=kind, kinds=KINDS, page=page, older=older,
                   newest="/admin/ledger?" + urlencode({"key": key, "kind": kind})
                   if before else None)


def _payouts(services: Services, query: dict[str, str], session: Session) -> http.Response:
    page_no = _int(query.get("page"), 1, 1, 100_000)
    page = services.ledger.reports.payouts_page(page_no)
    return _render(services, "payouts.html", session=session, title="Payouts",
                   active="payouts", page=page, page_no=page_no,
                   totals=services.ledger.reports.payout_totals(),
                   address=services.config.receive_ln_address,
                   link=lambda n: f"/admin/payouts?page={n}")


def _providers(services: Services, query: dict[str, str], session: Session) -> http.Response:
    """The upstream providers: where each is, its breaker, latency, error rate, models."""
    health = {f["name"]: f for f in services.health.facts()} if services.health else {}
    offered: dict[str, int] = {}
    serving: dict[str, int] = {}
    for offers in services.pricing.offers.values():
        for o in offers:
            offered[o.provider] = offered.get(o.provider, 0) + 1
        serving[offers[0].provider] = serving.get(offers[0].provider, 0) + 1
    off = {o.provider for o in services.ledger.upstreams.all() if o.disabled and not o.model}
    rows = [{"name": p.name, "url": p.base_url or "(the reverse mode's target)",
             "off": p.name in off,
             "fee": p.fee if p.fee is not None else services.config.upstream_provider_fee,
             "priority": p.priority, "models": offered.get(p.name, 0),
             "serving": serving.get(p.name, 0), **health.get(p.name, {})}
            for p in _live(services)]
    return _render(services, "providers.html", session=session, title="Providers",
                   active="providers", rows=rows)


View = Callable[[Services, dict[str, str], Session], http.Response]
_VIEWS: dict[str, View] = {
    "/admin": _overview,
    "/admin/": _overview,
    "/admin/keys": _keys,
    "/admin/ledger": _journal,
    "/admin/payouts": _payouts,
    "/admin/providers": _providers,
}


# --- POST -------------------------------------------------------------------------------------


def post(services: Services, request: http.Request,
         peer: Peer) -> http.Response | Awaitable[http.Response]:
    path, _ = _split(request)
    if not services.config.admin_password:
        return _render(services, "setup.html", 403, title="Turn the dashboard on")
    if path == LOGIN:
        return _login(services, request, peer)
    session_id, session = _session(services, request)
    if session is None:
        return _redirect(LOGIN)
    form = _form(request)
    if not session.csrf_ok(form.get("csrf")):
        logger.warning("admin: %s refused: missing or wrong CSRF token", path)
        return _message(services, 403, "Refused",
                        "This form's security token is missing or out of date, so nothing was "
                        "done. Go back, reload the page and try again.", session)
    action = _ACTIONS.get(path)
    if action is None:
        return _message(services, 404, "Not found", "There is no such action.", session)
    answer = action(services, form, session, session_id or "")
    if session.flash:  # a message for the page after the redirect, which any process may serve
        services.admin.sessions.save_flash(session)
    return answer


def _login(services: Services, request: http.Request, peer: Peer) -> http.Response:
    address = peer.address or "unknown"
    sessions, limiter = services.admin.sessions, services.admin.limiter
    wait = limiter.retry_after(address)
    if wait:
        return _render(services, "login.html", 429, title="Log in",
                       headers={"retry-after": str(wait)},
                       error=f"Too many failed attempts. Try again in {wait} seconds.")
    form = _form(request)
    if not password_matches(form.get("password", ""), services.config.admin_password):
        limiter.failed(address)
        logger.warning("admin: failed login from %s", address)
        return _render(services, "login.html", 401, title="Log in",
                       error="Wrong password.")
    limiter.succeeded(address)
    sessions.drop(_session_id(request))  # a new id on every login
    session_id, _ = sessions.create(password_tag(services.config.admin_password))
    logger.info("admin: login from %s", address)
    return _redirect("/admin", _cookie(session_id, int(sessions.lifetime),
                                       _secure(request, peer)))


Action = Callable[[Services, dict[str, str], Session, str],
                  http.Response | Awaitable[http.Response]]


def _logout(services: Services, form: dict[str, str], session: Session,
            session_id: str) -> http.Response:
    services.admin.sessions.drop(session_id)
    return _redirect(LOGIN, _cookie("", 0, False))


def _create_key(services: Services, form: dict[str, str], session: Session,
                session_id: str) -> http.Response:
    try:
        balance = int(form.get("balance_sats", "").strip() or "0")
        days_text = form.get("expiry_days", "").strip()
        days = int(days_text) if days_text else None
    except ValueError:
        balance, days = -1, None
    label = " ".join(form.get("label", "").split())[:100] or None
    if not 0 <= balance <= MAX_KEY_SATS or (days is not None and not 1 <= days <= 36500):
        session.flash.append(("error", "Give the balance in whole sats (0 or more) and the "
                                       "expiry, if any, in whole days (1 or more)."))
        return _redirect("/admin/keys")
    expires_at = time.time() + days * 86400 if days is not None else None
    key, state = services.ledger.create_key(balance * 1000, expires_at=expires_at, label=label,
                                            note="created by operator (admin)")
    logger.info("admin: key %s… created with %d sats", state.key_hash[:12], balance)
    _record(services, "key.create", state.key_hash,
             f'{{"balance_sats": {balance}, "expiry_days": {days or "null"}}}')
    return _render(services, "secret.html", session=session, title="New API key",
                   active="keys", heading="New API key", secret=key,
                   what="the API key", field_label="API key",
                   details=[("key id", state.key_hash[:16]), ("balance", f"{balance:,} sats"),
                            ("label", label or "-"), ("expires", when(expires_at)),
                            ("funding", "granted by you: spendable, not withdrawable")],
                   back="/admin/keys?" + urlencode({"q": state.key_hash[:16]}))


def _set_disabled(disabled: bool) -> Action:
    def action(services: Services, form: dict[str, str], session: Session,
               session_id: str) -> http.Response:
        key_hash = form.get("key_hash", "").strip().lower()
        done = is_hex_prefix(key_hash) and len(key_hash) == 64 and \
            services.ledger.set_disabled(key_hash, disabled) is not None
        word = "disabled" if disabled else "enabled again"
        if done:
            logger.info("admin: key %s… %s", key_hash[:12], word)
            _record(services, "key.disable" if disabled else "key.enable", key_hash, "")
            session.flash.append(("ok", f"Key {key_hash[:16]} {word}."))
        else:
            session.flash.append(("error", "No such key."))
        back = form.get("back", "")
        return _redirect(back if _BACK_TO_KEYS.fullmatch(back) else "/admin/keys")

    return action


def _limits(form: dict[str, str]) -> Limits:
    """Limits as the form states them (an empty field: no such limit); ValueError if not."""
    def whole(name: str, scale: int = 1) -> int | None:
        text = form.get(name, "").strip()
        if not text:
            return None
        value = int(text)
        if value < 1:
            raise ValueError(name)
        return value * scale

    models = tuple(m.strip() for m in form.get("models", "").split(",") if m.strip())
    return Limits(rpm=whole("rpm"), concurrent=whole("concurrent"), models=models or None,
                  budget_msat=whole("budget_sats", 1000),
                  period=parse_period(form.get("period", "").strip() or None))


def _set_limits(services: Services, form: dict[str, str], session: Session,
                session_id: str) -> http.Response:
    """Replace a key's limits (named by its id or the start of it)."""
    ref = form.get("key_id", "").strip().lower()
    found = services.ledger.find_keys(ref) if is_hex_prefix(ref) and len(ref) >= 8 else []
    try:
        limits = _limits(form)
    except ValueError:
        session.flash.append(("error", "Give limits as whole numbers (1 or more) and the "
                                       "period as daily, weekly, monthly, or 1d, 12h, 3600."))
        return _redirect("/admin/keys")
    if len(found) != 1:
        session.flash.append(("error", "Name one key by its id (at least 8 hex digits)."))
        return _redirect("/admin/keys")
    state = services.ledger.set_limits(found[0].key_hash, limits)
    if state is None:
        session.flash.append(("error", "No such key."))
        return _redirect("/admin/keys")
    logger.info("admin: key %s… limits set: %s", state.key_hash[:12], limits.describe())
    session.flash.append(("ok", f"Key {state.key_hash[:16]}: "
                                f"{describe_limits(limits) or 'no limits'}."))
    return _redirect("/admin/keys?" + urlencode({"q": state.key_hash[:16]}))


def describe_limits(limits: Limits) -> str:
    """One line for people: ``30 rpm, 2 at once, models a b, 500 sats per 86400``."""
    parts = []
    if limits.rpm:
        parts.append(f"{limits.rpm} rpm")
    if limits.concurrent:
        parts.append(f"{limits.concurrent} at once")
    if limits.models:
        parts.append("models " + " ".join(limits.models))
    if limits.budget_msat is not None:
        period = {"daily": "day", "weekly": "week", "monthly": "month"}.get(
            limits.period or "", f"{limits.period} s" if limits.period else "reset by hand")
        parts.append(f"{sats(limits.budget_msat)} sats per {period}")
    return ", ".join(parts)


def _withdraw(services: Services, form: dict[str, str], session: Session,
              session_id: str) -> http.Response | Awaitable[http.Response]:
    wallet = services.wallet
    if wallet is None:
        return _message(services, 400, "No ecash",
                        "Withdrawals need a wallet: set CASHU_MINTS.", session)
    try:
        amount = int(form.get("amount_sats", "").strip())
    except ValueError:
        amount = 0
    mint_url = form.get("mint") or wallet.primary.url
    if amount < 1 or mint_url not in wallet.mints:
        return _message(services, 400, "Not withdrawn",
                        "Give the amount in whole sats (1 or more) and one of the trusted "
                        "mints.", session)
    return _withdraw_later(services, session, amount, mint_url)


async def _withdraw_later(services: Services, session: Session, amount: int,
                          mint_url: str) -> http.Response:
    wallet = services.wallet
    assert wallet is not None
    async with services.admin.withdrawing:  # one at a time: the margin is read, then spent
        margin = services.ledger.books(list(wallet.mints)).margin_msat
        if amount * UNIT_MSAT["sat"] > margin:
            return _message(services, 400, "Refused",
                            f"Refused: {amount:,} sats is more than the margin, "
                            f"{sats(max(0, margin))} sats (ecash held − what users are owed − "
                            "payouts under way). Nothing was withdrawn.", session)
        owner = f"operator-admin-{uuid.uuid4().hex}"
        try:
            token, fee = await wallet.send(mint_url, "sat", amount, owner)
        except WalletError as e:
            return _message(services, 400, "Not withdrawn", f"{e}. Nothing was withdrawn.",
                            session)
        except MintError as e:
            return _message(services, 502, "Not withdrawn",
                            f"The mint refused: {e}. Nothing was withdrawn.", session)
        except MintUnreachable as e:
            text = (f"{e}. The mint may have made the token: the proofs picked stay reserved "
                    f"in the ledger under owner {owner}." if e.sent
                    else f"{e}. Nothing was withdrawn.")
            return _message(services, 502, "Not withdrawn", text, session)
    logger.info("admin: withdrew %d sat from %s (fee %d)", amount, mint_url, fee)
    _record(services, "withdraw", mint_url,
             f'{{"amount_sats": {amount}, "fee_sats": {fee}, "owner": "{owner}"}}')
    return _render(services, "secret.html", session=session, title="Withdrawn",
                   active="overview", heading=f"Withdrawn: {amount - fee:,} sats",
                   secret=token, what="the Cashu token (it is the money)",
                   field_label="Cashu token",
                   details=[("mint", mint_url), ("amount", f"{amount - fee:,} sats"),
                            ("mint fee", f"{fee:,} sats")],
                   back="/admin")


def _live(services: Services) -> tuple[ProviderSpec, ...]:
    """The providers in use now: the configured ones, and those added or found since."""
    catalog = services.catalog
    return catalog.providers if catalog is not None else services.config.providers


def _provider_switch(disabled: bool) -> Action:
    """Turn a provider (configured or added) off or on for every process on the ledger (as ``routstr
    upstreams disable|enable`` does); its model-level changes are kept."""
    def action(services: Services, form: dict[str, str], session: Session,
               session_id: str) -> http.Response:
        name = form.get("provider", "")
        if name not in {p.name for p in _live(services)} | {
                n for n, _ in services.ledger.providers.all()}:
            session.flash.append(("error", "No such provider."))
            return _redirect("/admin/providers")
        if disabled:
            services.ledger.upstreams.set(name, disabled=True)
        else:
            services.ledger.upstreams.clear(name)
        logger.info("admin: provider %s turned %s", name, "off" if disabled else "on")
        _record(services, "provider.disable" if disabled else "provider.enable", name, "")
        session.flash.append(("ok", f"Provider {name} turned {'off' if disabled else 'on'}; "
                                    "every proxy process follows within seconds."))
        return _redirect("/admin/providers")

    return action

def _record(services: Services, action: str, target: str, detail: str) -> None:
    """Every change the operator makes is journaled (``admin_actions``), whichever process."""
    admin = getattr(services.ledger, "admin", None)
    if admin is not None:
        admin.journal(time.time(), "admin", action, target, detail)


_ACTIONS: dict[str, Action] = {
    "/admin/logout": _logout,
    "/admin/providers/disable": _provider_switch(True),
    "/admin/providers/enable": _provider_switch(False),
    "/admin/keys/create": _create_key,
    "/admin/keys/disable": _set_disabled(True),
    "/admin/keys/enable": _set_disabled(False),
    "/admin/keys/limits": _set_limits,
    "/admin/withdraw": _withdraw,
}

HANDLERS: dict[str, Handler] = {"GET": get, "POST": post}
