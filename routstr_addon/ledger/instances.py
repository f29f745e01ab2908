"""Which proxy process serves which reservation: a registry with heartbeats, and the
reservations nobody will close (their process is gone, or they stopped moving)."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routstr_addon.ledger.db import Database

__all__ = ["Instances"]

_ORPHAN_COLUMNS = ("request_id", "key_hash", "amount_msat", "model", "owner", "delivered",
                   "prompt_tokens", "touched_at")


class Instances:
    """This process's entry in the registry (``instance_id``), and everyone's."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self.instance_id: str | None = None

    def register(self) -> str:
        """Record this process; its reservations carry its id from now on."""
        now = time.time()
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{int(now * 1000)}"
        with self._db.transaction() as tx:
            tx.execute("INSERT INTO instances (id, host, pid, started_at, seen_at) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (self.instance_id, socket.gethostname(), os.getpid(), now, now))
        return self.instance_id

    def heartbeat(self) -> bool:
        """Stamp this process as alive; False if it is not (or no longer) registered."""
        if self.instance_id is None:
            return False
        with self._db.transaction() as tx:
            return tx.execute("UPDATE instances SET seen_at = ? WHERE id = ?",
                              (time.time(), self.instance_id)) > 0

    def probe(self) -> None:
        """A write that shows the database takes one (``/ready``): the heartbeat, or this
        process registered again if another forgot it. Raises what the database raises."""
        if not self.heartbeat():
            self.register()

    def unregister(self) -> None:
        if self.instance_id is None:
            return
        with self._db.transaction() as tx:
            tx.execute("DELETE FROM instances WHERE id = ?", (self.instance_id,))
        self.instance_id = None

    def alive_and_gone(self, stale_after: float) -> tuple[set[str], set[str]]:
        """Registered processes, as (alive, gone): gone is on this host with a dead pid, or
        silent for longer than ``stale_after`` seconds."""
        host = socket.gethostname()
        now = time.time()
        alive: set[str] = set()
        gone: set[str] = set()
        for instance_id, its_host, pid, seen_at in self._db.reader().rows(
                "SELECT id, host, pid, seen_at FROM instances"):
            dead = (its_host == host and not _pid_alive(int(pid))) or seen_at < now - stale_after
            (gone if dead and instance_id != self.instance_id else alive).add(instance_id)
        return alive, gone

    def forget(self, ids: set[str]) -> None:
        with self._db.transaction() as tx:
            for instance_id in ids:
                tx.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    def orphans(self, timeout: float, stale_after: float) -> list[dict[str, Any]]:
        """Reservations nobody will close: their process is gone, or they saw no activity for
        ``timeout`` seconds (a stream that flows is touched; one that hangs is not)."""
        alive, _ = self.alive_and_gone(stale_after)
        now = time.time()
        found = []
        for row in self._db.reader().rows(
                "SELECT request_id, key_hash, amount_msat, model, owner, delivered, "
                "prompt_tokens, touched_at FROM reservations"):
            held = dict(zip(_ORPHAN_COLUMNS, row, strict=True))
            idle = now - held["touched_at"]
            owner_gone = held["owner"] not in alive if held["owner"] else idle > stale_after
            if owner_gone or idle > timeout:
                found.append(held)
        return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
