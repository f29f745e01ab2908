"""An operator's routstr-core configuration, read unchanged (issue 12, item 1): models.json in
its shapes, both generations of its setting names, its database URLs, and one clear line for
what cannot work."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from routstr_addon.core_settings import translate, unknown_settings
from routstr_addon.metering.pricing import load_models
from routstr_addon.settings import SETTINGS, SettingError, core_database_url, load_config

from .conftest import ADDON, BIN, MODELS, raw, start_proxy

OURS = {s.env for s in SETTINGS}


def core_entry(model_id: str) -> dict[str, Any]:
    """A model as routstr-core's models.example.json lists it (OpenRouter's fields)."""
    return {"id": model_id, "name": model_id, "created": 1700000000,
            "description": "a model", "context_length": 8192,
            "architecture": {"modality": "text->text", "input_modalities": ["text"],
                             "output_modalities": ["text"], "tokenizer": "GPT",
                             "instruct_type": None},
            "pricing": {"prompt": "0.000001", "completion": "0.000002", "request": "0",
                        "image": "0", "web_search": "0", "internal_reasoning": "0"},
            "top_provider": {"context_length": 8192, "max_completion_tokens": 2048,
                             "is_moderated": False},
            "per_request_limits": None}


@pytest.mark.parametrize("shape", ["core", "openrouter", "list"])
def test_models_files_in_every_shape_load(tmp_path: Path, shape: str) -> None:
    entries = [core_entry("a/one"), core_entry("b/two")]
    data: Any = {"core": {"models": entries}, "openrouter": {"data": entries},
                 "list": entries}[shape]
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data))
    models = load_models(path)
    assert set(models) == {"a/one", "b/two"}
    assert models["a/one"].context_length == 8192
    assert models["a/one"].max_completion_tokens == 2048


@pytest.mark.parametrize(("entries", "named"), [
    ([core_entry("a/ok"), {**core_entry("b/bad"), "pricing": {"prompt": "cheap"}}], "'b/bad'"),
    ([core_entry("a/ok"), {"name": "no id", "pricing": {}}], "#2"),
    ([core_entry("a/ok"), "just a string"], "#2"),
    ([{**core_entry("c/no-context"), "context_length": None, "top_provider": {}}],
     "'c/no-context'"),
])
def test_an_entry_that_cannot_be_priced_is_named(tmp_path: Path, entries: list[Any],
                                                 named: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": entries}))
    with pytest.raises(ValueError, match=f"entry {named} cannot be priced"):
        load_models(path)


def startup_failure(tmp_path: Path, env: dict[str, str]) -> str:
    """Start mitmdump with the addon and these settings; it must exit: its output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    models = tmp_path / "models.json"
    if not models.exists():
        models.write_text(json.dumps(MODELS))
    full = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATA_DIR": str(tmp_path / "data"),
            "MODELS_PATH": str(models), "BTC_USD_PRICE": "50000", **env}
    done = subprocess.run([str(BIN / "mitmdump"), "--mode", "reverse:http://127.0.0.1:9",
                           "--listen-host", "127.0.0.1", "-p", "0", "-s", str(ADDON)],
                          cwd=tmp_path, env=full, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout
    return done.stdout + done.stderr


@pytest.mark.parametrize(("content", "expected"), [
    ({"models": []}, "holds no model"),
    ({"models": [core_entry("a/ok"), {"id": "b/bad", "pricing": {"prompt": "x"},
                                      "context_length": 10}]}, "entry 'b/bad' cannot be priced"),
    ({"something": "else"}, 'expected {"models": [...]}'),
])
def test_a_models_file_that_cannot_be_used_stops_start_up_with_one_line(
        tmp_path: Path, content: Any, expected: str) -> None:
    models = tmp_path / "models.json"
    models.write_text(json.dumps(content))
    output = startup_failure(tmp_path, {"MODELS_PATH": str(models)})
    (line,) = [x for x in output.splitlines() if "MODELS_PATH" in x]
    assert str(models) in line and expected in line


def test_both_generations_of_core_names_map_to_ours() -> None:
    raw_env = {"FIXED_PRICING": "true", "FIXED_COST_PER_REQUEST": "3", "MIN_PAYOUT_SAT": "210",
               "PAYOUT_INTERVAL_SECONDS": "900", "STALE_RESERVATION_TIMEOUT_SECONDS": "300",
               "PRICING_REFRESH_INTERVAL_SECONDS": "120",
               "PROVIDERS_REFRESH_INTERVAL_SECONDS": "0",
               "MINT_OPERATION_TIMEOUT_SECONDS": "30",
               "PRIMARY_MINT_URL": "https://primary.example", "LOG_LEVEL": "debug",
               "CASHU_MINTS": "https://other.example,https://primary.example/",
               "COST_PER_1K_INPUT_TOKENS": "0", "NPUB": "npub1xyz"}
    t = translate(raw_env, OURS)
    assert t.values == {"MODEL_BASED_PRICING": "false", "COST_PER_REQUEST": "3",
                        "MINIMUM_PAYOUT": "210", "PAYOUT_INTERVAL": "900",
                        "RESERVATION_TIMEOUT": "300", "PRICE_REFRESH_INTERVAL": "120",
                        "PROVIDERS_REFRESH_INTERVAL": "0", "MINT_TIMEOUT": "30",
                        "CASHU_MINTS": "https://primary.example,https://other.example"}
    assert t.log_level == "DEBUG" and t.errors == []
    # one line each: 8 renamed, the primary mint, LOG_LEVEL, the zero per-token price, NPUB
    assert len(t.notes) == 12
    assert any(n.startswith("FIXED_PRICING=true (routstr-core) read as MODEL_BASED_PRICING=false")
               for n in t.notes)
    config = load_config({**raw_env, **t.values})
    assert not config.model_based_pricing and config.cost_per_request_msat == 3000
    assert config.cashu_mints[0] == "https://primary.example"
    # ours wins where both are set
    both = translate({"MIN_PAYOUT_SAT": "210", "MINIMUM_PAYOUT": "5000"}, OURS)
    assert both.values == {} and "MINIMUM_PAYOUT is set" in both.notes[0]


def test_per_token_fixed_prices_cannot_be_run_with() -> None:
    t = translate({"COST_PER_1K_OUTPUT_TOKENS": "15"}, OURS)
    assert t.errors and "COST_PER_1K_OUTPUT_TOKENS" in t.errors[0]
    assert translate({"LOG_LEVEL": "loud"}, OURS).errors


def test_a_setting_that_looks_like_ours_is_named_with_the_closest() -> None:
    warnings = unknown_settings(["CASHU_MINT", "UPSTREAM_URL", "ADMIN_PASS", "PATH", "HOME",
                                 "LANG", "PYTHONUNBUFFERED", "CASHU_MINTS"], OURS,
                                from_file=["RECIEVE_LN_ADDRESS", "SOMETHING_ELSE"])
    assert warnings == [
        "ADMIN_PASS is not a setting of this proxy; did you mean ADMIN_PASSWORD?",
        "CASHU_MINT is not a setting of this proxy; did you mean CASHU_MINTS?",
        "RECIEVE_LN_ADDRESS is not a setting of this proxy; did you mean RECEIVE_LN_ADDRESS?",
        "SOMETHING_ELSE in .env is not a setting of this proxy (ignored)",
        "UPSTREAM_URL is not a setting of this proxy; did you mean UPSTREAM_BASE_URL?",
    ]


@pytest.mark.parametrize(("url", "ours"), [
    ("sqlite+aiosqlite:///keys.db", "sqlite:///keys.db"),
    ("sqlite+aiosqlite:////var/lib/routstr/keys.db", "sqlite:////var/lib/routstr/keys.db"),
    ("postgresql+asyncpg://routstr:pw@db:5432/routstr", "postgresql://routstr:pw@db:5432/routstr"),
    ("postgresql+psycopg://u@h/d", "postgresql://u@h/d"),
    ("postgresql://u@h/d", "postgresql://u@h/d"),
])
def test_core_database_urls_are_accepted(url: str, ours: str) -> None:
    assert core_database_url(url) == ours
    assert load_config({"DATABASE_URL": url}).database_url == ours


def test_other_database_urls_are_still_refused() -> None:
    with pytest.raises(SettingError, match="DATABASE_URL"):
        load_config({"DATABASE_URL": "mysql+aiomysql://u@h/d"})


def test_a_core_env_runs_the_proxy_with_one_line_per_mapped_name(
        upstream: Any, tmp_path: Path) -> None:
    """routstr-core's .env, dropped in: fixed pricing at 3 sats a request, its SQLite URL, a
    typo warned about."""
    work = tmp_path / "p"
    work.mkdir()
    db = work / "keys.db"
    (work / ".env").write_text(
        f"UPSTREAM_BASE_URL={upstream.url}/v1\n"
        "FIXED_PRICING=true\nFIXED_COST_PER_REQUEST=3\n"
        f"DATABASE_URL=sqlite+aiosqlite:///{db}\n"
        "STALE_RESERVATION_TIMEOUT_SECONDS=120\nLOG_LEVEL=INFO\n"
        "COST_PER_1K_INPUT_TOKENS=0\nRECIEVE_LN_ADDRESS=me@example.com\n")
    proxy = start_proxy(work, upstream.url, {})
    try:
        out = proxy.output
        out.wait_for(r"FIXED_PRICING=true \(routstr-core\) read as MODEL_BASED_PRICING=false")
        out.wait_for(r"FIXED_COST_PER_REQUEST=3 \(routstr-core\) read as COST_PER_REQUEST=3")
        out.wait_for(r"STALE_RESERVATION_TIMEOUT_SECONDS=120 .* RESERVATION_TIMEOUT=120")
        out.wait_for(r"RECIEVE_LN_ADDRESS .*did you mean RECEIVE_LN_ADDRESS\?")
        proxy.database_url = f"sqlite:///{db}"
        key = proxy.new_key(sats=10)
        answer = raw(proxy, "POST", "/v1/chat/completions",
                     json={"model": "test/model",
                           "messages": [{"role": "user", "content": "fixed price"}]},
                     headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        assert int(answer.headers["x-routstr-cost-msats"]) == 3000
        assert db.exists()
    finally:
        proxy.stop()


def test_a_per_token_core_price_stops_start_up(tmp_path: Path) -> None:
    output = startup_failure(tmp_path, {"COST_PER_1K_INPUT_TOKENS": "5"})
    assert "COST_PER_1K_INPUT_TOKENS: fixed per-token prices are not supported" in output
