"""Pay a Routstr proxy with Cashu ecash from the official OpenAI client.

    CASHU_TOKEN=cashuB… python example.py [--base-url http://127.0.0.1:8000/v1] [--as-key]
                                          [--model M] [--prompt "…" …]

Each prompt is sent as a streaming chat completion. By default every request is paid by the
token in an ``X-Cashu`` header; the proxy keeps the cost and hands back the rest as a new token
(the *change*), which pays the next request. With ``--as-key`` the token is the API key itself:
the proxy redeems it into a balance on first use and charges each request to it.

The proxy reports, at the end of each stream and before ``data: [DONE]``, SSE comments the
OpenAI client skips:

    : x-routstr-cost-msats 25 x-routstr-balance-msats 974975
    : x-cashu cashuB…                          (the change, for X-Cashu payments)

For a stream, the change comes in two parts: what is known at once (the token less the most
the request may cost) in the ``X-Cashu`` response header, the rest in that comment. A small
httpx transport reads both as the client streams (``RoutstrTap``) and the script joins them
into the next request's token; if the change was missed (a dropped connection),
``POST /v1/balance/refund`` with the same ``X-Cashu`` header hands out all of it again, as one
token. At the end the script prints the token holding what is left: keep it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from openai import APIStatusError, OpenAI

try:
    import httpx2 as httpx  # the OpenAI client's HTTP library since openai 3
except ImportError:  # older openai releases use httpx
    import httpx  # type: ignore[no-redef]

DEFAULT_PROMPTS = ["Hello!", "What is Cashu ecash, in one sentence?", "Thanks, goodbye."]


class RoutstrTap(httpx.BaseTransport):
    """An httpx transport that notes Routstr's cost and change, from headers (JSON answers)
    and from the SSE comments at the end of streams, without changing what the client reads."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.reset()

    def reset(self) -> None:
        self.cost_msats: int | None = None
        self.balance_msats: int | None = None
        self.change: str | None = None
        self.parts: list[str] = []  # a stream's change: the header's part, then the rest

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if "x-routstr-cost-msats" in response.headers:
            self.cost_msats = int(response.headers["x-routstr-cost-msats"])
            self.balance_msats = int(response.headers.get("x-routstr-balance-msats", 0))
        self.change = response.headers.get("x-cashu") if response.status_code < 400 else None
        self.parts = [self.change] if self.change else []
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_Tapped(response.stream, self),
                              extensions=response.extensions)

    def close(self) -> None:
        self.inner.close()

    def comment(self, line: bytes) -> None:
        words = line.decode(errors="replace").split()
        if words[:2] == [":", "x-cashu"] and len(words) > 2:
            self.parts.append(words[2])
            self.change = join_tokens(self.parts)
        elif words[:2] == [":", "x-routstr-cost-msats"] and len(words) >= 5:
            self.cost_msats, self.balance_msats = int(words[2]), int(words[4])


class _Tapped(httpx.SyncByteStream):
    def __init__(self, stream: Any, tap: RoutstrTap) -> None:
        self.stream, self.tap, self.partial = stream, tap, b""
        self.chunks: Iterator[bytes] = iter(())

    def __iter__(self) -> Iterator[bytes]:
        self.chunks = iter(self.stream)
        for chunk in self.chunks:
            self.read(chunk)
            yield chunk

    def read(self, chunk: bytes) -> None:
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.startswith(b": x-"):
                self.tap.comment(line)

    def close(self) -> None:
        # The OpenAI client stops reading at "data: [DONE]", after Routstr's comments; read
        # what an older proxy may still send after it.
        left = 1 << 16
        for chunk in self.chunks:
            self.read(chunk)
            left -= len(chunk)
            if left <= 0:
                break
        self.stream.close()


