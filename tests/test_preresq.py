"""preresq.py: prompts, batching, sampling settings, log-probs against generate, loading; presets.py and
preset_recipe.py."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import oracles
from support import prompt_sharing
import preresq
from harness import preset_recipe, presets
import rewards


def pictures(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def repeat_prompts(batch, g):
    """Each prompt of a PromptBatch repeated g times in place (rows b*g .. b*g+g-1 are prompt b).

    Pixels are split per prompt by image_grid_thw and each prompt's chunk is repeated g times in
    the same order as the rows; repeat_interleave on the flat pixel tensor would pair rows with
    the wrong pictures.
    """
    patches = batch.image_grid_thw.prod(-1)
    per_prompt_patches = torch.stack([p.sum() for p in patches.split(batch.pictures_per_prompt)]).tolist()
    pixel_chunks = batch.pixel_values.split(per_prompt_patches)
    grid_chunks = batch.image_grid_thw.split(batch.pictures_per_prompt)
    return preresq.PromptBatch(
        batch.input_ids.repeat_interleave(g, 0), batch.attention_mask.repeat_interleave(g, 0),
        torch.cat([c for c in pixel_chunks for _ in range(g)]), torch.cat([c for c in grid_chunks for _ in range(g)]),
        [n for n in batch.pictures_per_prompt for _ in range(g)])


def sampled_with_scores(model, tokenizer, batch, g, max_new_tokens=12, seed=0):
    """Sample through generate and keep the processed scores it sampled from."""
    torch.manual_seed(seed)
    cfg = preresq.sampling_config(tokenizer, num_generations=g, temperature=0.7, max_new_tokens=max_new_tokens)
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=preresq.mm_token_type_ids(model, batch.input_ids),
                         generation_config=cfg, output_scores=True, return_dict_in_generate=True)
    comp = out.sequences[:, batch.input_ids.shape[1]:]
    scores = torch.stack(out.scores, 1).log_softmax(-1)
    return comp, scores.gather(-1, comp.unsqueeze(-1)).squeeze(-1)


def test_completion_mask_keeps_tokens_up_to_and_including_the_first_end():
    end = 9
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5], [9, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(preresq.completion_mask(ids, end), expected)


def test_prompt_has_one_placeholder_per_visual_token_and_left_padding(blank):
    model, tok, ip = blank
    batch = preresq.encode_prompts(tok, ip, [[p] for p in pictures([(56, 84), (112, 140)])],
                                   [preresq.IMAGE_PROMPT] * 2)
    per_image = (batch.image_grid_thw.prod(-1) // ip.merge_size ** 2).tolist()
    image_id = model.config.image_token_id
    assert (batch.input_ids == image_id).sum(1).tolist() == per_image
    # left padding: the shorter prompt starts with padding and both end with the assistant header
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all()
    assert tok.decode(batch.input_ids[0, -3:]) == "<|im_start|>assistant\n"
    text = tok.decode(batch.input_ids[1])
    assert text.startswith("<|im_start|>system\n") and preresq.IMAGE_PROMPT in text


def test_special_tokens_are_single_ids(blank):
    _, tok, _ = blank
    for t in preresq.SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1


def test_recomputed_logprobs_equal_the_sampled_distribution(blank):
    model, tok, ip = blank
    batch = preresq.encode_prompts(tok, ip, [[p] for p in pictures([(56, 84), (112, 140)])],
                                   [preresq.IMAGE_PROMPT] * 2)
    g = 3
    comp, expected = sampled_with_scores(model, tok, batch, g)
    mask = preresq.completion_mask(comp, tok.convert_tokens_to_ids(preresq.END_OF_TURN))
    with torch.no_grad():
        logp = preresq.completion_logprobs(model, preresq.cache_prompts(model, batch), comp, mask, temperature=0.7,
                                           num_generations=g, suppressed=preresq.suppressed_ids(tok))
    m = mask.bool()
    assert torch.isfinite(logp).all()
    assert (logp[m] - expected[m]).abs().max() <= 1e-5
    assert (logp[~m] == 0).all()


def test_every_row_meets_its_own_pictures(blank):
    model, tok, ip = blank
    imgs = pictures([(56, 84), (112, 140), (84, 56)], seed=1)
    batch = preresq.encode_prompts(tok, ip, [[p] for p in imgs], [preresq.IMAGE_PROMPT] * 3)
    g = 2
    rep = repeat_prompts(batch, g)
    for row in range(3 * g):
        alone = preresq.encode_prompts(tok, ip, [[imgs[row // g]]], [preresq.IMAGE_PROMPT])
        patches = rep.image_grid_thw.prod(-1).tolist()
        assert torch.equal(rep.pixel_values.split(patches)[row], alone.pixel_values)
        assert torch.equal(rep.input_ids[row][rep.attention_mask[row].bool()], alone.input_ids[0])
    # the same holds inside the model: each row's log-probs equal those of its prompt alone
    comp = torch.randint(0, 200, (3 * g, 6))
    mask = torch.ones_like(comp)
    sup = preresq.suppressed_ids(tok)
    with torch.no_grad():
        together = preresq.completion_logprobs(model, preresq.cache_prompts(model, batch), comp, mask,
                                               temperature=1.0, num_generations=g, suppressed=sup)
        for row in range(3 * g):
            alone = preresq.encode_prompts(tok, ip, [[imgs[row // g]]], [preresq.IMAGE_PROMPT])
            single = preresq.completion_logprobs(model, preresq.cache_prompts(model, alone), comp[row:row + 1],
                                                 mask[row:row + 1], temperature=1.0, num_generations=1, suppressed=sup)
            assert torch.allclose(together[row], single[0], atol=1e-5)


def test_gradients_equal_the_joined_forward_with_the_vision_tower_per_row(blank):
    """The prompt's forward runs once for its G answers; the gradient reaches the vision tower as
    one forward per answer (pictures and all) gives it."""
    model, tok, ip = blank
    batch = preresq.encode_prompts(tok, ip, [[p] for p in pictures([(56, 84), (112, 140)], seed=2)],
                                   [preresq.IMAGE_PROMPT] * 2)
    comp = torch.randint(0, 200, (6, 5))
    mask = torch.ones_like(comp)
    kw = dict(temperature=1.0, num_generations=3, suppressed=preresq.suppressed_ids(tok))
    grads = []
    for shared in (True, False):
        model.zero_grad()
        logp = (preresq.completion_logprobs(model, preresq.cache_prompts(model, batch), comp, mask, **kw) if shared
                else oracles.joined_logprobs(model, batch, comp, mask, **kw))
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert grads[0].shape == grads[1].shape
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert model.model.visual.patch_embed.proj.weight.requires_grad


def test_shipped_generation_config_does_not_change_sampling(blank_dir, tmp_path):
    """A real checkpoint's generation_config.json (top_k=1, repetition penalty) must not leak in."""
    shutil = __import__("shutil")
    shutil.copytree(blank_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    cfg.update(top_k=1, top_p=0.001, repetition_penalty=1.5, temperature=0.1, do_sample=False)
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(cfg))
    outs = []
    for path in (blank_dir, tmp_path / "m"):
        model, tok, ip = preresq.load_model(str(path), "cpu")
        batch = preresq.encode_prompts(tok, ip, [pictures([(56, 56)])], [preresq.IMAGE_PROMPT])
        torch.manual_seed(3)
        outs.append(preresq.sample_completions(model, tok, batch, 4, temperature=1.0, max_new_tokens=16))
    assert torch.equal(outs[0], outs[1])
    assert len({tuple(r.tolist()) for r in outs[0]}) > 1  # G samples differ (top_k=1 would make them equal)


