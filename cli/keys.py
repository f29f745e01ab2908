"""``routstr keys``: create, inspect, fund, switch off and refund API keys.

A key is named on the command line by the key itself (``sk-…``), its hash, or at least 8 hex
digits of the start of its hash (its id, as ``keys list`` shows it).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from routstr_addon.ledger import KEY_PREFIX, KeyState, Ledger, Limits, hash_key, parse_period
from routstr_addon.settings import Config

from .common import JsonOpt, console, err, fail, load_config, mints_of, open_ledger, sats

__all__ = ["key_json", "keys_app", "parse_expiry", "print_entries", "resolve_key", "when"]

keys_app = typer.Typer(help="Create, inspect, fund, disable and refund API keys.",
                       no_args_is_help=True)

KeyArg = Annotated[str, typer.Argument(
    help="The key (sk-…), its hash, or at least 8 hex digits of its id.", show_default=False)]


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
        "parent_key_id": state.parent_key_hash[:16] if state.parent_key_hash else None,
        "limits": state.limits.describe() if state.limits.any else None,
        "limit_spent_msat": state.limit_spent_msat,
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
    """A key named by the key itself (``sk-…``), its hash, or a prefix of its hash (≥ 8).
    Exits 1 if there is no such key (or several), 2 if ``ref`` names no key at all."""
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


def print_entries(entries: list[dict[str, Any]]) -> None:
    table = Table(title="ledger")
    for col in ("#", "time", "key", "kind", "amount sats", "reserved", "model", "tokens in/out",
                "request"):
        table.add_column(col, justify="right" if col in ("#", "amount sats", "reserved")
                         else "left")
    colours = {"credit": "green", "charge": "yellow", "release": "cyan", "reserve": "dim",
               "refund": "magenta", "debit": "magenta"}
    for e in entries:
        tokens = ("" if e["prompt_tokens"] is None
                  else f"{e['prompt_tokens']}/{e['completion_tokens']}")
        kind = f"[{colours.get(e['kind'], 'white')}]{e['kind']}[/]"
        table.add_row(str(e["id"]), when(e["created_at"]), e["key_hash"][:12], kind,
                      sats(e["amount_msat"]), sats(e["reserved_msat"]), escape(e["model"] or ""),
                      tokens, (e["request_id"] or "")[:8])
    console.print(table)


# --- create, list, show ---------------------------------------------------------------------


KEYS_CREATE_HELP = (
    "Create a key and print it (it is shown only once).\n\n"
    "Fund it by hand with --balance-sats (credit you grant: spendable, not withdrawable as "
    "ecash), or with a Cashu --token, redeemed as POST /v1/balance/create does (the key is "
    "the token's own). With --json, the key's state too, and credited_msat with --token.\n\n"
    "Exit codes: 0 created; 1 the token was refused (malformed, spent, from a mint not in "
    "CASHU_MINTS, below the mint's fee) or its mint failed; 2 bad input or settings (both "
    "--balance-sats and --token, no CASHU_MINTS for --token)."
)


RpmOpt = Annotated[int | None, typer.Option(
    "--rpm", help="Requests per minute (sliding window); 0 lifts it.", min=0)]
ConcurrentOpt = Annotated[int | None, typer.Option(
    "--concurrent", help="Requests in flight at once; 0 lifts it.", min=0)]
ModelsOpt = Annotated[str | None, typer.Option(
    "--models", help="Allowed models, comma-separated; '' lifts it.")]
BudgetOpt = Annotated[int | None, typer.Option(
    "--budget-sats", help="Sats the key may spend per --period (or until reset); 0 lifts it.",
    min=0)]
PeriodOpt = Annotated[str | None, typer.Option(
    "--period", help="The budget's period: daily, weekly, monthly, or 1d, 12h, 3600 (seconds); "
                     "manual: reset by hand only.")]


def merge_limits(current: Limits, rpm: int | None, concurrent: int | None, models: str | None,
                 budget_sats: int | None, period: str | None) -> Limits:
    """The limits after a command line's changes: options given replace (0 or '' lifts one),
    the others stay."""
    try:
        parsed_period = parse_period(period) if period is not None else current.period
    except ValueError as e:
        raise fail(str(e), 2) from None
    names = (tuple(m.strip() for m in models.split(",") if m.strip()) if models is not None
             else current.models)
    return Limits(
        rpm=current.rpm if rpm is None else (rpm or None),
        concurrent=current.concurrent if concurrent is None else (concurrent or None),
        models=names or None,
        budget_msat=(current.budget_msat if budget_sats is None
                     else (budget_sats * 1000 or None)),
        period=parsed_period)


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
    rpm: RpmOpt = None,
    concurrent: ConcurrentOpt = None,
    models: ModelsOpt = None,
    budget_sats: BudgetOpt = None,
    period: PeriodOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key (help: KEYS_CREATE_HELP)."""
    from .wallet import create_key_from_token

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
        limits = merge_limits(Limits(), rpm, concurrent, models, budget_sats, period)
        if limits.any:
            state = ledger.set_limits(state.key_hash, limits) or state
    if as_json:
        print(json.dumps({"api_key": key, **key_json(state), **extra}))
    else:
        print(key)


