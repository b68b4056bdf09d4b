"""Build: the raw tables of one extract -> the arrays of a processed folder, in memory.

Usage: called by `preprocessing.pipeline.preprocess`: `build_mimic(cfg, raw, layout, rep=rep,
note_cache=cache)` for the MIMIC-III and MIMIC-IV layouts, `build_trinetx(cfg, raw, layout, rep=rep,
note_cache=cache)` for a diagnosis extract; `cfg` is a `pipeline.PreprocessConfig`. Each returns a
`Built`, which the pipeline writes as the folder described in docs/data-format.md: cohorts and
attrition (patients -> admissions -> ICU stays), features fitted on the training split, code
vocabularies, one embedded note per admission and the labels of every task. The steps, and the
per-patient, per-admission and per-stay records they pass along (dicts of equal-length arrays), are
written down in docs/preprocessing.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import FORMAT_VERSION, SPLITS, lookup, row_of
from folders import InputError
from preprocessing.cohorts import (MINUTES_PER_DAY, assign_splits, patient_labels,
                                   readmission_labels, sample_patients, stay_labels)
from preprocessing.extract import (STATIC_CATEGORIES, StayIndex, age_at, find_notes, load_core,
                                   load_trinetx, read_diagnoses, read_drugs, read_notes,
                                   stream_events, variable_names)
from preprocessing.features import (apply_static, apply_timeseries, build_vocab, codes_to_csr,
                                    embed_notes, fit_static, fit_timeseries, load_text_model,
                                    reuse_timeseries)
from preprocessing.tables import NO_TIME, EmptyFile, Source, parse_int, unique
from tasks import ICD_SYSTEMS


@dataclass
class Built:
    """What one extract becomes, in memory; `pipeline.preprocess` writes it as the processed
    folder."""
    # meta.json, less what the pipeline adds (format, config, sources, task counts)
    meta: dict
    stays: dict                 # the arrays of stays.pt (docs/data-format.md)
    admissions: dict            # the arrays of admissions.pt
    labels: list[tuple]         # the rows of labels.csv (data.LABEL_COLUMNS)
    splits: dict                # splits.json
    sources: dict               # table -> tables.Source of every table read, in reading order
    # {text key: vector} computed here, for note_cache.pt
    note_embeddings: dict = field(default_factory=dict)
    # `warning:` lines for the end of the run, beside each table's own (tables.Source.warnings)
    warnings: list = field(default_factory=list)


def _take(record: dict, rows) -> dict:
    """The rows `rows` (a mask or indices) of a record, a dict of equal-length arrays or lists (None
    stays None)."""
    idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]
                if v is not None else None) for k, v in record.items()}


def _patient_steps(table: str, n_table: int, n_kept: int, cfg) -> list:
    """The attrition of patients: all in `table`, then the --limit-patients sample when it dropped
    any."""
    steps = [[f"patients in the {table}", n_table]]
    if n_kept < n_table:
        steps.append([f"sampled (--limit-patients {cfg.limit_patients})", n_kept])
    return steps


# ------------------------------------------------------------------------------------------- MIMIC
def build_mimic(cfg, raw: Path, layout: str, *, rep, note_cache: dict, reader=None) -> Built:
    """A MIMIC-III or MIMIC-IV extract: patients -> admissions -> adult MetaVision ICU stays with
    events. The text model is loaded first, so that a bad --text-model fails before any table is
    read. `reader` gives the tables (CsvReader's methods; meds.MedsReader for a MEDS extract)."""
    text_model = load_text_model(cfg.text_model, cfg.text_device)
    reader = reader or CsvReader(raw, layout)
    core, sources = reader.load_core()
    subjects = sample_patients(core["patients"]["subject_id"], cfg)
    attrition = {"patients": _patient_steps("patients table", len(core["patients"]["subject_id"]),
                                            len(subjects), cfg)}
    # rows as `subjects`
    patients = _take(core["patients"], row_of(core["patients"]["subject_id"], subjects))
    # per patient, an index into SPLITS
    split = reader.assign_splits(subjects, cfg.seed, cfg.split)
    admissions, attrition["admissions"] = _kept_admissions(core["admissions"], subjects)
    # row in `patients` per admission
    admission_patient = lookup(subjects, admissions["subject_id"])
    stays, attrition["stays"] = _icu_stays(core["stays"], admissions, patients, admission_patient)

    codes = _admission_codes(cfg, reader, admissions, split[admission_patient] == 0, rep,
                             known=core["admissions"]["hadm_id"])   # small: first
    sources.update(codes["sources"])
    attrition["admissions"].append([CODED, codes["with_codes"]])
    warnings = codes["warnings"]
    _check_usable(raw, attrition, rep)
    stays, events, onsets, skipped, event_sources, overlaps = _stays_with_events(cfg, reader,
                                                                                 stays, rep)
    sources.update(event_sources)
    attrition["stays"].append([f"with events in the first {cfg.seq_len} h", len(stays["stay_id"])])
    _check_usable(raw, attrition, rep)
    train_stay = split[stays["patient_row"]] == 0
    rep.log(f"fitting features on {int(train_stay.sum())} training stays")
    names, label_sources = reader.variable_names(events["var_keys"])
    warnings += [line for src in label_sources for line in src.warnings()]
    ts, ts_spec = _time_series(cfg, events, names, train_stay)
    static, static_spec = _static_vectors(cfg, stays, admissions, patients, train_stay)

    skipped["diagnoses and prescriptions"] = codes["counts"]
    notes = _admission_notes(cfg, reader, admissions, rep=rep, note_cache=note_cache,
                             text_model=text_model)
    sources.update(notes["sources"])
    skipped["notes"] = notes["counts"]
    warnings += notes["warnings"]
    admission_arrays = _admission_arrays(admissions, stays, codes["csr"], notes["arrays"])
    stay_arrays = {"stay_id": stays["stay_id"], "hadm_id": stays["hadm_id"],
                   "subject_id": stays["subject_id"],
                   # hours, as admissions.pt
                   "intime": stays["intime"] / 60.0, **ts, "static": static}
    labels, task_steps = stay_labels(stays, admissions, onsets, cfg)
    for rows, steps in (readmission_labels(admissions, admission_arrays, cfg),
                        patient_labels(admissions, codes["diagnoses"], patients, subjects, cfg)):
        labels, task_steps = labels + rows, {**task_steps, **steps}
    meta = _mimic_meta(cfg, subjects, admissions, stays, codes, notes, ts, ts_spec, static_spec,
                       {**attrition, **task_steps}, skipped)
    if overlaps:
        meta["overlapping_stays"], line = _overlap_record(overlaps, reader.stay_group)
        warnings.append(line)
    meta["skipped"] = skipped_record(meta["skipped"], sources)
    return Built(meta, stay_arrays, admission_arrays, labels,
                 _splits_json(subjects, split, cfg), sources, notes["embeddings"], warnings)


def _mimic_meta(cfg, subjects, admissions: dict, stays: dict, codes: dict, notes: dict, ts: dict,
                ts_spec: dict, static_spec: dict, attrition: dict, skipped: dict) -> dict:
    """build_mimic's meta.json before the overlapping stays and the tables' own skipped rows: the
    features, code vocabularies, notes, `attrition` (the cohorts' and the tasks'), `skipped` and the
    counts of what was kept."""
    n_cells = len(stays["stay_id"]) * cfg.seq_len * max(1, len(ts_spec["columns"]))
    return {"seq_len": cfg.seq_len, **_feature_meta(cfg, ts_spec, static_spec),
            "n_icd": len(codes["icd_vocab"]), "n_drug": len(codes["drug_vocab"]),
            "note_dim": notes["dim"], "icd_vocab": codes["icd_vocab"],
            "drug_vocab": codes["drug_vocab"], "drug_code": cfg.drug_code, "icd": codes["icd"],
            "notes": notes["info"], "attrition": attrition, "skipped": skipped,
            "counts": {"patients": len(subjects), "admissions": len(admissions["hadm_id"]),
                       "stays": len(stays["stay_id"]), "active_cells": len(ts["ts_feat"]),
                       "density": round(len(ts["ts_feat"]) / max(1, n_cells), 5)}}


class CsvReader:
    """The tables of a CSV layout as build_mimic reads them, through preprocessing.extract. Another
    input format hands build_mimic the same records through the same methods (meds.MedsReader)."""
    # stays that overlap in time are those of one admission (StayIndex by hadm_id)
    stay_group = "admission"

    def __init__(self, raw: Path, layout: str):
        self.raw, self.layout = raw, layout

    def load_core(self):
        return load_core(self.raw, self.layout)

    def assign_splits(self, subjects, seed, fractions):
        return assign_splits(subjects, seed, fractions)

    def read_diagnoses(self, systems, known):
        return read_diagnoses(self.raw, self.layout, systems, known)

    def read_drugs(self, code, known, progress):
        return read_drugs(self.raw, self.layout, code, known, progress)

    def stream_events(self, stays: dict, *, hours: int, exclude_label_items: bool, progress):
        """extract.stream_events's (events, onsets, skipped, sources), and the (row, row) pairs of
        `stays` of one admission that overlap in time (StayIndex.overlaps)."""
        index = StayIndex(stays["hadm_id"], stays["intime"], stays["outtime"])
        return (*stream_events(self.raw, self.layout, index, len(stays["stay_id"]), hours=hours,
                               exclude_label_items=exclude_label_items, progress=progress),
                index.overlaps)

    def variable_names(self, keys):
        return variable_names(self.raw, self.layout, keys)

    def find_notes(self, notes):
        return find_notes(self.raw, notes, self.layout)


def _kept_admissions(admissions: dict, subjects: np.ndarray) -> tuple[dict, list]:
    """The admissions of the kept patients with valid times, sorted by hadm_id, and their attrition
    steps."""
    steps = [["admissions in the admissions table", len(admissions["hadm_id"])]]
    admissions = _take(admissions, lookup(subjects, admissions["subject_id"]) >= 0)
    steps.append(["of kept patients", len(admissions["hadm_id"])])
    admissions = _take(admissions, admissions["dischtime"] >= admissions["admittime"])
    steps.append(["discharged at or after admission (others: invalid times)",
                  len(admissions["hadm_id"])])
    return _take(admissions, np.argsort(admissions["hadm_id"])), steps


def _icu_stays(stays: dict, admissions: dict, patients: dict,
               admission_patient: np.ndarray) -> tuple[dict, list]:
    """The ICU stays of the kept admissions that are MetaVision, closed and adult, with three
    columns added: "admission_row" (in `admissions`), "patient_row" (in `patients`) and "age" (years
    at ICU admission); and their attrition steps."""
    steps = [["ICU stays in the icustays table", len(stays["stay_id"])]]
    stays = dict(stays, admission_row=lookup(admissions["hadm_id"], stays["hadm_id"]))
    for name, keep in (("of kept admissions", lambda: stays["admission_row"] >= 0),
                       ("MetaVision (the label items are MetaVision itemids)",
                        lambda: stays["metavision"]),
                       ("with an outtime", lambda: stays["outtime"] != NO_TIME),
                       ("outtime after intime (others: invalid times)",
                        lambda: stays["outtime"] > stays["intime"])):
        stays = _take(stays, keep())
        steps.append([name, len(stays["stay_id"])])
    stays["patient_row"] = admission_patient[stays["admission_row"]]
    stays["age"] = age_at(patients, stays["patient_row"], stays["intime"])
    stays = _take(stays, stays["age"] >= 18)
    steps.append(["age >= 18 at ICU admission", len(stays["stay_id"])])
    return stays, steps


def _stays_with_events(cfg, reader, stays: dict, rep):
    """Stream the event tables for `stays` and keep the stays with an event in the first seq_len
    hours: (stays, events with "stay" renumbered over them, onsets, skipped counts, the Source of
    each event table, the (stay_id, stay_id) pairs of stays of one admission (MEDS: subject;
    reader.stay_group) that overlap)."""
    events, onsets, skipped, sources, overlap_rows = reader.stream_events(
        stays, hours=cfg.seq_len, exclude_label_items=cfg.exclude_label_items,
        progress=rep.bytes_task)
    overlaps = [(int(stays["stay_id"][i]), int(stays["stay_id"][j])) for i, j in overlap_rows]
    has_events = np.zeros(len(stays["stay_id"]), bool)
    has_events[events["stay"]] = True
    new_row = (np.cumsum(has_events) - 1).astype(np.int32)
    # renumbered over the kept stays (in order)
    events = dict(events, stay=new_row[events["stay"]])
    onsets = {task: hours[has_events] for task, hours in onsets.items()}
    return _take(stays, has_events), events, onsets, skipped, sources, overlaps


def _overlap_record(overlaps: list, group: str) -> tuple[dict, str]:
    """meta.json "overlapping_stays" and the warning line for the pairs of ICU stays of one `group`
    (admission; a MEDS subject) that overlap."""
    (a, b), n = overlaps[0], len(overlaps)
    record = {"pairs": n, "first": [a, b], "rule": "an event inside both stays is an event of each"}
    return record, (f"warning: {n:,} pairs of ICU stays of one {group} overlap in time (first: "
                    f"stays {a} and {b}); an event inside both is an event of each (meta.json: "
                    "overlapping_stays)")


def skipped_record(skipped: dict, sources: dict) -> dict:
    """meta.json "skipped": `skipped` with the rows each table skipped for a bad value
    (Source.skipped) added under the table's name (in a new entry where the table had none; only
    counts that are not zero)."""
    out = dict(skipped)
    for name, src in sources.items():
        if src.skipped and not isinstance(out.get(name, {}), str):
            out[name] = {**out.get(name, {}), **src.skipped}
    return out


def _check_usable(raw, attrition: dict, rep) -> None:
    """Stop, in one line, when no ICU stay and no admission with ICD codes is left (an empty folder
    would only fail later, in pretraining, with a less helpful message); warn when no ICU stay is
    left, saying what the step that lost the last ones means for a MIMIC extract (STAYS_LOST)."""
    stays, admissions = attrition["stays"], attrition["admissions"]
    if stays[-1][1] == 0 and dict(admissions)[CODED] == 0:
        raise InputError(f"{raw}: nothing usable is left: {_where_lost(stays)}, and "
                         f"{_where_lost(admissions)}")
    if stays[-1][0].startswith("with events") and stays[-1][1] == 0:
        step = next(name for name, n in stays if n == 0)
        hint = next((text for start, text in STAYS_LOST.items() if step.startswith(start)), "")
        rep.log(f"warning: no ICU stay is left ({_where_lost(stays)}{hint}): admission codes, "
                "notes and the admission- and patient-level labels are written, but the stay tasks "
                "and pretraining need ICU stays")


CODED = "with ICD diagnosis codes"   # the admissions' attrition step that _check_usable reads


# why an extract may lose every ICU stay at an attrition step of `_icu_stays` / `_stays_with_events`
STAYS_LOST = {"ICU stays in": ": the icustays table has no rows",
              "of kept admissions": ": no stay's hadm_id is that of a kept admission",
              "MetaVision": ": every stay is CareVue (MIMIC-III 2001-2008), whose items are not "
                            "the label items",
              "with an outtime": ": every outtime is blank",
              "outtime after": ": every outtime is at or before its intime",
              "age >= 18": ": no adult patient (the cohorts are adult)",
              "with events": ": no event row has the hadm_id and a time inside the first hours "
                             "of a stay"}


ICD_OPTIONS = (*ICD_SYSTEMS, "both")  # --icd


def icd_systems(option: str) -> tuple[str, ...]:
    """--icd 9|10|both -> the ICD systems whose codes are kept (tasks.ICD_SYSTEMS keys)."""
    if option not in ICD_OPTIONS:
        raise InputError(f"--icd {option!r} is not one of {', '.join(ICD_OPTIONS)}")
    return tuple(ICD_SYSTEMS) if option == "both" else (option,)


def icd_record(option: str, visit: np.ndarray, codes: np.ndarray) -> dict:
    """meta.json "icd": the --icd option, and per system the (visit, code) rows kept and the visits
    (admissions or encounters) with at least one code of that system."""
    record = {"option": option, "rows": {}, "admissions": {}}
    for system, prefix in ICD_SYSTEMS.items():
        rows = np.char.startswith(codes, prefix.encode()) if len(codes) else np.zeros(0, bool)
        record["rows"][f"ICD-{system}"] = int(rows.sum())
        record["admissions"][f"ICD-{system}"] = len(unique(visit[rows]))
    return record


def _where_lost(steps: list) -> str:
    """'ICU stays in the icustays table 136, none left at "outtime after intime (...)"' from an
    attrition list."""
    k = next(i for i, (_, n) in enumerate(steps) if n == 0)
    return f"{steps[0][0]} {steps[0][1]}, none left at '{steps[k][0]}'" if k else f"{steps[0][0]} 0"


def _time_series(cfg, events: dict, names: dict, train_stay: np.ndarray) -> tuple[dict, dict]:
    """FIDDLE-style time series fitted on the training stays: (the sparse arrays of stays.pt, see
    docs/data-format.md, and their spec); `names` maps variable keys to readable names."""
    other = vocab_source(cfg)
    # --vocab-from a folder with ICU stays: its features
    if other is not None and other.get("n_features"):
        spec = reuse_timeseries(other, events)
    else:
        spec = fit_timeseries(events, train_stay, names, cfg.min_frequency, cfg.n_bins)
    if len(spec["columns"]) >= 2 ** 15:
        raise InputError(f"{len(spec['columns'])} time-series features do not fit int16 storage; "
                         "raise --min-frequency")
    return apply_timeseries(events, spec, len(train_stay), cfg.seq_len), spec


def _static_vectors(cfg, stays: dict, admissions: dict, patients: dict, train_stay: np.ndarray):
    """The binary static vector of every stay, fitted on the training stays: ((N, S) uint8, its
    spec)."""
    admission = stays["admission_row"]
    columns = {"age": stays["age"].astype(np.float64),
               "hadm_to_icu_hours": (stays["intime"] - admissions["admittime"][admission]) / 60.0,
               "gender": [patients["gender"][i] for i in stays["patient_row"]],
               **{c: [admissions[c][i] for i in admission] for c in STATIC_CATEGORIES
                  if c in admissions and admissions[c] is not None},
               "first_careunit": stays["first_careunit"] or [""] * len(admission)}
    other = vocab_source(cfg)
    if other is not None and other.get("n_features"):
        spec = {"variables": other["features"]["static"], "columns": other["static_names"]}
    else:
        spec = fit_static(columns, train_stay, cfg.min_frequency, cfg.n_bins)
    return apply_static(columns, spec), spec


def _feature_meta(cfg, ts_spec: dict, static_spec: dict) -> dict:
    """The features' part of meta.json: sizes, column names and the fitted variables."""
    return {"n_features": len(ts_spec["columns"]), "n_static": len(static_spec["columns"]),
            "feature_names": ts_spec["columns"], "static_names": static_spec["columns"],
            "features": {"variables": ts_spec["variables"], "static": static_spec["variables"],
                         "excluded_label_items": cfg.exclude_label_items}}


def _splits_json(subjects, split, cfg) -> dict:
    return {"seed": cfg.seed, "fractions": list(cfg.split),
            "method": "sha1(seed:subject_id) buckets",
            **{n: subjects[split == i].tolist() for i, n in enumerate(SPLITS)}}


def vocab_source(cfg) -> dict | None:
    """The meta.json of the processed folder --vocab-from names (whose vocabularies and fitted
    features this extract is read with), or None."""
    if cfg.vocab_from is None:
        return None
    path = Path(cfg.vocab_from) / "meta.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (--vocab-from needs a processed folder)")
    other = json.loads(path.read_text())
    # e.g. codes spelled without their ICD system (version 2)
    if other.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: format version {other.get('format_version')}, this medhmp "
                         f"writes {FORMAT_VERSION}; preprocess that extract again before reusing "
                         "its vocabularies")
    return other


