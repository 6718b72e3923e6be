"""Charts drawn on the server as inline SVG (no JavaScript): throughput bars and objects-per-image dots."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from markupsafe import Markup

WIDTH, HEIGHT = 640, 180
PAD_L, PAD_R, PAD_T, PAD_B = 44, 10, 14, 30


def _nice_max(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    if value <= 0:
        return 1.0
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10_000, 50_000, 100_000):
        if value <= step:
            return float(step)
    return float(value)


def _frame(title: str, width: int, height: int, plot_h: float, top: float) -> list[str]:
    """The opening of a chart's SVG: its title and three horizontal grid lines labelled 0, top/2 and top."""
    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for frac in (0, 0.5, 1):
        y = PAD_T + plot_h * (1 - frac)
        parts.append(f'<line class="grid" x1="{PAD_L}" x2="{width - PAD_R}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="axis" x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{top * frac:g}</text>')
    return parts


def bar_chart(bins: Sequence[dict[str, Any]], title: str, label_format: str = "%H:%M") -> Markup:
    """Bars of ``bins`` (``start``, ``count``), oldest left; each bar has a tooltip with its count."""
    n = max(1, len(bins))
    top = _nice_max(max((b["count"] for b in bins), default=0))
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    bar_w = plot_w / n
    parts = _frame(title, WIDTH, HEIGHT, plot_h, top)
    for i, b in enumerate(bins):
        h = plot_h * b["count"] / top
        x = PAD_L + i * bar_w
        parts.append(f'<rect class="bar" data-count="{b["count"]}" x="{x + 1:.1f}" y="{PAD_T + plot_h - h:.1f}" '
                     f'width="{max(1.0, bar_w - 2):.1f}" height="{h:.1f}"><title>{b["start"]:%Y-%m-%d %H:%M} UTC: '
                     f'{b["count"]} image(s)</title></rect>')
        if i % max(1, n // 6) == 0:
            parts.append(f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">'
                         f'{b["start"].strftime(label_format)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def dot_plot(groups: Sequence[dict[str, Any]], title: str) -> Markup:
    """One column per group (experiment, version): a dot per result's object count, the mean as a bar."""
    n = max(1, len(groups))
    width = max(WIDTH, PAD_L + PAD_R + 90 * n)
    height = HEIGHT + 40
    top = _nice_max(max((max(g["points"], default=0) for g in groups), default=0))
    plot_w, plot_h = width - PAD_L - PAD_R, height - PAD_T - PAD_B - 30
    col = plot_w / n
    parts = _frame(title, width, height, plot_h, top)
    for i, g in enumerate(groups):
        cx = PAD_L + col * (i + 0.5)
        for k, value in enumerate(g["points"]):
            jitter = ((k * 37) % 21 - 10) * min(1.0, col / 60)
            y = PAD_T + plot_h * (1 - value / top)
            parts.append(f'<circle class="dot" cx="{cx + jitter:.1f}" cy="{y:.1f}" r="2.5"/>')
        if g["mean"] is not None:
            y = PAD_T + plot_h * (1 - g["mean"] / top)
            parts.append(f'<line class="mean" data-mean="{g["mean"]}" x1="{cx - col * 0.35:.1f}" '
                         f'x2="{cx + col * 0.35:.1f}" y1="{y:.1f}" y2="{y:.1f}"><title>mean {g["mean"]}</title></line>')
        parts.append(f'<text class="axis" x="{cx:.1f}" y="{PAD_T + plot_h + 16:.1f}" text-anchor="middle">'
                     f'{escape(str(g["version"]))[:18]}</text>'
                     f'<text class="axis dim" x="{cx:.1f}" y="{PAD_T + plot_h + 30:.1f}" text-anchor="middle">'
                     f'{escape(str(g["experiment"]))[:18]}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
