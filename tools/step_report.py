"""What the step bench prints and returns: each measured step's times (StepTimes), its line, the
summary over the timed steps (medians) and its table, and LoRA against full fine-tuning."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

# Phases of one GRPO step, in the order the training loop runs them (step_bench.py says how each is delimited).
PHASES = ("pictures", "generation", "reward", "reference", "policy_forward", "policy_backward", "optimizer",
          "logging")
PHASE_NAMES = dict(pictures="picture loading", generation="generation", reward="reward",
                   reference="reference pass", policy_forward="policy forward", policy_backward="policy backward",
                   optimizer="optimizer", logging="logging")


@dataclass
class StepTimes:
    """One measured step: seconds per phase (PHASES; reference is 0 when beta = 0), the step's wall
    time (`step`, the phases and the few untimed lines of grpo_step between them), the completion
    tokens it sampled, the peak bytes over the step, and whether every advantage was 0 (all
    answers to each picture scored alike: the update's policy-gradient term is then 0)."""
    seconds: dict[str, float]
    step: float
    generated_tokens: int
    peak: int
    flat_advantages: bool = False

    @property
    def policy(self) -> float:
        return self.seconds["policy_forward"] + self.seconds["policy_backward"]

    @property
    def untimed(self) -> float:
        return self.step - sum(self.seconds.values())


def describe(settings, summary: dict, items: list | None) -> str:
    """The bench's first line: the shapes and the flags (settings: step_bench.StepBench)."""
    s = settings
    width, height = s.image_size
    pictures = f"{len(items)} labelled pictures" if items is not None else "random pictures"
    return (f"B={s.images_per_step} G={s.num_generations}: {summary['visual_tokens']} visual tokens per picture "
            f"({width}x{height}, {pictures}), {summary['prompt_tokens']} prompt tokens, up to {s.max_new_tokens} "
            f"completion tokens; beta={s.beta}, lr={s.lr:g} decaying over {s.warmup_steps + s.steps} steps, "
            f"micro-batch {s.micro_batch_size or s.images_per_step * s.num_generations}, "
            f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; "
            f"{f'LoRA rank {s.lora_rank}' if s.lora_rank else 'full fine-tuning'}, "
            f"{summary['trained_parameters'] / 1e6:,.3f} M trained parameters")


def step_line(label: str, times: StepTimes, done) -> str:
    """One step's line (done: its grpo.Step): its seconds, the main phases, what it sampled, its
    reward and its peak."""
    reward = done.scored[0].terms.get("total")  # the bench's step has one group
    problem = f", {done.stats['nonfinite']} not finite: optimizer skipped" if "nonfinite" in done.stats else ""
    return (f"{label:>8}: {times.step:7.3f} s (generation {times.seconds['generation']:.3f}, reference "
            f"{times.seconds['reference']:.3f}, policy {times.policy:.3f}), {times.generated_tokens} tokens, "
            f"reward {reward.mean().item() if reward is not None else float('nan'):.3f}"
            f"{' (all alike: advantages 0)' if times.flat_advantages else ''}{problem}, "
            f"peak {times.peak / 2**30:.2f} GiB")


def medians(steps: list[StepTimes]) -> dict:
    """Medians over measured steps of each phase, the policy pass, the step and its untimed rest;
    the peak; completion tokens per second of generation and of the step."""
    out = {p: statistics.median(s.seconds[p] for s in steps) for p in PHASES}
    out.update(policy=statistics.median(s.policy for s in steps), step=statistics.median(s.step for s in steps),
               untimed=statistics.median(s.untimed for s in steps), peak_bytes=max(s.peak for s in steps),
               flat_steps=sum(s.flat_advantages for s in steps))
    out.update(generation_tokens_per_s=sum(s.generated_tokens for s in steps)
               / sum(s.seconds["generation"] for s in steps),
               step_tokens_per_s=statistics.median(s.generated_tokens for s in steps) / out["step"], steps=steps)
    return out


def phase_table(summary: dict, device: torch.device) -> str:
    """The summary as a table: one row per phase, the policy pass, the untimed rest, the step, the
    peak memory and the completion tokens per second."""
    rows = [(PHASE_NAMES[p], p) for p in PHASES] + [("policy fwd+bwd", "policy"), ("untimed rest", "untimed"),
                                                    ("step", "step")]
    lines = [f"median of {len(summary['steps'])} steps"]
    lines += [f"  {label:<20}{summary[key]:>8.3f} s" for label, key in rows]
    kind = "max allocated" if device.type == "cuda" else "resident set"
    lines.append(f"  {'peak memory':<20}{summary['peak_bytes'] / 2**30:>6.2f} GiB   ({kind})")
    lines.append(f"  completion tokens/s: generation {summary['generation_tokens_per_s']:.0f}, "
                 f"step {summary['step_tokens_per_s']:.0f}")
    if summary["flat_steps"]:
        lines.append(f"  in {summary['flat_steps']} of these steps every picture's answers scored alike (as an "
                     f"untrained model's do): the advantages were 0, the work the same")
    return "\n".join(lines)


def compare_lora(lora_run: dict, full: dict, rank: int, report=print) -> dict:
    """Print LoRA against full fine-tuning on the same shapes -> {"full_fine_tuning": full's summary,
    "ratios": {key: LoRA / full}} for trained_parameters, step, generation, reference, policy,
    optimizer and peak_bytes."""
    seconds = lambda v: f"{v:.3f} s"
    rows = [("trained parameters", "trained_parameters", lambda v: f"{v / 1e6:,.3f} M"), ("step", "step", seconds),
            ("generation", "generation", seconds), ("reference pass", "reference", seconds),
            ("policy fwd+bwd", "policy", seconds), ("optimizer", "optimizer", lambda v: f"{v:.4f} s"),
            ("peak memory", "peak_bytes", lambda v: f"{v / 2**30:.2f} GiB")]
    ratios, lines = {}, [f"LoRA rank {rank} against full fine-tuning on the same shapes (LoRA / full):"]
    for label, key, show in rows:
        ratios[key] = lora_run[key] / full[key] if full[key] else None
        ratio = f"{ratios[key]:.3f}" if ratios[key] is not None else "-"
        lines.append(f"  {label:<19}{show(lora_run[key])} / {show(full[key])} = {ratio}")
    report("\n".join(lines))
    return {"full_fine_tuning": full, "ratios": ratios}
