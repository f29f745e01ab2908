"""The ``Ledger``: one object per database, composed of one part per job.

===============  ==============================================================================
``database``     the connection, transactions and snapshots, the schema (``db``, ``dialects``)
``accounts``     keys, balances, the request path's reserve and settle, the journal
``registry``     the proxy processes and the reservations nobody will close (``instances``)
``proofs``       the wallet's Cashu proofs and its lost swaps
``locked``       proofs received locked to the payment key, and the change pool's picks
``counters``     the wallet's NUT-13 derivation counters
``upstreams``    operators' live changes to the providers (off, re-priced)
``payments``     incoming tokens, each credited once
``refunds``      balances withdrawn as tokens
``invoices``     Lightning invoices that fund keys
``payouts``      ecash melted to pay Lightning invoices
``reports``      what the operator reads: /admin, ``routstr stats``, the TUI
``admin``        /admin's sessions, login failures and the operator's journal of changes
===============  ==============================================================================

The methods callers use most (the request path, keys, the audit, the books) are on the
``Ledger`` itself and hand over to their part.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import peewee

from routstr_addon.ledger import audit
from routstr_addon.ledger.accounts import Accounts, Held, KeyState, Settlement
from routstr_addon.ledger.adminstore import AdminStore
from routstr_addon.ledger.books import Books, read_books
from routstr_addon.ledger.counters import KeysetCounters
from routstr_addon.ledger.db import Database, Tx
from routstr_addon.ledger.gauges import read_gauges
from routstr_addon.ledger.history import key_history
from routstr_addon.ledger.instances import Instances
from routstr_addon.ledger.invoices import InvoiceStore
from routstr_addon.ledger.limits import Limits
from routstr_addon.ledger.locked import LockedStore
from routstr_addon.ledger.nodes import NodePaymentStore
from routstr_addon.ledger.payments import PaymentStore
from routstr_addon.ledger.payouts import PayoutStore
from routstr_addon.ledger.proofs import ProofStore
from routstr_addon.ledger.refunds import RefundStore
from routstr_addon.ledger.reports import Reports
from routstr_addon.ledger.schema import MODELS
from routstr_addon.ledger.upstreams import UpstreamOverrides, UpstreamProviders

__all__ = ["WAL_TRUNCATE_BYTES", "Ledger"]

WAL_TRUNCATE_BYTES = 8 * 1024 * 1024


class Ledger:
    """All balance changes go through here. One instance per process and database."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.database = Database(url)
        if create:
            self.database.create(MODELS)
        self.registry = Instances(self.database)
        self.accounts = Accounts(self.database, self.registry)
        self.proofs = ProofStore(self.database)
        self.locked = LockedStore(self.database)
        self.counters = KeysetCounters(self.database)
        self.upstreams = UpstreamOverrides(self.database)
        self.providers = UpstreamProviders(self.database)
        self.payments = PaymentStore(self.database)
        self.refunds = RefundStore(self.database)
        self.invoices = InvoiceStore(self.database)
        self.payouts = PayoutStore(self.database)
        self.nodes = NodePaymentStore(self.database)
        self.reports = Reports(self.database)
        self.admin = AdminStore(self.database)

    @property
    def db(self) -> peewee.Database:
        """The peewee database (tests read it directly to check the ledger's work)."""
        return self.database.peewee

    @property
    def is_sqlite(self) -> bool:
        return self.database.name == "sqlite"

    @property
    def instance_id(self) -> str | None:
        """This process in the registry: its reservations carry this id."""
        return self.registry.instance_id

    @instance_id.setter
    def instance_id(self, value: str | None) -> None:
        self.registry.instance_id = value

    # -- the database ----------------------------------------------------------------------

    def transaction(self, durable: bool = False) -> AbstractContextManager[Tx]:
        """A transaction for several steps at once: hand the ``Tx`` to the ``*_in`` methods
        and the stores' methods that take one; all of it commits, or none."""
        return self.database.transaction(durable)

    def snapshot(self) -> AbstractContextManager[Tx]:
        """A read-only transaction for reports that must see one moment."""
        return self.database.snapshot()

    def defer_checkpoints(self) -> None:
        """Stop this connection from checkpointing the WAL during commits (SQLite only); the
        proxy runs ``checkpoint`` on a timer in a worker thread instead."""
        self.database.defer_checkpoints()

    def checkpoint(self, truncate_above: int = WAL_TRUNCATE_BYTES) -> None:
        """Copy the WAL back into the database (SQLite only), truncating it once it passes
        ``truncate_above`` bytes."""
        self.database.checkpoint(truncate_above)

    def disconnect(self) -> None:
        """Drop the connection (after an error); the next read opens a new one."""
        self.database.close()

    def close(self) -> None:
        self.database.close()

    # -- the request path ------------------------------------------------------------------

    def reserve(self, key_hash: str, amount_msat: int, request_id: str,
                model: str | None = None) -> Held:
        """Hold ``amount_msat`` of the key's available balance for one request, or raise
        ``ReserveError``."""
        return self.accounts.reserve(key_hash, amount_msat, request_id, model)

    def settle(self, request_id: str, cost_msat: int, *, model: str | None = None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None,
               note: str | None = None) -> Settlement | None:
        """Charge a request's cost (at most its reservation) and free the rest; None if the
        reservation was already closed."""
        return self.accounts.settle(request_id, cost_msat, model=model,
                                    prompt_tokens=prompt_tokens,
                                    completion_tokens=completion_tokens, note=note)

    def release(self, request_id: str, note: str | None = None) -> Settlement | None:
        return self.accounts.release(request_id, note)

    def touch(self, request_id: str, delivered: int = 0, prompt_tokens: int = 0) -> None:
        self.accounts.touch(request_id, delivered, prompt_tokens)

    def late_charge(self, key_hash: str, request_id: str, cost_msat: int,
                    model: str | None, *, overrun: bool = False) -> int:
        return self.accounts.late_charge(key_hash, request_id, cost_msat, model,
                                         overrun=overrun)

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, balance_msat: int = 0, *, expires_at: float | None = None,
                   refund_address: str | None = None, label: str | None = None,
                   key: str | None = None, note: str = "created") -> tuple[str, KeyState]:
        return self.accounts.create_key(balance_msat, expires_at=expires_at,
                                        refund_address=refund_address, label=label, key=key,
                                        note=note)

    def credit(self, key_hash: str, amount_msat: int, note: str | None = None) -> int:
        return self.accounts.credit(key_hash, amount_msat, note)

    def create_key_in(self, tx: Tx, key_hash: str, balance_msat: int, *, note: str,
                      expires_at: float | None = None, refund_address: str | None = None,
                      label: str | None = None, backed: bool = False) -> None:
        self.accounts.create_key_in(tx, key_hash, balance_msat, note=note,
                                    expires_at=expires_at, refund_address=refund_address,
                                    label=label, backed=backed)

    def credit_in(self, tx: Tx, key_hash: str, amount_msat: int, note: str | None,
                  request_id: str | None = None) -> int | None:
        return self.accounts.credit_in(tx, key_hash, amount_msat, note, request_id)

    def debit_in(self, tx: Tx, key_hash: str, amount_msat: int, note: str,
                 request_id: str | None = None, kind: str = "debit") -> int | None:
        return self.accounts.debit_in(tx, key_hash, amount_msat, note, request_id, kind)

    def reserve_in(self, tx: Tx, key_hash: str, amount_msat: int, request_id: str,
                   model: str | None) -> int | None:
        return self.accounts.reserve_in(tx, key_hash, amount_msat, request_id, model)

    def set_disabled(self, key_hash: str, disabled: bool) -> bool | None:
        return self.accounts.set_disabled(key_hash, disabled)

    def key(self, key_hash: str) -> KeyState | None:
        return self.accounts.key(key_hash)

    def set_limits(self, key_hash: str, limits: Limits) -> KeyState | None:
        return self.accounts.set_limits(key_hash, limits)

    def create_children(self, parent_hash: str, count: int, limits: Limits,
                        expires_at: float | None) -> list[str]:
        return self.accounts.create_children(parent_hash, count, limits, expires_at)

    def reset_child(self, parent_hash: str, child_hash: str) -> bool:
        return self.accounts.reset_child(parent_hash, child_hash)

    def children(self, parent_hash: str) -> list[KeyState]:
        return self.accounts.children(parent_hash)

    def history(self, key_hash: str) -> list[dict[str, Any]]:
        """The key's money in (tokens, invoices) and out (refunds), newest first."""
        return key_history(self.database, key_hash)

    def find_keys(self, prefix: str) -> list[KeyState]:
        return self.accounts.find_keys(prefix)

    def keys(self, limit: int = 1000) -> list[KeyState]:
        return self.accounts.keys(limit)

    def entries(self, key_hash: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self.accounts.entries(key_hash, limit)

    def open_reservations(self, key_hash: str | None = None) -> list[dict[str, Any]]:
        return self.accounts.open_reservations(key_hash)

    # -- processes and orphaned reservations -------------------------------------------------

    def register_instance(self) -> str:
        return self.registry.register()

    def heartbeat(self) -> None:
        self.registry.heartbeat()

    def probe_write(self) -> None:
        """One small write (this process's heartbeat); raises if the database cannot take it."""
        self.registry.probe()

    def unregister_instance(self) -> None:
        self.registry.unregister()

    def instances(self, stale_after: float) -> tuple[set[str], set[str]]:
        return self.registry.alive_and_gone(stale_after)

    def forget_instances(self, ids: set[str]) -> None:
        self.registry.forget(ids)

    def orphans(self, timeout: float, stale_after: float) -> list[dict[str, Any]]:
        return self.registry.orphans(timeout, stale_after)

    # -- the audit and the books -------------------------------------------------------------

    def check(self) -> list[str]:
        """Audit the books; one line per problem found (empty when all holds)."""
        return audit.check(self.database)

    def books(self, trusted: Sequence[str] = (), with_proofs: bool = False) -> Books:
        """What the wallet holds, what it owes, and the operator's margin, in one snapshot."""
        return read_books(self.database, trusted, with_proofs)

    def gauges(self, trusted: Sequence[str] = ()) -> dict[str, Any]:
        """The figures the metrics read at scrape time (the books, charges, payouts)."""
        return read_gauges(self.database, trusted)

