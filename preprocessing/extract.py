"""Extract: the raw tables of one layout, read into plain numpy arrays with the canonical column
names.

Imports numpy, `preprocessing.tables`, `data.lookup` and the task registry (for the onset items).
Every reader returns what it read and the `tables.Source` of each table it opened (for meta.json
`sources`).
  * `load_core` reads PATIENTS / ADMISSIONS / ICUSTAYS (or the MIMIC-IV and diagnosis-extract
    equivalents), checks ids and times, and reports bad input as one-line `InputError`s.
  * `stream_events` streams the six event tables once, in blocks, keeping for every (stay, hour,
    variable) only the last value in the first T hours, plus the onset hour of the ARF and shock
    label items. Memory grows with that output, never with the size of CHARTEVENTS or LABEVENTS.
  * `read_diagnoses`, `read_drugs` and `read_notes` collect ICD diagnosis codes, drug codes and one
    note per admission; `load_trinetx` reads a diagnosis extract.
Times are int64 minutes since 1970-01-01 throughout (negative before 1970; `tables.NO_TIME` where
missing). A value that cannot be read is counted on its table's `Source` (`Source.skip`) with its
first row, never dropped without a count; an id written as an integral float ('100001.0') is that id
(`tables.parse_int`).
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np

from data import lookup
from folders import InputError
from preprocessing.tables import (ALIASES, LAYOUTS, NO_TIME, CsvLines, EmptyFile, Source, count_bad,
                                  decode, find_file, group_rank, header_names, integral_text,
                                  open_table, parse_float, parse_id, parse_int, parse_minutes,
                                  read_blocks, read_error, read_table, strip, unique)
from tasks import ICD_SYSTEMS, TASKS

# How each event table becomes (time, variable, value). `num` is read as a number, `value` as a
# category when `num` is empty; interval tables (`end`) are spread over every hour they overlap.
EVENT_TABLES = {
    "chartevents": dict(code=1, time="charttime", num="valuenum", value="value",
                        skip=("error", b"1")),
    "labevents": dict(code=2, time="charttime", num="valuenum", value="value"),
    "outputevents": dict(code=3, time="charttime", num="value"),
    "datetimeevents": dict(code=4, time="charttime"),
    "inputevents": dict(code=5, time="starttime", end="endtime", num="amount",
                        skip=("statusdescription", b"Rewritten")),
    "procedureevents": dict(code=6, time="starttime", end="endtime"),
}
VAR_SPAN = 10 ** 8  # variable key = table code * VAR_SPAN + itemid
STATIC_CATEGORIES = ("gender", "admission_type", "admission_location", "insurance", "language",
                     "religion", "marital_status", "race", "first_careunit")
MINUTES_PER_YEAR = 525960  # 365.25 days


def source_path(raw: Path, layout: str, table: str, required: bool) -> Path | None:
    path = find_file(raw, LAYOUTS[layout][table])
    if path is None and required:
        raise InputError(f"{raw}: missing core table {LAYOUTS[layout][table]}.csv[.gz] ({layout} "
                         "layout)")
    return path


def _times(table: dict, column: str, src: Source, required: bool) -> np.ndarray:
    """Minutes of a time column; empty is NO_TIME; an unparsable (or, if required, empty) value is
    an error."""
    values = strip(table[column])
    minutes, ok = parse_minutes(values)
    empty = np.char.str_len(values) == 0
    bad = ~ok & (~empty | required)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        shown = values[i].decode(errors="replace") or "(empty)"
        raise InputError(f"{src.path}: row {table['__row__'][i]}, column "
                         f"'{src.names.get(column, column)}': cannot read '{shown}' as a timestamp")
    return np.where(ok, minutes, NO_TIME)


def _keep(table: dict, good: np.ndarray, src: Source, reason: str, column: str) -> dict:
    """The rows of `table` (read whole) where `good`; the others are counted on `src` under
    `reason`, with the first one's value of `column`."""
    bad = np.flatnonzero(~good)
    if not len(bad):
        return table
    src.skip(reason, table["__row__"][bad], column, table[column][bad[0]])
    return {k: v[good] for k, v in table.items()}


def _with_ids(table: dict, columns: tuple[str, ...], src: Source) -> dict:
    """The rows of `table` whose id `columns` all parse; the others are skipped and counted per
    column."""
    for column in columns:
        table = _keep(table, parse_int(table[column])[1], src,
                      f"unparsable {src.names.get(column, column)}", column)
    return table


def _ids(table: dict, column: str, src: Source, unique: bool = False) -> np.ndarray:
    """An id column of rows kept by `_with_ids` as int64; `unique`: a repeated id is an
    InputError."""
    values, _ = parse_int(table[column])
    if unique:
        _check_unique(values, table, column, src)
    return values


def _check_unique(values: np.ndarray, table: dict, column: str, src: Source) -> None:
    """An InputError naming the first repeated id of `column` (ints or byte strings) and both of its
    rows."""
    order = np.argsort(values, kind="stable")
    dup = np.flatnonzero(values[order][1:] == values[order][:-1])
    if len(dup):
        i, j = order[dup[0]], order[dup[0] + 1]
        shown = values[j].decode(errors="replace") if isinstance(values[j], bytes) else values[j]
        raise InputError(f"{src.path}: row {table['__row__'][j]}, column "
                         f"'{src.names.get(column, column)}': duplicated id {shown} (first at row "
                         f"{table['__row__'][i]})")


