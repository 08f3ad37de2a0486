"""PreResQ-R1, the model side: the judge Qwen2.5-VL that GRPO trains, and how it is asked and answers.

Paper: arXiv 2511.05393 (PreResQ-R1). A GRPO step shows the policy a picture with the quality
prompt, samples G answers ("<think>...</think><answer>five aspect scores</answer>"), rewards
them (rewards.py) and updates the policy on the per-token log-probs of what it sampled. The policy's
side of that loop is one object, Policy (load, prompts, sample, logprobs), built on: load_model,
encode_prompts (B left-padded prompts with their pictures), cache_prompts (each prompt's forward
once, for all G answers), sample_completions (every sampling setting explicit), completion_mask and
completion_logprobs (log pi_theta(o_t | q, o_<t) of the distribution sampled from). Inference:
judge / score (the parsed aspect scores and their mean, the quality score).
`python preresq.py FILE... --model FOLDER` scores image and video files (--model takes a preset name,
as grpo.py and evaluate.py do; the default is the untrained laptop preset `tiny`, models/tiny).
Imported, this file needs only rewards.py and support/prompt_sharing.py.

Traps avoided, each of which silently changes what is trained:
- Sampling passes a complete GenerationConfig (do_sample, temperature, top_k=0, top_p=1,
  repetition_penalty=1): Qwen's shipped generation_config.json has top_k=1 (all G samples
  identical) and a repetition penalty (a sampled distribution other than the one scored).
- Special and vision tokens are suppressed while sampling and excluded from the log-softmax
  normalisation, so recomputed log-probs equal the sampled distribution's.
- `mm_token_type_ids` is passed to every forward; without it Qwen2.5-VL silently falls back to
  1-D positions instead of its 3-D M-RoPE.
- Log-probs use hidden states of completion positions only and a row-chunked log-softmax, never
  a full-vocabulary float32 log-softmax of the whole batch (which would not fit in memory).
- A shared prompt: each prompt (pictures included: the vision tower once per picture) runs once
  for its G answers (support/prompt_sharing.py; exact: attention is causal), with the answers'
  M-RoPE positions passed explicitly, never left to the model's `rope_deltas` from another batch.
- Inference never invents a score: an unparsable answer is reported as unparsed.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import rewards
from support import prompt_sharing

IMAGE_ASPECTS = ("saturation", "granularity", "sharpness", "foreground", "background")
VIDEO_ASPECTS = ("global", "local")

IMAGE_PROMPT = (
    "Describe the quality of this image in five parts: saturation, granularity (noise and grain), sharpness, "
    "foreground and background. Rate each part with a float between 1 and 5 with two decimals (1 = very poor, 5 = "
    "excellent). Think inside <think> </think>, then give the five ratings, one per line, inside <answer> "
    "</answer>."
)
# Stage 1 of the Exploration-to-Stability schedule draws each image's prompt from this pool: the
# paper's framework figure shows several prompts in stage 1 and one in stage 2. The wording is this
# project's, as is IMAGE_PROMPT's (the authors' training script holds a pool of five, unused); stage 2
# and inference use IMAGE_PROMPT.
IMAGE_PROMPT_POOL = (
    IMAGE_PROMPT,
    "Judge this picture's quality in five aspects: saturation, granularity (noise, grain), sharpness, foreground "
    "and background. Give each a float from 1 (very poor) to 5 (excellent) with two decimals. Reason inside "
    "<think> </think> and put the five scores, one per line, inside <answer> </answer>.",
    "How good is this image? Assess saturation, granularity (noise and grain), sharpness, foreground and "
    "background, each as a number between 1 and 5 with two decimals, where 1 is very poor and 5 is excellent. "
    "Write your reasoning in <think> </think> and the five numbers, one per line, in <answer> </answer>.",
    "Rate the visual quality of the picture on five aspects (saturation, granularity, sharpness, foreground, "
    "background) with floats between 1 and 5, two decimals each (1 = very poor, 5 = excellent). First think in "
    "<think> </think>; then answer with the five scores, one per line, in <answer> </answer>.",
    "Look at this image and score its quality: saturation, granularity (noise and grain), sharpness, foreground "
    "and background, each from 1 (very poor) to 5 (excellent) with two decimals. Think step by step inside <think> "
    "</think>, then list the five scores, one per line, inside <answer> </answer>.",
)
VIDEO_PROMPT = (
    "The first picture is a global multiframe picture: frames sampled across the whole video, in time order. The "
    "other pictures are local single frame pictures from different moments. Rate the video's quality in two parts: "
    "a global score (motion, stutter, temporal consistency) and a local score (sharpness, noise, compression), "
    "each a float between 1 and 5 with two decimals (1 = very poor, 5 = excellent). Think inside <think> </think>, "
    "then give the two scores, one per line, inside <answer> </answer>."
)
VIDEO_LABELS = ("global multiframe picture:", "local single frame picture:")

SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen's special tokens (same strings as the real tokenizer), and the ones never to be sampled.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
END_OF_TURN = "<|im_end|>"
SUPPRESSED_TOKENS = tuple(t for t in SPECIAL_TOKENS if t != END_OF_TURN)  # all but the end of the answer
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# --------------------------------------------------------------------------- loading

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what to do. The tools exit 2 (support.cli)."""
    exit_status = 2


