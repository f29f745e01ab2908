"""What issue 11's hostile corpus (``tests/test_surface.py``) runs against.

Fixtures here (imported by the test modules that use them): the real upstream
(``tests/real_upstream.py``) with nginx-like path normalisation in front, and ``Surface``: a
real ``mitmdump`` with the addon pointed at it, one generously funded key, and a client that
sends requests byte for byte as given (no HTTP client library normalises the hostile paths
away) and measures what each one cost.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import pytest

from .conftest import MODELS, Proxy, expected_msat, start_proxy
from .real_upstream import Bill, RealUpstream, Served, decode_body

FUNDS_SATS = 10**8  # enough that no request is refused for want of funds (402 proves nothing)


@dataclass
class Outcome:
    """One request through the proxy: what the client got, what reached the upstream, and what
    the key was charged for it."""

    status: int | None  # None: no answer (the client hung up, or the connection was dropped)
    headers: dict[str, str]
    body: bytes  # as the client received it, its Content-Encoding undone
    served: list[Served]
    charged_msat: int
    words_received: int = 0  # words of generated text the client read
    notes: list[str] = field(default_factory=list)

    @property
    def bills(self) -> list[Bill]:
        return [bill for s in self.served for bill in s.bills]

    @property
    def owed_msat(self) -> int:
        """The upstream's own bill, priced at our model prices (independently of the proxy)."""
        return sum(expected_msat(b.model, b.prompt_tokens, b.completion_tokens)
                   for b in self.bills)

    def error(self) -> dict[str, Any]:
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return {}
        error = parsed.get("error") if isinstance(parsed, dict) else None
        return error if isinstance(error, dict) else {}

    def describe(self) -> str:
        return (f"status {self.status}; upstream saw {[(s.method, s.wire_path, s.status)
                                                        for s in self.served]}; "
                f"billed {self.bills} = {self.owed_msat} msat; charged {self.charged_msat} msat;"
                f" answer {self.body[:300]!r}")


class Surface:
    """The proxy under test, its upstream and one funded key."""

    def __init__(self, proxy: Proxy, upstream: RealUpstream) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.key = proxy.new_key(sats=FUNDS_SATS)
        self.port = int(proxy.url.rsplit(":", 1)[1])

    def balance(self) -> int:
        return self.proxy.key_state(self.key).balance_msat

    def send(self, method: str, target: str | bytes, body: Any = None, *,
             headers: dict[str, str] | list[tuple[str, str]] | None = None,
             auth: bool = True, read_timeout: float = 60.0,
             stop_after_words: int | None = None) -> Outcome:
        """Send one request exactly as given and account for it.

        ``body``: a dict (sent as JSON) or bytes. ``read_timeout``: hang up when no answer
        comes within it. ``stop_after_words``: hang up once that many words were read."""
        self.proxy.wait_settled(30)
        self.upstream.wait_idle()
        mark, before = self.upstream.mark(), self.balance()
        content = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        fields = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in fields}
        if auth and "authorization" not in names:
            fields.append(("authorization", f"Bearer {self.key}"))
        if content and "content-type" not in names:
            fields.append(("content-type", "application/json"))
        fields.append(("content-length", str(len(content))))
        if "accept-encoding" not in names:
            fields.append(("accept-encoding", "identity"))
        target_bytes = target.encode() if isinstance(target, str) else target
        url = httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=self.port,
                           target=target_bytes)
        status, got_headers, raw, words = None, {}, b"", 0
        notes: list[str] = []
        timeouts = {"connect": 5.0, "read": read_timeout, "write": 30.0, "pool": 5.0}
        with httpcore.ConnectionPool() as pool:
            try:
                with pool.stream(method, url, headers=fields, content=content,
                                 extensions={"timeout": timeouts}) as resp:
                    status = resp.status
                    got_headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                                   for k, v in resp.headers}
                    chunks = []
                    for chunk in resp.iter_stream():
                        chunks.append(chunk)
                        if stop_after_words is not None and "content-encoding" not in got_headers:
                            words = count_generated_words(b"".join(chunks), complete=False)
                            if words >= stop_after_words:
                                notes.append(f"hung up after {words} words")
                                break
                    raw = b"".join(chunks)
            except httpcore.TimeoutException:
                notes.append("hung up: no answer in time")
            except httpcore.NetworkError as e:
                notes.append(f"connection failed: {e!r}")
        body_bytes = raw
        encoding = got_headers.get("content-encoding", "")
        if raw and encoding and stop_after_words is None:
            try:
                body_bytes = decode_body(raw, encoding)
            except Exception as e:
                notes.append(f"undecodable {encoding} answer: {e!r}")
        if stop_after_words is None:
            words = count_generated_words(body_bytes, complete=True)
        return self._settle(mark, before, status, got_headers, body_bytes, words, notes)

    def send_raw(self, payload: bytes) -> Outcome:
        """Bytes no HTTP client library would send (e.g. megabytes of headers)."""
        self.proxy.wait_settled(30)
        self.upstream.wait_idle()
        mark, before = self.upstream.mark(), self.balance()
        answer = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=15) as s:
            with contextlib.suppress(OSError):
                s.sendall(payload)
            with contextlib.suppress(OSError):
                while data := s.recv(65536):
                    answer += data
                    if b"\r\n\r\n" in answer:
                        s.settimeout(2)  # the head is in: take what follows, then go
        status = None
        if answer.startswith(b"HTTP/1.1 "):
            status = int(answer[9:12])
        rest = answer.partition(b"\r\n\r\n")[2]
        return self._settle(mark, before, status, {}, rest, 0, [])

    def _settle(self, mark: int, before: int, status: int | None, headers: dict[str, str],
                body: bytes, words: int, notes: list[str]) -> Outcome:
        self.upstream.wait_idle(30)
        self.proxy.wait_settled(30)
        return Outcome(status, headers, body, self.upstream.since(mark),
                       before - self.balance(), words, notes)


