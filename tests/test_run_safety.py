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
