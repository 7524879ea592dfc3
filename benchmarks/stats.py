"""Paired comparisons of two agents over the same queries and several seeds: effect, 95 % CI, p, Holm, MDE.

Scores come as ``(seeds, queries)`` arrays, one per arm, with the queries in the same order (one row per
training seed; a deterministic agent has one row). The two arms' seeds are not paired (seed 0 of SFT and
seed 0 of GRPO are unrelated runs); the queries are.

* :func:`hierarchical_bootstrap`: the 95 % CI of the difference in means (B - A). Each replicate draws
  each arm's seeds with replacement, then one set of queries with replacement for both arms, so the
  interval carries both the seed spread and the query sampling.
* :func:`randomisation_test`: two-sided paired randomisation (sign-flip) test on the per-query difference
  of the seed means, the test IR papers use (Smucker, Allan and Carterette, CIKM 2007). It conditions on
  the runs made: it asks whether *these runs* differ over the query population. The seed spread enters
  the CI and the MDE; with one seed per arm the two views coincide.
* :func:`holm`: Holm's step-down adjustment when one table makes several comparisons.
* :func:`minimum_detectable_effect`: the difference a comparison of this many queries and seeds would
  detect at alpha 0.05 with power 0.8, from the observed per-query and seed variance (normal approximation).

``benchmarks/PROTOCOL.md`` says when a difference may be called significant. Every resampling is seeded,
so a regenerated table is identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.8
RESAMPLES = 10_000


def _arms(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"scores must be (seeds, queries) over the same queries, got shapes {a.shape} and {b.shape}")
    if a.shape[1] < 2:
        raise ValueError("a paired comparison needs at least 2 queries")
    return a, b


def query_differences(a, b) -> np.ndarray:
    """Per-query difference of the seed means, B - A: ``(queries,)``."""
    a, b = _arms(a, b)
    return b.mean(axis=0) - a.mean(axis=0)


def hierarchical_bootstrap(a, b, *, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0):
    """(low, high) percentile interval of mean(B) - mean(A), resampling seeds per arm, then queries (paired)."""
    a, b = _arms(a, b)
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    # (resamples, queries): the per-query mean over each arm's resampled seeds
    mean_a = a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1)
    mean_b = b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=1)
    queries = rng.integers(0, n, (resamples, n))
    replicates = np.take_along_axis(mean_b - mean_a, queries, axis=1).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def randomisation_test(a, b, *, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided p of a paired randomisation test of mean(B) - mean(A) over queries and seeds.

    Query level: the sign of each query's difference of seed means is flipped at random (scipy's
    ``permutation_test``, exact when 2^queries <= resamples). Seed level, for arms with several seeds:
    under the null the runs of both arms are exchangeable and their deviations from their arm's mean
    symmetric, so the deviations (rescaled by sqrt(S / (S - 1)) to the spread of a single run) are pooled,
    dealt to the arms at random with random signs, and the difference of the dealt means is added to each
    flipped statistic. Without it, two arms
    whose seeds merely landed apart would look different on every query at once.
    """
    a, b = _arms(a, b)
    diff = query_differences(a, b)
    rng = np.random.default_rng(seed)
    deviations = [run - run.mean() for run in (a.mean(axis=1), b.mean(axis=1))]
    pooled = np.concatenate([d * np.sqrt(len(d) / (len(d) - 1)) for d in deviations if len(d) > 1] or [np.zeros(0)])
    if len(pooled) == 0:
        if not diff.any():
            return 1.0
        result = sps.permutation_test((diff,), np.mean, permutation_type="samples", vectorized=True,
                                      n_resamples=resamples, alternative="two-sided", rng=rng)
        return float(result.pvalue)
    flips = rng.choice([-1.0, 1.0], size=(resamples, len(diff)))
    signs = rng.choice([-1.0, 1.0], size=(resamples, len(pooled)))  # symmetric too: one arm alone still varies
    dealt = signs * pooled[np.argsort(rng.random((resamples, len(pooled))), axis=1)]
    # each arm with several runs gets as many pooled deviations as it has runs; one run shows no spread
    n_a, n_b = (len(x) if len(x) > 1 else 0 for x in (a, b))
    seed_part = sum(sign * dealt[:, part].mean(axis=1) for sign, part, n in (
        (-1.0, slice(0, n_a), n_a), (1.0, slice(n_a, n_a + n_b), n_b)) if n)
    null = flips @ diff / len(diff) + seed_part
    observed = abs(diff.mean())
    return float((1 + (np.abs(null) >= observed - 1e-12).sum()) / (1 + resamples))


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values (family-wise error <= alpha when rejecting adjusted p < alpha), in input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def standard_error(a, b) -> float:
    """Standard error of mean(B) - mean(A) over new queries and new seeds.

    Query part: the variance of the per-query differences over the number of queries. Seed part: each
    arm's variance of run means over its seeds, divided by its number of seeds (zero for an arm with one
    seed, which cannot show its spread; a deterministic agent has none).
    """
    a, b = _arms(a, b)
    diff = query_differences(a, b)
    variance = diff.var(ddof=1) / len(diff)
    for arm in (a, b):
        if len(arm) > 1:
            variance += arm.mean(axis=1).var(ddof=1) / len(arm)
    return float(np.sqrt(variance))


def minimum_detectable_effect(se: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true difference a two-sided test at ``alpha`` detects with probability ``power`` (normal approximation)."""
    return float((sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se)


def planned_mde(query_sd: float, queries: int, *, seed_sd: float = 0.0, seeds: int = 1,
                alpha: float = ALPHA, power: float = POWER) -> float:
    """MDE for a planned comparison: per-query difference sd, and each arm's seed sd with ``seeds`` seeds per arm."""
    return minimum_detectable_effect(np.sqrt(query_sd**2 / queries + 2 * seed_sd**2 / seeds), alpha=alpha, power=power)


@dataclass(frozen=True)
class Comparison:
    """B against A on one metric: means, difference, CI, p (raw; :func:`holm` adjusts a table's family), MDE."""

    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    p: float
    wins: int
    losses: int
    ties: int
    mde: float


def compare(a, b, *, resamples: int = RESAMPLES, seed: int = 0) -> Comparison:
    a, b = _arms(a, b)
    diff = query_differences(a, b)
    low, high = hierarchical_bootstrap(a, b, resamples=resamples, seed=seed)
    return Comparison(
        mean_a=float(a.mean()), mean_b=float(b.mean()), diff=float(diff.mean()), low=low, high=high,
        p=randomisation_test(a, b, resamples=resamples, seed=seed),
        wins=int((diff > 0).sum()), losses=int((diff < 0).sum()), ties=int((diff == 0).sum()),
        mde=minimum_detectable_effect(standard_error(a, b)),
    )
