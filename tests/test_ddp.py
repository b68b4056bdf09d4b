"""Tests for pretraining over several processes (torchrun + DistributedDataParallel, docs/distributed.md)
on the CPU with gloo: the pieces alone (torchrun's environment, the split of a batch, the world-size rule, the
skipped validation masks), then two processes spawned here and joined through a file:// rendezvous in the
test's folder: step 1's loss and gradients equal one process's at the same whole batch, K steps of both stages
end at one process's weights, process 0 alone writes the run folder, --resume at two processes is bit for bit
an uninterrupted two-process run, a changed number of processes is refused, a NaN in one process stops
both at the same step, a process that dies stops the other in one line; `torchrun --nproc-per-node 2 -- medhmp.py pretrain` writes the run folder one process
writes, which `evaluate` reads; and bench/gpu.py, the GPU check, runs its CPU parts and says it found no GPU.

Every test that spawns processes is marked slow (each process imports torch: seconds). Run:
`python -m pytest -q tests/test_ddp.py`.
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoints
import data
import runtime
import train
from conftest import REPO
from models import AdmissionEncoder, AdmissionPretrainer, ModelConfig, StayEncoder, StayPretrainer

D, WORLD = 16, 2


def config(level: str, data_dir: Path, run: Path, **kw):
    """A quiet, tiny pretraining config with no dropout: a run of two processes then draws nothing a run
    of one would not (docs/distributed.md), so the two can be compared number for number."""
    base = dict(data=data_dir, run=run, d_model=D, batch_size=16, max_steps=4, log_every=1, quiet=True,
                dropout=0.0, lr=3e-3)
    return train.LEVELS[level](**{**base, **kw})


def records(run: Path, level: str) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r and r["level"] == level]


# ----------------------------------------------------------------------------------- spawned processes
def launch(target, folder: Path, *args, world: int = WORLD) -> None:
    """target(rank, *args) in `world` spawned processes joined in a gloo group through a file:// rendezvous
    in `folder`, with torchrun's environment variables set; a process that raises fails the test."""
    rendezvous = folder / "rendezvous"
    rendezvous.unlink(missing_ok=True)
    mp.spawn(joined, args=(world, str(rendezvous), target, args), nprocs=world, join=True)


def joined(rank: int, world: int, rendezvous: str, target, args) -> None:
    torch.set_num_threads(1)  # two processes on a shared 2-core machine
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


def pretrain_all(rank: int, cfgs: list, out: str | None = None) -> None:
    """train.pretrain of each config in turn (inside the group the test started); with `out`, what each
    returned (the last log record, the best pass, the verdict) goes to OUT/returned_<rank>.json."""
    returned = [train.pretrain(cfg) for cfg in cfgs]
    if out:
        (Path(out) / f"returned_{rank}.json").write_text(json.dumps(returned))


def nan_at(rank: int, cfg, step: int, out: str) -> None:
    """Process 1's loss is NaN in its step `step`: every process must stop with the same NonFiniteLoss,
    which it writes down."""
    if rank == 1:
        forward, calls = StayPretrainer.forward, []

        def poisoned(self, batch, *a, **kw):
            found = forward(self, batch, *a, **kw)
            calls.append(1)
            return {**found, "loss": found["loss"] * float("nan")} if len(calls) == step else found
        StayPretrainer.forward = poisoned
    try:
        train.pretrain(cfg)
    except runtime.NonFiniteLoss as err:
        (Path(out) / f"nan_{rank}.txt").write_text(str(err))


