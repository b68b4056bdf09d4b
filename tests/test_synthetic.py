"""synthetic.py: complete, deterministic extracts in every layout, with the planted labels at their intended
prevalences and learnable from the modality each task is evaluated on. Labels are recomputed here from the
CSVs with the reader's definitions (DESIGN.md §6), independently of the generator's internals."""
import csv
import gzip
import hashlib
import re
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

import synthetic
from metrics import auroc   # checked against scikit-learn in test_evaluate.py
from folders import InputError
from synthetic import SynthConfig, synthesize

MIMIC3_FILES = {"PATIENTS", "ADMISSIONS", "ICUSTAYS", "CHARTEVENTS", "LABEVENTS", "OUTPUTEVENTS", "INPUTEVENTS_MV",
                "PROCEDUREEVENTS_MV", "DATETIMEEVENTS", "DIAGNOSES_ICD", "PRESCRIPTIONS", "NOTEEVENTS"}
MIMIC4_FILES = {"hosp/patients", "hosp/admissions", "hosp/diagnoses_icd", "hosp/prescriptions", "hosp/labevents",
                "icu/icustays", "icu/chartevents", "icu/outputevents", "icu/inputevents", "icu/procedureevents",
                "icu/datetimeevents", "note/discharge", "note/radiology"}
TRINETX_FILES = {"patient", "diagnosis"}
VASOPRESSORS = {"221906", "221289", "221662", "222315", "221749"}
HF = ("428",), {"39891", "40201", "40211", "40291", "40401", "40403", "40411", "40413", "40491", "40493"}
COPD = ("491", "492", "496"), set()
AMNESIA = (), {"78093", "2940", "2911", "29283"}


def run(out: Path, **kw) -> dict:
    return synthesize(SynthConfig(out=out, quiet=True, **kw))


def table(root: Path, name: str, contains: str | tuple = ()) -> list[dict]:
    """Rows of NAME.csv.gz as dicts with lower-case keys; `contains` (one or several substrings) pre-filters
    raw lines: the fast path for the big event tables, where no quoted field spans lines."""
    contains = (contains,) if isinstance(contains, str) else contains
    with gzip.open(root / f"{name}.csv.gz", "rt", newline="") as f:
        head = [h.lower() for h in next(csv.reader([f.readline()]))]
        lines = (line for line in f if any(c in line for c in contains)) if contains else f
        return [dict(zip(head, row)) for row in csv.reader(lines)]


def ts(s: str) -> datetime:
    return datetime.fromisoformat(s)        # the exact format is checked in test_quoting_..._timestamps_parse


def digests(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.csv.gz"))}


def in_group(code: str, group) -> bool:
    prefixes, exact = group
    return code.startswith(prefixes) or code in exact


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    """The demo-sized MIMIC-III extract (400 patients, seed 0) and its summary."""
    out = tmp_path_factory.mktemp("m3") / "raw"
    return out, run(out)


@pytest.fixture(scope="module")
def cohort(m3):
    """Stay-task cohort, onsets and labels recomputed from the CSVs as the reader defines them."""
    root = m3[0]
    patients = {r["subject_id"]: r for r in table(root, "PATIENTS")}
    admissions = {r["hadm_id"]: r for r in table(root, "ADMISSIONS")}
    stays = {r["icustay_id"]: r for r in table(root, "ICUSTAYS")}
    onset = {"arf": {}, "shock": {}}

    def first(kind, stay, when):
        h = (ts(when) - ts(stays[stay]["intime"])).total_seconds() / 3600
        onset[kind][stay] = min(h, onset[kind].get(stay, h))
    for r in table(root, "CHARTEVENTS", ",220339,"):
        if r["itemid"] == "220339":
            first("arf", r["icustay_id"], r["charttime"])
    for r in table(root, "PROCEDUREEVENTS_MV"):
        if r["itemid"] in ("225792", "225794"):
            first("arf", r["icustay_id"], r["starttime"])
    for r in table(root, "INPUTEVENTS_MV"):
        if r["itemid"] in VASOPRESSORS:
            first("shock", r["icustay_id"], r["starttime"])
    members, labels = [], {"mortality": {}, "arf": {}, "shock": {}}
    for k, s in stays.items():
        a, p = admissions[s["hadm_id"]], patients[s["subject_id"]]
        intime, outtime = ts(s["intime"]), ts(s["outtime"])
        alive48 = not a["deathtime"] or ts(a["deathtime"]) >= intime + timedelta(hours=48)
        if (s["dbsource"] == "metavision" and (intime - ts(p["dob"])).days / 365.25 >= 18
                and outtime - intime >= timedelta(hours=48) and alive48):
            members.append(k)
            labels["mortality"][k] = a["hospital_expire_flag"] == "1"
            los = (outtime - intime).total_seconds() / 3600
            for kind in ("arf", "shock"):
                o = onset[kind].get(k)
                if o is None or o >= 48:
                    labels[kind][k] = o is not None and o < los
    return dict(stays=stays, admissions=admissions, patients=patients, onset=onset, members=members,
                labels=labels)


# ------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("layout, files", [("mimic3", MIMIC3_FILES), ("mimic4", MIMIC4_FILES),
                                           ("trinetx", TRINETX_FILES)])
