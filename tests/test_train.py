"""Tests for train.py and the modules it builds on (checkpoints.py, runtime.py, health.py): checkpoints
(weights_only round trip, atomic writes), exact resume, refused resume, stay → admission transfer,
non-finite loss, devices and precisions, log.jsonl and config_<level>.json, a short run that lowers every
loss on the synthetic cohort, and `pretrain` from the command line.

Tiny widths (d_model 16; 64 for the learning test) and a few steps each, on the session's processed
synthetic cohort (conftest.processed_cohort). Run: `python -m pytest -q tests/test_train.py`.
"""
import json
import math
import platform
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import checkpoints
import data
import health
import runtime
import train
from medhmp import cli
from models import AdmissionEncoder, AdmissionPretrainer, ModelConfig, StayEncoder, StayPretrainer

D = 16  # model width for everything but the learning test
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")


CPU_BF16 = runtime.cpu_bf16_autocast_works()  # oneDNN has no bf16 LSTM on AVX2-only CPUs




def config(level: str, data_dir: Path, run: Path, **kw):
    """A quiet, tiny pretraining config; log every step so each loss is on record."""
    base = dict(data=data_dir, run=run, d_model=D, batch_size=64, max_steps=3, log_every=1, quiet=True)
    return train.LEVELS[level](**{**base, **kw})


def records(run: Path, level: str | None = None) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r and (level is None or r["level"] == level)]


def events(run: Path, kind: str) -> list[dict]:
    """The run's start or end records of log.jsonl."""
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == kind]


def one_line_error(result, alone: bool = True) -> str:
    """The message of a failed CLI call: exit status 1, no traceback, one 'Error: ' line, and the last line;
    `alone`: nothing else was printed (the input was refused before any work)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert [line for line in lines if line.startswith("Error")] == lines[-1:], result.output
    assert lines[-1].startswith("Error: ") and (len(lines) == 1 or not alone), result.output
    return lines[-1]


@pytest.fixture(scope="module")
def cohort(processed_cohort):
    return processed_cohort, data.load_processed(processed_cohort)


@pytest.fixture(scope="module")
def stay_only(cohort, tmp_path_factory) -> Path:
    """A run folder holding only a 2-step stay.pt (width D); copy it before use."""
    root, _ = cohort
    run = tmp_path_factory.mktemp("stay_only") / "run"
    train.pretrain(config("stay", root, run, max_steps=2))
    (run / "log.jsonl").unlink()
    return run


@pytest.fixture(scope="module")
def both_stages(cohort, tmp_path_factory):
    """One run: 6 stay steps, then 4 admission steps from stay.pt, with batches sized so both cross an epoch
    end (validation records). Read-only for the tests; copy it to change it."""
    root, d = cohort
    run = tmp_path_factory.mktemp("both") / "run"
    cfgs = {}
    for level, steps in (("stay", 6), ("admission", 4)):
        n = len(d.pretrain_rows(level, "train"))
        cfgs[level] = config(level, root, run, max_steps=steps, batch_size=math.ceil(n / 3), checkpoint_every=2)
        assert math.ceil(n / cfgs[level].batch_size) == 3
        train.pretrain(cfgs[level])
    return run, cfgs


# --------------------------------------------------------------------------------------------- helpers
def test_resolve_device_and_dtype():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    assert runtime.resolve_dtype("auto", cpu) == torch.float32  # fp32 on the CPU unless asked (docs/design.md)
    if CPU_BF16:
        assert runtime.resolve_dtype("bf16", cpu) == torch.bfloat16
    else:
        with pytest.raises(data.InputError, match="use --precision fp32"):
            runtime.resolve_dtype("bf16", cpu)
    with pytest.raises(data.InputError, match="fp16 needs CUDA"):
        runtime.resolve_dtype("fp16", cpu)


@no_cuda
def test_resolve_cuda_without_cuda_is_an_input_error():
    with pytest.raises(data.InputError, match="CUDA is not available"):
        runtime.resolve_device("cuda")


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_weights_only(cohort, tmp_path):
    """save_checkpoint → load_checkpoint (weights_only=True) restores a model and its optimizer exactly."""
    _, d = cohort
    mcfg = ModelConfig.from_meta(d.meta, d_model=D)
    torch.manual_seed(0)
    model = StayPretrainer(StayEncoder(mcfg), mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = data.StayDataset(d, d.pretrain_rows("stay", "train")).__getitems__(list(range(8)))
    model(batch)["loss"].backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "rng": {"torch": torch.get_rng_state()},
             "config": {"data": "some/where", "lr": 1e-3}, "model_config": asdict(mcfg)}
    path = tmp_path / "stay.pt"
    checkpoints.save_checkpoint(state, path)
    assert [p.name for p in tmp_path.iterdir()] == ["stay.pt"]  # no temporary left behind

    back = torch.load(path, map_location="cpu", weights_only=True)  # the plain loader, as evaluate.py would
    assert back.keys() == state.keys() and back["config"] == state["config"]
    back = checkpoints.load_checkpoint(path)
    rebuilt = ModelConfig(**back["model_config"])  # the architecture from the file alone
    clone = StayPretrainer(StayEncoder(rebuilt), rebuilt)
    clone.load_state_dict(back["model"])  # strict
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    model.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(model(batch)["recon"], clone(batch)["recon"])


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint whole."""
    path = tmp_path / "stay.pt"
    checkpoints.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(data.InputError, match="cannot write .*stay.pt: No space left on device; the previous"):
        checkpoints.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)["step"] == 1 and not list(tmp_path.glob("*.tmp"))


