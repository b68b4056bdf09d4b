"""Tests for evaluate.py: metrics against scikit-learn (random and heavily tied scores), bootstrap CIs, weight
transfer per init, fine-tuning beats chance on every synthetic task, skipped tasks, result files, the CLI.

Most tests use the session's synthetic cohort and short pretraining run (conftest); the learning checks
(marked slow) fine-tune on a 1,000-patient cohort split 60/20/20 at width 32, with one seed and a few epochs.
Run: `python -m pytest -q tests/test_evaluate.py`.
"""
import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import (auc, average_precision_score, cohen_kappa_score, f1_score, precision_recall_curve,
                             roc_auc_score)

import data
import evaluate
import results
from checkpoints import TRANSFERS, Checkpoints
from conftest import pretrain_both, read_csv, synthesize_and_preprocess
from evaluate import FinetuneConfig, Run, build_model
from metrics import auprc, auprc_trapezoid, auroc, binary_metrics, bootstrap_ci, f1, kappa
from medhmp import cli
from progress import Reporter

D = 32               # model width of the fine-tuning tests
AUROC_FLOOR = 0.65   # every synthetic task from scratch, one seed; chance is 0.5. Cohort seeds 1-3 gave 0.67-0.86
#                      (the latent-model cohort spreads each label over many weak inputs; on 600 patients the small
#                      test splits and 8-epoch runs gave 0.42-0.92, hence 1,000 patients)




# --------------------------------------------------------------------------------------------- metrics
def sklearn_metrics(y, p) -> dict:
    precision, recall, _ = precision_recall_curve(y, p)
    return {"auroc": roc_auc_score(y, p), "auprc": average_precision_score(y, p),
            "auprc_trapezoid": auc(recall, precision), "f1": f1_score(y, p >= 0.5, zero_division=0),
            "kappa": cohen_kappa_score(y, p >= 0.5)}


def random_case(rng, n: int, tie: str):
    y = (rng.random(n) < rng.uniform(0.1, 0.6)).astype(int)
    y[:2] = [0, 1]  # both classes
    p = {"none": rng.random(n), "rounded": np.round(rng.random(n) * 0.6 + 0.35 * y, 1),
         "three": rng.choice([0.2, 0.5, 0.8], n), "constant": np.full(n, 0.5)}[tie]
    return y, p


@pytest.mark.parametrize("tie", ["none", "rounded", "three", "constant"])
def test_metrics_match_sklearn(tie):
    rng = np.random.default_rng(0)
    for n in (2, 5, 17, 100, 1000):
        for _ in range(4):
            y, p = random_case(rng, n, tie)
            ours, ref = binary_metrics(y, p), sklearn_metrics(y, p)
            for name, value in ref.items():
                assert ours[name] == pytest.approx(value, abs=1e-12, nan_ok=True), (name, n, tie)


def test_metric_hand_values():
    y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(y, p) == pytest.approx(0.75)
    # (recall, precision) at thresholds 0.8, 0.4, 0.35, 0.1: (.5, 1), (.5, .5), (1, 2/3), (1, .5)
    assert auprc(y, p) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert auprc_trapezoid(y, p) == pytest.approx(0.5 * (1 + 1) / 2 + 0.5 * (0.5 + 2 / 3) / 2)  # from (0, 1)
    assert f1(y, p) == pytest.approx(2 / 3) and kappa(y, p) == pytest.approx(0.5)


def test_metrics_of_a_single_class_are_nan():
    y, p = np.zeros(5), np.linspace(0, 1, 5)
    assert math.isnan(auroc(y, p)) and math.isnan(auprc(y, p)) and math.isnan(auprc_trapezoid(y, p))


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.2).astype(int)
    p = np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1)
    for metric in (auroc, auprc, auprc_trapezoid, f1):
        lo, hi = bootstrap_ci(y, p, metric, n=300, seed=7)
        assert lo < metric(y, p) < hi and hi - lo < 0.5
        assert bootstrap_ci(y, p, metric, n=300, seed=7) == (lo, hi)
        assert bootstrap_ci(y, p, metric, n=300, seed=8) != (lo, hi)


def test_bootstrap_ci_over_seeds_scores_the_mean_of_the_rows():
    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.3).astype(int)
    p = np.stack([np.clip(rng.normal(0.3 + 0.2 * y, 0.2), 0, 1) for _ in range(3)])
    lo, hi = bootstrap_ci(y, p, auroc, n=200, seed=0)
    assert lo < np.mean([auroc(y, row) for row in p]) < hi
    same = bootstrap_ci(y, np.stack([p[0]] * 3), auroc, n=200, seed=0)
    assert same == pytest.approx(bootstrap_ci(y, p[0], auroc, n=200, seed=0))


