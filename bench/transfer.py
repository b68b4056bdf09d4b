"""Does MedHMP pretraining transfer? A replicate design with a positive control, two negative
controls, an A/A arm and a linear model on the raw inputs, on a data world nobody tuned on.

Usage: python bench/transfer.py [--out runs/transfer] [--seed 1] [--quick] [--jobs 2]
    [--only STEP,...]
Steps (each reuses what an earlier run finished, so a stopped run continues where it stopped):
  data      a synthetic MIMIC-III extract (data seed --seed; the realism dial: --strength,
            --label-noise) split into an unlabelled pretraining pool (>= pool_ratio x the labelled
            cohort), a labelled cohort, a validation set for pretraining, one for fine-tuning, and a
            test set; a TriNetX-style diagnosis extract from its own seed (seed + 10,000) over the
            MIMIC vocabulary; and an unrelated world: a pool of the same size from the same
            generator with every latent-to-item loading and hourly weight re-drawn (synthetic.World,
            loadings_seed), read with the MIMIC extract's vocabularies and features.
  pretrain  both stages for `pretrain_seeds` seeds on three pools: medhmp (the pool), shuffled
            (every column permuted across the pool on its own: frequencies kept, co-occurrence
            destroyed) and unrelated.
  finetune  every (task row, label count, arm, replicate). Replicate r of a cell draws its label
            subset (seed r), its initialisation and batch order (seed r; the A/A arm seed
            r + 10,000) and its pretraining seed (r mod pretrain_seeds) independently of the other
            replicates; every arm of replicate r shares its label subset (paired). Arms: scratch, aa
            (scratch again, other seeds: the A/A comparison), medhmp, shuffled, unrelated
            (fine-tuned at a learning rate fixed in advance per level: evaluate's defaults),
            raw-linear (L2 logistic regression on the raw inputs, penalty chosen on the replicate's
            validation split) and medhmp-probe (the same on the frozen MedHMP encoder's vectors).
  report    per (row, labels, arm): mean AUROC/AUPRC with intervals, and Δ against scratch paired by
            replicate with metrics.replicate_interval (the replicates' spread, clustered by
            pretraining seed, plus the test set's), a p-value, Holm's correction over the cells
            with <= 100 labels; the verdict; OUT/results.jsonl, OUT/transfer.md.
  latents   5-fold ridge R² of the true latents from frozen representations (pretraining seed 0).
  dial      the same design, smaller, on worlds drawn with weaker latents or noisier labels
            (`dial`): Δ of medhmp against scratch at 25 and 100 labels against the dial.
Cache keys hold a digest of the settings that shape each result and of the code (every root module
and the preprocessing package), so a rerun after a change recomputes what the change touches.
Progress and times go to stdout and OUT/log.jsonl. One torch thread per process; `--jobs` processes.
Times and results: docs/results.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
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
from folders import sigterm_as_interrupt  # noqa: E402
from metrics import (auprc, auroc, combine_replicates, replicate_scores,  # noqa: E402
                     resample_weights, t_cdf, t_quantile)
from models import ModelConfig, densify  # noqa: E402
from preprocessing.pipeline import PreprocessConfig, preprocess  # noqa: E402
from progress import Reporter  # noqa: E402

ROWS = {"arf": "mimic", "shock": "mimic", "mortality": "mimic", "readmission": "mimic",
        "hf": "mimic", "hf (trinetx)": "trinetx", "copd (trinetx)": "trinetx",
        "amnesia (trinetx)": "trinetx"}
POOLS = ("medhmp", "shuffled", "unrelated")               # pretrained arms, each on its own pool
FINETUNED = ("scratch", "aa", *POOLS)
LINEAR = ("raw-linear", "medhmp-probe")
ARMS = (*FINETUNED, *LINEAR)
CONTROLS = ("shuffled", "unrelated")
METRICS = {"auroc": auroc, "auprc": auprc}


@dataclass(frozen=True)
class TransferConfig:
    out: Path = Path("runs/transfer")
    seed: int = 1                         # the data world; 0: the development one (results.md)
    # synthetic.SynthConfig: how strongly the latents drive the data
    strength: float = 1.0
    label_noise: float = 0.0
    patients: int = 10000                 # MIMIC-style extract; ~72% of its patients form the pool
    trinetx_patients: int = 3000
    # the pool has >= this many patients per labelled-cohort patient
    pool_ratio: int = 20
    arms: tuple = ARMS
    # replicates that share a pretrained model are one cluster of the interval
    # (metrics.combine_replicates): with 5 seeds its replicate part has 4 degrees of freedom and
    # Holm's correction over 16 cells needs t(0.998, 4) ~ 7; 10 seeds of 2 replicates each give 9
    # (t ~ 4), which the shorter pretraining below pays for
    pretrain_seeds: int = 10
    replicates: int = 20
    # training examples per task (0: the whole labelled cohort)
    labels: tuple = (25, 100)
    d_model: int = 64
    stay_epochs: int = 4
    stay_batch_size: int = 64
    stay_lr: float = 1e-3
    admission_epochs: int = 4
    admission_batch_size: int = 256
    admission_lr: float = 1e-3
    pretrain_patience: int = 3
    epochs: int = 15                      # fine-tuning
    patience: int = 4
    batch_size: int = 16
    # fixed in advance for every arm (no choice on this world): evaluate.FinetuneConfig's defaults
    lrs: dict = field(default_factory=lambda: {"stay": 5e-3, "admission": 5e-3, "patient": 5e-2})
    # linear models' penalties, chosen on each replicate's validation split
    l2s: tuple = (1e-3, 1e-2, 1e-1, 1.0)
    bootstrap: int = 500                  # test-set resamples of each interval
    # Holm's correction over the cells with at most this many labels
    holm_max_labels: int = 100
    # (strength, label_noise) worlds of the dial step
    dial: tuple = ((0.5, 0.0), (0.25, 0.0), (1.0, 0.3))
    dial_patients: int = 6000
    dial_pretrain_seeds: int = 3
    dial_replicates: int = 6
    dial_labels: tuple = (25, 100)
    jobs: int = 2


QUICK = dict(patients=700, trinetx_patients=500, pretrain_seeds=2, replicates=3, labels=(25, 0),
             stay_epochs=2, admission_epochs=2, epochs=3, patience=2, bootstrap=50,
             l2s=(1e-2, 1.0), dial=((0.5, 0.0),), dial_patients=600, dial_pretrain_seeds=2,
             dial_replicates=2, dial_labels=(25,))


# ------------------------------------------------------------------------------------------ records
def emit(cfg: TransferConfig, **record) -> dict:
    """A JSON line on stdout and in OUT/log.jsonl."""
    print(json.dumps(record), flush=True)
    with open(cfg.out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_digest() -> str:
    """The code version in every cache key: the root modules and the preprocessing package, by
    content."""
    files = sorted([*ROOT.glob("*.py"), *(ROOT / "preprocessing").glob("*.py")])
    return digest(*[hashlib.sha1(f.read_bytes()).hexdigest() for f in files])


def stamps(cfg: TransferConfig) -> dict:
    """The digests that key each step's outputs: data (world and split), pretraining (plus its
    settings) and fine-tuning (plus its settings); each holds the code version."""
    code = code_digest()
    world = digest(code, cfg.seed, cfg.strength, cfg.label_noise, cfg.patients,
                   cfg.trinetx_patients, cfg.pool_ratio)
    pre = digest(world, cfg.d_model, cfg.stay_epochs, cfg.stay_batch_size, cfg.stay_lr,
                 cfg.admission_epochs, cfg.admission_batch_size, cfg.admission_lr,
                 cfg.pretrain_patience)
    tune = digest(pre, cfg.epochs, cfg.patience, cfg.batch_size, cfg.lrs, cfg.l2s)
    return {"data": world, "pretrain": pre, "finetune": tune}


def save_npz(path: Path, **arrays) -> None:
    """np.savez through a temporary name, so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class Clock:
    """Wall and CPU time of one step: the main process's plus what its jobs report."""

    def __init__(self):
        self.wall, self.cpu, self.job_cpu = time.perf_counter(), time.process_time(), 0.0

    def seconds(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall),
                "cpu_s": round(time.process_time() - self.cpu + self.job_cpu)}


