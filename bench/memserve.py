"""``routstr serve`` with a memory probe, for finding what grows in a soak:

    python [-X tracemalloc=FRAMES] -m bench.memserve DIR serve --listen-port … --quiet

On SIGUSR1 the process collects its garbage, then writes, numbered n = 1, 2, …:
``DIR/snap-n.pickle`` (a tracemalloc snapshot, when tracing), ``DIR/gc-n.json`` (live objects
the collector tracks, counted by type; tracemalloc's totals; and the C side: glibc's heap in
use and free (mallinfo2), SQLite's own allocations, RssAnon/RssFile/RssShmem, threads, open
files) and last ``DIR/done-n``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["main"]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _native() -> dict[str, Any]:
    """What the C side holds: glibc's heap (in use and free), SQLite's own allocations, the
    kinds of resident memory, threads and open files."""
    out: dict[str, Any] = {}
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        mi = libc.mallinfo2()
        out["malloc_in_use"] = mi.uordblks + mi.hblkhd  # arena blocks in use + mmapped ones
        out["malloc_free"] = mi.fordblks  # free but kept by malloc (fragmentation, top pad)
        out["malloc_arena"] = mi.arena
        out["malloc_mmapped"] = mi.hblkhd
    except (OSError, AttributeError):
        pass
    try:
        sqlite = ctypes.CDLL("libsqlite3.so.0")  # the library _sqlite3 links: one instance
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
        sqlite.sqlite3_memory_highwater.restype = ctypes.c_int64
        out["sqlite_memory_used"] = sqlite.sqlite3_memory_used()
        out["sqlite_memory_highwater"] = sqlite.sqlite3_memory_highwater(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                    out[name] = int(value.split()[0])
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


def _probe(out: Path, n: int) -> None:
    native = _native()  # before anything here allocates or frees
    gc.collect()
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(out / f"snap-{n}.pickle"))
    counts = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    traced = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else None
    (out / f"gc-{n}.json").write_text(json.dumps({
        "objects": sum(counts.values()), "frozen": gc.get_freeze_count(),
        "garbage": len(gc.garbage), "traced_bytes": traced[0] if traced else None,
        "native": native, "by_type": dict(counts.most_common(200))}))
    (out / f"done-{n}").write_text("")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    taken = [0]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        taken[0] += 1
        _probe(out, taken[0])

    signal.signal(signal.SIGUSR1, on_signal)
    sys.argv = ["routstr", *sys.argv[2:]]
    from cli.main import app

    app()


if __name__ == "__main__":
    main()
