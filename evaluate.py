"""Evaluate: fine-tune the pretrained encoders on the downstream tasks and score them with CIs.

Usage:
    python medhmp.py evaluate --task mortality --data data/processed --run runs/default
    python medhmp.py evaluate --task all --seeds 5 --model retain  # or baselines: f-lstm, bert-lstm
    python medhmp.py evaluate --labels-from DIR [--level stay] [--task-name NAME]  # MEDS labels
Reads DATA/ (labels, splits, tensors) and RUN/admission.pt or RUN/stay.pt (never writes them).
Writes RUN/eval/<task>.json (config, n and prevalence per split, per-seed metrics, mean ± sd,
bootstrap CIs), RUN/eval/<task>_predictions.csv (test probabilities per seed) and one row per (task,
init, model) in RUN/results.csv; rows and entries of an earlier run with the same key are replaced.

--labels-from evaluates a MEDS label folder as one custom binary task (meds_labels.py, imported only
then; docs/meds.md, Labels in) through the same fine-tuning, intervals and files as a built-in task.

Protocol (paper App. B; docs/design.md, Evaluation protocol): per seed, fine-tune every weight with
SGD (weight decay 1e-2) on binary cross-entropy for up to `epochs`, stop after `patience` epochs
without a better validation `select_on`, reload the best weights and score the test split once;
report mean ± sd over seeds. Every task also runs from scratch (init=none, same architecture), so
the value of pretraining is always visible.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines import ADMISSION_MODELS, STAY_MODELS
from checkpoints import TRANSFERS, Checkpoints, new_encoder, transfer
from data import (SPLITS, AdmissionDataset, InputError, PatientDataset, Processed, StayDataset,
                  config_record, load_processed, make_loader, select_rows)
from folders import check_writable
from metrics import INTERVAL_METHOD, METRIC_FUNCTIONS, METRICS, binary_metrics, replicate_interval
from models import Classifier, ModelConfig
from progress import Reporter
from results import (check_outputs, delta_record, paired_deltas, print_table, results_table,
                     skip_reason, skipped_lines, split_stats, write_task)
from runtime import (autocast, check_finite, check_seed, grad_scaler, optimizer_step,
                     resolve_device, resolve_dtype, to_device)
from sequence import SEQUENCE_MODELS, SequenceClassifier
from tasks import LEVELS, TASKS   # noqa: F401  (LEVELS: the command line's --level)


INITS = ("admission", "stay", "none")    # MedHMP a+s, MedHMP s, random weights
PATIENT_MODELS = tuple(SEQUENCE_MODELS)
BASELINES = {"stay": STAY_MODELS, "admission": ADMISSION_MODELS, "patient": {}}  # init=none only
MODELS = ("medhmp", *PATIENT_MODELS, *STAY_MODELS, *ADMISSION_MODELS)  # what --model may name


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "all"                 # a TASKS name, or "all"; not used with labels_from
    # a MEDS label folder (or file) as one custom binary task at `level` (None: inferred from the
    # prediction times), named task_name (None: "meds-<folder name>"); meds_labels.py
    labels_from: Path | None = None
    level: str | None = None
    task_name: str | None = None
    data: Path = Path("data/processed")
    run: Path = Path("runs/default")  # reads the checkpoints here, writes eval/ and results.csv
    init: str = "admission"           # admission (MedHMP a+s) | stay (MedHMP s) | none (random)
    compare_none: bool = True         # also run init=none (same architecture) beside a pretrained
    model: str = "medhmp"             # a MODELS name; what it runs at each level: level_model
    seeds: int = 5                    # paper App. B: mean of 5 runs
    seed: int = 0                     # run i uses seed + i (weights, dropout, batch order)
    epochs: int = 30                  # paper App. B: at most 30 epochs
    patience: int = 5                 # paper App. B: early-stopping patience 5
    label_fraction: float = 1.0       # share of the training examples (paper Fig. 5: 1% to 100%)
    labels: int | None = None         # or this many training examples, stratified (low-label runs)
    # learning rate: `lr` (one rate, or a grid chosen per init on validation, mean over seeds)
    # applies to every level when given, else the level's own. Paper App. B grid: batch {16, 32,
    # 64} x lr [2e-5, 5e-3]. Stay/admission: the grid's top, 5e-3 with batch 16, was the best of
    # {5e-3, 2e-2, 5e-2} on the synthetic demo cohort. Patient: 5e-2, beyond the grid: ~100
    # training patients give SGD ~200 steps in 30 epochs, too few at 5e-3 (docs/results.md,
    # Fine-tuning choices; the paper's cohorts are 10-100x larger, and the official patient code
    # uses Adam).
    lr: tuple[float, ...] | None = None
    lr_stay: float = 5e-3
    lr_admission: float = 5e-3
    lr_patient: float = 5e-2
    batch_size: int = 16
    weight_decay: float = 1e-2        # paper App. B
    momentum: float = 0.9             # fidelity: the paper says plain SGD; official train.py: 0.9
    grad_clip: float = 1.0            # official health_risk_prediction.py clips at 1.0
    # validation metric for early stopping and best-epoch selection. fidelity: the official code
    # early-stops on a swapped-argument BCE (= 100·MAE), and on dev F1 at patient level
    select_on: str = "auprc"
    # dropout before the output layer. fidelity: official HMP uses 0.2 (stay), HADM_CLS and the
    # patient models 0.8; on the synthetic demo cohort 0.8 hurt readmission and did not help the
    # patient tasks (docs/results.md, Fine-tuning choices), so 0.2 everywhere.
    dropout: float = 0.2
    # train only the head on the frozen encoder (a linear probe at stay and admission level; the
    # sequence model on frozen code embeddings at patient level)
    probe: bool = False
    # patient level: standardise the visit embeddings on the training visits
    # (sequence.SequenceClassifier.standardize_codes; False: the paper's as-is)
    standardize_codes: bool = True
    max_stays: int = 3                # paper: at most M = 3 stays per admission
    max_visits: int = 50              # paper App. A: the last 50 visits
    bootstrap: int = 1000             # test-set resamples of the intervals (metrics.py)
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto | fp32 | bf16 | fp16 (fp32 on the CPU unless asked)
    table: bool = True                # print the results table at the end
    quiet: bool = False


@dataclass(frozen=True)
class Run:
    """One evaluation run: its config, the processed data, RUN's checkpoints, the device and
    autocast dtype it computes in, and where it reports. `Run.open(cfg, folder)` sets one up from a
    config."""
    cfg: FinetuneConfig
    data: Processed
    checkpoints: Checkpoints
    device: torch.device
    amp: torch.dtype                  # autocast dtype (runtime.resolve_dtype)
    rep: Reporter

    @classmethod
    def open(cls, cfg: FinetuneConfig, folder: str, tasks: list) -> Run:
        """The run of `cfg`, RUN/<folder> checked writable and the result files of `tasks` checked
        to be medhmp's (results.check_outputs) before any fine-tuning, and a warning when RUN's two
        checkpoints do not belong together (Checkpoints.lineage)."""
        rep, device = Reporter(cfg.quiet), resolve_device(cfg.device)
        amp = resolve_dtype(cfg.precision, device)
        check_writable(Path(cfg.run) / folder, "--run")
        check_outputs(Path(cfg.run), tasks)
        data = load_processed(cfg.data)
        ckpts = Checkpoints(cfg.run, data.meta)
        if cfg.init != "none" and (warning := ckpts.lineage()):
            rep.log(warning)
        return cls(cfg, data, ckpts, device, amp, rep)

    def configured(self, **changes) -> Run:
        """This run with other config values (e.g. a table cell's model and init)."""
        return replace(self, cfg=replace(self.cfg, **changes))


# ---------------------------------------------------------------------------------------- datasets
def task_level(task: str, data: Processed) -> str:
    """A built-in task's level (tasks.TASKS), or a custom task's (its labels: --labels-from)."""
    return TASKS[task].level if task in TASKS else data.labels[task]["level"]


def all_examples(task: str, data: Processed) -> dict:
    """The task's raw examples per split (rows, subjects, labels, cutoffs), every training example
    included."""
    examples = {s: data.examples(task, s) for s in SPLITS}
    # a labelled stay or admission missing from the tensors cannot be scored
    if task_level(task, data) != "patient":
        examples = {s: select_rows(e, e["row"] >= 0) for s, e in examples.items()}
    return examples


def train_subset(e: dict, cfg: FinetuneConfig, seed: int) -> dict:
    """The training examples replicate `seed` fine-tunes on: cfg.label_fraction of them, or
    cfg.labels of them (stratified), drawn with the replicate's own seed, so that the replicates'
    spread holds the label subset's; every example when neither is set."""
    # low-resource setting (paper Fig. 5): a share of the training labels
    if cfg.label_fraction < 1.0:
        e = select_rows(e, np.random.default_rng(seed).random(len(e["label"])) < cfg.label_fraction)
    if cfg.labels:
        e = sample_labels(e, cfg.labels, seed)
    return e


def task_examples(task: str, data: Processed, cfg: FinetuneConfig, seed: int | None = None) -> dict:
    """The task's examples per split, the training split as replicate `seed` (default cfg.seed) sees
    it."""
    examples = all_examples(task, data)
    examples["train"] = train_subset(examples["train"], cfg, cfg.seed if seed is None else seed)
    return examples


def sample_labels(e: dict, n: int, seed: int) -> dict:
    """n of the examples `e`, stratified: the prevalence of `e`, at least 2 of each class; all when
    n >= len."""
    if n >= len(e["label"]):
        return e
    rng = np.random.default_rng(10007 * seed + n)
    pos, neg = np.flatnonzero(e["label"] == 1), np.flatnonzero(e["label"] == 0)
    k = min(max(2, round(n * len(pos) / len(e["label"]))), len(pos), n - 2)
    picked = np.r_[rng.choice(pos, k, replace=False), rng.choice(neg, n - k, replace=False)]
    return select_rows(e, np.sort(picked))


def labelled_dataset(level: str, data: Processed, e: dict, cfg: FinetuneConfig):
    """The dataset of examples `e` (a select_rows dict) at a task level."""
    if level == "stay":
        return StayDataset(data, e["row"], e["label"])
    if level == "admission":
        return AdmissionDataset(data, e["row"], e["label"], max_stays=cfg.max_stays)
    return PatientDataset(data, e["subject_id"], e["cutoff"], e["label"], max_visits=cfg.max_visits)


def task_datasets(task: str, data: Processed, cfg: FinetuneConfig,
                  seed: int | None = None) -> tuple[dict, dict]:
    """Labelled dataset per split and the raw examples per split, the training split as replicate
    `seed` (default cfg.seed) sees it."""
    examples = task_examples(task, data, cfg, seed)
    return {s: labelled_dataset(task_level(task, data), data, e, cfg)
            for s, e in examples.items()}, examples


def replicate_sets(task: str, data: Processed, cfg: FinetuneConfig):
    """sets_for(seed) -> {split: dataset} of one replicate: its own training subset (train_subset
    with its seed) and the shared validation and test sets; each built once. Replicate `seed` of
    every init gets the same training subset, so that pretrained and scratch runs are paired."""
    examples, level, built = all_examples(task, data), task_level(task, data), {}
    fixed = {s: labelled_dataset(level, data, examples[s], cfg) for s in ("val", "test")}
    varies = cfg.labels is not None or cfg.label_fraction < 1.0

    def sets_for(seed: int) -> dict:
        key = seed if varies else None
        if key not in built:
            train = train_subset(examples["train"], cfg, seed)
            built[key] = {"train": labelled_dataset(level, data, train, cfg), **fixed}
        return built[key]
    return sets_for


# ------------------------------------------------------------------------------------------ models
def level_model(model: str, level: str) -> str | None:
    """The model that `--model model` runs at `level`: "medhmp" (MedHMP's encoder; at patient level
    the LSTM over visits, whose ICD MLP is MedHMP's), a baseline of that level, or None where it has
    none (a stay baseline at admission level). A sequence-model name picks the patient-level model
    and keeps MedHMP's encoders at the stay and admission levels."""
    if level == "patient":
        return "lstm" if model == "medhmp" else model if model in SEQUENCE_MODELS else None
    if model in BASELINES[level]:
        return model
    return "medhmp" if model in ("medhmp", *SEQUENCE_MODELS) else None


def build_model(task: str, init: str, cfg: FinetuneConfig, ckpts: Checkpoints,
                mcfg: ModelConfig | None = None, level: str | None = None) -> tuple[nn.Module, int]:
    """The fine-tuning model of `task` and the number of pretrained tensors loaded into it (0 for
    none); `mcfg` overrides the architecture that `ckpts` would give (benchmarks); `level` is the
    task's (task_level; default: the built-in task's)."""
    level, mcfg = level or TASKS[task].level, mcfg or ckpts.model_config(init)
    kind = level_model(cfg.model, level)
    if kind in BASELINES[level]:  # random weights only (evaluate_task skips a pretrained init)
        return BASELINES[level][kind](mcfg, dropout=cfg.dropout), 0
    encoder = new_encoder(level, mcfg)  # StayEncoder, AdmissionEncoder, or the ICD MLP over visits
    if level == "patient":
        model = SequenceClassifier(encoder, kind, mcfg, dropout=cfg.dropout)
    else:
        model = Classifier(encoder, dropout=cfg.dropout)
    if cfg.probe:  # the pretrained (or, for init=none, random) encoder stays as it is
        encoder.requires_grad_(False)
    if init == "none":
        return model, 0
    return model, transfer(encoder, ckpts.for_transfer(level, init), level, init)


# ---------------------------------------------------------------------------------------- training
@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device,
            amp: torch.dtype) -> np.ndarray:
    """Probabilities (n,) in dataset order (eval mode, no shuffling)."""
    model.eval()
    out = []
    for batch in make_loader(dataset, batch_size, pin_memory=device.type == "cuda"):
        with autocast(device, amp):
            out.append(torch.sigmoid(model(to_device(batch, device)).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def level_lrs(cfg: FinetuneConfig, level: str) -> tuple[float, ...]:
    """The fine-tuning learning rates to try at a level: `cfg.lr` when given, else
    (`cfg.lr_<level>`,)."""
    if cfg.lr is None:
        return (getattr(cfg, f"lr_{level}"),)
    return tuple(cfg.lr) if isinstance(cfg.lr, (tuple, list)) else (float(cfg.lr),)


def train_mode(model: nn.Module) -> None:
    """model.train(), except that submodules whose parameters are all frozen (a probe's encoder)
    stay in eval mode, so their dropout stays off."""
    model.train()
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


@dataclass
class BestEpoch:
    """The best validation score of one fine-tuning run so far, its epoch and its weights
    (copied)."""
    score: float = -math.inf
    epoch: int = 0
    weights: dict | None = None

    def update(self, model: nn.Module, score: float, epoch: int) -> None:
        if self.weights is None or score > self.score:  # ties keep the earlier epoch
            self.score, self.epoch = score, epoch
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(model: nn.Module, sets: dict, run: Run, seed: int, lr: float, advance=None) -> dict:
    """Train on sets["train"] at `lr`, early-stop on validation `select_on`, reload the best weights
    (in place); `advance(1, status=...)` after each epoch (a progress bar), when given."""
    cfg, device, amp = run.cfg, run.device, run.amp
    # fidelity: no learning-rate schedule (official train.py adds StepLR(5, 0.1), the paper none);
    # the official patient-level code trains with Adam and a 2-way softmax, here every level shares
    # SGD and BCE (paper App. B)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(amp)
    if isinstance(model, SequenceClassifier) and cfg.standardize_codes:
        model.standardize_codes(
            to_device(b, device) for b in make_loader(sets["train"], 4 * cfg.batch_size))
    y_val, select = sets["val"].labels.numpy(), METRIC_FUNCTIONS[cfg.select_on]
    best, epoch = BestEpoch(), 0
    for epoch in range(1, cfg.epochs + 1):
        train_mode(model)
        for batch in make_loader(sets["train"], cfg.batch_size, shuffle=True,
                                 seed=seed * 1000 + epoch, pin_memory=device.type == "cuda"):
            batch = to_device(batch, device)
            with autocast(device, amp):
                logits = model(batch)  # (B,)
            # BCE on logits = the official BCELoss(sigmoid(·)), without its log clamp at −100
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"])
            check_finite(loss, "fine-tuning loss", f"epoch {epoch} (seed {seed})")
            optimizer_step(loss, model, opt, scaler, cfg.grad_clip)
        score = select(y_val, predict(model, sets["val"], 4 * cfg.batch_size, device, amp))
        best.update(model, score, epoch)
        if advance:
            advance(1, status=f"val {cfg.select_on} {score:.3f} best {best.score:.3f} (epoch "
                              f"{best.epoch})")
        if epoch - best.epoch >= cfg.patience:
            break
    model.load_state_dict(best.weights)
    return {"epochs": epoch, "best_epoch": best.epoch, f"val_{cfg.select_on}": best.score}


def run_seeds(task: str, init: str, sets_for, run: Run, lr: float) -> tuple[list[dict], np.ndarray]:
    """Fine-tune every replicate of one (task, init) at `lr` (replicate i: seed cfg.seed + i for its
    training subset, weights, dropout and batch order; `sets_for(seed)` gives its datasets):
    per-replicate records and test probabilities (seeds, n)."""
    cfg, records, probs = run.cfg, [], []
    for i in range(cfg.seeds):
        seed, start = cfg.seed + i, time.perf_counter()
        sets = sets_for(seed)
        torch.manual_seed(seed)
        model, loaded = build_model(task, init, cfg, run.checkpoints,
                                    level=task_level(task, run.data))
        model.to(run.device)
        bar = run.rep.task(f"{task} init={init} seed {seed} lr {lr:g}", cfg.epochs, "epochs")
        with bar as advance:
            record = finetune(model, sets, run, seed, lr, advance)
        probs.append(predict(model, sets["test"], 4 * cfg.batch_size, run.device, run.amp))
        records.append({"seed": seed, "loaded_tensors": loaded, "n_train": len(sets["train"]),
                        "train_positives": int(sets["train"].labels.sum()), **record,
                        "test": binary_metrics(sets["test"].labels.numpy(), probs[-1]),
                        "seconds": round(time.perf_counter() - start, 2)})
    return records, np.stack(probs)


def run_init(task: str, init: str, sets_for, run: Run) -> tuple[dict, np.ndarray]:
    """Every replicate of one (task, init) at the learning rate of the grid with the best mean
    validation `select_on` (one rate: no choice): per-replicate records, mean ± sd, and per metric
    an interval that holds the replicates' and the test set's spread (metrics.replicate_interval);
    test probs (seeds, n)."""
    cfg, runs = run.cfg, {}
    y_test = sets_for(cfg.seed)["test"].labels.numpy()
    for lr in level_lrs(cfg, task_level(task, run.data)):
        runs[lr] = run_seeds(task, init, sets_for, run, lr)
    val = {lr: float(np.mean([r[f"val_{cfg.select_on}"] for r in recs]))
           for lr, (recs, _) in runs.items()}
    lr = max(val, key=val.get)  # ties keep the first rate of the grid
    records, probs = runs[lr]
    table = np.array([[r["test"][m] for m in METRICS] for r in records])  # (seeds, metrics)
    intervals = {m: replicate_interval(y_test, probs, METRIC_FUNCTIONS[m], n=cfg.bootstrap,
                                       seed=cfg.seed) for m in METRICS}
    sd = table.std(0, ddof=1) if len(table) > 1 else np.zeros_like(table[0])
    result = {"init": init, "lr": lr, "lr_val": {str(k): v for k, v in val.items()},
              "probe": cfg.probe, "seeds": records,
              "mean": dict(zip(METRICS, table.mean(0).tolist())),
              "sd": dict(zip(METRICS, sd.tolist())),
              "ci": {m: [iv["lo"], iv["hi"]] for m, iv in intervals.items()},
              "ci_method": f"{INTERVAL_METHOD}; {cfg.bootstrap} test resamples (nan with one seed)"}
    return result, probs


# ------------------------------------------------------------------------------------------ outputs
def _ids(task: str, data: Processed, examples: dict) -> dict:
    """subject/hadm/stay id columns of the test examples ('' where the level has none)."""
    level, rows, n = task_level(task, data), examples["row"], len(examples["label"])
    ids = {"subject_id": examples["subject_id"], "hadm_id": [""] * n, "stay_id": [""] * n}
    if level == "stay":
        ids.update(hadm_id=data.stays["hadm_id"].numpy()[rows],
                   stay_id=data.stays["stay_id"].numpy()[rows])
    elif level == "admission":
        ids["hadm_id"] = data.admissions["hadm_id"].numpy()[rows]
    return ids


# ------------------------------------------------------------------------------------------- entry
def evaluate_task(task: str, run: Run, labels_from: dict | None = None) -> dict:
    """Fine-tune and score one task for each init; writes its files and returns its report
    (`labels_from`: how a custom task's labels were read, meds_labels.CustomTask.info)."""
    cfg, data, level = run.cfg, run.data, task_level(task, run.data)
    sets_for, examples = replicate_sets(task, data, cfg), task_examples(task, data, cfg)
    # the training split as replicate 0 sees it (each replicate: its "n_train")
    stats = split_stats(examples)
    inits = [cfg.init] + (["none"] if cfg.compare_none and cfg.init != "none" else [])
    kind = level_model(cfg.model, level)
    model = kind + ("-probe" if cfg.probe else "")
    report = {"task": task, "level": level, "model": model, "config": config_record(cfg),
              "splits": stats, **({"labels_from": labels_from} if labels_from else {}),
              "results": {}}
    probs, cohort_reason = {}, skip_reason(stats)
    for init in inits:
        reason = cohort_reason
        if reason is None and init != "none" and kind in BASELINES[level]:
            reason = f"{kind} is a baseline without pretrained weights; it runs init=none only"
        elif reason is None and init != "none" and (level, init) not in TRANSFERS:
            reason = (f"RUN/{init}.pt has no encoder for {level}-level tasks; use --init admission "
                      "or none")
        if reason is not None:
            report["results"][f"{init}/{model}"] = {"init": init, "skipped": reason}
            run.rep.log(f"{task} init={init}: skipped ({reason})")
            continue
        report["results"][f"{init}/{model}"], probs[init] = run_init(task, init, sets_for, run)
    deltas = paired_deltas(examples["test"]["label"], probs, "none", cfg.bootstrap, cfg.seed)
    for init, intervals in deltas.items():
        report["results"][f"{init}/{model}"].update(delta_record(intervals))
    write_task(task, report, probs, _ids(task, data, examples["test"]), examples["test"]["label"])
    return report


def check_options(cfg: FinetuneConfig, choices: tuple = ("task", "init", "model",
                                                          "select_on")) -> None:
    """One InputError line, before any work, for an option outside its choices (`choices`: the
    fields checked), a seed the generators cannot take, or two options that contradict."""
    allowed = {"task": [*TASKS, "all"], "init": INITS, "model": MODELS, "select_on": METRICS}
    for name in choices:
        if getattr(cfg, name) not in allowed[name]:
            raise InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of "
                             f"{', '.join(allowed[name])}")
    check_seed(cfg.seed)
    if cfg.labels is not None and cfg.label_fraction < 1.0:
        raise InputError(f"--labels {cfg.labels} and --label-fraction {cfg.label_fraction:g} both "
                         "choose the training examples; give one of them")


def evaluate(cfg: FinetuneConfig) -> dict:
    """Evaluate `cfg.task` (or every task, or the custom task of cfg.labels_from); returns {task:
    report} and prints the results table."""
    tasks = _builtin_tasks(cfg)
    run = Run.open(cfg, "eval", tasks)
    sources = dict([custom_task(run)]) if cfg.labels_from is not None else {}
    tasks += list(sources)
    run.rep.log(f"evaluating {', '.join(tasks)} on {cfg.data} (init={cfg.init}, seeds={cfg.seeds}, "
                f"device {run.device}, {str(run.amp).replace('torch.', '')})")
    reports = {t: evaluate_task(t, run, sources.get(t)) for t in tasks}
    if cfg.table:
        print_table(*results_table(reports), run.rep, f"MedHMP downstream results ({cfg.data})")
        for line in skipped_lines(reports):
            run.rep.log(line)
    run.rep.log(f"wrote {Path(cfg.run) / 'eval'} and {Path(cfg.run) / 'results.csv'}")
    return reports


def _builtin_tasks(cfg: FinetuneConfig) -> list[str]:
    """The built-in tasks `cfg` asks for (none with labels_from), after checking its options; a bad
    one is an InputError, before any data is read."""
    check_options(cfg)
    if cfg.labels_from is None and (cfg.level or cfg.task_name):
        raise InputError("--level and --task-name name a custom task: give --labels-from too")
    baseline_level = next((lv for lv, models in BASELINES.items() if cfg.model in models), None)
    if baseline_level and cfg.probe:
        raise InputError(f"--model {cfg.model} is a {baseline_level}-level baseline: it has no "
                         "pretrained encoder to probe")
    if cfg.labels_from is not None:
        return []
    # a baseline runs at its own level only: --task all keeps that level's tasks
    tasks = [t for t in (TASKS if cfg.task == "all" else [cfg.task])
             if level_model(cfg.model, TASKS[t].level)]
    if not tasks:
        raise InputError(f"--model {cfg.model} is a {baseline_level}-level baseline: it cannot run "
                         f"--task {cfg.task}")
    return tasks


def custom_task(run: Run) -> tuple[str, dict]:
    """The task of --labels-from, added to run.data's labels: (its name, how its labels were read:
    meds_labels.CustomTask.info, for RUN/eval/<name>.json)."""
    import meds_labels   # here only: MEDS labels need pyarrow, an optional dependency
    cfg = run.cfg
    custom = meds_labels.read_task(cfg.labels_from, run.data, cfg.level, cfg.task_name)
    for line in custom.lines():
        run.rep.log(line)
    if not level_model(cfg.model, custom.level):
        raise InputError(f"--model {cfg.model} does not run at the {custom.level} level, the level "
                         f"of --labels-from {cfg.labels_from}")
    run.data.labels[custom.name] = custom.examples
    return custom.name, custom.info
