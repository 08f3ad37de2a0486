"""The dual rank-and-score reward of PreResQ-R1, and three rivals to compare it with.

Paper: arXiv 2511.05393 (PreResQ-R1); docs/method.md walks through each term, and
rewards_reference.py computes them with plain loops. Notation: one training step holds B
images with G sampled completions ("rollouts") each; rollout (i, j) rates A aspects
d[i, j, :] (A = 5 for images, 2 for video); its prediction p[i, j] is their mean; g[i] is the
image's MOS on the 1..5 scale.

    R = R_format + ( 0.375 R_pair - P_std + 0.25 R_tripbal + 0.125 R_trip3 + 1.0 R_rank ) / 3

Video drops R_rank and the division by 3 (`video=True`). Every weight, threshold and formula is
the authors' training code's (grpo_preres_IQA_r1, grpo_preres_VQA_r1); the paper's figures
name the other terms, but R_rank, the largest weight (1 against R_pair's 0.375), is not named
separately in the figures (the overall figure's preference reward is "Pairwise-Triplet-Score-Rank").

| term      | name, and where it is shown                     | function                |
|-----------|-------------------------------------------------|-------------------------|
| R_format  | format reward (authors' code)                   | `format_reward`         |
| P_std     | stage-1 std penalty (response branch; figures)  | `aspect_spread_penalty` |
| R_tripbal | response triplet ranking balance (figures)      | `triplet_balance`       |
| R_pair    | pairwise score and ranking (preference; figures)| `pairwise_fidelity`     |
| R_trip3   | triplet ranking (preference; figures)           | `triplet_accuracy`      |
| R_rank    | group rank (authors' code; not named separately in the figures) | `group_rank` |
| R         | the combination (authors' code)                 | `preresq_reward`        |
| rival     | VisualQuality-R1 Thurstone fidelity             | `fidelity_reward`       |
| rival     | Q-Insight score threshold                       | `threshold_reward`      |
| rival     | VQAThinker Gaussian score                       | `gaussian_reward`       |

`REWARDS` maps the names `grpo.py --reward` accepts to these functions. Every reward takes
`(scores (B, G, A), mos (B,), valid (B, G) bool = None, *, format_rewards (B, G) = None)` and
returns a dict of (B, G) float32 tensors: "format", its own terms by name, and "total".
`parse_completions` turns the B*G completion texts of a step into those three tensors.

Invalid rollouts (`valid` False: the answer did not parse) score 0 on every term and take no
part in any other rollout's comparisons; a rollout's comparisons are averaged over the valid
partners it has, and a term with no partner at all is 0. Ratings are parsed and the arithmetic done
in float64, predictions and MOS rounded to 9 decimals before they are compared, so that answers whose
means are equal in decimals tie (2.99 3.21 4.11 4.90 4.92 and 3.08 3.21 4.11 4.81 4.92 mean 4.026).

Where this file differs from the authors' code, and why:
1. Parse failures. The authors fill a completion without numbers with 3.0,
   pad a short one by repeating its first number, and read "the last five numbers anywhere in
   the text". We read only the last <answer> block (`parse_answer`), never invent a value, and
   give an unparsed completion 0 on every term instead of a made-up score.
2. Triplet balance over all A aspects. The authors' image code loops over the first 4 of the
   5 aspects, so the background rating was never rewarded for consistency.
3. R_pair 0/0 guard. When two images have the same MOS and both predictions are exact, the
   authors divide 0 by 0 (NaN). Both predictions are then perfect, so s = 1 and the term is 1.
4. Ties between predictions. The authors break them by sort order (and R_rank by the first
   rollout with the same value), so identical answers could get different rewards depending on
   where they sat in the batch. Here tied rollouts get the reward *expected under a uniformly
   random tie-break*: the mean over the positions the tie occupies. With no ties this is
   exactly the authors' value.
5. R_pair's "same-rank rollout of image z" when z and i have different numbers of valid
   rollouts (n_z, n_i): the rollout of z at the same relative rank, position
   floor((k + 1/2) n_z / n_i) among z's sorted valid predictions (the one whose share of the
   ranking contains the middle of k's share). When n_z = n_i this is rank k itself, the
   authors' rule.
6. R_trip3 pairs by rank, not by rollout index. The authors compare p[i, j] with p[a, j] and
   p[b, j], the same *index* j in other images; but the G rollouts of an image are exchangeable
   samples and j is only the order they came out in, so relabelling them changed the rewards.
   We pair rank with rank, as R_pair does (deviation 5 included), so each rollout's reward
   follows it when rollouts are permuted.
7. R_trip3 compares orders three ways (<, =, >), as R_pair does. The authors test
   `pred_m > pred_n` against `gt_m > gt_n`, which counts a MOS tie as matched when
   pred_m <= pred_n, so the reward depended on the order the images happened to be listed in.
8. Too few partners. R_trip3 with fewer than two other images (B < 3) is 0; the authors take
   the mean of an empty list (NaN). R_tripbal for a rollout in no triple (fewer than three valid
   rollouts) is 0; the authors' early `return` there dropped the whole batch's reward.
9. Thresholds are read as written in decimals: |x| < 0.05 means at least 0.05 apart never
   counts, whatever the float rounding (3.30 - 3.25 is 0.04999.. in float64 but
   1.05 - 1.00 is 0.05000..; the authors' code counted one and not the other).
10. R_rank's group size N is the number of valid rollouts + 1 (the authors: G + 1, all valid).
11. P_std is on whenever the response branch is (the public code; the framework figure shows it
    in stage 1 only). A stage-2 run passes `w_std=0`.
Kept on purpose: R_pair's known defects, as the reference behaviour (`test_rewards.py` shows
them with numbers). A wrongly ordered pair whose predictions are both far from their MOS has s
near 0 and scores sqrt(1 - s) near 1, more than a correctly ordered pair with moderate errors.
Two images with equal MOS have s = 0: any two different predictions score 1, two equal but
inexact ones score 0.
"""
from __future__ import annotations

