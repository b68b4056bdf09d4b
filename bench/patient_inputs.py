"""Why patient-level transfer needed standardised visit embeddings (`standardize_codes`).

Usage: python bench/patient_inputs.py [--out runs/transfer] [--seed 1] [--rows hf,hf (trinetx)]
    [--labels 25] [--jobs 2]
Reads a finished `python bench/transfer.py` folder of the same --seed (its processed data,
checkpoints and scratch runs) and prints one JSON line per measurement:
  scale    the visit embeddings of the test patients from the ICD MLP with random weights, MedHMP's
           and the shuffled control's: mean |x| and the mean per-dimension sd over patients;
  variant  MedHMP fine-tuned at `labels` training examples in three ways: "as is" (the paper's
           wiring, no standardisation), "frozen as is" (the ICD MLP frozen, only the sequence model
           trained) and "standardised" (the default), replicate r as the transfer bench runs it
           (label subset and seed r, pretraining seed r mod pretrain_seeds, the learning rate fixed
           in advance); Δ AUROC against the transfer run's scratch arm, paired by replicate
           (metrics.replicate_interval's interval).
If "as is" loses to scratch while the probe of the same code space gains (bench/transfer.py), and
"frozen as is" loses too, the pretrained weights are not washed out by fine-tuning: the sequence
model cannot use them as they are. The standardisation was chosen on the development world (seed 0)
before the replicate design; run this on another seed to see whether it holds there.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/evaluate.py must not shadow evaluate.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import transfer  # noqa: E402
from metrics import auroc, replicate_interval  # noqa: E402
from progress import Reporter  # noqa: E402

VARIANTS = {"as is": dict(standardize_codes=False),
            "frozen as is": dict(standardize_codes=False, probe=True),
            "standardised": dict(standardize_codes=True)}


def finetune(cfg: transfer.TransferConfig, row: str, n: int, variant: str, r: int) -> np.ndarray:
    """Test probabilities of MedHMP fine-tuned as `variant` in replicate r (as
    transfer.finetune_one)."""
    torch.set_num_threads(1)
    task = transfer._task(row)
    d, ex = transfer.examples(cfg, row, n, r)
    fcfg = replace(evaluate.FinetuneConfig(task=task, epochs=cfg.epochs, patience=cfg.patience,
                                           batch_size=cfg.batch_size, quiet=True),
                   **VARIANTS[variant])
    sets = {s: evaluate.labelled_dataset("patient", d, e, fcfg) for s, e in ex.items()}
    torch.manual_seed(r)
    ckpts = transfer._checkpoints(cfg, "medhmp", r, d.meta)
    model, _ = evaluate.build_model(task, "admission", fcfg, ckpts, ckpts.model_config("admission"))
    run = evaluate.Run(fcfg, d, ckpts, torch.device("cpu"), torch.float32, Reporter(quiet=True))
    evaluate.finetune(model, sets, run, r, cfg.lrs["patient"])
    return evaluate.predict(model, sets["test"], 256, run.device, run.amp)


@torch.no_grad()
def scale(cfg: transfer.TransferConfig) -> None:
    d = transfer._data(cfg, "mimic")
    ex = evaluate.task_examples("hf", d, evaluate.FinetuneConfig())
    ds = evaluate.labelled_dataset("patient", d, ex["test"], evaluate.FinetuneConfig())
    for arm in ("random", "medhmp", "shuffled"):
        enc = transfer.encoder(cfg, "patient", arm, 0, d)
        x = torch.cat([transfer.represent(enc, "patient", b)
                       for b in transfer.data.make_loader(ds, 256)]).numpy()
        print(json.dumps({"kind": "scale", "arm": arm,
                          "mean_abs": round(float(np.abs(x).mean()), 4),
                          "mean_sd": round(float(x.std(0).mean()), 4)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=transfer.TransferConfig.out)
    parser.add_argument("--seed", type=int, default=transfer.TransferConfig.seed)
    parser.add_argument("--rows", default="hf,hf (trinetx)")
    parser.add_argument("--labels", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="read a `transfer.py --quick` folder")
    args = parser.parse_args()
    cfg = transfer.TransferConfig(out=args.out, seed=args.seed,
                                  **(transfer.QUICK if args.quick else {}))
    n = args.labels
    torch.set_num_threads(1)
    scale(cfg)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for row in args.rows.split(","):
            y = evaluate.task_examples(transfer._task(row), transfer._data(cfg, transfer.ROWS[row]),
                                       evaluate.FinetuneConfig())["test"]["label"]
            base = transfer.load_runs(cfg, row, n, "scratch")["test"]
            groups = np.arange(cfg.replicates) % cfg.pretrain_seeds
            for variant in VARIANTS:
                rows = np.stack(pool.starmap(finetune, [(cfg, row, n, variant, r)
                                                        for r in range(cfg.replicates)]))
                iv = replicate_interval(y, rows, auroc, b=base, groups=groups,
                                        n=cfg.bootstrap, seed=cfg.seed)
                print(json.dumps({"kind": "variant", "task": row, "labels": n, "variant": variant,
                                  "auroc": round(float(np.mean([auroc(y, p) for p in rows])), 4),
                                  "delta_auroc": round(iv["estimate"], 4),
                                  "delta_auroc_ci": [round(iv["lo"], 4), round(iv["hi"], 4)]}),
                      flush=True)


if __name__ == "__main__":
    main()
