"""Issue 18, preprocessing side: bad input is read, or counted and warned, or stopped in one line, never lost or
mislabelled in silence. Ids written as floats, ids that do not parse, a MIMIC-IV diagnosis table without its ICD
version, ICU stays that overlap, dates before 1970, empty tables, `synth` over a user's extract, and files that are
no CSV table (a pipe, a folder, a zip, bzip2, zstd, UTF-16, one huge field, a repeated column name), on the three
layouts (MIMIC-III, MIMIC-IV, a TriNetX-style diagnosis extract) and the MIMIC-III demo."""
import bz2
import csv
import gzip
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import synthetic
from folders import InputError
from preprocessing import build, tables
from preprocessing.pipeline import PreprocessConfig, preprocess
from conftest import MIMIC3_DEMO, NOTES, T0, TinyMimic3, hours_after, one_line_error
from medhmp import cli

needs_demo = pytest.mark.skipif(not MIMIC3_DEMO.is_dir(), reason="the MIMIC-III demo (conftest.MIMIC3_DEMO) is not present")
ID_COLUMNS = ("subject_id", "hadm_id", "icustay_id", "stay_id", "itemid", "patient_id", "encounter_id")
FLAGS = ("hospital_expire_flag", "iserror", "error", "icd_version")   # 0/1 flags and the ICD version: numbers too
PATIENTS = 20      # per synthetic extract: small, so that each test runs in well under a second
LAYOUTS = [layout for layout in synthetic.LAYOUTS   # the MEDS layouts need pyarrow (requirements-meds.txt)
           if not layout.startswith("meds") or importlib.util.find_spec("pyarrow")]


# ----------------------------------------------------------------------------------------------- helpers
def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _tables(raw: Path) -> list[Path]:
    """The tables preprocessing reads (not synth's latents/)."""
    return sorted(p for p in raw.rglob("*.csv.gz") if "latents" not in p.parts)


def _edit(path: Path, column, edit) -> None:
    """Rewrite `column` (or each of several; matched case-insensitively) of the gzip table `path`: value ->
    edit(data row index, value)."""
    with gzip.open(path, "rt", newline="") as f:
        head, *rows = list(csv.reader(f))
    ks = [k for k, h in enumerate(head) if h.lower() in ((column,) if isinstance(column, str) else column)]
    for i, row in enumerate(rows):
        for k in ks:
            row[k] = edit(i, row[k])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([head, *rows])
    path.write_bytes(gzip.compress(text.getvalue().encode(), compresslevel=1))


def _as_floats(raw: Path) -> None:
    """Every id, flag and ICD version of every table written as pandas writes an integer column with blanks."""
    for path in _tables(raw):
        _edit(path, ID_COLUMNS + FLAGS, lambda i, v: f"{v}.0" if v.strip() else v)


def _read(out: Path) -> dict:
    """What a processed folder holds, less what names the run (meta.json's created, config, sources, note source)
    and meta.json's files (the bytes of the files compared here by content)."""
    meta = json.loads((out / "meta.json").read_text())
    for key in ("created", "config", "sources", "files"):
        meta.pop(key)
    meta.get("notes", {}).pop("source", None)
    for v in meta.get("features", {}).get("variables", []):   # category numbers follow the read blocks of the
        v.pop("categories", None)                                # table, and with them the order of the columns
        v["columns"] = [c for c in v["columns"] if c >= 0]       # dropped (-1); feature_names name the kept ones
    arrays = {f"{name}.{k}": v for name in ("stays", "admissions")
              for k, v in torch.load(out / f"{name}.pt", weights_only=True).items()}
    return {"meta": meta, **arrays, "labels": (out / "labels.csv").read_text(), "splits": (out / "splits.json").read_text()}


def _same(a: dict, b: dict, skip=()) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k not in skip:
            same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
            assert same, k


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def extracts(tmp_path_factory) -> dict:
    """A PATIENTS-patient synthetic extract of each layout and its processed folder (read-only; copy to change)."""
    root, found = tmp_path_factory.mktemp("extracts"), {}
    for layout in LAYOUTS:
        raw = root / layout / "raw"
        synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=PATIENTS, layout=layout, quiet=True))
        preprocess(PreprocessConfig(raw=raw, out=root / layout / "out", quiet=True))
        found[layout] = raw
    return found


@pytest.fixture
def copy(extracts, tmp_path):
    """copy(layout) -> a copy of that layout's raw extract that a test may break."""
    return lambda layout: Path(shutil.copytree(extracts[layout], tmp_path / layout))


