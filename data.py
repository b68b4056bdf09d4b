"""Data: from MIMIC-style CSV extracts to the processed hierarchical dataset, and back out as batches.

Usage: `python medhmp.py preprocess --raw RAW --out data/processed` (see `preprocess`), then
`load_processed(dir)` and the `StayDataset` / `AdmissionDataset` / `PatientDataset` classes.
Reads the CSV extracts (MIMIC-III, MIMIC-IV or a diagnosis extract) and writes the folder described in
docs/data-format.md: meta.json, stays.pt, admissions.pt, labels.csv, splits.json, note_cache.pt.
The work is shared with lower modules that import nothing above them: build (raw tables -> the arrays of the
folder, in memory) drawing on tables (CSV reading), extract (the raw tables of each layout), features
(FIDDLE-style features, vocabularies, note embeddings) and cohorts (task cohorts, labels, splits); data.py
keeps the entry point, the on-disk format and the datasets. `InputError` and `Reporter` are re-exported.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from build import build_mimic, build_trinetx
from cohorts import task_counts
from folders import Staged, check_writable, repair  # noqa: F401  (check_writable re-exported for evaluate)
from progress import Reporter  # noqa: F401  (re-exported: train, evaluate and synthetic report through it)
from tables import InputError, find_layout, lookup, row_of  # noqa: F401  (InputError re-exported)


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PreprocessConfig:
    raw: Path = Path("data/raw")
    notes: Path | None = None                 # a note table or folder; default: the layout's own
    out: Path = Path("data/processed")
    text_model: str = "hashing"               # "hashing", a local Hugging Face folder, or a hub name
    text_device: str = "cpu"                  # where a Hugging Face text model runs
    limit_patients: int | None = None         # a deterministic sample of this many patients
    seq_len: int = 48                         # paper App. A: T = 48 one-hour bins
    min_frequency: float = 0.05               # paper App. A: drop features seen in < 5% of stays
    n_bins: int = 5                           # FIDDLE discretize: quintiles
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # official code 80/10/10 (here by patient)
    seed: int = 0
    exclude_label_items: bool = True          # DESIGN §4: ARF/shock-defining items are not features
    drug_code: str = "drug"                   # PRESCRIPTIONS column used as the drug code: drug|ndc|gsn
    vocab_from: Path | None = None            # reuse the code vocabularies of another processed folder
    note_max_tokens: int = 512                # spec §12.7: Clinical-T5 was trained on 512 tokens
    note_pooling: str = "mean"                # "mean" (attention-masked) or "mean_unmasked" (official)
    hashing_dim: int = 768                    # width of the built-in hashing text model (Clinical-T5-Base: 768)
    text_batch_size: int = 16
    readmission_days: int = 30                # paper §3.3: 30-day readmission
    patient_gap_days: int = 180               # paper App. A: history ends six months before diagnosis
    controls_per_case: int = 3                # paper App. A: three matched controls per case
    quiet: bool = False


def config_record(cfg) -> dict:
    """A config dataclass as a JSON-ready dict (paths as strings): what meta.json, checkpoints, run headers
    and eval reports store as the resolved config."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


FORMAT_VERSION = 2                            # 2: stays stored as int16 features with per-hour counts


