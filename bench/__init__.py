"""Loopback benchmark of the proxy: ``.venv/bin/python -m bench``.

Starts the demo echo upstream, bare ``mitmdump`` and the proxy (``routstr serve`` and
``mitmdump -s routstr_addon/addon.py``) on 127.0.0.1, drives each with the same load (``wrk``
when installed, else Python worker processes) and prints req/s, latency percentiles, streaming
time to first byte, the proxies' memory and how many requests were really answered and billed.

With a proxy among the targets it also starts a local Nutshell FakeWallet mint and measures the
Cashu payment paths (``bench/cashu.py``): x-cashu JSON and streaming with a fresh token per
request, tokens used as keys, the mint's own swap rate as the ceiling, the mint's round trips
per request, and the proxy's books afterwards. ``--no-xcashu`` skips that.

Then three phases (each alone with ``--only NAME``):

* ``scaleout`` (``bench/scaleout.py``): 1 ``routstr serve`` on SQLite, 1 on a PostgreSQL
  database of its own, and 2 on that database behind a round-robin balancer
  (``bench/balancer.py``), same wrk load; req/s, latencies, CPU per request of the proxies,
  the database backends and the balancer; billed requests against 2xx answers and
  ``routstr ledger check`` on PostgreSQL.
* ``hooks`` (``bench/hooks.py``, also ``python -m bench.hooks``): the addon's own CPU per
  request in process (mitmproxy's test helpers, pre-built flows), JSON and streamed, with a
  cProfile of each.
* ``soak`` (``bench/soak.py``, opt-in with ``--soak``): 100,000 funded-key requests in one wrk
  run, the proxy's RSS (and the SQLite WAL) sampled every 10,000; ``--soak-probe`` and
  ``--soak-trace`` run the proxy under ``bench/memserve.py`` to see what grows (objects by
  type, glibc's heap, SQLite, tracemalloc by file:line).
"""
