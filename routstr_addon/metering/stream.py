"""A streamed answer's one owner, from its first chunk to its cost.

``MeteredStream`` is fed the upstream's raw chunks and hands back at once what the client gets
(every complete event, less the usage chunk the proxy asked for on the client's behalf). While
the stream flows it records its progress in the ledger now and then, so a long stream is never
swept and a crash leaves what it delivered on record. When the stream ends it settles the
request through the meter (the one settle-or-retry path) and hands back the trailer: the cost,
and an x-cashu payer's change, as SSE comments that clients ignore.

Free of mitmproxy: the proxy's stream adapter turns mitmproxy's stream callable into ``feed``
and ``finish``.
"""

from __future__ import annotations

import logging
import time

from routstr_addon.metering.meter import Meter, Paid
from routstr_addon.metering.usage import SSETap

__all__ = ["MeteredStream"]

logger = logging.getLogger(__name__)


class MeteredStream:
    __slots__ = ("_meter", "_next_touch", "_paid", "_tap", "_touch_every")

    def __init__(self, meter: Meter, paid: Paid) -> None:
        self._meter = meter
        self._paid = paid
        self._tap = paid.tap = SSETap(drop_usage_chunk=paid.drop_usage)
        self._touch_every = meter.touch_every
        self._next_touch = 0.0

    def feed(self, chunk: bytes) -> bytes:
        """One raw chunk in; the bytes to send the client now (maybe none)."""
        out = self._tap.feed(chunk)
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
        paid = self._paid
        done = self._meter.conclude(paid, self._meter.settle_stream)
        if done is None or rest:  # no comment after an unfinished event: it would join it
            return rest
        tail = (b": x-routstr-cost-msats %d x-routstr-balance-msats %d\n\n"
                % (done.charged_msat, done.available_msat))
        if paid.change:
            tail += b": x-cashu " + paid.change.encode() + b"\n\n"
        return tail
