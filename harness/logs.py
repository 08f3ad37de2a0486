"""What a grpo.py run writes as it goes: metrics.jsonl (a line per step), rollouts.jsonl (every answer of
every --log-rollouts step), eval.jsonl and eval_items.jsonl (held-out evaluations), curves.png,
report.html, and final/ with the summary at the end."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm import tqdm

import data
import evaluate
from harness import lora, plots, report_page
from harness.checkpoints import RunError, checkpoints, save_folder, write_run_file
from support.files import WriteError
from harness.distributed import full_weights, unwrap

# A run stops when this many steps in a row give non-finite rewards, losses or gradients.
MAX_NONFINITE_STEPS = 5


def log_json(path: Path, record: dict) -> None:
    """One JSON line; a non-finite number is written as null (JSON has no NaN)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    write_run_file(path, json.dumps(clean) + "\n", append=True)


def steps_text(first: int, last: int) -> str:
    """Steps first..last (1-based, inclusive) in words: "steps 3-8", "step 3", or "no steps" when empty."""
    return "no steps" if last < first else f"step {first}" if last == first else f"steps {first}-{last}"


def step_metrics(scored) -> dict:
    """A step's reward line in metrics.jsonl (grpo.Scored -> plain numbers over the global batch):
    reward mean and std, each term's mean, groups with no spread, parse failures, answer lengths and
    the batch SRCC."""
    if not scored.terms:
        return {}
    reward, valid = scored.terms["total"], scored.valid
    return {"reward": reward.mean().item(), "reward_std": reward.std().item() if reward.numel() > 1 else 0.0,
            **{f"reward/{k}": v.mean().item() for k, v in scored.terms.items() if k != "total"},
            "zero_std_groups": (reward.std(1) < 1e-6).float().mean().item() if reward.shape[1] > 1 else 1.0,
            "parse_failure_rate": 1 - valid.float().mean().item(),
            "completion_length": scored.tokens / max(scored.sequences, 1), "completion_tokens": int(scored.tokens),
            "batch_srcc": batch_srcc(scored.scores, valid, scored.mos)}


def batch_srcc(scores: torch.Tensor, valid: torch.Tensor, mos: torch.Tensor) -> float:
    """SRCC between each image's mean parsed prediction and its MOS, within one training batch.

    scores: (B, G, A); valid: (B, G); mos: (B,). A cheap, noisy learning signal (B is small);
    NaN when fewer than three images have a parsed answer or the predictions are constant.
    """
    from scipy.stats import spearmanr

    n = valid.sum(1)
    keep = n > 0
    p = (scores.mean(-1) * valid).sum(1)[keep] / n[keep]
    if keep.sum() < 3 or p.unique().numel() < 2 or mos[keep].unique().numel() < 2:
        return float("nan")
    return float(spearmanr(p.numpy(), mos[keep].numpy()).statistic)


def answers(rollout, scored, items: list) -> list[dict]:
    """One group of this process's (grpo.Rollout, grpo.Scored) as plain data, a dict per image: its file,
    MOS and prompt, and per answer the text, parsed scores (None when unparsed), every reward term,
    total, advantage and length in tokens."""
    g, adv, own = rollout.num_generations, scored.advantages, scored.own
    terms = {name: v[own] for name, v in scored.terms.items()}
    scores, valid = scored.scores[own], scored.valid[own]
    lengths = rollout.answers.mask.sum(1).tolist() if rollout.answers else []
    out = []
    for i, item in enumerate(items[:len(valid)]):
        rows = [{"text": rollout.texts[i * g + j],
                 "scores": [round(s, 4) for s in scores[i, j].tolist()] if valid[i, j] else None,
                 "terms": {n: round(v[i, j].item(), 5) for n, v in terms.items() if n != "total"},
                 "total": round(terms["total"][i, j].item(), 5),
                 "advantage": round(adv[i * g + j].item(), 5) if adv is not None else None,
                 "length": int(lengths[i * g + j])} for j in range(g)]
        out.append({"file": str(item.path), "mos": round(float(item.mos), 4),
                    "prompt": rollout.questions[i] if rollout.questions else "", "answers": rows})
    return out