def _vocabularies(cfg, icd_codes, drug_codes, icd_train, drug_train) -> tuple[list, list]:
    """The ICD and drug vocabularies: built from the codes of training admissions (`*_train`: a mask
    over the code pairs), or those of the folder --vocab-from names."""
    other = vocab_source(cfg)
    if other is None:
        return build_vocab(icd_codes, icd_train), build_vocab(drug_codes, drug_train)
    return other["icd_vocab"], other["drug_vocab"]


def _admission_codes(cfg, reader, admissions: dict, train_admission: np.ndarray, rep, *,
                     known: np.ndarray) -> dict:
    """ICD and drug code sets per admission: {"diagnoses": (admission row, code) pairs (for the
    cohorts), "icd_vocab", "drug_vocab", "csr": the code arrays of admissions.pt, "with_codes":
    admissions with an ICD code, "icd": rows and admissions kept per ICD system (meta.json),
    "counts": rows dropped, "sources", "warnings": a line when the admissions end with no ICD or no
    drug code}. `known`: every hadm_id of the admissions table (a code of another admission is
    counted on its table)."""
    systems, known = icd_systems(cfg.icd), np.sort(known)
    diagnosis_hadm, diagnosis_code, counts, diagnoses_src = reader.read_diagnoses(systems, known)
    drug_hadm, drug_code, drugs_src = reader.read_drugs(cfg.drug_code, known, rep.bytes_task)
    # admission row per pair, -1: not kept
    diagnosis_row = lookup(admissions["hadm_id"], diagnosis_hadm)
    drug_row = lookup(admissions["hadm_id"], drug_hadm)
    diagnosis_row, diagnosis_code = (diagnosis_row[diagnosis_row >= 0],
                                     diagnosis_code[diagnosis_row >= 0])
    drug_row, drug_code = drug_row[drug_row >= 0], drug_code[drug_row >= 0]
    n = len(admissions["hadm_id"])
    icd_vocab, drug_vocab = _vocabularies(cfg, diagnosis_code, drug_code,
                                          train_admission[diagnosis_row], train_admission[drug_row])
    icd_ptr, icd_idx, icd_oov = codes_to_csr(diagnosis_row, diagnosis_code, icd_vocab, n)
    drug_ptr, drug_idx, drug_oov = codes_to_csr(drug_row, drug_code, drug_vocab, n)
    icd = icd_record(cfg.icd, diagnosis_row, diagnosis_code)
    rep.log(f"codes: {len(icd_vocab)} ICD ({icd['admissions']} admissions per system), "
            f"{len(drug_vocab)} drugs ({cfg.drug_code}); {counts}")
    # a MEDS extract has no diagnosis or drug table of its own (None): its codes come with the
    # events
    sources = {k: v for k, v in (("diagnoses", diagnoses_src), ("prescriptions", drugs_src))
               if v is not None}
    warnings = [] if len(icd_idx) else [
        no_codes("ICD", diagnoses_src, {**counts, "outside the vocabulary": icd_oov})]
    if drugs_src is not None and not drugs_src.empty and len(drug_idx) == 0:
        warnings.append(no_codes("drug", drugs_src, {"outside the vocabulary": drug_oov}))
    return {"diagnoses": (diagnosis_row, diagnosis_code), "icd_vocab": icd_vocab,
            "drug_vocab": drug_vocab,
            "csr": {"icd_ptr": icd_ptr, "icd_idx": icd_idx, "drug_ptr": drug_ptr,
                    "drug_idx": drug_idx},
            "with_codes": len(unique(diagnosis_row)), "sources": sources, "icd": icd,
            "warnings": warnings,
            "counts": {**counts, "ICD codes outside the vocabulary": icd_oov,
                       "drug codes outside": drug_oov}}


