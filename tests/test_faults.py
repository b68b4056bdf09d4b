"""Reliability faults: nothing is lost without a word. Each test builds one bad input or fault and checks that
the run reads everything, or counts and reports what it skipped, or stops in one line naming the file, the row
and what to do, leaving no half-written output behind."""
import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import checkpoints
import data
import evaluate
import synthetic
import train
from folders import InputError
from preprocessing import build, pipeline, tables
from preprocessing.pipeline import PreprocessConfig, preprocess
from progress import Reporter
from conftest import MIMIC3_DEMO, NOTES, REPO, T0, TinyMimic3, hours_after, one_line_error
from medhmp import cli

needs_demo = pytest.mark.skipif(not MIMIC3_DEMO.is_dir(), reason="the MIMIC-III demo (conftest.MIMIC3_DEMO) is not present")
needs_notes = pytest.mark.skipif(not NOTES.is_dir(), reason="the open notes (conftest.NOTES) are not present")


# ----------------------------------------------------------------------------------------------- helpers
def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _rewrite(raw: Path, table: str, edit) -> None:
    path = raw / f"{table}.csv.gz"
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes()).decode()).encode()))


def _tiny(codes=("4019",)) -> TinyMimic3:
    """Two patients, each with one admission, one 60-hour MetaVision stay and one discharge summary."""
    t = TinyMimic3()
    for s in (1, 2):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72, codes=codes)
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 1), 60)
        t.note(s, s * 10 + 1, hours_after(T0, 72), f"note {s} discharged home stable")
    return t


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _demo_links(folder: Path, without=()) -> Path:
    """A MIMIC-III demo folder of symlinks to the shared files, leaving out the tables in `without`."""
    folder.mkdir(parents=True)
    for p in MIMIC3_DEMO.glob("*.csv.gz"):
        if p.name.split(".")[0] not in without:
            (folder / p.name).symlink_to(p)
    return folder


def _two_members(source: Path, target: Path) -> None:
    """`source` re-written as two gzip members (`cat a.gz b.gz`), split after half of its lines."""
    lines = gzip.decompress(source.read_bytes()).splitlines(keepends=True)
    half = len(lines) // 2
    target.write_bytes(gzip.compress(b"".join(lines[:half]), 1) + gzip.compress(b"".join(lines[half:]), 1))


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory) -> Path:
    return _tiny().write(tmp_path_factory.mktemp("tiny") / "raw")


