"""Run-keeping for grpo.py: everything around the GRPO step that a run needs but the paper does not.

- the data order (BatchSampler: which images each step trains on, a pure function of seed and step)
  and picture loading that skips unreadable files;
- setting a run up (prepare): the output folder, the training and held-out data, the policy and
  its frozen reference (under --lora-rank: the policy's adapters), the optimizer and schedule, the
  seeds, or all of these from a checkpoint;
- held-out evaluation along the way, metrics.jsonl / eval.jsonl / curves.png, final/;
- checkpoints and exact resume, and Ctrl-C / SIGTERM (Stop).

Every checkpoint is an ordinary Hugging Face folder (from_pretrained loads it) plus
trainer_state.pt: optimizer, the RNG states of every rank, step, counters, the data
position and the config. `--resume` continues from the newest complete one and gives the same
weights and metrics as a run that never stopped. Folders are written into a temporary sibling and
renamed into place (files.atomic_folder), so a crash, a kill or a full disk never leaves a damaged one.
Under --lora-rank a checkpoint holds the adapters (lora.ADAPTER_FILE) instead of the weights (the
frozen ones are --model's), and final/ is the merged model, with the adapters beside its weights.
"""
from __future__ import annotations

import copy
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
import argparse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from safetensors import safe_open
from tqdm import tqdm

import data
import evaluate
import grpo
from support import lora
from support import plots
from support import report_page
import preresq
from support import presets
from support.distributed import (SINGLE, Dist, Ranks, all_reduce, broadcast, call, check_global_batch,
                                 full_optimizer_state, full_weights, is_sharded, load_optimizer_state, rank_seed,
                                 shard_model, unwrap)
from support.cli import (Failure, InputError, Warnings, add_flags, check_apart, check_device, default_text,
                         number_errors)
from support.files import WriteError, atomic_folder, partial_folders, write_error, write_file

CHECKPOINT_STATE = "trainer_state.pt"
# The run's logs, one JSON line per record with its "step"; a resumed run cuts each back to its checkpoint.
LOGS = ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl")
# A run stops when this many steps in a row give non-finite rewards, losses or gradients.
MAX_NONFINITE_STEPS = 5
# Flags that may change between a run and its resumption; all others must match (or --force).
RESUMABLE_CHANGES = {"out", "steps", "epochs", "eval_every", "eval_size", "save_every", "keep_last", "workers",
                     "device", "micro_batch_size", "gradient_checkpointing", "reference_device", "fsdp",
                     "log_rollouts", "stage1_steps"}
# What files.atomic_folder writes into a run folder: a save cut short by a kill leaves ".<name>-XXXXXXXX".
SAVED_FOLDERS = r"checkpoint-\d+|final"


class RunError(Failure):
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


