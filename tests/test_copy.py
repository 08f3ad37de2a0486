"""The paper's pieces lift out: copied alone into an empty folder, with nothing else of the project
importable, rewards.py computes the reward, preresq.py scores a picture, and rewards.py +
preresq.py + support/prompt_sharing.py + grpo.py run one GRPO step (tools/one_step.py, the
README's "use the pieces in your own code")."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny"


def copied(tmp_path: Path, *files: str) -> Path:
    folder = tmp_path / "elsewhere"
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, folder / name)
    return folder


def run(folder: Path, script: str, *args: str) -> str:
    """`python script` in `folder`, the project out of reach: no PYTHONPATH, another working folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    guard = ("import importlib.util, sys\n"
             "for name in ('data', 'evaluate', 'video', 'harness', 'harness.run', 'support.cli'):\n"
             "    assert importlib.util.find_spec(name.split('.')[0]) is None or name.startswith('support.') and "
             "importlib.util.find_spec(name) is None, name\n")
    (folder / "guard").write_text(guard)
    done = subprocess.run([sys.executable, "-c", f"exec(open('guard').read()); import runpy, sys; "
                           f"sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_rewards_alone(tmp_path):
    folder = copied(tmp_path, "rewards.py")
    (folder / "use").write_text(
        "import torch, rewards\n"
        "scores, valid, fmt = rewards.parse_completions(['<think>ok</think><answer>4\\n4\\n4.5\\n4\\n3.5</answer>',\n"
        "                                                 'no answer'], 5, 1)\n"
        "terms = rewards.preresq_reward(scores, torch.tensor([4.0, 2.0]), valid, format_rewards=fmt)\n"
        "print(valid.tolist(), fmt.tolist(), sorted(terms))\n")
    out = run(folder, "use")
    assert "[[True], [False]] [[1.0], [0.0]]" in out and "'total'" in out


@pytest.mark.slow
def test_preresq_scores_a_picture(tmp_path):
    folder = copied(tmp_path, "rewards.py", "preresq.py", "support/prompt_sharing.py")
    (folder / "use").write_text(
        "import sys, preresq\nfrom PIL import Image\n"
        "model, *processor = preresq.load_model(sys.argv[1], 'cpu')\n"
        "verdict = preresq.score(model, processor, Image.effect_noise((96, 96), 40).convert('RGB'))\n"
        "print('score', verdict.score, 'parsed', verdict.parsed, 'aspects', verdict.aspects)\n")
    out = run(folder, "use", str(TINY))
    score = out.split("score ")[1].split()[0]
    assert score == "None" or 1.0 <= float(score) <= 5.0, out


@pytest.mark.slow
def test_one_grpo_step_from_the_four_files(tmp_path):
    folder = copied(tmp_path, "rewards.py", "preresq.py", "grpo.py", "support/prompt_sharing.py")
    shutil.copy(ROOT / "tools" / "one_step.py", folder / "one_step.py")
    out = run(folder, "one_step.py", str(TINY))
    assert "stage 1: mean reward" in out and "best answer to picture 0" in out, out
    moved, total = out.strip().splitlines()[-1].split(" weight tensors")[0].split(" of ")
    assert int(moved) > 0 and int(moved) == int(total), out  # full fine-tuning: every tensor got a gradient step
