"""Runtime: where and in what precision the models compute, the optimiser step both loops share, and
the processes of a run.

Usage: `device = resolve_device("auto")`, `amp = resolve_dtype("auto", device)`, then per step `with
autocast(device, amp): loss = model(batch)` and `optimizer_step(loss, model, opt, grad_scaler(amp),
clip)`; batches move with `to_device`, or one step ahead with `prefetch`. Pretraining (train.py),
fine-tuning (evaluate.py) and embedding (embed.py) import it; it imports torch and `folders`
(InputError) only. One mixed-precision path: bf16 or fp16 autocast on CUDA (a GradScaler for fp16),
fp32 (or bf16 when asked) on the CPU. A non-finite loss is a NonFiniteLoss: fine-tuning checks each
step (`check_finite`); pretraining keeps the flag on the device (`FiniteWatch`) and reads it at each
log line and checkpoint. A run of several processes (torchrun, DistributedDataParallel) is a
`Ranks`: `processes(device)` joins torchrun's process group (gloo on the CPU, nccl on CUDA) and
leaves it at the end or on an error, and its collectives (`total`, `gather`, `objects`) are all
that pretraining needs beyond DDP's own gradient averaging; a lost process is one `RankFailure`
line (docs/distributed.md). `check_seed` says which seeds those loops' generators take.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from folders import InputError

# the --device, --precision choices
DEVICES, PRECISIONS = ("auto", "cpu", "cuda"), ("auto", "fp32", "bf16", "fp16")
# the largest --seed of pretraining and fine-tuning: their generators take seed * 100003 + epoch
# (train.shuffled_batches), which must stay below torch's 2**64, and numpy's take no negative seed
SEED_MAX = 2 ** 32 - 1


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def check_seed(seed: int) -> None:
    """One InputError line for a seed the training loops' generators cannot take."""
    if not 0 <= seed <= SEED_MAX:
        raise InputError(f"--seed {seed}: must be between 0 and {SEED_MAX}")


class RankFailure(RuntimeError):
    """Another process of a run of several (torchrun) stopped; every checkpoint on disk is whole."""


# -------------------------------------------------------------------------------- device, precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but CUDA is not available; use --device cpu "
                         "or auto")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16/fp16 on CUDA, fp32 (or bf16 when asked) on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_autocast_works():
        raise InputError("--precision bf16 is not supported by this CPU's LSTM kernels (oneDNN "
                         "needs AVX-512 or newer); use --precision fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_bf16_autocast_works() -> bool:
    """Probe: on CPUs without AVX-512 (e.g. AVX2 only) oneDNN has no bf16 LSTM and autocast fails
    mid-step."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(4, 4)(torch.zeros(1, 1, 4))
        return True
    except RuntimeError:
        return False


def autocast(device: torch.device, amp: torch.dtype):
    """The mixed-precision context of every forward pass (pretraining, validation, fine-tuning,
    prediction): autocast to `amp` (bf16 or fp16, from resolve_dtype), or nothing at fp32."""
    return torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)


def grad_scaler(amp: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16; disabled (a no-op) otherwise, so that every precision runs one code
    path."""
    return torch.amp.GradScaler("cuda", enabled=amp == torch.float16)


# --------------------------------------------------------------------------------------------- step
def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt, scaler,
                   grad_clip: float) -> None:
    """Backward, unscale (fp16 only does anything), clip the gradient norm at `grad_clip`, step,
    clear."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def check_finite(loss: torch.Tensor, what: str, where: str) -> None:
    """NonFiniteLoss ("<what> became nan in <where>; lower --lr") when `loss` is NaN or inf. One
    read-back per call: for loops of small steps (fine-tuning); pretraining keeps the flag on the
    device (FiniteWatch)."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"{what} became {float(loss)} in {where}; lower --lr")