@pytest.fixture(scope="module")
def tiny_processed(tiny_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-processed") / "processed"
    preprocess(PreprocessConfig(raw=tiny_raw, out=out, quiet=True))
    return out


@pytest.fixture
def raw(tiny_raw, tmp_path) -> Path:
    """A copy of the tiny extract that a test may break."""
    return Path(shutil.copytree(tiny_raw, tmp_path / "raw"))


# ------------------------------------------------------------------------------- 1: multi-member gzip
@pytest.mark.slow
@needs_demo
@needs_notes
def test_multi_member_gzip_tables_are_read_whole(tmp_path):
    raw = _demo_links(tmp_path / "raw", without=("ADMISSIONS", "CHARTEVENTS"))
    for table in ("ADMISSIONS", "CHARTEVENTS"):       # a core table and an event table (the fast block reader)
        _two_members(MIMIC3_DEMO / f"{table}.csv.gz", raw / f"{table}.csv.gz")
    meta = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out", quiet=True))
    assert dict(meta["attrition"]["admissions"])["admissions in the admissions table"] == 129
    assert meta["sources"]["chartevents"]["rows"] == 758355
    assert dict(meta["attrition"]["stays"])["with events in the first 48 h"] == 77
    notes = tmp_path / "NOTEEVENTS.csv.gz"                # and the note reader
    _two_members(NOTES / "NOTEEVENTS_SYNTHETIC_PAIRING.csv.gz", notes)
    from preprocessing.extract import read_notes
    _, counts, _ = read_notes(notes, set(), Reporter(quiet=True).task)
    assert counts["rows"] == 265


# ------------------------------------------------------------------------ 2: two files for one table
@pytest.mark.parametrize("twin", ["ADMISSIONS.csv", "admissions.csv.gz"])
def test_two_files_for_one_table_stop_naming_both(raw, tmp_path, twin):
    (raw / twin).write_bytes(gzip.decompress((raw / "ADMISSIONS.csv.gz").read_bytes()))
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    line = one_line_error(result, r"both .* and .* match one table")
    assert twin in line and "ADMISSIONS.csv.gz" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 3: runaway quotes
def test_unbalanced_quote_in_a_note_stops_naming_the_row(tmp_path):
    t = _tiny()
    t.note(1, 11, hours_after(T0, 80), "a later note")
    raw = t.write(tmp_path / "raw")
    _rewrite(raw, "NOTEEVENTS", lambda text: text.replace("note 2 discharged", '"note 2 discharged'))
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    one_line_error(result, r"NOTEEVENTS.csv.gz: row 2: a quoted field opened in this row is still open at "
                            r"the end of the file")
    assert not (tmp_path / "out").exists()


def test_quote_running_past_the_row_limit_stops_the_block_reader(tmp_path):
    path = tmp_path / "CHARTEVENTS.csv"
    row = b"1,2,3,220045,2150-01-01 09:00:00,80\n"
    body = row * ((tables.MAX_RECORD_BYTES // len(row)) + 1000)
    path.write_bytes(b"a,b,c,itemid,charttime,value\n" + row + b'1,2,3,220045,"2150-01-01,80\n' + body)
    with pytest.raises(InputError, match=r"CHARTEVENTS.csv: row 2: a quoted field opened in this row "
                                                r"does not close within 4 MiB"):
        list(tables.read_blocks(tables.Source(path), {"itemid": True}))


def test_a_stray_quote_that_merges_later_rows_stops_naming_the_row(tmp_path):
    rows = [b"1,220045,80"] * 10
    rows[2] = b'1,220045,"80'                   # row 3: a stray quote ...
    rows[7] = b'1,220210,"12,5"'                # ... pairs with the first quote of row 8: rows 3-8 become one
    path = tmp_path / "CHARTEVENTS.csv"
    path.write_bytes(b"a,itemid,value\n" + b"\n".join(rows) + b"\n")
    with pytest.raises(InputError, match=r"row 3: a quoted field opened in this row runs over 6 lines "
                                                r"into a row of 4 fields, not 3"):
        list(tables.read_blocks(tables.Source(path), {"itemid": True}))


@needs_notes
def test_a_stray_quote_inside_a_note_stops_instead_of_reading_its_text_as_rows(tmp_path):
    text = gzip.decompress((NOTES / "NOTEEVENTS_SYNTHETIC_PAIRING.csv.gz").read_bytes())
    notes = tmp_path / "NOTEEVENTS.csv.gz"      # the first note's quoted text ends early, at a stray quote
    notes.write_bytes(gzip.compress(text.replace(b"Annual exam.", b'Annual exam."', 1)))
    from preprocessing.extract import read_notes
    with pytest.raises(InputError, match=r"NOTEEVENTS.csv.gz: row \d+: a quoted field opened in this row "
                                                r"runs over \d+ lines .*, after malformed rows from row 3 on"):
        read_notes(notes, set(), Reporter(quiet=True).task)


def test_a_bare_quote_inside_a_field_is_read_as_csv_does(tmp_path):
    path = tmp_path / "t.csv"                   # not a runaway: a quote opens a field only at its start
    path.write_bytes(b'a,b\n1,say "hi\n2,z\n3,"x,y"\n')
    blocks = list(tables.read_blocks(tables.Source(path), {"a": True, "b": True}))
    assert [v for b in blocks for v in b["b"].tolist()] == [b'say "hi', b"z", b"x,y"]


def test_malformed_note_rows_are_counted_and_reported(raw, tmp_path):
    _rewrite(raw, "NOTEEVENTS", lambda text: text.replace("note 2 discharged home stable",
                                                          "note 2 discharged home stable,extra field"))
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["notes"]["malformed rows"] == 1 and meta["notes"]["with_note"] == 1
    assert re.search(r"warning: .*NOTEEVENTS.csv.gz: 1 malformed rows skipped \(first at row 2\)", result.output)


# --------------------------------------------------------------------------- 4: padded ids and codes
def test_ids_codes_and_flags_padded_with_spaces_are_read(raw, tiny_processed, tmp_path):
    def pad(text):                              # ', 10006': a space after every comma of every data row
        head, *rows = text.splitlines()
        return "\n".join([head] + [row.replace(",", ", ") for row in rows]) + "\n"
    for table in ("DIAGNOSES_ICD", "ICUSTAYS", "ADMISSIONS", "CHARTEVENTS"):
        _rewrite(raw, table, pad)
    meta = preprocess(PreprocessConfig(raw=raw, out=tmp_path / "out", quiet=True))
    want = json.loads((tiny_processed / "meta.json").read_text())
    assert meta["icd_vocab"] == want["icd_vocab"] == ["ICD9:4019"]
    assert meta["counts"] == want["counts"]
    assert meta["attrition"] == want["attrition"]


# ------------------------------------------------------------------------------ 5: times out of order
def test_times_out_of_order_are_invalid_rows_with_their_own_label(tmp_path):
    t = _tiny()
    t.admission(1, 12, hours_after(T0, 24 * 10), -24)          # discharged before admitted: invalid
    t.patient(3)
    t.admission(3, 31, T0, 72)
    t.stay(3, 31, 301, hours_after(T0, 5), -2)                 # ICU outtime before intime: invalid
    meta = preprocess(PreprocessConfig(raw=t.write(tmp_path / "raw"), out=tmp_path / "out", quiet=True))
    admissions, stays = dict(meta["attrition"]["admissions"]), dict(meta["attrition"]["stays"])
    assert admissions["of kept patients"] == 4
    assert admissions["discharged at or after admission (others: invalid times)"] == 3
    assert stays["with an outtime"] == 3 and stays["outtime after intime (others: invalid times)"] == 2
    d = data.load_processed(tmp_path / "out")                  # admission 11 is not "readmitted" by 12
    readmitted = d.labels["readmission"]
    assert 12 not in d.admissions["hadm_id"].tolist()
    assert readmitted["label"][readmitted["subject_id"] == 1].tolist() == [0.0]


def test_nothing_usable_left_stops_in_one_line(tmp_path):
    t = TinyMimic3()
    for s in (1, 2):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72, codes=())
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 5), -3)     # every outtime before its intime
    result = _cli("preprocess", "--raw", t.write(tmp_path / "raw"), "--out", tmp_path / "out")
    one_line_error(result, r"nothing usable is left: ICU stays in the icustays table 2, none left at 'outtime "
                            r"after intime .*', and admissions in the admissions table 2, none left at 'with "
                            r"ICD diagnosis codes'")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- 7: --out a symlink
