"""Scaling out: 1 and 2 ``routstr serve`` processes sharing one PostgreSQL ledger, and 1 on
SQLite for comparison, under the same funded-key JSON load.

* SQLite, 1 process: the ledger file in its own data folder;
* PostgreSQL, 1 process: a database of its own (``routstr_bench_<random>``, dropped after);
* PostgreSQL, 2 processes: the first one and a second one (its own data folder, the same
  DATABASE_URL and WALLET_MNEMONIC) behind a round-robin TCP balancer on loopback
  (``bench/balancer.py``, a process of its own so its CPU is counted apart).

Each setup bills a key of its own, so afterwards each is checked: the key's billed requests
against the 2xx answers the client counted (billed may exceed them by the requests in flight
when the load stopped, at most one per connection) and no reservation left open; then
``routstr ledger check`` on the PostgreSQL database.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    REPO,
    create_key,
    flagged_lines,
    fmt,
    ledger_check,
    ledger_state,
    preflight,
    proxy_env,
    table,
    wait_quiet,
)
from .load import LoadResult
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

__all__ = ["ScaleResult", "ScaleRow", "problems", "render", "run_scaleout"]

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_BASE = "postgresql://postgres@127.0.0.1:5432/"
SETUPS = {
    "sqlite-1": "1 process, SQLite",
    "pg-1": "1 process, PostgreSQL",
    "pg-2": "2 processes, PostgreSQL, balancer",
}

LoadFn = Callable[[int, str, float, int], LoadResult]  # port, key, seconds, connections


@dataclass(slots=True)
class ScaleRow:
    name: str
    processes: int
    key: str = ""
    port: int = 0
    pids: list[int] = field(default_factory=list)
    preflight: dict[str, Any] = field(default_factory=dict)
    warmup: LoadResult | None = None
    load: LoadResult | None = None
    cpu: dict[str, Any] = field(default_factory=dict)
    memory_kb: list[dict[str, int]] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    log_flagged: list[str] = field(default_factory=list)
    balancer_connections: list[int] | None = None
    ledger: dict[str, Any] | None = None
    error: str | None = None

    def client_ok(self) -> int:
        n = 1 if self.preflight.get("ok") else 0
        for r in (self.warmup, self.load):
            if r is not None:
                n += r.requests - r.bad_status
        return n

    def cpu_us(self, name: str) -> float | None:
        secs = self.cpu.get(name)
        if secs is None or self.load is None or not self.load.requests:
            return None
        return float(secs) / self.load.requests * 1e6

    def billed_extra(self) -> int | None:
        billed = (self.ledger or {}).get("total_requests")
        return None if billed is None else int(billed) - self.client_ok()

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": SETUPS[self.name], "processes": self.processes, "port": self.port,
            "pids": self.pids, "preflight": self.preflight,
            "warmup": self.warmup.as_dict() if self.warmup else None,
            "load": self.load.as_dict() if self.load else None,
            "cpu_s": self.cpu,
            "cpu_us_per_request": {k: self.cpu_us(k) for k in
                                   ("proxies", "db", "balancer", "upstream", "generator")},
            "memory_kb": self.memory_kb, "exit_codes": self.exit_codes,
            "log_flagged": self.log_flagged[:20], "log_flagged_count": len(self.log_flagged),
            "balancer_connections": self.balancer_connections,
            "client_2xx_total": self.client_ok(), "ledger": self.ledger,
            "billed_minus_2xx": self.billed_extra(), "error": self.error,
        }


@dataclass(slots=True)
class ScaleResult:
    connections: int
    duration_s: float
    warmup_s: float
    rows: dict[str, ScaleRow] = field(default_factory=dict)
    database: str | None = None
    pg_ledger_check: dict[str, Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        pg1, pg2 = self.rows.get("pg-1"), self.rows.get("pg-2")
        speedup = (pg2.load.rps / pg1.load.rps if pg1 and pg2 and pg1.load and pg2.load
                   and pg1.load.rps else None)
        return {"connections": self.connections, "duration_s": self.duration_s,
                "warmup_s": self.warmup_s, "database": self.database,
                "rows": {n: r.as_dict() for n, r in self.rows.items()},
                "pg_2_over_1": speedup, "pg_ledger_check": self.pg_ledger_check,
                "error": self.error}


def _seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        s = cpu_seconds(pid)
        if not math.isnan(s):  # still there
            total += s
    return total


class _Window:
    """CPU of each party over the measured load. ``db``: the PostgreSQL backends serving the
    bench's database (not the server's shared writer and checkpointer processes, nor other
    databases' backends)."""

    def __init__(self, proxies: list[int], balancer: int | None, upstream: int,
                 db: list[int] | None) -> None:
        self.proxies, self.balancer, self.upstream, self.db = proxies, balancer, upstream, db
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        return {"wall": time.perf_counter(),
                **{f"proxy{i}": cpu_seconds(p) for i, p in enumerate(self.proxies)},
                "balancer": cpu_seconds(self.balancer) if self.balancer else 0.0,
                "upstream": cpu_seconds(self.upstream),
                "db": _seconds(self.db) if self.db else 0.0,
                "generator": own_and_children_seconds(), "busy": busy_seconds()}

    def stop(self) -> dict[str, Any]:
        end = self._now()
        d = {k: end[k] - self.start[k] for k in end}
        per_proxy = [d[f"proxy{i}"] for i in range(len(self.proxies))]
        ours = sum(per_proxy) + d["balancer"] + d["upstream"] + d["db"] + d["generator"]
        return {"wall": d["wall"], "proxies": sum(per_proxy), "per_proxy": per_proxy,
                "balancer": d["balancer"] if self.balancer else None, "upstream": d["upstream"],
                "db": d["db"] if self.db is not None else None,
                "db_backends": len(self.db) if self.db is not None else None,
                "generator": d["generator"], "busy": d["busy"],
                "foreign_cores": max(0.0, d["busy"] - ours) / d["wall"] if d["wall"] else None}


