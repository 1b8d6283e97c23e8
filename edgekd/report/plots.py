"""Plots as inline SVG strings, drawn in plain Python so report.html needs no plotting library."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
W, H = 640, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 36, 52


@dataclass(frozen=True)
class Point:
    """A labelled point of a scatter plot; `group` picks its colour and legend entry."""

    x: float
    y: float
    label: str
    group: str


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(v, 10))
    return ticks


def _fmt_tick(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.2g}"


def _open(title: str, height: int = H) -> list[str]:
    return [f'<svg viewBox="0 0 {W} {height}" width="{W}" height="{height}" '
            f'role="img" aria-label="{escape(title)}" class="plot">',
            f'<rect x="0" y="0" width="{W}" height="{height}" fill="#ffffff"/>',
            f'<text x="{W / 2}" y="20" text-anchor="middle" class="t">{escape(title)}</text>']


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values (1, 2, 5 times powers of ten, or only powers past three decades) covering [lo, hi] > 0."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if k1 - k0 <= 3 else (1,)
    values = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in mults]
    below = [v for v in values if v <= lo * (1 + 1e-9)]
    above = [v for v in values if v >= hi * (1 - 1e-9)]
    start, stop = (below[-1] if below else values[0]), (above[0] if above else values[-1])
    return [v for v in values if start <= v <= stop]


class _Axes:
    """Maps from data to pixels (linear or log10), and the grid, ticks and labels that go with them."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], height: int = H, y0: bool = False,
                 pad: float = 0.08, xlog: bool = False, ylog: bool = False) -> None:
        self.h, self.xlog, self.ylog = height, xlog, ylog
        self.xt = self._ticks(xs, False, pad, xlog)
        self.yt = self._ticks(ys, y0, pad, ylog)

    @staticmethod
    def _ticks(vs: Sequence[float], zero: bool, pad: float, log: bool) -> list[float]:
        lo, hi = (0.0 if zero else min(vs)), max(vs)
        if log:
            return [math.log10(v) for v in log_ticks(min(vs), hi)]
        span = (hi - lo) * pad or abs(hi) * 0.1 or 1.0
        if zero:
            ticks = nice_ticks(0.0, hi + span if hi > 0 else 1.0)
        else:
            ticks = nice_ticks(max(0.0, lo - span) if lo >= 0 else lo - span, hi + span)
        return ticks

    def _pos(self, v: float, log: bool) -> float:
        return math.log10(max(v, 1e-12)) if log else v

    def x(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return LEFT + (self._pos(v, self.xlog) - lo) / ((hi - lo) or 1) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return self.h - BOTTOM - (self._pos(v, self.ylog) - lo) / ((hi - lo) or 1) * (self.h - TOP - BOTTOM)

    def base(self) -> float:
        """The pixel row bars grow from: zero, or the bottom of a log axis."""
        return self.h - BOTTOM if self.ylog else self.y(0.0)

    def draw(self, xlabel: str, ylabel: str, xticks: bool = True) -> list[str]:
        out = []
        for t in self.yt:
            v = 10 ** t if self.ylog else t
            out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{self.y(v):.1f}" y2="{self.y(v):.1f}" class="g"/>')
            out.append(f'<text x="{LEFT - 6}" y="{self.y(v) + 4:.1f}" text-anchor="end" class="k">'
                       f"{_fmt_tick(v)}</text>")
        if xticks:
            for t in self.xt:
                v = 10 ** t if self.xlog else t
                out.append(f'<line x1="{self.x(v):.1f}" x2="{self.x(v):.1f}" y1="{TOP}" y2="{self.h - BOTTOM}" '
                           'class="g"/>')
                out.append(f'<text x="{self.x(v):.1f}" y="{self.h - BOTTOM + 16}" text-anchor="middle" '
                           f'class="k">{_fmt_tick(v)}</text>')
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{self.h - BOTTOM}" y2="{self.h - BOTTOM}" class="a"/>')
        out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{self.h - BOTTOM}" class="a"/>')
        out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{self.h - 10}" text-anchor="middle" class="l">'
                   f"{escape(xlabel)}</text>")
        out.append(f'<text x="14" y="{(TOP + self.h - BOTTOM) / 2}" text-anchor="middle" class="l" '
                   f'transform="rotate(-90 14 {(TOP + self.h - BOTTOM) / 2})">{escape(ylabel)}</text>')
        return out


def _wide(values: Sequence[float], ratio: float = 20.0) -> bool:
    """Whether positive values span enough decades that a log axis shows them better."""
    pos = [v for v in values if v > 0]
    return len(pos) == len(values) and len(pos) > 1 and max(pos) / min(pos) > ratio


def _legend(names: Sequence[str], colors: dict[str, str]) -> list[str]:
    out, x = [], LEFT + 4
    for name in names:
        out.append(f'<rect x="{x}" y="27" width="10" height="10" fill="{colors[name]}"/>')
        out.append(f'<text x="{x + 14}" y="36" class="k">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return out


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.x, -p.y)):
        if not front or p.y > front[-1].y:
            front.append(p)
    return front