def step_one(rank: int, root: str, out: str) -> None:
    """Both pretrainers at the same initial weights on the same whole batch of 16: one process's loss and
    gradients (computed here, on the whole batch) against this process's part through DDP with its Shard
    (the loss summed over the processes, the gradients as DDP leaves them). Writes the max abs differences."""
    d, found = data.load_processed(Path(root)), {}
    mcfg = ModelConfig.from_meta(d.meta, d_model=D, dropout=0.0)
    with runtime.processes(torch.device("cpu")) as ranks:
        for level in ("stay", "admission"):
            torch.manual_seed(0)
            model = (StayPretrainer(StayEncoder(mcfg), mcfg) if level == "stay" else
                     AdmissionPretrainer(AdmissionEncoder(mcfg), mcfg))
            sets = (data.StayDataset if level == "stay" else data.AdmissionDataset)
            ds = sets(d, d.pretrain_rows(level, "train"))
            rows = list(range(16))
            masks = {} if level == "stay" else {"generator": torch.Generator().manual_seed(5)}
            whole = model(ds.__getitems__(rows), **masks)
            whole["loss"].backward()
            want = {k: p.grad.clone() for k, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            net = torch.nn.parallel.DistributedDataParallel(model)
            shard = train.shard_of(ranks, len(rows))
            masks = {} if level == "stay" else {"generator": torch.Generator().manual_seed(5)}
            part = net(ds.__getitems__(ranks.part(rows)), shard=shard, **masks)
            (part["loss"] * ranks.world).backward()
            got = dict(model.named_parameters())
            found[level] = {
                "loss": float((ranks.total(part["loss"].detach()) - whole["loss"].detach()).abs()),
                "loss_value": float(whole["loss"]),
                "grad": max(float((got[k].grad - g).abs().max()) for k, g in want.items()),
                "grad_scale": max(float(g.abs().max()) for g in want.values()),
                "params": len(want)}
    torch.save(found, Path(out) / f"step_one_{rank}.pt")


def die_at(rank: int, cfg, step: int) -> None:
    """Process 1 ends abruptly (os._exit, as a kill would) in its step `step`; process 0 trains on and must
    stop with one RankFailure line, which it writes down."""
    if rank == 1:
        forward, calls = StayPretrainer.forward, []

        def dying(self, batch, *a, **kw):
            calls.append(1)
            if len(calls) == step:
                os._exit(3)
            return forward(self, batch, *a, **kw)
        StayPretrainer.forward = dying
    try:
        train.pretrain(cfg)
    except runtime.RankFailure as err:
        (Path(cfg.run).parent / "failure.txt").write_text(str(err))


# ------------------------------------------------------------------------------------ pieces, no spawn
def test_torchruns_environment_names_the_process():
    assert runtime.from_env({}) == runtime.Ranks()
    ranks = runtime.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world, ranks.local, ranks.many) == (3, 4, 1, True)
    assert not runtime.Ranks().many


def test_a_process_without_a_gpu_of_its_own_is_refused_in_one_line():
    n = torch.cuda.device_count()
    with pytest.raises(data.InputError, match=rf"LOCAL_RANK {n}\) has no GPU of its own: this machine has {n}"):
        runtime.own_device(runtime.Ranks(n, n + 2, n), torch.device("cuda"))
    cpu = torch.device("cpu")
    assert runtime.own_device(runtime.Ranks(1, 2, 1), cpu) == cpu


def test_a_batch_splits_into_contiguous_parts_in_rank_order():
    parts = [runtime.Ranks(r, 3).part(list(range(8))) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7]] and runtime.Ranks(0, 3).sizes(8) == (3, 3, 2)
    shards = [train.shard_of(runtime.Ranks(r, 3), 8) for r in range(3)]
    assert [(s.offset, s.size) for s in shards] == [(0, 8), (3, 8), (6, 8)]
    assert train.shard_of(runtime.Ranks(), 8) is None
    one = runtime.Ranks()   # one process: the collectives return their input
    x = torch.arange(4.0)
    assert one.total(x) is x and one.gather(x) is x and one.objects(1) == [1] and one.part([1, 2]) == [1, 2]


def test_an_epochs_last_batch_is_left_out_only_when_it_has_fewer_rows_than_processes():
    assert [train.epoch_steps(n, 8, 1) for n in (16, 17, 23)] == [2, 3, 3]
    assert [train.epoch_steps(n, 8, 2) for n in (16, 17, 18, 23)] == [2, 2, 3, 3]
    one = train.shuffled_batches(17, 8, seed=0, epoch=1)
    two = train.shuffled_batches(17, 8, seed=0, epoch=1, least=2)
    assert [len(b) for b in one] == [8, 8, 1] and two == one[:2]  # the same shuffle, the last row left out
    assert train.shuffled_batches(17, 8, 0, 1, skip=1, least=2) == one[1:2]


def test_a_checkpoint_resumes_only_with_its_number_of_processes(processed_cohort, tmp_path):
    cfg = config("stay", processed_cohort, tmp_path / "run")
    d = data.load_processed(processed_cohort)
    mcfg = ModelConfig.from_meta(d.meta, d_model=D, dropout=0.0)
    with pytest.raises(data.InputError, match=r"trained by 2 processes and this run has 1; resume it with "
                                              r"WORLD_SIZE 2 \(torchrun --nproc-per-node 2"):
        checkpoints.check_resumable({"world_size": 2, "config": {}}, cfg, mcfg, d.meta, world=1)
    with pytest.raises(data.InputError, match="trained by 1 process and this run has 2"):
        checkpoints.check_resumable({"config": {}}, cfg, mcfg, d.meta, world=2)


