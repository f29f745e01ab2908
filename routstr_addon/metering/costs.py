"""A request's cost where Routstr clients read it: headers, ``usage.cost`` and ``cost_sats``.

routstr-core's clients (its Python SDK, web clients) read the cost from the
``X-Routstr-Cost-Msats`` / ``-Input-`` / ``-Output-`` / ``X-Routstr-Cost-Usd`` response headers,
or from a ``usage.cost`` object in the answer (and in a stream's final usage chunk). The figures
come from one place, ``CostReport.of``: the cost rule of the meter applied to the usage, capped
at the reservation exactly as the ledger caps the charge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from routstr_addon.metering.pricing import ModelPrice, Pricing
from routstr_addon.metering.usage import Usage

__all__ = ["CostReport", "add_cost_to_answer", "add_cost_to_usage"]


@dataclass(slots=True)
class CostReport:
    """What one request cost, in msat: ``charged`` is what the key paid (the computed cost,
    at most the reservation); the parts split the computed cost."""

    computed_msats: int
    charged_msats: int
    input_msats: int
    output_msats: int
    base_msats: int
    cache_read_msats: int
    cache_read_input_tokens: int
    total_usd: float | None

    @classmethod
    def of(cls, pricing: Pricing | None, model: ModelPrice | None, usage: Usage,
           computed_msat: int, charged_at_most: int) -> CostReport:
        charged = min(computed_msat, charged_at_most)
        parts = (0, 0, computed_msat, 0)
        if pricing is not None and model is not None:
            try:  # (no contextlib.suppress: this runs on every request)  # noqa: SIM105
                parts = pricing.parts(model, usage.prompt_tokens, usage.completion_tokens,
                                      usage.cached_tokens)
            except LookupError:  # no rate: the whole cost as the base
                pass
        input_, output, base, cache_read = parts
        usd = pricing.usd(charged) if pricing is not None else None
        return cls(computed_msat, charged, input_, output, base, cache_read,
                   min(usage.cached_tokens, usage.prompt_tokens), usd)

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        fields = [(b"x-routstr-cost-msats", b"%d" % self.charged_msats),
                  (b"x-routstr-input-cost-msats", b"%d" % self.input_msats),
                  (b"x-routstr-output-cost-msats", b"%d" % self.output_msats)]
        if self.computed_msats != self.charged_msats:
            fields.append((b"x-routstr-computed-cost-msats", b"%d" % self.computed_msats))
        if self.total_usd is not None:
            fields.append((b"x-routstr-cost-usd", _usd_text(self.total_usd).encode()))
        return tuple(fields)

    def as_json(self) -> dict[str, Any]:
        """``usage.cost``, as routstr-core writes it."""
        return {
            "total_msats": self.charged_msats,
            "charged_msats": self.charged_msats,
            "computed_msats": self.computed_msats,
            "input_msats": self.input_msats,
            "output_msats": self.output_msats,
            "base_msats": self.base_msats,
            "total_usd": self.total_usd,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_read_msats": self.cache_read_msats,
            "cache_creation_input_tokens": 0,
            "cache_creation_msats": 0,
        }

    @property
    def cost_sats(self) -> float:
        return self.charged_msats / 1000


def _usd_text(usd: float) -> str:
    return f"{usd:.10f}".rstrip("0").rstrip(".") or "0"


def add_cost_to_usage(usage: dict[str, Any], report: CostReport) -> None:
    """Put the cost into an answer's ``usage`` object (in place)."""
    usage["cost"] = report.as_json()
    usage["cost_sats"] = report.cost_sats


def add_cost_to_answer(parsed: Any, report: CostReport) -> bytes | None:
    """A parsed JSON answer with ``usage.cost`` and ``cost_sats`` added (the Responses API's
    usage too), serialised; None when it is not an object with a usage to add them to."""
    if not isinstance(parsed, dict):
        return None
    usage = parsed.get("usage")
    if not isinstance(usage, dict) and isinstance(parsed.get("response"), dict):
        usage = parsed["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    add_cost_to_usage(usage, report)
    parsed["cost_sats"] = report.cost_sats
    return json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
