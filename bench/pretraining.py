"""Benchmark of what pretraining gives: linear probes and fine-tuning comparisons on the demo's cohorts.

Usage: python bench/pretraining.py [--demo runs/demo] [--only probes,models,lowres,stopping,quarter,bigger]
                                   [--seeds 3] [--out bench/out]
Reads the folders `python medhmp.py demo` writes (DEMO/processed, DEMO/run, DEMO/trinetx/processed,
DEMO/trinetx/run) and never writes there: every fine-tuning run writes under OUT/pretraining/. Sections:
  probes    5-fold L2 logistic-regression AUROC (torch LBFGS, scored with metrics.auroc) of frozen
            representations: the stay vector for arf/shock/mortality from the demo's stay encoder, from the
            same encoder untrained, and from one pretrained for the same epochs with decoder_input="zeros" (the
            paper's wording); the mean visit embedding of each patient for hf/copd/amnesia from the pretrained
            ICD MLP, a random one and the raw code sets, on both cohorts.
  models    every patient-level model, init admission vs none, --seeds seeds, 30 epochs, both cohorts.
  lowres    HiTANet on the TriNetX-style amnesia task with 10/25/50/100% of the training labels, 5 seeds.
  stopping  LSTM on hf, 5 seeds per init: epochs run, best epoch and test AUROC of each run.
  quarter   every task from the demo's checkpoints with the demo's fine-tuning settings on 25% of the
            training labels.
  bigger    a 1,600-patient cohort pretrained with the demo's settings (stage 1 for 30 epochs), then every task
            fine-tuned on 25% of its training labels, --seeds seeds (about 8 minutes more).
Prints one JSON line per result and writes OUT/pretraining.json. One torch thread, as the demo.
On the project's 2-core machine the default sections (all but bigger) take about 15 minutes.
"""
import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import demo  # noqa: E402
import evaluate  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402
from metrics import auroc  # noqa: E402
from models import CodeEncoder, StayEncoder, load_encoder  # noqa: E402
from preprocessing.pipeline import PreprocessConfig, preprocess  # noqa: E402

STAY_TASKS = ("mortality", "arf", "shock")
PATIENT_TASKS = ("hf", "copd", "amnesia")
DEMO = demo.DemoConfig()


def emit(results: list, **record) -> None:
    results.append(record)
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------- probes
def probe_auroc(x: np.ndarray, y: np.ndarray, folds: int = 5, l2: float = 1e-2, seed: int = 0) -> float:
    """Mean test AUROC of an L2 logistic regression over `folds` random folds (features standardised on the
    training folds); x (n, d), y (n,) in {0, 1}."""
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    scores = []
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        xt = torch.tensor((x[tr] - mu) / sd, dtype=torch.float64)
        yt = torch.tensor(y[tr], dtype=torch.float64)
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            out = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w[:-1] + w[-1], yt)
            out = out + l2 * (w[:-1] ** 2).sum()
            out.backward()
            return out
        opt.step(loss)
        with torch.no_grad():
            logits = torch.tensor((x[te] - mu) / sd, dtype=torch.float64) @ w[:-1] + w[-1]
        scores.append(auroc(y[te], logits.numpy()))
    return float(np.nanmean(scores))


def labelled(d: data.Processed, task: str) -> dict:
    """The task's examples over all three splits (the probes cross-validate over all of them)."""
    parts = [d.examples(task, s) for s in ("train", "val", "test")]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("row", "subject_id", "label", "cutoff")}


@torch.no_grad()
def stay_vectors(encoder: StayEncoder, d: data.Processed, rows: np.ndarray) -> np.ndarray:
    encoder.eval()
    loader = data.make_loader(data.StayDataset(d, rows), 256)
    return torch.cat([encoder(batch) for batch in loader]).numpy()  # (n, D)


@torch.no_grad()
def visit_means(encoder: CodeEncoder | None, d: data.Processed, ex: dict) -> np.ndarray:
    """Each patient's mean visit embedding (or, with encoder None, which codes any visit has)."""
    patients = data.PatientDataset(d, ex["subject_id"], ex["cutoff"], ex["label"])
    batch = patients.__getitems__(list(range(len(patients))))
    m = batch["visit_mask"].float()[..., None]  # (n, L, 1)
    if encoder is None:
        return ((batch["icd"] * m).sum(1) > 0).float().numpy()  # (n, V)
    return ((encoder(batch["icd"]) * m).sum(1) / m.sum(1).clamp(min=1)).numpy()  # (n, D)