# --------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def cohort(processed_cohort) -> data.Processed:
    """The session's synthetic cohort (read-only)."""
    return data.load_processed(processed_cohort)


@pytest.fixture(scope="module")
def run(pretrained_run) -> Path:
    """The session's short pretraining run on `cohort` (read-only; copy to change)."""
    return pretrained_run


@pytest.fixture(scope="module")
def learning_cohort(tmp_path_factory) -> data.Processed:
    """1,000 synthetic patients split 60/20/20, so every task's test split has a hundred or more examples (the
    session cohort's 80/10/10 of 400 leaves ~10 patients per patient-level test split: too noisy to judge)."""
    root = tmp_path_factory.mktemp("eval_cohort")
    return data.load_processed(synthesize_and_preprocess(root, {"split": (0.6, 0.2, 0.2)}, patients=1000, seed=1))


@pytest.fixture(scope="module")
def learning_run(learning_cohort, tmp_path_factory) -> Path:
    """Both pretraining stages on `learning_cohort`, 4 steps each at width D (read-only; copy to change)."""
    return pretrain_both(learning_cohort.root, tmp_path_factory.mktemp("eval") / "run", d_model=D)


def cfg_for(processed: Path, run: Path, **kw) -> FinetuneConfig:
    base = dict(data=processed, run=run, seeds=1, epochs=3, bootstrap=50, quiet=True, table=False)
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("task", ["mortality", "readmission", "hf"])
def test_init_admission_loads_the_checkpoint_and_none_is_random(task, cohort, run):
    ckpts = Checkpoints(run, cohort.meta)
    cfg = cfg_for(cohort.root, run, task=task)
    level = evaluate.TASKS[task].level
    name, prefix, part, _ = TRANSFERS[level, "admission"]
    assert part == ""   # the whole encoder of the level: the fine-tuned model's encoder (patient: the ICD MLP)
    target = "code_encoder" if level == "patient" else "encoder"
    saved = {k[len(prefix):]: v for k, v in ckpts.get(name)["model"].items() if k.startswith(prefix)}
    torch.manual_seed(0)
    pretrained, n = build_model(task, "admission", cfg, ckpts)
    loaded = pretrained.get_submodule(target).state_dict()
    assert n == len(saved) == len(loaded) > 0
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key
    torch.manual_seed(0)
    scratch, n = build_model(task, "none", cfg, ckpts)
    assert n == 0
    fresh = scratch.get_submodule(target).state_dict()
    weights = [k for k, v in fresh.items() if v.dim() == 2]   # matrices: random at init, never all ones/zeros
    assert weights and all(not torch.equal(fresh[k], saved[k]) for k in weights)
    assert [tuple(v.shape) for v in fresh.values()] == [tuple(v.shape) for v in loaded.values()]  # like-for-like
    torch.manual_seed(1)
    other, _ = build_model(task, "none", cfg, ckpts)
    assert not torch.equal(other.get_submodule(target).state_dict()[weights[0]], fresh[weights[0]])


def test_init_stay_loads_the_stay_checkpoint(cohort, run):
    ckpts = Checkpoints(run, cohort.meta)
    saved = ckpts.get("stay")["model"]
    for task, target in (("arf", "encoder"), ("readmission", "encoder.stay_encoder")):
        model, n = build_model(task, "stay", cfg_for(cohort.root, run, task=task), ckpts)
        for key, value in model.get_submodule(target).state_dict().items():
            assert torch.equal(value, saved["encoder." + key]), key
        assert n == len(model.get_submodule(target).state_dict())


def test_a_checkpoint_from_other_data_is_refused_with_the_fix(cohort, run):
    meta = {**cohort.meta, "icd_vocab": list(reversed(cohort.meta["icd_vocab"]))}
    with pytest.raises(data.InputError, match="--vocab-from"):
        build_model("hf", "admission", cfg_for(cohort.root, run), Checkpoints(run, meta))
    meta = {**cohort.meta, "n_features": cohort.meta["n_features"] + 1}
    with pytest.raises(data.InputError, match="n_features"):
        build_model("arf", "admission", cfg_for(cohort.root, run), Checkpoints(run, meta))


