"""GRPO for PreResQ-R1: the algorithm (pure functions) and the training loop (CLI).

    python grpo.py                                   # laptop demo: synthetic images, preset model, CPU
    python grpo.py --data koniq --data-root ~/data/koniq10k --model Qwen/Qwen2.5-VL-7B-Instruct
    torchrun --nproc_per_node 8 grpo.py --data kadid --data-root ~/data/kadid10k --model ...   (see README)
    python grpo.py --out runs/koniq --resume         # after a crash, Ctrl-C or full disk (flags: the checkpoint's)

One step (paper §3, method.md §3; each line names its function):
  1. take B images of one dataset                              BatchSampler.batch
  2. sample G answers per image at temperature T               preresq.sample_completions
  3. parse the aspect scores, score every answer               rewards.parse_answer, rewards.REWARDS[...]
  4. group advantage A = (r - mean_G r) / (std_G r + 1e-4)      group_advantages
  5. reference log-probs (frozen initial model), and old-policy log-probs when mu > 1
  6. loss = aggregate( -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta * KL_k3 )   grpo_loss
  7. AdamW step, grad-norm clip 1.0, linear learning-rate decay

How this GRPO differs from textbook PPO, as the authors ran it: one update per batch (mu = 1), so
the ratio rho is exactly 1 and the clipping never acts (the loss reads ~0 while gradients are
not zero); the KL is the per-token k3 estimator against the initial model with beta = 0.04;
aggregation "grpo" averages each sequence's tokens, then the sequences. TRL's current defaults
differ (beta = 0, token-level "dapo" aggregation): both are flags here.

Deviations from the authors' code: parse failures get reward 0 and are left out of the other
answers' comparisons (the authors substitute p = 3.0); sampling settings are all explicit;
the Exploration-to-Stability schedule of the paper (not in the public code) is
`--schedule explore-stable`; presets (laptop models) use larger learning rates and shorter answers.

Several processes (torchrun; commands in the README's "Scaling" section). --images-per-step B is
per process, like the paper's "8 per device": a step trains on B x world images of one dataset,
the same global batch on every rank, each keeping its slice (BatchSampler). Only the parsed
scores and MOS travel (gather_scores), so rewards, advantages and metrics are those one process
would compute for the global batch. Each rank's loss is normalised by the global sequence and
token counts, and the gradients are summed by explicit bucketed all_reduces after the backward
(all_reduce_gradients), which is what DistributedDataParallel does: DDP's hooks do not fit the
policy pass, which runs the vision tower once, then calls the decoder and lm_head directly and
back-propagates micro-batch by micro-batch. --fsdp shards with FSDP2 instead (shard_model). The
machinery (process group, gathers, gradient buckets, FSDP2) lives in distributed.py.
Rank 0 alone writes logs, evaluations and checkpoints; sampling seeds differ per rank (rank_seed).
tests/test_distributed.py checks the gradient against one process's, to 1e-5.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

import data
import evaluate
from distributed import (SINGLE, Dist, all_reduce, all_reduce_gradients, call, check_global_batch, full_optimizer_state,
                         full_weights, gather_scores, init_distributed, is_sharded, load_optimizer_state, rank_seed,
                         shard_model, unwrap)
import preresq
import rewards

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


# --------------------------------------------------------------------------- configuration

# `python grpo.py` with no flags trains a preset on synthetic data. Presets are small models
# trained from a format warm-up, and need far larger learning rates and shorter answers than
# the paper's 7B model; these are their defaults (the paper's are in PAPER_DEFAULTS).
PAPER_DEFAULTS = dict(images_per_step=8, num_generations=6, lr=1e-6, beta=0.04, max_new_tokens=256,
                      epochs=8, eval_every=100, save_every=200, eval_size=None, eval_samples=None)
PRESET_DEFAULTS = {
    "tiny": dict(images_per_step=8, num_generations=8, lr=5e-4, beta=0.04, reasoning_beta=0.5, max_new_tokens=64,
                 steps=200, eval_every=25, save_every=100, eval_size=None, eval_samples=4),
    "small": dict(images_per_step=8, num_generations=8, lr=5e-4, beta=0.0, max_new_tokens=64,
                  steps=150, eval_every=25, save_every=50, eval_size=96, eval_samples=None),
}


@dataclass
class Config:
    """Everything a run depends on; saved in every checkpoint and compared on --resume."""
    data: str = "synthetic"
    data_root: str | None = None
    labels: str | None = None
    split: str = "train"
    eval_split: str = "test"
    model: str = "tiny"
    out: str | None = None
    steps: int | None = None
    epochs: float | None = None
    images_per_step: int | None = None
    num_generations: int | None = None
    lr: float | None = None
    beta: float | None = None
    reasoning_beta: float | None = None
    epsilon: float = 0.2
    num_iterations: int = 1
    temperature: float = 1.0
    max_new_tokens: int | None = None
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    reward: str = "preresq"
    response_branch: bool = True
    preference_branch: bool = True
    schedule: str = "single"
    stage1_steps: int | None = None
    stage1_generations: int = 12
    stage2_generations: int = 6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    device: str | None = None
    dtype: str | None = None
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False
    reference_device: str | None = None
    shared_vision: bool = True
    max_pixels: int | None = None
    eval_every: int | None = None
    eval_size: int | None = None
    eval_samples: int | None = None
    save_every: int | None = None
    keep_last: int | None = None
    workers: int = 2

    def resolve(self) -> "Config":
        """Fill unset values from the preset's or the paper's defaults and check the combination."""
        defaults = PRESET_DEFAULTS.get(self.model, PAPER_DEFAULTS)
        for key, value in defaults.items():
            if key in ("steps", "epochs"):
                continue
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.steps is None and self.epochs is None:
            if "steps" in defaults:
                self.steps = defaults["steps"]
            else:
                self.epochs = defaults["epochs"]
        if self.schedule == "explore-stable" and self.stage1_steps is None:
            self.stage1_steps = (self.steps or 0) // 2
        self.check()
        return self

    def check(self) -> None:
        errors = []
        if self.images_per_step < 1:
            errors.append("--images-per-step must be at least 1")
        for name in ("num_generations", "stage1_generations", "stage2_generations"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be at least 1")
        if self.reward not in rewards.REWARDS:
            errors.append(f"--reward must be one of {', '.join(rewards.REWARDS)}")
        if self.reward != "preresq" and not (self.response_branch and self.preference_branch):
            errors.append("--no-response-branch / --no-preference-branch apply to --reward preresq only")
        if not (self.response_branch or self.preference_branch):
            errors.append("dropping both branches leaves only the format reward; keep at least one")
        if self.loss_type not in ("grpo", "dapo", "dr_grpo"):
            errors.append("--loss-type must be grpo, dapo or dr_grpo")
        if self.scale_rewards not in ("group", "batch", "none"):
            errors.append("--scale-rewards must be group, batch or none")
        if self.schedule not in ("single", "explore-stable"):
            errors.append("--schedule must be single or explore-stable")
        if self.temperature <= 0:
            errors.append("--temperature must be > 0 (GRPO needs sampled answers)")
        if self.num_iterations < 1:
            errors.append("--num-iterations must be at least 1")
        if self.steps is not None and self.steps < 1:
            errors.append("--steps must be at least 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            errors.append("--micro-batch-size must be at least 1")
        if self.max_new_tokens < 8:
            errors.append("--max-new-tokens must be at least 8 (an answer needs room)")
        if self.fsdp and self.reference_device:
            errors.append("--fsdp shards the reference model with the policy; drop --reference-device")
        if errors:
            raise SystemExit("error: " + "; ".join(errors))

    def generations(self, stage: int) -> int:
        if self.schedule == "explore-stable":
            return self.stage1_generations if stage == 1 else self.stage2_generations
        return self.num_generations

    def stage(self, step: int) -> int:
        """Exploration-to-Stability (paper §4): stage 1 for the first stage1_steps steps, then 2."""
        return 1 if self.schedule == "explore-stable" and step < self.stage1_steps else 2


def parse_args(argv=None) -> tuple[Config, bool, bool]:
    """Command line -> (config, resume, force)."""
    p = argparse.ArgumentParser(
        description="Train a Qwen2.5-VL quality judge with GRPO and the PreResQ-R1 reward. With no flags: "
                    "synthetic images and the `tiny` preset on the CPU (a few minutes). Defaults marked "
                    "[preset|paper] differ between preset models (tiny, small) and real checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--data", default="synthetic", help="dataset name(s), comma-separated: each step's images come from one set "
      f"(known: {', '.join(data.DATASETS)})")
    a("--data-root", default=None, help="dataset folder(s), comma-separated in the order of --data")
    a("--labels", default=None, help="a label file in the one-line-per-item GT format (with --data labels)")
    a("--split", default="train", help="training split")
    a("--eval-split", default="test", help="held-out split for --eval-every ('none' to skip)")
    a("--max-pixels", type=int, default=None, help="pixel budget per picture (default: the processor's)")
    # model
    a("--model", default="tiny", help="preset (tiny, small), local checkpoint folder, or hub id")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    a("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    a("--no-shared-vision", dest="shared_vision", action="store_false",
      help="run the vision tower once per completion (naive path, for comparison)")
    a("--micro-batch-size", type=int, default=None, help="completions per forward/backward (default: all)")
    a("--fsdp", action="store_true", help="under torchrun: shard the model, gradients and optimizer state over "
      "the processes (FSDP2), for models whose training state does not fit one GPU")
    a("--reference-device", default=None, help="where the frozen reference model lives (e.g. cpu to save GPU "
      "memory; default: with the policy)")
    # run
    a("--out", default=None, help="output folder (default: runs/<data>-<model>-<time>)")
    a("--steps", type=int, default=None, help=f"optimizer steps [tiny: {PRESET_DEFAULTS['tiny']['steps']} | paper: from --epochs]")
    a("--epochs", type=float, default=None, help="passes over the training split [paper: 8]")
    a("--seed", type=int, default=42)
    a("--eval-every", type=int, default=None, help=f"held-out evaluation every N steps [tiny: {PRESET_DEFAULTS['tiny']['eval_every']} | paper: 100]")
    a("--eval-size", type=int, default=None, help=f"held-out items per evaluation [small: {PRESET_DEFAULTS['small']['eval_size']} | tiny, paper: all]")
    a("--eval-samples", type=int, default=None, help=f"sampled answers averaged per item, else greedy [tiny: {PRESET_DEFAULTS['tiny']['eval_samples']} | paper: greedy]")
    a("--save-every", type=int, default=None, help=f"checkpoint every N steps [tiny: {PRESET_DEFAULTS['tiny']['save_every']} | paper: 200]")
    a("--keep-last", type=int, default=None, help="keep only the newest K checkpoints")
    a("--workers", type=int, default=2, help="threads that load the next step's pictures")
    # GRPO
    a("--images-per-step", type=int, default=None, help="B, images per step and process (under torchrun a "
      "step trains on B x processes images) [8]")
    a("--num-generations", type=int, default=None, help=f"G, answers per image [tiny: {PRESET_DEFAULTS['tiny']['num_generations']} | paper: 6]")
    a("--lr", type=float, default=None, help=f"AdamW learning rate, linear decay [tiny: {PRESET_DEFAULTS['tiny']['lr']:g} | paper: 1e-6]")
    a("--beta", type=float, default=None, help=f"KL coefficient; 0 skips the reference model [tiny: {PRESET_DEFAULTS['tiny']['beta']:g} | paper: 0.04]")
    a("--reasoning-beta", type=float, default=None,
      help="KL coefficient of the reasoning tokens (inside <think> </think>) when it should differ from "
           "--beta's: held near the reference, a small model's reasoning keeps describing the picture "
           f"instead of drifting to fit its score [tiny: {PRESET_DEFAULTS['tiny']['reasoning_beta']:g} | "
           "paper: --beta, one coefficient for every token]")
    a("--epsilon", type=float, default=0.2, help="PPO clip range")
    a("--num-iterations", type=int, default=1, help="mu, updates per batch (ratio != 1 only when mu > 1)")
    a("--temperature", type=float, default=1.0, help="sampling temperature")
    a("--max-new-tokens", type=int, default=None, help=f"answer length limit [tiny: {PRESET_DEFAULTS['tiny']['max_new_tokens']} | paper: 256]")
    a("--loss-type", default="grpo", choices=["grpo", "dapo", "dr_grpo"], help="loss aggregation")
    a("--scale-rewards", default="group", choices=["group", "batch", "none"], help="advantage std scaling")
    a("--weight-decay", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=1.0)
    # reward
    a("--reward", default="preresq", choices=list(rewards.REWARDS), help="reward function")
    a("--no-response-branch", dest="response_branch", action="store_false",
      help="drop the response branch (aspect-spread penalty, triplet balance)")
    a("--no-preference-branch", dest="preference_branch", action="store_false",
      help="drop the preference branch (pair fidelity, triplet accuracy, group rank)")
    a("--schedule", default="single", choices=["single", "explore-stable"],
      help="explore-stable: stage 1 prompt pool + spread penalty + G1, stage 2 fixed prompt + G2")
    a("--stage1-steps", type=int, default=None, help="length of stage 1 (default: half the steps)")
    a("--stage1-generations", type=int, default=12, help="G in stage 1")
    a("--stage2-generations", type=int, default=6, help="G in stage 2")
    a("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    a("--force", action="store_true", help="with --resume: accept a configuration that differs from the checkpoint's")
    args = vars(p.parse_args(argv))
    resume, force = args.pop("resume"), args.pop("force")
    if resume:
        if not args["out"]:
            p.error("--resume needs --out DIR (the folder of the run to continue)")
        saved = saved_config(Path(args["out"]))
        if saved is None:
            p.error(f"--resume: no complete checkpoint in {args['out']}; start without --resume")
        # Flags not given on this command line come from the checkpoint, not from the defaults.
        unset = object()
        given = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(args, unset))))
        args = {k: saved.get(k, v) if given[k] is unset else given[k] for k, v in args.items()}
    return Config(**args).resolve(), resume, force


# --------------------------------------------------------------------------- data order

class BatchSampler:
    """Which images each step trains on: a pure function of (seed, step, global batch), so resuming
    needs only the step.

    Each step draws one dataset (in proportion to its size) and takes that set's next B x world
    images (the global batch) from a seeded permutation that is redrawn every epoch of that set;
    rank r keeps images r*B .. r*B+B-1 of them. Every rank computes the same global batch.
    """

    def __init__(self, sets: dict[str, list], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.sets, self.batch_size, self.seed = sets, batch_size * world, seed
        self.per_rank, self.rank = batch_size, rank
        self.names = list(sets)
        sizes = np.array([len(v) for v in sets.values()], dtype=float)
        self.weights = sizes / sizes.sum()
        self._choices: list[int] = []

    def _choice(self, step: int) -> int:
        while len(self._choices) <= step:
            rng = np.random.default_rng([self.seed, len(self._choices)])
            self._choices.append(int(rng.choice(len(self.names), p=self.weights)))
        return self._choices[step]

    def _order(self, k: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, k, epoch]).permutation(len(self.sets[self.names[k]]))

    def batch(self, step: int) -> tuple[str, list]:
        k = self._choice(step)
        seen = sum(1 for s in range(step) if self._choice(s) == k) * self.batch_size
        items, n = self.sets[self.names[k]], len(self.sets[self.names[k]])
        picks = [(seen + i) for i in range(min(self.batch_size, n))]
        mine = picks[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return self.names[k], [items[self._order(k, p // n)[p % n]] for p in mine]

    def dataset(self, step: int) -> str:
        """The training set that step `step` draws from (the same on every rank)."""
        return self.names[self._choice(step)]

    def epoch(self, step: int) -> float:
        """Passes over all training images completed before `step`."""
        return step * self.batch_size / sum(len(v) for v in self.sets.values())


def load_visuals(items: list, max_pixels: int | None) -> tuple[list, list, list[str]]:
    """Read each item's picture(s); an unreadable one is skipped and reported, never fatal."""
    kept, visuals, problems = [], [], []
    for item in items:
        try:
            v = preresq.read_visual(item.path, max_pixels=max_pixels)
        except data.DataError as e:
            problems.append(str(e))
            continue
        kept.append(item)
        visuals.append(v if isinstance(v, list) else [v])
    return kept, visuals, problems


