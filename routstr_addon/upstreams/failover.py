"""Failover before the first byte: an HTTP hop inside the proxy's own event loop.

mitmproxy cannot send one flow to a second server once the first failed (a response set in its
``error`` hook is ignored, ``replay`` refuses live flows), and a request hook that calls the
providers itself loses streaming. So a request whose model more than one provider offers goes
to this hop on loopback, with a plan: the providers in order, each with its URL, headers and
body. The hop tries them in turn with its own keep-alive HTTP/1.1 client (h11, as mitmproxy itself
speaks it: a general client such as httpx cost ~1 ms of CPU more per request here) and passes
the first acceptable
answer through as it arrives; mitmproxy sees one ordinary upstream, and its stream hook (the
meter) works unchanged.

An attempt is abandoned, and the next provider tried, when it refuses the connection, sends
no headers within ``connect_timeout`` (the last provider gets ``answer_timeout``), or answers
429 or 5xx. Once the hop passed the first byte of an answer on, the answer is that provider's
whatever happens next. A model with one provider never comes here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

from routstr_addon.errors import error_body
from routstr_addon.upstreams.health import Health
from routstr_addon.upstreams.nodes import NodePayer, Returned, Scrubber, Ticket

__all__ = ["ATTEMPTS_HEADER", "PLAN_HEADER", "PROVIDER_HEADER", "Attempt", "Failover"]

logger = logging.getLogger("routstr")

PLAN_HEADER = "x-routstr-plan"
PROVIDER_HEADER = "x-routstr-provider"
ATTEMPTS_HEADER = "x-routstr-attempts"
_PLAN, _PROVIDER, _ATTEMPTS = (h.encode() for h in (PLAN_HEADER, PROVIDER_HEADER,
                                                     ATTEMPTS_HEADER))
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
    scheme: str
    host: str
    port: int
    target: str  # path and query on that provider
    headers: tuple[tuple[str, str], ...]  # its key and its own headers
    body: bytes
    # A Routstr node: the model's sats_pricing there (the attempt is paid with X-Cashu).
    node: Mapping[str, Any] | None = field(default=None, compare=False)
    limit_msat: int = 0  # the most a node may ask for it (its 402): the user's reservation
    base: str = ""  # a node's API base URL (…/v1): where its stored change is asked for


@dataclass(slots=True)
class Plan:
    attempts: tuple[Attempt, ...]
    armed: float = field(default_factory=time.monotonic)


class Failover:
    """The hop: ``arm`` a plan for a request, send the request to ``port`` with its id."""

    def __init__(self, health: Health, connect_timeout: float, answer_timeout: float,
                 tor_proxy: str = "") -> None:
        self.health = health
        self.connect_timeout = connect_timeout
        self.answer_timeout = answer_timeout or None  # 0: no limit
        self.plans: dict[str, Plan] = {}
        self.port = 0  # 0: not listening (yet); requests then go to their first provider
        self.pool = Pool(tor_proxy)
        self.payer: NodePayer | None = None  # pays Routstr nodes (set with a wallet)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("routstr: failover between providers armed (loopback port %d)", self.port)

    async def stop(self) -> None:
        self.port = 0
        if self._server is not None:
            self._server.close()
            self._server = None
        self.pool.close()

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
        except asyncio.CancelledError:  # shutting down: asyncio would report it as an error
            pass
        except Exception:
            logger.exception("failover hop: unexpected error")
        finally:
            writer.close()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                      request: h11.Request) -> None:
        plan_id = next((v.decode() for k, v in request.headers if k == _PLAN), "")
        plan = self.plans.pop(plan_id, None)
        if plan is None:
            await _send_error(conn, writer, 502, "The request lost its route to the provider.")
            return
        passed = [(k, v) for k, v in request.headers if k not in _SKIP]
        tried: list[str] = []
        for number, attempt in enumerate(plan.attempts, 1):
            tried.append(attempt.provider)
            got = await self._attempt(plan_id, attempt, request.method, passed,
                                      number == len(plan.attempts))
            if got is None:
                continue
            upstream, ticket = got
            if ticket is None:
                await upstream.relay(conn, writer, attempt.provider, len(tried), self.pool)
                return
            returned = Returned()
            await upstream.relay(conn, writer, attempt.provider, len(tried), self.pool,
                                 returned)
            assert self.payer is not None
            self.payer.later(self.payer.settle(ticket, returned))
            return
        await _send_error(conn, writer, 502, "No provider of this model could be reached "
                          f"({', '.join(tried)}); nothing was charged.")

    async def _attempt(self, plan_id: str, attempt: Attempt, method: bytes,
                       passed: list[tuple[bytes, bytes]], last: bool
                       ) -> tuple[Upstream, Ticket | None] | None:
        """Send one provider its version of the request: its answer to pass on, or None to
        try the next. A node is paid first; its 402 (asking more than was sent, within what
        the user's reservation covers) is honoured once with a new token."""
        amount_msat: int | None = None
        for payment in (1, 2):
            ticket: Ticket | None = None
            headers = passed
            if attempt.node is not None:
                ticket = await self._pay(plan_id, attempt, amount_msat)
                if ticket is None:
                    return None
                headers = [*passed, (b"x-cashu", ticket.token.encode())]
            started = time.monotonic()
            try:
                upstream = await asyncio.wait_for(
                    self.pool.request(attempt, method, headers, self.connect_timeout),
                    self.answer_timeout if last else self.connect_timeout)
            except (TimeoutError, OSError, h11.ProtocolError, ConnectionError) as e:
                reason = _reason(e)
                self.health.failure(attempt.provider, reason, refused=isinstance(e, _Refused))
                logger.warning("request %s: provider %s failed before answering (%s)%s",
                               plan_id, attempt.provider, reason,
                               "" if last else "; trying the next")
                self._take_back(ticket, reason)
                return None
            status = upstream.response.status_code
            if ticket is not None and (status == 402 or status == 429 or status >= 500):
                required = await self._node_refused(ticket, upstream, status)
                if (status == 402 and payment == 1 and required is not None
                        and ticket.sent_msat < required <= attempt.limit_msat):
                    logger.info("request %s: node %s asks %d msat; paying it once",
                                plan_id, attempt.provider, required)
                    amount_msat = required
                    continue
                self.health.failure(attempt.provider, f"HTTP {status}")
                logger.warning("request %s: node %s answered %d; trying the next", plan_id,
                               attempt.provider, status)
                return None
            if status == 429 or status >= 500:
                self.health.failure(attempt.provider, f"HTTP {status}")
                if not last:
                    upstream.close()
                    logger.warning("request %s: provider %s answered %d; trying the next",
                                   plan_id, attempt.provider, status)
                    return None
            else:
                self.health.success(attempt.provider, time.monotonic() - started)
            return upstream, ticket
        return None

    async def _node_refused(self, ticket: Ticket, upstream: Upstream,
                            status: int) -> int | None:
        """A node's refusal: its change (if it took the token) is received, else the token
        taken back; returns what a 402 says is required (msat), if it says."""
        returned = Returned()
        for k, v in upstream.response.headers:
            returned.header(k, v)
        try:
            body = await asyncio.wait_for(upstream.read_body(), self.connect_timeout)
        except (TimeoutError, OSError, h11.ProtocolError, ConnectionError):
            body = b""
        scrub = Scrubber(returned, sse=False)
        scrub.feed(body)
        scrub.finish()
        upstream.close()
        assert self.payer is not None
        if returned.changes:
            self.payer.later(self.payer.settle(ticket, returned))
        else:
            self._take_back(ticket, f"HTTP {status}")
        return required_msat(body) if status == 402 else None

    async def _pay(self, plan_id: str, attempt: Attempt,
                   amount_msat: int | None = None) -> Ticket | None:
        """A token for a node, or None (logged) when the wallet cannot pay it."""
        payer = self.payer
        if payer is None or attempt.node is None:
            logger.warning("request %s: node %s skipped: no wallet to pay it", plan_id,
                           attempt.provider)
            return None
        try:
            return await payer.pay(plan_id, attempt.provider, attempt.base, attempt.node,
                                   amount_msat)
        except Exception as e:
            logger.warning("request %s: node %s skipped: cannot pay it (%s)", plan_id,
                           attempt.provider, _reason(e))
            return None

    def _take_back(self, ticket: Ticket | None, why: str) -> None:
        if ticket is not None and self.payer is not None:
            self.payer.later(self.payer.take_back(ticket, why))


class _Refused(ConnectionError):
    """The provider could not be connected to at all."""


@dataclass(slots=True)
class Upstream:
    """A provider's answer whose headers have arrived, on a pooled connection."""

    key: tuple[str, str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection
    response: h11.Response

    def close(self) -> None:
        self.writer.close()

    async def read_body(self, limit: int = 1 << 16) -> bytes:
        """A short answer's whole body (a node's error), up to ``limit`` bytes."""
        body = b""
        while len(body) <= limit:
            event = await _next(self.conn, self.reader)
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise ConnectionError("closed before the end of the answer")
        return body

    async def relay(self, conn: h11.Connection, writer: asyncio.StreamWriter, provider: str,
                    attempts: int, pool: Pool, returned: Returned | None = None) -> None:
        """Pass the answer on as it arrives. Cut short upstream: cut short here.
        ``returned``: a Routstr node's answer, whose change and cost are taken out into it."""
        resp = self.response
        headers = [(k, v) for k, v in resp.headers if k not in _SKIP or k == b"content-length"]
        scrub = None
        if returned is not None:
            for k, v in headers:
                returned.header(k, v)
            sse = any(k == b"content-type" and b"text/event-stream" in v for k, v in headers)
            headers = [(k, v) for k, v in headers if k != b"x-cashu"
                       and not k.startswith(b"x-routstr-") and k != b"content-length"]
            scrub = Scrubber(returned, sse)
        headers += [(_PROVIDER, provider.encode()), (_ATTEMPTS, b"%d" % attempts)]
        try:
            writer.write(conn.send(h11.Response(status_code=resp.status_code, headers=headers,
                                                reason=resp.reason)) or b"")
            while True:
                event = await _next(self.conn, self.reader)
                if isinstance(event, h11.Data):
                    data = event.data if scrub is None else scrub.feed(event.data)
                    if data:
                        writer.write(conn.send(h11.Data(data=data)) or b"")
                        await writer.drain()
                elif isinstance(event, h11.EndOfMessage):
                    if scrub is not None:
                        assert returned is not None
                        returned.complete = True
                        tail = scrub.finish()
                        if tail:
                            writer.write(conn.send(h11.Data(data=tail)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    pool.release(self)
                    return
                else:  # the provider closed before the end
                    raise ConnectionError("closed before the end of the answer")
        except (ConnectionError, OSError, h11.ProtocolError, asyncio.IncompleteReadError) as e:
            logger.warning("provider %s: answer cut short (%s)", provider, _reason(e))
            conn.send_failed()
            self.close()
        except BaseException:
            self.close()
            raise


class Pool:
    """Keep-alive HTTP/1.1 connections to the providers, per origin."""

    MAX_IDLE = 64  # per origin

    def __init__(self, tor_proxy: str = "") -> None:
        """``tor_proxy``: the SOCKS5 proxy (TOR_PROXY_URL) ``.onion`` providers are reached
        through; empty: they cannot be."""
        self.idle: dict[tuple[str, str, int], list[tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]]] = {}
        self._tls: ssl.SSLContext | None = None
        parts = urlsplit(tor_proxy) if tor_proxy else None
        self.tor = (parts.hostname or "", parts.port or 9050) if parts else None

    async def request(self, attempt: Attempt, method: bytes, passed: list[tuple[bytes, bytes]],
                      connect_timeout: float) -> Upstream:
        """Send one attempt and wait for its answer's headers. A kept-alive connection the
        provider had closed meanwhile is retried once on a new one (not the provider's
        fault)."""
        key = (attempt.scheme, attempt.host, attempt.port)
        host = attempt.host if attempt.port in (80, 443) else f"{attempt.host}:{attempt.port}"
        headers = [(b"host", host.encode()), *passed,
                   *((k.encode(), v.encode()) for k, v in attempt.headers),
                   (b"content-length", b"%d" % len(attempt.body))]
        message = h11.Request(method=method, target=attempt.target, headers=headers)
        while True:
            reused, reader, writer = await self._connection(key, connect_timeout)
            conn = h11.Connection(h11.CLIENT)
            try:
                writer.write((conn.send(message) or b"") + (conn.send(
                    h11.Data(data=attempt.body)) or b"") + (conn.send(h11.EndOfMessage()) or b""))
                while True:
                    event = await _next(conn, reader)
                    if isinstance(event, h11.Response):
                        return Upstream(key, reader, writer, conn, event)
                    if not isinstance(event, h11.InformationalResponse):
                        raise ConnectionError("closed before answering")
            except (ConnectionError, OSError, h11.ProtocolError) as e:
                writer.close()
                if reused and not isinstance(e, h11.LocalProtocolError):
                    continue  # a stale kept-alive connection: once more, on a new one
                raise
            except BaseException:
                writer.close()
                raise

    async def _connection(self, key: tuple[str, str, int], connect_timeout: float) -> tuple[
            bool, asyncio.StreamReader, asyncio.StreamWriter]:
        idle = self.idle.get(key)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return True, reader, writer
            writer.close()
        scheme, host, port = key
        tls = None
        if scheme == "https":
            if self._tls is None:  # the CAs mitmproxy itself trusts for direct providers
                import certifi

                self._tls = ssl.create_default_context(cafile=certifi.where())
            tls = self._tls
        try:
            if host.endswith(".onion"):
                reader, writer = await asyncio.wait_for(
                    self._through_tor(host, port, tls), connect_timeout)
            else:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=tls,
                                            server_hostname=host if tls else None,
                                            limit=1 << 20), connect_timeout)
        except TimeoutError:
            raise
        except OSError as e:
            raise _Refused(f"cannot connect: {e.strerror or e}") from None
        return False, reader, writer

    async def _through_tor(self, host: str, port: int, tls: ssl.SSLContext | None) -> tuple[
            asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to an onion service through the SOCKS5 proxy (the name goes to the
        proxy, which resolves it: never resolved here)."""
        if self.tor is None:
            raise OSError("no TOR_PROXY_URL to reach .onion providers")
        reader, writer = await asyncio.open_connection(*self.tor, limit=1 << 20)
        try:
            writer.write(b"\x05\x01\x00")  # SOCKS5, one method: no authentication
            if await reader.readexactly(2) != b"\x05\x00":
                raise OSError("the SOCKS proxy wants authentication")
            name = host.encode("idna")
            writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name
                         + port.to_bytes(2, "big"))
            head = await reader.readexactly(4)
            if head[1] != 0:
                raise OSError(f"the SOCKS proxy could not connect (code {head[1]})")
            skip = {1: 4, 4: 16}.get(head[3])
            if skip is None:
                skip = (await reader.readexactly(1))[0]
            await reader.readexactly(skip + 2)
            if tls is not None:
                await writer.start_tls(tls, server_hostname=host)
        except (asyncio.IncompleteReadError, OSError) as e:
            writer.close()
            raise OSError(f"through Tor: {e}") from None
        return reader, writer

    def release(self, upstream: Upstream) -> None:
        conn = upstream.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            idle = self.idle.setdefault(upstream.key, [])
            if len(idle) < self.MAX_IDLE:
                idle.append((upstream.reader, upstream.writer))
                return
        upstream.close()

    def close(self) -> None:
        for idle in self.idle.values():
            for _, writer in idle:
                writer.close()
        self.idle = {}


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def _send_error(conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                      message: str) -> None:
    body = error_body(message, "upstream_error", "upstream_unreachable")
    writer.write(conn.send(h11.Response(status_code=status, headers=[
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]))
        or b"")
    writer.write(conn.send(h11.Data(data=body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def required_msat(body: bytes) -> int | None:
    """What a Routstr node's 402 asks for: ``detail.amount_required_msat`` (routstr-core's
    shape) or ``error.amount_required_msat``."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    for part in ("detail", "error"):
        inner = parsed.get(part)
        value = inner.get("amount_required_msat") if isinstance(inner, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return f"{type(e).__name__}: {e}"[:200] if str(e) else type(e).__name__