def _read_core(raw: Path, layout: str, table: str, columns: dict) -> tuple[dict, Source]:
    """A core table read whole: ({column: S-array, "__row__": line numbers}, its Source); no rows is
    an error."""
    path = source_path(raw, layout, table, required=True)
    out, src = read_table(path, columns, ALIASES[layout])
    if len(out["__row__"]) == 0:
        raise InputError(f"{path}: the table has a header but no rows")
    return out, src


def load_core(raw: Path, layout: str) -> tuple[dict, dict]:
    """Patients, admissions and ICU stays of a MIMIC layout as records (dicts of arrays, the schemas
    of docs/preprocessing.md), and the Source of each table read: ({"patients", "admissions",
    "stays"}, sources)."""
    mimic3 = layout == "mimic3"
    patient_table, patient_src = _read_core(raw, layout, "patients", {
        "subject_id": True, "gender": True, "dob": mimic3, "anchor_age": not mimic3,
        "anchor_year": not mimic3})
    admission_columns = {"subject_id": True, "hadm_id": True, "admittime": True, "dischtime": True,
                         "deathtime": False, "hospital_expire_flag": False}
    admission_columns.update({c: False for c in STATIC_CATEGORIES
                              if c not in ("gender", "first_careunit")})
    admission_table, admission_src = _read_core(raw, layout, "admissions", admission_columns)
    stay_table, stay_src = _read_core(raw, layout, "icustays", {
        "subject_id": True, "hadm_id": True, "stay_id": True, "dbsource": False,
        "first_careunit": False, "intime": True, "outtime": False})
    patient_table = _with_ids(patient_table, ("subject_id",), patient_src)
    admission_table = _with_ids(admission_table, ("subject_id", "hadm_id"), admission_src)
    stay_table = _with_ids(stay_table, ("subject_id", "hadm_id", "stay_id"), stay_src)
    if not mimic3:
        patient_table = _with_numbers(patient_table, ("anchor_age", "anchor_year"), patient_src)
    patients = {"subject_id": _ids(patient_table, "subject_id", patient_src, unique=True),
                "gender": decode(patient_table["gender"])}
    if mimic3:
        patients["dob"] = _times(patient_table, "dob", patient_src, required=True)
    else:
        patients["anchor_age"] = parse_float(patient_table["anchor_age"])
        patients["anchor_year"] = parse_float(patient_table["anchor_year"])

    def admission_times(column, required):
        return _times(admission_table, column, admission_src, required)
    admissions = {"hadm_id": _ids(admission_table, "hadm_id", admission_src, unique=True),
                  "subject_id": _ids(admission_table, "subject_id", admission_src),
                  "admittime": admission_times("admittime", True),
                  "dischtime": admission_times("dischtime", True),
                  "deathtime": admission_times("deathtime", False)
                  if "deathtime" in admission_table else None}
    flag = admission_table.get("hospital_expire_flag")
    admissions["died"] = is_one(flag) if flag is not None else admissions["deathtime"] != NO_TIME
    for c in STATIC_CATEGORIES:
        if c in admission_table:
            admissions[c] = decode(admission_table[c])
    stays = {"stay_id": _ids(stay_table, "stay_id", stay_src, unique=True),
             "hadm_id": _ids(stay_table, "hadm_id", stay_src),
             "subject_id": _ids(stay_table, "subject_id", stay_src),
             "intime": _times(stay_table, "intime", stay_src, True),
             "outtime": _times(stay_table, "outtime", stay_src, False),
             "first_careunit": decode(stay_table["first_careunit"])
             if "first_careunit" in stay_table else None,
             # MIMIC-IV is all MetaVision; MIMIC-III says per stay (CareVue stays chart other
             # itemids)
             "metavision": (np.char.lower(np.char.strip(stay_table["dbsource"])) == b"metavision")
             if "dbsource" in stay_table else np.ones(len(stay_table["__row__"]), bool)}
    return ({"patients": patients, "admissions": admissions, "stays": stays},
            {"patients": patient_src, "admissions": admission_src, "icustays": stay_src})


def _with_numbers(table: dict, columns: tuple[str, ...], src: Source) -> dict:
    """The rows of `table` whose number `columns` (an age, a year) all parse; the others are skipped
    and counted per column, as a patient without an age has no place in an age-matched cohort."""
    for column in columns:
        table = _keep(table, np.isfinite(parse_float(table[column])), src,
                      f"unreadable {src.names.get(column, column)}", column)
    return table


def is_one(flags: np.ndarray) -> np.ndarray:
    """A 0/1 flag column (an S array) -> bool: '1', also written '1.0' (pandas, for a column with
    blanks)."""
    values, ok = parse_int(flags)
    return ok & (values == 1)


