"""How many GRPO steps does a reward need when perception is perfect? A tabular policy.

    python tools/reward_signal.py                   # every reward, two learning rates

The policy is a 5 x 5 table of logits: the first digit of the score (1..5) given a caption bin
(0..4) that reports the image's distortion level with noise (as the preset's reasoning does).
Each step draws B = 8 images of the synthetic MOS levels, samples G = 8 scores per image (digit
plus a uniform fraction, the same for all five aspects), scores them with the reward, and takes
one Adam step on the GRPO objective with group advantages (grpo.group_advantages). Held-out
SRCC: 4 sampled answers averaged per image over 120 images, as the demo evaluates. The gap is
the expected first digit after caption 0 minus after caption 4.
"""
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import rewards  # noqa: E402

MOS_LEVELS = np.array([5.0, 4.2, 3.4, 2.6, 1.8, 1.0])  # synthetic.synthetic_mos(0..5)


def run(reward: str, lr: float, steps: int = 200, b: int = 8, g: int = 8, seed: int = 0) -> list[tuple]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def caption(level: int) -> int:
        return int(np.clip(round(level * 4 / 5 + rng.normal(0, 0.8)), 0, 4))

    logits = torch.zeros(5, 5, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    out = []
    for step in range(steps + 1):
        if step % 25 == 0:
            levels = np.repeat(np.arange(6), 20)
            caps = torch.tensor([caption(v) for v in levels])
            with torch.no_grad():
                p = torch.softmax(logits[caps], -1)
                sampled = torch.distributions.Categorical(probs=p).sample((4,)).float().mean(0)
                expected = (torch.softmax(logits, -1) * torch.arange(1, 6)).sum(-1)
            out.append((step, spearmanr(sampled, MOS_LEVELS[levels]).statistic, (expected[0] - expected[4]).item()))
        if step == steps:
            break
        levels = rng.integers(0, 6, b)
        mos = torch.tensor(MOS_LEVELS[levels], dtype=torch.float32)
        dist = torch.distributions.Categorical(logits=logits[torch.tensor([caption(v) for v in levels])])
        digits = dist.sample((g,)).T  # (B, G)
        scores = ((digits + 1).float() + torch.rand(b, g))[..., None].expand(b, g, 5)
        fn = rewards.preresq_reward if reward == "preresq" else rewards.REWARDS[reward]
        advantages = grpo.group_advantages(fn(scores, mos)["total"], "group")
        loss = -(advantages * dist.log_prob(digits.T).T).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


def main() -> int:
    for lr in (3e-2, 1e-2):
        for reward in ("preresq", "gaussian", "threshold", "fidelity"):
            row = run(reward, lr)
            print(f"{reward:9s} lr {lr:g}: " + " | ".join(f"{s}: SRCC {r:.2f} gap {gap:.2f}" for s, r, gap in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
