"""``routstr import-core DATABASE_URL``: a routstr-core database's keys brought into this
ledger, so its users' ``sk-…`` keys (and tokens used as keys) keep working with the same
balance."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from routstr_addon.ledger.coreimport import import_core, read_core

from .common import JsonOpt, console, err, fail, load_config, open_ledger, sats

__all__ = ["import_core_command"]


def import_core_command(
    database_url: Annotated[str, typer.Argument(
        help="routstr-core's DATABASE_URL (sqlite+aiosqlite:///keys.db, "
             "postgresql+asyncpg://…, or the plain schemes).", show_default=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would change.")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Import routstr-core's keys: balances (its reservations released), spent and request
    totals, refund addresses, expiry, child keys and their limits, and its Lightning invoices
    still pending. One journal row per key; a key already here is skipped, so a second run
    imports nothing twice. Read-only on routstr-core's database.

    Its wallet's ecash is not in that database: move it here too (`cashu send` there,
    `routstr wallet receive` here), or the wallet will not cover what users are owed.

    Exit codes: 0 done; 2 the database cannot be read or is not routstr-core's."""
    config = load_config()
    try:
        snapshot = read_core(database_url)
    except Exception as e:  # whatever the driver says, one line
        raise fail(f"cannot read routstr-core's database: {e}", 2) from None
    primary = config.cashu_mints[0] if config.cashu_mints else None
    with open_ledger(config) as ledger:
        report = import_core(ledger, snapshot, primary, dry_run=dry_run)
    if as_json:
        print(json.dumps({"dry_run": dry_run, **report.as_dict()}))
        return
    for line in report.lines:
        console.print(f"  {'would import' if dry_run else 'imported'} {line}", highlight=False)
    verb = "would import" if dry_run else "imported"
    console.print(f"{verb} {report.keys} keys ({report.children} child keys) holding "
                  f"{sats(report.balance_msat)} sats ({sats(report.released_msat)} sats of "
                  f"reservations released), {report.invoices} pending invoices; "
                  f"{report.skipped} keys already here", highlight=False)
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if report.balance_msat and not dry_run:
        err.print("[yellow]note:[/yellow] move routstr-core's ecash into this wallet "
                  "(`routstr wallet receive <token>`) so it covers these balances",
                  highlight=False)
