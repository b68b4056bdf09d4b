"""Scaling: pretraining in one process against N processes of one DDP run, samples/s and peak RSS.

Usage: python bench/ddp.py [--world 2] [--device cpu] [--rounds 2] [--data DIR] [--patients 400]
    [--d-model 64] [--stay-batch 64] [--admission-batch 128] [--steps 24] [--out bench/out]
Runs `medhmp.py pretrain` for both stages (stage 2 from the same stay.pt), each in fresh processes,
in arms:
  one: 1 process with N threads (on the CPU: every core for one process);
  one_1thread: 1 process with 1 thread (on the CPU);
  ranks: N processes of one run at the same global batch, each with 1 thread on the CPU (with
      --device cuda, one GPU each), started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
      MASTER_ADDR, MASTER_PORT; gloo on the CPU, nccl on CUDA), each waited for on its own so that
      its peak RSS is its own.
From each run's log.jsonl: samples/s (the global batch's examples, steady records after the first)
and the data-wait share; per process: peak RSS (os.wait4) and wall seconds. The arms run in turn,
round after round (--rounds), and the summary gives each arm's median samples/s and the ratio of the
N processes to each one-process arm. On a 2-core CPU two processes cannot beat one that already
uses both cores: what this measures there is DDP's overhead (the gradient all-reduce, the gathered
negatives, a second copy of the model and data); on a machine shared with other work, two threads
in one process can also lose far more to each other than two processes do. Writes
OUT/ddp_<device>.json. The processed folder is a synthetic cohort written under OUT (--patients)
unless --data names one. About 4 minutes a round on a busy 2-core machine at the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("stay", "admission")


def cohort(out: Path, patients: int) -> Path:
    """A synthetic MIMIC-III cohort of `patients`, processed (reused when there)."""
    processed = out / f"ddp-cohort-{patients}" / "processed"
    if not (processed / "meta.json").is_file():
        raw = processed.parent / "raw"
        for args in (["synth", "--out", raw, "--patients", patients, "--overwrite"],
                     ["preprocess", "--raw", raw, "--out", processed]):
            subprocess.run([sys.executable, str(ROOT / "medhmp.py"), *map(str, args)], check=True,
                           capture_output=True)
    return processed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], world: int, threads: int, device: str) -> list[dict]:
    """`cmd` in `world` processes with torchrun's environment (none when world is 1); waits for each
    (os.wait4) and returns its exit status, wall seconds and peak RSS in MiB."""
    port, started, procs = free_port(), time.perf_counter(), []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    found = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        seconds = round(time.perf_counter() - started, 1)
        found.append({"returncode": p.returncode, "seconds": seconds,
                      "peak_rss_mib": round(usage.ru_maxrss / 1024),
                      **({"error": p.stderr.read()[-2000:]} if p.returncode else {})})
    return found


def throughput(run: Path, level: str) -> dict:
    """Mean samples/s and data-wait share of a stage's log.jsonl records after the first."""
    lines = (run / "log.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if "event" not in r and r["level"] == level]
    steady = recs[1:] or recs
    return {"samples_per_s": round(sum(r["samples_per_s"] for r in steady) / len(steady), 1),
            "data_wait": round(sum(r["data_wait"] for r in steady) / len(steady), 3),
            "last_loss": recs[-1]["loss"] if recs else None}


def arm(name: str, args, data: Path, world: int, threads: int) -> dict:
    """Both stages in one arm; stage 2 starts from the stay.pt of the arm "one" (copied in)."""
    run = args.out / "ddp-runs" / f"{args.device}-{name}"
    shutil.rmtree(run, ignore_errors=True)
    out = {"world": world, "threads_per_process": threads}
    for level in LEVELS:
        if level == "admission" and name != "one":
            shutil.copy(args.out / "ddp-runs" / f"{args.device}-one" / "stay.pt", run / "stay.pt")
        batch = args.stay_batch if level == "stay" else args.admission_batch
        cmd = [sys.executable, str(ROOT / "medhmp.py"), "pretrain", "--level", level, "--data",
               str(data), "--run", str(run), "--d-model", str(args.d_model), "--batch-size",
               str(batch), "--max-steps", str(args.steps), "--device", args.device]
        procs = launch(cmd, world, threads, args.device)
        out[level] = {"batch_size": batch, "processes": procs,
                      "peak_rss_mib_max": max(p["peak_rss_mib"] for p in procs),
                      "peak_rss_mib_sum": sum(p["peak_rss_mib"] for p in procs)}
        if all(p["returncode"] == 0 for p in procs):
            out[level].update(throughput(run, level))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--stay-batch", type=int, default=64)
    ap.add_argument("--admission-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    args.out = args.out.resolve()
    print(json.dumps(run(args)))


def run(args) -> dict:
    """Every arm, round after round; writes and returns OUT/ddp_<device>.json."""
    started = time.perf_counter()
    data = (args.data or cohort(args.out, args.patients)).resolve()
    arms = {"one": (1, args.world if args.device == "cpu" else 1)}
    if args.device == "cpu":
        arms["one_1thread"] = (1, 1)
    arms["ranks"] = (args.world, 1)
    result = {"device": args.device, "world": args.world, "cpus": os.cpu_count(),
              "d_model": args.d_model, "steps": args.steps, "data": str(data),
              "load_average_before": os.getloadavg(), "rounds": []}
    for _ in range(getattr(args, "rounds", 1)):
        result["rounds"].append({name: arm(name, args, data, world, threads)
                                 for name, (world, threads) in arms.items()})
    result["summary"] = summary(result["rounds"])
    result["load_average_after"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ddp_{args.device}.json").write_text(json.dumps(result, indent=1))
    return result


def summary(rounds: list[dict]) -> dict:
    """Per arm and stage: median samples/s over rounds, largest peak RSS of one process and of all
    together; the N processes' samples/s over each one-process arm's."""
    out = {}
    for level in LEVELS:
        got = {name: [r[name][level] for r in rounds if "samples_per_s" in r[name][level]]
               for name in rounds[0]}
        out[level] = {name: {"samples_per_s": statistics.median(x["samples_per_s"] for x in runs),
                             "peak_rss_mib_one_process": max(x["peak_rss_mib_max"] for x in runs),
                             "peak_rss_mib_all_processes": max(x["peak_rss_mib_sum"] for x in runs)}
                      for name, runs in got.items() if runs}
        if "ranks" in out[level]:
            for name in [n for n in out[level] if n != "ranks"]:
                out[level][f"ranks_vs_{name}"] = round(out[level]["ranks"]["samples_per_s"] /
                                                       out[level][name]["samples_per_s"], 2)
    return out


if __name__ == "__main__":
    main()
