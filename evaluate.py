"""Benchmark evaluation: score a labelled set with the trained judge, report SRCC/PLCC/KRCC.

Paper map (PreResQ-R1, arXiv 2511.05393: SRCC and PLCC on each test set):
- `correlations`: SRCC (scipy.stats.spearmanr), PLCC (pearsonr) and KRCC (kendalltau) between
  predicted scores and MOS, and PLCC after VQEG's 4- and 5-parameter logistic maps (`logistic4`,
  `logistic5`, `fit_logistic`): the paper's public code reports raw PLCC, DeQA-Score and many IQA
  papers fit a logistic first. Always named: `plcc` (raw), `plcc_logistic4`, `plcc_logistic5`.
- `evaluate`: every item is judged by `preresq.judge`. Protocol "ours" (default): the training
  parser's aspect mean of a greedy answer (or of K sampled ones), 256 tokens. Protocol "authors",
  as their inference scripts (support/authors_protocol.py): their prompt, one answer sampled with
  top_k 50, top_p 1, up to 512 tokens and the checkpoint's temperature and repetition penalty; an
  image scores the first number of the last answer, a video the mean of its numbers.
reports.py writes summary.json (adding to an earlier one), predictions-<set>.csv, scatter-<set>.png
and the table; report_page.py writes report-<set>.html (the scatter, the largest errors, parse failures).

Deliberate deviations from the authors' evaluation code:
- An answer that cannot be parsed is counted (`parse_failures`) and left out of the
  correlations; the authors' script substitutes a random integer 1..5 for it.
- Under "authors", special and vision tokens are still suppressed while sampling (their script
  suppresses none) and videos are shown as this project's views (video.py; their frames are
  pre-extracted PNGs, extraction unreleased).
- The logistic fits are bounded to increase with the prediction: a free fit turns over for
  predictions that run against the MOS and reports a strong positive PLCC (+0.97 for SRCC -0.96).
- An unreadable file is counted (`unreadable`), warned about with its path, and skipped.
- Constant predictions, or fewer than 3 scored items, give NaN correlations (two points always
  correlate perfectly): NaN in the table, null in summary.json, never 0. A logistic fit that
  fails or comes out flat reports raw PLCC instead, and `logistic_note` says why.

    python evaluate.py --model tiny --data synthetic                  # synthetic test split
    python evaluate.py --model runs/kadid/final --data koniq,spaq \
        --data-root ~/iqa/koniq10k,~/iqa/SPAQ --split all --samples 8     # or: --protocol authors
"""

import math
import sys
import warnings

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from support import cli
from support.authors_protocol import (AUTHORS_IMAGE_PROMPT, AUTHORS_VIDEO_PROMPT, authors_decoding, authors_label,
                                      authors_score)
import data
import preresq

MIN_ITEMS = 3  # fewer scored items than this: every correlation is NaN

# --------------------------------------------------------------------------- metrics