def age_at(patients: dict, rows: np.ndarray, minutes: np.ndarray) -> np.ndarray:
    """Age in years of patients[rows] at `minutes`. MIMIC-III shifts ages over 89 to about
    300 years: they become 91.4 (FIDDLE extract_data.py); MIMIC-IV gives anchor_age at anchor_year;
    a diagnosis extract gives the year of birth."""
    year = 1970 + minutes / MINUTES_PER_YEAR
    if "dob" in patients:
        age = (minutes - patients["dob"][rows]) / MINUTES_PER_YEAR
        return np.where(age > 89, 91.4, age)  # fidelity: FIDDLE
    if "anchor_age" in patients:
        return patients["anchor_age"][rows] + np.floor(year) - patients["anchor_year"][rows]
    return np.floor(year) - patients["year_of_birth"][rows]


def variable_names(raw: Path, layout: str, keys: np.ndarray) -> tuple[dict, list]:
    """Readable names of event variables, 'chart 220045 Heart Rate' (labels from
    D_ITEMS / D_LABITEMS when the extract has them, else 'chart 220045'): ({variable key: name}, the
    Source of each label table read; an empty one is left out, `Source.empty`)."""
    tables = {spec["code"]: name[:-len("events")] for name, spec in EVENT_TABLES.items()}
    names = {int(k): f"{tables[int(k) // VAR_SPAN]} {int(k) % VAR_SPAN}" for k in unique(keys)}
    sources = []
    for table in ("d_items", "d_labitems"):
        path = source_path(raw, layout, table, required=False) if table in LAYOUTS[layout] else None
        if path is None:
            continue
        try:
            t, src = read_table(path, {"itemid": True, "label": True})
        except EmptyFile:
            sources.append(Source(path, empty=True))
            continue
        sources.append(src)
        ids, ok = parse_int(t["itemid"])
        labels = dict(zip(ids[ok].tolist(), decode(t["label"][ok])))
        for k in names:
            is_lab = k // VAR_SPAN == EVENT_TABLES["labevents"]["code"]
            if (table == "d_labitems") == is_lab and k % VAR_SPAN in labels:
                names[k] += f" {labels[k % VAR_SPAN]}"
    return names, sources


# ------------------------------------------------------------------------------------------- events
def _last_per_key(key, minutes, num, cat):
    """Keep, for every key, the row with the latest time (FIDDLE: the last value in each hour)."""
    # by key, then time: last one wins
    order = np.lexsort((minutes, key))
    key = key[order]
    last = np.append(key[1:] != key[:-1], True) if len(key) else np.zeros(0, bool)
    keep = order[last]
    return key[last], minutes[keep], num[keep], cat[keep]


class StayIndex:
    """Finds, for an event (hadm_id, time), the ICU stays of that admission it falls in, vectorised.

    An event belongs to every stay whose [intime, outtime) holds it: two stays of one admission that
    overlap in time (a short stay recorded inside a long one) each get the events of the overlap, so
    that neither loses hours of its record. The stays are dealt into layers in which the stays of an
    admission do not overlap (one layer where none do, the usual case), and each layer is searched
    by (admission, intime)."""

    def __init__(self, hadm_id: np.ndarray, intime: np.ndarray, outtime: np.ndarray):
        self.hadms = unique(hadm_id)
        h = np.searchsorted(self.hadms, hadm_id)
        self.t0 = int(intime.min()) if len(intime) else 0
        self.intime, self.outtime = intime, outtime
        layer, self.overlaps = _overlap_layers(h, intime, outtime)
        self.layers = []
        for rows in (np.flatnonzero(layer == k) for k in range(int(layer.max(initial=0)) + 1)):
            # stays sorted by (admission, intime)
            key = h[rows] * 2 ** 34 + (intime[rows] - self.t0)
            order = np.argsort(key, kind="stable")
            self.layers.append((rows[order], key[order], h[rows][order]))

    def admissions(self, hadm: np.ndarray) -> np.ndarray:
        """Mask of events whose admission has a stay in the index."""
        return lookup(self.hadms, hadm) >= 0

    def match(self, hadm: np.ndarray, minutes: np.ndarray):
        """(event index, stay row, minutes since that stay's intime) for each (event, stay) pair
        with the event inside [intime, outtime) of the stay: in event order, once per stay that
        holds the event."""
        h = np.searchsorted(self.hadms, hadm)
        found = []
        for rows, key, stay_h in self.layers:
            pos = np.maximum(
                np.searchsorted(key, h * 2 ** 34 + (minutes - self.t0), side="right") - 1, 0)
            row = rows[pos]
            since = minutes - self.intime[row]
            ok = ((stay_h[pos] == h) & (since >= 0) & (minutes < self.outtime[row])
                  & (minutes >= self.t0))
            found.append((np.flatnonzero(ok), row[ok], since[ok]))
        return tuple(np.concatenate(parts) for parts in zip(*found)) if len(found) > 1 else found[0]


