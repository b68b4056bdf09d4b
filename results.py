"""Results: the files and tables of an evaluation run, from the reports that evaluate.py builds.

Usage: `write_task(task, report, probs, ids, y)` writes RUN/eval/<task>.json,
RUN/eval/<task>_predictions.csv, the task's rows of RUN/results.csv and (with matplotlib)
RUN/eval/<task>_curves.png; `results_table(reports)` and `print_table(...)` show them. Rows and
entries of an earlier run with the same key are replaced, each file updated under a lock of its own
(folders.Lock.waiting), so that runs evaluating into one RUN at once lose no row; a file there that
medhmp did not write (another header, not a report) is refused, never rewritten (`check_outputs`,
before any fine-tuning). A module of its own (docs/design.md, Modules) so that evaluate.py stays the
fine-tuning protocol; it needs no torch.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from folders import InputError, Lock, cannot_write, replace_file
from metrics import (INTERVAL_METHOD, METRIC_FUNCTIONS, METRICS, auprc, auroc, both_classes,
                     pr_points, replicate_interval, roc_points)
from progress import Reporter


# the first columns of each CSV medhmp writes in RUN: a file that starts otherwise is not medhmp's
OWN_HEADER = 4


def read_rows(path: Path, columns: list) -> list[dict]:
    """The rows of a CSV medhmp wrote (its header starts as `columns` does); [] when absent; an
    InputError line for a file of another header, which rewriting would lose."""
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: is not a file; move it away, or choose another --run")
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if (reader.fieldnames or [])[:OWN_HEADER] != columns[:OWN_HEADER]:
            raise InputError(f"{path}: not a file medhmp wrote (its header is not "
                             f"{','.join(columns[:OWN_HEADER])},...); move it away, or choose "
                             "another --run")
        return list(reader)


def _read_report(path: Path, task: str) -> dict:
    """RUN/eval/<task>.json as an earlier run wrote it ({} when absent); an InputError line for a
    file that is not a report of `task`."""
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: is not a file; move it away, or choose another --run")
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except ValueError:
        report = None
    if not isinstance(report, dict) or report.get("task") != task \
            or not isinstance(report.get("results"), dict):
        raise InputError(f"{path}: not a {task} report medhmp wrote; move it away, or choose "
                         "another --run")
    return report


def check_outputs(run: Path, tasks: list) -> None:
    """Before any fine-tuning: every result file of `tasks` already in RUN is one medhmp wrote (an
    InputError line naming the first that is not)."""
    read_rows(run / "results.csv", RESULT_COLUMNS)
    for task in tasks:
        _read_report(run / "eval" / f"{task}.json", task)
        read_rows(run / "eval" / f"{task}_predictions.csv", PREDICTION_COLUMNS)


def update_file(path: Path, write) -> None:
    """`write(tmp)` replaces `path` whole (folders.replace_file); a full disk is one InputError
    line. A run that merges into `path` calls it holding the file's lock (folders.Lock.waiting)
    from its read to here."""
    try:
        replace_file(path, write)
    except OSError as err:
        raise cannot_write(path, err, "--run") from None


def _replace_rows(path: Path, columns: list, rows: list[dict], key: tuple) -> None:
    """Rewrite the CSV at `path` with `rows`, dropping earlier rows with the same `key` values;
    atomic, under the file's lock."""
    with Lock.waiting(path):
        old = read_rows(path, columns)
        new_keys = {tuple(str(r[k]) for k in key) for r in rows}
        kept = [r for r in old if tuple(r.get(k, "") for k in key) not in new_keys]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(kept + rows)
        update_file(path, write)


def split_stats(examples: dict) -> dict:
    """n, positives and prevalence of each split's examples ({split: {"label": (n,), ...}})."""
    return {s: {"n": len(e["label"]), "positives": int(e["label"].sum()),
                "prevalence": float(e["label"].mean()) if len(e["label"]) else math.nan}
            for s, e in examples.items()}


def skip_reason(stats: dict) -> str | None:
    """Why a cohort cannot be evaluated (no examples, or a split without both classes), or None."""
    if all(v["n"] == 0 for v in stats.values()):
        return "no examples in this data"
    bad = [f"{s} {v['n']} examples, {v['positives']} positive" for s, v in stats.items()
           if v["positives"] in (0, v["n"])]
    return "single-class split: " + "; ".join(bad) if bad else None