# --------------------------------------------------------------------------------------------- data
def _split_ids(ids: np.ndarray, seed: int, *fractions) -> list[np.ndarray]:
    """Consecutive parts of a seeded permutation of `ids`, sized by `fractions` (the last takes the
    rest)."""
    ids = np.random.default_rng(seed).permutation(np.sort(ids))
    cuts = np.cumsum([int(round(f * len(ids))) for f in fractions[:-1]])
    return [np.sort(part) for part in np.split(ids, cuts)]


def _fresh(folder: Path, stamp: str) -> bool:
    """Whether `folder` was finished under `stamp`; a folder from other settings or code is
    removed."""
    mark = folder / ".stamp"
    if mark.is_file() and mark.read_text() == stamp:
        return True
    shutil.rmtree(folder, ignore_errors=True)
    return False


def _finish(folder: Path, stamp: str) -> None:
    (folder / ".stamp").write_text(stamp)


def _synth(folder: Path, stamp: str, **settings) -> None:
    if not _fresh(folder, stamp):
        synthetic.synthesize(synthetic.SynthConfig(out=folder / "raw", quiet=True, **settings))
        _finish(folder, stamp)


def _preprocess(folder: Path, stamp: str, raw: Path, **settings) -> Path:
    if not _fresh(folder, stamp):
        preprocess(PreprocessConfig(raw=raw, out=folder / "processed", quiet=True, **settings))
        _finish(folder, stamp)
    return folder / "processed"


