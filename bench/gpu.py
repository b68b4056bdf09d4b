"""GPU check: CUDA tests, both stages at the paper's sizes in 3 precisions, prediction: one file.

Usage: bash bench/gpu.sh [--budget 440] [--tiny] [--no-tests] [--out DIR] [--work DIR]
Runs the parts below in order within --budget seconds (a part that would start too late is recorded
as skipped) and writes OUT/gpu.json after each part, so a run cut short keeps what it measured. OUT
is --out, else $OUT when set (the device tool's folder, docs/distributed.md), else bench/out; the
data and runs go to --work (bench/out). Parts:
  machine: torch, CUDA, the card's name, memory and compute capability, the number of GPUs;
  tests: `pytest -m gpu`, the tests that need CUDA: counts and last lines;
  data: bench/train.py's processed folder at the paper's sizes (F = 1,318, S = 73, T = 48,
      V_icd = 7,687, V_drug = 1,702, E = 768; 4,096 training admissions, about 4,500 stays);
  stages: train.pretrain itself at d = 256, stage 1 at batch 128 and stage 2 at batch 4,096, in
      fp32, bf16 and fp16, a few dozen steps each: samples/s and the data-wait share (its
      log.jsonl), peak GPU memory (torch.cuda.max_memory_allocated), the loss finite and falling;
      then stage 2 in bf16 with 4 loader processes (is the batch building the bound?);
  predict: the stay classifier's prediction (evaluate.predict) at batch 256 in each precision,
      samples/s and the share of that time spent building batches;
  official: bench/train.py's official-shaped models at the same sizes and batches, forward +
      backward + Adam timed with CUDA events, in each precision, beside ours, and their prediction;
  nccl: with two GPUs or more, bench/ddp.py at the paper's sizes: one GPU against a two-process
      DDP run over NCCL (torchrun's environment), both stages.
Without a GPU, every part runs at tiny sizes on the CPU in fp32 (bf16 and fp16 are recorded as
skipped) to check the script, and the file says that no GPU was found: none of its numbers is a GPU
figure. Exits 0 unless the script itself breaks.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import evaluate  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from models import Classifier, ModelConfig, StayEncoder  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
# (paper) the sizes of each part; (tiny) the CPU check of the script without a GPU
SCALES = {
    "paper": {"sizes": None, "train": 4096, "val": 64, "d_model": 256, "stay_batch": 128,
              "admission_batch": 4096, "stay_steps": 40, "admission_steps": 24,
              "predict_batch": 256, "official_steps": 3},
    "tiny": {"sizes": {"seq_len": 48, "n_features": 64, "n_static": 8, "n_icd": 50, "n_drug": 30,
                       "note_dim": 16},
             "train": 128, "val": 16, "d_model": 16, "stay_batch": 16, "admission_batch": 32,
             "stay_steps": 2, "admission_steps": 2, "predict_batch": 32, "official_steps": 1}}


def sibling(name: str):
    """bench/<name>.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(
        f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    """Seconds of GPU work between `start` and `stop`: CUDA events on a GPU (the time the GPU took,
    synchronised once at the end), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.begin
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        return self.begin.elapsed_time(end) / 1000


def peak_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20)


def fresh_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -------------------------------------------------------------------------------------------- parts
def machine() -> dict:
    """What ran: torch, CUDA and the card (or that no GPU was found)."""
    info = {"torch": str(torch.__version__), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if not info["cuda"]:
        return {**info, "note": "no GPU found: the parts ran at tiny sizes on the CPU to check the "
                                "script; none of these numbers is a GPU figure"}
    p = torch.cuda.get_device_properties(0)
    return {**info, "gpus": torch.cuda.device_count(), "name": p.name,
            "memory_gib": round(p.total_memory / 2 ** 30, 1), "capability": f"{p.major}.{p.minor}",
            "bf16": torch.cuda.is_bf16_supported(), "cuda_version": torch.version.cuda,
            "nccl": str(torch.cuda.nccl.version())}


def cuda_tests(timeout: float) -> dict:
    """`pytest -m gpu` (skipped tests where there is no GPU): exit status, counts, last lines."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                           "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                               done.stdout.splitlines()[-1] if done.stdout else "")}
    return {"returncode": done.returncode, **counts,
            "tail": (done.stdout + done.stderr).strip().splitlines()[-15:]}


def paper_data(work: Path, scale: dict) -> Path:
    """bench/train.py's processed folder at the scale's sizes (written once, then reused)."""
    bench = sibling("train")
    if scale["sizes"]:
        bench.SIZES = scale["sizes"]   # the writer reads its module's sizes
    name = "gpu-data-" + ("tiny" if scale["sizes"] else "paper")
    return bench.write_paper_data(work / name, n_train=scale["train"], n_val=scale["val"])


