"""Data: the processed hierarchical dataset on disk, and back out of it as batches.

Usage: `load_processed(dir)` -> `Processed`, then the `StayDataset` / `AdmissionDataset` /
`PatientDataset` classes and `make_loader` (runtime.prefetch moves its batches to the device one
step ahead). Reads the folder that `python medhmp.py preprocess` writes (meta.json, stays.pt,
admissions.pt, labels.csv, splits.json; docs/data-format.md). It holds what the format is
(`FORMAT_VERSION`, `LABEL_COLUMNS`, `SPLITS`, the usable-admission rule `admission_requirements`),
how a batch is laid out (`collate_stay` writes the `ts_idx` cells that models.py reads,
`collate_admission`), the identity of a processed folder (`data_digest`) and of each of its files
(`file_facts`, recorded in meta.json `files` and checked on loading), the small helpers the
preprocessing package shares (`lookup`, `row_of`, `read_file`, `torch_save`, `config_record`), and
the views of a folder with other splits or shuffled columns (the negative control of pretraining).
The package builds on this module, never the other way round: data.py imports numpy, torch and
`folders` (InputError, and `repair` of a folder whose swap a killed run left half done), so it can
be copied with `folders.py` alone.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from folders import InputError, repair

FORMAT_VERSION = 3                            # 3: ICD codes namespaced by system ('ICD9:4280')
LABEL_COLUMNS = ("task", "level", "subject_id", "hadm_id", "stay_id", "label", "cutoff")  # labels
SPLITS = ("train", "val", "test")             # splits.json: patient-level, for every stage and task
# MEDS label files (meds_labels/<task>/<split>.parquet, docs/meds.md): MEDS's names of our splits,
# and what to install to read or write them (pyarrow, optional)
MEDS_SPLIT_NAMES = dict(zip(SPLITS, ("train", "tuning", "held_out")))
MEDS_LABELS_DIR = "meds_labels"
MEDS_INSTALL = "pip install -r requirements-meds.txt (pyarrow)"
MICROS_PER_MINUTE = 60_000_000
# the files `load_processed` reads besides meta.json, whose facts meta.json `files` records
DATA_FILES = ("stays.pt", "admissions.pt", "labels.csv", "splits.json")
# file_facts: a file up to this size is hashed whole (64 MiB: a tenth of a second); a larger one
# (stays.pt of MIMIC-IV: gigabytes) by its size and SAMPLES blocks spread over it, so that loading
# still reads megabytes, not the file twice
WHOLE_HASH_BYTES = 64 << 20
SAMPLES, SAMPLE_BYTES = 64, 64 << 10


def config_record(cfg) -> dict:
    """A config dataclass as a JSON-ready dict (paths as strings): what meta.json, checkpoints, run
    headers and eval reports store as the resolved config."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def read_file(path: Path, read, fix: str):
    """read(path), with a missing or damaged file as one InputError line naming it and `fix` (what
    to re-run). The raw error is not shown: for a file that fails to load with weights_only=True,
    torch advises loading it with weights_only=False, which a user must never be told about a file
    that may come from anyone."""
    try:
        return read(path)
    except FileNotFoundError:
        raise InputError(f"{path}: missing{'; ' + fix if fix else ''}") from None
    # torch: RuntimeError, UnpicklingError, EOFError; json: ValueError; csv: KeyError
    except Exception as err:
        raise InputError(f"{path}: cannot be read, it is truncated or corrupt "
                         f"({type(err).__name__}){'; ' + fix if fix else ''}") from None


def data_digest(root: Path) -> str:
    """Identity of a processed folder (a hash of its meta.json), so that a moved folder still
    resumes."""
    return hashlib.sha256((Path(root) / "meta.json").read_bytes()).hexdigest()[:16]