def count_generated_words(body: bytes, complete: bool) -> int:
    """Words of generated text in an answer: a JSON body or an event stream (chat,
    completions, Responses and Anthropic shapes). ``complete``: the body is whole."""
    text = body.decode("utf-8", "replace")
    if not text.lstrip().startswith(("data:", "event:", ":")):
        if not complete:
            return 0
        try:
            parsed = json.loads(text)
        except ValueError:
            return 0
        return len(_texts(parsed, streamed=False).split())
    total = 0
    events = text.split("\n\n")
    if not complete:
        events = events[:-1]
    for event in events:
        for line in event.split("\n"):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                continue
            try:
                parsed = json.loads(data)
            except ValueError:
                continue
            total += len(_texts(parsed, streamed=True).split())
    return total


def _texts(obj: Any, streamed: bool) -> str:
    """The generated text in one answer or event."""
    if not isinstance(obj, dict):
        return ""
    out: list[str] = []
    for choice in obj.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        source = choice.get("delta" if streamed else "message") or {}
        if isinstance(source, dict) and isinstance(source.get("content"), str):
            out.append(source["content"])
        if isinstance(choice.get("text"), str):
            out.append(choice["text"])
    kind = obj.get("type")
    if kind == "response.output_text.delta" and isinstance(obj.get("delta"), str):
        out.append(obj["delta"])
    if kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
        out.append(str(obj["delta"].get("text") or ""))
    if not streamed:
        for item in obj.get("output") or []:  # Responses
            for part in (item.get("content") or []) if isinstance(item, dict) else []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
        if obj.get("type") == "message":  # Anthropic
            for part in obj.get("content") or []:
                if isinstance(part, dict) and part.get("type") == "text":
                    out.append(str(part.get("text") or ""))
    return " ".join(out)


@pytest.fixture(scope="session")
def real_upstream() -> Iterator[RealUpstream]:
    """The upstream as a production server behind nginx: paths normalised before routing."""
    with RealUpstream(MODELS["data"], normalise_paths=True) as upstream:
        yield upstream


def surface_proxy(workdir: Path, upstream: RealUpstream, **env: str) -> Proxy:
    return start_proxy(workdir, upstream.url,
                       {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", **env})


@pytest.fixture(scope="session")
def surface(real_upstream: RealUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Surface]:
    """mitmdump with the addon, model-based pricing, in front of the real upstream. After the
    corpus: the books balance, and no request it accepted cost more than was reserved."""
    proxy = surface_proxy(tmp_path_factory.mktemp("surface"), real_upstream)
    try:
        yield Surface(proxy, real_upstream)
        assert proxy.check() == []
        ledger = proxy.ledger()
        try:
            assert ledger.reports.overruns_since(0) == (0, 0)  # no under-reservation
        finally:
            ledger.close()
    finally:
        proxy.stop()

