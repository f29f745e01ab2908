"""``python -m bench``: start everything on loopback, measure, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from routstr_addon.dev.localmint import LocalMint

from . import cashu, scaleout, soak
from .cashu import CashuPlan, CashuResult, MintLog, TokenMaker
from .common import (
    MODELS,
    REPO,
    create_key,
    flagged_lines,
    fmt,
    ledger_state,
    preflight,
    proxy_env,
    table,
    tool,
)
from .hooks import TARGET_US
from .hooks import render as render_hooks
from .load import LoadResult, run_python_load, run_wrk, wrk_version
from .procs import (
    Proc,
    Processes,
    busy_seconds,
    cpu_seconds,
    free_port,
    memory_kb,
    own_and_children_seconds,
    read_line,
    wait_port,
)
from .scaleout import ScaleResult, run_scaleout
from .soak import SoakResult, run_soak
from .stream import StreamResult, run_streams

ADDON = REPO / "routstr_addon" / "addon.py"

TARGETS = ("direct", "mitmdump", "serve", "addon")
LABELS = {
    "direct": "direct upstream",
    "mitmdump": "bare mitmdump",
    "serve": "proxy: routstr serve",
    "addon": "proxy: mitmdump -s addon",
}
PROXIES = ("serve", "addon")
PHASES = ("scaleout", "soak", "hooks")


@dataclass(slots=True)
class CpuWindow:
    """CPU used during the measured load, to judge figures on a shared machine."""

    wall_s: float
    target_s: float  # the process measured (the upstream itself for "direct")
    upstream_s: float  # the upstream, when it is not the target
    generator_s: float  # this process and its reaped children (wrk or the load workers)
    busy_s: float  # all cores, everything

    @classmethod
    def measure(cls, target_pid: int, upstream_pid: int) -> tuple[float, ...]:
        return (time.perf_counter(), cpu_seconds(target_pid),
                cpu_seconds(upstream_pid) if upstream_pid != target_pid else 0.0,
                own_and_children_seconds(), busy_seconds())

    @classmethod
    def between(cls, before: tuple[float, ...], after: tuple[float, ...]) -> CpuWindow:
        return cls(*(b - a for a, b in zip(before, after, strict=True)))

    def per_request_us(self, requests: int) -> float:
        return self.target_s / requests * 1e6 if requests else math.nan

    @property
    def foreign_cores(self) -> float:
        """Cores kept busy by processes outside the benchmark, on average."""
        ours = self.target_s + self.upstream_s + self.generator_s
        return max(0.0, self.busy_s - ours) / self.wall_s if self.wall_s else math.nan

    def as_dict(self, requests: int) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "target_cpu_s": self.target_s,
                "upstream_cpu_s": self.upstream_s, "generator_cpu_s": self.generator_s,
                "all_cores_busy_s": self.busy_s,
                "target_cpu_us_per_request": self.per_request_us(requests),
                "foreign_cores": self.foreign_cores}


@dataclass(slots=True)
class Outcome:
    """Everything measured for one target."""

    name: str
    port: int
    pid: int | None = None
    preflight: dict[str, Any] = field(default_factory=dict)
    warmup: LoadResult | None = None
    load: LoadResult | None = None
    cpu: CpuWindow | None = None
    stream: StreamResult | None = None
    memory_kb: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    ledger: dict[str, Any] | None = None
    log_flagged: list[str] = field(default_factory=list)
    log_flagged_count: int = 0
    cashu: CashuResult | None = None
    error: str | None = None

    def client_ok(self) -> int:
        """Answers the client counted as successful (2xx), all phases."""
        n = 1 if self.preflight.get("ok") else 0
        for r in (self.warmup, self.load):
            if r is not None:
                n += r.requests - r.bad_status
        if self.stream is not None:
            n += self.stream.warm_ok + self.stream.ok
        return n

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": LABELS[self.name], "port": self.port, "pid": self.pid,
            "preflight": self.preflight,
            "warmup": self.warmup.as_dict() if self.warmup else None,
            "load": self.load.as_dict() if self.load else None,
            "cpu": self.cpu.as_dict(self.load.requests) if self.cpu and self.load else None,
            "stream": self.stream.summary() if self.stream else None,
            "memory_kb": self.memory_kb, "exit_code": self.exit_code,
            "client_2xx_total": self.client_ok(), "ledger": self.ledger,
            "log_flagged_count": self.log_flagged_count, "log_flagged": self.log_flagged,
            "cashu": self.cashu.as_dict() if self.cashu else None, "error": self.error,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Start the echo upstream, bare mitmdump and the proxy (routstr serve, and "
                    "mitmdump -s routstr_addon/addon.py) on 127.0.0.1, load each the same way "
                    "and print req/s, latencies, streaming time to first byte, memory and "
                    "whether every answer was a paid 2xx; then, against a local Nutshell "
                    "FakeWallet mint, the Cashu paths: x-cashu (JSON, streaming), tokens as "
                    "keys, and the mint's own swap rate as their ceiling. Then the phases: "
                    "scaleout (1 and 2 routstr serve processes on one PostgreSQL ledger, and "
                    "1 on SQLite), hooks (the addon's own CPU per request, in process) and, "
                    "with --soak, soak (RSS over 100,000 requests).",
        epilog="Load comes from wrk when it is installed (apt-get install -y wrk), else from "
               "Python worker processes. Results go to bench/results/<time>.json.")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of measured load per target (default 10)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of unmeasured load before it (default 2)")
    p.add_argument("--connections", type=int, default=10,
                   help="concurrent keep-alive connections (default 10)")
    p.add_argument("--threads", type=int, default=1,
                   help="wrk threads (default 1: leaves the cores to what is measured)")
    p.add_argument("--only", action="append", default=[], metavar="TARGET",
                   help=f"measure only these targets and phases ({', '.join(TARGETS)}, "
                        f"{', '.join(PHASES)}); repeat or separate with commas")
    p.add_argument("--stream-requests", type=int, default=300,
                   help="measured streaming requests per target (default 300)")
    p.add_argument("--stream-connections", type=int, default=4,
                   help="concurrent streaming connections (default 4)")
    p.add_argument("--no-stream", action="store_true", help="skip the streaming measurement")
    p.add_argument("--no-xcashu", action="store_true",
                   help="skip the Cashu measurements (x-cashu, token as key, the mint's swaps)")
    p.add_argument("--xcashu-requests", type=int, default=1000, metavar="N",
                   help="x-cashu requests at concurrency, and as many swaps at the mint alone "
                        "(default 1000); one fresh token each, minted before the timing")
    p.add_argument("--xcashu-connections", type=int, default=8, metavar="C",
                   help="concurrent connections for x-cashu and the mint's swaps (default 8)")
    p.add_argument("--scaleout-connections", type=int, default=16, metavar="C",
                   help="wrk connections for the scale-out phase (default 16)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="on a shared machine: before each scale-out setup, wait up to S "
                        "seconds for a second with under 0.25 cores busy (default 0)")
    p.add_argument("--soak", action="store_true",
                   help="also run the RSS soak (not in the default run; about 2 minutes)")
    p.add_argument("--soak-requests", type=int, default=100_000, metavar="N",
                   help="answers in the soak (default 100000)")
    p.add_argument("--soak-every", type=int, default=10_000, metavar="N",
                   help="answers between RSS samples (default 10000)")
    p.add_argument("--soak-probe", action="store_true",
                   help="run the soak's proxy under bench/memserve.py: at each sample also "
                        "its live objects by type, glibc's heap, SQLite's memory and RSS by "
                        "kind")
    p.add_argument("--soak-trace", type=int, nargs="?", const=5, default=0, metavar="FRAMES",
                   help="run the soak's proxy under tracemalloc (FRAMES deep, default 5) and "
                        "list what grew by file:line and by object type (about 8x slower: "
                        "use fewer --soak-requests)")
    p.add_argument("--hooks-requests", type=int, default=5000, metavar="N",
                   help="pre-built flows per round in the hooks phase (default 5000)")
    p.add_argument("--hooks-rounds", type=int, default=5, metavar="R",
                   help="timed rounds in the hooks phase (default 5)")
    p.add_argument("--providers", type=int, default=1, metavar="N",
                   help="the proxies forward to N providers of the bench's model (all the "
                        "echo upstream, same price), so failover between them is armed "
                        "(default 1: UPSTREAM_BASE_URL alone)")
    p.add_argument("--python-load", action="store_true",
                   help="use the Python load generator even when wrk is installed")
    p.add_argument("--workers", type=int, default=2,
                   help="Python load generator processes (default 2)")
    p.add_argument("--serve-cmd", default=None,
                   help="command that runs the proxy in place of `routstr serve` (to measure "
                        "another build); --listen-host/--listen-port/--quiet are appended")
    p.add_argument("--json-out", type=Path, default=None,
                   help="where to write the JSON result (default bench/results/<time>.json)")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temporary folder (logs, ledgers) and print where it is")
    args = p.parse_args(argv)
    only = [t.strip() for item in args.only for t in item.split(",") if t.strip()]
    unknown = [t for t in only if t not in TARGETS + PHASES]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; choose from "
                f"{', '.join(TARGETS + PHASES)}")
    args.targets = [t for t in TARGETS if not only or t in only]
    args.soak = args.soak or args.soak_probe or bool(args.soak_trace)
    args.phases = [ph for ph in PHASES
                   if ph in only or (ph == "soak" and args.soak)
                   or (not only and ph != "soak")]
    if args.soak_requests < 1 or args.soak_every < 1 or args.scaleout_connections < 1:
        p.error("--soak-requests, --soak-every and --scaleout-connections must be positive")
    if args.connections < 1 or args.duration <= 0:
        p.error("--connections and --duration must be positive")
    if args.xcashu_requests < 1 or args.xcashu_connections < 1:
        p.error("--xcashu-requests and --xcashu-connections must be positive")
    args.xcashu = not args.no_xcashu and any(t in PROXIES for t in args.targets)
    return args



def scan_log(proc: Proc, outcome: Outcome) -> None:
    flagged = flagged_lines(proc)
    outcome.log_flagged_count = len(flagged)
    outcome.log_flagged = flagged[:20]


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.wrk = None if args.python_load else shutil.which("wrk")
        self.models = tmp / "models.json"
        self.models.write_text(json.dumps(MODELS))
        self.upstream_url = ""
        self.mint: LocalMint | None = None
        self.mint_log: MintLog | None = None
        self.maker: TokenMaker | None = None

    def start_mint(self) -> None:
        """The local FakeWallet mint the proxies trust, and a user wallet at it."""
        folder = self.tmp / "mint"
        self.mint = LocalMint(folder)
        self.mint.start()
        self.mint_log = MintLog(folder / "mint.log")
        assert self.mint.process is not None
        self.say(f"mint: {self.mint.url} (pid {self.mint.process.pid}, nutshell FakeWallet)")
        self.maker = TokenMaker(self.mint.url, self.tmp / "user-wallet")

    def stop_mint(self) -> int | None:
        if self.maker is not None:
            self.maker.close()
            self.maker = None
        if self.mint is None or self.mint.process is None:
            return None
        self.mint.stop()
        return self.mint.process.poll()

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def start_upstream(self) -> Proc:
        proc = self.procs.start("upstream", [sys.executable, "-m", "bench.upstream"], cwd=REPO,
                                stdout_pipe=True)
        port = int(read_line(proc, 30))
        wait_port(proc, port)
        self.upstream_url = f"http://127.0.0.1:{port}"
        self.say(f"upstream: {self.upstream_url} (pid {proc.pid})")
        return proc

    def start_target(self, name: str) -> tuple[Proc, int, str | None, dict[str, str], Path]:
        port = free_port()
        mode = f"reverse:{self.upstream_url}"
        base = [tool("mitmdump"), "-q", "--mode", mode, "--listen-host", "127.0.0.1",
                "-p", str(port)]
        data_dir = self.tmp / name
        data_dir.mkdir(exist_ok=True)
        env = proxy_env(self.upstream_url, data_dir, self.models,
                        self.mint.url if self.mint and name in PROXIES else None)
        if self.args.providers > 1 and name in PROXIES:
            # More providers of the same model (all the echo upstream): failover armed.
            listed = [{"name": f"extra{i}", "base_url": f"{self.upstream_url}/v1",
                       "models_path": str(self.models)} for i in range(1, self.args.providers)]
            (data_dir / "providers.json").write_text(json.dumps(listed))
            env["PROVIDERS_PATH"] = str(data_dir / "providers.json")
        key: str | None = None
        if name == "mitmdump":
            cmd = base
        else:
            key = create_key(env, data_dir)
            if name == "serve":
                prefix = (shlex.split(self.args.serve_cmd) if self.args.serve_cmd
                          else [tool("routstr"), "serve"])
                cmd = [*prefix, "--listen-host", "127.0.0.1", "--listen-port", str(port),
                       "--quiet"]
            else:
                cmd = [*base, "-s", str(ADDON)]
        proc = self.procs.start(name, cmd, env=env, cwd=data_dir)
        try:
            wait_port(proc, port)
        except BaseException:
            self.procs.stop(proc)
            raise
        self.say(f"{LABELS[name]}: port {port} (pid {proc.pid}): {shlex.join(cmd)}")
        return proc, port, key, env, data_dir

    def run_load(self, port: int, key: str | None, duration: float,
                 connections: int | None = None) -> LoadResult:
        a = self.args
        conns = connections or a.connections
        if self.wrk:
            return run_wrk(self.wrk, port, key, self.tmp, connections=conns,
                           threads=a.threads, duration=duration)
        return run_python_load(self.procs, port, key, self.tmp, connections=conns,
                               workers=a.workers, warmup=0, duration=duration)

    def serve_prefix(self) -> list[str]:
        return (shlex.split(self.args.serve_cmd) if self.args.serve_cmd
                else [tool("routstr"), "serve"])

    def scaleout(self, upstream: Proc) -> ScaleResult:
        a = self.args
        return run_scaleout(self.procs, self.tmp, self.upstream_url, upstream.pid,
                            self.models, self.serve_prefix(), self.run_load, self.say,
                            connections=a.scaleout_connections, duration=a.duration,
                            warmup=a.warmup, quiet_wait=a.wait_quiet)

    def soak(self) -> SoakResult:
        a = self.args
        return run_soak(self.procs, self.tmp, self.upstream_url, self.models,
                        self.serve_prefix(), self.run_load, self.say,
                        requests=a.soak_requests, every=a.soak_every,
                        connections=a.connections, wrk=self.wrk, threads=a.threads,
                        probe=a.soak_probe,
                        trace_frames=a.soak_trace)

    def hooks(self) -> dict[str, Any]:
        """``python -m bench.hooks --json`` in a process of its own."""
        a = self.args
        proc = self.procs.start("hooks", [sys.executable, "-m", "bench.hooks", "--json",
                                          "--requests", str(a.hooks_requests),
                                          "--rounds", str(a.hooks_rounds)],
                                cwd=REPO, stdout_pipe=True)
        try:
            out, _ = proc.popen.communicate(timeout=600)
        finally:
            self.procs.stop(proc)
        if proc.popen.returncode != 0:
            return {"error": f"bench.hooks exited with code {proc.popen.returncode}:\n"
                             + proc.log_tail(20)}
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    def load(self, outcome: Outcome, key: str | None, target_pid: int,
             upstream_pid: int) -> None:
        outcome.warmup = self.run_load(outcome.port, key, self.args.warmup)
        before = CpuWindow.measure(target_pid, upstream_pid)
        outcome.load = self.run_load(outcome.port, key, self.args.duration)
        outcome.cpu = CpuWindow.between(before, CpuWindow.measure(target_pid, upstream_pid))

    def measure(self, name: str, upstream: Proc) -> Outcome:
        proc: Proc | None = None
        key: str | None = None
        env: dict[str, str] = {}
        data_dir = self.tmp
        if name == "direct":
            port = int(self.upstream_url.rsplit(":", 1)[1])
            outcome = Outcome(name, port, upstream.pid)
        else:
            try:
                proc, port, key, env, data_dir = self.start_target(name)
            except Exception as e:
                self.say(f"  ERROR: {e}")
                return Outcome(name, 0, error=f"could not start: {e}")
            outcome = Outcome(name, port, proc.pid)
        try:
            outcome.preflight = preflight(port, key)
            if not outcome.preflight["ok"]:
                self.say(f"  WARNING: {LABELS[name]} answered the check request with "
                         f"{outcome.preflight['status']}: {outcome.preflight.get('body', '')}")
            self.say(f"  load: {self.args.warmup:g} s warm-up + {self.args.duration:g} s, "
                     f"{self.args.connections} connections "
                     f"({'wrk' if self.wrk else 'Python generator'})")
            self.load(outcome, key, proc.pid if proc else upstream.pid, upstream.pid)
            if not self.args.no_stream:
                self.say(f"  streaming: {self.args.stream_requests} requests, "
                         f"{self.args.stream_connections} connections")
                outcome.stream = run_streams("127.0.0.1", port, key, self.args.stream_requests,
                                             self.args.stream_connections)
            if self.maker is not None and name in PROXIES:
                outcome.cashu = CashuResult()
                try:
                    self.measure_cashu(port, key, proc.pid if proc else 0, outcome.cashu)
                except Exception as e:
                    outcome.cashu.error = f"{type(e).__name__}: {e}"
                    self.say(f"  ERROR (cashu): {outcome.cashu.error}")
            # Let the proxy see the clients' connections close: stopping it with connections
            # open makes Python 3.12.1 log a traceback per connection (CPython gh-113538).
            time.sleep(0.5)
            outcome.memory_kb = memory_kb(proc.pid if proc else upstream.pid)
        except Exception as e:
            outcome.error = f"{type(e).__name__}: {e}"
            self.say(f"  ERROR: {outcome.error}")
        finally:
            if proc is not None:
                outcome.exit_code = self.procs.stop(proc)
                scan_log(proc, outcome)
        if key is not None:
            outcome.ledger = ledger_state(key, env, data_dir)
        if outcome.cashu is not None:
            outcome.cashu.ledger = cashu.ledger_crosscheck(data_dir, env, tool("routstr"))
        return outcome

    def measure_cashu(self, port: int, key: str | None, pid: int, result: CashuResult) -> None:
        assert self.mint is not None and self.mint_log is not None and self.maker is not None
        assert self.mint.process is not None
        a = self.args
        cashu.run_cashu(
            procs=self.procs, tmp=self.tmp, port=port, funded_key=key, mint_url=self.mint.url,
            mint_log=self.mint_log, maker=self.maker,
            plan=CashuPlan.from_args(a.xcashu_requests, a.xcashu_connections),
            cpu_of={"proxy": pid, "mint": self.mint.process.pid},
            steady=lambda token, secs: self.run_load(port, token, secs),
            warmup_s=a.warmup, duration_s=a.duration, say=self.say, result=result)


# --- output -------------------------------------------------------------------------------



def render(outcomes: dict[str, Outcome], args: argparse.Namespace, generator: str) -> str:
    bare = outcomes.get("mitmdump")
    bare_rps = bare.load.rps if bare and bare.load else None
    cpu_ratio = ratios(outcomes).get("cpu_ratio_vs_bare_mitmdump", {})
    parts = []
    rows = []
    for name, o in outcomes.items():
        r, cpu = o.load, o.cpu
        ratio = (f"{r.rps / bare_rps:.2f}x" if r and bare_rps and name in PROXIES else "-")
        check = str(o.preflight.get("status", "-")) + ("" if o.preflight.get("ok") else " FAIL")
        if r is None:
            rows.append([LABELS[name], *["-"] * 10, check])
            continue
        rows.append([LABELS[name], fmt(r.rps, 0), ratio, fmt(r.p50_ms), fmt(r.p99_ms),
                     fmt(r.requests), fmt(r.bad_status), fmt(r.socket_errors),
                     fmt(cpu.per_request_us(r.requests), 0) if cpu else "-",
                     f"{cpu_ratio[name]:.2f}x" if name in cpu_ratio else "-",
                     fmt(cpu.foreign_cores) if cpu else "-", check])
    parts.append(table(
        f"Chat completions, JSON ({generator}, {args.connections} connections, "
        f"{args.duration:g} s after {args.warmup:g} s warm-up)",
        ["target", "req/s", "vs bare", "p50 ms", "p99 ms", "answers", "non-2xx",
         "sock err", "CPU us/req", "vs bare CPU", "other load", "check"], rows))
    parts.append(
        "  CPU us/req: CPU time of the process measured, per answer; vs bare CPU: bare mitmdump's"
        "\n  CPU us/req over the proxy's (above 1: cheaper than bare). other load: cores kept "
        "busy by\n  processes outside the benchmark meanwhile (above ~0.2 req/s and p99 are "
        "unreliable).")
    streamed = {n: o for n, o in outcomes.items() if o.stream is not None}
    if streamed:
        rows = []
        for name, o in streamed.items():
            s = o.stream.summary() if o.stream else {}
            rows.append([LABELS[name], fmt(s["ttfb_p50_ms"]), fmt(s["ttfb_p99_ms"]),
                         fmt(s["total_p50_ms"]), fmt(s["total_p99_ms"]),
                         fmt(s["streams_per_s"], 0), fmt(s["ok"]), fmt(s["failed"]),
                         fmt(s["billed_comment"]) if name in PROXIES else "-"])
        parts.append(table(
            f"Chat completions, streaming ({args.stream_connections} connections, "
            f"{args.stream_requests} requests; TTFB = first `data:` line)",
            ["target", "TTFB p50", "TTFB p99", "total p50", "total p99", "streams/s", "ok",
             "failed", "cost comment"], rows))
    rows = []
    for name, o in outcomes.items():
        mem = o.memory_kb
        ledger = o.ledger or {}
        rows.append([
            LABELS[name] + (" (upstream)" if name == "direct" else ""),
            fmt(mem["VmRSS"] / 1024, 1) if "VmRSS" in mem else "-",
            fmt(mem["VmHWM"] / 1024, 1) if "VmHWM" in mem else "-",
            fmt(o.client_ok()),
            fmt(ledger.get("total_requests")) if name in PROXIES else "-",
            fmt(ledger.get("spent_sats"), 3) if name in PROXIES else "-",
            fmt(ledger.get("open_reservations")) if name in PROXIES else "-",
            str(o.exit_code) if o.exit_code is not None else "-",
            fmt(o.log_flagged_count) if name != "direct" else "-",
        ])
    parts.append(table(
        "Processes after the run (RSS before stopping; ledger read after)",
        ["target", "RSS MB", "peak MB", "client 2xx", "ledger reqs", "spent sats",
         "open resv", "exit", "log flags"], rows))
    return "\n\n".join(parts)


def render_cashu(outcomes: dict[str, Outcome], args: argparse.Namespace,
                 mint_info: dict[str, Any]) -> str:
    done = {n: o.cashu for n, o in outcomes.items() if o.cashu is not None}
    any_r = next(iter(done.values()))
    plan = CashuPlan.from_args(args.xcashu_requests, args.xcashu_connections)
    c = args.xcashu_connections
    parts = []

    def ph(r: CashuResult, name: str) -> cashu.Phase:
        return r.phases.get(name) or cashu.Phase(name, 0)

    def okn(p: cashu.Phase) -> str:
        return f"{p.good}/{p.requests}" if p.requests else "-"

    rows = []
    for name, r in done.items():
        x, seq, key = ph(r, "xcashu_json"), ph(r, "xcashu_seq"), ph(r, "key_seq")
        mseq = ph(r, "mint_swap_seq")
        rows.append([LABELS[name], fmt(x.rate, 0), fmt(x.p(50)), fmt(x.p(99)), okn(x),
                     fmt(x.mint_calls_per_request, 3), fmt(x.cpu_ms("proxy"), 1),
                     fmt(x.cpu_ms("mint"), 1), fmt(seq.p(50)), fmt(seq.p(99)), okn(seq),
                     fmt(key.p(50)), fmt(r.overhead_ms()), fmt(mseq.p(50))])
    parts.append(table(
        f"x-cashu, JSON: a fresh token of {any_r.token_sats} sats per request in X-Cashu "
        f"(max cost {any_r.max_cost_sats:g} sats); {plan.requests} requests at {c} connections, "
        f"{plan.sequential} one at a time",
        ["target", "req/s", "p50 ms", "p99 ms", "ok", "mint calls/req", "proxy CPU",
         "mint CPU", "seq p50", "seq p99", "seq ok", "key seq p50", "+p50 vs key",
         "swap seq p50"], rows))
    parts.append("  ok: 200 with an x-cashu change header. mint calls/req: the mint's access "
                 "log during the\n  concurrent phase (goal: exactly 1, the swap). proxy/mint "
                 "CPU: ms of CPU time per request\n  over that phase. +p50 vs key: x-cashu less "
                 "funded-key p50, one request at a time\n  (should be about one mint swap: "
                 "swap seq p50, the mint alone, one at a time).")
    rows = []
    for name, r in done.items():
        m, ms, x = ph(r, "mint_swap"), ph(r, "mint_swap_seq"), ph(r, "xcashu_json")
        outs = r.ledger.get("xcashu_outputs_per_swap") if r.ledger else None
        rows.append([f"next to {LABELS[name]}", fmt(m.rate, 0), fmt(m.p(50)), fmt(m.p(99)),
                     okn(m), fmt(m.cpu_ms("mint"), 1), fmt(ms.p(50)), fmt(ms.p(99)),
                     fmt(m.outputs / m.good if m.good else None, 1), fmt(outs, 1),
                     fmt(x.rate, 0), f"{r.ratio_vs_mint():.2f}"
                     if not math.isnan(r.ratio_vs_mint()) else "-"])
    parts.append(table(
        f"The mint alone: POST /v1/swap of fresh tokens into the proxy's outputs, no proxy "
        f"({plan.requests} swaps at {c} connections, {plan.sequential} one at a time)",
        ["mint", "swaps/s", "p50 ms", "p99 ms", "ok", "mint CPU", "seq p50", "seq p99",
         "outputs",
         "proxy outputs", "x-cashu req/s", "x-cashu/mint"], rows))
    parts.append("  x-cashu/mint: the target is >= 0.80. outputs: new proofs per swap, the mint "
                 "alone and the\n  proxy's (from its ledger).")
    rows = []
    for name, r in done.items():
        st = ph(r, "xcashu_stream")
        rows.append([LABELS[name], fmt(st.p(50, True)), fmt(st.p(99, True)), fmt(st.p(50)),
                     fmt(st.p(99)), fmt(st.rate, 0), okn(st), fmt(st.no_change),
                     fmt(st.mint_calls_per_request, 3)])
    parts.append(table(
        f"x-cashu, streaming: a fresh token per stream ({plan.streams} streams, {c} "
        "connections; TTFB = first `data:` line)",
        ["target", "TTFB p50", "TTFB p99", "total p50", "total p99", "streams/s", "ok",
         "no change", "mint calls/req"], rows))
    parts.append("  ok: 200, complete, and the last line an SSE comment `: x-cashu cashuB…` "
                 "(the change).")
    rows = []
    for name, r in done.items():
        f, s = ph(r, "token_key_first"), r.steady
        rows.append([LABELS[name], fmt(f.p(50)), fmt(f.p(99)), okn(f),
                     fmt(f.mint_calls_per_request, 3),
                     fmt(s.rps, 0) if s else "-", fmt(s.p50_ms) if s else "-",
                     fmt(s.p99_ms) if s else "-", fmt(s.bad_status) if s else "-",
                     fmt(s.socket_errors) if s else "-"])
    parts.append(table(
        f"Token as key: Authorization: Bearer cashuB… ({plan.sequential} first uses one at a "
        f"time; then one {cashu.STEADY_TOKEN_SATS}-sat token reused, "
        f"{'wrk' if shutil.which('wrk') and not args.python_load else 'Python generator'}, "
        f"{args.connections} connections, {args.duration:g} s)",
        ["target", "redeem p50", "redeem p99", "ok", "mint calls/use", "reuse req/s",
         "p50 ms", "p99 ms", "non-2xx", "sock err"], rows))
    rows = []
    for name, r in done.items():
        led = r.ledger or {}
        pays = led.get("payments") or {}
        check = led.get("ledger_check_exit")
        rows.append([LABELS[name], f"{r.premint_tokens} in {r.premint_s:.1f} s",
                     fmt(r.xcashu_200()), fmt(pays.get("xcashu", {}).get("count")),
                     fmt(pays.get("key", {}).get("count")),
                     fmt((led.get("proofs_by_state") or {}).get("held", 0)),
                     "ok" if check == 0 else f"FAIL ({check})",
                     f"{r.change_redeemed}/{r.change_checked}",
                     fmt(sum(r.change_sats)) if r.change_sats else "-"])
    parts.append(table(
        "Cashu cross-checks after the run (ledger read after the proxy stopped)",
        ["target", "pre-minted", "x-cashu 200s", "ledger x-cashu", "ledger key",
         "held proofs", "ledger check", "change redeemed", "change sats"], rows))
    parts.append(f"  the mint: {mint_info.get('url', '-')}, exit {mint_info.get('exit_code')}, "
                 f"{mint_info.get('log_flagged_count', 0)} log line(s) flagged; ledger key = "
                 "tokens used as keys\n  (first uses + the reused one).")
    return "\n\n".join(parts)


def mint_report(bench: Bench) -> dict[str, Any]:
    """Stop the mint (and the user wallet); what its log says."""
    if bench.mint is None:
        return {}
    info: dict[str, Any] = {"url": bench.mint.url}
    info["exit_code"] = bench.stop_mint()
    if bench.mint_log is not None:
        flagged = bench.mint_log.flagged()
        info.update(log_flagged_count=len(flagged), log_flagged=flagged[:20],
                    calls=dict(bench.mint_log.calls_since(0)))
    return info


def clean(value: Any) -> Any:
    """NaN to null, recursively, so the JSON is standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def meta(args: argparse.Namespace, wrk: str | None) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except OSError:
            return ""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(), "python": platform.python_version(),
        "mitmproxy": version("mitmproxy"), "routstr": version("routstr-addon"),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "generator": "wrk" if wrk else "python", "wrk": wrk_version(wrk) if wrk else None,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = None if args.python_load else shutil.which("wrk")
    if wrk is None and not args.python_load:
        print("wrk is not installed: using the Python load generator "
              f"({args.workers} processes). For steadier figures: apt-get install -y wrk",
              file=sys.stderr)
    info = meta(args, wrk)
    before = busy_seconds()
    time.sleep(1.0)
    info["busy_cores_before"] = busy = busy_seconds() - before
    if busy > 0.3:
        print(f"note: this machine is already busy ({busy:.2f} cores in use before the "
              "benchmark starts); figures will be noisy", file=sys.stderr)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="routstr-bench-"))
    procs = Processes(tmp / "logs")
    outcomes: dict[str, Outcome] = {}
    interrupted = False
    bench = Bench(args, tmp, procs)
    mint_info: dict[str, Any] = {}
    phases: dict[str, Any] = {}
    outcomes_upstream_mem: dict[str, int] = {}
    try:
        if args.xcashu:
            bench.start_mint()
        if args.targets or "scaleout" in args.phases or "soak" in args.phases:
            upstream = bench.start_upstream()
        for name in args.targets:
            bench.say(f"== {LABELS[name]}")
            outcomes[name] = bench.measure(name, upstream)
            time.sleep(0.5)
        if args.targets:
            outcomes_upstream_mem = memory_kb(upstream.pid)
        for phase in args.phases:
            bench.say(f"== phase: {phase}")
            try:
                if phase == "scaleout":
                    phases[phase] = bench.scaleout(upstream)
                elif phase == "soak":
                    phases[phase] = bench.soak()
                else:
                    phases[phase] = bench.hooks()
            except Exception as e:  # the other phases still run
                bench.say(f"  ERROR ({phase}): {type(e).__name__}: {e}")
                phases[phase] = {"error": f"{type(e).__name__}: {e}"}
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything", file=sys.stderr)
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        try:
            mint_info = mint_report(bench)
        except Exception as e:  # the mint must be stopped whatever happened
            print(f"warning: stopping the mint: {e}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if args.keep_tmp:
            print(f"temporary folder kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not outcomes and not phases:
        return 130 if interrupted else 1

    generator = "wrk" if wrk else f"Python generator, {args.workers} processes"
    sys.stderr.flush()
    if outcomes:
        print()
        print(render(outcomes, args, generator))
    if any(o.cashu for o in outcomes.values()):
        print()
        print(render_cashu(outcomes, args, mint_info))
    problems = report_problems(outcomes)
    for phase, res in phases.items():
        print()
        if isinstance(res, dict) and "addons" not in res:  # a phase that failed outright
            print(f"{phase}: ERROR: {res.get('error')}")
            problems.append(f"{phase}: {res.get('error')}")
        elif isinstance(res, ScaleResult):
            print(scaleout.render(res, generator))
            problems += scaleout.problems(res)
        elif isinstance(res, SoakResult):
            print(soak.render(res, generator))
            problems += soak.problems(res)
        else:
            print(render_hooks(res))
            problems += hooks_problems(res)
    if mint_info.get("log_flagged_count"):
        problems.append(f"the mint's log has {mint_info['log_flagged_count']} line(s) that look "
                        f"like errors; first: {mint_info['log_flagged'][0][:200]}")
    if mint_info.get("exit_code") not in (None, 0, -signal.SIGTERM):  # uvicorn re-raises it
        problems.append(f"the mint exited with code {mint_info['exit_code']} when stopped")
    if problems:
        print("\nLooked wrong:")
        for p in problems:
            print(f"  - {p}")

    result = {"meta": info, "targets": {n: o.as_dict() for n, o in outcomes.items()},
              **ratios(outcomes), "upstream_memory_kb": outcomes_upstream_mem,
              "mint": mint_info,
              **{phase: res if isinstance(res, dict) else res.as_dict()
                 for phase, res in phases.items()},
              "problems": problems, "interrupted": interrupted}
    out = args.json_out or REPO / "bench" / "results" / f"{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(clean(result), indent=1) + "\n")
    print(f"\nJSON: {out}")
    return 130 if interrupted else (1 if problems else 0)


def hooks_problems(result: dict[str, Any]) -> list[str]:
    out = []
    for a in result.get("addons", []):
        us = a.get("json_us_per_request")
        if us is not None and us >= TARGET_US:
            out.append(f"hooks: the addon's own CPU is {us:.0f} us per JSON request (target < "
                       f"{TARGET_US:.0f} us)")
        if a.get("billed") != a.get("sent"):
            out.append(f"hooks: the ledger billed {a.get('billed')} of the {a.get('sent')} "
                       "requests timed")
    return out


def ratios(outcomes: dict[str, Outcome]) -> dict[str, dict[str, float]]:
    """Each proxy against bare mitmdump: by req/s, and by CPU time per request (bare / proxy,
    so above 1 means cheaper than bare), which holds up better on a busy machine."""
    by_rps: dict[str, float] = {}
    by_cpu: dict[str, float] = {}
    bare = outcomes.get("mitmdump")
    if bare is None or bare.load is None:
        return {}
    bare_cpu = bare.cpu.per_request_us(bare.load.requests) if bare.cpu else math.nan
    for name in PROXIES:
        o = outcomes.get(name)
        if o is None or o.load is None:
            continue
        if bare.load.rps:
            by_rps[name] = o.load.rps / bare.load.rps
        if o.cpu and o.load.requests:
            by_cpu[name] = bare_cpu / o.cpu.per_request_us(o.load.requests)
    return {"ratio_vs_bare_mitmdump": by_rps, "cpu_ratio_vs_bare_mitmdump": by_cpu}


def report_problems(outcomes: dict[str, Outcome]) -> list[str]:
    problems = []
    for name, o in outcomes.items():
        label = LABELS[name]
        if o.error:
            problems.append(f"{label}: {o.error}")
        if o.preflight and not o.preflight.get("ok"):
            problems.append(f"{label}: check request got {o.preflight.get('status')}: "
                            f"{o.preflight.get('body', '')[:200]}")
        if name in PROXIES and o.preflight.get("ok") and not o.preflight.get("cost_msats"):
            problems.append(f"{label}: the check answer had no x-routstr-cost-msats header")
        if o.load and (o.load.bad_status or o.load.socket_errors):
            problems.append(f"{label}: {o.load.bad_status} non-2xx answers and "
                            f"{o.load.socket_errors} socket errors under load")
        if o.stream and o.stream.requests - o.stream.ok:
            problems.append(f"{label}: {o.stream.requests - o.stream.ok} failed streams; "
                            f"first: {o.stream.first_failure}")
        if name in PROXIES and o.stream and o.stream.ok and o.stream.billed_comment == 0:
            problems.append(f"{label}: no stream carried the cost comment")
        if o.exit_code not in (None, 0):
            problems.append(f"{label}: exited with code {o.exit_code} when stopped")
        if o.log_flagged_count:
            problems.append(f"{label}: {o.log_flagged_count} log line(s) look like errors; "
                            f"first: {o.log_flagged[0][:200]}")
        if o.ledger is not None:
            if "error" in o.ledger:
                problems.append(f"{label}: reading the ledger failed: {o.ledger['error']}")
            elif (o.ledger.get("total_requests") or 0) < o.client_ok():
                problems.append(f"{label}: the client got {o.client_ok()} answers with 2xx but "
                                f"the ledger billed only {o.ledger.get('total_requests')}")
            if o.ledger.get("open_reservations"):
                problems.append(f"{label}: {o.ledger['open_reservations']} reservation(s) "
                                "still open after the proxy stopped")
    for name, o in outcomes.items():
        if o.cashu is not None:
            problems += cashu.problems(LABELS[name], o.cashu)
    busy = {LABELS[n]: o.cpu.foreign_cores for n, o in outcomes.items()
            if o.cpu and o.cpu.foreign_cores > 0.2}
    if busy:
        problems.append(
            "processes outside the benchmark kept cores busy while it measured ("
            + ", ".join(f"{k}: {v:.2f}" for k, v in busy.items())
            + "): req/s and tail latencies are unreliable; CPU us/req is the steadier figure. "
            "Rerun on an idle machine.")
    return problems
