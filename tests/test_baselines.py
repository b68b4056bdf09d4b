"""Tests for baselines.py: shapes, each example scored alone, masked modalities and padding change nothing
(garbage there), absent modalities give finite outputs and gradients, and each model learns a planted task from
scratch (slow); and their wiring into `evaluate --model NAME`. Tiny sizes, CPU."""
import shutil

import pytest
import torch
from click.testing import CliRunner

import baselines
import evaluate
from baselines import ADMISSION_MODELS, STAY_MODELS
from conftest import one_line_error, read_csv
from medhmp import cli
from metrics import auroc
from models import ModelConfig

META = {"seq_len": 6, "n_features": 11, "n_static": 5, "n_icd": 13, "n_drug": 7, "note_dim": 8, "format_version": 1}
T, F, S, E, D = 6, 11, 5, 8, 16


@pytest.fixture
def cfg():
    return ModelConfig.from_meta(META, d_model=D)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def stays(n, g, density=0.2):
    """Dense stays (n, T, F) and static vectors (n, S)."""
    return (torch.rand(n, T, F, generator=g) < density).float(), (torch.rand(n, S, generator=g) < 0.5).float()


def stay_batch(dense, static):
    return {"ts_idx": dense.flatten().nonzero().squeeze(1), "static": static}


def admission_batch(counts=(1, 0, 2, 3, 1, 1), K=3, seed=0, dense=None, static=None, note=None, note_mask=None):
    """Admissions with `counts` real stays each (packed in row-major order of stay_mask); with the defaults
    admission 1 has no stay and admission 2 no note."""
    g, B = gen(seed), len(counts)
    stay_mask = torch.arange(K)[None, :] < torch.tensor(counts)[:, None]  # (B, K), left-aligned
    if dense is None:
        dense, static = stays(int(stay_mask.sum()), g)
    if note_mask is None:
        note_mask = torch.ones(B, dtype=torch.bool)
        note_mask[2 % B] = B <= 2
    note = torch.randn(B, E, generator=g) * note_mask[:, None] if note is None else note
    return {**stay_batch(dense, static), "stay_mask": stay_mask, "note": note, "note_mask": note_mask,
            "icd": torch.zeros(B, 13), "drug": torch.zeros(B, 7), "icd_mask": torch.ones(B, dtype=torch.bool),
            "drug_mask": torch.zeros(B, dtype=torch.bool), "dense": dense}


def one_admission(batch, i):
    """Admission i of an admission batch, alone."""
    counts = batch["stay_mask"].sum(1).tolist()
    first = sum(counts[:i])
    dense, static = batch["dense"][first:first + counts[i]], batch["static"][first:first + counts[i]]
    return admission_batch((counts[i],), K=batch["stay_mask"].shape[1], dense=dense, static=static,
                           note=batch["note"][i:i + 1], note_mask=batch["note_mask"][i:i + 1])


def build(registry, name, cfg):
    torch.manual_seed(0)
    return registry[name](cfg, dropout=0.2).eval()


# ------------------------------------------------------------------------------------------ stay level
@pytest.mark.parametrize("name", sorted(STAY_MODELS))
def test_stay_models_score_each_stay_alone(cfg, name):
    model = build(STAY_MODELS, name, cfg)
    dense, static = stays(5, gen())
    out = model(stay_batch(dense, static))
    assert out.shape == (5,) and torch.isfinite(out).all()
    alone = torch.cat([model(stay_batch(dense[i:i + 1], static[i:i + 1])) for i in range(5)])
    assert torch.allclose(out, alone, atol=1e-5)
    # a changed cell changes its own stay's output, and no other
    changed = dense.clone()
    changed[1, 2, 3] = 1 - changed[1, 2, 3]
    other = model(stay_batch(changed, static))
    assert not torch.isclose(other[1], out[1]) and torch.allclose(other[[0, 2, 3, 4]], out[[0, 2, 3, 4]], atol=1e-6)


@pytest.mark.parametrize("name", ["f-lstm", "f-cnn", "raim", "dcmn"])
def test_multimodal_stay_models_read_the_static_vector(cfg, name):
    model = build(STAY_MODELS, name, cfg)
    dense, static = stays(3, gen())
    assert not torch.allclose(model(stay_batch(dense, static)), model(stay_batch(dense, 1 - static)))


@pytest.mark.parametrize("name", ["ts-lstm", "ts-transformer"])
def test_unimodal_stay_models_ignore_the_static_vector(cfg, name):
    model = build(STAY_MODELS, name, cfg)
    dense, static = stays(3, gen())
    assert torch.equal(model(stay_batch(dense, static)), model(stay_batch(dense, 1 - static)))