import functools
import math
import re

import torch
from torch import Tensor

# The authors' constants.
STD_FLOOR = 0.5          # P_std = STD_WEIGHT * max(0, STD_FLOOR - sigma)
STD_WEIGHT = 0.5
TRIPBAL_TOL = 0.05       # an outer value of a triple scores when closer than this to the middle
RANK_TOL = 0.02          # R_rank = 1 when |p - g| is below this
THRESHOLD_TOL = 0.35     # Q-Insight
GAUSSIAN_SIGMA = 0.5     # VQAThinker
FIDELITY_EPS = 1e-6      # VisualQuality-R1

# Ratings are written with at most a few decimals; 1e-6 is far below that, and above the
# float32 error of a difference of two ratings on the 1..5 scale (< 5e-7) (deviation 9).
_DECIMAL_SLACK = 1e-6

# A prediction (the mean of A ratings) and its MOS are rounded to this many decimals, so that means equal
# in decimals tie: a float64 mean's error (~1e-15) is far below 5e-10; 2 or 5 ratings of 8 decimals average exactly.
PREDICTION_DECIMALS = 9

# A value above this is no rating on a 1..5 scale (a percentage, a year, a runaway digit
# string); refusing it also keeps every reward finite in float32.
MAX_RATING = 100.0
# A real answer block is a few dozen characters; the cap bounds the parser's work on garbage.
MAX_ANSWER_CHARS = 1000

_NUM = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"             # unsigned ASCII decimal: 3  3.  3.25  .5
_LABEL = r"[A-Za-z][A-Za-z _()/-]*"                     # no digits or dots: cannot eat a number
_ITEM = rf"(?:{_LABEL}:[ \t]*)?{_NUM}"
_SEP = r"(?:\s*[,;]\s*|\s+)"
_ANSWER_BODY = re.compile(rf"\s*{_ITEM}(?:{_SEP}{_ITEM})*\s*")
_NUMBER = re.compile(_NUM)


# ---------------------------------------------------------------------------------------
# Text -> scores
# ---------------------------------------------------------------------------------------

