"""Benchmark evaluation: score a labelled set with the trained judge, report SRCC/PLCC/KRCC.

Paper map (PreResQ-R1, arXiv 2511.05393; protocol in docs: method.md §6, datasets.md §3):
- `correlations`: SRCC (scipy.stats.spearmanr), PLCC (pearsonr), KRCC (kendalltau) between
  predicted scores and MOS, plus PLCC after the VQEG 4-parameter logistic (`logistic4`,
  `fit_logistic`). The paper's public code reports raw PLCC; DeQA-Score fits the logistic.
  Both are reported and always named: "PLCC raw" and "PLCC logistic" (after the fit).
- `evaluate`: every item is scored with the training prompt and parser (`preresq.judge`),
  greedy by default, or K sampled answers averaged (`samples=K`).
- `draw_scatter`, `draw_curves`: PNG figures drawn with Pillow only (no matplotlib).

Deliberate deviations from the authors' evaluation code:
- An answer that cannot be parsed is counted (`parse_failures`) and left out of the
  correlations; the public code substitutes a random integer 1..5 for it.
- A file that cannot be read is counted (`unreadable`), warned about with its path, and
  skipped; it does not stop the run.
- Constant predictions, or fewer than 3 scored items, give NaN correlations (two points
  always correlate perfectly), reported as NaN in the table and as null in summary.json,
  never as 0.
- If the logistic fit fails, PLCC logistic falls back to raw PLCC and `logistic_note`
  says why.

Run (one table per run; summary.json, predictions-<set>.csv, scatter-<set>.png in --out):
    python evaluate.py --model tiny --data synthetic                  # synthetic test split
    python evaluate.py --model runs/kadid/final --data koniq,spaq \
        --data-root ~/iqa/koniq10k,~/iqa/SPAQ --split all --samples 8
"""

import argparse
import csv
import json
import math
import os
import sys
import warnings

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
import preresq

MIN_ITEMS = 3  # fewer scored items than this: every correlation is NaN


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


def logistic4(x, b1, b2, b3, b4):
    """VQEG 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2.

    x: array (N,) of predicted scores -> (N,) mapped onto the MOS scale. b1 and b2 are the
    upper and lower asymptotes, b3 the midpoint, |b4| the width. Written with expit so
    that large |x - b3| / |b4| cannot overflow exp.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return (b1 - b2) * scipy.special.expit((np.asarray(x, float) - b3) / abs(b4)) + b2


def fit_logistic(x, y):
    """Least-squares fit of `logistic4` mapping x (predictions, (N,)) onto y (MOS, (N,)).

    Starts from b = [max y, min y, mean x, std x / 4] with curve_fit(maxfev=10000), as in
    datasets.md §3. Returns the fitted (b1, b2, b3, b4) as a float array (4,).
    Raises RuntimeError with the reason when the fit cannot be made or does not converge.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) <= 4:
        raise RuntimeError(f"logistic fit needs more than 4 points, got {len(x)}")
    b0 = [y.max(), y.min(), x.mean(), x.std() / 4]
    if b0[3] == 0:
        raise RuntimeError("logistic fit impossible: the predictions are constant")
    with warnings.catch_warnings():
        # OptimizeWarning only says the covariance could not be estimated; we do not use it.
        warnings.simplefilter("ignore", scipy.optimize.OptimizeWarning)
        try:
            params, _ = scipy.optimize.curve_fit(logistic4, x, y, p0=b0, maxfev=10000)
        except (RuntimeError, ValueError, TypeError) as err:
            raise RuntimeError(f"logistic fit failed: {err}") from err
    if not np.all(np.isfinite(params)):
        raise RuntimeError(f"logistic fit failed: non-finite parameters {params.tolist()}")
    return params


