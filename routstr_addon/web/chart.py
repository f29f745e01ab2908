"""A bar chart as inline SVG markup, for pages that load nothing from anywhere else.

Colours come from the page's stylesheet (classes ``chart-bar``, ``chart-grid``…), falling back
to ``currentColor``; each bar has a ``<title>``, which browsers show on hover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["Bar", "bar_chart", "compact", "nice_step"]


@dataclass(frozen=True, slots=True)
class Bar:
    label: str  # under the axis (shown for some bars only)
    value: float
    tip: str  # the bar's title, shown on hover
    current: bool = False  # drawn apart (e.g. today, still counting)


def nice_step(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is at least ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= m * base * (1 + 1e-9):
            return m * base
    return 10 * base  # pragma: no cover - the loop always returns


def compact(value: float) -> str:
    """A short axis label: 950, 1.5k, 12k, 3.2M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            text = f"{value / limit:.1f}".removesuffix(".0")
            return text + suffix
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.3f}".rstrip("0").rstrip(".")


def bar_chart(bars: Sequence[Bar], *, title: str, width: int = 720, height: int = 240,
              label_every: int = 5, ticks: int = 4) -> str:
    """SVG markup (safe to embed as is: every text is escaped)."""
    left, right, top, bottom = 48, 8, 12, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((b.value for b in bars), default=0.0)
    step = nice_step(peak / ticks) if peak > 0 else 1.0
    ticks = max(1, math.ceil(peak / step - 1e-9)) if peak > 0 else ticks  # no empty band on top
    ceiling = step * ticks
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
           f'{height}" role="img" aria-label="{escape(title)}">', f"<title>{escape(title)}</title>"]
    for i in range(ticks + 1):
        y = top + plot_h - plot_h * i / ticks
        out.append(f'<line class="chart-grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                   f'y2="{y:.1f}" stroke="currentColor" stroke-opacity="0.15"/>')
        out.append(f'<text class="chart-label" x="{left - 6}" y="{y + 4:.1f}" '
                   f'text-anchor="end" font-size="11" fill="currentColor">'
                   f"{escape(compact(step * i))}</text>")
    slot = plot_w / max(1, len(bars))
    bar_w = max(1.0, slot * 0.72)
    for i, bar in enumerate(bars):
        x = left + slot * i
        h = 0.0 if bar.value <= 0 else max(1.0, plot_h * bar.value / ceiling)
        css = "chart-bar chart-current" if bar.current else "chart-bar"
        out.append("<g>")
        out.append(f"<title>{escape(bar.tip)}</title>")
        out.append(f'<rect class="chart-hit" x="{x:.1f}" y="{top}" width="{slot:.1f}" '
                   f'height="{plot_h}" fill="transparent"/>')
        if h:
            out.append(f'<rect class="{css}" x="{x + (slot - bar_w) / 2:.1f}" '
                       f'y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                       f'rx="1.5" fill="currentColor"/>')
        out.append("</g>")
        if i % label_every == 0 or i == len(bars) - 1:
            out.append(f'<text class="chart-label" x="{x + slot / 2:.1f}" y="{height - 8}" '
                       f'text-anchor="middle" font-size="11" fill="currentColor">'
                       f"{escape(bar.label)}</text>")
    out.append(f'<line class="chart-axis" x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
               f'y2="{top + plot_h}" stroke="currentColor" stroke-opacity="0.5"/>')
    out.append("</svg>")
    return "".join(out)