def parse_answer(text: str, num_aspects: int) -> list[float] | None:
    """The `num_aspects` ratings in the last <answer>...</answer> block of `text`, or None.

    Rule: take the last "<answer>" in the text and the first "</answer>" after it (no closing
    tag, e.g. a generation cut off mid-answer: None). Inside, exactly `num_aspects` items,
    separated by newlines, spaces, commas or semicolons; an item is an unsigned decimal number
    ("3", "3.25", ".5", "3.") optionally preceded by a label of letters, spaces and _()/-
    ending in a colon ("Saturation: 3.2", "global (temporal): 4"). Anything else in the block
    (words after a number, signs, exponents, "3/5", a second tag) makes the answer None, as
    does a value above MAX_RATING. Never raises; every returned value is written in the text.
    """
    if not isinstance(text, str):
        return None
    start = text.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    if end < 0 or end - start > MAX_ANSWER_CHARS:
        return None
    body = text[start:end]
    if _ANSWER_BODY.fullmatch(body) is None:
        return None
    values = [float(tok) for tok in _NUMBER.findall(body)]
    if len(values) != num_aspects or not all(v <= MAX_RATING for v in values):
        return None
    return values


@functools.lru_cache(maxsize=None)
def _strict_format(num_aspects: int) -> re.Pattern:
    return re.compile(
        rf"<think>.*?</think>\s*<answer>\s*{_NUM}"
        rf"(?:[ \t]*\n\s*{_NUM}){{{num_aspects - 1}}}\s*</answer>",
        re.DOTALL)


def format_reward(text: str, num_aspects: int) -> float:
    """R_format: 1.0 when the whole text is `<think>`...`</think>`, optional
    whitespace, `<answer>`, exactly `num_aspects` unsigned numbers one per line, `</answer>`,
    and nothing else (no leading or trailing characters); else 0.0. A text that scores 1 always
    parses (`parse_answer` returns its numbers)."""
    if not isinstance(text, str) or num_aspects < 1:
        return 0.0
    ok = _strict_format(num_aspects).fullmatch(text) is not None
    return float(ok and parse_answer(text, num_aspects) is not None)


