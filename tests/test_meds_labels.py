"""MEDS labels in (issue 20, item 5; docs/meds.md, Labels in): `evaluate --labels-from DIR` reads a MEDS
label folder as a custom task. Our own label files (OUT/meds_labels/<task>/) read back as the built-in
tasks' examples; a label whose prediction_time falls before its unit's inputs end is refused and counted,
never moved to another unit; the splits are ours; every row left out is counted; bad input is one line.
Skipped without pyarrow (requirements-meds.txt)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import evaluate                                            # noqa: E402
import meds_labels                                         # noqa: E402
from conftest import one_line_error, read_csv              # noqa: E402
from data import SPLITS, InputError, load_processed, write_view   # noqa: E402
from medhmp import cli                                     # noqa: E402
from results import split_stats                            # noqa: E402

MINUTE = 60_000_000     # microseconds


@pytest.fixture(scope="module")
def data(processed_cohort):
    return load_processed(processed_cohort)


def _labels(folder, task) -> list[dict]:
    """Every row of a task's label files (train, tuning, held_out), as dicts."""
    return pq.read_table(folder / "meds_labels" / task).to_pylist()


def _write(folder, rows: list[dict], name: str = "labels.parquet"):
    """`rows` as one label file in `folder` (MEDS label schema); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("subject_id", pa.int64()), ("prediction_time", pa.timestamp("us")),
                        ("boolean_value", pa.bool_())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)
    return folder


def _keys(examples: dict) -> list:
    """The examples of one split as sorted (row, subject, label, cutoff) tuples."""
    cutoff = np.nan_to_num(examples["cutoff"], nan=-1.0)
    return sorted(zip(examples["row"].tolist(), examples["subject_id"].tolist(),
                      examples["label"].tolist(), cutoff.tolist()))


def _read(path, data, **kw):
    """read_task on a fresh copy of the labels (read_task never changes `data`)."""
    return meds_labels.read_task(path, data, **kw)


def _custom_examples(custom, data) -> dict:
    """The custom task's examples per split, as evaluate sees them."""
    data.labels[custom.name] = custom.examples
    try:
        return evaluate.all_examples(custom.name, data)
    finally:
        del data.labels[custom.name]


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("task", list(evaluate.TASKS))
def test_our_label_files_read_back_as_the_same_examples(task, data, processed_cohort):
    """Each task's OUT/meds_labels/<task>/ read back: its level inferred, every row an example, and per
    split the built-in task's examples (rows, subjects, labels, cutoffs), stays and admissions in the
    same order (so fine-tuning on them is the same run)."""
    custom = _read(processed_cohort / "meds_labels" / task, data)
    assert custom.level == evaluate.TASKS[task].level and custom.name == f"meds-{task}"
    counts = custom.info["counts"]
    assert counts["examples"] == counts["rows read"] > 0
    assert counts["examples whose file names another split (ours used)"] == 0
    ours, theirs = evaluate.all_examples(task, data), _custom_examples(custom, data)
    for split in SPLITS:
        assert _keys(ours[split]) == _keys(theirs[split]), split
        if custom.level != "patient":
            assert np.array_equal(ours[split]["row"], theirs[split]["row"])


def test_labels_from_runs_through_evaluate(processed_cohort, tmp_path):
    """--labels-from on the command line: fine-tuned and scored as a built-in task, under the folder's
    name (or --task-name), with RUN/eval/<name>.json (how the labels were read), predictions and a
    results.csv row; the built-in task's split counts."""
    run = tmp_path / "run"
    args = ["evaluate", "--data", processed_cohort, "--run", run, "--init", "none", "--seeds", 2,
            "--epochs", 1]
    result = CliRunner().invoke(cli, [*map(str, args), "--labels-from",
                                      str(processed_cohort / "meds_labels" / "hf")])
    assert result.exit_code == 0, result.output
    assert "task meds-hf, patient level (inferred" in result.output
    report = json.loads((run / "eval" / "meds-hf.json").read_text())
    d = load_processed(processed_cohort)
    assert report["splits"] == json.loads(json.dumps(split_stats(evaluate.all_examples("hf", d))))
    assert report["labels_from"]["level"] == "patient" and report["results"]["none/lstm"]["seeds"]
    assert len(read_csv(run / "eval" / "meds-hf_predictions.csv")) == 2 * report["splits"]["test"]["n"]
    result = CliRunner().invoke(cli, [*map(str, args), "--labels-from",
                                      str(processed_cohort / "meds_labels" / "copd"),
                                      "--task-name", "my_copd", "--level", "patient"])
    assert result.exit_code == 0, result.output
    rows = {(r["task"], r["level"]) for r in read_csv(run / "results.csv")}
    assert rows == {("meds-hf", "patient"), ("my_copd", "patient")}


