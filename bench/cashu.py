"""The Cashu payment paths, against a local Nutshell mint (FakeWallet: no real money).

For each proxy: tokens are minted before anything is timed (nutshell's own wallet, so the
tokens are not made by the code under test), then measured:

* x-cashu JSON: a fresh token per request in an ``X-Cashu`` header, sequential and at a fixed
  concurrency; every answer must be 200 with the change in an ``x-cashu`` header;
* x-cashu streaming: the same with ``"stream": true``; each stream must end with the change in
  an SSE comment ``: x-cashu cashuB…``;
* token as key: ``Authorization: Bearer cashuB…``, first use (the redeem) and steady state;
* the mint alone: the same tokens swapped at the mint with the same outputs and the same client
  code as the proxy's, at the same concurrency: the ceiling for x-cashu req/s;
* the mint's round trips per request, counted in its access log;
* afterwards: the proxy's ledger (x-cashu payments = 200 answers, ``routstr ledger check``) and
  a sample of change tokens redeemed at the mint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from .client import MODEL, percentile
from .load import LoadResult
from .procs import Proc, Processes, cpu_seconds, read_line
from .xload import Job

if TYPE_CHECKING:
    from tests.ecash_user import UserWallet

__all__ = ["CashuPlan", "CashuResult", "MintLog", "Phase", "TokenMaker", "run_cashu"]

REPO = Path(__file__).resolve().parent.parent
MAX_OUTPUTS = 990  # nutshell refuses more than 1000 outputs in one request
STEADY_TOKEN_SATS = 10_000  # the token reused as a key under wrk: many requests in flight
ACCESS = re.compile(rb'"(GET|POST|PUT|DELETE) (/\S*) HTTP/[\d.]+" (\d{3})')
# Mint log lines worth a look: warnings and errors, not its DEBUG dump of settings, nor
# slowapi's DeprecationWarning at start-up.
MINT_SUSPICIOUS = re.compile(r"traceback|\| (warning|error|critical)\s*\|", re.IGNORECASE)
MINT_NOISE = re.compile(r"deprecat", re.IGNORECASE)


def powers_of_two(amount: int) -> list[int]:
    return [1 << i for i in range(amount.bit_length() - 1, -1, -1) if amount >> i & 1]


class TokenMaker:
    """Fresh tokens of an exact amount from nutshell's wallet (``tests/ecash_user.UserWallet``),
    minted in bulk: one mint quote and one mint call per ~1000 proofs."""

    def __init__(self, mint_url: str, folder: Path) -> None:
        sys.path.insert(0, str(REPO))  # tests/ is not installed
        from tests.ecash_user import UserWallet

        # nutshell prints "Generated a new mnemonic…" on stdout, where the tables go.
        with contextlib.redirect_stdout(sys.stderr):
            self.user: UserWallet = UserWallet(mint_url, folder)

    def tokens(self, amount: int, count: int) -> list[str]:
        split = powers_of_two(amount)
        per_chunk = max(1, MAX_OUTPUTS // len(split))
        out: list[str] = []
        while len(out) < count:
            n = min(per_chunk, count - len(out))
            out += self.user.run(self._mint(split, n), timeout=300)
        return out

    async def _mint(self, split: list[int], n: int) -> list[str]:
        import asyncio

        wallet = self.user.wallet
        amount = sum(split) * n
        quote = await wallet.request_mint(amount)
        for _ in range(200):
            try:
                proofs = await wallet.mint(amount, quote_id=quote.quote, split=split * n)
                break
            except Exception as e:  # FakeWallet pays its invoice after a short delay
                if not any(w in str(e).lower() for w in ("paid", "pending")):
                    raise
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the mint never paid its own invoice")
        k = len(split)
        return [await wallet.serialize_proofs(proofs[i * k:(i + 1) * k], include_dleq=False)
                for i in range(n)]

    def receive(self, token: str) -> int:
        return self.user.receive(token)

    def amount(self, token: str) -> int:
        return self.user.amount(token)

    def close(self) -> None:
        self.user.close()


class MintLog:
    """The mint's access log lines (``"POST /v1/swap HTTP/1.1" 200``) since a mark."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def calls_since(self, mark: int) -> Counter[str]:
        with open(self.path, "rb") as f:
            f.seek(mark)
            data = f.read()
        calls: Counter[str] = Counter()
        for m in ACCESS.finditer(data):
            path = m.group(2).decode()
            if path.startswith(("/v1/keys/", "/v1/mint/quote/bolt11/", "/v1/melt/quote/bolt11/")):
                path = path.rsplit("/", 1)[0] + "/…"
            calls[f"{m.group(1).decode()} {path} {m.group(3).decode()}"] += 1
        return calls

    def flagged(self) -> list[str]:
        try:
            lines = self.path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if MINT_SUSPICIOUS.search(ln) and not MINT_NOISE.search(ln)]


