"""MEDS labels in: `evaluate --labels-from DIR` reads a MEDS label folder as one custom binary task.

Usage: `custom = read_task(DIR, data, level=None, name=None)` (evaluate.py imports this module when
--labels-from is given) -> a CustomTask, whose `examples` evaluate puts beside the built-in tasks'
(data.Processed.labels) and whose `info` goes to RUN/eval/<name>.json. DIR holds parquet files of
the MEDS label schema (subject_id integer, prediction_time timestamp, boolean_value bool): any
names (train/tuning/held_out.parquet, shards, or one file), or DIR is one .parquet file. pyarrow is
imported inside the functions (requirements-meds.txt); without it, one line says what to install.

The rule (docs/meds.md, Labels in). Times are compared to the minute, as preprocessing reads them.
A row (subject, prediction_time P) is the example of the subject's unit of the level that began
last at or before P: a featurised ICU stay (whose admission is not discharged before P), an
admission, or the patient (the history of visits discharged by P). The unit's inputs end at
data.data_end: a stay's 48 hourly bins at intime + 48 h (minus 1 us), an admission's codes and note
at its discharge, a patient's history at P. A row whose unit's inputs end after P is refused and
counted, never moved to another unit; every other row left out is counted too, by reason. The
split is ours (splits.json, by patient), whatever file a row is in (rows of a file that names
another split are counted); a second row of one stay or admission is counted, the earliest kept.
Level, unless given: stay when most rows fall within a minute after a stay's data end, else
admission when most fall within a minute after a discharge, else patient.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import (MEDS_INSTALL, MEDS_SPLIT_NAMES, MICROS_PER_MINUTE, SPLITS, Processed, data_end,
                  lookup, row_of, usable_admissions)
from folders import InputError
from tasks import LEVELS, TASKS

COLUMNS = ("subject_id", "prediction_time", "boolean_value")
NEAR = MICROS_PER_MINUTE      # level inference: a row "at" a unit's data end is at most this after

# why a row is not an example (counted under these names, in this order)
NO_SUBJECT = "subject not in this processed folder (splits.json)"
NO_UNIT = "no {unit} of the subject began by prediction_time"
ENDED = "the admission of the subject's last stay begun was discharged before prediction_time"
REFUSED = "refused: the inputs would hold data after prediction_time"
UNUSABLE = "admission without a featurised ICU stay or ICD codes (data.admission_requirements)"
NO_HISTORY = "no coded admission discharged by prediction_time (an empty history)"
REPEAT = "a second row of the same example (the earliest prediction_time kept)"
UNITS = {"stay": "featurised ICU stay", "admission": "admission", "patient": "coded admission"}


@dataclass
class CustomTask:
    name: str
    level: str
    examples: dict    # data.Processed.labels' record: row, level, subject_id, label, cutoff
    info: dict        # RUN/eval/<name>.json "labels_from": path, level (and how), counts

    def lines(self) -> list[str]:
        """What evaluate logs: the task, and a warning naming what was left out (when any)."""
        c = self.info["counts"]
        splits = ", ".join(f"{c[f'examples in {s}']:,} {s}" for s in SPLITS)
        out = [f"labels from {self.info['path']}: task {self.name}, {self.level} level "
               f"({self.info['level_from']}), {c['examples']:,} examples of {c['rows read']:,} "
               f"rows ({splits}; splits ours)"]
        lost = {k: n for k, n in c.items() if k != "rows read" and not k.startswith("examples")
                and n}
        if lost:
            out.append(f"warning: --labels-from {self.info['path']}: " +
                       "; ".join(f"{n:,} {k}" for k, n in lost.items()) +
                       f" (RUN/eval/{self.name}.json: labels_from)")
        return out


def read_task(path: Path, data: Processed, level: str | None = None,
              name: str | None = None) -> CustomTask:
    """The custom task of the MEDS label folder (or file) `path` on the processed folder `data`."""
    path = Path(path)
    name = task_name(path, name)
    rows, counts = read_rows(path)
    if not len(rows["subject"]):
        raise InputError(f"--labels-from {path}: no row with all of {', '.join(COLUMNS)}")
    level_from = "--level"
    if level is None:
        level, level_from = infer_level(rows, data)
    elif level not in LEVELS:
        raise InputError(f"--level {level!r} is not one of {', '.join(LEVELS)}")
    examples, matched = match(rows, data, level)
    counts.update(matched)
    info = {"path": str(path), "level": level, "level_from": level_from, "counts": counts,
            "rule": "the subject's unit of the level that began last by prediction_time; refused "
                    "when its inputs end after prediction_time; splits ours (docs/meds.md)"}
    return CustomTask(name, level, examples, info)


def task_name(path: Path, name: str | None) -> str:
    """--task-name, or "meds-" and the folder's (or file's) name: never a built-in task's name, and
    usable as a file name (RUN/eval/<name>.json)."""
    if name is None:
        stem = path.name[:-len(".parquet")] if path.name.endswith(".parquet") else path.name
        name = "meds-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", stem or "labels")
    if name in TASKS or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(f"--task-name {name!r}: " + ("a built-in task's name" if name in TASKS else
                         "use letters, digits, '_', '.', '-'") + "; choose another")
    return name


# ------------------------------------------------------------------------------------------ reading
def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"--labels-from needs pyarrow, which is not installed: {MEDS_INSTALL}") \
            from None
    return pa, pq


def label_files(path: Path) -> list[Path]:
    """The parquet files of a label folder (all under it), or the file itself."""
    if path.is_file() and path.name.endswith(".parquet"):
        return [path]
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if not files:
        what = "no .parquet files in it" if path.is_dir() else "no such folder or .parquet file"
        raise InputError(f"--labels-from {path}: {what} (a MEDS label folder holds parquet files "
                         f"with {', '.join(COLUMNS)})")
    return files


def read_rows(path: Path) -> tuple[dict, dict]:
    """Every row of the label files with all three values: {"subject" int64, "time" (microseconds
    since 1970), "label" bool, "named" (the split its file names: a MEDS split name among the
    file's or folders' names, else "")}, and the counts of rows read and of rows without a value."""
    pa, pq = _pyarrow()
    parts, counts = [], {"rows read": 0, "rows without a subject_id, prediction_time or "
                                          "boolean_value": 0}
    for file in label_files(path):
        table = pq.read_table(file, columns=list(_checked(file, pq.read_schema(file), pa)))
        full = np.ones(table.num_rows, bool)
        for column in COLUMNS:
            full &= ~table[column].is_null().to_numpy(zero_copy_only=False)
        counts["rows read"] += table.num_rows
        counts["rows without a subject_id, prediction_time or boolean_value"] += int((~full).sum())
        table = table.filter(pa.array(full))
        time = table["prediction_time"].cast(pa.timestamp("us")).cast(pa.int64())
        parts.append({"subject": table["subject_id"].to_numpy().astype(np.int64),
                      "time": time.to_numpy().astype(np.int64),
                      "label": table["boolean_value"].to_numpy(zero_copy_only=False).astype(bool),
                      "named": np.full(table.num_rows, _named_split(file, path), object)})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, counts


def _checked(file: Path, schema, pa) -> tuple[str, ...]:
    """COLUMNS, after checking that `file` has them with the label schema's types (one line if
    not)."""
    types = {"subject_id": pa.types.is_integer, "prediction_time": pa.types.is_timestamp,
             "boolean_value": pa.types.is_boolean}
    for column, ok in types.items():
        if column not in schema.names:
            raise InputError(f"{file}: missing column {column!r} (a MEDS label file has "
                             f"{', '.join(COLUMNS)}; columns are: {', '.join(schema.names)})")
        if not ok(schema.field(column).type):
            raise InputError(f"{file}: column {column!r} is {schema.field(column).type}, not of "
                             "the MEDS label type (subject_id int64, prediction_time timestamp, "
                             "boolean_value bool: a binary task)")
    return COLUMNS


def _named_split(file: Path, root: Path) -> str:
    """The MEDS split name a label file's own name or a folder under `root` gives it, else ""."""
    parts = file.relative_to(root).parts if file != root else (file.name,)
    names = [p[:-len(".parquet")] if p.endswith(".parquet") else p for p in parts]
    return next((n for n in reversed(names) if n in MEDS_SPLIT_NAMES.values()), "")


