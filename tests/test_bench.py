"""bench.py: the step bench on the tiny shapes (step_bench.py, step_report.py, phase_clock.py), memory
peaks, the real Qwen2.5-VL shapes (model_shapes.py), the video bench."""
import ast
import math
import statistics
import time

import numpy as np
import pytest
import torch

import bench
import grpo
import harness.prefetch
import model_shapes
import phase_clock
import preresq
import step_bench
import step_report
from support import cli

BENCH_FILES = ("bench.py", "step_bench.py", "step_report.py", "phase_clock.py", "model_shapes.py")


@pytest.fixture()
def fresh_tiny(blank_dir):
    """A private copy of the blank tiny model: the bench steps its optimizer and widens its processor."""
    return preresq.load_model(str(blank_dir), "cpu")


@pytest.fixture()
def graded_reward(monkeypatch):
    """A reward that tells answers apart (0, 1, 2, 0, ... along each batch), in place of the configured
    one, which scores an untrained model's answers all alike: advantages that are not 0, so a step
    moves the weights."""
    def graded(cfg, stage, scores, mos, valid, fmt, video):
        b, g = scores.shape[:2]
        return {"total": (torch.arange(b * g, dtype=torch.float32) % 3).reshape(b, g)}

    monkeypatch.setattr(grpo, "reward_terms", graded)


def settings(**changes):
    return step_bench.StepBench(**{**dict(images_per_step=1, num_generations=2, max_new_tokens=8, image_size=(56, 56),
                                     steps=1, warmup_steps=0, beta=0.04), **changes})