def no_codes(kind: str, src, counts: dict) -> str:
    """The warning line for a run whose admissions (or visits) end with no `kind` code at all; `src`
    is the table read, None where the codes came with the events (MEDS)."""
    dropped = "; ".join(f"{what} {n:,}" for what, n in
                        {**counts, **(src.skipped if src is not None else {})}.items() if n)
    where = f"{src.path}: {src.rows:,} rows read" if src is not None else "read with the events"
    return (f"warning: no {kind} code is left for any admission ({where}"
            f"{'; ' + dropped if dropped else ''}); the {kind} modality is empty")


def check_notes(notes: Path | None, raw: Path, layout: str) -> None:
    """--notes, checked before any work: a note table (or a folder holding one) that exists, for a
    layout with admissions to attach notes to."""
    if notes is None:
        return
    if layout == "trinetx":
        raise InputError(f"--notes {notes}: a diagnosis extract has no admissions to attach notes "
                         "to; leave --notes out")
    find_notes(raw, Path(notes), layout)


def _admission_notes(cfg, reader, admissions: dict, *, rep, note_cache: dict, text_model) -> dict:
    """One embedded note per admission (its latest discharge summary), zeros and mask 0 where none:
    {"arrays": note and note_mask of admissions.pt, "dim", "info" (meta.json), "counts" (rows
    skipped), "sources", "embeddings" (those computed here), "warnings" (an empty note table)}."""
    path = reader.find_notes(cfg.notes)
    texts, counts, sources, warnings = {}, {"note table": "missing"}, {}, []
    if path is not None:
        try:
            texts, counts, sources["notes"] = read_notes(path, set(admissions["hadm_id"].tolist()),
                                                         rep.bytes_task)
        except EmptyFile:
            counts, warnings = {"note table": "empty file"}, Source(path, empty=True).warnings()
    hadms = [h for h in admissions["hadm_id"].tolist() if h in texts]
    if path is None or not hadms:
        rep.log(f"warning: no notes found"
                f"{'' if path is None else f' for these admissions in {path}'}; "
                "the note modality is masked everywhere")
    vectors, info, computed = embed_notes([texts[h] for h in hadms], cfg.text_model, note_cache,
                                          dim=cfg.hashing_dim, max_tokens=cfg.note_max_tokens,
                                          pooling=cfg.note_pooling, device=cfg.text_device,
                                          batch_size=cfg.text_batch_size, progress=rep.task,
                                          loaded=text_model)
    # embed_notes gives the model's width even for no notes
    dim = vectors.shape[1]
    note = np.zeros((len(admissions["hadm_id"]), dim), np.float16)
    rows = lookup(admissions["hadm_id"], np.array(hadms, dtype=np.int64))
    note[rows] = vectors
    mask = np.zeros(len(admissions["hadm_id"]), bool)
    mask[rows] = True
    info.update(source=str(path) if path else None,
                selection="latest discharge summary per admission", with_note=int(mask.sum()))
    return {"arrays": {"note": note, "note_mask": mask}, "dim": int(dim), "info": info,
            "counts": counts, "sources": sources, "embeddings": computed, "warnings": warnings}


