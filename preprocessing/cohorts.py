"""Cohorts: who is in each downstream task, with which label, and which patients go to which split.

Own module so the task definitions (DESIGN §6, spec §2.6) can be read in one place; imports numpy and
`extract.age_at`. Every function takes plain arrays (times in minutes since 1970) plus the preprocessing
config, and returns label rows `(task, level, subject_id, hadm_id, stay_id, label, cutoff)` for labels.csv.
"""
from __future__ import annotations

import hashlib

import numpy as np

from data import SPLITS, admission_requirements, lookup
from preprocessing.extract import age_at
from preprocessing.tables import unique
from tasks import TASKS, names_at

MINUTES_PER_DAY = 1440


def assign_splits(subject_ids: np.ndarray, seed: int, fractions) -> np.ndarray:
    """The split per patient as an index into data.SPLITS (0 train, 1 val, 2 test), from a hash of (seed, subject_id): deterministic, and adding
    patients never moves the others (the FEMR convention)."""
    u = np.array([int(hashlib.sha1(f"{seed}:{s}".encode()).hexdigest()[:12], 16) / 16 ** 12
                  for s in subject_ids.tolist()])
    edges = np.cumsum(fractions)[:2] / np.sum(fractions)
    return np.searchsorted(edges, u, side="right").astype(np.int8)


def sample_patients(subject_ids: np.ndarray, cfg) -> np.ndarray:
    """Sorted ids of the patients kept: all, or a deterministic hash-ordered sample of --limit-patients."""
    ids = unique(subject_ids)
    if cfg.limit_patients is None or cfg.limit_patients >= len(ids):
        return ids
    key = [hashlib.sha1(f"sample:{cfg.seed}:{s}".encode()).hexdigest() for s in ids.tolist()]
    return np.sort(ids[np.argsort(key)[:cfg.limit_patients]])


def task_counts(labels: list[tuple], splits: dict) -> dict:
    """{task: {"level", split: [examples, positives]}} from the label rows (for meta.json and the log)."""
    where = {s: n for n in SPLITS for s in splits[n]}
    out = {}
    for task, level, subject, *_, label, _ in labels:
        counts = out.setdefault(task, {"level": level, **{s: [0, 0] for s in SPLITS}})
        counts[where[subject]][0] += 1
        counts[where[subject]][1] += label
    return out


def stay_labels(sts, adms, s_adm, onsets, cfg, attrition) -> list[tuple]:
    """ARF, shock and mortality at T = seq_len hours (FIDDLE inclusion rule, spec §2.6): stays of at least
    T hours, alive at T; ARF/shock also without onset before T, labelled by onset at or after T;
    mortality labelled by in-hospital death."""
    t_min = cfg.seq_len * 60
    died = adms["died"][s_adm]
    death = adms["deathtime"][s_adm] if adms["deathtime"] is not None else np.full(len(s_adm), -1)
    death = np.where(death >= 0, death, np.where(died, adms["dischtime"][s_adm], -1))  # no deathtime: discharge
    long_enough = sts["outtime"] - sts["intime"] >= t_min
    base = long_enough & ((death < 0) | (death >= sts["intime"] + t_min))
    rows = []
    for task in names_at("stay"):
        steps = [["featurised stays", len(s_adm)], [f"ICU stay >= {cfg.seq_len} h", int(long_enough.sum())],
                 [f"alive at {cfg.seq_len} h", int(base.sum())]]
        cohort, label = base, died
        if TASKS[task].onset_items:                     # ARF, shock; mortality is labelled by death
            cohort = base & ~(onsets[task] < cfg.seq_len)
            label = np.isfinite(onsets[task])
            steps.append([f"no {task} onset before {cfg.seq_len} h", int(cohort.sum())])
        attrition[task] = steps
        for i in np.flatnonzero(cohort):
            rows.append((task, "stay", int(sts["subject_id"][i]), int(sts["hadm_id"][i]),
                         int(sts["stay_id"][i]), int(label[i]), ""))
    return rows