def save_checkpoint(out: Path, step: int, model, tokenizer, image_processor, optimizer, cfg,
                    extra: dict, dist: Dist = SINGLE) -> Path:
    """Write OUT/checkpoint-<step>/ atomically, then prune to the newest cfg.keep_last.

    Under torchrun every rank calls it (to gather the RNG states, and under --fsdp the weights and
    optimizer state) and rank 0 writes.
    """
    final = out / f"checkpoint-{step}"
    weights, optimizer_state = full_weights(model), full_optimizer_state(model, optimizer)
    adapters_only = bool(lora.layers(unwrap(model)))  # LoRA: the frozen weights are --model's
    ranks = [rng_states()]
    if dist.world > 1:
        ranks = [None] * dist.world
        tdist.all_gather_object(ranks, rng_states())
    if not dist.main:
        return final
    remove_partial_folders(out)
    save_folder(final, unwrap(model), tokenizer, image_processor,
                {"step": step, "optimizer": optimizer_state,
                 "rng": ranks[0], **({"rng_ranks": ranks} if dist.world > 1 else {}), "world_size": dist.world,
                 "config": asdict(cfg), **extra}, weights=weights, adapters_only=adapters_only)
    if cfg.keep_last:  # only now: the new checkpoint is complete
        for old in checkpoints(out)[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_folder(final: Path, model, tokenizer, image_processor, state: dict | None = None,
                weights: dict | None = None, adapters_only: bool = False) -> None:
    """A model folder (and trainer_state.pt), written atomically. weights: the state dict to write
    (--fsdp: gathered from the shards; LoRA: merged); default the model's own. A model with
    adapters gets lora.ADAPTER_FILE too, and with adapters_only no weights besides."""
    try:
        with atomic_folder(final, replace=True) as tmp:
            if lora.layers(model):
                lora.save_adapters(model, tmp / lora.ADAPTER_FILE)
            if not adapters_only:
                model.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            image_processor.save_pretrained(tmp)
            if state is not None:
                torch.save(state, tmp / CHECKPOINT_STATE)
    except Exception as e:  # a full disk: OSError, RuntimeError (torch.save) or SafetensorError, vaguely worded
        lost = "The trained weights could not be saved. " if final.name == "final" else ""
        raise RunError(str(write_error(final, getattr(e, "error", e), lost + what_is_safe(final.parent)))) from e


def what_is_safe(out: Path) -> str:
    """What a run stopped by a failed write keeps, in words: its newest checkpoint and the command
    that continues from it, or that nothing can be resumed."""
    found = checkpoints(out)
    if not found:
        return (f"No checkpoint was saved in {out}, so nothing can be resumed: free some space and start the "
                "run again with another --out.")
    return (f"Nothing earlier in {out} was lost; the newest checkpoint is {found[-1]}. Free some space, then "
            f"continue with: python grpo.py --out {out} --resume")


def remove_partial_folders(out: Path) -> None:
    """Remove the hidden folders of saves that a kill cut short (files.partial_folders; as large as a
    checkpoint); nothing else in OUT is touched."""
    for folder in partial_folders(out, SAVED_FOLDERS):
        shutil.rmtree(folder, ignore_errors=True)
        print(f"grpo.py: removed {folder}, the unfinished copy of a save that was cut short", file=sys.stderr)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in OUT, oldest first (temporary folders of interrupted saves are ignored)."""
    found = [p for p in out.glob("checkpoint-*") if (p / CHECKPOINT_STATE).exists() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def damage(folder: Path) -> str | None:
    """What is damaged in a checkpoint folder, or None: every file is opened the cheap way (JSON parsed,
    safetensors headers read, the training state mapped, not read) so a truncated or overwritten file
    is found before --resume loads anything."""
    try:  # mmap: the optimizer state is mapped, not read; a cut zip has lost its directory at the end
        torch.load(folder / CHECKPOINT_STATE, weights_only=False, mmap=True)["step"]
    except Exception as e:
        return f"{CHECKPOINT_STATE} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "it holds no weights (*.safetensors)"
    # what save_folder always writes (config.json is the model's, absent where only adapters are kept)
    needed = ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"]
    missing = [n for n in needed + ["config.json"] * (not (folder / lora.ADAPTER_FILE).exists())
               if not (folder / n).exists()]
    if missing:
        return f"{', '.join(missing)} missing"
    for f in [*sorted(folder.glob("*.json")), *weights]:
        try:
            json.loads(f.read_text()) if f.suffix == ".json" else safe_open(str(f), "pt").keys()
        except Exception as e:
            return f"{f.name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def newest_sound_checkpoint(out: Path) -> tuple[Path | None, list[str]]:
    """(OUT's newest complete checkpoint with nothing damaged, or None; what is damaged in the newer
    ones, a line each). InputError when checkpoints exist but every one is damaged."""
    damaged = []
    for folder in reversed(checkpoints(out)):
        what = damage(folder)
        if what is None:
            return folder, damaged
        damaged.append(f"{folder}: {what}")
    if damaged:
        raise InputError("--resume: every checkpoint in {} is damaged:\n  {}\nNo run can continue from them: "
                         "start the run again with another --out.".format(out, "\n  ".join(damaged)))
    return None, damaged


def saved_config(out: Path) -> dict | None:
    """The configuration in OUT's newest sound checkpoint (None when there is none)."""
    found = newest_sound_checkpoint(out)[0]
    # mmap: only the small config is read, not the optimizer state.
    return torch.load(found / CHECKPOINT_STATE, weights_only=False, mmap=True)["config"] if found else None


def config_differences(state: dict, cfg, world: int) -> list[str]:
    """The flags that differ from the checkpoint's (outside RESUMABLE_CHANGES). Across a change in
    the number of processes what must match is the global batch: the data order hangs on it."""
    saved, now = state["config"], asdict(cfg)
    saved = {**{f.name: f.default for f in fields(cfg)}, **saved}  # a flag newer than the checkpoint: its default
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
             for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        diffs = [d for d in diffs if not d.startswith("--images-per-step:")]
        then, later = saved["images_per_step"] * saved_world, cfg.images_per_step * world
        if then != later:
            diffs.append(f"global batch (--images-per-step x processes): checkpoint {then} with {saved_world} "
                         f"process(es), now {later} with {world}"
                         + (f" (--images-per-step {then // world} keeps it)" if then % world == 0 else ""))
    return diffs


def check_run_folder(cfg, resume: bool, force: bool, dist: Dist = SINGLE) -> dict | None:
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
        for line in damaged if dist.main else []:
            print(f"grpo.py: warning: damaged checkpoint {line}; resuming from {found}, the newest sound one",
                  file=sys.stderr)
        state = {**torch.load(found / CHECKPOINT_STATE, weights_only=False), "folder": found}
        diffs = config_differences(state, cfg, dist.world)
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


def create_run_folder(out: Path, resume: bool, dist: Dist = SINGLE) -> None:
    """Make the run folder (rank 0), once nothing can refuse the run any more (the data and models
    are loaded); a resumed run's folder loses only the unfinished copies of saves cut short."""
    if not dist.main:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write to --out {out}: {e.strerror or e}. Choose a writable folder.")
    if resume:
        remove_partial_folders(out)


def data_fingerprint(sets: dict) -> str:
    """A digest of the training items (set, file name, MOS, in order): a resumed run must see the same data."""
    h = hashlib.sha1()
    for name, items in sets.items():
        for it in items:
            h.update(f"{name}\t{os.path.basename(it.path)}\t{it.mos!r}\n".encode())
    return h.hexdigest()[:16]


def check_same_data(state: dict | None, sets: dict, force: bool) -> None:
    if state and not force and state["data"].get("fingerprint") != data_fingerprint(sets):
        raise InputError(f"--resume: the training data differ from the checkpoint's "
                         f"({state['data'].get('items')} items then, {sum(map(len, sets.values()))} now): the "
                         "label files or images under --data-root changed. Restore them, or add --force to "
                         "resume on the new data.")


def restore(state: dict, out: Path, model, optimizer, cfg, dist: Dist = SINGLE) -> None:
    """Optimizer and RNG states from a checkpoint (the learning rate is a function of the step);
    the logs cut back to its step."""
    load_optimizer_state(model, optimizer, state["optimizer"])
    ranks = state.get("rng_ranks", [state["rng"]])
    if len(ranks) == dist.world:
        set_rng_states(ranks[dist.rank])
    else:  # another number of processes: rank 0's generators, a new sampling seed on the others
        set_rng_states(state["rng"])
        if dist.rank:
            torch.manual_seed(rank_seed(cfg.seed + state["step"], dist.rank))
    if dist.main:
        for name in LOGS:
            truncate_log(out / name, state["step"])


def say_how_to_resume(out: str | None, stop: BaseException | None = None) -> None:
    """After an interrupted run: the newest complete checkpoint and the command that continues from it
    (already said when the run stopped at a checkpoint: `stop` is Stopped)."""
    if isinstance(stop, Stopped):
        return
    found = checkpoints(Path(out)) if out else []
    print("\n" + (f"The newest complete checkpoint is {found[-1]}; continue with:\n"
                  f"  python grpo.py --out {out} --resume" if found else "No checkpoint was saved yet."),
          file=sys.stderr)


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
        write_run_file(path, "".join(l + "\n" for l in kept))


def log_json(path: Path, record: dict) -> None:
    """One JSON line; a non-finite number is written as null (JSON has no NaN)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    write_run_file(path, json.dumps(clean) + "\n", append=True)


def write_run_file(path: Path, text: str, append: bool = False) -> None:
    """A file of the run folder, through files.write_file: a full or read-only disk stops the run with
    the file, the newest checkpoint and how to continue (what_is_safe); nothing is left half-written."""
    write_file(path, text, append=append, safe=lambda: what_is_safe(path.parent))


def steps_text(first: int, last: int) -> str:
    """Steps first..last (1-based, inclusive) in words: "steps 3-8", "step 3", or "no steps" when empty."""
    return "no steps" if last < first else f"step {first}" if last == first else f"steps {first}-{last}"


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run at a checkpoint: grpo.py exits 130, as for any Ctrl-C."""


class Stop:
    """Ctrl-C / SIGTERM: the first asks the loop to checkpoint and stop after the current step;
    the second exits at once. Use as a context manager around the loop (main thread only)."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to quit at once).", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------- data

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
        self.choices: list[int] = []

    def choice(self, step: int) -> int:
        while len(self.choices) <= step:
            rng = np.random.default_rng([self.seed, len(self.choices)])
            self.choices.append(int(rng.choice(len(self.names), p=self.weights)))
        return self.choices[step]

    def batch(self, step: int) -> tuple[str, list]:
        k = self.choice(step)
        seen = sum(1 for s in range(step) if self.choice(s) == k) * self.batch_size
        items, n = self.sets[self.names[k]], len(self.sets[self.names[k]])
        picks = [(seen + i) for i in range(min(self.batch_size, n))]
        mine = picks[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        order = lambda epoch: np.random.default_rng([self.seed, k, epoch]).permutation(n)
        return self.names[k], [items[order(p // n)[p % n]] for p in mine]

    def epoch(self, step: int) -> float:
        """Passes over all training images completed before `step`."""
        return step * self.batch_size / sum(len(v) for v in self.sets.values())


    def dataset(self, step: int) -> str:
        """The training set that step `step` draws from (the same on every rank)."""
        return self.names[self.choice(step)]

    def is_video(self, step: int) -> bool:
        return self.sets[self.dataset(step)][0].is_video


class Prefetch:
    """Loads the next step's pictures in worker threads while the current step trains.

    The workers run at the lowest CPU priority (on Linux a thread has its own nice value): torch's
    threads, which wait for each other at every operation, keep the cores, so a decoding thread
    taking one of them cannot stall them all; decoding gets the time they leave, and all of it
    while the loop waits for a step's pictures."""

    def __init__(self, run: "Run", max_pixels: int | None, workers: int):
        self.sampler, self.steps, self.max_pixels = run.sampler, run.steps, max_pixels
        self.pool = ThreadPoolExecutor(max(1, workers), initializer=lowest_priority)
        self.pending = {run.start: self.pool.submit(load_visuals, self.sampler.batch(run.start)[1], max_pixels)}

    def load(self, step: int) -> tuple[list, list, list[str]]:
        """(items, visuals, problems) of `step`; starts loading step + 1's."""
        if step + 1 < self.steps:
            self.pending[step + 1] = self.pool.submit(load_visuals, self.sampler.batch(step + 1)[1], self.max_pixels)
        return self.pending.pop(step).result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=False, cancel_futures=True)


