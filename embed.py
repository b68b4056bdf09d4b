"""Embed: the pretrained representation of every stay, admission or patient, for others' models.

Usage:
    python medhmp.py embed --level stay|admission|patient --run RUN --data DATA --out FILE.npz
    encoder = load_pretrained("runs/mimic", "stay")  # in your code: the checkpoint alone, no data
Reads DATA/ and RUN/admission.pt (or RUN/stay.pt with `--init stay`, stay level only), never writes
them. Writes one `.npz` file (numpy only, no pickle; replaced whole, so a failed or interrupted run
leaves the old file or none; a file there that embed did not write is refused, `check_out`):
`embeddings` float32 (N, D); per row `subject_id`, `hadm_id`, `stay_id` int64 (-1 where the level
has none) and `split` ("train", "val", "test"; fit on train rows only); `info`, a JSON string
saying what the rows are (`LEVELS` below), the checkpoint, its digest and the data's. Rows are in
the order of the processed tensors (stays.pt, admissions.pt) or of subject_id (patients). The
encoders run in eval mode (no dropout), in fp32. The checkpoint is checked against the data as
evaluate checks it (`checkpoints.Checkpoints`), and the encoder is rebuilt from the checkpoint alone
(`checkpoints.build_encoder`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoints import (TRANSFERS, Checkpoints, build_encoder, check_fits, load_checkpoint,
                         model_config, stage_of)
from data import (AdmissionDataset, InputError, PatientDataset, Processed, StayDataset, data_digest,
                  load_processed, make_loader, usable_admissions)
from folders import check_writable, replace_file
from progress import Reporter
from runtime import resolve_device, to_device

# level -> what one row of the file is; written into the file's `info` and the README
LEVELS = {
    "stay": "every ICU stay of stays.pt: the stay vector b (StayEncoder: time series and "
            "demographics fused) of its first 48 h",
    "admission": "every usable admission (a featurised ICU stay and ICD codes, "
                 "data.usable_admissions, as pretraining and readmission use): the admission "
                 "vector a (AdmissionEncoder) of up to max_stays stays, ICD and drug codes and "
                 "the note",
    "patient": "every patient with an ICD-coded admission: the mean over ALL their coded "
               "admissions (no cutoff: the observation window is the whole record, later visits "
               "included) of the pretrained ICD MLP's output (the admission encoder's "
               "icd_encoder) for each visit's ICD set, as it is (not standardised)",
}
INITS = ("admission", "stay")   # the checkpoint the encoder comes from; stay: stage 1 (stay level)


@dataclass(frozen=True)
class EmbedConfig:
    level: str = "stay"               # stay | admission | patient (LEVELS)
    data: Path = Path("data/processed")
    run: Path = Path("runs/default")  # reads RUN/admission.pt (or RUN/stay.pt)
    out: Path = Path("embeddings.npz")
    init: str = "admission"           # admission: the final encoder (stage 2 trains it too) | stay
    batch_size: int = 256             # rows per forward pass (memory only, not the vectors)
    max_stays: int = 3                # admission level: stays per admission (paper: M = 3)
    device: str = "auto"              # auto | cpu | cuda
    quiet: bool = False


def load_pretrained(run: Path, level: str, meta: dict | None = None, init: str = "admission",
                    device="cpu") -> torch.nn.Module:
    """The pretrained encoder of `level` in eval mode on `device`, rebuilt from the checkpoint
    alone: a `models.StayEncoder` (batch of data.StayDataset -> b (B, D)), `AdmissionEncoder`
    (data.AdmissionDataset -> a (B, D)) or, for "patient", the ICD `CodeEncoder` (multi-hot (...,
    V_icd) -> (..., D); `patient_vectors` pools it). `run` is a RUN folder (its admission.pt, or
    stay.pt with init="stay") or a checkpoint file; with a processed folder's `meta` (meta.json) the
    checkpoint is also checked against those data. Call `.train()` to fine-tune it. One InputError
    line when there is no such checkpoint, it holds no such encoder, or it was pretrained on other
    data."""
    check_choice(level, init)
    path = Path(run)
    path = path / f"{TRANSFERS[level, init].checkpoint}.pt" if path.is_dir() else path
    state = load_checkpoint(path)
    encoder = build_encoder(state, level)  # refuses a checkpoint without a whole encoder of `level`
    if meta is not None:
        check_fits(state, path, meta, TRANSFERS[level, stage_of(state)].sizes)
    return encoder.to(device).eval()


def check_choice(level: str, init: str) -> None:
    """One InputError line for a level or init embed does not know, or a level stay.pt has no
    encoder of."""
    if level not in LEVELS or init not in INITS:
        raise InputError(f"level {level!r} / init {init!r}: levels are {', '.join(LEVELS)}, inits "
                         f"{', '.join(INITS)}")
    if init == "stay" and level != "stay":
        raise InputError("RUN/stay.pt holds only the stay encoder; use --init admission for "
                         f"{level} vectors")


def patient_vectors(code_encoder: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The patient vector of a data.PatientDataset batch: the mean of the code encoder's output over
    the real visits; icd (B, L, V), visit_mask (B, L) -> (B, D)."""
    x = code_encoder(batch["icd"])                                   # (B, L, D)
    mask = batch["visit_mask"].to(x.dtype)[..., None]                # (B, L, 1)
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


