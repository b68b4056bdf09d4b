"""Health: did a pretraining stage learn? Its objective beside what learning nothing scores.

Usage (train.py does this):
    baselines, cell_mean = stay_baselines(data, train_rows, val_rows)     # stay level, once
    priors = code_priors(data, train_rows, mask_rate)                     # admission level, once
    losses = {**prior_losses(out["masked_codes"], priors, kind), **out,   # per validation batch
              "cl_chance": contrastive_chance(batch, include_positive)}
    h = health(level, record, baselines); health_status(h); verdict(level, best_h, best_epoch)
The no-learning predictors are fitted on the training split from counts of the processed data
(`cell_counts`, `code_counts`): at the stay level all zeros, each feature's rate and each (hour,
feature) cell's mean, scored exactly from counts; at the admission level predicting no code and each
code's training frequency, scored on each batch's own masks, and the contrastive loss of uniform
similarities (chance). The objectives (models.py) return their losses only; this module keeps the
books. In a run of several processes (`ranks`, a runtime.Ranks) each process counts its part of the
rows and the counts are summed across them (`counted`): the same integers, so the same baselines
and verdict as one process. Imports numpy, torch, data, models.
"""
from __future__ import annotations

import numpy as np
import torch

from data import Processed, collate_stay, csr_ranges
from models import masked_code_loss

BASELINE_NAMES = {"zeros": "all zeros", "feature_rate": "each feature's rate",
                  "cell_mean": "the (hour, feature) mean pattern", "none": "predicting no code",
                  "frequency": "each code's training frequency"}


