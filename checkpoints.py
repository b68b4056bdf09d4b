"""Checkpoints: the files of the two pretraining stages, and the encoders rebuilt from them.

Usage:
    state = load_checkpoint("runs/mimic/admission.pt")  # a plain dict, loaded weights_only
    encoder = build_encoder(state, "stay")              # CLIP-style: from the checkpoint alone
    ckpts = Checkpoints("runs/mimic", meta)             # RUN's checkpoints, checked against data
    n = transfer(model.encoder, ckpts.for_transfer("stay", "admission"), "stay", "admission")
train.py fills a checkpoint and `save_checkpoint` writes it whole: "model" (the weights kept: the
best validation pass), "last_model", "optimizer", "scaler", "rng", "step", "epoch" and "best" (to
resume), "level", "config", "model_config" (every field of models.ModelConfig: the architecture
needs nothing else), "digest" (weights_digest of "model"), "stay_digest" (the stay.pt an
admission.pt grew from), "data_digest", "sizes" and "icd_vocab" (what `data_mismatch` compares with
a processed folder) and the versions; a run of several processes adds "world_size", "rng_ranks"
(every process's random state) and "mask_rng" (the code-mask stream they share), written by
process 0 alone. TRANSFERS says which weights each level's encoder takes from
which checkpoint; `transfer` strips their prefix and loads them strictly, every key of the encoder
found and none left over (as MoCo renames and checks the keys of the encoder it loads). Imports
torch, models, data and folders.
"""
from __future__ import annotations

import hashlib
import platform
import subprocess
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from data import data_digest, read_file, torch_save
from folders import InputError, replace_file
from models import AdmissionEncoder, CodeEncoder, ModelConfig, StayEncoder, load_encoder

STAGES = ("stay", "admission")               # one checkpoint per pretraining stage: RUN/<stage>.pt
STAY_SIZES = ("seq_len", "n_features", "n_static")


class Transfer(NamedTuple):
    checkpoint: str   # the stage whose RUN/<checkpoint>.pt holds the weights
    prefix: str       # their keys in its "model", stripped on loading
    part: str         # the submodule of the level's encoder they fill ("": all of it)
    sizes: tuple      # the data sizes that must match (ModelConfig.SIZES names)


# (level, init) -> where the encoder of `level` (new_encoder) takes its weights from when started
# from `init`
TRANSFERS = {
    ("stay", "admission"): Transfer("admission", "encoder.stay_encoder.", "", STAY_SIZES),
    ("stay", "stay"): Transfer("stay", "encoder.", "", STAY_SIZES),
    ("admission", "admission"): Transfer("admission", "encoder.", "", ModelConfig.SIZES),
    ("admission", "stay"): Transfer("stay", "encoder.", "stay_encoder", STAY_SIZES),
    ("patient", "admission"): Transfer("admission", "encoder.icd_encoder.", "", ("n_icd",)),
}


# -------------------------------------------------------------------------------------------- files
def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save written whole (folders.replace_file): a checkpoint on disk is always complete, and
    a failure (a full disk, Ctrl-C) leaves the previous one in place and no temporary file."""
    try:
        replace_file(path, lambda tmp: torch_save(state, tmp))
    except OSError as err:  # a full disk, say: one line
        raise InputError(f"cannot write {path}: {err.strerror or err}; the previous checkpoint "
                         "there is kept") from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by train.py (plain dict; weights_only=True); a missing, truncated or
    corrupt file is one InputError line saying what to re-run."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint here (run `python medhmp.py pretrain` first)")
    level = path.stem if path.stem in STAGES else "stay|admission"
    state = read_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                      f"re-run `python medhmp.py pretrain --level {level}` for it")
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a medhmp checkpoint; re-run `python medhmp.py pretrain "
                         f"--level {level}`")
    return state


def versions() -> dict:
    """The python, torch and git versions a run header and a checkpoint record."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "git": sha or "unknown"}


