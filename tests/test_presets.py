"""presets.py: the shipped `tiny` preset is the one its recipe builds, and a fresh clone uses it without building."""
import json
from pathlib import Path

from harness import presets


def test_the_shipped_tiny_preset_is_stamped_with_the_current_recipe():
    """Changing the recipe (settings, prompts, the recipe's code) changes the digest: then this fails until
    `python -m harness.presets tiny --ship` ships a preset built by the new recipe (and `--verify` confirms it)."""
    stamp = (presets.SHIPPED / "tiny" / presets.RECIPE_FILE).read_text().strip()
    assert stamp == presets.recipe_digest("tiny")
    assert presets.shipped_path("tiny") == presets.SHIPPED / "tiny"


def test_a_fresh_clone_loads_the_shipped_preset_without_building(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRERESQ_CACHE", str(cache))
    assert presets.model_path("tiny") == str(presets.SHIPPED / "tiny")
    assert not cache.exists()  # nothing built, nothing cached


def test_an_edited_prompt_keeps_the_shipped_preset_and_says_how_to_check(tmp_path, monkeypatch, capsys):
    """A student editing a prompt (part of the recipe) must not start a build of minutes: the shipped
    folder is used as shipped, with one note naming --verify; --verify then names the changed recipe."""
    import preresq

    cache = tmp_path / "cache"
    monkeypatch.setenv("PRERESQ_CACHE", str(cache))
    monkeypatch.setattr(preresq, "IMAGE_PROMPT_POOL", (preresq.IMAGE_PROMPT, "Rate this picture, please."))
    monkeypatch.setattr(presets, "_NOTED", set())
    assert presets.recipe_digest("tiny") != (presets.SHIPPED / "tiny" / presets.RECIPE_FILE).read_text().strip()
    assert presets.model_path("tiny") == str(presets.SHIPPED / "tiny")
    assert presets.model_path("tiny") == str(presets.SHIPPED / "tiny")
    note = capsys.readouterr().err
    assert note.count("built by an earlier recipe") == 1 and "harness.presets tiny --verify" in note
    assert not cache.exists()  # nothing built
    [diff] = presets.verify("tiny")  # without building: the digest already says it
    assert "the recipe changed since models/tiny was shipped" in diff and "--ship" in diff


def test_the_shipped_files_are_what_the_recipe_writes(blank_dir):
    """The tokenizer (trained from the recipe's corpus), the architecture and the processor settings of
    a build are byte for byte the shipped ones. (The weights need the full build: `python -m harness.presets
    tiny --verify` rebuilds and compares every tensor.)"""
    shipped = presets.SHIPPED / "tiny"
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (Path(blank_dir) / name).read_bytes() == (shipped / name).read_bytes(), name
    assert json.loads((Path(blank_dir) / "config.json").read_text()) == json.loads((shipped / "config.json").read_text())


def test_the_format_warm_up_runs_and_trains_what_it_says():
    """One step of the warm-up (the suite builds presets without it): its log-probs are the model's own
    over each prompt joined with its answer (as GRPO's completion_logprobs gets them), and the step moves
    the language model and the adapter but not the rest of the vision tower."""
    import numpy as np
    import torch

    import oracles
    import preresq
    from harness import preset_recipe

    model, tok, proc = preresq.load_model(str(presets.SHIPPED / "tiny"), "cpu")
    suppressed = preresq.suppressed_ids(tok)
    prompt, comp, mask = preset_recipe._warmup_batch(tok, proc, np.random.default_rng(1), batch=2)
    with torch.no_grad():
        logp = preset_recipe._answer_logprobs(model, prompt, comp, mask, suppressed)
        joined = oracles.joined_logprobs(model, prompt, comp, mask, temperature=1.0, num_generations=1,
                                         suppressed=suppressed)
        shared = preresq.completion_logprobs(model, preresq.cache_prompts(model, prompt), comp, mask,
                                             temperature=1.0, num_generations=1, suppressed=suppressed)
    assert (logp[mask == 0] == 0).all() and (logp[mask == 1] < 0).all()
    torch.testing.assert_close(logp, joined, rtol=0, atol=1e-4)
    torch.testing.assert_close(logp, shared, rtol=0, atol=1e-4)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    preset_recipe._format_warmup(model, tok, proc, np.random.default_rng(2), steps=1, lr=1e-3, batch=2)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained = {n for n in before if not n.startswith("model.visual.") or n.startswith("model.visual.merger.")}
    assert moved == trained
    assert not model.training
