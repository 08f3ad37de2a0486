"""ablation.py: every variant trains with the same budget and lands in one table."""
import json

import pytest

import ablation
import grpo


def test_variants_are_valid_grpo_flags():
    for name, flags in ablation.VARIANTS.items():
        cfg = grpo.parse_args(flags)[0]
        assert (cfg.reward, cfg.response_branch, cfg.preference_branch, cfg.schedule) != ("preresq", True, True, "single") \
            or name == "preresq"


def test_mean_std_and_nan():
    assert ablation.mean_std([0.5, 0.7]) == "0.600 ± 0.141"
    assert ablation.mean_std([float("nan")]) == "nan"


@pytest.mark.slow
def test_two_variants_one_step(tiny, tmp_path):
    out = tmp_path / "ab"
    flags = ["--variants", "preresq,threshold", "--seeds", "0", "--steps", "1", "--out", str(out),
             "--images-per-step", "2", "--num-generations", "2", "--max-new-tokens", "64", "--eval-size", "4",
             "--workers", "1"]
    assert ablation.main(flags) == 0
    results = json.loads((out / "ablation.json").read_text())
    assert set(results) == {"preresq", "threshold"}
    assert all(r[0]["step"] == 1 and r[0]["n"] + r[0]["parse_failures"] == 4 for r in results.values())
    text = (out / "ablation.md").read_text()
    assert "| preresq |" in text and "| threshold |" in text
    cfg = json.loads((out / "threshold-seed0" / "config.json").read_text())
    assert cfg["reward"] == "threshold" and cfg["steps"] == 1
