"""``example.py`` (the official OpenAI client paying with ecash) against a proxy taking ecash
from a real mint: the costs it prints are the ledger's charges, and the token it ends with holds
what is left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from routstr_addon.ledger import Ledger

from .conftest import ROOT, Proxy
from .ecash_user import UserWallet

PROMPTS = ["first question", "second, longer question about ecash", "third"]


def run_example(proxy: Proxy, token: str, *args: str) -> str:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "example.py"), "--base-url", proxy.v1, *prompts, *args],
        env={"PATH": os.environ["PATH"], "CASHU_TOKEN": token}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def charges_since(proxy: Proxy, last_id: int) -> list[dict[str, Any]]:
    ledger: Ledger = proxy.ledger()
    try:
        return [e for e in ledger.entries(limit=1000) if e["id"] > last_id
                and e["kind"] == "charge"]
    finally:
        ledger.close()


def last_entry(proxy: Proxy) -> int:
    ledger = proxy.ledger()
    try:
        rows = ledger.entries(limit=1)
        return int(rows[-1]["id"]) if rows else 0
    finally:
        ledger.close()


def test_example_pays_each_request_with_x_cashu_and_keeps_the_change(
        make_proxy: Callable[..., Proxy], mint: Any, user: UserWallet) -> None:
    proxy = make_proxy({"CASHU_MINTS": mint.url})
    before = last_entry(proxy)
    out = run_example(proxy, user.token(500), "--model", "test/model")
    printed = [(int(c), int(s)) for c, s in re.findall(r"cost (\d+) msat · change (\d+) sat", out)]
    assert len(printed) == len(PROMPTS), out
    # Per request: its charge, then (the change being whole sats) the rest of a sat.
    charges = charges_since(proxy, before)
    costs = [-e["amount_msat"] for e in charges if e["model"] == "test/model"]
    assert [c for c, _ in printed] == costs
    assert len({e["key_hash"] for e in charges}) == len(PROMPTS)  # one payment per request
    rounded = [int(r) for r in re.findall(r"\((\d+) msat rounded away", out)]
    value = 500
    for (cost, change), rest in zip(printed, rounded, strict=True):
        assert value * 1000 - cost - rest == change * 1000
        value = change
    for prompt in PROMPTS:  # the streamed answers (the echo model repeats the prompt)
        assert f"> [demo echo, no real model] {prompt}" in out
    final = re.search(r"spent (\d+) msat \(\+(\d+) msat rounding\); remaining (\d+) sat in "
                      r"this token \(keep it\):\n(cashu\S+)", out)
    assert final is not None, out
    spent, rounding, remaining, token = (*map(int, final.groups()[:3]), final.group(4))
    assert spent == sum(costs) and rounding == sum(rounded)
    assert remaining == printed[-1][1] == user.amount(token)
    assert (500 - remaining) * 1000 == spent + rounding
    assert user.receive(token) == remaining  # the change is real money
    proxy.wait_settled()
    assert proxy.check() == []


def test_example_uses_the_token_as_the_key(make_proxy: Callable[..., Proxy], mint: Any,
                                           user: UserWallet) -> None:
    proxy = make_proxy({"CASHU_MINTS": mint.url})
    before = last_entry(proxy)
    out = run_example(proxy, user.token(200), "--as-key")  # the model: the first listed
    printed = [(int(c), int(b)) for c, b in
               re.findall(r"cost (\d+) msat · left on the key (\d+) msat", out)]
    assert len(printed) == len(PROMPTS), out
    charges = charges_since(proxy, before)
    assert [c for c, _ in printed] == [-e["amount_msat"] for e in charges]
    [key_hash] = {e["key_hash"] for e in charges}
    ledger = proxy.ledger()
    try:
        state = ledger.key(key_hash)
    finally:
        ledger.close()
    assert state is not None and state.available_msat == printed[-1][1]
    assert state.balance_msat == 200_000 - sum(c for c, _ in printed)
