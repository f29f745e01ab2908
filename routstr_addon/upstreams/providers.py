"""Who the proxy forwards to: providers from ``PROVIDERS_PATH``, from the original Routstr's
environment variables (``OPENAI_API_KEY``…), or the one-provider shorthand
(``UPSTREAM_BASE_URL``/``UPSTREAM_API_KEY``).

Reading is strict: anything wrong raises ``ProviderError`` (a ``SettingError``) whose one line
names the provider and the field, so a bad file stops start-up instead of routing money to the
wrong place. Plain data only; no network here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from routstr_addon.settings import ENV_PROVIDERS, SettingError, Upstream

__all__ = [
    "ModelSpec",
    "ProviderError",
    "ProviderSpec",
    "live_provider",
    "model_entries",
    "read_providers",
]

# Ollama has no key: its variable is its base URL (its OpenAI-compatible API is under /v1).
OLLAMA_VARIABLE = "OLLAMA_BASE_URL"

# "routstr": another Routstr node, its models and sats prices read from its /v1/models, each
# request paid with an X-Cashu token from this proxy's wallet (``upstreams.nodes``).
_TYPES = ("openai", "routstr")
_PROVIDER_FIELDS = frozenset((
    "name", "type", "base_url", "api_key", "api_key_env", "fee", "priority", "headers",
    "models", "models_path", "openrouter_prefix", "enabled"))
_MODEL_FIELDS = frozenset(("id", "upstream_id", "aliases", "pricing", "enabled"))
# Headers the proxy owns on the way upstream: a provider's extra headers may not set them.
_RESERVED_HEADERS = frozenset(("authorization", "host", "content-length", "transfer-encoding",
                               "connection", "x-cashu", "content-encoding"))


class ProviderError(SettingError):
    """A provider's configuration the proxy cannot run with."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model a provider offers: the public id clients send, the id the provider wants,
    other names clients may use, and its own prices (``entry``: OpenRouter's shape) or none
    (priced from OpenRouter's list)."""

    id: str
    upstream_id: str
    aliases: tuple[str, ...] = ()
    entry: Mapping[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """A provider as configured. ``upstream`` None: the reverse mode's own target (the
    shorthand with no UPSTREAM_BASE_URL). ``fetch``: its models come from its GET /models."""

    name: str
    upstream: Upstream | None
    api_key: str = field(default="", repr=False)
    fee: Decimal | None = None  # None: UPSTREAM_PROVIDER_FEE
    priority: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    models: tuple[ModelSpec, ...] = ()
    models_path: Path | None = None  # None: use `models` (or fetch)
    fetch: bool = False
    openrouter_prefix: str = ""
    type: str = "openai"
    shorthand: bool = False  # UPSTREAM_BASE_URL: priced by MODELS_PATH, as before providers
    discovered: bool = False  # a node found on Nostr (AUTO_DISCOVER_NODES)

    @property
    def is_node(self) -> bool:
        """Another Routstr node: priced in sats by its /v1/models, paid per request."""
        return self.type == "routstr"

    @property
    def base_url(self) -> str:
        up = self.upstream
        return f"{up.origin}{up.base_path}" if up is not None else ""


def read_providers(path: str, env: Mapping[str, str], *, upstream: Upstream | None,
                   upstream_api_key: str, models_path: Path) -> tuple[ProviderSpec, ...]:
    """Every provider the settings name, in order: the file's, then the environment's, then
    the shorthand (alone, it is what existing set-ups run with)."""
    providers: list[ProviderSpec] = []
    if path:
        providers += _read_file(Path(path).expanduser(), env)
    for variable, name, base_url, prefix in ENV_PROVIDERS:
        key = env.get(variable, "").strip()
        if key and not any(p.name == name for p in providers):
            providers.append(ProviderSpec(name, _url(name, "base_url", base_url), key,
                                          fetch=True, openrouter_prefix=prefix))
    ollama = env.get(OLLAMA_VARIABLE, "").strip().rstrip("/")
    if ollama and not any(p.name == "ollama" for p in providers):
        base = ollama if ollama.endswith("/v1") else f"{ollama}/v1"
        providers.append(ProviderSpec("ollama", _url("ollama", OLLAMA_VARIABLE, base),
                                      fetch=True))
    if upstream is not None and any(p.name == "upstream" for p in providers):
        raise ProviderError("provider 'upstream': name: taken by UPSTREAM_BASE_URL (the "
                            "one-provider shorthand); rename it or unset UPSTREAM_BASE_URL")
    if upstream is not None or not providers:
        providers.append(ProviderSpec("upstream", upstream, upstream_api_key,
                                      models_path=models_path, shorthand=True))
    return tuple(providers)


def live_provider(raw: Any, env: Mapping[str, str]) -> ProviderSpec | None:
    """A provider added while running (``routstr upstreams add``, the admin API): read exactly
    as an entry of the providers file (the same one-line errors), None if it says
    ``enabled: false``. Other Routstr nodes are paid through the failover hop set up at start:
    they belong in the file."""
    spec = _provider(raw, 0, Path.cwd(), env)
    if spec is not None and spec.is_node:
        raise ProviderError(f"provider {spec.name!r}: type: a routstr node cannot be added "
                            "while running; list it in PROVIDERS_PATH")
    return spec


def _read_file(path: Path, env: Mapping[str, str]) -> list[ProviderSpec]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ProviderError(f"PROVIDERS_PATH: cannot read {path}: {e.strerror}") from None
    from ruamel.yaml import YAML  # already loaded by mitmproxy itself: no import cost here
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        first = str(e).strip().splitlines()
        raise ProviderError(f"PROVIDERS_PATH: {path} is not valid YAML or JSON: "
                            f"{' '.join(first[:2])}") from None
    if isinstance(data, dict):
        data = data.get("providers")
    if not isinstance(data, list) or not data:
        raise ProviderError(f"PROVIDERS_PATH: {path} must hold a list of providers "
                            "(or {providers: [...]})")
    providers: list[ProviderSpec] = []
    for index, raw in enumerate(data):
        provider = _provider(raw, index, path.parent, env)
        if provider is None:
            continue
        if any(p.name == provider.name for p in providers):
            raise ProviderError(f"provider {provider.name!r}: name: used twice")
        providers.append(provider)
    if not providers:
        raise ProviderError(f"PROVIDERS_PATH: {path}: every provider is disabled")
    return providers


def _provider(raw: Any, index: int, folder: Path,
              env: Mapping[str, str]) -> ProviderSpec | None:
    if not isinstance(raw, dict):
        raise ProviderError(f"provider #{index + 1}: expected a mapping with name, base_url…")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 64 or any(
            c.isspace() or not c.isprintable() for c in name):
        raise ProviderError(f"provider #{index + 1}: name: expected a short name without "
                            "spaces")
    label = f"provider {name!r}"
    unknown = sorted(set(raw) - _PROVIDER_FIELDS)
    if unknown:
        raise ProviderError(f"{label}: {unknown[0]}: unknown field (known: "
                            f"{', '.join(sorted(_PROVIDER_FIELDS))})")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ProviderError(f"{label}: enabled: expected true or false")
    if not enabled:
        return None
    kind = raw.get("type", "openai")
    if kind not in _TYPES:
        raise ProviderError(f"{label}: type: expected one of {', '.join(_TYPES)}, got {kind!r}")
    base_url = raw.get("base_url")
    if not isinstance(base_url, str):
        raise ProviderError(f"{label}: base_url: required, e.g. https://api.openai.com/v1")
    base_url = base_url.strip().rstrip("/")
    if kind == "routstr" and not base_url.endswith("/v1"):
        base_url += "/v1"  # a node is named by its URL; its API is under /v1
    upstream = _url(name, "base_url", base_url)
    api_key = _api_key(label, raw, env)
    fee = None
    if raw.get("fee") is not None:
        try:
            fee = Decimal(str(raw["fee"]))
        except InvalidOperation:
            fee = None
        if fee is None or not fee.is_finite() or fee < 1:
            raise ProviderError(f"{label}: fee: expected a multiplier of at least 1 "
                                f"(1.05 = 5 %), got {raw['fee']!r}")
    priority = raw.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ProviderError(f"{label}: priority: expected a whole number, got {priority!r}")
    headers = _headers(label, raw.get("headers"))
    prefix = raw.get("openrouter_prefix", "")
    if not isinstance(prefix, str):
        raise ProviderError(f"{label}: openrouter_prefix: expected text such as 'openai/'")
    models = raw.get("models")
    models_path = raw.get("models_path")
    if kind == "routstr":
        if models_path is not None or models not in (None, "fetch"):
            raise ProviderError(f"{label}: models: a routstr node's models and prices are read "
                                "from its /v1/models (leave models out, or 'fetch')")
        if api_key:
            raise ProviderError(f"{label}: api_key: a routstr node is paid per request with "
                                "ecash from this proxy's wallet, not with a key")
        models = "fetch"
    if models_path is not None and models is not None:
        raise ProviderError(f"{label}: models_path: give models_path or models, not both")
    spec = ProviderSpec(name, upstream, api_key, fee, priority, headers, fetch=False,
                        openrouter_prefix=prefix, type=kind)
    if models_path is not None:
        if not isinstance(models_path, str) or not models_path:
            raise ProviderError(f"{label}: models_path: expected a file name")
        file = Path(models_path).expanduser()
        file = file if file.is_absolute() else folder / file
        return replace(spec, models_path=file, models=_models_file(label, file))
    if models == "fetch":
        return replace(spec, fetch=True)
    if not isinstance(models, list) or not models:
        raise ProviderError(f"{label}: models: expected a list of models, 'fetch', or "
                            "models_path")
    specs = tuple(_model(label, m, i) for i, m in enumerate(models))
    return replace(spec, models=tuple(m for m in specs if m is not None))


def _models_file(label: str, file: Path) -> tuple[ModelSpec, ...]:
    """A provider's models file in any shape models.json takes (routstr-core's
    ``{"models": [...]}``, OpenRouter's ``{"data": [...]}``, a bare list), JSON or YAML;
    entries without prices take OpenRouter's."""
    entries = model_entries(label, file)
    specs = (_model(f"{label}: {file.name}", m, i) for i, m in enumerate(entries))
    return tuple(m for m in specs if m is not None)


def model_entries(label: str, file: Path) -> list[Any]:
    """The list of model entries in a models file, unchecked (``model_spec`` checks each)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe", pure=True).load(file.read_text())
    except OSError as e:
        raise ProviderError(f"{label}: models_path: cannot read {file}: {e.strerror}") from None
    except YAMLError:
        raise ProviderError(f"{label}: models_path: {file} is not valid JSON or YAML") from None
    entries = (data.get("models") if isinstance(data, dict) and "models" in data
               else data.get("data") if isinstance(data, dict) else data)
    if not isinstance(entries, list) or not entries:
        raise ProviderError(f"{label}: models_path: {file} holds no list of models")
    return entries


def _model(label: str, raw: Any, index: int) -> ModelSpec | None:
    if isinstance(raw, str) and raw.strip():
        return ModelSpec(raw.strip(), raw.strip())
    if not isinstance(raw, dict):
        raise ProviderError(f"{label}: models[{index}]: expected a model id or a mapping "
                            "with id")
    return model_spec(raw, f"{label}: models[{index}]")


def model_spec(raw: Mapping[str, Any], where: str) -> ModelSpec | None:
    """One model of a provider's list (inline, or an entry of its models file): None when
    it is disabled."""
    model_id = raw.get("id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise ProviderError(f"{where}: id: required")
    where = f"{where} ({model_id})"
    if raw.get("enabled", True) is False:
        return None
    upstream_id = raw.get("upstream_id", model_id)
    if not isinstance(upstream_id, str) or not upstream_id.strip():
        raise ProviderError(f"{where}: upstream_id: expected the provider's name for it")
    aliases = raw.get("aliases", [])
    if isinstance(aliases, str):
        aliases = [aliases]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ProviderError(f"{where}: aliases: expected a list of names")
    pricing = raw.get("pricing")
    if pricing is not None and not isinstance(pricing, dict):
        raise ProviderError(f"{where}: pricing: expected prompt/completion/request prices")
    entry = dict(raw) if pricing is not None else None
    if entry is not None:
        from routstr_addon.metering.pricing import ModelPrice

        try:
            ModelPrice.from_entry(entry)
        except (ValueError, KeyError, TypeError, ArithmeticError) as e:
            raise ProviderError(f"{where}: pricing: {e}") from None
    return ModelSpec(model_id.strip(), upstream_id.strip(), tuple(aliases), entry)


def _api_key(label: str, raw: Mapping[str, Any], env: Mapping[str, str]) -> str:
    key = raw.get("api_key")
    variable = raw.get("api_key_env")
    if key is not None and variable is not None:
        raise ProviderError(f"{label}: api_key_env: give api_key or api_key_env, not both")
    if variable is not None:
        if not isinstance(variable, str) or not variable:
            raise ProviderError(f"{label}: api_key_env: expected a variable name")
        value = (env.get(variable) or os.environ.get(variable) or _dotenv(variable)).strip()
        if not value:
            raise ProviderError(f"{label}: api_key_env: {variable} is not set")
        return value
    if key is None:
        return ""
    if not isinstance(key, str) or any(c in key for c in "\r\n"):
        raise ProviderError(f"{label}: api_key: expected the key as text")
    return key.strip()


def _dotenv(variable: str) -> str:
    """A variable from ``.env`` in the working folder (where settings are read from too)."""
    from routstr_addon.settings import _dotenv as read

    return read(None).get(variable, "")


def _headers(label: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ProviderError(f"{label}: headers: expected a mapping of header names to values")
    headers: list[tuple[str, str]] = []
    for name, value in raw.items():
        if (not isinstance(name, str) or not name or not isinstance(value, str | int)
                or any(c in f"{name}{value}" for c in "\r\n\0")):
            raise ProviderError(f"{label}: headers: bad header {name!r}")
        if name.lower() in _RESERVED_HEADERS:
            raise ProviderError(f"{label}: headers: {name} is set by the proxy")
        headers.append((name, str(value)))
    return tuple(headers)


def _url(name: str, field_name: str, raw: str) -> Upstream:
    parts = urlsplit(raw)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 \
            or parts.query or parts.fragment:
        raise ProviderError(f"provider {name!r}: {field_name}: expected an http(s) URL such "
                            f"as https://api.openai.com/v1, got {raw!r}")
    return Upstream(parts.scheme, parts.hostname,
                    port or (443 if parts.scheme == "https" else 80), parts.path.rstrip("/"))
