"""In-process timing of the addon's hooks for requests paid by a funded key, without sockets:
the CPU the addon itself adds per request (``request``, ``responseheaders`` and ``response``,
the SQLite ledger included), apart from mitmproxy's own work and the network.

    python -m bench.hooks [--addon PATH] [--compare OTHER_ADDON] [--requests 5000]
                          [--rounds 5] [--web] [--no-profile] [--json]

The addon is built with mitmproxy's test helpers (``taddons.context``), configured like the
benchmark's proxies (``bench-model`` in a models.json, BTC_USD_PRICE, a SQLite ledger in a
temporary folder, UPSTREAM_TIMEOUT=0) and given a funded key. Each round pre-builds N flows
(the client's request with Authorization and a JSON body, and the upstream's answer) and times
only the loop that calls the hooks on them, inside ``asyncio.run`` as under mitmproxy:

* JSON: ``request``, ``responseheaders``, ``response`` (the answer carries usage);
* stream: ``request``, ``responseheaders`` (text/event-stream), the stream callable fed the 23
  SSE chunks of a 20-token answer (20 deltas, finish, usage, ``[DONE]``) and ``b""``, then
  ``response``.

Prints µs per request (median and best of the rounds), then a cProfile of one more round of
each kind: the top functions by own time, and the split between SQLite's C calls and the
rest. ``--compare`` times a second addon too, alternating rounds with the first in one
process, so drift hits both alike. ``--web`` times it as under mitmweb (a stand-in view;
flows scrubbed once done). ``--json`` prints one JSON object instead of tables.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib.util
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .client import CHAT_PATH, MODEL, chat_body

__all__ = ["main", "render"]

REPO = Path(__file__).resolve().parent.parent
TOKENS = 20  # completion tokens of the answer, JSON or streamed
PROMPT_TOKENS = 9
WORDS = [f"w{i}" for i in range(TOKENS)]
USAGE = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": TOKENS,
         "total_tokens": PROMPT_TOKENS + TOKENS}
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                 "message": {"role": "assistant", "content": " ".join(WORDS)}}],
    "usage": USAGE}).encode()
MODELS = {"data": [{
    "id": MODEL, "context_length": 8192,
    "pricing": {"prompt": "0.000001", "completion": "0.000002", "request": "0"},
    "top_provider": {"max_completion_tokens": 1024},
}]}
UPSTREAM = "http://127.0.0.1:9"
FUNDING_MSAT = 10**12


def sse_chunks() -> list[bytes]:
    """What an OpenAI-compatible upstream streams for a 20-token answer, one event a chunk."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": MODEL}

    def event(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    out = []
    for i, word in enumerate(WORDS):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
        out.append(event({**base, "choices": [{"index": 0, "delta": delta,
                                                "finish_reason": None}]}))
    out.append(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    out.append(event({**base, "choices": [], "usage": USAGE}))
    out.append(b"data: [DONE]\n\n")
    return out


CHUNKS = sse_chunks()


class _View:
    def update(self, flows: Any) -> None:
        pass


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"addon_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flows(key: str, n: int, stream: bool) -> list[tuple[Any, Any]]:
    """N fresh flows, each with the answer the upstream will give it (not yet attached)."""
    from mitmproxy import http
    from mitmproxy.test import tflow

    body = chat_body(stream=stream)
    headers: dict[str | bytes, str | bytes] = {"authorization": f"Bearer {key}",
                                               "content-type": "application/json"}
    out = []
    for _ in range(n):
        flow = tflow.tflow(req=http.Request.make("POST", UPSTREAM + CHAT_PATH, body, headers))
        if stream:
            resp = http.Response.make(200, b"", {"content-type": "text/event-stream"})
        else:
            resp = http.Response.make(200, ANSWER, {"content-type": "application/json"})
        out.append((flow, resp))
    return out


def _hooks(addon: Any, name: str) -> list[Callable[[Any], Any]]:
    """The addon's hooks of one event, sub-addons included, in the order mitmproxy calls them."""
    from mitmproxy.addonmanager import traverse

    return [getattr(a, name) for a in traverse([addon]) if callable(getattr(a, name, None))]


def _runtime(addon: Any) -> Any:
    """What the addon runs with (its ledger and meter)."""
    return addon.serving.runtime


def _loop(addon: Any, pairs: list[tuple[Any, Any]], tails: list[Any] | None) -> float:
    """Seconds to run the hooks over the flows; ``tails``: None for JSON answers, else where
    each stream's last bytes go (its chunks fed through the stream callable)."""
    requests, headers, responses = (_hooks(addon, n) for n in
                                    ("request", "responseheaders", "response"))
    chunks = CHUNKS
    t0 = time.perf_counter()
    for flow, resp in pairs:
        for hook in requests:
            hook(flow)
        flow.response = resp
        for hook in headers:
            hook(flow)
        if tails is not None:
            feed = resp.stream
            last = b""
            for chunk in chunks:
                out = feed(chunk)
                if out:  # the cost comment goes out with [DONE], before it
                    last = out if isinstance(out, bytes) else b"".join(out)
            end = feed(b"")
            tails.append(last + (end if isinstance(end, bytes) else b"".join(end)))
        for hook in responses:
            hook(flow)
    return time.perf_counter() - t0


def _check(pairs: list[tuple[Any, Any]], tails: list[Any], stream: bool) -> str | None:
    """Whether every request was admitted, rewritten and billed (None) or what went wrong."""
    for i, (flow, resp) in enumerate(pairs):
        if flow.response is not resp or flow.error is not None:
            return f"request {i}: answered by the proxy itself: {flow.response}"
        if flow.request.path != "/v1" + CHAT_PATH.removeprefix("/v1") \
                or "authorization" in flow.request.headers:  # no UPSTREAM_API_KEY here
            return f"request {i}: not rewritten for the upstream"
        if stream:
            tail = tails[i]
            if not isinstance(tail, bytes) or b"x-routstr-cost-msats" not in tail:
                return f"stream {i}: no cost comment before [DONE] ({tail!r:.200})"
        elif "x-routstr-cost-msats" not in resp.headers:
            return f"request {i}: no x-routstr-cost-msats header"
    return None


def time_round(addon: Any, key: str, n: int, stream: bool,
               profiler: cProfile.Profile | None = None) -> float:
    """µs per request of one round of N pre-built flows; raises if any was not billed."""
    pairs = _flows(key, n, stream)
    tails: list[Any] = []
    _runtime(addon).ledger.checkpoint()  # as the proxy's background task does, once a second
    gc.collect()
    gc.freeze()  # the pre-built flows are not what a live proxy's collector walks
    try:
        if profiler is not None:
            profiler.enable()
        try:
            secs = _loop(addon, pairs, tails if stream else None)
        finally:
            if profiler is not None:
                profiler.disable()
    finally:
        gc.unfreeze()
    problem = _check(pairs, tails, stream)
    if problem:
        raise RuntimeError(problem)
    return secs / n * 1e6


def _where(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if path == "~":
        return name
    for root in ("site-packages" + os.sep, str(REPO) + os.sep, "python3.12" + os.sep):
        at = path.find(root)
        if at >= 0:
            path = path[at + len(root):]
            break
    return f"{path}:{line}({name})"


def _is_sqlite(func: tuple[str, int, str]) -> bool:
    return func[0] == "~" and "sqlite3." in func[2]


def profile_summary(profiler: cProfile.Profile, n: int, top: int) -> dict[str, Any]:
    """The profile of one round, per request: top functions by own time, and SQLite's share."""
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = \
        pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    sqlite = sum(v[2] for k, v in raw.items() if _is_sqlite(k))
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]

    facade = os.path.join("routstr_addon", "ledger", "core.py")  # the Ledger's entry points

    def cum(name: str) -> float:
        return sum(v[3] for k, v in raw.items() if k[2] == name and k[0].endswith(facade))

    by_file: dict[str, float] = {}
    for k, v in raw.items():
        if _is_sqlite(k):
            by_file["sqlite3 (C calls)"] = by_file.get("sqlite3 (C calls)", 0.0) + v[2]
        elif k[0] == "~":  # a builtin: its time goes to the file that called it
            for caller, cv in v[4].items():
                where = _where(caller).split(":", 1)[0] if caller[0] != "~" else caller[2]
                by_file[where] = by_file.get(where, 0.0) + cv[2]
        else:
            where = _where(k).split(":", 1)[0]
            by_file[where] = by_file.get(where, 0.0) + v[2]
    return {
        "requests": n, "profiled_us_per_request": total / n * 1e6,
        "by_file_us_per_request": {f: t / n * 1e6 for f, t in sorted(
            by_file.items(), key=lambda kv: kv[1], reverse=True)[:10]},
        "sqlite_us_per_request": sqlite / n * 1e6,
        "rest_us_per_request": (total - sqlite) / n * 1e6,
        "sqlite_share": sqlite / total if total else None,
        "sqlite_calls_per_request": sum(v[1] for k, v in raw.items() if _is_sqlite(k)) / n,
        "ledger_cum_us_per_request": {m: cum(m) / n * 1e6
                                      for m in ("reserve", "settle", "touch")
                                      if cum(m)},
        "top": [{"function": _where(k), "calls_per_request": v[1] / n,
                 "tottime_us_per_request": v[2] / n * 1e6,
                 "cumtime_us_per_request": v[3] / n * 1e6,
                 "share": v[2] / total if total else None} for k, v in rows],
    }


def measure(paths: list[Path], requests: int, rounds: int, web: bool, profile: bool,
            top: int, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Configure the addons, fund a key for each and time them; the whole result."""
    (tmp / "models.json").write_text(json.dumps(MODELS))
    os.environ.update({"DATA_DIR": str(tmp), "MODELS_PATH": str(tmp / "models.json"),
                       "BTC_USD_PRICE": "100000", "UPSTREAM_BASE_URL": UPSTREAM + "/v1",
                       "UPSTREAM_TIMEOUT": "0", "CASHU_MINTS": "",
                       "DATABASE_URL": f"sqlite:///{tmp / 'ledger.sqlite'}"})
    os.chdir(tmp)  # no .env of the caller's is read
    from mitmproxy.addons import proxyserver
    from mitmproxy.test import taddons

    addons = [_load(path).Routstr() for path in paths]
    for i, addon in enumerate(addons):
        addon.name = f"routstr{i}"  # mitmproxy wants distinct names, sub-addons' too
        for sub in addon.addons:
            sub.name = f"{type(sub).__name__.lower()}{i}"

    async def run() -> dict[str, Any]:
        with taddons.context(proxyserver.Proxyserver(), *addons) as tctx:
            keys = []
            for i, addon in enumerate(addons):
                tctx.configure(addon)
                if not hasattr(addon.serving, "runtime"):
                    raise RuntimeError(f"{paths[i]}: the addon did not configure itself")
                keys.append(_runtime(addon).ledger.create_key(FUNDING_MSAT)[0])
                if web:
                    from routstr_addon.proxy.webview import Scrubber

                    addon.view.scrubber = Scrubber(_View())
            timed: list[dict[str, list[float]]] = [{"json": [], "stream": []} for _ in addons]
            sent = [0] * len(addons)
            # One unmeasured round each: imports, caches and the ledger's first pages.
            for i, (addon, key) in enumerate(zip(addons, keys, strict=True)):
                for kind in ("json", "stream"):
                    time_round(addon, key, min(requests, 500), kind == "stream")
                    sent[i] += min(requests, 500)
            for r in range(rounds):
                for kind in ("json", "stream"):
                    for i, (addon, key, result) in enumerate(zip(addons, keys, timed,
                                                                 strict=True)):
                        result[kind].append(time_round(addon, key, requests, kind == "stream"))
                        sent[i] += requests
                say(f"  round {r + 1}/{rounds}: " + "; ".join(
                    f"{kind} " + " / ".join(f"{t[kind][-1]:.1f}" for t in timed)
                    for kind in ("json", "stream")) + " us per request")
            profiles: dict[str, Any] = {}
            if profile:
                for kind in ("json", "stream"):
                    prof = cProfile.Profile()
                    time_round(addons[0], keys[0], requests, kind == "stream", prof)
                    sent[0] += requests
                    profiles[kind] = profile_summary(prof, requests, top)
            billed = []
            for addon, key in zip(addons, keys, strict=True):
                from routstr_addon.ledger import hash_key

                ledger = _runtime(addon).ledger
                state = ledger.key(hash_key(key))
                billed.append(state.total_requests if state is not None else None)
                ledger.close()
        return {
            "requests": requests, "rounds": rounds, "web": web,
            "stream_chunks": len(CHUNKS), "completion_tokens": TOKENS,
            "addons": [{
                "addon": str(path),
                **{f"{kind}_us_per_request": statistics.median(t[kind]) for kind in t},
                **{f"{kind}_us_best_round": min(t[kind]) for kind in t},
                **{f"{kind}_rounds_us": t[kind] for kind in t},
                "billed": b, "sent": s,
            } for path, t, b, s in zip(paths, timed, billed, sent, strict=True)],
            "profile": profiles,
        }

    return asyncio.run(run())


# --- output -------------------------------------------------------------------------------

TARGET_US = 150.0


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths),
                      *(line(r) for r in rows)])


def render(result: dict[str, Any]) -> str:
    n, rounds = result["requests"], result["rounds"]
    parts = []
    rows = []
    for a in result["addons"]:
        name = a["addon"]
        with_repo = name.removeprefix(str(REPO) + os.sep)
        for kind, what in (("json", "JSON"), ("stream", "stream")):
            med = a[f"{kind}_us_per_request"]
            rows.append([with_repo, what, _fmt(med), _fmt(a[f"{kind}_us_best_round"]),
                         " ".join(f"{x:.0f}" for x in a[f"{kind}_rounds_us"]),
                         ("ok" if med < TARGET_US else "OVER") if kind == "json" else "-",
                         _fmt(1e6 / med, 0)])
    parts.append(_table(
        f"The addon's own CPU per request, in process (taddons, SQLite ledger, {n} pre-built "
        f"flows a round, median of {rounds}{', mitmweb stand-in' if result['web'] else ''})",
        ["addon", "kind", "us/req", "best", "rounds (us)", f"JSON <{TARGET_US:.0f}",
         "max req/s a core"], rows))
    parts.append(f"  JSON: request + responseheaders + response. stream: the same with "
                 f"{result['stream_chunks']} SSE chunks\n  ({result['completion_tokens']} "
                 "tokens, finish, usage, [DONE]) and b\"\" through the stream callable; us per "
                 "stream.\n  max req/s a core: 1e6 / us, the ceiling if the hooks were the "
                 "only work.")
    for kind, prof in result.get("profile", {}).items():
        rows = [[t["function"], _fmt(t["calls_per_request"], 2),
                 _fmt(t["tottime_us_per_request"]), _fmt(t["cumtime_us_per_request"]),
                 f"{t['share'] * 100:.1f} %"] for t in prof["top"]]
        ledger = ", ".join(f"{m} {v:.1f}" for m, v in prof["ledger_cum_us_per_request"].items())
        parts.append(_table(
            f"cProfile, {'JSON' if kind == 'json' else 'stream'} ({prof['requests']} requests,"
            f" one round, first addon; us per request under the profiler: "
            f"{prof['profiled_us_per_request']:.1f})",
            ["function (top by own time)", "calls/req", "own us", "cum us", "share"], rows))
        parts.append(
            f"  SQLite's C calls (execute, fetchall, cursor…): "
            f"{prof['sqlite_us_per_request']:.1f} us/req ({prof['sqlite_share'] * 100:.0f} %, "
            f"{prof['sqlite_calls_per_request']:.1f} calls); the rest: "
            f"{prof['rest_us_per_request']:.1f} us/req.\n  Ledger methods, cumulative us/req: "
            f"{ledger or '-'}. The profiler inflates Python calls more than C ones.\n"
            "  Own time by file (builtins counted with their caller), us/req: "
            + ", ".join(f"{f} {t:.1f}" for f, t in
                        list(prof["by_file_us_per_request"].items())[:8]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hooks",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--addon", type=Path, default=REPO / "routstr_addon" / "addon.py",
                        help="the addon to time (default: this checkout's)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="a second addon.py, timed in alternating rounds")
    parser.add_argument("--requests", type=int, default=5000,
                        help="flows per round (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--web", action="store_true", help="as under mitmweb")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile round")
    parser.add_argument("--top", type=int, default=15,
                        help="functions listed from the profile (default 15)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="where the ledger goes (default: /dev/shm when there is one, so "
                             "disk noise stays out)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be positive")
    sys.path.insert(0, str(REPO))
    shm = Path("/dev/shm")
    base = args.tmp_dir or (shm if shm.is_dir() else None)
    tmp = Path(tempfile.mkdtemp(prefix="routstr-hooks-", dir=base))
    paths = [args.addon.resolve()] + ([args.compare.resolve()] if args.compare else [])

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cwd = Path.cwd()
    try:
        result = measure(paths, args.requests, args.rounds, args.web, not args.no_profile,
                         args.top, tmp, say)
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)
    result["tmp_base"] = str(base or tempfile.gettempdir())
    if args.json:
        print(json.dumps(result))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
