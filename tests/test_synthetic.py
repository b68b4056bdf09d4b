"""synthetic.py: complete, deterministic extracts in every layout that keep the latent model's promises. Labels are
read from the processed folder (the reader's definitions, cohorts.py) and must follow the true latents (latents/),
never a single code or feature; every latent moves many codes, drugs, note words and hourly features; the
prevalences suit the benchmarks; and preprocessing never reads latents/.
Run: python -m pytest -q tests/test_synthetic.py (about 30 s).
"""
import contextlib
import csv
import gzip
import hashlib
import io
import json
import re
import shutil
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import synthetic
from metrics import auroc   # checked against scikit-learn in test_evaluate.py
from data import lookup
from folders import InputError
from preprocessing import pipeline
from synthetic import SynthConfig, read_latents, synthesize

LATENT_FILES = {"latents/patients", "latents/admissions", "latents/stays"}
MIMIC3_FILES = {"PATIENTS", "ADMISSIONS", "ICUSTAYS", "CHARTEVENTS", "LABEVENTS", "OUTPUTEVENTS", "INPUTEVENTS_MV",
                "PROCEDUREEVENTS_MV", "DATETIMEEVENTS", "DIAGNOSES_ICD", "PRESCRIPTIONS", "NOTEEVENTS"} | LATENT_FILES
MIMIC4_FILES = {"hosp/patients", "hosp/admissions", "hosp/diagnoses_icd", "hosp/prescriptions", "hosp/labevents",
                "icu/icustays", "icu/chartevents", "icu/outputevents", "icu/inputevents", "icu/procedureevents",
                "icu/datetimeevents", "note/discharge"} | LATENT_FILES
TRINETX_FILES = {"patient", "diagnosis", "latents/patients", "latents/encounters"}
VASOPRESSORS = {"221906", "221289", "221662", "222315", "221749"}
PATIENT_TASKS = ("hf", "copd", "amnesia")


def run(out: Path, **kw) -> dict:
    return synthesize(SynthConfig(out=out, quiet=True, **kw))


def table(root: Path, name: str, contains: str | tuple = ()) -> list[dict]:
    """Rows of NAME.csv.gz as dicts with lower-case keys; `contains` (one or several substrings) pre-filters raw
    lines: the fast path for the big event tables, where no quoted field spans lines."""
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


def preprocess(raw: Path, out: Path, **kw) -> tuple[data.Processed, str]:
    """Preprocess `raw` into `out`; returns the loaded folder and everything preprocessing logged."""
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        pipeline.preprocess(pipeline.PreprocessConfig(raw=raw, out=out, **kw))
    return data.load_processed(out), log.getvalue()


# ------------------------------------------------------------------------------------ the inputs of each task
def csr_counts(ptr, idx, width: int) -> np.ndarray:
    ptr, idx = np.asarray(ptr), np.asarray(idx).astype(np.int64)
    owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    return np.bincount(owner * width + idx, minlength=(len(ptr) - 1) * width).reshape(-1, width).astype(float)


def task_inputs(d: data.Processed, task: str) -> tuple[np.ndarray, dict]:
    """What a task's model sees, flattened: a stay's features as the share of the 48 hours each is active plus its
    static vector; an admission's ICD and drug sets and note embedding; a patient's ICD counts over the visits
    discharged by the cutoff. Returns (inputs, the task's examples: every split)."""
    ex, m, a = d.labels[task], d.meta, d.admissions
    if task in ("arf", "shock", "mortality"):
        ts_ = csr_counts(d.stays["ts_ptr"], d.stays["ts_feat"], m["n_features"]) / m["seq_len"]
        return np.hstack([ts_, np.asarray(d.stays["static"], dtype=float)])[ex["row"]], ex
    if task == "readmission":
        return np.hstack([csr_counts(a["icd_ptr"], a["icd_idx"], m["n_icd"]), np.asarray(a["note"], dtype=float),
                          csr_counts(a["drug_ptr"], a["drug_idx"], m["n_drug"])])[ex["row"]], ex
    icd = csr_counts(a["icd_ptr"], a["icd_idx"], m["n_icd"])
    subject, disch = np.asarray(a["subject_id"]), np.asarray(a["dischtime"])
    x = np.zeros((len(ex["label"]), m["n_icd"]))
    for i, (s, cut) in enumerate(zip(ex["subject_id"], ex["cutoff"])):
        x[i] = icd[(subject == s) & (disch <= cut)].sum(0)
    return x, ex


