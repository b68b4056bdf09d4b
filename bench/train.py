"""Benchmark: pretraining throughput at the paper's sizes, the data-wait share and achieved FLOP/s.

Usage: python bench/train.py [--quick] [--threads N] [--max-wait S] [--out bench/out]
Writes a processed folder at the paper's sizes straight in the on-disk format of docs/data-format.md
(random sparse binary stays, 4% dense, F = 1318, S = 73, T = 48; V_icd = 7687, V_drug = 1702, E =
768; 1.1 stays per admission, 2 × the largest admission batch of training admissions): the synthetic
generator's cohorts have ~190 features, far from the paper's 1,318. Then, each in a fresh process
(so every peak RSS is its own):
  - matmul: FLOP/s of a plain fp32 n×n matmul, the reference for what this machine can do;
  - step harness: the datasets, loader, model and optimiser step of train.pretrain, timed phase by
    phase (data wait = building the batch + moving it; compute = forward, backward, clip, AdamW)
    after warm-up, plus one more step under torch.utils.flop_counter.FlopCounterMode for the FLOPs
    of forward + backward. FlopCounterMode sees no FLOPs inside oneDNN's fused LSTM, so that step
    runs with oneDNN off, where aten::lstm decomposes into the matmuls it counts (the same math);
    the timed steps keep oneDNN on;
  - the real loop: train.pretrain with max_steps, read back from log.jsonl (samples_per_s,
    data_wait);
  - the official model's work on this machine: a model with the official code's layers and sizes
    (dense input, F-wide decoder LSTM, 3 stay slots, two masked views), timed the same way on the
    same data, so "×3 the official code" is checked on one machine, not against another machine's
    numbers.
Stay level at the paper's batch 128; admission level at the largest power of two up to 4096 whose
peak RSS stays under 60% of physical memory (probed at smaller batches, then predicted, before it is
tried). Targets (docs/design.md, Performance principles): each stage ≥ 3× the official code (as
quoted when this project was set up: 54 samples/s stage 1 at batch 128, 60 samples/s stage 2, on
another 2-core CPU), batch 4096 fitting in 24 GiB, data wait < 10% of a step.
Timings beside other busy processes are not comparable: each measurement first waits (up to
--max-wait s) for the machine to go quiet and records the CPU share other processes used while it
ran. Prints one JSON line per measurement, then a summary; writes OUT/train.json
(OUT/train_quick.json with --quick). On a quiet 2-core machine the default run takes about 7
minutes, --quick about 3.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from models import (AdmissionEncoder, AdmissionPretrainer, Classifier, ModelConfig,  # noqa: E402
                    StayEncoder, StayPretrainer, count_parameters, densify)

# the paper's sizes: official code literals (1318 features, 73 static, 7686+1 ICD, 1701+1 drugs),
# T5-Base 768
SIZES = {
    "seq_len": 48, "n_features": 1318, "n_static": 73, "n_icd": 7687, "n_drug": 1702,
    "note_dim": 768}
DENSITY = 0.04            # the hourly matrix is about 4% dense (docs/design.md, Preprocessing)
STAYS_PER_ADMISSION = {1: 0.92, 2: 0.06, 3: 0.02}  # mean 1.1: admissions average about 1 stay
# MIMIC-III: ~11-13 diagnoses, a few dozen drugs per admission
ICD_PER_ADMISSION, DRUGS_PER_ADMISSION = 13, 30
# official code, another 2-core CPU, samples/s (as quoted)
OFFICIAL = {"stay": 54.0, "admission": 60.0}
MEM_SHARE = 0.6           # "fits comfortably": peak RSS under this share of physical memory


# ----------------------------------------------------------------------------------------- the data
def write_paper_data(out: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A processed folder (format_version of data.py) with random content at the paper's sizes."""
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("bench") == {"n_train": n_train, "n_val": n_val, "seed": seed, **SIZES} and \
                meta.get("format_version") == data.FORMAT_VERSION:
            return out
    # rewritten last, so a half-written folder is never taken
    (out / "meta.json").unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    T, F, S = SIZES["seq_len"], SIZES["n_features"], SIZES["n_static"]
    A = n_train + n_val
    per_adm = rng.choice(list(STAYS_PER_ADMISSION), size=A, p=list(STAYS_PER_ADMISSION.values()))
    N = int(per_adm.sum())
    # stays: each cell on with probability DENSITY, built in chunks; CSR of the active features hour
    # by hour
    ptr, feats, per_hour = [0], [], []
    for lo in range(0, N, 256):
        on = rng.random((min(256, N - lo), T, F), dtype=np.float32) < DENSITY
        per_hour.append(on.sum(axis=2).astype(np.int16))                         # (n, T)
        feats.append((np.flatnonzero(on) % F).astype(np.int16))  # (nnz,) f, in (t, f) order
        ptr.extend((ptr[-1] + np.cumsum(per_hour[-1].sum(axis=1, dtype=np.int64))).tolist())
    subject = np.arange(A, dtype=np.int64) + 1
    stay_hadm = np.repeat(np.arange(A, dtype=np.int64) + 100001, per_adm)
    stays = {
        "stay_id": torch.arange(N, dtype=torch.int64) + 200001,
        "hadm_id": torch.from_numpy(stay_hadm),
        "subject_id": torch.from_numpy(np.repeat(subject, per_adm)),
        "ts_ptr": torch.tensor(ptr, dtype=torch.int64),
        "ts_count": torch.from_numpy(np.concatenate(per_hour)),
        "ts_feat": torch.from_numpy(np.concatenate(feats)),
        "static": torch.from_numpy((rng.random((N, S)) < 0.15).astype(np.uint8))}

    def code_sets(n_codes: int, mean: int):
        """CSR code sets with Zipf-like code frequencies, as diagnosis and drug codes have."""
        p = 1.0 / np.arange(1, n_codes + 1) ** 0.8
        p /= p.sum()
        sets = [
            np.unique(rng.choice(n_codes, size=max(1, rng.poisson(mean)), p=p)).astype(np.int32)
            for _ in range(A)]
        ptr = torch.tensor(np.concatenate([[0], np.cumsum([len(s) for s in sets])]),
                           dtype=torch.int64)
        return ptr, torch.from_numpy(np.concatenate(sets))
    icd_ptr, icd_idx = code_sets(SIZES["n_icd"], ICD_PER_ADMISSION)
    drug_ptr, drug_idx = code_sets(SIZES["n_drug"], DRUGS_PER_ADMISSION)
    admit = 1.6e6 + rng.random(A) * 1e5  # hours since 1970
    admissions = {
        "hadm_id": torch.arange(A, dtype=torch.int64) + 100001,
        "subject_id": torch.from_numpy(subject), "admittime": torch.from_numpy(admit),
        "dischtime": torch.from_numpy(admit + 24 * 7), "died": torch.zeros(A, dtype=torch.bool),
        "icd_ptr": icd_ptr, "icd_idx": icd_idx, "drug_ptr": drug_ptr, "drug_idx": drug_idx,
        "note": torch.from_numpy(rng.standard_normal((A, SIZES["note_dim"])).astype(np.float16)
                                 * 0.05),
        "note_mask": torch.from_numpy(rng.random(A) < 0.9),
        "stay_ptr": torch.from_numpy(np.concatenate([[0], np.cumsum(per_adm)]).astype(np.int64)),
        "stay_rows": torch.arange(N, dtype=torch.int64)}
    meta = {
        "format_version": data.FORMAT_VERSION, **SIZES, "layout": "bench",
        "icd_vocab": [f"icd{i}" for i in range(SIZES["n_icd"])],
        "drug_vocab": [f"drug{i}" for i in range(SIZES["n_drug"])],
        "feature_names": [f"f{i}" for i in range(F)],
        "static_names": [f"s{i}" for i in range(S)],
        "counts": {"stays": N, "admissions": A, "active_cells": int(stays["ts_ptr"][-1]),
                   "density": round(int(stays["ts_ptr"][-1]) / (N * T * F), 5)},
        "bench": {"n_train": n_train, "n_val": n_val, "seed": seed, **SIZES}}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(stays, out / "stays.pt")
    torch.save(admissions, out / "admissions.pt")
    (out / "labels.csv").write_text("task,level,subject_id,hadm_id,stay_id,label,cutoff\n")
    (out / "splits.json").write_text(
        json.dumps({
            "train": subject[:n_train].tolist(), "val": subject[n_train:].tolist(), "test": [],
            "seed": seed, "method": "bench"}))
    (out / "meta.json").write_text(json.dumps(meta))  # last: a folder with meta.json is complete
    return out


