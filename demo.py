"""Demo: the whole MedHMP pipeline on a synthetic cohort, in a few minutes on a laptop CPU.

Usage: python medhmp.py demo [--out runs/demo] [--patients 400] [--seed 0]
Writes under OUT: raw/ (a synthetic MIMIC-III extract), processed/, run/ (stay.pt, admission.pt,
eval/, results.csv), and for the patient-level tasks on a diagnosis extract
trinetx/{raw,processed,run}/ (the TriNetX-style extract is preprocessed with the MIMIC code
vocabulary, so the pretrained ICD MLP applies). Pretrains twice: on the cohort (MedHMP) and, as a
negative control, on a copy whose columns are each shuffled across patients (control/; frequencies
kept, co-occurrence destroyed), printing each stage's verdict against its no-learning baselines.
Ends with two tables: every task with all training labels, pretrained (init=admission) against the
same model from scratch; and every task with `labels` training examples, from scratch against MedHMP
against the control, with paired Δ CIs (also OUT/low_label.json). About 9 minutes on a 2-core CPU.
It is its own module because it chains every stage (synthetic → data → train → evaluate) with sizes
of its own; each stage's defaults stay the paper's. OUT is locked for the run (folders.Locked), and
what demo replaces there that a user may have made too (`PRODUCTS`: checkpoints, processed folders,
extracts) is replaced only when demo wrote it, as its marker `OUT/.medhmp-demo` records, or with
`--overwrite`; anything else is refused before any work (`check_out`).
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checkpoints
import data
import evaluate
import results
import runtime
import synthetic
import train
from folders import InputError, Locked, replace_file
from preprocessing import pipeline
from progress import Reporter

# written by demo into OUT: the facts (data.file_facts) of each of PRODUCTS it wrote
MARKER = ".medhmp-demo"
# what demo writes under OUT that could also be a user's own work: replaced only when MARKER holds
# its facts (demo wrote it, and nothing changed it since) or with --overwrite (a processed folder
# stands for its meta.json)
PRODUCTS = ("processed/meta.json", "run/stay.pt", "run/admission.pt",
            "control/processed/meta.json", "control/run/stay.pt", "control/run/admission.pt",
            "trinetx/processed/meta.json", "trinetx/run/admission.pt",
            "trinetx/control/admission.pt", "low_label.json")
EXTRACTS = ("raw", "trinetx/raw")    # replaced by synth, which has a marker of its own


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    patients: int = 400
    seed: int = 0
    # demo sizes, not the paper's, so that the demo (with its shuffled control) ends in under 10
    # minutes on a 2-core CPU (docs/results.md)
    # (paper: d = 256, 200 + 300 pretraining epochs, 5 seeds of up to 30 fine-tuning epochs)
    d_model: int = 64                 # paper 256; 64 fine-tunes ~6x faster per sample on a CPU
    stay_epochs: int = 40             # stage 1 reconstruction, batch 32, early-stopped
    stay_batch_size: int = 32
    stay_lr: float = 1e-3             # paper 5e-4 at batch 128 for 200 epochs; 2e-3 made b collapse
    admission_epochs: int = 15        # stage 2: validation loss lowest at ~12, then rises
    admission_batch_size: int = 64    # paper 4096; in-batch negatives only need a few dozen here
    admission_lr: float = 1e-3        # paper 2e-5 is for batch 4096, 300 epochs, 99k admissions
    pretrain_patience: int = 5        # validation passes without improvement before a stage stops
    seeds: int = 3                    # fine-tuning seeds per (task, init); paper 5
    labels: int = 50                  # training examples per task in the low-label comparison
    bootstrap: int = 1000             # resamples of the paired Δ CIs
    epochs: int = 12                  # fine-tuning epochs; paper at most 30
    patience: int = 5                 # paper App. B
    trinetx: bool = True              # also run hf/copd/amnesia on a TriNetX-style extract
    trinetx_patients: int = 600
    # FIDDLE's 70/15/15 by patient: 400 patients leave ~60 test patients instead of the default's 40
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # torch CPU threads (0: torch's default): these ops are tiny, and on a busy 2-core machine two
    # spin-waiting threads ran fine-tuning 7x slower than one
    threads: int = 1
    device: str = "auto"
    overwrite: bool = False           # replace outputs in OUT that demo did not write (PRODUCTS)
    quiet: bool = False


def _finetune_config(cfg: DemoConfig, **where) -> evaluate.FinetuneConfig:
    return evaluate.FinetuneConfig(init="admission", compare_none=True, seeds=cfg.seeds,
                                   seed=cfg.seed, epochs=cfg.epochs, patience=cfg.patience,
                                   device=cfg.device, table=False, quiet=cfg.quiet, **where)


def _stages(cfg: DemoConfig, processed: Path, run: Path, quiet: bool) -> list:
    """The two pretraining stages' configs, into `run` (one checkpoint per stage, at its end)."""
    common = dict(data=processed, run=run, d_model=cfg.d_model, device=cfg.device, seed=cfg.seed,
                  quiet=quiet, checkpoint_every=10 ** 9, patience=cfg.pretrain_patience,
                  overwrite=True)
    return [train.StayPretrainConfig(epochs=cfg.stay_epochs, batch_size=cfg.stay_batch_size,
                                     lr=cfg.stay_lr, **common),
            train.AdmissionPretrainConfig(epochs=cfg.admission_epochs,
                                          batch_size=cfg.admission_batch_size, lr=cfg.admission_lr,
                                          **common)]


