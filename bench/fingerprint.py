"""Fingerprint: a hash per output file of a short run of every stage: did a refactoring change any?

Usage: OMP_NUM_THREADS=1 python bench/fingerprint.py [--out bench/out/fingerprint] [--mimic3 DIR]
    [--notes DIR]
Drives the command line only (`python medhmp.py ...`, one process per command), so it runs unchanged
on either side of a change that moves code between modules. It preprocesses the MIMIC-III demo (with
the open notes, when both folders exist) and small synthetic MIMIC-III, MIMIC-IV and diagnosis
extracts, pretrains a few steps of each stage, fine-tunes every task for two epochs and prints
`<sha256[:16]> <file>` for every raw, tensor and result file, then one hash over them all. Two runs
of the same code print the same lines.

Tensor files are hashed by content (keys, dtypes, shapes, bytes), not by their zip bytes. Values
that differ between runs of the same code are left out: times and rates (`created`, `time`,
`updated`, `seconds`, `samples_per_s`, `data_wait`), the git commit, and `data_digest` (a hash of
meta.json, which holds `created`).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VOLATILE = {"created", "time", "updated", "seconds", "samples_per_s", "data_wait", "git",
            "data_digest"}


def medhmp(*args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "medhmp.py"), *map(str, args)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def canonical(value, h) -> None:
    """Feed `value` (nested dicts, lists, tensors, numbers, strings) into the hash `h`, volatile
    keys left out."""
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            if k not in VOLATILE:
                h.update(f"<{k}>".encode())
                canonical(value[k], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            canonical(v, h)
    elif isinstance(value, torch.Tensor):
        v = value.detach().cpu()
        v = v.float() if v.dtype == torch.bfloat16 else v   # numpy has no bfloat16
        h.update(f"{value.dtype}{tuple(value.shape)}".encode() + v.numpy().tobytes())
    else:
        h.update(repr(value).encode())


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    if path.suffix == ".pt":
        canonical(torch.load(path, weights_only=True), h)
    elif path.suffix == ".json":
        canonical(json.loads(path.read_text()), h)
    elif path.suffix == ".jsonl":
        canonical([json.loads(line) for line in path.read_text().splitlines()], h)
    elif path.suffix == ".csv":
        canonical(list(csv.DictReader(io.StringIO(path.read_text()))), h)
    else:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run(out: Path, mimic3: Path, notes: Path) -> dict:
    """Every stage once; returns {file relative to `out`: hash}."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    synth, m4, tx = out / "synth", out / "mimic4", out / "trinetx"
    medhmp("synth", "--out", synth / "raw", "--patients", 150, "--seed", 0)
    medhmp("synth", "--out", m4 / "raw", "--patients", 60, "--seed", 1, "--layout", "mimic4")
    medhmp("synth", "--out", tx / "raw", "--patients", 100, "--seed", 2, "--layout", "trinetx")
    medhmp("preprocess", "--raw", synth / "raw", "--out", synth / "processed")
    medhmp("preprocess", "--raw", m4 / "raw", "--out", m4 / "processed", "--limit-patients", 40)
    medhmp("preprocess", "--raw", tx / "raw", "--out", tx / "processed", "--vocab-from",
           synth / "processed")
    common = ("--data", synth / "processed", "--run", synth / "run", "--d-model", 32, "--max-steps")
    medhmp("pretrain", "--level", "stay", *common, 6, "--batch-size", 32)
    medhmp("pretrain", "--level", "admission", *common, 4, "--batch-size", 32)
    medhmp("evaluate", "--task", "all", "--data", synth / "processed", "--run", synth / "run",
           "--seeds", 1, "--epochs", 2)
    if mimic3.is_dir():
        demo = out / "mimic3-demo"
        medhmp("preprocess", "--raw", mimic3, "--out", demo / "processed",
               *(("--notes", notes) if notes.is_dir() else ()))
        medhmp("pretrain", "--level", "stay", "--data", demo / "processed", "--run", demo / "run",
               "--d-model", 16, "--max-steps", 3, "--batch-size", 16)
        medhmp("evaluate", "--task", "mortality", "--data", demo / "processed", "--run",
               demo / "run", "--init", "stay", "--seeds", 1, "--epochs", 2)
    kept = (".pt", ".json", ".jsonl", ".csv", ".gz")
    return {str(p.relative_to(out)): file_hash(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.name.endswith(kept) and not p.name.endswith(".tmp")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "fingerprint")
    parser.add_argument("--mimic3", type=Path, default=SHARED / "mimic3-demo")
    parser.add_argument("--notes", type=Path, default=SHARED / "notes")
    args = parser.parse_args()
    hashes = run(args.out.resolve(), args.mimic3, args.notes)
    for name, digest in hashes.items():
        print(f"{digest}  {name}")
    listing = "".join(f"{d} {n}\n" for n, d in hashes.items())
    total = hashlib.sha256(listing.encode()).hexdigest()[:16]
    print(f"{total}  all {len(hashes)} files")


if __name__ == "__main__":
    main()
