"""The paper's reward ablation, in miniature: the same preset, budget and seeds under each reward.

    python tools/ablation.py                        # every variant below, 5 seeds, the preset's default budget
    python tools/ablation.py --jobs 2 --seeds 0,1,2 --variants preresq,fidelity --out runs/ablation

Each run is an ordinary `grpo.py` run (synthetic data, preset `tiny` unless --model says otherwise)
whose only difference is the reward or the schedule; the table reports held-out SRCC/PLCC after the
last step as mean ± std over the seeds, each seed's SRCC, and the wall time. --jobs N runs N at a
time, each in its own process with its share of the CPU threads. Paper: the dual reward, its two branches
(response / preference), VisualQuality-R1's Thurstone fidelity reward and Q-Insight's threshold
reward, and a single stage against the Exploration-to-Stability schedule (docs/method.md).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's modules, from wherever the tool is run

from dataclasses import asdict, fields

from support import cli
from support import files
import grpo
from harness import presets
import harness.checkpoints
import harness.config

# name -> grpo.py flags that define the variant
VARIANTS = {
    "preresq": [],  # the paper's method: the dual reward with Exploration-to-Stability
    "no-response-branch": ["--no-response-branch"],
    "no-preference-branch": ["--no-preference-branch"],
    "fidelity": ["--reward", "fidelity"],
    "threshold": ["--reward", "threshold"],
    "gaussian": ["--reward", "gaussian"],
    "single-stage": ["--schedule", "single"],
}


# Flags that say how a run is carried out, not what it trains: a finished run is reused whatever they were.
HOW = harness.checkpoints.RESUMABLE_CHANGES - {"steps", "epochs", "eval_every", "eval_size", "stage1_steps"}


def run_flags(name: str, seed: int, common: list[str], out: Path) -> list[str]:
    return common + VARIANTS[name] + ["--seed", str(seed), "--out", str(out / f"{name}-seed{seed}")]


def recipe_differences(saved: dict, wanted: dict) -> list[str]:
    """The flags in which a run's saved config.json differs from the one wanted (outside HOW; the
    length in steps only where the wanted one is known before the data are: --steps, not --epochs).
    A flag newer than the run counts as its default there."""
    saved = {**{f.name: f.default for f in fields(harness.config.run_config(grpo.Settings))}, **saved}
    return [f"--{k.replace('_', '-')}: {saved.get(k)!r} there, {v!r} now" for k, v in wanted.items()
            if k not in HOW and saved.get(k) != v and not (k in ("steps", "stage1_steps") and v is None)]


def plan(name: str, seed: int, common: list[str], out: Path) -> str:
    """What to do with OUT/<variant>-seed<S>, decided before any run starts: "run" (no such run yet),
    "reuse" (finished with the same recipe), "resume" (stopped at a checkpoint, same recipe);
    InputError for a run of another recipe, naming the flags, or one that cannot be continued."""
    folder = out / f"{name}-seed{seed}"
    if not folder.is_dir() or not any(folder.iterdir()):
        return "run"
    wanted = asdict(harness.config.parse_args(grpo.Settings, run_flags(name, seed, common, out))[0])
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise cli.InputError(f"{folder} holds files but no readable config.json of a run; move it away (or "
                             f"choose another --out) to run the {name} variant with seed {seed} there.") from None
    diffs = recipe_differences(saved, wanted)
    if diffs:
        raise cli.InputError(f"{folder} holds a run of another recipe, whose results would not be this "
                             "ablation's:\n  " + "\n  ".join(diffs) + f"\nChoose another --out, or delete {folder} "
                             "to run it again with these flags.")
    if (folder / "final").exists() and (folder / "eval.jsonl").exists():
        return "reuse"
    if harness.checkpoints.checkpoints(folder):
        return "resume"
    raise cli.InputError(f"{folder} holds a run of this recipe that stopped before its first checkpoint; delete "
                         "it to run it again, or choose another --out.")


def run_variant(name: str, seed: int, common: list[str], out: Path, threads: int | None = None,
                how: str = "run") -> dict:
    """One training run (how: "run", "resume" or "reuse", from `plan`); returns its final held-out
    metrics and wall time. threads=None: in this process; a number: in a child `python grpo.py`
    with that many CPU threads, its output in OUT/<variant>-seed<S>.log."""
    folder = out / f"{name}-seed{seed}"
    print(f"{folder}: " + {"run": "a new run", "resume": "resuming it from its newest checkpoint",
                           "reuse": "finished with the same recipe: reused"}[how], flush=True)
    if how != "reuse":
        start = time.time()
        flags = run_flags(name, seed, common, out) + ["--resume"] * (how == "resume")
        if threads is None:
            grpo.train(*harness.config.parse_args(grpo.Settings, flags))
        else:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            log_path = out / f"{name}-seed{seed}.log"
            with open(log_path, "a") as log:
                done = subprocess.run([sys.executable, str(ROOT / "grpo.py"), *flags],
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise cli.Failure(f"the {name} run with seed {seed} failed (exit {done.returncode}); its output is "
                                  f"in {log_path}. Finished runs are kept and reused by the next call, a run "
                                  "stopped at a checkpoint is resumed.")
        files.write_file(folder / "ablation.json", json.dumps({"variant": name, "seed": seed,
                                                               "seconds": time.time() - start}))
    evals = [json.loads(l) for l in (folder / "eval.jsonl").read_text().splitlines()]
    timing = folder / "ablation.json"
    seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else math.nan
    return {**evals[-1], "seed": seed, "seconds": seconds}


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "nan"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired_difference(runs: list[dict], baseline: list[dict]) -> tuple[float, float] | None:
    """Mean and standard error of SRCC(run) - SRCC(baseline) over the seeds both have. Pairing by
    seed removes what a seed decides for every variant alike (its synthetic set, its data order);
    None with fewer than two pairs."""
    base = {r["seed"]: r["srcc"] for r in baseline if r["srcc"] is not None}
    d = [r["srcc"] - base[r["seed"]] for r in runs if r["srcc"] is not None and r["seed"] in base]
    if len(d) < 2:
        return None
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))


def table(results: dict[str, list[dict]]) -> str:
    """The markdown table: mean ± std, each seed's SRCC, and the paired difference from the first
    variant with 2 standard errors (a difference inside them is not resolved by these seeds)."""
    names = list(results)
    seeds = " / ".join(str(r.get("seed", "?")) for r in results[names[0]])
    rows = [f"| variant | SRCC | PLCC | SRCC by seed ({seeds}) | SRCC − {names[0]} (± 2 SE) | parse failures | "
            f"minutes per run |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        per_seed = " / ".join("nan" if r["srcc"] is None else f"{r['srcc']:.3f}" for r in runs)
        diff = paired_difference(runs, results[names[0]]) if name != names[0] else None
        if diff is not None:
            diff = f"{diff[0]:+.3f} ± {2 * diff[1]:.3f}" + (" *" if abs(diff[0]) > 2 * diff[1] else "")
        rows.append(f"| {name} | {mean_std([r['srcc'] for r in runs])} | {mean_std([r['plcc'] for r in runs])} | "
                    f"{per_seed} | {diff or '—'} | {sum(r['parse_failures'] for r in runs)} | "
                    f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f} |")
    return "\n".join(rows) + "\n\n* the difference is more than 2 standard errors of the paired differences"


def command(argv=None) -> int:
    p = cli.parser("ablation.py", "The reward ablation: one grpo.py run per variant and seed, then a table. "
                   "Flags not listed here (e.g. --images-per-step) go to every run.")
    p.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} (default: all of them)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds, one run each (3 or more for a std)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process with an equal "
                   "share of the CPU threads (e.g. 2 on a 2-core laptop)")
    p.add_argument("--steps", type=int, help="steps per run (default: the preset's)")
    p.add_argument("--model", default="tiny", help="preset (tiny, small), checkpoint folder or hub id")
    p.add_argument("--out", default="runs/ablation", help="folder of the runs, ablation.md and ablation.json")
    args, extra = p.parse_known_args(argv)
    names = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds takes comma-separated whole numbers, e.g. 0,1,2; got {args.seeds!r}")
    if any(cli.number_errors({"seed": s}) for s in seeds):  # the bounds of grpo.py's --seed
        p.error(f"--seeds must be 0 or more and at most {2**32 - 1} (numpy's seeds); got {args.seeds!r}")
    cli.at_least(p, args, steps=1, jobs=1)
    common = ["--model", args.model] + (["--steps", str(args.steps)] if args.steps else []) + extra
    # Every run's flags are checked before the first run starts, which may be hours before the last.
    configs = [harness.config.parse_args(grpo.Settings, common + VARIANTS[name])[0] for name in names]
    if configs[0].eval_split == "none":
        p.error("--eval-split none leaves nothing to compare: an ablation reports each run's held-out SRCC; "
                "give a held-out split (default: test)")
    cli.check_device(configs[0].device)
    print(presets.describe_model(args.model))
    out = cli.check_out(args.out)
    steps = configs[0].steps
    common += ["--eval-every", str(steps), "--save-every", str(steps)]
    plans = {(name, seed): plan(name, seed, common, out) for name in names for seed in seeds}
    cli.make_out(out)
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:  # each thread waits on one child process
        futures = {name: [pool.submit(run_variant, name, seed, common, out, threads, plans[name, seed])
                          for seed in seeds] for name in names}
        results = {name: [f.result() for f in fs] for name, fs in futures.items()}
    text = table(results)
    print(f"\n{len(names)} variants x {len(seeds)} seeds, {steps} steps each, {(time.time() - start) / 60:.1f} min:\n")
    print(text)
    files.write_file(out / "ablation.md", text + "\n")
    files.write_file(out / "ablation.json", json.dumps(results, indent=1))
    return 0


def main(argv=None) -> int:
    """`python tools/ablation.py`: exit 0 with the table written, 2 for bad usage or input (no run is started),
    1 when a run fails part way (finished runs are kept and reused), 130 on Ctrl-C."""
    return cli.entry("ablation.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