def test_out_that_is_a_symlink_is_written_through(raw, tmp_path):
    (tmp_path / "big-disk" / "processed").mkdir(parents=True)
    (tmp_path / "processed").symlink_to(tmp_path / "big-disk" / "processed")
    preprocess(PreprocessConfig(raw=raw, out=tmp_path / "processed", quiet=True))
    assert (tmp_path / "processed").is_symlink()
    assert (tmp_path / "big-disk" / "processed" / "meta.json").is_file()
    (tmp_path / "big-disk" / "raw").mkdir()
    (tmp_path / "synth").symlink_to(tmp_path / "big-disk" / "raw")
    synthetic.synthesize(synthetic.SynthConfig(out=tmp_path / "synth", patients=5, quiet=True))
    assert (tmp_path / "synth").is_symlink() and (tmp_path / "big-disk" / "raw" / "PATIENTS.csv.gz").is_file()
    assert sorted(p.name for p in (tmp_path / "big-disk").iterdir()) == ["processed", "raw"]


# --------------------------------------------------------------------------- 8: empty cohort in evaluate
def test_evaluate_skips_empty_stay_and_admission_cohorts(tmp_path):
    t = TinyMimic3()
    for s in (1, 2):
        t.patient(s)
        t.admission(s, s * 10 + 1, T0, 72)
        t.stay(s, s * 10 + 1, s * 100 + 1, hours_after(T0, 1), 60, dbsource="carevue")   # no MetaVision stay
    preprocess(PreprocessConfig(raw=t.write(tmp_path / "raw"), out=tmp_path / "out", quiet=True))
    for task in ("mortality", "readmission"):
        reports = evaluate.evaluate(evaluate.FinetuneConfig(task=task, data=tmp_path / "out", run=tmp_path / "run",
                                                            init="none", seeds=1, epochs=1, quiet=True))
        assert reports[task]["results"]["none/medhmp"]["skipped"] == "no examples in this data"


