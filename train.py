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
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from data import (AdmissionDataset, InputError, Processed, StayDataset, code_priors, config_record, data_digest,
                  load_processed, make_loader, prefetch, read_file, stay_baselines, to_device, torch_save,
                  weights_digest)
from folders import replace_file
from models import (AdmissionEncoder, AdmissionPretrainer, ModelConfig, StayEncoder, StayPretrainer,
                    count_parameters, load_encoder)
from progress import Reporter


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
    dropout: float = 0.1              # as ModelConfig (the official pretraining's value is unknown)
    # stage-1 decoder input (models.ModelConfig): "stay" (b at every hour) or "zeros" (the paper's wording)
    decoder_input: str = ModelConfig.decoder_input
    hour_bias: bool = ModelConfig.hour_bias
    recon_loss: str = ModelConfig.recon_loss    # stage-1 objective: mse (paper) | bce
    code_loss: str = ModelConfig.code_loss      # stage-2 masked-code objective: mse (paper) | bce
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA if supported, else fp32)
    num_workers: int = 0              # loader processes (0: batches built in the training process)
    log_every: int = 10               # steps between log lines
    checkpoint_every: int = 500       # steps between checkpoints (one is always written at the end)
    eval_every: int = 1               # epochs between validation losses (0: never)
    # fidelity: the paper trains a fixed number of epochs; here a stage stops after `patience` validation
    # passes without a lower validation loss and keeps the weights of its best pass (0: never stop early)
    patience: int = 10
    resume: bool = False
    overwrite: bool = False           # replace an existing RUN/<level>.pt instead of refusing
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
DEVICES, PRECISIONS = ("auto", "cpu", "cuda"), ("auto", "fp32", "bf16", "fp16")  # resolve_device, resolve_dtype


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
        return ((torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda"
                else torch.float32)
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


def autocast(device: torch.device, amp: torch.dtype):
    """The mixed-precision context of every forward pass (pretraining, validation, fine-tuning, prediction):
    autocast to `amp` (bf16 or fp16, from resolve_dtype), or nothing at fp32."""
    return torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)


