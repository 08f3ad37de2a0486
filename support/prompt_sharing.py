"""A shared prompt: the language model reads each prompt once for all G answers about it.

A GRPO step asks for G answers about each picture, every one after the same prompt (the picture's
visual tokens and the instructions: hundreds of tokens, where an answer has tens). Batched as B*G
rows of prompt + answer, the model would compute every prompt G times. Here each prompt's
forward runs once (B rows) and keeps, for every layer, its keys and values; the B*G answers then
run against those, repeated G times:

    prefill(model, ...)                        -> PromptCache of B prompts (with gradients when enabled)
    completion_hidden(model, cache, rows, ...) -> (N, C, H) the states that predict N answers' tokens
    sample(model, cache, config)               -> (B*G, C) sampled answers, rows grouped by prompt
    detached(cache) ... backward(cache, leaves): one prompt backward for all micro-batches

Exact: attention is causal, so a prompt token's keys and values do not depend on what follows
it; the answers' states equal those of a full prompt + answer forward up to float rounding.

Positions: Qwen2.5-VL's M-RoPE gives a visual token (time, height, width) positions and a text
token the same number on all three axes, one more than the largest position before it. An
answer's token t therefore sits at `next_position + t` (the prompt's largest position + 1 + t),
which get_rope_index's positions of the prompt give. Positions are always passed explicitly:
left to itself the model reuses `rope_deltas` kept from its previous call, which belong to
another batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class PromptCache:
    """B prompts after one forward. keys, values: one (B, kv_heads, P, head_dim) tensor per layer
    (after the rotary embedding, as attention reads them); last_hidden: (B, H) the final state of
    each prompt's last token (it predicts the first answer token); attention_mask: (B, P), left
    padding 0; next_position: (B,) the M-RoPE position of each prompt's first answer token."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_hidden: torch.Tensor
    attention_mask: torch.Tensor
    next_position: torch.Tensor


def tensors(cache: PromptCache) -> list[torch.Tensor]:
    """The tensors of the cache that gradients flow through."""
    return [*cache.keys, *cache.values, cache.last_hidden]


class _Recorder(DynamicLayer):
    """One layer's cache during the prompt's forward: keeps the keys and values it is given. A
    gradient-checkpointing replay of the layer records its recomputed (equal) ones again, harmlessly."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _ReadOnly(DynamicLayer):
    """One layer's prompt keys and values (N, kv_heads, P, head_dim), read and never extended: new
    tokens attend to the prompt and to each other, and a gradient-checkpointing replay of the layer
    sees exactly what its first pass saw (a growing cache would give it twice the tokens)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


class _Growing(DynamicLayer):
    """One layer's keys and values while sampling: the prompt's, then each new token's, written in
    place into room reserved for them (a concatenating cache copies all of itself at every token)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        n, heads, _, dim = keys.shape
        self.buffers = [torch.cat([t, t.new_empty(n, heads, room, dim)], -2) for t in (keys, values)]
        self.keys, self.values, self.is_initialized = keys, values, True

    def update(self, key_states, value_states, *args, **kwargs):
        start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, start:end] = new
        self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
        return self.keys, self.values


@contextmanager
def _cache_kept_under_checkpointing(model):
    """Under gradient checkpointing transformers' decoder layers drop the cache they are given (a
    growing cache would be extended twice, once more by the replay), unless a layer declares that it
    only reads it. Ours only read (_ReadOnly) or overwrite with equal values (_Recorder)."""
    layers = model.model.language_model.layers
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor,
            mm_token_type_ids: torch.Tensor, **vision) -> PromptCache:
    """The prompts' forward, once: (B, P) left-padded ids, their pictures' grids and token types
    (1 at the image placeholders: what selects the 3-D positions) -> PromptCache. vision:
    pixel_values or mm_encoder_outputs, as model.model takes them. Differentiable when grad is on."""
    positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
                                              attention_mask=attention_mask)
    layers = [_Recorder() for _ in model.model.language_model.layers]
    with _cache_kept_under_checkpointing(model):
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             image_grid_thw=image_grid_thw, cache=Cache(layers=layers), use_cache=False,
                             **vision).last_hidden_state
    # The last prompt token is text ("assistant\n"): its three positions are equal.
    return PromptCache([r.keys for r in layers], [r.values for r in layers], hidden[:, -1], attention_mask,
                       positions[0, :, -1] + 1)


def completion_hidden(model, cache: PromptCache, prompt_of_row: list[int], ids: torch.Tensor,
                      attention: torch.Tensor) -> torch.Tensor:
    """The states that predict each answer token: (N, C) ids -> (N, C, H), row n answering prompt
    prompt_of_row[n]; attention: (N, C), 0 after the answer's end. Token t is predicted by the
    state before it: the prompt's last for t = 0, else token t-1's (the last token predicts
    nothing scored, so it is not run)."""
    rows = torch.as_tensor(prompt_of_row, device=ids.device)
    first = cache.last_hidden[rows].unsqueeze(1)
    c = ids.shape[1] - 1
    if c == 0:
        return first
    layers = [_ReadOnly(k[rows], v[rows]) for k, v in zip(cache.keys, cache.values)]
    mask = torch.cat([cache.attention_mask[rows], attention[:, :-1].to(cache.attention_mask)], 1)
    positions = (cache.next_position[rows, None] + torch.arange(c, device=ids.device)).expand(3, -1, -1)
    with _cache_kept_under_checkpointing(model):
        hidden = model.model(input_ids=ids[:, :-1], attention_mask=mask, position_ids=positions,
                             cache=Cache(layers=layers), use_cache=False).last_hidden_state
    return torch.cat([first, hidden], 1)


def detached(cache: PromptCache) -> PromptCache:
    """The cache with its tensors as fresh leaves: each micro-batch back-propagates into them (their
    .grad sums over micro-batches), and backward(cache, leaves) then runs the prompt's backward once."""
    def leaf(t):
        return t.detach().requires_grad_(t.requires_grad)

    return replace(cache, keys=[leaf(k) for k in cache.keys], values=[leaf(v) for v in cache.values],
                   last_hidden=leaf(cache.last_hidden))