def logistic4(x, b1, b2, b3, b4):
    """VQEG 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2.

    x: (N,) predicted scores -> (N,) on the MOS scale. b1, b2: upper and lower asymptotes
    (increasing when b1 >= b2), b3 the midpoint, |b4| the width. expit cannot overflow exp.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return (b1 - b2) * scipy.special.expit((np.asarray(x, float) - b3) / abs(b4)) + b2


def logistic5(x, b1, b2, b3, b4, b5):
    """VQEG 5-parameter logistic: b1 (0.5 - 1 / (1 + exp(b2 (x - b3)))) + b4 x + b5.

    x: (N,) -> (N,). A logistic of height b1 and slope b2 at b3 plus a linear term: increasing
    when b1, b2, b4 >= 0. 1 / (1 + exp(z)) is written expit(-z), which cannot overflow.
    """
    x = np.asarray(x, float)
    return b1 * (0.5 - scipy.special.expit(-b2 * (x - b3))) + b4 * x + b5


def fit_logistic(x, y, parameters=4):
    """Least-squares fit of `logistic4` (parameters=4) or `logistic5` (5) mapping x onto y.

    x: predictions (N,), y: MOS (N,). Bounds keep the map increasing: b1 - b2 >= 0, b4 > 0 for
    logistic4 (fitted as b1 - b2, b2, b3, b4); b1, b2, b4 >= 0 for logistic5. curve_fit
    (maxfev=10000) starts from [max y, min y, mean x, std x / 4], the usual start in IQA papers,
    or [max y - min y, 4 / std x, mean x, 0, mean y]. Returns the parameters, an array (4,) or
    (5,); raises RuntimeError with the reason when no fit can be made.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) <= parameters:
        raise RuntimeError(f"logistic fit needs more than {parameters} points, got {len(x)}")
    if np.ptp(x) == 0:
        raise RuntimeError("logistic fit impossible: the predictions are constant")
    inf = np.inf
    if parameters == 4:
        f = lambda v, height, b2, b3, b4: logistic4(v, b2 + height, b2, b3, b4)  # noqa: E731
        b0, lower = [np.ptp(y), y.min(), x.mean(), x.std() / 4], [0, -inf, -inf, 0]
    else:
        f, b0, lower = logistic5, [np.ptp(y), 4 / x.std(), x.mean(), 0, y.mean()], [0, 0, -inf, 0, -inf]
    with warnings.catch_warnings():
        # OptimizeWarning only says the covariance could not be estimated; we do not use it.
        warnings.simplefilter("ignore", scipy.optimize.OptimizeWarning)
        try:
            params, _ = scipy.optimize.curve_fit(f, x, y, p0=b0, bounds=(lower, inf), maxfev=10000)
        except (RuntimeError, ValueError, TypeError) as err:
            raise RuntimeError(f"logistic fit failed: {err}") from err
    if not np.all(np.isfinite(params)):
        raise RuntimeError(f"logistic fit failed: non-finite parameters {params.tolist()}")
    return params + np.array([params[1], 0, 0, 0]) if parameters == 4 else params


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


def correlations(pred, mos):
    """Agreement between predicted scores and MOS.

    pred, mos: sequences of N finite floats. Returns a dict:
      srcc, plcc, krcc       - scipy's Spearman, Pearson (raw) and Kendall (tau-b) statistics;
      plcc_logistic4, _5     - Pearson between logistic4/5(pred) and mos after `fit_logistic`,
                               or raw PLCC when that fit fails or is flat (an increasing map
                               of predictions that run against the MOS is best flat);
      logistic4_params, 5_   - the fitted [b1, ...], or None when raw PLCC stands in;
      logistic_note          - "" when both fits succeeded, else why raw PLCC stands in.
    Every correlation is NaN for constant inputs or fewer than MIN_ITEMS items.
    """
    pred, mos = np.asarray(pred, float).ravel(), np.asarray(mos, float).ravel()
    if len(pred) != len(mos):
        raise ValueError(f"correlations: {len(pred)} predictions but {len(mos)} MOS values; "
                         "pass one prediction per item")
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(mos))):
        raise ValueError("correlations: NaN or inf among the inputs; leave unparsed predictions out")
    srcc, plcc, krcc = _raw_correlations(pred, mos)
    result, notes = dict(srcc=srcc, plcc=plcc, krcc=krcc), []
    for k, curve in ((4, logistic4), (5, logistic5)):
        result[f"plcc_logistic{k}"], result[f"logistic{k}_params"] = plcc, None
        if math.isnan(plcc):
            continue
        try:
            params = fit_logistic(pred, mos, k)
        except RuntimeError as err:
            notes.append(f"{k}-parameter {err}; raw PLCC reported instead")
            continue
        fitted = curve(pred, *params)
        if np.ptp(fitted) <= 1e-6 * np.ptp(mos):
            notes.append(f"{k}-parameter logistic fit is flat over the data; raw PLCC reported instead")
            continue
        result[f"plcc_logistic{k}"] = _raw_correlations(fitted, mos)[1]
        result[f"logistic{k}_params"] = [float(b) for b in params]
    result["logistic_note"] = ("correlations undefined (constant input or too few items)"
                               if math.isnan(plcc) else "; ".join(notes))
    return result