def _admission_arrays(admissions: dict, stays: dict, code_arrays: dict, note_arrays: dict) -> dict:
    """The arrays of admissions.pt (docs/data-format.md); times in hours since 1970."""
    # stays grouped by admission
    order = np.lexsort((stays["intime"], stays["admission_row"]))
    return {"hadm_id": admissions["hadm_id"], "subject_id": admissions["subject_id"],
            "admittime": admissions["admittime"] / 60.0,
            "dischtime": admissions["dischtime"] / 60.0,
            "died": admissions["died"], **code_arrays, **note_arrays,
            "stay_ptr": np.searchsorted(stays["admission_row"][order],
                                        np.arange(len(admissions["hadm_id"]) + 1)),
            "stay_rows": order}


# -------------------------------------------------------------------------------- diagnosis extract
def build_trinetx(cfg, raw: Path, layout: str, *, rep, note_cache: dict) -> Built:
    """A diagnosis extract: visits (encounters) with ICD code sets and the patient-level tasks only
    (no stays, drugs or notes; `rep` and `note_cache` are unused)."""
    tables, sources = load_trinetx(raw, icd_systems(cfg.icd))
    patient_table, diagnosis_table = tables["patients"], tables["diagnoses"]
    patient_ids, numeric = _patient_numbers(patient_table["subject_id"])
    subjects = sample_patients(patient_ids, cfg)
    attrition = {"patients": _patient_steps("patient table", len(patient_ids), len(subjects), cfg)}
    patients = _take({"gender": patient_table["gender"],
                      "year_of_birth": patient_table["year_of_birth"],
                      "id": patient_ids}, row_of(patient_ids, subjects))
    visits, diagnoses = _visits(diagnosis_table, patient_table, patient_ids, subjects)
    split = assign_splits(subjects, cfg.seed, cfg.split)
    train_visit = split[lookup(subjects, visits["subject_id"])] == 0
    diagnosis_visit, codes = diagnoses
    icd_vocab, drug_vocab = _vocabularies(cfg, codes, np.zeros(0, "S1"),
                                          train_visit[diagnosis_visit], np.zeros(0, bool))
    n = len(visits["subject_id"])
    icd_ptr, icd_idx, oov = codes_to_csr(diagnosis_visit, codes, icd_vocab, n)
    attrition["visits"] = [["encounters with ICD codes", n]]
    admission_arrays = {"hadm_id": np.arange(n, dtype=np.int64), "subject_id": visits["subject_id"],
                        "admittime": visits["first_date"] / 60.0,
                        # a dated visit lasts its day
                        "dischtime": visits["last_date"] / 60.0 + 24.0,
                        "died": np.zeros(n, bool), "icd_ptr": icd_ptr, "icd_idx": icd_idx,
                        "drug_ptr": np.zeros(n + 1, np.int64), "drug_idx": np.zeros(0, np.int32),
                        "note": np.zeros((n, 0), np.float16), "note_mask": np.zeros(n, bool),
                        "stay_ptr": np.zeros(n + 1, np.int64), "stay_rows": np.zeros(0, np.int64)}
    labels, task_steps = patient_labels({"subject_id": visits["subject_id"],
                                         "admittime": visits["first_date"],
                                         "dischtime": visits["last_date"] + MINUTES_PER_DAY},
                                        diagnoses, patients, subjects, cfg)
    meta = {"seq_len": cfg.seq_len, "n_features": 0, "n_static": 0, "n_icd": len(icd_vocab),
            "n_drug": len(drug_vocab), "note_dim": 0, "feature_names": [], "static_names": [],
            "icd": icd_record(cfg.icd, diagnosis_visit, codes),
            "icd_vocab": icd_vocab, "drug_vocab": drug_vocab, "drug_code": None,
            "ids": "source patient ids" if numeric
                   else "patients numbered in the order of the patient table; "
                   "encounters numbered per patient in date order",
            "attrition": {**attrition, **task_steps},
            "skipped": skipped_record({"diagnoses": {**tables["counts"],
                                                     "ICD codes outside the vocabulary": oov}},
                                      sources),
            "counts": {"patients": len(subjects), "admissions": n, "stays": 0}}
    stay_arrays = {"stay_id": np.zeros(0, np.int64), "hadm_id": np.zeros(0, np.int64),
                   "subject_id": np.zeros(0, np.int64), "intime": np.zeros(0),
                   "ts_ptr": np.zeros(1, np.int64),
                   "ts_count": np.zeros((0, cfg.seq_len), np.int16),
                   "ts_feat": np.zeros(0, np.int16), "static": np.zeros((0, 0), np.uint8)}
    warnings = ([no_codes("ICD", sources["diagnoses"], meta["skipped"]["diagnoses"])]
                if len(icd_idx) == 0 else [])
    return Built(meta, stay_arrays, admission_arrays, labels,
                 _splits_json(subjects, split, cfg), sources, warnings=warnings)


