"""Profile: where a pretraining step (or a stay-classifier prediction batch) spends its time.

Usage: python bench/profile_train.py --level stay|admission|infer [--batch-size N] [--steps 2]
    [--official]
                                     [--threads 2] [--data bench/out/paper-data-8192] [--top 15]
Builds the model, dataset and optimiser as bench/train.py's step harness (or, with --official, its
official-shaped model on dense batches), runs one warm-up step, then `--steps` steps under
torch.profiler (CPU) and prints the phases (data = building and moving the batch; forward; backward;
clip + AdamW) and the top operators by self CPU time, as one JSON line and a readable table. `infer`
is the stay classifier (Classifier(StayEncoder), eval mode, torch.no_grad) over stay batches, as
evaluate.predict runs it. The data folder is bench/train.py's paper-sized synthetic one (written
when missing).
"""
import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

import data  # noqa: E402
import train  # noqa: E402
from models import (AdmissionEncoder, AdmissionPretrainer, Classifier, ModelConfig,  # noqa: E402
                    StayEncoder, StayPretrainer)


def build(level: str, d: data.Processed, batch_size: int, official: bool):
    """(model, dataset, optimiser or None) as the step harness builds them."""
    stay_level = level in ("stay", "infer")
    ds = (data.StayDataset(d, d.pretrain_rows("stay", "train")) if stay_level else
          data.AdmissionDataset(d, d.pretrain_rows("admission", "train"), max_stays=3))
    m = d.meta
    if official:
        if stay_level:
            model = bench.OfficialShapedStay(m["n_features"], m["n_static"],
                                             decoder=level == "stay")
        else:
            model = bench.OfficialShapedAdmission(m["n_features"], m["n_static"], m["n_icd"],
                                                  m["n_drug"], m["note_dim"])
        if level == "infer":
            model = bench.OfficialShapedClassifier(model)
    else:
        mcfg = ModelConfig.from_meta(m)
        model = {"stay": lambda: StayPretrainer(StayEncoder(mcfg), mcfg),
                 "infer": lambda: Classifier(StayEncoder(mcfg)),
                 "admission": lambda: AdmissionPretrainer(AdmissionEncoder(mcfg), mcfg)}[level]()
    opt = None if level == "infer" else torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, ds, opt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", choices=("stay", "admission", "infer"), required=True)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--official", action="store_true")
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "out" / "paper-data-8192")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bs = args.batch_size or {"stay": 128, "admission": 4096, "infer": 256}[args.level]
    d = data.load_processed(bench.write_paper_data(args.data, n_train=8192, n_val=64))
    model, ds, opt = build(args.level, d, bs, args.official)
    model.train(args.level != "infer")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "clip_adamw": 0.0}

    def step(i: int, timed: bool):
        t0 = time.perf_counter()
        idx = order[(i * bs) % len(ds):][:bs].tolist()
        batch = ds.__getitems__(idx)
        inputs = bench.official_inputs(args.level, batch, d.meta) if args.official else (batch,)
        t1 = time.perf_counter()
        if args.level == "infer":
            with torch.no_grad():
                model(*inputs)
            t2 = t3 = t4 = time.perf_counter()
        else:
            out = model(*inputs)
            loss = out if args.official else out["loss"]
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
        if timed:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += dt

    step(0, False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(1, args.steps + 1):
            step(i, True)
    total = sum(phases.values())
    ops = prof.key_averages()
    prof_total = sum(e.self_cpu_time_total for e in ops)
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    result = {"level": args.level, "official": args.official, "batch_size": bs, "steps": args.steps,
              "threads": torch.get_num_threads(), "samples_per_s": bs * args.steps / total,
              "phase_share": {k: round(v / total, 3) for k, v in phases.items()},
              "top_ops": [{"op": e.key, "self_share": round(e.self_cpu_time_total / prof_total, 3),
                           "calls": e.count // args.steps} for e in top]}
    print(json.dumps(result))
    print(f"{args.level}{' (official-shaped)' if args.official else ''}, batch {bs}: "
          f"{result['samples_per_s']:.1f} samples/s (under the profiler); phases "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["phase_share"].items()))
    for e in result["top_ops"]:
        print(f"  {100 * e['self_share']:5.1f}%  {e['calls']:6d} calls/step  {e['op']}")


if __name__ == "__main__":
    main()
