"""Evaluate: fine-tune the pretrained encoders on the downstream tasks and score them with CIs.

Usage:
    python medhmp.py evaluate --task mortality --data data/processed --run runs/default [--init admission]
    python medhmp.py evaluate --task all --seeds 5 --model retain
Reads DATA/ (labels, splits, tensors) and RUN/admission.pt or RUN/stay.pt (never writes them). Writes
RUN/eval/<task>.json (config, n and prevalence per split, per-seed metrics, mean ± sd, bootstrap CIs),
RUN/eval/<task>_predictions.csv (test probabilities per seed) and one row per (task, init, model) in
RUN/results.csv; rows and entries of an earlier run with the same key are replaced.

Protocol (paper App. B, spec §6.1): per seed, fine-tune every weight with SGD (weight decay 1e-2) on
binary cross-entropy for up to `epochs`, stop after `patience` epochs without a better validation
`select_on`, reload the best weights and score the test split once; report mean ± sd over seeds. Every
task also runs from scratch (init=none, same architecture), so the value of pretraining is always visible.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from data import (AdmissionDataset, InputError, PatientDataset, Processed, Reporter, StayDataset, load_processed,
                  make_loader)
from models import (SEQUENCE_MODELS, AdmissionEncoder, Classifier, CodeEncoder, ModelConfig, SequenceClassifier,
                    StayEncoder, load_encoder)
from train import NonFiniteLoss, load_checkpoint, resolve_device, resolve_dtype, to_device


@dataclass(frozen=True)
class Task:
    level: str          # stay | admission | patient: which encoder and dataset the task uses
    description: str


# the only list of task names (DESIGN §6); labels and cohorts come from preprocessing (labels.csv)
TASKS = {
    "arf": Task("stay", "acute respiratory failure onset after hour 48"),
    "shock": Task("stay", "shock (vasopressor) onset after hour 48"),
    "mortality": Task("stay", "in-hospital death, from the first 48 h"),
    "readmission": Task("admission", "next admission within 30 days of discharge"),
    "hf": Task("patient", "heart failure diagnosed >= 180 days after the history"),
    "copd": Task("patient", "COPD diagnosed >= 180 days after the history"),
    "amnesia": Task("patient", "amnesia diagnosed >= 180 days after the history"),
}
INITS = ("admission", "stay", "none")    # MedHMP a+s, MedHMP s, random weights
PATIENT_MODELS = tuple(SEQUENCE_MODELS)
METRICS = ("auroc", "auprc", "auprc_trapezoid", "f1", "kappa")
SPLITS = ("train", "val", "test")
STAY_SIZES = ("seq_len", "n_features", "n_static")
# (level, init) -> (checkpoint, key prefix in it, submodule of the fine-tuned model, sizes that must match)
TRANSFERS = {
    ("stay", "admission"): ("admission", "encoder.stay_encoder.", "encoder", STAY_SIZES),
    ("stay", "stay"): ("stay", "encoder.", "encoder", STAY_SIZES),
    ("admission", "admission"): ("admission", "encoder.", "encoder", ModelConfig.SIZES),
    ("admission", "stay"): ("stay", "encoder.", "encoder.stay_encoder", STAY_SIZES),
    ("patient", "admission"): ("admission", "encoder.icd_encoder.", "code_encoder", ("n_icd",)),
}


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "all"                 # a TASKS name, or "all"
    data: Path = Path("data/processed")
    run: Path = Path("runs/default")  # reads the checkpoints here, writes eval/ and results.csv here
    init: str = "admission"           # admission (MedHMP a+s) | stay (MedHMP s) | none (random weights)
    compare_none: bool = True         # also run init=none (same architecture) beside a pretrained init
    model: str = "lstm"               # patient-level sequence model (models.SEQUENCE_MODELS)
    seeds: int = 5                    # paper App. B: mean of 5 runs
    seed: int = 0                     # run i uses seed + i (weights, dropout, batch order)
    epochs: int = 30                  # paper App. B: at most 30 epochs
    patience: int = 5                 # paper App. B: early-stopping patience 5
    label_fraction: float = 1.0       # share of the training examples fine-tuned on (paper Fig. 5: 1% to 100%)
    # learning rate: `lr` applies to every level when given, else the level's own. Paper App. B grid: batch
    # {16, 32, 64} x lr [2e-5, 5e-3]. Stay/admission: the grid's top, 5e-3 with batch 16, was the best of
    # {5e-3, 2e-2, 5e-2} on the 400-patient synthetic cohort. Patient: 5e-2, beyond the grid: ~100 training
    # patients give SGD ~200 steps in 30 epochs, and 5e-3 left hf/copd/amnesia near chance (AUROC 0.52-0.72)
    # where 5e-2 reached 0.77-0.94 (the paper's cohorts are 10-100x larger; the official patient code uses Adam).
    lr: float | None = None
    lr_stay: float = 5e-3
    lr_admission: float = 5e-3
    lr_patient: float = 5e-2
    batch_size: int = 16
    weight_decay: float = 1e-2        # paper App. B
    momentum: float = 0.9             # fidelity: the paper says plain SGD; official train.py uses momentum 0.9
    grad_clip: float = 1.0            # official health_risk_prediction.py clips at 1.0; harmless elsewhere
    # fidelity: the official code early-stops on a swapped-argument BCE (= 100·MAE), and on dev F1 at patient level
    select_on: str = "auprc"          # validation metric for early stopping and best-epoch selection
    # dropout before the output layer. fidelity: official HMP uses 0.2 (stay), HADM_CLS and the patient models
    # 0.8. On the synthetic demo cohort (3 seeds, from scratch) 0.8 cut readmission AUROC from 0.66 to 0.57 and
    # matched 0.2 on hf/copd/amnesia (0.94/0.80/0.85 vs 0.94/0.79/0.82), so 0.2 everywhere.
    dropout: float = 0.2
    max_stays: int = 3                # paper: at most M = 3 stays per admission
    max_visits: int = 50              # paper App. A: the last 50 visits
    bootstrap: int = 1000             # DESIGN §6: 1000-resample percentile CIs
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto | fp32 | bf16 | fp16 (fp32 on the CPU unless asked)
    table: bool = True                # print the results table at the end
    quiet: bool = False


# ------------------------------------------------------------------------------------------- metrics
def _both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve = Mann-Whitney U / (P·N) with average ranks for tied scores; nan if one class."""
    y = np.asarray(y, dtype=bool)
    if not _both_classes(y):
        return math.nan
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0           # 1-based mean rank of each distinct score
    n_pos = int(y.sum())
    u = avg_rank[inverse][y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * (len(y) - n_pos)))


