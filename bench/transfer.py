"""Does MedHMP pretraining transfer? A positive control (the latent-model cohort) and a negative control
(the same pool with every column shuffled), at several label counts.

Usage: python bench/transfer.py [--out runs/transfer] [--quick] [--jobs 2] [--only data,pretrain,...]
Writes everything under OUT and can be stopped and re-run: finished steps and runs are kept.
  data      a synthetic MIMIC-III extract of `patients` patients and a TriNetX-style one (latents written
            beside them, never read by preprocessing), both preprocessed (TriNetX with the MIMIC vocabulary);
            the MIMIC patients are split into an unlabelled pretraining pool (>= 20x the labelled cohort), a
            labelled cohort, a validation set for pretraining, one for fine-tuning, and a test set; views/
            holds one folder per use, sharing the tensors through links.
  pretrain  both stages on the pool for `pretrain_seeds` seeds: arm "medhmp" on the real pool, arm "shuffled"
            on a copy in which every column (each hourly feature's 48-h series, each static column, each ICD
            and drug code, each note dimension) is permuted across the pool on its own: frequencies kept,
            co-occurrence destroyed. One JSON line per run with its health verdict.
  latents   5-fold ridge R² of the true latents from the frozen representations (stay vector -> stay latents,
            admission vector -> admission latents, mean visit ICD embedding -> patient latents), pretrained
            against the same architecture with random weights, on the test patients.
  finetune  every task row (arf, shock, mortality, readmission, hf, and hf/copd/amnesia on the TriNetX-style
            extract) at each label count: arms scratch, medhmp and shuffled fine-tuned (learning rate chosen per
            arm from a small grid on validation), and L2 logistic-regression probes of each frozen encoder
            (medhmp-probe, shuffled-probe, random-probe: untrained weights).
  report    one JSON line per (task, labels, arm): auroc, auprc, delta_auroc and its CI against scratch (paired
            bootstrap over test examples and pretraining seeds), then the pass criteria; the Δ tables in
            OUT/transfer.md; transfer.png with matplotlib.
Every result line is also appended to OUT/transfer.jsonl. One torch thread per process; `--jobs` processes.
About 2 hours with the defaults on a 2-core CPU (data and pretraining 32 min, the rest about 85; README).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from metrics import auprc, auroc, paired_delta  # noqa: E402
from models import AdmissionEncoder, CodeEncoder, StayEncoder, load_encoder  # noqa: E402
from preprocessing.pipeline import PreprocessConfig, preprocess  # noqa: E402
from progress import Reporter  # noqa: E402

ROWS = {"arf": "mimic", "shock": "mimic", "mortality": "mimic", "readmission": "mimic", "hf": "mimic",
        "hf (trinetx)": "trinetx", "copd (trinetx)": "trinetx", "amnesia (trinetx)": "trinetx"}
ARMS = ("scratch", "medhmp", "shuffled")
PROBES = ("random-probe", "medhmp-probe", "shuffled-probe")


@dataclass(frozen=True)
class TransferConfig:
    out: Path = Path("runs/transfer")
    patients: int = 14000                 # MIMIC-style extract; ~72% of its patients form the pool
    trinetx_patients: int = 3000
    seed: int = 0
    pretrain_seeds: int = 3
    finetune_seeds: int = 3
    labels: tuple = (25, 50, 100, 200, 400, 0)   # training examples per task; 0: the whole labelled cohort
    pool_ratio: int = 20                  # the pool has >= this many patients per labelled-cohort patient
    d_model: int = 64
    stay_epochs: int = 10
    stay_batch_size: int = 64
    stay_lr: float = 1e-3
    admission_epochs: int = 8
    admission_batch_size: int = 256
    admission_lr: float = 1e-3
    pretrain_patience: int = 3
    epochs: int = 20                      # fine-tuning
    patience: int = 5
    lrs: dict = field(default_factory=lambda: {"stay": (1e-3, 5e-3, 2e-2), "admission": (1e-3, 5e-3, 2e-2),
                                               "patient": (1e-2, 5e-2, 2e-1)})
    l2s: tuple = (1e-3, 1e-2, 1e-1, 1.0)  # probe penalties, chosen on validation
    bootstrap: int = 500
    jobs: int = 2


QUICK = dict(patients=700, trinetx_patients=500, pretrain_seeds=2, finetune_seeds=2, labels=(25, 0),
             stay_epochs=2, admission_epochs=2, epochs=3, patience=2, bootstrap=50,
             lrs={"stay": (5e-3, 2e-2), "admission": (5e-3,), "patient": (5e-2,)}, l2s=(1e-2, 1.0))


def emit(cfg: TransferConfig, **record) -> dict:
    print(json.dumps(record), flush=True)
    with open(cfg.out / "transfer.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


# ---------------------------------------------------------------------------------------------- data
def _split_ids(ids: np.ndarray, seed: int, *fractions) -> list[np.ndarray]:
    """Consecutive parts of a seeded permutation of `ids`, sized by `fractions` (the last takes the rest)."""
    ids = np.random.default_rng(seed).permutation(np.sort(ids))
    cuts = np.cumsum([int(round(f * len(ids))) for f in fractions[:-1]])
    return [np.sort(part) for part in np.split(ids, cuts)]


def _view(cfg: TransferConfig, name: str, source: Path, splits: dict, tensors: dict | None = None) -> Path:
    return data.write_view(source, cfg.out / "views" / name, splits, tensors)


def prepare_data(cfg: TransferConfig) -> None:
    raw, processed = cfg.out / "raw", cfg.out / "processed"
    for layout, n in (("mimic3", cfg.patients), ("trinetx", cfg.trinetx_patients)):
        if not (raw / layout).is_dir():
            synthetic.synthesize(synthetic.SynthConfig(out=raw / layout, patients=n, layout=layout, seed=cfg.seed,
                                                       quiet=True))
    if not (processed / "mimic3" / "meta.json").is_file():
        preprocess(PreprocessConfig(raw=raw / "mimic3", out=processed / "mimic3", seed=cfg.seed,
                                              split=(0.755, 0.045, 0.2), quiet=True))
    if not (processed / "trinetx" / "meta.json").is_file():
        preprocess(PreprocessConfig(raw=raw / "trinetx", out=processed / "trinetx", seed=cfg.seed,
                                              split=(0.16, 0.1, 0.74), vocab_from=processed / "mimic3", quiet=True))
    d = data.load_processed(processed / "mimic3")
    n_label = len(d.splits["train"]) // (cfg.pool_ratio + 1)
    labelled, pool = _split_ids(d.splits["train"], cfg.seed, n_label / len(d.splits["train"]), 1.0)
    preval, ftval = _split_ids(d.splits["val"], cfg.seed, 0.5, 0.5)
    pretrain_splits = {"train": pool, "val": preval, "test": np.zeros(0, int)}
    _view(cfg, "pretrain-medhmp", processed / "mimic3", pretrain_splits)
    _view(cfg, "pretrain-shuffled", processed / "mimic3", pretrain_splits,
          data.shuffle_columns(d, np.concatenate([pool, preval]), cfg.seed))
    _view(cfg, "finetune", processed / "mimic3", {"train": labelled, "val": ftval, "test": d.splits["test"]})
    t = data.load_processed(processed / "trinetx")
    emit(cfg, kind="data", pool_patients=len(pool), labelled_patients=len(labelled),
         trinetx_labelled_patients=len(t.splits["train"]), ratio=round(len(pool) / max(len(labelled), 1), 1),
         stays=len(d.stays["stay_id"]), admissions=len(d.admissions["hadm_id"]),
         features=d.meta["n_features"], icd=d.meta["n_icd"], drugs=d.meta["n_drug"])


# --------------------------------------------------------------------------------------- pretraining
def pretrain_one(cfg: TransferConfig, arm: str, seed: int) -> dict:
    """Stage 1 then stage 2 of one (arm, seed) into OUT/pretrain/ARM-SEED; returns both verdicts."""
    torch.set_num_threads(1)
    run, view = cfg.out / "pretrain" / f"{arm}-{seed}", cfg.out / "views" / f"pretrain-{arm}"
    common = dict(data=view, run=run, d_model=cfg.d_model, seed=seed, patience=cfg.pretrain_patience, quiet=True,
                  checkpoint_every=10 ** 9)
    out = {}
    for level, epochs, bs, lr in (("stay", cfg.stay_epochs, cfg.stay_batch_size, cfg.stay_lr),
                                  ("admission", cfg.admission_epochs, cfg.admission_batch_size, cfg.admission_lr)):
        if (run / f"{level}.pt").is_file():
            ends = [json.loads(line) for line in open(run / "log.jsonl") if '"event": "end"' in line]
            out[level] = next(e for e in reversed(ends) if e["level"] == level)
            continue
        start = time.perf_counter()
        rec = train.pretrain(train.LEVELS[level](epochs=epochs, batch_size=bs, lr=lr, **common))
        out[level] = {"verdict": rec["verdict"], "learned": rec["learned"], "best": rec["best"],
                      "seconds": round(time.perf_counter() - start)}
    return out


def pretrain_all(cfg: TransferConfig, pool: ProcessPoolExecutor) -> None:
    jobs = {(arm, s): pool.submit(pretrain_one, cfg, arm, s) for arm in ("medhmp", "shuffled")
            for s in range(cfg.pretrain_seeds)}
    for (arm, s), job in jobs.items():
        for level, rec in job.result().items():
            emit(cfg, kind="pretrain", arm=arm, seed=s, level=level, **rec)


# ----------------------------------------------------------------------------------- representations
_CACHE: dict = {}


def _data(cfg: TransferConfig, name: str) -> data.Processed:
    """A view or processed folder, loaded once per process."""
    if name not in _CACHE:
        root = cfg.out / ("views/finetune" if name == "mimic" else "processed/trinetx")
        _CACHE[name] = data.load_processed(root)
    return _CACHE[name]


def _ckpt_dir(cfg: TransferConfig, arm: str, seed: int) -> Path:
    return cfg.out / "pretrain" / f"{'medhmp' if arm.startswith(('scratch', 'random')) else arm.split('-')[0]}-{seed}"


def encoder(cfg: TransferConfig, level: str, arm: str, seed: int, d: data.Processed):
    """The frozen encoder of a level for an arm: pretrained (admission.pt) or random weights (seeded)."""
    ckpts = checkpoints.Checkpoints(_ckpt_dir(cfg, arm, seed), d.meta)
    mcfg = ckpts.model_config("admission")
    torch.manual_seed(seed)
    enc = {"stay": lambda: StayEncoder(mcfg), "admission": lambda: AdmissionEncoder(mcfg),
           "patient": lambda: CodeEncoder(mcfg.n_icd, mcfg.d_model)}[level]()
    if not arm.startswith(("scratch", "random")):
        prefix = {"stay": "encoder.stay_encoder.", "admission": "encoder.", "patient": "encoder.icd_encoder."}[level]
        load_encoder(enc, ckpts.get("admission")["model"], prefix)
    return enc.eval()


@torch.no_grad()
def embed(enc, level: str, d: data.Processed, ex: dict) -> np.ndarray:
    """(n, D) frozen representations of examples `ex`: stay / admission vectors, or each patient's mean
    visit ICD embedding."""
    ds = evaluate.labelled_dataset(level, d, ex, evaluate.FinetuneConfig())
    out = []
    for batch in data.make_loader(ds, 256):
        if level == "patient":
            m = batch["visit_mask"].float()[..., None]  # (B, L, 1)
            out.append((enc(batch["icd"]) * m).sum(1) / m.sum(1).clamp(min=1))  # (B, D)
        else:
            out.append(enc(batch))  # (B, D)
    return torch.cat(out).numpy()


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray, float]:
    """L2 logistic regression by LBFGS on standardised features: (mean, sd, weights with bias last)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.tensor((x - mu) / sd, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w[:-1] + w[-1], yt) + l2 * (w[:-1] ** 2).sum()
        out.backward()
        return out
    opt.step(loss)
    return mu, sd, w.detach().numpy()


