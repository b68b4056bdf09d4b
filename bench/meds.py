"""Benchmark: preprocessing a synthetic MEDS extract of MIMIC-IV's size (73,000 stays, 300 M rows).

Usage: python bench/meds.py [--fractions 0.0625,0.25] [--event-scale 7.2] [--etl 0.1.0]
    [--out bench/out/meds]
The extract is `synth --layout meds` (MIMIC_IV_MEDS codes) of FULL_PATIENTS x fraction patients,
charting --event-scale times the generator's chart rows per stay-hour: at 26,400 patients and scale
7.2 it has about 73,000 ICU stays and 300 M events, MIMIC-IV's 73,181 stays and the ~300 M events
of its MEDS extract (a calibration on 1,000 patients: 2,765 stays and 12.1 M events at scale 7.6).
It is written once per size (out/raw-<patients>, reused while its DONE file is there). Per size:
the generation time; a bare pyarrow scan of the same files (every column of every row group,
decoded: `ParquetFile.iter_batches`) in rows/s; preprocessing in a fresh process (bench/scale.py's
preprocess_child: wall time, peak RSS, the RSS after each logged step) and its rate in events/s
against the bare scan's. Targets (issue 20): peak RSS <= 8 GiB, >= 0.5x the bare scan's rate.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scale import preprocess_child   # noqa: E402  (bench/scale.py: a fresh process, RSS sampled)

FULL_PATIENTS = 26_400        # x ~2.77 ICU stays per synthetic patient ~ MIMIC-IV's 73,181 stays
EVENT_SCALE = 7.2             # chart rows per stay-hour multiplier: ~11.4 k events per patient


def write_extract(out: Path, patients: int, event_scale: float, etl: str) -> float:
    """The synthetic MEDS extract at `out` (skipped when out/DONE exists), written by `synth` in its
    own process (its memory must not count in the preprocessing child's peak, which a fork would
    inherit); returns seconds."""
    if (out / "DONE").exists():
        return 0.0
    start = time.perf_counter()
    command = ["synth", "--out", out, "--patients", patients, "--layout", "meds", "--seed", 0,
               "--event-scale", event_scale, "--meds-etl", etl]
    subprocess.run([sys.executable, str(ROOT / "medhmp.py"), *map(str, command)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (out / "DONE").write_text(str(patients))
    return time.perf_counter() - start


def bare_scan(root: Path) -> tuple[int, float]:
    """(rows, seconds) of reading every column of every data file with pyarrow, nothing else."""
    import pyarrow.parquet as pq
    start, rows = time.perf_counter(), 0
    for path in sorted((root / "data").rglob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 20):
            rows += batch.num_rows
    return rows, time.perf_counter() - start


def run_size(args, fraction: float) -> dict:
    patients = max(1, round(FULL_PATIENTS * fraction))
    raw, out = args.out / f"raw-{patients}", args.out / f"processed-{patients}"
    generate_s = write_extract(raw, patients, args.event_scale, args.etl)
    rows, bare_s = bare_scan(raw)
    result = preprocess_child(raw, out)
    meta = json.loads((out / "meta.json").read_text())
    rate = rows / result["seconds"]
    raw_bytes = sum(p.stat().st_size for p in raw.rglob("*.parquet"))
    return {"fraction": fraction, "patients": patients, **result["counts"], "events": rows,
            "stays_read": meta["attrition"]["stays"][0][1],
            "n_features": meta["n_features"], "raw_gib": round(raw_bytes / 2 ** 30, 2),
            "generate_s": round(generate_s), "bare_s": round(bare_s, 1),
            "bare_rows_per_s": round(rows / bare_s),
            "seconds": round(result["seconds"], 1), "rows_per_s": round(rate),
            "vs_bare": round(rate / (rows / bare_s), 2), "peak_rss_mib": result["peak_rss_mib"],
            "steps": result["steps"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fractions", default="0.0625,0.25",
                   help="sizes as fractions of MIMIC-IV's ICU stays")
    p.add_argument("--event-scale", type=float, default=EVENT_SCALE)
    p.add_argument("--etl", default="0.1.0", help="MIMIC_IV_MEDS lab code style: 0.0.7 or 0.1.0")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "meds")
    args = p.parse_args()
    results = []
    for fraction in (float(x) for x in args.fractions.split(",")):
        r = run_size(args, fraction)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "steps"}), flush=True)
        print("  seconds, RSS at the line, highest RSS since the line before (MiB), the line")
        for t, rss, high, line in r["steps"]:
            print(f"  {t:>6} {rss:>7} {high:>7}  {line}")
        (args.out / "meds.json").write_text(json.dumps(results, indent=1))
    print("| fraction | patients | ICU stays (featurised) | events | parquet | bare scan | "
          "preprocessing | events/s (x bare) | peak RSS |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['fraction']:g} | {r['patients']:,} | {r['stays_read']:,} ({r['stays']:,}) "
              f"| {r['events'] / 1e6:.0f} M "
              f"| {r['raw_gib']} GiB | {r['bare_s']:.0f} s ({r['bare_rows_per_s'] / 1e6:.1f} M/s) "
              f"| {r['seconds'] / 60:.1f} min | {r['rows_per_s'] / 1e6:.2f} M ({r['vs_bare']}x) "
              f"| {r['peak_rss_mib'] / 1024:.1f} GiB |")


if __name__ == "__main__":
    main()