def _pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct score taken as threshold, highest score first."""
    order = np.argsort(-np.asarray(p), kind="stable")
    y, p = np.asarray(y, dtype=float)[order], np.asarray(p)[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]         # last example of each distinct score
    tp = np.cumsum(y)[last]
    return tp / tp[-1], tp / (last + 1)


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision, step-wise: Σ_k (R_k − R_{k−1}) P_k over distinct thresholds (sklearn's AP)."""
    if not _both_classes(np.asarray(y)):
        return math.nan
    recall, precision = _pr_points(y, p)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def auprc_trapezoid(y: np.ndarray, p: np.ndarray) -> float:
    """Trapezoidal area under the PR curve from (0, 1): the paper's `auc(recall, precision)` (official code)."""
    if not _both_classes(np.asarray(y)):
        return math.nan
    recall, precision = _pr_points(y, p)
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
        if _both_classes(y[idx]):
            values.append(np.mean([metric(y[idx], row[idx]) for row in p]))
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------- datasets
def task_datasets(task: str, data: Processed, cfg: FinetuneConfig) -> tuple[dict, dict]:
    """Labelled dataset per split and the raw examples per split (rows, subjects, labels, cutoffs)."""
    level = TASKS[task].level
    examples = {s: data.examples(task, s) for s in SPLITS}
    if level != "patient":  # a labelled stay or admission missing from the tensors cannot be scored
        examples = {s: {k: (v[e["row"] >= 0] if isinstance(v, np.ndarray) else v) for k, v in e.items()}
                    for s, e in examples.items()}
    if cfg.label_fraction < 1.0:  # low-resource setting (paper Fig. 5): a fixed share of the training labels
        train = examples["train"]
        keep = np.random.default_rng(cfg.seed).random(len(train["label"])) < cfg.label_fraction
        examples["train"] = {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in train.items()}
    sets = {}
    for s, e in examples.items():
        if level == "stay":
            sets[s] = StayDataset(data, e["row"], e["label"])
        elif level == "admission":
            sets[s] = AdmissionDataset(data, e["row"], e["label"], max_stays=cfg.max_stays)
        else:
            sets[s] = PatientDataset(data, e["subject_id"], e["cutoff"], e["label"], max_visits=cfg.max_visits)
    return sets, examples


