"""The models the step bench runs (`bench.py step --model`): the published Qwen2.5-VL-3B/7B shapes with
random weights, WordTokenizer standing in for Qwen's tokenizer (not available offline), the presets'
architectures without their warm-up, or a checkpoint folder.

qwen2.5-vl-3b / qwen2.5-vl-7b are the published Qwen2.5-VL-3B/7B-Instruct architectures with random
weights (no download), built directly on the GPU. WordTokenizer gives Qwen's real special-token ids
and one id per pre-tokenizer piece (about one BPE token per English word), so prompts have realistic
lengths and exactly one placeholder per visual token; it cannot decode, so the reward scores
unparsed answers (as an untrained model's are anyway). The presets (tiny, small) are built without
their format warm-up: speed depends on the shapes, not on the weights.
"""
from __future__ import annotations

import re
import tempfile
import zlib
from pathlib import Path

import torch

from support import cli

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