def weights_digest(state_dict: dict) -> str:
    """A short content hash of a state dict (names, shapes, values): which stay.pt an admission.pt
    grew from, and which checkpoint a stored table cell started from."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode() + str(tuple(v.shape)).encode() + v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- checks
def data_mismatch(state: dict, meta: dict, sizes=ModelConfig.SIZES,
                  vocabulary: bool = False) -> list[str]:
    """How the data a checkpoint was trained on differs from the data of `meta` in `sizes` ("n_icd
    12 vs 10"), and, with `vocabulary` and equal sizes, in its ICD codes; [] when the checkpoint
    fits. The one check that a checkpoint fits the data: for resuming, the stage transfer,
    fine-tuning and embedding."""
    bad = [f"{k} {state['sizes'].get(k)} vs {meta[k]}" for k in sizes
           if state["sizes"].get(k) != meta[k]]
    if vocabulary and not bad and state.get("icd_vocab") != meta["icd_vocab"]:
        bad = ["ICD vocabulary (same size, other codes)"]
    return bad


def check_fits(state: dict, path: Path, meta: dict, sizes: tuple) -> None:
    """An InputError saying what to do when the checkpoint at `path` was trained on data whose
    `sizes` (and, for codes, ICD vocabulary) differ from those of `meta`."""
    codes = "n_icd" in sizes
    bad = data_mismatch(state, meta, sizes, vocabulary=codes)
    if bad:
        hint = ("preprocess this extract with `--vocab-from <the processed folder it was "
                "pretrained on>`" if codes else
                "use the processed folder it was pretrained on as --data")
        raise InputError(f"{path} was pretrained on other data ({', '.join(bad)}); {hint}")


def same_model(state: dict, mcfg: ModelConfig, meta: dict, names=None) -> bool:
    """Whether a checkpoint was trained with this model config (or its fields `names`) on data of
    these sizes."""
    mine = asdict(mcfg)
    same = all(state["model_config"].get(k) == mine[k] for k in (names or mine))
    return same and not data_mismatch(state, meta)


def check_resumable(state: dict, cfg, mcfg: ModelConfig, meta: dict, world: int = 1) -> None:
    """Only the stopping point and runtime options of a pretraining config may change on --resume;
    the data are compared by content, so relative paths and a moved folder resume. The number of
    processes (`world`; "world_size" in a checkpoint of several, none in one of one) may not
    change: each process's part of every batch and its random streams depend on it."""
    was = state.get("world_size", 1)
    if was != world:
        raise InputError(f"cannot resume {cfg.run}/{cfg.level}.pt: it was trained by {was} "
                         f"process{'es' * (was > 1)} and this run has {world}; resume it with "
                         f"WORLD_SIZE {was} (torchrun --nproc-per-node {was} on one machine), or "
                         "start a new --run")
    free = {"data", "run", "epochs", "max_steps", "resume", "overwrite", "quiet", "device",
            "num_workers", "log_every", "checkpoint_every", "eval_every", "patience"}
    was = state["config"]
    changed = [f"{f.name} {was.get(f.name)} -> {getattr(cfg, f.name)}" for f in fields(cfg)
               if f.name not in free and str(was.get(f.name)) != str(getattr(cfg, f.name))]
    if state.get("data_digest") != data_digest(cfg.data) or not same_model(state, mcfg, meta):
        changed.append(f"the processed data ({cfg.data} is not the folder it was trained on)")
    if changed:
        raise InputError(f"cannot resume {cfg.run}/{cfg.level}.pt: settings differ "
                         f"({'; '.join(changed)}); resume with its settings, or start a new --run")


# ---------------------------------------------------------------------------------------- transfers
def new_encoder(level: str, mcfg: ModelConfig) -> nn.Module:
    """A fresh encoder of `level`: StayEncoder, AdmissionEncoder or (patient) the ICD
    CodeEncoder."""
    if level == "stay":
        return StayEncoder(mcfg)
    if level == "admission":
        return AdmissionEncoder(mcfg)
    return CodeEncoder(mcfg.n_icd, mcfg.d_model)


def transfer(encoder: nn.Module, state: dict, level: str, init: str) -> int:
    """Load into `encoder` (a new_encoder(level)) the weights of checkpoint `state` that
    TRANSFERS[level, init] names, strictly (models.load_encoder: a RuntimeError lists missing and
    unexpected keys); returns the number of tensors loaded."""
    t = TRANSFERS[level, init]
    return load_encoder(encoder.get_submodule(t.part), state["model"], t.prefix)


def start_from_stay(encoder: AdmissionEncoder, run: Path, mcfg: ModelConfig,
                    meta: dict) -> tuple[int, str]:
    """Stage 2 of MedHMP a+s: RUN/stay.pt's stay encoder loaded into `encoder`, refused unless
    stay.pt was trained with this encoder architecture on data of these sizes, every key matched.
    Returns the number of tensors loaded and stay.pt's digest (the admission checkpoint's
    "stay_digest")."""
    stay = load_checkpoint(Path(run) / "stay.pt")
    if not same_model(stay, mcfg, meta, ModelConfig.ENCODER):
        raise InputError(f"{run}/stay.pt was trained with another model config or data; "
                         "re-run `pretrain --level stay` with the same --data and sizes")
    try:
        n = transfer(encoder, stay, "admission", "stay")
    # missing or unexpected keys: one line on the command line, not a traceback
    except RuntimeError as err:
        raise InputError(f"{run}/stay.pt: {err}") from None
    return n, stay.get("digest") or weights_digest(stay["model"])


def model_config(state: dict) -> ModelConfig:
    """The checkpoint's own models.ModelConfig (a field that a later medhmp added takes its
    default)."""
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in state["model_config"].items() if k in known})


