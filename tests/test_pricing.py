"""Unit tests of metering.pricing: exact msat costs, limits, models.json and BTC/USD rates."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routstr_addon.metering.pricing import (
    ModelPrice,
    Pricing,
    RateKeeper,
    fetch_rate,
    load_models,
)
from routstr_addon.settings import RATE_SOURCES as DEFAULT_SOURCES
from routstr_addon.settings import SettingError, parse_sources

REPO = Path(__file__).resolve().parent.parent


# --- helpers ------------------------------------------------------------------------------


def entry(model_id: str = "openai/gpt-4o", prompt: str = "0.0000025",
          completion: str = "0.00001", request: str = "0", cache: str | None = None,
          context: int | None = 128000, max_completion: int | None = 16384) -> dict[str, Any]:
    """A models.json entry in OpenRouter's shape."""
    pricing: dict[str, Any] = {"prompt": prompt, "completion": completion, "request": request}
    if cache is not None:
        pricing["input_cache_read"] = cache
    item: dict[str, Any] = {
        "id": model_id,
        "name": model_id,
        "pricing": pricing,
        "top_provider": {"context_length": context, "max_completion_tokens": max_completion},
    }
    if context is not None:
        item["context_length"] = context
    return item


def model(**kw: Any) -> ModelPrice:
    return ModelPrice.from_entry(entry(**kw))


def priced(*models: ModelPrice, rate: str = "100000", exchange_fee: str = "1.005",
           provider_fee: str = "1.05") -> Pricing:
    pricing = Pricing({m.id: m for m in models}, Decimal(exchange_fee), Decimal(provider_fee))
    pricing.set_rate(rate)
    return pricing


def expected_msat(usd: Fraction, rate: str, exchange_fee: str, provider_fee: str) -> int:
    """The documented formula, computed independently of the code under test."""
    return math.ceil(usd * Fraction(exchange_fee) * Fraction(provider_fee) * 10**11
                     / Fraction(rate))


def decimal_string(places_max: int = 12, max_units: int = 10**7) -> st.SearchStrategy[str]:
    """A non-negative price as models.json writes it: a plain decimal string."""
    return st.builds(
        lambda units, places: format(Decimal(units).scaleb(-places), "f"),
        st.integers(min_value=0, max_value=max_units),
        st.integers(min_value=0, max_value=places_max),
    )


rates = st.builds(lambda cents: format(Decimal(cents).scaleb(-2), "f"),
                  st.integers(min_value=100, max_value=10**9))  # $1.00 … $10M per BTC
fees = st.builds(lambda units: format(Decimal(units).scaleb(-4), "f"),
                 st.integers(min_value=10_000, max_value=30_000))  # 1.0000 … 3.0000


# --- cost -----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(prompt=decimal_string(), completion=decimal_string(), request=decimal_string(),
       rate=rates, exchange_fee=fees, provider_fee=fees,
       prompt_tokens=st.integers(0, 2_000_000), completion_tokens=st.integers(0, 200_000))
def test_cost_is_exact_ceiling_of_usd_times_fees_over_rate(prompt, completion, request, rate,
                                                           exchange_fee, provider_fee,
                                                           prompt_tokens, completion_tokens):
    m = model(prompt=prompt, completion=completion, request=request)
    pricing = priced(m, rate=rate, exchange_fee=exchange_fee, provider_fee=provider_fee)
    usd = (prompt_tokens * Fraction(prompt) + completion_tokens * Fraction(completion)
           + Fraction(request))
    assert pricing.cost(m, prompt_tokens, completion_tokens) == expected_msat(
        usd, rate, exchange_fee, provider_fee)


@given(rate=rates, tokens=st.integers(0, 10**6))
def test_set_rate_accepts_str_decimal_and_fraction_alike(rate, tokens):
    m = model()
    by_str = priced(m, rate=rate)
    by_decimal = priced(m)
    by_decimal.set_rate(Decimal(rate))
    by_fraction = priced(m)
    by_fraction.set_rate(Fraction(rate))
    costs = {p.cost(m, tokens, tokens) for p in (by_str, by_decimal, by_fraction)}
    assert len(costs) == 1
    assert by_str.rate == Fraction(rate)


def test_cost_known_value():
    # 1000 prompt tokens at $2.5/M + 100 completion at $10/M = $0.0035;
    # × 1.005 × 1.05 × 1e11 / 100000 = 3693.375 msat → 3694
    m = model()
    assert priced(m).cost(m, 1000, 100) == 3694


