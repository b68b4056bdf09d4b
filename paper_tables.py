"""Paper tables: every model of every level fine-tuned with one protocol, as the paper's Tables 1-3.

Usage:
    python medhmp.py evaluate --task all --model all [--seeds 5] [--data DATA] [--run RUN]
    python medhmp.py evaluate --task mortality --model all   # one task's cells (tables: every cell)
Reads DATA/ and RUN/*.pt as evaluate does. Each cell (task, model, init) runs evaluate.evaluate_task
(so it also lands in RUN/eval/ and RUN/results.csv) and is written to
RUN/tables/cells/<task>/<model>__<init>.json with the protocol it ran with, the digest of the
checkpoint it started from, its result and its test labels and probabilities. A cell whose file
holds the same protocol and checkpoint is read back, not retrained, so a stopped run continues where
it stopped; a changed protocol or checkpoint runs the cell again. Then writes
RUN/tables/table1.md/.csv (stay tasks: AUROC / AUPRC, paper Table 1), table2 (readmission: AUROC /
AUPRC, paper Table 2) and table3 (patient tasks: AUPRC / F1 / kappa, paper Table 3): mean ± sd over
seeds, and a paired bootstrap Δ (same test examples, every seed) of each row against MedHMP at the
stay and admission levels and against the same sequence model from scratch at the patient level.

Cells: at the stay and admission levels MedHMP from `--init` (a+s by default) and from scratch, then
every baseline of the level (baselines.py; random weights only); at the patient level every sequence
model with the pretrained ICD MLP ("_a") and without. Every cell shares one FinetuneConfig: seeds,
splits, epochs, lr grid, batch size, early stopping. A pretrained cell without its checkpoint in RUN
is shown as not run (pretrain first).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from checkpoints import TRANSFERS, Checkpoints
from data import config_record
from evaluate import BASELINES, PATIENT_MODELS, FinetuneConfig, Run, check_options, evaluate_task
from folders import InputError
from metrics import METRICS
from results import (interval_text, paired_deltas, print_table, read_predictions, read_rows,
                     update_file)
from tasks import TASKS

# table file name -> (level, metrics shown; the first is the one its Δ column compares)
TABLES = {"table1": ("stay", ("auroc", "auprc")), "table2": ("admission", ("auroc", "auprc")),
          "table3": ("patient", ("auprc", "f1", "kappa"))}
LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "auprc_trapezoid": "AUPRC (trapezoid)", "f1": "F1",
          "kappa": "kappa"}
NAMES = {"medhmp": "MedHMP", "f-lstm": "F-LSTM", "f-cnn": "F-CNN", "raim": "RAIM", "dcmn": "DCMN",
         "ts-lstm": "LSTM (time series only)", "ts-transformer": "Transformer (time series only)",
         "lstm": "LSTM", "retain": "RETAIN", "dipole": "Dipole", "adacare": "AdaCare",
         "hitanet": "HiTANet",
         **{f"bert-{ts}": f"Bert{ts.capitalize()}" for ts in ("lstm", "cnn", "star", "encoder")},
         **{f"{ts}-bert": f"{ts.capitalize()}Bert" for ts in ("lstm", "cnn", "star", "encoder")}}
# FinetuneConfig fields that name a cell or an output, not how it is trained: left out of a cell's
# protocol
NOT_PROTOCOL = ("task", "model", "init", "compare_none", "table", "quiet", "device", "run")


def cell_plan(level: str, cfg: FinetuneConfig) -> list[tuple[str, str]]:
    """The (model, init) cells of a task at `level`, in the order of the table's rows."""
    pretrained = [cfg.init] if cfg.init != "none" and (level, cfg.init) in TRANSFERS else []
    if level == "patient":
        return [(m, i) for m in PATIENT_MODELS for i in (*pretrained, "none")]
    return [("medhmp", i) for i in (*pretrained, "none")] + [(m, "none") for m in BASELINES[level]]


