"""benchmarks/stats.py against known answers: simulated comparisons with a planted effect or none, hand-checked Holm.

Each simulated dataset draws a per-query difficulty shared by both arms, per-run noise and, where stated,
a per-run seed offset; arm B adds a planted effect. 200 datasets per setting, so a rate's Monte-Carlo
standard error is about 0.015 at 5 % and 0.028 at 80 %: bounds are the stated rate plus three of them.
"""

import numpy as np
import pytest

SIMS, QUERIES, NOISE_SD, RESAMPLES = 200, 50, 0.2, 500


@pytest.fixture(scope="module")
def stats(load_script):
    return load_script("benchmarks/stats.py")


def simulate(stats, effect_in_mdes: float, seeds: int = 1, seed_sd: float = 0.0, rng_seed: int = 0):
    """(rejection rate at alpha 0.05, bootstrap CI coverage of the planted effect) over SIMS datasets."""
    rng = np.random.default_rng(rng_seed)
    effect = effect_in_mdes * stats.planned_mde(NOISE_SD, QUERIES, seed_sd=seed_sd, seeds=seeds)
    rejected = covered = 0
    for i in range(SIMS):
        difficulty = rng.uniform(0, 1, QUERIES)
        a, b = (difficulty + shift + rng.normal(0, NOISE_SD / np.sqrt(2), (seeds, QUERIES))
                + rng.normal(0, seed_sd, (seeds, 1)) for shift in (0.0, effect))
        rejected += stats.randomisation_test(a, b, resamples=RESAMPLES, seed=i) < 0.05
        low, high = stats.hierarchical_bootstrap(a, b, resamples=RESAMPLES, seed=i)
        covered += low <= effect <= high
    return rejected / SIMS, covered / SIMS


def test_no_effect_is_rejected_at_most_at_alpha_and_the_ci_covers_it(stats):
    false_positives, coverage = simulate(stats, 0.0)
    assert false_positives <= 0.05 + 3 * 0.015
    assert 0.95 - 3 * 0.015 <= coverage <= 1.0


def test_an_effect_of_one_mde_is_found_with_the_stated_power_and_two_mdes_almost_always(stats):
    power, coverage = simulate(stats, 1.0, rng_seed=1)
    assert 0.8 - 3 * 0.028 <= power <= 0.8 + 3 * 0.028
    assert coverage >= 0.95 - 3 * 0.015
    assert simulate(stats, 2.0, rng_seed=2)[0] >= 0.97


def test_seed_offsets_do_not_make_a_null_significant(stats):
    # Three seeds per arm whose offsets (sd 0.03) a sign-flip over queries alone mistakes for an effect.
    false_positives, coverage = simulate(stats, 0.0, seeds=3, seed_sd=0.03, rng_seed=3)
    assert false_positives <= 0.05 + 3 * 0.015
    assert coverage >= 0.95 - 3 * 0.015
    assert simulate(stats, 1.0, seeds=3, seed_sd=0.03, rng_seed=4)[0] >= 0.8 - 3 * 0.028


def test_holm_on_hand_checked_p_values(stats):
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_compare_on_a_consistent_gain_and_on_balanced_noise(stats):
    a = np.random.default_rng(1).uniform(0, 0.8, 60)
    better = stats.compare(a, a + 0.1, resamples=2000)
    assert (better.low, better.high, better.diff) == pytest.approx((0.1, 0.1, 0.1))
    assert better.wins == 60 and better.p < 0.001 and better.mde == pytest.approx(0.0, abs=1e-9)
    noise = stats.compare(a, a + np.tile([0.1, -0.1], 30), resamples=2000)
    assert abs(noise.diff) < 1e-12 and noise.low < 0 < noise.high and noise.p > 0.8
    assert (noise.wins, noise.losses, noise.ties) == (30, 30, 0)


def test_scores_must_pair_the_same_queries(stats):
    with pytest.raises(ValueError, match="same queries"):
        stats.compare(np.zeros((2, 5)), np.zeros((1, 6)))
