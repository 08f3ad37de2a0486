"""The PreResQ-R1 reward and its rivals written literally: loops over images, rollouts, ranks,
partners and triples, one formula per line, in plain Python floats.

rewards.py computes the same numbers vectorised over a batch (and is what training uses);
this file is the reading aid and the reference tests/test_rewards.py compares it with, to 1e-6,
on random batches with ties, threshold-edge values and unparsed answers. Inputs are nested
lists: d[i][j][a] aspect scores (B x G x A), g[i] MOS, valid[i][j], fmt[i][j] format rewards.

Each term, for rollout j of image i (p = mean of its aspects; n_i = image i's valid rollouts):
    P_std    = 0.5 max(0, 0.5 - sigma(d[i][j]))                        aspect-spread penalty
    R_tripbal = points of j over the triples of its group / (triples x A)   triplet balance
    R_pair   = mean over other images z of sqrt(c s) + sqrt((1-c)(1-s)) pairwise fidelity
    R_trip3  = mean over pairs (a, b) of the fraction of the three orders right   triplet accuracy
    R_rank   = 1 if |p - g| < 0.02 else exp(-rank distance / N)    group rank, N = n_i + 1
    R        = R_format + (0.375 R_pair - P_std + 0.25 R_tripbal + 0.125 R_trip3 + R_rank) / 3
"""
import itertools
import math
from fractions import Fraction

SLACK = 1e-6  # thresholds are read in decimals: |x| < 0.05 means below 0.05 - 1e-6 (rewards.py, deviation 9)


def rel(a, b):
    return 1.0 if a > b else 0.0 if a < b else 0.5


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def same_rank(k, n_from, n_to):
    return math.floor(Fraction(2 * k + 1, 2) * n_to / n_from)


def preresq_reward(d, g, valid, fmt, video=False, response=True, preference=True):
    """Every term, literally: loops over images, rollouts, ranks, partners and triples."""
    B, G, A = len(d), len(d[0]), len(d[0][0])
    zeros = lambda: [[0.0] * G for _ in range(B)]
    P_std, tripbal, pair, trip3, rank = zeros(), zeros(), zeros(), zeros(), zeros()
    # predictions (means) and MOS to 9 decimals: means equal in decimals tie (rewards.py)
    p = [[round(math.fsum(d[i][j]) / A, 9) for j in range(G)] for i in range(B)]
    g = [round(x, 9) for x in g]
    srt = [sorted(p[i][j] for j in range(G) if valid[i][j]) for i in range(B)]
    for i in range(B):
        n_i = len(srt[i])
        # response branch
        gain, count = [0] * G, [0] * G
        for tri in itertools.combinations([j for j in range(G) if valid[i][j]], 3):
            for j in tri:
                count[j] += 1
            for a in range(A):
                lo, mid, hi = sorted(((d[i][j][a], j) for j in tri))
                gain[mid[1]] += 1
                for end in (lo, hi):
                    if abs(end[0] - mid[0]) < 0.05 - SLACK:
                        gain[end[1]] += 1
        for j in range(G):
            if not valid[i][j]:
                continue
            mu = p[i][j]
            sigma = math.sqrt(sum((x - mu) ** 2 for x in d[i][j]) / A)
            P_std[i][j] = 0.5 * max(0.0, 0.5 - sigma)
            tripbal[i][j] = gain[j] / (count[j] * A) if count[j] else 0.0
            # preference branch: the ranks this rollout's value occupies (a random tie-break
            # puts it at each with equal chance)
            ranks = [k for k in range(n_i) if srt[i][k] == p[i][j]]
            others = [z for z in range(B) if z != i and srt[z]]
            pair_by_rank, trip_by_rank = [], []
            for k in ranks:
                pk = srt[i][k]
                partner = {z: srt[z][same_rank(k, n_i, len(srt[z]))] for z in others}
                terms = []
                for z in others:
                    c = 1.0 if rel(pk, partner[z]) == rel(g[i], g[z]) else 0.0
                    gap = abs(g[i] - g[z])
                    den = gap + abs(pk - g[i]) + abs(partner[z] - g[z])
                    s = gap / den if den > 0 else 1.0
                    terms.append(math.sqrt(c * s) + math.sqrt((1 - c) * (1 - s)))
                pair_by_rank.append(mean(terms))
                triples = []
                for a, b in itertools.combinations(others, 2):
                    tri = [(g[i], pk), (g[a], partner[a]), (g[b], partner[b])]
                    hits = sum(rel(tri[m][1], tri[n][1]) == rel(tri[m][0], tri[n][0])
                               for m, n in ((0, 1), (1, 2), (0, 2)))
                    triples.append(hits / 3)
                trip_by_rank.append(mean(triples))
            pair[i][j] = mean(pair_by_rank)
            trip3[i][j] = mean(trip_by_rank)
            # group rank: sort the valid predictions and g, break ties uniformly at random
            N = n_i + 1
            if abs(p[i][j] - g[i]) < 0.02 - SLACK:
                rank[i][j] = 1.0
            else:
                entries = srt[i] + [g[i]]
                less_p = sum(x < p[i][j] for x in entries)
                size_p = sum(x == p[i][j] for x in srt[i])
                less_g = sum(x < g[i] for x in srt[i])
                size_g = sum(x == g[i] for x in srt[i]) + 1
                rank[i][j] = mean([math.exp(-abs((less_p + u) - (less_g + v)) / N)
                                   for u in range(size_p) for v in range(size_g)])
    total = zeros()
    for i in range(B):
        for j in range(G):
            acc = 0.0
            if preference:
                acc += 0.375 * pair[i][j] + 0.125 * trip3[i][j] + (0.0 if video else rank[i][j])
            if response:
                acc += -P_std[i][j] + 0.25 * tripbal[i][j]
            total[i][j] = fmt[i][j] + (acc if video else acc / 3)
    return {"format": fmt, "pair_fidelity": pair, "triplet_accuracy": trip3, "group_rank": rank,
            "aspect_spread_penalty": P_std, "triplet_balance": tripbal, "total": total}


def rival_rewards(d, g, valid, fmt):
    B, G, A = len(d), len(d[0]), len(d[0][0])
    p = [[math.fsum(d[i][j]) / A for j in range(G)] for i in range(B)]
    mu, var = [], []
    for i in range(B):
        xs = [p[i][j] for j in range(G) if valid[i][j]]
        mu.append(mean(xs))
        var.append(sum((x - mu[i]) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0)
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    out = {name: [[0.0] * G for _ in range(B)] for name in ("fidelity", "threshold", "gaussian")}
    for i in range(B):
        for j in range(G):
            if not valid[i][j]:
                continue
            fs = []
            for z in range(B):
                if z == i or not any(valid[z]):
                    continue
                P = phi((p[i][j] - mu[z]) / math.sqrt(var[i] + var[z] + 1e-6))
                Pt = rel(g[i], g[z])
                fs.append(math.sqrt(Pt * P + 1e-6) + math.sqrt((1 - Pt) * (1 - P) + 1e-6))
            out["fidelity"][i][j] = mean(fs)
            out["threshold"][i][j] = 1.0 if abs(p[i][j] - g[i]) < 0.35 - SLACK else 0.0
            out["gaussian"][i][j] = math.exp(-(p[i][j] - g[i]) ** 2 / (2 * 0.5 ** 2))
    return out