def paired_deltas(y: np.ndarray, probs: dict, reference: str, n: int, seed: int,
                  metrics: tuple = ("auroc", "auprc")) -> dict:
    """Δ of each entry of `probs` ({key: test probabilities (seeds, n)}) against probs[reference] on
    the same test examples y (n,), row i of each paired with row i of the reference (the same
    replicate seed and training subset), with an interval holding the replicates' and the test set's
    spread (metrics.replicate_interval, `n` test resamples): {key: {metric: its replicate_interval
    dict}}; empty without the reference, and without an entry whose rows do not pair with the
    reference's (another number of seeds)."""
    if reference not in probs:
        return {}
    ref = np.asarray(probs[reference])
    return {key: {m: replicate_interval(y, p, METRIC_FUNCTIONS[m], b=ref, n=n, seed=seed)
                  for m in metrics}
            for key, p in probs.items() if key != reference and np.shape(p) == ref.shape}


def delta_record(intervals: dict) -> dict:
    """What a report keeps of paired_deltas' entry: "delta_vs_none" {metric: [Δ, lo, hi]}, the
    per-replicate Δs and the spread of each source, and the method."""
    return {
        "delta_vs_none": {m: [iv["estimate"], iv["lo"], iv["hi"]] for m, iv in intervals.items()},
        "delta_detail": {
            m: {k: iv[k] for k in ("replicates", "replicate_se", "test_se", "df", "clusters")}
            for m, iv in intervals.items()},
        "delta_method": f"paired by replicate; {INTERVAL_METHOD}"}


def interval_text(lo: float, hi: float, digits: int = 2, signed: bool = False) -> str:
    """'[lo, hi]', or '[1 seed: no interval]' where the interval could not be measured (nan)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "[1 seed: no interval]"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]"


RESULT_COLUMNS = [
    "task", "level", "init", "model", "seeds", "n_train", "n_val", "n_test", "prevalence",
    *[f"{m}{s}" for m in METRICS for s in ("", "_sd", "_lo", "_hi")],
    *[f"delta_{m}{s}" for m in ("auroc", "auprc")
      for s in ("", "_lo", "_hi")], "lr", "skipped", "data", "updated"]
PREDICTION_COLUMNS = [
    "subject_id", "hadm_id", "stay_id", "split", "seed", "init", "model", "label", "probability"]


def write_task(task: str, report: dict, probs: dict, ids: dict, y: np.ndarray) -> None:
    """RUN/eval/<task>.json (merged by init/model), <task>_predictions.csv and the task's
    results.csv rows. `report` is evaluate.evaluate_task's (its "config" gives RUN, the data folder
    and the seeds), `probs` maps init -> test probabilities (seeds, n), `ids` the subject/hadm/stay
    id columns (n,) and `y` the labels (n,)."""
    cfg = report["config"]
    out = Path(cfg["run"]) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    _replace_rows(Path(cfg["run"]) / "results.csv", RESULT_COLUMNS, _result_rows(task, report),
                  ("task", "init", "model"))
    path = out / f"{task}.json"
    with Lock.waiting(path):
        merged = _read_report(path, task)
        report = {**report, "results": {**merged.get("results", {}), **report["results"]}}
        update_file(path, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    model = report["model"]
    rows = [{"subject_id": int(ids["subject_id"][j]), "hadm_id": ids["hadm_id"][j],
             "stay_id": ids["stay_id"][j], "split": "test", "seed": cfg["seed"] + i, "init": init,
             "model": model, "label": int(y[j]), "probability": f"{p[i, j]:.6g}"}
            for init, p in probs.items() for i in range(len(p)) for j in range(len(y))]
    _replace_rows(out / f"{task}_predictions.csv", PREDICTION_COLUMNS, rows, ("init", "model"))
    plot_curves(task, probs, np.asarray(y), out / f"{task}_curves.png")


def read_predictions(run: Path, task: str, init: str,
                     model: str) -> tuple[list[int], list[list[float]]]:
    """The test labels (n,) and probabilities (seeds, n) of one (init, model) in
    RUN/eval/<task>_predictions.csv, seeds in increasing order, examples in the order write_task
    wrote them."""
    with open(Path(run) / "eval" / f"{task}_predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["init"] == init and r["model"] == model]
    seeds = sorted({int(r["seed"]) for r in rows})
    probs = [[float(r["probability"]) for r in rows if int(r["seed"]) == s] for s in seeds]
    return [int(r["label"]) for r in rows if seeds and int(r["seed"]) == seeds[0]], probs


def plot_curves(task: str, probs: dict, y: np.ndarray, path: Path) -> bool:
    """ROC and PR curves of the test split, one line per init (probabilities averaged over seeds),
    as a PNG; only when matplotlib is installed (it is optional, never required). Returns whether a
    file was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not probs or not both_classes(np.asarray(y)):
        return False
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4))
    for init, p in probs.items():
        p = np.asarray(p).mean(axis=0)                                     # (n,) mean over seeds
        roc.plot(*roc_points(y, p), label=f"{init} (AUROC {auroc(y, p):.3f})")
        recall, precision = pr_points(y, p)
        pr.step(recall, precision, where="post", label=f"{init} (AUPRC {auprc(y, p):.3f})")
    roc.plot([0, 1], [0, 1], ":", color="grey")
    pr.axhline(float(np.mean(y)), linestyle=":", color="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{task}: ROC (test)")
    pr.set(xlabel="recall", ylabel="precision", title=f"{task}: precision-recall (test)")
    roc.legend(loc="lower right")
    pr.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _result_rows(task: str, report: dict) -> list[dict]:
    """results.csv rows of this run's inits: means, sds and CI bounds, or the reason a run was
    skipped."""
    stats, cfg, rows = report["splits"], report["config"], []
    for res in report["results"].values():
        row = {"task": task, "level": report["level"], "init": res["init"],
               "model": report["model"], "seeds": cfg["seeds"],
               **{f"n_{s}": split["n"] for s, split in stats.items()},
               "prevalence": round(stats["test"]["prevalence"], 4),
               "skipped": res.get("skipped", ""), "data": cfg["data"],
               "updated": time.strftime("%Y-%m-%d %H:%M")}
        for m in METRICS if "mean" in res else ():
            lo, hi = res["ci"][m]
            row.update({m: f"{res['mean'][m]:.4f}", f"{m}_sd": f"{res['sd'][m]:.4f}",
                        f"{m}_lo": f"{lo:.4f}", f"{m}_hi": f"{hi:.4f}", "lr": res["lr"]})
        for m, (d, lo, hi) in res.get("delta_vs_none", {}).items():  # paired: pretrained − none
            row.update({f"delta_{m}": f"{d:.4f}", f"delta_{m}_lo": f"{lo:.4f}",
                        f"delta_{m}_hi": f"{hi:.4f}"})
        rows.append(row)
    return rows