def _pretrain(stages: list, threads: int) -> list[str]:
    """Run the stages in order with `threads` torch threads (0: as is); returns each stage's health
    verdict."""
    torch.set_num_threads(threads or torch.get_num_threads())
    return [train.pretrain(stage)["verdict"] for stage in stages]


def _mimic(cfg: DemoConfig) -> tuple[dict, dict]:
    """Synthetic MIMIC-III cohort → preprocess → pretrain (and the shuffled control) → every task
    with all training labels (pretrained vs scratch) and with `cfg.labels` of them (pretrained vs
    scratch vs control)."""
    out = Path(cfg.out)
    raw, processed, run = out / "raw", out / "processed", out / "run"
    synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=cfg.patients, seed=cfg.seed,
                                               overwrite=cfg.overwrite, quiet=cfg.quiet))
    pipeline.preprocess(pipeline.PreprocessConfig(raw=raw, out=processed, split=cfg.split,
                                                  seed=cfg.seed, quiet=cfg.quiet))
    d = data.load_processed(processed)
    pool = np.concatenate([d.splits["train"], d.splits["val"]])  # shuffled among themselves
    shuffled = data.shuffle_columns(d, pool, cfg.seed)
    control = data.write_view(processed, out / "control" / "processed", d.splits, shuffled)
    # the control pretrains in a second process (quiet; its verdicts printed after), MedHMP here
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        stages = _stages(cfg, control, out / "control" / "run", quiet=True)
        job = pool.submit(_pretrain, stages, cfg.threads)
        _pretrain(_stages(cfg, processed, run, cfg.quiet), cfg.threads)
        rep = Reporter(cfg.quiet)
        for verdict in job.result():
            rep.log(f"shuffled control, {verdict}")
    full = evaluate.evaluate(_finetune_config(cfg, task="all", data=processed, run=run))
    few = {t: low_label(cfg, t, d, run, out / "control" / "run") for t in evaluate.TASKS}
    return full, few


