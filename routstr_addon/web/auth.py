"""The /admin dashboard's guard: the password check, sessions, CSRF tokens, login rate limits.

Sessions here live in one process's memory (the proxy keeps them in the ledger instead, shared
by its processes: ``adminshared``, same interface): a random id in an HttpOnly cookie, kept only as
its SHA-256, with an absolute expiry. Each session carries a CSRF token that every form posts
back; both are compared in constant time. A session is bound to the password it was opened
with: change ``ADMIN_PASSWORD`` (or empty it) and every open session ends. Nothing here logs
a password, a session id or a token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["LoginLimiter", "Session", "Sessions", "password_matches", "password_tag"]

SESSION_LIFETIME = 12 * 3600.0
MAX_SESSIONS = 200  # the oldest is dropped beyond this


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def password_matches(given: str, expected: str) -> bool:
    """Whether ``given`` is the password, in time independent of where they differ (and of
    their lengths: the SHA-256 digests are compared). An empty password never matches."""
    if not expected:
        return False
    return hmac.compare_digest(_digest(given), _digest(expected))


def password_tag(password: str) -> bytes:
    """What a session remembers of the password it was opened with (a keyed digest, so the
    password is not kept in a second place in a recognisable form)."""
    return hmac.new(b"routstr admin session", password.encode(), hashlib.sha256).digest()


@dataclass(slots=True)
class Session:
    csrf: str
    created_at: float
    expires_at: float
    tag: bytes = field(repr=False)
    flash: list[tuple[str, str]] = field(default_factory=list)  # (level, text), shown once
    key: str = field(default="", repr=False)  # where a shared store keeps it (adminshared)

    def csrf_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(_digest(given or ""), _digest(self.csrf))


class Sessions:
    """Open sessions by the SHA-256 of their id."""

    def __init__(self, lifetime: float = SESSION_LIFETIME, limit: int = MAX_SESSIONS) -> None:
        self.lifetime = lifetime
        self.limit = limit
        self._open: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._open)

    def create(self, tag: bytes, now: float | None = None) -> tuple[str, Session]:
        """A new session; returns its id (for the cookie, never stored) and the session."""
        now = time.time() if now is None else now
        self._expire(now)
        while len(self._open) >= self.limit:
            del self._open[next(iter(self._open))]  # dicts keep insertion order: the oldest
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now, now + self.lifetime, tag)
        self._open[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, tag: bytes,
            now: float | None = None) -> Session | None:
        """The open session of this id, if it has not expired and was opened with the current
        password."""
        if not session_id or len(session_id) > 200:
            return None
        now = time.time() if now is None else now
        key = _digest(session_id)
        session = self._open.get(key)
        if session is None:
            return None
        if session.expires_at <= now or not hmac.compare_digest(session.tag, tag):
            del self._open[key]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._open.pop(_digest(session_id), None)

    def save_flash(self, session: Session) -> None:
        """Kept in memory, the session object is the stored one: nothing to write."""

    def clear(self) -> None:
        self._open.clear()

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._open.items() if s.expires_at <= now]:
            del self._open[key]


class LoginLimiter:
    """At most ``attempts`` failed logins per client address in any ``window`` seconds."""

    def __init__(self, attempts: int = 5, window: float = 60.0,
                 max_addresses: int = 10_000) -> None:
        self.attempts = attempts
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float | None = None) -> int:
        """0 if this address may try now, else the whole seconds until it may."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(address)
        if failures is None:
            return 0
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return 0
        if len(failures) < self.attempts:
            return 0
        return max(1, int(failures[0] + self.window - now + 0.999))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if address not in self._failures and len(self._failures) >= self.max_addresses:
            self._prune(now)
            if len(self._failures) >= self.max_addresses:  # still full: forget the oldest
                del self._failures[next(iter(self._failures))]
        self._failures.setdefault(address, deque(maxlen=self.attempts)).append(now)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _prune(self, now: float) -> None:
        for address in [a for a, f in self._failures.items()
                        if not f or f[-1] <= now - self.window]:
            del self._failures[address]