def parse_completions(texts: list[str], num_aspects: int, group_size: int,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The B*G completion texts of one step (image-major: image 0's G first) as reward inputs.

    Returns scores (B, G, A) float64 (0 where unparsed), valid (B, G) bool, format (B, G) float32.
    """
    if group_size < 1 or len(texts) % group_size != 0:
        raise ValueError(f"parse_completions: {len(texts)} texts do not split into groups of "
                         f"{group_size}; pass all G completions of every image, image by image.")
    parsed = [parse_answer(t, num_aspects) for t in texts]
    rows = [p if p is not None else [0.0] * num_aspects for p in parsed]
    shape = (len(texts) // group_size, group_size)
    scores = torch.tensor(rows, dtype=torch.float64, device=device).reshape(*shape, num_aspects)
    valid = torch.tensor([p is not None for p in parsed], device=device).reshape(shape)
    fmt = torch.tensor([format_reward(t, num_aspects) for t in texts], dtype=torch.float32,
                       device=device).reshape(shape)
    return scores, valid, fmt


# ---------------------------------------------------------------------------------------
# Input checks and shared rank machinery
# ---------------------------------------------------------------------------------------

def _prepare(x: Tensor, mos: Tensor | None, valid: Tensor | None, ndim: int, where: str):
    """Check shapes and values; return float64 x with invalid entries zeroed, mos, valid; the
    predictions (ndim 2) and mos rounded to PREDICTION_DECIMALS, so that they are compared alike."""
    what = "scores (B, G, A)" if ndim == 3 else "predictions (B, G)"
    if not isinstance(x, Tensor) or x.dim() != ndim or not x.is_floating_point() or 0 in x.shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: expected a non-empty float tensor of {what}, got {got}.")
    B, G = x.shape[:2]
    if valid is None:
        valid = torch.ones(B, G, dtype=torch.bool, device=x.device)
    elif not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, G):
        got = (valid.dtype, tuple(valid.shape)) if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(f"{where}: valid must be a bool tensor of shape ({B}, {G}) marking the "
                         f"completions that parsed, got {got}.")
    valid = valid.to(x.device)
    x = x.to(torch.float64)
    full_valid = valid if ndim == 2 else valid[..., None].expand_as(x)
    bad = full_valid & ~torch.isfinite(x)
    if bad.any():
        pos = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{where}: non-finite score at {pos} of a valid completion; mark it "
                         f"invalid (valid=False) or fix the parser that produced it.")
    x = torch.where(full_valid, x, 0.0)
    if ndim == 2:
        x = x.round(decimals=PREDICTION_DECIMALS)
    if mos is not None:
        mos = torch.as_tensor(mos, device=x.device).to(torch.float64).round(decimals=PREDICTION_DECIMALS)
        if tuple(mos.shape) != (B,) or not torch.isfinite(mos).all():
            raise ValueError(f"{where}: mos must hold B = {B} finite values, one per image, "
                             f"got shape {tuple(mos.shape)}.")
    return x, mos, valid


def _below(x: Tensor, tol: float) -> Tensor:
    """x < tol read in decimals (deviation 9)."""
    return x < tol - _DECIMAL_SLACK


def _masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of x over `dim` where mask is True; 0 where nothing is."""
    total = torch.where(mask, x, 0.0).sum(dim)
    return total / mask.sum(dim).clamp_min(1)


def _sorted_valid(p: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each image's valid predictions in ascending order (B, G; padded with 0) and their count (B,)."""
    s = torch.where(valid, p, math.inf).sort(dim=1).values
    return torch.where(torch.isfinite(s), s, 0.0), valid.sum(1)


def _tie_span(p: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted positions [lo, hi) that rollout (i, j)'s value occupies among image i's valid ones."""
    other = valid[:, None, :]
    lo = ((p[:, None, :] < p[:, :, None]) & other).sum(-1)
    hi = lo + ((p[:, None, :] == p[:, :, None]) & other).sum(-1)
    return lo, hi


def _mean_over_ties(by_rank: Tensor, p: Tensor, valid: Tensor) -> Tensor:
    """Reward of each rollout from a reward per sorted position (B, G): the mean over the
    positions its tie occupies, i.e. the expectation under a random tie-break (deviation 4)."""
    lo, hi = _tie_span(p, valid)
    cum = torch.cat([torch.zeros_like(by_rank[:, :1]), by_rank.cumsum(1)], dim=1)
    mean = (cum.gather(1, hi) - cum.gather(1, lo)) / (hi - lo).clamp_min(1)
    return torch.where(valid, mean, 0.0)


def _same_rank_partners(p: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rank k of image i and every image z: the prediction of z at the same relative rank.

    Returns own (B, G): p_i(k), the k-th smallest valid prediction of image i; partner (B, G, B):
    p_z(m) with m = floor((k + 1/2) n_z / n_i) (deviation 5); usable (B, G, B): rank k exists in
    image i, image z has a valid rollout, and z != i.
    """
    B, G = p.shape
    own, n = _sorted_valid(p, valid)
    k = torch.arange(G, device=p.device)
    m = ((2 * k + 1)[None, :, None] * n[None, None, :]) // (2 * n[:, None, None]).clamp_min(1)
    m = torch.minimum(m, (n - 1).clamp_min(0)[None, None, :])
    partner = own[torch.arange(B, device=p.device)[None, None, :], m]
    usable = ((k[None, :] < n[:, None])[:, :, None] & (n > 0)[None, None, :]
              & ~torch.eye(B, dtype=torch.bool, device=p.device)[:, None, :])
    return own, partner, usable


def _same_order(dp: Tensor, dg: Tensor) -> Tensor:
    """1.0 where the predicted order (<, =, >) equals the MOS order."""
    return (torch.sign(dp) == torch.sign(dg)).to(torch.float64)


# ---------------------------------------------------------------------------------------
# Response branch
# ---------------------------------------------------------------------------------------

def aspect_spread_penalty(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """P_std (B, G): 0.5 * max(0, 0.5 - sigma), sigma = population std of a rollout's A aspect
    scores; in [0, 0.25], subtracted from the reward. scores: (B, G, A)."""
    d, _, valid = _prepare(scores, None, valid, 3, "aspect_spread_penalty")
    sigma = d.std(dim=-1, correction=0)
    return torch.where(valid, STD_WEIGHT * (STD_FLOOR - sigma).clamp_min(0), 0.0).float()


def triplet_balance(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """R_tripbal (B, G) in [0, 1]: over every triple of an image's valid rollouts and every one
    of the A aspects, the middle value scores 1 and an outer value scores 1 when within
    TRIPBAL_TOL of the middle; a rollout's points / (its triples x A). scores: (B, G, A).

    Whichever of tied values is called "middle", a value scores exactly when it is within the
    tolerance of the triple's median, which is how it is computed here.
    """
    d, _, valid = _prepare(scores, None, valid, 3, "triplet_balance")
    B, G, A = d.shape
    triples = torch.combinations(torch.arange(G, device=d.device), 3)       # (T, 3)
    if len(triples) == 0:
        return torch.zeros(B, G, device=d.device)
    vals = d[:, triples, :]                                                  # (B, T, 3, A)
    median = vals.sort(dim=2).values[:, :, 1:2, :]
    points = _below((vals - median).abs(), TRIPBAL_TOL).sum(-1).to(torch.float64)  # (B, T, 3)
    usable = valid[:, triples].all(-1, keepdim=True).expand(-1, -1, 3)
    index = triples.reshape(1, -1).expand(B, -1)
    gained = torch.zeros(B, G, dtype=torch.float64, device=d.device).scatter_add_(
        1, index, torch.where(usable, points, 0.0).reshape(B, -1))
    counted = torch.zeros(B, G, dtype=torch.float64, device=d.device).scatter_add_(
        1, index, usable.to(torch.float64).reshape(B, -1))
    return torch.where(counted > 0, gained / (counted * A).clamp_min(1), 0.0).float()


# ---------------------------------------------------------------------------------------
# Preference branch; p: (B, G) predictions = mean of the aspect scores
# ---------------------------------------------------------------------------------------

def pairwise_fidelity(p: Tensor, mos: Tensor, valid: Tensor | None = None) -> Tensor:
    """R_pair (B, G) in [0, 1]. Rank k of image i meets the same-rank rollout of every other
    image z: c = 1 if the predicted order (<, =, >) equals the MOS order, else 0;
    s = |g_i - g_z| / (|g_i - g_z| + |p_i(k) - g_i| + |p_z(k) - g_z|) (1 when 0/0);
    term = sqrt(c s) + sqrt((1 - c)(1 - s)); R_pair = mean over z."""
    p, g, valid = _prepare(p, mos, valid, 2, "pairwise_fidelity")
    own, partner, usable = _same_rank_partners(p, valid)
    pi, gi, gz = own[:, :, None], g[:, None, None], g[None, None, :]
    correct = _same_order(pi - partner, gi - gz) > 0
    gap = (gi - gz).abs()
    denom = gap + (pi - gi).abs() + (partner - gz).abs()
    s = torch.where(denom > 0, gap / denom.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    term = torch.where(correct, s.sqrt(), (1 - s).sqrt())
    return _mean_over_ties(_masked_mean(term, usable, -1), p, valid).float()


def triplet_accuracy(p: Tensor, mos: Tensor, valid: Tensor | None = None) -> Tensor:
    """R_trip3 (B, G) in [0, 1]. Rank k of image i with the same-rank rollouts of every pair
    (a, b) of other images: the fraction of the three pairs (i, a), (a, b), (i, b) whose
    predicted order (<, =, >) equals the MOS order; R_trip3 = mean over the pairs (a, b)."""
    p, g, valid = _prepare(p, mos, valid, 2, "triplet_accuracy")
    own, partner, usable = _same_rank_partners(p, valid)
    B = p.shape[0]
    with_i = _same_order(own[:, :, None] - partner, g[:, None, None] - g[None, None, :])  # (B, G, B)
    between = _same_order(partner[..., :, None] - partner[..., None, :],
                          g[:, None] - g[None, :])                                      # (B, G, B, B)
    both = (usable[..., :, None] & usable[..., None, :]
            & ~torch.eye(B, dtype=torch.bool, device=p.device))
    m = usable.sum(-1).to(torch.float64)
    # Each of the m(m-1)/2 pairs {a, b} adds hit(i,a) + hit(i,b) + hit(a,b): every a sits in
    # m-1 pairs, and the double sum over a != b counts each pair twice.
    hits = ((m - 1) * torch.where(usable, with_i, 0.0).sum(-1)
            + torch.where(both, between, 0.0).sum((-1, -2)) / 2)
    pairs = m * (m - 1) / 2
    by_rank = torch.where(pairs > 0, hits / (3 * pairs).clamp_min(1), 0.0)
    return _mean_over_ties(by_rank, p, valid).float()


def group_rank(p: Tensor, mos: Tensor, valid: Tensor | None = None) -> Tensor:
    """R_rank (B, G) in (0, 1]. 1 when |p - g| < RANK_TOL; otherwise, with the image's N - 1
    valid predictions and g sorted in one list, exp(-delta / N), delta = number of positions
    between p and g (1 + the predictions strictly between them; ties: expectation over a random
    tie-break, deviation 4)."""
    p, g, valid = _prepare(p, mos, valid, 2, "group_rank")
    g = g[:, None]
    n_list = valid.sum(1, keepdim=True).to(torch.float64) + 1
    other, others_valid = p[:, None, :], valid[:, None, :]
    lo, hi = torch.minimum(p, g)[..., None], torch.maximum(p, g)[..., None]
    strictly_between = ((other > lo) & (other < hi) & others_valid).sum(-1)
    ties_with_p = ((other == p[..., None]) & others_valid).sum(-1).clamp_min(1) - 1
    ties_with_g = ((other == g[..., None]) & others_valid).sum(-1)
    step = torch.exp(-1 / n_list)

    def mean_decay(t: Tensor) -> Tensor:
        # mean of step**u for u = 0..t: how far, uniformly, a tie of t+1 equal values pushes delta
        return (1 - step ** (t + 1)) / ((t + 1) * (1 - step))

    far = (torch.exp(-(1 + strictly_between) / n_list)
           * mean_decay(ties_with_p) * mean_decay(ties_with_g))
    reward = torch.where(_below((p - g).abs(), RANK_TOL), 1.0, far)
    return torch.where(valid, reward, 0.0).float()


# ---------------------------------------------------------------------------------------
# The combination, and the rivals
# ---------------------------------------------------------------------------------------

def _format_and_inputs(scores, mos, valid, format_rewards, where):
    """R_format (B, G) (default: valid as 0/1) and the checked inputs d (B, G, A), g, valid."""
    d, g, valid = _prepare(scores, mos, valid, 3, where)
    if format_rewards is None:
        fmt = valid.to(torch.float64)
    else:
        fmt = torch.as_tensor(format_rewards, device=d.device).to(torch.float64)
        if tuple(fmt.shape) != tuple(valid.shape) or not torch.isfinite(fmt).all():
            raise ValueError(f"{where}: format_rewards must be finite with shape "
                             f"{tuple(valid.shape)}, got {tuple(fmt.shape)}.")
    return fmt, d, g, valid


def preresq_reward(scores: Tensor, mos: Tensor, valid: Tensor | None = None, *,
                   format_rewards: Tensor | None = None, video: bool = False,
                   response_branch: bool = True, preference_branch: bool = True,
                   w_pair: float = 0.375, w_std: float = 1.0, w_tripbal: float = 0.25,
                   w_trip3: float = 0.125, w_rank: float = 1.0) -> dict[str, Tensor]:
    """PreResQ-R1's reward. scores: (B, G, A) aspect scores; mos: (B,);
    valid: (B, G) bool, the completions that parsed (None: all); format_rewards: (B, G)
    R_format from the texts (None: valid as 0/1).

    Returns (B, G) float32 tensors: "format", "pair_fidelity", "triplet_accuracy",
    "group_rank", "aspect_spread_penalty", "triplet_balance" (always all, for logging) and
    "total" = format + (w_pair R_pair - w_std P_std + w_tripbal R_tripbal + w_trip3 R_trip3
    + w_rank R_rank) / 3, keeping only the enabled branches. video=True drops R_rank and the
    division by 3.
    """
    fmt, d, g, valid = _format_and_inputs(scores, mos, valid, format_rewards, "preresq_reward")
    p = d.mean(-1)
    terms = {
        "pair_fidelity": pairwise_fidelity(p, g, valid),
        "triplet_accuracy": triplet_accuracy(p, g, valid),
        "group_rank": group_rank(p, g, valid),
        "aspect_spread_penalty": aspect_spread_penalty(d, valid),
        "triplet_balance": triplet_balance(d, valid),
    }
    t = {name: x.to(torch.float64) for name, x in terms.items()}
    accuracy = torch.zeros_like(fmt)
    if preference_branch:
        accuracy = accuracy + w_pair * t["pair_fidelity"] + w_trip3 * t["triplet_accuracy"]
        if not video:
            accuracy = accuracy + w_rank * t["group_rank"]
    if response_branch:
        accuracy = accuracy - w_std * t["aspect_spread_penalty"] + w_tripbal * t["triplet_balance"]
    total = fmt + (accuracy if video else accuracy / 3)
    return {"format": fmt.float(), **terms, "total": total.float()}


def fidelity_reward(scores: Tensor, mos: Tensor, valid: Tensor | None = None, *,
                    format_rewards: Tensor | None = None) -> dict[str, Tensor]:
    """VisualQuality-R1's Thurstone fidelity reward. Per image, mean mu and
    unbiased variance var of its valid predictions (var = 0 with fewer than two). For rollout
    (i, j) and every other image z: P = Phi((p_ij - mu_z) / sqrt(var_i + var_z + 1e-6)),
    P* = 1, 0.5, 0 as g_i >, =, < g_z, f = sqrt(P* P + 1e-6) + sqrt((1 - P*)(1 - P) + 1e-6);
    "fidelity" = mean over z. Returns "format", "fidelity", "total" (B, G)."""
    fmt, d, g, valid = _format_and_inputs(scores, mos, valid, format_rewards, "fidelity_reward")
    p = d.mean(-1)
    B = p.shape[0]
    n = valid.sum(1).to(torch.float64)
    mu = torch.where(valid, p, 0.0).sum(1) / n.clamp_min(1)
    var = torch.where(valid, (p - mu[:, None]) ** 2, 0.0).sum(1) / (n - 1).clamp_min(1)
    prob = torch.special.ndtr((p[:, :, None] - mu[None, None, :])
                              / torch.sqrt(var[:, None, None] + var[None, None, :] + FIDELITY_EPS))
    target = ((g[:, None] > g[None, :]).to(torch.float64)
              + 0.5 * (g[:, None] == g[None, :]).to(torch.float64))[:, None, :]
    f = (torch.sqrt(target * prob + FIDELITY_EPS)
         + torch.sqrt((1 - target) * (1 - prob) + FIDELITY_EPS))
    usable = (valid[:, :, None] & (n > 0)[None, None, :]
              & ~torch.eye(B, dtype=torch.bool, device=p.device)[:, None, :])
    fidelity = torch.where(valid, _masked_mean(f, usable, -1), 0.0)
    return {"format": fmt.float(), "fidelity": fidelity.float(), "total": (fmt + fidelity).float()}


def threshold_reward(scores: Tensor, mos: Tensor, valid: Tensor | None = None, *,
                     format_rewards: Tensor | None = None) -> dict[str, Tensor]:
    """Q-Insight's score reward: "threshold" = 1 when |p - g| < 0.35, else 0.
    Returns "format", "threshold", "total" (B, G)."""
    fmt, d, g, valid = _format_and_inputs(scores, mos, valid, format_rewards, "threshold_reward")
    p = d.mean(-1)
    hit = torch.where(valid & _below((p - g[:, None]).abs(), THRESHOLD_TOL), 1.0, 0.0)
    return {"format": fmt.float(), "threshold": hit.float(), "total": (fmt + hit).float()}


def gaussian_reward(scores: Tensor, mos: Tensor, valid: Tensor | None = None, *,
                    format_rewards: Tensor | None = None) -> dict[str, Tensor]:
    """VQAThinker's Gaussian score reward: "gaussian" = exp(-(p - g)^2 / (2 * 0.5^2)).
    Returns "format", "gaussian", "total" (B, G)."""
    fmt, d, g, valid = _format_and_inputs(scores, mos, valid, format_rewards, "gaussian_reward")
    p = d.mean(-1)
    close = torch.where(valid, torch.exp(-(p - g[:, None]) ** 2 / (2 * GAUSSIAN_SIGMA ** 2)), 0.0)
    return {"format": fmt.float(), "gaussian": close.float(), "total": (fmt + close).float()}


REWARDS = {
    "preresq": preresq_reward,
    "fidelity": fidelity_reward,
    "threshold": threshold_reward,
    "gaussian": gaussian_reward,
}