def prepare_data(cfg: TransferConfig, arms: tuple) -> dict:
    clock, stamp = Clock(), stamps(cfg)["data"]
    dial = dict(strength=cfg.strength, label_noise=cfg.label_noise)
    _synth(cfg.out / "raw" / "mimic3", stamp, patients=cfg.patients, seed=cfg.seed, **dial)
    mimic = _preprocess(cfg.out / "data" / "mimic3", stamp, cfg.out / "raw" / "mimic3" / "raw",
                        seed=cfg.seed, split=(0.755, 0.045, 0.2))
    d = data.load_processed(mimic)
    n_label = len(d.splits["train"]) // (cfg.pool_ratio + 1)
    labelled, pool = _split_ids(d.splits["train"], cfg.seed, n_label / len(d.splits["train"]), 1.0)
    preval, ftval = _split_ids(d.splits["val"], cfg.seed, 0.5, 0.5)
    views, record = (cfg.out / "views",
                     {"pool_patients": len(pool), "labelled_patients": len(labelled)})
    if not _fresh(views, stamp):
        pretrain_splits = {"train": pool, "val": preval, "test": np.zeros(0, int)}
        data.write_view(mimic, views / "pretrain-medhmp", pretrain_splits)
        data.write_view(mimic, views / "pretrain-shuffled", pretrain_splits,
                        data.shuffle_columns(d, np.concatenate([pool, preval]), cfg.seed))
        data.write_view(mimic, views / "finetune",
                        {"train": labelled, "val": ftval, "test": d.splits["test"]})
        _finish(views, stamp)
    if "trinetx" in ROWS.values():
        _synth(cfg.out / "raw" / "trinetx", stamp, patients=cfg.trinetx_patients, layout="trinetx",
               seed=cfg.seed + 10_000, **dial)
        tx = _preprocess(cfg.out / "data" / "trinetx", stamp, cfg.out / "raw" / "trinetx" / "raw",
                         seed=cfg.seed + 10_000, split=(0.16, 0.1, 0.74), vocab_from=mimic, icd="9")
        record["trinetx_labelled_patients"] = len(data.load_processed(tx).splits["train"])
    if "unrelated" in arms:
        n = len(pool) + len(preval)
        _synth(cfg.out / "raw" / "unrelated", stamp, patients=n, seed=cfg.seed + 20_000,
               loadings_seed=cfg.seed + 1, **dial)
        un = _preprocess(cfg.out / "data" / "unrelated", stamp,
                         cfg.out / "raw" / "unrelated" / "raw", seed=cfg.seed + 20_000,
                         split=(1.0, 0.0, 0.0), vocab_from=mimic)
        u = data.load_processed(un)
        if not (views / "pretrain-unrelated").is_dir():
            train_ids, val_ids = _split_ids(u.splits["train"], cfg.seed, 1 - len(preval) / n, 1.0)
            data.write_view(un, views / "pretrain-unrelated", {"train": train_ids, "val": val_ids,
                                                               "test": np.zeros(0, int)})
        record["unrelated_patients"] = n
    emit(cfg, kind="data", stays=len(d.stays["stay_id"]), admissions=len(d.admissions["hadm_id"]),
         features=d.meta["n_features"], icd=d.meta["n_icd"], drugs=d.meta["n_drug"], **record)
    return emit(cfg, kind="time", step="data", **clock.seconds())


