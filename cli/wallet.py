"""``routstr wallet``: the ecash the proxy holds, against what it owes its users.

The proxy keeps its Cashu proofs in the ledger database (table ``proofs``): ``unspent`` ones are
the pool, ``held`` and ``reserved`` ones are on their way to a user as change or refund but still
the proxy's. It owes the balance of every key funded with ecash, and every refund recorded but
not yet handed out. Proofs minus liabilities is the margin, the operator's own: ``send``
withdraws from it and never more, ``receive`` adds float to the pool.

Every command works on the running proxy's database: reads are one snapshot, writes go through
the same wallet code and transactions as the proxy's. cashu (slow to import) is imported only by
the commands that talk to a mint, through ``routstr_addon.ecash.nutshell``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from routstr_addon.ecash.tokens import UNIT_MSAT, sanitize_mint_url
from routstr_addon.ledger import KeyState, Ledger
from routstr_addon.settings import Config

from .common import JsonOpt, console, err, fail, load_config, mints_of, open_ledger, sats

if TYPE_CHECKING:
    from routstr_addon.ecash.wallet import Redeemed, Wallet

__all__ = ["Books", "check_books", "create_key_from_token", "open_wallet", "read_books",
           "wallet_app"]

wallet_app = typer.Typer(
    help="The ecash the proxy holds: balance against what users are owed, withdraw the "
         "margin, add float.", no_args_is_help=True)

POOL_STATES = ("unspent", "held", "reserved")
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


@dataclass(slots=True)
class Holding:
    """The proofs the proxy holds at one mint in one unit."""

    mint: str
    unit: str
    trusted: bool
    count: int = 0
    by_state: dict[str, int] = field(default_factory=dict)  # amount in the unit, per state

    @property
    def amount(self) -> int:
        return sum(self.by_state.values())

    @property
    def msat(self) -> int:
        return self.amount * UNIT_MSAT.get(self.unit, 0)

    def as_json(self) -> dict[str, Any]:
        return {"mint": self.mint, "unit": self.unit, "trusted": self.trusted,
                "proofs": self.count, "amount": self.amount, "msat": self.msat,
                **{state: self.by_state.get(state, 0) for state in POOL_STATES}}


@dataclass(slots=True)
class Books:
    """One consistent reading of what the proxy holds and owes."""

    holdings: list[Holding]
    keys_msat: int  # the balances of keys funded with ecash (all keys on an older ledger)
    keys: int  # with a balance
    refunds_msat: int  # refunds debited from their key whose token is not made yet
    refunds: int
    credit_msat: int  # balances the operator granted by hand: spendable, not withdrawable
    credit_keys: int
    proofs: list[tuple[str, str, str, int]] = field(default_factory=list, repr=False)
    # (secret, mint, unit, amount) of every proof counted, when asked for

    @property
    def proofs_msat(self) -> int:
        return sum(h.msat for h in self.holdings)

    @property
    def liabilities_msat(self) -> int:
        return self.keys_msat + self.refunds_msat

    @property
    def margin_msat(self) -> int:
        return self.proofs_msat - self.liabilities_msat


@contextmanager
def snapshot(ledger: Ledger) -> Iterator[Any]:
    """A cursor in a read-only transaction: every query in it sees the same moment, however
    the proxy writes meanwhile."""
    cur = ledger.db.connection().cursor()
    cur.execute("BEGIN" if ledger.is_sqlite else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        yield cur
    finally:
        cur.execute("ROLLBACK")


def read_books(ledger: Ledger, trusted: Sequence[str], with_proofs: bool = False) -> Books:
    """The proofs held per (mint, unit) and the liabilities, read in one snapshot."""
    trusted_urls = [sanitize_mint_url(m) for m in trusted]
    pool = ", ".join(f"'{s}'" for s in POOL_STATES)
    columns = {c.name for c in ledger.db.get_columns("api_keys")}
    if "backed" in columns:
        keys_sql = ("SELECT COALESCE(SUM(CASE WHEN backed THEN balance_msat ELSE 0 END), 0), "
                    "COALESCE(SUM(CASE WHEN backed AND balance_msat > 0 THEN 1 ELSE 0 END), 0), "
                    "COALESCE(SUM(CASE WHEN backed THEN 0 ELSE balance_msat END), 0), "
                    "COALESCE(SUM(CASE WHEN backed OR balance_msat = 0 THEN 0 ELSE 1 END), 0) "
                    "FROM api_keys")
    else:  # a ledger from before keys knew how they were funded: all of it is owed
        keys_sql = ("SELECT COALESCE(SUM(balance_msat), 0), "
                    "COALESCE(SUM(CASE WHEN balance_msat > 0 THEN 1 ELSE 0 END), 0), 0, 0 "
                    "FROM api_keys")
    with snapshot(ledger) as cur:
        cur.execute(f"SELECT mint, unit, state, COUNT(*), SUM(amount) FROM proofs "
                    f"WHERE state IN ({pool}) GROUP BY mint, unit, state")
        grouped = cur.fetchall()
        cur.execute(keys_sql)
        keys_msat, keys, credit_msat, credit_keys = (int(v) for v in cur.fetchone())
        cur.execute("SELECT COALESCE(SUM(msat), 0), COUNT(*) FROM refunds "
                    "WHERE state = 'pending'")
        refunds_msat, refunds = (int(v) for v in cur.fetchone())
        proofs: list[tuple[str, str, str, int]] = []
        if with_proofs:
            cur.execute(f"SELECT secret, mint, unit, amount FROM proofs WHERE state IN ({pool})")
            proofs = [(s, m, u, int(a)) for s, m, u, a in cur.fetchall()]
    holdings: dict[tuple[str, str], Holding] = {}
    for mint, unit, state, count, total in grouped:
        h = holdings.setdefault((mint, unit), Holding(mint, unit, mint in trusted_urls))
        h.count += int(count)
        h.by_state[state] = int(total)
    for url in trusted_urls:  # every trusted mint is listed, holding nothing or not
        if not any(m == url for m, _ in holdings):
            holdings[(url, "sat")] = Holding(url, "sat", True)
    order = {url: i for i, url in enumerate(trusted_urls)}
    listed = sorted(holdings.values(),
                    key=lambda h: (order.get(h.mint, len(order)), h.mint, h.unit))
    return Books(listed, keys_msat, keys, refunds_msat, refunds, credit_msat, credit_keys,
                 proofs)


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


async def mint_states(proofs: Sequence[tuple[str, str, str, int]],
                      progress: Callable[[str], None]) -> tuple[dict[str, tuple[str, str]],
                                                                list[str]]:
    """Ask each mint for the state of its proofs: {secret: (Y, state)}, and the errors met."""
    from routstr_addon.ecash.mint import MintClient, MintError, MintUnreachable
    from routstr_addon.ecash.tokens import nutshell

    nutshell()
    from cashu.core.crypto.b_dhke import hash_to_curve

    by_mint: dict[str, list[str]] = {}
    for secret, mint, _, _ in proofs:
        by_mint.setdefault(mint, []).append(secret)
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


def still_held(ledger: Ledger, secrets: Sequence[str]) -> set[str]:
    """Which of these proofs the ledger still counts (the proxy may have spent some since)."""
    held: set[str] = set()
    cur = ledger.db.connection().cursor()
    for start in range(0, len(secrets), CHECK_BATCH):
        batch = list(secrets[start:start + CHECK_BATCH])
        marks = ", ".join("?" * len(batch))
        pool = ", ".join("?" * len(POOL_STATES))
        cur.execute(ledger.sql(f"SELECT secret FROM proofs WHERE secret IN ({marks}) "
                               f"AND state IN ({pool})"), (*batch, *POOL_STATES))
        held.update(row[0] for row in cur.fetchall())
    return held


def check_books(ledger: Ledger, books: Books) -> Check:
    """Ask the mints which of the counted proofs are really unspent (with a spinner)."""
    check = Check(checked=len(books.proofs))
    if not books.proofs:
        return check
    with err.status("asking the mints which proofs are unspent…") as status:
        states, check.errors = asyncio.run(
            mint_states(books.proofs, lambda text: status.update(escape(text))))
    odd = [p for p in books.proofs if states.get(p[0], ("", "UNSPENT"))[1] != "UNSPENT"]
    # A proof the proxy spent between the snapshot and the mint's answer is no finding.
    kept = still_held(ledger, [p[0] for p in odd])
    for secret, mint, unit, amount in odd:
        if secret not in kept:
            continue
        y, state = states[secret]
        found = {"mint": mint, "unit": unit, "amount": amount, "y": y, "state": state}
        (check.spent if state == "SPENT" else check.pending).append(found)
    return check


# --- balance --------------------------------------------------------------------------------


BALANCE_HELP = (
    "What the proxy holds in ecash, what it owes, and the operator's margin.\n\n"
    "Per mint and unit: the proofs held (unspent, held for an x-cashu request's change, "
    "reserved for a refund). Owed: the balances of keys funded with ecash, and refunds not yet "
    "handed out. The margin, proofs − liabilities, is the operator's. Keys funded by hand "
    "(keys create --balance-sats) are shown apart: spendable credit, not withdrawable, not "
    "counted. Amounts in sats, to the msat.\n\n"
    "Exit codes: 0 the proofs cover the liabilities (and, with --check, every one is unspent at "
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
    good_msat = books.proofs_msat - (result.spent_msat if result else 0)
    covered = good_msat >= books.liabilities_msat
    ok = covered and (result is None or not (result.spent or result.errors))
    if as_json:
        print(json.dumps({
            "mints": [h.as_json() for h in books.holdings],
            "proofs_msat": books.proofs_msat,
            "keys_msat": books.keys_msat,
            "keys": books.keys,
            "pending_refunds_msat": books.refunds_msat,
            "pending_refunds": books.refunds,
            "liabilities_msat": books.liabilities_msat,
            "margin_msat": books.margin_msat,
            "operator_credit_msat": books.credit_msat,
            "operator_credit_keys": books.credit_keys,
            "covered": covered,
            "check": result.as_json() if result else None,
            "ok": ok,
        }))
        raise typer.Exit(0 if ok else 1)
    print_books(books, result, covered)
    raise typer.Exit(0 if ok else 1)


def print_books(books: Books, result: Check | None, covered: bool) -> None:
    table = Table(title="ecash held")
    table.add_column("mint", overflow="fold")
    for col in ("unit", "proofs", "unspent", "held", "reserved", "total", "sats"):
        table.add_column(col, justify="left" if col == "unit" else "right")
    for h in books.holdings:
        table.add_row(h.mint + ("" if h.trusted else " [yellow](not in CASHU_MINTS)[/]"), h.unit,
                      str(h.count), *(f"{h.by_state.get(s, 0):,}" for s in POOL_STATES),
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
    colour = "green" if books.margin_msat >= 0 else "red"
    summary.add_row("[bold]margin[/bold]", f"[{colour}]{sats(books.margin_msat)} sats[/]",
                    "the operator's: proofs − liabilities")
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
        short = books.liabilities_msat - books.proofs_msat + (result.spent_msat if result else 0)
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
            raise fail(f"refusing to send {amount:,} {unit}: the margin (proofs − liabilities) "
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
            with ledger.transaction(durable=True) as cur:
                wallet.store_in(cur, redeemed.mint, redeemed.unit, redeemed.proofs, "unspent")
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
