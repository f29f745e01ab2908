"""Many concurrent clients with mixed behaviour, for the load tests: random models, streams and
not, clients that leave mid-stream, upstream failures; every outcome recorded."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

MODELS = ["test/model", "test/embed"]


@dataclass
class Outcome:
    statuses: Counter[str] = field(default_factory=Counter)
    changes: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.statuses[what] += 1


async def one_request(client: httpx.AsyncClient, headers: dict[str, str], rng: random.Random,
                      outcome: Outcome) -> None:
    model = rng.choice(MODELS)
    fail = rng.random() < 0.05
    hdrs = {**headers, **({"x-scenario": "error-500"} if fail else {})}
    if model == "test/embed":
        resp = await client.post("/v1/embeddings", json={"model": model, "input": ["a b c"]},
                                 headers=hdrs)
        outcome.add(str(resp.status_code))
        _keep_change(resp.headers, outcome)
        return
    stream = rng.random() < 0.5
    body: dict[str, Any] = {"model": model, "stream": stream,
                            "messages": [{"role": "user", "content": "load " * rng.randint(1, 9)}]}
    if not stream:
        resp = await client.post("/v1/chat/completions", json=body, headers=hdrs)
        outcome.add(str(resp.status_code))
        _keep_change(resp.headers, outcome)
        return
    leave_early = rng.random() < 0.2
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=hdrs) as resp:
        if resp.status_code != 200:
            await resp.aread()
            outcome.add(str(resp.status_code))
            _keep_change(resp.headers, outcome)
            return
        async for line in resp.aiter_lines():
            if leave_early and line.startswith("data: {"):
                outcome.add("left")
                return  # closing the stream here: the client goes away mid-stream
            if line.startswith(": x-cashu "):
                outcome.changes.append(line.split()[2])
        outcome.add("200")


def _keep_change(headers: httpx.Headers, outcome: Outcome) -> None:
    if "x-cashu" in headers and headers["x-cashu"].startswith("cashu"):
        outcome.changes.append(headers["x-cashu"])


async def burst(base_url: str, per_request_headers: list[dict[str, str]],
                seed: int = 7) -> Outcome:
    """All the requests at once, one connection each."""
    rng = random.Random(seed)
    outcome = Outcome()
    limits = httpx.Limits(max_connections=len(per_request_headers) + 10,
                          max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        async def guarded(headers: dict[str, str]) -> None:
            try:
                await one_request(client, headers, random.Random(rng.random()), outcome)
            except httpx.HTTPError as e:
                outcome.add(f"error:{type(e).__name__}")

        await asyncio.gather(*(guarded(h) for h in per_request_headers))
    return outcome
