"""Every setting of the proxy, as a mitmproxy option whose default comes from the environment.

The names operators write (``UPSTREAM_BASE_URL``) are the upper-case form of the option names
mitmproxy knows (``upstream_base_url``), so ``--set upstream_base_url=…`` works too. Values are
read from the process environment first, then from ``.env`` in the working folder.

``Config.from_options`` turns the raw option values into one typed, validated object; anything
wrong raises ``SettingError`` naming the setting, which stops start-up with one clear line.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

if TYPE_CHECKING:
    from routstr_addon.upstreams.providers import ProviderSpec

__all__ = [
    "ENV_PROVIDERS",
    "RATE_SOURCES",
    "SETTINGS",
    "Config",
    "MnemonicError",
    "Setting",
    "SettingError",
    "StartupReport",
    "environment",
    "load_config",
    "normalize_mnemonic",
    "parse_sources",
    "register",
    "startup_report",
]


class SettingError(ValueError):
    """A setting has a value the proxy cannot run with."""


# The original Routstr's provider variables: setting one adds that provider with its public
# OpenAI-compatible base URL, its models read from its own GET /models and priced from
# OpenRouter's list (the last column: how OpenRouter names that provider's models).
ENV_PROVIDERS: tuple[tuple[str, str, str, str], ...] = (
    # (variable holding the key, provider name, base URL, OpenRouter prefix)
    ("OPENAI_API_KEY", "openai", "https://api.openai.com/v1", "openai/"),
    ("ANTHROPIC_API_KEY", "anthropic", "https://api.anthropic.com/v1", "anthropic/"),
    ("OPENROUTER_API_KEY", "openrouter", "https://openrouter.ai/api/v1", ""),
    ("GROQ_API_KEY", "groq", "https://api.groq.com/openai/v1", ""),
    ("XAI_API_KEY", "xai", "https://api.x.ai/v1", "x-ai/"),
    ("FIREWORKS_API_KEY", "fireworks", "https://api.fireworks.ai/inference/v1", ""),
    ("PERPLEXITY_API_KEY", "perplexity", "https://api.perplexity.ai", "perplexity/"),
)


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    type: type
    default: Any
    help: str
    secret: bool = False

    @property
    def option(self) -> str:
        return self.env.lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("UPSTREAM_BASE_URL", str, "",
            "Base URL of the OpenAI-compatible upstream, as a client would use it "
            "(e.g. https://api.openai.com/v1). Empty: keep the reverse mode's target and path."),
    Setting("UPSTREAM_API_KEY", str, "", "Key sent upstream as 'Authorization: Bearer'.",
            secret=True),
    Setting("UPSTREAM_TIMEOUT", int, 300,
            "Seconds to wait for the upstream's answer to begin; then the request fails with a "
            "502 and its reservation is released. 0: wait as long as the connection lives."),
    Setting("UPSTREAM_CONNECT_TIMEOUT", int, 10,
            "With several providers for a model: seconds one may take to connect and send its "
            "answer's headers before the request goes to the next (the last gets "
            "UPSTREAM_TIMEOUT)."),
    Setting("UPSTREAM_COOLDOWN", int, 30,
            "Seconds a provider that failed (three times in a row, or refused a connection) is "
            "tried last, before it is probed (its GET /models) to be taken back."),
    Setting("PROVIDERS_PATH", str, "",
            "YAML (or JSON) file listing the upstream providers: name, base_url, api_key or "
            "api_key_env, fee, priority, headers, models / models_path / models: fetch."),
    Setting("MODELS_REFRESH_INTERVAL", int, 360,
            "Seconds between refreshes of OpenRouter's model list (prices of providers that "
            "take them from it) and of providers' own model lists."),
    Setting("OPENROUTER_MODELS_URL", str, "https://openrouter.ai/api/v1/models",
            "Where OpenRouter's public model list is read from."),
    *(Setting(variable, str, "", f"Adds the {name} provider ({url}) with this key.",
              secret=True) for variable, name, url, _ in ENV_PROVIDERS),
    Setting("OLLAMA_BASE_URL", str, "",
            "Adds a local Ollama (e.g. http://127.0.0.1:11434) as a provider."),
    Setting("DATA_DIR", str, "data", "Folder for the ledger database and wallet data."),
    Setting("DATABASE_URL", str, "",
            "Ledger database: sqlite:///path or postgresql://user@host/db. "
            "Empty: sqlite under DATA_DIR."),
    Setting("MODEL_BASED_PRICING", bool, True,
            "Price requests from models.json and token usage; false charges COST_PER_REQUEST."),
    Setting("COST_PER_REQUEST", int, 1,
            "Sats per request in fixed mode, and for forwarded endpoints without token usage."),
    Setting("FIXED_PRICE_ENDPOINTS", str, "",
            "Endpoints forwarded at a fixed price besides the metered ones, as name=sats pairs "
            "(images/generations=50,audio/speech=10). Empty: only chat/completions, "
            "completions, embeddings, responses and messages are forwarded."),
    Setting("MODELS_PATH", str, "models.json",
            "Model list in OpenRouter's shape; falls back to models.example.json."),
    Setting("BTC_USD_PRICE", str, "",
            "Fixed BTC/USD rate. Empty: live rates from BTC_USD_SOURCES."),
    Setting("BTC_USD_SOURCES", str, "kraken,coinbase,binance",
            "Live rate sources: names, or name=url to point one elsewhere."),
    Setting("PRICE_REFRESH_INTERVAL", int, 300, "Seconds between live rate refreshes."),
    Setting("EXCHANGE_FEE", str, "1.005", "Multiplier on USD prices for the exchange spread."),
    Setting("UPSTREAM_PROVIDER_FEE", str, "1.05",
            "Multiplier on USD prices for the provider margin."),
    Setting("CASHU_MINTS", str, "",
            "Trusted Cashu mints, comma-separated; the first is primary (change, refunds, "
            "Lightning top-ups). Empty: no ecash, keys are funded by the operator only."),
    Setting("MINT_TIMEOUT", int, 15,
            "Seconds to wait for a mint's answer. A swap whose answer is lost is recovered "
            "from the mint (NUT-09) when the same token is sent again."),
    Setting("SWAP_UNTRUSTED_MINTS", bool, False,
            "Accept tokens of other mints for keys and top-ups by moving them to the primary "
            "mint over Lightning (fees deducted). false: refuse them, naming CASHU_MINTS."),
    Setting("LOCKED_PAYMENTS", bool, True,
            "x-cashu without the mint on the request path: the 402 asks for ecash locked to "
            "the proxy's payment key (NUT-11), accepted offline from its DLEQ proofs "
            "(NUT-12) and swapped later in batches; change comes from a pool of proofs. "
            "Needs a primary mint that supports NUT-10/11/12. false: every x-cashu token is "
            "swapped on the request path."),
    Setting("CHANGE_POOL_PER_AMOUNT", int, 8,
            "Proofs of each amount (1, 2, 4 … 1024 sats) the change pool keeps for locked "
            "payments; refilled in the background below half of it. 0: no refill."),
    Setting("LOCKED_REDEEM_INTERVAL", int, 300,
            "Seconds between the batch swaps of received locked proofs at the mint."),
    Setting("WALLET_MNEMONIC", str, "",
            "BIP39 mnemonic the wallet's secrets are derived from (NUT-13), so its ecash can be "
            "restored (routstr wallet restore). Empty: one is made on first start and kept in "
            "DATA_DIR/wallet-mnemonic.txt. Back it up.", secret=True),
    Setting("RECEIVE_LN_ADDRESS", str, "",
            "Lightning address (user@domain) that receives the operator's earnings. Empty: "
            "no payouts."),
    Setting("MINIMUM_PAYOUT", int, 1000, "Sats of profit before a payout is made."),
    Setting("PAYOUT_INTERVAL", int, 3600, "Seconds between payout checks."),
    Setting("REFUND_PROCESSING_INTERVAL", int, 3600,
            "Seconds between refunds of expired keys (to their refund address, or as a "
            "claimable token)."),
    Setting("RESERVATION_TIMEOUT", int, 600,
            "Seconds without activity after which a request's reservation is swept (released, "
            "or charged for what it delivered). Flowing streams stay active."),
    Setting("LISTEN_BACKLOG", int, 1024,
            "Connections the kernel queues for the proxy before it accepts them (asyncio's "
            "default of 100 resets clients in a burst); capped by net.core.somaxconn."),
    Setting("MAX_REQUEST_SIZE", str, "32m",
            "Largest request body accepted (k/m/g suffixes); also bounds buffered responses."),
    Setting("NAME", str, "Routstr Proxy", "Name shown in /v1/info."),
    Setting("DESCRIPTION", str, "A Cashu-paid proxy for OpenAI-compatible APIs",
            "Description shown in /v1/info."),
    Setting("NSEC", str, "",
            "Nostr secret key (nsec1… or hex) of this provider. Set: the proxy announces itself "
            "to RELAYS on start and daily (kind 38421). Empty: no announcement.", secret=True),
    Setting("RELAYS", str, "wss://relay.damus.io,wss://nos.lol,wss://relay.routstr.com",
            "Nostr relays, comma-separated: where the announcement goes and /v1/providers looks."),
    Setting("HTTP_URL", str, "", "Public URL of this proxy, announced and shown in /v1/info."),
    Setting("ONION_URL", str, "",
            "Tor onion URL of this proxy. Empty: read from ONION_HOSTNAME_FILE, if set."),
    Setting("ONION_HOSTNAME_FILE", str, "",
            "The hidden service's 'hostname' file, written by tor (see compose.yml)."),
    Setting("TOR_PROXY_URL", str, "socks5h://127.0.0.1:9050",
            "SOCKS proxy used to reach .onion providers (for /v1/providers, and the "
            "providers and Routstr nodes requests are forwarded to)."),
    Setting("PROVIDERS_REFRESH_INTERVAL", int, 300,
            "Seconds /v1/providers keeps what it found on the relays; 0 turns it off."),
    # -- other Routstr nodes found on Nostr, as providers (issue 16) --
    Setting("AUTO_DISCOVER_NODES", bool, False,
            "Nodes listed on RELAYS (kind 38421) that answer /v1/info and take one of "
            "CASHU_MINTS join as providers of type routstr, paid per request with ecash."),
    Setting("NODE_MAX_PRICE_MARKUP", str, "1.5",
            "A discovered node's model is offered only if its price is at most this multiple "
            "of the cheapest offer of that model."),
    Setting("NODE_ALLOWED_PUBKEYS", str, "",
            "Only nodes listed by these Nostr keys (npub or hex, comma-separated) are used. "
            "Empty: any."),
    Setting("NODE_BLOCKED_PUBKEYS", str, "",
            "Nodes listed by these Nostr keys (npub or hex, comma-separated) are never used."),
    Setting("ADMIN_PASSWORD", str, "",
            "Password of the /admin dashboard (at least 8 characters). Empty: the dashboard "
            "is off and only says how to turn it on.", secret=True),
    # -- what users may make the proxy do, and who is believed (issue 11 items 6 and 10) --
    Setting("ALLOW_PRIVATE_LN_ADDRESSES", bool, False,
            "Let users' refund addresses (Lightning addresses, LNURLs and their callbacks) be "
            "plain http and reach loopback or private networks. false: https (or .onion via "
            "Tor) to public addresses only, checked on the address connected to."),
    Setting("INVOICES_PER_MINUTE", int, 10,
            "Lightning invoices one client address may create per minute (then 429)."),
    Setting("FORWARDED_ALLOW_IPS", str, "",
            "Reverse proxies (IPs or networks, comma-separated; * for any) whose "
            "X-Forwarded-For names the real client, as uvicorn's option. Empty: none."),
    Setting("CORS_ORIGINS", str, "*",
            "Origins browsers may call the proxy from, comma-separated; * for any."),
    # --- operating it: readiness, logs, metrics, the admin API ---------------------------
    Setting("READY_MAX_AGE", int, 30,
            "Seconds an answer of the primary mint or the upstream counts for /ready; older, "
            "/ready asks them itself."),
    Setting("LOG_FORMAT", str, "text",
            "The line per request on stdout: text (key=value) or json (the proxy's own log "
            "lines then JSON on stderr too); off: no such lines."),
    Setting("METRICS_TOKEN", str, "",
            "Bearer token that opens GET /metrics (Prometheus) on the proxy's port. Empty "
            "(and no METRICS_PORT): no metrics.", secret=True),
    Setting("METRICS_PORT", int, 0,
            "Serve /metrics without a token on this port of 127.0.0.1 only; 0: not served."),
    Setting("ADMIN_TOKEN", str, "",
            "Bearer token of the admin API under /admin/api/ (at least 24 characters). Empty: "
            "the API is off.", secret=True),
)

_BY_ENV = {s.env: s for s in SETTINGS}
_PROVIDER_SETTINGS = (*(_BY_ENV[v] for v, *_ in ENV_PROVIDERS), _BY_ENV["OLLAMA_BASE_URL"])


def _dotenv(cwd: Path | None) -> dict[str, str]:
    env_file = (cwd or Path.cwd()) / ".env"
    if not env_file.is_file():
        return {}
    return {k: v for k, v in dotenv_values(env_file).items() if v is not None}


def environment(cwd: Path | None = None) -> dict[str, str]:
    """The settings' raw values: ``.env`` in the working folder, overridden by the process env;
    routstr-core's names for them read as ours (``core_settings``) where ours are not set."""
    from routstr_addon.core_settings import translate

    file_values = _dotenv(cwd)
    values = dict(file_values)
    values.update({k: v for k, v in os.environ.items() if k in _BY_ENV})
    values.update(translate({**file_values, **os.environ}, _BY_ENV).values)
    return values


