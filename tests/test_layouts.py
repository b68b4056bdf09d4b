"""The three input layouts, read from synthetic extracts: counts must agree with what the generator wrote."""
import csv
import gzip
import json

import numpy as np
import pytest
import torch
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
    assert icd10 > 0 and meta["icd"]["rows"] == {"ICD-9": len(diagnoses) - icd10, "ICD-10": icd10}
    coded = {v: {int(r["hadm_id"]) for r in diagnoses if r["icd_version"] == v} for v in ("9", "10")}
    assert meta["icd"]["admissions"] == {"ICD-9": len(coded["9"]), "ICD-10": len(coded["10"])}
    assert meta["icd"]["option"] == "both" and "ICD-10 rows dropped (--icd 9)" not in meta["skipped"]
    assert att["admissions"]["with ICD diagnosis codes"] == len(coded["9"] | coded["10"])
    notes = _rows(root / "raw" / "note" / "discharge.csv.gz")
    assert meta["notes"]["with_note"] == len({r["hadm_id"] for r in notes})
    assert meta["notes"]["source"].endswith("discharge.csv.gz")
    assert meta["n_features"] > 20 and meta["n_static"] > 5 and meta["note_dim"] == 768


def test_mimic4_vocabulary_has_both_systems_and_is_built_on_training_admissions(mimic4):
    root, _, meta = mimic4
    diagnoses = _rows(root / "raw" / "hosp" / "diagnoses_icd.csv.gz")
    admissions = {int(r["hadm_id"]): int(r["subject_id"]) for r in _rows(root / "raw" / "hosp" / "admissions.csv.gz")}
    train = set(json.loads((root / "out" / "splits.json").read_text())["train"])
    expected = {f"ICD{r['icd_version']}:{r['icd_code']}" for r in diagnoses if admissions[int(r["hadm_id"])] in train}
    assert set(meta["icd_vocab"]) == expected and {c.split(":")[0] for c in expected} == {"ICD9", "ICD10"}


def _cases(meta: dict, task: str) -> int:
    return sum(meta["tasks"][task][s][1] for s in ("train", "val", "test"))


def test_mimic4_icd9_only_drops_the_icd10_half_and_its_cases(mimic4, tmp_path):
    """--icd 9 (the paper's choice) drops and counts every ICD-10 row; the cases first diagnosed after a patient's
    switch to ICD-10 are then lost, while --icd both finds them and only true cases (the generator's latents)."""
    root, _, both = mimic4
    nine = preprocess(PreprocessConfig(raw=root / "raw", out=tmp_path / "out9", icd="9", quiet=True))
    icd10 = both["icd"]["rows"]["ICD-10"]
    assert nine["skipped"]["diagnoses and prescriptions"]["ICD-10 rows dropped (--icd 9)"] == icd10
    assert nine["icd"]["rows"] == {"ICD-9": both["icd"]["rows"]["ICD-9"], "ICD-10": 0}
    assert all(c.startswith("ICD9:") for c in nine["icd_vocab"])
    truth = {int(r["subject_id"]): r for r in _rows(root / "raw" / "latents" / "patients.csv.gz")}
    for task in ("hf", "copd", "amnesia"):
        assert _cases(both, task) > _cases(nine, task)
        labels = [r for r in csv.DictReader(open(root / "out" / "labels.csv")) if r["task"] == task]
        assert all(truth[int(r["subject_id"])][task] == "1" for r in labels if r["label"] == "1")


def test_icd_option_is_checked_before_reading(tmp_path):
    with pytest.raises(data.InputError, match="--icd '11' is not one of 9, 10, both"):
        preprocess(PreprocessConfig(raw=tmp_path / "nothing", out=tmp_path / "out", icd="11", quiet=True))