@pytest.mark.slow
def test_a_stay_task_read_back_scores_as_the_built_in_task(processed_cohort, tmp_path):
    """Mortality from its label files: the same examples in the same order, so the same fine-tuning runs
    and the same test metrics as `--task mortality`."""
    run, common = tmp_path / "run", dict(data=processed_cohort, init="none", seeds=2, epochs=1,
                                         quiet=True, table=False)
    ours = evaluate.evaluate(evaluate.FinetuneConfig(task="mortality", run=run, **common))
    theirs = evaluate.evaluate(evaluate.FinetuneConfig(
        labels_from=processed_cohort / "meds_labels" / "mortality", run=run, **common))
    a, b = ours["mortality"], theirs["meds-mortality"]
    assert a["splits"] == b["splits"]
    assert a["results"]["none/medhmp"]["mean"] == b["results"]["none/medhmp"]["mean"]


# ------------------------------------------------------------------------------- the time rule
def _two_stay_subject(data, processed_cohort) -> tuple[dict, int]:
    """A mortality label row of a subject with an earlier featurised stay whose 48 h ended more than a
    minute before this row's prediction_time (where a moved label would land), and this row's stay."""
    table = pq.read_table(processed_cohort / "meds_labels" / "mortality")
    times, subjects = table["prediction_time"].cast(pa.int64()).to_numpy(), table["subject_id"].to_numpy()
    stay_subject = data.stays["subject_id"].numpy()
    ends = np.rint(data.stays["intime"].numpy() * 60).astype(np.int64) * MINUTE + 48 * 60 * MINUTE - 1
    for i, (subject, time) in enumerate(zip(subjects, times)):
        mine = np.flatnonzero(stay_subject == subject)
        if (ends[mine] < time - MINUTE).any():
            return table.to_pylist()[i], int(mine[ends[mine] == time][0])
    pytest.skip("no subject with two stays far enough apart in this cohort")


def test_a_label_one_minute_before_the_48h_end_is_refused_not_shifted(data, processed_cohort,
                                                                      tmp_path):
    """A stay label one minute before its stay's 48 h end would see the 48th hour: refused and counted,
    not scored, and not moved to the subject's earlier stay (whose 48 h had ended by then); at the 48-h
    end itself (intime + 48 h, the MEDS convention) the same row is that stay's example."""
    row, stay = _two_stay_subject(data, processed_cohort)
    rows = _labels(processed_cohort, "mortality")
    before = sorted(_read(processed_cohort / "meds_labels" / "mortality", data).examples["row"].tolist())
    end = row["prediction_time"] + np.timedelta64(1, "us").item()          # intime + 48 h
    for when, refused in ((end - np.timedelta64(1, "m").item(), 1), (end, 0)):
        changed = [dict(r, prediction_time=when) if r == row else r for r in rows]
        custom = _read(_write(tmp_path / str(refused), changed), data, level="stay")
        counts = custom.info["counts"]
        assert counts[meds_labels.REFUSED] == refused and counts[meds_labels.REPEAT] == 0
        assert counts["examples"] == len(rows) - refused
        assert sorted(custom.examples["row"].tolist()) == [r for r in before if r != stay or not refused]


def test_an_admission_label_before_its_discharge_is_refused(data, processed_cohort, tmp_path):
    """Readmission rows are at the discharge (an admission's codes and note come with it): a row a minute
    earlier is refused; a second row of one admission is counted, the earliest kept."""
    rows = _labels(processed_cohort, "readmission")
    minute = np.timedelta64(1, "m").item()
    changed = [dict(rows[0], prediction_time=rows[0]["prediction_time"] - minute), *rows[1:],
               dict(rows[1], prediction_time=rows[1]["prediction_time"] + 60 * minute,
                    boolean_value=not rows[1]["boolean_value"])]
    custom = _read(_write(tmp_path / "l", changed), data, level="admission")
    counts = custom.info["counts"]
    assert counts[meds_labels.REFUSED] == 1 and counts[meds_labels.REPEAT] == 1
    assert counts["examples"] == len(rows) - 1
    assert sorted(custom.examples["label"].tolist()) == sorted(float(r["boolean_value"])
                                                               for r in rows[1:])