@dataclass(slots=True)
class Phase:
    """One measured set of requests (or swaps), one token each."""

    name: str
    connections: int
    requests: int = 0
    good: int = 0
    no_change: int = 0
    socket_errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    latencies_us: list[float] = field(default_factory=list, repr=False)
    ttfb_us: list[float] = field(default_factory=list, repr=False)
    change_samples: list[str] = field(default_factory=list, repr=False)
    outputs: int = 0
    mint_calls: dict[str, int] | None = None  # proxy phases: the mint's log in the window
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU time per process, the window

    @property
    def rate(self) -> float:
        return self.good / self.elapsed_s if self.elapsed_s else math.nan

    def p(self, q: float, ttfb: bool = False) -> float:
        return percentile(sorted(self.ttfb_us if ttfb else self.latencies_us), q) / 1000

    def cpu_ms(self, process: str) -> float:
        """CPU time of ``process`` over the phase, per good answer."""
        if process not in self.cpu_s or not self.good:
            return math.nan
        return self.cpu_s[process] / self.good * 1000

    @property
    def mint_calls_per_request(self) -> float:
        if self.mint_calls is None or not self.requests:
            return math.nan
        return sum(self.mint_calls.values()) / self.requests

    @property
    def swaps_per_request(self) -> float:
        if self.mint_calls is None or not self.requests:
            return math.nan
        return sum(v for k, v in self.mint_calls.items() if " /v1/swap " in k) / self.requests

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "connections": self.connections, "requests": self.requests, "good": self.good,
            "failed": self.requests - self.good, "no_change": self.no_change,
            "socket_errors": self.socket_errors, "statuses": self.statuses,
            "first_failures": self.failures, "elapsed_s": self.elapsed_s, "per_s": self.rate,
            "p50_ms": self.p(50), "p90_ms": self.p(90), "p99_ms": self.p(99),
            "mean_ms": (sum(self.latencies_us) / len(self.latencies_us) / 1000
                        if self.latencies_us else math.nan),
        }
        if self.ttfb_us:
            out.update(ttfb_p50_ms=self.p(50, True), ttfb_p99_ms=self.p(99, True))
        if self.outputs:
            out["outputs_per_swap"] = self.outputs / self.good if self.good else math.nan
        if self.cpu_s:
            out["cpu_ms_per_request"] = {k: v / self.good * 1000 if self.good else None
                                         for k, v in self.cpu_s.items()}
        if self.mint_calls is not None:
            out.update(mint_calls=self.mint_calls,
                       mint_calls_per_request=self.mint_calls_per_request,
                       mint_swaps_per_request=self.swaps_per_request)
        return out