@keys_app.command("list")
def keys_list(
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """List keys with their balances, newest first."""
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
                      + escape(s.label or ""))
    console.print(table)


@keys_app.command("show")
def keys_show(key: KeyArg, as_json: JsonOpt = False) -> None:
    """Show one key: balance, reservations, recent ledger rows.

    Exit codes: 0 shown; 1 no such key; 2 not a key name."""
    with open_ledger() as ledger:
        state = resolve_key(ledger, key)
        entries = ledger.entries(state.key_hash, limit=10)
        held = ledger.open_reservations(state.key_hash)
    if as_json:
        print(json.dumps({**key_json(state), "open_reservations": held,
                          "recent_entries": entries}, default=str))
        return
    print_key(state, len(held))
    print_entries(entries)


def print_key(state: KeyState, open_reservations: int | None = None) -> None:
    table = Table(show_header=False, title=f"key {state.key_hash[:16]}")
    held = "" if open_reservations is None else f" ({open_reservations} open)"
    funded = "ecash (withdrawable)" if state.backed else "operator credit (not withdrawable)"
    status = ("[red]disabled[/red]" if state.disabled
              else "[red]expired[/red]" if state.expires_at and state.expires_at <= time.time()
              else "[green]active[/green]")
    for name, value in (("status", status),
                        ("balance", f"{sats(state.balance_msat)} sats"),
                        ("reserved", f"{sats(state.reserved_msat)} sats{held}"),
                        ("available", f"[bold]{sats(state.available_msat)} sats[/bold]"),
                        ("spent", f"{sats(state.total_spent_msat)} sats"),
                        ("requests", str(state.total_requests)),
                        ("funded with", funded),
                        ("created", when(state.created_at)), ("expires", when(state.expires_at)),
                        ("refund address", escape(state.refund_address or "-")),
                        ("limits", escape(", ".join(
                            f"{n} {v}" for n, v in state.limits.describe().items()
                            if v is not None) or "-")),
                        ("label", escape(state.label or "-"))):
        table.add_row(name, value)
    console.print(table)


# --- limits ---------------------------------------------------------------------------------


LIMIT_HELP = (
    "Set a key's limits: requests per minute, requests in flight, allowed models, a budget "
    "per period (reset by itself). Options given replace the key's (0 or '' lifts one), the "
    "others stay; --clear lifts them all. Refused requests get 429 rate_limit_exceeded with "
    "Retry-After (403 for a model outside the list). They hold across processes sharing the "
    "database.\n\n"
    "Exit codes: 0 set; 1 no such key; 2 bad input."
)