def rows_of(level: str, data: Processed, max_stays: int = 3) -> tuple[dict, object]:
    """The ids of every row of `level` ({"subject_id", "hadm_id", "stay_id"} int64 arrays, -1 where
    the level has none) and the dataset that yields their batches in the same order."""
    s, a = data.stays, data.admissions
    if level == "stay":
        ids = {k: s[k].numpy().astype(np.int64) for k in ("subject_id", "hadm_id", "stay_id")}
        return ids, StayDataset(data, np.arange(len(ids["stay_id"])))
    if level == "admission":
        rows = np.flatnonzero(usable_admissions(a))
        ids = {"subject_id": a["subject_id"].numpy()[rows], "hadm_id": a["hadm_id"].numpy()[rows]}
        ids["stay_id"] = np.full(len(rows), -1)
        return ids, AdmissionDataset(data, rows, max_stays=max_stays)
    coded = np.diff(a["icd_ptr"].numpy()) > 0
    subjects = np.unique(a["subject_id"].numpy()[coded]).astype(np.int64)
    n = len(subjects)   # every visit: no cutoff (inf), and as many visits as there are admissions
    dataset = PatientDataset(data, subjects, np.full(n, np.inf), np.zeros(n),
                             max_visits=max(len(coded), 1))
    return {"subject_id": subjects, "hadm_id": np.full(n, -1), "stay_id": np.full(n, -1)}, dataset


@torch.no_grad()
def encode(encoder: torch.nn.Module, level: str, dataset, dim: int, batch_size: int, device,
           advance=None) -> np.ndarray:
    """float32 (N, dim): the encoder's vector of every row of `dataset`, in order, in eval mode."""
    encoder.eval()
    out = [np.zeros((0, dim), np.float32)]
    for batch in make_loader(dataset, batch_size, pin_memory=device.type == "cuda"):
        batch = to_device(batch, device)
        vectors = patient_vectors(encoder, batch) if level == "patient" else encoder(batch)
        out.append(vectors.float().cpu().numpy())
        if advance:
            advance(len(out[-1]))
    return np.concatenate(out)


def check_out(out: Path) -> None:
    """Before any work: --out names a .npz that is absent, or one embed wrote (its `info` says so),
    which is replaced whole; anything else there is refused in one line, never replaced."""
    if out.suffix != ".npz":
        raise InputError(f"{out}: --out must name a .npz file (numpy's np.load reads it)")
    if not out.exists() and not out.is_symlink():
        return
    try:
        with np.load(out) as f:
            ours = json.loads(str(f["info"])).get("format", "").startswith("medhmp-embeddings")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        ours = False
    if not ours:
        raise InputError(f"{out}: exists and is not an embeddings file medhmp wrote; remove it or "
                         "choose another --out")


def _save(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:   # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


def embed(cfg: EmbedConfig) -> dict:
    """Write the `cfg.level` vectors of every row of cfg.data to cfg.out (module docstring); returns
    {"out", "rows", "dim"}."""
    out = Path(cfg.out)
    check_out(out)
    rep, device = Reporter(cfg.quiet), resolve_device(cfg.device)
    check_writable(out.parent, "--out")   # before any work, not after it
    data = load_processed(cfg.data)
    check_choice(cfg.level, cfg.init)
    ckpts = Checkpoints(cfg.run, data.meta)
    state = ckpts.for_transfer(cfg.level, cfg.init)
    encoder, dim = build_encoder(state, cfg.level), model_config(state).d_model
    if cfg.init == "admission" and (warning := ckpts.lineage()):
        rep.log(warning)
    ids, dataset = rows_of(cfg.level, data, cfg.max_stays)
    with rep.task(f"embedding {len(dataset):,} {cfg.level} rows", len(dataset)) as advance:
        vectors = encode(encoder.to(device), cfg.level, dataset, dim, cfg.batch_size, device,
                         advance)
    name = TRANSFERS[cfg.level, cfg.init].checkpoint
    info = {"format": "medhmp-embeddings 1", "level": cfg.level, "rows": LEVELS[cfg.level],
            "init": cfg.init, "checkpoint": str(Path(cfg.run) / f"{name}.pt"),
            "checkpoint_digest": state.get("digest"), "data": str(cfg.data),
            "data_digest": data_digest(cfg.data), "dim": dim}
    arrays = {"embeddings": vectors, **ids, "split": data.split_of(ids["subject_id"]).astype(str),
              "info": np.array(json.dumps(info))}
    try:
        replace_file(out, lambda tmp: _save(tmp, arrays))
    except OSError as err:   # a full disk, say: one line, and no file left behind
        raise InputError(f"cannot write {out}: {err.strerror or err}") from None
    rep.log(f"wrote {out}: {len(vectors):,} {cfg.level} vectors of width {dim}, each with its ids "
            "and split")
    return {"out": out, "rows": len(vectors), "dim": int(vectors.shape[1])}