class ScaleOut:
    def __init__(self, procs: Processes, tmp: Path, upstream_url: str, upstream_pid: int,
                 models: Path, serve_prefix: list[str], run_load: LoadFn,
                 say: Callable[[str], None], *, connections: int, duration: float,
                 warmup: float, quiet_wait: float = 0.0) -> None:
        self.procs, self.tmp, self.models = procs, tmp / "scaleout", models
        self.quiet_wait = quiet_wait
        self.upstream_url, self.upstream_pid = upstream_url, upstream_pid
        self.serve_prefix, self.run_load, self.say = serve_prefix, run_load, say
        self.result = ScaleResult(connections, duration, warmup)
        self.admin: Any = None  # a psycopg2 connection to the server, while PostgreSQL runs
        self.tmp.mkdir(parents=True, exist_ok=True)

    def env(self, name: str, database_url: str | None = None,
            mnemonic: str | None = None) -> tuple[dict[str, str], Path]:
        data_dir = self.tmp / name
        data_dir.mkdir(exist_ok=True)
        env = proxy_env(self.upstream_url, data_dir, self.models)
        if database_url:
            env["DATABASE_URL"] = database_url
        if mnemonic:
            env["WALLET_MNEMONIC"] = mnemonic
        return env, data_dir

    def start_serve(self, name: str, env: dict[str, str], data_dir: Path) -> tuple[Proc, int]:
        port = free_port()
        cmd = [*self.serve_prefix, "--listen-host", "127.0.0.1", "--listen-port", str(port),
               "--quiet"]
        proc = self.procs.start(f"scaleout-{name}", cmd, env=env, cwd=data_dir)
        try:
            wait_port(proc, port)
        except BaseException:
            self.procs.stop(proc)
            raise
        self.say(f"  {name}: port {port} (pid {proc.pid})")
        return proc, port

    def db_backends(self) -> list[int] | None:
        """The server processes serving the bench's database right now."""
        if self.admin is None or self.result.database is None:
            return None
        cur = self.admin.cursor()
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                    (self.result.database,))
        return [int(pid) for (pid,) in cur.fetchall()]

    def measure(self, row: ScaleRow, port: int, proxies: list[Proc], balancer: Proc | None,
                db: bool) -> None:
        r = self.result
        row.port, row.pids = port, [p.pid for p in proxies]
        row.preflight = preflight(port, row.key)
        if not row.preflight.get("ok"):
            raise RuntimeError(f"the check request got {row.preflight.get('status')}: "
                               f"{row.preflight.get('body', '')[:300]}")
        if self.quiet_wait > 0:
            row.cpu["quiet_before"] = wait_quiet(self.quiet_wait, self.say)
        self.say(f"  {SETUPS[row.name]}: {r.warmup_s:g} s warm-up + {r.duration_s:g} s, "
                 f"{r.connections} connections")
        row.warmup = self.run_load(port, row.key, r.warmup_s, r.connections)
        window = _Window([p.pid for p in proxies], balancer.pid if balancer else None,
                         self.upstream_pid, self.db_backends() if db else None)
        row.load = self.run_load(port, row.key, r.duration_s, r.connections)
        row.cpu.update(window.stop())
        time.sleep(0.5)  # the clients' connections close before the proxies are stopped
        row.memory_kb = [memory_kb(p.pid) for p in proxies]

    def stop(self, row: ScaleRow, proxies: list[Proc], balancer: Proc | None) -> None:
        if balancer is not None:
            self.procs.stop(balancer)
            for line in reversed(balancer.log_tail(5).splitlines()):
                if line.startswith("{"):
                    row.balancer_connections = json.loads(line).get("connections")
                    break
        for proc in proxies:
            row.exit_codes.append(self.procs.stop(proc))
            row.log_flagged += flagged_lines(proc)

    def sqlite_one(self) -> None:
        row = self.result.rows["sqlite-1"] = ScaleRow("sqlite-1", 1)
        env, data_dir = self.env("sqlite-1")
        proc: Proc | None = None
        try:
            row.key = create_key(env, data_dir)
            proc, port = self.start_serve("sqlite-1", env, data_dir)
            self.measure(row, port, [proc], None, db=False)
        except Exception as e:
            row.error = f"{type(e).__name__}: {e}"
            self.say(f"  ERROR: {row.error}")
        finally:
            if proc is not None:
                self.stop(row, [proc], None)
        if row.key:
            row.ledger = ledger_state(row.key, env, data_dir)

    def postgres(self) -> None:
        try:
            import psycopg2
        except ImportError as e:
            self.result.error = f"no psycopg2: {e}"
            return
        name = f"routstr_bench_{secrets.token_hex(6)}"
        try:
            admin = psycopg2.connect(PG_ADMIN, connect_timeout=5)
        except psycopg2.Error as e:
            self.result.error = f"PostgreSQL at {PG_ADMIN} is not reachable: {e}"
            self.say(f"  ERROR: {self.result.error}")
            return
        admin.autocommit = True
        self.admin = admin
        try:
            admin.cursor().execute(f'CREATE DATABASE "{name}"')
            self.result.database = name
            self.say(f"  PostgreSQL database {name}")
            self._postgres(PG_BASE + name)
        finally:
            try:
                cur = admin.cursor()
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            except psycopg2.Error as e:
                self.say(f"  warning: could not drop database {name}: {e}")
            finally:
                self.admin = None
                admin.close()

    def _postgres(self, url: str) -> None:
        from mnemonic import Mnemonic

        mnemonic = str(Mnemonic("english").generate(128))
        env_a, dir_a = self.env("pg-a", url, mnemonic)
        env_b, dir_b = self.env("pg-b", url, mnemonic)
        one = self.result.rows["pg-1"] = ScaleRow("pg-1", 1)
        two = self.result.rows["pg-2"] = ScaleRow("pg-2", 2)
        a = b = balancer = None
        try:
            one.key = create_key(env_a, dir_a)
            two.key = create_key(env_a, dir_a)
            a, port_a = self.start_serve("pg-a", env_a, dir_a)
            try:
                self.measure(one, port_a, [a], None, db=True)
            except Exception as e:
                one.error = f"{type(e).__name__}: {e}"
                self.say(f"  ERROR: {one.error}")
            b, port_b = self.start_serve("pg-b", env_b, dir_b)
            balancer = self.procs.start("scaleout-balancer",
                                        [sys.executable, "-m", "bench.balancer", str(port_a),
                                         str(port_b)], cwd=REPO, stdout_pipe=True)
            port = int(read_line(balancer, 30))
            self.say(f"  balancer: port {port} (pid {balancer.pid}) -> {port_a}, {port_b}")
            try:
                self.measure(two, port, [a, b], balancer, db=True)
            except Exception as e:
                two.error = f"{type(e).__name__}: {e}"
                self.say(f"  ERROR: {two.error}")
        except Exception as e:
            (two if one.load else one).error = f"{type(e).__name__}: {e}"
            self.say(f"  ERROR: {type(e).__name__}: {e}")
        finally:
            # The single process's own figures are kept with its row; the pair's with theirs.
            if balancer is not None:
                self.stop(two, [], balancer)
            for proc, rows in ((a, (one, two)), (b, (two,))):
                if proc is not None:
                    code = self.procs.stop(proc)
                    flagged = flagged_lines(proc)
                    for row in rows:
                        row.exit_codes.append(code)
                        row.log_flagged += flagged
        for row in (one, two):
            if row.key:
                row.ledger = ledger_state(row.key, env_a, dir_a)
        self.result.pg_ledger_check = ledger_check(env_a, dir_a)


