"""PreResQ-R1, the model side: load Qwen2.5-VL, build the prompt, sample G answers, score them.

Paper: arXiv 2511.05393 (PreResQ-R1), method.md §1 and §3 of this project's notes.

What lives here, in the order a GRPO step uses it:
  load_model(...)            -> model, tokenizer, image processor (hub id, local folder, or preset)
  encode_prompts(...)        -> PromptBatch: B left-padded prompts with their images
  sample_completions(...)    -> (B*G, C) completion tokens, every sampling setting explicit
  completion_mask(...)       -> tokens up to and including the first end-of-turn token
  completion_logprobs(...)   -> (B*G, C) per-token log-probs of the distribution that was sampled
  judge(...) / score(...)    -> inference: parsed aspect scores and the quality score

Presets. `tiny` and `small` are Qwen2.5-VL models small enough for a laptop CPU. They are built
from a config (random weights), given an offline byte-level BPE tokenizer and a torchvision-free
image processor. Their vision tower is first pretrained to regress generic low-level statistics
(gradient energy, spectrum, colourfulness, ...) of random degraded pictures with natural-image
(1/f) spectra, as a real encoder comes pretrained; no quality label is involved. Then a short
supervised warm-up on random pictures with *random* scores, vision tower frozen, teaches the
answer format (so the model knows the format and nothing about quality: GRPO has to teach it
quality). Measured on the synthetic test split, `tiny`'s sampled answers still correlate with
quality by chance before training (SRCC about -0.35): the warm-up does not make them fully
independent of the picture. Both trainings are ours, not the paper's: the paper starts from
Qwen2.5-VL-7B-Instruct, which already follows the format. A preset is saved as an ordinary
Hugging Face folder in the cache and always loaded with `from_pretrained`, the same path a real
checkpoint takes.

Deliberate choices (and traps avoided; see platform.md):
- Sampling passes a complete GenerationConfig (do_sample, temperature, top_k=0, top_p=1,
  repetition_penalty=1): Qwen's shipped generation_config.json has top_k=1, which would make all
  G samples identical, and a repetition penalty, which would make the sampled distribution differ
  from the one we compute log-probs of.
- Special and vision tokens are suppressed while sampling and excluded from the log-softmax
  normalisation, so recomputed log-probs equal the sampled distribution's.
- `mm_token_type_ids` is passed to every forward; without it Qwen2.5-VL silently falls back to
  1-D positions.
- Log-probs use hidden states of completion positions only and a row-chunked log-softmax, never
  a full-vocabulary float32 log-softmax of the whole batch.
- Shared vision: the vision tower runs once per distinct image and its features serve all G
  completions (exact: Qwen2.5-VL injects image features only at the placeholder tokens).
- Inference never invents a score: an unparsable answer is reported as unparsed.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import rewards

IMAGE_ASPECTS = ("saturation", "granularity", "sharpness", "foreground", "background")
VIDEO_ASPECTS = ("global", "local")

IMAGE_PROMPT = (
    "Describe the quality of this image in five parts: saturation, granularity (noise and grain), "
    "sharpness, foreground and background. Rate each part with a float between 1 and 5 with two "
    "decimals (1 = very poor, 5 = excellent). Think inside <think> </think>, then give the five "
    "ratings, one per line, inside <answer> </answer>."
)

# Stage 1 of the Exploration-to-Stability schedule draws each sample's prompt from this pool
# (paper §4: "several paraphrased prompts"); stage 2 and inference use IMAGE_PROMPT.
IMAGE_PROMPT_POOL = (
    IMAGE_PROMPT,
    "Judge this picture's quality in five aspects: saturation, granularity (noise, grain), sharpness, "
    "foreground and background. Give each a float from 1 (very poor) to 5 (excellent) with two "
    "decimals. Reason inside <think> </think> and put the five scores, one per line, inside "
    "<answer> </answer>.",
    "How good is this image? Assess saturation, granularity (noise and grain), sharpness, foreground "
    "and background, each as a number between 1 and 5 with two decimals, where 1 is very poor and 5 "
    "is excellent. Write your reasoning in <think> </think> and the five numbers, one per line, in "
    "<answer> </answer>.",
    "Rate the visual quality of the picture on five aspects (saturation, granularity, sharpness, "
    "foreground, background) with floats between 1 and 5, two decimals each (1 = very poor, "
    "5 = excellent). First think in <think> </think>; then answer with the five scores, one per "
    "line, in <answer> </answer>.",
    "Look at this image and score its quality: saturation, granularity (noise and grain), sharpness, "
    "foreground and background, each from 1 (very poor) to 5 (excellent) with two decimals. Think "
    "step by step inside <think> </think>, then list the five scores, one per line, inside "
    "<answer> </answer>.",
)

VIDEO_PROMPT = (
    "The first picture is a global multiframe picture: frames sampled across the whole video, in "
    "time order. The other pictures are local single frame pictures from different moments. Rate "
    "the video's quality in two parts: a global score (motion, stutter, temporal consistency) and a "
    "local score (sharpness, noise, compression), each a float between 1 and 5 with two decimals "
    "(1 = very poor, 5 = excellent). Think inside <think> </think>, then give the two scores, one "
    "per line, inside <answer> </answer>."
)
VIDEO_LABELS = ("global multiframe picture:", "local single frame picture:")

SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen's special tokens (same strings as the real tokenizer), and the ones never to be sampled.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SUPPRESSED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>")
END_OF_TURN = "<|im_end|>"

# Preset architectures. `tiny` is the laptop demo's model; `small` is a bigger stand-in for
# measuring speed. Images in the presets' processor are bounded by min/max pixels (patch 14,
# 2x2 merge: one visual token per 28x28 pixels).
PRESETS = {
    "tiny": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384,
                 vision_hidden=64, vision_depth=2, vision_heads=4,
                 min_pixels=56 * 56, max_pixels=224 * 224,
                 vision_steps=2500, vision_lr=1e-3, warmup_steps=800, warmup_lr=2e-3),
    "small": dict(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=768,
                  vision_hidden=128, vision_depth=4, vision_heads=4,
                  min_pixels=56 * 56, max_pixels=448 * 448,
                  vision_steps=400, vision_lr=5e-4, warmup_steps=300, warmup_lr=1e-3),
}


# --------------------------------------------------------------------------- loading

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def cache_root() -> Path:
    return Path(os.environ.get("PRERESQ_CACHE", Path.home() / ".cache" / "preresq"))


def preset_path(name: str) -> Path:
    """Cache folder of a preset; its name changes whenever the recipe (settings, prompts, code) does."""
    recipe = [PRESETS[name], IMAGE_PROMPT_POOL, VIDEO_PROMPT, WARMUP_THOUGHTS, _RECIPE_CODE]
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / f"preset-{name}-{digest}"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


def load_model(name_or_path: str = "tiny", device: str | None = None, dtype: torch.dtype | str | None = None):
    """Load a Qwen2.5-VL checkpoint -> (model, tokenizer, image_processor), model in eval mode.

    name_or_path: a preset name (`tiny`, `small`; built and cached on first use), a local
    checkpoint folder, or a Hugging Face hub id (used from the local hub cache; downloaded only
    when the hub is reachable). Every case ends in `from_pretrained` on a folder.
    """
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    device = device or default_device()
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    dtype = dtype or default_dtype(device)
    if name_or_path in PRESETS:
        path = preset_path(name_or_path)
        if not (path / "config.json").exists():
            build_preset(name_or_path, path)
        source = str(path)
    elif Path(name_or_path).expanduser().exists():
        source = str(Path(name_or_path).expanduser())
        if not (Path(source) / "config.json").exists():
            raise ModelLoadError(f"{source} is not a model folder: it has no config.json. Give a folder "
                                 f"written by save_pretrained (e.g. runs/.../final), a preset "
                                 f"({', '.join(PRESETS)}) or a hub id.")
    else:
        source = _resolve_hub_id(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # AutoImageProcessor would pick the torchvision backend, which does not import here.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError for a damaged file, ...
        raise ModelLoadError(f"could not load a Qwen2.5-VL model from {source}: {type(e).__name__}: {e}. "
                             "Check that the folder is complete (re-download or re-save it).") from e
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer, image_processor


def _resolve_hub_id(name: str) -> str:
    """A hub id -> a local snapshot folder, failing within seconds when it is not downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    advice = (f"Download it first (`hf download {name}` on a machine with network) or pass "
              f"a local folder with --model; presets that need no download: {', '.join(PRESETS)}.")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"model {name!r} is not in the local hub cache and HF_HUB_OFFLINE is set. {advice}")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise ModelLoadError(f"model {name!r} is not in the local hub cache and the hub cannot be "
                             f"reached. {advice}") from None
    try:
        return snapshot_download(name)
    except Exception as e:  # network errors come in many types; all end the same way
        raise ModelLoadError(f"could not download {name!r}: {e}. {advice}") from e


