"""What a run learns and where a judge is wrong, as one HTML page that opens from disk.

    write_training_page(run_folder, load_picture)             # RUN/report.html from the run's logs
    training_page(metrics, evals, rollouts, eval_items, ...)  # the same page, as a string
    write_evaluation_page(path, name, metrics, rows, load_picture)   # evaluate.py's report-<set>.html
    evaluation_page(name, metrics, rows, ...)                 # the same page, as a string

The training page reads the run folder's JSON-lines logs:
- metrics.jsonl, one line per step {"step", "stage", "reward", ...}: the mean-reward curve;
- eval.jsonl, one line per held-out evaluation {"step", "srcc", "plcc", ...}: the SRCC / PLCC curves;
- rollouts.jsonl, one line per logged step {"step", "stage", "groups": [{"file", "mos", "prompt",
  "answers": [{"text", "scores" (aspect scores, null when unparsed), "terms" {name: value},
  "total", "advantage", "length"}, ...]}, ...]}: each picture beside its G answers, every reward
  term whatever its name, the total and the group advantage;
- eval_items.jsonl (optional), one line per held-out item of the latest evaluation {"file", "mos",
  "prediction" (null when unparsed)}: the held-out scatter.
The evaluation page takes evaluate.evaluate's metrics and rows (path, mos, score, one key per
aspect, parsed, text).

Everything is inside the page: pictures are JPEG thumbnails (longest side THUMB_SIDE px) in data:
URIs, charts are inline SVG, the style is inline; nothing is fetched, no script runs. Every text
from a model or a file is HTML-escaped. A page shows at most MAX_STEPS logged steps of MAX_GROUPS
groups, or the MAX_ERRORS largest errors and MAX_FAILURES parse failures, and says so: the
pictures cost a few KB each, so a page stays small whatever the model and the set.

load_picture(path) returns a PIL image or a list of them (a video's views: the first is shown);
data.read_visual is one. The default opens the file with PIL (images only). A picture that cannot
be read becomes a placeholder that says why: the page is a view of the work, never why it fails.
This module imports nothing of the project, so it can be copied alone.
"""
import base64
import html
import io
import json
import math
import os
from pathlib import Path

from PIL import Image

from support import files

