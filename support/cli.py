"""The command-line conventions every PreResQ tool shares: flags declared once beside their config
field, help that shows each default once, everything checked before anything is made, and one
voice for errors and warnings.

    @dataclass
    class Config:                             # fields declared with grpo.flag
        lr: float = flag(None, float, "AdamW learning rate", "GRPO")

    add_flags(parser, Config, default_text)   # --lr, grouped, with its help and default
    p = parser("video.py", "...")             # plain argparse tools: each default shown once
    add_model_flags(p, "checkpoint folder or hub id")   # --model, --device, --dtype alike everywhere
    check_device(args.device); out = check_out(args.out)  # refused (exit 2) before any work
    sys.exit(entry("video.py", command))        # "<tool>: error: ..." and exit 2 / 1 / 130, no traceback

Exit status of every tool: 0 done; 1 the work failed part way, or some inputs were skipped where
the tool says so (the message says what is intact); 2 bad usage or input, nothing was created;
130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import math
import operator
import os
import sys
from dataclasses import fields
from pathlib import Path


def default_text(tables: dict[str, dict]):
    """name -> the help's text for a default that depends on other flags, from tables of defaults
    by case, e.g. {"tiny": {...}, "paper": {...}} -> " [tiny: 5e-4 | paper: 1e-6]"."""
    def text(name: str) -> str:
        shown = [f"{case}: {d[name]:g}" if isinstance(d[name], float) else f"{case}: {d[name]}"
                 for case, d in tables.items() if d.get(name) is not None]
        return f" [{' | '.join(shown)}]" if shown else ""
    return text


def add_flags(parser: argparse.ArgumentParser, config_class, default_text=lambda name: "",
              extra: dict[str, str] | None = None) -> None:
    """One flag per field of `config_class` (declared with `flag`), in argument groups.

    Booleans: a field defaulting to True gets --no-NAME (its help says what that flag does), one
    defaulting to False gets --NAME, one defaulting to None (decided later, e.g. by the model) gets
    both. default_text(name) describes a default that depends on other flags; otherwise a non-None
    default is shown as "(default: X)". extra: text to add to a flag's help, by field name.
    """
    groups = {}
    for f in fields(config_class):
        m = f.metadata
        group = groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        help_ = m["help"] + (extra or {}).get(f.name, "")
        name = "--" + f.name.replace("_", "-")
        if m["type"] is bool:
            if f.default is None:
                group.add_argument(name, action=argparse.BooleanOptionalAction, help=help_ + default_text(f.name))
            elif f.default:
                group.add_argument(f"--no-{name[2:]}", dest=f.name, action="store_false", help=help_)
            else:
                group.add_argument(name, action="store_true", help=help_)
            continue
        shown = default_text(f.name) or (f" (default: {f.default})" if f.default is not None else "")
        group.add_argument(name, type=m["type"], default=f.default, choices=m.get("choices"), help=help_ + shown)


# --------------------------------------------------------------------------- one voice

class InputError(Exception):
    """Bad usage or input (a flag, a file, a folder, a model): the message says what, where and the fix.
    The tool exits 2 and has created nothing."""


class Failure(RuntimeError):
    """The work itself failed part way (a full disk, a diverging run): the message says what is intact
    and how to continue. The tool exits 1."""


def say(line: str) -> None:
    """One line on stderr, written above any progress bar that is showing (tqdm.write), not inside it."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def bar(*args, show: bool = True, **kwargs):
    """A tqdm progress bar, hidden when show is False or TQDM_DISABLE is set (1, true, yes) in the
    environment (read here, when the bar is made: tqdm itself reads it once, and never when disable= is given)."""
    from tqdm import tqdm

    hidden = not show or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return tqdm(*args, disable=hidden, **kwargs)


