"""Load worker for the Cashu measurements: one process, N connections, one token per request.

``python -m bench.xload SPEC.json`` reads the job (see ``Job``), prepares every request, prints
``ready`` and waits for SIGUSR1, so that the workers of one measurement start together and
nothing of their start-up is timed. Then it sends the requests from a shared queue on its
connections and prints one JSON object (see ``WorkerResult``).

Modes:
  ``xcashu``  POST /v1/chat/completions with ``X-Cashu: <token>``; good = 200 with an
              ``x-cashu`` change header (JSON), or a stream with ``: x-cashu cashuB`` before
              ``data: [DONE]``.
  ``bearer``  the same with ``Authorization: Bearer <token or key>``; good = 200.
  ``swap``    no proxy: swap each token's proofs into new ones at the mint (POST /v1/swap), as
              the proxy does for an x-cashu request (same outputs, same client code).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .client import CHAT_PATH, Connection, chat_body, first_event_timer

__all__ = ["Job", "WorkerResult", "main"]

CHANGE_COMMENT = b": x-cashu cashuB"


@dataclass(slots=True)
class Job:
    mode: str  # xcashu | bearer | swap
    tokens: list[str]
    connections: int
    port: int = 0  # the proxy (xcashu, bearer)
    stream: bool = False
    mint_url: str = ""  # swap
    keep_variable: int = 0  # swap: the change range the proxy shapes its outputs for
    samples: int = 5  # change tokens to hand back for checking


@dataclass(slots=True)
class WorkerResult:
    started: float = 0.0  # wall clock, first request sent
    ended: float = 0.0  # wall clock, last answer read
    latencies_us: list[float] = field(default_factory=list)  # good answers only
    ttfb_us: list[float] = field(default_factory=list)  # streams: first `data:` line
    statuses: Counter[int] = field(default_factory=Counter)
    good: int = 0
    no_change: int = 0  # 200 without the change token
    socket_errors: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, for the report
    change_samples: list[str] = field(default_factory=list)
    outputs: int = 0  # swap: proofs received

    def fail(self, text: str) -> None:
        if len(self.failures) < 3:
            self.failures.append(text[:400])

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["statuses"] = {str(k): v for k, v in self.statuses.items()}
        return out


def request_bytes(port: int, body: bytes, header: tuple[str, str] | None) -> bytes:
    lines = [f"POST {CHAT_PATH} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if header is not None:
        lines.append(f"{header[0]}: {header[1]}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _http(job: Job, raws: list[bytes], result: WorkerResult) -> None:
    todo = list(reversed(raws))

    async def one(conn: Connection, raw: bytes) -> None:
        first, on_data = first_event_timer()

        t0 = time.perf_counter()
        try:
            resp = await conn.request(raw, on_data if job.stream else None)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError) as e:
            result.socket_errors += 1
            result.fail(f"{type(e).__name__}: {e}")
            return
        t1 = time.perf_counter()
        result.statuses[resp.status] += 1
        if resp.status != 200:
            result.fail(f"{resp.status}: {resp.body[:300]!r}")
            return
        change: str | None = None
        if job.stream:
            last = resp.body.rstrip().rsplit(b"\n", 1)[-1]
            if not first or b"data: [DONE]" not in resp.body:
                result.fail(f"200 but no complete stream: {resp.body[-300:]!r}")
                return
            if job.mode == "xcashu":
                # The change comment comes before [DONE] (where OpenAI clients stop reading);
                # the part known at the start may be in the header, the rest there.
                at = resp.body.find(b"\n" + CHANGE_COMMENT)
                if at < 0 or at > resp.body.find(b"data: [DONE]"):
                    result.no_change += 1
                    result.fail(f"stream without the change comment before [DONE]: "
                                f"{last[:200]!r}")
                    return
                change = resp.body[at + len(b"\n: x-cashu "):].split(b"\n", 1)[0].decode()
            result.ttfb_us.append((first[0] - t0) * 1e6)
        elif job.mode == "xcashu":
            change = resp.headers.get("x-cashu")
            if not change or not change.startswith("cashuB"):
                result.no_change += 1
                result.fail(f"200 without an x-cashu change header: {resp.headers}")
                return
        elif b'"choices"' not in resp.body:
            result.fail(f"200 without choices: {resp.body[:300]!r}")
            return
        result.good += 1
        result.latencies_us.append((t1 - t0) * 1e6)
        if change is not None and len(result.change_samples) < job.samples:
            result.change_samples.append(change)

    async def loop() -> None:
        conn = Connection("127.0.0.1", job.port)
        try:
            while todo:
                await one(conn, todo.pop())
        finally:
            await conn.close()

    result.started = time.time()
    await asyncio.gather(*(loop() for _ in range(max(1, job.connections))))
    result.ended = time.time()


async def _swaps(job: Job, result: WorkerResult) -> None:
    from routstr_addon.ecash.tokens import change_friendly_amounts, parse_token
    from routstr_addon.ecash.wallet import MintWallet

    mint = MintWallet(job.mint_url)
    await mint.load()
    # Everything but the swap itself is done before the clock starts.
    work = []
    for text in job.tokens:
        token = parse_token(text)
        for p in token.proofs:
            keyset = mint.resolve(p.id)
            if keyset is None:
                raise SystemExit(f"the token names a keyset {p.id} the mint does not have")
            p.id = keyset.id
        net = token.amount - mint.input_fee(token.proofs)
        work.append((token, change_friendly_amounts(net, job.keep_variable)))
    todo = list(reversed(work))
    # One warm connection per task, as the proxy's kept-alive client has.
    await asyncio.gather(*(mint.client.info() for _ in range(job.connections)))
    _ready()

    async def loop() -> None:
        while todo:
            token, amounts = todo.pop()
            t0 = time.perf_counter()
            try:
                proofs = await mint.swap(token.proofs, amounts, token.unit)
            except Exception as e:
                result.statuses[0] += 1
                result.fail(f"{type(e).__name__}: {e}")
                continue
            result.latencies_us.append((time.perf_counter() - t0) * 1e6)
            result.statuses[200] += 1
            result.good += 1
            result.outputs += len(proofs)

    try:
        result.started = time.time()
        await asyncio.gather(*(loop() for _ in range(max(1, job.connections))))
        result.ended = time.time()
    finally:
        await mint.client.aclose()


def _ready() -> None:
    """Say so, and block until the parent's SIGUSR1."""
    print("ready", flush=True)
    signal.sigwait({signal.SIGUSR1})


def run(job: Job) -> WorkerResult:
    result = WorkerResult()
    if job.mode == "swap":
        asyncio.run(_swaps(job, result))
        return result
    body = chat_body(stream=job.stream)
    if job.mode == "xcashu":
        raws = [request_bytes(job.port, body, ("X-Cashu", t)) for t in job.tokens]
    elif job.mode == "bearer":
        raws = [request_bytes(job.port, body, ("Authorization", f"Bearer {t}"))
                for t in job.tokens]
    else:
        raise SystemExit(f"unknown mode {job.mode!r}")
    _ready()
    asyncio.run(_http(job, raws, result))
    return result


def main() -> None:
    # Blocked from the start, so a SIGUSR1 sent before sigwait is kept, not fatal.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    with open(sys.argv[1]) as f:
        job = Job(**json.load(f))
    result = run(job)
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    main()
