"""Streaming chat completions: time to the first SSE event and to the end of the stream."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .client import (
    CHAT_PATH,
    Connection,
    build_request,
    chat_body,
    first_event_timer,
    percentile,
)

__all__ = ["StreamResult", "run_streams"]

COST_COMMENT = b": x-routstr-cost-msats"


@dataclass(slots=True)
class StreamResult:
    requests: int = 0
    warm_ok: int = 0  # good streams during the warm-up (not measured)
    ok: int = 0  # status 200 and the stream ended with data: [DONE]
    billed_comment: int = 0  # streams that carried the proxy's cost comment
    statuses: Counter[int] = field(default_factory=Counter)
    socket_errors: int = 0
    first_failure: str | None = None
    ttfb_us: list[float] = field(default_factory=list)
    total_us: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ttfb, total = sorted(self.ttfb_us), sorted(self.total_us)
        return {
            "requests": self.requests, "ok": self.ok, "failed": self.requests - self.ok,
            "warm_ok": self.warm_ok, "billed_comment": self.billed_comment,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "socket_errors": self.socket_errors, "first_failure": self.first_failure,
            "streams_per_s": self.requests / self.elapsed_s if self.elapsed_s else 0.0,
            "ttfb_p50_ms": percentile(ttfb, 50) / 1000, "ttfb_p99_ms": percentile(ttfb, 99) / 1000,
            "total_p50_ms": percentile(total, 50) / 1000,
            "total_p99_ms": percentile(total, 99) / 1000,
        }


async def _one(conn: Connection, raw: bytes, result: StreamResult, record: bool) -> None:
    first, on_data = first_event_timer()

    t0 = time.perf_counter()
    try:
        resp = await conn.request(raw, on_data)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
        if record:
            result.requests += 1
            result.socket_errors += 1
            result.first_failure = result.first_failure or f"{type(e).__name__}: {e}"
        return
    t1 = time.perf_counter()
    good = resp.status == 200 and b"data: [DONE]" in resp.body and bool(first)
    if not record:
        result.warm_ok += good
        return
    result.requests += 1
    result.statuses[resp.status] += 1
    if good:
        result.ok += 1
        result.ttfb_us.append((first[0] - t0) * 1e6)
        result.total_us.append((t1 - t0) * 1e6)
        if COST_COMMENT in resp.body:
            result.billed_comment += 1
    elif result.first_failure is None:
        result.first_failure = f"{resp.status}: {resp.body[:300]!r}"


async def _run(host: str, port: int, key: str | None, requests: int, concurrency: int,
               warmup: int) -> StreamResult:
    raw = build_request(host, port, CHAT_PATH, chat_body(stream=True), key)
    result = StreamResult()
    conns = [Connection(host, port) for _ in range(max(1, concurrency))]
    try:
        async def worker(conn: Connection, todo: list[int], record: bool) -> None:
            while todo:
                todo.pop()
                await _one(conn, raw, result, record)

        warm = list(range(warmup))
        await asyncio.gather(*(worker(c, warm, False) for c in conns))
        todo = list(range(requests))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, todo, True) for c in conns))
        result.elapsed_s = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()
    return result


def run_streams(host: str, port: int, key: str | None, requests: int = 300,
                concurrency: int = 4, warmup: int = 20) -> StreamResult:
    return asyncio.run(_run(host, port, key, requests, concurrency, warmup))