def test_dcmn_static_memory_without_any_present_feature_is_finite(cfg):
    model = build(STAY_MODELS, "dcmn", cfg).train()
    dense, static = stays(3, gen())
    out = model(stay_batch(dense, torch.zeros_like(static)))
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                             if p.grad is not None)


# ------------------------------------------------------------------------------------- admission level
def test_admission_registry_has_the_eight_yang_wu_models():
    assert sorted(ADMISSION_MODELS) == sorted(f"{a}-{b}" for ts in ("lstm", "cnn", "star", "encoder")
                                               for a, b in (("bert", ts), (ts, "bert")))
    assert ADMISSION_MODELS["bert-star"].keywords == {"ts": "star", "main": "note"}
    assert ADMISSION_MODELS["star-bert"].keywords == {"ts": "star", "main": "ts"}


@pytest.mark.parametrize("name", sorted(ADMISSION_MODELS))
def test_admission_models_mask_what_is_absent(cfg, name):
    model = build(ADMISSION_MODELS, name, cfg)
    batch = admission_batch()
    out = model(batch)
    assert out.shape == (6,) and torch.isfinite(out).all()
    # each admission alone scores as in the batch (stays are pooled per admission)
    alone = torch.cat([model(one_admission(batch, i)) for i in range(6)])
    assert torch.allclose(out, alone, atol=1e-5)
    # garbage in the masked note and two more empty stay slots change nothing
    noisy = dict(batch, note=batch["note"] + (~batch["note_mask"])[:, None] * 100 * torch.randn(6, E))
    wide = dict(batch, stay_mask=torch.cat([batch["stay_mask"], torch.zeros(6, 2, dtype=torch.bool)], dim=1))
    assert torch.allclose(out, model(noisy), atol=1e-6) and torch.allclose(out, model(wide), atol=1e-6)
    # while a present note and a present stay do change it
    note = batch["note"].clone()
    note[0] += 1.0
    assert not torch.isclose(model(dict(batch, note=note))[0], out[0])
    assert not torch.isclose(model(dict(batch, static=1 - batch["static"]))[0], out[0])


@pytest.mark.parametrize("name", ["bert-lstm", "lstm-bert"])
def test_admission_models_without_stays_or_notes_are_finite_with_finite_gradients(cfg, name):
    model = build(ADMISSION_MODELS, name, cfg).train()
    for batch in (admission_batch(counts=(0, 0, 0)), admission_batch(note_mask=torch.zeros(6, dtype=torch.bool)),
                  admission_batch(counts=(0, 2), note_mask=torch.tensor([False, False]))):
        model.zero_grad()
        out = model(batch)
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gate_adds_nothing_without_the_auxiliary_modality():
    fusion = baselines.GatedFusion(D, dropout=0.0)
    m, u = torch.randn(4, D), torch.randn(4, D)
    absent = torch.zeros(4, dtype=torch.bool)
    assert torch.allclose(fusion(m, u, absent), fusion.norm(m), atol=1e-6)
    present = fusion(m, u, ~absent)
    assert not torch.allclose(present, fusion.norm(m))
    # the shift is at most as large as the main vector (α = min(β‖m‖/‖H‖, 1))
    H = torch.relu(fusion.gate(torch.cat([m, u], -1))) * fusion.shift(u)
    alpha = torch.clamp(baselines.vector_norm(m) / baselines.vector_norm(H), max=1.0)
    assert torch.allclose(present, fusion.norm(m + alpha * H), atol=1e-6)


# ------------------------------------------------------------------------------------ planted tasks (slow)
def planted_stays(n, g):
    """Stays whose label is whether feature 0 is active in some hour (never otherwise)."""
    y = torch.rand(n, generator=g) < 0.5
    dense, static = stays(n, g, density=0.15)
    dense[:, :, 0] = 0.0
    dense[torch.arange(n)[y], torch.randint(0, T, (n,), generator=g)[y], 0] = 1.0
    return stay_batch(dense, static), y.float()


