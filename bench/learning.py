"""Why the two pretraining stages did not learn, and what fixed it: each stage's validation objective against
its no-learning baselines, with and without the changes that made it learn.

Usage: python bench/learning.py [--out runs/learning] [--patients 3000] [--mimic3-demo PATH] [--jobs 2]
Writes a synthetic MIMIC-III extract of `patients` patients (the latent-model generator) and its processed
folder under OUT, then pretrains, at d = 64, 10 epochs per stage (stage 1 batch 64, stage 2 batch 256, lr 1e-3):
  stage 1  "paper": the decoder reads zeros and b only as its initial state, an (F,) read-out bias from 0;
           "stay input": b also at every hour; "pattern" (the default): plus a (T, F) bias started at the
           training cells' means.
  stage 2  from the default stage-1 checkpoint: code heads from PyTorch's default init ("default init") or
           started at each code's frequency (the default, "prior init"), with the paper's MSE or with BCE.
With --mimic3-demo, also stage 1 on the real MIMIC-III demo at the issue's settings (batch 16, 100 epochs,
d = 256, lr 5e-4), with and without the pattern bias. Prints one JSON line per run (each run's closing
verdict: its validation objective against the best no-learning baseline) and writes OUT/learning.jsonl.
About 10 minutes with 2 jobs on the project's 2-core CPU (3 more with --mimic3-demo).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
from preprocessing import pipeline  # noqa: E402
import models  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402

STAY = {"paper": dict(decoder_input="zeros", hour_bias=False), "stay input": dict(hour_bias=False),
        "pattern": {}}
ADMISSION = {"default init, mse": dict(prior_init=False), "prior init, mse": {},
             "prior init, bce": dict(code_loss="bce")}
COMMON = dict(d_model=64, lr=1e-3, epochs=10, patience=0, quiet=True, overwrite=True, checkpoint_every=10 ** 9)


def run(level: str, name: str, processed: Path, out: Path, options: dict) -> dict:
    """One pretraining run; returns its closing record (verdict, best validation pass, seconds)."""
    torch.set_num_threads(1)
    options, run_dir = dict(options), out / "runs" / f"{level}-{name.replace(' ', '_').replace(',', '')}"
    if level == "admission":
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "runs" / "stay-pattern" / "stay.pt", run_dir / "stay.pt")
    if not options.pop("prior_init", True):  # the code heads keep PyTorch's default init
        models.AdmissionPretrainer.init_priors = lambda self, prior: None
    cfg = {**COMMON, "batch_size": 64 if level == "stay" else 256, **options}
    start = time.perf_counter()
    rec = train.pretrain(train.LEVELS[level](data=processed, run=run_dir, **cfg))
    return {"level": level, "variant": name, "verdict": rec["verdict"], "learned": rec["learned"],
            "best_epoch": rec["best"]["epoch"], "health": rec["best"]["health"],
            "seconds": round(time.perf_counter() - start)}


def emit(out: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out / "learning.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/learning"))
    parser.add_argument("--patients", type=int, default=3000)
    parser.add_argument("--mimic3-demo", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    out, processed = args.out, args.out / "processed"
    out.mkdir(parents=True, exist_ok=True)
    if not (processed / "meta.json").is_file():
        synthetic.synthesize(synthetic.SynthConfig(out=out / "raw", patients=args.patients, quiet=True))
        pipeline.preprocess(pipeline.PreprocessConfig(raw=out / "raw", out=processed, quiet=True))
    jobs = [("stay", name, processed, opts) for name, opts in STAY.items()]
    if args.mimic3_demo:
        demo = out / "mimic3-demo"
        if not (demo / "meta.json").is_file():
            pipeline.preprocess(pipeline.PreprocessConfig(raw=args.mimic3_demo, out=demo, quiet=True))
        paper = dict(d_model=256, lr=5e-4, epochs=100, batch_size=16)
        jobs += [("stay", f"mimic3-demo {name}", demo, {**paper, **opts})
                 for name, opts in (("pattern", {}), ("no pattern", dict(hour_bias=False)))]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:  # a patched class dies with its process
        for job in [pool.submit(run, level, name, d, out, opts) for level, name, d, opts in jobs]:
            emit(out, job.result())
        for job in [pool.submit(run, "admission", name, processed, out, opts) for name, opts in ADMISSION.items()]:
            emit(out, job.result())


if __name__ == "__main__":
    main()