def test_request_price_is_charged_once_even_without_tokens():
    m = model(prompt="0", completion="0", request="0.001")
    assert priced(m, exchange_fee="1", provider_fee="1").cost(m, 0, 0) == 1000  # $0.001 at 100k


def test_zero_priced_model_costs_nothing():
    m = model(prompt="0", completion="0", request="0")
    assert priced(m).cost(m, 10**6, 10**5) == 0


def test_negative_price_means_varies_and_costs_nothing():
    m = model(prompt="-1", completion="0.00001")
    assert m.prompt == 0
    assert priced(m, exchange_fee="1", provider_fee="1").cost(m, 1000, 0) == 0


def test_cost_without_rate_raises_lookup_error():
    m = model()
    pricing = Pricing({m.id: m}, Decimal(1), Decimal(1))
    with pytest.raises(LookupError):
        pricing.cost(m, 1, 1)
    assert pricing.sats_pricing(m) is None


@pytest.mark.parametrize("bad", ["0", "-5", Decimal(0), Fraction(-1)])
def test_set_rate_rejects_non_positive(bad):
    m = model()
    pricing = Pricing({m.id: m}, Decimal(1), Decimal(1))
    with pytest.raises(ValueError):
        pricing.set_rate(bad)
    assert pricing.rate is None


def test_rate_change_reprices():
    m = model()
    pricing = priced(m, rate="100000")
    before = pricing.cost(m, 1000, 100)
    pricing.set_rate("50000")
    assert pricing.cost(m, 1000, 100) == expected_msat(
        Fraction(1000) * Fraction("0.0000025") + 100 * Fraction("0.00001"), "50000", "1.005",
        "1.05")
    assert pricing.cost(m, 1000, 100) > before


# --- cached tokens --------------------------------------------------------------------------


@given(prompt=decimal_string(), cache=decimal_string(), completion=decimal_string(),
       rate=rates, exchange_fee=fees, provider_fee=fees,
       prompt_tokens=st.integers(0, 10**6), completion_tokens=st.integers(0, 10**5),
       data=st.data())
def test_cached_tokens_are_charged_at_the_cache_price(prompt, cache, completion, rate,
                                                      exchange_fee, provider_fee, prompt_tokens,
                                                      completion_tokens, data):
    cached = data.draw(st.integers(0, prompt_tokens))
    m = model(prompt=prompt, completion=completion, cache=cache)
    pricing = priced(m, rate=rate, exchange_fee=exchange_fee, provider_fee=provider_fee)
    usd = ((prompt_tokens - cached) * Fraction(prompt) + cached * Fraction(cache)
           + completion_tokens * Fraction(completion))
    assert pricing.cost(m, prompt_tokens, completion_tokens, cached) == expected_msat(
        usd, rate, exchange_fee, provider_fee)


def test_cached_tokens_known_value():
    m = model(prompt="0.000001", completion="0", cache="0.0000001")
    pricing = priced(m, exchange_fee="1", provider_fee="1")  # 1 USD = 1e6 msat at 100k
    assert pricing.cost(m, 1000, 0) == 1000
    assert pricing.cost(m, 1000, 0, 1000) == 100
    assert pricing.cost(m, 1000, 0, 400) == 600 + 40


@given(prompt_tokens=st.integers(0, 10**6), cached=st.integers(0, 10**6),
       completion_tokens=st.integers(0, 10**5))
def test_cached_tokens_without_cache_price_cost_the_prompt_price(prompt_tokens, cached,
                                                                 completion_tokens):
    m = model(prompt="0.00000013", completion="0.0000004")
    assert m.cache_read is None
    pricing = priced(m)
    assert (pricing.cost(m, prompt_tokens, completion_tokens, cached)
            == pricing.cost(m, prompt_tokens, completion_tokens))


def test_empty_cache_price_is_no_cache_price():
    m = model(cache="")
    assert m.cache_read is None


def test_cached_tokens_beyond_prompt_tokens_are_capped():
    m = model(prompt="0.000001", completion="0", cache="0")
    pricing = priced(m, exchange_fee="1", provider_fee="1")
    assert pricing.cost(m, 100, 0, 500) == 0  # all 100 prompt tokens cached, no more
    assert pricing.cost(m, 100, 0, -5) == pricing.cost(m, 100, 0)


# --- max_cost -------------------------------------------------------------------------------