def preprocess(cfg: PreprocessConfig) -> dict:
    """Read the extract at `cfg.raw`, write the processed folder `cfg.out` atomically; returns meta.
    The output is checked, locked and staged (folders.Staged) before any table is read (and build_mimic loads
    the text model first), so an unwritable --out or a bad --text-model fails in seconds, in one line."""
    rep = Reporter(cfg.quiet)
    raw = Path(cfg.raw)
    layout = find_layout(raw)
    with Staged(cfg.out, "--out", log=rep.log) as stage:
        out = stage.out
        _check_out(out)
        rep.log(f"reading {raw} ({layout} layout)")
        cache = _load_cache(out, rep)
        sources = {}
        build = build_trinetx if layout == "trinetx" else build_mimic
        result = build(cfg, raw, layout, sources, rep, cache)
        meta = result["meta"]
        meta["tasks"] = task_counts(result["labels"], result["splits"])
        meta.update(format_version=FORMAT_VERSION, layout=layout, created=time.strftime("%Y-%m-%d %H:%M:%S"),
                    config=config_record(cfg),
                    sources={k: s.describe() for k, s in sources.items()})
        stage.commit(lambda tmp: _write_folder(tmp, result, cache))
    _print_attrition(meta, rep)
    for task, c in meta["tasks"].items():
        parts = [f"{s} {c[s][0]} ({c[s][1]} positive)" for s in ("train", "val", "test")]
        rep.log(f"{task} ({c['level']}): " + ", ".join(parts))
    rep.log(f"wrote {out}: {meta['counts']}")
    _print_skipped(meta, rep)
    return meta


# ------------------------------------------------------------------------------------------- writing
LABEL_COLUMNS = ("task", "level", "subject_id", "hadm_id", "stay_id", "label", "cutoff")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").exists())):
        raise InputError(f"{out}: exists and is not a processed folder; choose another --out")


def _load_cache(out: Path, rep: Reporter) -> dict:
    """{text key: vector} saved by the last run into this folder (note_cache.pt), else empty; a damaged
    cache is ignored with a warning (the embeddings are recomputed and the cache written anew)."""
    path = out / "note_cache.pt"
    if not path.is_file():
        return {}
    try:
        saved = read_file(path, lambda p: torch.load(p, weights_only=True), "")
        return {k: v for dim in saved["dims"] for k, v in zip(saved[f"keys_{dim}"], saved[f"vectors_{dim}"].numpy())}
    except (InputError, KeyError, TypeError, AttributeError):
        rep.log(f"warning: {path} is damaged; ignoring it (the note embeddings are recomputed, the cache rebuilt)")
        return {}


def read_file(path: Path, read, fix: str):
    """read(path), with a missing or damaged file as one InputError line naming it and `fix` (what to re-run).
    The raw error is not shown: for a file that fails to load with weights_only=True, torch advises loading it
    with weights_only=False, which a user must never be told about a file that may come from anyone."""
    try:
        return read(path)
    except FileNotFoundError:
        raise InputError(f"{path}: missing{'; ' + fix if fix else ''}") from None
    except Exception as err:  # torch: RuntimeError, UnpicklingError, EOFError; json: ValueError; csv: KeyError
        raise InputError(f"{path}: cannot be read, it is truncated or corrupt ({type(err).__name__})"
                         f"{'; ' + fix if fix else ''}") from None


def _save_cache(cache: dict, path: Path) -> None:
    """The note cache grouped by width: keys_<E> (list) and vectors_<E> (n, E) float16."""
    groups: dict = {}
    for k, v in cache.items():
        groups.setdefault(len(v), []).append(k)
    saved = {"dims": sorted(groups)}
    for dim, keys in groups.items():
        saved[f"keys_{dim}"] = keys
        saved[f"vectors_{dim}"] = torch.from_numpy(np.stack([cache[k] for k in keys]).astype(np.float16))
    torch_save(saved, path)


def torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, so that a full disk is an OSError (ENOSPC), not a RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _write_folder(folder: Path, result: dict, cache: dict) -> None:
    """Every file of the processed folder into `folder` (the staging folder that then becomes --out)."""
    for name in ("stays", "admissions"):
        torch_save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in result[name].items()},
                    folder / f"{name}.pt")
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LABEL_COLUMNS)
        w.writerows(result["labels"])
    (folder / "splits.json").write_text(json.dumps(result["splits"]))
    _save_cache(cache, folder / "note_cache.pt")
    (folder / "meta.json").write_text(json.dumps(result["meta"], indent=1))


def _print_attrition(meta: dict, rep: Reporter) -> None:
    for name, steps in meta["attrition"].items():
        rep.log(f"{name}: " + " -> ".join(f"{step} {n:,}" for step, n in steps))