def locate_model(path_or_hub_id: str) -> str:
    """The folder load_model reads: a local checkpoint folder, a laptop preset shipped in models/ (by its
    name), or a hub id's local snapshot (hub_snapshot), checked by check_model_folder. Raises
    ModelLoadError saying what to do; loads nothing."""
    path, shipped = Path(path_or_hub_id).expanduser(), Path(__file__).resolve().parent / "models" / path_or_hub_id
    path = shipped if not path.exists() and (shipped / "config.json").exists() else path
    if not path.exists() and "/" not in str(path_or_hub_id):  # a hub id is owner/name
        raise ModelLoadError(f"{path_or_hub_id!r} is neither a folder nor a hub id (owner/name); a laptop preset's "
                             f"folder is printed by `python -m harness.presets NAME`.")
    folder = Path(path if path.exists() else hub_snapshot(str(path_or_hub_id)))
    check_model_folder(folder)
    return str(folder)


# What from_pretrained reads besides config.json (one of each): without tokenizer.json a tokenizer of the
# special tokens alone loads, and a run fails deep inside.
MODEL_FILES = (("model.safetensors", "model.safetensors.index.json"), ("tokenizer.json",), ("tokenizer_config.json",),
               ("preprocessor_config.json",))


def check_model_folder(path: Path) -> None:
    """ModelLoadError, before anything loads, unless `path` holds a whole Qwen2.5-VL checkpoint."""
    if (path / "final").is_dir() or (path / "metrics.jsonl").exists() or any(path.glob("checkpoint-*")):
        raise ModelLoadError(f"{path}: this is a run folder; its model is {path / 'final'}" + ("" if (
            path / "final").is_dir() else f" once the run has ended (continue it: grpo.py --out {path} --resume)"))
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json. Give a folder written by "
                             "save_pretrained (e.g. runs/.../final), a preset or a hub id.")
    try:
        config = json.loads((path / "config.json").read_text())
        kind, vision = config.get("model_type"), "vision_config" in config
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is not a model's config ({e}); re-save or re-download "
                             "the model.") from None
    if kind not in ("qwen2_5_vl", "qwen2_vl"):
        raise ModelLoadError(f"{path}: {'not a Qwen2.5-VL model' if vision else 'this is not a vision-language model'}"
                             f" (Qwen2.5-VL expected); its config.json gives model_type {kind!r}.")
    missing = [" or ".join(names) for names in MODEL_FILES if not any((path / n).exists() for n in names)]
    if missing:
        raise ModelLoadError(f"{path} lacks {', '.join(missing)}: the model is incomplete. Copy the whole folder, "
                             "or re-save or re-download it.")


