"""A round-robin TCP load balancer on loopback: each new connection goes to the next backend."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator, Sequence


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

    @contextlib.contextmanager
    def running(self) -> Iterator[Balancer]:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        server: list[asyncio.Server] = []

        def main() -> None:
            asyncio.set_event_loop(loop)
            srv = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = srv.sockets[0].getsockname()[1]
            server.append(srv)
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
