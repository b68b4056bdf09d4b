"""Benchmark: preprocessing throughput and memory at two event-table sizes 10x apart.

Usage: python bench/preprocess.py [--patients 1000] [--scale 1] [--ratio 10] [--out bench/out]
Writes two synthetic MIMIC-III extracts with the same patients and stays, the larger charting
`ratio` times more rows per stay-hour (so the event tables grow, the cohort does not), preprocesses
each in a fresh process, and prints per size: event rows, rows/s (whole run and event pass), the
rate of a bare gzip + csv.reader pass over the same event files, peak RSS, output size, and stored
stays against their dense float32 size. Targets (issue #2): peak RSS of the larger run within 1.5x
of the smaller; rows/s at least half the bare csv.reader rate; stored stays at most 10% of dense.
"""
import argparse
import csv
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVENT_TABLES = ("CHARTEVENTS", "LABEVENTS", "OUTPUTEVENTS", "INPUTEVENTS_MV", "PROCEDUREEVENTS_MV",
                "DATETIMEEVENTS")

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from preprocessing.pipeline import PreprocessConfig, preprocess
t = time.perf_counter()
meta = preprocess(PreprocessConfig(raw=Path({raw!r}), out=Path({out!r}), quiet=True))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rows = sum(meta["sources"][t]["rows"] for t in meta["sources"] if t.endswith("events"))
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_mib": rss,
                  "meta_counts": meta["counts"], "n_features": meta["n_features"],
                  "seq_len": meta["seq_len"], "event_rows": rows}}))
"""


def bare_csv_rate(raw: Path) -> tuple[int, float]:
    """Rows and seconds of `for row in csv.reader(gzip text)` over the event tables: the reference
    limit."""
    rows, start = 0, time.perf_counter()
    for name in EVENT_TABLES:
        path = raw / f"{name}.csv.gz"
        if path.exists():
            with gzip.open(path, "rt", newline="") as f:
                for _ in csv.reader(f):
                    rows += 1
    return rows, time.perf_counter() - start


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20


def run_size(args, name: str, scale: float) -> dict:
    raw, out = args.out / f"raw-{name}", args.out / f"processed-{name}"
    if not raw.exists():
        subprocess.run([sys.executable, str(ROOT / "medhmp.py"), "synth", "--out", str(raw),
                        "--patients", str(args.patients), "--event-scale", str(scale), "--seed",
                        "0"], check=True)
    child = CHILD.format(root=str(ROOT), raw=str(raw), out=str(out))
    done = subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    bare_rows, bare_s = bare_csv_rate(raw)
    stays = result["meta_counts"]["stays"]
    dense_mib = stays * result["seq_len"] * result["n_features"] * 4 / 2 ** 20
    stored_mib = (out / "stays.pt").stat().st_size / 2 ** 20
    return {
        "size": name, "event_scale": scale, "event_rows": result["event_rows"],
        "chart_rows": _rows(raw / "CHARTEVENTS.csv.gz"), "stays": stays,
        "seconds": round(result["seconds"], 1),
        "rows_per_s": round(result["event_rows"] / result["seconds"]),
        "bare_csv_rows_per_s": round(bare_rows / bare_s),
        "vs_bare": round(result["event_rows"] / result["seconds"] / (bare_rows / bare_s), 2),
        "peak_rss_mib": round(result["peak_rss_mib"]), "output_mib": round(folder_mib(out), 1),
        "stays_stored_mib": round(stored_mib, 1), "stays_dense_mib": round(dense_mib, 1),
        "stored_vs_dense": round(stored_mib / dense_mib, 4) if dense_mib else None,
        "raw_mib": round(folder_mib(raw), 1)}


def _rows(path: Path) -> int:
    with gzip.open(path, "rb") as f:
        return sum(1 for _ in f) - 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=1000)
    p.add_argument("--scale", type=float, default=1.0, help="event scale of the smaller extract")
    p.add_argument("--ratio", type=float, default=10.0,
                   help="how many times larger the event tables of the second")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_size(args, "small", args.scale),
               run_size(args, "large", args.scale * args.ratio)]
    for r in results:
        print(json.dumps(r))
    small, large = results
    print(f"peak RSS large/small: {large['peak_rss_mib'] / small['peak_rss_mib']:.2f} "
          "(target <= 1.5)")
    print(f"rows/s vs bare csv.reader: small {small['vs_bare']:.2f}, large {large['vs_bare']:.2f} "
          "(target >= 0.5)")
    print(f"stored stays vs dense float32: {large['stored_vs_dense']:.3f} (target <= 0.10)")
    (args.out / "preprocess.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