def hub_snapshot(name: str) -> str:
    """The local folder of hub model `name` (e.g. "Qwen/Qwen2.5-VL-7B-Instruct"): the local hub cache's
    copy, else a download, tried only when HF_HUB_OFFLINE is not set and the hub answers within 3 s
    (an offline machine gets this message at once instead of minutes of retries)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError
        pass
    advice = (f"Download it first (`hf download {name}` on a machine with network) or pass a local folder "
              "with --model; a laptop preset needs no download: --model tiny.")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"model {name!r} is not in the local hub cache and HF_HUB_OFFLINE is set. {advice}")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise ModelLoadError(f"model {name!r} is not in the local hub cache and the hub cannot be reached. "
                             f"{advice}") from None
    try:
        return snapshot_download(name)
    except Exception as e:  # network errors come in many types; all end the same way
        raise ModelLoadError(f"could not download {name!r}: {e}. {advice}") from e


def load_model(path_or_hub_id: str, device: str | None = None, dtype: torch.dtype | str | None = None):
    """Load a Qwen2.5-VL checkpoint -> (model, tokenizer, image_processor), model in eval mode.

    path_or_hub_id: a local checkpoint folder (one written by save_pretrained: a run's `final`,
    a laptop preset's presets.model_path(name)), or a Hugging Face hub id (hub_snapshot).
    Every case ends in `from_pretrained` on a folder. dtype: a torch dtype or a DTYPES name;
    default bfloat16 on CUDA, else float32.
    """
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    device = device or default_device()
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or default_dtype(device)
    source = locate_model(path_or_hub_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # The PIL image processor, not AutoImageProcessor's default: no torchvision is needed.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(source)
        model, info = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError for a damaged file, ...
        raise ModelLoadError(f"could not load a Qwen2.5-VL model from {source}: {type(e).__name__}: {e}. "
                             "Check that the folder is complete (re-download or re-save it).") from e
    missing = sorted(info["missing_keys"])  # transformers would leave them random, and answers with them
    if missing:
        raise ModelLoadError(f"{source}: {len(missing)} weights of the model are missing from its checkpoint "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); it would answer at "
                             "random. Re-save or re-download the folder, or check that it is the model's.")
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer, image_processor


# --------------------------------------------------------------------------- prompts

def picture_label(k: int, video: bool) -> str:
    """The text before picture k (from 0) of a prompt: a video view's label, nothing for an image."""
    if not video:
        return ""
    return VIDEO_LABELS[0] if k == 0 else f"{VIDEO_LABELS[1][:-1]} {k}:"


def render_prompt(images_per_visual: list[int], prompt: str, video: bool = False, labels=None) -> str:
    """One user turn in Qwen's chat format, pictures first, `<|image_pad|>` repeated per picture.

    images_per_visual: visual tokens of each picture of this prompt (a video's views are several
    pictures, each preceded by its label, as in the authors' data flow). labels(k, video): the text
    before picture k (default `picture_label`).
    """
    parts = []
    for k, n in enumerate(images_per_visual):
        parts.append((labels or picture_label)(k, video))
        parts.append("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>")
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
            + "".join(parts) + prompt + "<|im_end|>\n<|im_start|>assistant\n")


@dataclass
class PromptBatch:
    """B prompts, left-padded, with their pictures. input_ids, attention_mask: (B, P).
    pixel_values: (sum of patches, C*T*14*14), pictures in prompt order. image_grid_thw:
    (num_pictures, 3). pictures_per_prompt: B ints (1 for an image, 1+K for a video's views)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    pictures_per_prompt: list[int] = field(default_factory=list)

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.pixel_values.to(device), self.image_grid_thw.to(device), self.pictures_per_prompt)


def encode_prompts(tokenizer, image_processor, visuals: list[list[Image.Image]], prompts: list[str],
                   video: bool = False, labels=None) -> PromptBatch:
    """Tokenise B prompts with their pictures (each entry of `visuals` is a list of pictures);
    labels as in render_prompt."""
    flat = [img for pics in visuals for img in pics]
    enc = image_processor(images=flat, return_tensors="pt")
    merge = image_processor.merge_size ** 2
    tokens = (enc["image_grid_thw"].prod(-1) // merge).tolist()
    texts, k = [], 0
    for pics, prompt in zip(visuals, prompts):
        texts.append(render_prompt(tokens[k:k + len(pics)], prompt, video=video, labels=labels))
        k += len(pics)
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return PromptBatch(batch["input_ids"], batch["attention_mask"], enc["pixel_values"], enc["image_grid_thw"],
                       [len(p) for p in visuals])


def mm_token_type_ids(model, input_ids: torch.Tensor) -> torch.Tensor:
    """0 for text, 1 for image placeholder tokens: what selects Qwen2.5-VL's 3-D M-RoPE."""
    return (input_ids == model.config.image_token_id).int()


