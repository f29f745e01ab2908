"""routstr-core's setting names, read as ours, so an operator's ``.env`` works unchanged.

Both generations are known: the original README's (``MODEL_BASED_PRICING``,
``COST_PER_REQUEST``, ``MINIMUM_PAYOUT``… are ours too) and v0.4's (``FIXED_PRICING``,
``MIN_PAYOUT_SAT``, ``PAYOUT_INTERVAL_SECONDS``…). Each one found is mapped to our setting
with one start-up line saying so; ours wins when both are set. A name that looks like one of
ours but is not gets a warning naming the closest known one. Pure functions: the addon logs
what they return.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["IGNORED", "PER_TOKEN", "RENAMED", "Translation", "recognised", "translate",
           "unknown_settings"]


def _same(value: str) -> str:
    return value


def _inverted(value: str) -> str:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return "false"
    if low in ("0", "false", "no", "off", ""):
        return "true"
    return value  # left for our parser to refuse, naming the setting


# routstr-core name → (our name, conversion, what it means here)
RENAMED: Mapping[str, tuple[str, Callable[[str], str], str]] = {
    "FIXED_PRICING": ("MODEL_BASED_PRICING", _inverted, "inverted"),
    "FIXED_COST_PER_REQUEST": ("COST_PER_REQUEST", _same, "sats per request"),
    "MIN_PAYOUT_SAT": ("MINIMUM_PAYOUT", _same, "sats"),
    "PAYOUT_INTERVAL_SECONDS": ("PAYOUT_INTERVAL", _same, "seconds"),
    "STALE_RESERVATION_TIMEOUT_SECONDS": ("RESERVATION_TIMEOUT", _same, "seconds"),
    "PRICING_REFRESH_INTERVAL_SECONDS": ("PRICE_REFRESH_INTERVAL", _same, "seconds"),
    "PROVIDERS_REFRESH_INTERVAL_SECONDS": ("PROVIDERS_REFRESH_INTERVAL", _same,
                                           "seconds; 0 turns it off"),
    "MINT_OPERATION_TIMEOUT_SECONDS": ("MINT_TIMEOUT", _same, "seconds"),
    "MODELS_REFRESH_INTERVAL_SECONDS": ("MODELS_REFRESH_INTERVAL", _same, "seconds"),
}

# routstr-core names with nothing to set here: why, once at start-up.
IGNORED: Mapping[str, str] = {
    "NPUB": "the public key is derived from NSEC here",
    "PRIMARY_MINT_UNIT": "the unit is the primary mint's (sat where it has it)",
    "RESET_RESERVED_BALANCE_ON_STARTUP": "reservations of a dead process are swept "
                                         "(RESERVATION_TIMEOUT), safe with several processes",
    "TOLERANCE_PERCENTAGE": "charges are exact, from the usage reported",
    "MIN_REQUEST_MSAT": "a request is charged from its usage, never zero",
    "ENABLE_CONSOLE_LOGGING": "logs go to mitmproxy's terminal log",
    "ENABLE_PRICING_REFRESH": "rates refresh every PRICE_REFRESH_INTERVAL",
    "ENABLE_MODELS_REFRESH": "OpenRouter's list refreshes every MODELS_REFRESH_INTERVAL when a "
                             "provider takes its prices from it; models.json is read at "
                             "start-up",
    "MINT_OPERATION_CONCURRENCY": "each mint has one kept-alive connection pool",
    "MINT_MAX_CONCURRENCY": "each mint has one kept-alive connection pool",
    "MINT_RETRY_MAX_ATTEMPTS": "a busy mint is answered 503 with Retry-After",
    "ENABLE_ANALYTICS_SHARING": "nothing is shared",
}

# Per-token fixed prices: refused while non-zero (charging 1 sat a request instead would
# lose the operator money), ignored when zero.
PER_TOKEN = ("COST_PER_1K_INPUT_TOKENS", "COST_PER_1K_OUTPUT_TOKENS",
             "FIXED_PER_1K_INPUT_TOKENS", "FIXED_PER_1K_OUTPUT_TOKENS")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(slots=True)
class Translation:
    """What routstr-core's names add to our settings, and what to say about them."""

    values: dict[str, str] = field(default_factory=dict)  # our names → raw values
    notes: list[str] = field(default_factory=list)  # one line each, for the start-up log
    errors: list[str] = field(default_factory=list)  # settings the proxy cannot run with
    log_level: str | None = None  # LOG_LEVEL, for the proxy's own loggers


