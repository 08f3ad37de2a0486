"""evaluate.py: metrics against scipy, the logistic fits, both protocols; plots.py and reports.py: the
figures, the files and the table."""

import csv
import json
import math
import os
import shutil
import types
import warnings

import numpy as np
import pytest
import scipy.ndimage
import scipy.optimize
import scipy.stats
import torch
from PIL import Image
from transformers import GenerationConfig

import data
import evaluate
from harness import plots
import preresq
from harness import presets
from harness import reports

# ---------------------------------------------------------------------------------------
# correlations
# ---------------------------------------------------------------------------------------


def test_correlations_equal_scipy_on_the_same_vectors():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 300)
    # Rounded predictions give ties, which is where Kendall's tau-b and Spearman differ
    # from the naive formulas.
    pred = np.round(mos + rng.normal(0, 0.8, 300), 1)
    got = evaluate.correlations(pred, mos)
    assert got["srcc"] == pytest.approx(scipy.stats.spearmanr(pred, mos).statistic, abs=1e-12)
    assert got["plcc"] == pytest.approx(scipy.stats.pearsonr(pred, mos).statistic, abs=1e-12)
    assert got["krcc"] == pytest.approx(scipy.stats.kendalltau(pred, mos).statistic, abs=1e-12)
    fitted = evaluate.logistic4(pred, *got["logistic4_params"])
    assert got["plcc_logistic4"] == pytest.approx(
        scipy.stats.pearsonr(fitted, mos).statistic, abs=1e-12)
    fitted = evaluate.logistic5(pred, *got["logistic5_params"])
    assert got["plcc_logistic5"] == pytest.approx(
        scipy.stats.pearsonr(fitted, mos).statistic, abs=1e-12)
    assert got["logistic_note"] == ""


def test_logistic4_hand_worked_values():
    b = (4.0, 1.0, 3.0, 0.5)
    assert evaluate.logistic4(3.0, *b) == pytest.approx(2.5)  # midpoint: (b1 + b2) / 2
    # (4 - 1) / (1 + e^-2) + 1
    assert evaluate.logistic4(4.0, *b) == pytest.approx(3 / (1 + math.exp(-2)) + 1)
    # |b4|: the sign of the width does not matter; far tails reach the asymptotes without overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = evaluate.logistic4(np.array([-1e6, 1e6]), 4.0, 1.0, 3.0, -0.5)
    assert far.tolist() == pytest.approx([1.0, 4.0])


def test_logistic_fit_recovers_known_parameters():
    rng = np.random.default_rng(1)
    true = np.array([4.6, 1.3, 3.1, 0.45])
    x = rng.uniform(1, 5, 400)
    y = evaluate.logistic4(x, *true) + rng.normal(0, 0.02, 400)
    params = evaluate.fit_logistic(x, y)
    params[3] = abs(params[3])
    assert params == pytest.approx(true, rel=0.03)


def test_logistic_fit_improves_plcc_on_a_saturating_relation():
    x = np.linspace(0, 10, 200)
    mos = evaluate.logistic4(x, 5.0, 1.0, 5.0, 0.5)
    got = evaluate.correlations(x, mos)
    assert got["plcc"] < 0.95
    assert got["plcc_logistic4"] == pytest.approx(1.0, abs=1e-6)
    assert got["plcc_logistic5"] > got["plcc"]


def test_negated_predictions_never_get_a_strong_positive_logistic_plcc():
    """An unbounded 4-parameter fit turns over (b1 < b2) and reported PLCC +0.97 here for an
    SRCC of -0.96; the fits are increasing maps, so predictions against the MOS stay negative."""
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 200)
    pred = -(mos + rng.normal(0, 0.3, 200))
    got = evaluate.correlations(pred, mos)
    assert got["srcc"] < -0.9 and got["plcc"] < -0.9
    assert got["plcc_logistic4"] <= 1e-9 and got["plcc_logistic5"] <= 1e-9
    xs = np.linspace(pred.min(), pred.max(), 400)
    for parameters, curve in ((4, evaluate.logistic4), (5, evaluate.logistic5)):
        fitted = curve(xs, *evaluate.fit_logistic(pred, mos, parameters))
        assert np.all(np.diff(fitted) >= -1e-12), parameters  # never decreasing


@pytest.mark.parametrize("parameters", [4, 5])
def test_increasing_fits_still_recover_a_monotone_relation(parameters):
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 10, 300)
    for mos in (evaluate.logistic4(x, 4.8, 1.2, 5.0, 1.0), evaluate.logistic5(x, 3.0, 1.5, 5.0, 0.05, 2.5)):
        mos = mos + rng.normal(0, 0.03, 300)
        got = evaluate.correlations(x, mos)
        assert got[f"plcc_logistic{parameters}"] > max(0.99, got["plcc"])
        # the scale and offset of the predictions do not matter
        again = evaluate.correlations(10 * x + 3, mos)
        assert again[f"plcc_logistic{parameters}"] == pytest.approx(got[f"plcc_logistic{parameters}"], abs=1e-4)


