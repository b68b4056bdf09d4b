"""MEDS input: `preprocess --raw MEDS_ROOT` reads a MEDS extract (data/**/*.parquet + metadata/)
into the same processed folder as the CSV layouts.

Usage: `pipeline.preprocess` calls `build_meds(cfg, raw, "meds", rep=rep, note_cache=cache)` when
`is_meds_root(raw)`. It reads the extract in one pass (meds_scan.Scan) under a profile
(meds_profile: the role of each code, chosen from metadata/dataset.json or --meds-profile) and hands
the records to `build.build_mimic` through `MedsReader`, so cohorts, features, codes, notes and
labels are built by the same code as for CSV extracts. Splits come from
metadata/subject_splits.parquet when it is there. pyarrow is an optional dependency
(requirements-meds.txt), imported only here and in meds_write; without it a MEDS root is one line
saying what to install. The schema is checked here, file by file, before any event is read
(docs/meds.md).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
from pathlib import Path
from queue import Queue
from threading import Thread

import numpy as np

from data import MEDS_INSTALL, MEDS_SPLIT_NAMES, SPLITS, lookup
from folders import InputError
from preprocessing.build import Built, build_mimic
from preprocessing.cohorts import assign_splits
from preprocessing.extract import StayIndex, find_notes, namespace_icd
from preprocessing.meds_profile import load_profile
from preprocessing.meds_scan import BY_DESIGN, Scan
from preprocessing.tables import NO_TIME
from tasks import TASKS

# rows per record batch: large enough to amortise numpy calls, ~40 MB of columns
BATCH_ROWS = 1 << 20
# -> index into data.SPLITS
MEDS_SPLITS = {meds: SPLITS.index(ours) for ours, meds in MEDS_SPLIT_NAMES.items()}
REQUIRED = ("subject_id", "time", "code")


def pyarrow():
    """(pyarrow, pyarrow.parquet, pyarrow.compute), or one InputError line saying what to
    install."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading or writing MEDS needs pyarrow, which is not installed: "
                         f"{MEDS_INSTALL}") from None
    return pa, pq, pc


def is_meds_root(raw: Path) -> bool:
    """A MEDS root holds data/ and metadata/ folders (the MEDS layout on disk)."""
    return (Path(raw) / "data").is_dir() and (Path(raw) / "metadata").is_dir()


def data_files(root: Path) -> list[Path]:
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise InputError(f"{root / 'data'}: no .parquet files (MEDS data lives in "
                         "data/**/*.parquet)")
    return files


def read_dataset_json(root: Path) -> dict:
    path = root / "metadata" / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


# ------------------------------------------------------------------------------------------- schema
def check_schema(path: Path, schema, profile: dict) -> list[str]:
    """The columns to read from one data file, after checking the MEDS schema: subject_id integer,
    time a timestamp, code a string (required), numeric_value a float and text_value a string
    (optional), and the profile's id columns integers; extra columns are allowed. A violation is one
    InputError line."""
    pa = pyarrow()[0]
    names = schema.names
    for column in REQUIRED:
        if column not in names:
            raise InputError(f"{path}: missing column {column!r} (MEDS data needs "
                             f"{', '.join(REQUIRED)}; columns are: {', '.join(names)})")
    types = pa.types
    ids = [c for c in (profile["admission_id"], profile.get("stay_id")) if c and c != "subject"]
    checks = {"subject_id": types.is_integer, "time": types.is_timestamp, "code": _is_string,
              "numeric_value": types.is_floating, "text_value": _is_string,
              **{c: types.is_integer for c in ids},
              **{c: _is_string for c in profile["admission_columns"]}}
    for column, ok in checks.items():
        if column in names and not ok(schema.field(column).type):
            raise InputError(f"{path}: column {column!r} is {schema.field(column).type}, not of "
                             "the MEDS type (subject_id int64, time timestamp[us], code string, "
                             "numeric_value float32, text_value string; id columns integers)")
    missing = [c for c in ids if c not in names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r}, which profile {profile['name']} reads "
                         "ids from; choose another --meds-profile or give the profile "
                         "\"admission_id\": \"subject\"")
    return [c for c in (*REQUIRED, "numeric_value", "text_value", *ids,
                        *profile["admission_columns"]) if c in names]