def test_step_bench_times_the_training_step_phase_by_phase(fresh_tiny):
    model, tok, ip = fresh_tiny
    timed = [preresq.Policy.prompts, preresq.Policy.sample, grpo.score_rollout, preresq.Policy.logprobs,
             grpo.policy_loss, torch.autograd.backward, grpo.optimizer_step]
    assert [vars(where)[name] for where, name, _ in step_bench.HOOKS] == timed  # where the step calls them
    lines = []
    s = step_bench.bench_grpo_step(model, tok, ip, settings(images_per_step=2, num_generations=3, image_size=(84, 56),
                                                       steps=3), report=lines.append)
    assert s["visual_tokens"] == (84 // 28) * (56 // 28)
    steps = s["steps"]
    assert len(steps) == 3
    for phase in step_bench.PHASES:  # medians, not means, of what each step measured; every phase ran
        assert s[phase] == statistics.median(st.seconds[phase] for st in steps), phase
        assert s[phase] > 0, phase
    for st in steps:  # the phases are the step, up to grpo_step's few untimed lines between them
        assert 0 <= st.untimed < max(0.05, 0.1 * st.step), (st.step, st.seconds)
    assert s["step"] == statistics.median(st.step for st in steps)
    assert s["policy"] == statistics.median(st.policy for st in steps)
    assert all(1 <= st.generated_tokens <= 2 * 3 * 8 for st in steps)
    assert s["step_tokens_per_s"] == pytest.approx(statistics.median(st.generated_tokens for st in steps) / s["step"])
    assert s["peak_bytes"] == max(st.peak for st in steps)
    # the peak covers at least the weights that are resident
    assert s["peak_bytes"] > sum(p.numel() * p.element_size() for p in model.parameters())
    # an untrained model's answers all score alike: said, not hidden
    assert s["flat_steps"] == 3 and "advantages were 0" in lines[-1]
    for phase in step_bench.PHASES:
        row = next(line for line in lines[-1].splitlines() if line.strip().startswith(step_report.PHASE_NAMES[phase]))
        assert f"{s[phase]:.3f} s" in row
    assert "peak memory" in lines[-1] and "untimed rest" in lines[-1]
    # the hooks are gone: the training code is as it was
    assert [preresq.Policy.prompts, preresq.Policy.sample, grpo.score_rollout, preresq.Policy.logprobs,
            grpo.policy_loss, torch.autograd.backward, grpo.optimizer_step] == timed


def test_the_bench_step_is_grpo_step(blank_dir, graded_reward):
    """A bench step changes the weights exactly as grpo.grpo_step called directly does, on the same
    pictures with the same seed, and it does change them."""
    from types import SimpleNamespace

    run = settings(images_per_step=2, num_generations=3, lr=1e-3)
    model, tok, ip = preresq.load_model(str(blank_dir), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = step_bench.bench_grpo_step(model, tok, ip, run, report=lambda line: None)
    assert s["flat_steps"] == 0
    direct, reference = (preresq.Policy(*preresq.load_model(str(blank_dir), "cpu")) for _ in range(2))
    reference.model.requires_grad_(False)
    cfg = run.config()
    optimizer = torch.optim.AdamW(direct.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pictures, mos = step_bench.Pictures(run.image_size, seed=run.seed)(0, 2)
    batch = grpo.Batch(0, [grpo.Group([SimpleNamespace(mos=m) for m in mos.tolist()], [[p] for p in pictures])])
    torch.manual_seed(run.seed)
    done = grpo.grpo_step(direct, reference, batch, cfg, optimizer)
    assert done.stats["lr"] == 1e-3 and "grad_norm" in done.stats
    weights = dict(direct.model.named_parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_step_bench_runs_the_vision_tower_once_per_picture_and_pass(fresh_tiny):
    """The bench times the shared path, the only one: generation, the reference and the policy pass
    each send a picture's patches through the vision tower once, not once per answer (G = 3)."""
    model, tok, ip = fresh_tiny
    seen = []
    model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    step_bench.bench_grpo_step(model, tok, ip, settings(num_generations=3), report=lambda line: None)
    assert sum(seen) == 3 * (56 // 14) * (56 // 14)


def test_step_bench_without_kl_skips_the_reference_pass(fresh_tiny):
    model, tok, ip = fresh_tiny
    lines = []
    s = step_bench.bench_grpo_step(model, tok, ip, settings(beta=0.0), report=lines.append)
    assert s["reference"] == 0 and s["policy"] > 0
    row = next(line for line in lines[-1].splitlines() if line.strip().startswith("reference pass"))
    assert row.split()[-2:] == ["0.000", "s"]


def _labelled_pictures(folder, sizes):
    """Pictures of the given sizes in `folder`, and a GT label file naming them with scores 1, 2, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        step_bench.random_pictures(1, w, h, seed=k)[0].save(folder / f"p{k}.png")
    return [(f"p{k}.png", k + 1.0) for k in range(len(sizes))]


def test_label_file_pictures_are_read_resized_and_taken_in_order(tmp_path):
    rows = _labelled_pictures(tmp_path / "pictures", [(60, 40), (84, 56), (30, 50)])
    labels = tmp_path / "gt.txt"
    labels.write_text("".join(f"{name} {score}\n" for name, score in rows))
    items = step_bench.label_items(str(labels), str(tmp_path / "pictures"))
    assert [it.path for it in items] == [str(tmp_path / "pictures" / name) for name, _ in rows]
    pictures = step_bench.Pictures((56, 28), items)
    pics, mos = pictures(1, 2)  # step 1 of two pictures a step: the third item, then the first again
    assert [p.size for p in pics] == [(56, 28), (56, 28)]
    assert mos.tolist() == [items[2].mos, items[0].mos]
    # a label file next to its pictures needs no --data-root
    (tmp_path / "pictures" / "gt.txt").write_text(labels.read_text())
    assert step_bench.label_items(str(tmp_path / "pictures" / "gt.txt")) == items
    random_pics, random_mos = step_bench.Pictures((56, 28))(0, 3)
    assert [p.size for p in random_pics] == [(56, 28)] * 3 and ((1 <= random_mos) & (random_mos <= 5)).all()


def test_step_bench_reads_a_label_file_and_refuses_a_missing_one(tmp_path, capsys):
    rows = _labelled_pictures(tmp_path, [(60, 40), (84, 56)])
    (tmp_path / "gt.txt").write_text("".join(f"{name} {score}\n" for name, score in rows))
    args = bench.parse_args(["step", "--labels", str(tmp_path / "gt.txt"), "--image-size", "56x56", "--B", "1",
                             "--G", "2", "--max-new-tokens", "8", "--steps", "1", "--warmup-steps", "0",
                             "--threads", "1", "--lr", "1e-3"])
    assert args.lr == 1e-3 and not hasattr(args, "compare_unshared")
    s = args.run(args)
    assert s["pictures"] > 0
    assert "2 labelled pictures" in capsys.readouterr().out
    assert bench.main(["step", "--labels", str(tmp_path / "missing.txt")]) == 2
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "videos.txt").write_text("clip.mp4 3.0\np0.png 4.0\n")
    with pytest.raises(cli.InputError):
        step_bench.label_items(str(tmp_path / "videos.txt"))
    with pytest.raises(SystemExit):
        bench.parse_args(["step", "--data-root", str(tmp_path)])  # without --labels
    with pytest.raises(SystemExit):
        bench.parse_args(["step", "--lr", "0"])


def test_phase_clock_gives_each_phase_its_own_time_and_puts_the_functions_back():
    original, sample = torch.autograd.backward, preresq.Policy.sample
    x = torch.randn(300, 300, requires_grad=True)
    hooks = (phase_clock.hook(torch.autograd.backward, "policy_backward"),
             phase_clock.hook(preresq.Policy.sample, "generation"))
    with phase_clock.PhaseClock(torch.device("cpu"), step_bench.PHASES, hooks) as clock:
        assert preresq.Policy.sample is not sample  # a method is timed on its class
        assert torch.autograd.backward is not original and all(v == 0 for v in clock.seconds.values())

        def forward_and_backward():
            (x @ x @ x).sum().backward()  # Tensor.backward goes through torch.autograd.backward

        clock.timed("policy_forward", forward_and_backward)()
        inner = clock.seconds["policy_backward"]
        torch.autograd.backward([(x * 2).sum()])
    assert 0 < inner < clock.seconds["policy_backward"] and clock.seconds["policy_forward"] > 0
    assert torch.autograd.backward is original and preresq.Policy.sample is sample and x.grad is not None
    # nested time is taken off the outer call: one call inside another adds up to the outer's wall time
    clock = phase_clock.PhaseClock(torch.device("cpu"), step_bench.PHASES)
    outer = clock.timed("generation", lambda: clock.timed("pictures", lambda: sum(range(10**6)))())
    start = time.perf_counter()
    outer()
    wall = time.perf_counter() - start
    assert clock.seconds["pictures"] > 0 and clock.seconds["generation"] > 0
    assert clock.seconds["pictures"] + clock.seconds["generation"] == pytest.approx(wall, rel=0.2)


def test_a_function_the_bench_times_is_held_by_reference():
    """A hook names the function itself, found where the training code calls it: a function that is
    not there is refused, and a renamed part of the step fails when the bench is imported."""
    assert phase_clock.hook(grpo.score_rollout, "reward") == (grpo, "score_rollout", "reward")
    assert phase_clock.hook(preresq.Policy.logprobs, "reference")[:2] == (preresq.Policy, "logprobs")
    with pytest.raises(ValueError, match="not an attribute"):
        phase_clock.hook(lambda: None, "reward")


@pytest.mark.parametrize("owner, name", [(grpo, "policy_loss"), (preresq.Policy, "sample")])
def test_a_renamed_part_of_the_step_fails_at_the_bench_import(monkeypatch, owner, name):
    source = (bench.ROOT / "tools" / "step_bench.py").read_text()
    monkeypatch.delattr(owner, name)
    with pytest.raises(AttributeError, match=name):
        exec(compile(source, "step_bench.py", "exec"), {"__name__": "step_bench_again"})


def test_log_softmax_keeps_no_vocabulary_sized_tensor_for_the_backward(blank):
    """selective_log_softmax recomputes each chunk's logits in the backward: the same log-probs and
    gradients as keeping them, and no saved tensor of the (rows, C, V) logits."""
    model, tok, _ = blank
    N, C, V = 6, 5, model.lm_head.out_features
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, C, model.lm_head.in_features, generator=gen)
    targets = torch.randint(0, V, (N, C), generator=gen)
    suppressed = preresq.suppressed_ids(tok)

    def kept(h):  # every chunk's logits kept for the backward
        out = []
        for hc, tc in zip(h.split(4), targets.split(4)):
            logits = model.lm_head(hc).float() / 0.7
            logits[..., suppressed] = float("-inf")
            out.append(logits.gather(-1, tc.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1))
        return torch.cat(out)

    results = []
    for fn in (kept, lambda h: preresq.selective_log_softmax(h, model.lm_head, targets, 0.7, suppressed)):
        h = hidden.clone().requires_grad_(True)
        model.lm_head.weight.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logp = fn(h)
        (logp * torch.linspace(0, 1, N * C).reshape(N, C)).sum().backward()
        results.append((logp.detach(), h.grad, model.lm_head.weight.grad.clone(), max(saved)))
    (logp0, dh0, dw0, most0), (logp1, dh1, dw1, most1) = results
    assert torch.equal(logp0, logp1) and torch.equal(dh0, dh1) and torch.equal(dw0, dw1)
    assert most0 >= 4 * C * V > most1  # before: a chunk's logits; now: nothing vocabulary-sized
    model.lm_head.weight.grad = None


def test_word_tokenizer_decodes_ids_as_words_without_the_special_tokens():
    words = model_shapes.WordTokenizer({"<|im_end|>": 9, "<|endoftext|>": 8}, text_vocab=8)
    assert words.batch_decode(torch.tensor([[3, 5, 9, 8], [1, 1, 1, 1]])) == ["w3 w5", "w1 w1 w1 w1"]
    assert words.batch_decode([[3, 9]], skip_special_tokens=False) == ["w3 w9"]


def test_step_bench_with_lora_trains_only_the_adapters_and_compares_with_full_fine_tuning(fresh_tiny,
                                                                                            graded_reward):
    from harness import lora

    model, tok, ip = fresh_tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = step_bench.bench_grpo_step(model, tok, ip, settings(warmup_steps=1, lora_rank=4), report=lambda line: None)
    assert s["reference"] > 0 and s["policy"] > 0  # the reference pass: the policy with its adapters off
    adapters = lora.adapter_weights(model)
    total = sum(p.numel() for p in before.values())
    assert s["trained_parameters"] == sum(p.numel() for p in adapters.values()) < 0.2 * total
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # frozen
    assert any(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in lora.layers(model))
    lines = []
    full = {**s, "trained_parameters": 4 * s["trained_parameters"], "step": 2 * s["step"],
            "peak_bytes": 2 * s["peak_bytes"]}
    ratios = step_report.compare_lora(s, full, 4, report=lines.append)["ratios"]
    assert ratios["trained_parameters"] == 0.25 and ratios["step"] == 0.5 and ratios["peak_bytes"] == 0.5
    assert "LoRA rank 4 against full fine-tuning" in lines[0] and "= 0.500" in lines[0]


def test_image_processor_is_widened_only_when_the_size_needs_it(fresh_tiny):
    model, tok, ip = fresh_tiny
    limit = ip.size["longest_edge"]  # 224 * 224 for tiny
    side = 28 * (math.isqrt(limit) // 28 + 2)
    lines = []
    s = step_bench.bench_grpo_step(model, tok, ip, settings(image_size=(side, side), beta=0.0), report=lines.append)
    assert s["visual_tokens"] == (side // 28) ** 2
    assert ip.size["longest_edge"] == side * side and "max_pixels raised" in lines[0]


def test_size_for_visual_tokens_gives_at_least_that_many_tokens():
    assert step_bench.size_for_visual_tokens(529) == (644, 644)  # 23 x 23 tokens
    assert step_bench.size_for_visual_tokens(500) == (644, 616)  # 23 x 22 = 506
    for n in (1, 7, 256, 500, 1000):
        w, h = step_bench.size_for_visual_tokens(n)
        assert n <= (w // 28) * (h // 28) < n + max(w, h) // 28


def test_peak_memory_sees_an_allocation_and_resets_between_calls():
    device = torch.device("cpu")
    size = 300 * 2**20
    _, seconds, peak_big = phase_clock.measure(lambda: np.ones(size // 8).sum(), device)
    _, _, peak_small = phase_clock.measure(lambda: None, device)
    assert seconds > 0
    assert peak_big - peak_small > 0.8 * size


@pytest.mark.parametrize("name, published_billions", [("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29)])
def test_real_shapes_have_the_published_parameter_counts(name, published_billions):
    model = model_shapes.qwen_model(name, "meta")
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
        assert len(model_shapes.WordTokenizer.PIECES.findall(text)) == len(pre.pre_tokenize_str(text)), text
    specials = {t: tok.convert_tokens_to_ids(t) for t in preresq.SPECIAL_TOKENS}
    words = model_shapes.WordTokenizer(specials, text_vocab=min(specials.values()))
    for key in ("suppress_tokens", "eos_token_id", "pad_token_id"):
        assert getattr(preresq.sampling_config(words), key) == getattr(preresq.sampling_config(tok), key)
    pics = step_bench.random_pictures(2, 84, 56)
    real = preresq.encode_prompts(tok, ip, [[p] for p in pics], [preresq.IMAGE_PROMPT] * 2)
    stand_in = preresq.encode_prompts(words, ip, [[p] for p in pics], [preresq.IMAGE_PROMPT] * 2)
    for s in specials.values():
        assert ((real.input_ids == s).sum(1) == (stand_in.input_ids == s).sum(1)).all()
    comp = torch.randint(0, min(specials.values()), (4, 5))
    logp = preresq.completion_logprobs(model, preresq.cache_prompts(model, stand_in), comp, torch.ones_like(comp), temperature=1.0,
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
    for removed in ("--compare-unshared", "--naive-vision"):  # the unshared path is gone from the code
        with pytest.raises(SystemExit):
            bench.main(["step", removed])
    for refused in (["--num-generations", "1"], ["--max-new-tokens", "4"]):  # as grpo.py refuses them
        with pytest.raises(SystemExit):
            bench.main(["step", *refused])


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
    monkeypatch.setitem(model_shapes.QWEN_SHAPES, "qwen2.5-vl-3b", {**model_shapes.QWEN_SHAPES["qwen2.5-vl-3b"], **narrow})
    monkeypatch.setattr(model_shapes, "QWEN_VISION", {**model_shapes.QWEN_VISION, "hidden_size": 32, "intermediate_size": 64,
                                               "num_heads": 2})
    torch.manual_seed(0)
    model = model_shapes.qwen_model("qwen2.5-vl-3b", "cpu", torch.float32)
    assert model.config.text_config.vocab_size == 151936
    ids = model_shapes.QWEN_SPECIAL_IDS
    words = model_shapes.WordTokenizer(ids, text_vocab=min(ids.values()))
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil(min_pixels=model_shapes.QWEN_MIN_PIXELS, max_pixels=model_shapes.QWEN_MAX_PIXELS)
    s = step_bench.bench_grpo_step(model, words, processor, settings(image_size=(112, 56)), report=lambda line: None)
    assert s["visual_tokens"] == 8 and s["policy"] > 0 and s["reference"] > 0
    prompt = words.encode(preresq.render_prompt([8], preresq.IMAGE_PROMPT))
    assert prompt[0] == ids["<|im_start|>"] and prompt.count(ids["<|image_pad|>"]) == 8
    assert s["prompt_tokens"] == len(prompt)


def test_picture_prefetch_threads_yield_the_cores_to_torch():
    """harness.prefetch.Prefetch's workers run at the lowest priority; the caller's priority is left as it was."""
    import os
    import threading
    from types import SimpleNamespace

    if not hasattr(os, "setpriority"):
        pytest.skip("no thread priorities here")
    nice = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    own = nice()
    sampler = SimpleNamespace(batch=lambda step: (None, []))  # steps without pictures
    run = SimpleNamespace(sampler=sampler, steps=2, start=0, comm=grpo.Processes())
    cfg = SimpleNamespace(images_per_step=2, groups_per_step=1, max_pixels=None, workers=2)
    with harness.prefetch.Prefetch(run, cfg) as prefetch:
        assert prefetch.load(0) == ([([], [], 0)], [])  # one group: no items, no pictures, first place 0
        assert prefetch.pool.submit(nice).result() == 19
    assert nice() == own


@pytest.mark.parametrize("name", BENCH_FILES)
def test_no_function_of_the_bench_is_longer_than_sixty_lines_nor_a_file_than_400(name):
    text = (bench.ROOT / "tools" / name).read_text()
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert not long, long
    assert len(text.splitlines()) <= 400
