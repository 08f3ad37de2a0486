"""prompt_sharing.py: each prompt computed once for its G answers gives what a prompt + answer forward gives:
sampled logits, greedy tokens, log-probs and gradients (micro-batches, gradient checkpointing),
M-RoPE positions of answers after pictures of different sizes and left-padded prompts."""
import numpy as np
import pytest
import torch
from PIL import Image

import oracles
import preresq
from support import prompt_sharing


def pictures(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def two_prompts(tok, ip, seed=0):
    """Two prompts of different lengths (left padding): one picture, and two pictures of other sizes."""
    a, b, c = pictures([(56, 84), (112, 140), (84, 56)], seed)
    batch = preresq.encode_prompts(tok, ip, [[a], [b, c]], [preresq.IMAGE_PROMPT] * 2)
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all()
    return batch


def full_logits(model, batch, comp, attention, g):
    with torch.no_grad():
        return oracles.joined_logits(model, batch, comp, attention, g)


def test_sampled_logits_equal_a_full_forward_and_draws_equal_generate(blank, monkeypatch):
    model, tok, ip = blank
    batch, g = two_prompts(tok, ip), 3
    seen = []
    choose = prompt_sharing._next_token
    monkeypatch.setattr(prompt_sharing, "_next_token", lambda logits, config: choose(seen.append(logits.clone()) or logits,
                                                                             config))
    model.model.rope_deltas = torch.full((6, 1), 1000)  # a stale value from "another batch" must not matter
    torch.manual_seed(0)
    comp = preresq.sample_completions(model, tok, batch, g, temperature=0.7, max_new_tokens=24)
    assert comp.shape == (2 * g, len(seen))
    mask = preresq.completion_mask(comp, tok.convert_tokens_to_ids(preresq.END_OF_TURN))
    expected = full_logits(model, batch, comp, mask, g)
    got = torch.stack(seen, 1)
    m = mask.bool()
    assert (got[m] - expected[m]).abs().max() <= 1e-5
    # generate, with the same seed, makes the same draws (its probabilities differ only by rounding)
    torch.manual_seed(0)
    assert torch.equal(oracles.generate(model, tok, batch, g, temperature=0.7, max_new_tokens=24), comp)


def test_rows_stop_at_the_end_of_turn_and_pad(blank, monkeypatch):
    model, tok, ip = blank
    batch = two_prompts(tok, ip, seed=1)
    end, pad = tok.convert_tokens_to_ids(preresq.END_OF_TURN), tok.pad_token_id
    step = []

    def ends_early(logits, config):  # row r writes the end of turn at step r, then the loop stops
        logits[:, :] = 0.0
        logits[len(step):, 7] = 1.0
        logits[:len(step) + 1, end] = 2.0
        step.append(0)
        return logits.argmax(-1)

    monkeypatch.setattr(prompt_sharing, "_next_token", ends_early)
    comp = preresq.sample_completions(model, tok, batch, 2, max_new_tokens=10)
    assert comp.shape == (4, 4)  # stopped once the last row ended, not at max_new_tokens
    for r in range(4):
        assert comp[r, r] == end and (comp[r, :r] == 7).all() and (comp[r, r + 1:] == pad).all()


def test_greedy_equals_generate_where_the_choice_is_clear(blank):
    model, tok, ip = blank
    batch = two_prompts(tok, ip, seed=2)
    shared = preresq.sample_completions(model, tok, batch, 1, max_new_tokens=32, greedy=True)
    cfg = preresq.sampling_config(tok, max_new_tokens=32, greedy=True)
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=preresq.mm_token_type_ids(model, batch.input_ids),
                         generation_config=cfg, output_scores=True, return_dict_in_generate=True)
    plain = out.sequences[:, batch.input_ids.shape[1]:]
    top2 = torch.stack(out.scores, 1).topk(2, -1).values
    close = (top2[..., 0] - top2[..., 1]) <= 1e-4
    for r in range(2):
        clear = int(close[r].nonzero()[0]) if close[r].any() else plain.shape[1]  # up to the first near tie
        assert clear > 0 and torch.equal(shared[r, :clear], plain[r, :clear])