@pytest.mark.slow
def test_finetuned_models_beat_chance_on_every_synthetic_task(learning_cohort, learning_run, tmp_path):
    """From scratch, seed 0: test AUROC >= AUROC_FLOOR on each task (8 epochs for the stay and admission
    tasks, 20 for the cheap patient tasks); also checks every result file and that rows are replaced."""
    cohort, out = learning_cohort, tmp_path / "run"
    shutil.copytree(learning_run, out)
    reports = {}
    for task, spec in evaluate.TASKS.items():
        epochs, patience = (20, 5) if spec.level == "patient" else (8, 3)
        reports.update(evaluate.evaluate(cfg_for(cohort.root, out, task=task, init="none", epochs=epochs,
                                                 patience=patience)))
    for task, report in reports.items():
        result = report["results"]["none/" + report["model"]]
        assert "skipped" not in result, (task, result)
        assert result["mean"]["auroc"] >= AUROC_FLOOR, (task, result["mean"])
        n_test = report["splits"]["test"]["n"]
        saved = json.loads((out / "eval" / f"{task}.json").read_text())
        assert saved["splits"]["test"]["n"] == n_test and saved["results"]["none/" + report["model"]]["seeds"]
        lo, hi = saved["results"]["none/" + report["model"]]["ci"]["auroc"]
        assert math.isnan(lo) and math.isnan(hi)  # one seed: the seed spread is unknown, so no interval
        rows = read_csv(out / "eval" / f"{task}_predictions.csv")
        assert len(rows) == n_test and {r["split"] for r in rows} == {"test"}
        probs = np.array([float(r["probability"]) for r in rows])
        labels = np.array([int(r["label"]) for r in rows])
        assert auroc(labels, probs) == pytest.approx(result["mean"]["auroc"], abs=1e-4)
        if report["level"] == "stay":
            assert all(r["stay_id"] and r["hadm_id"] for r in rows)
    table = read_csv(out / "results.csv")
    assert sorted((r["task"], r["init"]) for r in table) == sorted((t, "none") for t in evaluate.TASKS)
    assert all(r["auroc_lo"] == r["auroc_hi"] == "nan" for r in table)
    assert "[1 seed: no interval]" in results.results_table(reports)[1][0][3]
    # a second run of one task replaces its row instead of adding one
    evaluate.evaluate(cfg_for(cohort.root, out, task="hf", init="none", epochs=1))
    assert len(read_csv(out / "results.csv")) == len(table)