def zeros_stay_encoder(args, d: data.Processed) -> StayEncoder:
    """Stage 1 as the paper words it (decoder_input "zeros"), with the demo's stage-1 settings."""
    run = args.out / "pretraining" / "zeros"
    train.pretrain(train.StayPretrainConfig(data=d.root, run=run, d_model=DEMO.d_model, epochs=DEMO.stay_epochs,
                                            batch_size=DEMO.stay_batch_size, lr=DEMO.stay_lr, seed=DEMO.seed,
                                            decoder_input="zeros", checkpoint_every=10 ** 9, quiet=True))
    return encoder_from(run / "stay.pt", d, "stay")


def encoder_from(path: Path, d: data.Processed, name: str):
    ckpt = train.load_checkpoint(path)
    mcfg = evaluate.Checkpoints(path.parent, d.meta).model_config(name)
    if name == "stay":
        enc = StayEncoder(mcfg)
        load_encoder(enc, ckpt["model"], "encoder.")
    else:
        enc = CodeEncoder(mcfg.n_icd, mcfg.d_model)
        load_encoder(enc, ckpt["model"], "encoder.icd_encoder.")
    return enc


def probes(args, results: list) -> None:
    d = data.load_processed(args.demo / "processed")
    mcfg = evaluate.Checkpoints(args.demo / "run", d.meta).model_config("stay")
    torch.manual_seed(0)
    encoders = {"pretrained": encoder_from(args.demo / "run" / "stay.pt", d, "stay"), "untrained": StayEncoder(mcfg),
                "pretrained, decoder_input zeros": zeros_stay_encoder(args, d)}
    for task in STAY_TASKS:
        ex = labelled(d, task)
        for name, enc in encoders.items():
            emit(results, section="probes", level="stay", task=task, representation=name, n=len(ex["label"]),
                 auroc=round(probe_auroc(stay_vectors(enc, d, ex["row"]), ex["label"]), 3))
    for cohort, folder in (("mimic", args.demo), ("trinetx", args.demo / "trinetx")):
        d = data.load_processed(folder / "processed")
        mcfg = evaluate.Checkpoints(folder / "run", d.meta).model_config("admission")
        torch.manual_seed(0)
        codes = {"pretrained": encoder_from(folder / "run" / "admission.pt", d, "admission"),
                 "random": CodeEncoder(mcfg.n_icd, mcfg.d_model), "raw code sets": None}
        for task in PATIENT_TASKS:
            ex = labelled(d, task)
            for name, enc in codes.items():
                emit(results, section="probes", level="patient", cohort=cohort, task=task, representation=name,
                     n=len(ex["label"]), auroc=round(probe_auroc(visit_means(enc, d, ex), ex["label"]), 3))


# --------------------------------------------------------------------------------------- fine-tuning
def fresh_run(args, name: str, source: Path) -> Path:
    """A copy of a demo run folder's checkpoints under OUT, so that results files land there."""
    run = args.out / "pretraining" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for ckpt in source.glob("*.pt"):
        shutil.copyfile(ckpt, run / ckpt.name)
    return run


def aurocs(report: dict) -> dict:
    return {v["init"]: round(v["mean"]["auroc"], 3) for v in report["results"].values() if "mean" in v}


def models(args, results: list) -> None:
    for cohort, folder in (("mimic", args.demo), ("trinetx", args.demo / "trinetx")):
        for model in evaluate.PATIENT_MODELS:
            run = fresh_run(args, f"models-{cohort}-{model}", folder / "run")
            for task in PATIENT_TASKS:
                cfg = evaluate.FinetuneConfig(task=task, data=folder / "processed", run=run, model=model,
                                              seeds=args.seeds, quiet=True, table=False)
                report = evaluate.evaluate(cfg)[task]
                emit(results, section="models", cohort=cohort, model=model, task=task,
                     n_test=report["splits"]["test"]["n"], auroc=aurocs(report))


