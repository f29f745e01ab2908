"""RSS soak: ``routstr serve`` with a funded key answers 100,000 JSON chat completions (wrk
runs of a few seconds each, back to back, until that many answers are counted) while its RSS
(VmRSS in /proc/PID/status) is sampled about every 10,000 answers.

Targets: RSS under 150 MiB, and flat after the warm-up (the first sample interval): every
later sample within ±10 % of the first of them. ``--soak-trace`` runs the proxy under
``python -X tracemalloc`` (``bench/memserve.py``): at each sample it also writes a tracemalloc
snapshot and the collector's live objects by type, and the result lists what grew between the
first sample after the warm-up and the last, by file:line and by type.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    REPO,
    create_key,
    flagged_lines,
    fmt,
    ledger_state,
    preflight,
    proxy_env,
    table,
)
from .load import LoadResult, WrkRun
from .procs import Proc, Processes, free_port, memory_kb, wait_port

__all__ = ["SoakResult", "problems", "render", "run_soak"]

RSS_LIMIT_MIB = 150.0
FLAT = 0.10
WAL_LIMIT_MIB = 512.0  # a WAL this big means checkpoints are not keeping up
LoadFn = Callable[[int, str, float, int], LoadResult]  # port, key, seconds, connections


@dataclass(slots=True)
class Sample:
    requests: int  # 2xx answers so far
    rss_kb: int
    hwm_kb: int
    elapsed_s: float
    rps: float | None = None  # of the wrk run that ended here
    p99_ms: float | None = None
    gc_objects: int | None = None  # probed: live objects the collector tracks
    traced_kb: float | None = None  # --soak-trace: memory tracemalloc sees
    wal_kb: float | None = None  # the SQLite ledger's -wal file (disk)
    shm_kb: float | None = None  # its -shm wal-index (mapped: counts in RSS as RssFile)
    native: dict[str, int] | None = None  # probed: glibc heap, SQLite, kinds of RSS


@dataclass(slots=True)
class SoakResult:
    target: int
    every: int
    connections: int
    trace_frames: int = 0
    probed: bool = False
    continuous: bool = False  # one wrk run throughout (else runs back to back)
    pid: int | None = None
    preflight: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    runs: list[LoadResult] = field(default_factory=list)
    final_memory_kb: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    log_flagged: list[str] = field(default_factory=list)
    ledger: dict[str, Any] | None = None
    growth_by_line: list[dict[str, Any]] = field(default_factory=list)
    growth_tracebacks: list[dict[str, Any]] = field(default_factory=list)
    growth_by_type: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def client_ok(self) -> int:
        return (1 if self.preflight.get("ok") else 0) + sum(
            r.requests - r.bad_status for r in self.runs)

    def steady(self) -> list[Sample]:
        """The samples after the warm-up: from the first one at ``every`` answers or more."""
        return [s for s in self.samples if s.requests >= self.every]

    def stats(self) -> dict[str, Any]:
        steady = self.steady()
        if not steady:
            return {}
        rss = [s.rss_kb for s in steady]
        first = rss[0]
        n = len(steady)
        xs = [s.requests for s in steady]
        mx = sum(xs) / n
        my = sum(rss) / n
        var = sum((x - mx) ** 2 for x in xs)
        slope = (sum((x - mx) * (y - my) for x, y in zip(xs, rss, strict=True)) / var
                 if var else math.nan)
        peak = max(s.hwm_kb for s in self.samples)
        max_dev = max(abs(x - first) for x in rss) / first
        # Where RSS would cross the limit if it kept growing as it did here.
        reach = (steady[-1].requests + (RSS_LIMIT_MIB * 1024 - rss[-1]) / slope
                 if slope > 0 and rss[-1] < RSS_LIMIT_MIB * 1024 else None)
        return {
            "first_kb": first, "last_kb": rss[-1], "min_kb": min(rss), "max_kb": max(rss),
            "spread": (max(rss) - min(rss)) / first, "max_deviation": max_dev,
            "drift": (rss[-1] - first) / first,
            "slope_kb_per_10k": slope * 10_000, "peak_hwm_kb": peak,
            "under_limit": max(max(rss), peak) / 1024 < RSS_LIMIT_MIB,
            "flat": max_dev <= FLAT, "answers_to_limit_at_slope": reach,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "target_requests": self.target, "sample_every": self.every,
            "connections": self.connections, "trace_frames": self.trace_frames,
            "probed": self.probed, "continuous": self.continuous,
            "pid": self.pid, "preflight": self.preflight,
            "samples": [asdict(s) for s in self.samples],
            "runs": [r.as_dict() for r in self.runs], "stats": self.stats(),
            "client_2xx_total": self.client_ok(), "final_memory_kb": self.final_memory_kb,
            "exit_code": self.exit_code, "log_flagged": self.log_flagged[:20],
            "log_flagged_count": len(self.log_flagged), "ledger": self.ledger,
            "growth_by_line": self.growth_by_line,
            "growth_tracebacks": self.growth_tracebacks,
            "growth_by_type": self.growth_by_type, "error": self.error,
        }


class _Probe:
    """Asks a ``bench.memserve`` proxy for a snapshot and waits for it."""

    def __init__(self, proc: Proc, folder: Path) -> None:
        self.proc, self.folder, self.n = proc, folder, 0

    def take(self, timeout: float = 120.0) -> dict[str, Any]:
        self.n += 1
        os.kill(self.proc.pid, signal.SIGUSR1)
        done = self.folder / f"done-{self.n}"
        deadline = time.monotonic() + timeout
        while not done.exists():
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError(f"no memory probe {self.n} from the proxy:\n"
                                   + self.proc.log_tail())
            time.sleep(0.1)
        info: dict[str, Any] = json.loads((self.folder / f"gc-{self.n}.json").read_text())
        return info


def run_soak(procs: Processes, tmp: Path, upstream_url: str, models: Path,
             serve_prefix: list[str], run_load: LoadFn, say: Callable[[str], None], *,
             requests: int, every: int, connections: int, wrk: str | None = None,
             threads: int = 1, probe: bool = False, trace_frames: int = 0) -> SoakResult:
    probe = probe or trace_frames > 0
    result = SoakResult(requests, every, connections, trace_frames, probe)
    data_dir = tmp / "soak"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = proxy_env(upstream_url, data_dir, models)
    port = free_port()
    probes = data_dir / "probes"
    args = ["--listen-host", "127.0.0.1", "--listen-port", str(port), "--quiet"]
    if probe:
        cmd = [sys.executable, *(["-X", f"tracemalloc={trace_frames}"] if trace_frames
                                 else []), "-m", "bench.memserve", str(probes), "serve", *args]
        env["PYTHONPATH"] = str(REPO)
    else:
        cmd = [*serve_prefix, *args]
    proc: Proc | None = None
    key = ""
    gc_counts: dict[int, dict[str, Any]] = {}  # sample index -> probe
    try:
        key = create_key(env, data_dir)
        proc = procs.start("soak", cmd, env=env, cwd=data_dir)
        wait_port(proc, port, timeout=60)
        result.pid = proc.pid
        say(f"  soak: routstr serve on port {port} (pid {proc.pid})"
            + (f", tracemalloc {trace_frames} frames" if trace_frames else "")
            + (", probed (bench.memserve)" if probe else "")
            + f"; {requests:,} answers, RSS every {every:,}")
        prober = _Probe(proc, probes) if probe else None
        result.preflight = preflight(port, key)
        if not result.preflight.get("ok"):
            raise RuntimeError(f"the check request got {result.preflight.get('status')}: "
                               f"{result.preflight.get('body', '')[:300]}")
        t0 = time.monotonic()
        db = data_dir / "routstr.sqlite"

        def sample(count: int, run: LoadResult | None = None) -> None:
            mem = memory_kb(proc.pid) if proc is not None else {}
            now = time.monotonic() - t0
            last = result.samples[-1] if result.samples else None
            rps = (run.rps if run else (count - last.requests) / (now - last.elapsed_s)
                   if last is not None and now > last.elapsed_s else None)
            s = Sample(count, mem.get("VmRSS", 0), mem.get("VmHWM", 0), now, rps,
                       run.p99_ms if run else None, wal_kb=_size_kb(db, "-wal"),
                       shm_kb=_size_kb(db, "-shm"))
            if prober is not None:
                info = prober.take()
                gc_counts[len(result.samples)] = info
                s.gc_objects = info.get("objects")
                s.native = info.get("native")
                s.traced_kb = (info["traced_bytes"] / 1024 if info.get("traced_bytes")
                               is not None else None)
            result.samples.append(s)
            say(f"  {s.requests:>8,} answers: RSS {s.rss_kb / 1024:6.1f} MiB"
                + (f", {s.rps:,.0f} req/s" if s.rps else "")
                + (f", WAL {s.wal_kb / 1024:,.0f} MiB" if s.wal_kb is not None else "")
                + (f", {s.gc_objects:,} gc objects" if s.gc_objects is not None else ""))

        sample(result.client_ok())
        if wrk:
            # One uninterrupted run, as sustained traffic is: the count comes from the ledger
            # (the key's billed requests) while wrk runs, and wrk stops at the target.
            result.continuous = True
            run = WrkRun(wrk, port, key, tmp, connections=connections, threads=threads,
                         max_duration=max(600.0, requests / 50))
            try:
                next_at = every
                while run.alive():
                    time.sleep(0.2)
                    billed = _billed(db, key)
                    if billed >= next_at or billed >= requests:
                        sample(billed)
                        while next_at <= billed:
                            next_at += every
                    if billed >= requests:
                        break
            finally:
                result.runs.append(run.stop())
        else:
            # The Python generator: fixed-duration runs back to back, a sample after each
            # that crossed the next mark (brief idle gaps between runs).
            next_at = every
            rate = 0.0
            while result.client_ok() < requests:
                left = min(next_at, requests) - result.client_ok()
                secs = min(60.0, max(1.0, round(left / rate))) if rate else 5.0
                chunk = run_load(port, key, secs, connections)
                result.runs.append(chunk)
                rate = chunk.rps or rate
                if chunk.requests == 0 or chunk.socket_errors > chunk.requests:
                    raise RuntimeError(f"the load stalled: {chunk.requests} answers, "
                                       f"{chunk.socket_errors} socket errors in {secs:g} s")
                if result.client_ok() >= next_at or result.client_ok() >= requests:
                    sample(result.client_ok(), chunk)
                    while next_at <= result.client_ok():
                        next_at += every
        time.sleep(0.5)  # the clients' connections close before the proxy stops
        result.final_memory_kb = memory_kb(proc.pid)
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        say(f"  ERROR (soak): {result.error}")
    finally:
        if proc is not None:
            result.exit_code = procs.stop(proc)
            result.log_flagged = flagged_lines(proc)
    if key:
        result.ledger = ledger_state(key, env, data_dir)
    if probe and len(result.steady()) >= 2:
        first = result.samples.index(result.steady()[0])
        last = len(result.samples) - 1
        try:
            _growth(result, probes, first + 1, last + 1, gc_counts.get(first),
                    gc_counts.get(last), bool(trace_frames))
        except Exception as e:
            result.error = (result.error or "") + f" (reading the snapshots: {e})"
    return result


def _size_kb(db: Path, suffix: str) -> float | None:
    try:
        return os.stat(f"{db}{suffix}").st_size / 1024
    except OSError:
        return None


def _billed(db: Path, key: str) -> int:
    """The key's billed requests so far, read from the live ledger (a brief read)."""
    from routstr_addon.ledger import hash_key

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT total_requests FROM api_keys WHERE key_hash = ?",
                           (hash_key(key),)).fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def _short(path: str) -> str:
    for root in ("site-packages" + os.sep, str(REPO) + os.sep, "python3.12" + os.sep):
        at = path.find(root)
        if at >= 0:
            return path[at + len(root):]
    return path


