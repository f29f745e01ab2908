"""The failover hop's own cost: CPU per request through it vs straight to the upstream.

    python -m bench.failover [--requests 3000]

One process, one event loop: the demo echo upstream, the hop (``upstreams.failover``) armed
with two providers for every request (both the echo upstream, so the first answers), and a
client on one kept-alive connection sending a small chat request and reading the answer.
Prints µs of CPU per request via the hop and direct; the difference is what a model with
several providers pays per request in the proxy's process (a model with one provider never
goes through the hop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from routstr_addon.dev.demo import EchoUpstream
from routstr_addon.upstreams.failover import Attempt, Failover
from routstr_addon.upstreams.health import Health


async def _read_answer(reader: asyncio.StreamReader) -> None:
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    if b"content-length: " in head:
        await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
        return
    while True:  # chunked
        size = int((await reader.readline()).strip(), 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def measure(requests: int) -> tuple[float, float]:
    upstream = EchoUpstream()
    await upstream.start()
    hop = Failover(Health(["a", "b"]), 5, 30)
    await hop.start()
    body = json.dumps({"model": "demo-echo",
                       "messages": [{"role": "user", "content": "hello there"}]}).encode()
    path = "/v1/chat/completions"
    attempts = tuple(Attempt(name, "http", "127.0.0.1", upstream.port, path,
                             (("authorization", "Bearer sk-x"),), body) for name in "ab")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", hop.port)

        async def via_hop(i: int) -> None:
            hop.arm(str(i), attempts)
            writer.write(b"POST %s HTTP/1.1\r\nhost: hop\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\nx-routstr-plan: %d\r\n\r\n%s"
                         % (path.encode(), len(body), i, body))
            await _read_answer(reader)

        r2, w2 = await asyncio.open_connection("127.0.0.1", upstream.port)

        async def direct(_: int) -> None:
            w2.write(b"POST %s HTTP/1.1\r\nhost: up\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
            await _read_answer(r2)

        results = []
        for send in (via_hop, direct):
            for i in range(200):  # warm-up
                await send(i)
            started = time.process_time()
            for i in range(200, 200 + requests):
                await send(i)
            results.append((time.process_time() - started) / requests * 1e6)
        writer.close()
        w2.close()
        return results[0], results[1]
    finally:
        await hop.stop()
        await upstream.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    p.add_argument("--requests", type=int, default=3000)
    args = p.parse_args(argv)
    hop_us, direct_us = asyncio.run(measure(args.requests))
    print(f"via the failover hop: {hop_us:,.0f} us CPU per request (client, hop, upstream)")
    print(f"direct:               {direct_us:,.0f} us CPU per request (client, upstream)")
    print(f"the hop adds:         {hop_us - direct_us:,.0f} us CPU per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