def _merge(points: Sequence[Point]) -> list[Point]:
    """Points at the same place in the same group become one point naming all of them."""
    merged: dict[tuple[float, float, str], list[str]] = {}
    for p in points:
        merged.setdefault((round(p.x, 9), round(p.y, 9), p.group), []).append(p.label)
    return [Point(x, y, " = ".join(labels), g) for (x, y, g), labels in merged.items()]


def scatter(points: Sequence[Point], title: str, xlabel: str, ylabel: str,
            vline: tuple[float, str] | None = None) -> str:
    """Accuracy against latency; each group (where it was measured) gets its own Pareto front. `vline`
    (x, label) draws a vertical line there, e.g. a latency budget."""
    if not points:
        return empty(title, "no point has both a measured latency and a measured accuracy")
    points = _merge(points)
    xs = [p.x for p in points] + ([vline[0]] if vline else [])
    xlog = _wide(xs, 8.0)
    ax = _Axes(xs, [p.y for p in points], xlog=xlog)
    groups = list(dict.fromkeys(p.group for p in points))
    colors = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    out = _open(title) + ax.draw(xlabel + (" (log scale)" if xlog else ""), ylabel) + _legend(groups, colors)
    if vline:
        x = ax.x(vline[0])
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{ax.h - BOTTOM}" stroke="#C44E52" '
                   'stroke-width="1.5"/>')
        out.append(f'<text x="{x - 4:.1f}" y="{TOP + 12}" text-anchor="end" class="k">{escape(vline[1])}</text>')
    for g in groups:
        front = pareto_front([p for p in points if p.group == g])
        if len(front) > 1:
            path = " ".join(f"{ax.x(p.x):.1f},{ax.y(p.y):.1f}" for p in front)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colors[g]}" stroke-dasharray="5 4" '
                       'stroke-width="1.5"/>')
    for p in points:
        cx, cy = ax.x(p.x), ax.y(p.y)
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{colors[p.group]}" stroke="#222" '
                   f'stroke-width="0.8"><title>{escape(p.label)}: {p.x:.3f} ms, {p.y:.2f}%</title></circle>')
        anchor = "end" if cx > W - 160 else "start"
        dx = -9 if anchor == "end" else 9
        out.append(f'<text x="{cx + dx:.1f}" y="{cy - 7:.1f}" text-anchor="{anchor}" class="k">'
                   f"{escape(p.label)}</text>")
    return "\n".join(out + ["</svg>"])


def bars(items: Sequence[tuple[str, float]], title: str, ylabel: str, fmt: Callable[[float], str],
         highlight: str | None = None) -> str:
    """Vertical bars, one per labelled value, the value printed above each; a log axis when values
    span more than a factor of 20."""
    if not items:
        return empty(title, "nothing measured")
    ylog = _wide([v for _, v in items])
    ax = _Axes([0, len(items)], [v for _, v in items], y0=not ylog, ylog=ylog)
    out = _open(title) + ax.draw("", ylabel + (" (log scale)" if ylog else ""), xticks=False)
    slot = (W - LEFT - RIGHT) / len(items)
    for i, (label, value) in enumerate(items):
        x = LEFT + i * slot + slot * 0.18
        y = ax.y(value)
        color = PALETTE[1] if label == highlight else PALETTE[0]
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.64:.1f}" height="{max(ax.base() - y, 0):.1f}" '
                   f'fill="{color}"><title>{escape(label)}: {escape(fmt(value))}</title></rect>')
        out.append(f'<text x="{x + slot * 0.32:.1f}" y="{y - 5:.1f}" text-anchor="middle" class="k">'
                   f"{escape(fmt(value))}</text>")
        out.append(f'<text x="{x + slot * 0.32:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" class="k">'
                   f"{escape(label)}</text>")
    return "\n".join(out + ["</svg>"])


