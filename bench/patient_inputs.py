"""Why patient-level transfer needed standardised visit embeddings (`standardize_codes`).

Usage: python bench/patient_inputs.py [--out runs/transfer] [--rows hf,hf (trinetx)] [--labels 25]
    [--jobs 2]
Reads a finished `python bench/transfer.py` folder (its processed data, checkpoints and cached
scratch runs) and prints one JSON line per measurement:
  scale    the visit embeddings of the test patients from the ICD MLP with random weights,
           MedHMP's and the shuffled control's: mean |x| and the mean per-dimension sd over
           patients;
  variant  MedHMP fine-tuned at `labels` training examples in three ways: "as is" (the paper's
           wiring, no standardisation), "frozen as is" (the ICD MLP frozen, only the sequence model
           trained) and "standardised" (the default), each with the learning rate chosen on
           validation from the grid of bench/transfer.py and 3 pretraining x 3 fine-tuning seeds;
           Δ AUROC against the transfer run's scratch arm on the same test examples (paired
           bootstrap over test examples and pretraining seeds).
If "as is" loses to scratch while the probe of the same code space gains (bench/transfer.py), and
"frozen as is" loses too, the pretrained weights are not washed out by fine-tuning: the sequence
model cannot use them as they are. About 3 minutes with 2 jobs on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/evaluate.py must not shadow evaluate.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import transfer  # noqa: E402
from checkpoints import Checkpoints  # noqa: E402
from metrics import auroc, paired_delta  # noqa: E402
from progress import Reporter  # noqa: E402

VARIANTS = {"as is": dict(standardize_codes=False),
            "frozen as is": dict(standardize_codes=False, probe=True),
            "standardised": dict(standardize_codes=True)}


def finetune(cfg: transfer.TransferConfig, row: str, n: int, variant: str, pt: int, ft: int,
             lr: float) -> dict:
    """MedHMP (pretraining seed `pt`) fine-tuned on `n` examples (subset `ft`) as `variant`: val
    AUPRC, test probs."""
    torch.set_num_threads(1)
    fcfg = evaluate.FinetuneConfig(task=transfer._task(row), epochs=cfg.epochs,
                                   patience=cfg.patience, quiet=True)
    fcfg = replace(fcfg, **VARIANTS[variant])
    d, ex = transfer._examples(cfg, row, fcfg)
    ex["train"] = transfer.subset(ex["train"], n, ft)
    sets = {s: evaluate.labelled_dataset("patient", d, e, fcfg) for s, e in ex.items()}
    torch.manual_seed(ft)
    ckpts = Checkpoints(transfer._ckpt_dir(cfg, "medhmp", pt), d.meta)
    model, _ = evaluate.build_model(fcfg.task, "admission", fcfg, ckpts)
    cpu = torch.device("cpu")
    run = evaluate.Run(fcfg, d, ckpts, cpu, torch.float32, Reporter(quiet=True))
    rec = evaluate.finetune(model, sets, run, ft, lr)
    return {"val": rec["val_auprc"],
            "test": evaluate.predict(model, sets["test"], 256, cpu, torch.float32)}


def scratch_rows(cfg: transfer.TransferConfig, row: str, n: int) -> np.ndarray:
    """The transfer run's scratch arm at its chosen learning rate: (fine-tuning seeds, test
    examples)."""
    folder = transfer._cache(cfg, row, n, "scratch", 0, 0, 1.0).parent
    lr = folder.glob("scratch-p0-f1-*.npz").__next__().name.rsplit("-", 1)[1][:-4]
    return np.stack([np.load(folder / f"scratch-p0-f{ft}-{lr}.npz")["test"]
                     for ft in range(cfg.finetune_seeds)])


def scale(cfg: transfer.TransferConfig) -> None:
    d = transfer._data(cfg, "mimic")
    ex = evaluate.task_examples("hf", d, evaluate.FinetuneConfig())
    for arm in ("random", "medhmp", "shuffled"):
        # (n, D)
        x = transfer.embed(transfer.encoder(cfg, "patient", arm, 0, d), "patient", d, ex["test"])
        print(json.dumps({"kind": "scale", "arm": arm,
                          "mean_abs": round(float(np.abs(x).mean()), 4),
                          "mean_sd": round(float(x.std(0).mean()), 4)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=transfer.TransferConfig.out)
    parser.add_argument("--rows", default="hf,hf (trinetx)")
    parser.add_argument("--labels", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    cfg, n = transfer.TransferConfig(out=args.out), args.labels
    lrs = transfer.TransferConfig().lrs["patient"]
    torch.set_num_threads(1)
    scale(cfg)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in args.rows.split(","):
            y = evaluate.task_examples(transfer._task(row), transfer._data(cfg, transfer.ROWS[row]),
                                       evaluate.FinetuneConfig())["test"]["label"]
            base = scratch_rows(cfg, row, n)
            for variant in VARIANTS:
                grid = {lr: pool.submit(finetune, cfg, row, n, variant, 0, 0, lr) for lr in lrs}
                lr = max(lrs, key=lambda r: grid[r].result()["val"])
                seeds = [(pt, ft) for pt in range(cfg.pretrain_seeds)
                         for ft in range(cfg.finetune_seeds)]
                jobs = [grid[lr] if (pt, ft) == (0, 0) else
                        pool.submit(finetune, cfg, row, n, variant, pt, ft, lr)
                        for pt, ft in seeds]
                probs = np.stack([j.result()["test"] for j in jobs])
                delta, lo, hi = paired_delta(y, probs, base, auroc, cfg.bootstrap, cfg.seed,
                                             groups=[pt for pt, _ in seeds])
                record = {"kind": "variant", "task": row, "labels": n, "variant": variant,
                          "lr": lr, "auroc": round(float(np.mean([auroc(y, p) for p in probs])), 4),
                          "scratch_auroc": round(float(np.mean([auroc(y, p) for p in base])), 4),
                          "delta_auroc": round(delta, 4),
                          "delta_auroc_ci": [round(lo, 4), round(hi, 4)]}
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