# ------------------------------------------------------------------------------------------- counts
def cell_counts(data: Processed, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(T, F) int64: in how many of the stays `rows` each (hour, feature) cell is active. Read from
    the sparse layout in chunks of `chunk` stays, so memory follows the chunk, not the data."""
    T, F = data.meta["seq_len"], data.meta["n_features"]
    out = np.zeros(T * F, dtype=np.int64)
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    for i in range(0, len(rows), chunk):
        batch = collate_stay(data, rows[i:i + chunk])        # ts_idx = (b * T + t) * F + f
        out += np.bincount((batch["ts_idx"] % (T * F)).numpy(), minlength=T * F)
    return out.reshape(T, F)


def code_counts(data: Processed, rows: np.ndarray, modality: str) -> tuple[np.ndarray, int]:
    """(V,) how many of the admissions `rows` carry each code of `modality` ("icd" or "drug"), and
    how many of them have any code of it (the admissions a code-set objective is scored on)."""
    a = data.admissions
    ptr, idx = a[f"{modality}_ptr"].numpy(), a[f"{modality}_idx"].numpy()
    rows = np.asarray(rows, dtype=np.int64)
    counts = ptr[rows + 1] - ptr[rows]
    take = csr_ranges(torch.as_tensor(ptr[rows]), torch.as_tensor(counts)).numpy()
    return np.bincount(idx[take], minlength=data.meta[f"n_{modality}"]), int((counts > 0).sum())


def counted(count, rows, ranks=None) -> np.ndarray:
    """count(rows), an int64 array; with `ranks` of several processes (runtime.Ranks: `part`,
    `total`), each process counts its part of `rows` and the parts are summed: the same counts, a
    share of the work each."""
    if ranks is None or not ranks.many:
        return count(rows)
    return ranks.total(torch.from_numpy(count(ranks.part(rows)))).numpy()


# ------------------------------------------------------------------------------- no-learning scores
def stay_baselines(data: Processed, train_rows, val_rows,
                   ranks=None) -> tuple[dict, torch.Tensor]:
    """Validation MSE of three no-learning predictors fitted on the training stays: all zeros, each
    feature's rate, each (hour, feature) cell's mean. Exact, from cell counts: for binary y and a
    constant c per cell, Σ (c − y)² over n stays = n c² − 2 c Σy + Σy. Also returns the training
    cell means (T, F). `ranks`: counted across processes (`counted`)."""
    T, F = data.meta["seq_len"], data.meta["n_features"]
    fit = counted(lambda r: cell_counts(data, r), train_rows, ranks).astype(float)  # (T, F)
    val = counted(lambda r: cell_counts(data, r), val_rows, ranks).astype(float)    # (T, F)
    n_fit, n_val = max(len(train_rows), 1), len(val_rows)

    def mse(c):  # c: constant prediction, broadcastable to (T, F)
        return float((n_val * c ** 2 - 2 * c * val + val).sum() / max(n_val * T * F, 1))
    baselines = {"zeros": mse(0.0), "feature_rate": mse(fit.sum(0) / (n_fit * T)),
                 "cell_mean": mse(fit / n_fit)}
    return baselines, torch.as_tensor(fit / n_fit, dtype=torch.float32)


def code_priors(data: Processed, rows, mask_rate: float, ranks=None) -> dict:
    """Per-code probabilities of the two no-learning masked-code predictors, fitted on the
    admissions `rows` (the training split): "none" (0 everywhere) and "frequency": P(code is a
    masked target | not visible) = r f / (1 − (1 − r) f) for a code of frequency f and mask rate r
    (the best constant per code); {"none" | "frequency": {"icd": (V_icd,), "drug": (V_drug,)}}
    float32 on the CPU. `ranks`: counted across processes (`counted`)."""
    priors = {"none": {}, "frequency": {}}
    for m in ("icd", "drug"):
        both = counted(lambda r: np.append(*code_counts(data, r, m)), rows, ranks)  # (V + 1,)
        counts, n = both[:-1], int(both[-1])
        f = torch.as_tensor(counts / max(n, 1), dtype=torch.float32)  # (V,)
        priors["none"][m] = torch.zeros_like(f)
        priors["frequency"][m] = mask_rate * f / (1 - (1 - mask_rate) * f)
    return priors


def prior_losses(masked_codes: dict, priors: dict, kind: str) -> dict:
    """"mcp_<name>": the masked-code loss (models.masked_code_loss of `kind`, the mean over the two
    code sets as in the objective) of predicting each prior's constant probabilities on one batch's
    own masks; `masked_codes` is AdmissionPretrainer's {"icd" | "drug": (targets, scored)}, each
    (B, V)."""
    out = {}
    for name, prior in priors.items():
        losses = [masked_code_loss(torch.logit(prior[m], eps=1e-6).expand_as(t), t, h, kind=kind)
                  for m, (t, h) in masked_codes.items()]
        out[f"mcp_{name}"] = 0.5 * sum(losses).detach()
    return out


def contrastive_chance(batch: dict, include_positive: bool) -> torch.Tensor:
    """The contrastive loss of uniform similarities on one admission batch: the mean over the terms
    the objective keeps (an anchor modality with n >= 2 rows) of log(n − 1), or log n with the
    positive in the denominator; 0 when no term is kept. Counted on the device, as the objective
    counts."""
    chance, used = [], []
    # the anchors of AdmissionPretrainer's contrastive terms
    for name in ("icd", "drug", "note"):
        n = batch[f"{name}_mask"].sum()            # rows with modality r
        used.append(n >= 2)
        chance.append(torch.log((n if include_positive else n - 1).clamp(min=1).float()))
    used = torch.stack(used).float()  # (3,)
    return (torch.stack(chance) * used).sum() / used.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------- verdicts
def health(level: str, val: dict, baselines: dict) -> dict:
    """The validation objective beside its best no-learning baseline: relative gains (+ = better
    than it)."""
    if level == "stay":
        best = min(baselines, key=baselines.get)
        return {"baseline": best, "baseline_value": baselines[best],
                "gain": 1 - val["val_mse"] / baselines[best]}
    best = min(("none", "frequency"), key=lambda k: val[f"val_mcp_{k}"])
    base = val[f"val_mcp_{best}"]
    return {"baseline": best, "baseline_value": base, "gain": 1 - val["val_mcp"] / base,
            "cl_chance": val["val_cl_chance"], "cl_gain": val["val_cl_chance"] - val["val_cl"]}


def health_status(h: dict) -> str:
    """Short form for the progress line."""
    return (f"val {100 * h['gain']:+.1f}% vs {h['baseline'].replace('_', ' ')}"
            + (f", cl {h['cl_gain']:+.2f} vs chance" if "cl_gain" in h else ""))


def verdict(level: str, h: dict | None, epoch: float | None,
            unvalidated: str = "no validation split") -> tuple[str, bool]:
    """One plain sentence on what the stage learned (at its best validation pass), and whether it
    learned; without a validation pass (h None), `unvalidated` says why."""
    if h is None:
        stage = 1 if level == "stay" else 2
        return f"stage {stage}: {unvalidated}, so nothing shows whether it learned", True
    where, pct = f" (best validation pass, epoch {epoch:g})", 100 * abs(h["gain"])
    side, base = "below" if h["gain"] > 0 else "above", BASELINE_NAMES[h["baseline"]]
    if level == "stay":
        what = ("carries nothing measurable beyond the population pattern" if h["gain"] <= 0 else
                "carries little" if h["gain"] < 0.05 else
                "carries part of each stay" if h["gain"] < 0.15 else "carries much of each stay")
        return (f"stage 1: validation MSE {pct:.1f}% {side} {base}{where}; the stay vector {what}",
                h["gain"] > 0)
    learned = h["gain"] > 0 and h["cl_gain"] > 0
    cl_side = "below" if h["cl_gain"] > 0 else "above"
    return (f"stage 2: validation masked-code loss {pct:.1f}% {side} {base}, contrastive loss "
            f"{abs(h['cl_gain']):.2f} {cl_side} chance ({h['cl_chance']:.2f}){where}", learned)
