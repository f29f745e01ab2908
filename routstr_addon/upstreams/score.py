"""Choosing among the providers of a model by a score, so load spreads (RIP-06 §3.3).

A provider's score is what the user would be charged there (its price after this proxy's
fee), made dearer by its measured time to the first byte and by its failures:

    score = price × (1 + latency / LATENCY_SCALE) / max(success rate, MIN_SUCCESS)

Lower is better. Among the first ``TOP`` usable offers, those within ``WITHIN`` of the best
score are chosen at random, weighted by 1/score; the chosen one goes first and the others keep
their order for failover. Money is unaffected: the reservation covers the dearest offer and
the charge is the price of the provider that answered.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

from routstr_addon.upstreams.health import Breaker

__all__ = ["LATENCY_SCALE", "TOP", "WITHIN", "score", "spread"]

LATENCY_SCALE = 2.0  # seconds to the first byte that count as much as doubling the price
MIN_SUCCESS = 0.05
TOP = 3  # offers considered for the random choice
WITHIN = 1.15  # how far above the best score an offer may be and still be chosen

def score(price: Fraction | float, breaker: Breaker | None) -> float:
    """An offer's score (lower is better) from its price and its provider's record."""
    value = float(price)
    if breaker is None:
        return value
    latency_s = (breaker.latency_ms or 0.0) / 1000
    success = 1.0 - breaker.error_rate()
    return value * (1 + latency_s / LATENCY_SCALE) / max(success, MIN_SUCCESS)


def spread[T](offers: Sequence[T], provider: Callable[[T], str],
              price: Callable[[T], Fraction], breakers: Mapping[str, Breaker],
              rng: random.Random | None = None) -> Sequence[T]:
    """The offers with the one to try first chosen by score among the best few (the rest in
    their order). Unusable providers (open breakers) are never moved forward."""
    if len(offers) < 2:
        return offers
    candidates: list[tuple[int, float]] = []
    for i, offer in enumerate(offers[:TOP]):
        b = breakers.get(provider(offer))
        if b is not None and not b.usable:
            continue
        candidates.append((i, score(price(offer), b)))
    if len(candidates) < 2:
        return offers
    best = min(s for _, s in candidates)
    eligible = [(i, s) for i, s in candidates if s <= best * WITHIN]
    if len(eligible) < 2:
        chosen = min(candidates, key=lambda c: c[1])[0]
    else:
        weights = [1 / s if s > 0 else 1e9 for _, s in eligible]
        chosen = (rng or random).choices([i for i, _ in eligible], weights)[0]
    if chosen == 0:
        return offers
    return (offers[chosen], *offers[:chosen], *offers[chosen + 1:])
