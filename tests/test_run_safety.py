"""Run safety (issue 18, sections 2-4 beyond preprocessing): a command never destroys a user's files,
one run at a time writes a RUN, shared result files lose no update, a DATA file that is not the one
its folder was written with is named, a really full disk and a read-only RUN are one line, and the
options that the model or the generators cannot take are refused before any work. Each test fails
on 5252a1c. The ones that start processes or train are marked slow."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import checkpoints
import data
import demo
import embed
import evaluate
import folders
import paper_tables
import results
import synthetic
import train
from conftest import REPO, T0, TinyMimic3, hours_after, one_line_error, pretrain_both
from folders import InputError
from medhmp import cli
from preprocessing.pipeline import PreprocessConfig, preprocess


# ----------------------------------------------------------------------------------------- helpers
def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _tiny(patients: int) -> TinyMimic3:
    """`patients` patients, each with one admission and one 60-hour MetaVision stay."""
    t = TinyMimic3()
    for s in range(1, patients + 1):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72, died=s % 2 == 0)
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 1), 60)
    return t


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two processed folders of different extracts (2 and 3 patients); read-only, copy to change."""
    root = tmp_path_factory.mktemp("two")
    out = []
    for n in (2, 3):
        raw = _tiny(n).write(root / f"raw{n}")
        preprocess(PreprocessConfig(raw=raw, out=root / f"processed{n}", quiet=True))
        out.append(root / f"processed{n}")
    return out[0], out[1]


@pytest.fixture
def no_work(monkeypatch):
    """Any of the work starting fails the test: the refusal must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("the work started before the refusal")
    for module, name in ((synthetic, "synthesize"), (evaluate, "evaluate_task"),
                         (train, "load_processed"), (embed, "load_processed")):
        monkeypatch.setattr(module, name, fail)


def _live_process():
    """A process that stays alive until killed (its PID holds a lock in the tests)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------- 2: never destroy the user's files
@pytest.mark.parametrize("product", ["run/stay.pt", "control/run/admission.pt",
                                     "trinetx/run/admission.pt", "processed/meta.json",
                                     "low_label.json"])
def test_demo_refuses_to_replace_what_it_did_not_write(product, tmp_path, no_work):
    out = tmp_path / "demo"
    path = out / product
    path.parent.mkdir(parents=True)
    path.write_bytes(b"the user's own work")
    msg = one_line_error(_cli("demo", "--out", out))
    assert msg.startswith(f"Error: {path}: demo did not write") and "--overwrite" in msg
    assert path.read_bytes() == b"the user's own work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]      # lock released


def test_demo_refuses_an_extract_synth_did_not_write(tmp_path, no_work):
    raw = tmp_path / "demo" / "trinetx" / "raw"
    raw.mkdir(parents=True)
    (raw / "patient.csv").write_text("patient_id\nP1\n")
    msg = one_line_error(_cli("demo", "--out", tmp_path / "demo"))
    assert f"{raw}: holds files synth did not write" in msg and "--overwrite" in msg


def test_demo_replaces_only_what_its_marker_records(tmp_path):
    out = tmp_path / "demo"
    cfg = demo.DemoConfig(out=out)
    for name in ("run/stay.pt", "processed/meta.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    demo.record(out, since=time.time() - 5)        # both written by "this run"
    demo.check_out(cfg)                            # a second demo may replace them
    (out / "run" / "stay.pt").write_text("pretrained again by the user")
    with pytest.raises(InputError, match="run/stay.pt: demo did not write it"):
        demo.check_out(cfg)
    demo.check_out(demo.DemoConfig(out=out, overwrite=True))
    demo.record(out, since=time.time() + 5)        # found, not replaced by this run: not recorded
    recorded = json.loads((out / demo.MARKER).read_text())
    assert list(recorded) == ["processed/meta.json"]


def test_write_view_refuses_a_folder_that_is_not_a_view(two_folders, tmp_path):
    source, _ = two_folders
    d = data.load_processed(source)
    mine = tmp_path / "view"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not a view of a processed folder"):
        data.write_view(source, mine, d.splits)
    assert (mine / "notes.txt").read_text() == "mine"
    view = data.write_view(source, tmp_path / "v", d.splits, data.shuffle_columns(d, d.splits["train"], 0))
    data.write_view(source, view, d.splits)        # a view is replaced
    assert len(data.load_processed(view).stays["stay_id"]) == 2


def test_a_run_another_live_process_holds_is_refused_in_one_line(two_folders, tmp_path, no_work):
    run = tmp_path / "run"
    holder = _live_process()
    try:
        (tmp_path / ".run.lock").write_text(str(holder.pid))
        msg = one_line_error(_cli("pretrain", "--level", "stay", "--data", two_folders[0], "--run", run))
        assert f"process {holder.pid} is writing there" in msg and "--run" in msg
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".run.lock").read_text() == str(holder.pid)   # not ours to remove