class _Sink:
    """A file object for torch.save that remembers the OSError of a failed write: torch swallows it
    and raises "RuntimeError: ... unexpected pos" instead (a full disk, a quota)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, so that a full disk is an OSError (ENOSPC), as every other
    write's, not torch's RuntimeError."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError as err:
            if sink.error is None:
                raise
            raise sink.error from err


def file_facts(path: Path) -> dict:
    """What meta.json `files` records of a file of a processed folder: its size in bytes and a
    sha256 (16 hex digits) of its bytes, whole up to WHOLE_HASH_BYTES, else of SAMPLES blocks spread
    over it ("hashed": "whole" or "sampled")."""
    size, h = Path(path).stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for i in range(SAMPLES):
                f.seek(max(size - SAMPLE_BYTES, 0) * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return {"bytes": size, "sha256": h.hexdigest()[:16],
            "hashed": "whole" if size <= WHOLE_HASH_BYTES else "sampled"}


def check_files(root: Path, meta: dict, fix: str) -> None:
    """One InputError line naming the first file of DATA_FILES that is not the one meta.json
    recorded when the folder was written (another size or content: copied in from another processed
    folder, or damaged). Folders written before meta.json recorded `files` are not checked; a
    missing file is left to the read that follows (which says so)."""
    files = meta.get("files")
    for name in DATA_FILES if isinstance(files, dict) else ():
        path, want = Path(root) / name, files.get(name)
        if not isinstance(want, dict) or not path.is_file():
            continue
        got = file_facts(path)
        if got["bytes"] != want.get("bytes"):
            why = f"{got['bytes']} bytes, but meta.json recorded {want.get('bytes')}"
        elif got["sha256"] != want.get("sha256"):
            why = "its bytes are not those meta.json recorded"
        else:
            continue
        raise InputError(f"{path}: not the file this folder was written with ({why}: copied in "
                         f"from another processed folder, or damaged); {fix} (changed on purpose: "
                         "delete its entry under `files` in meta.json)")


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of `ids` in `sorted_ids`, -1 where absent."""
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


