"""Providers as configuration, the catalog and the router, without a proxy: each rule called
directly (the end-to-end behaviour through a real mitmdump is in test_providers_e2e.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest

from routstr_addon.metering.pricing import ModelPrice, Pricing
from routstr_addon.proxy.route import body_for
from routstr_addon.settings import SettingError, Upstream, load_config
from routstr_addon.upstreams.catalog import Catalog, Router
from routstr_addon.upstreams.health import Health
from routstr_addon.upstreams.providers import ProviderError, ProviderSpec, read_providers

from .conftest import MODELS
from .model_lists import ModelLists

ENTRY = MODELS["data"][0]  # test/model


@pytest.fixture
def lists() -> Iterator[ModelLists]:
    with ModelLists() as server:
        yield server


def providers(tmp_path: Path, text: str, env: dict[str, str] | None = None,
              **kw: Any) -> tuple[ProviderSpec, ...]:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    return read_providers(str(path), env or {}, upstream=kw.get("upstream"),
                          upstream_api_key="", models_path=tmp_path / "models.json")


# -- configuration -------------------------------------------------------------------------


def test_yaml_file_reads_every_field(tmp_path: Path) -> None:
    (tmp_path / "b-models.json").write_text(json.dumps(
        {"data": [{**ENTRY, "upstream_id": "b-model", "aliases": ["bm"]}]}))
    got = providers(tmp_path, """
providers:
  - name: alpha
    base_url: http://127.0.0.1:9001/v1
    api_key: sk-alpha
    fee: 1.10
    priority: 2
    headers: {X-Title: routstr}
    models:
      - test/model
      - {id: other/model, upstream_id: om, aliases: [om-short], pricing: {prompt: "0.000001",
         completion: "0.000002"}, context_length: 1000}
  - name: beta
    base_url: https://beta.example/api/v1
    api_key_env: BETA_KEY
    models_path: b-models.json
  - name: gamma
    base_url: http://127.0.0.1:9003
    models: fetch
  - name: off
    base_url: http://127.0.0.1:9004
    enabled: false
    models: fetch