def lowest_priority() -> None:
    """The calling thread to nice 19 where the system allows it (Linux); elsewhere nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def load_visuals(items: list, max_pixels: int | None) -> tuple[list, list, list[str]]:
    """Read each item's picture(s); an unreadable one is skipped and reported, never fatal."""
    kept, visuals, problems = [], [], []
    for item in items:
        try:
            v = data.read_visual(item.path, max_pixels=max_pixels)
        except data.DataError as e:
            problems.append(str(e))
            continue
        kept.append(item)
        visuals.append(v if isinstance(v, list) else [v])
    return kept, visuals, problems


# --------------------------------------------------------------------------- setting a run up

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


def load_models(cfg, source: str, device, dist: Dist):
    """(policy, frozen reference or None, tokenizer, image processor), placed and sharded as configured.
    The reference is the initial model: a copy, or --model again when resuming from `source`.
    Under --lora-rank the policy is --model with adapters (read from `source` when resuming) and
    the reference is the policy with its adapters switched off (lora.Reference)."""
    if not dist.main:  # rank 0 loads first: a preset missing from the cache is built once, not by every rank
        tdist.barrier()
    loaded = cfg.model if cfg.lora_rank else source  # a LoRA checkpoint holds only the adapters
    model, tokenizer, image_processor = preresq.load_model(presets.model_path(loaded), device, cfg.dtype)
    if dist.main and dist.world > 1:
        tdist.barrier()
    reference = None
    if cfg.lora_rank:
        reference = add_adapters(cfg, model, source, dist)
    elif cfg.beta or cfg.reasoning_beta:
        reference = (preresq.load_model(presets.model_path(cfg.model), device, cfg.dtype)[0] if source != cfg.model
                     else copy.deepcopy(model))
        reference.requires_grad_(False).eval().to(cfg.reference_device or model.device)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
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
    return model, reference, tokenizer, image_processor