# --------------------------------------------------------------------------- 9: damaged files
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# a file of DATA that is not the one meta.json recorded is named before it is read (tests/test_run_safety.py)
NOT_RECORDED = "not the file this folder was written with"
DAMAGE = {
    "stays.pt truncated": ("stays.pt", _truncate, NOT_RECORDED),
    "admissions.pt random bytes": ("admissions.pt", lambda p: p.write_bytes(os.urandom(5000)), NOT_RECORDED),
    "meta.json truncated": ("meta.json", _truncate, "cannot be read, it is truncated or corrupt"),
    "labels.csv missing": ("labels.csv", lambda p: p.unlink(), "missing"),
    "splits.json garbage": ("splits.json", lambda p: p.write_text("[1, 2"), NOT_RECORDED),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_processed_files_are_one_line_naming_the_file(case, tiny_processed, tmp_path):
    name, damage, what = DAMAGE[case]
    out = Path(shutil.copytree(tiny_processed, tmp_path / "processed"))
    damage(out / name)
    result = _cli("evaluate", "--task", "mortality", "--data", out, "--run", tmp_path / "run", "--init", "none")
    one_line_error(result, re.escape(f"{out / name}: {what}") + r".*re-run `python medhmp.py preprocess --out ")


def test_an_empty_admission_checkpoint_is_one_line_not_aborted(processed_cohort, tmp_path):
    """Item 17: a 0-byte admission.pt made torch.load raise EOFError, which click prints as 'Aborted!'."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "admission.pt").write_bytes(b"")
    result = _cli("evaluate", "--task", "mortality", "--data", processed_cohort, "--run", run)
    assert "Aborted" not in result.output
    one_line_error(result, re.escape(f"{run / 'admission.pt'}: ") + r".*re-run `python medhmp.py pretrain")


# Items 6 and 14-18 (pretraining: overwrite refusal and the stay checkpoint an admission one grew from, resume by
# content and its messages, resume without a checkpoint, a non-finite loss before any checkpoint, admission batch
# size 1) are tested in tests/test_train.py beside the loop they guard: test_an_existing_checkpoint_is_not_overwritten
# _without_asking, test_admission_checkpoint_records_its_stay_checkpoint, test_resume_survives_relative_paths_and_a
# _moved_run, test_resume_with_changed_settings_is_refused_in_one_line, test_resume_without_a_checkpoint_says_so,
# test_non_finite_loss_before_any_checkpoint_says_none_was_written, test_admission_batch_size_one_is_refused.


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "not a dict"])
def test_damaged_checkpoint_is_one_line_without_unsafe_advice(tmp_path, damage):
    path = tmp_path / "stay.pt"
    checkpoints.save_checkpoint({"model": {"w": torch.ones(1000)}, "step": 1}, path)
    if damage == "truncated":
        _truncate(path)
    elif damage == "random bytes":
        path.write_bytes(os.urandom(4096))
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(InputError) as err:
        checkpoints.load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "re-run `python medhmp.py pretrain --level stay`" in message
    assert "weights_only" not in message


def test_damaged_note_cache_is_ignored_with_a_warning_and_rebuilt(raw, tiny_processed, tmp_path):
    out = Path(shutil.copytree(tiny_processed, tmp_path / "processed"))
    _truncate(out / "note_cache.pt")
    result = _cli("preprocess", "--raw", raw, "--out", out)
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: .*note_cache.pt is damaged; ignoring it", result.output)
    cache = torch.load(out / "note_cache.pt", weights_only=True)
    assert len(cache[f"keys_{cache['dims'][0]}"]) == 2


# ----------------------------------------------------------------------- 10: unwritable outputs, full disk
@pytest.fixture
def no_work(monkeypatch):
    """Reading the extract fails the test: the error must come before any work."""
    def fail(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")
    monkeypatch.setattr(pipeline, "build_mimic", fail)
    monkeypatch.setattr(synthetic, "_cohort", fail)
    monkeypatch.setattr(evaluate, "evaluate_task", fail)


def test_out_under_a_file_fails_before_any_work(raw, tmp_path, no_work):
    (tmp_path / "afile").write_text("not a folder")
    for command in (["preprocess", "--raw", raw], ["synth", "--patients", 5]):
        result = _cli(*command, "--out", tmp_path / "afile" / "sub")
        one_line_error(result, re.escape(f"{tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a "
                                          "folder; choose another --out"))
    result = _cli("evaluate", "--task", "mortality", "--run", tmp_path / "afile", "--init", "none")
    one_line_error(result, re.escape(f"{tmp_path / 'afile' / 'eval'}: cannot write there") + ".*--run")


def test_out_that_is_the_current_folder_is_refused(raw, tmp_path, monkeypatch, no_work):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    one_line_error(_cli("preprocess", "--raw", raw, "--out", "."), r"is the current folder")


def test_read_only_parent_fails_before_any_work(raw, tmp_path, monkeypatch, no_work):
    (tmp_path / "ro").mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):   # root ignores chmod, so the refusal of a read-only folder is simulated
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "ro" / "out")
    one_line_error(result, r"ro/out: cannot write there \(Permission denied: .*\.out\.lock\)")
    assert list((tmp_path / "ro").iterdir()) == []


def _full_disk(monkeypatch, real_save=torch.save):
    def save(obj, f, *args, **kwargs):   # half a file, then the disk is full
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", save)


def test_full_disk_while_writing_keeps_the_old_output_and_no_leftovers(raw, tiny_processed, tmp_path, monkeypatch):
    out = Path(shutil.copytree(tiny_processed, tmp_path / "processed"))
    before = (out / "stays.pt").read_bytes()
    _full_disk(monkeypatch)
    result = _cli("preprocess", "--raw", raw, "--out", out)
    one_line_error(result, re.escape(f"{out}: cannot write there (No space left on device)"))
    assert (out / "stays.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw"]    # no .tmp folder, no lock


def test_full_disk_while_checkpointing_leaves_no_temporary_file(tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(InputError, match="cannot write .*stay.pt: No space left"):
        checkpoints.save_checkpoint({"w": torch.ones(1000)}, tmp_path / "stay.pt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 11: a bad --text-model
@pytest.fixture
def tables_unread(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a table was read before the text model was loaded")
    monkeypatch.setattr(build, "load_core", fail)


def test_mistyped_text_model_path_fails_before_reading_tables(raw, tmp_path, tables_unread):
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out", "--text-model", "./models/clinical-t5")
    one_line_error(result, r"--text-model ./models/clinical-t5: no such folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.slow
def test_hub_text_model_offline_fails_before_reading_tables(raw, tmp_path, tables_unread, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out", "--text-model", "someorg/no-such-t5")
    one_line_error(result, r"--text-model someorg/no-such-t5: not a local folder, and as a hub name, it cannot "
                            r"be loaded")


# ------------------------------------------------------------------------------------ 12: --lr
@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
@pytest.mark.parametrize("command", [["pretrain", "--level", "stay"], ["evaluate", "--task", "mortality"]])
def test_lr_must_be_a_positive_finite_number(command, lr, tmp_path):
    result = _cli(*command, "--data", tmp_path / "absent", "--lr", lr)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--lr'" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------- 13: two runs, one --out
def test_a_second_run_into_the_same_out_is_refused(raw, tiny_processed, tmp_path):
    out = Path(shutil.copytree(tiny_processed, tmp_path / "processed"))
    before = (out / "stays.pt").read_bytes()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # the first run, alive
    try:
        (tmp_path / ".processed.lock").write_text(str(first.pid))
        result = _cli("preprocess", "--raw", raw, "--out", out)
        one_line_error(result, rf"processed: process {first.pid} is writing there \(lock \.processed\.lock\); "
                                r"wait for it to finish or choose another --out")
        assert (out / "stays.pt").read_bytes() == before
        assert (tmp_path / ".processed.lock").read_text() == str(first.pid)
    finally:
        first.kill()
        first.wait()
    result = _cli("preprocess", "--raw", raw, "--out", out)      # its process is gone: the lock is stale
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw"]


# -------------------------------------------------------------------------- 19: SIGTERM, dead runs
@pytest.mark.slow
@needs_demo
def test_sigterm_removes_the_staging_folder(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "medhmp.py"), "preprocess", "--raw", str(MIMIC3_DEMO),
                             "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.tmp-*")), "the staging folder never appeared"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err.decode()
    assert list(tmp_path.iterdir()) == [], [p.name for p in tmp_path.iterdir()]


@pytest.mark.slow
def test_sigterm_while_a_command_writes_a_file_leaves_no_tmp(tmp_path):
    """Every command runs with SIGTERM raised as an interrupt, so a checkpoint cut mid-write loses its .tmp."""
    script = (f"import os, pathlib, signal, sys; sys.path.insert(0, {str(REPO)!r}); import medhmp, folders, train\n"
              "def write(tmp):\n    tmp.write_bytes(b'half'); os.kill(os.getpid(), signal.SIGTERM)\n"
              "def command(cfg):\n    folders.replace_file(cfg.run / 'stay.pt', write)\n"
              f"medhmp._run(command, train.StayPretrainConfig, run=pathlib.Path({str(tmp_path)!r}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Terminated" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == [], [p.name for p in tmp_path.iterdir()]


def test_a_swap_cut_by_a_kill_is_completed_and_dead_runs_tidied(tiny_processed, tmp_path):
    dead, other = _dead_pid(), _dead_pid()
    shutil.copytree(tiny_processed, tmp_path / f".processed.tmp-{dead}")        # written whole, then killed
    shutil.copytree(tiny_processed, tmp_path / f".processed.old-{dead}")        # between the two renames
    (tmp_path / f".processed.tmp-{other}").mkdir()                              # a run killed while working
    (tmp_path / ".processed.lock").write_text(str(other))
    d = data.load_processed(tmp_path / "processed")
    assert len(d.stays["stay_id"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_the_next_run_restores_out_when_only_the_old_folder_is_left(raw, tiny_processed, tmp_path):
    dead = _dead_pid()
    shutil.copytree(tiny_processed, tmp_path / f".processed.old-{dead}")   # killed before its staging was whole
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "processed")
    assert result.exit_code == 0, result.output
    assert f"undid the folder swap of process {dead}, which was killed" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw"]


# ---------------------------------------------------------------------- 20: a summary of skipped rows
def test_skipped_rows_get_one_summary_line_per_table(raw, tmp_path):
    def break_rows(text):
        lines = text.splitlines()
        lines[3] += ",an extra field"                                       # rows 3 and 5 are malformed
        lines[5] = lines[5].rsplit(",", 2)[0]
        lines[7] = lines[7].replace(T0[:10], "yesterday", 1)                # row 7: an unparsable time
        return "\n".join(lines) + "\n"
    _rewrite(raw, "CHARTEVENTS", break_rows)
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "CHARTEVENTS.csv.gz" in line and "warning" in line]
    assert len(lines) == 1, result.output
    assert "2 malformed rows skipped (first at row 3); 1 rows with an unparsable time" in lines[0]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["sources"]["chartevents"]["bad_rows"] == 2 and meta["sources"]["chartevents"]["first_bad_row"] == 3


# ------------------------------------------------------------------- issue 9: bad input at scale
@pytest.fixture(scope="module")
def long_chart(tmp_path_factory):
    """A synthetic MIMIC-III extract whose CHARTEVENTS spans two read blocks (about 24 MB of text; blocks are
    tables.BLOCK_BYTES = 16 MiB), with three bad rows 90% of the way in: one whose valuenum is not a number, one
    with an extra field, one whose charttime is not a date (month 13)."""
    raw = tmp_path_factory.mktemp("long") / "raw"
    synthetic.synthesize(synthetic.SynthConfig(out=raw, patients=60, event_scale=4, quiet=True))
    text = gzip.decompress((raw / "CHARTEVENTS.csv.gz").read_bytes()).decode()
    assert 0.9 * len(text) > tables.BLOCK_BYTES                   # the bad rows are in a later block
    lines = text.splitlines()
    stays = gzip.decompress((raw / "ICUSTAYS.csv.gz").read_bytes()).decode().splitlines()[1:]
    intime = {f[3]: f[9] for f in (line.split(",") for line in stays) if f[4] == "metavision"}

    def used(f):          # a number charted in the first 47 h of a MetaVision stay: read, not left out
        return f[3] in intime and f[9] and intime[f[3]] <= f[5] <= hours_after(intime[f[3]], 47)
    deep = next(i for i in range(int(0.9 * len(lines)), len(lines)) if used(lines[i].split(",")))
    fields = [line.split(",") for line in lines[deep:deep + 3]]
    fields[0][8:10] = ["1.2.3", "1.2.3"]                          # value, valuenum of a row that is read
    fields[1].append("an extra field")
    fields[2][5] = "2150-13-45 09:00:00"                           # charttime
    lines[deep:deep + 3] = [",".join(f) for f in fields]
    (raw / "CHARTEVENTS.csv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=1))
    return raw, deep + 1                                           # the malformed row (data rows count from 1)


@pytest.mark.slow
def test_bad_rows_deep_in_a_large_event_table_are_skipped_and_counted(long_chart, tmp_path):
    raw, line = long_chart
    result = _cli("preprocess", "--raw", raw, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    source = meta["sources"]["chartevents"]
    assert source["bad_rows"] == 1 and source["first_bad_row"] == line
    assert meta["skipped"]["chartevents"]["unparsable number"] == 1
    assert meta["skipped"]["chartevents"]["unparsable time"] == 1
    assert re.search(r"warning: .*CHARTEVENTS.*1 row", result.output), result.output


@pytest.mark.slow
def test_a_run_killed_mid_way_leaves_no_folder_and_the_next_one_starts_cleanly(long_chart, tmp_path):
    raw, _ = long_chart
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "medhmp.py"), "preprocess", "--raw", str(raw), "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)                                               # into the tables (the run takes ~5 s)
    proc.kill()                                                   # SIGKILL: no handler, no tidying
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists() and list(tmp_path.glob(".out.tmp-*")), [p.name for p in tmp_path.iterdir()]
    result = _cli("preprocess", "--raw", raw, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert data.load_processed(out).meta["counts"]["stays"] > 0