def fitted_curve(metrics):
    """The fitted increasing logistic4 of `metrics` as a function of predictions, or None."""
    params = metrics["logistic4_params"]
    return None if params is None else lambda x: logistic4(x, *params)


# --------------------------------------------------------------------------- scoring a labelled set

def _row(item, judgement, aspect_names, protocol):
    if protocol == "authors":
        score, aspects = authors_score(judgement.texts[0], video=item.is_video), None
    else:
        score, aspects = judgement.score, judgement.aspects
    return dict(path=item.path, mos=item.mos, score=score,
                **dict(zip(aspect_names, aspects or [None] * len(aspect_names))),
                parsed=score is not None, text="\n---\n".join(judgement.texts))


def _protocol(model, protocol, decoding):
    """(judge's decoding settings, {video: judge's prompt settings}) of a protocol; ValueError for a
    protocol that is not known or for decoding settings given to "authors", which fixes them."""
    if protocol not in ("ours", "authors"):
        raise ValueError(f"evaluate: protocol must be 'ours' or 'authors', got {protocol!r}")
    if protocol == "ours":
        return decoding, {False: {}, True: {}}
    if decoding != dict(samples=None, temperature=1.0, top_k=0, max_new_tokens=None):
        raise ValueError("evaluate: protocol 'authors' fixes the decoding (authors_decoding); "
                         "leave samples, temperature, top_k and max_new_tokens unset")
    return authors_decoding(model.generation_config), {
        video: dict(prompt=AUTHORS_VIDEO_PROMPT if video else AUTHORS_IMAGE_PROMPT, labels=authors_label)
        for video in (False, True)}


def evaluate(model, tokenizer, image_processor, items, *, protocol="ours", samples=None, temperature=1.0,
             top_k=0, seed=0, batch_size=8, max_new_tokens=None, max_pixels=None, progress=True, warn=None,
             all_finished=None):
    """Score `items` (list of data.Item) with the judge and correlate the scores with MOS.

    Items are read with data.read_visual and judged `batch_size` at a time (the batch starting at
    item i uses seed + i: the same seed and batch size give the same numbers). Protocol "ours":
    the training parser's aspect mean of a greedy answer (samples=None) or of K answers sampled
    at `temperature` and `top_k` (0: all tokens). "authors": `authors_score` of one answer to their
    prompt, decoded as `authors_decoding(model.generation_config)` (then leave samples, temperature,
    top_k, max_new_tokens unset). Unreadable
    files and unparsed answers are counted, never given a score; warn(message) is told of each such
    file (default: a cli.Warnings, a counted line on stderr). all_finished: a sharded
    preresq.Policy's, whose processes judge in step.

    Returns (metrics, rows): metrics = dict(protocol, n, `correlations`' keys, parse_failures,
    unreadable), where n counts the parsed predictions the correlations use; rows = one dict per
    readable item, in item order: path, mos, score (None if unparsed), one key per aspect (None
    under "authors"), parsed (bool), text (the answers, joined by "\\n---\\n" when several).
    """
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be at least 1, got {batch_size}")
    decoding, prompts = _protocol(model, protocol, dict(samples=samples, temperature=temperature, top_k=top_k,
                                                        max_new_tokens=max_new_tokens))
    warn, rows, unreadable = warn or cli.Warnings("evaluate"), [], 0
    bar = cli.bar(total=len(items), desc=items[0].dataset if items else "evaluate", unit="item", show=progress)
    for start in range(0, len(items), batch_size):
        readable = []
        for item in items[start:start + batch_size]:
            try:
                readable.append((item, data.read_visual(item.path, max_pixels=max_pixels)))
            except data.DataError as err:
                unreadable += 1
                warn(f"skipped: {err}")
        judged = {}
        # Images and videos get different prompts, so each kind is judged in its own call.
        for video, aspect_names in ((False, preresq.IMAGE_ASPECTS), (True, preresq.VIDEO_ASPECTS)):
            group = [(k, item, visual) for k, (item, visual) in enumerate(readable)
                     if item.is_video == video]
            if group:
                judgements = preresq.judge(model, tokenizer, image_processor, [v for _, _, v in group],
                                           video=video, seed=seed + start, batch_size=batch_size, **decoding,
                                           **prompts[video], all_finished=all_finished)
                judged.update((k, _row(item, j, aspect_names, protocol))
                              for (k, item, _), j in zip(group, judgements))
        rows.extend(judged[k] for k in sorted(judged))
        bar.update(min(batch_size, len(items) - start))
    bar.close()
    parsed = [r for r in rows if r["parsed"]]
    metrics = dict(protocol=protocol, n=len(parsed),
                   **correlations([r["score"] for r in parsed], [r["mos"] for r in parsed]),
                   parse_failures=len(rows) - len(parsed), unreadable=unreadable)
    return metrics, rows


