"""Train: the two pretraining stages of MedHMP, bottom-up (stay level, then admission level).

Usage:
    python medhmp.py pretrain --level stay       --data data/processed --run runs/default
    python medhmp.py pretrain --level admission  --data data/processed --run runs/default
Reads DATA/ (meta.json, stays.pt, admissions.pt, splits.json). Writes RUN/stay.pt or
RUN/admission.pt (plain-dict checkpoints, loadable with torch.load(weights_only=True)),
RUN/config_<level>.json and one JSON line per log interval in RUN/log.jsonl. The admission stage
starts from RUN/stay.pt, and every stay-encoder weight must transfer. `--resume` continues exactly
where the last checkpoint stopped. Pretraining sees the training split only; the validation split
gives a held-out loss per epoch. The loop is `pretrain`: `start` sets a stage up once (model, data,
optimiser, resume, no-learning baselines, run header), then a plain `while` over epochs and steps
whose body is the step (`train_step`), a log line (`log_step`) and a checkpoint (`save`); its state
is one `LoopState`.

Under torchrun (`torchrun --nproc-per-node N -- medhmp.py pretrain ...`, docs/distributed.md) the
same loop runs in every process with DistributedDataParallel: --batch-size is the global batch, of
which each process takes its part (`epoch_batches`); stage 2's contrastive negatives are gathered
across the processes (models.Shard); validation, the log line's loss parts and the no-learning
baselines are summed across them, so every process reaches the same numbers, verdict and stopping
decision; process 0 alone writes RUN/. One run at a time writes a RUN: process 0 holds its lock
(folders.Locked) from the checks before any work to the last checkpoint.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from checkpoints import (check_resumable, load_checkpoint, save_checkpoint, start_from_stay,
                         versions, weights_digest)
from data import (AdmissionDataset, InputError, Processed, StayDataset, config_record, data_digest,
                  load_processed, make_loader)
from folders import Locked
from health import (code_priors, contrastive_chance, health, health_status, prior_losses,
                    stay_baselines, verdict)
from models import (AdmissionEncoder, AdmissionPretrainer, ModelConfig, Shard, StayEncoder,
                    StayPretrainer, count_parameters)
from progress import Reporter
from runtime import (FiniteWatch, Ranks, autocast, check_seed, grad_scaler, optimizer_step,
                     prefetch, processes,
                     resolve_device, resolve_dtype)


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
    # stage-1 decoder input (models.ModelConfig): "stay" (b at every hour) or "zeros" (the paper)
    decoder_input: str = ModelConfig.decoder_input
    hour_bias: bool = ModelConfig.hour_bias
    recon_loss: str = ModelConfig.recon_loss    # stage-1 objective: mse (paper) | bce
    code_loss: str = ModelConfig.code_loss      # stage-2 masked-code objective: mse (paper) | bce
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA if supported)
    num_workers: int = 0              # loader processes (0: batches built in the training process)
    log_every: int = 10               # steps between log lines
    checkpoint_every: int = 500       # steps between checkpoints (one is always written at the end)
    eval_every: int = 1               # epochs between validation losses (0: never)
    # fidelity: the paper trains a fixed number of epochs; here a stage stops after `patience`
    # validation passes without a lower validation loss and keeps the weights of its best pass
    # (0: never stop early)
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
    init_from_stay: bool = True       # start from RUN/stay.pt (MedHMP a+s); False: the "a" ablation

    level = "admission"


LEVELS = {"stay": StayPretrainConfig, "admission": AdmissionPretrainConfig}
# the loss parts a log line shows (mse: stay level; mcp, cl: admission)
PARTS = ("loss", "mse", "mcp", "cl")


# ----------------------------------------------------------------------------------------- building
def build(cfg, data: Processed, rep: Reporter):
    """The pretrainer of cfg.level, its train/val datasets and the digest of the stay checkpoint it
    starts from (None when it starts from random weights); the admission stage loads the stay
    stage."""
    mcfg = ModelConfig.from_meta(data.meta, d_model=cfg.d_model, dropout=cfg.dropout,
                                 decoder_input=cfg.decoder_input, recon_loss=cfg.recon_loss,
                                 code_loss=cfg.code_loss, hour_bias=cfg.hour_bias)
    # both stages need ICU stays (admission pretraining reads their features)
    if data.meta["n_features"] == 0 or len(data.stays["stay_id"]) == 0:
        raise InputError(f"{cfg.data}: no ICU stays to pretrain on ({no_stays_why(data.meta)})")
    if cfg.level == "stay":
        model = StayPretrainer(StayEncoder(mcfg), mcfg)
        sets = [StayDataset(data, data.pretrain_rows("stay", s)) for s in ("train", "val")]
        return model, mcfg, sets, None
    model = AdmissionPretrainer(AdmissionEncoder(mcfg), mcfg)
    parent = None
    # --resume only skips the stay initialisation when an admission checkpoint is there to resume
    if cfg.init_from_stay and not (cfg.resume and (Path(cfg.run) / "admission.pt").is_file()):
        n, parent = start_from_stay(model.encoder, cfg.run, mcfg, data.meta)
        rep.log(f"initialised the stay encoder from {cfg.run}/stay.pt ({n} tensors, all keys "
                "matched)")
    sets = [AdmissionDataset(data, data.pretrain_rows("admission", s), max_stays=cfg.max_stays)
            for s in ("train", "val")]
    return model, mcfg, sets, parent


def no_stays_why(meta: dict) -> str:
    """Why a processed folder has no ICU stay, and what to do: a diagnosis extract has none; a MIMIC
    extract lost them at an attrition step of preprocessing (meta.json `attrition`, which its
    preprocess warning explained)."""
    if meta.get("layout") == "trinetx":
        return ("a diagnosis extract has none; pretrain on a MIMIC extract and preprocess this one "
                "with --vocab-from")
    steps = meta.get("attrition", {}).get("stays", [])
    step = next((name for name, n in steps if n == 0), None)
    where = f" at '{step}'" if step else ""
    return (f"preprocessing lost every stay of this {meta.get('layout', 'MIMIC')} extract{where}, "
            "see meta.json attrition and the warning preprocess printed; pretrain on an extract "
            "with ICU stays and their chart events (MetaVision, for MIMIC-III)")


def no_learning(cfg, data: Processed, model, sets, mask_rate: float, device, fresh: bool,
                ranks: Ranks) -> tuple:
    """The stage's no-learning baselines (health.py), fitted once on the training split so that
    every run says whether it learned: (stay level: validation MSE per baseline, admission level:
    code priors on `device`); a `fresh` model starts at the best of them (the (T, F) cell means, or
    each code's frequency). Several processes count a part each and sum the counts."""
    train_rows = sets[0].rows.numpy()
    if cfg.level == "stay":
        baselines, cell_mean = stay_baselines(data, train_rows, sets[1].rows.numpy(), ranks)
        if fresh:
            model.init_pattern(cell_mean.to(device))
        return baselines, None
    priors = {name: {m: p.to(device) for m, p in prior.items()}
              for name, prior in code_priors(data, train_rows, mask_rate, ranks).items()}
    # fidelity: the paper does not say how the code heads start; from ½ everywhere they stalled
    if fresh:
        model.init_priors(priors["frequency"])
    return {}, priors


def check_options(cfg) -> None:
    """Refuse, before any work, options the model or the generators cannot take (one line each)."""
    check_seed(cfg.seed)
    heads = ModelConfig.n_heads
    if cfg.d_model % heads:
        raise InputError(f"--d-model {cfg.d_model}: must be a multiple of {heads}, the number of "
                         f"attention heads (e.g. {max(heads, cfg.d_model // heads * heads)})")


def check_start(cfg, path: Path, world: int = 1) -> None:
    """Refuse, before any work, what would lose a checkpoint or train on a meaningless objective."""
    if cfg.level == "admission" and cfg.batch_size < 2:
        raise InputError("admission pretraining needs --batch-size >= 2: its contrastive loss "
                         "takes the other admissions of a batch as negatives")
    if cfg.batch_size < world:
        raise InputError(f"--batch-size {cfg.batch_size} is the whole batch, split across the "
                         f"{world} processes of this run: it needs at least one row for each")
    if path.is_file() and not cfg.resume and not cfg.overwrite:
        raise InputError(f"{path} exists; pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --run")


class Best:
    """The best validation pass so far, its weights (copied) and the patience left."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.loss, self.epoch = state.get("val_loss", math.inf), state.get("epoch")
        self.step, self.health = state.get("step"), state.get("health")
        self.bad, self.weights = state.get("bad", 0), None

    def update(self, model, record: dict, h: dict | None) -> bool:
        """Keep the weights when the validation loss improved; returns whether it did."""
        if record["val_loss"] < self.loss:
            self.loss, self.epoch, self.step = record["val_loss"], record["epoch"], record["step"]
            self.health, self.bad = h, 0
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad += 1
        return False

    def record(self) -> dict:
        return {"val_loss": self.loss, "epoch": self.epoch, "step": self.step,
                "health": self.health, "bad": self.bad}


def rng_state(device) -> dict:
    """This process's random state: the CPU generator, and the GPU's when it computes on one."""
    return {"torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def set_rng(rng: dict, device) -> None:
    """Put back a random state of `rng_state`."""
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def restore(state: dict, model, opt, scaler, device) -> Best:
    """Load a checkpoint's training state into the model and optimiser; returns its best-so-far
    record."""
    model.load_state_dict(state["last_model"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng(state["rng"], device)
    best = Best(state["best"])
    if state["best"].get("step") is not None:
        best.weights = {k: v.to(device) for k, v in state["model"].items()}
    return best


# ---------------------------------------------------------------------------------------- the stage
@dataclass
class Stage:
    """What the loop of one stage reads, set up once by `start`."""
    cfg: StayPretrainConfig           # or AdmissionPretrainConfig
    model: torch.nn.Module            # StayPretrainer or AdmissionPretrainer, on `device`
    train_set: StayDataset
    val_set: StayDataset
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: torch.dtype                  # autocast dtype (runtime.resolve_dtype)
    path: Path                        # RUN/<level>.pt
    steps_per_epoch: int
    total: int                        # the step this run ends at
    baselines: dict                   # stay level: validation MSE of each no-learning predictor
    priors: dict | None               # admission level: the no-learning code priors, on `device`
    header: dict                      # RUN/config_<level>.json: config, model config, versions
    extra: dict                       # what every checkpoint records besides weights and state
    ranks: Ranks = field(default_factory=Ranks)   # the run's processes (one: Ranks())
    net: torch.nn.Module | None = None     # what the step calls: `model`, or DDP around it
    masks: torch.Generator | None = None   # several processes: the code-mask stream they share


@dataclass
class LoopState:
    """Where the loop is, the best validation pass, and what the next log line counts."""
    best: Best
    step: int = 0
    saved_step: int | None = None     # the step of the checkpoint at Stage.path, once known
    stopped: bool = False             # `patience` passes without a better validation loss
    record: dict = field(default_factory=dict)   # the last log line
    status: str = ""                  # the health, beside the progress bar
    shown: str = ""                   # the progress bar's status: the last log line in short
    samples: int = 0                  # examples since the last log line
    waited: float = 0.0               # seconds spent waiting for batches since the last log line
    last_log: float = field(default_factory=time.perf_counter)


def epoch_steps(n: int, batch_size: int, world: int = 1) -> int:
    """Steps of an epoch of n rows: one per batch, the last batch short, and left out when it has
    fewer rows than the run has processes (each needs a row)."""
    full, rest = divmod(n, batch_size)
    return full + (rest >= world)


def start(cfg, rep: Reporter, ranks: Ranks | None = None) -> tuple[Stage, LoopState]:
    """Everything before the first step: refuse what would lose work, build the model, its data and
    optimiser, resume, fit the no-learning baselines and write the run header (process 0)."""
    torch.manual_seed(cfg.seed)
    ranks = ranks or Ranks(device=resolve_device(cfg.device))
    device, run = ranks.device, Path(cfg.run)
    amp, path = resolve_dtype(cfg.precision, device), run / f"{cfg.level}.pt"
    check_start(cfg, path, ranks.world)
    data = load_processed(cfg.data)
    model, mcfg, (train_set, val_set), parent = build(cfg, data, rep)
    if len(train_set) == 0:
        raise InputError(f"{cfg.data}: no {cfg.level}s in the training split to pretrain on")
    steps_per_epoch = epoch_steps(len(train_set), cfg.batch_size, ranks.world)
    if steps_per_epoch == 0:
        raise InputError(f"{cfg.data}: {len(train_set)} {cfg.level}s in the training split, fewer "
                         f"than the {ranks.world} processes of this run")
    model.to(device)
    # AdamW "throughout pretraining" (paper App. B); fidelity: the official code uses Adam
    # (coupled L2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler, total = grad_scaler(amp), cfg.epochs * steps_per_epoch
    total = total if cfg.max_steps is None else min(cfg.max_steps, total)
    state = resumed(cfg, path, mcfg, data.meta, ranks.world, rep)
    best = Best() if state is None else restore(state, model, opt, scaler, device)
    step = 0 if state is None else state["step"]
    parent = parent if state is None else state.get("stay_digest")
    baselines, priors = no_learning(cfg, data, model, (train_set, val_set), mcfg.mask_rate, device,
                                    step == 0, ranks)
    about = versions()
    header = {"level": cfg.level, "config": config_record(cfg), "model_config": asdict(mcfg),
              "device": str(device), "dtype": str(amp).replace("torch.", ""),
              "parameters": count_parameters(model), "train": len(train_set), "val": len(val_set),
              "steps": total, **about, **({"world_size": ranks.world} if ranks.many else {})}
    if ranks.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / f"config_{cfg.level}.json").write_text(json.dumps(header, indent=1))
        rep.log(json.dumps(header))
    extra = {"data_digest": data_digest(cfg.data), "stay_digest": parent,
             "icd_vocab": data.meta["icd_vocab"],
             "sizes": {k: data.meta[k] for k in ModelConfig.SIZES}, **about}
    stage = Stage(cfg, model, train_set, val_set, opt, scaler, device, amp, path, steps_per_epoch,
                  total, baselines, priors, header, extra, ranks, model)
    if ranks.many:
        spread(stage, state)
    stopped = bool(cfg.patience) and best.bad >= cfg.patience  # a resumed run that had stopped
    return stage, LoopState(best, step, None if state is None else step, stopped)


def resumed(cfg, path: Path, mcfg: ModelConfig, meta: dict, world: int, rep) -> dict | None:
    """The checkpoint --resume continues (checked: same settings, data and number of processes),
    or None for a new run."""
    if cfg.resume and path.is_file():
        state = load_checkpoint(path)
        check_resumable(state, cfg, mcfg, meta, world)
        rep.log(f"resuming {path} at step {state['step']}")
        return state
    if cfg.resume:
        rep.log(f"nothing to resume at {path}: starting a new run")
    return None


def spread(stage: Stage, state: dict | None) -> None:
    """A run of several processes: DDP around the model (it averages the gradients and starts every
    process from process 0's weights), the code-mask stream every process draws the whole batch's
    masks from (started where one process's would start, so that with no dropout the run is one
    process's run), and a dropout stream of each process's own (seeded by seed and rank); both
    resumed from the checkpoint when there is one."""
    ranks, device = stage.ranks, stage.device
    stage.masks = torch.Generator(device=device)
    stage.masks.set_state(rng_state(device)["cuda" if device.type == "cuda" else "torch"])
    torch.manual_seed(stage.cfg.seed * 1_000_003 + 1 + ranks.rank)
    if state is not None:
        stage.masks.set_state(state["mask_rng"])
        set_rng(state["rng_ranks"][ranks.rank], device)
    stage.net = DistributedDataParallel(stage.model,
                                        device_ids=[device] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------- the loop
def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int, skip: int = 0,
                     least: int = 1) -> list[list[int]]:
    """Index batches of one epoch: a permutation seeded by (seed, epoch), so resume can skip
    exactly, and every process of a run draws the same one. Batches of fewer than `least` rows
    (the run's processes: at most the epoch's last batch) are left out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= least][skip:]


def shard_of(ranks: Ranks, n: int) -> Shard | None:
    """This process's place in a batch of n rows split across the run's processes (runtime.Ranks
    .part splits it); None in a run of one process."""
    if not ranks.many:
        return None
    sizes = ranks.sizes(n)
    return Shard(offset=sum(sizes[:ranks.rank]), size=n,
                 gather=functools.partial(ranks.gather, sizes=sizes), total=ranks.total)


def epoch_batches(stage: Stage, step: int):
    """(batch, shard) from `step` to the end of its epoch: this process's part of each batch of the
    epoch (all of it in a run of one process, whose shard is None), each built and moved one step
    ahead."""
    cfg, ranks = stage.cfg, stage.ranks
    epoch, skip = divmod(step, stage.steps_per_epoch)
    batches = shuffled_batches(len(stage.train_set), cfg.batch_size, cfg.seed, epoch, skip,
                               least=ranks.world)
    loader = make_loader(stage.train_set, 0, num_workers=cfg.num_workers,
                         pin_memory=stage.device.type == "cuda",
                         batches=[ranks.part(b) for b in batches])
    # a DataLoader iterator draws its base seed from the global RNG; fork it so that the dropout and
    # masking streams do not depend on where a loader started (a mid-epoch --resume starts one more)
    with torch.random.fork_rng(devices=[]):
        moved = prefetch(iter(loader), stage.device)  # batch i + 1 is built and moved during step i
    return zip(moved, [shard_of(ranks, len(b)) for b in batches])


def n_examples(batch: dict, level: str) -> int:
    """Stays (stay level) or admissions (admission level, whose "static" rows are its stays) in a
    batch."""
    return len(batch["static"]) if level == "stay" else len(batch["icd"])


def train_step(stage: Stage, batch: dict, shard: Shard | None, watch: FiniteWatch,
               step: int) -> dict:
    """Forward, backward and optimiser step on one batch (this process's part of it); returns the
    loss parts a log line shows, on the device (not read back)."""
    with autocast(stage.device, stage.amp):
        if shard is None:
            out = stage.model(batch)
        elif stage.cfg.level == "stay":
            out = stage.net(batch, shard=shard)
        else:
            out = stage.net(batch, generator=stage.masks, shard=shard)
    watch.see(out["loss"], step)        # no read-back: the host never waits
    # each process's loss is its share of the whole batch's and DDP averages the gradients over
    # the N processes: N x the share makes the average the whole batch's gradient
    loss = out["loss"] if shard is None else out["loss"] * stage.ranks.world
    optimizer_step(loss, stage.net, stage.opt, stage.scaler, stage.cfg.grad_clip)
    return {k: v for k, v in out.items() if k in PARTS}  # frees the admission masks


def admission_losses(model: AdmissionPretrainer, batch: dict, generator, priors: dict) -> dict:
    """The admission objective's loss parts on one batch, beside what learning nothing scores on the
    same masks and rows (health.prior_losses, health.contrastive_chance)."""
    out = model(batch, generator=generator)
    return {**prior_losses(out["masked_codes"], priors, model.cfg.code_loss), **out,
            "cl_chance": contrastive_chance(batch, model.cfg.cl_include_positive)}


def val_keys(level: str, priors: dict | None) -> tuple[str, ...]:
    """The loss parts a validation pass averages, in the order its record shows them."""
    if level == "stay":
        return ("loss", "mse")
    return (*(f"mcp_{name}" for name in priors), "loss", "mcp", "cl", "cl_chance")


@torch.no_grad()
def validate(model, dataset, cfg, device, amp, priors: dict | None,
             ranks: Ranks | None = None) -> dict:
    """Mean validation loss parts (eval mode, no shuffling); at the admission level also the
    masked-code loss of each no-learning prior on the same masks (`val_mcp_<name>`) and the
    contrastive chance level. Several processes validate every N-th batch each, whole (a process
    draws and drops the masks of the others' batches: AdmissionPretrainer.skip_masks), and add the
    batches' sums in batch order: every process gets the numbers one process gets."""
    if len(dataset) == 0:
        return {}
    ranks = ranks or Ranks(device=device)
    model.eval()
    # fixed masks: comparable across epochs
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n, keys = len(dataset), val_keys(cfg.level, priors)
    batches = [list(range(i, min(i + cfg.batch_size, n))) for i in range(0, n, cfg.batch_size)]
    mine = prefetch(make_loader(dataset, 0, pin_memory=device.type == "cuda",
                                batches=batches[ranks.rank::ranks.world]), device)
    sums = torch.zeros(len(batches), len(keys), dtype=torch.float64,
                       device=device)  # (batches, keys) each batch's sums
    for i, rows in enumerate(batches):
        if i % ranks.world != ranks.rank:
            if cfg.level == "admission":
                model.skip_masks(len(rows), gen)
            continue
        batch = next(mine)
        with autocast(device, amp):
            out = (model(batch) if cfg.level == "stay" else
                   admission_losses(model, batch, gen, priors))
        k = n_examples(batch, cfg.level)
        # summed on the device: one read-back at the end, not one per batch
        sums[i] = torch.stack([out[key].detach().double() * k for key in keys])
    model.train()
    totals = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for row in ranks.total(sums):  # each batch's row comes from the one process that validated it
        totals = totals + row
    return {f"val_{key}": float(v) / n for key, v in zip(keys, totals)}


def log_step(stage: Stage, st: LoopState, parts: dict, end_of_epoch: bool, log) -> None:
    """One line of RUN/log.jsonl: the step's loss parts (read back now, not per step; summed over
    the processes of a run of several), throughput and data wait; at an epoch end (every
    `eval_every`) also the validation losses, the health beside the no-learning baselines, the best
    pass and early stopping. Every process computes the line; process 0's `log` is the file."""
    cfg, elapsed = stage.cfg, time.perf_counter() - st.last_log
    if stage.ranks.many:
        summed = stage.ranks.total(torch.stack([v.detach().float() for v in parts.values()]))
        parts = dict(zip(parts, summed))
    parts = {k: round(float(v.detach()), 5) for k, v in parts.items()}
    st.record = {"level": cfg.level, "step": st.step, "epoch": st.step / stage.steps_per_epoch,
                 **parts, "lr": cfg.lr, "samples_per_s": round(st.samples / elapsed, 1),
                 "data_wait": round(st.waited / elapsed, 3), "time": time.time()}
    if end_of_epoch and cfg.eval_every and (st.step // stage.steps_per_epoch) % cfg.eval_every == 0:
        st.record.update(validate(stage.model, stage.val_set, cfg, stage.device, stage.amp,
                                  stage.priors, stage.ranks))
    if "val_loss" in st.record:
        h = health(cfg.level, st.record, stage.baselines)
        st.best.update(stage.model, st.record, h)
        st.record.update(health=h, best_epoch=st.best.epoch)
        st.status = " | " + health_status(h)
        st.stopped = bool(cfg.patience) and st.best.bad >= cfg.patience
    log.write(json.dumps(st.record) + "\n")
    log.flush()
    st.last_log, st.waited, st.samples = time.perf_counter(), 0.0, 0
    st.shown = " ".join(f"{k} {v:.4f}" for k, v in parts.items()) + f" lr {cfg.lr:.1e}" + st.status


def save(stage: Stage, st: LoopState) -> None:
    """RUN/<level>.pt: the weights of the best validation pass (else the last) and all that resuming
    needs; written by process 0 alone, after every process has handed it its random state."""
    ranks, rng = stage.ranks, rng_state(stage.device)
    spread_state = ({"world_size": ranks.world, "rng_ranks": ranks.objects(rng),
                     "mask_rng": stage.masks.get_state()} if ranks.many else {})
    if ranks.rank == 0:
        last = stage.model.state_dict()
        weights = st.best.weights if st.best.weights is not None else last
        state = {"model": weights, "last_model": last, "optimizer": stage.opt.state_dict(),
                 "scaler": stage.scaler.state_dict(), "step": st.step,
                 "epoch": st.step // stage.steps_per_epoch, "best": st.best.record(),
                 "rng": rng, "level": stage.cfg.level,
                 "config": stage.header["config"], "model_config": stage.header["model_config"],
                 "digest": weights_digest(weights), **stage.extra, **spread_state}
        save_checkpoint(state, stage.path)
    st.saved_step = st.step


def pretrain(cfg) -> dict:
    """Run one pretraining stage (cfg.level); returns the final log record, with the stage's
    verdict. Under torchrun, in every process of the run (runtime.processes)."""
    check_options(cfg)
    with processes(resolve_device(cfg.device)) as ranks:
        # one run at a time writes a RUN: a second is refused, no checkpoint lost; process 0 writes
        with Locked(cfg.run, "--run") if ranks.rank == 0 else nullcontext():
            return pretrain_stage(cfg, ranks)


def unvalidated(stage: Stage, st: LoopState) -> str:
    """Why a stage has no validation pass to judge it by."""
    cfg = stage.cfg
    if len(stage.val_set) == 0:
        return "no validation split"
    if not cfg.eval_every:
        return "validation switched off (eval_every 0)"
    first = stage.steps_per_epoch * cfg.eval_every
    return (f"it stopped at step {st.step}, before the first validation pass (step {first}, the "
            f"end of epoch {cfg.eval_every})")


def pretrain_stage(cfg, ranks: Ranks) -> dict:
    """`pretrain` in one process of the run `ranks`: set up, then the loop over epochs and steps."""
    rep = Reporter(cfg.quiet or ranks.rank > 0)
    stage, st = start(cfg, rep, ranks)
    watch = FiniteWatch(stage.device, ranks)
    stage.model.train()
    bar = rep.task(f"pretrain {cfg.level}", stage.total, "steps")
    where = stage.path.parent / "log.jsonl" if ranks.rank == 0 else os.devnull
    with open(where, "a") as log, bar as advance:
        log.write(json.dumps({"event": "start", "level": cfg.level, "step": st.step,
                              "resume": cfg.resume, "time": time.time(),
                              "baselines": stage.baselines,
                              **({"world_size": ranks.world} if ranks.many else {})}) + "\n")
        while st.step < stage.total and not st.stopped:
            t_wait = time.perf_counter()
            for batch, shard in epoch_batches(stage, st.step):
                st.waited += time.perf_counter() - t_wait
                out = train_step(stage, batch, shard, watch, st.step + 1)
                st.step += 1
                st.samples += n_examples(batch, cfg.level) if shard is None else shard.size
                end_of_epoch = st.step % stage.steps_per_epoch == 0
                logged = st.step % cfg.log_every == 0 or st.step == stage.total or end_of_epoch
                if logged or st.step % cfg.checkpoint_every == 0:
                    watch.check(cfg.level, st.saved_step, stage.path)  # before a line or a save
                if logged:
                    log_step(stage, st, out, end_of_epoch, log)
                advance(1, status=st.shown)
                if st.step % cfg.checkpoint_every == 0 or st.step == stage.total or st.stopped:
                    save(stage, st)
                if st.step >= stage.total or st.stopped:
                    break
                t_wait = time.perf_counter()
        sentence, learned = verdict(cfg.level, st.best.health, st.best.epoch,
                                    unvalidated(stage, st))
        log.write(json.dumps({"event": "end", "level": cfg.level, "step": st.step,
                              "stopped_early": st.stopped, "best": st.best.record(),
                              "verdict": sentence, "learned": learned}) + "\n")
    if st.saved_step != st.step:              # the loop did not run (nothing to do, or resumed)
        save(stage, st)
    if st.stopped:
        rep.log(f"stopped early at step {st.step}: no better validation loss for {cfg.patience} "
                f"passes; kept the weights of epoch {st.best.epoch:g}")
    rep.log(sentence if learned else f"warning: {sentence}")
    rep.log(f"wrote {stage.path} (step {st.step}); log in {stage.path.parent / 'log.jsonl'}")
    return {**st.record, "verdict": sentence, "learned": learned, "best": st.best.record()}