def add_adapters(cfg, model, source: str, dist: Dist):
    """--lora-rank: adapters on the freshly loaded --model (a resumed run's from its checkpoint) ->
    the reference: the policy itself when the KL needs one, else None."""
    wrapped = lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed)
    if source != cfg.model:
        try:
            lora.load_adapters(model, Path(source) / lora.ADAPTER_FILE)
        except (OSError, ValueError) as e:  # --resume --force with other --lora-* flags, or none before
            raise InputError(f"--resume: {source} holds no adapters that fit --lora-rank {cfg.lora_rank} "
                             f"--lora-targets {cfg.lora_targets} ({e}); resume with the checkpoint's LoRA flags.")
    if dist.main:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA: rank {cfg.lora_rank} adapters on {len(wrapped)} layers ({cfg.lora_targets}): "
              f"{trained / 1e6:.2f} M trained parameters of {total / 1e6:.2f} M ({100 * trained / total:.1f} %); "
              "the reference is the policy with its adapters off", flush=True)
    return lora.Reference(model) if cfg.beta or cfg.reasoning_beta else None


def held_out(cfg, model, tokenizer, image_processor, items: list, dist: Dist = SINGLE,
             warn=None) -> tuple[dict | None, list[dict]]:
    """Held-out metrics and each item's {"file", "mos", "prediction"} (None when unparsed), computed on
    rank 0 while the other ranks wait (None, [] there); under --fsdp every rank runs the same passes."""
    metrics, rows = None, []
    model.eval()  # the held-out answers are sampled without dropout (--lora-dropout), as in training
    if dist.main or is_sharded(model):
        metrics, rows = call(model, evaluate.evaluate, tokenizer, image_processor, items, samples=cfg.eval_samples,
                             seed=cfg.seed, batch_size=16, max_new_tokens=cfg.max_new_tokens,
                             max_pixels=cfg.max_pixels, progress=False, warn=warn)
    if dist.world > 1:
        tdist.barrier()
    if not dist.main:
        return None, []
    kept = [{"file": str(r["path"]), "mos": r["mos"], "prediction": r["score"]} for r in rows]
    return {k: metrics[k] for k in ("n", "srcc", "plcc", "krcc", "parse_failures")}, kept