@dataclass(slots=True)
class StartupReport:
    """What start-up says about the environment, once: routstr-core names mapped (``notes``),
    names that look like ours but are not (``warnings``), and values it cannot run with."""

    notes: list[str]
    warnings: list[str]
    errors: list[str]
    log_level: str | None


def startup_report(cwd: Path | None = None) -> StartupReport:
    from routstr_addon.core_settings import translate, unknown_settings

    file_values = _dotenv(cwd)
    raw = {**file_values, **os.environ}
    translation = translate(raw, _BY_ENV)
    warnings = unknown_settings(os.environ, _BY_ENV, from_file=file_values)
    return StartupReport(translation.notes, warnings, translation.errors,
                         translation.log_level)


def parse_value(setting: Setting, raw: str) -> Any:
    """Parse one raw environment string into the setting's option type."""
    raw = raw.strip()
    if setting.type is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise SettingError(f"{setting.env}: expected true or false, got {raw!r}")
    if setting.type is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingError(f"{setting.env}: expected a whole number, got {raw!r}") from None
    return raw


def register(loader: Any, env: Mapping[str, str] | None = None) -> list[str]:
    """Add every setting as an option to a mitmproxy loader.

    Returns the errors met while reading the environment: an unparsable value keeps the
    built-in default here and is reported by the caller once options are configured.
    """
    env = environment() if env is None else env
    errors: list[str] = []
    for s in SETTINGS:
        default = s.default
        if s.env in env:
            try:
                default = parse_value(s, env[s.env])
            except SettingError as e:
                errors.append(str(e))
        loader.add_option(s.option, s.type, default, s.help)
    return errors


