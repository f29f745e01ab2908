"""HTTP client for one Cashu mint (NUT-01/02/03/04/05/07/09), with a kept-alive connection.

nutshell's own client opens a new connection for every call; on the request path of a paid
request a swap is the one mint round trip we allow ourselves, so it should be just that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["SPENT_CODE", "MintBusy", "MintClient", "MintError", "MintUnreachable", "operation",
           "transient"]

logger = logging.getLogger(__name__)

SPENT_CODE = 11001  # "Token already spent"


class MintUnreachable(Exception):
    """The mint did not answer. ``sent`` says whether the request may have reached it."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class MintBusy(MintUnreachable):
    """The mint answered that it cannot serve now (rate-limited, its database locked, a
    timeout inside it): nothing was done, and the same call may work shortly."""

    def __init__(self, message: str) -> None:
        super().__init__(message, sent=False)


# What mints answer, with a 4xx, when the trouble is theirs and passing: nutshell turns any
# exception into a 400 with its text ("database is locked" from SQLite under load, "failed to
# acquire database locks" when its proofs_pending lock times out).
# Only markers that cannot mean the mint did something (a melt's "timeout" might have paid).
_TRANSIENT = ("database is locked", "database table is locked",
              "failed to acquire database lock", "rate limit",
              "too many requests", "try again", "temporarily", "deadlock detected",
              "could not serialize")


def transient(status: int, detail: str) -> bool:
    """Whether a mint's error answer is passing trouble of its own, not a verdict on the
    request (so the user's token is untouched and the call can be retried)."""
    if status in (408, 425, 429):
        return True
    text = detail.lower()
    return any(marker in text for marker in _TRANSIENT)


class MintError(Exception):
    """The mint answered with an error (a 4xx with ``detail`` and ``code``)."""

    def __init__(self, detail: str, code: int | None, status: int) -> None:
        super().__init__(f"{detail} (code {code})" if code is not None else detail)
        self.detail = detail
        self.code = code
        self.status = status


def operation(path: str) -> str:
    """A mint API path as a bounded name: ``/v1/swap`` → ``swap``, ``/v1/mint/quote/bolt11``
    → ``mint_quote``, ``/v1/melt/quote/bolt11/{id}`` → ``melt_quote_state``."""
    parts = [p for p in path.strip("/").split("/")[1:] if p != "bolt11"]
    if not parts:
        return "other"
    if parts[0] == "keys":
        return "keys"
    if len(parts) >= 3 and parts[1] == "quote":
        return f"{parts[0]}_quote_state"
    return "_".join(parts)[:32]


class MintClient:
    def __init__(self, url: str, timeout: float = 15.0,
                 mounts: dict[str, httpx.AsyncBaseTransport] | None = None) -> None:
        """``mounts``: transports for a mint a user named (``netguard``), not a trusted one."""
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            mounts=mounts, trust_env=mounts is None,
        )
        self.answered_at: float | None = None  # when the mint last answered (/ready reads it)
        # Told of every call (operation, outcome, seconds) when metrics are on.
        self.observe: Callable[[str, str, float], None] | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, json: Any = None) -> Any:
        observe = self.observe
        if observe is None:
            return await self._exchange(method, path, json)
        started = time.perf_counter()
        outcome = "unreachable"
        try:
            data = await self._exchange(method, path, json)
            outcome = "ok"
            return data
        except MintBusy:
            outcome = "busy"
            raise
        except MintError:
            outcome = "refused"
            raise
        finally:
            observe(operation(path), outcome, time.perf_counter() - started)

    async def _exchange(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = await self._client.request(method, path, json=json)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            raise MintUnreachable(f"cannot reach the mint {self.url}: {e!r}", sent=False) from e
        except httpx.TransportError as e:  # the request may have been processed
            raise MintUnreachable(f"no answer from the mint {self.url}: {e!r}", sent=True) from e
        if resp.status_code < 500:
            self.answered_at = time.time()
        if resp.status_code >= 500:  # whether it did anything is unknown
            raise MintUnreachable(f"the mint {self.url} answered {resp.status_code}", sent=True)
        try:
            data = resp.json()
        except ValueError:
            if resp.is_success:
                raise MintUnreachable(f"the mint {self.url} answered garbage", sent=True) from None
            text = resp.text[:200] or resp.reason_phrase
            if transient(resp.status_code, text):
                raise MintBusy(f"the mint {self.url} is busy: {text}") from None
            raise MintError(text, None, resp.status_code) from None
        if not resp.is_success:
            detail = data.get("detail", str(data)) if isinstance(data, dict) else str(data)
            code = data.get("code") if isinstance(data, dict) else None
            if transient(resp.status_code, str(detail)):
                raise MintBusy(f"the mint {self.url} is busy: {detail}")
            raise MintError(str(detail), code if isinstance(code, int) else None,
                            resp.status_code)
        return data

    async def info(self) -> dict[str, Any]:
        data: dict[str, Any] = await self._call("GET", "/v1/info")
        return data

    async def keysets(self) -> list[dict[str, Any]]:
        data = await self._call("GET", "/v1/keysets")
        keysets: list[dict[str, Any]] = data["keysets"]
        return keysets

    async def keys(self, keyset_id: str) -> dict[str, Any]:
        data = await self._call("GET", f"/v1/keys/{keyset_id}")
        keyset: dict[str, Any] = data["keysets"][0]
        return keyset

    async def swap(self, inputs: list[dict[str, Any]],
                   outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        data = await self._call("POST", "/v1/swap", {"inputs": inputs, "outputs": outputs})
        signatures: list[dict[str, Any]] = data["signatures"]
        return signatures

    async def check_state(self, ys: list[str]) -> list[dict[str, Any]]:
        data = await self._call("POST", "/v1/checkstate", {"Ys": ys})
        states: list[dict[str, Any]] = data["states"]
        return states

    async def restore(self, outputs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                    list[dict[str, Any]]]:
        data = await self._call("POST", "/v1/restore", {"outputs": outputs})
        return data["outputs"], data["signatures"]

    async def mint_quote(self, amount: int, unit: str) -> dict[str, Any]:
        data: dict[str, Any] = await self._call("POST", "/v1/mint/quote/bolt11",
                                                {"amount": amount, "unit": unit})
        return data

    async def mint_quote_state(self, quote: str) -> dict[str, Any]:
        data: dict[str, Any] = await self._call("GET", f"/v1/mint/quote/bolt11/{quote}")
        return data

    async def mint(self, quote: str, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        data = await self._call("POST", "/v1/mint/bolt11", {"quote": quote, "outputs": outputs})
        signatures: list[dict[str, Any]] = data["signatures"]
        return signatures

    async def melt_quote(self, request: str, unit: str) -> dict[str, Any]:
        data: dict[str, Any] = await self._call("POST", "/v1/melt/quote/bolt11",
                                                {"request": request, "unit": unit})
        return data

    async def melt_quote_state(self, quote: str) -> dict[str, Any]:
        data: dict[str, Any] = await self._call("GET", f"/v1/melt/quote/bolt11/{quote}")
        return data

    async def melt(self, quote: str, inputs: list[dict[str, Any]],
                   outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"quote": quote, "inputs": inputs}
        if outputs:
            body["outputs"] = outputs
        data: dict[str, Any] = await self._call("POST", "/v1/melt/bolt11", body)
        return data
