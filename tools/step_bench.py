"""The step bench (`bench.py step`): GRPO steps of the training code itself, timed phase by phase.

Each measured step is the loop's (grpo.loop): the step's pictures made into a grpo.Batch, one call
of grpo.grpo_step (the function the loop calls) on a configuration made as grpo.py makes its own
(harness.config.run_config(grpo.Settings)), with the policy and reference that harness.run.load_models
makes for a run (a preresq.Policy and a frozen copy, or under --lora-rank the policy with adapters
and lora.AdaptersOff) and torch.optim.AdamW, then the step's metrics line. A phase is the time spent
inside the functions of HOOKS below, which PhaseClock (phase_clock.py) wraps while the step runs
and puts back after, each held by reference, so that a renamed function fails at import:
  picture loading  the bench's pictures (a label file's, read with data.read_visual and resized, or
                   random ones) into a grpo.Batch, and preresq.Policy.prompts (pictures into prompts)
  generation       preresq.Policy.sample: G answers per picture, sampled and decoded
  reward           grpo.score_rollout: parsing, the configured reward, group advantages
  reference pass   preresq.Policy.logprobs: the reference's log-probs (its only caller in a bench
                   step, where mu = 1); 0 with --beta 0, which has no reference
  policy forward   grpo.policy_loss: the policy's log-probs (Policy.logprobs_for_backward) and the
                   loss, less the backward inside it
  policy backward  torch.autograd.backward (Tensor.backward goes through it): each micro-batch's
                   backward and the shared prompts' (prompt_sharing.backward), inside policy_loss
  optimizer        grpo.optimizer_step: gradient clip, non-finite checks, AdamW at the step's rate
  logging          the step's harness.logs.step_metrics line appended to a metrics.jsonl (log_json)
A call timed inside another is taken off the outer one. The "untimed rest" is what the phases
leave of the step's wall time: grpo_step's few lines between them (the stage, the prompts' texts,
gathering the groups and their statistics, zeroing the gradients).

What the step bench does differently from a training run, and why:
- One stage (--schedule single: one prompt, G answers per picture), the learning rate decaying
  from --lr over the bench's warm-up and timed steps, as in a run of that length.
- Presets (tiny, small) are built without their format warm-up (model_shapes.py): an untrained
  model answers to full length and its answers all score alike, so the advantages are 0 (the
  table says so): the same work, with (near) zero gradients.
- The pictures (random, or --labels' resized) are of --image-size; the image processor's
  max_pixels is raised, for the bench only, when that size is above it, so the visual-token count
  is the one asked for.
- --lora-rank R measures LoRA first, then full fine-tuning on a fresh copy of the same model and
  shapes, and prints the ratios. LoRA goes first because on the CPU the peak is the process's
  resident set, which memory freed by an earlier, larger run would inflate.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import grpo
import preresq
from harness.config import run_config
from harness.logs import joined, log_json, step_metrics
from harness.run import load_models
from support import cli

import model_shapes
from phase_clock import PhaseClock, hook, measure
from step_report import PHASES, StepTimes, compare_lora, describe, medians, phase_table, step_line

HOOKS = tuple(hook(fn, phase) for fn, phase in (
    (preresq.Policy.prompts, "pictures"),
    (preresq.Policy.sample, "generation"),
    (grpo.score_rollout, "reward"),
    (preresq.Policy.logprobs, "reference"),
    (grpo.policy_loss, "policy_forward"),
    (torch.autograd.backward, "policy_backward"),
    (grpo.optimizer_step, "optimizer")))


@dataclass(frozen=True)
class StepBench:
    """What `bench.py step` measures: the step's shapes and the flags of the run whose steps it times.

    image_size: (width, height) of every picture. The steps are those of a run of warmup_steps +
    steps steps: the learning rate decays from `lr` over them, as grpo.Settings.learning_rate does.
    lora_rank: adapters of that rank on the language model (None: full fine-tuning)."""
    images_per_step: int = 8
    num_generations: int = 8
    max_new_tokens: int = 64
    image_size: tuple[int, int] = (448, 448)
    steps: int = 3
    warmup_steps: int = 1
    beta: float = 0.04
    lr: float = 1e-4
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    lora_rank: int | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, lora_rank: int | None = None) -> "StepBench":
        size = size_for_visual_tokens(args.visual_tokens) if args.visual_tokens else args.image_size
        return cls(args.images_per_step, args.num_generations, args.max_new_tokens, size, args.steps,
                   args.warmup_steps, args.beta, args.lr, args.micro_batch_size, args.gradient_checkpointing,
                   lora_rank)

    def config(self):
        """The run configuration these settings train with, made as grpo.py makes its own: one stage
        (a fixed prompt, G answers), the defaults of a non-preset model otherwise. grpo.ConfigError
        for a combination grpo.py refuses."""
        return run_config(grpo.Settings)(
            model="bench", images_per_step=self.images_per_step, num_generations=self.num_generations,
            max_new_tokens=self.max_new_tokens, beta=self.beta, lr=self.lr, micro_batch_size=self.micro_batch_size,
            gradient_checkpointing=self.gradient_checkpointing, lora_rank=self.lora_rank, schedule="single",
            steps=self.warmup_steps + self.steps, seed=self.seed).resolve()


# --------------------------------------------------------------------------- the pictures

def random_pictures(n: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def label_items(labels: str, data_root: str | None = None) -> list:
    """The items of a label file in the project's GT format (or a training jsonl), paths resolved
    under data_root (default: the label file's folder) as `grpo.py --data labels` resolves them.
    DataError (an InputError) for a bad file, a missing picture or a video."""
    root = data_root if data_root is not None else os.path.dirname(os.path.abspath(os.path.expanduser(labels)))
    items = data.load_dataset("labels", root, "all", labels=labels)
    videos = [it.path for it in items if it.is_video]
    if videos:
        raise data.DataError(f"{labels}: the step bench times pictures, and this file lists {len(videos)} "
                             f"video(s), e.g. {videos[0]}")
    return items


class Pictures:
    """Each step's B pictures and their scores (mos, 1..5). From label-file items (label_items): read
    with data.read_visual, resized to `size`, taken in file order and wrapping around; without
    items: random pictures and random scores, different at every step."""

    def __init__(self, size: tuple[int, int], items: list | None = None, seed: int = 0):
        self.size, self.items, self.seed = size, items, seed

    def __call__(self, step: int, n: int) -> tuple[list[Image.Image], torch.Tensor]:
        width, height = self.size
        if self.items is None:
            rng = np.random.default_rng([self.seed, step])
            return (random_pictures(n, width, height, seed=self.seed * 1_000_003 + step),
                    torch.tensor(rng.uniform(1, 5, n), dtype=torch.float32))
        chosen = [self.items[(step * n + i) % len(self.items)] for i in range(n)]
        pictures = [data.read_visual(it.path) for it in chosen]
        pictures = [p if p.size == self.size else p.resize(self.size, Image.Resampling.BICUBIC) for p in pictures]
        return pictures, torch.tensor([it.mos for it in chosen], dtype=torch.float32)


def size_for_visual_tokens(n: int) -> tuple[int, int]:
    """(width, height) of a near-square picture with at least n visual tokens (one per 28x28 pixels)."""
    rows = max(1, round(math.sqrt(n)))
    return 28 * math.ceil(n / rows), 28 * rows


# --------------------------------------------------------------------------- the run and its steps

@dataclass
class BenchRun:
    """What the timed steps train: the configuration, the policy and its frozen reference (None when
    beta = 0), the optimizer, where each step's pictures come from and the metrics file it appends to."""
    cfg: object
    policy: preresq.Policy
    reference: preresq.Policy | None
    optimizer: torch.optim.Optimizer
    pictures: Pictures
    metrics: Path

    def batch(self, step: int) -> grpo.Batch:
        """The step's pictures and their scores, as the loop hands them to grpo_step: one group."""
        pictures, mos = self.pictures(step, self.cfg.images_per_step)
        items = [data.Item(f"bench-{step}-{i}", float(m), float(m), "bench") for i, m in enumerate(mos.tolist())]
        return grpo.Batch(step, [grpo.Group(items, [[p] for p in pictures])])


def prepare_run(model, tokenizer, image_processor, settings: StepBench, items: list | None, metrics: Path,
                report=print) -> BenchRun:
    """Make the run the bench steps, as harness.run.prepare makes a training run's: load_models on the
    model given (LoRA adapters and the policy with its adapters off as the reference, or a frozen
    copy as the reference; gradient checkpointing), AdamW on what trains. Widens image_processor's
    max_pixels when the pictures are larger (for the bench only: the visual-token count asked for)."""
    cfg = settings.config()
    width, height = settings.image_size
    if width * height > image_processor.size["longest_edge"]:
        report(f"note: image processor max_pixels raised from {image_processor.size['longest_edge']} to "
               f"{width * height} for this bench, so {width}x{height} pictures keep their size")
        image_processor.size["longest_edge"] = width * height
    model, policy, reference = load_models(cfg, cfg.model, str(model.device), grpo.Processes(),
                                           loaded=(model, tokenizer, image_processor))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return BenchRun(cfg, policy, reference, optimizer, Pictures(settings.image_size, items, settings.seed), metrics)


def log_metrics(path: Path, step: int, done: grpo.Step) -> None:
    """The step's line in metrics.jsonl, as the loop writes it: the reward's statistics and the update's."""
    log_json(path, {"step": step + 1, **step_metrics(joined(done.scored)), **done.stats})


def timed_step(run: BenchRun, step: int) -> tuple[StepTimes, grpo.Step]:
    """One training step as the loop runs it, timed phase by phase (HOOKS): the step's pictures, one
    call of grpo.grpo_step, its metrics line -> (its StepTimes, the grpo.Step)."""
    device = run.policy.model.device
    clock = PhaseClock(device, PHASES, HOOKS)

    def loop_step() -> grpo.Step:
        with clock:
            batch = clock.timed("pictures", run.batch)(step)
            done = grpo.grpo_step(run.policy, run.reference, batch, run.cfg, run.optimizer)
            clock.timed("logging", log_metrics)(run.metrics, step, done)
        return done

    done, seconds, peak = measure(loop_step, device)
    tokens = sum(int(r.answers.mask.sum()) for r in done.rollouts if r.answers is not None)
    flat = all(s.advantages is not None and not s.advantages.any() for s in done.scored)
    return StepTimes(dict(clock.seconds), seconds, tokens, peak, flat), done


def bench_grpo_step(model, tokenizer, image_processor, settings: StepBench = StepBench(), items: list | None = None,
                    report=print) -> dict:
    """Time settings.steps GRPO steps (after settings.warmup_steps untimed ones), phase by phase -> summary.

    Each step is the training loop's (timed_step): the pictures (`items` of a label file, else random
    ones; Pictures), one call of grpo.grpo_step on them and its line in a metrics.jsonl. `model` is
    trained in place (with adapters when settings.lora_rank).

    Keys (seconds are medians over the timed steps): each of PHASES, policy (forward + backward),
    step (the median of the steps' wall times), untimed (the median of what the phases leave of a
    step), peak_bytes (max over the timed steps), visual_tokens, prompt_tokens (per prompt),
    generation_tokens_per_s, step_tokens_per_s (sampled completion tokens / step seconds),
    trained_parameters, flat_steps (timed steps whose advantages were all 0), steps (StepTimes)."""
    with tempfile.TemporaryDirectory(prefix="bench-log-") as logs:
        run = prepare_run(model, tokenizer, image_processor, settings, items, Path(logs) / "metrics.jsonl", report)
        group = run.batch(0).groups[0]
        first = run.policy.prompts(group.visuals, [preresq.IMAGE_PROMPT] * len(group.items))
        summary = dict(visual_tokens=int(first.image_grid_thw[0].prod()) // image_processor.merge_size ** 2,
                       prompt_tokens=first.input_ids.shape[1],
                       trained_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
        report(describe(settings, summary, items))
        torch.manual_seed(settings.seed)  # sampling draws from the global generator, as in a run
        measured = []
        for k in range(settings.warmup_steps + settings.steps):
            times, done = timed_step(run, k)
            report(step_line("warm-up" if k < settings.warmup_steps else f"step {k - settings.warmup_steps + 1}",
                             times, done))
            if k >= settings.warmup_steps:
                measured.append(times)
    summary.update(medians(measured))
    report(phase_table(summary, model.device))
    return summary


# --------------------------------------------------------------------------- `bench.py step`

def bench_step(args: argparse.Namespace) -> dict:
    """`bench.py step`: time --model's steps (with --lora-rank: LoRA, then full fine-tuning, compared)."""
    device = args.device or preresq.default_device()
    dtype = preresq.DTYPES[args.dtype] if args.dtype else preresq.default_dtype(device)
    items = label_items(args.labels, args.data_root) if args.labels else None  # DataError before any model
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    summaries = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:  # a preset is built once for both runs
        for rank in ([args.lora_rank, None] if args.lora_rank else [None]):  # LoRA first: see the docstring
            try:
                summaries[rank] = bench_one(args, StepBench.from_args(args, rank), device, dtype, folder, items)
            except torch.OutOfMemoryError:
                message = out_of_memory(args, device)
                if rank is not None or not summaries:
                    raise cli.Failure(f"{message}: try --gradient-checkpointing, a smaller --micro-batch-size, "
                                      f"--beta 0 (no reference model), a smaller --images-per-step or "
                                      f"--num-generations, --lora-rank, or several GPUs (README, Scaling).") from None
                print(f"full fine-tuning: {message}; LoRA's numbers above stand")
            free(device)
    print(f"load average {os.getloadavg()[0]:.2f} after (before: {load[0]:.2f})")
    if not args.lora_rank:
        return summaries[None]
    if None not in summaries:
        return summaries[args.lora_rank]
    return {**summaries[args.lora_rank], **compare_lora(summaries[args.lora_rank], summaries[None], args.lora_rank)}


def out_of_memory(args: argparse.Namespace, device) -> str:
    gpu = torch.cuda.get_device_properties(device)
    return (f"out of memory on {gpu.name} ({gpu.total_memory / 2**30:.0f} GiB) with --model {args.model} "
            f"--images-per-step {args.images_per_step} --num-generations {args.num_generations}")


def bench_one(args: argparse.Namespace, settings: StepBench, device, dtype, folder: str,
              items: list | None = None) -> dict:
    """Load --model afresh and time its steps (LoRA of settings.lora_rank, or full fine-tuning when None)."""
    model, tokenizer, processor, what = model_shapes.load_bench_model(args.model, device, dtype, folder)
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{what}: {params / 1e6:,.1f} M parameters, {str(dtype).removeprefix('torch.')}, {where}; "
          f"load average {os.getloadavg()[0]:.2f} before")
    return bench_grpo_step(model, tokenizer, processor, settings, items)


def free(device) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
