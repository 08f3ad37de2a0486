"""Speed measurements, one subcommand per thing measured.

    python bench.py rewards                     # every reward in rewards.REWARDS, B=32, G=12, A=5
    python bench.py rewards --device cuda       # the same on the GPU
    python bench.py rewards --B 8 --G 6 --A 2   # the authors' per-device video batch

Each subcommand prints one line per measurement: what, the shape, milliseconds per call
(median of --repeats timed calls after warm-up calls).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds, after two warm-up calls."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_rewards(args: argparse.Namespace) -> None:
    import rewards

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    B, G, A = args.B, args.G, args.A
    # Two-decimal ratings like a model writes them (ties included), ~10% unparsed answers.
    scores = (torch.rand(B, G, A, generator=gen) * 4 + 1).mul(100).round().div(100).to(device)
    mos = (torch.rand(B, generator=gen) * 4 + 1).to(device)
    valid = (torch.rand(B, G, generator=gen) > args.invalid).to(device)
    shape = f"B={B} G={G} A={A} on {device.type}"
    for name, fn in rewards.REWARDS.items():
        ms = _time_ms(lambda: fn(scores, mos, valid), args.repeats, device)
        print(f"reward {name:<10} {shape}: {ms:8.2f} ms/call")
    texts = ["<think>The picture is sharp.</think>\n<answer>"
             + "\n".join(f"{x:.2f}" for x in row) + "</answer>"
             for row in scores.reshape(B * G, A).tolist()]
    ms = _time_ms(lambda: rewards.parse_completions(texts, A, G, device=device), args.repeats, device)
    print(f"parse_completions  {shape}: {ms:8.2f} ms/call ({B * G} texts)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rewards", help="time every reward function on one step's batch")
    p.add_argument("--B", type=int, default=32, help="images per step")
    p.add_argument("--G", type=int, default=12, help="completions per image")
    p.add_argument("--A", type=int, default=5, help="aspects per answer (5 image, 2 video)")
    p.add_argument("--invalid", type=float, default=0.1, help="share of unparsed answers")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=bench_rewards)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