def _print_skipped(meta: dict, rep: Reporter) -> None:
    """One warning line per table with malformed rows or unreadable values (meta.json keeps them all)."""
    for name, src in meta["sources"].items():
        parts = [f"{src['bad_rows']:,} malformed rows skipped (first at row {src['first_bad_row']})"] \
            if src["bad_rows"] else []
        counts = meta["skipped"].get(name)
        if isinstance(counts, dict):
            parts += [f"{n:,} rows with an {what}" for what, n in counts.items() if what.startswith("unparsable") and n]
        if parts:
            rep.log(f"warning: {src['path']}: {'; '.join(parts)} (meta.json: sources, skipped)")


# ------------------------------------------------------------------------------------------- loading
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
        """Rows for pretraining: every featurised stay of the split (stay level), or the split's admissions
        with a featurised stay and ICD codes (admission level, as the paper's 99k admissions)."""
        if level == "stay":
            return np.flatnonzero(self.split_of(self.stays["subject_id"].numpy()) == split)
        a = self.admissions
        usable = (np.diff(a["stay_ptr"].numpy()) > 0) & (np.diff(a["icd_ptr"].numpy()) > 0)
        return np.flatnonzero(usable & (self.split_of(a["subject_id"].numpy()) == split))

    def examples(self, task: str, split: str) -> dict:
        """The task's examples in a split: {"row", "subject_id", "label", "cutoff"} numpy arrays."""
        t = self.labels.get(task)
        if t is None:  # rows and ids are integers even when empty: they index the stay and admission tensors
            return {"row": np.zeros(0, np.int64), "subject_id": np.zeros(0, np.int64),
                    "label": np.zeros(0, np.float32), "cutoff": np.zeros(0)}
        return select_rows(t, self.split_of(t["subject_id"]) == split)


def select_rows(examples: dict, keep: np.ndarray) -> dict:
    """The rows `keep` (a boolean mask or indices) of every array of an examples dict; other entries (the
    task's "level") pass through."""
    return {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in examples.items()}


def load_processed(root: Path) -> Processed:
    """Load a folder written by `preprocess`; a missing, damaged or other-version folder is one InputError line
    naming the file and what to re-run. A folder whose swap a killed run left half done is recovered first."""
    root = Path(root)
    if not (root / "meta.json").is_file():
        repair(root)
    if not (root / "meta.json").is_file():
        raise InputError(f"{root}: no processed data here (run `python medhmp.py preprocess --out {root}`)")
    fix = f"re-run `python medhmp.py preprocess --out {root}`"
    meta = read_file(root / "meta.json", lambda p: json.loads(p.read_text()), fix)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise InputError(f"{root}: format version {version}, this medhmp reads {FORMAT_VERSION}; {fix}")
    stays, admissions = (read_file(root / f"{name}.pt", lambda p: _tensors(p, keys), fix)
                         for name, keys in (("stays", ("stay_id", "ts_ptr")), ("admissions", ("hadm_id", "icd_ptr"))))
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
    return {n: np.array(sorted(splits[n]), dtype=np.int64) for n in ("train", "val", "test")}


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