def test_logistic5_hand_worked_values():
    b = (2.0, 1.5, 3.0, 0.25, 1.0)
    assert evaluate.logistic5(3.0, *b) == pytest.approx(0.25 * 3 + 1.0)  # midpoint: the logistic is 0
    # 2 (0.5 - 1 / (1 + e^1.5)) + 0.25 * 4 + 1
    assert evaluate.logistic5(4.0, *b) == pytest.approx(2 * (0.5 - 1 / (1 + math.exp(1.5))) + 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = evaluate.logistic5(np.array([-1e6, 1e6]), 2.0, 1.5, 3.0, 0.0, 1.0)
    assert far.tolist() == pytest.approx([0.0, 2.0])


def test_constant_predictions_get_no_logistic_plcc_and_no_crash():
    mos = np.linspace(1, 5, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = evaluate.correlations([2.5] * 20, mos)
    assert math.isnan(got["plcc_logistic4"]) and math.isnan(got["plcc_logistic5"])
    assert got["logistic4_params"] is None and got["logistic5_params"] is None
    for parameters in (4, 5):
        with pytest.raises(RuntimeError, match="constant"):
            evaluate.fit_logistic([2.5] * 20, mos, parameters)


def test_too_few_points_for_the_fit_fall_back_to_raw_plcc_with_a_note():
    pred, mos = [1.0, 2.0, 3.5, 3.0], [1.2, 2.5, 3.1, 4.0]
    got = evaluate.correlations(pred, mos)
    assert got["plcc"] == pytest.approx(scipy.stats.pearsonr(pred, mos).statistic)
    assert got["plcc_logistic4"] == got["plcc_logistic5"] == got["plcc"]
    assert got["logistic4_params"] is None and got["logistic5_params"] is None
    assert "more than 4 points" in got["logistic_note"]
    assert "raw PLCC" in got["logistic_note"]


def test_failing_fit_falls_back_to_raw_plcc_with_the_reason(monkeypatch):
    def no_convergence(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found: Number of calls to function has "
                           "reached maxfev = 10000.")

    monkeypatch.setattr(scipy.optimize, "curve_fit", no_convergence)
    rng = np.random.default_rng(2)
    mos = rng.uniform(1, 5, 50)
    pred = mos + rng.normal(0, 0.5, 50)
    got = evaluate.correlations(pred, mos)
    assert got["plcc_logistic4"] == got["plcc_logistic5"] == got["plcc"] == pytest.approx(
        scipy.stats.pearsonr(pred, mos).statistic)
    assert got["logistic4_params"] is None and got["logistic5_params"] is None
    assert "maxfev" in got["logistic_note"] and "raw PLCC" in got["logistic_note"]


@pytest.mark.parametrize("pred, mos", [
    ([3.0] * 10, list(np.linspace(1, 5, 10))),  # constant predictions
    (list(np.linspace(1, 5, 10)), [2.0] * 10),  # constant MOS
    ([1.0, 2.0], [1.0, 3.0]),                   # too short: two points always correlate
    ([], []),
])
def test_undefined_correlations_are_nan_without_warnings(pred, mos):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = evaluate.correlations(pred, mos)
    for key in ("srcc", "plcc", "krcc", "plcc_logistic4", "plcc_logistic5"):
        assert math.isnan(got[key]), key
    assert got["logistic4_params"] is None and got["logistic5_params"] is None and got["logistic_note"]


def test_bad_inputs_are_refused_with_a_message():
    with pytest.raises(ValueError, match="3 predictions but 2 MOS"):
        evaluate.correlations([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="unparsed"):
        evaluate.correlations([1.0, math.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])


# ---------------------------------------------------------------------------------------
# figures (plots.py)
# ---------------------------------------------------------------------------------------


def _blobs(img, colour):
    """Connected regions of exactly `colour`, as a list of (centre_x, centre_y)."""
    mask = np.all(np.asarray(img) == colour, axis=-1)
    labels, count = scipy.ndimage.label(mask)
    centres = scipy.ndimage.center_of_mass(mask, labels, range(1, count + 1))
    return [(x, y) for y, x in centres]


def test_scatter_png_has_one_dot_per_point_where_the_data_put_it(tmp_path):
    path = tmp_path / "scatter.png"
    pred, mos = [1.0, 3.0, 5.0], [4.5, 1.0, 3.0]
    plots.draw_scatter(path, pred, mos, title="toy")
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (640, 480)
    dots = sorted(_blobs(img.convert("RGB"), plots.PALETTE[0]))
    assert len(dots) == 3
    # left to right follows pred; image y grows downwards, so higher MOS is higher up
    ys = [y for _, y in dots]
    assert ys[0] < ys[2] < ys[1]
    # no curve without parameters
    assert not _blobs(img.convert("RGB"), plots.PALETTE[3])


def test_scatter_draws_the_logistic_curve(tmp_path):
    rng = np.random.default_rng(3)
    pred = rng.uniform(1, 5, 100)
    mos = evaluate.logistic4(pred, 4.8, 1.2, 3.0, 0.5) + rng.normal(0, 0.1, 100)
    got = evaluate.correlations(pred, mos)
    path = tmp_path / "scatter.png"
    plots.draw_scatter(path, pred, mos, evaluate.fitted_curve(got), size=(500, 400))
    img = Image.open(path).convert("RGB")
    assert img.size == (500, 400)
    red = np.all(np.asarray(img) == plots.PALETTE[3], axis=-1)
    # the curve spans most of the plot's width
    columns = np.flatnonzero(red.any(axis=0))
    assert columns.max() - columns.min() > 0.7 * 500


def test_scatter_of_nothing_still_draws_axes(tmp_path):
    path = tmp_path / "empty.png"
    plots.draw_scatter(path, [], [], title="all unparsed")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert (img != plots.BACKGROUND).any()


def test_curves_put_reward_above_correlations_and_skip_nan(tmp_path):
    path = tmp_path / "curves.png"
    steps = range(0, 50, 5)
    series = {"mean reward": [(s, 0.5 + 0.01 * s) for s in steps],
              "held-out SRCC": [(0, math.nan)] + [(s, 0.015 * s) for s in steps[1:]],
              "held-out PLCC": [(s, 0.014 * s) for s in steps]}
    plots.draw_curves(path, series, title="demo")
    img = Image.open(path).convert("RGB")
    assert img.size == (720, 560)
    arr = np.asarray(img)
    for k, upper in ((0, True), (1, False), (2, False)):
        rows = np.flatnonzero(np.all(arr == plots.PALETTE[k], axis=-1).any(axis=1))
        assert len(rows), k
        assert (rows.max() < 280) if upper else (rows.min() > 280), k


def test_curves_with_only_correlations_use_one_panel(tmp_path):
    path = tmp_path / "curves.png"
    plots.draw_curves(path, {"SRCC": [(0, 0.1), (10, 0.6)]}, size=(400, 300))
    arr = np.asarray(Image.open(path).convert("RGB"))
    rows = np.flatnonzero(np.all(arr == plots.PALETTE[0], axis=-1).any(axis=1))
    assert rows.min() < 150 < rows.max()  # the one panel fills the height
    with pytest.raises(ValueError, match="no series"):
        plots.draw_curves(path, {})


@pytest.mark.parametrize("lo, hi, expected", [
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (0.8, 5.2, [1.0, 2.0, 3.0, 4.0, 5.0]),
    (-1.0, 1.0, [-1.0, -0.5, 0.0, 0.5, 1.0]),
    (0.0, 123.0, [0.0, 25.0, 50.0, 75.0, 100.0]),
])
def test_nice_ticks(lo, hi, expected):
    assert plots._nice_ticks(lo, hi) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------
# evaluate() with a stand-in judge, the files and the table
# ---------------------------------------------------------------------------------------

UNPARSABLE_RED = 7  # the stand-in judge cannot parse its answer for images this red


def _fake_judge(calls):
    """A judge whose score is read off the image (red / 50), and unparsed for one colour."""

    def judge(model, tokenizer, image_processor, visuals, *, video=False, samples=None,
              temperature=1.0, top_k=0, max_new_tokens=None, seed=0, batch_size=8, progress=False, all_finished=None):
        calls.append(dict(n=len(visuals), video=video, samples=samples, seed=seed,
                          temperature=temperature))
        out = []
        for visual in visuals:
            red = visual.getpixel((0, 0))[0]
            if red == UNPARSABLE_RED:
                out.append(preresq.Judgement(score=None, aspects=None,
                                             texts=["<think>hmm</think>no answer"], parsed=0))
            else:
                score = red / 50
                out.append(preresq.Judgement(score=score, aspects=[score] * 5,
                                             texts=[f"<answer>{score}</answer>"], parsed=1))
        return out

    return judge


@pytest.fixture
def fake_set(tmp_path, monkeypatch):
    """10 items: 7 judged images, 1 unparsable answer, 1 corrupt file, 1 missing file."""
    calls = []
    monkeypatch.setattr(preresq, "judge", _fake_judge(calls))
    reds = [60, 240, 110, UNPARSABLE_RED, 200, 150, 90, 130]
    mos = [1.5, 4.8, 2.0, 3.0, 4.1, 3.9, 1.9, 2.5]
    items = []
    for k, (red, m) in enumerate(zip(reds, mos)):
        path = tmp_path / f"img{k}.png"
        Image.new("RGB", (32, 24), (red, 80, 80)).save(path)
        items.append(data.Item(path=str(path), mos=m, raw=m, dataset="toy"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    items.insert(2, data.Item(path=str(corrupt), mos=3.3, raw=3.3, dataset="toy"))
    items.append(data.Item(path=str(tmp_path / "missing.jpg"), mos=2.2, raw=2.2, dataset="toy"))
    return items, calls


def test_evaluate_counts_parse_failures_and_unreadable_files(fake_set):
    items, calls = fake_set
    caught = []
    metrics, rows = evaluate.evaluate(None, None, None, items, batch_size=4, seed=5,
                                      progress=False, warn=caught.append)
    warned = " ".join(caught)
    assert "corrupt.png" in warned and "missing.jpg" in warned
    assert metrics["unreadable"] == 2
    assert metrics["parse_failures"] == 1
    assert metrics["n"] == 7
    # rows: the readable items, in order; the unparsed one keeps its text and has no score
    readable = [it for it in items if "corrupt" not in it.path and "missing" not in it.path]
    assert [r["path"] for r in rows] == [it.path for it in readable]
    failed = [r for r in rows if not r["parsed"]]
    assert len(failed) == 1 and failed[0]["score"] is None and "no answer" in failed[0]["text"]
    assert all(r["saturation"] == r["score"] for r in rows if r["parsed"])
    # the correlations use exactly the parsed predictions
    pred = [r["score"] for r in rows if r["parsed"]]
    mos = [r["mos"] for r in rows if r["parsed"]]
    assert metrics["srcc"] == pytest.approx(scipy.stats.spearmanr(pred, mos).statistic)
    assert metrics["plcc"] == pytest.approx(scipy.stats.pearsonr(pred, mos).statistic)
    # batches of 4 items (minus unreadable ones), each seeded from its first item's index
    assert [(c["n"], c["seed"]) for c in calls] == [(3, 5), (4, 9), (1, 13)]
    assert all(c["samples"] is None and not c["video"] for c in calls)


def test_files_agree_with_each_other_and_with_a_recomputation(fake_set, tmp_path):
    items, _ = fake_set
    metrics, rows = evaluate.evaluate(None, None, None, items, batch_size=3, progress=False, warn=[].append)
    out = tmp_path / "out"
    out.mkdir()
    reports.write_summary(out / "summary.json", {"toy": metrics})
    reports.write_dataset_files(str(out), "toy", metrics, rows, evaluate.fitted_curve(metrics))
    summary = json.loads((out / "summary.json").read_text())["toy"]
    with open(out / "predictions-toy.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == ["path", "mos", "score", *preresq.IMAGE_ASPECTS, "parsed", "text"]
    parsed = [line for line in lines if line["parsed"] == "yes"]
    assert len(parsed) == summary["n"] == 7
    assert sum(line["parsed"] == "no" for line in lines) == summary["parse_failures"] == 1
    assert all(line["score"] == "" for line in lines if line["parsed"] == "no")
    again = evaluate.correlations([float(line["score"]) for line in parsed],
                                  [float(line["mos"]) for line in parsed])
    for key in ("srcc", "plcc", "krcc", "plcc_logistic4", "plcc_logistic5"):
        assert summary[key] == pytest.approx(again[key], abs=1e-12), key
    scatter = Image.open(out / "scatter-toy.png").convert("RGB")
    assert len(_blobs(scatter, plots.PALETTE[0])) == 7


# Hand-written answers -> (our score: aspect mean, the authors' score: first number); None: unparsed
HAND_WRITTEN = [
    ("<think>sharp</think><answer>3.25\n4.00\n2.50\n3.00\n4.25</answer>", 3.4, 3.25),
    ("<think>soft</think><answer>1.5\n2\n1\n2.5\n1</answer>", 1.6, 1.5),
    ("<think>7 of 10</think><answer>Quality: 4.5</answer>", None, 4.5),     # one number, not five
    ("<think>no tags</think> I would say 2 out of 5", None, 2.0),           # no <answer>: whole text
    ("<think>hmm</think><answer>good</answer>", None, None),                # authors: a random 1..5
    ("<answer>2\n3\n4\n5\n1</answer>", 3.0, 2.0),
    ("<think>great</think><answer>7.5</answer>", None, 7.5),                # not clipped
]
HAND_MOS = [3.3, 1.4, 4.4, 2.2, 3.0, 2.5, 4.9]


@pytest.fixture
def hand_written(monkeypatch):
    """preresq.judge with generation replaced: item k's answer is HAND_WRITTEN[k]'s text. Each
    sampler call records its settings, and the prompt and picture labels it was asked with."""
    calls = []

    def encode_prompts(tok, ip, visuals, prompts, video=False, labels=None):
        return visuals, prompts[0], (labels or preresq.picture_label)(0, video)

    def sample_completions(model, tokenizer, batch, num_generations, all_finished=None, **settings):
        visuals, prompt, label = batch
        calls.append(dict(num_generations=num_generations, **settings, prompt=prompt, label=label))
        return torch.tensor([[k] for (k,) in visuals for _ in range(num_generations)])

    class Tokenizer:
        def batch_decode(self, ids, skip_special_tokens=False):
            return [HAND_WRITTEN[k][0] for k in ids[:, 0].tolist()]

    monkeypatch.setattr(data, "read_visual", lambda path, max_pixels=None: int(path[1:-4]))
    monkeypatch.setattr(preresq, "encode_prompts", encode_prompts)
    monkeypatch.setattr(preresq, "sample_completions", sample_completions)
    items = [data.Item(path=f"/{k}.png", mos=m, raw=m, dataset="hand") for k, m in enumerate(HAND_MOS)]
    return items, Tokenizer(), calls


# A checkpoint whose generation_config.json carries Qwen2.5-VL's temperature and repetition penalty.
CHECKPOINT = types.SimpleNamespace(generation_config=GenerationConfig(temperature=0.1, repetition_penalty=1.05,
                                                                      top_k=1, top_p=0.001, do_sample=True))


@pytest.mark.parametrize("protocol", ["ours", "authors"])
def test_both_protocols_score_hand_written_answers(hand_written, protocol):
    items, tokenizer, calls = hand_written
    metrics, rows = evaluate.evaluate(CHECKPOINT, tokenizer, None, items, protocol=protocol, batch_size=4,
                                      progress=False)
    expected = [ours if protocol == "ours" else authors for _, ours, authors in HAND_WRITTEN]
    assert [r["score"] for r in rows] == pytest.approx(expected)
    assert [r["parsed"] for r in rows] == [e is not None for e in expected]
    assert metrics["protocol"] == protocol
    assert metrics["n"] == (3 if protocol == "ours" else 6)
    assert metrics["parse_failures"] == (4 if protocol == "ours" else 1)  # never a random score
    pred = [e for e in expected if e is not None]
    mos = [m for e, m in zip(expected, HAND_MOS) if e is not None]
    assert metrics["srcc"] == pytest.approx(scipy.stats.spearmanr(pred, mos).statistic)
    assert metrics["plcc"] == pytest.approx(scipy.stats.pearsonr(pred, mos).statistic)
    if protocol == "ours":
        assert rows[0]["saturation"] == 3.25 and rows[0]["background"] == 4.25
        settings = dict(num_generations=1, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                        max_new_tokens=256, greedy=True, prompt=preresq.IMAGE_PROMPT, label="")
    else:  # one number per answer: no aspects; the checkpoint's temperature and penalty, their top_k and top_p
        assert all(r[a] is None for r in rows for a in preresq.IMAGE_ASPECTS)
        settings = dict(num_generations=1, temperature=0.1, top_k=50, top_p=1.0, repetition_penalty=1.05,
                        max_new_tokens=512, greedy=False, prompt=evaluate.AUTHORS_IMAGE_PROMPT, label="Picture 1: ")
    assert calls == [settings, settings]  # two batches of 4 and 3


# Hand-worked: an image scores the first number of the last answer, a video the mean of its numbers.
@pytest.mark.parametrize("text, image, video", [
    ("<think>a</think><answer>2.00\n4.00</answer>", 2.0, 3.0),
    ("<answer>global: 2.5, local: 4</answer>", 2.5, 3.25),
    ("<answer>1</answer><answer>3.5\n4.0\n</answer>", 3.5, 3.75),     # the last answer
    ("global 2 and local 4, no answer block", 2.0, None),               # video: a random 1..5 there
    ("<answer>fine</answer>", None, None),
])
def test_authors_score_images_and_videos(text, image, video):
    assert evaluate.authors_score(text) == image
    assert evaluate.authors_score(text, video=True) == video


def test_authors_protocol_scores_a_video_by_the_mean_of_its_numbers(monkeypatch):
    seen = []

    def judge(model, tokenizer, image_processor, visuals, *, video=False, **kwargs):
        seen.append((video, kwargs["prompt"], kwargs["labels"](1, video)))
        return [preresq.Judgement(None, None, ["<answer>2.00\n4.00</answer>"], 0) for _ in visuals]

    monkeypatch.setattr(preresq, "judge", judge)
    monkeypatch.setattr(data, "read_visual", lambda path, max_pixels=None: path)
    items = [data.Item(path=p, mos=m, raw=m, dataset="mixed") for p, m in (("a.mp4", 2.0), ("b.png", 3.0))]
    _, rows = evaluate.evaluate(CHECKPOINT, None, None, items, protocol="authors", progress=False)
    assert [r["score"] for r in rows] == [3.0, 2.0]
    assert seen == [(False, evaluate.AUTHORS_IMAGE_PROMPT, "Picture 2: "),
                    (True, evaluate.AUTHORS_VIDEO_PROMPT, "Local single frame picture 1:Picture 2: ")]


def test_authors_protocol_fixes_the_decoding(hand_written):
    items, tokenizer, _ = hand_written
    with pytest.raises(ValueError, match="fixes the decoding"):
        evaluate.evaluate(None, tokenizer, None, items, protocol="authors", samples=4, progress=False)
    with pytest.raises(ValueError, match="protocol must be"):
        evaluate.evaluate(None, tokenizer, None, items, protocol="theirs", progress=False)
    assert evaluate.authors_score("<answer>3</answer> then <answer>x 4.25 and 2</answer>") == 4.25


def test_sampling_settings_reach_the_sampler(hand_written):
    items, tokenizer, calls = hand_written
    evaluate.evaluate(None, tokenizer, None, items[:2], samples=3, temperature=0.7, top_k=5,
                      max_new_tokens=32, progress=False)
    assert calls == [dict(num_generations=3, temperature=0.7, top_k=5, top_p=1.0, repetition_penalty=1.0,
                          max_new_tokens=32, greedy=False, prompt=preresq.IMAGE_PROMPT, label="")]


def test_evaluate_judges_images_and_videos_separately_keeping_order(monkeypatch):
    calls = []

    def judge(model, tokenizer, image_processor, visuals, *, video=False, **kwargs):
        calls.append(video)
        return [preresq.Judgement(score=v, aspects=[v] * (2 if video else 5), texts=["t"],
                                  parsed=1) for v in visuals]

    monkeypatch.setattr(preresq, "judge", judge)
    monkeypatch.setattr(data, "read_visual", lambda path, max_pixels=None: float(path[1]))
    items = [data.Item(path=p, mos=float(p[1]), raw=0.0, dataset="mixed")
             for p in ("/1.mp4", "/2.png", "/3.mp4", "/4.png")]
    metrics, rows = evaluate.evaluate(None, None, None, items, batch_size=4, progress=False)
    assert [r["path"] for r in rows] == [it.path for it in items]
    assert sorted(calls) == [False, True]
    assert rows[0]["global"] == 1.0 and rows[1]["sharpness"] == 2.0
    assert metrics["srcc"] == pytest.approx(1.0)


def test_constant_predictions_stay_nan_through_json_and_table(tmp_path, monkeypatch):
    monkeypatch.setattr(preresq, "judge", lambda *a, **k: [
        preresq.Judgement(score=3.0, aspects=[3.0] * 5, texts=["x"], parsed=1) for _ in a[3]])
    paths = []
    for k in range(5):
        paths.append(tmp_path / f"{k}.png")
        Image.new("RGB", (8, 8)).save(paths[-1])
    items = [data.Item(path=str(p), mos=1.0 + k, raw=0.0, dataset="flat")
             for k, p in enumerate(paths)]
    metrics, _ = evaluate.evaluate(None, None, None, items, progress=False)
    assert math.isnan(metrics["srcc"]) and metrics["n"] == 5
    reports.write_summary(tmp_path / "summary.json", {"flat": metrics})
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text)["flat"]["srcc"] is None and "NaN" not in text
    row = reports.format_table(json.loads(text)).splitlines()[2].split()
    assert row[:7] == ["flat", "5", "nan", "nan", "nan", "nan", "nan"]


def test_format_table_hand_built():
    summary = {"koniq": dict(n=2015, srcc=0.91234, plcc=0.9, krcc=0.75, plcc_logistic4=0.92345,
                             plcc_logistic5=0.93456, parse_failures=3, unreadable=0),
               "spaq": dict(n=10, srcc=math.nan, plcc=math.nan, krcc=math.nan,
                            plcc_logistic4=math.nan, plcc_logistic5=math.nan, parse_failures=0, unreadable=1)}
    lines = reports.format_table(summary).splitlines()
    assert lines[0].split() == ["dataset", "n", "SRCC", "PLCC", "raw", "KRCC", "PLCC", "logistic4",
                                "PLCC", "logistic5", "parse", "failures", "unreadable"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["koniq", "2015", "0.9123", "0.9000", "0.7500", "0.9234", "0.9346", "3", "0"]
    assert lines[3].split() == ["spaq", "10", "nan", "nan", "nan", "nan", "nan", "0", "1"]
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
    # the note under the table says which PLCC is which
    assert "PLCC raw: Pearson on the scores as predicted" in lines[4]
    assert "logistic4 / logistic5" in lines[4] and "5-parameter" in lines[4]


# ---------------------------------------------------------------------------------------
# command line: bad arguments fail before any model is loaded
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the arguments are wrong")

    monkeypatch.setattr(preresq, "load_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--data", "koniq,nosuchset"], "unknown dataset(s) nosuchset"),
    (["--data", "koniq,spaq", "--data-root", "/a"], "give one per set"),
    (["--data", "labels"], "'labels' 1 time(s) but --labels gives 0"),
    (["--data", "koniq", "--samples", "0"], "--samples must be at least 1"),
    (["--data", "koniq", "--temperature", "0"], "--temperature must be positive"),
    (["--data", "koniq", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--data", "koniq", "--top-k", "-1"], "--top-k must be at least 0"),
    (["--data", "koniq", "--protocol", "authors", "--samples", "4", "--top-k", "5"],
     "--protocol authors fixes the decoding (one answer sampled at top_k 50, top_p 1, 512 tokens, temperature "
     "and repetition penalty from the checkpoint's generation_config.json): drop --samples, --top-k"),
    (["--data", "koniq", "--protocol", "greedy"], "invalid choice: 'greedy'"),
    (["--data", "koniq,spaq,kadid", "--split", "test,all"], "--split gives 2 splits for 3 sets"),
])
def test_bad_arguments_are_refused_with_a_message(argv, message, no_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "tiny", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_folder_fails_before_loading_the_model(tmp_path, no_model, capsys):
    assert evaluate.main(["--model", "tiny", "--data", "koniq", "--data-root", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "koniq" in message and "nope" in message


def test_splits_pair_with_sets_in_order(no_model):
    args = evaluate.parse_args(["--model", "tiny", "--data", "kadid,koniq,spaq"])
    assert args.splits == ["test", "test", "all"]
    args = evaluate.parse_args(["--model", "tiny", "--data", "kadid,koniq", "--split", "test,all"])
    assert args.splits == ["test", "all"]
    args = evaluate.parse_args(["--model", "tiny", "--data", "kadid,koniq", "--split", "all"])
    assert args.splits == ["all", "all"]


def test_decoding_flags_go_to_our_protocol_only(no_model):
    args = evaluate.parse_args(["--model", "tiny", "--data", "koniq", "--samples", "2", "--top-k", "5"])
    assert args.protocol == "ours" and args.decoding == dict(samples=2, top_k=5)
    args = evaluate.parse_args(["--model", "tiny", "--data", "koniq", "--protocol", "authors"])
    assert args.protocol == "authors" and args.decoding == {}


def test_unknown_split_fails_before_loading_the_model(tmp_path, no_model, capsys):
    assert evaluate.main(["--model", "tiny", "--data", "synthetic", "--split", "holdout",
                          "--out", str(tmp_path / "out")]) == 2
    assert "holdout" in capsys.readouterr().err


def test_default_split_is_test_only_where_a_set_prescribes_one():
    with_test = ("koniq", "kadid", "lsvq", "synthetic", "synthetic-video")
    assert [evaluate.default_split(n) for n in with_test] == ["test"] * 5
    assert [evaluate.default_split(n) for n in ("spaq", "livec", "konvid", "labels")] == ["all"] * 4


# ---------------------------------------------------------------------------------------
# end to end: the tiny preset on the synthetic test split, through the command line
# ---------------------------------------------------------------------------------------


HANDFUL = 8  # synthetic test items scored end to end: enough for a fit, quick on a busy CPU


@pytest.fixture(scope="module")
def synthetic_handful(tmp_path_factory):
    """A 'labels' set of the first HANDFUL synthetic test images, in the 'name mos' format."""
    items = data.load_dataset("synthetic", None, "test")[:HANDFUL]
    labels = tmp_path_factory.mktemp("labels") / "handful.txt"
    labels.write_text("".join(f"{os.path.basename(it.path)} {it.mos}\n" for it in items))
    return items, labels, os.path.dirname(items[0].path)


def _run_cli(out, tiny, handful, monkeypatch, *extra):
    def load_model(name, device=None, dtype=None):
        assert name == presets.model_path("tiny")
        return tiny

    monkeypatch.setattr(preresq, "load_model", load_model)
    _, labels, root = handful
    evaluate.main(["--model", "tiny", "--data", "labels", "--data-root", root,
                   "--labels", str(labels), "--out", str(out), "--device", "cpu", *extra])
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_end_to_end_files_agree_and_the_seed_fixes_the_numbers(tiny, synthetic_handful, tmp_path,
                                                               monkeypatch, capsys):
    items = synthetic_handful[0]
    decoding = ("--samples", "2", "--seed", "7")
    summary = _run_cli(tmp_path / "a", tiny, synthetic_handful, monkeypatch, *decoding)
    table = capsys.readouterr().out
    assert list(summary) == ["handful"]
    s = summary["handful"]
    with open(tmp_path / "a" / "predictions-handful.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(items) == s["n"] + s["parse_failures"] + s["unreadable"]
    assert s["unreadable"] == 0
    assert [line["path"] for line in lines] == [it.path for it in items]
    parsed = [line for line in lines if line["parsed"] == "yes"]
    assert len(parsed) == s["n"]
    again = evaluate.correlations([float(line["score"]) for line in parsed],
                                  [float(line["mos"]) for line in parsed])
    for key in ("srcc", "plcc", "krcc", "plcc_logistic4", "plcc_logistic5"):
        assert (s[key] is None and math.isnan(again[key])) or s[key] == pytest.approx(again[key])
    shown = "nan" if s["srcc"] is None else f"{s['srcc']:.4f}"
    assert any(row.split()[:3] == ["handful", str(s["n"]), shown] for row in table.splitlines())
    scatter = Image.open(tmp_path / "a" / "scatter-handful.png")
    assert scatter.format == "PNG" and scatter.size == (640, 480)
    dots = np.all(np.asarray(scatter.convert("RGB")) == plots.PALETTE[0], axis=-1)
    assert dots.any() == (s["n"] > 0)
    # the same seed gives the same numbers, and the same answers
    assert _run_cli(tmp_path / "b", tiny, synthetic_handful, monkeypatch, *decoding) == summary
    assert ((tmp_path / "a" / "predictions-handful.csv").read_text()
            == (tmp_path / "b" / "predictions-handful.csv").read_text())


# ---------------------------------------------------------------------------------------
# the authors' protocol against transformers' generate, with the checkpoint's generation config
# ---------------------------------------------------------------------------------------

def test_authors_prompt_is_their_chat_template_with_vision_ids():
    """Qwen2.5-VL's chat template with add_vision_id=True writes "Picture k: " before each picture."""
    head, tail = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", \
        "<|im_end|>\n<|im_start|>assistant\n"
    picture = "<|vision_start|><|image_pad|><|vision_end|>"
    image = preresq.render_prompt([1], "Q", labels=evaluate.authors_label)
    assert image == head + "Picture 1: " + picture + "Q" + tail
    video = preresq.render_prompt([1, 1, 1], "Q", video=True, labels=evaluate.authors_label)
    assert video == (head + "Global multiframe picture:Picture 1: " + picture + "Local single frame picture 1:"
                     "Picture 2: " + picture + "Local single frame picture 2:Picture 3: " + picture + "Q" + tail)


def test_authors_protocol_samples_as_generate_does_with_the_checkpoints_config(tmp_path):
    """A copy of the tiny preset whose generation_config.json carries a temperature and a repetition
    penalty: the authors' protocol draws what generate(do_sample=True, top_k=50, top_p=1,
    max_new_tokens=512) draws from that checkpoint (the suppressed tokens aside, which both get)."""
    folder = tmp_path / "tiny"
    shutil.copytree(presets.model_path("tiny"), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.7, repetition_penalty=1.3, top_k=1, top_p=0.001)
    (folder / "generation_config.json").write_text(json.dumps(config))
    model, tok, ip = preresq.load_model(str(folder), "cpu")
    decoding = evaluate.authors_decoding(model.generation_config)
    assert decoding == dict(samples=1, temperature=0.7, top_k=50, top_p=1.0, repetition_penalty=1.3,
                            max_new_tokens=512)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(3)]
    ours = preresq.judge(model, tok, ip, pictures, seed=5, prompt=evaluate.AUTHORS_IMAGE_PROMPT,
                         labels=evaluate.authors_label, **decoding)
    batch = preresq.encode_prompts(tok, ip, [[p] for p in pictures], [evaluate.AUTHORS_IMAGE_PROMPT] * 3,
                                   labels=evaluate.authors_label)
    torch.manual_seed(5)
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=preresq.mm_token_type_ids(model, batch.input_ids), use_cache=True,
                         max_new_tokens=512, do_sample=True, top_k=50, top_p=1,
                         suppress_tokens=preresq.suppressed_ids(tok))
    theirs = tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert [j.texts[0] for j in ours] == theirs
    plain = preresq.judge(model, tok, ip, pictures, seed=5, prompt=evaluate.AUTHORS_IMAGE_PROMPT,
                          labels=evaluate.authors_label, **dict(decoding, temperature=1.0, repetition_penalty=1.0))
    assert [j.texts[0] for j in plain] != theirs  # the checkpoint's settings change what is drawn


# ---------------------------------------------------------------------------------------
# the --out folder: earlier results kept, a full disk loses nothing
# ---------------------------------------------------------------------------------------


@pytest.fixture
def two_sets(tmp_path, monkeypatch):
    """Two labelled sets (a.txt, b.txt) of four pictures each, a stand-in model folder and judge:
    evaluate.main(argv(name)) scores set `name` into tmp_path/eval."""
    root = tmp_path / "pictures"
    root.mkdir()
    for k in range(8):
        Image.new("RGB", (16, 16), (30 * k, 80, 80)).save(root / f"{k}.png")
    for name, ks in (("a", range(4)), ("b", range(4, 8))):
        (root / f"{name}.txt").write_text("".join(f"{k}.png {1 + (k * 7) % 5}\n" for k in ks))
    model = presets.SHIPPED / "tiny"  # a whole model folder; loading it is stood in for
    monkeypatch.setattr(preresq, "load_model", lambda *args: (None, None, None))
    monkeypatch.setattr(preresq, "judge", _fake_judge([]))
    return lambda name: ["--model", str(model), "--data", "labels", "--labels", str(root / f"{name}.txt"),
                         "--data-root", str(root), "--out", str(tmp_path / "eval")]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_second_call_into_the_same_out_keeps_the_earlier_sets(two_sets, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(two_sets("a")) == 0
    first = json.loads((out / "summary.json").read_text())
    before = _snapshot(out)
    assert evaluate.main(two_sets("b")) == 0
    assert "summary.json also keeps the earlier results of a" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["a", "b"] and summary["a"] == first["a"] and summary["b"]["n"] == 4
    assert all(_snapshot(out)[name] == data for name, data in before.items() if name != "summary.json")
    # the newest result of a set replaces that set's entry only
    labels = tmp_path / "pictures" / "a.txt"
    labels.write_text(labels.read_text().replace("0.png 1", "0.png 5"))
    assert evaluate.main(two_sets("a")) == 0
    again = json.loads((out / "summary.json").read_text())
    assert list(again) == ["a", "b"] and again["b"] == summary["b"] and again["a"]["srcc"] != first["a"]["srcc"]


def test_an_unreadable_summary_is_refused_not_written_over(two_sets, tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text('{"a": {"n": 4, "srcc"')
    assert evaluate.main(two_sets("b")) == 2
    assert "summary.json cannot be read" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["summary.json"]


def test_a_full_disk_while_writing_the_page_loses_nothing(two_sets, tmp_path, capsys, monkeypatch):
    """The page of set b cannot be written: one error line naming it, the numbers of b already in
    summary.json, every file of set a byte for byte as it was, no partial file left."""
    import builtins
    from support import files

    out = tmp_path / "eval"
    assert evaluate.main(two_sets("a")) == 0
    before = _snapshot(out)

    def open_(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        write = f.write

        def full(text):
            if isinstance(text, str) and "<!DOCTYPE html>" in text:
                write(text[:100])
                raise OSError(28, "No space left on device")
            return write(text)
        f.write = full
        return f

    monkeypatch.setattr(files, "open", open_, raising=False)
    assert evaluate.main(two_sets("b")) == 1
    err = capsys.readouterr().err
    assert f"evaluate.py: error: could not write {out / 'report-b.html'}: No space left on device (" in err
    assert "every file written before it is intact" in err and "Traceback" not in err
    after = _snapshot(out)
    assert sorted(after) == sorted([*before, "predictions-b.csv", "scatter-b.png"])  # no .partial, no report-b
    assert all(after[name] == data for name, data in before.items() if name != "summary.json")
    summary = json.loads(after["summary.json"])
    assert summary["a"] == json.loads(before["summary.json"])["a"] and summary["b"]["n"] == 4
