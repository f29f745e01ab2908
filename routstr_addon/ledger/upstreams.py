"""Operators' live changes to the upstream providers, shared by every process on the database:
a provider or one of its models turned off, and a model's USD prices set by hand.

One row per (provider, model); ``model`` "" is the whole provider. The configuration stays the
source of what exists; these rows only turn parts off or re-price them, so a restart with an
empty table runs exactly what the files say. Processes poll ``version`` (one cheap query) and
rebuild their catalog when it changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["Override", "UpstreamOverrides", "UpstreamProviders"]

_UPSERT = ("INSERT INTO upstream_overrides (provider, model, disabled, prompt, completion, "
           "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider, model) DO UPDATE SET "
           "disabled = excluded.disabled, prompt = excluded.prompt, "
           "completion = excluded.completion, updated_at = excluded.updated_at")


@dataclass(frozen=True, slots=True)
class Override:
    provider: str
    model: str  # "": the whole provider
    disabled: bool
    prompt: str | None  # USD per token, as OpenRouter writes prices; None: as configured
    completion: str | None
    updated_at: float


class UpstreamOverrides:
    def __init__(self, database: Database) -> None:
        self._db = database

    def all(self) -> list[Override]:
        rows = self._db.reader().rows(
            "SELECT provider, model, disabled, prompt, completion, updated_at "
            "FROM upstream_overrides ORDER BY provider, model")
        return [Override(str(p), str(m), bool(d), pr, co, float(u))
                for p, m, d, pr, co, u in rows]

    def version(self) -> tuple[int, float]:
        """Changes when any row does: what a process polls."""
        count, latest = self._db.reader().row(
            "SELECT COUNT(*), MAX(updated_at) FROM upstream_overrides")
        return int(count), float(latest or 0)

    def set(self, provider: str, model: str = "", *, disabled: bool = False,
            prompt: str | None = None, completion: str | None = None) -> None:
        with self._db.transaction(durable=True) as tx:
            tx.execute(_UPSERT, (provider, model, disabled, prompt, completion, time.time()))

    def clear(self, provider: str, model: str = "") -> bool:
        with self._db.transaction(durable=True) as tx:
            return tx.execute("DELETE FROM upstream_overrides WHERE provider = ? AND model = ?",
                              (provider, model)) > 0


class UpstreamProviders:
    """Providers added while running (``upstream_providers``): name → its providers-file entry
    as JSON. Names are unique here; the callers keep them apart from the configured ones."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def all(self) -> list[tuple[str, str]]:
        return [(str(n), str(e)) for n, e in self._db.reader().rows(
            "SELECT name, entry FROM upstream_providers ORDER BY name")]

    def version(self) -> tuple[int, float]:
        count, latest = self._db.reader().row(
            "SELECT COUNT(*), MAX(updated_at) FROM upstream_providers")
        return int(count), float(latest or 0)

    def add(self, name: str, entry: str) -> bool:
        """False when the name is taken (nothing changed)."""
        with self._db.transaction(durable=True) as tx:
            return tx.execute("INSERT INTO upstream_providers (name, entry, updated_at) "
                              "VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
                              (name, entry, time.time())) > 0

    def remove(self, name: str) -> bool:
        """The provider and the live changes made to it (off, re-priced) go together."""
        with self._db.transaction(durable=True) as tx:
            gone = tx.execute("DELETE FROM upstream_providers WHERE name = ?", (name,)) > 0
            if gone:
                tx.execute("DELETE FROM upstream_overrides WHERE provider = ?", (name,))
            return gone
