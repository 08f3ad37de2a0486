"""The laptop presets: Qwen2.5-VL models small enough to train with GRPO on a CPU, built offline.

    python -m harness.presets tiny                       # build `tiny` once (minutes) and print its folder
    model, tok, ip = preresq.load_model(presets.model_path("tiny"), "cpu")

`tiny` is the laptop demo's model; `small` is a bigger stand-in for measuring speed. How a preset
is built (its settings, tokenizer, vision pretraining and format warm-up) is in preset_recipe.py;
this module names the presets, finds their folders, ships and verifies them.

A preset is saved as an ordinary Hugging Face folder in the cache (files.cache_dir) and loaded with
`from_pretrained`, the same path a real checkpoint takes. The folder's name hashes the recipe
(settings, prompts, the source of the recipe's functions: recipe_digest), so a changed recipe is
built anew.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from support import cli
from support import files
import preresq
from harness.preset_recipe import PRESETS, build_preset, recipe_digest


# --------------------------------------------------------------------------- where presets live

# Presets shipped with the repository (models/<name>/, an ordinary Hugging Face folder) and the
# digest of the recipe that built them: a fresh clone trains at once instead of building for minutes.
SHIPPED = Path(__file__).resolve().parent.parent / "models"
RECIPE_FILE = "recipe-digest.txt"


def preset_path(name: str) -> Path:
    """Cache folder of a preset built here; its name changes whenever the recipe does."""
    return files.cache_dir(f"preset-{name}-{recipe_digest(name)}")


def shipped_path(name: str) -> Path | None:
    """models/<name> when the repository ships it built by the current recipe, else None."""
    folder = SHIPPED / name
    stamp = folder / RECIPE_FILE
    return folder if stamp.exists() and stamp.read_text().strip() == recipe_digest(name) else None


def model_path(name_or_path: str) -> str:
    """What preresq.load_model takes: a preset name -> its folder: the shipped one, as shipped (a prompt
    or recipe edited since only earns a note: `--verify` tells whether it still matches), else built
    once into the cache (minutes); anything else (a checkpoint folder, a hub id) is returned as it is."""
    if name_or_path not in PRESETS:
        return str(name_or_path)
    folder = SHIPPED / name_or_path
    if (folder / "config.json").exists():
        if not shipped_path(name_or_path) and name_or_path not in _NOTED:
            _NOTED.add(name_or_path)
            print(f"note: models/{name_or_path} was built by an earlier recipe (the presets' settings, prompts or "
                  f"code changed since); it is used as shipped. `python -m harness.presets {name_or_path} --verify` "
                  "tells whether a build would still match, `--ship` rebuilds it (minutes).", file=sys.stderr)
        return str(folder)
    path = preset_path(name_or_path)
    if not (path / "config.json").exists():
        build_preset(name_or_path, path)
    return str(path)


_NOTED: set[str] = set()  # presets whose changed recipe was noted once in this process


def preset_name(name_or_path: str) -> str | None:
    """The preset that --model names: its name, or the folder model_path gives it (models/<name>, or
    its build in the cache; resolved paths compared); None for any other model. Builds nothing."""
    if name_or_path in PRESETS:
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return None
    for name in PRESETS:
        try:
            folders = [SHIPPED / name, preset_path(name)]
        except cli.InputError:  # a cache that cannot be written holds no preset
            folders = [SHIPPED / name]
        if any(path.resolve() == folder.resolve() for folder in folders):
            return name
    return None


def ship(name: str) -> Path:
    """Copy the preset built by the current recipe (built now if needed) to models/<name>, stamped
    with the recipe's digest. `python -m harness.presets tiny --ship` after a change to the recipe."""
    source = preset_path(name)
    if not (source / "config.json").exists():
        build_preset(name, source)
    with files.atomic_folder(SHIPPED / name, replace=True) as tmp:
        for f in source.iterdir():
            shutil.copy2(f, tmp / f.name)
        (tmp / RECIPE_FILE).write_text(recipe_digest(name) + "\n")
    return SHIPPED / name