def test_top_k_is_explicit_in_the_generation_config(blank, monkeypatch):
    """top_k=0 (the whole distribution, whose log-probs GRPO computes) is written into the config,
    never left to a default; any other top_k reaches the sampler (prompt_sharing.sample) unchanged."""
    model, tok, ip = blank
    assert preresq.sampling_config(tok).top_k == 0
    assert preresq.sampling_config(tok, top_k=50).top_k == 50
    assert preresq.sampling_config(tok, top_k=50, greedy=True).top_k is None  # greedy: no sampling
    with pytest.raises(ValueError, match="top_k must be 0"):
        preresq.sampling_config(tok, top_k=-1)
    seen = []

    def shared_prefix_sample(model, cache, generation_config, all_finished=None):  # the default sampler: the same config
        seen.append(generation_config)
        return torch.zeros(cache.last_hidden.shape[0] * generation_config.num_return_sequences, 1, dtype=torch.long)

    monkeypatch.setattr(prompt_sharing, "sample", shared_prefix_sample)
    batch = preresq.encode_prompts(tok, ip, [pictures([(56, 56)])], [preresq.IMAGE_PROMPT])
    preresq.sample_completions(model, tok, batch, 2)
    preresq.sample_completions(model, tok, batch, 2, top_k=7)
    preresq.judge(model, tok, ip, pictures([(56, 56)]), samples=2, top_k=9)
    assert [(c.do_sample, c.top_k, c.top_p) for c in seen] == [(True, 0, 1.0), (True, 7, 1.0), (True, 9, 1.0)]


