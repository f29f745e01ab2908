"""``routstr``: run and administer the proxy. Reads the same settings and ledger as the proxy.

The command tree::

    routstr serve | demo | tui | stats | providers | import-core | version
    routstr keys     create | list | show | limit | topup | disable | enable | refund
    routstr models   list
    routstr ledger   tail | check
    routstr wallet   balance | send | receive | restore
    routstr payouts  list | run

Every command that reads data takes ``--json``. Exit codes: 0 done; 1 not found, refused, or a
check failed; 2 bad input or settings.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from routstr_addon import __version__, settings

from .common import JsonOpt, console, err, fail, load_config, open_ledger, sats
from .coreimport import import_core_command
from .keys import key_json, keys_app, parse_expiry, print_entries, resolve_key, when
from .models import models_app
from .payouts import payouts_app
from .providers import providers
from .stats import stats
from .tui import tui
from .wallet import wallet_app

app = typer.Typer(help="Routstr: a Cashu-paid proxy for OpenAI-compatible APIs, on mitmproxy.\n\n"
                       "Exit codes: 0 done; 1 not found, refused, or a check failed; 2 bad "
                       "input or settings.",
                  no_args_is_help=True, add_completion=False)
ledger_app = typer.Typer(help="Read and audit the ledger.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(ledger_app, name="ledger")
app.add_typer(wallet_app, name="wallet")
app.add_typer(payouts_app, name="payouts")
app.command()(stats)
app.command()(tui)
app.command()(providers)
app.command("import-core")(import_core_command)

__all__ = ["app", "console", "err", "fail", "key_json", "open_ledger", "parse_expiry",
           "resolve_key", "sats", "when"]


# --- serve, demo, version -------------------------------------------------------------------


ListenHost = Annotated[str, typer.Option(help="Address to listen on.")]
ListenPort = Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)]
WebOpt = Annotated[bool, typer.Option("--web", help="Run mitmweb to watch flows live.")]
WebPort = Annotated[int, typer.Option(help="mitmweb's own page (with --web).", min=1,
                                      max=65535)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No per-request log.")]


def _serve(host: str, port: int, web: bool, quiet: bool, web_port: int, demo: bool) -> None:
    from .serve import serve as run

    try:
        code = run(host, port, web, quiet, web_port, demo=demo)
    except settings.SettingError as e:
        raise fail(str(e), 2) from None
    raise typer.Exit(code)


@app.command()
def serve(
    listen_host: ListenHost = "127.0.0.1",
    listen_port: ListenPort = 8000,
    web: WebOpt = False,
    web_port: WebPort = 8081,
    quiet: QuietOpt = False,
) -> None:
    """Run the proxy (the demo when no UPSTREAM_BASE_URL is set).

    Exit codes: 0 stopped (Ctrl-C, SIGTERM); 2 bad settings."""
    _serve(listen_host, listen_port, web, quiet, web_port, demo=False)


@app.command()
def demo(
    listen_host: ListenHost = "127.0.0.1",
    listen_port: ListenPort = 8000,
    web: WebOpt = False,
    web_port: WebPort = 8081,
    quiet: QuietOpt = False,
) -> None:
    """Run the demo, whatever is configured: no real model, no real money.

    The proxy in front of a built-in echo model, with its own ledger, wallet and fixed rate
    under DATA_DIR/demo, a funded demo key, and a local FakeWallet mint whose ecash is free and
    worthless, with a demo token. It prints the key, the token, curl commands and an OpenAI
    Python snippet to paste. Your UPSTREAM_*, DATABASE_URL, CASHU_MINTS, WALLET_MNEMONIC and
    RECEIVE_LN_ADDRESS are not used.

    Exit codes: 0 stopped (Ctrl-C, SIGTERM); 2 bad settings."""
    _serve(listen_host, listen_port, web, quiet, web_port, demo=True)


@app.command()
def version(as_json: JsonOpt = False) -> None:
    """Print the version."""
    if as_json:
        print(json.dumps({"version": __version__}))
    else:
        console.print(__version__)


# --- ledger ---------------------------------------------------------------------------------


@ledger_app.command("tail")
def ledger_tail(
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many rows.", min=1)] = 20,
    key: Annotated[str | None, typer.Option(help="Only this key (sk-… or id prefix).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The newest ledger rows, oldest first.

    Exit codes: 0 shown; 1 no such key; 2 bad input."""
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
    from routstr_addon.ledger import UNIT_MSAT

    from .wallet import check_books, read_books

    config = load_config()
    wallet: dict[str, object] = {}
    with open_ledger(config) as ledger:
        problems = ledger.check()
        if config.cashu_mints:
            books = read_books(ledger, config.cashu_mints, with_proofs=True)
            checked = check_books(ledger, books)
            # What may cover users: unspent at the mint, and not promised to a payout.
            spendable = books.proofs_msat - checked.spent_msat - books.payouts_msat
            wallet = {"proofs_msat": books.proofs_msat, "liabilities_msat": books.liabilities_msat,
                      "pending_payouts_msat": books.payouts_msat,
                      "margin_msat": books.margin_msat, "check": checked.as_json(),
                      "locked_msat": sum(h.by_state.get("locked", 0) * UNIT_MSAT.get(h.unit, 0)
                                         for h in books.holdings),
                      "locked": ledger.locked.totals(),
                      "change_pool": {f"{h.mint} {h.unit}": ledger.locked.pool_counts(
                          h.mint, h.unit) for h in books.holdings if h.trusted}}
            problems += [f"{p['amount']} {p['unit']} at {p['mint']} counted but spent at the mint"
                         for p in checked.spent]
            problems += [f"could not ask a mint: {e}" for e in checked.errors]
            if spendable < books.liabilities_msat:
                problems.append(f"the wallet holds {sats(spendable)} sats of unspent ecash not "
                                f"paying out, less than the {sats(books.liabilities_msat)} sats "
                                "users are owed")
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
