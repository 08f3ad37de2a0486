"""What evaluate.py writes and prints: summary.json, predictions-<set>.csv, scatter-<set>.png, the table;
and what preresq.py prints for each file it scores.

    write_summary(path, {set: metrics})                   # strict JSON, NaN written as null
    write_dataset_files(out, set, metrics, rows, curve)   # the predictions CSV and the scatter plot
    format_table({set: metrics})                          # the text table evaluate.py prints
    judgement_text(path, judgement, aspect_names)         # one file's score, aspects and answer

`metrics` and `rows` are what evaluate.evaluate returns; `curve` is a function of an array of
predicted scores (evaluate.fitted_curve(metrics)), drawn over the scatter, or None.
"""
import csv
import json
import math
import os

from harness import plots
from support import files

SUMMARY_KEYS = ("protocol", "n", "srcc", "plcc", "krcc", "plcc_logistic4", "plcc_logistic5",
                "parse_failures", "unreadable", "logistic4_params", "logistic5_params", "logistic_note")
TABLE_COLUMNS = (("SRCC", "srcc"), ("PLCC raw", "plcc"), ("KRCC", "krcc"),
                 ("PLCC logistic4", "plcc_logistic4"), ("PLCC logistic5", "plcc_logistic5"))
TABLE_NOTE = ("PLCC raw: Pearson on the scores as predicted; PLCC logistic4 / logistic5: after the "
              "increasing 4-parameter / VQEG 5-parameter logistic fit.")


def _json_number(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def _number(v, digits=4):
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_summary(path, summary):
    """summary: {dataset: metrics}. Writes strict JSON; an undefined (NaN) correlation is null."""
    clean = {name: {k: _json_number(m[k]) for k in SUMMARY_KEYS if k in m}
             for name, m in summary.items()}
    files.write_file(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


def read_summary(path):
    """An existing summary.json as {dataset: metrics} ({} when there is none), so that a new call adds
    to it; InputError when it cannot be read, before any work: it is never written over."""
    from support.cli import InputError

    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        if not isinstance(summary, dict) or not all(isinstance(m, dict) for m in summary.values()):
            raise ValueError("not a {set: metrics} object")
    except (OSError, ValueError) as e:
        raise InputError(f"{path} cannot be read ({e}); it would be written over. Move it away, or choose "
                         "another --out.") from None
    return summary


def write_predictions(path, rows):
    """One CSV line per row of evaluate.evaluate: path, mos, score, aspects..., parsed (yes/no), text.

    Unparsed predictions have an empty score. Columns follow the first row's keys.
    """
    columns = list(rows[0]) if rows else ["path", "mos", "score", "parsed", "text"]
    with files.atomic_file(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("yes" if r[k] else "no") if k == "parsed"
                             else ("" if r[k] is None else r[k]) for k in columns})


def write_dataset_files(out_dir, name, metrics, rows, curve=None,
                        curve_label="4-parameter logistic fit (increasing)"):
    """Write OUT_DIR/predictions-<name>.csv and OUT_DIR/scatter-<name>.png for one dataset."""
    write_predictions(os.path.join(out_dir, f"predictions-{name}.csv"), rows)
    parsed = [r for r in rows if r["parsed"]]
    plcc = " / ".join(_number(metrics[k], 3) for k in ("plcc", "plcc_logistic4", "plcc_logistic5"))
    title = f"{name}   n={metrics['n']}   SRCC {_number(metrics['srcc'], 3)}   PLCC raw/log4/log5 {plcc}"
    plots.draw_scatter(os.path.join(out_dir, f"scatter-{name}.png"), [r["score"] for r in parsed],
                       [r["mos"] for r in parsed], curve, title=title, curve_label=curve_label)


def format_table(summary):
    """One text table: dataset, n, SRCC, PLCC raw, KRCC, PLCC logistic4/5, parse failures, unreadable.

    summary: {dataset: metrics} as returned by evaluate or read back from summary.json
    (where NaN is null); undefined values print as "nan". A note under it says which PLCC is which.
    """
    header = ("dataset", "n", *(title for title, _ in TABLE_COLUMNS), "parse failures", "unreadable")
    lines = [header] + [
        (name, str(m["n"]), *(_number(m[key]) for _, key in TABLE_COLUMNS),
         str(m["parse_failures"]), str(m.get("unreadable", 0)))
        for name, m in summary.items()]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                      for c, (cell, w) in enumerate(zip(line, widths))) for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text + [TABLE_NOTE])


def judgement_text(path, judgement, aspect_names, as_json=False):
    """What preresq.py prints for one file: a JSON object, or the score, the aspect scores and the answer."""
    j = judgement
    aspects = dict(zip(aspect_names, j.aspects)) if j.aspects else None
    if as_json:
        return json.dumps({"file": path, "score": j.score, "aspects": aspects, "parsed": j.parsed, "answers": j.texts})
    if j.score is None:
        return f"{path}: no parsable answer (the model did not answer in the expected format)\n  {j.texts[0]!r}"
    return (f"{path}: score {j.score:.2f}  " + "  ".join(f"{k} {v:.2f}" for k, v in aspects.items())
            + f"\n  {j.texts[0].strip()}")