class FiniteWatch:
    """The first step whose loss was NaN or inf, kept on the device so that the loop reads no loss
    back per step (a GPU would wait); `check`, at each log line and before each checkpoint, reads it
    and raises NonFiniteLoss: a non-finite step is never logged, validated or written, and the error
    names it."""

    def __init__(self, device: torch.device, ranks: Ranks | None = None):
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)
        self.ranks = ranks or Ranks(device=device)

    def see(self, loss: torch.Tensor, step: int) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.step == 0)
        self.step = torch.where(new, step, self.step)
        self.value = torch.where(new, loss.detach().float(), self.value)

    def check(self, level: str, saved_step: int | None, path: Path) -> None:
        """Raise NonFiniteLoss when a step's loss was NaN or inf; over several processes, when any
        process's was (every process reads the same first step, so all of them stop together)."""
        step, value = self.first()
        if step:
            kept = (f"the last good checkpoint (step {saved_step}) is kept at {path}" if saved_step
                    else "no checkpoint was written")
            raise NonFiniteLoss(f"the {level} loss became {value} at step {step}; {kept}; "
                                "lower --lr")

    def first(self) -> tuple[int, float]:
        """(step, loss) of the first non-finite loss seen by any process, (0, 0.0) when none."""
        if not self.ranks.many:
            step = int(self.step)  # the one read-back while the losses are finite
            return step, float(self.value) if step else 0.0
        seen = torch.stack([self.step.double(), self.value.double()])[None]  # (1, 2)
        hits = [(int(s), v) for s, v in self.ranks.gather(seen).tolist() if s > 0]  # (N, 2) read
        return min(hits, key=lambda hit: hit[0]) if hits else (0, 0.0)