def joined(scored: list):
    """A step's groups (grpo.Scored each) as one, for its metrics line."""
    live = [s for s in scored if s.terms]
    if len(scored) == 1 or not live:
        return scored[0]
    cat = lambda name: torch.cat([getattr(s, name) for s in live])
    return replace(live[0], terms={k: torch.cat([s.terms[k] for s in live]) for k in live[0].terms},
                   scores=cat("scores"), valid=cat("valid"), mos=cat("mos"), tokens=sum(s.tokens for s in scored),
                   sequences=sum(s.sequences for s in scored), own=slice(None), advantages=None)


def log_step(cfg, run, step: int, done, batch, problems: list[str], seconds: float) -> dict:
    """After a step (grpo.Step of grpo.Batch): the counters, metrics.jsonl and, every --log-rollouts
    steps, rollouts.jsonl (rank 0), and a RunError after MAX_NONFINITE_STEPS non-finite steps in a row.
    Returns the step's metrics."""
    for p in problems:
        run.warn(f"skipped an unreadable item: {p}")
    run.counters["skipped_items"] += int(run.comm.sum([len(problems)])[0])
    head = {"step": step + 1, "stage": cfg.stage(step)}
    scored = joined(done.scored)
    if cfg.log_rollouts and (step + 1) % cfg.log_rollouts == 0 and scored.terms and run.comm.main:
        groups = [a for r, s, g in zip(done.rollouts, done.scored, batch.groups) if s.terms
                  for a in answers(r, s, g.items)]
        log_json(run.out / "rollouts.jsonl", {**head, "groups": groups})
    record = {**head, "epoch": round(run.sampler.epoch(step + 1), 4), **step_metrics(scored), **done.stats}
    run.nonfinite_in_a_row = run.nonfinite_in_a_row + 1 if record.get("nonfinite") else 0
    if record.get("nonfinite"):
        run.counters["nonfinite_steps"] += 1
        if run.comm.main:
            tqdm.write(f"warning: step {step + 1}: non-finite {record['nonfinite']}; step skipped", file=sys.stderr)
    record.update(run.counters, lr=record.get("lr", cfg.learning_rate(step)), seconds=round(seconds, 3))
    if "completion_tokens" in record:
        record["tokens_per_second"] = round(record["completion_tokens"] / max(record["seconds"], 1e-9), 1)
    if run.comm.main:
        log_json(run.out / "metrics.jsonl", record)
    if run.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
        raise RunError(nonfinite_message(run.out, step, run.nonfinite_in_a_row, record["nonfinite"]))
    if nonfinite_weights(run.model, run.comm):  # before a checkpoint could keep them
        found = checkpoints(run.out)
        raise RunError(f"step {step + 1}'s update left non-finite weights (NaN or infinite); stopping before they "
                       f"are saved. The newest sound checkpoint is {found[-1] if found else 'none (none saved yet)'}. "
                       "Try a lower --lr or --dtype float32, then continue with --resume --force.")
    return record


def nonfinite_weights(model, comm) -> bool:
    """Whether a trained weight is NaN or infinite on any rank: one float32 sum per tensor, one sync."""
    sums = [getattr(p, "to_local", lambda: p)().detach().sum(dtype=torch.float32)
            for p in model.parameters() if p.requires_grad]
    bad = bool(sums) and not torch.stack(sums).sum().isfinite().item()
    return bool(comm.sum([float(bad)], "max")[0])


def nonfinite_message(out: Path, step: int, count: int, what: str) -> str:
    found = checkpoints(out)
    return (f"{steps_text(step + 2 - count, step + 1)} all gave a non-finite {what} (see {out / 'metrics.jsonl'}); "
            f"stopping. The newest checkpoint is {found[-1] if found else 'none (none saved yet)'}. Try a lower "
            "--lr or --dtype float32, or check the data, then continue with --resume --force.")


