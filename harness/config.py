"""grpo.py's settings: the step's (grpo.Settings) and the run's (RunSettings), their defaults (the
paper's, or a laptop preset's) and the command line, --resume's included.

The step's settings are declared in grpo.py, the run's here; grpo.py passes its Settings class in
(run_config), so that nothing here imports grpo.py, which imports this where its command starts.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import data
from harness import lora, presets
from harness.checkpoints import saved_config
from support.cli import InputError, add_flags, check_device, default_text, number_errors

VIDEO_SETS = ("lsvq", "konvid", "livevqc", "youtube-ugc", "synthetic-video")
# The run's defaults beside the step's: the paper's 7B recipe and the authors' video recipe (a real
# checkpoint on video sets only) add these to grpo.PAPER_DEFAULTS and grpo.AUTHORS_VIDEO_DEFAULTS.
PAPER_RUN = dict(epochs=8, eval_every=100, save_every=200, eval_size=None, eval_samples=None,
                 gradient_checkpointing=False)
AUTHORS_VIDEO_RUN = dict(PAPER_RUN, epochs=2, gradient_checkpointing=True)
# AdamW keeps its moments in the weights' dtype: in float16 its eps (1e-8) and every squared gradient
# under 6e-8 are 0, and the first update divides by them (measured: NaN at step 1, on the CPU).
FLOAT16_TRAINING = ("--dtype float16 cannot train: AdamW's update in float16 turns the weights into NaN at the "
                    "first step (its eps 1e-8 and squared gradients under 6e-8 round to 0). Train in float32 or "
                    "bfloat16; evaluate.py and preresq.py may use float16.")
# The laptop presets need far larger learning rates and shorter answers than the paper's 7B.
PRESET_DEFAULTS = {
    "tiny": dict(images_per_step=8, num_generations=6, schedule="explore-stable", lr=5e-4, beta=0.04,
                 reasoning_beta=0.5, max_new_tokens=64, steps=300, eval_every=50, save_every=100, eval_size=None,
                 eval_samples=4, gradient_checkpointing=False),
    "small": dict(images_per_step=8, num_generations=8, schedule="explore-stable", lr=5e-4, beta=0.0,
                  max_new_tokens=64, steps=150, eval_every=25, save_every=50, eval_size=96, eval_samples=None,
                  gradient_checkpointing=False),
}


def flag(default, type_, help: str, group: str, **argparse_options):
    """A settings field and its command-line flag, as grpo.flag declares the step's."""
    return field(default=default, metadata=dict(type=type_, help=help, group=group, **argparse_options))


def defaults_tables(settings: type) -> dict[str, dict]:
    """Every case's defaults: each preset's, the paper's and the authors' video recipe's."""
    return {**PRESET_DEFAULTS, "paper": {**settings.PAPER_DEFAULTS, **PAPER_RUN},
            "paper video": {**settings.AUTHORS_VIDEO_DEFAULTS, **AUTHORS_VIDEO_RUN}}