def verify(name: str) -> list[str]:
    """Build the preset from its recipe into a temporary folder and compare it with the shipped one:
    every tensor bit for bit, and every other file. Returns the differences (none: it matches)."""
    from safetensors.torch import load_file

    shipped = SHIPPED / name
    if not (shipped / "config.json").exists():
        return [f"models/{name} is missing (python -m harness.presets {name} --ship builds and ships it)"]
    stamp = (shipped / RECIPE_FILE).read_text().strip() if (shipped / RECIPE_FILE).exists() else "none"
    if stamp != recipe_digest(name):
        return [f"the recipe changed since models/{name} was shipped (digest {stamp}, now {recipe_digest(name)}); "
                f"python -m harness.presets {name} --ship rebuilds it"]
    with tempfile.TemporaryDirectory() as tmp:
        build_preset(name, Path(tmp) / name)
        built = Path(tmp) / name
        a, b = load_file(built / "model.safetensors"), load_file(shipped / "model.safetensors")
        diffs = [f"tensor {k}" for k in sorted(set(a) | set(b)) if k not in a or k not in b or not torch.equal(a[k], b[k])]
        diffs += [f"file {f.name}" for f in built.iterdir()
                  if f.suffix != ".safetensors" and f.read_bytes() != (shipped / f.name).read_bytes()]
    return diffs


def model_folder(name: str) -> Path | None:
    """Where --model's files are on this disk, without building anything: a folder, a preset's
    (shipped, or its cache entry), or None for a hub id."""
    if name in PRESETS:
        return SHIPPED / name if (SHIPPED / name / "config.json").exists() else preset_path(name)
    folder = Path(name).expanduser()
    return folder if folder.exists() else None


def describe_model(name: str) -> str:
    """The line a tool prints before it loads its model: which model and why. A preset is described
    without being built; anything else must be there (preresq.locate_model, else ModelLoadError)."""
    if name in PRESETS:
        return (f"model: the {name} preset, a laptop stand-in (harness/presets.py); for the paper's model pass "
                "--model Qwen/Qwen2.5-VL-7B-Instruct")
    if "/" not in name and not Path(name).expanduser().exists():
        raise preresq.ModelLoadError(f"{name!r} is neither a preset ({', '.join(PRESETS)}), a folder nor a hub id "
                                     "(owner/name).")
    folder = preresq.locate_model(name)
    if preset_name(name):
        return f"model: {name} (the {preset_name(name)} preset's folder)"
    return f"model: {name} " + ("(a local checkpoint folder)" if Path(name).expanduser().exists()
                                else f"(from the hub cache: {folder})")


def command(argv=None) -> int:
    p = cli.parser("presets.py", "Build the named laptop presets if needed (once, minutes each) and print their "
                   "folders; grpo.py, evaluate.py, preresq.py and ablation.py take the name itself.")
    p.add_argument("names", nargs="+", choices=list(PRESETS), metavar="NAME", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--ship", action="store_true", help="copy the preset built by the current recipe to models/NAME")
    p.add_argument("--verify", action="store_true", help="rebuild from the recipe (minutes) and compare with "
                   "models/NAME; exit 1 on any difference")
    args = p.parse_args(argv)
    for name in args.names:
        if args.verify:
            diffs = verify(name)
            if diffs:
                raise cli.Failure(f"models/{name} differs from a build of its recipe: {', '.join(diffs[:5])}")
            print(f"models/{name} matches a build of its recipe ({recipe_digest(name)})")
            continue
        if not (SHIPPED / name / "config.json").exists() and not (preset_path(name) / "config.json").exists():
            print(f"presets.py: building the {name} preset once into {preset_path(name)} (minutes)", file=sys.stderr)
        print(ship(name) if args.ship else model_path(name))
    return 0


def main(argv=None) -> int:
    """`python -m harness.presets tiny [small]`: exit 0 with the folders printed, 2 for an unknown name, 130 on Ctrl-C."""
    return cli.entry("presets.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
