"""Runtime: where and in what precision the models compute, and the optimiser step both loops share.

Usage: `device = resolve_device("auto")`, `amp = resolve_dtype("auto", device)`, then per step `with
autocast(device, amp): loss = model(batch)` and `optimizer_step(loss, model, opt, grad_scaler(amp),
clip)`; batches move with `to_device`, or one step ahead with `prefetch`. Pretraining (train.py),
fine-tuning (evaluate.py) and embedding (embed.py) import it; it imports torch and `folders`
(InputError) only. One mixed-precision path: bf16 or fp16 autocast on CUDA (a GradScaler for fp16),
fp32 (or bf16 when asked) on the CPU. A non-finite loss is a NonFiniteLoss: fine-tuning checks each
step (`check_finite`); pretraining keeps the flag on the device (`FiniteWatch`) and reads it at each
log line and checkpoint. `check_seed` says which seeds those loops' generators take.
"""
from __future__ import annotations

from pathlib import Path

import torch

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

    def __init__(self, device: torch.device):
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def see(self, loss: torch.Tensor, step: int) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.step == 0)
        self.step = torch.where(new, step, self.step)
        self.value = torch.where(new, loss.detach().float(), self.value)

    def check(self, level: str, saved_step: int | None, path: Path) -> None:
        if int(self.step):  # the one read-back
            kept = (f"the last good checkpoint (step {saved_step}) is kept at {path}" if saved_step
                    else "no checkpoint was written")
            raise NonFiniteLoss(f"the {level} loss became {float(self.value)} at step "
                                f"{int(self.step)}; {kept}; lower --lr")


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
