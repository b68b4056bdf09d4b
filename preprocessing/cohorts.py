"""Cohorts: who is in each downstream task, with which label, and which patients go to which split.

Own module so that the cohort rules can be read in one place; what defines each task (onset items,
ICD-9 groups) is in the task registry, tasks.py. Every labelling function takes records
(docs/preprocessing.md; times in minutes since 1970) plus the preprocessing config, and returns
label rows `(task, level, subject_id, hadm_id, stay_id, label, cutoff)` for labels.csv together with
the attrition steps of its tasks.
"""
from __future__ import annotations

import hashlib

import numpy as np

from data import SPLITS, admission_requirements, lookup
from preprocessing.extract import age_at
from preprocessing.tables import NO_TIME, unique
from tasks import TASKS, names_at

MINUTES_PER_DAY = 1440


def assign_splits(subject_ids: np.ndarray, seed: int, fractions) -> np.ndarray:
    """The split of each patient as an index into data.SPLITS (0 train, 1 val, 2 test), from a hash
    of (seed, subject_id): deterministic, and adding patients never moves the others (the FEMR
    convention)."""
    u = np.array([int(hashlib.sha1(f"{seed}:{s}".encode()).hexdigest()[:12], 16) / 16 ** 12
                  for s in subject_ids.tolist()])
    edges = np.cumsum(fractions)[:2] / np.sum(fractions)
    return np.searchsorted(edges, u, side="right").astype(np.int8)


def sample_patients(subject_ids: np.ndarray, cfg) -> np.ndarray:
    """Sorted ids of the patients kept: all, or a deterministic hash-ordered sample of
    --limit-patients."""
    ids = unique(subject_ids)
    if cfg.limit_patients is None or cfg.limit_patients >= len(ids):
        return ids
    key = [hashlib.sha1(f"sample:{cfg.seed}:{s}".encode()).hexdigest() for s in ids.tolist()]
    return np.sort(ids[np.argsort(key)[:cfg.limit_patients]])


def task_counts(labels: list[tuple], splits: dict) -> dict:
    """{task: {"level", split: [examples, positives]}} from the label rows (for meta.json and the
    log)."""
    where = {s: n for n in SPLITS for s in splits[n]}
    out = {}
    for task, level, subject, *_, label, _ in labels:
        counts = out.setdefault(task, {"level": level, **{s: [0, 0] for s in SPLITS}})
        counts[where[subject]][0] += 1
        counts[where[subject]][1] += label
    return out


def stay_labels(stays: dict, admissions: dict, onsets: dict, cfg) -> tuple[list[tuple], dict]:
    """ARF, shock and mortality at T = seq_len hours (FIDDLE inclusion rule): stays of at least T
    hours, alive at T; ARF/shock also without onset before T, labelled by onset at or after T;
    mortality labelled by in-hospital death. `stays` and `admissions` are the records of
    docs/preprocessing.md, `onsets` the first onset hour per stay of each task with onset items.
    Returns (label rows, {task: attrition steps})."""
    t_min = cfg.seq_len * 60
    admission = stays["admission_row"]
    died = admissions["died"][admission]
    death = admissions["deathtime"][admission] if admissions["deathtime"] is not None else \
        np.full(len(admission), NO_TIME)
    # no deathtime: the discharge of a death in hospital
    death = np.where(death != NO_TIME, death,
                     np.where(died, admissions["dischtime"][admission], NO_TIME))
    long_enough = stays["outtime"] - stays["intime"] >= t_min
    base = long_enough & ((death == NO_TIME) | (death >= stays["intime"] + t_min))
    rows, attrition = [], {}
    for task in names_at("stay"):
        steps = [["featurised stays", len(admission)],
                 [f"ICU stay >= {cfg.seq_len} h", int(long_enough.sum())],
                 [f"alive at {cfg.seq_len} h", int(base.sum())]]
        cohort, label = base, died
        if TASKS[task].onset_items:                     # ARF, shock; mortality is labelled by death
            cohort = base & ~(onsets[task] < cfg.seq_len)
            label = np.isfinite(onsets[task])
            steps.append([f"no {task} onset before {cfg.seq_len} h", int(cohort.sum())])
        attrition[task] = steps
        for i in np.flatnonzero(cohort):
            rows.append((task, "stay", int(stays["subject_id"][i]), int(stays["hadm_id"][i]),
                         int(stays["stay_id"][i]), int(label[i]), ""))
    return rows, attrition