def test_completion_limit_from_top_provider_and_context():
    assert model(context=128000, max_completion=16384).completion_limit == 16384
    assert model(context=8192, max_completion=None).completion_limit == 8192
    assert model(context=8192, max_completion=100_000).completion_limit == 8192


def test_context_length_may_come_from_top_provider():
    item = entry(context=4096)
    del item["context_length"]
    assert ModelPrice.from_entry(item).context_length == 4096


def test_max_cost_without_bounds_fills_the_context():
    # prompt + completion fit in the context: the dearest split of it, never context + limit
    m = model(context=128000, max_completion=16384)
    pricing = priced(m)
    assert pricing.max_cost(m) == max(pricing.cost(m, 128000 - 16384, 16384),
                                      pricing.cost(m, 128000, 0))
    assert pricing.max_cost(m) < pricing.cost(m, 128000, 16384)


def test_max_cost_respects_max_tokens():
    m = model(context=128000, max_completion=16384)
    pricing = priced(m)
    assert pricing.max_cost(m, max_tokens=100) == pricing.cost(m, 127900, 100)
    assert pricing.max_cost(m, max_tokens=0) == pricing.cost(m, 128000, 0)
    # max_tokens above the provider's limit does not raise the bound
    assert pricing.max_cost(m, max_tokens=10**9) == pricing.max_cost(m)
    # a negative max_tokens is ignored
    assert pricing.max_cost(m, max_tokens=-1) == pricing.max_cost(m)


def test_max_cost_without_max_completion_tokens_uses_context_length():
    m = model(context=8192, max_completion=None)
    pricing = priced(m)
    assert pricing.max_cost(m) == max(pricing.cost(m, 0, 8192), pricing.cost(m, 8192, 0))


def test_max_cost_multiplies_choices_and_prompts():
    m = model(context=1000, max_completion=200)
    pricing = priced(m, exchange_fee="1", provider_fee="1")
    # n choices share one prompt, each bounded by what the prompt leaves of the context
    assert pricing.max_cost(m, 100, 300, choices=4) == pricing.cost(m, 300, 400)
    assert pricing.max_cost(m, 100, None, choices=4) == max(pricing.cost(m, 900, 400),
                                                            pricing.cost(m, 1000, 0))
    # a list of prompts: each may fill the context and generate its choices
    assert pricing.max_cost(m, 100, 50_000, choices=2, prompts=30) == pricing.cost(
        m, 30_000, 6_000)
    assert pricing.max_cost(m, 100, 5_000, choices=1, prompts=30) == pricing.cost(
        m, 5_000, 3_000)


def test_max_cost_respects_prompt_bound():
    m = model(context=128000, max_completion=16384)
    pricing = priced(m)
    assert pricing.max_cost(m, prompt_bound=2000) == pricing.cost(m, 2000, 16384)
    assert pricing.max_cost(m, prompt_bound=10**9) == pricing.max_cost(m)
    assert pricing.max_cost(m, prompt_bound=0) == pricing.cost(m, 1, 16384)
    assert pricing.max_cost(m, 50, 2000) == pricing.cost(m, 2000, 50)


@settings(max_examples=300)
@given(prompt=decimal_string(), completion=decimal_string(), request=decimal_string(),
       rate=rates, exchange_fee=fees, provider_fee=fees,
       context=st.integers(1, 2_000_000),
       max_completion=st.none() | st.integers(1, 3_000_000),
       max_tokens=st.none() | st.integers(-10, 3_000_000),
       prompt_bound=st.none() | st.integers(0, 3_000_000),
       data=st.data())
def test_max_cost_bounds_the_cost_of_any_usage_within_limits(
        prompt, completion, request, rate, exchange_fee, provider_fee, context, max_completion,
        max_tokens, prompt_bound, data):
    # a cache price at most the prompt price, as every provider has it
    cache = data.draw(st.none() | st.integers(0, 1000).map(
        lambda k: format(Decimal(prompt) * k / 1000, "f")))
    m = model(prompt=prompt, completion=completion, request=request, cache=cache,
              context=context, max_completion=max_completion)
    pricing = priced(m, rate=rate, exchange_fee=exchange_fee, provider_fee=provider_fee)
    prompt_limit = context if prompt_bound is None else min(context, max(prompt_bound, 1))
    completion_limit = min(max_completion or context, context)
    if max_tokens is not None and max_tokens >= 0:
        completion_limit = min(completion_limit, max_tokens)
    prompt_tokens = data.draw(st.integers(0, prompt_limit))
    # prompt + completion <= context, as every provider enforces
    completion_tokens = data.draw(st.integers(
        0, max(0, min(completion_limit, context - prompt_tokens))))
    cached = data.draw(st.integers(0, prompt_tokens))
    bound = pricing.max_cost(m, max_tokens, prompt_bound)
    assert bound >= pricing.cost(m, prompt_tokens, completion_tokens, cached)
    # and the bound is reached by an extreme usage: the largest prompt, or the prompt that
    # fills what the completion leaves of the context
    filled = min(prompt_limit, max(context - completion_limit, 0))
    assert bound == max(
        pricing.cost(m, prompt_limit, max(0, min(completion_limit, context - prompt_limit))),
        pricing.cost(m, filled, min(completion_limit, context - filled)))