def predict_logistic(model, x: np.ndarray) -> np.ndarray:
    mu, sd, w = model
    return 1 / (1 + np.exp(-(((x - mu) / sd) @ w[:-1] + w[-1])))


def ridge_r2(x: np.ndarray, y: np.ndarray, folds: int = 5, l2: float = 1.0, seed: int = 0) -> float:
    """Out-of-fold R² of a ridge regression of y (n,) on x (n, d), features standardised per fold."""
    fold, pred = np.random.default_rng(seed).permutation(len(y)) % folds, np.zeros(len(y))
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        a = np.c_[(x[tr] - mu) / sd, np.ones(tr.sum())]
        w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ y[tr])
        pred[te] = np.c_[(x[te] - mu) / sd, np.ones(te.sum())] @ w
    return float(1 - np.mean((y - pred) ** 2) / np.var(y))


# ------------------------------------------------------------------------------------------- latents
def latent_probes(cfg: TransferConfig) -> None:
    """R² of each true latent from frozen representations of the test patients, pretrained vs random."""
    lat = synthetic.read_latents(cfg.out / "raw" / "mimic3")
    d = _data(cfg, "mimic")
    test = d.splits["test"]
    a, s = d.admissions, d.stays
    units = {  # level -> (examples, the latent table, the ids the table is keyed by)
        "stay": (np.flatnonzero(np.isin(s["subject_id"].numpy(), test)), "stays", s["stay_id"].numpy()),
        "admission": (np.flatnonzero(np.isin(a["subject_id"].numpy(), test) & (np.diff(a["stay_ptr"].numpy()) > 0)
                                     & (np.diff(a["icd_ptr"].numpy()) > 0)), "admissions", a["hadm_id"].numpy()),
        "patient": (test, "patients", test)}
    for level, (rows, table, ids) in units.items():
        rows = rows[:4000]
        if level == "patient":
            ex = {"row": np.full(len(rows), -1), "subject_id": rows, "label": np.zeros(len(rows)),
                  "cutoff": np.full(len(rows), np.inf)}
        else:
            ex = {"row": rows, "subject_id": np.zeros(len(rows), int), "label": np.zeros(len(rows)),
                  "cutoff": np.zeros(len(rows))}
        t = lat[table]
        key = next(k for k in t if k.endswith("_id") and k != "subject_id") if level != "patient" else "subject_id"
        at = data.row_of(np.asarray(t[key]), ids[rows] if level != "patient" else rows)
        names = [k for k in t if not k.endswith("_id") and np.asarray(t[k]).dtype.kind == "f"]
        for arm in ("medhmp", "random", "shuffled"):
            r2 = []
            for seed in range(cfg.pretrain_seeds):
                x = embed(encoder(cfg, level, arm, seed, d), level, d, ex)
                ok = at >= 0
                r2.append({n: ridge_r2(x[ok], np.asarray(t[n], dtype=float)[at[ok]]) for n in names})
            emit(cfg, kind="latents", level=level, arm=arm, n=int((at >= 0).sum()),
                 r2={n: round(float(np.mean([r[n] for r in r2])), 3) for n in names},
                 mean_r2=round(float(np.mean([np.mean(list(r.values())) for r in r2])), 3))