# --------------------------------------------------------------------------- command line

def default_split(name):
    """"test" for sets with a prescribed test split (official, or KADID's by reference), else "all". Our
    choice: the authors' GT_KonIQ.txt holds all 10,073 KonIQ images (pass "all" to test as they did).
    Sets without a prescribed split only have data.py's seeded 80/20 split, which no number uses."""
    return "test" if data.DATASETS[name].split in ("official", "kadid") else "all"


def parse_args(argv=None):
    p = cli.parser("evaluate.py", "Score labelled image/video sets with a PreResQ model and report SRCC, PLCC "
                   "and KRCC.")
    cli.add_model_flags(p, "preset (tiny, small), checkpoint folder or hub id", "tiny")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="comma-separated dataset names, from: " + ", ".join(data.DATASETS))
    g.add_argument("--data-root", help="one folder per set, comma-separated in the order of --data (empty: synthetic)")
    g.add_argument("--labels", help="label file(s) for the 'labels' set(s): 'name mos [std]', "
                   "'ref dist mos', 'path, mos' or a training jsonl")
    g.add_argument("--split", help="one split for every set, or one per set, comma-separated "
                   "(default: 'test' for sets with a prescribed test split, else 'all')")
    g.add_argument("--max-pixels", type=int, help="downscale larger images to this many pixels")
    g = p.add_argument_group("decoding")
    g.add_argument("--protocol", choices=("ours", "authors"), default="ours",
                   help="ours: aspect mean of a greedy answer (or --samples K), 256 tokens; authors: as "
                   "their inference scripts, their prompt and one answer sampled at top_k 50, top_p 1, 512 tokens, "
                   "temperature and repetition penalty from the checkpoint's generation_config.json; an image "
                   "scores the answer's first number, a video the mean of its numbers (what still differs: "
                   "docs/evaluation.md)")
    g.add_argument("--samples", type=int, help="average K sampled answers (default: greedy)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default: 1.0)")
    g.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: 0, all)")
    g.add_argument("--max-new-tokens", type=int, help="answer length limit (default: 256)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled answers")
    g.add_argument("--batch-size", type=int, default=8, help="items judged at once")
    p.add_argument("--out", default="eval", help="folder for summary.json, CSVs, scatter plots and HTML reports")
    args = p.parse_args(argv)
    args.names = [n.strip() for n in args.data.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in data.DATASETS]
    if not args.names or unknown:
        p.error(f"--data: unknown dataset(s) {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(data.DATASETS)}")
    if args.temperature is not None and args.temperature <= 0:
        p.error(f"--temperature must be positive, got {args.temperature}")
    cli.at_least(p, args, samples=1, top_k=0, batch_size=1, max_new_tokens=1, max_pixels=1)
    args.decoding = {k: getattr(args, k) for k in ("samples", "temperature", "top_k", "max_new_tokens")
                     if getattr(args, k) is not None}
    if args.protocol == "authors" and args.decoding:
        p.error("--protocol authors fixes the decoding (one answer sampled at top_k 50, top_p 1, 512 tokens, "
                "temperature and repetition penalty from the checkpoint's generation_config.json): drop --"
                + ", --".join(k.replace("_", "-") for k in args.decoding))
    try:
        args.sets = data.pair_sets(args.data, args.data_root, args.labels)
    except data.DataError as err:
        p.error(str(err))
    splits = [x.strip() for x in args.split.split(",")] if args.split else [None]
    if len(splits) not in (1, len(args.names)):
        p.error(f"--split gives {len(splits)} splits for {len(args.names)} sets; give one for "
                "all of them or one per set, in the order of --data")
    splits = splits if len(splits) > 1 else splits * len(args.names)
    args.splits = [split or default_split(name) for name, split in zip(args.names, splits)]
    return args