def _trinetx(cfg: DemoConfig) -> tuple[dict, dict]:
    """The patient-level tasks on a diagnosis extract, coded over the MIMIC vocabulary, from the
    MIMIC checkpoints (copied into run folders of its own so results.csv rows do not collide)."""
    out = Path(cfg.out)
    raw, processed = out / "trinetx" / "raw", out / "trinetx" / "processed"
    synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=cfg.trinetx_patients,
                                               layout="trinetx", seed=cfg.seed,
                                               overwrite=cfg.overwrite, quiet=cfg.quiet))
    # --icd 9: the MIMIC-III vocabulary knows no ICD-10 code, so the extract's ICD-10 encounters
    # would be empty visits (docs/preprocessing.md, Inputs); its cases diagnosed after their switch
    # to ICD-10 are left out instead
    pipeline.preprocess(pipeline.PreprocessConfig(raw=raw, out=processed, split=cfg.split,
                                                  seed=cfg.seed, icd="9",
                                                  vocab_from=out / "processed", quiet=cfg.quiet))
    runs = {}
    for name, source in (("run", out / "run"), ("control", out / "control" / "run")):
        runs[name] = out / "trinetx" / name
        runs[name].mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "admission.pt", runs[name] / "admission.pt")
    d = data.load_processed(processed)
    tasks = [t for t, spec in evaluate.TASKS.items() if spec.level == "patient"]
    full = {}
    for task in tasks:
        fcfg = _finetune_config(cfg, task=task, data=processed, run=runs["run"])
        full.update(evaluate.evaluate(fcfg))
    few = {t: low_label(cfg, t, d, runs["run"], runs["control"]) for t in tasks}
    return ({f"{t} (trinetx)": r for t, r in full.items()},
            {f"{t} (trinetx)": r for t, r in few.items()})


# ----------------------------------------------------------------------------------- low-label runs
ARMS = {"scratch": ("run", "none"), "MedHMP": ("run", "admission"),
        "shuffled control": ("control", "admission")}


def low_label(cfg: DemoConfig, task: str, d: data.Processed, run: Path, control: Path) -> dict:
    """One task fine-tuned on `cfg.labels` stratified training examples from scratch, from MedHMP's
    checkpoint and from the shuffled control's, the same examples and seeds for each; the paired Δ
    AUROC of the two pretrained arms against scratch. {"n_train", "n_test", arm: result, "delta":
    {arm: [Δ, lo, hi]}}."""
    fcfg = _finetune_config(cfg, task=task, data=d.root, run=run, labels=cfg.labels)
    sets_for = evaluate.replicate_sets(task, d, fcfg)
    examples = evaluate.task_examples(task, d, fcfg)
    stats = {s: (len(e["label"]), int(e["label"].sum())) for s, e in examples.items()}
    if any(pos in (0, n) for n, pos in stats.values()):
        return {"skipped": "a split without both classes"}
    rep, device = Reporter(quiet=True), runtime.resolve_device(cfg.device)
    runs = {name: evaluate.Run(fcfg, d, checkpoints.Checkpoints(folder, d.meta), device,
                               torch.float32, rep)
            for name, folder in (("run", run), ("control", control))}
    out, probs = {"n_train": stats["train"][0], "n_test": stats["test"][0]}, {}
    for arm, (where, init) in ARMS.items():
        out[arm], probs[arm] = evaluate.run_init(task, init, sets_for, runs[where])
    deltas = results.paired_deltas(examples["test"]["label"], probs, "scratch", cfg.bootstrap,
                                   cfg.seed, ("auroc",))
    out["delta"] = {arm: [iv["auroc"][k] for k in ("estimate", "lo", "hi")]
                    for arm, iv in deltas.items()}
    return out


def low_label_table(few: dict) -> tuple[list, list]:
    header = ["task", "n train / test", *[f"AUROC {a}" for a in ARMS], "Δ MedHMP [95% CI]",
              "Δ control [95% CI]"]
    rows = []
    for task, r in few.items():
        if "skipped" in r:
            rows.append([task, "skipped", r["skipped"]] + [""] * (len(header) - 3))
            continue
        rows.append([task, f"{r['n_train']} / {r['n_test']}",
                     *[f"{r[a]['mean']['auroc']:.3f} ±{r[a]['sd']['auroc']:.3f}" for a in ARMS],
                     *[f"{d:+.3f} {results.interval_text(lo, hi, signed=True)}"
                       for d, lo, hi in (r["delta"][a] for a in list(ARMS)[1:])]])
    return header, rows


