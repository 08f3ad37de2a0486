"""Speed and memory measurements, one subcommand per thing measured.

    python tools/bench.py step                                  # GRPO steps of the tiny preset on the CPU
    python tools/bench.py step --model small --image-size 224x224 --images-per-step 4 --threads 1
    python tools/bench.py step --model small --images-per-step 2 --num-generations 8 --visual-tokens 529 --threads 1
    python tools/bench.py step --labels my_gt.txt --data-root ~/pictures --image-size 224x224   # pictures of a label file
    python tools/bench.py step --model qwen2.5-vl-3b --device cuda --micro-batch-size 8   # the real 3B shapes
    python tools/bench.py step --model qwen2.5-vl-7b --device cuda --gradient-checkpointing --micro-batch-size 8
    python tools/bench.py step --model small --lora-rank 8      # LoRA, then full fine-tuning on the same shapes
    python tools/bench.py video                                 # decode a 10 s 1080p clip into its views
    python tools/bench.py rewards                               # every reward in rewards.REWARDS, B=32, G=12, A=5

`step` times the training step itself, grpo.grpo_step, phase by phase (step_bench.py says how each
phase is delimited, and what the bench does differently from a training run); model_shapes.py holds
the real Qwen2.5-VL-3B/7B shapes. It prints a line per step, then a table of each phase's median
seconds, the step's (wall time; the "untimed rest" is what the phases leave of it), completion
tokens per second and the peak memory (resident set size on the CPU, torch.cuda.max_memory_allocated
on CUDA).

On a CPU that other jobs share, pass --threads 1: with torch's default of one thread per core,
threads that wait for each other under load made steps up to 100x slower on a 2-core machine.

What grpo.py refuses (e.g. --num-generations 1, which leaves no advantage) is refused here too.
The old flag spellings --B, --G and --completion-tokens still work (hidden aliases). Exit status:
0 measured, 2 bad usage or input (nothing built), 1 out of memory part way, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's modules, from wherever the tool is run

import grpo  # noqa: E402
import preresq  # noqa: E402
from support import cli  # noqa: E402
from support.frames import check_video  # noqa: E402

import step_bench  # noqa: E402
from step_bench import size_for_visual_tokens  # noqa: E402
from model_shapes import QWEN_MAX_PIXELS, check_model_device  # noqa: E402
from phase_clock import sync  # noqa: E402


# --------------------------------------------------------------------------- rewards

def _time_ms(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_rewards(args: argparse.Namespace) -> None:
    import rewards

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    B, G, A = args.images_per_step, args.num_generations, args.A
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


# --------------------------------------------------------------------------- video decoding

def synthetic_clip(path: str, seconds: float = 10.0, width: int = 1920, height: int = 1080, fps: int = 25) -> None:
    """A clip of moving coloured gradients with mild noise, written with synthetic.write_clip (libx264)."""
    from support import synthetic

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)

    def frames():
        for t in range(round(seconds * fps)):
            shift = 8.0 * t
            rgb = np.stack([(x + shift) % 256, (y + shift / 2) % 256, (x + y - shift) % 256], -1) + noise
            yield np.clip(rgb, 0, 255).astype(np.uint8)

    synthetic.write_clip(path, frames(), fps=fps)


def decode_benchmark(path: str, *, repeats: int = 3, **view_options) -> dict[str, object]:
    """Time video.sample_views(path, **view_options): the decoding cost of one training clip.

    Returns {"seconds_per_clip": median over `repeats`, "min_seconds", "num_frames", "mode"}.
    """
    import video

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        views = video.sample_views(path, **view_options)
        seconds.append(time.perf_counter() - start)
    return {"seconds_per_clip": statistics.median(seconds), "min_seconds": min(seconds),
            "num_frames": views.num_frames, "mode": views.mode}


def bench_video(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        clip = args.clip
        if clip is None:
            width, height = args.size
            clip = os.path.join(tmp, f"synthetic-{width}x{height}-{args.seconds:g}s.mp4")
            start = time.perf_counter()
            synthetic_clip(clip, args.seconds, width, height)
            print(f"wrote {args.seconds:g} s {width}x{height} H.264 clip in {time.perf_counter() - start:.1f} s")
        result = decode_benchmark(clip, repeats=args.repeats)  # VideoError (an InputError): exit 2
    print(f"{Path(clip).name}: views (1 global 4x4 mosaic + 3 local frames) in {result['seconds_per_clip']:.3f} s "
          f"per clip (median of {args.repeats}, best {result['min_seconds']:.3f} s); {result['num_frames']} frames, "
          f"{result['mode']} decoding")
    return result


# --------------------------------------------------------------------------- command line

def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 28 or int(m.group(2)) < 28:
        raise argparse.ArgumentTypeError(f"{text!r} is not a picture size: write WIDTHxHEIGHT, each at least 28 "
                                         f"(e.g. 448x448)")
    return int(m.group(1)), int(m.group(2))


def dtype_name(text: str) -> str:
    """--dtype's value; the short spellings fp32, bf16 and fp16 still work."""
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(text, text)