def _growth(result: SoakResult, folder: Path, first: int, last: int,
            gc_first: dict[str, Any] | None, gc_last: dict[str, Any] | None,
            traced: bool) -> None:
    """What grew between two probes: by object type, and traced, by line and by traceback."""
    if gc_first and gc_last:
        before, after = gc_first["by_type"], gc_last["by_type"]
        diffs = sorted(((after.get(t, 0) - before.get(t, 0), t) for t in set(before) |
                        set(after)), reverse=True)
        result.growth_by_type = [{"type": t, "diff": d, "count": after.get(t, 0)}
                                 for d, t in diffs[:15] if d > 0]
    if not traced:
        return
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
              tracemalloc.Filter(False, "<unknown>")]
    a = tracemalloc.Snapshot.load(str(folder / f"snap-{first}.pickle")).filter_traces(ignore)
    b = tracemalloc.Snapshot.load(str(folder / f"snap-{last}.pickle")).filter_traces(ignore)
    grew = sorted(b.compare_to(a, "lineno"), key=lambda st: st.size_diff, reverse=True)
    for stat in [st for st in grew if st.size_diff > 0][:15]:
        frame = stat.traceback[0]
        result.growth_by_line.append({
            "where": f"{_short(frame.filename)}:{frame.lineno}",
            "size_diff_kb": stat.size_diff / 1024, "count_diff": stat.count_diff,
            "size_kb": stat.size / 1024, "count": stat.count})
    grew = sorted(b.compare_to(a, "traceback"), key=lambda st: st.size_diff, reverse=True)
    for stat in [st for st in grew if st.size_diff > 0][:3]:
        result.growth_tracebacks.append({
            "size_diff_kb": stat.size_diff / 1024, "count_diff": stat.count_diff,
            "frames": [f"{_short(f.filename)}:{f.lineno}" for f in stat.traceback]})


