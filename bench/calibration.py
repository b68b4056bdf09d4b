"""Are the intervals calibrated? A/A comparisons (two arms identical but for their seeds) in every
(task, labels) cell, the coverage of 0 of each interval method, and the power of each against a
planted shift.

Usage: python bench/calibration.py [--out runs/transfer] [--seed 1] [--quick] [--jobs 2]
Runs bench/transfer.py's data step and its scratch and aa arms (no pretraining: both arms start from
random weights) at 25, 50, 100, 200 and all labels on every task row (8 x 5 = 40 cells),
`replicates` each; replicate r of both arms shares its label subset. Pointed at a transfer run's
--out (same seed), it reuses that run's scratch and aa runs. Each cell gives A/A comparisons of
evaluate's size (`group` replicates, disjoint groups) and one of the whole cell; each is scored by
every method:
  test-bootstrap   percentile bootstrap of the mean Δ over the test examples only (what evaluate and
                   the bench printed before: metrics.paired_delta)
  t-replicates     t interval over the per-replicate Δs (the replicates' spread only)
  t+test           t over the replicates combined with the test-set bootstrap
                   (metrics.replicate_interval; kept)
  two-level        percentile bootstrap resampling replicates and test examples together
Coverage is the share of A/A comparisons whose interval holds 0 (calibrated: about 95%; the kept
method must reach 93%); power is the share whose interval lies above 0 when arm A's test logits are
moved up by `shift` for the positives only (a known, label-driven gain). Writes OUT/calibration.json
and OUT/calibration.md.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import transfer  # noqa: E402
from metrics import (auroc, combine_replicates, replicate_scores, resample_weights,  # noqa: E402
                     t_quantile)

LABELS = (25, 50, 100, 200, 0)
METHODS = ("test-bootstrap", "t-replicates", "t+test", "two-level")
SHIFTS = (0.3, 0.6)               # logit added to arm A's positives


def intervals(per: np.ndarray, boot: np.ndarray, seed: int) -> dict:
    """{method: (lo, hi)} of the mean Δ from per-replicate Δs `per` (R,) and their bootstrap values
    (R, n)."""
    mean = boot.mean(0)
    ok = np.isfinite(mean)
    r = len(per)
    half = t_quantile(0.975, r - 1) * per.std(ddof=1) / math.sqrt(r)
    kept = combine_replicates(per, boot)
    rng = np.random.default_rng(seed)
    # replicates drawn for each resample
    picks = rng.integers(0, r, (boot.shape[1], r))
    two = np.take_along_axis(boot.T, picks, axis=1).mean(1)[ok]
    return {"test-bootstrap": tuple(np.percentile(mean[ok], [2.5, 97.5])),
            "t-replicates": (per.mean() - half, per.mean() + half),
            "t+test": (kept["lo"], kept["hi"]),
            "two-level": tuple(np.percentile(two, [2.5, 97.5]))}


def planted(p: np.ndarray, y: np.ndarray, shift: float) -> np.ndarray:
    """Probabilities p (R, N) with `shift` added to the logit of every positive example."""
    logit = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1))
    return 1 / (1 + np.exp(-(logit + shift * y)))


def cell(cfg: transfer.TransferConfig, row: str, n: int, group: int) -> dict:
    """Every A/A comparison of one cell (disjoint groups of `group` replicates, and all of them),
    each scored by every method, with no shift and with each planted shift."""
    y = transfer.evaluate.task_examples(transfer._task(row),
                                        transfer._data(cfg, transfer.ROWS[row]),
                                        transfer.evaluate.FinetuneConfig())["test"]["label"]
    w = resample_weights(len(y), cfg.bootstrap, cfg.seed)
    a, b = (transfer.load_runs(cfg, row, n, arm)["test"] for arm in ("aa", "scratch"))
    sets = [np.arange(g * group, (g + 1) * group)
            for g in range(len(a) // group)] + [np.arange(len(a))]
    out = []
    for shift in (0.0, *SHIFTS):
        pa = planted(a, y, shift) if shift else a
        (per_a, boot_a), (per_b, boot_b) = (replicate_scores(y, p, auroc, w) for p in (pa, b))
        for k, idx in enumerate(sets):
            per, boot = per_a[idx] - per_b[idx], boot_a[idx] - boot_b[idx]
            out.append({"task": row, "labels": n or "all", "shift": shift, "replicates": len(idx),
                        "delta": float(per.mean()),
                        "intervals": intervals(per, boot, cfg.seed + k)})
    return {"comparisons": out, "n_test": len(y), "positives": int(y.sum())}


def summarise(comparisons: list[dict]) -> list[dict]:
    """Per (replicates, shift, method): coverage of 0 (shift 0) or power (share wholly above 0),
    mean width."""
    rows = []
    for size in sorted({c["replicates"] for c in comparisons}):
        for shift in (0.0, *SHIFTS):
            mine = [c for c in comparisons if c["replicates"] == size and c["shift"] == shift]
            for m in METHODS:
                lo, hi = np.array([c["intervals"][m] for c in mine]).T
                hit = (lo <= 0) & (0 <= hi) if shift == 0 else lo > 0
                rows.append({"replicates": size, "shift": shift, "method": m,
                             "comparisons": len(mine),
                             "cells": len({(c["task"], c["labels"]) for c in mine}),
                             "rate": round(float(hit.mean()), 3), "count": int(hit.sum()),
                             "mean_width": round(float(np.mean(hi - lo)), 4),
                             "mean_delta": round(float(np.mean([c["delta"] for c in mine])), 4)})
    return rows


def markdown(summary: list[dict]) -> str:
    out = ["| replicates per arm | method | A/A coverage of 0 | mean width | " +
           " | ".join(f"power at shift {s:g} (mean Δ)" for s in SHIFTS) + " |",
           "|---|---|---|---|" + "---|" * len(SHIFTS)]
    get = {(x["replicates"], x["shift"], x["method"]): x for x in summary}
    for size in sorted({x["replicates"] for x in summary}):
        for m in METHODS:
            base = get[size, 0.0, m]
            powers = [f"{get[size, s, m]['rate']:.0%} ({get[size, s, m]['mean_delta']:+.3f})"
                      for s in SHIFTS]
            out.append(f"| {size} | {m} | {base['count']}/{base['comparisons']} "
                       f"({base['rate']:.1%}) in {base['cells']} cells | "
                       f"{base['mean_width']:.3f} | " + " | ".join(powers) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=transfer.TransferConfig.out)
    parser.add_argument("--seed", type=int, default=transfer.TransferConfig.seed)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--replicates", type=int, default=10)
    parser.add_argument("--group", type=int, default=5,
                        help="replicates per arm in an evaluate-sized comparison")
    parser.add_argument("--jobs", type=int, default=transfer.TransferConfig.jobs)
    args = parser.parse_args()
    base = transfer.TransferConfig(out=args.out, seed=args.seed, jobs=args.jobs,
                                   **(transfer.QUICK if args.quick else {}))
    cfg = replace(base, labels=(25, 0) if args.quick else LABELS, replicates=args.replicates,
                  arms=("scratch", "aa"))
    cfg.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    transfer.emit(cfg, kind="calibration-config", labels=cfg.labels,
                  replicates=cfg.replicates, group=args.group, code=transfer.code_digest())
    pool = multiprocessing.get_context("spawn").Pool(cfg.jobs)
    try:
        with transfer.sigterm_as_interrupt():
            times = [transfer.prepare_data(cfg, cfg.arms), transfer.run_all(cfg, pool, cfg.arms)]
            cells = pool.starmap(cell, [(cfg, row, n, args.group) for row in transfer.ROWS
                                        for n in cfg.labels])
        pool.close()
    except KeyboardInterrupt:
        pool.terminate()
        sys.exit(130)
    finally:
        pool.join()
    comparisons = [c for x in cells for c in x["comparisons"]]
    summary = summarise(comparisons)
    for x in summary:
        transfer.emit(cfg, kind="calibration", **x)
    (cfg.out / "calibration.json").write_text(
        json.dumps({"summary": summary, "comparisons": comparisons}))
    (cfg.out / "calibration.md").write_text(markdown(summary))
    print(markdown(summary), flush=True)
    transfer.emit(cfg, kind="time", step="calibration", wall_s=round(time.perf_counter() - start),
                  cpu_s=sum(t["cpu_s"] for t in times))


if __name__ == "__main__":
    main()