def test_a_batch_smaller_than_the_processes_is_refused(processed_cohort, tmp_path):
    with pytest.raises(data.InputError, match="--batch-size 1 is the whole batch, split across the 2"):
        train.check_start(config("stay", processed_cohort, tmp_path, batch_size=1), tmp_path / "x.pt", 2)


def test_skipped_masks_leave_the_generator_where_forward_does(processed_cohort):
    """A process that validates every other batch draws and drops the masks of the batches it skips."""
    d = data.load_processed(processed_cohort)
    mcfg = ModelConfig.from_meta(d.meta, d_model=D)
    model = AdmissionPretrainer(AdmissionEncoder(mcfg), mcfg).eval()
    batch = data.AdmissionDataset(d, d.pretrain_rows("admission", "train")).__getitems__(list(range(5)))
    ran, skipped = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(batch, generator=ran)
    model.skip_masks(5, skipped)
    assert torch.equal(ran.get_state(), skipped.get_state())


# ------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_step_one_loss_and_gradients_equal_one_process(processed_cohort, tmp_path):
    """Stage 1 and stage 2 (masked codes and the three contrastive terms, negatives gathered across the two
    processes): the summed loss and DDP's averaged gradients equal one process's on the whole batch."""
    launch(step_one, tmp_path, str(processed_cohort), str(tmp_path))
    for rank in range(WORLD):
        found = torch.load(tmp_path / f"step_one_{rank}.pt")
        for level, f in found.items():
            print(f"rank {rank} {level}: |loss diff| {f['loss']:.2e} of {f['loss_value']:.3f}, max |grad diff| "
                  f"{f['grad']:.2e} (largest gradient {f['grad_scale']:.2e}, {f['params']} tensors)")
            assert f["params"] >= 20 and f["loss_value"] > 0, (level, f)
            assert f["loss"] <= 1e-6 and f["grad"] <= 1e-6 * max(1.0, f["grad_scale"]), (level, f)


@pytest.mark.slow
def test_two_processes_train_both_stages_as_one_does(processed_cohort, tmp_path):
    """K steps of each stage at the same whole batch: the logged losses and validation, the health and the
    weights of two processes are one process's (to float tolerance), and the run folder is one process's:
    the same files, one checkpoint each, written by process 0 (which records the number of processes)."""
    d = data.load_processed(processed_cohort)
    sizes = {level: math.ceil(len(d.pretrain_rows(level, "train")) / 3) for level in ("stay", "admission")}
    for level, size in sizes.items():  # 3 steps an epoch (validation at step 3) for one and two processes
        n = len(d.pretrain_rows(level, "train"))
        assert train.epoch_steps(n, size, 1) == train.epoch_steps(n, size, WORLD) == 3
    runs = {name: tmp_path / name / "run" for name in ("one", "two")}
    cfgs = {name: [config("stay", processed_cohort, run, batch_size=sizes["stay"], max_steps=4,
                          checkpoint_every=2),
                   config("admission", processed_cohort, run, batch_size=sizes["admission"], max_steps=3)]
            for name, run in runs.items()}
    for stage, (level, steps) in enumerate((("stay", 4), ("admission", 3))):
        pretrain_all(0, cfgs["one"][stage:stage + 1])
        launch(pretrain_all, tmp_path, cfgs["two"][stage:stage + 1], str(tmp_path))
        same_run(runs, level, steps, sizes[level])
        # every process ends with the same record, best pass and verdict (not the same clock)
        returned = [{k: v for k, v in json.loads((tmp_path / f"returned_{r}.json").read_text())[0].items()
                     if k not in ("time", "samples_per_s", "data_wait")} for r in range(WORLD)]
        assert returned[1] == returned[0] and returned[0]["best"]["health"]
        if level == "stay":  # stage 2 of both from the same stay.pt
            shutil.copy(runs["one"] / "stay.pt", runs["two"] / "stay.pt")
    assert sorted(p.name for p in runs["two"].iterdir()) == sorted(p.name for p in runs["one"].iterdir())
    ends = [r for r in map(json.loads, (runs["two"] / "log.jsonl").read_text().splitlines()) if r.get("event")]
    assert [e["event"] for e in ends] == ["start", "end"] * 2  # process 0 alone wrote the log
    assert not list(runs["two"].glob("*.tmp"))


