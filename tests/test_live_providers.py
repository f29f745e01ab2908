"""Providers added and removed while the proxy runs (``routstr upstreams add``/``remove``,
``POST``/``DELETE /admin/api/providers``): real mitmdump processes, real provider processes
(tests/provider_proc.py), the real CLI.

What is checked: an added provider serves its model within seconds, under its own model id
and key, charged its own price, on every process sharing the database; removed, it is no
longer routed; a bad entry is refused with the providers file's one-line error; a configured
provider cannot be removed, nor a name used twice; the key is never shown, logged or journaled.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from .conftest import BIN, Proxy, start_proxy
from .model_lists import ModelLists
from .test_providers_e2e import (
    CHEAP,
    DEAR,
    MODEL,
    MSG,
    expected,
    provider,
    providers,  # noqa: F401  (the fixture)
)

TOKEN = "live-providers-admin-token"


def cli(proxy: Proxy, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(BIN / "routstr"), "upstreams", *args], env=proxy.env,
                         cwd=proxy.workdir, capture_output=True, text=True, timeout=60)
    assert (out.returncode == 0) == ok, out.stdout + out.stderr
    return out


def served_by(proxy: Proxy, key: str) -> tuple[str, int]:
    resp = httpx.post(f"{proxy.v1}/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": MODEL, "messages": MSG})
    assert resp.status_code == 200, resp.text
    return resp.headers["x-routstr-provider"], int(resp.headers["x-routstr-cost-msats"])


def until(proxy: Proxy, key: str, name: str, within: float = 10.0) -> int:
    deadline = time.monotonic() + within
    while (got := served_by(proxy, key))[0] != name:
        assert time.monotonic() < deadline, f"still {got[0]}, not {name}"
        time.sleep(0.3)
    return got[1]


def start(workdir: Path, file: Path, listed: list[dict[str, Any]], **env: str) -> Proxy:
    file.write_text(json.dumps({"providers": listed}))
    return start_proxy(workdir, listed[0]["base_url"].removesuffix("/v1"),
                       {"PROVIDERS_PATH": str(file), **env})


def test_provider_added_by_the_cli_serves_at_its_price_and_removed_is_not_routed(
        tmp_path: Path, providers: Any) -> None:  # noqa: F811
    dear, cheap = providers(), providers()
    proxy = start(tmp_path / "proxy", tmp_path / "providers.json",
                  [provider("dear", dear.url, DEAR)])
    try:
        key = proxy.new_key(sats=1000)
        assert served_by(proxy, key)[0] == "dear"
        models = tmp_path / "cheap-models.json"
        models.write_text(json.dumps({"models": [{**CHEAP, "upstream_id": "cheap-model"}]}))
        cli(proxy, "add", "cheap", "--base-url", f"{cheap.url}/v1", "--api-key", "sk-cheap",
            "--fee", "1.05", "--priority", "2", "--models-file", str(models))
        started = time.monotonic()
        until(proxy, key, "cheap")
        assert time.monotonic() - started < 10
        usage = [s for s in cheap.seen() if s["path"] == "/v1/chat/completions"]
        assert usage[-1]["model"] == "cheap-model" and usage[-1]["auth"] == "Bearer sk-cheap"
        # Charged at its price: the usage it reported, at CHEAP with its fee.
        resp = proxy.client(key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MSG)
        assert resp.headers["x-routstr-provider"] == "cheap"
        u = resp.parse().usage
        assert u is not None
        assert int(resp.headers["x-routstr-cost-msats"]) == expected(
            CHEAP, "1.05", u.prompt_tokens, u.completion_tokens)
        # Listed with its URL, fee, priority, models; never its key.
        listed = cli(proxy, "list", "--json").stdout
        assert "sk-cheap" not in listed
        rows = {r["name"]: r for r in json.loads(listed)["providers"]}
        assert (rows["cheap"]["source"], rows["cheap"]["base_url"], rows["cheap"]["fee"],
                rows["cheap"]["priority"], rows["cheap"]["models"], rows["cheap"]["enabled"]
                ) == ("added", f"{cheap.url}/v1", "1.05", 2, 1, True)
        # Disabled and enabled like any provider.
        cli(proxy, "disable", "cheap")
        until(proxy, key, "dear")
        cli(proxy, "enable", "cheap")
        until(proxy, key, "cheap")
        # Names are unique across the file and the ledger; configured ones are not removed.
        taken = cli(proxy, "add", "dear", "--base-url", f"{cheap.url}/v1", ok=False)
        assert "provider 'dear': name: already configured" in taken.stderr + taken.stdout
        again = cli(proxy, "add", "cheap", "--base-url", f"{cheap.url}/v1", ok=False)
        assert "provider 'cheap': name: already added" in again.stderr + again.stdout
        kept = cli(proxy, "remove", "dear", ok=False)
        assert "disable it instead" in kept.stderr + kept.stdout
        # A bad entry: the providers file's one-line error, nothing stored.
        bad = cli(proxy, "add", "broken", "--base-url", "ftp://example.com/v1", ok=False)
        text = (bad.stderr + bad.stdout).strip()
        assert "provider 'broken': base_url: expected an http(s) URL" in text
        assert "Traceback" not in text
        low = cli(proxy, "add", "cheapest", "--base-url", f"{cheap.url}/v1", "--fee", "0.5",
                  ok=False)
        assert "provider 'cheapest': fee: expected a multiplier of at least 1" in (
            low.stderr + low.stdout)
        assert {r["name"] for r in json.loads(cli(proxy, "list", "--json").stdout)[
            "providers"]} == {"dear", "cheap"}
        # Removed: no longer routed, within seconds.
        cli(proxy, "remove", "cheap")
        until(proxy, key, "dear")
        seen = len(cheap.seen())
        for _ in range(3):
            assert served_by(proxy, key)[0] == "dear"
        assert len(cheap.seen()) == seen
        assert "sk-cheap" not in proxy.output.text
    finally:
        proxy.stop()


def test_admin_api_adds_and_removes_a_provider_for_every_process_on_postgresql(
        tmp_path: Path, providers: Any, pg_database: str) -> None:  # noqa: F811
    dear, cheap = providers(), providers()
    listed = [provider("dear", dear.url, DEAR)]
    env = {"DATABASE_URL": pg_database, "ADMIN_TOKEN": TOKEN, "CHEAP_KEY": "sk-from-env"}
    first = start(tmp_path / "a", tmp_path / "providers.json", listed, **env)
    second = start(tmp_path / "b", tmp_path / "providers.json", listed, **env)
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        key = first.new_key(sats=1000)
        entry = {"name": "cheap", "base_url": f"{cheap.url}/v1", "api_key_env": "CHEAP_KEY",
                 "fee": "1.05", "models": [{**CHEAP, "upstream_id": "cheap-model"}]}
        added = httpx.post(f"{first.url}/admin/api/providers", json=entry, headers=auth,
                           timeout=10)
        assert added.status_code == 201, added.text
        # The other process follows (the ledger is the one source), at the added price.
        until(second, key, "cheap")
        until(first, key, "cheap")
        resp = second.client(key).chat.completions.with_raw_response.create(
            model=MODEL, messages=MSG)
        u = resp.parse().usage
        assert u is not None and resp.headers["x-routstr-provider"] == "cheap"
        assert int(resp.headers["x-routstr-cost-msats"]) == expected(
            CHEAP, "1.05", u.prompt_tokens, u.completion_tokens)
        assert cheap.seen()[-1]["auth"] == "Bearer sk-from-env"
        shown = httpx.get(f"{second.url}/admin/api/providers", headers=auth, timeout=10).json()
        assert {(p["name"], p["source"], p["enabled"]) for p in shown["providers"]} == {
            ("dear", "configured", True), ("cheap", "added", True)}
        # Bad entries: the file's one-line errors, as OpenAI-shaped errors.
        bad = httpx.post(f"{first.url}/admin/api/providers", headers=auth, timeout=10,
                         json={"name": "x", "base_url": f"{cheap.url}/v1", "models": "fetch",
                               "colour": "red"})
        assert bad.status_code == 400
        assert bad.json()["error"]["message"].startswith("provider 'x': colour: unknown field")
        twice = httpx.post(f"{first.url}/admin/api/providers", json=entry, headers=auth,
                           timeout=10)
        assert twice.status_code == 409
        kept = httpx.delete(f"{first.url}/admin/api/providers/dear", headers=auth, timeout=10)
        assert kept.status_code == 409 and "disable it instead" in kept.text
        # Removed through the second process: the first stops routing to it.
        gone = httpx.delete(f"{second.url}/admin/api/providers/cheap", headers=auth,
                            timeout=10)
        assert gone.status_code == 200
        until(first, key, "dear")
        until(second, key, "dear")
        missing = httpx.delete(f"{second.url}/admin/api/providers/cheap", headers=auth,
                               timeout=10)
        assert missing.status_code == 404
        # A key given in the entry itself: stored, used, never shown back nor logged.
        direct = {**entry, "name": "direct", "api_key": "sk-secret-direct"}
        del direct["api_key_env"]
        made = httpx.post(f"{first.url}/admin/api/providers", json=direct, headers=auth,
                          timeout=10)
        assert made.status_code == 201 and "sk-secret-direct" not in made.text
        until(first, key, "direct")
        assert cheap.seen()[-1]["auth"] == "Bearer sk-secret-direct"
        shown = httpx.get(f"{first.url}/admin/api/providers", headers=auth, timeout=10)
        assert "direct" in shown.text and "sk-secret-direct" not in shown.text
        upstreams = httpx.get(f"{first.url}/admin/api/upstreams", headers=auth, timeout=10)
        assert '"direct"' in upstreams.text and "sk-secret-direct" not in upstreams.text
        assert httpx.delete(f"{first.url}/admin/api/providers/direct", headers=auth,
                            timeout=10).status_code == 200
        until(second, key, "dear")
        # Journaled, with no key in it.
        journal = httpx.get(f"{first.url}/admin/api/journal", headers=auth, timeout=10).json()
        actions = [(a["action"], a["target"]) for a in journal["actions"]]
        assert ("provider.add", "cheap") in actions and ("provider.remove", "cheap") in actions
        for secret in ("sk-from-env", "sk-secret-direct"):
            assert secret not in json.dumps(journal)
            assert secret not in first.output.text + second.output.text
    finally:
        first.stop()
        second.stop()


def test_each_process_applies_the_table_as_it_is(tmp_path: Path) -> None:
    """A name the configuration holds is never taken over; a changed entry replaces the old
    one; a removed one leaves the catalog, the router, the breakers and the route."""
    from decimal import Decimal

    from routstr_addon.ledger import Ledger
    from routstr_addon.metering.pricing import Pricing
    from routstr_addon.proxy.route import Route
    from routstr_addon.upstreams.catalog import Catalog, Router
    from routstr_addon.upstreams.live import LiveProviders
    from routstr_addon.upstreams.providers import ProviderSpec, _url

    configured = ProviderSpec("dear", _url("dear", "base_url", "http://127.0.0.1:9/v1"),
                              models=())
    pricing = Pricing({}, Decimal(1), Decimal(1))
    router = Router(pricing, [configured])
    catalog = Catalog([configured], router, tmp_path, "http://127.0.0.1:9/", {})
    route = Route((configured,), router.health, None, pricing)
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    try:
        live = LiveProviders(catalog, route, ledger, ["dear"])

        def entry(name: str, url: str) -> tuple[str, str]:
            return name, json.dumps({"name": name, "base_url": url, "api_key": "sk-x",
                                     "models": [{**CHEAP, "upstream_id": "m"}]})

        joined = live.apply([entry("dear", "http://127.0.0.1:1/v1"),
                             entry("new", "http://127.0.0.1:2/v1")])
        assert [p.name for p in joined] == ["new"]
        assert [p.name for p in catalog.providers] == ["dear", "new"]
        assert route.providers["dear"].base_url == "http://127.0.0.1:9/v1"
        assert "new" in router.health.breakers and route.auth["new"]
        catalog.publish()
        assert {o.provider for o in pricing.offers[MODEL]} == {"new"}
        joined = live.apply([entry("new", "http://127.0.0.1:3/v1")])  # changed: replaced
        assert [p.base_url for p in joined] == ["http://127.0.0.1:3/v1"]
        assert route.providers["new"].base_url == "http://127.0.0.1:3/v1"
        assert live.apply([]) == []
        catalog.publish()
        assert [p.name for p in catalog.providers] == ["dear"]
        assert "new" not in route.providers and "new" not in router.health.breakers
        assert MODEL not in pricing.offers
        assert route.retired["new"].base_url == "http://127.0.0.1:3/v1"  # in flight: finish
    finally:
        ledger.close()


def test_provider_added_with_models_fetch_is_priced_from_openrouters_list(
        tmp_path: Path, providers: Any) -> None:  # noqa: F811
    """The catalog was not refreshed (every configured price inline) until a provider whose
    models come from its own list, priced by OpenRouter's, joined."""
    dear = providers()
    with ModelLists() as lists:
        lists.openrouter = [{**CHEAP, "id": "vendor/fetched-model"}]
        lists.provider_ids = ["fetched-model"]
        proxy = start(tmp_path / "proxy", tmp_path / "providers.json",
                      [provider("dear", dear.url, DEAR)], MODELS_REFRESH_INTERVAL="30",
                      OPENROUTER_MODELS_URL=f"{lists.url}/api/v1/models")
        try:
            def listed() -> set[str]:
                data = httpx.get(f"{proxy.v1}/models", timeout=10).json()["data"]
                return {m["id"] for m in data}

            assert listed() == {MODEL}
            cli(proxy, "add", "fetcher", "--base-url", f"{lists.url}/v1", "--models", "fetch")
            deadline = time.monotonic() + 10
            while "vendor/fetched-model" not in listed():
                assert time.monotonic() < deadline, listed()
                time.sleep(0.3)
            assert "/v1/models" in lists.hits
            cli(proxy, "remove", "fetcher")
            deadline = time.monotonic() + 10
            while "vendor/fetched-model" in listed():
                assert time.monotonic() < deadline
                time.sleep(0.3)
        finally:
            proxy.stop()
