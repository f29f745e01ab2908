"""x-cashu with no mint on the request path (issue 15), against the other ways to pay.

    python -m bench.locked [--requests 400] [--connections 8]

One proxy (mitmdump with the addon, SQLite), the demo echo upstream and a local FakeWallet
mint, in processes of their own; tokens are made before anything is timed. Measured, JSON
chat completions, each phase at the same concurrency:

* ``key``      a funded key (``Authorization: Bearer sk-…``): the ceiling;
* ``swap``     x-cashu with a plain token: one swap at the mint per request (the mint is up);
* ``p2pk-3``   x-cashu with a token of 3 proofs locked to the proxy's payment key, accepted
               offline, change from the pool: **the mint is stopped** for this phase;
* ``p2pk-8``   the same with 8 proofs (the offline checks cost per proof).

Then the mint is started again and the received locked proofs are redeemed in batch swaps
(timed). The change pool is stocked before the run with proofs minted at the mint and put in
the proxy's ledger directly (the operator's ecash; a real proxy stocks it from its own pool in
the background). Every answer must be 200 with change in its ``X-Cashu`` header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routstr_addon.dev.localmint import LocalMint

from .cashu import MintLog, Phase, TokenMaker, max_cost_sats, run_phase
from .common import MODELS, REPO, create_key, fmt, proxy_env, table, tool
from .procs import Processes, free_port, read_line, wait_port
from .xload import Job

__all__ = ["main"]

MAX_OUTPUTS = 990  # nutshell refuses more than 1000 outputs in one request


def locked_secret(pubkey: str) -> str:
    """A NUT-10 P2PK secret as cashu-ts writes it for a request with no tags."""
    return json.dumps(["P2PK", {"nonce": secrets.token_hex(32), "data": pubkey, "tags": []}],
                      separators=(",", ":"))


async def _mint(url: str, wanted: Sequence[tuple[str | None, int]]) -> list[Any]:
    """Proofs for (secret or None for a random one, amount), with their DLEQ proofs."""
    from cashu.core.crypto.b_dhke import step1_alice

    from routstr_addon.ecash.wallet import MintWallet

    wallet = MintWallet(url)
    proofs: list[Any] = []
    try:
        await wallet.load()
        keyset = wallet.active("sat")
        for start in range(0, len(wanted), MAX_OUTPUTS):
            chunk = [(s or secrets.token_hex(32), a) for s, a in wanted[start:start + MAX_OUTPUTS]]
            quote = await wallet.client.mint_quote(sum(a for _, a in chunk), "sat")
            for _ in range(400):
                if (await wallet.client.mint_quote_state(quote["quote"]))["state"] == "PAID":
                    break
                await asyncio.sleep(0.05)
            outputs, rs = [], []
            for secret, amount in chunk:
                b_, r = step1_alice(secret)
                outputs.append({"amount": amount, "id": keyset.id, "B_": b_.format().hex()})
                rs.append(r)
            signatures = await wallet.client.mint(quote["quote"], outputs)
            proofs += wallet.unblind(signatures, outputs, [s for s, _ in chunk], rs)
    finally:
        await wallet.client.aclose()
    return proofs


def locked_tokens(url: str, pubkey: str, amounts: Sequence[int], count: int) -> list[str]:
    from routstr_addon.ecash.tokens import serialize_token

    proofs = asyncio.run(_mint(url, [(locked_secret(pubkey), a)
                                     for _ in range(count) for a in amounts]))
    k = len(amounts)
    return [serialize_token(url, "sat", proofs[i * k:(i + 1) * k]) for i in range(count)]


def stock_pool(url: str, database_url: str, amounts: Sequence[int]) -> int:
    """Put freshly minted proofs of ``amounts`` in the proxy's ledger as its unspent pool."""
    from routstr_addon.ecash.wallet import record_of
    from routstr_addon.ledger import Ledger

    proofs = asyncio.run(_mint(url, [(None, a) for a in amounts]))
    ledger = Ledger(database_url)
    try:
        with ledger.transaction(durable=True) as tx:
            ledger.proofs.add(tx, url, "sat", [record_of(p) for p in proofs], "unspent")
    finally:
        ledger.close()
    return sum(amounts)


def redeem_all(url: str, database_url: str, mnemonic: str) -> tuple[int, float, int]:
    """Batch-swap every received locked proof: (proofs redeemed, seconds, lost)."""
    from routstr_addon.ecash.seed import seed_from_mnemonic
    from routstr_addon.ecash.wallet import Wallet
    from routstr_addon.ledger import Ledger
    from routstr_addon.payments.locked import LockedPayments

    async def run() -> tuple[int, float, int]:
        ledger = Ledger(database_url)
        wallet = Wallet(ledger, [url], seed=seed_from_mnemonic(mnemonic))
        redeemed = lost = 0
        try:
            await wallet.start()
            locked = LockedPayments(ledger, wallet, 0)
            t0 = time.perf_counter()
            while True:
                result = await locked.redeem()
                redeemed += result.redeemed
                lost += result.lost
                if not result.redeemed:
                    break
            return redeemed, time.perf_counter() - t0, lost
        finally:
            await wallet.close()
            ledger.close()

    return asyncio.run(run())