# ------------------------------------------------------------------------------------------- counts
def cell_counts(data: Processed, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(T, F) int64: in how many of the stays `rows` each (hour, feature) cell is active. Read from the
    sparse layout in chunks of `chunk` stays, so memory follows the chunk, not the data."""
    s, T, F = data.stays, data.meta["seq_len"], data.meta["n_features"]
    out = np.zeros(T * F, dtype=np.int64)
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    for i in range(0, len(rows), chunk):
        batch = collate_stay(data, rows[i:i + chunk])        # ts_idx = (b * T + t) * F + f
        out += np.bincount((batch["ts_idx"] % (T * F)).numpy(), minlength=T * F)
    return out.reshape(T, F)


def code_counts(data: Processed, rows: np.ndarray, modality: str) -> tuple[np.ndarray, int]:
    """(V,) how many of the admissions `rows` carry each code of `modality` ("icd" or "drug"), and how many
    of them have any code of it (the admissions a code-set objective is scored on)."""
    a = data.admissions
    ptr, idx = a[f"{modality}_ptr"].numpy(), a[f"{modality}_idx"].numpy()
    rows = np.asarray(rows, dtype=np.int64)
    counts = ptr[rows + 1] - ptr[rows]
    take = _ranges(torch.as_tensor(ptr[rows]), torch.as_tensor(counts)).numpy()
    return np.bincount(idx[take], minlength=data.meta[f"n_{modality}"]), int((counts > 0).sum())


# ------------------------------------------------------------------------------------------- batches
def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenated aranges [s, s + c) for each (s, c): the gather index of CSR slices, vectorised."""
    total = int(counts.sum())
    offsets = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    return offsets + torch.arange(total)


def _multi_hot(ptr: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """(len(rows), width) float32 multi-hot of the CSR sets `rows`."""
    counts = ptr[rows + 1] - ptr[rows]
    out = torch.zeros(len(rows), width)
    owner = torch.repeat_interleave(torch.arange(len(rows)), counts)
    out[owner, idx[_ranges(ptr[rows], counts)].long()] = 1.0
    return out


def collate_stay(data: Processed, rows: torch.Tensor) -> dict:
    """Stay batch (docs/data-format.md): ts_idx flat into (B, T, F), static (B, S)."""
    s, n_features = data.stays, data.meta["n_features"]
    ptr = s["ts_ptr"]
    feat = s["ts_feat"][_ranges(ptr[rows], ptr[rows + 1] - ptr[rows])].long()    # (nnz,) f, in (t, f) order
    per_hour = s["ts_count"][rows].long().flatten()                              # (B*T,) active cells per hour
    bag = torch.repeat_interleave(torch.arange(len(per_hour)), per_hour, output_size=len(feat))  # b * T + t
    return {"ts_idx": bag * n_features + feat, "static": s["static"][rows].float()}


def collate_admission(data: Processed, rows: torch.Tensor, max_stays: int) -> dict:
    """Admission batch: the real stays packed (ts_idx into (Ns, T, F), static (Ns, S)) with stay_mask
    (B, K), multi-hot icd/drug (B, V), note (B, E) and modality masks (B,)."""
    a, m = data.admissions, data.meta
    first = a["stay_ptr"][rows]
    n_stays = torch.clamp(a["stay_ptr"][rows + 1] - first, max=max_stays)        # (B,)
    k = max(int(n_stays.max()) if len(rows) else 1, 1)
    batch = collate_stay(data, a["stay_rows"][_ranges(first, n_stays)])
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
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.float32)

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

    def __init__(self, data, rows, labels=None, max_stays: int = 3):  # paper: M = 3 stay slots at most
        super().__init__(data, rows, labels)
        self.max_stays = max_stays

    def _gather(self, rows):
        return collate_admission(self.data, rows, self.max_stays)


class PatientDataset(Dataset):
    """Patients as visit sequences: the coded admissions discharged by each example's cutoff, the last
    `max_visits`, oldest first."""

    def __init__(self, data: Processed, subject_ids, cutoffs, labels, max_visits: int = 50):  # paper: 50
        a = data.admissions
        coded = (np.diff(a["icd_ptr"].numpy()) > 0)
        order = np.lexsort((a["admittime"].numpy(), a["subject_id"].numpy()))
        order = order[coded[order]]
        subj, disch = a["subject_id"].numpy()[order], a["dischtime"].numpy()[order]
        lo, hi = np.searchsorted(subj, subject_ids, "left"), np.searchsorted(subj, subject_ids, "right")
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


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False, drop_last: bool = False, batches=None) -> DataLoader:
    """A DataLoader whose batches are built by the dataset's vectorised `__getitems__` (no per-sample
    Python work). Shuffling is seeded; `batches` (lists of indices) replaces batch_size/shuffle when given,
    so a training loop can resume mid-epoch. Evaluation loaders never shuffle."""
    common = dict(collate_fn=_passthrough, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, **common)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last, **common)


