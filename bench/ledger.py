"""The ledger's request path on its own: µs per request for a reserve and its settle, on SQLite
(WAL, synchronous=NORMAL, as the proxy runs it) and on PostgreSQL (prepared single-statement
steps), with nothing else in the process.

    python -m bench.ledger [--requests 5000] [--rounds 5] [--postgres URL] [--limited] [--json]

``--limited`` also measures a key with limits (requests at once, a daily budget, a model
allow-list), admitted by the limits' transaction instead of the one-statement reservation.

SQLite's file goes to /dev/shm when there is one (as ``bench.hooks`` does), so the figure is the
ledger's CPU, not the disk's. PostgreSQL is skipped when ``--postgres ''`` is given; otherwise a
database is made for the run on the server the URL names and dropped afterwards. To compare two
trees, run it in each (``PYTHONPATH=/other/tree python -m bench.ledger``): same machine, one
after the other, several rounds, the median.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def rounds_of(url: str, requests: int, rounds: int, limited: bool = False) -> list[float]:
    """µs per reserve + settle, one figure per round."""
    from routstr_addon.ledger import Ledger, Limits

    ledger = Ledger(url)
    try:
        ledger.register_instance()
        _, key = ledger.create_key(10**15)
        if limited:
            ledger.set_limits(key.key_hash, Limits(concurrent=1000, models=("bench-model",),
                                                   budget_msat=10**15, period="daily"))
        out = []
        for r in range(rounds + 1):  # the first round warms up (pages, prepared statements)
            ids = [f"bench-{r}-{i}" for i in range(requests)]
            started = time.perf_counter()
            for rid in ids:
                ledger.reserve(key.key_hash, 9_000, rid, "bench-model")
                ledger.settle(rid, 1_234, model="bench-model", prompt_tokens=10,
                              completion_tokens=20)
            if r:
                out.append((time.perf_counter() - started) / requests * 1e6)
        assert ledger.check() == []
        ledger.unregister_instance()
        return out
    finally:
        ledger.close()


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'ledger.sqlite'}"


def with_postgres(url: str, requests: int, rounds: int, limited: bool = False) -> list[float]:
    import psycopg2

    name = f"bench_ledger_{secrets.token_hex(4)}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    try:
        return rounds_of(url.rsplit("/", 1)[0] + f"/{name}", requests, rounds, limited)
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres", default=DEFAULT_PG,
                        help="a PostgreSQL server to make a database on ('' to skip)")
    parser.add_argument("--limited", action="store_true",
                        help="also a key with limits (the limits' transaction)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    shm = Path("/dev/shm")
    result: dict[str, Any] = {}
    for limited in (False, True) if args.limited else (False,):
        suffix = "_limited" if limited else ""
        with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
            result[f"sqlite{suffix}_us"] = rounds_of(sqlite_url(Path(tmp)), args.requests,
                                                     args.rounds, limited)
        if args.postgres:
            result[f"postgresql{suffix}_us"] = with_postgres(args.postgres, args.requests,
                                                             args.rounds, limited)
    import routstr_addon

    result["code"] = os.path.dirname(os.path.dirname(routstr_addon.__file__))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"reserve + settle, µs per request ({args.requests} a round, {args.rounds} rounds; "
          f"code in {result['code']}):")
    for name in ("sqlite_us", "postgresql_us", "sqlite_limited_us", "postgresql_limited_us"):
        if name in result:
            figures = result[name]
            print(f"  {name.removesuffix('_us'):18} median {statistics.median(figures):7.1f}  "
                  f"best {min(figures):7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