def bits(total: int) -> list[int]:
    return [1 << i for i in range(total.bit_length()) if total >> i & 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per phase (default 400)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    from mnemonic import Mnemonic

    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    n, c = args.requests, args.connections
    with tempfile.TemporaryDirectory(prefix="bench-locked-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp / "logs")
        mint = LocalMint(tmp / "mint")
        try:
            mint.start()
            mint_log = MintLog(tmp / "mint" / "mint.log")
            upstream = procs.start("upstream", [sys.executable, "-m", "bench.upstream"],
                                   cwd=REPO, stdout_pipe=True)
            upstream_url = f"http://127.0.0.1:{int(read_line(upstream, 30))}"
            models = tmp / "models.json"
            models.write_text(json.dumps(MODELS))
            data_dir = tmp / "proxy"
            data_dir.mkdir()
            mnemonic = Mnemonic("english").generate(128)
            env = {**proxy_env(upstream_url, data_dir, models, mint.url),
                   "WALLET_MNEMONIC": mnemonic, "CHANGE_POOL_PER_AMOUNT": "0",
                   "LOCKED_REDEEM_INTERVAL": "36000"}
            key = create_key(env, data_dir)
            port = free_port()
            proxy = procs.start("proxy", [tool("mitmdump"), "-q", "--mode",
                                          f"reverse:{upstream_url}", "--listen-host",
                                          "127.0.0.1", "-p", str(port), "-s",
                                          str(REPO / "routstr_addon" / "addon.py")],
                                env=env, cwd=data_dir)
            wait_port(proxy, port)
            time.sleep(1.0)  # the wallet loads the mint's keysets and info in the background
            import httpx

            pubkey = httpx.get(f"http://127.0.0.1:{port}/v1/info", timeout=10).json()[
                "payment_key"]
            need = math.ceil(max_cost_sats(port))
            top = 1 << need.bit_length()  # at least the maximum cost
            three = [top, 2, 1]
            eight = [top, 64, 32, 16, 8, 4, 2, 1]
            warm = 2 * c
            say(f"max cost {need} sats; tokens: plain {need + 3}, locked {three} and {eight}")
            t0 = time.perf_counter()
            maker = TokenMaker(mint.url, tmp / "user")
            plain = maker.tokens(need + 3, n + warm)
            p3 = locked_tokens(mint.url, pubkey, three, n + warm)
            p8 = locked_tokens(mint.url, pubkey, eight, n)
            # Change of a locked request: the token less its cost (≥ 1 sat): at most its value.
            # Stock each amount the change may need, as many times as there are requests.
            ladder = [1 << i for i in range((sum(eight)).bit_length())]
            stocked = stock_pool(mint.url, env.get("DATABASE_URL") or
                                 f"sqlite:///{data_dir / 'routstr.sqlite'}",
                                 ladder * (2 * n + warm))
            say(f"tokens made and pool stocked ({stocked} sats) in "
                f"{time.perf_counter() - t0:.1f} s")
            cpu_of = {"proxy": proxy.pid}
            workers = 2 if c > 1 else 1
            phases: dict[str, Phase] = {}

            def phase(name: str, mode: str, tokens: list[str], log: MintLog | None) -> Phase:
                result = run_phase(procs, tmp, name, Job(mode=mode, tokens=tokens,
                                                         connections=c, port=port),
                                   workers, log, cpu_of)
                phases[name] = result
                say(f"{name}: {result.rate:.0f} req/s, p99 {result.p(99):.1f} ms, "
                    f"{result.good}/{result.requests} ok, mint calls {result.mint_calls}")
                return result

            phase("key-warm", "bearer", [key] * warm, None)
            phase("key", "bearer", [key] * n, None)
            phase("swap-warm", "xcashu", plain[:warm], None)
            phase("swap", "xcashu", plain[warm:], mint_log)
            mint.stop()
            mark = mint_log.mark()
            phase("p2pk-warm", "xcashu", p3[:warm], None)
            phase("p2pk-3", "xcashu", p3[warm:], mint_log)
            phase("p2pk-8", "xcashu", p8, mint_log)
            mint_lines = mint_log.calls_since(mark)
            mint.start()
            redeemed, redeem_s, lost = redeem_all(
                mint.url, env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'routstr.sqlite'}",
                mnemonic)
        finally:
            procs.stop_all()
            mint.stop()
        key_p, swap_p = phases["key"], phases["swap"]
        rows = []
        for name in ("key", "swap", "p2pk-3", "p2pk-8"):
            p = phases[name]
            rows.append([name, fmt(p.rate, 0), fmt(p.p(50)), fmt(p.p(99)),
                         f"{p.good}/{p.requests}", fmt(p.cpu_ms("proxy")),
                         fmt(p.rate / swap_p.rate if swap_p.rate else math.nan, 1) + "×",
                         fmt(p.rate / key_p.rate if key_p.rate else math.nan, 2)])
        print(table(f"x-cashu, JSON, {c} connections, {n} requests a phase "
                    "(the mint stopped for p2pk-*)",
                    ["phase", "req/s", "p50 ms", "p99 ms", "ok", "proxy CPU ms/req",
                     "vs swap", "of key"], rows))
        print(f"mint requests during the p2pk phases: {sum(mint_lines.values())}")
        print(f"batch redemption afterwards: {redeemed} locked proofs in {redeem_s:.2f} s "
              f"({redeemed / redeem_s if redeem_s else math.nan:.0f} proofs/s), {lost} lost")
        if args.json:
            args.json.write_text(json.dumps({
                "phases": {k: v.summary() for k, v in phases.items()},
                "mint_requests_during_p2pk": sum(mint_lines.values()),
                "redeemed": redeemed, "redeem_s": redeem_s, "lost": lost}, default=str))
    bad = [p for p in phases.values() if p.good != p.requests]
    return 1 if bad or sum(mint_lines.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
