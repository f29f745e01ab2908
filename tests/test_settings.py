"""Unit tests of routstr_addon.settings: options, environment, validation."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from routstr_addon.settings import RATE_SOURCES as DEFAULT_SOURCES
from routstr_addon.settings import (
    SETTINGS,
    SettingError,
    environment,
    load_config,
    register,
)


class FakeLoader:
    """Records ``add_option`` calls the way mitmproxy's loader receives them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any, str]] = []

    def add_option(self, name: str, typespec: Any, default: Any, help: str) -> None:
        self.calls.append((name, typespec, default, help))

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: default for name, _, default, _ in self.calls}


BUILT_IN = {s.option: s.default for s in SETTINGS}


def test_register_adds_every_setting_with_built_in_defaults():
    loader = FakeLoader()
    assert register(loader, {}) == []
    assert [c[0] for c in loader.calls] == [s.env.lower() for s in SETTINGS]
    assert loader.defaults == BUILT_IN
    for (name, typespec, default, help_), s in zip(loader.calls, SETTINGS, strict=True):
        assert typespec is s.type
        assert isinstance(default, s.type), name
        assert help_
    assert loader.defaults["upstream_base_url"] == ""
    assert loader.defaults["model_based_pricing"] is True
    assert loader.defaults["cost_per_request"] == 1
    assert loader.defaults["exchange_fee"] == "1.005"


def test_register_takes_defaults_from_the_given_env():
    loader = FakeLoader()
    env = {
        "UPSTREAM_BASE_URL": "https://api.openai.com/v1",
        "MODEL_BASED_PRICING": "false",
        "COST_PER_REQUEST": " 7 ",
        "PRICE_REFRESH_INTERVAL": "60",
        "NAME": "My Proxy",
        "UNRELATED": "ignored",
    }
    assert register(loader, env) == []
    expected = dict(BUILT_IN, upstream_base_url="https://api.openai.com/v1",
                    model_based_pricing=False, cost_per_request=7, price_refresh_interval=60,
                    name="My Proxy")
    assert loader.defaults == expected
    assert "unrelated" not in loader.defaults