def backward(cache: PromptCache, leaves: PromptCache) -> None:
    """The gradients gathered on `leaves` (detached(cache)) through the prompt's forward: its
    language model and vision tower, once for the whole batch."""
    pairs = [(t, leaf.grad) for t, leaf in zip(tensors(cache), tensors(leaves))
             if t.requires_grad and leaf.grad is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _next_token(logits: torch.Tensor, config) -> torch.Tensor:
    """(N, V) float32 logits -> (N,) tokens, chosen as generate chooses them: suppressed ids to
    -inf, then (sampling) logits / temperature, top-k, one multinomial draw per row."""
    if config.suppress_tokens:
        logits[:, config.suppress_tokens] = float("-inf")
    if not config.do_sample:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


@torch.no_grad()
def sample(model, cache: PromptCache, config, all_finished=None) -> torch.Tensor:
    """G answers per prompt, token by token -> (B*G, C) ids, rows grouped by prompt.

    config: the GenerationConfig generate would take (preresq.sampling_config); this reads its
    num_return_sequences (G), max_new_tokens, do_sample, temperature, top_k, suppress_tokens,
    eos_token_id and pad_token_id, and nothing else. A row that has written the end-of-turn token
    continues with pad_token_id; the loop stops when every row has. Every row draws at every
    step, as in generate, so the same seed draws the same random numbers. all_finished(finished) ->
    whether every process has finished (generate's synced_gpus: a sharded model's processes must run
    the same forwards, so one that has finished keeps stepping, its steps discarded); default: this one.
    """
    g, end, pad = config.num_return_sequences, config.eos_token_id, config.pad_token_id
    rows = torch.arange(cache.last_hidden.shape[0], device=cache.last_hidden.device).repeat_interleave(g)
    kv = Cache(layers=[_Growing(k[rows], v[rows], config.max_new_tokens) for k, v in zip(cache.keys, cache.values)])
    mask, hidden = cache.attention_mask[rows], cache.last_hidden[rows]
    done = torch.zeros_like(rows, dtype=torch.bool)
    out, finished = [], False
    for t in range(config.max_new_tokens):
        if not finished:
            token = _next_token(model.lm_head(hidden).float(), config).masked_fill(done, pad)
            out.append(token)
            done |= token == end
            finished = bool(done.all()) or len(out) == config.max_new_tokens
        if (all_finished(finished) if all_finished else finished) or t + 1 == config.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = (cache.next_position[rows] + t).expand(3, -1).unsqueeze(-1)  # (3, N, 1)
        hidden = model.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=kv,
                             use_cache=True).last_hidden_state[:, -1]
    return torch.stack(out, 1)