# ----------------------------------------------------------------------------- splits and counts
def test_the_splits_are_ours_whatever_file_a_row_is_in(data, processed_cohort, tmp_path):
    """One file, or the rows of our train split written to held_out.parquet: the same examples in the same
    splits (ours, by patient, as pretraining used them); rows whose file names another split counted."""
    rows = _labels(processed_cohort, "shock")
    ours = {s: _keys(e) for s, e in evaluate.all_examples("shock", data).items()}
    one = _read(_write(tmp_path / "one", rows), data)
    assert {s: _keys(e) for s, e in _custom_examples(one, data).items()} == ours
    train = set(data.splits["train"].tolist())
    mixed = tmp_path / "mixed"
    _write(mixed, [r for r in rows if r["subject_id"] in train], "held_out.parquet")
    _write(mixed, [r for r in rows if r["subject_id"] not in train], "train.parquet")
    custom = _read(mixed, data)
    assert {s: _keys(e) for s, e in _custom_examples(custom, data).items()} == ours
    assert custom.info["counts"]["examples whose file names another split (ours used)"] == len(rows)


def test_rows_left_out_are_counted_and_warned(data, processed_cohort, tmp_path):
    """A subject not in the folder, a null value, a label before the subject's first stay: each counted
    under its reason, in RUN/eval/<name>.json's counts and one warning line."""
    rows = _labels(processed_cohort, "arf")
    first = rows[0]
    extra = [dict(first, subject_id=987654321), dict(first, boolean_value=None),
             dict(first, prediction_time=first["prediction_time"] - np.timedelta64(73000, "D").item())]
    custom = _read(_write(tmp_path / "l", rows + extra), data, level="stay")
    counts = custom.info["counts"]
    assert counts[meds_labels.NO_SUBJECT] == 1 and counts[meds_labels.NO_UNIT.format(
        unit="featurised ICU stay")] == 1
    assert counts["rows without a subject_id, prediction_time or boolean_value"] == 1
    assert counts["examples"] == len(rows) and counts["rows read"] == len(rows) + 3
    warning = custom.lines()[-1]
    assert warning.startswith("warning: --labels-from") and "1 subject not in this processed" in warning


# ------------------------------------------------------------------------------------- bad input
def test_bad_label_folders_are_one_line(data, processed_cohort, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet files in it"):
        _read(tmp_path / "empty", data)
    table = pq.read_table(processed_cohort / "meds_labels" / "arf" / "train.parquet")
    (tmp_path / "nocol").mkdir()
    pq.write_table(table.drop_columns(["boolean_value"]), tmp_path / "nocol" / "x.parquet")
    with pytest.raises(InputError, match="missing column 'boolean_value'"):
        _read(tmp_path / "nocol", data)
    (tmp_path / "ints").mkdir()
    pq.write_table(table.set_column(2, "boolean_value", table["boolean_value"].cast(pa.int64())),
                   tmp_path / "ints" / "x.parquet")
    with pytest.raises(InputError, match="'boolean_value' is int64, not of the MEDS label type"):
        _read(tmp_path / "ints", data)
    with pytest.raises(InputError, match="a built-in task's name"):
        _read(processed_cohort / "meds_labels" / "arf", data, name="arf")
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    with pytest.raises(InputError, match="needs pyarrow, which is not installed: pip install -r "
                                         "requirements-meds.txt"):
        _read(processed_cohort / "meds_labels" / "arf", data)


def test_a_folder_without_stay_intimes_is_one_line(processed_cohort, tmp_path):
    """A processed folder written before stays.pt kept intime cannot match stay labels: one line saying
    to re-run preprocess (patient labels still read)."""
    stays = torch.load(processed_cohort / "stays.pt")
    stays.pop("intime")
    splits = json.loads((processed_cohort / "splits.json").read_text())
    old = write_view(processed_cohort, tmp_path / "old", {s: splits[s] for s in SPLITS},
                     {"stays.pt": stays})
    d = load_processed(old)
    with pytest.raises(InputError, match="stays.pt: no intime .* re-run preprocess"):
        _read(processed_cohort / "meds_labels" / "mortality", d, level="stay")
    assert _read(processed_cohort / "meds_labels" / "hf", d, level="patient").info["counts"][
        "examples"] > 0


def test_the_command_line_wants_task_or_labels_from(processed_cohort, tmp_path):
    args = ["evaluate", "--data", str(processed_cohort), "--run", str(tmp_path / "run")]
    one_line_error(CliRunner().invoke(cli, args), r"give --task or --labels-from")
    one_line_error(CliRunner().invoke(cli, [*args, "--task", "hf", "--labels-from", str(tmp_path)]),
                   r"give --task or --labels-from")
    one_line_error(CliRunner().invoke(cli, [*args, "--task", "hf", "--level", "stay"]),
                   r"--level and --task-name name a custom task: give --labels-from too")
    one_line_error(CliRunner().invoke(cli, [*args, "--labels-from", str(tmp_path / "none")]),
                   r"no such folder or \.parquet file")
    assert not (tmp_path / "run" / "results.csv").exists()   # refused before any fine-tuning
