"""The front door: every tool checks everything before it does anything, and says so in one voice.

Each bad input runs a tool's main(argv) in-process, in an empty working folder, with PRERESQ_CACHE
pointed at a folder of its own. It must exit with the code the conventions give (2: bad usage or
input), print "<tool>: error: ..." (or argparse's usage error) naming what is wrong, show no
traceback, and leave nothing behind: no output folder, no cache entry, no preset built, no model
loaded. Two subprocesses show the same on a real console.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ablation
import bench
from support import cli
import data
import evaluate
import grpo
import preresq
from harness import presets
import harness.config
from support import synthetic
import video

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"grpo": grpo.main, "evaluate": evaluate.main, "preresq": preresq.main, "data": data.main,
         "video": video.main, "bench": bench.main, "ablation": ablation.main, "presets": presets.main}
HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"  # never in this machine's hub cache, and the tests run offline


def case(tool, argv, words, code=2, absent=(), marks=()):
    return pytest.param(tool, argv, code, words, absent, marks=marks, id=f"{tool} {' '.join(argv)}"[:90])


CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")
MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="--device mps is valid here")
LABEL_FILE = "label file"

CASES = [
    # grpo.py
    case("grpo", ["--num-generations", "1"], ["--num-generations must be at least 2", "nothing is learned"]),
    case("grpo", ["--data-root", "{in}/photos"], ["not a synthetic set", "--data labels"]),
    case("grpo", ["--data", "koniq"], ["'koniq' needs --data-root", "layout"]),
    case("grpo", ["--data", "koniq", "--data-root", "{in}/nope"], ["--data-root", "nope", "is not a folder"]),
    case("grpo", ["--data", "labels", "--labels", "{in}/labels/bad.txt", "--data-root", "{in}/labels"],
         ["bad.txt, line 2", "'1.png high'", "Fix or delete that row"]),
    case("grpo", ["--data", "labels", "--labels", "{in}/labels/mixed.txt", "--data-root", "{in}/labels"],
         ["mixed.txt mixes images and videos (first image {in}/labels/0.png, first video {in}/labels/clip.mp4)",
          "--labels images.txt,videos.txt"]),
    case("grpo", ["--data", "labels", "--labels", "{in}/labels/nanfirst.txt", "--data-root", "{in}/labels"],
         ["nanfirst.txt, line 1: score 'nan' is not finite"]),
    case("grpo", ["--data", "labels", "--labels", "{in}/a,b/bad.txt", "--data-root", "{in}/a,b"],
         ["{in}/a,b/bad.txt, line 2", "'1.png high'"]),  # a folder with a comma in its name is one folder
    case("grpo", ["--model", "{in}/notamodel"], ["notamodel is not a model folder", "config.json"]),
    case("grpo", ["--model", HUB_ID], ["not in the local hub cache", "hf download"]),
    case("grpo", ["--device", "cuda"], ["--device cuda", "--device cpu"], marks=CUDA),
    case("grpo", ["--out", "{in}/afile"], ["--out", "afile is a file"]),
    case("grpo", ["--dtype", "half"], ["argument --dtype: invalid choice: 'half'"]),
    case("grpo", ["--lr", "nan"], ["--lr must be a finite number, got nan"]),
    case("grpo", ["--log-rollouts", "-1"], ["--log-rollouts must be at least 0, got -1"]),
    case("grpo", ["--lr", "-0.001"], ["--lr must be greater than 0, got -0.001"]),
    case("grpo", ["--lr", "inf"], ["--lr must be a finite number, got inf"]),
    case("grpo", ["--beta", "-0.04"], ["--beta must be at least 0, got -0.04"]),
    case("grpo", ["--temperature", "nan"], ["--temperature must be a finite number"]),
    case("grpo", ["--temperature", "0"], ["--temperature must be greater than 0, got 0.0"]),
    case("grpo", ["--epochs", "inf"], ["--epochs must be a finite number, got inf"]),
    case("grpo", ["--epsilon", "nan"], ["--epsilon must be a finite number"]),
    case("grpo", ["--max-grad-norm", "0"], ["--max-grad-norm must be greater than 0"]),
    case("grpo", ["--weight-decay", "-1"], ["--weight-decay must be at least 0"]),
    case("grpo", ["--lora-rank", "2", "--lora-dropout", "1"], ["--lora-dropout must be less than 1, got 1.0"]),
    case("grpo", ["--lora-rank", "2", "--lora-alpha", "inf"], ["--lora-alpha must be a finite number"]),
    case("grpo", ["--seed", "-1"], ["--seed must be at least 0, got -1"]),
    case("grpo", ["--keep-last", "0"], ["--keep-last must be at least 1"]),
    case("grpo", ["--max-pixels", "0"], ["--max-pixels must be at least 1"]),
    case("grpo", ["--workers", "0"], ["--workers must be at least 1"]),
    case("grpo", ["--device", "foo"], ["--device foo: not a device", "This machine has: cpu"]),
    case("grpo", ["--device", "mps"], ["--device mps: torch has no mps device", "This machine has: cpu"], marks=MPS),
    case("grpo", ["--reference-device", "cuda"], ["--reference-device cuda", "This machine has: cpu",
                                                  "--reference-device cpu"], marks=CUDA),
    case("grpo", ["--seed", str(2**32)], [f"--seed must be at most {2**32 - 1}, got {2**32}"]),
    case("grpo", ["--dtype", "float16"], ["--dtype float16 cannot train", "NaN at the first step", "float32"]),
    case("grpo", ["--model", "{in}/run", "--out", "newrun"], ["run: this is a run folder; its model is", "run/final"]),
    case("grpo", ["--model", "{in}/unfinished", "--out", "newrun"], ["unfinished: this is a run folder",
                                                                     "--resume"]),
    case("grpo", ["--model", "{in}/notokenizer"], ["notokenizer lacks tokenizer.json"]),
    case("grpo", ["--model", "{in}/textonly"], ["this is not a vision-language model (Qwen2.5-VL expected)",
                                                "model_type 'qwen2'"], absent=["Qwen2VLConfig"]),
    case("grpo", ["--data", "labels", "--labels", "{in}/labels/three.txt", "--data-root", "{in}/labels",
                  "--split", "all", "--images-per-step", "4"], ["--images-per-step 4, but training set 'three' has only 3 images",
                                              "--images-per-step 3 or less"]),
    case("grpo", ["--out", "{in}/labels"], ["--out", "labels is not empty (0.png, 1.png, 2.png, bad.txt, ...)"]),
    case("grpo", ["--model", "{in}/notamodel", "--out", "{in}/notamodel/run"], ["is not a model folder"]),
    case("grpo", ["--resume"], ["--resume needs --out DIR"], absent=["usage:"]),
    case("grpo", ["--resume", "--out", "{in}/photos"], ["--resume: no complete checkpoint in"], absent=["usage:"]),
    # evaluate.py
    case("evaluate", ["--model", "tiny", "--data", "koniq"], ["'koniq' needs --data-root"]),
    case("evaluate", ["--model", "tiny", "--data", "koniq", "--data-root", "{in}/nope"], ["nope", "is not a folder"]),
    case("evaluate", ["--model", "tiny", "--data", "labels", "--labels", "{in}/labels/bad.txt", "--data-root",
                      "{in}/labels"], ["bad.txt, line 2", "Fix or delete that row"]),
    case("evaluate", ["--model", "tiny", "--data", "labels", "--labels", "{in}/a,b/bad.txt", "--data-root",
                      "{in}/a,b"], ["{in}/a,b/bad.txt, line 2"]),
    case("evaluate", ["--model", "tiny", "--data", "labels", "--labels", "{in}/labels/twice.txt", "--data-root",
                      "{in}/labels"], ["'1.png' is listed twice with different scores: 2 at {in}/labels/twice.txt, "
                                       "line 2 and 4 at {in}/labels/twice.txt, line 4"]),
    case("evaluate", ["--model", "{in}/notamodel", "--data", "synthetic"], ["is not a model folder"]),
    case("evaluate", ["--model", HUB_ID, "--data", "synthetic"], ["not in the local hub cache"]),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--device", "cuda"], ["--device cuda"], marks=CUDA),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--out", "{in}/afile"], ["--out", "is a file"]),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--out", "{in}/afile/eval"],
         ["cannot create --out", "afile is a file"]),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--dtype", "half"], ["invalid choice: 'half'"]),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--data-root", "{in}/photos"],
         ["not a synthetic set"]),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--samples", "0"], ["--samples must be at least 1"]),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--temperature", "nan"],
         ["--temperature must be a finite number, got nan"]),
    case("evaluate", ["--model", "tiny", "--data", "synthetic", "--seed", "-3"], ["--seed must be at least 0"]),
    case("evaluate", ["--data", "synthetic", "--device", "foo"], ["--device foo: not a device", "This machine has"]),
    case("evaluate", ["--model", "{in}/run", "--data", "synthetic", "--out", "eval"],
         ["this is a run folder; its model is", "run/final"]),
    case("evaluate", ["--model", "{in}/noprocessor", "--data", "synthetic"], ["lacks preprocessor_config.json"]),
    # preresq.py: the files are checked in seconds, before a model is found, built or loaded
    case("preresq", ["{in}/bad.jpg", "--model", "tiny"], ["bad.jpg", "not an image"], absent=[LABEL_FILE]),
    case("preresq", ["{in}/empty.mp4", "--model", "tiny"], ["empty.mp4", "cannot open as a video"],
         absent=[LABEL_FILE]),
    case("preresq", ["{in}/missing.png", "--model", "tiny"], ["missing.png does not exist"]),
    case("preresq", ["{in}/bad.jpg", "{in}/empty.mp4", "--model", "tiny"],
         ["none of the 2 files can be read", "warning: skipped", "bad.jpg", "empty.mp4"]),
    case("preresq", ["{in}/good.png", "--model", "x", "--dtype", "half"], ["invalid choice: 'half'"]),
    case("preresq", ["{in}/good.png", "--model", "nosuch"], ["'nosuch' is neither a folder nor a hub id"]),
    case("preresq", ["{in}/good.png", "--samples", "2", "--seed", str(2**32)], ["--seed must be at most 4294967295"]),
    case("preresq", ["{in}/good.png", "--device", "mps"], ["--device mps", "This machine has: cpu"], marks=MPS),
    case("preresq", ["{in}/good.png", "--model", "{in}/notokenizer"], ["notokenizer lacks tokenizer.json"]),
    case("preresq", ["{in}/good.png", "--model", "{in}/noprocessor"], ["lacks preprocessor_config.json"]),
    case("preresq", ["{in}/good.png", "--model", "{in}/textonly"], ["this is not a vision-language model"]),
    case("preresq", ["{in}/good.png", "--model", "{in}/notamodel"], ["is not a model folder"]),
    case("preresq", ["{in}/good.png", "--model", "x", "--device", "cuda"], ["--device cuda"], marks=CUDA),
    case("preresq", ["{in}/good.png", "--model", "x", "--samples", "0"], ["--samples must be at least 1"]),
    case("preresq", ["{in}/wide.png", "--model", "tiny"], ["wide.png is 2000 x 3 pixels", "over 200 times",
                                                           "crop it"]),
    case("preresq", ["{in}/tall.png", "--model", "tiny"], ["tall.png is 2 x 403 pixels", "over 200 times"]),
    case("preresq", ["{in}/good.png", "--model", "x", "--seed", "-1"], ["--seed must be at least 0"]),
    # data.py
    case("data", ["--data", "nope"], ["unknown dataset 'nope'", "koniq"]),
    case("data", ["--data", "koniq"], ["'koniq' needs --data-root"]),
    case("data", ["--data", "synthetic", "--data-root", "{in}/photos"], ["not a synthetic set"]),
    case("data", ["--data", "labels", "--data-root", "{in}/labels"], ["--data labels needs --labels FILE"]),
    case("data", [], ["name one dataset: --data NAME"]),
    case("data", ["--data", "labels", "--labels", "{in}/labels/utf16.txt", "--data-root", "{in}/labels"],
         ["label file {in}/labels/utf16.txt is not UTF-8 text", "save it as UTF-8"]),
    case("data", ["--data", "synthetic", "--seed", "-1"], ["--seed must be at least 0"]),
    # video.py
    case("video", ["{in}/clip.mp4", "--grid", "0", "--out", "views"], ["--grid must be at least 1"]),
    case("video", ["{in}/clip.mp4", "--out", "{in}/afile"], ["--out", "is a file"]),
    case("video", ["{in}/clip.mp4", "--out", "{in}/afile/views"], ["cannot create --out", "afile is a file"]),
    case("video", ["{in}/missing.mp4", "--out", "views"], ["missing.mp4: cannot open as a video"]),
    case("video", ["{in}/empty.mp4", "--out", "views"], ["empty.mp4: cannot open as a video"]),
    case("video", ["{in}/clip.mp4", "--seed", "-1", "--out", "views"], ["--seed must be at least 0"]),
    # presets.py
    case("presets", ["nope"], ["invalid choice: 'nope'", "tiny"]),
    case("presets", [], ["required: NAME"]),
    # ablation.py
    case("ablation", ["--variants", "nope"], ["unknown variant(s) nope", "fidelity"]),
    case("ablation", ["--seeds", "a,b"], ["--seeds takes comma-separated whole numbers"]),
    case("ablation", ["--seeds", "0,-1"], ["--seeds must be 0 or more"]),
    case("ablation", ["--seeds", f"0,{2**32}"], ["--seeds must be 0 or more and at most 4294967295"]),
    case("ablation", ["--out", "{in}/afile"], ["--out", "is a file"]),
    case("ablation", ["--model", "{in}/notamodel"], ["is not a model folder"]),
    case("ablation", ["--steps", "0"], ["--steps must be at least 1"]),
    case("ablation", ["--num-generations", "1"], ["--num-generations must be at least 2"]),
    case("ablation", ["--eval-split", "none"], ["--eval-split none leaves nothing to compare", "held-out"]),
    # bench.py
    case("bench", ["step", "--B", "0"], ["--images-per-step must be at least 1"]),  # the old spelling
    case("bench", ["step", "--image-size", "448"], ["is not a picture size", "WIDTHxHEIGHT"]),
    case("bench", ["nosuch"], ["invalid choice: 'nosuch'"]),
    case("bench", ["step", "--model", "qwen2.5-vl-7b", "--device", "cpu"], ["--device cuda"]),
    case("bench", ["step", "--images-per-step", "0"], ["--images-per-step must be at least 1"]),
    case("bench", ["video", "--clip", "{in}/empty.mp4"], ["empty.mp4: cannot open as a video"]),
    case("bench", ["rewards", "--repeats", "0"], ["--repeats must be at least 1"]),
    case("bench", ["step", "--beta", "nan"], ["--beta must be a finite number"]),
    case("bench", ["step", "--beta", "-1"], ["--beta must be at least 0"]),
    case("bench", ["video", "--seconds", "inf"], ["--seconds must be a finite number"]),
    case("bench", ["rewards", "--device", "cuda"], ["--device cuda", "--device cpu"], marks=CUDA),
    case("bench", ["rewards", "--device", "foo"], ["--device foo: not a device"]),
    case("bench", ["step", "--image-size", "28x10000"], ["--image-size gives 28x10000 pictures",
                                                         "sides at most 200 times apart"]),
    case("bench", ["step", "--image-size", "4000x4000"], ["at most 12845056 pixels"]),
    case("bench", ["step", "--visual-tokens", "100000"], ["--visual-tokens gives", "16384 visual tokens"]),
    case("bench", ["video", "--size", "29x30"], ["--size 29x30", "even sides"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What the bad (and good) inputs point at, made once: {in} in a case's argv."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "bad.jpg").write_text("not an image")
    (root / "empty.mp4").write_bytes(b"")
    (root / "afile").write_text("a file where a folder should be")
    (root / "notamodel").mkdir()
    (root / "readonly").mkdir()
    (root / "notamodel" / "weights.txt").write_text("no config.json here")
    Image.new("RGB", (64, 48), (200, 90, 40)).save(root / "good.png")
    Image.new("RGB", (2000, 3), (200, 90, 40)).save(root / "wide.png")  # the image processor refuses both
    Image.new("RGB", (2, 403), (200, 90, 40)).save(root / "tall.png")
    (root / "photos").mkdir()
    Image.new("RGB", (64, 48), (20, 90, 140)).save(root / "photos" / "holiday.jpg")
    (root / "labels").mkdir()
    for k in range(3):
        Image.new("RGB", (32, 32), (60 * k, 90, 40)).save(root / "labels" / f"{k}.png")
    (root / "labels" / "bad.txt").write_text("0.png 3.5\n1.png high\n2.png 4.0\n")
    (root / "labels" / "mixed.txt").write_text("0.png 3.5\nclip.mp4 2.0\n1.png 4.0\n")
    (root / "labels" / "nanfirst.txt").write_text("0.png nan\n1.png 2.0\n2.png 4.0\n")
    (root / "labels" / "twice.txt").write_text("0.png 1\n1.png 2\n2.png 3\n1.png 4\n")
    (root / "labels" / "utf16.txt").write_text("0.png 1\n1.png 2\n", encoding="utf-16")
    (root / "a,b").mkdir()
    (root / "a,b" / "bad.txt").write_text("0.png 3.5\n1.png high\n2.png 4.0\n")
    (root / "labels" / "three.txt").write_text("0.png 3.5\n1.png 2.0\n2.png 4.0\n")
    frames = [np.full((48, 64, 3), 8 * i, np.uint8) for i in range(8)]
    synthetic.write_clip(str(root / "clip.mp4"), frames, fps=8)
    synthetic.write_clip(str(root / "labels" / "clip.mp4"), frames, fps=8)
    (root / "run" / "final").mkdir(parents=True)  # a run folder, finished and not
    (root / "unfinished").mkdir()
    (root / "unfinished" / "metrics.jsonl").write_text('{"step": 1}\n')
    model_copy(root / "notokenizer", without="tokenizer.json")
    model_copy(root / "noprocessor", without="preprocessor_config.json")
    (root / "textonly").mkdir()  # a language model's config, as Qwen2-0.5B ships it
    (root / "textonly" / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"],
                                                               "model_type": "qwen2", "hidden_size": 896}))
    return root


def model_copy(folder: Path, without: str = "") -> Path:
    """models/tiny's files linked into `folder`, but for `without`."""
    folder.mkdir()
    for f in (ROOT / "models" / "tiny").iterdir():
        if f.name != without:
            (folder / f.name).symlink_to(f)
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def front_door(inputs, tmp_path, monkeypatch):
    """An empty working folder and cache, and a model that must not be built or loaded."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PRERESQ_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a refused run must not build or load a model")

    monkeypatch.setattr(preresq, "load_model", refuse)
    monkeypatch.setattr(presets, "build_preset", refuse)
    before = listing(inputs)
    yield work, cache
    assert listing(work) == [], "a refused run created files in the working folder"
    assert listing(cache) == [], "a refused run created a cache entry"
    assert listing(inputs) == before, "a refused run changed its inputs"


def run_tool(tool, argv, capsys, monkeypatch) -> tuple[int, str]:
    """main(argv) -> (exit code, everything printed), started as `python <tool>.py ...` is (argparse names
    the program after sys.argv[0]). SystemExit is how argparse ends a bad usage."""
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *argv])
    try:
        code = TOOLS[tool](argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("tool, argv, code, words, absent", CASES)
def test_a_bad_input_is_refused_before_anything_is_made(tool, argv, code, words, absent, inputs, front_door,
                                                        capsys, monkeypatch):
    got, printed = run_tool(tool, [a.replace("{in}", str(inputs)) for a in argv], capsys, monkeypatch)
    assert got == code, printed
    assert re.search(rf"^{tool}\.py( \w+)?: error: ", printed, re.M), printed
    for word in words:
        assert word.replace("{in}", str(inputs)) in printed, printed
    for word in absent:
        assert word not in printed, printed
    assert "Traceback" not in printed, printed


@pytest.mark.parametrize("tool, argv", [("grpo", []), ("evaluate", ["--model", "tiny", "--data", "synthetic"])])
@pytest.mark.parametrize("cache, words", [
    ("{in}/afile", ["PRERESQ_CACHE={in}/afile: cannot create", "afile is a file"]),
    ("{in}/afile/cache", ["PRERESQ_CACHE={in}/afile/cache: cannot create", "afile is a file"]),
    ("{in}/readonly/cache", ["PRERESQ_CACHE={in}/readonly/cache: cannot create", "readonly is not writable"]),
])
def test_a_cache_that_cannot_be_written_is_refused_before_anything_is_made(tool, argv, cache, words, inputs,
                                                                           front_door, capsys, monkeypatch):
    """The synthetic set is generated into PRERESQ_CACHE on first use: a file there, or a read-only place
    (simulated at the access check: the tests run as root, for whom permissions do not bite)."""
    readonly, access = inputs / "readonly", os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == readonly else access(p, mode))
    monkeypatch.setenv("PRERESQ_CACHE", cache.replace("{in}", str(inputs)))
    got, printed = run_tool(tool, argv, capsys, monkeypatch)
    assert got == 2 and printed.startswith(f"{tool}.py: error: "), printed
    for word in words:
        assert word.replace("{in}", str(inputs)) in printed, printed
    assert "point PRERESQ_CACHE at a writable folder" in printed and "Traceback" not in printed


def test_the_table_covers_every_tool_and_enough_bad_inputs():
    tools = {p.values[0] for p in CASES}
    assert tools == set(TOOLS) and len(CASES) >= 30


# --------------------------------------------------------------------------- during the work


def fake_judge(model, tokenizer, image_processor, visuals, **settings):
    return [preresq.Judgement(3.0 + 0.1 * k, [3.0] * 5, ["<answer>3 3 3 3 3</answer>"], 1)
            for k in range(len(visuals))]


def test_unreadable_files_during_evaluation_are_counted_warnings_not_tracebacks(inputs, tmp_path, monkeypatch,
                                                                                capsys):
    """A header that opens over a damaged body is only found while scoring: a counted line per file the
    first few times, then a count, never Python's UserWarning with a source line."""
    root = tmp_path / "set"
    root.mkdir()
    lines = []
    for k in range(4):
        Image.new("RGB", (32, 32), (50 * k, 90, 40)).save(root / f"good{k}.png")
        lines.append(f"good{k}.png {1 + k}")
    whole = (root / "good0.png").read_bytes()
    for k in range(7):
        (root / f"cut{k}.png").write_bytes(whole[:len(whole) // 2])
        lines.append(f"cut{k}.png 2.5")
    Image.new("RGB", (2000, 3), (90, 90, 90)).save(root / "wide.png")  # a shape the image processor refuses
    lines.append("wide.png 2.5")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    model = model_copy(tmp_path / "model")
    monkeypatch.setattr(preresq, "load_model", lambda *args: (None, None, None))
    monkeypatch.setattr(preresq, "judge", fake_judge)
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(model), "--data", "labels", "--labels", str(root / "labels.txt"),
                          "--data-root", str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"model: {model} (a local checkpoint folder)" in err
    assert err.count("evaluate.py: warning: skipped: cannot decode image") == 5
    assert "further warnings of this run are counted" in err and "evaluate.py: 8 unreadable files" in err
    assert "UserWarning" not in err and "Traceback" not in err and "warnings.warn" not in err
    assert json.loads((out / "summary.json").read_text())["labels"]["unreadable"] == 8


def test_preresq_scores_what_it_can_read_and_exits_1_for_the_rest(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preresq, "load_model", lambda *args: (None, None, None))
    monkeypatch.setattr(preresq, "judge", fake_judge)
    model = str(model_copy(tmp_path / "m"))
    assert preresq.main([str(inputs / "good.png"), str(inputs / "bad.jpg"), "--model", model, "--json"]) == 1
    out = capsys.readouterr()
    assert [json.loads(line)["file"] for line in out.out.splitlines()] == [str(inputs / "good.png")]
    assert "preresq.py: warning: skipped:" in out.err and "bad.jpg" in out.err
    assert "preresq.py: 1 files not scored" in out.err and "label file" not in out.err


def test_progress_bars_honour_tqdm_disable_and_warnings_print_above_them(tmp_path, monkeypatch, capsys):
    """TQDM_DISABLE=1 hides every bar (tqdm reads it only when no disable= is passed); a warning while a bar
    shows is a line of its own (tqdm.write), not text appended to the bar's line."""
    root = tmp_path / "set"
    root.mkdir()
    for k in range(3):
        Image.new("RGB", (32, 32), (50 * k, 90, 40)).save(root / f"good{k}.png")
    (root / "cut.png").write_bytes((root / "good0.png").read_bytes()[:60])
    (root / "labels.txt").write_text("good0.png 1\ncut.png 2\ngood1.png 3\ngood2.png 4\n")
    model_copy(tmp_path / "model")
    monkeypatch.setattr(preresq, "load_model", lambda *args: (None, None, None))
    monkeypatch.setattr(preresq, "judge", fake_judge)
    argv = ["--model", str(tmp_path / "model"), "--data", "labels", "--labels", str(root / "labels.txt"),
            "--data-root", str(root), "--batch-size", "1"]
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert evaluate.main(argv + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\rlabels: 100%|" in err  # the bar shows
    warning = next(line for line in err.split("\n") if "warning: skipped" in line)
    assert warning.split("\r")[-1].startswith("evaluate.py: warning: skipped: cannot decode image"), repr(warning)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert evaluate.main(argv + ["--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "evaluate.py: warning: skipped: cannot decode image" in err


def test_the_three_tools_take_a_preset_name_and_default_to_tiny(inputs, tmp_path, monkeypatch, capsys):
    """One --model rule: a preset's name (built or found by presets.model_path), default tiny."""
    loaded = []
    monkeypatch.setattr(preresq, "load_model", lambda path, *args: loaded.append(path) or (None, None, None))
    monkeypatch.setattr(preresq, "judge", fake_judge)
    assert preresq.main([str(inputs / "good.png")]) == 0
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    assert evaluate.main(["--data", "synthetic", "--out", str(tmp_path / "eval")]) == 130  # stopped once loaded
    assert harness.config.run_config(grpo.Settings)().model == "tiny"
    assert loaded == [presets.model_path("tiny")] * 2 == [str(ROOT / "models" / "tiny")] * 2
    err = capsys.readouterr().err
    assert f"model: tiny (from {ROOT / 'models' / 'tiny'})" in err and "model: the tiny preset" in err


def test_a_preset_folder_gets_the_presets_defaults(tmp_path):
    """--model models/tiny (however spelled) is the tiny preset: its learning rate, answer length and length
    of run; the same files elsewhere are a checkpoint like any other, with the paper's."""
    tiny = harness.config.PRESET_DEFAULTS["tiny"]
    for model in ["tiny", str(ROOT / "models" / "tiny"), str(ROOT / "models" / ".." / "models" / "tiny")]:
        for cfg in [harness.config.run_config(grpo.Settings)(model=model).resolve(presets.preset_name(model)),
                    harness.config.parse_args(grpo.Settings, ["--model", model])[0]]:
            assert (cfg.lr, cfg.max_new_tokens, cfg.steps, cfg.reasoning_beta) == (
                tiny["lr"], tiny["max_new_tokens"], tiny["steps"], tiny["reasoning_beta"]), model
    copy = str(model_copy(tmp_path / "copy"))
    assert presets.preset_name(copy) is None and presets.preset_name(str(tmp_path)) is None
    cfg = harness.config.parse_args(grpo.Settings, ["--model", copy])[0]
    assert (cfg.lr, cfg.max_new_tokens, cfg.epochs) == (grpo.PAPER_DEFAULTS["lr"], 256, 8)


def test_evaluation_says_its_decoding_is_greedy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preresq, "load_model", lambda *args: (None, None, None))
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    evaluate.main(["--data", "synthetic", "--max-new-tokens", "64", "--out", str(tmp_path / "eval")])
    assert "protocol ours; decoding greedy, max_new_tokens 64; seed 0" in capsys.readouterr().err
    evaluate.main(["--data", "synthetic", "--samples", "4", "--out", str(tmp_path / "eval")])
    assert "protocol ours; decoding 4 sampled answers averaged; seed 0" in capsys.readouterr().err


def test_one_voice_for_failures_and_ctrl_c(capsys):
    def fails(argv):
        raise cli.Failure("the disk is full; checkpoint-2 is intact")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.entry("demo", fails) == 1
    assert cli.entry("demo", interrupted) == 130
    err = capsys.readouterr().err
    assert "demo: error: the disk is full; checkpoint-2 is intact" in err and "demo: interrupted" in err


@pytest.mark.parametrize("argv, words", [
    (["video.py", "{in}/clip.mp4", "--grid", "0", "--out", "views"], "video.py: error: --grid must be at least 1"),
    (["preresq.py", "{in}/bad.jpg", "--model", "tiny"], "preresq.py: error: {in}/bad.jpg is not an image"),
])
def test_a_real_console_shows_the_message_and_no_traceback(argv, words, inputs, tmp_path):
    env = dict(os.environ, PRERESQ_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / argv[0]), *[a.replace("{in}", str(inputs)) for a in argv[1:]]],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert words.replace("{in}", str(inputs)) in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == []


# --------------------------------------------------------------------------- --help


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parsers_of(tool, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser a tool's main builds (and its subcommands' parsers), caught before it parses."""
    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(Captured) as caught:
        TOOLS[tool]([])
    parser = caught.value.parser
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser] + [p for a in subcommands for p in a.choices.values()]


def help_blocks(text: str) -> dict[str, str]:
    """--help text -> {flag or positional: its block (invocation, help and continuation lines)}."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.strip():
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("tool", TOOLS)
def test_help_gives_every_flag_a_line_and_each_default_once(tool, monkeypatch):
    for parser in parsers_of(tool, monkeypatch):
        blocks = help_blocks(parser.format_help())
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            name = action.option_strings[0] if action.option_strings else action.metavar or action.dest
            block = blocks[name]
            assert action.help, f"{parser.prog} {name} has no help"
            assert block.count("default") <= 1, f"{parser.prog}: {block}"
            for wrong in ("default: None", "default: True", "default: False"):
                assert wrong not in block, f"{parser.prog}: {block}"
            if action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool):
                assert f"default: {action.default}" in block, f"{parser.prog}: {block}"