def test_max_cost_bounds_cost_when_cache_price_exceeds_prompt_price():
    m = model(prompt="0.000001", completion="0", cache="0.000002", context=1000,
              max_completion=10)
    pricing = priced(m, exchange_fee="1", provider_fee="1")
    assert pricing.max_cost(m) >= pricing.cost(m, 1000, 10, 1000)


# --- resolve --------------------------------------------------------------------------------


def test_resolve_exact_and_unambiguous_short_names():
    models = [model(model_id=i) for i in (
        "openai/gpt-4o", "openai/gpt-4o-mini", "meta-llama/llama-3.3-70b-instruct",
        "groq/llama-3.1-8b", "together/llama-3.1-8b", "mistral-large", "mistral/mistral-large",
    )]
    pricing = priced(*models)
    found = pricing.resolve("openai/gpt-4o")
    assert found is not None and found.id == "openai/gpt-4o"
    found = pricing.resolve("gpt-4o")
    assert found is not None and found.id == "openai/gpt-4o"
    found = pricing.resolve("gpt-4o-mini")
    assert found is not None and found.id == "openai/gpt-4o-mini"
    found = pricing.resolve("llama-3.3-70b-instruct")
    assert found is not None and found.id == "meta-llama/llama-3.3-70b-instruct"
    # two providers offer it: ambiguous, so not resolved
    assert pricing.resolve("llama-3.1-8b") is None
    found = pricing.resolve("groq/llama-3.1-8b")
    assert found is not None and found.id == "groq/llama-3.1-8b"
    # an exact id wins over a short name
    found = pricing.resolve("mistral-large")
    assert found is not None and found.id == "mistral-large"
    assert pricing.resolve("gpt-5") is None
    assert pricing.resolve("") is None
    assert pricing.resolve("gpt") is None


# --- load_models ----------------------------------------------------------------------------


def test_load_models_reads_openrouter_shape(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"data": [entry("openai/gpt-4o"),
                                         entry("deepseek/deepseek-chat", cache="0.00000001")]}))
    models = load_models(path)
    assert set(models) == {"openai/gpt-4o", "deepseek/deepseek-chat"}
    gpt = models["openai/gpt-4o"]
    assert gpt.prompt == Fraction("0.0000025")
    assert gpt.completion == Fraction("0.00001")
    assert gpt.request == 0
    assert gpt.cache_read is None
    assert gpt.context_length == 128000
    assert gpt.max_completion_tokens == 16384
    assert gpt.info["name"] == "openai/gpt-4o"
    assert models["deepseek/deepseek-chat"].cache_read == Fraction("0.00000001")


def test_load_models_reads_bare_list(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps([entry("a/one"), entry("b/two", context=4096,
                                                      max_completion=None)]))
    models = load_models(path)
    assert set(models) == {"a/one", "b/two"}
    assert models["b/two"].max_completion_tokens is None
    assert models["b/two"].completion_limit == 4096


@pytest.mark.parametrize("wrap", [lambda xs: {"data": xs}, lambda xs: xs])
def test_load_models_rejects_model_without_context_length(tmp_path, wrap):
    path = tmp_path / "models.json"
    path.write_text(json.dumps(wrap([entry("a/ok"), entry("b/no-context", context=None)])))
    with pytest.raises(ValueError, match="b/no-context"):
        load_models(path)