def stage(work: Path, data_dir: Path, device: torch.device, level: str, precision: str,
          scale: dict, workers: int = 0) -> dict:
    """train.pretrain itself, timed from its log.jsonl (steady records after the first), with its
    peak GPU memory and whether the loss stayed finite and fell."""
    steps, batch = scale[f"{level}_steps"], scale[f"{level}_batch"]
    run = work / f"gpu-run-{level}-{precision}-{workers}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = train.LEVELS[level](data=data_dir, run=run, batch_size=batch, max_steps=steps,
                              log_every=max(1, steps // 6), eval_every=0, checkpoint_every=10 ** 9,
                              quiet=True, device=device.type, precision=precision,
                              num_workers=workers, d_model=scale["d_model"],
                              **({"init_from_stay": False} if level == "admission" else {}))
    fresh_peak(device)
    started = time.perf_counter()
    train.pretrain(cfg)
    seconds = time.perf_counter() - started
    lines = (run / "log.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if "event" not in r]
    steady, losses = recs[1:] or recs, [r["loss"] for r in recs]
    shutil.rmtree(run, ignore_errors=True)
    return {"level": level, "precision": precision, "batch_size": batch, "steps": steps,
            "loader_processes": workers,
            "samples_per_s": round(sum(r["samples_per_s"] for r in steady) / len(steady), 1),
            "data_wait_share": round(sum(r["data_wait"] for r in steady) / len(steady), 3),
            "peak_gpu_mib": peak_mib(device), "seconds": round(seconds, 1),
            "loss_first": losses[0], "loss_last": losses[-1],
            "loss_finite": all(math.isfinite(v) for v in losses),
            "loss_falling": losses[-1] < losses[0]}


def predict(data_dir: Path, device: torch.device, precision: str, scale: dict) -> dict:
    """The stay classifier's prediction as evaluation runs it (evaluate.predict, no gradient), its
    samples/s, and the share of its time that building the batches alone takes."""
    d = data.load_processed(data_dir)
    ds = data.StayDataset(d, d.pretrain_rows("stay", "train"))
    model = Classifier(StayEncoder(ModelConfig.from_meta(d.meta, d_model=scale["d_model"])))
    model, amp = model.to(device), runtime.resolve_dtype(precision, device)
    batch = scale["predict_batch"]
    with torch.no_grad():
        evaluate.predict(model, data.StayDataset(d, ds.rows[:batch]), batch, device, amp)  # warm-up
        started = time.perf_counter()
        evaluate.predict(model, ds, batch, device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in data.make_loader(ds, batch):
        pass
    building = time.perf_counter() - started
    return {"precision": precision, "batch_size": batch, "stays": len(ds),
            "samples_per_s": round(len(ds) / seconds, 1),
            "building_share": round(building / seconds, 3)}


def official(data_dir: Path, device: torch.device, level: str, precision: str,
             scale: dict) -> dict:
    """bench/train.py's official-shaped model of `level` ("stay", "admission" or "infer": its
    stay classifier's prediction) on dense batches built on the device beforehand (untimed):
    forward (+ backward + Adam) timed with CUDA events, its peak GPU memory."""
    bench, d = sibling("train"), data.load_processed(data_dir)
    m, stays = d.meta, level in ("stay", "infer")
    ds = (data.StayDataset(d, d.pretrain_rows("stay", "train")) if stays else
          data.AdmissionDataset(d, d.pretrain_rows("admission", "train"), max_stays=3))
    batch = {"stay": scale["stay_batch"], "infer": scale["predict_batch"],
             "admission": scale["admission_batch"]}[level]
    if level == "admission":
        model = bench.OfficialShapedAdmission(m["n_features"], m["n_static"], m["n_icd"],
                                              m["n_drug"], m["note_dim"], D=scale["d_model"])
    else:
        model = bench.OfficialShapedStay(m["n_features"], m["n_static"], D=scale["d_model"],
                                         decoder=level == "stay")
        if level == "infer":
            model = bench.OfficialShapedClassifier(model, scale["d_model"])
    model, amp = model.to(device), runtime.resolve_dtype(precision, device)
    opt, scaler = torch.optim.Adam(model.parameters(), lr=5e-4), runtime.grad_scaler(amp)
    fresh_peak(device)
    inputs = bench.official_inputs(level, runtime.to_device(ds.__getitems__(list(range(batch))),
                                                            device), m)
    clock, timed = Clock(device), []
    for i in range(1 + scale["official_steps"]):  # one warm-up step
        clock.start()
        with runtime.autocast(device, amp), torch.set_grad_enabled(level != "infer"):
            out = model(*inputs)
        if level != "infer":
            runtime.optimizer_step(out.float(), model, opt, scaler, 1.0)
        timed.append(clock.stop())
    step = sum(timed[1:]) / len(timed[1:])
    return {"level": level, "precision": precision, "batch_size": batch,
            "samples_per_s": round(batch / step, 1), "step_s": round(step, 4),
            "peak_gpu_mib": peak_mib(device)}


def nccl(work: Path, data_dir: Path, scale: dict) -> dict:
    """bench/ddp.py on the GPUs: one GPU against two DDP processes over NCCL, both stages."""
    ddp = sibling("ddp")
    args = argparse.Namespace(world=2, device="cuda", data=data_dir, patients=None,
                              d_model=scale["d_model"], stay_batch=scale["stay_batch"],
                              admission_batch=scale["admission_batch"], steps=16, out=work)
    return ddp.run(args)


# --------------------------------------------------------------------------------------------- run
class Report:
    """The one JSON file: each part's result (or error, or why it was skipped), written after
    each part."""

    def __init__(self, path: Path, budget: float):
        self.path, self.deadline, self.started = path, time.perf_counter() + budget, time.time()
        self.record = {"what": "bench/gpu.py", "budget_s": budget, "parts": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def part(self, name: str, fn, *args, least: float = 10.0, **kw):
        """fn(*args, **kw) recorded under `name`, unless fewer than `least` seconds are left."""
        if self.left() < least:
            self.record["parts"][name] = {"skipped": f"out of time ({self.left():.0f} s left)"}
            return None
        started = time.perf_counter()
        try:
            result = fn(*args, **kw)
        except Exception as err:  # a broken part is recorded; the others still run
            result = {"error": f"{type(err).__name__}: {err}"[:2000]}
        if isinstance(result, dict):
            result["part_s"] = round(time.perf_counter() - started, 1)
        self.record["parts"][name] = result
        self.save()
        return result

    def save(self) -> None:
        self.record["seconds"] = round(time.time() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=440.0,
                    help="seconds for every part together (gpu.sh stops it at 480)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (always, without a GPU)")
    ap.add_argument("--no-tests", action="store_true", help="leave out `pytest -m gpu`")
    ap.add_argument("--out", type=Path, default=None, help="[default: $OUT, else bench/out]")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    report = run(args, out / "gpu.json")
    print(json.dumps(report.record["parts"].get("machine")))
    print(f"wrote {report.path}")


def run(args, path: Path) -> Report:
    """Every part in order (module docstring)."""
    report = Report(path, args.budget)
    info = report.part("machine", machine)
    device = torch.device("cuda" if info["cuda"] else "cpu")
    if not info["cuda"]:  # the check of the script: one thread, as the tests (a busy CPU's spinning
        torch.set_num_threads(1)  # OpenMP threads made tiny steps many times slower)
    scale = SCALES["tiny" if args.tiny or not info["cuda"] else "paper"]
    report.record["scale"] = "tiny" if scale["sizes"] else "paper"
    if not args.no_tests:
        report.part("tests", cuda_tests, min(180.0, max(report.left() - 60, 10)), least=60)
    data_dir = report.part("data", lambda: {"path": str(paper_data(args.work, scale))})
    if not data_dir or "error" in data_dir:
        return report
    data_dir = Path(data_dir["path"])
    usable = [p for p in PRECISIONS if p == "fp32" or info["cuda"]]
    report.record["skipped_precisions"] = {p: "needs CUDA" for p in PRECISIONS if p not in usable}
    for level in ("stay", "admission"):
        for p in usable:
            report.part(f"stage_{level}_{p}", stage, args.work, data_dir, device, level, p, scale)
    if info["cuda"]:
        report.part("stage_admission_bf16_4_loaders", stage, args.work, data_dir, device,
                    "admission", "bf16", scale, workers=4)
    for p in usable:
        report.part(f"predict_{p}", predict, data_dir, device, p, scale)
        for level in ("stay", "admission", "infer"):
            report.part(f"official_{level}_{p}", official, data_dir, device, level, p, scale)
    if info["cuda"] and info["gpus"] >= 2:
        report.part("nccl", nccl, args.work, data_dir, scale, least=120)
    else:
        report.record["parts"]["nccl"] = {"skipped": "needs two GPUs"}
    report.save()
    return report


if __name__ == "__main__":
    main()