def test_vocab_from_an_older_format_is_refused(mimic4, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format_version": 2, "icd_vocab": ["4280"], "drug_vocab": []}))
    with pytest.raises(data.InputError, match="format version 2.*preprocess that extract again"):
        preprocess(PreprocessConfig(raw=mimic4[0] / "raw", out=tmp_path / "out", vocab_from=old, quiet=True))


def test_mimic4_note_folder_given_with_notes(mimic4, tmp_path):
    """MIMIC-IV-Note is a separate download: --notes names its folder (holding note/discharge.csv.gz), or the
    file itself; the notes read are the same as from the note/ folder beside hosp/."""
    root, _, meta = mimic4
    raw = tmp_path / "raw"
    raw.mkdir()
    for part in ("hosp", "icu"):
        (raw / part).symlink_to(root / "raw" / part)
    (tmp_path / "mimic-iv-note" / "note").mkdir(parents=True)
    note = tmp_path / "mimic-iv-note" / "note" / "discharge.csv.gz"
    note.symlink_to(root / "raw" / "note" / "discharge.csv.gz")
    for i, given in enumerate((tmp_path / "mimic-iv-note", note)):
        out = preprocess(PreprocessConfig(raw=raw, notes=given, out=tmp_path / f"out{i}", quiet=True))
        assert out["notes"]["with_note"] == meta["notes"]["with_note"] > 0
    assert preprocess(PreprocessConfig(raw=raw, out=tmp_path / "none", quiet=True))["notes"]["with_note"] == 0


def test_trinetx_extract_coded_in_icd10(tmp_path):
    """A diagnosis extract read with --icd 10: only ICD-10-CM rows are kept (the others counted), and the cases of
    every task are found from the ICD-10-CM code sets alone."""
    synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / "tx", patients=300, layout="trinetx", quiet=True))
    meta = preprocess(PreprocessConfig(raw=tmp_path / "tx", out=tmp_path / "out", icd="10", quiet=True))
    rows = _rows(tmp_path / "tx" / "diagnosis.csv.gz")
    nine = sum(r["code_system"] == "ICD-9-CM" for r in rows)
    assert meta["skipped"]["diagnoses"]["ICD-9 rows dropped (--icd 10)"] == nine > 0
    assert meta["icd"]["rows"] == {"ICD-9": 0, "ICD-10": len(rows) - nine}
    assert meta["icd_vocab"] and all(c.startswith("ICD10:") for c in meta["icd_vocab"])
    for task in ("hf", "copd", "amnesia"):
        assert _cases(meta, task) > 0


def test_trinetx_extract_with_a_shared_vocabulary(tmp_path):
    synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / "m3", patients=80, layout="mimic3", quiet=True))
    synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / "tx", patients=120, layout="trinetx", quiet=True))
    m3 = preprocess(PreprocessConfig(raw=tmp_path / "m3", out=tmp_path / "m3-out", quiet=True))
    # --icd 9: the MIMIC-III vocabulary knows no ICD-10 code, so a history coded in ICD-10 would be left empty
    tx = preprocess(PreprocessConfig(raw=tmp_path / "tx", out=tmp_path / "tx-out", icd="9",
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


def test_vocab_from_reuses_the_fitted_features(tmp_path):
    """--vocab-from a folder with ICU stays reads this extract with that folder's features too: the same extract
    gives the same tensors (a spec reused is the spec fitted), and another extract (another seed, and another
    latent world: categories numbered differently) gets the same columns, so a model pretrained on the first reads
    it; its evaluate/embed size checks pass."""
    for name, seed, dial in (("a", 0, {}), ("b", 5, {"loadings_seed": 3})):
        synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / name, patients=120, seed=seed, quiet=True, **dial))
    a = preprocess(PreprocessConfig(raw=tmp_path / "a", out=tmp_path / "a-out", quiet=True))
    again = preprocess(PreprocessConfig(raw=tmp_path / "a", out=tmp_path / "a-again", vocab_from=tmp_path / "a-out",
                                        quiet=True))
    assert again["features"] == a["features"] and again["feature_names"] == a["feature_names"]
    for f in ("stays.pt", "admissions.pt"):
        x, y = (torch.load(tmp_path / d / f, weights_only=True) for d in ("a-out", "a-again"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    fitted = preprocess(PreprocessConfig(raw=tmp_path / "b", out=tmp_path / "b-own", quiet=True))
    b = preprocess(PreprocessConfig(raw=tmp_path / "b", out=tmp_path / "b-out", vocab_from=tmp_path / "a-out",
                                    quiet=True))
    assert (b["feature_names"], b["static_names"], b["icd_vocab"]) == (a["feature_names"], a["static_names"],
                                                                        a["icd_vocab"])
    assert fitted["feature_names"] != a["feature_names"] or fitted["features"] != a["features"]
    db, dbo = data.load_processed(tmp_path / "b-out"), data.load_processed(tmp_path / "b-own")
    assert db.stays["static"].shape[1] == len(a["static_names"]) and db.meta["counts"]["stays"] == \
        dbo.meta["counts"]["stays"]
    # the same events under both specs: each stay has active cells under the reused one too
    assert (np.diff(db.stays["ts_ptr"].numpy()) > 0).mean() > 0.95
    # a categorical column reads the same category by name in both folders
    names = a["feature_names"]
    cat = next(i for i, n in enumerate(names) if " = " in n)
    own = fitted["feature_names"].index(names[cat])
    active = lambda d, c: int((d.stays["ts_feat"].numpy() == c).sum())  # noqa: E731
    assert active(db, cat) == active(dbo, own) > 0