def test_repository_example_models_all_price():
    models = load_models(REPO / "models.example.json")
    assert len(models) >= 5
    pricing = Pricing(models, Decimal("1.005"), Decimal("1.05"))
    pricing.set_rate("91234.5")
    for m in models.values():
        usd = 1000 * m.prompt + 500 * m.completion + m.request
        assert usd > 0, m.id
        assert pricing.cost(m, 1000, 500) == expected_msat(usd, "91234.5", "1.005", "1.05")
        assert pricing.cost(m, 1000, 500) > 0, m.id
        assert pricing.max_cost(m) >= pricing.cost(m, 1000, 500), m.id
        sats = pricing.sats_pricing(m)
        assert sats is not None and sats["max_cost"] > 0, m.id
        assert pricing.resolve(m.id) is m


# --- sats_pricing ---------------------------------------------------------------------------


def test_sats_pricing_fields():
    m = model(prompt="0.000001", completion="0.000004", request="0.0005",
              context=1000, max_completion=200)
    pricing = priced(m, rate="50000", exchange_fee="1.25", provider_fee="1.6")
    sats = pricing.sats_pricing(m)
    assert sats is not None
    assert set(sats) == {"prompt", "completion", "request", "max_prompt_cost",
                         "max_completion_cost", "max_cost"}
    # 1 USD = 1e8 sat / 50000 × 1.25 × 1.6 = 4000 sat
    assert sats["prompt"] == pytest.approx(0.004)
    assert sats["completion"] == pytest.approx(0.016)
    assert sats["request"] == pytest.approx(2.0)
    assert sats["max_prompt_cost"] == pytest.approx(4.0)  # 1000 tokens × 0.004
    assert sats["max_completion_cost"] == pytest.approx(3.2)  # 200 tokens × 0.016
    # prompt + completion fit in the context: (1000 - 200) × 0.004 + 200 × 0.016 + 2
    assert sats["max_cost"] == pytest.approx(3.2 + 3.2 + 2.0)
    assert sats["max_cost"] == pricing.max_cost(m) / 1000
    assert all(isinstance(v, float) for v in sats.values())


# --- BTC/USD sources ------------------------------------------------------------------------


def test_parse_sources_names_and_urls():
    assert parse_sources("kraken,coinbase,binance") == tuple(DEFAULT_SOURCES.items())
    assert parse_sources(" Kraken , ,BINANCE ") == (
        ("kraken", DEFAULT_SOURCES["kraken"]), ("binance", DEFAULT_SOURCES["binance"]))
    assert parse_sources("") == ()
    assert parse_sources("coinbase=http://127.0.0.1:9/spot") == (
        ("coinbase", "http://127.0.0.1:9/spot"),)
    # a query string keeps its own '=' signs
    assert parse_sources("binance=http://x.test/api?symbol=BTCUSDT,kraken=") == (
        ("binance", "http://x.test/api?symbol=BTCUSDT"), ("kraken", DEFAULT_SOURCES["kraken"]))


@pytest.mark.parametrize("raw", ["bitstamp", "kraken,coingecko", "=http://x.test/"])
def test_parse_sources_unknown_name_is_a_setting_error(raw):
    with pytest.raises(SettingError, match="BTC_USD_SOURCES"):
        parse_sources(raw)


KRAKEN = {"error": [], "result": {"XXBTZUSD": {
    "a": ["91234.60000", "1", "1.000"], "b": ["91234.40000", "2", "2.000"],
    "c": ["91234.5", "0.001"], "v": ["1000.1", "2000.2"], "p": ["91000.1", "90900.2"],
    "t": [10000, 20000], "l": ["90000.0", "89000.0"], "h": ["92000.0", "92500.0"],
    "o": "90500.0"}}}
COINBASE = {"data": {"amount": "91000.12", "base": "BTC", "currency": "USD"}}
BINANCE = {"symbol": "BTCUSDT", "price": "91100.00000000"}

ROUTES: dict[str, tuple[int, bytes]] = {
    "/kraken": (200, json.dumps(KRAKEN).encode()),
    "/coinbase": (200, json.dumps(COINBASE).encode()),
    "/binance": (200, json.dumps(BINANCE).encode()),
    "/kraken-low": (200, json.dumps({"error": [], "result": {"XXBTZUSD": {
        "c": ["80000.0", "0.5"]}}}).encode()),
    "/kraken-error": (200, b'{"error":["EQuery:Unknown asset pair"],"result":{}}'),
    "/binance-zero": (200, b'{"symbol":"BTCUSDT","price":"0.00000000"}'),
    "/coinbase-wrong-shape": (200, b'{"errors":[{"id":"not_found"}]}'),
    "/garbage": (200, b"<html>maintenance</html>"),
    "/error-500": (500, b'{"error":"internal"}'),
    "/error-429": (429, json.dumps(BINANCE).encode()),
}