# ------------------------------------------------------------------------------------ measurements
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul(n: int, repeats: int) -> dict:
    """Best-of-`repeats` FLOP/s of an fp32 (n, n) @ (n, n) matmul: 2n³ FLOPs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return {"what": "matmul", "n": n, "seconds": round(best, 4), "flop_per_s": 2 * n ** 3 / best}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_harness(level: str, data_dir: str, batch_size: int, warmup: int, steps: int,
                 count_flops: bool) -> dict:
    """The step of train.pretrain (same datasets, loader, model, AdamW, clip, no-op scaler), timed
    by phase."""
    torch.manual_seed(0)
    d = data.load_processed(Path(data_dir))
    cfg = train.LEVELS[level](data=Path(data_dir), batch_size=batch_size)
    mcfg = ModelConfig.from_meta(d.meta, d_model=cfg.d_model, dropout=cfg.dropout)
    if level == "stay":
        model = StayPretrainer(StayEncoder(mcfg), mcfg)
        ds = data.StayDataset(d, d.pretrain_rows("stay", "train"))
    else:
        model = AdmissionPretrainer(AdmissionEncoder(mcfg), mcfg)
        ds = data.AdmissionDataset(d, d.pretrain_rows("admission", "train"),
                                   max_stays=cfg.max_stays)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fp32 on the CPU: the loop's scaler is a no-op
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    device = torch.device("cpu")
    n_steps = warmup + steps + int(count_flops)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    batches = [order[(i * batch_size) % len(ds):][:batch_size].tolist() for i in range(n_steps)]
    assert all(len(b) == batch_size for b in batches), \
        "the bench data has too few training rows for this batch"
    it = iter(data.make_loader(ds, 0, batches=batches))
    model.train()
    times, samples, stays = [], 0, 0

    def one_step():
        t0 = time.perf_counter()
        batch = runtime.to_device(next(it), device)
        t1 = time.perf_counter()
        out = model(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise runtime.NonFiniteLoss(f"{level} loss {float(loss.detach())}")
        t2 = time.perf_counter()
        scaler.scale(loss).backward()
        t3 = time.perf_counter()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        # the loop's host work
        _ = {k: round(float(v.detach()), 5) for k, v in out.items() if k in ("loss", "mcp", "cl")}
        t4 = time.perf_counter()
        return batch, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)

    for i in range(warmup + steps):
        batch, phases = one_step()
        if i >= warmup:
            times.append(phases)
            samples += batch_size
            stays += len(batch["static"])
    rss = peak_rss_mib()
    wait, fwd, bwd, opt_t = (sum(p[j] for p in times) for j in range(4))
    total = wait + fwd + bwd + opt_t
    result = {
        "what": "step", "level": level, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "threads": torch.get_num_threads(), "parameters": count_parameters(model),
        "samples_per_s": samples / total, "step_s": total / steps, "data_wait_share": wait / total,
        "phase_s": {
            "data": wait / steps, "forward": fwd / steps, "backward": bwd / steps,
            "clip_adamw": opt_t / steps}, "stays_per_step": stays / steps, "peak_rss_mib": rss}
    if count_flops:
        # the timing survives should the counting step run out of memory
        print(json.dumps(result), flush=True)
        from torch.utils.flop_counter import FlopCounterMode
        batch = runtime.to_device(next(it), device)
        forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
        # see the docstring
        with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
            warnings.simplefilter("ignore")
            with forward:
                loss = model(batch)["loss"]
            with backward:
                loss.backward()
        opt.zero_grad(set_to_none=True)
        f, b = forward.get_total_flops(), backward.get_total_flops()
        # forward FLOPs by module (backward attribution across modules is not reliable); shares of
        # forward
        by_module = {m: sum(c.values()) for m, c in forward.get_flop_counts().items()
                     if 1 <= m.count(".") <= 4}
        shares = {m.split('.', 1)[1]: round(v / f, 3) for m, v in sorted(by_module.items())
                  if v > 0.02 * f}
        result.update(flops_per_step=f + b, forward_flops=f, backward_flops=b,
                      achieved_flop_per_s=(f + b) * steps / (fwd + bwd + opt_t),
                      forward_flops_by_module=shares)
    return result


# -------------------------------------------------------- the official code's compute, same machine
def _ffn(D: int) -> nn.Module:
    # official operations.py FFN
    return nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))


class OfficialShapedStay(nn.Module):
    """The layers and sizes of the official stage-1 model (stay_admission/ of the official code), to
    time its work: dense (n, T, F) → LSTM(F→D) → Dropout → LN → LSTM(D, 2 layers) → c_T; MLP_d(S);
    attention over [h, d], FFN, max-pool → b; FFN; LSTM(D→F) over [b, 0, …, 0] whose hidden outputs
    are the reconstruction; MSE. Not the official code (which does not run as committed): the same
    dense work, for a same-machine baseline."""

    def __init__(self, F: int, S: int, D: int = 256, decoder: bool = True):
        super().__init__()
        self.rnn1 = nn.LSTM(F, D, batch_first=True)
        self.drop, self.norm = nn.Dropout(0.1), nn.LayerNorm(D)
        self.rnn2 = nn.LSTM(D, D, num_layers=2, batch_first=True, dropout=0.1)
        self.static = nn.Sequential(nn.Linear(S, 64), nn.ReLU(), nn.Linear(64, D))
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
        self.ffn, self.ffn_ae = _ffn(D), _ffn(D)
        self.decoder = nn.LSTM(D, F, batch_first=True) if decoder else None

    def encode(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn1(x)  # (n, T, D) from the dense (n, T, F) input
        _, (_, c) = self.rnn2(self.norm(self.drop(h)))
        z = torch.stack([c[-1], self.static(s)], dim=1)  # (n, 2, D)
        z = z + self.attn(z, z, z, need_weights=False)[0]
        return self.ffn(z).amax(dim=1)  # (n, D)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b = self.ffn_ae(self.encode(x, s))  # (n, D)
        steps = torch.cat([b[:, None], b.new_zeros(len(b), x.shape[1] - 1, b.shape[1])],
                          dim=1)  # (n, T, D)
        recon, _ = self.decoder(steps)  # (n, T, F)
        return torch.nn.functional.mse_loss(recon, x)


class OfficialShapedAdmission(nn.Module):
    """The official stage-2 work (the official admission pretraining): every admission encodes
    exactly K = 3 dense stay slots, two masked views (ICD, drug) with count embeddings, three
    leave-one-out views for InfoNCE."""

    def __init__(self, F: int, S: int, V_icd: int, V_drug: int, E: int, D: int = 256, K: int = 3):
        super().__init__()
        self.stay = OfficialShapedStay(F, S, D, decoder=False)
        code = lambda V: nn.Sequential(nn.Linear(V, D), nn.LayerNorm(D), nn.ReLU(),  # noqa: E731
                                       nn.Linear(D, D), nn.LayerNorm(D), nn.ReLU())
        self.icd, self.drug = code(V_icd), code(V_drug)
        self.stay_proj = nn.Sequential(nn.Linear(K * D, D), nn.LayerNorm(D), nn.ReLU())
        self.note = nn.Sequential(nn.Linear(E, D), nn.LayerNorm(D), nn.ReLU())
        self.count_icd, self.count_drug = nn.Linear(1, D), nn.Linear(1, D)
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
        self.ffns = nn.ModuleList(_ffn(D) for _ in range(5))
        self.icd_head = nn.Sequential(_ffn(D), nn.Linear(D, V_icd))
        self.drug_head = nn.Sequential(_ffn(D), nn.Linear(D, V_drug))

    def fuse(self, tokens: list, i: int) -> torch.Tensor:
        z = torch.stack(tokens, dim=1)  # (B, N, D)
        return self.ffns[i]((z + self.attn(z, z, z, need_weights=False)[0]).amax(dim=1))  # (B, D)

    def forward(self, x, s, icd, drug, note) -> torch.Tensor:
        B, K = s.shape[:2]
        stays = self.stay.encode(x.flatten(0, 1), s.flatten(0, 1))  # (B*K, D): all K slots
        st = self.stay_proj(stays.view(B, -1))
        c, g, l = self.icd(icd), self.drug(drug), self.note(note)
        keep_c, keep_g = torch.rand_like(icd) >= 0.15, torch.rand_like(drug) >= 0.15
        c_m = self.icd(icd * keep_c) + self.count_icd((icd * ~keep_c).sum(1, keepdim=True))
        g_m = self.drug(drug * keep_g) + self.count_drug((drug * ~keep_g).sum(1, keepdim=True))
        mse = torch.nn.functional.mse_loss
        mcp = 0.5 * (
            mse(torch.sigmoid(self.icd_head(self.fuse([l, c_m, g, st], 3))), icd * ~keep_c) +
            mse(torch.sigmoid(self.drug_head(self.fuse([l, c, g_m, st], 4))), drug * ~keep_g))
        labels = torch.arange(B)
        norm = torch.nn.functional.normalize
        cl = sum(torch.nn.functional.cross_entropy(
            norm(r, dim=-1) @ norm(self.fuse(rest, i), dim=-1).T / 0.1, labels)
            for i, (r, rest) in enumerate([(l, [c, g, st]), (c, [l, g, st]), (g, [l, c, st])])) / 3
        return mcp + 0.1 * cl


class OfficialShapedClassifier(nn.Module):
    """The official stay-level fine-tuning model's prediction work: the official-shaped stay encoder
    on the dense (n, T, F) input, then a linear head (the official stay classifier: encoder,
    dropout, Linear(D→1))."""

    def __init__(self, stay: OfficialShapedStay, D: int = 256):
        super().__init__()
        self.stay, self.drop, self.head = stay, nn.Dropout(0.1), nn.Linear(D, 1)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.stay.encode(x, s))).squeeze(-1)  # (n,)


def official_inputs(level: str, batch: dict, meta: dict, K: int = 3) -> tuple:
    """The official code's dense inputs of one of our batches: (x (n, T, F), static (n, S)) for a
    stay batch ("stay", "infer"); every admission's K stay slots (zeros where it has none), codes
    and note otherwise."""
    T, F, S = meta["seq_len"], meta["n_features"], meta["n_static"]
    x = densify(batch["ts_idx"], len(batch["static"]), T, F)  # (Ns, T, F)
    if level in ("stay", "infer"):
        return x, batch["static"]
    B = len(batch["icd"])
    slots = batch["stay_mask"].new_zeros(B, K)  # the real stays in their slots, zeros elsewhere
    slots[:, :batch["stay_mask"].shape[1]] = batch["stay_mask"]
    xs, ss = x.new_zeros(B, K, T, F), x.new_zeros(B, K, S)
    xs[slots], ss[slots] = x, batch["static"]
    return xs, ss, batch["icd"], batch["drug"], batch["note"]


def official_step(level: str, data_dir: str, batch_size: int, warmup: int, steps: int,
                  count_flops: bool) -> dict:
    """Forward + backward + Adam of the official-shaped model on dense batches built (untimed) from
    the same data: the compute a same-machine run of the official code would do. Data loading is not
    timed."""
    torch.manual_seed(0)
    d = data.load_processed(Path(data_dir))
    m, K = d.meta, 3
    F, S = m["n_features"], m["n_static"]
    if level == "stay":
        model, ds = OfficialShapedStay(F, S), data.StayDataset(d, d.pretrain_rows("stay", "train"))
    else:
        model = OfficialShapedAdmission(F, S, m["n_icd"], m["n_drug"], m["note_dim"])
        ds = data.AdmissionDataset(d, d.pretrain_rows("admission", "train"), max_stays=K)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-8)  # official: Adam

    def dense(i):
        return official_inputs(level,
                               ds.__getitems__(list(range(i * batch_size, (i + 1) * batch_size))),
                               m, K)

    model.train()
    compute = 0.0
    for i in range(warmup + steps):
        inputs = dense(i)
        t = time.perf_counter()
        model(*inputs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            compute += time.perf_counter() - t
    result = {
        "what": "official_shaped", "level": level, "batch_size": batch_size, "steps": steps,
        "threads": torch.get_num_threads(), "parameters": count_parameters(model),
        "samples_per_s": batch_size * steps / compute, "step_s": compute / steps,
        "peak_rss_mib": peak_rss_mib()}
    if count_flops:
        print(json.dumps(result), flush=True)
        from torch.utils.flop_counter import FlopCounterMode
        inputs, counter = dense(warmup + steps), FlopCounterMode(display=False)
        with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False), counter:
            warnings.simplefilter("ignore")
            model(*inputs).backward()
        result.update(flops_per_step=counter.get_total_flops(),
                      achieved_flop_per_s=counter.get_total_flops() / result["step_s"])
    return result


def infer_step(data_dir: str, batch_size: int, warmup: int, steps: int,
               official: bool = False) -> dict:
    """Stay-classifier prediction as evaluate.predict runs it (eval mode, torch.no_grad, batches of
    `batch_size` stays): ours builds each batch from the processed folder inside the timing
    (reported as the data share); the official-shaped classifier (OfficialShapedClassifier) gets its
    dense batches built outside it."""
    torch.manual_seed(0)
    d = data.load_processed(Path(data_dir))
    m, ds = d.meta, data.StayDataset(d, d.pretrain_rows("stay", "train"))
    model = (OfficialShapedClassifier(
        OfficialShapedStay(m["n_features"], m["n_static"], decoder=False))
             if official else Classifier(StayEncoder(ModelConfig.from_meta(m))))
    model.eval()
    wait = compute = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = ds.__getitems__([(i * batch_size + j) % len(ds) for j in range(batch_size)])
        inputs = official_inputs("infer", batch, m) if official else (batch,)
        t1 = time.perf_counter()
        with torch.no_grad():
            model(*inputs)
        if i >= warmup:
            wait += 0.0 if official else t1 - t0
            compute += time.perf_counter() - t1
    return {
        "what": "infer_official" if official else "infer", "batch_size": batch_size, "steps": steps,
        "threads": torch.get_num_threads(), "samples_per_s": batch_size * steps / (wait + compute),
        "data_wait_share": wait / (wait + compute), "peak_rss_mib": peak_rss_mib()}


def real_loop(level: str, data_dir: str, batch_size: int, max_steps: int, log_every: int) -> dict:
    """train.pretrain itself; throughput and data-wait share from its log.jsonl after the first
    record."""
    with tempfile.TemporaryDirectory() as run:
        cfg = train.LEVELS[level](data=Path(data_dir), run=Path(run), batch_size=batch_size,
                                  max_steps=max_steps, log_every=log_every,
                                  checkpoint_every=10 ** 9, eval_every=0, quiet=True,
                                  **({"init_from_stay": False} if level == "admission" else {}))
        t = time.perf_counter()
        train.pretrain(cfg)
        seconds = time.perf_counter() - t
        lines = (Path(run) / "log.jsonl").read_text().splitlines()
        recs = [r for r in map(json.loads, lines) if "event" not in r]
    steady = recs[1:] or recs
    return {
        "what": "loop", "level": level, "batch_size": batch_size, "max_steps": max_steps,
        "log_every": log_every,
        "samples_per_s": sum(r["samples_per_s"] for r in steady) / len(steady),
        "data_wait_share": sum(r["data_wait"] for r in steady) / len(steady),
        "records": [{k: r[k] for k in ("step", "samples_per_s", "data_wait")} for r in recs],
        "seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    return busy / hz, (busy + v[3] + v[4]) / hz  # + idle iowait


def wait_for_quiet(max_wait: float, threshold: float = 0.1) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` of the CPUs; returns the
    wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        b0, t0 = cpu_seconds()
        time.sleep(1.0)
        b1, t1 = cpu_seconds()
        if (b1 - b0) / max(t1 - t0, 1e-9) < threshold:
            break
    return time.perf_counter() - start


def child(kind: str, threads: int | None, max_wait: float = 0.0, script: str | None = None,
          **kw) -> dict:
    """Run one measurement in a fresh process (its peak RSS is its own), by this file or by `script`
    (this file in another checkout, e.g. the code before a change). Records the share of the
    machine's CPU time that other processes used meanwhile: timings taken beside other work are not
    comparable."""
    waited = wait_for_quiet(max_wait) if max_wait else 0.0
    cmd = [
        sys.executable, script or __file__, "--child",
        json.dumps({"kind": kind, "threads": threads, **kw})]
    (b0, t0), r0 = cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (b1, t1), r1 = cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    others = {"others_cpu_share": round(max(0.0, (b1 - b0) - mine) / max(t1 - t0, 1e-9), 3),
              "waited_for_quiet_s": round(waited, 1)}
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0:
        error = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if not lines:
            return {"what": kind, **kw, "error": error, "returncode": proc.returncode, **others}
        # timed, but the FLOP-counting step failed
        return {**lines[-1], "flops_error": error, **others}
    return {**lines[-1], **others}


def run_child(spec: str) -> None:
    kw = json.loads(spec)
    threads, kind = kw.pop("threads"), kw.pop("kind")
    if threads:
        torch.set_num_threads(threads)
    fn = {
        "step": step_harness, "loop": real_loop, "matmul": matmul, "official": official_step,
        "infer": infer_step}[kind]
    print(json.dumps(fn(**kw)))


# ------------------------------------------------------------------------------------------- main
def emit(record: dict, results: list) -> dict:
    results.append(record)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}),
          flush=True)
    return record


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps, admission batch at most 1024 (~2 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every child [default: torch's]")
    ap.add_argument("--max-wait", type=float, default=20.0,
                    help="seconds to wait, before each measurement, for other processes to go "
                         "quiet [default: 20]")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args.child)
    q = args.quick
    results, t_start = [], time.perf_counter()
    max_batch = 1024 if q else 4096
    t = time.perf_counter()
    data_dir = write_paper_data(args.out / f"paper-data-{2 * max_batch}", n_train=2 * max_batch,
                                n_val=64)
    meta = json.loads((data_dir / "meta.json").read_text())
    emit({"what": "data", "path": str(data_dir), "seconds": time.perf_counter() - t, **SIZES,
          **meta["counts"]}, results)

    mm = emit(
        child("matmul", args.threads, args.max_wait, n=2048 if q else 4096, repeats=3 if q else 5),
        results)
    stay = emit(
        child("step", args.threads, args.max_wait, level="stay", data_dir=str(data_dir),
              batch_size=128, warmup=2, steps=4 if q else 6, count_flops=True), results)
    stay_loop = emit(
        child("loop", args.threads, args.max_wait, level="stay", data_dir=str(data_dir),
              batch_size=128, max_steps=8 if q else 12, log_every=4), results)

    # admission: probe the peak RSS of one step at growing batches (fresh processes), fit RSS =
    # fixed + per-sample × batch, and measure fully at the largest power of two predicted to fit
    # comfortably
    limit = MEM_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20
    sizes = [256, 512, 1024] if q else [512, 1024, 2048, 4096]
    probes, fits = [], None
    for batch in sizes[:-1]:
        r = emit(
            child("step", args.threads, args.max_wait, level="admission", data_dir=str(data_dir),
                  batch_size=batch, warmup=0, steps=1, count_flops=False), results)
        if "error" in r or r["peak_rss_mib"] > limit:
            break
        probes.append(r)
    candidates = [b for b in sizes if any(p["batch_size"] == b for p in probes)]
    if len(probes) == len(sizes) - 1:  # every probe fitted: predict the largest size
        (b0, r0), (b1, r1) = [(p["batch_size"], p["peak_rss_mib"]) for p in probes[-2:]]
        predicted = r1 + (r1 - r0) / (b1 - b0) * (sizes[-1] - b1)
        emit({"what": "predict", "level": "admission", "batch_size": sizes[-1],
              "predicted_rss_mib": predicted, "limit_mib": limit}, results)
        if predicted <= limit:
            candidates.append(sizes[-1])
    # the full measurement, at the largest batch that really fits
    for batch in reversed(candidates):
        r = emit(
            child("step", args.threads, args.max_wait, level="admission", data_dir=str(data_dir),
                  batch_size=batch, warmup=1, steps=1 if batch > 1024 else 2, count_flops=True),
            results)
        if "error" not in r and r["peak_rss_mib"] <= limit:
            fits = r
            break
    adm_loop = None
    if fits is not None:
        adm_loop = emit(
            child("loop", args.threads, args.max_wait, level="admission", data_dir=str(data_dir),
                  batch_size=fits["batch_size"], max_steps=2 if fits["batch_size"] > 1024 else 3,
                  log_every=1), results)

    # the official model's dense work on this machine, same data (stage 2 at 256: "about 60
    # samples/s at any batch")
    official = {level: emit(child("official", args.threads, args.max_wait, level=level,
                                  data_dir=str(data_dir),
                                  batch_size=128 if (level == "stay" or q) else 256, warmup=1,
                                  steps=2, count_flops=True), results)
                for level in ("stay", "admission")}

    peak = mm["flop_per_s"]
    machine = {"cpus": os.cpu_count(), "threads": stay.get("threads"),
               "torch": str(torch.__version__), "mem_total_gib": round(limit / MEM_SHARE / 1024, 1)}
    summary = {"what": "summary", "quick": q, "machine": machine,
               "matmul_gflop_per_s": round(peak / 1e9, 1),
               "matmul_others_cpu_share": mm["others_cpu_share"]}
    for name, step, loop in (("stay", stay, stay_loop), ("admission", fits, adm_loop)):
        if step is None or "error" in step:
            summary[name] = {"error": (step or {}).get("error", "no admission batch fits")}
            continue
        loop_ok = loop is not None and "error" not in loop
        counted = "flops_per_step" in step
        best = loop if loop_ok else step
        summary[name] = {
            "batch_size": step["batch_size"], "samples_per_s_step": round(step["samples_per_s"], 1),
            "samples_per_s_loop": round(loop["samples_per_s"], 1) if loop_ok else None,
            "vs_official": round(best["samples_per_s"] / OFFICIAL[name], 2),
            "data_wait_share_step": round(step["data_wait_share"], 4),
            "data_wait_share_loop": round(loop["data_wait_share"], 4) if loop_ok else None,
            "gflops_per_step": round(step["flops_per_step"] / 1e9, 1) if counted else None,
            "achieved_gflop_per_s": round(step["achieved_flop_per_s"] / 1e9, 1) if counted else 0.0,
            "vs_matmul": round(step["achieved_flop_per_s"] / peak, 3) if counted else 0.0,
            "peak_rss_mib": round(step["peak_rss_mib"]),
            "others_cpu_share": max(step["others_cpu_share"],
                                    loop["others_cpu_share"] if loop_ok else 0.0)}
        o = official[name]
        if "error" not in o:
            summary[name].update(
                official_shaped_samples_per_s=round(o["samples_per_s"], 1),
                vs_official_shaped=round(step["samples_per_s"] / o["samples_per_s"], 2),
                official_shaped_gflops_per_sample=(
                    round(o["flops_per_step"] / o["batch_size"] / 1e9, 2)
                    if "flops_per_step" in o else None),
                gflops_per_sample=(round(step["flops_per_step"] / step["batch_size"] / 1e9, 2)
                                   if counted else None),
                official_shaped_vs_matmul=(round(o["achieved_flop_per_s"] / peak, 3)
                                           if "flops_per_step" in o else None),
                official_shaped_others_cpu_share=o["others_cpu_share"])
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    emit(summary, results)
    for name in ("stay", "admission"):
        s = summary[name]
        if "error" in s:
            print(f"{name}: {s['error']}")
            continue
        loop_s = f"{s['samples_per_s_loop']:.1f}" if s["samples_per_s_loop"] is not None else "n/a"
        print(f"{name:9s} batch {s['batch_size']:4d}: {s['samples_per_s_step']:6.1f} samples/s "
              f"step, {loop_s} loop = {s['vs_official']:.2f}x official {OFFICIAL[name]:.0f} "
              f"(target 3x); data wait {100 * s['data_wait_share_step']:.1f}% (loop "
              f"{100 * (s['data_wait_share_loop'] or 0):.1f}%, target <10%); "
              f"{s['achieved_gflop_per_s']:.1f} GFLOP/s = {s['vs_matmul']:.2f} of matmul "
              f"{summary['matmul_gflop_per_s']:.1f}; peak RSS {s['peak_rss_mib']} MiB")
        if s.get("official_shaped_samples_per_s"):
            print(f"{'':9s} official-shaped model here: {s['official_shaped_samples_per_s']:.1f} "
                  f"samples/s, {s['official_shaped_gflops_per_sample']} GFLOP/sample (ours "
                  f"{s['gflops_per_sample']}), {s['official_shaped_vs_matmul']} of matmul; ours is "
                  f"{s['vs_official_shaped']:.2f}x its samples/s")
        if s["others_cpu_share"] > 0.1:
            print(f"{'':9s} (other processes used {100 * s['others_cpu_share']:.0f}% of the CPUs "
                  "meanwhile: the timing is pessimistic)")
    args.out.mkdir(parents=True, exist_ok=True)
    # a quick run does not replace a full one
    path = args.out / ("train_quick.json" if q else "train.json")
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
