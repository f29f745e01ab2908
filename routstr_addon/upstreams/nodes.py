"""Other Routstr nodes as providers, paid per request with ``X-Cashu`` from this proxy's wallet.

For each attempt at a node the failover hop asks ``NodePayer.pay`` for a token covering the
node's published maximum for a request (its ``sats_pricing.max_cost``), sends it with the
request, and hands back what the node returned: its change (the ``X-Cashu`` header, the
stream's ``: x-cashu`` comment, an error body's ``x_cashu``) and the cost it reported. The
change is received into the wallet; the cost to this proxy is what was sent less what came
back, journaled in ``node_payments`` beside the user's charge. A node that did not take the
request (refused, 402, 429, 5xx) has its token taken back: redeemed into the wallet again.
Change a node kept beyond the cost it reported is a loss against it, and a failure of its
health.

What a node returns never reaches the user: the hop strips its ``X-Cashu`` and
``x-routstr-*`` headers, its cost and change comments, and the change in its error bodies
(``Scrubber``); the user gets this proxy's own cost and change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

import httpx

from routstr_addon.ecash.mint import MintUnreachable
from routstr_addon.ecash.tokens import UNIT_MSAT, TokenError, parse_token
from routstr_addon.ecash.wallet import Wallet, WalletError
from routstr_addon.ledger import Ledger, Tx
from routstr_addon.upstreams.health import Health

__all__ = ["NodePayer", "Returned", "Scrubber", "Ticket", "node_loss", "published_cost",
           "token_amount"]

logger = logging.getLogger("routstr")

_MARGIN_SATS = 1  # over the node's published maximum: its own rounding to the sat
STALE_AFTER = 600.0  # seconds a token may stay in flight before it is looked after


@dataclass(slots=True)
class Ticket:
    """One token sent to a node with one attempt of a request."""

    row_id: int
    request_id: str
    provider: str
    base_url: str
    token: str
    mint: str
    unit: str
    sent_msat: int
    pricing: Mapping[str, Any] = field(default_factory=dict)  # its sats_pricing


def published_cost(sats_pricing: Mapping[str, Any], prompt: int, completion: int) -> int | None:
    """What a node's published prices say a usage costs (msat), generously rounded (its
    prices are published as floats): the most it may fairly keep for it."""
    try:
        sats = (prompt * Fraction(Decimal(str(sats_pricing.get("prompt") or 0)))
                + completion * Fraction(Decimal(str(sats_pricing.get("completion") or 0)))
                + Fraction(Decimal(str(sats_pricing.get("request") or 0))))
    except (ArithmeticError, ValueError):
        return None
    return math.ceil(sats * 1000 * Fraction(1001, 1000)) + 1


def token_amount(sats_pricing: Mapping[str, Any], ppk: int = 0) -> int:
    """Sats a token must carry to pay a node for any request of a model: its published
    maximum rounded up, a sat for its rounding, and the mint's input fee on that many proofs
    (as nodes add it to what they ask for)."""
    max_cost = float(sats_pricing.get("max_cost") or 0)
    if not math.isfinite(max_cost) or max_cost <= 0:
        raise ValueError("the node publishes no max_cost for this model")
    amount = math.ceil(max_cost) + _MARGIN_SATS
    if ppk:
        amount += -(-(ppk * max(1, amount.bit_length())) // 1000)
    return amount


def node_loss(sent_msat: int, change_msat: int, reported_msat: int | None,
              expected_msat: int | None = None) -> int:
    """What a node kept beyond its fair cost (msat, at least 0): the cost it reported, or what
    its published prices say the usage it reported costs (``expected_msat``), whichever is
    less. Its change comes in whole sats, so the cost is rounded up to the sat before
    comparing. Neither known and no change at all: everything sent is unaccounted for."""
    kept = sent_msat - change_msat
    fair = (reported_msat if expected_msat is None else expected_msat
            if reported_msat is None else min(reported_msat, expected_msat))
    if fair is None:
        return kept if change_msat == 0 else 0
    return max(0, kept - -(-fair // 1000) * 1000)


@dataclass(slots=True)
class Returned:
    """What a node handed back with its answer (change tokens, the cost it reported)."""

    changes: list[str] = field(default_factory=list)
    reported_msat: int | None = None
    complete: bool = False  # the answer arrived whole
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens the answer reported

    def read_usage(self, answer: Any) -> None:
        """Take the usage of a parsed answer or stream event, if it has one."""
        if not isinstance(answer, dict):
            return
        usage = answer.get("usage")
        if not isinstance(usage, dict) and isinstance(answer.get("response"), dict):
            usage = answer["response"].get("usage")
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
        if isinstance(prompt, int) and isinstance(completion, int):
            self.usage = (prompt, completion)

    def add_change(self, token: str) -> None:
        if token and token not in self.changes:  # a node may say it twice (header and body)
            self.changes.append(token)

    def header(self, name: bytes, value: bytes) -> None:
        if name == b"x-cashu" and value:
            self.add_change(value.decode("latin-1").strip())
        elif name == b"x-routstr-cost-msats" and value.strip().isdigit():
            self.reported_msat = int(value)


class Scrubber:
    """Takes a node's change and cost out of its answer's body as it passes.

    SSE: events are passed on whole; the ``: x-cashu …`` and ``: x-routstr-cost-msats …``
    comments are kept back and read. Anything else (JSON, errors): buffered and passed on at
    the end with ``x_cashu`` taken out of an error body.
    """

    def __init__(self, returned: Returned, sse: bool) -> None:
        self.returned = returned
        self.sse = sse
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        if not self.sse:
            return b""
        if b"\r" in self._pending:  # CRLF or CR line ends: LF, as SSE allows either
            self._pending = self._pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        cut = self._pending.rfind(b"\n\n")
        if cut < 0:
            return b""
        ready, self._pending = self._pending[:cut + 2], self._pending[cut + 2:]
        return b"".join(self._event(block) for block in ready.split(b"\n\n")[:-1])

    def _event(self, block: bytes) -> bytes:
        """One event passed on without the node's cost and change comment lines."""
        kept = []
        for line in block.split(b"\n"):
            if line.startswith(b": x-cashu "):
                self.returned.add_change(line[10:].decode("latin-1").strip())
            elif line.startswith(b": x-routstr-"):
                words = line.split()
                if len(words) > 2 and words[1] == b"x-routstr-cost-msats" \
                        and words[2].isdigit():
                    self.returned.reported_msat = int(words[2])
            else:
                if line.startswith(b"data: {") and b'"usage"' in line:
                    with contextlib.suppress(ValueError):
                        self.returned.read_usage(json.loads(line[6:]))
                kept.append(line)
        return b"\n".join(kept) + b"\n\n" if kept else b""

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        if self.sse:  # an unfinished last event: still without the node's comments
            return self._event(rest).removesuffix(b"\n\n") if rest.strip() else rest
        if not rest:
            return rest
        try:
            body = json.loads(rest)
        except ValueError:
            return rest
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            change = body["error"].pop("x_cashu", None)
            if isinstance(change, str) and change:
                self.returned.add_change(change)
                return json.dumps(body).encode()
        self.returned.read_usage(body)
        usage = body.get("usage") if isinstance(body, dict) else None
        cost = usage.get("cost") if isinstance(usage, dict) else None
        if self.returned.reported_msat is None and isinstance(cost, dict):
            total = cost.get("total_msats")
            if isinstance(total, int):
                self.returned.reported_msat = total
        return rest


