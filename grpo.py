"""GRPO for PreResQ-R1: the maths (pure functions), the settings, one step in the step's order, the loop.

    python grpo.py                                   # laptop demo: synthetic images, tiny preset, CPU
    python grpo.py --data koniq --data-root ~/data/koniq10k --model Qwen/Qwen2.5-VL-7B-Instruct
    torchrun --nproc_per_node 8 grpo.py --data kadid --data-root ~/data/kadid10k --model ...
    python grpo.py --out runs/koniq --resume         # after a crash, Ctrl-C or full disk

One step of the paper's GRPO, in the order grpo_step runs it (each line names its function):
  1. take B images of one dataset                                     (the loop: harness/prefetch.py)
  2. choose the stage: prompts, G, spread penalty                     explore_stable
  3. sample G answers per image at temperature T                      sample_rollout -> Policy.sample
  4. parse the aspect scores and reward every answer                  score_rollout -> rewards.REWARDS[...]
  5. group advantage A = (r - mean_G r) / (std_G r + 1e-4)             group_advantages
  6. reference log-probs (frozen initial model), and old-policy log-probs when mu > 1    Policy.logprobs
  7. loss = aggregate( -min(rho A, clip(rho, 1-eps, 1+eps) A) + beta * KL_k3 ), backward  policy_loss, grpo_loss
  8. grad-norm clip 1.0, AdamW at the linearly decaying learning rate                 optimizer_step

As the authors' trainer runs it: one update per batch (mu = 1), so the ratio rho is exactly 1 and the
clip never acts (the loss reads ~0 while gradients are not); k3 KL to the initial model, beta = 0.04;
"grpo" aggregation averages each sequence's tokens, then the sequences. Deviations: README. B images
form a group, compared within itself; the authors' script put 4 processes x 8 images into each
optimizer step (torchrun, or --groups-per-step 4 on one process). The model side is one object
(preresq.Policy), the other processes another (Processes); the run's machinery is harness/'s.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import preresq
import rewards

# --------------------------------------------------------------------------- the algorithm

def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (GRPO). rewards: (B, G) -> (B, G). A[i, j] = (r[i, j] - mean_j r[i, :]) /
    (std + eps) where std is the unbiased std of the group ("group", the authors' trainer's), of the
    whole batch ("batch"), or 1 ("none", Dr. GRPO). A group of one answer has no baseline: its advantage is 0.
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
    logp, ref_logp: (N, C) -> (N, C)."""
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
    grpo:    mean over sequences of each sequence's token mean (the authors' trainer's).
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
    reasoning (N, C) bool and reasoning_beta: the reasoning tokens' own KL coefficient (the authors' trainer
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


def explore_stable(cfg: "Settings", step: int) -> Stage:
    """Exploration-to-Stability (the paper's framework figure): stage 1 for the first stage1_steps steps,
    then stage 2. Stage 1 explores: each image's prompt drawn from a pool of paraphrases
    (preresq.IMAGE_PROMPT_POOL), G = stage1_generations (2 x num_generations: 12, as in the paper's
    ablation figure), the aspect-spread penalty on. Stage 2 stabilises: one fixed prompt, G = stage2_generations
    (num_generations: 6), no spread penalty. --schedule single trains every step like the public
    code: one prompt, G = num_generations, the penalty always on (reported as stage 2)."""
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


# --------------------------------------------------------------------------- the settings

def flag(default, type_, help: str, group: str, **argparse_options):
    """A settings field and its command-line flag --name: its default, type and help in one place."""
    return field(default=default, metadata=dict(type=type_, help=help, group=group, **argparse_options))


# The paper's 7B recipe, which None in Settings means, and the authors' video recipe (LSVQ, from the image
# checkpoint: their image trainer's settings otherwise); the laptop presets' are in harness/config.py.
PAPER_DEFAULTS = dict(images_per_step=8, num_generations=6, schedule="explore-stable", lr=1e-6, beta=0.04,
                      max_new_tokens=256)
AUTHORS_VIDEO_DEFAULTS = dict(PAPER_DEFAULTS, images_per_step=5, num_generations=5, schedule="single")


class ConfigError(ValueError):
    """Settings that cannot train; the message names the flags. The tools exit 2."""
    exit_status = 2