def _raw_correlations(pred, mos):
    """(SRCC, PLCC, KRCC) of two equal-length float arrays; NaN when undefined."""
    if len(pred) < MIN_ITEMS or np.ptp(pred) == 0 or np.ptp(mos) == 0:
        return math.nan, math.nan, math.nan
    with warnings.catch_warnings():
        # Near-constant input can still trigger scipy's warnings; the NaN result says it all.
        warnings.simplefilter("ignore")
        return (float(scipy.stats.spearmanr(pred, mos).statistic),
                float(scipy.stats.pearsonr(pred, mos).statistic),
                float(scipy.stats.kendalltau(pred, mos).statistic))


def _check_pair(pred, mos):
    pred, mos = np.asarray(pred, float).ravel(), np.asarray(mos, float).ravel()
    if len(pred) != len(mos):
        raise ValueError(f"correlations: {len(pred)} predictions but {len(mos)} MOS values; "
                         "pass one prediction per item")
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(mos))):
        raise ValueError("correlations: NaN or inf among the inputs; leave unparsed "
                         "predictions out before computing correlations")
    return pred, mos


def correlations(pred, mos):
    """Agreement between predicted scores and MOS.

    pred, mos: sequences of N finite floats. Returns a dict:
      srcc, plcc, krcc   - scipy's Spearman, Pearson (raw) and Kendall (tau-b) statistics;
      plcc_logistic      - Pearson between logistic4(pred) and mos after `fit_logistic`,
                           or raw PLCC when the fit fails;
      logistic_params    - [b1, b2, b3, b4] or None when the fit failed;
      logistic_note      - "" on success, else why raw PLCC stands in for it.
    Every correlation is NaN for constant inputs or fewer than MIN_ITEMS items.
    """
    pred, mos = _check_pair(pred, mos)
    srcc, plcc, krcc = _raw_correlations(pred, mos)
    result = dict(srcc=srcc, plcc=plcc, krcc=krcc, plcc_logistic=plcc,
                  logistic_params=None, logistic_note="")
    if math.isnan(plcc):
        result["logistic_note"] = "correlations undefined (constant input or too few items)"
        return result
    try:
        params = fit_logistic(pred, mos)
    except RuntimeError as err:
        result["logistic_note"] = f"{err}; raw PLCC reported instead"
        return result
    fitted = logistic4(pred, *params)
    fitted_plcc = _raw_correlations(fitted, mos)[1]
    if math.isnan(fitted_plcc):
        result["logistic_note"] = "logistic fit is flat over the data; raw PLCC reported instead"
        return result
    result.update(plcc_logistic=fitted_plcc, logistic_params=[float(b) for b in params])
    return result


# ---------------------------------------------------------------------------------------
# Figures (Pillow only)
# ---------------------------------------------------------------------------------------

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


def draw_scatter(path, pred, mos, params=None, title="", size=(640, 480)):
    """Scatter of predicted score (x) against MOS (y) as a PNG, with the fitted logistic.

    pred, mos: (N,) floats. params: logistic4's (b1..b4) to draw as a curve, or None.
    The title carries SRCC, raw PLCC and (with params) PLCC after the logistic, computed
    here from the same vectors.
    """
    pred, mos = _check_pair(pred, mos)
    srcc, plcc, _ = _raw_correlations(pred, mos)
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    width, height = size
    frame = _Frame((70, 40, width - 20, height - 55),
                   _padded_range(list(pred)), _padded_range(list(mos)))
    heading = f"{title}   n={len(pred)}   SRCC {srcc:.3f}   PLCC raw {plcc:.3f}"
    if params is not None:
        heading += f"   PLCC logistic {_raw_correlations(logistic4(pred, *params), mos)[1]:.3f}"
    draw.text((width / 2, 12), heading.strip(), fill=INK, font=_font(15), anchor="mt")
    frame.draw_axes(img, draw, "predicted score", "MOS")
    radius = 3 if len(pred) <= 1000 else 2  # thousands of points: smaller dots, less overdraw
    for x, y in zip(pred, mos):
        cx, cy = frame.px(x, y)
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=PALETTE[0])
    if params is not None:
        xs = np.linspace(*frame.xrange, 200)
        ys = np.clip(logistic4(xs, *params), *frame.yrange)
        draw.line([frame.px(x, y) for x, y in zip(xs, ys)], fill=PALETTE[3], width=2)
        draw.text((frame.box[0] + 8, frame.box[1] + 6), "4-parameter logistic fit",
                  fill=PALETTE[3], font=_font(12))
    img.save(path, format="PNG")


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
    img.save(path, format="PNG")