class NodePayer:
    """Pays nodes from the wallet and takes their change back into it."""

    def __init__(self, ledger: Ledger, wallet: Wallet, health: Health,
                 node_info: Callable[[str], Mapping[str, Any] | None],
                 bases: Mapping[str, str] | None = None, timeout: float = 15.0,
                 tor_proxy_url: str = "") -> None:
        """``node_info``: a node's /v1/info by provider name (its mints), if known;
        ``bases``: each node's API base URL (…/v1), to ask it for change it kept."""
        self.ledger = ledger
        self.wallet = wallet
        self.health = health
        self.node_info = node_info
        self.bases = dict(bases or {})
        self.timeout = timeout
        self.tor_proxy_url = tor_proxy_url
        self._tasks: set[asyncio.Task[Any]] = set()

    def mint_for(self, provider: str) -> str:
        """The first of this proxy's mints the node takes (the primary if it does not say)."""
        info = self.node_info(provider) or {}
        theirs = info.get("mints")
        if isinstance(theirs, list) and theirs:
            wanted = {str(m).rstrip("/") for m in theirs}
            for url in self.wallet.mints:
                if url.rstrip("/") in wanted:
                    return url
            raise WalletError(f"node {provider} takes none of this proxy's mints")
        return self.wallet.primary.url

    async def pay(self, request_id: str, provider: str, base_url: str,
                  sats_pricing: Mapping[str, Any], amount_msat: int | None = None) -> Ticket:
        """A token for one attempt at a node, recorded as in flight: its published maximum,
        or ``amount_msat`` (what its 402 asked for)."""
        mint_url = self.mint_for(provider)
        mint = self.wallet.mints[mint_url]
        await mint.ensure_loaded()
        ppk = max((k.input_fee_ppk for k in mint.keysets.values()
                   if k.active and k.unit == "sat"), default=0)
        amount = (token_amount(sats_pricing, ppk) if amount_msat is None
                  else token_amount({"max_cost": amount_msat / 1000}, ppk))
        rows: list[int] = []

        def record(tx: Tx, token: str, fee: int) -> None:  # with the proofs marked sent
            rows.append(self.ledger.nodes.sent_in(tx, request_id, provider, mint_url, "sat",
                                                  token, (amount - fee) * UNIT_MSAT["sat"]))

        token, fee = await self.wallet.send(mint_url, "sat", amount, f"node:{request_id}",
                                            record)
        sent_msat = (amount - fee) * UNIT_MSAT["sat"]
        row_id = rows[0]
        return Ticket(row_id, request_id, provider, base_url, token, mint_url, "sat", sent_msat,
                      sats_pricing)

    def later(self, work: Any) -> None:
        """Run settling work in the background (the answer has gone on already)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for settling under way (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def settle(self, ticket: Ticket, returned: Returned) -> int:
        """The node answered: receive its change, journal the cost; returns the loss. An
        answer cut short (no cost reported) has its change asked for at the node, which
        keeps it for the token (``POST /v1/balance/refund`` with the same ``X-Cashu``)."""
        change_msat = 0
        for text in returned.changes:
            change_msat += await self._receive(ticket, text)
        if returned.reported_msat is None:
            change_msat += await self._stored_change(ticket, bool(returned.changes))
        expected = (published_cost(ticket.pricing, *returned.usage)
                    if returned.usage is not None else None)
        loss = node_loss(ticket.sent_msat, change_msat, returned.reported_msat, expected)
        state = "lost" if loss else "settled"
        with self.ledger.transaction() as tx:
            self.ledger.nodes.settle_in(tx, ticket.row_id, state, change_msat,
                                        returned.reported_msat, loss)
        if loss:
            logger.warning("node %s kept %d msat beyond the cost it reported for request %s",
                           ticket.provider, loss, ticket.request_id)
            self.health.failure(ticket.provider, f"kept {loss} msat of change")
        return loss

    async def take_back(self, ticket: Ticket, why: str) -> None:
        """The node did not serve the request: redeem its token into the wallet again (or,
        if the node spent it, ask it for its change). Nothing back: a loss against it."""
        try:
            got = await self._receive(ticket, ticket.token, own=True)
            if not got:
                got = await self._stored_change(ticket, False)
        except MintUnreachable as e:
            logger.warning("request %s: token sent to node %s not taken back yet (%s); it "
                           "stays in flight", ticket.request_id, ticket.provider, e)
            return
        with self.ledger.transaction() as tx:  # recovered: the cost is the mint's fee
            self.ledger.nodes.settle_in(tx, ticket.row_id, "recovered" if got else "lost", got,
                                        None, 0 if got else ticket.sent_msat)
        if not got:
            logger.warning("request %s: node %s (%s) spent the token and served nothing",
                           ticket.request_id, ticket.provider, why)
            self.health.failure(ticket.provider, "spent a token for a failed request")

    async def sweep(self, older_than: float = STALE_AFTER) -> int:
        """Tokens left in flight (the process stopped before their change came back): each
        taken back or its change asked for. Returns how many were looked after."""
        rows = self.ledger.nodes.in_flight(time.time() - older_than)
        for r in rows:
            ticket = Ticket(r.id, r.request_id, r.provider, self.bases.get(r.provider, ""),
                            r.token, r.mint, r.unit, r.sent_msat)
            await self.take_back(ticket, "left in flight")
        return len(rows)

    async def sweep_forever(self, every: float = 300.0) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # never let the sweeper die
                logger.exception("sweeping tokens in flight to nodes failed")
            await asyncio.sleep(every)

    async def _stored_change(self, ticket: Ticket, have_early: bool) -> int:
        """The change a node kept for a token (its answer was cut, or never read): received
        into the wallet; 0 if it has none. ``have_early``: a stream's first part of the
        change arrived already, so only the rest is taken."""
        if not ticket.base_url:
            return 0
        try:
            from routstr_addon.upstreams.catalog import client_for

            async with client_for(self.timeout, self.tor_proxy_url) as client:
                resp = await client.post(f"{ticket.base_url}/balance/refund",
                                         headers={"x-cashu": ticket.token})
            data = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as e:
            logger.info("request %s: node %s not asked for its change (%s)",
                        ticket.request_id, ticket.provider, e)
            return 0
        if not isinstance(data, dict):
            return 0
        text = data.get("rest") if have_early and data.get("early") else data.get("token")
        return await self._receive(ticket, text) if isinstance(text, str) and text else 0

    async def _receive(self, ticket: Ticket, text: str, own: bool = False) -> int:
        """Redeem a token from the node (or our own, unused) into the pool; its msat, or 0
        if it was bad or spent already."""
        try:
            token = parse_token(text)
            redeemed = await self.wallet.redeem(token)
        except (TokenError, WalletError) as e:
            if not own:
                logger.warning("request %s: change from node %s refused: %s",
                               ticket.request_id, ticket.provider, e)
            return 0
        with self.ledger.transaction(durable=True) as tx:
            self.wallet.store_in(tx, redeemed.mint, redeemed.unit, redeemed.proofs, "unspent")
        return redeemed.msat
