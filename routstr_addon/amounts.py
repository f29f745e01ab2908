"""Amounts as people read them: msat inside, sats on every page, table and error message."""

from __future__ import annotations

__all__ = ["sats"]


def sats(msat: int | None) -> str:
    """msat as sats, exact to the msat and without trailing zeros: ``1,234.5``; ``-`` for None.

    Integer arithmetic, so no amount is ever rounded on its way to a person.
    """
    if msat is None:
        return "-"
    sign = "-" if msat < 0 else ""
    whole, rest = divmod(abs(int(msat)), 1000)
    fraction = f".{rest:03d}".rstrip("0") if rest else ""
    return f"{sign}{whole:,}{fraction}"