# ---------------------------------------------------------------------------------------
# Scoring a labelled set
# ---------------------------------------------------------------------------------------


def _row(item, judgement, aspect_names):
    aspects = judgement.aspects or [None] * len(aspect_names)
    return dict(path=item.path, mos=item.mos, score=judgement.score,
                **dict(zip(aspect_names, aspects)),
                parsed=judgement.score is not None, text="\n---\n".join(judgement.texts))


def evaluate(model, tokenizer, image_processor, items, *, samples=None, temperature=1.0, seed=0,
             batch_size=8, max_new_tokens=None, max_pixels=None, progress=True):
    """Score `items` (list of data.Item) with the judge and correlate the scores with MOS.

    Items are read with preresq.read_visual and judged `batch_size` at a time with the
    training prompt and parser; samples=None decodes greedily, samples=K averages K sampled
    answers (the batch starting at item i uses seed + i, so the same seed and batch size
    give the same numbers). An unreadable file is warned about and counted; an answer that
    does not parse is counted and kept out of the correlations, never given a score.

    Returns (metrics, rows): metrics = dict(n, srcc, plcc, krcc, plcc_logistic,
    logistic_params, logistic_note, parse_failures, unreadable), where n counts the parsed
    predictions the correlations use; rows = one dict per readable item, in item order:
    path, mos, score (None if unparsed), one key per aspect, parsed (bool), text (the
    answers, joined by "\\n---\\n" when several were sampled).
    """
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be at least 1, got {batch_size}")
    rows, unreadable = [], 0
    bar = tqdm(total=len(items), desc=items[0].dataset if items else "evaluate", unit="item",
               disable=not progress)
    for start in range(0, len(items), batch_size):
        readable = []
        for item in items[start:start + batch_size]:
            try:
                readable.append((item, preresq.read_visual(item.path, max_pixels=max_pixels)))
            except data.DataError as err:
                unreadable += 1
                warnings.warn(f"skipping unreadable file {item.path}: {err}", stacklevel=2)
        judged = {}
        # Images and videos get different prompts, so each kind is judged in its own call.
        for video, aspect_names in ((False, preresq.IMAGE_ASPECTS), (True, preresq.VIDEO_ASPECTS)):
            group = [(k, item, visual) for k, (item, visual) in enumerate(readable)
                     if item.is_video == video]
            if not group:
                continue
            judgements = preresq.judge(
                model, tokenizer, image_processor, [visual for _, _, visual in group],
                video=video, samples=samples, temperature=temperature,
                max_new_tokens=max_new_tokens, seed=seed + start, batch_size=batch_size)
            for (k, item, _), judgement in zip(group, judgements):
                judged[k] = _row(item, judgement, aspect_names)
        rows.extend(judged[k] for k in sorted(judged))
        bar.update(min(batch_size, len(items) - start))
    bar.close()
    parsed = [r for r in rows if r["parsed"]]
    metrics = dict(n=len(parsed),
                   **correlations([r["score"] for r in parsed], [r["mos"] for r in parsed]),
                   parse_failures=len(rows) - len(parsed), unreadable=unreadable)
    return metrics, rows


# ---------------------------------------------------------------------------------------
# Files and the table
# ---------------------------------------------------------------------------------------

