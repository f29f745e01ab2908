"""The demo echo upstream in a process of its own: ``python -m bench.upstream [PORT]``.

Prints the port it listens on (one line), then serves until it is terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from routstr_addon.dev.demo import EchoUpstream


async def serve(port: int) -> None:
    server = EchoUpstream("127.0.0.1", port)
    await server.start()
    print(server.port, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(port))


if __name__ == "__main__":
    main()