# ---------------------------------------------------------------------------------------- fine-tuning
def subset(e: dict, n: int, seed: int) -> dict:
    """n training examples (evaluate.sample_labels: stratified); n = 0: all of them."""
    return e if n <= 0 else evaluate.sample_labels(e, n, seed)


def _task(row: str) -> str:
    return row.split(" ")[0]


def _examples(cfg: TransferConfig, row: str, fcfg) -> tuple[data.Processed, dict]:
    d = _data(cfg, ROWS[row])
    return d, evaluate.task_examples(_task(row), d, fcfg)


def _cache(cfg: TransferConfig, row: str, n: int, arm: str, pt: int, ft: int, lr: float) -> Path:
    return cfg.out / "finetune" / re.sub(r"\W+", "_", row).strip("_") / str(n) / f"{arm}-p{pt}-f{ft}-{lr:g}.npz"


def finetune_one(cfg: TransferConfig, row: str, n: int, arm: str, pt: int, ft: int, lr: float) -> dict:
    """Fine-tune one (task, labels, arm, pretraining seed, fine-tuning seed, lr); cached on disk."""
    path = _cache(cfg, row, n, arm, pt, ft, lr)
    if not path.is_file():
        torch.set_num_threads(1)
        task = _task(row)
        fcfg = evaluate.FinetuneConfig(task=task, epochs=cfg.epochs, patience=cfg.patience, quiet=True)
        d, ex = _examples(cfg, row, fcfg)
        ex["train"] = subset(ex["train"], n, ft)
        level = evaluate.TASKS[task].level
        sets = {s: evaluate.labelled_dataset(level, d, e, fcfg) for s, e in ex.items()}
        torch.manual_seed(ft)
        ckpts = checkpoints.Checkpoints(_ckpt_dir(cfg, arm, pt), d.meta)
        model, _ = evaluate.build_model(task, "none" if arm == "scratch" else "admission", fcfg, ckpts)
        cpu = torch.device("cpu")
        run = evaluate.Run(fcfg, d, ckpts, cpu, torch.float32, Reporter(quiet=True))
        rec = evaluate.finetune(model, sets, run, ft, lr)
        test = evaluate.predict(model, sets["test"], 256, cpu, torch.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, val=rec[f"val_{fcfg.select_on}"], test=test, n_train=len(ex["train"]["label"]))
    z = np.load(path)
    return {"val": float(z["val"]), "test": z["test"], "n_train": int(z["n_train"])}