def _patient_numbers(ids: np.ndarray) -> tuple[np.ndarray, bool]:
    """(int64 number of each patient, whether those are the ids themselves): numeric ids are kept
    when each is a distinct number ('7' and '007' are two patients but one number), other ids are
    numbered in table order."""
    numbers, ok = parse_int(ids)
    if ok.all() and len(unique(numbers)) == len(numbers):
        return numbers, True
    return np.arange(len(ids), dtype=np.int64), False


def _visits(diagnosis_table: dict, patient_table: dict, patient_ids: np.ndarray,
            subjects: np.ndarray):
    """The visits of the kept patients, one per (patient, encounter) with an ICD code, numbered per
    patient in date order: ({"subject_id", "first_date", "last_date"} per visit, in minutes, and the
    (visit row, code) pairs of their diagnoses)."""
    # -1: unknown
    diagnosis_patient = row_of(patient_table["subject_id"], diagnosis_table["subject_id"])
    diagnosis_subject = np.where(diagnosis_patient >= 0, patient_ids[diagnosis_patient], -1)
    keep = lookup(subjects, diagnosis_subject) >= 0
    visit_key = np.char.add(np.char.add(diagnosis_table["subject_id"][keep], b"\x00"),
                            diagnosis_table["hadm_id"][keep])
    keys, diagnosis_visit = unique(visit_key, return_inverse=True)
    visit_subject = np.zeros(len(keys), np.int64)
    visit_subject[diagnosis_visit] = diagnosis_subject[keep]
    first = np.full(len(keys), np.iinfo(np.int64).max)
    last = np.full(len(keys), np.iinfo(np.int64).min)
    np.minimum.at(first, diagnosis_visit, diagnosis_table["date"][keep])
    np.maximum.at(last, diagnosis_visit, diagnosis_table["date"][keep])
    order = np.lexsort((first, visit_subject))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    visits = {"subject_id": visit_subject[order], "first_date": first[order],
              "last_date": last[order]}
    return visits, (rank[diagnosis_visit], diagnosis_table["code"][keep])
