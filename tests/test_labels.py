"""Label definitions checked on hand-built stays and admissions whose every row is known (the task table
of the README, tasks.TASKS)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

import data
from preprocessing.pipeline import PreprocessConfig, preprocess
from conftest import T0, hours_after


def _labels(out: Path) -> dict:
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_task = {}
    for r in rows:
        key = int(r["stay_id"] or r["hadm_id"] or r["subject_id"])
        by_task.setdefault(r["task"], {})[key] = int(r["label"])
    return by_task


def _run(raw: Path, out: Path, **kw) -> dict:
    cfg = PreprocessConfig(raw=raw, out=out, quiet=True, min_frequency=0.0, **kw)
    return preprocess(cfg)


@pytest.fixture
def stay_cohort(tiny, tmp_path):
    """One patient, admission and stay per case; stay ids name the case."""
    cases = {
        101: dict(los=72),                              # plain: in every stay cohort, all labels 0
        102: dict(los=72, vent=50),                     # ARF onset after 48 h -> arf 1
        103: dict(los=72, vent=10),                     # ARF onset before 48 h -> not in the arf cohort
        104: dict(los=72, vent=48),                     # onset exactly at T counts as "after": arf 1
        105: dict(los=30),                              # shorter than 48 h -> in no stay cohort
        106: dict(los=60, died=60),                     # dies in the ICU at 60 h -> mortality 1
        107: dict(los=30, died=30),                     # dies before 48 h -> in no stay cohort
        108: dict(los=72, pressor=49),                  # shock after 48 h -> shock 1
        109: dict(los=72, pressor=2),                   # shock before 48 h -> not in the shock cohort
        110: dict(los=72, dbsource="carevue"),          # CareVue -> not featurised
        111: dict(los=72, dob="2140-01-01 00:00:00"),   # 10 years old -> excluded
    }
    for i, (stay, c) in enumerate(cases.items()):
        subject, hadm = 1000 + i, 5000 + i
        tiny.patient(subject, dob=c.get("dob", "2100-01-01 00:00:00"))
        died = "died" in c
        tiny.admission(subject, hadm, T0, c.get("died", 100), died=died)
        tiny.stay(subject, hadm, stay, hours_after(T0, 0.25), c["los"], dbsource=c.get("dbsource", "metavision"))
        if "vent" in c:
            tiny.ventilation(subject, hadm, stay, hours_after(T0, 0.25 + c["vent"]))
        if "pressor" in c:
            tiny.vasopressor(subject, hadm, stay, hours_after(T0, 0.25 + c["pressor"]))
    return tiny.write(tmp_path / "raw")


def test_stay_task_cohorts_and_labels(stay_cohort, tmp_path):
    meta = _run(stay_cohort, tmp_path / "out")
    labels = _labels(tmp_path / "out")
    assert labels["mortality"] == {101: 0, 102: 0, 103: 0, 104: 0, 106: 1, 108: 0, 109: 0}
    assert labels["arf"] == {101: 0, 102: 1, 104: 1, 106: 0, 108: 0, 109: 0}
    assert labels["shock"] == {101: 0, 102: 0, 103: 0, 104: 0, 106: 0, 108: 1}
    steps = dict(meta["attrition"]["stays"])
    assert steps["MetaVision (the label items are MetaVision itemids)"] == 10
    assert steps["age >= 18 at ICU admission"] == 9


def test_label_items_are_not_features(stay_cohort, tmp_path):
    meta = _run(stay_cohort, tmp_path / "out")
    names = " ".join(meta["feature_names"])
    assert "225792" not in names and "221906" not in names and "220045" in names
    kept = _run(stay_cohort, tmp_path / "out2", exclude_label_items=False, split=(1.0, 0.0, 0.0))
    assert "225792" in " ".join(kept["feature_names"])


def test_readmission_gap_and_deaths(tiny, tmp_path):
    admits = [(1, 11, "2150-01-01 08:00:00", False),   # next starts 10 days after discharge -> 1
              (1, 12, "2150-01-15 08:00:00", False),   # next starts 40 days after discharge -> 0
              (1, 13, "2150-03-01 08:00:00", False),   # last admission -> 0
              (2, 21, "2150-01-01 08:00:00", True),    # dies in hospital -> excluded
              (2, 22, "2150-01-20 08:00:00", False)]
    for subject in (1, 2):
        tiny.patient(subject)
    for i, (subject, hadm, admit, died) in enumerate(admits):
        tiny.admission(subject, hadm, admit, 96, died=died)
        tiny.stay(subject, hadm, 900 + i, hours_after(admit, 1), 60)
    meta = _run(tiny.write(tmp_path / "raw"), tmp_path / "out")
    assert _labels(tmp_path / "out")["readmission"] == {11: 1, 12: 0, 13: 0, 22: 0}
    assert meta["attrition"]["readmission"][-1] == ["discharged alive", 4]


def test_patient_level_cases_controls_and_cutoff(tiny, tmp_path):
    # subject 1: hypertension, then heart failure 400 days later -> a case with the first visit as history
    # subjects 2-5: never HF, two visits 300 days apart -> eligible controls (same gender and age band)
    # subject 6: HF at the first visit -> no history before diagnosis, not a case
    for s in range(1, 7):
        tiny.patient(s, gender="M")
    tiny.admission(1, 101, "2150-01-01 08:00:00", 48, codes=("4019",))
    tiny.admission(1, 102, "2151-02-05 08:00:00", 48, codes=("4280", "4019"))
    for s in range(2, 6):
        tiny.admission(s, s * 100 + 1, "2150-01-01 08:00:00", 48, codes=("25000",))
        tiny.admission(s, s * 100 + 2, "2150-10-28 08:00:00", 48, codes=("25000", "4019"))
    tiny.admission(6, 601, "2150-01-01 08:00:00", 48, codes=("4280",))
    tiny.admission(6, 602, "2151-01-01 08:00:00", 48, codes=("4280",))
    tiny.stay(1, 101, 1, hours_after("2150-01-01 08:00:00", 1), 50)
    _run(tiny.write(tmp_path / "raw"), tmp_path / "out", seed=3)
    hf = _labels(tmp_path / "out")["hf"]
    assert hf[1] == 1 and sorted(hf.values()).count(0) == 3 and 6 not in hf
    assert set(hf) - {1} <= {2, 3, 4, 5}
    with open(tmp_path / "out" / "labels.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["task"] == "hf" and r["subject_id"] == "1")
    diagnosis = np.datetime64("2151-02-05T08:00", "m").astype(np.int64) / 60
    assert float(row["cutoff"]) == pytest.approx(diagnosis - 180 * 24)
    # the visit sequence of the case holds the first visit only (the diagnosis visit is after the cutoff)
    d = data.load_processed(tmp_path / "out")
    ex = d.labels["hf"]
    i = int(np.flatnonzero(ex["subject_id"] == 1)[0])
    ds = data.PatientDataset(d, ex["subject_id"][[i]], ex["cutoff"][[i]], ex["label"][[i]])
    batch = ds.__getitems__([0])
    assert batch["visit_mask"].tolist() == [[True]]
    hypertension = d.meta["icd_vocab"].index("ICD9:4019") if "ICD9:4019" in d.meta["icd_vocab"] else None
    assert hypertension is None or batch["icd"][0, 0, hypertension] == 1
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["attrition"]["hf"][2][1] == 1