def probe_one(cfg: TransferConfig, row: str, arm: str, pt: int) -> dict:
    """Logistic-regression probes of one frozen encoder for every label count and fine-tuning seed (the
    penalty chosen on validation AUPRC); {(n, ft): result like finetune_one's}."""
    torch.set_num_threads(1)
    task = _task(row)
    fcfg = evaluate.FinetuneConfig(task=task)
    d, ex = _examples(cfg, row, fcfg)
    level = evaluate.TASKS[task].level
    enc = encoder(cfg, level, arm.replace("-probe", ""), pt, d)
    x = {s: embed(enc, level, d, e) for s, e in ex.items()}
    out = {}
    for n in cfg.labels:
        for ft in range(cfg.finetune_seeds):
            keep = subset({**ex["train"], "i": np.arange(len(ex["train"]["label"]))}, n, ft)["i"]
            xs, ys = x["train"][keep], ex["train"]["label"][keep]
            fits = {l2: fit_logistic(xs, ys, l2) for l2 in cfg.l2s}
            val = {l2: auprc(ex["val"]["label"], predict_logistic(m, x["val"])) for l2, m in fits.items()}
            best = max(val, key=val.get)
            out[n, ft] = {"val": val[best], "test": predict_logistic(fits[best], x["test"]), "n_train": len(keep),
                          "l2": best}
    return out