def test_load_checkpoint_missing_file_names_the_fix(tmp_path):
    with pytest.raises(data.InputError, match=r"no checkpoint here \(run `python medhmp.py pretrain` first\)"):
        checkpoints.load_checkpoint(tmp_path / "stay.pt")


def test_pretrain_checkpoints_are_plain_dicts(both_stages, cohort):
    """Each stage's file loads with weights_only=True and rebuilds its model from the file alone."""
    run, cfgs = both_stages
    _, d = cohort
    for level, cls, enc in (("stay", StayPretrainer, StayEncoder), ("admission", AdmissionPretrainer, AdmissionEncoder)):
        ckpt = torch.load(run / f"{level}.pt", map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scaler", "step", "epoch", "rng", "config", "model_config", "sizes",
                "icd_vocab", "torch", "git"} <= ckpt.keys()
        assert ckpt["level"] == level and ckpt["step"] == cfgs[level].max_steps
        assert ckpt["config"]["lr"] == cfgs[level].lr and ckpt["config"]["data"] == str(cfgs[level].data)
        assert ckpt["sizes"] == {k: d.meta[k] for k in ModelConfig.SIZES} and ckpt["icd_vocab"] == d.meta["icd_vocab"]
        mcfg = ModelConfig(**ckpt["model_config"])
        assert mcfg.d_model == D
        model = cls(enc(mcfg), mcfg)
        model.load_state_dict(ckpt["model"])  # strict: every key, every shape
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.slow
@pytest.mark.parametrize("level", ["stay", "admission"])
def test_resume_equals_a_straight_run(level, cohort, stay_only, tmp_path):
    """N steps straight == N/2 steps, then --resume to N: the same losses and the same weights.

    The split falls mid-epoch and the second half crosses an epoch end (a new loader and a validation), where
    a resumed run most easily drifts from a straight one.
    """
    root, d = cohort
    n = len(d.pretrain_rows(level, "train"))
    batch_size, total, half = math.ceil(n / 4), 6, 3  # 4 steps an epoch: step 3 is mid-epoch
    assert math.ceil(n / batch_size) == 4
    runs = {}
    for name in ("straight", "resumed"):
        run = tmp_path / name
        if level == "admission":
            shutil.copytree(stay_only, run)  # same stay.pt for both
        runs[name] = run
    cfg = config(level, root, runs["straight"], batch_size=batch_size, max_steps=total, lr=3e-3)
    train.pretrain(cfg)
    train.pretrain(replace(cfg, run=runs["resumed"], max_steps=half))
    train.pretrain(replace(cfg, run=runs["resumed"], max_steps=total, resume=True))

    straight, resumed = records(runs["straight"], level), records(runs["resumed"], level)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, total + 1))
    assert any("val_loss" in r for r in straight[half:])  # the epoch end was crossed after resuming
    for a, b in zip(straight, resumed):
        for key in ("loss", "mcp", "cl", "val_loss", "val_mcp", "val_cl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    wa = checkpoints.load_checkpoint(runs["straight"] / f"{level}.pt")
    wb = checkpoints.load_checkpoint(runs["resumed"] / f"{level}.pt")
    assert wa["step"] == wb["step"] == total
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_with_changed_settings_is_refused_in_one_line(cohort, tmp_path):
    root, _ = cohort
    run = tmp_path / "run"
    runner = CliRunner()
    args = ["pretrain", "--level", "stay", "--data", str(root), "--run", str(run), "--batch-size", "8"]
    assert runner.invoke(cli, args + ["--max-steps", "2"]).exit_code == 0
    before = (run / "stay.pt").read_bytes()

    msg = one_line_error(runner.invoke(cli, args + ["--max-steps", "4", "--resume", "--lr", "1e-3"]))
    assert "cannot resume" in msg and "settings differ (lr 0.0005 -> 0.001)" in msg and "start a new --run" in msg
    assert "drop --resume" not in msg and "--overwrite" not in msg  # never advise what discards the checkpoint
    assert (run / "stay.pt").read_bytes() == before  # nothing was trained or written
    msg = one_line_error(runner.invoke(cli, args[:-1] + ["16", "--max-steps", "4", "--resume"]))
    assert "settings differ (batch_size 8 -> 16)" in msg

    # the stopping point may change: the same settings with a later --max-steps continue the run
    result = runner.invoke(cli, args + ["--max-steps", "3", "--resume"])
    assert result.exit_code == 0, result.output
    assert checkpoints.load_checkpoint(run / "stay.pt")["step"] == 3
    assert [r["step"] for r in records(run)] == [2, 3]  # log_every 10: the last step of each call


# ------------------------------------------------------------------------------------ stage transfer
@pytest.mark.parametrize("resume", [False, True])
def test_admission_stage_loads_every_stay_encoder_weight(resume, cohort, stay_only, tmp_path):
    """With lr = 0 the admission checkpoint's stay encoder must equal stay.pt's encoder key for key. With
    --resume but no admission.pt yet, the stage must still start from stay.pt."""
    root, _ = cohort
    run = tmp_path / "run"
    shutil.copytree(stay_only, run)
    train.pretrain(config("admission", root, run, max_steps=1, lr=0.0, resume=resume))
    stay = checkpoints.load_checkpoint(run / "stay.pt")["model"]
    adm = checkpoints.load_checkpoint(run / "admission.pt")["model"]
    want = {k[len("encoder."):]: v for k, v in stay.items() if k.startswith("encoder.")}
    got = {k[len("encoder.stay_encoder."):]: v for k, v in adm.items() if k.startswith("encoder.stay_encoder.")}
    assert got.keys() == want.keys() and len(want) >= 20  # LSTMs, projection, static MLP, fusion, norms
    assert {"ts_encoder.input_proj", "static_encoder.mlp.0.weight", "fusion.attn.in_proj_weight"} <= want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not any(k.startswith("encoder.decoder") or "readout" in k for k in adm)  # the stay decoder stays behind


def test_transfer_with_a_missing_stay_key_is_an_error(cohort, stay_only, tmp_path):
    root, _ = cohort
    run = tmp_path / "run"
    shutil.copytree(stay_only, run)
    ckpt = checkpoints.load_checkpoint(run / "stay.pt")
    del ckpt["model"]["encoder.static_encoder.mlp.0.weight"]
    checkpoints.save_checkpoint(ckpt, run / "stay.pt")
    with pytest.raises(data.InputError, match=r"stay\.pt: .*missing \['static_encoder\.mlp\.0\.weight'\]"):
        train.pretrain(config("admission", root, run, max_steps=1))
    assert not (run / "admission.pt").exists()


def test_transfer_from_another_width_or_no_stay_checkpoint_is_refused(cohort, stay_only, tmp_path):
    root, _ = cohort
    run = tmp_path / "run"
    shutil.copytree(stay_only, run)
    with pytest.raises(data.InputError, match="another model config"):
        train.pretrain(config("admission", root, run, max_steps=1, d_model=2 * D))
    with pytest.raises(data.InputError, match="no checkpoint here"):
        train.pretrain(config("admission", root, tmp_path / "empty", max_steps=1))
    # the "a" ablation (no stay initialisation) needs no stay.pt
    train.pretrain(config("admission", root, tmp_path / "ablation", max_steps=1, init_from_stay=False))
    assert (tmp_path / "ablation" / "admission.pt").is_file()


# ------------------------------------------------------------------------------------ non-finite loss
def nan_at(monkeypatch, cls, k: int):
    """Make cls.forward return a NaN loss on its k-th training-mode call (validation calls don't count)."""
    forward, calls = cls.forward, []

    def patched(self, batch, *a, **kw):
        out = forward(self, batch, *a, **kw)
        if self.training:
            calls.append(1)
            if len(calls) == k:
                out = {**out, "loss": out["loss"] * float("nan")}
        return out
    monkeypatch.setattr(cls, "forward", patched)


@pytest.mark.parametrize("level", ["stay", "admission"])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(level, cohort, stay_only, tmp_path, monkeypatch):
    root, _ = cohort
    run = tmp_path / "run"
    if level == "admission":
        shutil.copytree(stay_only, run)
    nan_at(monkeypatch, StayPretrainer if level == "stay" else AdmissionPretrainer, 5)
    with pytest.raises(runtime.NonFiniteLoss, match=rf"the {level} loss became nan at step 5; the last good "
                                                  rf"checkpoint \(step 4\) is kept at .*{level}\.pt"):
        train.pretrain(config(level, root, run, max_steps=8, checkpoint_every=2, batch_size=16))
    ckpt = checkpoints.load_checkpoint(run / f"{level}.pt")
    assert ckpt["step"] == 4  # the step-4 checkpoint, not overwritten by the failed step 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["step"] for r in records(run, level)] == [1, 2, 3, 4]
    assert not list(run.glob("*.tmp"))


def test_non_finite_loss_between_log_lines_is_caught_before_the_next_checkpoint(cohort, tmp_path, monkeypatch):
    """The loop reads no loss back per step: a NaN at step 5 is found at the step-6 checkpoint (no log line
    before step 10), named by its step, and nothing after step 4 is written."""
    root, _ = cohort
    run = tmp_path / "run"
    nan_at(monkeypatch, StayPretrainer, 5)
    with pytest.raises(runtime.NonFiniteLoss, match=r"the stay loss became nan at step 5; the last good checkpoint "
                                                  r"\(step 4\)"):
        train.pretrain(config("stay", root, run, max_steps=12, checkpoint_every=2, log_every=10, batch_size=16))
    assert checkpoints.load_checkpoint(run / "stay.pt")["step"] == 4 and records(run) == []


def test_the_loop_reads_losses_back_per_log_line_not_per_step(cohort, tmp_path, monkeypatch):
    """No host read of a float tensor (a device sync on a GPU) per step: 2 or 8 steps with one log line (the
    last step) read the same number of values back."""
    root, _ = cohort
    reads, to_float = [], torch.Tensor.__float__

    def counted(self):
        reads.append(1)
        return to_float(self)
    monkeypatch.setattr(torch.Tensor, "__float__", counted)
    counts = []
    for steps in (2, 8):
        reads.clear()
        train.pretrain(config("stay", root, tmp_path / f"r{steps}", max_steps=steps, log_every=100, batch_size=8,
                              eval_every=0))
        counts.append(len(reads))
    assert counts[0] == counts[1] > 0


def test_prefetch_builds_the_next_batch_before_yielding_one():
    """runtime.prefetch yields every batch in order, moved, one batch ahead of the consumer (CPU path)."""
    made = []

    def batches():
        for i in range(3):
            made.append(i)
            yield {"x": torch.full((2,), float(i))}
    seen = []
    for batch in runtime.prefetch(batches(), torch.device("cpu")):
        seen.append((float(batch["x"][0]), list(made)))
    assert seen == [(0.0, [0, 1]), (1.0, [0, 1, 2]), (2.0, [0, 1, 2])]
    assert list(runtime.prefetch(iter([]), torch.device("cpu"))) == []


@pytest.mark.gpu
@needs_cuda
def test_prefetch_moves_batches_to_cuda_from_pinned_memory():
    batches = [{"x": torch.arange(4.0).pin_memory()}, {"x": torch.arange(4.0, 8.0).pin_memory()}]
    out = [b["x"] for b in runtime.prefetch(batches, torch.device("cuda"))]
    assert all(x.is_cuda for x in out) and torch.equal(torch.cat(out).cpu(), torch.arange(8.0))


def test_non_finite_loss_is_one_line_on_the_command_line(cohort, tmp_path, monkeypatch):
    root, _ = cohort
    nan_at(monkeypatch, StayPretrainer, 1)
    result = CliRunner().invoke(cli, ["pretrain", "--level", "stay", "--data", str(root), "--run", str(tmp_path / "r"),
                                      "--max-steps", "3", "--batch-size", "8"])
    assert "loss became nan at step 1" in one_line_error(result, alone=False)  # after the resolved config


# ----------------------------------------------------------------------------------- devices, precision
@no_cuda
def test_cli_device_cuda_without_cuda_is_a_clear_error(cohort, tmp_path):
    root, _ = cohort
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--level", "stay", "--data", str(root), "--run", str(run),
                                      "--device", "cuda", "--max-steps", "1"])
    assert "--device cuda was asked for but CUDA is not available" in one_line_error(result)
    assert not run.exists()  # refused before anything was written


