"""A streamed answer's one owner, from its first chunk to its cost.

``MeteredStream`` is fed the upstream's raw chunks and hands back at once what the client gets
(every complete event, less the usage chunk the proxy asked for on the client's behalf). While
the stream flows it records its progress in the ledger now and then, so a long stream is never
swept and a crash leaves what it delivered on record. When the stream ends it settles the
request through the meter (the one settle-or-retry path) and hands back the trailer: the cost,
and an x-cashu payer's change, as SSE comments that clients ignore.

The trailer goes **before** ``data: [DONE]``: OpenAI clients stop reading at ``[DONE]``, so the
tap holds that event back and the stream is settled as soon as it arrives (``_settle_at_done``).
The usage chunk a client asked for carries the cost too (``usage.cost``, ``cost_sats``),
worked out from that usage as the settlement will charge it (``_add_cost``).

Free of mitmproxy: the proxy's stream adapter turns mitmproxy's stream callable into ``feed``
and ``finish``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from routstr_addon.metering.costs import add_cost_to_usage
from routstr_addon.metering.meter import Meter, Paid
from routstr_addon.metering.usage import SSETap, Usage

__all__ = ["MeteredStream"]

logger = logging.getLogger(__name__)


class MeteredStream:
    __slots__ = ("_meter", "_next_touch", "_paid", "_tap", "_touch_every")

    def __init__(self, meter: Meter, paid: Paid) -> None:
        self._meter = meter
        self._paid = paid
        self._tap = paid.tap = SSETap(drop_usage_chunk=paid.drop_usage, hold_done=True,
                                      on_usage=self._add_cost)
        self._touch_every = meter.touch_every
        self._next_touch = 0.0

    def feed(self, chunk: bytes) -> bytes:
        """One raw chunk in; the bytes to send the client now (maybe none)."""
        out = self._tap.feed(chunk)
        if self._tap.held_done is not None:
            return out + self._settle_at_done()
        now = time.monotonic()
        if now >= self._next_touch:  # a flowing stream is not swept, and a crash now
            self._next_touch = now + self._touch_every  # leaves what it delivered on record
            if self._paid.first_byte_at is None:  # the first chunk always passes here
                self._paid.first_byte_at = time.time()
            try:
                self._meter.touch(self._paid)
            except Exception:
                logger.exception("request %s: recording stream activity failed",
                                 self._paid.request_id)
        return out

    def finish(self) -> bytes:
        """The stream ended: settle now, while the client still reads, and return the last
        bytes to send (what was left of the last event, or the trailer)."""
        rest = self._tap.flush()
        if self._tap.held_done is not None:
            return rest + self._settle_at_done()
        if self._paid.settled or self._paid.retrying:  # settled at [DONE] already
            return rest
        trailer = self._trailer()
        if rest:  # no comment after an unfinished event: it would join it
            return rest
        return trailer

    # -- the end of the answer: cost and change before [DONE] (kept apart for merges) --------

    def _settle_at_done(self) -> bytes:
        """``[DONE]`` arrived: settle, and send the trailer, then ``[DONE]`` itself."""
        done, self._tap.held_done = self._tap.held_done, None
        assert done is not None
        if self._paid.settled or self._paid.retrying:
            return done
        return self._trailer() + done

    def _trailer(self) -> bytes:
        paid = self._paid
        settled = self._meter.conclude(paid, self._meter.settle_stream)
        if settled is None:
            return b""
        tail = (b": x-routstr-cost-msats %d x-routstr-balance-msats %d\n\n"
                % (settled.charged_msat, settled.available_msat))
        if paid.change:
            tail += b": x-cashu " + paid.change.encode() + b"\n\n"
        return tail

    def _add_cost(self, usage: Usage, event_usage: dict[str, Any]) -> None:
        """The usage chunk the client gets: with what that usage costs."""
        try:
            add_cost_to_usage(event_usage, self._meter.report_usage(self._paid, usage))
        except Exception:  # no rate any more, say: the chunk goes as it came
            logger.exception("request %s: pricing the usage chunk failed",
                             self._paid.request_id)