""", {"BETA_KEY": "sk-beta"})
    alpha, beta, gamma = got
    assert alpha.name == "alpha" and alpha.base_url == "http://127.0.0.1:9001/v1"
    assert alpha.api_key == "sk-alpha" and alpha.fee == Decimal("1.10") and alpha.priority == 2
    assert alpha.headers == (("X-Title", "routstr"),)
    assert [m.id for m in alpha.models] == ["test/model", "other/model"]
    assert alpha.models[0].entry is None  # priced from OpenRouter
    assert alpha.models[1].upstream_id == "om" and alpha.models[1].aliases == ("om-short",)
    assert beta.api_key == "sk-beta" and beta.base_url == "https://beta.example:443/api/v1"
    assert beta.models[0].upstream_id == "b-model" and beta.models[0].entry is not None
    assert gamma.fetch and not gamma.models


def test_json_file_is_read_too(tmp_path: Path) -> None:
    got = providers(tmp_path, json.dumps([
        {"name": "a", "base_url": "http://127.0.0.1:1/v1", "models": ["test/model"]}]))
    assert got[0].name == "a"


@pytest.mark.parametrize(("text", "line"), [
    ("providers: [{base_url: 'http://x/v1', models: fetch}]", "provider #1: name"),
    ("[{name: a, models: fetch}]", "provider 'a': base_url: required"),
    ("[{name: a, base_url: 'ftp://x', models: fetch}]", "provider 'a': base_url: expected"),
    ("[{name: a, base_url: 'http://x', models: fetch, fee: 0.5}]", "provider 'a': fee:"),
    ("[{name: a, base_url: 'http://x', models: fetch, fee: lots}]", "provider 'a': fee:"),
    ("[{name: a, base_url: 'http://x', models: fetch, priority: high}]",
     "provider 'a': priority:"),
    ("[{name: a, base_url: 'http://x', models: fetch, api_key_env: NOPE_UNSET}]",
     "provider 'a': api_key_env: NOPE_UNSET is not set"),
    ("[{name: a, base_url: 'http://x', models: fetch, headers: {Authorization: x}}]",
     "provider 'a': headers: Authorization is set by the proxy"),
    ("[{name: a, base_url: 'http://x'}]", "provider 'a': models:"),
    ("[{name: a, base_url: 'http://x', models: [{upstream_id: b}]}]",
     "provider 'a': models[0]: id: required"),
    ("[{name: a, base_url: 'http://x', models: [{id: m, pricing: {prompt: '1'}}]}]",
     "provider 'a': models[0] (m): pricing:"),
    ("[{name: a, base_url: 'http://x', models_path: missing.json}]",
     "provider 'a': models_path: cannot read"),
    ("[{name: a, base_url: 'http://x', models: fetch, colour: red}]",
     "provider 'a': colour: unknown field"),
    ("[{name: a, base_url: 'http://x', models: fetch, type: magic}]", "provider 'a': type:"),
    ("[{name: a, base_url: 'http://x', models: fetch}, {name: a, base_url: 'http://y', "
     "models: fetch}]", "provider 'a': name: used twice"),
    ("name: [unclosed", "is not valid YAML or JSON"),
    ("{}", "must hold a list of providers"),
])
def test_bad_file_is_one_line_naming_provider_and_field(tmp_path: Path, text: str,
                                                        line: str) -> None:
    with pytest.raises(ProviderError) as e:
        providers(tmp_path, text)
    assert line in str(e.value)
    assert "\n" not in str(e.value)


def test_api_key_env_is_read_from_dotenv_too(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MY_PROVIDER_KEY=sk-from-dotenv\n")
    (got,) = providers(tmp_path, "[{name: a, base_url: 'http://x/v1', models: fetch, "
                                 "api_key_env: MY_PROVIDER_KEY}]")
    assert got.api_key == "sk-from-dotenv"


def test_a_file_provider_named_upstream_clashes_with_the_shorthand(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="provider 'upstream': name: taken"):
        providers(tmp_path, "[{name: upstream, base_url: 'http://x/v1', models: fetch}]",
                  upstream=Upstream("http", "y", 80, "/v1"))


def test_bad_file_stops_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("[{name: a, base_url: 'http://x', models: fetch, fee: 0}]")
    with pytest.raises(SettingError, match="provider 'a': fee"):
        load_config({}, providers_path=str(path))


def test_env_variables_add_providers_with_public_urls() -> None:
    config = load_config({}, openai_api_key="sk-o", groq_api_key="gk",
                         ollama_base_url="http://127.0.0.1:11434", upstream_base_url="")
    by_name = {p.name: p for p in config.providers}
    assert set(by_name) == {"openai", "groq", "ollama"}
    assert by_name["openai"].base_url == "https://api.openai.com:443/v1"
    assert by_name["openai"].api_key == "sk-o" and by_name["openai"].fetch
    assert by_name["groq"].base_url == "https://api.groq.com:443/openai/v1"
    assert by_name["ollama"].base_url == "http://127.0.0.1:11434/v1"


def test_shorthand_alone_is_one_provider_as_before() -> None:
    config = load_config({}, upstream_base_url="http://127.0.0.1:9/v1", upstream_api_key="k")
    (only,) = config.providers
    assert only.name == "upstream" and only.shorthand and only.api_key == "k"
    assert load_config({}).providers[0].upstream is None  # the reverse mode's target


# -- the catalog and the router --------------------------------------------------------------


def entry(model_id: str, prompt: str, completion: str = "0.000002") -> dict[str, Any]:
    return {"id": model_id, "context_length": 4096,
            "pricing": {"prompt": prompt, "completion": completion, "request": "0"},
            "top_provider": {"max_completion_tokens": 512}}


def spec(name: str, priority: int = 0, **kw: Any) -> ProviderSpec:
    return ProviderSpec(name, Upstream("http", "127.0.0.1", 1, "/v1"), priority=priority, **kw)


def catalog(tmp_path: Path, specs: tuple[ProviderSpec, ...],
            openrouter: list[dict[str, Any]] | None = None) -> tuple[Catalog, Pricing]:
    pricing = Pricing({}, Decimal(1), Decimal("1.05"))
    pricing.set_rate(Decimal(100_000))
    cat = Catalog(specs, Router(pricing, specs), tmp_path, "http://unused", {})
    if openrouter is not None:
        cat.openrouter = {e["id"]: e for e in openrouter}
    cat.publish()
    return cat, pricing


def test_cheapest_usable_first_then_priority_then_least_recently_failed(
        tmp_path: Path) -> None:
    from routstr_addon.upstreams.providers import ModelSpec

    m = "test/model"
    specs = (spec("dear", models=(ModelSpec(m, m, (), entry(m, "0.000009")),)),
             spec("cheap", models=(ModelSpec(m, m, (), entry(m, "0.000001")),)),
             spec("cheap2", priority=5, models=(ModelSpec(m, m, (), entry(m, "0.000001")),)))
    cat, pricing = catalog(tmp_path, specs)
    order = [o.provider for o in pricing.offers[m]]
    assert order == ["cheap2", "cheap", "dear"]  # same price: higher priority first
    assert pricing.models[m].provider == "cheap2"  # what /v1/models shows now
    health = cat.router.health
    health.failure("cheap2", "refused", refused=True)  # open: tried last
    assert [o.provider for o in pricing.offers[m]] == ["cheap", "dear", "cheap2"]
    health.success("cheap2")
    assert [o.provider for o in pricing.offers[m]] == ["cheap2", "cheap", "dear"]


def test_provider_fee_counts_in_price_and_order(tmp_path: Path) -> None:
    from routstr_addon.upstreams.providers import ModelSpec

    m = "test/model"
    specs = (spec("a", fee=Decimal("2"), models=(ModelSpec(m, m, (), entry(m, "0.000001")),)),
             spec("b", models=(ModelSpec(m, m, (), entry(m, "0.0000015")),)))
    _, pricing = catalog(tmp_path, specs)
    a, b = sorted(pricing.offers[m], key=lambda o: o.provider)
    assert [o.provider for o in pricing.offers[m]] == ["b", "a"]  # 1.5 × 1.05 < 1 × 2
    # 1000 prompt tokens at $0.000001 × fee 2 at $100,000/BTC: 2e-3 USD → 2000 msat
    assert pricing.cost(a, 1000, 0) == 2000
    assert pricing.cost(b, 1000, 0) == 1575


def test_fetched_models_priced_from_openrouter_with_upstream_ids(tmp_path: Path) -> None:
    specs = (spec("openai", fetch=True, openrouter_prefix="openai/"),)
    cat, pricing = catalog(tmp_path, specs, [entry("openai/gpt-x", "0.000003")])
    cat.fetched = {"openai": ["gpt-x", "unknown-model"]}
    cat.publish()
    assert list(pricing.offers) == ["openai/gpt-x"]
    offer = pricing.offers["openai/gpt-x"][0]
    assert offer.upstream_id == "gpt-x" and offer.prompt == Fraction(3, 10**6)
    assert pricing.resolve("gpt-x") is offer  # the short name resolves


def test_aliases_and_model_rewrite(tmp_path: Path) -> None:
    from routstr_addon.upstreams.providers import ModelSpec

    specs = (spec("a", models=(ModelSpec("vendor/big", "big-v2", ("big",),
                                         entry("vendor/big", "0.000001")),)),)
    _, pricing = catalog(tmp_path, specs)
    offer = pricing.resolve("big")
    assert offer is not None and offer.id == "vendor/big"
    body = {"model": "big", "messages": [], "stream": True}
    built = json.loads(body_for("chat", body, b"{}", offer) or b"")
    assert built["model"] == "big-v2" and built["stream_options"] == {"include_usage": True}
    same = ModelPrice.from_entry(entry("x/y", "0.000001"))
    assert body_for("chat", {"model": "x/y"}, b"as built", same) == b"as built"


def test_refresh_takes_new_prices_keeps_last_good_and_snapshot_serves_offline(
        tmp_path: Path, lists: ModelLists) -> None:
    stand_in = lists
    stand_in.openrouter = [entry("openai/gpt-x", "0.000003")]
    stand_in.provider_ids = ["gpt-x"]
    port = int(stand_in.url.rsplit(":", 1)[1])
    specs = (ProviderSpec("openai", Upstream("http", "127.0.0.1", port, "/v1"), fetch=True,
                          openrouter_prefix="openai/"),)
    pricing = Pricing({}, Decimal(1), Decimal(1))
    pricing.set_rate(Decimal(100_000))
    cat = Catalog(specs, Router(pricing, specs), tmp_path, f"{stand_in.url}/api/v1/models", {})
    assert cat.needs_refresh and not cat.load_snapshot()

    async def refresh() -> bool:
        async with httpx.AsyncClient() as c:
            return await cat.refresh(c)

    assert asyncio.run(refresh())
    assert pricing.models["openai/gpt-x"].prompt == Fraction(3, 10**6)
    assert "/api/v1/models" in stand_in.hits and "/v1/models" in stand_in.hits
    stand_in.openrouter = [entry("openai/gpt-x", "0.000005")]
    assert asyncio.run(refresh())
    assert pricing.models["openai/gpt-x"].prompt == Fraction(5, 10**6)
    stand_in.status = 503
    assert not asyncio.run(refresh())
    assert pricing.models["openai/gpt-x"].prompt == Fraction(5, 10**6)  # last good kept
    stand_in.status, stand_in.openrouter = 200, [{"id": "broken"}]  # nonsense: kept too
    asyncio.run(refresh())
    assert pricing.models["openai/gpt-x"].prompt == Fraction(5, 10**6)
    # A new process with no network: the snapshot serves.
    again = Pricing({}, Decimal(1), Decimal(1))
    again.set_rate(Decimal(100_000))
    offline = Catalog(specs, Router(again, specs), tmp_path, "http://unreachable", {})
    assert offline.load_snapshot()
    offline.publish()
    assert again.models["openai/gpt-x"].prompt == Fraction(5, 10**6)


def test_breaker_opens_after_failures_or_one_refusal_and_probes_after_cooldown() -> None:
    changes: list[int] = []
    health = Health(["a", "b"], lambda: changes.append(1), failures=3, cooldown=0.0)
    health.failure("a", "HTTP 500")
    health.failure("a", "HTTP 500")
    assert health.breakers["a"].state == "closed"
    health.failure("a", "HTTP 503")
    assert health.breakers["a"].state == "open"
    health.failure("b", "connect refused", refused=True)
    assert health.breakers["b"].state == "open"
    assert sorted(health.due()) == ["a", "b"]  # cool-down 0: both probed now
    assert health.breakers["a"].state == "half-open"
    health.failure("a", "probe failed")
    assert health.breakers["a"].state == "open"
    health.success("b", 0.01)
    assert health.breakers["b"].state == "closed"
    facts = {f["name"]: f for f in health.facts()}
    assert facts["a"]["error_rate"] == 1.0 and facts["b"]["latency_ms"] == 10.0


def test_models_list_shows_each_model_once_with_its_providers(tmp_path: Path) -> None:
    import subprocess

    from .conftest import BIN

    cheap, dear = entry("test/model", "0.000001"), entry("test/model", "0.000003")
    (tmp_path / "providers.yaml").write_text(json.dumps([
        {"name": "dear", "base_url": "http://127.0.0.1:1/v1", "models": [dear]},
        {"name": "cheap", "base_url": "http://127.0.0.1:2/v1", "fee": 1.1,
         "models": [{**cheap, "upstream_id": "tm"}]}]))
    out = subprocess.run([str(BIN / "routstr"), "models", "list", "--json", "--rate", "100000"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": "", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path),
                              "PROVIDERS_PATH": str(tmp_path / "providers.yaml")})
    assert out.returncode == 0, out.stderr
    (model,) = json.loads(out.stdout)["models"]
    assert model["id"] == "test/model" and model["providers"] == ["cheap", "dear"]
    # priced by the provider that would serve it: $0.000001 × 1.005 × 1.1 at $100,000/BTC
    assert model["sats_pricing"]["prompt"] == pytest.approx(0.000001 * 1.005 * 1.1 * 1e3)


def test_overrides_are_shared_through_the_ledger(database_url: str, tmp_path: Path) -> None:
    from routstr_addon.ledger import Ledger
    from routstr_addon.upstreams.providers import ModelSpec

    one, two = Ledger(database_url), Ledger(database_url)  # two processes, one database
    try:
        before = two.upstreams.version()
        one.upstreams.set("a", disabled=True)
        one.upstreams.set("b", "test/model", prompt="0.000005", completion=None)
        assert two.upstreams.version() != before
        got = {(o.provider, o.model): o for o in two.upstreams.all()}
        assert got[("a", "")].disabled and not got[("b", "test/model")].disabled
        m = "test/model"
        specs = (spec("a", models=(ModelSpec(m, m, (), entry(m, "0.000001")),)),
                 spec("b", models=(ModelSpec(m, m, (), entry(m, "0.000002")),)))
        cat, pricing = catalog(tmp_path, specs)
        assert [o.provider for o in pricing.offers[m]] == ["a", "b"]
        cat.provider_overrides = got
        cat.publish()
        (only,) = pricing.offers[m]  # a is off; b re-priced
        assert only.provider == "b" and only.prompt == Fraction(5, 10**6)
        assert one.upstreams.clear("a") and not one.upstreams.clear("a")
        assert [(o.provider, o.model) for o in two.upstreams.all()] == [("b", "test/model")]
    finally:
        one.close()
        two.close()


def test_an_offer_gone_from_the_catalog_still_prices_its_requests_in_flight(
        tmp_path: Path) -> None:
    from routstr_addon.ledger.upstreams import Override
    from routstr_addon.upstreams.providers import ModelSpec

    m = "test/model"
    specs = (spec("a", models=(ModelSpec(m, m, (), entry(m, "0.000001")),)),
             spec("b", models=(ModelSpec(m, m, (), entry(m, "0.000002")),)))
    cat, pricing = catalog(tmp_path, specs)
    in_flight = pricing.offers[m][0]  # a request reserved on provider a
    before = pricing.cost(in_flight, 1000, 1000)
    cat.provider_overrides = {("a", ""): Override("a", "", True, None, None, 0.0)}
    cat.publish()  # a turned off while the request runs
    assert [o.provider for o in pricing.offers[m]] == ["b"]
    assert pricing.cost(in_flight, 1000, 1000) == before  # settles at a's price, no error
    assert pricing.parts(in_flight, 1000, 1000)[0] > 0