@dataclass
class Run:
    """What the loop needs besides the config: the run folder, data, models and optimizer."""
    out: Path
    dist: Dist
    sets: dict
    held: list
    sampler: BatchSampler
    steps: int
    start: int
    model: object
    reference: object
    tokenizer: object
    image_processor: object
    optimizer: torch.optim.Optimizer
    counters: dict
    comm: Ranks
    nonfinite_in_a_row: int = 0
    warn: Warnings = field(default_factory=lambda: Warnings("grpo.py"))


def prepare(cfg, resume: bool, force: bool, dist: Dist, device) -> Run:
    """Open (or resume) the run folder, load data and models, build the optimizer; seed the run."""
    default = f"runs/{cfg.data.replace(',', '+')}-{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.out = broadcast(cfg.out or default, dist)  # the default name holds the time: rank 0's
    out = Path(cfg.out)
    check_device(device)
    model_line = presets.describe_model(cfg.model)  # refused here when it is not there: before any data is made
    state = check_run_folder(cfg, resume, force, dist)
    sets, held = load_training_data(cfg)
    check_same_data(state, sets, force)
    check_global_batch(sets, cfg.images_per_step, dist.world)
    if dist.main:
        print(model_line, flush=True)
    sampler = BatchSampler(sets, cfg.images_per_step, cfg.seed, dist.rank, dist.world)
    cfg.set_length(sum(map(len, sets.values())), dist.world)
    steps = cfg.steps
    source = str(state["folder"]) if state else cfg.model
    model, reference, tokenizer, image_processor = load_models(cfg, source, device, dist)
    create_run_folder(out, resume, dist)  # only now: a model that does not load leaves no trace
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or the adapters under --lora-rank
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Seeded only now: building a preset or initialising a model draws from (and reseeds) the
    # global generators, and whether that happens must not change the run. Sampling differs per rank.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(rank_seed(cfg.seed, dist.rank))
    start = state["step"] if state else 0
    if state:
        restore(state, out, model, optimizer, cfg, dist)
    if dist.main:
        if state:
            print(f"resumed from {source} at step {start} (stage {cfg.stage(start)})")
        if cfg.schedule == "explore-stable":
            first = min(cfg.stage1_steps, steps)
            print(f"schedule: stage 1 (prompt pool, G {cfg.stage1_generations}) {steps_text(1, first)}, "
                  f"stage 2 (fixed prompt, G {cfg.stage2_generations}) {steps_text(first + 1, steps)}")
        write_run_file(out / "config.json", json.dumps(asdict(cfg), indent=2))
    counters = {"skipped_items": 0, "nonfinite_steps": 0, **(state.get("counters", {}) if state else {})}
    return Run(out, dist, sets, held, sampler, steps, start, model, reference, tokenizer, image_processor,
               optimizer, counters, Ranks(dist, is_sharded(model)))