def results_table(reports: dict) -> tuple[list, list[list[str]]]:
    """Header and rows (strings): task, level, n test (prevalence), then AUROC and AUPRC per init as
    'mean ±sd [lo, hi]', and Δ AUROC = pretrained − none on the same test examples, with its paired
    bootstrap CI, where both ran."""
    inits = list(dict.fromkeys(v["init"] for r in reports.values() for v in r["results"].values()))
    header = ["task", "level", "n test (prev)"] + [f"{m} {i}" for i in inits
                                                   for m in ("AUROC", "AUPRC")]
    header += ["Δ AUROC"] if "none" in inits and len(inits) > 1 else []
    rows = []
    for name, r in reports.items():
        t = r["splits"]["test"]
        row = [name, r["level"], f"{t['n']} ({t['prevalence']:.2f})"]
        by_init = {v["init"]: v for v in r["results"].values()}
        for i in inits:
            v = by_init.get(i, {"skipped": "not run"})
            row += ([f"{v['mean'][m]:.3f} ±{v['sd'][m]:.3f} {interval_text(*v['ci'][m])}"
                     for m in ("auroc", "auprc")] if "mean" in v else ["skipped", ""])
        if len(header) > len(row):
            d = by_init.get(inits[0], {}).get("delta_vs_none", {}).get("auroc")
            row.append(f"{d[0]:+.3f} {interval_text(d[1], d[2], signed=True)}" if d else "")
        rows.append(row)
    return header, rows


def print_table(header: list, rows: list, rep: Reporter, title: str) -> None:
    """A rich table on a terminal, aligned plain text otherwise (logs, CI, pipes)."""
    if rep.quiet:
        return
    if rep.live:
        table = Table(*header, title=title)
        for row in rows:
            table.add_row(*row)
        rep.console.print(table)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    rep.log(title)
    for row in [header, *rows]:
        rep.log("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def skipped_lines(reports: dict) -> list[str]:
    """One line per skipped (task, reason), for under the table."""
    reasons = dict.fromkeys((t, v["skipped"]) for t, r in reports.items()
                            for v in r["results"].values() if "skipped" in v)
    return [f"{t}: skipped, {why}" for t, why in reasons]