@dataclass
class RunSettings:
    """The run's settings, which the step never reads. With the step's (run_config) they are what a
    run depends on, saved in every checkpoint and compared on --resume. None means: the preset's
    default (PRESET_DEFAULTS) or the paper's."""
    data: str = flag("synthetic", str, "dataset name(s), comma-separated; each step's images come from one "
                     "set", "data")
    data_root: str = flag(None, str, "dataset folder(s), comma-separated in the order of --data", "data")
    labels: str = flag(None, str, "a label file in the one-line-per-item GT format (with --data labels)", "data")
    split: str = flag("train", str, "training split", "data")
    eval_split: str = flag("test", str, "held-out split for --eval-every ('none' to skip)", "data")
    max_pixels: int = flag(None, int, "pixel budget per picture (default: the processor's)", "data")
    model: str = flag("tiny", str, "preset (tiny, small), local checkpoint folder, or hub id", "model")
    device: str = flag(None, str, "cpu or cuda (default: cuda when available)", "model")
    dtype: str = flag(None, str, "weights and activations (default: bfloat16 on CUDA, float32 on the CPU)",
                      "model", choices=["float32", "bfloat16", "float16"])
    out: str = flag(None, str, "output folder (default: runs/<data>-<model>-<time>)", "run")
    epochs: float = flag(None, float, "passes over the training split (used when --steps is not given)", "run")
    eval_every: int = flag(None, int, "held-out evaluation every N steps", "run")
    eval_size: int = flag(None, int, "held-out items per evaluation (default: all)", "run")
    eval_samples: int = flag(None, int, "sampled answers averaged per held-out item (default: greedy)", "run")
    save_every: int = flag(None, int, "checkpoint every N steps", "run")
    keep_last: int = flag(None, int, "keep only the newest K checkpoints", "run")
    workers: int = flag(2, int, "threads that load the next step's pictures", "run")
    log_rollouts: int = flag(None, int, "keep every answer of every Nth step, with its scores, reward terms and "
                             "advantage, in rollouts.jsonl (0: never; default: the evaluation interval)", "run")
    gradient_checkpointing: bool = flag(None, bool, "trade compute for activation memory", "scale")
    fsdp: bool = flag(False, bool, "under torchrun: shard model, gradients and optimizer state (FSDP2)", "scale")
    reference_device: str = flag(None, str, "where the frozen reference model lives (e.g. cpu to save GPU "
                                 "memory; default: with the policy)", "scale")
    lora_rank: int = flag(None, int, "train adapters of rank R, not the weights; no reference copy (lora.py)", "LoRA")
    lora_alpha: float = flag(None, float, "adapter output scale alpha / R (default alpha: 2 x R)", "LoRA")
    lora_dropout: float = flag(0.0, float, "dropout on the adapters' input (0: log-probs of what was sampled)", "LoRA")
    lora_targets: str = flag("language", str, "where adapters go: language, vision, merger, comma-"
                             "separated", "LoRA")

    def resolve(self, preset: str | None = None):
        """Fill unset values from the preset's or the paper's defaults and check the combination. preset: the
        preset --model is, named or by its folder (presets.preset_name); default: --model's name."""
        video = all(name in VIDEO_SETS for name in self.data.split(","))
        tables = defaults_tables(type(self))
        defaults = tables.get(preset or self.model, tables["paper video" if video else "paper"])
        for key, value in defaults.items():
            if key not in ("steps", "epochs") and getattr(self, key) is None:
                setattr(self, key, value)
        if self.steps is None and self.epochs is None:  # presets count steps, the paper epochs
            self.steps, self.epochs = defaults.get("steps"), defaults.get("epochs")
        self.log_rollouts = (self.eval_every or 0) if self.log_rollouts is None else self.log_rollouts
        super().resolve(defaults)
        return self

    def set_length(self, num_images: int | None = None, world: int = 1) -> None:
        """Fix the run's length: --steps, or --epochs over num_images training images (B x N groups x
        world a step)."""
        self.set_steps(self.steps or math.ceil(self.epochs * num_images / self.images_per_optimizer_step(world)))

    def images_per_optimizer_step(self, world: int = 1) -> int:
        return self.images_per_step * self.groups_per_step * world

    def errors(self) -> list[str]:
        errors = super().errors()
        if self.fsdp and self.reference_device:
            errors.append("--fsdp shards the reference model with the policy; drop --reference-device")
        return errors


def run_config(settings: type) -> type:
    """grpo.py's whole configuration: a dataclass with the step's settings (grpo.Settings) and the run's."""
    return dataclass(type("RunConfig", (RunSettings, settings), {}))


def build_parser(settings: type) -> argparse.ArgumentParser:
    """grpo.py's flags: one per setting, the step's (grpo.Settings) and the run's, grouped, each default
    shown once."""
    p = argparse.ArgumentParser(prog="grpo.py", description="Train a Qwen2.5-VL quality judge with GRPO and the "
                                "PreResQ-R1 reward. With no flags: synthetic images and the `tiny` preset on the CPU "
                                "(a few minutes). Defaults in [brackets] depend on --model: a preset's, or the "
                                "paper's for a real one.")
    add_flags(p, run_config(settings), default_text(defaults_tables(settings)),
              extra={"data": f" (known: {', '.join(data.DATASETS)})"})
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
        changes["stage1_steps"] = None  # Settings.set_steps: half the new length
    return changes


def parse_args(settings: type, argv=None) -> tuple[RunSettings, bool, bool]:
    """Command line -> (config, resume, force): config holds grpo.Settings (`settings`) and the run's.
    With --resume, flags not given come from the checkpoint."""
    p = build_parser(settings)
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
        cfg = run_config(settings)(**args).resolve(presets.preset_name(args["model"]))  # models/tiny is tiny
    except ValueError as e:  # grpo.ConfigError: a combination that cannot train
        raise InputError(str(e)) from None
    errors = lora.config_errors(cfg)  # the --lora-* flags, and what LoRA does not combine with
    if errors:
        raise InputError("; ".join(errors))
    check_device(cfg.device)
    check_device(cfg.reference_device, "--reference-device")
    if cfg.dtype == "float16":
        raise InputError(FLOAT16_TRAINING)
    return cfg, resume, force
