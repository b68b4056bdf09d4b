"""Preprocessing end to end: the real MIMIC-III demo, bad inputs, atomic output, splits, fitting, text models."""
import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import data
from preprocessing import cohorts, extract, features
from preprocessing.pipeline import PreprocessConfig, preprocess
from conftest import MIMIC3_DEMO, NOTES, T0, hours_after, one_line_error
from medhmp import cli

needs_demo = pytest.mark.skipif(not MIMIC3_DEMO.is_dir(), reason="../shared/data/mimic3-demo not present")


@pytest.fixture(scope="module")
def demo_out(mimic3_processed):
    """The session's MIMIC-III demo folder (preprocessed from the CLI with --notes) and its meta.json."""
    return mimic3_processed, json.loads((mimic3_processed / "meta.json").read_text())


@needs_demo
def test_mimic3_demo_counts_and_attrition(demo_out):
    out, meta = demo_out
    att = {k: dict(v) for k, v in meta["attrition"].items()}
    assert att["patients"]["patients in the patients table"] == 100
    assert att["admissions"]["admissions in the admissions table"] == 129
    assert att["stays"]["ICU stays in the icustays table"] == 136
    assert att["stays"]["MetaVision (the label items are MetaVision itemids)"] == 77
    assert att["stays"]["with events in the first 48 h"] == 77
    assert att["mortality"]["alive at 48 h"] == 34          # FIDDLE's demo cohort at T = 48 h is 34 stays
    assert meta["layout"] == "mimic3" and meta["counts"]["stays"] == 77
    assert meta["notes"]["with_note"] == 129                # the paired open notes (--notes), one per admission
    assert meta["config"]["notes"] == str(NOTES) and meta["notes"]["source"].startswith(str(NOTES))
    assert 0.005 < meta["counts"]["density"] < 0.1           # sparse, as FIDDLE's ~4%
    d = data.load_processed(out)
    assert d.stays["ts_feat"].dtype == torch.int16 and len(d.stays["stay_id"]) == 77
    assert int(d.stays["ts_ptr"][-1]) == len(d.stays["ts_feat"]) == int(d.stays["ts_count"].sum())
    assert torch.equal(d.stays["ts_count"].long().sum(1), d.stays["ts_ptr"].diff())
    assert d.meta["n_features"] == len(d.meta["feature_names"]) and d.stays["static"].shape == (77, d.meta["n_static"])
    with open(out / "labels.csv", newline="") as f:        # every label row points at its own stay/admission
        rows = [r for r in csv.DictReader(f) if r["task"] in ("mortality", "readmission")]
    for task, column, table in (("mortality", "stay_id", d.stays), ("readmission", "hadm_id", d.admissions)):
        ids = np.array([int(r[column]) for r in rows if r["task"] == task])
        assert np.array_equal(table[column].numpy()[d.labels[task]["row"]], ids)


@needs_demo
def test_splits_are_disjoint_by_patient_and_cover_everyone(demo_out):
    out, _ = demo_out
    splits = json.loads((out / "splits.json").read_text())
    sets = [set(splits[n]) for n in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(sets[0] | sets[1] | sets[2]) == 100
    again = cohorts.assign_splits(np.array(sorted(sets[0] | sets[1] | sets[2])), splits["seed"], splits["fractions"])
    assert (again == 0).sum() == len(sets[0])


@needs_demo
def test_features_are_fitted_on_training_stays_only(demo_out):
    out, meta = demo_out
    d = data.load_processed(out)
    train = d.split_of(d.stays["subject_id"].numpy()) == "train"
    theta = meta["config"]["min_frequency"]
    for v in meta["features"]["variables"]:
        assert v["frequency"] >= theta      # frequencies are fractions of training stays
    # refit on all stays would give other bins: the stored ones equal a fit on the training stays alone
    hr = next(v for v in meta["features"]["variables"] if v["key"] == 100220045)
    assert hr["kind"] == "numeric" and len(hr["edges"]) == 4
    assert train.sum() < len(train)


def test_rerun_is_a_clean_overwrite_and_a_failed_run_keeps_the_old_output(tiny, tmp_path):
    tiny.patient(1)
    tiny.admission(1, 11, T0, 72)
    tiny.stay(1, 11, 111, hours_after(T0, 1), 60)
    raw = tiny.write(tmp_path / "raw")
    out = tmp_path / "out"
    cfg = PreprocessConfig(raw=raw, out=out, quiet=True)
    preprocess(cfg)
    first = (out / "stays.pt").read_bytes()
    preprocess(cfg)
    assert (out / "stays.pt").read_bytes() == first
    (raw / "ICUSTAYS.csv.gz").write_bytes(b"")             # now broken: the old output must survive
    with pytest.raises(data.InputError):
        preprocess(cfg)
    assert (out / "stays.pt").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]   # no temporary folder left