def run_scaleout(procs: Processes, tmp: Path, upstream_url: str, upstream_pid: int,
                 models: Path, serve_prefix: list[str], run_load: LoadFn,
                 say: Callable[[str], None], *, connections: int, duration: float,
                 warmup: float, quiet_wait: float = 0.0) -> ScaleResult:
    s = ScaleOut(procs, tmp, upstream_url, upstream_pid, models, serve_prefix, run_load, say,
                 connections=connections, duration=duration, warmup=warmup,
                 quiet_wait=quiet_wait)
    s.sqlite_one()
    s.postgres()
    return s.result


def render(result: ScaleResult, generator: str) -> str:
    base = result.rows.get("pg-1")
    base_rps = base.load.rps if base and base.load else None
    rows = []
    for name, r in result.rows.items():
        load, cpu = r.load, r.cpu
        if load is None:
            rows.append([SETUPS[name], *["-"] * 13, r.error[:40] if r.error else "-"])
            continue
        rss = "/".join(f"{m['VmRSS'] / 1024:.0f}" for m in r.memory_kb if "VmRSS" in m)
        extra = r.billed_extra()
        rows.append([
            SETUPS[name], fmt(load.rps, 0),
            f"{load.rps / base_rps:.2f}x" if base_rps and name.startswith("pg") else "-",
            fmt(load.p50_ms), fmt(load.p99_ms), fmt(load.requests),
            fmt(load.bad_status + load.socket_errors),
            fmt(r.cpu_us("proxies"), 0), fmt(r.cpu_us("db"), 0), fmt(r.cpu_us("balancer"), 0),
            fmt(cpu.get("foreign_cores")), rss or "-",
            fmt((r.ledger or {}).get("total_requests")),
            f"{r.client_ok():,} {'+' if extra is not None and extra >= 0 else ''}"
            f"{extra if extra is not None else '?'}",
            fmt((r.ledger or {}).get("open_reservations")),
        ])
    parts = [table(
        f"Scaling out: routstr serve, funded-key JSON chat ({generator}, {result.connections} "
        f"connections, {result.duration_s:g} s after {result.warmup_s:g} s warm-up)",
        ["setup", "req/s", "vs 1 PG", "p50 ms", "p99 ms", "answers", "errors",
         "proxy CPU us", "db CPU us", "lb CPU us", "other load", "RSS MB", "billed",
         "2xx +in flight", "open resv"], rows)]
    check = result.pg_ledger_check or {}
    split = (result.rows["pg-2"].balancer_connections if "pg-2" in result.rows else None)
    per_proxy = (result.rows["pg-2"].cpu.get("per_proxy") if "pg-2" in result.rows else None)
    parts.append(
        "  CPU us: CPU time per answer of the proxies (summed), the PostgreSQL backends "
        "serving the\n  bench's database, the balancer.\n  other load: cores busy outside the "
        "benchmark's processes "
        "(the backends above are counted as ours).\n  billed: the setup's key's requests in "
        "the ledger, after the proxies stopped; 2xx: answers the\n  client counted (check "
        "request + warm-up + load); +in flight: billed - 2xx, at most one a connection\n"
        "  and wrk run.\n"
        f"  routstr ledger check on the PostgreSQL database: "
        f"{'ok' if check.get('exit') == 0 else 'FAIL (' + str(check.get('exit')) + ')'}"
        + (f"; balancer connections per process: {split}" if split else "")
        + (f"; CPU s per process: {', '.join(f'{x:.1f}' for x in per_proxy)}"
           if per_proxy else ""))
    if result.error:
        parts.append(f"  PostgreSQL part not run: {result.error}")
    return "\n".join(parts)