def test_cli_fp16_on_cpu_is_a_clear_error(cohort, tmp_path):
    root, _ = cohort
    result = CliRunner().invoke(cli, ["pretrain", "--level", "stay", "--data", str(root), "--run", str(tmp_path / "r"),
                                      "--device", "cpu", "--precision", "fp16", "--max-steps", "1"])
    assert "--precision fp16 needs CUDA" in one_line_error(result)


@pytest.mark.skipif(not CPU_BF16, reason="this CPU has no bf16 LSTM (see the next test)")
def test_cpu_bf16_autocast_steps(cohort, tmp_path):
    """bf16 on the CPU when asked (docs/design.md): both stages run and record bfloat16."""
    root, _ = cohort
    run = tmp_path / "run"
    for level in ("stay", "admission"):
        train.pretrain(config(level, root, run, max_steps=2, batch_size=16, device="cpu", precision="bf16"))
        assert json.loads((run / f"config_{level}.json").read_text())["dtype"] == "bfloat16"
        assert all(math.isfinite(r["loss"]) for r in records(run, level))


@pytest.mark.skipif(CPU_BF16, reason="this CPU runs bf16 LSTMs (see the previous test)")
def test_cli_cpu_bf16_without_kernels_is_a_clear_error(cohort, tmp_path):
    """On AVX2-only CPUs oneDNN has no bf16 LSTM: refuse up front instead of failing inside the first step."""
    root, _ = cohort
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--level", "stay", "--data", str(root), "--run", str(run),
                                      "--device", "cpu", "--precision", "bf16", "--max-steps", "1"])
    assert "--precision bf16 is not supported by this CPU" in one_line_error(result)
    assert not run.exists()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_autocast_steps(precision, cohort, tmp_path):
    """A few CUDA steps of each stage under autocast; fp16 runs through an enabled GradScaler."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    root, _ = cohort
    run = tmp_path / "run"
    for level in ("stay", "admission"):
        train.pretrain(config(level, root, run, max_steps=3, batch_size=32, device="cuda", precision=precision))
        header = json.loads((run / f"config_{level}.json").read_text())
        assert header["device"].startswith("cuda") and header["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
        assert all(math.isfinite(r["loss"]) for r in records(run, level))
        ckpt = checkpoints.load_checkpoint(run / f"{level}.pt")
        assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
        assert ("scale" in ckpt["scaler"]) == (precision == "fp16")  # a disabled scaler saves an empty state
        assert "cuda" in ckpt["rng"]


# --------------------------------------------------------------------------------------- run records
def test_log_jsonl_records(both_stages):
    run, cfgs = both_stages
    for level, cfg in cfgs.items():
        recs = records(run, level)
        assert [r["step"] for r in recs] == list(range(1, cfg.max_steps + 1))  # log_every = 1
        parts = ("loss",) if level == "stay" else ("loss", "mcp", "cl")
        for r in recs:
            assert all(isinstance(r[k], float) and math.isfinite(r[k]) for k in parts)
            assert r["lr"] == cfg.lr and r["samples_per_s"] > 0 and 0 <= r["data_wait"] <= 1
            assert r["epoch"] == pytest.approx(r["step"] / 3)  # 3 steps an epoch
        if level == "admission":  # L = L_MCP + 0.1·L_CL (paper Eq. 11), to the 5 logged decimals
            assert all(r["loss"] == pytest.approx(r["mcp"] + 0.1 * r["cl"], abs=2e-5) for r in recs)
        ends = [r for r in recs if r["step"] % 3 == 0]  # epoch ends carry the held-out loss parts
        assert ends and all({f"val_{k}" for k in parts} <= r.keys() for r in ends)
        assert all(not any(k.startswith("val_") for k in r) for r in recs if r["step"] % 3)


def test_config_json_records_the_resolved_run(both_stages, cohort):
    run, cfgs = both_stages
    root, d = cohort
    for level, cfg in cfgs.items():
        header = json.loads((run / f"config_{level}.json").read_text())
        assert header["level"] == level
        assert header["config"] == {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        mcfg = ModelConfig.from_meta(d.meta, d_model=D, dropout=cfg.dropout)
        assert header["model_config"] == asdict(mcfg)
        saved = checkpoints.load_checkpoint(run / f"{level}.pt")["model"]     # the pretrainers hold no buffers
        assert header["parameters"] == sum(v.numel() for v in saved.values()) > 0
        assert header["device"] == "cpu" and header["dtype"] == "float32"
        assert header["python"] == platform.python_version() and header["torch"] == str(torch.__version__)
        assert header["git"]
        assert header["train"] == len(d.pretrain_rows(level, "train")) and header["val"] == len(d.pretrain_rows(level, "val"))
        assert header["steps"] == cfg.max_steps


# ---------------------------------------------------------------------------------------- it learns
@pytest.mark.slow
def test_short_pretraining_beats_the_no_learning_baselines(demo_cohort, tmp_path):
    """On the synthetic cohort, 2 stay epochs and 6 admission epochs (d = 64) must beat the baselines each run
    reports: stage 1's validation MSE below the (hour, feature) mean pattern (measured +6% to +12%), stage 2's
    validation contrastive loss below chance log(B − 1) and its training contrastive loss at least 1 nat
    lower than at step 1. Both stages start at their best no-learning predictor (pattern / prior init), so
    step 1's loss is within a few % of that baseline; stage 2's masked-code loss must not drift above its
    best baseline by more than 2% (this cohort's codes are mostly background noise: little to predict)."""
    root = demo_cohort
    run = tmp_path / "run"
    out = train.pretrain(config("stay", root, run, d_model=64, max_steps=None, epochs=2, batch_size=32, lr=1e-3))
    start = events(run, "start")[0]["baselines"]
    assert records(run, "stay")[0]["loss"] == pytest.approx(start["cell_mean"], rel=0.2)
    assert out["learned"] and out["best"]["health"]["gain"] > 0.03, out
    out = train.pretrain(config("admission", root, run, d_model=64, max_steps=None, epochs=6, batch_size=49,
                                lr=1e-3))
    recs, h = records(run, "admission"), out["best"]["health"]
    assert recs[-1]["cl"] < recs[0]["cl"] - 1.0 and h["cl_gain"] > 0, (recs[0], recs[-1], h)
    assert h["gain"] > -0.02, h
    assert "stage 1: validation MSE" in events(run, "end")[0]["verdict"]


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_pretrain_end_to_end(cohort, tmp_path):
    """`medhmp.py pretrain` for both stages at the default width; prints where it wrote, files in place."""
    root, d = cohort
    run = tmp_path / "run"
    runner = CliRunner()
    for level in ("stay", "admission"):
        result = runner.invoke(cli, ["pretrain", "--level", level, "--data", str(root), "--run", str(run),
                                     "--max-steps", "2", "--batch-size", "8", "--seed", "3"])
        assert result.exit_code == 0, result.output
        assert f"wrote {run / (level + '.pt')} (step 2)" in result.output
        ckpt = checkpoints.load_checkpoint(run / f"{level}.pt")
        assert ckpt["step"] == 2 and ckpt["config"]["seed"] == 3 and ckpt["config"]["batch_size"] == 8
        assert ckpt["model_config"]["d_model"] == 256  # the paper's width by default
        assert json.loads((run / f"config_{level}.json").read_text())["config"]["max_steps"] == 2
    assert "initialised the stay encoder from" in result.output
    assert [(r["level"], r["step"]) for r in records(run)] == [("stay", 2), ("admission", 2)]  # log_every 10


# ------------------------------------------------------------------------- health, early stopping, faults
def test_baselines_are_exact(cohort):
    """stay_baselines from cell counts equals the MSE of each constant predictor computed on dense tensors."""
    _, d = cohort
    tr, va = d.pretrain_rows("stay", "train"), d.pretrain_rows("stay", "val")
    (base, mean) = health.stay_baselines(d, tr, va)
    dense = {s: data.StayDataset(d, r).__getitems__(list(range(len(r)))) for s, r in (("train", tr), ("val", va))}
    T, F = d.meta["seq_len"], d.meta["n_features"]
    from models import densify
    x = {s: densify(b["ts_idx"], len(b["static"]), T, F) for s, b in dense.items()}
    torch.testing.assert_close(mean, x["train"].mean(0))
    for name, c in (("zeros", torch.zeros(T, F)), ("feature_rate", x["train"].mean((0, 1)).expand(T, F)),
                    ("cell_mean", x["train"].mean(0))):
        assert base[name] == pytest.approx(float(((c - x["val"]) ** 2).mean()), rel=1e-5), name


def test_code_priors_match_the_masked_target_rate(cohort):
    """The frequency prior is P(code is a masked target | not visible) = r f / (1 − (1 − r) f)."""
    _, d = cohort
    rows = d.pretrain_rows("admission", "train")
    priors = health.code_priors(d, rows, 0.15)
    icd = data.AdmissionDataset(d, rows).__getitems__(list(range(len(rows))))["icd"]
    f = icd.mean(0)
    torch.testing.assert_close(priors["frequency"]["icd"], 0.15 * f / (1 - 0.85 * f))
    assert not priors["none"]["icd"].any()


@pytest.mark.slow
def test_early_stopping_keeps_the_best_weights(cohort, tmp_path, monkeypatch):
    """With validation losses forced to 3, 1, 2, 2 and patience 2, the run stops after epoch 4 and stay.pt's
    weights are those of epoch 2 (the best pass); the end record and the verdict say so."""
    root, d = cohort
    n = len(d.pretrain_rows("stay", "train"))
    losses, weights = iter([3.0, 1.0, 2.0, 2.0, 2.0]), {}
    validate = train.validate

    def fake(model, *a, **kw):
        out = validate(model, *a, **kw)
        out["val_loss"] = next(losses)
        weights[len(weights) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return out
    monkeypatch.setattr(train, "validate", fake)
    run = tmp_path / "run"
    out = train.pretrain(config("stay", root, run, max_steps=None, epochs=9, batch_size=n, patience=2))
    ckpt = checkpoints.load_checkpoint(run / "stay.pt")
    assert ckpt["step"] == 4 and ckpt["best"]["epoch"] == 2 and out["best"]["epoch"] == 2
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(v, weights[2][k], msg=k)
    assert any(not torch.equal(v, weights[2][k]) for k, v in ckpt["last_model"].items())
    end = events(run, "end")[0]
    assert end["stopped_early"] and end["best"]["epoch"] == 2 and "epoch 2" in end["verdict"]


def test_a_run_that_does_not_beat_its_baseline_warns_and_finishes(cohort, tmp_path):
    """lr 1e-9: nothing is learned beyond the pattern init; the run ends with exit 0 and a 'warning:' verdict."""
    root, _ = cohort
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--level", "stay", "--data", str(root), "--run", str(run),
                                      "--epochs", "1", "--batch-size", "64", "--lr", "1e-9", "--d-model", "16"])
    assert result.exit_code == 0, result.output
    assert "warning: stage 1: validation MSE" in result.output and "above the (hour, feature) mean pattern" in result.output


