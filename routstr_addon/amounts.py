"""Amounts as people read them: msat inside, sats on every page, table and error message."""

from __future__ import annotations

__all__ = ["sats"]


def sats(msat: int | None) -> str:
    """msat as sats, always to the msat: ``1,234.500`` (columns of them line up); ``-`` for
    None. Integer arithmetic, so no amount is ever rounded on its way to a person."""
    if msat is None:
        return "-"
    sign = "-" if msat < 0 else ""
    whole, rest = divmod(abs(int(msat)), 1000)
    return f"{sign}{whole:,}.{rest:03d}"
