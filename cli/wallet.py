"""``routstr wallet``: the ecash the proxy holds, against what it owes its users.

The proxy keeps its Cashu proofs in the ledger database (table ``proofs``): ``unspent`` ones are
the pool, ``held`` and ``reserved`` ones are on their way to a user as change or refund but still
the proxy's. It owes the balance of every key funded with ecash, and every refund recorded but
not yet handed out. Proofs minus liabilities and payouts under way is the margin, the
operator's own (``Ledger.books``, as /admin and the payouts read it): ``send`` withdraws from it
and never more, ``receive`` adds float to the pool.

Every command works on the running proxy's database: reads are one snapshot, writes go through
the same wallet code and transactions as the proxy's. cashu (slow to import) is imported only by
the commands that talk to a mint, through ``routstr_addon.ecash.nutshell``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from routstr_addon.ecash.tokens import UNIT_MSAT, sanitize_mint_url
from routstr_addon.ledger import POOL_STATES, Books, CountedProof, KeyState, Ledger
from routstr_addon.settings import Config

from .common import JsonOpt, console, err, fail, load_config, mints_of, open_ledger, sats

if TYPE_CHECKING:
    from routstr_addon.ecash.wallet import Redeemed, Wallet

__all__ = ["check_books", "create_key_from_token", "open_wallet", "read_books", "wallet_app"]

wallet_app = typer.Typer(
    help="The ecash the proxy holds: balance against what users are owed, withdraw the "
         "margin, add float.", no_args_is_help=True)

CHECK_BATCH = 100  # Ys per NUT-07 request


def open_wallet(ledger: Ledger, config: Config) -> Wallet:
    """The proxy's wallet, with its seed (exit 2 if the mnemonic file is bad)."""
    from routstr_addon.ecash.seed import MnemonicError
    from routstr_addon.ecash.wallet import Wallet

    try:
        return Wallet.from_config(ledger, config)
    except MnemonicError as e:
        raise fail(str(e), 2) from None


# --- the books ------------------------------------------------------------------------------


def read_books(ledger: Ledger, trusted: Sequence[str], with_proofs: bool = False) -> Books:
    """The operator's books, with the trusted mints (CASHU_MINTS) as the wallet names them."""
    return ledger.books([sanitize_mint_url(m) for m in trusted], with_proofs)


# --- asking the mints (NUT-07) --------------------------------------------------------------


@dataclass(slots=True)
class Check:
    """What the mints said of the proofs counted."""

    checked: int = 0
    spent: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def spent_msat(self) -> int:
        return sum(p["amount"] * UNIT_MSAT.get(p["unit"], 0) for p in self.spent)

    def as_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "spent": self.spent, "pending": self.pending,
                "spent_msat": self.spent_msat, "errors": self.errors}


async def mint_states(proofs: Sequence[CountedProof],
                      progress: Callable[[str], None]) -> tuple[dict[str, tuple[str, str]],
                                                                list[str]]:
    """Ask each mint for the state of its proofs: {secret: (Y, state)}, and the errors met."""
    from routstr_addon.ecash.mint import MintClient, MintError, MintUnreachable
    from routstr_addon.ecash.tokens import nutshell

    nutshell()
    from cashu.core.crypto.b_dhke import hash_to_curve

    by_mint: dict[str, list[str]] = {}
    for proof in proofs:
        by_mint.setdefault(proof.mint, []).append(proof.secret)
    states: dict[str, tuple[str, str]] = {}
    errors: list[str] = []
    for mint, secrets in by_mint.items():
        client = MintClient(mint)
        try:
            for start in range(0, len(secrets), CHECK_BATCH):
                batch = secrets[start:start + CHECK_BATCH]
                progress(f"asking {mint} about proofs {start + 1}–{start + len(batch)} of "
                         f"{len(secrets)}…")
                ys = {hash_to_curve(s.encode()).format().hex(): s for s in batch}
                for entry in await client.check_state(list(ys)):
                    answered = ys.get(str(entry.get("Y")))
                    if answered is not None:
                        states[answered] = (str(entry["Y"]), str(entry.get("state")))
            missing = sum(1 for s in secrets if s not in states)
            if missing:
                errors.append(f"{mint}: no state given for {missing} proof(s)")
        except (MintError, MintUnreachable) as e:
            errors.append(f"{mint}: {e}")
        finally:
            await client.aclose()
    return states, errors