SUMMARY_KEYS = ("n", "srcc", "plcc", "krcc", "plcc_logistic", "parse_failures", "unreadable",
                "logistic_params", "logistic_note")


def _json_number(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_summary(path, summary):
    """summary: {dataset: metrics}. Writes strict JSON; an undefined (NaN) correlation is null."""
    clean = {name: {k: _json_number(m[k]) for k in SUMMARY_KEYS if k in m}
             for name, m in summary.items()}
    with open(path, "w") as f:
        json.dump(clean, f, indent=2, allow_nan=False)
        f.write("\n")


def write_predictions(path, rows):
    """One CSV line per row of `evaluate`: path, mos, score, aspects..., parsed (yes/no), text.

    Unparsed predictions have an empty score. Columns follow the first row's keys.
    """
    columns = list(rows[0]) if rows else ["path", "mos", "score", "parsed", "text"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("yes" if r[k] else "no") if k == "parsed"
                             else ("" if r[k] is None else r[k]) for k in columns})


def write_dataset_files(out_dir, name, metrics, rows):
    """Write OUT_DIR/predictions-<name>.csv and OUT_DIR/scatter-<name>.png for one dataset."""
    write_predictions(os.path.join(out_dir, f"predictions-{name}.csv"), rows)
    parsed = [r for r in rows if r["parsed"]]
    draw_scatter(os.path.join(out_dir, f"scatter-{name}.png"), [r["score"] for r in parsed],
                 [r["mos"] for r in parsed], metrics["logistic_params"], title=name)


def format_table(summary):
    """One text table: dataset, n, SRCC, PLCC (raw), KRCC, PLCC (logistic), parse failures.

    summary: {dataset: metrics} as returned by evaluate or read back from summary.json
    (where NaN is null); undefined values print as "nan".
    """
    def number(v):
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    header = ("dataset", "n", "SRCC", "PLCC raw", "KRCC", "PLCC logistic", "parse failures",
              "unreadable")
    lines = [header] + [
        (name, str(m["n"]), number(m["srcc"]), number(m["plcc"]), number(m["krcc"]),
         number(m["plcc_logistic"]), str(m["parse_failures"]), str(m.get("unreadable", 0)))
        for name, m in summary.items()]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                      for c, (cell, w) in enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text + ["PLCC raw: Pearson on the scores as predicted; PLCC logistic: "
                             "after the 4-parameter logistic fit (VQEG)."])


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def default_split(name):
    """"test" for sets with a prescribed test split (official, or KADID's by reference), else "all".

    The paper tests on whole datasets except where a test split is defined; sets without one
    only have data.py's seeded 80/20 split, which no published number uses.
    """
    return "test" if data.DATASETS[name].split in ("official", "kadid") else "all"