def add_batch_flags(p: argparse.ArgumentParser, images: int, generations: int) -> None:
    """--images-per-step and --num-generations (as in grpo.py), with the old --B and --G as hidden aliases."""
    p.add_argument("--images-per-step", type=int, default=images, help="pictures per step (B)")
    p.add_argument("--num-generations", type=int, default=generations, help="completions per picture (G)")
    p.add_argument("--B", dest="images_per_step", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--G", dest="num_generations", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_step_flags(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--model", default="tiny",
                       help="tiny, small, qwen2.5-vl-3b, qwen2.5-vl-7b (CUDA only), or a checkpoint folder")
    model.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    model.add_argument("--dtype", type=dtype_name, choices=cli.DTYPES,
                       help="weights and activations (default: bfloat16 on CUDA, float32 on the CPU)")
    add_batch_flags(p, images=8, generations=8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length in tokens")
    p.add_argument("--completion-tokens", dest="max_new_tokens", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    pictures = p.add_mutually_exclusive_group()
    pictures.add_argument("--image-size", type=parse_size, default="448x448", metavar="WxH",
                          help="WIDTHxHEIGHT of each picture")
    pictures.add_argument("--visual-tokens", type=int, help="instead of --image-size: a picture size giving at "
                          "least N visual tokens")
    p.add_argument("--labels", metavar="FILE", help="take the pictures from this label file (GT format or "
                   "jsonl, as grpo.py --data labels reads it), resized to the picture size (default: random "
                   "pictures)")
    p.add_argument("--data-root", metavar="DIR", help="the folder --labels' paths are relative to (default: the "
                   "label file's folder)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    p.add_argument("--micro-batch-size", type=int, help="completions per forward/backward (default: all at once)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more time")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient; 0 skips the reference pass")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--lora-rank", type=int,
                   help="measure LoRA adapters of this rank (language model), then full fine-tuning, and compare")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's); 1 on a machine other jobs load")
    p.set_defaults(run=step_bench.bench_step)


def make_parser() -> argparse.ArgumentParser:
    """bench.py's parser: the subcommands step, video and rewards, each default shown once in --help."""
    parser = cli.parser("bench.py", __doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def subcommand(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=cli.HelpFormatter)

    add_step_flags(subcommand("step", "time GRPO steps (grpo.grpo_step) phase by phase"))

    p = subcommand("video", "time decoding one clip into its training views")
    p.add_argument("--clip", help="a video file (default: write a synthetic clip)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the synthetic clip")
    p.add_argument("--size", type=parse_size, default="1920x1080", metavar="WxH",
                   help="WIDTHxHEIGHT of the synthetic clip")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes; the median is reported")
    p.set_defaults(run=bench_video)

    p = subcommand("rewards", "time every reward function on one step's batch")
    add_batch_flags(p, images=32, generations=12)
    p.add_argument("--A", type=int, default=5, help="aspects per answer (5 image, 2 video)")
    p.add_argument("--invalid", type=float, default=0.1, help="share of unparsed answers, 0 to 1")
    p.add_argument("--repeats", type=int, default=20, help="timed calls; the median is reported")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(run=bench_rewards)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked arguments: every bad number, device or clip is refused here (a usage error or
    cli.InputError), before any model, preset or clip is made. args.run(args) runs the subcommand."""
    parser = make_parser()
    args = parser.parse_args(argv)
    step = args.command == "step"  # a step needs two answers to compare and room for one (grpo.Config.check)
    least = dict(images_per_step=1, num_generations=2 if step else 1, max_new_tokens=8, steps=1, warmup_steps=0,
                 visual_tokens=1, micro_batch_size=1, lora_rank=1, threads=1, repeats=1, A=1)
    cli.at_least(parser, args, **{name: low for name, low in least.items() if hasattr(args, name)})
    if args.command == "video" and args.seconds <= 0:
        parser.error(f"--seconds must be above 0, got {args.seconds:g}")
    if args.command == "video" and args.clip is None and (args.size[0] % 2 or args.size[1] % 2):
        parser.error(f"--size {args.size[0]}x{args.size[1]}: the H.264 encoder takes even sides only")
    if step:  # what the image processor and vision encoder take (smart_resize; Qwen2.5-VL's max_pixels)
        width, height = size_for_visual_tokens(args.visual_tokens) if args.visual_tokens else args.image_size
        if max(width, height) > 200 * min(width, height) or width * height > QWEN_MAX_PIXELS:
            parser.error(f"{'--visual-tokens' if args.visual_tokens else '--image-size'} gives {width}x{height} "
                         f"pictures; the vision encoder takes at most {QWEN_MAX_PIXELS} pixels "
                         f"({QWEN_MAX_PIXELS // 784} visual tokens) with sides at most 200 times apart")
    if args.command == "rewards" and not 0 <= args.invalid <= 1:
        parser.error(f"--invalid is a share, from 0 to 1, got {args.invalid:g}")
    if args.command in ("step", "rewards"):
        cli.check_device(args.device)
    if args.command == "step" and args.data_root is not None and args.labels is None:
        parser.error("--data-root is read with --labels only")
    if args.command == "step" and not args.lr > 0:
        parser.error(f"--lr must be above 0, got {args.lr:g}")
    if args.command == "step":
        try:  # what grpo.py refuses (e.g. G = 1: no advantage), refused here in its words
            step_bench.StepBench.from_args(args, args.lora_rank).config()
        except grpo.ConfigError as e:
            parser.error(str(e))
        check_model_device(args.model, args.device or preresq.default_device())
    if args.command == "video" and args.clip is not None:
        check_video(args.clip)
    return args


def command(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run(args)


def main(argv: list[str] | None = None) -> int:
    """`python tools/bench.py step|video|rewards`: exit 0 when measured, 2 for bad usage or input (nothing is
    built), 1 when the work fails part way (out of memory), 130 on Ctrl-C."""
    return cli.entry("bench.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
