"""Figures as PNG files, drawn with Pillow only (no matplotlib).

    draw_scatter(path, pred, mos, curve, title)   # evaluate.py (reports.py): predicted score against MOS
    draw_curves(path, {name: [(step, value)]})    # grpo.py: mean reward and held-out correlations

Both draw on a _Frame, a plot area that maps data coordinates to pixels, with round ticks
(_nice_ticks) and a light grid.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from support import files

BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
GRID = (225, 225, 225)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]


def _font(size):
    return ImageFont.load_default(size=size)


def _nice_ticks(lo, hi, count=5):
    """About `count` round tick values (steps of 1, 2, 2.5 or 5 x 10^k) inside [lo, hi]."""
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _padded_range(values, pad=0.05):
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        return lo - 0.5, hi + 0.5
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _tick_label(v):
    return f"{v:g}" if abs(v) >= 1e-9 else "0"


class _Frame:
    """A plot area: pixel box (left, top, right, bottom) and data ranges; maps data to pixels."""

    def __init__(self, box, xrange, yrange):
        self.box, self.xrange, self.yrange = box, xrange, yrange

    def px(self, x, y):
        (left, top, right, bottom), (x0, x1), (y0, y1) = self.box, self.xrange, self.yrange
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (y - y0) / (y1 - y0) * (bottom - top))

    def draw_axes(self, img, draw, xlabel, ylabel):
        left, top, right, bottom = self.box
        font = _font(12)
        for y in _nice_ticks(*self.yrange):
            py = self.px(self.xrange[0], y)[1]
            draw.line([(left, py), (right, py)], fill=GRID)
            draw.line([(left - 4, py), (left, py)], fill=INK)
            draw.text((left - 7, py), _tick_label(y), fill=INK, font=font, anchor="rm")
        for x in _nice_ticks(*self.xrange):
            px = self.px(x, self.yrange[0])[0]
            draw.line([(px, top), (px, bottom)], fill=GRID)
            draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
            draw.text((px, bottom + 7), _tick_label(x), fill=INK, font=font, anchor="mt")
        draw.rectangle(self.box, outline=INK)
        draw.text(((left + right) / 2, bottom + 24), xlabel, fill=INK, font=_font(13), anchor="mt")
        # Pillow draws no vertical text: render the y label flat and paste it rotated.
        w, h = draw.textbbox((0, 0), ylabel, font=_font(13))[2:]
        label = Image.new("RGB", (w + 2, h + 4), BACKGROUND)
        ImageDraw.Draw(label).text((1, 1), ylabel, fill=INK, font=_font(13))
        label = label.rotate(90, expand=True)
        img.paste(label, (max(2, left - 52 - label.width // 2),
                          int((top + bottom - label.height) / 2)))


def draw_scatter(path, pred, mos, curve=None, title="", size=(640, 480), curve_label=""):
    """Scatter of predicted score (x) against MOS (y) as a PNG, with an optional fitted curve.

    pred, mos: (N,) floats. curve: a function of an array of predicted scores (e.g. the fitted
    increasing logistic, evaluate.fitted_curve(metrics)), drawn across the plot and labelled
    `curve_label`; None draws none. title: the heading (reports.py puts n and the correlations there).
    """
    pred, mos = np.asarray(pred, float).ravel(), np.asarray(mos, float).ravel()
    if len(pred) != len(mos):
        raise ValueError(f"draw_scatter: {len(pred)} predictions but {len(mos)} MOS values")
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    width, height = size
    frame = _Frame((70, 40, width - 20, height - 55),
                   _padded_range(list(pred)), _padded_range(list(mos)))
    draw.text((width / 2, 12), title.strip(), fill=INK, font=_font(15), anchor="mt")
    frame.draw_axes(img, draw, "predicted score", "MOS")
    radius = 3 if len(pred) <= 1000 else 2  # thousands of points: smaller dots, less overdraw
    for x, y in zip(pred, mos):
        cx, cy = frame.px(x, y)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=PALETTE[0])
    if curve is not None:
        xs = np.linspace(*frame.xrange, 200)
        ys = np.clip(curve(xs), *frame.yrange)
        draw.line([frame.px(x, y) for x, y in zip(xs, ys)], fill=PALETTE[3], width=2)
        draw.text((frame.box[0] + 8, frame.box[1] + 6), curve_label, fill=PALETTE[3], font=_font(12))
    with files.atomic_file(path, "wb") as f:  # a full disk: a WriteError, no half a PNG
        img.save(f, format="PNG")


def draw_curves(path, series, title="", size=(720, 560)):
    """Training curves as a PNG: one line per named series against the step.

    series: {name: [(step, value), ...]}. Names containing "reward" go to the upper panel,
    every other series (held-out SRCC, PLCC, ...) to the lower one, whose y range always
    includes 0 so that "no correlation" is visible; a panel with no series is left out.
    NaN values (e.g. correlations of constant predictions) leave a gap in the line.
    """
    if not series:
        raise ValueError("draw_curves: no series to draw")
    panels = [[n for n in series if "reward" in n.lower()],
              [n for n in series if "reward" not in n.lower()]]
    panels = [names for names in panels if names]
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    width, height = size
    draw.text((width / 2, 10), title or "training curves", fill=INK, font=_font(15), anchor="mt")
    steps = [s for points in series.values() for s, _ in points]
    xrange = _padded_range(steps, pad=0.02)
    panel_height = (height - 40) / len(panels)
    for p, names in enumerate(panels):
        top = 40 + p * panel_height
        values = [v for n in names for _, v in series[n] if math.isfinite(v)]
        is_reward = "reward" in names[0].lower()
        yrange = _padded_range(values if is_reward else values + [0.0])
        frame = _Frame((70, top + 22, width - 20, top + panel_height - 50), xrange, yrange)
        frame.draw_axes(img, draw, "step", "reward" if is_reward else "correlation")
        legend_x = frame.box[0]
        for n in names:
            colour = PALETTE[list(series).index(n) % len(PALETTE)]
            draw.line([(legend_x, top + 10), (legend_x + 18, top + 10)], fill=colour, width=3)
            draw.text((legend_x + 22, top + 10), n, fill=INK, font=_font(12), anchor="lm")
            legend_x += 40 + draw.textlength(n, font=_font(12))
            segment = []
            for s, v in sorted(series[n]) + [(None, math.nan)]:
                if math.isfinite(v):
                    segment.append(frame.px(s, v))
                    continue
                if len(segment) > 1:
                    draw.line(segment, fill=colour, width=2)
                if len(series[n]) <= 60 or len(segment) == 1:  # sparse points get markers
                    for cx, cy in segment:
                        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
                segment = []
    with files.atomic_file(path, "wb") as f:  # a full disk: a WriteError, no half a PNG
        img.save(f, format="PNG")
