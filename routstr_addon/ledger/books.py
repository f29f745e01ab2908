"""The operator's books: the ecash the wallet holds against what it owes, and the margin.

One definition, read by ``routstr wallet balance``, ``routstr ledger check``, the TUI, /admin
(its figures and its withdraw) and the payouts, so they can never disagree:

    margin = proofs held − (backed key balances + refunds owed) − payouts under way

Proofs held are the ``unspent``, ``held`` and ``reserved`` ones, and the ``locked`` ones:
received locked to the payment key and not yet swapped at their mint (counted at their face
value; the swap's input fee comes off when they are redeemed). Proofs claimed by a payment
under way stay counted until it is settled, so what it may take (amount and fee reserve) is
subtracted: it is not the operator's to withdraw. Keys the operator funded by hand are credit,
spendable but never withdrawn as ecash: shown apart, not owed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from routstr_addon.ledger.proofs import POOL_STATES
from routstr_addon.ledger.schema import UNIT_MSAT

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["Books", "CountedProof", "Holding", "read_books"]

_IN_POOL = ", ".join(f"'{s}'" for s in POOL_STATES)
_LOCKED = "'received', 'redeeming'"  # locked proofs not swapped yet: still the proxy's


@dataclass(frozen=True, slots=True)
class Holding:
    """The proofs the proxy holds at one mint in one unit."""

    mint: str
    unit: str
    trusted: bool
    count: int = 0
    by_state: Mapping[str, int] = field(default_factory=dict)  # amount in the unit, per state

    @property
    def amount(self) -> int:
        return sum(self.by_state.values())

    @property
    def msat(self) -> int:
        return self.amount * UNIT_MSAT.get(self.unit, 0)

    def as_json(self) -> dict[str, Any]:
        return {"mint": self.mint, "unit": self.unit, "trusted": self.trusted,
                "proofs": self.count, "amount": self.amount, "msat": self.msat,
                **{state: self.by_state.get(state, 0) for state in (*POOL_STATES, "locked")}}


@dataclass(frozen=True, slots=True)
class CountedProof:
    secret: str
    mint: str
    unit: str
    amount: int


@dataclass(frozen=True, slots=True)
class Books:
    """One consistent reading of what the proxy holds and owes (all amounts msat)."""

    holdings: tuple[Holding, ...]
    keys_msat: int  # the balances of keys funded with ecash
    keys: int  # of those, with a balance
    refunds_msat: int  # refunds debited from their key whose token is not made yet
    refunds: int
    payouts_msat: int  # what payments under way may take (amount and fee reserve)
    payouts: int
    credit_msat: int  # balances the operator granted by hand: spendable, not withdrawable
    credit_keys: int
    proofs: tuple[CountedProof, ...] = field(default=(), repr=False)  # when asked for

    @property
    def proofs_msat(self) -> int:
        return sum(h.msat for h in self.holdings)

    @property
    def liabilities_msat(self) -> int:
        """What users are owed."""
        return self.keys_msat + self.refunds_msat

    @property
    def margin_msat(self) -> int:
        """The operator's: what may be withdrawn or paid out."""
        return self.proofs_msat - self.liabilities_msat - self.payouts_msat

    def held(self, mint: str, unit: str) -> int:
        """The amount held at a mint in a unit, in the unit."""
        return sum(h.amount for h in self.holdings if h.mint == mint and h.unit == unit)

    def as_json(self) -> dict[str, Any]:
        return {
            "mints": [h.as_json() for h in self.holdings],
            "proofs_msat": self.proofs_msat,
            "keys_msat": self.keys_msat,
            "keys": self.keys,
            "pending_refunds_msat": self.refunds_msat,
            "pending_refunds": self.refunds,
            "pending_payouts_msat": self.payouts_msat,
            "pending_payouts": self.payouts,
            "liabilities_msat": self.liabilities_msat,
            "margin_msat": self.margin_msat,
            "operator_credit_msat": self.credit_msat,
            "operator_credit_keys": self.credit_keys,
        }


def read_books(database: Database, trusted: Sequence[str] = (),
               with_proofs: bool = False) -> Books:
    """The books, read in one snapshot. ``trusted``: the wallet's mints as it names them
    (each is listed, holding something or not); ``with_proofs``: every proof counted too (to
    ask the mints about them)."""
    with database.snapshot() as tx:
        grouped = tx.rows(f"SELECT mint, unit, state, COUNT(*), SUM(amount) FROM proofs "
                          f"WHERE state IN ({_IN_POOL}) GROUP BY mint, unit, state")
        grouped += tx.rows(f"SELECT mint, unit, 'locked', COUNT(*), SUM(amount) FROM "
                           f"locked_proofs WHERE state IN ({_LOCKED}) GROUP BY mint, unit")
        keys_msat, keys, credit_msat, credit_keys = (int(v) for v in tx.row(
            "SELECT COALESCE(SUM(CASE WHEN backed THEN balance_msat ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN backed AND balance_msat > 0 THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN backed THEN 0 ELSE balance_msat END), 0), "
            "COALESCE(SUM(CASE WHEN backed OR balance_msat = 0 THEN 0 ELSE 1 END), 0) "
            "FROM api_keys"))
        refunds_msat, refunds = (int(v) for v in tx.row(
            "SELECT COALESCE(SUM(msat), 0), COUNT(*) FROM refunds WHERE state = 'pending'"))
        outgoing = tx.rows("SELECT unit, COALESCE(SUM(amount + fee_reserve), 0), COUNT(*) "
                           "FROM payouts WHERE state = 'pending' GROUP BY unit")
        proofs = tuple(CountedProof(s, m, u, int(a)) for s, m, u, a in tx.rows(
            f"SELECT secret, mint, unit, amount FROM proofs WHERE state IN ({_IN_POOL}) "
            f"UNION ALL SELECT secret, mint, unit, amount FROM locked_proofs "
            f"WHERE state IN ({_LOCKED})")) if with_proofs else ()
    counts: dict[tuple[str, str], int] = {}
    states: dict[tuple[str, str], dict[str, int]] = {}
    for mint, unit, state, count, total in grouped:
        counts[(mint, unit)] = counts.get((mint, unit), 0) + int(count)
        states.setdefault((mint, unit), {})[state] = int(total)
    for url in trusted:  # every trusted mint is listed, holding nothing or not
        if not any(m == url for m, _ in counts):
            counts[(url, "sat")] = 0
            states[(url, "sat")] = {}
    order = {url: i for i, url in enumerate(trusted)}
    holdings = tuple(sorted((Holding(m, u, m in order, counts[(m, u)], states[(m, u)])
                             for m, u in counts),
                            key=lambda h: (order.get(h.mint, len(order)), h.mint, h.unit)))
    payouts_msat = sum(int(total) * UNIT_MSAT.get(unit, 0) for unit, total, _ in outgoing)
    return Books(holdings, keys_msat, keys, refunds_msat, refunds, payouts_msat,
                 sum(int(n) for _, _, n in outgoing), credit_msat, credit_keys, proofs)
