"""Train: the two pretraining stages of MedHMP, bottom-up (stay level, then admission level).

Usage:
    python medhmp.py pretrain --level stay       --data data/processed --run runs/default
    python medhmp.py pretrain --level admission  --data data/processed --run runs/default
Reads DATA/ (meta.json, stays.pt, admissions.pt, splits.json). Writes RUN/stay.pt or RUN/admission.pt
(plain-dict checkpoints, loadable with torch.load(weights_only=True)), RUN/config_<level>.json and one
JSON line per log interval in RUN/log.jsonl. The admission stage starts from RUN/stay.pt, and every
stay-encoder weight must transfer. `--resume` continues exactly where the last checkpoint stopped.
Pretraining sees the training split only; the validation split gives a held-out loss per epoch.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from data import (AdmissionDataset, InputError, Processed, Reporter, StayDataset, config_record, load_processed,
                  make_loader, read_file)
from models import (AdmissionEncoder, AdmissionPretrainer, ModelConfig, StayEncoder, StayPretrainer,
                    count_parameters, load_encoder)


@dataclass(frozen=True)
class StayPretrainConfig:
    data: Path = Path("data/processed")
    run: Path = Path("runs/default")
    epochs: int = 200                 # paper App. B
    max_steps: int | None = None      # stop after this many optimiser steps (quick runs)
    batch_size: int = 128             # paper App. B
    lr: float = 5e-4                  # paper App. B; official stay_pretraining.py
    weight_decay: float = 1e-8        # official stay_pretraining.py
    grad_clip: float = 1.0            # not in the paper; keeps early LSTM steps stable
    d_model: int = 256                # paper App. B
    dropout: float = 0.1              # spec §13 (unknown in the official pretraining)
    # stage-1 decoder input (models.ModelConfig): "stay" (b at every hour) or "zeros" (the paper's wording);
    # the admission stage must use the value its stay checkpoint was trained with
    decoder_input: str = ModelConfig.decoder_input
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA if supported, else fp32)
    num_workers: int = 0              # loader processes (0: batches built in the training process)
    log_every: int = 10               # steps between log lines
    checkpoint_every: int = 500       # steps between checkpoints (one is always written at the end)
    eval_every: int = 1               # epochs between validation losses (0: never)
    resume: bool = False
    seed: int = 0
    quiet: bool = False

    level = "stay"


@dataclass(frozen=True)
class AdmissionPretrainConfig(StayPretrainConfig):
    epochs: int = 300                 # paper App. B
    batch_size: int = 4096            # paper App. B (large batch for in-batch negatives)
    lr: float = 2e-5                  # paper App. B; official admission_pretraining.py
    max_stays: int = 3                # paper: at most M = 3 stays per admission
    init_from_stay: bool = True       # start from RUN/stay.pt (MedHMP a+s); False gives the "a" ablation

    level = "admission"


LEVELS = {"stay": StayPretrainConfig, "admission": AdmissionPretrainConfig}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16/fp16 on CUDA, fp32 (or bf16 when asked) on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_autocast_works():
        raise InputError("--precision bf16 is not supported by this CPU's LSTM kernels (oneDNN needs AVX-512 "
                         "or newer); use --precision fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_bf16_autocast_works() -> bool:
    """Probe: on CPUs without AVX-512 (e.g. AVX2 only) oneDNN has no bf16 LSTM and autocast fails mid-step."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(4, 4)(torch.zeros(1, 1, 4))
        return True
    except RuntimeError:
        return False


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch dict once, asynchronously from pinned memory when on CUDA."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a checkpoint on disk is always complete, and on any
    failure (a full disk, Ctrl-C) the temporary file is removed before the error goes on."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by this module (plain dict; weights_only=True); a missing, truncated or corrupt
    file is one InputError line saying what to re-run."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint here (run `python medhmp.py pretrain` first)")
    level = path.stem if path.stem in LEVELS else "stay|admission"
    state = read_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                      f"re-run `python medhmp.py pretrain --level {level}` for it")
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a medhmp checkpoint; re-run `python medhmp.py pretrain --level {level}`")
    return state


def _versions() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"python": platform.python_version(), "torch": str(torch.__version__), "git": sha or "unknown"}


def _sizes(meta: dict) -> dict:
    return {k: meta[k] for k in ModelConfig.SIZES}