def test_top_k_one_samples_the_greedy_answer(blank):
    model, tok, ip = blank
    batch = preresq.encode_prompts(tok, ip, [[p] for p in pictures([(56, 84), (84, 56)], seed=4)],
                                   [preresq.IMAGE_PROMPT] * 2)
    greedy = preresq.sample_completions(model, tok, batch, 1, max_new_tokens=16, greedy=True)
    torch.manual_seed(0)
    top1 = preresq.sample_completions(model, tok, batch, 3, temperature=1.5, top_k=1, max_new_tokens=16)
    assert torch.equal(top1, greedy.repeat_interleave(3, 0))
    torch.manual_seed(0)
    full = preresq.sample_completions(model, tok, batch, 3, temperature=1.5, max_new_tokens=16)
    assert not torch.equal(full, top1)  # top_k=0 samples the whole distribution
    judged = preresq.judge(model, tok, ip, pictures([(56, 84)], seed=4), samples=2, top_k=1, max_new_tokens=16)
    assert judged[0].texts == preresq.judge(model, tok, ip, pictures([(56, 84)], seed=4), max_new_tokens=16)[0].texts * 2


def test_command_line_passes_top_k_to_the_judge(monkeypatch, tmp_path, capsys):
    seen = []

    def judge(model, tokenizer, image_processor, visuals, **settings):
        seen.append(settings)
        return [preresq.Judgement(3.0, [3.0] * 5, ["<answer>3 3 3 3 3</answer>"], 1)]

    monkeypatch.setattr(preresq, "locate_model", lambda name: name)  # "hub/m" stands for a model that is there
    monkeypatch.setattr(preresq, "load_model", lambda *a: (None, None, None))
    monkeypatch.setattr(preresq, "judge", judge)
    path = tmp_path / "photo.png"
    pictures([(56, 56)])[0].save(path)
    assert preresq.main([str(path), "--model", "hub/m", "--samples", "2", "--top-k", "5", "--json"]) == 0
    assert seen[0]["top_k"] == 5 and seen[0]["samples"] == 2
    assert preresq.main([str(path), "--model", "hub/m"]) == 0
    assert seen[1]["top_k"] == 0 and seen[1]["samples"] is None


