"""A minimal HTTP/1.1 keep-alive client on asyncio streams, cheap enough not to blur the
figures: Content-Length, chunked and close-delimited bodies, with a callback per body piece."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Connection", "Response", "build_request", "chat_body", "percentile"]

CHAT_PATH = "/v1/chat/completions"
MODEL = "bench-model"


def chat_body(stream: bool = False) -> bytes:
    body: dict[str, object] = {"model": MODEL,
                               "messages": [{"role": "user", "content": "hello bench"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def build_request(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive connection; reopened on the next request after a close or an error."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def request(self, raw: bytes,
                      on_data: Callable[[bytes], None] | None = None) -> Response:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            parts: list[bytes] = []
            keep_alive = headers.get("connection", "").lower() != "close"
            if "chunked" in headers.get("transfer-encoding", "").lower():
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":
                            pass  # trailers
                        break
                    piece = (await reader.readexactly(size + 2))[:-2]
                    parts.append(piece)
                    if on_data is not None:
                        on_data(piece)
            elif "content-length" in headers:
                length = int(headers["content-length"])
                piece = await reader.readexactly(length) if length else b""
                parts.append(piece)
                if on_data is not None and piece:
                    on_data(piece)
            elif status >= 200 and status not in (204, 304):
                keep_alive = False
                while piece := await reader.read(65536):
                    parts.append(piece)
                    if on_data is not None:
                        on_data(piece)
        except BaseException:
            await self.close()
            raise
        if not keep_alive:
            await self.close()
        return Response(status, headers, b"".join(parts))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def first_event_timer() -> tuple[list[float], Callable[[bytes], None]]:
    """A body callback that notes when the first complete ``data:`` line arrived (TTFB)."""
    first: list[float] = []
    buf = bytearray()

    def on_data(piece: bytes) -> None:
        if first:
            return
        buf.extend(piece)
        at = buf.find(b"data:")
        if at >= 0 and buf.find(b"\n", at) >= 0:
            first.append(time.perf_counter())

    return first, on_data
