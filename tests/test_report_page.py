"""report_page.py: the training and evaluation pages, read back with the standard library's HTML parser
as a browser would read them; evaluate.py's page from the shipped tiny model."""
import base64
import csv
import io
import json
import os
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

import data
import evaluate
import preresq
from harness import report_page


class Page(HTMLParser):
    """A page as a browser reads it: every tag with its attributes, the text, and each table row's
    class and text."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.chunks, self.rows, self.row = [], [], [], None
        self.feed(text)
        self.close()
        self.text = "".join(self.chunks)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.row = (dict(attrs).get("class") or "", [])

    def handle_endtag(self, tag):
        if tag == "tr" and self.row:
            self.rows.append((self.row[0].split(), "".join(self.row[1])))
            self.row = None

    def handle_data(self, text):
        self.chunks.append(text)
        if self.row:
            self.row[1].append(text)

    def answer_rows(self):
        """(classes, text) of the rows of answer tables (their first cell is the answer's number)."""
        return [(c, t) for c, t in self.rows if t[:1].isdigit()]


SCRIPT = '<script>alert("x")</script> & <b>bold</b>'


def answer(text, scores, advantage, **terms):
    terms = terms or {"format": 1.0, "pair_fidelity": 0.8}
    return dict(text=text, scores=scores, terms=terms, total=round(sum(terms.values()), 6),
                advantage=advantage, length=len(text.split()))


def rollouts():
    """Two stages, two logged steps each; one group with no spread, odd answers in step 10."""
    good = "<think>I see little noise.</think><answer>4.1\n3.9\n4.0\n4.2\n4.0</answer>"
    bad = "<think>I see severe noise.</think><answer>1.5 1.0 2.0 1.5 1.0</answer>"
    groups = lambda step: [  # noqa: E731
        dict(file=f"/nowhere/step{step}-a.png", mos=4.05, prompt="Rate <this> picture.", answers=[
            answer(good, [4.1, 3.9, 4.0, 4.2, 4.0], 0.87, format=1.0, pair_fidelity=0.8, triplet_balance=0.25),
            answer(bad, [1.5, 1.0, 2.0, 1.5, 1.0], -1.12, format=1.0, pair_fidelity=0.125, triplet_balance=0.0),
            answer(good.replace("4.1", "3.7"), [3.7, 3.9, 4.0, 4.2, 4.0], 0.25, format=1.0, pair_fidelity=0.75,
                   triplet_balance=0.5)]),
        dict(file=f"/nowhere/step{step}-b.png", mos=1.5, prompt="Rate it.", answers=[
            answer(bad, [1.5, 1.0, 2.0, 1.5, 1.0], 0.0), answer(bad, [1.5, 1.0, 2.0, 1.5, 1.0], 0.0)])]
    records = [dict(step=s, stage=1 if s <= 5 else 2, groups=groups(s)) for s in (1, 5, 6, 10)]
    records[-1]["groups"].append(dict(file="/nowhere/odd.png", mos=2.0, prompt="", answers=[
        answer(SCRIPT, None, -0.5, format=0.0, pair_fidelity=0.0),
        answer("", None, -0.5, format=0.0, pair_fidelity=0.0),
        answer("<answer>2.0 2.0 2.0 2.0 2.0</answer>", [2.0] * 5, 1.0, format=1.0, pair_fidelity=1.0)]))
    return records


METRICS = [dict(step=s, stage=1 if s <= 5 else 2, reward=0.1 * s) for s in range(1, 11)]
EVALS = [dict(step=0, srcc=0.059, plcc=0.074), dict(step=5, srcc=0.412, plcc=0.398), dict(step=10, srcc=0.743,
                                                                                        plcc=0.759)]


@pytest.fixture(scope="module")
def training():
    logged = rollouts()
    text = report_page.training_page(METRICS, EVALS, logged, title="demo")
    return logged, text, Page(text)


def test_every_logged_answer_its_terms_total_and_advantage_are_on_the_page(training):
    logged, _, page = training
    answers = [a for r in logged for g in r["groups"] for a in g["answers"]]
    rows = page.answer_rows()
    assert len(rows) == len(answers) == 23
    for (classes, row), a in zip(rows, answers):
        assert a["text"] in row  # the whole answer, as text
        for value in [*a["terms"].values(), a["total"]]:
            assert f"{value:.3f}" in row
        assert f"{a['advantage']:+.3f}" in row
        if a["scores"]:
            assert " ".join(f"{s:.2f}" for s in a["scores"]) in row
    headers = [t for classes, t in page.rows if t.startswith("#")]
    # one column per term the group's answers have, whatever its name
    three, two = ("#answeraspect scores" + names + "totaladvantagetokens"
                  for names in ("formatpair_fidelitytriplet_balance", "formatpair_fidelity"))
    assert headers == [three, two] * 4 + [two]
    # hand-worked: the first answer of step 1 earns 1.0 + 0.8 + 0.25 = 2.05 and advantage +0.87
    assert "2.050" in rows[0][1] and "+0.870" in rows[0][1]


def test_html_in_an_answer_or_a_prompt_is_shown_as_text_never_as_a_tag(training):
    _, text, page = training
    assert SCRIPT in page.text and "Rate <this> picture." in page.text
    assert {tag for tag, _ in page.tags}.isdisjoint({"script", "b", "this", "think", "answer"})
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in text


def test_the_highest_and_lowest_advantage_of_each_group_are_marked(training):
    logged, _, page = training
    rows, k = page.answer_rows(), 0
    for record in logged:
        for group in record["groups"]:
            marks = rows[k:k + len(group["answers"])]
            k += len(group["answers"])
            best = [j for j, (classes, _) in enumerate(marks) if "best" in classes]
            worst = [j for j, (classes, _) in enumerate(marks) if "worst" in classes]
            advantages = [a["advantage"] for a in group["answers"]]
            if len(set(advantages)) == 1:  # no spread: nothing to mark
                assert best == worst == []
                continue
            # hand-picked: the first of tied lowest advantages (-0.5, -0.5 in the odd group) is marked
            assert best == [advantages.index(max(advantages))] and worst == [advantages.index(min(advantages))]
            assert "best" in marks[best[0]][1] and "worst" in marks[worst[0]][1]
    assert page.text.count("no spread") == 4  # the second group of each logged step


def test_unparsed_and_empty_answers_are_marked(training):
    _, _, page = training
    odd = page.answer_rows()[-3:]
    assert "unparsed" in odd[0][0] and "unparsed" in odd[0][1] and "empty" not in odd[0][0]
    assert {"unparsed", "empty"} <= set(odd[1][0]) and "empty answer" in odd[1][1]
    assert "unparsed" not in odd[2][0] and "2.00 2.00 2.00 2.00 2.00" in odd[2][1]


def test_nothing_on_the_page_is_fetched(training):
    _, text, page = training
    assert "http" not in text and "url(" not in text
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        assert attrs.get("href", "#").startswith("#")  # links only within the page
        assert attrs.get("src", "data:").startswith("data:")


def test_steps_shown_are_the_first_and_last_of_each_stage_then_the_newest():
    records = [dict(step=s, stage=1 if s <= 5 else 2, groups=[]) for s in range(1, 11)]
    assert [r["step"] for r in report_page.chosen_steps(records)] == [1, 5, 6, 10]
    assert [r["step"] for r in report_page.chosen_steps(records, cap=6)] == [1, 5, 6, 8, 9, 10]
    assert [r["step"] for r in report_page.chosen_steps(records[:5])] == [1, 3, 4, 5]


def test_caps_are_applied_and_said(training):
    many = [dict(step=s, stage=1, groups=[dict(file=f"{s}-{g}.png", mos=3.0, answers=[answer("a", [3.0] * 5, 0.0)])
                                          for g in range(6)]) for s in range(1, 8)]
    page = Page(report_page.training_page([], [], many))
    assert page.text.count("first 4 of 6 images") == 4
    assert len(page.answer_rows()) == 16
    assert "4 of 7 logged steps are shown" in page.text
    links = [a["href"] for tag, a in page.tags if tag == "a"]
    assert links == ["#step-1", "#step-5", "#step-6", "#step-7"]
    assert [a["id"] for tag, a in page.tags if tag == "section"] == ["step-1", "step-5", "step-6", "step-7"]


def test_curves_and_scatter_are_svg_drawn_from_the_logs():
    items = [dict(file="a.png", mos=4.5, prediction=4.0), dict(file="b.png", mos=1.2, prediction=2.0),
             dict(file="<c>.png", mos=3.0, prediction=None)]
    page = Page(report_page.training_page(METRICS, EVALS, [], items))
    polylines = [a["points"].split() for tag, a in page.tags if tag == "polyline"]
    assert [len(p) for p in polylines] == [10, 3, 3]  # reward per step; SRCC and PLCC per evaluation
    dots = [a for tag, a in page.tags if tag == "circle"]
    assert len(dots) == 10 + 3 + 3 + 2  # the unparsed item is left out of the scatter
    assert "3 items, 1 unparsed" in page.text and "held-out predictions at step 10" in page.text
    assert "No answers were logged" in page.text
    assert "no per-item predictions were kept" in Page(report_page.training_page(METRICS, EVALS, [])).text


def test_ticks_are_round_numbers_around_the_data():
    assert report_page.ticks(0.06, 0.74) == [0, 0.2, 0.4, 0.6, 0.8]  # 0.68 / 5 = 0.136 -> steps of 0.2
    assert report_page.ticks(1, 300) == [0, 100, 200, 300]  # 59.8 -> 100
    assert report_page.ticks(0.5, 0.5) == [0.4, 0.6]  # one value: a unit span, steps of 0.2


def test_a_half_written_line_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')
    assert report_page.read_jsonl(path) == [{"step": 1, "reward": 0.5}]
    assert report_page.read_jsonl(tmp_path / "absent.jsonl") == []


def decode(uri):
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_a_run_folder_with_real_pictures_gives_small_embedded_thumbnails(tmp_path):
    Image.new("RGB", (400, 300), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (90, 120), (30, 30, 200)).save(tmp_path / "small.png")
    views = [Image.new("RGB", (320, 320), (30, 200, 30)), Image.new("RGB", (64, 64), (0, 0, 0))]
    load = lambda p: views if p.endswith(".mp4") else report_page.open_image(p)  # noqa: E731
    files = [str(tmp_path / "red.png"), str(tmp_path / "small.png"), str(tmp_path / "clip.mp4"),
             str(tmp_path / "gone.png")]
    record = dict(step=3, stage=1, groups=[dict(file=f, mos=3.0, answers=[answer("x", [3.0] * 5, 0.0)])
                                           for f in files])
    for name, lines in (("metrics", METRICS), ("eval", EVALS), ("rollouts", [record])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    path = report_page.write_training_page(tmp_path, load_picture=load)
    assert path == tmp_path / "report.html" and not list(tmp_path.glob("*.partial"))
    page = Page(path.read_text())
    pictures = [decode(a["src"]) for tag, a in page.tags if tag == "img"]
    # longest side scaled to 160 px, aspect kept; a small picture is not enlarged; a video's first view
    assert [p.size for p in pictures] == [(160, 120), (90, 120), (160, 160)]
    assert [p.format for p in pictures] == ["JPEG"] * 3
    assert [tuple(round(c / 10) for c in p.convert("RGB").getpixel((40, 40))) for p in pictures] == [
        (20, 3, 3), (3, 3, 20), (3, 20, 3)]
    assert "no picture: FileNotFoundError" in page.text  # the missing file: a placeholder, the page is whole
    assert "demo" not in page.text and f"{tmp_path.name}: training report" in page.text


# --------------------------------------------------------------------------- the evaluation page

def rows():
    made = [dict(path=f"/set/{k}.png", mos=1.0 + k * 0.25, score=1.0 + k * 0.25 + (0.1 * k if k % 5 else -2.0),
                 saturation=3.0, parsed=True, text=f"<answer>item {k}</answer>") for k in range(1, 17)]
    made += [dict(path="/set/odd.png", mos=3.0, score=None, saturation=None, parsed=False, text=SCRIPT),
             dict(path="/set/blank.png", mos=2.0, score=None, saturation=None, parsed=False, text="")]
    return made


def test_evaluation_page_shows_the_largest_errors_first_and_the_parse_failures():
    made = rows()
    metrics = evaluate.correlations([r["score"] for r in made[:16]], [r["mos"] for r in made[:16]])
    metrics.update(protocol="ours", n=16, parse_failures=2, unreadable=0)
    text = report_page.evaluation_page("set <1>", metrics, made)
    page = Page(text)
    # hand-worked errors: items 5, 10, 15 are off by -2.0; then 16 (+1.6), 14 (+1.4), 13 (+1.3) ...
    order = [int(k) for k in re.findall(r"item (\d+)", page.text)]
    assert order[:6] == [5, 10, 15, 16, 14, 13]
    assert len(order) == 16 and "The 16 largest of 16 errors" in page.text
    assert "error -2.00" in page.text and "error +1.60" in page.text
    assert f"{metrics['srcc']:.4f}" in page.text and "set <1>: evaluation report" in page.text
    assert "2 answers could not be parsed" in page.text and SCRIPT in page.text and "empty answer" in page.text
    assert page.text.count("unparsed") == 2
    assert len([a for tag, a in page.tags if tag == "circle"]) == 16
    assert "script" not in {tag for tag, _ in page.tags} and "http" not in text
    assert page.text.count("no picture") == 18  # none of these files exists


def test_evaluation_page_caps_the_errors_shown():
    made = [dict(path=f"{k}.png", mos=3.0, score=3.0 + k / 100, parsed=True, text=f"item {k}") for k in range(50)]
    page = Page(report_page.evaluation_page("big", dict(protocol="ours", n=50), made))
    order = [int(k) for k in re.findall(r"item (\d+)", page.text)]
    assert order == list(range(49, 29, -1))  # the 20 largest, largest first
    assert "The 20 largest of 50 errors" in page.text and "0 answers could not be parsed" in page.text


@pytest.mark.slow
def test_evaluate_writes_a_page_per_set_with_every_answer(tiny, tmp_path, monkeypatch):
    items = data.load_dataset("synthetic", None, "test")[:4]
    labels = tmp_path / "four.txt"
    labels.write_text("".join(f"{os.path.basename(it.path)} {it.mos}\n" for it in items))
    monkeypatch.setattr(preresq, "load_model", lambda name, device=None, dtype=None: tiny)
    out = tmp_path / "out"
    assert evaluate.main(["--model", "tiny", "--data", "labels", "--data-root", os.path.dirname(items[0].path),
                          "--labels", str(labels), "--out", str(out), "--device", "cpu"]) == 0
    page = Page((out / "report-four.html").read_text())
    with open(out / "predictions-four.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4
    for line in lines:
        assert line["text"].strip() in page.text
    assert len([a for tag, a in page.tags if tag == "img"]) == 4  # every file shown, as a thumbnail
    assert all(a["src"].startswith("data:image/jpeg;base64,") for tag, a in page.tags if tag == "img")


@pytest.mark.slow
def test_a_short_run_writes_a_page_with_every_logged_answer_and_term(tiny, tmp_path):
    """grpo.py itself: rollouts.jsonl every step, report.html refreshed at each evaluation and at the
    end, every logged answer with its terms, total and advantage on it, its text escaped."""
    import grpo

    out = tmp_path / "run"
    assert grpo.main(["--model", "tiny", "--device", "cpu", "--images-per-step", "2", "--num-generations", "2",
                      "--max-new-tokens", "48", "--steps", "2", "--eval-every", "2", "--eval-size", "4",
                      "--log-rollouts", "1", "--workers", "1", "--out", str(out)]) == 0
    logged = [json.loads(l) for l in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in logged] == [(1, 1), (2, 2)]
    answers = [a for r in logged for g in r["groups"] for a in g["answers"]]
    assert len(answers) == 2 * 4 + 2 * 2  # stage 1: 2 G answers to each of 2 images; stage 2: G
    assert all(set(a) == {"text", "scores", "terms", "total", "advantage", "length"} for a in answers)
    text = (out / "report.html").read_text()
    page = Page(text)
    rows = page.answer_rows()
    assert len(rows) == len(answers)
    for (classes, row), a in zip(rows, answers):
        assert a["text"] in row  # the answer as text: its <think> and <answer> tags escaped, never tags
        for value in [*a["terms"].values(), a["total"]]:
            assert f"{value:.3f}" in row
        assert f"{a['advantage']:+.3f}" in row
    assert "&lt;think&gt;" in text and not any(tag in ("think", "answer") for tag, _ in page.tags)
    items = [json.loads(l) for l in (out / "eval_items.jsonl").read_text().splitlines()]
    assert len(items) == 4 and all({"file", "mos", "prediction"} <= set(i) for i in items)