def stage_of(state: dict) -> str:
    """The stage that wrote a checkpoint, "stay" or "admission" (from its weights when it does not
    say)."""
    if "level" in state:
        return state["level"]
    grown = any(k.startswith("encoder.stay_encoder.") for k in state["model"])
    return "admission" if grown else "stay"


def build_encoder(state: dict, level: str) -> nn.Module:
    """CLIP's build_model for medhmp: the encoder of `level` rebuilt from a checkpoint alone, its
    architecture from the checkpoint's model_config and every weight from it (TRANSFERS), in train
    mode as built. One InputError when the checkpoint holds no whole encoder of `level`."""
    stage = stage_of(state)
    t = TRANSFERS.get((level, stage))
    if t is None or t.part:
        raise InputError(f"a {stage} checkpoint holds no whole {level} encoder; use an admission "
                         f"checkpoint for {level} vectors")
    encoder = new_encoder(level, model_config(state))
    transfer(encoder, state, level, stage)
    return encoder


# ---------------------------------------------------------------------------------------------- RUN
class Checkpoints:
    """RUN/stay.pt and RUN/admission.pt, loaded once on first use and checked against the data of
    `meta`."""

    def __init__(self, run: Path, meta: dict):
        self.run, self.meta, self.cache = Path(run), meta, {}

    def get(self, name: str) -> dict:
        if name not in self.cache:
            self.cache[name] = load_checkpoint(self.run / f"{name}.pt")
        return self.cache[name]

    def check(self, name: str, sizes: tuple) -> dict:
        """The checkpoint, after checking that the `sizes` it was trained with (and, for codes, its
        ICD vocabulary) match the data; a mismatch is an InputError saying what to do."""
        check_fits(self.get(name), self.run / f"{name}.pt", self.meta, sizes)
        return self.get(name)

    def for_transfer(self, level: str, init: str) -> dict:
        """The checkpoint that the encoder of `level` started from `init` takes its weights from,
        checked."""
        t = TRANSFERS[level, init]
        return self.check(t.checkpoint, t.sizes)

    def lineage(self) -> str | None:
        """A warning when RUN/admission.pt was not pretrained from the RUN/stay.pt beside it (stage
        1 was run again after stage 2), else None."""
        paths = [self.run / f"{n}.pt" for n in STAGES]
        if not all(p.is_file() for p in paths):
            return None
        parent, stay = self.get("admission").get("stay_digest"), self.get("stay").get("digest")
        if parent and stay and parent != stay:
            return (f"warning: {paths[1]} was pretrained from another stay.pt than {paths[0]} "
                    "(stage 1 was run again after stage 2); re-run `pretrain --level admission` "
                    "so that the two agree")
        return None

    def model_config(self, init: str) -> ModelConfig:
        """Sizes from the data; architecture (d_model, heads, dropout) from the checkpoint that
        `init` uses, else from any checkpoint in RUN (so init=none is like-for-like), else
        ModelConfig defaults."""
        names = [init] if init != "none" else [n for n in ("admission", "stay")
                                                if (self.run / f"{n}.pt").is_file()]
        arch = self.get(names[0])["model_config"] if names else {}
        arch = {k: v for k, v in arch.items() if k not in ModelConfig.SIZES}
        return ModelConfig.from_meta(self.meta, **arch)