def readmission_labels(admissions: dict, admission_arrays: dict, cfg) -> tuple[list[tuple], dict]:
    """30-day readmission: usable admissions (data.admission_requirements, read from
    `admission_arrays`, the arrays of admissions.pt) discharged alive, labelled by the same
    patient's next admission starting within `readmission_days` of this discharge. Returns (label
    rows, {"readmission": attrition steps})."""
    order = np.lexsort((admissions["admittime"], admissions["subject_id"]))
    subject, admit = admissions["subject_id"][order], admissions["admittime"][order]
    has_next = np.append(subject[1:] == subject[:-1], False)
    gap = np.append(admit[1:], 0) - admissions["dischtime"][order]
    label = np.zeros(len(order), bool)
    label[order] = has_next & (gap <= cfg.readmission_days * MINUTES_PER_DAY)
    steps = [["admissions", len(order)]]
    cohort = np.ones(len(order), bool)
    for name, keep in (*admission_requirements(admission_arrays),
                       ("discharged alive", ~admissions["died"])):
        cohort &= keep
        steps.append([name, int(cohort.sum())])
    rows = [("readmission", "admission", int(admissions["subject_id"][i]),
             int(admissions["hadm_id"][i]), "", int(label[i]), "") for i in np.flatnonzero(cohort)]
    return rows, {"readmission": steps}


def patient_labels(visits: dict, diagnoses: tuple, patients: dict, subjects: np.ndarray,
                   cfg) -> tuple[list[tuple], dict]:
    """HF, COPD and amnesia (paper App. A): cases are first diagnosed at a visit that has at least
    one visit discharged `patient_gap_days` before it; history ends there (the cutoff). Controls are
    never diagnosed, their cutoff is `patient_gap_days` before their last visit; `controls_per_case`
    are matched on gender and 10-year age band. `visits` holds "subject_id", "admittime" and
    "dischtime" (minutes) per visit (an admission, or an encounter of a diagnosis extract),
    `diagnoses` the (visit row, ICD-9 code) pairs, `patients` the records whose rows align with
    `subjects`. The cutoff is written in hours.
    Returns (label rows, {task: attrition steps})."""
    diagnosis_visit, diagnosis_code = diagnoses
    admittime, dischtime = visits["admittime"], visits["dischtime"]
    coded = np.zeros(len(admittime), bool)
    coded[diagnosis_visit] = True
    # a patient's history: coded visits
    coded_visits = np.flatnonzero(coded)
    visit_patient = lookup(subjects, visits["subject_id"][coded_visits])
    gap = cfg.patient_gap_days * MINUTES_PER_DAY
    # each patient's last coded visit
    last = np.full(len(subjects), -np.inf)
    np.maximum.at(last, visit_patient, admittime[coded_visits])
    rows, attrition = [], {}
    for task in names_at("patient"):
        hit = np.zeros(len(diagnosis_code), bool)
        for prefix in TASKS[task].code_prefixes():
            hit |= np.char.startswith(diagnosis_code, prefix.encode())
        diagnosed_at = np.zeros(len(admittime), bool)
        diagnosed_at[diagnosis_visit[hit]] = True
        diagnosed = diagnosed_at[coded_visits]                          # per coded visit
        first_diagnosis = np.full(len(subjects), np.inf)
        np.minimum.at(first_diagnosis, visit_patient[diagnosed], admittime[coded_visits][diagnosed])
        case = np.isfinite(first_diagnosis)
        cutoff = np.where(case, first_diagnosis, last) - gap
        in_history = dischtime[coded_visits] <= cutoff[visit_patient]
        eligible = np.bincount(visit_patient[in_history], minlength=len(subjects)) >= 1
        cases, pool = np.flatnonzero(case & eligible), np.flatnonzero(~case & eligible)
        controls = _match_controls(cases, pool, patients, cutoff, cfg)
        attrition[task] = [["patients with coded visits", int(np.isfinite(last).sum())],
                           ["diagnosed", int(case.sum())],
                           [f"cases with a visit >= {cfg.patient_gap_days} days before diagnosis",
                            len(cases)],
                           ["eligible controls (never diagnosed, same history rule)", len(pool)],
                           [f"matched controls (up to {cfg.controls_per_case} per case)",
                            len(controls)]]
        for i, lab in [(i, 1) for i in cases] + [(i, 0) for i in controls]:
            rows.append((task, "patient", int(subjects[i]), "", "", lab, float(cutoff[i] / 60.0)))
    return rows, attrition


def _match_controls(cases, pool, patients, cutoff, cfg) -> np.ndarray:
    """Controls drawn without replacement with the case's gender and 10-year age band at the
    cutoff."""
    def strata(idx):
        ages = age_at(patients, idx, cutoff[idx])
        return [(patients["gender"][i], int(a // 10)) for i, a in zip(idx.tolist(), ages)]
    rng = np.random.default_rng(cfg.seed)
    free: dict = {}
    shuffled = rng.permutation(pool)
    for i, s in zip(shuffled.tolist(), strata(shuffled)):
        free.setdefault(s, []).append(i)
    chosen = []
    for s in strata(cases):
        group = free.get(s, [])
        chosen += group[:cfg.controls_per_case]
        free[s] = group[cfg.controls_per_case:]
    return np.array(sorted(chosen), dtype=np.int64)