def _is_string(t) -> bool:
    pa = pyarrow()[0]
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def columns(batch, scan: Scan, profile: dict) -> dict:
    """One record batch as the numpy columns the scan reads: subject, minutes (NO_TIME: null), code
    (global code id, -1: null), num (float32, NaN: null), text and each admission column (global
    string ids, -1: null), hadm and stay (int64, -1: null)."""
    pa, _, pc = pyarrow()
    names = batch.schema.names

    def ints(name):
        if name not in names:
            return np.full(batch.num_rows, -1, np.int64)
        column = batch[name]
        return (column.fill_null(-1) if column.null_count else column).to_numpy().astype(np.int64)
    time = batch["time"].cast(pa.timestamp("us")).cast(pa.int64())
    null = time.is_null().to_numpy(zero_copy_only=False)
    cols = {"subject": ints("subject_id"),
            "minutes": np.where(null, NO_TIME,
                                np.floor_divide(time.fill_null(0).to_numpy(), 60_000_000)),
            "code": _dictionary_ids(batch["code"], scan.codes.ids, pc),
            "num": (batch["numeric_value"].cast(pa.float32()).fill_null(np.nan)
                    .to_numpy(zero_copy_only=False)
                    if "numeric_value" in names else np.full(batch.num_rows, np.nan, np.float32)),
            "hadm": ints(profile["admission_id"]) if profile["admission_id"] != "subject" else None,
            "stay": ints(profile["stay_id"]) if profile.get("stay_id") else None}
    # text is a category only without a number (most MEDS rows repeat their number as text): map
    # only those rows
    numeric = (scan.codes.frozen()["values"][cols["code"]] & 1) > 0
    wanted = np.isnan(cols["num"]) | ~numeric
    for name in ("text_value", *profile["admission_columns"]):
        cols["text" if name == "text_value" else name] = _dictionary_ids(
            batch[name], scan.strings.ids, pc, wanted if name == "text_value" else None) \
            if name in names else np.full(batch.num_rows, -1, np.int32)
    return {k: v for k, v in cols.items() if v is not None}


def _dictionary_ids(array, ids, pc, rows: np.ndarray | None = None) -> np.ndarray:
    """Global ids of a string column (-1: null, and outside `rows` when given): the dictionary
    entries used are mapped once by `ids`, then gathered per row."""
    if not hasattr(array, "dictionary"):
        array = pc.dictionary_encode(array)
    indices = array.indices
    index = (indices.fill_null(-1) if indices.null_count else indices).to_numpy()
    if rows is not None:
        index = np.where(rows, index, -1)
        used = np.flatnonzero(np.bincount(index[index >= 0], minlength=len(array.dictionary)))
    else:
        used = np.arange(len(array.dictionary))
    # the last one: index -1 (null) -> -1
    mapped = np.full(len(array.dictionary) + 1, -1, np.int32)
    mapped[used] = ids(array.dictionary.take(used).to_pylist()) if len(used) else []
    return mapped[index]


def prefetch(items, depth: int = 2):
    """The items of the iterator `items`, produced `depth` ahead in a thread: pyarrow decodes the
    next batch (releasing the GIL) while the scan works on this one. Only the decoding runs there:
    numpy's arrays are made in the main thread, whose heap the later steps reuse (a thread's glibc
    arena would keep them). An error in the thread is raised here."""
    queue, done = Queue(depth), object()

    def produce():
        try:
            for item in items:
                queue.put(item)
            queue.put(done)
        except BaseException as err:       # handed to the consumer, which raises it
            queue.put(err)
    Thread(target=produce, daemon=True).start()
    while (item := queue.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def release_memory() -> None:
    """Hand the memory the scan freed back to the system: pyarrow's pool of decoded batches, and
    glibc's heap, which after a scan of MIMIC-IV/4's size holds ~0.5 GiB freed but kept (numpy's
    temporaries)."""
    pyarrow()[0].default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):          # not glibc: nothing to trim
        pass