def test_top_k_keeps_only_the_k_likeliest(blank):
    model, tok, ip = blank
    batch = two_prompts(tok, ip, seed=3)
    config = preresq.sampling_config(tok, num_generations=4, max_new_tokens=8, top_k=3, temperature=2.0)
    cache = preresq.cache_prompts(model, batch)
    logits = model.lm_head(cache.last_hidden).float()
    torch.manual_seed(0)
    comp = prompt_sharing.sample(model, cache, config)
    allowed = logits.masked_fill(torch.isin(torch.arange(logits.shape[1]), torch.tensor(config.suppress_tokens)),
                                 float("-inf")).topk(3).indices
    assert all(comp[r, 0] in allowed[r // 4] for r in range(8))


def test_positions_continue_the_prompts(blank):
    """An answer token's M-RoPE position (all three axes) is the one get_rope_index gives it in the
    whole prompt + answer sequence, for pictures of different sizes and left-padded prompts."""
    model, tok, ip = blank
    batch = two_prompts(tok, ip)
    types = preresq.mm_token_type_ids(model, batch.input_ids)
    with torch.no_grad():
        cache = prompt_sharing.prefill(model, batch.input_ids, batch.attention_mask, batch.image_grid_thw, types,
                               pixel_values=batch.pixel_values)
    ids = torch.cat([batch.input_ids, torch.full((2, 3), 7)], 1)
    mask = torch.cat([batch.attention_mask, torch.ones(2, 3, dtype=torch.long)], 1)
    whole, _ = model.model.get_rope_index(ids, preresq.mm_token_type_ids(model, ids), batch.image_grid_thw,
                                          attention_mask=mask)
    p = batch.input_ids.shape[1]
    assert torch.equal(whole[:, :, p:], (cache.next_position[:, None] + torch.arange(3)).expand(3, -1, -1))
    assert (cache.next_position < mask.sum(1)).all()  # the pictures' 2-D grids take fewer positions than tokens


@pytest.mark.parametrize("checkpointing", [False, True])
def test_logprobs_and_gradients_equal_the_joined_forward(blank_dir, checkpointing):
    """Micro-batches back-propagate into one detached prompt cache; its gradient flows through the
    prompt's forward once: the gradients equal one backward of the joined prompt + answer forward,
    vision tower included."""
    model, tok, ip = preresq.load_model(str(blank_dir), "cpu")  # its own copy: it is switched to training
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch, g = two_prompts(tok, ip, seed=4), 3
    torch.manual_seed(0)
    comp = torch.randint(0, 200, (2 * g, 7))
    mask = torch.ones_like(comp)
    mask[1, 4:] = mask[4, 2:] = 0
    weights = torch.randn(2 * g, 7)
    kw = dict(temperature=0.7, num_generations=g, suppressed=preresq.suppressed_ids(tok))

    model.zero_grad()
    joined = oracles.joined_logprobs(model, batch, comp, mask, **kw)
    (joined * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    cache = preresq.cache_prompts(model, batch)
    leaves = prompt_sharing.detached(cache)
    shared = []
    for r in (slice(0, 2), slice(2, 5), slice(5, 6)):  # a micro-batch may split a prompt's group
        logp = preresq.completion_logprobs(model, leaves, comp[r], mask[r], rows=r, **kw)
        (logp * weights[r]).sum().backward()
        shared.append(logp.detach())
    prompt_sharing.backward(cache, leaves)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert (torch.cat(shared) - joined.detach()).abs().max() <= 1e-5
    assert (torch.cat(shared)[~mask.bool()] == 0).all()
    assert got.keys() == expected.keys() and any(n.startswith("model.visual.") for n in got)
    for name, grad in expected.items():
        assert (got[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-6), name


def test_one_row_alone_equals_its_place_in_the_batch(blank):
    """A micro-batch of one row (rows=) reads its own prompt's keys and values."""
    model, tok, ip = blank
    batch, g = two_prompts(tok, ip, seed=5), 2
    comp = torch.randint(0, 200, (2 * g, 5))
    mask = torch.ones_like(comp)
    kw = dict(temperature=1.0, num_generations=g, suppressed=preresq.suppressed_ids(tok))
    with torch.no_grad():
        cache = preresq.cache_prompts(model, batch)
        shared = preresq.completion_logprobs(model, cache, comp, mask, **kw)
        joined = oracles.joined_logprobs(model, batch, comp, mask, **kw)
        row = preresq.completion_logprobs(model, cache, comp[3:4], mask[3:4], rows=slice(3, 4), **kw)
    assert (shared - joined).abs().max() <= 1e-5
    assert (row[0] - shared[3]).abs().max() <= 1e-5