def test_an_existing_checkpoint_is_not_overwritten_without_asking(cohort, stay_only, tmp_path):
    root, _ = cohort
    run = tmp_path / "run"
    shutil.copytree(stay_only, run)
    before = (run / "stay.pt").read_bytes()
    args = ["pretrain", "--level", "stay", "--data", str(root), "--run", str(run), "--max-steps", "1",
            "--batch-size", "8", "--d-model", str(D)]
    msg = one_line_error(CliRunner().invoke(cli, args))
    assert "stay.pt exists" in msg and "--resume" in msg and "--overwrite" in msg
    assert (run / "stay.pt").read_bytes() == before
    assert CliRunner().invoke(cli, args + ["--overwrite"]).exit_code == 0
    assert checkpoints.load_checkpoint(run / "stay.pt")["step"] == 1


def test_admission_checkpoint_records_its_stay_checkpoint(cohort, stay_only, tmp_path):
    """admission.pt carries the digest of the stay.pt it started from; evaluate warns once stay.pt changes."""
    root, d = cohort
    run = tmp_path / "run"
    shutil.copytree(stay_only, run)
    train.pretrain(config("admission", root, run, max_steps=1))
    stay, adm = (checkpoints.load_checkpoint(run / f"{n}.pt") for n in ("stay", "admission"))
    assert adm["stay_digest"] == stay["digest"] == checkpoints.weights_digest(stay["model"])
    assert checkpoints.Checkpoints(run, d.meta).lineage() is None
    train.pretrain(config("stay", root, run, max_steps=3, overwrite=True))
    assert "was pretrained from another stay.pt" in checkpoints.Checkpoints(run, d.meta).lineage()