def check_books(ledger: Ledger, books: Books) -> Check:
    """Ask the mints which of the counted proofs are really unspent (with a spinner)."""
    check = Check(checked=len(books.proofs))
    if not books.proofs:
        return check
    with err.status("asking the mints which proofs are unspent…") as status:
        states, check.errors = asyncio.run(
            mint_states(books.proofs, lambda text: status.update(escape(text))))
    odd = [p for p in books.proofs if states.get(p.secret, ("", "UNSPENT"))[1] != "UNSPENT"]
    # A proof the proxy spent between the snapshot and the mint's answer is no finding.
    kept = ledger.proofs.still_held([p.secret for p in odd])
    for p in odd:
        if p.secret not in kept:
            continue
        y, state = states[p.secret]
        found = {"mint": p.mint, "unit": p.unit, "amount": p.amount, "y": y, "state": state}
        (check.spent if state == "SPENT" else check.pending).append(found)
    return check


# --- balance --------------------------------------------------------------------------------


BALANCE_HELP = (
    "What the proxy holds in ecash, what it owes, and the operator's margin.\n\n"
    "Per mint and unit: the proofs held (unspent, held for an x-cashu request's change, "
    "reserved for a refund or payout). Owed: the balances of keys funded with ecash, and "
    "refunds not yet handed out. The margin, proofs − liabilities − payouts under way, is the "
    "operator's (the figure /admin and the payouts use). Keys funded by hand "
    "(keys create --balance-sats) are shown apart: spendable credit, not withdrawable, not "
    "counted. Amounts in sats, to the msat.\n\n"
    "Exit codes: 0 the proofs cover the liabilities and payouts under way (and, with --check, "
    "every one is unspent at "
    "its mint); 1 they do not, a proof is spent, or a mint could not be asked; 2 bad settings "
    "or no CASHU_MINTS."
)