# ------------------------------------------------------------------------------------------- reader
class MedsSource:
    """The data files of a MEDS root as one entry of meta.json `sources` (the keys of
    tables.Source.describe): their folder, bytes, rows and one sha256 over every file's path and
    bytes."""

    # as tables.Source: never an empty table; rows used are not counted here
    empty, used = False, None

    def __init__(self, root: Path, files: list[Path]):
        self.path, self.files, self.rows, self.digest = root / "data", files, 0, hashlib.sha256()
        # as tables.Source; the scan's skips are in meta.json meds.skipped instead
        self.skipped: dict = {}

    def add(self, path: Path) -> None:
        self.digest.update(str(path.relative_to(self.path)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                self.digest.update(chunk)

    def describe(self) -> dict:
        return {"path": str(self.path), "bytes": sum(p.stat().st_size for p in self.files),
                "rows": self.rows, "files": len(self.files), "sha256": self.digest.hexdigest(),
                "bad_rows": 0, "first_bad_row": 0}

    def warnings(self) -> list[str]:
        """None here: build_meds writes one line for the scan's counted skips (Built.warnings)."""
        return []


class MedsReader:
    """What build.build_mimic reads (the methods of build.CsvReader), from a MEDS root: `load_core`
    runs the one pass over the events (meds_scan.Scan) and keeps its result; the other methods hand
    out parts of it."""
    # events go to stays by subject and time: stays of one subject may overlap
    stay_group = "subject"

    def __init__(self, cfg, root: Path, rep):
        pyarrow()
        self.cfg, self.root, self.rep = cfg, Path(root), rep
        self.dataset = read_dataset_json(self.root)
        self.profile = load_profile(cfg.meds_profile, self.dataset)
        self.files = data_files(self.root)
        self.scan = Scan(self.profile, hours=cfg.seq_len,
                         exclude_label_items=cfg.exclude_label_items)
        self.splits_info: dict = {
            "source": "sha1(seed:subject_id) buckets (no metadata/subject_splits.parquet)"}

    def load_core(self) -> tuple[dict, dict]:
        """Patients, admissions and ICU stays (the records of extract.load_core; stays carry
        "meds_row", their number in the scan) and {"meds": MedsSource}; every event is read here,
        once."""
        _, pq, _ = pyarrow()
        wanted = {path: check_schema(path, pq.read_schema(path), self.profile)
                  for path in self.files}
        # read as dictionaries: mapped once
        strings = ("code", "text_value", *self.profile["admission_columns"])
        parquet = {path: pq.ParquetFile(path, read_dictionary=[c for c in strings
                                                               if c in wanted[path]])
                   for path in self.files}
        source = MedsSource(self.root, self.files)
        self.rep.log(f"MEDS profile {self.profile['name']} ({self.profile['path']}), "
                     f"{len(self.files)} data files")
        with self.rep.task("MEDS events",
                           total=sum(f.metadata.num_rows for f in parquet.values())) as advance:
            for path, f in parquet.items():
                source.add(path)
                self.scan.read(self._batches(f, wanted[path], advance))
        source.rows = sum(f.metadata.num_rows for f in parquet.values())
        release_memory()
        self.result = self.scan.result()
        patients = {k: self.result["patients"][k]
                    for k in ("subject_id", "gender", "year_of_birth")}
        return {"patients": patients, "admissions": self._admissions(),
                "stays": self._stays()}, {"meds": source}

    def _batches(self, parquet, wanted: list[str], advance):
        for batch in prefetch(parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted)):
            yield columns(batch, self.scan, self.profile)
            advance(batch.num_rows)

    def _admissions(self) -> dict:
        """The admission record: deathtime is the subject's death when it falls within the admission
        (a death event at or between admittime and dischtime); died, a death discharge code or such
        a death."""
        adm, patients = self.result["admissions"], self.result["patients"]
        if not adm:
            raise InputError(f"{self.root}: no admission events (profile {self.profile['name']}): "
                             "nothing to build")
        # patients: sorted by id
        death = patients["death"][lookup(patients["subject_id"], adm["subject_id"])]
        inside = (death != NO_TIME) & (death >= adm["admittime"]) & (death <= adm["dischtime"]) & \
            (adm["dischtime"] != NO_TIME)
        deathtime = np.where(inside, death, NO_TIME)
        return {**adm, "deathtime": deathtime, "died": adm["died"] | inside}

    def _stays(self) -> dict:
        stays = self.result["stays"]
        if not stays:
            return {"stay_id": np.zeros(0, np.int64), "hadm_id": np.zeros(0, np.int64),
                    "subject_id": np.zeros(0, np.int64), "intime": np.zeros(0, np.int64),
                    "outtime": np.zeros(0, np.int64), "first_careunit": [],
                    "metavision": np.zeros(0, bool), "meds_row": np.zeros(0, np.int64)}
        # every MEDS stay counts as MetaVision: the MIMIC-IV profiles are all MetaVision, eICU's
        # onsets its own
        return {**stays, "metavision": np.ones(len(stays["stay_id"]), bool)}

    def assign_splits(self, subjects: np.ndarray, seed: int, fractions) -> np.ndarray:
        """The split of each subject from metadata/subject_splits.parquet (train, tuning, held_out
        -> train, val, test); subjects it lacks, or gives another split name, get ours
        (cohorts.assign_splits), counted."""
        ours = assign_splits(subjects, seed, fractions)
        path = self.root / "metadata" / "subject_splits.parquet"
        if not path.is_file():
            return ours
        table = pyarrow()[1].read_table(path)
        if not {"subject_id", "split"} <= set(table.column_names):
            raise InputError(f"{path}: needs columns subject_id and split (columns are: "
                             f"{', '.join(table.column_names)})")
        ids = table["subject_id"].to_numpy(zero_copy_only=False).astype(np.int64)
        names = np.array(table["split"].fill_null("").to_pylist(), dtype=object)
        order = np.argsort(ids, kind="stable")
        ids, names = ids[order], names[order]
        at = lookup(ids, subjects)
        named = np.array([MEDS_SPLITS.get(n, -1) for n in names.tolist()], dtype=np.int64)
        theirs = np.where(at >= 0, named[np.maximum(at, 0)] if len(named) else -1, -1)
        other = {str(n): int(c)
                 for n, c in zip(*np.unique(names[at[(at >= 0) & (theirs < 0)]].astype(str),
                                            return_counts=True))}
        # of the root: meta.json sources
        self.splits_info = {"source": "metadata/subject_splits.parquet",
                            "map": "train, tuning, held_out -> train, val, test",
                            "subjects not in it (our split)": int((at < 0).sum()),
                            "subjects of other split names (our split)": other}
        return np.where(theirs >= 0, theirs, ours).astype(np.int8)

    def read_diagnoses(self, systems: tuple[str, ...], known: np.ndarray):
        """(hadm_id, namespaced code) pairs of the kept ICD systems, counts, and no Source: the
        codes came with the events (extract.read_diagnoses). The scan gave each code the admission
        of its id or its time, else none; a code whose admission is not in `known` (sorted: every
        admission read) is counted with those."""
        d = self.result["diagnoses"] or {"hadm_id": np.zeros(0, np.int64), "version": [],
                                         "code": []}
        codes = (np.array([c.encode() for c in d["code"]], dtype=bytes) if d["code"]
                 else np.zeros(0, "S1"))
        version = np.array([v.strip().encode() for v in d["version"]], dtype=bytes) \
            if d["version"] else np.zeros(0, "S1")
        out, kept, counts = namespace_icd(codes, version, systems)
        found = lookup(known, d["hadm_id"]) >= 0
        counts["rows without code or admission"] = (counts.pop("rows without code")
                                                    + int((kept & ~found).sum()))
        keep = kept & found
        return d["hadm_id"][keep], out[keep], counts, None

    def read_drugs(self, code: str, known: np.ndarray, progress):
        """(hadm_id, drug) pairs (extract.read_drugs): the drug of each drug code, lower case;
        `code` (the PRESCRIPTIONS column) has no meaning here: a MEDS drug code names the drug. Drug
        events of no admission in `known` (the scan dates them into one) are counted."""
        d = self.result["drugs"] or {"hadm_id": np.zeros(0, np.int64), "drug": []}
        names = np.array([n.strip().lower().encode() for n in d["drug"]], dtype=bytes) \
            if d["drug"] else np.zeros(0, "S1")
        found = lookup(known, d["hadm_id"]) >= 0
        keep = (names != b"") & (names != b"0") & found
        self.scan.count("drug events outside any admission", ((names != b"") & ~found).sum())
        return d["hadm_id"][keep], names[keep], None

    def stream_events(self, stays: dict, *, hours: int, exclude_label_items: bool, progress):
        """The events and onsets of the kept stays (rows of `stays`, renumbered in that order), the
        scan's counts as the skipped rows of "meds", no further sources (extract.stream_events), and
        the (row, row) pairs of `stays` of one subject that overlap in time (their shared events
        went to each)."""
        events, rows = self.result.pop("events"), np.asarray(stays["meds_row"], np.int64)
        new = np.full(self.scan.n_stays + 1, -1, np.int64)
        new[rows] = np.arange(len(rows))
        mask = new[events["stay"]] >= 0
        # one array at a time: a bounded peak
        for k in ("stay", "hour", "var", "num", "cat"):
            events[k] = events[k][mask]
        events["stay"] = new[events["stay"]].astype(np.int32)
        # keep the (stay, hour, var) order
        if len(rows) and np.any(np.diff(rows) < 0):
            order = np.lexsort((events["var"], events["hour"], events["stay"]))
            events.update({k: events[k][order] for k in ("stay", "hour", "var", "num", "cat")})
        onsets = {task: self.result["onsets"][rows, i]
                  for i, task in enumerate(self.scan.codes.onset_tasks)}
        overlaps = StayIndex(stays["subject_id"], stays["intime"], stays["outtime"]).overlaps
        return events, onsets, {"meds": dict(self.scan.counts)}, {}, overlaps

    def variable_names(self, keys) -> tuple[dict, list]:
        """({variable key: name}, no label tables read): the profile names the variables."""
        return self.scan.codes.variable_names(keys), []

    def find_notes(self, notes: Path | None) -> Path | None:
        """--notes (MIMIC-IV-Note's folder or discharge table), else a note/ folder inside the MEDS
        root."""
        return find_notes(self.root, notes, "mimic4")


# ------------------------------------------------------------------------------------------- build
def build_meds(cfg, raw: Path, layout: str, *, rep, note_cache: dict) -> Built:
    """A MEDS extract through build.build_mimic (MedsReader), then what only MEDS adds: the tasks
    the profile labels (eICU: a subject is one hospital stay, so no readmission or patient history
    can be seen), the source of the splits, the profile and the scan's counts in meta.json
    `meds`."""
    reader = MedsReader(cfg, raw, rep)
    built = build_mimic(cfg, raw, layout, rep=rep, note_cache=note_cache, reader=reader)
    tasks, attrition = reader.profile["tasks"], built.meta["attrition"]
    built.labels = [row for row in built.labels if row[0] in tasks]
    for task in (t for t in TASKS if t not in tasks):
        attrition[task] = [[f"not labelled under profile {reader.profile['name']} (its tasks: "
                            f"{', '.join(tasks)})", 0]]
    for key, what in (("patients", "subjects"), ("admissions", "admissions"),
                      ("stays", "ICU stays")):
        # build_mimic names the CSV tables
        attrition[key][0][0] = f"{what} in the MEDS data"
    built.splits["method"] = reader.splits_info["source"]
    counts, unknown = dict(reader.scan.counts), reader.scan.codes.unknown()
    built.meta["meds"] = {"profile": reader.profile["name"], "profile_path": reader.profile["path"],
                          "dataset": reader.dataset, "splits": reader.splits_info,
                          "skipped": counts, "unknown_codes": unknown,
                          "codes": len(reader.scan.codes.strings)}
    faults = {what: n for what, n in counts.items() if what not in BY_DESIGN}
    if faults:             # at the end of the run, with the other warnings (pipeline.preprocess)
        built.warnings.append(f"warning: {raw}: "
                              + "; ".join(f"{n:,} {what}" for what, n in faults.items())
                              + (f" (unknown codes, e.g. {', '.join(unknown[:3])})"
                                 if unknown else "")
                              + " (meta.json: meds.skipped)")
    return built
