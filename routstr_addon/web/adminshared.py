"""The dashboard's sessions and login limiter kept in the ledger, for several processes on one
database (the in-memory ones in ``auth`` have the same interface and serve the unit tests).

A session is found by the SHA-256 of its id and carries the keyed digest of the password it
was opened with: change ``ADMIN_PASSWORD`` and no process accepts it any more (it is deleted
when next seen). Logout deletes it for every process.
"""

from __future__ import annotations

import hmac
import secrets
import time

from routstr_addon.ledger.adminstore import AdminStore, StoredSession
from routstr_addon.web.auth import MAX_SESSIONS, SESSION_LIFETIME, Session, _digest

__all__ = ["SharedLoginLimiter", "SharedSessions"]


class SharedSessions:
    def __init__(self, store: AdminStore, lifetime: float = SESSION_LIFETIME,
                 limit: int = MAX_SESSIONS) -> None:
        self.store = store
        self.lifetime = lifetime
        self.limit = limit

    def __len__(self) -> int:
        return self.store.count_sessions(time.time())

    def create(self, tag: bytes, now: float | None = None) -> tuple[str, Session]:
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now, now + self.lifetime, tag)
        session.key = _digest(session_id).hex()
        self.store.open_session(StoredSession(session.key, session.csrf, tag.hex(), now,
                                              session.expires_at, []), now, self.limit)
        return session_id, session

    def get(self, session_id: str | None, tag: bytes,
            now: float | None = None) -> Session | None:
        if not session_id or len(session_id) > 200:
            return None
        now = time.time() if now is None else now
        key = _digest(session_id).hex()
        found = self.store.session(key)
        if found is None:
            return None
        if found.expires_at <= now or not hmac.compare_digest(found.tag, tag.hex()):
            self.store.close_session(key)
            return None
        session = Session(found.csrf, found.created_at, found.expires_at, tag, found.flash)
        session.key = key
        return session

    def save_flash(self, session: Session) -> None:
        if session.key:
            self.store.set_flash(session.key, session.flash)

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self.store.close_session(_digest(session_id).hex())

    def clear(self) -> None:
        self.store.close_all_sessions()


class SharedLoginLimiter:
    """At most ``attempts`` failed logins per client address in any ``window`` seconds, counted
    over every process (wall-clock times, as processes share no monotonic clock)."""

    def __init__(self, store: AdminStore, attempts: int = 5, window: float = 60.0) -> None:
        self.store = store
        self.attempts = attempts
        self.window = window

    def retry_after(self, address: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        failures = self.store.failures(address, now - self.window)
        if len(failures) < self.attempts:
            return 0
        oldest = failures[-self.attempts]  # the window frees up when this one ages out
        return max(1, int(oldest + self.window - now + 0.999))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.store.add_failure(address, now, now - self.window)

    def succeeded(self, address: str) -> None:
        self.store.clear_failures(address)