def test_layout_files_headers_and_counts(tmp_path, layout, files):
    summary = run(tmp_path / "raw", patients=40, layout=layout)
    root = Path(summary["out"])
    written = {p.relative_to(root).as_posix()[:-7] for p in root.rglob("*.csv.gz")}
    assert written == files == set(summary["tables"])
    assert not list(tmp_path.glob("*.tmp-*")), "temporary folder left behind"
    for name in files:
        with gzip.open(root / f"{name}.csv.gz", "rt", newline="") as f:
            rows = list(csv.reader(f))
        head = rows[0]
        assert head == ([h.upper() for h in head] if layout == "mimic3" else [h.lower() for h in head]), name
        assert all(len(r) == len(head) for r in rows[1:]), name
        assert len(rows) - 1 == summary["tables"][name], name
    assert summary["patients"] == 40
    if layout == "mimic3":
        assert summary["admissions"] == summary["tables"]["ADMISSIONS"]
        assert summary["stays"] == summary["tables"]["ICUSTAYS"]
        head = table(root, "CHARTEVENTS")[0].keys()
        assert list(head) == ["row_id", "subject_id", "hadm_id", "icustay_id", "itemid", "charttime", "storetime",
                              "cgid", "value", "valuenum", "valueuom", "warning", "error", "resultstatus", "stopped"]
    if layout == "mimic4":
        assert summary["stays"] == summary["tables"]["icu/icustays"]
        assert set(table(root, "hosp/patients")[0]) == {"subject_id", "gender", "anchor_age", "anchor_year",
                                                         "anchor_year_group", "dod"}
        assert "race" in table(root, "hosp/admissions")[0] and "religion" not in table(root, "hosp/admissions")[0]
        versions = [r["icd_version"] for r in table(root, "hosp/diagnoses_icd")]
        assert set(versions) == {"9", "10"}
        assert all(re.fullmatch(r"\d+-DS-\d+", r["note_id"]) for r in table(root, "note/discharge"))


DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "mimic3-demo"


