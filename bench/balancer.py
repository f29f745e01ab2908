"""A round-robin TCP load balancer on loopback (the tests use it too): each new
connection goes to the next backend. Run as a process of its own so its CPU is measured apart:

    python -m bench.balancer PORT [PORT ...]

prints the port it listens on (one line), then serves until terminated; on SIGTERM it prints
how many connections each backend got (one JSON line on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

__all__ = ["Balancer", "main"]

# asyncio listens with a backlog of 100: a burst of 500 new connections would reset most of
# them here before either backend saw one (the scale-out test lost 225 of 500 that way).
BACKLOG = 2048


class Balancer:
    def __init__(self, backends: Sequence[tuple[str, int]]) -> None:
        self.backends = list(backends)
        self._next = itertools.cycle(range(len(self.backends)))
        self.port = 0
        self.counts = [0] * len(self.backends)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = next(self._next)
        self.counts[index] += 1
        host, port = self.backends[index]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, backlog=BACKLOG)
        self.port = server.sockets[0].getsockname()[1]
        return server

    @contextlib.contextmanager
    def running(self) -> Iterator[Balancer]:
        """In a thread of this process (as the tests use it)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        server: list[asyncio.Server] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            server.append(loop.run_until_complete(self.start()))
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        ready.wait(10)
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(server[0].close)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


async def _serve_forever(balancer: Balancer) -> None:
    server = await balancer.start()
    print(balancer.port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    print(json.dumps({"connections": balancer.counts}), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ports = [int(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not ports:
        print("usage: python -m bench.balancer PORT [PORT ...]", file=sys.stderr)
        return 2
    asyncio.run(_serve_forever(Balancer([("127.0.0.1", p) for p in ports])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