# -------------------------------------------------------------------------------------- pretraining
def pretrain_one(cfg: TransferConfig, arm: str, seed: int) -> dict:
    """Stage 1 then stage 2 of one (pool, seed) into OUT/pretrain/ARM-SEED; returns both verdicts. A
    folder without its .stamp (killed part-way, or from other settings) is trained again from the
    start."""
    start, cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    run, stamp = cfg.out / "pretrain" / f"{arm}-{seed}", stamps(cfg)["pretrain"]
    if _fresh(run, stamp):
        return {**json.loads((run / "verdicts.json").read_text()), "cached": True, "cpu_s": 0.0}
    common = dict(data=cfg.out / "views" / f"pretrain-{arm}", run=run, d_model=cfg.d_model,
                  seed=seed, patience=cfg.pretrain_patience, quiet=True, checkpoint_every=10 ** 9)
    out = {}
    for level, epochs, bs, lr in (("stay", cfg.stay_epochs, cfg.stay_batch_size, cfg.stay_lr),
                                  ("admission", cfg.admission_epochs,
                                   cfg.admission_batch_size, cfg.admission_lr)):
        rec = train.pretrain(train.LEVELS[level](epochs=epochs, batch_size=bs, lr=lr, **common))
        out[level] = {"verdict": rec["verdict"], "learned": rec["learned"]}
    (run / "verdicts.json").write_text(json.dumps(out))
    _finish(run, stamp)
    return {**out, "cached": False, "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - start}


def pretrain_all(cfg: TransferConfig, pool, pools: tuple) -> dict:
    clock = Clock()
    jobs = [(arm, s) for arm in pools for s in range(cfg.pretrain_seeds)]
    for (arm, s), rec in zip(jobs, pool.starmap(pretrain_one, [(cfg, a, s) for a, s in jobs])):
        clock.job_cpu += rec.pop("cpu_s")
        emit(cfg, kind="pretrain", arm=arm, seed=s,
             **{k: v for k, v in rec.items() if k != "wall_s"})
    return emit(cfg, kind="time", step="pretrain", runs=len(jobs), **clock.seconds())


# --------------------------------------------------------------------------------- data per process
_LOADED: dict = {}


def _data(cfg: TransferConfig, world: str) -> data.Processed:
    """The fine-tuning view (mimic) or the TriNetX-style folder, loaded once per process."""
    root = cfg.out / ("views/finetune" if world == "mimic" else "data/trinetx/processed")
    if root not in _LOADED:
        _LOADED[root] = data.load_processed(root)
    return _LOADED[root]


def _task(row: str) -> str:
    return row.split(" ")[0]


def examples(cfg: TransferConfig, row: str, n: int, r: int) -> tuple[data.Processed, dict]:
    """The data and examples per split of replicate r at n labels (0: every training example)."""
    d = _data(cfg, ROWS[row])
    ex = evaluate.task_examples(_task(row), d, evaluate.FinetuneConfig(labels=n or None), seed=r)
    return d, ex


def _checkpoints(cfg: TransferConfig, arm: str, r: int, meta: dict) -> checkpoints.Checkpoints:
    pool = arm if arm in POOLS else "medhmp"     # scratch and raw arms never load it
    return checkpoints.Checkpoints(cfg.out / "pretrain" / f"{pool}-{r % cfg.pretrain_seeds}", meta)


def run_path(cfg: TransferConfig, row: str, n: int, arm: str, r: int) -> Path:
    """The cached result of one run: replicate r, and for an arm that starts from a pool its
    pretraining seed."""
    key = stamps(cfg)["finetune"]
    pre = f"-p{r % cfg.pretrain_seeds}" if arm in (*POOLS, "medhmp-probe") else ""
    return (cfg.out / "runs" / re.sub(r"\W+", "_", row).strip("_") / str(n or "all") / arm
            / f"r{r}{pre}-{key}.npz")


def finetune_one(cfg: TransferConfig, row: str, n: int, arm: str, r: int) -> float:
    """One replicate of one fine-tuned arm; writes its validation score and test probabilities; CPU
    seconds."""
    cpu = time.process_time()
    torch.set_num_threads(1)
    task, seed = _task(row), r + (10_000 if arm == "aa" else 0)
    d, ex = examples(cfg, row, n, r)
    level = evaluate.TASKS[task].level
    fcfg = evaluate.FinetuneConfig(task=task, epochs=cfg.epochs, patience=cfg.patience,
                                   batch_size=cfg.batch_size, quiet=True)
    sets = {s: evaluate.labelled_dataset(level, d, e, fcfg) for s, e in ex.items()}
    torch.manual_seed(seed)
    ckpts = _checkpoints(cfg, arm, r, d.meta)
    # the architecture of the arm's checkpoint; from scratch the same one stated here, so that a
    # scratch run never depends on whether a pretraining folder exists
    mcfg = (ckpts.model_config("admission") if arm in POOLS
            else ModelConfig.from_meta(d.meta, d_model=cfg.d_model))
    model, _ = evaluate.build_model(task, "admission" if arm in POOLS else "none", fcfg, ckpts,
                                    mcfg)
    run = evaluate.Run(fcfg, d, ckpts, torch.device("cpu"), torch.float32, Reporter(quiet=True))
    rec = evaluate.finetune(model, sets, run, seed, cfg.lrs[level])
    test = evaluate.predict(model, sets["test"], 256, run.device, run.amp)
    save_npz(run_path(cfg, row, n, arm, r), val=rec[f"val_{fcfg.select_on}"],
             test=test.astype(np.float32), n_train=len(ex["train"]["label"]))
    return time.process_time() - cpu


# ------------------------------------------------------------------------------------ linear models
def fit_logistic(x: np.ndarray, y: np.ndarray,
                 l2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2 logistic regression by LBFGS on standardised features: (mean, sd, weights with bias
    last)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.tensor((x - mu) / sd, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = (torch.nn.functional.binary_cross_entropy_with_logits(xt @ w[:-1] + w[-1], yt)
               + l2 * (w[:-1] ** 2).sum())
        out.backward()
        return out
    opt.step(loss)
    return mu, sd, w.detach().numpy()


def predict_logistic(model, x: np.ndarray) -> np.ndarray:
    mu, sd, w = model
    return 1 / (1 + np.exp(-np.clip(((x - mu) / sd) @ w[:-1] + w[-1], -50, 50)))


def raw_inputs(level: str, batch: dict, meta: dict) -> torch.Tensor:
    """What raw-linear sees, (B, ·): a stay's per-column mean over the hours and its last values
    (each variable's columns at the last hour it was charted) with the static vector; an admission's
    ICD and drug sets, its note vector and the mean of its stays' hourly means; a patient's
    visit-code counts."""
    if level == "patient":
        return (batch["icd"] * batch["visit_mask"][..., None]).sum(1)                   # (B, V)
    T, F = meta["seq_len"], meta["n_features"]
    n = len(batch["static"])
    x = densify(batch["ts_idx"], n, T, F)                                                # (n, T, F)
    if level == "admission":
        mask = batch["stay_mask"].float()                                                # (B, K)
        means = torch.zeros(*mask.shape, F)
        means[batch["stay_mask"]] = x.mean(1)
        pooled = means.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)                   # (B, F)
        return torch.cat([batch["icd"], batch["drug"], batch["note"] * batch["note_mask"][:, None],
                          pooled], 1)
    # (F,), (V,)
    owner, present = _variables(meta)
    charted = x[:, :, present]                                                           # (n, T, V)
    # (n, V) last hour
    last = (charted * torch.arange(1, T + 1)[None, :, None]).argmax(1)
    hour = last[:, owner]                                                                # (n, F)
    lastval = torch.gather(x, 1, hour[:, None, :])[:, 0] * charted.amax(1)[:, owner]     # (n, F)
    return torch.cat([x.mean(1), lastval, batch["static"]], 1)


def _variables(meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature column's variable and each variable's presence column (meta.json features)."""
    owner = torch.zeros(meta["n_features"], dtype=torch.long)
    present = []
    for i, v in enumerate(meta["features"]["variables"]):
        cols = [c for c in v["columns"] if c >= 0]
        owner[cols] = i
        present.append(v["columns"][0] if v["columns"][0] >= 0 else cols[0])
    return owner, torch.tensor(present, dtype=torch.long)


@torch.no_grad()
def vectors(cfg: TransferConfig, row: str, arm: str, seed: int) -> dict:
    """{split: (n, D)} inputs of a linear arm for every example of a task (the whole training
    split): raw inputs, or the frozen MedHMP encoder's vectors (pretraining seed `seed`); computed
    once per process."""
    key = (cfg.out, row, arm, seed if arm != "raw-linear" else None)
    if key not in _LOADED:
        d, level = _data(cfg, ROWS[row]), evaluate.TASKS[_task(row)].level
        enc = None if arm == "raw-linear" else encoder(cfg, level, "medhmp", seed, d)
        out = {}
        for split, e in evaluate.all_examples(_task(row), d).items():
            ds = evaluate.labelled_dataset(level, d, e, evaluate.FinetuneConfig())
            parts = [raw_inputs(level, b, d.meta) if enc is None else represent(enc, level, b)
                     for b in data.make_loader(ds, 256)]
            out[split] = torch.cat(parts).numpy() if parts else np.zeros((0, 1))
        _LOADED[key] = out
    return _LOADED[key]


def linear_one(cfg: TransferConfig, row: str, n: int, arm: str, r: int) -> float:
    """One replicate of a linear arm on replicate r's label subset: the penalty of cfg.l2s with the
    best validation AUPRC; CPU seconds."""
    cpu = time.process_time()
    torch.set_num_threads(1)
    ex = evaluate.all_examples(_task(row), _data(cfg, ROWS[row]))
    train = evaluate.train_subset({**ex["train"], "i": np.arange(len(ex["train"]["label"]))},
                                  evaluate.FinetuneConfig(labels=n or None), r)
    x = vectors(cfg, row, arm, r % cfg.pretrain_seeds)
    fits = {l2: fit_logistic(x["train"][train["i"]], train["label"], l2) for l2 in cfg.l2s}
    val = {l2: auprc(ex["val"]["label"], predict_logistic(m, x["val"])) for l2, m in fits.items()}
    best = max(val, key=val.get)
    save_npz(run_path(cfg, row, n, arm, r), val=val[best],
             test=predict_logistic(fits[best], x["test"]).astype(np.float32),
             n_train=len(train["label"]), l2=best)
    return time.process_time() - cpu


def encoder(cfg: TransferConfig, level: str, arm: str, seed: int, d: data.Processed):
    """The frozen encoder of a level: pretrained on an arm's pool (its admission.pt), or random
    weights of the same architecture (seeded)."""
    ckpts = checkpoints.Checkpoints(
        cfg.out / "pretrain" / f"{arm if arm in POOLS else 'medhmp'}-{seed}", d.meta)
    torch.manual_seed(seed)
    enc = checkpoints.new_encoder(level, ckpts.model_config("admission"))
    if arm in POOLS:
        checkpoints.transfer(enc, ckpts.for_transfer(level, "admission"), level, "admission")
    return enc.eval()


def represent(enc, level: str, batch: dict) -> torch.Tensor:
    """(B, D) frozen vectors: stay / admission vectors, or a patient's mean visit ICD embedding."""
    if level == "patient":
        m = batch["visit_mask"].float()[..., None]                                      # (B, L, 1)
        return (enc(batch["icd"]) * m).sum(1) / m.sum(1).clamp(min=1)
    return enc(batch)


# ----------------------------------------------------------------------------------------- the runs
def run_all(cfg: TransferConfig, pool, arms: tuple) -> dict:
    """Every (row, labels, arm, replicate) not finished under the current settings and code, in the
    pool."""
    clock = Clock()
    jobs = [(cfg, row, n, arm, r) for row in ROWS for n in cfg.labels for arm in arms
            for r in range(cfg.replicates)]
    todo = [j for j in jobs if not run_path(*j).is_file()]
    emit(cfg, kind="progress", step="finetune", runs=len(jobs), cached=len(jobs) - len(todo))
    done, last = 0, time.perf_counter()
    for seconds in pool.imap_unordered(_run_job, todo):
        clock.job_cpu += seconds
        done += 1
        if time.perf_counter() - last > 60 or done == len(todo):
            last = time.perf_counter()
            emit(cfg, kind="progress", step="finetune", done=done, of=len(todo), **clock.seconds())
    return emit(cfg, kind="time", step="finetune", runs=len(todo),
                cached=len(jobs) - len(todo), **clock.seconds())


def _run_job(job: tuple) -> float:
    return (linear_one if job[3] in LINEAR else finetune_one)(*job)


def load_runs(cfg: TransferConfig, row: str, n: int, arm: str) -> dict:
    rows = [np.load(run_path(cfg, row, n, arm, r)) for r in range(cfg.replicates)]
    return {"test": np.stack([z["test"] for z in rows]), "n_train": int(rows[0]["n_train"])}


# ------------------------------------------------------------------------------------------- report
def _interval(per: np.ndarray, boot: np.ndarray, groups, bounds: tuple) -> dict:
    """combine_replicates' interval within `bounds` (the metric's range), with a two-sided p-value
    of 0."""
    iv = combine_replicates(per, boot, groups, bounds=bounds)
    t = (abs(iv["estimate"]) / iv["se"] if iv["se"] and math.isfinite(iv["se"]) and iv["se"] > 0
         else math.inf)
    p = 2 * (1 - t_cdf(t, iv["df"])) if math.isfinite(t) else (0.0 if iv["estimate"] else 1.0)
    return {**iv, "p": p}


def cell_lines(cfg: TransferConfig, row: str, n: int, arms: tuple) -> tuple[list[dict], float]:
    """The result lines of one (row, labels): each arm's mean with its interval, and its Δ against
    scratch (and MedHMP's against raw-linear), paired by replicate; and the CPU seconds they
    took."""
    cpu, task = time.process_time(), _task(row)
    y = evaluate.task_examples(task, _data(cfg, ROWS[row]),
                               evaluate.FinetuneConfig())["test"]["label"]
    weights = resample_weights(len(y), cfg.bootstrap, cfg.seed)
    runs = {arm: load_runs(cfg, row, n, arm) for arm in arms}
    scores = {(arm, m): replicate_scores(y, runs[arm]["test"], f, weights) for arm in arms
              for m, f in METRICS.items()}
    groups = {arm: np.arange(cfg.replicates) % cfg.pretrain_seeds
              if arm in POOLS or arm == "medhmp-probe" else None for arm in arms}
    lines = []
    for arm in arms:
        line = {"kind": "result", "task": row, "labels": n or "all", "arm": arm,
                "n_train": runs[arm]["n_train"], "n_test": len(y), "positives": int(y.sum()),
                "replicates": cfg.replicates}
        for m in METRICS:
            own = _interval(*scores[arm, m], groups[arm], (0.0, 1.0))
            line.update({m: round(own["estimate"], 4),
                         f"{m}_ci": [round(own["lo"], 4), round(own["hi"], 4)]})
            for ref, name in (("scratch", "delta"), ("raw-linear", "vs_linear")):
                if arm == ref or ref not in arms or (name == "vs_linear" and arm != "medhmp"):
                    continue
                d = _interval(scores[arm, m][0] - scores[ref, m][0],
                              scores[arm, m][1] - scores[ref, m][1], groups[arm], (-1.0, 1.0))
                line.update({f"{name}_{m}": round(d["estimate"], 4),
                             f"{name}_{m}_ci": [round(d["lo"], 4), round(d["hi"], 4)],
                             f"{name}_{m}_p": d["p"], f"{name}_{m}_se": d["se"],
                             f"{name}_{m}_df": d["df"]})
        lines.append(line)
    return lines, time.process_time() - cpu


def holm(lines: list[dict], cfg: TransferConfig) -> None:
    """Holm's step-down correction of MedHMP's Δ AUROC p-values over the cells
    with <= holm_max_labels labels: adds `holm_p` (adjusted) and the Holm-level interval `holm_ci`
    to those lines (in place)."""
    cells = sorted((x for x in lines if x["arm"] == "medhmp" and x["labels"] != "all"
                    and x["labels"] <= cfg.holm_max_labels), key=lambda x: x["delta_auroc_p"])
    m, running = len(cells), 0.0
    for k, x in enumerate(cells):
        running = max(running, min(1.0, (m - k) * x["delta_auroc_p"]))
        alpha = 0.05 / (m - k)
        half = t_quantile(1 - alpha / 2, x["delta_auroc_df"]) * x["delta_auroc_se"]
        x.update(holm_p=running, holm_ci=[round(max(x["delta_auroc"] - half, -1.0), 4),
                                          round(min(x["delta_auroc"] + half, 1.0), 4)])


def verdict(cfg: TransferConfig, lines: list[dict]) -> dict:
    """The pass criteria (docs/results.md): A/A covers 0 in >= 93% of its cells; neither negative
    control has its interval wholly above 0 in more than 5% of its cells; MedHMP's Δ AUROC >= 0.03
    with its Holm-corrected interval above 0 at every label count <= holm_max_labels on >= 5 of the
    8 rows; and where MedHMP passes, whether it is ahead of raw-linear."""
    get = {(x["task"], x["labels"], x["arm"]): x for x in lines}
    few = [n for n in cfg.labels if 0 < n <= cfg.holm_max_labels]
    out = {"kind": "verdict", "seed": cfg.seed, "strength": cfg.strength,
           "label_noise": cfg.label_noise}
    if "aa" in cfg.arms:
        aa = [x for x in lines if x["arm"] == "aa"]
        covers = sum(x["delta_auroc_ci"][0] <= 0 <= x["delta_auroc_ci"][1] for x in aa)
        out.update(aa_covers=f"{covers}/{len(aa)}", aa_ok=covers >= 0.93 * len(aa))
    for arm in CONTROLS:
        if arm in cfg.arms:
            xs = [x for x in lines if x["arm"] == arm]
            above = [f"{x['task']} @ {x['labels']}" for x in xs if x["delta_auroc_ci"][0] > 0]
            below = [f"{x['task']} @ {x['labels']}" for x in xs if x["delta_auroc_ci"][1] < 0]
            out[arm] = {"above_0": above, "below_0": below, "ok": len(above) <= 0.05 * len(xs),
                        "mean_delta": round(float(np.mean([x["delta_auroc"] for x in xs])), 4)}
    passing = [row for row in ROWS if few and all(
        get[row, n, "medhmp"]["delta_auroc"] >= 0.03 and get[row, n, "medhmp"]["holm_ci"][0] > 0
        for n in few)]
    out.update(medhmp_rows_passing=passing, medhmp_ok=len(passing) >= 5)
    if "raw-linear" in cfg.arms:
        out["medhmp_not_ahead_of_raw_linear"] = [f"{row} @ {n}" for row in passing for n in few
                                                 if get[row, n, "medhmp"]["vs_linear_auroc"] <= 0]
    checks = [out.get("aa_ok", True), out["medhmp_ok"],
              *(out[a]["ok"] for a in CONTROLS if a in out)]
    return {**out, "passed": all(checks)}


def markdown(cfg: TransferConfig, lines: list[dict]) -> str:
    """OUT/transfer.md: scratch's AUROC, then per arm Δ AUROC against scratch [95% interval]; MedHMP
    with Holm."""
    get = {(x["task"], x["labels"], x["arm"]): x for x in lines}
    labels = [n or "all" for n in cfg.labels]

    def table(title: str, cell) -> str:
        head = ("| task | " + " | ".join(map(str, labels)) + " |\n|---|" + "---|" * len(labels)
                + "\n")
        return f"{title}\n\n{head}" + "".join(f"| {row} | "
                                              + " | ".join(cell(row, n) for n in labels) + " |\n"
                                              for row in ROWS)

    def delta(arm: str, key: str = "delta_auroc"):
        def cell(row, n):
            x = get[row, n, arm]
            lo, hi = x[f"{key}_ci"]
            mark = "" if key != "delta_auroc" or arm != "medhmp" or "holm_ci" not in x else \
                f" (Holm {x['holm_ci'][0]:+.2f})"
            return f"{x[key]:+.3f} [{lo:+.2f}, {hi:+.2f}]{mark}"
        return cell
    out = [table("AUROC from scratch (mean over replicates) [95% interval]",
                 lambda row, n: "{:.3f} [{:.2f}, {:.2f}]".format(
                     get[row, n, "scratch"]["auroc"], *get[row, n, "scratch"]["auroc_ci"]))]
    out += [table(f"Δ AUROC {arm} − scratch [95% interval]", delta(arm)) for arm in cfg.arms
            if arm != "scratch"]
    if "raw-linear" in cfg.arms:
        out.append(table("Δ AUROC medhmp − raw-linear [95% interval]",
                         delta("medhmp", "vs_linear_auroc")))
    return "\n".join(out)


def report(cfg: TransferConfig, pool, arms: tuple) -> tuple[list[dict], dict]:
    clock = Clock()
    parts = pool.starmap(cell_lines, [(cfg, row, n, arms) for row in ROWS for n in cfg.labels])
    lines, clock.job_cpu = [x for part, _ in parts for x in part], sum(cpu for _, cpu in parts)
    if "medhmp" in arms and "scratch" in arms:
        holm(lines, cfg)
    with open(cfg.out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    (cfg.out / "transfer.md").write_text(markdown(cfg, lines))
    for x in lines:
        print(json.dumps(x), flush=True)
    emit(cfg, **verdict(cfg, lines))
    return lines, emit(cfg, kind="time", step="report", **clock.seconds())


# ------------------------------------------------------------------------------------------ latents
def ridge_r2(x: np.ndarray, y: np.ndarray, folds: int = 5, l2: float = 1.0, seed: int = 0) -> float:
    """Out-of-fold R² of a ridge regression of y (n,) on x (n, d), features standardised per
    fold."""
    fold, pred = np.random.default_rng(seed).permutation(len(y)) % folds, np.zeros(len(y))
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        a = np.c_[(x[tr] - mu) / sd, np.ones(tr.sum())]
        w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ y[tr])
        pred[te] = np.c_[(x[te] - mu) / sd, np.ones(te.sum())] @ w
    return float(1 - np.mean((y - pred) ** 2) / np.var(y))


@torch.no_grad()
def latent_probes(cfg: TransferConfig, arms: tuple) -> dict:
    """R² of each true latent from frozen representations of (up to 3,000) test patients' stays,
    admissions and visit histories, for each pool's encoder (pretraining seed 0) and a random
    one."""
    clock = Clock()
    lat, d = synthetic.read_latents(cfg.out / "raw" / "mimic3" / "raw"), _data(cfg, "mimic")
    test, s, a = d.splits["test"], d.stays, d.admissions
    units = {"stay": (np.flatnonzero(np.isin(s["subject_id"].numpy(), test))[:3000], "stays",
                      s["stay_id"].numpy()),
             "admission": (np.flatnonzero(np.isin(a["subject_id"].numpy(), test)
                                          & (np.diff(a["stay_ptr"].numpy()) > 0)
                                          & (np.diff(a["icd_ptr"].numpy()) > 0))[:3000],
                           "admissions", a["hadm_id"].numpy()),
             "patient": (test[:3000], "patients", test[:3000])}
    for level, (rows, table, ids) in units.items():
        ex = ({"row": np.full(len(rows), -1), "subject_id": rows, "label": np.zeros(len(rows)),
               "cutoff": np.full(len(rows), np.inf)} if level == "patient" else
              {"row": rows, "subject_id": np.zeros(len(rows), int), "label": np.zeros(len(rows)),
               "cutoff": np.zeros(len(rows))})
        t = lat[table]
        key = ("subject_id" if level == "patient"
               else next(k for k in t if k.endswith("_id") and k != "subject_id"))
        at = data.row_of(np.asarray(t[key]), rows if level == "patient" else ids[rows])
        names = [k for k in t if not k.endswith("_id") and np.asarray(t[k]).dtype.kind == "f"]
        ds = evaluate.labelled_dataset(level, d, ex, evaluate.FinetuneConfig())
        for arm in ("random", *[p for p in POOLS if p in arms]):
            enc = encoder(cfg, level, arm, 0, d)
            x = torch.cat([represent(enc, level, b) for b in data.make_loader(ds, 256)]).numpy()
            ok = at >= 0
            r2 = {n: round(ridge_r2(x[ok], np.asarray(t[n], dtype=float)[at[ok]]), 3)
                  for n in names}
            emit(cfg, kind="latents", level=level, arm=arm, n=int(ok.sum()), r2=r2,
                 mean_r2=round(float(np.mean(list(r2.values()))), 3))
    return emit(cfg, kind="time", step="latents", **clock.seconds())


# --------------------------------------------------------------------------------------------- dial
def dial_config(cfg: TransferConfig, strength: float, noise: float) -> TransferConfig:
    """A smaller bench on a world with weaker latents or noisier labels: scratch and MedHMP only."""
    return replace(cfg, out=cfg.out / "dial" / f"strength{strength:g}-noise{noise:g}",
                   strength=strength, label_noise=noise, patients=cfg.dial_patients,
                   pretrain_seeds=cfg.dial_pretrain_seeds, replicates=cfg.dial_replicates,
                   labels=cfg.dial_labels, arms=("scratch", "medhmp"), dial=())


def run_dial(cfg: TransferConfig, pool) -> dict:
    """Every dial world (cfg.dial), each a smaller bench of its own under OUT/dial/; Δ lines per
    world."""
    start, cpu = time.perf_counter(), 0
    for strength, noise in cfg.dial:
        sub = dial_config(cfg, strength, noise)
        sub.out.mkdir(parents=True, exist_ok=True)
        steps = [prepare_data(sub, sub.arms), pretrain_all(sub, pool, ("medhmp",)),
                 run_all(sub, pool, sub.arms)]
        lines, seconds = report(sub, pool, sub.arms)
        cpu += sum(t["cpu_s"] for t in (*steps, seconds))
        scratch = {(x["task"], x["labels"]): x["auroc"] for x in lines if x["arm"] == "scratch"}
        for x in lines:
            if x["arm"] == "medhmp":
                emit(cfg, kind="dial", strength=strength, label_noise=noise, task=x["task"],
                     labels=x["labels"],
                     scratch_auroc=scratch[x["task"], x["labels"]], delta_auroc=x["delta_auroc"],
                     delta_auroc_ci=x["delta_auroc_ci"])
    return emit(cfg, kind="time", step="dial", wall_s=round(time.perf_counter() - start), cpu_s=cpu)


# --------------------------------------------------------------------------------------------- main
def settings(pairs: list[str]) -> dict:
    """--set FIELD=JSON pairs as TransferConfig fields (lists become tuples); an unknown field
    stops."""
    known, out = {f for f in TransferConfig.__dataclass_fields__}, {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in known:
            raise SystemExit(f"--set {name}: not a TransferConfig field "
                             f"({', '.join(sorted(known))})")
        value = json.loads(text)
        out[name] = (tuple(tuple(v) if isinstance(v, list) else v for v in value)
                     if isinstance(value, list) else value)
    return out


STEPS = ("data", "pretrain", "finetune", "report", "latents", "dial")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=TransferConfig.out)
    parser.add_argument("--seed", type=int, default=TransferConfig.seed,
                        help="the data world (0: development)")
    parser.add_argument("--strength", type=float, default=TransferConfig.strength)
    parser.add_argument("--label-noise", type=float, default=TransferConfig.label_noise)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, for the test suite (minutes)")
    parser.add_argument("--jobs", type=int, default=TransferConfig.jobs)
    parser.add_argument("--only", default=",".join(STEPS),
                        help="comma-separated steps: " + ", ".join(STEPS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="another TransferConfig value, e.g. --set replicates=6 "
                             "--set 'labels=[25, 100]'")
    args = parser.parse_args()
    cfg = TransferConfig(out=args.out, seed=args.seed, strength=args.strength,
                         label_noise=args.label_noise, jobs=args.jobs,
                         **(QUICK if args.quick else {}), **settings(args.set))
    steps = args.only.split(",")
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start, times = time.perf_counter(), []
    emit(cfg, kind="config",
         **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
         code=code_digest())
    pool = multiprocessing.get_context("spawn").Pool(cfg.jobs)
    runs = {"data": lambda: prepare_data(cfg, cfg.arms),
            "pretrain": lambda: pretrain_all(cfg, pool, tuple(p for p in POOLS if p in cfg.arms)),
            "finetune": lambda: run_all(cfg, pool, cfg.arms),
            "report": lambda: report(cfg, pool, cfg.arms)[1],
            "latents": lambda: latent_probes(cfg, cfg.arms), "dial": lambda: run_dial(cfg, pool)}
    try:
        # SIGTERM stops the workers too; finished runs are kept
        with sigterm_as_interrupt():
            times = [runs[step]() for step in STEPS
                     if step in steps and (step != "dial" or cfg.dial)]
        pool.close()
    except KeyboardInterrupt:
        pool.terminate()
        emit(cfg, kind="stopped", wall_s=round(time.perf_counter() - start))
        sys.exit(130)
    finally:
        pool.join()
    emit(cfg, kind="time", step="all", steps=steps, jobs=cfg.jobs,
         wall_s=round(time.perf_counter() - start), cpu_s=sum(t["cpu_s"] for t in times))


if __name__ == "__main__":
    main()