def _decimal(name: str, raw: str, *, minimum: Decimal | None = None) -> Decimal:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise SettingError(f"{name}: expected a number, got {raw!r}") from None
    if not value.is_finite() or (minimum is not None and value < minimum):
        raise SettingError(f"{name}: must be a number of at least {minimum}, got {raw!r}")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(name: str, raw: str) -> int:
    text = raw.strip().lower()
    unit = text[-1:] if text[-1:] in _SIZE_UNITS and not text[-1:].isdigit() else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or int(number) <= 0:
        raise SettingError(f"{name}: expected a size such as 32m or 500k, got {raw!r}")
    return int(number) * _SIZE_UNITS[unit]


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where forwarded requests go: the origin, and the path that replaces the client's /v1."""

    scheme: str
    host: str
    port: int
    base_path: str  # no trailing slash; "" keeps the client's path as is

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_upstream(raw: str) -> Upstream | None:
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError(f"UPSTREAM_BASE_URL: expected an http(s) URL such as "
                           f"https://api.openai.com/v1, got {raw!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise SettingError(f"UPSTREAM_BASE_URL: bad port in {raw!r}") from None
    return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


class MnemonicError(SettingError):
    """A mnemonic that is not a valid BIP39 English phrase (a setting the proxy cannot run
    with, so it stops start-up with one clear line like any other)."""


@functools.cache
def _bip39() -> Any:
    from mnemonic import Mnemonic  # its word list is read once, when a mnemonic is first seen

    return Mnemonic("english")


def normalize_mnemonic(text: str) -> str:
    """The phrase as BIP39 wants it: lower case, single spaces; MnemonicError if invalid."""
    phrase = " ".join(text.lower().split())
    try:
        valid = bool(phrase) and _bip39().check(phrase)
    except (ValueError, LookupError):
        valid = False
    if not valid:
        raise MnemonicError("not a valid BIP39 mnemonic (12 or 24 English words with a "
                            "correct checksum)")
    return phrase


def _mnemonic(raw: str) -> str:
    """A BIP39 mnemonic, normalized (lower case, single spaces), or "" when unset."""
    if not raw.strip():
        return ""
    try:
        return normalize_mnemonic(raw)
    except MnemonicError as e:
        raise SettingError(f"WALLET_MNEMONIC: {e}") from None


def _admin_password(raw: str) -> str:
    """The dashboard's password, or "" for none; never echoed in an error."""
    password = raw.strip()
    if password and len(password) < 8:
        raise SettingError("ADMIN_PASSWORD: use at least 8 characters (or leave it empty to "
                           "turn the /admin dashboard off)")
    return password


def _fixed_prices(raw: str) -> Mapping[str, int]:
    from routstr_addon.metering.surface import parse_fixed_prices

    try:
        return MappingProxyType({name: sats * 1000
                                 for name, sats in parse_fixed_prices(raw).items()})
    except ValueError as e:
        raise SettingError(f"FIXED_PRICE_ENDPOINTS: {e}") from None


def _choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in allowed:
        raise SettingError(f"{name}: expected one of {', '.join(allowed)}, got {raw!r}")
    return value


def _token(name: str, raw: str) -> str:
    """A bearer token the proxy checks, or "" for none; never echoed in an error."""
    token = raw.strip()
    if token and (len(token) < 24 or any(c.isspace() for c in token)):
        raise SettingError(f"{name}: use at least 24 characters without spaces (or leave it "
                           "empty to turn it off)")
    return token


def _port(name: str, value: int) -> int:
    if not 0 <= value <= 65535:
        raise SettingError(f"{name}: expected a port number (0 for none), got {value}")
    return value


def _at_least(name: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise SettingError(f"{name}: must be at least {minimum}, got {value}")
    return value


def parse_ln_address(raw: str) -> str:
    """A Lightning address (LUD-16), ``user@domain``; empty for none."""
    address = raw.strip()
    if not address:
        return ""
    user, sep, domain = address.partition("@")
    if not sep or not user or ("." not in domain and ":" not in domain) or " " in address:
        raise SettingError(f"RECEIVE_LN_ADDRESS: expected a Lightning address such as "
                           f"you@getalby.com, got {raw!r}")
    return address.lower()


# Public BTC/USD tickers the live rate can come from, by name (metering.pricing reads each).
RATE_SOURCES: Mapping[str, str] = {
    "kraken": "https://api.kraken.com/0/public/Ticker?pair=XBTUSD",
    "coinbase": "https://api.coinbase.com/v2/prices/BTC-USD/spot",
    "binance": "https://api.binance.com/api/v3/ticker/price?symbol=BTCUSDT",
}


def parse_sources(raw: str) -> tuple[tuple[str, str], ...]:
    """``kraken,coinbase`` or ``kraken=http://…``: known source names, optionally re-pointed."""
    sources: list[tuple[str, str]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, _, url = item.partition("=")
        name = name.strip().lower()
        if name not in RATE_SOURCES:
            raise SettingError(f"BTC_USD_SOURCES: unknown source {name!r} "
                               f"(known: {', '.join(RATE_SOURCES)})")
        sources.append((name, url.strip() or RATE_SOURCES[name]))
    return tuple(sources)


def parse_mints(raw: str) -> tuple[str, ...]:
    mints: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingError(f"CASHU_MINTS: expected mint URLs such as "
                               f"https://mint.example.com, got {item!r}")
        url = f"{parts.scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
        if url not in mints:
            mints.append(url)
    return tuple(mints)


@dataclass(frozen=True, slots=True)
class Nostr:
    """Nostr discovery: who this provider is, where it announces and looks, how it is reached."""

    secret_key: str = field(default="", repr=False)  # hex; "": no announcement
    pubkey: str = ""  # hex, from the secret key
    npub: str = ""  # the same, bech32
    relays: tuple[str, ...] = ()
    http_url: str = ""
    onion_url: str = ""
    onion_hostname_file: Path | None = None  # read when onion_url is empty
    tor_proxy_url: str = "socks5h://127.0.0.1:9050"
    providers_refresh_interval: int = 300  # 0: no /v1/providers
    # The onion URL once read from the hostname file (tor writes it once).
    _onion: list[str] = field(default_factory=list, compare=False, repr=False)

    def onion(self) -> str:
        """``ONION_URL``, else the host tor wrote to ``ONION_HOSTNAME_FILE`` (once it has)."""
        path = self.onion_hostname_file
        if self.onion_url or path is None:
            return self.onion_url
        if not self._onion:
            try:
                host = path.read_text().strip().lower()
            except OSError:
                return ""  # tor has not written it yet
            if not host.endswith(".onion") or " " in host:
                return ""
            self._onion.append(f"http://{host}")
        return self._onion[0]


def _public_url(name: str, raw: str) -> str:
    url = raw.strip().rstrip("/")
    if url and "://" not in url and url.endswith(".onion"):
        url = f"http://{url}"  # a bare onion host, as tor writes it
    if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
        raise SettingError(f"{name}: expected an http(s) URL, got {raw!r}")
    return url


@dataclass(frozen=True, slots=True)
class NodeDiscovery:
    """Which nodes announced on Nostr may join as providers (AUTO_DISCOVER_NODES…)."""

    enabled: bool = False
    max_markup: Decimal = Decimal("1.5")
    allowed: frozenset[str] = frozenset()  # hex pubkeys; empty: any
    blocked: frozenset[str] = frozenset()


def _pubkeys(name: str, raw: str) -> frozenset[str]:
    found: set[str] = set()
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            import nostr_sdk

            found.add(nostr_sdk.PublicKey.parse(item).to_hex())
        except Exception:
            raise SettingError(f"{name}: expected Nostr public keys (npub1… or 64 hex "
                               f"digits), got {item!r}") from None
    return frozenset(found)


def parse_node_discovery(options: Any) -> NodeDiscovery:
    return NodeDiscovery(
        options.auto_discover_nodes,
        _decimal("NODE_MAX_PRICE_MARKUP", options.node_max_price_markup, minimum=Decimal(1)),
        _pubkeys("NODE_ALLOWED_PUBKEYS", options.node_allowed_pubkeys),
        _pubkeys("NODE_BLOCKED_PUBKEYS", options.node_blocked_pubkeys))


def parse_nostr(options: Any) -> Nostr:
    secret = pubkey = npub = ""
    if options.nsec.strip():
        from nostr_sdk import Keys  # a native library: loaded only when there is a key

        try:
            keys = Keys.parse(options.nsec.strip())
        except Exception:
            raise SettingError("NSEC: expected a Nostr secret key, nsec1… or 64 hex "
                               "digits") from None
        secret, pubkey = keys.secret_key().to_hex(), keys.public_key().to_hex()
        npub = keys.public_key().to_bech32()
    relays: list[str] = []
    for item in (part.strip() for part in options.relays.split(",")):
        parts = urlsplit(item)
        if item and (parts.scheme not in ("ws", "wss") or not parts.hostname):
            raise SettingError(f"RELAYS: expected relay URLs such as wss://relay.damus.io, "
                               f"got {item!r}")
        if item and item not in relays:
            relays.append(item)
    tor = options.tor_proxy_url.strip()
    parts = urlsplit(tor)
    if tor and (parts.scheme not in ("socks5", "socks5h") or not parts.hostname):
        raise SettingError(f"TOR_PROXY_URL: expected socks5h://host:port, got {tor!r}")
    interval = options.providers_refresh_interval
    if interval != 0:
        _at_least("PROVIDERS_REFRESH_INTERVAL", interval, 10)
    hostname_file = options.onion_hostname_file.strip()
    return Nostr(secret, pubkey, npub, tuple(relays), _public_url("HTTP_URL", options.http_url),
                 _public_url("ONION_URL", options.onion_url),
                 Path(hostname_file).expanduser() if hostname_file else None, tor, interval)


def parse_networks(name: str, raw: str) -> tuple[str, ...]:
    """IP addresses or networks (``10.0.0.0/8``), comma-separated, or ``*`` for any."""
    import ipaddress

    found: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if item == "*":
            return ("*",)
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SettingError(f"{name}: expected IP addresses or networks such as 127.0.0.1 "
                               f"or 10.0.0.0/8 (or *), got {item!r}") from None
    return tuple(found)


def parse_origins(raw: str) -> tuple[str, ...]:
    """``*``, or origins such as ``https://app.example.com`` (no path)."""
    origins: list[str] = []
    for item in (part.strip().rstrip("/") for part in raw.split(",")):
        if not item:
            continue
        if item == "*":
            return ("*",)
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise SettingError(f"CORS_ORIGINS: expected origins such as "
                               f"https://app.example.com (or *), got {item!r}")
        origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
    return tuple(origins)


def core_database_url(url: str) -> str:
    """routstr-core's SQLAlchemy URLs as ours: ``sqlite+aiosqlite:///…`` and
    ``postgresql+asyncpg://…`` (any ``+driver``) name the same databases."""
    scheme, sep, rest = url.partition("://")
    if sep and "+" in scheme:
        base = scheme.split("+", 1)[0]
        if base in ("sqlite", "postgresql", "postgres"):
            return f"{base}://{rest}"
    return url


@dataclass(frozen=True, slots=True)
class Config:
    """The validated settings the proxy runs with."""

    upstream: Upstream | None
    upstream_api_key: str
    upstream_timeout: int
    data_dir: Path
    database_url: str
    model_based_pricing: bool
    cost_per_request_msat: int
    models_path: Path
    btc_usd_price: Decimal | None
    btc_usd_sources: tuple[tuple[str, str], ...]
    price_refresh_interval: int
    exchange_fee: Decimal
    upstream_provider_fee: Decimal
    max_request_size: int
    listen_backlog: int
    fixed_price_endpoints: Mapping[str, int]  # endpoint name below /v1 → msat per request
    receive_ln_address: str
    minimum_payout_sats: int
    payout_interval: int
    refund_processing_interval: int
    reservation_timeout: int
    cashu_mints: tuple[str, ...]
    swap_untrusted_mints: bool
    mint_timeout: int
    name: str
    description: str
    wallet_mnemonic: str = field(default="", repr=False)  # "": the data folder's file
    locked_payments: bool = True
    change_pool_per_amount: int = 8
    locked_redeem_interval: int = 300
    nostr: Nostr = field(default_factory=Nostr)  # discovery (NSEC, RELAYS…)
    admin_password: str = field(default="", repr=False)  # "": no /admin dashboard
    # -- what users may make the proxy do, and who is believed --
    allow_private_ln_addresses: bool = False
    invoices_per_minute: int = 10
    forwarded_allow_ips: tuple[str, ...] = ()  # networks, or ("*",)
    cors_origins: tuple[str, ...] = ("*",)
    # Upstream providers (the shorthand UPSTREAM_BASE_URL alone: one, named "upstream").
    providers: tuple[ProviderSpec, ...] = ()
    upstream_connect_timeout: int = 10
    upstream_cooldown: int = 30
    models_refresh_interval: int = 360
    openrouter_models_url: str = "https://openrouter.ai/api/v1/models"
    nodes: NodeDiscovery = field(default_factory=lambda: NodeDiscovery())
    ready_max_age: int = 30
    log_format: str = "text"  # text | json | off
    metrics_token: str = field(default="", repr=False)  # "": /metrics not on the proxy port
    metrics_port: int = 0  # 0: no loopback metrics listener
    admin_token: str = field(default="", repr=False)  # "": no /admin/api/

    @classmethod
    def from_options(cls, options: Any) -> Config:
        data_dir = Path(options.data_dir).expanduser()
        database_url = core_database_url(options.database_url.strip()) \
            or f"sqlite:///{data_dir / 'routstr.sqlite'}"
        if not database_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise SettingError("DATABASE_URL: expected sqlite:///path or postgresql://…, "
                               f"got {database_url.split('://')[0]!r}://…")
        if options.cost_per_request < 0:
            raise SettingError("COST_PER_REQUEST: must not be negative, "
                               f"got {options.cost_per_request}")
        if options.price_refresh_interval < 5:
            raise SettingError("PRICE_REFRESH_INTERVAL: must be at least 5 seconds, "
                               f"got {options.price_refresh_interval}")
        from routstr_addon.upstreams.providers import read_providers

        upstream = parse_upstream(options.upstream_base_url.strip())
        models_path = Path(options.models_path).expanduser()
        providers = read_providers(
            options.providers_path.strip(),
            {s.env: getattr(options, s.option) for s in _PROVIDER_SETTINGS},
            upstream=upstream, upstream_api_key=options.upstream_api_key.strip(),
            models_path=models_path)
        openrouter = options.openrouter_models_url.strip()
        if urlsplit(openrouter).scheme not in ("http", "https"):
            raise SettingError(f"OPENROUTER_MODELS_URL: expected an http(s) URL, "
                               f"got {openrouter!r}")
        rate = None
        if options.btc_usd_price.strip():
            rate = _decimal("BTC_USD_PRICE", options.btc_usd_price, minimum=Decimal("0.01"))
        return cls(
            upstream=upstream,
            upstream_api_key=options.upstream_api_key.strip(),
            upstream_timeout=_at_least("UPSTREAM_TIMEOUT", options.upstream_timeout, 0),
            data_dir=data_dir,
            database_url=database_url,
            model_based_pricing=options.model_based_pricing,
            cost_per_request_msat=options.cost_per_request * 1000,
            models_path=models_path,
            btc_usd_price=rate,
            btc_usd_sources=parse_sources(options.btc_usd_sources),
            price_refresh_interval=options.price_refresh_interval,
            exchange_fee=_decimal("EXCHANGE_FEE", options.exchange_fee, minimum=Decimal(1)),
            upstream_provider_fee=_decimal("UPSTREAM_PROVIDER_FEE", options.upstream_provider_fee,
                                           minimum=Decimal(1)),
            max_request_size=parse_size("MAX_REQUEST_SIZE", options.max_request_size),
            fixed_price_endpoints=_fixed_prices(options.fixed_price_endpoints),
            listen_backlog=_at_least("LISTEN_BACKLOG", options.listen_backlog, 1),
            receive_ln_address=parse_ln_address(options.receive_ln_address),
            minimum_payout_sats=_at_least("MINIMUM_PAYOUT", options.minimum_payout, 1),
            payout_interval=_at_least("PAYOUT_INTERVAL", options.payout_interval, 1),
            refund_processing_interval=_at_least("REFUND_PROCESSING_INTERVAL",
                                                 options.refund_processing_interval, 1),
            reservation_timeout=_at_least("RESERVATION_TIMEOUT", options.reservation_timeout, 1),
            cashu_mints=parse_mints(options.cashu_mints),
            swap_untrusted_mints=options.swap_untrusted_mints,
            mint_timeout=_at_least("MINT_TIMEOUT", options.mint_timeout, 1),
            name=options.name,
            description=options.description,
            wallet_mnemonic=_mnemonic(options.wallet_mnemonic),
            locked_payments=options.locked_payments,
            change_pool_per_amount=_at_least("CHANGE_POOL_PER_AMOUNT",
                                             options.change_pool_per_amount, 0),
            locked_redeem_interval=_at_least("LOCKED_REDEEM_INTERVAL",
                                             options.locked_redeem_interval, 1),
            nostr=parse_nostr(options),
            admin_password=_admin_password(options.admin_password),
            allow_private_ln_addresses=options.allow_private_ln_addresses,
            invoices_per_minute=_at_least("INVOICES_PER_MINUTE", options.invoices_per_minute, 1),
            forwarded_allow_ips=parse_networks("FORWARDED_ALLOW_IPS",
                                               options.forwarded_allow_ips),
            cors_origins=parse_origins(options.cors_origins),
            providers=providers,
            upstream_connect_timeout=_at_least("UPSTREAM_CONNECT_TIMEOUT",
                                               options.upstream_connect_timeout, 1),
            upstream_cooldown=_at_least("UPSTREAM_COOLDOWN", options.upstream_cooldown, 1),
            models_refresh_interval=_at_least("MODELS_REFRESH_INTERVAL",
                                              options.models_refresh_interval, 10),
            openrouter_models_url=openrouter,
            nodes=parse_node_discovery(options),
            ready_max_age=_at_least("READY_MAX_AGE", options.ready_max_age, 1),
            log_format=_choice("LOG_FORMAT", options.log_format, ("text", "json", "off")),
            metrics_token=_token("METRICS_TOKEN", options.metrics_token),
            metrics_port=_port("METRICS_PORT", options.metrics_port),
            admin_token=_token("ADMIN_TOKEN", options.admin_token),
        )


def option_values(env: Mapping[str, str] | None = None, **overrides: Any) -> SimpleNamespace:
    """The options as the addon would see them, without mitmproxy: for the CLI and tests."""
    env = environment() if env is None else env
    values = {s.option: parse_value(s, env[s.env]) if s.env in env else s.default
              for s in SETTINGS}
    values.update(overrides)
    return SimpleNamespace(**values)


def load_config(env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """The validated settings from the environment and ``.env``; raises SettingError."""
    return Config.from_options(option_values(env, **overrides))
