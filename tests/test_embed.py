"""Tests for embed.py: `python medhmp.py embed` on the session's small pretrained run (conftest) writes one vector
per row of each level with the right ids and splits, the same vectors on every run and at every batch size, the
vectors the encoder gives directly; `load_pretrained` returns that encoder; a missing checkpoint, other data, a bad
--out and a failed write are one line and leave no file; the README's scikit-learn block runs as written.
Run: `python -m pytest -q tests/test_embed.py`.
"""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import embed
from conftest import REPO, one_line_error
from data import SPLITS, AdmissionDataset, PatientDataset, StayDataset, load_processed, usable_admissions
from folders import InputError
from medhmp import cli
from models import AdmissionEncoder, CodeEncoder, StayEncoder

ENCODERS = {"stay": StayEncoder, "admission": AdmissionEncoder, "patient": CodeEncoder}


@pytest.fixture(scope="module")
def cohort(processed_cohort):
    return load_processed(processed_cohort)


@pytest.fixture(scope="module")
def files(processed_cohort, pretrained_run, tmp_path_factory) -> dict:
    """level -> the .npz that `medhmp.py embed` wrote for it (through the CLI, default options)."""
    out, done = tmp_path_factory.mktemp("embed"), {}
    for level in embed.LEVELS:
        done[level] = out / f"{level}.npz"
        result = CliRunner().invoke(cli, ["embed", "--level", level, "--data", str(processed_cohort), "--run",
                                          str(pretrained_run), "--out", str(done[level])])
        assert result.exit_code == 0, result.output
        assert f"wrote {done[level]}" in result.output
    return done


def read(path) -> dict:
    with np.load(path, allow_pickle=False) as z:   # no pickle needed: plain numeric and string arrays
        return {k: z[k] for k in z.files}


def expected_ids(level: str, cohort) -> dict:
    """The ids every row of `level` must have, in order, straight from the processed tensors."""
    s, a = cohort.stays, cohort.admissions
    if level == "stay":
        return {k: s[k].numpy() for k in ("subject_id", "hadm_id", "stay_id")}
    if level == "admission":
        rows = usable_admissions(a)
        return {"subject_id": a["subject_id"].numpy()[rows], "hadm_id": a["hadm_id"].numpy()[rows]}
    return {"subject_id": np.unique(a["subject_id"].numpy()[np.diff(a["icd_ptr"].numpy()) > 0])}


@pytest.mark.parametrize("level", list(embed.LEVELS))
def test_every_row_with_its_ids_and_split(level, files, cohort):
    z = read(files[level])
    n = len(z["embeddings"])
    assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape == (n, 16)   # conftest: width 16
    assert np.isfinite(z["embeddings"]).all() and z["embeddings"].std(0).max() > 0
    want = expected_ids(level, cohort)
    assert n == len(want["subject_id"]) > 0
    if level == "stay":
        assert n == cohort.meta["counts"]["stays"]
    else:
        assert n <= cohort.meta["counts"]["admissions" if level == "admission" else "patients"]
    for key in ("subject_id", "hadm_id", "stay_id"):
        assert z[key].dtype == np.int64 and len(z[key]) == n
        assert np.array_equal(z[key], want[key]) if key in want else (z[key] == -1).all(), key
    key = {"stay": "stay_id", "admission": "hadm_id", "patient": "subject_id"}[level]
    assert len(np.unique(z[key])) == n   # one row per stay, admission or patient
    assert set(z["split"]) <= set(SPLITS) and len(set(z["split"])) == 3
    for name in SPLITS:
        assert np.isin(z["subject_id"][z["split"] == name], cohort.splits[name]).all()
    info = json.loads(str(z["info"]))
    assert info["level"] == level and info["rows"] == embed.LEVELS[level] and info["dim"] == 16
    assert info["checkpoint"].endswith("admission.pt") and info["init"] == "admission"


@pytest.mark.parametrize("level", list(embed.LEVELS))
def test_the_same_vectors_on_every_run_and_batch_size(level, files, processed_cohort, pretrained_run, tmp_path):
    again = embed.embed(embed.EmbedConfig(level=level, data=processed_cohort, run=pretrained_run,
                                          out=tmp_path / "again.npz", batch_size=7, quiet=True))
    assert again["rows"] == len(read(files[level])["embeddings"]) and again["dim"] == 16
    np.testing.assert_allclose(read(again["out"])["embeddings"], read(files[level])["embeddings"], atol=1e-5)


@pytest.mark.parametrize("level", list(embed.LEVELS))
def test_load_pretrained_gives_the_encoder_behind_the_file(level, files, cohort, pretrained_run):
    encoder = embed.load_pretrained(pretrained_run, level, cohort.meta)
    assert type(encoder) is ENCODERS[level] and not encoder.training
    z = read(files[level])
    rows = np.arange(5)
    with torch.no_grad():
        if level == "stay":
            got = encoder(StayDataset(cohort, rows).__getitems__(list(rows)))
        elif level == "admission":
            got = encoder(AdmissionDataset(cohort, np.flatnonzero(usable_admissions(cohort.admissions))[rows])
                          .__getitems__(list(rows)))
        else:
            visits = PatientDataset(cohort, z["subject_id"][rows], np.full(5, np.inf), np.zeros(5), max_visits=10 ** 6)
            got = embed.patient_vectors(encoder, visits.__getitems__(list(rows)))
    np.testing.assert_allclose(got.numpy(), z["embeddings"][:5], atol=1e-5)
    saved = torch.load(pretrained_run / "admission.pt", weights_only=True)["model"]
    prefix = {"stay": "encoder.stay_encoder.", "admission": "encoder.", "patient": "encoder.icd_encoder."}[level]
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, saved[prefix + key]), key