# --------------------------------------------------------------------------- logs, evaluation, the end

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


def answers(done, items: list) -> list[dict]:
    """This process's groups of a step (grpo.Step) as plain data, one dict per image: its file, MOS and
    prompt, and per answer the text, parsed scores (None when unparsed), every reward term, total,
    advantage and length in tokens: a line of rollouts.jsonl."""
    rollout, scored = done.rollout, done.scored
    g, adv, own = rollout.num_generations, scored.advantages, scored.own
    terms = {name: v[own] for name, v in scored.terms.items()}
    scores, valid = scored.scores[own], scored.valid[own]
    lengths = rollout.mask.sum(1).tolist() if rollout.mask is not None else []
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


def log_step(cfg, run: Run, step: int, done, items: list, problems: list[str], seconds: float) -> dict:
    """After a step (grpo.Step): the counters, metrics.jsonl and, every --log-rollouts steps,
    rollouts.jsonl (rank 0), and a RunError after MAX_NONFINITE_STEPS non-finite steps in a row.
    Returns the step's metrics."""
    for p in problems:
        run.warn(f"skipped an unreadable item: {p}")
    run.counters["skipped_items"] += int(all_reduce([len(problems)], run.dist)[0])
    head = {"step": step + 1, "stage": cfg.stage(step)}
    if cfg.log_rollouts and (step + 1) % cfg.log_rollouts == 0 and done.scored.terms and run.dist.main:
        log_json(run.out / "rollouts.jsonl", {**head, "groups": answers(done, items)})
    record = {**head, "epoch": round(run.sampler.epoch(step + 1), 4), **step_metrics(done.scored), **done.stats}
    run.nonfinite_in_a_row = run.nonfinite_in_a_row + 1 if record.get("nonfinite") else 0
    if record.get("nonfinite"):
        run.counters["nonfinite_steps"] += 1
        if run.dist.main:
            tqdm.write(f"warning: step {step + 1}: non-finite {record['nonfinite']}; step skipped", file=sys.stderr)
    record.update(run.counters, lr=record.get("lr", cfg.learning_rate(step)), seconds=round(seconds, 3))
    if "completion_tokens" in record:
        record["tokens_per_second"] = round(record["completion_tokens"] / max(record["seconds"], 1e-9), 1)
    if run.dist.main:
        log_json(run.out / "metrics.jsonl", record)
    if run.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
        raise RunError(nonfinite_message(run.out, step, run.nonfinite_in_a_row, record["nonfinite"]))
    return record


