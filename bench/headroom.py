"""Benchmark: the room the synthetic cohort leaves pretraining, task by task.

Usage: python bench/headroom.py [--patients 14000] [--trinetx 4000] [--labels 100] [--repeats 10]
    [--out bench/out]
Writes a synthetic MIMIC-III extract of --patients (split 60/20/20) and a TriNetX-style one of
--trinetx (split 40/20/40, coded over the MIMIC vocabulary) under OUT/headroom/, preprocesses both
(timed), and for every task fits L2 logistic regressions (scikit-learn, C by cross-validated
AUROC) on
  oracle  the true latents (synthetic.read_latents): the stay's, the admission's or the patient's
  raw     the processed inputs of the task's modality: stays as the mean over the 48 hours of each
          feature plus the static vector; admissions as ICD and drug multi-hots, the note embedding
          and their stays' means; patients as ICD counts over the history visits plus their number
with --labels training examples (--repeats random draws of the training split, at least 5 positives
each) and with every training example, and prints their test AUROC: the gap between oracle and raw
at few labels is the room pretraining can win; raw with all labels should come close to the oracle.
Needs scikit-learn (requirements-test.txt). One JSON line per task, then a table; OUT/headroom.json
holds both. On the project's 2-core machine the default sizes take about 3 minutes.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import data  # noqa: E402
import synthetic  # noqa: E402
from data import lookup  # noqa: E402
from preprocessing import pipeline  # noqa: E402


def csr_dense(ptr, idx, width: int) -> np.ndarray:
    """(rows, width) counts of CSR sets."""
    ptr, idx = np.asarray(ptr), np.asarray(idx).astype(np.int64)
    owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    counts = np.bincount(owner * width + idx, minlength=(len(ptr) - 1) * width)
    return counts.reshape(-1, width).astype(np.float32)


def stay_raw(d: data.Processed) -> np.ndarray:
    """Per stay: the fraction of the 48 hours each feature is active, and the static vector."""
    s = d.stays
    hours = np.asarray(s["ts_count"]).sum(1)                        # active cells per stay
    ts = csr_dense(s["ts_ptr"], s["ts_feat"], d.meta["n_features"]) / d.meta["seq_len"]
    assert len(hours) == len(ts)
    return np.hstack([ts, np.asarray(s["static"], dtype=np.float32)])


def admission_raw(d: data.Processed, stays: np.ndarray) -> np.ndarray:
    a = d.admissions
    ptr, rows = np.asarray(a["stay_ptr"]), np.asarray(a["stay_rows"])
    owner = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    mean = np.zeros((len(ptr) - 1, stays.shape[1]), np.float32)
    np.add.at(mean, owner, stays[rows])
    mean /= np.maximum(np.diff(ptr), 1)[:, None]
    return np.hstack([csr_dense(a["icd_ptr"], a["icd_idx"], d.meta["n_icd"]),
                      csr_dense(a["drug_ptr"], a["drug_idx"], d.meta["n_drug"]),
                      np.asarray(a["note"], dtype=np.float32), mean])


def patient_raw(d: data.Processed, subjects, cutoffs) -> np.ndarray:
    """ICD counts over each example's visits discharged by its cutoff (the patient models' input),
    log1p, and the number of those visits."""
    a = d.admissions
    icd = csr_dense(a["icd_ptr"], a["icd_idx"], d.meta["n_icd"])
    coded = icd.sum(1) > 0
    subj, disch = np.asarray(a["subject_id"]), np.asarray(a["dischtime"])
    order = np.lexsort((disch, subj))
    order = order[coded[order]]
    lo = np.searchsorted(subj[order], subjects, "left")
    hi = np.searchsorted(subj[order], subjects, "right")
    out = np.zeros((len(subjects), icd.shape[1] + 1), np.float32)
    for i, (s, e, cut) in enumerate(zip(lo, hi, cutoffs)):
        mine = order[s:e][disch[order[s:e]] <= cut]
        out[i, :-1], out[i, -1] = icd[mine].sum(0), len(mine)
    return np.log1p(out)


def fit_auroc(x_tr, y_tr, x_te, y_te, folds: int) -> float:
    scaler = StandardScaler().fit(x_tr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.8 announces new defaults
        model = LogisticRegressionCV(Cs=np.logspace(-4, 1, 6), cv=folds, scoring="roc_auc",
                                     max_iter=500)
        model.fit(scaler.transform(x_tr), y_tr)
    return float(roc_auc_score(y_te, model.decision_function(scaler.transform(x_te))))


def compare(task: str, features: dict, y: np.ndarray, split: np.ndarray, args) -> dict:
    """Test AUROC of each feature set with --labels training examples (mean of --repeats draws) and
    with all."""
    rng = np.random.default_rng(0)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    draws = []
    while len(draws) < args.repeats:
        pick = rng.choice(train, min(args.labels, len(train)), replace=False)
        if 5 <= y[pick].sum() <= len(pick) - 5:
            draws.append(pick)
    out = {"task": task, "prevalence": round(float(y.mean()), 3), "n_test": int(len(test)),
           "test_positives": int(y[test].sum()), "n_train": int(len(train))}
    for name, x in features.items():
        few = [fit_auroc(x[p], y[p], x[test], y[test], 5) for p in draws]
        out[f"{name}_{args.labels}"] = round(float(np.mean(few)), 3)
        out[f"{name}_all"] = round(fit_auroc(x[train], y[train], x[test], y[test], 3), 3)
    print(json.dumps(out), flush=True)
    return out


def build(raw: Path, processed: Path, cfg: synthetic.SynthConfig,
          pre: pipeline.PreprocessConfig) -> dict:
    t = time.perf_counter()
    synthetic.synthesize(cfg)
    t_synth = time.perf_counter() - t
    pipeline.preprocess(pre)
    return {"synth_s": round(t_synth, 1),
            "preprocess_s": round(time.perf_counter() - t - t_synth, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=14000)
    ap.add_argument("--trinetx", type=int, default=4000)
    ap.add_argument("--labels", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    root = args.out / "headroom"
    results, timing = [], {}
    m3 = (root / "m3-raw", root / "m3-processed")
    timing["mimic3"] = build(
        *m3, synthetic.SynthConfig(out=m3[0], patients=args.patients, seed=args.seed, quiet=True),
        pipeline.PreprocessConfig(raw=m3[0], out=m3[1], split=(0.6, 0.2, 0.2), quiet=True))
    d, lat = data.load_processed(m3[1]), synthetic.read_latents(m3[0])
    stays, adms, pats = lat["stays"], lat["admissions"], lat["patients"]
    stay_x = stay_raw(d)
    stay_lat = np.column_stack([stays[k] for k in synthetic.STAY_LATENTS])
    stay_adm = lookup(adms["hadm_id"], stays["hadm_id"])
    stay_lat = np.hstack([stay_lat] +
                         [adms[k][stay_adm][:, None] for k in synthetic.ADMISSION_LATENTS])
    adm_lat = np.column_stack([adms[k] for k in synthetic.ADMISSION_LATENTS])
    adm_x = admission_raw(d, stay_x)
    for task, ex in d.labels.items():
        split = d.split_of(ex["subject_id"])
        if ex["level"] == "stay":
            ids = np.asarray(d.stays["stay_id"])[ex["row"]]
            feats = {"oracle": stay_lat[lookup(stays["stay_id"], ids)], "raw": stay_x[ex["row"]]}
        elif ex["level"] == "admission":
            ids = np.asarray(d.admissions["hadm_id"])[ex["row"]]
            feats = {"oracle": adm_lat[lookup(adms["hadm_id"], ids)], "raw": adm_x[ex["row"]]}
        else:
            rows = lookup(pats["subject_id"], ex["subject_id"])
            feats = {"oracle": np.column_stack([pats[k][rows] for k in synthetic.PATIENT_LATENTS]),
                     "raw": patient_raw(d, ex["subject_id"], ex["cutoff"])}
        results.append(dict(compare(task, feats, ex["label"], split, args), layout="mimic3"))
    if args.trinetx:
        tx = (root / "tx-raw", root / "tx-processed")
        timing["trinetx"] = build(
            *tx, synthetic.SynthConfig(out=tx[0], patients=args.trinetx, layout="trinetx",
                                       seed=args.seed, quiet=True),
            pipeline.PreprocessConfig(raw=tx[0], out=tx[1], split=(0.4, 0.2, 0.4),
                                      vocab_from=m3[1], quiet=True))
        d, pats = data.load_processed(tx[1]), synthetic.read_latents(tx[0])["patients"]
        for task, ex in d.labels.items():
            # TriNetX names: patient_id, encounter_id
            rows = lookup(pats["patient_id"], ex["subject_id"])
            feats = {"oracle": np.column_stack([pats[k][rows] for k in synthetic.PATIENT_LATENTS]),
                     "raw": patient_raw(d, ex["subject_id"], ex["cutoff"])}
            results.append(
                dict(compare(task, feats, ex["label"], d.split_of(ex["subject_id"]), args),
                     layout="trinetx"))
    print(f"timing (s): {json.dumps(timing)}")
    n = args.labels
    print(f"| task | layout | oracle {n} | raw {n} | gap | raw all | oracle all | prevalence | "
          "test positives |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['layout']} | {r[f'oracle_{n}']:.3f} | {r[f'raw_{n}']:.3f} | "
              f"{r[f'oracle_{n}'] - r[f'raw_{n}']:+.3f} | {r['raw_all']:.3f} | "
              f"{r['oracle_all']:.3f} | {r['prevalence']:.3f} | {r['test_positives']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "timing": timing,
              "results": results}
    (args.out / "headroom.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
