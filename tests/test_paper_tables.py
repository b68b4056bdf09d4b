"""Tests for paper_tables.py (`evaluate --model all`): the cells of each level, the three tables' layout and files,
and resumability per cell: a finished cell is read back and never retrained, a deleted cell or a changed protocol
runs again. Fine-tuning is replaced by a no-op in the fast tests (the layout does not need trained weights)."""
import csv
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

import evaluate
import paper_tables
import results
from baselines import ADMISSION_MODELS, STAY_MODELS
from evaluate import FinetuneConfig
from medhmp import cli
from paper_tables import cell_path, cell_plan


@pytest.fixture
def run_copy(pretrained_run, tmp_path):
    """A writable copy of the shared pretrained run (width 16)."""
    return shutil.copytree(pretrained_run, tmp_path / "run")


@pytest.fixture
def calls(monkeypatch):
    """Replace fine-tuning by a no-op that records each call (one per seed of a cell that runs), and drop the
    curve images (matplotlib took most of the time of these tests)."""
    seen = []
    monkeypatch.setattr(results, "plot_curves", lambda *a: False)

    def finetune(model, sets, run, seed, *args):
        seen.append(seed)
        return {"epochs": 0, "best_epoch": 0, f"val_{run.cfg.select_on}": 0.5}
    monkeypatch.setattr(evaluate, "finetune", finetune)
    return seen


def config(processed, run, **kw):
    return FinetuneConfig(**{**dict(task="readmission", model="all", data=processed, run=run, seeds=2, epochs=1,
                                    bootstrap=20, quiet=True), **kw})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cell_plan_lists_medhmp_then_the_level_baselines():
    cfg = FinetuneConfig()
    assert cell_plan("stay", cfg) == [("medhmp", "admission"), ("medhmp", "none")] + [(m, "none") for m in STAY_MODELS]
    assert cell_plan("admission", replace(cfg, init="none"))[1:] == [(m, "none") for m in ADMISSION_MODELS]
    assert cell_plan("patient", replace(cfg, init="stay")) == [(m, "none") for m in evaluate.PATIENT_MODELS]
    assert cell_plan("patient", cfg)[:2] == [("lstm", "admission"), ("lstm", "none")]
    assert paper_tables.reference("patient", "retain", "admission", cfg) == ("retain", "none")
    assert paper_tables.reference("stay", "raim", "none", cfg) == ("medhmp", "admission")
    assert paper_tables.reference("stay", "medhmp", "admission", cfg) is None


def test_cli_model_all_runs_the_tables(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(paper_tables, "tables", seen.append)
    monkeypatch.setattr(evaluate, "evaluate", lambda cfg: pytest.fail("--model all ran evaluate.evaluate"))
    done = CliRunner().invoke(cli, ["evaluate", "--task", "all", "--model", "all", "--run", str(tmp_path), "--seeds", "3"])
    assert done.exit_code == 0, done.output
    assert [(c.task, c.model, c.seeds, c.run) for c in seen] == [("all", "all", 3, tmp_path)]


def test_tables_resume_per_cell(processed_cohort, run_copy, calls, monkeypatch):
    paper_tables.tables(config(processed_cohort, run_copy))
    assert len(calls) == 2 * 10  # MedHMP a+s and scratch, 8 baselines; 2 seeds each
    out = run_copy / "tables"
    assert sorted(p.name for p in out.iterdir()) == ["cells", "table2.csv", "table2.md"]
    md = (out / "table2.md").read_text()
    assert md.index("| MedHMP (a+s) |") < md.index("| MedHMP (scratch) |") < md.index("| BertLstm |") \
        < md.index("| EncoderBert |")
    rows = read_csv(out / "table2.csv")
    assert len(rows) == 10 and all(r["seeds"] == "2" and r["auroc"] for r in rows)
    assert all(r["delta"] and r["delta_vs"] == "MedHMP (a+s)" for r in rows if r["label"] != "MedHMP (a+s)")
    assert "frozen `hashing` note embedding" in md
    before = {p.name: p.read_text() for p in out.glob("table*")}

    # a second run reads every cell back: nothing is fine-tuned, the tables are the same
    def fail(*args, **kw):
        raise AssertionError("a finished cell was run again")
    monkeypatch.setattr(paper_tables, "evaluate_task", fail)
    paper_tables.tables(config(processed_cohort, run_copy))
    assert {p.name: p.read_text() for p in out.glob("table*")} == before
    monkeypatch.setattr(paper_tables, "evaluate_task", evaluate.evaluate_task)

    # a deleted cell runs again alone; a changed protocol runs every cell again
    cell_path(run_copy, "readmission", "bert-cnn", "none").unlink()
    n = len(calls)
    paper_tables.tables(config(processed_cohort, run_copy))
    assert len(calls) - n == 2
    paper_tables.tables(config(processed_cohort, run_copy, epochs=2))
    assert len(calls) - n == 2 + 20


def test_pretrained_cells_wait_for_their_checkpoint(processed_cohort, tmp_path, calls):
    shown = paper_tables.tables(config(processed_cohort, tmp_path / "empty", task="mortality"))
    header, rows = shown["table1"]
    assert rows[0][:2] == ["MedHMP (a+s)", "not run"] and rows[1][0] == "MedHMP (scratch)" and rows[1][1] != "not run"
    assert not cell_path(tmp_path / "empty", "mortality", "medhmp", "admission").exists()


def test_probe_and_unknown_task_are_refused(processed_cohort, tmp_path):
    with pytest.raises(evaluate.InputError, match="--probe"):
        paper_tables.tables(config(processed_cohort, tmp_path, probe=True))
    with pytest.raises(evaluate.InputError, match="--task 'nope'"):
        paper_tables.tables(config(processed_cohort, tmp_path, task="nope"))


@pytest.mark.slow
def test_every_table_from_real_fine_tuning(processed_cohort, run_copy):
    """`--task all --model all`, really fine-tuned (1 epoch, 2 seeds): three tables, every row, finite values."""
    shown = paper_tables.tables(config(processed_cohort, run_copy, task="all"))
    assert set(shown) == {"table1", "table2", "table3"}
    assert [r[0] for r in shown["table3"][1]][:4] == ["LSTM_a", "LSTM", "RETAIN_a", "RETAIN"]
    assert len(shown["table1"][1]) == 2 + len(STAY_MODELS)
    for name in ("table1", "table2", "table3"):
        rows = read_csv(run_copy / "tables" / f"{name}.csv")
        assert rows and all(r["skipped"] or 0 <= float(r["auprc"]) <= 1 for r in rows)