# ------------------------------------------------------------------------------------------ batches
def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch dict once, asynchronously (non_blocking) from pinned memory when on CUDA."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def prefetch(batches, device: torch.device):
    """The batches of an iterable, moved to `device`, each one fetched and moved before the previous
    one is yielded: the host builds batch i + 1 while the accelerator runs step i. On CUDA the
    copies run on a side stream (from the pinned memory of data.make_loader(pin_memory=True)) that
    the compute stream waits for; on the CPU moving is a no-op and only the one-batch lookahead
    remains (the code path the tests run)."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def move(batch):
        if stream is None:
            return to_device(batch, device)
        with torch.cuda.stream(stream):
            return to_device(batch, device)
    it = iter(batches)
    ahead = next(it, None)
    ahead = None if ahead is None else move(ahead)
    while ahead is not None:
        current, ahead = ahead, next(it, None)
        # the compute stream waits for the copy; the allocator keeps the memory for it
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
            for v in current.values():
                v.record_stream(torch.cuda.current_stream(device))
        ahead = None if ahead is None else move(ahead)
        yield current


# ------------------------------------------------------------------------------- processes (DDP)
@dataclass(frozen=True)
class Ranks:
    """The processes of one run and this one's place among them. torchrun starts one process per
    device with RANK, WORLD_SIZE and LOCAL_RANK in its environment (`from_env`); a run of one
    process is Ranks(), whose collectives return their input. `device` is where this process
    computes (its own GPU under torchrun on CUDA) and where the collectives' tensors go."""
    rank: int = 0
    world: int = 1
    local: int = 0                    # rank on this machine: which GPU this process drives
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def many(self) -> bool:
        return self.world > 1

    def sizes(self, n: int) -> tuple[int, ...]:
        """Rows of each process's part of n rows in rank order: n // world, one more for the first
        n % world processes (every process has a row once n >= world)."""
        return tuple(n // self.world + (r < n % self.world) for r in range(self.world))

    def part(self, rows):
        """This process's contiguous part of `rows` (a list, array or tensor), as `sizes` splits
        it."""
        sizes = self.sizes(len(rows))
        start = sum(sizes[:self.rank])
        return rows[start:start + sizes[self.rank]]

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the processes (counts and sums; no gradient), on x's device."""
        if not self.many:
            return x
        summed = x.detach().to(self.device, copy=True)
        dist.all_reduce(summed)
        return summed.to(x.device)

    def gather(self, x: torch.Tensor, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
        """(sizes[rank], ...) -> (sum(sizes), ...): every process's rows in rank order (`sizes`:
        each process's row count, known to every process; None: all len(x)). The gradient of the
        result flows back to each process's own rows, summed over the processes that used them
        (the functional all-gather's reduce-scatter). Unequal parts are padded to the longest for
        the collective and the padding is cut out again."""
        if not self.many:
            return x
        sizes = sizes or (len(x),) * self.world
        longest, flag = max(sizes), x.dtype == torch.bool
        y = x.to(torch.uint8) if flag else x  # the collectives move no bool
        if len(y) < longest:
            y = torch.cat([y, y.new_zeros(longest - len(y), *y.shape[1:])])  # (longest, ...)
        # imported here: a torch built without distributed support still runs one process
        from torch.distributed import _functional_collectives as functional
        # all_gather_single (torch 2.13), all_gather_tensor_autograd before it: the same gather
        gather = (getattr(functional, "all_gather_single", None)
                  or functional.all_gather_tensor_autograd)
        y = gather(y, 0, dist.group.WORLD)  # (world * longest, ...)
        if min(sizes) < longest:
            y = torch.cat([y[r * longest:r * longest + n] for r, n in enumerate(sizes)])
        return y.bool() if flag else y

    def objects(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order."""
        if not self.many:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def from_env(environ) -> Ranks:
    """The Ranks torchrun describes in `environ` (RANK, WORLD_SIZE, LOCAL_RANK); Ranks() when it
    does not (a plain `python medhmp.py` run)."""
    rank, world, local = (int(environ.get(name, default))
                          for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    return Ranks(rank, world, local)


@contextlib.contextmanager
def processes(device: torch.device):
    """The Ranks of this run, computing on `device`. Under torchrun (WORLD_SIZE > 1) it joins the
    run's process group through torchrun's rendezvous (env://): gloo on the CPU, nccl on CUDA, where
    each process takes the GPU of its LOCAL_RANK; the group is destroyed at the end and on any
    error. A group the caller started already (the tests, a program that runs pretraining inside
    its own) is used and left to the caller. A collective that fails because another process died
    is one RankFailure line."""
    started = dist.is_available() and dist.is_initialized()
    ranks = (Ranks(dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", dist.get_rank()))) if started
             else from_env(os.environ))
    ranks = Ranks(ranks.rank, ranks.world, ranks.local, own_device(ranks, device))
    owned = ranks.many and not started
    if owned:
        dist.init_process_group("nccl" if ranks.device.type == "cuda" else "gloo")
    try:
        yield ranks
    except RuntimeError as err:
        if not (ranks.many and lost_process(err)):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:200]
        raise RankFailure(f"process {ranks.rank} of {ranks.world} stopped: a collective of the run "
                          f"failed, most often because another process died ({reason}); the "
                          "checkpoints on disk are whole and --resume continues from the last "
                          "one") from None
    else:
        if owned:   # every process reaches the end before any tears its connections down: gloo
            dist.barrier()   # aborted a process whose peer was still connected (seen under load)
    finally:
        if owned:
            dist.destroy_process_group()


def own_device(ranks: Ranks, device: torch.device) -> torch.device:
    """Where a process of `ranks` computes: `device`, except that each of several processes on CUDA
    takes the GPU of its LOCAL_RANK (made current; no device index is written anywhere)."""
    if not (ranks.many and device.type == "cuda"):
        return device
    if ranks.local >= torch.cuda.device_count():
        raise InputError(f"process {ranks.rank} (LOCAL_RANK {ranks.local}) has no GPU of its own: "
                         f"this machine has {torch.cuda.device_count()}; start at most that many "
                         "processes on it, or pass --device cpu")
    device = torch.device("cuda", ranks.local)
    torch.cuda.set_device(device)
    return device


def lost_process(err: RuntimeError) -> bool:
    """Whether `err` is a collective that failed: torch's DistError, or gloo's and nccl's plain
    RuntimeError (gloo says "Connection closed by peer" when a process of the run died)."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "by peer"))