# --------------------------------------------------------------------------- sampling

def suppressed_ids(tokenizer) -> list[int]:
    """Ids of the special and vision tokens that must never be sampled."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in SUPPRESSED_TOKENS if t in vocab)


def sampling_config(tokenizer, *, num_generations: int = 1, temperature: float = 1.0, max_new_tokens: int = 256,
                    greedy: bool = False, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0):
    """A complete GenerationConfig, so nothing comes from the checkpoint's generation_config.json.

    top_k: sample among the k likeliest tokens; 0 (default): the whole distribution. Training keeps
    0, top_p 1 and no repetition penalty: GRPO's log-probs (completion_logprobs) are of the
    untruncated softmax, which a truncated or penalised sampler does not draw from. The authors'
    inference script passes top_k=50 and top_p=1 and takes the rest from the checkpoint
    (evaluate.py --protocol authors). top_k and top_p are ignored when greedy.
    """
    from transformers import GenerationConfig

    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or a positive number of tokens, got {top_k}")
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    common = dict(num_return_sequences=num_generations, max_new_tokens=max_new_tokens, eos_token_id=end,
                  pad_token_id=tokenizer.pad_token_id, suppress_tokens=suppressed_ids(tokenizer),
                  repetition_penalty=repetition_penalty, no_repeat_ngram_size=0, use_cache=True)
    if greedy:
        return GenerationConfig(do_sample=False, top_k=None, top_p=None, temperature=None, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=None, **common)


def cache_prompts(model, prompts: PromptBatch) -> prompt_sharing.PromptCache:
    """The B prompts' forward, once, pictures included -> their keys and values, which all G answers
    of a prompt continue (support/prompt_sharing.py). With gradients when enabled: every answer's
    loss reaches it."""
    prompts = prompts.to(model.device)
    return prompt_sharing.prefill(model, prompts.input_ids, prompts.attention_mask, prompts.image_grid_thw,
                                  mm_token_type_ids(model, prompts.input_ids), pixel_values=prompts.pixel_values)


@torch.no_grad()
def sample_completions(model, tokenizer, batch: PromptBatch, num_generations: int, *, temperature: float = 1.0,
                       max_new_tokens: int = 256, greedy: bool = False, top_k: int = 0, top_p: float = 1.0,
                       repetition_penalty: float = 1.0, all_finished=None) -> torch.Tensor:
    """Sample G completions per prompt -> (B*G, C) token ids (rows grouped by prompt; pad after the end).
    Settings as in sampling_config (top_k=0: the whole distribution, as GRPO needs). Each prompt runs
    once and its G answers continue it (prompt_sharing.sample: generate's choices and random draws).
    A top_p or repetition penalty, which prompt_sharing.sample does not apply (only evaluate.py
    --protocol authors asks for them), goes to transformers' generate, which runs each prompt G times.
    all_finished: Policy.all_finished of a sharded policy, whose processes sample in step."""
    config = sampling_config(tokenizer, num_generations=num_generations, temperature=temperature,
                             max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty)
    if top_p == 1.0 and repetition_penalty == 1.0:
        return prompt_sharing.sample(model, cache_prompts(model, batch), config, all_finished)
    batch = batch.to(model.device)
    out = model.generate(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw, mm_token_type_ids=mm_token_type_ids(model, batch.input_ids),
        generation_config=config)
    return out[:, batch.input_ids.shape[1]:]


def completion_mask(completion_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """(N, C) -> (N, C) long: 1 up to and including the first end-of-turn token, 0 after it."""
    is_end = completion_ids == end_id
    after_end = (is_end.cumsum(1) - is_end.long()) > 0
    return (~after_end).long()


def reasoning_mask(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, close: str = "</think>") -> torch.Tensor:
    """(N, C) -> (N, C) bool: the reasoning tokens, from the first up to the one that completes
    `close`; all False in a row that never closes its reasoning. For grpo.py's --reasoning-beta
    (a KL coefficient of their own; the `tiny` preset's default, not the paper's).

    Byte-level tokens spell ASCII as itself, so the boundary is found in the joined token strings.
    """
    out = torch.zeros_like(mask, dtype=torch.bool)
    for i, row in enumerate(completion_ids.tolist()):
        pieces = tokenizer.convert_ids_to_tokens(row[:int(mask[i].sum())])
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
    normalisation, exactly as the sampler excluded them. Rows are processed `chunk_rows` at a time;
    under autograd each chunk is checkpointed, so its (chunk_rows, C, V) logits are recomputed in the
    backward instead of every chunk's being kept until then (the same numbers: the same operations).
    """
    def chunk(h, t):
        logits = lm_head(h).float() / temperature
        if suppressed:
            logits[..., suppressed] = float("-inf")
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    return torch.cat([checkpoint(chunk, h, t, use_reentrant=False) if graph else chunk(h, t)
                      for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows))])