# --------------------------------------------------------------------------- presets

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(corpus: list[str], num_merges: int = 400):
    """An offline byte-level BPE with Qwen's special tokens, merges learned from `corpus`.

    The pre-tokenizer (Qwen's regex, digits one by one) comes from Qwen2Tokenizer itself, so the
    result tokenizes like the real one, with a much smaller vocabulary.
    """
    from collections import Counter

    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    probe = Qwen2Tokenizer(vocab=dict(vocab), merges=[])
    words = Counter(w for text in corpus for w, _ in probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text))
    splits = {w: list(w) for w in words}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for w, count in words.items():
            s = splits[w]
            for a, b in zip(s, s[1:]):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        for w, s in splits.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tokenizer.padding_side = "left"
    return tokenizer


def _random_picture(rng: np.random.Generator) -> Image.Image:
    """A random unlabelled picture for the preset's pretraining: a procedural landscape
    (data.landscape, the generator of the synthetic sets, here with its own random stream) of
    random size, 84..168 px a side."""
    import data

    w, h = (int(rng.integers(3, 7)) * 28 for _ in range(2))
    return data.landscape(rng, w, h)


WARMUP_THOUGHTS = (
    "I check colour, noise, focus, subject and background.",
    "I compare the frames, then the single frames.",
)
# What the preset learns to say about a picture before GRPO (_degraded_picture's kinds, and its
# severity in four bins): a description of what is seen, never a score.
DEGRADATION_NAMES = ("blur", "motion blur", "noise", "blocking", "pixelation", "low contrast", "faded colour",
                     "banding")
