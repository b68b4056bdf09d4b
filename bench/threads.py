"""Is pretraining reproducible across torch thread counts? Stage 1 on the demo cohort, three runs.

Usage: python bench/threads.py [--out runs/threads] [--patients 400] [--steps 66]
Writes a synthetic MIMIC-III extract (seed 0) and its processed folder under OUT, then runs
`pretrain --level stay` (demo sizes: d = 64, batch 32, lr 1e-3) for `steps` steps in fresh processes
with 1 thread, 1 thread again, and 2 threads, and prints the largest absolute difference between the
checkpoints' weights: 0 when the run is bit-identical, otherwise how far the thread count moves
them. About 1 minute.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import synthetic  # noqa: E402
from preprocessing.pipeline import PreprocessConfig, preprocess  # noqa: E402


def pretrain(processed: Path, run: Path, threads: int, steps: int) -> dict:
    """Stage 1 in a fresh process with `threads` threads; the checkpoint's weights."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(ROOT / "medhmp.py"), "pretrain", "--level", "stay", "--data",
           str(processed), "--run", str(run), "--d-model", "64", "--batch-size", "32", "--lr",
           "1e-3", "--max-steps", str(steps), "--overwrite"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return torch.load(run / "stay.pt", weights_only=True)["model"]


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/threads"))
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--steps", type=int, default=66)
    args = parser.parse_args()
    raw, processed = args.out / "raw", args.out / "processed"
    if not (processed / "meta.json").is_file():
        synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=args.patients, quiet=True))
        preprocess(PreprocessConfig(raw=raw, out=processed, quiet=True))
    one = pretrain(processed, args.out / "run-1", 1, args.steps)
    again = pretrain(processed, args.out / "run-1b", 1, args.steps)
    two = pretrain(processed, args.out / "run-2", 2, args.steps)
    print(json.dumps({"steps": args.steps, "same_threads_max_abs_diff": max_difference(one, again),
                      "one_vs_two_threads_max_abs_diff": max_difference(one, two)}))


if __name__ == "__main__":
    main()