# ----------------------------------------------------------------------------------------- matching
def _minutes(hours) -> np.ndarray:
    """Hours since 1970 (float64, to the minute) -> int64 minutes."""
    return np.rint(np.asarray(hours, dtype=np.float64) * 60).astype(np.int64)


def _units(data: Processed, level: str) -> dict:
    """The stays or admissions rows can match, sorted by (subject, start): {"row" (in stays.pt or
    admissions.pt), "subject", "start" (minutes), "end" (data_end, microseconds), "disch" (minutes:
    the discharge of the unit's admission)}."""
    a = data.admissions
    if level == "stay":
        s = data.stays
        if "intime" not in s:
            raise InputError(f"{data.root / 'stays.pt'}: no intime (the folder was written before "
                             "stays.pt kept it): re-run preprocess to read stay-level labels, or "
                             "pass --level admission or patient")
        subject, start = s["subject_id"].numpy(), _minutes(s["intime"].numpy())
        own = row_of(a["hadm_id"].numpy(), s["hadm_id"].numpy())
    else:
        subject, start = a["subject_id"].numpy(), _minutes(a["admittime"].numpy())
        own = np.arange(len(subject))
    disch = np.where(own >= 0, _minutes(a["dischtime"].numpy())[np.maximum(own, 0)],
                     np.iinfo(np.int64).max)             # (a stay's admission is always there)
    end = data_end(level, start if level == "stay" else disch, data.meta["seq_len"])
    order = np.lexsort((start, subject))
    return {"row": order, "subject": subject[order], "start": start[order], "end": end[order],
            "disch": disch[order]}