@pytest.mark.parametrize(("raw", "value"), [
    ("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("On", True),
    ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
])
def test_register_bool_spellings(raw, value):
    loader = FakeLoader()
    assert register(loader, {"MODEL_BASED_PRICING": raw}) == []
    assert loader.defaults["model_based_pricing"] is value


def test_register_reports_bad_values_naming_the_variable():
    loader = FakeLoader()
    errors = register(loader, {"COST_PER_REQUEST": "ten", "MODEL_BASED_PRICING": "maybe",
                               "PRICE_REFRESH_INTERVAL": "1.5", "NAME": "fine"})
    assert len(errors) == 3
    assert any(e.startswith("COST_PER_REQUEST") and "'ten'" in e for e in errors)
    assert any(e.startswith("MODEL_BASED_PRICING") and "'maybe'" in e for e in errors)
    assert any(e.startswith("PRICE_REFRESH_INTERVAL") and "'1.5'" in e for e in errors)
    # every option is still registered, the bad ones with their built-in default
    assert len(loader.calls) == len(SETTINGS)
    assert loader.defaults["cost_per_request"] == 1
    assert loader.defaults["model_based_pricing"] is True
    assert loader.defaults["price_refresh_interval"] == 300
    assert loader.defaults["name"] == "fine"


# --- load_config ----------------------------------------------------------------------------


def test_load_config_defaults(tmp_path):
    config = load_config({"DATA_DIR": str(tmp_path)})
    assert config.upstream is None
    assert config.database_url == f"sqlite:///{tmp_path / 'routstr.sqlite'}"
    assert config.model_based_pricing is True
    assert config.cost_per_request_msat == 1000
    assert config.btc_usd_price is None
    assert config.btc_usd_sources == tuple(DEFAULT_SOURCES.items())
    assert config.exchange_fee == Decimal("1.005")
    assert config.upstream_provider_fee == Decimal("1.05")
    assert config.max_request_size == 32 * 1024**2
    assert config.price_refresh_interval == 300


def test_load_config_values():
    config = load_config({
        "UPSTREAM_BASE_URL": "https://api.openai.com/v1/",
        "UPSTREAM_API_KEY": " sk-up ",
        "DATABASE_URL": "postgresql://u@127.0.0.1/routstr",
        "COST_PER_REQUEST": "0",
        "BTC_USD_PRICE": "91234.56",
        "BTC_USD_SOURCES": "kraken=http://127.0.0.1:9/t,binance",
        "EXCHANGE_FEE": "1",
        "UPSTREAM_PROVIDER_FEE": "1.2",
        "MAX_REQUEST_SIZE": "500K",
    })
    assert config.upstream is not None
    assert (config.upstream.scheme, config.upstream.host, config.upstream.port,
            config.upstream.base_path) == ("https", "api.openai.com", 443, "/v1")
    assert config.upstream.origin == "https://api.openai.com:443"
    assert config.upstream_api_key == "sk-up"
    assert config.database_url == "postgresql://u@127.0.0.1/routstr"
    assert config.cost_per_request_msat == 0
    assert config.btc_usd_price == Decimal("91234.56")
    assert config.btc_usd_sources == (("kraken", "http://127.0.0.1:9/t"),
                                      ("binance", DEFAULT_SOURCES["binance"]))
    assert config.exchange_fee == Decimal(1)
    assert config.upstream_provider_fee == Decimal("1.2")
    assert config.max_request_size == 500 * 1024


def test_upstream_with_port_and_no_path():
    config = load_config({"UPSTREAM_BASE_URL": "http://127.0.0.1:8081"})
    assert config.upstream is not None
    assert config.upstream.origin == "http://127.0.0.1:8081"
    assert config.upstream.base_path == ""


@pytest.mark.parametrize(("raw", "size"), [
    ("1", 1), ("100b", 100), ("2k", 2048), (" 32M ", 32 * 1024**2), ("1g", 1024**3),
])
def test_max_request_size_units(raw, size):
    assert load_config({"MAX_REQUEST_SIZE": raw}).max_request_size == size


def test_overrides_win_over_env():
    config = load_config({"COST_PER_REQUEST": "5"}, cost_per_request=9)
    assert config.cost_per_request_msat == 9000


@pytest.mark.parametrize(("env", "name"), [
    ({"UPSTREAM_BASE_URL": "api.openai.com/v1"}, "UPSTREAM_BASE_URL"),
    ({"UPSTREAM_BASE_URL": "ftp://example.com/v1"}, "UPSTREAM_BASE_URL"),
    ({"UPSTREAM_BASE_URL": "http://"}, "UPSTREAM_BASE_URL"),
    ({"UPSTREAM_BASE_URL": "http://example.com:99999/v1"}, "UPSTREAM_BASE_URL"),
    ({"UPSTREAM_BASE_URL": "http://example.com:port/v1"}, "UPSTREAM_BASE_URL"),
    ({"EXCHANGE_FEE": "0.99"}, "EXCHANGE_FEE"),
    ({"EXCHANGE_FEE": "0"}, "EXCHANGE_FEE"),
    ({"EXCHANGE_FEE": "-1.5"}, "EXCHANGE_FEE"),
    ({"EXCHANGE_FEE": "one"}, "EXCHANGE_FEE"),
    ({"EXCHANGE_FEE": ""}, "EXCHANGE_FEE"),
    ({"EXCHANGE_FEE": "nan"}, "EXCHANGE_FEE"),
    ({"EXCHANGE_FEE": "Infinity"}, "EXCHANGE_FEE"),
    ({"UPSTREAM_PROVIDER_FEE": "0.5"}, "UPSTREAM_PROVIDER_FEE"),
    ({"UPSTREAM_PROVIDER_FEE": "5%"}, "UPSTREAM_PROVIDER_FEE"),
    ({"BTC_USD_PRICE": "0"}, "BTC_USD_PRICE"),
    ({"BTC_USD_PRICE": "-90000"}, "BTC_USD_PRICE"),
    ({"BTC_USD_PRICE": "0.000"}, "BTC_USD_PRICE"),
    ({"BTC_USD_PRICE": "$90000"}, "BTC_USD_PRICE"),
    ({"BTC_USD_PRICE": "inf"}, "BTC_USD_PRICE"),
    ({"MAX_REQUEST_SIZE": "big"}, "MAX_REQUEST_SIZE"),
    ({"MAX_REQUEST_SIZE": "0"}, "MAX_REQUEST_SIZE"),
    ({"MAX_REQUEST_SIZE": "-1m"}, "MAX_REQUEST_SIZE"),
    ({"MAX_REQUEST_SIZE": "1.5m"}, "MAX_REQUEST_SIZE"),
    ({"MAX_REQUEST_SIZE": "10t"}, "MAX_REQUEST_SIZE"),
    ({"MAX_REQUEST_SIZE": "m"}, "MAX_REQUEST_SIZE"),
    ({"MAX_REQUEST_SIZE": ""}, "MAX_REQUEST_SIZE"),
    ({"DATABASE_URL": "mysql://u:secret@db/routstr"}, "DATABASE_URL"),
    ({"DATABASE_URL": "sqlite://relative.db"}, "DATABASE_URL"),
    ({"DATABASE_URL": "routstr.sqlite"}, "DATABASE_URL"),
    ({"COST_PER_REQUEST": "-1"}, "COST_PER_REQUEST"),
    ({"COST_PER_REQUEST": "1.5"}, "COST_PER_REQUEST"),
    ({"MODEL_BASED_PRICING": "perhaps"}, "MODEL_BASED_PRICING"),
    ({"PRICE_REFRESH_INTERVAL": "1"}, "PRICE_REFRESH_INTERVAL"),
    ({"BTC_USD_SOURCES": "kraken,coingecko"}, "BTC_USD_SOURCES"),
])
def test_load_config_rejects_naming_the_setting(env, name):
    with pytest.raises(SettingError) as raised:
        load_config(env)
    assert str(raised.value).startswith(name + ":")


def test_bad_database_url_does_not_echo_the_password():
    with pytest.raises(SettingError) as raised:
        load_config({"DATABASE_URL": "mysql://user:hunter2@db/routstr"})
    assert "hunter2" not in str(raised.value)


def test_btc_usd_price_minimum_is_one_cent():
    assert load_config({"BTC_USD_PRICE": "0.01"}).btc_usd_price == Decimal("0.01")
    assert load_config({"BTC_USD_PRICE": "  "}).btc_usd_price is None


# --- environment ----------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for s in SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    return monkeypatch


def write_env(folder: Path, text: str) -> None:
    (folder / ".env").write_text(text)


def test_environment_reads_dotenv_in_the_given_folder(tmp_path, clean_env):
    write_env(tmp_path, "# settings\nEXCHANGE_FEE=1.1\nNAME='Dot Env Proxy'\n"
                        "export COST_PER_REQUEST=3\nEMPTY_ONE\n")
    env = environment(tmp_path)
    assert env["EXCHANGE_FEE"] == "1.1"
    assert env["NAME"] == "Dot Env Proxy"
    assert env["COST_PER_REQUEST"] == "3"
    assert "EMPTY_ONE" not in env
    config = load_config(env)
    assert config.exchange_fee == Decimal("1.1")
    assert config.name == "Dot Env Proxy"
    assert config.cost_per_request_msat == 3000


def test_process_env_wins_over_dotenv(tmp_path, clean_env):
    write_env(tmp_path, "EXCHANGE_FEE=1.1\nUPSTREAM_PROVIDER_FEE=1.2\n")
    clean_env.setenv("EXCHANGE_FEE", "1.3")
    clean_env.setenv("SOME_OTHER_VARIABLE", "x")
    env = environment(tmp_path)
    assert env["EXCHANGE_FEE"] == "1.3"
    assert env["UPSTREAM_PROVIDER_FEE"] == "1.2"
    assert "SOME_OTHER_VARIABLE" not in env  # only the proxy's settings come from the process


def test_environment_without_dotenv(tmp_path, clean_env):
    assert environment(tmp_path) == {}
    clean_env.setenv("NAME", "From Process")
    assert environment(tmp_path) == {"NAME": "From Process"}


def test_environment_defaults_to_the_working_folder(tmp_path, clean_env):
    write_env(tmp_path, "NAME=Here\n")
    clean_env.chdir(tmp_path)
    assert environment()["NAME"] == "Here"
    assert load_config().name == "Here"
    loader = FakeLoader()
    assert register(loader) == []
    assert loader.defaults["name"] == "Here"