def test_load_pretrained_needs_only_the_checkpoint(cohort, pretrained_run, tmp_path):
    """CLIP-style: the encoder is rebuilt from the checkpoint alone (its model_config and weights), from a RUN
    folder or a checkpoint file anywhere, with no processed data; the same weights as when checked against the
    data. A checkpoint without a whole encoder of the level is one InputError."""
    lone = shutil.copyfile(pretrained_run / "admission.pt", tmp_path / "mine.pt")
    for level in embed.LEVELS:
        checked = embed.load_pretrained(pretrained_run, level, cohort.meta).state_dict()
        for encoder in (embed.load_pretrained(pretrained_run, level), embed.load_pretrained(lone, level)):
            assert not encoder.training and encoder.state_dict().keys() == checked.keys()
            assert all(torch.equal(v, checked[k]) for k, v in encoder.state_dict().items())
    with pytest.raises(InputError, match="holds no whole admission encoder"):
        embed.load_pretrained(pretrained_run / "stay.pt", "admission")


def test_init_stay_reads_stage_one_and_only_at_stay_level(files, processed_cohort, pretrained_run, cohort, tmp_path):
    out = tmp_path / "stage1.npz"
    embed.embed(embed.EmbedConfig(level="stay", init="stay", data=processed_cohort, run=pretrained_run, out=out,
                                  quiet=True))
    z = read(out)
    assert json.loads(str(z["info"]))["checkpoint"].endswith("stay.pt")
    assert not np.allclose(z["embeddings"], read(files["stay"])["embeddings"])   # stage 2 moved the stay encoder
    encoder = embed.load_pretrained(pretrained_run, "stay", cohort.meta, init="stay")
    with torch.no_grad():
        np.testing.assert_allclose(encoder(StayDataset(cohort, [0, 1]).__getitems__([0, 1])).numpy(),
                                   z["embeddings"][:2], atol=1e-5)
    result = CliRunner().invoke(cli, ["embed", "--level", "admission", "--init", "stay", "--data",
                                      str(processed_cohort), "--run", str(pretrained_run), "--out", str(out)])
    one_line_error(result, "stay.pt holds only the stay encoder")


def test_no_checkpoint_is_one_line(processed_cohort, tmp_path):
    result = CliRunner().invoke(cli, ["embed", "--level", "stay", "--data", str(processed_cohort), "--run",
                                      str(tmp_path / "nothing"), "--out", str(tmp_path / "x.npz")])
    one_line_error(result, r"admission\.pt: no checkpoint here \(run `python medhmp.py pretrain`")
    assert not (tmp_path / "x.npz").exists()


def test_other_data_is_one_line_and_leaves_the_old_file(processed_cohort, pretrained_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(processed_cohort, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "n_static": meta["n_static"] + 1,
                                                 "icd_vocab": meta["icd_vocab"][::-1]}))
    out = tmp_path / "old.npz"
    np.savez(out, info=np.array(json.dumps({"format": "medhmp-embeddings 1"})))   # an earlier file
    before = out.read_bytes()
    for level, pattern in (("stay", "pretrained on other data .*n_static.*as --data"),
                           ("patient", "ICD vocabulary.*--vocab-from")):
        result = CliRunner().invoke(cli, ["embed", "--level", level, "--data", str(other), "--run",
                                          str(pretrained_run), "--out", str(out)])
        one_line_error(result, pattern)
    assert out.read_bytes() == before


def test_out_must_be_an_npz_file(processed_cohort, pretrained_run, tmp_path):
    result = CliRunner().invoke(cli, ["embed", "--level", "stay", "--data", str(processed_cohort), "--run",
                                      str(pretrained_run), "--out", str(tmp_path / "stays.npy")])
    one_line_error(result, r"--out must name a \.npz file")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["embed", "--level", "stay", "--data", str(processed_cohort), "--run",
                                      str(pretrained_run), "--out", str(blocker / "stays.npz")])
    one_line_error(result, "cannot write there")


def test_an_interrupted_write_leaves_no_file(processed_cohort, pretrained_run, tmp_path, monkeypatch):
    def half_then_interrupt(path, arrays):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(embed, "_save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        embed.embed(embed.EmbedConfig(level="stay", data=processed_cohort, run=pretrained_run,
                                      out=tmp_path / "stays.npz", quiet=True))
    assert list(tmp_path.iterdir()) == []


def readme_block(after: str) -> str:
    """The first ```python block of the README after the line `after`."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


def test_readme_blocks_run_as_written(files, processed_cohort, pretrained_run):
    """The README's scikit-learn block on the session cohort's stay file (mortality has both classes in its
    train and test splits there), then its loader call."""
    pytest.importorskip("sklearn")
    code = readme_block("### Pretrained representations").replace("runs/mimic/stays.npz", str(files["stay"]))
    scope = {}
    exec(code.replace("data/processed", str(processed_cohort)), scope)
    assert 0 <= scope["auroc"] <= 1 and len(scope["X"]) == int(scope["keep"].sum()) > 0
    assert set(scope["split"]) == set(SPLITS)
    code = readme_block("In your own code, one").replace("runs/mimic", str(pretrained_run))
    exec(code.replace("data/processed", str(processed_cohort)), scope)
    assert isinstance(scope["encoder"], StayEncoder) and not scope["encoder"].training
