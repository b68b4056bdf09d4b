"""Build: the raw tables of one extract -> the arrays of a processed folder, in memory.

Usage: called by `data.preprocess`: `build_mimic(cfg, raw, layout, sources, rep, cache)` for the MIMIC-III and
MIMIC-IV layouts, `build_trinetx(...)` for a diagnosis extract; `cfg` is a `data.PreprocessConfig`. Each
returns {"meta", "stays", "admissions", "labels", "splits"}, which data.py writes as the folder described in
docs/data-format.md. Cohorts and attrition (patients -> admissions -> ICU stays), features fitted on the
training split, code vocabularies, one embedded note per admission and the labels of every task.
A module of its own (DESIGN §1) so that data.py stays the on-disk format and the datasets.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data import SPLITS, lookup, row_of
from folders import InputError
from preprocessing.cohorts import (MINUTES_PER_DAY, assign_splits, patient_labels, readmission_labels,
                                   sample_patients, stay_labels)
from preprocessing.extract import (STATIC_CATEGORIES, StayIndex, age_at, find_notes, load_core, load_trinetx,
                                   read_diagnoses, read_drugs, read_notes, stream_events, variable_names)
from preprocessing.features import (apply_static, apply_timeseries, build_vocab, codes_to_csr, embed_notes,
                                    fit_static, fit_timeseries, load_text_model)
from preprocessing.tables import unique


def _take(table: dict, rows) -> dict:
    """Rows of a dict of arrays / lists (None stays None)."""
    idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    return {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx] if v is not None else None)
            for k, v in table.items()}


def build_mimic(cfg, raw, layout, sources, rep, cache) -> dict:
    """A MIMIC-III or MIMIC-IV extract: patients -> admissions -> adult MetaVision ICU stays with events.
    The text model is loaded first, so that a bad --text-model fails before any table is read."""
    text_model = load_text_model(cfg.text_model, cfg.text_device)
    core = load_core(raw, layout, sources)
    pats, adms = core["patients"], core["admissions"]
    attrition = {"patients": [["patients in the patients table", len(pats["subject_id"])]]}
    subjects = sample_patients(pats["subject_id"], cfg)
    if len(subjects) < len(pats["subject_id"]):
        attrition["patients"].append([f"sampled (--limit-patients {cfg.limit_patients})", len(subjects)])
    pats = _take(pats, row_of(pats["subject_id"], subjects))                # rows aligned with `subjects`
    split = assign_splits(subjects, cfg.seed, cfg.split)

    a_att = attrition["admissions"] = [["admissions in the admissions table", len(adms["hadm_id"])]]
    adms = _take(adms, lookup(subjects, adms["subject_id"]) >= 0)
    a_att.append(["of kept patients", len(adms["hadm_id"])])
    adms = _take(adms, adms["dischtime"] >= adms["admittime"])
    a_att.append(["discharged at or after admission (others: invalid times)", len(adms["hadm_id"])])
    adms = _take(adms, np.argsort(adms["hadm_id"]))
    a_subject = lookup(subjects, adms["subject_id"])
    sts = _icu_stays(core["stays"], adms, pats, a_subject, attrition)

    codes = _admission_codes(cfg, raw, layout, adms, split[a_subject] == 0, sources, rep, a_att)  # small: first
    _check_usable(raw, attrition, rep)
    index = StayIndex(sts["hadm_id"], sts["intime"], sts["outtime"])
    events, onsets, skipped = stream_events(raw, layout, index, len(sts["stay_id"]), cfg.seq_len,
                                            cfg.exclude_label_items, sources, rep.bytes_task)
    has_events = np.zeros(len(sts["stay_id"]), bool)
    has_events[events["stay"]] = True
    events = dict(events, stay=(np.cumsum(has_events) - 1)[events["stay"]])   # renumbered over the kept stays
    sts, onsets = _take(sts, has_events), {k: v[has_events] for k, v in onsets.items()}
    attrition["stays"].append([f"with events in the first {cfg.seq_len} h", len(sts["stay_id"])])
    _check_usable(raw, attrition, rep)
    ts, static, feature_meta = _stay_features(cfg, raw, layout, events, sts, adms, pats, split, rep)

    skipped["diagnoses and prescriptions"] = codes["counts"]
    notes = _admission_notes(cfg, raw, layout, adms, sources, rep, cache, skipped, text_model)
    s_adm = sts["adm"]
    order = np.lexsort((sts["intime"], s_adm))                      # stays grouped by admission
    admissions = {"hadm_id": adms["hadm_id"], "subject_id": adms["subject_id"],
                  "admittime": adms["admittime"] / 60.0, "dischtime": adms["dischtime"] / 60.0,
                  "died": adms["died"], **codes["csr"], **notes["arrays"],
                  "stay_ptr": np.searchsorted(s_adm[order], np.arange(len(adms["hadm_id"]) + 1)),
                  "stay_rows": order}
    stays = {"stay_id": sts["stay_id"], "hadm_id": sts["hadm_id"], "subject_id": sts["subject_id"],
             **ts, "static": static}
    labels = stay_labels(sts, adms, s_adm, onsets, cfg, attrition)
    labels += readmission_labels(adms, admissions, cfg, attrition)
    labels += patient_labels(adms["subject_id"], adms["admittime"], adms["dischtime"], codes["raw"],
                             pats, subjects, cfg, attrition)
    n_cells = len(stays["stay_id"]) * cfg.seq_len * max(1, feature_meta["n_features"])
    meta = {"seq_len": cfg.seq_len, **feature_meta,
            "n_icd": len(codes["icd_vocab"]), "n_drug": len(codes["drug_vocab"]), "note_dim": notes["dim"],
            "icd_vocab": codes["icd_vocab"], "drug_vocab": codes["drug_vocab"], "drug_code": cfg.drug_code,
            "notes": notes["info"], "attrition": attrition, "skipped": skipped,
            "counts": {"patients": len(subjects), "admissions": len(adms["hadm_id"]),
                       "stays": len(sts["stay_id"]), "active_cells": len(ts["ts_feat"]),
                       "density": round(len(ts["ts_feat"]) / max(1, n_cells), 5)}}
    return {"meta": meta, "stays": stays, "admissions": admissions, "labels": labels,
            "splits": _splits_json(subjects, split, cfg)}


def _icu_stays(sts: dict, adms: dict, pats: dict, a_subject: np.ndarray, attrition: dict) -> dict:
    """The ICU stays of the kept admissions that are MetaVision, closed and adult, with three columns added:
    "adm" (row of the admission), "subject" (row of the patient) and "age" (years at ICU admission)."""
    s_att = attrition["stays"] = [["ICU stays in the icustays table", len(sts["stay_id"])]]
    sts = dict(sts, adm=lookup(adms["hadm_id"], sts["hadm_id"]))
    for name, keep in (("of kept admissions", lambda: sts["adm"] >= 0),
                       ("MetaVision (the label items are MetaVision itemids)", lambda: sts["metavision"]),
                       ("with an outtime", lambda: sts["outtime"] >= 0),
                       ("outtime after intime (others: invalid times)", lambda: sts["outtime"] > sts["intime"])):
        sts = _take(sts, keep())
        s_att.append([name, len(sts["stay_id"])])
    sts["subject"] = a_subject[sts["adm"]]
    sts["age"] = age_at(pats, sts["subject"], sts["intime"])
    sts = _take(sts, sts["age"] >= 18)
    s_att.append(["age >= 18 at ICU admission", len(sts["stay_id"])])
    return sts


def _check_usable(raw, attrition: dict, rep) -> None:
    """Stop, in one line, when no ICU stay and no admission with ICD-9 codes is left (an empty folder would
    only fail later, in pretraining, with a less helpful message); warn when no ICU stay is left."""
    stays, adms = attrition["stays"], attrition["admissions"]
    if stays[-1][1] == 0 and dict(adms)["with ICD-9 diagnosis codes"] == 0:
        raise InputError(f"{raw}: nothing usable is left: {_where_lost(stays)}, and {_where_lost(adms)}")
    if stays[-1][0].startswith("with events") and stays[-1][1] == 0:
        rep.log(f"warning: no ICU stay is left ({_where_lost(stays)}): only admission codes, notes and "
                "patient-level tasks are written; pretraining needs ICU stays")


def _where_lost(steps: list) -> str:
    """'ICU stays in the icustays table 136, none left at "outtime after intime (...)"' from an attrition list."""
    k = next(i for i, (_, n) in enumerate(steps) if n == 0)
    return f"{steps[0][0]} {steps[0][1]}, none left at '{steps[k][0]}'" if k else f"{steps[0][0]} 0"


def _stay_features(cfg, raw, layout, events, sts, adms, pats, split, rep) -> tuple[dict, np.ndarray, dict]:
    """FIDDLE-style time series (sparse, see docs/data-format.md) and static vectors, both fitted on the
    training stays only; returns (time-series arrays, static (N, S) uint8, their part of meta.json)."""
    train_stay = split[sts["subject"]] == 0
    rep.log(f"fitting features on {int(train_stay.sum())} training stays")
    names = variable_names(raw, layout, events["var"])
    ts_spec = fit_timeseries(events, train_stay, names, cfg.min_frequency, cfg.n_bins)
    if len(ts_spec["columns"]) >= 2 ** 15:
        raise InputError(f"{len(ts_spec['columns'])} time-series features do not fit int16 storage; "
                         "raise --min-frequency")
    ts = apply_timeseries(events, ts_spec, len(sts["stay_id"]), cfg.seq_len)
    s_adm = sts["adm"]
    static_cols = {"age": sts["age"].astype(np.float64),
                   "hadm_to_icu_hours": (sts["intime"] - adms["admittime"][s_adm]) / 60.0,
                   "gender": [pats["gender"][i] for i in sts["subject"]],
                   **{c: [adms[c][i] for i in s_adm] for c in STATIC_CATEGORIES if c in adms and adms[c] is not None},
                   "first_careunit": sts["first_careunit"] or [""] * len(s_adm)}
    static_spec = fit_static(static_cols, train_stay, cfg.min_frequency, cfg.n_bins)
    static = apply_static(static_cols, static_spec)                        # (N, S) uint8
    meta = {"n_features": len(ts_spec["columns"]), "n_static": static.shape[1],
            "feature_names": ts_spec["columns"], "static_names": static_spec["columns"],
            "features": {"variables": ts_spec["variables"], "static": static_spec["variables"],
                         "excluded_label_items": cfg.exclude_label_items}}
    return ts, static, meta


def _splits_json(subjects, split, cfg) -> dict:
    return {"seed": cfg.seed, "fractions": list(cfg.split), "method": "sha1(seed:subject_id) buckets",
            **{n: subjects[split == i].tolist() for i, n in enumerate(SPLITS)}}


def _vocabularies(cfg, icd, drug, train_pairs_icd, train_pairs_drug):
    if cfg.vocab_from is None:
        return build_vocab(icd, train_pairs_icd), build_vocab(drug, train_pairs_drug)
    path = Path(cfg.vocab_from) / "meta.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (--vocab-from needs a processed folder)")
    other = json.loads(path.read_text())
    return other["icd_vocab"], other["drug_vocab"]


def _admission_codes(cfg, raw, layout, adms, train_adm, sources, rep, a_att) -> dict:
    """ICD-9 and drug code sets per admission: raw pairs (for cohorts) and vocabulary CSR (for models)."""
    d_hadm, d_code, counts = read_diagnoses(raw, layout, sources)
    g_hadm, g_code = read_drugs(raw, layout, cfg.drug_code, sources, rep.bytes_task)
    d_row, g_row = lookup(adms["hadm_id"], d_hadm), lookup(adms["hadm_id"], g_hadm)
    d_row, d_code = d_row[d_row >= 0], d_code[d_row >= 0]
    g_row, g_code = g_row[g_row >= 0], g_code[g_row >= 0]
    has_icd = np.zeros(len(adms["hadm_id"]), bool)
    has_icd[d_row] = True
    a_att.append(["with ICD-9 diagnosis codes", int(has_icd.sum())])
    icd_vocab, drug_vocab = _vocabularies(cfg, d_code, g_code, train_adm[d_row], train_adm[g_row])
    icd_ptr, icd_idx, icd_oov = codes_to_csr(d_row, d_code, icd_vocab, len(adms["hadm_id"]))
    drug_ptr, drug_idx, drug_oov = codes_to_csr(g_row, g_code, drug_vocab, len(adms["hadm_id"]))
    rep.log(f"codes: {len(icd_vocab)} ICD-9, {len(drug_vocab)} drugs ({cfg.drug_code}); {counts}")
    return {"raw": (d_row, d_code), "icd_vocab": icd_vocab, "drug_vocab": drug_vocab,
            "csr": {"icd_ptr": icd_ptr, "icd_idx": icd_idx, "drug_ptr": drug_ptr, "drug_idx": drug_idx},
            "counts": {**counts, "ICD codes outside the vocabulary": icd_oov, "drug codes outside": drug_oov}}


def _admission_notes(cfg, raw, layout, adms, sources, rep, cache, skipped, text_model) -> dict:
    """One embedded note per admission (its latest discharge summary), zeros and mask 0 where none."""
    path = find_notes(raw, cfg.notes, layout)
    texts, counts = ({}, {"note table": "missing"}) if path is None else \
        read_notes(path, set(adms["hadm_id"].tolist()), sources, rep.bytes_task)
    skipped["notes"] = counts
    hadms = [h for h in adms["hadm_id"].tolist() if h in texts]
    if path is None or not hadms:
        rep.log(f"warning: no notes found{'' if path is None else f' for these admissions in {path}'}; "
                "the note modality is masked everywhere")
    vectors, info = embed_notes([texts[h] for h in hadms], cfg.text_model, cache, dim=cfg.hashing_dim,
                                max_tokens=cfg.note_max_tokens, pooling=cfg.note_pooling,
                                device=cfg.text_device, batch_size=cfg.text_batch_size, task=rep.task,
                                loaded=text_model)
    dim = vectors.shape[1]                    # embed_notes gives the model's width even for no notes
    note = np.zeros((len(adms["hadm_id"]), dim), np.float16)
    rows = lookup(adms["hadm_id"], np.array(hadms, dtype=np.int64))
    note[rows] = vectors
    mask = np.zeros(len(adms["hadm_id"]), bool)
    mask[rows] = True
    info.update(source=str(path) if path else None, selection="latest discharge summary per admission",
                with_note=int(mask.sum()))
    return {"arrays": {"note": note, "note_mask": mask}, "dim": int(dim), "info": info}


def build_trinetx(cfg, raw, layout, sources, rep, cache) -> dict:
    """A diagnosis extract: visits (encounters) with ICD-9 sets and the patient-level tasks only."""
    t = load_trinetx(raw, sources)
    pat, dia = t["patients"], t["diagnoses"]
    numeric = all(s.isdigit() for s in pat["subject_id"].tolist())   # keep numeric ids, number the others
    ids = pat["subject_id"].astype(np.int64) if numeric else np.arange(len(pat["subject_id"]), dtype=np.int64)
    d_pat = row_of(pat["subject_id"], dia["subject_id"])                   # patient row per diagnosis, -1 unknown
    attrition = {"patients": [["patients in the patient table", len(ids)]]}
    subjects = sample_patients(ids, cfg)
    if len(subjects) < len(ids):
        attrition["patients"].append([f"sampled (--limit-patients {cfg.limit_patients})", len(subjects)])
    pats = _take({"gender": pat["gender"], "year_of_birth": pat["year_of_birth"], "id": ids},
                 row_of(ids, subjects))
    d_subject = np.where(d_pat >= 0, ids[d_pat], -1)
    keep = lookup(subjects, d_subject) >= 0
    enc_key = np.char.add(np.char.add(dia["subject_id"][keep], b"\x00"), dia["hadm_id"][keep])
    enc, d_row = unique(enc_key, return_inverse=True)             # visits = (patient, encounter)
    v_subject = np.zeros(len(enc), np.int64)
    v_subject[d_row] = d_subject[keep]
    first, last = np.full(len(enc), np.iinfo(np.int64).max), np.full(len(enc), np.iinfo(np.int64).min)
    np.minimum.at(first, d_row, dia["date"][keep])
    np.maximum.at(last, d_row, dia["date"][keep])
    order = np.lexsort((first, v_subject))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    d_row, v_subject, first, last = rank[d_row], v_subject[order], first[order], last[order]
    codes = dia["code"][keep]
    split = assign_splits(subjects, cfg.seed, cfg.split)
    train = split[lookup(subjects, v_subject)] == 0
    icd_vocab, drug_vocab = _vocabularies(cfg, codes, np.zeros(0, "S1"), train[d_row], np.zeros(0, bool))
    icd_ptr, icd_idx, oov = codes_to_csr(d_row, codes, icd_vocab, len(enc))
    n = len(enc)
    attrition["visits"] = [["encounters with ICD-9 codes", n]]
    admissions = {"hadm_id": np.arange(n, dtype=np.int64), "subject_id": v_subject,
                  "admittime": first / 60.0, "dischtime": last / 60.0 + 24.0,   # a dated visit lasts its day
                  "died": np.zeros(n, bool), "icd_ptr": icd_ptr, "icd_idx": icd_idx,
                  "drug_ptr": np.zeros(n + 1, np.int64), "drug_idx": np.zeros(0, np.int32),
                  "note": np.zeros((n, 0), np.float16), "note_mask": np.zeros(n, bool),
                  "stay_ptr": np.zeros(n + 1, np.int64), "stay_rows": np.zeros(0, np.int64)}
    labels = patient_labels(v_subject, first, last + MINUTES_PER_DAY, (d_row, codes), pats, subjects, cfg, attrition)
    meta = {"seq_len": cfg.seq_len, "n_features": 0, "n_static": 0, "n_icd": len(icd_vocab),
            "n_drug": len(drug_vocab), "note_dim": 0, "feature_names": [], "static_names": [],
            "icd_vocab": icd_vocab, "drug_vocab": drug_vocab, "drug_code": None,
            "ids": "source patient ids" if numeric else "patients numbered in sorted order of patient_id; "
                   "encounters numbered per patient in date order",
            "attrition": attrition, "skipped": {"diagnoses": {**t["counts"], "ICD codes outside the vocabulary": oov}},
            "counts": {"patients": len(subjects), "admissions": n, "stays": 0}}
    stays = {"stay_id": np.zeros(0, np.int64), "hadm_id": np.zeros(0, np.int64), "subject_id": np.zeros(0, np.int64),
             "ts_ptr": np.zeros(1, np.int64), "ts_count": np.zeros((0, cfg.seq_len), np.int16),
             "ts_feat": np.zeros(0, np.int16), "static": np.zeros((0, 0), np.uint8)}
    return {"meta": meta, "stays": stays, "admissions": admissions, "labels": labels,
            "splits": _splits_json(subjects, split, cfg)}