def _overlap_layers(h: np.ndarray, intime: np.ndarray,
                    outtime: np.ndarray) -> tuple[np.ndarray, list]:
    """(layer of each stay, the pairs of stay rows that overlap in time): in each layer no two stays
    of one admission (`h`) overlap; a stay goes to the first layer whose last stay of its admission
    ended by its intime."""
    layer = np.zeros(len(h), np.int64)
    order = np.lexsort((intime, h))
    t0 = int(intime.min()) if len(h) else 0
    # h ascending: a running max per admission
    key = h[order] * 2 ** 34 + (np.maximum(outtime, intime)[order] - t0)
    # of the earlier stays
    latest_end = np.append(-1, np.maximum.accumulate(key)[:-1]) - h[order] * 2 ** 34 + t0
    same = np.append(False, h[order][1:] == h[order][:-1])
    if not (same & (intime[order] < latest_end)).any():
        # the usual case: no stay overlaps another
        return layer, []
    # admission -> [(outtime, row) of the last stay per layer]
    overlaps, last = [], {}
    for i in order.tolist():
        ends = last.setdefault(int(h[i]), [])
        overlaps += [(j, i) for end, j in ends if end > intime[i]]
        k = next((k for k, (end, _) in enumerate(ends) if end <= intime[i]), len(ends))
        ends[k:k + 1] = [(int(outtime[i]), i)]
        layer[i] = k
    return layer, overlaps


BUCKET_STAYS = 2048   # stays per bucket of the EventStore: bounds the temporaries of a merge


class EventStore:
    """Accumulates (stay, hour, variable) -> last value in buckets of `bucket_stays` consecutive
    stays, each merged on its own when it has doubled, so memory tracks the output and a merge never
    holds more than one bucket's temporaries (a single store merged whole peaked at about 3x the
    output on a MIMIC-III-sized extract)."""

    def __init__(self, bucket_stays: int | None = None):
        self.bucket_stays = bucket_stays or BUCKET_STAYS
        # bucket -> {"parts": [(key, minutes, num, cat) sorted], "size", "reduced"}
        self.buckets: dict[int, dict] = {}
        self.categories: dict[bytes, int] = {}

    def category_ids(self, values: np.ndarray) -> np.ndarray:
        uniq, inverse = unique(values, return_inverse=True)
        ids = np.array([self.categories.setdefault(u, len(self.categories)) for u in uniq.tolist()],
                       np.int32)
        return ids[inverse] if len(uniq) else np.zeros(0, np.int32)

    def add(self, stay, hour, var, minutes, num, cat) -> None:
        key = ((stay.astype(np.int64) << 8) | hour) << 34 | var     # stay | hour | variable key
        bucket = stay // self.bucket_stays
        order = np.argsort(bucket, kind="stable")
        for rows in (np.split(order, np.flatnonzero(np.diff(bucket[order])) + 1)
                     if len(order) else []):
            b = self.buckets.setdefault(int(bucket[rows[0]]),
                                        {"parts": [], "size": 0, "reduced": 0})
            b["parts"].append(_last_per_key(key[rows], minutes[rows], num[rows].astype(np.float32),
                                            cat[rows].astype(np.int32)))
            b["size"] += len(rows)
            if b["size"] > 2 * b["reduced"] + (1 << 16):            # amortised: merge when doubled
                self._reduce(b)

    @staticmethod
    def _reduce(b: dict) -> None:
        b["parts"] = [_last_per_key(*(np.concatenate(c) for c in zip(*b["parts"])))]
        b["size"] = b["reduced"] = len(b["parts"][0][0])

    def result(self) -> dict:
        """Every (stay, hour, variable)'s last value, sorted by stay, hour and variable: "stay"
        int32, "hour" uint8, "var" int32 (an index into "var_keys", the sorted variable keys), "num"
        float32, "cat" int32 (an index into "category_names", -1: none). Built bucket by bucket into
        preallocated arrays, each bucket freed once copied."""
        for b in self.buckets.values():
            self._reduce(b)
        var_mask = 2 ** 34 - 1
        var_keys = unique(np.concatenate([np.zeros(0, np.int64)]
                                         + [unique(b["parts"][0][0] & var_mask)
                                            for b in self.buckets.values()]))
        n = sum(b["size"] for b in self.buckets.values())
        out = {name: np.empty(n, dtype) for name, dtype in EVENT_ARRAYS.items()}
        at = 0
        for bucket in sorted(self.buckets):
            key, _, num, cat = self.buckets.pop(bucket)["parts"][0]
            rows = slice(at, at + len(key))
            out["stay"][rows], out["hour"][rows] = key >> 42, (key >> 34) & 255
            out["var"][rows], out["num"][rows], out["cat"][rows] = (
                np.searchsorted(var_keys, key & var_mask), num, cat)
            at += len(key)
        names = {v: k.decode("utf-8", "replace").strip() for k, v in self.categories.items()}
        return {**out, "var_keys": var_keys,
                "category_names": [names[i] for i in range(len(names))]}


# per event
EVENT_ARRAYS = {"stay": np.int32, "hour": np.uint8, "var": np.int32,
                "num": np.float32, "cat": np.int32}


