"""One GRPO step of PreResQ-R1 with nothing of this project but rewards.py, preresq.py, grpo.py and
support/prompt_sharing.py: copy those four files into your own project, then

    python one_step.py MODEL_FOLDER

MODEL_FOLDER: any Qwen2.5-VL folder written by save_pretrained (this repository ships models/tiny).
"""
import sys
from types import SimpleNamespace

import torch
from PIL import Image, ImageFilter

import grpo
import preresq

folder = sys.argv[1] if len(sys.argv) > 1 else "models/tiny"
policy = preresq.Policy(*preresq.load_model(folder, "cpu"))     # the model side: model, tokenizer, processor
reference = preresq.Policy(*preresq.load_model(folder, "cpu"))  # the frozen initial model
reference.model.requires_grad_(False)

# Four pictures and their mean opinion scores (1..5): a sharp one and three ever blurrier copies.
sharp = Image.effect_noise((112, 112), 60).convert("RGB")
pictures = [sharp.filter(ImageFilter.GaussianBlur(r)) for r in (0, 1, 2, 4)]
items = [SimpleNamespace(path=f"picture-{k}", mos=mos) for k, mos in enumerate((4.5, 3.5, 2.5, 1.5))]
batch = grpo.Batch(step=0, groups=[grpo.Group(items, [[p] for p in pictures])])

# The paper's method at laptop scale: G = 4 answers per picture (8 in stage 1), answers of 48 tokens.
cfg = grpo.Settings(images_per_step=4, num_generations=4, max_new_tokens=48, lr=1e-4, steps=2).resolve()
optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.lr)
before = [p.detach().clone() for p in policy.model.parameters()]

torch.manual_seed(0)
done = grpo.grpo_step(policy, reference, batch, cfg, optimizer)

rollout, scored = done.rollouts[0], done.scored[0]
terms, advantages = scored.terms, scored.advantages  # (B, G) each term; (B*G,)
print(f"stage {grpo.explore_stable(cfg, 0).number}: mean reward {terms['total'].mean():.3f}, "
      f"parsed {scored.valid.float().mean():.0%}, KL {done.stats['kl']:.4f}, "
      f"grad norm {done.stats['grad_norm']:.3f}")
g = rollout.num_generations
best = int(advantages[:g].argmax())  # picture 0's answers are rows 0..G-1
print(f"best answer to picture 0 (advantage {advantages[best]:+.2f}, "
      f"{ {k: round(v[0, best].item(), 3) for k, v in terms.items()} }):\n{rollout.texts[best]}")
moved = sum(int(not torch.equal(a, b)) for a, b in zip(before, policy.model.parameters()))
print(f"{moved} of {len(before)} weight tensors updated")
