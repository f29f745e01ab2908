"""``routstr``: run and administer the proxy. Reads the same settings and ledger as the proxy."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from routstr_addon import __version__, settings
from routstr_addon.ledger import KEY_PREFIX, KeyState, Ledger, hash_key

from .common import JsonOpt, console, err, fail, load_config, open_ledger, sats
from .payouts import payouts_app
from .wallet import create_key_from_token, wallet_app

app = typer.Typer(help="Routstr: a Cashu-paid proxy for OpenAI-compatible APIs, on mitmproxy.",
                  no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="Create and inspect API keys.", no_args_is_help=True)
ledger_app = typer.Typer(help="Read and audit the ledger.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(ledger_app, name="ledger")
app.add_typer(wallet_app, name="wallet")
app.add_typer(payouts_app, name="payouts")

__all__ = ["app", "console", "err", "fail", "open_ledger", "parse_expiry", "sats"]


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def key_json(state: KeyState) -> dict[str, Any]:
    return {
        "key_id": state.key_hash[:16],
        "key_hash": state.key_hash,
        "balance_msat": state.balance_msat,
        "reserved_msat": state.reserved_msat,
        "available_msat": state.available_msat,
        "total_spent_msat": state.total_spent_msat,
        "total_requests": state.total_requests,
        "created_at": state.created_at,
        "expires_at": state.expires_at,
        "refund_address": state.refund_address,
        "label": state.label,
        "disabled": state.disabled,
        # funded with ecash (withdrawable) rather than by the operator; older ledgers lack it
        "backed": getattr(state, "backed", None),
    }


_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_expiry(text: str, now: float | None = None) -> float:
    """``30d``, ``12h`` (from now), a Unix time, or an ISO date/time (UTC unless it says)."""
    now = time.time() if now is None else now
    text = text.strip()
    if m := _DURATION.match(text.lower()):
        return now + int(m.group(1)) * _UNITS[m.group(2)]
    if text.isdigit():
        return float(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter("use a duration (30d, 12h), a Unix time or an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def resolve_key(ledger: Ledger, ref: str) -> KeyState:
    """A key named by the key itself (``sk-…``), its hash, or a prefix of its hash (≥ 8)."""
    ref = ref.strip()
    if ref.startswith(KEY_PREFIX) or len(ref) > 64:
        state = ledger.key(hash_key(ref))
        if state is None:
            raise fail("no such key", 1)
        return state
    if len(ref) < 8 or not re.fullmatch(r"[0-9a-fA-F]+", ref):
        raise fail("name a key by the key itself (sk-…) or at least 8 hex digits of its id", 2)
    found = ledger.find_keys(ref)
    if not found:
        raise fail(f"no key id starts with {ref}", 1)
    if len(found) > 1:
        raise fail(f"{len(found)} keys start with {ref}; give more digits", 1)
    return found[0]


# --- serve ----------------------------------------------------------------------------------


@app.command()
def serve(
    listen_host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    listen_port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    web: Annotated[bool, typer.Option("--web", help="Run mitmweb to watch flows live.")] = False,
    web_port: Annotated[int, typer.Option(help="mitmweb's own page (with --web).")] = 8081,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-request log.")] = False,
) -> None:
    """Run the proxy (the demo when no UPSTREAM_BASE_URL is set)."""
    from .serve import serve as run

    try:
        code = run(listen_host, listen_port, web, quiet, web_port)
    except settings.SettingError as e:
        raise fail(str(e), 2) from None
    raise typer.Exit(code)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


# --- keys -----------------------------------------------------------------------------------


KEYS_CREATE_HELP = (
    "Create a key and print it (it is shown only once).\n\n"
    "Fund it by hand with --balance-sats (credit you grant: spendable, not withdrawable as "
    "ecash), or with a Cashu --token, redeemed as POST /v1/balance/create does (the key is "
    "the token's own). With --json, the key's state too, and credited_msat with --token.\n\n"
    "Exit codes: 0 created; 1 the token was refused (malformed, spent, from a mint not in "
    "CASHU_MINTS, below the mint's fee) or its mint failed; 2 bad input or settings (both "
    "--balance-sats and --token, no CASHU_MINTS for --token)."
)


@keys_app.command("create", help=KEYS_CREATE_HELP)
def keys_create(
    balance_sats: Annotated[int | None, typer.Option(
        help="Initial balance in sats, granted by you.", min=0, show_default="0")] = None,
    token: Annotated[str | None, typer.Option(
        help="A Cashu token (cashuA…/cashuB…, or - for stdin) from a mint of CASHU_MINTS "
             "to fund the key with.")] = None,
    expiry: Annotated[str | None, typer.Option(help="When it expires: 30d, 12h, Unix time or "
                                                    "ISO date.")] = None,
    refund_address: Annotated[str | None, typer.Option(help="Lightning address for refunds.")]
    = None,
    label: Annotated[str | None, typer.Option(help="A note for yourself.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key (help: KEYS_CREATE_HELP)."""
    if token is not None and balance_sats is not None:
        raise fail("give --balance-sats or --token, not both", 2)
    expires_at = parse_expiry(expiry) if expiry else None
    config = load_config()
    with open_ledger(config) as ledger:
        if token is not None:
            key, state = create_key_from_token(config, ledger, token, expires_at=expires_at,
                                               refund_address=refund_address, label=label)
            extra = {"credited_msat": state.balance_msat}
        else:
            key, state = ledger.create_key((balance_sats or 0) * 1000, expires_at=expires_at,
                                           refund_address=refund_address, label=label,
                                           note="created by operator")
            extra = {}
    if as_json:
        print(json.dumps({"api_key": key, **key_json(state), **extra}))
    else:
        print(key)