def _pair_flags(names, roots, labels):
    """--data/--data-root/--labels -> [(name, root or None, label file or None)], as data.py pairs
    them: one root per set in order (empty for synthetic sets), one label file per "labels" set."""
    root_list = [r.strip() for r in roots.split(",")] if roots else [""] * len(names)
    if len(root_list) != len(names):
        raise ValueError(f"--data lists {len(names)} sets but --data-root gives {len(root_list)} "
                         "folders; give one per set, comma-separated in the same order "
                         "(an empty entry for synthetic sets)")
    label_list = [f.strip() for f in labels.split(",")] if labels else []
    if len(label_list) != names.count("labels"):
        raise ValueError(f"--data names 'labels' {names.count('labels')} time(s) but --labels "
                         f"gives {len(label_list)} file(s); give one per 'labels' entry, in order")
    files = iter(label_list)
    return [(n, r or None, next(files) if n == "labels" else None)
            for n, r in zip(names, root_list)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Score labelled image/video sets with a PreResQ "
                                "model and report SRCC, PLCC and KRCC.")
    # what to score
    p.add_argument("--model", required=True, help="checkpoint folder or preset name (e.g. tiny)")
    p.add_argument("--data", required=True, help="comma-separated dataset names, from: "
                   + ", ".join(data.DATASETS))
    p.add_argument("--data-root", help="one folder per set, comma-separated in the order of "
                   "--data (empty for synthetic sets)")
    p.add_argument("--labels", help="label file(s) for the 'labels' set(s): 'name mos [std]', "
                   "'ref dist mos', 'path, mos' or a training jsonl")
    p.add_argument("--split", help="one split for every set, or one per set, comma-separated "
                   "(default: 'test' for sets with a prescribed test split, else 'all')")
    p.add_argument("--out", default="eval", help="folder for summary.json, CSVs and scatter plots")
    # decoding
    p.add_argument("--samples", type=int, help="average K sampled answers (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="answer length limit (default: 256)")
    p.add_argument("--max-pixels", type=int, help="downscale larger images to this many pixels")
    # hardware
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: bfloat16 on GPU)")
    args = p.parse_args(argv)
    args.names = [n.strip() for n in args.data.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in data.DATASETS]
    if not args.names or unknown:
        p.error(f"--data: unknown dataset(s) {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(data.DATASETS)}")
    if args.samples is not None and args.samples < 1:
        p.error(f"--samples must be at least 1, got {args.samples}")
    if args.temperature <= 0:
        p.error(f"--temperature must be positive, got {args.temperature}")
    for flag in ("batch_size", "max_new_tokens", "max_pixels"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    try:
        args.sets = _pair_flags(args.names, args.data_root, args.labels)
    except ValueError as err:
        p.error(str(err))
    splits = [x.strip() for x in args.split.split(",")] if args.split else [None]
    if len(splits) not in (1, len(args.names)):
        p.error(f"--split gives {len(splits)} splits for {len(args.names)} sets; give one for "
                "all of them or one per set, in the order of --data")
    if len(splits) == 1:
        splits *= len(args.names)
    args.splits = [split or default_split(name) for name, split in zip(args.names, splits)]
    return args


def main(argv=None):
    args = parse_args(argv)
    # Read every label file before loading the model, so that a wrong path fails in seconds.
    sets = {}
    try:
        for (name, root, labels), split in zip(args.sets, args.splits):
            items = data.load_dataset(name, root, split, labels=labels)
            if not items:
                raise data.DataError(f"{name} ({split} split) has no items; check --data-root, "
                                     "--labels and --split")
            key = items[0].dataset if split == "all" else f"{items[0].dataset}-{split}"
            if key in sets:
                raise data.DataError(f"{key} appears twice in --data")
            sets[key] = items
    except data.DataError as err:
        sys.exit(f"evaluate.py: {err}")
    os.makedirs(args.out, exist_ok=True)
    try:
        model, tokenizer, image_processor = preresq.load_model(args.model, args.device, args.dtype)
    except preresq.ModelLoadError as err:
        sys.exit(f"evaluate.py: {err}")
    decoding = ("greedy" if args.samples is None
                else f"{args.samples} samples at temperature {args.temperature}, averaged")
    print(f"model {args.model}; decoding: {decoding}; seed {args.seed}", file=sys.stderr)
    summary = {}
    for name, items in sets.items():
        metrics, rows = evaluate(model, tokenizer, image_processor, items, samples=args.samples,
                                 temperature=args.temperature, seed=args.seed,
                                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 max_pixels=args.max_pixels)
        summary[name] = metrics
        write_dataset_files(args.out, name, metrics, rows)
        write_summary(os.path.join(args.out, "summary.json"), summary)  # kept current per set
        if metrics["logistic_note"]:
            print(f"{name}: {metrics['logistic_note']}", file=sys.stderr)
    print(format_table(summary))
    print(f"files in {args.out}/: summary.json, predictions-<dataset>.csv, scatter-<dataset>.png",
          file=sys.stderr)


if __name__ == "__main__":
    main()