def _split_stats(examples: dict) -> dict:
    return {s: {"n": len(e["label"]), "positives": int(e["label"].sum()),
                "prevalence": float(e["label"].mean()) if len(e["label"]) else math.nan}
            for s, e in examples.items()}


def _skip_reason(stats: dict) -> str | None:
    """Why a cohort cannot be evaluated (no examples, or a split without both classes), or None."""
    if all(v["n"] == 0 for v in stats.values()):
        return "no examples in this data"
    bad = [f"{s} {v['n']} examples, {v['positives']} positive" for s, v in stats.items()
           if v["positives"] in (0, v["n"])]
    return "single-class split: " + "; ".join(bad) if bad else None


# ------------------------------------------------------------------------------------------ models
class Checkpoints:
    """RUN/stay.pt and RUN/admission.pt, loaded once on first use and checked against the data."""

    def __init__(self, run: Path, meta: dict):
        self.run, self.meta, self.cache = Path(run), meta, {}

    def get(self, name: str) -> dict:
        if name not in self.cache:
            self.cache[name] = load_checkpoint(self.run / f"{name}.pt")
        return self.cache[name]

    def check(self, name: str, sizes: tuple) -> dict:
        """The checkpoint, after checking that the `sizes` it was trained with (and, for codes, its ICD
        vocabulary) match the data; a mismatch is an InputError saying what to do."""
        ckpt, path, meta = self.get(name), self.run / f"{name}.pt", self.meta
        bad = [f"{k} {ckpt['sizes'].get(k)} vs {meta[k]}" for k in sizes if ckpt["sizes"].get(k) != meta[k]]
        codes = "n_icd" in sizes
        if codes and not bad and ckpt.get("icd_vocab") != meta["icd_vocab"]:
            bad = ["ICD vocabulary (same size, other codes)"]
        if bad:
            hint = ("preprocess this extract with `--vocab-from <the processed folder it was pretrained on>`"
                    if codes else "evaluate on the processed folder it was pretrained on")
            raise InputError(f"{path} was pretrained on other data ({', '.join(bad)}); {hint}")
        return ckpt

    def model_config(self, init: str) -> ModelConfig:
        """Sizes from the data; architecture (d_model, heads, dropout) from the checkpoint that `init` uses,
        else from any checkpoint in RUN (so init=none is like-for-like), else ModelConfig defaults."""
        names = [init] if init != "none" else [n for n in ("admission", "stay")
                                                if (self.run / f"{n}.pt").is_file()]
        arch = self.get(names[0])["model_config"] if names else {}
        return ModelConfig.from_meta(self.meta, **{k: v for k, v in arch.items() if k not in ModelConfig.SIZES})


def build_model(task: str, init: str, cfg: FinetuneConfig, ckpts: Checkpoints,
                mcfg: ModelConfig | None = None) -> tuple[nn.Module, int]:
    """The fine-tuning model of `task` and the number of pretrained tensors loaded into it (0 for none);
    `mcfg` overrides the architecture that `ckpts` would give (benchmarks)."""
    level, mcfg = TASKS[task].level, mcfg or ckpts.model_config(init)
    if level == "stay":
        model = Classifier(StayEncoder(mcfg), dropout=cfg.dropout)
    elif level == "admission":
        model = Classifier(AdmissionEncoder(mcfg), dropout=cfg.dropout)
    else:
        model = SequenceClassifier(CodeEncoder(mcfg.n_icd, mcfg.d_model), cfg.model, mcfg, dropout=cfg.dropout)
    if init == "none":
        return model, 0
    name, prefix, target, sizes = TRANSFERS[level, init]
    return model, load_encoder(model.get_submodule(target), ckpts.check(name, sizes)["model"], prefix)