# --------------------------------------------------------------------------- one step

def step_prompts(cfg: Config, stage: int, step: int, n: int, video: bool) -> list[str]:
    """Stage 1 of explore-stable draws each sample's prompt from the paraphrase pool; else one fixed prompt."""
    if video:
        return [preresq.VIDEO_PROMPT] * n
    if stage == 1:
        rng = random.Random(cfg.seed * 1_000_003 + step)
        return [rng.choice(preresq.IMAGE_PROMPT_POOL) for _ in range(n)]
    return [preresq.IMAGE_PROMPT] * n


def score_completions(cfg: Config, texts: list[str], mos: torch.Tensor, g: int, video: bool, stage: int):
    """Texts (B*G) -> (reward dict of (B, G) tensors, aspect scores (B, G, A), parse mask (B, G))."""
    num_aspects = len(preresq.VIDEO_ASPECTS if video else preresq.IMAGE_ASPECTS)
    scores, valid, fmt = rewards.parse_completions(texts, num_aspects, g)
    return reward_terms(cfg, scores, mos, valid, fmt, video, stage), scores, valid


def reward_terms(cfg: Config, scores, mos, valid, fmt, video: bool, stage: int) -> dict[str, torch.Tensor]:
    """The configured reward of parsed answers: scores (B, G, A), mos (B,), valid and format (B, G)
    -> dict of (B, G) tensors ("total" and each term)."""
    kwargs = dict(format_rewards=fmt)
    if cfg.reward == "preresq":
        kwargs.update(video=video, response_branch=cfg.response_branch, preference_branch=cfg.preference_branch)
        if cfg.schedule == "explore-stable" and stage == 2:
            kwargs["w_std"] = 0.0
    return rewards.REWARDS[cfg.reward](scores, mos, valid, **kwargs)


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