def latest_start(units: dict, subject: np.ndarray, minute: np.ndarray) -> np.ndarray:
    """Per row, the index into `units` of its subject's unit with the latest start at or before
    `minute` (-1: none)."""
    if not len(units["subject"]):
        return np.full(len(subject), -1)
    subjects = np.unique(units["subject"])
    rank, mine = np.searchsorted(subjects, units["subject"]), lookup(subjects, subject)
    base = min(int(units["start"].min()), int(minute.min()))
    key = rank.astype(np.int64) << 40 | (units["start"] - base)   # sorted, as the units are
    wanted = np.maximum(mine, 0).astype(np.int64) << 40 | np.clip(minute - base, 0, 2 ** 40 - 1)
    pos = np.searchsorted(key, wanted, side="right") - 1
    ok = (mine >= 0) & (pos >= 0)
    ok[ok] = rank[pos[ok]] == mine[ok]
    return np.where(ok, pos, -1)


def _unit_rows(rows: dict, data: Processed, level: str, reason: np.ndarray):
    """(row in stays.pt / admissions.pt per label row (-1: none), the end of its inputs in
    microseconds); `reason` gets why a row has no unit (stay and admission levels)."""
    units, minute = _units(data, level), rows["time"] // MICROS_PER_MINUTE
    at = latest_start(units, rows["subject"], minute)
    found = at >= 0
    reason[(reason == "") & ~found] = NO_UNIT.format(unit=UNITS[level])
    at = np.maximum(at, 0)
    if level == "stay":
        reason[(reason == "") & found & (units["disch"][at] < minute)] = ENDED
    end = np.where(found, units["end"][at] if len(units["end"]) else 0, 0)
    return np.where(found, units["row"][at] if len(units["row"]) else -1, -1), end


