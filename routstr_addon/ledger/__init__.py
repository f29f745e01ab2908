"""Every SQL statement: the schema, the request path's reserve and settle, money in and out,
the process registry, the operator's books and reports, and the audit, on SQLite or PostgreSQL.

Callers use the ``Ledger`` (``core``) and the typed results below; ``Tx`` is an open transaction
they hand from one ledger method to the next so that their writes commit together.
"""

from routstr_addon.ledger.accounts import (
    KEY_PREFIX,
    Held,
    KeyState,
    ReserveError,
    Settlement,
    hash_key,
    new_api_key,
)
from routstr_addon.ledger.books import Books, CountedProof, Holding
from routstr_addon.ledger.core import Ledger
from routstr_addon.ledger.db import DATABASE_ERRORS, Tx
from routstr_addon.ledger.invoices import InvoiceRecord
from routstr_addon.ledger.limits import LimitRefused, Limits, parse_period
from routstr_addon.ledger.locked import LockedRecord
from routstr_addon.ledger.payments import XCashuRecord
from routstr_addon.ledger.payouts import PayoutRecord
from routstr_addon.ledger.proofs import POOL_STATES, ProofRecord
from routstr_addon.ledger.refunds import RefundRecord
from routstr_addon.ledger.reports import (
    KINDS,
    ChargeGroup,
    Day,
    Finished,
    KeyStats,
    Page,
    PayoutTotals,
    is_hex_prefix,
)
from routstr_addon.ledger.schema import MODELS, UNIT_MSAT, LedgerEntry

__all__ = [
    "DATABASE_ERRORS",
    "KEY_PREFIX",
    "KINDS",
    "MODELS",
    "POOL_STATES",
    "UNIT_MSAT",
    "Books",
    "ChargeGroup",
    "CountedProof",
    "Day",
    "Finished",
    "Held",
    "Holding",
    "InvoiceRecord",
    "KeyState",
    "KeyStats",
    "Ledger",
    "LedgerEntry",
    "LimitRefused",
    "Limits",
    "LockedRecord",
    "Page",
    "PayoutRecord",
    "PayoutTotals",
    "ProofRecord",
    "RefundRecord",
    "ReserveError",
    "Settlement",
    "Tx",
    "XCashuRecord",
    "hash_key",
    "is_hex_prefix",
    "new_api_key",
    "parse_period",
]