@pytest.mark.slow
def test_resume_at_two_processes_is_an_uninterrupted_run_and_a_changed_count_is_refused(processed_cohort,
                                                                                     tmp_path):
    """With dropout (each process's own stream) and stage 2's masks (the stream the processes share): 3 steps
    then --resume to 6 equal 6 straight steps bit for bit; one process may not resume the two's checkpoint."""
    root = processed_cohort
    stay = tmp_path / "stay"
    pretrain_all(0, [config("stay", root, stay, max_steps=1)])
    runs = {}
    for name in ("straight", "resumed"):
        runs[name] = tmp_path / name
        shutil.copytree(stay, runs[name])
    cfg = config("admission", root, runs["straight"], batch_size=16, max_steps=6, dropout=0.1)
    half = replace(cfg, run=runs["resumed"], max_steps=3)
    launch(pretrain_all, tmp_path, [cfg, half, replace(half, max_steps=6, resume=True)])

    straight, resumed = records(runs["straight"], "admission"), records(runs["resumed"], "admission")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    wa, wb = (checkpoints.load_checkpoint(runs[k] / "admission.pt") for k in ("straight", "resumed"))
    assert all(torch.equal(wb["last_model"][k], v) for k, v in wa["last_model"].items())
    before = (runs["resumed"] / "admission.pt").read_bytes()
    with pytest.raises(data.InputError, match="trained by 2 processes and this run has 1"):
        train.pretrain(replace(half, max_steps=8, resume=True))
    assert (runs["resumed"] / "admission.pt").read_bytes() == before


@pytest.mark.slow
def test_a_process_that_dies_stops_the_run_in_one_line_and_leaves_whole_checkpoints(processed_cohort,
                                                                                    tmp_path):
    run = tmp_path / "run"
    cfg = config("stay", processed_cohort, run, max_steps=8, checkpoint_every=2, log_every=10)
    launch_one_dies(tmp_path, cfg)
    msg = (tmp_path / "failure.txt").read_text()
    assert msg.startswith("process 0 of 2 stopped: a collective of the run failed") and "\n" not in msg
    assert "--resume continues from the last one" in msg
    ckpt = checkpoints.load_checkpoint(run / "stay.pt")
    assert ckpt["step"] == 2 and not list(run.glob("*.tmp"))


def same_run(runs: dict, level: str, steps: int, batch_size: int) -> None:
    """The two-process run ("two") logged and saved what the one-process run ("one") did, to tolerance."""
    one, two = records(runs["one"], level), records(runs["two"], level)
    assert [r["step"] for r in two] == list(range(1, steps + 1)) and len(one) == len(two)
    assert any("val_loss" in r for r in two)
    for a, b in zip(one, two):
        for key in a:
            if key.startswith(("loss", "mse", "mcp", "cl", "val_")):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (level, a["step"], key)
        if "health" in a:
            assert b["health"]["baseline"] == a["health"]["baseline"]
            assert b["health"]["baseline_value"] == a["health"]["baseline_value"]  # exact counts
    wa, wb = (checkpoints.load_checkpoint(runs[k] / f"{level}.pt") for k in ("one", "two"))
    assert wb["world_size"] == WORLD and "world_size" not in wa and len(wb["rng_ranks"]) == WORLD
    assert wb["step"] == wa["step"] == steps
    worst = max(float((wb["last_model"][k] - v).abs().max()) for k, v in wa["last_model"].items())
    print(f"{level}: {steps} steps, max |weight diff| {worst:.2e}")
    # Adam divides each step by the gradient's running size: where a gradient is near 0 (the code heads
    # start at 0), float noise of 1e-7 in it moves a weight by up to 1e-3 of lr; measured 9e-6 at lr 3e-3
    for k, v in wa["last_model"].items():
        torch.testing.assert_close(wb["last_model"][k], v, rtol=1e-4, atol=5e-5, msg=k)
    header = json.loads((runs["two"] / f"config_{level}.json").read_text())
    assert header["world_size"] == WORLD and header["config"]["batch_size"] == batch_size


