"""The paper's reward ablation, in miniature: the same preset, budget and seeds under each reward.

    python ablation.py                        # every variant below, 3 seeds, the preset's default budget
    python ablation.py --steps 60 --seeds 0,1,2 --variants preresq,fidelity --out runs/ablation

Each run is an ordinary `grpo.py` run (synthetic data, preset `tiny` unless --model says otherwise)
whose only difference is the reward; the table reports held-out SRCC/PLCC after the last step as
mean ± std over the seeds, and the wall time. Paper: the dual reward, its two branches
(response / preference), VisualQuality-R1's Thurstone fidelity reward and Q-Insight's threshold
reward, and the Exploration-to-Stability schedule against a single stage (docs/method.md).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import cli
import grpo
import presets

# name -> grpo.py flags that define the variant
VARIANTS = {
    "preresq": [],
    "no-response-branch": ["--no-response-branch"],
    "no-preference-branch": ["--no-preference-branch"],
    "fidelity": ["--reward", "fidelity"],
    "threshold": ["--reward", "threshold"],
    "gaussian": ["--reward", "gaussian"],
    "explore-stable": ["--schedule", "explore-stable"],
}


def run_variant(name: str, seed: int, common: list[str], out: Path) -> dict:
    """One training run; returns its final held-out metrics and wall time."""
    folder = out / f"{name}-seed{seed}"
    if (folder / "final").exists():  # finished earlier: reuse it (delete the folder to redo)
        evals = [json.loads(l) for l in (folder / "eval.jsonl").read_text().splitlines()]
        return {**evals[-1], "seconds": json.loads((folder / "ablation.json").read_text())["seconds"]}
    start = time.time()
    cfg, _, _ = grpo.parse_args(common + VARIANTS[name] + ["--seed", str(seed), "--out", str(folder)])
    grpo.train(cfg)
    seconds = time.time() - start
    (folder / "ablation.json").write_text(json.dumps({"variant": name, "seed": seed, "seconds": seconds}))
    evals = [json.loads(l) for l in (folder / "eval.jsonl").read_text().splitlines()]
    return {**evals[-1], "seconds": seconds}


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "nan"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict[str, list[dict]]) -> str:
    rows = ["| reward | SRCC | PLCC | parse failures | runs | minutes per run |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        rows.append(f"| {name} | {mean_std([r['srcc'] for r in runs])} | {mean_std([r['plcc'] for r in runs])} | "
                    f"{sum(r['parse_failures'] for r in runs)} | {len(runs)} | "
                    f"{statistics.mean(r['seconds'] for r in runs) / 60:.1f} |")
    return "\n".join(rows)


def command(argv=None) -> int:
    p = cli.parser("ablation.py", "The reward ablation: one grpo.py run per variant and seed, then a table. "
                   "Flags not listed here (e.g. --images-per-step) go to every run.")
    p.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} (default: all of them)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each (3 or more for a std)")
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
    cli.at_least(p, args, steps=1)
    common = ["--model", args.model] + (["--steps", str(args.steps)] if args.steps else []) + extra
    # Every run's flags are checked before the first run starts, which may be hours before the last.
    configs = [grpo.parse_args(common + VARIANTS[name])[0] for name in names]
    cli.check_device(configs[0].device)
    print(presets.describe_model(args.model))
    out = cli.check_out(args.out)
    steps = configs[0].steps
    common += ["--eval-every", str(steps), "--save-every", str(steps)]
    cli.make_out(out)
    start = time.time()
    results = {name: [run_variant(name, seed, common, out) for seed in seeds] for name in names}
    text = table(results)
    print(f"\n{len(names)} variants x {len(seeds)} seeds, {steps} steps each, {(time.time() - start) / 60:.1f} min:\n")
    print(text)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps(results, indent=1))
    return 0


def main(argv=None) -> int:
    """`python ablation.py`: exit 0 with the table written, 2 for bad usage or input (no run is started),
    1 when a run fails part way (finished runs are kept and reused), 130 on Ctrl-C."""
    return cli.run("ablation.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