def render(result: SoakResult, generator: str) -> str:
    st = result.stats()
    rows = []
    steady_from = result.steady()[0].requests if result.steady() else None
    for s in result.samples:
        dev = (f"{(s.rss_kb - st['first_kb']) / st['first_kb'] * 100:+.1f} %"
               if st and steady_from is not None and s.requests >= steady_from else "warm-up")
        rows.append([fmt(s.requests), fmt(s.rss_kb / 1024, 1), fmt(s.hwm_kb / 1024, 1), dev,
                     fmt(s.elapsed_s, 0), fmt(s.rps, 0) if s.rps else "-",
                     fmt(s.p99_ms) if s.p99_ms else "-",
                     fmt(s.wal_kb / 1024, 0) if s.wal_kb is not None else "-",
                     fmt(s.shm_kb / 1024, 1) if s.shm_kb is not None else "-"]
                    + ([fmt(s.gc_objects), fmt(s.traced_kb / 1024 if s.traced_kb else None, 1)]
                       if result.trace_frames else []))
    headers = ["answers", "RSS MiB", "peak MiB", "vs first", "at s", "req/s", "p99 ms",
               "WAL MiB", "shm MiB"]
    if result.trace_frames:
        headers += ["gc objects", "traced MiB"]
    title = (f"RSS soak: routstr serve, funded-key JSON chat, {result.target:,} answers "
             f"({generator}, {result.connections} connections"
             + (", one uninterrupted run; answers = billed so far, from the ledger"
                if result.continuous else ", runs back to back")
             + (f", under tracemalloc ({result.trace_frames} frames)" if result.trace_frames
                else "") + ")")
    parts = [table(title, headers, rows) if rows else title + "\n  (no samples)"]
    if st:
        parts.append(
            f"  after warm-up (from {steady_from:,} answers): first {st['first_kb'] / 1024:.1f}"
            f" MiB, min {st['min_kb'] / 1024:.1f}, max {st['max_kb'] / 1024:.1f}, last "
            f"{st['last_kb'] / 1024:.1f}; spread (max-min)/first {st['spread'] * 100:.1f} %, "
            f"drift {st['drift'] * 100:+.1f} %,\n  slope {st['slope_kb_per_10k']:+.0f} KiB "
            f"per 10k answers, peak RSS {st['peak_hwm_kb'] / 1024:.1f} MiB. Targets: RSS < "
            f"{RSS_LIMIT_MIB:.0f} MiB: {'ok' if st['under_limit'] else 'FAIL'}; flat "
            f"±{FLAT * 100:.0f} %: {'ok' if st['flat'] else 'FAIL'}."
            + (f"\n  At that slope RSS would reach {RSS_LIMIT_MIB:.0f} MiB after about "
               f"{st['answers_to_limit_at_slope']:,.0f} answers."
               if st.get("answers_to_limit_at_slope") else "")
            + (f"\n  After the load (idle, 0.5 s later): RSS "
               f"{result.final_memory_kb['VmRSS'] / 1024:.1f} MiB."
               if "VmRSS" in result.final_memory_kb else "")
            + ("\n  Under tracemalloc RSS is inflated (its own records, and the snapshots "
               "taken at each sample,\n  after the RSS reading): watch gc objects and traced "
               "MiB instead." if result.trace_frames else ""))
    probed = [s for s in result.samples if s.native]
    if probed:
        def mib(s: Sample, name: str, unit: int = 1024 * 1024) -> str:
            value = (s.native or {}).get(name)
            return fmt(value / unit, 1) if value is not None else "-"

        parts.append(table(
            "  The proxy's memory by kind at each sample (bench.memserve probe; MiB)",
            ["answers", "RssAnon", "RssFile", "RssShmem", "malloc used", "malloc free",
             "SQLite", "gc objects", "threads", "fds"],
            [[fmt(s.requests), mib(s, "RssAnon", 1024), mib(s, "RssFile", 1024),
              mib(s, "RssShmem", 1024), mib(s, "malloc_in_use"), mib(s, "malloc_free"),
              mib(s, "sqlite_memory_used"), fmt(s.gc_objects),
              fmt((s.native or {}).get("Threads")), fmt((s.native or {}).get("fds"))]
             for s in probed]))
        parts.append("  malloc used/free: glibc's heap (mallinfo2: uordblks + hblkhd / "
                     "fordblks); SQLite: sqlite3_memory_used().\n  Python objects live in "
                     "pymalloc arenas (their own mmaps, in RssAnon, not in malloc used).")
    led = result.ledger or {}
    parts.append(f"  client 2xx {result.client_ok():,}, ledger billed "
                 f"{fmt(led.get('total_requests'))}, open reservations "
                 f"{fmt(led.get('open_reservations'))}, exit {result.exit_code}, "
                 f"{len(result.log_flagged)} log line(s) flagged.")
    if result.growth_by_line:
        parts.append(table(
            "  What grew between the first sample after warm-up and the last (tracemalloc, "
            "by line)",
            ["where", "+KiB", "+count", "KiB now", "count now"],
            [[g["where"], fmt(g["size_diff_kb"], 1), fmt(g["count_diff"]), fmt(g["size_kb"], 1),
              fmt(g["count"])] for g in result.growth_by_line]))
        for i, tb in enumerate(result.growth_tracebacks, 1):
            parts.append(f"  #{i} by traceback: {tb['size_diff_kb']:+.1f} KiB, "
                         f"{tb['count_diff']:+,} blocks, most recent call last:\n    "
                         + "\n    ".join(tb["frames"]))
    if result.growth_by_type:
        parts.append(table("  Live objects by type (gc), growth over the same interval",
                           ["type", "+count", "count now"],
                           [[g["type"], fmt(g["diff"]), fmt(g["count"])]
                            for g in result.growth_by_type]))
    if result.error:
        parts.append(f"  ERROR: {result.error}")
    return "\n".join(parts)