class _TickerHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ROUTES.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def tickers() -> Iterator[str]:
    """A local HTTP server answering like Kraken, Coinbase and Binance; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TickerHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing-listens"


def rate_of(sources: list[tuple[str, str]]) -> Fraction | None:
    async def go() -> Fraction | None:
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            return await fetch_rate(client, sources)
    return asyncio.run(go())


def test_fetch_rate_reads_each_format(tickers):
    assert rate_of([("kraken", tickers + "/kraken")]) == Fraction("91234.5")
    assert rate_of([("coinbase", tickers + "/coinbase")]) == Fraction("91000.12")
    assert rate_of([("binance", tickers + "/binance")]) == Fraction("91100")


def test_fetch_rate_is_the_median_of_sources(tickers):
    rate = rate_of([("kraken", tickers + "/kraken"), ("coinbase", tickers + "/coinbase"),
                    ("binance", tickers + "/binance")])
    assert rate == Fraction("91100")
    # an outlier does not move the median
    rate = rate_of([("kraken", tickers + "/kraken-low"), ("coinbase", tickers + "/coinbase"),
                    ("binance", tickers + "/binance")])
    assert rate == Fraction("91000.12")
    # an even number of answers: the mean of the middle two, exactly
    rate = rate_of([("kraken", tickers + "/kraken"), ("coinbase", tickers + "/coinbase")])
    assert rate == (Fraction("91234.5") + Fraction("91000.12")) / 2


@pytest.mark.parametrize("bad", [
    ("binance", "/error-500"), ("binance", "/error-429"), ("kraken", "/kraken-error"),
    ("binance", "/binance-zero"), ("coinbase", "/coinbase-wrong-shape"),
    ("coinbase", "/garbage"), ("kraken", "/coinbase"), ("binance", "/missing"),
])
def test_fetch_rate_drops_a_failing_source(tickers, bad):
    name, path = bad
    rate = rate_of([("kraken", tickers + "/kraken"), ("coinbase", tickers + "/coinbase"),
                    (name, tickers + path)])
    assert rate == (Fraction("91234.5") + Fraction("91000.12")) / 2


def test_fetch_rate_drops_an_unreachable_source(tickers, closed_port_url):
    rate = rate_of([("binance", tickers + "/binance"), ("kraken", closed_port_url)])
    assert rate == Fraction("91100")


def test_fetch_rate_none_when_no_source_answers(tickers, closed_port_url):
    assert rate_of([("binance", tickers + "/error-500"), ("kraken", closed_port_url),
                    ("coinbase", tickers + "/garbage")]) is None
    assert rate_of([]) is None


def test_rate_keeper_refresh_sets_the_rate(tickers):
    m = model()
    pricing = Pricing({m.id: m}, Decimal(1), Decimal(1))
    keeper = RateKeeper(pricing, [("kraken", tickers + "/kraken"),
                                  ("binance", tickers + "/binance"),
                                  ("coinbase", tickers + "/coinbase")], interval=60, timeout=5)
    assert asyncio.run(keeper.refresh()) is True
    assert pricing.rate == Fraction("91100")
    assert pricing.rate_updated is not None
    assert pricing.cost(m, 1000, 0) == expected_msat(1000 * Fraction("0.0000025"), "91100", "1",
                                                     "1")


def test_rate_keeper_keeps_last_good_rate_when_all_sources_fail(tickers, closed_port_url):
    m = model()
    pricing = priced(m, rate="95000")
    before = pricing.cost(m, 1000, 100)
    updated = pricing.rate_updated
    keeper = RateKeeper(pricing, [("kraken", closed_port_url),
                                  ("binance", tickers + "/error-500"),
                                  ("coinbase", tickers + "/garbage")], interval=60, timeout=5)
    assert asyncio.run(keeper.refresh()) is False
    assert pricing.rate == Fraction(95000)
    assert pricing.rate_updated == updated
    assert pricing.cost(m, 1000, 100) == before


def test_rate_keeper_refresh_without_any_rate_stays_without(closed_port_url):
    m = model()
    pricing = Pricing({m.id: m}, Decimal(1), Decimal(1))
    keeper = RateKeeper(pricing, [("kraken", closed_port_url)], interval=60, timeout=5)
    assert asyncio.run(keeper.refresh()) is False
    assert pricing.rate is None
