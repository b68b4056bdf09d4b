"""Benchmark: preprocessing a MIMIC-III-sized extract (the real variety) at 1/16, 1/4 and full size.

Usage: python bench/scale.py --demo PATH [--notes NOTEEVENTS.csv.gz] [--fractions 0.0625,0.25,1]
    [--out bench/out/scale]
`--demo` is a copy of the public MIMIC-III demo (v1.4, 100 patients; PhysioNet, ODbL). The extract
is the demo's tables replicated with shifted ids (replica k writes subject, admission, stay and row
ids as k followed by the demo id zero-padded), so it has the demo's itemids, value types and
per-patient rates: full size (465 replicas) is 46,500 patients, 60,000 admissions, 63,240 ICU stays
and about 352 M CHARTEVENTS, 35 M LABEVENTS rows, close to MIMIC-III's 46,520 / 58,976 / 61,532 and
330 M / 28 M. Dates are not shifted (each replica repeats the demo's timeline). `--notes` adds a
MIMIC-III-shaped NOTEEVENTS table replicated the same way, each text made unique per replica so the
note cache cannot shortcut the text model. Only the tables preprocessing reads are written. Per
size, preprocessing runs in a fresh process; printed: wall time, event rows/s against a bare gzip +
csv.reader pass over the same event files, peak RSS with the RSS after each logged step (where
memory goes), the processed folder's size, and the RSS of loading it for training
(data.load_processed) next to that size. Targets (issue #9): peak RSS <= 8 GiB, >= 0.5x the bare
csv.reader rate, under 45 minutes at full size.
"""
import argparse
import csv
import gzip
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# bench/preprocess.py: the same reference pass and sizes
from preprocess import bare_csv_rate, folder_mib

ROOT = Path(__file__).resolve().parents[1]
DEMO_PATIENTS, FULL_REPLICAS = 100, 465      # 465 x 100 demo patients ~ MIMIC-III's 46,520
# digits after the replica number
ID_WIDTH = {"subject_id": 6, "hadm_id": 6, "icustay_id": 6, "row_id": 10}
TABLES = ("PATIENTS", "ADMISSIONS", "ICUSTAYS", "DIAGNOSES_ICD", "PRESCRIPTIONS", "CHARTEVENTS",
          "LABEVENTS", "OUTPUTEVENTS", "INPUTEVENTS_MV", "PROCEDUREEVENTS_MV", "DATETIMEEVENTS")
COPIED = ("D_ITEMS", "D_LABITEMS")           # dictionaries: one copy
MARK = "\x00"                                # stands for the replica number in a template


def template(path: Path, unique_text: bool = False) -> tuple[str, str]:
    """(header line, body) of a table with every non-empty id field written as MARK + the id
    zero-padded; with `unique_text`, a note's text ends with a MARK line (so each replica's texts
    differ)."""
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        names = [h.lower() for h in header]
        ids = [(i, ID_WIDTH[n]) for i, n in enumerate(names) if n in ID_WIDTH]
        text = names.index("text") if unique_text else None
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for row in reader:
            for i, width in ids:
                if row[i]:
                    row[i] = MARK + row[i].zfill(width)
            if text is not None:
                row[text] += f"\n\n(replica {MARK})"
            writer.writerow(row)
    head = io.StringIO()
    csv.writer(head, lineterminator="\n").writerow(header)
    return head.getvalue(), out.getvalue()


def write_part(args: tuple) -> Path:
    """Replicas [first, last] of one table as one gzip file of one member per replica (the header in
    the first)."""
    source, unique_text, first, last, header, part = args
    _, body = template(source, unique_text)
    with open(part, "wb") as raw:
        if header:
            raw.write(gzip.compress(header.encode(), compresslevel=1, mtime=0))
        for k in range(first, last + 1):
            raw.write(gzip.compress(body.replace(MARK, str(k)).encode(), compresslevel=1, mtime=0))
    return part


def write_extract(demo: Path, notes: Path | None, replicas: int, out: Path,
                  workers: int = 2) -> None:
    """The replicated extract in `out` (skipped when out/DONE exists): tables split into replica
    ranges written by `workers` processes, then concatenated (gzip readers read concatenated members
    whole)."""
    if (out / "DONE").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    sources = {name: (demo / f"{name}.csv.gz", False) for name in TABLES}
    if notes is not None:
        sources["NOTEEVENTS"] = (notes, True)
    jobs, parts = [], {}
    for name, (path, unique_text) in sources.items():
        header = _header_line(path)
        step = max(1, replicas // (8 if name == "CHARTEVENTS" else 1))
        for first in range(1, replicas + 1, step):
            part = out / f".{name}.{first:06d}.part"
            jobs.append((path, unique_text, first, min(replicas, first + step - 1),
                         header if first == 1 else None, part))
            parts.setdefault(name, []).append(part)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_part, jobs))
    for name, files in parts.items():
        with open(out / f"{name}.csv.gz", "wb") as f:
            for part in files:
                f.write(part.read_bytes())
                part.unlink()
    for name in COPIED:
        (out / f"{name}.csv.gz").write_bytes((demo / f"{name}.csv.gz").read_bytes())
    (out / "DONE").write_text(str(replicas))