def row_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each wanted id in `ids` (any order, no duplicates), -1 where absent."""
    order = np.argsort(ids, kind="stable")
    pos = lookup(ids[order], wanted)
    return np.where(pos >= 0, order[np.maximum(pos, 0)], -1)


def data_end(level: str, minutes, seq_len: int) -> np.ndarray:
    """The inclusive end of the data an example's inputs may hold, in microseconds since 1970 (a
    MEDS label's prediction_time), from the example's anchor in minutes (times are read to the
    minute): a stay's intime (its seq_len hourly bins hold events before intime + seq_len h), an
    admission's dischtime (its codes and note come with the discharge), a patient's cutoff (the
    visits discharged by then)."""
    minutes = np.asarray(minutes, dtype=np.int64)
    if level == "stay":
        return (minutes + seq_len * 60) * MICROS_PER_MINUTE - 1
    return minutes * MICROS_PER_MINUTE


def admission_requirements(admissions: dict) -> list[tuple[str, np.ndarray]]:
    """The rule for a usable admission, as (attrition step, mask (A,)) per condition: a featurised
    ICU stay, and ICD codes in the vocabulary. Admission pretraining uses these admissions (as the
    paper's 99k admissions) and the readmission cohort starts from them. `admissions` holds the CSR
    pointers of admissions.pt."""
    return [("with a featurised ICU stay", np.diff(np.asarray(admissions["stay_ptr"])) > 0),
            ("with ICD codes in the vocabulary", np.diff(np.asarray(admissions["icd_ptr"])) > 0)]


def usable_admissions(admissions: dict) -> np.ndarray:
    """Bool (A,): the admissions that meet every condition of `admission_requirements`."""
    return np.logical_and.reduce([keep for _, keep in admission_requirements(admissions)])


# ------------------------------------------------------------------------------------------ loading
@dataclass
class Processed:
    """A processed folder in memory: meta, stay and admission tensors, labels per task, splits."""
    root: Path
    meta: dict
    stays: dict
    admissions: dict
    labels: dict      # task -> {"row", "subject_id", "label", "cutoff"} numpy arrays
    splits: dict      # "train"/"val"/"test" -> sorted subject ids

    def split_of(self, subject_ids: np.ndarray) -> np.ndarray:
        """Split name per subject ('' where the subject is in no split)."""
        out = np.full(len(subject_ids), "", dtype=object)
        for name, ids in self.splits.items():
            out[lookup(ids, np.asarray(subject_ids)) >= 0] = name
        return out

    def pretrain_rows(self, level: str, split: str) -> np.ndarray:
        """Rows for pretraining: every featurised stay of the split (stay level), or the split's
        usable admissions (admission level, see `admission_requirements`)."""
        if level == "stay":
            return np.flatnonzero(self.split_of(self.stays["subject_id"].numpy()) == split)
        a = self.admissions
        return np.flatnonzero(
            usable_admissions(a) & (self.split_of(a["subject_id"].numpy()) == split))

    def examples(self, task: str, split: str) -> dict:
        """The task's examples in a split: {"row", "subject_id", "label", "cutoff"} numpy arrays."""
        t = self.labels.get(task)
        # rows and ids are integers even when empty: they index the stay and admission tensors
        if t is None:
            return {"row": np.zeros(0, np.int64), "subject_id": np.zeros(0, np.int64),
                    "label": np.zeros(0, np.float32), "cutoff": np.zeros(0)}
        return select_rows(t, self.split_of(t["subject_id"]) == split)


def select_rows(examples: dict, keep: np.ndarray) -> dict:
    """The rows `keep` (a boolean mask or indices) of every array of an examples dict; other entries
    (the task's "level") pass through."""
    return {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in examples.items()}


def load_processed(root: Path) -> Processed:
    """Load a folder written by `preprocess`; a missing, damaged or other-version folder is one
    InputError line naming the file and what to re-run. A folder whose swap a killed run left half
    done is recovered first."""
    root = Path(root)
    if not (root / "meta.json").is_file():
        repair(root)
    if not (root / "meta.json").is_file():
        raise InputError(f"{root}: no processed data here (run `python medhmp.py preprocess --out "
                         f"{root}`)")
    fix = f"re-run `python medhmp.py preprocess --out {root}`"
    meta = read_file(root / "meta.json", lambda p: json.loads(p.read_text()), fix)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise InputError(f"{root}: format version {version}, this medhmp reads {FORMAT_VERSION}; "
                         f"{fix}")
    check_files(root, meta, fix)
    stays, admissions = (read_file(root / f"{name}.pt", lambda p: _tensors(p, keys), fix)
                         for name, keys in (("stays", ("stay_id", "ts_ptr")),
                                            ("admissions", ("hadm_id", "icd_ptr"))))
    splits = read_file(root / "splits.json", _read_splits, fix)
    labels = read_file(root / "labels.csv", lambda p: _read_labels(p, stays, admissions), fix)
    return Processed(root, meta, stays, admissions, labels, splits)


def _tensors(path: Path, keys: tuple) -> dict:
    """A dict of tensors saved by `preprocess`, with `keys` among them (a KeyError otherwise)."""
    out = torch.load(path, weights_only=True)
    missing = [k for k in keys if k not in out]
    if missing:
        raise KeyError(missing[0])
    return out


def _read_splits(path: Path) -> dict:
    splits = json.loads(path.read_text())
    return {n: np.array(sorted(splits[n]), dtype=np.int64) for n in SPLITS}


def _read_labels(path: Path, stays: dict, admissions: dict) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        level = mine[0]["level"]
        if level == "stay":
            row = row_of(stays["stay_id"].numpy(), np.array([int(r["stay_id"]) for r in mine]))
        elif level == "admission":
            row = row_of(admissions["hadm_id"].numpy(), np.array([int(r["hadm_id"]) for r in mine]))
        else:
            row = np.full(len(mine), -1)
        out[task] = {"row": row, "level": level,
                     "subject_id": np.array([int(r["subject_id"]) for r in mine], dtype=np.int64),
                     "label": np.array([float(r["label"]) for r in mine], dtype=np.float32),
                     "cutoff": np.array([float(r["cutoff"] or "nan") for r in mine])}
    return out


# ------------------------------------------------------------------------------------------ batches
def csr_ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenated aranges [s, s + c) for each (s, c): the gather index of CSR slices, vectorised
    (the batches here, and the code counts of health.py)."""
    total = int(counts.sum())
    offsets = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    return offsets + torch.arange(total)


def _multi_hot(ptr: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor,
               width: int) -> torch.Tensor:
    """(len(rows), width) float32 multi-hot of the CSR sets `rows`."""
    counts = ptr[rows + 1] - ptr[rows]
    out = torch.zeros(len(rows), width)
    owner = torch.repeat_interleave(torch.arange(len(rows)), counts)
    out[owner, idx[csr_ranges(ptr[rows], counts)].long()] = 1.0
    return out


def collate_stay(data: Processed, rows: torch.Tensor) -> dict:
    """Stay batch (docs/data-format.md): ts_idx flat into (B, T, F), static (B, S)."""
    s, n_features = data.stays, data.meta["n_features"]
    ptr = s["ts_ptr"]
    cells = csr_ranges(ptr[rows], ptr[rows + 1] - ptr[rows])            # (nnz,)
    feat = s["ts_feat"][cells].long()                                    # (nnz,) f, in (t, f) order
    per_hour = s["ts_count"][rows].long().flatten()                      # (B*T,) cells per hour
    bag = torch.repeat_interleave(torch.arange(len(per_hour)), per_hour,
                                  output_size=len(feat))                 # (nnz,) b * T + t
    return {"ts_idx": bag * n_features + feat, "static": s["static"][rows].float()}


def collate_admission(data: Processed, rows: torch.Tensor, max_stays: int) -> dict:
    """Admission batch: the real stays packed (ts_idx into (Ns, T, F), static (Ns, S)) with
    stay_mask (B, K), multi-hot icd/drug (B, V), note (B, E) and modality masks (B,)."""
    a, m = data.admissions, data.meta
    first = a["stay_ptr"][rows]
    n_stays = torch.clamp(a["stay_ptr"][rows + 1] - first, max=max_stays)        # (B,)
    k = max(int(n_stays.max()) if len(rows) else 1, 1)
    batch = collate_stay(data, a["stay_rows"][csr_ranges(first, n_stays)])
    icd_count = a["icd_ptr"][rows + 1] - a["icd_ptr"][rows]
    drug_count = a["drug_ptr"][rows + 1] - a["drug_ptr"][rows]
    batch.update(stay_mask=torch.arange(k)[None, :] < n_stays[:, None],          # (B, K)
                 icd=_multi_hot(a["icd_ptr"], a["icd_idx"], rows, m["n_icd"]),
                 drug=_multi_hot(a["drug_ptr"], a["drug_idx"], rows, m["n_drug"]),
                 note=a["note"][rows].float(), note_mask=a["note_mask"][rows].clone(),
                 icd_mask=icd_count > 0, drug_mask=drug_count > 0)
    return batch


class StayDataset(Dataset):
    """Stays (rows of stays.pt), optionally labelled; batches come from one vectorised gather."""

    def __init__(self, data: Processed, rows: np.ndarray, labels: np.ndarray | None = None):
        self.data, self.rows = data, torch.as_tensor(np.asarray(rows), dtype=torch.long)
        self.labels = (None if labels is None else
                       torch.as_tensor(np.asarray(labels), dtype=torch.float32))

    def __len__(self):
        return len(self.rows)

    def _gather(self, rows):
        return collate_stay(self.data, rows)

    def __getitems__(self, idx) -> dict:
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch = self._gather(self.rows[idx])
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        return batch

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])


class AdmissionDataset(StayDataset):
    """Admissions (rows of admissions.pt) with up to `max_stays` stays each."""

    def __init__(self, data, rows, labels=None, max_stays: int = 3):  # paper: M = 3 slots at most
        super().__init__(data, rows, labels)
        self.max_stays = max_stays

    def _gather(self, rows):
        return collate_admission(self.data, rows, self.max_stays)


class PatientDataset(Dataset):
    """Patients as visit sequences: the coded admissions discharged by each example's cutoff, the
    last `max_visits`, oldest first."""

    def __init__(self, data: Processed, subject_ids, cutoffs, labels, max_visits: int = 50):
        # paper App. A: the last 50 visits
        a = data.admissions
        coded = (np.diff(a["icd_ptr"].numpy()) > 0)
        order = np.lexsort((a["admittime"].numpy(), a["subject_id"].numpy()))
        order = order[coded[order]]
        subj, disch = a["subject_id"].numpy()[order], a["dischtime"].numpy()[order]
        lo = np.searchsorted(subj, subject_ids, "left")
        hi = np.searchsorted(subj, subject_ids, "right")
        self.visits = []
        for s, e, cut in zip(lo, hi, np.asarray(cutoffs)):
            mine = order[s:e][disch[s:e] <= cut]
            self.visits.append(torch.as_tensor(mine[-max_visits:], dtype=torch.long))
        self.data = data
        self.cutoffs = torch.as_tensor(np.asarray(cutoffs), dtype=torch.float64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)

    def __len__(self):
        return len(self.visits)

    def __getitems__(self, idx) -> dict:
        a, n_icd = self.data.admissions, self.data.meta["n_icd"]
        visits = [self.visits[i] for i in idx]
        lengths = torch.tensor([len(v) for v in visits])
        width = max(int(lengths.max()), 1)
        mask = torch.arange(width)[None, :] < lengths[:, None]                    # (B, L)
        flat = torch.cat(visits)                                                  # (sum L,)
        icd = torch.zeros(len(idx), width, n_icd)
        icd[mask] = _multi_hot(a["icd_ptr"], a["icd_idx"], flat, n_icd)
        days = torch.zeros(len(idx), width)
        cut = torch.repeat_interleave(self.cutoffs[torch.as_tensor(idx)], lengths)
        days[mask] = ((cut - a["dischtime"][flat]) / 24.0).float()
        return {"icd": icd, "visit_mask": mask, "visit_time": days,
                "label": self.labels[torch.as_tensor(idx, dtype=torch.long)]}

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])


def _passthrough(batch):
    return batch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0, pin_memory: bool = False, drop_last: bool = False,
                batches=None) -> DataLoader:
    """A DataLoader whose batches are built by the dataset's vectorised `__getitems__` (no
    per-sample Python work). Shuffling is seeded; `batches` (lists of indices) replaces
    batch_size/shuffle when given, so a training loop can resume mid-epoch. Evaluation loaders never
    shuffle."""
    common = dict(collate_fn=_passthrough, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, **common)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last, **common)


# ------------------------------------------------------------------------------- views and controls
def write_view(source: Path, view: Path, splits: dict, tensors: dict | None = None) -> Path:
    """A processed folder `view` that is `source` with other splits ({"train", "val", "test"}:
    subject ids): its files are links to the source's, except splits.json, the `tensors` files
    given ({file name: dict of tensors}, e.g. a shuffled control's stays.pt) and meta.json (the
    source's, with the facts of the files written here). Replaces an existing view (a folder whose
    labels.csv is a link); any other folder there is refused in one line."""
    view, own = Path(view), {"splits.json", "meta.json", *(tensors or {})}
    if view.exists() and any(view.iterdir()) and not (view / "labels.csv").is_symlink():
        raise InputError(f"{view}: exists and is not a view of a processed folder; remove it or "
                         "choose another folder")
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in Path(source).iterdir():
        if f.name not in own and not f.name.startswith("."):
            (view / f.name).symlink_to(f.resolve())
    for name, value in (tensors or {}).items():
        torch_save(value, view / name)
    ids = {k: [int(i) for i in v] for k, v in splits.items()}
    (view / "splits.json").write_text(json.dumps(ids))
    meta = json.loads((Path(source) / "meta.json").read_text())
    if isinstance(meta.get("files"), dict):
        meta["files"].update({name: file_facts(view / name) for name in own - {"meta.json"}})
    (view / "meta.json").write_text(json.dumps(meta, indent=1))
    return view


def shuffle_columns(data: Processed, subjects: np.ndarray, seed: int) -> dict:
    """The negative control of pretraining: stays.pt and admissions.pt with every column permuted on
    its own across the stays / admissions of `subjects` (the others untouched): each feature's (T,)
    hourly series, each static column, each ICD and drug code, each note dimension. Every column
    keeps its frequencies; co-occurrence between columns (within and across modalities) is
    destroyed. {file name: tensors}."""
    rng = np.random.default_rng(seed + 7919)
    stays = {k: v.clone() for k, v in data.stays.items()}
    adms = {k: v.clone() for k, v in data.admissions.items()}
    s_rows = np.flatnonzero(np.isin(data.stays["subject_id"].numpy(), subjects))
    a_rows = np.flatnonzero(np.isin(data.admissions["subject_id"].numpy(), subjects))
    T, F = data.meta["seq_len"], data.meta["n_features"]
    hours = np.repeat(np.tile(np.arange(T), len(stays["ts_count"])),
                      stays["ts_count"].numpy().ravel())
    owner, feat, hours = _permute_owners(stays["ts_ptr"].numpy(), stays["ts_feat"].numpy(),
                                         s_rows, F, rng, hours)
    counts = np.bincount(owner * T + hours, minlength=len(stays["ts_count"]) * T).reshape(-1, T)
    stays.update(ts_count=torch.from_numpy(counts.astype(np.int16)),
                 ts_feat=torch.from_numpy(feat.astype(np.int16)),
                 ts_ptr=torch.from_numpy(np.r_[0, np.cumsum(counts.sum(1))].astype(np.int64)))
    for m in ("icd", "drug"):
        owner, idx, _ = _permute_owners(adms[f"{m}_ptr"].numpy(), adms[f"{m}_idx"].numpy(), a_rows,
                                        data.meta[f"n_{m}"], rng)
        per_admission = np.bincount(owner, minlength=len(adms["hadm_id"]))
        adms[f"{m}_ptr"] = torch.from_numpy(np.r_[0, np.cumsum(per_admission)])
        adms[f"{m}_idx"] = torch.from_numpy(idx.astype(np.int32))
    with_note = a_rows[adms["note_mask"].numpy()[a_rows]]
    for table, rows in ((stays["static"].numpy(), s_rows), (adms["note"].numpy(), with_note)):
        for j in range(table.shape[1]):  # in place: the tensors share the arrays' memory
            table[rows, j] = table[rng.permutation(rows), j]
    return {"stays.pt": stays, "admissions.pt": adms}


def _permute_owners(ptr: np.ndarray, column: np.ndarray, rows: np.ndarray, width: int, rng,
                    hours=None):
    """CSR entries (owner row, column) with each column's owners permuted among `rows` by a
    permutation of its own; returns owners, columns and `hours` (if given) sorted by owner, hour,
    column."""
    column = column.astype(np.int64)
    owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    target = np.tile(np.arange(len(ptr) - 1, dtype=np.int32), (width, 1))  # (width, rows) owners
    for j in range(width):
        target[j, rows] = rng.permutation(rows)
    owner = target[column, owner]
    order = np.lexsort((column, owner) if hours is None else (column, hours, owner))
    return owner[order], column[order], None if hours is None else hours[order]
