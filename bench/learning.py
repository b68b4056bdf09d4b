"""Why the two pretraining stages did not learn, and what fixed it: each stage's validation
objective against its no-learning baselines, with and without the changes that made it learn.

Usage: python bench/learning.py [--out runs/learning] [--patients 3000] [--mimic3-demo PATH]
    [--jobs 2]
Writes a synthetic MIMIC-III extract of `patients` patients (the latent-model generator) and its
processed folder under OUT, then pretrains, at d = 64, 10 epochs per stage (stage 1 batch 64, stage
2 batch 256, lr 1e-3):
  stage 1  "paper": the decoder reads zeros and b only as its initial state, an (F,) read-out bias
           from 0; "stay input": b also at every hour; "pattern" (the default): plus a (T, F) bias
           started at the training cells' means.
  stage 2  from the default stage-1 checkpoint: code heads from PyTorch's default init ("default
           init") or started at each code's frequency (the default, "prior init"), with the paper's
           MSE or with BCE.
A reference for stage 2 ("latent oracle"): per-code logistic regressions on the generator's true
admission and mean stay latents (latents/), scored with the same masked-code losses on the same
validation admissions: how far below the frequency baseline codes that depend weakly on latents let
any model go (task codes also follow a patient's diagnosis, which the oracle does not see, so a
model can beat it a little). With --mimic3-demo, also stage 1 on the real MIMIC-III demo at the
issue's settings (batch 16, 100 epochs, d = 256, lr 5e-4), with and without the pattern bias. Prints
one JSON line per run (each run's closing verdict: its validation objective against the best
no-learning baseline) and writes OUT/learning.jsonl. About 10 minutes with 2 jobs on the project's
2-core CPU (3 more with --mimic3-demo).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
from preprocessing import pipeline  # noqa: E402
import models  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402

STAY = {"paper": dict(decoder_input="zeros", hour_bias=False), "stay input": dict(hour_bias=False),
        "pattern": {}}
ADMISSION = {"default init, mse": dict(prior_init=False), "prior init, mse": {},
             "prior init, bce": dict(code_loss="bce")}
COMMON = dict(d_model=64, lr=1e-3, epochs=10, patience=0, quiet=True, overwrite=True,
              checkpoint_every=10 ** 9)


def run(level: str, name: str, processed: Path, out: Path, options: dict) -> dict:
    """One pretraining run; returns its closing record (verdict, best validation pass, seconds)."""
    torch.set_num_threads(1)
    options = dict(options)
    run_dir = out / "runs" / f"{level}-{name.replace(' ', '_').replace(',', '')}"
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


def latent_oracle(processed: Path, raw: Path, seed: int = 0) -> dict:
    """Masked-code losses (MSE and BCE, the mean of the ICD and drug sets as in training) of
    per-code logistic regressions on the true latents, and of the frequency prior, on the validation
    admissions."""
    d, lat = data.load_processed(processed), synthetic.read_latents(raw)
    a, s = lat["admissions"], lat["stays"]
    hadm = d.admissions["hadm_id"].numpy()
    x = np.stack([np.asarray(a[k], float)[data.row_of(np.asarray(a["hadm_id"]), hadm)]
                  for k in synthetic.ADMISSION_LATENTS], 1)
    owner = data.row_of(hadm, np.asarray(s["hadm_id"]))
    stay_means = np.zeros((len(hadm), len(synthetic.STAY_LATENTS)))
    for j, k in enumerate(synthetic.STAY_LATENTS):
        np.add.at(stay_means[:, j], owner, np.asarray(s[k], float))
    per_admission = np.maximum(np.bincount(owner, minlength=len(hadm)), 1)[:, None]
    x = np.c_[x, stay_means / per_admission, np.ones(len(hadm))]
    rows = {split: d.pretrain_rows("admission", split) for split in ("train", "val")}
    batch = {split: data.AdmissionDataset(d, r).__getitems__(list(range(len(r))))
             for split, r in rows.items()}
    out = {}
    for kind in ("mse", "bce"):
        loss = {"frequency": 0.0, "latent oracle": 0.0}
        for m in ("icd", "drug"):
            y, f = batch["val"][m], batch["train"][m].mean(0)
            xt = torch.tensor(x[rows["train"]], dtype=torch.float32)
            w = torch.zeros(x.shape[1], y.shape[1])
            w[-1] = torch.logit(f.clamp(1e-4, 1 - 1e-4))
            w.requires_grad_(True)
            opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

            def fit():
                opt.zero_grad()
                bce = F.binary_cross_entropy_with_logits(xt @ w, batch["train"][m])
                value = bce + 1e-4 * (w[:-1] ** 2).sum()
                value.backward()
                return value
            opt.step(fit)
            p = torch.sigmoid(torch.tensor(x[rows["val"]], dtype=torch.float32) @ w).detach()
            keep = models.random_code_mask(y, 0.15, torch.Generator().manual_seed(seed))
            hidden = ~(y.bool() & keep) & batch["val"][f"{m}_mask"][:, None]
            for name, prob in (("frequency", f.expand_as(y)), ("latent oracle", p)):
                # P(a masked target | not visible), as health.code_priors
                q = 0.15 * prob / (1 - 0.85 * prob)
                loss[name] += 0.5 * models.masked_code_loss(torch.logit(q, eps=1e-6), y * ~keep,
                                                            hidden, kind).item()
        out[kind] = round(1 - loss["latent oracle"] / loss["frequency"], 4)
    return {"level": "admission", "variant": "latent oracle", "gain_below_frequency": out}


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
        synthetic.synthesize(
            synthetic.SynthConfig(out=out / "raw", patients=args.patients, quiet=True))
        pipeline.preprocess(pipeline.PreprocessConfig(raw=out / "raw", out=processed, quiet=True))
    jobs = [("stay", name, processed, opts) for name, opts in STAY.items()]
    if args.mimic3_demo:
        demo = out / "mimic3-demo"
        if not (demo / "meta.json").is_file():
            pipeline.preprocess(
                pipeline.PreprocessConfig(raw=args.mimic3_demo, out=demo, quiet=True))
        paper = dict(d_model=256, lr=5e-4, epochs=100, batch_size=16)
        jobs += [("stay", f"mimic3-demo {name}", demo, {**paper, **opts})
                 for name, opts in (("pattern", {}), ("no pattern", dict(hour_bias=False)))]
    ctx = multiprocessing.get_context("spawn")
    # a patched class dies with its process
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        for job in [pool.submit(run, level, name, d, out, opts) for level, name, d, opts in jobs]:
            emit(out, job.result())
        for job in [pool.submit(run, "admission", name, processed, out, opts)
                    for name, opts in ADMISSION.items()]:
            emit(out, job.result())
    if (out / "raw" / "latents").is_dir():
        emit(out, latent_oracle(processed, out / "raw"))


if __name__ == "__main__":
    main()