def completion_logprobs(model, cache: prompt_sharing.PromptCache, completion_ids: torch.Tensor,
                        completion_attention: torch.Tensor, *, temperature: float, num_generations: int,
                        suppressed: list[int], rows: slice | None = None) -> torch.Tensor:
    """Per-token log-probs log pi_theta(o_t | q, o_<t) of completions at the sampling temperature.

    cache: the B prompts after cache_prompts (not repeated); completion_ids, completion_attention:
    (B*G, C) with rows grouped by prompt, or only the rows `rows` of that layout (micro-batching).
    Each row runs against its prompt's keys and values. suppressed: the token ids the sampler
    suppressed (suppressed_ids(tokenizer)). Returns (rows, C) float32, 0 at positions after the end.
    """
    g = num_generations
    prompt_of_row = [r // g for r in range(cache.last_hidden.shape[0] * g)[rows or slice(None)]]
    hidden = prompt_sharing.completion_hidden(model, cache, prompt_of_row, completion_ids, completion_attention)
    # Padding after the end is a suppressed token (log-prob -inf): score a harmless token there
    # and zero it, so that masked positions can never turn a sum into NaN.
    keep = completion_attention.bool()
    targets = completion_ids.masked_fill(~keep, 0)
    logp = selective_log_softmax(hidden, model.lm_head, targets, temperature, suppressed)
    return logp.masked_fill(~keep, 0.0)


# --------------------------------------------------------------------------- the policy: GRPO's model side

@dataclass
class Answers:
    """G sampled answers to each of B prompts, rows grouped by prompt. ids, mask: (B*G, C), the mask 1
    up to and including the end-of-turn token; texts: the B*G answers decoded."""
    ids: torch.Tensor
    mask: torch.Tensor
    texts: list[str]
    num_generations: int


class Policy:
    """The model side of GRPO as one object: the judge (a Qwen2.5-VL), its tokenizer and image processor.
    Its methods are what a step asks of a model, in order: prompts (B prompts with their pictures),
    sample (G answers to each), logprobs (log pi(o_t | q, o_<t) without gradient: the reference's, or
    the old policy's when mu > 1) and logprobs_for_backward (the same, a micro-batch at a time, for the
    loss). Each call runs a prompt once for its G answers (support/prompt_sharing.py), and a backward
    carries its gradient back once. Kinds of this object change `run`, the way a pass enters the model
    (the LoRA reference: adapters off; a sharded model: its FSDP root), and `all_finished`. Another
    model family: another object with these methods."""

    def __init__(self, model, tokenizer, image_processor):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.suppressed = suppressed_ids(tokenizer)  # never sampled, and left out of every log-softmax

    def run(self, fn, *args, **kwargs):
        """One pass of the model: fn(model, *args, **kwargs)."""
        return fn(self.model, *args, **kwargs)

    def all_finished(self, finished: bool) -> bool:  # every process's sampling, as one process sees it
        return finished

    def prompts(self, visuals: list[list[Image.Image]], questions: list[str], video: bool = False) -> PromptBatch:
        return encode_prompts(self.tokenizer, self.image_processor, visuals, questions, video=video)

    def sample(self, prompts: PromptBatch, num_generations: int, *, temperature: float, max_new_tokens: int,
               top_k: int = 0) -> Answers:
        """G answers to each prompt at the temperature, from the whole distribution (top_k 0), in eval mode."""
        self.model.eval()
        ids = self.run(sample_completions, self.tokenizer, prompts, num_generations, temperature=temperature,
                       max_new_tokens=max_new_tokens, top_k=top_k, all_finished=self.all_finished)
        mask = completion_mask(ids, self.tokenizer.convert_tokens_to_ids(END_OF_TURN))
        return Answers(ids, mask, self.tokenizer.batch_decode(ids, skip_special_tokens=True), num_generations)

    @torch.no_grad()
    def logprobs(self, prompts: PromptBatch, answers: Answers, *, temperature: float,
                 micro_batch_size: int | None = None) -> torch.Tensor:
        """(B*G, C) log-probs of the answers, on their device (the model may be on another)."""
        device = next(self.model.parameters()).device
        ids, mask = answers.ids.to(device), answers.mask.to(device)
        cache = self.run(cache_prompts, prompts)
        out = [self.run(completion_logprobs, cache, ids[r], mask[r], temperature=temperature,
                        num_generations=answers.num_generations, suppressed=self.suppressed, rows=r)
               for r in micro_batches(ids.shape[0], micro_batch_size)]
        return torch.cat(out).to(answers.ids.device)

    def logprobs_for_backward(self, prompts: PromptBatch, answers: Answers, *, temperature: float,
                              micro_batch_size: int | None = None):
        """Yields (rows, log-probs (rows, C) with their graph) in micro-batches, in train mode: call
        backward on each micro-batch's loss before taking the next. The prompts' forward runs once
        with gradients; each micro-batch back-propagates into detached copies of its keys and values,
        and after the last one their summed gradients go through the prompts' forward once
        (prompt_sharing.backward): exactly one full-batch backward. Run the loop to its end."""
        self.model.train()
        cache = self.run(cache_prompts, prompts)
        leaves = prompt_sharing.detached(cache)
        for r in micro_batches(answers.ids.shape[0], micro_batch_size):
            yield r, self.run(completion_logprobs, leaves, answers.ids[r], answers.mask[r], temperature=temperature,
                              num_generations=answers.num_generations, suppressed=self.suppressed, rows=r)
        prompt_sharing.backward(cache, leaves)


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Row slices of at most `size` (all n rows when size is None)."""
    size = size or n
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


# --------------------------------------------------------------------------- inference

@dataclass
class Judgement:
    """The model's verdict on one item. score: the mean over parsed samples of their mean aspect score, to
    9 decimals, clipped to [1, 5] for reporting (the authors do not clip); None when no sample parsed, never
    an invented score. aspects: per-aspect means over parsed samples; texts: every answer; parsed: how many."""
    score: float | None
    aspects: list[float] | None
    texts: list[str]
    parsed: int


def _judgement(answers: list[str], num_aspects: int) -> Judgement:
    parsed = [a for a in (rewards.parse_answer(t, num_aspects) for t in answers) if a is not None]
    if not parsed:
        return Judgement(None, None, answers, 0)
    # to the reward's decimals, so that answers whose means are equal in decimals tie in SRCC too
    score = float(np.clip(round(np.mean([np.mean(a) for a in parsed]), rewards.PREDICTION_DECIMALS), 1.0, 5.0))
    return Judgement(score, np.mean(parsed, axis=0).tolist(), answers, len(parsed))


@torch.no_grad()
def judge(model, tokenizer, image_processor, visuals: list, *, video: bool = False, samples: int | None = None,
          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
          max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 8, progress: bool = False,
          prompt: str | None = None, labels=None, all_finished=None) -> list[Judgement]:
    """Score items with the training prompt and parser -> one Judgement per item.

    visuals: one entry per item: a PIL image, or (video=True) the list of view pictures.
    samples=None: greedy decoding (reproducible); samples=K: K answers sampled at `temperature`,
    `top_k` (0: the whole distribution, as in training), `top_p` and `repetition_penalty` (see
    sampling_config), averaged. Answers have at most max_new_tokens (default 256) tokens. prompt,
    labels: another instruction and picture labels (render_prompt); all_finished as in sample_completions.
    The same seed gives the same numbers.
    """
    num_aspects = len(VIDEO_ASPECTS if video else IMAGE_ASPECTS)
    prompt = prompt or (VIDEO_PROMPT if video else IMAGE_PROMPT)
    k = samples or 1
    results = []
    with torch.random.fork_rng(devices=[]):  # the caller's CPU random stream is left as it was
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(visuals), batch_size), desc="judging", leave=False,
                          **({} if progress else {"disable": True})):  # tqdm reads TQDM_DISABLE without disable=
            chunk = [v if isinstance(v, (list, tuple)) else [v] for v in visuals[start:start + batch_size]]
            batch = encode_prompts(tokenizer, image_processor, chunk, [prompt] * len(chunk), video=video, labels=labels)
            ids = sample_completions(model, tokenizer, batch, k, temperature=temperature, top_k=top_k, top_p=top_p,
                                     repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens or 256,
                                     greedy=samples is None, all_finished=all_finished)
            texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
            results += [_judgement(texts[i * k:(i + 1) * k], num_aspects) for i in range(len(chunk))]
    return results


def score(model, processor, image_or_frames) -> Judgement:
    """Score one image (PIL image or path) or one video (path or list of view pictures), greedily.

    processor: the (tokenizer, image_processor) pair that load_model returned, e.g.
    `model, *processor = load_model("runs/demo/final")`."""
    tokenizer, image_processor = processor
    visual = image_or_frames
    if isinstance(image_or_frames, (str, os.PathLike)):
        from data import read_visual  # a file: an image, or a video's views (video.py)

        visual = read_visual(str(image_or_frames))
    return judge(model, tokenizer, image_processor, [visual], video=isinstance(visual, (list, tuple)))[0]


def score_files(argv=None) -> int:
    import data
    from harness import reports
    from support import cli

    p = cli.parser("preresq.py", "Score the quality of images and videos with a PreResQ model: the score "
                   "(1..5), the aspect scores and the reasoning of each file.")
    p.add_argument("files", nargs="+", help="image or video files")
    cli.add_model_flags(p, "preset (tiny, small), checkpoint folder (e.g. runs/<run>/final) or hub id", "tiny")
    p.add_argument("--samples", type=int, help="average K sampled answers (default: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: all of them")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    p.add_argument("--max-pixels", type=int, help="downscale larger images to this many pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled answers")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    args = p.parse_args(argv)
    cli.at_least(p, args, samples=1, top_k=0, max_new_tokens=1, max_pixels=1)
    warn = cli.Warnings("preresq.py")
    files = cli.readable(args.files, data.check_readable, warn)  # in seconds, before a model loads in minutes
    cli.check_device(args.device)
    source = locate_model(args.model)
    print(f"model: {args.model}" + (f" (from {source})" if source != args.model else ""), file=sys.stderr)
    model, tokenizer, image_processor = load_model(source, args.device, args.dtype)
    for path in files:
        try:
            visual = data.read_visual(path, max_pixels=args.max_pixels)
        except data.DataError as e:  # a header that opened over a damaged body
            warn(f"skipped: {e}")
            continue
        video = isinstance(visual, list)
        j = judge(model, tokenizer, image_processor, [visual], video=video, samples=args.samples,
                  top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed)[0]
        print(reports.judgement_text(path, j, VIDEO_ASPECTS if video else IMAGE_ASPECTS, args.json))
    warn.summary("files not scored")
    return 1 if warn.total else 0


def main(argv=None) -> int:
    """`python preresq.py FILE... [--model M]`: exit 0 when every file was scored, 1 when some could
    not be (each is warned about), 2 for bad usage or input (no model is loaded), 130 on Ctrl-C."""
    from support.cli import entry

    return entry("preresq.py", score_files, argv)


if __name__ == "__main__":
    sys.exit(main())
