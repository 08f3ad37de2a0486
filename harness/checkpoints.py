"""Checkpoints and exact resume for grpo.py, and a clean stop on Ctrl-C / SIGTERM.

Every checkpoint is an ordinary Hugging Face folder (from_pretrained loads it) plus trainer_state.pt:
optimizer, the RNG states of every rank, step, counters, the data position and the config.
`--resume` continues from the newest sound one and gives the same weights and metrics as a run that
never stopped. Folders are written into a temporary sibling and renamed into place
(files.atomic_folder), so a crash, a kill or a full disk never leaves a damaged one. Under
--lora-rank a checkpoint holds the adapters (lora.ADAPTER_FILE) instead of the weights (the frozen
ones are --model's).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from safetensors import safe_open

from harness import lora
from harness.distributed import full_optimizer_state, full_weights, load_optimizer_state, rank_seed, unwrap
from support.cli import Failure, InputError
from support.files import atomic_folder, partial_folders, write_error, write_file

CHECKPOINT_STATE = "trainer_state.pt"


# The run's logs, one JSON line per record with its "step"; a resumed run cuts each back to its checkpoint.
LOGS = ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl")


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
                    extra: dict, comm) -> Path:
    """Write OUT/checkpoint-<step>/ atomically, then prune to the newest cfg.keep_last.

    Under torchrun every rank calls it (to gather the RNG states, and under --fsdp the weights and
    optimizer state) and rank 0 writes.
    """
    final = out / f"checkpoint-{step}"
    weights, optimizer_state = full_weights(model), full_optimizer_state(model, optimizer)
    adapters_only = bool(lora.layers(unwrap(model)))  # LoRA: the frozen weights are --model's
    ranks = [rng_states()]
    if comm.world > 1:
        ranks = [None] * comm.world
        tdist.all_gather_object(ranks, rng_states())
    if not comm.main:
        return final
    remove_partial_folders(out)
    save_folder(final, unwrap(model), tokenizer, image_processor,
                {"step": step, "optimizer": optimizer_state,
                 "rng": ranks[0], **({"rng_ranks": ranks} if comm.world > 1 else {}), "world_size": comm.world,
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


def write_run_file(path: Path, text: str, append: bool = False) -> None:
    """A file of the run folder, through files.write_file: a full or read-only disk stops the run with
    the file, the newest checkpoint and how to continue (what_is_safe); nothing is left half-written."""
    write_file(path, text, append=append, safe=lambda: what_is_safe(path.parent))


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


def restore(state: dict, out: Path, model, optimizer, cfg, comm) -> None:
    """Optimizer and RNG states from a checkpoint (the learning rate is a function of the step);
    the logs cut back to its step."""
    load_optimizer_state(model, optimizer, state["optimizer"])
    ranks = state.get("rng_ranks", [state["rng"]])
    if len(ranks) == comm.world:
        set_rng_states(ranks[comm.rank])
    else:  # another number of processes: rank 0's generators, a new sampling seed on the others
        set_rng_states(state["rng"])
        if comm.rank:
            torch.manual_seed(rank_seed(cfg.seed + state["step"], comm.rank))
    if comm.main:
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


def checkpoint_if_due(cfg, run, done: int, stop: Stop) -> None:
    """Save a checkpoint every --save-every steps, and when Ctrl-C or SIGTERM asked to stop: then
    raise Stopped (grpo.py exits 130). A signal may reach the ranks at different steps: they stop
    together, at the first that saw one."""
    stopping = bool(run.comm.sum([stop.requested], "max")[0])
    if done >= run.steps or not ((cfg.save_every and done % cfg.save_every == 0) or stopping):
        return
    saved = save(cfg, run, done)
    if stopping and run.comm.main:
        print(f"stopped after step {done} of {run.steps}; checkpoint {saved}. Continue with:\n"
              f"  python grpo.py --out {run.out} --resume", file=sys.stderr, flush=True)
    if stopping:
        raise Stopped


def save(cfg, run, done: int) -> Path:
    total = sum(map(len, run.sets.values()))
    return save_checkpoint(
        run.out, done, run.model, run.policy.tokenizer, run.policy.image_processor, run.optimizer, cfg,
        {"stage": cfg.stage(done), "counters": run.counters,
         "data": {"seed": cfg.seed, "next_step": done, "epoch": run.sampler.epoch(done), "items": total,
                  "fingerprint": data_fingerprint(run.sets)}}, run.comm)
