"""Failover before the first byte: an HTTP hop inside the proxy's own event loop.

mitmproxy cannot send one flow to a second server once the first failed (a response set in its
``error`` hook is ignored, ``replay`` refuses live flows), and a request hook that calls the
providers itself loses streaming. So a request whose model more than one provider offers goes
to this hop on loopback, with a plan: the providers in order, each with its URL, headers and
body. The hop tries them in turn with a streaming client and passes the first acceptable
answer through as it arrives; mitmproxy sees one ordinary upstream, and its stream hook (the
meter) works unchanged.

An attempt is abandoned, and the next provider tried, when it refuses the connection, sends
no headers within ``connect_timeout`` (the last provider gets ``answer_timeout``), or answers
429 or 5xx. Once the hop passed the first byte of an answer on, the answer is that provider's
whatever happens next. A model with one provider never comes here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import h11
import httpx

from routstr_addon.errors import error_body
from routstr_addon.upstreams.health import Health

__all__ = ["ATTEMPTS_HEADER", "PLAN_HEADER", "PROVIDER_HEADER", "Attempt", "Failover"]

logger = logging.getLogger("routstr")

PLAN_HEADER = "x-routstr-plan"
PROVIDER_HEADER = "x-routstr-provider"
ATTEMPTS_HEADER = "x-routstr-attempts"
# Not passed on in either direction: hop-by-hop fields, and what the hop sets itself.
_SKIP = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
                   b"upgrade", b"proxy-connection", b"host", b"content-length",
                   PLAN_HEADER.encode(), PROVIDER_HEADER.encode(), ATTEMPTS_HEADER.encode()))


_PRUNE_AT = 10_000  # armed plans before the stale ones are looked for
_PLAN_LIFETIME = 600.0  # seconds: a flow takes well under this to reach the hop


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider's version of the request."""

    provider: str
    url: str
    headers: tuple[tuple[str, str], ...]  # its key and its own headers
    body: bytes


@dataclass(slots=True)
class Plan:
    attempts: tuple[Attempt, ...]
    armed: float = field(default_factory=time.monotonic)


class Failover:
    """The hop: ``arm`` a plan for a request, send the request to ``port`` with its id."""

    def __init__(self, health: Health, connect_timeout: float, answer_timeout: float) -> None:
        self.health = health
        self.connect_timeout = connect_timeout
        self.answer_timeout = answer_timeout or None  # 0: no limit
        self.plans: dict[str, Plan] = {}
        self.port = 0  # 0: not listening (yet); requests then go to their first provider
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=self.connect_timeout, read=None, write=60.0,
                                  pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            follow_redirects=False, trust_env=False)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("routstr: failover between providers armed (loopback port %d)", self.port)

    async def stop(self) -> None:
        self.port = 0
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def arm(self, request_id: str, attempts: tuple[Attempt, ...]) -> None:
        plans = self.plans
        if len(plans) >= _PRUNE_AT:  # plans of flows that never reached the hop
            stale = time.monotonic() - _PLAN_LIFETIME
            for key in [k for k, p in plans.items() if p.armed < stale]:
                del plans[key]
        plans[request_id] = Plan(attempts)

    def disarm(self, request_id: str) -> None:
        self.plans.pop(request_id, None)

    # -- the hop's HTTP/1.1 server (mitmproxy is its only client) ----------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                while not isinstance(body_event := await _next(conn, reader),
                                     h11.EndOfMessage):
                    if not isinstance(body_event, h11.Data):
                        return
                await self._answer(conn, writer, event)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        except Exception:
            logger.exception("failover hop: unexpected error")
        finally:
            writer.close()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                      request: h11.Request) -> None:
        plan_id = next((v.decode() for k, v in request.headers if k == PLAN_HEADER.encode()), "")
        plan = self.plans.pop(plan_id, None)
        if plan is None:
            await _send_error(conn, writer, 502, "The request lost its route to the provider.")
            return
        client = self._client
        assert client is not None
        passed = [(k, v) for k, v in request.headers if k not in _SKIP]
        method = request.method.decode()
        tried: list[str] = []
        for number, attempt in enumerate(plan.attempts, 1):
            last = number == len(plan.attempts)
            started = time.monotonic()
            req = client.build_request(
                method, attempt.url, content=attempt.body,
                headers=[*passed, *((k.encode(), v.encode()) for k, v in attempt.headers)])
            try:
                resp = await asyncio.wait_for(
                    client.send(req, stream=True),
                    self.answer_timeout if last else self.connect_timeout)
            except (httpx.HTTPError, TimeoutError, OSError) as e:
                reason = _reason(e)
                self.health.failure(attempt.provider, reason,
                                    refused=isinstance(e, httpx.ConnectError))
                logger.warning("request %s: provider %s failed before answering (%s)%s",
                               plan_id, attempt.provider, reason,
                               "" if last else "; trying the next")
                tried.append(attempt.provider)
                continue
            status = resp.status_code
            if status == 429 or status >= 500:
                self.health.failure(attempt.provider, f"HTTP {status}")
                if not last:
                    await resp.aclose()
                    logger.warning("request %s: provider %s answered %d; trying the next",
                                   plan_id, attempt.provider, status)
                    tried.append(attempt.provider)
                    continue
            else:
                self.health.success(attempt.provider, time.monotonic() - started)
            tried.append(attempt.provider)
            await _relay(conn, writer, resp, attempt.provider, len(tried))
            return
        await _send_error(conn, writer, 502, "No provider of this model could be reached "
                          f"({', '.join(tried)}); nothing was charged.")


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def _relay(conn: h11.Connection, writer: asyncio.StreamWriter, resp: httpx.Response,
                 provider: str, attempts: int) -> None:
    """Pass one provider's answer on as it arrives. Cut short upstream: cut short here."""
    headers = [(k, v) for k, v in resp.headers.raw if k.lower() not in _SKIP or
               k.lower() == b"content-length"]
    headers += [(PROVIDER_HEADER.encode(), provider.encode()),
                (ATTEMPTS_HEADER.encode(), b"%d" % attempts)]
    try:
        writer.write(conn.send(h11.Response(status_code=resp.status_code, headers=headers,
                                            reason=resp.reason_phrase.encode() or b"")) or b"")
        async for chunk in resp.aiter_raw():
            if chunk:
                writer.write(conn.send(h11.Data(data=chunk)) or b"")
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
    except (httpx.HTTPError, h11.LocalProtocolError) as e:
        logger.warning("provider %s: answer cut short (%s)", provider, _reason(e))
        conn.send_failed()
    finally:
        await resp.aclose()


async def _send_error(conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                      message: str) -> None:
    body = error_body(message, "upstream_error", "upstream_unreachable")
    writer.write(conn.send(h11.Response(status_code=status, headers=[
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]))
        or b"")
    writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return f"{type(e).__name__}: {e}"[:200] if str(e) else type(e).__name__