def reference(level: str, model: str, init: str, cfg: FinetuneConfig) -> tuple[str, str] | None:
    """The cell that a row's Δ is taken against: MedHMP from `--init` (the first row) at the stay
    and admission levels, the same sequence model from scratch at the patient level; None for the
    reference itself."""
    if level == "patient":
        return (model, "none") if init != "none" else None
    first = cell_plan(level, cfg)[0]
    return None if (model, init) == first else first


def row_label(level: str, model: str, init: str) -> str:
    """The paper's name of a row: MedHMP (a+s), F-LSTM, BertLstm, RETAIN_a, RETAIN, ..."""
    if level == "patient":
        return NAMES[model] + {"admission": "_a", "stay": "_s", "none": ""}[init]
    return NAMES[model] + ({"admission": " (a+s)", "stay": " (s)", "none": " (scratch)"}[init]
                           if model == "medhmp" else "")


def cell_path(run: Path, task: str, model: str, init: str) -> Path:
    return Path(run) / "tables" / "cells" / task / f"{model}__{init}.json"


def checkpoint_file(run: Path, task: str, init: str) -> Path | None:
    """RUN/<name>.pt that a cell's init loads (None for init=none)."""
    if init == "none":
        return None
    return Path(run) / f"{TRANSFERS[TASKS[task].level, init].checkpoint}.pt"


def stamp(task: str, init: str, cfg: FinetuneConfig, ckpts: Checkpoints) -> dict:
    """What a stored cell must have run with to be reused: the protocol (the FinetuneConfig fields
    that change training, as JSON gives them back) and the digest of the checkpoint its init loads
    (None for scratch)."""
    protocol = {k: v for k, v in config_record(cfg).items() if k not in NOT_PROTOCOL}
    ckpt = checkpoint_file(cfg.run, task, init)
    digest = ckpts.get(ckpt.stem).get("digest") if ckpt is not None and ckpt.is_file() else None
    return {"protocol": json.loads(json.dumps(protocol)), "checkpoint": digest}