@wallet_app.command("balance", help=BALANCE_HELP)
def wallet_balance(
    check: Annotated[bool, typer.Option("--check", help="Also ask each mint which of the "
                                                        "proofs are really unspent (NUT-07).")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the books (help: BALANCE_HELP)."""
    config = load_config()
    trusted = mints_of(config)
    with open_ledger(config) as ledger:
        books = read_books(ledger, trusted, with_proofs=check)
        result = check_books(ledger, books) if check else None
    covered = books.margin_msat - (result.spent_msat if result else 0) >= 0
    ok = covered and (result is None or not (result.spent or result.errors))
    if as_json:
        print(json.dumps({**books.as_json(), "covered": covered,
                          "check": result.as_json() if result else None, "ok": ok}))
        raise typer.Exit(0 if ok else 1)
    print_books(books, result, covered)
    raise typer.Exit(0 if ok else 1)


def print_books(books: Books, result: Check | None, covered: bool) -> None:
    table = Table(title="ecash held")
    table.add_column("mint", overflow="fold")
    for col in ("unit", "proofs", "unspent", "held", "reserved", "locked", "total", "sats"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for h in books.holdings:  # locked: received locked to the payment key, not yet swapped
        table.add_row(h.mint + ("" if h.trusted else " [yellow](not in CASHU_MINTS)[/]"), h.unit,
                      str(h.count), *(f"{h.by_state.get(s, 0):,}"
                                      for s in (*POOL_STATES, "locked")),
                      f"{h.amount:,}", sats(h.msat))
    console.print(table)
    summary = Table(show_header=False, box=None)
    summary.add_column()
    summary.add_column(justify="right")
    summary.add_column(style="dim")
    summary.add_row("proofs held", f"{sats(books.proofs_msat)} sats", "")
    summary.add_row("owed to keys", f"{sats(books.keys_msat)} sats",
                    f"{books.keys} key(s) funded with ecash")
    summary.add_row("pending refunds", f"{sats(books.refunds_msat)} sats",
                    f"{books.refunds} refund(s)")
    if books.payouts:
        summary.add_row("payouts under way", f"{sats(books.payouts_msat)} sats",
                        f"{books.payouts} payment(s) whose outcome is not known yet")
    colour = "green" if books.margin_msat >= 0 else "red"
    summary.add_row("[bold]margin[/bold]", f"[{colour}]{sats(books.margin_msat)} sats[/]",
                    "the operator's: proofs − liabilities − payouts under way")
    if books.credit_keys:
        summary.add_row("operator credit", f"{sats(books.credit_msat)} sats",
                        f"{books.credit_keys} key(s) funded by hand: spendable, not "
                        "withdrawable, not counted")
    console.print(summary)
    if result is not None:
        for e in result.errors:
            err.print(f"[red]✗[/red] could not check at {escape(e)}")
        for p in result.spent:
            console.print(f"[red]✗ spent[/red] {p['amount']} {p['unit']} at {p['mint']} "
                          f"(Y {p['y'][:16]}…)", highlight=False)
        for p in result.pending:
            console.print(f"[yellow]… pending[/yellow] {p['amount']} {p['unit']} at "
                          f"{p['mint']} (Y {p['y'][:16]}…)", highlight=False)
        if not (result.spent or result.errors):
            console.print(f"[green]✓ the mints say all {result.checked} proof(s) are "
                          f"unspent[/green]")
        elif result.spent:
            console.print(f"[red]✗ {len(result.spent)} proof(s) the ledger counts are spent: "
                          f"{sats(result.spent_msat)} sats[/red]")
    if covered:
        console.print("[green]✓ the proofs cover what users are owed[/green]")
    else:
        short = (result.spent_msat if result else 0) - books.margin_msat
        console.print(f"[red]✗ the proofs do not cover what users are owed: short by "
                      f"{sats(short)} sats[/red]")


# --- send -----------------------------------------------------------------------------------


def trusted_mint(trusted: Sequence[str], url: str | None) -> str:
    """A mint of CASHU_MINTS as the wallet names it (the first when none is given)."""
    urls = [sanitize_mint_url(m) for m in trusted]
    if url is None:
        return urls[0]
    wanted = sanitize_mint_url(url)
    if wanted not in urls:
        raise fail(f"{url} is not one of the trusted mints (CASHU_MINTS): {', '.join(urls)}", 2)
    return wanted


async def _send(ledger: Ledger, config: Config, mint_url: str, unit: str, amount: int,
                owner: str) -> tuple[str, int]:
    wallet = open_wallet(ledger, config)
    try:
        mint = wallet.mints[mint_url]
        await mint.ensure_loaded()
        mint.active(unit)  # WalletError now, before any proof is picked
        return await wallet.send(mint.url, unit, amount, owner)
    finally:
        await wallet.close()


SEND_HELP = (
    "Withdraw AMOUNT from the pool as a Cashu token, and print the token.\n\n"
    "The token is the money: keep it. Never more than the margin (proofs − liabilities) is "
    "taken: what users are owed stays. The mint's input fee, if any, comes out of AMOUNT.\n\n"
    "Exit codes: 0 sent; 1 refused (more than the margin, too few proofs at that mint) or the "
    "mint failed; 2 bad input or settings (unit, a mint not in CASHU_MINTS, no CASHU_MINTS)."
)


@wallet_app.command("send", help=SEND_HELP)
def wallet_send(
    amount: Annotated[int, typer.Argument(help="How much to withdraw, in UNIT.", min=1)],
    mint: Annotated[str | None, typer.Option(help="A mint of CASHU_MINTS (default: the first, "
                                                  "the primary).")] = None,
    unit: Annotated[str, typer.Option(help="sat or msat.")] = "sat",
    as_json: JsonOpt = False,
) -> None:
    """Withdraw from the margin (help: SEND_HELP)."""
    from routstr_addon.ecash.mint import MintError, MintUnreachable
    from routstr_addon.ecash.wallet import WalletError

    config = load_config()
    trusted = mints_of(config)
    per_unit = UNIT_MSAT.get(unit)
    if per_unit is None:
        raise fail(f"unit {unit!r}: use one of {', '.join(UNIT_MSAT)}", 2)
    mint_url = trusted_mint(trusted, mint)
    owner = f"operator-send-{uuid.uuid4().hex}"
    with open_ledger(config) as ledger:
        books = read_books(ledger, trusted)
        if amount * per_unit > books.margin_msat:
            raise fail(f"refusing to send {amount:,} {unit}: the margin (proofs − liabilities − "
                       "payouts under way) "
                       f"is {sats(books.margin_msat)} sats; the rest is owed to users", 1)
        try:
            with err.status(f"withdrawing {amount:,} {unit} at {escape(mint_url)}…"):
                token, fee = asyncio.run(_send(ledger, config, mint_url, unit, amount, owner))
        except WalletError as e:
            raise fail(str(e), 1) from None
        except MintError as e:
            raise fail(f"the mint refused: {e}; nothing was withdrawn", 1) from None
        except MintUnreachable as e:
            if e.sent:
                raise fail(f"{e}. The mint may have made the token: the proofs picked stay "
                           f"'reserved' in the ledger under owner {owner}", 1) from None
            raise fail(f"{e}; nothing was withdrawn", 1) from None
    if as_json:
        print(json.dumps({"token": token, "amount": amount - fee, "fee": fee, "withdrawn": amount,
                          "mint": mint_url, "unit": unit}))
        return
    err.print(f"sent {amount - fee:,} {unit} from {escape(mint_url)}"
              + (f" (mint fee {fee:,} {unit})" if fee else ""), highlight=False)
    print(token)


# --- receive --------------------------------------------------------------------------------


class Unrecorded(Exception):
    """The mint redeemed a token but the ledger did not record the new proofs."""

    def __init__(self, token: str) -> None:
        super().__init__("the ledger could not record the new proofs")
        self.token = token


def read_token(text: str) -> str:
    return sys.stdin.read().strip() if text.strip() == "-" else text


async def _receive(ledger: Ledger, config: Config, text: str) -> Redeemed:
    from routstr_addon.ecash.tokens import parse_token, serialize_token

    token = parse_token(text)
    wallet = open_wallet(ledger, config)
    try:
        redeemed = await wallet.redeem(token)
        try:
            with ledger.transaction(durable=True) as tx:
                wallet.store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs, "unspent")
        except Exception as e:
            raise Unrecorded(serialize_token(redeemed.mint, redeemed.unit,
                                             redeemed.proofs)) from e
        return redeemed
    finally:
        await wallet.close()


RECEIVE_HELP = (
    "Put a token's value into the pool, as float for refunds and change.\n\n"
    "The token is redeemed at its mint and the new proofs are the operator's; no key is "
    "credited.\n\n"
    "Exit codes: 0 received; 1 the token was refused (malformed, spent, from a mint not in "
    "CASHU_MINTS, below the mint's fee) or the mint failed; 2 bad settings or no CASHU_MINTS."
)


@wallet_app.command("receive", help=RECEIVE_HELP)
def wallet_receive(
    token: Annotated[str, typer.Argument(help="A cashuA…/cashuB… token, or - to read it from "
                                              "stdin.")],
    as_json: JsonOpt = False,
) -> None:
    """Add float to the pool (help: RECEIVE_HELP)."""
    from routstr_addon.ecash.mint import MintError, MintUnreachable
    from routstr_addon.ecash.tokens import TokenError
    from routstr_addon.ecash.wallet import WalletError

    config = load_config()
    mints_of(config)
    text = read_token(token)
    with open_ledger(config) as ledger:
        try:
            with err.status("redeeming the token at its mint…"):
                redeemed = asyncio.run(_receive(ledger, config, text))
        except TokenError as e:
            raise fail(str(e), 1) from None
        except MintUnreachable as e:
            raise fail(f"{e}; " + ("the mint may have redeemed the token: send it again once "
                                   "the mint answers" if e.sent else "the token is unchanged"),
                       1) from None
        except (MintError, WalletError) as e:
            raise fail(f"the mint could not redeem the token: {e}", 1) from None
        except Unrecorded as e:
            print(e.token)
            raise fail("the mint redeemed the token but the ledger could not record the new "
                       "proofs; their value is the token printed above", 1) from None
    if as_json:
        print(json.dumps({"amount": redeemed.amount, "fee": redeemed.fee, "msat": redeemed.msat,
                          "mint": redeemed.mint, "unit": redeemed.unit}))
        return
    console.print(f"received {redeemed.amount:,} {redeemed.unit} at {redeemed.mint}"
                  + (f" (mint fee {redeemed.fee:,} {redeemed.unit})" if redeemed.fee else ""),
                  highlight=False)


# --- restore --------------------------------------------------------------------------------


RESTORE_HELP = (
    "Find the wallet's ecash again from its mnemonic (NUT-13 secrets, NUT-09 restore).\n\n"
    "For every mint of CASHU_MINTS and each of its sat/msat keysets, the outputs the wallet can "
    "have made are derived again from the mnemonic and the mint is asked to sign them again; the "
    "proofs it says are unspent (NUT-07) and the ledger lacks go back into the pool, proofs the "
    "ledger holds as unspent but the mint says are spent are marked spent, and the keysets' "
    "counters move past every output found, so new secrets never repeat. Use it after losing "
    "the database or restoring an old backup, with the proxy stopped (proofs made while it runs "
    "are left to the process that made them).\n\n"
    "Caveat: change and refund tokens handed to users and not yet redeemed by them are unspent "
    "at the mint too: a restore into a ledger that lost them counts them as the proxy's own.\n\n"
    "The mnemonic: --mnemonic, else WALLET_MNEMONIC, else DATA_DIR/wallet-mnemonic.txt.\n\n"
    "Exit codes: 0 restored (or nothing to restore); 1 a mint could not be asked; 2 bad "
    "settings, no CASHU_MINTS, or no valid mnemonic."
)


def restore_mnemonic(config: Config, given: str | None) -> str:
    """The mnemonic to restore with: given (``-``: from stdin), configured, or the data
    folder's file; never a new one. Exits 2 if there is none or it is invalid."""
    from routstr_addon.ecash.seed import MNEMONIC_FILE, MnemonicError, load_or_create_mnemonic

    source = "--mnemonic"
    if given is not None:
        text = sys.stdin.read() if given.strip() == "-" else given
    elif config.wallet_mnemonic:
        text, source = config.wallet_mnemonic, "WALLET_MNEMONIC"
    elif (config.data_dir / MNEMONIC_FILE).exists():
        try:
            return load_or_create_mnemonic(config)
        except MnemonicError as e:
            raise fail(str(e), 2) from None
    else:
        raise fail(f"no mnemonic: set WALLET_MNEMONIC, pass --mnemonic, or run from where "
                   f"{config.data_dir / MNEMONIC_FILE} is", 2)
    from routstr_addon.ecash.seed import normalize_mnemonic

    try:
        return normalize_mnemonic(text)
    except MnemonicError as e:
        raise fail(f"{source}: {e}", 2) from None


async def _restore(ledger: Ledger, config: Config, mnemonic: str,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    from routstr_addon.ecash.seed import seed_from_mnemonic
    from routstr_addon.ecash.wallet import Wallet

    wallet = Wallet(ledger, config.cashu_mints, seed=seed_from_mnemonic(mnemonic))
    try:
        return await wallet.restore(progress)
    finally:
        await wallet.close()


@wallet_app.command("restore", help=RESTORE_HELP)
def wallet_restore(
    mnemonic: Annotated[str | None, typer.Option(
        help="The BIP39 mnemonic to restore from, or - to read it from stdin (default: "
             "WALLET_MNEMONIC, else the data folder's wallet-mnemonic.txt).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore the wallet from its mnemonic (help: RESTORE_HELP)."""
    config = load_config()
    mints_of(config)
    words = restore_mnemonic(config, mnemonic)
    with open_ledger(config) as ledger, \
            err.status("asking the mints for the wallet's proofs…") as status:
        result = asyncio.run(_restore(ledger, config, words,
                                      lambda text: status.update(escape(text))))
    ok = not result["errors"]
    if as_json:
        print(json.dumps({**result, "ok": ok}))
        raise typer.Exit(0 if ok else 1)
    table = Table(title="restored (amounts in the unit)")
    table.add_column("mint", overflow="fold")
    for col in ("unit", "found", "restored", "known", "marked spent"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for m in result["mints"]:
        table.add_row(m["mint"], m["unit"], f"{m['found']:,}", f"{m['restored']:,}",
                      f"{m['known']:,}", f"{m['marked_spent']:,}")
    console.print(table)
    for m in result["mints"]:
        if m["pending"]:
            console.print(f"[yellow]{m['pending']:,} {m['unit']} at {m['mint']} pending at the "
                          "mint: not restored; run again later[/yellow]", highlight=False)
        if m["skipped"]:
            console.print(f"[yellow]{m['skipped']:,} {m['unit']} at {m['mint']} made while the "
                          "restore ran, left to the process that made them: run again with the "
                          "proxy stopped to be sure none is missed[/yellow]", highlight=False)
    for e in result["errors"]:
        err.print(f"[red]✗[/red] {escape(e)}", highlight=False)
    console.print(f"restored {sats(result['restored_msat'])} sats into the pool. Tokens handed "
                  "to users and not yet redeemed are counted too: check `routstr wallet "
                  "balance`.", highlight=False)
    raise typer.Exit(0 if ok else 1)


# --- keys create --token --------------------------------------------------------------------


async def _create(config: Config, ledger: Ledger, text: str, expires_at: float | None,
                  refund_address: str | None, label: str | None) -> tuple[str, KeyState]:
    from routstr_addon.payments.cashu import Payments
    from routstr_addon.payments.lightning import Invoices

    wallet = open_wallet(ledger, config)
    try:  # as the proxy does: with SWAP_UNTRUSTED_MINTS, other mints' tokens are melted in
        payments = Payments(ledger, wallet, Invoices(ledger, wallet),
                            config.swap_untrusted_mints)
        return await payments.create(text, expires_at, refund_address, label)
    finally:
        await wallet.close()


def create_key_from_token(config: Config, ledger: Ledger, token: str, *,
                          expires_at: float | None, refund_address: str | None,
                          label: str | None) -> tuple[str, KeyState]:
    """A new key funded by redeeming a token, as ``POST /v1/balance/create`` makes it.
    Exits 2 without mints, 1 if the token is refused."""
    from routstr_addon.ecash.mint import MintError, MintUnreachable
    from routstr_addon.ecash.wallet import WalletError
    from routstr_addon.errors import ApiError

    mints_of(config)
    text = read_token(token)
    try:
        with err.status("redeeming the token at its mint…"):
            key, state = asyncio.run(_create(config, ledger, text, expires_at, refund_address,
                                             label))
    except ApiError as e:
        returned = e.headers.get("x-cashu")
        if returned:  # the token was redeemed but not recorded: its value, as a new token
            print(returned)
        raise fail(e.message, 1) from None
    except (MintError, MintUnreachable, WalletError) as e:  # not turned into an ApiError
        raise fail(f"the mint failed: {e}", 1) from None
    return key, state