SEVERITY_WORDS = ("slight", "moderate", "strong", "severe")
OPINION_LEVELS = np.linspace(1.5, 4.5, len(DEGRADATION_NAMES))


def describe_degradation(kind: int | None, severity: float) -> str:
    """The preset's caption of a picture: "I see strong blur." / "I see no distortion."."""
    if kind is None:
        return "I see no distortion."
    word = SEVERITY_WORDS[severity_bin(severity)]
    return f"I see {word} {DEGRADATION_NAMES[kind]}."


def severity_bin(severity: float) -> int:
    """The index in SEVERITY_WORDS of a severity in [0, 1]."""
    return min(int(severity * len(SEVERITY_WORDS)), len(SEVERITY_WORDS) - 1)


def neutral_opinion(kind: int | None, severity: float) -> float | None:
    """The preset's starting opinion of a picture: a level in [1.5, 4.5] for each (kind,
    severity bin) that says nothing about quality.

    The levels form a Latin square, OPINION_LEVELS[(kind + 3 * bin) % 8]: every severity bin
    holds each of the eight levels once, so the mean opinion is 3.0 at every severity and the
    opinion has no correlation with quality. None (an untouched picture): no opinion, a random
    level. Why the preset has opinions at all: a language model warmed up on scores that ignore
    what it saw learns to ignore it where the score is written, and GRPO then cannot bring the
    picture back within the demo's budget (README, "Why the preset has opinions").
    """
    if kind is None:
        return None
    return float(OPINION_LEVELS[(kind + 3 * severity_bin(severity)) % len(OPINION_LEVELS)])


def _random_answer(rng: np.random.Generator, num_aspects: int, video: bool, thought: str | None = None,
                   level: float | None = None) -> str:
    """A well-formed answer: a level (default: uniform in [1, 5]; else `level` + N(0, 0.4)),
    and each aspect within a few tenths of it (aspect ratings of one picture go together, so
    that the answer is decided by its first digit, which the later aspects learn to follow).
    `thought` (default: a fixed sentence) is the reasoning written before the scores."""
    level = rng.uniform(1.0, 5.0) if level is None else level + rng.normal(0, 0.4)
    scores = np.clip(level + rng.normal(0, 0.15, num_aspects), 1.0, 5.0)
    thought = thought or WARMUP_THOUGHTS[1 if video else 0]
    return f"<think>{thought}</think>\n<answer>" + "\n".join(f"{s:.2f}" for s in scores) + "</answer>"


def build_preset(name: str, path: Path, seed: int = 0, warmup_steps: int | None = None) -> None:
    """Build preset `name` and save it at `path`: config, tokenizer, processor, then the vision
    pretraining and the format warm-up.

    Written to a temporary folder and renamed into place, so a half-built preset is never loaded.
    warmup_steps=0 skips both trainings (random weights: a model that knows nothing, for tests).
    """
    p = PRESETS[name]
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng():  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        _build_preset(name, p, path, rng, warmup_steps)