@dataclass
class Settings:
    """What the GRPO step reads, each a flag of grpo.py. None: the paper's value (PAPER_DEFAULTS), or
    a laptop preset's; the run's own settings (data, output, evaluation, ...) extend these in
    harness/config.py."""
    PAPER_DEFAULTS, AUTHORS_VIDEO_DEFAULTS = PAPER_DEFAULTS, AUTHORS_VIDEO_DEFAULTS  # (not fields: no annotation)
    images_per_step: int = flag(None, int, "B, images per step and process (per group with --groups-per-step)",
                                "GRPO")
    groups_per_step: int = flag(1, int, "N groups of B images in one optimizer step, each compared within itself "
                                "(the authors' 4 processes x 8 images: --groups-per-step 4 on one)", "GRPO")
    num_generations: int = flag(None, int, "G, answers per image (explore-stable: stage 2's, 2 G in stage 1)", "GRPO")
    lr: float = flag(None, float, "AdamW learning rate, linear decay to 0", "GRPO")
    beta: float = flag(None, float, "KL coefficient; 0 skips the reference model", "GRPO")
    reasoning_beta: float = flag(None, float, "KL coefficient of the reasoning tokens (inside <think>), when it "
                                 "differs from --beta's (authors' trainer: --beta on every token)", "GRPO")
    epsilon: float = flag(0.2, float, "PPO clip range", "GRPO")
    num_iterations: int = flag(1, int, "mu, updates per batch (the ratio differs from 1 only when mu > 1)", "GRPO")
    temperature: float = flag(1.0, float, "sampling temperature", "GRPO")
    top_k: int = flag(0, int, "sample among the k likeliest tokens; 0: the whole distribution, whose "
                      "log-probs GRPO computes (the authors' training most likely sampled with top_k 50)", "GRPO")
    max_new_tokens: int = flag(None, int, "answer length limit in tokens", "GRPO")
    loss_type: str = flag("grpo", str, "loss aggregation", "GRPO", choices=["grpo", "dapo", "dr_grpo"])
    scale_rewards: str = flag("group", str, "advantage std scaling", "GRPO", choices=["group", "batch", "none"])
    weight_decay: float = flag(0.0, float, "AdamW weight decay", "GRPO")
    max_grad_norm: float = flag(1.0, float, "gradient-norm clip", "GRPO")
    micro_batch_size: int = flag(None, int, "completions per forward/backward (default: all)", "scale")
    reward: str = flag("preresq", str, "reward function", "reward", choices=list(rewards.REWARDS))
    response_branch: bool = flag(True, bool, "drop the response branch (aspect-spread penalty, triplet balance)",
                                 "reward")
    preference_branch: bool = flag(True, bool, "drop the preference branch (pair fidelity, triplet accuracy, "
                                   "group rank)", "reward")
    compare_across_processes: bool = flag(False, bool, "under torchrun: the preference branch compares the "
                                          "whole global batch (default: each process's B images, as the "
                                          "authors' trainer's per-device reward)", "reward")
    schedule: str = flag(None, str, "explore-stable: stage 1 prompt pool, spread penalty and G1; stage 2 "
                         "fixed prompt and G2 (explore_stable); single: the public code's one stage", "schedule",
                         choices=["single", "explore-stable"])
    stage1_steps: int = flag(None, int, "length of stage 1 (default: half the run's steps)", "schedule")
    stage1_generations: int = flag(None, int, "G in stage 1 (default: 2 x --num-generations)", "schedule")
    stage2_generations: int = flag(None, int, "G in stage 2 (default: --num-generations)", "schedule")
    steps: int = flag(None, int, "optimizer steps", "run")
    seed: int = flag(42, int, "seed of the synthetic sets, random splits, data order, sampling and evaluation", "run")

    def resolve(self, defaults: dict = PAPER_DEFAULTS) -> "Settings":
        """Fill unset values from `defaults` (the paper's), G per stage, the run's length; check."""
        for key, value in defaults.items():
            if key not in ("steps", "epochs") and getattr(self, key) is None:
                setattr(self, key, value)
        g = self.num_generations  # the paper's G = 6: 12 answers per image in stage 1, 6 in stage 2
        self.stage1_generations = 2 * g if self.stage1_generations is None else self.stage1_generations
        self.stage2_generations = g if self.stage2_generations is None else self.stage2_generations
        if self.steps:  # an --epochs run's length is known once its data are (harness/run.py)
            self.set_steps(self.steps)
        errors = self.errors()
        if errors:
            raise ConfigError("; ".join(errors))
        return self

    def set_steps(self, steps: int) -> None:
        """Fix the run's length; stage 1 is the first half unless --stage1-steps says otherwise."""
        self.steps = steps
        if self.schedule == "explore-stable" and self.stage1_steps is None:
            self.stage1_steps = steps // 2

    def stage(self, step: int) -> int:
        return explore_stable(self, step).number

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (0-based): --lr decaying linearly to 0 over the run."""
        return self.lr * max(0.0, 1 - step / self.steps)

    def errors(self) -> list[str]:
        one = ("images_per_step", "groups_per_step", "num_iterations", "steps", "micro_batch_size")
        need = [(k, 1, "") for k in one] + [("max_new_tokens", 8, " (an answer needs room)"), ("top_k", 0, "")] + [
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
        return errors


# --------------------------------------------------------------------------- the other processes

@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job and all that a step exchanges with the other processes;
    one process is rank 0 of 1, where every method returns what it is given. comm: the device of the
    collectives' tensors (cpu for gloo, this rank's GPU for nccl); sharded: the model is under FSDP2."""
    rank: int = 0
    world: int = 1
    comm: str = "cpu"
    sharded: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], op: str = "sum") -> list[float]:
        """A few numbers summed (or op "max", "min") over the processes."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()))
        return t.tolist()

    def gather_scores(self, batch_size: int, mos, scores, valid, fmt):
        """mos (n,), scores (n, G, A), valid and fmt (n, G) of this process's n <= batch_size images -> the
        same of every process's (N rows in rank order, padded for all_gather and unpadded; in the dtypes
        given, so that equal float64 means still tie), and sizes: process r's number of rows."""
        n = len(mos)
        if self.world == 1:
            return mos, scores, valid, fmt, [n]
        g, a = scores.shape[1:]
        packed = torch.zeros(batch_size, 2 + g * (2 + a), dtype=torch.float64)
        packed[:n] = torch.cat([torch.ones(n, 1), mos[:, None], valid.reshape(n, g).float(), fmt.reshape(n, g),
                                scores.reshape(n, g * a)], 1).double()
        parts = [torch.empty_like(packed, device=self.comm) for _ in range(self.world)]
        dist.all_gather(parts, packed.to(self.comm))
        counts = [int(part[:, 0].sum()) for part in parts]
        rows = torch.cat(parts).cpu()
        rows = rows[rows[:, 0] > 0]
        return (rows[:, 1].to(mos.dtype), rows[:, 2 + 2 * g:].reshape(-1, g, a).to(scores.dtype),
                rows[:, 2:2 + g] > 0.5, rows[:, 2 + g:2 + 2 * g].to(fmt.dtype), counts)

    def sum_gradients(self, parameters, bucket_bytes: int = 25 * 2**20) -> None:
        """Sum the gradients over the processes in ~25 MB buckets, as DDP does after backward (FSDP2's
        backward did it). A gradient missing on some process counts as zero there, on all stays missing."""
        if self.world == 1 or self.sharded:
            return
        params = [p for p in parameters if p.requires_grad]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.comm)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        live = [p for p, has in zip(params, present.tolist()) if has]
        for p in (p for p in live if p.grad is None):
            p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for k, p in enumerate(live):
            bucket, size = bucket + [p], size + p.grad.numel() * p.grad.element_size()
            if k + 1 == len(live) or size >= bucket_bytes or live[k + 1].grad.dtype != p.grad.dtype:
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat)
                for q, chunk in zip(bucket, flat.split([q.numel() for q in bucket])):
                    q.grad.copy_(chunk.view_as(q.grad))
                bucket, size = [], 0

    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip the gradients to norm max_norm -> their norm before clipping (a sharded one's, whole)."""
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if self.sharded else norm

    def all_finished(self, finished: bool) -> bool:
        """Whether every process has finished sampling (a sharded policy's processes sample in step)."""
        return finished if self.world == 1 else self.sum([0.0 if finished else 1.0], "max")[0] == 0.0


# --------------------------------------------------------------------------- one step

@dataclass
class Group:
    """Images the preference branch compares with each other: items (with .path, .mos), their pictures
    (a list per item), and `first`: the first one's place in the step's global batch (its prompts)."""
    items: list
    visuals: list
    first: int = 0


@dataclass
class Batch:
    """A step's images on this process (step 1): its groups (one, or --groups-per-step), image or video."""
    step: int
    groups: list[Group]
    video: bool = False


@dataclass
class Rollout:
    """Step 3 on one group's n images (n may be 0 under torchrun): prompts and their texts (questions),
    answers (n*G rows grouped by image), MOS (n,), reasoning tokens (n*G, C) bool for --reasoning-beta."""
    prompts: preresq.PromptBatch | None
    answers: preresq.Answers | None
    mos: torch.Tensor
    questions: list[str]
    num_generations: int
    video: bool
    reasoning: torch.Tensor | None = None

    @property
    def texts(self) -> list[str]:
        return self.answers.texts if self.answers else []


def sample_rollout(policy: preresq.Policy, cfg: Settings, stage: Stage, group: Group, step: int,
                   video: bool) -> Rollout:
    """Step 3: G answers per image, sampled at the temperature from the current policy."""
    mos = torch.tensor([it.mos for it in group.items], dtype=torch.float32)
    if not group.items:
        return Rollout(None, None, mos, [], stage.num_generations, video)
    questions = step_prompts(stage, cfg.seed, step, group.first + len(group.items), video)[group.first:]
    prompts = policy.prompts(group.visuals, questions, video)
    answers = policy.sample(prompts, stage.num_generations, temperature=cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k)
    reasoning = (preresq.reasoning_mask(policy.tokenizer, answers.ids, answers.mask)
                 if cfg.reasoning_beta is not None else None)
    return Rollout(prompts, answers, mos, questions, stage.num_generations, video, reasoning)


@dataclass
class Scored:
    """Steps 4-5 on a group of the global batch: the reward terms (N, G) of each name ("total"
    included), the parsed scores (N, G, A), which parsed (N, G), the MOS (N,), the answers' tokens
    and number; `own`: this process's rows; advantages: its (n*G,), None when the group cannot teach
    anything (no readable image, or a non-finite reward: then `problem` says which)."""
    terms: dict
    scores: torch.Tensor
    valid: torch.Tensor
    mos: torch.Tensor
    tokens: float
    sequences: float
    own: slice
    advantages: torch.Tensor | None = None
    problem: dict = field(default_factory=dict)


def score_rollout(cfg: Settings, rollout: Rollout, stage: Stage, comm: Processes = Processes()) -> Scored:
    """Steps 4-5: parse and reward the answers of the group on every process, then group advantages."""
    num_aspects = len(preresq.VIDEO_ASPECTS if rollout.video else preresq.IMAGE_ASPECTS)
    scores, valid, fmt = rewards.parse_completions(rollout.texts, num_aspects, rollout.num_generations)
    mos, scores, valid, fmt, sizes = comm.gather_scores(cfg.images_per_step, rollout.mos, scores, valid, fmt)
    tokens, sequences = comm.sum([rollout.answers.mask.sum().item() if rollout.answers else 0, len(rollout.texts)])
    own = slice(sum(sizes[:comm.rank]), sum(sizes[:comm.rank + 1]))
    if not len(mos):
        return Scored({}, scores, valid, mos, tokens, sequences, own, problem={"skipped": "no readable images"})
    # The preference branch compares the images of a group: each process's own (the authors'
    # per-device reward), or the group on every process with --compare-across-processes.
    parts = [len(mos)] if cfg.compare_across_processes else sizes
    terms = [reward_terms(cfg, stage, *(x.split(parts)[k] for x in (scores, mos, valid, fmt)), rollout.video)
             for k in range(len(parts)) if parts[k]]
    terms = {name: torch.cat([t[name] for t in terms]) for name in terms[0]}
    scored = Scored(terms, scores, valid, mos, tokens, sequences, own)
    if not torch.isfinite(terms["total"]).all():
        scored.problem = {"nonfinite": "reward"}
    else:
        scored.advantages = group_advantages(terms["total"], cfg.scale_rewards)[own].reshape(-1)
    return scored


def reward_terms(cfg: Settings, stage: Stage, scores, mos, valid, fmt, video: bool) -> dict[str, torch.Tensor]:
    """The configured reward of parsed answers: scores (B, G, A), mos (B,), valid and format (B, G)
    -> dict of (B, G) tensors ("total" and each term)."""
    kwargs = dict(format_rewards=fmt)
    if cfg.reward == "preresq":
        kwargs.update(video=video, response_branch=cfg.response_branch, preference_branch=cfg.preference_branch)
        if not stage.spread_penalty:
            kwargs["w_std"] = 0.0
    return rewards.REWARDS[cfg.reward](scores, mos, valid, **kwargs)


def frozen_logprobs(model: preresq.Policy | None, rollout: Rollout, cfg: Settings) -> torch.Tensor | None:
    """Step 6: log-probs (n*G, C) of a group's answers under a frozen model (the reference, or the
    old policy when mu > 1); None without a model or answers."""
    if model is None or rollout.answers is None:
        return None
    return model.logprobs(rollout.prompts, rollout.answers, temperature=cfg.temperature,
                          micro_batch_size=cfg.micro_batch_size)


def policy_loss(policy: preresq.Policy, rollout: Rollout, advantages, old_logp, ref_logp, cfg: Settings,
                num_sequences: int, num_tokens: float) -> dict:
    """Step 7: the GRPO loss of a group's answers and its gradient, micro-batch by micro-batch. The
    loss is normalised by the step's totals (num_sequences answers, num_tokens tokens, every group
    and process), so the groups' gradients add up to that of one batch. Returns the group's share
    of the loss, KL and clip fraction."""
    stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
    if rollout.answers is None:
        return stats
    mask, reasoning = rollout.answers.mask, rollout.reasoning
    advantages = advantages.to(mask.device)
    num_tokens = torch.as_tensor(num_tokens).float()
    for r, logp in policy.logprobs_for_backward(rollout.prompts, rollout.answers, temperature=cfg.temperature,
                                                micro_batch_size=cfg.micro_batch_size):
        loss, st = grpo_loss(logp, old_logp[r] if old_logp is not None else logp.detach(),
                             ref_logp[r] if ref_logp is not None else None, advantages[r], mask[r],
                             beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, max_len=cfg.max_new_tokens,
                             num_sequences=num_sequences, num_tokens=num_tokens,
                             reasoning=reasoning[r] if reasoning is not None else None,
                             reasoning_beta=cfg.reasoning_beta)
        loss.backward()
        share = mask[r].sum().item() / num_tokens.item()
        stats["loss"] += loss.item()
        stats.update({k: stats[k] + v * share for k, v in st.items()})
    return stats


def optimizer_step(policy: preresq.Policy, optimizer, stats: dict, cfg: Settings, step: int,
                   comm: Processes = Processes()) -> dict:
    """Step 8: sum gradients over processes, clip the norm, AdamW at cfg.learning_rate(step). Skipped
    (gradients dropped) when the loss or the gradient norm is not finite; returns the statistics
    over the global batch."""
    comm.sum_gradients(policy.model.parameters())
    stats = dict(zip(stats, comm.sum(list(stats.values()))))
    lr = cfg.learning_rate(step)
    stats["lr"] = lr
    if not math.isfinite(stats["loss"]):
        optimizer.zero_grad(set_to_none=True)
        return {**stats, "nonfinite": "loss"}
    grad_norm = comm.clip_grad_norm(policy.model.parameters(), cfg.max_grad_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return {**stats, "nonfinite": "gradient"}
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return {**stats, "grad_norm": grad_norm.item()}


def update(policy: preresq.Policy, reference: preresq.Policy | None, groups: list[tuple[Rollout, Scored]],
           cfg: Settings, optimizer, step: int, comm: Processes = Processes()) -> dict:
    """Steps 6-8 on the groups that can teach: reference log-probs, then mu times every group's loss and
    gradient, normalised by the totals of all (every process), and one optimizer step over them all."""
    tokens, sequences = sum(s.tokens for _, s in groups), int(sum(s.sequences for _, s in groups))
    t1 = time.time()
    ref = [frozen_logprobs(reference, r, cfg) for r, _ in groups]                                   # 6
    old = [frozen_logprobs(policy, r, cfg) if cfg.num_iterations > 1 else None for r, _ in groups]
    stats = {"reference_seconds": round(time.time() - t1, 3)}
    t2 = time.time()
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        parts = [policy_loss(policy, r, s.advantages, o, f, cfg, sequences, max(tokens, 1))             # 7
                 for (r, s), o, f in zip(groups, old, ref)]
        result = optimizer_step(policy, optimizer, {k: sum(p[k] for p in parts) for k in parts[0]}, cfg, step,
                                comm)                                                              # 8
        if "nonfinite" in result:
            return {**stats, **result}
    return {**stats, **result, "policy_seconds": round(time.time() - t2, 3)}


@dataclass
class Step:
    """One step's groups (their answers, rewards and advantages) and the update's statistics."""
    rollouts: list[Rollout]
    scored: list[Scored]
    stats: dict


def grpo_step(policy: preresq.Policy, reference: preresq.Policy | None, batch: Batch, cfg: Settings, optimizer,
              comm: Processes = Processes()) -> Step:
    """One GRPO step (steps 2-8) on this process's images of the step's global batch."""
    stage = explore_stable(cfg, batch.step)                                                        # 2
    t0 = time.time()
    rollouts = [sample_rollout(policy, cfg, stage, group, batch.step, batch.video) for group in batch.groups]  # 3
    stats = {"generation_seconds": round(time.time() - t0, 3)}
    scored = [score_rollout(cfg, rollout, stage, comm) for rollout in rollouts]                   # 4-5
    live = [(r, s) for r, s in zip(rollouts, scored) if s.advantages is not None]
    nonfinite = [s.problem for s in scored if "nonfinite" in s.problem]
    if nonfinite or not live:  # nothing to learn from: the step is skipped, on every process alike
        return Step(rollouts, scored, {**stats, **(nonfinite or [scored[0].problem])[0]})
    return Step(rollouts, scored, {**stats, **update(policy, reference, live, cfg, optimizer, batch.step, comm)})  # 6-8


# --------------------------------------------------------------------------- the loop and its command line

def train(cfg, resume: bool = False, force: bool = False):
    """Run GRPO as configured (cfg: harness.config.RunConfig; every process under torchrun) -> the
    output folder."""
    from harness import distributed, run  # the machinery comes in here, not into the step

    place, device = distributed.init_distributed(cfg.device)  # rank, world, the collectives' device
    comm = Processes(*place)
    try:
        return loop(cfg, run.prepare(cfg, resume, force, comm, device))
    finally:
        distributed.leave(comm)


def loop(cfg, run):
    """One grpo_step per step, with evaluation, logs and checkpoints around it (run: harness.run.Run)."""
    from harness import checkpoints, logs, prefetch
    from support import cli

    first_eval = last_eval = None
    bar = cli.bar(range(run.start, run.steps), initial=run.start, total=run.steps, desc="GRPO", dynamic_ncols=True,
                  show=run.comm.main)
    with checkpoints.Stop() as stop, prefetch.Prefetch(run, cfg) as pictures, bar:
        if run.held and run.start == 0:
            first_eval = logs.evaluate_and_log(cfg, run, 0)
        for step in bar:
            t0 = time.time()
            groups, problems = pictures.load(step)                                                  # 1
            batch = Batch(step, [Group(*group) for group in groups], run.sampler.is_video(step))
            done = grpo_step(run.policy, run.reference, batch, cfg, run.optimizer, run.comm)       # 2-8
            record = logs.log_step(cfg, run, step, done, batch, problems, time.time() - t0)
            if run.held and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                last_eval = logs.evaluate_and_log(cfg, run, step + 1)
            bar.set_postfix({"reward": f"{record.get('reward', float('nan')):.3f}",
                             **({"srcc": f"{last_eval['srcc']:.3f}"} if last_eval else {})})
            checkpoints.checkpoint_if_due(cfg, run, step + 1, stop)  # Ctrl-C, SIGTERM: saves, then Stopped
    return logs.finish(cfg, run, first_eval, last_eval)


def command(argv=None) -> None:
    """`python grpo.py ...`: --help lists every setting as a flag (harness.config.parse_args)."""
    from harness import checkpoints, config

    cfg, resume, force = config.parse_args(Settings, argv)
    try:
        train(cfg, resume=resume, force=force)
    except KeyboardInterrupt as stop:  # a run stopped at its checkpoint, a second Ctrl-C, one before training
        checkpoints.say_how_to_resume(cfg.out, stop)
        raise


def main(argv=None) -> int:
    """Exit 0 when trained, 2 for bad usage or input (nothing is created), 1 when the run failed part
    way (what is intact is said), 130 when Ctrl-C or SIGTERM stopped it (a checkpoint is saved first)."""
    from support.cli import entry

    return entry("grpo.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
