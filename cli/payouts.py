"""``routstr payouts``: the operator's earnings, paid to RECEIVE_LN_ADDRESS."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from routstr_addon.ledger import Ledger
from routstr_addon.settings import Config

from .common import JsonOpt, console, err, fail, load_config, mints_of, open_ledger, sats

payouts_app = typer.Typer(help="Pay the operator's earnings to RECEIVE_LN_ADDRESS; list payouts.",
                          no_args_is_help=True)


def _payouts(config: Config, ledger: Ledger) -> Any:
    from routstr_addon.ecash.wallet import Wallet
    from routstr_addon.payments.payouts import Payouts

    mints_of(config)
    return Payouts(ledger, Wallet.from_config(ledger, config), config)


@payouts_app.command("list")
def payouts_list(
    limit: Annotated[int, typer.Option(help="At most this many, newest first.", min=1)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Payouts and Lightning refunds, with their state (pending, paid, failed) and fees."""
    config = load_config()
    with open_ledger(config) as ledger:
        rows = _payouts(config, ledger).recent(limit)
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table(title=f"{len(rows)} payout(s)")
    for col in ("when", "kind", "to", "sats", "fees", "state", "error"):
        table.add_column(col)
    colours = {"paid": "green", "pending": "yellow", "failed": "red"}
    for row in rows:
        table.add_row(datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d %H:%M"),
                      row["kind"], row["destination"], str(row["amount"]), str(row["fee_paid"]),
                      f"[{colours.get(row['state'], 'white')}]{row['state']}[/]",
                      row["error"] or "")
    console.print(table)


@payouts_app.command("run")
def payouts_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be paid, pay "
                                                            "nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Settle pending payouts, then pay the profit if it reaches MINIMUM_PAYOUT.

    Exit 0 when nothing failed (including when there was nothing to pay), 1 if the payout
    failed or stays pending."""
    config = load_config()
    with open_ledger(config) as ledger:
        payouts = _payouts(config, ledger)

        async def run() -> dict[str, Any]:
            try:
                result: dict[str, Any] = await payouts.run(dry_run=dry_run)
                return result
            finally:
                await payouts.wallet.close()

        try:
            with err.status("paying out…" if not dry_run else "looking…"):
                result = asyncio.run(run())
        except Exception as e:
            raise fail(f"payout failed: {e}", 1) from None
    if as_json:
        print(json.dumps(result, default=str))
    else:
        books = result["books"]
        console.print(f"held {sats(books['proofs_msat'])} sats, owed "
                      f"{sats(books['liabilities_msat'])}, under way "
                      f"{sats(books['pending_payouts_msat'])}, margin "
                      f"[bold]{sats(books['margin_msat'])}[/bold] sats")
        if result.get("skipped"):
            console.print(f"nothing paid: {result['skipped']}")
        if result.get("would_pay_sats"):
            console.print(f"would pay {result['would_pay_sats']} sats "
                          f"to {config.receive_ln_address}")
        payout = result.get("payout")
        if payout:
            console.print(f"{payout['state']}: {payout['amount']} sats to "
                          f"{payout['destination']} (fees {payout['fee_paid']})")
    payout = result.get("payout")
    if payout and payout["state"] != "paid":
        raise typer.Exit(1)