def readmission_labels(adms, admissions, cfg, attrition) -> list[tuple]:
    """30-day readmission: usable admissions (data.admission_requirements) discharged alive, labelled by
    the same patient's next admission starting within `readmission_days` of this discharge."""
    order = np.lexsort((adms["admittime"], adms["subject_id"]))
    subject, admit = adms["subject_id"][order], adms["admittime"][order]
    has_next = np.append(subject[1:] == subject[:-1], False)
    gap = np.append(admit[1:], 0) - adms["dischtime"][order]
    label = np.zeros(len(order), bool)
    label[order] = has_next & (gap <= cfg.readmission_days * MINUTES_PER_DAY)
    steps = [["admissions", len(order)]]
    cohort = np.ones(len(order), bool)
    for name, keep in (*admission_requirements(admissions), ("discharged alive", ~adms["died"])):
        cohort &= keep
        steps.append([name, int(cohort.sum())])
    attrition["readmission"] = steps
    return [("readmission", "admission", int(adms["subject_id"][i]), int(adms["hadm_id"][i]), "", int(label[i]), "")
            for i in np.flatnonzero(cohort)]


def patient_labels(a_subject_id, admittime, dischtime, raw_codes, pats, subjects, cfg, attrition) -> list[tuple]:
    """HF, COPD and amnesia (paper App. A): cases are first diagnosed at a visit that has at least one
    visit discharged `patient_gap_days` before it; history ends there (the cutoff). Controls are never
    diagnosed, their cutoff is `patient_gap_days` before their last visit; `controls_per_case` are matched
    on gender and 10-year age band. Times are minutes; the cutoff is written in hours."""
    d_row, d_code = raw_codes
    coded = np.zeros(len(admittime), bool)
    coded[d_row] = True
    v = np.flatnonzero(coded)                                           # visits = admissions with codes
    v_subj = lookup(subjects, a_subject_id[v])
    gap = cfg.patient_gap_days * MINUTES_PER_DAY
    last = np.full(len(subjects), -np.inf)                              # each patient's last coded visit
    np.maximum.at(last, v_subj, admittime[v])
    rows = []
    for task in names_at("patient"):
        hit = np.zeros(len(d_code), bool)
        for p in TASKS[task].icd9_prefixes:
            hit |= np.char.startswith(d_code, p.encode())
        dx = np.zeros(len(admittime), bool)
        dx[d_row[hit]] = True
        first_dx = np.full(len(subjects), np.inf)
        np.minimum.at(first_dx, v_subj[dx[v]], admittime[v][dx[v]])
        case = np.isfinite(first_dx)
        cutoff = np.where(case, first_dx, last) - gap
        history = np.bincount(v_subj[dischtime[v] <= cutoff[v_subj]], minlength=len(subjects))
        eligible = history >= 1
        cases, pool = np.flatnonzero(case & eligible), np.flatnonzero(~case & eligible)
        controls = _match_controls(cases, pool, pats, cutoff, cfg)
        attrition[task] = [["patients with coded visits", int(np.isfinite(last).sum())],
                           ["diagnosed", int(case.sum())],
                           [f"cases with a visit >= {cfg.patient_gap_days} days before diagnosis", len(cases)],
                           ["eligible controls (never diagnosed, same history rule)", len(pool)],
                           [f"matched controls (up to {cfg.controls_per_case} per case)", len(controls)]]
        for i, lab in [(i, 1) for i in cases] + [(i, 0) for i in controls]:
            rows.append((task, "patient", int(subjects[i]), "", "", lab, float(cutoff[i] / 60.0)))
    return rows


def _match_controls(cases, pool, pats, cutoff, cfg) -> np.ndarray:
    """Controls drawn without replacement with the case's gender and 10-year age band at the cutoff."""
    def strata(idx):
        ages = age_at(pats, idx, cutoff[idx])
        return [(pats["gender"][i], int(a // 10)) for i, a in zip(idx.tolist(), ages)]
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
