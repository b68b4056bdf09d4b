"""Benchmark: pretraining at the paper's scale, ours against the official-shaped model, interleaved.

Usage: python bench/scale_train.py [--rounds 2] [--threads 2] [--max-wait 30] [--before DIR]
    [--quick] [--out bench/out]
On bench/train.py's paper-sized processed folder (F = 1,318, T = 48, 7,687 ICD codes; 8,192 training
admissions, 9,000 stays), each measurement in a fresh process (bench/train.py's `child`, which first
waits up to --max-wait s for the machine to go quiet and records how much CPU other processes took
meanwhile), in rounds, so that ours and the official-shaped model are timed side by side, round
after round:
  stage 1, batch 128: our step harness, the official-shaped step;
  stage 2, batch 2048: ours, official-shaped; stage 2, batch 4096: ours (the official-shaped model
      is not run at 4096: its dense three-slot input alone is 3 GiB and a step takes minutes; ours
      is compared with its batch-2048 samples/s);
  stay-classifier prediction, batch 256 (eval, no_grad): ours (batch building timed),
      official-shaped;
  once: train.pretrain itself (the real loop) at 128 and 4096, for its logged samples/s and data
      wait.
With --before DIR (a checkout of the code before a change, e.g. `git worktree add /tmp/main main`),
its step harness is timed in the same rounds. Reports per measurement the median samples/s over
rounds with min-max, ratios to the official-shaped model from the same round, share of time waiting
for data, peak RSS, and the projected time of the paper's 200 epochs of stage 1 over MIMIC-III's
61,532 stays and 300 epochs of stage 2 over its 58,976 admissions. Writes OUT/scale_train.json.
About 8 minutes a round on a quiet 2-core machine.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import importlib.util

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# paper epochs, MIMIC-III stays / admissions
MIMIC3 = {"stay": (200, 61_532), "admission": (300, 58_976)}


def plan(quick: bool) -> list[tuple[str, str, dict]]:
    """(name, child kind, arguments) of one round."""
    big = 1024 if quick else 4096
    mid = 512 if quick else 2048
    return [
        ("stay_128", "step",
         dict(level="stay", batch_size=128, warmup=1, steps=4, count_flops=False)),
        ("stay_128_official", "official",
         dict(level="stay", batch_size=128, warmup=1, steps=2, count_flops=False)),
        (f"admission_{mid}", "step",
         dict(level="admission", batch_size=mid, warmup=1, steps=1, count_flops=False)),
        (f"admission_{mid}_official", "official",
         dict(level="admission", batch_size=mid, warmup=1, steps=1, count_flops=False)),
        (f"admission_{big}", "step",
         dict(level="admission", batch_size=big, warmup=1, steps=1, count_flops=False)),
        ("infer_256", "infer", dict(batch_size=256, warmup=1, steps=6)),
        ("infer_256_official", "infer", dict(batch_size=256, warmup=1, steps=6, official=True))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-wait", type=float, default=30.0)
    ap.add_argument("--before", type=Path, default=None,
                    help="a checkout of the code before a change")
    ap.add_argument("--quick", action="store_true",
                    help="stage 2 at 512 and 1024 instead of 2048 and 4096")
    ap.add_argument("--no-loop", action="store_true", help="skip the real-loop runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    data_dir = str(bench.write_paper_data(args.out / "paper-data-8192", n_train=8192, n_val=64))
    results = {}

    def measure(name, kind, kw, script=None):
        r = bench.child(kind, args.threads, args.max_wait, script=script, data_dir=data_dir, **kw)
        results.setdefault(name, []).append(r)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("records", "phase_s")}
        print(json.dumps({"name": name, **shown}), flush=True)

    t0 = time.perf_counter()
    for _ in range(args.rounds):
        for name, kind, kw in plan(args.quick):
            measure(name, kind, kw)
            if args.before and kind == "step":
                measure(name + "_before", kind, kw, script=str(args.before / "bench" / "train.py"))
    if not args.no_loop:
        big = 1024 if args.quick else 4096
        measure("loop_stay_128", "loop",
                dict(level="stay", batch_size=128, max_steps=13, log_every=4))
        measure(f"loop_admission_{big}", "loop",
                dict(level="admission", batch_size=big, max_steps=3, log_every=1))
    summary = summarise(results, args.quick)
    summary["seconds"] = round(time.perf_counter() - t0)
    print(json.dumps(summary, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"results": results, "summary": summary}
    (args.out / "scale_train.json").write_text(json.dumps(record, indent=1))


def summarise(results: dict, quick: bool) -> dict:
    """Median (min-max) samples/s per measurement, ratios to the official-shaped model round by
    round, data-wait shares, peak RSS and the projected paper-length pretraining."""
    out = {}
    for name, rs in results.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[name] = {"error": rs[-1].get("error")}
            continue
        sps = [r["samples_per_s"] for r in ok]
        wait = statistics.median(r.get("data_wait_share", 0.0) for r in ok)
        out[name] = {"samples_per_s": round(statistics.median(sps), 1),
                     "min_max": [round(min(sps), 1), round(max(sps), 1)],
                     "data_wait_share": round(wait, 4),
                     "peak_rss_mib": round(max(r["peak_rss_mib"] for r in ok)),
                     "others_cpu_share": round(max(r["others_cpu_share"] for r in ok), 2)}
    mid, big = (512, 1024) if quick else (2048, 4096)
    pairs = {
        "stay_128": "stay_128_official", f"admission_{mid}": f"admission_{mid}_official",
        f"admission_{big}": f"admission_{mid}_official", "infer_256": "infer_256_official",
        "stay_128_before": "stay_128_official",
        f"admission_{mid}_before": f"admission_{mid}_official",
        f"admission_{big}_before": f"admission_{mid}_official"}
    for ours, official in pairs.items():
        if ours in results and official in results:
            ratios = [a["samples_per_s"] / b["samples_per_s"]
                      for a, b in zip(results[ours], results[official])
                      if "error" not in a and "error" not in b]
            if ratios:
                out[ours].update(vs_official=round(statistics.median(ratios), 2),
                                 vs_official_min_max=[round(min(ratios), 2), round(max(ratios), 2)])
    for name, s in out.items():
        level = ("stay" if name.startswith(("stay", "loop_stay")) else
                 "admission" if "admission" in name else None)
        if level and "samples_per_s" in s and "official" not in name:
            epochs, n = MIMIC3[level]
            s["projected_paper_hours"] = round(epochs * n / s["samples_per_s"] / 3600, 1)
    return out


if __name__ == "__main__":
    main()
