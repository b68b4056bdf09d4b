"""MEDS label files: each task's cohort in the MEDS label schema, so a MEDS model can be scored on
our examples.

Usage: `write_labels(OUT / "meds_labels", built)` (pipeline: every processed folder, when pyarrow is
installed) writes `<task>/<split>.parquet` with subject_id, prediction_time and boolean_value
(docs/meds.md, Label files); without pyarrow it writes nothing and returns a note. pyarrow is
imported inside the function.
"""
from __future__ import annotations

from pathlib import Path

from data import MEDS_INSTALL, MEDS_SPLIT_NAMES, SPLITS, data_end


def write_labels(folder: Path, built) -> str:
    """`folder/<task>/<split>.parquet` for every task of `built` (a build.Built); returns the line
    to log. prediction_time is the inclusive end of the data our model may use (data.data_end): a
    stay task's first seq_len hours end one microsecond before intime + seq_len h (its events are
    binned by minute from the intime's minute), an admission task's data end at the discharge, a
    patient task's at its cutoff. meds_labels.py reads such a folder back (evaluate
    --labels-from)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return ("note: pyarrow is not installed, so no MEDS label files were written "
                f"({MEDS_INSTALL})")
    times = _prediction_times(built)
    split_of = {s: MEDS_SPLIT_NAMES[name] for name in SPLITS for s in built.splits[name]}
    schema = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                        ("boolean_value", pa.bool_())])
    tasks = sorted({row[0] for row in built.labels})
    for task in tasks:
        rows = [(row[2], times(row), bool(row[5])) for row in built.labels if row[0] == task]
        for split in MEDS_SPLIT_NAMES.values():
            mine = [r for r in rows if split_of[r[0]] == split]
            (folder / task).mkdir(parents=True, exist_ok=True)
            table = pa.table([pa.array([r[i] for r in mine], t.type) for i, t in enumerate(schema)],
                             schema=schema)
            pq.write_table(table, folder / task / f"{split}.parquet")
    return (f"wrote {folder.name}/: MEDS label files of {len(tasks)} tasks (subject_id, "
            "prediction_time, boolean_value)")


def _prediction_times(built):
    """row of labels.csv -> prediction_time in microseconds since 1970: data.data_end of the
    example's intime, dischtime or cutoff (hours in stays.pt, admissions.pt and labels.csv)."""
    seq_len = built.meta["seq_len"]
    intime = dict(zip(built.stays["stay_id"].tolist(), built.stays["intime"].tolist()))
    disch = dict(zip(built.admissions["hadm_id"].tolist(), built.admissions["dischtime"].tolist()))

    def time(row):
        _, level, _, hadm, stay, _, cutoff = row
        hours = intime[int(stay)] if level == "stay" else disch[int(hadm)] if level == "admission" \
            else float(cutoff)
        return int(data_end(level, round(hours * 60), seq_len))
    return time