def finetune_all(cfg: TransferConfig, pool: ProcessPoolExecutor) -> dict:
    """Every fine-tuning and probe run: {(row, n, arm): {"rows": test probs (R, N), "groups": pt seeds,
    "lr": chosen, "n_train": int}}; the learning rate of each (row, n, arm) is the grid's best on
    validation at pretraining seed 0, fine-tuning seed 0."""
    specs = [(row, n, arm) for row in ROWS for n in cfg.labels for arm in ARMS]
    lrs = lambda row: cfg.lrs[evaluate.TASKS[_task(row)].level]  # noqa: E731
    grid = {(s, lr): pool.submit(finetune_one, cfg, *s, 0, 0, lr) for s in specs for lr in lrs(s[0])}
    chosen = {s: max(lrs(s[0]), key=lambda lr: grid[s, lr].result()["val"]) for s in specs}
    seeds = lambda arm: [(0, ft) for ft in range(cfg.finetune_seeds)] if arm == "scratch" else \
        [(pt, ft) for pt in range(cfg.pretrain_seeds) for ft in range(cfg.finetune_seeds)]  # noqa: E731
    runs = {s: [(pt, pool.submit(finetune_one, cfg, *s, pt, ft, chosen[s])) for pt, ft in seeds(s[2])] for s in specs}
    probes = {(row, arm, pt): pool.submit(probe_one, cfg, row, arm, pt) for row in ROWS for arm in PROBES
              for pt in range(cfg.pretrain_seeds)}
    results = {}
    for s, jobs in runs.items():
        res = [j.result() for _, j in jobs]
        results[s] = {"rows": np.stack([r["test"] for r in res]), "groups": [pt for pt, _ in jobs],
                      "lr": chosen[s], "n_train": res[0]["n_train"]}
    for (row, arm, pt), job in probes.items():
        for (n, ft), r in job.result().items():
            entry = results.setdefault((row, n, arm), {"rows": [], "groups": [], "lr": None, "n_train": r["n_train"]})
            entry["rows"] = [*entry["rows"], r["test"]]
            entry["groups"].append(pt)
    return results


