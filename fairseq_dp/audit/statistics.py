# Copyright (c) fairseq_dp contributors. MIT license.
"""The statistics of a one-run privacy audit (Steinke, Nasr, Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

m canaries are each put into the training set with probability ½. After
training, an auditor guesses "in" or "out" for r of them (abstaining on the
rest) and gets v right. If training is (ε, δ)-DP, v is stochastically
dominated by Binomial(r, q), q = e^ε / (1 + e^ε), up to a δ term, so

    P[v correct or more] ≤ β + 2mδ·α,
    β = P[Binomial(r, q) ≥ v],
    α = max_{i=1..v} P[v − i ≤ Binomial(r, q) < v] / i            (their Thm 5.2)

is a p-value for the null hypothesis "the training is (ε, δ)-DP". It grows
with ε, so the largest ε it rejects at level ``significance`` is a lower bound
on the run's true ε, at that confidence.

The number of guesses is chosen after looking at the scores (take the k₊
highest as "in" and the k₋ lowest as "out", for several k): every tried
(k₊, k₋) is tested at ``significance / (number tried)`` (Bonferroni), so the
reported maximum over them keeps the stated confidence.
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct guesses out of ``r`` (among ``m`` canaries)
    under the hypothesis that training is (``epsilon``, ``delta``)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha, below = 0.0, 0.0  # below = P[v - i <= Binomial(r, q) < v]
    if delta > 0:
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # v-1, v-2, ..., 0
        for i in range(1, v + 1):
            below += float(pmf[i - 1])
            alpha = max(alpha, below / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float,
                        tolerance: float = 1e-4) -> float:
    """The largest ε whose p-value is below ``significance`` (0 when even ε = 0
    is not rejected), by bisection to ``tolerance``: the returned ε is rejected,
    ε + tolerance is not (or exceeds the search range, when v = r and δ = 0 make
    every ε below it rejected)."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:
        low, high = high, 2 * high
        if high > 1e4:  # only a perfect, abstention-free guess with delta 0 gets here
            return low
    while high - low > tolerance:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < significance:
            low = mid
        else:
            high = mid
    return low


@dataclass
class GuessResult:
    k_in: int       # canaries with the highest scores guessed "in"
    k_out: int      # canaries with the lowest scores guessed "out"
    guesses: int    # r
    correct: int    # v
    epsilon: float  # lower bound at the corrected significance


@dataclass
class AuditResult:
    canaries: int                  # m
    included: int
    delta: float
    significance: float            # the confidence is 1 - significance
    tried: int                     # (k_in, k_out) pairs tested (Bonferroni)
    epsilon_lower_bound: float     # the best over the tried pairs
    best: GuessResult
    all_tried: List[GuessResult]

    def as_dict(self) -> dict:
        return asdict(self)


def guess_sizes(m: int) -> List[Tuple[int, int]]:
    """The (k_in, k_out) pairs tried, at a few fractions of m: both sides, "in"
    only, and "out" only. Which side is informative depends on the canary:
    with a random label out of two, a left-out canary still gets a high score
    half the time (the model happens to predict its label), so the lowest
    scores, which a trained-on canary rarely has, are the reliable guesses."""
    sizes = sorted({max(1, round(m * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)})
    pairs = []
    for k in sizes:
        if 2 * k <= m:
            pairs.append((k, k))
        pairs += [(k, 0), (0, k)]
    return pairs


def audit_scores(scores: Sequence[float], included: Sequence[bool], delta: float,
                 significance: float = 0.05, pairs: Optional[List[Tuple[int, int]]] = None) -> AuditResult:
    """The ε lower bound from canary scores (higher: more likely trained on)
    and which canaries were in the training set."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1 or len(scores) < 2:
        raise ValueError("scores and included must be 1-D, of one length, at least 2")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    m = len(scores)
    pairs = pairs or guess_sizes(m)
    corrected = significance / len(pairs)
    # ties broken at random (a fixed order would hand the guess to the data layout)
    order = np.lexsort((np.random.default_rng().random(m), scores))  # ascending by score
    results = []
    for k_in, k_out in pairs:
        if k_in + k_out > m:
            raise ValueError(f"{k_in} + {k_out} guesses for {m} canaries")
        top = order[m - k_in:] if k_in else order[:0]
        bottom = order[:k_out]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        r = k_in + k_out
        results.append(GuessResult(k_in, k_out, r, correct,
                                   epsilon_lower_bound(m, r, correct, delta, corrected)))
    best = max(results, key=lambda g: g.epsilon)
    return AuditResult(canaries=m, included=int(included.sum()), delta=delta, significance=significance,
                       tried=len(pairs), epsilon_lower_bound=best.epsilon, best=best, all_tried=results)