# ---------------------------------------------------------------------------------------- training
@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device, amp: torch.dtype) -> np.ndarray:
    """Probabilities (n,) in dataset order (eval mode, no shuffling)."""
    model.eval()
    out = []
    for batch in make_loader(dataset, batch_size, pin_memory=device.type == "cuda"):
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            out.append(torch.sigmoid(model(to_device(batch, device)).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def level_lr(cfg: FinetuneConfig, level: str) -> float:
    """The fine-tuning learning rate of a level: `cfg.lr` when given, else `cfg.lr_<level>`."""
    return cfg.lr if cfg.lr is not None else getattr(cfg, f"lr_{level}")


def finetune(model: nn.Module, sets: dict, cfg: FinetuneConfig, seed: int, device, amp, advance,
             lr: float) -> dict:
    """Train on sets["train"] at `lr`, early-stop on validation `select_on`, reload the best weights (in place)."""
    # fidelity: no learning-rate schedule (official train.py adds StepLR(5, 0.1), the paper none); the official
    # patient-level code trains with Adam and a 2-way softmax, here every level shares SGD and BCE (paper App. B)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    y_val, select = sets["val"].labels.numpy(), METRIC_FUNCTIONS[cfg.select_on]
    best, best_epoch, best_state, epoch = -math.inf, 0, None, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for batch in make_loader(sets["train"], cfg.batch_size, shuffle=True, seed=seed * 1000 + epoch,
                                 pin_memory=device.type == "cuda"):
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                logits = model(batch)  # (B,)
            # BCE on logits = the official BCELoss(sigmoid(·)), without its log clamp at −100
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"])
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"fine-tuning loss became {float(loss)} in epoch {epoch} (seed {seed}); "
                                    "lower --lr")
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        score = select(y_val, predict(model, sets["val"], 4 * cfg.batch_size, device, amp))
        if best_state is None or score > best:  # ties keep the earlier epoch
            best, best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        advance(1, status=f"val {cfg.select_on} {score:.3f} best {best:.3f} (epoch {best_epoch})")
        if epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return {"epochs": epoch, "best_epoch": best_epoch, f"val_{cfg.select_on}": best}


def run_init(task: str, init: str, sets: dict, cfg: FinetuneConfig, ckpts: Checkpoints, device, amp,
             rep: Reporter) -> tuple[dict, np.ndarray]:
    """Every seed of one (task, init): per-seed records, mean ± sd, pooled bootstrap CIs; test probs (seeds, n)."""
    y_test, records, probs = sets["test"].labels.numpy(), [], []
    for i in range(cfg.seeds):
        seed, start = cfg.seed + i, time.perf_counter()
        torch.manual_seed(seed)
        model, loaded = build_model(task, init, cfg, ckpts)
        model.to(device)
        with rep.task(f"{task} init={init} seed {seed}", cfg.epochs, "epochs") as advance:
            record = finetune(model, sets, cfg, seed, device, amp, advance, level_lr(cfg, TASKS[task].level))
        probs.append(predict(model, sets["test"], 4 * cfg.batch_size, device, amp))
        records.append({"seed": seed, "loaded_tensors": loaded, **record, "test": binary_metrics(y_test, probs[-1]),
                        "seconds": round(time.perf_counter() - start, 2)})
    probs = np.stack(probs)  # (seeds, n_test)
    table = np.array([[r["test"][m] for m in METRICS] for r in records])  # (seeds, metrics)
    result = {"init": init, "seeds": records,
              "mean": dict(zip(METRICS, table.mean(0).tolist())),
              "sd": dict(zip(METRICS, (table.std(0, ddof=1) if len(table) > 1 else 0 * table[0]).tolist())),
              # pooled: the test examples are resampled and every seed's predictions scored on each resample
              "ci": {m: bootstrap_ci(y_test, probs, METRIC_FUNCTIONS[m], cfg.bootstrap, cfg.seed) for m in METRICS},
              "ci_method": f"percentile bootstrap, {cfg.bootstrap} resamples of the test split, "
                           "mean over seeds per resample"}
    return result, probs


# ----------------------------------------------------------------------------------------- outputs
def _replace_rows(path: Path, columns: list, rows: list[dict], key: tuple) -> None:
    """Rewrite the CSV at `path` with `rows`, dropping earlier rows with the same `key` values; atomic."""
    old = []
    if path.is_file():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    new_keys = {tuple(str(r[k]) for k in key) for r in rows}
    kept = [r for r in old if tuple(r.get(k, "") for k in key) not in new_keys]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(kept + rows)
    os.replace(tmp, path)


RESULT_COLUMNS = ["task", "level", "init", "model", "seeds", "n_train", "n_val", "n_test", "prevalence",
                  *[f"{m}{s}" for m in METRICS for s in ("", "_sd", "_lo", "_hi")], "skipped", "data", "updated"]
PREDICTION_COLUMNS = ["subject_id", "hadm_id", "stay_id", "split", "seed", "init", "model", "label", "probability"]


def _ids(task: str, data: Processed, examples: dict) -> dict:
    """subject/hadm/stay id columns of the test examples ('' where the level has none)."""
    level, rows, n = TASKS[task].level, examples["row"], len(examples["label"])
    ids = {"subject_id": examples["subject_id"], "hadm_id": [""] * n, "stay_id": [""] * n}
    if level == "stay":
        ids.update(hadm_id=data.stays["hadm_id"].numpy()[rows], stay_id=data.stays["stay_id"].numpy()[rows])
    elif level == "admission":
        ids["hadm_id"] = data.admissions["hadm_id"].numpy()[rows]
    return ids


def write_task(task: str, report: dict, probs: dict, examples: dict, data: Processed, cfg: FinetuneConfig) -> None:
    """RUN/eval/<task>.json (merged by init/model), <task>_predictions.csv and the task's results.csv rows."""
    out = Path(cfg.run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    _replace_rows(Path(cfg.run) / "results.csv", RESULT_COLUMNS, _result_rows(task, report, cfg),
                  ("task", "init", "model"))
    path = out / f"{task}.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    report = {**report, "results": {**merged.get("results", {}), **report["results"]}}
    path.with_name(path.name + ".tmp").write_text(json.dumps(report, indent=1))
    os.replace(path.with_name(path.name + ".tmp"), path)
    ids, y, model = _ids(task, data, examples["test"]), examples["test"]["label"], report["model"]
    rows = [{"subject_id": int(ids["subject_id"][j]), "hadm_id": ids["hadm_id"][j], "stay_id": ids["stay_id"][j],
             "split": "test", "seed": cfg.seed + i, "init": init, "model": model, "label": int(y[j]),
             "probability": f"{p[i, j]:.6g}"}
            for init, p in probs.items() for i in range(len(p)) for j in range(len(y))]
    _replace_rows(out / f"{task}_predictions.csv", PREDICTION_COLUMNS, rows, ("init", "model"))
    plot_curves(task, probs, np.asarray(y), out / f"{task}_curves.png")


def plot_curves(task: str, probs: dict, y: np.ndarray, path: Path) -> bool:
    """ROC and PR curves of the test split, one line per init (probabilities averaged over seeds), as a PNG;
    only when matplotlib is installed (it is optional, never required). Returns whether a file was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not probs or not _both_classes(np.asarray(y)):
        return False
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4))
    for init, p in probs.items():
        p = np.asarray(p).mean(axis=0)                                     # (n,) mean over seeds
        order = np.argsort(-p, kind="stable")
        last = np.r_[np.flatnonzero(np.diff(p[order])), len(p) - 1]      # one point per distinct score
        tp, fp = np.cumsum(y[order])[last], np.cumsum(1 - y[order])[last]
        roc.plot(np.r_[0, fp / fp[-1]], np.r_[0, tp / tp[-1]], label=f"{init} (AUROC {auroc(y, p):.3f})")
        recall, precision = _pr_points(y, p)
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


def _result_rows(task: str, report: dict, cfg: FinetuneConfig) -> list[dict]:
    """results.csv rows of this run's inits: means, sds and CI bounds, or the reason a run was skipped."""
    stats, rows = report["splits"], []
    for res in report["results"].values():
        row = {"task": task, "level": report["level"], "init": res["init"], "model": report["model"],
               "seeds": cfg.seeds, **{f"n_{s}": stats[s]["n"] for s in SPLITS},
               "prevalence": round(stats["test"]["prevalence"], 4), "skipped": res.get("skipped", ""),
               "data": str(cfg.data), "updated": time.strftime("%Y-%m-%d %H:%M")}
        for m in METRICS if "mean" in res else ():
            lo, hi = res["ci"][m]
            row.update({m: f"{res['mean'][m]:.4f}", f"{m}_sd": f"{res['sd'][m]:.4f}",
                        f"{m}_lo": f"{lo:.4f}", f"{m}_hi": f"{hi:.4f}"})
        rows.append(row)
    return rows


def results_table(reports: dict) -> tuple[list, list[list[str]]]:
    """Header and rows (strings): task, level, n test (prevalence), then AUROC and AUPRC per init as
    'mean ±sd [lo, hi]', and Δ AUROC = pretrained − none where both ran."""
    inits = list(dict.fromkeys(i for r in reports.values() for i in (v["init"] for v in r["results"].values())))
    header = ["task", "level", "n test (prev)"] + [f"{m} {i}" for i in inits for m in ("AUROC", "AUPRC")]
    header += ["Δ AUROC"] if "none" in inits and len(inits) > 1 else []
    rows = []
    for name, r in reports.items():
        t = r["splits"]["test"]
        row = [name, r["level"], f"{t['n']} ({t['prevalence']:.2f})"]
        by_init = {v["init"]: v for v in r["results"].values()}
        for i in inits:
            v = by_init.get(i, {"skipped": "not run"})
            row += ([f"{v['mean'][m]:.3f} ±{v['sd'][m]:.3f} [{v['ci'][m][0]:.2f}, {v['ci'][m][1]:.2f}]"
                     for m in ("auroc", "auprc")] if "mean" in v else ["skipped", ""])
        if len(header) > len(row):
            pre, none = by_init.get(inits[0], {}), by_init.get("none", {})
            row.append(f"{pre['mean']['auroc'] - none['mean']['auroc']:+.3f}" if "mean" in pre and "mean" in none
                       else "")
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
    reasons = dict.fromkeys((t, v["skipped"]) for t, r in reports.items() for v in r["results"].values()
                            if "skipped" in v)
    return [f"{t}: skipped, {why}" for t, why in reasons]


# ------------------------------------------------------------------------------------------- entry
def evaluate_task(task: str, cfg: FinetuneConfig, data: Processed, ckpts: Checkpoints, device, amp,
                  rep: Reporter) -> dict:
    """Fine-tune and score one task for each init; writes its files and returns its report."""
    level = TASKS[task].level
    sets, examples = task_datasets(task, data, cfg)
    stats = _split_stats(examples)
    inits = [cfg.init] + (["none"] if cfg.compare_none and cfg.init != "none" else [])
    model = cfg.model if level == "patient" else "medhmp"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    report = {"task": task, "level": level, "model": model, "config": config, "splits": stats, "results": {}}
    probs = {}
    for init in inits:
        reason = _skip_reason(stats)
        if reason is None and init != "none" and (level, init) not in TRANSFERS:
            reason = f"RUN/{init}.pt has no encoder for {level}-level tasks; use --init admission or none"
        if reason is not None:
            report["results"][f"{init}/{model}"] = {"init": init, "skipped": reason}
            rep.log(f"{task} init={init}: skipped ({reason})")
            continue
        report["results"][f"{init}/{model}"], probs[init] = run_init(task, init, sets, cfg, ckpts, device, amp, rep)
    write_task(task, report, probs, examples, data, cfg)
    return report


def evaluate(cfg: FinetuneConfig) -> dict:
    """Evaluate `cfg.task` (or every task); returns {task: report} and prints the results table."""
    tasks = list(TASKS) if cfg.task == "all" else [cfg.task]
    for name, value, allowed in (("task", cfg.task, [*TASKS, "all"]), ("init", cfg.init, INITS),
                                 ("model", cfg.model, PATIENT_MODELS), ("select_on", cfg.select_on, METRICS)):
        if value not in allowed:
            raise InputError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(allowed)}")
    rep = Reporter(cfg.quiet)
    device = resolve_device(cfg.device)
    amp = resolve_dtype(cfg.precision, device)
    data = load_processed(cfg.data)
    ckpts = Checkpoints(cfg.run, data.meta)
    rep.log(f"evaluating {', '.join(tasks)} on {cfg.data} (init={cfg.init}, seeds={cfg.seeds}, device {device}, "
            f"{str(amp).replace('torch.', '')})")
    reports = {t: evaluate_task(t, cfg, data, ckpts, device, amp, rep) for t in tasks}
    if cfg.table:
        print_table(*results_table(reports), rep, f"MedHMP downstream results ({cfg.data})")
        for line in skipped_lines(reports):
            rep.log(line)
    rep.log(f"wrote {Path(cfg.run) / 'eval'} and {Path(cfg.run) / 'results.csv'}")
    return reports
