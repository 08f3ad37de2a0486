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

`step` times the training step itself (bench_grpo_step): each measured step is one call of
grpo.grpo_step, the function grpo.py's loop calls, on a grpo.Config made of the flags, with
torch.optim.AdamW; its phases are timed by hooks around the functions it calls (PhaseClock):
picture loading (a label file's pictures with --labels, else random ones, and
preresq.encode_prompts), generation (grpo.sample_rollout's sampling), reward
(grpo.score_rollout), reference pass (grpo.reference_logprobs), policy forward and backward
(grpo.policy_update, split at its torch.autograd.backward calls), optimizer (grpo.optimizer_step:
gradient clip, non-finite checks, AdamW at the step's learning rate), and logging (the step's
runkeeping.step_metrics line appended to a metrics.jsonl with runkeeping.log_json). It prints a
table of each phase's median seconds, the step's (wall time; the "untimed rest" is what the phases
leave of it), completion tokens per second and the peak memory (resident set size on the CPU,
torch.cuda.max_memory_allocated on CUDA).

What the step bench does differently from a training run, and why:
- One stage (--schedule single: one prompt, G answers per picture), the learning rate decaying
  from --lr over the bench's warm-up and timed steps, as in a run of that length.
- Presets (tiny, small) are built without their format warm-up: speed depends on the shapes, not
  on the weights, and an untrained model answers to full length. Its answers all score alike,
  so the advantages are 0 (the table says so): the same work, with (near) zero gradients.
- The pictures (random, or --labels' resized) are of --image-size; the image processor's
  max_pixels is raised, for the bench only, when that size is above it, so the visual-token count
  is the one asked for. WordTokenizer (below) cannot decode, so with it the reward scores
  unparsed answers (as an untrained model's are anyway).
- qwen2.5-vl-3b / qwen2.5-vl-7b are the published Qwen2.5-VL-3B/7B-Instruct architectures with
  random weights (no download). Their tokenizer is not available offline, so WordTokenizer stands
  in: Qwen's real special-token ids, one id per pre-tokenizer piece (about one BPE token per English
  word), so prompts have realistic lengths and exactly one placeholder per visual token.
- --lora-rank R measures LoRA first (lora.add_adapters; the reference pass is the policy with
  its adapters off), then full fine-tuning on a fresh copy of the same model and shapes, and
  prints the ratios. LoRA goes first because on the CPU the peak is the process's resident set,
  which memory freed by an earlier, larger run would inflate.

On a CPU that other jobs share, pass --threads 1: with torch's default of one thread per core,
threads that wait for each other under load made steps up to 100x slower on a 2-core machine.

What grpo.py refuses (e.g. --num-generations 1, which leaves no advantage) is refused here too.
The old flag spellings --B, --G and --completion-tokens still work (hidden aliases). Exit status:
0 measured, 2 bad usage or input (nothing built), 1 out of memory part way, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's modules, from wherever the tool is run

from support import cli
from support.frames import check_video


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


# --------------------------------------------------------------------------- the real model shapes

# Qwen2.5-VL-3B/7B-Instruct as published (config.json of each checkpoint). Note the 7B's
# vocabulary: 152064 rows (151936 for the 3B); both tokenizers use the same 151665 ids.
QWEN_SHAPES = {
    "qwen2.5-vl-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                    "<|video_pad|>": 151656}
# Qwen2.5-VL's preprocessor_config.json bounds.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056


def qwen_config(name: str):
    """The Qwen2_5_VLConfig of a published size (`qwen2.5-vl-3b` or `qwen2.5-vl-7b`)."""
    from transformers import Qwen2_5_VLConfig

    text = QWEN_SHAPES[name]
    ids = QWEN_SPECIAL_IDS
    return Qwen2_5_VLConfig(
        text_config=dict(**text, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(**QWEN_VISION, out_hidden_size=text["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text["tie_word_embeddings"])


def qwen_model(name: str, device: str | torch.device, dtype: torch.dtype | None = None):
    """A Qwen2.5-VL of a published size with random weights, built directly on `device`.

    device="meta" allocates nothing (for counting parameters); on CUDA the weights are
    initialised on the GPU, which takes seconds even for the 7B.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(name), dtype=dtype)
    return model.eval()


class WordTokenizer:
    """The part of Qwen's tokenizer that encode_prompts and sample_completions use, without its files.

    Special tokens get the given ids; every other piece of text, split like Qwen's pre-tokenizer
    (a word with its leading space, one digit, a run of punctuation), gets one id below
    `text_vocab`. BPE never merges across these pieces, so this is a lower bound on the real
    token count, and close to it for English, whose common words Qwen's vocabulary holds whole.
    """

    PIECES = re.compile(r"'(?:s|t|re|ve|m|ll|d)|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

    def __init__(self, special_ids: dict[str, int], text_vocab: int, pad_token: str = "<|endoftext|>"):
        self.special_ids = dict(special_ids)
        self.text_vocab = text_vocab
        self.pad_token_id = special_ids[pad_token]
        self._split = re.compile("(" + "|".join(map(re.escape, special_ids)) + ")")

    def get_vocab(self) -> dict[str, int]:
        return dict(self.special_ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.special_ids[token]

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self._split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            else:
                ids += [zlib.crc32(p.encode()) % self.text_vocab for p in self.PIECES.findall(part)]
        return ids

    def __call__(self, texts: list[str], return_tensors: str = "pt", padding: bool = True,
                 padding_side: str = "left", add_special_tokens: bool = False) -> dict[str, torch.Tensor]:
        rows = [self.encode(t) for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        """Ids cannot be turned back into their words (they are hashes): each row becomes its ids as
        words ("w123 w45 ..."), special tokens dropped, which the reward reads as an unparsed answer."""
        special = set(self.special_ids.values())
        return [" ".join(f"w{int(i)}" for i in row if not (skip_special_tokens and int(i) in special))
                for row in rows]


def load_bench_model(name: str, device: str, dtype: torch.dtype, folder: str | None = None):
    """--model -> (model, tokenizer, image_processor, description) for the step bench.

    tiny / small: the preset architecture without its warm-up, saved and loaded with
    from_pretrained (built in `folder` when given, and loaded from there on the next call; else in
    a temporary folder). qwen2.5-vl-3b / -7b: the published shapes, CUDA only. Anything else:
    preresq.load_model (a checkpoint folder or hub id).
    """
    import preresq
    from harness import presets
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if name in QWEN_SHAPES:
        check_model_device(name, device)
        torch.manual_seed(0)
        model = qwen_model(name, device, dtype)
        tokenizer = WordTokenizer(QWEN_SPECIAL_IDS, text_vocab=min(QWEN_SPECIAL_IDS.values()))
        processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
        return model, tokenizer, processor, f"{name} architecture, random weights"
    if name in presets.PRESETS:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            path = Path(folder or tmp) / f"{name}-model"
            if not path.exists():
                torch.manual_seed(0)
                presets.build_preset(name, path, warmup_steps=0)
            model, tokenizer, processor = preresq.load_model(str(path), device, dtype)
        return model, tokenizer, processor, f"{name} preset architecture, no warm-up"
    model, tokenizer, processor = preresq.load_model(name, device, dtype)  # ModelLoadError: an InputError
    return model, tokenizer, processor, name


def check_model_device(name: str, device: str) -> None:
    """InputError unless a published shape (qwen2.5-vl-3b / -7b) is asked for on a CUDA device torch sees."""
    if name not in QWEN_SHAPES:
        return
    if not str(device).startswith("cuda"):
        raise cli.InputError(f"--model {name} has {'3.75' if '3b' in name else '8.29'} B parameters and runs "
                             f"with --device cuda only (a CPU step would take hours). On the CPU use --model "
                             f"tiny or --model small.")
    if not torch.cuda.is_available():
        raise cli.InputError(f"--model {name} needs a CUDA GPU, and torch sees none here.")


# --------------------------------------------------------------------------- one GRPO step, timed

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak below is the lifetime peak


def _peak_memory(device: torch.device) -> int:
    """Peak bytes since the last reset: max allocated on CUDA, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _measure(fn, device: torch.device):
    """fn() -> (its result, seconds, peak bytes during the call)."""
    _sync(device)
    _reset_peak_memory(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start, _peak_memory(device)

# Phases of one GRPO step, in the order the training loop runs them.
PHASES = ("pictures", "generation", "reward", "reference", "policy_forward", "policy_backward", "optimizer",
          "logging")
PHASE_NAMES = dict(pictures="picture loading", generation="generation", reward="reward",
                   reference="reference pass", policy_forward="policy forward", policy_backward="policy backward",
                   optimizer="optimizer", logging="logging")


@dataclass(frozen=True)
class StepBench:
    """What `bench.py step` measures: the step's shapes and the flags of the run whose steps it times.

    image_size: (width, height) of every picture. The steps are those of a run of warmup_steps +
    steps steps: the learning rate decays from `lr` over them, as grpo.Config.learning_rate does.
    lora_rank: adapters of that rank on the language model (None: full fine-tuning)."""
    images_per_step: int = 8
    num_generations: int = 8
    max_new_tokens: int = 64
    image_size: tuple[int, int] = (448, 448)
    steps: int = 3
    warmup_steps: int = 1
    beta: float = 0.04
    lr: float = 1e-4
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    lora_rank: int | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace, lora_rank: int | None = None) -> "StepBench":
        size = size_for_visual_tokens(args.visual_tokens) if args.visual_tokens else args.image_size
        return cls(args.images_per_step, args.num_generations, args.max_new_tokens, size, args.steps,
                   args.warmup_steps, args.beta, args.lr, args.micro_batch_size, args.gradient_checkpointing,
                   lora_rank)

    def config(self):
        """The grpo.Config these settings train with: one stage (a fixed prompt, G answers), the
        defaults of a non-preset model otherwise. grpo.ConfigError for a combination grpo.py refuses."""
        import grpo

        return grpo.Config(model="bench", images_per_step=self.images_per_step, num_generations=self.num_generations,
                           max_new_tokens=self.max_new_tokens, beta=self.beta, lr=self.lr,
                           micro_batch_size=self.micro_batch_size, gradient_checkpointing=self.gradient_checkpointing,
                           lora_rank=self.lora_rank, schedule="single", steps=self.warmup_steps + self.steps,
                           seed=self.seed).resolve()


@dataclass
class StepTimes:
    """One measured step: seconds per phase (PHASES; reference is 0 when beta = 0), the step's wall
    time (`step`, the phases and the few untimed lines of grpo_step between them), the completion
    tokens it sampled, the peak bytes over the step, and whether every advantage was 0 (all
    answers to each picture scored alike: the update's policy-gradient term is then 0)."""
    seconds: dict[str, float]
    step: float
    generated_tokens: int
    peak: int
    flat_advantages: bool = False

    @property
    def policy(self) -> float:
        return self.seconds["policy_forward"] + self.seconds["policy_backward"]

    @property
    def untimed(self) -> float:
        return self.step - sum(self.seconds.values())


class PhaseClock:
    """While active, times the functions grpo.grpo_step calls, phase by phase, without changing them.

    grpo_step looks its parts up as module globals when it runs, so wrapping the module attributes
    (HOOKS) times the training code itself: preresq.encode_prompts is picture loading,
    grpo.sample_rollout generation, grpo.score_rollout reward, grpo.reference_logprobs the
    reference pass, grpo.policy_update the policy forward, torch.autograd.backward (Tensor.backward
    goes through it) the policy backward, grpo.optimizer_step the optimizer. Each phase gets its
    own time only: a call inside another (encoding inside sampling, backward inside policy_update)
    is taken off the outer one. `timed(phase, fn)` times anything else the same way."""

    HOOKS = (("preresq", "encode_prompts", "pictures"), ("grpo", "sample_rollout", "generation"),
             ("grpo", "score_rollout", "reward"), ("grpo", "reference_logprobs", "reference"),
             ("grpo", "policy_update", "policy_forward"), ("torch.autograd", "backward", "policy_backward"),
             ("grpo", "optimizer_step", "optimizer"))

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.inner, self.originals = device, dict.fromkeys(PHASES, 0.0), [], []

    def timed(self, phase: str, fn):
        def run(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            self.inner.append(0.0)  # the time of the calls inside this one
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                elapsed, inner = time.perf_counter() - start, self.inner.pop()
                self.seconds[phase] += elapsed - inner
                if self.inner:
                    self.inner[-1] += elapsed

        return run

    def __enter__(self):
        import importlib

        for module_name, name, phase in self.HOOKS:
            module = importlib.import_module(module_name)
            self.originals.append((module, name, getattr(module, name)))
            setattr(module, name, self.timed(phase, getattr(module, name)))
        return self

    def __exit__(self, *exc):
        while self.originals:
            module, name, original = self.originals.pop()
            setattr(module, name, original)

def random_pictures(n: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def label_items(labels: str, data_root: str | None = None) -> list:
    """The items of a label file in the project's GT format (or a training jsonl), paths resolved
    under data_root (default: the label file's folder) as `grpo.py --data labels` resolves them.
    DataError (an InputError) for a bad file, a missing picture or a video."""
    import data

    root = data_root if data_root is not None else os.path.dirname(os.path.abspath(os.path.expanduser(labels)))
    items = data.load_dataset("labels", root, "all", labels=labels)
    videos = [it.path for it in items if it.is_video]
    if videos:
        raise data.DataError(f"{labels}: the step bench times pictures, and this file lists {len(videos)} "
                             f"video(s), e.g. {videos[0]}")
    return items


class Pictures:
    """Each step's B pictures and their scores (mos, 1..5). From label-file items (label_items): read
    with data.read_visual, resized to `size`, taken in file order and wrapping around; without
    items: random pictures and random scores, different at every step."""

    def __init__(self, size: tuple[int, int], items: list | None = None, seed: int = 0):
        self.size, self.items, self.seed = size, items, seed

    def __call__(self, step: int, n: int) -> tuple[list[Image.Image], torch.Tensor]:
        width, height = self.size
        if self.items is None:
            rng = np.random.default_rng([self.seed, step])
            return (random_pictures(n, width, height, seed=self.seed * 1_000_003 + step),
                    torch.tensor(rng.uniform(1, 5, n), dtype=torch.float32))
        import data

        chosen = [self.items[(step * n + i) % len(self.items)] for i in range(n)]
        pictures = [data.read_visual(it.path) for it in chosen]
        pictures = [p if p.size == self.size else p.resize(self.size, Image.Resampling.BICUBIC) for p in pictures]
        return pictures, torch.tensor([it.mos for it in chosen], dtype=torch.float32)


def size_for_visual_tokens(n: int) -> tuple[int, int]:
    """(width, height) of a near-square picture with at least n visual tokens (one per 28x28 pixels)."""
    rows = max(1, round(math.sqrt(n)))
    return 28 * math.ceil(n / rows), 28 * rows


@dataclass
class BenchRun:
    """What the timed steps train: the config, the policy and its frozen reference (None when beta
    = 0), the optimizer, where each step's pictures come from and the metrics file it appends to."""
    cfg: object
    model: object
    reference: object
    tokenizer: object
    image_processor: object
    optimizer: torch.optim.Optimizer
    pictures: Pictures
    metrics: Path

    def batch(self, step: int) -> tuple[list, list[list[Image.Image]]]:
        """The step's items (their scores) and pictures, in the form the loop hands grpo_step."""
        import data

        pictures, mos = self.pictures(step, self.cfg.images_per_step)
        items = [data.Item(f"bench-{step}-{i}", float(m), float(m), "bench") for i, m in enumerate(mos.tolist())]
        return items, [[p] for p in pictures]


def prepare_run(model, tokenizer, image_processor, settings: StepBench, items: list | None, metrics: Path,
                report=print) -> BenchRun:
    """Make the run the bench steps, as runkeeping.load_models and prepare make a training run's:
    LoRA adapters (the reference is the policy with its adapters off) or a frozen copy of the model
    as the reference, gradient checkpointing, AdamW on what trains. Widens image_processor's
    max_pixels when the pictures are larger (for the bench only: the visual-token count asked for)."""
    from harness import lora

    cfg = settings.config()
    width, height = settings.image_size
    if width * height > image_processor.size["longest_edge"]:
        report(f"note: image processor max_pixels raised from {image_processor.size['longest_edge']} to "
               f"{width * height} for this bench, so {width}x{height} pictures keep their size")
        image_processor.size["longest_edge"] = width * height
    if cfg.lora_rank:
        lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed)
        reference = lora.Reference(model) if cfg.beta else None
    else:
        reference = copy.deepcopy(model).requires_grad_(False).eval() if cfg.beta else None
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return BenchRun(cfg, model, reference, tokenizer, image_processor, optimizer,
                    Pictures(settings.image_size, items, settings.seed), metrics)


def log_metrics(path: Path, step: int, done) -> None:
    """The step's line in metrics.jsonl, as the loop writes it: the reward's statistics and the update's."""
    from support import runkeeping

    runkeeping.log_json(path, {"step": step + 1, **runkeeping.step_metrics(done.scored), **done.stats})


def timed_step(run: BenchRun, step: int) -> tuple[StepTimes, object]:
    """One training step as the loop runs it, timed phase by phase (PhaseClock): the step's pictures,
    one call of grpo.grpo_step, its metrics line -> (its StepTimes, the grpo.Step)."""
    import grpo

    device = run.model.device
    _sync(device)
    _reset_peak_memory(device)
    start = time.perf_counter()
    with PhaseClock(device) as clock:
        items, visuals = clock.timed("pictures", run.batch)(step)
        done = grpo.grpo_step(run.cfg, run.model, run.reference, run.tokenizer, run.image_processor, run.optimizer,
                              items, visuals, step, False)
        clock.timed("logging", log_metrics)(run.metrics, step, done)
    _sync(device)
    seconds = time.perf_counter() - start
    mask, advantages = done.rollout.mask, done.scored.advantages
    flat = advantages is not None and not advantages.any()
    return StepTimes(dict(clock.seconds), seconds, int(mask.sum()) if mask is not None else 0,
                     _peak_memory(device), bool(flat)), done


def bench_grpo_step(model, tokenizer, image_processor, settings: StepBench = StepBench(), items: list | None = None,
                    report=print) -> dict:
    """Time settings.steps GRPO steps (after settings.warmup_steps untimed ones), phase by phase -> summary.

    Each step is the training loop's: the pictures (`items` of a label file, else random ones;
    Pictures), one call of grpo.grpo_step on them (sampling, reward, reference pass, policy update,
    optimizer step: the function grpo.py's loop calls, timed by PhaseClock's hooks) and its line in
    a metrics.jsonl. `model` is trained in place (with adapters when settings.lora_rank).

    Keys (seconds are medians over the timed steps): each of PHASES, policy (forward + backward),
    step (the median of the steps' wall times), untimed (the median of what the phases leave of a
    step), peak_bytes (max over the timed steps), visual_tokens, prompt_tokens (per prompt),
    generation_tokens_per_s, step_tokens_per_s (sampled completion tokens / step seconds),
    trained_parameters, flat_steps (timed steps whose advantages were all 0), steps (StepTimes)."""
    import preresq

    with tempfile.TemporaryDirectory(prefix="bench-log-") as logs:
        run = prepare_run(model, tokenizer, image_processor, settings, items, Path(logs) / "metrics.jsonl", report)
        items0, visuals0 = run.batch(0)
        first = preresq.encode_prompts(tokenizer, image_processor, visuals0, [preresq.IMAGE_PROMPT] * len(items0))
        summary = dict(visual_tokens=int(first.image_grid_thw[0].prod()) // image_processor.merge_size ** 2,
                       prompt_tokens=first.input_ids.shape[1],
                       trained_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
        report(describe(settings, summary, items))
        torch.manual_seed(settings.seed)  # sampling draws from the global generator, as in a run
        measured = []
        for k in range(settings.warmup_steps + settings.steps):
            times, done = timed_step(run, k)
            report(step_line("warm-up" if k < settings.warmup_steps else f"step {k - settings.warmup_steps + 1}",
                             times, done))
            if k >= settings.warmup_steps:
                measured.append(times)
    summary.update(_medians(measured))
    report(phase_table(summary, model.device))
    return summary


def describe(settings: StepBench, summary: dict, items: list | None) -> str:
    """The bench's first line: the shapes and the flags."""
    s = settings
    width, height = s.image_size
    pictures = f"{len(items)} labelled pictures" if items is not None else "random pictures"
    return (f"B={s.images_per_step} G={s.num_generations}: {summary['visual_tokens']} visual tokens per picture "
            f"({width}x{height}, {pictures}), {summary['prompt_tokens']} prompt tokens, up to {s.max_new_tokens} "
            f"completion tokens; beta={s.beta}, lr={s.lr:g} decaying over {s.warmup_steps + s.steps} steps, "
            f"micro-batch {s.micro_batch_size or s.images_per_step * s.num_generations}, "
            f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; "
            f"{f'LoRA rank {s.lora_rank}' if s.lora_rank else 'full fine-tuning'}, "
            f"{summary['trained_parameters'] / 1e6:,.3f} M trained parameters")


def step_line(label: str, times: StepTimes, done) -> str:
    """One step's line: its seconds, the main phases, what it sampled, its reward and its peak."""
    reward = done.scored.terms.get("total")
    problem = f", {done.stats['nonfinite']} not finite: optimizer skipped" if "nonfinite" in done.stats else ""
    return (f"{label:>8}: {times.step:7.3f} s (generation {times.seconds['generation']:.3f}, reference "
            f"{times.seconds['reference']:.3f}, policy {times.policy:.3f}), {times.generated_tokens} tokens, "
            f"reward {reward.mean().item() if reward is not None else float('nan'):.3f}"
            f"{' (all alike: advantages 0)' if times.flat_advantages else ''}{problem}, "
            f"peak {times.peak / 2**30:.2f} GiB")


def _medians(steps: list[StepTimes]) -> dict:
    """Medians over measured steps of each phase, the policy pass, the step and its untimed rest;
    the peak; completion tokens per second of generation and of the step."""
    out = {p: statistics.median(s.seconds[p] for s in steps) for p in PHASES}
    out.update(policy=statistics.median(s.policy for s in steps), step=statistics.median(s.step for s in steps),
               untimed=statistics.median(s.untimed for s in steps), peak_bytes=max(s.peak for s in steps),
               flat_steps=sum(s.flat_advantages for s in steps))
    out.update(generation_tokens_per_s=sum(s.generated_tokens for s in steps)
               / sum(s.seconds["generation"] for s in steps),
               step_tokens_per_s=statistics.median(s.generated_tokens for s in steps) / out["step"], steps=steps)
    return out


def phase_table(summary: dict, device: torch.device) -> str:
    """The summary as a table: one row per phase, the policy pass, the untimed rest, the step, the
    peak memory and the completion tokens per second."""
    rows = [(PHASE_NAMES[p], p) for p in PHASES] + [("policy fwd+bwd", "policy"), ("untimed rest", "untimed"),
                                                    ("step", "step")]
    lines = [f"median of {len(summary['steps'])} steps"]
    lines += [f"  {label:<20}{summary[key]:>8.3f} s" for label, key in rows]
    kind = "max allocated" if device.type == "cuda" else "resident set"
    lines.append(f"  {'peak memory':<20}{summary['peak_bytes'] / 2**30:>6.2f} GiB   ({kind})")
    lines.append(f"  completion tokens/s: generation {summary['generation_tokens_per_s']:.0f}, "
                 f"step {summary['step_tokens_per_s']:.0f}")
    if summary["flat_steps"]:
        lines.append(f"  in {summary['flat_steps']} of these steps every picture's answers scored alike (as an "
                     f"untrained model's do): the advantages were 0, the work the same")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 28 or int(m.group(2)) < 28:
        raise argparse.ArgumentTypeError(f"{text!r} is not a picture size: write WIDTHxHEIGHT, each at least 28 "
                                         f"(e.g. 448x448)")
    return int(m.group(1)), int(m.group(2))


def bench_step(args: argparse.Namespace) -> dict:
    """`bench.py step`: time --model's steps (with --lora-rank: LoRA, then full fine-tuning, compared)."""
    import preresq

    device = args.device or preresq.default_device()
    dtype = preresq.DTYPES[args.dtype] if args.dtype else preresq.default_dtype(device)
    items = label_items(args.labels, args.data_root) if args.labels else None  # DataError before any model
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    summaries = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:  # a preset is built once for both runs
        for rank in ([args.lora_rank, None] if args.lora_rank else [None]):  # LoRA first: see the docstring
            try:
                summaries[rank] = bench_one(args, StepBench.from_args(args, rank), device, dtype, folder, items)
            except torch.OutOfMemoryError:
                message = out_of_memory(args, device)
                if rank is not None or not summaries:
                    raise cli.Failure(f"{message}: try --gradient-checkpointing, a smaller --micro-batch-size, "
                                      f"--beta 0 (no reference model), a smaller --images-per-step or "
                                      f"--num-generations, --lora-rank, or several GPUs (README, Scaling).") from None
                print(f"full fine-tuning: {message}; LoRA's numbers above stand")
            _free(device)
    print(f"load average {os.getloadavg()[0]:.2f} after (before: {load[0]:.2f})")
    if not args.lora_rank:
        return summaries[None]
    if None not in summaries:
        return summaries[args.lora_rank]
    return {**summaries[args.lora_rank], **compare_lora(summaries[args.lora_rank], summaries[None], args.lora_rank)}


def out_of_memory(args: argparse.Namespace, device) -> str:
    gpu = torch.cuda.get_device_properties(device)
    return (f"out of memory on {gpu.name} ({gpu.total_memory / 2**30:.0f} GiB) with --model {args.model} "
            f"--images-per-step {args.images_per_step} --num-generations {args.num_generations}")


def bench_one(args: argparse.Namespace, settings: StepBench, device, dtype, folder: str,
              items: list | None = None) -> dict:
    """Load --model afresh and time its steps (LoRA of settings.lora_rank, or full fine-tuning when None)."""
    model, tokenizer, processor, what = load_bench_model(args.model, device, dtype, folder)
    params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{what}: {params / 1e6:,.1f} M parameters, {str(dtype).removeprefix('torch.')}, {where}; "
          f"load average {os.getloadavg()[0]:.2f} before")
    return bench_grpo_step(model, tokenizer, processor, settings, items)


def _free(device) -> None:
    import gc

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def compare_lora(lora_run: dict, full: dict, rank: int, report=print) -> dict:
    """Print LoRA against full fine-tuning on the same shapes -> {"full_fine_tuning": full's summary,
    "ratios": {key: LoRA / full}} for trained_parameters, step, generation, reference, policy,
    optimizer and peak_bytes."""
    seconds = lambda v: f"{v:.3f} s"
    rows = [("trained parameters", "trained_parameters", lambda v: f"{v / 1e6:,.3f} M"), ("step", "step", seconds),
            ("generation", "generation", seconds), ("reference pass", "reference", seconds),
            ("policy fwd+bwd", "policy", seconds), ("optimizer", "optimizer", lambda v: f"{v:.4f} s"),
            ("peak memory", "peak_bytes", lambda v: f"{v / 2**30:.2f} GiB")]
    ratios, lines = {}, [f"LoRA rank {rank} against full fine-tuning on the same shapes (LoRA / full):"]
    for label, key, show in rows:
        ratios[key] = lora_run[key] / full[key] if full[key] else None
        ratio = f"{ratios[key]:.3f}" if ratios[key] is not None else "-"
        lines.append(f"  {label:<19}{show(lora_run[key])} / {show(full[key])} = {ratio}")
    report("\n".join(lines))
    return {"full_fine_tuning": full, "ratios": ratios}


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
    p.set_defaults(run=bench_step)


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
        import grpo
        import preresq

        try:  # what grpo.py refuses (e.g. G = 1: no advantage), refused here in its words
            StepBench.from_args(args, args.lora_rank).config()
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