def join_tokens(tokens: list[str]) -> str | None:
    """One cashuB token holding the proofs of several (same mint and unit), or None when
    cbor2 is not installed to read them (the refund endpoint then joins them)."""
    if len(tokens) == 1:
        return tokens[0]
    try:
        import cbor2
    except ImportError:
        return None
    joined: dict[str, Any] | None = None
    for token in tokens:
        body = token.removeprefix("cashu:")
        data = cbor2.loads(base64.urlsafe_b64decode(body[6:] + "=" * (-len(body[6:]) % 4)))
        if joined is None:
            joined = data
        else:
            joined["t"].extend(data["t"])
    assert joined is not None
    return "cashuB" + base64.urlsafe_b64encode(cbor2.dumps(joined)).decode().rstrip("=")


def token_sats(token: str) -> int | None:
    """A token's value in its unit (cashuA: JSON; cashuB: CBOR, read with cbor2 if present)."""
    body = token.removeprefix("cashu:")
    raw = base64.urlsafe_b64decode(body[6:] + "=" * (-len(body[6:]) % 4))
    if body.startswith("cashuA"):
        data = json.loads(raw)
        return int(sum(p["amount"] for t in data["token"] for p in t["proofs"]))
    try:
        import cbor2
    except ImportError:
        return None
    data = cbor2.loads(raw)
    return int(sum(p["a"] for t in data["t"] for p in t["p"]))


def chat(client: OpenAI, model: str, prompt: str, x_cashu: str | None) -> str:
    """Stream one answer to stdout; the answer's text."""
    headers = {"X-Cashu": x_cashu} if x_cashu else None
    text = []
    stream = client.chat.completions.create(model=model, stream=True, extra_headers=headers,
                                            messages=[{"role": "user", "content": prompt}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return "".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default=os.environ.get("ROUTSTR_BASE_URL",
                                                             "http://127.0.0.1:8000/v1"))
    parser.add_argument("--as-key", action="store_true",
                        help="use the token as the API key (a balance) instead of X-Cashu")
    parser.add_argument("--model", help="default: the first model the proxy lists")
    parser.add_argument("--prompt", action="append", help="repeat for several requests")
    args = parser.parse_args(argv)
    token = os.environ.get("CASHU_TOKEN", "").strip()
    if not token.removeprefix("cashu:").startswith(("cashuA", "cashuB")):
        parser.error("set CASHU_TOKEN to a Cashu token (cashuA… or cashuB…)")

    tap = RoutstrTap()
    # With X-Cashu the proxy ignores the API key; the OpenAI client still wants one.
    client = OpenAI(base_url=args.base_url, api_key=token if args.as_key else "x-cashu",
                    http_client=httpx.Client(transport=tap, timeout=120), max_retries=0)
    model = args.model or client.models.list().data[0].id
    spent = rounding = 0
    for n, prompt in enumerate(args.prompt or DEFAULT_PROMPTS, 1):
        print(f"[{n}] {prompt}\n> ", end="", flush=True)
        tap.reset()
        try:
            chat(client, model, prompt, None if args.as_key else token)
        except APIStatusError as e:  # 402: the token cannot cover this request; it is intact
            print(f"\nrefused ({e.status_code}): {e.message}", file=sys.stderr)
            break
        if not args.as_key and tap.change is None:  # missed it? ask for all of it again
            answer = httpx.post(f"{args.base_url}/balance/refund", headers={"X-Cashu": token},
                                timeout=30)
            tap.change = answer.json().get("token") if answer.status_code == 200 else None
        cost = tap.cost_msats or 0
        spent += cost
        if args.as_key:
            print(f"    cost {cost} msat · left on the key {tap.balance_msats} msat")
            continue
        before = token_sats(token)
        token = tap.change or ""
        sats = token_sats(token) if token else 0
        rounded = (before - (sats or 0)) * 1000 - cost if before is not None else 0
        rounding += rounded
        print(f"    cost {cost} msat · change {sats} sat" + (
            f" ({rounded} msat rounded away: change is in whole sats)" if rounded > 0 else ""))
        if not token:
            print("nothing is left")
            return 0
    if args.as_key:
        print(f"spent {spent} msat; the token keeps working as the key: {token}")
    else:
        print(f"spent {spent} msat (+{rounding} msat rounding); remaining {token_sats(token)} "
              "sat in this token (keep it):")
        print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
