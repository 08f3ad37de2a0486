"""rewards.py: hand-worked numbers per term, a literal plain-Python reference on random batches,
symmetry and monotonicity properties, NaN-free edge cases, and a fuzz test of the parser."""

import math
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards
from support import rewards_reference
from rewards import (aspect_spread_penalty, fidelity_reward, format_reward, gaussian_reward,
                     group_rank, pairwise_fidelity, parse_answer, parse_completions,
                     preresq_reward, threshold_reward, triplet_accuracy, triplet_balance)

NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(got, want, tol=1e-6):
    want = torch.as_tensor(want).to(torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got.double(), want, atol=tol, rtol=0), (got, want)


# ---------------------------------------------------------------------------------------
# Hand-worked examples, one per term
# ---------------------------------------------------------------------------------------


def test_aspect_spread_penalty_by_hand():
    # A = 2: (3.0, 3.4) sigma 0.2 -> 0.5 * (0.5 - 0.2) = 0.15; (2, 4) sigma 1 -> 0;
    # (3, 3) sigma 0 -> 0.25 (the maximum); the invalid rollout -> 0 whatever it holds.
    scores = t([[[3.0, 3.4], [2.0, 4.0], [3.0, 3.0], [NAN, NAN]]])
    valid = torch.tensor([[True, True, True, False]])
    close(aspect_spread_penalty(scores, valid), [[0.15, 0.0, 0.25, 0.0]])
    # A = 5, all equal -> 0.25; (2.8, 3.2, 3, 3, 3): var 0.08/5 = 0.016, sigma 0.126491
    # -> 0.5 * (0.5 - 0.126491) = 0.186754.
    scores = t([[[3.0] * 5, [2.8, 3.2, 3.0, 3.0, 3.0]]])
    close(aspect_spread_penalty(scores), [[0.25, 0.186754]], tol=1e-6)