def test_no_special_or_vision_token_is_ever_sampled(blank):
    model, tok, ip = blank
    batch = preresq.encode_prompts(tok, ip, [pictures([(56, 56)])], [preresq.IMAGE_PROMPT])
    torch.manual_seed(0)
    comp = preresq.sample_completions(model, tok, batch, 8, temperature=2.0, max_new_tokens=48)
    mask = preresq.completion_mask(comp, tok.convert_tokens_to_ids(preresq.END_OF_TURN)).bool()
    assert not torch.isin(comp[mask], torch.tensor(preresq.suppressed_ids(tok))).any()


def test_preset_is_an_ordinary_checkpoint_that_knows_the_format(tiny):
    from transformers import AutoModelForImageTextToText

    model, tok, ip = tiny
    path = presets.model_path("tiny")
    again = AutoModelForImageTextToText.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    rng = np.random.default_rng(5)
    imgs = [preset_recipe._random_picture(rng) for _ in range(6)]
    judged = preresq.judge(model, tok, ip, imgs, samples=4, max_new_tokens=64)
    parsed = sum(j.parsed for j in judged)
    assert parsed >= 0.5 * 24, [j.texts[0] for j in judged]
    assert all(1 <= j.score <= 5 for j in judged if j.score is not None)


def test_judge_never_invents_a_score(blank):
    model, tok, ip = blank  # random weights: answers do not parse
    judged = preresq.judge(model, tok, ip, pictures([(56, 56), (84, 84)]), samples=2, max_new_tokens=12)
    for j in judged:
        assert all(rewards.parse_answer(t, 5) is None for t in j.texts)
        assert j.score is None and j.aspects is None and j.parsed == 0


def test_answers_with_equal_decimal_means_get_equal_scores():
    # both mean 4.026; in float64 the plain means differ in the last bit, which SRCC would rank apart
    a = "<think>x</think><answer>2.99\n3.21\n4.11\n4.90\n4.92</answer>"
    b = "<think>x</think><answer>3.08\n3.21\n4.11\n4.81\n4.92</answer>"
    assert preresq._judgement([a], 5).score == preresq._judgement([b], 5).score == 4.026
    assert preresq._judgement([a, b], 5).score == 4.026


def test_greedy_judge_is_reproducible(tiny):
    model, tok, ip = tiny
    imgs = pictures([(84, 84), (56, 112)], seed=7)
    a = preresq.judge(model, tok, ip, imgs, max_new_tokens=64)
    b = preresq.judge(model, tok, ip, imgs, max_new_tokens=64, batch_size=1)
    assert [x.texts for x in a] == [x.texts for x in b]


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(preresq.ModelLoadError, match="no config.json"):
        preresq.load_model(str(tmp_path))
    t = time.time()
    with pytest.raises(preresq.ModelLoadError, match="not in the local hub cache"):
        preresq.load_model("Qwen/Qwen2.5-VL-7B-Instruct")
    assert time.time() - t < 10


