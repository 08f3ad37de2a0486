"""Reference computations the tests compare the shared-prompt path against: the model's own forward
over each row's whole prompt + answer (pictures and all, positions left to the model), and
transformers' generate. They run each prompt once per answer, which is why training does not."""
import torch

import preresq


def joined_logits(model, batch: preresq.PromptBatch, comp, attention, g: int, rows: slice | None = None):
    """(N, C) answers, rows grouped by prompt (or the rows `rows` of that layout) -> (N, C, V) float32
    logits of the states that predict each answer token, from one forward per row."""
    prompt_of_row = [r // g for r in range(batch.input_ids.shape[0] * g)[rows or slice(None)]]
    patches = batch.image_grid_thw.prod(-1)
    per_prompt = [int(p.sum()) for p in patches.split(batch.pictures_per_prompt)]
    pixels, grids = batch.pixel_values.split(per_prompt), batch.image_grid_thw.split(batch.pictures_per_prompt)
    ids = torch.cat([batch.input_ids[prompt_of_row], comp], 1)
    mask = torch.cat([batch.attention_mask[prompt_of_row], attention.to(batch.attention_mask)], 1)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pixels[b] for b in prompt_of_row]),
                image_grid_thw=torch.cat([grids[b] for b in prompt_of_row]),
                mm_token_type_ids=preresq.mm_token_type_ids(model, ids))
    return out.logits[:, -comp.shape[1] - 1:-1].float()


def joined_logprobs(model, batch, comp, attention, *, temperature: float, num_generations: int,
                    suppressed: list[int], rows: slice | None = None):
    """What preresq.completion_logprobs computes, the unshared way: (N, C), 0 after each answer's end."""
    logits = joined_logits(model, batch, comp, attention, num_generations, rows) / temperature
    logits[..., suppressed] = float("-inf")
    keep = attention.bool()
    targets = comp.masked_fill(~keep, 0)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return logp.masked_fill(~keep, 0.0)


@torch.no_grad()
def generate(model, tokenizer, batch: preresq.PromptBatch, num_generations: int, **settings):
    """transformers' generate with the sampler's complete GenerationConfig -> (B*G, C) answers."""
    config = preresq.sampling_config(tokenizer, num_generations=num_generations, **settings)
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=preresq.mm_token_type_ids(model, batch.input_ids), generation_config=config)
    return out[:, batch.input_ids.shape[1]:]