@keys_app.command("list")
def keys_list(
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List keys with their balances."""
    with open_ledger() as ledger:
        states = ledger.keys(limit)
    if as_json:
        print(json.dumps([key_json(s) for s in states]))
        return
    table = Table(title=f"{len(states)} key(s)")
    for col, justify in (("id", "left"), ("balance sats", "right"), ("reserved", "right"),
                         ("spent", "right"), ("requests", "right"), ("created", "left"),
                         ("expires", "left"), ("label", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for s in states:
        table.add_row(s.key_hash[:16], sats(s.balance_msat), sats(s.reserved_msat),
                      sats(s.total_spent_msat), str(s.total_requests), when(s.created_at),
                      when(s.expires_at), ("[red]disabled[/red] " if s.disabled else "")
                      + (s.label or ""))
    console.print(table)


@keys_app.command("show")
def keys_show(
    key: Annotated[str, typer.Argument(help="The key (sk-…) or the start of its id.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one key: balance, reservations, recent ledger rows."""
    with open_ledger() as ledger:
        state = resolve_key(ledger, key)
        entries = ledger.entries(state.key_hash, limit=10)
        held = ledger.open_reservations(state.key_hash)
    if as_json:
        print(json.dumps({**key_json(state), "open_reservations": held,
                          "recent_entries": entries}, default=str))
        return
    table = Table(show_header=False, title=f"key {state.key_hash[:16]}")
    for name, value in (("balance", f"{sats(state.balance_msat)} sats"),
                        ("reserved", f"{sats(state.reserved_msat)} sats ({len(held)} open)"),
                        ("available", f"{sats(state.available_msat)} sats"),
                        ("spent", f"{sats(state.total_spent_msat)} sats"),
                        ("requests", str(state.total_requests)),
                        ("created", when(state.created_at)), ("expires", when(state.expires_at)),
                        ("refund address", state.refund_address or "-"),
                        ("label", state.label or "-"), ("disabled", str(state.disabled))):
        table.add_row(name, value)
    console.print(table)
    print_entries(entries)


# --- ledger ---------------------------------------------------------------------------------


def print_entries(entries: list[dict[str, Any]]) -> None:
    table = Table(title="ledger")
    for col in ("#", "time", "key", "kind", "amount sats", "reserved", "model", "tokens in/out",
                "request"):
        table.add_column(col)
    colours = {"credit": "green", "charge": "yellow", "release": "cyan", "reserve": "dim"}
    for e in entries:
        tokens = ("" if e["prompt_tokens"] is None
                  else f"{e['prompt_tokens']}/{e['completion_tokens']}")
        kind = f"[{colours.get(e['kind'], 'white')}]{e['kind']}[/]"
        table.add_row(str(e["id"]), when(e["created_at"]), e["key_hash"][:12], kind,
                      sats(e["amount_msat"]), sats(e["reserved_msat"]), e["model"] or "",
                      tokens, (e["request_id"] or "")[:8])
    console.print(table)


@ledger_app.command("tail")
def ledger_tail(
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many rows.", min=1)] = 20,
    key: Annotated[str | None, typer.Option(help="Only this key (sk-… or id prefix).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The newest ledger rows."""
    with open_ledger() as ledger:
        key_hash = resolve_key(ledger, key).key_hash if key else None
        entries = ledger.entries(key_hash, limit=lines)
    if as_json:
        print(json.dumps(entries))
    else:
        print_entries(entries)


@ledger_app.command("check")
def ledger_check(as_json: JsonOpt = False) -> None:
    """Audit the books: per key, the journal sums to the balance, no balance or reservation is
    negative, reservations are all open ones; and, with CASHU_MINTS, the ecash the wallet holds
    is unspent at its mint (NUT-07) and covers what users are owed. Exit 0 only if all hold."""
    from .wallet import check_books, read_books

    config = load_config()
    wallet: dict[str, object] = {}
    with open_ledger(config) as ledger:
        problems = ledger.check()
        if config.cashu_mints:
            books = read_books(ledger, config.cashu_mints, with_proofs=True)
            checked = check_books(ledger, books)
            spendable = books.proofs_msat - checked.spent_msat
            wallet = {"proofs_msat": books.proofs_msat, "liabilities_msat": books.liabilities_msat,
                      "margin_msat": books.margin_msat, "check": checked.as_json()}
            problems += [f"{p['amount']} {p['unit']} at {p['mint']} counted but spent at the mint"
                         for p in checked.spent]
            problems += [f"could not ask a mint: {e}" for e in checked.errors]
            if spendable < books.liabilities_msat:
                problems.append(f"the wallet holds {sats(spendable)} sats of unspent ecash, less "
                                f"than the {sats(books.liabilities_msat)} sats users are owed")
    if as_json:
        print(json.dumps({"ok": not problems, "problems": problems, "wallet": wallet}))
    elif problems:
        for p in problems:
            err.print(f"[red]✗[/red] {p}")
    else:
        console.print("[green]✓ the ledger balances[/green]")
    raise typer.Exit(1 if problems else 0)


if __name__ == "__main__":  # pragma: no cover
    app(prog_name="routstr")