def draw_run_curves(out: Path) -> None:
    """curves.png: mean reward per step and the held-out SRCC / PLCC, from the run's logs."""
    read = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines()] if (out / name).exists() else []
    steps, evals = read("metrics.jsonl"), read("eval.jsonl")
    series = {"mean reward": [(m["step"], m["reward"]) for m in steps if m.get("reward") is not None],
              "held-out SRCC": [(e["step"], e["srcc"]) for e in evals if e.get("srcc") is not None],
              "held-out PLCC": [(e["step"], e["plcc"]) for e in evals if e.get("plcc") is not None]}
    if not any(series.values()):  # every step skipped (no readable picture in its batch): nothing to draw
        return
    try:
        plots.draw_curves(out / "curves.png", {k: v for k, v in series.items() if v}, title=out.name)
    except WriteError as e:  # a figure is never worth a run; the logs it is drawn from are intact
        print(f"grpo.py: warning: {e}", file=sys.stderr)


def held_out(cfg, policy, items: list, comm,
             warn=None) -> tuple[dict | None, list[dict]]:
    """Held-out metrics and each item's {"file", "mos", "prediction"} (None when unparsed), computed on
    rank 0 while the other ranks wait (None, [] there); under --fsdp every rank runs the same passes."""
    metrics, rows = None, []
    policy.model.eval()  # the held-out answers are sampled without dropout (--lora-dropout), as in training
    if comm.main or comm.sharded:
        metrics, rows = policy.run(evaluate.evaluate, policy.tokenizer, policy.image_processor, items,
                                   samples=cfg.eval_samples, seed=cfg.seed, batch_size=16,
                                   max_new_tokens=cfg.max_new_tokens, max_pixels=cfg.max_pixels, progress=False,
                                   warn=warn, all_finished=policy.all_finished)
    if comm.world > 1:
        tdist.barrier()
    if not comm.main:
        return None, []
    kept = [{"file": str(r["path"]), "mos": r["mos"], "prediction": r["score"]} for r in rows]
    return {k: metrics[k] for k in ("n", "srcc", "plcc", "krcc", "parse_failures")}, kept


def evaluate_and_log(cfg, run, step: int) -> dict | None:
    """Held-out evaluation: eval.jsonl, eval_items.jsonl (this evaluation's predictions), the curves
    and the run's page (rank 0)."""
    metrics, rows = held_out(cfg, run.policy, run.held, run.comm, run.warn)
    if run.comm.main:
        log_json(run.out / "eval.jsonl", {"step": step, **metrics})
        write_run_file(run.out / "eval_items.jsonl", "".join(json.dumps({"step": step, **r}) + "\n" for r in rows))
        if step:
            draw_run_curves(run.out)
        write_page(run)
    return metrics


def write_page(run) -> None:
    """report.html, refreshed from the logs: the curves, the logged answers, the held-out scatter. A
    page that cannot be written is warned about; the run goes on."""
    try:
        report_page.write_training_page(run.out, load_picture=data.read_visual)
    except Exception as e:  # a page is never worth a run
        run.warn(f"could not write {run.out / 'report.html'}: {type(e).__name__}: {e}")


def finish(cfg, run, first_eval: dict | None, last_eval: dict | None) -> Path:
    """Write final/, evaluate once more unless the last step just did, print the summary."""
    out, comm = run.out, run.comm
    # LoRA: rank 0 merges W + s B A (on the CPU); --fsdp: every rank gathers the shards
    weights = lora.merged_weights(run.model) if cfg.lora_rank and comm.main else full_weights(run.model)
    if comm.main:
        save_folder(out / "final", unwrap(run.model), run.policy.tokenizer, run.policy.image_processor,
                    weights=weights)
    if run.held and (not cfg.eval_every or run.steps % cfg.eval_every):
        last_eval = evaluate_and_log(cfg, run, run.steps)
    if not comm.main:
        return out
    draw_run_curves(out)
    write_page(run)
    if first_eval and last_eval:
        print(f"held-out {cfg.eval_split} ({first_eval['n']} items): SRCC {first_eval['srcc']:.3f} -> "
              f"{last_eval['srcc']:.3f}, PLCC {first_eval['plcc']:.3f} -> {last_eval['plcc']:.3f}")
    print(f"final model: {out / 'final'}   metrics: {out / 'metrics.jsonl'}   page: {out / 'report.html'}")
    return out