# ------------------------------------------------------------------------------- views and controls
def write_view(source: Path, view: Path, splits: dict, tensors: dict | None = None) -> Path:
    """A processed folder `view` that is `source` with other splits ({"train", "val", "test"}: subject ids):
    its files are links to the source's, except splits.json and the `tensors` files given ({file name:
    dict of tensors}, e.g. a shuffled control's stays.pt). Replaces an existing `view`."""
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in Path(source).iterdir():
        if f.name != "splits.json" and f.name not in (tensors or {}) and not f.name.startswith("."):
            (view / f.name).symlink_to(f.resolve())
    for name, value in (tensors or {}).items():
        torch_save(value, view / name)
    (view / "splits.json").write_text(json.dumps({k: [int(i) for i in v] for k, v in splits.items()}))
    return view


def shuffle_columns(data: Processed, subjects: np.ndarray, seed: int) -> dict:
    """The negative control of pretraining: stays.pt and admissions.pt with every column permuted on its own
    across the stays / admissions of `subjects` (the others untouched): each feature's (T,) hourly series,
    each static column, each ICD and drug code, each note dimension. Every column keeps its frequencies;
    co-occurrence between columns (within and across modalities) is destroyed. {file name: tensors}."""
    rng = np.random.default_rng(seed + 7919)
    stays = {k: v.clone() for k, v in data.stays.items()}
    adms = {k: v.clone() for k, v in data.admissions.items()}
    s_rows = np.flatnonzero(np.isin(data.stays["subject_id"].numpy(), subjects))
    a_rows = np.flatnonzero(np.isin(data.admissions["subject_id"].numpy(), subjects))
    T, F = data.meta["seq_len"], data.meta["n_features"]
    hours = np.repeat(np.tile(np.arange(T), len(stays["ts_count"])), stays["ts_count"].numpy().ravel())
    owner, feat, hours = _permute_owners(stays["ts_ptr"].numpy(), stays["ts_feat"].numpy(), s_rows, F, rng, hours)
    counts = np.bincount(owner * T + hours, minlength=len(stays["ts_count"]) * T).reshape(-1, T)
    stays.update(ts_count=torch.from_numpy(counts.astype(np.int16)), ts_feat=torch.from_numpy(feat.astype(np.int16)),
                 ts_ptr=torch.from_numpy(np.r_[0, np.cumsum(counts.sum(1))].astype(np.int64)))
    for m in ("icd", "drug"):
        owner, idx, _ = _permute_owners(adms[f"{m}_ptr"].numpy(), adms[f"{m}_idx"].numpy(), a_rows,
                                        data.meta[f"n_{m}"], rng)
        adms[f"{m}_ptr"] = torch.from_numpy(np.r_[0, np.cumsum(np.bincount(owner, minlength=len(adms["hadm_id"])))])
        adms[f"{m}_idx"] = torch.from_numpy(idx.astype(np.int32))
    for table, rows in ((stays["static"].numpy(), s_rows), (adms["note"].numpy(), a_rows[adms["note_mask"].numpy()[a_rows]])):
        for j in range(table.shape[1]):  # in place: the tensors share the arrays' memory
            table[rows, j] = table[rng.permutation(rows), j]
    return {"stays.pt": stays, "admissions.pt": adms}


def _permute_owners(ptr: np.ndarray, column: np.ndarray, rows: np.ndarray, width: int, rng, hours=None):
    """CSR entries (owner row, column) with each column's owners permuted among `rows` by a permutation of
    its own; returns owners, columns and `hours` (if given) sorted by owner, hour, column."""
    column = column.astype(np.int64)
    owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    target = np.tile(np.arange(len(ptr) - 1, dtype=np.int32), (width, 1))  # (width, rows): new owner per column
    for j in range(width):
        target[j, rows] = rng.permutation(rows)
    owner = target[column, owner]
    order = np.lexsort((column, owner) if hours is None else (column, hours, owner))
    return owner[order], column[order], None if hours is None else hours[order]