def stored_cell(path: Path, want: dict) -> dict | None:
    """The cell stored at `path` when it ran with the stamp `want`, else None (also for a damaged
    file)."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except ValueError:   # damaged: run it again, as a changed protocol is
        return None
    return cell if isinstance(cell, dict) and {k: cell.get(k) for k in want} == want else None


def run_cell(task: str, model: str, init: str, run: Run) -> tuple[dict, str]:
    """One cell and how it was got: "read" back from its file, "run" (fine-tuned and written), or
    "missing" (a pretrained init without its checkpoint; nothing written)."""
    cfg = run.cfg
    path, want = cell_path(cfg.run, task, model, init), stamp(task, init, cfg, run.checkpoints)
    if (cell := stored_cell(path, want)) is not None:
        return cell, "read"
    if path.is_file():
        run.rep.log(f"{task} {model} init={init}: stored with another protocol or checkpoint; "
                    "running it again")
    ckpt = checkpoint_file(cfg.run, task, init)
    if ckpt is not None and not ckpt.is_file():
        return {"result": {"skipped": f"{ckpt} not found (pretrain first)"}}, "missing"
    report = evaluate_task(task, run.configured(model=model, init=init, compare_none=False))
    result = report["results"][f"{init}/{report['model']}"]
    y, probs = [], []
    if "mean" in result:
        y, probs = read_predictions(cfg.run, task, init, report["model"])
    cell = {"task": task, "model": model, "init": init, **want, "splits": report["splits"],
            "result": result, "y": y, "probs": probs}
    path.parent.mkdir(parents=True, exist_ok=True)
    update_file(path, lambda tmp: tmp.write_text(json.dumps(cell)))
    return cell, "run"


# ------------------------------------------------------------------------------------------- tables
def delta(cell: dict | None, ref: dict | None, metric: str,
          cfg: FinetuneConfig) -> list[float] | None:
    """[Δ, lo, hi] of `metric`, cell − ref, paired over the same test examples; None unless both ran
    on them."""
    if not cell or not ref or not cell.get("probs") or not ref.get("probs") \
            or cell["y"] != ref["y"]:
        return None
    probs = {"cell": np.asarray(cell["probs"]), "ref": np.asarray(ref["probs"])}
    iv = paired_deltas(np.asarray(cell["y"]), probs, "ref", cfg.bootstrap, cfg.seed,
                       (metric,)).get("cell")
    return [iv[metric]["estimate"], iv[metric]["lo"], iv[metric]["hi"]] if iv else None


def entries(cell: dict | None, d: list | None, metrics: tuple) -> list[str]:
    """The Markdown entries of one (row, task): each metric as 'mean ±sd', then Δ '[lo, hi]'."""
    result = (cell or {}).get("result", {})
    if "mean" not in result:
        return ["skipped" if "skipped" in result else "not run"] + [""] * len(metrics)
    shown = [f"{result['mean'][m]:.3f} ±{result['sd'][m]:.3f}" for m in metrics]
    return shown + [f"{d[0]:+.3f} {interval_text(d[1], d[2], signed=True)}" if d else ""]


def csv_row(table: str, task: str, model: str, init: str, cell: dict | None, d: list | None,
            ref: str) -> dict:
    """The CSV row of one (row, task): every metric's mean and sd, the Δ and its reference, or why
    it is empty."""
    result = (cell or {}).get("result", {})
    row = {"table": table, "task": task, "model": model, "init": init,
           "label": row_label(TASKS[task].level, model, init),
           "seeds": len((cell or {}).get("probs", [])),
           "skipped": result.get("skipped", "" if cell else "not run"),
           "delta_vs": ref if d else ""}
    if "mean" in result:
        row.update(n_test=cell["splits"]["test"]["n"],
                   prevalence=round(cell["splits"]["test"]["prevalence"], 4))
        row.update({f"{m}{s}": f"{result[k][m]:.4f}" for m in METRICS
                    for s, k in (("", "mean"), ("_sd", "sd"))})
    if d:
        row.update(delta=f"{d[0]:.4f}", delta_lo=f"{d[1]:.4f}", delta_hi=f"{d[2]:.4f}")
    return row


CSV_COLUMNS = ["table", "task", "model", "init", "label", "seeds", "n_test", "prevalence",
               *[f"{m}{s}" for m in METRICS for s in ("", "_sd")], "delta_metric", "delta",
               "delta_lo", "delta_hi", "delta_vs", "skipped"]


def build_table(table: str, cells: dict, cfg: FinetuneConfig) -> tuple[list, list, list]:
    """Header and Markdown rows (the paper's layout: one row per model, the metrics of each task
    side by side, then its Δ) and the CSV rows of one table, from the cells {(task, model, init):
    cell}."""
    level, metrics = TABLES[table]
    plan = cell_plan(level, cfg)
    tasks = [t for t, spec in TASKS.items()
             if spec.level == level and any((t, *c) in cells for c in plan)]
    shown = [*(LABELS[m] for m in metrics), f"Δ {LABELS[metrics[0]]}"]
    header = ["model"] + [f"{t} {h}" for t in tasks for h in shown]
    rows, csv_rows = [], []
    for model, init in plan:
        row, ref = [row_label(level, model, init)], reference(level, model, init, cfg)
        for task in tasks:
            cell = cells.get((task, model, init))
            d = delta(cell, cells.get((task, *ref)), metrics[0], cfg) if ref else None
            row += entries(cell, d, metrics)
            vs = row_label(level, *ref) if ref else ""
            csv_rows.append({**csv_row(table, task, model, init, cell, d, vs),
                             "delta_metric": metrics[0] if d else ""})
        rows.append(row)
    return header, rows, csv_rows


def title(table: str, cfg: FinetuneConfig) -> str:
    level, metrics = TABLES[table]
    what = {"table1": "Table 1: stay-level tasks", "table2": "Table 2: readmission",
            "table3": "Table 3: patient-level tasks"}[table]
    against = ("the same model from scratch (_a: the ICD MLP pretrained by MedHMP)"
               if level == "patient" else row_label(level, *cell_plan(level, cfg)[0]))
    return (f"{what}, {' / '.join(LABELS[m] for m in metrics)}, mean ± sd over {cfg.seeds} seeds; "
            f"Δ {LABELS[metrics[0]]} = row − {against} on the same test examples [paired bootstrap "
            "95% CI]")


def notes(table: str, csv_rows: list, meta: dict) -> list[str]:
    """The lines under a table: what its note side read (Table 2) and why each empty entry is
    empty."""
    lines = []
    if table != "table3":
        lines.append("Baselines start from random weights (they have no pretrained init).")
    if table == "table2":
        lines.append("Note side of the Yang & Wu models: the frozen "
                     f"`{meta.get('notes', {}).get('text_model', '?')}` note embedding of "
                     "preprocessing (`--text-model`), not a fine-tuned ClinicalBERT.")
    lines += [f"{r['task']} {r['label']}: {r['skipped']}" for r in csv_rows if r["skipped"]]
    return [f"- {line}" for line in lines]


def write_table(folder: Path, table: str, heading: str, header: list, rows: list, csv_rows: list,
                lines: list) -> None:
    """RUN/tables/<table>.md (the paper's layout) and <table>.csv (one row per model and task), each
    whole."""
    md = [f"# {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(r) + " |" for r in rows), "", *lines]
    update_file(folder / f"{table}.md", lambda tmp: tmp.write_text("\n".join(md) + "\n"))

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(csv_rows)
    update_file(folder / f"{table}.csv", write_csv)


def check_tables(folder: Path) -> None:
    """Before any fine-tuning: the tables already in RUN/tables/ are ones medhmp wrote (an
    InputError line naming the first that is not: rewriting it would lose it)."""
    for table in TABLES:
        read_rows(folder / f"{table}.csv", CSV_COLUMNS)
        md = folder / f"{table}.md"
        if md.exists() and (not md.is_file()
                            or not md.read_text(errors="replace").startswith("# Table")):
            raise InputError(f"{md}: not a table medhmp wrote; move it away, or choose another "
                             "--run")


def tables(cfg: FinetuneConfig) -> dict:
    """Run, or read back, every cell of `cfg.task` (or of every task), then write the tables of
    every cell stored with this protocol to RUN/tables/ and print them; returns {table: (header,
    rows)}."""
    check_options(cfg, ("task", "init", "select_on"))
    if cfg.probe:
        raise InputError("--model all compares fine-tuned models; --probe is for one model at a "
                         "time")
    tasks = list(TASKS) if cfg.task == "all" else [cfg.task]
    run = Run.open(cfg, "tables", tasks)
    out, rep = Path(cfg.run) / "tables", run.rep
    check_tables(out)
    how = [run_cell(t, m, i, run)[1] for t in tasks for m, i in cell_plan(TASKS[t].level, cfg)]
    missing = (f", {how.count('missing')} not run (no checkpoint: pretrain first)"
               if "missing" in how else "")
    rep.log(f"{len(how)} cells: {how.count('run')} fine-tuned, {how.count('read')} read back from "
            f"{out / 'cells'}{missing}")
    cells = {(t, m, i): c for t in TASKS for m, i in cell_plan(TASKS[t].level, cfg)
             if (c := stored_cell(cell_path(cfg.run, t, m, i),
                                  stamp(t, i, cfg, run.checkpoints))) is not None}
    shown = {}
    for table in TABLES:
        header, rows, csv_rows = build_table(table, cells, cfg)
        if len(header) > 1:  # some task of this level has a cell
            write_table(out, table, title(table, cfg), header, rows, csv_rows,
                        notes(table, csv_rows, run.data.meta))
            print_table(header, rows, rep, title(table, cfg))
            shown[table] = (header, rows)
    rep.log(f"wrote {', '.join(f'{out / t}.md/.csv' for t in shown)}")
    return shown
