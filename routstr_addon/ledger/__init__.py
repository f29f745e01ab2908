"""Every SQL statement: the schema, the request path's reserve and settle, money in and out,
process registry, reports and the audit, on SQLite or PostgreSQL."""

from routstr_addon.ledger.core import (
    DATABASE_ERRORS,
    KEY_PREFIX,
    MODELS,
    KeyState,
    Ledger,
    LedgerEntry,
    ReserveError,
    Settlement,
    hash_key,
    new_api_key,
)

__all__ = [
    "DATABASE_ERRORS",
    "KEY_PREFIX",
    "MODELS",
    "KeyState",
    "Ledger",
    "LedgerEntry",
    "ReserveError",
    "Settlement",
    "hash_key",
    "new_api_key",
]