def grad_scaler(amp: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16; disabled (a no-op) otherwise, so that every precision runs one code path."""
    return torch.amp.GradScaler("cuda", enabled=amp == torch.float16)


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save written whole (folders.replace_file): a checkpoint on disk is always complete, and a failure
    (a full disk, Ctrl-C) leaves the previous one in place and no temporary file."""
    try:
        replace_file(path, lambda tmp: torch_save(state, tmp))
    except OSError as err:  # a full disk, say: one line
        raise InputError(f"cannot write {path}: {err.strerror or err}; the previous checkpoint there is kept") from None


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


def data_mismatch(state: dict, meta: dict, sizes=ModelConfig.SIZES, vocabulary: bool = False) -> list[str]:
    """How the data a checkpoint was trained on differs from the data of `meta` in `sizes` ("n_icd 12 vs 10"),
    and, with `vocabulary` and equal sizes, in its ICD codes; [] when the checkpoint fits. The one check that a
    checkpoint fits the data: for resuming and the stage transfer here, for fine-tuning in evaluate."""
    bad = [f"{k} {state['sizes'].get(k)} vs {meta[k]}" for k in sizes if state["sizes"].get(k) != meta[k]]
    if vocabulary and not bad and state.get("icd_vocab") != meta["icd_vocab"]:
        bad = ["ICD vocabulary (same size, other codes)"]
    return bad


def _same_model(state: dict, mcfg: ModelConfig, meta: dict, fields=None) -> bool:
    """Whether a checkpoint was trained with this model config (or its `fields`) on data of these sizes."""
    mine = asdict(mcfg)
    return all(state["model_config"].get(k) == mine[k] for k in (fields or mine)) and not data_mismatch(state, meta)


# ------------------------------------------------------------------------------------------- building
def _build(cfg, data: Processed, device: torch.device, rep: Reporter):
    """The pretrainer of cfg.level, its train/val datasets and the digest of the stay checkpoint it starts
    from (None when it starts from random weights); the admission stage loads the stay stage."""
    mcfg = ModelConfig.from_meta(data.meta, d_model=cfg.d_model, dropout=cfg.dropout, decoder_input=cfg.decoder_input,
                                 recon_loss=cfg.recon_loss, code_loss=cfg.code_loss, hour_bias=cfg.hour_bias)
    if data.meta["n_features"] == 0:  # both stages need ICU stays (admission pretraining reads their features)
        raise InputError(f"{cfg.data}: no ICU stays to pretrain on (a diagnosis extract has none; pretrain on a "
                         "MIMIC extract and preprocess this one with --vocab-from)")
    if cfg.level == "stay":
        model = StayPretrainer(StayEncoder(mcfg), mcfg)
        sets = [StayDataset(data, data.pretrain_rows("stay", s)) for s in ("train", "val")]
        return model, mcfg, sets, None
    model = AdmissionPretrainer(AdmissionEncoder(mcfg), mcfg)
    parent = None
    # --resume only skips the stay initialisation when there is an admission checkpoint to resume from
    if cfg.init_from_stay and not (cfg.resume and (Path(cfg.run) / "admission.pt").is_file()):
        stay = load_checkpoint(Path(cfg.run) / "stay.pt")
        if not _same_model(stay, mcfg, data.meta, ModelConfig.ENCODER):
            raise InputError(f"{cfg.run}/stay.pt was trained with another model config or data; "
                             "re-run `pretrain --level stay` with the same --data and sizes")
        try:
            n = load_encoder(model.encoder.stay_encoder, stay["model"], "encoder.")
        except RuntimeError as err:  # missing or unexpected keys: one line on the command line, not a traceback
            raise InputError(f"{cfg.run}/stay.pt: {err}") from None
        parent = stay.get("digest") or weights_digest(stay["model"])
        rep.log(f"initialised the stay encoder from {cfg.run}/stay.pt ({n} tensors, all keys matched)")
    sets = [AdmissionDataset(data, data.pretrain_rows("admission", s), max_stays=cfg.max_stays)
            for s in ("train", "val")]
    return model, mcfg, sets, parent


def _batches(n: int, batch_size: int, seed: int, epoch: int, skip: int = 0):
    """Index batches of one epoch: a permutation seeded by (seed, epoch), so resume can skip exactly."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)][skip:]


def _n_examples(batch: dict, level: str) -> int:
    """Stays (stay level) or admissions (admission level, whose "static" rows are its stays) in a batch."""
    return len(batch["static"]) if level == "stay" else len(batch["icd"])


@torch.no_grad()
def _validate(model, dataset, cfg, device, amp, priors: dict | None) -> dict:
    """Mean validation loss parts (eval mode, no shuffling); at the admission level also the masked-code
    loss of each no-learning prior on the same masks (`val_mcp_<name>`) and the contrastive chance level."""
    if len(dataset) == 0:
        return {}
    model.eval()
    totals, n = {}, 0
    gen = torch.Generator(device=device).manual_seed(cfg.seed)   # fixed masks: comparable across epochs
    for batch in prefetch(make_loader(dataset, cfg.batch_size, pin_memory=device.type == "cuda"), device):
        with autocast(device, amp):
            out = model(batch, generator=gen, priors=priors) if cfg.level == "admission" else model(batch)
        k = _n_examples(batch, cfg.level)
        for key, value in out.items():  # summed on the device: one read-back at the end, not one per batch
            if key in ("loss", "mse") or key.startswith(("mcp", "cl")):
                totals[key] = totals.get(key, 0.0) + value.detach().double() * k
        n += k
    model.train()
    return {f"val_{k}": float(v) / n for k, v in totals.items()}


# ------------------------------------------------------------------------------------------- health
BASELINE_NAMES = {"zeros": "all zeros", "feature_rate": "each feature's rate",
                  "cell_mean": "the (hour, feature) mean pattern", "none": "predicting no code",
                  "frequency": "each code's training frequency"}


def health(level: str, val: dict, baselines: dict) -> dict:
    """The validation objective beside its best no-learning baseline: relative gains (+ = better than it)."""
    if level == "stay":
        best = min(baselines, key=baselines.get)
        return {"baseline": best, "baseline_value": baselines[best], "gain": 1 - val["val_mse"] / baselines[best]}
    best = min(("none", "frequency"), key=lambda k: val[f"val_mcp_{k}"])
    base = val[f"val_mcp_{best}"]
    return {"baseline": best, "baseline_value": base, "gain": 1 - val["val_mcp"] / base,
            "cl_chance": val["val_cl_chance"], "cl_gain": val["val_cl_chance"] - val["val_cl"]}


def health_status(h: dict) -> str:
    """Short form for the progress line."""
    return (f"val {100 * h['gain']:+.1f}% vs {h['baseline'].replace('_', ' ')}"
            + (f", cl {h['cl_gain']:+.2f} vs chance" if "cl_gain" in h else ""))


def verdict(level: str, h: dict | None, epoch: float | None) -> tuple[str, bool]:
    """One plain sentence on what the stage learned (at its best validation pass), and whether it learned."""
    if h is None:
        return f"stage {1 if level == 'stay' else 2}: no validation split, so nothing shows whether it learned", True
    where, pct = f" (best validation pass, epoch {epoch:g})", 100 * abs(h["gain"])
    side, base = "below" if h["gain"] > 0 else "above", BASELINE_NAMES[h["baseline"]]
    if level == "stay":
        what = ("carries nothing measurable beyond the population pattern" if h["gain"] <= 0 else
                "carries little" if h["gain"] < 0.05 else "carries part of each stay" if h["gain"] < 0.15
                else "carries much of each stay")
        return (f"stage 1: validation MSE {pct:.1f}% {side} {base}{where}; the stay vector {what}", h["gain"] > 0)
    learned = h["gain"] > 0 and h["cl_gain"] > 0
    return (f"stage 2: validation masked-code loss {pct:.1f}% {side} {base}, contrastive loss "
            f"{abs(h['cl_gain']):.2f} {'below' if h['cl_gain'] > 0 else 'above'} chance ({h['cl_chance']:.2f})"
            f"{where}", learned)


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


class _FiniteWatch:
    """The first step whose loss was NaN or inf, kept on the device so that the loop reads no loss back per step
    (a GPU would wait); `check`, at each log line and before each checkpoint, reads it and raises NonFiniteLoss:
    a non-finite step is never logged, validated or written, and the error names it."""

    def __init__(self, device: torch.device):
        self.step, self.value = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), device=device)

    def see(self, loss: torch.Tensor, step: int) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.step == 0)
        self.step, self.value = torch.where(new, step, self.step), torch.where(new, loss.detach().float(), self.value)

    def check(self, level: str, saved_step: int | None, path: Path) -> None:
        if int(self.step):  # the one read-back
            kept = (f"the last good checkpoint (step {saved_step}) is kept at {path}" if saved_step
                    else "no checkpoint was written")
            raise NonFiniteLoss(f"the {level} loss became {float(self.value)} at step {int(self.step)}; {kept}; "
                                "lower --lr")


class _Best:
    """The best validation pass so far, its weights (copied) and the patience left."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.loss, self.epoch, self.step = state.get("val_loss", math.inf), state.get("epoch"), state.get("step")
        self.health, self.bad, self.weights = state.get("health"), state.get("bad", 0), None

    def update(self, model, record: dict, h: dict | None) -> bool:
        """Keep the weights when the validation loss improved; returns whether it did."""
        if record["val_loss"] < self.loss:
            self.loss, self.epoch, self.step, self.health, self.bad = (record["val_loss"], record["epoch"],
                                                                       record["step"], h, 0)
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad += 1
        return False

    def record(self) -> dict:
        return {"val_loss": self.loss, "epoch": self.epoch, "step": self.step, "health": self.health, "bad": self.bad}


def _no_learning(cfg, data: Processed, model, sets, mask_rate: float, device, fresh: bool) -> tuple[dict, dict]:
    """The stage's no-learning baselines, fitted once on the training split (every run says whether it learned):
    (stay level: validation MSE per baseline, admission level: code priors on `device`); a `fresh` model starts
    at the best of them (the (T, F) cell means, or each code's frequency)."""
    train_rows = sets[0].rows.numpy()
    if cfg.level == "stay":
        baselines, cell_mean = stay_baselines(data, train_rows, sets[1].rows.numpy())
        if fresh:
            model.init_pattern(cell_mean.to(device))
        return baselines, None
    priors = {name: {m: p.to(device) for m, p in prior.items()}
              for name, prior in code_priors(data, train_rows, mask_rate).items()}
    if fresh:  # fidelity: the paper does not say how the code heads start; from ½ everywhere they stalled
        model.init_priors(priors["frequency"])
    return {}, priors


def _check_start(cfg, path: Path) -> None:
    """Refuse, before any work, what would lose a checkpoint or train on a meaningless objective."""
    if cfg.level == "admission" and cfg.batch_size < 2:
        raise InputError("admission pretraining needs --batch-size >= 2: its contrastive loss takes the other "
                         "admissions of a batch as negatives")
    if path.is_file() and not cfg.resume and not cfg.overwrite:
        raise InputError(f"{path} exists; pass --resume to continue it, --overwrite to replace it, or choose "
                         "another --run")


def _restore(state: dict, model, opt, scaler, device) -> _Best:
    """Load a checkpoint's training state into the model and optimiser; returns its best-so-far record."""
    model.load_state_dict(state["last_model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    best = _Best(state["best"])
    if state["best"].get("step") is not None:
        best.weights = {k: v.to(device) for k, v in state["model"].items()}
    return best


def pretrain(cfg) -> dict:
    """Run one pretraining stage (cfg.level); returns the final log record, with the stage's verdict."""
    rep = Reporter(cfg.quiet)
    torch.manual_seed(cfg.seed)
    device, run = resolve_device(cfg.device), Path(cfg.run)
    amp, path = resolve_dtype(cfg.precision, device), run / f"{cfg.level}.pt"
    _check_start(cfg, path)
    data = load_processed(cfg.data)
    model, mcfg, (train_set, val_set), parent = _build(cfg, data, device, rep)
    if len(train_set) == 0:
        raise InputError(f"{cfg.data}: no {cfg.level}s in the training split to pretrain on")
    model.to(device)
    # AdamW "throughout pretraining" (paper App. B); fidelity: the official code uses Adam (coupled L2)
    opt, scaler = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay), grad_scaler(amp)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    step, saved_step, best = 0, None, _Best()    # saved_step: the step of the checkpoint at `path`, once known
    if cfg.resume and path.is_file():
        state = load_checkpoint(path)
        _check_resumable(state, cfg, mcfg, data)
        best, step = _restore(state, model, opt, scaler, device), state["step"]
        saved_step, parent = step, state.get("stay_digest")
        rep.log(f"resuming {path} at step {step}")
    elif cfg.resume:
        rep.log(f"nothing to resume at {path}: starting a new run")
    baselines, priors = _no_learning(cfg, data, model, (train_set, val_set), mcfg.mask_rate, device, fresh=step == 0)
    run.mkdir(parents=True, exist_ok=True)
    resolved, versions = config_record(cfg), _versions()
    header = {"level": cfg.level, "config": resolved, "model_config": asdict(mcfg), "device": str(device),
              "dtype": str(amp).replace("torch.", ""), "parameters": count_parameters(model),
              "train": len(train_set), "val": len(val_set), "steps": total, **versions}
    (run / f"config_{cfg.level}.json").write_text(json.dumps(header, indent=1))
    rep.log(json.dumps(header))
    extra = {"data_digest": data_digest(cfg.data), "stay_digest": parent, "icd_vocab": data.meta["icd_vocab"],
             "sizes": {k: data.meta[k] for k in ModelConfig.SIZES}}

    def checkpoint():
        nonlocal saved_step
        rng = {"torch": torch.get_rng_state(),
               **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}
        last = model.state_dict()
        weights = best.weights if best.weights is not None else last  # the best validation pass, else the last
        save_checkpoint({"model": weights, "last_model": last, "optimizer": opt.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                         "best": best.record(), "rng": rng, "level": cfg.level, "config": resolved,
                         "model_config": asdict(mcfg), "digest": weights_digest(weights), **extra, **versions}, path)
        saved_step = step

    model.train()
    record, last_log, waited, samples, status, shown = {}, time.perf_counter(), 0.0, 0, "", ""
    watch = _FiniteWatch(device)
    stopped = cfg.patience and best.bad >= cfg.patience
    with open(run / "log.jsonl", "a") as log, rep.task(f"pretrain {cfg.level}", total, "steps") as advance:
        log.write(json.dumps({"event": "start", "level": cfg.level, "step": step, "resume": cfg.resume,
                              "time": time.time(), "baselines": baselines}) + "\n")
        while step < total and not stopped:
            epoch, skip = divmod(step, steps_per_epoch)
            t_wait = time.perf_counter()
            loader = make_loader(train_set, 0, num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                 batches=_batches(len(train_set), cfg.batch_size, cfg.seed, epoch, skip))
            # a DataLoader iterator draws its base seed from the global RNG; fork it so that the dropout and
            # masking streams do not depend on where a loader started (a mid-epoch --resume starts one more)
            with torch.random.fork_rng(devices=[]):
                batches = prefetch(iter(loader), device)  # batch i + 1 is built and moved during step i
            for batch in batches:
                waited += time.perf_counter() - t_wait
                with autocast(device, amp):
                    out = model(batch)
                watch.see(out["loss"], step + 1)          # no read-back here: the host never waits for a step
                optimizer_step(out["loss"], model, opt, scaler, cfg.grad_clip)
                step += 1
                samples += _n_examples(batch, cfg.level)
                end_of_epoch = step % steps_per_epoch == 0
                logged = step % cfg.log_every == 0 or step == total or end_of_epoch
                if logged or step % cfg.checkpoint_every == 0:
                    watch.check(cfg.level, saved_step, path)   # before any line, validation or checkpoint
                if logged:
                    now = time.perf_counter()
                    parts = {k: round(float(out[k].detach()), 5) for k in ("loss", "mse", "mcp", "cl") if k in out}
                    record = {"level": cfg.level, "step": step, "epoch": step / steps_per_epoch, **parts,
                              "lr": cfg.lr, "samples_per_s": round(samples / (now - last_log), 1),
                              "data_wait": round(waited / (now - last_log), 3), "time": time.time()}
                    if end_of_epoch and cfg.eval_every and (step // steps_per_epoch) % cfg.eval_every == 0:
                        record.update(_validate(model, val_set, cfg, device, amp, priors))
                    if "val_loss" in record:
                        h = health(cfg.level, record, baselines)
                        best.update(model, record, h)
                        record.update(health=h, best_epoch=best.epoch)
                        status = " | " + health_status(h)
                        stopped = bool(cfg.patience) and best.bad >= cfg.patience
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    last_log, waited, samples = time.perf_counter(), 0.0, 0
                    shown = " ".join(f"{k} {v:.4f}" for k, v in parts.items()) + f" lr {cfg.lr:.1e}" + status
                advance(1, status=shown)
                if step % cfg.checkpoint_every == 0 or step == total or stopped:
                    checkpoint()
                if step >= total or stopped:
                    break
                t_wait = time.perf_counter()
        sentence, learned = verdict(cfg.level, best.health, best.epoch)
        log.write(json.dumps({"event": "end", "level": cfg.level, "step": step, "stopped_early": bool(stopped),
                              "best": best.record(), "verdict": sentence, "learned": learned}) + "\n")
    if saved_step != step:                      # the loop did not run (nothing to do, or resumed at the end)
        checkpoint()
    if stopped:
        rep.log(f"stopped early at step {step}: no better validation loss for {cfg.patience} passes; "
                f"kept the weights of epoch {best.epoch:g}")
    rep.log(sentence if learned else f"warning: {sentence}")
    rep.log(f"wrote {path} (step {step}); log in {run / 'log.jsonl'}")
    return {**record, "verdict": sentence, "learned": learned, "best": best.record()}


def _check_resumable(state: dict, cfg, mcfg: ModelConfig, data: Processed) -> None:
    """Only the stopping point and runtime options may change on --resume; the data are compared by content,
    so relative paths and a moved folder resume."""
    free = {"data", "run", "epochs", "max_steps", "resume", "overwrite", "quiet", "device", "num_workers",
            "log_every", "checkpoint_every", "eval_every", "patience"}
    changed = [f"{f.name} {state['config'].get(f.name)} -> {getattr(cfg, f.name)}" for f in fields(cfg)
               if f.name not in free and str(state["config"].get(f.name)) != str(getattr(cfg, f.name))]
    if state.get("data_digest") != data_digest(cfg.data) or not _same_model(state, mcfg, data.meta):
        changed.append(f"the processed data ({cfg.data} is not the folder it was trained on)")
    if changed:
        raise InputError(f"cannot resume {cfg.run}/{cfg.level}.pt: settings differ ({'; '.join(changed)}); "
                         "resume with its settings, or start a new --run")
