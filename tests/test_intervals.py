"""The interval every Δ and every mean carries (metrics.replicate_interval): its parts against oracles, and its
coverage in simulated A/A comparisons whose spread comes mostly from the replicates, where an interval over
the test examples alone is too narrow (issue: the shuffled control's intervals excluded 0 in half its cells)."""
import math

import numpy as np
import pytest

from metrics import (auprc, auroc, both_classes, combine_replicates, f1, paired_delta, replicate_interval,
                     resample_weights, resampled_scores, t_quantile)


def test_t_quantile_matches_scipy_for_whole_and_fractional_df():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3.5, 4, 9.7, 30, 1e4):
        for q in (0.005, 0.025, 0.5, 0.9, 0.975):
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), abs=1e-6)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)


@pytest.mark.parametrize("metric", [auroc, auprc, f1])
def test_resampled_scores_equal_scoring_the_drawn_examples(metric):
    """The weighted AUROC/AUPRC (ties included) equal the metric of the examples each resample draws."""
    rng = np.random.default_rng(3)
    y = rng.random(150) < 0.1
    p = np.round(rng.random(150) + 0.3 * y, 1)            # many tied scores
    w = resample_weights(len(y), 40, seed=5)
    expected = []
    for counts in w:
        idx = np.repeat(np.arange(len(y)), counts)
        expected.append(metric(y[idx], p[idx]) if both_classes(y[idx]) else math.nan)
    assert np.allclose(resampled_scores(metric, y, p, w), expected, equal_nan=True)
    assert np.isnan(resampled_scores(metric, y, p, w)).any() == np.isnan(expected).any()


def test_replicate_interval_parts():
    """The estimate is the mean of the per-replicate Δs; identical arms give 0 with a zero-width interval; one
    replicate gives no interval; replicates that share a cluster count once."""
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    a = y * 0.6 + rng.random((4, 300))
    b = y * 0.3 + rng.random((4, 300))
    iv = replicate_interval(y, a, auroc, b=b, n=200, seed=1)
    per = [auroc(y, ra) - auroc(y, rb) for ra, rb in zip(a, b)]
    assert iv["replicates"] == pytest.approx(per) and iv["estimate"] == pytest.approx(np.mean(per))
    assert iv["lo"] < iv["estimate"] < iv["hi"] and iv["lo"] > 0
    same = replicate_interval(y, b, auroc, b=b, n=50)
    assert (same["estimate"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    one = replicate_interval(y, a[:1], auroc, b=b[:1], n=50)
    assert math.isnan(one["lo"]) and math.isnan(one["hi"]) and one["estimate"] == pytest.approx(per[0])
    a[2:] = rng.random((2, 300))                           # two clusters that disagree: one good, one at chance
    free = replicate_interval(y, a, auroc, b=b, n=200, seed=1)
    clustered = replicate_interval(y, a, auroc, b=b, n=200, seed=1, groups=[0, 0, 1, 1])
    assert clustered["clusters"] == 2 and clustered["hi"] - clustered["lo"] > free["hi"] - free["lo"]
    with pytest.raises(ValueError):
        replicate_interval(y, a, auroc, b=b[:2])


def _aa_comparison(rng, n_test=300, replicates=5):
    """Two arms drawn alike: each replicate's model ranks the test examples with its own error (the fine-tuning
    spread, large at few labels) on top of the signal."""
    y = (rng.random(n_test) < 0.25).astype(int)
    arm = lambda: y * rng.normal(0.8, 0.5, (replicates, 1)) + rng.normal(0, 1, (replicates, n_test))  # noqa: E731
    return y, arm(), arm()


def test_replicate_interval_covers_zero_in_aa_comparisons_where_a_test_set_bootstrap_does_not():
    rng = np.random.default_rng(11)
    covered, test_only = 0, 0
    trials = 60
    for t in range(trials):
        y, a, b = _aa_comparison(rng)
        iv = replicate_interval(y, a, auroc, b=b, n=100, seed=t)
        covered += iv["lo"] <= 0 <= iv["hi"]
        w = resample_weights(len(y), 100, t)               # the test-only interval, as paired_delta builds it
        boot = (np.stack([resampled_scores(auroc, y, r, w) for r in a]).mean(0)
                - np.stack([resampled_scores(auroc, y, r, w) for r in b]).mean(0))
        lo, hi = np.nanpercentile(boot, [2.5, 97.5])
        test_only += lo <= 0 <= hi
    assert covered / trials >= 0.9
    assert test_only / trials < covered / trials - 0.15


def test_combine_replicates_uses_welch_satterthwaite_df():
    """With a bootstrap part of zero the interval is the plain t interval over the replicates (df = R − 1)."""
    per = np.array([0.1, 0.05, 0.2, 0.0, 0.15])
    iv = combine_replicates(per, np.tile(per[:, None], (1, 30)))    # every resample equals the estimate
    assert iv["df"] == pytest.approx(4)
    half = t_quantile(0.975, 4) * per.std(ddof=1) / math.sqrt(5)
    assert (iv["lo"], iv["hi"]) == pytest.approx((per.mean() - half, per.mean() + half))


def test_paired_delta_is_kept_as_the_test_only_bootstrap():
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.3).astype(int)
    a = y * 0.6 + rng.random((2, 200))
    d, lo, hi = paired_delta(y, a, a, auroc, n=20)
    assert (d, lo, hi) == (0.0, 0.0, 0.0)