def checkpoint_if_due(cfg, run: Run, done: int, stop: Stop) -> None:
    """Save a checkpoint every --save-every steps, and when Ctrl-C or SIGTERM asked to stop: then
    raise Stopped (grpo.py exits 130). A signal may reach the ranks at different steps: they stop
    together, at the first that saw one."""
    stopping = bool(all_reduce([stop.requested], run.dist, "max")[0])
    if done >= run.steps or not ((cfg.save_every and done % cfg.save_every == 0) or stopping):
        return
    saved = save(cfg, run, done)
    if stopping and run.dist.main:
        print(f"stopped after step {done} of {run.steps}; checkpoint {saved}. Continue with:\n"
              f"  python grpo.py --out {run.out} --resume", file=sys.stderr, flush=True)
    if stopping:
        raise Stopped


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


def evaluate_and_log(cfg, run: Run, step: int) -> dict | None:
    """Held-out evaluation: eval.jsonl, eval_items.jsonl (this evaluation's predictions), the curves
    and the run's page (rank 0)."""
    metrics, rows = held_out(cfg, run.model, run.tokenizer, run.image_processor, run.held, run.dist, run.warn)
    if run.dist.main:
        log_json(run.out / "eval.jsonl", {"step": step, **metrics})
        write_run_file(run.out / "eval_items.jsonl", "".join(json.dumps({"step": step, **r}) + "\n" for r in rows))
        if step:
            draw_run_curves(run.out)
        write_page(run)
    return metrics


def write_page(run: Run) -> None:
    """report.html, refreshed from the logs: the curves, the logged answers, the held-out scatter. A
    page that cannot be written is warned about; the run goes on."""
    try:
        report_page.write_training_page(run.out, load_picture=data.read_visual)
    except Exception as e:  # a page is never worth a run
        run.warn(f"could not write {run.out / 'report.html'}: {type(e).__name__}: {e}")


def save(cfg, run: Run, done: int) -> Path:
    total = sum(map(len, run.sets.values()))
    return save_checkpoint(
        run.out, done, run.model, run.tokenizer, run.image_processor, run.optimizer, cfg,
        {"stage": cfg.stage(done), "counters": run.counters,
         "data": {"seed": cfg.seed, "next_step": done, "epoch": run.sampler.epoch(done), "items": total,
                  "fingerprint": data_fingerprint(run.sets)}}, run.dist)


