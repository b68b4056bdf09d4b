"""The three input layouts, read from synthetic extracts: counts must agree with what the generator wrote."""
import csv
import gzip
import json

import pytest
from click.testing import CliRunner

import data
import synthetic
from preprocessing.pipeline import PreprocessConfig, preprocess
from medhmp import cli


def _rows(path) -> list[dict]:
    with gzip.open(path, "rt", newline="") as f:
        return [{k.lower(): v for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def mimic4(tmp_path_factory):
    root = tmp_path_factory.mktemp("m4")
    summary = synthetic.synthesize(synthetic.SynthConfig(out=root / "raw", patients=60, layout="mimic4", seed=1,
                                                         quiet=True))
    meta = preprocess(PreprocessConfig(raw=root / "raw", out=root / "out", quiet=True))
    return root, summary, meta


def test_mimic4_layout_counts(mimic4):
    root, summary, meta = mimic4
    assert meta["layout"] == "mimic4"
    att = {k: dict(v) for k, v in meta["attrition"].items()}
    assert att["patients"]["patients in the patients table"] == summary["patients"] == 60
    assert att["admissions"]["admissions in the admissions table"] == summary["admissions"]
    assert att["stays"]["ICU stays in the icustays table"] == summary["stays"]
    # MIMIC-IV is all MetaVision; minors are anchored at 18 by the generator, so only the event rule removes
    assert att["stays"]["MetaVision (the label items are MetaVision itemids)"] == summary["stays"]
    diagnoses = _rows(root / "raw" / "hosp" / "diagnoses_icd.csv.gz")
    icd10 = sum(r["icd_version"] == "10" for r in diagnoses)
    assert icd10 > 0 and meta["skipped"]["diagnoses and prescriptions"]["ICD-10 rows dropped"] == icd10
    coded9 = {int(r["hadm_id"]) for r in diagnoses if r["icd_version"] == "9"}
    assert att["admissions"]["with ICD-9 diagnosis codes"] == len(coded9)
    notes = _rows(root / "raw" / "note" / "discharge.csv.gz")
    assert meta["notes"]["with_note"] == len({r["hadm_id"] for r in notes})
    assert meta["notes"]["source"].endswith("discharge.csv.gz")
    assert meta["n_features"] > 20 and meta["n_static"] > 5 and meta["note_dim"] == 768


def test_mimic4_vocabulary_is_icd9_and_built_on_training_admissions(mimic4):
    root, _, meta = mimic4
    diagnoses = _rows(root / "raw" / "hosp" / "diagnoses_icd.csv.gz")
    admissions = {int(r["hadm_id"]): int(r["subject_id"]) for r in _rows(root / "raw" / "hosp" / "admissions.csv.gz")}
    train = set(json.loads((root / "out" / "splits.json").read_text())["train"])
    expected = {r["icd_code"] for r in diagnoses if r["icd_version"] == "9" and admissions[int(r["hadm_id"])] in train}
    assert set(meta["icd_vocab"]) == expected


def test_trinetx_extract_with_a_shared_vocabulary(tmp_path):
    synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / "m3", patients=80, layout="mimic3", quiet=True))
    synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / "tx", patients=120, layout="trinetx", quiet=True))
    m3 = preprocess(PreprocessConfig(raw=tmp_path / "m3", out=tmp_path / "m3-out", quiet=True))
    tx = preprocess(PreprocessConfig(raw=tmp_path / "tx", out=tmp_path / "tx-out",
                                               vocab_from=tmp_path / "m3-out", quiet=True))
    assert tx["layout"] == "trinetx" and tx["icd_vocab"] == m3["icd_vocab"]
    assert tx["counts"]["patients"] == 120 and tx["counts"]["stays"] == 0
    assert set(tx["tasks"]) == {"hf", "copd", "amnesia"}
    for task in ("hf", "copd", "amnesia"):
        counts = tx["tasks"][task]
        cases = sum(counts[s][1] for s in ("train", "val", "test"))
        total = sum(counts[s][0] for s in ("train", "val", "test"))
        assert cases > 0 and cases < total <= 4 * cases         # up to 3 matched controls per case
    d = data.load_processed(tmp_path / "tx-out")
    ex = d.examples("hf", "train")
    batch = data.PatientDataset(d, ex["subject_id"], ex["cutoff"], ex["label"]).__getitems__(list(range(len(ex["label"]))))
    assert batch["icd"].shape[2] == len(m3["icd_vocab"]) and batch["visit_mask"].any(1).all()
    assert (batch["visit_time"][batch["visit_mask"]] >= 0).all()      # every visit ends by the cutoff
    # neither pretraining stage runs on a diagnosis extract: one line, nothing written
    for level in ("stay", "admission"):
        result = CliRunner().invoke(cli, ["pretrain", "--level", level, "--data", str(tmp_path / "tx-out"),
                                          "--run", str(tmp_path / "run"), "--epochs", "1"])
        assert result.exit_code != 0 and "no ICU stays to pretrain on" in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "run").exists()


def test_synth_command_writes_what_synthesize_writes(tmp_path):
    """`synth` from the command line: the extract of synthetic.synthesize with the same settings, byte for byte,
    and one closing line of counts; a bad option is a usage error."""
    result = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "cli"), "--patients", "40", "--layout",
                                      "mimic4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    summary = synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / "py", patients=40, layout="mimic4", seed=3,
                                                         quiet=True))
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("wrote ") and last.endswith(
        f": 40 patients, {summary['admissions']} admissions, {summary['stays']} ICU stays")

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert files(tmp_path / "cli") == files(tmp_path / "py") and files(tmp_path / "py")
    bad = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "bad"), "--patients", "0"])
    assert bad.exit_code == 2 and "--patients" in bad.output and not (tmp_path / "bad").exists()