def test_a_checkpoint_missing_weights_of_the_model_is_refused_not_loaded_at_random(tmp_path, capsys):
    """transformers initialises weights missing from the file at random and goes on; load_model refuses."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "holes"
    folder.mkdir()
    for f in Path(presets.model_path("tiny")).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    preresq.load_model(str(folder), "cpu")  # whole, it loads
    weights = load_file(str(folder / "model.safetensors"))
    gone = [k for k in weights if ".layers.1.mlp." in k]
    assert len(gone) == 3
    save_file({k: v for k, v in weights.items() if k not in gone}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(preresq.ModelLoadError, match="3 weights of the model are missing from its checkpoint") as e:
        preresq.load_model(str(folder), "cpu")
    assert "model.language_model.layers.1.mlp.down_proj.weight" in str(e.value)
    picture = tmp_path / "photo.png"
    pictures([(56, 56)])[0].save(picture)
    assert preresq.main([str(picture), "--model", str(folder)]) == 2
    assert "preresq.py: error: " in capsys.readouterr().err


def test_command_line_scores_files_and_reports_unreadable_ones(tiny, tmp_path):
    good = tmp_path / "photo.png"
    pictures([(84, 112)])[0].save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "preresq.py", str(good), str(bad), "--json",
                        "--model", presets.model_path("tiny"), "--max-new-tokens", "64"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 1
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert [l["file"] for l in lines] == [str(good)]
    assert "broken.jpg" in r.stderr


def test_score_accepts_a_video_file(tiny):
    model, tok, ip = tiny
    clip = data.load_dataset("synthetic-video", split="test")[0].path
    views = data.read_visual(clip)
    assert isinstance(views, list) and len(views) == 4  # the global mosaic and three local frames
    j = preresq.score(model, (tok, ip), clip)
    assert len(j.texts) == 1
    if j.score is not None:
        assert len(j.aspects) == len(preresq.VIDEO_ASPECTS) and 1 <= j.score <= 5


def test_prefetched_draws_exactly_like_a_plain_loop():
    rng = np.random.default_rng(3)
    fetched = list(preset_recipe._prefetched(lambda: rng.random(3), 5))
    plain = np.random.default_rng(3)
    assert all(np.array_equal(a, plain.random(3)) for a in fetched) and len(fetched) == 5
    assert list(preset_recipe._prefetched(lambda: 1 / 0, 0)) == []


def test_neutral_opinion_says_nothing_about_severity():
    """Latin square: every severity bin holds each opinion level once (mean 3.0), so the preset's
    starting scores are uncorrelated with how strong a degradation is."""
    kinds = range(len(preset_recipe.DEGRADATION_NAMES))
    for b in range(len(preset_recipe.SEVERITY_WORDS)):
        severity = (b + 0.5) / len(preset_recipe.SEVERITY_WORDS)
        levels = sorted(preset_recipe.neutral_opinion(k, severity) for k in kinds)
        assert levels == sorted(preset_recipe.OPINION_LEVELS.tolist())
        assert np.mean(levels) == pytest.approx(3.0)
    # a kind's opinion changes with the strength (the picture matters), and untouched pictures get none
    assert len({preset_recipe.neutral_opinion(0, (b + 0.5) / 4) for b in range(4)}) == 4
    assert preset_recipe.neutral_opinion(None, 0.0) is None
    assert [preset_recipe.severity_bin(s) for s in (0.0, 0.99, 1.0)] == [0, 3, 3]


def test_warm_up_answers_describe_the_picture_and_parse():
    assert preset_recipe.describe_degradation(None, 0.0) == "I see no distortion."
    assert preset_recipe.describe_degradation(0, 0.9) == "I see severe blur."
    assert preset_recipe.describe_degradation(6, 0.3) == "I see moderate faded colour."
    rng = np.random.default_rng(0)
    for kind, severity in [(None, 0.0), (2, 0.1), (7, 0.8)]:
        text = preset_recipe._random_answer(rng, 5, False, preset_recipe.describe_degradation(kind, severity),
                                            preset_recipe.neutral_opinion(kind, severity))
        scores = rewards.parse_answer(text, 5)
        assert scores is not None and len(scores) == 5 and all(1 <= s <= 5 for s in scores)
        assert max(scores) - min(scores) < 1.5  # the aspects of one answer go together
        assert preset_recipe.describe_degradation(kind, severity) in text


def test_degraded_picture_reports_kind_and_severity():
    rng = np.random.default_rng(1)
    seen = [preset_recipe._degraded_picture(rng) for _ in range(40)]
    assert all(isinstance(p, Image.Image) and 84 <= min(p.size) and max(p.size) <= 168 for p, _, _ in seen)
    assert all((k is None and s == 0.0) or (0 <= k < 8 and 0 <= s <= 1) for _, k, s in seen)
    assert any(k is None for _, k, _ in seen) and len({k for _, k, _ in seen}) >= 6