def _broken(tiny, tmp_path, change) -> Path:
    tiny.patient(1)
    tiny.patient(2)
    tiny.admission(1, 11, T0, 72)
    tiny.admission(2, 21, T0, 72)
    tiny.stay(1, 11, 111, hours_after(T0, 1), 60)
    tiny.stay(2, 21, 211, hours_after(T0, 1), 60)
    raw = tiny.write(tmp_path / "raw")
    change(raw)
    return raw


def _rewrite(raw: Path, table: str, edit):
    path = raw / f"{table}.csv.gz"
    text = gzip.decompress(path.read_bytes()).decode()
    path.write_bytes(gzip.compress(edit(text).encode()))


BAD_INPUTS = {
    "missing core table": (lambda raw: (raw / "ICUSTAYS.csv.gz").unlink(), r"missing core table ICUSTAYS"),
    "missing core column": (lambda raw: _rewrite(raw, "ADMISSIONS", lambda t: t.replace("hadm_id", "hadm", 1)),
                            r"ADMISSIONS.csv.gz: missing column 'hadm_id'"),
    "unparsable timestamp": (lambda raw: _rewrite(raw, "ADMISSIONS", lambda t: t.replace("2150-01-01 08:00:00",
                                                                                         "01/01/2150 8am", 1)),
                             r"ADMISSIONS.csv.gz: row 1, column 'admittime': cannot read '01/01/2150 8am'"),
    "duplicated id": (lambda raw: _rewrite(raw, "PATIENTS", lambda t: t.replace(",2,F,", ",1,F,")),
                      r"PATIENTS.csv.gz: row 2, column 'subject_id': duplicated id 1 \(first at row 1\)"),
    "empty file": (lambda raw: (raw / "ADMISSIONS.csv.gz").write_bytes(b""), r"ADMISSIONS.csv.gz: the file is empty"),
    "header only": (lambda raw: _rewrite(raw, "PATIENTS", lambda t: t.splitlines()[0] + "\n"),
                    r"PATIENTS.csv.gz: the table has a header but no rows"),
    "wrong layout": (lambda raw: (raw / "ADMISSIONS.csv.gz").rename(raw / "VISITS.csv.gz"), r"no known layout"),
    "corrupt gzip": (lambda raw: (raw / "DIAGNOSES_ICD.csv.gz").write_bytes(b"\x1f\x8b\x08garbage"),
                     r"DIAGNOSES_ICD.csv.gz: not a readable gzip file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tiny, tmp_path):
    change, message = BAD_INPUTS[case]
    raw = _broken(tiny, tmp_path, change)
    one_line_error(CliRunner().invoke(cli, ["preprocess", "--raw", str(raw), "--out", str(tmp_path / "out")]), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_counted_skips_for_bad_event_rows_and_missing_modalities(tiny, tmp_path):
    tiny.patient(1)
    tiny.patient(2)
    tiny.admission(1, 11, T0, 72)
    tiny.admission(2, 21, T0, 72, codes=())                  # no codes
    tiny.stay(1, 11, 111, hours_after(T0, 1), 60)
    tiny.stay(2, 21, 211, hours_after(T0, 1), 60, vitals_hours=0)   # a stay with no events
    tiny.chart_row(1, 11, 111, 220045, "yesterday", 80)             # unparsable time
    tiny.chart_row(1, 11, 111, 220210, hours_after(T0, 2), "12,5")  # unparsable number, quoted
    tiny.note(1, 11, hours_after(T0, 72), "Discharged home, stable.")
    tiny.note(1, 11, hours_after(T0, 72), "wrong note", iserror="1")
    (tmp_path / "raw").mkdir()
    raw = tiny.write(tmp_path / "raw")
    (raw / "LABEVENTS.csv.gz").write_bytes(gzip.compress(b""))      # an empty optional table
    meta = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out", quiet=True))
    assert meta["skipped"]["chartevents"]["unparsable time"] == 1
    assert meta["skipped"]["chartevents"]["unparsable number"] == 0   # "12,5" is a category, not a number
    assert meta["skipped"]["labevents"] == "empty file (optional table)"
    assert meta["skipped"]["outputevents"] == "missing (optional table)"
    assert meta["skipped"]["notes"]["error rows"] == 1
    assert dict(meta["attrition"]["stays"])["with events in the first 48 h"] == 1
    assert dict(meta["attrition"]["admissions"])["with ICD diagnosis codes"] == 1
    assert meta["notes"]["with_note"] == 1
    d = data.load_processed(tmp_path / "out")
    assert d.admissions["note_mask"].tolist() == [True, False]


def test_out_folder_that_is_not_ours_is_refused(tiny, tmp_path):
    raw = _broken(tiny, tmp_path, lambda raw: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(data.InputError, match="not a processed folder"):
        preprocess(PreprocessConfig(raw=raw, out=tmp_path / "mine", quiet=True))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def _tiny_t5(folder: Path) -> Path:
    """A randomly initialised two-layer T5 and a word-level tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
    words = ["<pad>", "</s>", "<unk>", "patient", "stable", "home", "discharged", "fever", "pain", "the"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    cfg = T5Config(vocab_size=len(words), d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8,
                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow  # imports transformers (seconds)
def test_local_t5_text_model_through_its_encoder_with_cache(tiny, tmp_path):
    tiny.patient(1)
    tiny.patient(2)
    tiny.admission(1, 11, T0, 72)
    tiny.admission(2, 21, T0, 72)
    tiny.stay(1, 11, 111, hours_after(T0, 1), 60)
    tiny.note(1, 11, hours_after(T0, 72), "the patient discharged home stable")
    tiny.note(2, 21, hours_after(T0, 72), "fever and pain")
    raw = tiny.write(tmp_path / "raw")
    model = _tiny_t5(tmp_path / "t5")
    cfg = PreprocessConfig(raw=raw, out=tmp_path / "out", text_model=str(model), quiet=True)
    meta = preprocess(cfg)
    assert meta["note_dim"] == 16 and meta["notes"]["architecture"] == "T5EncoderModel"
    d = data.load_processed(tmp_path / "out")
    note = d.admissions["note"].float()
    assert note.shape == (2, 16) and not torch.allclose(note[0], note[1])
    again = preprocess(cfg)
    assert again["notes"]["cached"] == 2
    assert torch.equal(data.load_processed(tmp_path / "out").admissions["note"], d.admissions["note"])
    unmasked = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out2", text_model=str(model),
                                                     note_pooling="mean_unmasked", note_max_tokens=12, quiet=True))
    assert unmasked["notes"]["cached"] == 0
    assert not torch.allclose(data.load_processed(tmp_path / "out2").admissions["note"].float(), note)


def test_limit_patients_is_a_deterministic_sample(tiny, tmp_path):
    for s in range(1, 11):
        tiny.patient(s)
        tiny.admission(s, s * 10, T0, 72)
        tiny.stay(s, s * 10, s * 100, hours_after(T0, 1), 60)
    raw = tiny.write(tmp_path / "raw")
    a = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "a", limit_patients=4, quiet=True))
    preprocess(PreprocessConfig(raw=raw, out=tmp_path / "b", limit_patients=4, quiet=True))
    assert a["counts"]["patients"] == 4 and a["counts"]["stays"] == 4
    assert json.loads((tmp_path / "a" / "splits.json").read_text()) == json.loads((tmp_path / "b" / "splits.json").read_text())
    shutil.rmtree(tmp_path / "a")


def test_stored_cells_round_trip_to_the_dense_hourly_matrix(tiny, tmp_path):
    """Hand-placed events come back at the right (hour, feature) cells of the densified batch, and the model's
    sparse projection reads the cells that collate wrote (the ts_idx encoding of docs/data-format.md)."""
    from models import ModelConfig, TimeSeriesEncoder, densify
    for s in (1, 2):
        tiny.patient(s)
        tiny.admission(s, s * 10, T0, 96)
        tiny.stay(s, s * 10, s * 100, T0, 72, vitals_hours=0)
        tiny.chart_row(s, s * 10, s * 100, 220045, hours_after(T0, 0.2), 70 + s)     # hour 0: numeric
        tiny.chart_row(s, s * 10, s * 100, 220045, hours_after(T0, 5.9), 90 + s)     # hour 5
        tiny.chart_row(s, s * 10, s * 100, 224641, hours_after(T0, 2.5), "Yes")      # hour 2: category
        tiny.chart_row(s, s * 10, s * 100, 224641, hours_after(T0, 50), "No")        # after 48 h: not a feature
    raw = tiny.write(tmp_path / "raw")
    meta = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out", split=(1.0, 0.0, 0.0),
                                                 min_frequency=0.0, quiet=True))
    names = meta["feature_names"]
    d = data.load_processed(tmp_path / "out")
    batch = data.StayDataset(d, [0, 1]).__getitems__([0, 1])
    x = densify(batch["ts_idx"], 2, meta["seq_len"], meta["n_features"])      # (2, T, F)
    hr, alarm = names.index("chart 220045 present"), names.index("chart 224641 present")
    assert "chart 224641 = Yes" in names and "chart 224641 = No" not in names
    yes = names.index("chart 224641 = Yes")
    for i in range(2):
        assert torch.nonzero(x[i, :, hr]).flatten().tolist() == [0, 5]
        assert torch.nonzero(x[i, :, alarm]).flatten().tolist() == [2] and x[i, 2, yes] == 1
        assert int(x[i].sum()) == 6         # 2 x (present + value bin) + (present + category)
    encoder = TimeSeriesEncoder(ModelConfig.from_meta(meta, d_model=8))
    assert torch.allclose(encoder.project(batch["ts_idx"], 2), x @ encoder.input_proj, atol=1e-6)


def test_an_admission_keeps_its_first_max_stays_stays(tiny, tmp_path):
    """An admission with more ICU stays than max_stays gives its first max_stays stays by intime, packed in
    order; fewer slots than stays never mixes in another stay."""
    tiny.patient(1)
    tiny.admission(1, 10, T0, 400)
    for k, start in enumerate((1, 100, 200)):             # three stays told apart by their charted hours
        tiny.stay(1, 10, 100 + k, hours_after(T0, start), 60, vitals_hours=10 * (k + 1))
    raw = tiny.write(tmp_path / "raw")
    preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out", split=(1.0, 0.0, 0.0), min_frequency=0.0,
                                quiet=True))
    d = data.load_processed(tmp_path / "out")
    order = d.admissions["stay_rows"].numpy()
    assert d.stays["stay_id"].numpy()[order].tolist() == [100, 101, 102]
    for max_stays in (1, 2, 3, 5):
        batch = data.AdmissionDataset(d, [0], max_stays=max_stays).__getitems__([0])
        n = min(max_stays, 3)
        assert batch["stay_mask"].tolist() == [[True] * n] and batch["static"].shape[0] == n
        first = data.collate_stay(d, torch.as_tensor(order[:n]))
        assert torch.equal(batch["ts_idx"], first["ts_idx"]) and torch.equal(batch["static"], first["static"])


def test_one_usable_admission_rule_for_pretraining_and_readmission(processed_cohort):
    """data.admission_requirements decides both the admissions of admission-level pretraining and the start of
    the readmission cohort."""
    d = data.load_processed(processed_cohort)
    usable = data.usable_admissions(d.admissions)
    rows = np.concatenate([d.pretrain_rows("admission", s) for s in data.SPLITS])
    assert 0 < len(rows) < len(usable) and np.array_equal(np.sort(rows), np.flatnonzero(usable))
    cohort = d.labels["readmission"]["row"]
    assert usable[cohort].all() and not d.admissions["died"].numpy()[cohort].any()
    steps = dict(d.meta["attrition"]["readmission"])
    assert steps["with ICD codes in the vocabulary"] == int(usable.sum())


def test_small_merge_buckets_and_chunks_change_nothing(mimic3_processed, tmp_path, monkeypatch):
    """The event store merges per bucket of stays and the features are fitted and applied chunk by chunk
    (bounded memory at MIMIC size); with buckets of 3 stays and chunks of 2,000 events (dozens of each on the
    MIMIC-III demo) every tensor and the fitted spec are exactly those of one bucket and one chunk."""
    monkeypatch.setattr(extract, "BUCKET_STAYS", 3)
    monkeypatch.setattr(features, "CHUNK_EVENTS", 2000)
    out = tmp_path / "out"
    meta = preprocess(PreprocessConfig(raw=MIMIC3_DEMO, notes=NOTES, out=out, quiet=True))
    want = json.loads((mimic3_processed / "meta.json").read_text())
    assert meta["counts"]["active_cells"] > 50 * features.CHUNK_EVENTS
    for key in ("features", "feature_names", "static_names", "counts", "attrition", "skipped", "icd_vocab"):
        assert meta[key] == want[key], key
    for name in ("stays.pt", "admissions.pt"):
        got, ref = (torch.load(d / name, weights_only=True) for d in (out, mimic3_processed))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
    assert (out / "labels.csv").read_text() == (mimic3_processed / "labels.csv").read_text()