def translate(raw: Mapping[str, str], ours: Iterable[str]) -> Translation:
    """routstr-core's settings in ``raw`` (environment and .env) as ours. ``ours``: the names
    we know, whose values (when set in ``raw``) win over a routstr-core name."""
    known = set(ours)
    out = Translation()
    for core, (name, convert, meaning) in RENAMED.items():
        if core not in raw:
            continue
        if name in raw:
            out.notes.append(f"{core} (routstr-core) is ignored: {name} is set")
            continue
        out.values[name] = convert(raw[core])
        out.notes.append(f"{core}={raw[core]} (routstr-core) read as {name}="
                         f"{out.values[name]} ({meaning})")
    primary = raw.get("PRIMARY_MINT_URL", "").strip()
    if primary:
        mints = [m.strip() for m in raw.get("CASHU_MINTS", "").split(",") if m.strip()]
        mints = [primary, *(m for m in mints if m.rstrip("/") != primary.rstrip("/"))]
        out.values["CASHU_MINTS"] = ",".join(mints)
        out.notes.append(f"PRIMARY_MINT_URL (routstr-core) read as the first of CASHU_MINTS: "
                         f"{primary} is the primary mint")
    for core in PER_TOKEN:
        value = raw.get(core, "").strip()
        if not value:
            continue
        try:
            zero = float(value) == 0
        except ValueError:
            zero = False
        if zero:
            out.notes.append(f"{core} (routstr-core) is ignored: it is 0")
        else:
            out.errors.append(f"{core}: fixed per-token prices are not supported here; price "
                              "models in models.json (MODEL_BASED_PRICING=true) and remove it")
    level = raw.get("LOG_LEVEL", "").strip().upper()
    if level:
        if level == "WARN":
            level = "WARNING"
        if level in LOG_LEVELS:
            out.log_level = level
            out.notes.append(f"LOG_LEVEL={level} (routstr-core) sets the proxy's own log level "
                             "(mitmproxy's terminal shows debug lines with "
                             "--set termlog_verbosity=debug)")
        else:
            out.errors.append(f"LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, "
                              f"got {raw['LOG_LEVEL']!r}")
    for core, why in IGNORED.items():
        if core in raw and core not in known:
            out.notes.append(f"{core} (routstr-core) is ignored: {why}")
    return out


def recognised() -> set[str]:
    """Every routstr-core name this module reads."""
    return {*RENAMED, *IGNORED, *PER_TOKEN, "PRIMARY_MINT_URL", "LOG_LEVEL"}


def unknown_settings(names: Iterable[str], ours: Iterable[str],
                     from_file: Iterable[str] = ()) -> list[str]:
    """A warning for each name that looks like one of ours but is not (a typo, a renamed
    setting), naming the closest known one. Names from the process environment count only
    when close to ours (it holds many unrelated variables); names in ``.env`` always do."""
    known = sorted({*ours, *recognised()})
    in_file = set(from_file)
    warnings = []
    for name in sorted(set(names) | in_file):
        if name in known or not name.isupper():
            continue
        close = difflib.get_close_matches(name, known, n=1,
                                          cutoff=0.6 if name in in_file else 0.8)
        if close:
            warnings.append(f"{name} is not a setting of this proxy; did you mean {close[0]}?")
        elif name in in_file:
            warnings.append(f"{name} in .env is not a setting of this proxy (ignored)")
    return warnings