@pytest.mark.slow
def test_two_pretrain_runs_into_one_run_at_once(processed_cohort, tmp_path):
    """Both started together: one trains, the other is refused in one line; one whole checkpoint and a
    log of whole lines from one run."""
    run = tmp_path / "run"
    args = [sys.executable, str(REPO / "medhmp.py"), "pretrain", "--level", "stay", "--data",
            str(processed_cohort), "--run", str(run), "--d-model", "8", "--batch-size", "8",
            "--max-steps", "150"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    refused = outs[[p.returncode for p in procs].index(1)]
    # the lock names the PID once its holder has written it
    assert re.search(r"Error: .*run: (process \d+|another run) is writing there", refused), refused
    assert checkpoints.load_checkpoint(run / "stay.pt")["step"] == 150
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in lines].count("start") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


_UPDATER = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
import results
path, me = Path({path!r}), int(sys.argv[1])
for i in range({n}):
    rows = [dict(task="t", init=str(me), model=str(i), seeds=1)]
    results._replace_rows(path, results.RESULT_COLUMNS, rows, ("task", "init", "model"))
"""


@pytest.mark.slow
def test_concurrent_results_csv_updates_lose_no_row(tmp_path):
    """8 processes x 40 updates of one results.csv: every row is there, no update failed."""
    path, writers, n = tmp_path / "results.csv", 8, 40
    script = _UPDATER.format(repo=str(REPO), path=str(path), n=n)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)], stderr=subprocess.PIPE, text=True)
             for w in range(writers)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    rows = results.read_rows(path, results.RESULT_COLUMNS)
    assert sorted((r["init"], r["model"]) for r in rows) == sorted(
        (str(w), str(i)) for w in range(writers) for i in range(n))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]   # no lock, no temporary


def test_a_results_update_waits_for_the_writer_that_holds_the_lock(tmp_path):
    path, holder = tmp_path / "results.csv", _live_process()
    lock = tmp_path / ".results.csv.lock"
    lock.write_text(str(holder.pid))
    threading.Timer(0.3, lock.unlink).start()         # the other writer finishes
    try:
        start = time.monotonic()
        results._replace_rows(path, results.RESULT_COLUMNS, [dict(task="t", init="none", model="m")],
                              ("task", "init", "model"))
        assert time.monotonic() - start >= 0.25
    finally:
        holder.kill()
        holder.wait()
    assert [r["task"] for r in results.read_rows(path, results.RESULT_COLUMNS)] == ["t"]


def test_each_writer_has_its_own_temporary_name_and_dead_ones_are_removed(tmp_path):
    path, dead = tmp_path / "results.csv", _dead_pid()
    (tmp_path / f".results.csv.tmp-{dead}").write_text("half a file of a killed writer")
    seen = []
    folders.replace_file(path, lambda tmp: (seen.append(tmp.name), tmp.write_text("whole")))
    assert seen == [f".results.csv.tmp-{os.getpid()}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


@pytest.mark.parametrize("name, content", [
    ("results.csv", "subject,score\n1,0.5\n"),
    ("eval/mortality.json", '{"my": "notes"}'),
    ("eval/mortality_predictions.csv", "id,p\n1,0.2\n"),
])
def test_evaluate_never_rewrites_a_result_file_it_did_not_write(name, content, two_folders, tmp_path,
                                                                 no_work):
    path = tmp_path / "run" / name
    path.parent.mkdir(parents=True)
    path.write_text(content)
    msg = one_line_error(_cli("evaluate", "--task", "mortality", "--data", two_folders[0], "--run",
                              tmp_path / "run", "--init", "none"))
    assert msg.startswith(f"Error: {path}: not a") and "medhmp wrote" in msg
    assert path.read_text() == content


def test_paper_tables_never_rewrite_a_table_they_did_not_write(two_folders, tmp_path, no_work):
    path = tmp_path / "run" / "tables" / "table1.csv"
    path.parent.mkdir(parents=True)
    path.write_text("my,own,table\n")
    msg = one_line_error(_cli("evaluate", "--task", "mortality", "--model", "all", "--data",
                              two_folders[0], "--run", tmp_path / "run", "--init", "none"))
    assert f"{path}: not a file medhmp wrote" in msg and path.read_text() == "my,own,table\n"


def test_embed_never_replaces_a_file_it_did_not_write(tmp_path, no_work):
    out = tmp_path / "mine.npz"
    np.savez(out, x=np.arange(3))
    msg = one_line_error(_cli("embed", "--level", "stay", "--out", out))
    assert f"{out}: exists and is not an embeddings file medhmp wrote" in msg
    assert np.load(out)["x"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------- 3: damaged or foreign DATA
@pytest.mark.parametrize("name", ["stays.pt", "admissions.pt", "labels.csv", "splits.json"])
def test_a_file_copied_in_from_another_processed_folder_is_named(name, two_folders, tmp_path):
    mine, other = two_folders
    folder = Path(shutil.copytree(mine, tmp_path / "processed"))
    shutil.copyfile(other / name, folder / name)
    with pytest.raises(InputError) as err:
        data.load_processed(folder)
    msg = str(err.value)
    assert msg.startswith(f"{folder / name}: not the file this folder was written with")
    assert f"re-run `python medhmp.py preprocess --out {folder}`" in msg and "\n" not in msg


@pytest.mark.parametrize("command", [
    ["evaluate", "--task", "mortality", "--init", "none", "--seeds", "1"],
    ["pretrain", "--level", "stay"],
    ["embed", "--level", "stay", "--out", "{tmp}/e.npz"],
])
def test_every_command_names_a_foreign_stays_file(command, two_folders, tmp_path):
    mine, other = two_folders
    folder = Path(shutil.copytree(mine, tmp_path / "processed"))
    shutil.copyfile(other / "stays.pt", folder / "stays.pt")
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    msg = one_line_error(_cli(*args, "--data", folder, "--run", tmp_path / "run"))
    assert f"{folder / 'stays.pt'}: not the file this folder was written with" in msg


def test_same_size_other_bytes_are_found_whole_or_sampled(two_folders, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(two_folders[0], tmp_path / "processed"))
    path = folder / "stays.pt"
    monkeypatch.setattr(data, "WHOLE_HASH_BYTES", 1024)       # stays.pt is hashed by samples
    monkeypatch.setattr(data, "SAMPLE_BYTES", 256)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {name: data.file_facts(folder / name) for name in data.DATA_FILES}
    (folder / "meta.json").write_text(json.dumps(meta))
    assert meta["files"]["stays.pt"]["hashed"] == "sampled"
    data.load_processed(folder)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF                                      # the last sampled block
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="its bytes are not those meta.json recorded"):
        data.load_processed(folder)


def test_a_folder_written_before_file_facts_still_loads(two_folders, tmp_path):
    folder = Path(shutil.copytree(two_folders[0], tmp_path / "processed"))
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta.pop("files")) == set(data.DATA_FILES)
    (folder / "meta.json").write_text(json.dumps(meta))
    assert len(data.load_processed(folder).stays["stay_id"]) == 2
    stays = folder / "stays.pt"
    stays.write_bytes(stays.read_bytes()[:100])           # damage is still found when read
    with pytest.raises(InputError, match="stays.pt: cannot be read, it is truncated or corrupt"):
        data.load_processed(folder)


# ------------------------------------------------------------------------------ 4: a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only: skipped where it cannot be mounted), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("a small tmpfs cannot be mounted here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Fill `disk` until about `leave` bytes are free."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


def _big_state() -> dict:
    return {"model": {"w": torch.ones(100_000)}, "step": 1}


def test_a_really_full_disk_while_saving_tensors_is_an_oserror(small_disk):
    _fill(small_disk, 64 << 10)
    with pytest.raises(OSError) as err:
        data.torch_save({"w": torch.ones(100_000)}, small_disk / "stays.pt")
    assert err.value.errno == errno.ENOSPC


def test_a_really_full_disk_while_checkpointing_keeps_the_old_checkpoint(small_disk):
    path = small_disk / "stay.pt"
    checkpoints.save_checkpoint({"model": {"w": torch.zeros(10)}, "step": 0}, path)
    before = path.read_bytes()
    _fill(small_disk, 64 << 10)
    with pytest.raises(InputError, match=r"cannot write .*stay.pt: No space left on device; the "
                                         r"previous checkpoint there is kept"):
        checkpoints.save_checkpoint(_big_state(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "stay.pt"]


@pytest.mark.slow
def test_a_really_full_disk_while_preprocessing_is_one_line_and_leaves_nothing(small_disk, tmp_path):
    """stays.pt of 60 synthetic patients (about 250 KiB) meets the full disk in torch's writer."""
    raw = tmp_path / "raw"
    synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=60, quiet=True))
    _fill(small_disk, 64 << 10)
    result = _cli("preprocess", "--raw", raw, "--out", small_disk / "processed")
    one_line_error(result, re.escape(f"{small_disk / 'processed'}: cannot write there (No space left"))
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_a_really_full_disk_while_pretraining_is_one_line(processed_cohort, small_disk):
    _fill(small_disk, 24 << 10)
    result = _cli("pretrain", "--level", "stay", "--data", processed_cohort, "--run",
                  small_disk / "run", "--d-model", "64", "--max-steps", "1", "--batch-size", "8")
    one_line_error(result, r"No space left on device")
    assert not [p for p in (small_disk / "run").iterdir() if p.suffix == ".pt" or "tmp" in p.name]


