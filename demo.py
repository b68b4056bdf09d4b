"""Demo: the whole MedHMP pipeline on a synthetic cohort, in a few minutes on a laptop CPU.

Usage: python medhmp.py demo [--out runs/demo] [--patients 400] [--seed 0]
Writes under OUT: raw/ (a synthetic MIMIC-III extract), processed/, run/ (stay.pt, admission.pt, eval/,
results.csv), and for the patient-level tasks on a diagnosis extract trinetx/{raw,processed,run}/ (the
TriNetX-style extract is preprocessed with the MIMIC code vocabulary, so the pretrained ICD MLP applies).
Ends with one table of every task: pretrained (init=admission) against the same model from scratch.
It is its own module because it chains every stage (synthetic → data → train → evaluate) with sizes of
its own; each stage's defaults stay the paper's.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import evaluate
import results
import synthetic
import train
from preprocessing import pipeline
from progress import Reporter


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    patients: int = 400
    seed: int = 0
    # demo sizes, not the paper's: the default demo ends in 3-4 minutes on 2 busy CPU cores
    # (paper: d = 256, 200 + 300 pretraining epochs, 5 seeds of up to 30 fine-tuning epochs)
    d_model: int = 64                 # paper 256; 64 fine-tunes ~6x faster per sample on a CPU (bench/evaluate.py)
    stay_epochs: int = 60             # stage 1 reconstruction, batch 32: ~15 epochs only learn the average
    #                                   pattern; by 60 the stay vectors carry the patient (models.StayPretrainer)
    stay_batch_size: int = 32
    stay_lr: float = 1e-3             # paper 5e-4 at batch 128 over 200 epochs; 2e-3 made b collapse here
    admission_epochs: int = 15        # stage 2 MCP + contrastive: validation loss lowest at ~12, then rises
    admission_batch_size: int = 64    # paper 4096; in-batch negatives only need a few dozen here
    admission_lr: float = 1e-3        # paper 2e-5 is for batch 4096 over 300 epochs on 99k admissions
    seeds: int = 3                    # fine-tuning seeds per (task, init); paper 5
    epochs: int = 15                  # fine-tuning epochs; paper at most 30
    patience: int = 5                 # paper App. B
    trinetx: bool = True              # also run hf/copd/amnesia on a TriNetX-style diagnosis extract
    trinetx_patients: int = 600
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  # FIDDLE's 70/15/15 by patient: 400 patients leave
    #                                                        ~60 test patients instead of the default's 40
    threads: int = 1                  # torch CPU threads (0: torch's default): these ops are tiny, and on a busy
    #                                   2-core machine two spin-waiting threads ran fine-tuning 7x slower than one
    device: str = "auto"
    quiet: bool = False


def _finetune_config(cfg: DemoConfig, **where) -> evaluate.FinetuneConfig:
    return evaluate.FinetuneConfig(init="admission", compare_none=True, seeds=cfg.seeds, seed=cfg.seed,
                                   epochs=cfg.epochs, patience=cfg.patience, device=cfg.device, table=False,
                                   quiet=cfg.quiet, **where)


def _mimic(cfg: DemoConfig) -> dict:
    """Synthetic MIMIC-III cohort → preprocess → pretrain stay → pretrain admission → evaluate every task."""
    out = Path(cfg.out)
    raw, processed, run = out / "raw", out / "processed", out / "run"
    synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=cfg.patients, seed=cfg.seed, quiet=cfg.quiet))
    pipeline.preprocess(pipeline.PreprocessConfig(raw=raw, out=processed, split=cfg.split, seed=cfg.seed, quiet=cfg.quiet))
    # one checkpoint per stage, written at its end (a run of a few minutes needs no intermediate ones)
    common = dict(data=processed, run=run, d_model=cfg.d_model, device=cfg.device, seed=cfg.seed, quiet=cfg.quiet,
                  checkpoint_every=10 ** 9)
    train.pretrain(train.StayPretrainConfig(epochs=cfg.stay_epochs, batch_size=cfg.stay_batch_size, lr=cfg.stay_lr,
                                            **common))
    train.pretrain(train.AdmissionPretrainConfig(epochs=cfg.admission_epochs, batch_size=cfg.admission_batch_size,
                                                 lr=cfg.admission_lr, **common))
    return evaluate.evaluate(_finetune_config(cfg, task="all", data=processed, run=run))


def _trinetx(cfg: DemoConfig) -> dict:
    """The patient-level tasks on a diagnosis extract, coded over the MIMIC vocabulary, from the MIMIC
    admission checkpoint (copied into its own run folder so results.csv rows do not collide)."""
    out = Path(cfg.out)
    raw, processed, run = out / "trinetx" / "raw", out / "trinetx" / "processed", out / "trinetx" / "run"
    synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=cfg.trinetx_patients, layout="trinetx",
                                               seed=cfg.seed, quiet=cfg.quiet))
    pipeline.preprocess(pipeline.PreprocessConfig(raw=raw, out=processed, split=cfg.split, seed=cfg.seed,
                                          vocab_from=out / "processed", quiet=cfg.quiet))
    run.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "run" / "admission.pt", run / "admission.pt")
    reports = {}
    for task in (t for t, spec in evaluate.TASKS.items() if spec.level == "patient"):
        reports.update(evaluate.evaluate(_finetune_config(cfg, task=task, data=processed, run=run)))
    return {f"{t} (trinetx)": r for t, r in reports.items()}


def demo(cfg: DemoConfig) -> dict:
    """Run the demo; returns {task: report} (TriNetX-style tasks as '<task> (trinetx)') and prints the table."""
    rep, start, threads = Reporter(cfg.quiet), time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        reports = _mimic(cfg)
        if cfg.trinetx:
            reports.update(_trinetx(cfg))
    finally:
        torch.set_num_threads(threads)
    header, rows = results.results_table(reports)
    results.print_table(header, rows, rep, f"MedHMP demo ({cfg.patients} synthetic patients): pretrained "
                                            "(init=admission) vs from scratch (init=none), test split")
    for line in results.skipped_lines(reports):
        rep.log(line)
    rep.log(f"demo finished in {time.perf_counter() - start:.0f} s; results in {Path(cfg.out) / 'run' / 'results.csv'}"
            + (f" and {Path(cfg.out) / 'trinetx' / 'run' / 'results.csv'}" if cfg.trinetx else ""))
    return reports