def test_a_single_class_task_is_skipped_with_a_reason(cohort, run, tmp_path):
    processed = tmp_path / "processed"
    shutil.copytree(cohort.root, processed)
    with open(processed / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["task"] == "mortality":
            r["label"] = "0"
    with open(processed / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = json.loads((processed / "meta.json").read_text())
    del meta["files"]["labels.csv"]           # changed on purpose: not checked against meta.json
    (processed / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    shutil.copytree(run, out)
    report = evaluate.evaluate(cfg_for(processed, out, task="mortality"))["mortality"]
    for init in ("admission", "none"):
        assert "single-class" in report["results"][f"{init}/medhmp"]["skipped"]
    table = read_csv(out / "results.csv")
    assert {r["init"] for r in table} == {"admission", "none"}
    assert all("single-class" in r["skipped"] and r["auroc"] == "" for r in table)


def test_patient_tasks_have_no_stay_transfer(cohort, run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    report = evaluate.evaluate(cfg_for(cohort.root, out, task="hf", init="stay", compare_none=False))["hf"]
    assert "no encoder" in report["results"]["stay/lstm"]["skipped"]


def test_cli_evaluate_missing_checkpoint_is_one_line(cohort, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--task", "mortality", "--data", str(cohort.root), "--run",
                                      str(tmp_path / "nothing"), "--epochs", "1", "--seeds", "1"])
    assert result.exit_code == 1 and "Error:" in result.output and "pretrain" in result.output.splitlines()[-1]


def test_roc_pr_curves_png_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    y = np.array([0, 0, 1, 1, 0, 1, 0, 0], dtype=float)
    probs = {"admission": np.array([[0.1, 0.3, 0.8, 0.6, 0.2, 0.9, 0.4, 0.1]] * 2),
             "none": np.array([[0.5, 0.4, 0.6, 0.5, 0.3, 0.7, 0.6, 0.2]])}
    assert results.plot_curves("mortality", probs, y, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not results.plot_curves("mortality", probs, np.zeros(8), tmp_path / "none.png")   # one class


def test_label_fraction_keeps_a_fixed_share_of_training_examples(processed_cohort):
    d = data.load_processed(processed_cohort)
    full, _ = evaluate.task_datasets("mortality", d, evaluate.FinetuneConfig(task="mortality"))
    part, ex = evaluate.task_datasets("mortality", d, evaluate.FinetuneConfig(task="mortality", label_fraction=0.3))
    again, _ = evaluate.task_datasets("mortality", d, evaluate.FinetuneConfig(task="mortality", label_fraction=0.3))
    assert 0.15 * len(full["train"]) < len(part["train"]) < 0.45 * len(full["train"])
    assert torch.equal(part["train"].rows, again["train"].rows)                # deterministic per seed
    assert len(part["val"]) == len(full["val"]) and len(part["test"]) == len(full["test"])


@pytest.mark.slow
def test_every_patient_model_learns_hf_and_keeps_its_own_row(learning_cohort, learning_run, tmp_path):
    """Each sequence model (paper Table 4: LSTM, RETAIN, Dipole, AdaCare, HiTANet), from scratch, seed 0,
    20 epochs: test AUROC >= AUROC_FLOOR on hf; results.csv then holds one row per model."""
    cohort, out = learning_cohort, tmp_path / "run"
    shutil.copytree(learning_run, out)
    for model in evaluate.PATIENT_MODELS:
        report = evaluate.evaluate(cfg_for(cohort.root, out, task="hf", init="none", model=model, epochs=20))["hf"]
        result = report["results"][f"none/{model}"]
        assert result["mean"]["auroc"] >= AUROC_FLOOR, (model, result["mean"])
    rows = read_csv(out / "results.csv")
    assert sorted(r["model"] for r in rows) == sorted(evaluate.PATIENT_MODELS)


# ------------------------------------------------------------------------ paired Δ, lr grid, probes
def test_paired_delta_matches_a_direct_computation():
    """Δ is mean-over-rows metric(a) − mean-over-rows metric(b); the CI contains it; with a == b it is exactly
    0 with a zero-width CI; clusters (groups) widen the CI when the clusters disagree."""
    from metrics import paired_delta
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.3).astype(int)
    a = np.stack([y * 0.6 + rng.random(200) for _ in range(4)])
    b = np.stack([y * 0.2 + rng.random(200) for _ in range(2)])
    d, lo, hi = paired_delta(y, a, b, auroc, n=200, seed=1)
    assert d == pytest.approx(np.mean([auroc(y, r) for r in a]) - np.mean([auroc(y, r) for r in b]))
    assert lo < d < hi and lo > 0
    assert paired_delta(y, b, b, auroc, n=50) == (0.0, 0.0, 0.0)
    a[2:] = y * 0.0 + rng.random((2, 200))  # two clusters: one good, one at chance
    _, lo1, hi1 = paired_delta(y, a, b, auroc, n=300, seed=1)
    _, lo2, hi2 = paired_delta(y, a, b, auroc, n=300, seed=1, groups=[0, 0, 1, 1])
    assert hi2 - lo2 > hi1 - lo1


@pytest.mark.slow
def test_lr_grid_probe_and_paired_delta_in_every_output(cohort, run, tmp_path):
    """--lr with two rates picks the one with the best mean validation AUPRC per init (recorded with both
    validation scores); --probe leaves the pretrained encoder's weights untouched; the paired Δ against none
    is in the report, eval/<task>.json and results.csv, with its per-replicate Δs, and equals
    metrics.replicate_interval on the saved test predictions (replicate i of each init paired)."""
    from metrics import replicate_interval
    out = tmp_path / "run"
    shutil.copytree(run, out)
    cfg = cfg_for(cohort.root, out, task="mortality", lr=(1e-4, 2e-2), probe=True, bootstrap=100, seeds=2)
    report = evaluate.evaluate(cfg)["mortality"]
    assert report["model"] == "medhmp-probe"
    pre, none = (report["results"][f"{i}/medhmp-probe"] for i in ("admission", "none"))
    for res in (pre, none):
        assert set(res["lr_val"]) == {"0.0001", "0.02"} and res["probe"]
        assert res["lr_val"][str(res["lr"])] == max(res["lr_val"].values())
    rows = read_csv(out / "eval" / "mortality_predictions.csv")
    y = np.array([int(r["label"]) for r in rows if r["init"] == "none" and r["seed"] == "0"])
    p = {i: np.array([[float(r["probability"]) for r in rows if r["init"] == i and r["seed"] == s] for s in "01"])
         for i in ("admission", "none")}
    expected = replicate_interval(y, p["admission"], auroc, b=p["none"], n=100, seed=cfg.seed)
    assert pre["delta_vs_none"]["auroc"] == pytest.approx([expected[k] for k in ("estimate", "lo", "hi")], abs=1e-4)
    assert pre["delta_detail"]["auroc"]["replicates"] == pytest.approx(expected["replicates"], abs=1e-4)
    assert len(expected["replicates"]) == 2 and expected["lo"] < expected["hi"]
    saved = json.loads((out / "eval" / "mortality.json").read_text())
    assert saved["results"]["admission/medhmp-probe"]["delta_vs_none"] == pre["delta_vs_none"]
    row = [r for r in read_csv(out / "results.csv") if r["init"] == "admission"][0]
    assert float(row["delta_auroc"]) == pytest.approx(expected["estimate"], abs=1e-4) and row["lr"]
    assert float(row["delta_auroc_lo"]) == pytest.approx(expected["lo"], abs=1e-4)
    # the probe froze the encoder: a fresh probe model trained one epoch keeps every encoder weight
    ckpts = Checkpoints(out, cohort.meta)
    model, _ = build_model("mortality", "admission", cfg, ckpts)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    sets, _ = evaluate.task_datasets("mortality", cohort, cfg)
    cpu = Run(replace(cfg, epochs=1), cohort, ckpts, torch.device("cpu"), torch.float32, Reporter(quiet=True))
    evaluate.finetune(model, sets, cpu, 0, 1e-1)
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
    evaluate.train_mode(model)  # training mode for the head, eval mode (no dropout) for the frozen encoder
    assert model.training and model.head.training and not any(m.training for m in model.encoder.modules())


def test_cli_lr_grid_is_validated(cohort, tmp_path):
    for bad in ("-1", "nan", "1e-3,x", "0"):
        result = CliRunner().invoke(cli, ["evaluate", "--task", "mortality", "--data", str(cohort.root), "--run",
                                          str(tmp_path), "--lr", bad])
        assert result.exit_code == 2 and "--lr" in result.output, (bad, result.output)


def test_labels_keeps_a_stratified_sample_of_that_many_training_examples(processed_cohort):
    d = data.load_processed(processed_cohort)
    full = evaluate.task_examples("mortality", d, FinetuneConfig())["train"]
    for n, seed in ((10, 0), (10, 1), (30, 0)):
        e = evaluate.task_examples("mortality", d, FinetuneConfig(labels=n, seed=seed))["train"]
        assert len(e["label"]) == n and e["label"].sum() >= 2 and (1 - e["label"]).sum() >= 2
        assert abs(e["label"].mean() - full["label"].mean()) <= max(2 / n, 0.05)
        assert set(e["row"]) <= set(full["row"])
    a, b = (evaluate.task_examples("mortality", d, FinetuneConfig(labels=10, seed=s))["train"]["row"] for s in (0, 1))
    assert not np.array_equal(a, b)
    assert len(evaluate.task_examples("mortality", d, FinetuneConfig(labels=10 ** 6))["train"]["label"]) == len(full["label"])


def test_finetune_stops_after_patience_and_restores_the_best_epoch(cohort, run, monkeypatch):
    """evaluate.finetune, the core of the protocol: with the validation AUPRC scripted to peak at epoch 2 and
    patience 2, training stops after epoch 4, reports epoch 2 as the best, and leaves the model with the
    weights it had at the end of epoch 2, not the last ones."""
    cfg = cfg_for(cohort.root, run, task="mortality", epochs=10, patience=2)
    sets, _ = evaluate.task_datasets("mortality", cohort, cfg)
    torch.manual_seed(0)
    ckpts = Checkpoints(run, cohort.meta)
    model, _ = build_model("mortality", "none", cfg, ckpts)
    scores, weights, real_predict = iter([0.3, 0.8, 0.5, 0.7, 0.9]), [], evaluate.predict

    def predict(model, dataset, *args):  # each validation pass: the weights the epoch ended with
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_predict(model, dataset, *args)
    monkeypatch.setattr(evaluate, "predict", predict)
    monkeypatch.setitem(evaluate.METRIC_FUNCTIONS, "auprc", lambda y, p: next(scores))
    cpu = Run(cfg, cohort, ckpts, torch.device("cpu"), torch.float32, Reporter(quiet=True))
    record = evaluate.finetune(model, sets, cpu, 0, 5e-2)
    assert record == {"epochs": 4, "best_epoch": 2, "val_auprc": 0.8} and len(weights) == 4
    final = model.state_dict()
    assert all(torch.equal(v, weights[1][k]) for k, v in final.items())
    assert not all(torch.equal(v, weights[3][k]) for k, v in final.items())  # the last epoch did change them
