"""Tests for demo.py and the end-to-end pipeline: the demo from the command line at a reduced size, and the
real MIMIC-III demo (conftest.MIMIC3_DEMO, preprocessed once per session from the CLI) through pretrain →
evaluate from the CLI. Both are whole pipelines, so both are marked slow.

Reduced sizes (width 16, one or two epochs, one seed) keep the file to about half a minute on a CPU.
Run: `python -m pytest -q tests/test_demo.py`.
"""
import functools
import json
import math

import pytest
from click.testing import CliRunner

import data
import demo
import evaluate
from conftest import read_csv
from medhmp import cli

pytestmark = pytest.mark.slow


def test_demo_from_the_cli_writes_every_task(tmp_path, monkeypatch):
    small = functools.partial(demo.DemoConfig, d_model=16, stay_epochs=1, admission_epochs=1, seeds=1, epochs=2,
                              patience=1, trinetx_patients=200)
    monkeypatch.setattr(demo, "DemoConfig", small)
    out = tmp_path / "demo"
    # seed 4: with the latent-model cohort, seed 3 left no readmission in its 30-patient test split (seeds 0-5 checked)
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--patients", "200", "--seed", "4"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "run" / "results.csv")
    assert sorted((r["task"], r["init"]) for r in rows) == sorted((t, i) for t in evaluate.TASKS
                                                                  for i in ("admission", "none"))
    evaluated = [r for r in rows if not r["skipped"]]
    assert {r["task"] for r in evaluated} >= {"arf", "shock", "mortality", "readmission"}
    assert all(0 <= float(r["auroc"]) <= 1 and r["seeds"] == "1" for r in evaluated)
    patient = [t for t, spec in evaluate.TASKS.items() if spec.level == "patient"]
    trinetx = read_csv(out / "trinetx" / "run" / "results.csv")
    assert sorted((r["task"], r["init"]) for r in trinetx) == sorted((t, i) for t in patient
                                                                     for i in ("admission", "none"))
    meta = json.loads((out / "trinetx" / "processed" / "meta.json").read_text())
    assert meta["icd_vocab"] == json.loads((out / "processed" / "meta.json").read_text())["icd_vocab"]
    table = result.output[result.output.index("MedHMP demo"):]
    assert all(t in table for t in evaluate.TASKS) and "(trinetx)" in table and "Δ AUROC" in table
    assert "demo finished" in result.output
    # the low-label comparison: every task, three arms, Δ of both pretrained arms against scratch with a CI
    few = json.loads((out / "low_label.json").read_text())
    assert set(few) == set(evaluate.TASKS) | {f"{t} (trinetx)" for t in patient}
    ran = [r for r in few.values() if "skipped" not in r]
    assert ran and all(r["n_train"] <= 50 and set(r["delta"]) == {"MedHMP", "shuffled control"} for r in ran)
    # one seed: the seed spread cannot be measured, so the Δs carry no interval (and the table says so)
    assert all(math.isnan(lo) and math.isnan(hi) for r in ran for _, lo, hi in r["delta"].values())
    assert "1 seed: no interval" in result.output and "what this shows" in result.output
    assert "training labels per task" in result.output and "shuffled control" in result.output
    for stage in ("stage 1: validation MSE", "stage 2: validation masked-code loss"):  # the health verdicts
        assert result.output.count(stage) == 2  # MedHMP and the control
    assert (out / "control" / "run" / "admission.pt").is_file()


def test_mimic3_demo_through_preprocess_pretrain_evaluate(mimic3_processed, tmp_path):
    processed, run = mimic3_processed, tmp_path / "run"
    runner = CliRunner()
    steps = [["pretrain", "--level", "stay", "--data", str(processed), "--run", str(run), "--max-steps", "2",
              "--batch-size", "16"],
             ["pretrain", "--level", "admission", "--data", str(processed), "--run", str(run), "--max-steps", "2",
              "--batch-size", "16"],
             ["evaluate", "--task", "all", "--data", str(processed), "--run", str(run), "--seeds", "2",
              "--epochs", "2"]]
    for args in steps:
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
    d = data.load_processed(processed)
    both = {t for t in evaluate.TASKS
            if all(0 < d.examples(t, s)["label"].sum() < len(d.examples(t, s)["label"]) for s in evaluate.SPLITS)}
    assert "mortality" in both  # 100 demo patients: mortality has both classes in every split
    rows = read_csv(run / "results.csv")
    assert sorted((r["task"], r["init"]) for r in rows) == sorted((t, i) for t in evaluate.TASKS
                                                                  for i in ("admission", "none"))
    assert {r["task"] for r in rows if not r["skipped"]} == both
    for r in rows:
        if r["task"] in both:
            assert 0 <= float(r["auroc_lo"]) <= float(r["auroc"]) <= float(r["auroc_hi"]) and int(r["n_test"]) > 0
            if r["init"] == "admission":  # two seeds: Δ with an interval holding both seeds and the test set
                assert float(r["delta_auroc_lo"]) <= float(r["delta_auroc"]) <= float(r["delta_auroc_hi"])
