"""Several providers behind a real mitmdump: each a process of its own (tests/provider_proc.py)
with its own price and behaviour; requests from the official openai client.

What is checked: the cheapest healthy provider answers, under its own model id, charged its
own price and named in ``x-routstr-provider``; a provider that refuses, answers 500 or 429, or
says nothing in time is skipped before any byte reaches the client, for JSON and streams; a
provider killed in the middle of a burst costs no request; the catalog follows a stand-in for
OpenRouter's list and starts from its snapshot with no network; a bad providers file stops
start-up with one line.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from math import ceil
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletionMessageParam

from routstr_addon.dev.localmint import LocalMint

from .conftest import BIN, EXCHANGE_FEE, RATE, ROOT, Proxy, start_proxy
from .ecash_user import UserWallet
from .model_lists import ModelLists

MODEL = "test/model"
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello providers"}]


def price(prompt: str, completion: str) -> dict[str, Any]:
    return {"id": MODEL, "context_length": 4096,
            "pricing": {"prompt": prompt, "completion": completion, "request": "0"},
            "top_provider": {"max_completion_tokens": 512}}


CHEAP = price("0.000001", "0.000002")
MIDDLE = price("0.000002", "0.000003")
DEAR = price("0.000004", "0.000008")


def expected(entry: dict[str, Any], fee: str, prompt: int, completion: int) -> int:
    p = entry["pricing"]
    usd = prompt * Fraction(p["prompt"]) + completion * Fraction(p["completion"])
    return ceil(usd * Fraction(EXCHANGE_FEE) * Fraction(fee) * 10**11 / Fraction(RATE))


class ProviderProc:
    def __init__(self, mode: str, port: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.provider_proc", mode,
                                      str(port)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening "), line
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def seen(self) -> list[dict[str, str]]:
        result: list[dict[str, str]] = httpx.get(f"{self.url}/seen", timeout=10).json()
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def providers() -> Iterator[Any]:
    started: list[ProviderProc] = []

    def start(mode: str = "ok", port: int = 0) -> ProviderProc:
        p = ProviderProc(mode, port)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provider(name: str, url: str, entry: dict[str, Any], fee: str = "1.05",
             **extra: Any) -> dict[str, Any]:
    return {"name": name, "base_url": f"{url}/v1", "api_key": f"sk-{name}", "fee": fee,
            "models": [{**entry, "upstream_id": f"{name}-model"}], **extra}


def start(tmp_path: Path, listed: list[dict[str, Any]], **env: str) -> Proxy:
    path = tmp_path / "providers.json"
    path.write_text(json.dumps({"providers": listed}))
    first = listed[0]["base_url"].removesuffix("/v1")
    return start_proxy(tmp_path / "proxy", first, {"PROVIDERS_PATH": str(path), **env})


def test_cheapest_provider_answers_under_its_model_id_at_its_price(
        tmp_path: Path, providers: Any) -> None:
    dear, cheap = providers(), providers()
    proxy = start(tmp_path, [provider("dear", dear.url, DEAR),
                             provider("cheap", cheap.url, CHEAP, headers={"X-Title": "r"})])
    try:
        key = proxy.new_key(sats=1000)
        client = proxy.client(key)
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG)
        assert raw.headers["x-routstr-provider"] == "cheap"
        usage = raw.parse().usage
        assert usage is not None
        charged = expected(CHEAP, "1.05", usage.prompt_tokens, usage.completion_tokens)
        assert int(raw.headers["x-routstr-cost-msats"]) == charged
        assert proxy.key_state(key).total_spent_msat == charged
        (seen,) = cheap.seen()
        assert seen["model"] == "cheap-model" and seen["auth"] == "Bearer sk-cheap"
        assert seen["x-title"] == "r" and seen["path"] == "/v1/chat/completions"
        assert dear.seen() == []
        # A stream: the same provider, its price in the trailer.
        stream = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MSG, stream=True,
            stream_options={"include_usage": True})
        assert stream.headers["x-routstr-provider"] == "cheap"
        chunks = list(stream.parse())
        last = chunks[-1].usage
        assert last is not None
        spent = charged + expected(CHEAP, "1.05", last.prompt_tokens, last.completion_tokens)
        assert proxy.key_state(key).total_spent_msat == spent
        # /v1/models: the model once, priced by the provider that would serve it now.
        (listed,) = [m for m in client.models.list().data if m.id == MODEL]
        sats = listed.model_extra["sats_pricing"]  # type: ignore[index]
        assert sats["prompt"] == pytest.approx(
            float(Fraction("0.000001") * Fraction(EXCHANGE_FEE) * Fraction("1.05") * 10**8
                  / Fraction(RATE)))
    finally:
        proxy.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_failing_providers_are_skipped_before_the_first_byte(
        tmp_path: Path, providers: Any, stream: bool) -> None:
    refusing = f"http://127.0.0.1:{closed_port()}"
    err500, err429, hang, healthy = (providers("error-500"), providers("error-429"),
                                     providers("hang"), providers())
    cheapest = [price(f"0.00000{i}", "0.000001") for i in (1, 2, 3, 4)]
    proxy = start(tmp_path, [
        provider("refusing", refusing, cheapest[0]),
        provider("err500", err500.url, cheapest[1]),
        provider("err429", err429.url, cheapest[2]),
        provider("hang", hang.url, cheapest[3]),
        provider("healthy", healthy.url, DEAR, fee="1.2"),
    ], UPSTREAM_CONNECT_TIMEOUT="1", ADMIN_PASSWORD="providers-admin")
    try:
        key = proxy.new_key(sats=1000)
        client = proxy.client(key)
        if stream:
            streamed = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MSG, max_tokens=50, stream=True,
                stream_options={"include_usage": True})
            assert streamed.headers["x-routstr-provider"] == "healthy"
            # reserved at the dearest candidate: the healthy one (its fee is the highest too)
            reserved = int(streamed.headers["x-routstr-reserved-msats"])
            assert reserved >= expected(DEAR, "1.2", 0, 50)
            usage = list(streamed.parse())[-1].usage
        else:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MSG, max_tokens=50)
            assert raw.headers["x-routstr-provider"] == "healthy"
            usage = raw.parse().usage
        assert usage is not None
        charged = expected(DEAR, "1.2", usage.prompt_tokens, usage.completion_tokens)
        state = proxy.key_state(key)
        assert state.total_spent_msat == charged and state.reserved_msat == 0
        assert [s["model"] for s in healthy.seen()] == ["healthy-model"]
        # The journal says who was paid, after how many attempts.
        ledger = proxy.ledger()
        try:
            notes = [e.get("note") or "" for e in ledger.entries(limit=10)]
        finally:
            ledger.close()
        assert any("provider healthy (attempt 5)" in n for n in notes), notes
        assert [s["model"] for s in err500.seen()] == ["err500-model"]
        assert [s["model"] for s in err429.seen()] == ["err429-model"]
        # The log names each attempt (never a key).
        text = "\n".join(proxy.output.lines)
        for name in ("refusing", "err500", "err429", "hang"):
            assert f"provider {name} " in text
        assert "sk-healthy" not in text and "sk-err500" not in text
        # A second request: the refusing provider's breaker is open, it is not tried again.
        again = client.chat.completions.with_raw_response.create(model=MODEL, messages=MSG,
                                                                 max_tokens=5)
        assert again.headers["x-routstr-provider"] == "healthy"
        assert "\n".join(proxy.output.lines).count("provider refusing failed") == 1
        # /admin shows each provider's state (the refusing one skipped), never a key.
        with httpx.Client(base_url=proxy.url, timeout=10) as admin:
            admin.post("/admin/login", data={"password": "providers-admin"})
            page = admin.get("/admin/providers").text
        rows = {name: page.split(f"<td>{name}</td>", 1)[1].split("</tr>", 1)[0]
                for name in ("refusing", "err500", "healthy")}
        assert "skipped" in rows["refusing"] and "in use" in rows["healthy"]
        assert "HTTP 500" in rows["err500"]
        assert "sk-" not in page
        # /ready shows each provider's breaker (names and figures, no URL or key).
        ready = httpx.get(f"{proxy.url}/ready", timeout=30).json()
        states = {p["name"]: p["state"] for p in ready["providers"]}
        assert states["refusing"] == "open" and states["healthy"] == "closed"
        assert "127.0.0.1" not in json.dumps(ready["providers"])
        # `routstr upstreams health` asks each provider now.
        out = subprocess.run([str(BIN / "routstr"), "upstreams", "health", "--json",
                              "--wait", "2"], env=proxy.env, cwd=proxy.workdir,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1  # not all answer
        asked = {h["name"]: h for h in json.loads(out.stdout)["providers"]}
        assert not asked["refusing"]["ok"] and "ConnectError" in asked["refusing"]["error"]
        assert asked["healthy"]["ok"] and asked["healthy"]["models"] == 1
    finally:
        proxy.stop()


def test_after_the_first_byte_the_answer_is_that_providers(tmp_path: Path,
                                                           providers: Any) -> None:
    cutter, spare = providers("cut"), providers()
    proxy = start(tmp_path, [provider("cutter", cutter.url, CHEAP),
                             provider("spare", spare.url, DEAR)])
    try:
        key = proxy.new_key(sats=1000)
        with httpx.stream("POST", f"{proxy.v1}/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": MODEL, "messages": MSG, "stream": True}) as resp:
            assert resp.headers["x-routstr-provider"] == "cutter"
            with pytest.raises(httpx.HTTPError):  # cut short: not switched to the spare
                b"".join(resp.iter_raw())
        assert spare.seen() == []
        time.sleep(0.5)
        state = proxy.key_state(key)  # what was delivered (at least the prompt) is charged
        assert state.reserved_msat == 0 and state.total_spent_msat > 0
        # ... at the price of the provider that answered
        assert state.total_spent_msat < expected(DEAR, "1.05", 100, 100)
    finally:
        proxy.stop()


def test_xcashu_through_failover_gives_change_at_the_answering_providers_price(
        tmp_path: Path, providers: Any, mint: LocalMint, user: UserWallet) -> None:
    bad, good = providers("error-500"), providers()
    proxy = start(tmp_path, [provider("bad", bad.url, CHEAP),
                             provider("good", good.url, DEAR, fee="1.2")],
                  CASHU_MINTS=mint.url)
    try:
        token = user.token(100)
        resp = httpx.post(f"{proxy.v1}/chat/completions", timeout=60,
                          headers={"x-cashu": token},
                          json={"model": MODEL, "messages": MSG, "max_tokens": 10})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-routstr-provider"] == "good"
        usage = resp.json()["usage"]
        cost = expected(DEAR, "1.2", usage["prompt_tokens"], usage["completion_tokens"])
        assert int(resp.headers["x-routstr-cost-msats"]) == cost
        assert user.receive(resp.headers["x-cashu"]) == 100 - -(-cost // 1000)
        assert [s["model"] for s in bad.seen()] == ["bad-model"]
    finally:
        proxy.stop()


def test_client_cannot_name_a_plan_or_provider(tmp_path: Path, providers: Any) -> None:
    a, b = providers(), providers()
    proxy = start(tmp_path, [provider("a", a.url, CHEAP), provider("b", b.url, DEAR)])
    try:
        key = proxy.new_key(sats=1000)
        resp = httpx.post(f"{proxy.v1}/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}",
                                   "x-routstr-plan": "someone-elses-request",
                                   "x-routstr-provider": "b"},
                          json={"model": MODEL, "messages": MSG})
        assert resp.status_code == 200
        assert resp.headers.get_list("x-routstr-provider") == ["a"]
        assert len(a.seen()) == 1 and b.seen() == []
    finally:
        proxy.stop()


def test_every_provider_failing_charges_nothing(tmp_path: Path, providers: Any) -> None:
    a, b = providers("error-503"), providers("error-500")
    gone = f"http://127.0.0.1:{closed_port()}"
    proxy = start(tmp_path, [provider("a", a.url, CHEAP), provider("b", b.url, DEAR),
                             {**provider("gone", gone, CHEAP), "models": [
                                 {**CHEAP, "id": "only/unreachable"}]},
                             {**provider("gone2", gone, DEAR), "models": [
                                 {**DEAR, "id": "only/unreachable"}]}])
    try:
        key = proxy.new_key(sats=1000)
        resp = httpx.post(f"{proxy.v1}/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": MODEL, "messages": MSG})
        assert resp.status_code == 500  # the last provider's own answer, passed on
        assert resp.headers["x-routstr-provider"] == "b"
        resp = httpx.post(f"{proxy.v1}/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": "only/unreachable", "messages": MSG, "stream": True})
        assert resp.status_code == 502
        assert resp.json()["error"]["code"] == "upstream_unreachable"
        state = proxy.key_state(key)
        assert state.total_spent_msat == 0 and state.reserved_msat == 0
    finally:
        proxy.stop()


def test_provider_killed_mid_burst_costs_no_request(tmp_path: Path, providers: Any) -> None:
    cheap, dear = providers(), providers()
    proxy = start(tmp_path, [provider("cheap", cheap.url, CHEAP),
                             provider("dear", dear.url, DEAR)])
    try:
        key = proxy.new_key(sats=100_000)

        async def burst() -> list[tuple[int, str]]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                async def one(i: int) -> tuple[int, str]:
                    if i == 60:
                        cheap.kill()  # in the middle of the burst
                    resp = await client.post(
                        f"{proxy.v1}/chat/completions",
                        headers={"authorization": f"Bearer {key}"},
                        json={"model": MODEL, "messages": MSG, "stream": i % 2 == 0})
                    return resp.status_code, resp.headers.get("x-routstr-provider", "")

                return await asyncio.gather(*(one(i) for i in range(200)))

        results = asyncio.run(burst())
        assert [s for s, _ in results if s != 200] == []
        served = {p for _, p in results}
        assert served <= {"cheap", "dear"} and "dear" in served
        time.sleep(0.5)
        state = proxy.key_state(key)
        assert state.reserved_msat == 0 and state.total_requests == 200
    finally:
        proxy.stop()


def test_a_provider_back_from_an_outage_is_probed_and_taken_back(
        tmp_path: Path, providers: Any) -> None:
    cheap, dear = providers(), providers()
    proxy = start(tmp_path, [provider("cheap", cheap.url, CHEAP),
                             provider("dear", dear.url, DEAR)], UPSTREAM_COOLDOWN="1")
    try:
        key = proxy.new_key(sats=1000)

        def served_by() -> str:
            resp = httpx.post(f"{proxy.v1}/chat/completions", timeout=30,
                              headers={"authorization": f"Bearer {key}"},
                              json={"model": MODEL, "messages": MSG})
            assert resp.status_code == 200
            return resp.headers["x-routstr-provider"]

        assert served_by() == "cheap"
        cheap.kill()
        assert served_by() == "dear"  # refused: skipped at once, the client saw nothing
        providers("ok", cheap.port)  # back, on the same address
        deadline = time.monotonic() + 15
        while served_by() != "cheap":
            assert time.monotonic() < deadline, "the provider was not taken back"
            time.sleep(0.5)
        text = "\n".join(proxy.output.lines)
        assert "provider cheap answers again; back in use" in text
    finally:
        proxy.stop()


def test_operators_turn_providers_off_on_and_reprice_them_live(
        tmp_path: Path, providers: Any) -> None:
    cheap, dear = providers(), providers()
    proxy = start(tmp_path, [provider("cheap", cheap.url, CHEAP),
                             provider("dear", dear.url, DEAR)], ADMIN_PASSWORD="live-changes")
    try:
        key = proxy.new_key(sats=1000)

        def cli(*args: str) -> str:
            out = subprocess.run([str(BIN / "routstr"), "upstreams", *args], env=proxy.env,
                                 cwd=proxy.workdir, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            return out.stdout

        def served_by() -> tuple[str, int]:
            resp = httpx.post(f"{proxy.v1}/chat/completions", timeout=30,
                              headers={"authorization": f"Bearer {key}"},
                              json={"model": MODEL, "messages": MSG})
            assert resp.status_code == 200
            return resp.headers["x-routstr-provider"], int(resp.headers["x-routstr-cost-msats"])

        def until(name: str) -> int:
            deadline = time.monotonic() + 15
            while (got := served_by())[0] != name:
                assert time.monotonic() < deadline, f"still {got[0]}, not {name}"
                time.sleep(0.5)
            return got[1]

        assert served_by()[0] == "cheap"
        health = json.loads(cli("health", "--json"))["providers"]
        assert [(h["name"], h["ok"], h["models"]) for h in health] == [
            ("cheap", True, 1), ("dear", True, 1)]
        cli("disable", "cheap")
        until("dear")
        listed = json.loads(cli("list", "--json"))["providers"]
        assert [(p["name"], p["enabled"]) for p in listed] == [("cheap", False), ("dear", True)]
        cli("enable", "cheap")
        until("cheap")
        cli("price", "dear", MODEL, "--prompt", "0.0000001", "--completion", "0.0000001")
        cost = until("dear")
        usage_free = [s for s in dear.seen() if s["model"] == "dear-model"]
        assert usage_free and cost < expected(CHEAP, "1.05", 5, 5)  # charged the new price
        cli("disable", "dear", "--model", MODEL)
        until("cheap")
        cli("price", "dear", MODEL, "--clear")
        cli("enable", "dear", "--model", MODEL)
        assert json.loads(cli("list", "--json"))["providers"][1]["changes"] == []
        # The same from /admin (a form with the session's CSRF token).
        with httpx.Client(base_url=proxy.url, timeout=10) as admin:
            admin.post("/admin/login", data={"password": "live-changes"})
            page = admin.get("/admin/providers").text
            csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            done = admin.post("/admin/providers/disable", data={"csrf": csrf,
                                                                "provider": "cheap"})
            assert done.status_code == 303
            until("dear")
            assert 'cheap <span class="tag bad">off</span>' in admin.get("/admin/providers").text
            admin.post("/admin/providers/enable", data={"csrf": csrf, "provider": "cheap"})
            until("cheap")
            refused = admin.post("/admin/providers/disable", data={"csrf": "forged",
                                                                   "provider": "cheap"})
            assert refused.status_code == 403
        assert served_by()[0] == "cheap"
    finally:
        proxy.stop()


def test_catalog_follows_openrouter_and_starts_from_its_snapshot_offline(
        tmp_path: Path) -> None:
    with ModelLists() as lists:
        lists.openrouter = [{**CHEAP, "id": "vendor/test-model"}]
        lists.provider_ids = ["test-model"]  # the provider's own GET /v1/models (same server)
        path = tmp_path / "providers.yaml"
        path.write_text(f"- name: fetcher\n  base_url: {lists.url}/v1\n  models: fetch\n"
                        f"  openrouter_prefix: vendor/\n")
        env = {"PROVIDERS_PATH": str(path), "MODELS_REFRESH_INTERVAL": "10",
               "OPENROUTER_MODELS_URL": f"{lists.url}/api/v1/models"}
        proxy = start_proxy(tmp_path / "proxy", lists.url, env)
        try:
            def listed() -> dict[str, Any]:
                data = httpx.get(f"{proxy.v1}/models", timeout=10).json()["data"]
                return {m["id"]: m for m in data}

            deadline = time.monotonic() + 20
            while "vendor/test-model" not in listed() and time.monotonic() < deadline:
                time.sleep(0.2)
            model = listed()["vendor/test-model"]
            assert model["pricing"]["prompt"] == "0.000001" and model["sats_pricing"]["max_cost"]
            lists.openrouter = [{**DEAR, "id": "vendor/test-model"}]
            deadline = time.monotonic() + 25
            while (listed()["vendor/test-model"]["pricing"]["prompt"] != "0.000004"
                   and time.monotonic() < deadline):
                time.sleep(0.5)
            assert listed()["vendor/test-model"]["pricing"]["prompt"] == "0.000004"
            lists.status = 503  # a failed refresh keeps the last good catalog
            time.sleep(11)
            assert listed()["vendor/test-model"]["pricing"]["prompt"] == "0.000004"
        finally:
            proxy.stop()
    # No network now (the stand-in is gone): a restart serves the snapshot at once.
    again = start_proxy(tmp_path / "proxy", "http://127.0.0.1:9", env)
    try:
        data = httpx.get(f"{again.v1}/models", timeout=10).json()["data"]
        assert [m["pricing"]["prompt"] for m in data if m["id"] == "vendor/test-model"] == [
            "0.000004"]
    finally:
        again.stop()


@pytest.mark.parametrize(("content", "line"), [
    ("- name: a\n  base_url: http://127.0.0.1:1/v1\n  models: fetch\n  fee: 0.9\n",
     "provider 'a': fee:"),
    ("- name: a\n  models: fetch\n", "provider 'a': base_url: required"),
    ("- {name: b, base_url: 'http://127.0.0.1:1', api_key_env: NOT_SET_ANYWHERE, "
     "models: fetch}\n", "provider 'b': api_key_env: NOT_SET_ANYWHERE is not set"),
])
def test_bad_providers_file_stops_startup_with_one_line(tmp_path: Path, content: str,
                                                       line: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(content)
    proc = subprocess.run(
        [str(BIN / "mitmdump"), "--mode", "reverse:http://127.0.0.1:1", "--listen-host",
         "127.0.0.1", "-p", "0", "-s", str(ROOT / "routstr_addon" / "addon.py")],
        cwd=tmp_path, env={"PATH": "", "HOME": str(tmp_path), "PROVIDERS_PATH": str(path),
                           "DATA_DIR": str(tmp_path / "data"), "BTC_USD_PRICE": RATE},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    errors = [x for x in (proc.stdout + proc.stderr).splitlines() if "routstr:" in x]
    assert len(errors) == 1 and line in errors[0], proc.stdout + proc.stderr
