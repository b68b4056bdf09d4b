"""Metrics: binary-classification scores and bootstrap confidence intervals, in numpy only.

Usage: `binary_metrics(y, p)` -> {"auroc", "auprc", "auprc_trapezoid", "f1", "kappa"};
`bootstrap_ci(y, p, auroc, n=1000, seed=0)` -> (lo, hi). Checked against scikit-learn in the tests
(tests/test_evaluate.py), which scikit-learn is only a test dependency of.
A module of its own (docs/design.md, Modules): it imports nothing from the
project, so it can be copied alone, and it keeps evaluate.py to the fine-tuning protocol.
"""
from __future__ import annotations

import math

import numpy as np

METRICS = ("auroc", "auprc", "auprc_trapezoid", "f1", "kappa")


def both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve = Mann-Whitney U / (P·N) with average ranks for tied scores; nan if one class."""
    y = np.asarray(y, dtype=bool)
    if not both_classes(y):
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0           # 1-based mean rank of each distinct score
    n_pos = int(y.sum())
    u = avg_rank[inverse][y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * (len(y) - n_pos)))


def _counts_at_thresholds(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) at each distinct score taken as threshold, highest score first."""
    order = np.argsort(-np.asarray(p), kind="stable")
    y, p = np.asarray(y, dtype=float)[order], np.asarray(p)[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]         # last example of each distinct score
    tp = np.cumsum(y)[last]
    return tp, (last + 1) - tp


def pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct score taken as threshold, highest score first."""
    tp, fp = _counts_at_thresholds(y, p)
    return tp / tp[-1], tp / (tp + fp)


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0) through each distinct score as threshold."""
    tp, fp = _counts_at_thresholds(y, p)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision, step-wise: Σ_k (R_k − R_{k−1}) P_k over distinct thresholds (sklearn's AP)."""
    if not both_classes(np.asarray(y)):
        return math.nan
    recall, precision = pr_points(y, p)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def auprc_trapezoid(y: np.ndarray, p: np.ndarray) -> float:
    """Trapezoidal area under the PR curve from (0, 1): the paper's `auc(recall, precision)` (official code)."""
    if not both_classes(np.asarray(y)):
        return math.nan
    recall, precision = pr_points(y, p)
    return float(np.trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


def _confusion(y, p, threshold: float = 0.5) -> tuple[int, int, int, int]:
    y, pred = np.asarray(y, dtype=bool), np.asarray(p) >= threshold
    return int((y & pred).sum()), int((~y & pred).sum()), int((y & ~pred).sum()), int((~y & ~pred).sum())


def f1(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of the positive class at `threshold`; 0 when there is no positive at all (sklearn's default)."""
    tp, fp, fn, _ = _confusion(y, p, threshold)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def kappa(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e) between labels and predictions at `threshold`; nan if p_e = 1."""
    tp, fp, fn, tn = _confusion(y, p, threshold)
    n = tp + fp + fn + tn
    p_o = (tp + tn) / n
    p_e = ((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)) / n ** 2
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan


METRIC_FUNCTIONS = {"auroc": auroc, "auprc": auprc, "auprc_trapezoid": auprc_trapezoid, "f1": f1, "kappa": kappa}


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """Every metric of METRICS for labels y (n,) in {0, 1} and probabilities p (n,)."""
    return {name: METRIC_FUNCTIONS[name](y, p) for name in METRICS}


def bootstrap_ci(y, p, metric, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `metric(y, p)` over `n` resamples of the examples (with replacement); deterministic
    per seed. p may be (seeds, N): each resample then scores the mean of the metric over the rows, so the
    CI belongs to the reported mean over seeds. Single-class resamples are left out."""
    y, p = np.asarray(y), np.atleast_2d(np.asarray(p))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if both_classes(y[idx]):
            values.append(np.mean([metric(y[idx], row[idx]) for row in p]))
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_delta(y, a, b, metric, n: int = 1000, seed: int = 0, groups=None,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Δ = mean over rows of metric(y, a) − mean over rows of metric(y, b), with a percentile CI; a (Ra, N)
    and b (Rb, N) score the same N examples (e.g. pretrained and scratch runs, one row per seed). Each of the
    `n` resamples draws the examples with replacement, the same for a and b (paired), and, when `groups`
    (Ra,) names a cluster per row of a (its pretraining seed, say), also draws the clusters with replacement,
    so the CI holds both the test-set and the between-cluster spread. Returns (Δ, lo, hi)."""
    y, a, b = np.asarray(y), np.atleast_2d(np.asarray(a)), np.atleast_2d(np.asarray(b))
    groups = np.zeros(len(a), dtype=int) if groups is None else np.asarray(groups)
    names = np.unique(groups)
    rows = [np.flatnonzero(groups == g) for g in names]

    def delta(idx, picked):
        rows_a = np.concatenate([rows[g] for g in picked])
        return (np.mean([metric(y[idx], a[r, idx]) for r in rows_a])
                - np.mean([metric(y[idx], row[idx]) for row in b]))
    point = delta(np.arange(len(y)), range(len(names)))
    rng, values = np.random.default_rng(seed), []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        picked = rng.integers(0, len(names), len(names)) if len(names) > 1 else [0]
        if both_classes(y[idx]):
            values.append(delta(idx, picked))
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float(point), math.nan, math.nan
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(point), float(lo), float(hi)