def stream_events(raw: Path, layout: str, index: StayIndex, n_stays: int, *, hours: int,
                  exclude_label_items: bool, progress) -> tuple[dict, dict, dict, dict]:
    """Stream every event table once; returns (events, onsets, skipped counts, the Source of each
    table read). `events` holds the last value of each (stay, hour, variable) in the first `hours`
    hours (EventStore.result); `onsets` maps each task with onset items (tasks.TASKS: ARF, shock) to
    the first onset hour per stay (inf where never). `progress(name, total_bytes)` is a context
    giving an advance(bytes) callback."""
    store, sources = EventStore(), {}
    onset_keys = {name: _keys(task.onset_items) for name, task in TASKS.items() if task.onset_items}
    onsets = {name: np.full(n_stays, np.inf) for name in onset_keys}
    skipped = {}
    for table, spec in EVENT_TABLES.items():
        path = source_path(raw, layout, table, required=False)
        if path is None:
            skipped[table] = "missing (optional table)"
            continue
        src = sources[table] = Source(path)          # registered even if the file turns out empty
        cols = {"hadm_id": True, spec["time"]: True, "itemid": True}
        cols.update({spec[k]: False for k in ("num", "value", "end") if k in spec})
        if "skip" in spec:
            cols[spec["skip"][0]] = False
        src.used = 0
        try:
            with progress(table, path.stat().st_size) as advance:
                done = 0
                for block in read_blocks(src, cols, ALIASES[layout]):
                    src.used += _event_block(block, spec, src=src, index=index, hours=hours,
                                             store=store, onsets=onsets, onset_keys=onset_keys,
                                             exclude_label_items=exclude_label_items)
                    advance(src.bytes_read - done)
                    done = src.bytes_read
        except EmptyFile:
            skipped[table] = "empty file (optional table)"
            continue
        skipped[table] = {**{reason: src.skipped.get(reason, 0) for reason in _reasons(spec)},
                          **src.skipped}
        if src.bad_rows:
            skipped[table]["malformed rows"] = src.bad_rows
    return store.result(), onsets, skipped, sources


def _reasons(spec: dict) -> tuple[str, ...]:
    """The counts every event table records in meta.json `skipped`, zero or not (any other reason
    when it occurs)."""
    return (("unparsable time", "unparsable itemid")
            + (("unparsable number",) if "num" in spec else ()))


def _keys(items) -> np.ndarray:
    return np.array([EVENT_TABLES[t]["code"] * VAR_SPAN + i for t, i in items], dtype=np.int64)