def _history(rows: dict, data: Processed, reason: np.ndarray) -> None:
    """Patient level: `reason` gets the rows whose subject has no coded admission discharged by
    prediction_time (PatientDataset would give them no visit)."""
    a = data.admissions
    coded = np.diff(a["icd_ptr"].numpy()) > 0
    subjects = np.unique(a["subject_id"].numpy()[coded])
    first = np.full(len(subjects), np.iinfo(np.int64).max)
    where = np.searchsorted(subjects, a["subject_id"].numpy()[coded])
    np.minimum.at(first, where, _minutes(a["dischtime"].numpy()[coded]))
    at = lookup(subjects, rows["subject"])
    empty = (at < 0) | (first[np.maximum(at, 0)] > rows["time"] // MICROS_PER_MINUTE)
    reason[(reason == "") & empty] = NO_HISTORY


def match(rows: dict, data: Processed, level: str) -> tuple[dict, dict]:
    """(the examples of the rows kept: data.Processed.labels' record, sorted by unit; counts of the
    rows left out by reason, of the examples per split and of the rows whose file names another
    split)."""
    minute = rows["time"] // MICROS_PER_MINUTE
    split = data.split_of(rows["subject"])
    reason = np.where(split == "", NO_SUBJECT, "").astype(object)
    if level == "patient":
        _history(rows, data, reason)
        unit, end = np.full(len(minute), -1), data_end("patient", minute, data.meta["seq_len"])
    else:
        unit, end = _unit_rows(rows, data, level, reason)
    reason[(reason == "") & (end > rows["time"])] = REFUSED
    if level == "admission" and len(unit):
        usable = usable_admissions(data.admissions)[np.maximum(unit, 0)]
        reason[(reason == "") & ~usable] = UNUSABLE
    key = unit if level != "patient" else rows["subject"]
    order = np.lexsort((rows["time"], key))
    kept = order[reason[order] == ""]
    repeat = np.append(False, (key[kept][1:] == key[kept][:-1]) &
                       ((level != "patient") | (minute[kept][1:] == minute[kept][:-1])))
    reason[kept[repeat]] = REPEAT
    kept = kept[~repeat]
    examples = {"row": unit[kept].astype(np.int64), "level": level,
                "subject_id": rows["subject"][kept],
                "label": rows["label"][kept].astype(np.float32),
                "cutoff": minute[kept] / 60.0 if level == "patient" else np.full(len(kept), np.nan)}
    return examples, _counts(rows, reason, split, kept, level)


def _counts(rows: dict, reason: np.ndarray, split: np.ndarray, kept: np.ndarray,
            level: str) -> dict:
    """The counts of match(): every reason in order (zeros included), the examples in all and per
    split (ours), and the examples whose file named another split."""
    reasons = [NO_SUBJECT, NO_UNIT.format(unit=UNITS[level]), *([ENDED] if level == "stay" else []),
               *([NO_HISTORY] if level == "patient" else []), REFUSED,
               *([UNUSABLE] if level == "admission" else []), REPEAT]
    counts = {r: int((reason == r).sum()) for r in reasons}
    ours = np.array([MEDS_SPLIT_NAMES.get(s, "") for s in split[kept]], dtype=object)
    named = rows["named"][kept]
    counts.update({"examples": len(kept),
                   **{f"examples in {s}": int((split[kept] == s).sum()) for s in MEDS_SPLIT_NAMES},
                   "examples whose file names another split (ours used)":
                       int(((named != "") & (named != ours)).sum())})
    return counts


def infer_level(rows: dict, data: Processed) -> tuple[str, str]:
    """(level, how it was chosen): stay when most rows of subjects here fall within NEAR after a
    stay's data end, else admission when most fall within NEAR after a discharge, else patient."""
    here = data.split_of(rows["subject"]) != ""
    for level in ("stay", "admission"):
        if level == "stay" and not len(data.stays["stay_id"]):
            continue
        reason = np.where(here, "", NO_SUBJECT).astype(object)
        unit, end = _unit_rows(rows, data, level, reason)
        near = (reason == "") & (end <= rows["time"]) & (rows["time"] - end < NEAR)
        if 2 * int(near.sum()) > int(here.sum()):
            return level, (f"inferred: {int(near.sum()):,} of {int(here.sum()):,} rows within a "
                           f"minute after the data end of a {level}")
    return "patient", "inferred: most rows are at no stay's 48-h end and no discharge"