# ---------------------------------------------------------------------------------------------- report
def report_line(cfg: TransferConfig, row: str, n: int, arm: str, r: dict, y: np.ndarray, base: np.ndarray) -> dict:
    """The result line of one (task, labels, arm): its test rows paired against scratch's `base` rows on the
    test labels `y`."""
    rows = np.asarray(r["rows"])
    aucs = [auroc(y, p) for p in rows]
    line = {"kind": "result", "task": row, "labels": n or "all", "n_train": r["n_train"], "arm": arm,
            "auroc": round(float(np.mean(aucs)), 4), "auroc_sd": round(float(np.std(aucs)), 4),
            "auprc": round(float(np.mean([auprc(y, p) for p in rows])), 4), "lr": r["lr"],
            "n_test": len(y), "positives": int(y.sum())}
    for name, metric in (("auroc", auroc), ("auprc", auprc)):
        delta, lo, hi = paired_delta(y, rows, base, metric, cfg.bootstrap, cfg.seed, groups=r["groups"])
        line.update({f"delta_{name}": round(delta, 4), f"delta_{name}_ci": [round(lo, 4), round(hi, 4)]})
    return line


def report(cfg: TransferConfig, results: dict, pool: ProcessPoolExecutor) -> list[dict]:
    """One JSON line per (task, labels, arm), paired against scratch on the same test examples (bootstraps in
    the pool's processes)."""
    ys = {row: evaluate.task_examples(_task(row), _data(cfg, ROWS[row]), evaluate.FinetuneConfig())["test"]["label"]
          for row in ROWS}
    jobs = [pool.submit(report_line, cfg, row, n, arm, r, ys[row], np.asarray(results[row, n, "scratch"]["rows"]))
            for (row, n, arm), r in results.items()]
    return [emit(cfg, **job.result()) for job in jobs]