@keys_app.command("limit", help=LIMIT_HELP)
def keys_limit(
    key: KeyArg,
    rpm: RpmOpt = None,
    concurrent: ConcurrentOpt = None,
    models: ModelsOpt = None,
    budget_sats: BudgetOpt = None,
    period: PeriodOpt = None,
    clear: Annotated[bool, typer.Option("--clear", help="Lift every limit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set a key's limits (help: LIMIT_HELP)."""
    with open_ledger() as ledger:
        state = resolve_key(ledger, key)
        limits = Limits() if clear else merge_limits(state.limits, rpm, concurrent, models,
                                                     budget_sats, period)
        after = ledger.set_limits(state.key_hash, limits)
    if after is None:
        raise fail("no such key", 1)
    if as_json:
        print(json.dumps(key_json(after)))
        return
    shown = limits.describe()
    console.print(f"key {after.key_hash[:16]}: " + (", ".join(
        f"{name} {value}" for name, value in shown.items() if value is not None)
        or "no limits"), highlight=False)


# --- topup ----------------------------------------------------------------------------------


TOPUP_HELP = (
    "Credit a key by hand: operator credit, one 'credit' row in the journal with a note.\n\n"
    "The credit is yours to give: nothing is received. On a key funded with ecash it becomes "
    "part of a withdrawable balance (keys refund), owed from the wallet's margin.\n\n"
    "Exit codes: 0 credited; 1 no such key; 2 bad input (amount, key name) or settings."
)


@keys_app.command("topup", help=TOPUP_HELP)
def keys_topup(
    key: KeyArg,
    amount_sats: Annotated[int, typer.Option("--sats", help="How many sats to credit.", min=1,
                                             show_default=False)],
    note: Annotated[str, typer.Option(help="Written on the journal row.")] = "operator top-up",
    as_json: JsonOpt = False,
) -> None:
    """Credit a key (help: TOPUP_HELP)."""
    with open_ledger() as ledger:
        state = resolve_key(ledger, key)
        entry = ledger.accounts.credit_entry(state.key_hash, amount_sats * 1000, note)
        if entry is None:
            raise fail("no such key", 1)
        after = ledger.key(state.key_hash)
    assert after is not None
    if after.backed:
        err.print("[yellow]note:[/yellow] this key is funded with ecash: the credit can be "
                  "withdrawn (keys refund) and is owed from the wallet's margin",
                  highlight=False)
    if as_json:
        print(json.dumps({**key_json(after), "credited_msat": amount_sats * 1000,
                          "entry": entry}))
        return
    console.print(f"[green]credited {amount_sats:,} sats[/green] to key {after.key_hash[:16]}: "
                  f"available [bold]{sats(after.available_msat)}[/bold] sats", highlight=False)


# --- disable, enable ------------------------------------------------------------------------


def _switch(key: str, disabled: bool, as_json: bool) -> None:
    """Switch a key off (requests get 403 key_disabled) or on. Requests already in flight
    finish and are charged."""
    with open_ledger() as ledger:
        state = resolve_key(ledger, key)
        changed = ledger.set_disabled(state.key_hash, disabled)
        if changed is None:
            raise fail("no such key", 1)
        after = ledger.key(state.key_hash)
    assert after is not None
    if as_json:
        print(json.dumps({**key_json(after), "changed": changed}))
        return
    word = "disabled" if disabled else "enabled"
    colour = "red" if disabled else "green"
    console.print(f"key {after.key_hash[:16]} [{colour}]{word}[/{colour}]"
                  + ("" if changed else " (it already was)"), highlight=False)


@keys_app.command("disable")
def keys_disable(key: KeyArg, as_json: JsonOpt = False) -> None:
    """Switch a key off: its requests get 403 key_disabled. Its balance stays (keys enable).

    Requests in flight finish and are charged. Exit codes: 0 disabled (or already was);
    1 no such key; 2 not a key name."""
    _switch(key, True, as_json)


@keys_app.command("enable")
def keys_enable(key: KeyArg, as_json: JsonOpt = False) -> None:
    """Switch a disabled key on again.

    Exit codes: 0 enabled (or already was); 1 no such key; 2 not a key name."""
    _switch(key, False, as_json)


# --- refund ---------------------------------------------------------------------------------


REFUND_HELP = (
    "Withdraw a key's whole available balance as a Cashu token, as POST /v1/balance/refund "
    "does, and print the token (the token is the money: hand it to the key's owner).\n\n"
    "Only for keys funded with ecash (tokens, Lightning): credit you granted by hand is not "
    "withdrawable. The key is debited in the same transaction that records the refund; if the "
    "mint fails after that, run the command again: the same refund is finished, never paid "
    "twice. Asked again once done, it prints the same token.\n\n"
    "Exit codes: 0 refunded; 1 refused (no such key, operator credit, requests in flight, "
    "nothing to refund) or the mint failed; 2 bad input or settings, no CASHU_MINTS."
)


async def _refund(config: Config, ledger: Ledger, key_hash: str) -> dict[str, Any]:
    from routstr_addon.payments.cashu import Payments

    from .wallet import open_wallet

    wallet = open_wallet(ledger, config)
    try:
        await wallet.primary.ensure_loaded()  # the unit is the primary mint's
        return await Payments(ledger, wallet).refund(key_hash)
    finally:
        await wallet.close()


@keys_app.command("refund", help=REFUND_HELP)
def keys_refund(key: KeyArg, as_json: JsonOpt = False) -> None:
    """Refund a key as a token (help: REFUND_HELP)."""
    from routstr_addon.ecash.mint import MintError, MintUnreachable
    from routstr_addon.ecash.wallet import WalletError
    from routstr_addon.errors import ApiError

    config = load_config()
    mints_of(config)
    with open_ledger(config) as ledger:
        state = resolve_key(ledger, key)
        if not state.backed:
            raise fail("this key holds credit granted by the operator, which cannot be "
                       "withdrawn as ecash", 1)
        if state.reserved_msat:
            raise fail("this key has requests in flight; refund once they are done", 1)
        try:
            with err.status("making the refund token at the mint…"):
                refund = asyncio.run(_refund(config, ledger, state.key_hash))
        except ApiError as e:
            raise fail(e.message, 1) from None
        except (MintError, MintUnreachable, WalletError) as e:
            raise fail(f"the mint failed: {e}; nothing was debited", 1) from None
        after = ledger.key(state.key_hash)
    assert after is not None
    if as_json:
        print(json.dumps({**refund, "key": key_json(after)}))
        return
    fee = f" (mint fee {refund['fee']:,} {refund['unit']})" if refund["fee"] else ""
    err.print(f"refunded {refund['amount']:,} {refund['unit']} from {escape(refund['mint'])}"
              f"{fee}; the key has {sats(after.available_msat)} sats left", highlight=False)
    print(refund["token"])