def lowres(args, results: list) -> None:
    folder = args.demo / "trinetx"
    for fraction in (0.1, 0.25, 0.5, 1.0):
        run = fresh_run(args, f"lowres-{fraction}", folder / "run")
        cfg = evaluate.FinetuneConfig(task="amnesia", data=folder / "processed", run=run, model="hitanet", seeds=5,
                                      label_fraction=fraction, quiet=True, table=False)
        report = evaluate.evaluate(cfg)["amnesia"]
        emit(results, section="lowres", task="amnesia", model="hitanet", label_fraction=fraction,
             n_train=report["splits"]["train"]["n"], auroc=aurocs(report))


def stopping(args, results: list) -> None:
    d = data.load_processed(args.demo / "processed")
    ckpts = evaluate.Checkpoints(args.demo / "run", d.meta)
    cfg = evaluate.FinetuneConfig(task="hf", data=d.root, quiet=True)
    sets, _ = evaluate.task_datasets("hf", d, cfg)
    device, lr = torch.device("cpu"), evaluate.level_lrs(cfg, "patient")[0]
    for init in ("admission", "none"):
        for seed in range(5):
            torch.manual_seed(seed)
            model, _ = evaluate.build_model("hf", init, cfg, ckpts)
            trace = []
            record = evaluate.finetune(model, sets, cfg, seed, device, torch.float32,
                                       lambda n, status: trace.append(float(status.split()[2])), lr)
            p = evaluate.predict(model, sets["test"], 64, device, torch.float32)
            emit(results, section="stopping", task="hf", model="lstm", init=init, seed=seed,
                 epochs=record["epochs"], best_epoch=record["best_epoch"], val_auprc=[round(v, 3) for v in trace],
                 test_auroc=round(auroc(sets["test"].labels.numpy(), p), 3))


def quarter(args, results: list) -> None:
    run = fresh_run(args, "quarter", args.demo / "run")
    ft = evaluate.FinetuneConfig(data=args.demo / "processed", run=run, seeds=DEMO.seeds, epochs=DEMO.epochs,
                                 patience=DEMO.patience, label_fraction=0.25, quiet=True, table=False)
    for task, report in evaluate.evaluate(ft).items():
        emit(results, section="quarter", task=task, label_fraction=0.25, n_train=report["splits"]["train"]["n"],
             n_test=report["splits"]["test"]["n"], auroc=aurocs(report))


def bigger(args, results: list) -> None:
    cfg = replace(DEMO, out=args.out / "pretraining" / "bigger", patients=1600, stay_epochs=30, trinetx=False,
                  quiet=True)
    raw, processed, run = cfg.out / "raw", cfg.out / "processed", cfg.out / "run"
    synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=cfg.patients, seed=cfg.seed, quiet=True))
    preprocess(PreprocessConfig(raw=raw, out=processed, split=cfg.split, seed=cfg.seed, quiet=True))
    common = dict(data=processed, run=run, d_model=cfg.d_model, seed=cfg.seed, quiet=True, checkpoint_every=10 ** 9)
    train.pretrain(train.StayPretrainConfig(epochs=cfg.stay_epochs, batch_size=cfg.stay_batch_size, lr=cfg.stay_lr,
                                            **common))
    train.pretrain(train.AdmissionPretrainConfig(epochs=cfg.admission_epochs, batch_size=cfg.admission_batch_size,
                                                 lr=cfg.admission_lr, **common))
    ft = evaluate.FinetuneConfig(data=processed, run=run, seeds=args.seeds, epochs=cfg.epochs, patience=cfg.patience,
                                 label_fraction=0.25, quiet=True, table=False)
    for task, report in evaluate.evaluate(ft).items():
        sd = {v["init"]: round(v["sd"]["auroc"], 3) for v in report["results"].values() if "sd" in v}
        emit(results, section="bigger", task=task, patients=1600, label_fraction=0.25,
             n_test=report["splits"]["test"]["n"], auroc=aurocs(report), auroc_sd=sd,
             auprc={v["init"]: round(v["mean"]["auprc"], 3) for v in report["results"].values() if "mean" in v})


SECTIONS = {"probes": probes, "models": models, "lowres": lowres, "stopping": stopping, "quarter": quarter,
            "bigger": bigger}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--only", default="probes,models,lowres,stopping,quarter")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    if not (args.demo / "run" / "admission.pt").is_file():
        sys.exit(f"{args.demo}: no demo run here; run `python medhmp.py demo --out {args.demo}` first")
    torch.set_num_threads(1)
    results = []
    for name in args.only.split(","):
        SECTIONS[name](args, results)
    path = args.out / "pretraining.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
