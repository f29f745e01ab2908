"""Fallback load generator when wrk is missing: one worker process, N keep-alive connections.

``python -m bench.pyload --port P --request-file F --connections N --start-at T --warmup W
--duration D`` sends the request in F back to back on every connection from wall-clock time T,
counts the answers completed in [T+W, T+W+D] and prints one JSON object: their latencies (µs),
statuses and socket errors. Several workers started with the same T add up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

from .client import Connection

__all__ = ["main"]


async def _work(port: int, raw: bytes, connections: int, start_at: float, warmup: float,
                duration: float) -> dict[str, Any]:
    # Wall-clock start shared by all workers, mapped onto this process's perf counter.
    start = time.perf_counter() + (start_at - time.time())
    measure_from, end = start + warmup, start + warmup + duration
    latencies: list[int] = []
    statuses: Counter[int] = Counter()
    errors = 0

    async def loop() -> None:
        nonlocal errors
        conn = Connection("127.0.0.1", port)
        try:
            while (t0 := time.perf_counter()) < end:
                try:
                    resp = await conn.request(raw)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ValueError):
                    t1 = time.perf_counter()
                    if measure_from <= t1 <= end:
                        errors += 1
                    await asyncio.sleep(0.001)
                    continue
                t1 = time.perf_counter()
                if measure_from <= t1 <= end:
                    latencies.append(round((t1 - t0) * 1e6))
                    statuses[resp.status] += 1
        finally:
            await conn.close()

    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    await asyncio.gather(*(loop() for _ in range(connections)))
    return {"latencies_us": latencies, "statuses": {str(k): v for k, v in statuses.items()},
            "socket_errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--request-file", required=True)
    parser.add_argument("--connections", type=int, default=5)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    with open(args.request_file, "rb") as f:
        raw = f.read()
    start_at = args.start_at or time.time()
    out = asyncio.run(_work(args.port, raw, args.connections, start_at, args.warmup,
                            args.duration))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