def micro_batches(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def lockstep(slices: list[slice], rounds: int | None) -> list[slice]:
    """Micro-batches padded to `rounds` by repeating the last one: under --fsdp every rank must run
    the same number of sharded forwards and backwards (the repeats are discarded or weighted 0)."""
    return slices + [slices[-1]] * ((rounds or len(slices)) - len(slices))


@torch.no_grad()
def reference_logprobs(model, prompts, comp, attn, cfg, g, suppressed, rounds: int | None = None) -> torch.Tensor:
    """Log-probs under a frozen model (reference or old policy), micro-batched, no graph.

    The model may live on another device than the policy (--reference-device cpu saves GPU
    memory): inputs go to it and the log-probs come back. rounds: see `lockstep`.
    """
    model.eval()
    home, device = comp.device, next(model.parameters()).device
    comp, attn = comp.to(device), attn.to(device)
    feats = call(model, preresq.image_features, prompts.to(device)) if cfg.shared_vision else None
    slices = micro_batches(comp.shape[0], cfg.micro_batch_size)
    out = [call(model, preresq.completion_logprobs, prompts, comp[r], attn[r], temperature=cfg.temperature,
                num_generations=g, suppressed=suppressed, shared_vision=cfg.shared_vision, features=feats, rows=r)
           for r in lockstep(slices, rounds)]
    return torch.cat(out[:len(slices)]).to(home)


def policy_update(model, prompts, comp, attn, advantages, old_logp, ref_logp, cfg, g, suppressed, *,
                  num_sequences: int | None = None, num_tokens: float | None = None, grad_scale: float = 1.0,
                  rounds: int | None = None, reasoning: torch.Tensor | None = None) -> dict:
    """Loss and gradients of one GRPO update, micro-batched; returns loss/KL/clip statistics.

    With shared vision the picture features are computed once with their graph; each micro-batch
    back-propagates into detached copies, and the summed feature gradients flow once through the
    vision tower at the end: the same gradients as one full-batch backward, without holding every
    micro-batch's activations at once.

    Under torchrun: num_sequences and num_tokens are the global batch's totals (default: this
    batch's), so the ranks' losses add up to the global batch's loss, and their summed gradients to
    its gradient; the statistics are this rank's share of the global ones. grad_scale multiplies
    what is back-propagated (--fsdp averages gradients over ranks: world x loss gives their sum).
    rounds: see `lockstep`. reasoning: (N, C) bool, the reasoning tokens (preresq.reasoning_mask),
    needed when cfg.reasoning_beta is set.
    """
    model.train()
    n = comp.shape[0]
    prompts = prompts.to(comp.device)
    feats = call(model, preresq.image_features, prompts) if cfg.shared_vision else None
    leaves = [f.detach().requires_grad_() for f in feats] if feats is not None else None
    num_tokens = torch.as_tensor(num_tokens if num_tokens is not None else attn.sum().clamp(min=1)).float()
    slices = micro_batches(n, cfg.micro_batch_size)
    total, stats = 0.0, {"kl": 0.0, "clip_fraction": 0.0}
    for i, r in enumerate(lockstep(slices, rounds)):
        logp = call(model, preresq.completion_logprobs, prompts, comp[r], attn[r], temperature=cfg.temperature,
                    num_generations=g, suppressed=suppressed, shared_vision=cfg.shared_vision, features=leaves,
                    rows=r)
        old = old_logp[r] if old_logp is not None else logp.detach()
        ref = ref_logp[r] if ref_logp is not None else None
        loss, st = grpo_loss(logp, old, ref, advantages[r], attn[r], beta=cfg.beta, epsilon=cfg.epsilon,
                             loss_type=cfg.loss_type, max_len=cfg.max_new_tokens, num_sequences=num_sequences or n,
                             num_tokens=num_tokens, reasoning=reasoning[r] if reasoning is not None else None,
                             reasoning_beta=cfg.reasoning_beta)
        if i >= len(slices):  # a lockstep repeat: the passes without the contribution
            (loss * 0.0).backward()
            continue
        (loss * grad_scale).backward()
        share = attn[r].sum().item() / num_tokens.item()
        total += loss.item()
        stats = {k: stats[k] + v * share for k, v in st.items()}
    if feats is not None:
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        torch.autograd.backward(feats, grads)
    return {"loss": total, **stats}


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_STATE = "trainer_state.pt"
# A run stops when this many steps in a row give non-finite rewards, losses or gradients.
MAX_NONFINITE_STEPS = 5
# Flags that may change between a run and its resumption; all others must match (or --force).
RESUMABLE_CHANGES = {"out", "steps", "epochs", "eval_every", "eval_size", "save_every", "keep_last", "workers",
                     "device", "micro_batch_size", "gradient_checkpointing", "reference_device", "fsdp"}


class RunError(RuntimeError):
    """The run cannot go on; the message says what happened, what is intact and how to continue."""


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's GPU only: asking for every GPU's would open a context on each, from each rank
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(out: Path, step: int, model, tokenizer, image_processor, optimizer, scheduler, cfg: Config,
                    extra: dict, dist: Dist | None = None) -> Path:
    """Write OUT/checkpoint-<step>/ atomically (save_folder), then prune to the newest --keep-last.

    The folder is an ordinary Hugging Face checkpoint (from_pretrained loads it) plus
    trainer_state.pt: optimizer, scheduler, RNG states (of every rank), world size, step, stage,
    data position, config. Under torchrun every rank calls it (to gather the RNG states, and under
    --fsdp the weights and optimizer state) and rank 0 writes.
    """
    dist = dist or SINGLE
    final = out / f"checkpoint-{step}"
    weights, optimizer_state = full_weights(model), full_optimizer_state(model, optimizer)
    ranks = [rng_states()]
    if dist.world > 1:
        ranks = [None] * dist.world
        tdist.all_gather_object(ranks, rng_states())
    if not dist.main:
        return final
    save_folder(final, unwrap(model), tokenizer, image_processor,
                {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "rng": ranks[0], **({"rng_ranks": ranks} if dist.world > 1 else {}), "world_size": dist.world,
                 "config": asdict(cfg), **extra}, weights=weights)
    if cfg.keep_last:  # only now: the new checkpoint is complete
        for old in checkpoints(out)[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_folder(final: Path, model, tokenizer, image_processor, state: dict | None = None,
                weights: dict | None = None) -> None:
    """Save a model folder (and trainer_state.pt) into a temporary sibling, renamed into place only
    when every file is written: a crash, a kill or a full disk never leaves a damaged folder.
    weights: the state dict to write (--fsdp: gathered from the shards); default the model's own."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / CHECKPOINT_STATE)
    except Exception as e:  # a full disk: OSError, RuntimeError (torch.save) or SafetensorError, vaguely worded
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(final.parent).free / 2**20
        raise RunError(f"could not write {final}: {e} ({free:,.0f} MiB free on that disk). The earlier "
                       f"checkpoints in {final.parent} are intact. Free some space, then continue with "
                       "--resume.") from e
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in OUT, oldest first (temporary folders of interrupted saves are ignored)."""
    found = [p for p in out.glob("checkpoint-*") if (p / CHECKPOINT_STATE).exists() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def config_differences(saved: dict, cfg: Config) -> list[str]:
    now = asdict(cfg)
    return [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
            for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]


def saved_config(out: Path) -> dict | None:
    """The configuration in OUT's newest complete checkpoint (None when there is none)."""
    found = checkpoints(out)
    # mmap: only the small config is read, not the optimizer state.
    return torch.load(found[-1] / CHECKPOINT_STATE, weights_only=False, mmap=True)["config"] if found else None


def data_fingerprint(sets: dict) -> str:
    """A digest of the training items (set, file name, MOS, in order): a resumed run must see the same data."""
    h = hashlib.sha1()
    for name, items in sets.items():
        for it in items:
            h.update(f"{name}\t{os.path.basename(it.path)}\t{it.mos!r}\n".encode())
    return h.hexdigest()[:16]


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step`: later ones were written after the checkpoint we
    resume from, and a line torn by a kill is dropped too."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        path.write_text("".join(l + "\n" for l in kept))


# --------------------------------------------------------------------------- the loop

class Stop:
    """Ctrl-C / SIGTERM: the first asks the loop to checkpoint and stop after the current step;
    the second exits at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to quit at once).", file=sys.stderr, flush=True)


def log_json(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def held_out(cfg: Config, model, tokenizer, image_processor, items: list, dist: Dist | None = None) -> dict | None:
    """Held-out metrics, computed on rank 0 while the other ranks wait (None there); under --fsdp
    every rank runs the same sharded passes."""
    dist = dist or SINGLE
    metrics = None
    if dist.main or is_sharded(model):
        metrics, _ = call(model, evaluate.evaluate, tokenizer, image_processor, items, samples=cfg.eval_samples,
                          seed=cfg.seed, batch_size=16, max_new_tokens=cfg.max_new_tokens,
                          max_pixels=cfg.max_pixels, progress=False)
    if dist.world > 1:
        tdist.barrier()
    return {k: metrics[k] for k in ("n", "srcc", "plcc", "krcc", "parse_failures")} if dist.main else None


def draw_run_curves(out: Path) -> None:
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    evals = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()] if (out / "eval.jsonl").exists() else []
    series = {"mean reward": [(m["step"], m["reward"]) for m in steps if "reward" in m],  # not skipped batches
              "held-out SRCC": [(e["step"], e["srcc"]) for e in evals],
              "held-out PLCC": [(e["step"], e["plcc"]) for e in evals]}
    evaluate.draw_curves(out / "curves.png", {k: v for k, v in series.items() if v}, title=out.name)


def load_training_data(cfg: Config) -> tuple[dict, list]:
    """Training sets by name, and the held-out items (a fixed seeded subset of --eval-split)."""
    sets = data.load_datasets(cfg.data, cfg.data_root, cfg.split, labels=cfg.labels, seed=cfg.seed)
    for name, items in sets.items():
        if not items:
            raise data.DataError(f"dataset {name!r} has no items in split {cfg.split!r}; choose another --split.")
    held = []
    if cfg.eval_split != "none":
        try:
            held = [it for items in data.load_datasets(cfg.data, cfg.data_root, cfg.eval_split, labels=cfg.labels,
                                                       seed=cfg.seed).values() for it in items]
        except data.DataError as e:
            print(f"warning: no held-out evaluation: {e}", file=sys.stderr)
    if held and cfg.eval_size:
        held = [held[i] for i in sorted(np.random.default_rng(cfg.seed).permutation(len(held))[:cfg.eval_size])]
    return sets, held


def train(cfg: Config, resume: bool = False, force: bool = False) -> Path:
    """Run GRPO as configured; returns the output folder (metrics, eval, checkpoints, final/).

    Under torchrun every process calls it; each joins the process group first and leaves it at the end.
    """
    dist, device = init_distributed(cfg.device)
    try:
        return run(cfg, resume, force, dist, device)
    finally:
        if dist.world > 1:
            tdist.destroy_process_group()


def run(cfg: Config, resume: bool, force: bool, dist: Dist, device: str | None) -> Path:
    """train() in one process (rank `dist.rank`, model on `device`); rank 0 alone writes files."""
    import copy

    from tqdm import tqdm

    out = Path(cfg.out or f"runs/{cfg.data.replace(',', '+')}-{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if dist.world > 1:  # the default name holds the time: take rank 0's
        shared = [str(out)]
        tdist.broadcast_object_list(shared, src=0)
        out = Path(shared[0])
    cfg.out = str(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder; choose another --out.")
    start, state = 0, None
    if resume:
        found = checkpoints(out)
        if not found:
            raise SystemExit(f"error: --resume: no complete checkpoint in {out}; start without --resume.")
        state = torch.load(found[-1] / CHECKPOINT_STATE, weights_only=False)
        diffs = config_differences(state["config"], cfg)
        saved_world = state.get("world_size", 1)
        if saved_world != dist.world:  # what must match is the global batch (the data order hangs on it)
            diffs = [d for d in diffs if not d.startswith("--images-per-step:")]
            then, now = state["config"]["images_per_step"] * saved_world, cfg.images_per_step * dist.world
            if then != now:
                diffs.append(f"global batch (--images-per-step x processes): checkpoint {then} with {saved_world} "
                             f"process(es), now {now} with {dist.world}"
                             + (f" (--images-per-step {then // dist.world} keeps it)" if then % dist.world == 0 else ""))
        if diffs and not force:
            raise SystemExit(f"error: --resume from {found[-1]} with a different configuration:\n  "
                             + "\n  ".join(diffs) + "\nDrop those flags (--resume takes every flag not given "
                             "from the checkpoint), or add --force to resume with them anyway.")
        start = state["step"]
    elif out.exists() and checkpoints(out):
        raise SystemExit(f"error: {out} already holds checkpoints; add --resume to continue that run, "
                         "or choose another --out.")
    try:
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").touch()
            (out / ".write-test").unlink()
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out {out}: {e.strerror or e}. Choose a writable folder.")
    if not resume and dist.main:  # logs of an earlier attempt that never reached a checkpoint
        for name in ("metrics.jsonl", "eval.jsonl"):
            (out / name).unlink(missing_ok=True)

    sets, held = load_training_data(cfg)
    fingerprint = data_fingerprint(sets)
    if state and not force and state["data"].get("fingerprint") != fingerprint:
        raise SystemExit(f"error: --resume: the training data differ from the checkpoint's "
                         f"({state['data'].get('items')} items then, {sum(map(len, sets.values()))} now): the "
                         "label files or images under --data-root changed. Restore them, or add --force to "
                         "resume on the new data.")
    check_global_batch(sets, cfg.images_per_step, dist.world)
    sampler = BatchSampler(sets, cfg.images_per_step, cfg.seed, dist.rank, dist.world)
    total_images = sum(len(v) for v in sets.values())
    steps = cfg.steps or math.ceil(cfg.epochs * total_images / (cfg.images_per_step * dist.world))

    if not dist.main:  # rank 0 loads first: a preset missing from the cache is built once, not by every rank
        tdist.barrier()
    model, tokenizer, image_processor = preresq.load_model(
        str(checkpoints(out)[-1]) if state else cfg.model, device, cfg.dtype)
    if dist.main and dist.world > 1:
        tdist.barrier()
    reference = None
    if cfg.beta or cfg.reasoning_beta:
        reference = preresq.load_model(cfg.model, device, cfg.dtype)[0] if state else copy.deepcopy(model)
        reference.requires_grad_(False).eval().to(cfg.reference_device or model.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.fsdp and dist.world > 1:
        reference = shard_model(reference, str(model.device)) if reference is not None else None
        model = shard_model(model, str(model.device))
    elif cfg.fsdp and dist.main:
        print("note: --fsdp with one process: nothing to shard, the model stays whole.", file=sys.stderr)
    if dist.world > 1 and dist.main:
        print(f"{dist.world} processes ({tdist.get_backend()}): global batch {cfg.images_per_step} x {dist.world} = "
              f"{cfg.images_per_step * dist.world} images per step; "
              + ("model, gradients and optimizer state sharded (FSDP2)" if is_sharded(model) else
                 "gradients summed over processes"), flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    # Seeded only now: building a preset or initialising a model draws from (and reseeds) the
    # global generators, and whether that happens must not change the run. Sampling differs per rank.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(rank_seed(cfg.seed, dist.rank))
    if state:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ranks = state.get("rng_ranks", [state["rng"]])
        if len(ranks) == dist.world:
            set_rng_states(ranks[dist.rank])
        else:  # another number of processes: rank 0's generators, a new sampling seed on the others
            set_rng_states(state["rng"])
            if dist.rank:
                torch.manual_seed(rank_seed(cfg.seed + start, dist.rank))
        if dist.main:
            truncate_log(out / "metrics.jsonl", start)
            truncate_log(out / "eval.jsonl", start)
            print(f"resumed from {checkpoints(out)[-1]} at step {start} (stage {cfg.stage(start)})")
    if dist.main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    suppressed = preresq.suppressed_ids(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(preresq.END_OF_TURN)
    device = unwrap(model).device
    stop = Stop()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    counters = dict(state.get("counters", {}) if state else {})
    counters.setdefault("skipped_items", 0)
    counters.setdefault("nonfinite_steps", 0)
    consecutive_nonfinite = 0
    first_eval = last_eval = None
    if held and start == 0:
        first_eval = held_out(cfg, model, tokenizer, image_processor, held, dist)
        if dist.main:
            log_json(out / "eval.jsonl", {"step": 0, **first_eval})
    pool = ThreadPoolExecutor(max(1, cfg.workers))
    pending = pool.submit(load_visuals, sampler.batch(start)[1], cfg.max_pixels)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="GRPO", dynamic_ncols=True, disable=not dist.main)
    step = start
    try:
        for step in bar:
            t0 = time.time()
            stage = cfg.stage(step)
            g = cfg.generations(stage)
            items, visuals, problems = pending.result()
            if step + 1 < steps:
                pending = pool.submit(load_visuals, sampler.batch(step + 1)[1], cfg.max_pixels)
            for p in problems:
                tqdm.write(f"warning: skipped an unreadable item: {p}", file=sys.stderr)
            counters["skipped_items"] += int(all_reduce([len(problems)], dist)[0])
            record = {"step": step + 1, "stage": stage, "epoch": round(sampler.epoch(step + 1), 4)}
            record.update(grpo_step(cfg, model, reference, tokenizer, image_processor, optimizer, items, visuals,
                                    step, stage, g, suppressed, end_id, device,
                                    video=sets[sampler.dataset(step)][0].is_video, dist=dist))
            with warnings.catch_warnings():
                # A skipped step still advances the schedule, which is keyed to the step number;
                # PyTorch warns when that happens before the first optimizer step.
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
                scheduler.step()
            if record.get("nonfinite"):
                counters["nonfinite_steps"] += 1
                consecutive_nonfinite += 1
                if dist.main:
                    tqdm.write(f"warning: step {step + 1}: non-finite {record['nonfinite']}; step skipped",
                               file=sys.stderr)
            else:
                consecutive_nonfinite = 0
            record.update(counters, lr=scheduler.get_last_lr()[0], seconds=round(time.time() - t0, 3))
            if "completion_tokens" in record:
                record["tokens_per_second"] = round(record["completion_tokens"] / max(record["seconds"], 1e-9), 1)
            if dist.main:
                log_json(out / "metrics.jsonl", record)
            if consecutive_nonfinite >= MAX_NONFINITE_STEPS:
                found = checkpoints(out)
                raise RunError(f"steps {step + 2 - consecutive_nonfinite}-{step + 1} all gave a non-finite "
                               f"{record['nonfinite']} (see {out / 'metrics.jsonl'}); stopping. The newest "
                               f"checkpoint is {found[-1] if found else 'none (none saved yet)'}. Try a lower "
                               "--lr or --dtype float32, or check the data, then continue with --resume --force.")
            shown = {"reward": f"{record.get('reward', float('nan')):.3f}"}
            if held and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                last_eval = held_out(cfg, model, tokenizer, image_processor, held, dist)
                if dist.main:
                    log_json(out / "eval.jsonl", {"step": step + 1, **last_eval})
                    draw_run_curves(out)
            if last_eval:
                shown["srcc"] = f"{last_eval['srcc']:.3f}"
            bar.set_postfix(shown)
            done = step + 1
            # A signal may reach the ranks at different steps: they stop together, at the first that saw one.
            stopping = bool(all_reduce([stop.requested], dist, "max")[0])
            if done < steps and ((cfg.save_every and done % cfg.save_every == 0) or stopping):
                saved = save_checkpoint(out, done, model, tokenizer, image_processor, optimizer, scheduler, cfg,
                                        {"stage": cfg.stage(done), "counters": counters,
                                         "data": {"seed": cfg.seed, "next_step": done, "epoch": sampler.epoch(done),
                                                  "items": total_images, "fingerprint": fingerprint}}, dist)
                if stopping:
                    if dist.main:
                        print(f"stopped after step {done} of {steps}; checkpoint {saved}. Continue with:\n"
                              f"  python grpo.py --out {out} --resume", file=sys.stderr, flush=True)
                    return out
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
    final = out / "final"
    weights = full_weights(model)
    if dist.main:
        save_folder(final, unwrap(model), tokenizer, image_processor, weights=weights)
    if held and (not cfg.eval_every or steps % cfg.eval_every):
        last_eval = held_out(cfg, model, tokenizer, image_processor, held, dist)
        if dist.main:
            log_json(out / "eval.jsonl", {"step": steps, **last_eval})
    if not dist.main:
        return out
    draw_run_curves(out)
    if first_eval and last_eval:
        print(f"held-out {cfg.eval_split} ({first_eval['n']} items): SRCC {first_eval['srcc']:.3f} -> "
              f"{last_eval['srcc']:.3f}, PLCC {first_eval['plcc']:.3f} -> {last_eval['plcc']:.3f}")
    print(f"final model: {final}   metrics: {out / 'metrics.jsonl'}   curves: {out / 'curves.png'}")
    return out


def grpo_step(cfg, model, reference, tokenizer, image_processor, optimizer, items, visuals, step, stage, g,
              suppressed, end_id, device, *, video: bool | None = None, dist: Dist | None = None) -> dict:
    """Sample, score, and update once (or mu times) on one batch; returns the step's metrics.

    Under torchrun `items` are this rank's share of the global batch: fewer than B, or none, when
    pictures were unreadable (`video` then says what the global batch holds).
    """
    dist = dist or SINGLE
    video = items[0].is_video if video is None else video
    if is_sharded(model) and all_reduce([len(items)], dist, "min")[0] == 0:
        return {"skipped": "a rank has no readable image in this batch (--fsdp runs every rank in step)"}
    t0 = time.time()
    prompts = comp = attn = None
    texts = []
    if items:
        first = dist.rank * cfg.images_per_step  # where this rank's images start in the global batch
        prompts = preresq.encode_prompts(tokenizer, image_processor, visuals,
                                         step_prompts(cfg, stage, step, first + len(items), video)[first:],
                                         video=video)
        model.eval()
        comp = call(model, preresq.sample_completions, tokenizer, prompts, g, temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens)
        attn = preresq.completion_mask(comp, end_id)
        texts = tokenizer.batch_decode(comp, skip_special_tokens=True)
    t_gen = time.time() - t0
    reasoning = None
    if cfg.reasoning_beta is not None and comp is not None:
        reasoning = preresq.reasoning_mask(tokenizer, comp, attn)
    mos = torch.tensor([it.mos for it in items], dtype=torch.float32)
    record = score_and_update(cfg, model, reference, optimizer, prompts, comp, attn, texts, mos, g, stage, video,
                              suppressed, device, dist, reasoning=reasoning)
    return {**record, "generation_seconds": round(t_gen, 3)} if "skipped" not in record else record


def score_and_update(cfg, model, reference, optimizer, prompts, comp, attn, texts, mos, g, stage, video, suppressed,
                     device, dist: Dist | None = None, reasoning: torch.Tensor | None = None) -> dict:
    """Steps 3-7 on sampled answers: rewards and advantages of the global batch, then the update.

    prompts, comp, attn (n*G, C), texts (n*G), mos (n,): this rank's n images and their answers (n may
    be 0 under torchrun: the rank then only takes part in the collectives). Returns the step's
    metrics, over the global batch.
    """
    dist = dist or SINGLE
    num_aspects = len(preresq.VIDEO_ASPECTS if video else preresq.IMAGE_ASPECTS)
    scores, valid, fmt = rewards.parse_completions(texts, num_aspects, g)
    mos, scores, valid, fmt, own = gather_scores(dist, cfg.images_per_step, mos, scores, valid, fmt)
    if not len(mos):
        return {"skipped": "no readable images in this batch"}
    terms = reward_terms(cfg, scores, mos, valid, fmt, video, stage)
    reward = terms["total"]
    tokens, sequences = all_reduce([attn.sum().item() if attn is not None else 0, len(texts)], dist)
    record = {"reward": reward.mean().item(), "reward_std": reward.std().item() if reward.numel() > 1 else 0.0,
              **{f"reward/{k}": v.mean().item() for k, v in terms.items() if k != "total"},
              "zero_std_groups": (reward.std(1) < 1e-6).float().mean().item() if g > 1 else 1.0,
              "parse_failure_rate": 1 - valid.float().mean().item(),
              "completion_length": tokens / sequences, "completion_tokens": int(tokens)}
    record["batch_srcc"] = batch_srcc(scores, valid, mos)
    if not torch.isfinite(reward).all():
        return {**record, "nonfinite": "reward"}
    advantages = group_advantages(reward, cfg.scale_rewards)[own].reshape(-1).to(device)
    rounds = None
    if is_sharded(model):  # every rank runs as many micro-batches as the busiest one
        rounds = int(all_reduce([len(micro_batches(len(texts), cfg.micro_batch_size))], dist, "max")[0])
    t1 = time.time()
    ref_logp = old_logp = None
    if reference is not None and comp is not None:
        ref_logp = reference_logprobs(reference, prompts, comp, attn, cfg, g, suppressed, rounds)
    if cfg.num_iterations > 1 and comp is not None:
        old_logp = reference_logprobs(model, prompts, comp, attn, cfg, g, suppressed, rounds)
    record["reference_seconds"] = round(time.time() - t1, 3)
    t2 = time.time()
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        if comp is not None:
            stats = policy_update(model, prompts, comp, attn, advantages, old_logp, ref_logp, cfg, g, suppressed,
                                  num_sequences=int(sequences), num_tokens=max(tokens, 1),
                                  grad_scale=dist.world if is_sharded(model) else 1.0, rounds=rounds,
                                  reasoning=reasoning)
        if not is_sharded(model):
            all_reduce_gradients(model.parameters(), dist)
        stats = dict(zip(stats, all_reduce(list(stats.values()), dist)))
        if not math.isfinite(stats["loss"]):
            optimizer.zero_grad(set_to_none=True)
            return {**record, **stats, "nonfinite": "loss"}
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # --fsdp: the norm of the sharded gradient
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return {**record, **stats, "nonfinite": "gradient"}
        optimizer.step()
    record.update(stats, grad_norm=grad_norm.item(), policy_seconds=round(time.time() - t2, 3))
    return record


def main(argv=None) -> int:
    cfg, resume, force = parse_args(argv)
    try:
        train(cfg, resume=resume, force=force)
    except (data.DataError, preresq.ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C (Stop), or one before training began
        found = checkpoints(Path(cfg.out)) if cfg.out else []
        print("\ninterrupted. " + (f"The newest complete checkpoint is {found[-1]}; continue with:\n"
                                    f"  python grpo.py --out {cfg.out} --resume" if found else
                                    "No checkpoint was saved yet."), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