def _full_after(limit: int, real_open=open):
    """`open` whose files take `limit` bytes, then fail as a full disk does."""
    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written + len(b) > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda path, mode="r", *a, **k: Full(real_open(path, mode, *a, **k))


def test_torchs_own_full_disk_error_becomes_an_oserror_and_one_line(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the same failure, torch's RuntimeError from its writer, made
    by a file that stops taking bytes."""
    monkeypatch.setattr(data, "open", _full_after(4096), raising=False)
    with pytest.raises(OSError) as err:
        data.torch_save({"w": torch.ones(100_000)}, tmp_path / "stays.pt")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value.__cause__, RuntimeError)
    path = tmp_path / "run" / "stay.pt"
    path.parent.mkdir()
    with pytest.raises(InputError, match="cannot write .*stay.pt: No space left on device"):
        checkpoints.save_checkpoint(_big_state(), path)
    assert list(path.parent.iterdir()) == []


# ------------------------------------------------------------ 4: options refused before any work
def test_d_model_that_the_attention_heads_do_not_divide_is_one_line(tmp_path, no_work):
    msg = one_line_error(_cli("pretrain", "--level", "stay", "--d-model", "7", "--run", tmp_path / "run"))
    assert "--d-model 7: must be a multiple of 4, the number of attention heads" in msg


@pytest.mark.parametrize("command", [["pretrain", "--level", "stay"], ["evaluate", "--task", "mortality"],
                                     ["demo"]])
@pytest.mark.parametrize("seed", [str(10 ** 29), "-1"])
def test_a_seed_the_generators_cannot_take_is_refused(command, seed, tmp_path, no_work):
    result = _cli(*command, "--seed", seed)
    assert result.exit_code == 2 and "Invalid value for '--seed'" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("level", ["stay", "admission"])
def test_a_seed_out_of_range_is_one_line_from_the_library_too(level, tmp_path, no_work):
    with pytest.raises(InputError, match=r"--seed 10+: must be between 0 and 4294967295"):
        train.pretrain(train.LEVELS[level](run=tmp_path / "run", seed=10 ** 29))
    with pytest.raises(InputError, match="--seed"):
        evaluate.evaluate(evaluate.FinetuneConfig(run=tmp_path / "run", seed=10 ** 29))


def test_a_read_only_run_is_one_line_before_any_work(tmp_path, monkeypatch, no_work):
    run = tmp_path / "ro" / "run"
    run.mkdir(parents=True)
    real_open = os.open

    def read_only(path, *args, **kwargs):    # root ignores chmod: a read-only RUN is simulated
        if str(path).startswith(str(run)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    msg = one_line_error(_cli("pretrain", "--level", "stay", "--run", run))
    assert f"{run}: cannot write there (Permission denied" in msg and "--run" in msg
    assert not (tmp_path / "ro" / ".run.lock").exists()


def test_a_read_only_mount_is_one_line_before_any_work(tmp_path, no_work):
    disk = tmp_path / "ro"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("a read-only tmpfs cannot be mounted here (needs root)")
    try:
        msg = one_line_error(_cli("pretrain", "--level", "stay", "--run", disk / "run"))
        assert "cannot write there (Read-only file system" in msg
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_labels_and_label_fraction_together_are_refused(tmp_path, no_work):
    msg = one_line_error(_cli("evaluate", "--task", "mortality", "--labels", "10", "--label-fraction",
                              "0.5", "--run", tmp_path / "run"))
    assert "--labels 10 and --label-fraction 0.5 both choose the training examples" in msg
    for function in (evaluate.evaluate, paper_tables.tables):     # --model medhmp, --model all
        with pytest.raises(InputError, match="give one of them"):
            function(evaluate.FinetuneConfig(run=tmp_path / "run", labels=10, label_fraction=0.5))


def test_max_steps_before_the_first_validation_pass_says_so(processed_cohort, tmp_path):
    result = _cli("pretrain", "--level", "stay", "--data", processed_cohort, "--run", tmp_path / "run",
                  "--d-model", "8", "--batch-size", "8", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert "no validation split" not in result.output
    assert re.search(r"stage 1: it stopped at step 2, before the first validation pass \(step \d+, the "
                     r"end of epoch 1\), so nothing shows whether it learned", result.output), result.output


def test_a_mimic_folder_without_icu_stays_gets_advice_for_mimic(tmp_path):
    t = TinyMimic3()
    for s in (1, 2):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72)
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 1), 60, dbsource="carevue")
    preprocess(PreprocessConfig(raw=t.write(tmp_path / "raw"), out=tmp_path / "processed", quiet=True))
    msg = one_line_error(_cli("pretrain", "--level", "stay", "--data", tmp_path / "processed", "--run",
                              tmp_path / "run"))
    assert "diagnosis extract" not in msg and "--vocab-from" not in msg
    assert "lost every stay of this mimic3 extract at 'MetaVision" in msg and "attrition" in msg


# ------------------------------------------------------------------------- the sweep: other commands
def test_preprocess_never_replaces_a_folder_that_holds_other_files(two_folders, tmp_path):
    """A RUN (or any file) inside a processed folder would be lost when preprocess swaps it whole."""
    folder = Path(shutil.copytree(two_folders[0], tmp_path / "processed"))
    (folder / "run").mkdir()
    (folder / "run" / "stay.pt").write_bytes(b"weeks of pretraining")
    raw = _tiny(2).write(tmp_path / "raw")
    msg = one_line_error(_cli("preprocess", "--raw", raw, "--out", folder))
    assert f"{folder}: holds files preprocess did not write (run)" in msg
    assert (folder / "run" / "stay.pt").read_bytes() == b"weeks of pretraining"


@pytest.mark.parametrize("name", ["results.csv", "eval/mortality.json"])
def test_a_result_path_that_is_a_folder_is_one_line(name, two_folders, tmp_path, no_work):
    (tmp_path / "run" / name).mkdir(parents=True)
    msg = one_line_error(_cli("evaluate", "--task", "mortality", "--data", two_folders[0], "--run",
                              tmp_path / "run", "--init", "none"))
    assert f"{tmp_path / 'run' / name}: is not a file" in msg


def test_a_damaged_table_cell_is_run_again_not_a_traceback(tmp_path):
    path = tmp_path / "cell.json"
    path.write_text('{"task": "mortality", "protocol"')          # cut by a full disk, say
    assert paper_tables.stored_cell(path, {"protocol": {}, "checkpoint": None}) is None


def test_pretrain_into_a_run_that_is_a_file_is_one_line(tmp_path, no_work):
    (tmp_path / "run").write_text("my notes")
    msg = one_line_error(_cli("pretrain", "--level", "stay", "--run", tmp_path / "run"))
    assert f"{tmp_path / 'run'}: is a file, not a folder; choose another --run" in msg
    assert (tmp_path / "run").read_text() == "my notes"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_write_that_fails_whatever_the_file_is_one_line_from_every_command(code, tmp_path,
                                                                             monkeypatch):
    def fail(cfg, *rest):
        raise OSError(code, os.strerror(code), str(tmp_path / "run" / "log.jsonl"))
    for module, name, args in ((evaluate, "evaluate", ["evaluate", "--task", "mortality"]),
                               (embed, "embed", ["embed", "--level", "stay"]),
                               (train, "pretrain_stage", ["pretrain", "--level", "stay"])):
        monkeypatch.setattr(module, name, fail)
        msg = one_line_error(_cli(*args, "--run", tmp_path / "run"))
        assert f"cannot write there ({os.strerror(code)}" in msg, msg


@pytest.mark.slow
def test_a_second_demo_into_its_own_out_runs_and_a_changed_checkpoint_stops_the_third(tmp_path,
                                                                                   monkeypatch):
    small = dict(d_model=8, stay_epochs=1, admission_epochs=1, seeds=1, epochs=1, patience=1,
                 trinetx_patients=60, patients=60, quiet=True)
    out = tmp_path / "demo"
    for _ in range(2):
        demo.demo(demo.DemoConfig(out=out, **small))
    recorded = json.loads((out / demo.MARKER).read_text())
    assert set(recorded) == set(demo.PRODUCTS)
    checkpoints.save_checkpoint({"model": {}, "step": 0}, out / "control" / "run" / "stay.pt")
    with pytest.raises(InputError, match="control/run/stay.pt: demo did not write it"):
        demo.demo(demo.DemoConfig(out=out, **small))
