"""Pipeline: the `preprocess` entry point, from an extract's CSV tables to a processed folder on
disk.

Usage: `python medhmp.py preprocess --raw RAW --out data/processed`, or
`preprocess(PreprocessConfig(raw=..., out=...))`. Reads the extract (MIMIC-III, MIMIC-IV or a
diagnosis extract) and writes the folder described in docs/data-format.md (meta.json, stays.pt,
admissions.pt, labels.csv, splits.json, note_cache.pt), whole or not at all (folders.Staged). The
arrays come from `build` (build_mimic, build_trinetx); this module adds what is written around them:
the resolved config, the sources read, task counts, the note cache, and the attrition and
skipped-row lines printed at the end.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import (DATA_FILES, FORMAT_VERSION, LABEL_COLUMNS, MEDS_LABELS_DIR, SPLITS, InputError,
                  config_record, file_facts, read_file, torch_save)
from folders import Staged
from preprocessing.build import (ICD_OPTIONS, Built, build_mimic, build_trinetx, check_notes,
                                 icd_systems)
from preprocessing.cohorts import task_counts
from preprocessing.meds import build_meds, is_meds_root
from preprocessing.meds_write import write_labels
from preprocessing.tables import find_layout
from progress import Reporter


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PreprocessConfig:
    raw: Path = Path("data/raw")
    notes: Path | None = None                 # a note table or folder; default: the layout's own
    out: Path = Path("data/processed")
    # "hashing", a local Hugging Face folder, or a hub name
    text_model: str = "hashing"
    text_device: str = "cpu"                  # where a Hugging Face text model runs
    limit_patients: int | None = None         # a deterministic sample of this many patients
    seq_len: int = 48                         # paper App. A: T = 48 one-hour bins
    min_frequency: float = 0.05               # paper App. A: drop features seen in < 5% of stays
    n_bins: int = 5                           # FIDDLE discretize: quintiles
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # official code 80/10/10 (here by patient)
    seed: int = 0
    # ARF/shock-defining items (tasks.TASKS) are not features
    exclude_label_items: bool = True
    # PRESCRIPTIONS column used as the drug code: drug|ndc|gsn
    drug_code: str = "drug"
    # ICD systems kept: 9 | 10 | both. fidelity: the paper (MIMIC-III) has ICD-9 only, where
    # both = 9; on MIMIC-IV `9` drops every admission coded after October 2015, about half of them
    # (docs/preprocessing.md, Inputs)
    icd: str = "both"
    # reuse another processed folder's vocabularies and features
    vocab_from: Path | None = None
    note_max_tokens: int = 512                # Clinical-T5 was trained on 512 tokens
    # "mean" (attention-masked) or "mean_unmasked" (official)
    note_pooling: str = "mean"
    # width of the built-in hashing text model (Clinical-T5-Base: 768)
    hashing_dim: int = 768
    text_batch_size: int = 16
    readmission_days: int = 30                # paper §3.3: 30-day readmission
    # paper App. A: history ends six months before diagnosis
    patient_gap_days: int = 180
    controls_per_case: int = 3                # paper App. A: three matched controls per case
    # a MEDS root's profile (built-in name or file); None: dataset.json
    meds_profile: str | None = None
    quiet: bool = False


# config fields left out of meta.json for CSV layouts, whose meta stays as it was
MEDS_ONLY = ("meds_profile",)


def preprocess(cfg: PreprocessConfig) -> dict:
    """Read the extract at `cfg.raw`, write the processed folder `cfg.out` atomically; returns meta.
    The output is checked, locked and staged (folders.Staged) before any table is read (and
    build_mimic loads the text model first), so an unwritable --out or a bad --text-model fails in
    seconds, in one line."""
    rep = Reporter(cfg.quiet)
    raw = Path(cfg.raw)
    # a bad --icd fails before anything is read (ICD_OPTIONS)
    icd_systems(cfg.icd)
    layout = "meds" if is_meds_root(raw) else find_layout(raw)
    check_notes(cfg.notes, raw, layout)       # so does a mistyped --notes
    with Staged(cfg.out, "--out", log=rep.log) as stage:
        out = stage.out
        _check_out(out)
        rep.log(f"reading {raw} ({layout} layout)")
        cache = _load_cache(out, rep)
        build = {"trinetx": build_trinetx, "meds": build_meds}.get(layout, build_mimic)
        built = build(cfg, raw, layout, rep=rep, note_cache=cache)
        meta = built.meta
        meta["tasks"] = task_counts(built.labels, built.splits)
        meta.update(format_version=FORMAT_VERSION, layout=layout,
                    created=time.strftime("%Y-%m-%d %H:%M:%S"),
                    config={k: v for k, v in config_record(cfg).items()
                            if layout == "meds" or k not in MEDS_ONLY},
                    sources={k: s.describe() for k, s in built.sources.items()})
        stage.commit(lambda tmp: _write_folder(tmp, built, {**cache, **built.note_embeddings}, rep))
    _print_attrition(meta, rep)
    for task, c in meta["tasks"].items():
        parts = [f"{s} {c[s][0]} ({c[s][1]} positive)" for s in SPLITS]
        rep.log(f"{task} ({c['level']}): " + ", ".join(parts))
    rep.log(f"wrote {out}: {meta['counts']}")
    for line in [line for src in built.sources.values()
                 for line in src.warnings()] + built.warnings:
        rep.log(line)
    return meta


# ------------------------------------------------------------------------------------------ writing
# every file preprocess has ever written into a processed folder: anything else there is someone's
# own
PROCESSED_FILES = ("meta.json", *DATA_FILES, "note_cache.pt", MEDS_LABELS_DIR)


def _check_out(out: Path) -> None:
    """An existing --out is replaced whole only when it is a processed folder holding nothing else
    (a RUN or a user's file inside it would be lost with it)."""
    if out.exists() and (not out.is_dir()
                         or (any(out.iterdir()) and not (out / "meta.json").exists())):
        raise InputError(f"{out}: exists and is not a processed folder; choose another --out")
    other = sorted(p.name for p in out.iterdir()
                   if p.name not in PROCESSED_FILES) if out.is_dir() else []
    if other:
        raise InputError(f"{out}: holds files preprocess did not write ({', '.join(other[:3])}"
                         f"{', ...' if len(other) > 3 else ''}), which replacing the folder would "
                         "lose; move them, or choose another --out")


def _load_cache(out: Path, rep: Reporter) -> dict:
    """{text key: vector} saved by the last run into this folder (note_cache.pt), else empty; a
    damaged cache is ignored with a warning (the embeddings are recomputed and the cache written
    anew)."""
    path = out / "note_cache.pt"
    if not path.is_file():
        return {}
    try:
        saved = read_file(path, lambda p: torch.load(p, weights_only=True), "")
        return {k: v for dim in saved["dims"]
                for k, v in zip(saved[f"keys_{dim}"], saved[f"vectors_{dim}"].numpy())}
    except (InputError, KeyError, TypeError, AttributeError):
        rep.log(f"warning: {path} is damaged; ignoring it (the note embeddings are recomputed, the "
                "cache rebuilt)")
        return {}


def _save_cache(cache: dict, path: Path) -> None:
    """The note cache grouped by width: keys_<E> (list) and vectors_<E> (n, E) float16."""
    groups: dict = {}
    for k, v in cache.items():
        groups.setdefault(len(v), []).append(k)
    saved = {"dims": sorted(groups)}
    for dim, keys in groups.items():
        saved[f"keys_{dim}"] = keys
        saved[f"vectors_{dim}"] = torch.from_numpy(
            np.stack([cache[k] for k in keys]).astype(np.float16))
    torch_save(saved, path)


def _write_folder(folder: Path, built: Built, cache: dict, rep: Reporter) -> None:
    """Every file of the processed folder into `folder` (the staging folder that then becomes
    --out); `cache` is the note cache to save: the earlier runs' embeddings and this run's. Each
    task's cohort is also written as MEDS label files (meds_write.write_labels) when pyarrow is
    installed."""
    for name, arrays in (("stays", built.stays), ("admissions", built.admissions)):
        torch_save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                   folder / f"{name}.pt")
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LABEL_COLUMNS)
        w.writerows(built.labels)
    (folder / "splits.json").write_text(json.dumps(built.splits))
    rep.log(write_labels(folder / MEDS_LABELS_DIR, built))
    _save_cache(cache, folder / "note_cache.pt")
    # what data.load_processed checks each file against: a file copied in from another folder is
    # named
    built.meta["files"] = {name: file_facts(folder / name) for name in DATA_FILES}
    (folder / "meta.json").write_text(json.dumps(built.meta, indent=1))


def _print_attrition(meta: dict, rep: Reporter) -> None:
    for name, steps in meta["attrition"].items():
        rep.log(f"{name}: " + " -> ".join(f"{step} {n:,}" for step, n in steps))