def test_triplet_balance_by_hand():
    # Image 0, A = 2, G = 4: every rollout is in 3 of the 4 triples -> denominator 3 * 2 = 6.
    #   aspect 1: r0 3.00, r1 3.02, r2 3.50, r3 2.00
    #     (0,1,2): middle r1, r0 0.02 away scores           r0 1, r1 1
    #     (0,1,3): middle r0, r1 0.02 away scores           r0 1, r1 1
    #     (0,2,3): middle r0                                r0 1
    #     (1,2,3): middle r1                                r1 1       -> r0 3, r1 3
    #   aspect 2: r0 2.00, r1 2.50, r2 3.00, r3 2.04
    #     (0,1,2): middle r1                                r1 1
    #     (0,1,3): middle r3, r0 0.04 away scores           r3 1, r0 1
    #     (0,2,3): middle r3, r0 scores                     r3 1, r0 1
    #     (1,2,3): middle r1                                r1 1       -> r0 2, r1 2, r3 2
    #   -> r0 5/6, r1 5/6, r2 0, r3 2/6.
    # Image 1, r3 unparsed: only triple (0,1,2), denominator 1 * 2.
    #   aspect 1: 1.00, 1.03, 4.00 -> middle r1, r0 0.03 away scores  -> r0 1, r1 1
    #   aspect 2: 1.00, 5.00, 1.06 -> middle r2, r0 0.06 away does not -> r2 1
    #   -> r0 1/2, r1 1/2, r2 1/2, r3 0.
    scores = t([[[3.00, 2.00], [3.02, 2.50], [3.50, 3.00], [2.00, 2.04]],
                [[1.00, 1.00], [1.03, 5.00], [4.00, 1.06], [NAN, NAN]]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    close(triplet_balance(scores, valid), [[5 / 6, 5 / 6, 0.0, 2 / 6], [0.5, 0.5, 0.5, 0.0]])


def test_triplet_balance_counts_all_aspects_and_reads_the_tolerance_in_decimals():
    # Aspects 1-4 equal in all three rollouts (4 points each); the background (aspect 5) is
    # 1, 3, 5: only the middle scores. Denominator 1 triple x 5 aspects.
    # The authors' code looked at 4 aspects only and would give 1, 1, 1.
    scores = t([[[3, 3, 3, 3, 1], [3, 3, 3, 3, 3], [3, 3, 3, 3, 5]]])
    close(triplet_balance(scores), [[4 / 5, 1.0, 4 / 5]])
    # 3.25 is exactly 0.05 below the middle 3.30: not "within < 0.05"; 3.26 is.
    close(triplet_balance(t([[[3.25], [3.30], [4.00]]])), [[0.0, 1.0, 0.0]])
    close(triplet_balance(t([[[3.26], [3.30], [4.00]]])), [[1.0, 1.0, 0.0]])


def test_pairwise_fidelity_by_hand():
    # g = (4, 2), gap 2. Sorted predictions: image 0 (3.5, 4.0, 4.5), image 1 (2.0, 3.0, 4.5).
    #   rank 0: 3.5 vs 2.0, order right, errors 0.5 + 0 -> s = 2/2.5 = 0.8, sqrt(0.8) = 0.894427
    #   rank 1: 4.0 vs 3.0, order right, errors 0 + 1 -> s = 2/3,        sqrt(2/3) = 0.816497
    #   rank 2: 4.5 vs 4.5, tie vs 4 > 2: wrong, errors 0.5 + 2.5 -> s = 0.4, sqrt(0.6) = 0.774597
    # The rollouts are listed out of order; each gets its rank's term (B = 2: one partner).
    p = t([[4.5, 3.5, 4.0], [2.0, 4.5, 3.0]])
    close(pairwise_fidelity(p, t([4.0, 2.0])),
          [[0.774597, 0.894427, 0.816497], [0.894427, 0.774597, 0.816497]])


def test_pairwise_fidelity_ties_share_the_mean_of_their_ranks():
    # g = (3, 2), gap 1. Sorted: image 0 (3, 3, 4), image 1 (1, 2, 5).
    #   rank 0: 3 vs 1 right, errors 0 + 1 -> s = 1/2, sqrt(.5) = 0.707107
    #   rank 1: 3 vs 2 right, errors 0 + 0 -> s = 1,   1
    #   rank 2: 4 vs 5 wrong, errors 1 + 3 -> s = 1/5, sqrt(.8) = 0.894427
    # The two 3s of image 0 occupy ranks 0 and 1: each gets (0.707107 + 1) / 2 = 0.853553.
    p = t([[3.0, 4.0, 3.0], [1.0, 2.0, 5.0]])
    close(pairwise_fidelity(p, t([3.0, 2.0])),
          [[0.853553, 0.894427, 0.853553], [0.707107, 1.0, 0.894427]])


def test_pairwise_fidelity_partner_when_valid_counts_differ():
    # Image 0: 3 valid (2, 3, 4), g 3; image 1: one valid (2.5), g 2; gap 1.
    # Partner of image 0's rank k: floor((k + 1/2) * 1/3) = 0 -> 2.5 for every k.
    #   k0: 2 vs 2.5 wrong, errors 1 + 0.5 -> s = 0.4, sqrt(0.6) = 0.774597
    #   k1: 3 vs 2.5 right, errors 0 + 0.5 -> s = 2/3, sqrt(2/3) = 0.816497
    #   k2: 4 vs 2.5 right, errors 1 + 0.5 -> s = 0.4, sqrt(0.4) = 0.632456
    # Partner of image 1's rank 0: floor(1/2 * 3/1) = 1 -> image 0's median 3:
    #   2.5 vs 3 right, errors 0.5 + 0 -> s = 2/3 -> 0.816497.
    p = t([[2.0, 3.0, 4.0], [NAN, 2.5, NAN]])
    valid = torch.tensor([[True, True, True], [False, True, False]])
    close(pairwise_fidelity(p, t([3.0, 2.0]), valid),
          [[0.774597, 0.816497, 0.632456], [0.0, 0.816497, 0.0]])


def test_pairwise_fidelity_known_defects_and_nan_guard():
    g = t([4.0, 2.0])
    # Wrong order, errors 3 and 3: s = 2/8, sqrt(1 - 0.25) = 0.866025 ...
    close(pairwise_fidelity(t([[1.0], [5.0]]), g), [[0.866025], [0.866025]])
    # ... more than the right order with errors 1 and 0.5: s = 2/3.5, sqrt(4/7) = 0.755929.
    close(pairwise_fidelity(t([[3.0], [2.5]]), g), [[0.755929], [0.755929]])
    # Equal MOS, both exact: 0/0 in the authors' code; here 1.
    close(pairwise_fidelity(t([[3.0], [3.0]]), t([3.0, 3.0])), [[1.0], [1.0]])
    # Equal MOS, s = 0: different predictions score 1, equal inexact ones 0.
    close(pairwise_fidelity(t([[3.5], [2.5]]), t([3.0, 3.0])), [[1.0], [1.0]])
    close(pairwise_fidelity(t([[3.5], [3.5]]), t([3.0, 3.0])), [[0.0], [0.0]])
    # B = 1: no other image -> 0.
    close(pairwise_fidelity(t([[3.0, 4.0]]), t([3.0])), [[0.0, 0.0]])


def test_triplet_accuracy_by_hand():
    # g = (1, 2, 3); each rank meets the same ranks of the two other images (one pair).
    #   rank 0: (1.0, 1.5, 2.8) all three pairs in MOS order                -> 1
    #   rank 1: (2.5, 2.0, 3.0) (0,1) wrong, (1,2) right, (0,2) right       -> 2/3
    #   rank 2: (4.0, 3.0, 3.5) (0,1) wrong, (1,2) right, (0,2) wrong       -> 1/3
    p = t([[4.0, 1.0, 2.5], [1.5, 3.0, 2.0], [3.5, 2.8, 3.0]])
    close(triplet_accuracy(p, t([1.0, 2.0, 3.0])),
          [[1 / 3, 1, 2 / 3], [1, 1 / 3, 2 / 3], [1 / 3, 1, 2 / 3]])


def test_triplet_accuracy_mos_tie_does_not_depend_on_image_order():
    # g = (2, 2, 3). Predictions 2.4, 2.6, 3: the pair (0,1) is ordered while the MOS is tied
    # -> miss; (1,2), (0,2) right -> 2/3 for all. The authors' `pred0 > pred1 == g0 > g1` would
    # count the first pair as right (1.0) in this order and wrong (2/3) with images 0, 1 swapped.
    close(triplet_accuracy(t([[2.4], [2.6], [3.0]]), t([2.0, 2.0, 3.0])), [[2 / 3]] * 3)
    close(triplet_accuracy(t([[2.6], [2.4], [3.0]]), t([2.0, 2.0, 3.0])), [[2 / 3]] * 3)
    # A predicted tie on the tied MOS matches it -> 1.
    close(triplet_accuracy(t([[2.5], [2.5], [3.0]]), t([2.0, 2.0, 3.0])), [[1.0]] * 3)
    # B = 2: no pair of other images -> 0.
    close(triplet_accuracy(t([[1.0], [2.0]]), t([1.0, 2.0])), [[0.0], [0.0]])


def test_group_rank_by_hand():
    # g = 3, predictions (3.01, 2.0, 4.0, 3.5), N = 4 + 1 = 5; sorted: 2.0, g, 3.01, 3.5, 4.0.
    #   3.01: within 0.02 -> 1
    #   2.0: next to g, delta 1 -> exp(-1/5) = 0.818731
    #   4.0: 3.01 and 3.5 between, delta 3 -> exp(-3/5) = 0.548812
    #   3.5: 3.01 between, delta 2 -> exp(-2/5) = 0.670320
    close(group_rank(t([[3.01, 2.0, 4.0, 3.5]]), t([3.0])), [[1.0, 0.818731, 0.548812, 0.670320]])


def test_group_rank_ties_and_invalid_and_tolerance():
    # g = 3, (2, 2, 4) valid, one unparsed: N = 3 + 1 = 4. The two 2s sit at delta 1 or 2 in
    # either order: (exp(-1/4) + exp(-2/4)) / 2 = 0.692666; 4 is next to g: exp(-1/4) = 0.778801.
    p = t([[2.0, NAN, 2.0, 4.0]])
    valid = torch.tensor([[True, False, True, True]])
    close(group_rank(p, t([3.0]), valid), [[0.692666, 0.0, 0.692666, 0.778801]])
    # 3.02 is 0.02 from g = 3: not "below 0.02"; it is next to g among 2 valid -> exp(-1/3).
    close(group_rank(t([[3.02, 1.0]]), t([3.0])), [[math.exp(-1 / 3), math.exp(-1 / 3)]])


def test_answers_with_equal_decimal_means_tie_in_every_term():
    # 2.99 3.21 4.11 4.90 4.92 and 3.08 3.21 4.11 4.81 4.92 both mean 4.026 (float32 means 5e-8
    # apart, float64 ones a bit apart). Image 0 (g 3.5) also holds all-4.0 and all-3.0 answers:
    # N = 5, sorted 3.0, g, 4.0, 4.026, 4.026, so the pair sits at delta 2 or 3 and each gets
    # (exp(-2/5) + exp(-3/5)) / 2 = 0.609566, not 0.670 and 0.549 apart.
    def answer(values):
        return "<think>ok</think><answer>" + "\n".join(values.split()) + "</answer>"
    group = ["2.99 3.21 4.11 4.90 4.92", "3.08 3.21 4.11 4.81 4.92", "4 4 4 4 4", "3 3 3 3 3"]
    others = [["2.10 2.30 2.20 2.00 2.40", "1.5 2.5 2 3 2", "2 2 2 2 2", "4.026 4.026 4.026 4.026 4.026"],
              ["4.50 4.40 4.60 4.30 4.70", "3 4 5 4 4", "4.03 4.02 4.03 4.02 4.03", "3.5 3.5 4.5 4.5 4"]]
    scores, valid, fmt = parse_completions([answer(v) for v in group + others[0] + others[1]], 5, 4)
    mos = torch.tensor([3.5, 2.2, 4.5], dtype=torch.float64)
    out = preresq_reward(scores, mos, valid, format_rewards=fmt)
    close(out["group_rank"][0, :2], [0.609566] * 2)
    for name in ("pair_fidelity", "triplet_accuracy", "group_rank"):
        assert out[name][0, 0] == out[name][0, 1], name
    want = rewards_reference.preresq_reward(*as_lists(scores, mos, valid, fmt))
    for name in want:
        close(out[name], want[name])


def test_preresq_reward_combination_by_hand():
    # B = 1 (R_pair = R_trip3 = 0), g = 3, A = 2:
    #   r0 (3, 3) p 3.0: P_std 0.25; r1 (2, 3) p 2.5, r2 (3, 4) p 3.5: sigma 0.5 -> P_std 0.
    #   R_tripbal (one triple, 2 aspects): aspect 1 (3, 2, 3) median 3 -> r0, r2; aspect 2
    #     (3, 3, 4) median 3 -> r0, r1.  r0 2/2 = 1, r1 1/2, r2 1/2.
    #   R_rank (N = 4): r0 exact -> 1; r1 and r2 are next to g but r0 ties with g, so delta is
    #     1 or 2: (exp(-1/4) + exp(-2/4)) / 2 = 0.692666.
    #   total r0 = 1 + (-0.25 + 0.25 * 1 + 1) / 3 = 1.333333
    #   total r1 = r2 = 1 + (0.25 * 0.5 + 0.692666) / 3 = 1.272555
    scores = t([[[3.0, 3.0], [2.0, 3.0], [3.0, 4.0]]])
    mos = t([3.0])
    out = preresq_reward(scores, mos)
    close(out["aspect_spread_penalty"], [[0.25, 0.0, 0.0]])
    close(out["triplet_balance"], [[1.0, 0.5, 0.5]])
    close(out["group_rank"], [[1.0, 0.692666, 0.692666]])
    close(out["pair_fidelity"], [[0.0, 0.0, 0.0]])
    close(out["total"], [[1.333333, 1.272555, 1.272555]])
    # Video: no R_rank, no /3: 1 + (-0.25 + 0.25) = 1.0; 1 + 0.125 = 1.125.
    close(preresq_reward(scores, mos, video=True)["total"], [[1.0, 1.125, 1.125]])
    # Preference branch only: 1 + 1/3; 1 + 0.692666/3 = 1.230889.
    close(preresq_reward(scores, mos, response_branch=False)["total"], [[1.333333, 1.230889, 1.230889]])
    # Response branch only: 1 + 0; 1 + 0.125/3 = 1.041667.
    close(preresq_reward(scores, mos, preference_branch=False)["total"], [[1.0, 1.041667, 1.041667]])
    # Stage 2 (w_std = 0) and a format reward from the text: r0 = 0 + (0.25 + 1)/3 = 0.416667.
    out = preresq_reward(scores, mos, format_rewards=t([[0.0, 1.0, 1.0]]), w_std=0.0)
    close(out["total"], [[0.416667, 1.272555, 1.272555]])
    # An unparsed rollout: 0 everywhere, and the others no longer see it (two valid, N = 3;
    # r1 2.5 and r0 = g: delta 1 or 2 -> (exp(-1/3) + exp(-2/3)) / 2 = 0.614974).
    valid = torch.tensor([[True, True, False]])
    out = preresq_reward(scores, mos, valid)
    for name, x in out.items():
        assert x[0, 2] == 0, name
    close(out["group_rank"], [[1.0, 0.614974, 0.0]])


def test_rivals_by_hand():
    # Fidelity: image 0 predictions (3, 4), g 4, mean 3.5, unbiased var 0.5; image 1 (2, 2),
    # g 2, mean 2, var 0. Denominator sqrt(0.5 + 0 + 1e-6) = 0.707108.
    #   (0,0): Phi(1/0.707108) = 0.921350, P* = 1: sqrt(0.921350 + 1e-6) + sqrt(1e-6) = 0.960870
    #   (0,1): Phi(2/0.707108) = 0.997661 -> 0.998830 + 0.001 = 0.999830
    #   (1,*): Phi(-1.5/0.707108) = 0.016948, P* = 0: 0.001 + sqrt(0.983053) = 0.992491
    scores = t([[[3.0], [4.0]], [[2.0], [2.0]]])
    mos = t([4.0, 2.0])
    out = fidelity_reward(scores, mos)
    close(out["fidelity"], [[0.960870, 0.999830], [0.992491, 0.992491]], tol=2e-6)
    close(out["total"], out["fidelity"] + 1)
    # Q-Insight: |p - 3| = 0.3 -> 1, 0.4 -> 0, 0.35 (exactly the threshold) -> 0, 0.34 -> 1.
    out = threshold_reward(t([[[3.3], [3.4], [2.65], [3.34]]]), t([3.0]))
    close(out["threshold"], [[1.0, 0.0, 0.0, 1.0]])
    # VQAThinker: exp(-d^2 / 0.5): d = 0 -> 1, 0.5 -> exp(-0.5) = 0.606531, 1 -> exp(-2) = 0.135335.
    out = gaussian_reward(t([[[3.0], [3.5], [2.0]]]), t([3.0]), format_rewards=t([[1.0, 0.0, 1.0]]))
    close(out["gaussian"], [[1.0, 0.606531, 0.135335]])
    close(out["total"], [[2.0, 0.606531, 1.135335]])


# ---------------------------------------------------------------------------------------
# A literal plain-Python reference, compared on random batches
# ---------------------------------------------------------------------------------------

def random_batch(rng, max_b=5, max_g=6):
    """Scores with ties, threshold-edge values, duplicated rollouts, tied MOS and unparsed
    rollouts (holding NaN, which must never leak)."""
    B, G = int(rng.integers(1, max_b + 1)), int(rng.integers(1, max_g + 1))
    A = int(rng.choice([1, 2, 5]))
    style = rng.integers(3)
    if style == 0:
        scores = rng.uniform(1, 5, (B, G, A))
    elif style == 1:
        scores = rng.choice([2.0, 2.5, 3.0, 3.5], (B, G, A))
    else:
        scores = np.round(rng.uniform(2.8, 3.4, (B, G, A)) * 50) / 50     # 2.80, 2.82, ... 3.40
    for _ in range(int(rng.integers(0, 3))):                                # identical answers
        i, j, k = rng.integers(B), rng.integers(G), rng.integers(G)
        scores[i, j] = scores[i, k]
    if rng.random() < 0.4:
        mos = rng.choice([2.0, 3.0, 3.02, 3.1], B)
    else:
        mos = np.round(rng.uniform(1, 5, B), 2)
    valid = rng.random((B, G)) >= rng.choice([0.0, 0.0, 0.2, 0.5, 1.0])
    scores[~valid] = np.nan
    fmt = (valid & (rng.random((B, G)) < 0.8)).astype(np.float32)
    return (torch.tensor(scores, dtype=torch.float32), torch.tensor(mos, dtype=torch.float32),
            torch.tensor(valid), torch.tensor(fmt))


def as_lists(scores, mos, valid, fmt):
    return scores.double().tolist(), mos.double().tolist(), valid.tolist(), fmt.double().tolist()


@pytest.mark.parametrize("seed", range(4))
def test_matches_literal_reference_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        scores, mos, valid, fmt = random_batch(rng)
        video, response, preference = (bool(x) for x in rng.random(3) < [0.3, 0.8, 0.8])
        got = preresq_reward(scores, mos, valid, format_rewards=fmt, video=video,
                             response_branch=response, preference_branch=preference)
        want = rewards_reference.preresq_reward(*as_lists(scores, mos, valid, fmt), video=video,
                           response=response, preference=preference)
        assert set(got) == set(want)
        for name in want:
            close(got[name], want[name])
        want = rewards_reference.rival_rewards(*as_lists(scores, mos, valid, fmt))
        for name, fn in (("fidelity", fidelity_reward), ("threshold", threshold_reward),
                         ("gaussian", gaussian_reward)):
            out = fn(scores, mos, valid, format_rewards=fmt)
            assert set(out) == {"format", name, "total"}
            close(out[name], want[name])
            close(out["total"], (fmt + out[name]).tolist())


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

ALL = [(name, fn) for name, fn in rewards.REWARDS.items()]


@pytest.mark.parametrize("name,fn", ALL)
def test_permuting_rollouts_of_one_image_permutes_its_rewards(name, fn):
    rng = np.random.default_rng(1)
    for _ in range(60):
        scores, mos, valid, fmt = random_batch(rng)
        B, G = valid.shape
        i, perm = int(rng.integers(B)), torch.tensor(rng.permutation(G))
        s2, v2, f2 = scores.clone(), valid.clone(), fmt.clone()
        s2[i], v2[i], f2[i] = scores[i, perm], valid[i, perm], fmt[i, perm]
        before = fn(scores, mos, valid, format_rewards=fmt)
        after = fn(s2, mos, v2, format_rewards=f2)
        for term in before:
            expect = before[term].clone()
            expect[i] = before[term][i, perm]
            close(after[term], expect.tolist())


@pytest.mark.parametrize("name,fn", ALL)
def test_permuting_images_permutes_rows(name, fn):
    rng = np.random.default_rng(2)
    for _ in range(60):
        scores, mos, valid, fmt = random_batch(rng)
        perm = torch.tensor(rng.permutation(valid.shape[0]))
        before = fn(scores, mos, valid, format_rewards=fmt)
        after = fn(scores[perm], mos[perm], valid[perm], format_rewards=fmt[perm])
        for term in before:
            close(after[term], before[term][perm].tolist())


def test_perfect_predictions_score_highest_on_the_preference_terms():
    rng = np.random.default_rng(3)
    for _ in range(100):
        scores, mos, valid, _ = random_batch(rng)
        perfect = mos[:, None, None].expand_as(scores).clone()
        best = preresq_reward(perfect, mos, valid)
        out = preresq_reward(scores, mos, valid)
        for term in ("pair_fidelity", "triplet_accuracy", "group_rank"):
            # exact answers reach the top of each term wherever the term has partners
            assert torch.all(out[term] <= best[term] + 1e-6), term
            assert torch.all(best[term][valid] <= 1 + 1e-6), term


def test_moving_an_image_toward_its_mos_never_lowers_the_preference_terms():
    # MOS far apart and every prediction within 0.45 of its own MOS: every cross-image order is
    # right. Shrinking image i's predictions toward g_i keeps their order (so ranks and partners
    # stay), lowers every error, and keeps the orders right: nothing may go down, for any image.
    rng = np.random.default_rng(4)
    for _ in range(100):
        B, G = int(rng.integers(2, 6)), int(rng.integers(1, 7))
        mos = torch.tensor(rng.permutation([1.5, 2.5, 3.5, 4.5, 5.5])[:B], dtype=torch.float64)
        p = mos[:, None] + torch.tensor(rng.uniform(-0.45, 0.45, (B, G)))
        valid = torch.tensor(rng.random((B, G)) > 0.2)
        i, lam = int(rng.integers(B)), float(rng.uniform(0, 1))
        better = p.clone()
        better[i] = mos[i] + lam * (p[i] - mos[i])
        for term in (pairwise_fidelity, triplet_accuracy, group_rank):
            before, after = term(p, mos, valid), term(better, mos, valid)
            assert torch.all(after >= before - 1e-6), (term.__name__, before, after)


def test_putting_predictions_in_mos_order_maximises_triplet_accuracy():
    # One rollout per image; handing the same predictions out in MOS order makes every triple
    # right (1), which no other assignment beats.
    rng = np.random.default_rng(5)
    for _ in range(50):
        B = int(rng.integers(3, 7))
        mos = torch.tensor(rng.permutation(np.arange(1.0, 5.0, 0.5))[:B])
        p = torch.tensor(rng.uniform(1, 5, B))
        ordered = torch.empty_like(p)
        ordered[mos.argsort()] = p.sort().values
        before = triplet_accuracy(p[:, None], mos)
        after = triplet_accuracy(ordered[:, None], mos)
        close(after, [[1.0]] * B)
        assert torch.all(after >= before)


def test_closer_predictions_never_score_lower_on_the_rival_score_terms():
    rng = np.random.default_rng(6)
    mos = torch.tensor([3.0])
    err = torch.tensor(rng.uniform(0, 3, 200))
    closer = err * torch.tensor(rng.uniform(0, 1, 200))
    for fn, term in ((threshold_reward, "threshold"), (gaussian_reward, "gaussian")):
        far = fn((3 + err)[None, :, None], mos)[term]
        near = fn((3 - closer)[None, :, None], mos)[term]
        assert torch.all(near >= far)


# ---------------------------------------------------------------------------------------
# Edge cases: finite for every input, clear errors for bad input
# ---------------------------------------------------------------------------------------

EDGES = {
    "B=1,G=1": (t([[[3.0, 3.0]]]), t([3.0]), None),
    "B=1": (t([[[1.0], [2.0], [5.0]]]), t([2.0]), None),
    "G=1": (t([[[1.0]], [[2.0]], [[3.0]]]), t([1.0, 2.0, 3.0]), None),
    "all invalid": (torch.full((3, 4, 5), NAN), t([1.0, 2.0, 3.0]),
                    torch.zeros(3, 4, dtype=torch.bool)),
    "one valid": (t([[[3.0], [NAN]], [[NAN], [NAN]]]), t([1.0, 5.0]),
                  torch.tensor([[True, False], [False, False]])),
    "all equal": (torch.full((4, 6, 5), 3.0), torch.full((4,), 3.0), None),
    "equal mos, exact": (torch.full((3, 3, 2), 2.0), torch.full((3,), 2.0), None),
    "extremes": (t([[[0.0], [100.0]], [[100.0], [0.0]]]), t([1.0, 5.0]), None),
}


@pytest.mark.parametrize("case", list(EDGES))
@pytest.mark.parametrize("name,fn", ALL)
def test_edge_cases_stay_finite(case, name, fn):
    scores, mos, valid = EDGES[case]
    kwargs = [{}, {"video": True}] if fn is preresq_reward else [{}]
    for kw in kwargs:
        out = fn(scores, mos, valid, **kw)
        for term, x in out.items():
            assert x.shape == scores.shape[:2] and x.dtype == torch.float32, term
            assert torch.isfinite(x).all(), (case, term, x)
            if valid is not None:
                assert torch.all(x[~valid] == 0), (case, term)


def test_bad_input_is_refused_with_a_clear_message():
    scores, mos = torch.rand(2, 3, 5) + 1, torch.tensor([2.0, 3.0])
    with pytest.raises(ValueError, match=r"scores \(B, G, A\)"):
        preresq_reward(scores[0], mos)
    with pytest.raises(ValueError, match="mos must hold B = 2"):
        preresq_reward(scores, torch.tensor([2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        preresq_reward(scores, mos, torch.ones(2, 3))
    bad = scores.clone()
    bad[1, 2, 0] = NAN
    with pytest.raises(ValueError, match=r"non-finite score at \(1, 2, 0\)"):
        fidelity_reward(bad, mos)
    with pytest.raises(ValueError, match="format_rewards"):
        gaussian_reward(scores, mos, format_rewards=torch.ones(3, 2))
    with pytest.raises(ValueError, match="groups of 4"):
        parse_completions(["a"] * 6, 5, 4)


# ---------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------

GOOD = ("<think>The colours are dull and the background is noisy.</think>\n"
        "<answer>3.25\n2\n4.10\n3.5\n1.75</answer>")


@pytest.mark.parametrize("text,want", [
    (GOOD, [3.25, 2.0, 4.10, 3.5, 1.75]),
    ("<answer> 3.25 2 4.1 3.5 1.75 </answer>", [3.25, 2.0, 4.1, 3.5, 1.75]),
    ("<answer>3.25, 2, 4.1; 3.5,1.75</answer>", [3.25, 2.0, 4.1, 3.5, 1.75]),
    ("<answer>\nSaturation: 3.2\nGranularity: 2\nSharpness: 4.\nForeground quality: .5\n"
     "Background:1.75\n</answer>", [3.2, 2.0, 4.0, 0.5, 1.75]),
    ("<answer>1 1 1 1 1</answer> changed my mind <answer>2 2 2 2 2</answer>", [2.0] * 5),
    ("<think>x</think><answer>1 2 3 4 5</answer><answer>1 2 3", None),      # last one cut off
    ("<answer>1 2 3 4</answer>", None),                                     # four, not five
    ("<answer>1 2 3 4 5 6</answer>", None),
    ("<answer>3.2 out of 5, 3, 3, 3, 3</answer>", None),                    # words after a number
    ("<answer>-1 2 3 4 5</answer>", None),                                  # signed
    ("<answer>1e2 2 3 4 5</answer>", None),                                 # exponent
    ("<answer>3/5 2 3 4 5</answer>", None),
    ("<answer>nan 2 3 4 5</answer>", None),
    ("<answer>101 2 3 4 5</answer>", None),                                 # above MAX_RATING
    ("<answer>1 2 3 4 5", None),
    ("no answer here 1 2 3 4 5", None),
    ("<answer>1.2.3 2 3 4 5</answer>", None),
    ("<answer>1 2 3 4 ٥</answer>", None),                                   # non-ASCII digit
])
def test_parse_answer_examples(text, want):
    assert parse_answer(text, 5) == want


def test_format_reward_is_strict():
    assert format_reward(GOOD, 5) == 1.0
    assert format_reward("<think>a\nb</think><answer>\n1\n2 \n3\n4\n5\n</answer>", 5) == 1.0
    assert format_reward("<think>v</think><answer>4.5\n3.0</answer>", 2) == 1.0
    for text in ["  " + GOOD, GOOD + "\n", GOOD.replace("<think>", ""),
                 GOOD.replace("\n1.75", " 1.75"),                 # not one per line
                 GOOD.replace("4.10", "Sharpness: 4.10"),         # labels: parse yes, format no
                 GOOD.replace("3.5", "-3.5"), GOOD.replace("\n1.75", ""), GOOD.replace("3.5", "350")]:
        assert format_reward(text, 5) == 0.0, text
    assert parse_answer(GOOD.replace("4.10", "Sharpness: 4.10"), 5) is not None
    assert format_reward(None, 5) == 0.0


# The authors' format regexes (grpo_preres_IQA_r1, grpo_preres_VQA_r1), as peers.
AUTHORS_IMAGE_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>(?:\s*\d+\.?\d*\s*\n){4}\s*\d+\.?\d*\s*</answer>",
                                  re.DOTALL)
AUTHORS_VIDEO_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>(?:\s*\d+\.?\d*\s*\n){2}\s*</answer>", re.DOTALL)


def test_video_format_is_the_image_rule_which_the_authors_video_regex_tightens():
    """Our video check is the image one with two scores: no newline needed after the last score,
    as in the authors' image regex; their video regex requires one. The docs say which."""
    bare, closed = "<think>v</think><answer>3.5\n4.0</answer>", "<think>v</think><answer>3.5\n4.0\n</answer>"
    assert format_reward(bare, 2) == format_reward(closed, 2) == 1.0
    assert AUTHORS_VIDEO_FORMAT.fullmatch(bare) is None and AUTHORS_VIDEO_FORMAT.fullmatch(closed)
    assert AUTHORS_IMAGE_FORMAT.fullmatch(GOOD) and format_reward(GOOD, 5) == 1.0
    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "docs/method.md"):
        text = " ".join((root / doc).read_text().split())
        at = text.find(r"`<answer>3.5\n4.0</answer>`")
        assert at >= 0 and "rejects" in text[at:at + 200] and "looser" not in text, doc


def test_parse_completions_builds_reward_inputs():
    texts = [GOOD, "garbage", GOOD.replace("4.10", "Sharpness: 4.10"), "<answer>1 1 1 1 1</answer>"]
    scores, valid, fmt = parse_completions(texts, 5, 2)
    assert scores.shape == (2, 2, 5) and scores.dtype == torch.float64
    assert valid.tolist() == [[True, False], [True, True]]
    assert fmt.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    close(scores[0, 0], [3.25, 2.0, 4.10, 3.5, 1.75])
    assert torch.all(scores[0, 1] == 0)


_TOKENS = ["<answer>", "</answer>", "<think>", "</think>", "<answer", "answer>", "0", "1", "2.5",
           "3.", ".5", "5", "007", "99999999999999999999999999999999999999999999", "1e9", "-", "+",
           ".", "..", ",", ";", ":", " ", "  ", "\n", "\t", "\r\n", "Saturation", "quality ",
           "(", ")", "/", "_", "nan", "inf", "NaN", "e", "٣", "１", "\u00a0", "\x00", "é", "🙂",
           "100", "100.0001", "\\d", "*", "[", "]"]
_NUMBER_TOKEN = "[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+"


def _numbers_in_last_block(text):
    import re
    body = text[text.rfind("<answer>"):]
    return {float(x) for x in re.findall(_NUMBER_TOKEN, body)}


def test_parse_answer_fuzz():
    rng = random.Random(0)
    found = 0
    start = time.perf_counter()
    for n in range(20000):
        A = rng.choice([1, 2, 5])
        if n % 3 == 0:      # random characters
            text = "".join(rng.choice("<>/answer0123456789.,;: \n-eaS")
                           for _ in range(rng.randrange(60)))
        elif n % 3 == 1:    # adversarial token soup
            text = "".join(rng.choice(_TOKENS) for _ in range(rng.randrange(40)))
        else:               # near-valid answers with one mutation
            count = A + rng.choice([-1, 0, 0, 0, 1])
            nums = [f"{rng.uniform(0, 6):.{rng.randrange(4)}f}" for _ in range(count)]
            text = "<think>t</think><answer>" + rng.choice(["\n", " ", ", "]).join(nums) + "</answer>"
            k = rng.randrange(len(text) + 1)
            text = text[:k] + rng.choice(_TOKENS) + text[k:]
        got = parse_answer(text, A)
        if got is None:
            assert format_reward(text, A) == 0.0
            continue
        found += 1
        assert len(got) == A and all(0 <= v <= 100 and math.isfinite(v) for v in got)
        assert set(got) <= _numbers_in_last_block(text), (text, got)
    assert found > 1500, found     # the generator does reach the accepting paths
    # long garbage inside a block is cut off, not chewed on
    for text in ["<answer>" + "a " * 5000 + "</answer>", "<answer>" + "a" * 999 + "</answer>",
                 "<answer>" + ("Saturation " * 90) + "</answer>",
                 "<answer>" + "1 " * 499 + "</answer>"]:
        assert parse_answer(text, 5) is None
    assert time.perf_counter() - start < 10
