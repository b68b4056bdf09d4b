"""MEDS in and out (docs/meds.md): one synthetic cohort written as MIMIC-IV CSV and as MEDS preprocesses to the same
folder up to what the format changes; bad MEDS input is one line or a counted skip; the cohorts come out as MEDS
label files. Skipped without pyarrow (requirements-meds.txt)."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from conftest import one_line_error                        # noqa: E402
from data import InputError                                # noqa: E402
from medhmp import cli                                     # noqa: E402
from preprocessing.meds_profile import builtin_profiles    # noqa: E402
from preprocessing.pipeline import PreprocessConfig, preprocess   # noqa: E402
from synthetic import MARKER, SynthConfig, synthesize      # noqa: E402

PATIENTS, SEED = 40, 1


def _meds(root, layout="meds", etl="0.1.0", patients=PATIENTS, keep_splits=False):
    synthesize(SynthConfig(out=root, patients=patients, layout=layout, seed=SEED, meds_etl=etl, quiet=True))
    if not keep_splits:     # our hash split, as on the CSV side: features are fitted on the training split
        (root / "metadata" / "subject_splits.parquet").unlink()
    return root


@pytest.fixture(scope="module")
def csv_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    synthesize(SynthConfig(out=root / "raw", patients=PATIENTS, layout="mimic4", seed=SEED, quiet=True))
    preprocess(PreprocessConfig(raw=root / "raw", out=root / "out", quiet=True))
    return root / "out"


@pytest.fixture(scope="module")
def meds_root(tmp_path_factory):
    """The same cohort as MEDS (MIMIC_IV_MEDS 0.1.0 lab codes), read-only."""
    return _meds(tmp_path_factory.mktemp("meds") / "raw")


@pytest.fixture(scope="module")
def meds_folder(meds_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("meds-out") / "out"
    preprocess(PreprocessConfig(raw=meds_root, out=out, quiet=True))
    return out


def _cells(folder) -> set:
    """(stay_id, hour, feature name) of every active cell of a processed folder."""
    meta, stays = json.loads((folder / "meta.json").read_text()), torch.load(folder / "stays.pt")
    names, out = meta["feature_names"], set()
    ptr, count, feat = stays["ts_ptr"].numpy(), stays["ts_count"].numpy(), stays["ts_feat"].numpy()
    for i, stay in enumerate(stays["stay_id"].tolist()):
        hours = np.repeat(np.arange(meta["seq_len"]), count[i])
        out |= {(stay, int(h), names[int(f)]) for h, f in zip(hours, feat[ptr[i]:ptr[i + 1]])}
    return out


def _same_folders(a, b) -> None:
    """Processed folders of one cohort agree: splits, labels, codes, admissions (notes included), stays' static
    vectors and every active cell, except (the format's difference) the datetimeevents variables, which no MEDS
    ETL extracts. Stays are compared by stay_id: a MEDS folder lists them in the order of its data files."""
    for name in ("splits.json",):
        assert {k: v for k, v in json.loads((a / name).read_text()).items() if k != "method"} == \
               {k: v for k, v in json.loads((b / name).read_text()).items() if k != "method"}
    assert sorted(csv.reader(open(a / "labels.csv"))) == sorted(csv.reader(open(b / "labels.csv")))
    ma, mb = (json.loads((f / "meta.json").read_text()) for f in (a, b))
    for key in ("icd_vocab", "drug_vocab", "static_names", "n_static"):
        assert ma[key] == mb[key], key
    assert ma["notes"]["with_note"] == mb["notes"]["with_note"] > 0
    assert [f for f in ma["feature_names"] if not f.startswith("datetime ")] == mb["feature_names"]
    adm_a, adm_b = torch.load(a / "admissions.pt"), torch.load(b / "admissions.pt")
    for key in set(adm_a) - {"stay_rows"}:
        assert torch.equal(adm_a[key], adm_b[key]), key
    sa, sb = torch.load(a / "stays.pt"), torch.load(b / "stays.pt")
    oa, ob = np.argsort(sa["stay_id"].numpy()), np.argsort(sb["stay_id"].numpy())
    for key in ("stay_id", "hadm_id", "subject_id", "static"):
        assert torch.equal(sa[key][oa], sb[key][ob]), key
    assert {c for c in _cells(a) if not c[2].startswith("datetime ")} == _cells(b)


def test_meds_preprocesses_to_the_csv_folder(csv_folder, meds_folder):
    _same_folders(csv_folder, meds_folder)
    meta = json.loads((meds_folder / "meta.json").read_text())
    assert meta["layout"] == "meds" and meta["meds"]["profile"] == "mimic-iv-0.1"
    assert meta["config"]["meds_profile"] is None and "meds_profile" not in \
        json.loads((csv_folder / "meta.json").read_text())["config"]
    assert not meta["meds"]["unknown_codes"] and meta["sources"]["meds"]["files"] == 3


@pytest.mark.slow
def test_meds_with_the_older_lab_codes_too(csv_folder, tmp_path):
    """MIMIC_IV_MEDS up to 0.0.7 codes hospital labs LAB//{itemid}//{unit} like chart events: the mimic-iv-0.0
    profile tells them apart by itemid, and the folder is the same."""
    out = tmp_path / "out"
    meta = preprocess(PreprocessConfig(raw=_meds(tmp_path / "raw", etl="0.0.7"), out=out, quiet=True))
    assert meta["meds"]["profile"] == "mimic-iv-0.0"
    _same_folders(csv_folder, out)


def test_splits_come_from_subject_splits(tmp_path):
    root = _meds(tmp_path / "raw", keep_splits=True)
    meta = preprocess(PreprocessConfig(raw=root, out=tmp_path / "out", quiet=True))
    table = pq.read_table(root / "metadata" / "subject_splits.parquet").to_pylist()
    theirs = {r["subject_id"]: r["split"] for r in table}
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert splits["method"].endswith("subject_splits.parquet")
    for ours, name in (("train", "train"), ("val", "tuning"), ("test", "held_out")):
        assert splits[ours] == sorted(s for s, n in theirs.items() if n == name)
    assert meta["meds"]["splits"]["subjects not in it (our split)"] == 0


def test_label_files_hold_every_example_at_its_prediction_time(meds_root, meds_folder):
    """OUT/meds_labels/<task>/<split>.parquet: labels.csv's examples, split as ours (val -> tuning, test ->
    held_out), at the inclusive end of the data the model uses (a stay task: 1 us before intime + 48 h)."""
    labels = list(csv.DictReader(open(meds_folder / "labels.csv")))
    splits = json.loads((meds_folder / "splits.json").read_text())
    names = {"train": "train", "val": "tuning", "test": "held_out"}
    split_of = {s: names[k] for k in names for s in splits[k]}
    events = pq.read_table(meds_root / "data").to_pylist()
    intime = {e["icustay_id"]: e["time"] for e in events if e["code"].startswith("ICU_ADMISSION//")}
    for task in {r["task"] for r in labels}:
        mine = [r for r in labels if r["task"] == task]
        got = []
        for split in names.values():
            table = pq.read_table(meds_folder / "meds_labels" / task / f"{split}.parquet")
            assert table.schema.names == ["subject_id", "prediction_time", "boolean_value"]
            assert str(table.schema.field("prediction_time").type) == "timestamp[us]"
            got += [(r["subject_id"], split, r["boolean_value"], r["prediction_time"]) for r in table.to_pylist()]
        assert sorted((s, p, b) for s, p, b, _ in got) == sorted(
            (int(r["subject_id"]), split_of[int(r["subject_id"])], r["label"] == "1") for r in mine)
        if mine[0]["level"] == "stay":
            stay = next(r for r in mine)
            start = intime[int(stay["stay_id"])].replace(second=0, microsecond=0)
            times = {t for s, _, _, t in got if s == int(stay["subject_id"])}
            assert (start + np.timedelta64(48, "h").item() - np.timedelta64(1, "us").item()) in times


# ------------------------------------------------------------------------------------------- bad input
def _rewrite(source, target, change) -> None:
    """A copy of the MEDS root `source` at `target` whose events are one table passed through `change(table)`
    (returning {file name: table}); metadata copied."""
    import shutil
    shutil.copytree(source / "metadata", target / "metadata")
    (target / "data").mkdir(parents=True)
    for name, table in change(pq.read_table(source / "data")).items():
        pq.write_table(table, target / "data" / name)


def _run(raw, out, *extra):
    return CliRunner().invoke(cli, ["preprocess", "--raw", str(raw), "--out", str(out), *extra])


def test_a_subject_split_across_files_unsorted_times_and_null_codes_are_counted(meds_root, meds_folder, tmp_path):
    """Rows of a subject already read from another file are skipped and counted; a subject whose events are out of
    time order is counted and read all the same (the folder is unchanged); null codes are skipped and counted."""
    def change(table):
        subject = table["subject_id"].to_numpy()
        first = subject == subject[0]
        rows = np.arange(len(subject))
        shuffled = np.concatenate([rng.permutation(rows[first]), rows[~first]])    # the first subject unsorted
        table = table.take(shuffled)
        code = table["code"].to_pylist()
        code[0] = None                                                             # a null code
        table = table.set_column(2, "code", pa.array(code, pa.string()))
        again = table.filter(pa.array(subject[shuffled] == subject[-1]))          # the last subject, twice
        return {"a.parquet": table, "b.parquet": again}
    rng = np.random.default_rng(0)
    _rewrite(meds_root, tmp_path / "raw", change)
    result = _run(tmp_path / "raw", tmp_path / "out")
    assert result.exit_code == 0, result.output
    skipped = json.loads((tmp_path / "out" / "meta.json").read_text())["meds"]["skipped"]
    n_last = pq.read_table(tmp_path / "raw" / "data" / "b.parquet").num_rows
    assert skipped["rows of subjects already read (a subject split across files, or not contiguous)"] == n_last
    assert skipped["subjects with events out of time order (read all the same)"] == 1
    assert skipped["rows with a null code or subject_id"] == 1
    assert "warning:" in result.output and "split across files" in result.output


DAYS_400_YEARS = 146_097     # 400 Gregorian years: every calendar date, and so every age, is unchanged


def _stay_rows(folder) -> dict:
    """{stay_id: (hour, feature name) cells} of a processed folder."""
    out = {}
    for stay, hour, name in _cells(folder):
        out.setdefault(stay, set()).add((hour, name))
    return out


def test_times_before_1970_are_times(meds_root, meds_folder, tmp_path):
    """Every time moved back 400 years (negative minutes): the same cohorts, labels, static vectors and cells,
    since a missing time is tables.NO_TIME, never -1 (issue 18, as in the CSV reader)."""
    shift = DAYS_400_YEARS * 86_400 * 10 ** 6

    def change(table):
        time = pa.compute.subtract(table["time"].cast(pa.int64()), shift).cast(pa.timestamp("us"))
        return {"0.parquet": table.set_column(1, "time", time)}
    import pyarrow.compute                                               # noqa: F401  (pa.compute)
    _rewrite(meds_root, tmp_path / "raw", change)
    preprocess(PreprocessConfig(raw=tmp_path / "raw", out=tmp_path / "out", quiet=True))
    old, new = (sorted(tuple(r[:6]) for r in csv.reader(open(f / "labels.csv")))   # less the cutoff
                for f in (meds_folder, tmp_path / "out"))
    assert old == new and len(old) > 100
    assert _cells(meds_folder) == _cells(tmp_path / "out")
    sa, sb = torch.load(meds_folder / "stays.pt"), torch.load(tmp_path / "out" / "stays.pt")
    oa, ob = np.argsort(sa["stay_id"].numpy()), np.argsort(sb["stay_id"].numpy())   # one file here, three there
    assert torch.equal(sa["stay_id"][oa], sb["stay_id"][ob]) and torch.equal(sa["static"][oa], sb["static"][ob])


def test_overlapping_stays_and_a_stay_without_discharge(meds_root, meds_folder, tmp_path):
    """As in the CSV reader (issue 18): an ICU stay inside another stay of its subject gets the events of its
    hours too (each stay its own copy; meta.json overlapping_stays and one warning line at the end of the run);
    a stay without its ICU discharge has no outtime (NO_TIME) and leaves at the step 'with an outtime'."""
    featurised = torch.load(meds_folder / "stays.pt")["stay_id"].tolist()
    new_id = 39_999_999

    def change(table):
        icu = table.filter(pa.compute.starts_with(table["code"], "ICU_ADMISSION//")).to_pylist()
        host = next(r for r in icu if r["icustay_id"] in featurised)
        other = next(r for r in icu if r["icustay_id"] in featurised and r["subject_id"] != host["subject_id"])
        hour = np.timedelta64(1, "h").item()
        extra = [dict(host, time=host["time"] + 2 * hour, icustay_id=new_id),
                 dict(host, time=host["time"] + 20 * hour, icustay_id=new_id, code="ICU_DISCHARGE//UNK")]
        its = pa.compute.equal(table["icustay_id"], other["icustay_id"]).fill_null(False)
        keep = pa.compute.invert(pa.compute.and_(pa.compute.starts_with(table["code"], "ICU_DISCHARGE//"), its))
        table = pa.concat_tables([table.filter(keep), pa.Table.from_pylist(extra, schema=table.schema)])
        stays.update(host=host["icustay_id"], other=other["icustay_id"])
        return {"0.parquet": table.sort_by([("subject_id", "ascending"), ("time", "ascending")])}
    import pyarrow.compute                                               # noqa: F401  (pa.compute)
    stays = {}
    _rewrite(meds_root, tmp_path / "raw", change)
    result = _run(tmp_path / "raw", tmp_path / "out")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["overlapping_stays"]["pairs"] == 1 and set(meta["overlapping_stays"]["first"]) == \
        {stays["host"], new_id}
    tail = result.output[result.output.index("wrote "):]
    assert "warning: 1 pairs of ICU stays of one subject overlap" in tail
    cells = _stay_rows(tmp_path / "out")
    charted = {(h, f) for h, f in cells[new_id] if f.startswith("chart ")}
    assert charted and charted == {(h - 2, f) for h, f in cells[stays["host"]] if f.startswith("chart ")
                                   and 2 <= h < 20}
    steps = {name: n for name, n in meta["attrition"]["stays"]}
    before = {name: n for name, n in json.loads((meds_folder / "meta.json").read_text())["attrition"]["stays"]}
    names = [name for name, _ in meta["attrition"]["stays"]]
    step = names.index("with an outtime")
    lost, lost_before = (s[names[step - 1]] - s["with an outtime"] for s in (steps, before))
    assert lost == lost_before + 1 and stays["other"] not in cells


def test_a_missing_column_or_a_wrong_type_is_one_line(meds_root, tmp_path):
    _rewrite(meds_root, tmp_path / "raw", lambda t: {"0.parquet": t.drop_columns(["code"])})
    one_line_error(_run(tmp_path / "raw", tmp_path / "out"), r"0\.parquet: missing column 'code'")
    _rewrite(meds_root, tmp_path / "raw2", lambda t: {"0.parquet": t.set_column(
        1, "time", pa.array([str(x) for x in t["time"].to_pylist()]))})
    one_line_error(_run(tmp_path / "raw2", tmp_path / "out"), r"column 'time' is string, not of the MEDS type")
    assert not (tmp_path / "out").exists()


def test_profiles_unknown_names_files_and_codes(meds_root, tmp_path):
    one_line_error(_run(meds_root, tmp_path / "out", "--meds-profile", "nosuch"),
                   r"--meds-profile nosuch: neither a built-in profile \(eicu, mimic-iv-0.0, mimic-iv-0.1\)")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "admission_id": "hadm_id", "rules": [{"role": "labs", "code": "LAB//.*"}]}))
    one_line_error(_run(meds_root, tmp_path / "out", "--meds-profile", str(bad)), r"bad\.json: rule 1 needs a role")
    # a user's profile that maps less: the codes no rule matches are counted and named
    profile = json.loads(builtin_profiles()["mimic-iv-0.1"].read_text())
    profile["rules"] = [r for r in profile["rules"] if not r["code"].startswith("SUBJECT_FLUID_OUTPUT")]
    (tmp_path / "mine.json").write_text(json.dumps(profile))
    meta = preprocess(PreprocessConfig(raw=meds_root, out=tmp_path / "out", meds_profile=str(tmp_path / "mine.json"),
                                       quiet=True))
    n_output = sum(c.startswith("SUBJECT_FLUID_OUTPUT") for c in pq.read_table(meds_root / "data")["code"].to_pylist())
    assert meta["meds"]["skipped"]["rows of codes no profile rule matches"] == n_output > 0
    assert all(c.startswith("SUBJECT_FLUID_OUTPUT//") for c in meta["meds"]["unknown_codes"])
    assert not any(f.startswith("output ") for f in meta["feature_names"])


def test_no_dataset_json_needs_a_profile(meds_root, tmp_path):
    _rewrite(meds_root, tmp_path / "raw", lambda t: {"0.parquet": t})
    (tmp_path / "raw" / "metadata" / "dataset.json").unlink()
    one_line_error(_run(tmp_path / "raw", tmp_path / "out"), r"no built-in profile fits; pass --meds-profile")
    assert _run(tmp_path / "raw", tmp_path / "out", "--meds-profile", "mimic-iv-0.1").exit_code == 0


@pytest.fixture(scope="module")
def eicu_root(tmp_path_factory):
    return _meds(tmp_path_factory.mktemp("eicu") / "raw", layout="meds-eicu", patients=80, keep_splits=True)


def test_the_eicu_hadm_id_trap_is_one_line(eicu_root, tmp_path):
    """eICU's hadm_id holds the hospital's id: read as admissions (a MIMIC profile), one id spans subjects."""
    one_line_error(_run(eicu_root, tmp_path / "out", "--meds-profile", "mimic-iv-0.1"),
                   r"admission id hadm_id=\d+ belongs to subjects \d+ and \d+.*use --meds-profile eicu")


def test_without_pyarrow_a_meds_root_is_one_line(meds_root, tmp_path, monkeypatch):
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.compute"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    with pytest.raises(InputError, match=r"needs pyarrow, which is not installed: pip install -r requirements-meds"):
        preprocess(PreprocessConfig(raw=meds_root, out=tmp_path / "out", quiet=True))
    from preprocessing.meds_write import write_labels
    assert write_labels(tmp_path / "labels", None).startswith("note: pyarrow is not installed")


# ------------------------------------------------------------------------------------------- eICU
@pytest.mark.slow
def test_eicu_stay_tasks_and_pretraining_end_to_end(eicu_root, tmp_path):
    """An eICU-shaped extract (a subject per hospital stay, the hospital id in hadm_id, vitals, named labs,
    treatments): preprocess -> pretrain the stay level -> evaluate mortality, from the command line. ARF and
    shock come from the ventilation and vasopressor treatments; readmission and the patient tasks are not
    labelled (no patient is followed across hospital stays)."""
    runner, out, run = CliRunner(), tmp_path / "out", tmp_path / "run"
    for args in (["preprocess", "--raw", str(eicu_root), "--out", str(out)],
                 ["pretrain", "--level", "stay", "--data", str(out), "--run", str(run), "--max-steps", "2",
                  "--d-model", "16", "--batch-size", "16"],
                 ["evaluate", "--task", "mortality", "--data", str(out), "--run", str(run), "--seeds", "1",
                  "--epochs", "1", "--init", "stay"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["meds"]["profile"] == "eicu" and set(meta["tasks"]) == {"arf", "shock", "mortality"}
    assert all(sum(meta["tasks"][t][s][1] for s in ("train", "val", "test")) > 0 for t in meta["tasks"])
    assert (run / "eval" / "mortality.json").is_file()


@pytest.mark.slow
def test_eicu_stay_labels_are_the_mimic_labels_of_the_same_stays(eicu_root, tmp_path):
    """The same cohort as MIMIC-IV CSV: every stay both folders label gets the same ARF, shock and mortality label
    (ventilation and vasopressor treatments mark the onsets the MetaVision items mark)."""
    synthesize(SynthConfig(out=tmp_path / "csv", patients=80, layout="mimic4", seed=SEED, quiet=True))
    preprocess(PreprocessConfig(raw=tmp_path / "csv", out=tmp_path / "a", quiet=True))
    preprocess(PreprocessConfig(raw=eicu_root, out=tmp_path / "b", quiet=True))

    def stay_labels(folder):
        return {(r["task"], r["stay_id"]): r["label"] for r in csv.DictReader(open(folder / "labels.csv"))
                if r["level"] == "stay"}
    a, b = stay_labels(tmp_path / "a"), stay_labels(tmp_path / "b")
    both = set(a) & set(b)
    assert len(both) > 0.9 * len(a) and all(a[k] == b[k] for k in both)


def test_synth_meds_replaces_its_own_folder(tmp_path):
    """A MEDS root written by synth (data/, metadata/, note/, latents/ and synth's MARKER) is an extract synth
    may replace; a user's MEDS root (no MARKER) only with overwrite, and a folder holding anything else never."""
    for patients in (6, 4):
        synthesize(SynthConfig(out=tmp_path / "raw", patients=patients, layout="meds", quiet=True))
    subjects = pq.read_table(tmp_path / "raw" / "metadata" / "subject_splits.parquet")["subject_id"]
    assert len(subjects) == 4 and sorted(p.name for p in (tmp_path / "raw").iterdir()) == \
        [MARKER, "data", "latents", "metadata", "note"]
    (tmp_path / "raw" / MARKER).unlink()                         # now it is a user's MEDS root
    with pytest.raises(InputError, match="holds an extract that synth did not write; pass --overwrite"):
        synthesize(SynthConfig(out=tmp_path / "raw", patients=5, layout="meds", quiet=True))
    assert len(pq.read_table(tmp_path / "raw" / "metadata" / "subject_splits.parquet")) == 4   # untouched
    synthesize(SynthConfig(out=tmp_path / "raw", patients=5, layout="meds-eicu", overwrite=True, quiet=True))
    assert (tmp_path / "raw" / MARKER).is_file()
    (tmp_path / "raw" / "results.txt").write_text("mine")
    with pytest.raises(InputError, match="is not a CSV extract .* nor a MEDS root"):
        synthesize(SynthConfig(out=tmp_path / "raw", patients=5, layout="meds", overwrite=True, quiet=True))
