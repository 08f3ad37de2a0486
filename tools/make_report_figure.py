"""The README's report figure: a short two-stage run of the tiny preset, its answers recorded every
LOG_EVERY steps in the rollouts.jsonl format report_page.py reads, then report.html and its size.

    python docs/make_report_figure.py runs/report-demo
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --screenshot=docs/report.png \
        --window-size=1600,1600 --force-device-scale-factor=0.75 runs/report-demo/report.html

The answers are recorded by wrapping grpo.py's sample_rollout, reward_terms and score_rollout for
the logged steps: the texts, terms and advantages are the ones the step trained on.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import grpo  # noqa: E402
import report_page  # noqa: E402
import rewards  # noqa: E402

LOG_EVERY = 10
seen = {}


def wrap(name, keep):
    original = getattr(grpo, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        seen[name] = keep(result, args)
        return result
    setattr(grpo, name, wrapped)


def log_step(cfg, model, reference, tokenizer, image_processor, optimizer, items, visuals, step, video, dist):
    """grpo_step, then (every LOG_EVERY steps) one rollouts.jsonl line from what it sampled and scored."""
    seen.clear()
    record = original_step(cfg, model, reference, tokenizer, image_processor, optimizer, items, visuals, step,
                           video, dist)
    if (step + 1) % LOG_EVERY or "score_rollout" not in seen:
        return record
    rollout, stage, advantages = seen["sample_rollout"], grpo.explore_stable(cfg, step), seen["score_rollout"]
    g, terms = rollout.num_generations, {k: v.reshape(-1).tolist() for k, v in seen["reward_terms"].items()}
    questions = grpo.step_prompts(stage, cfg.seed, step, len(items), video)
    lengths = rollout.mask.sum(1).tolist()
    groups = [dict(file=item.path, mos=item.mos, prompt=questions[i], answers=[
        dict(text=rollout.texts[k], scores=rewards.parse_answer(rollout.texts[k], 5),
             terms={n: v[k] for n, v in terms.items() if n != "total"}, total=terms["total"][k],
             advantage=advantages[k], length=int(lengths[k])) for k in range(i * g, (i + 1) * g)])
        for i, item in enumerate(items)]
    with open(Path(cfg.out) / "rollouts.jsonl", "a") as f:
        f.write(json.dumps(dict(step=step + 1, stage=stage.number, groups=groups)) + "\n")
    return record


wrap("sample_rollout", lambda rollout, args: rollout)
wrap("reward_terms", lambda terms, args: terms)
wrap("score_rollout", lambda result, args: None if result[0] is None else result[0].tolist())
original_step, grpo.grpo_step = grpo.grpo_step, log_step

out = sys.argv[1] if len(sys.argv) > 1 else "runs/report-demo"
grpo.main(["--model", "tiny", "--out", out, "--steps", "60", "--stage1-steps", "30", "--eval-every", "30",
           "--save-every", "0", "--eval-size", "48"])
path = report_page.write_training_page(out, load_picture=data.read_visual)
print(f"{path}: {os.path.getsize(path) / 1024:.0f} KB")