def load_sets(args):
    """{set name: items} of every --data set (name-split unless the split is "all"); DataError for a
    missing folder, a bad label row, an empty or repeated set."""
    sets = {}
    for (name, root, labels), split in zip(args.sets, args.splits):
        items = data.load_dataset(name, root, split, labels=labels)
        if not items:
            raise data.DataError(f"{name} ({split} split) has no items; check --data-root, --labels and --split")
        key = items[0].dataset if split == "all" else f"{items[0].dataset}-{split}"
        if key in sets:
            raise data.DataError(f"{key} appears twice in --data")
        sets[key] = items
    return sets


def command(argv=None):
    from harness import presets, report_page, reports  # what drives the evaluation comes in here

    args = parse_args(argv)
    # Everything is checked before anything is made: the device, where the model is, the output
    # folder, then the data (the synthetic sets are generated); the preset is built last.
    cli.check_device(args.device)
    model_line = presets.describe_model(args.model)
    out = cli.check_out(args.out)
    cli.check_apart(out, presets.model_folder(args.model))
    earlier = reports.read_summary(out / "summary.json")  # an earlier call's sets are kept
    sets = load_sets(args)
    print(model_line, file=sys.stderr)
    model, tokenizer, image_processor = preresq.load_model(presets.model_path(args.model), args.device, args.dtype)
    cli.make_out(out)
    decoding = authors_decoding(model.generation_config) if args.protocol == "authors" else ", ".join(
        ["greedy" if args.samples is None else f"{args.samples} sampled answers averaged"]
        + [f"{k} {v}" for k, v in args.decoding.items() if k != "samples"])
    print(f"protocol {args.protocol}; decoding {decoding}; seed {args.seed}", file=sys.stderr)
    summary, warn = {}, cli.Warnings("evaluate.py")
    for name, items in sets.items():
        metrics, rows = evaluate(model, tokenizer, image_processor, items, protocol=args.protocol, seed=args.seed,
                                 batch_size=args.batch_size, max_pixels=args.max_pixels, warn=warn, **args.decoding)
        summary[name] = metrics
        # the numbers first, each set's as soon as it is scored; a set of an earlier call keeps its entry
        reports.write_summary(out / "summary.json", {**earlier, **summary})
        reports.write_dataset_files(out, name, metrics, rows, fitted_curve(metrics))
        report_page.write_evaluation_page(out / f"report-{name}.html", name, metrics, rows, data.read_visual)
        if metrics["logistic_note"]:
            print(f"{name}: {metrics['logistic_note']}", file=sys.stderr)
    print(reports.format_table(summary))
    kept = [name for name in earlier if name not in summary]
    if kept:
        print(f"summary.json also keeps the earlier results of {', '.join(kept)}", file=sys.stderr)
    warn.summary("unreadable files skipped (counted as unreadable)")
    print(f"files in {out}/: summary.json, predictions-<set>.csv, scatter-<set>.png, report-<set>.html",
          file=sys.stderr)


def main(argv=None):
    """`python evaluate.py --model M --data SETS`: exit 0 with the table printed, 2 for bad usage or input
    (nothing is created), 1 when the work fails part way, 130 on Ctrl-C."""
    return cli.entry("evaluate.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