def grouped_bars(categories: Sequence[str], series: dict[str, Sequence[float | None]], title: str,
                 ylabel: str, fmt: Callable[[float], str]) -> str:
    """Bars grouped by category (e.g. p50/p90/p99), one colour per series; a missing value is marked n/m."""
    values = [v for vs in series.values() for v in vs if v is not None]
    if not values:
        return empty(title, "nothing measured")
    ylog = _wide(values)
    ax = _Axes([0, 1], values, y0=not ylog, ylog=ylog)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(series)}
    out = _open(title) + ax.draw("", ylabel + (" (log scale)" if ylog else ""), xticks=False)
    out += _legend(list(series), colors)
    slot = (W - LEFT - RIGHT) / len(categories)
    width = slot * 0.7 / max(len(series), 1)
    for i, cat in enumerate(categories):
        out.append(f'<text x="{LEFT + (i + 0.5) * slot:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" '
                   f'class="k">{escape(cat)}</text>')
        for j, (name, vs) in enumerate(series.items()):
            v = vs[i]
            x = LEFT + i * slot + slot * 0.15 + j * width
            if v is None:
                out.append(f'<text x="{x + width / 2:.1f}" y="{ax.base() - 4:.1f}" text-anchor="middle" '
                           'class="k">n/m</text>')
                continue
            out.append(f'<rect x="{x:.1f}" y="{ax.y(v):.1f}" width="{width * 0.92:.1f}" '
                       f'height="{max(ax.base() - ax.y(v), 0):.1f}" fill="{colors[name]}">'
                       f"<title>{escape(name)} {escape(cat)}: {escape(fmt(v))}</title></rect>")
            out.append(f'<text x="{x + width / 2:.1f}" y="{ax.y(v) - 4:.1f}" text-anchor="middle" class="k">'
                       f"{escape(fmt(v))}</text>")
    return "\n".join(out + ["</svg>"])


def histogram(series: dict[str, Sequence[float]], title: str, xlabel: str, bins: int = 40) -> str:
    """Overlaid histograms of per-iteration latencies on shared bins (log-spaced when the series are
    far apart, so both shapes show)."""
    data = {k: [float(v) for v in vs if math.isfinite(v) and v > 0] for k, vs in series.items() if vs}
    data = {k: vs for k, vs in data.items() if vs}
    if not data:
        return empty(title, "no latency samples")
    lo = min(min(vs) for vs in data.values())
    hi = max(max(vs) for vs in data.values())
    xlog = hi / lo > 4
    tf = math.log10 if xlog else (lambda v: v)
    tlo, thi = tf(lo), tf(hi)
    width = (thi - tlo) / bins or 1.0
    fractions = {}
    for k, vs in data.items():
        counts = [0] * bins
        for v in vs:
            counts[min(int((tf(v) - tlo) / width), bins - 1)] += 1
        fractions[k] = [c / len(vs) * 100 for c in counts]

    def edge(i: int) -> float:
        t = tlo + i * width
        return 10 ** t if xlog else t

    ax = _Axes([lo, hi], [f for fs in fractions.values() for f in fs], y0=True, pad=0.02, xlog=xlog)
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(data)}
    out = _open(title) + ax.draw(xlabel + (" (log scale)" if xlog else ""), "% of iterations")
    out += _legend(list(data), colors)
    for k, fs in fractions.items():
        for i, f in enumerate(fs):
            if f <= 0:
                continue
            x0, x1 = ax.x(edge(i)), ax.x(edge(i + 1))
            out.append(f'<rect x="{x0:.1f}" y="{ax.y(f):.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                       f'height="{ax.base() - ax.y(f):.1f}" fill="{colors[k]}" fill-opacity="0.65"/>')
    return "\n".join(out + ["</svg>"])


def hbars(rows: Sequence[tuple[str, float, bool]], title: str, xlabel: str, marked: str) -> str:
    """Horizontal bars, one per layer; rows flagged True are drawn in the marked colour (e.g. kept in float)."""
    if not rows:
        return empty(title, "no per-layer measurements")
    height = TOP + BOTTOM + 22 * len(rows) + 10
    left = 200
    values = [v for _, v, _ in rows]
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    ticks = nice_ticks(lo, hi if hi > lo else lo + 1)
    span = (ticks[-1] - ticks[0]) or 1.0

    def x(v: float) -> float:
        return left + (v - ticks[0]) / span * (W - left - RIGHT)

    out = _open(title, height)
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{TOP}" y2="{height - BOTTOM}" class="g"/>')
        out.append(f'<text x="{x(t):.1f}" y="{height - BOTTOM + 16}" text-anchor="middle" class="k">'
                   f"{_fmt_tick(t)}</text>")
    out.append(f'<text x="{(left + W - RIGHT) / 2}" y="{height - 10}" text-anchor="middle" class="l">'
               f"{escape(xlabel)}</text>")
    if any(flag for _, _, flag in rows):
        out += _legend(["quantized", marked], {"quantized": PALETTE[0], marked: PALETTE[3]})
    for i, (label, v, flag) in enumerate(rows):
        y = TOP + 8 + i * 22
        x0, x1 = sorted((x(0), x(v)))
        color = PALETTE[3] if flag else PALETTE[0]
        short = label if len(label) <= 30 else "…" + label[-29:]
        out.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end" class="k">{escape(short)}</text>')
        out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="16" fill="{color}">'
                   f"<title>{escape(label)}: {v:.3f}</title></rect>")
    return "\n".join(out + ["</svg>"])


def empty(title: str, why: str) -> str:
    """A placeholder plot that says why there is nothing to draw."""
    out = _open(title, 120)
    out.append(f'<text x="{W / 2}" y="70" text-anchor="middle" class="l">{escape(why)}</text>')
    return "\n".join(out + ["</svg>"])