@pytest.mark.slow
def test_a_nan_in_one_process_stops_every_process_at_its_step(processed_cohort, tmp_path):
    """Process 1's loss is NaN at step 3 (DDP's all-reduce then spreads it to process 0's weights): both
    processes stop at the step-4 checkpoint with the same line, naming step 3 and keeping step 2's file."""
    run = tmp_path / "run"
    cfg = config("stay", processed_cohort, run, max_steps=8, checkpoint_every=2, log_every=10)
    launch(nan_at, tmp_path, cfg, 3, str(tmp_path))
    said = [(tmp_path / f"nan_{rank}.txt").read_text() for rank in range(WORLD)]
    assert said[0] == said[1] and said[0].startswith("the stay loss became nan at step 3; the last good "
                                                     "checkpoint (step 2) is kept")
    assert checkpoints.load_checkpoint(run / "stay.pt")["step"] == 2 and not list(run.glob("*.tmp"))


def launch_one_dies(folder: Path, cfg) -> None:
    """die_at in two spawned processes (process 1 ends in its step 3); waits for both."""
    rendezvous = folder / "rendezvous"
    context = mp.get_context("spawn")
    procs = [context.Process(target=joined, args=(rank, WORLD, str(rendezvous), die_at, (cfg, 3)))
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 3]


# ---------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_writes_the_run_folder_one_process_writes_and_evaluate_reads_it(processed_cohort, tmp_path):
    """`torchrun --nproc-per-node 2 -- medhmp.py pretrain` (python -m torch.distributed.run, so that no PATH
    is needed) for both stages, then `medhmp.py evaluate` on its run folder. The `--` keeps torchrun's own
    parser off medhmp's options: it takes --run for an abbreviation of its --run-path and stops."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--data", str(processed_cohort), "--d-model", str(D), "--max-steps", "2", "--batch-size", "16"]
    folders = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node", str(WORLD), "--"])):  # --: else --run is its own
        run = folders[name] = tmp_path / name
        for level in ("stay", "admission"):
            done = subprocess.run([*launcher, str(REPO / "medhmp.py"), "pretrain", "--level", level,
                                   "--run", str(run), *common], capture_output=True, text=True, env=env,
                                  cwd=tmp_path, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stderr.count(f"wrote {run / (level + '.pt')} (step 2)") == 1  # process 0 alone says it
    assert sorted(p.name for p in folders["two"].iterdir()) == sorted(p.name for p in folders["one"].iterdir())
    assert checkpoints.load_checkpoint(folders["two"] / "admission.pt")["world_size"] == WORLD
    done = subprocess.run([sys.executable, str(REPO / "medhmp.py"), "evaluate", "--task", "mortality",
                           "--data", str(processed_cohort), "--run", str(folders["two"]), "--seeds", "1",
                           "--epochs", "1"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folders["two"] / "eval" / "mortality.json").is_file()


# ------------------------------------------------------------------------------------ the GPU check
def test_the_gpu_check_runs_its_cpu_parts_and_says_it_found_no_gpu(tmp_path, monkeypatch):
    """bench/gpu.py (what bench/gpu.sh runs) without a GPU: every part at tiny sizes on the CPU, in fp32,
    and one JSON file that says no GPU was found. `pytest -m gpu` is left out here (it is this suite)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # as on CI, also on a GPU machine
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    threads = torch.get_num_threads()
    args = argparse.Namespace(budget=300.0, tiny=True, no_tests=True, work=tmp_path)
    report = gpu.run(args, tmp_path / "out" / "gpu.json")
    torch.set_num_threads(threads)
    found = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert found == report.record and found["scale"] == "tiny"
    parts = found["parts"]
    assert not parts["machine"]["cuda"] and "no GPU found" in parts["machine"]["note"]
    assert found["skipped_precisions"] == {"bf16": "needs CUDA", "fp16": "needs CUDA"}
    assert parts["nccl"] == {"skipped": "needs two GPUs"} and "tests" not in parts
    errors = {name: p["error"] for name, p in parts.items() if "error" in p}
    assert not errors, errors
    for level in ("stay", "admission"):
        s = parts[f"stage_{level}_fp32"]
        assert s["loss_finite"] and s["samples_per_s"] > 0 and s["peak_gpu_mib"] is None
        assert parts[f"official_{level}_fp32"]["samples_per_s"] > 0
    assert parts["predict_fp32"]["samples_per_s"] > 0 and parts["official_infer_fp32"]["samples_per_s"] > 0
