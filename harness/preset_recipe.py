"""The recipe that builds a laptop preset: its settings, tokenizer, pictures and two short trainings.

    build_preset("tiny", path)     # config, tokenizer, processor, then both trainings (minutes)
    recipe_digest("tiny")          # what presets.py stamps a shipped preset with

The paper starts from Qwen2.5-VL-7B-Instruct, whose vision tower is pretrained and which already
writes the answer format. A preset starts from a config with random weights, so it is given, in
miniature, what such a checkpoint brings:
1. an offline byte-level BPE tokenizer with Qwen's special tokens (build_tokenizer);
2. vision pretraining: the vision tower learns the severity of random generic degradations of
   random pictures (_vision_pretraining), as a pretrained encoder sees blur, noise and compression;
3. a caption and format warm-up (_format_warmup): the model names the degradation it sees and
   writes the answer format with a neutral opinion (neutral_opinion) that carries no information
   about quality, so the preset starts uncorrelated with quality and GRPO has to teach it.
No picture of any dataset and no quality score is shown. Both trainings are ours, not the paper's.
The digest covers the settings, the prompts and the source of the functions below.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from scipy import ndimage
from tqdm import tqdm

from support import files
import preresq
from support import synthetic


# Preset architectures and training budgets. Images in the presets' processor are bounded by
# min/max pixels (patch 14, 2x2 merge: one visual token per 28x28 pixels).
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


def recipe_digest(name: str) -> str:
    """A digest of everything that decides a preset's weights: settings, prompts and the recipe's code."""
    recipe = [PRESETS[name], preresq.IMAGE_PROMPT_POOL, preresq.VIDEO_PROMPT, WARMUP_THOUGHTS, _RECIPE_CODE]
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- tokenizer

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
    for tok in preresq.SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges,
                               additional_special_tokens=list(preresq.SPECIAL_TOKENS[1:]))
    tokenizer.padding_side = "left"
    return tokenizer


# --------------------------------------------------------------------------- captions and opinions

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


# --------------------------------------------------------------------------- building

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

    corpus = ([preresq.render_prompt([1], q) for q in preresq.IMAGE_PROMPT_POOL]
              + [preresq.render_prompt([1] * 4, preresq.VIDEO_PROMPT, video=True)])
    captions = [describe_degradation(None, 0.0)] + [describe_degradation(k, (i + 0.5) / len(SEVERITY_WORDS))
                                                     for k in range(len(DEGRADATION_NAMES))
                                                     for i in range(len(SEVERITY_WORDS))]
    corpus += [_random_answer(rng, 5, False, captions[i % len(captions)]) for i in range(200)]
    corpus += [_random_answer(rng, 2, True) for _ in range(50)]
    tokenizer = build_tokenizer(corpus)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in preresq.SPECIAL_TOKENS}
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
    with files.atomic_folder(path) as tmp:  # another process that built it first wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)


# --------------------------------------------------------------------------- pictures

def _random_picture(rng: np.random.Generator) -> Image.Image:
    """A random unlabelled picture for the preset's pretraining: a procedural landscape
    (synthetic.landscape, the generator of the synthetic sets, here with its own random stream) of
    random size, 84..168 px a side."""
    w, h = (int(rng.integers(3, 7)) * 28 for _ in range(2))
    return synthetic.landscape(rng, w, h)


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
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(make) if n else None
        for i in range(n):
            item = pending.result()
            pending = pool.submit(make) if i + 1 < n else None
            yield item


# --------------------------------------------------------------------------- the two trainings

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


def _warmup_batch(tokenizer, image_processor, rng, batch: int):
    """One warm-up batch: (PromptBatch, completion ids (B, C), completion mask (B, C)).

    A fifth of the batches are videos (four random pictures, a random well-formed answer); the
    rest are degraded pictures under a random paraphrase of the prompt, answered with the
    caption of what was done to them and the preset's neutral opinion.
    """
    visuals, prompts, answers, video = [], [], [], rng.random() < 0.2
    for _ in range(batch):
        if video:
            visuals.append([_random_picture(rng) for _ in range(4)])
            prompts.append(preresq.VIDEO_PROMPT)
        else:
            picture, kind, severity = _degraded_picture(rng)
            visuals.append([picture])
            prompts.append(preresq.IMAGE_PROMPT_POOL[int(rng.integers(len(preresq.IMAGE_PROMPT_POOL)))])
        answers.append(_random_answer(rng, 2, True) if video else
                       _random_answer(rng, 5, False, describe_degradation(kind, severity),
                                      neutral_opinion(kind, severity)))
    prompt = preresq.encode_prompts(tokenizer, image_processor, visuals, prompts, video=video)
    end = tokenizer.convert_tokens_to_ids(preresq.END_OF_TURN)
    comp = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end] for a in answers]
    width = max(map(len, comp))
    pad = tokenizer.pad_token_id
    comp_ids = torch.tensor([c + [pad] * (width - len(c)) for c in comp])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in comp])
    return prompt, comp_ids, mask


def _format_warmup(model, tokenizer, image_processor, rng, steps: int, lr: float, batch: int = 8) -> None:
    """Supervised warm-up on (random degraded picture, prompt) -> caption, then scores.

    What a real VLM brings from its pretraining, in miniature: it reads its visual tokens (the
    reasoning names the degradation it sees and how strong it is: describe_degradation) and it
    writes the answer format. The scores are the preset's neutral_opinion of what it saw:
    they depend on the picture but carry no information about its quality, so the preset starts
    with no correlation between its scores and quality; tying them to quality is left to GRPO.
    The adapter (merger) and the language model train; the rest of the vision tower stays as
    _vision_pretraining left it. Loss: the mean negative log-likelihood of the answer tokens.
    """
    language = [p for n, p in model.named_parameters()
                if not n.startswith("model.visual.") or n.startswith("model.visual.merger.")]
    opt = torch.optim.AdamW(language, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    suppressed = preresq.suppressed_ids(tokenizer)
    batches = _prefetched(lambda: _warmup_batch(tokenizer, image_processor, rng, batch), steps)
    for prompt, comp_ids, mask in tqdm(batches, total=steps, desc="format warm-up", leave=False):
        logp = _answer_logprobs(model, prompt, comp_ids, mask, suppressed)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


def _answer_logprobs(model, prompt, comp_ids, mask, suppressed: list[int]) -> torch.Tensor:
    """(B, C) log-probs of the answers, 0 after each end: the model's own forward over each prompt
    joined with its answer, the vision tower once per picture (what the shipped presets were built
    with; GRPO's completion_logprobs gets the same numbers by another route)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids = torch.cat([prompt.input_ids, comp_ids], 1)
    features = model.model.get_image_features(prompt.pixel_values, prompt.image_grid_thw, return_dict=True)
    attention = torch.cat([prompt.attention_mask, mask.to(prompt.attention_mask)], 1)
    hidden = model.model(input_ids=ids, attention_mask=attention,
                         image_grid_thw=prompt.image_grid_thw, mm_token_type_ids=preresq.mm_token_type_ids(model, ids),
                         mm_encoder_outputs={"image": BaseModelOutputWithPooling(
                             pooler_output=tuple(features.pooler_output))}).last_hidden_state
    keep = mask.bool()
    logp = preresq.selective_log_softmax(hidden[:, -comp_ids.shape[1] - 1:-1], model.lm_head,
                                         comp_ids.masked_fill(~keep, 0), 1.0, suppressed)
    return logp.masked_fill(~keep, 0.0)


# The source of the preset recipe, read once at import: the code this process runs (a file edited
# later must not rename the cache of what this process builds).
_RECIPE_CODE = "".join(inspect.getsource(f) for f in (
    build_preset, _build_preset, build_tokenizer, _prefetched, _vision_pretraining, _degraded_picture,
    _warmup_batch, _format_warmup, _answer_logprobs, _random_picture, _random_answer, describe_degradation,
    severity_bin, neutral_opinion))
