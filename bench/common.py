"""What the benchmark's phases share: the proxies' environment, keys and their books, a
checked request, log scanning and the tables."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from routstr_addon.settings import SETTINGS

from .client import CHAT_PATH, MODEL, Connection, build_request, chat_body
from .procs import Proc

__all__ = ["BIN", "FUNDING_SATS", "MODELS", "REPO", "SUSPICIOUS", "create_key", "flagged_lines",
           "fmt", "ledger_check", "ledger_state", "preflight", "proxy_env", "table", "tool",
           "wait_quiet"]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FUNDING_SATS = 100_000_000
MODELS = {"data": [{
    "id": MODEL, "context_length": 8192,
    "pricing": {"prompt": "0.000001", "completion": "0.000002", "request": "0"},
    "top_provider": {"max_completion_tokens": 1024},
}]}
# Log lines worth a look after a run.
SUSPICIOUS = re.compile(r"traceback|exception|error|critical|warn|fail", re.IGNORECASE)


def tool(name: str) -> str:
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def proxy_env(upstream: str, data_dir: Path, models: Path,
              mint_url: str | None = None) -> dict[str, str]:
    """The caller's environment without any proxy setting of its own, plus the bench's."""
    ours = {s.env for s in SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(UPSTREAM_BASE_URL=f"{upstream}/v1", BTC_USD_PRICE="100000",
               DATA_DIR=str(data_dir), MODELS_PATH=str(models))
    if mint_url:
        env["CASHU_MINTS"] = mint_url
    return env


def create_key(env: dict[str, str], cwd: Path, sats: int = FUNDING_SATS) -> str:
    out = subprocess.run([tool("routstr"), "keys", "create", "--balance-sats", str(sats)],
                         env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    key = next((ln.strip() for ln in reversed(out.stdout.splitlines())
                if ln.strip().startswith("sk-")), None)
    if out.returncode != 0 or key is None:
        raise RuntimeError(f"routstr keys create failed (code {out.returncode}):\n"
                           f"{out.stdout}\n{out.stderr}")
    return key


def ledger_state(key: str, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    out = subprocess.run([tool("routstr"), "keys", "show", key, "--json"], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:500]}
    state = json.loads(out.stdout)
    return {
        "total_requests": state.get("total_requests"),
        "spent_sats": state.get("total_spent_msat", 0) / 1000,
        "balance_sats": state.get("balance_msat", 0) / 1000,
        "reserved_msat": state.get("reserved_msat"),
        "open_reservations": len(state.get("open_reservations") or []),
    }


def preflight(port: int, key: str | None) -> dict[str, Any]:
    """One chat completion, checked: status 200, a `choices` answer, the proxy's cost header."""
    async def once() -> dict[str, Any]:
        conn = Connection("127.0.0.1", port)
        try:
            resp = await conn.request(build_request("127.0.0.1", port, CHAT_PATH, chat_body(),
                                                    key))
        finally:
            await conn.close()
        ok = resp.status == 200 and b'"choices"' in resp.body
        out: dict[str, Any] = {"status": resp.status, "ok": ok,
                               "cost_msats": resp.headers.get("x-routstr-cost-msats")}
        if not ok:
            out["body"] = resp.body[:500].decode(errors="replace")
        return out

    try:
        return asyncio.run(once())
    except Exception as e:
        return {"status": None, "ok": False, "body": f"{type(e).__name__}: {e}"}


def wait_quiet(max_wait: float, say: Any, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` seconds) for a second in which the machine's cores are busy
    less than ``threshold`` on average: on a shared machine, measure in a quiet moment.
    Returns the busy cores of the last second looked at."""
    from .procs import busy_seconds

    deadline = time.monotonic() + max_wait
    waited = False
    while True:
        before = busy_seconds()
        time.sleep(1.0)
        busy = busy_seconds() - before
        if busy < threshold or time.monotonic() >= deadline:
            if waited:
                say(f"  (waited for a quiet moment: {busy:.2f} cores busy)")
            return busy
        waited = True


def flagged_lines(proc: Proc) -> list[str]:
    """The lines of a process's log that look like trouble."""
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if SUSPICIOUS.search(ln)]


def ledger_check(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """``routstr ledger check --json``: its exit code (0: the books hold) and its report."""
    try:
        out = subprocess.run([tool("routstr"), "ledger", "check", "--json"], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"exit": None, "report": f"{type(e).__name__}: {e}"}
    try:
        report: Any = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = (out.stdout + out.stderr).strip()[:1000]
    return {"exit": out.returncode, "report": report}


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [title, line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)