THUMB_SIDE = 160   # px, longest side of an embedded picture
MAX_STEPS = 4      # logged steps shown on the training page
MAX_GROUPS = 4     # groups shown per logged step
MAX_ERRORS = 20    # largest errors shown on the evaluation page
MAX_FAILURES = 20  # parse failures shown on the evaluation page
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; margin: 0.2em 0; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.note { color: #555; } .charts { display: flex; flex-wrap: wrap; gap: 1em; }
svg { background: #fff; border: 1px solid #ddd; } svg text { font: 11px sans-serif; fill: #333; }
.group, .item { display: flex; gap: 1em; margin: 1em 0; padding: 0.6em; border: 1px solid #ddd; }
.side { width: 150px; flex: none; font-size: 12px; word-break: break-all; }
.side .aspects { word-break: normal; }
.thumb { max-width: 160px; max-height: 160px; display: block; margin-bottom: 0.3em; }
.missing { width: 160px; height: 90px; background: #eee; font-size: 11px; overflow: hidden; }
table { border-collapse: collapse; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 2px 5px; vertical-align: top; } th { font-size: 11px; }
td.answer { min-width: 200px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { white-space: pre-wrap; margin: 0; max-width: 520px; font-size: 11px; }
tr.best { background: #e3f5e1; } tr.worst { background: #fbe3e3; }
.flag { background: #fff0c2; border: 1px solid #e0b400; padding: 0 4px; font-size: 11px; }
.mark { font-weight: bold; white-space: nowrap; }
"""


def esc(value) -> str:
    """Any value as HTML text: <, >, &, and quotes escaped."""
    return html.escape(str(value), quote=True)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(v, digits=3, sign=False) -> str:
    """A value as table text: numbers to `digits` decimals (with + when `sign`), missing or NaN "–",
    anything else escaped as it is."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if not _is_number(v):
        return esc(v)
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file; [] when it does not exist. A line that is not a JSON object
    (a run killed mid-write leaves half a line) is left out."""
    if not os.path.exists(path):
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# --------------------------------------------------------------------------- pictures

def thumbnail(picture: Image.Image, side: int = THUMB_SIDE) -> str:
    """A data: URI of `picture` as a JPEG scaled down (aspect kept) to at most `side` px a side."""
    small = picture.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def open_image(path):
    """The default picture loader: the file as PIL opens it (images only)."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


def picture_html(path, load_picture=None, cache=None) -> str:
    """An <img> of the file's first view as a thumbnail, or a placeholder that says why there is none."""
    if cache is not None and path in cache:
        return cache[path]
    try:
        picture = (load_picture or open_image)(path)
        if isinstance(picture, (list, tuple)):
            picture = picture[0] if picture else None
        if picture is None:
            raise ValueError("the loader returned no picture")
        tag = f'<img class="thumb" src="{thumbnail(picture)}" alt="{esc(os.path.basename(str(path)))}">'
    except Exception as err:  # noqa: BLE001 - any reader's failure: one placeholder, not a lost page
        tag = f'<div class="thumb missing">no picture: {esc(type(err).__name__)}: {esc(str(err)[:200])}</div>'
    if cache is not None:
        cache[path] = tag
    return tag


# --------------------------------------------------------------------------- charts (inline SVG)

def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round numbers (steps of 1, 2 or 5 times a power of ten) from at or below lo to at or above hi,
    about `count` of them."""
    raw = (hi - lo or 1.0) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step + 1e-9) * step
    n = max(1, math.ceil((hi - first) / step - 1e-9))
    return [round(first + i * step, 10) for i in range(n + 1)]


def chart(series: dict, *, title: str, x_label: str, y_label: str, scatter: bool = False,
          width: int = 480, height: int = 280) -> str:
    """An SVG chart of `series` {name: [(x, y) or (x, y, hover text), ...]}: lines through the points,
    or dots with a dashed y = x line on equal axes when `scatter`. Points with a missing or non-finite
    coordinate are left out; a chart with no point left is a note saying so."""
    series = {name: [p for p in pts if _is_number(p[0]) and _is_number(p[1])] for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return f'<p class="note">{esc(title)}: nothing logged yet.</p>'
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    if scatter:
        xs = ys = xs + ys
    x_ticks, y_ticks = ticks(min(xs), max(xs)), ticks(min(ys), max(ys))
    left, right, top, bottom = 50, 12, 26, 40
    px = lambda x: left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (width - left - right)  # noqa: E731
    py = lambda y: height - bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{esc(title)}</text>']
    for t in x_ticks:
        parts.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{height - bottom}" stroke="#eee"/>'
                     f'<text x="{px(t):.1f}" y="{height - bottom + 14}" text-anchor="middle">{t:g}</text>')
    for t in y_ticks:
        parts.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{width - right}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{esc(x_label)}</text>'
                 f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{esc(y_label)}</text>')
    if scatter:
        lo, hi = x_ticks[0], x_ticks[-1]
        parts.append(f'<line x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
                     'stroke="#999" stroke-dasharray="4 3"/>')
    for k, (name, pts) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        if not scatter and len(pts) > 1:
            path = " ".join(f"{px(p[0]):.1f},{py(p[1]):.1f}" for p in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if scatter or len(pts) <= 60:
            parts += [f'<circle cx="{px(p[0]):.1f}" cy="{py(p[1]):.1f}" r="{3 if scatter else 2.5}" fill="{colour}"'
                      f' fill-opacity="0.7">' + (f'<title>{esc(p[2])}</title>' if len(p) > 2 else "") + "</circle>"
                      for p in pts]
        parts.append(f'<rect x="{left + 8}" y="{top + 6 + 14 * k}" width="8" height="8" fill="{colour}"/>'
                     f'<text x="{left + 20}" y="{top + 14 + 14 * k}">{esc(name)}</text>')
    return "".join(parts) + "</svg>"


# --------------------------------------------------------------------------- the page around it all

def page(title: str, body: list[str]) -> str:
    """A whole HTML document: `title` (escaped) and the body parts (already HTML), the style inline."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_page(path, text: str) -> Path:
    """Write `text` to `path` through a temporary file (files.write_file): a browser reloading meanwhile
    never reads half a page, and a full disk leaves the old page, not part of a new one."""
    path = Path(path)
    files.write_file(path, text)
    return path


def answer_html(text) -> str:
    """An answer as preformatted, escaped text; an empty one marked so."""
    if not str(text or "").strip():
        return '<span class="flag">empty answer</span>'
    return f"<pre>{esc(text)}</pre>"


# --------------------------------------------------------------------------- the training page

def chosen_steps(rollouts: list[dict], cap: int = MAX_STEPS) -> list[dict]:
    """At most `cap` logged steps, in step order: the last and the first of each stage come first
    (so a two-stage run shows both stages), then the newest of the others."""
    by_stage: dict = {}
    for record in rollouts:
        by_stage.setdefault(record.get("stage"), []).append(record)
    wanted = ([records[-1] for records in by_stage.values()] + [records[0] for records in by_stage.values()]
              + rollouts[::-1])
    picked = []
    for record in wanted:
        if len(picked) < cap and all(record is not p for p in picked):
            picked.append(record)
    return sorted(picked, key=lambda r: (r.get("step") is None, r.get("step") or 0))


def extremes(answers: list[dict]) -> tuple[int | None, int | None]:
    """Indices of the highest- and lowest-advantage answers (the first of ties); (None, None) when
    fewer than two advantages differ: GRPO learns nothing from such a group."""
    ranked = [j for j, a in enumerate(answers) if _is_number(a.get("advantage"))]
    if not ranked:
        return None, None
    best = max(ranked, key=lambda j: answers[j]["advantage"])
    worst = min(ranked, key=lambda j: answers[j]["advantage"])
    return (best, worst) if answers[best]["advantage"] > answers[worst]["advantage"] else (None, None)


def scores_html(scores) -> str:
    """Parsed aspect scores and their mean, or the unparsed mark."""
    if not isinstance(scores, list) or not scores:
        return '<span class="flag">unparsed</span>'
    shown = " ".join(number(s, 2) for s in scores)
    mean = sum(scores) / len(scores) if all(_is_number(s) for s in scores) else None
    return f"{shown}<br>mean {number(mean, 2)}"


def answer_row(j: int, answer: dict, terms: list[str], mark: str) -> str:
    """One answer's table row: number and mark, text, scores, every term, total, advantage, tokens."""
    classes = [mark] if mark else []
    if not isinstance(answer.get("scores"), list) or not answer.get("scores"):
        classes.append("unparsed")
    if not str(answer.get("text") or "").strip():
        classes.append("empty")
    marker = {"best": "&#9650; best", "worst": "&#9660; worst"}.get(mark, "")
    values = answer.get("terms") or {}
    cells = [f'<td class="num">{j + 1}<br><span class="mark">{marker}</span></td>',
             f'<td class="answer">{answer_html(answer.get("text"))}</td>', f'<td class="num">{scores_html(answer.get("scores"))}</td>',
             *(f'<td class="num">{number(values.get(t))}</td>' for t in terms),
             f'<td class="num">{number(answer.get("total"))}</td>',
             f'<td class="num">{number(answer.get("advantage"), sign=True)}</td>',
             f'<td class="num">{number(answer.get("length"), 0)}</td>']
    return f'<tr class="{" ".join(classes)}">' + "".join(cells) + "</tr>"


def group_html(group: dict, load_picture=None, cache=None) -> str:
    """One image of a logged step: its thumbnail, file, MOS and prompt beside a table of its answers."""
    answers = group.get("answers") or []
    terms = list(dict.fromkeys(k for a in answers for k in (a.get("terms") or {})))
    best, worst = extremes(answers)
    marks = {best: "best", worst: "worst"} if best is not None else {}
    path = group.get("file", "")
    side = [picture_html(path, load_picture, cache), f'<div title="{esc(path)}">{esc(os.path.basename(str(path)))}</div>',
            f"<div>MOS {number(group.get('mos'), 2)}</div>"]
    if best is None:
        side.append('<div class="flag">no spread: every answer has the same advantage</div>')
    if group.get("prompt"):
        side.append(f"<details><summary>prompt</summary><pre>{esc(group['prompt'])}</pre></details>")
    header = ("<tr><th>#</th><th>answer</th><th>aspect scores</th>"
              + "".join(f"<th>{esc(t).replace('_', '_<wbr>')}</th>" for t in terms) + "<th>total</th><th>advantage</th><th>tokens</th></tr>")
    rows = [answer_row(j, a, terms, marks.get(j, "")) for j, a in enumerate(answers)]
    return (f'<div class="group"><div class="side">{"".join(side)}</div>'
            f"<table>{header}{''.join(rows)}</table></div>")


def rollouts_html(rollouts: list[dict], load_picture=None) -> str:
    """The logged steps (MAX_STEPS of them, MAX_GROUPS groups each), or a note that none were logged."""
    if not rollouts:
        return '<p class="note">No answers were logged (rollouts.jsonl is absent or empty).</p>'
    steps, cache = chosen_steps(rollouts), {}
    parts = [f'<p class="note">{len(steps)} of {len(rollouts)} logged steps are shown (at most {MAX_STEPS}: the '
             f"first and last of each stage, then the newest), at most {MAX_GROUPS} images each. One row per "
             "answer; &#9650; best marks the highest advantage of a group, &#9660; worst the lowest. Go to step "
             + " &middot; ".join(f'<a href="#step-{esc(r.get("step"))}">{esc(r.get("step"))}</a>' for r in steps)
             + ".</p>"]
    for record in steps:
        groups = record.get("groups") or []
        shown = f" (first {MAX_GROUPS} of {len(groups)} images)" if len(groups) > MAX_GROUPS else ""
        parts.append(f'<section class="step" id="step-{esc(record.get("step"))}"><h3>step {esc(record.get("step"))} &middot; stage '
                     f'{esc(record.get("stage"))}{shown}</h3>')
        parts += [group_html(g, load_picture, cache) for g in groups[:MAX_GROUPS]]
        parts.append("</section>")
    return "\n".join(parts)


def curves_html(metrics: list[dict], evals: list[dict], eval_items: list[dict] | None) -> str:
    """Mean reward per step, held-out SRCC / PLCC per evaluation and the held-out scatter, side by side."""
    reward = chart({"mean reward": [(m.get("step"), m.get("reward")) for m in metrics]},
                   title="mean reward per step", x_label="step", y_label="reward", width=360, height=200)
    held_out = chart({key.upper(): [(e.get("step"), e.get(key)) for e in evals] for key in ("srcc", "plcc")},
                     title="held-out SRCC / PLCC", x_label="step", y_label="correlation", width=360, height=200)
    return f'<div class="charts">{reward}{held_out}<div>{held_out_scatter_html(evals, eval_items)}</div></div>'


def held_out_scatter_html(evals: list[dict], eval_items: list[dict] | None) -> str:
    """The latest evaluation's predictions against MOS, or a note that no per-item predictions were kept."""
    if not eval_items:
        return '<p class="note">Held-out scatter: no per-item predictions were kept<br>(eval_items.jsonl).</p>'
    points = [(i.get("prediction"), i.get("mos"), f"{i.get('file')}: MOS {number(i.get('mos'), 2)}, "
               f"predicted {number(i.get('prediction'), 2)}") for i in eval_items]
    unparsed = sum(not _is_number(i.get("prediction")) for i in eval_items)
    step = evals[-1].get("step") if evals else None
    title = "held-out predictions" + (f" at step {step}" if step is not None else "")
    return (chart({"item": points}, title=title, x_label="prediction", y_label="MOS", scatter=True, width=200, height=200)
            + f'<p class="note">{len(eval_items)} items, {unparsed} unparsed (left out);<br>dashed: prediction = MOS.</p>')


def training_page(metrics: list[dict], evals: list[dict], rollouts: list[dict], eval_items: list[dict] | None = None,
                  *, title: str = "run", load_picture=None) -> str:
    """The training report as HTML, from the already-read records of metrics.jsonl, eval.jsonl,
    rollouts.jsonl and (optional) eval_items.jsonl; load_picture(path) as in the module docstring."""
    latest = evals[-1] if evals else {}
    summary = (f"{len(metrics)} steps logged; latest held-out evaluation at step {esc(latest.get('step'))}: "
               f"SRCC {number(latest.get('srcc'))}, PLCC {number(latest.get('plcc'))}" if latest
               else f"{len(metrics)} steps logged; no held-out evaluation yet")
    return page(f"{title}: training report", [
        f"<h1>{esc(title)}: training report</h1>", f'<p class="note">{summary}.</p>',
        curves_html(metrics, evals, eval_items),
        "<h2>Answers, reward terms and advantages</h2>", rollouts_html(rollouts, load_picture)])


def write_training_page(folder, load_picture=None) -> Path:
    """Read the run folder's logs and write FOLDER/report.html; returns its path."""
    folder = Path(folder)
    logs = {name: read_jsonl(folder / f"{name}.jsonl") for name in ("metrics", "eval", "rollouts", "eval_items")}
    text = training_page(logs["metrics"], logs["eval"], logs["rollouts"], logs["eval_items"] or None,
                         title=folder.resolve().name, load_picture=load_picture)
    return write_page(folder / "report.html", text)


# --------------------------------------------------------------------------- the evaluation page

ROW_KEYS = ("path", "mos", "score", "parsed", "text")  # the other keys of a row are aspect scores
METRIC_KEYS = ("n", "srcc", "plcc", "krcc", "plcc_logistic4", "plcc_logistic5", "parse_failures", "unreadable")


def item_html(row: dict, load_picture=None) -> str:
    """One scored file: thumbnail, file, MOS, prediction, error and aspects beside the model's answer."""
    path, score, mos = row.get("path", ""), row.get("score"), row.get("mos")
    error = score - mos if _is_number(score) and _is_number(mos) else None
    aspects = [f"{esc(k)} {number(v, 2)}" for k, v in row.items() if k not in ROW_KEYS and v is not None]
    facts = [f"MOS {number(mos, 2)}", "prediction " + (number(score, 2) if row.get("parsed")
                                                       else '<span class="flag">unparsed</span>')]
    if error is not None:
        facts.append(f"error {number(error, 2, sign=True)}")
    side = [picture_html(path, load_picture), f'<div title="{esc(path)}">{esc(os.path.basename(str(path)))}</div>',
            *(f"<div>{f}</div>" for f in facts), f'<div class="aspects">{", ".join(aspects)}</div>' if aspects else ""]
    return f'<div class="item"><div class="side">{"".join(side)}</div>{answer_html(row.get("text"))}</div>'


def evaluation_page(name: str, metrics: dict, rows: list[dict], *, load_picture=None) -> str:
    """A labelled set's report as HTML: the correlations, prediction against MOS, the MAX_ERRORS largest
    errors |prediction - MOS| and the first MAX_FAILURES parse failures with their pictures and answers.
    metrics, rows: what evaluate.evaluate returns."""
    parsed = [r for r in rows if r.get("parsed") and _is_number(r.get("score"))]
    kept = {id(r) for r in parsed}
    failed = [r for r in rows if id(r) not in kept]
    errors = sorted(parsed, key=lambda r: -abs(r["score"] - r["mos"]) if _is_number(r.get("mos")) else 0)
    table = ("<table><tr>" + "".join(f"<th>{k}</th>" for k in METRIC_KEYS if k in metrics) + "</tr><tr>"
             + "".join(f'<td class="num">{number(metrics[k], 0 if isinstance(metrics[k], int) else 4)}</td>'
                       for k in METRIC_KEYS if k in metrics) + "</tr></table>")
    scatter = chart({"item": [(r["score"], r.get("mos"), f"{r.get('path')}: MOS {number(r.get('mos'), 2)}, "
                               f"predicted {number(r['score'], 2)}") for r in parsed]},
                    title=f"{name}: prediction against MOS", x_label="prediction", y_label="MOS",
                    scatter=True, width=420, height=420)
    body = [f"<h1>{esc(name)}: evaluation report</h1>",
            f'<p class="note">protocol {esc(metrics.get("protocol", "?"))}; {len(rows)} files read, '
            f"{len(parsed)} predictions parsed.</p>", table,
            "<h2>Prediction against MOS</h2>", scatter, '<p class="note">dashed: prediction = MOS.</p>',
            "<h2>Largest errors</h2>",
            f'<p class="note">The {min(MAX_ERRORS, len(errors))} largest of {len(errors)} errors |prediction - MOS|, '
            f"largest first, with the model's answer (at most {MAX_ERRORS} are shown).</p>",
            *(item_html(r, load_picture) for r in errors[:MAX_ERRORS]),
            "<h2>Parse failures</h2>",
            f'<p class="note">{len(failed)} answers could not be parsed'
            + (f"; the first {MAX_FAILURES} are shown" if len(failed) > MAX_FAILURES else "") + ".</p>",
            *(item_html(r, load_picture) for r in failed[:MAX_FAILURES])]
    return page(f"{name}: evaluation report", body)


def write_evaluation_page(path, name: str, metrics: dict, rows: list[dict], load_picture=None) -> Path:
    """Write `evaluation_page` to `path`; returns the path."""
    return write_page(path, evaluation_page(name, metrics, rows, load_picture=load_picture))