@pytest.mark.skipif(not DEMO.is_dir(), reason="needs ../shared/data/mimic3-demo")
def test_mimic3_columns_are_the_real_ones(tmp_path):
    """Every MIMIC-III table has exactly the column list of the real (demo) table, upper-cased."""
    root = Path(run(tmp_path / "raw", patients=5)["out"])
    for name in sorted(MIMIC3_FILES):
        heads = []
        for path in (root / f"{name}.csv.gz", DEMO / f"{name}.csv.gz"):
            with gzip.open(path, "rt", newline="") as f:
                heads.append(next(csv.reader(f)))
        assert heads[0] == [h.upper() for h in heads[1]], name


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = (digests(Path(run(tmp_path / name, patients=30, seed=seed)["out"]))
               for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert a == b
    assert all(a[name] != c[name] for name in a)


def test_rerun_replaces_the_folder_cleanly(tmp_path):
    out = tmp_path / "raw"
    (out / "hosp").mkdir(parents=True)
    (out / "hosp" / "stale.csv.gz").write_bytes(b"old")
    (out / "STALE.csv").write_text("old")
    run(out, patients=10, layout="trinetx")
    assert sorted(p.name for p in out.iterdir()) == ["diagnosis.csv.gz", "patient.csv.gz"]
    (out / "notes.txt").write_text("not an extract")              # never delete what is not an extract
    with pytest.raises(InputError, match="not a CSV extract"):
        run(out, patients=10)
    assert (out / "notes.txt").exists()


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(synthetic, "_labs_table", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run(tmp_path / "new", patients=10)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.csv").write_text("previous extract")     # a failed run leaves the previous extract alone
    with pytest.raises(RuntimeError):
        run(old, patients=10)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "keep.csv").read_text() == "previous extract"


def test_bad_config_is_refused(tmp_path):
    for kw in (dict(layout="mimic5"), dict(patients=0), dict(event_scale=0)):
        with pytest.raises(ValueError):
            run(tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()


def test_event_scale_multiplies_chart_rows_not_stays(tmp_path):
    base = run(tmp_path / "x1", patients=12)
    more = run(tmp_path / "x3", patients=12, event_scale=3)
    assert 2.8 <= more["tables"]["CHARTEVENTS"] / base["tables"]["CHARTEVENTS"] <= 3.2
    one, three = Path(base["out"]), Path(more["out"])
    for name in ("ICUSTAYS", "ADMISSIONS", "LABEVENTS", "INPUTEVENTS_MV"):
        assert (one / f"{name}.csv.gz").read_bytes() == (three / f"{name}.csv.gz").read_bytes(), name
    # the extra rows stay inside their stays and inside the hours of the original rows
    stays = {r["icustay_id"]: r for r in table(three, "ICUSTAYS")}
    chart = table(three, "CHARTEVENTS")
    assert all(ts(stays[r["icustay_id"]]["intime"]) <= ts(r["charttime"]) < ts(stays[r["icustay_id"]]["outtime"])
               for r in chart)
    hours = {(r["icustay_id"], r["itemid"], r["charttime"][:13]) for r in table(one, "CHARTEVENTS")}
    assert {(r["icustay_id"], r["itemid"], r["charttime"][:13]) for r in chart} == hours


# --------------------------------------------------------------------------------------- formats in detail
def test_quoting_round_trips_and_timestamps_parse(m3):
    root = m3[0]
    notes = table(root, "NOTEEVENTS")
    assert any("\n" in r["text"] and '"chest pain, shortness of breath"' in r["text"] for r in notes)
    values = {r["value"] for r in table(root, "CHARTEVENTS", (",227969,", ",223999,"))}
    assert {"Quiet, calm space", "Intubated, trach secured", 'Dentures ("partial plate")'} <= values
    assert any("25,000" in r["dose_val_rx"] for r in table(root, "PRESCRIPTIONS"))
    stamp = re.compile(r"2[01]\d\d-[01]\d-[0-3]\d [0-2]\d:[0-5]\d:[0-5]\d")
    for name, columns in (("ADMISSIONS", ("admittime", "dischtime")), ("ICUSTAYS", ("intime", "outtime")),
                          ("INPUTEVENTS_MV", ("starttime", "endtime", "storetime")),
                          ("PROCEDUREEVENTS_MV", ("starttime", "endtime")), ("DATETIMEEVENTS", ("value",))):
        rows = table(root, name)
        assert all(stamp.fullmatch(r[c]) for r in rows for c in columns), name
        for r in rows[::97]:
            for c in columns:
                datetime.strptime(r[c], "%Y-%m-%d %H:%M:%S")
    assert all(1790 < ts(r["dob"]).year < 2190 for r in table(root, "PATIENTS"))
    dates = {r["category"]: r for r in notes}
    assert dates["Discharge summary"]["charttime"] == "" and len(dates["Discharge summary"]["chartdate"]) == 10
    ts(dates["Nursing/other"]["charttime"])


def test_mimic3_conventions(m3, cohort):
    root = m3[0]
    stays, admissions, patients = cohort["stays"], cohort["admissions"], cohort["patients"]
    assert 0.78 <= np.mean([s["dbsource"] == "metavision" for s in stays.values()]) <= 0.92
    carevue = {k for k, s in stays.items() if s["dbsource"] == "carevue"}
    cv_rows = table(root, "CHARTEVENTS", ",NotStopd")                # CareVue rows carry stopped=NotStopd
    assert {r["icustay_id"] for r in cv_rows} == carevue
    assert {r["itemid"] for r in cv_rows} == {"211", "618", "646", "51", "8368", "52", "678"}
    assert not carevue & (set(cohort["onset"]["arf"]) | set(cohort["onset"]["shock"]))
    assert not carevue & {r["icustay_id"] for r in table(root, "INPUTEVENTS_MV")}
    first = {}
    for a in admissions.values():
        first[a["subject_id"]] = min(first.get(a["subject_id"], ts(a["admittime"])), ts(a["admittime"]))
    ages = np.array([(first[k] - ts(p["dob"])).days / 365.25 for k, p in patients.items()])
    assert 0.005 <= np.mean(ages < 18) <= 0.05 and 0.01 <= np.mean(ages > 200) <= 0.07
    assert 0.8 <= np.mean((ages >= 18) & (ages < 90))
    assert 2.0 <= len(admissions) / len(patients) <= 3.0
    assert all(re.fullmatch(r"V?\d{3,5}|E\d{4}", r["icd9_code"]) for r in table(root, "DIAGNOSES_ICD"))
    labs = table(root, "LABEVENTS")
    assert {"50813", "50912", "51301", "51222", "50983", "50971", "50931", "51006", "51265", "50882"} == \
        {r["itemid"] for r in labs}
    assert 0.02 <= np.mean([r["hadm_id"] == "" for r in labs]) <= 0.2         # outpatient labs
    assert all(re.fullmatch(r"2[01]\d\d-\d\d-\d\d \d\d:\d\d:00", r["charttime"]) for r in labs)
    for a in admissions.values():                                               # deaths are consistent
        if a["hospital_expire_flag"] == "1":
            assert a["deathtime"] == a["dischtime"]
            assert patients[a["subject_id"]]["dod"] == a["deathtime"][:10] + " 00:00:00"
    notes = table(root, "NOTEEVENTS")
    discharge = [r for r in notes if r["category"] == "Discharge summary"]
    assert 0.8 <= len(discharge) / len(admissions) <= 0.97
    assert any(r["iserror"] == "1" for r in notes)
    stays_of = defaultdict(list)
    for x in stays.values():
        stays_of[x["hadm_id"]].append(x)
    for r in notes:
        if r["category"] == "Nursing/other":
            assert any(ts(x["intime"]) <= ts(r["charttime"]) <= ts(x["outtime"]) for x in stays_of[r["hadm_id"]])


# --------------------------------------------------------------------------------------- planted labels
def test_stay_task_prevalences(cohort):
    stays, onset, labels = cohort["stays"], cohort["onset"], cohort["labels"]
    los = {k: (ts(s["outtime"]) - ts(s["intime"])).total_seconds() / 3600 for k, s in stays.items()}
    assert 0.5 <= np.mean([h >= 48 for h in los.values()]) <= 0.7
    assert 0.10 <= np.mean([onset["arf"].get(k, 99) < 48 for k in stays]) <= 0.20     # ventilated early
    assert len(cohort["members"]) >= 250
    assert 0.15 <= np.mean(list(labels["mortality"].values())) <= 0.26
    for kind in ("arf", "shock"):
        assert 0.08 <= np.mean(list(labels[kind].values())) <= 0.22, kind
        assert sum(labels[kind].values()) >= 25, kind


def test_stay_tasks_are_learnable_from_the_first_48_hours(m3, cohort):
    """One vital sign, averaged over hours 24-48, already ranks the positives well above chance."""
    root, stays, labels = m3[0], cohort["stays"], cohort["labels"]
    values = defaultdict(list)                      # (item, stay) -> values charted in hours 24-48
    for r in table(root, "CHARTEVENTS", (",220277,", ",220181,")):   # SpO2, non-invasive mean BP
        k = r["icustay_id"]
        if 24 <= (ts(r["charttime"]) - ts(stays[k]["intime"])).total_seconds() / 3600 < 48:
            values[r["itemid"], k].append(float(r["valuenum"]))
    spo2, mbp = ({k: np.mean(v) for (i, k), v in values.items() if i == item} for item in ("220277", "220181"))
    for task, feature, sign in (("arf", spo2, -1), ("shock", mbp, -1), ("mortality", mbp, -1)):
        keys = list(labels[task])
        score = auroc([labels[task][k] for k in keys], [sign * feature[k] for k in keys])
        assert score > 0.7, (task, score)


def test_readmission_prevalence_and_signal(m3):
    root = m3[0]
    admissions = table(root, "ADMISSIONS")
    by_subject = defaultdict(list)
    for a in admissions:
        by_subject[a["subject_id"]].append(a)
    label = {}
    for visits in by_subject.values():
        visits.sort(key=lambda a: ts(a["admittime"]))
        for a, nxt in zip(visits, visits[1:] + [None]):
            if a["hospital_expire_flag"] == "0":
                label[a["hadm_id"]] = nxt is not None and ts(nxt["admittime"]) - ts(a["dischtime"]) <= timedelta(30)
    assert 0.10 <= np.mean(list(label.values())) <= 0.22
    gaps = [(ts(b["admittime"]) - ts(a["dischtime"])).days for v in by_subject.values() for a, b in zip(v, v[1:])]
    assert np.median(gaps) > 180                                   # several admissions spread over years
    notes = {r["hadm_id"]: r["text"] for r in table(root, "NOTEEVENTS") if r["category"] == "Discharge summary"}
    keys = [k for k in label if k in notes]
    y = [label[k] for k in keys]
    words = [("Noncompliant" in notes[k]) * 2 + ("Lives alone" in notes[k]) for k in keys]
    assert auroc(y, words) > 0.68


def test_patient_task_cases_and_precursors(m3, tmp_path):
    """HF / COPD / amnesia: enough cases first diagnosed >= 180 days after an earlier discharge, and
    their earlier admissions carry the precursor codes more often than never-diagnosed patients'."""
    root = m3[0]
    admissions = {r["hadm_id"]: r for r in table(root, "ADMISSIONS")}
    codes = defaultdict(set)
    for r in table(root, "DIAGNOSES_ICD"):
        codes[r["hadm_id"]].add(r["icd9_code"])
    trinetx = Path(run(tmp_path / "tx", layout="trinetx")["out"])
    encounters = defaultdict(lambda: [None, set()])
    for r in table(trinetx, "diagnosis"):
        assert r["code_system"] in ("ICD-9-CM", "ICD-10-CM") and re.fullmatch(r"\d{8}", r["date"])
        e = encounters[(r["patient_id"], r["encounter_id"])]
        e[0] = datetime.strptime(r["date"], "%Y%m%d")
        if r["code_system"] == "ICD-9-CM":
            assert re.fullmatch(r"(V?\d{2,3}|E\d{3})(\.\d{1,2})?", r["code"]), r["code"]
            e[1].add(r["code"].replace(".", ""))
    visits = {"mimic3": defaultdict(list), "trinetx": defaultdict(list)}
    for a in admissions.values():
        visits["mimic3"][a["subject_id"]].append((ts(a["admittime"]), ts(a["dischtime"]), codes[a["hadm_id"]]))
    for (pid, _), (day, cs) in encounters.items():
        visits["trinetx"][pid].append((day, day, cs))
    precursors = {"hf": "4019", "copd": "3051", "amn": "78097"}
    for layout, people in visits.items():
        for task, group in (("hf", HF), ("copd", COPD), ("amn", AMNESIA)):
            cases, history = 0, {True: [], False: []}
            for v in people.values():
                v.sort(key=lambda x: x[0])
                dx = [i for i, x in enumerate(v) if any(in_group(c, group) for c in x[2])]
                if dx and any(x[1] <= v[dx[0]][0] - timedelta(days=180) for x in v[:dx[0]]):
                    cases += 1
                    history[True] += [precursors[task] in x[2] for x in v[:dx[0]]]
                elif not dx:
                    history[False] += [precursors[task] in x[2] for x in v]
            assert cases >= 30, (layout, task, cases)
            assert np.mean(history[True]) > 2 * np.mean(history[False]), (layout, task)


def test_vocabulary_sizes_and_skew(m3):
    root = m3[0]
    codes = [r["icd9_code"] for r in table(root, "DIAGNOSES_ICD")]
    drugs = [r["drug"] for r in table(root, "PRESCRIPTIONS")]
    assert 200 <= len(set(codes)) <= 400 and 80 <= len(set(drugs)) <= 200
    counts = np.sort(np.unique(codes, return_counts=True)[1])[::-1]
    assert counts[:20].sum() > 0.25 * len(codes)          # a few codes are frequent, many are rare