def test_resume_survives_relative_paths_and_a_moved_run(cohort, tmp_path, monkeypatch):
    root, _ = cohort
    run = tmp_path / "a" / "run"
    train.pretrain(config("stay", root, run, max_steps=2, batch_size=8))
    moved = tmp_path / "b"
    shutil.move(str(tmp_path / "a"), moved)
    shutil.copytree(root, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train.pretrain(config("stay", Path("data"), Path("b/run"), max_steps=3, batch_size=8, resume=True))
    assert checkpoints.load_checkpoint(moved / "run" / "stay.pt")["step"] == 3


def test_resume_without_a_checkpoint_says_so(cohort, tmp_path):
    root, _ = cohort
    result = CliRunner().invoke(cli, ["pretrain", "--level", "stay", "--data", str(root), "--run",
                                      str(tmp_path / "r"), "--max-steps", "1", "--batch-size", "8", "--resume"])
    assert result.exit_code == 0 and "nothing to resume at" in result.output, result.output


def test_non_finite_loss_before_any_checkpoint_says_none_was_written(cohort, tmp_path, monkeypatch):
    root, _ = cohort
    nan_at(monkeypatch, StayPretrainer, 1)
    with pytest.raises(runtime.NonFiniteLoss, match="at step 1; no checkpoint was written"):
        train.pretrain(config("stay", root, tmp_path / "run", max_steps=3))
    assert not (tmp_path / "run" / "stay.pt").exists()


def test_admission_batch_size_one_is_refused(cohort, stay_only, tmp_path):
    root, _ = cohort
    msg = one_line_error(CliRunner().invoke(cli, ["pretrain", "--level", "admission", "--data", str(root),
                                                  "--run", str(stay_only), "--batch-size", "1"]))
    assert "--batch-size >= 2" in msg


def test_loader_processes_build_the_same_batches(cohort, tmp_path):
    """--num-workers 2 builds the batches in two loader processes: the run's weights and logged losses are the
    ones of a run that builds them in the training process."""
    root, _ = cohort
    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"workers{workers}"
        train.pretrain(config("stay", root, run, max_steps=3, num_workers=workers))
        runs[workers] = checkpoints.load_checkpoint(run / "stay.pt"), [r["loss"] for r in records(run)]
    (one, losses_one), (two, losses_two) = runs[0], runs[2]
    assert losses_one == losses_two and len(losses_one) == 3
    assert one["model"].keys() == two["model"].keys()
    assert all(torch.equal(v, two["model"][k]) for k, v in one["model"].items())
