"""Setting a grpo.py run up: the run folder, the training and held-out data, the policy and its
frozen reference (under --lora-rank: the policy's adapters switched off), the optimizer and the
seeds, or all of these from a checkpoint (checkpoints.py)."""
from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

import data
import preresq
from harness import distributed, lora, prefetch, presets
from harness.checkpoints import (CHECKPOINT_STATE, check_same_data, checkpoints, config_differences,
                                 newest_sound_checkpoint, remove_partial_folders, restore, write_run_file)
from harness.logs import steps_text
from support.cli import InputError, Warnings, check_apart, check_device

def check_run_folder(cfg, resume: bool, force: bool, comm) -> dict | None:
    """Refuse a run folder that cannot work, before anything is created: a file, --model's folder (or
    one inside or around it), an earlier run's folder without --resume, --resume without a
    checkpoint or with another configuration, no write access. Returns the checkpoint state to
    resume from (or None)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder; choose another --out.")
    check_apart(out, presets.model_folder(cfg.model))
    state = None
    if resume:
        found, damaged = newest_sound_checkpoint(out)
        if not found:
            raise InputError(f"--resume: no complete checkpoint in {out}; start without --resume.")
        for line in damaged if comm.main else []:
            print(f"grpo.py: warning: damaged checkpoint {line}; resuming from {found}, the newest sound one",
                  file=sys.stderr)
        state = {**torch.load(found / CHECKPOINT_STATE, weights_only=False), "folder": found}
        diffs = config_differences(state, cfg, comm.world)
        if diffs and not force:
            raise InputError(f"--resume from {found} with a different configuration:\n  "
                             + "\n  ".join(diffs) + "\nDrop those flags (--resume takes every flag not given "
                             "from the checkpoint), or add --force to resume with them anyway.")
    elif out.exists() and checkpoints(out):
        raise InputError(f"{out} already holds checkpoints; add --resume to continue that run, "
                         "or choose another --out.")
    elif out.exists() and any(out.iterdir()):  # a finished run without checkpoints, or any other files
        names = sorted(p.name for p in out.iterdir())
        raise InputError(f"--out {out} is not empty ({', '.join(names[:4])}{', ...' * (len(names) > 4)}): a new run "
                         "never writes over earlier files. Choose another --out (there is no checkpoint in it "
                         "to --resume from).")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to --out {out} ({existing} is not writable). Choose a writable folder.")
    return state


def create_run_folder(out: Path, resume: bool, comm) -> None:
    """Make the run folder (rank 0), once nothing can refuse the run any more (the data and models
    are loaded); a resumed run's folder loses only the unfinished copies of saves cut short."""
    if not comm.main:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write to --out {out}: {e.strerror or e}. Choose a writable folder.")
    if resume:
        remove_partial_folders(out)


def check_some_picture_reads(name: str, items: list, max_pixels: int | None) -> None:
    """DataError when no item of a training set can be read: training would skip every step. The
    items are read in order until one reads, so a sound set costs one picture."""
    first = None
    for item in items:
        try:
            data.read_visual(item.path, max_pixels=max_pixels)
            return
        except data.DataError as e:
            first = first or str(e)
    raise data.DataError(f"no picture of training set {name!r} could be read: all {len(items)} failed, the "
                         f"first with: {first}. Check the files (python data.py --data ... --check-images lists "
                         "each unreadable one).")


def load_training_data(cfg) -> tuple[dict, list]:
    """Training sets by name, and the held-out items (a fixed seeded subset of --eval-split)."""
    sets = data.load_datasets(cfg.data, cfg.data_root, cfg.split, labels=cfg.labels, seed=cfg.seed)
    for name, items in sets.items():
        if not items:
            raise data.DataError(f"dataset {name!r} has no items in split {cfg.split!r}; choose another --split.")
        check_some_picture_reads(name, items, cfg.max_pixels)
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