@dataclass(slots=True)
class CashuPlan:
    requests: int  # x-cashu JSON at concurrency, and mint swaps at concurrency
    connections: int
    sequential: int  # x-cashu, funded key and mint swaps one at a time; token-as-key redeems
    streams: int
    warmup: int
    workers: int

    @classmethod
    def from_args(cls, requests: int, connections: int) -> CashuPlan:
        return cls(requests=requests, connections=connections,
                   sequential=max(10, min(200, requests // 5)),
                   streams=max(10, min(300, requests // 4)),
                   warmup=2 * connections,
                   workers=2 if (os.cpu_count() or 1) >= 4 and connections > 1 else 1)

    @property
    def tokens_needed(self) -> int:
        return (self.warmup + 2 * self.sequential  # x-cashu and mint, one at a time
                + 2 * self.requests + self.streams + self.sequential)  # ... + token as key


@dataclass(slots=True)
class CashuResult:
    max_cost_sats: float = math.nan
    keep_variable: int = 0  # sats: the change range the mint-alone swaps are shaped for
    token_sats: int = 0
    premint_tokens: int = 0
    premint_s: float = 0.0
    phases: dict[str, Phase] = field(default_factory=dict)
    steady_warmup: LoadResult | None = None
    steady: LoadResult | None = None
    change_checked: int = 0
    change_redeemed: int = 0
    change_sats: list[int] = field(default_factory=list)
    change_errors: list[str] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def phase(self, name: str) -> Phase | None:
        return self.phases.get(name)

    def xcashu_ok(self) -> int:
        """x-cashu answers the client counted as paid with change, all phases."""
        return sum(p.good for n, p in self.phases.items() if n.startswith("xcashu"))

    def xcashu_200(self) -> int:
        return sum(p.statuses.get("200", 0) for n, p in self.phases.items()
                   if n.startswith("xcashu"))

    def ratio_vs_mint(self) -> float:
        x, m = self.phase("xcashu_json"), self.phase("mint_swap")
        return x.rate / m.rate if x and m and m.rate else math.nan

    def overhead_ms(self) -> float:
        """x-cashu p50 less funded-key p50, one request at a time."""
        x, k = self.phase("xcashu_seq"), self.phase("key_seq")
        return x.p(50) - k.p(50) if x and k else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_cost_sats": self.max_cost_sats, "token_sats": self.token_sats,
            "mint_alone_keep_variable_sats": self.keep_variable,
            "premint": {"tokens": self.premint_tokens, "seconds": self.premint_s,
                        "per_token_ms": (self.premint_s / self.premint_tokens * 1000
                                         if self.premint_tokens else None)},
            "phases": {n: p.summary() for n, p in self.phases.items()},
            "xcashu_vs_mint_swaps": self.ratio_vs_mint(),
            "xcashu_overhead_p50_ms_vs_funded_key": self.overhead_ms(),
            "token_key_steady_warmup": self.steady_warmup.as_dict() if self.steady_warmup
            else None,
            "token_key_steady": self.steady.as_dict() if self.steady else None,
            "change_sample": {"checked": self.change_checked, "redeemed": self.change_redeemed,
                              "sats": self.change_sats, "errors": self.change_errors},
            "xcashu_client_200": self.xcashu_200(), "xcashu_client_ok": self.xcashu_ok(),
            "ledger": self.ledger, "error": self.error,
        }


# --- running workers ------------------------------------------------------------------------


def run_phase(procs: Processes, tmp: Path, name: str, job: Job, workers: int,
              mint_log: MintLog | None = None, cpu_of: dict[str, int] | None = None) -> Phase:
    """``job`` split over ``workers`` processes (tokens round robin, connections shared), all
    started on one signal once ready; ``mint_log`` counts the mint's calls in the window,
    ``cpu_of`` names processes whose CPU time to measure over it."""
    workers = max(1, min(workers, job.connections, len(job.tokens)))
    shares = [job.connections // workers + (1 if i < job.connections % workers else 0)
              for i in range(workers)]
    started: list[Proc] = []
    phase = Phase(name, job.connections, requests=len(job.tokens))
    try:
        for i, conns in enumerate(shares):
            spec = tmp / f"xload-{name}-{i}.json"
            part = Job(**{**asdict(job), "tokens": job.tokens[i::workers],
                          "connections": conns,
                          "samples": job.samples if i == 0 else max(0, job.samples // 2)})
            spec.write_text(json.dumps(asdict(part)))
            started.append(procs.start(f"xload-{name}-{i}", [sys.executable, "-m",
                                                              "bench.xload", str(spec)],
                                       cwd=REPO, stdout_pipe=True))
        for proc in started:
            line = read_line(proc, 60)
            if line != "ready":
                raise RuntimeError(f"{proc.name} said {line!r} instead of ready:\n"
                                   + proc.log_tail())
        mark = mint_log.mark() if mint_log else 0
        cpu0 = {k: cpu_seconds(pid) for k, pid in (cpu_of or {}).items()}
        for proc in started:
            os.kill(proc.pid, signal.SIGUSR1)
        parts = []
        for proc in started:
            stdout, _ = proc.popen.communicate(timeout=max(120, len(job.tokens)))
            if proc.popen.returncode != 0:
                raise RuntimeError(f"{proc.name} failed (code {proc.popen.returncode}):\n"
                                   + proc.log_tail())
            parts.append(json.loads(stdout))
        phase.cpu_s = {k: cpu_seconds(pid) - cpu0[k] for k, pid in (cpu_of or {}).items()}
        if mint_log is not None:
            time.sleep(0.3)  # let the mint write its last access lines
            phase.mint_calls = dict(mint_log.calls_since(mark))
    finally:
        for proc in started:
            procs.stop(proc)
    statuses: Counter[str] = Counter()
    for part in parts:
        phase.good += part["good"]
        phase.no_change += part["no_change"]
        phase.socket_errors += part["socket_errors"]
        phase.failures += part["failures"]
        phase.latencies_us += part["latencies_us"]
        phase.ttfb_us += part["ttfb_us"]
        phase.change_samples += part["change_samples"]
        phase.outputs += part["outputs"]
        statuses.update(part["statuses"])
    phase.statuses = dict(statuses)
    phase.failures = phase.failures[:5]
    phase.elapsed_s = (max(p["ended"] for p in parts) - min(p["started"] for p in parts)
                       if parts else 0.0)
    return phase


def max_cost_sats(port: int) -> float:
    resp = httpx.get(f"http://127.0.0.1:{port}/v1/models/{MODEL}", timeout=10)
    resp.raise_for_status()
    pricing = resp.json().get("sats_pricing") or {}
    if "max_cost" not in pricing:
        raise RuntimeError(f"/v1/models/{MODEL} has no sats_pricing.max_cost: {resp.text[:300]}")
    return float(pricing["max_cost"])


def run_cashu(*, procs: Processes, tmp: Path, port: int, funded_key: str | None,
              mint_url: str, mint_log: MintLog, maker: TokenMaker, plan: CashuPlan,
              cpu_of: dict[str, int],
              steady: Callable[[str, float], LoadResult], warmup_s: float, duration_s: float,
              say: Callable[[str], None], result: CashuResult) -> None:
    """Measure the Cashu paths of the proxy on ``port`` into ``result`` (filled as it goes,
    so a failure part-way keeps what was measured)."""
    result.max_cost_sats = max_cost_sats(port)
    # The proxy reserves the published maximum for an x-cashu request and shapes its swap's
    # outputs so that any change up to it is a subset (checked against its ledger afterwards).
    result.keep_variable = keep_variable = math.ceil(result.max_cost_sats)
    result.token_sats = amount = keep_variable + 3
    need = plan.tokens_needed
    say(f"  cashu: pre-minting {need} tokens of {amount} sats (max cost "
        f"{result.max_cost_sats:g} sats) + one of {STEADY_TOKEN_SATS} sats")
    t0 = time.perf_counter()
    pool = maker.tokens(amount, need)
    steady_token = maker.tokens(STEADY_TOKEN_SATS, 1)[0]
    result.premint_s = time.perf_counter() - t0
    result.premint_tokens = need + 1
    say(f"  cashu: pre-minted in {result.premint_s:.1f} s "
        f"({result.premint_s / (need + 1) * 1000:.1f} ms a token)")

    def take(n: int) -> list[str]:
        out, pool[:] = pool[:n], pool[n:]
        return out

    def proxy(name: str, mode: str, tokens: list[str], connections: int,
              stream: bool = False) -> Phase:
        phase = run_phase(procs, tmp, name, Job(mode=mode, tokens=tokens,
                                                connections=connections, port=port,
                                                stream=stream),
                          plan.workers if connections > 1 else 1, mint_log, cpu_of)
        result.phases[name] = phase
        return phase

    def mint(name: str, tokens: list[str], connections: int) -> Phase:
        phase = run_phase(procs, tmp, name, Job(mode="swap", tokens=tokens,
                                                connections=connections, mint_url=mint_url,
                                                keep_variable=keep_variable),
                          plan.workers if connections > 1 else 1, None,
                          {"mint": cpu_of["mint"]})
        result.phases[name] = phase
        return phase

    c, seq = plan.connections, plan.sequential
    say(f"  cashu: x-cashu warm-up ({plan.warmup} requests), then {seq} requests one at a "
        "time with a funded key, x-cashu and at the mint alone")
    proxy("xcashu_warmup", "xcashu", take(plan.warmup), c)
    if funded_key:
        proxy("key_seq", "bearer", [funded_key] * seq, 1)
    mint("mint_swap_seq", take(seq), 1)
    proxy("xcashu_seq", "xcashu", take(seq), 1)
    say(f"  cashu: {plan.requests} swaps at the mint alone, then {plan.requests} x-cashu "
        f"requests, {c} connections")
    mint("mint_swap", take(plan.requests), c)
    proxy("xcashu_json", "xcashu", take(plan.requests), c)
    say(f"  cashu: {plan.streams} x-cashu streams, {c} connections")
    proxy("xcashu_stream", "xcashu", take(plan.streams), c, stream=True)
    say(f"  cashu: token as key: {seq} first uses one at a time, then wrk reusing one")
    proxy("token_key_first", "bearer", take(seq), 1)
    first = run_phase(procs, tmp, "token_key_reuse_first",
                      Job(mode="bearer", tokens=[steady_token], connections=1, port=port), 1,
                      mint_log)
    result.phases[first.name] = first
    if first.good != 1:
        raise RuntimeError(f"the {STEADY_TOKEN_SATS}-sat token was refused as a key: "
                           f"{first.failures}")
    result.steady_warmup = steady(steady_token, warmup_s)
    result.steady = steady(steady_token, duration_s)
    # Change handed back must be money: redeem a sample at the mint.
    samples = [t for n in ("xcashu_json", "xcashu_stream", "xcashu_seq")
               if (p := result.phase(n)) for t in p.change_samples][:10]
    for token in samples:
        result.change_checked += 1
        try:
            got = maker.receive(token)
            result.change_sats.append(got)
            if got > 0:
                result.change_redeemed += 1
        except Exception as e:
            result.change_errors.append(f"{type(e).__name__}: {e}"[:300])


# --- after the proxy stopped ----------------------------------------------------------------


def ledger_crosscheck(data_dir: Path, env: dict[str, str], routstr: str) -> dict[str, Any]:
    """What the proxy's own books say of the Cashu payments, and its audit."""
    out: dict[str, Any] = {}
    db = data_dir / "routstr.sqlite"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT kind, COUNT(*), SUM(change IS NOT NULL), SUM(msat), "
                                "SUM(change_msat) FROM payments GROUP BY kind").fetchall()
            out["payments"] = {k: {"count": n, "with_change": int(c or 0),
                                   "credited_msat": int(m or 0),
                                   "change_msat": int(ch or 0)} for k, n, c, m, ch in rows}
            out["proofs_by_state"] = dict(conn.execute(
                "SELECT state, COUNT(*) FROM proofs GROUP BY state").fetchall())
            # Every proof the proxy holds or held came from a redeem (the bench makes no
            # refunds): a token used as a key is swapped into powers of two of its net amount,
            # so what is left is the x-cashu swaps' outputs.
            proofs = conn.execute("SELECT COUNT(*) FROM proofs").fetchone()[0]
            others = sum(bin(amount - fee).count("1") for amount, fee in conn.execute(
                "SELECT amount, fee FROM payments WHERE kind != 'xcashu'"))
            n = out["payments"].get("xcashu", {}).get("count", 0)
            out["xcashu_outputs_per_swap"] = (proofs - others) / n if n else None
            out["xcashu_reserved_msat"] = sorted(r for (r,) in conn.execute(
                "SELECT DISTINCT e.reserved_msat FROM ledger_entries e JOIN payments p "
                "ON e.key_hash = p.key_hash WHERE p.kind = 'xcashu' AND e.kind = 'reserve'"))
            out["open_reservations"] = conn.execute(
                "SELECT COUNT(*) FROM reservations").fetchone()[0]
    except sqlite3.Error as e:
        out["db_error"] = f"{type(e).__name__}: {e}"
    try:
        check = subprocess.run([routstr, "ledger", "check", "--json"], env=env, cwd=data_dir,
                               capture_output=True, text=True, timeout=120)
        out["ledger_check_exit"] = check.returncode
        try:
            out["ledger_check"] = json.loads(check.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out["ledger_check"] = (check.stdout + check.stderr).strip()[:500]
    except (OSError, subprocess.TimeoutExpired) as e:
        out["ledger_check_exit"] = None
        out["ledger_check"] = f"{type(e).__name__}: {e}"
    return out


def problems(label: str, r: CashuResult) -> list[str]:
    out = []
    if r.error:
        out.append(f"{label} cashu: {r.error}")
    for name, p in r.phases.items():
        if p.good != p.requests:
            out.append(f"{label} cashu {name}: {p.requests - p.good} of {p.requests} failed "
                       f"(statuses {p.statuses}, no change {p.no_change}); first: "
                       f"{p.failures[0][:200] if p.failures else '-'}")
    for name in ("xcashu_seq", "xcashu_json", "xcashu_stream"):
        x = r.phases.get(name)
        if x is not None and x.mint_calls is not None and x.requests:
            calls, swaps = x.mint_calls_per_request, x.swaps_per_request
            if calls != 1 or swaps != 1:
                out.append(f"{label} cashu {name}: {calls:.3f} mint calls per request "
                           f"({swaps:.3f} swaps); the design goal is exactly 1: "
                           f"{x.mint_calls}")
    ratio = r.ratio_vs_mint()
    if not math.isnan(ratio) and ratio < 0.8:
        out.append(f"{label} cashu: x-cashu req/s is {ratio:.2f} of the mint's swaps/s "
                   "(target ≥ 0.8)")
    for load in (r.steady,):
        if load is not None and (load.bad_status or load.socket_errors):
            out.append(f"{label} cashu token as key (wrk): {load.bad_status} non-2xx, "
                       f"{load.socket_errors} socket errors")
    if r.change_checked and r.change_redeemed != r.change_checked:
        out.append(f"{label} cashu: only {r.change_redeemed} of {r.change_checked} change "
                   f"tokens redeemed at the mint: {r.change_errors[:2]}")
    led = r.ledger
    if led:
        if "db_error" in led:
            out.append(f"{label} cashu: reading the ledger failed: {led['db_error']}")
        paid = (led.get("payments") or {}).get("xcashu", {}).get("count", 0)
        if "db_error" not in led and paid != r.xcashu_200():
            out.append(f"{label} cashu: the ledger has {paid} x-cashu payments but the client "
                       f"got {r.xcashu_200()} answers with 200")
        keys = (led.get("payments") or {}).get("key", {}).get("count", 0)
        expected = sum(p.good for n, p in r.phases.items() if n.startswith("token_key"))
        if "db_error" not in led and keys != expected:
            out.append(f"{label} cashu: the ledger has {keys} tokens redeemed as keys; the "
                       f"client used {expected} successfully")
        reserved = led.get("xcashu_reserved_msat") or []
        if any(-(-msat // 1000) != r.keep_variable for msat in reserved):
            out.append(f"{label} cashu: the proxy reserved {reserved} msat per x-cashu request, "
                       f"but the mint-alone swaps were shaped for {r.keep_variable} sats")
        held = (led.get("proofs_by_state") or {}).get("held", 0)
        if held:
            out.append(f"{label} cashu: {held} proofs still 'held' after the run")
        if led.get("ledger_check_exit") != 0:
            out.append(f"{label} cashu: routstr ledger check exited "
                       f"{led.get('ledger_check_exit')}: {str(led.get('ledger_check'))[:300]}")
    return out
