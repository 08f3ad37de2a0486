"""ablation.py: every variant trains with the same budget and lands in one table."""
import json
from dataclasses import asdict

import pytest

import ablation
import grpo
import harness.config


def test_variants_are_valid_grpo_flags():
    default = ("preresq", True, True, "explore-stable")  # the paper's method, grpo.py's default
    for name, flags in ablation.VARIANTS.items():
        cfg = harness.config.parse_args(grpo.Settings, flags)[0]
        what = (cfg.reward, cfg.response_branch, cfg.preference_branch, cfg.schedule)
        assert (what == default) == (name == "preresq"), name


def test_mean_std_and_nan():
    assert ablation.mean_std([0.5, 0.7]) == "0.600 ± 0.141"
    assert ablation.mean_std([float("nan")]) == "nan"


def test_table_gives_each_seed_the_spread_and_the_paired_difference():
    runs = lambda *srcc: [{"seed": s, "srcc": v, "plcc": v, "parse_failures": 1, "seconds": 60.0}
                          for s, v in zip((3, 7, 9), srcc)]
    text = ablation.table({"a": runs(0.5, 0.7, 0.6), "b": runs(0.2, 0.3, None), "c": runs(0.6, 0.75, 0.7)})
    assert "SRCC by seed (3 / 7 / 9)" in text.splitlines()[0] and "SRCC − a (± 2 SE)" in text.splitlines()[0]
    assert "| a | 0.600 ± 0.100 | 0.600 ± 0.100 | 0.500 / 0.700 / 0.600 | — | 3 | 1.0 |" in text
    # b - a on seeds 3 and 7: -0.3, -0.4 -> mean -0.35, std 0.0707, SE 0.05: resolved
    assert "| b | 0.250 ± 0.071 | 0.250 ± 0.071 | 0.200 / 0.300 / nan | -0.350 ± 0.100 * | 3 | 1.0 |" in text
    # c - a: +0.1, +0.05, +0.1 -> mean 0.0833, std 0.0289, SE 0.0167: resolved as well
    assert "| c | 0.683 ± 0.076 | 0.683 ± 0.076 | 0.600 / 0.750 / 0.700 | +0.083 ± 0.033 * |" in text
    assert ablation.paired_difference(runs(0.5, None, None), runs(0.4, 0.5, 0.6)) is None  # one pair only


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_two_variants_one_step(tiny, tmp_path, jobs):
    """In this process (--jobs 1) or two child processes at a time (--jobs 2): the same runs, one table."""
    out = tmp_path / "ab"
    flags = ["--variants", "preresq,threshold", "--seeds", "0", "--steps", "1", "--out", str(out),
             "--images-per-step", "2", "--num-generations", "2", "--max-new-tokens", "64", "--eval-size", "4",
             "--workers", "1", "--jobs", str(jobs)]
    assert ablation.main(flags) == 0
    assert all((out / f"{v}-seed0.log").exists() == (jobs > 1) for v in ("preresq", "threshold"))
    results = json.loads((out / "ablation.json").read_text())
    assert set(results) == {"preresq", "threshold"}
    assert all(r[0]["step"] == 1 and r[0]["n"] + r[0]["parse_failures"] == 4 for r in results.values())
    text = (out / "ablation.md").read_text()
    assert "| preresq |" in text and "| threshold |" in text
    cfg = json.loads((out / "threshold-seed0" / "config.json").read_text())
    assert cfg["reward"] == "threshold" and cfg["steps"] == 1


def finished_run(out, steps: int, variant="preresq", seed=0) -> dict:
    """OUT/<variant>-seed<S> as a finished run of --steps `steps` leaves it (config.json, final/, eval.jsonl);
    returns its files' text."""
    common = ["--model", "tiny", "--steps", str(steps), "--eval-every", str(steps), "--save-every", str(steps)]
    cfg = harness.config.parse_args(grpo.Settings, ablation.run_flags(variant, seed, common, out))[0]
    folder = out / f"{variant}-seed{seed}"
    (folder / "final").mkdir(parents=True)
    texts = {"config.json": json.dumps(asdict(cfg), indent=2), "ablation.json": json.dumps({"seconds": 60.0}),
             "eval.jsonl": json.dumps({"step": steps, "n": 4, "srcc": 0.5, "plcc": 0.4, "parse_failures": 0}) + "\n"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    return texts


def test_a_finished_run_is_reused_only_with_the_same_recipe(tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run of the same recipe is not trained again")

    monkeypatch.setattr(grpo, "train", no_training)
    out = tmp_path / "ab"
    texts = finished_run(out, steps=1)
    flags = ["--variants", "preresq", "--seeds", "0", "--out", str(out)]
    assert ablation.main(flags + ["--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'preresq-seed0'}: finished with the same recipe: reused" in printed and "| preresq | 0.500 |" in printed
    # other flags: refused before any run, naming each difference; the earlier run is left as it was
    message = ablation_refusal(flags + ["--steps", "2", "--lr", "0.001"], capsys)
    assert f"{out / 'preresq-seed0'} holds a run of another recipe" in message
    assert "--steps: 1 there, 2 now" in message and "--lr: 0.0005 there, 0.001 now" in message
    assert "--eval-every: 1 there, 2 now" in message and "Choose another --out" in message
    folder = out / "preresq-seed0"
    assert {name: (folder / name).read_text() for name in texts} == texts


def ablation_refusal(argv, capsys) -> str:
    try:
        code = ablation.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_eval_split_none_is_refused_at_the_front_door(tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("refused before any run")

    monkeypatch.setattr(grpo, "train", no_training)
    message = ablation_refusal(["--eval-split", "none", "--out", str(tmp_path / "ab")], capsys)
    assert "ablation.py: error: --eval-split none leaves nothing to compare" in message
    assert not (tmp_path / "ab").exists()