class Warnings:
    """Warnings about skipped inputs through one counted, rate-limited path: a line each the first
    `limit` times, then only the count; `total` is kept for the summary and the logs."""

    def __init__(self, tool: str, limit: int = 5):
        self.tool, self.limit, self.total = tool, limit, 0

    def __call__(self, message: str) -> None:
        self.total += 1
        if self.total <= self.limit:
            say(f"{self.tool}: warning: {message}")
        if self.total == self.limit:
            say(f"{self.tool}: warning: further warnings of this run are counted, not shown")

    def summary(self, what: str = "inputs skipped") -> None:
        if self.total:
            print(f"{self.tool}: {self.total} {what} (see the warnings above)", file=sys.stderr)


def entry(tool: str, main, argv=None) -> int:
    """main(argv) in the voice every tool shares: errors print as "<tool>: error: ..." without a
    traceback and exit 2 for bad usage or input (InputError), 1 for a failure during the work
    (Failure), 130 on Ctrl-C. An error class of a paper file that must not import this module
    (preresq.ModelLoadError, grpo.ConfigError, frames.VideoError) says its status in `exit_status`.
    argparse's own usage errors already read "<tool>: error:" and exit 2."""
    try:
        return main(argv) or 0
    except (InputError, Failure) as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    except Exception as e:
        if getattr(e, "exit_status", None) is None:
            raise
        print(f"{tool}: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"\n{tool}: interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- plain argparse tools

DTYPES = ("float32", "bfloat16", "float16")  # --dtype's choices in every tool


class HelpFormatter(argparse.HelpFormatter):
    """--help with each flag's real default shown once, after its help: " (default: X)" is added
    unless the help already says its default, or there is none to show (None, a switch's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = (action.option_strings and default is not None and not isinstance(default, bool)
                 and default != argparse.SUPPRESS)
        return text + " (default: %(default)s)" if shown and "default" not in text else text


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors read "<prog>: error: ..." however the tool was started."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_model_flags(parser: argparse.ArgumentParser, model_help: str, model_default: str | None = None) -> None:
    """--model, --device and --dtype, spelled and explained alike in every tool that loads a model."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=model_default, required=model_default is None, help=model_help)
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    group.add_argument("--dtype", choices=DTYPES, help="weights and activations (default: bfloat16 on CUDA, "
                       "float32 on the CPU)")


def at_least(parser: argparse.ArgumentParser, args, **least) -> None:
    """A usage error (exit 2) for the first flag given below its least value: at_least(p, args, grid=1);
    then for the first other number flag that is not finite or outside its BOUNDS (number_errors)."""
    for name, low in least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    errors = number_errors({k: v for k, v in vars(args).items() if k not in least})
    if errors:
        parser.error(errors[0])


# The bounds of the number flags, by their name in any tool (the same name means the same thing in
# every tool). float("nan") and float("inf") parse as numbers, so every number must also be finite:
# a NaN passes every comparison unnoticed (nan <= 0 is False) and reaches the optimizer or the sampler.
BOUNDS = {
    "lr": ((">", 0),), "temperature": ((">", 0),), "epochs": ((">", 0),), "max_grad_norm": ((">", 0),),
    "lora_alpha": ((">", 0),), "seconds": ((">", 0),),
    "beta": ((">=", 0),), "reasoning_beta": ((">=", 0),), "epsilon": ((">=", 0),), "weight_decay": ((">=", 0),),
    "stage1_steps": ((">=", 0),), "eval_every": ((">=", 0),), "save_every": ((">=", 0),), "log_rollouts": ((">=", 0),),
    "keep_last": ((">=", 1),), "eval_size": ((">=", 1),), "eval_samples": ((">=", 1),), "workers": ((">=", 1),),
    "max_pixels": ((">=", 1),), "jobs": ((">=", 1),),
    # numpy's legacy seeding (np.random.seed) takes 0 to 2**32 - 1
    "seed": ((">=", 0), ("<=", 2**32 - 1)),
    "lora_dropout": ((">=", 0), ("<", 1)), "invalid": ((">=", 0), ("<=", 1)),
}
_COMPARE = {">": (operator.gt, "greater than"), ">=": (operator.ge, "at least"), "<": (operator.lt, "less than"),
            "<=": (operator.le, "at most")}


def number_errors(values: dict) -> list[str]:
    """One message per number in `values` (flag name -> value; None and non-numbers are passed over)
    that is not finite or is outside its BOUNDS: ["--lr must be greater than 0, got -0.001"]."""
    errors = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = f"--{name.replace('_', '-')}"
        if not math.isfinite(value):
            errors.append(f"{flag} must be a finite number, got {value}")
            continue
        errors += [f"{flag} must be {words} {bound}, got {value}" for op, bound in BOUNDS.get(name, ())
                   for compare, words in [_COMPARE[op]] if not compare(value, bound)][:1]
    return errors


def devices() -> dict[str, int]:
    """The devices torch can use on this machine: {"cpu": 1, "cuda": number of GPUs, ...}."""
    import torch  # only the tools that take --device pay for torch

    found = {"cpu": 1}
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found[kind] = backend.device_count() if hasattr(backend, "device_count") else 1
    return found


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device torch does not know (--device foo) or this machine lacks (cuda without a GPU,
    cuda:3 with two, mps off a Mac), before anything is built or loaded, naming the devices it has."""
    import torch

    if not device:
        return
    have = devices()
    names = ", ".join(kind if kind in ("cpu", "mps") else ", ".join(f"{kind}:{i}" for i in range(n))
                      for kind, n in have.items())
    try:
        kind, index = torch.device(device).type, torch.device(device).index or 0
    except (RuntimeError, ValueError):
        kind, index = None, 0
    if kind == "cpu" or index < have.get(kind, 0):
        return
    if kind is None:
        why = "not a device torch knows (cpu, cuda, cuda:N, mps)"
    elif kind == "cuda" and "cuda" not in have:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch sees no GPU"
    else:
        why = f"this machine has {have[kind]} {kind} device(s), numbered from 0" if kind in have else \
            f"torch has no {kind} device on this machine"
    raise InputError(f"{flag} {device}: {why}. This machine has: {names}; use one of those (e.g. {flag} cpu).")


def check_out(path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be made before any work: a file, a path below a file, or
    no write access where it would be created. Creates nothing; returns the path."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder; choose another {flag}.")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot create {flag} {path}: {existing} is a file, not a folder; choose another {flag}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {flag} {path} ({existing} is not writable); choose a writable folder.")
    return out


def check_apart(out, model_folder, flag: str = "--out") -> None:
    """Refuse an output folder that is the model's folder, lies inside it or holds it: the tool's files
    would be mixed with the model's (a run's config.json over the model's). model_folder: where
    --model's files are (presets.model_folder), None for a hub id."""
    if model_folder is None:
        return
    a, b = Path(out).expanduser().resolve(), Path(model_folder).expanduser().resolve()
    if a == b or b in a.parents or a in b.parents:
        where = "is" if a == b else "lies inside" if b in a.parents else "holds"
        raise InputError(f"{flag} {out} {where} the model's folder {model_folder}: its files would be mixed with "
                         f"the model's. Choose an {flag} outside it.")


def make_out(out: Path, flag: str = "--out") -> Path:
    """Create the folder check_out accepted, once the work is about to write into it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Failure(f"cannot create {flag} {out}: {e.strerror or e}") from None
    return out


def readable(paths: list[str], check, warn: Warnings) -> list[str]:
    """The paths that pass check(path) (raising InputError when not), each other one warned about;
    InputError when none passes, so a run of nothing but bad inputs stops before its model loads."""
    good = []
    for path in paths:
        try:
            check(path)
            good.append(path)
        except InputError as e:
            if len(paths) == 1:
                raise
            warn(f"skipped: {e}")
    if not good:
        raise InputError(f"none of the {len(paths)} files can be read (see the warnings above)")
    return good