def problems(result: ScaleResult) -> list[str]:
    out = []
    if result.error:
        out.append(f"scale-out: {result.error}")
    for name, r in result.rows.items():
        label = f"scale-out, {SETUPS[name]}"
        if r.error:
            out.append(f"{label}: {r.error}")
        if r.load and (r.load.bad_status or r.load.socket_errors):
            out.append(f"{label}: {r.load.bad_status} non-2xx answers and "
                       f"{r.load.socket_errors} socket errors under load")
        if any(c not in (None, 0) for c in r.exit_codes):
            out.append(f"{label}: a proxy exited with code(s) {r.exit_codes} when stopped")
        if r.log_flagged:
            out.append(f"{label}: {len(r.log_flagged)} log line(s) look like errors; first: "
                       f"{r.log_flagged[0][:200]}")
        led = r.ledger or {}
        if "error" in led:
            out.append(f"{label}: reading the ledger failed: {led['error']}")
        elif r.ledger is not None:
            extra = r.billed_extra()
            # Each wrk run (warm-up, load) may leave one request a connection in flight.
            allowed = result.connections * 2
            if extra is not None and not 0 <= extra <= allowed:
                out.append(f"{label}: the ledger billed {led.get('total_requests')} requests "
                           f"but the client counted {r.client_ok()} 2xx answers (allowed: up "
                           f"to {allowed} more billed, in flight when a wrk run stopped)")
            if led.get("open_reservations"):
                out.append(f"{label}: {led['open_reservations']} reservation(s) still open "
                           "after the proxies stopped")
    check = result.pg_ledger_check
    if check is not None and check.get("exit") != 0:
        out.append(f"scale-out: routstr ledger check on PostgreSQL failed (exit "
                   f"{check.get('exit')}): {str(check.get('report'))[:300]}")
    return out
