"""Shared test fixtures: paths to the real data in ../shared/data, a writer of tiny MIMIC-III extracts whose
every row is chosen by hand (so label definitions can be checked exactly), and the expensive inputs built once
per session and shared read-only: a small synthetic cohort, processed, and a short pretraining run on it (the
demo-sized cohort for the learning checks), and the MIMIC-III demo preprocessed from the command line. `python -m pytest -m "not slow"` leaves out
the tests marked slow (whole pipelines, learning checks)."""
import csv
import gzip
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MIMIC3_DEMO = SHARED_DATA / "mimic3-demo"
NOTES = SHARED_DATA / "notes"


def write_table(folder: Path, name: str, header: list[str], rows: list[list], gz: bool = True) -> Path:
    """Write one CSV table (gzip by default), creating the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{name}.csv.gz" if gz else f"{name}.csv")
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def hours_after(start: str, hours: float) -> str:
    """'YYYY-MM-DD HH:MM:SS' plus `hours`."""
    from datetime import datetime, timedelta
    t = datetime.strptime(start, "%Y-%m-%d %H:%M:%S") + timedelta(hours=hours)
    return t.strftime("%Y-%m-%d %H:%M:%S")


# A stay is (subject, hadm, stay_id, intime, length of stay in hours); events are added per stay.
T0 = "2150-01-01 08:00:00"


class TinyMimic3:
    """Builds a MIMIC-III folder (lower-case headers, like the public demo) from a few hand-made rows."""

    def __init__(self):
        self.patients, self.admissions, self.stays = [], [], []
        self.chart, self.procedures, self.inputs, self.diagnoses, self.notes = [], [], [], [], []

    def patient(self, subject: int, gender: str = "F", dob: str = "2100-01-01 00:00:00"):
        self.patients.append([len(self.patients) + 1, subject, gender, dob, "", "", "", 0])

    def admission(self, subject: int, hadm: int, admit: str, disch_hours: float, died: bool = False,
                  codes=("4019",)):
        disch = hours_after(admit, disch_hours)
        self.admissions.append([len(self.admissions) + 1, subject, hadm, admit, disch, disch if died else "",
                                "EMERGENCY", "EMERGENCY ROOM ADMIT", "HOME", "Medicare", "ENGL", "CATHOLIC",
                                "MARRIED", "WHITE", "", "", "SEPSIS", int(died), 1])
        for i, code in enumerate(codes):
            self.diagnoses.append([len(self.diagnoses) + 1, subject, hadm, i + 1, code])

    def stay(self, subject: int, hadm: int, stay_id: int, intime: str, los_hours: float, vitals_hours: int = 48,
             dbsource: str = "metavision"):
        """An ICU stay with one heart-rate row per hour for `vitals_hours` hours (its features)."""
        out = hours_after(intime, los_hours)
        self.stays.append([len(self.stays) + 1, subject, hadm, stay_id, dbsource, "MICU", "MICU", 1, 1, intime,
                           out, los_hours / 24])
        for h in range(min(vitals_hours, int(los_hours))):
            self.chart_row(subject, hadm, stay_id, 220045, hours_after(intime, h + 0.5), 80 + h % 7)

    def chart_row(self, subject, hadm, stay_id, itemid, time, value):
        num = value if isinstance(value, (int, float)) else ""
        self.chart.append([len(self.chart) + 1, subject, hadm, stay_id, itemid, time, time, 1, value, num,
                           "", 0, 0, "", ""])

    def ventilation(self, subject, hadm, stay_id, start: str):
        self.procedures.append([len(self.procedures) + 1, subject, hadm, stay_id, start, hours_after(start, 5),
                                225792, 300, "min", "", "", start, 1, 1, 1, "Ventilation", "", "Task", 0, 0, 0,
                                "FinishedRunning", "", "", ""])

    def vasopressor(self, subject, hadm, stay_id, start: str):
        self.inputs.append([len(self.inputs) + 1, subject, hadm, stay_id, start, hours_after(start, 2), 221906,
                            1, "mg", 0.1, "mcg/kg/min", start, 1, 1, 1, "01-Drips", "", "Main order parameter",
                            "Continuous Med", 70, 1, "mg", 0, 0, 0, "FinishedRunning", "", "", "", 1, 0.1])

    def note(self, subject, hadm, date: str, text: str, category: str = "Discharge summary", iserror: str = ""):
        self.notes.append([len(self.notes) + 1, subject, hadm, date[:10], "", "", category, "Report", "",
                           iserror, text])

    def write(self, folder: Path, gz: bool = True) -> Path:
        write_table(folder, "PATIENTS", ["row_id", "subject_id", "gender", "dob", "dod", "dod_hosp", "dod_ssn",
                                         "expire_flag"], self.patients, gz)
        write_table(folder, "ADMISSIONS", ["row_id", "subject_id", "hadm_id", "admittime", "dischtime",
                                           "deathtime", "admission_type", "admission_location",
                                           "discharge_location", "insurance", "language", "religion",
                                           "marital_status", "ethnicity", "edregtime", "edouttime", "diagnosis",
                                           "hospital_expire_flag", "has_chartevents_data"], self.admissions, gz)
        write_table(folder, "ICUSTAYS", ["row_id", "subject_id", "hadm_id", "icustay_id", "dbsource",
                                         "first_careunit", "last_careunit", "first_wardid", "last_wardid",
                                         "intime", "outtime", "los"], self.stays, gz)
        write_table(folder, "CHARTEVENTS", ["row_id", "subject_id", "hadm_id", "icustay_id", "itemid",
                                            "charttime", "storetime", "cgid", "value", "valuenum", "valueuom",
                                            "warning", "error", "resultstatus", "stopped"], self.chart, gz)
        write_table(folder, "PROCEDUREEVENTS_MV", ["row_id", "subject_id", "hadm_id", "icustay_id", "starttime",
                                                   "endtime", "itemid", "value", "valueuom", "location",
                                                   "locationcategory", "storetime", "cgid", "orderid",
                                                   "linkorderid", "ordercategoryname",
                                                   "secondaryordercategoryname", "ordercategorydescription",
                                                   "isopenbag", "continueinnextdept", "cancelreason",
                                                   "statusdescription", "comments_editedby",
                                                   "comments_canceledby", "comments_date"], self.procedures, gz)
        write_table(folder, "INPUTEVENTS_MV", ["row_id", "subject_id", "hadm_id", "icustay_id", "starttime",
                                               "endtime", "itemid", "amount", "amountuom", "rate", "rateuom",
                                               "storetime", "cgid", "orderid", "linkorderid",
                                               "ordercategoryname", "secondaryordercategoryname",
                                               "ordercomponenttypedescription", "ordercategorydescription",
                                               "patientweight", "totalamount", "totalamountuom", "isopenbag",
                                               "continueinnextdept", "cancelreason", "statusdescription",
                                               "comments_editedby", "comments_canceledby", "comments_date",
                                               "originalamount", "originalrate"], self.inputs, gz)
        write_table(folder, "DIAGNOSES_ICD", ["row_id", "subject_id", "hadm_id", "seq_num", "icd9_code"],
                    self.diagnoses, gz)
        write_table(folder, "NOTEEVENTS", ["row_id", "subject_id", "hadm_id", "chartdate", "charttime",
                                           "storetime", "category", "description", "cgid", "iserror", "text"],
                    self.notes, gz)
        return folder


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole suite: the test models are tiny, and on a busy 2-core machine two
    spin-waiting OpenMP threads made training steps 10-50x slower than one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny():
    return TinyMimic3()


def synthesize_and_preprocess(root: Path, options: dict | None = None, **synth) -> Path:
    """A synthetic MIMIC-III extract (`SynthConfig(**synth)`) under root/raw, preprocessed to root/processed
    (`PreprocessConfig(**options)`)."""
    from preprocessing.pipeline import PreprocessConfig, preprocess
    from synthetic import SynthConfig, synthesize
    synthesize(SynthConfig(out=root / "raw", quiet=True, **synth))
    preprocess(PreprocessConfig(raw=root / "raw", out=root / "processed", quiet=True, **(options or {})))
    return root / "processed"


def pretrain_both(processed: Path, run: Path, d_model: int) -> Path:
    """Both pretraining stages on `processed` into `run`, 4 steps each at width `d_model`."""
    import train
    for level in ("stay", "admission"):
        train.pretrain(train.LEVELS[level](data=processed, run=run, d_model=d_model, batch_size=64, max_steps=4,
                                           quiet=True))
    return run


@pytest.fixture(scope="session")
def processed_cohort(tmp_path_factory) -> Path:
    """A small synthetic MIMIC-III extract (150 patients, seed 0), generated and preprocessed once per test
    session (about 1.5 s). Read-only: other tests share it."""
    return synthesize_and_preprocess(tmp_path_factory.mktemp("cohort"), patients=150)


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """The demo-sized synthetic cohort (`SynthConfig()` defaults: 400 patients, seed 0), processed once per
    session, for the learning checks (marked slow). Read-only."""
    return synthesize_and_preprocess(tmp_path_factory.mktemp("demo-cohort"))


@pytest.fixture(scope="session")
def pretrained_run(processed_cohort, tmp_path_factory) -> Path:
    """Both pretraining stages on `processed_cohort`, 4 steps each at width 16 (read-only; copy to change)."""
    return pretrain_both(processed_cohort, tmp_path_factory.mktemp("pretrained") / "run", d_model=16)


@pytest.fixture(scope="session")
def mimic3_processed(tmp_path_factory) -> Path:
    """The MIMIC-III demo with the open notes, preprocessed once per test session through the command line
    (`preprocess --notes`); skipped when the demo is absent. Read-only: other tests share it."""
    if not MIMIC3_DEMO.is_dir():
        pytest.skip(f"the MIMIC-III demo ({MIMIC3_DEMO}) is not present")
    from click.testing import CliRunner
    from medhmp import cli
    out = tmp_path_factory.mktemp("mimic3-demo") / "processed"
    notes = ["--notes", str(NOTES)] if NOTES.is_dir() else []
    result = CliRunner().invoke(cli, ["preprocess", "--raw", str(MIMIC3_DEMO), *notes, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(result, pattern: str = "") -> str:
    """A failed CLI call: exit status 1, no traceback, exactly one 'Error: ' line, the last, matching `pattern`."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in result.output
    return errors[0]