def _header_line(path: Path) -> str:
    with gzip.open(path, "rt", newline="") as f:
        return f.readline()


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from preprocessing.pipeline import PreprocessConfig, preprocess
t = time.perf_counter()
meta = preprocess(PreprocessConfig(raw=Path({raw!r}), out=Path({out!r})))
rows = sum(meta["sources"][t]["rows"] for t in meta["sources"] if t.endswith("events"))
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t, "counts": meta["counts"],
      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "n_features": meta["n_features"], "event_rows": rows}}), flush=True)
"""

LOAD = """
import sys, time
sys.path.insert(0, {root!r})
import data
def rss():   # MiB resident now (VmRSS)
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                if l.startswith("VmRSS"))
before, t = rss(), time.perf_counter()
d = data.load_processed({out!r})
print(before, rss(), time.perf_counter() - t)
"""


def rss_mib(pid: int) -> float:
    """Resident set size of a live process, from /proc (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def preprocess_child(raw: Path, out: Path) -> dict:
    """Preprocess in a fresh process, sampling its RSS every 0.2 s; returns the result, its peak RSS
    (the kernel's ru_maxrss) and per line it logged the seconds, the RSS then and the highest RSS
    sampled since the line before (where memory goes, step by step)."""
    env = dict(os.environ, CI="true")        # plain progress lines
    child = CHILD.format(root=str(ROOT), raw=str(raw), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    window, steps, result, start = [0.0], [], None, time.perf_counter()

    def sample():
        while proc.poll() is None:
            window[0] = max(window[0], rss_mib(proc.pid))
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.strip() and "%" not in line:
            now = rss_mib(proc.pid)
            steps.append((round(time.perf_counter() - start), round(now),
                          round(max(window[0], now)),
                          line.strip()[:100]))
            window[0] = 0.0
    if proc.wait() != 0 or result is None:
        raise SystemExit("preprocessing failed:\n" + "\n".join(s[3] for s in steps[-20:]))
    return {**result, "peak_rss_mib": round(result.pop("ru_maxrss_mib")), "steps": steps}


def run_size(args, fraction: float) -> dict:
    replicas = max(1, round(FULL_REPLICAS * fraction))
    raw, out = args.out / f"raw-{replicas}", args.out / f"processed-{replicas}"
    start = time.perf_counter()
    write_extract(args.demo, args.notes, replicas, raw)
    written = time.perf_counter() - start
    result = preprocess_child(raw, out)
    bare_rows, bare_s = bare_csv_rate(raw) if not args.skip_bare else (0, 0.0)
    load = subprocess.run([sys.executable, "-c", LOAD.format(root=str(ROOT), out=str(out))],
                          check=True,
                          capture_output=True, text=True).stdout.split()
    rate = result["event_rows"] / result["seconds"]
    return {
        "fraction": fraction, "replicas": replicas,
        **result["counts"], "n_features": result["n_features"], "event_rows": result["event_rows"],
        "raw_gib": round(folder_mib(raw) / 1024, 2), "generate_s": round(written),
        "seconds": round(result["seconds"]),
        "rows_per_s": round(rate), "bare_rows_per_s": round(bare_rows / bare_s) if bare_s else None,
        "vs_bare": round(rate / (bare_rows / bare_s), 2) if bare_s else None,
        "peak_rss_mib": result["peak_rss_mib"], "out_mib": round(folder_mib(out)),
        "load_rss_mib": round(float(load[1]) - float(load[0])), "load_s": round(float(load[2]), 1),
        "steps": result["steps"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, required=True,
                   help="folder of the MIMIC-III demo v1.4 tables")
    p.add_argument("--notes", type=Path,
                   help="a MIMIC-III-shaped NOTEEVENTS table on the demo's ids")
    p.add_argument("--fractions", default="0.0625,0.25,1",
                   help="sizes as fractions of MIMIC-III's patients")
    p.add_argument("--skip-bare", action="store_true", help="do not time the bare csv.reader pass")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale")
    args = p.parse_args()
    results = []
    for fraction in (float(x) for x in args.fractions.split(",")):
        r = run_size(args, fraction)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "steps"}), flush=True)
        print("  seconds, RSS at the line, highest RSS since the line before (MiB), the line")
        for t, rss, high, line in r["steps"]:
            print(f"  {t:>6} {rss:>7} {high:>7}  {line}")
        (args.out / "scale.json").write_text(json.dumps(results, indent=1))
    print("| fraction | patients | stays | event rows | features | active cells | time "
          "| rows/s (x bare) | peak RSS | folder | load RSS |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['fraction']:g} | {r['patients']:,} | {r['stays']:,} | "
              f"{r['event_rows'] / 1e6:.0f} M | {r['n_features']:,} | "
              f"{r['active_cells'] / 1e6:.0f} M | {r['seconds'] / 60:.1f} min | "
              f"{r['rows_per_s'] / 1e6:.2f} M ({r['vs_bare']}x) | {r['peak_rss_mib'] / 1024:.1f} "
              f"GiB | {r['out_mib']:,} MiB | {r['load_rss_mib']:,} MiB |")


if __name__ == "__main__":
    main()
