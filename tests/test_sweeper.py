"""Every reservation ends: crashes, long streams and hung upstreams, with real processes."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from routstr_addon.ledger import Ledger, hash_key
from routstr_addon.metering.meter import Meter
from routstr_addon.metering.pricing import Pricing, load_models
from routstr_addon.metering.sweeper import Sweeper
from routstr_addon.settings import load_config

from .conftest import MODELS, Proxy, expected_msat, start_proxy

MODEL = "test/model"
MESSAGES = [{"role": "user", "content": "hello"}]


def entries(proxy: Proxy, key: str) -> list[dict[str, Any]]:
    ledger = proxy.ledger()
    try:
        return ledger.entries(hash_key(key), limit=100)
    finally:
        ledger.close()


def test_kill_9_mid_stream_then_restart_settles_what_was_delivered(upstream: Any,
                                                                   tmp_path: Path) -> None:
    env = {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "RESERVATION_TIMEOUT": "6"}
    first = start_proxy(tmp_path / "p", upstream.url, env)
    key = first.new_key(sats=100)
    received = 0
    with httpx.Client(base_url=first.url, timeout=30) as client, client.stream(
            "POST", "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES,
                                                  "stream": True},
            headers={"authorization": f"Bearer {key}", "x-scenario": "endless"}) as resp:
        lines = resp.iter_lines()  # kept open: the client stays connected through the crash
        while received < 12:  # ~2.4 s of stream: touched at least once after the first chunk
            if next(lines).startswith("data: {"):
                received += 1
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    held = first.open_reservations()
    assert len(held) == 1 and held[0]["delivered"] > 0  # what the crash left behind

    second = start_proxy(tmp_path / "p", upstream.url, env)
    try:
        second.wait_settled(timeout=15)
        (charge,) = [e for e in entries(second, key) if e["kind"] == "charge"]
        assert charge["note"] == "swept: estimated from what was delivered"
        assert charge["completion_tokens"] == -(-held[0]["delivered"] // 4)
        assert -charge["amount_msat"] == expected_msat(MODEL, charge["prompt_tokens"],
                                                       charge["completion_tokens"])
        state = second.key_state(key)
        assert state.reserved_msat == 0 and state.balance_msat == 100_000 + charge["amount_msat"]
        assert second.check() == []
    finally:
        second.stop()


def test_stream_longer_than_the_reservation_timeout_is_charged_exactly(
        upstream: Any, tmp_path: Path) -> None:
    p = start_proxy(tmp_path / "p", upstream.url,
                    {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "RESERVATION_TIMEOUT": "2"})
    try:
        key = p.new_key(sats=100)
        client = p.client(key, default_headers={"x-scenario": "slow"})
        start = time.monotonic()
        words = "one two three four five six seven"
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": words}], stream=True))
        assert time.monotonic() - start > 4  # twice the timeout
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        p.wait_settled()
        (charge,) = [e for e in entries(p, key) if e["kind"] == "charge"]
        assert charge["note"] is None  # the reported usage, not a sweep
        assert len(text.split()) == 12
        assert -charge["amount_msat"] == expected_msat(MODEL, 7, 12)
        assert p.check() == []
    finally:
        p.stop()


def test_a_hung_request_is_released_after_the_timeout(upstream: Any, tmp_path: Path) -> None:
    p = start_proxy(tmp_path / "p", upstream.url,
                    {"UPSTREAM_BASE_URL": f"{upstream.url}/v1", "RESERVATION_TIMEOUT": "2"})
    try:
        key = p.new_key(sats=100)
        with (httpx.Client(base_url=p.url, timeout=6) as client,
              contextlib.suppress(httpx.TimeoutException)):
            client.post("/v1/chat/completions",
                        json={"model": MODEL, "messages": MESSAGES},
                        headers={"authorization": f"Bearer {key}", "x-scenario": "hang"})
        kinds = [e["kind"] for e in entries(p, key)]
        assert kinds == ["credit", "reserve", "release"]
        state = p.key_state(key)
        assert state.balance_msat == 100_000 and state.reserved_msat == 0
        assert p.check() == []
    finally:
        p.stop()


def test_sweeper_leaves_live_processes_alone_and_closes_dead_ones(tmp_path: Path) -> None:
    models = tmp_path / "models.json"
    models.write_text(json.dumps(MODELS))
    config = load_config({"DATA_DIR": str(tmp_path), "MODELS_PATH": str(models),
                          "BTC_USD_PRICE": "91234.56", "RESERVATION_TIMEOUT": "60"})
    pricing = Pricing(load_models(models), config.exchange_fee, config.upstream_provider_fee)
    pricing.set_rate(config.btc_usd_price)  # type: ignore[arg-type]
    ledger = Ledger(config.database_url)
    other = Ledger(config.database_url)
    try:
        _key, state = ledger.create_key(50_000)
        other.register_instance()  # a live process (this one)
        other.reserve(state.key_hash, 10_000, "live-request", MODEL)
        # A process of this host that is gone (no such pid), with a request that delivered text.
        with ledger.transaction() as tx:
            tx.execute("INSERT INTO instances VALUES ('dead', ?, 999999999, 0, ?)",
                        (socket.gethostname(), time.time()))
        ledger.instance_id = "dead"
        ledger.reserve(state.key_hash, 10_000, "dead-request", MODEL)
        ledger.touch("dead-request", delivered=40, prompt_tokens=3)
        ledger.reserve(state.key_hash, 10_000, "dead-silent", MODEL)
        ledger.instance_id = None

        closed = {s.request_id: s for s in Sweeper(Meter(config, ledger, pricing)).sweep()}
        assert set(closed) == {"dead-request", "dead-silent"}
        assert closed["dead-request"].charged_msat == expected_msat(MODEL, 3, 10)
        assert closed["dead-silent"].charged_msat == 0
        assert [r["request_id"] for r in ledger.open_reservations()] == ["live-request"]
        alive, gone = ledger.instances(30)
        assert gone == set() and alive == {other.instance_id}
        assert ledger.check() == []
    finally:
        other.close()
        ledger.close()
