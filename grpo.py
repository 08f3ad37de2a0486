"""GRPO for PreResQ-R1: the algorithm (pure functions), the configuration, one step, and the training loop.

    python grpo.py                                   # laptop demo: synthetic images, tiny preset, CPU
    python grpo.py --data koniq --data-root ~/data/koniq10k --model Qwen/Qwen2.5-VL-7B-Instruct
    torchrun --nproc_per_node 8 grpo.py --data kadid --data-root ~/data/kadid10k --model ...
    python grpo.py --out runs/koniq --resume         # after a crash, Ctrl-C or full disk

One step of the paper's GRPO, in the order grpo_step runs it (each line names its function):
  1. take B images of one dataset                                     (the loop: runkeeping.BatchSampler)
  2. choose the stage: prompts, G, spread penalty                     explore_stable
  3. sample G answers per image at temperature T                      sample_rollout -> preresq.sample_completions
  4. parse the aspect scores and reward every answer                  score_rollout -> rewards.REWARDS[...]
  5. group advantage A = (r - mean_G r) / (std_G r + 1e-4)             group_advantages
  6. reference log-probs (frozen initial model), and old-policy log-probs when mu > 1    reference_logprobs
  7. loss = aggregate( -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta * KL_k3 ), backward  policy_update, grpo_loss
  8. grad-norm clip 1.0, AdamW at the linearly decaying learning rate                 optimizer_step

As the authors ran it: one update per batch (mu = 1), so the ratio rho is exactly 1 and the clip never
acts (the loss reads ~0 while gradients are not); k3 KL to the initial model, beta = 0.04; "grpo"
aggregation averages each sequence's tokens, then the sequences. Deviations: README. B is per process
under torchrun (the authors' script: 8 images x G 6 = 48 answers per device). The step needs only this
file, rewards.py, preresq.py and support/prompt_sharing.py; it reaches other processes through `comm`
(OneProcess, or support.distributed.Ranks); the loop's run-keeping comes in where the loop starts.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import preresq
import rewards
from support import prompt_sharing

# --------------------------------------------------------------------------- the algorithm

def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (GRPO).

    rewards: (B, G) -> (B, G).  A[i, j] = (r[i, j] - mean_j r[i, :]) / (std + eps) where std is the
    unbiased std of the group ("group", the paper's), of the whole batch ("batch"), or 1 ("none",
    Dr. GRPO). A group of one answer has no baseline: its advantage is 0.
    """
    g = rewards.shape[1]
    if g < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(1, keepdim=True) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale == "none":
        return centred
    raise ValueError(f"unknown advantage scaling {scale!r}: use group, batch or none")


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0.

    logp, ref_logp: (N, C) -> (N, C).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float):
    """PPO's clipped objective, per token, as a loss: -min(rho A, clip(rho, 1-eps, 1+eps) A).

    logp, old_logp: (N, C); advantages: (N,) one per sequence. Returns (loss (N, C), clipped (N, C)
    bool: tokens where the clipped branch was taken).
    """
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a
    return -torch.min(unclipped, clipped), clipped < unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo", max_len: int | None = None,
              num_sequences: int | None = None, num_tokens: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss (N, C) with mask (N, C) to a scalar.

    grpo:    mean over sequences of each sequence's token mean (the paper's).
    dapo:    sum over all tokens / number of tokens (token-level; TRL's default).
    dr_grpo: sum over all tokens / (sequences * max_len) (no length bias).
    num_sequences / num_tokens: totals over the whole batch when `per_token` is one micro-batch,
    so that the micro-batch losses add up to the full-batch loss exactly.
    """
    mask = mask.to(per_token.dtype)
    n = num_sequences or per_token.shape[0]
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n
    if loss_type == "dapo":
        return (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (n * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown loss type {loss_type!r}: use grpo, dapo or dr_grpo")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta: float, epsilon: float, loss_type: str = "grpo",
              max_len: int | None = None, num_sequences: int | None = None, num_tokens: float | None = None,
              reasoning: torch.Tensor | None = None, reasoning_beta: float | None = None):
    """The GRPO objective as a loss: aggregate(clipped surrogate + beta * KL_k3).

    logp, old_logp, ref_logp: (N, C) (ref_logp None when beta = 0); advantages: (N,); mask (N, C).
    reasoning (N, C) bool and reasoning_beta: the reasoning tokens' own KL coefficient (the paper
    uses beta on every token; see --reasoning-beta). Returns (loss, stats) with stats = per-token
    mean KL and clip fraction (detached floats).
    """
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, epsilon)
    m = mask.bool()
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if reasoning is not None and reasoning_beta is not None:
        per_token = per_token + torch.where(reasoning.to(kl.device), reasoning_beta, beta) * kl
    elif beta:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, max_len, num_sequences, num_tokens)
    count = m.sum().clamp(min=1)
    return loss, {"kl": float(kl.detach()[m].sum() / count), "clip_fraction": float(clipped[m].sum() / count)}


@dataclass(frozen=True)
class Stage:
    """What one step trains with: its stage (1 explore, 2 stabilise), prompt pool, G, spread penalty."""
    number: int
    prompts: tuple[str, ...]
    num_generations: int
    spread_penalty: bool


def explore_stable(cfg: "Config", step: int) -> Stage:
    """Exploration-to-Stability (the paper's framework figure): stage 1 for the first stage1_steps steps, then stage 2.

    Stage 1 explores: each image's prompt is drawn from a pool of paraphrases
    (preresq.IMAGE_PROMPT_POOL), G = stage1_generations (2 x num_generations: 12, as in the paper's
    ablation figure), the aspect-spread penalty on. Stage 2 stabilises: one fixed prompt, G = stage2_generations
    (num_generations: 6), no spread penalty. --schedule single trains every step like the public
    code: one prompt, G = num_generations, the penalty always on (reported as stage 2).
    """
    if cfg.schedule != "explore-stable":
        return Stage(2, (preresq.IMAGE_PROMPT,), cfg.num_generations, True)
    if step < cfg.stage1_steps:
        return Stage(1, preresq.IMAGE_PROMPT_POOL, cfg.stage1_generations, True)
    return Stage(2, (preresq.IMAGE_PROMPT,), cfg.stage2_generations, False)


def step_prompts(stage: Stage, seed: int, step: int, n: int, video: bool) -> list[str]:
    """The n prompts of a step: drawn from the stage's pool, seeded by (seed, step); videos have one."""
    if video:
        return [preresq.VIDEO_PROMPT] * n
    if len(stage.prompts) == 1:
        return [stage.prompts[0]] * n
    rng = random.Random(seed * 1_000_003 + step)
    return [rng.choice(stage.prompts) for _ in range(n)]


# --------------------------------------------------------------------------- configuration

def flag(default, type_, help: str, group: str, **argparse_options):
    """A Config field and its command-line flag --name: its default, type and help in one place."""
    return field(default=default, metadata=dict(type=type_, help=help, group=group, **argparse_options))


# Presets (laptop models) need far larger learning rates and shorter answers than the paper's 7B.
PAPER_DEFAULTS = dict(images_per_step=8, num_generations=6, schedule="explore-stable", lr=1e-6, beta=0.04,
                      max_new_tokens=256, epochs=8, eval_every=100, save_every=200, eval_size=None, eval_samples=None,
                      gradient_checkpointing=False)
# The authors' video recipe (LSVQ, from the image checkpoint): a real checkpoint on video sets only.
PAPER_VIDEO_DEFAULTS = dict(PAPER_DEFAULTS, images_per_step=5, num_generations=5, schedule="single",
                            epochs=2, gradient_checkpointing=True)
VIDEO_SETS = ("lsvq", "konvid", "livevqc", "youtube-ugc", "synthetic-video")
PRESET_DEFAULTS = {
    "tiny": dict(images_per_step=8, num_generations=6, schedule="explore-stable", lr=5e-4, beta=0.04,
                 reasoning_beta=0.5, max_new_tokens=64, steps=300, eval_every=50, save_every=100, eval_size=None,
                 eval_samples=4, gradient_checkpointing=False),
    "small": dict(images_per_step=8, num_generations=8, schedule="explore-stable", lr=5e-4, beta=0.0,
                  max_new_tokens=64, steps=150, eval_every=25, save_every=50, eval_size=96, eval_samples=None,
                  gradient_checkpointing=False),
}


class ConfigError(ValueError):
    """A configuration that cannot train; the message names the flags. The tools exit 2."""
    exit_status = 2


@dataclass
class Config:
    """Everything a run depends on; saved in every checkpoint and compared on --resume.
    None means: the preset's default (PRESET_DEFAULTS) or the paper's (PAPER_DEFAULTS)."""
    data: str = flag("synthetic", str, "dataset name(s), comma-separated; each step's images come from one "
                     "set", "data")
    data_root: str = flag(None, str, "dataset folder(s), comma-separated in the order of --data", "data")
    labels: str = flag(None, str, "a label file in the one-line-per-item GT format (with --data labels)", "data")
    split: str = flag("train", str, "training split", "data")
    eval_split: str = flag("test", str, "held-out split for --eval-every ('none' to skip)", "data")
    model: str = flag("tiny", str, "preset (tiny, small), local checkpoint folder, or hub id", "model")
    out: str = flag(None, str, "output folder (default: runs/<data>-<model>-<time>)", "run")
    steps: int = flag(None, int, "optimizer steps", "run")
    epochs: float = flag(None, float, "passes over the training split (used when --steps is not given)", "run")
    images_per_step: int = flag(None, int, "B, images per step and process", "GRPO")
    num_generations: int = flag(None, int, "G, answers per image (explore-stable: stage 2's, 2 G in stage 1)", "GRPO")
    lr: float = flag(None, float, "AdamW learning rate, linear decay to 0", "GRPO")
    beta: float = flag(None, float, "KL coefficient; 0 skips the reference model", "GRPO")
    reasoning_beta: float = flag(None, float, "KL coefficient of the reasoning tokens (inside <think>), when it "
                                 "differs from --beta's (paper: --beta on every token)", "GRPO")
    epsilon: float = flag(0.2, float, "PPO clip range", "GRPO")
    num_iterations: int = flag(1, int, "mu, updates per batch (the ratio differs from 1 only when mu > 1)", "GRPO")
    temperature: float = flag(1.0, float, "sampling temperature", "GRPO")
    top_k: int = flag(0, int, "sample among the k likeliest tokens; 0: the whole distribution, whose "
                      "log-probs GRPO computes (the authors' training most likely sampled with top_k 50)", "GRPO")
    max_new_tokens: int = flag(None, int, "answer length limit in tokens", "GRPO")
    loss_type: str = flag("grpo", str, "loss aggregation", "GRPO", choices=["grpo", "dapo", "dr_grpo"])
    scale_rewards: str = flag("group", str, "advantage std scaling", "GRPO", choices=["group", "batch", "none"])
    compare_across_processes: bool = flag(False, bool, "under torchrun: the preference branch compares the "
                                          "whole global batch (default: each process's B images, as the "
                                          "paper's per-device reward)", "reward")
    reward: str = flag("preresq", str, "reward function", "reward", choices=list(rewards.REWARDS))
    response_branch: bool = flag(True, bool, "drop the response branch (aspect-spread penalty, triplet balance)",
                                 "reward")
    preference_branch: bool = flag(True, bool, "drop the preference branch (pair fidelity, triplet accuracy, "
                                   "group rank)", "reward")
    schedule: str = flag(None, str, "explore-stable: stage 1 prompt pool, spread penalty and G1; stage 2 "
                         "fixed prompt and G2 (explore_stable); single: the public code's one stage", "schedule",
                         choices=["single", "explore-stable"])
    stage1_steps: int = flag(None, int, "length of stage 1 (default: half the run's steps)", "schedule")
    stage1_generations: int = flag(None, int, "G in stage 1 (default: 2 x --num-generations)", "schedule")
    stage2_generations: int = flag(None, int, "G in stage 2 (default: --num-generations)", "schedule")
    weight_decay: float = flag(0.0, float, "AdamW weight decay", "GRPO")
    max_grad_norm: float = flag(1.0, float, "gradient-norm clip", "GRPO")
    seed: int = flag(42, int, "seed of the synthetic sets, random splits, data order, sampling and evaluation", "run")
    device: str = flag(None, str, "cpu or cuda (default: cuda when available)", "model")
    dtype: str = flag(None, str, "weights and activations (default: bfloat16 on CUDA, float32 on the CPU)",
                      "model", choices=["float32", "bfloat16", "float16"])
    micro_batch_size: int = flag(None, int, "completions per forward/backward (default: all)", "scale")
    gradient_checkpointing: bool = flag(None, bool, "trade compute for activation memory", "scale")
    fsdp: bool = flag(False, bool, "under torchrun: shard model, gradients and optimizer state (FSDP2)", "scale")
    reference_device: str = flag(None, str, "where the frozen reference model lives (e.g. cpu to save GPU "
                                 "memory; default: with the policy)", "scale")
    lora_rank: int = flag(None, int, "train adapters of rank R, not the weights; no reference copy (lora.py)", "LoRA")
    lora_alpha: float = flag(None, float, "adapter output scale alpha / R (default alpha: 2 x R)", "LoRA")
    lora_dropout: float = flag(0.0, float, "dropout on the adapters' input (0: log-probs of what was sampled)", "LoRA")
    lora_targets: str = flag("language", str, "where adapters go: language, vision, merger, comma-"
                             "separated", "LoRA")
    max_pixels: int = flag(None, int, "pixel budget per picture (default: the processor's)", "data")
    eval_every: int = flag(None, int, "held-out evaluation every N steps", "run")
    eval_size: int = flag(None, int, "held-out items per evaluation (default: all)", "run")
    eval_samples: int = flag(None, int, "sampled answers averaged per held-out item (default: greedy)", "run")
    save_every: int = flag(None, int, "checkpoint every N steps", "run")
    keep_last: int = flag(None, int, "keep only the newest K checkpoints", "run")
    workers: int = flag(2, int, "threads that load the next step's pictures", "run")
    log_rollouts: int = flag(None, int, "keep every answer of every Nth step, with its scores, reward terms and "
                             "advantage, in rollouts.jsonl (0: never; default: the evaluation interval)", "run")

    def resolve(self) -> "Config":
        """Fill unset values from the preset's or the paper's defaults and check the combination."""
        video = all(name in VIDEO_SETS for name in self.data.split(","))
        defaults = PRESET_DEFAULTS.get(self.model, PAPER_VIDEO_DEFAULTS if video else PAPER_DEFAULTS)
        for key, value in defaults.items():
            if key not in ("steps", "epochs") and getattr(self, key) is None:
                setattr(self, key, value)
        if self.steps is None and self.epochs is None:  # presets count steps, the paper epochs
            self.steps, self.epochs = defaults.get("steps"), defaults.get("epochs")
        g = self.num_generations  # the paper's G = 6: 12 answers per image in stage 1, 6 in stage 2
        self.stage1_generations = 2 * g if self.stage1_generations is None else self.stage1_generations
        self.stage2_generations = g if self.stage2_generations is None else self.stage2_generations
        if self.log_rollouts is None:
            self.log_rollouts = self.eval_every or 0
        if self.steps:  # an --epochs run's length is known once its data are (runkeeping.prepare)
            self.set_length()
        self.check()
        return self

    def set_length(self, num_images: int | None = None, world: int = 1) -> None:
        """Fix the run's length: --steps, or --epochs over num_images training images (B x world a
        step); stage 1 is the first half unless --stage1-steps says otherwise."""
        self.steps = self.steps or math.ceil(self.epochs * num_images / (self.images_per_step * world))
        if self.schedule == "explore-stable" and self.stage1_steps is None:
            self.stage1_steps = self.steps // 2

    def stage(self, step: int) -> int:
        return explore_stable(self, step).number

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (0-based): --lr decaying linearly to 0 over the run."""
        return self.lr * max(0.0, 1 - step / self.steps)

    def check(self) -> None:
        need = [("images_per_step", 1, ""), ("num_iterations", 1, ""), ("steps", 1, ""), ("micro_batch_size", 1, ""),
                ("max_new_tokens", 8, " (an answer needs room)"), ("top_k", 0, "")] + [
            (k, 2, " (a group advantage compares the answers to one image: with one, every advantage is 0 and "
                   "nothing is learned)") for k in ("num_generations", "stage1_generations", "stage2_generations")]
        errors = [f"--{k.replace('_', '-')} must be at least {low}{why}" for k, low, why in need
                  if getattr(self, k) is not None and getattr(self, k) < low]
        if self.reward not in rewards.REWARDS:
            errors.append(f"--reward must be one of {', '.join(rewards.REWARDS)}")
        if self.reward != "preresq" and not (self.response_branch and self.preference_branch):
            errors.append("--no-response-branch / --no-preference-branch apply to --reward preresq only")
        if not (self.response_branch or self.preference_branch):
            errors.append("dropping both branches leaves only the format reward; keep at least one")
        if not self.temperature > 0:
            errors.append("--temperature must be > 0 (GRPO needs sampled answers)")
        if self.fsdp and self.reference_device:
            errors.append("--fsdp shards the reference model with the policy; drop --reference-device")
        if errors:
            raise ConfigError("; ".join(errors))


# --------------------------------------------------------------------------- one step

class OneProcess:
    """What a step exchanges with the other processes, for one process: nothing. Under torchrun the
    loop passes support.distributed.Ranks: the same methods, for real (gather the parsed scores and
    each process's number of images; sum a few numbers; sum the gradients, as DDP does)."""
    rank = 0

    def gather_scores(self, batch_size: int, mos, scores, valid, fmt):
        return mos, scores, valid, fmt, [len(mos)]

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def sum_gradients(self, model) -> None:  # one process: its gradients are the sum
        pass


@dataclass
class Rollout:
    """One step's sampled answers on this process's n images (n may be 0 under torchrun).
    prompts: the n prompts (not repeated); completions, mask: (n*G, C), rows grouped by image;
    texts: n*G decoded answers; questions: the n prompt texts; mos: (n,); reasoning: (n*G, C) bool,
    the reasoning tokens (only when --reasoning-beta is set); suppressed: token ids never sampled.
    """
    prompts: preresq.PromptBatch | None
    completions: torch.Tensor | None
    mask: torch.Tensor | None
    texts: list[str]
    mos: torch.Tensor
    num_generations: int
    video: bool
    suppressed: list[int]
    reasoning: torch.Tensor | None = None
    questions: list[str] = field(default_factory=list)


def sample_rollout(cfg: Config, model, tokenizer, image_processor, items, visuals, stage: Stage, step: int,
                   video: bool, rank: int = 0) -> Rollout:
    """Step 3: G answers per image, sampled at the temperature from the current policy."""
    g, suppressed = stage.num_generations, preresq.suppressed_ids(tokenizer)
    mos = torch.tensor([it.mos for it in items], dtype=torch.float32)
    if not items:
        return Rollout(None, None, None, [], mos, g, video, suppressed)
    first = rank * cfg.images_per_step  # where this process's images start in the global batch
    questions = step_prompts(stage, cfg.seed, step, first + len(items), video)[first:]
    prompts = preresq.encode_prompts(tokenizer, image_processor, visuals, questions, video=video)
    model.eval()
    comp = preresq.sample_completions(model, tokenizer, prompts, g, temperature=cfg.temperature,
                                      max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k)
    mask = preresq.completion_mask(comp, tokenizer.convert_tokens_to_ids(preresq.END_OF_TURN))
    texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
    reasoning = preresq.reasoning_mask(tokenizer, comp, mask) if cfg.reasoning_beta is not None else None
    return Rollout(prompts, comp, mask, texts, mos, g, video, suppressed, reasoning, questions)


@dataclass
class Scored:
    """Steps 4-5 on the global batch: the reward terms (N, G) of each name ("total" included), the
    parsed scores (N, G, A), which parsed (N, G), the MOS (N,), the answers' tokens and number;
    `own`: this process's rows; advantages: its (n*G,), None when the step cannot teach anything
    (no readable image, or a non-finite reward: then `problem` says which)."""
    terms: dict
    scores: torch.Tensor
    valid: torch.Tensor
    mos: torch.Tensor
    tokens: float
    sequences: float
    own: slice
    advantages: torch.Tensor | None = None
    problem: dict = field(default_factory=dict)


def score_rollout(cfg: Config, rollout: Rollout, stage: Stage, comm=OneProcess()) -> Scored:
    """Steps 4-5: parse and reward the answers of the global batch, then group advantages."""
    num_aspects = len(preresq.VIDEO_ASPECTS if rollout.video else preresq.IMAGE_ASPECTS)
    scores, valid, fmt = rewards.parse_completions(rollout.texts, num_aspects, rollout.num_generations)
    mos, scores, valid, fmt, sizes = comm.gather_scores(cfg.images_per_step, rollout.mos, scores, valid, fmt)
    tokens, sequences = comm.sum([rollout.mask.sum().item() if rollout.mask is not None else 0, len(rollout.texts)])
    own = slice(sum(sizes[:comm.rank]), sum(sizes[:comm.rank + 1]))
    if not len(mos):
        return Scored({}, scores, valid, mos, tokens, sequences, own, problem={"skipped": "no readable images"})
    # The preference branch compares the images of a batch: each process's own (the authors'
    # per-device reward), or the global batch with --compare-across-processes.
    groups = [len(mos)] if cfg.compare_across_processes else sizes
    parts = [reward_terms(cfg, stage, *(x.split(groups)[k] for x in (scores, mos, valid, fmt)), rollout.video)
             for k in range(len(groups)) if groups[k]]
    terms = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    scored = Scored(terms, scores, valid, mos, tokens, sequences, own)
    if not torch.isfinite(terms["total"]).all():
        scored.problem = {"nonfinite": "reward"}
    else:
        scored.advantages = group_advantages(terms["total"], cfg.scale_rewards)[own].reshape(-1)
    return scored


def reward_terms(cfg: Config, stage: Stage, scores, mos, valid, fmt, video: bool) -> dict[str, torch.Tensor]:
    """The configured reward of parsed answers: scores (B, G, A), mos (B,), valid and format (B, G)
    -> dict of (B, G) tensors ("total" and each term)."""
    kwargs = dict(format_rewards=fmt)
    if cfg.reward == "preresq":
        kwargs.update(video=video, response_branch=cfg.response_branch, preference_branch=cfg.preference_branch)
        if not stage.spread_penalty:
            kwargs["w_std"] = 0.0
    return rewards.REWARDS[cfg.reward](scores, mos, valid, **kwargs)


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row slices of at most `size` (all n rows when size is None)."""
    size = size or n
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


@torch.no_grad()
def reference_logprobs(model, rollout: Rollout, cfg: Config) -> torch.Tensor:
    """Step 6: log-probs (n*G, C) under a frozen model (the reference, or the old policy when mu > 1),
    each prompt once, its answers micro-batch by micro-batch; the model may be on another device."""
    home, device = rollout.completions.device, next(model.parameters()).device
    comp, mask = rollout.completions.to(device), rollout.mask.to(device)
    cache = preresq.cache_prompts(model, rollout.prompts)
    out = [preresq.completion_logprobs(model, cache, comp[r], mask[r], temperature=cfg.temperature,
                                       num_generations=rollout.num_generations, suppressed=rollout.suppressed, rows=r)
           for r in micro_batches(comp.shape[0], cfg.micro_batch_size)]
    return torch.cat(out).to(home)


def policy_update(model, rollout: Rollout, advantages, old_logp, ref_logp, cfg: Config, *,
                  num_sequences: int | None = None, num_tokens: float | None = None) -> dict:
    """Step 7: loss and gradients of one GRPO update, micro-batched; returns loss/KL/clip statistics.
    Each prompt runs once (B rows, with its graph); each micro-batch of answers back-propagates into
    detached copies of its keys and values, whose summed gradients then flow once through the
    prompt's forward (prompt_sharing.backward): exactly one full-batch backward. num_sequences,
    num_tokens: the global batch's totals under torchrun (default: this process's)."""
    model.train()
    comp, mask, g = rollout.completions, rollout.mask, rollout.num_generations
    cache = preresq.cache_prompts(model, rollout.prompts)
    leaves = prompt_sharing.detached(cache)
    num_tokens = torch.as_tensor(num_tokens if num_tokens is not None else mask.sum().clamp(min=1)).float()
    total, stats = 0.0, {"kl": 0.0, "clip_fraction": 0.0}
    for r in micro_batches(comp.shape[0], cfg.micro_batch_size):
        logp = preresq.completion_logprobs(model, leaves, comp[r], mask[r], temperature=cfg.temperature,
                                           num_generations=g, suppressed=rollout.suppressed, rows=r)
        loss, st = grpo_loss(logp, old_logp[r] if old_logp is not None else logp.detach(),
                             ref_logp[r] if ref_logp is not None else None, advantages[r], mask[r],
                             beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, max_len=cfg.max_new_tokens,
                             num_sequences=num_sequences or comp.shape[0], num_tokens=num_tokens,
                             reasoning=rollout.reasoning[r] if rollout.reasoning is not None else None,
                             reasoning_beta=cfg.reasoning_beta)
        loss.backward()
        share = mask[r].sum().item() / num_tokens.item()
        total += loss.item()
        stats = {k: stats[k] + v * share for k, v in st.items()}
    prompt_sharing.backward(cache, leaves)
    return {"loss": total, **stats}


def optimizer_step(model, optimizer, stats: dict, cfg: Config, step: int, comm=OneProcess()) -> dict:
    """Step 8: sum gradients over processes, clip the norm, AdamW at cfg.learning_rate(step). Skipped
    (gradients dropped) when the loss or the gradient norm is not finite; returns the statistics
    over the global batch."""
    comm.sum_gradients(model)
    stats = dict(zip(stats, comm.sum(list(stats.values()))))
    lr = cfg.learning_rate(step)
    stats["lr"] = lr
    if not math.isfinite(stats["loss"]):
        optimizer.zero_grad(set_to_none=True)
        return {**stats, "nonfinite": "loss"}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # --fsdp: the norm of the sharded gradient
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return {**stats, "nonfinite": "gradient"}
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return {**stats, "grad_norm": grad_norm.item()}


def update(cfg: Config, model, reference, optimizer, rollout: Rollout, advantages, step: int,
           comm=OneProcess(), totals: tuple[float, float] | None = None) -> dict:
    """Steps 6-8: reference log-probs, then mu policy updates. totals: the global batch's answer
    tokens and answers (Scored.tokens, .sequences), summed here when not given."""
    advantages = advantages.to(next(model.parameters()).device)
    tokens, sequences = totals or comm.sum([rollout.mask.sum().item() if rollout.mask is not None else 0,
                                            len(rollout.texts)])
    sampled = rollout.completions is not None
    t1 = time.time()
    ref_logp = reference_logprobs(reference, rollout, cfg) if reference is not None and sampled else None
    old_logp = reference_logprobs(model, rollout, cfg) if cfg.num_iterations > 1 and sampled else None
    record = {"reference_seconds": round(time.time() - t1, 3)}
    t2 = time.time()
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        if sampled:
            stats = policy_update(model, rollout, advantages, old_logp, ref_logp, cfg,
                                  num_sequences=int(sequences), num_tokens=max(tokens, 1))
        stats = optimizer_step(model, optimizer, stats, cfg, step, comm)
        if "nonfinite" in stats:
            return {**record, **stats}
    return {**record, **stats, "policy_seconds": round(time.time() - t2, 3)}


@dataclass
class Step:
    """One step's answers, their rewards and advantages, the update's statistics (loss, KL, lr, ...)."""
    rollout: Rollout
    scored: Scored
    stats: dict


def grpo_step(cfg: Config, model, reference, tokenizer, image_processor, optimizer, items, visuals, step: int,
              video: bool, comm=OneProcess()) -> Step:
    """One GRPO step (steps 2-8) on this process's images of the global batch."""
    stage = explore_stable(cfg, step)
    t0 = time.time()
    rollout = sample_rollout(cfg, model, tokenizer, image_processor, items, visuals, stage, step, video, comm.rank)
    stats = {"generation_seconds": round(time.time() - t0, 3)}
    scored = score_rollout(cfg, rollout, stage, comm)
    if scored.advantages is not None:
        stats.update(update(cfg, model, reference, optimizer, rollout, scored.advantages, step, comm,
                            (scored.tokens, scored.sequences)))
    return Step(rollout, scored, {**stats, **scored.problem})


# --------------------------------------------------------------------------- the loop and its command line

def train(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    """Run GRPO as configured (every process under torchrun); returns the output folder."""
    from support import distributed, runkeeping  # the machinery comes in here, not into the step

    dist, device = distributed.init_distributed(cfg.device)
    try:
        return loop(cfg, runkeeping.prepare(cfg, resume, force, dist, device))
    finally:
        distributed.leave(dist)


def loop(cfg: Config, run) -> Path:
    """One grpo_step per step, with evaluation, logs and checkpoints around it (run: runkeeping.Run)."""
    from tqdm import tqdm

    from support import runkeeping

    first_eval = last_eval = None
    bar = tqdm(range(run.start, run.steps), initial=run.start, total=run.steps, desc="GRPO", dynamic_ncols=True,
               disable=not run.dist.main)
    with runkeeping.Stop() as stop, runkeeping.Prefetch(run, cfg.max_pixels, cfg.workers) as pictures, bar:
        if run.held and run.start == 0:
            first_eval = runkeeping.evaluate_and_log(cfg, run, 0)
        for step in bar:
            t0 = time.time()
            items, visuals, problems = run.comm.in_step(*pictures.load(step))
            done = grpo_step(cfg, run.model, run.reference, run.tokenizer, run.image_processor, run.optimizer,
                             items, visuals, step, run.sampler.is_video(step), run.comm)
            record = runkeeping.log_step(cfg, run, step, done, items, problems, time.time() - t0)
            if run.held and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                last_eval = runkeeping.evaluate_and_log(cfg, run, step + 1)
            bar.set_postfix({"reward": f"{record.get('reward', float('nan')):.3f}",
                             **({"srcc": f"{last_eval['srcc']:.3f}"} if last_eval else {})})
            runkeeping.checkpoint_if_due(cfg, run, step + 1, stop)  # Ctrl-C, SIGTERM: saves, then Stopped
    return runkeeping.finish(cfg, run, first_eval, last_eval)


def command(argv=None) -> None:
    """`python grpo.py ...`: --help lists every Config field as a flag (support.runkeeping.parse_args)."""
    from support import runkeeping

    cfg, resume, force = runkeeping.parse_args(argv)
    try:
        train(cfg, resume=resume, force=force)
    except KeyboardInterrupt as stop:  # a run stopped at its checkpoint, a second Ctrl-C, one before training
        runkeeping.say_how_to_resume(cfg.out, stop)
        raise


def main(argv=None) -> int:
    """Exit 0 when trained, 2 for bad usage or input (nothing is created), 1 when the run failed part
    way (what is intact is said), 130 when Ctrl-C or SIGTERM stopped it (a checkpoint is saved first)."""
    from support.cli import entry

    return entry("grpo.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