def _event_block(block, spec, *, src, index, hours, store, onsets, onset_keys,
                 exclude_label_items) -> int:
    """One block of an event table into the accumulators of `stream_events` (the store of last
    values, the onset hours); rows with a bad value are counted on `src`. Returns the number of rows
    that gave a stay an event or an onset. A blank hadm_id is a row outside any admission
    (MIMIC-III's outpatient labs)."""
    hadm, ok, _ = _admission_ids(src, block["hadm_id"], block.rows)
    sel = np.flatnonzero(ok & index.admissions(hadm))                    # rows of cohort admissions
    # error rows, rewritten orders
    if "skip" in spec and spec["skip"][0] in block:
        sel = sel[~_skipped_by_design(spec["skip"], block.get(spec["skip"][0], sel))]
    start, ok = parse_minutes(block.get(spec["time"], sel))
    _skip_bad(src, block, spec["time"], sel[~ok], reason="unparsable time")
    sel, start, hadm = sel[ok], start[ok], hadm[sel[ok]]
    # an event in two stays: once for each
    event, stay, since = index.match(hadm, start)
    sel, start = sel[event], start[event]
    item, ok = parse_int(block.get("itemid", sel))
    _skip_bad(src, block, "itemid", sel[~ok])
    var = spec["code"] * VAR_SPAN + item
    onset = np.zeros(len(sel), bool)
    # onsets over the whole stay
    for name, keys in onset_keys.items():
        hit = ok & np.isin(var, keys)
        np.minimum.at(onsets[name], stay[hit], since[hit] / 60.0)
        onset |= hit
        if exclude_label_items:
            ok &= ~hit
    # features: first T hours only
    ok &= since < hours * 60
    used = int((ok | onset).sum())
    sel, start, stay, since, var = sel[ok], start[ok], stay[ok], since[ok], var[ok]
    num = np.full(len(sel), np.nan)
    if "num" in spec and spec["num"] in block:
        text = np.char.strip(block.get(spec["num"], sel))
        num = parse_float(text)
        # kept: a category or a presence
        bad = np.isnan(num) & (text != b"") & (np.char.lower(text) != b"nan")
        _skip_bad(src, block, spec["num"], sel[bad], reason="unparsable number", kept=True)
    cat = np.full(len(sel), -1, np.int32)
    # categorical where not numeric
    if "value" in spec and spec["value"] in block:
        text = np.isnan(num)
        values = np.char.strip(block.get(spec["value"], sel[text]))
        cat[text] = np.where(values == b"", -1, store.category_ids(values))
    hour = since // 60
    # spread intervals over hours
    if "end" in spec and spec["end"] in block:
        end, ok = parse_minutes(block.get(spec["end"], sel))
        last = np.where(ok, (end - start + since - 1) // 60, hour)
        span = np.clip(np.minimum(last, hours - 1) - hour + 1, 1, hours)
        rep = np.repeat(np.arange(len(sel)), span)
        # the hours the interval covers
        hour = hour[rep] + group_rank(span)
        stay, var, start, num, cat = stay[rep], var[rep], start[rep], num[rep], cat[rep]
    store.add(stay, hour, var, start, num, cat)
    return used


def _admission_ids(src: Source, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """A hadm_id column (S array; `rows` its line numbers) -> (ids, ok, blank); a value that is
    neither an id nor blank is counted on `src`."""
    hadm, ok = parse_int(values)
    blank = np.zeros(len(values), bool)
    # (ok is the usual case: no pass over it)
    blank[~ok] = np.char.str_len(strip(values[~ok])) == 0
    bad = np.flatnonzero(~ok & ~blank)
    if len(bad):
        src.skip(f"unparsable {src.names.get('hadm_id', 'hadm_id')}", rows[bad],
                 "hadm_id", values[bad[0]])
    return hadm, ok, blank


def _skip_bad(src: Source, block, column: str, rows: np.ndarray, reason: str | None = None,
              kept: bool = False) -> None:
    """Count on `src` the rows `rows` (indices into `block`) with a bad value in `column`
    (Source.skip)."""
    if len(rows):
        src.skip(reason or f"unparsable {src.names.get(column, column)}", block.rows[rows], column,
                 block.get(column, rows[:1])[0], kept)


def _skipped_by_design(rule: tuple, values: np.ndarray) -> np.ndarray:
    """Rows an event table marks as not to be used: a flag column of 1 (CHARTEVENTS error, '1' or
    '1.0'), or a column of a given value (INPUTEVENTS_MV statusdescription 'Rewritten')."""
    column, value = rule
    return is_one(values) if value == b"1" else np.char.strip(values) == value


# ------------------------------------------------------------------------------------------- codes
def read_diagnoses(raw: Path, layout: str, systems: tuple[str, ...],
                   known: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict, Source]:
    """(hadm_id, namespaced ICD code) pairs of a MIMIC layout for the ICD `systems` kept ("9",
    "10"), counts of the rows dropped (another system, rows without code or admission) and the
    table's Source, which counts the rows with a bad hadm_id or icd_version, or one not in `known`
    (sorted, the admissions table's). MIMIC-III has no icd_version column: every row is ICD-9;
    MIMIC-IV needs it (a code's system is never guessed)."""
    path = source_path(raw, layout, "diagnoses", required=True)
    table, src = read_table(path, {"hadm_id": True, "icd_code": True,
                                   "icd_version": layout == "mimic4"},
                            ALIASES[layout])
    n = len(table["__row__"])
    version = integral_text(table["icd_version"]) if "icd_version" in table else np.full(n, b"9")
    codes, kept, counts = namespace_icd(table["icd_code"], version, systems)
    unknown = np.flatnonzero(~np.isin(version, [s.encode() for s in ICD_SYSTEMS]))
    # a bad value here, where a diagnosis extract's other systems are not
    if len(unknown):
        counts.pop("rows of another or no ICD version")
        src.skip("unknown icd_version", table["__row__"][unknown], "icd_version",
                 table["icd_version"][unknown[0]])
    hadm, ok, blank = _admission_ids(src, table["hadm_id"], table["__row__"])
    counts["rows without code or admission"] = (counts.pop("rows without code")
                                                + int((kept & blank).sum()))
    ok &= _known_admissions(src, table["hadm_id"], table["__row__"], hadm, ok, known)
    src.used = int((kept & ok).sum())
    return hadm[kept & ok], codes[kept & ok], counts, src


def _known_admissions(src: Source, values: np.ndarray, rows: np.ndarray,
                      hadm: np.ndarray, ok: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Mask of the rows whose hadm_id (`values`, parsed: `hadm` where `ok`) is in `known`; the
    others (of a parsed id) are counted on `src`."""
    found = lookup(known, hadm) >= 0
    unknown = np.flatnonzero(ok & ~found)
    if len(unknown):
        src.skip("unknown hadm_id", rows[unknown], "hadm_id", values[unknown[0]])
    return found


def namespace_icd(codes: np.ndarray, version: np.ndarray, systems: tuple[str, ...]):
    """Raw codes and their ICD version (S arrays; b"9", b"10", anything else unknown) -> (codes as
    the vocabulary spells them, b'ICD9:4280' / b'ICD10:I5020' (tasks.ICD_SYSTEMS), a keep mask: a
    code of a kept system, and the counts of the rows dropped)."""
    codes = normalise_icd(codes)
    out, chosen, counts = np.zeros(len(codes), "S1"), np.zeros(len(codes), bool), {}
    for system, prefix in ICD_SYSTEMS.items():
        rows = version == system.encode()
        if system in systems:
            out, chosen = np.where(rows, np.char.add(prefix.encode(), codes), out), chosen | rows
        else:
            counts[f"ICD-{system} rows dropped (--icd {system_option(systems)})"] = int(rows.sum())
    counts["rows without code"] = int((chosen & (codes == b"")).sum())
    unknown = int((~np.isin(version, [s.encode() for s in ICD_SYSTEMS])).sum())
    if unknown:
        counts["rows of another or no ICD version"] = unknown
    return out, chosen & (codes != b""), counts


def system_option(systems: tuple[str, ...]) -> str:
    """("9", "10") -> "both", ("9",) -> "9": the --icd value that keeps `systems`."""
    return "both" if len(systems) > 1 else systems[0]


def normalise_icd(codes: np.ndarray) -> np.ndarray:
    """'428.0 ' -> b'4280', 'i50.20' -> b'I5020': MIMIC stores ICD codes without the dot, TriNetX
    with it."""
    # np.char.replace fails on an empty array (a header-only table)
    if len(codes) == 0:
        return codes
    return np.char.upper(np.char.replace(np.char.strip(codes), b".", b""))


def read_drugs(raw: Path, layout: str, code: str, known: np.ndarray,
               progress) -> tuple[np.ndarray, np.ndarray, Source | None]:
    """(hadm_id, drug code) pairs from PRESCRIPTIONS and its Source (None without the table; `empty`
    when it has no header), which counts the rows without a readable hadm_id or with one not in
    `known` (sorted, the admissions table's); `code` names the column (drug, ndc or gsn)."""
    path = source_path(raw, layout, "prescriptions", required=False)
    if path is None:
        return np.zeros(0, np.int64), np.zeros(0, "S1"), None
    src = Source(path)
    hadms, codes = [np.zeros(0, np.int64)], [np.zeros(0, "S1")]
    with progress("prescriptions", path.stat().st_size) as advance:
        done = 0
        try:
            for block in read_blocks(src, {"hadm_id": True, code: True}, ALIASES[layout]):
                hadm, ok, blank = _admission_ids(src, block["hadm_id"], block.rows)
                _skip_bad(src, block, "hadm_id", np.flatnonzero(blank), reason="blank hadm_id")
                ok &= _known_admissions(src, block["hadm_id"], block.rows, hadm, ok, known)
                value = np.char.lower(np.char.strip(block.get(code, ok)))
                good = (value != b"") & (value != b"0")
                hadms.append(hadm[ok][good])
                codes.append(value[good])
                advance(src.bytes_read - done)
                done = src.bytes_read
        except EmptyFile:
            pass                                          # src.empty: warned at the end of the run
    src.used = sum(len(h) for h in hadms)
    return np.concatenate(hadms), np.concatenate(codes), src


# ------------------------------------------------------------------------------------------- notes
def find_notes(raw: Path, notes: Path | None, layout: str) -> Path | None:
    """The note table: --notes (a file, or a folder holding NOTEEVENTS*/discharge*), else the
    layout's own."""
    if notes is None:
        return source_path(raw, layout, "notes", required=False) if layout != "trinetx" else None
    if notes.is_file():
        return notes
    for folder in (notes, notes / "note"):
        if folder.is_dir():
            hits = sorted(p for p in folder.iterdir()
                          if p.name.lower().startswith(("noteevents", "discharge"))
                          and p.name.lower().endswith((".csv", ".csv.gz")))
            twins = [p for p in hits[1:] if _stem(p) == _stem(hits[0])]   # X.csv beside X.csv.gz
            if twins:
                raise InputError(f"{folder}: both {hits[0].name} and {twins[0].name} match the "
                                 "note table; keep only one of them")
            if hits:
                return hits[0]
    raise InputError(f"{notes}: no NOTEEVENTS*.csv[.gz] or discharge.csv[.gz] found for --notes")


def _stem(path: Path) -> str:
    name = path.name.lower()
    return name[:-len(".gz")][:-len(".csv")] if name.endswith(".gz") else name[:-len(".csv")]


def read_notes(path: Path, hadms: set, progress) -> tuple[dict, dict, Source]:
    """One text per admission: its latest discharge summary (MIMIC-III category 'Discharge summary',
    MIMIC-IV-Note discharge table), error rows (iserror = 1) skipped. Returns ({hadm_id: text},
    counts, the table's Source).
    Rows of another field count are skipped and counted ("malformed rows"); a quote that never
    closes stops the run (tables.CsvLines), as it would otherwise swallow every later note."""
    src = Source(path)
    chosen, done = {}, 0
    counts = {"rows": 0, "malformed rows": 0, "error rows": 0, "other categories": 0,
              "unknown admission": 0}
    raw, stream = open_table(src)
    f = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    with raw, f, progress("notes", path.stat().st_size) as advance:
        try:
            watch = CsvLines(src, f)
            rows = watch.rows()
            col, watch.n_fields = _note_columns(src, next(rows, (0, []))[1])
            for i, row in rows:
                if len(row) != watch.n_fields:
                    count_bad(src, [i] if row else [])
                    continue
                counts["rows"] += 1
                hadm = _note_admission(src, i, row, col, hadms, counts)
                if hadm is not None:
                    when = tuple(row[col[c]]
                                 for c in ("chartdate", "charttime", "note_seq") if c in col) + (i,)
                    if hadm not in chosen or when >= chosen[hadm][0]:   # the latest one wins
                        chosen[hadm] = (when, row[col["text"]])
                if i % 1024 == 0:
                    advance(raw.bytes_read - done)
                    done = raw.bytes_read
        except (OSError, EOFError, zlib.error) as err:
            raise read_error(src, err) from None
        advance(raw.bytes_read - done)
    src.rows, src.sha256, counts["malformed rows"] = (counts["rows"], raw.digest.hexdigest(),
                                                      src.bad_rows)
    return {h: text for h, (_, text) in chosen.items()}, counts, src


def _note_columns(src: Source, header: list[str]) -> tuple[dict, int]:
    """{column: position} of the note table's columns read, and its number of columns; no header is
    EmptyFile."""
    header = header_names(src.path, header)
    if not any(header):
        src.empty = True
        raise EmptyFile(f"{src.path}: the file is empty (no header line)")
    if "hadm_id" not in header or "text" not in header:
        raise InputError(f"{src.path}: a note table needs columns hadm_id and text (columns are: "
                         f"{', '.join(header)})")
    return {c: header.index(c) for c in ("hadm_id", "text", "category", "iserror", "chartdate",
                                         "charttime", "note_seq") if c in header}, len(header)


def _note_admission(src: Source, i: int, row: list[str], col: dict, hadms: set,
                    counts: dict) -> int | None:
    """The admission note row `i` belongs to, or None (counted) for error rows (iserror '1' or
    '1.0'), other categories, admissions not in `hadms` (or none) and a hadm_id that does not parse
    (counted on `src`)."""
    if "iserror" in col and parse_id(row[col["iserror"]]) == 1:
        counts["error rows"] += 1
        return None
    if "category" in col and row[col["category"]].strip().lower() != "discharge summary":
        counts["other categories"] += 1
        return None
    text = row[col["hadm_id"]]
    hadm = parse_id(text)
    if hadm is None and text.strip():
        src.skip("unparsable hadm_id", [i], "hadm_id", text.encode())
        return None
    if hadm not in hadms:
        counts["unknown admission"] += 1
        return None
    return hadm


def code_system_version(names: np.ndarray) -> np.ndarray:
    """A diagnosis extract's code_system ('ICD-10-CM', 'ICD-9-CM', 'icd10', ...) -> b"10", b"9" or
    b"" (another)."""
    if len(names) == 0:                    # np.char.replace fails on an empty array
        return names
    names = np.char.replace(np.char.replace(np.char.upper(strip(names)), b"-", b""), b" ", b"")
    return np.where(np.char.startswith(names, b"ICD10"), b"10",
                    np.where(np.char.startswith(names, b"ICD9"), b"9", b""))


def load_trinetx(raw: Path, systems: tuple[str, ...]) -> tuple[dict, dict]:
    """A diagnosis extract: patients (sex, year of birth) and dated ICD codes (namespace_icd) per
    encounter, and the Source of each table: ({"patients", "diagnoses", "counts"}, sources). Ids
    stay byte strings here (TriNetX ids need not be numbers; '100001.0' is '100001');
    build.build_trinetx numbers them. Rows without an id, patients without a year of birth and
    diagnoses of a patient not in the patient table are skipped, counted."""
    patient_table, patient_src = _read_core(raw, "trinetx", "patients",
                                            {"subject_id": True, "sex": True,
                                             "year_of_birth": True})
    diagnosis_table, diagnosis_src = _read_core(raw, "trinetx", "diagnoses", {
        "subject_id": True, "hadm_id": True, "date": True, "code": True, "code_system": True})
    patient_table = _with_numbers(_with_text_ids(patient_table, ("subject_id",), patient_src),
                                  ("year_of_birth",), patient_src)
    _check_unique(patient_table["subject_id"], patient_table, "subject_id", patient_src)
    diagnosis_table = _with_text_ids(diagnosis_table, ("subject_id", "hadm_id"), diagnosis_src)
    diagnosis_table = _keep(diagnosis_table,
                            np.isin(diagnosis_table["subject_id"], patient_table["subject_id"]),
                            diagnosis_src, "unknown patient_id", "subject_id")
    version = code_system_version(diagnosis_table["code_system"])
    codes, keep, counts = namespace_icd(diagnosis_table["code"], version, systems)
    kept = {k: v[keep] for k, v in diagnosis_table.items()}
    patients = {"subject_id": patient_table["subject_id"], "gender": decode(patient_table["sex"]),
                "year_of_birth": parse_float(patient_table["year_of_birth"])}
    diagnoses = {"subject_id": kept["subject_id"], "hadm_id": kept["hadm_id"],
                 "date": _times(kept, "date", diagnosis_src, required=True), "code": codes[keep]}
    diagnosis_src.used = len(diagnoses["code"])
    return ({"patients": patients, "diagnoses": diagnoses, "counts": counts},
            {"patients": patient_src, "diagnoses": diagnosis_src})


def _with_text_ids(table: dict, columns: tuple[str, ...], src: Source) -> dict:
    """`table` with its id `columns` as canonical text (stripped, '100001.0' -> '100001'; ids need
    not be numbers), less the rows where one is blank (skipped and counted per column)."""
    table = dict(table, **{c: integral_text(table[c]) for c in columns})
    for column in columns:
        table = _keep(table, table[column] != b"", src, f"blank {src.names.get(column, column)}",
                      column)
    return table
