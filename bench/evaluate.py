"""Benchmark: fine-tuning throughput per level and model (stay, admission, patient), synthetic data.

Usage: python bench/evaluate.py [--patients 400] [--d-model 256] [--batch-size 16] [--epochs 2]
    [--threads 1]
                                [--device auto] [--out bench/out] [--models medhmp,f-lstm,...]
Writes (once, then reuses) a synthetic MIMIC-III extract and its processed folder under OUT, then
per level fine-tunes one task from scratch with evaluate.finetune (SGD steps plus the per-epoch
validation pass, as in `medhmp.py evaluate`; one untimed warm-up epoch first) and scores its test
split with evaluate.predict. Models (`--models`, every one by default): MedHMP at the stay and
admission levels, the sequence models at the patient level, and the baselines of baselines.py at
their own level (stay: F-LSTM, ...; admission: BertLstm, ...). Prints, per level and model: task,
examples, parameters, fine-tuning samples/s (training examples per second, the validation pass
included in the time) and prediction samples/s. `--threads 1` is the default because two threads on
a busy 2-core machine were 10-50x slower for these small LSTMs; pass 0 for torch's default.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import synthetic  # noqa: E402
from checkpoints import Checkpoints  # noqa: E402
from models import ModelConfig, count_parameters  # noqa: E402
from preprocessing.pipeline import PreprocessConfig, preprocess  # noqa: E402
from progress import Reporter  # noqa: E402
from runtime import resolve_device, resolve_dtype  # noqa: E402

LEVEL_TASKS = {"stay": "mortality", "admission": "readmission", "patient": "hf"}


def cohort(args) -> Path:
    """The processed synthetic cohort of `args.patients` patients, built on first use (and rebuilt
    when the processed format has changed since)."""
    raw, processed = args.out / f"raw-{args.patients}", args.out / f"processed-{args.patients}"
    meta = processed / "meta.json"
    version = json.loads(meta.read_text()).get("format_version") if meta.is_file() else None
    if version != data.FORMAT_VERSION:
        if not raw.is_dir():
            synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=args.patients, quiet=True))
        preprocess(PreprocessConfig(raw=raw, out=processed, quiet=True))
    return processed


def bench_level(level: str, processed: Path, d: data.Processed, args, device, amp,
                model_name: str = "medhmp") -> dict:
    task = LEVEL_TASKS[level]
    cfg = evaluate.FinetuneConfig(task=task, data=processed, epochs=args.epochs,
                                  patience=args.epochs + 1, batch_size=args.batch_size,
                                  device=str(device), quiet=True, model=model_name)
    sets, _ = evaluate.task_datasets(task, d, cfg)
    mcfg = ModelConfig.from_meta(d.meta, d_model=args.d_model)
    torch.manual_seed(0)
    ckpts = Checkpoints(args.out / "no-run", d.meta)
    model, _ = evaluate.build_model(task, "none", cfg, ckpts, mcfg)
    model.to(device)
    n_train, lr = len(sets["train"]), evaluate.level_lrs(cfg, level)[0]
    run = evaluate.Run(cfg, d, ckpts, device, amp, Reporter(quiet=True))
    evaluate.finetune(model, sets, run.configured(epochs=1), 0, lr)  # warm-up, untimed
    start = time.perf_counter()
    evaluate.finetune(model, sets, run, 0, lr)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate.predict(model, sets["test"], 4 * args.batch_size, device, amp)
    pred_s = time.perf_counter() - start
    return {"level": level, "task": task, "model": evaluate.level_model(model_name, level),
            "train": n_train, "test": len(sets["test"]),
            "parameters": count_parameters(model),
            "finetune_samples_per_s": n_train * args.epochs / fit_s,
            "predict_samples_per_s": len(sets["test"]) / pred_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--d-model", type=int, default=256)       # paper App. B
    ap.add_argument("--batch-size", type=int, default=16)     # evaluate.FinetuneConfig default
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--models", default=None,
                    help="comma-separated model names (evaluate.MODELS); default: all")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = resolve_dtype("auto", device)
    processed = cohort(args)
    d = data.load_processed(processed)
    print(f"fine-tuning throughput: {args.patients} synthetic patients, d_model {args.d_model}, "
          f"batch {args.batch_size}, {args.epochs} epochs, device {device}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'level':<10} {'task':<12} {'model':<15} {'train':>6} {'test':>5} {'params':>10} "
          f"{'finetune/s':>11} {'predict/s':>10}")
    runs = [("stay", "medhmp"), ("admission", "medhmp")]
    runs += [("patient", m) for m in evaluate.PATIENT_MODELS]
    runs += [(level, m) for level in ("stay", "admission") for m in evaluate.BASELINES[level]]
    wanted = args.models.split(",") if args.models else None
    for level, model_name in runs:
        if wanted and model_name not in wanted:
            continue
        r = bench_level(level, processed, d, args, device, amp, model_name)
        print(f"{r['level']:<10} {r['task']:<12} {r['model']:<15} {r['train']:>6} {r['test']:>5} "
              f"{r['parameters']:>10,} {r['finetune_samples_per_s']:>11.0f} "
              f"{r['predict_samples_per_s']:>10.0f}",
              flush=True)


if __name__ == "__main__":
    main()