def load_models(cfg, source: str, device, comm, loaded=None):
    """(the trained model, the policy, the frozen reference or None), placed and sharded as configured.
    The trained model is what the optimizer and checkpoints take (under --fsdp, its FSDP root); the
    policy and the reference are preresq.Policy objects. The reference is the initial model: a copy,
    or --model again when resuming from `source`. Under --lora-rank the policy is --model with
    adapters (read from `source` when resuming) and the reference the policy with its adapters off.
    loaded: (model, tokenizer, image_processor) already built, in place of loading `source`
    (tools/step_bench.py's models of random weights)."""
    if loaded is None:
        if not comm.main:  # rank 0 loads first: a preset missing from the cache is built once, not by every rank
            tdist.barrier()
        name = cfg.model if cfg.lora_rank else source  # a LoRA checkpoint holds only the adapters
        loaded = preresq.load_model(presets.model_path(name), device, cfg.dtype)
        if comm.main and comm.world > 1:
            tdist.barrier()
    model, tokenizer, image_processor = loaded
    frozen = None
    if cfg.lora_rank:
        add_adapters(cfg, model, source, comm)
    elif cfg.beta or cfg.reasoning_beta:
        frozen = (preresq.load_model(presets.model_path(cfg.model), device, cfg.dtype)[0] if source != cfg.model
                  else copy.deepcopy(model))
        frozen.requires_grad_(False).eval().to(cfg.reference_device or model.device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    kl, device = cfg.beta or cfg.reasoning_beta, str(model.device)
    if cfg.fsdp and comm.world > 1:
        shard = lambda m: distributed.ShardedPolicy(distributed.shard_model(m, device), tokenizer,
                                                    image_processor, comm)
        reference = shard(frozen) if frozen is not None else None
        policy = shard(model)
        model = policy.root
    else:
        if cfg.fsdp and comm.main:
            print("note: --fsdp with one process: nothing to shard, the model stays whole.", file=sys.stderr)
        policy = preresq.Policy(model, tokenizer, image_processor)
        reference = (lora.AdaptersOff(model, tokenizer, image_processor) if cfg.lora_rank and kl else
                     preresq.Policy(frozen, tokenizer, image_processor) if frozen is not None else None)
    if comm.world > 1 and comm.main:
        print(f"{comm.world} processes ({tdist.get_backend()}): global batch {cfg.images_per_optimizer_step()} x "
              f"{comm.world} = {cfg.images_per_optimizer_step(comm.world)} images per step; "
              + ("model, gradients and optimizer state sharded (FSDP2)" if cfg.fsdp else
                 "gradients summed over processes"), flush=True)
    return model, policy, reference


def add_adapters(cfg, model, source: str, comm):
    """--lora-rank: adapters on the freshly loaded --model (a resumed run's from its checkpoint)."""
    wrapped = lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed)
    if source != cfg.model:
        try:
            lora.load_adapters(model, Path(source) / lora.ADAPTER_FILE)
        except (OSError, ValueError) as e:  # --resume --force with other --lora-* flags, or none before
            raise InputError(f"--resume: {source} holds no adapters that fit --lora-rank {cfg.lora_rank} "
                             f"--lora-targets {cfg.lora_targets} ({e}); resume with the checkpoint's LoRA flags.")
    if comm.main:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA: rank {cfg.lora_rank} adapters on {len(wrapped)} layers ({cfg.lora_targets}): "
              f"{trained / 1e6:.2f} M trained parameters of {total / 1e6:.2f} M ({100 * trained / total:.1f} %); "
              "the reference is the policy with its adapters off", flush=True)


@dataclass
class Run:
    """What the loop needs besides the config: the run folder, the processes, data, models, optimizer."""
    out: Path
    comm: object  # grpo.Processes
    sets: dict
    held: list
    sampler: prefetch.BatchSampler
    steps: int
    start: int
    model: torch.nn.Module  # what the optimizer trains and checkpoints hold (--fsdp: the FSDP root)
    policy: preresq.Policy
    reference: preresq.Policy | None
    optimizer: torch.optim.Optimizer
    counters: dict
    nonfinite_in_a_row: int = 0
    warn: Warnings = field(default_factory=lambda: Warnings("grpo.py"))


def prepare(cfg, resume: bool, force: bool, comm, device) -> Run:
    """Open (or resume) the run folder, load data and models, build the optimizer; seed the run."""
    default = f"runs/{cfg.data.replace(',', '+')}-{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.out = distributed.broadcast(cfg.out or default, comm)  # the default name holds the time: rank 0's
    out = Path(cfg.out)
    check_device(device)
    model_line = presets.describe_model(cfg.model)  # refused here when it is not there: before any data is made
    state = check_run_folder(cfg, resume, force, comm)
    sets, held = load_training_data(cfg)
    check_same_data(state, sets, force)
    distributed.check_global_batch(sets, cfg.images_per_optimizer_step(), comm.world)
    if comm.main:
        print(model_line, flush=True)
    sampler = prefetch.BatchSampler(sets, cfg.images_per_optimizer_step(), cfg.seed, comm.rank, comm.world)
    cfg.set_length(sum(map(len, sets.values())), comm.world)
    steps = cfg.steps
    source = str(state["folder"]) if state else cfg.model
    comm = replace(comm, sharded=bool(cfg.fsdp and comm.world > 1))
    model, policy, reference = load_models(cfg, source, device, comm)
    create_run_folder(out, resume, comm)  # only now: a model that does not load leaves no trace
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or the adapters under --lora-rank
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Seeded only now: building a preset or initialising a model draws from (and reseeds) the
    # global generators, and whether that happens must not change the run. Sampling differs per rank.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(distributed.rank_seed(cfg.seed, comm.rank))
    start = state["step"] if state else 0
    if state:
        restore(state, out, model, optimizer, cfg, comm)
    if comm.main:
        if state:
            print(f"resumed from {source} at step {start} (stage {cfg.stage(start)})")
        if cfg.schedule == "explore-stable":
            first = min(cfg.stage1_steps, steps)
            print(f"schedule: stage 1 (prompt pool, G {cfg.stage1_generations}) {steps_text(1, first)}, "
                  f"stage 2 (fixed prompt, G {cfg.stage2_generations}) {steps_text(first + 1, steps)}")
        write_run_file(out / "config.json", json.dumps(asdict(cfg), indent=2))
    counters = {"skipped_items": 0, "nonfinite_steps": 0, **(state.get("counters", {}) if state else {})}
    return Run(out, comm, sets, held, sampler, steps, start, model, policy, reference, optimizer, counters)