def true_latents(d: data.Processed, lat: dict, task: str, ex: dict) -> np.ndarray:
    """The latents behind each example: the stay's, the admission's or the patient's (latents/)."""
    if task in ("arf", "shock", "mortality"):
        rows = lookup(lat["stays"]["stay_id"], np.asarray(d.stays["stay_id"])[ex["row"]])
        return np.column_stack([lat["stays"][k][rows] for k in synthetic.STAY_LATENTS])
    if task == "readmission":
        rows = lookup(lat["admissions"]["hadm_id"], np.asarray(d.admissions["hadm_id"])[ex["row"]])
        return np.column_stack([lat["admissions"][k][rows] for k in synthetic.ADMISSION_LATENTS])
    p = lat["patients"]
    rows = lookup(p["subject_id"] if "subject_id" in p else p["patient_id"], ex["subject_id"])
    return np.column_stack([p[k][rows] for k in synthetic.PATIENT_LATENTS])


def cv_auroc(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> float:
    """5-fold AUROC of an L2 logistic regression (standardised inputs, torch LBFGS)."""
    fold = np.random.default_rng(0).permutation(len(y)) % 5
    score = np.zeros(len(y))
    for k in range(5):
        tr = fold != k
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")
        yt = torch.tensor(y[tr], dtype=torch.float64)

        def closure():
            opt.zero_grad()
            z = xt[tr] @ w[:-1] + w[-1]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt) + l2 / tr.sum() * (w[:-1] ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        score[~tr] = (xt[~tr] @ w[:-1]).detach().numpy()
    return auroc(y, score)


def best_single(x: np.ndarray, y: np.ndarray) -> float:
    """The highest univariate AUROC (either direction) of the inputs active in >= 5% of the examples."""
    keep = ((x != 0).mean(0) >= 0.05) & (x.std(0) > 0)
    return max([max(a, 1 - a) for a in (auroc(y, col) for col in x[:, keep].T)], default=0.5)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    """The demo-sized MIMIC-III extract (400 patients, seed 0) and its summary."""
    out = tmp_path_factory.mktemp("m3") / "raw"
    return out, run(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 60-patient MIMIC-III extract (seed 0) for the format checks of the fast subset."""
    out = tmp_path_factory.mktemp("small") / "raw"
    return out, run(out, patients=60)


@pytest.fixture(scope="module")
def processed(m3, tmp_path_factory):
    """The demo extract preprocessed (default settings), its true latents and the preprocessing log."""
    d, log = preprocess(m3[0], tmp_path_factory.mktemp("m3p") / "processed")
    return d, read_latents(m3[0]), log


@pytest.fixture(scope="module")
def trinetx(tmp_path_factory):
    """A TriNetX-style extract of 3,000 patients (a few seconds), preprocessed: enough cases per patient task to
    measure single codes, which the demo cohort's ~250 examples per task cannot."""
    root = tmp_path_factory.mktemp("tx")
    run(root / "raw", patients=3000, layout="trinetx", seed=5)
    d, _ = preprocess(root / "raw", root / "processed", quiet=True)
    return d, read_latents(root / "raw")


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
        upper = layout == "mimic3" and not name.startswith("latents/")
        assert head == ([h.upper() for h in head] if upper else [h.lower() for h in head]), name
        assert all(len(r) == len(head) for r in rows[1:]), name
        assert len(rows) - 1 == summary["tables"][name], name
    assert summary["patients"] == 40 == summary["tables"]["latents/patients"]
    if layout == "mimic3":
        assert summary["admissions"] == summary["tables"]["ADMISSIONS"] == summary["tables"]["latents/admissions"]
        assert summary["stays"] == summary["tables"]["ICUSTAYS"] == summary["tables"]["latents/stays"]
        head = table(root, "CHARTEVENTS")[0].keys()
        assert list(head) == ["row_id", "subject_id", "hadm_id", "icustay_id", "itemid", "charttime", "storetime",
                              "cgid", "value", "valuenum", "valueuom", "warning", "error", "resultstatus", "stopped"]
    if layout == "mimic4":
        assert summary["stays"] == summary["tables"]["icu/icustays"]
        assert set(table(root, "hosp/patients")[0]) == {"subject_id", "gender", "anchor_age", "anchor_year",
                                                         "anchor_year_group", "dod"}
        assert "race" in table(root, "hosp/admissions")[0] and "religion" not in table(root, "hosp/admissions")[0]
        assert {r["icd_version"] for r in table(root, "hosp/diagnoses_icd")} == {"9", "10"}
        assert all(re.fullmatch(r"\d+-DS-\d+", r["note_id"]) for r in table(root, "note/discharge"))


def test_unread_columns_are_blank(small):
    """Only the ids and what the reader reads are written: no caregivers, store times, orders or units."""
    root = small[0]
    for name, blank in (("CHARTEVENTS", ("row_id", "storetime", "cgid", "valueuom", "warning", "resultstatus")),
                        ("INPUTEVENTS_MV", ("orderid", "linkorderid", "cgid", "storetime", "rate", "patientweight")),
                        ("PATIENTS", ("dod", "dod_hosp", "expire_flag")), ("PRESCRIPTIONS", ("dose_val_rx", "route")),
                        ("ADMISSIONS", ("discharge_location", "diagnosis", "edregtime"))):
        rows = table(root, name)[:2000]
        assert rows and all(r[c] == "" for r in rows for c in blank) and all(r["subject_id"] for r in rows), name


DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "mimic3-demo"


@pytest.mark.skipif(not DEMO.is_dir(), reason="needs ../shared/data/mimic3-demo")
def test_mimic3_columns_are_the_real_ones(tmp_path):
    """Every MIMIC-III table has exactly the column list of the real (demo) table, upper-cased."""
    root = Path(run(tmp_path / "raw", patients=5)["out"])
    for name in sorted(MIMIC3_FILES - LATENT_FILES):
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
    with pytest.raises(InputError, match="holds an extract that synth did not write; pass --overwrite"):
        run(out, patients=10, layout="trinetx")                    # not synth's: replaced only when asked
    run(out, patients=10, layout="trinetx", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [synthetic.MARKER, "diagnosis.csv.gz", "latents", "patient.csv.gz"]
    run(out, patients=10)                                          # synth's own extract is replaceable
    (out / "notes.txt").write_text("not an extract")              # never delete what is not an extract
    with pytest.raises(InputError, match="not a CSV extract"):
        run(out, patients=10)
    assert (out / "notes.txt").exists()


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(synthetic, "_notes", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run(tmp_path / "new", patients=10)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.csv").write_text("previous extract")     # a failed run leaves the previous extract alone
    with pytest.raises(RuntimeError):
        run(old, patients=10, overwrite=True)
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
    for name in ("ICUSTAYS", "ADMISSIONS", "LABEVENTS", "INPUTEVENTS_MV", "latents/stays"):
        assert (one / f"{name}.csv.gz").read_bytes() == (three / f"{name}.csv.gz").read_bytes(), name
    # the extra rows stay inside their stays and inside the hours of the original rows
    stays = {r["icustay_id"]: r for r in table(three, "ICUSTAYS")}
    chart = table(three, "CHARTEVENTS")
    assert all(ts(stays[r["icustay_id"]]["intime"]) <= ts(r["charttime"]) < ts(stays[r["icustay_id"]]["outtime"])
               for r in chart)
    hours = {(r["icustay_id"], r["itemid"], r["charttime"][:13]) for r in table(one, "CHARTEVENTS")}
    assert {(r["icustay_id"], r["itemid"], r["charttime"][:13]) for r in chart} == hours


# --------------------------------------------------------------------------------------- formats in detail
def test_quoting_round_trips_and_timestamps_parse(small):
    root = small[0]
    notes = table(root, "NOTEEVENTS")
    assert all("\n" in r["text"] and '"chest pain, shortness of breath"' in r["text"] for r in notes)
    values = {r["value"] for r in table(root, "CHARTEVENTS", (",227969,", ",228096,"))}
    assert {"Quiet, calm space", "Clear, firm limit setting", "+1 Anxious, apprehensive, but not aggressive"} <= values
    stamp = re.compile(r"2[01]\d\d-[01]\d-[0-3]\d [0-2]\d:[0-5]\d:[0-5]\d")
    for name, columns in (("ADMISSIONS", ("admittime", "dischtime")), ("ICUSTAYS", ("intime", "outtime")),
                          ("INPUTEVENTS_MV", ("starttime", "endtime")),
                          ("PROCEDUREEVENTS_MV", ("starttime", "endtime")),
                          ("DATETIMEEVENTS", ("charttime",))):
        rows = table(root, name)
        assert all(stamp.fullmatch(r[c]) for r in rows for c in columns), name
        for r in rows[::97]:
            for c in columns:
                datetime.strptime(r[c], "%Y-%m-%d %H:%M:%S")
    assert all(1790 < ts(r["dob"]).year < 2190 for r in table(root, "PATIENTS"))
    assert all(r["charttime"] == "" and len(r["chartdate"]) == 10 and r["category"] == "Discharge summary"
               for r in notes)


def test_mimic3_conventions(small):
    root = small[0]
    stays = {r["icustay_id"]: r for r in table(root, "ICUSTAYS")}
    admissions = {r["hadm_id"]: r for r in table(root, "ADMISSIONS")}
    patients = {r["subject_id"]: r for r in table(root, "PATIENTS")}
    assert 0.78 <= np.mean([s["dbsource"] == "metavision" for s in stays.values()]) <= 0.92
    carevue = {k for k, s in stays.items() if s["dbsource"] == "carevue"}
    chart = table(root, "CHARTEVENTS")
    assert {r["itemid"] for r in chart if r["icustay_id"] in carevue} == {"211", "455", "8441", "456", "618", "646",
                                                                          "678", "807"}
    mv_only = {r["icustay_id"] for name in ("INPUTEVENTS_MV", "PROCEDUREEVENTS_MV", "DATETIMEEVENTS")
               for r in table(root, name)}
    assert not carevue & mv_only
    assert {r["itemid"] for r in chart if r["valuenum"] == "" and r["icustay_id"] not in carevue} == \
        {"226732", "220048", "227969"}                     # text items; GCS, RASS and alarms carry a score
    assert {r["valuenum"] for r in chart if r["itemid"] == "224641"} == {"0", "1"}
    first = {}
    for a in admissions.values():
        first[a["subject_id"]] = min(first.get(a["subject_id"], ts(a["admittime"])), ts(a["admittime"]))
    ages = np.array([(first[k] - ts(p["dob"])).days / 365.25 for k, p in patients.items()])
    assert 0.005 <= np.mean(ages < 18) <= 0.05 and 0.01 <= np.mean(ages > 200) <= 0.07
    assert 2.0 <= len(admissions) / len(patients) <= 4.0
    assert all(re.fullmatch(r"V?\d{3,5}|E\d{4}", r["icd9_code"]) for r in table(root, "DIAGNOSES_ICD"))
    labs = table(root, "LABEVENTS")
    assert {"50813", "50912", "51301", "51222", "50971", "50931", "51006", "50882", "50821", "50818", "50820",
            "51003", "50963", "50862"} == {r["itemid"] for r in labs}
    assert 0.02 <= np.mean([r["hadm_id"] == "" for r in labs]) <= 0.2         # outpatient labs
    assert all(re.fullmatch(r"2[01]\d\d-\d\d-\d\d \d\d:\d\d:00", r["charttime"]) for r in labs)
    for a in admissions.values():                                               # deaths are consistent
        assert (a["hospital_expire_flag"] == "1") == (a["deathtime"] != "")
        assert a["deathtime"] in ("", a["dischtime"])
    notes = table(root, "NOTEEVENTS")
    assert 0.8 <= len(notes) / len(admissions) <= 0.97 and any(r["iserror"] == "1" for r in notes)


@pytest.mark.slow
def test_trinetx_codes_dates_and_icd10_encounters(trinetx, tmp_path):
    root = Path(run(tmp_path / "tx", patients=300, layout="trinetx")["out"])
    rows = table(root, "diagnosis")
    for r in rows:
        assert r["code_system"] in ("ICD-9-CM", "ICD-10-CM") and re.fullmatch(r"\d{8}", r["date"])
        if r["code_system"] == "ICD-9-CM":
            assert re.fullmatch(r"(V?\d{2,3}|E\d{3})(\.\d{1,2})?", r["code"]), r["code"]
    ten = {r["encounter_id"] for r in rows if r["code_system"] == "ICD-10-CM"}
    nine = {r["encounter_id"] for r in rows if r["code_system"] == "ICD-9-CM"}
    assert not ten & nine and 0.25 <= len(ten) / len(ten | nine) <= 0.55     # an encounter is coded in one system
    last_nine, first_ten = {}, {}                                          # a patient switches once, 9 -> 10
    for r in rows:
        book, pick = (first_ten, min) if r["code_system"] == "ICD-10-CM" else (last_nine, max)
        book[r["patient_id"]] = pick(book.get(r["patient_id"], r["date"]), r["date"])
    switched = set(last_nine) & set(first_ten)
    assert len(switched) >= 0.2 * len(patients := table(root, "patient"))
    assert all(last_nine[p] <= first_ten[p] for p in switched)
    assert {r["sex"] for r in patients} == {"M", "F"} and all(re.fullmatch(r"(18|19|20)\d\d", r["year_of_birth"])
                                                               for r in patients)


@pytest.mark.slow
def test_vocabulary_sizes_and_skew(processed):
    d = processed[0]
    assert 220 <= d.meta["n_icd"] <= 400 and 60 <= d.meta["n_drug"] <= 150
    counts = np.sort(np.bincount(np.asarray(d.admissions["icd_idx"]), minlength=d.meta["n_icd"]))[::-1]
    assert counts[:20].sum() > 0.2 * counts.sum()          # a few codes are frequent, many are rare
    assert 10 <= np.diff(np.asarray(d.admissions["icd_ptr"])).mean() <= 20


# --------------------------------------------------------------------------------------- the latent model
def test_latents_are_written_and_read_back(small):
    root, summary = small
    lat = read_latents(root)
    assert set(lat) == {"patients", "admissions", "stays"}
    p, a, s = lat["patients"], lat["admissions"], lat["stays"]
    assert set(p) == {"subject_id", *synthetic.PATIENT_LATENTS, *PATIENT_TASKS}
    assert set(a) == {"hadm_id", "subject_id", *synthetic.ADMISSION_LATENTS}
    assert set(s) == {"stay_id", "hadm_id", *synthetic.STAY_LATENTS}
    assert p["subject_id"].dtype == np.int64 and p["hf"].dtype == bool and p["cardiac"].dtype == np.float64
    assert sorted(p["subject_id"]) == sorted(int(r["subject_id"]) for r in table(root, "PATIENTS"))
    assert sorted(a["hadm_id"]) == sorted(int(r["hadm_id"]) for r in table(root, "ADMISSIONS"))
    assert sorted(s["stay_id"]) == sorted(int(r["icustay_id"]) for r in table(root, "ICUSTAYS"))
    for k in synthetic.PATIENT_LATENTS:                    # standard normal patient latents (4 standard errors)
        assert abs(p[k].mean()) < 4 / np.sqrt(len(p[k])) and 0.7 < p[k].std() < 1.3, k
    with pytest.raises(InputError, match="latents"):
        read_latents(root.parent)


@pytest.mark.slow
def test_preprocessing_ignores_the_latents(m3, processed, tmp_path):
    """The processed folder is the same with and without latents/ beside the extract, and preprocessing neither
    mentions nor warns about it."""
    raw = tmp_path / "raw"
    shutil.copytree(m3[0], raw, ignore=shutil.ignore_patterns("latents"))
    other, log = preprocess(raw, tmp_path / "processed")
    d, _, log_with = processed

    def comparable(meta, root):
        meta = {k: v for k, v in meta.items() if k not in ("created", "config")}
        return json.loads(json.dumps(meta).replace(str(root), "RAW"))
    assert comparable(d.meta, m3[0]) == comparable(other.meta, raw)
    for name in ("stays", "admissions"):
        mine, theirs = getattr(d, name), getattr(other, name)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert {t: v["label"].tolist() for t, v in d.labels.items()} == \
        {t: v["label"].tolist() for t, v in other.labels.items()}
    for text in (log, log_with):
        assert "latent" not in text.lower() and "warning" not in text.lower()


@pytest.mark.slow
def test_prevalences(processed, trinetx):
    """Stay tasks 10-25% positive; enough cases that a 14,000-patient extract has >= 300 positives per patient task
    in a 20% test split, and a 4,000-patient TriNetX-style one >= 300 in a 40% test split."""
    d = processed[0]
    for task, (lo, hi) in dict(arf=(0.1, 0.25), shock=(0.1, 0.25), mortality=(0.1, 0.25), readmission=(0.08, 0.22),
                               hf=(0.2, 0.5), copd=(0.2, 0.5), amnesia=(0.2, 0.5)).items():
        y = d.labels[task]["label"]
        assert lo <= y.mean() <= hi and y.sum() >= 25, (task, y.mean(), y.sum())
    for cohort, patients, need in ((d, 400, 300 / (14000 * 0.2)), (trinetx[0], 3000, 300 / (4000 * 0.4))):
        for task in PATIENT_TASKS:                      # cases per patient, with a 10% margin over the need
            assert cohort.labels[task]["label"].sum() / patients >= 1.1 * need, (task, patients)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["arf", "shock", "mortality", "readmission", "hf", "copd", "amnesia"])
def test_labels_follow_the_latents_and_the_inputs_carry_them(processed, task):
    """On the demo cohort, a logistic regression on the true latents ranks every task's label far better than
    chance (5-fold AUROC >= 0.85; measured 0.91-0.97 over generator seeds 0-2), and one on the task's own inputs
    learns it (>= 0.65, as test_evaluate asks of fine-tuned models; measured 0.72-0.87)."""
    d, lat, _ = processed
    x, ex = task_inputs(d, task)
    y = ex["label"]
    assert cv_auroc(true_latents(d, lat, task, ex), y) >= 0.85, task
    assert cv_auroc(x, y, l2=100.0) >= 0.65, task


@pytest.mark.slow
@pytest.mark.parametrize("task", PATIENT_TASKS)
def test_no_single_code_carries_a_patient_task(trinetx, task):
    """On 3,000 TriNetX-style patients (~2,000 examples a task), no ICD code counted over the history has a
    univariate AUROC above 0.68 (measured 0.62-0.66 over generator seeds 5-7), while the true latents reach >= 0.9
    (measured 0.95-0.96): the codes carry the task only together."""
    d, lat = trinetx
    x, ex = task_inputs(d, task)
    assert best_single(x, ex["label"]) <= 0.68, task
    assert cv_auroc(true_latents(d, lat, task, ex), ex["label"]) >= 0.9, task


@pytest.mark.slow
@pytest.mark.parametrize("task", ["arf", "shock", "mortality", "readmission"])
def test_no_single_input_carries_a_stay_or_admission_task(processed, task):
    """No single stay feature, ICD code, drug or note dimension ranks a stay or admission label with a univariate
    AUROC above 0.78 on the demo cohort (~500 examples; measured 0.66-0.75 over generator seeds 0-2, quintiles of
    heart rate, respiratory rate or blood pressure), below the inputs together (0.72-0.87) and the latents."""
    d, _, _ = processed
    x, ex = task_inputs(d, task)
    assert best_single(x, ex["label"]) <= 0.78, task


@pytest.mark.slow
def test_every_latent_moves_many_codes_drugs_words_and_features(m3, processed):
    """Each admission latent is correlated (|r| >= 0.1 over ~1,100 admissions) with at least 10 ICD codes, 4 drugs
    and 3 note words; each stay latent with at least 10 hourly variables (|r| >= 0.15 over ~750 stays)."""
    root, (d, lat, _) = m3[0], processed
    a = lat["admissions"]
    hadm = {h: i for i, h in enumerate(a["hadm_id"].tolist())}
    items = {"icd": defaultdict(set), "drug": defaultdict(set), "word": defaultdict(set)}
    for r in table(root, "DIAGNOSES_ICD"):
        items["icd"][r["icd9_code"]].add(hadm[int(r["hadm_id"])])
    for r in table(root, "PRESCRIPTIONS"):
        items["drug"][r["drug"]].add(hadm[int(r["hadm_id"])])
    for r in table(root, "NOTEEVENTS"):
        for word in set(re.findall(r"[a-z]+", r["text"].lower())):
            items["word"][word].add(hadm[int(r["hadm_id"])])
    for kind, minimum in (("icd", 10), ("drug", 4), ("word", 3)):
        present = [np.isin(np.arange(len(hadm)), list(rows)) for rows in items[kind].values() if len(rows) >= 20]
        for k in synthetic.ADMISSION_LATENTS:
            moved = sum(abs(np.corrcoef(p, a[k])[0, 1]) >= 0.1 for p in present)
            assert moved >= minimum, (kind, k, moved)
    x = csr_counts(d.stays["ts_ptr"], d.stays["ts_feat"], d.meta["n_features"])
    rows = lookup(lat["stays"]["stay_id"], np.asarray(d.stays["stay_id"]))
    variable = [" ".join(name.split()[:2]) for name in d.meta["feature_names"]]     # 'chart 220045', 'lab 50813'
    for k in synthetic.STAY_LATENTS:
        r = np.array([abs(np.corrcoef(col, lat["stays"][k][rows])[0, 1]) if col.std() else 0 for col in x.T])
        assert len({v for v, c in zip(variable, r) if c >= 0.15}) >= 10, k


# ------------------------------------------------------------------------------------ the realism dial
def _case_signal(tmp_path: Path, name: str, **dial) -> dict:
    """Per patient task: prevalence and AUROC of the case flag from its driving latent, in a 2,000-patient
    diagnosis extract drawn with `dial`."""
    out = tmp_path / name
    synthesize(SynthConfig(out=out, patients=2000, layout="trinetx", seed=2, quiet=True, **dial))
    pat = read_latents(out)["patients"]
    drivers = {"hf": "cardiac", "copd": "pulmonary", "amnesia": "cognitive"}
    return {t: (float(np.mean(pat[t])), auroc(pat[t], pat[z])) for t, z in drivers.items()}


def test_world_make_is_the_designed_world_and_defaults_keep_the_bytes():
    """World.make() holds the designed tables unchanged (the byte-identical default is checked above by
    test_same_seed_same_bytes_other_seed_other_bytes and bench/fingerprint.py)."""
    world = synthetic.World.make()
    for got, designed in ((world.codes, synthetic._CODE_TABLE), (world.drugs, synthetic._DRUG_TABLE)):
        assert all(np.array_equal(g, d) for g, d in zip(got, designed))
    assert np.array_equal(world.hourly["w"], synthetic._VARS["w"]) and world.outcomes == synthetic._OUTCOMES


def test_strength_and_label_noise_weaken_the_labels_and_keep_the_prevalence(tmp_path):
    base = _case_signal(tmp_path, "base")
    weak = _case_signal(tmp_path, "weak", strength=0.25)
    noisy = _case_signal(tmp_path, "noisy", label_noise=0.6)
    for task, (prevalence, signal) in base.items():
        assert signal > 0.85 and 0.2 < prevalence < 0.45, (task, base[task])
        for other in (weak, noisy):
            assert abs(other[task][0] - prevalence) < 0.06, (task, other[task], prevalence)   # the rate stays
            assert other[task][1] < signal - 0.1, (task, other[task], signal)                # the signal does not


def test_strength_scales_every_loading_and_keeps_item_rates():
    half = synthetic.World.make(strength=0.5)
    base = synthetic.World.make()
    assert np.allclose(half.codes[2], base.codes[2] * 0.5)
    assert np.allclose(half.hourly["w"][:, 0], base.hourly["w"][:, 0] / 2)
    assert all(abs(w) < abs(base.outcomes[k][1][j]) for k, (_, ws) in half.outcomes.items()
               if k not in ("admissions", "icu") for j, w in ws.items())
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20000, base.codes[2].shape[1]))
    rate = lambda t: synthetic._sigmoid(t[1] + z @ t[2].T).mean(0)  # noqa: E731
    assert np.allclose(rate(half.codes), rate(base.codes), rtol=0.35, atol=0.01)


def test_redrawn_loadings_give_structure_the_designed_world_does_not_share():
    """loadings_seed re-draws which latent each item loads on (same strengths, same base rates): most items move
    to another latent, and every item still loads on some latent."""
    base, other = synthetic.World.make(), synthetic.World.make(loadings_seed=1)
    top = lambda w: np.argmax(np.abs(w), axis=1)  # noqa: E731
    loaded = base.codes[2].any(1)
    assert np.array_equal(np.sort(np.abs(other.codes[2]), 1), np.sort(np.abs(base.codes[2]), 1))
    assert np.mean(top(other.codes[2])[loaded] != top(base.codes[2])[loaded]) > 0.7
    assert np.array_equal(other.codes[1], base.codes[1])
    moved = [not np.array_equal(o, b) for o, b in zip(other.hourly["w"], base.hourly["w"]) if b[:, :-1].any()]
    assert np.mean(moved) > 0.7
    assert synthetic.World.make(loadings_seed=1).codes[2].tolist() == other.codes[2].tolist()   # deterministic
