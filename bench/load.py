"""Non-streaming load: wrk with a Lua script when installed, else Python worker processes."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .client import CHAT_PATH, build_request, chat_body, percentile
from .procs import Processes

__all__ = ["LoadResult", "WrkRun", "run_python_load", "run_wrk", "wrk_version"]

REPO = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class LoadResult:
    generator: str  # wrk | python
    requests: int  # answers completed in the measured window
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    bad_status: int  # non-2xx answers (wrk: status >= 400, its "Non-2xx or 3xx responses")
    socket_errors: int  # connect/read/write errors and timeouts
    statuses: dict[str, int] | None = None  # exact per-status counts (Python generator only)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# wrk builds the request once from these globals (no per-request Lua), and prints the summary
# as one JSON line from `done`.
_LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%.0f,"duration_us":%.0f,"connect":%.0f,"read":%.0f,'
    .. '"write":%.0f,"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p90_us":%.0f,'
    .. '"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
"""


def wrk_version(wrk: str) -> str:
    try:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
        else "?"


def _wrk_cmd(wrk: str, port: int, key: str | None, script_dir: Path, connections: int,
             threads: int, duration: float, timeout: float) -> list[str]:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script = script_dir / f"chat-{port}.lua"
    script.write_text(_LUA.format(body=chat_body().decode(), auth=auth))
    threads = max(1, min(threads, connections))
    return [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
            f"--timeout={max(1, round(timeout))}s", "-s", str(script),
            f"http://127.0.0.1:{port}{CHAT_PATH}"]


def _wrk_result(code: int | None, stdout: str, stderr: str) -> LoadResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk failed (code {code}):\n{stdout}\n{stderr}")
    s = json.loads(line.split(" ", 1)[1])
    secs = s["duration_us"] / 1e6
    return LoadResult(
        generator="wrk", requests=int(s["requests"]), duration_s=secs,
        rps=s["requests"] / secs if secs else 0.0,
        p50_ms=s["p50_us"] / 1000, p90_ms=s["p90_us"] / 1000, p99_ms=s["p99_us"] / 1000,
        mean_ms=s["mean_us"] / 1000, max_ms=s["max_us"] / 1000, bad_status=int(s["status"]),
        socket_errors=int(s["connect"] + s["read"] + s["write"] + s["timeout"]),
    )


def run_wrk(wrk: str, port: int, key: str | None, script_dir: Path, *, connections: int,
            threads: int, duration: float, timeout: float = 5.0) -> LoadResult:
    cmd = _wrk_cmd(wrk, port, key, script_dir, connections, threads, duration, timeout)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    return _wrk_result(out.returncode, out.stdout, out.stderr)


class WrkRun:
    """wrk in the background, stopped when the caller has seen enough: SIGINT makes wrk end
    its run early and still print its summary."""

    def __init__(self, wrk: str, port: int, key: str | None, script_dir: Path, *,
                 connections: int, threads: int, max_duration: float,
                 timeout: float = 5.0) -> None:
        cmd = _wrk_cmd(wrk, port, key, script_dir, connections, threads, max_duration, timeout)
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> LoadResult:
        if self.alive():
            self.popen.send_signal(signal.SIGINT)
        try:
            stdout, stderr = self.popen.communicate(timeout=timeout)
        except BaseException:
            self.popen.kill()
            self.popen.wait()
            raise
        return _wrk_result(self.popen.returncode, stdout, stderr)


def run_python_load(procs: Processes, port: int, key: str | None, script_dir: Path, *,
                    connections: int, workers: int, warmup: float,
                    duration: float) -> LoadResult:
    """``workers`` processes sharing ``connections``, measured over the same wall-clock window."""
    request_file = script_dir / f"chat-{port}.http"
    request_file.write_bytes(build_request("127.0.0.1", port, CHAT_PATH, chat_body(), key))
    workers = max(1, min(workers, connections))
    shares = [connections // workers + (1 if i < connections % workers else 0)
              for i in range(workers)]
    start_at = time.time() + 1.5  # time for the workers to import
    started = [
        procs.start(f"pyload-{port}-{i}", [
            sys.executable, "-m", "bench.pyload", "--port", str(port),
            "--request-file", str(request_file), "--connections", str(n),
            "--start-at", repr(start_at), "--warmup", str(warmup), "--duration", str(duration),
        ], cwd=REPO, stdout_pipe=True)
        for i, n in enumerate(shares)
    ]
    latencies: list[int] = []
    statuses: dict[str, int] = {}
    errors = 0
    try:
        for proc in started:
            stdout, _ = proc.popen.communicate(timeout=warmup + duration + 60)
            if proc.popen.returncode != 0:
                raise RuntimeError(f"{proc.name} failed (code {proc.popen.returncode}):\n"
                                   + proc.log_tail())
            part = json.loads(stdout)
            latencies += part["latencies_us"]
            errors += part["socket_errors"]
            for k, v in part["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
    finally:
        for proc in started:
            procs.stop(proc)
    latencies.sort()
    n = len(latencies)
    return LoadResult(
        generator="python", requests=n, duration_s=duration, rps=n / duration,
        p50_ms=percentile(latencies, 50) / 1000, p90_ms=percentile(latencies, 90) / 1000,
        p99_ms=percentile(latencies, 99) / 1000,
        mean_ms=sum(latencies) / n / 1000 if n else math.nan,
        max_ms=latencies[-1] / 1000 if n else math.nan,
        bad_status=sum(v for k, v in statuses.items() if not 200 <= int(k) < 300),
        socket_errors=errors, statuses=statuses,
    )