def finish(cfg, run: Run, first_eval: dict | None, last_eval: dict | None) -> Path:
    """Write final/, evaluate once more unless the last step just did, print the summary."""
    out, dist = run.out, run.dist
    # LoRA: rank 0 merges W + s B A (on the CPU); --fsdp: every rank gathers the shards
    weights = lora.merged_weights(run.model) if cfg.lora_rank and dist.main else full_weights(run.model)
    if dist.main:
        save_folder(out / "final", unwrap(run.model), run.tokenizer, run.image_processor, weights=weights)
    if run.held and (not cfg.eval_every or run.steps % cfg.eval_every):
        last_eval = evaluate_and_log(cfg, run, run.steps)
    if not dist.main:
        return out
    draw_run_curves(out)
    write_page(run)
    if first_eval and last_eval:
        print(f"held-out {cfg.eval_split} ({first_eval['n']} items): SRCC {first_eval['srcc']:.3f} -> "
              f"{last_eval['srcc']:.3f}, PLCC {first_eval['plcc']:.3f} -> {last_eval['plcc']:.3f}")
    print(f"final model: {out / 'final'}   metrics: {out / 'metrics.jsonl'}   page: {out / 'report.html'}")
    return out


# --------------------------------------------------------------------------- grpo.py's command line

def build_parser() -> argparse.ArgumentParser:
    """grpo.py's flags: one per grpo.Config field, grouped, each default shown once."""
    p = argparse.ArgumentParser(prog="grpo.py", description="Train a Qwen2.5-VL quality judge with GRPO and the "
                                "PreResQ-R1 reward. With no flags: synthetic images and the `tiny` preset on the CPU "
                                "(a few minutes). Defaults in [brackets] depend on --model: a preset's, or the "
                                "paper's for a real one.")
    tables = {**grpo.PRESET_DEFAULTS, "paper": grpo.PAPER_DEFAULTS, "paper video": grpo.PAPER_VIDEO_DEFAULTS}
    add_flags(p, grpo.Config, default_text(tables), extra={"data": f" (known: {', '.join(data.DATASETS)})"})
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--force", action="store_true", help="with --resume: accept a configuration that differs "
                   "from the checkpoint's")
    return p


def length_on_resume(saved: dict, given: set[str]) -> dict:
    """What --steps or --epochs given with --resume change: --epochs alone counts the steps again
    from the data, and stage 1 stays half the run's length unless --stage1-steps is given or the
    checkpoint's was not half of its length (set by hand)."""
    changes = {}
    if "epochs" in given and "steps" not in given:
        changes["steps"] = None
    if given & {"steps", "epochs"} and "stage1_steps" not in given and saved.get("stage1_steps") is not None \
            and saved["stage1_steps"] == (saved.get("steps") or 0) // 2:
        changes["stage1_steps"] = None  # Config.set_length: half the new length
    return changes


def parse_args(argv=None) -> tuple["grpo.Config", bool, bool]:
    """Command line -> (config, resume, force). With --resume, flags not given come from the checkpoint."""
    p = build_parser()
    args = vars(p.parse_args(argv))
    resume, force = args.pop("resume"), args.pop("force")
    if resume:
        if not args["out"]:
            raise InputError("--resume needs --out DIR (the folder of the run to continue)")
        saved = saved_config(Path(args["out"]))
        if saved is None:
            raise InputError(f"--resume: no complete checkpoint in {args['out']}; start without --resume")
        unset = object()
        given = vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(args, unset))))
        args = {k: saved.get(k, v) if given[k] is unset else given[k] for k, v in args.items()}
        args.update(length_on_resume(saved, {k for k, v in given.items() if v is not unset}))
    errors = number_errors(args)  # every number finite, and within cli.BOUNDS
    if errors:
        raise InputError("; ".join(errors))
    try:
        cfg = grpo.Config(**args).resolve()
    except grpo.ConfigError as e:
        raise InputError(str(e)) from None
    errors = lora.config_errors(cfg)  # the --lora-* flags, and what LoRA does not combine with
    if errors:
        raise InputError("; ".join(errors))
    return cfg, resume, force
