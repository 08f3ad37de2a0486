"""bench.py: the step bench on the tiny shapes, memory peaks, the real Qwen2.5-VL shapes, the video bench."""
import math

import numpy as np
import pytest
import torch

import bench
import preresq


@pytest.fixture()
def fresh_tiny(blank_dir):
    """A private copy of the blank tiny model: the bench steps its optimizer and widens its processor."""
    return preresq.load_model(str(blank_dir), "cpu")


def test_step_bench_times_every_phase_and_trains_only_the_shared_path(fresh_tiny):
    model, tok, ip = fresh_tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lines = []
    s = bench.bench_grpo_step(model, tok, ip, images_per_step=2, num_generations=3, completion_tokens=8,
                              image_size=(84, 56), steps=1, warmup_steps=0, beta=0.04, report=lines.append)
    assert s["visual_tokens"] == (84 // 28) * (56 // 28)
    for key in ("generation", "reference", "reference_naive", "policy", "policy_naive", "optimizer", "step",
                "generation_tokens_per_s", "step_tokens_per_s", "peak_bytes", "peak_bytes_naive",
                "reference_speedup", "policy_speedup", "prompt_tokens"):
        assert s[key] > 0, key
    st = s["steps"][0]
    assert s["step"] == pytest.approx(st.generation + st.reference + st.policy + st.optimizer)
    assert s["step_tokens_per_s"] == pytest.approx(2 * 3 * 8 / s["step"])
    assert s["policy_speedup"] == pytest.approx(st.policy_naive / st.policy)
    assert 1 <= st.generated_tokens <= 2 * 3 * 8
    # the peak covers at least the weights that are resident
    assert s["peak_bytes"] > sum(p.numel() * p.element_size() for p in model.parameters())
    assert any("shared prefix" in line and "faster" in line for line in lines)
    assert s["generation_naive"] > 0 and s["step_ratio"] == pytest.approx(s["step"] / s["step_naive"])
    # one optimizer step per timed step: the weights moved, and no gradient is left behind
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_step_bench_without_kl_skips_the_reference_pass(fresh_tiny):
    model, tok, ip = fresh_tiny
    lines = []
    s = bench.bench_grpo_step(model, tok, ip, images_per_step=1, num_generations=2, completion_tokens=8,
                              image_size=(56, 56), steps=1, warmup_steps=0, beta=0.0, report=lines.append)
    assert s["reference"] == 0 and s["reference_naive"] == 0 and s["reference_speedup"] is None
    assert s["policy"] > 0 and any("skipped (beta = 0)" in line for line in lines)


def test_step_bench_with_lora_trains_only_the_adapters_and_compares_with_full_fine_tuning(fresh_tiny):
    import lora

    model, tok, ip = fresh_tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = bench.bench_grpo_step(model, tok, ip, images_per_step=1, num_generations=2, completion_tokens=8,
                              image_size=(56, 56), steps=1, warmup_steps=1, beta=0.04, lora_rank=4,
                              report=lambda line: None)
    assert s["reference"] > 0 and s["policy"] > 0  # the reference pass: the policy with its adapters off
    adapters = lora.adapter_weights(model)
    total = sum(p.numel() for p in before.values())
    assert s["trained_parameters"] == sum(p.numel() for p in adapters.values()) < 0.2 * total
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # frozen
    assert any(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in lora.layers(model))
    lines = []
    full = {**s, "trained_parameters": 4 * s["trained_parameters"], "step": 2 * s["step"],
            "peak_bytes": 2 * s["peak_bytes"]}
    ratios = bench.compare_lora(s, full, 4, report=lines.append)["ratios"]
    assert ratios["trained_parameters"] == 0.25 and ratios["step"] == 0.5 and ratios["peak_bytes"] == 0.5
    assert "LoRA rank 4 against full fine-tuning" in lines[0] and "= 0.500" in lines[0]


def test_image_processor_is_widened_only_when_the_size_needs_it(fresh_tiny):
    model, tok, ip = fresh_tiny
    limit = ip.size["longest_edge"]  # 224 * 224 for tiny
    side = 28 * (math.isqrt(limit) // 28 + 2)
    lines = []
    s = bench.bench_grpo_step(model, tok, ip, images_per_step=1, num_generations=2, completion_tokens=8,
                              image_size=(side, side), steps=1, warmup_steps=0, beta=0.0, report=lines.append)
    assert s["visual_tokens"] == (side // 28) ** 2
    assert ip.size["longest_edge"] == side * side and "max_pixels raised" in lines[0]


def test_size_for_visual_tokens_gives_at_least_that_many_tokens():
    assert bench.size_for_visual_tokens(529) == (644, 644)  # 23 x 23 tokens
    assert bench.size_for_visual_tokens(500) == (644, 616)  # 23 x 22 = 506
    for n in (1, 7, 256, 500, 1000):
        w, h = bench.size_for_visual_tokens(n)
        assert n <= (w // 28) * (h // 28) < n + max(w, h) // 28


def test_peak_memory_sees_an_allocation_and_resets_between_calls():
    device = torch.device("cpu")
    size = 300 * 2**20
    _, seconds, peak_big = bench._measure(lambda: np.ones(size // 8).sum(), device)
    _, _, peak_small = bench._measure(lambda: None, device)
    assert seconds > 0
    assert peak_big - peak_small > 0.8 * size


@pytest.mark.parametrize("name, published_billions", [("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29)])
def test_real_shapes_have_the_published_parameter_counts(name, published_billions):
    model = bench.qwen_model(name, "meta")
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e9, 2) == published_billions  # the model cards' "Model size"
    text, vision = model.config.text_config, model.config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert vision.out_hidden_size == text.hidden_size and head_dim == 128
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert tied == (name == "qwen2.5-vl-3b")


def test_real_shapes_refuse_the_cpu_with_a_clear_message(capsys):
    assert bench.main(["step", "--model", "qwen2.5-vl-7b", "--device", "cpu"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_word_tokenizer_splits_like_qwens_pre_tokenizer_and_feeds_the_real_prompt_path(blank):
    model, tok, ip = blank
    pre = tok.backend_tokenizer.pre_tokenizer
    for text in (*preresq.IMAGE_PROMPT_POOL, preresq.VIDEO_PROMPT, "Rate it 4.25, isn't it?\n\n  ok"):
        assert len(bench.WordTokenizer.PIECES.findall(text)) == len(pre.pre_tokenize_str(text)), text
    specials = {t: tok.convert_tokens_to_ids(t) for t in preresq.SPECIAL_TOKENS}
    words = bench.WordTokenizer(specials, text_vocab=min(specials.values()))
    for key in ("suppress_tokens", "eos_token_id", "pad_token_id"):
        assert getattr(preresq.sampling_config(words), key) == getattr(preresq.sampling_config(tok), key)
    pics = bench.random_pictures(2, 84, 56)
    real = preresq.encode_prompts(tok, ip, [[p] for p in pics], [preresq.IMAGE_PROMPT] * 2)
    stand_in = preresq.encode_prompts(words, ip, [[p] for p in pics], [preresq.IMAGE_PROMPT] * 2)
    for s in specials.values():
        assert ((real.input_ids == s).sum(1) == (stand_in.input_ids == s).sum(1)).all()
    comp = torch.randint(0, min(specials.values()), (4, 5))
    logp = preresq.completion_logprobs(model, stand_in, comp, torch.ones_like(comp), temperature=1.0,
                                       num_generations=2, suppressed=preresq.suppressed_ids(words))
    assert logp.shape == (4, 5) and torch.isfinite(logp).all()


def test_video_bench_decodes_a_written_clip(capsys):
    args = bench.parse_args(["video", "--seconds", "1", "--size", "160x90", "--repeats", "1"])
    result = args.run(args)
    assert result["seconds_per_clip"] > 0 and result["num_frames"] == 25
    assert "per clip" in capsys.readouterr().out


def test_bad_picture_size_is_refused_before_any_work():
    with pytest.raises(SystemExit):
        bench.main(["step", "--image-size", "448"])
    with pytest.raises(SystemExit):
        bench.main(["step", "--B", "0"])
    with pytest.raises(SystemExit):
        bench.main(["step", "--images-per-step", "0"])


def test_old_flag_spellings_are_hidden_aliases_of_the_new_ones():
    old = bench.parse_args(["step", "--B", "2", "--G", "4", "--completion-tokens", "16", "--dtype", "bf16"])
    new = bench.parse_args(["step", "--images-per-step", "2", "--num-generations", "4", "--max-new-tokens", "16",
                            "--dtype", "bfloat16"])
    assert vars(old) == vars(new)
    assert (new.images_per_step, new.num_generations, new.max_new_tokens, new.image_size) == (2, 4, 16, (448, 448))
    rewards = bench.parse_args(["rewards", "--B", "3"])
    assert (rewards.images_per_step, rewards.num_generations) == (3, 12)
    step_help = bench.make_parser()._subparsers._group_actions[0].choices["step"].format_help()
    assert "--images-per-step" in step_help and "--B" not in step_help and "--completion-tokens" not in step_help


def test_real_shape_path_runs_end_to_end_at_reduced_width(monkeypatch):
    """The CUDA-only path (Qwen's ids and vocabulary, WordTokenizer, Qwen's processor) on a narrow CPU copy."""
    narrow = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                  num_key_value_heads=1)  # head_dim stays 128, as mrope_section [16, 24, 24] needs
    monkeypatch.setitem(bench.QWEN_SHAPES, "qwen2.5-vl-3b", {**bench.QWEN_SHAPES["qwen2.5-vl-3b"], **narrow})
    monkeypatch.setattr(bench, "QWEN_VISION", {**bench.QWEN_VISION, "hidden_size": 32, "intermediate_size": 64,
                                               "num_heads": 2})
    torch.manual_seed(0)
    model = bench.qwen_model("qwen2.5-vl-3b", "cpu", torch.float32)
    assert model.config.text_config.vocab_size == 151936
    ids = bench.QWEN_SPECIAL_IDS
    words = bench.WordTokenizer(ids, text_vocab=min(ids.values()))
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil(min_pixels=bench.QWEN_MIN_PIXELS, max_pixels=bench.QWEN_MAX_PIXELS)
    s = bench.bench_grpo_step(model, words, processor, images_per_step=1, num_generations=2, completion_tokens=8,
                              image_size=(112, 56), steps=1, warmup_steps=0, beta=0.04, report=lambda line: None)
    assert s["visual_tokens"] == 8 and s["policy"] > 0 and s["reference"] > 0
    prompt = words.encode(preresq.render_prompt([8], preresq.IMAGE_PROMPT))
    assert prompt[0] == ids["<|im_start|>"] and prompt.count(ids["<|image_pad|>"]) == 8
    assert s["prompt_tokens"] == len(prompt)