def planted_admissions(n, g, signal: str):
    """Admissions of 0-3 stays (1-3 for a stay signal); the label is carried by the note (a shift along one
    direction) or by the stays (feature 0 active in some hour of one stay)."""
    y = torch.rand(n, generator=g) < 0.5
    counts = torch.randint(1 if signal == "stays" else 0, 4, (n,), generator=g)
    dense, static = stays(int(counts.sum()), g, density=0.15)
    dense[:, :, 0] = 0.0
    note = torch.randn(n, E, generator=g)
    if signal == "note":
        note[:, 0] += 3.0 * y
    else:
        first = torch.cumsum(counts, 0) - counts  # (n,) each admission's first packed stay
        pos = torch.arange(n)[y]
        dense[first[pos], torch.randint(0, T, (len(pos),), generator=g), 0] = 1.0
    batch = admission_batch(tuple(counts.tolist()), dense=dense, static=static, note=note,
                            note_mask=torch.ones(n, dtype=torch.bool))
    return batch, y.float()


def learns(model, train, test, steps=150, lr=1e-2) -> float:
    """Test AUROC after `steps` full-batch Adam steps on `train` (batch, labels)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(train[0]), train[1]).backward()
        opt.step()
    with torch.no_grad():
        return auroc(test[1].numpy(), model.eval()(test[0]).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STAY_MODELS))
def test_stay_models_learn_a_planted_task(cfg, name):
    g = gen(1)
    train, test = planted_stays(128, g), planted_stays(256, g)
    model = build(STAY_MODELS, name, cfg)
    assert learns(model, train, test) > 0.85, name


@pytest.mark.slow
@pytest.mark.parametrize("signal", ["note", "stays"])
@pytest.mark.parametrize("name", sorted(ADMISSION_MODELS))
def test_admission_models_learn_from_either_modality(cfg, name, signal):
    """The main modality and the gated one both reach the output: each model learns a label carried by the note
    alone and one carried by the stays alone."""
    g = gen(2)
    train, test = planted_admissions(128, g, signal), planted_admissions(256, g, signal)
    model = build(ADMISSION_MODELS, name, cfg)
    assert learns(model, train, test) > 0.85, (name, signal)


# ------------------------------------------------------------------------------------------ evaluate wiring
def test_level_model_says_what_runs_at_each_level():
    cases = {"medhmp": ("medhmp", "medhmp", "lstm"), "retain": ("medhmp", "medhmp", "retain"),
             "f-lstm": ("f-lstm", None, None), "ts-transformer": ("ts-transformer", None, None),
             "bert-lstm": (None, "bert-lstm", None), "lstm": ("medhmp", "medhmp", "lstm")}
    for model, expected in cases.items():
        assert tuple(evaluate.level_model(model, lv) for lv in ("stay", "admission", "patient")) == expected
    assert evaluate.FinetuneConfig().model == "medhmp" and set(evaluate.MODELS) >= {*STAY_MODELS, *ADMISSION_MODELS}


@pytest.fixture
def run_copy(pretrained_run, tmp_path):
    """A writable copy of the shared pretrained run (width 16, which init=none models take from it)."""
    return shutil.copytree(pretrained_run, tmp_path / "run")


def test_evaluate_runs_a_stay_baseline_from_scratch_only(processed_cohort, run_copy):
    cfg = evaluate.FinetuneConfig(task="mortality", model="f-lstm", data=processed_cohort, run=run_copy, seeds=1,
                                  epochs=1, bootstrap=20, quiet=True, table=False)
    report = evaluate.evaluate(cfg)["mortality"]
    assert report["model"] == "f-lstm"
    assert "baseline without pretrained weights" in report["results"]["admission/f-lstm"]["skipped"]
    none = report["results"]["none/f-lstm"]
    assert none["seeds"][0]["loaded_tensors"] == 0 and 0 <= none["mean"]["auroc"] <= 1
    rows = {(r["init"], r["model"]): r for r in read_csv(run_copy / "results.csv")}
    assert rows["none", "f-lstm"]["auroc"] and rows["admission", "f-lstm"]["skipped"]


def test_cli_runs_an_admission_baseline_and_refuses_a_wrong_level(processed_cohort, run_copy):
    common = ["--data", str(processed_cohort), "--run", str(run_copy), "--seeds", "1", "--epochs", "1"]
    done = CliRunner().invoke(cli, ["evaluate", "--task", "readmission", "--model", "bert-lstm", "--init", "none",
                                    *common])
    assert done.exit_code == 0, done.output
    assert [r["model"] for r in read_csv(run_copy / "results.csv")] == ["bert-lstm"]
    wrong = CliRunner().invoke(cli, ["evaluate", "--task", "readmission", "--model", "f-lstm", *common])
    one_line_error(wrong, "f-lstm is a stay-level baseline: it cannot run --task readmission")
    probe = CliRunner().invoke(cli, ["evaluate", "--task", "mortality", "--model", "raim", "--probe", *common])
    one_line_error(probe, "no pretrained encoder to probe")
