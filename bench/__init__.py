"""Loopback benchmark of the proxy: ``.venv/bin/python -m bench``.

Starts the demo echo upstream, bare ``mitmdump`` and the proxy (``routstr serve`` and
``mitmdump -s routstr_addon/addon.py``) on 127.0.0.1, drives each with the same load (``wrk``
when installed, else Python worker processes) and prints req/s, latency percentiles, streaming
time to first byte, the proxies' memory and how many requests were really answered and billed.

With a proxy among the targets it also starts a local Nutshell FakeWallet mint and measures the
Cashu payment paths (``bench/cashu.py``): x-cashu JSON and streaming with a fresh token per
request, tokens used as keys, the mint's own swap rate as the ceiling, the mint's round trips
per request, and the proxy's books afterwards. ``--no-xcashu`` skips that.
"""