def _clean(extracts, layout: str) -> dict:
    return _read(extracts[layout].parent / "out")


# ----------------------------------------------------------------------------- 1: ids written as floats
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_flags_and_versions_written_as_floats_are_read_as_the_integers(layout, extracts, copy, tmp_path):
    """pandas writes an integer column with blanks as floats (hadm_id 100001.0, iserror 1.0, icd_version 10.0):
    the same ids, flags and versions, so the output is the clean extract's, with no warning."""
    raw = copy(layout)
    _as_floats(raw)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not [w for w in _warnings(result.output) if "no notes" not in w], result.output
    _same(_read(tmp_path / "out"), _clean(extracts, layout))


@pytest.mark.slow
@needs_demo
def test_demo_labs_and_prescriptions_with_float_hadm_ids_lose_nothing(mimic3_processed, tmp_path):
    """The repro: LABEVENTS / PRESCRIPTIONS hadm_id as 100001.0 dropped every lab row and every drug, uncounted."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for p in MIMIC3_DEMO.glob("*.csv.gz"):
        (raw / p.name).symlink_to(p)
    for table in ("LABEVENTS", "PRESCRIPTIONS"):
        (raw / f"{table}.csv.gz").unlink()
        shutil.copy(MIMIC3_DEMO / f"{table}.csv.gz", raw / f"{table}.csv.gz")
        _edit(raw / f"{table}.csv.gz", "hadm_id", lambda i, v: f"{v}.0" if v else v)
    notes = ["--notes", NOTES] if NOTES.is_dir() else []
    result = _cli("preprocess", "--raw", raw, *notes, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    _same(_read(tmp_path / "out"), _read(mimic3_processed))


# ----------------------------------------------------------------------------- 1: ids that do not parse
BAD_IDS = {   # (layout, table, column): ids that do not parse in the first three data rows, counted and warned
    "mimic3 LABEVENTS hadm_id": ("mimic3", "LABEVENTS", "hadm_id"),
    "mimic3 PRESCRIPTIONS hadm_id": ("mimic3", "PRESCRIPTIONS", "hadm_id"),
    "mimic3 NOTEEVENTS hadm_id": ("mimic3", "NOTEEVENTS", "hadm_id"),
    "mimic3 DIAGNOSES_ICD hadm_id": ("mimic3", "DIAGNOSES_ICD", "hadm_id"),
    "mimic3 PATIENTS subject_id": ("mimic3", "PATIENTS", "subject_id"),
    "mimic3 ADMISSIONS hadm_id": ("mimic3", "ADMISSIONS", "hadm_id"),
    "mimic3 ICUSTAYS icustay_id": ("mimic3", "ICUSTAYS", "icustay_id"),
    "mimic4 icustays stay_id": ("mimic4", "icu/icustays", "stay_id"),
    "mimic4 labevents hadm_id": ("mimic4", "hosp/labevents", "hadm_id"),
    "mimic4 discharge hadm_id": ("mimic4", "note/discharge", "hadm_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_ids_that_do_not_parse_are_counted_and_warned_with_the_first(case, copy, tmp_path):
    layout, table, column = BAD_IDS[case]
    raw = copy(layout)
    bad = ["abc", "1.5", "12x"]
    _edit(raw / f"{table}.csv.gz", column, lambda i, v: bad[i] if i < 3 else v)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    line = [w for w in _warnings(result.output) if f"{table}.csv.gz" in w]
    assert len(line) == 1, result.output
    assert f"3 rows with an unparsable {column} (first at row 1, column '{column}': 'abc')" in line[0]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    name = next(n for n, s in meta["sources"].items() if s["path"].endswith(f"{table}.csv.gz"))
    assert meta["skipped"][name][f"unparsable {column}"] == 3


def test_an_itemid_that_does_not_parse_is_counted_with_its_value(copy, tmp_path):
    raw = copy("mimic3")
    _edit(raw / "CHARTEVENTS.csv.gz", "itemid", lambda i, v: "2200x5" if i % 2 else v)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: .*CHARTEVENTS.csv.gz: .*rows with an unparsable itemid \(first at row \d+, "
                     r"column 'itemid': '2200x5'\)", result.output), result.output


def test_a_table_that_loses_most_rows_says_so_first(copy, tmp_path):
    """Every lab row and every drug lost: the warning says how many of how many, and the first bad value; the
    run says it ends without drugs."""
    raw = copy("mimic3")
    for table in ("LABEVENTS", "PRESCRIPTIONS"):
        _edit(raw / f"{table}.csv.gz", "hadm_id", lambda i, v: "adm-7")
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    for table in ("LABEVENTS", "PRESCRIPTIONS"):
        assert re.search(rf"warning: .*{table}.csv.gz: ([\d,]+) of \1 rows lost \(100%\): [\d,]+ rows with an "
                         r"unparsable hadm_id \(first at row 1, column 'hadm_id': 'adm-7'\)", result.output)
    assert re.search(r"warning: no drug code is left for any admission \(.*PRESCRIPTIONS", result.output)


def test_codes_of_an_admission_not_in_the_admissions_table_are_counted(copy, tmp_path):
    raw = copy("mimic3")
    _edit(raw / "DIAGNOSES_ICD.csv.gz", "hadm_id", lambda i, v: "999999" if i < 2 else v)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "2 rows with an unknown hadm_id (first at row 1, column 'hadm_id': '999999')" in result.output


def test_no_icd_code_left_is_a_warning(copy, tmp_path):
    raw = copy("mimic3")
    _edit(raw / "DIAGNOSES_ICD.csv.gz", "icd9_code", lambda i, v: "")
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: no ICD code is left for any admission \(.*DIAGNOSES_ICD.csv.gz: [\d,]+ rows read; "
                     r"rows without code or admission [\d,]+", result.output), result.output


# ------------------------------------------------------------------------ 1: a diagnosis extract's ids
def test_diagnosis_extract_blank_and_unknown_patients_are_counted(copy, tmp_path):
    raw = copy("trinetx")
    _edit(raw / "diagnosis.csv.gz", "patient_id", lambda i, v: "" if i == 0 else "P-404" if i in (1, 2) else v)
    _edit(raw / "diagnosis.csv.gz", "encounter_id", lambda i, v: " " if i == 3 else v)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert {k: meta["skipped"]["diagnoses"][k] for k in ("blank patient_id", "blank encounter_id",
                                                          "unknown patient_id")} == {
        "blank patient_id": 1, "blank encounter_id": 1, "unknown patient_id": 2}
    assert "2 rows with an unknown patient_id (first at row 2, column 'patient_id': 'P-404')" in result.output


def test_diagnosis_extract_ids_that_are_one_number_are_two_patients(copy, tmp_path):
    """'7' and '007' are two patients: numbering them by their value would merge them."""
    raw = copy("trinetx")
    with gzip.open(raw / "patient.csv.gz", "rt") as f:
        first = f.read().splitlines()[1].split(",")[0]
    _edit(raw / "patient.csv.gz", "patient_id", lambda i, v: "00" + first if i == 1 else v)
    meta = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out", quiet=True))
    assert meta["counts"]["patients"] == PATIENTS and meta["ids"].startswith("patients numbered")


# ------------------------------------------------------------------- 1: MIMIC-IV ICD version, never guessed
def test_mimic4_diagnoses_without_icd_version_stop_naming_the_column(copy, tmp_path):
    raw = copy("mimic4")
    path = raw / "hosp" / "diagnoses_icd.csv.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()).replace(b",icd_version\n", b",version\n", 1)))
    one_line_error(_cli("preprocess", "--raw", raw, "--out", tmp_path / "out"),
                   r"diagnoses_icd.csv.gz: missing column 'icd_version'")
    assert not (tmp_path / "out").exists()


def test_mimic4_unknown_icd_versions_are_counted_and_warned(copy, tmp_path):
    raw = copy("mimic4")
    _edit(raw / "hosp" / "diagnoses_icd.csv.gz", "icd_version", lambda i, v: "ICD10")
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert re.search(r"diagnoses_icd.csv.gz: ([\d,]+) of \1 rows lost \(100%\): [\d,]+ rows with an unknown "
                     r"icd_version \(first at row 1, column 'icd_version': 'ICD10'\)", result.output), result.output
    assert "warning: no ICD code is left for any admission" in result.output


# -------------------------------------------------------------------------- 1: overlapping ICU stays
def test_a_stay_inside_another_of_its_admission_keeps_both_and_is_reported(tmp_path):
    """A 1-h stay recorded inside a 20-h one: each keeps its events (the overlap's are both stays'), the long one
    does not vanish, and the overlap is counted and warned."""
    t = TinyMimic3()
    for s in (1, 2):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72)
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 1), 60)
    t.patient(3)
    t.admission(3, 31, T0, 72)
    t.stay(3, 31, 301, hours_after(T0, 1), 20)                        # hourly events for 20 h
    t.stay(3, 31, 302, hours_after(T0, 6), 1)                         # inside it, from hour 5 to 6
    result = _cli("preprocess", "--raw", t.write(tmp_path / "raw"), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "warning: 1 pairs of ICU stays of one admission overlap in time (first: stays 301 and 302)" in result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["overlapping_stays"]["pairs"] == 1
    assert dict(meta["attrition"]["stays"])["with events in the first 48 h"] == 4
    stays = torch.load(tmp_path / "out" / "stays.pt", weights_only=True)
    hours = {int(s): int((c > 0).sum()) for s, c in zip(stays["stay_id"], stays["ts_count"])}
    assert hours[301] == 20 and hours[302] == 1                        # 301: the overlap's hour 5 too


def test_stay_index_deals_overlapping_stays_into_layers():
    from preprocessing.extract import StayIndex
    hadm = np.array([5, 5, 5, 7])
    intime, outtime = np.array([0, 60, 600, 0]), np.array([1200, 120, 700, 100])
    index = StayIndex(hadm, intime, outtime)
    assert sorted(index.overlaps) == [(0, 1), (0, 2)]
    event, stay, since = index.match(np.array([5, 5, 5, 7, 5]), np.array([30, 90, 650, 50, 1300]))
    assert sorted(zip(event.tolist(), stay.tolist())) == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 2), (3, 3)]
    assert since[(event == 1) & (stay == 1)].tolist() == [30]


# ----------------------------------------------------------------------------------- 1: dates before 1970
def _shift_years(raw: Path, years: int) -> None:
    """Every date of every table moved `years` back (MIMIC's shifted years 2100-2200 land in 1800-1900, where
    leap years fall alike)."""
    date = re.compile(rb"(?<![\d.])(\d{4})-(\d\d)-(\d\d)")
    for path in _tables(raw):
        text = date.sub(lambda m: b"%04d-%s-%s" % (int(m[1]) - years, m[2], m[3]), gzip.decompress(path.read_bytes()))
        path.write_bytes(gzip.compress(text, compresslevel=1))


def _same_but_times(shifted: dict, clean: dict) -> None:
    """The same folder but for the times themselves (and the notes, whose text holds dates)."""
    _same(shifted, clean, skip=("admissions.admittime", "admissions.dischtime", "stays.intime", "labels",
                                "admissions.note"))
    cut = [re.sub(r",[-\d.]+$", "", line) for line in clean["labels"].splitlines()]
    assert [re.sub(r",[-\d.]+$", "", line) for line in shifted["labels"].splitlines()] == cut


def test_an_extract_shifted_before_1970_gives_the_same_cohort(extracts, copy, tmp_path):
    """Negative minutes (before 1970) once collided with the -1 'missing' marker: every stay lost its outtime."""
    raw = copy("mimic3")
    _shift_years(raw, 300)
    preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out", quiet=True))
    _same_but_times(_read(tmp_path / "out"), _clean(extracts, "mimic3"))


@pytest.mark.slow
@needs_demo
def test_the_demo_shifted_300_years_back_gives_the_same_cohort(tmp_path):
    raw = Path(shutil.copytree(MIMIC3_DEMO, tmp_path / "raw", ignore=shutil.ignore_patterns("*.txt", "*.md", "*.tsv")))
    preprocess(PreprocessConfig(raw=MIMIC3_DEMO, out=tmp_path / "clean", quiet=True))
    _shift_years(raw, 300)
    preprocess(PreprocessConfig(raw=raw, out=tmp_path / "shifted", quiet=True))
    _same_but_times(_read(tmp_path / "shifted"), _read(tmp_path / "clean"))


# ------------------------------------------------------------------------------ 1: empty optional tables
@pytest.mark.parametrize("table", ["CHARTEVENTS", "PRESCRIPTIONS", "NOTEEVENTS", "D_ITEMS"])
def test_an_empty_optional_table_is_left_out_with_a_warning_at_the_end(table, copy, tmp_path):
    raw = copy("mimic3")
    (raw / f"{table}.csv.gz").write_bytes(b"")                     # a failed download
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("wrote "))
    assert any(re.search(rf"warning: .*{table}.csv.gz: the file is empty \(no header line\); the table was left out",
                         line) for line in lines[end:]), result.output


def test_a_present_event_table_with_no_rows_is_said(copy, tmp_path):
    raw = copy("mimic3")
    path = raw / "OUTPUTEVENTS.csv.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()).split(b"\n")[0] + b"\n"))
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: .*OUTPUTEVENTS.csv.gz: it has a header but no rows", result.output)


# ------------------------------------------------------------------- 1: a patient without an age or a year
@pytest.mark.parametrize("layout, table, column", [("mimic4", "hosp/patients", "anchor_age"),
                                                   ("trinetx", "patient", "year_of_birth")])
def test_a_patient_without_an_age_is_a_counted_skip(layout, table, column, copy, tmp_path):
    raw = copy(layout)
    _edit(raw / f"{table}.csv.gz", column, lambda i, v: "" if i == 0 else v)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"1 rows with an unreadable {column} (first at row 1, column '{column}': '')" in result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["counts"]["patients"] == PATIENTS - 1 and meta["skipped"]["patients"] == {f"unreadable {column}": 1}


# --------------------------------------------------------------------------- 2: synth and a user's files
def test_synth_never_replaces_an_extract_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "ADMISSIONS.csv.gz").write_bytes(b"the user's own table")
    (out / "hosp").mkdir()
    (out / "hosp" / "patients.csv.gz").write_bytes(b"another")
    one_line_error(_cli("synth", "--out", out, "--patients", 5),
                   re.escape(f"{out} holds an extract that synth did not write; pass --overwrite to replace it"))
    assert (out / "ADMISSIONS.csv.gz").read_bytes() == b"the user's own table"
    result = _cli("synth", "--out", out, "--patients", 5, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / synthetic.MARKER).is_file() and not (out / "hosp").exists()
    assert _cli("synth", "--out", out, "--patients", 6).exit_code == 0   # its own extract: replaced unasked


# ---------------------------------------------------------------------- 3: files that are no CSV table
def _bz(text):
    return bz2.compress(text)


def _zip(text):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("CHARTEVENTS.csv", text)
    return buf.getvalue()


NOT_CSV = {   # what CHARTEVENTS.csv.gz is -> (its bytes from the CSV text, what the one line says)
    "a zip": (_zip, r"CHARTEVENTS.csv.gz: a zip archive .*, not a CSV table; expected UTF-8 CSV text"),
    "bzip2": (_bz, r"CHARTEVENTS.csv.gz: a bzip2 file, not a CSV table; .*recompress it with gzip"),
    "zstd": (lambda text: b"\x28\xb5\x2f\xfd" + os.urandom(64), r"CHARTEVENTS.csv.gz: a zstd file, not a CSV table"),
    "UTF-16": (lambda text: text.decode().encode("utf-16"), r"CHARTEVENTS.csv.gz: UTF-16 text, not a CSV table; "
                                                            r".*iconv -f UTF-16 -t UTF-8"),
    "UTF-16 in gzip": (lambda text: gzip.compress(text.decode().encode("utf-16-le")),
                       r"CHARTEVENTS.csv.gz: a gzip file of binary data or UTF-16 text \(NUL bytes\)"),
}


@pytest.mark.parametrize("case", sorted(NOT_CSV))
def test_a_table_that_is_no_csv_text_is_named_in_one_line(case, tiny_raw, tmp_path):
    make, message = NOT_CSV[case]
    path = tiny_raw / "CHARTEVENTS.csv.gz"
    path.write_bytes(make(gzip.decompress(path.read_bytes())))
    one_line_error(_cli("preprocess", "--raw", tiny_raw, "--out", tmp_path / "out"), message)


def test_a_table_that_is_a_folder_is_named_in_one_line(tiny_raw, tmp_path):
    (tiny_raw / "CHARTEVENTS.csv.gz").unlink()
    (tiny_raw / "CHARTEVENTS.csv.gz").mkdir()
    one_line_error(_cli("preprocess", "--raw", tiny_raw, "--out", tmp_path / "out"),
                   r"CHARTEVENTS.csv.gz: a folder, not a table; expected a CSV file")


def test_an_unreadable_table_is_named_in_one_line(tiny_raw, tmp_path, monkeypatch):
    def denied(path, *args, **kwargs):      # root ignores chmod: the refusal is simulated
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(tables, "open", denied, raising=False)
    one_line_error(_cli("preprocess", "--raw", tiny_raw, "--out", tmp_path / "out"),
                   r"PATIENTS.csv.gz: cannot be read \(Permission denied\)")


def test_a_repeated_column_name_stops_naming_it(tiny_raw, tmp_path):
    path = tiny_raw / "CHARTEVENTS.csv.gz"
    text = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(text.replace(b",valuenum,", b",VALUE,", 1)))
    one_line_error(_cli("preprocess", "--raw", tiny_raw, "--out", tmp_path / "out"),
                   r"CHARTEVENTS.csv.gz: column 'value' appears twice in the header \(columns 9 and 10\)")


def test_a_table_separated_by_semicolons_says_so(tiny_raw, tmp_path):
    path = tiny_raw / "ADMISSIONS.csv.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()).replace(b",", b";")))
    one_line_error(_cli("preprocess", "--raw", tiny_raw, "--out", tmp_path / "out"),
                   r"ADMISSIONS.csv.gz: missing column 'subject_id' .*\(separated by semicolons\? expected commas\)")


def test_a_table_that_is_a_named_pipe_is_read_once(tmp_path):
    """A pipe (streamed decompression) can be read once: sniffing its first bytes on a first open hung forever."""
    fifo = tmp_path / "CHARTEVENTS.csv"
    os.mkfifo(fifo)
    text = b"hadm_id,itemid\n" + b"".join(b"%d,220045\n" % i for i in range(1000))
    writer = threading.Thread(target=lambda: fifo.write_bytes(gzip.compress(text)), daemon=True)
    writer.start()

    def hung(signum, frame):
        raise TimeoutError("the pipe was opened twice")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        table, src = tables.read_table(fifo, {"hadm_id": True, "itemid": True})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(table["hadm_id"]) == 1000 and src.rows == 1000


def test_a_line_over_the_record_limit_stops_without_talking_of_quotes(tmp_path):
    path = tmp_path / "CHARTEVENTS.csv"
    huge = b"x" * (tables.MAX_RECORD_BYTES + (1 << 20))             # one unquoted field of 5 MiB
    path.write_bytes(b"hadm_id,value\n1,a\n2," + huge + b"\n3,c\n")
    with pytest.raises(InputError) as err:
        list(tables.read_blocks(tables.Source(path), {"value": True}))
    assert "row 2 runs over 4 MiB without a line break" in str(err.value) and "quot" not in str(err.value)


def test_a_field_over_the_field_limit_skips_its_row_not_the_memory(tmp_path):
    """A column is gathered as one fixed-width array: one long field would widen every row of its block."""
    path = tmp_path / "LABEVENTS.csv"
    rows = [b"%d,7.5" % i for i in range(20000)]
    rows[100] = b"100," + b"9" * (2 * tables.MAX_FIELD_BYTES)
    path.write_bytes(b"hadm_id,value\n" + b"\n".join(rows) + b"\n")
    table, src = tables.read_table(path, {"hadm_id": True, "value": True})
    assert len(table["value"]) == 19999 and table["value"].itemsize == 3
    assert src.skipped == {f"field over {tables.MAX_FIELD_BYTES} bytes": 1}
    assert src.first_skipped[f"field over {tables.MAX_FIELD_BYTES} bytes"].startswith("row 101, column 'value'")


# ------------------------------------------------------------------------------ 3: --notes, no ICU stays
@pytest.fixture
def tables_unread(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a table was read before --notes was checked")
    monkeypatch.setattr(build, "load_core", fail)
    monkeypatch.setattr(build, "load_trinetx", fail)


def test_a_mistyped_notes_path_fails_before_any_table_is_read(tiny_raw, tmp_path, tables_unread):
    one_line_error(_cli("preprocess", "--raw", tiny_raw, "--notes", tmp_path / "nots", "--out", tmp_path / "out"),
                   r"nots: no NOTEEVENTS\*.csv\[.gz\] or discharge.csv\[.gz\] found for --notes")
    assert not (tmp_path / "out").exists()


def test_notes_for_a_diagnosis_extract_are_refused(extracts, tmp_path, tables_unread):
    one_line_error(_cli("preprocess", "--raw", extracts["trinetx"], "--notes", NOTES, "--out", tmp_path / "out"),
                   r"a diagnosis extract has no admissions to attach notes to")


def test_a_mimic_folder_without_icu_stays_gets_advice_that_fits(tmp_path):
    t = TinyMimic3()
    for s in (1, 2):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72)
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 1), 60, dbsource="carevue")
    result = _cli("preprocess", "--raw", t.write(tmp_path / "raw"), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    line = next(w for w in _warnings(result.output) if "no ICU stay is left" in w)
    assert "every stay is CareVue" in line and "diagnosis extract" not in line and "--vocab-from" not in line


@pytest.fixture
def tiny_raw(tmp_path) -> Path:
    t = TinyMimic3()
    for s in (1, 2):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72)
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 1), 60)
    return t.write(tmp_path / "raw")