def _same_model(state: dict, mcfg: ModelConfig, meta: dict) -> bool:
    """Whether a checkpoint was trained with this model config on data of these sizes."""
    return state["model_config"] == asdict(mcfg) and state["sizes"] == _sizes(meta)


# ------------------------------------------------------------------------------------------- building
def _build(cfg, data: Processed, device: torch.device, rep: Reporter):
    """The pretrainer of cfg.level and its train/val datasets; the admission stage loads the stay stage."""
    mcfg = ModelConfig.from_meta(data.meta, d_model=cfg.d_model, dropout=cfg.dropout, decoder_input=cfg.decoder_input)
    if data.meta["n_features"] == 0:  # both stages need ICU stays (admission pretraining reads their features)
        raise InputError(f"{cfg.data}: no ICU stays to pretrain on (a diagnosis extract has none; pretrain on a "
                         "MIMIC extract and preprocess this one with --vocab-from)")
    if cfg.level == "stay":
        model = StayPretrainer(StayEncoder(mcfg), mcfg)
        sets = [StayDataset(data, data.pretrain_rows("stay", s)) for s in ("train", "val")]
        return model, mcfg, sets
    model = AdmissionPretrainer(AdmissionEncoder(mcfg), mcfg)
    # --resume only skips the stay initialisation when there is an admission checkpoint to resume from
    if cfg.init_from_stay and not (cfg.resume and (Path(cfg.run) / "admission.pt").is_file()):
        stay = load_checkpoint(Path(cfg.run) / "stay.pt")
        if not _same_model(stay, mcfg, data.meta):
            raise InputError(f"{cfg.run}/stay.pt was trained with another model config or data; "
                             "re-run `pretrain --level stay` with the same --data and sizes")
        try:
            n = load_encoder(model.encoder.stay_encoder, stay["model"], "encoder.")
        except RuntimeError as err:  # missing or unexpected keys: one line on the command line, not a traceback
            raise InputError(f"{cfg.run}/stay.pt: {err}") from None
        rep.log(f"initialised the stay encoder from {cfg.run}/stay.pt ({n} tensors, all keys matched)")
    sets = [AdmissionDataset(data, data.pretrain_rows("admission", s), max_stays=cfg.max_stays)
            for s in ("train", "val")]
    return model, mcfg, sets