def verdicts(cfg: TransferConfig, lines: list[dict]) -> None:
    """The pass criteria: with <= 100 labels MedHMP gains >= 0.03 AUROC with its CI above 0 on >= 6 of the
    8 rows; the gain shrinks as labels grow; the shuffled control's CI covers 0."""
    get = {(x["task"], x["labels"], x["arm"]): x for x in lines}
    few = [n for n in cfg.labels if 0 < n <= 100]
    rows_pass = [row for row in ROWS if few and all(get[row, n, "medhmp"]["delta_auroc"] >= 0.03
                                                   and get[row, n, "medhmp"]["delta_auroc_ci"][0] > 0 for n in few)]
    first, last = cfg.labels[0] or "all", cfg.labels[-1] or "all"
    shrink = {row: (get[row, first, "medhmp"]["delta_auroc"], get[row, last, "medhmp"]["delta_auroc"]) for row in ROWS}
    control = [x for x in lines if x["arm"] == "shuffled"]
    covers = sum(x["delta_auroc_ci"][0] <= 0 <= x["delta_auroc_ci"][1] for x in control)
    probe_gain = {row: get[row, first, "medhmp-probe"]["delta_auroc"] for row in ROWS}
    emit(cfg, kind="verdict", rows_passing=rows_pass, n_passing=len(rows_pass), label_counts_checked=few,
         passed=len(rows_pass) >= 6, delta_first_vs_last=shrink,
         gain_shrinks=float(np.mean([a - b for a, b in shrink.values()])) > 0,
         control_ci_covers_zero=f"{covers}/{len(control)}", probe_delta_at_fewest=probe_gain)


def markdown(cfg: TransferConfig, lines: list[dict]) -> None:
    """OUT/transfer.md: scratch's test AUROC, then per arm Δ AUROC against scratch [95% CI], per task and labels."""
    get = {(x["task"], x["labels"], x["arm"]): x for x in lines}
    labels = [n or "all" for n in cfg.labels]

    def table(title: str, arm: str, cell) -> str:
        head = "| task | " + " | ".join(map(str, labels)) + " |\n|---|" + "---|" * len(labels) + "\n"
        return f"{title}\n\n{head}" + "".join(
            f"| {row} | " + " | ".join(cell(get[row, n, arm]) for n in labels) + " |\n" for row in ROWS)

    def delta(x: dict) -> str:
        return f"{x['delta_auroc']:+.3f} [{x['delta_auroc_ci'][0]:+.2f}, {x['delta_auroc_ci'][1]:+.2f}]"
    out = [table("AUROC from scratch (mean over fine-tuning seeds)", "scratch", lambda x: f"{x['auroc']:.3f}")]
    out += [table(f"Δ AUROC {arm} − scratch [95% CI]", arm, delta) for arm in ("medhmp", "shuffled", *PROBES)]
    (cfg.out / "transfer.md").write_text("\n".join(out))


def plot(cfg: TransferConfig, lines: list[dict]) -> None:
    """Label-efficiency curves (the paper's Fig. 5), one panel per task row, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), squeeze=False)
    for ax, row in zip(axes.ravel(), ROWS):
        for arm in (*ARMS, *PROBES):
            pts = sorted((x["n_train"], x["auroc"]) for x in lines if x["task"] == row and x["arm"] == arm)
            ax.plot(*zip(*pts), "o-" if arm in ARMS else "s--", label=arm, alpha=0.8)
        ticks = sorted({x["n_train"] for x in lines if x["task"] == row})
        ax.set(xscale="log", title=row, xlabel="labelled training examples", ylabel="test AUROC")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(cfg.out / "transfer.png", dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
STEPS = ("data", "pretrain", "latents", "finetune", "report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=TransferConfig.out)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite (minutes)")
    parser.add_argument("--jobs", type=int, default=TransferConfig.jobs)
    parser.add_argument("--only", default=",".join(STEPS), help="comma-separated steps: " + ", ".join(STEPS))
    args = parser.parse_args()
    cfg = TransferConfig(out=args.out, jobs=args.jobs, **(QUICK if args.quick else {}))
    steps = args.only.split(",")
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    emit(cfg, kind="config", **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()})
    if "data" in steps:
        prepare_data(cfg)
    with ProcessPoolExecutor(cfg.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        if "pretrain" in steps:
            pretrain_all(cfg, pool)
        if "latents" in steps:
            latent_probes(cfg)
        if "finetune" in steps or "report" in steps:
            lines = report(cfg, finetune_all(cfg, pool), pool)
            verdicts(cfg, lines)
            markdown(cfg, lines)
            plot(cfg, lines)
    emit(cfg, kind="time", seconds=round(time.perf_counter() - start), jobs=cfg.jobs, steps=steps)


if __name__ == "__main__":
    main()
