"""Metrics: binary-classification scores and bootstrap confidence intervals, in numpy only.

Usage: `binary_metrics(y, p)` -> {"auroc", "auprc", "auprc_trapezoid", "f1", "kappa"};
`replicate_interval(y, a, auroc, b=b)` -> the mean Δ over paired replicates with an interval that
holds both the replicate spread and the test-set spread (the one evaluate, the demo and the paper
tables print; chosen by the coverage bench/calibration.py measures: README, "Evaluation, and how
sure a Δ is");
`bootstrap_ci` and `paired_delta` resample the test examples only (kept for comparison). Checked
against scikit-learn and scipy in the tests (tests/test_evaluate.py, tests/test_intervals.py), which
they are only test dependencies of. A module of its own (docs/design.md, Modules): it imports
nothing from the project, so it can be copied alone, and it keeps evaluate.py to the fine-tuning
protocol.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

METRICS = ("auroc", "auprc", "auprc_trapezoid", "f1", "kappa")


def both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve = Mann-Whitney U / (P·N) with average ranks for tied scores; nan if
    one class."""
    y = np.asarray(y, dtype=bool)
    if not both_classes(y):
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct score
    n_pos = int(y.sum())
    u = avg_rank[inverse][y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * (len(y) - n_pos)))


def _counts_at_thresholds(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) at each distinct score taken as threshold, highest score
    first."""
    order = np.argsort(-np.asarray(p), kind="stable")
    y, p = np.asarray(y, dtype=float)[order], np.asarray(p)[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # last example of each distinct score
    tp = np.cumsum(y)[last]
    return tp, (last + 1) - tp


def pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct score taken as threshold, highest score first."""
    tp, fp = _counts_at_thresholds(y, p)
    return tp / tp[-1], tp / (tp + fp)


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0) through each distinct score as
    threshold."""
    tp, fp = _counts_at_thresholds(y, p)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision, step-wise: Σ_k (R_k − R_{k−1}) P_k over distinct thresholds (sklearn's
    AP)."""
    if not both_classes(np.asarray(y)):
        return math.nan
    recall, precision = pr_points(y, p)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def auprc_trapezoid(y: np.ndarray, p: np.ndarray) -> float:
    """Trapezoidal area under the PR curve from (0, 1): the paper's `auc(recall, precision)`
    (official code)."""
    if not both_classes(np.asarray(y)):
        return math.nan
    recall, precision = pr_points(y, p)
    return float(np.trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


def _confusion(y, p, threshold: float = 0.5) -> tuple[int, int, int, int]:
    y, pred = np.asarray(y, dtype=bool), np.asarray(p) >= threshold
    tp, fp = int((y & pred).sum()), int((~y & pred).sum())
    return tp, fp, int((y & ~pred).sum()), int((~y & ~pred).sum())


def f1(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of the positive class at `threshold`; 0 when there is no positive at all (sklearn's
    default)."""
    tp, fp, fn, _ = _confusion(y, p, threshold)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def kappa(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    """Cohen's κ = (p_o − p_e) / (1 − p_e) between labels and predictions at `threshold`; nan if p_e
    = 1."""
    tp, fp, fn, tn = _confusion(y, p, threshold)
    n = tp + fp + fn + tn
    p_o = (tp + tn) / n
    p_e = ((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn)) / n ** 2
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan


METRIC_FUNCTIONS = {
    "auroc": auroc, "auprc": auprc, "auprc_trapezoid": auprc_trapezoid, "f1": f1, "kappa": kappa}
METRIC_RANGES = {
    auroc: (0.0, 1.0), auprc: (0.0, 1.0), auprc_trapezoid: (0.0, 1.0), f1: (0.0, 1.0),
    kappa: (-1.0, 1.0)}


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """Every metric of METRICS for labels y (n,) in {0, 1} and probabilities p (n,)."""
    return {name: METRIC_FUNCTIONS[name](y, p) for name in METRICS}


def bootstrap_ci(y, p, metric, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of `metric(y, p)` over `n` resamples of the examples (with replacement);
    deterministic per seed. p may be (seeds, N): each resample then scores the mean of the metric
    over the rows, so the CI belongs to the reported mean over seeds. Single-class resamples are
    left out."""
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
    """Δ = mean over rows of metric(y, a) − mean over rows of metric(y, b), with a percentile CI; a
    (Ra, N) and b (Rb, N) score the same N examples (e.g. pretrained and scratch runs, one row per
    seed). Each of the `n` resamples draws the examples with replacement, the same for a and b
    (paired), and, when `groups` (Ra,) names a cluster per row of a (its pretraining seed, say),
    also draws the clusters with replacement, so the CI holds both the test-set and the
    between-cluster spread. Returns (Δ, lo, hi)."""
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


# ------------------------------------------------------------------------ intervals over replicates
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 + num * d, 1 + num / c
            d, c = 1 / (d if abs(d) > tiny else tiny), (c if abs(c) > tiny else tiny)
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function; df may be fractional (Welch-Satterthwaite) or inf
    (normal)."""
    if math.isinf(df):
        return NormalDist().cdf(t)
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with `df` degrees of freedom (bisection on t_cdf; 0 < q <
    1)."""
    if math.isinf(df) or df > 1e7:
        return NormalDist().inv_cdf(q)
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2


def resample_weights(n_examples: int, n: int, seed: int) -> np.ndarray:
    """(n, N) counts: how often each of N examples is drawn in each of `n` bootstrap resamples
    (multinomial, the same draws as sampling N indices with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=n)


def _weighted_ranked(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per distinct score, highest score first: ((n, G), (n, G)) for
    weights w (n, N)."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order].astype(bool)
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]  # first example of each distinct score
    ws = w[:, order]
    pos = np.add.reduceat(np.where(ys, ws, 0), starts, axis=1)
    neg = np.add.reduceat(np.where(ys, 0, ws), starts, axis=1)
    return pos.astype(float), neg.astype(float)


def resampled_scores(metric, y, p, weights: np.ndarray) -> np.ndarray:
    """metric(y, p) on every resample of `weights` (n, N) (resample_weights), as (n,); nan where a
    resample holds one class. AUROC and AUPRC are computed from the weights directly (fast); other
    metrics by drawing indices."""
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if metric in (auroc, auprc):
        pos, neg = _weighted_ranked(y, p, weights)
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if metric is auroc:   # pairs ranked right + half the tied pairs, over all pairs
                # negatives scored below each group
                above = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1] - neg
                out = (pos * (above + neg / 2)).sum(1) / (n_pos * n_neg)
            else:                 # Σ (R_k − R_{k−1}) P_k over distinct thresholds
                tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
                out = (pos / n_pos[:, None] * np.where(tp > 0, tp / (tp + fp), 0)).sum(1)
        return np.where((n_pos > 0) & (n_neg > 0), out, math.nan)
    idx_all = np.arange(len(y))
    out = []
    for w in weights:
        idx = np.repeat(idx_all, w)
        out.append(metric(y[idx], p[idx]) if both_classes(y[idx]) else math.nan)
    return np.asarray(out, dtype=float)


INTERVAL_METHOD = ("t interval over replicates (their spread, clusters averaged first) combined "
                   "with the test-set spread (bootstrap of the mean over replicates), "
                   "Welch-Satterthwaite df")


def replicate_scores(y, rows, metric, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """metric(y, row) of each replicate's test probabilities `rows` (R, N), on the test set as it is
    (R,) and on each resample of `weights` (n, N) (R, n): what replicate_interval combines, computed
    once per arm."""
    rows = np.atleast_2d(np.asarray(rows, dtype=float))
    return (np.array([metric(y, r) for r in rows]),
            np.stack([resampled_scores(metric, y, r, weights) for r in rows]))


def combine_replicates(per: np.ndarray, boot: np.ndarray, groups=None, level: float = 0.95,
                       bounds: tuple = (-math.inf, math.inf)) -> dict:
    """The interval of replicate_interval from per-replicate values `per` (R,) and their bootstrap
    values `boot` (R, n) (differences of two arms' replicate_scores for a paired Δ), clipped to
    `bounds` (the metric's range: with 2-3 replicates the t quantile alone can reach past it)."""
    per, boot = np.asarray(per, dtype=float), np.asarray(boot, dtype=float)
    groups = np.arange(len(per)) if groups is None else np.asarray(groups)
    names, cluster = np.unique(groups, return_inverse=True)
    c = len(names)

    def cluster_mean(values: np.ndarray) -> np.ndarray:  # (R, ...) -> (C, ...): within each cluster
        return np.stack([np.mean(values[cluster == k], axis=0) for k in range(c)])
    means = cluster_mean(per)
    estimate = float(np.mean(means))
    boot = cluster_mean(boot).mean(0)  # (n,) the estimate on each resample
    var_test = float(np.nanvar(boot, ddof=1)) if np.isfinite(boot).sum() > 1 else math.nan
    var_rep = float(np.var(means, ddof=1) / c) if c > 1 else math.nan
    out = {
        "estimate": estimate, "replicates": per.tolist(), "clusters": c,
        "replicate_se": math.sqrt(var_rep) if c > 1 else math.nan, "test_se": math.sqrt(var_test)}
    if c < 2 or not math.isfinite(var_test + var_rep):
        return {**out, "lo": math.nan, "hi": math.nan, "se": math.nan, "df": math.nan}
    var = var_rep + var_test
    df = math.inf if var_rep == 0 else var ** 2 / (var_rep ** 2 / (c - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(var)
    lo, hi = max(estimate - half, bounds[0]), min(estimate + half, bounds[1])
    return {**out, "lo": lo, "hi": hi, "se": math.sqrt(var), "df": df}


def replicate_interval(y, a, metric, b=None, groups=None, n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict:
    """The mean over replicates of metric(y, a_r) − metric(y, b_r) (or of metric(y, a_r) without b)
    with an interval that holds both sources of run-to-run spread a user faces:
      * the replicates' spread: a (R, N) and b (R, N) are paired rows (replicate r of each arm
        shares its label subset and seed); `groups` (R,) names a cluster per replicate (e.g. its
        pretraining seed), averaged before the spread is taken, so replicates that share a
        pretrained model count once;
      * the test set's spread: the variance of the mean over replicates when the N test examples are
        resampled (`n` bootstrap resamples, the same for both arms: paired).
    se² = var(cluster means) / C + var_test, and the interval is estimate ± t(df) · se with
    Welch-Satterthwaite df (C − 1 for the replicate part, ∞ for the bootstrap part), clipped to the
    metric's range. bench/calibration.py measures its coverage of 0 in A/A comparisons (two arms
    identical but for their seeds). With one cluster the replicate spread cannot be measured: lo and
    hi are nan.
    Returns {"estimate", "lo", "hi", "se", "df", "replicate_se", "test_se", "replicates" (R,),
    "clusters"}."""
    y = np.asarray(y)
    weights = resample_weights(len(y), n, seed)
    per, boot = replicate_scores(y, a, metric, weights)
    lo, hi = METRIC_RANGES.get(metric, (-math.inf, math.inf))
    if b is not None:
        if np.shape(np.atleast_2d(b)) != np.shape(np.atleast_2d(a)):
            raise ValueError(f"paired replicates need equal shapes, got {np.shape(a)} and "
                             f"{np.shape(b)}")
        per_b, boot_b = replicate_scores(y, b, metric, weights)
        per, boot, (lo, hi) = per - per_b, boot - boot_b, (lo - hi, hi - lo)
    return combine_replicates(per, boot, groups, level, (lo, hi))
