"""A per-station score histogram as inline SVG, drawn server-side against the station's threshold.

Each bin is a stacked bar, OK scores below NOK scores; the threshold is a dashed line with its value, so a
reader sees at a glance how close the normal parts run to it. Only numbers and escaped text reach the
markup, so station names cannot inject anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

__all__ = ["render_histogram_svg"]

_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 34, 10, 18, 22


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _bars(edges: Sequence[float], ok: Sequence[int], nok: Sequence[int], geo: dict) -> list[str]:
    """Stacked bars per bin: OK scores at the bottom, NOK scores on top of them."""
    x_of, y_of, base_y = geo["x_of"], geo["y_of"], geo["base_y"]
    out = []
    for lo, hi, n_ok, n_nok in zip(edges[:-1], edges[1:], ok, nok, strict=True):
        x0, x1 = x_of(lo), x_of(hi)
        width = max(x1 - x0 - 1, 1)
        tip = f"<title>{_fmt(lo)}..{_fmt(hi)}: {n_ok} OK, {n_nok} NOK</title>"
        if n_ok > 0:
            y = y_of(n_ok)
            out.append(
                f'<rect class="bar ok" x="{x0:.1f}" y="{y:.1f}" width="{width:.1f}" '
                f'height="{base_y - y:.1f}">{tip}</rect>'
            )
        if n_nok > 0:
            y_top, y_bottom = y_of(n_ok + n_nok), y_of(n_ok)
            out.append(
                f'<rect class="bar nok" x="{x0:.1f}" y="{y_top:.1f}" width="{width:.1f}" '
                f'height="{y_bottom - y_top:.1f}">{tip}</rect>'
            )
    return out


def render_histogram_svg(
    edges: Sequence[float],
    ok_counts: Sequence[int],
    nok_counts: Sequence[int],
    threshold: float | None,
    title: str = "",
    width_px: int = 240,
    height_px: int = 150,
) -> str:
    """SVG markup for OK/NOK counts over bin `edges` (one more than bins), `threshold` as a vertical line."""
    if not len(edges) == len(ok_counts) + 1 == len(nok_counts) + 1:
        raise ValueError(f"{len(edges)} edges for {len(ok_counts)} OK and {len(nok_counts)} NOK bins")
    counts = [a + b for a, b in zip(ok_counts, nok_counts, strict=True)]
    label = escape(title)
    head = (
        f'<svg class="hist" viewBox="0 0 {width_px} {height_px}" width="{width_px}" height="{height_px}" '
        f'role="img" aria-label="score histogram {label}">'
    )
    if not counts or sum(counts) == 0:
        return head + f'<text class="empty" x="{width_px / 2}" y="{height_px / 2}">no scores yet</text></svg>'
    lo = float(edges[0]) if threshold is None else min(float(edges[0]), threshold)
    hi = float(edges[-1]) if threshold is None else max(float(edges[-1]), threshold)
    span = hi - lo if hi > lo else 1.0
    plot_w = width_px - _PAD_LEFT - _PAD_RIGHT
    base_y = height_px - _PAD_BOTTOM
    peak = max(counts)

    def x_of(v: float) -> float:
        return _PAD_LEFT + (v - lo) / span * plot_w

    def y_of(n: int) -> float:
        return base_y - n / peak * (base_y - _PAD_TOP)

    geo = {"x_of": x_of, "y_of": y_of, "base_y": base_y}
    parts = [
        head,
        f'<text class="axis" x="{_PAD_LEFT - 4}" y="{_PAD_TOP + 4}" text-anchor="end">{peak}</text>',
    ]
    parts += _bars(edges, ok_counts, nok_counts, geo)
    parts.append(
        f'<line class="base" x1="{_PAD_LEFT}" y1="{base_y}" x2="{width_px - _PAD_RIGHT}" y2="{base_y}"/>'
    )
    parts.append(f'<text class="axis" x="{_PAD_LEFT}" y="{height_px - 6}">{_fmt(lo)}</text>')
    parts.append(
        f'<text class="axis" x="{width_px - _PAD_RIGHT}" y="{height_px - 6}" text-anchor="end">'
        f"{_fmt(hi)}</text>"
    )
    if threshold is not None:
        tx = x_of(threshold)
        parts.append(f'<line class="thr" x1="{tx:.1f}" y1="{_PAD_TOP - 6}" x2="{tx:.1f}" y2="{base_y}"/>')
        parts.append(
            f'<text class="thr-label" x="{tx:.1f}" y="{_PAD_TOP - 8}" text-anchor="middle">'
            f"threshold {_fmt(threshold)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