def _build_preset(name, p, path, rng, warmup_steps):
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    corpus = [render_prompt([1], q) for q in IMAGE_PROMPT_POOL] + [render_prompt([1] * 4, VIDEO_PROMPT, video=True)]
    captions = [describe_degradation(None, 0.0)] + [describe_degradation(k, (i + 0.5) / len(SEVERITY_WORDS))
                                                     for k in range(len(DEGRADATION_NAMES))
                                                     for i in range(len(SEVERITY_WORDS))]
    corpus += [_random_answer(rng, 5, False, captions[i % len(captions)]) for i in range(200)]
    corpus += [_random_answer(rng, 2, True) for _ in range(50)]
    tokenizer = build_tokenizer(corpus)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = p["hidden"] // p["heads"]
    section = [head_dim // 2 - 2 * (3 * head_dim // 16), 3 * head_dim // 16, 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=p["hidden"], intermediate_size=p["intermediate"],
            num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=p["vision_depth"], hidden_size=p["vision_hidden"], intermediate_size=2 * p["vision_hidden"],
            num_heads=p["vision_heads"], out_hidden_size=p["hidden"], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[p["vision_depth"] - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=p["min_pixels"], max_pixels=p["max_pixels"])
    steps = p["warmup_steps"] if warmup_steps is None else warmup_steps
    if steps:
        _vision_pretraining(model, image_processor, rng, steps=p["vision_steps"], lr=p["vision_lr"])
        _format_warmup(model, tokenizer, image_processor, rng, steps=steps, lr=p["warmup_lr"])
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process built it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _degraded_picture(rng: np.random.Generator, source: Image.Image | None = None
                      ) -> tuple[Image.Image, int | None, float]:
    """A random picture with a random generic degradation of random strength: (picture, kind,
    severity), kind an index of DEGRADATION_NAMES (None: untouched), severity in [0, 1] (0 for
    untouched pictures, 1: the strongest of its kind).

    The kinds are the classic synthetic distortions of IQA pretraining (Gaussian and motion blur,
    noise, JPEG, pixelation, contrast, colour, grey levels) on _random_picture sources, with the
    strength drawn from a continuum; a quarter of the pictures are left untouched. `source`
    (default: a new _random_picture) is the picture to degrade.
    """
    from PIL import ImageEnhance, ImageFilter
    import io

    from scipy import ndimage

    img = source if source is not None else _random_picture(rng)
    if rng.random() < 0.25:
        return img, None, 0.0
    kind, t = int(rng.integers(0, 8)), float(rng.random())
    a = np.asarray(img, np.float32)
    if kind == 0:
        img = img.filter(ImageFilter.GaussianBlur(0.3 + 5 * t))
    elif kind == 1:
        n = 2 * int(1 + 12 * t) + 1
        kernel = np.zeros((n, n), np.float32)
        angle = rng.uniform(0, np.pi)
        for s in np.linspace(-(n - 1) / 2, (n - 1) / 2, 2 * n):
            kernel[int(round((n - 1) / 2 + s * np.sin(angle))), int(round((n - 1) / 2 + s * np.cos(angle)))] = 1
        kernel /= kernel.sum()
        img = Image.fromarray(np.clip(np.stack([ndimage.convolve(a[..., c], kernel, mode="reflect")
                                                for c in range(3)], -1), 0, 255).astype(np.uint8))
    elif kind == 2:
        img = Image.fromarray(np.clip(a + rng.normal(0, 50 * t, a.shape), 0, 255).astype(np.uint8))
    elif kind == 3:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(3 + 90 * (1 - t)))
        img = Image.open(buf).convert("RGB")
    elif kind == 4:
        k = max(1, int(1 + 30 * t))
        img = img.resize((max(1, img.size[0] // k), max(1, img.size[1] // k)), Image.BOX).resize(img.size, Image.NEAREST)
    elif kind == 5:
        img = ImageEnhance.Contrast(img).enhance(1 - 0.9 * t)
    elif kind == 6:
        img = ImageEnhance.Color(img).enhance(1 - t)
    else:
        levels = int(2 + 30 * (1 - t))
        img = Image.fromarray((np.round(a / 255 * (levels - 1)) / (levels - 1) * 255).astype(np.uint8))
    return img, kind, t


def _prefetched(make, n: int):
    """Yield make() n times, each computed in a worker thread while the caller trains on the
    previous one (the pictures are numpy/Pillow work, which releases the GIL). make is only ever
    called from that one thread, in order, so a random stream it draws from is drawn exactly as
    in a plain loop."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(make) if n else None
        for i in range(n):
            item = pending.result()
            pending = pool.submit(make) if i + 1 < n else None
            yield item


def _vision_pretraining(model, image_processor, rng, steps: int, batch: int = 16, lr: float = 2e-3) -> None:
    """Give the preset's vision tower the distortion-aware features a pretrained encoder has.

    A real Qwen2.5-VL's vision tower comes pretrained and sees blur, noise and compression; a
    random one maps every picture to almost the same features, so there would be nothing for
    GRPO to learn from. Here the vision tower (with a temporary linear head on its mean- and
    std-pooled output) learns the classic IQA pretext task (RankIQA, DB-CNN): the severity of a
    random generic degradation of a random picture (_degraded_picture). No picture of any
    dataset and no quality score is ever shown, and the language model, which writes the
    scores, is not trained here.
    """
    from tqdm import tqdm

    vision = model.model.visual
    head = torch.nn.Linear(2 * vision.merger.mlp[-1].out_features, 1)
    opt = torch.optim.AdamW(list(vision.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    vision.train()

    def draw():  # four degradations of each source (drawing a landscape costs more than degrading it)
        sources = [_random_picture(rng) for _ in range(batch // 4)]
        pictures, _, severity = zip(*(_degraded_picture(rng, sources[i // 4]) for i in range(batch)))
        return image_processor(images=list(pictures), return_tensors="pt"), torch.tensor(severity)

    for enc, severity in tqdm(_prefetched(draw, steps), total=steps, desc="vision pretraining", leave=False):
        feats = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True).pooler_output
        pooled = torch.stack([torch.cat([f.mean(0), f.std(0)]) for f in feats])
        loss = torch.nn.functional.mse_loss(head(pooled).squeeze(-1), 4 * severity - 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vision.eval()


def _format_warmup(model, tokenizer, image_processor, rng, steps: int, lr: float, batch: int = 8) -> None:
    """Supervised warm-up on (random degraded picture, prompt) -> caption, then scores.

    What a real VLM brings from its pretraining, in miniature: it reads its visual tokens (the
    reasoning names the degradation it sees and how strong it is: describe_degradation) and it
    writes the answer format. The scores are the preset's neutral_opinion of what it saw:
    they depend on the picture but carry no information about its quality, so the preset starts
    with no correlation between its scores and quality; tying them to quality is left to GRPO.
    The adapter (merger) and the language model train; the rest of the vision tower stays as
    _vision_pretraining left it.
    """
    from tqdm import tqdm

    language = [p for n, p in model.named_parameters()
                if not n.startswith("model.visual.") or n.startswith("model.visual.merger.")]
    opt = torch.optim.AdamW(language, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def examples():
        visuals, prompts, answers, video = [], [], [], rng.random() < 0.2
        for _ in range(batch):
            if video:
                visuals.append([_random_picture(rng) for _ in range(4)])
                prompts.append(VIDEO_PROMPT)
            else:
                picture, kind, severity = _degraded_picture(rng)
                visuals.append([picture])
                prompts.append(IMAGE_PROMPT_POOL[int(rng.integers(len(IMAGE_PROMPT_POOL)))])
            answers.append(_random_answer(rng, 2, True) if video else
                           _random_answer(rng, 5, False, describe_degradation(kind, severity),
                                          neutral_opinion(kind, severity)))
        prompt = encode_prompts(tokenizer, image_processor, visuals, prompts, video=video)
        comp = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]
        width = max(map(len, comp))
        pad = tokenizer.pad_token_id
        comp_ids = torch.tensor([c + [pad] * (width - len(c)) for c in comp])
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in comp])
        return prompt, comp_ids, mask

    for prompt, comp_ids, mask in tqdm(_prefetched(examples, steps), total=steps, desc="format warm-up", leave=False):
        logp = completion_logprobs(model, prompt, comp_ids, mask, temperature=1.0, num_generations=1,
                                   suppressed=suppressed_ids(tokenizer))
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


# --------------------------------------------------------------------------- prompts

def render_prompt(images_per_visual: list[int], prompt: str, video: bool = False) -> str:
    """One user turn in Qwen's chat format, pictures first, `<|image_pad|>` repeated per picture.

    images_per_visual: visual tokens of each picture of this prompt (a video's views are several
    pictures, each preceded by its label, as in the authors' data flow).
    """
    parts = []
    for k, n in enumerate(images_per_visual):
        if video:
            parts.append(VIDEO_LABELS[0] if k == 0 else f"{VIDEO_LABELS[1][:-1]} {k}:")
        parts.append("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>")
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
            + "".join(parts) + prompt + "<|im_end|>\n<|im_start|>assistant\n")


@dataclass
class PromptBatch:
    """B prompts, left-padded, with their pictures.

    input_ids, attention_mask: (B, P). pixel_values: (sum of patches, C*T*14*14), pictures in prompt
    order. image_grid_thw: (num_pictures, 3). pictures_per_prompt: B ints (1 for an image, 1+K for
    a video's views).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    pictures_per_prompt: list[int] = field(default_factory=list)

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.pixel_values.to(device), self.image_grid_thw.to(device), self.pictures_per_prompt)


def encode_prompts(tokenizer, image_processor, visuals: list[list[Image.Image]], prompts: list[str],
                   video: bool = False) -> PromptBatch:
    """Tokenise B prompts with their pictures (each entry of `visuals` is a list of pictures)."""
    flat = [img for pics in visuals for img in pics]
    enc = image_processor(images=flat, return_tensors="pt")
    merge = image_processor.merge_size ** 2
    tokens = (enc["image_grid_thw"].prod(-1) // merge).tolist()
    texts, k = [], 0
    for pics, prompt in zip(visuals, prompts):
        texts.append(render_prompt(tokens[k:k + len(pics)], prompt, video=video))
        k += len(pics)
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return PromptBatch(batch["input_ids"], batch["attention_mask"], enc["pixel_values"], enc["image_grid_thw"],
                       [len(p) for p in visuals])


def repeat_prompts(batch: PromptBatch, g: int) -> PromptBatch:
    """Each prompt repeated g times in place (rows b*g .. b*g+g-1 are prompt b).

    Pixels are split per prompt by image_grid_thw and each prompt's chunk is repeated g times in
    the same order as the rows; repeat_interleave on the flat pixel tensor would pair rows with
    the wrong pictures.
    """
    patches = batch.image_grid_thw.prod(-1)
    per_prompt_patches = torch.stack([p.sum() for p in patches.split(batch.pictures_per_prompt)]).tolist()
    pixel_chunks = batch.pixel_values.split(per_prompt_patches)
    grid_chunks = batch.image_grid_thw.split(batch.pictures_per_prompt)
    return PromptBatch(
        batch.input_ids.repeat_interleave(g, 0), batch.attention_mask.repeat_interleave(g, 0),
        torch.cat([c for c in pixel_chunks for _ in range(g)]), torch.cat([c for c in grid_chunks for _ in range(g)]),
        [n for n in batch.pictures_per_prompt for _ in range(g)])


def mm_token_type_ids(model, input_ids: torch.Tensor) -> torch.Tensor:
    """0 for text, 1 for image placeholder tokens: what selects Qwen2.5-VL's 3-D M-RoPE."""
    return (input_ids == model.config.image_token_id).int()


# --------------------------------------------------------------------------- sampling

def suppressed_ids(tokenizer) -> list[int]:
    """Ids of the special and vision tokens that must never be sampled."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in SUPPRESSED_TOKENS if t in vocab)


def sampling_config(tokenizer, *, num_generations: int = 1, temperature: float = 1.0, max_new_tokens: int = 256,
                    greedy: bool = False):
    """A complete GenerationConfig, so nothing comes from the checkpoint's generation_config.json."""
    from transformers import GenerationConfig

    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    common = dict(num_return_sequences=num_generations, max_new_tokens=max_new_tokens, eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
                  suppress_tokens=suppressed_ids(tokenizer), repetition_penalty=1.0,
                  no_repeat_ngram_size=0, use_cache=True)
    if greedy:
        return GenerationConfig(do_sample=False, top_k=None, top_p=None, temperature=None, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None, **common)


@torch.no_grad()
def sample_completions(model, tokenizer, batch: PromptBatch, num_generations: int, *, temperature: float = 1.0,
                       max_new_tokens: int = 256, greedy: bool = False) -> torch.Tensor:
    """Sample G completions per prompt -> (B*G, C) token ids (rows grouped by prompt; pad after the end)."""
    device = model.device
    batch = batch.to(device)
    out = model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=mm_token_type_ids(model, batch.input_ids),
        generation_config=sampling_config(tokenizer, num_generations=num_generations, temperature=temperature,
                                          max_new_tokens=max_new_tokens, greedy=greedy))
    return out[:, batch.input_ids.shape[1]:]


def completion_mask(completion_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """(N, C) -> (N, C) long: 1 up to and including the first end-of-turn token, 0 after it."""
    is_end = completion_ids == end_id
    after_end = (is_end.cumsum(1) - is_end.long()) > 0
    return (~after_end).long()


def reasoning_mask(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, close: str = "</think>") -> torch.Tensor:
    """(N, C) -> (N, C) bool: the reasoning tokens, from the first up to the one that completes
    `close`; all False in a row that never closes its reasoning.

    Byte-level tokens spell ASCII as itself, so the boundary is found in the joined token strings.
    """
    out = torch.zeros_like(mask, dtype=torch.bool)
    for i, row in enumerate(completion_ids.tolist()):
        n = int(mask[i].sum())
        pieces = tokenizer.convert_ids_to_tokens(row[:n])
        at = "".join(pieces).find(close)
        if at < 0:
            continue
        end, length = at + len(close), 0
        for k, piece in enumerate(pieces):
            length += len(piece)
            if length >= end:
                out[i, :k + 1] = True
                break
    return out


# --------------------------------------------------------------------------- log-probs

def selective_log_softmax(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                          temperature: float, suppressed: list[int], chunk_rows: int = 4) -> torch.Tensor:
    """log softmax(lm_head(h) / T)[target] without a whole-batch float32 vocabulary tensor.

    hidden: (N, C, H); targets: (N, C) -> (N, C) float32. Suppressed tokens are excluded from the
    normalisation, exactly as the sampler excluded them. Rows are processed `chunk_rows` at a time.
    """
    out = []
    for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows)):
        logits = lm_head(h).float() / temperature
        if suppressed:
            logits[..., suppressed] = float("-inf")
        out.append(logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


def image_features(model, batch: PromptBatch) -> list[torch.Tensor]:
    """The vision tower once per picture -> one (tokens, hidden) tensor per picture."""
    feats = model.model.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True)
    return list(feats.pooler_output)


def completion_logprobs(model, prompts: PromptBatch, completion_ids: torch.Tensor, completion_attention: torch.Tensor,
                        *, temperature: float, num_generations: int, suppressed: list[int],
                        shared_vision: bool = True,
                        features: list[torch.Tensor] | None = None, rows: slice | None = None) -> torch.Tensor:
    """Per-token log-probs of completions under `model` at the sampling temperature.

    prompts: B prompts (not repeated); completion_ids, completion_attention: (B*G, C) with rows
    grouped by prompt (or only the rows `rows` of that layout, for micro-batching).
    shared_vision: run the vision tower once per distinct picture and reuse its features for
    all G completions (exact); `features` may pass features computed once for all micro-batches.
    suppressed: token ids the sampler suppressed (suppressed_ids(tokenizer)).
    Returns (rows, C) float32, 0 at positions after the end.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    g = num_generations
    device = completion_ids.device
    prompts = prompts.to(device)
    rows = rows or slice(0, prompts.input_ids.shape[0] * g)
    row_ids = list(range(prompts.input_ids.shape[0] * g))[rows]
    prompt_of_row = [r // g for r in row_ids]
    input_ids = torch.cat([prompts.input_ids[prompt_of_row], completion_ids], 1)
    attention = torch.cat([prompts.attention_mask[prompt_of_row], completion_attention.to(prompts.attention_mask)], 1)
    first_picture = np.cumsum([0] + prompts.pictures_per_prompt)
    pictures = [k for b in prompt_of_row for k in range(first_picture[b], first_picture[b + 1])]
    grid = prompts.image_grid_thw[pictures]
    kwargs = dict(input_ids=input_ids, attention_mask=attention, image_grid_thw=grid,
                  mm_token_type_ids=mm_token_type_ids(model, input_ids))
    if shared_vision:
        features = features if features is not None else image_features(model, prompts)
        kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(features[k] for k in pictures))}
    else:
        patches = prompts.image_grid_thw.prod(-1).tolist()
        chunks = prompts.pixel_values.split(patches)
        kwargs["pixel_values"] = torch.cat([chunks[k] for k in pictures])
    hidden = model.model(**kwargs).last_hidden_state
    c = completion_ids.shape[1]
    hidden = hidden[:, -c - 1:-1]  # the state before each completion token predicts it
    # Padding after the end is a suppressed token (log-prob -inf): score a harmless token there
    # and zero it, so that masked positions can never turn a sum into NaN.
    keep = completion_attention.bool()
    targets = completion_ids.masked_fill(~keep, 0)
    logp = selective_log_softmax(hidden, model.lm_head, targets, temperature, suppressed)
    return logp.masked_fill(~keep, 0.0)


# --------------------------------------------------------------------------- inference

@dataclass
class Judgement:
    """The model's verdict on one item.

    score: mean over the parsed samples of the mean aspect score, clipped to [1, 5] (the authors
    do not clip; we do, for reporting); None when no sample parsed — never an invented score.
    aspects: per-aspect means over the parsed samples; texts: every sampled answer; parsed: how
    many of them parsed.
    """
    score: float | None
    aspects: list[float] | None
    texts: list[str]
    parsed: int


def read_visual(path: str, max_pixels: int | None = None):
    """An image file -> RGB image; a video file -> its views [global mosaic, local frames]."""
    import data

    if Path(path).suffix.lower() in data.VIDEO_EXTS:
        import video as video_views  # PyAV is needed for videos only

        return video_views.video_views(path, local_max_pixels=max_pixels or video_views.LOCAL_MAX_PIXELS)
    return data.load_image(path, max_pixels=max_pixels)


@torch.no_grad()
def judge(model, tokenizer, image_processor, visuals: list, *, video: bool = False, samples: int | None = None,
          temperature: float = 1.0, max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 8,
          progress: bool = False, prompt: str | None = None) -> list[Judgement]:
    """Score items with the training prompt and parser.

    visuals: one entry per item: a PIL image, or (video=True) the list of view pictures.
    samples=None: greedy decoding (reproducible); samples=K: K answers sampled at `temperature`
    and averaged. The same seed gives the same numbers.
    """
    from tqdm import tqdm

    num_aspects = len(VIDEO_ASPECTS if video else IMAGE_ASPECTS)
    prompt = prompt or (VIDEO_PROMPT if video else IMAGE_PROMPT)
    max_new_tokens = max_new_tokens or 256
    k = samples or 1
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    results = []
    try:
        for start in tqdm(range(0, len(visuals), batch_size), desc="judging", disable=not progress, leave=False):
            chunk = [v if isinstance(v, (list, tuple)) else [v] for v in visuals[start:start + batch_size]]
            batch = encode_prompts(tokenizer, image_processor, chunk, [prompt] * len(chunk), video=video)
            ids = sample_completions(model, tokenizer, batch, k, temperature=temperature,
                                     max_new_tokens=max_new_tokens, greedy=samples is None)
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            for i in range(len(chunk)):
                answers = texts[i * k:(i + 1) * k]
                parsed = [a for a in (rewards.parse_answer(t, num_aspects) for t in answers) if a is not None]
                if parsed:
                    aspects = np.mean(parsed, axis=0).tolist()
                    score = float(np.clip(np.mean([np.mean(a) for a in parsed]), 1.0, 5.0))
                    results.append(Judgement(score, aspects, answers, len(parsed)))
                else:
                    results.append(Judgement(None, None, answers, 0))
    finally:
        torch.random.set_rng_state(generator_state)
    return results


def score(model, processor, image_or_frames) -> Judgement:
    """Score one image (PIL image or path) or one video (path or list of view pictures).

    processor: the (tokenizer, image_processor) pair that load_model returned, e.g.
    `model, *processor = load_model("tiny")`. Greedy decoding: the same input, the same score.
    """
    tokenizer, image_processor = processor
    visual = read_visual(str(image_or_frames)) if isinstance(image_or_frames, (str, os.PathLike)) else image_or_frames
    is_video = isinstance(visual, (list, tuple))
    return judge(model, tokenizer, image_processor, [visual], video=is_video)[0]


# The source of the preset recipe, read once at import: the code this process runs (a file edited
# later must not rename the cache of what this process builds).
_RECIPE_CODE = "".join(inspect.getsource(f) for f in (
    build_preset, _build_preset, build_tokenizer, _prefetched, _vision_pretraining, _degraded_picture,
    _format_warmup, _random_picture, _random_answer, describe_degradation, severity_bin, neutral_opinion))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Score the visual quality of images and videos with a PreResQ model: prints the score "
                    "(1..5), the aspect scores and the model's reasoning for each file.")
    parser.add_argument("files", nargs="+", help="image or video files")
    parser.add_argument("--model", default="tiny", help="checkpoint folder, hub id or preset (default: tiny)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--samples", type=int, default=None, help="average K sampled answers (default: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    args = parser.parse_args(argv)
    import data

    try:
        model, tokenizer, image_processor = load_model(args.model, args.device, args.dtype)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.files:
        try:
            visual = read_visual(path)
        except data.DataError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        is_video = isinstance(visual, list)
        j = judge(model, tokenizer, image_processor, [visual], video=is_video, samples=args.samples,
                  max_new_tokens=args.max_new_tokens)[0]
        names = VIDEO_ASPECTS if is_video else IMAGE_ASPECTS
        aspects = dict(zip(names, j.aspects)) if j.aspects else None
        if args.json:
            print(json.dumps({"file": path, "score": j.score, "aspects": aspects, "parsed": j.parsed,
                              "answers": j.texts}))
        elif j.score is None:
            print(f"{path}: no parsable answer (the model did not answer in the expected format)\n  {j.texts[0]!r}")
        else:
            print(f"{path}: score {j.score:.2f}  " + "  ".join(f"{k} {v:.2f}" for k, v in aspects.items())
                  + f"\n  {j.texts[0].strip()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