def _batches(n: int, batch_size: int, seed: int, epoch: int, skip: int = 0):
    """Index batches of one epoch: a permutation seeded by (seed, epoch), so resume can skip exactly."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)][skip:]


def _n_examples(batch: dict, level: str) -> int:
    """Stays (stay level) or admissions (admission level, whose "static" rows are its stays) in a batch."""
    return len(batch["static"]) if level == "stay" else len(batch["icd"])


@torch.no_grad()
def _validate(model, dataset, cfg, device, amp) -> dict:
    """Mean validation loss parts (eval mode, no shuffling)."""
    if len(dataset) == 0:
        return {}
    model.eval()
    totals, n = {}, 0
    gen = torch.Generator(device=device).manual_seed(cfg.seed)   # fixed masks: comparable across epochs
    for batch in make_loader(dataset, cfg.batch_size, pin_memory=device.type == "cuda"):
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            out = model(batch, generator=gen) if cfg.level == "admission" else model(batch)
        k = _n_examples(batch, cfg.level)
        for key in ("loss", "mcp", "cl"):
            if key in out:
                totals[key] = totals.get(key, 0.0) + float(out[key]) * k
        n += k
    model.train()
    return {f"val_{k}": v / n for k, v in totals.items()}


# ------------------------------------------------------------------------------------------- the loop
def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt, scaler, grad_clip: float) -> None:
    """Backward, unscale (fp16 only does anything), clip the gradient norm at `grad_clip`, step, clear.
    Shared by pretraining and fine-tuning (evaluate.finetune)."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def pretrain(cfg) -> dict:
    """Run one pretraining stage (cfg.level); returns the final log record."""
    rep = Reporter(cfg.quiet)
    torch.manual_seed(cfg.seed)
    device, run = resolve_device(cfg.device), Path(cfg.run)
    amp = resolve_dtype(cfg.precision, device)
    data = load_processed(cfg.data)
    model, mcfg, (train_set, val_set) = _build(cfg, data, device, rep)
    if len(train_set) == 0:
        raise InputError(f"{cfg.data}: no {cfg.level}s in the training split to pretrain on")
    model.to(device)
    # AdamW "throughout pretraining" (paper App. B); fidelity: the official code uses Adam (coupled L2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    path = run / f"{cfg.level}.pt"
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    step, saved_step = 0, None                  # saved_step: the step of the checkpoint at `path`, once known
    if cfg.resume and path.is_file():
        state = load_checkpoint(path)
        _check_resumable(state, cfg, mcfg, data)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        step = saved_step = state["step"]
        rep.log(f"resuming {path} at step {step}")
    run.mkdir(parents=True, exist_ok=True)
    resolved, versions = config_record(cfg), _versions()
    header = {"level": cfg.level, "config": resolved, "model_config": asdict(mcfg), "device": str(device),
              "dtype": str(amp).replace("torch.", ""), "parameters": count_parameters(model),
              "train": len(train_set), "val": len(val_set), "steps": total, **versions}
    (run / f"config_{cfg.level}.json").write_text(json.dumps(header, indent=1))
    rep.log(json.dumps(header))

    def checkpoint():
        nonlocal saved_step
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                         "step": step, "epoch": step // steps_per_epoch, "rng": rng, "level": cfg.level,
                         "config": resolved, "model_config": asdict(mcfg), "sizes": _sizes(data.meta),
                         "icd_vocab": data.meta["icd_vocab"], **versions}, path)
        saved_step = step

    model.train()
    record, last_log, waited, samples = {}, time.perf_counter(), 0.0, 0
    with open(run / "log.jsonl", "a") as log, rep.task(f"pretrain {cfg.level}", total, "steps") as advance:
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            t_wait = time.perf_counter()
            loader = make_loader(train_set, 0, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                 batches=_batches(len(train_set), cfg.batch_size, cfg.seed, epoch, skip))
            # a DataLoader iterator draws its base seed from the global RNG; fork it so that the dropout and
            # masking streams do not depend on where a loader started (a mid-epoch --resume starts one more)
            with torch.random.fork_rng(devices=[]):
                batches = iter(loader)
            for batch in batches:
                batch = to_device(batch, device)
                waited += time.perf_counter() - t_wait
                with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                    out = model(batch)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"the {cfg.level} loss became {float(loss.detach())} at step {step + 1}; "
                                        f"the last good checkpoint is kept at {path}")
                optimizer_step(loss, model, opt, scaler, cfg.grad_clip)
                step += 1
                samples += _n_examples(batch, cfg.level)
                parts = {k: round(float(v.detach()), 5) for k, v in out.items() if k in ("loss", "mcp", "cl")}
                end_of_epoch = step % steps_per_epoch == 0
                if step % cfg.log_every == 0 or step == total or end_of_epoch:
                    now = time.perf_counter()
                    record = {"level": cfg.level, "step": step, "epoch": step / steps_per_epoch, **parts,
                              "lr": cfg.lr, "samples_per_s": round(samples / (now - last_log), 1),
                              "data_wait": round(waited / (now - last_log), 3), "time": time.time()}
                    if end_of_epoch and cfg.eval_every and (step // steps_per_epoch) % cfg.eval_every == 0:
                        record.update(_validate(model, val_set, cfg, device, amp))
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    last_log, waited, samples = time.perf_counter(), 0.0, 0
                advance(1, status=" ".join(f"{k} {v:.4f}" for k, v in parts.items()) + f" lr {cfg.lr:.1e}")
                if step % cfg.checkpoint_every == 0 or step == total:
                    checkpoint()
                if step >= total:
                    break
                t_wait = time.perf_counter()
    if saved_step != step:                      # the loop did not run (nothing to do, or resumed at the end)
        checkpoint()
    rep.log(f"wrote {path} (step {step}); log in {run / 'log.jsonl'}")
    return record


def _check_resumable(state: dict, cfg, mcfg: ModelConfig, data: Processed) -> None:
    """Only the stopping point (epochs, max_steps) and runtime options may change on --resume."""
    free = {"epochs", "max_steps", "resume", "quiet", "device", "num_workers", "log_every", "checkpoint_every",
            "eval_every"}
    changed = [f.name for f in fields(cfg) if f.name not in free
               and str(state["config"].get(f.name)) != str(getattr(cfg, f.name))]
    if changed or not _same_model(state, mcfg, data.meta):
        raise InputError(f"cannot resume {cfg.run}/{cfg.level}.pt: settings differ ({', '.join(changed) or 'data'}); "
                         "start a new --run or drop --resume")