def problems(result: SoakResult) -> list[str]:
    out = []
    if result.error:
        out.append(f"soak: {result.error}")
    st = result.stats()
    if st and not st["under_limit"] and not result.trace_frames:  # tracemalloc's own cost
        out.append(f"soak: RSS reached {max(st['max_kb'], st['peak_hwm_kb']) / 1024:.1f} MiB "
                   f"(target < {RSS_LIMIT_MIB:.0f})")
    if st and not st["flat"]:
        out.append(f"soak: RSS not flat after warm-up: {st['max_deviation'] * 100:.1f} % from "
                   f"the first sample (target ±{FLAT * 100:.0f} %), slope "
                   f"{st['slope_kb_per_10k']:+.0f} KiB per 10k answers"
                   + ("" if result.trace_frames else "; rerun with --soak-trace"))
    wal = max((s.wal_kb or 0.0 for s in result.samples), default=0.0) / 1024
    if wal > WAL_LIMIT_MIB:
        out.append(f"soak: the SQLite ledger's WAL grew to {wal:,.0f} MiB over "
                   f"{result.client_ok():,} requests ({wal * 1024 / max(1, result.client_ok()):.0f}"
                   " KiB each): the checkpoints do not keep it bounded under sustained load")
    bad = sum(r.bad_status for r in result.runs)
    errs = sum(r.socket_errors for r in result.runs)
    if bad or errs:
        out.append(f"soak: {bad} non-2xx answers and {errs} socket errors")
    if result.exit_code not in (None, 0):
        out.append(f"soak: the proxy exited with code {result.exit_code} when stopped")
    if result.log_flagged:
        out.append(f"soak: {len(result.log_flagged)} log line(s) look like errors; first: "
                   f"{result.log_flagged[0][:200]}")
    led = result.ledger or {}
    if "error" in led:
        out.append(f"soak: reading the ledger failed: {led['error']}")
    elif result.ledger is not None:
        extra = int(led.get("total_requests") or 0) - result.client_ok()
        if not 0 <= extra <= result.connections * max(1, len(result.runs)):
            out.append(f"soak: the ledger billed {led.get('total_requests')} requests, the "
                       f"client counted {result.client_ok()} 2xx answers")
        if led.get("open_reservations"):
            out.append(f"soak: {led['open_reservations']} reservation(s) still open")
    return out