# ------------------------------------------------------------------------------------ OUT's files
def _recorded(out: Path) -> dict:
    """{product: facts} of MARKER ({} without one, or a damaged one)."""
    try:
        recorded = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def check_out(cfg: DemoConfig) -> None:
    """Before any work: each of PRODUCTS already in OUT is one demo wrote and nothing changed since,
    and each extract folder is synth's; else one InputError line naming it (--overwrite: none)."""
    out = Path(cfg.out)
    if cfg.overwrite or not out.is_dir():
        return
    recorded = _recorded(out)
    for name in PRODUCTS:
        path = out / name
        if path.is_file() and recorded.get(name) != data.file_facts(path):
            what = "its folder" if name.endswith("meta.json") else "it"
            raise InputError(f"{path}: demo did not write {what} (or it changed since); pass "
                             "--overwrite to replace it, or choose another --out")
    for name in EXTRACTS:
        folder = out / name
        if folder.is_dir() and any(folder.iterdir()) and not (folder / synthetic.MARKER).is_file():
            raise InputError(f"{folder}: holds files synth did not write; pass --overwrite to "
                             "replace the extract, or choose another --out")


def record(out: Path, since: float) -> None:
    """MARKER: the facts of each of PRODUCTS that demo wrote, in this run (modified at or after
    `since`) or in an earlier one (recorded, unchanged); a file that --overwrite found but this run
    did not replace is not recorded."""
    recorded, facts = _recorded(out), {}
    for name in PRODUCTS:
        path = out / name
        if path.is_file() and (path.stat().st_mtime >= since
                               or recorded.get(name) == data.file_facts(path)):
            facts[name] = data.file_facts(path)
    if out.is_dir():
        replace_file(out / MARKER, lambda tmp: tmp.write_text(json.dumps(facts, indent=1)))


# -------------------------------------------------------------------------------------------- entry
def demo(cfg: DemoConfig) -> dict:
    """Run the demo, OUT locked and checked (check_out) before any work; returns {"full": {task:
    report}, "few": {task: low-label result}} (TriNetX-style tasks as '<task> (trinetx)') and
    prints both tables; the low-label one is also written to OUT/low_label.json."""
    runtime.check_seed(cfg.seed)
    with Locked(cfg.out, "--out"):
        check_out(cfg)
        since = time.time() - 1     # file times may be rounded to the second
        try:
            return _demo(cfg)
        finally:                    # also after Ctrl-C: what this run wrote is demo's
            record(Path(cfg.out), since)


def _demo(cfg: DemoConfig) -> dict:
    """The demo's stages and tables (`demo`, with OUT locked and checked)."""
    rep, start, threads = Reporter(cfg.quiet), time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        full, few = _mimic(cfg)
        if cfg.trinetx:
            more = _trinetx(cfg)
            full, few = {**full, **more[0]}, {**few, **more[1]}
    finally:
        torch.set_num_threads(threads)
    header, rows = results.results_table(full)
    title = (f"MedHMP demo ({cfg.patients} synthetic patients), all training labels: pretrained "
             "(init=admission) vs from scratch (init=none), test split")
    results.print_table(header, rows, rep, title)
    for line in results.skipped_lines(full):
        rep.log(line)
    title = (f"{cfg.labels} training labels per task: from scratch, MedHMP, and MedHMP pretrained "
             "on the shuffled pool (negative control)")
    results.print_table(*low_label_table(few), rep, title)
    rep.log(f"what this shows: a {cfg.patients}-patient demo shows that every stage runs and says "
            f"whether it learned; with test splits of a few dozen examples and {cfg.seeds} seeds "
            "its intervals (which hold the seed and test-set spread) are too wide to say whether "
            "pretraining helps: bench/transfer.py answers that (docs/results.md)")
    (Path(cfg.out) / "low_label.json").write_text(json.dumps(few, indent=1, default=float))
    rep.log(f"demo finished in {time.perf_counter() - start:.0f} s; results in "
            f"{Path(cfg.out) / 'run' / 'results.csv'}"
            + (f" and {Path(cfg.out) / 'trinetx' / 'run' / 'results.csv'}" if cfg.trinetx else "")
            + f", low-label comparison in {Path(cfg.out) / 'low_label.json'}")
    return {"full": full, "few": few}
